"""Devices with different models (issue #12, section 4): FedGen vs FedAvg, both sharing only theta^p.

    python bench/heterogeneous.py --data-dir ../shared/data --workers 2 [--rounds 100] [--seeds 0 1 2]

A *mixed* fleet runs the four shipped models round-robin over its users (user 0 cnn-small, 1 cnn, 2 cnn-wide,
3 mlp, 4 cnn-small, ...: `shared.algorithm.federation.model_of_user`), all with one latent space, one theta^p
and one generator; each *alone* fleet runs one model on every user. Protocol otherwise as the paper table's
(MNIST, 20 users, 10 active per round, T = 20, B = 32, partial sharing), alpha in {0.1, 1}, seeds 0-2.

Reported per model type: the final-round accuracy (sum correct / sum tested, each user's own model: its theta^f,
the global theta^p) of the users running that model in the mixed fleet, beside the same users' accuracy in the
fleet where everybody runs that model, so both columns are measured on the same test images. Runs are written
to bench/results/heterogeneous_runs/ as they finish (found runs are reused: an interrupted benchmark resumes),
then bench/results/heterogeneous.md from every run found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.algorithm.config import AlgorithmConfig  # noqa: E402
from shared.algorithm.federation import model_of_user  # noqa: E402
from shared.data.partition import PartitionSpec  # noqa: E402
from shared.simulation import SimulationConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MIXED = ("cnn-small", "cnn", "cnn-wide", "mlp")
FLEETS = {"mixed": MIXED, **{name: (name,) for name in MIXED}}
ALGORITHMS = ("fedgen", "fedavg")
ALPHAS = (0.1, 1.0)
USERS = 20


def run_name(fleet: str, algorithm: str, alpha: float, seed: int) -> str:
    return f"{fleet}-{algorithm}-alpha{alpha:g}-seed{seed}.json"


def algorithm_config(fleet: str, algorithm: str) -> AlgorithmConfig:
    models = FLEETS[fleet]
    return AlgorithmConfig(algorithm=algorithm, partial=True, model=models[0], models=models, local_steps=20,
                           batch_size=32)


def run_one(job: tuple[str, str, float, int, int, str | None, str]) -> str:
    """One (fleet, algorithm, alpha, seed) in a worker process with one torch thread."""
    fleet, algorithm, alpha, seed, rounds, data_dir, out_dir = job
    import torch

    from shared.simulation import run_simulation, write_run

    torch.set_num_threads(1)
    cfg = SimulationConfig(dataset="mnist", data_dir=data_dir, rounds=rounds, active=10, seed=seed,
                           partition=PartitionSpec(users=USERS, alpha=alpha, seed=seed),
                           algorithm=algorithm_config(fleet, algorithm))
    run = run_simulation(cfg, progress=False)
    path = Path(out_dir) / run_name(fleet, algorithm, alpha, seed)
    write_run(run, path)
    print(f"{path.name}: final {run['final_accuracy']:.4f} ({run['seconds']:.0f} s)", flush=True)
    return str(path)


def users_accuracy(run: dict, users: list[int]) -> float:
    """The final-round accuracy of `users` (sum correct / sum tested) from a run's final_user_results."""
    results = [run["final_user_results"][str(u)] for u in users if str(u) in run["final_user_results"]]
    tested = sum(r[1] for r in results)
    return sum(r[0] for r in results) / tested if tested else float("nan")


def _mean_std(values: list[float]) -> str:
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.2f} ± {arr.std(ddof=0):.2f}" if len(arr) else "n/a"


def _load(runs_dir: Path, fleet: str, algorithm: str, alpha: float, seeds: list[int], rounds: int) -> list[dict]:
    found = [json.loads(p.read_text()) for s in seeds
             if (p := runs_dir / run_name(fleet, algorithm, alpha, s)).exists()]
    return [r for r in found if len(r["rounds"]) == rounds]


