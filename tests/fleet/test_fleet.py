"""The fleet end to end: real Mosquitto (started by the suite), the server on SQLite, edge-client processes."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from raw_fleet import stored_tensors
from sqlalchemy import select

from edge_client.state import DeviceState, job_state_dir
from server_api.db import ClientUpdate, Round, UpdateStatus, make_engine, make_session_factory
from server_api.db.store import ArtifactStore
from server_api.devfleet.fleet import Fleet, FleetConfig
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.models import build_model
from shared.data.datasets import load_dataset
from shared.data.partition import PartitionSpec, partition
from shared.simulation import SimulationConfig, run_simulation

pytestmark = pytest.mark.slow
PARITY_TOLERANCE = 0.02  # accuracy, per round (docs/protocol.md: what differs between the two runs)


def fleet_config(**overrides) -> FleetConfig:
    base = dict(clients=4, rounds=4, active=2, alpha=1.0, samples_per_class=200, local_steps=5, seed=3,
                round_timeout_s=90, progress=False)
    return FleetConfig(**{**base, **overrides})


@pytest.fixture
def fleet_factory(fleet_maker):
    return lambda **overrides: fleet_maker(fleet_config(**overrides))


def session_of(fleet: Fleet):
    return make_session_factory(make_engine(f"sqlite:///{fleet.workdir / 'fedgen.db'}"))()


def test_fleet_matches_simulation_and_records_everything(fleet_factory):
    fleet = fleet_factory()
    summary = fleet.run(timeout=900)
    assert summary["job_status"] == "finished"
    accuracies = [r["accuracy"] for r in summary["rounds"]]
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2, 3]
    assert accuracies[-1] > accuracies[0] and accuracies[-1] > 0.3  # chance is 0.1

    cfg = fleet.cfg
    sim = run_simulation(SimulationConfig(
        dataset=cfg.dataset, rounds=cfg.rounds, active=cfg.active, seed=cfg.seed,
        partition=PartitionSpec(users=cfg.clients, alpha=cfg.alpha, samples_per_class=cfg.samples_per_class,
                                  seed=cfg.seed),
        algorithm=AlgorithmConfig(algorithm=cfg.algorithm, local_steps=cfg.local_steps)), progress=False)
    sim_acc = [r["accuracy"] for r in sim["rounds"]]
    assert np.max(np.abs(np.array(accuracies) - np.array(sim_acc))) <= PARITY_TOLERANCE, (accuracies, sim_acc)
    # the same clients were selected, round by round (fleet id c<k> is simulated user k)
    rounds = fleet.rounds()
    assert [sorted(r["selected"]) for r in sorted(rounds, key=lambda r: r["index"])] == \
        [sorted(f"c{k}" for k in r["selected"]) for r in sim["rounds"]]

    # label counts in the database are the partition's, for every accepted update
    users = partition(load_dataset(cfg.dataset), PartitionSpec(users=cfg.clients, alpha=cfg.alpha,
                                                                 samples_per_class=cfg.samples_per_class,
                                                                 seed=cfg.seed))
    with session_of(fleet) as session:
        updates = session.scalars(select(ClientUpdate).where(ClientUpdate.status == UpdateStatus.ACCEPTED)).all()
        assert len(updates) == sum(r["num_updates"] for r in summary["rounds"]) == cfg.rounds * cfg.active
        for upd in updates:
            k = int(upd.client_id[1:])
            assert upd.label_counts == users[k].label_counts().tolist()
            assert upd.num_samples == users[k].num_samples
            assert upd.metrics["test_count"] == len(users[k].test_y)
        assert session.scalar(select(Round.status).where(Round.index == 3)) == "closed"
    # and on the REST API
    detail = fleet.request("GET", f"/jobs/{fleet.job_id}/rounds/2")
    attempt = detail["attempts"][-1]
    assert attempt["status"] == "closed" and len(attempt["updates"]) == cfg.active
    assert all(sum(u["label_counts"]) == u["num_samples"] for u in attempt["updates"])
    assert fleet.request("GET", f"/jobs/{fleet.job_id}")["status"] == "finished"


def test_partial_mode_uploads_only_the_predictor(fleet_factory):
    fleet = fleet_factory(partial=True, rounds=2, clients=3, active=3)
    summary = fleet.run(timeout=900)
    assert summary["job_status"] == "finished"
    store = ArtifactStore(fleet.workdir / "artifacts")
    with session_of(fleet) as session:
        updates = session.scalars(select(ClientUpdate).where(ClientUpdate.status == UpdateStatus.ACCEPTED)).all()
        assert len(updates) == 6
        for upd in updates:
            assert set(stored_tensors(store, upd)) == {"predictor.weight", "predictor.bias"}
            assert upd.payload_bytes < 3_000  # 330 floats + header, vs ~110 kB for the whole CNN
    assert all(r["bytes_up"] < 3 * 3_000 for r in summary["rounds"])


def test_restarted_client_continues_from_its_state(fleet_factory):
    fleet = fleet_factory(clients=3, active=3, rounds=3, alpha=1.0)
    fleet.start_broker()
    fleet.start_server()
    fleet.request("POST", "/jobs", fleet.cfg.job_config())
    for k in range(3):
        fleet.start_client(k)
    wait_for(lambda: any(u["client_id"] == "c1" and u["status"] == "accepted"
                         for u in round_updates(fleet, 0)), timeout=600)
    fleet.clients[1].send_signal(signal.SIGKILL)  # a crash after its round-0 update was acknowledged
    fleet.clients[1].wait()
    fleet.start_client(1)  # same state directory
    summary = fleet.wait(timeout=900)
    assert summary["job_status"] == "finished"
    with session_of(fleet) as session:
        mine = session.scalars(select(ClientUpdate).where(ClientUpdate.client_id == "c1",
                                                          ClientUpdate.status == UpdateStatus.ACCEPTED)).all()
        rounds = {session.get(Round, u.round_id).index for u in mine}
    assert 0 in rounds and len(mine) == len(rounds)  # round 0 was not trained and counted again
    assert rounds & {1, 2}, "the restarted client took part again"


def round_updates(fleet: Fleet, index: int) -> list[dict]:
    try:
        detail = fleet.request("GET", f"/jobs/{fleet.job_id}/rounds/{index}")
    except Exception:  # the round may not exist yet
        return []
    return [u for attempt in detail["attempts"] for u in attempt["updates"]]


def wait_for(condition, timeout: float, interval: float = 0.5) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def test_devices_with_different_models_finish_a_fedgen_job(fleet_factory):
    """Partial sharing with three feature extractors (torch and lite devices mixed): every device trains its
    own model, uploads theta^p only, and the server keeps the round's figures per model."""
    models = ("cnn-wide", "cnn-small", "mlp")
    fleet = fleet_factory(partial=True, models=models, edge_runtime="mixed", clients=4, active=4, rounds=3)
    summary = fleet.run(timeout=900)
    assert summary["job_status"] == "finished"
    model_of = {f"c{k}": fleet.cfg.model_of(k) for k in range(4)}
    assert set(model_of.values()) == set(models)
    store = ArtifactStore(fleet.workdir / "artifacts")
    with session_of(fleet) as session:
        updates = session.scalars(select(ClientUpdate).where(ClientUpdate.status == UpdateStatus.ACCEPTED)).all()
        assert len(updates) == 3 * 4
        for upd in updates:
            assert upd.model == model_of[upd.client_id]
            assert set(stored_tensors(store, upd)) == {"predictor.weight", "predictor.bias"}
    for record in summary["rounds"]:  # the figures per model add up to the round's
        stats = record["model_stats"]
        assert set(stats) == set(models)
        assert sum(s["updates"] for s in stats.values()) == record["num_updates"] == 4
        assert stats["cnn-wide"]["updates"] == 2  # c0 and c3
        assert all(s["test_count"] > 0 and 0 <= s["accuracy"] <= 1 for s in stats.values())
    detail = fleet.request("GET", f"/jobs/{fleet.job_id}/rounds/2")["attempts"][-1]
    assert {u["client_id"]: u["model"] for u in detail["updates"]} == model_of
    clients = fleet.request("GET", f"/clients?job_id={fleet.job_id}")["items"]
    assert {c["client_id"]: c["device_info"]["model"] for c in clients} == model_of  # from the presence
    for k in range(4):  # each device kept the theta^f of its own architecture
        own = DeviceState(job_state_dir(fleet.workdir / "edge" / f"c{k}", fleet.job_id)).load_tensors("own")
        expected = build_model(model_of[f"c{k}"], (1, 28, 28), 10).state_dict()
        assert {n: v.shape for n, v in own.items()} == {n: tuple(v.shape) for n, v in expected.items()}
