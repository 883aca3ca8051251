"""`fedgen devices add / list / revoke` against a real Mosquitto with the production config: an added device
connects and uploads; once revoked (the command reloads the broker) it can no longer connect, and its open
connection can no longer publish."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from broker_fixtures import PROD_CONF, ConnectRefused, connect_client, publish, run_create_users, state_of, subscribe

from server_api.devfleet.broker_process import start_mosquitto

pytestmark = pytest.mark.timeout(120)
JOB = "fedgen/v1/fleet-job"


def fedgen(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server_api.cli", "devices", *args], input=stdin, text=True,
                          capture_output=True, timeout=60, env={**os.environ, **(env or {})})


def test_devices_add_list_revoke(tmp_path: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    assert run_create_users(passwd, acl, "add-server", "--password-stdin", stdin="server-pw\n").returncode == 0
    files = {"FEDGEN_BROKER_PASSWORD_FILE": str(passwd), "FEDGEN_BROKER_ACL_FILE": str(acl)}
    with start_mosquitto(PROD_CONF, tmp_path / "broker", password_file=passwd, acl_file=acl) as broker:
        pid = ["--broker-pid", str(broker.pid)]
        done = fedgen("add", "pi-7", "--job", "fleet-job", "--password-stdin", *pid, stdin="pi-pw\n", env=files)
        assert done.returncode == 0, done.stderr
        listed = fedgen("list", env=files)
        assert "pi-7" in listed.stdout and "job=fleet-job" in listed.stdout
        server = connect_client(broker.port, "fedgen-server", username="fedgen-server", password="server-pw")
        subscribe(server, f"{JOB}/clients/+/update")
        device = connect_client(broker.port, "pi-7", username="pi-7", password="pi-pw")
        publish(device, f"{JOB}/clients/pi-7/update", b"before")
        assert state_of(server).wait_for(lambda msgs: any(m.payload == b"before" for m in msgs), 5)

        done = fedgen("revoke", "pi-7", *pid, env=files)
        assert done.returncode == 0 and "reloaded" in done.stderr, done.stderr
        assert "pi-7" not in fedgen("list", env=files).stdout
        with pytest.raises(ConnectRefused):
            connect_client(broker.port, "pi-7", username="pi-7", password="pi-pw")
        device.publish(f"{JOB}/clients/pi-7/update", b"after", qos=1)
        publish(server, f"{JOB}/clients/fedgen-server-ctl/update", b"control")  # the server may still publish
        assert state_of(server).wait_for(lambda msgs: any(m.payload == b"control" for m in msgs), 5)
        assert not any(m.payload == b"after" for m in state_of(server).messages)
        for client in (server, device):
            client.disconnect()
            client.loop_stop()


def test_devices_say_what_is_missing(tmp_path: Path) -> None:
    env = {k: "" for k in ("FEDGEN_BROKER_PASSWORD_FILE", "FEDGEN_BROKER_ACL_FILE")}
    done = fedgen("list", env=env)
    assert done.returncode == 2 and "--password-file" in done.stderr and "Traceback" not in done.stderr
