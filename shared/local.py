"""Client side of a round: local training (Eq. 5, FedAvg, FedProx) and evaluation.

Pure functions over a model, state dicts and arrays; they know nothing of transport. The in-process
simulation and the edge client call exactly these.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.config import AlgorithmConfig, derive_seed
from shared.models import SplitClassifier, sample_noise, shared_keys

# (noise, labels) -> latent z. The simulation passes the torch generator, the edge client an onnxruntime session.
LatentSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LocalResult:
    state: dict[str, torch.Tensor]  # the whole trained state (the device keeps theta^f from it in partial mode)
    upload: dict[str, torch.Tensor]  # what is sent to the server: shared_keys(state, partial)
    num_samples: int
    label_counts: np.ndarray  # c_k over the local training set, sums to num_samples
    train_loss: float  # mean total loss over the local steps


@dataclass
class EvalResult:
    correct: int
    count: int
    loss_sum: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else float("nan")

    def __add__(self, other: EvalResult) -> EvalResult:
        return EvalResult(self.correct + other.correct, self.count + other.count, self.loss_sum + other.loss_sum)


def round_seed(run_seed: int, round_idx: int, client: int | str) -> int:
    """The seed of one client's local training in one round: the same in the simulation and the fleet."""
    return derive_seed(run_seed, "local", round_idx, str(client))


def batch_schedule(num_samples: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` mini-batches of min(batch_size, num_samples) indices from back-to-back shuffled passes."""
    size = min(batch_size, num_samples)
    passes = math.ceil(steps * size / num_samples)
    order = np.concatenate([rng.permutation(num_samples) for _ in range(passes)])
    return [order[i * size:(i + 1) * size] for i in range(steps)]


def local_update(
    model: SplitClassifier,
    start_state: Mapping[str, torch.Tensor],
    train_x: np.ndarray,
    train_y: np.ndarray,
    cfg: AlgorithmConfig,
    round_idx: int,
    seed: int,
    sampler: LatentSampler | None = None,
    label_prior: np.ndarray | None = None,
) -> LocalResult:
    """Train `model` from `start_state` for cfg.local_steps mini-batch steps on (train_x, train_y).

    FedGen adds, from round 1 on, alpha_t * CE(h(G(y_hat)), y_hat) with y_hat ~ label_prior and
    beta_t * KL(softmax(h(G(y))) || softmax(f(x))) for the batch's own labels y (see docs/algorithm.md).
    FedProx adds mu/2 * ||theta - theta_global||^2 over the shared entries.
    """
    if len(train_y) == 0:
        raise ValueError("cannot train on an empty dataset")
    model.load_state_dict(start_state)
    model.train()
    keys = shared_keys(start_state, cfg.partial)
    anchor = {k: start_state[k].detach().clone() for k in keys} if cfg.algorithm == "fedprox" else None
    params = dict(model.named_parameters())
    alpha, beta = cfg.generative_weights(round_idx) if cfg.uses_generator else (0.0, 0.0)
    use_generator = sampler is not None and (alpha > 0 or beta > 0)
    if cfg.uses_generator and round_idx > 0 and sampler is None:
        raise ValueError("FedGen needs the generator after round 0")

    torch_rng = torch.Generator().manual_seed(seed)
    np_rng = np.random.default_rng(seed)
    prior = torch.as_tensor(_normalise_prior(label_prior, model.num_classes), dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.client_lr(round_idx))
    x_all, y_all = torch.from_numpy(train_x), torch.from_numpy(train_y)
    total = 0.0
    for idx in batch_schedule(len(y_all), cfg.batch_size, cfg.local_steps, np_rng):
        x, y = x_all[idx], y_all[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if use_generator:
            loss = loss + _generative_terms(model, logits, y, sampler, prior, cfg, alpha, beta, torch_rng)
        if anchor is not None:
            loss = loss + 0.5 * cfg.prox_mu * sum(((params[k] - anchor[k]) ** 2).sum()
                                                 for k in keys if k in params)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return LocalResult(
        state=state,
        upload={k: state[k] for k in keys},
        num_samples=len(train_y),
        label_counts=np.bincount(train_y, minlength=model.num_classes).astype(np.int64),
        train_loss=total / cfg.local_steps,
    )


def _generative_terms(model: SplitClassifier, logits: torch.Tensor, y: torch.Tensor, sampler: LatentSampler,
                      prior: torch.Tensor, cfg: AlgorithmConfig, alpha: float, beta: float,
                      rng: torch.Generator) -> torch.Tensor:
    """The two FedGen regularisers of the client objective."""
    with torch.no_grad():
        z_real_labels = sampler(sample_noise(len(y), cfg.noise_dim, rng), y)
        target = F.softmax(model.predictor(z_real_labels), dim=1)
    latent_kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
    y_hat = torch.multinomial(prior, cfg.gen_batch_size, replacement=True, generator=rng)
    with torch.no_grad():
        z_hat = sampler(sample_noise(cfg.gen_batch_size, cfg.noise_dim, rng), y_hat)
    teacher = F.cross_entropy(model.predictor(z_hat), y_hat)
    return alpha * teacher + beta * latent_kl


def _normalise_prior(prior: np.ndarray | None, num_classes: int) -> np.ndarray:
    if prior is None or np.sum(prior) <= 0:
        return np.full(num_classes, 1.0 / num_classes)
    prior = np.asarray(prior, dtype=np.float64)
    return prior / prior.sum()


@torch.no_grad()
def evaluate(model: SplitClassifier, state: Mapping[str, torch.Tensor], x: np.ndarray, y: np.ndarray,
             batch_size: int = 2048) -> EvalResult:
    """Correct predictions, count and summed cross-entropy of `state` on (x, y), BatchNorm in eval mode."""
    model.load_state_dict(state)
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[start:start + batch_size])
        yb = torch.from_numpy(y[start:start + batch_size])
        logits = model(xb)
        correct += int((logits.argmax(1) == yb).sum())
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
    return EvalResult(correct, len(y), loss_sum)
