"""Security promises, checked end to end against a real Mosquitto with the production config.

* a fleet (server + real ``edge-client`` processes) runs over TLS with passwords and the generated ACL;
* devices without the broker's CA, anonymous or with a wrong password get a clear log line, no progress;
* a device cannot impersonate another one, read its acks, or replace the server's round/manifest/artifacts;
* secrets (admin token, broker passwords, database password) appear in no log, run.json or API response;
* nothing received from the network is unpickled or executed (static scan of the sources);
* robust aggregation (median, trimmed mean) keeps the model when a few clients send poisoned updates.

The broker-level ACL/TLS checks with raw paho clients are in tests/broker/test_broker.py; here they go through the
server. Negative checks are made non-vacuous with a positive control sent after the forbidden message
(Mosquitto keeps per-publisher order). The production broker's TLS listener is used by the server AND the
devices (mqtts://127.0.0.1:<port>, certificates from broker/certs.py, SAN 127.0.0.1).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from broker_fixtures import (
    DEV_CONF,
    PROD_CONF,
    _require_mosquitto,
    connect_client,
    make_certs,
    publish,
    run_create_users,
    state_of,
    subscribe,
)
from paho.mqtt.client import Client
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from server_api.db import ClientUpdate, UpdateStatus, make_engine, make_session_factory
from server_api.devfleet.broker_process import BrokerProcess, start_mosquitto
from server_api.devfleet.fleet import Fleet, FleetConfig
from shared.algorithm.aggregate import RunningWeightedMean
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.federation import GlobalState, RoundAccumulator
from shared.algorithm.local import evaluate, local_update
from shared.algorithm.models import build_model, shared_keys
from shared.algorithm.schedule import round_seed
from shared.data.datasets import load_dataset
from shared.data.partition import PartitionSpec, partition
from shared.fsutil import sha256_hex
from shared.protocol.frames import split_chunks
from shared.protocol.messages import (
    Ack,
    Manifest,
    Presence,
    RoundAnnouncement,
    UpdateHeader,
    decode_ack,
    decode_manifest,
    decode_round,
    encode_update,
)
from shared.protocol.tensors import decode_tensors, encode_tensors, tensor_spec
from shared.protocol.topics import Topics

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# the secured fleet of test (a): job id "fleet-fedgen-11", devices c0..c2
FLEET = dict(clients=3, active=3, rounds=2, alpha=1.0, samples_per_class=100, local_steps=5, seed=11,
             round_timeout_s=150, progress=False)
FLEET_JOB = FleetConfig(**FLEET).job_config()["id"]
E2E_JOB = "sec-e2e"  # test (c): dev-a and dev-b, raw paho devices, the real server
USERS = {"fedgen-server": None, "c0": FLEET_JOB, "c1": FLEET_JOB, "c2": FLEET_JOB,
         "dev-a": E2E_JOB, "dev-b": E2E_JOB}


# ============================================================================================= fixtures
@dataclasses.dataclass
class SecureBroker:
    broker: BrokerProcess
    passwords: dict[str, str]
    ca_file: Path
    root: Path

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.tls_port}"

    @property
    def plain_url(self) -> str:
        return self.broker.url


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """prod.conf with a password file + ACL from create_users.py for USERS, and a TLS listener."""
    _require_mosquitto()
    root = tmp_path_factory.mktemp("secure-broker")
    passwd, acl = root / "passwd", root / "acl"
    passwords = {}
    for user, job in USERS.items():
        password = secrets.token_urlsafe(18)
        cmd = ["add-server", "--user", user] if job is None else ["add-device", user, "--job", job]
        done = run_create_users(passwd, acl, *cmd, "--password-stdin", stdin=password + "\n")
        assert done.returncode == 0, done.stderr
        passwords[user] = password
    tls = make_certs(root / "certs")
    with start_mosquitto(PROD_CONF, root / "broker", tls=tls, password_file=passwd, acl_file=acl) as broker:
        yield SecureBroker(broker, passwords, tls.cafile, root)


@dataclasses.dataclass
class SecretDb:
    url: str
    password: str | None  # None: SQLite (no password to leak)


@pytest.fixture
def secret_db(tmp_path: Path) -> Iterator[SecretDb]:
    """A PostgreSQL database owned by a new role with a password (so that the URL holds a secret), or SQLite
    when no PostgreSQL server is reachable ($FEDGEN_TEST_POSTGRES_URL, as tests/db_fixtures.py)."""
    admin_url = make_url(os.environ.get("FEDGEN_TEST_POSTGRES_URL")
                         or "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    if admin_url.drivername in ("postgresql", "postgres"):
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"fedgen_sec_{uuid.uuid4().hex[:12]}"
    password = secrets.token_urlsafe(18)
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'"))
            conn.execute(text(f'CREATE DATABASE "{name}" OWNER "{name}"'))
    except Exception:  # no PostgreSQL here: SQLite, no database password to check
        admin.dispose()
        yield SecretDb(f"sqlite:///{tmp_path / 'fedgen.db'}", None)
        return
    try:
        yield SecretDb(admin_url.set(username=name, password=password, database=name)
                       .render_as_string(hide_password=False), password)
    finally:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n "
                              "AND pid <> pg_backend_pid()"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()


def secured_fleet_config(sb: SecureBroker, **overrides: object) -> FleetConfig:
    """Server and devices on the TLS listener, each with its own user; passwords via the environment."""
    base = dict(FLEET, broker_url=sb.tls_url, broker_username="fedgen-server",
                broker_password=sb.passwords["fedgen-server"], broker_tls_ca=str(sb.ca_file),
                client_passwords={i: sb.passwords[f"c{i}"] for i in range(FLEET["clients"])})
    return FleetConfig(**{**base, **overrides})


def raw_get(url: str, token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def raw_request(url: str, method: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def wait_until(condition, timeout: float, interval: float = 0.5, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout} s")


def accepted_updates(fleet: Fleet) -> list[ClientUpdate]:
    engine = make_engine(fleet.cfg.db_url or f"sqlite:///{fleet.workdir / 'fedgen.db'}")
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(ClientUpdate).where(ClientUpdate.job_id == fleet.job_id)).all())
    finally:
        engine.dispose()


# ============================================================================ (a) + (e): the secured fleet
def test_secured_fleet_over_tls_with_acl_finishes_and_leaks_no_secret(secure_broker: SecureBroker,
                                                                       secret_db: SecretDb, tmp_path: Path) -> None:
    """Server and 3 edge-clients on the TLS listener with their own users and the generated ACL: a 2-round
    FedGen job finishes with every selected client's update accepted in every round. That needs presence
    (min_online = 3), round, manifest, artifacts (model + generator), update and ack (the clients exit only
    once their updates are acknowledged), and assignment: c2 asks for its partition with index=auto."""
    sb = secure_broker
    probe = FleetConfig(**FLEET)
    auto_spec = probe.partition_spec(2).replace(":index=2:", ":index=auto:")
    assert ":index=auto:" in auto_spec
    fleet = Fleet(secured_fleet_config(sb, db_url=secret_db.url, workdir=tmp_path / "fleet",
                                       extra_client_args={2: ["--partition", auto_spec]}))
    try:
        summary = fleet.run(out=tmp_path / "run.json", timeout=600)
        assert summary["job_status"] == "finished", summary
        assert [r["num_updates"] for r in summary["rounds"]] == [3, 3], summary["rounds"]
        assert summary["final_accuracy"] is not None  # the server evaluated every version (2 short rounds: no
        # accuracy claim here; learning is checked by tests/fleet/test_fleet.py and the poisoning test below)
        updates = accepted_updates(fleet)
        assert sorted(u.client_id for u in updates if u.status == UpdateStatus.ACCEPTED) == \
            ["c0", "c0", "c1", "c1", "c2", "c2"]
        assert not [u for u in updates if u.status != UpdateStatus.ACCEPTED]
        # every device got its acks and the final round: it exits by itself, with 0
        for index, proc in fleet.clients.items():
            assert proc.wait(timeout=60) == 0, (fleet.workdir / f"edge-c{index}.log").read_text()[-3000:]
        clients = fleet.request("GET", f"/clients?job_id={fleet.job_id}")["items"]
        c2 = next(c for c in clients if c["client_id"] == "c2")
        assert "partition_index" in json.dumps(c2), c2  # the server answered its partition request

        # (e) REST: every non-GET operation of the OpenAPI document refuses a request without the token
        status, body = raw_get(f"{fleet.api}/openapi.json")
        assert status == 200
        writes = [(m.upper(), p) for p, ops in json.loads(body)["paths"].items() for m in ops
                  if m.lower() not in ("get", "head", "options")]
        assert ("POST", "/jobs") in writes
        for method, path in writes:
            concrete = path.replace("{job_id}", fleet.job_id).replace("{index}", "0")
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {fleet.token}"}):
                status, _ = raw_request(fleet.api + concrete, method, b"{}",
                                        {"Content-Type": "application/json", **headers})
                assert status in (401, 403), (method, path, headers, status)
        for method in ("PUT", "PATCH", "DELETE"):  # no undocumented write on the job resources
            status, _ = raw_request(f"{fleet.api}/jobs/{fleet.job_id}", method, b"{}",
                                    {"Authorization": f"Bearer {fleet.token}", "Content-Type": "application/json"})
            assert status in (404, 405), (method, status)

        # (e) secrets: in no API response body (read with the admin token, the most a caller could see)
        secret_values = {"admin token": fleet.token,
                         **{f"broker password of {u}": p for u, p in sb.passwords.items()}}
        if secret_db.password:
            secret_values["database password"] = secret_db.password
        bodies = {}
        for path in ("/health", "/jobs", f"/jobs/{fleet.job_id}", f"/jobs/{fleet.job_id}/rounds",
                     f"/jobs/{fleet.job_id}/rounds/0", "/clients", f"/clients?job_id={fleet.job_id}",
                     "/openapi.json"):
            status, body = raw_get(fleet.api + path, fleet.token)
            assert status == 200, (path, status, body[:300])
            bodies[path] = body
    finally:
        fleet.stop()
    # ... nor in any log of the run (server at INFO level, every device, the broker) nor in run.json
    texts = {**bodies, "run.json": (tmp_path / "run.json").read_text()}
    for log_file in [fleet.workdir / "server.log", *sorted(fleet.workdir.glob("edge-*.log")),
                     sb.broker.workdir / "mosquitto.log"]:
        texts[str(log_file)] = log_file.read_text(errors="replace")
    assert "job fleet-fedgen-11 finished" in texts[str(fleet.workdir / "server.log")]  # the log is the real one
    leaks = [(what, where) for what, secret in secret_values.items() for where, body in texts.items()
             if secret in body]
    assert not leaks, f"secrets found: {leaks}"
    # the devices' passwords travel in their environment, never on their command line (visible in ps)
    for proc in fleet.clients.values():
        assert not any(p in " ".join(map(str, proc.args)) for p in sb.passwords.values())


# ============================================================= (b) + (d): devices that must not get in
def _start_edge(tmp_path: Path, name: str, broker: str, *extra: str, password: str | None = None,
                job: str = FLEET_JOB, client_id: str = "c0") -> tuple[subprocess.Popen, Path]:
    log_path = tmp_path / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if k != "FEDGEN_MQTT_PASSWORD"}
    if password is not None:
        env["FEDGEN_MQTT_PASSWORD"] = password
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "edge_client.cli", "--broker", broker, "--job", job,
                                 "--client-id", client_id, "--partition", FleetConfig(**FLEET).partition_spec(0),
                                 "--state-dir", str(tmp_path / name / "state"), "-v", *extra],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return proc, log_path


def test_devices_without_ca_with_wrong_ca_anonymous_or_wrong_password_are_refused_clearly(
        secure_broker: SecureBroker, tmp_path: Path) -> None:
    """Each misconfigured edge-client logs ONE clear line naming the cause (rate-limited while paho keeps
    retrying every 1..15 s), no traceback, makes no progress and keeps running until stopped."""
    sb = secure_broker
    wrong_ca = make_certs(tmp_path / "other-ca").cafile  # a valid CA, but not the broker's
    pw = sb.passwords["c0"]
    cases = {
        "no-ca": (sb.tls_url, ["--username", "c0"], pw,
                  r"TLS error: the broker's certificate was not accepted \(.*certificate"),
        "wrong-ca": (sb.tls_url, ["--username", "c0", "--tls-ca", str(wrong_ca)], pw,
                     r"TLS error: the broker's certificate was not accepted \(.*certificate"),
        "anonymous-plain": (sb.plain_url, [], None, r"broker refused the connection: Not authorized \(wrong or "
                                                    r"missing username/password"),
        "anonymous-tls": (sb.tls_url, ["--tls-ca", str(sb.ca_file)], None,
                          r"broker refused the connection: Not authorized"),
        "wrong-password": (sb.tls_url, ["--username", "c0", "--tls-ca", str(sb.ca_file)], "not-the-password",
                           r"broker refused the connection: Not authorized"),
    }
    procs = {name: _start_edge(tmp_path, name, url, *args, password=password)
             for name, (url, args, password, _) in cases.items()}
    try:
        logs: dict[str, str] = {}

        def all_logged() -> bool:
            for name in cases:
                logs[name] = procs[name][1].read_text(errors="replace")
            return all(re.search(pattern, logs[name]) for name, (*_, pattern) in cases.items())

        try:
            wait_until(all_logged, timeout=120, what="a clear connection error in every device's log")
        except TimeoutError:
            missing = {n: logs.get(n, "")[-1500:] for n, (*_, p) in cases.items() if not re.search(p, logs.get(n, ""))}
            raise AssertionError(f"no clear error line: {missing}") from None
        time.sleep(8)  # paho retries after 1, 2, 4 s ...: the same failure must not be logged again
        for name, (proc, log_path) in procs.items():
            text_ = log_path.read_text(errors="replace")
            assert proc.poll() is None, f"{name} exited: {text_[-2000:]}"
            assert "Traceback" not in text_, f"{name}: {text_[-3000:]}"
            lines = [ln for ln in text_.splitlines() if "cannot connect" in ln]
            assert 1 <= len(lines) <= 2, f"{name}: not rate-limited: {lines}"
            assert " connected to " not in text_ and "trained round" not in text_, f"{name} got in: {text_}"
            assert not (tmp_path / name / "state" / "global.safetensors").exists()
            assert pw not in text_  # the password is never part of the message
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_edge_client_rejects_missing_ca_file_and_password_without_user(tmp_path: Path) -> None:
    spec = FleetConfig(**FLEET).partition_spec(0)
    base = [sys.executable, "-m", "edge_client.cli", "--broker", "mqtts://127.0.0.1:1", "--job", "j",
            "--client-id", "c0", "--partition", spec, "--state-dir", str(tmp_path / "s")]
    done = subprocess.run([*base, "--tls-ca", str(tmp_path / "nope.crt")], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2 and "--tls-ca" in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = subprocess.run([*base, "--password", "x"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "--username" in done.stderr, done.stderr


# ============================================================================ raw paho devices (c), (g)
class RawDevice:
    """A device speaking the wire protocol with paho directly: what an attacker with valid credentials
    (or a hand-written client) can do. Uploads are well-formed; their content is the caller's choice."""

    def __init__(self, port: int, user: str, job: str, *, password: str | None = None, ca: Path | None = None,
                 client_id: str | None = None, extra_subscriptions: tuple[str, ...] = ()):
        self.user, self.topics = user, Topics(job)
        self.client: Client = connect_client(port, client_id or user, username=user if password else None,
                                             password=password, ca_certs=ca, timeout=10)
        self.state = state_of(self.client)
        for topic in (self.topics.round, self.topics.manifest, self.topics.ack(user), *extra_subscriptions):
            subscribe(self.client, topic)
        self._template: dict[str, torch.Tensor] | None = None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def announce(self, num_samples: int = 100) -> None:
        publish(self.client, self.topics.presence(self.user), Presence("online", num_samples).to_json(), retain=True)

    def payloads(self, topic: str) -> list[bytes]:
        return [bytes(m.payload) for m in self.state.on_topic(topic) if m.payload]

    def wait_open_round(self, after: int = -1, timeout: float = 120.0) -> tuple[RoundAnnouncement, Manifest]:
        """The latest announcement once it is an open round > `after` that selects this device and the
        manifest of its version has arrived."""
        found: list = []

        def ready(_msgs) -> bool:
            rounds, manifests = self.payloads(self.topics.round), self.payloads(self.topics.manifest)
            if not rounds or not manifests:
                return False
            ann, man = decode_round(rounds[-1]), decode_manifest(manifests[-1])
            if ann.status == "open" and ann.round > after and self.user in ann.selected and man.version == ann.version:
                found[:] = [ann, man]
                return True
            return False

        if not self.state.wait_for(ready, timeout):
            raise TimeoutError(f"{self.user}: no open round > {after} selecting it within {timeout} s")
        return found[0], found[1]

    def template(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        """Shared entries of a freshly initialised model of the job's architecture (the upload's spec)."""
        if self._template is None:
            cfg = manifest.config.algorithm
            state = build_model(cfg.model, tuple(manifest.image_shape), manifest.num_classes).state_dict()
            self._template = {k: state[k] for k in shared_keys(state, cfg.partial)}
        return self._template

    def send_update(self, ann: RoundAnnouncement, manifest: Manifest, tensors: dict[str, torch.Tensor], *,
                    header_client: str | None = None, topic_client: str | None = None,
                    num_samples: int = 100) -> str:
        """Publish one update (chunked like the edge client) and wait for the broker's PUBACKs; its key."""
        counts = [num_samples // manifest.num_classes] * manifest.num_classes
        counts[0] += num_samples - sum(counts)
        blob = encode_tensors(tensors)
        header = UpdateHeader(job=self.topics.job, round=ann.round, attempt=ann.attempt,
                              client=header_client or self.user, base_version=manifest.version,
                              num_samples=num_samples, label_counts=counts, idempotency_key=uuid.uuid4().hex,
                              tensors_sha256=sha256_hex(blob), metrics={})
        envelope = encode_update(header, blob)
        for chunk in split_chunks(envelope, stream=header.idempotency_key, chunk_size=manifest.config.chunk_size):
            publish(self.client, self.topics.update(topic_client or self.user), chunk)
        return header.idempotency_key

    def wait_ack(self, key: str, timeout: float = 60.0) -> Ack:
        def acked(_msgs) -> bool:
            return any(decode_ack(p).idempotency_key == key for p in self.payloads(self.topics.ack(self.user)))

        assert self.state.wait_for(acked, timeout), f"{self.user}: no ack for {key[:8]} within {timeout} s"
        return next(a for a in map(decode_ack, self.payloads(self.topics.ack(self.user))) if a.idempotency_key == key)


# ============================================================================ (c) impersonation, end to end
def test_device_cannot_impersonate_another_or_replace_server_topics(secure_broker: SecureBroker,
                                                                    tmp_path: Path) -> None:
    """Through the real server: dev-a's update forged as dev-b (on dev-b's topic, header saying dev-b) is
    never recorded, dev-a never sees dev-b's ack, and its forged manifest/round/artifact reach neither dev-b
    nor the retained state, while the server's own messages do."""
    sb = secure_broker
    cfg = secured_fleet_config(sb, clients=2, active=2, rounds=1, algorithm="fedavg", samples_per_class=50,
                               workdir=tmp_path / "server", client_passwords={})
    job = {**cfg.job_config(), "id": E2E_JOB}
    fleet = Fleet(cfg)
    devices: list[RawDevice] = []
    try:
        fleet.start_server()
        fleet.request("POST", "/jobs", job)
        artifacts = Topics(E2E_JOB).base + "/artifacts/#"
        a = RawDevice(sb.broker.tls_port, "dev-a", E2E_JOB, password=sb.passwords["dev-a"], ca=sb.ca_file,
                      extra_subscriptions=(Topics(E2E_JOB).ack("dev-b"),))
        b = RawDevice(sb.broker.tls_port, "dev-b", E2E_JOB, password=sb.passwords["dev-b"], ca=sb.ca_file,
                      extra_subscriptions=(artifacts,))
        devices += [a, b]
        a.announce()
        b.announce()
        ann, manifest = a.wait_open_round()
        b.wait_open_round()
        assert sorted(ann.selected) == ["dev-a", "dev-b"]
        tensors = a.template(manifest)

        # the attacks, all from dev-a's authenticated connection
        forged_key = a.send_update(ann, manifest, tensors, header_client="dev-b", topic_client="dev-b")
        forged_manifest = msgspec.structs.replace(manifest, version=99, state_sha256="e" * 64).to_json()
        forged_round = msgspec.structs.replace(ann, round=7, status="finished", selected=["dev-a"]).to_json()
        forged_chunk = b"forged artifact chunk"
        publish(a.client, a.topics.manifest, forged_manifest, retain=True)
        publish(a.client, a.topics.round, forged_round, retain=True)
        publish(a.client, a.topics.artifact_chunk(manifest.model.sha256, 0), forged_chunk, retain=True)

        # honest traffic after the attacks (positive controls: per-publisher order)
        key_b = b.send_update(ann, manifest, tensors)
        assert b.wait_ack(key_b).status == "accepted"
        key_a = a.send_update(ann, manifest, tensors)  # the server acks B before A: same publisher, in order
        assert a.wait_ack(key_a).status == "accepted"
        wait_until(lambda: fleet.request("GET", f"/jobs/{E2E_JOB}")["status"] == "finished", 120,
                   what="job finished")
        assert b.state.wait_for(lambda _m: any(decode_round(p).status == "finished"
                                               for p in b.payloads(b.topics.round) if p != forged_round), 30)

        # the server recorded exactly the two honest updates, nothing under the forged key
        engine = make_engine(f"sqlite:///{fleet.workdir / 'fedgen.db'}")
        with make_session_factory(engine)() as session:
            rows = session.scalars(select(ClientUpdate).where(ClientUpdate.job_id == E2E_JOB)).all()
            recorded = {(r.client_id, r.idempotency_key, r.status) for r in rows}
        engine.dispose()
        assert recorded == {("dev-a", key_a, UpdateStatus.ACCEPTED), ("dev-b", key_b, UpdateStatus.ACCEPTED)}
        assert forged_key not in {r[1] for r in recorded}
        # dev-a never received dev-b's ack (it did receive its own, sent later by the same server)
        assert a.payloads(a.topics.ack("dev-b")) == []
        # dev-b saw the server's round/manifest (before and after the attack), never the forged ones
        assert forged_manifest not in b.payloads(b.topics.manifest)
        assert forged_round not in b.payloads(b.topics.round)
        assert forged_chunk not in b.payloads(b.topics.artifact_chunk(manifest.model.sha256, 0))
        assert any(decode_manifest(p).version == 1 for p in b.payloads(b.topics.manifest))  # the server's new one
        # the retained state a late device gets is the server's
        late = RawDevice(sb.broker.tls_port, "dev-b", E2E_JOB, password=sb.passwords["dev-b"], ca=sb.ca_file,
                         client_id="dev-b-late")
        devices.append(late)
        assert late.state.wait_for(lambda _m: late.payloads(late.topics.manifest)
                                   and late.payloads(late.topics.round), 10)
        retained_manifest = decode_manifest(late.payloads(late.topics.manifest)[-1])
        assert (retained_manifest.version, retained_manifest.job) == (1, E2E_JOB)
        assert retained_manifest.state_sha256 != "e" * 64
        retained_round = late.payloads(late.topics.round)[-1]
        assert retained_round != forged_round
        assert decode_round(retained_round).status == "finished" and decode_round(retained_round).round == 1
    finally:
        for device in devices:
            device.close()
        fleet.stop()


# ============================================================================ (f) nothing received is executed
SOURCE_ROOTS = ("server_api", "shared", "edge_client", "broker", "migrations", "bench", "docker")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
# (file, call) -> why it is acceptable
ALLOWED_CALLS = {
    ("shared/protocol/onnx_load.py", "onnx.load_from_string"):
        "parse_onnx: bytes (never a path) under a size limit; models with external data are refused, so no "
        "file named by the sender is opened; ONNX is protobuf data, not code",
    ("shared/protocol/onnx_export.py", "onnx.load_from_string"):
        "the server's own graph templates, files shipped in the package (shared/protocol/onnx_templates), never "
        "received bytes",
    ("shared/protocol/onnx_load.py", "ort.InferenceSession"):
        "the FedGen generator: an ONNX graph of standard operators run by onnxruntime from bytes (no custom-op "
        "library is registered; parse_onnx refused external data first)",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def dangerous_uses(path: Path, rel: str) -> list[str]:
    """Unsafe deserialisation / code execution in one source file, as 'file:line: what'."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in BANNED_MODULES:
                    found.append(f"{rel}:{node.lineno}: import {name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        what = None
        static_arg = bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
        if name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec"):
            what = f"{name}()"
        elif name in ("__import__", "importlib.import_module", "import_module") and not static_arg:
            what = f"{name}() of a computed name (dynamic import)"
        elif name in ("runpy.run_path", "runpy.run_module"):
            what = f"{name}()"
        elif name.endswith(("torch.load", "jit.load")):
            what = f"{name}() (pickle-based)"
        elif name in ("np.load", "numpy.load"):
            value = _kw(node, "allow_pickle")
            if not (isinstance(value, ast.Constant) and value.value is False):
                what = f"{name}() without allow_pickle=False"
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or "Safe" not in _dotted(loader):
                what = f"{name}() without SafeLoader"
        elif name in ("yaml.unsafe_load", "yaml.full_load"):
            what = f"{name}()"
        elif name in ("onnx.load", "onnx.load_model", "onnx.load_from_string", "onnx.load_model_from_string",
                      "onnx.load_external_data_for_model") or last == "InferenceSession" \
                or last == "register_custom_ops_library":
            what = f"{name}()"
        elif last in ("from_pretrained", "load_state_dict_from_url"):
            what = f"{name}()"
        if what and (rel, name) not in ALLOWED_CALLS:
            found.append(f"{rel}:{node.lineno}: {what}")
    return found


def test_nothing_received_is_unpickled_or_executed() -> None:
    files = sorted(p for root in SOURCE_ROOTS for p in (REPO / root).rglob("*.py")
                   if ".venv" not in p.parts and "tests" not in p.parts)
    assert len(files) > 20 and REPO / "shared" / "protocol" / "messages.py" in files
    found = [hit for p in files for hit in dangerous_uses(p, p.relative_to(REPO).as_posix())]
    assert not found, "unsafe deserialisation or code execution:\n" + "\n".join(found)
    # the allowlist is not stale: each entry still matches a call in its file
    for rel, call in ALLOWED_CALLS:
        assert call + "(" in (REPO / rel).read_text(encoding="utf-8"), (rel, call)


def test_the_scan_catches_what_it_claims(tmp_path: Path) -> None:
    """The scanner itself: every banned construct is reported, the safe forms are not."""
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nfrom marshal import loads\nimport shelve\nimport numpy as np\nimport torch\n"
                   "import yaml\nimport onnx\n"
                   "eval('1')\nexec('x=1')\ntorch.load('m.pt')\nnp.load('a.npz')\nnp.load('a.npz', allow_pickle=True)\n"
                   "yaml.load(s)\nonnx.load(path)\n__import__(name)\n")
    hits = dangerous_uses(bad, "bad.py")
    for needle in ("import pickle", "import marshal", "import shelve", "eval()", "exec()", "torch.load()",
                   "np.load() without allow_pickle=False", "yaml.load() without SafeLoader", "onnx.load()",
                   "__import__() of a computed name"):
        assert any(needle in h for h in hits), (needle, hits)
    assert sum("np.load()" in h for h in hits) == 2
    good = tmp_path / "good.py"
    good.write_text("import numpy as np\nimport yaml\nmodel.eval()\n__import__('torch')\n"
                    "np.load('a.npz', allow_pickle=False)\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load(s)\n")
    assert dangerous_uses(good, "good.py") == []


# ============================================================================ (g) robust aggregation
def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].double().flatten() for k in sorted(state)])


def _rel_dist(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float((_flat(a) - _flat(b)).norm() / _flat(b).norm())


@pytest.fixture(scope="module")
def honest_round() -> dict:
    """10 clients of mnist-subset (alpha=1, 200 samples/class): 3 warm-up FedAvg rounds, then the updates of
    the round under attack, trained for real from the warmed-up global model."""
    torch.set_num_threads(1)
    cfg = AlgorithmConfig(algorithm="fedavg", local_steps=20)
    dataset = load_dataset("mnist-subset")
    users = partition(dataset, PartitionSpec(users=10, alpha=1.0, samples_per_class=200, seed=7))
    gs = GlobalState(cfg, dataset.info.image_shape, dataset.info.num_classes, seed=7)
    test = (np.concatenate([u.test_x for u in users]), np.concatenate([u.test_y for u in users]))

    def train_all(r: int) -> list:
        return [local_update(gs.model, gs.state, u.train_x, u.train_y, cfg, r, round_seed(7, r, u.user))
                for u in users]

    for r in range(3):
        acc = RoundAccumulator()
        for u, res in zip(users, train_all(r)):
            acc.add(res.upload, res.num_samples, res.label_counts, client=u.user)
        gs.close_round(acc, r)
    results = train_all(3)
    return {"gs": gs, "users": users, "test": test, "results": results, "spec": tensor_spec(results[0].upload)}


def _aggregate(mode: str, honest: list, poisoned: list[dict[str, torch.Tensor]], trim_ratio: float = 0.25
               ) -> dict[str, torch.Tensor]:
    acc = RoundAccumulator(mode=mode, trim_ratio=trim_ratio)
    for i, res in enumerate(honest):
        acc.add(res.upload, res.num_samples, res.label_counts, client=f"h{i}")
    n = int(np.median([r.num_samples for r in honest]))
    for i, upload in enumerate(poisoned):  # attackers claim an ordinary sample count
        acc.add(upload, n, np.bincount(np.arange(n) % 10, minlength=10), client=f"p{i}")
    return acc.result()


def _accuracy(setup: dict, state: dict[str, torch.Tensor]) -> float:
    gs = setup["gs"]
    full = {**gs.state, **state}
    return evaluate(gs.model, full, *setup["test"]).accuracy


def test_robust_aggregation_resists_poisoned_updates(honest_round: dict) -> None:
    """10 honest updates + 3 poisoned (two x -10, one with N(0, 20^2) noise), all well-formed on the wire:
    median and trimmed mean (trim_ratio 0.25 > 3/13) stay close to the clean aggregate, plain mean is wrecked.
    The default trim_ratio 0.1 trims 1 per side of 13: not enough against 3 attackers (documented below)."""
    results = honest_round["results"]
    gen = torch.Generator().manual_seed(0)
    poisoned = [{k: -10.0 * v for k, v in results[0].upload.items()},
                {k: -10.0 * v for k, v in results[1].upload.items()},
                {k: v + 20.0 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                 for k, v in results[2].upload.items()}]
    for upload in poisoned:  # the server's wire checks accept them: the attack is "well-formed"
        decode_tensors(encode_tensors(upload), honest_round["spec"])

    clean = RunningWeightedMean()
    for res in results:
        clean.add(res.upload, float(res.num_samples))
    clean_state = clean.result()
    clean_acc = _accuracy(honest_round, clean_state)
    assert clean_acc > 0.6, clean_acc  # the warmed-up federation is a real model

    report = {}
    for mode in ("median", "trimmed_mean", "mean"):
        state = _aggregate(mode, results, poisoned)
        report[mode] = (_rel_dist(state, clean_state), _accuracy(honest_round, state))
    print("clean accuracy", clean_acc, "; (relative L2 distance to clean, accuracy):", report)
    for mode in ("median", "trimmed_mean"):
        dist, acc = report[mode]
        assert dist < 0.1, (mode, report)
        assert acc >= clean_acc - 0.05, (mode, clean_acc, report)
    dist, acc = report["mean"]
    assert dist > 1.0 and acc < clean_acc - 0.3, ("mean should be wrecked", clean_acc, report)
    # without attackers the robust rules are close to the mean as well (they cost little accuracy)
    for mode in ("median", "trimmed_mean"):
        assert _accuracy(honest_round, _aggregate(mode, results, [])) >= clean_acc - 0.05
    # the default trim ratio (0.1) trims one value per side of 13: 3 attackers get through
    default_trim = _aggregate("trimmed_mean", results, poisoned, trim_ratio=0.1)
    assert _rel_dist(default_trim, clean_state) > 0.3


def _attacker(device: RawDevice, stop: threading.Event, sent: list[str], seed: int) -> None:
    """Every round that selects it: a well-formed update of N(0, 10^2) noise claiming 10,000 samples."""
    gen, last = torch.Generator().manual_seed(seed), -1
    while not stop.is_set():
        try:
            ann, manifest = device.wait_open_round(after=last, timeout=2)
        except TimeoutError:
            continue
        noise = {k: 10.0 * torch.randn(v.shape, generator=gen).to(v.dtype)
                 for k, v in device.template(manifest).items()}
        sent.append(device.send_update(ann, manifest, noise, num_samples=10_000))
        last = ann.round


def test_median_fleet_job_survives_poisoning_clients(tmp_path: Path) -> None:
    """A 5-client fleet job (aggregation=median, every client selected every round): c3 and c4 are raw paho
    impersonators sending poisoned but valid updates, whose updates the server accepts. The job finishes
    and its accuracy stays well above chance and close to the same fleet with 5 honest edge-clients."""
    _require_mosquitto()
    base = dict(clients=5, active=5, rounds=3, alpha=1.0, samples_per_class=100, local_steps=20, seed=4,
                algorithm="fedavg", aggregation="median", round_timeout_s=150, progress=False)
    results = {}
    for run in ("clean", "attacked"):
        with start_mosquitto(DEV_CONF, tmp_path / f"broker-{run}") as broker:
            fleet = Fleet(FleetConfig(**base, broker_url=broker.url, workdir=tmp_path / run))
            stop, sent, threads, devices = threading.Event(), [], [], []
            try:
                fleet.start_broker()
                fleet.start_server()
                fleet.request("POST", "/jobs", fleet.cfg.job_config())
                honest = range(5) if run == "clean" else range(3)
                for index in honest:
                    fleet.start_client(index)
                if run == "attacked":
                    for index in (3, 4):
                        device = RawDevice(broker.port, f"c{index}", fleet.job_id)
                        device.announce(num_samples=10_000)
                        devices.append(device)
                        threads.append(threading.Thread(target=_attacker, args=(device, stop, sent, index),
                                                        daemon=True))
                        threads[-1].start()
                summary = fleet.wait(timeout=600)
                assert summary["job_status"] == "finished", summary
                results[run] = summary
                if run == "attacked":
                    updates = accepted_updates(fleet)
                    poisoned = [u for u in updates if u.idempotency_key in sent]
                    assert len(poisoned) == 2 * base["rounds"], "the attack did not happen"
                    assert all(u.status == UpdateStatus.ACCEPTED for u in poisoned)
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=10)
                for device in devices:
                    device.close()
                fleet.stop()
    clean, attacked = results["clean"]["final_accuracy"], results["attacked"]["final_accuracy"]
    print(f"final accuracy: clean {clean:.4f}, with 2 of 5 clients poisoning {attacked:.4f}")
    assert attacked > 0.35, (clean, attacked)  # chance is 0.1; a poisoned mean gives ~chance
    assert attacked >= clean - 0.15, (clean, attacked)
