"""FedGen's accuracy when the generator's teacher term is estimated from M clients drawn per sample
(`generator_teacher_clients`) instead of summed over all K clients of the round, against the exact term and
FedAvg, paired by seed (same partition, initialisation and client selection).

    python bench/teacher_sampling.py --data-dir ../shared/data [--rounds 100] [--sample 2 5] [--workers 2]

The setting is the paper table's MNIST alpha = 0.1 (20 users, 10 active per round). With K = 10 clients a
round, M = 2 and 5 are harsher than M = 64 in a round of thousands: the estimate's variance depends on M and on
how much the drawn clients' predictors disagree, not on K. Runs go to bench/results/teacher_sampling_runs/
(reused when there, so an interrupted benchmark resumes); the report is bench/results/teacher_sampling.md.
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
from shared.simulation import SimulationConfig, best5_mean_accuracy  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ALPHA, USERS, ACTIVE = 0.1, 20, 10


def cell_name(algo: str, sample: int | None) -> str:
    return algo if sample is None else f"{algo}-drawn{sample}"


def run_one(job: tuple[str, int | None, int, int, str, str]) -> str:
    """One (cell, seed) in a worker process with one torch thread; returns the path written."""
    algo, sample, seed, rounds, data_dir, out_dir = job
    import torch

    from shared.simulation import run_simulation, write_run

    torch.set_num_threads(1)
    extra = {} if sample is None else {"generator_teacher_clients": sample}
    cfg = SimulationConfig(
        dataset="mnist", data_dir=data_dir, rounds=rounds, active=ACTIVE, seed=seed,
        partition=PartitionSpec(users=USERS, alpha=ALPHA, seed=seed),
        algorithm=AlgorithmConfig(algorithm=algo, local_steps=20, batch_size=32, **extra),
    )
    run = run_simulation(cfg, progress=False)
    path = Path(out_dir) / f"{cell_name(algo, sample)}-seed{seed}.json"
    write_run(run, path)
    print(f"{path.name}: final {run['final_accuracy']:.4f} ({run['seconds']:.0f} s)", flush=True)
    return str(path)


def mean_std(values: list[float]) -> str:
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.2f} ± {arr.std(ddof=0):.2f}" if len(arr) else "n/a"


def write_report(runs: dict[str, dict[int, dict]], cells: list[tuple[str, int | None]], args: argparse.Namespace,
                 path: Path) -> None:
    exact = runs.get(cell_name("fedgen", None), {})
    lines = ["# FedGen with the teacher term from a sample of clients", "",
             f"`python bench/teacher_sampling.py --rounds {args.rounds} --sample {' '.join(map(str, args.sample))} "
             f"--seeds {' '.join(map(str, args.seeds))}` on {platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, one torch thread per run. MNIST, full sharing, Dirichlet "
             f"alpha {ALPHA:g}, {USERS} users, {ACTIVE} active per round (K = {ACTIVE}), {args.rounds} rounds, "
             "defaults of `AlgorithmConfig` otherwise. Mean ± std (population) over seeds; the difference is "
             "paired by seed against the exact term (same partition, initialisation and selection).", "",
             "| teacher term | seeds | final | best-5 | final minus exact (points), per seed |",
             "|---|---|---|---|---|"]
    for algo, sample in cells:
        cell = runs.get(cell_name(algo, sample), {})
        label = "none (FedAvg)" if algo == "fedavg" else ("exact, all K" if sample is None else f"M = {sample} drawn")
        diffs = [100 * (cell[s]["final_accuracy"] - exact[s]["final_accuracy"]) for s in sorted(cell) if s in exact]
        paired = "" if sample is None and algo == "fedgen" else \
            f"{np.mean(diffs):+.2f} ({', '.join(f'{d:+.2f}' for d in diffs)})" if diffs else ""
        lines.append(f"| {label} | {len(cell)} | {mean_std([r['final_accuracy'] for r in cell.values()])} | "
                     f"{mean_std([best5_mean_accuracy(r) for r in cell.values()])} | {paired} |")
    seconds = [r["seconds"] for cell in runs.values() for r in cell.values()]
    lines += ["", f"Wall time per run: {np.mean(seconds):.0f} s mean (two runs at a time on the machine).", "",
              "The estimate is unbiased (tests/algorithm/test_teacher_sampling.py); what it costs is variance "
              "in the generator's gradient. What it buys at scale: bench/results/generator_scale.md."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDGEN_DATA_DIR"))
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--sample", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs_dir = args.out / "teacher_sampling_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cells = [("fedavg", None), ("fedgen", None)] + [("fedgen", m) for m in args.sample]
    jobs = [(algo, m, s, args.rounds, args.data_dir, str(runs_dir)) for s in args.seeds for algo, m in cells
            if not (runs_dir / f"{cell_name(algo, m)}-seed{s}.json").exists()]
    if jobs:
        started = time.time()
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            list(pool.map(run_one, jobs))
        print(f"{len(jobs)} runs in {time.time() - started:.0f} s")
    runs: dict[str, dict[int, dict]] = {}
    for algo, m in cells:
        for path in sorted(runs_dir.glob(f"{cell_name(algo, m)}-seed*.json")):
            run = json.loads(path.read_text())
            if len(run["rounds"]) == args.rounds and run["config"]["seed"] in args.seeds:
                runs.setdefault(cell_name(algo, m), {})[run["config"]["seed"]] = run
    write_report(runs, cells, args, args.out / "teacher_sampling.md")
    print((args.out / "teacher_sampling.md").read_text())


if __name__ == "__main__":
    main()
