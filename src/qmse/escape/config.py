"""The escape benchmark's configuration and starting points.

`EscapeConfig` is everything that defines a benchmark directory (config.json): the problem
(any registered `qmse.escape.problems.Problem`; teacher–student by default) and its cells,
one per size k. A teacher–student cell may pool several teachers (`teachers`: problem seeds
problem_seed, problem_seed + 1, ...; `problems_of`), each an instance of its own with its
own gd-population runs and minima: the cell's starts are theirs, in teacher order, and each
start knows its teacher (`owner`), so the engine trains it on its own problem. The starts of
a cell are the problem's random initialisations ("random-init", the same seeds for every
teacher) or the certified spurious minima among gd-population's end points
("spurious-minima"): stuck points whose Hessian is positive definite, deduplicated modulo
the problem's symmetries into distinct minima (`minima`; two teachers never share one).
Tuning starts come from seeds disjoint from the evaluation seeds, and tuning minima are
distinct minima other than the evaluation ones wherever the problem has any
(`tuning_minima`); each cell has its own input stream and method stream
(`qmse.escape.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qmse.errors import UserError
from qmse.escape import problems
from qmse.escape.engine import make_job
from qmse.escape.methods import get_method, load_plugin
from qmse.escape.population import population_runs, problem_runs, stuck_points
from qmse.escape.problems import Problem, get_problem
from qmse.escape.rules import BUILTIN_METHODS
from qmse.keys import content_key
from qmse.runs import load_json

PROTOCOLS = ("random-init", "spurious-minima")  # from Xavier starts; from certified minima
TEACHER_STUDENT = "teacher-student"  # the default problem, with options of its own
DISTINCT_TOL = 1e-5  # two minima are one when their canonical forms agree to this (max-abs)
TUNE_SEEDS = 10**6  # tuning initialisations: seeds 10⁶ + i (evaluation seeds are 0 … S−1)
REFERENCES = ("sgd", "momentum", "qmse")  # exploratory paired tests of every method against these
# The declared comparisons (the primary family, Holm over it): each QMSE variant against its
# MSE counterpart, against its noise-free landscape (is QMSE's noise what helps?), and against
# label noise at a matched optimiser (QMSE's noise against the obvious noise baseline).
COMPARISONS = (
    "qmse:sgd",
    "qmse-momentum:momentum",
    "qmse:expected-qmse",
    "qmse-momentum:expected-qmse-momentum",
    "qmse:label-noise",
    "qmse-momentum:label-noise-momentum",
)


@dataclass
class EscapeConfig:
    """Everything that defines one benchmark directory (saved as config.json). Making one
    checks its numbers and names but runs no plug-in code: `check_methods` loads the plug-ins
    and checks the methods, references and fixed values where a benchmark starts."""

    ks: list[int] = field(
        metadata={
            "help": "problem sizes, one cell per size: the teacher width k of teacher-student, "
            "the argument a registered problem names as its size; one value (a label) for a "
            "problem without one"
        }
    )
    problem: str = field(
        default=TEACHER_STUDENT,
        metadata={"help": "the registered problem (qmse.escape.register_problem; plug-ins too)"},
    )
    problem_args: dict[str, float] = field(
        default_factory=dict,
        metadata={
            "help": "keyword arguments of a problem other than teacher-student (whose options "
            "are --n-extra, --outputs, --teacher, --problem-seed), e.g. delta=0.7,n=3"
        },
    )
    n_extra: int = field(default=0, metadata={"help": "student width n = k + n_extra"})
    outputs: int = field(
        default=1,
        metadata={
            "help": "C, teacher-student's outputs; > 1 is the vector-output variant "
            "y = A relu(Vx), where QMSE's v is uniform on the unit sphere of R^C (C = 1 "
            "reduces it to a sign)"
        },
    )
    seeds: int = field(
        default=1000,
        metadata={"help": "gd-population initialisations 0..N-1 per k (the reproduction)"},
    )
    sample_seeds: int = field(
        default=1000,
        metadata={
            "help": "evaluation starts per cell and teacher: seeds (random-init) or minima "
            "(spurious-minima; all of them if fewer)"
        },
    )
    methods: list[str] = field(
        default_factory=lambda: ["gd-population", *BUILTIN_METHODS],
        metadata={"help": "gd-population, built-in methods, methods registered by plug-ins"},
    )
    protocols: list[str] = field(
        default_factory=lambda: list(PROTOCOLS),
        metadata={"help": f"starting points, of {', '.join(PROTOCOLS)}"},
    )
    steps: int = field(
        default=3000, metadata={"help": "the shared step budget of every sample-based method"}
    )
    batch: int = field(default=64, metadata={"help": "fresh samples per step and start"})
    tune_k: int | None = field(
        default=None, metadata={"help": "tune at this k for every k; None: at each k"}
    )
    tune_seeds: int = field(default=100, metadata={"help": "tuning starts per swept value"})
    tune_pool: int = field(
        default=1000, metadata={"help": "gd-population tuning seeds searched for minima"}
    )
    max_gd_steps: int = field(default=100_000, metadata={"help": "gd-population's step cap"})
    problem_seed: int = field(
        default=0, metadata={"help": "draws the output layers when outputs > 1, and a random V"}
    )
    teachers: int = field(
        default=1,
        metadata={
            "help": "teacher-student's teachers per cell, problem seeds problem_seed ... "
            "problem_seed + N - 1 (needs outputs > 1: with one output every seed is the same "
            "teacher, or the same in another basis), their starts and minima pooled in the "
            "cell's rows"
        },
    )
    teacher: str = field(
        default="identity",
        metadata={"help": "the teacher's hidden weights V: identity (Safran & Shamir) or random "
                  "(a seeded orthogonal matrix)"},
    )  # fmt: skip
    device: str = field(default="cpu", metadata={"help": "where the cells run"})
    lr: dict[str, float] = field(
        default_factory=dict, metadata={"help": "fixed learning rates (not swept), by method"}
    )
    hyper: dict[str, dict[str, float]] = field(
        default_factory=dict,
        metadata={"help": "fixed hyperparameters (not swept), by method, e.g. label-noise's sigma"},
    )
    plugins: list[str] = field(
        default_factory=list,
        metadata={"help": "Python files that register methods (qmse.escape.register_method)"},
    )
    references: list[str] | None = field(
        default=None,
        metadata={
            "help": f"the methods every method is paired against (exploratory, raw p); None: "
            f"those of {', '.join(REFERENCES)} that run"
        },
    )
    tune_budget: int | None = field(
        default=32,
        metadata={
            "help": "trials of every method's joint search of its declared space (equal "
            "budgets); None: the second edition's coordinate passes"
        },
    )
    comparisons: list[str] | None = field(
        default=None,
        metadata={
            "help": "the declared comparisons A:B (A's failure rate minus B's), Holm over them "
            "per protocol; None: those of COMPARISONS whose methods both run"
        },
    )
    equivalence_margin: float = field(
        default=0.05,
        metadata={
            "help": "a comparison is 'equivalent' when the 90 % interval of the difference of "
            "failure rates lies within ± this (two one-sided tests at 5 %)"
        },
    )

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise UserError(f"protocols {bad} unknown; choose from {PROTOCOLS}")
        if not self.ks or min(self.ks) < 1:
            raise UserError(f"ks={self.ks}: need at least one k >= 1")
        if self.problem == TEACHER_STUDENT and self.problem_args:
            raise UserError(
                f"problem_args {self.problem_args} given for teacher-student, whose options are "
                f"n_extra, outputs, teacher and problem_seed (--n-extra, --outputs, ...)"
            )
        if self.outputs < 1:
            raise UserError(f"outputs={self.outputs}: need C >= 1")
        if self.teachers < 1:
            raise UserError(f"teachers={self.teachers}: need >= 1")
        if self.teachers > 1 and (self.problem != TEACHER_STUDENT or self.outputs == 1):
            raise UserError(
                f"teachers={self.teachers}: several teachers need teacher-student with outputs "
                f"> 1 (with one output every seed gives the same teacher, V = I, or the same "
                f"one in another basis): give --outputs 2 or more, or one teacher"
            )
        if self.n_extra < 0:
            raise UserError(f"n_extra={self.n_extra}: need >= 0 (n = k + n_extra)")
        for name in ("seeds", "sample_seeds", "steps", "batch", "tune_seeds", "tune_pool"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)}: need >= 1")
        if len(set(self.methods)) != len(self.methods):
            raise UserError(f"methods {self.methods} name a method twice")
        if self.tune_budget is not None and self.tune_budget < 1:
            raise UserError(f"tune_budget={self.tune_budget}: need >= 1 (or None)")
        if not 0 < self.equivalence_margin < 1:
            raise UserError(f"equivalence_margin={self.equivalence_margin}: need 0 < margin < 1")
        for pair in self.comparisons or ():
            a, sep, b = pair.partition(":")
            if not sep or not a or not b or a == b:
                raise UserError(f"comparison {pair!r}: write it A:B with two different methods")

    @property
    def sample_methods(self) -> list[str]:
        """The sample-based methods run (all but the reproduction, gd-population)."""
        return [m for m in self.methods if m != "gd-population"]

    def check_methods(self) -> None:
        """Load the plug-ins (running their code) and check that every method, reference and
        fixed value names a registered method of this run: where a benchmark starts."""
        for path in self.plugins:
            load_plugin(path)
        get_problem(self.problem)  # an error naming the registered problems
        if problems.SIZES.get(self.problem) is None and len(self.ks) > 1:
            raise UserError(
                f"problem {self.problem!r} registers no size argument, so its benchmark has one "
                f"cell: give one size (--teacher-widths {self.ks[0]}), which only labels it"
            )
        for k in self.ks:
            problem_of(self, k)  # the problem's own errors (its arguments, its sizes) here
        sample = self.sample_methods
        for name in sample:
            get_method(name)  # an error naming the registered methods
        named = {m for pair in self.comparisons or () for m in pair.split(":")}
        if stray := sorted(named - set(sample)):
            raise UserError(
                f"comparisons name {stray}, which are not among the sample-based methods run "
                f"here ({', '.join(sample)})"
            )
        if missing := [r for r in self.references or () if r not in sample]:
            raise UserError(
                f"references {missing} are not among the sample-based methods run here "
                f"({', '.join(sample)}): add them to the methods or drop them from references"
            )
        fixed = {m: {"lr": v} for m, v in self.lr.items()}
        for m, values in self.hyper.items():
            fixed.setdefault(m, {}).update(values)
        for m, values in fixed.items():
            if m not in sample:
                raise UserError(
                    f"a value is fixed for {m!r}, which is not among the sample-based methods "
                    f"run here ({', '.join(sample)})"
                )
            make_job(m, values.get("lr", 1.0), {h: v for h, v in values.items() if h != "lr"})

    def declared_comparisons(self) -> list[tuple[str, str]]:
        """The primary family: `comparisons`, or those of COMPARISONS whose methods run."""
        pairs = self.comparisons
        if pairs is None:
            pairs = [p for p in COMPARISONS if set(p.split(":")) <= set(self.sample_methods)]
        return [tuple(p.split(":")) for p in pairs]

    def paired_references(self) -> list[str]:
        """The methods every method is paired against: `references`, or those of REFERENCES
        that this benchmark runs."""
        if self.references is not None:
            return list(self.references)
        return [r for r in REFERENCES if r in self.sample_methods]

    def fixed(self, method: str) -> dict[str, float]:
        """The values of `method` fixed by the user (not swept)."""
        return ({"lr": self.lr[method]} if method in self.lr else {}) | self.hyper.get(method, {})


# what a config.json written before it named these fields ran: teacher–student with V = I,
# one teacher, the second edition's coordinate passes (no trial budget), no declared tests
EARLIER_DEFAULTS = {
    "problem": TEACHER_STUDENT, "problem_args": {}, "teachers": 1, "teacher": "identity",
    "tune_budget": None, "comparisons": None, "equivalence_margin": 0.05,
}  # fmt: skip


def saved_settings(directory: Path) -> dict[str, Any]:
    """A benchmark directory's config.json, with the fields earlier files lack filled in."""
    return EARLIER_DEFAULTS | load_json(Path(directory) / "config.json")


