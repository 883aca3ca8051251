"""Tests of the embedded MQTT 3.1.1 broker (server_api/devfleet/embedded/) with real paho clients.

Brokers run in a thread (``run_in_thread``) on a free port, or as a subprocess through
``server_api.devfleet.broker_process.start_embedded_broker``; a system Mosquitto is never used.
Negative checks ("X is NOT delivered") are made non-vacuous with a positive control published
after the forbidden message: the broker keeps per-publisher order, so once the control has
arrived the forbidden message would have arrived too.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.client import CallbackAPIVersion, Client, MQTTMessage, MQTTv311

from server_api.devfleet.broker_process import start_embedded_broker
from server_api.devfleet.embedded import BrokerThread, PersistenceError, run_in_thread
from server_api.devfleet.embedded.packets import (
    SUPPORTED_PROTOCOLS,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    ProtocolError,
    PubAck,
    Publish,
    Subscribe,
    Unsubscribe,
    Will,
    decode_frame,
    decode_packet,
    decode_remaining_length,
    encode_publish,
    encode_remaining_length,
    topic_matches,
)

pytestmark = pytest.mark.timeout(30)
WAIT = 5.0

# ------------------------------------------------------------------------------- paho helpers


@dataclass
class Rec:
    """What a paho client saw: messages, CONNACK, disconnects."""

    messages: list[MQTTMessage] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    reason: Any = None
    session_present: bool | None = None

    def wait_count(self, n: int, timeout: float = WAIT) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.messages) >= n, timeout)

    def wait_topic(self, topic: str, timeout: float = WAIT) -> MQTTMessage:
        with self.cond:
            assert self.cond.wait_for(lambda: any(m.topic == topic for m in self.messages), timeout), topic
            return next(m for m in self.messages if m.topic == topic)

    def topics(self) -> list[str]:
        with self.cond:
            return [m.topic for m in self.messages]


def _on_connect(client: Client, rec: Rec, flags: Any, reason: Any, properties: Any) -> None:
    rec.reason, rec.session_present = reason, bool(flags.session_present)
    rec.connected.set()


def _on_message(client: Client, rec: Rec, msg: MQTTMessage) -> None:
    with rec.cond:
        rec.messages.append(msg)
        rec.cond.notify_all()


def _on_disconnect(client: Client, rec: Rec, flags: Any, reason: Any, properties: Any) -> None:
    rec.disconnected.set()


def rec_of(client: Client) -> Rec:
    return client.user_data_get()  # type: ignore[no-any-return]


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """Factory ``(port, client_id, clean=True, will=None, username=None, password=None, keepalive=30)``."""
    made: list[Client] = []

    def make(port: int, client_id: str, *, clean: bool = True,
             will: tuple[str, bytes, int, bool] | None = None, username: str | None = None,
             password: str | None = None, keepalive: int = 30, expect_ok: bool = True) -> Client:
        rec = Rec()
        client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTv311,
                        clean_session=clean, userdata=rec)
        client.on_connect, client.on_message, client.on_disconnect = _on_connect, _on_message, _on_disconnect
        client.reconnect_delay_set(60, 120)  # never reconnect on its own during a test
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        client.connect("127.0.0.1", port, keepalive=keepalive)
        client.loop_start()
        made.append(client)
        assert rec.connected.wait(WAIT), f"{client_id}: no CONNACK"
        if expect_ok:
            assert not rec.reason.is_failure, f"{client_id}: refused: {rec.reason}"
        return client

    yield make
    for client in made:
        client.disconnect()
        client.loop_stop()


def sub(client: Client, topic: str, qos: int = 1) -> None:
    """Subscribe and wait for the SUBACK."""
    done = threading.Event()
    client.on_subscribe = lambda *args: done.set()
    result, _ = client.subscribe(topic, qos)
    assert result == 0 and done.wait(WAIT), f"no SUBACK for {topic}"


def pub(client: Client, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
    info = client.publish(topic, payload, qos=qos, retain=retain)
    if qos:
        info.wait_for_publish(WAIT)
        assert info.is_published()


def round_trip(clients: Callable[..., Client], port: int, tag: str) -> None:
    """A fresh subscriber receives a fresh publisher's QoS 1 message."""
    s = clients(port, f"rt-sub-{tag}")
    sub(s, f"rt/{tag}")
    pub(clients(port, f"rt-pub-{tag}"), f"rt/{tag}", b"ping")
    assert rec_of(s).wait_topic(f"rt/{tag}").payload == b"ping"


