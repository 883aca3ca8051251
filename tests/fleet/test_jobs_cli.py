"""`fedgen jobs` and `fedgen job ...` against a real server (subprocess, SQLite) on the suite's Mosquitto:
create a job from a file, list it, show it, pause / resume / cancel it; refusals are one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from raw_fleet import server_only_job, wait_for

from server_api.devfleet.fleet import FleetConfig


def fedgen(api: str, *argv: str, token: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FEDGEN_ADMIN_TOKEN", "FEDGEN_API_URL")}
    env["FEDGEN_API_URL"] = api
    if token is not None:
        env["FEDGEN_ADMIN_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "server_api.cli", *argv], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_operator_commands_drive_a_job(fleet_maker, tmp_path: Path) -> None:
    fleet = fleet_maker(FleetConfig(clients=2, rounds=3))
    fleet.start_broker()
    fleet.start_server()
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(server_only_job("cli-job", active=2, rounds=3)))

    refused = fedgen(fleet.api, "job", "create", str(job_file))  # no token
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "HTTP 401" in refused.stderr and "FEDGEN_ADMIN_TOKEN" in refused.stderr

    created = fedgen(fleet.api, "job", "create", str(job_file), token=fleet.token)
    assert created.returncode == 0, created.stderr
    assert "job cli-job created" in created.stdout

    waiting = wait_for(lambda: fleet.request("GET", "/jobs/cli-job")["waiting_for_devices"], 60,
                       what="the job waiting for its devices")  # no device is online
    listing = fedgen(fleet.api, "jobs")
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    assert header.split()[:4] == ["JOB", "STATUS", "ROUND", "ALGORITHM"]
    assert row.split()[0] == "cli-job" and "fedavg" in row.split() and "0/3" in row.split()
    assert row.split()[1] == "running" and row.endswith(waiting) and waiting.endswith("of 2")

    paused = fedgen(fleet.api, "job", "pause", "cli-job", token=fleet.token)
    assert paused.returncode == 0 and paused.stdout.strip() == "job cli-job: paused", paused.stderr
    again = fedgen(fleet.api, "job", "pause", "cli-job", token=fleet.token)
    assert again.returncode == 2 and "HTTP 409" in again.stderr and "paused" in again.stderr

    shown = fedgen(fleet.api, "job", "show", "cli-job", "--config")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("job cli-job: paused, round 0 of 3")
    assert '"dataset": "mnist-subset"' in shown.stdout

    resumed = fedgen(fleet.api, "job", "resume", "cli-job", token=fleet.token)
    assert resumed.returncode == 0 and resumed.stdout.strip() == "job cli-job: running", resumed.stderr
    cancelled = fedgen(fleet.api, "job", "cancel", "cli-job", token=fleet.token)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == "job cli-job: cancelled", cancelled.stderr
    assert fleet.request("GET", "/jobs/cli-job")["status"] == "cancelled"

    missing = fedgen(fleet.api, "job", "show", "no-such-job")
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr and "no-such-job" in missing.stderr
    bad_id = fedgen(fleet.api, "job", "show", "../etc")
    assert bad_id.returncode == 2 and "HTTP 4" in bad_id.stderr


def test_job_create_from_stdin_and_bad_files(fleet_maker, tmp_path: Path) -> None:
    fleet = fleet_maker(FleetConfig(clients=1, rounds=1))
    fleet.start_broker()
    fleet.start_server()
    body = json.dumps(server_only_job("stdin-job", active=1))
    created = fedgen(fleet.api, "job", "create", "-", token=fleet.token, stdin=body)
    assert created.returncode == 0 and "job stdin-job created" in created.stdout, created.stderr

    invalid = fedgen(fleet.api, "job", "create", "-", token=fleet.token,
                     stdin=json.dumps(server_only_job("bad-job", active=0)))
    assert invalid.returncode == 2 and "HTTP 422" in invalid.stderr and "active" in invalid.stderr
    not_json = tmp_path / "broken.json"
    not_json.write_text("{")
    broken = fedgen(fleet.api, "job", "create", str(not_json), token=fleet.token)
    assert broken.returncode == 2 and "not JSON" in broken.stderr
    absent = fedgen(fleet.api, "job", "create", str(tmp_path / "absent.json"), token=fleet.token)
    assert absent.returncode == 2 and "cannot read the job file" in absent.stderr
    listing = fedgen(fleet.api, "jobs")
    assert [line.split()[0] for line in listing.stdout.splitlines()[1:]] == ["stdin-job"]


def test_unreachable_server_is_one_line() -> None:
    out = fedgen("http://127.0.0.1:9", "jobs")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "cannot reach the server at http://127.0.0.1:9" in out.stderr
