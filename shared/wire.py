"""Tensors on the wire: safetensors only (no pickle), decoded with size, name, shape, dtype and value checks."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

DEFAULT_MAX_TENSOR_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_ABS_VALUE = 1e6


class ValidationError(ValueError):
    """A received payload was refused; `reason` is a short machine-readable code, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors blob of contiguous CPU tensors, deterministic for the same input."""
    ordered = {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}
    return st_save(ordered, metadata=dict(metadata) if metadata else None)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_tensors(
    blob: bytes,
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
    max_abs: float = DEFAULT_MAX_ABS_VALUE,
) -> dict[str, torch.Tensor]:
    """Decode a safetensors blob and check it holds exactly `expected` (name -> (shape, dtype)),
    with finite values no larger than `max_abs` in magnitude. Raises ValidationError otherwise."""
    if len(blob) > max_bytes:
        raise ValidationError("too_large", f"tensor payload of {len(blob)} bytes exceeds {max_bytes}")
    try:
        tensors = st_load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValidationError("undecodable", f"not a safetensors payload ({exc})") from None
    check_names(tensors, expected, "payload")
    for name, tensor in tensors.items():
        shape, dtype = expected[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValidationError("bad_shape", f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        if tensor.dtype != dtype:
            raise ValidationError("bad_dtype", f"{name} has dtype {tensor.dtype}, expected {dtype}")
        check_values(name, tensor, max_abs)
    return tensors


def check_names(actual: Mapping[str, object], expected: Mapping[str, object], what: str) -> None:
    """The same tensor names on both sides, or ValidationError missing_tensor / unexpected_tensor."""
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing:
        raise ValidationError("missing_tensor", f"{what} lacks tensors {missing}")
    if extra:
        raise ValidationError("unexpected_tensor", f"{what} has unexpected tensors {extra}")


def check_values(name: str, tensor: torch.Tensor, max_abs: float = DEFAULT_MAX_ABS_VALUE) -> None:
    """Floating-point values must be finite and no larger than `max_abs` in magnitude."""
    if not tensor.is_floating_point():
        return
    if not torch.isfinite(tensor).all():
        raise ValidationError("non_finite", f"{name} contains NaN or Inf")
    if tensor.numel() and float(tensor.abs().max()) > max_abs:
        raise ValidationError("absurd_magnitude", f"{name} has values beyond +-{max_abs:g}")


def tensor_spec(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype), the `expected` argument of decode_tensors."""
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
