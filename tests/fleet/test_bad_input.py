"""Malformed uploads against a live server over the real broker: each is refused with a specific reason code,
acknowledged `rejected` to the sender and recorded in the `updates` table, while the round goes on and the
honest clients' updates are accepted (docs/reliability.md, "Bad input").

One fleet (Mosquitto from broker/mosquitto/dev.conf, the server on SQLite, two real edge clients) is shared by
the whole corpus. A raw paho client announces presence for two extra ids (mal-a, mal-b) so that they are
selected too; it sends valid updates for them in round 0, the corpus in round 1 (so that round 0 is "late"),
then valid updates again so that round 1 closes and the job finishes. A second, partial-mode job checks that
theta^f is refused there.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from broker_fixtures import DEV_CONF, _require_mosquitto, connect_client, publish, state_of, subscribe
from sqlalchemy import select

from server_api.db import ClientUpdate, Round, UpdateStatus, make_engine, make_session_factory
from server_api.devfleet.broker_process import start_mosquitto
from server_api.devfleet.fleet import Fleet, FleetConfig
from server_api.rounds.intake import CHUNK_TIMEOUT_ENV
from server_api.rounds.runtime import JobRuntime
from shared.fsutil import sha256_hex
from shared.protocol.codec import convert
from shared.protocol.frames import CHUNK_MAGIC, UPDATE_MAGIC, encode_frame, split_chunks
from shared.protocol.job import JobConfig
from shared.protocol.messages import Presence, UpdateHeader, decode_ack, decode_round, encode_update
from shared.protocol.tensors import encode_tensors
from shared.protocol.topics import Topics

pytestmark = pytest.mark.slow
MAX_UPLOAD = 400_000  # the server's FEDGEN_MAX_UPLOAD_BYTES here (a full CNN update is ~110 kB)
CHUNK_TIMEOUT = 3.0  # the server's FEDGEN_CHUNK_TIMEOUT_S here
FAKES = ("mal-a", "mal-b")
NUM_CLASSES = 10
FLEET = dict(clients=2, rounds=2, active=4, algorithm="fedavg", alpha=1.0, samples_per_class=50, local_steps=3,
             seed=5, round_timeout_s=150, progress=False)
JOB_ID = FleetConfig(**FLEET).job_config()["id"]


@dataclass
class Live:
    fleet: Fleet
    attacker: object  # paho client
    topics: Topics
    state: dict[str, torch.Tensor]  # version-0 shared state: valid tensors for this job
    job: dict


def job_config(fleet: Fleet) -> dict:
    config = fleet.cfg.job_config()
    config.update(active=4, min_online=4, min_clients=2)  # the edge clients and the two fakes
    return config


def wait_for_round(attacker, topics: Topics, index: int, status: str = "open", timeout: float = 300):
    def found(msgs) -> bool:
        for m in msgs:
            if m.topic == topics.round and m.payload:
                ann = decode_round(m.payload)
                if ann.round == index and ann.status == status:
                    return True
        return False

    assert state_of(attacker).wait_for(found, timeout), f"round {index} not {status} within {timeout} s"
    for m in reversed(state_of(attacker).on_topic(topics.round)):
        if m.payload:
            return decode_round(m.payload)


def header_for(state: dict, client: str, round_index: int, version: int, blob: bytes, **overrides) -> dict:
    counts = [1] + [0] * (NUM_CLASSES - 1)
    header = UpdateHeader(job=overrides.pop("job", JOB_ID), round=round_index, attempt=0, client=client,
                          base_version=version, num_samples=1, label_counts=counts,
                          idempotency_key=f"k-{uuid.uuid4().hex}", tensors_sha256=sha256_hex(blob),
                          metrics={"train_loss": 0.1}).to_dict()
    header.update(overrides)
    return header


def send(live: Live, client: str, frames: list[bytes]) -> None:
    for frame in frames:
        publish(live.attacker, live.topics.update(client), frame)


def next_ack(live: Live, client: str, before: int, timeout: float = 30.0):
    topic = live.topics.ack(client)
    state = state_of(live.attacker)
    assert state.wait_for(lambda msgs: sum(m.topic == topic for m in msgs) > before, timeout), \
        f"no ack on {topic} within {timeout} s"
    return decode_ack(state.on_topic(topic)[before].payload)


def send_and_ack(live: Live, client: str, frames: list[bytes], timeout: float = 30.0):
    before = len(state_of(live.attacker).on_topic(live.topics.ack(client)))
    send(live, client, frames)
    return next_ack(live, client, before, timeout)


def valid_update(live: Live, client: str, round_index: int, version: int) -> bytes:
    blob = encode_tensors(live.state)
    header = header_for(live.state, client, round_index, version, blob)
    return encode_update(UpdateHeader(**header), blob)


def session_of(fleet: Fleet):
    return make_session_factory(make_engine(f"sqlite:///{fleet.workdir / 'fedgen.db'}"))()


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Live:
    _require_mosquitto()
    root = tmp_path_factory.mktemp("bad-input")
    saved = {k: os.environ.get(k) for k in ("FEDGEN_MAX_UPLOAD_BYTES", CHUNK_TIMEOUT_ENV)}
    os.environ["FEDGEN_MAX_UPLOAD_BYTES"] = str(MAX_UPLOAD)
    os.environ[CHUNK_TIMEOUT_ENV] = str(CHUNK_TIMEOUT)
    with start_mosquitto(DEV_CONF, root / "broker") as broker:
        fleet = Fleet(FleetConfig(**FLEET, broker_url=broker.url, workdir=root / "fleet"))
        attacker = None
        try:
            fleet.start_server()
            config = job_config(fleet)
            topics = Topics(config["id"])
            attacker = connect_client(broker.port, "attacker")
            subscribe(attacker, f"{topics.base}/clients/+/ack")
            subscribe(attacker, topics.round)
            fleet.request("POST", "/jobs", config)
            for fake in FAKES:
                publish(attacker, topics.presence(fake), Presence("online", 1, None, {}).to_json(), retain=True)
            for index in range(fleet.cfg.clients):
                fleet.start_client(index)
            state = JobRuntime(convert(JobConfig, config, "job")).global_state.shared_state()
            live = Live(fleet, attacker, topics, state, config)
            wait_for_round(attacker, topics, 0)
            for fake in FAKES:  # round 0: the fakes behave, so that it closes as soon as the edge clients upload
                assert send_and_ack(live, fake, split_chunks(valid_update(live, fake, 0, 0), "v0" + fake)).status \
                    == "accepted"
            ann = wait_for_round(attacker, topics, 1)
            assert set(FAKES) <= set(ann.selected) and ann.version == 1
            yield live
        finally:
            if attacker is not None:
                attacker.disconnect()
                attacker.loop_stop()
            fleet.stop()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# ---------------------------------------------------------------------------------------------------- the corpus
# Each case builds the MQTT payloads (a list of frames) sent on clients/<client>/update while round 1 (version 1)
# is open, from (live, envelope builder). `env(**header changes, body=..., tensors=...)` is a valid round-1
# envelope of mal-a with changes.
Case = Callable[[Live, Callable[..., bytes]], list[bytes]]


def chunks(envelope: bytes, stream: str | None = None) -> list[bytes]:
    return split_chunks(envelope, stream or f"s-{uuid.uuid4().hex}")


def frame(header: dict, body: bytes, magic: bytes = UPDATE_MAGIC) -> bytes:
    return encode_frame(magic, header, body)


def raw_header_frame(head: bytes, body: bytes = b"", magic: bytes = UPDATE_MAGIC) -> bytes:
    return magic + struct.pack(">I", len(head)) + head + body


def chunk_frame(stream: str, index: int, count: int, size: int, digest: str, body: bytes) -> bytes:
    return encode_frame(CHUNK_MAGIC, {"stream": stream, "index": index, "count": count, "size": size,
                                      "sha256": digest}, body)


def with_tensors(live: Live, change: Callable[[dict], None]) -> tuple[dict, bytes]:
    tensors = {k: v.clone() for k, v in live.state.items()}
    change(tensors)
    blob = encode_tensors(tensors)
    return header_for(live.state, "mal-a", 1, 1, blob), blob


def tensor_case(change: Callable[[dict], None]) -> Case:
    def build(live: Live, env) -> list[bytes]:
        header, blob = with_tensors(live, change)
        return chunks(frame(header, blob))
    return build


def first_float(tensors: dict) -> str:
    return sorted(tensors)[0]


def set_value(value: float) -> Callable[[dict], None]:
    def change(t: dict) -> None:
        t[first_float(t)].view(-1)[0] = value
    return change


def conflict(live: Live, env) -> list[bytes]:
    frames = split_chunks(env(), "s-conflict-" + uuid.uuid4().hex, chunk_size=50_000)
    other = bytearray(frames[0])
    other[-1] ^= 0xFF
    return [frames[0], bytes(other)]


def mismatch(live: Live, env) -> list[bytes]:
    envelope = env()
    stream = "s-mismatch-" + uuid.uuid4().hex
    frames = split_chunks(envelope, stream, chunk_size=50_000)
    digest = sha256_hex(envelope)
    return [frames[0], chunk_frame(stream, 1, len(frames), len(envelope) + 1, digest, b"x")]


def bad_total_hash(live: Live, env) -> list[bytes]:
    envelope = env()
    stream = "s-hash-" + uuid.uuid4().hex
    half = len(envelope) // 2
    return [chunk_frame(stream, 0, 2, len(envelope), "0" * 64, envelope[:half]),
            chunk_frame(stream, 1, 2, len(envelope), "0" * 64, envelope[half:])]


def missing_chunk(live: Live, env) -> list[bytes]:
    return split_chunks(env(), "s-missing-" + uuid.uuid4().hex, chunk_size=50_000)[:-1]


def missing_chunk_long_stream(live: Live, env) -> list[bytes]:
    """A 128-character stream name: its 'incomplete' key is longer than the stored key; sent twice, the second
    expiry must find the first row (it used to violate the unique key and could stop the job)."""
    return split_chunks(env(), "L" * 128, chunk_size=50_000)[:-1]


def truncated_header(live: Live, env) -> list[bytes]:
    envelope = env()
    (head_len,) = struct.unpack(">I", envelope[4:8])
    return chunks(envelope[:8 + head_len // 2])


def hash_mismatch(live: Live, env) -> list[bytes]:
    header, blob = with_tensors(live, lambda t: None)
    header["tensors_sha256"] = sha256_hex(b"something else")
    return chunks(frame(header, blob))


def undecodable_tensors(live: Live, env) -> list[bytes]:
    blob = b"\x10\x00\x00\x00\x00\x00\x00\x00{not safetensors"
    return chunks(frame(header_for(live.state, "mal-a", 1, 1, blob), blob))


def header_change(**changes) -> Case:
    return lambda live, env: chunks(env(**changes))


def header_edit(edit: Callable[[dict], None]) -> Case:
    def build(live: Live, env) -> list[bytes]:
        header, blob = with_tensors(live, lambda t: None)
        edit(header)
        return chunks(frame(header, blob))
    return build


def oversized_frame(live: Live, env) -> list[bytes]:
    envelope = env() + b"\x00" * (MAX_UPLOAD + 10_000)
    return split_chunks(envelope, "s-big-" + uuid.uuid4().hex, chunk_size=len(envelope))


def oversized_announced(live: Live, env) -> list[bytes]:
    return [chunk_frame("s-huge-" + uuid.uuid4().hex, 0, 64, 50 * 1024 * 1024, "0" * 64, b"x" * 1000)]


def not_selected(live: Live, env) -> list[bytes]:
    return chunks(env(client="stranger"))


CORPUS: list[tuple[str, str, str, Case]] = [  # (case id, client topic, expected reason, payloads)
    ("empty-payload", "mal-a", "bad_frame", lambda live, env: [b""]),
    ("garbage-bytes", "mal-a", "bad_frame", lambda live, env: [os.urandom(300)]),
    ("garbage-in-chunk", "mal-a", "bad_frame", lambda live, env: chunks(os.urandom(300))),
    ("empty-envelope", "mal-a", "bad_frame", lambda live, env: chunks(b"")),
    ("truncated-chunk-frame", "mal-a", "truncated", lambda live, env: [chunks(env())[0][:30]]),
    ("truncated-envelope-header", "mal-a", "truncated", truncated_header),
    ("truncated-chunk-body", "mal-a", "chunk_size", lambda live, env: [chunks(env())[0][:-100]]),
    ("wrong-magic", "mal-a", "bad_frame", lambda live, env: chunks(b"XXXX" + env()[4:])),
    ("header-length-overflow", "mal-a", "truncated",
     lambda live, env: chunks(UPDATE_MAGIC + struct.pack(">I", 2**32 - 1) + env()[8:])),
    ("header-not-json", "mal-a", "bad_json", lambda live, env: chunks(raw_header_frame(b"{not json", b"x"))),
    ("header-not-utf8", "mal-a", "bad_json", lambda live, env: chunks(raw_header_frame(b"\xff\xfe\xfd", b"x"))),
    ("header-not-object", "mal-a", "bad_json", lambda live, env: chunks(raw_header_frame(b"[1, 2, 3]", b"x"))),
    ("header-nan-literal", "mal-a", "bad_json",
     lambda live, env: chunks(raw_header_frame(b'{"round": NaN}', b"x"))),
    ("missing-field", "mal-a", "missing_field", header_edit(lambda h: h.pop("round"))),
    ("wrong-field-type", "mal-a", "bad_field", header_change(round="1")),
    ("boolean-for-int", "mal-a", "bad_field", header_change(base_version=True)),
    ("huge-base-version", "mal-a", "bad_field", header_change(base_version=2**40)),
    ("bad-client-id", "mal-a", "bad_id", header_change(client="a/b")),
    ("unknown-extra-field", "mal-a", "unexpected_field", header_change(shoe_size=44)),
    ("unknown-job", "mal-a", "unknown_job", header_change(job="other-job")),
    ("future-round", "mal-a", "unknown_round", header_change(round=7)),
    ("past-round", "mal-a", "late", header_change(round=0)),
    ("client-not-selected", "stranger", "not_selected", not_selected),
    ("client-id-mismatch", "mal-a", "client_mismatch", header_change(client="mal-b")),
    ("wrong-base-version", "mal-a", "wrong_version", header_change(base_version=0)),
    ("tensor-missing", "mal-a", "missing_tensor", tensor_case(lambda t: t.pop(sorted(t)[-1]))),
    ("extra-tensor", "mal-a", "unexpected_tensor", tensor_case(lambda t: t.update(backdoor=torch.zeros(3)))),
    ("wrong-shape", "mal-a", "bad_shape", tensor_case(lambda t: t.update({sorted(t)[0]: torch.zeros(7)}))),
    ("wrong-dtype", "mal-a", "bad_dtype", tensor_case(lambda t: t.update({sorted(t)[0]: t[sorted(t)[0]].double()}))),
    ("nan", "mal-a", "non_finite", tensor_case(set_value(float("nan")))),
    ("inf", "mal-a", "non_finite", tensor_case(set_value(float("-inf")))),
    ("absurd-magnitude", "mal-a", "absurd_magnitude", tensor_case(set_value(3e9))),
    ("undecodable-tensors", "mal-a", "undecodable", undecodable_tensors),
    ("negative-label-counts", "mal-a", "label_counts_negative",
     header_change(label_counts=[2, -1] + [0] * (NUM_CLASSES - 2))),
    ("label-counts-wrong-length", "mal-a", "label_counts_length", header_change(label_counts=[1])),
    ("label-counts-not-integers", "mal-a", "label_counts_type",
     header_change(label_counts=[1.0] + [0] * (NUM_CLASSES - 1))),
    ("label-counts-wrong-sum", "mal-a", "label_counts_sum", header_change(num_samples=5)),
    ("tensors-hash-mismatch", "mal-a", "tensors_hash", hash_mismatch),
    ("unknown-metric", "mal-a", "bad_metric", header_change(metrics={"accuracy": 0.99})),
    ("negative-metric", "mal-a", "bad_metric", header_change(metrics={"train_loss": -3.0})),
    ("metric-not-number", "mal-a", "bad_metric", header_change(metrics={"train_loss": "low"})),
    ("test-correct-above-count", "mal-a", "bad_metric",
     header_change(metrics={"test_correct": 9.0, "test_count": 4.0})),
    ("oversized-payload", "mal-a", "too_large", oversized_frame),
    ("oversized-announced-size", "mal-a", "too_large", oversized_announced),
    ("repeated-chunk-other-bytes", "mal-a", "chunk_conflict", conflict),
    ("inconsistent-chunk-headers", "mal-a", "chunk_mismatch", mismatch),
    ("bad-total-hash", "mal-a", "chunk_hash", bad_total_hash),
    ("missing-chunk", "mal-a", "chunk_missing", missing_chunk),
    ("missing-chunk-long-stream", "mal-a", "chunk_missing", missing_chunk_long_stream),
    ("missing-chunk-long-stream-again", "mal-a", "chunk_missing", missing_chunk_long_stream),
]


@pytest.mark.parametrize("client, reason, build", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_malformed_upload_is_refused_and_recorded(live: Live, client: str, reason: str, build: Case):
    def env(body: bytes | None = None, **changes) -> bytes:
        blob = encode_tensors(live.state) if body is None else body
        header = header_for(live.state, "mal-a", 1, 1, blob)
        header.update(changes)
        return frame(header, blob)

    frames = build(live, env)
    ack = send_and_ack(live, client, frames, timeout=CHUNK_TIMEOUT + 30)
    assert (ack.status, ack.reason) == ("rejected", reason), ack
    with session_of(live.fleet) as session:
        rows = session.scalars(select(ClientUpdate).where(ClientUpdate.job_id == live.job["id"],
                                                          ClientUpdate.idempotency_key == ack.idempotency_key)
                               ).all()
    assert len(rows) == 1, f"no row for {ack.idempotency_key}"
    assert rows[0].status == UpdateStatus.REJECTED and rows[0].reason.startswith(reason + ":"), rows[0].reason
    assert rows[0].client_id == client


def test_the_same_garbage_twice_is_answered_the_same(live: Live):
    payload = os.urandom(100)
    first = send_and_ack(live, "mal-b", [payload])
    second = send_and_ack(live, "mal-b", [payload])
    assert first.idempotency_key == second.idempotency_key and second.status == "rejected"
    assert second.reason == first.reason == "bad_frame"
    # the same for an envelope refused after reassembly (answered from the database the second time)
    frames = split_chunks(raw_header_frame(b"{oops", b"x"), "s-twice-" + uuid.uuid4().hex)
    first = send_and_ack(live, "mal-b", frames)
    second = send_and_ack(live, "mal-b", frames)
    assert first.idempotency_key == second.idempotency_key and second.status == "rejected"
    assert second.reason == first.reason == "bad_json"


def test_the_round_goes_on_and_the_job_finishes(live: Live):
    fleet, topics = live.fleet, live.topics
    ann = wait_for_round(live.attacker, topics, 1)
    assert ann.status == "open" and time.time() < ann.deadline, "the corpus outlived round 1"
    for fake in FAKES:
        ack = send_and_ack(live, fake, chunks(valid_update(live, fake, 1, 1)))
        assert ack.status == "accepted", ack
    wait_for_round(live.attacker, topics, 2, status="finished", timeout=300)
    deadline = time.monotonic() + 60
    while fleet.request("GET", f"/jobs/{live.job['id']}")["status"] != "finished":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    with session_of(fleet) as session:
        rounds = session.scalars(select(Round).where(Round.job_id == live.job["id"]).order_by(Round.index)).all()
        assert [(r.index, r.status) for r in rounds] == [(0, "closed"), (1, "closed")]
        assert all(r.accuracy is not None and r.num_updates == 4 for r in rounds)
        accepted = session.scalars(select(ClientUpdate).where(ClientUpdate.job_id == live.job["id"],
                                                              ClientUpdate.status == UpdateStatus.ACCEPTED)).all()
        assert sorted((u.client_id, session.get(Round, u.round_id).index) for u in accepted) == sorted(
            (c, r) for c in ("c0", "c1", *FAKES) for r in (0, 1))
        rejected = session.scalars(select(ClientUpdate).where(ClientUpdate.job_id == live.job["id"],
                                                              ClientUpdate.status == UpdateStatus.REJECTED)).all()
        assert {r.reason.split(":")[0] for r in rejected} >= {c[2] for c in CORPUS}
        assert not any(r.client_id in ("c0", "c1") for r in rejected), "an honest client was refused"


# ---------------------------------------------------------------------------------------------------- partial mode
def test_partial_mode_refuses_theta_f_and_accepts_theta_p(live: Live):
    config = {"id": "bad-input-partial", "dataset": live.job["dataset"], "rounds": 1, "active": 1,
              "min_clients": 1, "min_online": 1, "round_timeout_s": 120, "seed": 1,
              "algorithm": {"algorithm": "fedavg", "partial": True, "local_steps": 3}}
    topics = Topics(config["id"])
    subscribe(live.attacker, f"{topics.base}/clients/+/ack")
    subscribe(live.attacker, topics.round)
    live.fleet.request("POST", "/jobs", config)
    publish(live.attacker, topics.presence("mal-p"), Presence("online", 1, None, {}).to_json(), retain=True)
    wait_for_round(live.attacker, topics, 0)
    partial = Live(live.fleet, live.attacker, topics, live.state, config)

    full = encode_tensors(live.state)  # theta^f and theta^p
    header = header_for(live.state, "mal-p", 0, 0, full, job=config["id"])
    ack = send_and_ack(partial, "mal-p", chunks(frame(header, full)))
    assert (ack.status, ack.reason) == ("rejected", "unexpected_tensor"), ack
    with session_of(live.fleet) as session:
        row = session.scalars(select(ClientUpdate).where(ClientUpdate.idempotency_key == ack.idempotency_key)).one()
        assert row.status == UpdateStatus.REJECTED and row.reason.startswith("unexpected_tensor:")
        assert row.job_id == config["id"]

    predictor = encode_tensors({k: v for k, v in live.state.items() if k.startswith("predictor.")})
    header = header_for(live.state, "mal-p", 0, 0, predictor, job=config["id"])
    ack = send_and_ack(partial, "mal-p", chunks(frame(header, predictor)))
    assert ack.status == "accepted", ack
    wait_for_round(live.attacker, topics, 1, status="finished", timeout=120)


# ---------------------------------------------------------------------------------------------------- the edge side
# A fake "server" driven from the test publishes a retained manifest, round and artifact chunks built with
# shared.artifacts from a GlobalState; an EdgeClient runs in a thread; its upload is read off the broker.
EDGE_JOB = "edge-bad"
IMAGE_SHAPE = (1, 28, 28)


class FakeServer:
    def __init__(self, broker, algorithm: str = "fedavg"):
        from shared.algorithm.config import AlgorithmConfig
        from shared.algorithm.federation import GlobalState

        self.topics = Topics(EDGE_JOB)
        self.cfg = AlgorithmConfig(algorithm=algorithm, local_steps=2, batch_size=8)
        self.gs = GlobalState(self.cfg, IMAGE_SHAPE, NUM_CLASSES, seed=11)
        self.mqtt = connect_client(broker.port, "fake-server")
        subscribe(self.mqtt, self.topics.all_updates)

    def artifact(self, blob: bytes, sha: str | None = None):
        """Publish `blob` retained under `sha` (default: its real sha256); returns its ArtifactRef."""
        from shared.protocol.messages import ArtifactRef

        sha = sha or sha256_hex(blob)
        frames = split_chunks(blob, stream=sha, chunk_size=64 * 1024)
        for i, chunk in enumerate(frames):
            publish(self.mqtt, self.topics.artifact_chunk(sha, i), chunk, retain=True)
        return ArtifactRef(sha, len(blob), len(frames))

    def model_refs(self, state: dict) -> tuple:
        from shared.protocol.onnx_export import export_classifier_onnx, export_predictor_onnx

        model = self.artifact(export_classifier_onnx(self.gs.model, state, image_shape=IMAGE_SHAPE))
        return model, self.artifact(export_predictor_onnx(self.gs.model, state))

    def announce(self, version: int, shared: dict, model, predictor, round_index: int = 0, attempt: int = 0,
                 raw_changes: dict | None = None, **extra) -> None:
        """Publish a manifest (with `raw_changes` written over its JSON, as a faulty server might) and an open
        round selecting dev-x."""
        from shared.protocol.messages import Manifest, RoundAnnouncement
        from shared.protocol.tensors import state_sha256

        config = JobConfig(id=EDGE_JOB, dataset="mnist-subset", seed=11, chunk_size=64 * 1024, algorithm=self.cfg)
        manifest = Manifest(job=EDGE_JOB, version=version, round=round_index, state_sha256=state_sha256(shared),
                            model=model, predictor=predictor, num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE,
                            config=config, label_prior=[0.1] * NUM_CLASSES, **extra)
        payload = manifest.to_json()
        if raw_changes:
            payload = json.dumps({**json.loads(payload), **raw_changes}).encode()
        publish(self.mqtt, self.topics.manifest, payload, retain=True)
        ann = RoundAnnouncement(job=EDGE_JOB, round=round_index, attempt=attempt, version=version,
                                selected=["dev-x"], deadline=time.time() + 300)
        publish(self.mqtt, self.topics.round, ann.to_json(), retain=True)

    def wait_update(self, timeout: float = 120.0) -> UpdateHeader:
        """The client's first complete upload (acknowledged as accepted)."""
        from shared.protocol.frames import Reassembler, decode_chunk
        from shared.protocol.messages import Ack, decode_update

        topic, found = self.topics.update("dev-x"), []

        def complete(msgs) -> bool:
            r = Reassembler(max_payload=10**7)
            for m in msgs:
                if m.topic == topic:
                    envelope = r.add("dev-x", decode_chunk(m.payload, 10**7))
                    if envelope is not None:
                        found.append(decode_update(envelope, NUM_CLASSES, 10**7)[0])
                        return True
            return False

        assert state_of(self.mqtt).wait_for(complete, timeout), "the edge client uploaded nothing (complete)"
        header = found[-1]
        publish(self.mqtt, self.topics.ack("dev-x"), Ack(header.idempotency_key, "accepted", 0).to_json())
        return header

    def finish(self) -> None:
        from shared.protocol.messages import RoundAnnouncement

        ann = RoundAnnouncement(job=EDGE_JOB, round=1, attempt=0, version=0, selected=[], deadline=time.time(),
                                status="finished")
        publish(self.mqtt, self.topics.round, ann.to_json(), retain=True)

    def close(self) -> None:
        self.mqtt.disconnect()
        self.mqtt.loop_stop()