# ------------------------------------------------------------------------------- raw socket helpers


def _s(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return len(raw).to_bytes(2, "big") + raw


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_remaining_length(len(body)) + body


def connect_bytes(client_id: str, *, clean: bool = True, keepalive: int = 30,
                  will: tuple[str, bytes, int, bool] | None = None, username: str | None = None,
                  password: str | bytes | None = None, name: str = "MQTT", level: int = 4) -> bytes:
    flags, payload = (0x02 if clean else 0), _s(client_id)
    if will is not None:
        flags |= 0x04 | (will[2] << 3) | (0x20 if will[3] else 0)
        payload += _s(will[0]) + _s(will[1])
    if username is not None:
        flags, payload = flags | 0x80, payload + _s(username)
    if password is not None:
        flags, payload = flags | 0x40, payload + _s(password)
    return frame(0x10, _s(name) + bytes([level, flags]) + keepalive.to_bytes(2, "big") + payload)


def subscribe_bytes(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    return frame(0x82, packet_id.to_bytes(2, "big") + b"".join(_s(f) + bytes([q]) for f, q in filters))


class Raw:
    """A hand-driven MQTT connection for what paho will not send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, timeout: float = WAIT) -> tuple[int, bytes]:
        """Next packet: (first byte, body)."""
        self.sock.settimeout(timeout)
        while True:
            parsed = decode_remaining_length(self.buf, 1) if len(self.buf) > 1 else None
            if parsed is not None and len(self.buf) >= parsed[1] + parsed[0]:
                length, start = parsed
                first, body, self.buf = self.buf[0], self.buf[start:start + length], self.buf[start + length:]
                return first, body
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed while reading a packet"
            self.buf += chunk

    def connect(self, client_id: str, **kwargs: Any) -> tuple[int, int]:
        """Send CONNECT; return (session_present, return code)."""
        self.send(connect_bytes(client_id, **kwargs))
        first, body = self.read()
        assert first == 0x20 and len(body) == 2
        return body[0], body[1]

    def assert_closed(self, timeout: float = 3.0) -> None:
        """The broker closes the connection within ``timeout`` (any bytes before are ignored)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return
        except ConnectionResetError:
            return
        except TimeoutError:
            pass
        pytest.fail("the broker did not close the connection")

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------- brokers


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    """One broker with default options, shared by the tests that use distinct topics."""
    with run_in_thread() as handle:
        yield handle


@pytest.fixture
def fresh_broker() -> Iterator[Callable[..., BrokerThread]]:
    made: list[BrokerThread] = []

    def make(**options: Any) -> BrokerThread:
        made.append(run_in_thread(**options))
        return made[-1]

    yield make
    for handle in made:
        handle.stop()


# ------------------------------------------------------------------------------- tests


def test_qos1_round_trip(broker: BrokerThread, clients: Callable[..., Client]) -> None:
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    s = clients(broker.port, "rt1-sub")
    sub(s, "a/rt")
    pub(clients(broker.port, "rt1-pub"), "a/rt", b"\x00\x01payload")
    msg = rec_of(s).wait_topic("a/rt")
    assert (msg.payload, msg.qos, msg.retain) == (b"\x00\x01payload", 1, False)


def test_retained_late_subscriber_and_delete(broker: BrokerThread, clients: Callable[..., Client]) -> None:
    p = clients(broker.port, "ret-pub")
    pub(p, "ret/a", b"v1", retain=True)
    late = clients(broker.port, "ret-late")
    sub(late, "ret/#")
    msg = rec_of(late).wait_topic("ret/a")
    assert (msg.payload, msg.retain, msg.qos) == (b"v1", True, 1)
    low = clients(broker.port, "ret-low")
    sub(low, "ret/a", qos=0)
    assert rec_of(low).wait_topic("ret/a").qos == 0  # min(message QoS, granted QoS)

    pub(p, "ret/a", b"", retain=True)  # deletes
    later = clients(broker.port, "ret-later")
    sub(later, "ret/#")
    pub(p, "ret/ctl", b"control")
    rec_of(later).wait_topic("ret/ctl")
    assert rec_of(later).topics() == ["ret/ctl"]


def test_wildcards_and_dollar_topics(broker: BrokerThread, clients: Callable[..., Client]) -> None:
    subs = {}
    filters = {"plus": "w/+/x", "hash": "w/#", "all": "#", "first": "+/w", "sys": "$SYS/#"}
    for name, topic_filter in filters.items():
        subs[name] = clients(broker.port, f"wc-{name}")
        sub(subs[name], topic_filter)
    p = clients(broker.port, "wc-pub")
    for topic in ("w/a/x", "w/a/b/x", "w", "$SYS/w", "zz/w"):
        pub(p, topic, topic)
    for rec in map(rec_of, subs.values()):
        rec.wait_count(1)
    # each subscriber's last expected message (deliveries to different subscribers are not ordered)
    rec_of(subs["all"]).wait_topic("zz/w")
    rec_of(subs["first"]).wait_topic("zz/w")
    rec_of(subs["sys"]).wait_topic("$SYS/w")
    rec_of(subs["hash"]).wait_topic("w")
    rec_of(subs["plus"]).wait_topic("w/a/x")
    pub(p, "zz/end", b"end")  # ordered after everything above, so nothing more can still arrive for "all"
    rec_of(subs["all"]).wait_topic("zz/end")
    mine = {"w/a/x", "w/a/b/x", "w", "$SYS/w", "zz/w"}
    got = {name: [t for t in rec_of(c).topics() if t in mine] for name, c in subs.items()}
    assert got["plus"] == ["w/a/x"]
    assert got["hash"] == ["w/a/x", "w/a/b/x", "w"]
    assert got["all"] == ["w/a/x", "w/a/b/x", "w", "zz/w"]  # no $SYS/w
    assert got["first"] == ["zz/w"]  # "+/w" does not match "$SYS/w"
    assert got["sys"] == ["$SYS/w"]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/b/d", False), ("a/#", "a", True), ("a/#", "a/b/c", True),
    ("+", "a", True), ("+", "a/b", False), ("+/+", "/x", True), ("#", "$SYS/x", False),
    ("$SYS/#", "$SYS/x", True), ("+/x", "$SYS/x", False), ("a/b", "a/b/", False),
])
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


