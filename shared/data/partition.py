"""The paper's Dirichlet partition of a dataset over users, determined entirely by a seed.

Protocol (the reference code's, see docs/algorithm.md):
1. From the training split keep `samples_per_class` images of each class (a seeded random choice).
2. For each class draw proportions ~ Dir(alpha * 1_users) and deal that class's images out accordingly;
   redraw the whole partition until every user holds at least `min_samples` images.
3. Each class's test images are cut into `users` disjoint chunks; user k receives chunk k of every class it
   has at least one training image of, so a user's test split is balanced over its own labels and the
   users' test splits are disjoint.
4. Optionally (`validation` > 0, not the reference's) each user's validation split: a seeded random
   `validation` fraction of its own training images, held out of its training data. Choices of defaults and
   hyper-parameters are made on it, never on the test split (docs/algorithm.md). It is drawn from its own
   random stream, so steps 1-3 give the same split with or without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np

from shared.data.datasets import Dataset, DatasetName, dataset_info, normalize

MAX_DRAWS = 10_000


class PartitionError(ValueError):
    """The requested partition cannot be made."""


class PartitionSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One description of a partition, used by the simulation, the fleet, the server (server-side evaluation,
    partition assignment) and the device (``--partition``); in text form ``DATASET:alpha=A:users=U[:spc=N|all]
    [:min=M][:seed=S]`` (see `parse_partition` / `format_partition`).

    ``dataset`` None: the dataset it is applied to (a job's dataset). ``seed`` None: the job's seed (0 outside a
    job). ``samples_per_class`` unset: the dataset's default (the reference's 1,500 for MNIST; all 1,000 of the
    shipped subset), None: every image.
    """

    dataset: DatasetName | None = None
    alpha: Annotated[float, msgspec.Meta(gt=0, le=1e4)] = 0.1
    users: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 20
    samples_per_class: Annotated[int, msgspec.Meta(ge=1, le=10**7)] | None | msgspec.UnsetType = msgspec.UNSET
    min_samples: Annotated[int, msgspec.Meta(ge=0, le=10**6)] = 10
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    # fraction of each user's training images held out as its validation split; unset (none) is left out of the
    # encoded spec, so specs without one encode as before it existed
    validation: Annotated[float, msgspec.Meta(ge=0, le=0.5)] | msgspec.UnsetType = msgspec.UNSET

    def resolve(self, dataset: str | None = None, seed: int | None = None) -> PartitionSpec:
        """The spec with dataset, seed and samples per class filled in (explicit values win)."""
        name = self.dataset or dataset
        if name is None:
            raise PartitionError("the partition names no dataset")
        spc = self.samples_per_class
        if spc is msgspec.UNSET:
            spc = dataset_info(name).default_samples_per_class
        return msgspec.structs.replace(self, dataset=name, samples_per_class=spc,
                                       seed=self.seed if self.seed is not None else (seed or 0))


_TEXT_KEYS = {"alpha", "users", "index", "seed", "spc", "min", "val"}


def parse_partition(text: str) -> tuple[PartitionSpec, int | None]:
    """``DATASET:alpha=A:users=U:index=I|auto[:seed=S][:spc=N|all][:min=M][:val=F]`` -> (spec, index or None
    for auto).
    ValueError says what is wrong."""
    dataset, *options = text.split(":")
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in _TEXT_KEYS:
            raise ValueError(f"--partition option {option!r}: expected alpha=, users=, index=, seed=, spc=, min=, "
                             "val=")
        values[key] = value
    dataset_info(dataset)
    if "alpha" not in values or "users" not in values or "index" not in values:
        raise ValueError("--partition needs alpha=, users= and index= (a number or auto)")
    fields: dict[str, object] = {"dataset": dataset, "alpha": _number(values, "alpha", float),
                                 "users": _number(values, "users", int)}
    if "seed" in values:
        fields["seed"] = _number(values, "seed", int)
    if "spc" in values:
        fields["samples_per_class"] = None if values["spc"] == "all" else _number(values, "spc", int)
    if "min" in values:
        fields["min_samples"] = _number(values, "min", int)
    if "val" in values:
        fields["validation"] = _number(values, "val", float)
    try:
        spec = msgspec.convert(fields, PartitionSpec)
    except msgspec.ValidationError as exc:
        raise ValueError(f"--partition {text!r}: {exc}") from None
    index = None if values["index"] == "auto" else _number(values, "index", int)
    if index is not None and not 0 <= index < spec.users:
        raise ValueError(f"partition index {index} outside 0..{spec.users - 1}")
    return spec, index


