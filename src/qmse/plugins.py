"""Plug-ins: Python files of the user's that add to qmse's registries when imported.

A loss plug-in calls `qmse.register_loss(...)`: `qmse train --loss`, `reproduce --losses`,
`landscape --loss`, `symmetry match --loss` and `diagnose` (a run's own loss) import the
files given with `--plugin FILE.py` before they check the names against the registry
(`qmse.cli.common.check_losses`). `qmse escape --plugin` (method plug-ins) goes through the
same loader with the method registry (`qmse.escape.methods.load_plugin`).

`load_plugin` imports a file once per content (a second import of the same file would
register the same names again), and turns a file that fails to import into one line naming
the file and the line, after taking out what it registered before failing. It remembers the
files it imported (`is_plugin_file`), so that an error raised later in a plug-in's code can
be told from a bug of qmse's own. It does not import torch: the registries are handed to it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import traceback
from collections.abc import MutableMapping
from pathlib import Path

from qmse.errors import UserError

_LOADED: dict[str, list[str]] = {}  # a plug-in file's content hash -> the names it added
_FILES: set[Path] = set()  # the plug-in files imported, resolved


def where(path: Path, error: BaseException) -> str:
    """ "FILE, line N" of the innermost frame of `error` in the plug-in file `path` (a
    syntax error carries its own line), or FILE alone."""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno
    return f"{path}, line {line}" if line else str(path)


def load_plugin(path: str | os.PathLike, *registries: MutableMapping[str, object]) -> list[str]:
    """Import the Python file `path`, which adds entries to `registries` (e.g.
    `qmse.loss.LOSSES`); return the names it added. The same file content is imported once
    per process (later calls return the same names). A file that fails to import (a syntax
    error, a failed import, an exception such as a name already registered) is a UserError
    of one line naming the file and the line; the names it added to `registries` before
    failing are removed again (the traceback stays in the error's __cause__)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plug-in {path} does not exist (give a .py file)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    if digest in _LOADED:
        return _LOADED[digest]
    name = f"qmse_plugin_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"plug-in {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    before = [set(registry) for registry in registries]
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        for registry, known in zip(registries, before):
            for added in set(registry) - known:
                del registry[added]
        if isinstance(e, Exception):
            raise UserError(f"plug-in {where(path, e)}: {type(e).__name__}: {e}") from e
        raise
    added = [k for registry, known in zip(registries, before) for k in registry if k not in known]
    _LOADED[digest] = added
    _FILES.add(path.resolve())
    return added


def is_plugin_file(filename: str) -> bool:
    """Whether `filename` (a traceback frame's) is a plug-in file `load_plugin` imported."""
    return Path(filename).resolve() in _FILES
