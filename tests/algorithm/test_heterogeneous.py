"""Devices with different models (issue #12, section 4): the job's model list, the server state that serves
every model, and the simulation that assigns users to models."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from edge_client.client import device_config
from shared.algorithm.config import MODELS, AlgorithmConfig
from shared.algorithm.federation import GlobalState, model_of_user
from shared.algorithm.models import LATENT_DIM, build_model, count_parameters, is_predictor_key
from shared.data.partition import PartitionSpec
from shared.simulation import SimulationConfig, run_simulation

HET = {"algorithm": "fedgen", "partial": True, "models": ["cnn-small", "mlp"]}


def test_every_model_shares_the_latent_space_and_the_predictor() -> None:
    sizes = {}
    for name in MODELS:
        model = build_model(name, (1, 28, 28), 10)
        assert model.latent_dim == LATENT_DIM
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items() if is_predictor_key(k)} == \
            {"predictor.weight": (10, LATENT_DIM), "predictor.bias": (10,)}
        sizes[name] = count_parameters(model)
    assert sizes["cnn-small"] < sizes["cnn"] < sizes["cnn-wide"]  # the reference CNN sits between the two
    assert sizes["cnn"] == 26_434


def test_a_job_lists_the_models_it_allows() -> None:
    cfg = AlgorithmConfig.from_dict(HET)
    assert cfg.model == "cnn-small" and cfg.allowed_models == ("cnn-small", "mlp")  # model not named: the first
    named = AlgorithmConfig.from_dict({**HET, "model": "mlp"})
    assert named.model == "mlp" and named.allowed_models == ("mlp", "cnn-small")
    assert AlgorithmConfig().allowed_models == ("cnn",)
    assert "models" not in msgspec.json.decode(msgspec.json.encode(AlgorithmConfig()))  # one-model jobs as before
    again = AlgorithmConfig.from_dict(msgspec.to_builtins(named))
    assert again == named  # a stored config reads back the same
    for bad, match in [({**HET, "partial": False}, "needs partial"),
                       ({**HET, "models": []}, "distinct"),
                       ({**HET, "models": ["mlp", "mlp"]}, "distinct"),
                       ({**HET, "model": "cnn-wide"}, "not one of models"),
                       ({**HET, "models": ["resnet"]}, "Invalid enum value")]:
        with pytest.raises(ValueError, match=match):
            AlgorithmConfig.from_dict(bad)


def test_a_device_trains_the_one_model_it_runs() -> None:
    job = AlgorithmConfig.from_dict(HET)
    assert device_config(job, None) is job and device_config(job, "cnn-small") is job
    mine = device_config(job, "mlp")
    assert mine.model == "mlp" and mine.allowed_models == ("mlp",) and mine.partial
    assert {k: v for k, v in msgspec.to_builtins(mine).items() if k != "model"} == \
        {k: v for k, v in msgspec.to_builtins(job).items() if k not in ("model", "models")}
    with pytest.raises(ValueError, match="allows cnn-small, mlp"):
        device_config(job, "cnn-wide")
    with pytest.raises(ValueError, match="allows cnn"):
        device_config(AlgorithmConfig(), "mlp")


def test_the_server_state_serves_every_model() -> None:
    cfg = AlgorithmConfig.from_dict({**HET, "models": ["cnn", "cnn-wide", "mlp"]})
    state = GlobalState(cfg, (1, 28, 28), 10, seed=4)
    single = GlobalState(AlgorithmConfig(algorithm="fedgen", partial=True), (1, 28, 28), 10, seed=4)
    for k, v in single.state.items():  # the default model starts exactly as in a one-model job
        assert torch.equal(state.state[k], v), k
    assert state.shared_keys == ["predictor.weight", "predictor.bias"]
    state.state["predictor.bias"] = state.state["predictor.bias"] + 1.0  # as a round's aggregate would
    for name in cfg.allowed_models:
        start = state.model_state(name)
        build_model(name, (1, 28, 28), 10).load_state_dict(start)  # the architecture's own entries
        assert torch.equal(start["predictor.bias"], state.state["predictor.bias"])  # the one global theta^p
    wide = state.model_state("cnn-wide")
    assert wide["features.0.weight"].shape == (16, 1, 3, 3)
    assert not torch.equal(wide["features.7.weight"][:, :10], state.model_state("mlp")["features.3.weight"][:, :10])
    with pytest.raises(ValueError, match="not one of this job's models"):
        state.model_state("cnn-small")


def test_users_run_the_models_round_robin() -> None:
    cfg = AlgorithmConfig.from_dict({**HET, "models": ["cnn", "cnn-small", "mlp"]})
    assert [model_of_user(cfg, u) for u in range(7)] == ["cnn", "cnn-small", "mlp", "cnn", "cnn-small", "mlp",
                                                         "cnn"]
    assert {model_of_user(AlgorithmConfig(), u) for u in range(5)} == {"cnn"}


@pytest.mark.parametrize("algorithm", ["fedgen", "fedavg"])
def test_a_mixed_simulation_trains_every_model_on_one_predictor(algorithm: str) -> None:
    algo = AlgorithmConfig.from_dict({**HET, "algorithm": algorithm, "models": ["cnn-small", "cnn", "mlp"]})
    cfg = SimulationConfig(dataset="mnist-subset", rounds=4, active=6, seed=1, algorithm=algo,
                           partition=PartitionSpec(users=6, alpha=1.0, samples_per_class=100, seed=1))
    run = run_simulation(cfg, progress=False)
    per_model = [r["accuracy_by_model"] for r in run["rounds"]]
    assert all(set(m) == {"cnn-small", "cnn", "mlp"} for m in per_model)
    assert run["final_accuracy_by_model"] == per_model[-1]
    # the whole fleet's accuracy is the per-user results pooled
    results = run["final_user_results"]
    assert set(results) == {str(u) for u in range(6)}
    correct, tested = (sum(r[i] for r in results.values()) for i in (0, 1))
    assert run["final_accuracy"] == pytest.approx(correct / tested)
    by_model = {}
    for user, (c, n) in results.items():
        name = model_of_user(algo, int(user))
        by_model[name] = (by_model.get(name, (0, 0))[0] + c, by_model.get(name, (0, 0))[1] + n)
    assert {m: c / n for m, (c, n) in by_model.items()} == pytest.approx(run["final_accuracy_by_model"])
    assert min(run["final_accuracy_by_model"].values()) > 0.2, run["final_accuracy_by_model"]  # chance: 0.1
    again = run_simulation(cfg, progress=False)  # reproducible
    assert [r["accuracy"] for r in again["rounds"]] == [r["accuracy"] for r in run["rounds"]]
    assert np.isfinite([r["train_loss"] for r in run["rounds"]]).all()
