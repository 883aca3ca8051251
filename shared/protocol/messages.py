"""The messages of the MQTT protocol (docs/protocol.md), each declared once with its field types and bounds,
and their encoders and decoders. Binary payloads are frames (`shared.protocol.frames`); JSON messages are
decoded by `shared.protocol.codec`, which raises only `ValidationError` on bad input. Bounds fit the database
columns the server stores them in (INTEGER: < 2^31).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared.algorithm.config import MODELS, ModelName
from shared.algorithm.schedule import selection_rank
from shared.data.datasets import dataset_info
from shared.data.partition import PartitionSpec
from shared.fsutil import sha256_hex
from shared.protocol.codec import (
    INT32_MAX,
    INT64_MAX,
    Count,
    Message,
    Seed,
    Sha256,
    UnixTime,
    decode_json,
    encode_json,
    text,
)
from shared.protocol.errors import ValidationError
from shared.protocol.frames import MAX_CHUNKS, MAX_HEADER_BYTES, UPDATE_MAGIC, encode_frame, split_frame
from shared.protocol.ids import Id
from shared.protocol.job import MAX_CLIENTS, MAX_SAMPLES, JobConfig
from shared.protocol.topics import PROTOCOL_VERSION

MAX_CLASSES = 1000
MAX_ATTEMPTS = 10_000
MAX_JSON_MESSAGE_BYTES = 1024 * 1024  # manifest, round announcement (the device's limit)
MAX_SMALL_MESSAGE_BYTES = 16 * 1024  # ack, presence, assignment
# a round announcement lists at most this many selected ids; a bigger round announces a selection threshold
MAX_LISTED_SELECTION = 1000

IdempotencyKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{8,128}\Z")]
AckKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,160}\Z")]
ReasonCode = Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9_]{0,63}\Z")]
Attempt = Annotated[int, msgspec.Meta(ge=0, le=MAX_ATTEMPTS)]
MetricName = Literal["train_loss", "test_correct", "test_count", "test_loss", "train_seconds"]
MetricValue = Annotated[float, msgspec.Meta(ge=0, le=1e12)]
METRIC_NAMES: tuple[str, ...] = MetricName.__args__  # type: ignore[attr-defined]

AckStatus = Literal["accepted", "duplicate", "rejected"]
PresenceStatus = Literal["online", "offline"]
# open: updates accepted until the deadline; closed: between rounds; finished / failed / cancelled: the job ended
RoundStatus = Literal["open", "closed", "finished", "failed", "cancelled"]
JOB_ENDED: frozenset[str] = frozenset({"finished", "failed", "cancelled"})


class _Json(Message):
    """A JSON message: `to_json()` encodes it, `to_dict()` gives plain data."""

    def to_json(self) -> bytes:
        return encode_json(self)

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)


# ---------------------------------------------------------------------------------------------------- updates
class UpdateHeader(_Json, kw_only=True):
    """The header of a client's update frame (``FGU1``); the body is the safetensors of its shared weights."""

    field_reasons = {"job": "bad_id", "client": "bad_id", "label_counts": "label_counts_type",
                     "metrics": "bad_metric"}

    job: Id
    round: Count
    attempt: Attempt
    client: Id
    base_version: Count  # the model version the client trained from
    num_samples: Annotated[int, msgspec.Meta(ge=1, le=MAX_SAMPLES)]
    label_counts: list[int]  # >= 0 (check()); one per class, summing to num_samples (decode_update)
    idempotency_key: IdempotencyKey
    tensors_sha256: Sha256
    metrics: Annotated[dict[MetricName, MetricValue], msgspec.Meta(max_length=len(METRIC_NAMES))]
    model: ModelName | msgspec.UnsetType = msgspec.UNSET  # the model trained (unset: the job's default)

    def check(self) -> None:
        counts = self.label_counts
        if len(counts) > MAX_CLASSES:
            raise ValidationError("label_counts_length", f"{len(counts)} label counts exceed {MAX_CLASSES}")
        if any(c < 0 for c in counts):
            raise ValidationError("label_counts_negative", "label counts must be >= 0")
        if self.metrics.get("test_correct", 0) > self.metrics.get("test_count", 0):
            raise ValidationError("bad_metric", "test_correct exceeds test_count")


