"""Binary frames and chunking.

A frame is ``MAGIC (4 bytes) | header length (uint32, big endian) | header (UTF-8 JSON object) | body``.
Payloads larger than one MQTT message are cut into chunk frames (``FGC1``), each carrying a slice of the
payload and a `ChunkHeader`; `Reassembler` puts them back together and checks the whole payload's sha256.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec

from shared.fsutil import sha256_hex
from shared.protocol.codec import Message, Sha256, decode_json
from shared.protocol.errors import ValidationError

DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNKS = 4096
MAX_CHUNK_BYTES = 2 * 1024 * 1024

UPDATE_MAGIC = b"FGU1"  # a client's update: header JSON + safetensors body
CHUNK_MAGIC = b"FGC1"  # one chunk of a larger payload: chunk header + a slice of the payload

StreamKey = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9._:-]{1,128}\Z")]


# ---------------------------------------------------------------------------------------------------- frames
def encode_frame(magic: bytes, header: msgspec.Struct | dict[str, Any], body: bytes = b"") -> bytes:
    head = msgspec.json.encode(header)
    return magic + struct.pack(">I", len(head)) + head + body


def split_frame(data: bytes | bytearray | memoryview, magic: bytes, max_bytes: int) -> tuple[bytes, bytes]:
    """(header JSON bytes, body) of a frame, refusing anything malformed ('bad_frame', 'too_large', 'truncated')."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValidationError("bad_frame", "payload is not bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ValidationError("too_large", f"payload of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < 8 or data[:4] != magic:
        raise ValidationError("bad_frame", f"payload does not start with {magic!r}")
    (head_len,) = struct.unpack(">I", data[4:8])
    if head_len > MAX_HEADER_BYTES or 8 + head_len > len(data):
        raise ValidationError("truncated", f"header length {head_len} does not fit a {len(data)}-byte payload")
    return data[8:8 + head_len], data[8 + head_len:]


def decode_frame(data: bytes, magic: bytes, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """(header as a plain dict, body): for tools; the protocol's decoders read typed headers."""
    head, body = split_frame(data, magic, max_bytes)
    return parse_json_object(head, "header"), body


def parse_json_object(raw: bytes, what: str, max_bytes: int = MAX_HEADER_BYTES) -> dict[str, Any]:
    """Any JSON object (no NaN, no integers beyond 64 bits); ValidationError('bad_json' / 'too_large')."""
    if len(raw) > max_bytes:
        raise ValidationError("too_large", f"{what} of {len(raw)} bytes exceeds {max_bytes}")
    try:
        return msgspec.json.decode(raw, type=dict[str, Any])
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise ValidationError("bad_json", f"{what} is not a valid JSON object ({type(exc).__name__})") from None


# ---------------------------------------------------------------------------------------------------- chunks
class ChunkHeader(Message):
    stream: StreamKey  # identifies the payload (its idempotency key or sha256)
    index: Annotated[int, msgspec.Meta(ge=0, lt=MAX_CHUNKS)]
    count: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNKS)]
    size: Annotated[int, msgspec.Meta(ge=0, le=2**40)]  # total payload size
    sha256: Sha256  # of the whole payload

    def check(self) -> None:
        if self.index >= self.count:
            raise ValidationError("bad_field", f"chunk index {self.index} of a {self.count}-chunk stream")


@dataclass(frozen=True)
class Chunk:
    stream: str
    index: int
    count: int
    size: int
    sha256: str
    data: bytes