def tiny_data(image_shape, num_classes):
    import numpy as np

    from shared.data.partition import UserData

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (40, *image_shape)).astype(np.float32)
    y = np.arange(40, dtype=np.int64) % num_classes
    return UserData(-1, x[:32], y[:32], x[32:], y[32:], num_classes, key="dev-x")


@pytest.fixture
def edge(mosquitto_dev, tmp_path):
    import threading

    from edge_client.client import EdgeClient, EdgeOptions

    made: list = []

    def start(state_dir=None, **options):
        values = dict(broker=mosquitto_dev.url, job=EDGE_JOB, client_id="dev-x",
                      state_dir=str(state_dir or tmp_path / "edge"), data_loader=tiny_data, retry_s=2.0,
                      fetch_timeout_s=10.0)
        client = EdgeClient(EdgeOptions(**{**values, **options}))
        result: dict = {}
        thread = threading.Thread(target=lambda: result.setdefault("rc", client.run(max_seconds=240)), daemon=True)
        thread.start()
        made.append((thread, result))
        return client, thread, result

    yield start
    for thread, _ in made:
        thread.join(timeout=1)


def next_version(server: FakeServer) -> tuple[dict, dict, dict]:
    """(old shared state, delta, canonical new shared state) for version 0 -> 1."""
    from shared.protocol.delta import make_delta

    old = {k: v.clone() for k, v in server.gs.shared_state().items()}
    gen = torch.Generator().manual_seed(3)
    new = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in old.items()}
    delta, canonical = make_delta(old, new)
    return old, delta, canonical


