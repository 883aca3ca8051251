"""The Dirichlet partitioner: sizes, disjointness, balanced per-user test splits, determinism."""

import msgspec
import numpy as np
import pytest

from shared.data.datasets import load_dataset
from shared.data.partition import (
    PartitionError,
    PartitionSpec,
    dirichlet_split,
    format_histogram,
    format_partition,
    label_histogram,
    partition,
    plot_histogram,
    split_test_sets,
)


@pytest.fixture(scope="module")
def subset():
    return load_dataset("mnist-subset")


@pytest.mark.parametrize("alpha", [0.05, 0.1, 1.0, 10.0])
def test_train_split_sizes_and_disjointness(subset, alpha):
    cfg = PartitionSpec(users=20, alpha=alpha, samples_per_class=500, min_samples=10, seed=3)
    parts = dirichlet_split(subset.train_y, 10, cfg, np.random.default_rng(cfg.seed))
    assert len(parts) == 20
    assert min(len(p) for p in parts) >= 10
    joined = np.concatenate(parts)
    assert len(joined) == 500 * 10 == len(np.unique(joined))  # every kept image dealt exactly once
    assert np.bincount(subset.train_y[joined]).tolist() == [500] * 10


def test_skew_follows_alpha(subset):
    def labels_per_user(alpha):
        users = partition(subset, PartitionSpec(alpha=alpha, samples_per_class=500, seed=0))
        return np.mean([(u.label_counts() > 0).sum() for u in users])

    assert labels_per_user(0.05) < labels_per_user(1.0) <= 10


def test_test_splits_are_disjoint_and_balanced_over_own_labels(subset):
    cfg = PartitionSpec(alpha=0.1, samples_per_class=500, seed=1)
    rng = np.random.default_rng(cfg.seed)
    train = dirichlet_split(subset.train_y, 10, cfg, rng)
    tests = split_test_sets(subset.test_y, [subset.train_y[i] for i in train], 10, rng)
    joined = np.concatenate(tests)
    assert len(joined) == len(np.unique(joined))
    for tr, te in zip(train, tests):
        own = set(np.unique(subset.train_y[tr]).tolist())
        counts = np.bincount(subset.test_y[te], minlength=10)
        assert set(np.flatnonzero(counts).tolist()) == own
        assert set(counts[list(own)].tolist()) == {300 // 20}  # the same number of test images per own label


def test_same_seed_same_partition_other_seed_differs(subset):
    cfg = PartitionSpec(alpha=0.1, samples_per_class=500, seed=7)
    a, b = partition(subset, cfg), partition(subset, cfg)
    for ua, ub in zip(a, b):
        np.testing.assert_array_equal(ua.train_y, ub.train_y)
        np.testing.assert_array_equal(ua.train_x, ub.train_x)
        np.testing.assert_array_equal(ua.test_y, ub.test_y)
    c = partition(subset, PartitionSpec(alpha=0.1, samples_per_class=500, seed=8))
    assert not np.array_equal(label_histogram(a), label_histogram(c))


def test_user_data_is_normalised_and_counts_sum(subset):
    users = partition(subset, PartitionSpec(alpha=0.5, samples_per_class=200, seed=0))
    for u in users:
        assert u.train_x.dtype == np.float32 and -1.0 <= u.train_x.min() and u.train_x.max() <= 1.0
        assert u.label_counts().sum() == u.num_samples == len(u.train_x)


def test_impossible_partitions_are_refused(subset):
    with pytest.raises(PartitionError, match="fewer than samples_per_class"):
        partition(subset, PartitionSpec(samples_per_class=5000))
    with pytest.raises(PartitionError, match="cannot give"):
        partition(subset, PartitionSpec(users=20, samples_per_class=5, min_samples=10))


def test_histogram_text_and_png(subset, tmp_path):
    hist = label_histogram(partition(subset, PartitionSpec(alpha=0.1, samples_per_class=500, seed=0)))
    text = format_histogram(hist)
    assert text.splitlines()[0].split()[0] == "user" and len(text.splitlines()) == 21
    assert hist.sum() == 5000
    plot_histogram(hist, str(tmp_path / "fig4.png"))
    assert (tmp_path / "fig4.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_split_is_held_out_of_training_and_leaves_the_rest_unchanged(subset):
    """val=0.2: each user's validation images are a seeded fifth (rounded down) of its own training images, held
    out of its training data; the test splits, and the training data with val=0, are exactly as without it."""
    from shared.data.partition import parse_partition, partition_indices

    base = PartitionSpec(users=8, alpha=0.1, samples_per_class=300, seed=5)
    plain_train, plain_test, plain_val = partition_indices(subset, base)
    assert plain_val == [None] * 8
    spec = PartitionSpec(users=8, alpha=0.1, samples_per_class=300, seed=5, validation=0.2)
    train, test, val = partition_indices(subset, spec)
    for k in range(8):
        assert np.array_equal(test[k], plain_test[k])
        assert len(val[k]) == int(0.2 * len(plain_train[k]))
        assert not set(val[k]) & set(train[k])
        assert np.array_equal(np.sort(np.concatenate([train[k], val[k]])), plain_train[k])
    again = partition_indices(subset, spec)[2]
    assert all(np.array_equal(a, b) for a, b in zip(val, again))  # seeded
    reseeded = partition_indices(subset, msgspec.structs.replace(spec, seed=6))
    assert not all(np.array_equal(a, b) for a, b in zip(reseeded[2], val))
    users = partition(subset, spec)
    assert [len(u.val_y) for u in users] == [len(v) for v in val]
    assert np.array_equal(users[0].val_y, subset.train_y[val[0]])
    assert users[0].label_counts().sum() == len(train[0])  # counts are the training images only
    assert users[0].val_x.dtype == np.float32 and users[0].val_x.min() >= -1
    text = format_partition(spec, index=3)
    parsed, index = parse_partition("mnist-subset:" + text.split(":", 1)[1])
    assert text.endswith(":val=0.2") and index == 3 and parsed.validation == 0.2 and parsed.seed == 5
    with pytest.raises(PartitionError, match="validation"):
        partition_indices(subset, PartitionSpec(users=8, alpha=0.1, samples_per_class=300, validation=0.9))
    with pytest.raises(ValueError, match="val="):
        parse_partition("mnist-subset:alpha=0.1:users=4:index=0:val=abc")


def test_a_spec_without_validation_encodes_as_before():
    """Devices and servers of before the validation split decode the specs of today (forbid_unknown_fields)."""
    assert "validation" not in msgspec.to_builtins(PartitionSpec(users=4))
    assert msgspec.to_builtins(PartitionSpec(users=4, validation=0.1))["validation"] == 0.1
