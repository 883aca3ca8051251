"""Turning one received update message into an accept/duplicate/reject decision, in the order that makes a
bad payload cheap to refuse: size, chunk framing, envelope, header, round/client/version, tensors."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from shared.protocol import Chunk, Reassembler, UpdateHeader, decode_chunk, decode_update
from shared.wire import ValidationError, decode_tensors, sha256_hex

CHUNK_TIMEOUT_ENV = "FEDGEN_CHUNK_TIMEOUT_S"  # seconds an incomplete chunk stream waits before chunk_missing
DEFAULT_CHUNK_TIMEOUT = 120.0


def default_chunk_timeout() -> float:
    """$FEDGEN_CHUNK_TIMEOUT_S if it is a positive number, else 120 s."""
    try:
        value = float(os.environ.get(CHUNK_TIMEOUT_ENV, DEFAULT_CHUNK_TIMEOUT))
    except ValueError:
        return DEFAULT_CHUNK_TIMEOUT
    return value if math.isfinite(value) and value > 0 else DEFAULT_CHUNK_TIMEOUT


@dataclass
class RoundWindow:
    """What the server accepts right now: one open round of one job."""

    job: str
    index: int
    attempt: int
    version: int
    selected: set[str]
    deadline: float  # unix time
    accepted: set[str] = field(default_factory=set)


@dataclass
class Decision:
    status: str  # accepted | rejected | duplicate
    reason: str | None = None
    message: str | None = None
    header: UpdateHeader | None = None
    tensors: dict[str, torch.Tensor] | None = None
    payload: bytes | None = None  # the tensors blob of an accepted update

    @property
    def key(self) -> str | None:
        return self.header.idempotency_key if self.header else None


def reject(exc: ValidationError, header: UpdateHeader | None = None) -> Decision:
    return Decision("rejected", exc.reason, str(exc), header)


class UpdateValidator:
    """Stateless checks plus the chunk reassembler for one job."""

    def __init__(self, job: str, num_classes: int, spec: dict, max_bytes: int, chunk_timeout: float | None = None):
        self.job = job
        self.num_classes = num_classes
        self.spec = spec
        self.max_bytes = max_bytes
        self.reassembler = Reassembler(max_payload=max_bytes, timeout=chunk_timeout if chunk_timeout is not None
                                       else default_chunk_timeout())

    def reassemble(self, client: str, raw: bytes) -> bytes | None:
        """The complete envelope once its last chunk arrived; None while incomplete. Raises ValidationError."""
        chunk: Chunk = decode_chunk(raw, max_payload=self.max_bytes)
        return self.reassembler.add(client, chunk)

    def check(self, client: str, envelope: bytes, window: RoundWindow | None, now: float) -> Decision:
        """Validate a complete envelope against the open round; does not look at the database."""
        try:
            header, blob = decode_update(envelope, self.num_classes, self.max_bytes)
        except ValidationError as exc:
            return reject(exc)
        try:
            self._check_header(client, header, window, now)
            tensors = decode_tensors(blob, self.spec, max_bytes=self.max_bytes)
        except ValidationError as exc:
            return reject(exc, header)
        if client in window.accepted:
            return Decision("duplicate", "already_accepted", f"{client} already has an accepted update in "
                                                             f"round {window.index}", header)
        return Decision("accepted", header=header, tensors=tensors, payload=blob)

    def _check_header(self, client: str, header: UpdateHeader, window: RoundWindow | None, now: float) -> None:
        if header.client != client:
            raise ValidationError("client_mismatch", f"header says {header.client!r}, topic says {client!r}")
        if header.job != self.job:
            raise ValidationError("unknown_job", f"update for job {header.job!r} on job {self.job!r}'s topic")
        if window is None:
            raise ValidationError("no_open_round", "no round is open")
        if (header.round, header.attempt) != (window.index, window.attempt):
            late = (header.round, header.attempt) < (window.index, window.attempt)
            raise ValidationError("late" if late else "unknown_round",
                                  f"update for round {header.round}.{header.attempt}, open round is "
                                  f"{window.index}.{window.attempt}")
        if now > window.deadline:
            raise ValidationError("late", f"round {window.index} deadline passed {now - window.deadline:.1f} s ago")
        if client not in window.selected:
            raise ValidationError("not_selected", f"{client} is not selected in round {window.index}")
        if header.base_version != window.version:
            raise ValidationError("wrong_version", f"trained from version {header.base_version}, round "
                                                   f"{window.index} trains version {window.version}")


def garbage_key(raw: bytes) -> str:
    """An idempotency key for a payload too broken to carry one, so repeats are recorded once."""
    return "invalid-" + sha256_hex(raw)[:48]
