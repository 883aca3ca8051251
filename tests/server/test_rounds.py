"""Unit tests of the round engine (server_api/rounds/) on an in-memory JobStore and a recording link: intake
rules, round opening and closing, presence and partition assignment, and the per-message error boundary.
The same engine runs against real databases and a real broker in tests/fleet/."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
from memory_store import MemoryJobStore, RecordingLink

from server_api.db.store import ArtifactStore
from server_api.rounds.clients import ClientRegistry
from server_api.rounds.context import ServerContext
from server_api.rounds.intake import UpdateIntake, UpdateValidator
from server_api.rounds.publisher import VersionPublisher
from server_api.rounds.round import RoundKeeper, RoundWindow
from server_api.rounds.runtime import JobRuntime
from server_api.rounds.worker import JobWorker
from shared.data.partition import PartitionSpec
from shared.fsutil import sha256_hex
from shared.mqtt import Message
from shared.protocol.codec import convert
from shared.protocol.frames import split_chunks
from shared.protocol.job import JobConfig
from shared.protocol.messages import Presence, UpdateHeader, decode_ack, decode_assignment, encode_update
from shared.protocol.tensors import encode_tensors

JOB = "unit-job"
CONFIG = {"id": JOB, "dataset": "mnist-subset", "rounds": 3, "active": 2, "min_clients": 2, "seed": 5,
          "round_timeout_s": 60, "algorithm": {"algorithm": "fedavg", "model": "mlp", "local_steps": 2}}


class Engine:
    """The collaborators of one job's worker, wired as JobWorker wires them."""

    def __init__(self, tmp_path, **overrides):
        self.config = convert(JobConfig, {**CONFIG, **overrides}, "job")
        self.state = MemoryJobStore(JOB, self.config.stored_config())
        self.store = ArtifactStore(tmp_path / "artifacts")
        self.link = RecordingLink()
        self.runtime = JobRuntime(self.config)
        self.publisher = VersionPublisher(self.config, self.state, self.store, self.link, threading.Event())
        self.clients = ClientRegistry(JOB, self.state, self.link)
        self.validator = UpdateValidator(JOB, 10, self.runtime.upload_spec(), 1 << 24)
        self.intake = UpdateIntake(JOB, self.state, self.store, self.link, self.validator, chunk_timeout=1.0)
        self.rounds = RoundKeeper(self.config, self.state, self.store, self.runtime, self.publisher, 1 << 24)
        self.version0 = self.publisher.store_version(self.runtime, self.runtime.build_artifacts(None), None)

    def update(self, sender: str, opened, key: str | None = None, **changes) -> bytes:
        spec = self.runtime.upload_spec()
        tensors = {k: np.full(shape, 0.01, dtype) for k, (shape, dtype) in spec.items()}
        blob = encode_tensors(tensors)
        w = opened.window
        values = dict(job=JOB, round=w.index, attempt=w.attempt, client=sender, base_version=w.version,
                      num_samples=10, label_counts=[1] * 10, idempotency_key=key or uuid.uuid4().hex,
                      tensors_sha256=sha256_hex(blob), metrics={"test_correct": 3.0, "test_count": 4.0})
        values.update(changes)
        return encode_update(UpdateHeader(**values), blob)

    def send(self, client: str, envelope: bytes, opened) -> None:
        for chunk in split_chunks(envelope, "s-" + uuid.uuid4().hex, chunk_size=50_000):
            self.intake.receive(client, chunk, opened)

    def acks(self, client: str) -> list:
        return [decode_ack(p) for p in self.link.on(self.intake.topics.ack(client))]


@pytest.fixture
def engine(tmp_path) -> Engine:
    return Engine(tmp_path)


