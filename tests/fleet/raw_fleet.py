"""Helpers shared by the fleet tests that drive a real server with raw MQTT connections acting as devices:
start a job, read its rounds and rows, publish crafted presences and updates, collect acks."""

from __future__ import annotations

import json
import time
import urllib.error
import uuid
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from broker_fixtures import connect_client, state_of, subscribe
from safetensors.torch import load as load_tensors
from sqlalchemy import func, select

from server_api.db import ClientUpdate, ModelVersion, Round, UpdateStatus, make_engine, make_session_factory
from server_api.db.store import ArtifactStore
from server_api.devfleet.fleet import Fleet
from server_api.rounds.runtime import JobRuntime
from shared.fsutil import sha256_hex
from shared.protocol.codec import convert
from shared.protocol.delta import apply_delta
from shared.protocol.job import JobConfig
from shared.protocol.messages import UpdateHeader, decode_ack, encode_update
from shared.protocol.tensors import encode_tensors, state_sha256
from shared.protocol.topics import Topics


def start_job(fleet: Fleet, config: dict | None = None, clients: bool = True) -> None:
    fleet.start_broker()
    fleet.start_server()
    fleet.request("POST", "/jobs", config or fleet.cfg.job_config())
    if clients:
        for k in range(fleet.cfg.clients):
            fleet.start_client(k)


def session_of(fleet: Fleet):
    url = fleet.cfg.db_url or f"sqlite:///{fleet.workdir / 'fedgen.db'}"
    return make_session_factory(make_engine(url, sqlite_begin="DEFERRED"))()


def wait_for(condition: Callable[[], object], timeout: float, interval: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout} s")


def rounds_of(fleet: Fleet) -> list[dict]:
    try:
        return fleet.rounds()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return []


def round_row(fleet: Fleet, index: int, attempt: int = 0) -> dict | None:
    return next((r for r in rounds_of(fleet) if r["index"] == index and r["attempt"] == attempt), None)


def round_updates(fleet: Fleet, index: int) -> list[dict]:
    try:
        detail = fleet.request("GET", f"/jobs/{fleet.job_id}/rounds/{index}")
    except Exception:  # the round may not exist yet
        return []
    return [u for attempt in detail["attempts"] for u in attempt["updates"]]


def health(fleet: Fleet) -> dict:
    """GET /health, also when it answers 503 (degraded)."""
    try:
        return fleet.request("GET", "/health")
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def assert_consistent_counts(fleet: Fleet) -> None:
    """Every closed round's num_updates is its number of accepted rows; no idempotency key counted twice."""
    with session_of(fleet) as s:
        keys = s.scalars(select(ClientUpdate.idempotency_key).where(
            ClientUpdate.job_id == fleet.job_id, ClientUpdate.status == UpdateStatus.ACCEPTED)).all()
        assert len(keys) == len(set(keys))
        for rnd in s.scalars(select(Round).where(Round.job_id == fleet.job_id)).all():
            accepted = s.scalar(select(func.count()).select_from(ClientUpdate).where(
                ClientUpdate.round_id == rnd.id, ClientUpdate.status == UpdateStatus.ACCEPTED))
            if rnd.status == "closed":
                assert rnd.num_updates == accepted, (rnd.index, rnd.attempt, rnd.num_updates, accepted)
            # a client has at most one accepted update per round
            clients = s.scalars(select(ClientUpdate.client_id).where(
                ClientUpdate.round_id == rnd.id, ClientUpdate.status == UpdateStatus.ACCEPTED)).all()
            assert len(clients) == len(set(clients))


