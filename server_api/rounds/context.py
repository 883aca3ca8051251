"""What every job's round engine shares: the database, the blob store, the MQTT link and the server's limits."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy.orm import Session, sessionmaker

from server_api.db.store import ArtifactStore
from server_api.rounds.state import SqlJobStore

log = logging.getLogger("fedgen.server")


class Link(Protocol):
    """The part of `shared.mqtt.MqttLink` the round engine uses (tests pass a recording fake)."""

    connected: threading.Event

    def publish(self, topic: str, payload: bytes, retain: bool = False, wait: float | None = None) -> bool: ...
    def clear_retained(self, topic: str) -> None: ...


@dataclass
class ServerContext:
    session_factory: sessionmaker[Session]
    store: ArtifactStore
    link: Link
    max_upload_bytes: int = 16 * 1024 * 1024
    data_dir: str | None = None  # where datasets are found (server-side evaluation)
    partition_release_s: float = 600.0  # an offline device's partition index is given to another after this
    db_healthy: threading.Event = field(default_factory=threading.Event)
    # several server processes on the same database (--shared-subscription): this process's name in the
    # jobs' leases (None: the only process, no lease), and how long a lease lasts unless renewed
    instance: str | None = None
    lease_s: float = 10.0

    @property
    def clustered(self) -> bool:
        return self.instance is not None

    def job_store(self, job_id: str) -> SqlJobStore:
        return SqlJobStore(job_id, self.session_factory, self.db_healthy)


class Stopping(Exception):
    """The worker was asked to stop while it waited for something (the broker)."""


def publish_confirmed(link: Link, topic: str, payload: bytes, stopping: threading.Event, what: str,
                      retain: bool = True) -> None:
    """Publish and wait until the broker acknowledged it, however long the broker is away (a restart must not
    fail the job); every 30 s without an acknowledgement it is published again (these are retained messages:
    a repeat is harmless). Raises Stopping when `stopping` is set meanwhile."""
    started = reported = time.monotonic()
    while not stopping.is_set():
        if link.publish(topic, payload, retain=retain, wait=30):
            return
        if time.monotonic() - reported > 30:
            reported = time.monotonic()
            log.warning("%s: broker has not acknowledged %s for %.0f s; still trying", what, topic,
                        reported - started)
        link.connected.wait(1.0)
        time.sleep(0.1)
    raise Stopping()
