"""The escape benchmark's configuration and starting points.

`EscapeConfig` is everything that defines a benchmark directory (config.json); the starts
of a cell are Xavier initialisations ("random-init") or the certified stuck end points of
gd-population ("spurious-minima"), with tuning starts disjoint from the evaluation starts;
each cell has its own input stream and method stream (`qmse.escape.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from qmse.errors import UserError
from qmse.escape.engine import make_job
from qmse.escape.methods import get_method, load_plugin
from qmse.escape.population import population_runs, stuck_points
from qmse.escape.rules import BUILTIN_METHODS
from qmse.runs import load_json
from qmse.teacher_student import Problem, init_weights, make_problem

PROTOCOLS = ("random-init", "spurious-minima")  # from Xavier starts; from certified minima
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

    ks: list[int] = field(metadata={"help": "teacher widths k, one cell per k"})
    n_extra: int = field(default=0, metadata={"help": "student width n = k + n_extra"})
    outputs: int = field(
        default=1, metadata={"help": "C; > 1 is the vector-output variant y = A relu(Vx)"}
    )
    seeds: int = field(
        default=1000,
        metadata={"help": "gd-population initialisations 0..N-1 per k (the reproduction)"},
    )
    sample_seeds: int = field(
        default=1000,
        metadata={
            "help": "evaluation starts per cell: seeds (random-init) or minima "
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
    return make_problem(
        k, k + cfg.n_extra, outputs=cfg.outputs, seed=cfg.problem_seed, teacher=cfg.teacher
    )


def _run_id(*parts: object) -> int:
    """A deterministic integer seed from small integers (never Python's salted hash)."""
    out = 0
    for p in parts:
        out = out * 1_000_003 + int(p)
    return out % 2**62


def streams(cfg: EscapeConfig, k: int, protocol: str, *, tuning: bool) -> tuple[int, int]:
    """(input seed, method seed) of a cell's tuning or evaluation runs."""
    parts = (k, k + cfg.n_extra, cfg.outputs, cfg.problem_seed, PROTOCOLS.index(protocol))
    first = 1 if tuning else 2
    return _run_id(first, *parts), _run_id(first + 2, *parts)


def cell_name(cfg: EscapeConfig, k: int) -> str:
    return f"k{k}_n{k + cfg.n_extra}_C{cfg.outputs}"


def population(out: Path, cfg: EscapeConfig, k: int, *, tag: str, quiet: bool = False) -> dict:
    """gd-population from the evaluation seeds 0 … seeds−1 (tag "eval") or the tuning pool
    10⁶ … 10⁶ + tune_pool − 1 ("tune"), cached."""
    seeds = range(cfg.seeds) if tag == "eval" else range(TUNE_SEEDS, TUNE_SEEDS + cfg.tune_pool)
    return population_runs(
        out, problem_of(cfg, k), seeds, tag=tag, max_steps=cfg.max_gd_steps, quiet=quiet
    )


def spurious_minima(out: Path, cfg: EscapeConfig, k: int, *, tag: str, quiet=False) -> Tensor:
    """The certified stuck end points (M, n, d) of the evaluation seeds or the tuning pool."""
    return stuck_points(population(out, cfg, k, tag=tag, quiet=quiet))


def starts(out: Path, cfg: EscapeConfig, k: int, protocol: str, *, tuning: bool, quiet=False):
    """A cell's starting weights (m, n, d) float64: Xavier initialisations (random-init) or
    the first certified minima (spurious-minima, all of them if fewer); tuning starts come
    from seeds disjoint from the evaluation ones."""
    problem = problem_of(cfg, k)
    count = cfg.tune_seeds if tuning else cfg.sample_seeds
    if protocol == "random-init":
        first = TUNE_SEEDS if tuning else 0
        return init_weights(range(first, first + count), problem.n, problem.d)
    return spurious_minima(out, cfg, k, tag="tune" if tuning else "eval", quiet=quiet)[:count]
