"""The paper's Dirichlet partition of a dataset over users, determined entirely by a seed.

Protocol (the reference code's, see docs/algorithm.md):
1. From the training split keep `samples_per_class` images of each class (a seeded random choice).
2. For each class draw proportions ~ Dir(alpha * 1_users) and deal that class's images out accordingly;
   redraw the whole partition until every user holds at least `min_samples` images.
3. Each class's test images are cut into `users` disjoint chunks; user k receives chunk k of every class it
   has at least one training image of, so a user's test split is balanced over its own labels and the
   users' test splits are disjoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from shared.data import Dataset, normalize

MAX_DRAWS = 10_000


class PartitionError(ValueError):
    """The requested partition cannot be made."""


@dataclass(frozen=True)
class PartitionConfig:
    users: int = 20
    alpha: float = 0.1
    samples_per_class: int | None = 1500  # reference MNIST "ratio 0.5": 1,500 per class; None keeps all
    min_samples: int = 10
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class UserData:
    """One user's data: float32 images in [-1, 1] (N x C x H x W) and int64 labels."""

    user: int
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    @property
    def num_samples(self) -> int:
        return len(self.train_y)

    def label_counts(self) -> np.ndarray:
        """c_k: how many training images of each class this user holds (sums to num_samples)."""
        return np.bincount(self.train_y, minlength=self.num_classes).astype(np.int64)


def dirichlet_split(labels: np.ndarray, num_classes: int, cfg: PartitionConfig,
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


def partition(dataset: Dataset, cfg: PartitionConfig) -> list[UserData]:
    """Split `dataset` over `cfg.users` users; the same config (seed included) gives the same split."""
    rng = np.random.default_rng(cfg.seed)
    num_classes = dataset.info.num_classes
    train_idx = dirichlet_split(dataset.train_y, num_classes, cfg, rng)
    test_idx = split_test_sets(dataset.test_y, [dataset.train_y[i] for i in train_idx], num_classes, rng)
    return [
        UserData(
            user=k,
            train_x=normalize(dataset.train_x[tr]),
            train_y=dataset.train_y[tr],
            test_x=normalize(dataset.test_x[te]),
            test_y=dataset.test_y[te],
            num_classes=num_classes,
        )
        for k, (tr, te) in enumerate(zip(train_idx, test_idx))
    ]


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
