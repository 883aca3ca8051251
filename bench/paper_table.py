"""The paper-table benchmark: MNIST, FedAvg / FedProx / FedGen, full and partial sharing, several seeds.

    python bench/paper_table.py --data-dir ../shared/data --workers 2

Each run is written to bench/results/paper_table_runs/<cell>-seed<s>.json as it finishes (runs already there
are reused, so an interrupted benchmark resumes); then bench/results/paper_table.md and the learning-curve plot
bench/results/paper_table_curves.png are written from every run found.
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
FULL_CELLS = [(alpha, algo, False) for alpha in (0.05, 0.1, 1.0) for algo in ("fedavg", "fedprox", "fedgen")]
PARTIAL_CELLS = [(alpha, algo, True) for alpha in (0.1, 1.0) for algo in ("fedavg", "fedgen")]
# Published numbers (top-5 metric), FEDGEN-NOTES.md / paper Tables 1 and 4.
PAPER = {
    (0.05, "fedavg", False): "87.70 ± 2.07", (0.05, "fedprox", False): "87.49 ± 2.05",
    (0.05, "fedgen", False): "91.30 ± 0.74", (0.1, "fedavg", False): "90.16 ± 0.59",
    (0.1, "fedprox", False): "90.10 ± 0.39", (0.1, "fedgen", False): "93.03 ± 0.32",
    (1.0, "fedavg", False): "93.84 ± 0.25", (1.0, "fedprox", False): "93.83 ± 0.29",
    (1.0, "fedgen", False): "95.52 ± 0.07", (0.1, "fedavg", True): "58.39 ± 0.74",
    (0.1, "fedgen", True): "65.42 ± 0.29", (1.0, "fedavg", True): "74.49 ± 0.57",
    (1.0, "fedgen", True): "79.72 ± 0.52",
}


COLORS = {"fedavg": ("tab:blue", "-"), "fedprox": ("tab:orange", "--"), "fedgen": ("tab:green", "-")}
NOTES = """
## Notes

- **Targets.** FedGen beats FedAvg by at least 3 points in final-round accuracy at alpha 0.05 and 0.1 with full
  sharing (met: +3.81 and +3.38, every seed above +2.9). With partial sharing at alpha 0.1 the aim was at least
  5 points: met, +5.23 (+5.03 to +5.56 on the three seeds; best-5 66.30 vs 60.71, +5.59, where the paper has
  65.42 vs 58.39, +7.03). The partial FedGen rows use the generator-term decay 0.99 chosen on validation (below);
  with the reference's 0.98 (runs kept as `paper_table_runs/fedgen-partial-decay0.98-*`) the gain was +4.59 at
  alpha 0.1 and +3.01 at alpha 1 (now +3.11). FedGen's partial-sharing accuracy is near its plateau by round 60;
  FedAvg keeps climbing slowly and narrows the gap until round 200.
- **What was tried.** The reference code's hyper-parameters with the decisions in docs/algorithm.md, fixed
  before the runs; then three choices made on a validation split held out of the users' training images, never
  on this table's test split (bench/results/selection.md): the label weighting, FedProx's mu, and, for partial
  sharing, the decay of the generator terms (0.98, 0.99 or 1.0, on the class-balanced validation accuracy).
  Nothing else was searched.
- **Against the paper.** Absolute numbers are higher than the published ones for every algorithm because local
  data are shuffled here; the published Table 1 came from code that trained on label-sorted, unshuffled local
  data, which hurts FedAvg most. With shuffling the authors re-ran MNIST alpha 0.1 and reported FedAvg
  90.71 +- 1.17 vs FedGen 95.68 +- 0.20 (top-5); this run gives 93.33 +- 0.39 vs 96.61 +- 0.36.
- **FedProx.** mu = 0.01, chosen on a validation split (bench/results/selection.md: MNIST alpha 0.1, 3 seeds,
  mean validation accuracy 93.14 for mu = 0.01, 93.09 for 0.1, 92.89 for the reference's 1). At that weight the
  proximal term pulls back about 0.2 % of the local drift over 20 steps and FedProx is FedAvg to within 0.03
  points in every cell: on this protocol the proximal term does not help. The FedProx rows are the runs of
  commit 425bb53, which used mu = 0.01. With the reference's mu = 1 (runs in `paper_table_runs/fedprox-mu1-*`,
  December 2026) FedProx ends 0.09 to 0.31 points below FedAvg on every one of the 9 paired runs (mean -0.16:
  91.69 ± 0.77 / 93.01 ± 0.53 / 94.81 ± 0.11 final at alpha 0.05 / 0.1 / 1), the paper's finding too (FedProx
  about FedAvg, slightly below). Weight decay, which the reference's FedProx optimiser also applies, is not used
  (docs/algorithm.md, FedProx).