def holding_version_0(server: FakeServer, state_dir, old: dict) -> None:
    from edge_client.state import DeviceState, job_state_dir

    device = DeviceState(job_state_dir(state_dir, EDGE_JOB))
    device.save_tensors("global", old)
    device.meta["version"] = 0
    device.save_meta()


def full_state(server: FakeServer, shared: dict) -> dict:
    state = {k: v.clone() for k, v in server.gs.state.items()}
    state.update({k: torch.as_tensor(v) for k, v in shared.items()})
    return state


@pytest.mark.parametrize("corruption", ["delta-hash", "artifact-bytes"])
def test_edge_refuses_a_corrupt_delta_and_takes_the_full_model(mosquitto_dev, edge, tmp_path, caplog, corruption):
    from edge_client.state import DeviceState, job_state_dir
    from shared.protocol.tensors import state_sha256

    server = FakeServer(mosquitto_dev)
    try:
        old, delta, canonical = next_version(server)
        holding_version_0(server, tmp_path / "edge", old)
        if corruption == "delta-hash":  # a well-formed delta whose application does not give state_sha256
            bad = {k: v.copy() for k, v in delta.items()}
            bad[sorted(bad)[0]].reshape(-1)[0] += 0.5
            delta_ref = server.artifact(encode_tensors(bad))
        else:  # the delta's bytes do not match the sha256 it is published under
            blob = encode_tensors(delta)
            delta_ref = server.artifact(blob[:-4] + b"\x00\x00\x00\x00", sha=sha256_hex(blob))
        model, predictor = server.model_refs(full_state(server, canonical))
        with caplog.at_level("INFO", logger="fedgen.edge"):
            server.announce(1, canonical, model, predictor, delta=delta_ref, delta_base_version=0)
            client, thread, result = edge()
            header = server.wait_update()
            server.finish()
            thread.join(timeout=60)
        assert header.base_version == 1 and header.round == 0
        assert "refused the delta" in caplog.text and "taking the full model" in caplog.text
        held = DeviceState(job_state_dir(tmp_path / "edge", EDGE_JOB)).load_tensors("global")
        assert state_sha256(held) == state_sha256(canonical)  # it holds the published version, not old + bad delta
        assert result.get("rc") == 0
    finally:
        server.close()


