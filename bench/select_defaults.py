"""Choose defaults on a validation split, never on the test split (issue #12).

    python bench/select_defaults.py --data-dir ../shared/data --workers 2 [--decisions label_weighting ...]

Every decision is a set of candidate settings of the algorithm, run in the paper table's protocol (MNIST, 20
users, 10 active per round, T = 20, B = 32, 200 rounds, seeds 0-2) with a validation split of 10 % of each
user's training images (`PartitionSpec.validation`). The candidate with the highest mean validation accuracy
(mean of the 5 best rounds, the table's metric, over every alpha and seed of the decision) is chosen; test
accuracy is reported beside it for the record only. Runs are written to bench/results/selection_runs/ as they
finish (runs found there are reused, so an interrupted benchmark resumes), then bench/results/selection.md from
every run found.
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
from shared.data.partition import PartitionSpec  # noqa: E402
from shared.simulation import BEST5_KEY, SimulationConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VALIDATION = 0.1

# decision -> (algorithm, partial, alphas, {candidate name: AlgorithmConfig overrides}); the first candidate is
# the default before the decision
DECISIONS: dict[str, tuple[str, bool, tuple[float, ...], dict[str, dict]]] = {
    "label_weighting": ("fedgen", False, (0.1, 1.0), {
        "counts": {"label_weighting": "counts", "label_smoothing": 0.0},
        "proportions+1": {"label_weighting": "proportions", "label_smoothing": 1.0},
    }),
    "partial_coefficient_decay": ("fedgen", True, (0.1,), {
        "decay 0.98": {"coefficient_decay": 0.98},
        "decay 0.99": {"coefficient_decay": 0.99},
        "decay 1.0": {"coefficient_decay": 1.0},
    }),
    "prox_mu": ("fedprox", False, (0.1,), {
        "mu 1": {"prox_mu": 1.0},
        "mu 0.1": {"prox_mu": 0.1},
        "mu 0.01": {"prox_mu": 0.01},
    }),
}


# the validation figure a decision is made on: the plain one (validation images pooled), or, for partial
# sharing, the class-balanced one (shared.simulation.balanced_val_accuracy), which weighs a user's classes as
# its test split does; a personalised model's plain validation accuracy (~97 %) says little of its test one
METRIC = {"partial_coefficient_decay": f"val_balanced_{BEST5_KEY}"}


def metric_of(decision: str) -> str:
    return METRIC.get(decision, f"val_{BEST5_KEY}")


def run_name(decision: str, candidate: str, alpha: float, seed: int) -> str:
    return f"{decision}-{candidate.replace(' ', '').replace('+', 'p')}-alpha{alpha:g}-seed{seed}.json"


def run_one(job: tuple[str, str, float, int, int, str | None, str]) -> str:
    """One (decision, candidate, alpha, seed) in a worker process with one torch thread."""
    decision, candidate, alpha, seed, rounds, data_dir, out_dir = job
    import torch

    from shared.simulation import run_simulation, write_run

    torch.set_num_threads(1)
    algo, partial, _, candidates = DECISIONS[decision]
    cfg = SimulationConfig(
        dataset="mnist", data_dir=data_dir, rounds=rounds, active=10, seed=seed,
        partition=PartitionSpec(users=20, alpha=alpha, seed=seed, validation=VALIDATION),
        algorithm=AlgorithmConfig(algorithm=algo, partial=partial, local_steps=20, batch_size=32,
                                  **candidates[candidate]),
    )
    run = run_simulation(cfg, progress=False)
    path = Path(out_dir) / run_name(decision, candidate, alpha, seed)
    write_run(run, path)
    print(f"{path.name}: val {run[metric_of(decision)]:.4f} test {run[BEST5_KEY]:.4f} ({run['seconds']:.0f} s)",
          flush=True)
    return str(path)


def _mean_std(values: list[float]) -> str:
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.2f} ± {arr.std(ddof=0):.2f}" if len(arr) else "n/a"


def report(runs_dir: Path, decisions: list[str], seeds: list[int], rounds: int, machine: str) -> list[str]:
    lines = ["# Defaults chosen on a validation split", "",
             f"`python bench/select_defaults.py` on {machine}. MNIST, 20 users (Dirichlet alpha as given), 10 active, "
             f"T = 20, B = 32, {rounds} rounds, seeds {', '.join(map(str, seeds))}; each user's validation split is "
             f"{VALIDATION:.0%} of its training images (held out of training). Accuracy: mean of the 5 best rounds, "
             "in %, mean ± std over seeds (the std includes the partition's variance: each seed draws its own "
             "partition). The choice is the highest mean validation accuracy over every run of a candidate; the test "
             "column is for the record and played no part in it.", ""]
    for decision in decisions:
        algo, partial, alphas, candidates = DECISIONS[decision]
        metric = metric_of(decision)
        balanced = metric.startswith("val_balanced")
        lines += [f"## {decision} ({algo}{', partial sharing' if partial else ''})", ""]
        if balanced:
            lines += ["Chosen on the class-balanced validation accuracy (each (user, class) pair with validation "
                      "images weighs alike, as a user's test split weighs its own classes); the plain pooled "
                      "validation accuracy is shown beside it.", ""]
        lines += ["| alpha | candidate | seeds | validation | " + ("plain validation | " if balanced else "")
                  + "test |", "|---|---|---|---|---|" + ("---|" if balanced else "")]
        pooled: dict[str, list[float]] = {name: [] for name in candidates}
        complete = True
        for alpha in alphas:
            for name in candidates:
                found = [json.loads(p.read_text()) for s in seeds
                         if (p := runs_dir / run_name(decision, name, alpha, s)).exists()]
                found = [r for r in found if len(r["rounds"]) == rounds and metric in r]
                val, test = [r[metric] for r in found], [r[BEST5_KEY] for r in found]
                plain = f" {_mean_std([r[f'val_{BEST5_KEY}'] for r in found])} |" if balanced else ""
                pooled[name] += val
                complete = complete and len(found) == len(seeds)
                lines.append(f"| {alpha:g} | {name} | {len(val)} | {_mean_std(val)} |{plain} {_mean_std(test)} |")
        lines.append("")
        if complete:  # the rule: the highest mean validation accuracy over every (alpha, seed) of the decision
            means = {name: 100 * float(np.mean(v)) for name, v in pooled.items()}
            best = max(means, key=means.get)
            lines += [f"Mean validation accuracy over all {len(alphas) * len(seeds)} runs of each candidate: "
                      + ", ".join(f"{n} {m:.3f}" for n, m in means.items()) + f". Chosen: **{best}**.", ""]
        else:
            lines += ["Not every run is there yet: no choice.", ""]
    return lines


def _usable(path: Path, decision: str, rounds: int) -> bool:
    """A saved run that need not run again: complete, and holding the decision's metric."""
    if not path.exists():
        return False
    run = json.loads(path.read_text())
    return len(run["rounds"]) == rounds and metric_of(decision) in run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDGEN_DATA_DIR"))
    parser.add_argument("--decisions", nargs="+", choices=sorted(DECISIONS), default=list(DECISIONS))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from saved runs")
    args = parser.parse_args()
    runs_dir = args.out / "selection_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(d, c, a, s, args.rounds, args.data_dir, str(runs_dir)) for d in args.decisions for s in args.seeds
            for a in DECISIONS[d][2] for c in DECISIONS[d][3]
            if not _usable(runs_dir / run_name(d, c, a, s), d, args.rounds)]
    jobs.sort(key=lambda j: (not DECISIONS[j[0]][1], DECISIONS[j[0]][0] != "fedgen"))  # slowest first
    if jobs and not args.report_only:
        started = time.time()
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            list(pool.map(run_one, jobs))
        print(f"{len(jobs)} runs in {time.time() - started:.0f} s")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.workers} worker processes, Python " \
              f"{platform.python_version()}"
    text = "\n".join(report(runs_dir, args.decisions, args.seeds, args.rounds, machine)) + "\n"
    (args.out / "selection.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