# ------------------------------------------------------------------------------------------------- intake
def test_accepted_update_is_stored_counted_and_acked_once(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b", "c"])
    client = sorted(opened.window.selected)[0]
    envelope = engine.update(client, opened, key="k" * 16)
    engine.send(client, envelope, opened)
    engine.send(client, envelope, opened)  # a retry of the same update
    assert [a.status for a in engine.acks(client)] == ["accepted", "duplicate"]
    assert opened.window.accepted == {client} and opened.accumulator.count == 1 and opened.bytes_up > 0
    record = engine.state.updates["k" * 16]
    assert record.status == "accepted" and record.payload(engine.store)


def test_a_second_update_of_a_client_is_a_duplicate_and_not_counted(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b"])
    engine.send("a", engine.update("a", opened), opened)
    engine.send("a", engine.update("a", opened), opened)
    assert [a.status for a in engine.acks("a")] == ["accepted", "duplicate"]
    assert engine.acks("a")[1].reason == "already_accepted" and opened.accumulator.count == 1


def test_a_batch_is_stored_together_and_each_update_answered_once(tmp_path):
    """Group commit: honest updates, a redelivery inside the batch, a second update of one client, a rejected
    and a garbage one, handed to the intake together: each answered as it would be alone, one row per key."""
    engine = Engine(tmp_path, active=4)
    opened = engine.rounds.open(0, ["a", "b", "c", "d"])
    assert opened.window.selected == {"a", "b", "c", "d"}
    first_a = engine.update("a", opened, key="a" * 16)
    batch = [("a", first_a), ("b", engine.update("b", opened, key="b" * 16)), ("a", first_a),
             ("a", engine.update("a", opened, key="A" * 16)), ("c", engine.update("c", opened, base_version=9)),
             ("d", b"not a frame"), ("d", engine.update("d", opened, key="d" * 16))]
    frames = [(c, chunk) for c, env in batch for chunk in split_chunks(env, "s-" + uuid.uuid4().hex, 1 << 20)]
    engine.intake.receive_many(frames, opened)
    by_key = {}
    for ack in engine.acks("a"):
        by_key.setdefault(ack.idempotency_key, []).append((ack.status, ack.reason))
    assert by_key == {"a" * 16: [("accepted", None), ("duplicate", None)],  # the redelivery after the commit
                      "A" * 16: [("duplicate", "already_accepted")]}
    assert [a.status for a in engine.acks("b")] == ["accepted"]
    assert [(a.status, a.reason) for a in engine.acks("c")] == [("rejected", "wrong_version")]
    assert [a.status for a in engine.acks("d")] == ["rejected", "accepted"]
    assert opened.window.accepted == {"a", "b", "d"} and opened.accumulator.count == 3
    assert engine.state.updates["a" * 16].status == "accepted" and "A" * 16 not in engine.state.updates
    assert engine.state.updates["d" * 16].status == "accepted"
    assert sum(u.status == "accepted" for u in engine.state.updates.values()) == 3


@pytest.mark.parametrize("changes, reason", [
    (dict(client="b"), "client_mismatch"),
    (dict(base_version=7), "wrong_version"),
    (dict(round=1), "unknown_round"),
    (dict(job="other"), "unknown_job"),
    (dict(label_counts=[2] * 10), "label_counts_sum"),
])
def test_rejections_are_recorded_once_and_answered(engine: Engine, changes: dict, reason: str):
    opened = engine.rounds.open(0, ["a", "b"])
    envelope = engine.update("a", opened, key="r" * 16, **changes)
    engine.send("a", envelope, opened)
    engine.send("a", envelope, opened)
    acks = engine.acks("a")
    assert [(a.status, a.reason) for a in acks] == [("rejected", reason)] * 2
    assert acks[0].idempotency_key == acks[1].idempotency_key  # one record: a header refused as a whole is keyed
    assert engine.state.updates[acks[0].idempotency_key].reason.startswith(reason)  # by the payload's hash
    assert len(engine.state.updates) == 1 and not opened.window.accepted


def test_not_selected_and_no_open_round(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b"])
    engine.send("z", engine.update("z", opened), opened)
    assert engine.acks("z")[0].reason == "not_selected"
    engine.send("a", engine.update("a", opened), None)
    assert engine.acks("a")[0].reason == "no_open_round"


def test_garbage_is_recorded_once_under_one_key(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b"])
    for _ in range(3):
        engine.intake.receive("a", b"garbage bytes", opened)
    keys = {a.idempotency_key for a in engine.acks("a")}
    assert len(keys) == 1 and [u.reason.split(":")[0] for u in engine.state.updates.values()] == ["bad_frame"]


def test_incomplete_stream_expires_as_chunk_missing(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b"])
    chunks = split_chunks(engine.update("a", opened), "stream-1", chunk_size=1000)
    for chunk in chunks[:-1]:
        engine.intake.receive("a", chunk, opened)
    time.sleep(1.1)
    engine.intake.expire(opened)
    assert [a.reason for a in engine.acks("a")] == ["chunk_missing"]


# ------------------------------------------------------------------------------------------------- rounds
def test_selection_is_seeded_and_attempts_count_up(engine: Engine):
    first = engine.rounds.open(0, ["d", "c", "b", "a"])
    again = engine.rounds.open(0, ["a", "b", "c", "d"])
    assert first.window.attempt == 0 and again.window.attempt == 1
    assert len(first.window.selected) == 2
    fresh = Engine(engine.store.root.parent / "again")  # the same seed, round and attempt elsewhere: same choice
    assert fresh.rounds.open(0, ["a", "b", "c", "d"]).window.selected == first.window.selected


def test_quorum_failure_fails_the_round_and_stores_no_version(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b"])
    engine.send("a", engine.update("a", opened), opened)
    assert engine.rounds.close(opened, lambda w: 0) is None
    result = engine.state.results[opened.row_id]
    assert result.status == "failed" and "quorum" in result.failure_reason and list(engine.state.versions) == [0]


def test_close_stores_the_next_version_with_the_round_result(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b"])
    for client in ("a", "b"):
        engine.send(client, engine.update(client, opened), opened)
    record = engine.rounds.close(opened, lambda w: 1234)
    assert record.version == 1 and record.delta and engine.state.current_round == 1
    result = engine.state.results[opened.row_id]
    assert (result.status, result.num_updates, result.bytes_down, result.model_version) == ("closed", 2, 1234, 1)
    assert result.accuracy == pytest.approx(0.75)  # the clients' reported 3 of 4, no server-side evaluation
    shared = engine.runtime.global_state.shared_state()
    assert all(np.allclose(v.numpy(), 0.01) for v in shared.values())  # the mean of two identical updates


def test_resume_readds_accepted_updates(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b"])
    engine.send("a", engine.update("a", opened), opened)
    resumed = engine.rounds.resume(0)
    assert resumed.row_id == opened.row_id and resumed.window.accepted == {"a"} and resumed.accumulator.count == 1
    assert not resumed.frozen
    engine.state.set_round_status(opened.row_id, "aggregating")  # the server died while closing it
    frozen = engine.rounds.resume(0)
    assert frozen.frozen and frozen.window.accepted == {"a"}  # closed at once, not at the deadline


# ------------------------------------------------------------------------------------------------- clients
def test_presence_and_partition_assignment(engine: Engine):
    spec = PartitionSpec(dataset="mnist-subset", alpha=0.1, users=2, seed=0)
    for client in ("a", "b", "c"):
        engine.clients.receive(client, Presence("online", 10, 0, {}, spec).to_json())
    assignments = {c: decode_assignment(engine.link.on(engine.clients.topics.assignment(c))[-1])
                   for c in ("a", "b", "c")}
    assert sorted(a.index for a in assignments.values() if a.index is not None) == [0, 1]
    surplus = [a for a in assignments.values() if a.index is None]
    assert len(surplus) == 1 and "held by other devices" in surplus[0].reason
    engine.clients.receive("a", Presence("offline").to_json())
    assert set(engine.clients.online) == {"b", "c"} and engine.state.clients["a"].status == "offline"
    engine.clients.receive("b", Presence("online", 10, 0, {}, spec).to_json())  # asks again: keeps its index
    assert decode_assignment(engine.link.on(engine.clients.topics.assignment("b"))[-1]).index == \
        assignments["b"].index


# ------------------------------------------------------------------------------------------------- boundary
class Exploding:
    def receive_many(self, *args):
        raise RuntimeError("a bug in a handler")


def test_a_message_that_breaks_a_handler_is_refused_and_the_worker_goes_on(tmp_path):
    worker = JobWorker(JOB, ServerContext(None, ArtifactStore(tmp_path), RecordingLink()))  # type: ignore[arg-type]
    worker.clients, worker.intake = Exploding(), Exploding()
    worker._handle(Message(f"fedgen/v1/{JOB}/clients/dev-a/presence", b"{}", True))
    worker._handle(Message(f"fedgen/v1/{JOB}/clients/dev-a/update", b"x", False))
    worker._handle(Message(f"fedgen/v1/{JOB}/clients/{'x' * 200}/presence", b"{}", True))  # not an id
    assert worker.refused == {"internal_error": 2, "bad_topic": 1}


def test_a_repeated_presence_is_not_written_again(engine: Engine):
    for _ in range(50):
        engine.clients.receive("a", Presence("online", 10, 0).to_json())
    assert engine.state.client_writes == 1
    engine.clients.receive("a", Presence("online", 10, 1).to_json())  # a change is written at once
    assert engine.state.client_writes == 2 and engine.state.clients["a"].state_version == 1


def test_an_unselected_multi_chunk_stream_is_refused_at_once_and_holds_nothing(engine: Engine):
    opened = engine.rounds.open(0, ["a", "b"])
    chunks = split_chunks(engine.update("z", opened), "s-z", chunk_size=1000)
    for chunk in chunks:
        engine.intake.receive("z", chunk, opened)
    acks = engine.acks("z")
    assert [(a.status, a.reason) for a in acks] == [("rejected", "not_selected")]  # once for the whole send
    assert engine.intake.reassembler.held_bytes == 0


def test_rejection_rows_per_sender_and_round_are_bounded(engine: Engine):
    from server_api.rounds.intake import RECORDS_PER_SENDER

    opened = engine.rounds.open(0, ["a", "b"])
    for i in range(3 * RECORDS_PER_SENDER):
        engine.intake.receive("a", b"garbage %d" % i, opened)
    assert len(engine.acks("a")) == 3 * RECORDS_PER_SENDER  # every one answered
    assert len(engine.state.updates) == RECORDS_PER_SENDER  # but not every one stored


def test_the_partition_index_of_a_device_gone_offline_is_released(engine: Engine):
    spec = PartitionSpec(dataset="mnist-subset", alpha=0.1, users=2, seed=0)
    engine.clients.release_after_s = 0.0
    index = {}
    for client in ("p0", "p1"):
        engine.clients.receive(client, Presence("online", 10, 0, {}, spec).to_json())
    engine.clients.receive("p0", Presence("offline").to_json())
    time.sleep(0.01)
    engine.clients.receive("p2", Presence("online", 10, 0, {}, spec).to_json())
    for client in ("p0", "p1", "p2"):
        index[client] = decode_assignment(engine.link.on(engine.clients.topics.assignment(client))[-1]).index
    assert (index["p0"], index["p1"], index["p2"]) == (0, 1, 0)  # p2 took the index p0 left behind
    engine.clients.receive("p0", Presence("online", 10, 0, {}, spec).to_json())  # p0 back: nothing free
    back = decode_assignment(engine.link.on(engine.clients.topics.assignment("p0"))[-1])
    assert back.index is None and back.reason


def test_bytes_down_counts_what_each_device_fetches(engine: Engine):
    """Delta for a device one version behind; in partial mode the predictor for one further behind (its theta^f
    is its own); the full model for a new device."""
    opened = engine.rounds.open(0, ["a", "b"])
    for client in ("a", "b"):
        engine.send(client, engine.update(client, opened), opened)
    record = engine.rounds.close(opened, lambda w: 0)
    sizes = {kind: engine.store.size(sha) for kind, sha in record.blobs().items()}
    for client, held in (("new", None), ("behind", 0), ("current", 1)):
        engine.clients.online[client] = Presence("online", 10, held)
    window = RoundWindow(JOB, 1, 0, 2, {"new", "behind"}, 0.0)  # training version 2, whose delta base is 1
    version2 = record.__class__(**{**record.__dict__, "version": 2})
    assert engine.clients.bytes_down(window, version2, engine.store) == 2 * sizes["model_onnx"]
    assert engine.clients.bytes_down(window, version2, engine.store, partial=True) == \
        sizes["model_onnx"] + sizes["predictor_onnx"]
    window.selected = {"current"}  # held version 1 = 2 - 1: the delta
    assert engine.clients.bytes_down(window, version2, engine.store) == sizes["delta"]


def test_a_round_of_100000_devices_is_announced_in_a_few_bytes(tmp_path):
    """Past MAX_LISTED_SELECTION, the server selects by rank and announces the threshold: the retained round
    message stays small, and each device's own check agrees with the server's selection, for all of them."""
    from shared.protocol.messages import MAX_LISTED_SELECTION, decode_round

    engine = Engine(tmp_path, active=100_000, min_clients=1)
    online = [f"dev-{i:06d}" for i in range(120_000)]
    opened = engine.rounds.open(0, online)
    selected = opened.window.selected
    assert len(selected) == 100_000 and selected <= set(online)
    (payload,) = engine.link.on(engine.rounds.publisher.topics.round)
    assert len(payload) < 1024
    ann = decode_round(payload)  # as a device decodes it
    assert ann.selected == [] and ann.selected_count == 100_000
    assert [c for c in online if ann.selects(c)] == sorted(selected)
    (row,) = engine.state.rounds.values()
    assert set(row.selected) == selected  # the server still records who was selected

    small = Engine(tmp_path / "small", active=MAX_LISTED_SELECTION, min_clients=1)
    listed = small.rounds.open(0, online[:2000])
    ann = decode_round(small.link.on(small.rounds.publisher.topics.round)[-1])
    assert sorted(ann.selected) == sorted(listed.window.selected) and ann.selection_threshold is None
