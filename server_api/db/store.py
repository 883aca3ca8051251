"""Content-addressed blob store on disk: ``root/ab/cdef...`` named by the sha256 of the content.

Model states and ONNX files are stored here, and client update payloads; the database keeps only their
digests (``artifacts`` is the index table). Writes are atomic (temporary file, fsync, ``os.replace``), so a
crash never leaves a partial blob under a valid name, and every read re-hashes the content.

The updates accepted together (one ingest batch; at most PACK_MAX_BLOB bytes each: partial sharing's
theta^p, and full updates of the shipped models) are written as one *pack*, ``root/packs/ab/cdef...`` (a
random name), not a file each: one file, one rename for the batch. Their rows say where each lies in its pack
(offset, length) and its sha256, which every read checks. Larger ones are blobs of their own, where the
per-file cost is small next to the bytes (bench: 7-46 us per 1.8-16 KB update in a pack against 180-300 us as
files; a 108 KB full update 32-34 us in a pack against 54-166 us as a file of its own, and 820-890 us in this
machine's /tmp). Either way one syncfs(2) makes the batch durable.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from shared.fsutil import atomic_write, file_sha256, sha256_hex, syncfs

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_PACK_RE = re.compile(r"[0-9a-f]{32}")
PACK_MAX_BLOB = 1024 * 1024


class ArtifactError(Exception):
    """Base class of the store's errors."""


class InvalidDigestError(ArtifactError, ValueError):
    """The name given is not a sha256 digest (64 lowercase hex characters)."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """No blob with this digest in the store."""


class ArtifactCorruptError(ArtifactError):
    """The blob on disk does not hash to its name."""


def validate_sha256(sha: str) -> str:
    """Return ``sha`` if it is 64 lowercase hex characters; raise :class:`InvalidDigestError` otherwise."""
    if not isinstance(sha, str) or not _SHA256_RE.fullmatch(sha):
        raise InvalidDigestError(f"not a sha256 digest (64 lowercase hex characters): {sha!r}")
    return sha


class ArtifactStore:
    """Blobs under ``root``, each at ``root/<sha[:2]>/<sha[2:]>``."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def path(self, sha: str) -> Path:
        """Where the blob ``sha`` lives (whether or not it exists). Validates ``sha``."""
        validate_sha256(sha)
        return self.root / sha[:2] / sha[2:]

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def size(self, sha: str) -> int:
        try:
            return self.path(sha).stat().st_size
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"artifact {sha} not found in {self.root}") from None

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its sha256. Idempotent; a corrupt existing copy is replaced."""
        sha = sha256_hex(data)
        target = self.path(sha)
        if target.is_file() and file_sha256(target) == sha:
            return sha
        atomic_write(target, data)
        return sha

    def pack_path(self, name: str) -> Path:
        if not isinstance(name, str) or not _PACK_RE.fullmatch(name):
            raise InvalidDigestError(f"not a pack name (32 lowercase hex characters): {name!r}")
        return self.root / "packs" / name[:2] / name[2:]

    def put_updates(self, blobs: list[bytes], digests: list[str]) -> list[tuple[str | None, int | None]]:
        """An ingest batch, durable when it returns (one syncfs(2); where it is missing every file and folder
        is synced): the blobs up to PACK_MAX_BLOB bytes in one new pack, the others a content-addressed blob
        each (`digests`: their sha256, just verified by the caller). For each, (pack, offset), or (None, None)
        for a blob of its own at its digest."""
        small = [i for i, blob in enumerate(blobs) if len(blob) <= PACK_MAX_BLOB]
        written: list[tuple[Path, bytes | list[bytes]]] = []
        where: list[tuple[str | None, int | None]] = [(None, None)] * len(blobs)
        if small:
            name, position = uuid.uuid4().hex, 0
            for i in small:
                where[i] = (name, position)
                position += len(blobs[i])
            written.append((self.pack_path(name), [blobs[i] for i in small]))  # written piece by piece
        for i, blob in enumerate(blobs):
            target = self.path(digests[i])
            if where[i][0] is None and not (target.is_file() and file_sha256(target) == digests[i]):
                written.append((target, blob))
        for target, data in written:
            atomic_write(target, data, sync=False)
        if written and not syncfs(self.root):
            for target, data in written:
                atomic_write(target, data)  # the slow, portable way: again, synced
        return where

    def get_packed(self, name: str, offset: int, length: int, sha: str) -> bytes:
        """The blob at `offset` (`length` bytes) of pack `name`, verified against its sha256 `sha`."""
        path = self.pack_path(name)
        validate_sha256(sha)
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"pack {name} not found in {self.root}") from None
        if len(data) != length or sha256_hex(data) != sha:
            raise ArtifactCorruptError(f"blob {sha} at {offset} (+{length}) of {path} is corrupt or truncated")
        return data

    def get_update(self, sha: str, pack: str | None, offset: int | None, length: int | None) -> bytes:
        """An accepted update's payload from where its row says it is: in a pack, else a blob of its own."""
        if pack is None:
            return self.get(sha)
        return self.get_packed(pack, int(offset or 0), int(length or 0), sha)

    def get(self, sha: str) -> bytes:
        """The content of blob ``sha``, verified against its name."""
        path = self.path(sha)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"artifact {sha} not found in {self.root}") from None
        actual = sha256_hex(data)
        if actual != sha:
            raise ArtifactCorruptError(
                f"artifact {sha} is corrupt: {path} ({len(data)} bytes) hashes to {actual}"
            )
        return data
