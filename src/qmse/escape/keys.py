"""Content keys for the escape benchmark's caches.

Every cached result (a row, a sweep, gd-population's end points) stores the key of what it
was computed from (arguments, starting weights, the method's definition, the protocol's
version) and is recomputed when the key differs, so a changed argument never gets stale
results served.
"""

from __future__ import annotations

import hashlib
import json

import torch

PROTOCOL_VERSION = 2  # raised when the engine's protocol changes what a cached result means


def _canonical(obj: object) -> object:
    """A JSON-able form of obj: tensors become a hash of their dtype, shape and bytes."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()
        return {"tensor": str(t.dtype), "shape": list(t.shape), "sha256": digest}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj)  # exact
    return obj


def content_key(*parts: object) -> str:
    """A short hex hash of `parts` (JSON-able values and tensors), stable across processes."""
    text = json.dumps([PROTOCOL_VERSION, *(_canonical(p) for p in parts)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]
