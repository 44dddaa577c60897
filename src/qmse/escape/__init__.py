"""The escape benchmark (`qmse escape`): does QMSE get out of spurious minima where MSE gets
stuck? On Safran & Shamir's teacher–student problem (`qmse.teacher_student`), where "stuck"
is decided by the closed-form population loss.

- `methods`: the plug-in interface (`Method`, `register_method`) and its registry;
- `rules`: the built-in methods, registered through that interface;
- `engine`: methods trained in lockstep with common random numbers (`run_methods`);
- `population`: Safran & Shamir's gradient descent (`gd_population`), certified minima;
- `tuning`: sweeps that widen their grids past an edge;
- `report`: tables and figures (the statistics are `qmse.stats`'s);
- `config`: what defines a benchmark (`EscapeConfig`) and its cells' starting points;
- `cells`: the benchmark's cells, caches and outputs (`run_benchmark`).
"""

from qmse.escape.cells import run_benchmark
from qmse.escape.config import PROTOCOLS, EscapeConfig, parse_hyper, parse_values
from qmse.escape.engine import DIVERGED_NORM, STUCK_LOSS, Job, make_job, run_method, run_methods
from qmse.escape.methods import METHODS, Method, Run, get_method, load_plugin, register_method
from qmse.escape.population import PUBLISHED, certify_minima, gd_population, population_runs
from qmse.escape.report import write_outputs, write_table
from qmse.escape.rules import BUILTIN_METHODS

__all__ = [
    "BUILTIN_METHODS",
    "DIVERGED_NORM",
    "METHODS",
    "PROTOCOLS",
    "PUBLISHED",
    "STUCK_LOSS",
    "EscapeConfig",
    "Job",
    "Method",
    "Run",
    "certify_minima",
    "gd_population",
    "get_method",
    "load_plugin",
    "make_job",
    "parse_hyper",
    "parse_values",
    "population_runs",
    "register_method",
    "run_benchmark",
    "run_method",
    "run_methods",
    "write_outputs",
    "write_table",
]
