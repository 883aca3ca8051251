"""Hostile devices against a live server, the real broker and a real database (docs/reliability.md, "Hostile
devices"): no single message may fail a job, no device may lock others out of a round or dominate it with
what it says about itself, and the server never hands out a partition index that does not exist.

Each test runs a server-only job whose "devices" are raw MQTT connections (tests/fleet/raw_fleet.py), so that
they can send exactly what a buggy or compromised device would. Identity binding and the share group are
checked on the production Mosquitto config in tests/broker/test_broker.py; the device side in
tests/fleet/test_bad_input.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from raw_fleet import (
    RawMqtt,
    announce,
    craft_update,
    round_row,
    server_only_job,
    session_of,
    start_job,
    upload_tensors,
    wait_for,
)
from sqlalchemy import select

from server_api.db import Client, ClientUpdate, Job
from server_api.db.store import ArtifactStore
from server_api.devfleet.fleet import Fleet, FleetConfig
from server_api.rounds.intake import RECORDS_PER_SENDER
from shared.data.partition import PartitionSpec
from shared.protocol.frames import CHUNK_MAGIC, encode_frame, split_chunks
from shared.protocol.messages import Presence, decode_assignment
from shared.protocol.topics import Topics

pytestmark = pytest.mark.slow


@pytest.fixture
def server(fleet_maker, db_url):  # noqa: ANN001, ANN201 - a server (no devices) on SQLite or PostgreSQL
    def start(job: dict) -> Fleet:
        fleet = fleet_maker(FleetConfig(clients=0, db_url=db_url, progress=False))
        start_job(fleet, job, clients=False)
        fleet.cfg.job_config = lambda: job  # type: ignore[method-assign] - Fleet.job_id/rounds() use it
        return fleet
    return start


def send(raw: RawMqtt, job: str, client: str, envelope: bytes, key: str, chunk_size: int = 256 * 1024) -> None:
    raw.publish_all([(Topics(job).update(client), c) for c in split_chunks(envelope, key, chunk_size=chunk_size)])


def acks_of(raw: RawMqtt, key: str, n: int = 1) -> list:
    return wait_for(lambda: len(raw.acks().get(key, [])) >= n and raw.acks()[key], timeout=60, interval=0.2,
                    what=f"{n} ack(s) for {key}")


def rows(fleet: Fleet, client: str | None = None) -> list[ClientUpdate]:
    with session_of(fleet) as s:
        query = select(ClientUpdate).where(ClientUpdate.job_id == fleet.job_id)
        if client is not None:
            query = query.where(ClientUpdate.client_id == client)
        return list(s.scalars(query))


def job_status(fleet: Fleet) -> str:
    with session_of(fleet) as s:
        return s.get(Job, fleet.job_id).status.value


# ------------------------------------------------------------------------------------------- 1. one message
def test_no_presence_or_topic_can_end_a_job(server, raw_mqtt, db_url):  # noqa: ANN001
    """Presences with values the columns cannot hold (2^31 in INTEGER on PostgreSQL), an overlong client id
    taken from a topic, garbage and a deeply nested document, all retained: each is refused and logged, and
    the job runs its round and finishes."""
    job = "hostile-presence"
    fleet = server(server_only_job(job, 2, min_online=2))
    topics = Topics(job)
    raw = raw_mqtt("hostile-presence")
    raw.subscribe(f"{topics.base}/clients/+/ack")
    base = topics.base
    raw.publish_all([
        (topics.presence("evil"), json.dumps({"status": "online", "num_samples": 2**31, "version": 2**31}).encode()),
        (f"{base}/clients/{'x' * 200}/presence", json.dumps({"status": "online", "num_samples": 5}).encode()),
        (f"{base}/clients/{'y' * 200}/update", b"FGC1 garbage"),
        (topics.presence("garbage"), b"\xff\xfe not json"),
        (topics.presence("nested"), b'{"status": "online", "device": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        (topics.presence("typed"), json.dumps({"status": "online", "num_samples": "20", "device": {"a": [1]}})
         .encode()),
    ], retain=True)
    announce(raw, job, ["d0", "d1"])
    wait_for(lambda: round_row(fleet, 0), timeout=120, interval=0.3, what="round 0 open")
    tensors = upload_tensors(fleet.cfg.job_config())
    for client in ("d0", "d1"):
        header, envelope = craft_update(job, client, 0, 0, 0, tensors)
        send(raw, job, client, envelope, header.idempotency_key)
    summary = fleet.wait(timeout=120)
    assert summary["job_status"] == "finished" and summary["rounds"][0]["num_updates"] == 2
    with session_of(fleet) as s:
        clients = {c.client_id: c for c in s.scalars(select(Client).where(Client.job_id == job))}
    assert set(clients) == {"d0", "d1"}  # none of the hostile presences made it into the table
    log = (fleet.workdir / "server.log").read_text()
    assert "refused a presence message from evil" in log and "Traceback" not in log


# ------------------------------------------------------------------------------------------- 4. lockout
def test_one_device_cannot_lock_the_others_out_of_a_round(server, raw_mqtt, db_url):  # noqa: ANN001
    """A selected device opens hundreds of incomplete chunk streams, and an unselected one starts multi-chunk
    streams: the first gets a few streams (per-sender limit) and a bounded number of rejection rows, the
    second is refused at once; the honest devices' multi-chunk updates are accepted and the round closes."""
    job = "hostile-streams"
    fleet = server(server_only_job(job, 3, min_online=3, min_clients=2, round_timeout_s=20))
    topics = Topics(job)
    raw = raw_mqtt("hostile-streams")
    raw.subscribe(f"{topics.base}/clients/+/ack")
    announce(raw, job, ["d0", "d1", "evil"])
    wait_for(lambda: round_row(fleet, 0), timeout=120, interval=0.3, what="round 0 open")
    announce(raw, job, ["stranger"])  # online after the selection of round 0: not selected
    half = [encode_frame(CHUNK_MAGIC, {"stream": f"s{i:04d}", "index": 0, "count": 2, "size": 20,
                                       "sha256": "0" * 64}, b"x" * 10) for i in range(300)]
    raw.publish_all([(topics.update("evil"), frame) for frame in half])
    raw.publish_all([(topics.update("stranger"), frame) for frame in half[:50]])
    tensors = upload_tensors(fleet.cfg.job_config())
    keys = {}
    for client in ("d0", "d1"):
        header, envelope = craft_update(job, client, 0, 0, 0, tensors)
        send(raw, job, client, envelope, header.idempotency_key, chunk_size=1000)  # many chunks each
        keys[client] = header.idempotency_key
    for client, key in keys.items():
        assert acks_of(raw, key)[0].status == "accepted", client
    wait_for(lambda: len(raw.acks()) >= 2 + 1, timeout=60, what="the stranger's refusal")
    reasons = {a.reason for acks in raw.acks().values() for a in acks if a.status == "rejected"}
    assert {"too_many_streams", "not_selected"} <= reasons
    summary = fleet.wait(timeout=200)  # the round closes at its deadline (evil never completes)
    assert summary["job_status"] == "finished" and summary["rounds"][0]["num_updates"] == 2
    assert len(rows(fleet, "evil")) <= RECORDS_PER_SENDER + 4  # not one row per hostile stream
    assert len(rows(fleet, "stranger")) <= RECORDS_PER_SENDER


