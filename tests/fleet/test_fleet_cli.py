"""`fedgen fleet` as a user runs it: a bad broker or data directory fails within seconds with the reason on the
terminal; Ctrl-C stops every process without a traceback and still writes the partial run.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FLEET = [sys.executable, "-m", "server_api.cli", "fleet", "--clients", "2", "--rounds", "1"]


def test_unreachable_broker_fails_fast(tmp_path: Path) -> None:
    started = time.monotonic()
    out = subprocess.run([*FLEET, "--broker", "mqtt://127.0.0.1:9", "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "cannot reach the broker at mqtt://127.0.0.1:9" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - started < 60


def test_missing_dataset_fails_fast(tmp_path: Path) -> None:
    out = subprocess.run([*FLEET, "--dataset", "mnist", "--data-dir", str(tmp_path / "nothing-here")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "fedgen: error: dataset 'mnist'" in out.stderr and "lacks" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_ctrl_c_writes_the_partial_run(mosquitto_dev, tmp_path: Path) -> None:
    out_file = tmp_path / "run.json"
    proc = subprocess.Popen([sys.executable, "-m", "server_api.cli", "fleet", "--clients", "2", "--rounds", "50",
                             "--local-steps", "2", "--samples-per-class", "50", "--broker", mosquitto_dev.url,
                             "--workdir", str(tmp_path / "w"), "--out", str(out_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        line = ""
        while time.monotonic() < deadline and "closed" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        assert "round   0 (attempt 0) closed" in line
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole foreground group
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "Traceback" not in stderr and "interrupted:" in stderr
    run = json.loads(out_file.read_text())
    assert run["job_status"] == "interrupted"
    assert run["rounds"] and run["rounds"][0]["round"] == 0
    server_log = (tmp_path / "w" / "server.log").read_text()
    assert "KeyboardInterrupt" not in server_log  # the server was stopped by the fleet, not by the signal
