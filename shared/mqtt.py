"""A thin paho-mqtt wrapper used by the server and the edge client: MQTT 3.1.1, QoS 1, persistent sessions,
automatic reconnection, TLS, last will. Transport only: it knows topics and bytes, nothing of the algorithm."""

from __future__ import annotations

import logging
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

import paho.mqtt.client as paho

log = logging.getLogger("fedgen.mqtt")
FAILURE_LOG_INTERVAL_S = 60.0  # the same connection failure is logged at most once per interval
KICK_WINDOW_S = 60.0  # this many short-lived connections within this window: another client has our id
KICKS = 3
PAUSED_READ_SLEEP_S = 0.005  # while a link's backlog is full, its network thread checks again this often


def client_certificate_name(certfile: str, keyfile: str) -> str:
    """The CN of a client certificate (the user name the certificate listener gives the device), after checking
    that the key belongs to it; ValueError with a one-line reason otherwise."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certfile, keyfile)
        # the stdlib's only certificate parser without a live connection (CPython's own tests use it)
        subject = ssl._ssl._test_decode_cert(certfile)["subject"]  # type: ignore[attr-defined]
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--tls-cert {certfile} / --tls-key {keyfile}: not a certificate and its key ({exc})") \
            from None
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    if len(names) != 1:
        raise ValueError(f"--tls-cert {certfile}: needs exactly one CN (the device id), has {len(names)}")
    return names[0]


def describe_connect_error(exc: BaseException | None, tls: bool) -> str:
    """A one-line, operator-facing reason why a connection attempt failed (no traceback)."""
    if exc is None:
        return "connection failed (no details from paho)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or exc.reason or str(exc)
        return (f"TLS error: the broker's certificate was not accepted ({detail}); is the CA file "
                "(--tls-ca / FEDGEN_BROKER_TLS_CA) the one that signed the broker's certificate, and does the "
                "host name match it?")
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc} (is the port the broker's TLS listener?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and is the port right?)"
    if isinstance(exc, (TimeoutError, ConnectionResetError)) and tls:
        return f"{type(exc).__name__}: {exc} (during the TLS handshake?)"
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """mqtt://host:port (default 1883) or mqtts://host:port (TLS, default 8883)."""
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        tls = parsed.scheme in ("mqtts", "ssl")
        if not parsed.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        try:
            port = parsed.port
        except ValueError as exc:  # "Port out of range 0-65535", "Port could not be cast to integer value"
            raise ValueError(f"broker URL {url!r}: {exc}") from None
        return cls(parsed.hostname, port or (8883 if tls else 1883), tls)


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    # a link with a bounded backlog (`max_backlog`) counts the message until `done()`: the owner calls it when
    # it has handled the message
    on_done: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def done(self) -> None:
        """The message has been handled (a no-op unless the link paces its acknowledgements)."""
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done()


