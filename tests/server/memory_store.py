"""An in-memory `JobStore` (server_api/rounds/state.py) and a recording MQTT link, for fast unit tests of the
round engine. The real store (SqlJobStore) runs in the database tests and every fleet test."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from server_api.rounds.state import ClientRecord, JobRecord, RoundRecord, RoundResult, UpdateRecord, VersionRecord


@dataclass
class MemoryJobStore:
    job_id: str
    config: dict[str, Any]
    status: str = "created"
    current_round: int = 0
    error: str | None = None
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    rounds: dict[int, RoundRecord] = field(default_factory=dict)
    results: dict[int, RoundResult] = field(default_factory=dict)
    updates: dict[str, UpdateRecord] = field(default_factory=dict)
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    artifact_sizes: dict[str, int] = field(default_factory=dict)
    client_writes: int = 0

    def job(self) -> JobRecord:
        return JobRecord(self.job_id, self.status, self.current_round, dict(self.config), self.error)

    def set_job_status(self, status: str, error: str | None = None, finished: bool = False) -> None:
        self.status, self.error = status, error or self.error

    def latest_version(self) -> VersionRecord | None:
        return self.versions[max(self.versions)] if self.versions else None

    def version(self, number: int) -> VersionRecord | None:
        return self.versions.get(number)

    def add_version(self, record: VersionRecord, sizes: dict[str, int],
                    closes: tuple[int, RoundResult] | None = None) -> None:
        if record.version in self.versions:
            raise ValueError(f"version {record.version} exists")
        self.versions[record.version] = record
        self.artifact_sizes.update({record.blobs()[k]: v for k, v in sizes.items()})
        if closes is not None:
            round_id, result = closes
            self.finish_round(round_id, result)
            self.current_round = self.rounds[round_id].index + 1

    def attempt_count(self, index: int) -> int:
        return sum(1 for r in self.rounds.values() if r.index == index)

    def unfinished_round(self, index: int) -> RoundRecord | None:
        return next((r for r in self.rounds.values() if r.index == index and r.status in ("open", "aggregating")),
                    None)

    def create_round(self, index: int, attempt: int, selected: Sequence[str], deadline: datetime) -> int:
        row_id = len(self.rounds) + 1
        self.rounds[row_id] = RoundRecord(row_id, index, attempt, "open", list(selected), deadline)
        return row_id

    def set_round_status(self, round_id: int, status: str) -> None:
        self.rounds[round_id] = replace(self.rounds[round_id], status=status)

    def finish_round(self, round_id: int, result: RoundResult) -> None:
        self.set_round_status(round_id, result.status)
        self.results[round_id] = result

    def round_id(self, index: int, attempt: int) -> int | None:
        return next((r.id for r in self.rounds.values() if (r.index, r.attempt) == (index, attempt)), None)

    def latest_round_id(self) -> int | None:
        return max(self.rounds) if self.rounds else None

    def find_update(self, key: str) -> UpdateRecord | None:
        return self.updates.get(key)

    def find_updates(self, keys: Sequence[str]) -> dict[str, UpdateRecord]:
        return {k: self.updates[k] for k in keys if k in self.updates}

    def add_update(self, record: UpdateRecord) -> bool:
        return self.add_updates([record])[0]

    def add_updates(self, records: Sequence[UpdateRecord]) -> list[bool]:
        stored = []
        for record in records:
            stored.append(record.idempotency_key not in self.updates)
            self.updates.setdefault(record.idempotency_key, record)
        return stored

    def accepted_updates(self, round_id: int) -> list[UpdateRecord]:
        return [u for u in self.updates.values() if u.round_id == round_id and u.status == "accepted"]

    def accepted_clients(self, round_id: int) -> set[str]:
        return {u.client_id for u in self.accepted_updates(round_id)}

    def online_clients(self) -> list[ClientRecord]:
        return [c for c in self.clients.values() if c.status == "online"]

    def all_clients(self) -> list[ClientRecord]:
        return list(self.clients.values())

    def clients_by_id(self, client_ids: Sequence[str]) -> dict[str, ClientRecord]:
        return {c: self.clients[c] for c in client_ids if c in self.clients}

    def save_clients(self, records: Sequence[ClientRecord]) -> None:
        for record in records:
            self.clients[record.client_id] = record
            self.client_writes += 1


class RecordingLink:
    """Takes publishes (acknowledged at once) and keeps them: (topic, payload, retain)."""

    def __init__(self) -> None:
        self.connected = threading.Event()
        self.connected.set()
        self.published: list[tuple[str, bytes, bool]] = []

    def publish(self, topic: str, payload: bytes, retain: bool = False, wait: float | None = None) -> bool:
        self.published.append((topic, payload, retain))
        return True

    def clear_retained(self, topic: str) -> None:
        self.published.append((topic, b"", True))

    def on(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in self.published if t == topic]
