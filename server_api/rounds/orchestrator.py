"""The round orchestrator: one MQTT connection for the server, one worker thread per running job."""

from __future__ import annotations

import logging
import queue
import threading
import time

from server_api.db import queries
from server_api.db.engine import in_transaction
from server_api.rounds.context import ServerContext
from server_api.rounds.worker import JobWorker
from shared.protocol.topics import ROOT, job_of

log = logging.getLogger("fedgen.server")
JOB_WATCH_S = 2.0
MAX_LOOKED_UP = 4096  # job ids asked about recently (a bound: topics are the senders' choice)


class Orchestrator:
    """Starts a JobWorker for every job that is created or running, and routes each received message to the
    worker of its job (the job id is the topic level after the protocol root).

    With `share_group`, updates are received through the MQTT shared subscription ``$share/<group>/...``, so
    that several server processes split the ingest; the group name is a secret of the servers (a device that
    knew it could join the group and swallow other devices' uploads), see docs/broker.md. Such a process
    (`ctx.clustered`) also looks for jobs created through another process's API every `JOB_WATCH_S` seconds.
    """

    def __init__(self, ctx: ServerContext, share_group: str | None = None):
        self.ctx = ctx
        self.workers: dict[str, JobWorker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch, name="mqtt-dispatch", daemon=True)
        self._watcher = threading.Thread(target=self._watch_jobs, name="job-watch", daemon=True)
        self._looked_up: dict[str, float] = {}  # job id -> when the database was last asked about it
        prefix = f"$share/{share_group}/" if share_group else ""
        self.subscriptions = [f"{prefix}{ROOT}/+/clients/+/update", f"{ROOT}/+/clients/+/presence"]
        if ctx.clustered:  # multi-chunk uploads passed on to the process running the job's rounds
            self.subscriptions.append(f"{ROOT}/+/servers/chunks/+")

    def start(self) -> Orchestrator:
        for topic in self.subscriptions:
            self.ctx.link.subscribe(topic)
        self._dispatcher.start()
        self._start_unfinished()
        if self.ctx.clustered:
            self._watcher.start()
        return self

    def _start_unfinished(self) -> None:
        for job_id in in_transaction(self.ctx.session_factory, queries.unfinished_job_ids):
            self.job_created(job_id)

    def _watch_jobs(self) -> None:
        while not self._stopping.wait(JOB_WATCH_S):
            try:
                self._start_unfinished()
            except Exception:  # the database is away: try again later
                log.warning("could not look for new jobs", exc_info=True)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join(timeout=10)

    def job_created(self, job_id: str) -> None:
        """Start running `job_id` (called by POST /jobs, and on start for unfinished jobs)."""
        with self._lock:
            if job_id in self.workers and self.workers[job_id].is_alive():
                return
            worker = JobWorker(job_id, self.ctx)
            self.workers[job_id] = worker
        worker.start()

    def waiting(self, job_id: str) -> tuple[int, int] | None:
        """(online, needed) while `job_id`'s next round waits for devices, else None."""
        with self._lock:
            worker = self.workers.get(job_id)
        return worker.waiting if worker is not None and worker.is_alive() else None

    def status(self) -> dict:
        with self._lock:
            running = sum(1 for w in self.workers.values() if w.is_alive() and not w.finished.is_set())
        return {"broker": "connected" if self.ctx.link.connected.is_set() else "disconnected",
                "jobs_running": running,
                "database": "ok" if self.ctx.db_healthy.is_set() else "retrying"}

    def _dispatch(self) -> None:
        while not self._stopping.is_set():
            try:
                msg = self.ctx.link.inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            job_id = job_of(msg.topic)
            if job_id is None:
                msg.done()
                continue
            worker = self._worker_of(job_id)
            if worker is not None:
                worker.inbox.put(msg)
                if not worker.is_alive():  # it ended meanwhile: nobody will handle what it still holds
                    worker.drain()
                continue
            msg.done()
            if msg.topic.endswith("/update"):
                log.warning("update on %s for a job that is not running; ignored", msg.topic[:200])

    def _worker_of(self, job_id: str) -> JobWorker | None:
        """The live worker of `job_id`. In a clustered process, a job not running here yet may have just been
        created through another process's API (the watcher looks every JOB_WATCH_S seconds, and a round can
        open sooner): the database is asked, at most once a second per job id, and its worker started."""
        with self._lock:
            worker = self.workers.get(job_id)
        if worker is not None and worker.is_alive():
            return worker
        if not self.ctx.clustered or worker is not None:
            return None
        now = time.monotonic()
        if now - self._looked_up.get(job_id, -1.0) < 1.0:
            return None
        if len(self._looked_up) >= MAX_LOOKED_UP:  # ids come from topics, which anyone can invent
            self._looked_up.clear()
        self._looked_up[job_id] = now
        try:
            unfinished = in_transaction(self.ctx.session_factory, queries.unfinished_job_ids)
        except Exception:  # the database is away: the message is ignored, as before
            log.warning("could not look for job %s", job_id[:100], exc_info=True)
            return None
        if job_id not in unfinished:
            return None
        self.job_created(job_id)
        with self._lock:
            worker = self.workers.get(job_id)
        return worker if worker is not None and worker.is_alive() else None
