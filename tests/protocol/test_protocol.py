"""shared/protocol/: round trips of every message, chunking, ids and topics, and property-based fuzzing of every
decoder that reads bytes from the network (they may only ever raise `shared.protocol.errors.ValidationError`)."""

from __future__ import annotations

import functools
import json
import math
import random
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_any_tensors

from server_api.rounds.intake import UpdateValidator
from server_api.rounds.round import RoundWindow
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.models import build_model
from shared.data.partition import PartitionSpec
from shared.fsutil import sha256_hex
from shared.protocol.errors import ValidationError
from shared.protocol.frames import (
    CHUNK_MAGIC,
    MAX_CHUNKS,
    MAX_HEADER_BYTES,
    UPDATE_MAGIC,
    Chunk,
    Reassembler,
    decode_chunk,
    decode_frame,
    encode_frame,
    parse_json_object,
    split_chunks,
)
from shared.protocol.ids import check_id
from shared.protocol.job import JobConfig
from shared.protocol.messages import (
    Ack,
    ArtifactRef,
    Assignment,
    Manifest,
    Presence,
    RoundAnnouncement,
    UpdateHeader,
    decode_ack,
    decode_assignment,
    decode_manifest,
    decode_presence,
    decode_round,
    decode_update,
    encode_update,
)
from shared.protocol.onnx_export import export_predictor_onnx
from shared.protocol.onnx_load import state_from_onnx
from shared.protocol.tensors import decode_tensors, encode_tensors, tensor_spec
from shared.protocol.topics import Topics

