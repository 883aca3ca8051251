"""The clients of one job: who is online (their retained presence), what they hold, and partition assignment
for devices started with ``--partition ...:index=auto``.

Presence is mirrored in the database, but not on every message: a device repeating the same presence is
written at most every `REFRESH_S` seconds (a device cannot turn a presence flood into a database write flood).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import msgspec
from sqlalchemy.exc import DataError, IntegrityError

from server_api import metrics
from server_api.db.models import utcnow
from server_api.db.store import ArtifactStore
from server_api.rounds.context import Link
from server_api.rounds.round import RoundWindow
from server_api.rounds.state import ClientRecord, JobStore, VersionRecord
from shared.data.partition import PartitionSpec
from shared.protocol.codec import to_builtins
from shared.protocol.errors import ValidationError
from shared.protocol.messages import Assignment, Presence, decode_presence
from shared.protocol.topics import Topics

log = logging.getLogger("fedgen.server")
REFRESH_S = 30.0  # an unchanged presence is written again after this long (last_seen)


class ClientRegistry:
    """Presence of the job's clients, mirrored in the database, and their partition indices."""

    def __init__(self, job: str, state: JobStore, link: Link, release_after_s: float = 600.0):
        self.job = job
        self.state = state
        self.link = link
        self.topics = Topics(job)
        self.online: dict[str, Presence] = {}
        self.release_after_s = release_after_s  # an offline device's partition index is free after this long
        self._offline_since: dict[str, float] = {}  # monotonic time a device was last seen going offline
        self._saved: dict[str, tuple[ClientRecord, float]] = {}  # what was last written, and when
        self._taken: dict[bytes, dict[int, str]] | None = None  # spec -> index -> client (loaded on first use)
        # False in a process that does not run the job's rounds (another holds its lease): it follows who is
        # online, and leaves the database rows and partition assignments to the process that does
        self.mirror = True

    def load(self) -> None:
        """Clients marked online in the database count as online until their retained presence says else."""
        for row in self.state.online_clients():
            self.online[row.client_id] = Presence("online", row.num_samples, row.state_version)
        metrics.DEVICES_ONLINE.labels(self.job).set(len(self.online))

    def receive(self, client: str, payload: bytes) -> None:
        """One message on `client`'s presence topic (an empty one clears a retained message: ignored).
        Raises ValidationError for a presence that does not decode."""
        for _, exc in self.receive_many([(client, payload)]):
            raise exc

    def receive_many(self, messages: Sequence[tuple[str, bytes]]) -> list[tuple[str, ValidationError]]:
        """Messages on presence topics, as (sender, payload), in arrival order; their database rows are read
        and written in one transaction each (a fleet coming online is thousands of presences at once).
        Returns the refused ones (a presence that does not decode), which change nothing."""
        decoded: list[tuple[str, Presence]] = []
        refused: list[tuple[str, ValidationError]] = []
        for client, payload in messages:
            if not payload:
                continue
            try:
                decoded.append((client, decode_presence(payload)))
            except ValidationError as exc:
                refused.append((client, exc))
        for client, presence in decoded:
            self._note(client, presence)
        metrics.DEVICES_ONLINE.labels(self.job).set(len(self.online))
        if self.mirror and decoded:
            self._mirror(decoded)
        return refused

    def _note(self, client: str, presence: Presence) -> None:
        if presence.status == "online":
            self.online[client] = presence
            self._offline_since.pop(client, None)
        else:
            self.online.pop(client, None)
            self._offline_since[client] = time.monotonic()

    def _mirror(self, decoded: list[tuple[str, Presence]]) -> None:
        """Write the rows that changed (or were last written over `REFRESH_S` ago), then publish the
        partition assignments asked for."""
        unknown = sorted({c for c, _ in decoded if c not in self._saved})
        stored = self.state.clients_by_id(unknown) if unknown else {}
        writes: dict[str, ClientRecord] = {}
        assignments: list[tuple[str, Assignment]] = []
        now = time.monotonic()
        for client, presence in decoded:
            previous = writes.get(client) or (self._saved[client][0] if client in self._saved else stored.get(client))
            record, assignment = self._updated(client, presence, previous)
            if previous != record or now - self._saved.get(client, (None, 0.0))[1] > REFRESH_S:
                writes[client] = record
            if assignment is not None:
                assignments.append((client, assignment))
        for record in self._save(list(writes.values())):
            self._saved[record.client_id] = (record, now)
        for client, assignment in assignments:
            self.link.publish(self.topics.assignment(client), assignment.to_json(), retain=True)
            if assignment.index is None:
                log.warning("job %s: %s asked for a partition: %s", self.job, client, assignment.reason)

    def _save(self, records: list[ClientRecord]) -> list[ClientRecord]:
        """Write the rows in one transaction; if the database refuses what one of them holds, each on its own,
        so that one device's row does not keep the others' from being written. The rows written."""
        try:
            self.state.save_clients(records)
            return records
        except (DataError, IntegrityError):
            if len(records) == 1:
                log.exception("job %s: could not store the presence of %s", self.job, records[0].client_id)
                return []
        return [r for r in records if self._save([r])]

    def announced(self, client: str) -> int | None:
        """The sample count `client` announced in its presence, if it is online and said."""
        presence = self.online.get(client)
        return presence.num_samples if presence is not None else None

    def bytes_down(self, window: RoundWindow, version: VersionRecord, store: ArtifactStore,
                   partial: bool = False, other_models: dict[str, int] | None = None) -> int:
        """What the selected clients needed to download for this round, as a device decides it: the delta when
        it held the previous version (as its presence says); else in partial mode the predictor alone when it
        holds any earlier version (its theta^f is its own), else the full model (a device of another of the
        job's models: that model's initial classifier, sizes in `other_models`, and the predictor); plus the
        generator (FedGen)."""
        def size(sha: str | None) -> int:
            return store.size(sha) if sha else 0  # stat, no read

        total = 0
        for client in window.selected:
            held = self.online[client].version if client in self.online else None
            if version.delta and held == window.version - 1:
                total += size(version.delta)
            elif partial and held is not None:
                total += size(version.predictor_onnx)
            elif other_models and (model := self._model_of(client)) in other_models:
                total += other_models[model] + size(version.predictor_onnx)
            else:
                total += size(version.model_onnx)
            total += size(version.generator_onnx)
        return total

    def _model_of(self, client: str) -> str | None:
        presence = self.online.get(client)
        return presence.model if presence is not None and presence.model is not msgspec.UNSET else None

    def _updated(self, client: str, presence: Presence, row: ClientRecord | None
                 ) -> tuple[ClientRecord, Assignment | None]:
        info = {**(row.device_info if row else {}), **presence.device}
        if presence.model is not msgspec.UNSET:  # the model it runs, validated against the shipped names
            info["model"] = presence.model
        num_samples = presence.num_samples if presence.num_samples is not None else (row.num_samples if row else None)
        version = presence.version if presence.version is not None else (row.state_version if row else None)
        assignment = None
        spec = presence.partition_request
        if spec is not None and presence.status == "online":
            requested = to_builtins(spec)
            held = self._indices(spec).get(info.get("partition_index"))
            if info.get("partition_spec") != requested or info.get("partition_index") is None or held != client:
                info["partition_spec"] = requested
                info["partition_index"] = self._assign(spec, client)
            index = info["partition_index"]
            reason = None if index is not None else (f"all {spec.users} partition indices of this spec are held "
                                                     "by other devices")
            assignment = Assignment(spec, index, reason)
        return ClientRecord(client, presence.status, num_samples, version, info), assignment

    def _assign(self, spec: PartitionSpec, client: str) -> int | None:
        """The lowest index below `spec.users` that no other client of the job holds for this spec; None if all
        are taken."""
        taken = self._indices(spec)
        now = time.monotonic()
        for index, holder in list(taken.items()):
            gone_for = now - self._offline_since.get(holder, now) if holder not in self.online else 0.0
            if holder == client or gone_for > self.release_after_s:
                if holder != client:
                    log.info("job %s: partition index %d of %s released (offline for %.0f s)", self.job, index,
                             holder, gone_for)
                del taken[index]
        index = next((i for i in range(spec.users) if i not in taken), None)
        if index is not None:
            taken[index] = client
        return index

    def _indices(self, spec: PartitionSpec) -> dict[int, str]:
        if self._taken is None:
            self._taken = {}
            for row in self.state.all_clients():
                held, index = row.device_info.get("partition_spec"), row.device_info.get("partition_index")
                if isinstance(held, dict) and isinstance(index, int):
                    self._taken.setdefault(msgspec.json.encode(held, order="sorted"), {})[index] = row.client_id
                if row.status == "offline" and row.client_id not in self._offline_since:
                    age = (utcnow() - row.last_seen).total_seconds() if row.last_seen else 0.0
                    self._offline_since[row.client_id] = time.monotonic() - max(0.0, age)
        return self._taken.setdefault(msgspec.json.encode(to_builtins(spec), order="sorted"), {})