@pytest.mark.parametrize("runtime", ["torch", "lite"])
def test_edge_waits_while_the_model_is_garbage(mosquitto_dev, edge, caplog, runtime):
    server = FakeServer(mosquitto_dev)
    try:
        shared = server.gs.shared_state()
        _, predictor = server.model_refs(server.gs.state)
        garbage = server.artifact(b"\x08\x07garbage, not an ONNX model" * 10)
        with caplog.at_level("INFO", logger="fedgen.edge"):
            server.announce(0, shared, garbage, predictor)
            client, thread, result = edge(runtime=runtime)
            deadline = time.monotonic() + 60
            while "model ONNX refused" not in caplog.text:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.2)
            time.sleep(2)
            assert not state_of(server.mqtt).on_topic(server.topics.update("dev-x")), "trained on a garbage model"
            assert client.state.meta.get("version") is None
            model, predictor = server.model_refs(server.gs.state)  # the server publishes a good one
            server.announce(0, shared, model, predictor)
            header = server.wait_update()
            server.finish()
            thread.join(timeout=60)
        assert header.base_version == 0
        assert "cannot get version 0" in caplog.text
    finally:
        server.close()


@pytest.mark.parametrize("runtime", ["torch", "lite"])
def test_edge_trains_without_a_generator_that_is_a_classifier(mosquitto_dev, edge, caplog, runtime):
    server = FakeServer(mosquitto_dev, algorithm="fedgen")
    try:
        shared = server.gs.shared_state()
        model, predictor = server.model_refs(server.gs.state)
        with caplog.at_level("INFO", logger="fedgen.edge"):
            # the "generator" is the classifier's ONNX: well-formed, matching its sha256, the wrong interface
            server.announce(0, shared, model, predictor, generator=model)
            client, thread, result = edge(runtime=runtime)
            header = server.wait_update()
            server.finish()
            thread.join(timeout=60)
        assert header.base_version == 0
        assert "refused the generator" in caplog.text and "training without it" in caplog.text
        assert client.cache.generator_sha is None
    finally:
        server.close()


