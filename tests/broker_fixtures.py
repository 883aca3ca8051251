"""Pytest plugin: real Mosquitto brokers and paho-mqtt client helpers.

Fixtures
--------
``mosquitto_dev``    function scope: ``broker/mosquitto/dev.conf`` on a free port, fresh persistence.
``mosquitto_prod``   session scope: ``broker/mosquitto/prod.conf`` with a password file and ACL
                     made by ``broker/create_users.py`` for ``fedgen-server``, ``dev-a`` and
                     ``dev-b`` (job ``job1``), and a TLS listener with certificates from
                     ``broker/certs.py``.  Shared by tests: use distinct topics per test.
``mqtt_clients``     factory ``(port, client_id, **kw) -> paho Client``; disconnects at teardown.

Every broker is started by ``server_api.broker_process.start_mosquitto``; the tests are
skipped when no ``mosquitto`` binary exists.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessage, MQTTv311

from server_api.devfleet.broker_process import BrokerProcess, TLSFiles, find_mosquitto, start_mosquitto

REPO_ROOT = Path(__file__).resolve().parent.parent
BROKER_DIR = REPO_ROOT / "broker"
DEV_CONF = BROKER_DIR / "mosquitto" / "dev.conf"
PROD_CONF = BROKER_DIR / "mosquitto" / "prod.conf"
PROD_USERS = {"fedgen-server": None, "dev-a": "job1", "dev-b": "job1"}  # user -> job (None: server)
CONNECT_TIMEOUT = 5.0


class ConnectRefused(ConnectionError):
    """The broker answered CONNACK with a failure; ``reason_code`` is paho's ReasonCode."""

    def __init__(self, client_id: str, reason_code: Any) -> None:
        value = getattr(reason_code, "value", reason_code)
        super().__init__(f"{client_id}: CONNACK refused: {reason_code} (value {value})")
        self.reason_code = reason_code


@dataclass
class ClientState:
    """Per-client userdata: received messages, CONNACK and SUBACK results."""

    messages: list[MQTTMessage] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    connack: Any = None
    connected: threading.Event = field(default_factory=threading.Event)
    subacks: dict[int, list[Any]] = field(default_factory=dict)

    def wait_for(self, predicate: Callable[[list[MQTTMessage]], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.messages), timeout)

    def wait_count(self, n: int, timeout: float) -> bool:
        return self.wait_for(lambda msgs: len(msgs) >= n, timeout)

    def on_topic(self, topic: str) -> list[MQTTMessage]:
        with self.cond:
            return [m for m in self.messages if m.topic == topic]


def _on_connect(client: Client, state: ClientState, flags: Any, reason_code: Any, properties: Any) -> None:
    state.connack = reason_code
    state.connected.set()


def _on_message(client: Client, state: ClientState, msg: MQTTMessage) -> None:
    with state.cond:
        state.messages.append(msg)
        state.cond.notify_all()


def _on_subscribe(client: Client, state: ClientState, mid: int, codes: list[Any], properties: Any) -> None:
    with state.cond:
        state.subacks[mid] = list(codes)
        state.cond.notify_all()


def state_of(client: Client) -> ClientState:
    """The :class:`ClientState` attached to a client made by :func:`connect_client`."""
    return client.user_data_get()  # type: ignore[no-any-return]


def connect_client(port: int, client_id: str, *, host: str = "127.0.0.1", username: str | None = None,
                   password: str | None = None, clean_session: bool = True, ca_certs: Path | None = None,
                   tls_default_trust: bool = False, will: tuple[str, bytes, int, bool] | None = None,
                   client_cert: tuple[Path, Path] | None = None, timeout: float = CONNECT_TIMEOUT) -> Client:
    """Connect an MQTT 3.1.1 paho client, wait for CONNACK, return it with its loop running.

    Raises :class:`ConnectRefused` on a failure CONNACK, ``TimeoutError`` without one, and
    lets TLS errors (``ssl.SSLError``) from the handshake propagate.
    """
    state = ClientState()
    client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTv311,
                    clean_session=clean_session, userdata=state)
    client.on_connect, client.on_message, client.on_subscribe = _on_connect, _on_message, _on_subscribe
    if username is not None:
        client.username_pw_set(username, password)
    if will is not None:
        client.will_set(will[0], will[1], qos=will[2], retain=will[3])
    if ca_certs is not None:
        cert, key = client_cert or (None, None)
        client.tls_set(ca_certs=str(ca_certs), certfile=cert and str(cert), keyfile=key and str(key))
    elif tls_default_trust:
        client.tls_set()  # system trust store: must NOT trust the dev CA
    client.connect(host, port, keepalive=30)
    client.loop_start()
    if not state.connected.wait(timeout):
        _close(client)
        raise TimeoutError(f"{client_id}: no CONNACK from {host}:{port} within {timeout}s")
    if state.connack.is_failure:
        _close(client)
        raise ConnectRefused(client_id, state.connack)
    return client


