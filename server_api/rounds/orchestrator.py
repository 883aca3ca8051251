"""The round orchestrator: one MQTT connection for the server, one worker thread per running job."""

from __future__ import annotations

import logging
import queue
import threading

from server_api.db import queries
from server_api.db.engine import in_transaction
from server_api.rounds.context import ServerContext
from server_api.rounds.worker import JobWorker
from shared.mqtt import Message
from shared.protocol.topics import ROOT, job_of

log = logging.getLogger("fedgen.server")
JOB_WATCH_S = 2.0
LOOK_AGAIN_S = 0.25  # the watcher looks at most this often when woken by messages for unknown jobs
MAX_HELD = 1000  # messages for unknown jobs waiting for the watcher's look (then handed on or dropped)


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
        self._look_now = threading.Event()  # a message came for a job not running here: look for jobs now
        self._held: list[Message] = []  # those messages, until the watcher has looked
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
        while not self._stopping.is_set():
            self._look_now.wait(JOB_WATCH_S)
            self._look_now.clear()
            try:
                self._start_unfinished()
            except Exception:  # the database is away: try again later
                log.warning("could not look for new jobs", exc_info=True)
            self._release_held()
            self._stopping.wait(LOOK_AGAIN_S)  # a flood of messages for unknown jobs: one look per interval

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
            if self._stopping.is_set() or (job_id in self.workers and self.workers[job_id].is_alive()):
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
            if not self._deliver(job_id, msg) and (job_id in self.workers or not self._hold(msg)):
                self._drop(msg)  # a job that ran here and finished, or nothing can wait any more

    def _deliver(self, job_id: str, msg: Message) -> bool:
        """Hand `msg` to the live worker of `job_id`; False if there is none."""
        with self._lock:
            worker = self.workers.get(job_id)
        if worker is None or not worker.is_alive():
            return False
        worker.inbox.put(msg)
        if not worker.is_alive():  # it ended meanwhile: nobody will handle what it still holds
            worker.drain()
        return True

    def _hold(self, msg: Message) -> bool:
        """A clustered process may hear of a job before its watcher has looked (created through another
        process's API, its first round already open): the message waits, and the watcher looks at once
        (at most every LOOK_AGAIN_S), then hands it to the job's worker or drops it. True if it waits."""
        if not self.ctx.clustered:
            return False
        with self._lock:
            if len(self._held) >= MAX_HELD:
                return False
            self._held.append(msg)
        self._look_now.set()
        return True

    def _release_held(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for msg in held:
            if not self._deliver(job_of(msg.topic) or "", msg):
                self._drop(msg)

    @staticmethod
    def _drop(msg: Message) -> None:
        msg.done()
        if msg.topic.endswith("/update"):
            log.warning("update on %s for a job that is not running; ignored", msg.topic[:200])
