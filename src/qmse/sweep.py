"""Sweeps on existing engines: a grid's independent tasks in this process or as Ray tasks.

A grid (the paper's runs, each task a `qmse.train.train_task`; the escape benchmark's
cells) is a list of independent tasks, each writing its own output directory, resuming from
its checkpoint and returning at once when it is finished. `run_tasks` runs such tasks in
this process (`backend="local"`, no dependency) or as Ray tasks (`backend="ray"`,
`pip install qmse[ray]`), one task per run, each asking for `num_cpus`/`num_gpus`. A task
whose worker dies is retried by Ray and resumes from its last checkpoint, so both backends
leave the same files. One run over several processes (torchrun) is `qmse.distributed`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from qmse import runs
from qmse.errors import QmseError, UserError

BACKENDS = ("local", "ray")


def run_tasks(
    fn: Callable[[Any], Any],
    tasks: Iterable[Any],
    *,
    backend: str = "local",
    address: str | None = None,
    num_cpus_per_task: float = 1,
    num_gpus_per_task: float = 0,
    max_retries: int = 3,
    quiet: bool = False,
    desc: str = "tasks",
) -> list[Any]:
    """[fn(task) for task in tasks], in this process or as Ray tasks; results in task order.

    `fn` must be idempotent and resumable (write its own output, skip or resume finished
    work): Ray re-runs a task whose worker died up to `max_retries` times. With "ray",
    `fn` and the tasks are pickled, so `fn` must be importable on the workers (a function
    of an installed module), and each task gets `num_cpus_per_task` CPUs (also its torch
    thread count) and `num_gpus_per_task` GPUs; Ray is reached through `ray_session(address)`
    (address "auto", "HOST:PORT", "ray://HOST:10001", or None). All tasks run to the end;
    then the first task's exception, if any, is raised (the local backend raises at once).
    """
    tasks = list(tasks)
    if backend not in BACKENDS:
        raise UserError(f"backend={backend!r}; expected one of {BACKENDS}")
    if not num_cpus_per_task > 0:
        raise UserError(f"num_cpus_per_task={num_cpus_per_task}; expected a positive number")
    if num_gpus_per_task < 0:
        raise UserError(f"num_gpus_per_task={num_gpus_per_task}; expected a number >= 0")
    if max_retries < 0:
        raise UserError(f"max_retries={max_retries}; expected an integer >= 0")
    if backend == "local":
        if address is not None:
            raise UserError(f"address={address!r} needs backend='ray'; drop it or add that")
        return [fn(task) for task in runs.progress(tasks, quiet=quiet, desc=desc, unit="task")]

    with ray_session(address, quiet=quiet) as ray:
        remote = ray.remote(
            num_cpus=num_cpus_per_task, num_gpus=num_gpus_per_task, max_retries=max_retries
        )(_call_with_threads)
        threads = max(1, int(num_cpus_per_task))
        refs = [remote.remote(fn, task, threads) for task in tasks]
        pending = list(refs)
        with runs.progress(total=len(refs), quiet=quiet, desc=desc, unit="task") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, quiet: bool = False) -> Iterator[Any]:
    """The `ray` module, connected for the duration: to the instance this process is
    already connected to, else to `address`, else as Ray's own `ray.init()` does
    ($RAY_ADDRESS, a `ray start` cluster on this machine, or a new local instance); a
    connection made here is closed (a local instance stopped) at the end. Run dependent
    phases of `run_tasks` inside one session to start Ray once."""
    ray = import_ray()
    if ray.is_initialized():
        if address is not None:
            raise UserError(
                f"address={address!r} but this process is already connected to a Ray "
                f"cluster; call ray.shutdown() first or drop address"
            )
        yield ray
        return
    ray.init(address=address, log_to_driver=not quiet)
    try:
        yield ray
    finally:
        ray.shutdown()


def _call_with_threads(fn: Callable[[Any], Any], task: Any, threads: int) -> Any:
    """fn(task) on a Ray worker, with torch using the task's CPUs (not the node's)."""
    torch.set_num_threads(threads)
    return fn(task)


class MissingExtraError(QmseError, ImportError):
    """An optional dependency (an extra of the qmse package) is not installed."""


def import_ray() -> Any:
    """The `ray` module, or a MissingExtraError (an ImportError) that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise MissingExtraError(
            "backend='ray' needs Ray: pip install 'qmse[ray]' (or pip install ray), "
            "or use the local backend"
        ) from e
    return ray