def _number(values: dict[str, str], key: str, kind: type) -> int | float:
    try:
        return kind(values[key])
    except ValueError:
        raise ValueError(f"--partition {key}={values[key]!r} is not a number") from None


def format_partition(spec: PartitionSpec, index: int | str | None = None) -> str:
    """The text form of `spec` (with ``index=`` when given: a number or ``auto``)."""
    parts = [spec.dataset or "", f"alpha={spec.alpha:g}", f"users={spec.users}"]
    if index is not None:
        parts.append(f"index={index}")
    if spec.samples_per_class is not msgspec.UNSET:
        parts.append(f"spc={'all' if spec.samples_per_class is None else spec.samples_per_class}")
    parts.append(f"min={spec.min_samples}")
    if spec.seed is not None:
        parts.append(f"seed={spec.seed}")
    if spec.validation is not msgspec.UNSET:
        parts.append(f"val={spec.validation:g}")
    return ":".join(parts)


@dataclass
class UserData:
    """One user's data: float32 images in [-1, 1] (N x C x H x W) and int64 labels."""

    user: int
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    key: str | None = None  # what local training seeds derive from; default the user index (a device: its id)
    val_x: np.ndarray | None = None  # the validation split (PartitionSpec.validation), None without one
    val_y: np.ndarray | None = None

    @property
    def seed_key(self) -> str:
        return self.key if self.key is not None else str(self.user)

    @property
    def num_samples(self) -> int:
        return len(self.train_y)

    def label_counts(self) -> np.ndarray:
        """c_k: how many training images of each class this user holds (sums to num_samples)."""
        return np.bincount(self.train_y, minlength=self.num_classes).astype(np.int64)


