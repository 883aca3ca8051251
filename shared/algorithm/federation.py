"""The server's algorithm state across rounds, shared by the in-process simulation and the fleet server.

`GlobalState` holds the global model, FedGen's generator (with its optimizer) and the label prior p_hat(y).
A round is collected in a `RoundAccumulator` one client update at a time (a running weighted sum, plus each
client's theta^p and label counts for FedGen) and closed with `GlobalState.close_round`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from shared.algorithm.aggregate import (
    LabelPrior,
    RunningWeightedMean,
    SpilledUpdates,
    median_of_columns,
    outlying,
    robust_label_counts,
    trimmed_mean_of_columns,
)
from shared.algorithm.config import AGGREGATIONS, AlgorithmConfig, derive_seed
from shared.algorithm.distill import (
    GeneratorStats,
    StackedPredictors,
    make_generator,
    make_generator_optimizer,
    train_generator,
)
from shared.algorithm.models import (
    PREDICTOR_PREFIX,
    SplitClassifier,
    build_model,
    clone_state,
    is_predictor_key,
    shared_keys,
)
from shared.algorithm.schedule import LatentSampler


class RowBlocks:
    """Equal-shaped rows appended one at a time into blocks of `block` rows: a few large allocations rather
    than one small one per client, which glibc's heap could not give back between a burst's transient
    buffers (10,000 small per-client tensors held ~270 MB of freed memory; bench/results/robust_memory.md)."""

    def __init__(self, block: int = 4096):
        self.block = block
        self._blocks: list[np.ndarray] = []
        self.count = 0

    def check(self, row: np.ndarray) -> None:
        """Raise ValueError unless `row` can be appended."""
        if self._blocks and row.shape != self._blocks[0].shape[1:]:
            raise ValueError(f"row of shape {row.shape}, earlier rows {self._blocks[0].shape[1:]}")

    def append(self, row: np.ndarray) -> None:
        self.check(row)
        if self.count % self.block == 0:
            self._blocks.append(np.empty((self.block, *row.shape), dtype=row.dtype))
        self._blocks[-1][self.count % self.block] = row
        self.count += 1

    def take(self, rows: list[int]) -> np.ndarray:
        """The given rows, in that order, as one array (a copy)."""
        index = np.asarray(rows, dtype=np.int64)
        return np.concatenate(self._blocks)[index] if len(self._blocks) > 1 else self._blocks[0][index]


@dataclass
class RoundAccumulator:
    """Accepted updates of one round.

    `mean` (the default, sample-weighted) keeps only a running sum, so memory does not grow with the number
    of clients; the robust rules `median` and `trimmed_mean` need every update and keep them all, on disk
    (`SpilledUpdates`: memory bounded whatever the number of clients). FedGen's generator additionally needs
    each client's theta^p and label counts, kept here in blocks of rows (K x (|theta^p| + classes) numbers).
    Clients are identified so that the generator sees them in a fixed order (sorted by id) whatever the
    order of arrival.
    """

    mode: str = "mean"
    trim_ratio: float = 0.1
    aggregate: RunningWeightedMean = field(default_factory=RunningWeightedMean)
    uploads: SpilledUpdates = field(default_factory=SpilledUpdates)
    num_samples: int = 0
    _rows: dict[str, int] = field(default_factory=dict)  # client -> its row in the blocks below
    _predictors: RowBlocks = field(default_factory=RowBlocks)  # theta^p flattened, keys sorted
    _predictor_layout: list[tuple[str, torch.Size]] = field(default_factory=list)
    _label_counts: RowBlocks = field(default_factory=RowBlocks)

    def __post_init__(self) -> None:
        if self.mode not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.mode!r}; known: {', '.join(AGGREGATIONS)}")

    def add(self, upload: Mapping[str, torch.Tensor | np.ndarray], num_samples: int, label_counts: np.ndarray,
            client: str | int | None = None, weight: float | None = None) -> None:
        """One client's update; its weight in the mean is its sample count unless `weight` says otherwise."""
        key = str(client) if client is not None else f"#{self.count:06d}"
        if key in self._rows:
            raise ValueError(f"client {key} already contributed to this round")
        upload = {k: torch.as_tensor(v) for k, v in upload.items()}
        predictor = sorted((k, v) for k, v in upload.items() if is_predictor_key(k))
        layout = [(k, v.shape) for k, v in predictor]
        if self._rows and layout != self._predictor_layout:
            raise ValueError("theta^p keys or shapes differ from earlier updates in this round")
        theta_p = (np.concatenate([v.detach().cpu().reshape(-1).float().numpy() for _, v in predictor])
                   if predictor else np.zeros(0, dtype=np.float32))
        counts = np.asarray(label_counts, dtype=np.int64)
        self._label_counts.check(counts)  # everything that can refuse the update before anything is kept
        if self.mode == "mean":
            self.aggregate.add(upload, float(num_samples if weight is None else weight))
        else:
            self.uploads.add(upload)
        self._predictor_layout = layout
        self._predictors.append(theta_p)
        self._label_counts.append(counts)
        self._rows[key] = len(self._rows)
        self.num_samples += int(num_samples)

    @property
    def count(self) -> int:
        return len(self._rows)

    @property
    def clients(self) -> list[str]:
        """The clients of the round, sorted by id (the order the generator sees them in)."""
        return sorted(self._rows)

    def label_counts(self, clients: list[str]) -> np.ndarray:
        """clients x classes, in the given order."""
        return self._label_counts.take([self._rows[c] for c in clients])

    def predictor_vectors(self, clients: list[str]) -> torch.Tensor:
        """clients x |theta^p|: each client's theta^p flattened, keys sorted."""
        return torch.from_numpy(self._predictors.take([self._rows[c] for c in clients]))

    def stacked_predictors(self, clients: list[str]) -> dict[str, torch.Tensor]:
        """Each theta^p parameter (the 'predictor.' prefix removed) with the clients along dim 0, as
        `train_generator` takes them."""
        vectors, out, offset = self.predictor_vectors(clients), {}, 0
        for key, shape in self._predictor_layout:
            size = shape.numel()
            out[key[len(PREDICTOR_PREFIX):]] = vectors[:, offset:offset + size].reshape(len(clients), *shape)
            offset += size
        return out

    @property
    def robust(self) -> bool:
        return self.mode != "mean"

    def result(self) -> dict[str, torch.Tensor]:
        if self.mode == "mean":
            return self.aggregate.result()
        if self.mode == "median":
            return self.uploads.reduce(median_of_columns)
        return self.uploads.reduce(lambda x: trimmed_mean_of_columns(x, self.trim_ratio))

    def close(self) -> None:
        """Let go of the spilled updates (also done when the accumulator is garbage-collected)."""
        self.uploads.close()