- **Choices made on validation.** The label weighting of the generator's teacher term (`counts`, the default,
  against the reference's `proportions` + 1: indistinguishable, 96.75 % mean validation accuracy both),
  FedProx's mu (above) and partial sharing's generator-term decay were chosen on a validation split before this
  table was read (bench/results/selection.md); the test split decided nothing. For partial sharing the plain
  validation accuracy is no guide (a user's validation images follow its own label distribution while its test
  split gives every class it holds an equal share: 97 % against 67 %), so that choice was made on the
  class-balanced validation accuracy (each (user, class) pair weighs alike, as in the test split): 0.99 scored
  83.62 %, 1.0 83.41 %, the reference's 0.98 82.56 %, 0.99 ahead of 0.98 on every seed.
- **Code.** The runs were made with the commit that first added this script (425bb53; the partial FedGen rows
  in December 2026 with decay 0.99); later commits changed
  the order in which the server feeds clients' predictors to the generator (sorted by id) and the ONNX export,
  which change floating-point summation order, not the algorithm (so does the batched teacher term of
  December 2026, which runs all predictors in one vmap call). Re-running the script reproduces the table
  up to that noise. Per-run records (every round) are in `paper_table_runs/`.
"""


def cell_name(alpha: float, algo: str, partial: bool) -> str:
    return f"{algo}{'-partial' if partial else ''}-alpha{alpha:g}"


def run_one(job: tuple[float, str, bool, int, int, str, str]) -> str:
    """Run one (cell, seed) in a worker process with one torch thread; returns the path written."""
    alpha, algo, partial, seed, rounds, data_dir, out_dir = job
    import torch

    from shared.simulation import run_simulation, write_run

    torch.set_num_threads(1)
    cfg = SimulationConfig(
        dataset="mnist", data_dir=data_dir, rounds=rounds, active=10, seed=seed,
        partition=PartitionSpec(users=20, alpha=alpha, seed=seed),
        algorithm=AlgorithmConfig(algorithm=algo, partial=partial, local_steps=20, batch_size=32),
    )
    run = run_simulation(cfg, progress=False)
    path = Path(out_dir) / f"{cell_name(alpha, algo, partial)}-seed{seed}.json"
    write_run(run, path)
    print(f"{path.name}: final {run['final_accuracy']:.4f} best-5 mean {best5_mean_accuracy(run):.4f} "
          f"({run['seconds']:.0f} s)", flush=True)
    return str(path)


# What the project aims at (issue: FedGen core, section 4): FedGen - FedAvg in final-round accuracy, points.
TARGETS = {(0.05, False): 3.0, (0.1, False): 3.0, (0.1, True): 5.0}


def paired_differences(runs: dict[tuple, list[dict]], alpha: float, partial: bool) -> list[float]:
    """100 * (FedGen - FedAvg) final accuracy for each seed both cells ran."""
    def by_seed(algo: str) -> dict[int, float]:
        return {r["config"]["seed"]: r["final_accuracy"] for r in runs.get((alpha, algo, partial), [])}

    gen, avg = by_seed("fedgen"), by_seed("fedavg")
    return [100 * (gen[s] - avg[s]) for s in sorted(set(gen) & set(avg))]


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    arr = 100 * np.asarray(values)
    return f"{arr.mean():.2f} ± {arr.std(ddof=0):.2f}"


def load_runs(out_dir: Path, rounds: int) -> dict[tuple, list[dict]]:
    runs: dict[tuple, list[dict]] = {}
    for alpha, algo, partial in FULL_CELLS + PARTIAL_CELLS:
        for path in sorted(out_dir.glob(f"{cell_name(alpha, algo, partial)}-seed*.json")):
            run = json.loads(path.read_text())
            if len(run["rounds"]) == rounds:
                runs.setdefault((alpha, algo, partial), []).append(run)
    return runs


def write_report(runs: dict[tuple, list[dict]], rounds: int, path: Path, machine: str) -> None:
    lines = [
        "# Paper-table benchmark (MNIST)",
        "",
        f"Command: `python bench/paper_table.py --data-dir ../shared/data --rounds {rounds}` "
        f"(this file is written by it). Machine: {machine}.",
        f"Setting: 20 users, 10 active per round, {rounds} rounds, T = 20 local steps, B = 32, CNN "
        "(26,434 parameters), 1,500 training images per class, Dirichlet alpha as listed; defaults of "
        "`AlgorithmConfig` otherwise (see docs/algorithm.md). Mean ± std (population) over seeds; each seed "
        "draws its own partition, initialisation and client selection.",
        "",
        "- **final**: accuracy after the last round (Σ correct / Σ tested over every user's test split).",
        "- **best-5**: the mean accuracy of the 5 best rounds of a run (not top-5 classification accuracy), then "
        "mean ± std over seeds (the paper's metric).",
        "- **paper**: the published best-5 figure (reference code, label-sorted unshuffled local data).",
        "",
        "| sharing | alpha | algorithm | seeds | final | best-5 | paper (best-5) |",
        "|---|---|---|---|---|---|---|",
    ]
    for alpha, algo, partial in FULL_CELLS + PARTIAL_CELLS:
        cell = runs.get((alpha, algo, partial), [])
        lines.append(
            f"| {'partial' if partial else 'full'} | {alpha:g} | {algo} | {len(cell)} | "
            f"{mean_std([r['final_accuracy'] for r in cell])} | {mean_std([best5_mean_accuracy(r) for r in cell])} | "
            f"{PAPER.get((alpha, algo, partial), '')} |"
        )
    lines += ["", "## FedGen minus FedAvg, final-round accuracy (points)", "",
              "Paired by seed (same partition, initialisation and selection for both algorithms).", "",
              "| sharing | alpha | mean difference | per seed | target | met |", "|---|---|---|---|---|---|"]
    for alpha, partial in [(0.05, False), (0.1, False), (1.0, False), (0.1, True), (1.0, True)]:
        diffs = paired_differences(runs, alpha, partial)
        if diffs:
            target = TARGETS.get((alpha, partial))
            met = "" if target is None else ("yes" if np.mean(diffs) >= target else "**no**")
            lines.append(f"| {'partial' if partial else 'full'} | {alpha:g} | {np.mean(diffs):+.2f} | "
                         f"{', '.join(f'{d:+.2f}' for d in diffs)} | "
                         f"{'' if target is None else f'>= +{target:g}'} | {met} |")
    seconds = [r["seconds"] for cell in runs.values() for r in cell]
    if seconds:
        lines += ["", f"Wall time per run: {np.mean(seconds):.0f} s mean (one torch thread per run, with other "
                  "work on the machine at the same time)."]
    lines += NOTES.splitlines()
    path.write_text("\n".join(lines) + "\n")


def plot(runs: dict[tuple, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(a, False) for a in (0.05, 0.1, 1.0)] + [(a, True) for a in (0.1, 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), sharey=False)
    for ax, (alpha, partial) in zip(axes, panels):
        for algo, (color, style) in COLORS.items():
            cell = runs.get((alpha, algo, partial))
            if not cell:
                continue
            curves = np.array([[r["accuracy"] for r in run["rounds"]] for run in cell])
            mean, std = curves.mean(0), curves.std(0)
            ax.plot(mean, label=algo, lw=1, color=color, linestyle=style)
            ax.fill_between(range(len(mean)), mean - std, mean + std, alpha=0.2, color=color)
        ax.set_title(f"{'partial' if partial else 'full'}, alpha={alpha:g}")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("FEDGEN_DATA_DIR"))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from saved runs")
    args = parser.parse_args()
    runs_dir = args.out / "paper_table_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cells = FULL_CELLS + PARTIAL_CELLS
    jobs = [(a, algo, p, s, args.rounds, args.data_dir, str(runs_dir)) for s in args.seeds for a, algo, p in cells
            if not (runs_dir / f"{cell_name(a, algo, p)}-seed{s}.json").exists()]
    # slowest first (partial runs evaluate every user separately; FedGen trains a generator)
    jobs.sort(key=lambda j: (not j[2], j[1] != "fedgen"))
    if jobs and not args.report_only:
        started = time.time()
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            list(pool.map(run_one, jobs))
        print(f"{len(jobs)} runs in {time.time() - started:.0f} s")
    runs = load_runs(runs_dir, args.rounds)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.workers} worker processes, Python " \
              f"{platform.python_version()}"
    write_report(runs, args.rounds, args.out / "paper_table.md", machine)
    plot(runs, args.out / "paper_table_curves.png")
    print((args.out / "paper_table.md").read_text())


if __name__ == "__main__":
    main()