def split_chunks(payload: bytes, stream: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Chunk frames carrying `payload`; one frame if it fits in one chunk."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    count = max(1, math.ceil(len(payload) / chunk_size))
    digest = sha256_hex(payload)
    return [encode_frame(CHUNK_MAGIC, ChunkHeader(stream=stream, index=i, count=count, size=len(payload),
                                                  sha256=digest), payload[i * chunk_size:(i + 1) * chunk_size])
            for i in range(count)]


def decode_chunk(data: bytes, max_payload: int, chunk_size_limit: int = MAX_CHUNK_BYTES) -> Chunk:
    head, body = split_frame(data, CHUNK_MAGIC, min(chunk_size_limit, max_payload) + MAX_HEADER_BYTES + 8)
    header = decode_json(ChunkHeader, head, "chunk header", MAX_HEADER_BYTES)
    if header.size > max_payload:
        raise ValidationError("too_large", f"chunked payload of {header.size} bytes exceeds {max_payload}")
    return Chunk(header.stream, header.index, header.count, header.size, header.sha256, body)


@dataclass
class _Stream:
    count: int
    size: int
    sha256: str
    since: float
    parts: dict[int, bytes] = field(default_factory=dict)
    received: int = 0  # bytes held


class Reassembler:
    """Collects the chunks of payloads from several senders and returns each payload once it is complete
    and its hash checks. A repeated identical chunk (QoS 1 redelivery) is ignored; a repeated chunk with
    different bytes, inconsistent headers, a size or hash mismatch are refused. Streams that do not complete
    within `timeout` seconds are dropped by `expire()`, which reports them so they can be recorded.

    Bounded, so that no sender can lock others out: at most `max_streams_per_sender` incomplete streams per
    sender and `max_streams` in all, and at most `max_bytes` held by incomplete streams in all (a new stream
    that would not fit is refused, `reassembly_full`; single-chunk payloads never take space)."""

    def __init__(self, max_payload: int, timeout: float = 120.0, max_streams: int = 10_000,
                 max_streams_per_sender: int = 4, max_bytes: int = 256 * 1024 * 1024):
        self.max_payload = max_payload
        self.timeout = timeout
        self.max_streams = max_streams
        self.max_streams_per_sender = max_streams_per_sender
        self.max_bytes = max_bytes
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._per_sender: dict[str, int] = {}
        self.held_bytes = 0

    def add(self, sender: str, chunk: Chunk, now: float | None = None) -> bytes | None:
        now = time.monotonic() if now is None else now
        if chunk.count == 1 and (sender, chunk.stream) not in self._streams:
            return self._complete(chunk.stream, chunk.size, chunk.sha256, chunk.data)
        key = (sender, chunk.stream)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._open(sender, chunk, now)
        if (chunk.count, chunk.size, chunk.sha256) != (stream.count, stream.size, stream.sha256):
            self._drop(key)
            raise ValidationError("chunk_mismatch", f"chunk {chunk.index} of {chunk.stream} disagrees with earlier "
                                                    "chunks about count, size or hash")
        previous = stream.parts.get(chunk.index)
        if previous is not None:
            if previous != chunk.data:
                self._drop(key)
                raise ValidationError("chunk_conflict", f"chunk {chunk.index} of {chunk.stream} repeated with "
                                                        "other bytes")
        else:
            if stream.received + len(chunk.data) > stream.size:
                self._drop(key)
                raise ValidationError("chunk_size", f"chunks of {chunk.stream} exceed the announced size")
            stream.parts[chunk.index] = chunk.data
            stream.received += len(chunk.data)
            self.held_bytes += len(chunk.data)
        if len(stream.parts) < stream.count:
            return None
        self._drop(key)
        return self._complete(chunk.stream, stream.size, stream.sha256,
                              b"".join(stream.parts[i] for i in range(stream.count)))

    def _open(self, sender: str, chunk: Chunk, now: float) -> _Stream:
        if self._per_sender.get(sender, 0) >= self.max_streams_per_sender:
            raise ValidationError("too_many_streams", f"{sender} already has {self.max_streams_per_sender} "
                                                      "incomplete chunk streams")
        if len(self._streams) >= self.max_streams:
            raise ValidationError("too_many_streams", "too many incomplete chunk streams")
        if self.held_bytes + chunk.size > self.max_bytes:
            raise ValidationError("reassembly_full", f"incomplete uploads hold {self.held_bytes} bytes; a "
                                                     f"{chunk.size}-byte stream does not fit in {self.max_bytes}")
        stream = _Stream(chunk.count, chunk.size, chunk.sha256, now)
        self._streams[(sender, chunk.stream)] = stream
        self._per_sender[sender] = self._per_sender.get(sender, 0) + 1
        return stream

    def _drop(self, key: tuple[str, str]) -> _Stream | None:
        stream = self._streams.pop(key, None)
        if stream is not None:
            self.held_bytes -= stream.received
            left = self._per_sender[key[0]] - 1
            if left:
                self._per_sender[key[0]] = left
            else:
                del self._per_sender[key[0]]
        return stream

    @staticmethod
    def _complete(name: str, size: int, digest: str, payload: bytes) -> bytes:
        if len(payload) != size:
            raise ValidationError("chunk_size", f"{name}: {len(payload)} bytes, announced {size}")
        if sha256_hex(payload) != digest:
            raise ValidationError("chunk_hash", f"{name}: reassembled payload fails its sha256")
        return payload

    def is_open(self, sender: str, stream: str) -> bool:
        return (sender, stream) in self._streams

    def expire(self, now: float | None = None) -> list[tuple[str, str, int, int]]:
        """Drop streams older than the timeout; returns (sender, stream, chunks received, chunks expected)."""
        now = time.monotonic() if now is None else now
        dropped = []
        for key, stream in list(self._streams.items()):
            if now - stream.since > self.timeout:
                dropped.append((*key, len(stream.parts), stream.count))
                self._drop(key)
        return dropped
