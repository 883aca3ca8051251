"""The formulas of docs/algorithm.md pinned on tiny fixed inputs, each expected value computed by hand here
(not by calling the implementation): the generator's label weights and teacher term, the diversity loss,
alpha_t and beta_t, the direction of the KL term, y_hat drawn from p_hat(y), the labels the generator is
trained on, and FedProx's proximal gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.distill import (
    diversity_loss,
    label_weights,
    make_generator,
    make_generator_optimizer,
    train_generator,
)
from shared.algorithm.local import _generative_terms, local_update
from shared.algorithm.models import Generator, build_model
from shared.algorithm.schedule import generator_draws, normalise_prior


def test_label_weights_are_each_clients_share_of_a_label():
    counts = np.array([[3, 0, 1], [1, 0, 1]])
    # label 0: 3 of 4 and 1 of 4; label 1: nobody (0, not NaN); label 2: 1 of 2 each
    assert label_weights(counts).tolist() == [[0.75, 0.0, 0.5], [0.25, 0.0, 0.5]]


def test_label_weights_from_proportions_with_the_references_smoothing():
    counts = np.array([[3, 0, 1], [1, 0, 3]])
    # proportions x 8 samples: [6, 0, 2] and [2, 0, 6]; + 1 each: [7, 1, 3] and [3, 1, 7]; totals [10, 2, 10]
    weights = label_weights(counts, proportions=True, smoothing=1.0, samples=8)
    assert weights.ravel().tolist() == pytest.approx([0.7, 0.5, 0.3, 0.3, 0.5, 0.7])
    # counts + 1: [4, 1, 2] and [2, 1, 4]; totals [6, 2, 6]
    expected = [4 / 6, 0.5, 2 / 6, 2 / 6, 0.5, 4 / 6]
    assert label_weights(counts, smoothing=1.0).ravel().tolist() == pytest.approx(expected)


def test_generator_takes_its_label_weighting_from_the_config():
    """`label_weighting: proportions` with `label_smoothing` trains the generator exactly as the weights above
    say: the same generator as a run with the robust modes' proportions and the same smoothing."""
    states = [{"predictor.weight": torch.randn(10, 32, generator=torch.Generator().manual_seed(k)),
               "predictor.bias": torch.zeros(10)} for k in range(3)]
    counts = np.array([[50, 1] + [0] * 8, [0, 5] + [1] * 8, [2, 2] + [2] * 8])
    trained = []
    for cfg, robust in ((AlgorithmConfig(generator_steps=3, label_weighting="proportions", label_smoothing=1.0),
                         False),
                        (AlgorithmConfig(generator_steps=3, label_smoothing=1.0), True),
                        (AlgorithmConfig(generator_steps=3), False)):
        gen = make_generator(10, 32, cfg, seed=1)
        train_generator(gen, make_generator_optimizer(gen, cfg), nn.Linear(32, 10), states, counts, cfg, 0,
                        torch.Generator().manual_seed(3), proportions=robust)
        trained.append(torch.cat([v.flatten() for v in gen.state_dict().values() if v.is_floating_point()]))
    assert torch.equal(trained[0], trained[1])
    assert not torch.allclose(trained[0], trained[2])  # counts without smoothing teach differently
    with pytest.raises(ValueError, match="label_weighting"):
        AlgorithmConfig.from_dict({"label_weighting": "votes"})


def test_diversity_loss_by_hand():
    noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    z = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    # pairs (0,1) and (1,0): D_noise = mean((1)^2, (1)^2) = 1, D_z = mean(|2|) = 2; diagonal pairs 0
    # mean over the 4 pairs of D_noise * D_z = (0 + 2 + 2 + 0) / 4 = 1 -> exp(-1)
    assert float(diversity_loss(noise, z)) == pytest.approx(math.exp(-1.0))


def test_alpha_and_beta_schedules():
    cfg = AlgorithmConfig(generative_alpha=10.0, generative_beta=4.0, coefficient_decay=0.5, coefficient_floor=0.3)
    assert cfg.generative_weights(0) == (0.0, 0.0)  # no generator in round 0
    assert cfg.generative_weights(1) == (5.0, 2.0)
    assert cfg.generative_weights(3) == (1.25, 0.5)
    assert cfg.generative_weights(5) == (0.3125, 0.3)  # beta at its floor
    assert cfg.client_lr(2) == pytest.approx(0.01 * 0.99**2)


def test_the_coefficient_decay_defaults_to_the_validated_value_of_each_mode():
    """0.98 (the reference's) with full sharing, 0.99 with partial sharing (chosen on validation), written
    into the config so that a stored job or a manifest keeps the value; an explicit one always wins."""
    full, partial = AlgorithmConfig(), AlgorithmConfig(partial=True)
    assert (full.coefficient_decay, partial.coefficient_decay) == (0.98, 0.99)
    assert partial.generative_weights(10) == (pytest.approx(10 * 0.99**10),) * 2
    assert AlgorithmConfig(partial=True, coefficient_decay=0.98).coefficient_decay == 0.98
    stored = AlgorithmConfig.from_dict(partial.to_dict())
    assert stored.to_dict()["coefficient_decay"] == 0.99 and stored == partial
    assert AlgorithmConfig.from_dict({"partial": True}).coefficient_decay == 0.99