def subscribe(client: Client, topic: str, qos: int = 1, timeout: float = CONNECT_TIMEOUT) -> list[Any]:
    """Subscribe and wait for the SUBACK; return its reason codes (paho ReasonCode objects)."""
    state = state_of(client)
    result, mid = client.subscribe(topic, qos)
    if result != 0:
        raise RuntimeError(f"subscribe({topic!r}) not sent: rc={result}")
    with state.cond:
        if not state.cond.wait_for(lambda: mid in state.subacks, timeout):
            raise TimeoutError(f"no SUBACK for {topic!r} within {timeout}s")
        return state.subacks[mid]


def publish(client: Client, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
            timeout: float = CONNECT_TIMEOUT) -> None:
    """Publish and, for QoS > 0, wait for the broker's acknowledgement."""
    info = client.publish(topic, payload, qos=qos, retain=retain)
    if qos > 0:
        info.wait_for_publish(timeout)


def _close(client: Client) -> None:
    try:
        client.disconnect()
    finally:
        client.loop_stop()


@pytest.fixture
def mqtt_clients() -> Iterator[Callable[..., Client]]:
    """Factory of connected clients (see :func:`connect_client`); all are closed at teardown."""
    made: list[Client] = []

    def make(port: int, client_id: str, **kwargs: Any) -> Client:
        client = connect_client(port, client_id, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        _close(client)


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        if os.environ.get("FEDGEN_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("mosquitto binary not installed, and FEDGEN_REQUIRE_MOSQUITTO=1")
        pytest.skip("mosquitto binary not installed")


@pytest.fixture
def mosquitto_dev(tmp_path: Path) -> Iterator[BrokerProcess]:
    """The development broker (anonymous, persistence in tmp_path) on a free port."""
    _require_mosquitto()
    with start_mosquitto(DEV_CONF, tmp_path / "mosquitto-dev") as broker:
        yield broker


@dataclass
class ProdBroker:
    """A running production-config broker plus what a test needs to log in."""

    broker: BrokerProcess
    passwords: dict[str, str]
    ca_file: Path
    password_file: Path
    acl_file: Path

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def tls_port(self) -> int:
        assert self.broker.tls_port is not None
        return self.broker.tls_port

    @property
    def url(self) -> str:
        return self.broker.url


def run_create_users(password_file: Path, acl_file: Path, *args: str,
                     stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``broker/create_users.py`` as the operator would."""
    argv = [sys.executable, str(BROKER_DIR / "create_users.py"), "--password-file", str(password_file),
            "--acl-file", str(acl_file), *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False, timeout=30)


def _make_users(directory: Path) -> tuple[dict[str, str], Path, Path]:
    passwd, acl = directory / "passwd", directory / "acl"
    passwords = {}
    for user, job in PROD_USERS.items():
        password = f"pw-{user}-{time.monotonic_ns()}"
        cmd = ["add-server", "--user", user] if job is None else ["add-device", user, "--job", job]
        done = run_create_users(passwd, acl, *cmd, "--password-stdin", stdin=password + "\n")
        if done.returncode != 0:
            raise RuntimeError(f"create_users.py {' '.join(cmd)} failed: {done.stderr}")
        passwords[user] = password
    return passwords, passwd, acl


def make_certs(directory: Path) -> TLSFiles:
    done = subprocess.run([sys.executable, str(BROKER_DIR / "certs.py"), "--out", str(directory)],
                          capture_output=True, text=True, check=False, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"broker/certs.py failed: {done.stderr}")
    return TLSFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                    crlfile=directory / "crl.pem")


@pytest.fixture(scope="session")
def mosquitto_prod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProdBroker]:
    """The production config with real users, ACL and TLS; shared by the whole session."""
    _require_mosquitto()
    root = tmp_path_factory.mktemp("mosquitto-prod")
    passwords, passwd, acl = _make_users(root / "auth")
    tls = make_certs(root / "certs")
    with start_mosquitto(PROD_CONF, root / "broker", tls=tls, password_file=passwd, acl_file=acl) as broker:
        yield ProdBroker(broker, passwords, tls.cafile, passwd, acl)


__all__ = [
    "ConnectRefused", "ClientState", "ProdBroker", "connect_client", "publish", "run_create_users",
    "state_of", "subscribe",
]
