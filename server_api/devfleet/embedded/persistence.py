"""Persistence of the embedded broker: retained messages and persistent sessions in one JSON file.

The file (``persistence_path``) is ``{"format": "fedgen-embedded-broker", "version": 1,
"saved_at": ..., "retained": [...], "sessions": [...]}`` with payloads base64 (no pickle).  Only
persistent sessions (clean_session=0) are kept: subscriptions, the next packet id, in-flight
messages (re-sent with DUP=1 on reconnect) and queued messages.  The broker writes it with
:func:`shared.fsutil.atomic_write` on a clean stop and every ``autosave_interval`` seconds when
something changed, and loads it on start.  A file that cannot be read back is a
:class:`PersistenceError`, never silently discarded.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .sessions import _Outgoing, _Retained, _Session

PERSISTENCE_FORMAT = "fedgen-embedded-broker"
PERSISTENCE_VERSION = 1


class PersistenceError(RuntimeError):
    """The persistence file exists but cannot be read back."""


def snapshot(retained: Mapping[str, _Retained], sessions: Iterable[_Session]) -> dict[str, Any]:
    """The persistent state as a JSON-compatible dict (payloads base64); clean sessions are left out."""
    return {
        "format": PERSISTENCE_FORMAT,
        "version": PERSISTENCE_VERSION,
        "saved_at": time.time(),
        "retained": [{"topic": t, "qos": m.qos, "payload": _b64(m.payload)} for t, m in retained.items()],
        "sessions": [_session_to_json(s) for s in sessions if not s.clean],
    }


def encode(state: Mapping[str, Any]) -> bytes:
    """The bytes of the persistence file for a :func:`snapshot`."""
    return json.dumps(state, separators=(",", ":")).encode("utf-8")


def load(path: Path) -> tuple[dict[str, _Retained], list[_Session]]:
    """Read a persistence file: the retained messages by topic and the persistent sessions, in file order.

    Raises :class:`PersistenceError` when the file is unreadable, of another format or version, or corrupt.
    """
    data = _read(path)
    retained: dict[str, _Retained] = {}
    try:
        for item in data.get("retained", []):
            retained[str(item["topic"])] = _Retained(_unb64(item["payload"]), min(int(item["qos"]), 1))
        sessions = [_session_from_json(item) for item in data.get("sessions", [])]
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise PersistenceError(f"corrupt broker persistence file {path}: {exc!r}") from exc
    return retained, sessions


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise PersistenceError(f"cannot read broker persistence file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != PERSISTENCE_FORMAT:
        raise PersistenceError(f"{path} is not a {PERSISTENCE_FORMAT} persistence file")
    if data.get("version") != PERSISTENCE_VERSION:
        raise PersistenceError(f"{path}: unsupported persistence version {data.get('version')!r}")
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise TypeError("payload is not a base64 string")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _message_to_json(message: _Outgoing) -> dict[str, Any]:
    return {"topic": message.topic, "qos": message.qos, "retain": message.retain,
            "payload": _b64(message.payload)}


def _message_from_json(item: dict[str, Any]) -> _Outgoing:
    qos = min(int(item["qos"]), 1)
    return _Outgoing(str(item["topic"]), _unb64(item["payload"]), qos, bool(item["retain"]))


def _session_to_json(session: _Session) -> dict[str, Any]:
    return {
        "client_id": session.client_id,
        "subscriptions": dict(session.subscriptions),
        "next_id": session.next_id,
        "inflight": [{"packet_id": pid, **_message_to_json(m)} for pid, m in session.inflight.items()],
        "queue": [_message_to_json(m) for m in session.queue],
    }


def _session_from_json(item: dict[str, Any]) -> _Session:
    session = _Session(str(item["client_id"]), clean=False, next_id=int(item.get("next_id", 0)) % 65_536)
    session.subscriptions = {str(k): min(int(v), 1) for k, v in dict(item["subscriptions"]).items()}
    session.inflight = {int(m["packet_id"]): _message_from_json(m) for m in item.get("inflight", [])}
    session.queue = deque(_message_from_json(m) for m in item.get("queue", []))
    return session
