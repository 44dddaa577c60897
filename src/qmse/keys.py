"""Content keys: the one cache-key scheme of qmse.

Every cached result (an escape row or sweep, gd-population's end points, a run's diagnosis)
stores the key of what it was computed from: its arguments, its input tensors, the files it
read, the declared definition of the method that made it and the thresholds that judge it.
A cache whose key differs is recomputed, so a changed argument, file or constant never gets
a stale result served. FORMAT is part of every key: it is raised when what a cached result
means changes, and `stale` then says that the file was written by an older format.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

FORMAT = 3  # 3: methods keyed by their declared parameters and constants, not source text


def _canonical(obj: object) -> object:
    """A JSON-able form of obj: tensors become a hash of their dtype, shape and bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()
        return {"tensor": str(t.dtype), "shape": list(t.shape), "sha256": digest}
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)  # exact
    return obj


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(*parts: object, files: Iterable[str | os.PathLike] = ()) -> str:
    """A short hex hash of `parts` (JSON-able values and tensors) and of the named files'
    contents (each with its name), stable across processes and machines."""
    named = [[Path(f).name, file_digest(f)] for f in files]
    text = json.dumps([FORMAT, *(_canonical(p) for p in parts), named], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def stale(saved: Mapping, key: str) -> str | None:
    """Why a cached result `saved` (a dict with its "key" and "format") cannot be reused for
    `key`: None when it can; else a reason for a progress line."""
    if saved.get("key") == key:
        return None
    if saved.get("format") != FORMAT:
        return f"written by an older qmse (cache format {saved.get('format', '< 3')}, now {FORMAT})"
    return "computed from other inputs"
