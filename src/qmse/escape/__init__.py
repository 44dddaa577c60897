"""The escape benchmark (`qmse escape`): does QMSE get out of spurious minima where MSE gets
stuck? On any registered problem with certified spurious minima (`--problem`): Safran &
Shamir's teacher–student problem by default (`qmse.teacher_student`, scalar or vector
outputs), where "stuck" is decided by the closed-form population loss; on the others by
their exact objective, or by their own test of its value where the minima are not isolated.

- `methods`: the plug-in interface (`Method`, `register_method`) and its registry;
- `rules`: the built-in methods, registered through that interface;
- `engine`: methods trained in lockstep with common random numbers (`run_methods`);
- `population`: Safran & Shamir's gradient descent (`gd_population`) and its counterpart
  for any problem (`descend`): the reproduction, and the stuck points to certify;
- `tuning`: each method's declared space searched with an equal budget (or swept), a
  start's failure decided by the problem's own rule, as in the rows;
- `report` and `figures`: tables and figures (the statistics are `qmse.stats`'s);
- `config`: what defines a benchmark (`EscapeConfig`) and its cells' starting points: the
  certified minima, deduplicated modulo the problem's symmetries into distinct minima;
- `cells`: the benchmark's cells, caches and outputs (`run_benchmark`);
- `problems`: problems with certified spurious minima as plug-ins (`Problem`,
  `register_problem`): teacher–student, `matrix_sensing` (Zhang et al. 2018's rank-1
  sensing) and `burer_monteiro` (O'Carroll et al. 2022's SDP factorisation), registered
  here, each with the factory argument its cells vary (k, n, p); the engine trains any of
  them (teacher–student by its hand-written path), and the sweeps, minima and tables read
  them all.
"""

from qmse.escape import burer_monteiro, matrix_sensing  # noqa: F401 (register their problems)
from qmse.escape.cells import run_benchmark
from qmse.escape.config import PROTOCOLS, EscapeConfig, parse_hyper, parse_values
from qmse.escape.engine import DIVERGED_NORM, STUCK_LOSS, Job, make_job, run_method, run_methods
from qmse.escape.methods import METHODS, Method, Run, get_method, load_plugin, register_method
from qmse.escape.population import PUBLISHED, certify_minima, gd_population, population_runs
from qmse.escape.problems import PROBLEMS, Problem, get_problem, register_problem
from qmse.escape.report import write_outputs, write_table
from qmse.escape.rules import BUILTIN_METHODS

__all__ = [
    "BUILTIN_METHODS",
    "DIVERGED_NORM",
    "METHODS",
    "PROBLEMS",
    "PROTOCOLS",
    "PUBLISHED",
    "STUCK_LOSS",
    "EscapeConfig",
    "Job",
    "Method",
    "Problem",
    "Run",
    "certify_minima",
    "gd_population",
    "get_method",
    "get_problem",
    "load_plugin",
    "make_job",
    "parse_hyper",
    "parse_values",
    "population_runs",
    "register_method",
    "register_problem",
    "run_benchmark",
    "run_method",
    "run_methods",
    "write_outputs",
    "write_table",
]