def test_invalid_filters_get_0x80_and_qos2_is_downgraded(broker: BrokerThread) -> None:
    raw = Raw(broker.port)
    assert raw.connect("raw-subs") == (0, 0)
    raw.send(subscribe_bytes(7, [("ok/+", 1), ("bad/#/x", 1), ("$share//x", 1), ("a+b", 0), ("q2/#", 2)]))
    first, body = raw.read()
    assert first == 0x90 and body == bytes([0, 7, 1, 0x80, 0x80, 0x80, 1])
    raw.close()


def test_shared_subscription_round_robin(broker: BrokerThread, clients: Callable[..., Client]) -> None:
    p = clients(broker.port, "sh-pub")
    pub(p, "sh/retained", b"r", retain=True)
    members = [clients(broker.port, f"sh-m{i}") for i in range(2)]
    for member in members:
        sub(member, "$share/grp/sh/+")
    normal = clients(broker.port, "sh-normal")
    sub(normal, "sh/+")
    rec_of(normal).wait_topic("sh/retained")  # a normal subscription gets the retained message
    for i in range(20):
        pub(p, "sh/x", str(i))
    assert rec_of(normal).wait_count(21)
    assert all(rec_of(m).wait_count(10) for m in members)
    payloads = [[m.payload for m in rec_of(m).messages] for m in members]
    assert sorted(payloads[0] + payloads[1]) == sorted(str(i).encode() for i in range(20))  # each once
    assert len(payloads[0]) == len(payloads[1]) == 10  # round-robin, no retained message
    pub(p, "sh/retained", b"", retain=True)


