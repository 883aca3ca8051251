"""End-to-end in-process simulation on the shipped MNIST subset, and the `fedgen` CLI."""

import dataclasses
import json
import subprocess
import sys

import pytest

from shared.algorithm.config import AlgorithmConfig
from shared.data.partition import PartitionSpec
from shared.simulation import SimulationConfig, best5_mean_accuracy, run_simulation


def small(algorithm: str, partial: bool = False, rounds: int = 12, seed: int = 0,
          local_steps: int = 20) -> SimulationConfig:
    return SimulationConfig(
        dataset="mnist-subset", rounds=rounds, active=5, seed=seed,
        partition=PartitionSpec(users=10, alpha=1.0, samples_per_class=300, seed=seed),
        algorithm=AlgorithmConfig(algorithm=algorithm, partial=partial, local_steps=local_steps),
    )


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedgen"])
def test_short_simulation_learns_well_above_chance(algorithm):
    run = run_simulation(small(algorithm), progress=False)
    accuracies = [r["accuracy"] for r in run["rounds"]]
    assert run["final_accuracy"] > 0.7, accuracies  # chance is 0.1
    assert accuracies[-1] > accuracies[0]
    best = sorted(accuracies)[-5:]  # by hand: the mean of the five best rounds
    assert run["best5_mean_accuracy"] == pytest.approx(sum(best) / len(best))
    assert best5_mean_accuracy({"top5_accuracy": 0.5}) == 0.5  # run files written under the old name


def test_same_seed_same_run_other_seed_differs():
    a = run_simulation(small("fedgen", rounds=2, local_steps=5), progress=False)
    b = run_simulation(small("fedgen", rounds=2, local_steps=5), progress=False)
    c = run_simulation(small("fedgen", rounds=2, seed=1, local_steps=5), progress=False)
    assert a["rounds"] == b["rounds"]
    assert [r["selected"] for r in a["rounds"]] != [r["selected"] for r in c["rounds"]]


def test_partial_sharing_moves_far_fewer_bytes():
    full = run_simulation(small("fedgen", rounds=2, local_steps=5), progress=False)
    part = run_simulation(small("fedgen", partial=True, rounds=2, local_steps=5), progress=False)
    # 5 clients x (330 predictor floats + safetensors header) up, vs 5 x the 26,434-parameter CNN and BN stats
    assert part["rounds"][1]["bytes_up"] < 5 * 2_000
    assert full["rounds"][1]["bytes_up"] > 5 * 26_434 * 4
    # the generator is downloaded from round 1 on, on top of the model
    assert full["rounds"][1]["bytes_down"] > full["rounds"][0]["bytes_down"]


@pytest.mark.parametrize("partial", [False, True])
def test_validation_split_is_evaluated_each_round_and_changes_nothing_when_off(partial):
    """With a validation split the run reports, each round, the accuracy on the users' validation images (the
    split decisions are made on), a real evaluation: well above chance and not the test figure; without one it
    has no such keys."""
    import msgspec

    cfg = small("fedavg", partial=partial, rounds=6, local_steps=10)
    with_val = msgspec.structs.replace(cfg.partition, validation=0.25)
    run = run_simulation(dataclasses.replace(cfg, partition=with_val), progress=False)
    plain = run_simulation(cfg, progress=False)
    assert "val_accuracy" not in plain["rounds"][0] and "final_val_accuracy" not in plain
    val = [r["val_accuracy"] for r in run["rounds"]]
    assert len(val) == 6 and run["final_val_accuracy"] == val[-1]
    assert all(0.1 < r["val_balanced_accuracy"] <= 1 for r in run["rounds"][1:])
    assert "val_balanced_best5_mean_accuracy" in run and "val_balanced_accuracy" not in plain["rounds"][0]
    assert val[-1] > 0.5 and val[-1] > val[0]  # chance is 0.1
    assert val != [r["accuracy"] for r in run["rounds"]]
    assert run["config"]["partition"]["validation"] == 0.25
    # the held-out images are not trained on: other training data, so other accuracies than without the split
    assert [r["accuracy"] for r in run["rounds"]] != [r["accuracy"] for r in plain["rounds"]]


