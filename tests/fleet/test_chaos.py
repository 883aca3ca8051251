"""Faults (docs/reliability.md): the fleet against the suite's real Mosquitto (and a private PostgreSQL) while
things break: clients killed mid-round, late and duplicated updates, broker and server restarts, a burst of
thousands of uploads, a device that lost its disk, a database that goes away for a moment.

Every scenario is a test marked ``chaos``: ``pytest tests/fleet/test_chaos.py`` or ``pytest -m chaos``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from raw_fleet import (
    announce,
    assert_consistent_counts,
    assert_delta_chain,
    craft_update,
    health,
    round_row,
    round_updates,
    server_only_job,
    session_of,
    start_job,
    stored_tensors,
    upload_tensors,
    wait_for,
)
from safetensors.torch import load as load_tensors
from sqlalchemy import func, select

from edge_client.state import job_state_dir
from server_api.db import (
    Client,
    ClientUpdate,
    Job,
    ModelVersion,
    Round,
    UpdateStatus,
)
from server_api.db.store import ArtifactStore
from server_api.devfleet.broker_process import find_free_port
from server_api.devfleet.fleet import Fleet, FleetConfig
from shared.protocol.frames import split_chunks
from shared.protocol.messages import decode_manifest, decode_round
from shared.protocol.topics import Topics

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

RETRY = ["--retry", "3"]  # clients re-send an unacknowledged update every 3 s (default 10)


# ------------------------------------------------------------------------------------------------ helpers
def chaos_config(**overrides) -> FleetConfig:
    base = dict(clients=3, rounds=3, active=3, alpha=1.0, samples_per_class=100, local_steps=3, seed=5,
                round_timeout_s=60, algorithm="fedavg", progress=False)
    cfg = FleetConfig(**{**base, **overrides})
    cfg.extra_client_args = {k: list(RETRY) for k in range(cfg.clients)}
    return cfg


@pytest.fixture
def fleet_factory(fleet_maker) -> Callable[..., Fleet]:
    return lambda **overrides: fleet_maker(chaos_config(**overrides))


# ------------------------------------------------------------------------------- 1. clients killed mid-round
def test_killed_clients_close_at_deadline_and_go_offline(fleet_factory):
    """30 % of the selected clients die (SIGKILL) mid-round: the round closes at its deadline with the
    others (quorum holds), the dead ones are offline through their last will, the job finishes."""
    fleet = fleet_factory(clients=5, active=5, rounds=2, round_timeout_s=25)
    start_job(fleet)
    opened = wait_for(lambda: round_row(fleet, 0), timeout=300, interval=0.1, what="round 0 open")
    answered = {u["client_id"] for u in round_updates(fleet, 0) if u["status"] == "accepted"}
    candidates = [c for c in sorted(opened["selected"], reverse=True) if c not in answered]
    victims = candidates[:2]  # ceil(30 % of 5)
    assert len(victims) == 2, f"too late to kill anyone: {answered} already answered"
    for c in victims:
        fleet.clients[int(c[1:])].send_signal(signal.SIGKILL)
    for c in victims:
        fleet.clients[int(c[1:])].wait(10)

    summary = fleet.wait(timeout=300)
    assert summary["job_status"] == "finished"
    rounds = {(r["index"], r["attempt"]): r for r in fleet.rounds()}
    r0 = rounds[(0, 0)]
    accepted0 = {u["client_id"] for u in round_updates(fleet, 0) if u["status"] == "accepted"}
    missing = set(opened["selected"]) - accepted0
    assert missing and missing <= set(victims)  # (a victim may, rarely, have answered just before it died)
    assert r0["status"] == "closed" and r0["num_updates"] == len(accepted0) >= 3
    with session_of(fleet) as s:
        row = s.scalars(select(Round).where(Round.job_id == fleet.job_id, Round.index == 0)).one()
        assert row.closed_at >= row.deadline  # it waited for the dead ones until the deadline
        offline = {c.client_id: c.status for c in s.scalars(select(Client).where(Client.job_id == fleet.job_id))}
    assert all(offline[c] == "offline" for c in victims), offline
    clients = fleet.request("GET", f"/clients?job_id={fleet.job_id}")["items"]
    assert {c["client_id"] for c in clients if c["status"] == "offline"} >= set(victims)
    # the next round only selected who was still online
    assert not set(rounds[(1, 0)]["selected"]) & set(victims)
    assert rounds[(1, 0)]["status"] == "closed"
    assert_consistent_counts(fleet)


# ------------------------------------------------------------------------------- 2. stragglers
def test_late_update_is_refused_and_does_not_touch_the_next_round(fleet_factory, raw_mqtt):
    """An update for a round that has closed is refused with reason `late`, recorded as rejected against
    that round, and neither counted in nor mixed into the next round's model."""
    fleet = fleet_factory(clients=3, active=3, rounds=3)
    start_job(fleet)
    config = fleet.cfg.job_config()
    topics = Topics(fleet.job_id)
    raw = raw_mqtt("chaos-straggler")
    raw.subscribe(topics.ack("c0"))
    wait_for(lambda: round_row(fleet, 1), timeout=300, interval=0.1, what="round 1 open")
    # c0's "straggling" update for round 0: huge values, so that mixing it in anywhere would show
    header, envelope = craft_update(fleet.job_id, "c0", 0, 0, 0, upload_tensors(config, 1e4))
    raw.publish_all([(topics.update("c0"), chunk) for chunk in split_chunks(envelope, header.idempotency_key)])
    acks = wait_for(lambda: raw.acks().get(header.idempotency_key), timeout=60, interval=0.2, what="ack")
    assert acks[0].status == "rejected" and acks[0].reason == "late", acks

    summary = fleet.wait(timeout=300)
    assert summary["job_status"] == "finished"
    store = ArtifactStore(fleet.workdir / "artifacts")
    with session_of(fleet) as s:
        late = s.scalars(select(ClientUpdate).where(ClientUpdate.idempotency_key == header.idempotency_key)).one()
        assert late.status == UpdateStatus.REJECTED and late.reason.startswith("late")
        assert s.get(Round, late.round_id).index == 0  # recorded against the round it was for
        r0 = s.scalars(select(Round).where(Round.job_id == fleet.job_id, Round.index == 0)).one()
        r1 = s.scalars(select(Round).where(Round.job_id == fleet.job_id, Round.index == 1)).one()
        assert r0.num_updates == 3 and r1.num_updates == 3
        ups = s.scalars(select(ClientUpdate).where(ClientUpdate.round_id == r1.id,
                                                   ClientUpdate.status == UpdateStatus.ACCEPTED)).all()
        assert sorted(u.client_id for u in ups) == ["c0", "c1", "c2"]
        v = s.get(ModelVersion, (fleet.job_id, r1.model_version))
        model = {k[len("model/"):]: t for k, t in load_tensors(store.get(v.server_state_sha256)).items()
                 if k.startswith("model/")}
        # the model of round 1 is exactly the sample-weighted mean of round 1's accepted updates
        total = sum(u.num_samples for u in ups)
        uploads = [(stored_tensors(store, u), u.num_samples) for u in ups]
        for name in uploads[0][0]:
            mean = sum(t[name].double() * n for t, n in uploads) / total
            assert torch.allclose(model[name].double(), mean, atol=1e-6), name
    assert_consistent_counts(fleet)


