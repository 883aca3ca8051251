"""What a device keeps on disk so that a restart loses nothing: the model version it holds, its own theta^f
(partial sharing), its partition assignment, and the uploads not yet acknowledged."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from shared.wire import encode_tensors


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class DeviceState:
    """Files under the state directory; each write is atomic (temp file + rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.meta = self._read_meta()

    def _read_meta(self) -> dict:
        path = self.root / "state.json"
        if not path.exists():
            return {"version": None, "done": [], "pending": {}}
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # a damaged file: start over rather than crash
            return {"version": None, "done": [], "pending": {}}

    def save_meta(self) -> None:
        atomic_write(self.root / "state.json", json.dumps(self.meta, indent=1).encode())

    # tensors are our own files: read back with safetensors (no pickle)
    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_write(self.root / f"{name}.safetensors", encode_tensors(tensors))

    def load_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.root / f"{name}.safetensors"
        if not path.exists():
            return None
        try:
            return st_load(path.read_bytes())
        except Exception:  # noqa: BLE001 - damaged file: treat as absent, the server has a full copy
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

    def acknowledged(self, key: str) -> None:
        round_key = self.meta["pending"].pop(key, None)
        if round_key and round_key not in self.meta["done"]:
            self.meta["done"] = (self.meta["done"] + [round_key])[-1000:]
        (self.root / "pending" / f"{key}.bin").unlink(missing_ok=True)
        self.save_meta()