class GlobalState:
    """Global model, generator and label prior; advanced one round at a time by close_round."""

    def __init__(self, cfg: AlgorithmConfig, image_shape: tuple[int, int, int], num_classes: int, seed: int):
        self.cfg = cfg
        self.num_classes = num_classes
        self.models: dict[str, SplitClassifier] = {
            name: build_model(name, image_shape, num_classes, torch.Generator().manual_seed(
                derive_seed(seed, "model-init") if name == cfg.model else derive_seed(seed, "model-init", name)))
            for name in cfg.allowed_models}
        self.model: SplitClassifier = self.models[cfg.model]
        self.state = clone_state(self.model.state_dict())  # cfg.model's; theta^p is every model's
        self.initial_predictor = {k: v.clone() for k, v in self.state.items() if is_predictor_key(k)}
        # the other models' initial theta^f (partial sharing: they never change on the server)
        self.initial_features = {name: {k: v for k, v in clone_state(m.state_dict()).items()
                                        if not is_predictor_key(k)}
                                 for name, m in self.models.items() if name != cfg.model}
        self.prior = LabelPrior(num_classes)
        self.generator = None
        self.generator_optimizer = None
        self.generator_trained = False
        self.generator_rng = torch.Generator().manual_seed(derive_seed(seed, "generator-train"))
        if cfg.uses_generator:
            self.generator = make_generator(num_classes, self.model.latent_dim, cfg, derive_seed(seed, "gen-init"))
            self.generator.eval()
            self.generator_optimizer = make_generator_optimizer(self.generator, cfg)

    @property
    def shared_keys(self) -> list[str]:
        return shared_keys(self.state, self.cfg.partial)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """What a client downloads of the model: all float entries, or theta^p only in partial mode."""
        return {k: self.state[k] for k in self.shared_keys}

    def model_state(self, name: str) -> dict[str, torch.Tensor]:
        """The global state as a device running model `name` starts from: `state` for the job's default model;
        for another, its initial theta^f with the global theta^p."""
        if name == self.cfg.model:
            return self.state
        if name not in self.initial_features:
            raise ValueError(f"model {name!r} is not one of this job's models {list(self.cfg.allowed_models)}")
        return {**self.initial_features[name], **{k: v for k, v in self.state.items() if is_predictor_key(k)}}

    def close_round(self, acc: RoundAccumulator, round_idx: int) -> GeneratorStats | None:
        """Replace the shared entries by the aggregate, update p_hat(y), and (FedGen) train the generator.

        With a robust aggregation the generator and the prior are protected too (docs/algorithm.md, "Robust
        aggregation"): the prior takes each client's counts rescaled to the round's median total, the teacher
        weights come from label proportions, and outlying predictors teach nothing."""
        self.state.update(acc.result())
        clients = acc.clients
        counts = acc.label_counts(clients)
        for row in robust_label_counts(list(counts)) if acc.robust else counts:
            self.prior.update(row)
        if self.generator is None:
            return None
        if acc.robust:
            clients = [c for c, out in zip(clients, outlying(list(acc.predictor_vectors(clients)))) if not out]
            if not clients:
                return None
        before = (clone_state(self.generator.state_dict()), copy.deepcopy(self.generator_optimizer.state_dict()))
        stats = train_generator(self.generator, self.generator_optimizer, self.model.predictor,
                                StackedPredictors(acc.stacked_predictors(clients)), acc.label_counts(clients),
                                self.cfg, round_idx, self.generator_rng, proportions=acc.robust)
        if not all(torch.isfinite(v).all() for v in self.generator.state_dict().values() if v.is_floating_point()):
            # e.g. predictors driven to extreme values: keep the last good generator rather than a broken one
            self.generator.load_state_dict(before[0])
            self.generator_optimizer.load_state_dict(before[1])
            return GeneratorStats(float("nan"), float("nan"), float("nan"))
        self.generator_trained = True
        return stats

    def sampler(self) -> LatentSampler | None:
        """The generator as a client uses it (eval mode, no gradient, numpy in and out), or None before it was
        first trained."""
        if self.generator is None or not self.generator_trained:
            return None
        generator = self.generator

        def sample(noise: np.ndarray, labels: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return generator(torch.from_numpy(noise), torch.from_numpy(labels)).numpy()

        return sample


def model_of_user(cfg: AlgorithmConfig, user: int) -> str:
    """The model simulated user `user` runs: the job's models assigned round-robin (user 0 the first)."""
    models = cfg.allowed_models
    return models[user % len(models)]


def client_start_state(global_state: Mapping[str, torch.Tensor], own_state: Mapping[str, torch.Tensor] | None,
                       partial: bool) -> dict[str, torch.Tensor]:
    """The state a client trains from: the global model, or in partial mode its own theta^f (kept on the
    device since it last trained; the global initial one before that) with the global theta^p."""
    if not partial or own_state is None:
        return dict(global_state)
    return {k: (global_state[k] if is_predictor_key(k) else own_state[k]) for k in global_state}
