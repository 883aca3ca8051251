"""Server side of a round, without the generator: client selection, aggregation and the label prior p(y)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from shared.config import derive_seed


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
            contribution = tensor.detach().to(torch.float64) * weight
            if name in self._sum:
                self._sum[name] += contribution
            else:
                self._sum[name] = contribution
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


AGGREGATIONS = ("mean", "median", "trimmed_mean")


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median (as Flower's FedMedian; unweighted). For an even count, the mean of the two
    middle values."""
    if not updates:
        raise ValueError("no updates to aggregate")
    return {k: torch.quantile(torch.stack([u[k].double() for u in updates]), 0.5, dim=0).to(updates[0][k].dtype)
            for k in updates[0]}


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], ratio: float) -> dict[str, torch.Tensor]:
    """Coordinate-wise mean after dropping the `ratio` largest and smallest values of each coordinate
    (as Flower's FedTrimmedAvg; unweighted)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    if not 0 <= ratio < 0.5:
        raise ValueError("trim ratio must be in [0, 0.5)")
    cut = int(ratio * len(updates))
    out = {}
    for k in updates[0]:
        ordered = torch.sort(torch.stack([u[k].double() for u in updates]), dim=0).values
        out[k] = ordered[cut:len(updates) - cut].mean(dim=0).to(updates[0][k].dtype)
    return out


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
