"""Speed and memory of the pieces that run on devices and on the server.

    python bench/footprint.py            # writes bench/results/footprint.md

Measures, on this machine, with one torch thread (as the edge client runs):
- local update time per round (T = 20 steps, B = 32, the reference CNN) for FedAvg, FedProx and FedGen, with the
  generator sampled through onnxruntime as on a device (the paper's Table 3 reports 47.66 ms vs 57-60 ms on a GPU);
- the edge client's cold start (importing everything it needs) and peak resident memory over a round,
  measured in a fresh process;
- the server's work to close a round of 10 clients: aggregation, generator training (FedGen), ONNX export of
  model, predictor and generator;
- artifact sizes.
Each timing is the median of repeated runs, with the spread (min-max) shown.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"

EDGE_PROBE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import numpy, torch, onnx, onnxruntime, paho.mqtt.client, safetensors
import edge_client.client, shared.artifacts, shared.local
t_import = time.perf_counter() - t0
torch.set_num_threads(1)
from shared.config import AlgorithmConfig
from shared.federation import GlobalState, RoundAccumulator
from shared.artifacts import OnnxGenerator, export_generator_onnx
from shared.data import load_dataset
from shared.local import local_update
from shared.partition import PartitionConfig, partition
users = partition(load_dataset("mnist-subset"), PartitionConfig(users=20, alpha=0.1, samples_per_class=1000))
cfg = AlgorithmConfig(algorithm="fedgen")
gs = GlobalState(cfg, (1, 28, 28), 10, seed=0)
acc = RoundAccumulator()
res = local_update(gs.model, gs.state, users[0].train_x, users[0].train_y, cfg, 0, 0)
acc.add(res.upload, res.num_samples, res.label_counts, client=0)
gs.close_round(acc, 0)
sampler = OnnxGenerator(export_generator_onnx(gs.generator))
t1 = time.perf_counter()
local_update(gs.model, gs.state, users[1].train_x, users[1].train_y, cfg, 1, 1, sampler, gs.prior.probabilities())
print(json.dumps({"import_s": t_import, "round_s": time.perf_counter() - t1,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def local_update_times(repeats: int) -> dict[str, list[float]]:
    import torch

    from shared.artifacts import OnnxGenerator, export_generator_onnx
    from shared.config import AlgorithmConfig
    from shared.data import load_dataset
    from shared.federation import GlobalState, RoundAccumulator
    from shared.local import local_update
    from shared.partition import PartitionConfig, partition

    torch.set_num_threads(1)
    users = partition(load_dataset("mnist-subset"), PartitionConfig(users=20, alpha=0.1, samples_per_class=1000))
    server = GlobalState(AlgorithmConfig(algorithm="fedgen"), (1, 28, 28), 10, seed=0)
    acc = RoundAccumulator()
    for k in range(10):
        res = local_update(server.model, server.state, users[k].train_x, users[k].train_y, server.cfg, 0, k)
        acc.add(res.upload, res.num_samples, res.label_counts, client=k)
    server.close_round(acc, 0)
    onnx_sampler = OnnxGenerator(export_generator_onnx(server.generator))
    out: dict[str, list[float]] = {"fedavg": [], "fedprox": [], "fedgen (torch generator)": [],
                                   "fedgen (onnxruntime generator)": []}
    for r in range(repeats):
        user = users[r % 20]
        for name in out:
            algo = name.split()[0]
            cfg = AlgorithmConfig(algorithm=algo)
            sampler = None
            if algo == "fedgen":
                sampler = onnx_sampler if "onnx" in name else server.sampler()
            start = time.perf_counter()
            local_update(server.model, server.state, user.train_x, user.train_y, cfg, 1, r, sampler,
                         server.prior.probabilities())
            out[name].append(1000 * (time.perf_counter() - start))
    return out


def server_close_times(repeats: int) -> dict[str, list[float]]:
    import torch

    from server_api.job_runtime import JobRuntime, JobSettings
    from shared.config import AlgorithmConfig
    from shared.data import load_dataset
    from shared.local import local_update
    from shared.partition import PartitionConfig, partition

    torch.set_num_threads(1)
    users = partition(load_dataset("mnist-subset"), PartitionConfig(users=20, alpha=0.1, samples_per_class=1000))
    out: dict[str, list[float]] = {}
    for algo in ("fedavg", "fedgen"):
        runtime = JobRuntime(JobSettings(dataset="mnist-subset", algorithm=AlgorithmConfig(algorithm=algo)))
        uploads = [local_update(runtime.global_state.model, runtime.global_state.state, u.train_x, u.train_y,
                                runtime.cfg, 0, k) for k, u in enumerate(users[:10])]
        for r in range(repeats):
            acc = runtime.new_accumulator()
            start = time.perf_counter()
            for k, res in enumerate(uploads):
                acc.add(res.upload, res.num_samples, res.label_counts, client=k)
            t_agg = time.perf_counter()
            runtime.close_round(acc, r)
            out.setdefault(f"{algo}: aggregate 10 updates", []).append(1000 * (t_agg - start))
            out.setdefault(f"{algo}: close round (incl. generator, ONNX export)", []).append(
                1000 * (time.perf_counter() - start))
    return out


def artifact_sizes() -> dict[str, int]:
    from server_api.job_runtime import JobRuntime, JobSettings
    from shared.config import AlgorithmConfig
    from shared.federation import RoundAccumulator
    from shared.local import local_update
    from shared.wire import encode_tensors

    sizes = {}
    for partial in (False, True):
        runtime = JobRuntime(JobSettings(dataset="mnist-subset",
                                         algorithm=AlgorithmConfig(algorithm="fedgen", partial=partial)))
        gs = runtime.global_state
        import numpy as np

        x = np.zeros((40, 1, 28, 28), np.float32)
        y = np.arange(40) % 10
        res = local_update(gs.model, gs.state, x, y, runtime.cfg, 0, 0)
        acc = RoundAccumulator()
        acc.add(res.upload, res.num_samples, res.label_counts, client=0)
        art, _ = runtime.close_round(acc, 0)
        tag = "partial" if partial else "full"
        sizes[f"update ({tag})"] = len(encode_tensors(res.upload))
        sizes[f"delta ({tag})"] = len(art.delta)
        if not partial:
            sizes["model.onnx"] = len(art.model_onnx)
            sizes["generator.onnx"] = len(art.generator_onnx)
            sizes["server state (per version)"] = len(art.server_state)
        else:
            sizes["predictor.onnx"] = len(art.predictor_onnx)
    return sizes


def edge_probe(repeats: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-c", EDGE_PROBE], capture_output=True, text=True, env=env,
                              check=True, timeout=600)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


def main() -> None:
    repeats = int(os.environ.get("FOOTPRINT_REPEATS", "20"))
    local = local_update_times(repeats)
    server = server_close_times(max(3, repeats // 4))
    probes = edge_probe(3)
    sizes = artifact_sizes()
    load = os.getloadavg()
    ratio = statistics.median(local["fedgen (onnxruntime generator)"]) / statistics.median(local["fedavg"])
    lines = [
        "# Footprint: speed and memory",
        "",
        f"Command: `python bench/footprint.py` (FOOTPRINT_REPEATS={repeats}). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {__import__('torch').__version__}, "
        f"one torch thread; load average when it finished {load[0]:.2f} (other work on the machine inflates "
        "timings; compare rows of one run, not runs of different days).",
        "",
        "## Local update (one round on a device: T = 20 steps, B = 32, reference CNN), ms, median (min-max)",
        "",
        "| algorithm | ms |",
        "|---|---|",
        *[f"| {name} | {median_spread(vals)} |" for name, vals in local.items()],
        "",
        f"FedGen / FedAvg: {ratio:.2f}x "
        "(the paper, Table 3, on EMNIST: 57-60 ms / 47.66 ms = 1.2x).",
        "",
        "## Edge client process (fresh interpreter, 3 runs)",
        "",
        "| measure | median (min-max) |",
        "|---|---|",
        f"| import torch, onnx, onnxruntime, paho, the client (s) | {median_spread([p['import_s'] for p in probes])} |",
        f"| one FedGen round incl. ONNX generator (ms) | {median_spread([1000 * p['round_s'] for p in probes])} |",
        f"| peak resident memory (MiB) | {median_spread([p['peak_rss_mib'] for p in probes])} |",
        "",
        "## Server: closing a round of 10 updates, ms, median (min-max)",
        "",
        "| step | ms |",
        "|---|---|",
        *[f"| {name} | {median_spread(vals)} |" for name, vals in server.items()],
        "",
        "## Sizes (bytes)",
        "",
        "| artifact | bytes |",
        "|---|---|",
        *[f"| {name} | {size:,} |" for name, size in sizes.items()],
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "footprint.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