def load_config(directory: Path) -> EscapeConfig:
    """The EscapeConfig a benchmark directory ran with (its plug-ins must be registered, or
    their files still where config.json says: they are loaded again)."""
    settings = saved_settings(directory)
    known = EscapeConfig.__dataclass_fields__
    if unknown := sorted(set(settings) - set(known)):
        raise UserError(
            f"{directory}/config.json has settings this version does not know: {unknown}; "
            "read it with the qmse version that wrote it"
        )
    return EscapeConfig(**settings)


def is_benchmark_dir(directory: Path) -> bool:
    """A benchmark directory written before directories recorded their kind (or committed
    without kind.json): its config.json names ks and protocols."""
    config = directory / "config.json"
    return config.exists() and {"ks", "protocols"} <= set(load_json(config))


def parse_values(text: str | None, option: str) -> dict[str, float]:
    """ "sgd=0.3,qmse=0.03" -> {"sgd": 0.3, "qmse": 0.03} (the form of --lr and --radius)."""
    out = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise UserError(
                f"{option} {text!r}: expected NAME=NUMBER[,NAME=NUMBER...], e.g. sgd=0.3,qmse=0.03"
            ) from None
    return out


def parse_hyper(text: str | None, option: str = "--hyper") -> dict[str, dict[str, float]]:
    """ "pgd.radius=0.5,label-noise.sigma=0.2" -> {"pgd": {"radius": 0.5}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for name, value in parse_values(text, option).items():
        method, dot, param = name.rpartition(".")
        if not dot or not method or not param:
            raise UserError(f"{option}: {name!r} must read METHOD.NAME, e.g. pgd.radius=0.5")
        out.setdefault(method, {})[param] = value
    return out


def problem_of(cfg: EscapeConfig, k: int) -> Problem:
    """The registered problem of the cell of size k (its first teacher's, `problems_of`):
    teacher–student with n = k + n_extra student units, or `cfg.problem`'s factory called
    with `problem_args` (whole numbers as int) and, where it registers a size argument, k."""
    return problems_of(cfg, k)[0]


def problems_of(cfg: EscapeConfig, k: int) -> list[Problem]:
    """The problems of the cell of size k: one per teacher (problem seeds problem_seed …
    problem_seed + teachers − 1) for teacher–student; `cfg.problem`'s one instance else."""
    if cfg.problem == TEACHER_STUDENT:
        return [
            problems.teacher_student(
                k, k + cfg.n_extra, outputs=cfg.outputs, seed=seed, teacher=cfg.teacher
            )
            for seed in range(cfg.problem_seed, cfg.problem_seed + cfg.teachers)
        ]
    kwargs: dict[str, Any] = {
        name: int(v) if float(v).is_integer() else v for name, v in cfg.problem_args.items()
    }
    if (size := problems.SIZES.get(cfg.problem)) is not None:
        if size in kwargs:
            raise UserError(
                f"problem {cfg.problem!r} takes its size {size} from the sizes "
                f"(--teacher-widths {kwargs[size]}), not from problem_args: drop {size}= there"
            )
        kwargs[size] = k
    try:
        return [get_problem(cfg.problem)(**kwargs)]
    except TypeError as e:
        raise UserError(f"problem {cfg.problem!r} with arguments {kwargs}: {e}") from None


def instance_of(cfg: EscapeConfig, k: int) -> dict[str, Any]:
    """What defines the cell of size k, for its rows, tables and keys: its problem's
    instance; with several teachers, their seeds as a list under "seed"."""
    found = problems_of(cfg, k)
    instance = dict(found[0].instance)
    if len(found) > 1:
        instance["seed"] = [p.instance["seed"] for p in found]
    return instance


def key_of_starts(W0: Tensor, owner: Tensor, cfg: EscapeConfig, k: int) -> str:
    """The key of a cell's starts W0 (m, *shape) and their teachers `owner` (m,): W0 alone
    for one problem (as before cells pooled teachers), with the owners and the teachers'
    instances for several."""
    found = problems_of(cfg, k)
    if len(found) == 1:
        return content_key(W0)
    return content_key(W0, owner, [dict(p.instance) for p in found])


def _run_id(*parts: object) -> int:
    """A deterministic integer seed from small integers (never Python's salted hash)."""
    out = 0
    for p in parts:
        out = out * 1_000_003 + int(p)
    return out % 2**62


def streams(cfg: EscapeConfig, k: int, protocol: str, *, tuning: bool) -> tuple[int, int]:
    """(input seed, method seed) of a cell's tuning or evaluation runs."""
    parts = (k, k + cfg.n_extra, cfg.outputs, cfg.problem_seed, PROTOCOLS.index(protocol))
    if cfg.problem != TEACHER_STUDENT:  # the problem and its arguments, as a number
        parts += (int(content_key(cfg.problem, cfg.problem_args)[:12], 16),)
    first = 1 if tuning else 2
    return _run_id(first, *parts), _run_id(first + 2, *parts)


def cell_name(cfg: EscapeConfig, k: int) -> str:
    """k{k}_n{n}_C{C} (teacher–student: n student units, C outputs); for another problem
    n is its parameters' first dimension and its name follows."""
    if cfg.problem == TEACHER_STUDENT:
        return f"k{k}_n{k + cfg.n_extra}_C{cfg.outputs}"
    problem = problem_of(cfg, k)
    return f"k{k}_n{problem.shape[0]}_C{problem.outputs}_{cfg.problem}"


def population(
    out: Path, cfg: EscapeConfig, k: int, *, tag: str, quiet: bool = False
) -> list[dict]:
    """gd-population from the evaluation seeds 0 … seeds−1 (tag "eval") or the tuning pool
    10⁶ … 10⁶ + tune_pool − 1 ("tune"), one result per teacher (`problems_of`), cached:
    Safran & Shamir's closed-form descent for teacher–student (each teacher of several in a
    file of its own, {tag}_seed{seed}_…), `descend` on the objective for another problem."""
    seeds = range(cfg.seeds) if tag == "eval" else range(TUNE_SEEDS, TUNE_SEEDS + cfg.tune_pool)
    found = problems_of(cfg, k)
    out_runs = []
    for problem in found:
        if problem.native is not None:
            mine = tag if len(found) == 1 else f"{tag}_seed{problem.instance['seed']}"
            out_runs.append(
                population_runs(
                    out, problem.native, seeds, tag=mine, max_steps=cfg.max_gd_steps, quiet=quiet
                )
            )
        else:
            cell = cell_name(cfg, k)
            out_runs.append(
                problem_runs(
                    out,
                    problem,
                    seeds,
                    tag=tag,
                    cell=cell,
                    max_steps=cfg.max_gd_steps,
                    quiet=quiet,
                )  # fmt: skip
            )
    return out_runs


def minima(out: Path, cfg: EscapeConfig, k: int, *, tag: str, quiet: bool = False) -> dict:
    """The certified spurious minima of the evaluation seeds or the tuning pool, counted
    modulo the problem's symmetries: each teacher's stuck end points (`stuck_points`)
    grouped into classes whose canonical forms agree to DISTINCT_TOL (`problems.distinct`),
    each class certified at its first point (`problems.certify`); the points of the classes
    that are strict minima are kept, and, for a problem whose minima are not isolated (one
    with a `stuck` test, deciding by the value), the degenerate ones too. Teachers follow
    each other; a class never spans two.

    Returns W (M, *shape) float64 in (teacher, seed) order; owner (M,) long, each point's
    teacher (its index in `problems_of`); labels (M,) long, each point's distinct minimum
    (0 … D−1, in order of first appearance); forms (D, 1 + F) their canonical forms after
    their teacher's index; certificates (D) the certification of each kept minimum; stuck,
    the number of stuck end points; excluded, the kinds of the classes left out
    ("degenerate", "saddle", ...); isolated, whether every kept minimum is strict."""
    parts = [
        _teacher_minima(problem, stuck_points(run).double(), t)
        for t, (problem, run) in enumerate(
            zip(problems_of(cfg, k), population(out, cfg, k, tag=tag, quiet=quiet))
        )
    ]
    offsets = [0]
    for part in parts:
        offsets.append(offsets[-1] + len(part["forms"]))
    certificates = [c for part in parts for c in part["certificates"]]
    return {
        "W": torch.cat([part["W"] for part in parts]),
        "owner": torch.cat([torch.full((len(part["W"]),), t) for t, part in enumerate(parts)]),
        "labels": torch.cat([part["labels"] + o for part, o in zip(parts, offsets)]),
        "forms": torch.cat([part["forms"] for part in parts]),
        "certificates": certificates,
        "stuck": sum(part["stuck"] for part in parts),
        "excluded": [kind for part in parts for kind in part["excluded"]],
        "isolated": all(c["kind"] == "strict minimum" for c in certificates),
    }


def _teacher_minima(problem: Problem, points: Tensor, teacher: int) -> dict:
    """`minima` of one problem's stuck points (M, *shape); its forms start with `teacher`."""
    forms = problem.canonical(points).flatten(1) if len(points) else points.flatten(1)
    forms = torch.cat([torch.full((len(forms), 1), float(teacher), dtype=forms.dtype), forms], 1)
    firsts = problems.distinct(problem, points, tol=DISTINCT_TOL) if len(points) else []
    labels = torch.tensor(
        [_nearest(forms[i], forms[firsts]) for i in range(len(points))], dtype=torch.long
    )
    certificates = problems.certify(problem, points[firsts]) if firsts else []
    loose = problem.stuck is not None  # minima not isolated: stuck decided by the value
    keep = [c["kind"] == "strict minimum" or (loose and c["kind"] == "degenerate")
            for c in certificates]  # fmt: skip
    renumber = torch.cumsum(torch.tensor([0, *keep], dtype=torch.long), 0)[:-1]
    mask = torch.tensor(keep, dtype=torch.bool)[labels] if firsts else labels.bool()
    return {
        "W": points[mask],
        "labels": renumber[labels[mask]],
        "forms": forms[[f for f, kept in zip(firsts, keep) if kept]],
        "certificates": [c for c, kept in zip(certificates, keep) if kept],
        "stuck": len(points),
        "excluded": [c["kind"] for c, kept in zip(certificates, keep) if not kept],
    }


def _nearest(form: Tensor, forms: Tensor) -> int:
    """The index of the first of `forms` (D, F) within DISTINCT_TOL of `form` (F,)."""
    close = (forms - form).abs().amax(1) <= DISTINCT_TOL
    return int(close.nonzero()[0])


def spurious_minima(out: Path, cfg: EscapeConfig, k: int, *, tag: str, quiet=False) -> Tensor:
    """The certified spurious minima (M, *shape) of the evaluation seeds or the tuning pool
    (`minima`)."""
    return minima(out, cfg, k, tag=tag, quiet=quiet)["W"]


def tuning_minima(
    out: Path, cfg: EscapeConfig, k: int, *, quiet=False
) -> tuple[Tensor, Tensor, dict]:
    """The tuning pool's certified minima at k, without those that are (modulo symmetry) a
    distinct minimum of the evaluation set at k, when k is an evaluation size; all of them
    where no other remains (the problem has too few distinct minima). Returns the points
    (M, *shape), their teachers (M,) and what the rows say: disjoint (bool), the number of
    distinct tuning minima, and of the evaluation minima they were kept apart from."""
    tune = minima(out, cfg, k, tag="tune", quiet=quiet)
    W, owner, labels, forms = tune["W"], tune["owner"], tune["labels"], tune["forms"]
    shared = torch.zeros(len(forms), dtype=torch.bool)
    evaluated = 0
    if k in cfg.ks and len(forms):
        seen = minima(out, cfg, k, tag="eval", quiet=quiet)["forms"]
        evaluated = len(seen)
        for j, form in enumerate(forms):
            shared[j] = bool(len(seen)) and bool(
                ((seen - form).abs().amax(1) <= DISTINCT_TOL).any()
            )
    own = ~shared[labels] if len(labels) else labels.bool()
    disjoint = bool(own.any()) or not len(W)
    if own.any():
        W, owner, kept = W[own], owner[own], int((~shared).sum())
    else:
        kept = len(forms)
    return W, owner, {"disjoint_minima": disjoint, "tune_minima": kept, "eval_minima": evaluated}


def starts(
    out: Path, cfg: EscapeConfig, k: int, protocol: str, *, tuning: bool, quiet=False
) -> tuple[Tensor, Tensor]:
    """A cell's starting weights (m, *shape) float64 and their teachers (m,) long (indices
    into `problems_of`), `count` (tune_seeds or sample_seeds) per teacher: the problem's
    random initialisations, the same seeds for each teacher (random-init), or each
    teacher's first certified minima (spurious-minima, all of them if fewer); tuning starts
    come from seeds disjoint from the evaluation ones, and tuning minima from distinct
    minima other than the evaluation ones where there are any (`tuning_minima`)."""
    count = cfg.tune_seeds if tuning else cfg.sample_seeds
    if protocol == "random-init":
        first = TUNE_SEEDS if tuning else 0
        found = problems_of(cfg, k)
        W = torch.cat([p.init(range(first, first + count)).double() for p in found])
        return W, torch.arange(len(found)).repeat_interleave(count)
    if tuning:
        W, owner, _ = tuning_minima(out, cfg, k, quiet=quiet)
    else:
        found = minima(out, cfg, k, tag="eval", quiet=quiet)
        W, owner = found["W"], found["owner"]
    first = first_of_each(owner, count)
    return W[first], owner[first]


def first_of_each(owner: Tensor, count: int) -> Tensor:
    """Which points (M,) bool are among the first `count` of their teacher; `owner` (M,)
    is in teacher order."""
    index = torch.arange(len(owner))
    return index - torch.searchsorted(owner, owner) < count
