"""Server side of a round, without the generator: client selection, aggregation and the label prior p(y)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import IO

import numpy as np
import torch

from shared.algorithm.config import derive_seed
from shared.algorithm.schedule import selection_rank


def select_clients(candidates: Sequence[str | int], active: int, run_seed: int, round_idx: int,
                   attempt: int = 0) -> list:
    """`active` clients drawn uniformly without replacement; the same seed, round and candidates give the same
    choice. Candidates are sorted first, so the order in which they became known does not matter."""
    pool = sorted(candidates, key=str)
    if active > len(pool):
        raise ValueError(f"cannot select {active} clients from {len(pool)} candidates")
    rng = np.random.default_rng(derive_seed(run_seed, "select", round_idx, attempt))
    chosen = rng.choice(len(pool), size=active, replace=False)
    return [pool[i] for i in sorted(chosen)]


def select_by_rank(candidates: Sequence[str], active: int, run_seed: int, round_idx: int,
                   attempt: int = 0) -> tuple[list[str], int]:
    """The `active` candidates of lowest `selection_rank` (sorted by id) and the highest rank among them: a
    device is selected exactly when its rank is at most that threshold, so a round of any size is announced
    in a few bytes. Seeded and order-free like `select_clients` (a uniform draw: the ranks are hashes)."""
    if active > len(candidates):
        raise ValueError(f"cannot select {active} clients from {len(candidates)} candidates")
    if active <= 0:
        return [], -1
    ranked = sorted((selection_rank(run_seed, round_idx, attempt, c), c) for c in candidates)[:active]
    return sorted(c for _, c in ranked), ranked[-1][0]


def capped_weights(weights: Sequence[float], max_share: float) -> list[float]:
    """`weights` rescaled so that none is more than `max_share` of their sum, the excess spread over the others
    in proportion to their weights ("water filling"); unchanged when none exceeds it. With fewer than
    ceil(1 / max_share) weights the cap cannot hold for all: they become equal."""
    if not 0 < max_share <= 1:
        raise ValueError("max_share must be in (0, 1]")
    w = [float(x) for x in weights]
    if not w or sum(w) <= 0 or max(w) <= max_share * sum(w):
        return w
    total = sum(w)
    if max_share * len(w) <= 1:
        return [total / len(w)] * len(w)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(w)) if i not in capped]
        budget = total * (1 - max_share * len(capped))
        free_sum = sum(weights[i] for i in free)
        out = [total * max_share if i in capped else budget * weights[i] / free_sum for i in range(len(w))]
        over = {i for i in free if out[i] > total * max_share * (1 + 1e-12)}
        if not over:
            return out
        capped |= over


class RunningWeightedMean:
    """Sample-weighted mean of state dicts, accumulated one update at a time.

    Memory stays one float64 copy of the shared entries whatever the number of clients; float64 accumulation
    also makes the result insensitive (to float32 precision) to the order in which updates arrive.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise ValueError("aggregation weight must be > 0")
        if self._sum and set(update) != set(self._sum):
            raise ValueError("update keys differ from earlier updates in this round")
        for name, tensor in update.items():
            if name in self._sum:
                self._sum[name].add_(tensor.detach(), alpha=weight)  # in place, float64: no temporaries
            else:
                self._sum[name] = tensor.detach().to(torch.float64) * weight
                self._dtypes[name] = tensor.dtype
        self.total_weight += weight
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if not self.count:
            raise ValueError("no updates to aggregate")
        return {k: (v / self.total_weight).to(self._dtypes[k]) for k, v in self._sum.items()}


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of a list of state dicts."""
    acc = RunningWeightedMean()
    for update, weight in zip(updates, weights):
        acc.add(update, weight)
    return acc.result()




def median_of_columns(x: torch.Tensor) -> torch.Tensor:
    """Median of each column of a (clients, coordinates) float64 matrix; for an even count, the mean of the
    two middle values."""
    return torch.quantile(x, 0.5, dim=0)


def trimmed_mean_of_columns(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of each column after dropping its `ratio` largest and smallest values."""
    if not 0 <= ratio < 0.5:
        raise ValueError("trim ratio must be in [0, 0.5)")
    cut = int(ratio * x.shape[0])
    return torch.sort(x, dim=0).values[cut:x.shape[0] - cut].mean(dim=0)