NUM_CLASSES = 10
MAX = 1024 * 1024
SPEC = {"predictor.weight": ((NUM_CLASSES, 32), np.float32), "predictor.bias": ((NUM_CLASSES,), np.float32)}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                          HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------- samples
def tensors_blob(seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return encode_tensors({name: torch.randn(*shape, generator=gen) for name, (shape, _) in SPEC.items()})


def update_header(blob: bytes, **overrides) -> UpdateHeader:
    counts = [3] * NUM_CLASSES
    values = dict(job="job1", round=2, attempt=0, client="dev-a", base_version=2, num_samples=sum(counts),
                  label_counts=counts, idempotency_key="k" * 32, tensors_sha256=sha256_hex(blob),
                  metrics={"train_loss": 0.5, "test_correct": 3.0, "test_count": 4.0, "test_loss": 0.7,
                           "train_seconds": 1.5})
    values.update(overrides)
    return UpdateHeader(**values)


def valid_update(seed: int = 0) -> bytes:
    blob = tensors_blob(seed)
    return encode_update(update_header(blob), blob)


def ref(tag: str, size: int = 1000, chunks: int = 1) -> ArtifactRef:
    return ArtifactRef(sha256_hex(tag.encode()), size, chunks)


def manifest(**overrides) -> Manifest:
    values = dict(job="job1", version=3, round=3, state_sha256=sha256_hex(b"state"), model=ref("model", 110_000, 1),
                  predictor=ref("pred"), num_classes=NUM_CLASSES, image_shape=(1, 28, 28),
                  config=JobConfig(id="job1", dataset="mnist-subset", seed=7, chunk_size=4096,
                                   algorithm=AlgorithmConfig(algorithm="fedgen", local_steps=5)),
                  generator=ref("gen"), delta=ref("delta"), delta_base_version=2, label_prior=[0.1] * NUM_CLASSES)
    values.update(overrides)
    return Manifest(**values)


def round_announcement(**overrides) -> RoundAnnouncement:
    values = dict(job="job1", round=2, attempt=1, version=2, selected=["dev-a", "dev-b"], deadline=1.7e9 + 0.25)
    values.update(overrides)
    return RoundAnnouncement(**values)


def window(**overrides) -> RoundWindow:
    values = dict(job="job1", index=2, attempt=0, version=2, selected={"dev-a", "dev-b"}, deadline=2e9)
    values.update(overrides)
    return RoundWindow(**values)


# ---------------------------------------------------------------------------------------------------- round trips
def test_update_round_trip():
    blob = tensors_blob()
    header = update_header(blob)
    decoded, body = decode_update(encode_update(header, blob), NUM_CLASSES, MAX)
    assert decoded == header and body == blob


def test_update_round_trip_without_metrics():
    blob = tensors_blob()
    header = update_header(blob, metrics={})
    assert decode_update(encode_update(header, blob), NUM_CLASSES, MAX) == (header, blob)


def test_encode_update_refuses_a_wrong_hash():
    with pytest.raises(ValueError):
        encode_update(update_header(b"other"), tensors_blob())


@pytest.mark.parametrize("message", [manifest(), manifest(generator=None, delta=None, delta_base_version=None,
                                                          label_prior=None)])
def test_manifest_round_trip(message):
    assert decode_manifest(message.to_json()) == message


@pytest.mark.parametrize("status", ["open", "closed", "finished"])
def test_round_round_trip(status):
    message = round_announcement(status=status)
    assert decode_round(message.to_json()) == message


@pytest.mark.parametrize("message", [Ack("k" * 16, "accepted", 3), Ack("k" * 16, "duplicate", 0, "already_accepted",
                                                                      "x"),
                                     Ack("k" * 16, "rejected", None, "bad_frame", "nope")])
def test_ack_round_trip(message):
    assert decode_ack(message.to_json()) == message


@pytest.mark.parametrize("message", [Presence("online", 120, 3, {"platform": "linux", "torch": "2.13"}),
                                     Presence("offline")])
def test_presence_round_trip(message):
    assert decode_presence(message.to_json()) == message


def test_assignment_round_trip():
    message = Assignment(PartitionSpec(dataset="mnist", alpha=0.1, users=5, seed=0), 4)
    assert decode_assignment(message.to_json()) == message


def test_frame_round_trip():
    header, body = decode_frame(encode_frame(UPDATE_MAGIC, {"a": [1, 2]}, b"\x00body"), UPDATE_MAGIC, MAX)
    assert header == {"a": [1, 2]} and body == b"\x00body"


# ---------------------------------------------------------------------------------------------------- frames
@pytest.mark.parametrize("data, reason", [
    (b"", "bad_frame"),
    (b"FGU", "bad_frame"),
    (b"XXXX" + struct.pack(">I", 2) + b"{}", "bad_frame"),
    (UPDATE_MAGIC + struct.pack(">I", 2**32 - 1) + b"{}", "truncated"),
    (UPDATE_MAGIC + struct.pack(">I", MAX_HEADER_BYTES + 1) + b"{" + b" " * MAX_HEADER_BYTES + b"}", "truncated"),
    (UPDATE_MAGIC + struct.pack(">I", 10) + b"{}", "truncated"),
    (UPDATE_MAGIC + struct.pack(">I", 2) + b"[]", "bad_json"),
    (UPDATE_MAGIC + struct.pack(">I", 2) + b"\xff\xfe", "bad_json"),
    (UPDATE_MAGIC + struct.pack(">I", 14) + b'{"a": NaN    }', "bad_json"),
    (UPDATE_MAGIC + struct.pack(">I", 5000) + b'{"a":' + b"1" * 4994 + b"}", "bad_json"),  # int beyond str limit
    (UPDATE_MAGIC + struct.pack(">I", 2) + b"{}" + b"x" * MAX, "too_large"),
    ("not bytes", "bad_frame"),
])
def test_bad_frames(data, reason):
    with pytest.raises(ValidationError) as err:
        decode_frame(data, UPDATE_MAGIC, MAX)
    assert err.value.reason == reason


def test_deeply_nested_json_is_refused():
    with pytest.raises(ValidationError) as err:
        parse_json_object(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "x", max_bytes=10**6)
    assert err.value.reason == "bad_json"


# ---------------------------------------------------------------------------------------------------- chunks
def reassemble(frames: list[bytes], max_payload: int = MAX) -> bytes | None:
    r = Reassembler(max_payload)
    out = None
    for frame in frames:
        out = r.add("dev-a", decode_chunk(frame, max_payload))
    return out


@pytest.mark.parametrize("size", [0, 1, 100, 101, 1000, 1234])
def test_split_and_reassemble(size):
    payload = random.Random(size).randbytes(size)
    frames = split_chunks(payload, "s1", chunk_size=100)
    assert len(frames) == max(1, math.ceil(size / 100))
    assert reassemble(frames) == payload


def test_chunk_fields():
    frames = split_chunks(b"abcdef", "s1", chunk_size=4)
    chunk = decode_chunk(frames[1], MAX)
    assert chunk == Chunk("s1", 1, 2, 6, sha256_hex(b"abcdef"), b"ef")


def test_split_refuses_bad_chunk_size():
    with pytest.raises(ValueError):
        split_chunks(b"x", "s", chunk_size=0)


def test_out_of_order_chunks():
    payload = bytes(range(256)) * 10
    frames = split_chunks(payload, "s1", chunk_size=100)
    random.Random(1).shuffle(frames)
    assert reassemble(frames) == payload


def test_repeated_identical_chunk_is_tolerated():
    payload = b"x" * 250
    frames = split_chunks(payload, "s1", chunk_size=100)
    r = Reassembler(MAX)
    assert r.add("a", decode_chunk(frames[0], MAX)) is None
    assert r.add("a", decode_chunk(frames[0], MAX)) is None  # QoS 1 redelivery
    assert r.add("a", decode_chunk(frames[1], MAX)) is None
    assert r.add("a", decode_chunk(frames[2], MAX)) == payload


def test_complete_payload_again_starts_a_new_stream():
    frames = split_chunks(b"hello", "s1", chunk_size=100)
    r = Reassembler(MAX)
    assert r.add("a", decode_chunk(frames[0], MAX)) == b"hello"
    assert r.add("a", decode_chunk(frames[0], MAX)) == b"hello"  # a full redelivery: the server's dedupe handles it


def test_senders_are_separate():
    frames = split_chunks(b"y" * 150, "s1", chunk_size=100)
    r = Reassembler(MAX)
    assert r.add("a", decode_chunk(frames[0], MAX)) is None
    assert r.add("b", decode_chunk(frames[1], MAX)) is None
    assert r.add("a", decode_chunk(frames[1], MAX)) == b"y" * 150


def forged(stream: str, index: int, count: int, size: int, digest: str, body: bytes) -> bytes:
    return encode_frame(CHUNK_MAGIC, {"stream": stream, "index": index, "count": count, "size": size,
                                      "sha256": digest}, body)


def test_repeated_chunk_with_other_bytes_is_a_conflict():
    payload = b"z" * 200
    frames = split_chunks(payload, "s1", chunk_size=100)
    r = Reassembler(MAX)
    r.add("a", decode_chunk(frames[0], MAX))
    with pytest.raises(ValidationError) as err:
        r.add("a", decode_chunk(forged("s1", 0, 2, 200, sha256_hex(payload), b"q" * 100), MAX))
    assert err.value.reason == "chunk_conflict"
    assert r.add("a", decode_chunk(frames[1], MAX)) is None  # the stream was dropped: this starts a new one


@pytest.mark.parametrize("change", [{"count": 3}, {"size": 201}, {"digest": sha256_hex(b"other")}])
def test_inconsistent_chunk_headers(change):
    payload = b"z" * 200
    r = Reassembler(MAX)
    r.add("a", decode_chunk(split_chunks(payload, "s1", chunk_size=100)[0], MAX))
    values = {"count": 2, "size": 200, "digest": sha256_hex(payload), **change}
    with pytest.raises(ValidationError) as err:
        r.add("a", decode_chunk(forged("s1", 1, values["count"], values["size"], values["digest"], b"z" * 100), MAX))
    assert err.value.reason == "chunk_mismatch"


def test_wrong_total_hash():
    frames = [forged("s1", i, 2, 8, sha256_hex(b"something else"), b"abcd") for i in range(2)]
    with pytest.raises(ValidationError) as err:
        reassemble(frames)
    assert err.value.reason == "chunk_hash"


@pytest.mark.parametrize("frames", [
    [forged("s1", 0, 2, 4, "0" * 64, b"abcde")],  # more bytes than announced before the end
    [forged("s1", 0, 2, 10, "0" * 64, b"ab"), forged("s1", 1, 2, 10, "0" * 64, b"cd")],  # fewer at the end
])
def test_wrong_total_size(frames):
    with pytest.raises(ValidationError) as err:
        reassemble(frames)
    assert err.value.reason == "chunk_size"


def test_too_many_streams():
    r = Reassembler(MAX, max_streams=3)
    for i in range(3):
        r.add("a", decode_chunk(split_chunks(b"x" * 20, f"s{i}", chunk_size=10)[0], MAX))
    with pytest.raises(ValidationError) as err:
        r.add("a", decode_chunk(split_chunks(b"x" * 20, "s9", chunk_size=10)[0], MAX))
    assert err.value.reason == "too_many_streams"


def test_expire_reports_incomplete_streams():
    r = Reassembler(MAX, timeout=10)
    frames = split_chunks(b"x" * 30, "s1", chunk_size=10)
    r.add("a", decode_chunk(frames[0], MAX), now=100.0)
    r.add("a", decode_chunk(frames[2], MAX), now=101.0)
    r.add("b", decode_chunk(frames[0], MAX), now=105.0)
    assert r.expire(now=109.0) == []
    assert r.expire(now=110.5) == [("a", "s1", 2, 3)]
    assert r.expire(now=200.0) == [("b", "s1", 1, 3)]
    assert r.expire(now=300.0) == []


@pytest.mark.parametrize("header, reason", [
    ({"stream": "", "index": 0, "count": 1, "size": 1}, "bad_field"),
    ({"stream": "s" * 129, "index": 0, "count": 1, "size": 1}, "bad_field"),
    ({"stream": "s", "index": 1, "count": 1, "size": 1}, "bad_field"),
    ({"stream": "s", "index": 0, "count": MAX_CHUNKS + 1, "size": 1}, "bad_field"),
    ({"stream": "s", "index": 0, "count": 0, "size": 1}, "bad_field"),
    ({"stream": "s", "index": -1, "count": 1, "size": 1}, "bad_field"),
    ({"stream": "s", "index": True, "count": 1, "size": 1}, "bad_field"),
    ({"stream": "s", "index": 0, "count": 1, "size": MAX + 1}, "too_large"),
    ({"stream": "s", "index": 0, "count": 1}, "missing_field"),
    ({"stream": "s", "index": 0, "count": 1, "size": 1, "sha256": "XYZ"}, "bad_field"),
])
def test_bad_chunk_headers(header, reason):
    header = {"sha256": "0" * 64, **header}
    with pytest.raises(ValidationError) as err:
        decode_chunk(encode_frame(CHUNK_MAGIC, header, b"x"), MAX)
    assert err.value.reason == reason


def test_chunk_larger_than_the_payload_limit_is_too_large():
    with pytest.raises(ValidationError) as err:
        decode_chunk(split_chunks(b"x" * 5000, "s", chunk_size=5000)[0], max_payload=1000)
    assert err.value.reason == "too_large"


# ---------------------------------------------------------------------------------------------------- topics and ids
def test_topics():
    t = Topics("job1")
    assert t.update("dev-a") == "fedgen/v1/job1/clients/dev-a/update"
    assert t.client_of("fedgen/v1/job1/clients/dev-a/update") == "dev-a"
    assert t.client_of("fedgen/v1/job1/clients/dev-a/presence") == "dev-a"
    assert t.client_of(t.ack("x.y_z")) == "x.y_z"
    for topic in ["fedgen/v1/job2/clients/dev-a/update", "fedgen/v1/job1/clients/dev-a", "fedgen/v1/job1/round",
                  "fedgen/v1/job1/clients/dev-a/update/extra", "fedgen/v2/job1/clients/dev-a/update",
                  "fedgen/v1/job1/client/dev-a/update", ""]:
        assert t.client_of(topic) is None, topic
    assert t.artifact_chunk("ab" * 32, 3) == f"fedgen/v1/job1/artifacts/{'ab' * 32}/3"


@pytest.mark.parametrize("value", ["a", "dev-a", "A.b_c-9", "x" * 63, "0"])
def test_good_ids(value):
    assert check_id(value, "client") == value


@pytest.mark.parametrize("value", ["", "-a", ".a", "_a", "x" * 64, "a/b", "a+b", "a#", "a b", "a\n", "a\nb", "é",
                                   None, 5, b"abc", ["a"]])
def test_bad_ids(value):
    with pytest.raises(ValidationError) as err:
        check_id(value, "client")
    assert err.value.reason == "bad_id"


def test_topics_refuse_a_bad_job():
    with pytest.raises(ValidationError):
        Topics("a/b")


# ---------------------------------------------------------------------------------------------------- update headers
def envelope_with(header: dict, body: bytes | None = None) -> bytes:
    blob = tensors_blob() if body is None else body
    return encode_frame(UPDATE_MAGIC, header, blob)


def good_header() -> dict:
    return update_header(tensors_blob()).to_dict()


@pytest.mark.parametrize("change, reason", [
    (lambda h: h.pop("round"), "missing_field"),
    (lambda h: h.pop("metrics"), "missing_field"),
    (lambda h: h.update(round="2"), "bad_field"),
    (lambda h: h.update(round=2.0), "bad_field"),
    (lambda h: h.update(round=True), "bad_field"),
    (lambda h: h.update(round=-1), "bad_field"),
    (lambda h: h.update(attempt=10**6), "bad_field"),
    (lambda h: h.update(client=5), "bad_field"),
    (lambda h: h.update(client="a/b"), "bad_id"),
    (lambda h: h.update(extra=1), "unexpected_field"),
    (lambda h: h.update(label_counts=[3] * 9), "label_counts_length"),
    (lambda h: h.update(label_counts=[3.0] * 10), "label_counts_type"),
    (lambda h: h.update(label_counts=[-1] + [3] * 8 + [7]), "label_counts_negative"),
    (lambda h: h.update(label_counts=[4] * 10), "label_counts_sum"),
    (lambda h: h.update(label_counts="3333"), "bad_field"),
    (lambda h: h.update(num_samples=0, label_counts=[0] * 10), "bad_field"),
    (lambda h: h.update(metrics={"accuracy": 1.0}), "bad_metric"),
    (lambda h: h.update(metrics={"train_loss": -1}), "bad_metric"),
    (lambda h: h.update(metrics={"train_loss": "1"}), "bad_metric"),
    (lambda h: h.update(metrics={"train_loss": True}), "bad_metric"),
    (lambda h: h.update(metrics={"train_loss": 10**400}), "bad_metric"),
    (lambda h: h.update(metrics={"test_correct": 5, "test_count": 4}), "bad_metric"),
    (lambda h: h.update(metrics=[]), "bad_field"),
    (lambda h: h.update(idempotency_key="short"), "bad_field"),
    (lambda h: h.update(tensors_sha256="0" * 63), "bad_field"),
    (lambda h: h.update(tensors_sha256="0" * 64), "tensors_hash"),
])
def test_bad_update_headers(change, reason):
    header = good_header()
    change(header)
    with pytest.raises(ValidationError) as err:
        decode_update(envelope_with(header), NUM_CLASSES, MAX)
    assert err.value.reason == reason


def test_huge_metric_literal_is_refused():
    header = json.dumps(good_header()).replace('"train_loss": 0.5', '"train_loss": 1e999').encode()
    data = UPDATE_MAGIC + struct.pack(">I", len(header)) + header + tensors_blob()
    with pytest.raises(ValidationError) as err:
        decode_update(data, NUM_CLASSES, MAX)
    assert err.value.reason == "bad_metric"


def test_manifest_refuses_bad_values():
    for change in [dict(label_prior=[math.inf] * NUM_CLASSES), dict(label_prior=[10**400] * NUM_CLASSES),
                   dict(image_shape=[True, 28, 28]), dict(protocol=True), dict(protocol=1.0),
                   dict(num_classes=1), dict(chunk_size=10)]:
        raw = json.loads(manifest().to_json())
        raw.update(change)
        with pytest.raises(ValidationError):
            decode_manifest(json.dumps(raw).encode())


def test_round_refuses_bad_deadlines():
    for deadline in [b"1e999", b"-1e999", b"1" + b"0" * 400, b"true", b'"1"']:
        raw = round_announcement().to_json().replace(b'"deadline":1700000000.25', b'"deadline":' + deadline)
        assert raw != round_announcement().to_json()
        with pytest.raises(ValidationError):
            decode_round(raw)


def test_round_refuses_bad_selections():
    good = json.loads(round_announcement().to_json())
    for change in [dict(selected=[f"d{i}" for i in range(1001)]),  # more than an announcement lists
                   dict(selection_seed=1),  # a seed without a threshold
                   dict(selection_threshold=5),  # and the other way round
                   dict(selection_seed=1, selection_threshold=-1), dict(selection_seed=1, selection_threshold=2**63),
                   dict(selection_seed=1, selection_threshold=True), dict(selected_count=100_001),
                   dict(selection_seed=-1, selection_threshold=1)]:
        with pytest.raises(ValidationError):
            decode_round(json.dumps({**good, **change}).encode())


def test_selection_by_rank_is_seeded_and_its_threshold_is_exact():
    from shared.algorithm.aggregate import select_by_rank
    from shared.algorithm.schedule import selection_rank

    candidates = [f"dev-{i}" for i in range(5000)]
    chosen, threshold = select_by_rank(candidates, 2000, 7, 3, 1)
    assert chosen == select_by_rank(list(reversed(candidates)), 2000, 7, 3, 1)[0]  # order-free
    assert chosen != select_by_rank(candidates, 2000, 7, 3, 2)[0]  # a new draw per attempt
    assert chosen != select_by_rank(candidates, 2000, 8, 3, 1)[0]  # and per seed
    ann = round_announcement(round=3, attempt=1, selected=[], selection_seed=7, selection_threshold=threshold)
    assert {c for c in candidates if ann.selects(c)} == set(chosen)
    assert all(selection_rank(7, 3, 1, c) <= threshold for c in chosen)
    # a uniform draw: each half of the candidates gets about its share (binomial sd ~ 22)
    assert abs(sum(1 for c in chosen if int(c[4:]) < 2500) - 1000) < 120
    assert round_announcement().selects("dev-a") and not round_announcement().selects("dev-c")


# ---------------------------------------------------------------------------------------------------- the validator
def validator() -> UpdateValidator:
    return UpdateValidator("job1", NUM_CLASSES, SPEC, MAX)


def test_validator_accepts_a_good_update_and_refuses_a_bad_one():
    v = validator()
    decision = v.check("dev-a", valid_update(), window(), now=1e9)
    assert decision.status == "accepted" and decision.header.client == "dev-a"
    assert v.check("dev-b", valid_update(), window(), now=1e9).reason == "client_mismatch"
    assert v.check("dev-a", valid_update(), None, now=1e9).reason == "no_open_round"
    assert v.check("dev-a", valid_update(), window(index=3), now=1e9).reason == "late"
    assert v.check("dev-a", valid_update(), window(index=1), now=1e9).reason == "unknown_round"
    assert v.check("dev-a", valid_update(), window(), now=3e9).reason == "late"
    assert v.check("dev-a", valid_update(), window(selected={"dev-b"}), now=1e9).reason == "not_selected"
    assert v.check("dev-a", valid_update(), window(version=1), now=1e9).reason == "wrong_version"
    assert v.check("dev-a", valid_update(), window(accepted={"dev-a"}), now=1e9).status == "duplicate"


# ---------------------------------------------------------------------------------------------------- fuzzing
JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "1e999", "", "open", "online", "accepted", "job1",
                     "dev-a", "0" * 64, "a\n", "../x"]),
)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)), max_leaves=25)


