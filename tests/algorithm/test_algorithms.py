"""The algorithm library: local objectives, partial sharing, generator training."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.distill import label_weights, make_generator, make_generator_optimizer, train_generator
from shared.algorithm.federation import GlobalState, RoundAccumulator, client_start_state
from shared.algorithm.local import local_update
from shared.algorithm.models import build_model, is_predictor_key, sample_noise, split_state
from shared.algorithm.schedule import batch_schedule, round_seed
from shared.data.datasets import load_dataset
from shared.data.partition import PartitionSpec, partition
from shared.simulation import download_bytes


@pytest.fixture(scope="module")
def users():
    return partition(load_dataset("mnist-subset"), PartitionSpec(users=10, alpha=0.1, samples_per_class=300))


def run_round(state: GlobalState, users, selected, round_idx, own=None):
    """One in-process round over `selected`, returning the local results."""
    acc, results = RoundAccumulator(), {}
    for k in selected:
        start = client_start_state(state.state, (own or {}).get(k), state.cfg.partial)
        res = local_update(state.model, start, users[k].train_x, users[k].train_y, state.cfg, round_idx,
                           round_seed(0, round_idx, k), state.sampler(), state.prior.probabilities())
        acc.add(res.upload, res.num_samples, res.label_counts, client=k)
        results[k] = res
    state.close_round(acc, round_idx)
    return results


def test_batch_schedule_handles_tiny_datasets():
    rng = np.random.default_rng(0)
    batches = batch_schedule(num_samples=5, batch_size=32, steps=4, rng=rng)
    assert all(sorted(b.tolist()) == [0, 1, 2, 3, 4] for b in batches)  # a user with < B samples: all of them
    batches = batch_schedule(num_samples=70, batch_size=32, steps=20, rng=rng)
    assert all(len(b) == 32 for b in batches)
    first_pass = np.concatenate(batches)[:70]
    assert sorted(first_pass.tolist()) == list(range(70))  # every sample once before any repeats


def test_partial_mode_uploads_and_aggregates_only_predictor(users):
    cfg = AlgorithmConfig(algorithm="fedgen", partial=True, local_steps=5)
    state = GlobalState(cfg, (1, 28, 28), 10, seed=0)
    initial_features, initial_predictor = split_state({k: v.clone() for k, v in state.state.items()})
    own = {}
    results = run_round(state, users, [0, 1, 2], 0)
    for k, res in results.items():
        assert set(res.upload) == {"predictor.weight", "predictor.bias"}
        own[k] = res.state
    features_after, predictor_after = split_state(state.state)
    for key, value in initial_features.items():
        assert torch.equal(features_after[key], value), f"global {key} moved in partial mode"
    assert not torch.equal(predictor_after["predictor.weight"], initial_predictor["predictor.weight"])
    # each client keeps its own theta^f, different from the others' and from the global one
    w = "features.7.weight"
    assert not torch.equal(own[0][w], own[1][w]) and not torch.equal(own[0][w], features_after[w])
    # next round, a client starts from its own theta^f and the new global theta^p
    start = client_start_state(state.state, own[0], partial=True)
    assert torch.equal(start[w], own[0][w])
    assert torch.equal(start["predictor.weight"], state.state["predictor.weight"])
    assert download_bytes(state) < 100_000  # theta^p + generator, not the CNN


def test_full_mode_aggregates_the_weighted_mean(users):
    cfg = AlgorithmConfig(algorithm="fedavg", local_steps=3)
    state = GlobalState(cfg, (1, 28, 28), 10, seed=0)
    results = run_round(state, users, [3, 4], 0)
    n3, n4 = results[3].num_samples, results[4].num_samples
    for key in state.shared_keys:
        expected = (n3 * results[3].upload[key].double() + n4 * results[4].upload[key].double()) / (n3 + n4)
        assert torch.allclose(state.state[key].double(), expected, atol=1e-6), key
    assert state.prior.counts.sum() == n3 + n4


def test_fedgen_generator_term_lowers_loss_on_generated_samples(users):
    # a generator trained enough (here in one round: more steps, larger rate) to carry label information
    cfg = AlgorithmConfig(algorithm="fedgen", local_steps=10, generator_steps=200, generator_lr=1e-2)
    state = GlobalState(cfg, (1, 28, 28), 10, seed=0)
    run_round(state, users, list(range(10)), 0)  # round 0: plain training, then the generator is trained
    sampler = state.sampler()
    assert sampler is not None
    noise_rng = torch.Generator().manual_seed(123)
    labels = torch.arange(10).repeat(20)
    z = torch.from_numpy(sampler(sample_noise(len(labels), cfg.noise_dim, noise_rng).numpy(), labels.numpy()))

    def generated_loss(algorithm: str, seed: int) -> float:
        algo = AlgorithmConfig(algorithm=algorithm, local_steps=10)
        res = local_update(state.model, dict(state.state), users[5].train_x, users[5].train_y, algo, 1,
                           seed=seed, sampler=sampler if algorithm == "fedgen" else None,
                           label_prior=state.prior.probabilities())
        predictor = {k.removeprefix("predictor."): v for k, v in res.state.items() if is_predictor_key(k)}
        return float(F.cross_entropy(F.linear(z, predictor["weight"], predictor["bias"]), labels))

    # the median over five local-training seeds: with alpha = beta = 10 a single run can diverge
    seeds = range(7, 12)
    with_generator = float(np.median([generated_loss("fedgen", s) for s in seeds]))
    without = float(np.median([generated_loss("fedavg", s) for s in seeds]))
    assert with_generator < 0.8 * without, (with_generator, without)


def test_generator_training_lowers_the_teacher_loss():
    torch.manual_seed(0)
    cfg = AlgorithmConfig(generator_steps=1)
    model = build_model("cnn", (1, 28, 28), 10)
    predictors = [dict(build_model("cnn", (1, 28, 28), 10).state_dict()) for _ in range(3)]
    counts = np.array([[50, 0, 10, 0, 0, 5, 5, 5, 5, 5], [0, 40, 10, 0, 0, 5, 5, 5, 5, 5],
                       [0, 0, 10, 30, 20, 5, 5, 5, 5, 5]])
    generator = make_generator(10, 32, cfg, seed=0)
    optimizer = make_generator_optimizer(generator, AlgorithmConfig(generator_lr=1e-2))
    rng = torch.Generator().manual_seed(0)
    first = train_generator(generator, optimizer, model.predictor, predictors, counts, cfg, 0, rng)
    later = train_generator(generator, optimizer, model.predictor, predictors, counts,
                            AlgorithmConfig(generator_steps=200), 0, rng)
    assert later.teacher_loss < 0.5 * first.teacher_loss
    assert later.accuracy > 0.9
    assert not generator.training  # left in eval mode for sampling


def test_label_weights():
    w = label_weights(np.array([[3, 0, 1], [1, 0, 1]]))
    assert np.allclose(w, [[0.75, 0, 0.5], [0.25, 0, 0.5]])


def test_fedprox_stays_closer_to_the_global_model(users):
    base = GlobalState(AlgorithmConfig(algorithm="fedavg"), (1, 28, 28), 10, seed=0).state

    def distance(algorithm: str) -> float:
        cfg = AlgorithmConfig(algorithm=algorithm, local_steps=20, prox_mu=1.0, learning_rate=0.05)
        res = local_update(build_model("cnn", (1, 28, 28), 10), dict(base), users[0].train_x, users[0].train_y,
                           cfg, 0, seed=1)
        return sum(float(((res.state[k] - base[k]) ** 2).sum()) for k in res.upload)

    assert distance("fedprox") < distance("fedavg")


def test_fedgen_without_a_generator_after_round_zero_trains_as_fedavg(users):
    """A device that refused the generator trains without it that round (the objective is FedAvg's)."""
    model = build_model("cnn", (1, 28, 28), 10)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fedgen = local_update(model, start, users[0].train_x, users[0].train_y, AlgorithmConfig(algorithm="fedgen"),
                          1, seed=0)
    fedavg = local_update(model, start, users[0].train_x, users[0].train_y, AlgorithmConfig(algorithm="fedavg"),
                          1, seed=0)
    assert all(torch.equal(fedgen.state[k], fedavg.state[k]) for k in start)


def test_a_generator_step_that_goes_non_finite_is_undone(users):
    """Predictors that make the generator's loss non-finite (uploads are refused beyond +-1e6, so this is a
    guard, reached here by giving the state an infinite predictor directly): the server keeps its last good
    generator rather than publishing a broken one."""
    cfg = AlgorithmConfig(algorithm="fedgen", local_steps=2)
    state = GlobalState(cfg, (1, 28, 28), 10, seed=0)
    before = {k: v.clone() for k, v in state.generator.state_dict().items()}
    acc = RoundAccumulator()
    extreme = {k: torch.full_like(v, float("inf")) if is_predictor_key(k) else v
               for k, v in state.shared_state().items()}
    acc.add(extreme, 10, np.full(10, 1))
    stats = state.close_round(acc, 0)
    assert np.isnan(stats.teacher_loss) and not state.generator_trained
    assert all(torch.equal(v, before[k]) for k, v in state.generator.state_dict().items())
