"""A device's local data: its own files (`--data`) or one user of the paper's partition (`--partition`), as a
`shared.data.partition.UserData`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from shared.data.datasets import load_dataset, normalize
from shared.data.partition import PartitionError, PartitionSpec, UserData, partition_user

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm"}


def load_partition(spec: PartitionSpec, index: int, job_seed: int, data_dir: str | None) -> UserData:
    """User `index` of the partition `spec` (seed: the spec's, else the job's) of a dataset in `data_dir`."""
    if not 0 <= index < spec.users:
        raise PartitionError(f"partition index {index} outside 0..{spec.users - 1}")
    resolved = spec.resolve(seed=job_seed)
    return partition_user(load_dataset(resolved.dataset, data_dir), resolved, index)


def load_npz(path: str | Path, image_shape: tuple[int, int, int], num_classes: int, client_id: str,
             test_fraction: float = 0.1, seed: int = 0) -> UserData:
    """An .npz with `x` (N x H x W or N x C x H x W; uint8 0..255 or float in [-1, 1]) and `y` (N integer
    labels in 0..C-1), optionally `x_test`/`y_test`; without them a seeded `test_fraction` is held out."""
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz or "y" not in npz:
            raise ValueError(f"{path}: needs arrays 'x' and 'y'")
        x, y = _images(npz["x"], image_shape), _labels(npz["y"], num_classes)
        if len(x) != len(y):
            raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
        if "x_test" in npz and "y_test" in npz:
            return UserData(-1, x, y, _images(npz["x_test"], image_shape), _labels(npz["y_test"], num_classes),
                            num_classes, key=client_id)
    return _hold_out(x, y, test_fraction, seed, client_id, num_classes)


def load_image_folder(path: str | Path, image_shape: tuple[int, int, int], num_classes: int, client_id: str,
                      test_fraction: float = 0.1, seed: int = 0) -> UserData:
    """A folder with one sub-folder per class, named by the class number (`0/`, `1/`, ...), of image files."""
    from PIL import Image  # only this input needs Pillow

    c, h, w = image_shape
    images, labels = [], []
    for class_dir in sorted(Path(path).iterdir()):
        if not class_dir.is_dir():
            continue
        if not re.fullmatch(r"\d+", class_dir.name) or int(class_dir.name) >= num_classes:
            raise ValueError(f"{class_dir}: class folders must be named 0..{num_classes - 1}")
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                img = Image.open(file).convert("L" if c == 1 else "RGB").resize((w, h))
                images.append(np.asarray(img, dtype=np.uint8).reshape(h, w, c).transpose(2, 0, 1))
                labels.append(int(class_dir.name))
    if not images:
        raise ValueError(f"{path}: no images found in class folders")
    return _hold_out(normalize(np.stack(images)), np.asarray(labels, np.int64), test_fraction, seed, client_id,
                     num_classes)


def _images(x: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise ValueError(f"images have shape {x.shape[1:]}, the job's model needs {image_shape}")
    if x.dtype == np.uint8:
        return normalize(x)
    x = x.astype(np.float32)
    if not np.isfinite(x).all() or x.min() < -1.0001 or x.max() > 1.0001:
        raise ValueError("float images must be finite and in [-1, 1]")
    return x


def _labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be a 1-D integer array in 0..{num_classes - 1}")
    return y.astype(np.int64)


def _hold_out(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, key: str, num_classes: int) -> UserData:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * fraction)
    test, train = order[:n_test], order[n_test:]
    return UserData(-1, x[train], y[train], x[test], y[test], num_classes, key=key)
