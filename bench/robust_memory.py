"""Memory of the robust aggregation rules (median, trimmed mean) against the number of full updates in a round:
the round's updates spilled to a file and reduced a column chunk at a time (`SpilledUpdates`, what the server
does) beside stacking them all in memory (what it did before), each measurement in a fresh process (peak RSS).
Writes bench/results/robust_memory.md.

    python bench/robust_memory.py [--clients 1000,10000] [--in-memory-up-to 10000]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(clients: int, mode: str, spilled: bool) -> dict:
    """One round of `clients` full updates of the reference CNN, aggregated by `mode`; in this process."""
    import numpy as np
    import torch

    from shared.algorithm.aggregate import coordinate_median, trimmed_mean
    from shared.algorithm.federation import RoundAccumulator
    from shared.algorithm.models import build_model

    torch.set_num_threads(1)
    state = {k: v for k, v in build_model("cnn", (1, 28, 28), 10, torch.Generator().manual_seed(0))
             .state_dict().items() if v.is_floating_point()}
    gen = torch.Generator().manual_seed(1)
    base = {k: torch.randn(v.shape, generator=gen) for k, v in state.items()}
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    acc = RoundAccumulator(mode=mode, trim_ratio=0.1)
    kept = []
    for i in range(clients):
        update = {k: v + 1e-3 * i for k, v in base.items()}  # every client its own values, cheaply
        if spilled:
            acc.add(update, num_samples=10, label_counts=np.ones(10, dtype=np.int64), client=f"c{i}")
        else:
            kept.append(update)
    added = time.perf_counter() - started
    rss_added = rss_now_mib()
    error = None
    try:
        if spilled:
            acc.result()
        else:
            coordinate_median(kept) if mode == "median" else trimmed_mean(kept, 0.1)
    except RuntimeError as exc:
        error = str(exc).splitlines()[0]
    reduced = time.perf_counter() - started - added
    return {"clients": clients, "mode": mode, "spilled": spilled, "parameters": sum(v.numel() for v in base.values()),
            "add_s": added, "reduce_s": reduced, "error": error,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_start_mib": rss_start,
            "rss_added_mib": rss_added}


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1000,10000")
    parser.add_argument("--in-memory-up-to", type=int, default=10000)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # clients,mode,spilled: measure in this process
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "robust_memory.md")
    args = parser.parse_args()
    if args.one:
        clients, mode, spilled = args.one.split(",")
        print(json.dumps(measure(int(clients), mode, spilled == "1")))
        return 0
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        for mode in ("median", "trimmed_mean"):
            for spilled in (True, False):
                if not spilled and clients > args.in_memory_up_to:
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", f"{clients},{mode},{int(spilled)}"],
                                     check=True, capture_output=True, text=True).stdout
                rows.append(json.loads(out.splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    lines = ["# Robust aggregation: memory against the number of full updates", "",
             f"`python bench/robust_memory.py --clients {args.clients}` on {platform.machine()}, Python "
             f"{platform.python_version()}, one thread; the reference CNN's {rows[0]['parameters']:,} float32 "
             "parameters per update; each row a fresh process (peak RSS, including torch itself: see the first "
             "column). Spilled: the updates in a temporary file, reduced 64 MiB of float64 at a time "
             "(`SpilledUpdates`, the server's way); in memory: stacked per parameter tensor (before).", "",
             "| clients | rule | updates kept | RSS after import (MiB) | RSS after adding (MiB) | peak RSS (MiB) "
             "| add (s) | reduce (s) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = "spilled" if r["spilled"] else "in memory"
        lines.append(f"| {r['clients']:,} | {r['mode']} | {kept} | {r['rss_start_mib']:.0f} | "
                     f"{r['rss_added_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['add_s']:.2f} | {r['reduce_s']:.2f} | "
                     f"{r['error'] or ''} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
