"""Tensor payloads: safetensors round trip and validated decoding (including fuzzing)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol.errors import ValidationError
from shared.protocol.tensors import decode_tensors, encode_tensors, tensor_spec

SPEC = {"predictor.weight": ((10, 32), np.float32), "predictor.bias": ((10,), np.float32)}


def good():
    return {"predictor.weight": torch.randn(10, 32), "predictor.bias": torch.randn(10)}


def test_round_trip_is_exact_and_deterministic():
    tensors = good()
    blob = encode_tensors(tensors)
    assert blob == encode_tensors(dict(reversed(list(tensors.items()))))
    out = decode_tensors(blob, tensor_spec(tensors))
    assert all(np.array_equal(out[k], tensors[k].numpy()) for k in tensors)


@pytest.mark.parametrize("mutate, reason", [
    (lambda t: t.pop("predictor.bias"), "missing_tensor"),
    (lambda t: t.update(extra=torch.zeros(1)), "unexpected_tensor"),
    (lambda t: t.update({"predictor.bias": torch.zeros(11)}), "bad_shape"),
    (lambda t: t.update({"predictor.bias": torch.zeros(10, dtype=torch.float64)}), "bad_dtype"),
    (lambda t: t["predictor.bias"].__setitem__(0, float("nan")), "non_finite"),
    (lambda t: t["predictor.bias"].__setitem__(0, float("inf")), "non_finite"),
    (lambda t: t["predictor.bias"].__setitem__(0, 1e9), "absurd_magnitude"),
])
def test_bad_tensors_refused_with_reason(mutate, reason):
    tensors = good()
    mutate(tensors)
    with pytest.raises(ValidationError) as err:
        decode_tensors(encode_tensors(tensors), SPEC)
    assert err.value.reason == reason


def test_oversized_and_garbage_refused():
    blob = encode_tensors(good())
    with pytest.raises(ValidationError, match="too_large"):
        decode_tensors(blob, SPEC, max_bytes=len(blob) - 1)
    for junk in (b"", b"\x00" * 7, blob[: len(blob) // 2], b"\xff" * 64):
        with pytest.raises(ValidationError, match="undecodable"):
            decode_tensors(junk, SPEC)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decoder_fuzz_raises_only_validation_errors(data):
    try:
        decode_tensors(data, SPEC)
    except ValidationError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=400))
def test_decoder_fuzz_on_corrupted_valid_payloads(patch, position):
    blob = bytearray(encode_tensors(good()))
    blob[position:position + len(patch)] = patch
    try:
        decode_tensors(bytes(blob), SPEC)
    except ValidationError:
        pass
