"""`fedgen devices add / list / revoke` against a real Mosquitto with the production config: an added device
connects and uploads; once revoked (the command reloads the broker) it can no longer connect, and its open
connection can no longer publish."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker_fixtures import (
    PROD_CONF,
    ConnectRefused,
    connect_client,
    make_certs,
    publish,
    run_create_users,
    state_of,
    subscribe,
)

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


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_device_with_a_certificate_connects_without_password_until_revoked(tmp_path: Path) -> None:
    """`devices add --cert`: the device logs in on the certificate listener with its certificate alone (the CN is
    its user name and client id); `revoke --ca-dir` takes its topics away at once (SIGHUP re-reads the ACL) and
    puts the certificate on the CRL, which refuses the TLS handshake once the broker restarts."""
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    assert run_create_users(passwd, acl, "add-server", "--password-stdin", stdin="server-pw\n").returncode == 0
    tls = make_certs(tmp_path / "pki")
    env = {"FEDGEN_BROKER_PASSWORD_FILE": str(passwd), "FEDGEN_BROKER_ACL_FILE": str(acl),
           "FEDGEN_BROKER_CA_DIR": str(tmp_path / "pki")}
    key_pair = (tmp_path / "device" / "pi-c.crt", tmp_path / "device" / "pi-c.key")
    with start_mosquitto(PROD_CONF, tmp_path / "broker", tls=tls, password_file=passwd, acl_file=acl) as broker:
        assert broker.cert_port is not None
        pid = ["--broker-pid", str(broker.pid)]
        done = fedgen("add", "pi-c", "--job", "fleet-job", "--cert", "--out-dir", str(tmp_path / "device"), *pid,
                      env=env)
        assert done.returncode == 0 and all(p.is_file() for p in key_pair), done.stderr
        other_pair = (tmp_path / "device" / "pi-d.crt", tmp_path / "device" / "pi-d.key")
        assert fedgen("add", "pi-d", "--job", "fleet-job", "--cert", "--out-dir", str(tmp_path / "device"),
                      env=env).returncode == 0
        again = fedgen("add", "pi-c", "--job", "fleet-job", "--cert", "--out-dir", str(tmp_path / "x"), env=env)
        assert again.returncode == 2 and "already issued" in again.stderr
        server = connect_client(broker.port, "fedgen-server", username="fedgen-server", password="server-pw")
        subscribe(server, f"{JOB}/clients/+/update")
        with pytest.raises(OSError):  # no certificate: the handshake fails (TLS 1.3: the broker hangs up after it)
            connect_client(broker.cert_port, "pi-c", ca_certs=tls.cafile)
        device = connect_client(broker.cert_port, "pi-c", ca_certs=tls.cafile, client_cert=key_pair)
        publish(device, f"{JOB}/clients/pi-c/update", b"with-cert")
        assert state_of(server).wait_for(lambda msgs: any(m.payload == b"with-cert" for m in msgs), 5)

        edge = subprocess.run([sys.executable, "-m", "edge_client.cli", "--broker", broker.cert_url, "--job",
                               "fleet-job", "--client-id", "auto", "--tls-ca", str(tls.cafile), "--tls-cert",
                               str(key_pair[0]), "--tls-key", str(key_pair[1]), "--partition",
                               "mnist-subset:alpha=0.1:users=2:index=0", "--job-wait", "1", "--state-dir",
                               str(tmp_path / "edge-state")], capture_output=True, text=True, timeout=60)
        assert edge.returncode == 3, edge.stderr  # connected as pi-c (the CN), then no job arrived
        assert "as pi-c (" in broker.log_tail(200)

        reloads = broker.log_tail(10_000).count("Reloading config")
        done = fedgen("revoke", "pi-c", *pid, env=env)
        assert done.returncode == 0 and "revoked" in done.stderr and "reloaded" in done.stderr, done.stderr
        wait_until(lambda: broker.log_tail(10_000).count("Reloading config") > reloads, 5)  # the SIGHUP was handled
        device.publish(f"{JOB}/clients/pi-c/update", b"after-revoke", qos=1)
        publish(server, f"{JOB}/clients/fedgen-server-ctl/update", b"control")
        assert state_of(server).wait_for(lambda msgs: any(m.payload == b"control" for m in msgs), 5)
        assert not any(m.payload == b"after-revoke" for m in state_of(server).messages)
        for client in (server, device):
            client.disconnect()
            client.loop_stop()

        broker.restart()
        with pytest.raises(OSError):
            connect_client(broker.cert_port, "pi-c", ca_certs=tls.cafile, client_cert=key_pair)
        assert "certificate verify failed" in broker.log_tail(5)
        other = connect_client(broker.cert_port, "pi-d", ca_certs=tls.cafile, client_cert=other_pair)  # not revoked
        other.disconnect()
        other.loop_stop()
