"""Running the embedded broker: in a background thread (tests, in-process use) or in the foreground.

:func:`run_in_thread` starts an :class:`EmbeddedBroker` on its own event loop in a daemon thread
and returns a :class:`BrokerThread` handle (``port``, ``url``, ``stop()``, a context manager).
:func:`main` is the command line: it serves until SIGTERM/SIGINT, then stops cleanly (closing
every connection without publishing wills, and saving the persistence file)::

    python -m server_api.devfleet.embedded --host 127.0.0.1 --port 1883 --persistence state/broker.json
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from .broker import DEFAULT_AUTOSAVE_INTERVAL, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_PAYLOAD, EmbeddedBroker
from .persistence import PersistenceError

log = logging.getLogger("fedgen.broker")


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

    def __enter__(self) -> BrokerThread:
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
        except BaseException as exc:  # handed to the caller
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
    p = argparse.ArgumentParser(prog="python -m server_api.devfleet.embedded",
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