def encode_update(header: UpdateHeader, tensors_blob: bytes) -> bytes:
    if header.tensors_sha256 != sha256_hex(tensors_blob):
        raise ValueError("tensors_sha256 does not match the tensors")
    return encode_frame(UPDATE_MAGIC, header, tensors_blob)


def decode_update(data: bytes, num_classes: int, max_bytes: int) -> tuple[UpdateHeader, bytes]:
    """Parse an update envelope and check its header on its own terms (types, ranges, label counts that are
    non-negative, one per class and summing to the sample count, the tensors' hash). Whether the job, round,
    client and version are the right ones is the server's check, against its state."""
    head, body = split_frame(data, UPDATE_MAGIC, max_bytes)
    header = decode_json(UpdateHeader, head, "update header", MAX_HEADER_BYTES)
    counts = header.label_counts
    if len(counts) != num_classes:
        raise ValidationError("label_counts_length", f"{len(counts)} label counts for {num_classes} classes")
    if sum(counts) != header.num_samples:
        raise ValidationError("label_counts_sum", f"label counts sum to {sum(counts)}, num_samples is "
                                                  f"{header.num_samples}")
    if sha256_hex(body) != header.tensors_sha256:
        raise ValidationError("tensors_hash", "tensors do not match tensors_sha256")
    return header, body


# ---------------------------------------------------------------------------------------------------- server -> all
class ArtifactRef(_Json):
    sha256: Sha256
    size: Annotated[int, msgspec.Meta(ge=0, le=2**40)]
    chunks: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNKS)]


ImageSide = Annotated[int, msgspec.Meta(ge=1, le=4096)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]


class Manifest(_Json, kw_only=True):
    """Retained on <job>/manifest: everything a (late-joining) client needs to train the current version."""

    field_reasons = {"job": "bad_id"}

    job: Id
    version: Count
    round: Count  # the next round to be trained on this version
    state_sha256: Sha256  # sha256 of the canonical safetensors encoding of the shared state
    model: ArtifactRef  # the whole classifier as ONNX (partial mode: the initial theta^f, the current theta^p)
    predictor: ArtifactRef  # theta^p alone as ONNX (z -> logits)
    num_classes: Annotated[int, msgspec.Meta(ge=2, le=MAX_CLASSES)]
    image_shape: tuple[ImageSide, ImageSide, ImageSide]
    config: JobConfig  # the job, as created; config.algorithm is what the device trains with
    generator: ArtifactRef | None = None
    # a job with several models: each model's classifier as ONNX with its initial theta^f (where a new device
    # of that model takes its theta^f; the current theta^p is `predictor`); unset for a one-model job
    models: Annotated[dict[ModelName, ArtifactRef], msgspec.Meta(max_length=len(MODELS))] | msgspec.UnsetType \
        = msgspec.UNSET
    delta: ArtifactRef | None = None  # safetensors, new - old, keyed by parameter name
    delta_base_version: Count | None = None
    label_prior: Annotated[list[Probability], msgspec.Meta(max_length=MAX_CLASSES)] | None = None
    protocol: Literal[1] = PROTOCOL_VERSION

    def check(self) -> None:
        if self.config.id != self.job:
            raise ValidationError("bad_field", f"manifest of job {self.job} carries the config of {self.config.id}")
        info = dataset_info(self.config.dataset)
        if (self.num_classes, tuple(self.image_shape)) != (info.num_classes, tuple(info.image_shape)):
            raise ValidationError("bad_field", f"{self.num_classes} classes of {tuple(self.image_shape)} images do "
                                               f"not match dataset {info.name}'s {info.num_classes} of "
                                               f"{tuple(info.image_shape)}")
        if self.label_prior is not None and len(self.label_prior) != self.num_classes:
            raise ValidationError("bad_field", f"label_prior has {len(self.label_prior)} entries for "
                                               f"{self.num_classes} classes")
        if (self.delta is None) != (self.delta_base_version is None):
            raise ValidationError("bad_field", "delta and delta_base_version come together")
        if self.models is not msgspec.UNSET and set(self.models) != set(self.config.algorithm.allowed_models):
            raise ValidationError("bad_field", f"models {sorted(self.models)} are not the job's "
                                               f"{sorted(self.config.algorithm.allowed_models)}")