def test_persistent_session_receives_3000_queued_messages(broker: BrokerThread,
                                                          clients: Callable[..., Client]) -> None:
    s = clients(broker.port, "ps-sub", clean=False)
    sub(s, "ps/#")
    s.disconnect()
    s.loop_stop()
    p = clients(broker.port, "ps-pub")
    infos = [p.publish(f"ps/{i % 7}", str(i), qos=1) for i in range(3000)]
    for info in infos:
        info.wait_for_publish(WAIT)
    again = clients(broker.port, "ps-sub", clean=False)
    rec = rec_of(again)
    assert rec.session_present is True
    assert rec.wait_count(3000, timeout=15)
    time.sleep(0.3)  # anything duplicated would have arrived by now
    payloads = [m.payload for m in rec.messages]
    assert len(payloads) == 3000 and set(payloads) == {str(i).encode() for i in range(3000)}
    assert not any(m.retain for m in rec.messages)


def test_inflight_message_resent_with_dup_on_reconnect(broker: BrokerThread,
                                                        clients: Callable[..., Client]) -> None:
    raw = Raw(broker.port)
    assert raw.connect("dup-raw", clean=False) == (0, 0)
    raw.send(subscribe_bytes(1, [("dup/t", 1)]))
    assert raw.read()[0] == 0x90
    pub(clients(broker.port, "dup-pub"), "dup/t", b"once")
    first, body = raw.read()
    assert first == 0x32 and body.endswith(b"once")  # QoS 1, DUP 0; never acknowledged
    raw.close()
    raw = Raw(broker.port)
    assert raw.connect("dup-raw", clean=False) == (1, 0)
    first2, body2 = raw.read()
    assert first2 == 0x3A and body2 == body  # DUP 1, same packet id and payload
    raw.send(frame(0x40, body2[len("dup/t") + 2:len("dup/t") + 4]))  # PUBACK
    raw.send(frame(0xE0, b""))
    raw.close()


def test_will_on_abnormal_disconnect_only(broker: BrokerThread, clients: Callable[..., Client]) -> None:
    watcher = clients(broker.port, "will-watch")
    sub(watcher, "will/#")
    killed = Raw(broker.port)
    assert killed.connect("will-a", will=("will/a", b"a-gone", 1, True)) == (0, 0)
    killed.sock.shutdown(socket.SHUT_RDWR)
    killed.close()  # no DISCONNECT
    assert rec_of(watcher).wait_topic("will/a").payload == b"a-gone"

    polite = Raw(broker.port)
    assert polite.connect("will-b", will=("will/b", b"b-gone", 1, False)) == (0, 0)
    polite.send(frame(0xE0, b""))  # DISCONNECT
    polite.assert_closed()
    polite.close()
    pub(clients(broker.port, "will-ctl"), "will/ctl", b"c")
    rec_of(watcher).wait_topic("will/ctl")
    assert "will/b" not in rec_of(watcher).topics()

    late = clients(broker.port, "will-late")  # the will was retained
    sub(late, "will/a")
    msg = rec_of(late).wait_topic("will/a")
    assert msg.retain and msg.payload == b"a-gone"
    pub(watcher, "will/a", b"", retain=True)


def test_keepalive_expiry_publishes_will(broker: BrokerThread, clients: Callable[..., Client]) -> None:
    watcher = clients(broker.port, "ka-watch")
    sub(watcher, "ka/will")
    silent = Raw(broker.port)
    started = time.monotonic()
    assert silent.connect("ka-silent", keepalive=1, will=("ka/will", b"timeout", 1, False)) == (0, 0)
    silent.assert_closed(timeout=4)
    assert time.monotonic() - started >= 1.4  # 1.5 x keep-alive
    assert rec_of(watcher).wait_topic("ka/will").payload == b"timeout"
    silent.close()


def test_session_takeover(broker: BrokerThread, clients: Callable[..., Client]) -> None:
    watcher = clients(broker.port, "tk-watch")
    sub(watcher, "tk/#")
    old = clients(broker.port, "tk-dup", will=("tk/will", b"old-gone", 1, False))
    new = clients(broker.port, "tk-dup")
    assert rec_of(old).disconnected.wait(WAIT)
    # Mosquitto 2.0.11 publishes the will of the connection it closes on takeover: so do we.
    assert rec_of(watcher).wait_topic("tk/will").payload == b"old-gone"
    sub(new, "tk/new")
    pub(watcher, "tk/new", b"still works")
    assert rec_of(new).wait_topic("tk/new").payload == b"still works"


