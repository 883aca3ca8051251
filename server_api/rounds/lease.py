"""Which of several server processes runs a job's rounds: the job's lease (table ``job_leases``).

Every process ingests updates (MQTT shared subscription); the one holding the lease also opens, closes and
publishes the rounds. It renews the lease every third of its length on a thread of its own, so a long round
close does not let it lapse; when the holder dies, another process takes the expired lease over and resumes
the open round from the database. Correctness does not rest on timing: every write that moves a round on is
fenced by the lease in its own transaction (`SqlJobStore.fence`), so a process that lost it cannot close a
round, and an accepted update is stored only while its round is open (`SqlJobStore.add_updates`).
"""

from __future__ import annotations

import logging
import threading
import time

from server_api.rounds.state import JobStore

log = logging.getLogger("fedgen.server")


class JobLeaseKeeper:
    """Takes, renews and gives up one job's lease for this process (`holder`)."""

    def __init__(self, state: JobStore, holder: str, ttl_s: float):
        self.state = state
        self.holder = holder
        self.ttl_s = ttl_s
        self.lost = threading.Event()  # set when a renewal failed: stop running the job's rounds
        self._held = threading.Event()
        self._released = threading.Event()  # wakes the renewer at once
        self._renewer: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._held.is_set() and not self.lost.is_set()

    def take(self) -> bool:
        """Take the lease if it is free or expired; True if this process holds it now (and renews it)."""
        if not self.state.acquire_lease(self.holder, self.ttl_s):
            return False
        self.lost.clear()
        self._released.clear()
        self._held.set()
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.state.job_id}", daemon=True)
        self._renewer.start()
        log.info("job %s: this process (%s) runs its rounds now", self.state.job_id, self.holder)
        return True

    def release(self) -> None:
        """Stop renewing; give the lease up at once if it is still held (another process need not wait)."""
        held = self.held
        self._held.clear()
        self._released.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            self._renewer = None
        if held:
            try:
                self.state.release_lease(self.holder)
            except Exception:  # it expires on its own
                log.warning("job %s: could not give up the lease; it expires in %.0f s", self.state.job_id,
                            self.ttl_s, exc_info=True)

    def _renew(self) -> None:
        renewed = time.monotonic()
        while not self._released.wait(self.ttl_s / 3) and not self.lost.is_set():
            try:
                ok = self.state.acquire_lease(self.holder, self.ttl_s)
            except Exception:  # the database is away: the lease holds until it expires
                log.warning("job %s: could not renew the lease", self.state.job_id, exc_info=True)
                ok = time.monotonic() - renewed < self.ttl_s * 2 / 3
            else:
                renewed = time.monotonic() if ok else renewed
            if not ok:
                log.warning("job %s: lost the lease; another server process runs its rounds", self.state.job_id)
                self.lost.set()