def dumps(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def raw_frame(magic: bytes, header: dict, body: bytes) -> bytes:
    """encode_frame, but writing NaN/Infinity too (a sender need not use our encoder)."""
    head = json.dumps(header, allow_nan=True).encode()
    return magic + struct.pack(">I", len(head)) + head + body


def nested(depth: int) -> bytes:
    return b'{"a":' + b"[" * depth + b"]" * depth + b"}"


def mutate(data: bytes, rnd: random.Random) -> bytes:
    data = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(4)
        pos = rnd.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rnd.randrange(8)
        elif op == 1:
            data[pos:pos] = rnd.randbytes(rnd.randint(1, 8))
        elif op == 2:
            del data[pos:pos + rnd.randint(1, 16)]
        else:
            data = data[:pos]
    return bytes(data)


def only_validation_errors(fn, *args):
    """Call fn; any exception other than ValidationError fails the test."""
    try:
        return fn(*args)
    except ValidationError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return None


def template_dicts() -> dict[str, tuple[dict, callable]]:
    blob = tensors_blob()
    return {
        "update": (good_header(), lambda raw: decode_update(raw_frame(UPDATE_MAGIC, raw, blob), NUM_CLASSES, MAX)),
        "chunk": ({"stream": "s", "index": 0, "count": 1, "size": 1, "sha256": "0" * 64},
                  lambda raw: decode_chunk(raw_frame(CHUNK_MAGIC, raw, b"x"), MAX)),
        "manifest": (json.loads(manifest().to_json()), lambda raw: decode_manifest(dumps(raw))),
        "round": (json.loads(round_announcement().to_json()), lambda raw: decode_round(dumps(raw))),
        "ack": (json.loads(Ack("k" * 16, "rejected", 1, "r", "m").to_json()), lambda raw: decode_ack(dumps(raw))),
        "presence": (json.loads(Presence("online", 5, 1, {"a": "b"}).to_json()),
                     lambda raw: decode_presence(dumps(raw))),
        "assignment": ({"spec": "x", "index": 1}, lambda raw: decode_assignment(dumps(raw))),
    }


TEMPLATES = template_dicts()
BYTE_DECODERS = {
    "frame": lambda b: decode_frame(b, UPDATE_MAGIC, MAX),
    "chunk": lambda b: decode_chunk(b, MAX),
    "update": lambda b: decode_update(b, NUM_CLASSES, MAX),
    "manifest": decode_manifest,
    "round": decode_round,
    "ack": decode_ack,
    "presence": decode_presence,
    "assignment": decode_assignment,
    "json": lambda b: parse_json_object(b, "x"),
    "tensors": lambda b: decode_tensors(b, SPEC),
}
VALID_SAMPLES = {
    "frame": encode_frame(UPDATE_MAGIC, {"a": 1}, b"body"),
    "chunk": split_chunks(b"payload" * 10, "s1", chunk_size=30)[1],
    "update": valid_update(),
    "manifest": manifest().to_json(),
    "round": round_announcement().to_json(),
    "ack": Ack("k" * 16, "rejected", 1, "r", "m").to_json(),
    "presence": Presence("online", 5, 1, {"a": "b"}).to_json(),
    "assignment": Assignment("x", 1).to_json(),
    "json": b'{"a": [1, {"b": null}], "c": "d"}',
    "tensors": tensors_blob(),
}


@pytest.mark.parametrize("name", sorted(BYTE_DECODERS))
@FUZZ
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(name, data):
    only_validation_errors(BYTE_DECODERS[name], data)
    only_validation_errors(BYTE_DECODERS[name], UPDATE_MAGIC + data)
    only_validation_errors(BYTE_DECODERS[name], CHUNK_MAGIC + struct.pack(">I", min(len(data), 400)) + data)


@pytest.mark.parametrize("name", sorted(BYTE_DECODERS))
@FUZZ
@given(seed=st.integers(0, 2**32 - 1))
def test_fuzz_mutated_valid_payloads(name, seed):
    only_validation_errors(BYTE_DECODERS[name], mutate(VALID_SAMPLES[name], random.Random(seed)))


@pytest.mark.parametrize("name", sorted(BYTE_DECODERS))
def test_fuzz_pathological_json(name):
    for raw in [nested(50_000), nested(900), b'{"a":' + b"9" * 5000 + b"}", b'{"a": 1e999}', b'{"a": -0}',
                b'{"a": "\\ud800"}', b'{"a": Infinity}', b'{"a": NaN}', b"{" * 10 + b"}" * 10, b"\x00" * 10,
                "{\"a\": \"\u2028\"}".encode(), b'{"a":1,"a":2}']:
        only_validation_errors(BYTE_DECODERS[name], raw)
        only_validation_errors(BYTE_DECODERS[name], encode_frame(UPDATE_MAGIC, {}, raw))
        head = UPDATE_MAGIC + struct.pack(">I", len(raw)) + raw
        only_validation_errors(BYTE_DECODERS[name], head)
        only_validation_errors(BYTE_DECODERS[name], CHUNK_MAGIC + head[4:] + b"x")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@FUZZ
@given(value=JSON_VALUES)
def test_fuzz_random_json_objects(name, value):
    _, decode = TEMPLATES[name]
    only_validation_errors(decode, value if isinstance(value, dict) else {"x": value})


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@FUZZ
@given(data=st.data())
def test_fuzz_fields_with_wrong_values(name, data):
    """Valid messages with fields replaced by random JSON, deleted, or added."""
    template, decode = TEMPLATES[name]
    raw = json.loads(json.dumps(template))
    keys = sorted(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["replace", "delete", "add", "nest"]))
        key = data.draw(st.sampled_from(keys))
        if action == "replace":
            raw[key] = data.draw(JSON_VALUES)
        elif action == "delete":
            raw.pop(key, None)
        elif action == "add":
            raw[data.draw(st.text(max_size=8))] = data.draw(JSON_VALUES)
        else:
            raw[key] = json.loads(nested(data.draw(st.integers(1, 200))))
    result = only_validation_errors(decode, raw)
    if result is not None and name in ("update",):
        assert isinstance(result[0], UpdateHeader)


