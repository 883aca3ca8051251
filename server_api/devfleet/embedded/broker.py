"""The embedded MQTT 3.1.1 broker: connect, subscribe, routing, shared groups, delivery and flow control.

:class:`EmbeddedBroker` implements the part of MQTT 3.1.1 (protocol level 4; "MQIsdp" level 3 is
accepted too) that the FedGen protocol uses, and behaves like Mosquitto 2.0.11 where that matters:

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
* Persistence (``persistence_path``): retained messages and persistent sessions, saved on a clean
  stop and every ``autosave_interval`` seconds when changed, loaded on start (:mod:`.persistence`).
* Malformed input closes only that connection, with a log line.
* Wills are not published when the broker itself shuts down.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.fsutil import atomic_write

from . import persistence
from .packets import (
    ACCEPTED,
    BAD_CLIENT_ID,
    BAD_CREDENTIALS,
    BAD_PROTOCOL_VERSION,
    MAX_REMAINING_LENGTH,
    NOT_AUTHORISED,
    PINGRESP_BYTES,
    PUBLISH_HEADROOM,
    SHARE_PREFIX,
    SUBACK_FAILURE,
    SUPPORTED_PROTOCOLS,
    Connect,
    OversizedPublish,
    Packet,
    PingReq,
    ProtocolError,
    PubAck,
    Publish,
    Subscribe,
    Unsubscribe,
    Will,
    encode_connack,
    encode_puback,
    encode_publish,
    encode_suback,
    encode_unsuback,
    parse_filter,
    topic_matches,
)
from .sessions import _Connection, _Outgoing, _Retained, _Session, _SharedGroup

log = logging.getLogger("fedgen.broker")

DEFAULT_MAX_PAYLOAD = 1 << 20
DEFAULT_MAX_INFLIGHT = 100
DEFAULT_AUTOSAVE_INTERVAL = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0


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
            self._restore(self.persistence_path)
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
        return persistence.snapshot(self._retained, self._sessions.values())

    async def save(self) -> None:
        """Write the persistence file atomically (:func:`shared.fsutil.atomic_write`)."""
        if self.persistence_path is None:
            return
        assert self._save_lock is not None
        async with self._save_lock:
            self._dirty = False
            data = persistence.encode(self.snapshot())
            await asyncio.to_thread(atomic_write, self.persistence_path, data)
        log.debug("persistence saved to %s (%d bytes)", self.persistence_path, len(data))

    async def _autosave(self) -> None:
        while True:
            await asyncio.sleep(self.autosave_interval)
            if self._dirty:
                try:
                    await self.save()
                except OSError:
                    log.exception("autosave to %s failed", self.persistence_path)

    def _restore(self, path: Path) -> None:
        """Load the persistence file: retained messages, persistent sessions and their shared groups."""
        retained, sessions = persistence.load(path)
        self._retained.update(retained)
        for session in sessions:
            self._sessions[session.client_id] = session
            for topic_filter in session.subscriptions:
                parsed = parse_filter(topic_filter)
                if parsed is not None and parsed[0] is not None:
                    self._join_group(topic_filter, parsed[1], session.client_id)
        queued = sum(len(s.queue) + len(s.inflight) for s in self._sessions.values())
        log.info("restored %d retained messages and %d persistent sessions (%d queued messages) from %s",
                 len(self._retained), len(self._sessions), queued, path)
