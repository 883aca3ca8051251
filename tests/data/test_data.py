"""IDX reading, dataset location and the verified download (against a local HTTP server)."""

import functools
import gzip
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from shared.data.datasets import DATA_DIR_ENV, DataError, load_dataset, normalize, parse_idx, read_idx, write_idx
from shared.data.download import CHECKSUMS, download, file_sha256


def test_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


def test_idx_written_reproducibly(tmp_path):
    array = np.arange(50, dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00\x08\x01", "bad magic"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unsupported"),
    (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "needs 3"),
])
def test_bad_idx_refused(raw, message):
    with pytest.raises(DataError, match=message):
        parse_idx(raw)


def test_int32_idx_is_native_endian():
    raw = b"\x00\x00\x0c\x01\x00\x00\x00\x02" + (7).to_bytes(4, "big") + (-1).to_bytes(4, "big", signed=True)
    assert parse_idx(raw).tolist() == [7, -1]


def test_shipped_subset_loads_offline(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    ds = load_dataset("mnist-subset")
    assert ds.train_x.shape == (10_000, 1, 28, 28) and ds.test_x.shape == (3_000, 1, 28, 28)
    assert np.bincount(ds.train_y).tolist() == [1000] * 10
    assert np.bincount(ds.test_y).tolist() == [300] * 10
    x = normalize(ds.train_x[:100])
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0


def test_missing_data_dir_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="lacks"):
        load_dataset("mnist", tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset("fashion-mnist")
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("cifar")


@pytest.fixture
def shared_data_dir() -> Path:
    root = os.environ.get(DATA_DIR_ENV)
    if not root or not (Path(root) / "mnist").is_dir():
        pytest.skip(f"{DATA_DIR_ENV} does not point at the full datasets")
    return Path(root)


@pytest.fixture
def http_server(shared_data_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shared_data_dir))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_verifies_and_resumes(http_server, tmp_path):
    # the first mirror has nothing (404), the second serves the real files
    folder = download("mnist", tmp_path, mirrors=[f"{http_server}/nothing-here", f"{http_server}/mnist"])
    for name, sha in CHECKSUMS["mnist"].items():
        assert file_sha256(folder / name) == sha
    assert load_dataset("mnist", tmp_path).train_x.shape == (60_000, 1, 28, 28)
    # a corrupted file is fetched again, an intact one is kept
    victim = folder / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(b"garbage")
    download("mnist", tmp_path, mirrors=[f"{http_server}/mnist"])
    assert file_sha256(victim) == CHECKSUMS["mnist"]["t10k-labels-idx1-ubyte.gz"]


def test_download_refuses_wrong_checksum(http_server, tmp_path):
    # fashion-mnist's files served under mnist's names fail the checksum and leave nothing behind
    with pytest.raises(DataError, match="does not match"):
        download("mnist", tmp_path, mirrors=[f"{http_server}/fashion-mnist"])
    assert not [p for p in (tmp_path / "mnist").iterdir()]


def test_shared_data_matches_published_checksums(shared_data_dir):
    for dataset, files in CHECKSUMS.items():
        for name, sha in files.items():
            assert file_sha256(shared_data_dir / dataset / name) == sha, (dataset, name)
    with gzip.open(shared_data_dir / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz") as f:
        assert np.bincount(parse_idx(f.read())).tolist() == [1000] * 10