@FUZZ
@given(frames=st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(["s1", "s2"]), st.integers(0, 3),
                                 st.integers(1, 4), st.integers(0, 12), st.booleans(), st.binary(max_size=6)),
                       max_size=12))
def test_fuzz_reassembler(frames):
    r = Reassembler(max_payload=12, max_streams=3)
    for sender, stream, index, count, size, right_hash, body in frames:
        index %= count
        digest = sha256_hex(body * count) if right_hash else "0" * 64
        chunk = only_validation_errors(decode_chunk, forged(stream, index, count, size, digest, body), 12)
        if chunk is not None:
            out = only_validation_errors(r.add, sender, chunk, 0.0)
            assert out is None or (len(out) == size and sha256_hex(out) == digest)
    r.expire(now=1e9)


@FUZZ
@given(data=st.data())
def test_fuzz_validator_check(data):
    """UpdateValidator.check turns any envelope into a Decision; it never raises."""
    v = validator()
    choice = data.draw(st.sampled_from(["bytes", "mutated", "header"]))
    if choice == "bytes":
        envelope = data.draw(st.binary(max_size=300))
    elif choice == "mutated":
        envelope = mutate(valid_update(), random.Random(data.draw(st.integers(0, 2**32 - 1))))
    else:
        header = good_header()
        header[data.draw(st.sampled_from(sorted(header)))] = data.draw(JSON_VALUES)
        envelope = raw_frame(UPDATE_MAGIC, header, tensors_blob())
    win = data.draw(st.sampled_from([None, window(), window(selected=set()), window(deadline=0.0)]))
    decision = v.check(data.draw(st.sampled_from(["dev-a", "dev-b"])), envelope, win, 1e9)
    assert decision.status in ("accepted", "rejected", "duplicate")
    if decision.status == "rejected":
        assert decision.reason


