"""Embedded MQTT 3.1.1 broker: asyncio, standard library only, for development fleets and tests.

``fedgen fleet`` uses it when no ``mosquitto`` binary is installed.  It implements the part
of MQTT 3.1.1 (protocol level 4; "MQIsdp" level 3 is accepted too) that the FedGen protocol
uses, and behaves like Mosquitto 2.0.11 where that matters:

* CONNECT/CONNACK with return codes 1 (unsupported protocol level), 2 (empty client id with
  clean_session=0), 4 (unknown user or wrong password, when ``users`` is given) and 5
  (anonymous login with ``allow_anonymous=False``).  Mosquitto 2.0.11 answers 5 for both.
* Keep-alive: a client silent for 1.5 x its keep-alive is disconnected and its will published.
* Session takeover: a second CONNECT with a connected client id closes the first connection
  and publishes the first connection's will, exactly as Mosquitto 2.0.11 does (observed).
* PUBLISH QoS 0 and 1.  QoS 2 (PUBLISH with QoS 2, PUBREC/PUBREL/PUBCOMP) is a protocol
  violation: the connection is closed (and its will published).  A QoS 1 PUBLISH with DUP=1 is
  forwarded like any other (QoS 1 is at-least-once; Mosquitto does the same).
* Retained messages (an empty retained payload deletes), sent on every SUBSCRIBE with the retain
  flag set at min(message QoS, granted QoS); never for ``$share/...`` subscriptions.
* ``+``/``#`` wildcards; wildcards at the first level do not match ``$``-topics.  Invalid
  filters get SUBACK 0x80 (Mosquitto disconnects instead).  Granted QoS is at most 1.
  Overlapping subscriptions deliver one copy at the highest granted QoS (allowed by the spec).
* Shared subscriptions ``$share/<group>/<filter>``: each message goes to one member, round-robin
  over connected members; when none is connected, round-robin over the (offline, persistent)
  members, whose queue holds it.
* Persistent sessions (clean_session=0): subscriptions, QoS 1 messages queued while offline
  (``max_queued_messages``, default unlimited; over the limit a message is dropped and a
  warning logged) and unacknowledged in-flight messages, re-sent with DUP=1 on reconnect.
  At most ``max_inflight_messages`` (default 100) unacknowledged QoS 1 messages per client.
* Message size: a PUBLISH whose payload exceeds ``max_payload_size`` (default 1 MiB) is dropped
  with a warning; a QoS 1 publisher still gets its PUBACK and keeps its connection (Mosquitto
  2.0.11 ``message_size_limit``).  At most ``max_payload_size`` + 64 KiB of any packet is
  buffered; the rest of a larger PUBLISH is read and discarded, any other packet that large
  closes the connection.
* Persistence (``persistence_path``): retained messages and persistent sessions as JSON
  (payloads base64), written atomically on a clean stop and every ``autosave_interval`` seconds
  when something changed, loaded on start.
* Malformed input closes only that connection, with a log line.
* Wills are not published when the broker itself shuts down.

Not supported: TLS, ACLs, MQTT 5, QoS 2, session expiry.  Development and tests only.

Run it::

    python -m server_api.embedded_broker --host 127.0.0.1 --port 1883 --persistence state/broker.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger("fedgen.broker")

# Control packet types (MQTT 3.1.1, section 2.2.1).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14
PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
    PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}
# Fixed-header flags required for client-to-server packets other than PUBLISH.
_REQUIRED_FLAGS = {CONNECT: 0, PUBACK: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}
_SERVER_TO_CLIENT = frozenset({CONNACK, SUBACK, UNSUBACK, PINGRESP})
_QOS2_FLOW = frozenset({PUBREC, PUBREL, PUBCOMP})

# CONNACK return codes.
ACCEPTED, BAD_PROTOCOL_VERSION, BAD_CLIENT_ID, BAD_CREDENTIALS, NOT_AUTHORISED = 0, 1, 2, 4, 5
SUBACK_FAILURE = 0x80
SUPPORTED_PROTOCOLS = {"MQTT": 4, "MQIsdp": 3}

MAX_REMAINING_LENGTH = 268_435_455  # four-byte variable length integer
PUBLISH_HEADROOM = 65_536 + 4  # topic length prefix + longest topic + packet id, rounded up
DEFAULT_MAX_PAYLOAD = 1 << 20
DEFAULT_MAX_INFLIGHT = 100
DEFAULT_AUTOSAVE_INTERVAL = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
_DISCARD_CHUNK = 1 << 16
PERSISTENCE_FORMAT = "fedgen-embedded-broker"
PERSISTENCE_VERSION = 1
SHARE_PREFIX = "$share/"


class ProtocolError(Exception):
    """Malformed or unsupported input from a client; the broker closes that connection."""


class PersistenceError(RuntimeError):
    """The persistence file exists but cannot be read back."""


# ----------------------------------------------------------------------------------- packets


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool


@dataclass(frozen=True)
class Connect:
    protocol_name: str
    level: int
    clean_session: bool = True
    keepalive: int = 0
    client_id: str = ""
    will: Will | None = None
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None


@dataclass(frozen=True)
class OversizedPublish:
    """A PUBLISH too large to buffer: its payload was read and discarded."""

    topic: str
    qos: int
    packet_id: int | None
    payload_size: int


@dataclass(frozen=True)
class PubAck:
    packet_id: int


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True)
class PingReq:
    pass


@dataclass(frozen=True)
class Disconnect:
    pass


Packet = Connect | Publish | OversizedPublish | PubAck | Subscribe | Unsubscribe | PingReq | Disconnect


# ----------------------------------------------------------------------------------- decoding


class _Cursor:
    """Bounds-checked reader over a packet body; every overrun is a :class:`ProtocolError`."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ProtocolError("truncated packet")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not valid UTF-8") from None
        if "\x00" in text:
            raise ProtocolError("string contains U+0000")
        return text

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def done(self, what: str) -> None:
        if not self.exhausted:
            raise ProtocolError(f"{what}: {len(self.data) - self.pos} unexpected trailing bytes")


