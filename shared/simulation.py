"""`fedgen simulate`: the reference simulation, every client in this process, same algorithm code as the fleet."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
import torch
from tqdm import tqdm

from shared.algorithm.aggregate import select_clients
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.federation import GlobalState, RoundAccumulator, client_start_state, model_of_user
from shared.algorithm.local import EvalResult, class_correct, evaluate, local_update
from shared.algorithm.schedule import round_seed
from shared.data.datasets import load_dataset
from shared.data.partition import PartitionSpec, UserData, partition
from shared.protocol.tensors import encode_tensors


@dataclass(frozen=True)
class SimulationConfig:
    dataset: str = "mnist"
    data_dir: str | None = None
    rounds: int = 200
    active: int = 10
    seed: int = 0
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    aggregation: str = "mean"  # mean | median | trimmed_mean (the fleet's JobConfig.aggregation)
    trim_ratio: float = 0.1
    # robustness experiments: these users are attackers; each uploads its update's weights times
    # -poison_scale and claims POISON_COUNT samples of its rarest label
    poisoned: tuple[int, ...] = ()
    poison_scale: float = 100.0

    def to_dict(self) -> dict:
        """The experiment (where the files are is not part of it)."""
        out = {"dataset": self.dataset, "rounds": self.rounds, "active": self.active, "seed": self.seed,
               "partition": msgspec.to_builtins(self.partition), "algorithm": self.algorithm.to_dict(),
               "aggregation": self.aggregation}
        if self.aggregation == "trimmed_mean":
            out["trim_ratio"] = self.trim_ratio
        if self.poisoned:
            out["poisoned"] = list(self.poisoned)
            out["poison_scale"] = self.poison_scale
        return out


POISON_COUNT = 10**6


def poison(upload: dict[str, torch.Tensor], label_counts: np.ndarray, scale: float
           ) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """What an attacking user sends instead of its update: the weights times -scale, and a claim of
    POISON_COUNT samples of the label it holds least (to own that label's teacher weight and the prior)."""
    counts = np.zeros_like(label_counts)
    counts[int(np.argmin(label_counts))] = POISON_COUNT
    return {k: -scale * v for k, v in upload.items()}, counts


def download_bytes(state: GlobalState) -> int:
    """Bytes one selected client downloads: the shared model, plus generator and p_hat(y) once trained
    (as safetensors; the fleet counts its real ONNX and delta sizes instead)."""
    size = len(encode_tensors(state.shared_state()))
    if state.generator is not None and state.generator_trained:
        payload = dict(state.generator.state_dict())
        payload["label_prior"] = torch.as_tensor(state.prior.probabilities(), dtype=torch.float32)
        size += len(encode_tensors(payload))
    return size


BEST5_KEY = "best5_mean_accuracy"  # the mean accuracy of the 5 best rounds (not top-5 classification accuracy)
LEGACY_BEST5_KEY = "top5_accuracy"  # its name in run files written before 2026-12


def best5_mean_accuracy(run: dict) -> float | None:
    """A run file's mean accuracy of its 5 best rounds, under its current or its old name."""
    value = run.get(BEST5_KEY, run.get(LEGACY_BEST5_KEY))
    return None if value is None else float(value)


def top_k_mean(values: list[float], k: int = 5) -> float:
    """Mean of the k best values: the reference's 'top-5 rounds' accuracy."""
    best = sorted(values, reverse=True)[:k]
    return float(np.mean(best)) if best else float("nan")


def evaluate_round(state: GlobalState, users: list[UserData], own_states: dict[int, dict],
                   pooled: tuple[np.ndarray, np.ndarray], split: str = "test") -> EvalResult:
    """Accuracy as docs/algorithm.md defines it: sum correct / sum tested over every user's test split.

    Full sharing: the global model (one model, so the users' splits are pooled). Partial sharing: each user's
    own model, its theta^f with the global theta^p. `pooled`: every user's `split` ("test" or "val")
    concatenated.
    """
    if not state.cfg.partial:
        return evaluate(state.model, state.state, *pooled)
    total = EvalResult(0, 0, 0.0)
    for result in evaluate_users(state, users, own_states, split).values():
        total = total + result
    return total


def evaluate_users(state: GlobalState, users: list[UserData], own_states: dict[int, dict],
                   split: str = "test") -> dict[int, EvalResult]:
    """Partial sharing: each user's own model (its model, its theta^f, the global theta^p) on its `split`."""
    results = {}
    for user in users:
        x, y = (user.test_x, user.test_y) if split == "test" else (user.val_x, user.val_y)
        if not len(y):
            continue
        name = model_of_user(state.cfg, user.user)
        model_state = client_start_state(state.model_state(name), own_states.get(user.user), partial=True)
        results[user.user] = evaluate(state.models[name], model_state, x, y)
    return results


def accuracy_by_model(cfg: AlgorithmConfig, per_user: dict[int, EvalResult]) -> dict[str, float]:
    """Heterogeneous devices: the accuracy of each model's users (sum correct / sum tested), from
    `evaluate_users`."""
    totals: dict[str, EvalResult] = {}
    for user, result in per_user.items():
        name = model_of_user(cfg, user)
        totals[name] = totals.get(name, EvalResult(0, 0, 0.0)) + result
    return {name: totals[name].accuracy for name in cfg.allowed_models if name in totals}


def balanced_val_accuracy(state: GlobalState, users: list[UserData], own_states: dict[int, dict]) -> float:
    """Validation accuracy weighted as the test split is: a user's test split holds an equal chunk of each of
    its own classes, whatever its training share of them, while its validation split follows its training
    distribution. So: the mean, over every (user, class) pair with validation images, of that user's
    accuracy on that class (each user's own model in partial mode, the global one otherwise). Classes a user
    has too few images of to validate on are missing, so this still leans optimistic (docs/algorithm.md)."""
    accuracies = []
    for user in users:
        if user.val_y is None or not len(user.val_y):
            continue
        name = model_of_user(state.cfg, user.user)
        model_state = client_start_state(state.model_state(name), own_states.get(user.user), state.cfg.partial)
        correct, count = class_correct(state.models[name], model_state, user.val_x, user.val_y, state.num_classes)
        accuracies += [c / n for c, n in zip(correct, count) if n]
    return float(np.mean(accuracies)) if accuracies else math.nan


def _pooled(users: list[UserData], split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Every user's `split` ("test" or "val") concatenated; None when the users have no validation split."""
    if split == "val" and any(u.val_y is None for u in users):
        return None
    xs = [u.test_x if split == "test" else u.val_x for u in users]
    ys = [u.test_y if split == "test" else u.val_y for u in users]
    return np.concatenate(xs), np.concatenate(ys)


def run_simulation(cfg: SimulationConfig, progress: bool = True, users: list[UserData] | None = None) -> dict:
    """Run `cfg.rounds` rounds and return the run.json document."""
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    if users is None:
        users = partition(dataset, cfg.partition.resolve(dataset.info.name, cfg.seed))
    if cfg.active > len(users):
        raise ValueError(f"active={cfg.active} exceeds users={len(users)}")
    algo = cfg.algorithm
    state = GlobalState(algo, dataset.info.image_shape, dataset.info.num_classes, cfg.seed)
    own_states: dict[int, dict] = {}
    pooled_test, pooled_val = _pooled(users, "test"), _pooled(users, "val")
    rounds = []
    started = time.perf_counter()
    bar = tqdm(range(cfg.rounds), desc=f"{algo.algorithm}{' partial' if algo.partial else ''}",
               disable=not progress, unit="round")
    for r in bar:
        selected = select_clients([u.user for u in users], cfg.active, cfg.seed, r)
        bytes_down = download_bytes(state) * len(selected)
        sampler, prior = state.sampler(), state.prior.probabilities()
        acc, bytes_up, train_losses = RoundAccumulator(cfg.aggregation, cfg.trim_ratio), 0, []
        for k in selected:
            user, name = users[k], model_of_user(algo, k)
            start = client_start_state(state.model_state(name), own_states.get(k), algo.partial)
            result = local_update(state.models[name], start, user.train_x, user.train_y, algo, r,
                                  round_seed(cfg.seed, r, k), sampler, prior)
            if algo.partial:
                own_states[k] = result.state
            upload, counts, num = result.upload, result.label_counts, result.num_samples
            if k in cfg.poisoned:
                upload, counts = poison(upload, counts, cfg.poison_scale)
                num = POISON_COUNT
            acc.add(upload, num, counts, client=k)
            bytes_up += len(encode_tensors(result.upload))
            train_losses.append(result.train_loss)
        gen_stats = state.close_round(acc, r)
        if len(algo.allowed_models) > 1:
            per_user = evaluate_users(state, users, own_states)
            ev = sum(per_user.values(), EvalResult(0, 0, 0.0))
        else:
            ev = evaluate_round(state, users, own_states, pooled_test)
        record = {"round": r, "accuracy": ev.accuracy, "loss": ev.loss_sum / max(1, ev.count),
                  "bytes_up": bytes_up, "bytes_down": bytes_down, "train_loss": float(np.mean(train_losses)),
                  "selected": [int(k) for k in selected]}
        if len(algo.allowed_models) > 1:
            record["accuracy_by_model"] = accuracy_by_model(algo, per_user)
        if pooled_val is not None:  # the split decisions are made on (docs/algorithm.md)
            record["val_accuracy"] = evaluate_round(state, users, own_states, pooled_val, "val").accuracy
            record["val_balanced_accuracy"] = balanced_val_accuracy(state, users, own_states)
        if gen_stats is not None:
            record["generator_loss"] = gen_stats.teacher_loss
            record["diversity_loss"] = gen_stats.diversity_loss
        rounds.append(record)
        bar.set_postfix(acc=f"{ev.accuracy:.4f}")
    accuracies = [r["accuracy"] for r in rounds]
    run = {
        "config": cfg.to_dict(),
        "rounds": rounds,
        "final_accuracy": accuracies[-1] if accuracies else math.nan,
        BEST5_KEY: top_k_mean(accuracies, 5),
        "seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }
    if rounds and "accuracy_by_model" in rounds[-1]:
        run["final_accuracy_by_model"] = rounds[-1]["accuracy_by_model"]
    if algo.partial and rounds:  # each user's own model after the last round: [correct, tested]
        run["final_user_results"] = {str(u): [res.correct, res.count]
                                     for u, res in evaluate_users(state, users, own_states).items()}
    if pooled_val is not None:
        val = [r["val_accuracy"] for r in rounds]
        run["final_val_accuracy"] = val[-1] if val else math.nan
        run[f"val_{BEST5_KEY}"] = top_k_mean(val, 5)
        run[f"val_balanced_{BEST5_KEY}"] = top_k_mean([r["val_balanced_accuracy"] for r in rounds], 5)
    return run


def write_run(run: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(run, indent=1))


def plot_curves(runs: dict[str, list[float]], path: str | Path, title: str = "") -> None:
    """Accuracy per round for each labelled curve (e.g. one per algorithm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, accuracies in runs.items():
        ax.plot(range(len(accuracies)), accuracies, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
