"""One job's round lifecycle on the server, in its own thread.

Every step persists its result before the next one starts, so a server killed at any point resumes from the
database: the latest model version (its server-state blob restores the algorithm state bit for bit), the open
round (its selection and deadline) and the updates already accepted in it (their tensors are in the store).
An update is acknowledged only after it is stored, so an acknowledged update is never lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server_api.db import (
    Artifact,
    Client,
    ClientStatus,
    ClientUpdate,
    Job,
    JobStatus,
    ModelVersion,
    Round,
    RoundStatus,
    UpdateStatus,
    in_transaction,
    utcnow,
)
from server_api.ingest import Decision, RoundWindow, UpdateValidator, garbage_key
from server_api.job_runtime import JobRuntime, JobSettings, VersionArtifacts
from server_api.store import ArtifactStore
from shared.aggregate import select_clients
from shared.mqtt import Message, MqttLink
from shared.protocol import (
    Ack,
    ArtifactRef,
    Assignment,
    Manifest,
    Presence,
    RoundAnnouncement,
    Topics,
    decode_presence,
    split_chunks,
)
from shared.wire import ValidationError, decode_tensors

log = logging.getLogger("fedgen.server")
DB_ATTEMPTS = 30  # ~ a few minutes of backoff: a PostgreSQL restart must not lose a round


@dataclass
class ServerContext:
    session_factory: sessionmaker[Session]
    store: ArtifactStore
    link: MqttLink
    max_upload_bytes: int = 16 * 1024 * 1024
    db_healthy: threading.Event = field(default_factory=threading.Event)

    def tx(self, fn):  # noqa: ANN001, ANN201
        """Run fn(session) in a committed transaction, retrying while the database is unavailable."""
        try:
            result = in_transaction(self.session_factory, fn, attempts=DB_ATTEMPTS, delay=0.2)
        except Exception:
            self.db_healthy.clear()
            raise
        self.db_healthy.set()
        return result


class Stopping(Exception):
    """The worker was asked to stop while it waited for something (the broker)."""


@dataclass
class OpenRound:
    row_id: int
    window: RoundWindow
    accumulator: object
    bytes_up: int = 0
    test_correct: float = 0.0
    test_count: float = 0.0
    test_loss: float = 0.0


class JobWorker(threading.Thread):
    """Runs rounds for one job until it has run `rounds` rounds (or the server stops)."""

    def __init__(self, job_id: str, ctx: ServerContext):
        super().__init__(name=f"job-{job_id}", daemon=True)
        self.job_id = job_id
        self.ctx = ctx
        self.topics = Topics(job_id)
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.stopping = threading.Event()
        self.finished = threading.Event()  # the job is done; the thread only answers late messages
        self.online: dict[str, Presence] = {}
        self.settings: JobSettings | None = None
        self.runtime: JobRuntime | None = None
        self.validator: UpdateValidator | None = None
        self.open: OpenRound | None = None

    # ------------------------------------------------------------------------------------------ thread
    def run(self) -> None:
        try:
            self._run()
        except Stopping:  # the server stops while the broker is away: the next start publishes again
            log.info("job %s: stopped while waiting for the broker", self.job_id)
        except Exception as exc:  # record why the job stopped; the server keeps serving other jobs
            log.exception("job %s failed", self.job_id)
            self._set_job(status=JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self.stopping.set()

    def _run(self) -> None:
        job = self.ctx.tx(lambda s: s.get(Job, self.job_id))
        if job.status in (JobStatus.FINISHED, JobStatus.FAILED):
            return
        self.settings = JobSettings.from_config(job.config)
        self.runtime = self._restore_runtime()
        self.validator = UpdateValidator(self.job_id, self.runtime.info.num_classes, self.runtime.upload_spec(),
                                         self.ctx.max_upload_bytes)
        self._load_clients()
        self._publish_version(self.runtime.version)
        self._set_job(status=JobStatus.RUNNING)
        log.info("job %s running from version %d, round %d", self.job_id, self.runtime.version, job.current_round)
        while not self.stopping.is_set():
            current = self.ctx.tx(lambda s: s.get(Job, self.job_id).current_round)
            if current >= self.settings.rounds:
                self._finish()
                self._answer_until_stopped()
                return
            self.open = self._resume_round(current) or self._open_round(current)
            if self.open is None:
                continue
            self._collect()
            if not self.stopping.is_set():
                self._close_round()

    def _answer_until_stopped(self) -> None:
        """After the last round: a client whose ack was lost (broker restart, server crash between storing
        and acking) keeps re-sending its update; keep answering it (`duplicate` for an update already
        counted, `rejected` otherwise) and recording presence, so that it can stop, until the server stops."""
        self.finished.set()
        while not self.stopping.is_set():
            self._wait_for_messages(0.5)

    # ------------------------------------------------------------------------------------------ versions
    def _restore_runtime(self) -> JobRuntime:
        runtime = JobRuntime(self.settings)
        latest = self.ctx.tx(lambda s: s.scalars(select(ModelVersion).where(ModelVersion.job_id == self.job_id)
                                                 .order_by(ModelVersion.version.desc()).limit(1)).first())
        if latest is None:
            artifacts = runtime.build_artifacts(delta=None)
            self._store_version(runtime, artifacts, round_index=None)
        else:
            runtime.restore(self.ctx.store.get(latest.server_state_sha256))
            if runtime.version != latest.version:
                raise RuntimeError(f"server state of version {latest.version} says {runtime.version}")
        return runtime

    def _store_version(self, runtime: JobRuntime, art: VersionArtifacts, round_index: int | None,
                       round_update=None) -> None:  # noqa: ANN001
        """Write the blobs, then (one transaction) the version row and whatever closes the round."""
        blobs = {"model_onnx": art.model_onnx, "predictor_onnx": art.predictor_onnx,
                 "server_state": art.server_state, "generator_onnx": art.generator_onnx, "delta": art.delta}
        shas = {kind: self.ctx.store.put(blob) for kind, blob in blobs.items() if blob is not None}
        version = runtime.version

        def write(session: Session) -> None:
            for kind, sha in shas.items():
                if session.get(Artifact, sha) is None:
                    session.add(Artifact(sha256=sha, size=len(blobs[kind]), kind=kind))
            session.add(ModelVersion(
                job_id=self.job_id, version=version, round_index=round_index, state_sha256=art.state_sha256,
                model_onnx_sha256=shas["model_onnx"], predictor_onnx_sha256=shas["predictor_onnx"],
                generator_onnx_sha256=shas.get("generator_onnx"), server_state_sha256=shas["server_state"],
                delta_sha256=shas.get("delta"), delta_base_version=version - 1 if "delta" in shas else None))
            if round_update is not None:
                round_update(session)

        self.ctx.tx(write)

    def _publish_version(self, version: int) -> None:
        """Publish a version's artifacts (retained, chunked), then its manifest; clear the previous ones.
        Idempotent: a restarted server publishes its current version again."""
        row = self.ctx.tx(lambda s: s.get(ModelVersion, (self.job_id, version)))
        refs: dict[str, ArtifactRef | None] = {}
        for kind, sha in (("model", row.model_onnx_sha256), ("predictor", row.predictor_onnx_sha256),
                          ("generator", row.generator_onnx_sha256), ("delta", row.delta_sha256)):
            refs[kind] = self._publish_artifact(sha) if sha else None
        s = self.settings
        manifest = Manifest(
            job=self.job_id, version=version, round=row.round_index + 1 if row.round_index is not None else 0,
            state_sha256=row.state_sha256, model=refs["model"], predictor=refs["predictor"],
            num_classes=self.runtime.info.num_classes, image_shape=list(self.runtime.info.image_shape),
            seed=s.seed, algorithm=s.algorithm.to_dict(), generator=refs["generator"], delta=refs["delta"],
            delta_base_version=row.delta_base_version,
            label_prior=[float(p) for p in self.runtime.global_state.prior.probabilities()],
            chunk_size=s.chunk_size)
        self._publish_confirmed(self.topics.manifest, manifest.to_json())
        self._clear_version(version - 1, keep={r.sha256 for r in refs.values() if r})

    def _publish_artifact(self, sha: str) -> ArtifactRef:
        blob = self.ctx.store.get(sha)
        chunks = split_chunks(blob, stream=sha, chunk_size=self.settings.chunk_size)
        for i, chunk in enumerate(chunks):
            self._publish_confirmed(self.topics.artifact_chunk(sha, i), chunk)
        return ArtifactRef(sha256=sha, size=len(blob), chunks=len(chunks))

    def _publish_confirmed(self, topic: str, payload: bytes, retain: bool = True) -> None:
        """Publish and wait until the broker acknowledged it, however long the broker is away (a restart must
        not fail the job); every 30 s without an acknowledgement it is published again (these are retained
        messages: a repeat is harmless). Raises Stopping when the server stops meanwhile."""
        started = reported = time.monotonic()
        while not self.stopping.is_set():
            if self.ctx.link.publish(topic, payload, retain=retain, wait=30):
                return
            if time.monotonic() - reported > 30:
                reported = time.monotonic()
                log.warning("job %s: broker has not acknowledged %s for %.0f s; still trying", self.job_id,
                            topic, reported - started)
            self.ctx.link.connected.wait(1.0)
            time.sleep(0.1)
        raise Stopping()

    def _clear_version(self, version: int, keep: set[str]) -> None:
        if version < 0:
            return
        row = self.ctx.tx(lambda s: s.get(ModelVersion, (self.job_id, version)))
        if row is None:
            return
        for sha in (row.model_onnx_sha256, row.predictor_onnx_sha256, row.generator_onnx_sha256, row.delta_sha256):
            if sha and sha not in keep:
                for i in range(max(1, -(-self.ctx.store.size(sha) // self.settings.chunk_size))):
                    self.ctx.link.clear_retained(self.topics.artifact_chunk(sha, i))

    # ------------------------------------------------------------------------------------------ rounds
    def _resume_round(self, index: int) -> OpenRound | None:
        """The open (or interrupted while aggregating) round of `index` after a restart, with its accepted
        updates re-added from the store."""
        row = self.ctx.tx(lambda s: s.scalars(select(Round).where(
            Round.job_id == self.job_id, Round.index == index,
            Round.status.in_([RoundStatus.OPEN, RoundStatus.AGGREGATING]))).first())
        if row is None:
            return None
        opened = self._make_open(row)
        updates = self.ctx.tx(lambda s: s.scalars(select(ClientUpdate).where(
            ClientUpdate.round_id == row.id, ClientUpdate.status == UpdateStatus.ACCEPTED)
            .order_by(ClientUpdate.id)).all())
        for upd in updates:
            tensors = decode_tensors(self.ctx.store.get(upd.payload_sha256), self.runtime.upload_spec(),
                                     max_bytes=self.ctx.max_upload_bytes)
            self._add_to_round(opened, upd.client_id, tensors, upd.num_samples, upd.label_counts, upd.metrics,
                               upd.payload_bytes)
        log.info("job %s resumed round %d.%d with %d accepted updates", self.job_id, row.index, row.attempt,
                 len(updates))
        self._announce(opened.window)
        return opened

    def _open_round(self, index: int) -> OpenRound | None:
        s = self.settings
        needed = (s.min_online or s.active) if index == 0 else s.min_clients
        if len(self.online) < needed:
            self._wait_for_messages(1.0)
            return None
        attempt = self.ctx.tx(lambda ses: ses.scalar(select(func.count()).select_from(Round).where(
            Round.job_id == self.job_id, Round.index == index)))
        selected = select_clients(sorted(self.online), min(s.active, len(self.online)), s.seed, index, attempt)
        deadline = utcnow() + timedelta(seconds=s.round_timeout_s)

        def create(session: Session) -> Round:
            row = Round(job_id=self.job_id, index=index, attempt=attempt, selected=list(selected),
                        deadline=deadline, status=RoundStatus.OPEN)
            session.add(row)
            session.flush()
            return row

        opened = self._make_open(self.ctx.tx(create))
        log.info("job %s round %d.%d: selected %s", self.job_id, index, attempt, ", ".join(selected))
        self._announce(opened.window)
        return opened

    def _make_open(self, row: Round) -> OpenRound:
        window = RoundWindow(self.job_id, row.index, row.attempt, self.runtime.version, set(row.selected),
                             row.deadline.timestamp())
        return OpenRound(row.id, window, self.runtime.new_accumulator())

    def _announce(self, window: RoundWindow, status: str = "open") -> None:
        ann = RoundAnnouncement(job=self.job_id, round=window.index, attempt=window.attempt, version=window.version,
                                selected=sorted(window.selected), deadline=window.deadline, status=status)
        self._publish_confirmed(self.topics.round, ann.to_json())

    def _collect(self) -> None:
        """Handle messages until every selected client has an accepted update or the deadline passes."""
        window = self.open.window
        while not self.stopping.is_set():
            remaining = window.deadline - time.time()
            if remaining <= 0 or window.accepted >= window.selected:
                return
            self._wait_for_messages(min(remaining, 0.5))
            for sender, stream, got, expected in self.validator.reassembler.expire():
                self._record_rejection(sender, f"{stream}-incomplete", "chunk_missing",
                                       f"chunk stream {stream} incomplete: {got} of {expected} chunks")

    def _close_round(self) -> None:
        opened, s = self.open, self.settings
        window = opened.window
        accepted = len(window.accepted)
        if accepted < s.min_clients:
            reason = f"quorum not reached: {accepted} of {s.min_clients} updates by the deadline"
            log.warning("job %s round %d.%d failed: %s", self.job_id, window.index, window.attempt, reason)
            self.ctx.tx(lambda ses: self._finish_round_row(ses, opened, RoundStatus.FAILED, reason=reason))
            self.open = None
            return
        self.ctx.tx(lambda ses: setattr(ses.get(Round, opened.row_id), "status", RoundStatus.AGGREGATING))
        bytes_down = self._bytes_down(window)
        artifacts, metrics = self.runtime.close_round(opened.accumulator, window.index)
        client_accuracy = opened.test_correct / opened.test_count if opened.test_count else None
        client_loss = opened.test_loss / opened.test_count if opened.test_count else None
        accuracy = metrics["accuracy"] if metrics["accuracy"] is not None else client_accuracy
        loss = metrics["loss"] if metrics["loss"] is not None else client_loss
        version = self.runtime.version

        def close(session: Session) -> None:
            self._finish_round_row(session, opened, RoundStatus.CLOSED, accuracy=accuracy, loss=loss,
                                   generator_loss=metrics["generator_loss"], bytes_down=bytes_down,
                                   model_version=version)
            session.get(Job, self.job_id).current_round = window.index + 1

        self._store_version(self.runtime, artifacts, window.index, round_update=close)
        log.info("job %s round %d closed: %d updates, version %d, accuracy %s", self.job_id, window.index,
                 accepted, version, f"{accuracy:.4f}" if accuracy is not None else "n/a")
        self.open = None
        self._publish_version(version)

    def _finish_round_row(self, session: Session, opened: OpenRound, status: RoundStatus, **values) -> None:  # noqa: ANN003
        row = session.get(Round, opened.row_id)
        row.status = status
        row.closed_at = utcnow()
        row.num_updates = len(opened.window.accepted)
        row.bytes_up = opened.bytes_up
        if status == RoundStatus.FAILED:
            row.failure_reason = values.pop("reason")
        for key, value in values.items():
            setattr(row, key, value if not (isinstance(value, float) and not np.isfinite(value)) else None)

    def _bytes_down(self, window: RoundWindow) -> int:
        """What the selected clients needed to download for this round: the delta when they held the previous
        version (as their presence says), else the full model; plus the generator (FedGen)."""
        row = self.ctx.tx(lambda s: s.get(ModelVersion, (self.job_id, window.version)))
        size = lambda sha: self.ctx.store.size(sha) if sha else 0  # noqa: E731  (stat, no read)
        total = 0
        for client in window.selected:
            held = self.online.get(client).version if client in self.online else None
            use_delta = row.delta_sha256 and held == window.version - 1
            total += size(row.delta_sha256) if use_delta else size(row.model_onnx_sha256)
            total += size(row.generator_onnx_sha256)
        return total

    def _finish(self) -> None:
        last = self.settings.rounds
        self._announce(RoundWindow(self.job_id, last, 0, self.runtime.version, set(), time.time()), "finished")
        self._set_job(status=JobStatus.FINISHED, finished=True)
        log.info("job %s finished after %d rounds", self.job_id, last)

    def _set_job(self, status: JobStatus, error: str | None = None, finished: bool = False) -> None:
        def update(session: Session) -> None:
            job = session.get(Job, self.job_id)
            job.status = status
            if error:
                job.error = error[:2000]
            if finished:
                job.finished_at = utcnow()

        try:
            self.ctx.tx(update)
        except Exception:
            log.exception("could not record job %s as %s", self.job_id, status.value)

    # ------------------------------------------------------------------------------------------ messages
    def _wait_for_messages(self, timeout: float) -> None:
        """Handle every message that arrives within `timeout` seconds (at least one wait)."""
        end = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                msg = self.inbox.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return
            client = self.topics.client_of(msg.topic)
            if client is None:
                continue
            if msg.topic.endswith("/presence"):
                self._on_presence(client, msg.payload)
            elif msg.topic.endswith("/update"):
                self._on_update(client, msg.payload)
            if time.monotonic() >= end and self.inbox.empty():
                return

    def _on_presence(self, client: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            presence = decode_presence(payload)
        except ValidationError as exc:
            log.warning("job %s: bad presence from %s: %s", self.job_id, client, exc)
            return
        if presence.status == "online":
            self.online[client] = presence
        else:
            self.online.pop(client, None)
        assignment = self.ctx.tx(lambda s: self._upsert_client(s, client, presence))
        if assignment is not None:
            self.ctx.link.publish(self.topics.assignment(client), assignment.to_json(), retain=True)

    def _upsert_client(self, session: Session, client: str, presence: Presence) -> Assignment | None:
        row = session.get(Client, (self.job_id, client))
        now = utcnow()
        if row is None:
            row = Client(job_id=self.job_id, client_id=client, first_seen=now, device_info={})
            session.add(row)
        row.status = ClientStatus.ONLINE if presence.status == "online" else ClientStatus.OFFLINE
        row.last_seen = now
        if presence.num_samples is not None:
            row.num_samples = presence.num_samples
        if presence.version is not None:
            row.state_version = presence.version
        info = {**(row.device_info or {}), **presence.device}
        spec = presence.device.get("partition_request")
        assignment = None
        if spec and presence.status == "online":
            if "partition_index" not in info or info.get("partition_spec") != spec:
                info["partition_index"] = self._free_partition_index(session, spec, client)
                info["partition_spec"] = spec
            assignment = Assignment(spec=spec, index=int(info["partition_index"]))
        row.device_info = info
        return assignment

    def _free_partition_index(self, session: Session, spec: str, client: str) -> int:
        taken = {int(c.device_info["partition_index"]) for c in session.scalars(select(Client).where(
                 Client.job_id == self.job_id)) if c.client_id != client
                 and c.device_info.get("partition_spec") == spec and "partition_index" in c.device_info}
        index = 0
        while index in taken:
            index += 1
        return index

    def _load_clients(self) -> None:
        """Clients marked online in the database count as online until their retained presence says else."""
        rows = self.ctx.tx(lambda s: s.scalars(select(Client).where(Client.job_id == self.job_id,
                                                                       Client.status == ClientStatus.ONLINE)).all())
        for row in rows:
            self.online[row.client_id] = Presence("online", row.num_samples, row.state_version, {})

    def _on_update(self, client: str, raw: bytes) -> None:
        try:
            envelope = self.validator.reassemble(client, raw)
        except ValidationError as exc:
            self._record_rejection(client, garbage_key(raw), exc.reason, str(exc))
            return
        if envelope is None:
            return
        decision = self.validator.check(client, envelope, self.open.window if self.open else None, time.time())
        key = decision.key or garbage_key(envelope)
        previous = self.ctx.tx(lambda s: s.scalars(select(ClientUpdate).where(
            ClientUpdate.job_id == self.job_id, ClientUpdate.idempotency_key == key)).first())
        if previous is not None:  # a redelivery or a retry: answer as before, count nothing
            status = "duplicate" if previous.status == UpdateStatus.ACCEPTED else "rejected"
            code = previous.reason.split(":", 1)[0] if previous.reason else None  # the code, as the first ack
            self._ack(client, Ack(key, status, decision.header.round if decision.header else None,
                                  code, f"already received ({previous.reason})"[:500] if code else "already received"))
            return
        if decision.status == "accepted":
            self._accept(client, decision, len(envelope))
        elif decision.status == "duplicate":
            self._ack(client, Ack(key, "duplicate", decision.header.round, decision.reason, decision.message))
        else:
            self._record_rejection(client, key, decision.reason, decision.message, decision.header, len(envelope))

    def _accept(self, client: str, decision: Decision, size: int) -> None:
        header, opened = decision.header, self.open
        sha = self.ctx.store.put(decision.payload)
        self.ctx.tx(lambda s: s.add(ClientUpdate(
            job_id=self.job_id, round_id=opened.row_id, client_id=client, idempotency_key=header.idempotency_key,
            base_version=header.base_version, num_samples=header.num_samples, label_counts=header.label_counts,
            metrics=header.metrics, status=UpdateStatus.ACCEPTED, payload_sha256=sha, payload_bytes=size)))
        self._add_to_round(opened, client, decision.tensors, header.num_samples, header.label_counts,
                           header.metrics, size)
        self._ack(client, Ack(header.idempotency_key, "accepted", header.round))

    def _add_to_round(self, opened: OpenRound, client: str, tensors, num_samples: int, label_counts,  # noqa: ANN001
                      metrics: dict, size: int) -> None:
        opened.accumulator.add(tensors, num_samples, np.asarray(label_counts), client=client)
        opened.window.accepted.add(client)
        opened.bytes_up += size
        opened.test_correct += metrics.get("test_correct", 0.0)
        opened.test_count += metrics.get("test_count", 0.0)
        opened.test_loss += metrics.get("test_loss", 0.0) * metrics.get("test_count", 0.0)

    def _record_rejection(self, client: str, key: str, reason: str, message: str, header=None,  # noqa: ANN001
                          size: int = 0) -> None:
        log.warning("job %s: update from %s rejected (%s): %s", self.job_id, client, reason, message)
        key = key[:128]  # look up the key as stored (a 128-character stream + "-incomplete" is longer)
        # recorded against the round it was sent for when that round exists (a late update belongs to the
        # round it missed, not to the one open now), else the open / latest round
        round_id = self._round_id(header.round, header.attempt) if header else None
        if round_id is None:
            round_id = self.open.row_id if self.open else self._latest_round_id()
        if round_id is not None:
            def write(session: Session) -> None:
                if session.scalars(select(ClientUpdate).where(ClientUpdate.job_id == self.job_id,
                                                               ClientUpdate.idempotency_key == key)).first():
                    return
                session.add(ClientUpdate(
                    job_id=self.job_id, round_id=round_id, client_id=client[:128], idempotency_key=key,
                    base_version=header.base_version if header else 0,
                    num_samples=header.num_samples if header else 0,
                    label_counts=header.label_counts if header else [], metrics=header.metrics if header else {},
                    status=UpdateStatus.REJECTED, reason=f"{reason}: {message}"[:2000], payload_bytes=size))

            try:
                self.ctx.tx(write)
            except Exception:  # noqa: BLE001 - recording a bad upload must never stop the job
                log.exception("job %s: could not record the rejected update %s", self.job_id, key)
        self._ack(client, Ack(key, "rejected", header.round if header else None, reason, message[:500]))

    def _round_id(self, index: int, attempt: int) -> int | None:
        if self.open and (self.open.window.index, self.open.window.attempt) == (index, attempt):
            return self.open.row_id
        return self.ctx.tx(lambda s: s.scalar(select(Round.id).where(
            Round.job_id == self.job_id, Round.index == index, Round.attempt == attempt)))

    def _latest_round_id(self) -> int | None:
        return self.ctx.tx(lambda s: s.scalar(select(func.max(Round.id)).where(Round.job_id == self.job_id)))

    def _ack(self, client: str, ack: Ack) -> None:
        self.ctx.link.publish(self.topics.ack(client), ack.to_json())
