"""Datasets: IDX reading, where the files live, normalisation, and the shipped MNIST subset.

A dataset is found in a *data directory* laid out as ``<data_dir>/<dataset>/<idx files>`` (the layout of
``fedgen data download``). The directory comes from ``--data-dir``, else the ``FEDGEN_DATA_DIR`` environment
variable. The dataset ``mnist-subset`` is shipped inside the package (``shared/data/shipped/``) so that the demo and
the fast tests work offline with no data directory at all.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np

DATA_DIR_ENV = "FEDGEN_DATA_DIR"
SHIPPED_DIR = Path(__file__).parent / "shipped"

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class DataError(ValueError):
    """A dataset is missing, malformed or does not match what was asked for."""


@dataclass(frozen=True)
class DatasetInfo:
    """What the models need to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (channels, height, width)
    folder: str  # folder name under the data directory (or under SHIPPED_DIR)
    default_samples_per_class: int | None  # what a partition keeps per class unless told (None: all)
    shipped: bool = False


DatasetName = Literal["mnist", "fashion-mnist", "mnist-subset"]
# The reference's MNIST setting keeps 1,500 training images per class; the shipped subset has 1,000 of each.
DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), "mnist", 1500),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), "fashion-mnist", 1500),
    "mnist-subset": DatasetInfo("mnist-subset", 10, (1, 28, 28), "mnist-subset", 1000, shipped=True),
}
assert set(DATASETS) == set(get_args(DatasetName))


@dataclass
class Dataset:
    """Train and test images (uint8, N x C x H x W) with integer labels."""

    info: DatasetInfo
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed if the name ends in .gz) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    return parse_idx(raw, source=str(path))


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an (uncompressed) IDX file."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{source}: not an IDX file (bad magic)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{source}: unsupported IDX type 0x{type_code:02x} or rank {ndim}")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataError(f"{source}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataError(f"{source}: IDX body has {len(raw) - header_end} bytes, shape {shape} needs {expected}")
    # read-only, and a view of `raw` where the byte order is already native (uint8 images: no copy)
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="),
                                                                                  copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file, byte-reproducibly (gzip mtime 0, no file name)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
        f.write(header + array.tobytes())


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data directory: the explicit argument, else $FEDGEN_DATA_DIR, else None."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def dataset_folder(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Where the IDX files of dataset `name` are, with a clear error if they cannot be found."""
    info = dataset_info(name)
    if info.shipped:
        return SHIPPED_DIR / info.folder
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(
            f"dataset {name!r} needs a data directory: pass --data-dir DIR or set {DATA_DIR_ENV} "
            f"(or use the shipped 'mnist-subset'; 'fedgen data download {name} --data-dir DIR' fetches it)"
        )
    folder = root / info.folder
    missing = [f for f in IDX_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise DataError(f"dataset {name!r}: {folder} lacks {', '.join(missing)}")
    return folder


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load a dataset's train and test splits as uint8 images N x C x H x W and int64 labels."""
    info = dataset_info(name)
    folder = dataset_folder(name, data_dir)
    arrays = {key: read_idx(folder / fname) for key, fname in IDX_FILES.items()}
    c, h, w = info.image_shape
    splits = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or x.shape[1:] != (h, w) or len(x) != len(y):
            raise DataError(f"{folder}: {split} images {x.shape} / labels {y.shape} do not match {info}")
        if y.size and (y.min() < 0 or y.max() >= info.num_classes):
            raise DataError(f"{folder}: {split} labels outside 0..{info.num_classes - 1}")
        splits[split] = (x.reshape(len(x), c, h, w), y.astype(np.int64))
    return Dataset(info, *splits["train"], *splits["test"])


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 pixels 0..255 to float32 in [-1, 1] (the reference's Normalize((0.5,), (0.5,))), computed in place:
    one float32 array at the peak, not three (what a 512 MB device can afford)."""
    out = images.astype(np.float32)
    np.divide(out, np.float32(127.5), out=out)
    np.subtract(out, np.float32(1.0), out=out)
    return out


def make_subset(source: Dataset, out_dir: str | os.PathLike, train_per_class: int, test_per_class: int,
                seed: int = 0) -> Path:
    """Write a class-balanced random subset of `source` as gzip IDX files (byte-reproducible for a seed)."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        x, y = (source.train_x, source.train_y) if split == "train" else (source.test_x, source.test_y)
        chosen = np.sort(np.concatenate([
            rng.choice(np.flatnonzero(y == c), per_class, replace=False)
            for c in range(source.info.num_classes)
        ]))
        prefix = "train" if split == "train" else "t10k"
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", x[chosen].reshape(len(chosen), *x.shape[2:]))
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", y[chosen])
    return out
