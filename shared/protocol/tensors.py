"""Tensors on the wire: safetensors only (no pickle), as numpy arrays, decoded with size, name, shape, dtype
and value checks. No torch here: devices without torch and the server's ingest path use these as they are
(torch code converts with ``torch.from_numpy``, which shares the memory)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from shared.fsutil import sha256_hex
from shared.protocol.errors import ValidationError

DEFAULT_MAX_TENSOR_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_ABS_VALUE = 1e6

Spec = Mapping[str, tuple[tuple[int, ...], np.dtype]]


def as_numpy(tensor: object) -> np.ndarray:
    """A numpy view of a numpy array or a (CPU, detached) torch tensor, without importing torch."""
    if isinstance(tensor, (np.ndarray, np.generic)):
        return np.asarray(tensor)
    return tensor.detach().cpu().numpy()  # type: ignore[attr-defined]


def encode_tensors(tensors: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors blob of the arrays (numpy, or torch tensors), deterministic for the same input.
    Byte-identical to safetensors.torch's encoding of the same tensors."""
    ordered = {k: np.asarray(as_numpy(tensors[k]), order="C") for k in sorted(tensors)}  # keeps 0-d arrays 0-d
    return st_save(ordered, metadata=dict(metadata) if metadata else None)


def state_sha256(state: Mapping[str, object]) -> str:
    """The hash a manifest's ``state_sha256`` carries: sha256 of the canonical safetensors encoding."""
    return sha256_hex(encode_tensors(state))


def decode_tensors(blob: bytes, expected: Spec, max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
                   max_abs: float = DEFAULT_MAX_ABS_VALUE) -> dict[str, np.ndarray]:
    """Decode a safetensors blob and check it holds exactly `expected` (name -> (shape, dtype)), with finite
    values no larger than `max_abs` in magnitude. Raises ValidationError otherwise."""
    if len(blob) > max_bytes:
        raise ValidationError("too_large", f"tensor payload of {len(blob)} bytes exceeds {max_bytes}")
    try:
        tensors = st_load(bytes(blob))
    except Exception as exc:  # the Rust parser and the numpy view raise many types (KeyError for BF16...)
        raise ValidationError("undecodable", f"not a safetensors payload ({type(exc).__name__}: {exc})"[:300]) \
            from None
    check_names(tensors, expected, "payload")
    for name, tensor in tensors.items():
        shape, dtype = expected[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValidationError("bad_shape", f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if tensor.dtype != np.dtype(dtype):
            raise ValidationError("bad_dtype", f"{name} has dtype {tensor.dtype}, expected {np.dtype(dtype)}")
        check_values(name, tensor, max_abs)
    return tensors


def check_names(actual: Mapping[str, object], expected: Mapping[str, object], what: str) -> None:
    """The same tensor names on both sides, or ValidationError missing_tensor / unexpected_tensor."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        raise ValidationError("missing_tensor", f"{what} lacks tensors {missing}")
    if extra:
        raise ValidationError("unexpected_tensor", f"{what} has unexpected tensors {extra[:20]}")


def check_values(name: str, array: np.ndarray, max_abs: float = DEFAULT_MAX_ABS_VALUE) -> None:
    """Floating-point values must be finite and no larger than `max_abs` in magnitude."""
    if not np.issubdtype(array.dtype, np.floating) or not array.size:
        return
    low, high = float(array.min()), float(array.max())  # one pass each, no temporary; NaN propagates
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValidationError("non_finite", f"{name} contains NaN or Inf")
    if max(-low, high) > max_abs:
        raise ValidationError("absurd_magnitude", f"{name} has values beyond +-{max_abs:g}")


def tensor_spec(tensors: Mapping[str, object]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, numpy dtype) of numpy arrays or torch tensors: the `expected` of decode_tensors."""
    return {k: (tuple(v.shape), as_numpy(v).dtype) for k, v in tensors.items()}