def _by_coordinate(updates: Sequence[Mapping[str, torch.Tensor]],
                   reduce: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    if not updates:
        raise ValueError("no updates to aggregate")
    return {k: reduce(torch.stack([u[k].double() for u in updates]).reshape(len(updates), -1))
            .reshape(updates[0][k].shape)
            .to(updates[0][k].dtype) for k in updates[0]}


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (as Flower's FedMedian; unweighted), of updates held in memory; a round's
    updates go through `SpilledUpdates` instead."""
    return _by_coordinate(updates, median_of_columns)


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], ratio: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the `ratio` largest and smallest values of each coordinate
    (as Flower's FedTrimmedAvg; unweighted), of updates held in memory."""
    return _by_coordinate(updates, lambda x: trimmed_mean_of_columns(x, ratio))


ROBUST_CHUNK_BYTES = 64 * 2**20  # float64 working set of one column chunk of the robust rules


class SpilledUpdates:
    """A round's updates for the robust rules, which need all of them: one row per update in an unnamed
    temporary file (deleted when closed or when the process ends), reduced column chunk by column chunk.

    Memory: while adding, one update; while reducing, a chunk of K x C values with C = ROBUST_CHUNK_BYTES /
    (8 K) coordinates (64 MiB of float64 whatever the number of clients K; with its float32 read and the sort
    or quantile's copies about 4 x that), plus the result (one model in float64). Disk: K x the model
    in float32 (float64 if a key is), in the directory `tempfile` picks (TMPDIR)."""

    def __init__(self, directory: str | None = None, chunk_bytes: int = ROBUST_CHUNK_BYTES):
        self._directory = directory
        self._chunk_bytes = chunk_bytes
        self._file: IO[bytes] | None = None
        self._layout: list[tuple[str, torch.Size, torch.dtype]] = []
        self._dtype = np.dtype(np.float32)
        self.count = 0

    @property
    def width(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self._layout)

    def add(self, update: Mapping[str, torch.Tensor]) -> None:
        if self._file is None:
            self._layout = [(k, v.shape, v.dtype) for k, v in update.items()]
            exact_in_float32 = all(d.is_floating_point and d != torch.float64 for _, _, d in self._layout)
            self._dtype = np.dtype(np.float32 if exact_in_float32 else np.float64)
            self._file = tempfile.TemporaryFile(dir=self._directory, buffering=0)
        elif len(update) != len(self._layout) or any(k not in update or update[k].shape != shape
                                                     for k, shape, _ in self._layout):
            raise ValueError("update keys or shapes differ from earlier updates in this round")
        row = np.concatenate([update[k].detach().cpu().reshape(-1).to(torch.float64).numpy()
                              for k, _, _ in self._layout])  # in the first update's key order
        data, offset = row.astype(self._dtype).tobytes(), self.count * self.width * self._dtype.itemsize
        try:  # at the row's own offset: a failed write (disk full) is overwritten by the next one
            if os.pwrite(self._file.fileno(), data, offset) != len(data):
                raise OSError(f"short write to the spilled updates (row {self.count})")
        except OSError:
            os.ftruncate(self._file.fileno(), offset)
            raise
        self.count += 1

    def reduce(self, columns: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """`columns` (a (K, C) float64 matrix -> its C per-coordinate results) applied chunk by chunk."""
        if not self.count:
            raise ValueError("no updates to aggregate")
        if self._file is None:
            raise ValueError("these spilled updates were closed")
        width = self.width
        step = max(1, self._chunk_bytes // (8 * self.count))
        out = np.empty(width, dtype=np.float64)
        for start in range(0, width, step):
            chunk = self._columns(start, min(width, start + step))
            out[start:start + step] = columns(torch.from_numpy(chunk.astype(np.float64))).numpy()
        result, offset = {}, 0
        for key, shape, dtype in self._layout:
            size = math.prod(shape)
            result[key] = torch.from_numpy(out[offset:offset + size].copy()).reshape(shape).to(dtype)
            offset += size
        return result

    def _columns(self, start: int, stop: int) -> np.ndarray:
        """Coordinates [start, stop) of every update, read row by row with pread: a memory map of the file
        would count each row's surrounding pages as resident (the kernel maps 64 KiB around a fault), about
        the whole file for rows this short."""
        assert self._file is not None
        item = self._dtype.itemsize
        block = np.empty((self.count, stop - start), dtype=self._dtype)
        rows = memoryview(block).cast("B")
        size, row_bytes = (stop - start) * item, self.width * item
        fd = self._file.fileno()
        for r in range(self.count):
            if os.preadv(fd, [rows[r * size:(r + 1) * size]], r * row_bytes + start * item) != size:
                raise OSError(f"short read from the spilled updates (row {r})")
        return block

    def close(self) -> None:
        """Delete the file; the object is empty again."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.count = 0
        self._layout = []


class LabelPrior:
    """p_hat(y): label counts accumulated over every accepted update, normalised on demand."""

    def __init__(self, num_classes: int, counts: np.ndarray | None = None):
        self.counts = np.zeros(num_classes, dtype=np.int64) if counts is None else np.asarray(counts, np.int64)

    def update(self, label_counts: np.ndarray) -> None:
        self.counts = self.counts + np.asarray(label_counts, dtype=np.int64)

    def probabilities(self) -> np.ndarray:
        total = self.counts.sum()
        if total == 0:
            return np.full(len(self.counts), 1.0 / len(self.counts))
        return self.counts / total


OUTLIER_FACTOR = 3.0  # a predictor this many times farther from the median than the median distance is left out


def outlying(vectors: Sequence[torch.Tensor]) -> list[bool]:
    """Which of the clients' flattened parameter vectors the robust modes leave out of what they teach the
    generator: non-finite ones, and those whose L2 distance to the coordinate-wise median exceeds
    OUTLIER_FACTOR times the median of those distances (a rule that needs no count of attackers)."""
    finite = [bool(torch.isfinite(v).all()) for v in vectors]
    kept = [v for v, ok in zip(vectors, finite) if ok]
    if len(kept) < 3:
        return [not ok for ok in finite]
    median = torch.stack(kept).median(dim=0).values
    distances = [float((v - median).norm()) if ok else math.inf for v, ok in zip(vectors, finite)]
    typical = float(np.median([d for d in distances if math.isfinite(d)]))
    if typical == 0:
        return [d > 0 for d in distances]
    return [d > OUTLIER_FACTOR * typical for d in distances]


def robust_label_counts(label_counts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each client's label counts rescaled to the round's median total (rounded): what the robust modes add
    to the label prior, so that one client's claimed total cannot outweigh the others'."""
    totals = [int(np.sum(c)) for c in label_counts]
    positive = [t for t in totals if t > 0]
    if not positive:
        return [np.asarray(c, np.int64) for c in label_counts]
    target = float(np.median(positive))
    return [np.rint(np.asarray(c, np.float64) * (target / t)).astype(np.int64) if t > 0 else np.asarray(c, np.int64)
            for c, t in zip(label_counts, totals)]