def test_cli_writes_run_json_and_plot(tmp_path):
    out, plot = tmp_path / "run.json", tmp_path / "curve.png"
    cmd = [sys.executable, "-m", "server_api.cli", "simulate", "--algorithm", "fedgen", "--dataset", "mnist-subset",
           "--alpha", "1", "--users", "6", "--active", "3", "--rounds", "3", "--local-steps", "5",
           "--samples-per-class", "200", "--seed", "4", "--partial", "--quiet", "--out", str(out),
           "--plot", str(plot)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    run = json.loads(out.read_text())
    assert set(run) >= {"config", "rounds", "final_accuracy", "best5_mean_accuracy"}
    assert run["config"]["algorithm"]["partial"] is True and run["config"]["seed"] == 4
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
    for r in run["rounds"]:
        assert {"round", "accuracy", "loss", "bytes_up", "bytes_down"} <= set(r)
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    # the flags reach the run: the same experiment in this process gives the same accuracies
    same = run_simulation(SimulationConfig(
        dataset="mnist-subset", rounds=3, active=3, seed=4,
        partition=PartitionSpec(users=6, alpha=1.0, samples_per_class=200),
        algorithm=AlgorithmConfig(algorithm="fedgen", partial=True, local_steps=5)), progress=False)
    assert [r["accuracy"] for r in run["rounds"]] == pytest.approx([r["accuracy"] for r in same["rounds"]])
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_reports_bad_input_clearly(monkeypatch):
    monkeypatch.delenv("FEDGEN_DATA_DIR", raising=False)
    proc = subprocess.run([sys.executable, "-m", "server_api.cli", "partition", "--dataset", "mnist"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--data-dir" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "server_api.cli", "simulate", "--dataset", "mnist-subset",
                           "--samples-per-class", "5000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "samples_per_class" in proc.stderr


def test_cli_partition_prints_histogram(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "server_api.cli", "partition", "--dataset", "mnist-subset",
                           "--samples-per-class", "500", "--alpha", "0.1", "--png", str(tmp_path / "f.png")],
                          capture_output=True, text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0].split()[0] == "user" and len([ln for ln in lines if ln.strip()[:1].isdigit()]) == 20
    assert (tmp_path / "f.png").exists()


def test_balanced_validation_accuracy_weighs_each_users_class_alike():
    """The mean over (user, class) pairs of that user's accuracy on that class, computed here from each
    class's images alone: a user's rare class counts as much as its dominant one, as in its test split."""
    import numpy as np
    import torch

    from shared.algorithm.federation import GlobalState
    from shared.algorithm.local import evaluate
    from shared.data.datasets import load_dataset
    from shared.data.partition import partition
    from shared.simulation import balanced_val_accuracy

    spec = PartitionSpec(dataset="mnist-subset", users=4, alpha=0.3, samples_per_class=100, seed=2, validation=0.3)
    users = partition(load_dataset("mnist-subset"), spec.resolve("mnist-subset", 2))
    state = GlobalState(AlgorithmConfig(algorithm="fedavg", partial=True), (1, 28, 28), 10, seed=2)
    own = {0: {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v  # one user with its own theta^f
               for k, v in state.state.items()}}
    expected = []
    for user in users:
        model_state = dict(state.state) if user.user not in own else \
            {k: state.state[k] if k.startswith("predictor.") else own[user.user][k] for k in state.state}
        for c in np.unique(user.val_y):
            mask = user.val_y == c
            expected.append(evaluate(state.model, model_state, user.val_x[mask], user.val_y[mask]).accuracy)
    assert len(expected) > len(users)  # several classes per user
    assert balanced_val_accuracy(state, users, own) == pytest.approx(float(np.mean(expected)), abs=1e-12)