@FUZZ
@given(data=st.data())
def test_fuzz_tensors_with_wrong_contents(data):
    """safetensors blobs with random names, shapes and dtypes."""
    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8,
              torch.bool]
    names = data.draw(st.lists(st.sampled_from(["predictor.weight", "predictor.bias", "x", ""]), min_size=1,
                               max_size=3, unique=True))
    tensors = {}
    for name in names:
        shape = tuple(data.draw(st.lists(st.integers(0, 12), max_size=3)))
        dtype = data.draw(st.sampled_from(dtypes))
        value = data.draw(st.sampled_from([0.0, 1.0, 1e30, float("nan"), float("inf"), -1e7]))
        tensors[name] = torch.full(shape, value).to(dtype)
    only_validation_errors(decode_tensors, save_any_tensors(tensors), SPEC)


@functools.lru_cache(maxsize=1)
def predictor_onnx() -> tuple[bytes, dict]:
    torch.manual_seed(0)
    model = build_model("cnn", (1, 28, 28), NUM_CLASSES)
    state = model.state_dict()
    spec = tensor_spec({k: v for k, v in state.items() if k.startswith("predictor.")})
    return export_predictor_onnx(model, state), spec


def test_state_from_onnx_reads_the_predictor():
    blob, spec = predictor_onnx()
    assert set(state_from_onnx(blob, spec)) == set(spec)