# ---------------------------------------------------------------------------------------- hostile manifests
def no_upload_for(server: FakeServer, seconds: float) -> bool:
    time.sleep(seconds)
    return not state_of(server.mqtt).on_topic(server.topics.update("dev-x"))


def test_edge_survives_manifests_and_data_that_do_not_fit(mosquitto_dev, edge, caplog):
    """A manifest whose image shape is not its dataset's is refused at decoding; this device's own data that
    does not fit the job is reported (presence) and the device waits: it never exits with a traceback, and
    trains once a manifest it can use arrives."""
    from shared.protocol.messages import decode_presence

    server = FakeServer(mosquitto_dev)
    try:
        shared = server.gs.shared_state()
        model, predictor = server.model_refs(server.gs.state)
        subscribe(server.mqtt, server.topics.presence("dev-x"))
        wrong = [None]

        def loader(image_shape, num_classes):  # first the device's data has the wrong shape
            data = tiny_data((1, 20, 20) if wrong[0] is None else image_shape, num_classes)
            wrong[0] = False
            return data

        with caplog.at_level("INFO", logger="fedgen.edge"):
            server.announce(0, shared, model, predictor, raw_changes={"image_shape": [3, 4096, 4096]})
            client, thread, result = edge(data_loader=loader)
            assert no_upload_for(server, 4) and thread.is_alive()
            assert "refused a message on manifest" in caplog.text
            server.announce(0, shared, model, predictor)  # a good manifest: the data still does not fit
            deadline = time.monotonic() + 30
            while "data_does_not_fit" not in caplog.text:
                assert time.monotonic() < deadline and thread.is_alive(), caplog.text
                time.sleep(0.2)
            def reported(msgs) -> bool:
                return any(decode_presence(m.payload).device.get("refused") == "the job: data_does_not_fit"
                           for m in msgs if m.topic == server.topics.presence("dev-x") and m.payload)

            assert state_of(server.mqtt).wait_for(reported, 10)  # the server is told why, in the presence
            server.announce(0, shared, model, predictor, attempt=1)
            header = server.wait_update()  # a new attempt: the device tries again, its data fits now
            server.finish()
            thread.join(timeout=60)
        assert header.attempt == 1 and result.get("rc") == 0
    finally:
        server.close()


