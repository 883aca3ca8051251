"""A device's local data: its own files (`--data`) or one user of the paper's partition (`--partition`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.data import dataset_info, load_dataset, normalize
from shared.partition import PartitionConfig, partition

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".pgm"}


@dataclass
class LocalData:
    """float32 images in [-1, 1] (N x C x H x W), int64 labels, and a held-out test split."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    seed_key: str  # what the local training seed is derived from (the partition index, else the client id)


@dataclass(frozen=True)
class PartitionSpec:
    """`mnist:alpha=0.1:users=20:index=3[:seed=S][:spc=N|all][:min=M]` (index may be `auto`)."""

    dataset: str
    alpha: float
    users: int
    index: int | None  # None: ask the server (index=auto)
    seed: int | None = None  # None: the job's seed
    samples_per_class: int | None = 1500
    min_samples: int = 10

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        dataset, *options = text.split(":")
        values = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in {"alpha", "users", "index", "seed", "spc", "min"}:
                raise ValueError(f"--partition option {option!r}: expected alpha=, users=, index=, seed=, spc=, min=")
            values[key] = value
        dataset_info(dataset)
        if "alpha" not in values or "users" not in values or "index" not in values:
            raise ValueError("--partition needs alpha=, users= and index= (a number or auto)")
        spec = cls(dataset=dataset, alpha=float(values["alpha"]), users=int(values["users"]),
                   index=None if values["index"] == "auto" else int(values["index"]),
                   seed=int(values["seed"]) if "seed" in values else None,
                   samples_per_class=None if values.get("spc") == "all" else int(values.get("spc", 1500)),
                   min_samples=int(values.get("min", 10)))
        if spec.index is not None and not 0 <= spec.index < spec.users:
            raise ValueError(f"partition index {spec.index} outside 0..{spec.users - 1}")
        return spec

    def without_index(self) -> str:
        """The spec as the server sees it when assigning indices (everything but the index)."""
        spc = "all" if self.samples_per_class is None else self.samples_per_class
        seed = "" if self.seed is None else f":seed={self.seed}"
        return f"{self.dataset}:alpha={self.alpha:g}:users={self.users}:spc={spc}:min={self.min_samples}{seed}"

    def load(self, index: int, job_seed: int, data_dir: str | None) -> LocalData:
        cfg = PartitionConfig(users=self.users, alpha=self.alpha, samples_per_class=self.samples_per_class,
                              min_samples=self.min_samples, seed=self.seed if self.seed is not None else job_seed)
        user = partition(load_dataset(self.dataset, data_dir), cfg)[index]
        return LocalData(user.train_x, user.train_y, user.test_x, user.test_y, seed_key=str(index))


def load_npz(path: str | Path, image_shape: tuple[int, int, int], num_classes: int, client_id: str,
             test_fraction: float = 0.1, seed: int = 0) -> LocalData:
    """An .npz with `x` (N x H x W or N x C x H x W; uint8 0..255 or float in [-1, 1]) and `y` (N integer
    labels in 0..C-1), optionally `x_test`/`y_test`; without them a seeded `test_fraction` is held out."""
    with np.load(path, allow_pickle=False) as npz:
        if "x" not in npz or "y" not in npz:
            raise ValueError(f"{path}: needs arrays 'x' and 'y'")
        x, y = _images(npz["x"], image_shape), _labels(npz["y"], num_classes)
        if len(x) != len(y):
            raise ValueError(f"{path}: {len(x)} images but {len(y)} labels")
        if "x_test" in npz and "y_test" in npz:
            return LocalData(x, y, _images(npz["x_test"], image_shape), _labels(npz["y_test"], num_classes),
                             client_id)
    return _hold_out(x, y, test_fraction, seed, client_id)


def load_image_folder(path: str | Path, image_shape: tuple[int, int, int], num_classes: int, client_id: str,
                      test_fraction: float = 0.1, seed: int = 0) -> LocalData:
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
    return _hold_out(normalize(np.stack(images)), np.asarray(labels, np.int64), test_fraction, seed, client_id)


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


def _hold_out(x: np.ndarray, y: np.ndarray, fraction: float, seed: int, key: str) -> LocalData:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * fraction)
    test, train = order[:n_test], order[n_test:]
    return LocalData(x[train], y[train], x[test], y[test], seed_key=key)