class Backlog:
    """Messages received and not yet handled (`Message.done`), with a bound: while it is full the link stops
    reading its socket, so the broker holds what would otherwise pile up in memory (TCP flow control: the
    broker's send buffer fills, then its queue for this session). Deliveries are acknowledged on receipt
    (paho), as without a bound: what was read and acknowledged waits in memory, at most `limit` (+1, the
    packet being read) messages.

    The bound is exceeded only while the link's owner waits for the broker to acknowledge one of its own
    publishes (MqttLink.publish with `wait`): that acknowledgement arrives on the same socket, so the link
    reads on meanwhile. Acknowledgements alone cannot bound the backlog on Mosquitto 2.0.11: it does not
    enforce its in-flight window after the first PUBACK (docs/scaling.md, "A bounded inbox")."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self.count = 0
        self.peak = 0

    def received(self) -> Callable[[], None]:
        with self._lock:
            self.count += 1
            self.peak = max(self.peak, self.count)
        return self._done

    def _done(self) -> None:
        with self._lock:
            self.count -= 1

    @property
    def full(self) -> bool:
        return self.count >= self.limit


class _PausableClient(paho.Client):
    """paho's client, whose network thread skips reading the socket while `pause()` says so (it keeps
    writing: acknowledgements, publishes, pings). A pause longer than the keepalive ends in paho's ping timeout
    and a reconnection; the broker then redelivers what it had sent and not had acknowledged."""

    def __init__(self, *args, pause: Callable[[], bool], **kwargs):
        super().__init__(*args, **kwargs)
        self._pause = pause

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        if self._pause():
            time.sleep(PAUSED_READ_SLEEP_S)  # the socket stays readable: do not spin on select()
            return paho.MQTTErrorCode.MQTT_ERR_SUCCESS
        return super().loop_read(max_packets)

    def _packet_read(self) -> paho.MQTTErrorCode:
        """paho's loop_read reads as many packets per wake-up as this client has publishes awaiting their
        PUBACK (thousands while the server answers a burst): the pause is checked before each one. Leaving a
        packet half read is safe: paho keeps the partial packet and the next call goes on with it."""
        if self._pause():
            return paho.MQTTErrorCode.MQTT_ERR_AGAIN
        return super()._packet_read()


class MqttLink:
    """One MQTT connection that survives broker restarts: subscriptions are renewed on every (re)connect,
    QoS 1 messages published while disconnected are queued by paho and sent after reconnecting, and every
    received message is put on `inbox` (processed by the owner's thread, never in paho's network thread)."""

    def __init__(self, url: str, client_id: str, *, clean_session: bool = False, username: str | None = None,
                 password: str | None = None, tls_ca: str | None = None,
                 tls_cert: tuple[str, str] | None = None, keepalive: int = 30,
                 will: tuple[str, bytes] | None = None, max_backlog: int | None = None):
        self.address = BrokerAddress.parse(url)
        self.client_id = client_id
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.connected = threading.Event()
        self._subscriptions: set[str] = set()
        self._on_connect_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._keepalive = keepalive
        self.last_error: str | None = None
        self._failures = 0  # failed attempts since the last successful connection
        self._reported: tuple[str, float] | None = None  # last failure logged and when (rate limit)
        # max_backlog: at most this many received messages not yet handled (Message.done); None: no bound
        self.backlog = Backlog(max_backlog) if max_backlog is not None else None
        self._awaiting = 0  # publishes whose PUBACK a caller waits for: reading must go on for them
        client = _PausableClient(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                 clean_session=clean_session, protocol=paho.MQTTv311, pause=self._pause_reading)
        client.max_queued_messages_set(0)  # unbounded: QoS 1 publishes made while offline are never dropped
        client.max_inflight_messages_set(50)
        client.reconnect_delay_set(min_delay=1, max_delay=15)
        if username:
            client.username_pw_set(username, password)
        self._tls = bool(self.address.tls or tls_ca or tls_cert)
        if self._tls:  # tls_cert: (certificate, key) files of this client, for the certificate listener
            certfile, keyfile = tls_cert or (None, None)
            client.tls_set(ca_certs=tls_ca, certfile=certfile, keyfile=keyfile, cert_reqs=ssl.CERT_REQUIRED,
                           tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will:
            client.will_set(will[0], will[1], qos=1, retain=True)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        self._acks = threading.Condition()
        self._acked: dict[int, float] = {}  # message id -> when its PUBACK arrived (at most 65535 entries)
        self._stopping = False
        self._connected_at = 0.0
        self._short_lived: list[float] = []  # when connections that lasted under 5 s ended
        self._client = client

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self, wait: float | None = 30.0) -> MqttLink:
        """Connect in the background (retrying forever); optionally wait for the first connection."""
        self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        self._client.loop_start()
        if wait is not None and not self.connected.wait(wait):
            detail = f" ({self.last_error})" if self.last_error else ""
            raise ConnectionError(f"no connection to {self.address.host}:{self.address.port} within {wait} s{detail}")
        return self

    def stop(self) -> None:
        """Disconnect cleanly (the broker does not publish the will) and stop the network thread."""
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call `hook` (from the network thread) after every successful (re)connection."""
        self._on_connect_hooks.append(hook)

    # ------------------------------------------------------------------------------------------ messaging
    def subscribe(self, topic: str) -> None:
        with self._lock:
            self._subscriptions.add(topic)
        if self.connected.is_set():
            self._client.subscribe(topic, qos=1)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subscriptions.discard(topic)
        if self.connected.is_set():
            self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, retain: bool = False, wait: float | None = None) -> bool:
        """Publish at QoS 1. With `wait`, block until the broker acknowledged it (True) or the time ran out."""
        started = time.monotonic()
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if wait is None:
            return True
        # paho re-sends a message queued while disconnected after reconnecting, under the same message id;
        # its PUBACK (on_publish) is what counts. Ids wrap at 65535, so only an ack newer than this call counts.
        deadline = started + wait
        with self._acks:
            self._awaiting += 1
            try:
                while self._acked.get(info.mid, -1.0) < started:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._acks.wait(remaining)
            finally:
                self._awaiting -= 1
        return True

    def _pause_reading(self) -> bool:
        """Whether the network thread should leave the socket unread for now: the backlog is full and nobody
        waits for a PUBACK (which only reading brings; the owner that would drain the backlog may be the one
        waiting, so pausing then could stall both for good)."""
        return self.backlog is not None and self.backlog.full and not self._awaiting

    def clear_retained(self, topic: str) -> None:
        self._client.publish(topic, b"", qos=1, retain=True)

    # ------------------------------------------------------------------------------------------ callbacks
    def _report_failure(self, reason: str) -> None:
        """Log a failed connection attempt: a new reason at once, the same one again at most once per
        FAILURE_LOG_INTERVAL_S (paho retries every 1..15 s, forever), so a misconfigured device logs a clear
        line, not a flood."""
        self._failures += 1
        self.last_error = reason
        now = time.monotonic()
        if self._reported is not None and self._reported[0] == reason \
                and now - self._reported[1] < FAILURE_LOG_INTERVAL_S:
            return
        self._reported = (reason, now)
        log.error("%s: cannot connect to %s:%d: %s (attempt %d; retrying)", self.client_id, self.address.host,
                  self.address.port, reason, self._failures)

    def _handle_connect_fail(self, client, userdata) -> None:
        # paho calls this from inside its `except OSError:` around the connection attempt (socket, TLS
        # handshake), so the exception is the one being handled; paho itself does not pass it on.
        self._report_failure(describe_connect_error(sys.exc_info()[1], self._tls))

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            hint = ""
            if reason_code.value in (0x84, 0x86, 0x87, 4, 5):  # bad user name or password / not authorized
                hint = " (wrong or missing username/password? the broker may not accept anonymous clients)"
            self._report_failure(f"broker refused the connection: {reason_code}{hint}")
            return
        with self._lock:
            topics = sorted(self._subscriptions)
        for topic in topics:
            client.subscribe(topic, qos=1)
        if self._failures:
            log.info("%s: connected after %d failed attempt(s)", self.client_id, self._failures)
        self._failures, self._reported = 0, None
        self.last_error = None
        self._connected_at = time.monotonic()
        self.connected.set()
        log.info("%s connected to %s:%d (session present: %s)", self.client_id, self.address.host,
                 self.address.port, flags.session_present)
        for hook in self._on_connect_hooks:
            try:
                hook()
            except Exception:  # a hook must not kill paho's network thread
                log.exception("on-connect hook failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if self._stopping:
            return
        now = time.monotonic()
        if was_connected and now - self._connected_at < 5.0:
            self._short_lived = [t for t in self._short_lived if now - t < KICK_WINDOW_S] + [now]
            if len(self._short_lived) == KICKS:
                log.error("%s: the broker closed %d connections within seconds of opening them: another client "
                          "is probably using the client id %r (each connection replaces the other); give every "
                          "device its own id (and state directory)", self.client_id, KICKS, self.client_id)
        if was_connected:
            log.warning("%s disconnected from the broker (%s); reconnecting", self.client_id, reason_code)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acks:
            self._acked[mid] = time.monotonic()
            self._acks.notify_all()

    def _handle_message(self, client, userdata, msg) -> None:
        on_done = self.backlog.received() if self.backlog is not None else None
        self.inbox.put(Message(msg.topic, bytes(msg.payload), bool(msg.retain), on_done))