def decode_manifest(data: bytes) -> Manifest:
    return decode_json(Manifest, data, "manifest", MAX_JSON_MESSAGE_BYTES)


class RoundAnnouncement(_Json, kw_only=True):
    """Retained on <job>/round: the open round, who is selected and until when updates are accepted; or the
    state of a job that ended (``status`` finished, failed or cancelled).

    Who is selected: the ids in ``selected`` (rounds of up to MAX_LISTED_SELECTION clients), or, for a bigger
    round, every client whose ``selection_rank(selection_seed, round, attempt, id)`` is at most
    ``selection_threshold`` (``selected`` then empty): the announcement stays a few hundred bytes for a round
    of 100,000 devices. `selects` answers either way."""

    field_reasons = {"job": "bad_id", "selected": "bad_id"}

    job: Id
    round: Count
    attempt: Attempt
    version: Count  # the model version to train from
    selected: Annotated[list[Id], msgspec.Meta(max_length=MAX_LISTED_SELECTION)]
    deadline: UnixTime
    status: RoundStatus = "open"
    reason: text(500) | None = None  # why the job failed or was cancelled
    selected_count: Annotated[int, msgspec.Meta(ge=0, le=MAX_CLIENTS)] | None = None
    selection_seed: Seed | None = None
    selection_threshold: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] | None = None

    def __post_init__(self) -> None:
        if (self.selection_seed is None) != (self.selection_threshold is None):
            raise ValueError("selection_seed and selection_threshold come together")

    @property
    def job_ended(self) -> bool:
        return self.status in JOB_ENDED

    def selects(self, client: str) -> bool:
        """Whether `client` is selected in this round attempt."""
        if client in self.selected:
            return True
        if self.selection_threshold is None or self.selection_seed is None:
            return False
        return selection_rank(self.selection_seed, self.round, self.attempt, client) <= self.selection_threshold


def decode_round(data: bytes) -> RoundAnnouncement:
    return decode_json(RoundAnnouncement, data, "round", MAX_JSON_MESSAGE_BYTES)


# ---------------------------------------------------------------------------------------------------- per client
class Ack(_Json):
    """Sent on <job>/clients/<id>/ack for each update: accepted, duplicate (already counted) or rejected."""

    idempotency_key: AckKey
    status: AckStatus
    round: Count | None = None
    reason: ReasonCode | None = None
    message: text(500) | None = None


def decode_ack(data: bytes) -> Ack:
    return decode_json(Ack, data, "ack", MAX_SMALL_MESSAGE_BYTES)


DeviceInfo = Annotated[dict[text(64), text(256)], msgspec.Meta(max_length=32)]


class Presence(_Json):
    """Retained on <job>/clients/<id>/presence: 'online' with device facts, or the last will 'offline'.
    A device that asks the server for a partition index (``--partition ...:index=auto``) says which
    partition in `partition_request`."""

    status: PresenceStatus
    num_samples: Annotated[int, msgspec.Meta(ge=0, le=MAX_SAMPLES)] | None = None
    version: Count | None = None  # model version the device holds
    device: DeviceInfo = msgspec.field(default_factory=dict)
    partition_request: PartitionSpec | None = None
    model: ModelName | msgspec.UnsetType = msgspec.UNSET  # the model it runs, once it knows the job's


def decode_presence(data: bytes) -> Presence:
    return decode_json(Presence, data, "presence", MAX_SMALL_MESSAGE_BYTES)


class Assignment(_Json):
    """Retained on <job>/clients/<id>/assignment: the partition index the server gave a device that asked for
    one, so that scaled replicas take distinct partitions; index None with a reason when none is free."""

    spec: PartitionSpec
    index: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] | None
    reason: text(500) | None = None


def decode_assignment(data: bytes) -> Assignment:
    return decode_json(Assignment, data, "assignment", MAX_SMALL_MESSAGE_BYTES)
