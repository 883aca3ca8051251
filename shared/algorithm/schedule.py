"""The random draws of one local update, in numpy (no torch), so that every runtime reproduces them exactly:
the seed of a client's round, the mini-batch schedule, the generator's noise and labels, the label prior.

Order (one numpy Generator seeded with `round_seed`): the whole batch schedule first (`batch_schedule`), then
per step, when the generator is used, the noise for the batch's labels, the labels y_hat ~ p_hat(y), the noise
for y_hat (`generator_draws`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from shared.algorithm.config import AlgorithmConfig, derive_seed

# (noise float32 [N, noise_dim], labels int64 [N]) -> latent z float32 [N, latent], numpy in and out, so that a
# runtime without torch can use it too. The simulation passes the torch generator, the edge client onnxruntime.
LatentSampler = Callable[[np.ndarray, np.ndarray], np.ndarray]


def round_seed(run_seed: int, round_idx: int, client: int | str) -> int:
    """The seed of one client's local training in one round: the same in the simulation and the fleet."""
    return derive_seed(run_seed, "local", round_idx, str(client))


def selection_rank(run_seed: int, round_idx: int, attempt: int, client: str) -> int:
    """A client's place (63 bits) in the rank order of one round attempt. A round of more clients than an
    announcement lists selects the online clients of lowest rank, and a device knows from the announced
    threshold alone whether it is one of them (`shared.protocol.messages.RoundAnnouncement.selects`)."""
    return derive_seed(run_seed, "select-rank", round_idx, attempt, str(client))


def batch_schedule(num_samples: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` mini-batches of min(batch_size, num_samples) indices from back-to-back shuffled passes."""
    size = min(batch_size, num_samples)
    passes = math.ceil(steps * size / num_samples)
    order = np.concatenate([rng.permutation(num_samples) for _ in range(passes)])
    return [order[i * size:(i + 1) * size] for i in range(steps)]


def generator_draws(sampler: LatentSampler, labels: np.ndarray, prior: np.ndarray, cfg: AlgorithmConfig,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step's samples of the generator: (G(eps, y) for the batch's labels y, y_hat ~ prior, G(eps', y_hat)),
    noise eps ~ Uniform[0, 1) (the reference's choice), drawn from `rng` in that order."""
    z_y = sampler(draw_noise(rng, len(labels), cfg.noise_dim), labels.astype(np.int64))
    y_hat = rng.choice(len(prior), size=cfg.gen_batch_size, p=prior).astype(np.int64)
    z_hat = sampler(draw_noise(rng, cfg.gen_batch_size, cfg.noise_dim), y_hat)
    return z_y, y_hat, z_hat


def draw_noise(rng: np.random.Generator, n: int, noise_dim: int) -> np.ndarray:
    """Generator input noise eps ~ Uniform[0, 1), float32 [n, noise_dim]."""
    return rng.random((n, noise_dim), dtype=np.float32)


def normalise_prior(prior: np.ndarray | None, num_classes: int) -> np.ndarray:
    """p_hat(y) as float64 probabilities summing to 1 (uniform when absent or all zero)."""
    if prior is None or np.sum(prior) <= 0:
        return np.full(num_classes, 1.0 / num_classes)
    prior = np.asarray(prior, dtype=np.float64)
    return prior / prior.sum()
