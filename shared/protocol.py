"""The MQTT wire protocol (docs/protocol.md): topics, message formats and their validated decoders.

Only MQTT 3.1.1 features are used: QoS 1, retained messages, last will, persistent sessions. Binary payloads are
*frames*: ``MAGIC (4 bytes) | header length (uint32, big endian) | header (UTF-8 JSON object) | body``.
No pickle anywhere; tensors are safetensors (shared.wire), models ONNX. Every decoder here raises only
`ValidationError` (with a short `reason` code) on bad input.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shared.wire import ValidationError, sha256_hex

PROTOCOL_VERSION = 1
ROOT = f"fedgen/v{PROTOCOL_VERSION}"
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNKS = 4096
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # job and client ids: safe in topics and paths

UPDATE_MAGIC = b"FGU1"  # a client's update: header JSON + safetensors body
CHUNK_MAGIC = b"FGC1"  # one chunk of a larger payload: chunk header + a slice of the payload


# ---------------------------------------------------------------------------------------------------- topics
class Topics:
    """Topic names of one job."""

    def __init__(self, job: str):
        check_id(job, "job")
        self.job = job
        self.base = f"{ROOT}/{job}"

    @property
    def round(self) -> str:  # retained, server -> all
        return f"{self.base}/round"

    @property
    def manifest(self) -> str:  # retained, server -> all
        return f"{self.base}/manifest"

    def artifact_chunk(self, sha256: str, index: int) -> str:  # retained, server -> all
        return f"{self.base}/artifacts/{sha256}/{index}"

    def artifact_chunks(self, sha256: str) -> str:
        return f"{self.base}/artifacts/{sha256}/+"

    def presence(self, client: str) -> str:  # retained, client -> server (last will: offline)
        return f"{self.base}/clients/{client}/presence"

    def update(self, client: str) -> str:  # client -> server
        return f"{self.base}/clients/{client}/update"

    def ack(self, client: str) -> str:  # server -> client
        return f"{self.base}/clients/{client}/ack"

    def assignment(self, client: str) -> str:  # retained, server -> client: its partition index (index=auto)
        return f"{self.base}/clients/{client}/assignment"

    @property
    def all_presence(self) -> str:
        return f"{self.base}/clients/+/presence"

    @property
    def all_updates(self) -> str:
        return f"{self.base}/clients/+/update"

    def client_of(self, topic: str) -> str | None:
        """The client id in a clients/<id>/... topic of this job, or None."""
        parts = topic.split("/")
        prefix = self.base.split("/")
        if len(parts) == len(prefix) + 3 and parts[: len(prefix)] == prefix and parts[len(prefix)] == "clients":
            return parts[len(prefix) + 1]
        return None


def check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):  # fullmatch: "$" would allow a final "\n"
        raise ValidationError("bad_id", f"{what} id {value!r} must match {ID_PATTERN.pattern}")
    return value


# ---------------------------------------------------------------------------------------------------- frames
def encode_frame(magic: bytes, header: Mapping[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    return magic + struct.pack(">I", len(head)) + head + body


def decode_frame(data: bytes, magic: bytes, max_bytes: int) -> tuple[dict, bytes]:
    """Split a frame into (header dict, body), refusing anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValidationError("bad_frame", "payload is not bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ValidationError("too_large", f"payload of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < 8 or data[:4] != magic:
        raise ValidationError("bad_frame", f"payload does not start with {magic!r}")
    (head_len,) = struct.unpack(">I", data[4:8])
    if head_len > MAX_HEADER_BYTES or 8 + head_len > len(data):
        raise ValidationError("truncated", f"header length {head_len} does not fit a {len(data)}-byte payload")
    return parse_json_object(data[8:8 + head_len], "header"), data[8 + head_len:]


def parse_json_object(raw: bytes, what: str, max_bytes: int = MAX_HEADER_BYTES) -> dict:
    if len(raw) > max_bytes:
        raise ValidationError("too_large", f"{what} of {len(raw)} bytes exceeds {max_bytes}")
    try:
        value = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # ValueError: UnicodeDecodeError, JSONDecodeError, int too long
        raise ValidationError("bad_json", f"{what} is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise ValidationError("bad_json", f"{what} must be a JSON object")
    return value


def _reject_constant(name: str) -> None:
    raise json.JSONDecodeError(f"{name} is not allowed", name, 0)


# ---------------------------------------------------------------------------------------------------- fields
def _field(obj: Mapping, name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in obj:
        raise ValidationError("missing_field", f"{what} lacks {name!r}")
    value = obj[name]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ValidationError("bad_field", f"{what}.{name} must be a number, not a boolean")
    if not isinstance(value, kind):
        raise ValidationError("bad_field", f"{what}.{name} has type {type(value).__name__}")
    return value


def _is_finite_number(value: object) -> bool:
    """A JSON number (not a boolean) that is finite as a float (huge integers are not: float() overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _int(obj: Mapping, name: str, what: str, low: int = 0, high: int = 2**53) -> int:
    value = _field(obj, name, int, what)
    if not low <= value <= high:
        raise ValidationError("bad_field", f"{what}.{name}={value} outside [{low}, {high}]")
    return value


def _sha(obj: Mapping, name: str, what: str) -> str:
    value = _field(obj, name, str, what)
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValidationError("bad_field", f"{what}.{name} is not a sha256 hex digest")
    return value


# ---------------------------------------------------------------------------------------------------- chunks
@dataclass(frozen=True)
class Chunk:
    stream: str  # identifies the payload (its idempotency key or sha256)
    index: int
    count: int
    size: int  # total payload size
    sha256: str  # of the whole payload
    data: bytes


def split_chunks(payload: bytes, stream: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Chunk frames carrying `payload`; one frame if it fits in one chunk."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    count = max(1, math.ceil(len(payload) / chunk_size))
    digest = sha256_hex(payload)
    return [encode_frame(CHUNK_MAGIC, {"stream": stream, "index": i, "count": count, "size": len(payload),
                                       "sha256": digest}, payload[i * chunk_size:(i + 1) * chunk_size])
            for i in range(count)]


def decode_chunk(data: bytes, max_payload: int, chunk_size_limit: int = 2 * 1024 * 1024) -> Chunk:
    header, body = decode_frame(data, CHUNK_MAGIC, min(chunk_size_limit, max_payload) + MAX_HEADER_BYTES + 8)
    stream = _field(header, "stream", str, "chunk")
    if not 1 <= len(stream) <= 128:
        raise ValidationError("bad_field", "chunk.stream must have 1..128 characters")
    count = _int(header, "count", "chunk", 1, MAX_CHUNKS)
    index = _int(header, "index", "chunk", 0, count - 1)
    if isinstance(header.get("size"), int) and not isinstance(header["size"], bool) and header["size"] > max_payload:
        raise ValidationError("too_large", f"chunked payload of {header['size']} bytes exceeds {max_payload}")
    size = _int(header, "size", "chunk", 0, max_payload)
    return Chunk(stream, index, count, size, _sha(header, "sha256", "chunk"), body)


class Reassembler:
    """Collects the chunks of payloads from several senders and returns each payload once it is complete
    and its hash checks. A repeated identical chunk (QoS 1 redelivery) is ignored; a repeated chunk with
    different bytes, inconsistent headers, a size or hash mismatch are refused. Streams that do not complete
    within `timeout` seconds are dropped by `expire()`, which reports them so they can be recorded."""

    def __init__(self, max_payload: int, timeout: float = 120.0, max_streams: int = 10_000):
        self.max_payload = max_payload
        self.timeout = timeout
        self.max_streams = max_streams
        self._streams: dict[tuple[str, str], dict] = {}

    def add(self, sender: str, chunk: Chunk, now: float | None = None) -> bytes | None:
        now = time.monotonic() if now is None else now
        key = (sender, chunk.stream)
        stream = self._streams.get(key)
        if stream is None:
            if len(self._streams) >= self.max_streams:
                raise ValidationError("too_many_streams", "too many incomplete chunk streams")
            stream = {"count": chunk.count, "size": chunk.size, "sha256": chunk.sha256, "parts": {}, "since": now}
            self._streams[key] = stream
        if (chunk.count, chunk.size, chunk.sha256) != (stream["count"], stream["size"], stream["sha256"]):
            del self._streams[key]
            raise ValidationError("chunk_mismatch", f"chunk {chunk.index} of {chunk.stream} disagrees with earlier "
                                                    "chunks about count, size or hash")
        previous = stream["parts"].get(chunk.index)
        if previous is not None and previous != chunk.data:
            del self._streams[key]
            raise ValidationError("chunk_conflict", f"chunk {chunk.index} of {chunk.stream} repeated with other bytes")
        stream["parts"][chunk.index] = chunk.data
        if len(stream["parts"]) < stream["count"]:
            if sum(len(p) for p in stream["parts"].values()) > stream["size"]:
                del self._streams[key]
                raise ValidationError("chunk_size", f"chunks of {chunk.stream} exceed the announced size")
            return None
        del self._streams[key]
        payload = b"".join(stream["parts"][i] for i in range(stream["count"]))
        if len(payload) != stream["size"]:
            raise ValidationError("chunk_size", f"{chunk.stream}: {len(payload)} bytes, announced {stream['size']}")
        if sha256_hex(payload) != stream["sha256"]:
            raise ValidationError("chunk_hash", f"{chunk.stream}: reassembled payload fails its sha256")
        return payload

    def expire(self, now: float | None = None) -> list[tuple[str, str, int, int]]:
        """Drop streams older than the timeout; returns (sender, stream, chunks received, chunks expected)."""
        now = time.monotonic() if now is None else now
        dropped = []
        for key, stream in list(self._streams.items()):
            if now - stream["since"] > self.timeout:
                dropped.append((*key, len(stream["parts"]), stream["count"]))
                del self._streams[key]
        return dropped


# ---------------------------------------------------------------------------------------------------- updates
@dataclass
class UpdateHeader:
    job: str
    round: int
    attempt: int
    client: str
    base_version: int  # the model version the client trained from
    num_samples: int
    label_counts: list[int]
    idempotency_key: str
    tensors_sha256: str
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


METRIC_NAMES = ("train_loss", "test_correct", "test_count", "test_loss", "train_seconds")


def encode_update(header: UpdateHeader, tensors_blob: bytes) -> bytes:
    if header.tensors_sha256 != sha256_hex(tensors_blob):
        raise ValueError("tensors_sha256 does not match the tensors")
    return encode_frame(UPDATE_MAGIC, header.to_dict(), tensors_blob)


def decode_update(data: bytes, num_classes: int, max_bytes: int) -> tuple[UpdateHeader, bytes]:
    """Parse an update envelope and check its header on its own terms (types, ranges, label counts that are
    non-negative, one per class and summing to the sample count, the tensors' hash). Whether the job, round,
    client and version are the right ones is the server's check, against its state."""
    raw, body = decode_frame(data, UPDATE_MAGIC, max_bytes)
    what = "update"
    counts = _field(raw, "label_counts", list, what)
    if len(counts) != num_classes:
        raise ValidationError("label_counts_length", f"{len(counts)} label counts for {num_classes} classes")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise ValidationError("label_counts_type", "label counts must be integers")
    if any(c < 0 for c in counts):
        raise ValidationError("label_counts_negative", "label counts must be >= 0")
    num_samples = _int(raw, "num_samples", what, 1, 10**9)
    if sum(counts) != num_samples:
        raise ValidationError("label_counts_sum", f"label counts sum to {sum(counts)}, num_samples is {num_samples}")
    metrics = _field(raw, "metrics", dict, what)
    clean_metrics = {}
    for name, value in metrics.items():
        if name not in METRIC_NAMES:
            raise ValidationError("bad_metric", f"unknown metric {name!r}")
        if not _is_finite_number(value) or value < 0:
            raise ValidationError("bad_metric", f"metric {name} must be a finite number >= 0")
        clean_metrics[name] = float(value)
    if clean_metrics.get("test_correct", 0) > clean_metrics.get("test_count", 0):
        raise ValidationError("bad_metric", "test_correct exceeds test_count")
    key = _field(raw, "idempotency_key", str, what)
    if not 8 <= len(key) <= 128:
        raise ValidationError("bad_field", "idempotency_key must have 8..128 characters")
    header = UpdateHeader(
        job=check_id(_field(raw, "job", str, what), "job"),
        round=_int(raw, "round", what),
        attempt=_int(raw, "attempt", what, 0, 10_000),
        client=check_id(_field(raw, "client", str, what), "client"),
        base_version=_int(raw, "base_version", what, 0, 2**31 - 1),  # stored in an INTEGER column
        num_samples=num_samples,
        label_counts=[int(c) for c in counts],
        idempotency_key=key,
        tensors_sha256=_sha(raw, "tensors_sha256", what),
        metrics=clean_metrics,
    )
    extra = set(raw) - set(header.to_dict())
    if extra:
        raise ValidationError("unexpected_field", f"unknown header fields {sorted(extra)}")
    if sha256_hex(body) != header.tensors_sha256:
        raise ValidationError("tensors_hash", "tensors do not match tensors_sha256")
    return header, body


# ---------------------------------------------------------------------------------------------------- JSON messages
@dataclass
class ArtifactRef:
    sha256: str
    size: int
    chunks: int


@dataclass
class Manifest:
    """Retained on <job>/manifest: everything a (late-joining) client needs to train the current version."""

    job: str
    version: int
    round: int  # the next round to be trained on this version
    state_sha256: str  # sha256 of the canonical safetensors encoding of the shared state
    model: ArtifactRef  # the whole classifier as ONNX (partial mode: the initial theta^f, the current theta^p)
    predictor: ArtifactRef  # theta^p alone as ONNX (z -> logits)
    num_classes: int
    image_shape: list[int]
    seed: int
    algorithm: dict  # AlgorithmConfig.to_dict()
    generator: ArtifactRef | None = None
    delta: ArtifactRef | None = None  # safetensors, new - old, keyed by parameter name
    delta_base_version: int | None = None
    label_prior: list[float] | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    protocol: int = PROTOCOL_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()


def _artifact(obj: Mapping, name: str, optional: bool = False) -> ArtifactRef | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, dict):
        raise ValidationError("missing_field", f"manifest lacks artifact {name!r}")
    return ArtifactRef(_sha(value, "sha256", name), _int(value, "size", name, 0, 2**40),
                       _int(value, "chunks", name, 1, MAX_CHUNKS))


def decode_manifest(data: bytes) -> Manifest:
    raw = parse_json_object(data, "manifest", max_bytes=1024 * 1024)
    protocol = raw.get("protocol")
    if type(protocol) is not int or protocol != PROTOCOL_VERSION:  # not True, not 1.0
        raise ValidationError("protocol_version", f"manifest protocol {raw.get('protocol')!r}, "
                                                  f"this client speaks {PROTOCOL_VERSION}")
    shape = _field(raw, "image_shape", list, "manifest")
    if len(shape) != 3 or not all(type(s) is int and 0 < s <= 4096 for s in shape):
        raise ValidationError("bad_field", "manifest.image_shape must be 3 positive integers")
    prior = raw.get("label_prior")
    num_classes = _int(raw, "num_classes", "manifest", 2, 100_000)
    if prior is not None and (not isinstance(prior, list) or len(prior) != num_classes or not all(
            _is_finite_number(p) and p >= 0 for p in prior)):
        raise ValidationError("bad_field", "manifest.label_prior must be num_classes finite numbers >= 0")
    base = raw.get("delta_base_version")
    return Manifest(
        job=check_id(_field(raw, "job", str, "manifest"), "job"),
        version=_int(raw, "version", "manifest"),
        round=_int(raw, "round", "manifest"),
        state_sha256=_sha(raw, "state_sha256", "manifest"),
        model=_artifact(raw, "model"),
        predictor=_artifact(raw, "predictor"),
        num_classes=num_classes,
        image_shape=list(shape),
        seed=_int(raw, "seed", "manifest", 0, 2**63),
        algorithm=_field(raw, "algorithm", dict, "manifest"),
        generator=_artifact(raw, "generator", optional=True),
        delta=_artifact(raw, "delta", optional=True),
        delta_base_version=base if isinstance(base, int) and not isinstance(base, bool) else None,
        label_prior=[float(p) for p in prior] if prior is not None else None,
        chunk_size=_int(raw, "chunk_size", "manifest", 1024, 16 * 1024 * 1024),
    )


@dataclass
class RoundAnnouncement:
    """Retained on <job>/round: the open round, who is selected and until when updates are accepted."""

    job: str
    round: int
    attempt: int
    version: int  # the model version to train from
    selected: list[str]
    deadline: float  # unix time
    status: str = "open"  # open | closed | finished (the job is done)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()


def decode_round(data: bytes) -> RoundAnnouncement:
    raw = parse_json_object(data, "round")
    selected = _field(raw, "selected", list, "round")
    status = _field(raw, "status", str, "round")
    if status not in ("open", "closed", "finished"):
        raise ValidationError("bad_field", f"round.status {status!r}")
    deadline = _field(raw, "deadline", (int, float), "round")
    if not _is_finite_number(deadline):
        raise ValidationError("bad_field", "round.deadline must be finite")
    return RoundAnnouncement(
        job=check_id(_field(raw, "job", str, "round"), "job"),
        round=_int(raw, "round", "round"),
        attempt=_int(raw, "attempt", "round", 0, 10_000),
        version=_int(raw, "version", "round"),
        selected=[check_id(c, "client") for c in selected],
        deadline=float(deadline),
        status=status,
    )


@dataclass
class Ack:
    """Sent on <job>/clients/<id>/ack for each update: accepted, duplicate (already counted) or rejected."""

    idempotency_key: str
    status: str  # accepted | duplicate | rejected
    round: int | None = None
    reason: str | None = None
    message: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()


def decode_ack(data: bytes) -> Ack:
    raw = parse_json_object(data, "ack")
    status = _field(raw, "status", str, "ack")
    if status not in ("accepted", "duplicate", "rejected"):
        raise ValidationError("bad_field", f"ack.status {status!r}")
    rnd = raw.get("round")
    return Ack(_field(raw, "idempotency_key", str, "ack"), status,
               rnd if isinstance(rnd, int) and not isinstance(rnd, bool) else None,
               raw.get("reason") if isinstance(raw.get("reason"), str) else None,
               raw.get("message") if isinstance(raw.get("message"), str) else None)


@dataclass
class Presence:
    """Retained on <job>/clients/<id>/presence: 'online' with device facts, or the last will 'offline'."""

    status: str  # online | offline
    num_samples: int | None = None
    version: int | None = None  # model version the device holds
    device: dict = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()


def decode_presence(data: bytes) -> Presence:
    raw = parse_json_object(data, "presence", max_bytes=16 * 1024)
    status = _field(raw, "status", str, "presence")
    if status not in ("online", "offline"):
        raise ValidationError("bad_field", f"presence.status {status!r}")
    device = raw.get("device") or {}
    if not isinstance(device, dict):
        raise ValidationError("bad_field", "presence.device must be an object")
    n, v = raw.get("num_samples"), raw.get("version")
    return Presence(status, n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None,
                    v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None,
                    {str(k)[:64]: _short_text(val, 256) for k, val in list(device.items())[:32]})


def _short_text(value: object, limit: int) -> str:
    """A device-info value as text, whatever JSON it was (str() of deeply nested lists may recurse too far)."""
    try:
        return str(value)[:limit]
    except (RecursionError, ValueError):
        return "<unreadable>"


@dataclass
class Assignment:
    """Retained on <job>/clients/<id>/assignment: the partition index the server gave a device that asked
    for one (``--partition ...:index=auto``), so that scaled replicas take distinct partitions."""

    spec: str
    index: int

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()


def decode_assignment(data: bytes) -> Assignment:
    raw = parse_json_object(data, "assignment")
    return Assignment(_field(raw, "spec", str, "assignment"), _int(raw, "index", "assignment", 0, 1_000_000))


def label_counts_of(labels: np.ndarray, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(labels, minlength=num_classes)]
