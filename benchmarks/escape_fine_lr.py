"""A plug-in for `qmse escape`: built-in methods again, swept on a learning-rate grid 2^(1/4)
apart instead of 2x, each registered as <method>-fine.

Why: on the certified minima the methods that escape do it near the step size where they
start to diverge (at k = 12, heavy-ball momentum escapes none of the tuning minima at lr 0.08
and diverges on all of them at 0.16, the next value of the factor-2 grid; at k = 10 it
escapes 97 % at 0.16). A verdict that turns on such a jump may be an artefact of the grid,
so these methods are tuned again on a grid four times finer, over the built-in grid's range
and two doublings above it, where the jumps lie (the usual widening past an edge still
applies), on the same tuning starts, and evaluated on the same starts as the built-ins:

    qmse escape --plugin benchmarks/escape_fine_lr.py --teacher-widths 10,12 \\
        --methods sgd-fine,momentum-fine,qmse-fine,qmse-momentum-fine,... --out runs/escape-2-fine
"""

import dataclasses

from qmse.escape import BUILTIN_METHODS, get_method, register_method

STEPS_PER_DOUBLING = 4
DOUBLINGS_ABOVE = 2


def finer(grid: tuple[float, ...]) -> tuple[float, ...]:
    """From `grid`'s first value up to 2^DOUBLINGS_ABOVE times its last, in steps of 2^(1/4)."""
    lo, hi = grid[0], grid[-1] * 2**DOUBLINGS_ABOVE
    values, j = [], 0
    while lo * 2 ** (j / STEPS_PER_DOUBLING) <= hi * (1 + 1e-9):
        values.append(float(f"{lo * 2 ** (j / STEPS_PER_DOUBLING):.6g}"))
        j += 1
    return tuple(values)


for name in BUILTIN_METHODS:
    method = get_method(name)
    register_method(
        dataclasses.replace(
            method,
            name=f"{name}-fine",
            lr_grid=finer(method.lr_grid),
            description=f"{method.description}; lr grid 2^(1/4) apart",
        )
    )
