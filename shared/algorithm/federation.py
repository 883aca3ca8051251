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
    coordinate_median,
    outlying,
    robust_label_counts,
    trimmed_mean,
)
from shared.algorithm.config import AGGREGATIONS, AlgorithmConfig, derive_seed
from shared.algorithm.distill import GeneratorStats, make_generator, make_generator_optimizer, train_generator
from shared.algorithm.models import SplitClassifier, build_model, clone_state, is_predictor_key, shared_keys
from shared.algorithm.schedule import LatentSampler


@dataclass
class RoundAccumulator:
    """Accepted updates of one round.

    `mean` (the default, sample-weighted) keeps only a running sum, so memory does not grow with the number
    of clients; the robust rules `median` and `trimmed_mean` need every update and keep them all. FedGen's
    generator additionally needs each client's theta^p and label counts, kept here (small).
    Clients are identified so that the generator sees them in a fixed order (sorted by id) whatever the
    order of arrival.
    """

    mode: str = "mean"
    trim_ratio: float = 0.1
    aggregate: RunningWeightedMean = field(default_factory=RunningWeightedMean)
    uploads: list[dict[str, torch.Tensor]] = field(default_factory=list)
    predictors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    label_counts: dict[str, np.ndarray] = field(default_factory=dict)
    num_samples: int = 0

    def __post_init__(self) -> None:
        if self.mode not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.mode!r}; known: {', '.join(AGGREGATIONS)}")

    def add(self, upload: Mapping[str, torch.Tensor | np.ndarray], num_samples: int, label_counts: np.ndarray,
            client: str | int | None = None, weight: float | None = None) -> None:
        """One client's update; its weight in the mean is its sample count unless `weight` says otherwise."""
        key = str(client) if client is not None else f"#{self.count:06d}"
        if key in self.predictors:
            raise ValueError(f"client {key} already contributed to this round")
        upload = {k: torch.as_tensor(v) for k, v in upload.items()}
        if self.mode == "mean":
            self.aggregate.add(upload, float(num_samples if weight is None else weight))
        else:
            self.uploads.append({k: v.detach().clone() for k, v in upload.items()})
        self.predictors[key] = {k: v.detach().clone() for k, v in upload.items() if is_predictor_key(k)}
        self.label_counts[key] = np.asarray(label_counts, dtype=np.int64)
        self.num_samples += int(num_samples)

    @property
    def count(self) -> int:
        return len(self.predictors)

    @property
    def robust(self) -> bool:
        return self.mode != "mean"

    def result(self) -> dict[str, torch.Tensor]:
        if self.mode == "mean":
            return self.aggregate.result()
        if self.mode == "median":
            return coordinate_median(self.uploads)
        return trimmed_mean(self.uploads, self.trim_ratio)


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
        clients = sorted(acc.predictors)
        counts = [acc.label_counts[c] for c in clients]
        for row in robust_label_counts(counts) if acc.robust else counts:
            self.prior.update(row)
        if self.generator is None:
            return None
        if acc.robust:
            flat = [torch.cat([v.flatten().float() for _, v in sorted(acc.predictors[c].items())]) for c in clients]
            clients = [c for c, out in zip(clients, outlying(flat)) if not out]
            if not clients:
                return None
        before = (clone_state(self.generator.state_dict()), copy.deepcopy(self.generator_optimizer.state_dict()))
        stats = train_generator(self.generator, self.generator_optimizer, self.model.predictor,
                                [acc.predictors[c] for c in clients],
                                np.stack([acc.label_counts[c] for c in clients]), self.cfg, round_idx,
                                self.generator_rng, proportions=acc.robust)
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