def test_edge_refuses_an_assignment_past_the_partition(mosquitto_dev, edge, caplog):
    from shared.data.partition import PartitionSpec
    from shared.protocol.messages import Assignment

    server = FakeServer(mosquitto_dev)
    try:
        shared = server.gs.shared_state()
        model, predictor = server.model_refs(server.gs.state)
        spec = PartitionSpec(dataset="mnist-subset", alpha=1.0, users=2, samples_per_class=50, seed=0)
        with caplog.at_level("INFO", logger="fedgen.edge"):
            publish(server.mqtt, server.topics.assignment("dev-x"), Assignment(spec, 7).to_json(), retain=True)
            server.announce(0, shared, model, predictor)
            client, thread, result = edge(partition=spec, partition_index=None, data_loader=None)
            assert no_upload_for(server, 4) and thread.is_alive()
            assert "assigned partition index 7 outside 0..1" in caplog.text
            publish(server.mqtt, server.topics.assignment("dev-x"), Assignment(spec, 1).to_json(), retain=True)
            header = server.wait_update()
            server.finish()
            thread.join(timeout=60)
        assert header.num_samples > 0 and client.partition_index == 1
    finally:
        server.close()


@pytest.mark.parametrize("runtime", ["torch", "lite"])
def test_edge_trains_fedgen_without_a_generator_after_round_0(mosquitto_dev, edge, caplog, runtime):
    """A FedGen manifest of round 1 with no generator (or one that would allocate far more than the job's
    generator could): the device trains without it that round, as docs/algorithm.md says."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    server = FakeServer(mosquitto_dev, algorithm="fedgen")
    try:
        shared = server.gs.shared_state()
        model, predictor = server.model_refs(server.gs.state)
        # a 400-byte "generator" with the right interface whose Range allocates 8e9 numbers per sample
        noise = helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["N", 32])
        labels = helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 32])
        consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), n)
                  for n, v in (("zero", 0), ("limit", 8_000_000_000), ("one", 1))]
        graph = helper.make_graph([helper.make_node("Range", ["zero", "limit", "one"], ["r"]),
                                   helper.make_node("Identity", ["noise"], ["z"])], "g", [noise, labels], [z], consts)
        hog = server.artifact(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                              .SerializeToString())
        with caplog.at_level("INFO", logger="fedgen.edge"):
            server.announce(1, shared, model, predictor, round_index=1, generator=hog)
            client, thread, result = edge(runtime=runtime)
            header = server.wait_update()
            assert header.round == 1 and "refused the generator" in caplog.text
            server.finish()
            thread.join(timeout=60)
        assert result.get("rc") == 0
    finally:
        server.close()
