"""FedGen's server step: train the generator G(z | y) from the clients' predictors and label counts (Eq. 4)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.models import Generator, init_parameters, predictor_params, sample_noise


def diversity_loss(noise: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mode-seeking diversity loss (Mao et al. 2019), the reference's form:
    exp(-mean_ij(D_noise[i, j] * D_z[i, j])) with D_z the mean absolute and D_noise the mean squared
    pairwise difference. Lower when different noise gives different outputs."""
    d_z = (z.unsqueeze(1) - z.unsqueeze(0)).abs().mean(dim=2)
    d_noise = ((noise.unsqueeze(1) - noise.unsqueeze(0)) ** 2).mean(dim=2)
    return torch.exp(-(d_noise * d_z).mean())


def label_weights(label_counts: np.ndarray, proportions: bool = False, smoothing: float = 0.0,
                  samples: float = 1.0) -> np.ndarray:
    """w[k, y] = c_k(y) / sum_j c_j(y): how much client k speaks for label y (0 where no client has y).

    With `proportions` (`label_weighting: proportions`, and always in the robust modes), c_k(y) is replaced by
    `samples` x client k's label *proportion* c_k(y) / sum_y c_k(y), the reference's form (its counts are of
    the T x B images a client draws in a round): a client's claimed total no longer matters, so claiming huge
    counts buys no more weight than claiming the same labels in small numbers. `smoothing` is added to every
    c_k(y) first (the reference starts its counts at 1)."""
    counts = np.asarray(label_counts, dtype=np.float64)
    if proportions:
        own = counts.sum(axis=1, keepdims=True)
        counts = samples * np.divide(counts, own, out=np.zeros_like(counts), where=own > 0)
    counts = counts + smoothing
    totals = counts.sum(axis=0, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


@dataclass
class GeneratorStats:
    teacher_loss: float
    diversity_loss: float
    accuracy: float  # how often the weighted ensemble of predictors labels G(y) as y, on the last step


def make_generator(num_classes: int, latent_dim: int, cfg: AlgorithmConfig, seed: int) -> Generator:
    """A generator whose weights are drawn from a generator seeded with `seed` (not the process-wide RNG)."""
    generator = Generator(num_classes, latent_dim, cfg.noise_dim, cfg.generator_hidden)
    init_parameters(generator, torch.Generator().manual_seed(seed))
    return generator


def make_generator_optimizer(generator: Generator, cfg: AlgorithmConfig) -> torch.optim.Adam:
    return torch.optim.Adam(generator.parameters(), lr=cfg.generator_lr,
                            weight_decay=cfg.generator_weight_decay)


@dataclass
class StackedPredictors:
    """The clients' theta^p already stacked: one tensor per parameter (the 'predictor.' prefix removed),
    clients along dim 0 (what `RoundAccumulator.stacked_predictors` gives)."""

    params: dict[str, torch.Tensor]


def stack_predictors(client_states: Sequence[Mapping[str, torch.Tensor]] | StackedPredictors
                     ) -> dict[str, torch.Tensor]:
    """The clients' theta^p as one tensor per parameter, clients along dim 0 (detached: no gradient)."""
    if isinstance(client_states, StackedPredictors):
        return {name: t.detach() for name, t in client_states.params.items()}
    thetas = [predictor_params(s) for s in client_states]
    if not thetas:
        return {}
    return {name: torch.stack([t[name].detach() for t in thetas]) for name in thetas[0]}


def all_predictors(predictor: nn.Module, stacked: Mapping[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Logits K x B x C of each of the K stacked predictors on the same latents z (B x latent), in one
    vectorised call (torch.func.vmap over `predictor`), not a loop over clients."""
    return vmap(lambda params: functional_call(predictor, params, (z,)))(dict(stacked))


def is_linear(predictor: nn.Module, stacked: Mapping[str, torch.Tensor]) -> bool:
    """Whether the predictor is a plain nn.Linear (every shipped model's; a subclass may differ)."""
    return type(predictor) is nn.Linear and set(stacked) == {"weight", "bias"}


class TeacherTerm:
    """Eq. 4's teacher term over K clients' predictors with label weights w (K x C), for a batch of latents z
    and labels y: sum_k mean_b w[k, y_b] * CE(h_k(z_b), y_b).

    CE is log-sum-exp minus the logit of the label. For linear predictors (every shipped model's) the second
    part is linear in the predictors, so its weighted sum over clients is precomputed once per round (one
    C x latent matrix and C biases), and the log-sum-exp needs every client's logits from one matrix product
    against all K predictors side by side, classes outermost (B x C x K: the reduction over the C classes
    runs over contiguous rows of K, and the bias rides in the product as a column): no gather over the
    clients, no scatter back. Any other predictor goes through a vmap over the module (`all_predictors`).
    The same value either way, up to float summation order (tests/algorithm/test_formulas.py)."""

    def __init__(self, predictor: nn.Module, stacked: Mapping[str, torch.Tensor], weights: torch.Tensor,
                 sample: int | None = None):
        self.predictor = predictor
        self.stacked = stacked
        self.weights = weights  # K x C
        # with `sample` M < K: the term from M clients per latent drawn by w (`SampledTeacherTerm`), not all K
        self.sampled = SampledTeacherTerm(predictor, stacked, weights, sample) if sample and sample < len(
            weights) else None
        self.linear = is_linear(predictor, stacked)
        if self.linear and self.sampled is None:
            weight, bias = stacked["weight"], stacked["bias"]  # K x C x latent, K x C
            k, c, latent = weight.shape
            # (C*K) x (latent + 1): class-major rows [W_k[c], b_k[c]]
            self.rows = torch.cat([weight.transpose(0, 1).reshape(c * k, latent), bias.T.reshape(c * k, 1)], 1)
            self.shape = (c, k)
            # sum_k w[k, c] * (W_k[c], b_k[c]): the label's logit summed over the clients, per class
            self.label_weight = torch.einsum("kc,kcd->cd", weights, weight)  # C x latent
            self.label_bias = (weights * bias).sum(0)  # C

    def __call__(self, z: torch.Tensor, y: torch.Tensor, ensemble: bool = False,
                 rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher term, and with `ensemble` the label-weighted ensemble's logits (B x C, no gradient).
        A sampled term draws its clients from `rng`."""
        if self.sampled is not None:
            return self.sampled(z, y, ensemble, rng)
        w = self.weights[:, y].T  # B x K
        if self.linear:
            ones = torch.ones(len(z), 1, dtype=z.dtype)
            logits = (torch.cat([z, ones], 1) @ self.rows.T).view(len(z), *self.shape)  # B x C x K
            label_logits = (z * self.label_weight[y]).sum(1) + self.label_bias[y]  # B: sum_k w * picked logit
            teacher = ((w * torch.logsumexp(logits, dim=1)).sum(1) - label_logits).mean()
            return teacher, torch.einsum("bk,bck->bc", w, logits.detach()) if ensemble else None
        logits = all_predictors(self.predictor, self.stacked, z).transpose(0, 1)  # B x K x C
        picked = logits.gather(2, y.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(2)
        teacher = (w * (torch.logsumexp(logits, dim=2) - picked)).mean(dim=0).sum()
        return teacher, torch.einsum("bk,bkc->bc", w, logits.detach()) if ensemble else None


class SampledTeacherTerm:
    """An unbiased estimate of `TeacherTerm` from M clients per latent: for the latent z_b of label y_b, M
    clients k_1..k_M are drawn with replacement with probability w[k, y_b] / s(y_b), s(y) = sum_k w[k, y]
    (1 for every label some client holds), and

        sum_k w[k, y_b] * CE(h_k(z_b), y_b)  is estimated by  s(y_b) / M * sum_m CE(h_{k_m}(z_b), y_b),

    whose expectation over the draws is the exact term (tests/algorithm/test_teacher_sampling.py). A step costs
    O(B x M) predictor evaluations instead of O(B x K); clients without the label are never drawn. The draws
    are one inverse-CDF lookup per draw (a sorted search over the C per-label cumulative weights laid end to
    end), so a step's cost does not grow with K. Memory per step: B x M x C x (latent + 1) floats of gathered
    predictors (32 x 64 x 10 x 33 x 4 bytes = 2.7 MB at the defaults with M = 64), plus one copy of the K
    linear predictors as rows."""

    def __init__(self, predictor: nn.Module, stacked: Mapping[str, torch.Tensor], weights: torch.Tensor,
                 sample: int):
        self.predictor, self.stacked, self.sample = predictor, stacked, sample
        self.clients = len(weights)
        wide = weights.to(torch.float64).T  # C x K
        self.scale = wide.sum(1).to(weights.dtype)  # s(y)
        cdf = torch.cumsum(wide, 1) / wide.sum(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        cdf[:, -1] = 1.0  # no draw may fall past a row's end through rounding
        # row c's cumulative weights shifted by c: one increasing sequence, searched once for every draw
        self.cdf = (cdf + torch.arange(len(cdf), dtype=torch.float64).unsqueeze(1)).reshape(-1)
        self.linear = is_linear(predictor, stacked)
        if self.linear:  # K x C(latent + 1): each client's rows [W_k[c], b_k[c]], one row to gather per client
            weight, bias = stacked["weight"], stacked["bias"]
            self.rows = torch.cat([weight, bias.unsqueeze(2)], 2).reshape(len(weight), -1)

    def draw(self, y: torch.Tensor, rng: torch.Generator | None) -> torch.Tensor:
        """B x M client indices, the draws for each latent's label."""
        u = torch.rand(len(y), self.sample, generator=rng, dtype=torch.float64)
        at = torch.searchsorted(self.cdf, y.unsqueeze(1).to(torch.float64) + u, right=True)
        return (at - y.unsqueeze(1) * self.clients).clamp_(0, self.clients - 1)

    def logits(self, z: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """B x M x C: the drawn clients' predictors on their latents."""
        b, m = picked.shape
        if self.linear:  # index_select of whole rows: several times faster than indexing the 3-d tensors
            rows = self.rows.index_select(0, picked.reshape(-1)).view(b, -1, z.shape[1] + 1)  # B x MC x (latent+1)
            ones = torch.ones(b, 1, dtype=z.dtype)
            return torch.einsum("bd,bnd->bn", torch.cat([z, ones], 1), rows).view(b, m, -1)
        params = {name: t[picked.reshape(-1)] for name, t in self.stacked.items()}
        one = vmap(lambda p, x: functional_call(self.predictor, p, (x.unsqueeze(0),)).squeeze(0))
        return one(params, z.repeat_interleave(m, 0)).view(b, m, -1)

    def __call__(self, z: torch.Tensor, y: torch.Tensor, ensemble: bool = False,
                 rng: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.logits(z, self.draw(y, rng))  # B x M x C
        label = logits.gather(2, y.view(-1, 1, 1).expand(-1, logits.shape[1], 1)).squeeze(2)
        scale = self.scale[y]
        teacher = (scale * (torch.logsumexp(logits, dim=2) - label).mean(1)).mean()
        return teacher, scale.unsqueeze(1) * logits.detach().mean(1) if ensemble else None


def train_generator(
    generator: Generator,
    optimizer: torch.optim.Optimizer,
    predictor: nn.Module,
    client_states: Sequence[Mapping[str, torch.Tensor]] | StackedPredictors,
    label_counts: np.ndarray,
    cfg: AlgorithmConfig,
    round_idx: int,
    rng: torch.Generator,
    proportions: bool = False,
) -> GeneratorStats:
    """cfg.generator_steps Adam steps on Eq. 4 over this round's clients.

    Teacher term: sum_k mean_b w[k, y_b] * CE(h_k(G(eps_b, y_b)), y_b), the label-weighted ensemble the
    reference code intended (its broadcasting bug fixed); labels y_b are drawn uniformly from the labels at
    least one client of the round holds. `predictor` is a module of the classifiers' predictor shape; each
    client's theta^p is applied to it functionally, so the predictors receive no gradient. With
    `cfg.generator_teacher_clients` M below the number of clients, each step's term is the unbiased estimate
    from M clients per sample (`SampledTeacherTerm`), drawn from `rng` like the labels and the noise.
    """
    counts = np.asarray(label_counts)
    stacked = stack_predictors(client_states)
    if not len(counts) or not stacked or any(len(t) != len(counts) for t in stacked.values()):
        raise ValueError("need one label-count row per client state, and at least one client")
    available = torch.as_tensor(np.flatnonzero(counts.sum(axis=0) > 0))
    weights = label_weights(counts, proportions or cfg.label_weighting == "proportions", cfg.label_smoothing,
                            cfg.local_steps * cfg.batch_size)
    weights = torch.as_tensor(weights, dtype=torch.float32)  # K x C
    for group in optimizer.param_groups:
        group["lr"] = cfg.generator_lr_at(round_idx)
    generator.train()
    sample = cfg.generator_teacher_clients
    teacher_term = TeacherTerm(predictor, stacked, weights, None if sample is msgspec.UNSET else sample)
    teacher = div = torch.zeros(())
    accuracy = 0.0
    for step in range(cfg.generator_steps):
        y = available[torch.randint(len(available), (cfg.generator_batch_size,), generator=rng)]
        noise = sample_noise(len(y), generator.noise_dim, rng)
        z = generator(noise, y)
        last = step == cfg.generator_steps - 1
        teacher, ensemble = teacher_term(z, y, ensemble=last, rng=rng)  # all K predictors at once, or M drawn
        div = diversity_loss(noise, z)
        loss = teacher + cfg.diversity_weight * div
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if last:  # the label-weighted ensemble's accuracy on the last step's samples
            accuracy = float((ensemble.argmax(1) == y).float().mean())
    generator.eval()
    return GeneratorStats(float(teacher.detach()), float(div.detach()), accuracy)
