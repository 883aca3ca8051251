"""`edge-client` at start-up, as a process: user errors are one line and exit status 2 before anything
connects; a job that is not on the broker, or that ended, is said in one line and exit status 3;
`--client-id auto` is unique per state directory and kept there; one state directory serves one process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from broker_fixtures import connect_client, publish

from shared.protocol.messages import RoundAnnouncement
from shared.protocol.topics import Topics

PARTITION = "mnist-subset:alpha=0.1:users=2:index=0"


def edge(*argv: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_client.cli", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def one_line(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["--broker", "mqtt://127.0.0.1:99999", "--partition", PARTITION], "port out of range"),
    (["--broker", "http://127.0.0.1", "--partition", PARTITION], "scheme must be mqtt:// or mqtts://"),
    (["--broker", "mqtt://127.0.0.1:1", "--data", "absent.npz"], "--data absent.npz: no such file"),
    (["--broker", "mqtt://127.0.0.1:1", "--data", "bad.npz"], "lacks the array(s) y"),
    (["--broker", "mqtt://127.0.0.1:1", "--data", "junk.npz"], "not a readable .npz"),
    (["--broker", "mqtt://127.0.0.1:1", "--partition", "mnist-subset:alpha=0.1:users=2:index=5"], "index"),
    (["--broker", "mqtt://127.0.0.1:1", "--partition", "nosuch:alpha=0.1:users=2:index=0"], "unknown dataset"),
    (["--broker", "mqtt://127.0.0.1:1", "--partition", "mnist:alpha=0.1:users=2:index=0", "--data-dir", "absent"],
     "lacks"),
    (["--broker", "mqtt://127.0.0.1:1", "--partition", PARTITION, "--job-wait", "-1"], "--job-wait"),
])
def test_user_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    out = edge("--job", "j1", "--client-id", "d1", *args, cwd=tmp_path)
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("edge-client: error: ") and expected.lower() in line.lower()


@pytest.fixture(scope="module")
def device_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet CA with client certificates dev-a and dev-b (broker/certs.py)."""
    out = tmp_path_factory.mktemp("pki")
    done = subprocess.run([sys.executable, "broker/certs.py", "--out", str(out), "--client", "dev-a", "--client",
                           "dev-b"], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize(("args", "expected"), [
    (["--client-id", "d1", "--tls-cert", "{pki}/dev-a.crt"], "--tls-cert and --tls-key go together"),
    (["--client-id", "d1", "--tls-cert", "{pki}/dev-a.crt", "--tls-key", "{pki}/dev-a.key"], "differs from the CN"),
    (["--client-id", "auto", "--tls-cert", "{pki}/dev-a.crt", "--tls-key", "{pki}/dev-b.key"],
     "not a certificate and its key"),
    (["--client-id", "auto", "--tls-cert", "{pki}/absent.crt", "--tls-key", "{pki}/dev-a.key"],
     "not a certificate and its key"),
])
def test_client_certificate_errors_are_one_line_exit_2(device_certs: Path, tmp_path: Path, args: list[str],
                                                       expected: str) -> None:
    argv = [a.format(pki=device_certs) for a in args]
    out = edge("--broker", "mqtts://127.0.0.1:1", "--job", "j1", "--partition", PARTITION, *argv, cwd=tmp_path)
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("edge-client: error: ") and expected in line


def test_missing_job_ends_with_status_3(mosquitto_dev, tmp_path: Path) -> None:
    started = time.monotonic()
    out = edge("--broker", mosquitto_dev.url, "--job", "no-such-job", "--client-id", "d1", "--partition",
               PARTITION, "--job-wait", "2", cwd=tmp_path)
    assert out.returncode == 3
    assert "job no-such-job not found" in one_line(out)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("status", ["failed", "cancelled"])
def test_ended_job_ends_with_status_3(mosquitto_dev, tmp_path: Path, status: str) -> None:
    job = f"ended-{status}"
    raw = connect_client(mosquitto_dev.port, f"server-{status}")
    announcement = RoundAnnouncement(job=job, round=2, attempt=0, version=3, selected=[], deadline=0.0,
                                     status=status)
    publish(raw, Topics(job).round, announcement.to_json(), retain=True)
    try:
        out = edge("--broker", mosquitto_dev.url, "--job", job, "--client-id", "d1", "--partition", PARTITION,
                   cwd=tmp_path)
    finally:
        raw.disconnect()
    assert out.returncode == 3
    assert one_line(out).endswith(f"job {job} {status}: this device stops")


def test_auto_client_id_is_kept_per_state_dir(mosquitto_dev, tmp_path: Path) -> None:
    ids = []
    for state_dir in ("s1", "s2", "s1"):
        out = edge("--broker", mosquitto_dev.url, "--job", "no-job", "--client-id", "auto", "--partition",
                   PARTITION, "--job-wait", "1", "--state-dir", state_dir, cwd=tmp_path)
        assert out.returncode == 3, out.stderr
        ids.append((tmp_path / state_dir / "client-id").read_text().strip())
    assert ids[0] == ids[2] != ids[1]  # kept across restarts, different per directory
    (tmp_path / "s3").mkdir()
    (tmp_path / "s3" / "client-id").write_text("../../etc\n")  # a damaged file: a new, valid id
    out = edge("--broker", mosquitto_dev.url, "--job", "no-job", "--client-id", "auto", "--partition",
               PARTITION, "--job-wait", "1", "--state-dir", "s3", cwd=tmp_path)
    assert out.returncode == 3
    assert (tmp_path / "s3" / "client-id").read_text().strip() not in ids + ["../../etc"]


def test_second_process_on_a_state_dir_is_refused(mosquitto_dev, tmp_path: Path) -> None:
    first = subprocess.Popen([sys.executable, "-m", "edge_client.cli", "--broker", mosquitto_dev.url, "--job",
                              "busy-job", "--client-id", "d1", "--partition", PARTITION, "--job-wait", "0",
                              "--state-dir", "shared-dir"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "shared-dir" / ".lock"
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        out = edge("--broker", mosquitto_dev.url, "--job", "busy-job", "--client-id", "d2", "--partition",
                   PARTITION, "--state-dir", "shared-dir", cwd=tmp_path)
        assert out.returncode == 2
        assert "in use by another edge client" in one_line(out) and str(first.pid) in out.stderr
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait(30)


def test_state_is_kept_per_job(tmp_path: Path) -> None:
    from edge_client.state import DeviceState, job_state_dir

    a = DeviceState(job_state_dir(tmp_path, "job-a"))
    a.mark_done("0.0")
    b = DeviceState(job_state_dir(tmp_path, "job-b"))
    assert b.meta["done"] == []  # a second job on the same device does not skip its rounds
    assert json.loads((tmp_path / "jobs" / "job-a" / "state.json").read_text())["done"] == ["0.0"]
