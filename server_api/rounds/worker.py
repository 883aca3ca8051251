"""One job's round loop on the server, in its own thread.

The loop drives four collaborators and is the only one that calls downward: the `VersionPublisher`
(versions, manifest, round announcements), the `UpdateIntake` (every accept / duplicate / reject rule), the
`ClientRegistry` (presence, partition assignment) and the `RoundKeeper` (open, resume, close the round).

Every step persists its result before the next one starts, so a server killed at any point resumes from the
database: the latest model version (its server-state blob restores the algorithm state bit for bit), the open
round (its selection and deadline) and the updates already accepted in it (their tensors are in the store).
An update is acknowledged only after it is stored, so an acknowledged update is never lost. A message that
cannot be handled is refused and logged, and the job goes on: only a fault of the server itself fails a job.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable

from server_api import metrics
from server_api.rounds.clients import ClientRegistry
from server_api.rounds.context import ServerContext, Stopping
from server_api.rounds.intake import UpdateIntake, UpdateValidator
from server_api.rounds.lease import JobLeaseKeeper
from server_api.rounds.publisher import VersionPublisher
from server_api.rounds.round import OpenRound, RoundKeeper
from server_api.rounds.runtime import JobRuntime
from server_api.rounds.state import JobStore, LeaseLost, RoundResult, VersionRecord
from shared.mqtt import Message
from shared.protocol.errors import ValidationError
from shared.protocol.frames import decode_chunk
from shared.protocol.job import JobConfig
from shared.protocol.messages import RoundAnnouncement
from shared.protocol.topics import Topics

log = logging.getLogger("fedgen.server")


ENDED = ("finished", "failed", "cancelled")
FOLLOW_POLL_S = 0.5  # a process without the job's lease looks at the open round (and the lease) this often
INGEST_BATCH_ENV = "FEDGEN_INGEST_BATCH"  # messages handled together: accepted updates stored per transaction
DEFAULT_INGEST_BATCH = 256


def ingest_batch() -> int:
    """$FEDGEN_INGEST_BATCH when it is an integer 1..10000 (1: one transaction per update), else 256."""
    try:
        value = int(os.environ.get(INGEST_BATCH_ENV, DEFAULT_INGEST_BATCH))
    except ValueError:
        return DEFAULT_INGEST_BATCH
    return value if 1 <= value <= 10_000 else DEFAULT_INGEST_BATCH


class JobGaveUp(Exception):
    """The job cannot go on (a round failed max_round_attempts times)."""


class JobWorker(threading.Thread):
    """Runs rounds for one job until it has run `rounds` rounds (or the server stops)."""

    def __init__(self, job_id: str, ctx: ServerContext):
        super().__init__(name=f"job-{job_id}", daemon=True)
        self.job_id = job_id
        self.ctx = ctx
        self.state: JobStore = ctx.job_store(job_id)
        self.topics = Topics(job_id)
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.stopping = threading.Event()
        self.finished = threading.Event()  # the job is done; the thread only answers late messages
        self.refused: Counter[str] = Counter()  # messages refused, by reason
        self.last_failure: str | None = None
        self.open: OpenRound | None = None
        self.waiting: tuple[int, int] | None = None  # (online, needed) while a round waits for devices
        self._last_expiry = 0.0
        self._waiting_logged = 0.0
        self.batch = ingest_batch()
        self.lease = JobLeaseKeeper(self.state, ctx.instance, ctx.lease_s) if ctx.clustered else None

    # ------------------------------------------------------------------------------------------ thread
    def run(self) -> None:
        try:
            self._run()
        except Stopping:  # the server stops while the broker is away: the next start publishes again
            log.info("job %s: stopped while waiting for the broker", self.job_id)
        except JobGaveUp as exc:
            log.error("job %s failed: %s", self.job_id, exc)
            self._fail(str(exc))
        except Exception as exc:  # record why the job stopped; the server keeps serving other jobs
            log.exception("job %s failed", self.job_id)
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            if self.lease is not None:
                self.lease.release()
            self.drain()

    def stop(self) -> None:
        self.stopping.set()

    def drain(self) -> None:
        """Mark every message still queued for this worker handled (it will not handle them): a link that
        paces its broker acknowledgements (`shared.mqtt.AckPacer`) must not wait for them."""
        while True:
            try:
                self.inbox.get_nowait().done()
            except queue.Empty:
                return

    def _run(self) -> None:
        job = self.state.job()
        if job.status in ENDED:
            return
        self._setup(job.config)
        while not self.stopping.is_set():
            if self.lease is not None and not self._follow():
                return
            try:
                self._lead()
                return
            except LeaseLost as exc:
                log.warning("job %s: %s; another server process runs its rounds now", self.job_id, exc)
                self._step_down()

    def _setup(self, stored_config: dict) -> None:
        self.config = JobConfig.from_stored(self.job_id, stored_config)
        self.runtime = JobRuntime(self.config, self.ctx.data_dir)
        self.publisher = VersionPublisher(self.config, self.state, self.ctx.store, self.ctx.link, self.stopping)
        self.clients = ClientRegistry(self.job_id, self.state, self.ctx.link, self.ctx.partition_release_s)
        validator = UpdateValidator(self.job_id, self.runtime.info.num_classes, self.runtime.upload_spec(),
                                    self.ctx.max_upload_bytes, self.config.max_client_samples,
                                    self.config.algorithm.allowed_models)
        self.intake = UpdateIntake(self.job_id, self.state, self.ctx.store, self.ctx.link, validator,
                                   announced=self.clients.announced)
        self.rounds = RoundKeeper(self.config, self.state, self.ctx.store, self.runtime, self.publisher,
                                  self.ctx.max_upload_bytes, clustered=self.ctx.clustered)

    def _follow(self) -> bool:
        """Until this process takes the job's lease: ingest updates into the round the database shows open
        (the lease holder closes it). False when the server stops first; a finished or failed job's late
        messages are answered until then."""
        self._step_down()
        logged = False
        while not self.stopping.is_set():
            job = self.state.job()
            if job.status in ("finished", "failed"):
                self.open = None
                self._answer_until_stopped()
                return False
            if self.lease.take():
                self.state.fence = self.lease.holder
                self.clients.mirror = True
                return True
            if not logged:
                logged = True
                log.info("job %s: following; another server process runs its rounds", self.job_id)
            self._look_at_store(with_accepted=True)
            self._pump(FOLLOW_POLL_S)
        return False

    def _look_at_store(self, with_accepted: bool) -> None:
        """Following: the round the database shows open now (and, `with_accepted`, who has an accepted update
        in it). Also called before each batch of updates (two small queries): a round's row is committed
        before it is announced, so an update for it never meets a view that has not seen it."""
        self.open = self.rounds.in_store(self.state.job().current_round, self.open, with_accepted)

    def _step_down(self) -> None:
        """Run no more rounds here: forget the open round, stop fencing and mirroring, let the lease go."""
        if self.open is not None and self.open.accumulator is not None:
            self.open.accumulator.close()
        self.open = None
        self.state.fence = None
        self.clients.mirror = False
        self.lease.release()

    def _lead(self) -> None:
        """Run the job's rounds until it ends or the server stops."""
        job = self.state.job()
        version = self._restore()
        self.clients.load()
        self.publisher.publish_version(version, self.runtime)
        if job.status == "created":
            self.state.set_job_status("running")
        log.info("job %s %s from version %d, round %d", self.job_id, "paused" if job.status == "paused" else
                 "running", self.runtime.version, job.current_round)
        while not self.stopping.is_set():
            self._check_lease()
            job = self.state.job()
            if job.status == "cancelled":
                self._cancelled(job.error)
                return
            metrics.CURRENT_ROUND.labels(self.job_id).set(job.current_round)
            if job.current_round >= self.config.rounds:
                self._finish()
                return
            if job.status == "paused":  # the open round has finished; open no new one until resumed
                self.waiting = None
                self._pump(1.0)
                continue
            self.open = self.rounds.resume(job.current_round) or self._try_open(job.current_round)
            if self.open is None:
                continue
            self._collect()
            if self.stopping.is_set():
                return
            if self.state.job().status == "cancelled":
                continue  # the top of the loop ends the job and its open round
            self._close()

    def _restore(self) -> VersionRecord:  # VersionRecord
        """The runtime at the job's latest version (made and stored first for a new job)."""
        latest = self.state.latest_version()
        if latest is None:
            return self.publisher.store_version(self.runtime, self.runtime.build_artifacts(delta=None), None)
        self.runtime.restore(self.ctx.store.get(latest.server_state))
        if self.runtime.version != latest.version:
            raise RuntimeError(f"server state of version {latest.version} says {self.runtime.version}")
        return latest

    # ------------------------------------------------------------------------------------------ rounds
    def _try_open(self, index: int) -> OpenRound | None:
        needed = self.rounds.needed_online(index)
        online = len(self.clients.online)
        if online < needed:
            self.waiting = (online, needed)
            if time.monotonic() - self._waiting_logged > 30:
                self._waiting_logged = time.monotonic()
                log.info("job %s round %d waiting for devices: %d of %d online", self.job_id, index, online, needed)
            self._pump(1.0)
            return None
        self.waiting = None
        failed = self.state.attempt_count(index)
        if failed >= self.config.max_round_attempts:
            raise JobGaveUp(f"round {index} failed {failed} times (max_round_attempts); the last: "
                            f"{self.last_failure or 'no reason recorded'}")
        return self.rounds.open(index, list(self.clients.online))

    def _collect(self) -> None:
        """Handle messages until every selected client has an accepted update, the deadline passes, or the job
        is cancelled (checked about once a second)."""
        window = self.open.window
        checked = time.monotonic()
        while not self.stopping.is_set() and not window.complete and not self.open.frozen:
            remaining = window.deadline - time.time()
            if remaining <= 0:
                return
            self._pump(min(remaining, 0.5), until=lambda: window.complete)
            if self.lease is not None:  # what the other server processes accepted
                self._check_lease()
                window.accepted |= self.state.accepted_clients(self.open.row_id)
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                if self.state.job().status == "cancelled":
                    return

    def _check_lease(self) -> None:
        if self.lease is not None and self.lease.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: the lease was not renewed in time")

    def _close(self) -> None:
        opened, self.open = self.open, None
        version = self.state.version(opened.window.version)
        others = {name: len(blob) for name, blob in self.runtime.other_models_onnx().items()}
        record = self.rounds.close(opened, lambda w: self.clients.bytes_down(w, version, self.ctx.store,
                                                                                  self.config.algorithm.partial,
                                                                                  others))
        if record is not None:
            self.last_failure = None
            self.publisher.publish_version(record, self.runtime)
        else:
            self.last_failure = self.rounds.last_failure

    def _finish(self) -> None:
        last = self.config.rounds
        self.publisher.announce(last, 0, self.runtime.version, [], time.time(), "finished")
        self.state.set_job_status("finished", finished=True)
        log.info("job %s finished after %d rounds", self.job_id, last)
        self._answer_until_stopped()

    def _answer_until_stopped(self) -> None:
        """After the last round: a client whose ack was lost (broker restart, server crash between storing
        and acking) keeps re-sending its update; keep answering it (`duplicate` for an update already
        counted, `rejected` otherwise) and recording presence, so that it can stop, until the server stops."""
        self.finished.set()
        while not self.stopping.is_set():
            self._pump(0.5)

    def _cancelled(self, reason: str | None) -> None:
        """The operator cancelled the job (POST /jobs/{id}/cancel): close its open round as failed, tell the
        devices (retained round status), and answer late messages until the server stops."""
        reason = reason or "cancelled by the operator"
        index = self.open.window.index if self.open else self.state.job().current_round
        self._close_open_round(f"the job was cancelled: {reason}")
        self._announce_end("cancelled", reason, index)
        log.info("job %s cancelled: %s", self.job_id, reason)
        self._answer_until_stopped()

    def _close_open_round(self, why: str) -> None:
        if self.open is not None:
            w = self.open.window
            self.state.finish_round(self.open.row_id, RoundResult("failed", len(w.accepted), self.open.bytes_up,
                                                                  failure_reason=why[:2000]))
            self.open = None

    def _announce_end(self, status: str, reason: str, index: int) -> None:
        version = self.runtime.version if hasattr(self, "runtime") else 0
        ended = RoundAnnouncement(job=self.job_id, round=index, attempt=0, version=version, selected=[],
                                  deadline=time.time(), status=status, reason=reason[:500])
        self.ctx.link.publish(self.topics.round, ended.to_json(), retain=True)

    def _fail(self, error: str) -> None:
        """Mark the job failed (its open round too) and tell its devices (retained round status), so that they
        stop retrying."""
        index = self.open.window.index if self.open else 0
        try:
            self._close_open_round(f"the job failed: {error}")
            self.state.set_job_status("failed", error=error, finished=True)
        except Exception:
            log.exception("could not record job %s as failed", self.job_id)
        try:
            ended = RoundAnnouncement(job=self.job_id, round=index, attempt=0,
                                      version=self.runtime.version if hasattr(self, "runtime") else 0,
                                      selected=[], deadline=time.time(), status="failed", reason=error[:500])
            self.ctx.link.publish(self.topics.round, ended.to_json(), retain=True)
        except Exception:
            log.exception("could not announce that job %s failed", self.job_id)

    # ------------------------------------------------------------------------------------------ messages
    def _pump(self, timeout: float, until: Callable[[], bool] | None = None) -> None:  # Callable[[], bool] | None
        """Handle the messages that arrive within `timeout` seconds; return early once `until()` holds."""
        end = time.monotonic() + max(0.0, timeout)
        while True:
            self._expire_streams()
            try:
                batch = [self.inbox.get(timeout=max(0.0, min(1.0, end - time.monotonic())))]
            except queue.Empty:
                if time.monotonic() >= end:
                    return
                continue
            while len(batch) < self.batch:  # what else has arrived: handled together (group commit)
                try:
                    batch.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._handle_many(batch)
            finally:
                for msg in batch:
                    msg.done()
            if (until is not None and until()) or (time.monotonic() >= end and self.inbox.empty()):
                return

    def _expire_streams(self) -> None:
        """Drop (and record) incomplete chunk streams, at most once a second, whether a round is open or not."""
        now = time.monotonic()
        if now - self._last_expiry >= 1.0:
            self._last_expiry = now
            self.intake.expire(self.open)

    def _refused(self, reason: str) -> None:
        self.refused[reason] += 1
        metrics.REFUSED.labels(self.job_id, reason).inc()

    def _handle(self, msg: Message) -> None:
        try:
            self._handle_many([msg])
        finally:
            msg.done()

    def _handle_many(self, batch: list[Message]) -> None:
        """Messages in arrival order; consecutive updates go to the intake together (one transaction for the
        accepted ones), and consecutive presences to the registry together (one transaction)."""
        updates: list[tuple[str, bytes]] = []
        presences: list[tuple[str, bytes]] = []
        for msg in batch:
            forwarded = self.topics.forwarded_from(msg.topic) if self.lease is not None else None
            if forwarded is not None:
                if not self.lease.held:
                    continue  # sent to the process that ran the rounds before: the device re-sends
                client, is_update = forwarded, True
            else:
                client, is_update = self.topics.client_of(msg.topic), msg.topic.endswith("/update")
                if client is None:
                    self._refused("bad_topic")
                    continue
                if is_update and self._forwarded(client, msg.payload):
                    continue
            if is_update:
                self._flush_presences(presences)
                presences = []
                updates.append((client, msg.payload))
            else:
                self._flush(updates)
                updates = []
                presences.append((client, msg.payload))
        self._flush(updates)
        self._flush_presences(presences)

    def _flush_presences(self, presences: list[tuple[str, bytes]]) -> None:
        def handle() -> None:
            for client, exc in self.clients.receive_many(presences):
                self._refused(exc.reason)
                log.warning("job %s: refused a presence message from %s: %s", self.job_id, client, exc)
        if presences:
            self._guarded("presence", _senders(presences), handle, len(presences))

    def _forwarded(self, client: str, raw: bytes) -> bool:
        """Following, a chunk of a multi-chunk upload is passed on to the process running the rounds (the
        broker's share group deals chunks out round-robin; one process must hold all of a stream's): True
        if it was. Anything that does not decode as such a chunk is handled (and refused) here."""
        if self.lease is None or self.lease.held or self.finished.is_set():
            return False
        try:
            chunk = decode_chunk(raw, max_payload=self.ctx.max_upload_bytes)
        except ValidationError:
            return False
        if chunk.count == 1:
            return False
        self.ctx.link.publish(self.topics.forwarded(client), raw)
        return True

    def _flush(self, updates: list[tuple[str, bytes]]) -> None:
        if updates and self.lease is not None and not self.lease.held and not self.finished.is_set():
            self._look_at_store(with_accepted=False)
        if updates:
            self._guarded("update", _senders(updates), lambda: self.intake.receive_many(updates, self.open),
                          len(updates))

    def _guarded(self, kind: str, sender: str, handle: Callable[[], None], count: int = 1) -> None:
        """The per-message error boundary: whatever a message does, it is refused, counted and logged, and the
        loop goes on. (The intake refuses bad updates itself, one by one; what reaches here from a batch of
        updates is a fault of this server, and their senders retry: nothing was acknowledged.)"""
        try:
            handle()
        except ValidationError as exc:
            self._refused(exc.reason)
            log.warning("job %s: refused a %s message from %s: %s", self.job_id, kind, sender, exc)
        except Stopping:
            raise
        except Exception as exc:  # a fault of this server, not of the sender: logged with its traceback
            for _ in range(count):
                self._refused("internal_error")
            log.exception("job %s: could not handle %d %s message(s) from %s (%s)", self.job_id, count, kind,
                          sender, type(exc).__name__)


def _senders(messages: list[tuple[str, bytes]]) -> str:
    """Who sent a batch, for a log line: the first five ids."""
    return ", ".join(sorted({c for c, _ in messages})[:5]) + (" ..." if len(messages) > 5 else "")
