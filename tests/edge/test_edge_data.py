"""A device's own data: .npz files and image folders, with clear errors for wrong input."""

import numpy as np
import pytest
from PIL import Image

from edge_client.data import load_image_folder, load_npz
from shared.data.partition import format_partition, parse_partition


def test_npz_uint8_with_holdout(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    y = np.arange(50) % 10
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = load_npz(tmp_path / "d.npz", (1, 28, 28), 10, "dev")
    assert data.train_x.shape == (45, 1, 28, 28) and data.test_x.shape == (5, 1, 28, 28)
    assert data.train_x.dtype == np.float32 and -1 <= data.train_x.min() and data.train_x.max() <= 1
    assert sorted(np.concatenate([data.train_y, data.test_y]).tolist()) == sorted(y.tolist())
    assert data.seed_key == "dev"


def test_npz_with_its_own_test_split_and_bad_inputs(tmp_path):
    x = np.zeros((4, 1, 28, 28), np.float32)
    np.savez(tmp_path / "ok.npz", x=x, y=[0, 1, 2, 3], x_test=x[:2], y_test=[4, 5])
    assert load_npz(tmp_path / "ok.npz", (1, 28, 28), 10, "d").test_y.tolist() == [4, 5]
    np.savez(tmp_path / "labels.npz", x=x, y=[0, 1, 2, 10])
    with pytest.raises(ValueError, match="labels"):
        load_npz(tmp_path / "labels.npz", (1, 28, 28), 10, "d")
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 32, 32), np.uint8), y=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        load_npz(tmp_path / "shape.npz", (1, 28, 28), 10, "d")
    np.savez(tmp_path / "range.npz", x=x + 5, y=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="-1, 1"):
        load_npz(tmp_path / "range.npz", (1, 28, 28), 10, "d")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=[0, 1, 2, 3])
    with pytest.raises(ValueError):  # object arrays would need pickle: refused
        load_npz(tmp_path / "obj.npz", (1, 28, 28), 10, "d")


def test_image_folder(tmp_path):
    for label in (0, 3):
        (tmp_path / str(label)).mkdir()
        for i in range(5):
            Image.fromarray(np.full((30, 30), 40 * label, np.uint8)).save(tmp_path / str(label) / f"{i}.png")
    data = load_image_folder(tmp_path, (1, 28, 28), 10, "dev", test_fraction=0.2)
    assert len(data.train_y) == 8 and len(data.test_y) == 2
    assert set(np.concatenate([data.train_y, data.test_y]).tolist()) == {0, 3}
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="named 0..9"):
        load_image_folder(tmp_path, (1, 28, 28), 10, "dev")


def test_partition_spec_parsing():
    spec, index = parse_partition("mnist-subset:alpha=0.1:users=20:index=auto:spc=all")
    assert index is None and spec.samples_per_class is None and spec.users == 20
    assert "index" not in format_partition(spec)
    assert parse_partition(format_partition(spec, "auto")) == (spec, None)
    assert parse_partition("mnist:alpha=1:users=4:index=3:seed=7")[0].seed == 7
    for bad in ("mnist:alpha=1:users=4", "mnist:alpha=1:users=4:index=4", "mnist:colour=1:alpha=1:users=4:index=0",
                "cifar:alpha=1:users=4:index=0"):
        with pytest.raises(ValueError):
            parse_partition(bad)
