"""Client side of a round: local training (Eq. 5, FedAvg, FedProx) and evaluation.

Pure functions over a model, state dicts and arrays; they know nothing of transport. The in-process
simulation and the edge client call exactly these.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.models import SplitClassifier, shared_keys
from shared.algorithm.schedule import LatentSampler, batch_schedule, generator_draws, normalise_prior


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
    FedProx adds mu/2 * ||theta - theta_global||^2 over the shared entries. Without a `sampler` (a device that
    refused a generator) FedGen trains as FedAvg would, that round.

    Every random draw comes from one numpy Generator seeded with `seed`, in this order (so that any runtime
    reproduces it): the whole batch schedule (`batch_schedule`), then per step, when the generator is used,
    the noise for the batch's labels, the labels y_hat, the noise for y_hat (`generator_draws`).
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

    rng = np.random.default_rng(seed)
    prior = normalise_prior(label_prior, model.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.client_lr(round_idx))
    x_all, y_all = torch.from_numpy(train_x), torch.from_numpy(train_y)
    total = 0.0
    for idx in batch_schedule(len(y_all), cfg.batch_size, cfg.local_steps, rng):
        x, y = x_all[idx], y_all[idx]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if use_generator:
            z_y, y_hat, z_hat = generator_draws(sampler, train_y[idx], prior, cfg, rng)
            loss = loss + _generative_terms(model, logits, y, z_y, y_hat, z_hat, alpha, beta)
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


def _generative_terms(model: SplitClassifier, logits: torch.Tensor, y: torch.Tensor, z_y: np.ndarray,
                      y_hat: np.ndarray, z_hat: np.ndarray, alpha: float, beta: float) -> torch.Tensor:
    """The two FedGen regularisers of the client objective: alpha * CE(h(z_hat), y_hat) + beta * KL(h(z_y) || f(x))
    (KL(P || Q) with P the generator's softmax, the target, and Q the model's: reduction batchmean)."""
    with torch.no_grad():
        target = F.softmax(model.predictor(torch.from_numpy(z_y)), dim=1)
    latent_kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
    teacher = F.cross_entropy(model.predictor(torch.from_numpy(z_hat)), torch.from_numpy(y_hat))
    return alpha * teacher + beta * latent_kl


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


@torch.no_grad()
def class_correct(model: SplitClassifier, state: Mapping[str, torch.Tensor], x: np.ndarray, y: np.ndarray,
                  num_classes: int, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(correct predictions per class, images per class) of `state` on (x, y), BatchNorm in eval mode."""
    model.load_state_dict(state)
    model.eval()
    correct = np.zeros(num_classes, dtype=np.int64)
    for start in range(0, len(y), batch_size):
        yb = y[start:start + batch_size]
        hits = model(torch.from_numpy(x[start:start + batch_size])).argmax(1).numpy() == yb
        correct += np.bincount(yb[hits], minlength=num_classes)
    return correct, np.bincount(y, minlength=num_classes)
