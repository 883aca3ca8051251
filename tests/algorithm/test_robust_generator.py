"""With a robust aggregation (median, trimmed_mean) a client cannot buy influence over FedGen's generator or the
label prior by claiming huge label counts or uploading an extreme predictor. Expected values by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.algorithm.aggregate import outlying, robust_label_counts
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.distill import label_weights
from shared.algorithm.federation import GlobalState, RoundAccumulator


def test_label_weights_from_proportions_ignore_the_claimed_total():
    counts = np.array([[1_000_000, 0], [10, 10]])
    assert label_weights(counts)[:, 0] == pytest.approx([1_000_000 / 1_000_010, 10 / 1_000_010])
    # proportions: [1, 0] and [0.5, 0.5]; label 0: 1 / 1.5 and 0.5 / 1.5; label 1: only the second client
    assert label_weights(counts, proportions=True).ravel() == pytest.approx([2 / 3, 0.0, 1 / 3, 1.0])
    assert label_weights(np.array([[0, 0], [3, 1]]), proportions=True).tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_outlying_predictors_and_non_finite_ones_are_flagged():
    near = [torch.tensor([1.0, 2.0]), torch.tensor([1.1, 2.0]), torch.tensor([0.9, 2.1]), torch.tensor([1.0, 1.9])]
    far = torch.tensor([100.0, -50.0])
    assert outlying([*near, far]) == [False, False, False, False, True]
    assert outlying([*near, torch.tensor([float("nan"), 0.0])]) == [False] * 4 + [True]
    assert outlying(near[:2]) == [False, False]  # too few to tell an outlier


def test_robust_label_counts_scale_each_client_to_the_median_total():
    rows = robust_label_counts([np.array([10, 10]), np.array([1000, 0]), np.array([5, 15]), np.array([0, 0])])
    assert [r.tolist() for r in rows] == [[10, 10], [20, 0], [5, 15], [0, 0]]


def _accumulator(mode: str, clients: dict[str, tuple[float, list[int]]], state: GlobalState) -> RoundAccumulator:
    acc = RoundAccumulator(mode=mode)
    for client, (scale, counts) in clients.items():
        upload = {k: v * scale for k, v in state.shared_state().items()}
        acc.add(upload, sum(counts), np.array(counts), client=client)
    return acc


def test_a_poisoned_client_teaches_the_robust_generator_nothing():
    cfg = AlgorithmConfig(algorithm="fedgen", model="mlp", generator_steps=3)
    honest = {f"h{i}": (1.0 + 0.01 * i, [30, 20] + [0] * 8) for i in range(4)}
    poisoned = {**honest, "evil": (500.0, [0] * 9 + [10**9])}

    def closed(mode: str, clients: dict) -> GlobalState:
        state = GlobalState(cfg, (1, 28, 28), 10, seed=4)
        state.close_round(_accumulator(mode, clients, state), 0)
        return state

    clean, attacked = closed("trimmed_mean", honest), closed("trimmed_mean", poisoned)
    for name, value in clean.generator.state_dict().items():  # the same generator, as if evil were absent
        assert torch.equal(value, attacked.generator.state_dict()[name]), name
    assert attacked.prior.probabilities()[9] == pytest.approx(50 / 250)  # evil counts as a median client: 50 of 250
    naive = closed("mean", poisoned)
    assert naive.prior.probabilities()[9] > 0.99  # without a robust mode, its claim owns the prior
