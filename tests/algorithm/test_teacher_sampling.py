"""The generator's teacher term from M clients drawn per sample (`generator_teacher_clients`): an unbiased
estimate of the exact term over all K clients, drawn by the label weights, reproducible from the seed."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest
import torch
from torch import nn

from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.distill import (
    TeacherTerm,
    label_weights,
    make_generator,
    make_generator_optimizer,
    train_generator,
)

K, C, D, B = 200, 10, 32, 24


@pytest.fixture(scope="module")
def round_of_clients() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """K linear predictors, sparse non-IID label weights (label 3 held by nobody; a client's predictor favours
    the labels it holds, so which clients are drawn matters), latents and their labels."""
    gen = torch.Generator().manual_seed(0)
    stacked = {"weight": torch.randn(K, C, D, generator=gen), "bias": torch.randn(K, C, generator=gen)}
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 50, (K, C))
    counts[rng.random((K, C)) < 0.7] = 0  # most clients hold few labels
    counts[:, 3] = 0
    stacked["bias"] += 3.0 * torch.as_tensor(counts > 0)  # a client is sure of the labels it holds
    weights = torch.as_tensor(label_weights(counts), dtype=torch.float32)
    z = torch.randn(B, D, generator=gen)
    y = torch.as_tensor(rng.choice([c for c in range(C) if c != 3], B))
    return stacked, weights, z, y


def test_the_estimate_is_unbiased(round_of_clients):
    """The mean of many sampled terms is the exact term, to within the estimate's standard error; so is the
    ensemble's logits. A draw that ignored the weights (uniform over clients) would be biased: it is, here."""
    stacked, weights, z, y = round_of_clients
    exact, exact_ensemble = TeacherTerm(nn.Linear(D, C), stacked, weights)(z, y, ensemble=True)
    sampled = TeacherTerm(nn.Linear(D, C), stacked, weights, sample=8)
    rng = torch.Generator().manual_seed(1)
    draws = [sampled(z, y, ensemble=True, rng=rng) for _ in range(2000)]
    terms = torch.stack([t for t, _ in draws])
    ensembles = torch.stack([e for _, e in draws])
    error = terms.std() / len(terms) ** 0.5
    assert abs(terms.mean() - exact) < 4 * error
    assert terms.std() > 0  # it is a sample, not the exact term again
    ensemble_error = ensembles.std(0) / len(ensembles) ** 0.5
    assert ((ensembles.mean(0) - exact_ensemble).abs() <= 4 * ensemble_error + 1e-5).float().mean() > 0.99

    uniform = TeacherTerm(nn.Linear(D, C), stacked, torch.ones_like(weights) / K, sample=8)
    wrong = torch.stack([uniform(z, y, rng=rng)[0] for _ in range(500)])
    assert abs(wrong.mean() - exact) > 4 * wrong.std() / len(wrong) ** 0.5


def test_clients_are_drawn_in_proportion_to_their_weight(round_of_clients):
    """Draws for a label follow w[., y]: never a client without the label, frequencies within sampling error."""
    stacked, weights, _, _ = round_of_clients
    sampled = TeacherTerm(nn.Linear(D, C), stacked, weights, sample=50).sampled
    label = torch.full((400,), 5)
    picked = sampled.draw(label, torch.Generator().manual_seed(2)).reshape(-1)
    assert (weights[picked, 5] > 0).all()
    freq = torch.bincount(picked, minlength=K).double() / len(picked)
    p = weights[:, 5].double()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / len(picked)).sqrt() + 1e-9).all()
    assert len(picked.unique()) > (weights[:, 5] > 0).sum() * 0.9  # not stuck on a few clients


def test_a_generic_predictor_draws_the_same_clients(round_of_clients):
    """The same weights behind an nn.Sequential (the vmap path) with the same draws: the same term and
    ensemble up to float summation order."""
    stacked, weights, z, y = round_of_clients
    linear = TeacherTerm(nn.Linear(D, C), stacked, weights, sample=16)
    generic = TeacherTerm(nn.Sequential(nn.Linear(D, C)), {f"0.{k}": v for k, v in stacked.items()}, weights,
                          sample=16)
    a = linear(z, y, ensemble=True, rng=torch.Generator().manual_seed(5))
    b = generic(z, y, ensemble=True, rng=torch.Generator().manual_seed(5))
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-4)
    c = linear(z, y, ensemble=True, rng=torch.Generator().manual_seed(6))
    assert not torch.allclose(a[0], c[0])  # other draws, another estimate


def _trained(cfg: AlgorithmConfig, states: list[dict[str, torch.Tensor]], counts: np.ndarray, seed: int = 4
             ) -> dict[str, torch.Tensor]:
    generator = make_generator(C, D, cfg, seed=2)
    train_generator(generator, make_generator_optimizer(generator, cfg), nn.Linear(D, C), states, counts, cfg, 0,
                    torch.Generator().manual_seed(seed))
    return generator.state_dict()


def test_train_generator_with_a_sample_is_reproducible_and_exact_when_the_round_is_small():
    """Same seed, same generator; a round of no more clients than M trains exactly as without the option."""
    gen = torch.Generator().manual_seed(7)
    states = [{"predictor.weight": torch.randn(C, D, generator=gen), "predictor.bias": torch.randn(C, generator=gen)}
              for _ in range(12)]
    counts = np.random.default_rng(3).integers(0, 30, (12, C))
    base = AlgorithmConfig(generator_steps=4, generator_batch_size=16)
    drawn = msgspec.structs.replace(base, generator_teacher_clients=4)
    first, again, other_seed = _trained(drawn, states, counts), _trained(drawn, states, counts), \
        _trained(drawn, states, counts, seed=5)
    exact = _trained(base, states, counts)
    small = _trained(msgspec.structs.replace(base, generator_teacher_clients=12), states, counts)
    for name in first:
        assert torch.equal(first[name], again[name]), name
        assert torch.equal(exact[name], small[name]), name
    assert any(not torch.equal(first[n], exact[n]) for n in first)
    assert any(not torch.equal(first[n], other_seed[n]) for n in first)


def test_the_setting_is_bounded_and_absent_from_the_manifest_unless_set():
    """1..1024; unset it is not in the config's dict, so a manifest without it is what it was before."""
    assert "generator_teacher_clients" not in json.dumps(AlgorithmConfig().to_dict())
    assert AlgorithmConfig.from_dict({"generator_teacher_clients": 64}).generator_teacher_clients == 64
    for bad in (0, 1025, -1, 2.5, "64"):
        with pytest.raises(ValueError, match="generator_teacher_clients"):
            AlgorithmConfig.from_dict({"generator_teacher_clients": bad})