def test_connack_codes(fresh_broker: Callable[..., BrokerThread], broker: BrokerThread,
                       clients: Callable[..., Client]) -> None:
    secured = fresh_broker(users={"alice": "s3cret"}, allow_anonymous=False)
    cases = [({"username": "alice", "password": "wrong"}, 4), ({"username": "bob", "password": "x"}, 4),
             ({"username": "alice"}, 4), ({}, 5), ({"username": "alice", "password": "s3cret"}, 0)]
    for kwargs, code in cases:
        raw = Raw(secured.port)
        assert raw.connect("auth-raw", **kwargs) == (0, code), kwargs
        if code:
            raw.assert_closed()
        raw.close()
    refused = clients(secured.port, "auth-paho", username="alice", password="nope", expect_ok=False)
    assert rec_of(refused).reason == "Bad user name or password"
    anonymous = clients(secured.port, "auth-anon", expect_ok=False)
    assert rec_of(anonymous).reason == "Not authorized"
    clients(secured.port, "auth-ok", username="alice", password="s3cret")

    for kwargs, code in [({"level": 5}, 1), ({"clean": False, "client_id": ""}, 2)]:
        raw = Raw(broker.port)
        assert raw.connect(**{"client_id": "codes", **kwargs}) == (0, code)
        raw.assert_closed()
        raw.close()
    for kwargs in [{"client_id": ""}, {"client_id": "v31", "name": "MQIsdp", "level": 3}]:
        raw = Raw(broker.port)  # empty id + clean session: the broker assigns one; MQTT 3.1 accepted
        assert raw.connect(**kwargs) == (0, 0)
        raw.send(b"\xc0\x00")
        assert raw.read() == (0xD0, b"")  # PINGRESP
        raw.close()


MALFORMED_BEFORE_CONNECT = {
    "garbage": b"\xff\xfe\x00garbage",
    "huge_remaining_length": b"\x10\xff\xff\xff\x7f",
    "bad_length_encoding": b"\x10\xff\xff\xff\xff\x01",
    "truncated_inner_string": frame(0x10, _s("MQTT") + bytes([4, 2, 0, 30]) + b"\x00\x50abc"),
    "connect_bad_flags": b"\x11\x00",
    "publish_before_connect": frame(0x30, _s("x") + b"p"),
    "unknown_protocol": frame(0x10, _s("HTTP") + bytes([4, 2, 0, 30]) + _s("c")),
}
MALFORMED_AFTER_CONNECT = {
    "subscribe_flags_zero": frame(0x80, b"\x00\x01" + _s("a") + b"\x01"),
    "qos2_publish": frame(0x34, _s("a") + b"\x00\x01p"),
    "pubrel": frame(0x62, b"\x00\x01"),
    "wildcard_topic": frame(0x30, _s("a/+") + b"p"),
    "second_connect": connect_bytes("again"),
    "server_packet": frame(0x20, b"\x00\x00"),
    "huge_subscribe": b"\x82\xff\xff\xff\x7f",
    "invalid_utf8_topic": frame(0x30, _s(b"\xff\xfe") + b"p"),
}


@pytest.mark.parametrize("name", [*MALFORMED_BEFORE_CONNECT, *MALFORMED_AFTER_CONNECT, "truncated_then_eof"])
def test_malformed_input_closes_only_that_connection(name: str, broker: BrokerThread,
                                                     clients: Callable[..., Client]) -> None:
    bystander = clients(broker.port, f"mal-by-{name}")
    sub(bystander, f"mal/{name}")
    raw = Raw(broker.port)
    if name in MALFORMED_AFTER_CONNECT:
        assert raw.connect(f"mal-{name}") == (0, 0)
        raw.send(MALFORMED_AFTER_CONNECT[name])
    elif name == "truncated_then_eof":
        raw.send(connect_bytes("mal-trunc")[:-3])
        raw.sock.shutdown(socket.SHUT_WR)
    else:
        raw.send(MALFORMED_BEFORE_CONNECT[name])
    raw.assert_closed()
    raw.close()
    pub(clients(broker.port, f"mal-pub-{name}"), f"mal/{name}", b"alive")
    assert rec_of(bystander).wait_topic(f"mal/{name}").payload == b"alive"


