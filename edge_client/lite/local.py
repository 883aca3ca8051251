"""One local update and evaluation in numpy: `shared.algorithm.local` (the torch reference) step for step.

Per step, on the mini-batch (x, y) and, for FedGen, the generator's samples (z_y, y_hat, z_hat):

    loss = CE(f(x), y)                                                 (FedAvg)
         + alpha_t * CE(h(z_hat), y_hat) + beta_t * KL(softmax(h(z_y)) || softmax(f(x)))   (FedGen, round >= 1)
         + mu / 2 * sum_k ||theta_k - theta_k^start||^2 over the shared parameters        (FedProx)

with f = h o features, h the predictor, the KL target computed from the current predictor as a constant, then
plain SGD. Every random draw comes from `shared.algorithm.schedule`, in the reference's order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_client.lite import layers as L
from edge_client.lite.model import LiteModel, State
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.schedule import LatentSampler, batch_schedule, generator_draws, normalise_prior

GeneratorDraws = tuple[np.ndarray, np.ndarray, np.ndarray]  # z_y [B, latent], y_hat [G], z_hat [G, latent]


@dataclass
class LocalResult:
    state: State  # the whole trained state (the device keeps theta^f from it in partial mode)
    upload: State  # the shared entries: what is sent
    num_samples: int
    label_counts: np.ndarray  # int64 [classes], sums to num_samples
    train_loss: float  # mean total loss over the local steps


def objective(model: LiteModel, state: State, x: np.ndarray, y: np.ndarray, *, alpha: float = 0.0,
              beta: float = 0.0, draws: GeneratorDraws | None = None, anchor: Mapping[str, np.ndarray] | None = None,
              mu: float = 0.0) -> tuple[np.float32, State]:
    """(loss, gradient of every parameter) of one step on x [B, C, H, W], y [B]; training mode, so the
    BatchNorm entries of `state` advance by this batch. `draws` enables the FedGen terms, `anchor` (the
    start values of the shared parameters) the FedProx term."""
    z, logits, caches = model.forward(state, x, train=True)
    loss, dlogits = L.cross_entropy(logits, y)
    teacher_grads: State = {}
    if draws is not None:
        z_y, y_hat, z_hat = draws
        w, b = state["predictor.weight"], state["predictor.bias"]
        target = L.softmax(L.linear(z_y, w, b))  # from the current predictor, no gradient
        kl, dkl = L.kl_div_batchmean(logits, target)
        teacher, dteacher = L.cross_entropy(L.linear(z_hat, w, b), y_hat)
        loss = loss + (np.float32(alpha) * teacher + np.float32(beta) * kl)
        dlogits = dlogits + np.float32(beta) * dkl
        _, dw, db = L.linear_backward(np.float32(alpha) * dteacher, z_hat, w, need_dx=False)
        teacher_grads = {"predictor.weight": dw, "predictor.bias": db}
    grads = model.backward(state, z, caches, dlogits)
    for k, g in teacher_grads.items():
        grads[k] = grads[k] + g
    if anchor:
        prox = np.float32(0)
        for k, a in anchor.items():
            diff = state[k] - a
            prox = prox + (diff * diff).sum()
            grads[k] = grads[k] + np.float32(mu) * diff
        loss = loss + np.float32(0.5 * mu) * prox
    return loss, grads


def local_update(model: LiteModel, start: Mapping[str, np.ndarray], train_x: np.ndarray, train_y: np.ndarray,
                 cfg: AlgorithmConfig, round_idx: int, seed: int, sampler: LatentSampler | None = None,
                 label_prior: np.ndarray | None = None) -> LocalResult:
    """cfg.local_steps SGD steps from `start` on (train_x [N, C, H, W], train_y [N]), as
    `shared.algorithm.local.local_update`; without a `sampler`, FedGen trains as FedAvg would that round."""
    if len(train_y) == 0:
        raise ValueError("cannot train on an empty dataset")
    x_all, y_all = model.check_input(train_x), _check_labels(train_y, model.num_classes)
    if len(x_all) != len(y_all):
        raise ValueError(f"{len(x_all)} images but {len(y_all)} labels")
    state = model.load(start)
    keys = model.shared_keys(cfg.partial)
    params = set(model.parameter_names())
    anchor = {k: state[k].copy() for k in keys if k in params} if cfg.algorithm == "fedprox" else None
    alpha, beta = cfg.generative_weights(round_idx) if cfg.uses_generator else (0.0, 0.0)
    use_generator = sampler is not None and (alpha > 0 or beta > 0)

    rng = np.random.default_rng(seed)
    prior = normalise_prior(label_prior, model.num_classes)
    lr = np.float32(cfg.client_lr(round_idx))
    total = 0.0
    for idx in batch_schedule(len(y_all), cfg.batch_size, cfg.local_steps, rng):
        draws = None
        if use_generator:
            z_y, y_hat, z_hat = generator_draws(sampler, y_all[idx], prior, cfg, rng)
            draws = (_latent(z_y, model), y_hat, _latent(z_hat, model))
        loss, grads = objective(model, state, x_all[idx], y_all[idx], alpha=alpha, beta=beta, draws=draws,
                                anchor=anchor, mu=cfg.prox_mu)
        for k, g in grads.items():
            state[k] = state[k] - lr * g
        total += float(loss)
    return LocalResult(state=state, upload={k: state[k] for k in keys}, num_samples=len(y_all),
                       label_counts=np.bincount(y_all, minlength=model.num_classes).astype(np.int64),
                       train_loss=total / cfg.local_steps)


def evaluate(model: LiteModel, state: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
             batch_size: int = 256) -> tuple[int, int, float]:
    """(correct, count, summed cross-entropy) of `state` on (x [N, C, H, W], y [N]), BatchNorm in eval mode,
    `batch_size` images at a time (bounded memory)."""
    state = model.load(state)
    x, y = model.check_input(x), _check_labels(y, model.num_classes)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        _, logits, _ = model.forward(state, x[start:start + batch_size], train=False)
        yb = y[start:start + batch_size]
        correct += int((logits.argmax(axis=1) == yb).sum())
        loss_sum += float(L.cross_entropy_sum(logits, yb))
    return correct, len(y), loss_sum


def _check_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() >= num_classes)):
        raise ValueError(f"labels must be integers in [0, {num_classes}) of shape [N]")
    return y.astype(np.int64, copy=False)


def _latent(z: np.ndarray, model: LiteModel) -> np.ndarray:
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != model.latent_dim:
        raise ValueError(f"the generator gave latents of shape {z.shape}, the model takes [N, {model.latent_dim}]")
    return z
