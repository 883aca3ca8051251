"""Update intake: from one received MQTT message to an accepted, duplicate or rejected update, with every rule
in one place. The checks run in the order that makes a bad payload cheap to refuse: size, chunk framing,
envelope, header, round/client/version, tensors; then the idempotency key against what is stored.

`UpdateValidator` holds the rules that need no storage (a pure function of the message, the open round and
the time); `UpdateIntake` adds chunk reassembly, duplicates, records and acknowledgements. An update is
acknowledged as accepted only after its payload and row are stored.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import numpy as np

from server_api import metrics
from server_api.db.store import ArtifactStore
from server_api.rounds.context import Link
from server_api.rounds.round import OpenRound, RoundWindow
from server_api.rounds.state import JobStore, RoundClosed, UpdateRecord
from shared.fsutil import sha256_hex
from shared.protocol.errors import ValidationError
from shared.protocol.frames import Chunk, Reassembler, decode_chunk
from shared.protocol.job import MAX_SAMPLES
from shared.protocol.messages import Ack, AckStatus, UpdateHeader, decode_update
from shared.protocol.tensors import Spec, decode_tensors
from shared.protocol.topics import Topics

log = logging.getLogger("fedgen.server")
RECORDS_PER_SENDER = 64  # rejection rows (and warnings) one sender can cause per round; later ones: acked only
REANSWER_S = 5.0  # the chunks of one send of a stream nobody waits for are answered once
CHUNK_TIMEOUT_ENV = "FEDGEN_CHUNK_TIMEOUT_S"  # seconds an incomplete chunk stream waits before chunk_missing
DEFAULT_CHUNK_TIMEOUT = 120.0


def default_chunk_timeout() -> float:
    """$FEDGEN_CHUNK_TIMEOUT_S if it is a positive number, else 120 s."""
    try:
        value = float(os.environ.get(CHUNK_TIMEOUT_ENV, DEFAULT_CHUNK_TIMEOUT))
    except ValueError:
        return DEFAULT_CHUNK_TIMEOUT
    return value if math.isfinite(value) and value > 0 else DEFAULT_CHUNK_TIMEOUT


@dataclass
class Decision:
    status: AckStatus
    reason: str | None = None
    message: str | None = None
    header: UpdateHeader | None = None
    tensors: dict[str, np.ndarray] | None = None
    payload: bytes | None = None  # the tensors blob of an accepted update

    @property
    def key(self) -> str | None:
        return self.header.idempotency_key if self.header else None


@dataclass
class Arrival:
    """A complete envelope from `client`: its idempotency key (or a garbage key), size and decision."""

    client: str
    key: str
    size: int
    decision: Decision


def reject(exc: ValidationError, header: UpdateHeader | None = None) -> Decision:
    return Decision("rejected", exc.reason, exc.detail, header)


class UpdateValidator:
    """The storage-free rules: decode the envelope, check its header against the open round, decode the
    tensors against the job's spec."""

    def __init__(self, job: str, num_classes: int, spec: Spec, max_bytes: int,
                 max_client_samples: int = MAX_SAMPLES, models: tuple[str, ...] = ()):
        self.job = job
        self.num_classes = num_classes
        self.spec = spec
        self.max_bytes = max_bytes
        self.max_client_samples = max_client_samples
        self.models = models  # the job's models, its default first (empty: any model header is refused)

    def check(self, client: str, envelope: bytes, window: RoundWindow | None, now: float,
              announced: int | None = None) -> Decision:
        """Validate a complete envelope against the open round (and, where known, the sample count the device
        announced in its presence); never raises."""
        try:
            header, blob = decode_update(envelope, self.num_classes, self.max_bytes)
        except ValidationError as exc:
            return reject(exc)
        try:
            self._check_header(client, header, window, now)
            self._check_counts(header, announced)
            tensors = decode_tensors(blob, self.spec, max_bytes=self.max_bytes)
        except ValidationError as exc:
            return reject(exc, header)
        if client in window.accepted:
            return Decision("duplicate", "already_accepted", f"{client} already has an accepted update in "
                                                             f"round {window.index}", header)
        return Decision("accepted", header=header, tensors=tensors, payload=blob)

    def _check_header(self, client: str, header: UpdateHeader, window: RoundWindow | None, now: float) -> None:
        if header.client != client:
            raise ValidationError("client_mismatch", f"header says {header.client!r}, topic says {client!r}")
        if header.job != self.job:
            raise ValidationError("unknown_job", f"update for job {header.job!r} on job {self.job!r}'s topic")
        if window is None:
            raise ValidationError("no_open_round", "no round is open")
        if (header.round, header.attempt) != (window.index, window.attempt):
            late = (header.round, header.attempt) < (window.index, window.attempt)
            raise ValidationError("late" if late else "unknown_round",
                                  f"update for round {header.round} (attempt {header.attempt}), open round is "
                                  f"{window.index} (attempt {window.attempt})")
        if now > window.deadline:
            raise ValidationError("late", f"round {window.index} deadline passed {now - window.deadline:.1f} s ago")
        if client not in window.selected:
            raise ValidationError("not_selected", f"{client} is not selected in round {window.index}")
        if header.base_version != window.version:
            raise ValidationError("wrong_version", f"trained from version {header.base_version}, round "
                                                   f"{window.index} trains version {window.version}")
        if header.model is not msgspec.UNSET and header.model not in self.models:
            raise ValidationError("model_not_allowed", f"trained with model {header.model!r}; job {self.job} "
                                                       f"allows {', '.join(self.models) or 'none named'}")


    def _check_counts(self, header: UpdateHeader, announced: int | None) -> None:
        cap = self.max_client_samples
        if header.num_samples > cap:
            raise ValidationError("too_many_samples", f"{header.num_samples} samples exceed the job's "
                                                      f"max_client_samples {cap}")
        if announced is not None and header.num_samples > announced:
            raise ValidationError("samples_exceed_announced", f"{header.num_samples} samples, the device announced "
                                                              f"{announced}")
        if header.metrics.get("test_count", 0) > cap:
            raise ValidationError("bad_metric", f"test_count {header.metrics['test_count']:g} exceeds the job's "
                                                f"max_client_samples {cap}")


