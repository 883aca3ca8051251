"""Publishing model versions: store a version's blobs and row, publish its artifacts (retained, chunked) and
manifest, clear the previous version's artifacts, and announce rounds."""

from __future__ import annotations

import logging
import threading

import msgspec

from server_api import metrics
from server_api.db.store import ArtifactStore
from server_api.rounds.context import Link, publish_confirmed
from server_api.rounds.runtime import JobRuntime, VersionArtifacts
from server_api.rounds.state import JobStore, RoundResult, VersionRecord
from shared.algorithm.schedule import selection_rank
from shared.protocol.frames import split_chunks
from shared.protocol.job import JobConfig
from shared.protocol.messages import (
    MAX_LISTED_SELECTION,
    ArtifactRef,
    Manifest,
    RoundAnnouncement,
    RoundStatus,
)
from shared.protocol.topics import Topics

log = logging.getLogger("fedgen.server")


class VersionPublisher:
    """Everything a job publishes: versions (artifacts + manifest) and round announcements."""

    def __init__(self, config: JobConfig, state: JobStore, store: ArtifactStore, link: Link,
                 stopping: threading.Event):
        self.config = config
        self.state = state
        self.store = store
        self.link = link
        self.stopping = stopping
        self.topics = Topics(config.id)
        self._lasting: dict[str, ArtifactRef] = {}

    def store_version(self, runtime: JobRuntime, artifacts: VersionArtifacts, round_index: int | None,
                      closes: tuple[int, RoundResult] | None = None) -> VersionRecord:
        """Write the blobs, then (one transaction) the version row and, with `closes`, the round's result."""
        blobs = {"model_onnx": artifacts.model_onnx, "predictor_onnx": artifacts.predictor_onnx,
                 "server_state": artifacts.server_state, "generator_onnx": artifacts.generator_onnx,
                 "delta": artifacts.delta}
        shas = {kind: self.store.put(blob) for kind, blob in blobs.items() if blob is not None}
        version = runtime.version
        record = VersionRecord(version, round_index, artifacts.state_sha256, shas["model_onnx"],
                               shas["predictor_onnx"], shas["server_state"], shas.get("generator_onnx"),
                               shas.get("delta"), version - 1 if "delta" in shas else None)
        self.state.add_version(record, {kind: len(blobs[kind]) for kind in shas}, closes)
        return record

    def publish_version(self, record: VersionRecord, runtime: JobRuntime) -> None:
        """Publish a version's artifacts, then its manifest; clear the previous ones. Idempotent: a restarted
        server publishes its current version again."""
        refs = {kind: self._publish_artifact(sha) if sha else None for kind, sha in (
            ("model", record.model_onnx), ("predictor", record.predictor_onnx),
            ("generator", record.generator_onnx), ("delta", record.delta))}
        models: dict[str, ArtifactRef] | msgspec.UnsetType = msgspec.UNSET
        if len(runtime.cfg.allowed_models) > 1:
            models = {runtime.cfg.model: refs["model"]}
            models.update({name: self._publish_lasting(self.store.put(blob))
                           for name, blob in runtime.other_models_onnx().items()})
        manifest = Manifest(
            job=self.config.id, version=record.version,
            round=record.round_index + 1 if record.round_index is not None else 0,
            state_sha256=record.state_sha256, model=refs["model"], predictor=refs["predictor"],
            num_classes=runtime.info.num_classes, image_shape=tuple(runtime.info.image_shape), config=self.config,
            generator=refs["generator"], models=models, delta=refs["delta"],
            delta_base_version=record.delta_base_version,
            label_prior=[float(p) for p in runtime.global_state.prior.probabilities()])
        self._publish(self.topics.manifest, manifest.to_json())
        self._clear_version(record.version - 1, keep={r.sha256 for r in refs.values() if r})

    def announce(self, index: int, attempt: int, version: int, selected: list[str], deadline: float,
                 status: RoundStatus = "open", reason: str | None = None) -> None:
        """The retained round announcement: the open round, or the end of the job."""
        self._publish(self.topics.round, round_announcement(self.config, index, attempt, version, selected, deadline,
                                                            status, reason).to_json())

    def _publish_artifact(self, sha: str) -> ArtifactRef:
        blob = self.store.get(sha)
        chunks = split_chunks(blob, stream=sha, chunk_size=self.config.chunk_size)
        for i, chunk in enumerate(chunks):
            self._publish(self.topics.artifact_chunk(sha, i), chunk)
        metrics.BYTES_OUT.labels(self.config.id).inc(len(blob))
        return ArtifactRef(sha256=sha, size=len(blob), chunks=len(chunks))

    def _publish_lasting(self, sha: str) -> ArtifactRef:
        """An artifact that stays the same for the whole job (another model's initial classifier): published
        (retained) once per server process."""
        if sha not in self._lasting:
            self._lasting[sha] = self._publish_artifact(sha)
        return self._lasting[sha]

    def _publish(self, topic: str, payload: bytes) -> None:
        publish_confirmed(self.link, topic, payload, self.stopping, f"job {self.config.id}")

    def _clear_version(self, version: int, keep: set[str]) -> None:
        if version < 0:
            return
        record = self.state.version(version)
        if record is None:
            return
        for sha in (record.model_onnx, record.predictor_onnx, record.generator_onnx, record.delta):
            if sha and sha not in keep:
                for i in range(max(1, -(-self.store.size(sha) // self.config.chunk_size))):
                    self.link.clear_retained(self.topics.artifact_chunk(sha, i))


def round_announcement(config: JobConfig, index: int, attempt: int, version: int, selected: list[str],
                       deadline: float, status: RoundStatus = "open", reason: str | None = None) -> RoundAnnouncement:
    """The announcement of a round attempt: its selection listed, or, past MAX_LISTED_SELECTION clients (chosen
    by `select_by_rank`), as the highest selection rank among them, so that its size does not grow."""
    listed, seed, threshold = sorted(selected), None, None
    if len(selected) > MAX_LISTED_SELECTION:
        seed = config.seed
        threshold = max(selection_rank(seed, index, attempt, c) for c in selected)
        listed = []
    return RoundAnnouncement(job=config.id, round=index, attempt=attempt, version=version, selected=listed,
                             deadline=deadline, status=status, reason=reason[:500] if reason else None,
                             selected_count=len(selected), selection_seed=seed, selection_threshold=threshold)
