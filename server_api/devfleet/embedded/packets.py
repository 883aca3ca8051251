"""MQTT 3.1.1 wire format: packet types, decoding, encoding and topic names/filters.

Pure functions and frozen dataclasses, no broker state.  Only the packets a client sends are
decoded (CONNECT, PUBLISH QoS 0/1, PUBACK, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT; "MQIsdp"
level 3 is accepted as well as "MQTT" level 4); only the packets the broker sends are encoded
(CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP).

* Every malformed input raises :class:`ProtocolError` and nothing else: bad remaining-length
  encoding, truncated fields, wrong fixed-header flags, unknown or server-to-client packet
  types, QoS 2 flow packets, invalid UTF-8 or U+0000 in strings, wildcards in a PUBLISH topic.
* :func:`read_packet` never buffers more than ``max_remaining`` body bytes: the payload of a
  larger PUBLISH is read and discarded (:class:`OversizedPublish`), any other packet that large
  is an error.
* Topic filters: ``+``/``#`` wildcards, ``$share/<group>/<filter>`` shared subscriptions;
  wildcards at the first level do not match ``$``-topics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

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
_DISCARD_CHUNK = 1 << 16
SHARE_PREFIX = "$share/"


class ProtocolError(Exception):
    """Malformed or unsupported input from a client; the broker closes that connection."""


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

