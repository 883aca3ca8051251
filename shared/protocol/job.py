"""`JobConfig`: the one description of a job, from the REST body to the database to the manifest.

Parsed once at each boundary: `POST /jobs` decodes the body into it; the server stores `stored_config()` in
``jobs.config`` (every default filled in, so a job's behaviour does not change when a default changes later)
and reads it back with `from_stored`; the manifest carries it to the devices, which decode it as part of the
manifest, ``algorithm`` straight into `shared.algorithm.config.AlgorithmConfig`. docs/api.md lists the ranges.
"""

from __future__ import annotations

import math
import secrets
from typing import Annotated, Any

import msgspec

from shared.algorithm.config import AggregationName, AlgorithmConfig
from shared.data.datasets import DatasetName
from shared.data.partition import PartitionSpec
from shared.protocol.codec import Seed, convert, to_builtins
from shared.protocol.errors import ValidationError
from shared.protocol.frames import DEFAULT_CHUNK_SIZE
from shared.protocol.ids import Id

MAX_CLIENTS = 100_000
MAX_SAMPLES = 10**9  # samples one device may report at all


def generate_job_id() -> str:
    """A fresh id ``job-<8 hex digits>``."""
    return f"job-{secrets.token_hex(4)}"


ClientCount = Annotated[int, msgspec.Meta(ge=1, le=MAX_CLIENTS)]


class JobConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything needed to run a federated training job: the body of ``POST /jobs``."""

    id: Id = msgspec.field(default_factory=generate_job_id)
    dataset: DatasetName
    rounds: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 20
    active: ClientCount = 10  # clients selected per round
    min_clients: ClientCount | None = None  # accepted updates a round needs; default ceil(active / 2)
    min_online: ClientCount | None = None  # clients online before round 0 starts; default = active
    round_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 120
    max_round_attempts: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10  # failed attempts of one round: job fails
    seed: Seed = 0
    algorithm: AlgorithmConfig = msgspec.field(default_factory=AlgorithmConfig)
    aggregation: AggregationName = "mean"
    trim_ratio: Annotated[float, msgspec.Meta(ge=0, lt=0.5)] = 0.1
    chunk_size: Annotated[int, msgspec.Meta(ge=1024, le=1_048_576)] = DEFAULT_CHUNK_SIZE
    server_eval: PartitionSpec | None = None  # evaluate each round's model on this partition's test splits
    # Bounds on what a device says about itself (docs/reliability.md, "Hostile devices"):
    max_client_samples: Annotated[int, msgspec.Meta(ge=1, le=MAX_SAMPLES)] = 1_000_000  # per update
    max_client_weight: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None  # share of one update in the mean

    def __post_init__(self) -> None:
        if self.min_clients is None:
            msgspec.structs.force_setattr(self, "min_clients", math.ceil(self.active / 2))
        if self.min_online is None:
            msgspec.structs.force_setattr(self, "min_online", self.active)
        if self.server_eval is not None:  # stored complete: the job's dataset and seed where it leaves them open
            msgspec.structs.force_setattr(self, "server_eval", self.server_eval.resolve(self.dataset, self.seed))

    def check(self) -> None:
        if self.min_clients > self.active:
            raise ValidationError("bad_field", f"min_clients ({self.min_clients}) must be <= active ({self.active})")

    def stored_config(self) -> dict[str, Any]:
        """What goes into ``jobs.config``: every field but ``id`` (the primary key), defaults filled in."""
        data = to_builtins(self)
        data.pop("id")
        return data

    @classmethod
    def from_stored(cls, job_id: str, config: dict[str, Any]) -> JobConfig:
        """A job's config from its row, checked like a request body (ValidationError if the row is bad)."""
        return convert(cls, {**config, "id": job_id}, f"stored config of job {job_id}")
