"""Content-addressed blob store on disk: ``root/ab/cdef...`` named by the sha256 of the content.

Model states, ONNX files and client update payloads are stored here; the database keeps only their digests
(``artifacts`` is the index table). Writes are atomic (temporary file, fsync, ``os.replace``), so a crash
never leaves a partial blob under a valid name, and every read re-hashes the content.
"""

from __future__ import annotations

import re
from pathlib import Path

from shared.fsutil import atomic_write, file_sha256, sha256_hex, syncfs

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


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

    def put_many(self, blobs: list[bytes], digests: list[str] | None = None) -> list[str]:
        """`put` for many blobs, durable when it returns: written and renamed without a sync each, then one
        syncfs(2) for them all (group commit); where syncfs is missing, every file and directory is synced.
        `digests`: their sha256, when the caller has just verified them (an update's tensors_sha256)."""
        shas, written = [], []
        for i, data in enumerate(blobs):
            sha = digests[i] if digests is not None else sha256_hex(data)
            target = self.path(sha)
            if not (target.is_file() and file_sha256(target) == sha):
                atomic_write(target, data, sync=False)
                written.append((target, data))
            shas.append(sha)
        if written and not syncfs(self.root):
            for target, data in written:
                atomic_write(target, data)  # the slow, portable way: again, synced
        return shas

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
