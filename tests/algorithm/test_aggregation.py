"""Sample-weighted aggregation, client selection and the label prior."""

import numpy as np
import pytest
import torch

from shared.algorithm.aggregate import (
    LabelPrior,
    RunningWeightedMean,
    SpilledUpdates,
    coordinate_median,
    median_of_columns,
    select_clients,
    trimmed_mean,
    trimmed_mean_of_columns,
    weighted_mean,
)
from shared.algorithm.federation import RoundAccumulator


def test_weighted_mean_against_hand_computed_values():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    out = weighted_mean([a, b], [10, 30])  # (10 * a + 30 * b) / 40
    assert torch.allclose(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(out["b"], torch.tensor([3.0]))
    assert out["w"].dtype == torch.float32


def test_streaming_equals_batch_and_is_order_insensitive():
    gen = torch.Generator().manual_seed(0)
    updates = [{"p": torch.randn(50, generator=gen)} for _ in range(7)]
    weights = [3, 10, 1, 7, 22, 5, 9]
    forward = weighted_mean(updates, weights)
    backward = weighted_mean(updates[::-1], weights[::-1])
    assert torch.equal(forward["p"], backward["p"])
    expected = sum(w * u["p"].double() for u, w in zip(updates, weights)) / sum(weights)
    assert torch.allclose(forward["p"].double(), expected, atol=1e-6)


def test_mismatched_or_empty_updates_refused():
    acc = RunningWeightedMean()
    with pytest.raises(ValueError, match="no updates"):
        acc.result()
    acc.add({"a": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="keys differ"):
        acc.add({"b": torch.zeros(1)}, 1)
    with pytest.raises(ValueError, match="> 0"):
        acc.add({"a": torch.zeros(1)}, 0)


def test_selection_is_seeded_uniform_and_order_free():
    clients = [f"dev-{i}" for i in range(20)]
    first = select_clients(clients, 10, run_seed=1, round_idx=3)
    assert first == select_clients(list(reversed(clients)), 10, run_seed=1, round_idx=3)
    assert len(set(first)) == 10 and set(first) <= set(clients)
    assert first != select_clients(clients, 10, run_seed=1, round_idx=4)
    assert first != select_clients(clients, 10, run_seed=1, round_idx=3, attempt=1)
    counts = {c: 0 for c in clients}
    for r in range(400):
        for c in select_clients(clients, 10, run_seed=0, round_idx=r):
            counts[c] += 1
    assert 150 < min(counts.values()) and max(counts.values()) < 250  # each expected 200 times
    with pytest.raises(ValueError):
        select_clients(clients, 21, 0, 0)


def test_label_prior_accumulates():
    prior = LabelPrior(3)
    assert np.allclose(prior.probabilities(), 1 / 3)
    prior.update(np.array([2, 0, 0]))
    prior.update(np.array([1, 1, 0]))
    assert np.allclose(prior.probabilities(), [0.75, 0.25, 0.0])


def test_capped_weights_by_hand():
    from shared.algorithm.aggregate import capped_weights

    assert capped_weights([1, 1, 1, 97], 0.5) == pytest.approx([50 / 3, 50 / 3, 50 / 3, 50])
    # 90 of 100 capped at 30; the other 70 shared 1:2:3:4
    assert capped_weights([1, 2, 3, 4, 90], 0.3) == pytest.approx([7, 14, 21, 28, 30])
    assert capped_weights([10, 20, 30], 0.5) == [10, 20, 30]  # nothing above the cap: unchanged
    assert capped_weights([5, 95], 0.4) == [50, 50]  # two weights cannot both be <= 40 %: equal
    with pytest.raises(ValueError):
        capped_weights([1, 2], 0)


def _accumulated(mode: str, updates: list[dict[str, torch.Tensor]], trim_ratio: float = 0.1) -> dict:
    acc = RoundAccumulator(mode=mode, trim_ratio=trim_ratio)
    for i, u in enumerate(updates):
        acc.add(u, num_samples=10, label_counts=np.ones(2, dtype=np.int64), client=f"c{i}")
    return acc.result()


def test_median_and_trimmed_mean_against_hand_computed_values():
    values = [[1.0, 10.0], [2.0, -5.0], [100.0, 0.0], [3.0, 1.0], [-50.0, 2.0]]
    updates = [{"w": torch.tensor(v), "s": torch.tensor(v[0])} for v in values]
    median = _accumulated("median", updates)
    assert median["w"].tolist() == [2.0, 1.0] and median["s"].item() == 2.0  # odd count: the middle value
    assert _accumulated("median", updates[:4])["w"].tolist() == [2.5, 0.5]  # even: mean of the middle two
    trimmed = _accumulated("trimmed_mean", updates, trim_ratio=0.2)  # drops one lowest and one highest
    assert trimmed["w"].tolist() == pytest.approx([(1 + 2 + 3) / 3, (0 + 1 + 2) / 3])
    assert median["w"].dtype == torch.float32


@pytest.mark.parametrize("clients", [7, 8])
def test_spilled_updates_reduced_in_chunks_equal_the_in_memory_rules(clients: int):
    """The round's updates live in a file and are reduced a few columns at a time (here 3 of 6 + 12 + 1):
    bit for bit the result of stacking them all in memory."""
    gen = torch.Generator().manual_seed(clients)
    updates = [{"conv": torch.randn(2, 3, generator=gen), "fc": torch.randn(12, generator=gen),
                "scale": torch.randn((), generator=gen)} for _ in range(clients)]
    for columns, in_memory in ((median_of_columns, coordinate_median(updates)),
                               (lambda x: trimmed_mean_of_columns(x, 0.25), trimmed_mean(updates, 0.25))):
        spilled = SpilledUpdates(chunk_bytes=8 * clients * 3)
        for i, u in enumerate(updates):
            spilled.add(u if i % 2 == 0 else dict(reversed(u.items())))  # key order varies as decoded
        out = spilled.reduce(columns)
        spilled.close()
        assert list(out) == ["conv", "fc", "scale"]
        for key, expected in in_memory.items():
            assert out[key].shape == expected.shape and out[key].dtype == expected.dtype
            assert torch.equal(out[key], expected), key


def test_spilled_updates_refuse_other_shapes_and_empty_rounds():
    spilled = SpilledUpdates()
    with pytest.raises(ValueError, match="no updates"):
        spilled.reduce(median_of_columns)
    spilled.add({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="differ"):
        spilled.add({"w": torch.zeros(4)})
    with pytest.raises(ValueError, match="differ"):
        spilled.add({"v": torch.zeros(3)})
    assert spilled.count == 1
    spilled.close()


def test_a_refused_update_leaves_the_round_as_it_was():
    """An update refused by the accumulator (its label counts of another length) changes nothing: the median,
    the clients and their theta^p are those of the others."""
    acc = RoundAccumulator(mode="median")
    good = [{"w": torch.tensor([float(i)]), "predictor.bias": torch.tensor([float(i)])} for i in range(3)]
    for i, u in enumerate(good[:2]):
        acc.add(u, num_samples=1, label_counts=np.ones(2, dtype=np.int64), client=f"c{i}")
    with pytest.raises(ValueError, match="shape"):
        acc.add({"w": torch.tensor([100.0]), "predictor.bias": torch.tensor([100.0])}, num_samples=1,
                label_counts=np.ones(3, dtype=np.int64), client="bad")
    acc.add(good[2], num_samples=1, label_counts=np.ones(2, dtype=np.int64), client="c2")
    assert acc.clients == ["c0", "c1", "c2"] and acc.uploads.count == 3
    assert acc.result()["w"].tolist() == [1.0]
    assert acc.predictor_vectors(["c2"]).tolist() == [[2.0]]


def test_a_failed_write_of_a_spilled_update_does_not_shift_the_others(monkeypatch):
    """A disk that fails one write (ENOSPC) refuses that update alone; the rows written after it are read back
    where they belong."""
    import errno

    from shared.algorithm import aggregate

    spilled = SpilledUpdates()
    real_pwrite, calls = aggregate.os.pwrite, []

    def flaky(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            real_pwrite(fd, data[:5], offset)  # half a row reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(aggregate.os, "pwrite", flaky)
    spilled.add({"w": torch.full((4,), 1.0)})
    with pytest.raises(OSError):
        spilled.add({"w": torch.full((4,), 50.0)})
    for value in (2.0, 3.0):
        spilled.add({"w": torch.full((4,), value)})
    assert spilled.count == 3
    assert spilled.reduce(median_of_columns)["w"].tolist() == [2.0] * 4
    spilled.close()  # empty again
    with pytest.raises(ValueError, match="no updates"):
        spilled.reduce(median_of_columns)
