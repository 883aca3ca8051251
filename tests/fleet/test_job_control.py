"""Job control against a running fleet (real broker, server and edge clients): pause finishes the open round
and opens no new one, even across a server restart; resume goes on; cancel ends the job with status
`cancelled`, fails its open round and tells the devices, which stop."""

from __future__ import annotations

import time

import pytest
from raw_fleet import round_row, rounds_of, start_job, wait_for

from server_api.devfleet.fleet import FleetConfig

pytestmark = pytest.mark.slow


def test_pause_resume_and_cancel_a_running_job(fleet_maker):  # noqa: ANN001
    # 200 rounds: the job is still running when it is cancelled below, however fast the machine
    fleet = fleet_maker(FleetConfig(clients=2, active=2, rounds=200, alpha=1.0, samples_per_class=50, local_steps=2,
                                    seed=3, round_timeout_s=60, algorithm="fedavg", progress=False))
    start_job(fleet)
    wait_for(lambda: (r := round_row(fleet, 1)) and r["status"] == "closed", timeout=300, interval=0.2,
             what="round 1 closed")
    assert fleet.request("POST", f"/jobs/{fleet.job_id}/pause")["status"] == "paused"
    # the round that was open when it was paused still closes; then nothing opens
    wait_for(lambda: all(r["status"] in ("closed", "failed") for r in rounds_of(fleet)), timeout=120,
             what="the open round closed")
    count = len(rounds_of(fleet))
    fleet.server.terminate()  # a restart keeps it paused
    fleet.server.wait(30)
    fleet.start_server()
    time.sleep(5)
    assert len(rounds_of(fleet)) == count
    assert fleet.request("GET", f"/jobs/{fleet.job_id}")["status"] == "paused"
    assert fleet.request("POST", f"/jobs/{fleet.job_id}/resume")["status"] == "running"
    wait_for(lambda: len(rounds_of(fleet)) > count, timeout=120, interval=0.3, what="a round after resume")
    wait_for(lambda: (r := rounds_of(fleet)) and r[-1]["status"] == "closed", timeout=120, interval=0.3,
             what="a round closed after resume")
    scraped = scrape(fleet)  # the restarted server counts from its restart
    assert scraped[("fedgen_rounds_total", (("job", fleet.job_id), ("status", "closed")))] >= 1
    assert scraped[("fedgen_updates_total", (("job", fleet.job_id), ("reason", ""), ("status", "accepted")))] >= 2
    assert scraped[("fedgen_devices_online", (("job", fleet.job_id),))] == 2
    cancelled = fleet.request("POST", f"/jobs/{fleet.job_id}/cancel")
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    summary = fleet.wait(timeout=60)
    assert summary["job_status"] == "cancelled" and len(summary["rounds"]) < 200
    wait_for(lambda: all(r["status"] in ("closed", "failed") for r in rounds_of(fleet)), timeout=30,
             what="the open round closed as failed")  # the worker notices within about a second
    assert "cancelled" in (rounds_of(fleet)[-1]["failure_reason"] or "") or rounds_of(fleet)[-1]["status"] == "closed"
    for proc in fleet.clients.values():  # the devices were told (retained round status) and stopped
        assert proc.wait(60) == 3  # edge-client's status for a job that failed or was cancelled


def scrape(fleet) -> dict:  # noqa: ANN001
    """GET /metrics as {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(fleet.api + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