# ------------------------------------------------------------------------------- 3. broker restart
def test_broker_restart_mid_round_loses_no_acknowledged_update(fleet_factory, raw_mqtt, mosquitto_dev):
    """Mosquitto restarts mid-round: server and clients reconnect on their own, the job finishes, and every
    update acknowledged `accepted` is in the database and counted in its round."""
    fleet = fleet_factory(clients=3, active=3, rounds=3)
    observer = raw_mqtt("chaos-ack-observer")
    observer.subscribe(f"{Topics(fleet.cfg.job_config()['id']).base}/clients/+/ack")
    start_job(fleet)
    wait_for(lambda: any(u["status"] == "accepted" for u in round_updates(fleet, 1)), timeout=300,
             interval=0.1, what="a round-1 update accepted")
    # a restart with a few seconds of downtime (stop, then start on the same port and persistence), so that
    # uploads, acks and the closing round's publications meet a broker that is away
    mosquitto_dev.stop()
    time.sleep(3)
    assert health(fleet)["broker"] != "ok"
    mosquitto_dev.start()
    wait_for(lambda: health(fleet)["broker"] == "ok", timeout=60, what="server reconnected")

    summary = fleet.wait(timeout=300)
    assert summary["job_status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for proc in fleet.clients.values():
        assert proc.wait(60) == 0  # the clients finished by themselves
    acked = {key for key, acks in observer.acks().items() if any(a.status == "accepted" for a in acks)}
    assert acked
    with session_of(fleet) as s:
        rows = {u.idempotency_key: u for u in s.scalars(select(ClientUpdate).where(
            ClientUpdate.job_id == fleet.job_id, ClientUpdate.status == UpdateStatus.ACCEPTED))}
        assert acked <= set(rows), f"acknowledged but not in the database: {acked - set(rows)}"
        for key in acked:
            assert s.get(Round, rows[key].round_id).status == "closed"
    assert_consistent_counts(fleet)


# ------------------------------------------------------------------------------- 4. server crash
def test_server_killed_mid_round_resumes_bit_exact(fleet_factory, raw_mqtt):
    """The server dies (SIGKILL) mid-round and is started again on the same database, artifacts and broker:
    it republishes the same model (same state_sha256), resumes the same round, and the job finishes with
    the clients it had (not restarted)."""
    fleet = fleet_factory(clients=3, active=3, rounds=3, algorithm="fedgen")
    start_job(fleet)
    topics = Topics(fleet.job_id)
    wait_for(lambda: any(u["status"] == "accepted" for u in round_updates(fleet, 1)), timeout=300,
             interval=0.1, what="a round-1 update accepted")
    fleet.server.send_signal(signal.SIGKILL)
    fleet.server.wait(10)
    with session_of(fleet) as s:
        current = s.get(Job, fleet.job_id).current_round
        latest = s.scalars(select(ModelVersion).where(ModelVersion.job_id == fleet.job_id)
                           .order_by(ModelVersion.version.desc()).limit(1)).first()
        open_rows = s.scalars(select(Round).where(Round.job_id == fleet.job_id, Round.index == current)).all()
        accepted_before = s.scalar(select(func.count()).select_from(ClientUpdate).where(
            ClientUpdate.job_id == fleet.job_id, ClientUpdate.status == UpdateStatus.ACCEPTED))
    # forget the retained manifest and round, so what we read next is what the restarted server publishes
    watcher = raw_mqtt("chaos-manifest-watcher", clean_session=True)
    watcher.publish_all([(topics.manifest, b""), (topics.round, b"")], retain=True)
    watcher.subscribe(topics.manifest)
    watcher.subscribe(topics.round)

    fleet.start_server()
    manifest = decode_manifest(wait_for(lambda: watcher.latest(topics.manifest), timeout=120, interval=0.2,
                                        what="manifest republished"))
    assert (manifest.version, manifest.state_sha256) == (latest.version, latest.state_sha256)
    assert manifest.model.sha256 == latest.model_onnx_sha256
    ann = decode_round(wait_for(lambda: watcher.latest(topics.round), timeout=120, interval=0.2,
                                what="round republished"))
    assert ann.round == current and ann.version == latest.version
    if open_rows:  # it resumed the interrupted attempt instead of opening a new one
        assert ann.attempt == open_rows[-1].attempt

    summary = fleet.wait(timeout=300)
    assert summary["job_status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert all(r["attempt"] == 0 for r in fleet.rounds())
    for proc in fleet.clients.values():
        assert proc.wait(60) == 0
    with session_of(fleet) as s:
        assert s.scalar(select(func.count()).select_from(ClientUpdate).where(
            ClientUpdate.job_id == fleet.job_id, ClientUpdate.status == UpdateStatus.ACCEPTED)) >= accepted_before
    assert "resumed round" in (fleet.workdir / "server.log").read_text() or not open_rows
    assert_delta_chain(fleet)  # the restarted server continued from exactly the state it had
    for k in range(3):
        assert "refused the delta" not in (fleet.workdir / f"edge-c{k}.log").read_text()
    assert_consistent_counts(fleet)


# ------------------------------------------------------------------------------- 5. upload burst
BURST = 3000


def test_burst_of_uploads_is_counted_exactly_once(fleet_factory, raw_mqtt):
    """3,000 updates at once (far over Mosquitto's default queue of 1,000) from one connection acting for
    3,000 devices: every one is acknowledged `accepted` once, stored once and counted once."""
    fleet = fleet_factory(clients=0)
    job = "chaos-burst"
    config = server_only_job(job, BURST)
    start_job(fleet, config, clients=False)
    fleet.cfg.job_config = lambda: config  # type: ignore[method-assign] - Fleet.job_id/rounds() use it
    topics = Topics(job)
    raw = raw_mqtt("chaos-burst")
    raw.subscribe(f"{topics.base}/clients/+/ack")
    ids = [f"u{i:05d}" for i in range(BURST)]
    announce(raw, job, ids)
    opened = wait_for(lambda: round_row(fleet, 0), timeout=300, interval=0.5, what="round 0 open")
    assert len(opened["selected"]) == BURST
    tensors = upload_tensors(config)
    keys, items = {}, []
    for c in ids:
        header, envelope = craft_update(job, c, 0, 0, 0, tensors)
        keys[header.idempotency_key] = c
        items += [(topics.update(c), chunk) for chunk in split_chunks(envelope, header.idempotency_key)]
    started = time.monotonic()
    raw.publish_all(items, timeout=300)
    wait_for(lambda: len(raw.acks()) >= BURST, timeout=400, interval=1.0, what=f"{BURST} acks")
    elapsed = time.monotonic() - started
    acks = raw.acks()
    assert set(acks) == set(keys)
    assert all([a.status for a in acks[k]] == ["accepted"] for k in keys), \
        {k: [a.status for a in v] for k, v in acks.items() if [a.status for a in v] != ["accepted"]}
    summary = fleet.wait(timeout=120)
    assert summary["job_status"] == "finished"
    assert summary["rounds"][0]["num_updates"] == BURST
    with session_of(fleet) as s:
        rows = s.scalars(select(ClientUpdate).where(ClientUpdate.job_id == job)).all()
        assert len(rows) == BURST and all(r.status == UpdateStatus.ACCEPTED for r in rows)
        assert {r.idempotency_key for r in rows} == set(keys)
        assert {r.client_id for r in rows} == set(ids)
    print(f"{BURST} updates acknowledged in {elapsed:.1f} s ({BURST / elapsed:.0f}/s)")
    assert_consistent_counts(fleet)


# ------------------------------------------------------------------------------- 6. duplicates
def test_duplicate_delivery_is_counted_once(fleet_factory, raw_mqtt):
    """QoS 1 redelivery and client retries: a chunk delivered twice, an update delivered twice (while its
    round is open and after it closed) is counted once; every repeat is answered `duplicate`."""
    fleet = fleet_factory(clients=0)
    job = "chaos-dup"
    config = server_only_job(job, 2)
    start_job(fleet, config, clients=False)
    fleet.cfg.job_config = lambda: config  # type: ignore[method-assign]
    topics = Topics(job)
    raw = raw_mqtt("chaos-dup")
    raw.subscribe(f"{topics.base}/clients/+/ack")
    announce(raw, job, ["d0", "d1"])
    wait_for(lambda: round_row(fleet, 0), timeout=120, interval=0.3, what="round 0 open")
    tensors = upload_tensors(config)

    def statuses(key: str, n: int) -> list[str]:
        acks = wait_for(lambda: len(raw.acks().get(key, [])) >= n and raw.acks()[key], timeout=60,
                        interval=0.2, what=f"{n} acks")
        return [a.status for a in acks]

    # d0: a multi-chunk update whose every chunk arrives twice, then the whole update again
    h0, env0 = craft_update(job, "d0", 0, 0, 0, tensors)
    chunks0 = split_chunks(env0, h0.idempotency_key, chunk_size=512)
    assert len(chunks0) >= 3
    raw.publish_all([(topics.update("d0"), c) for chunk in chunks0 for c in (chunk, chunk)])
    assert statuses(h0.idempotency_key, 1) == ["accepted"]
    raw.publish_all([(topics.update("d0"), c) for c in chunks0])
    assert statuses(h0.idempotency_key, 2) == ["accepted", "duplicate"]
    # d1: a one-chunk update delivered twice back to back; that closes the round (all selected answered)
    h1, env1 = craft_update(job, "d1", 0, 0, 0, tensors)
    frame1 = split_chunks(env1, h1.idempotency_key)
    raw.publish_all([(topics.update("d1"), frame1[0]), (topics.update("d1"), frame1[0])])
    assert statuses(h1.idempotency_key, 2) == ["accepted", "duplicate"]
    summary = fleet.wait(timeout=120)
    assert summary["job_status"] == "finished" and summary["rounds"][0]["num_updates"] == 2
    # a retry long after the round closed is still recognised
    raw.publish_all([(topics.update("d0"), c) for c in chunks0])
    assert statuses(h0.idempotency_key, 3) == ["accepted", "duplicate", "duplicate"]
    with session_of(fleet) as s:
        rows = s.scalars(select(ClientUpdate).where(ClientUpdate.job_id == job)).all()
    assert sorted((r.client_id, r.status) for r in rows) == [("d0", "accepted"), ("d1", "accepted")]
    assert_consistent_counts(fleet)


# ------------------------------------------------------------------------------- 7. lost disk
def test_client_with_deleted_state_rejoins_and_catches_up(fleet_factory):
    """A device whose state directory is wiped comes back as a new device: it takes the full retained model
    and its later updates are accepted."""
    fleet = fleet_factory(clients=3, active=3, rounds=3)
    # every round needs all three: the next round waits for the wiped device to come back (else the two
    # others would finish the job while it restarts)
    start_job(fleet, {**fleet.cfg.job_config(), "min_clients": 3})
    wait_for(lambda: any(u["client_id"] == "c2" and u["status"] == "accepted" for u in round_updates(fleet, 0)),
             timeout=300, interval=0.2, what="c2's round-0 update accepted")
    fleet.clients[2].send_signal(signal.SIGKILL)
    fleet.clients[2].wait(10)
    state_dir = fleet.workdir / "edge" / "c2"
    shutil.rmtree(state_dir)
    killed_at = time.time()
    fleet.start_client(2)

    summary = fleet.wait(timeout=400)
    assert summary["job_status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    with session_of(fleet) as s:
        mine = s.scalars(select(ClientUpdate).where(ClientUpdate.job_id == fleet.job_id,
                                                    ClientUpdate.client_id == "c2")).all()
        later = [u for u in mine if u.status == UpdateStatus.ACCEPTED and u.received_at.timestamp() > killed_at]
        assert later, "the wiped device had no update accepted after it rejoined"
        for u in later:
            rnd = s.get(Round, u.round_id)
            assert rnd.status == "closed" and u.base_version == rnd.index  # trained from that round's version
        assert not [u for u in mine if u.status == UpdateStatus.REJECTED and u.received_at.timestamp() > killed_at]
    # it holds the final model again, fetched from the retained artifacts
    meta = json.loads((job_state_dir(state_dir, fleet.job_id) / "state.json").read_text())
    assert meta["version"] is not None and meta["version"] >= 1
    assert_consistent_counts(fleet)


# ------------------------------------------------------------------------------- 8. database outage
def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("pg_ctl")
    return Path(exe).parent if exe else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port (run as the `postgres` OS user when we are root)."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="fedgen-chaos-pg-"))
        self.data = self.root / "data"
        self.port = find_free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            self.as_user = [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-c"]
            shutil.chown(self.root, "postgres", "postgres")
        self._run(["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, argv: list[str]) -> None:
        cmd = [str(self.bindir / argv[0]), *argv[1:]]
        if self.as_user and self.as_user[0] == "su":
            cmd = [*self.as_user, " ".join(cmd)]
        else:
            cmd = [*self.as_user, *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}\n{done.stderr}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"), "-o", opts, "-w",
                   "start"])

    def stop(self) -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def destroy(self) -> None:
        try:
            self.stop()
        except Exception:  # already stopped
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = _postgres_bin()
    if bindir is None or not (bindir / "initdb").exists():
        if os.environ.get("FEDGEN_REQUIRE_POSTGRES", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail("FEDGEN_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries (initdb, pg_ctl) found")
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl under /usr/lib/postgresql/*/bin) found")
    pg = PrivatePostgres(bindir)
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


def test_database_outage_mid_round(fleet_factory, private_postgres):
    """PostgreSQL stops mid-round for a few seconds: /health says the database is unavailable meanwhile,
    the server retries, the round is not lost (it closes as the same attempt) and the job finishes."""
    fleet = fleet_factory(clients=3, active=3, rounds=3, db_url=private_postgres.url)
    start_job(fleet)
    wait_for(lambda: round_row(fleet, 1), timeout=300, interval=0.1, what="round 1 open")
    private_postgres.stop()
    seen = wait_for(lambda: (h := health(fleet))["database"] != "ok" and h, timeout=30, interval=0.3,
                    what="/health reporting the database down")
    assert seen["status"] == "degraded" and seen["database"].startswith("unavailable"), seen
    time.sleep(4)
    assert health(fleet)["database"].startswith("unavailable")
    private_postgres.start()
    wait_for(lambda: health(fleet)["database"] == "ok", timeout=60, interval=0.5, what="database back")

    summary = fleet.wait(timeout=300)
    assert summary["job_status"] == "finished"
    rounds = fleet.rounds()
    assert sorted((r["index"], r["attempt"], r["status"]) for r in rounds) == \
        [(0, 0, "closed"), (1, 0, "closed"), (2, 0, "closed")]
    assert all(r["num_updates"] == 3 for r in rounds)
    assert_consistent_counts(fleet)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))