def test_kl_term_is_kl_of_the_generator_target_from_the_model():
    """beta * KL(P || Q) with P = softmax(h(G(y))) (the target, no gradient) and Q = softmax(f(x)), batchmean."""
    model = build_model("mlp", (1, 2, 2), 2)
    with torch.no_grad():
        model.predictor.weight.copy_(torch.eye(2, 32))
        model.predictor.bias.zero_()
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]], requires_grad=True)
    z_y = np.zeros((2, 32), np.float32)
    z_y[0, 0] = 1.0  # h(z) = [1, 0] for the first sample, [0, 0] for the second
    p = [[math.e / (math.e + 1), 1 / (math.e + 1)], [0.5, 0.5]]
    q = [[math.e**2 / (math.e**2 + 1), 1 / (math.e**2 + 1)], [0.5, 0.5]]
    kl = sum(p[i][j] * math.log(p[i][j] / q[i][j]) for i in range(2) for j in range(2)) / 2
    no_teacher = np.zeros((1, 32), np.float32), np.array([0]), np.zeros((1, 32), np.float32)
    got = _generative_terms(model, logits, torch.tensor([0, 1]), z_y, no_teacher[1], no_teacher[2], 0.0, 3.0)
    assert float(got.detach()) == pytest.approx(3.0 * kl, rel=1e-5)  # float32
    reverse = sum(q[i][j] * math.log(q[i][j] / p[i][j]) for i in range(2) for j in range(2)) / 2
    assert abs(float(got.detach()) - 3.0 * reverse) > 1e-3  # the other direction would give another value


def test_teacher_term_is_cross_entropy_of_generated_latents():
    model = build_model("mlp", (1, 2, 2), 3)
    with torch.no_grad():
        model.predictor.weight.zero_()
        model.predictor.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    z_hat = np.zeros((2, 32), np.float32)
    y_hat = np.array([0, 2])
    log_softmax = [1 - math.log(math.e + 2), -math.log(math.e + 2)]  # of label 0 and of label 2
    expected = 2.0 * -(log_softmax[0] + log_softmax[1]) / 2
    logits = torch.zeros(1, 3, requires_grad=True)
    z_y = np.zeros((1, 32), np.float32)
    got = _generative_terms(model, logits, torch.tensor([0]), z_y, y_hat, z_hat, 2.0, 0.0)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)


def test_y_hat_follows_the_label_prior():
    prior = normalise_prior(np.array([0, 30, 10]), 3)
    assert prior.tolist() == [0.0, 0.75, 0.25]
    cfg = AlgorithmConfig(gen_batch_size=4000)
    rng = np.random.default_rng(0)
    _, y_hat, _ = generator_draws(lambda n, y: np.zeros((len(y), 32), np.float32), np.array([1]), prior, cfg, rng)
    shares = np.bincount(y_hat, minlength=3) / len(y_hat)
    assert shares[0] == 0 and abs(shares[1] - 0.75) < 0.03 and abs(shares[2] - 0.25) < 0.03
    assert normalise_prior(None, 4).tolist() == [0.25] * 4 and normalise_prior(np.zeros(2), 2).tolist() == [0.5] * 2


def test_the_generator_learns_only_labels_some_client_holds():
    """Labels no client of the round holds are never drawn for the generator's teacher term."""
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            seen.append(labels.clone())
            return self.inner(noise, labels)

    spy = Spy()
    spy.inner = Generator(4, 32, 8, 16)
    spy.noise_dim, spy.num_classes = 8, 4
    cfg = AlgorithmConfig(generator_steps=20, generator_batch_size=16, noise_dim=8)
    predictor = nn.Linear(32, 4)
    state = {f"predictor.{k}": v.detach().clone() for k, v in predictor.state_dict().items()}
    optimizer = torch.optim.Adam(spy.inner.parameters())
    train_generator(spy, optimizer, predictor, [state, state], np.array([[5, 0, 1, 0], [0, 0, 2, 0]]), cfg, 0,
                    torch.Generator().manual_seed(0))
    labels = torch.cat(seen)
    assert set(labels.tolist()) == {0, 2}