@FUZZ
@given(seed=st.integers(0, 2**32 - 1), raw=st.binary(max_size=200), pick=st.booleans())
def test_fuzz_state_from_onnx(seed, raw, pick):
    blob, spec = predictor_onnx()
    only_validation_errors(state_from_onnx, mutate(blob, random.Random(seed)) if pick else raw, spec)


def test_reassembler_limits_streams_per_sender_and_bytes():
    """One sender cannot hold more than its share of incomplete streams, nor all senders together more than
    max_bytes; single-chunk payloads never take space; completing a stream frees its bytes."""
    r = Reassembler(MAX, max_streams_per_sender=2, max_bytes=250)
    first = [split_chunks(b"a" * 100, f"s{i}", chunk_size=60) for i in range(3)]
    r.add("dev-a", decode_chunk(first[0][0], MAX))
    r.add("dev-a", decode_chunk(first[1][0], MAX))
    with pytest.raises(ValidationError) as err:
        r.add("dev-a", decode_chunk(first[2][0], MAX))
    assert err.value.reason == "too_many_streams"
    assert r.add("dev-b", decode_chunk(split_chunks(b"one", "single")[0], MAX)) == b"one"  # no state
    with pytest.raises(ValidationError) as err:  # 2 x 60 bytes held + a 200-byte stream > 250
        r.add("dev-b", decode_chunk(split_chunks(b"b" * 200, "big", chunk_size=60)[0], MAX))
    assert err.value.reason == "reassembly_full" and r.held_bytes == 120
    assert r.add("dev-a", decode_chunk(first[0][1], MAX)) == b"a" * 100 and r.held_bytes == 60
    r.add("dev-a", decode_chunk(first[2][0], MAX))  # room again for dev-a