def test_oversized_publish_dropped_connection_kept(fresh_broker: Callable[..., BrokerThread],
                                                   clients: Callable[..., Client],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    small = fresh_broker(max_payload_size=1024)
    s = clients(small.port, "big-sub")
    sub(s, "big/#")
    p = clients(small.port, "big-pub")
    with caplog.at_level(logging.WARNING, logger="fedgen.broker"):
        pub(p, "big/a", b"x" * 2048)  # buffered, then dropped; PUBACK still sent
        pub(p, "big/b", b"y" * 200_000)  # beyond the buffer limit: discarded while reading
        pub(p, "big/ok", b"z" * 1024)
        assert rec_of(s).wait_topic("big/ok").payload == b"z" * 1024
    assert rec_of(s).topics() == ["big/ok"] and p.is_connected()
    assert sum("exceeds max_payload_size" in r.getMessage() for r in caplog.records) == 2


def test_queue_limit_drops_with_warning(fresh_broker: Callable[..., BrokerThread],
                                        clients: Callable[..., Client],
                                        caplog: pytest.LogCaptureFixture) -> None:
    limited = fresh_broker(max_queued_messages=5)
    s = clients(limited.port, "ql-sub", clean=False)
    sub(s, "ql/#")
    s.disconnect()
    s.loop_stop()
    p = clients(limited.port, "ql-pub")
    with caplog.at_level(logging.WARNING, logger="fedgen.broker"):
        for i in range(12):
            pub(p, "ql/t", str(i))
        again = clients(limited.port, "ql-sub", clean=False)
        assert rec_of(again).wait_count(5)
        pub(p, "ql/ctl", b"c")
        rec_of(again).wait_topic("ql/ctl")
    assert [m.payload for m in rec_of(again).messages] == [b"0", b"1", b"2", b"3", b"4", b"c"]
    assert any("queue full" in r.getMessage() for r in caplog.records)


def test_persistence_survives_restart(tmp_path: Path, clients: Callable[..., Client]) -> None:
    path = tmp_path / "state" / "broker.json"
    first = run_in_thread(persistence_path=path, autosave_interval=0)
    try:
        keeper = clients(first.port, "keeper", clean=False)
        sub(keeper, "keep/#")
        keeper.disconnect()
        keeper.loop_stop()
        p = clients(first.port, "keep-pub")
        pub(p, "keep/ret", b"R", retain=True)
        pub(p, "keep/q", b"Q\x00binary")
    finally:
        first.stop()
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["format"] == "fedgen-embedded-broker"
    assert [s["client_id"] for s in saved["sessions"]] == ["keeper"]
    with run_in_thread(persistence_path=path) as second:
        keeper = clients(second.port, "keeper", clean=False)
        assert rec_of(keeper).session_present is True
        assert rec_of(keeper).wait_count(2)
        assert sorted((m.topic, m.payload) for m in rec_of(keeper).messages) == [
            ("keep/q", b"Q\x00binary"), ("keep/ret", b"R")]
        fresh = clients(second.port, "keep-fresh")
        sub(fresh, "keep/ret")
        assert rec_of(fresh).wait_topic("keep/ret").retain


def test_autosave_writes_atomically_while_running(tmp_path: Path, fresh_broker: Callable[..., BrokerThread],
                                                  clients: Callable[..., Client]) -> None:
    path = tmp_path / "auto.json"
    running = fresh_broker(persistence_path=path, autosave_interval=0.1)
    pub(clients(running.port, "auto-pub"), "auto/ret", b"A", retain=True)
    deadline = time.monotonic() + WAIT
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert [(r["topic"], r["payload"]) for r in saved["retained"]] == [("auto/ret", "QQ==")]  # base64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.json"]  # no temp file left behind


def test_corrupt_persistence_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"format": "fedgen-embedded-broker", "version": 1, "retained": [{"topic": "t"}]}')
    with pytest.raises(PersistenceError, match="corrupt"):
        run_in_thread(persistence_path=path)