# ------------------------------------------------------------------------------------------- 5. partitions
def test_surplus_devices_are_told_no_partition_is_free(server, raw_mqtt, db_url):  # noqa: ANN001
    job = "hostile-partitions"
    server(server_only_job(job, 5, min_online=5))
    topics = Topics(job)
    raw = raw_mqtt("hostile-partitions")
    spec = PartitionSpec(dataset="mnist-subset", alpha=0.1, users=2, seed=0)
    devices = ["p0", "p1", "p2"]
    for d in devices:
        raw.subscribe(topics.assignment(d))
    raw.publish_all([(topics.presence(d), Presence("online", 10, None, {}, spec).to_json()) for d in devices],
                    retain=True)
    got = wait_for(lambda: all(raw.latest(topics.assignment(d)) for d in devices) and
                   {d: decode_assignment(raw.latest(topics.assignment(d))) for d in devices}, timeout=60,
                   what="three assignments")
    indices = sorted(a.index for a in got.values() if a.index is not None)
    assert indices == [0, 1]
    (surplus,) = [a for a in got.values() if a.index is None]
    assert "held by other devices" in surplus.reason


# ------------------------------------------------------------------------------------------- 6. self-reports
def test_self_reports_are_bounded_and_cannot_dominate(server, raw_mqtt, db_url):  # noqa: ANN001
    """Claims beyond the job's max_client_samples, beyond the device's announced data, or test counts of 10^12
    are refused; with max_client_weight one device's share of the mean is capped, and its reported accuracy
    cannot decide the round's."""
    job = "hostile-counts"
    fleet = server(server_only_job(job, 3, min_online=3, max_client_samples=1000, max_client_weight=0.5))
    topics = Topics(job)
    raw = raw_mqtt("hostile-counts")
    raw.subscribe(f"{topics.base}/clients/+/ack")
    raw.publish_all([(topics.presence(d), json.dumps({"status": "online", "num_samples": n}).encode())
                     for d, n in (("d0", 20), ("d1", 20), ("big", 1000))], retain=True)
    wait_for(lambda: round_row(fleet, 0), timeout=120, interval=0.3, what="round 0 open")
    config = fleet.cfg.job_config()
    refused = {}
    for name, samples, metrics in (("too-many", 5000, {}), ("unannounced", 1000, {}),
                                   ("tested", 20, {"test_correct": 1e12, "test_count": 1e12})):
        client = "big" if name != "tested" else "d0"
        announced = {"too-many": "big", "unannounced": "d0"}.get(name, client)
        header, envelope = craft_update(job, announced, 0, 0, 0, upload_tensors(config), num_samples=samples,
                                        metrics=metrics)
        send(raw, job, announced, envelope, header.idempotency_key)
        refused[name] = acks_of(raw, header.idempotency_key)[0]
    assert refused["too-many"].reason == "too_many_samples"
    assert refused["unannounced"].reason == "samples_exceed_announced"
    assert refused["tested"].reason == "bad_metric"
    honest, hostile = upload_tensors(config, 0.0), upload_tensors(config, 1.0)
    for client, tensors, samples, tested, accuracy in (("d0", honest, 20, 10, 0.1), ("d1", honest, 20, 10, 0.1),
                                                       ("big", hostile, 1000, 1000, 1.0)):
        metrics = {"test_correct": accuracy * tested, "test_count": float(tested)}
        header, envelope = craft_update(job, client, 0, 0, 0, tensors, num_samples=samples, metrics=metrics)
        send(raw, job, client, envelope, header.idempotency_key)
        assert acks_of(raw, header.idempotency_key)[0].status == "accepted", client
    summary = fleet.wait(timeout=120)
    record = summary["rounds"][0]
    assert record["num_updates"] == 3
    # the big device weighs half of the accuracy (uncapped: 1000 of 1020 tested images, 0.98)
    assert record["accuracy"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.1)
    model = latest_shared_state(fleet)
    assert all(np.allclose(v, 0.5) for v in model.values())  # capped at half the mean (uncapped: 0.96)
    assert job_status(fleet) == "finished"


def latest_shared_state(fleet: Fleet) -> dict[str, np.ndarray]:
    from safetensors.torch import load as load_tensors

    from server_api.db import ModelVersion

    with session_of(fleet) as s:
        row = s.scalars(select(ModelVersion).where(ModelVersion.job_id == fleet.job_id)
                        .order_by(ModelVersion.version.desc())).first()
    state = load_tensors(ArtifactStore(fleet.workdir / "artifacts").get(row.server_state_sha256))
    return {k: state[f"model/{k}"].numpy() for k in upload_tensors(fleet.cfg.job_config())}
