"""What a device keeps on disk so that a restart loses nothing: the model version it holds, its own theta^f
(partial sharing), its partition assignment, and the uploads not yet acknowledged.

Layout of a state directory (one per device process; a lock file keeps a second process out)::

    STATE_DIR/client-id          the id `--client-id auto` chose for this directory (kept across restarts)
    STATE_DIR/.lock              held (flock) while an edge client runs on this directory
    STATE_DIR/jobs/JOB/...       DeviceState of each job: state.json, *.safetensors, pending/
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import socket
from pathlib import Path
from typing import IO

import numpy as np
from safetensors.numpy import load as st_load

from shared.fsutil import atomic_write
from shared.protocol.ids import is_valid_id
from shared.protocol.tensors import encode_tensors

CLIENT_ID_FILE = "client-id"
LOCK_FILE = ".lock"


class StateDirBusy(ValueError):
    """Another edge client runs on the same state directory."""


def lock_state_dir(root: str | Path) -> IO[str]:
    """Hold an exclusive lock on `root` for as long as the returned file stays open (the process's life).

    Two devices on one state directory would overwrite each other's state and, with ``--client-id auto``,
    share one id (the broker then drops one connection for the other, forever)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    handle = (root / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()[:32]
        handle.close()
        raise StateDirBusy(f"state directory {root} is in use by another edge client"
                           f"{f' (pid {holder})' if holder else ''}: give every device process its own "
                           "--state-dir") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def auto_client_id(root: str | Path) -> str:
    """The id ``--client-id auto`` gives the device of state directory `root`: read back from
    ``root/client-id``, else the host name plus a random suffix, written there. Unique per state directory,
    stable across restarts."""
    path = Path(root) / CLIENT_ID_FILE
    try:
        kept = path.read_text().strip()
    except OSError:
        kept = ""
    if is_valid_id(kept):
        return kept
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._")[:48] or "device"
    chosen = f"{host}-{secrets.token_hex(4)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, f"{chosen}\n".encode())
    return chosen


def job_state_dir(root: str | Path, job: str) -> Path:
    """Where the state of job `job` lives under the device's state directory (`job` is a checked id)."""
    return Path(root) / "jobs" / job


def _fresh_meta() -> dict:
    return {"version": None, "done": [], "pending": {}}


class DeviceState:
    """Files under the state directory; each write is atomic (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = self._read_meta()

    def _read_meta(self) -> dict:
        path = self.root / "state.json"
        if not path.exists():
            return _fresh_meta()
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):  # a damaged file: start over rather than crash
            return _fresh_meta()
        if not isinstance(meta, dict) or not isinstance(meta.get("done"), list) \
                or not isinstance(meta.get("pending"), dict):
            return _fresh_meta()
        return meta

    def save_meta(self) -> None:
        atomic_write(self.root / "state.json", json.dumps(self.meta, indent=1).encode())

    # tensors are our own files: read back with safetensors (no pickle)
    def save_tensors(self, name: str, tensors: dict[str, np.ndarray]) -> None:
        atomic_write(self.root / f"{name}.safetensors", encode_tensors(tensors))

    def load_tensors(self, name: str) -> dict[str, np.ndarray] | None:
        path = self.root / f"{name}.safetensors"
        if not path.exists():
            return None
        try:
            return st_load(path.read_bytes())
        except Exception:  # damaged file: treat as absent, the server has a full copy
            return None

    def save_pending(self, key: str, round_key: str, envelope: bytes) -> None:
        atomic_write(self.root / "pending" / f"{key}.bin", envelope)
        self.meta["pending"][key] = round_key
        self.save_meta()

    def pending(self) -> dict[str, bytes]:
        out = {}
        for key in list(self.meta["pending"]):
            path = self.root / "pending" / f"{key}.bin"
            if path.exists():
                out[key] = path.read_bytes()
            else:
                del self.meta["pending"][key]
        return out

    def mark_done(self, round_key: str) -> None:
        if round_key not in self.meta["done"]:
            self.meta["done"] = (self.meta["done"] + [round_key])[-1000:]
        self.save_meta()

    def acknowledged(self, key: str) -> None:
        round_key = self.meta["pending"].pop(key, None)
        (self.root / "pending" / f"{key}.bin").unlink(missing_ok=True)
        if round_key:
            self.mark_done(round_key)
        else:
            self.save_meta()
