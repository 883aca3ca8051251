"""`fedgen server`: the REST API and the round orchestrator in one process."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import signal
import socket
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from server_api.db import Job, in_transaction, make_engine, make_session_factory, upgrade_schema
from server_api.db.store import ArtifactStore
from server_api.rounds.context import ServerContext
from server_api.rounds.orchestrator import Orchestrator
from server_api.settings import ServerSettings
from shared.mqtt import MqttLink
from shared.protocol.codec import decode_json
from shared.protocol.job import JobConfig

log = logging.getLogger("fedgen.server")


def create_job_from_file(factory: sessionmaker[Session], path: Path) -> str:
    """Create the job described in a JSON file unless a job with its id exists (validated like POST /jobs)."""
    config = decode_json(JobConfig, Path(path).read_bytes(), f"job file {path}", 1024 * 1024)

    def create(session: Session) -> None:
        if session.get(Job, config.id) is None:
            session.add(Job(id=config.id, config=config.stored_config()))
            log.info("created job %s from %s", config.id, path)

    in_transaction(factory, create)
    return config.id


def share_group(settings: ServerSettings) -> str:
    """The secret MQTT share group of the ingest: FEDGEN_INGEST_GROUP, else derived from the admin token (which
    every server process of one deployment shares). ValueError if neither is set."""
    if settings.ingest_group is not None:
        return settings.ingest_group.get_secret_value()
    if settings.admin_token is None:
        raise ValueError("--shared-subscription needs FEDGEN_INGEST_GROUP (a secret shared by the server "
                         "processes) or FEDGEN_ADMIN_TOKEN to derive it from")
    digest = hmac.new(settings.admin_token.get_secret_value().encode(), b"fedgen ingest share group",
                      hashlib.sha256).hexdigest()
    return f"fedgen-{digest[:32]}"


def instance_name(client_id: str) -> str:
    """This process's name in the jobs' leases: its MQTT client id, host, pid and a random part (a restarted
    process is a new holder: it waits out the lease of the one that died like any other process)."""
    return f"{client_id}@{socket.gethostname()[:64]}/{os.getpid()}/{secrets.token_hex(4)}"[:200]


def run_server(settings: ServerSettings, job_file: Path | None = None, shared_subscription: bool = False) -> None:
    """Upgrade the schema, connect to the broker, resume unfinished jobs and serve the API until SIGTERM."""
    import uvicorn

    from server_api.api.app import create_app

    group = share_group(settings) if shared_subscription else None
    upgrade_schema(settings.database_url)
    factory = make_session_factory(make_engine(settings.database_url))
    store = ArtifactStore(settings.artifact_dir)
    password = settings.broker_password.get_secret_value() if settings.broker_password else None
    link = MqttLink(settings.broker_url, settings.client_id, clean_session=False,
                    username=settings.broker_username, password=password,
                    tls_ca=str(settings.broker_tls_ca) if settings.broker_tls_ca else None,
                    max_backlog=settings.max_backlog or None)
    ctx = ServerContext(factory, store, link, settings.max_upload_bytes,
                        str(settings.data_dir) if settings.data_dir else None, settings.partition_release_s,
                        instance=instance_name(settings.client_id) if shared_subscription else None,
                        lease_s=settings.lease_s)
    ctx.db_healthy.set()
    if job_file is not None:
        create_job_from_file(factory, job_file)
    orchestrator = Orchestrator(ctx, share_group=group)
    link.start(wait=None)
    orchestrator.start()
    # the API only reads (and inserts jobs): on SQLite it must not take the write lock for every request
    api_factory = make_session_factory(make_engine(settings.database_url, sqlite_begin="DEFERRED"))
    app = create_app(settings, api_factory, store, orchestrator)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    log.info("serving on http://%s:%d (broker %s, database %s)", settings.host, settings.port,
             link.address.host, settings.database_url_masked)
    try:
        server.run()
    finally:
        orchestrator.stop()
        link.stop()