def assert_delta_chain(fleet: Fleet) -> None:
    """Each version's stored state is the previous one plus its delta, bit for bit, and hashes to the
    state_sha256 published for it: nothing was lost or recomputed differently across the faults."""
    store = ArtifactStore(fleet.workdir / "artifacts")
    with session_of(fleet) as s:
        versions = s.scalars(select(ModelVersion).where(ModelVersion.job_id == fleet.job_id)
                             .order_by(ModelVersion.version)).all()
    previous = None
    for row in versions:
        blob = load_tensors(store.get(row.server_state_sha256))
        state = {k[len("model/"):]: v for k, v in blob.items() if k.startswith("model/")}
        if previous is not None:
            delta = load_tensors(store.get(row.delta_sha256))
            shared = apply_delta({k: previous[k] for k in delta}, delta)
            assert state_sha256(shared) == row.state_sha256, f"version {row.version} is not v-1 + delta"
            assert all(np.array_equal(shared[k], state[k].numpy()) for k in shared)
        previous = state


class RawMqtt:
    """A raw paho connection (persistent session) that records what it receives."""

    def __init__(self, port: int, client_id: str, clean_session: bool = False):
        self.client = connect_client(port, client_id, clean_session=clean_session)
        self.state = state_of(self.client)

    def subscribe(self, topic: str) -> None:
        subscribe(self.client, topic)

    def publish_all(self, items: list[tuple[str, bytes]], retain: bool = False, timeout: float = 120) -> None:
        infos = [self.client.publish(topic, payload, qos=1, retain=retain) for topic, payload in items]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge a publish"

    def acks(self) -> dict[str, list]:
        """idempotency key -> the acks received for it, in order."""
        out: dict[str, list] = defaultdict(list)
        with self.state.cond:
            messages = list(self.state.messages)
        for msg in messages:
            if msg.topic.endswith("/ack"):
                ack = decode_ack(msg.payload)
                out[ack.idempotency_key].append(ack)
        return out

    def latest(self, topic: str) -> bytes | None:
        msgs = self.state.on_topic(topic)
        return bytes(msgs[-1].payload) if msgs else None

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


def stored_tensors(store: ArtifactStore, row: ClientUpdate) -> dict[str, torch.Tensor]:
    """The tensors of an accepted update row, read from the store where the row says they are."""
    return load_tensors(store.get_update(row.payload_sha256, row.payload_pack, row.payload_offset,
                                         row.payload_length))


def upload_tensors(job_config: dict, value: float | None = None) -> dict[str, torch.Tensor]:
    """Tensors with the job's upload spec (the shared entries); constant `value`, else small random."""
    spec = JobRuntime(convert(JobConfig, job_config, "job")).upload_spec()
    rng = np.random.default_rng(0)
    return {name: torch.from_numpy(np.full(shape, value, dtype=dtype) if value is not None
                                   else (rng.standard_normal(shape) * 0.01).astype(dtype))
            for name, (shape, dtype) in spec.items()}


def craft_update(job: str, client: str, rnd: int, attempt: int, version: int, tensors: dict[str, torch.Tensor],
                 num_samples: int = 20, num_classes: int = 10,
                 metrics: dict[str, float] | None = None) -> tuple[UpdateHeader, bytes]:
    blob = encode_tensors(tensors)
    counts = [num_samples // num_classes] * num_classes
    counts[0] += num_samples - sum(counts)
    header = UpdateHeader(job=job, round=rnd, attempt=attempt, client=client, base_version=version,
                          num_samples=num_samples, label_counts=counts, idempotency_key=uuid.uuid4().hex,
                          tensors_sha256=sha256_hex(blob), metrics=metrics or {})
    return header, encode_update(header, blob)


def server_only_job(job_id: str, active: int, rounds: int = 1, **extra) -> dict:
    return {"id": job_id, "dataset": "mnist-subset", "rounds": rounds, "active": active, "min_online": active,
            "round_timeout_s": 300, "seed": 1, "algorithm": {"algorithm": "fedavg", "partial": True}, **extra}


def announce(raw: RawMqtt, job: str, clients: list[str]) -> None:
    topics = Topics(job)
    raw.publish_all([(topics.presence(c), json.dumps({"status": "online", "num_samples": 20}).encode())
                     for c in clients])