def report(runs_dir: Path, seeds: list[int], rounds: int, machine: str) -> list[str]:
    mixed_cfg = algorithm_config("mixed", "fedgen")
    lines = ["# Devices with different models", "",
             f"`python bench/heterogeneous.py --rounds {rounds}` on {machine}. MNIST, {USERS} users, 10 active per "
             f"round, T = 20, B = 32, {rounds} rounds, partial sharing (each device keeps its theta^f, only theta^p "
             "travels), seeds " + ", ".join(map(str, seeds)) + ". The mixed fleet runs "
             + ", ".join(MIXED) + " round-robin over the users (5 users each); an alone fleet runs one model on all "
             "20. Final-round accuracy in %, mean ± std over seeds, of the users that run the model in the mixed "
             "fleet (the same users and test images in both columns; each seed draws its own partition, so the std "
             "includes the partition's variance).", ""]
    gains, costs = [], []
    for alpha in ALPHAS:
        lines += [f"## alpha = {alpha:g}", "",
                  "| model | FedGen mixed | FedGen alone | FedAvg mixed | FedAvg alone | FedGen - FedAvg (mixed) "
                  "| mixed - alone (FedGen) |", "|---|---|---|---|---|---|---|"]
        for name in MIXED:
            users = [u for u in range(USERS) if model_of_user(mixed_cfg, u) == name]
            cells, acc = [], {}
            for algorithm in ALGORITHMS:
                for fleet in ("mixed", name):
                    acc[algorithm, fleet] = {r["config"]["seed"]: users_accuracy(r, users)
                                             for r in _load(runs_dir, fleet, algorithm, alpha, seeds, rounds)}
                    cells.append(f"{_mean_std(list(acc[algorithm, fleet].values()))} ({len(acc[algorithm, fleet])})")
            gain = _paired(acc["fedgen", "mixed"], acc["fedavg", "mixed"])
            cost = _paired(acc["fedgen", "mixed"], acc["fedgen", name])
            gains += gain
            costs += cost
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_mean_std(gain)} | {_mean_std(cost)} |")
        whole = {a: [r["final_accuracy"] for r in _load(runs_dir, "mixed", a, alpha, seeds, rounds)]
                 for a in ALGORITHMS}
        lines += ["", f"Whole mixed fleet: FedGen {_mean_std(whole['fedgen'])}, FedAvg {_mean_std(whole['fedavg'])} "
                  "(runs per cell in parentheses above; differences are paired by seed).", ""]
    decays = sorted({r["config"]["algorithm"]["coefficient_decay"] for f in FLEETS for a in ALGORITHMS
                     for alpha in ALPHAS for r in _load(runs_dir, f, a, alpha, seeds, rounds)})
    if decays:
        lines += [f"FedGen's generator-term decay in these runs: {', '.join(map(str, decays))} (each run's config "
                  "records it; partial sharing's default became 0.99 after these runs, chosen on validation: "
                  "bench/results/selection.md).", ""]
    if gains and costs:
        wins = sum(g > 0 for g in gains)
        lines += ["## Summary", "",
                  f"On the mixed fleet FedGen beats FedAvg in {wins} of {len(gains)} (model, alpha, seed) cells, by "
                  f"{100 * min(gains):+.2f} to {100 * max(gains):+.2f} points, {100 * float(np.mean(gains)):+.2f} "
                  f"on average. A model's users in the mixed fleet against the same users in a fleet of that model "
                  f"alone (FedGen): {100 * float(np.mean(costs)):+.2f} points on average, from "
                  f"{100 * min(costs):+.2f} to {100 * max(costs):+.2f}; compare the stds over seeds above. "
                  f"{rounds} rounds, not the paper table's 200: the figures are below that table's.", ""]
    return lines


def _paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a - b for every seed both have."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDGEN_DATA_DIR"))
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from saved runs")
    args = parser.parse_args()
    runs_dir = args.out / "heterogeneous_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(f, a, alpha, s, args.rounds, args.data_dir, str(runs_dir)) for s in args.seeds for alpha in ALPHAS
            for f in FLEETS for a in ALGORITHMS if not (runs_dir / run_name(f, a, alpha, s)).exists()]
    if jobs and not args.report_only:
        started = time.time()
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            list(pool.map(run_one, jobs))
        print(f"{len(jobs)} runs in {time.time() - started:.0f} s")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.workers} worker processes, Python " \
              f"{platform.python_version()}"
    text = "\n".join(report(runs_dir, args.seeds, args.rounds, machine)) + "\n"
    (args.out / "heterogeneous.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
