"""Several server processes on one job (docs/scaling.md, "Several server processes"): ingest shared through the
broker's share group, one process (the lease holder) running the rounds, another taking over when it dies.
Against the suite's real Mosquitto and a fresh PostgreSQL database; the lease and fencing rules themselves are
tested on both databases in tests/server/test_lease.py."""

from __future__ import annotations

import re
import signal
import time
import urllib.request

import pytest
from raw_fleet import (
    announce,
    assert_consistent_counts,
    assert_delta_chain,
    craft_update,
    round_row,
    round_updates,
    server_only_job,
    session_of,
    upload_tensors,
    wait_for,
)
from sqlalchemy import select

from server_api.db import ClientUpdate, JobLease, ModelVersion, UpdateStatus
from server_api.devfleet.fleet import Fleet, FleetConfig
from shared.protocol.frames import split_chunks
from shared.protocol.topics import Topics

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

LEASE_S = 3.0


def cluster_fleet(fleet_maker, job_id: str = "cluster-job", **overrides) -> Fleet:
    base = dict(clients=4, rounds=3, active=4, alpha=1.0, samples_per_class=100, local_steps=3, seed=7,
                round_timeout_s=90, algorithm="fedgen", progress=False, servers=2, lease_s=LEASE_S)
    cfg = FleetConfig(**{**base, **overrides})
    cfg.extra_client_args = {k: ["--retry", "3"] for k in range(cfg.clients)}
    fleet = fleet_maker(cfg)
    job = {**fleet.cfg.job_config(), "id": job_id}  # fleets on the suite's one broker need distinct job ids
    fleet.cfg.job_config = lambda: job  # type: ignore[method-assign] - Fleet.job_id/rounds() use it
    return fleet


def accepted_by(fleet: Fleet, index: int, job: str) -> float:
    """Updates server process `index` acknowledged as accepted for `job` (its own /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.ports[index]}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = re.compile(r'^fedgen_updates_total\{([^}]*)\} ([0-9.e+]+)$', re.M)
    return sum(float(value) for labels, value in pattern.findall(text)
               if f'job="{job}"' in labels and 'status="accepted"' in labels)


def lease_holder(fleet: Fleet) -> int | None:
    """The index of the server process holding the job's lease."""
    with session_of(fleet) as s:
        lease = s.get(JobLease, fleet.job_id)
    if lease is None:
        return None
    found = re.match(r"fedgen-server-(\d+)@", lease.holder)
    return int(found.group(1)) if found else None


def final_state(fleet: Fleet) -> tuple[int, str]:
    with session_of(fleet) as s:
        latest = s.scalars(select(ModelVersion).where(ModelVersion.job_id == fleet.job_id)
                           .order_by(ModelVersion.version.desc()).limit(1)).first()
    return latest.version, latest.state_sha256


def test_two_servers_split_a_burst_and_count_each_update_once(fleet_maker, raw_mqtt, fresh_postgres_url):
    """600 updates through the servers' share group, half of them in chunks of 512 bytes (the broker deals
    a stream's chunks out to both processes; the one that does not run the rounds passes them on): each is
    acknowledged `accepted` exactly once, stored once, counted in the round once, and both processes took a
    share."""
    burst = 600
    job = "cluster-burst"
    config = server_only_job(job, burst)
    fleet = cluster_fleet(fleet_maker, job, clients=0, db_url=fresh_postgres_url)
    fleet.start_broker()
    fleet.start_servers()
    fleet.request("POST", "/jobs", config, server=1)  # created through the process that may not run it
    topics = Topics(job)
    raw = raw_mqtt("cluster-burst")
    raw.subscribe(f"{topics.base}/clients/+/ack")
    ids = [f"u{i:04d}" for i in range(burst)]
    announce(raw, job, ids)
    wait_for(lambda: round_row(fleet, 0), timeout=120, interval=0.5, what="round 0 open")
    # at once: a process that has not looked at the round yet looks before it handles the first batch
    tensors = upload_tensors(config)
    keys, items = {}, []
    for n, c in enumerate(ids):
        header, envelope = craft_update(job, c, 0, 0, 0, tensors)
        keys[header.idempotency_key] = c
        size = 512 if n % 2 else len(envelope)
        assert len(split_chunks(envelope, "s", size)) == (1 if n % 2 == 0 else 4)
        items += [(topics.update(c), chunk) for chunk in split_chunks(envelope, header.idempotency_key, size)]
    raw.publish_all(items, timeout=300)
    wait_for(lambda: len(raw.acks()) >= burst, timeout=300, interval=1.0, what=f"{burst} acks")
    acks = raw.acks()
    assert set(acks) == set(keys)
    assert all([a.status for a in acks[k]] == ["accepted"] for k in keys), \
        {k: [a.status for a in v] for k, v in acks.items() if [a.status for a in v] != ["accepted"]}
    summary = fleet.wait(timeout=120)
    assert summary["job_status"] == "finished" and summary["rounds"][0]["num_updates"] == burst
    shares = [accepted_by(fleet, i, job) for i in (0, 1)]
    assert sum(shares) == burst and min(shares) > 0, shares
    with session_of(fleet) as s:
        rows = s.scalars(select(ClientUpdate).where(ClientUpdate.job_id == job)).all()
    assert len(rows) == burst and {r.client_id for r in rows} == set(ids)
    assert all(r.status == UpdateStatus.ACCEPTED for r in rows)


def test_closer_killed_mid_round_another_finishes_the_job_with_the_same_model(fleet_maker, fresh_postgres_url):
    """The process running the rounds is SIGKILLed while round 1 collects: the other takes the lease over
    within a bounded time, resumes the round with the updates already accepted, and the job finishes with
    exactly the model of a one-process run of the same job (same devices, same updates)."""
    fleet = cluster_fleet(fleet_maker, db_url=fresh_postgres_url)
    fleet.start_broker()
    fleet.start_servers()
    fleet.request("POST", "/jobs", fleet.cfg.job_config())
    for k in range(fleet.cfg.clients):
        fleet.start_client(k)
    wait_for(lambda: any(u["status"] == "accepted" for u in round_updates(fleet, 1)), timeout=300,
             interval=0.1, what="a round-1 update accepted")
    holder = lease_holder(fleet)
    assert holder in (0, 1)
    fleet.servers[holder].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    fleet.servers[holder].wait(10)
    other = 1 - holder
    wait_for(lambda: lease_holder(fleet) == other, timeout=4 * LEASE_S + 10, interval=0.2,
             what="the other process taking the lease over")
    takeover_s = time.monotonic() - killed
    summary = fleet.wait(timeout=300)
    assert summary["job_status"] == "finished"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert all(r["num_updates"] == 4 for r in summary["rounds"])
    assert "resumed round 1" in fleet.server_log(other).read_text()
    assert_delta_chain(fleet)
    assert_consistent_counts(fleet)
    clustered = final_state(fleet)
    print(f"lease taken over {takeover_s:.1f} s after the SIGKILL (lease {LEASE_S} s)")

    single = cluster_fleet(fleet_maker, "cluster-job-single", servers=1, cluster=True)
    assert single.run(timeout=600)["job_status"] == "finished"
    assert final_state(single) == clustered  # same version, same state_sha256