def test_subprocess_broker_restart_keeps_state(tmp_path: Path, clients: Callable[..., Client]) -> None:
    with start_embedded_broker(workdir=tmp_path / "emb", autosave_interval=0) as proc:
        assert proc.kind == "embedded"
        pub(clients(proc.port, "sp-pub"), "sp/ret", b"kept", retain=True)
        port = proc.port
        proc.restart()  # SIGTERM (saves), then the same port and persistence file
        assert proc.port == port and proc.running
        s = clients(proc.port, "sp-sub")
        sub(s, "sp/#")
        assert rec_of(s).wait_topic("sp/ret").payload == b"kept"
    assert (tmp_path / "emb" / "embedded-broker.json").exists()
    assert "signal received" in proc.log_tail()


# ------------------------------------------------------------------------------- decoder properties


def encode_client_packet(packet: Packet) -> bytes | None:
    """The bytes a client sends for ``packet``, remaining length in its shortest form.

    None only for a CONNECT of a foreign protocol level, whose body after the level is not decoded.
    """
    if isinstance(packet, Publish):
        return encode_publish(packet.topic, packet.payload, packet.qos, packet.retain, packet.dup, packet.packet_id)
    if isinstance(packet, PubAck):
        return frame(0x40, packet.packet_id.to_bytes(2, "big"))
    if isinstance(packet, Subscribe):
        return subscribe_bytes(packet.packet_id, list(packet.topics))
    if isinstance(packet, Unsubscribe):
        return frame(0xA2, packet.packet_id.to_bytes(2, "big") + b"".join(_s(t) for t in packet.topics))
    if isinstance(packet, PingReq):
        return b"\xc0\x00"
    if isinstance(packet, Disconnect):
        return b"\xe0\x00"
    assert isinstance(packet, Connect), packet
    if packet.level != SUPPORTED_PROTOCOLS[packet.protocol_name]:
        return None
    will = packet.will
    return connect_bytes(packet.client_id, clean=packet.clean_session, keepalive=packet.keepalive,
                         will=None if will is None else (will.topic, will.payload, will.qos, will.retain),
                         username=packet.username, password=packet.password,
                         name=packet.protocol_name, level=packet.level)


def canonical_frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_remaining_length(len(body)) + body


def assert_reencodes(packet: Packet, first: int, body: bytes) -> None:
    """A decoded packet re-encodes to the bytes it came from (up to the remaining-length form)."""
    encoded = encode_client_packet(packet)
    if encoded is None:  # only the protocol name and level were read
        assert isinstance(packet, Connect) and body.startswith(_s(packet.protocol_name) + bytes([packet.level]))
    else:
        assert encoded == canonical_frame(first, body), packet


# Valid first bytes, and body prefixes that get past the first checks, to reach deeper decoding.
VALID_FIRST = [0x10, 0x30, 0x31, 0x32, 0x33, 0x34, 0x3A, 0x3B, 0x40, 0x82, 0xA2, 0xC0, 0xE0]
PREFIXES = [b"", _s("MQTT") + b"\x04", _s("MQIsdp") + b"\x03", _s("MQTT") + b"\x04\xc2\x00\x1e", b"\x00\x01"]
# Random bytes, and well-framed packets of random content followed by random bytes.
FRAME_INPUTS = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda first, prefix, body, tail: frame(first, prefix + body) + tail,
              st.sampled_from(VALID_FIRST), st.sampled_from(PREFIXES), st.binary(max_size=120),
              st.binary(max_size=20)),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FRAME_INPUTS)
def test_decode_frame_random_bytes_raise_protocol_error_or_round_trip(data: bytes) -> None:
    try:
        result = decode_frame(data)
    except ProtocolError:
        return
    if result is None:
        return
    packet, end = result
    assert 0 < end <= len(data)
    parsed = decode_remaining_length(data, 1)
    assert parsed is not None and parsed[0] == end - parsed[1]
    assert_reencodes(packet, data[0], data[parsed[1]:end])
    assert decode_frame(data[:end]) == result  # what follows the frame plays no part
    assert all(decode_frame(data[:k]) is None for k in range(end))  # every proper prefix is incomplete


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.integers(0, 255), st.sampled_from(VALID_FIRST)), st.sampled_from(PREFIXES),
       st.binary(max_size=120))
