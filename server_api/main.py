"""`fedgen server`: the REST API and the round orchestrator in one process."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from server_api.db import Job, in_transaction, make_engine, make_session_factory, upgrade_schema
from server_api.job_worker import ServerContext
from server_api.orchestrator import Orchestrator
from server_api.settings import ServerSettings
from server_api.store import ArtifactStore
from shared.mqtt import MqttLink

log = logging.getLogger("fedgen.server")


def create_job_from_file(factory, path: Path) -> str:  # noqa: ANN001
    """Create the job described in a JSON file unless a job with its id exists (validated like POST /jobs)."""
    from server_api.schemas import JobConfig

    config = JobConfig.model_validate_json(Path(path).read_text())

    def create(session) -> None:  # noqa: ANN001
        if session.get(Job, config.id) is None:
            session.add(Job(id=config.id, config=config.stored_config()))
            log.info("created job %s from %s", config.id, path)

    in_transaction(factory, create)
    return config.id


def run_server(settings: ServerSettings, job_file: Path | None = None, client_id: str = "fedgen-server",
               shared_subscription: bool = False) -> None:
    """Upgrade the schema, connect to the broker, resume unfinished jobs and serve the API until SIGTERM."""
    import uvicorn

    from server_api.app import create_app

    upgrade_schema(settings.database_url)
    factory = make_session_factory(make_engine(settings.database_url))
    store = ArtifactStore(settings.artifact_dir)
    password = settings.broker_password.get_secret_value() if settings.broker_password else None
    link = MqttLink(settings.broker_url, client_id, clean_session=False, username=settings.broker_username,
                    password=password, tls_ca=str(settings.broker_tls_ca) if settings.broker_tls_ca else None)
    ctx = ServerContext(factory, store, link, settings.max_upload_bytes)
    ctx.db_healthy.set()
    if job_file is not None:
        create_job_from_file(factory, job_file)
    orchestrator = Orchestrator(ctx, shared_subscription=shared_subscription)
    link.start(wait=None)
    orchestrator.start()
    # the API only reads (and inserts jobs): on SQLite it must not take the write lock for every request
    api_factory = make_session_factory(make_engine(settings.database_url, sqlite_begin="DEFERRED"))
    app = create_app(settings, api_factory, store, orchestrator)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    log.info("serving on http://%s:%d (broker %s)", settings.host, settings.port, link.address.host)
    try:
        server.run()
    finally:
        orchestrator.stop()
        link.stop()
