"""Broker state: persistent sessions, messages on their way, retained messages, shared groups, connections.

* :class:`_Session` outlives its connection when ``clean_session=0``: subscriptions (including
  ``$share/...`` filters), QoS 1 messages queued while offline and unacknowledged in-flight
  messages, keyed by packet id in send order.
* :class:`_Connection` is one client socket.  It reads packets (waiting at most
  ``connect_timeout`` for CONNECT, then 1.5 x the client's keep-alive for each packet) and hands
  them to the :class:`~server_api.devfleet.embedded.broker.EmbeddedBroker`, which does every
  state change.  Malformed input closes only that connection, with a log line; a DISCONNECT
  clears the will, every other end of the connection leaves it to the broker to publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .packets import Connect, Disconnect, Packet, ProtocolError, Will, read_packet

if TYPE_CHECKING:
    from .broker import EmbeddedBroker

log = logging.getLogger("fedgen.broker")


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
