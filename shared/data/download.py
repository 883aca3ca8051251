"""`fedgen data download`: fetch the canonical dataset files and check them against published checksums."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from pathlib import Path

from shared.data.datasets import IDX_FILES, DataError

log = logging.getLogger(__name__)

# Canonical locations. MNIST's original host (yann.lecun.com/exdb/mnist/) often refuses downloads, so the
# widely used mirror that PyTorch's own loaders use comes first.
SOURCES: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}
# sha256 of the original gzip files (MNIST: the published md5 and sha256 match; Fashion-MNIST: files whose
# md5 equals the one published in zalandoresearch/fashion-mnist).
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}
MAX_FILE_BYTES = 64 * 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, expected_sha256: str, timeout: float) -> None:
    """Download `url` to `dest` atomically, refusing anything over MAX_FILE_BYTES or with the wrong hash."""
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                size += len(block)
                if size > MAX_FILE_BYTES:
                    raise DataError(f"{url}: larger than {MAX_FILE_BYTES} bytes, refused")
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != expected_sha256:
            raise DataError(f"{url}: sha256 {digest.hexdigest()} does not match the published {expected_sha256}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download(dataset: str, data_dir: str | os.PathLike, mirrors: list[str] | None = None,
             timeout: float = 60.0) -> Path:
    """Make `data_dir/<dataset>/` hold the four checked IDX files; files already there and intact are kept."""
    if dataset not in CHECKSUMS:
        raise DataError(f"no download source for {dataset!r}; downloadable: {', '.join(sorted(CHECKSUMS))}")
    folder = Path(data_dir) / dataset
    folder.mkdir(parents=True, exist_ok=True)
    bases = mirrors or SOURCES[dataset]
    for fname in IDX_FILES.values():
        dest, expected = folder / fname, CHECKSUMS[dataset][fname]
        if dest.is_file() and file_sha256(dest) == expected:
            log.info("%s: present and verified", dest)
            continue
        errors = []
        for base in bases:
            url = base.rstrip("/") + "/" + fname
            try:
                log.info("downloading %s", url)
                _fetch(url, dest, expected, timeout)
                break
            except (OSError, DataError) as exc:
                errors.append(f"{url}: {exc}")
        else:
            raise DataError(f"could not download {fname}: " + "; ".join(errors))
    return folder
