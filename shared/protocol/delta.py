"""Weight deltas between model versions (numpy; no torch).

A delta is new - old (float32, keyed by state-dict name) that a device holding the previous version applies
with `apply_delta`. `make_delta` also returns the canonical new state (old + delta) that the server publishes,
so the device's result hashes (`state_sha256`) exactly like the server's: old + (new - old) is not always
new in floating point.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from shared.protocol.errors import ValidationError
from shared.protocol.tensors import as_numpy, check_names


def make_delta(old: Mapping[str, object], new: Mapping[str, object]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(delta, canonical_new): delta = new - old and canonical_new = old + delta, both float32."""
    old_np = {k: as_numpy(v) for k, v in old.items()}
    new_np = {k: as_numpy(v) for k, v in new.items()}
    _check_compatible(old_np, new_np, "new state", require_float32=False)
    delta: dict[str, np.ndarray] = {}
    canonical: dict[str, np.ndarray] = {}
    for name, value in old_np.items():
        base = value.astype(np.float32)  # np.asarray: 0-d arithmetic would give numpy scalars
        delta[name] = np.asarray(new_np[name].astype(np.float32) - base)
        canonical[name] = np.asarray(base + delta[name])
    return delta, canonical


def apply_delta(old: Mapping[str, object], delta: Mapping[str, object]) -> dict[str, np.ndarray]:
    """old + delta for float32 states with the same names and shapes; ValidationError otherwise
    ('missing_tensor', 'unexpected_tensor', 'bad_shape', 'bad_dtype', 'non_finite')."""
    old = {k: as_numpy(v) for k, v in old.items()}
    delta = {k: as_numpy(v) for k, v in delta.items()}
    _check_compatible(old, delta, "delta", require_float32=True)
    new = {name: np.asarray(old[name] + delta[name]) for name in old}
    for name, array in new.items():
        if not np.isfinite(array).all():
            raise ValidationError("non_finite", f"{name} is not finite after applying the delta")
    return new


def _check_compatible(base: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], what: str,
                      require_float32: bool) -> None:
    check_names(other, base, what)
    for name, array in base.items():
        if tuple(other[name].shape) != tuple(array.shape):
            raise ValidationError("bad_shape", f"{what} {name} has shape {tuple(other[name].shape)}, "
                                               f"expected {tuple(array.shape)}")
        if require_float32 and (array.dtype != np.float32 or other[name].dtype != np.float32):
            raise ValidationError("bad_dtype", f"{name}: deltas apply to float32 only, got {array.dtype} "
                                               f"and {other[name].dtype}")
        if not (np.issubdtype(array.dtype, np.floating) and np.issubdtype(other[name].dtype, np.floating)):
            raise ValidationError("bad_dtype", f"{name} is not floating point")
