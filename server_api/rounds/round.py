"""The open round of a job: opening it (selection, deadline), resuming it after a restart, adding accepted
updates to it, and closing it (quorum, aggregation, the next model version)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

from server_api import metrics
from server_api.db.models import utcnow
from server_api.db.store import ArtifactStore
from server_api.rounds.publisher import VersionPublisher
from server_api.rounds.runtime import JobRuntime
from server_api.rounds.state import JobStore, RoundRecord, RoundResult, VersionRecord
from shared.algorithm.aggregate import capped_weights, select_by_rank, select_clients
from shared.algorithm.federation import RoundAccumulator
from shared.protocol.job import JobConfig
from shared.protocol.messages import MAX_LISTED_SELECTION
from shared.protocol.tensors import decode_tensors

log = logging.getLogger("fedgen.server")


@dataclass
class RoundWindow:
    """What the server accepts right now: one open round of one job."""

    job: str
    index: int
    attempt: int
    version: int
    selected: set[str]
    deadline: float  # unix time
    accepted: set[str] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        """Every selected client has an accepted update: nothing more can arrive."""
        return self.accepted >= self.selected


METRIC_MAX_SHARE = 0.5  # no device weighs more than this in a round's client-reported accuracy and loss


@dataclass
class OpenRound:
    """An open round: its row, its window, and what the accepted updates added up to so far."""

    row_id: int
    window: RoundWindow
    accumulator: RoundAccumulator | None  # None: the updates are summed from the store at close (clustered)
    bytes_up: int = 0
    samples: dict[str, int] = field(default_factory=dict)  # client -> its sample count (aggregation weight)
    opened_at: float = field(default_factory=time.monotonic)
    tests: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # client -> (correct, count, loss)
    models: dict[str, str | None] = field(default_factory=dict)  # client -> the model it trained
    frozen: bool = False  # its close had begun (status aggregating): it takes no more updates, close it now

    def add(self, client: str, tensors: Mapping[str, np.ndarray], num_samples: int, label_counts: list[int],
            metrics: Mapping[str, float], size: int, model: str | None = None, weight: float | None = None) -> None:
        if self.accumulator is not None:
            self.accumulator.add(tensors, num_samples, np.asarray(label_counts), client=client, weight=weight)
        self.window.accepted.add(client)
        self.bytes_up += size
        self.samples[client] = num_samples
        self.models[client] = model
        count = metrics.get("test_count", 0.0)
        if count > 0:
            self.tests[client] = (metrics.get("test_correct", 0.0), count, metrics.get("test_loss", 0.0))

    def client_metrics(self) -> tuple[float | None, float | None]:
        """(accuracy, loss) over the devices' own test splits, as they reported them: their test counts weigh
        them, but no device more than METRIC_MAX_SHARE of the round (one device claiming a huge test split
        cannot decide the figure)."""
        if not self.tests:
            return None, None
        clients = sorted(self.tests)
        weights = capped_weights([self.tests[c][1] for c in clients], METRIC_MAX_SHARE)
        total = sum(weights)
        accuracy = sum(w * self.tests[c][0] / self.tests[c][1] for w, c in zip(weights, clients)) / total
        loss = sum(w * self.tests[c][2] for w, c in zip(weights, clients)) / total
        return accuracy, loss

    def model_stats(self, default: str) -> dict[str, dict[str, float | int | None]]:
        """Per model: accepted updates, their samples, and the devices' own test results summed (accuracy =
        correct / tested, None when none reported a test)."""
        stats: dict[str, dict[str, float | int | None]] = {}
        for client in sorted(self.models):
            entry = stats.setdefault(self.models[client] or default,
                                     {"updates": 0, "samples": 0, "test_correct": 0.0, "test_count": 0.0})
            entry["updates"] += 1
            entry["samples"] += self.samples[client]
            correct, count, _ = self.tests.get(client, (0.0, 0.0, 0.0))
            entry["test_correct"] += correct
            entry["test_count"] += count
        for entry in stats.values():
            entry["accuracy"] = entry["test_correct"] / entry["test_count"] if entry["test_count"] else None
        return stats


class RoundKeeper:
    """Opens, resumes and closes the rounds of one job.

    `clustered` (several server processes on one database): any of them may have accepted a round's updates,
    so the round adds nothing up while it is open; closing it first freezes it (no process can store more),
    then sums every accepted update from the store in client-id order: the result does not depend on which
    process received which update, nor on the order they arrived in."""

    def __init__(self, config: JobConfig, state: JobStore, store: ArtifactStore, runtime: JobRuntime,
                 publisher: VersionPublisher, max_upload_bytes: int, clustered: bool = False):
        self.clustered = clustered
        self.config = config
        self.state = state
        self.store = store
        self.runtime = runtime
        self.publisher = publisher
        self.max_upload_bytes = max_upload_bytes
        self.last_failure: str | None = None  # why the last attempt failed

    def needed_online(self, index: int) -> int:
        """Clients that must be online before round `index` opens."""
        return self.config.min_online if index == 0 else self.config.min_clients

    def open(self, index: int, online: list[str]) -> OpenRound:
        """A new attempt at round `index` among the `online` clients (at least `needed_online` of them)."""
        attempt = self.state.attempt_count(index)
        count = min(self.config.active, len(online))
        if count > MAX_LISTED_SELECTION:  # too many to list: the announcement carries a rank threshold
            selected, _ = select_by_rank(online, count, self.config.seed, index, attempt)
        else:
            selected = select_clients(sorted(online), count, self.config.seed, index, attempt)
        deadline = utcnow() + timedelta(seconds=self.config.round_timeout_s)
        row_id = self.state.create_round(index, attempt, selected, deadline)
        opened = self._make_open(RoundRecord(row_id, index, attempt, "open", list(selected), deadline))
        log.info("job %s round %d (attempt %d): selected %d clients: %s", self.config.id, index, attempt,
                 len(selected), ", ".join(selected[:20]) + (" ..." if len(selected) > 20 else ""))
        self.announce(opened)
        return opened

    def resume(self, index: int) -> OpenRound | None:
        """The attempt of round `index` that was open (or aggregating) when the server stopped, with its
        accepted updates re-added from the store; None if there is none."""
        row = self.state.unfinished_round(index)
        if row is None:
            return None
        opened = self._make_open(row)
        if self.clustered:
            opened.window.accepted = self.state.accepted_clients(row.id)
        else:
            opened = self.reload(opened)
        opened.frozen = row.status == "aggregating"
        log.info("job %s resumed round %d (attempt %d) with %d accepted updates", self.config.id, row.index,
                 row.attempt, len(opened.window.accepted))
        self.announce(opened)
        return opened

    def reload(self, opened: OpenRound, weights: Mapping[str, float] | None = None) -> OpenRound:
        """The round with every accepted update added again from the store, in client-id order (with
        `weights`, client -> its weight in the mean instead of its sample count). What `opened` had summed
        is let go (a robust round's spilled updates deleted)."""
        if opened.accumulator is not None:
            opened.accumulator.close()
        fresh = OpenRound(opened.row_id, opened.window, self.runtime.new_accumulator(), opened_at=opened.opened_at)
        fresh.window.accepted = set()
        spec = self.runtime.upload_spec()
        for update in sorted(self.state.accepted_updates(opened.row_id), key=lambda u: u.client_id):
            tensors = decode_tensors(update.payload(self.store), spec, max_bytes=self.max_upload_bytes)
            fresh.add(update.client_id, tensors, update.num_samples, update.label_counts, update.metrics,
                      update.payload_bytes, update.model, weight=weights[update.client_id] if weights else None)
        return fresh

    def in_store(self, index: int, previous: OpenRound | None, with_accepted: bool = True) -> OpenRound | None:
        """The attempt of round `index` the database shows open, as a process that does not run the job's
        rounds sees it (clustered): its window, with (`with_accepted`) the clients any process has accepted
        so far added to what `previous` (the same round seen before) knew."""
        row = self.state.unfinished_round(index)
        if row is None or row.status != "open":
            return None
        if previous is None or previous.row_id != row.id:
            latest = self.state.latest_version()
            window = RoundWindow(self.config.id, row.index, row.attempt, latest.version if latest else 0,
                                 set(row.selected), row.deadline.timestamp())
            previous = OpenRound(row.id, window, None)
        if with_accepted:
            previous.window.accepted |= self.state.accepted_clients(row.id)
        return previous

    def announce(self, opened: OpenRound) -> None:
        w = opened.window
        self.publisher.announce(w.index, w.attempt, w.version, sorted(w.selected), w.deadline)

    def close(self, opened: OpenRound, bytes_down: Callable[[RoundWindow], int]) -> VersionRecord | None:
        """Close the round: failed without a quorum (None), else aggregate, train the generator and store the
        next version together with the round's result (returned, to be published)."""
        if self.clustered:  # freeze the round (no process stores more updates in it), then sum what is stored
            self.state.set_round_status(opened.row_id, "aggregating")
            opened = self.reload(opened)
        window, accepted = opened.window, len(opened.window.accepted)
        if accepted < self.config.min_clients:
            reason = f"quorum not reached: {accepted} of {self.config.min_clients} updates by the deadline"
            self.last_failure = reason
            log.warning("job %s round %d (attempt %d) failed: %s", self.config.id, window.index, window.attempt,
                        reason)
            self.state.finish_round(opened.row_id, RoundResult("failed", accepted, opened.bytes_up,
                                                               failure_reason=reason))
            self._count(opened, "failed")
            return None
        started = time.perf_counter()
        if not self.clustered:
            self.state.set_round_status(opened.row_id, "aggregating")
        opened = self._cap_weights(opened)
        down = bytes_down(window)
        artifacts, figures = self.runtime.close_round(opened.accumulator, window.index)
        client_accuracy, client_loss = opened.client_metrics()
        accuracy = figures["accuracy"] if figures["accuracy"] is not None else client_accuracy
        loss = figures["loss"] if figures["loss"] is not None else client_loss
        models = self.config.algorithm.allowed_models
        result = RoundResult("closed", accepted, opened.bytes_up, down, _finite(accuracy), _finite(loss),
                             _finite(figures["generator_loss"]), self.runtime.version,
                             model_stats=opened.model_stats(models[0]) if len(models) > 1 else None)
        record = self.publisher.store_version(self.runtime, artifacts, window.index, (opened.row_id, result))
        opened.accumulator.close()  # stored: a robust round's spilled updates are deleted now, not when collected
        metrics.CLOSE_SECONDS.labels(self.config.id).observe(time.perf_counter() - started)
        self._count(opened, "closed")
        log.info("job %s round %d closed: %d updates, version %d, accuracy %s (%.2f s)", self.config.id,
                 window.index, accepted, record.version, f"{accuracy:.4f}" if accuracy is not None else "n/a",
                 time.perf_counter() - started)
        return record

    def _count(self, opened: OpenRound, status: str) -> None:
        metrics.ROUNDS.labels(self.config.id, status).inc()
        metrics.ROUND_SECONDS.labels(self.config.id).observe(max(0.0, time.monotonic() - opened.opened_at))

    def _cap_weights(self, opened: OpenRound) -> OpenRound:
        """With the job's `max_client_weight`, the round with its updates re-added (from the store) with weights
        capped so that no client is more than that share of the mean; the round itself when none exceeds it."""
        cap = self.config.max_client_weight
        if cap is None or self.config.aggregation != "mean":
            return opened
        clients = sorted(opened.samples)
        weights = capped_weights([opened.samples[c] for c in clients], cap)
        if weights == [float(opened.samples[c]) for c in clients]:
            return opened
        log.info("job %s round %d: client weights capped at %.2f of the round", self.config.id,
                 opened.window.index, cap)
        return self.reload(opened, weights=dict(zip(clients, weights)))

    def _make_open(self, row: RoundRecord) -> OpenRound:
        window = RoundWindow(self.config.id, row.index, row.attempt, self.runtime.version, set(row.selected),
                             row.deadline.timestamp())
        return OpenRound(row.id, window, None if self.clustered else self.runtime.new_accumulator())


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None