def check_fixed_header(first: int) -> int:
    """Validate the first byte of a client-to-server packet; return the packet type."""
    ptype, flags = first >> 4, first & 0x0F
    if ptype == PUBLISH:
        qos = (flags >> 1) & 3
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        if qos == 0 and flags & 0x08:
            raise ProtocolError("PUBLISH with QoS 0 and DUP set")
        return ptype
    if ptype in _QOS2_FLOW:
        raise ProtocolError(f"{PACKET_NAMES[ptype]}: QoS 2 is not supported by the embedded broker")
    if ptype in _SERVER_TO_CLIENT:
        raise ProtocolError(f"{PACKET_NAMES[ptype]} is a server-to-client packet")
    if ptype not in _REQUIRED_FLAGS:
        raise ProtocolError(f"unknown packet type {ptype}")
    if flags != _REQUIRED_FLAGS[ptype]:
        raise ProtocolError(f"{PACKET_NAMES[ptype]} with invalid fixed-header flags {flags:#x}")
    return ptype


def decode_remaining_length(data: bytes | bytearray, offset: int = 1) -> tuple[int, int] | None:
    """Decode the variable-length integer at ``offset``: ``(value, end)``, or None if incomplete."""
    value = 0
    for i in range(4):
        if offset + i >= len(data):
            return None
        byte = data[offset + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, offset + i + 1
    raise ProtocolError("malformed remaining length (more than 4 bytes)")


def encode_remaining_length(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {value} out of range")
    out = bytearray()
    while True:
        value, byte = divmod(value, 128)
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _decode_connect(c: _Cursor) -> Connect:
    name = c.string()
    if name not in SUPPORTED_PROTOCOLS:
        raise ProtocolError(f"unknown protocol name {name!r}")
    level = c.u8()
    if level != SUPPORTED_PROTOCOLS[name]:
        return Connect(name, level)  # answered with CONNACK 1; the rest may be another format
    flags = c.u8()
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag set")
    will_flag, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 3, bool(flags & 0x20)
    password_flag, username_flag = bool(flags & 0x40), bool(flags & 0x80)
    if will_qos == 3:
        raise ProtocolError("CONNECT will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise ProtocolError("CONNECT will QoS/retain set without the will flag")
    if password_flag and not username_flag:
        raise ProtocolError("CONNECT password flag without user name flag")
    keepalive = c.u16()
    client_id = c.string()
    will = None
    if will_flag:
        will_topic = c.string()
        if not valid_topic_name(will_topic):
            raise ProtocolError("CONNECT will topic is not a valid topic name")
        will = Will(will_topic, c.binary(), will_qos, will_retain)
    username = c.string() if username_flag else None
    password = c.binary() if password_flag else None
    c.done("CONNECT")
    return Connect(name, level, bool(flags & 0x02), keepalive, client_id, will, username, password)


def _publish_header(c: _Cursor, qos: int) -> tuple[str, int | None]:
    topic = c.string()
    if not valid_topic_name(topic):
        raise ProtocolError("PUBLISH topic is empty or contains a wildcard")
    packet_id = c.u16() if qos else None
    if packet_id == 0:
        raise ProtocolError("PUBLISH with packet id 0")
    return topic, packet_id


def _decode_publish(first: int, c: _Cursor) -> Publish:
    qos = (first >> 1) & 3
    topic, packet_id = _publish_header(c, qos)
    return Publish(topic, c.rest(), qos, bool(first & 0x01), bool(first & 0x08), packet_id)


def _packet_id(c: _Cursor, what: str) -> int:
    packet_id = c.u16()
    if packet_id == 0:
        raise ProtocolError(f"{what} with packet id 0")
    return packet_id


def _decode_subscribe(c: _Cursor) -> Subscribe:
    packet_id = _packet_id(c, "SUBSCRIBE")
    topics = []
    while not c.exhausted:
        topic_filter = c.string()
        options = c.u8()
        if options & 0xFC or options == 3:
            raise ProtocolError("SUBSCRIBE with invalid requested QoS byte")
        topics.append((topic_filter, options))
    if not topics:
        raise ProtocolError("SUBSCRIBE without topic filters")
    return Subscribe(packet_id, tuple(topics))


def _decode_unsubscribe(c: _Cursor) -> Unsubscribe:
    packet_id = _packet_id(c, "UNSUBSCRIBE")
    topics = []
    while not c.exhausted:
        topics.append(c.string())
    if not topics:
        raise ProtocolError("UNSUBSCRIBE without topic filters")
    return Unsubscribe(packet_id, tuple(topics))


def _decode_empty(ptype: int, c: _Cursor) -> Packet:
    c.done(PACKET_NAMES[ptype])
    return PingReq() if ptype == PINGREQ else Disconnect()


def decode_packet(first: int, body: bytes) -> Packet:
    """Decode one client-to-server packet from its first byte and body (after the length)."""
    ptype = check_fixed_header(first)
    c = _Cursor(body)
    if ptype == CONNECT:
        return _decode_connect(c)
    if ptype == PUBLISH:
        return _decode_publish(first, c)
    if ptype == PUBACK:
        packet_id = c.u16()
        c.done("PUBACK")
        return PubAck(packet_id)
    if ptype == SUBSCRIBE:
        return _decode_subscribe(c)
    if ptype == UNSUBSCRIBE:
        return _decode_unsubscribe(c)
    return _decode_empty(ptype, c)


def decode_frame(data: bytes | bytearray,
                 max_remaining: int = MAX_REMAINING_LENGTH) -> tuple[Packet, int] | None:
    """Decode the first packet in ``data``: ``(packet, bytes used)``, or None when incomplete.

    Raises :class:`ProtocolError` (and nothing else) for malformed input.
    """
    if not data:
        return None
    ptype = check_fixed_header(data[0])
    parsed = decode_remaining_length(data, 1)
    if parsed is None:
        return None
    length, start = parsed
    if length > max_remaining:
        raise ProtocolError(f"{PACKET_NAMES[ptype]} remaining length {length} exceeds {max_remaining}")
    end = start + length
    if len(data) < end:
        return None
    return decode_packet(data[0], bytes(data[start:end])), end


async def _read_remaining_length(reader: asyncio.StreamReader) -> int:
    value = 0
    for i in range(4):
        byte = (await reader.readexactly(1))[0]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value
    raise ProtocolError("malformed remaining length (more than 4 bytes)")


async def _discard_publish(reader: asyncio.StreamReader, first: int, length: int) -> OversizedPublish:
    """Read a PUBLISH's header, then discard its payload in chunks without buffering it."""
    qos = (first >> 1) & 3
    prefix = await reader.readexactly(2)
    header_len = 2 + int.from_bytes(prefix, "big") + (2 if qos else 0)
    if header_len > length:
        raise ProtocolError("PUBLISH topic longer than the packet")
    topic, packet_id = _publish_header(_Cursor(prefix + await reader.readexactly(header_len - 2)), qos)
    left = length - header_len
    while left:
        chunk = await reader.read(min(left, _DISCARD_CHUNK))
        if not chunk:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(chunk)
    return OversizedPublish(topic, qos, packet_id, length - header_len)


async def read_packet(reader: asyncio.StreamReader, max_remaining: int) -> Packet:
    """Read one packet from a stream, never buffering more than ``max_remaining`` body bytes."""
    first = (await reader.readexactly(1))[0]
    ptype = check_fixed_header(first)
    length = await _read_remaining_length(reader)
    if length > max_remaining:
        if ptype == PUBLISH:
            return await _discard_publish(reader, first, length)
        raise ProtocolError(f"{PACKET_NAMES[ptype]} remaining length {length} exceeds {max_remaining}")
    return decode_packet(first, await reader.readexactly(length))


# ----------------------------------------------------------------------------------- encoding


def _frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_remaining_length(len(body)) + body


def _mqtt_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def encode_connack(session_present: bool, code: int) -> bytes:
    return _frame(CONNACK << 4, bytes([1 if session_present else 0, code]))


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, dup: bool = False,
                   packet_id: int | None = None) -> bytes:
    first = (PUBLISH << 4) | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    pid = packet_id.to_bytes(2, "big") if qos and packet_id is not None else b""
    return _frame(first, _mqtt_string(topic) + pid + payload)


def encode_puback(packet_id: int) -> bytes:
    return _frame(PUBACK << 4, packet_id.to_bytes(2, "big"))


def encode_suback(packet_id: int, codes: Sequence[int]) -> bytes:
    return _frame(SUBACK << 4, packet_id.to_bytes(2, "big") + bytes(codes))


def encode_unsuback(packet_id: int) -> bytes:
    return _frame(UNSUBACK << 4, packet_id.to_bytes(2, "big"))


PINGRESP_BYTES = bytes([PINGRESP << 4, 0])


# ----------------------------------------------------------------------------------- topics


def valid_topic_name(topic: str) -> bool:
    """A PUBLISH topic: non-empty, no wildcards, no NUL, at most 65535 UTF-8 bytes."""
    return (bool(topic) and "+" not in topic and "#" not in topic and "\x00" not in topic
            and len(topic.encode("utf-8")) <= 65_535)


def _valid_plain_filter(topic_filter: str) -> bool:
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def parse_filter(topic_filter: str) -> tuple[str | None, str] | None:
    """``(share group or None, filter)`` for a valid subscription filter, else None."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return (None, topic_filter) if _valid_plain_filter(topic_filter) else None
    group, _, plain = topic_filter[len(SHARE_PREFIX):].partition("/")
    if not group or "+" in group or "#" in group or not _valid_plain_filter(plain):
        return None
    return group, plain


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a plain (non-shared) filter; ``+``/``#`` first levels skip ``$`` topics."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels) or (level != "+" and level != topic_levels[i]):
            return False
    return len(filter_levels) == len(topic_levels)


# ----------------------------------------------------------------------------------- state


@dataclass
class _Outgoing:
    """A message on its way to one session (``qos`` already reduced to the granted QoS)."""

    topic: str
    payload: bytes = field(repr=False)
    qos: int
    retain: bool = False


@dataclass
class _Retained:
    payload: bytes = field(repr=False)
    qos: int


@dataclass
class _SharedGroup:
    filter: str
    members: list[str] = field(default_factory=list)
    cursor: int = 0


@dataclass
class _Session:
    client_id: str
    clean: bool
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter (incl. $share/...) -> QoS
    queue: deque[_Outgoing] = field(default_factory=deque)
    inflight: dict[int, _Outgoing] = field(default_factory=dict)  # packet id -> message, in send order
    next_id: int = 0
    conn: _Connection | None = None
    dropped: int = 0

    def new_packet_id(self) -> int:
        while True:
            self.next_id = self.next_id % 65_535 + 1
            if self.next_id not in self.inflight:
                return self.next_id


class _Connection:
    """One client socket: reads packets and hands them to the broker."""

    def __init__(self, broker: EmbeddedBroker, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.broker, self.reader, self.writer = broker, reader, writer
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client_id: str | None = None
        self.session: _Session | None = None
        self.will: Will | None = None
        self.keepalive = 0
        self.closed_reason: str | None = None  # set when the broker closes the connection itself

    @property
    def label(self) -> str:
        return f"{self.client_id or '(before CONNECT)'} [{self.peer}]"

    def send(self, data: bytes) -> None:
        if self.closed_reason is None and not self.writer.is_closing():
            self.writer.write(data)

    def close(self, reason: str) -> None:
        """Close from the broker side (takeover, refusal, shutdown); the will is left to the caller."""
        if self.closed_reason is None:
            self.closed_reason = reason
            self.writer.close()

    async def _read(self, timeout: float | None) -> Packet:
        return await asyncio.wait_for(read_packet(self.reader, self.broker.max_buffered_body), timeout)

    async def run(self) -> None:
        reason = "connection lost"
        try:
            reason = await self._serve()
        except asyncio.TimeoutError:
            reason = "keep-alive timeout" if self.session else "no CONNECT in time"
            log.warning("%s: %s, disconnecting", self.label, reason)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning("%s: %s; closing the connection", self.label, exc)
        except (asyncio.IncompleteReadError, OSError):
            reason = "connection lost"
        except Exception:  # one client's bug must never stop the broker
            reason = "internal error"
            log.exception("%s: internal error; closing the connection", self.label)
        finally:
            self.broker._connection_lost(self, self.closed_reason or reason)

    async def _serve(self) -> str:
        packet = await self._read(self.broker.connect_timeout)
        if not isinstance(packet, Connect):
            raise ProtocolError("first packet is not CONNECT")
        if not self.broker._handle_connect(self, packet):
            return "connection refused"
        timeout = 1.5 * self.keepalive if self.keepalive else None
        while self.closed_reason is None:
            packet = await self._read(timeout)
            if self.closed_reason is not None:
                break
            if isinstance(packet, Disconnect):
                self.will = None
                return "client disconnected"
            self.broker._handle_packet(self, packet)
            await self.writer.drain()
        return self.closed_reason or "closed"


# ----------------------------------------------------------------------------------- broker


class EmbeddedBroker:
    """An asyncio MQTT 3.1.1 broker; see the module docstring for its behaviour."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, users: Mapping[str, str] | None = None,
                 allow_anonymous: bool = True, max_queued_messages: int | None = None,
                 max_inflight_messages: int = DEFAULT_MAX_INFLIGHT,
                 max_payload_size: int = DEFAULT_MAX_PAYLOAD,
                 persistence_path: str | os.PathLike[str] | None = None,
                 autosave_interval: float = DEFAULT_AUTOSAVE_INTERVAL,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        if max_inflight_messages < 1:
            raise ValueError("max_inflight_messages must be at least 1")
        if max_queued_messages is not None and max_queued_messages < 0:
            raise ValueError("max_queued_messages must be >= 0 or None (unlimited)")
        self.host, self._requested_port = host, port
        self.users = dict(users) if users is not None else None
        self.allow_anonymous = allow_anonymous
        self.max_queued_messages = max_queued_messages
        self.max_inflight_messages = max_inflight_messages
        self.max_payload_size = max_payload_size
        self.max_buffered_body = min(max_payload_size + PUBLISH_HEADROOM, MAX_REMAINING_LENGTH)
        self.persistence_path = Path(persistence_path) if persistence_path is not None else None
        self.autosave_interval = autosave_interval
        self.connect_timeout = connect_timeout
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, _Retained] = {}
        self._shared: dict[str, _SharedGroup] = {}  # full "$share/group/filter" -> group
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._autosave_task: asyncio.Task[None] | None = None
        self._save_lock: asyncio.Lock | None = None
        self._dirty = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("broker is not running")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def start(self) -> None:
        """Load the persistence file (if any) and start listening."""
        if self._server is not None:
            raise RuntimeError("broker already started")
        self._save_lock = asyncio.Lock()
        if self.persistence_path is not None and self.persistence_path.exists():
            self._restore(self._read_persistence(self.persistence_path))
        self._server = await asyncio.start_server(self._accept, self.host, self._requested_port)
        if self.persistence_path is not None and self.autosave_interval > 0:
            self._autosave_task = asyncio.create_task(self._autosave())
        log.info("embedded MQTT broker listening on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        """Close every connection (no wills), stop listening and save the persistence file."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._connections):
            conn.close("broker shutting down")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._autosave_task is not None:
            self._autosave_task.cancel()
            await asyncio.gather(self._autosave_task, return_exceptions=True)
            self._autosave_task = None
        await self._server.wait_closed()
        self._server = None
        if self.persistence_path is not None:
            await self.save()
        log.info("embedded MQTT broker stopped")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        task = asyncio.current_task()
        self._connections.add(conn)
        if task is not None:
            self._tasks.add(task)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            if task is not None:
                self._tasks.discard(task)

    # ------------------------------------------------------------------ connect / disconnect

    def _authenticate(self, packet: Connect) -> int:
        if packet.username is None:
            return ACCEPTED if self.allow_anonymous else NOT_AUTHORISED
        if self.users is None:
            return ACCEPTED
        expected = self.users.get(packet.username)
        if expected is None or packet.password is None:
            return BAD_CREDENTIALS
        return ACCEPTED if hmac.compare_digest(expected.encode("utf-8"), packet.password) else BAD_CREDENTIALS

    def _refuse(self, conn: _Connection, code: int, why: str) -> bool:
        log.warning("%s: connection refused (CONNACK %d): %s", conn.label, code, why)
        conn.send(encode_connack(False, code))
        conn.close("connection refused")
        return False

    def _handle_connect(self, conn: _Connection, packet: Connect) -> bool:
        """Authenticate, attach a session and send CONNACK; False when refused."""
        conn.client_id = packet.client_id or None
        if packet.level != SUPPORTED_PROTOCOLS[packet.protocol_name]:
            return self._refuse(conn, BAD_PROTOCOL_VERSION, f"protocol level {packet.level}")
        client_id = packet.client_id
        if not client_id:
            if not packet.clean_session or packet.protocol_name == "MQIsdp":
                return self._refuse(conn, BAD_CLIENT_ID, "empty client id without clean session")
            client_id = f"auto-{uuid.uuid4().hex}"
            conn.client_id = client_id
        code = self._authenticate(packet)
        if code != ACCEPTED:
            who = "anonymous" if packet.username is None else f"user {packet.username!r}"
            why = f"{who} not authorised" if code == NOT_AUTHORISED else f"bad credentials for {who}"
            return self._refuse(conn, code, why)
        session, present = self._attach_session(client_id, packet.clean_session)
        session.conn, conn.session = conn, session
        conn.will, conn.keepalive = packet.will, packet.keepalive
        conn.send(encode_connack(present, ACCEPTED))
        log.info("%s: connected (clean_session=%d, keepalive=%ds, session_present=%d%s)", conn.label,
                 packet.clean_session, packet.keepalive, present,
                 f", user {packet.username!r}" if packet.username is not None else "")
        if present:
            self._resume(session)
        return True

    def _attach_session(self, client_id: str, clean: bool) -> tuple[_Session, bool]:
        existing = self._sessions.get(client_id)
        if existing is not None and existing.conn is not None:
            self._take_over(existing)
        if existing is not None and not clean and not existing.clean:
            return existing, True
        if existing is not None:
            self._drop_session(existing)
        session = _Session(client_id, clean)
        self._sessions[client_id] = session
        self._dirty = True
        return session, False

    def _take_over(self, session: _Session) -> None:
        """Close the old connection of ``session``; publish its will like Mosquitto 2.0.11."""
        old = session.conn
        assert old is not None
        log.warning("%s: client id already connected, closing the old connection", old.label)
        session.conn = None
        will, old.will = old.will, None
        old.close("session taken over")
        if will is not None:
            self._publish_will(old, will)

    def _drop_session(self, session: _Session) -> None:
        for topic_filter in session.subscriptions:
            self._leave_group(topic_filter, session.client_id)
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
        self._dirty = True

    def _connection_lost(self, conn: _Connection, reason: str) -> None:
        session = conn.session
        if session is not None and session.conn is conn:
            session.conn = None
            if session.clean:
                self._drop_session(session)
        if not conn.writer.is_closing():
            conn.writer.close()
        will, conn.will = conn.will, None
        if session is not None:
            log.info("%s: disconnected (%s)%s", conn.label, reason, "; publishing its will" if will else "")
        if will is not None:
            self._publish_will(conn, will)

    def _publish_will(self, conn: _Connection, will: Will) -> None:
        log.info("%s: will published on %r", conn.label, will.topic)
        self._route(will.topic, will.payload, min(will.qos, 1), will.retain)

    # ------------------------------------------------------------------ packets

    def _handle_packet(self, conn: _Connection, packet: Packet) -> None:
        session = conn.session
        assert session is not None
        if isinstance(packet, Publish):
            self._on_publish(conn, packet)
        elif isinstance(packet, OversizedPublish):
            self._on_oversized(conn, packet.topic, packet.qos, packet.packet_id, packet.payload_size)
        elif isinstance(packet, PubAck):
            self._on_puback(session, packet.packet_id)
        elif isinstance(packet, Subscribe):
            self._on_subscribe(conn, session, packet)
        elif isinstance(packet, Unsubscribe):
            self._on_unsubscribe(conn, session, packet)
        elif isinstance(packet, PingReq):
            conn.send(PINGRESP_BYTES)
        else:
            raise ProtocolError(f"unexpected {type(packet).__name__} after CONNECT")

    def _on_publish(self, conn: _Connection, packet: Publish) -> None:
        if packet.qos == 2:
            raise ProtocolError("PUBLISH with QoS 2 is not supported by the embedded broker")
        if len(packet.payload) > self.max_payload_size:
            self._on_oversized(conn, packet.topic, packet.qos, packet.packet_id, len(packet.payload))
            return
        self._route(packet.topic, packet.payload, packet.qos, packet.retain)
        if packet.qos == 1 and packet.packet_id is not None:
            conn.send(encode_puback(packet.packet_id))

    def _on_oversized(self, conn: _Connection, topic: str, qos: int, packet_id: int | None,
                      size: int) -> None:
        if qos == 2:
            raise ProtocolError("PUBLISH with QoS 2 is not supported by the embedded broker")
        log.warning("%s: dropped PUBLISH on %r: payload of %d bytes exceeds max_payload_size %d",
                    conn.label, topic, size, self.max_payload_size)
        if qos == 1 and packet_id is not None:
            conn.send(encode_puback(packet_id))

    def _on_puback(self, session: _Session, packet_id: int) -> None:
        if session.inflight.pop(packet_id, None) is None:
            log.debug("%s: PUBACK for unknown packet id %d", session.client_id, packet_id)
            return
        self._dirty = self._dirty or not session.clean
        self._pump(session)

    def _on_subscribe(self, conn: _Connection, session: _Session, packet: Subscribe) -> None:
        codes: list[int] = []
        plain: list[tuple[str, int]] = []
        for topic_filter, requested in packet.topics:
            parsed = parse_filter(topic_filter)
            if parsed is None:
                log.warning("%s: invalid subscription filter %r refused (0x80)", conn.label, topic_filter)
                codes.append(SUBACK_FAILURE)
                continue
            granted = min(requested, 1)
            session.subscriptions[topic_filter] = granted
            group, base = parsed
            if group is None:
                plain.append((base, granted))
            else:
                self._join_group(topic_filter, base, session.client_id)
            codes.append(granted)
        self._dirty = self._dirty or not session.clean
        conn.send(encode_suback(packet.packet_id, codes))
        for base, granted in plain:
            self._send_retained(session, base, granted)

    def _on_unsubscribe(self, conn: _Connection, session: _Session, packet: Unsubscribe) -> None:
        for topic_filter in packet.topics:
            if session.subscriptions.pop(topic_filter, None) is not None:
                self._leave_group(topic_filter, session.client_id)
        self._dirty = self._dirty or not session.clean
        conn.send(encode_unsuback(packet.packet_id))

    def _join_group(self, full_filter: str, base: str, client_id: str) -> None:
        group = self._shared.setdefault(full_filter, _SharedGroup(base))
        if client_id not in group.members:
            group.members.append(client_id)

    def _leave_group(self, full_filter: str, client_id: str) -> None:
        group = self._shared.get(full_filter)
        if group is None or client_id not in group.members:
            return
        group.members.remove(client_id)
        if not group.members:
            del self._shared[full_filter]

    # ------------------------------------------------------------------ routing

    def _send_retained(self, session: _Session, topic_filter: str, granted: int) -> None:
        for topic, message in list(self._retained.items()):
            if topic_matches(topic_filter, topic):
                self._deliver(session, _Outgoing(topic, message.payload, min(message.qos, granted), True))

    def _store_retained(self, topic: str, payload: bytes, qos: int) -> None:
        if payload:
            self._retained[topic] = _Retained(payload, qos)
        else:
            self._retained.pop(topic, None)
        self._dirty = True

    def _route(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Store (if retained) and deliver a message to every matching subscription."""
        if retain:
            self._store_retained(topic, payload, qos)
        for session in list(self._sessions.values()):
            granted = self._best_grant(session, topic)
            if granted is not None:
                self._deliver(session, _Outgoing(topic, payload, min(qos, granted)))
        for full_filter, group in list(self._shared.items()):
            if topic_matches(group.filter, topic):
                member = self._pick_member(group)
                if member is not None:
                    granted = member.subscriptions.get(full_filter, 0)
                    self._deliver(member, _Outgoing(topic, payload, min(qos, granted)))

    @staticmethod
    def _best_grant(session: _Session, topic: str) -> int | None:
        best: int | None = None
        for topic_filter, granted in session.subscriptions.items():
            if not topic_filter.startswith(SHARE_PREFIX) and topic_matches(topic_filter, topic):
                best = granted if best is None else max(best, granted)
        return best

    def _pick_member(self, group: _SharedGroup) -> _Session | None:
        """Round-robin over connected members, else over the offline (persistent) ones."""
        count = len(group.members)
        order = [(group.cursor + i) % count for i in range(count)]
        sessions = [self._sessions.get(group.members[i]) for i in order]
        candidates = [(i, s) for i, s in zip(order, sessions) if s is not None and s.conn is not None]
        candidates = candidates or [(i, s) for i, s in zip(order, sessions) if s is not None]
        if not candidates:
            return None
        index, session = candidates[0]
        group.cursor = (index + 1) % count
        return session

    def _deliver(self, session: _Session, message: _Outgoing) -> None:
        if message.qos == 0:
            if session.conn is not None:
                session.conn.send(encode_publish(message.topic, message.payload, 0, message.retain))
            return  # QoS 0 is never queued for offline clients (Mosquitto's default)
        if not session.clean:
            self._dirty = True
        if session.conn is not None and not session.queue and self._window_open(session):
            self._send_inflight(session, message)
        elif self.max_queued_messages is not None and len(session.queue) >= self.max_queued_messages:
            self._note_drop(session, message.topic)
        else:
            session.queue.append(message)

    def _note_drop(self, session: _Session, topic: str) -> None:
        session.dropped += 1
        if session.dropped == 1 or session.dropped % 1000 == 0:
            log.warning("%s: queue full (max_queued_messages=%s): dropped QoS 1 message on %r "
                        "(%d dropped for this client so far)", session.client_id,
                        self.max_queued_messages, topic, session.dropped)

    def _send_inflight(self, session: _Session, message: _Outgoing) -> None:
        assert session.conn is not None
        packet_id = session.new_packet_id()
        session.inflight[packet_id] = message
        session.conn.send(encode_publish(message.topic, message.payload, message.qos, message.retain,
                                         False, packet_id))

    def _window_open(self, session: _Session) -> bool:
        return len(session.inflight) < self.max_inflight_messages

    def _pump(self, session: _Session) -> None:
        while session.conn is not None and session.queue and self._window_open(session):
            self._send_inflight(session, session.queue.popleft())

    def _resume(self, session: _Session) -> None:
        """Reconnected persistent session: re-send in-flight messages (DUP=1), then the queue."""
        assert session.conn is not None
        for packet_id, message in session.inflight.items():
            session.conn.send(encode_publish(message.topic, message.payload, message.qos, message.retain,
                                             True, packet_id))
        if session.dropped:
            log.warning("%s: %d QoS 1 messages were dropped while the queue was full",
                        session.client_id, session.dropped)
            session.dropped = 0
        self._pump(session)

    # ------------------------------------------------------------------ persistence

    def snapshot(self) -> dict[str, Any]:
        """The persistent state as a JSON-compatible dict (payloads base64)."""
        return {
            "format": PERSISTENCE_FORMAT,
            "version": PERSISTENCE_VERSION,
            "saved_at": time.time(),
            "retained": [{"topic": t, "qos": m.qos, "payload": _b64(m.payload)}
                         for t, m in self._retained.items()],
            "sessions": [_session_to_json(s) for s in self._sessions.values() if not s.clean],
        }

    async def save(self) -> None:
        """Write the persistence file atomically (temp file + fsync + os.replace)."""
        if self.persistence_path is None:
            return
        assert self._save_lock is not None
        async with self._save_lock:
            self._dirty = False
            data = json.dumps(self.snapshot(), separators=(",", ":")).encode("utf-8")
            await asyncio.to_thread(_write_atomic, self.persistence_path, data)
        log.debug("persistence saved to %s (%d bytes)", self.persistence_path, len(data))

    async def _autosave(self) -> None:
        while True:
            await asyncio.sleep(self.autosave_interval)
            if self._dirty:
                try:
                    await self.save()
                except OSError:
                    log.exception("autosave to %s failed", self.persistence_path)

    @staticmethod
    def _read_persistence(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise PersistenceError(f"cannot read broker persistence file {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != PERSISTENCE_FORMAT:
            raise PersistenceError(f"{path} is not a {PERSISTENCE_FORMAT} persistence file")
        if data.get("version") != PERSISTENCE_VERSION:
            raise PersistenceError(f"{path}: unsupported persistence version {data.get('version')!r}")
        return data

    def _restore(self, data: dict[str, Any]) -> None:
        try:
            for item in data.get("retained", []):
                retained = _Retained(_unb64(item["payload"]), min(int(item["qos"]), 1))
                self._retained[str(item["topic"])] = retained
            for item in data.get("sessions", []):
                session = _session_from_json(item)
                self._sessions[session.client_id] = session
                for topic_filter in session.subscriptions:
                    parsed = parse_filter(topic_filter)
                    if parsed is not None and parsed[0] is not None:
                        self._join_group(topic_filter, parsed[1], session.client_id)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            path = self.persistence_path
            raise PersistenceError(f"corrupt broker persistence file {path}: {exc!r}") from exc
        queued = sum(len(s.queue) + len(s.inflight) for s in self._sessions.values())
        log.info("restored %d retained messages and %d persistent sessions (%d queued messages) from %s",
                 len(self._retained), len(self._sessions), queued, self.persistence_path)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("payload is not a base64 string")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _message_to_json(message: _Outgoing) -> dict[str, Any]:
    return {"topic": message.topic, "qos": message.qos, "retain": message.retain,
            "payload": _b64(message.payload)}


def _message_from_json(item: dict[str, Any]) -> _Outgoing:
    qos = min(int(item["qos"]), 1)
    return _Outgoing(str(item["topic"]), _unb64(item["payload"]), qos, bool(item["retain"]))


def _session_to_json(session: _Session) -> dict[str, Any]:
    return {
        "client_id": session.client_id,
        "subscriptions": dict(session.subscriptions),
        "next_id": session.next_id,
        "inflight": [{"packet_id": pid, **_message_to_json(m)} for pid, m in session.inflight.items()],
        "queue": [_message_to_json(m) for m in session.queue],
    }


def _session_from_json(item: dict[str, Any]) -> _Session:
    session = _Session(str(item["client_id"]), clean=False, next_id=int(item.get("next_id", 0)) % 65_536)
    session.subscriptions = {str(k): min(int(v), 1) for k, v in dict(item["subscriptions"]).items()}
    session.inflight = {int(m["packet_id"]): _message_from_json(m) for m in item.get("inflight", [])}
    session.queue = deque(_message_from_json(m) for m in item.get("queue", []))
    return session


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------- thread runner


class BrokerThread:
    """An :class:`EmbeddedBroker` running on its own event loop in a daemon thread."""

    def __init__(self, broker: EmbeddedBroker, loop: asyncio.AbstractEventLoop,
                 thread: threading.Thread) -> None:
        self.broker, self.loop, self.thread = broker, loop, thread
        self._port = broker.port
        self._stopped = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{self.broker.host}:{self._port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (saving persistence) and end the thread; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            asyncio.run_coroutine_threadsafe(self.broker.stop(), self.loop).result(timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)

    def __enter__(self) -> BrokerThread:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def run_in_thread(host: str = "127.0.0.1", port: int = 0, **options: Any) -> BrokerThread:
    """Start an :class:`EmbeddedBroker` in a background thread; ``options`` go to its constructor."""
    broker = EmbeddedBroker(host, port, **options)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(broker.start())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)
            started.set()
            loop.close()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="fedgen-embedded-broker", daemon=True)
    thread.start()
    started.wait()
    if errors:
        thread.join()
        raise errors[0]
    return BrokerThread(broker, loop, thread)


# ----------------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server_api.embedded_broker",
                                description="FedGen embedded MQTT 3.1.1 broker "
                                            "(development only: no TLS, no ACL)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--persistence", type=Path, help="JSON file for retained messages and persistent sessions")
    p.add_argument("--autosave-interval", type=float, default=DEFAULT_AUTOSAVE_INTERVAL,
                   help="seconds between saves of a changed state (0: only on stop)")
    p.add_argument("--max-queued", type=int,
                   help="queued QoS 1 messages per offline client (default: unlimited)")
    p.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT)
    p.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD,
                   help="bytes; larger publishes are dropped")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


async def _serve_until_signalled(broker: EmbeddedBroker) -> None:
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("signal received, shutting down")
    finally:
        await broker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the broker in the foreground until SIGTERM/SIGINT."""
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    broker = EmbeddedBroker(args.host, args.port, max_queued_messages=args.max_queued,
                            max_inflight_messages=args.max_inflight, max_payload_size=args.max_payload,
                            persistence_path=args.persistence, autosave_interval=args.autosave_interval)
    try:
        asyncio.run(_serve_until_signalled(broker))
    except (OSError, PersistenceError) as exc:
        log.error("cannot run the broker: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