def test_decode_packet_random_body_raises_protocol_error_or_round_trips(first: int, prefix: bytes,
                                                                        body: bytes) -> None:
    try:
        packet = decode_packet(first, prefix + body)
    except ProtocolError:
        return
    assert_reencodes(packet, first, prefix + body)
    framed = canonical_frame(first, prefix + body)
    assert decode_frame(framed) == (packet, len(framed))


TOPIC_CHARS = st.characters(blacklist_characters="+#\x00", blacklist_categories=("Cs",))
TEXT = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20)
TOPICS = st.text(TOPIC_CHARS, min_size=1, max_size=20)
PACKET_IDS = st.integers(1, 65_535)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(draw(TOPICS), draw(st.binary(max_size=60)), qos, draw(st.booleans()),
                   qos > 0 and draw(st.booleans()), draw(PACKET_IDS) if qos else None)


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    name = draw(st.sampled_from(sorted(SUPPORTED_PROTOCOLS)))
    will = draw(st.none() | st.builds(Will, TOPICS, st.binary(max_size=30), st.integers(0, 2), st.booleans()))
    username = draw(st.none() | TEXT)
    password = None if username is None else draw(st.none() | st.binary(max_size=20))
    return Connect(name, SUPPORTED_PROTOCOLS[name], draw(st.booleans()), draw(st.integers(0, 65_535)), draw(TEXT),
                   will, username, password)


CLIENT_PACKETS = st.one_of(
    publishes(), connects(),
    st.builds(PubAck, st.integers(0, 65_535)),
    st.builds(Subscribe, PACKET_IDS, st.lists(st.tuples(TEXT, st.integers(0, 2)), min_size=1, max_size=4)
              .map(tuple)),
    st.builds(Unsubscribe, PACKET_IDS, st.lists(TEXT, min_size=1, max_size=4).map(tuple)),
    st.just(PingReq()), st.just(Disconnect()),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(CLIENT_PACKETS, max_size=8), st.data())
def test_stream_of_valid_frames_decodes_to_the_same_packets(packets: list[Packet], data: st.DataObject) -> None:
    """Concatenated frames, delivered in arbitrary chunks, decode back to the packets they encode."""
    frames = [encode_client_packet(p) for p in packets]
    assert None not in frames  # the strategies make CONNECTs of supported levels only
    stream = b"".join(f for f in frames if f is not None)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    buf, decoded = bytearray(), []
    for start, stop in zip([0, *cuts], [*cuts, len(stream)]):
        buf += stream[start:stop]
        while (result := decode_frame(buf)) is not None:
            decoded.append(result[0])
            del buf[:result[1]]
    assert decoded == packets and not buf


@pytest.fixture(scope="module")
def garbage_broker() -> Iterator[BrokerThread]:
    """A broker of its own for the garbage test, so that random packets touch no other test's state."""
    with run_in_thread() as handle:
        yield handle


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), FRAME_INPUTS)
def test_broker_still_serves_clients_after_garbage(garbage_broker: BrokerThread, connect_first: bool,
                                                   garbage: bytes) -> None:
    raw = Raw(garbage_broker.port)
    try:
        if connect_first:
            assert raw.connect("garbage-sender") == (0, 0)
        raw.send(garbage)
        raw.sock.shutdown(socket.SHUT_WR)
        raw.assert_closed()  # the broker has read everything and ended that connection
    finally:
        raw.close()
    check = Raw(garbage_broker.port)
    try:
        assert check.connect("garbage-check") == (0, 0)
        check.send(b"\xc0\x00")
        assert check.read() == (0xD0, b"")  # PINGRESP
    finally:
        check.close()


@settings(max_examples=100, deadline=None)
@given(st.text(TOPIC_CHARS, min_size=1, max_size=40),
       st.binary(max_size=300), st.integers(0, 1), st.booleans())
def test_publish_encoding_round_trips(topic: str, payload: bytes, qos: int, retain: bool) -> None:
    data = encode_publish(topic, payload, qos, retain, False, 5 if qos else None)
    decoded = decode_frame(data + b"\xc0")  # a following PINGREQ is left alone
    assert decoded is not None and decoded[1] == len(data)
    assert decoded[0] == Publish(topic, payload, qos, retain, False, 5 if qos else None)