def garbage_key(raw: bytes) -> str:
    """An idempotency key for a payload too broken to carry one, so repeats are recorded once."""
    return "invalid-" + sha256_hex(raw)[:48]


class UpdateIntake:
    """Reassembles, decides, records and acknowledges the updates of one job."""

    def __init__(self, job: str, state: JobStore, store: ArtifactStore, link: Link, validator: UpdateValidator,
                 chunk_timeout: float | None = None, announced: Callable[[str], int | None] = lambda client: None):
        self.job = job
        self.announced = announced  # the sample count a client announced in its presence, if any
        self.state = state
        self.store = store
        self.link = link
        self.validator = validator
        self.topics = Topics(job)
        self.reassembler = Reassembler(max_payload=validator.max_bytes,
                                       timeout=chunk_timeout if chunk_timeout is not None
                                       else default_chunk_timeout())
        self._records: dict[tuple[int | None, str], int] = {}  # (round row, sender) -> rejections recorded
        self._answered: dict[tuple[str, str], float] = {}  # (sender, key) -> when last acknowledged

    def receive(self, client: str, raw: bytes, open_round: OpenRound | None) -> None:
        """One message from `client`'s update topic."""
        self.receive_many([(client, raw)], open_round)

    def receive_many(self, messages: list[tuple[str, bytes]], open_round: OpenRound | None) -> None:
        """Messages from update topics, as (sender, payload), in arrival order. Each is reassembled and
        validated on its own; the accepted updates among them are stored in one transaction (group commit)
        and acknowledged after it committed."""
        started = time.perf_counter()
        complete: list[Arrival] = []
        for client, raw in messages:
            envelope = self._reassemble(client, raw, open_round)
            if envelope is not None:
                decision = self.validator.check(client, envelope, open_round.window if open_round else None,
                                                time.time(), self.announced(client))
                complete.append(Arrival(client, decision.key or garbage_key(envelope), len(envelope), decision))
        if complete:
            self._settle(complete, open_round, started)

    def _settle(self, arrivals: list[Arrival], open_round: OpenRound | None, started: float) -> None:
        """Answer complete envelopes: redeliveries as before, accepted ones stored together, the rest refused."""
        previous = self.state.find_updates([a.key for a in arrivals])
        accepted: list[Arrival] = []
        again: list[Arrival] = []  # a key a second time in this batch: answered once the first is stored
        keys: set[str] = set()
        clients: set[str] = set()
        for a in arrivals:
            d = a.decision
            if a.key in previous:  # a redelivery or a retry: answer as before, count nothing
                self._answer_again(a.client, a.key, previous[a.key], d)
            elif a.key in keys:
                again.append(a)
            elif d.status == "accepted" and a.client in clients:
                keys.add(a.key)
                self._ack(a.client, Ack(a.key, "duplicate", d.header.round, "already_accepted",
                                        f"{a.client} already has an accepted update in round {d.header.round}"))
            elif d.status == "accepted":
                keys.add(a.key)
                clients.add(a.client)
                accepted.append(a)
            elif d.status == "duplicate":
                keys.add(a.key)
                self._ack(a.client, Ack(a.key, "duplicate", d.header.round, d.reason, d.message))
            else:
                keys.add(a.key)
                self.record_rejection(a.client, a.key, d.reason, d.message, open_round, d.header, a.size)
        if accepted:
            self._accept(accepted, open_round, started)
        if again:
            stored = self.state.find_updates([a.key for a in again])
            for a in again:
                if a.key in stored:
                    self._answer_again(a.client, a.key, stored[a.key], a.decision)

    def _reassemble(self, client: str, raw: bytes, open_round: OpenRound | None) -> bytes | None:
        """The complete envelope once `raw` completes one, else None (refusals recorded and answered)."""
        try:
            chunk = decode_chunk(raw, max_payload=self.validator.max_bytes)
            if not self._may_reassemble(client, chunk, open_round):
                self._refuse_stream(client, chunk, open_round)
                return None
            return self.reassembler.add(client, chunk)
        except ValidationError as exc:
            self.record_rejection(client, garbage_key(raw), exc.reason, exc.detail, open_round)
            return None

    def _may_reassemble(self, client: str, chunk: Chunk, open_round: OpenRound | None) -> bool:
        """Only senders selected in the open round may start a multi-chunk stream (reassembly holds memory);
        a single-chunk update is always decoded, and refused with its precise reason if it must be."""
        return chunk.count == 1 or self.reassembler.is_open(client, chunk.stream) or (
            open_round is not None and client in open_round.window.selected)

    def _refuse_stream(self, client: str, chunk: Chunk, open_round: OpenRound | None) -> None:
        """A multi-chunk stream nobody waits for: answered once (as before when it is a stored update being
        re-sent, which is how a device learns that a late retry was counted), its other chunks ignored."""
        now = time.monotonic()
        if now - self._answered.get((client, chunk.stream), -REANSWER_S) < REANSWER_S:
            return  # the other chunks of a send just answered
        self._note_answered(client, chunk.stream, now)
        previous = self.state.find_update(chunk.stream)
        if previous is not None and previous.client_id == client:
            self._answer_again(client, chunk.stream, previous, Decision("rejected"))
            return
        if open_round is None:
            reason, message = "no_open_round", "no round is open"
        else:
            reason, message = "not_selected", f"{client} is not selected in round {open_round.window.index}"
        key = "stream-" + sha256_hex(f"{client}/{chunk.stream}".encode())[:48]
        self.record_rejection(client, key, reason, message, open_round)

    def expire(self, open_round: OpenRound | None) -> None:
        """Record the chunk streams that did not complete in time as rejected (chunk_missing)."""
        for sender, stream, got, expected in self.reassembler.expire():
            key = "incomplete-" + sha256_hex(f"{sender}/{stream}".encode())[:48]
            self.record_rejection(sender, key, "chunk_missing",
                                  f"chunk stream {stream} incomplete: {got} of {expected} chunks", open_round)

    def _answer_again(self, client: str, key: str, previous: UpdateRecord, decision: Decision) -> None:
        status: AckStatus = "duplicate" if previous.status == "accepted" else "rejected"
        code = previous.reason.split(":", 1)[0] if previous.reason else None  # the code, as the first ack
        message = f"already received ({previous.reason})"[:500] if code else "already received"
        self._ack(client, Ack(key, status, decision.header.round if decision.header else None, code, message))

    def _accept(self, arrivals: list[Arrival], open_round: OpenRound, started: float) -> None:
        """Store the payloads, then the rows in one transaction; only then count and acknowledge them."""
        records = []
        payloads = [a.decision.payload for a in arrivals]
        places = self.store.put_updates(payloads, [a.decision.header.tensors_sha256 for a in arrivals])
        for a, payload, (pack, offset) in zip(arrivals, payloads, places):
            header = a.decision.header
            records.append(UpdateRecord(
                open_round.row_id, a.client, header.idempotency_key, "accepted", header.base_version,
                header.num_samples, list(header.label_counts), dict(header.metrics),
                payload_sha256=header.tensors_sha256,  # checked against the payload by decode_update
                payload_bytes=a.size, model=self._model_of(header), payload_pack=pack, payload_offset=offset,
                payload_length=len(payload) if pack else None))
        try:
            stored = self.state.add_updates(records)
        except RoundClosed:  # another server process began closing the round: nothing was stored
            for a in arrivals:
                self.record_rejection(a.client, a.key, "late", f"round {open_round.window.index} closed before the "
                                      "update was stored", open_round, a.decision.header, a.size)
            return
        elapsed = time.perf_counter() - started
        for a, inserted in zip(arrivals, stored):
            header = a.decision.header
            if inserted:
                open_round.add(a.client, a.decision.tensors, header.num_samples, header.label_counts, header.metrics,
                               a.size, self._model_of(header))
                metrics.BYTES_IN.labels(self.job).inc(a.size)
                metrics.INGEST_SECONDS.labels(self.job).observe(elapsed)
            if inserted:
                self._ack(a.client, Ack(header.idempotency_key, "accepted", header.round))
            else:  # stored meanwhile by another server process (this key, or another update of the client's)
                self._ack(a.client, Ack(header.idempotency_key, "duplicate", header.round, "already_accepted",
                                        f"{a.client} already has an accepted update in round {header.round}"))

    def _model_of(self, header: UpdateHeader) -> str | None:
        """The model an accepted update was trained with: the one it names, else the job's default."""
        if header.model is not msgspec.UNSET:
            return header.model
        return self.validator.models[0] if self.validator.models else None

    def record_rejection(self, client: str, key: str, reason: str, message: str, open_round: OpenRound | None,
                         header: UpdateHeader | None = None, size: int = 0) -> None:
        """Record the refused update (once per key, at most RECORDS_PER_SENDER per sender and round) and tell
        the client why."""
        round_id = self._round_for(header, open_round)
        if self._within_budget(round_id, client):
            log.warning("job %s: update from %s rejected (%s): %s", self.job, client, reason, message)
        else:
            round_id = None  # answered, not recorded: a sender cannot turn a flood into as many rows
        if round_id is not None:
            self.state.add_update(UpdateRecord(
                round_id, client, key, "rejected", header.base_version if header else 0,
                header.num_samples if header else 0, list(header.label_counts) if header else [],
                dict(header.metrics) if header else {}, reason=f"{reason}: {message}"[:2000], payload_bytes=size))
        self._ack(client, Ack(key, "rejected", header.round if header else None, reason, message[:500]))

    def _within_budget(self, round_id: int | None, client: str) -> bool:
        if len(self._records) > 100_000:
            self._records.clear()
        count = self._records.get((round_id, client), 0) + 1
        self._records[(round_id, client)] = count
        if count == RECORDS_PER_SENDER + 1:
            log.warning("job %s: %s sent more than %d refused updates this round; further ones are answered but "
                        "not recorded", self.job, client, RECORDS_PER_SENDER)
        return count <= RECORDS_PER_SENDER

    def _round_for(self, header: UpdateHeader | None, open_round: OpenRound | None) -> int | None:
        """The round a rejection is recorded against: the one it was sent for when that exists (a late update
        belongs to the round it missed, not to the one open now), else the open or latest round."""
        if header is not None:
            if open_round and (open_round.window.index, open_round.window.attempt) == (header.round,
                                                                                        header.attempt):
                return open_round.row_id
            found = self.state.round_id(header.round, header.attempt)
            if found is not None:
                return found
        return open_round.row_id if open_round else self.state.latest_round_id()

    def _note_answered(self, client: str, key: str, now: float) -> None:
        if len(self._answered) > 10_000:
            self._answered.clear()
        self._answered[(client, key)] = now

    def _ack(self, client: str, ack: Ack) -> None:
        self._note_answered(client, ack.idempotency_key, time.monotonic())
        metrics.UPDATES.labels(self.job, ack.status, ack.reason or "").inc()
        self.link.publish(self.topics.ack(client), ack.to_json())