def test_fedprox_proximal_gradient_at_its_default():
    """theta_2 = theta_1 - lr (grad CE(theta_1) + mu (theta_1 - theta_0)): two steps of FedProx differ from two of
    FedAvg (same batches, same first step) by exactly -lr * mu * (theta_1 - theta_0), with the default mu."""
    torch.manual_seed(0)
    model = build_model("mlp", (1, 2, 2), 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x = np.random.default_rng(0).uniform(-1, 1, (4, 1, 2, 2)).astype(np.float32)
    y = np.array([0, 1, 0, 1])
    lr = 0.5

    def run(algorithm: str, steps: int) -> dict[str, torch.Tensor]:
        cfg = AlgorithmConfig(algorithm=algorithm, learning_rate=lr, lr_decay=1.0, local_steps=steps, batch_size=4)
        return local_update(model, {k: v.clone() for k, v in start.items()}, x, y, cfg, 0, seed=1).state

    mu = AlgorithmConfig().prox_mu
    one, two_avg, two_prox = run("fedavg", 1), run("fedavg", 2), run("fedprox", 2)
    for name, _ in model.named_parameters():
        expected = -lr * mu * (one[name] - start[name])
        assert torch.allclose(two_prox[name] - two_avg[name], expected, atol=1e-7), name
    assert any((one[n] - start[n]).abs().max() > 1e-3 for n, _ in model.named_parameters())  # the test has teeth


def test_batched_teacher_term_matches_a_loop_over_clients():
    """The generator's teacher term over K predictors at once (vmap) gives the generator a loop over the clients
    would give, up to float summation order, over several Adam steps."""
    from shared.algorithm.distill import diversity_loss, label_weights, make_generator, make_generator_optimizer
    from shared.algorithm.models import sample_noise

    cfg = AlgorithmConfig(generator_steps=5, generator_batch_size=16)
    predictor = nn.Linear(32, 10)
    gen = torch.Generator().manual_seed(0)
    states = [{"predictor.weight": torch.randn(10, 32, generator=gen), "predictor.bias": torch.randn(10, generator=gen)}
              for _ in range(7)]
    counts = np.random.default_rng(0).integers(0, 30, (7, 10))
    counts[:, 3] = 0  # a label nobody holds

    batched = make_generator(10, 32, cfg, seed=1)
    train_generator(batched, make_generator_optimizer(batched, cfg), predictor, states, counts, cfg, 0,
                    torch.Generator().manual_seed(3))

    looped = make_generator(10, 32, cfg, seed=1)
    optimizer = make_generator_optimizer(looped, cfg)
    rng = torch.Generator().manual_seed(3)
    available = torch.as_tensor(np.flatnonzero(counts.sum(axis=0) > 0))
    weights = torch.as_tensor(label_weights(counts), dtype=torch.float32)
    for group in optimizer.param_groups:
        group["lr"] = cfg.generator_lr_at(0)
    looped.train()
    for _ in range(cfg.generator_steps):
        y = available[torch.randint(len(available), (cfg.generator_batch_size,), generator=rng)]
        noise = sample_noise(len(y), looped.noise_dim, rng)
        z = looped(noise, y)
        teacher = torch.zeros(())
        for k, state in enumerate(states):
            logits = z @ state["predictor.weight"].T + state["predictor.bias"]
            teacher = teacher + (weights[k, y] * torch.nn.functional.cross_entropy(logits, y, reduction="none")).mean()
        loss = teacher + cfg.diversity_weight * diversity_loss(noise, z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for (name, a), (_, b) in zip(batched.state_dict().items(), looped.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_the_linear_fast_path_equals_the_generic_vmap_and_stacked_input_equals_states():
    """A linear predictor's teacher term is one matrix product (distill.TeacherTerm); any other predictor goes
    through vmap. The same weights behind an nn.Sequential take the generic path: the generators agree up to
    float summation order. Pre-stacked theta^p (what the round accumulator hands over) gives the same
    generator bit for bit as the list of states."""
    from shared.algorithm.distill import StackedPredictors, make_generator, make_generator_optimizer, stack_predictors

    cfg = AlgorithmConfig(generator_steps=5, generator_batch_size=16)
    gen = torch.Generator().manual_seed(5)
    states = [{"predictor.weight": torch.randn(10, 32, generator=gen), "predictor.bias": torch.randn(10, generator=gen)}
              for _ in range(6)]
    counts = np.random.default_rng(1).integers(0, 30, (6, 10))

    def trained(predictor: nn.Module, client_states, label_counts=counts) -> dict[str, torch.Tensor]:
        g = make_generator(10, 32, cfg, seed=2)
        train_generator(g, make_generator_optimizer(g, cfg), predictor, client_states, label_counts, cfg, 0,
                        torch.Generator().manual_seed(4))
        return g.state_dict()

    fast = trained(nn.Linear(32, 10), states)
    sequential = [{k.replace("predictor.", "predictor.0."): v for k, v in s.items()} for s in states]
    generic = trained(nn.Sequential(nn.Linear(32, 10)), sequential)
    stacked = trained(nn.Linear(32, 10), StackedPredictors(stack_predictors(states)))
    for name in fast:
        assert torch.allclose(fast[name], generic[name], atol=1e-5, rtol=1e-4), name
        assert torch.equal(fast[name], stacked[name]), name
    fewer = trained(nn.Linear(32, 10), states[:3], counts[:3])
    assert any((fast[n] - fewer[n]).abs().max() > 1e-4 for n in fast)  # the test has teeth