# ---------------------------------------------------------------------------------------------------- several models
def het_config() -> JobConfig:
    return JobConfig(id="job1", dataset="mnist-subset", seed=7, chunk_size=4096,
                     algorithm=AlgorithmConfig.from_dict({"partial": True, "models": ["cnn", "mlp"]}))


def test_one_model_messages_are_encoded_as_before():
    """A one-model job's manifest, and a device's update and presence that name no model, carry no new keys:
    devices and servers of the previous release decode them (forbid_unknown_fields)."""
    assert "models" not in json.loads(manifest().to_json())
    assert "models" not in json.loads(manifest().to_json())["config"]["algorithm"]
    blob = tensors_blob()
    assert "model" not in json.loads(update_header(blob).to_json())
    assert "model" not in json.loads(Presence("online", 5).to_json())


def test_several_models_round_trip_and_are_checked():
    het = manifest(config=het_config(), models={"cnn": ref("model", 110_000, 1), "mlp": ref("mlp", 660_000, 3)})
    assert decode_manifest(het.to_json()) == het
    raw = json.loads(het.to_json())
    raw["models"] = {"cnn": raw["models"]["cnn"]}  # a model of the job missing
    with pytest.raises(ValidationError, match="not the job's"):
        decode_manifest(json.dumps(raw).encode())
    raw["models"] = {"cnn": raw["models"]["cnn"], "resnet": raw["models"]["cnn"]}  # not a shipped model
    with pytest.raises(ValidationError):
        decode_manifest(json.dumps(raw).encode())
    one = json.loads(manifest().to_json())
    one["models"] = {"cnn": one["model"]}
    assert decode_manifest(json.dumps(one).encode()).models == {"cnn": manifest().model}
    presence = Presence("online", 5, model="cnn-wide")
    assert decode_presence(presence.to_json()) == presence
    bad = json.loads(presence.to_json())
    bad["model"] = "x" * 40
    with pytest.raises(ValidationError):
        decode_presence(json.dumps(bad).encode())


def test_validator_refuses_a_model_the_job_does_not_allow():
    v = UpdateValidator("job1", NUM_CLASSES, SPEC, MAX, models=("cnn", "mlp"))
    blob = tensors_blob()
    for model, status, reason in [("mlp", "accepted", None), ("cnn", "accepted", None),
                                  ("cnn-wide", "rejected", "model_not_allowed")]:
        decision = v.check("dev-a", encode_update(update_header(blob, model=model), blob), window(), now=1e9)
        assert (decision.status, decision.reason) == (status, reason), model
    raw = json.loads(update_header(blob).to_json())
    raw["model"] = "resnet"  # not a model name at all: refused by the header's type
    envelope = raw_frame(UPDATE_MAGIC, raw, blob)
    assert v.check("dev-a", envelope, window(), now=1e9).status == "rejected"
    assert validator().check("dev-a", valid_update(), window(), now=1e9).status == "accepted"  # none named