def dirichlet_split(labels: np.ndarray, num_classes: int, cfg: PartitionSpec,
                    rng: np.random.Generator) -> list[np.ndarray]:
    """Indices into `labels` for each user, following the Dirichlet protocol above."""
    if cfg.users < 1 or cfg.alpha <= 0 or cfg.min_samples < 0:
        raise PartitionError(f"invalid partition config {cfg}")
    pools = []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if cfg.samples_per_class is not None:
            if len(idx) < cfg.samples_per_class:
                raise PartitionError(f"class {c} has {len(idx)} images, fewer than samples_per_class="
                                     f"{cfg.samples_per_class}")
            idx = idx[: cfg.samples_per_class]
        pools.append(idx)
    if sum(len(p) for p in pools) < cfg.users * cfg.min_samples:
        raise PartitionError(f"{sum(len(p) for p in pools)} images cannot give {cfg.users} users "
                             f"{cfg.min_samples} each")
    for _ in range(MAX_DRAWS):
        shares: list[list[np.ndarray]] = [[] for _ in range(cfg.users)]
        for pool in pools:
            proportions = rng.dirichlet(np.full(cfg.users, cfg.alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(pool)).astype(int)
            for user, part in enumerate(np.split(pool, cuts)):
                shares[user].append(part)
        users = [np.sort(np.concatenate(parts)) for parts in shares]
        if min(len(u) for u in users) >= cfg.min_samples:
            return users
    raise PartitionError(f"no partition with min_samples={cfg.min_samples} in {MAX_DRAWS} draws; "
                         "raise alpha or lower min_samples")


def split_test_sets(labels: np.ndarray, train_labels_per_user: list[np.ndarray], num_classes: int,
               rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint per-user test indices, balanced over each user's own training labels."""
    users = len(train_labels_per_user)
    chunks = []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        size = len(idx) // users
        chunks.append([idx[k * size:(k + 1) * size] for k in range(users)])
    out = []
    for k, user_labels in enumerate(train_labels_per_user):
        present = np.unique(user_labels)
        parts = [chunks[c][k] for c in present]
        out.append(np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64))
    return out


def check_partition(train_labels: np.ndarray, test_labels: np.ndarray, num_classes: int,
                    spec: PartitionSpec) -> None:
    """PartitionError if `spec` cannot be drawn from these labels (the images are not needed)."""
    cfg = spec.resolve()
    rng = np.random.default_rng(cfg.seed)
    train_idx = dirichlet_split(train_labels, num_classes, cfg, rng)
    split_test_sets(test_labels, [train_labels[i] for i in train_idx], num_classes, rng)


def partition(dataset: Dataset, spec: PartitionSpec) -> list[UserData]:
    """Split `dataset` over `spec.users` users; the same spec (seed included) gives the same split."""
    train_idx, test_idx, val_idx = partition_indices(dataset, spec)
    return [_user(dataset, k, tr, te, va) for k, (tr, te, va) in enumerate(zip(train_idx, test_idx, val_idx))]


def partition_user(dataset: Dataset, spec: PartitionSpec, index: int) -> UserData:
    """User `index` of `partition(dataset, spec)`, without turning the other users' images into floats (what
    a device needs: a fraction of the memory)."""
    train_idx, test_idx, val_idx = partition_indices(dataset, spec)
    if not 0 <= index < len(train_idx):
        raise PartitionError(f"partition index {index} outside 0..{len(train_idx) - 1}")
    return _user(dataset, index, train_idx[index], test_idx[index], val_idx[index])


def partition_indices(dataset: Dataset, spec: PartitionSpec
                      ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]:
    """(train indices, test indices, validation indices or None) of every user; validation indices are into
    the training split, taken out of the user's training indices."""
    if spec.dataset is not None and spec.dataset != dataset.info.name:
        raise PartitionError(f"the partition is of {spec.dataset!r}, not {dataset.info.name!r}")
    cfg = spec.resolve(dataset.info.name)
    rng = np.random.default_rng(cfg.seed)
    num_classes = dataset.info.num_classes
    train_idx = dirichlet_split(dataset.train_y, num_classes, cfg, rng)
    test_idx = split_test_sets(dataset.test_y, [dataset.train_y[i] for i in train_idx], num_classes, rng)
    fraction = 0.0 if cfg.validation is msgspec.UNSET else cfg.validation
    if not 0 <= fraction <= 0.5:
        raise PartitionError(f"validation fraction {fraction} outside 0..0.5")
    if not fraction:
        return train_idx, test_idx, [None] * len(train_idx)
    splits = [hold_out_validation(idx, fraction, cfg.seed, k) for k, idx in enumerate(train_idx)]
    return [tr for tr, _ in splits], test_idx, [va for _, va in splits]


VALIDATION_STREAM = 0x5A11D  # the validation split's random stream, apart from the partition's


def hold_out_validation(train_idx: np.ndarray, fraction: float, seed: int, user: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) indices: a seeded random `fraction` of one user's training indices (rounded
    down), drawn from a stream of its own per (seed, user); at least one image stays for training (so a user
    may train on fewer than the partition's `min_samples`, and one of under 1/fraction images validates on none)."""
    rng = np.random.default_rng([seed, VALIDATION_STREAM, user])
    order = rng.permutation(len(train_idx))
    n_val = min(int(len(train_idx) * fraction), max(0, len(train_idx) - 1))
    return np.sort(train_idx[order[n_val:]]), np.sort(train_idx[order[:n_val]])


def _user(dataset: Dataset, k: int, tr: np.ndarray, te: np.ndarray, va: np.ndarray | None = None) -> UserData:
    user = UserData(user=k, train_x=normalize(dataset.train_x[tr]), train_y=dataset.train_y[tr],
                    test_x=normalize(dataset.test_x[te]), test_y=dataset.test_y[te],
                    num_classes=dataset.info.num_classes)
    if va is not None:
        user.val_x, user.val_y = normalize(dataset.train_x[va]), dataset.train_y[va]
    return user


def label_histogram(users: list[UserData]) -> np.ndarray:
    """users x classes matrix of training-label counts."""
    return np.stack([u.label_counts() for u in users])


def format_histogram(hist: np.ndarray) -> str:
    """A plain-text table: one row per user, one column per class, with totals."""
    classes = hist.shape[1]
    width = max(5, len(str(hist.max())) + 1)
    head = "user " + "".join(f"{c:>{width}}" for c in range(classes)) + f"{'total':>{width + 2}}"
    rows = [f"{k:>4} " + "".join(f"{v:>{width}}" for v in row) + f"{row.sum():>{width + 2}}"
            for k, row in enumerate(hist)]
    return "\n".join([head, *rows])


def plot_histogram(hist: np.ndarray, path: str, title: str = "") -> None:
    """A scatter plot like the paper's Figure 4: x = user, y = class, marker area ~ sample count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users, classes = np.nonzero(hist)
    sizes = hist[users, classes]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * hist.shape[0]), 0.35 * hist.shape[1] + 1.2))
    ax.scatter(users, classes, s=600 * sizes / max(1, hist.max()), color="tab:red", alpha=0.7)
    ax.set_xticks(range(hist.shape[0]))
    ax.set_yticks(range(hist.shape[1]))
    ax.set_xlabel("user")
    ax.set_ylabel("class")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
