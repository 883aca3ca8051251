"""Speed and memory of the pieces that run on devices and on the server, the torch and the lite edge runtime
side by side in one run.

    python bench/footprint.py            # writes bench/results/footprint.md
    python bench/footprint.py --skip-install --repeats 5     # quicker, without the install-size rows

Measures, on this machine, with one compute thread (torch.set_num_threads(1); OMP/OpenBLAS/MKL_NUM_THREADS=1 for
numpy's BLAS and onnxruntime), each runtime in its own fresh processes (the lite ones never import torch, as on
a device without it), the blocks of the two runtimes alternating so that other load on the machine hits both:
- local update time per round (T = 20 steps, B = 32, the reference CNN) for FedAvg, FedProx and FedGen through
  the runtime seam a device uses (`edge_client.runtime`), the generator as each runtime loads it on a
  device (torch: onnxruntime; lite: numpy from the ONNX file's weights); the paper's Table 3 reports 47.66 ms
  vs 57-60 ms on a GPU; goal for lite: <= 3x torch;
- the edge client's cold start: importing the client, building its runtime and the job's model, and for torch
  importing onnx and onnxruntime (which its generator path loads), in a fresh interpreter;
- peak resident memory (ru_maxrss, from wait4) of real `edge-client` processes through a 2-round FedGen job on
  the shipped subset (a broker, the server, two devices; round 1 trains with the generator), and their
  train time in that round; goal for lite: <= 100 MiB on x86;
- the installed size of `.[edge]` and `.[edge-lite]` (fresh virtual environments, the project's wheel);
- the server's work to close a round of 10 clients: aggregation, generator training (FedGen), ONNX export;
- artifact sizes.
Each timing is the median of repeated runs, with the spread (min-max) shown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"
RUNTIMES = ("torch", "lite")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ALGORITHMS = ("fedavg", "fedprox", "fedgen")

# Local updates through the runtime seam, in a fresh process: argv = runtime, setup dir, repeats, first seed.
LOCAL_PROBE = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from edge_client.runtime import make_runtime
from shared.algorithm.config import AlgorithmConfig
from shared.data.datasets import load_dataset
from shared.data.partition import PartitionSpec, partition
name, setup, repeats, first = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start = dict(np.load(setup / "start.npz"))
prior = np.load(setup / "prior.npy")
users = partition(load_dataset("mnist-subset"), PartitionSpec(users=20, alpha=0.1, samples_per_class=1000))
runtimes = {}
for algo in ("fedavg", "fedprox", "fedgen"):
    rt = make_runtime(name, threads=1)
    rt.prepare(AlgorithmConfig(algorithm=algo), (1, 28, 28), 10)
    # the runtime's own generator: onnxruntime for torch, numpy from the file's weights for lite
    sampler = rt.load_generator((setup / "generator.onnx").read_bytes(), rt.cfg, 32, 10, 2**26)
    rt.train(start, users[0], 1, 0, sampler if algo == "fedgen" else None, prior)  # warm-up
    runtimes[algo] = rt
assert "torch" not in sys.modules or name == "torch"
out = {algo: [] for algo in runtimes}
for r in range(first, first + repeats):
    user = users[r % 20]
    for algo, rt in runtimes.items():
        t0 = time.perf_counter()
        rt.train(start, user, 1, r, sampler if algo == "fedgen" else None, prior)
        out[algo].append(1000 * (time.perf_counter() - t0))
print(json.dumps(out))
"""

RSS_WRAPPER = Path(__file__).resolve().parent / "rss_wrapper.py"  # python -S RSS_WRAPPER OUT CMD...

# Cold start of the edge client with one runtime, in a fresh process: argv = runtime.
START_PROBE = r"""
import json, platform, sys, time
t0 = time.perf_counter()
import edge_client.client
from edge_client.runtime import make_runtime
from shared.algorithm.config import AlgorithmConfig
rt = make_runtime(sys.argv[1], threads=1)
rt.prepare(AlgorithmConfig(algorithm="fedgen"), (1, 28, 28), 10)
rt.template()
if sys.argv[1] == "torch":  # what its generator path imports (the lite runtime reads the ONNX file itself)
    import onnx, onnxruntime
print(json.dumps({"start_s": time.perf_counter() - t0, "machine": platform.machine(),
                  "python": platform.python_version(), "runtime_version": rt.version,
                  "torch_loaded": "torch" in sys.modules}))
"""


# Where a device's memory goes: its peak RSS after each stage of a round, in a fresh process (run under
# RSS_WRAPPER, so that it starts small): argv = runtime, setup dir.
MEMORY_PROBE = r"""
import json, resource, sys
from pathlib import Path
stages = []
def stage(name):
    stages.append([name, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
stage("interpreter")
import numpy as np
stage("numpy")
import paho.mqtt.client
if sys.argv[1] == "torch":  # what its generator path imports (the lite runtime reads the ONNX file itself)
    import onnx, onnxruntime
import edge_client.client
from edge_client.runtime import make_runtime
from shared.algorithm.config import AlgorithmConfig
rt = make_runtime(sys.argv[1], threads=1)
rt.prepare(AlgorithmConfig(algorithm="fedgen"), (1, 28, 28), 10)
stage("the client, paho, the runtime and its model (torch: onnx, onnxruntime too)")
from shared.data.datasets import load_dataset
from shared.data.partition import PartitionSpec, partition_user
dataset = load_dataset("mnist-subset")
stage("load_dataset (the whole subset, uint8)")
user = partition_user(dataset, PartitionSpec(users=2, alpha=0.1, samples_per_class=1000, seed=0), 0)
del dataset
stage(f"partition (this device's {len(user.train_y)} + {len(user.test_y)} images as float32)")
setup = Path(sys.argv[2])
start = dict(np.load(setup / "start.npz"))
rt.evaluate(start, user.test_x, user.test_y)
stage(f"evaluate its {len(user.test_y)} test images")
sampler = rt.load_generator((setup / "generator.onnx").read_bytes(), rt.cfg, 32, 10, 2**26)
rt.train(start, user, 1, 0, sampler, np.load(setup / "prior.npy"))
stage("a FedGen local update with the published generator")
print(json.dumps(stages))
"""


def median_spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def probe_env() -> dict[str, str]:
    return {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}


def local_update_setup(workdir: Path) -> None:
    """The server's state after round 0 of 10 clients, its generator as ONNX and its label prior: the start of
    round 1, the first round that uses the generator."""
    import numpy as np
    import torch

    from shared.algorithm.config import AlgorithmConfig
    from shared.algorithm.federation import GlobalState, RoundAccumulator
    from shared.algorithm.local import local_update
    from shared.data.datasets import load_dataset
    from shared.data.partition import PartitionSpec, partition
    from shared.protocol.onnx_export import export_generator_onnx

    torch.set_num_threads(1)
    users = partition(load_dataset("mnist-subset"), PartitionSpec(users=20, alpha=0.1, samples_per_class=1000))
    server = GlobalState(AlgorithmConfig(algorithm="fedgen"), (1, 28, 28), 10, seed=0)
    acc = RoundAccumulator()
    for k in range(10):
        res = local_update(server.model, server.state, users[k].train_x, users[k].train_y, server.cfg, 0, k)
        acc.add(res.upload, res.num_samples, res.label_counts, client=k)
    server.close_round(acc, 0)
    np.savez(workdir / "start.npz", **{k: v.numpy() for k, v in server.state.items()})
    np.save(workdir / "prior.npy", np.asarray(server.prior.probabilities()))
    (workdir / "generator.onnx").write_bytes(export_generator_onnx(server.generator))


def local_update_times(repeats: int, blocks: int = 3) -> tuple[dict[str, dict[str, list[float]]], dict]:
    """runtime -> algorithm -> ms per local update (`blocks` fresh processes per runtime, alternating); and
    runtime -> the memory stages of MEMORY_PROBE."""
    out: dict[str, dict[str, list[float]]] = {rt: {a: [] for a in ALGORITHMS} for rt in RUNTIMES}
    per_block = max(1, -(-repeats // blocks))
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        local_update_setup(Path(tmp))
        memory = {}
        for name in RUNTIMES:
            proc = subprocess.run(measured([sys.executable, "-c", MEMORY_PROBE, name, tmp], Path(tmp) / "rss"),
                                  capture_output=True, text=True, env=probe_env(), check=True, timeout=600)
            memory[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        for block in range(blocks):
            order = RUNTIMES if block % 2 == 0 else RUNTIMES[::-1]
            for name in order:
                proc = subprocess.run([sys.executable, "-c", LOCAL_PROBE, name, tmp, str(per_block),
                                       str(block * per_block)], capture_output=True, text=True, env=probe_env(),
                                      check=True, timeout=1200)
                for algo, values in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                    out[name][algo].extend(values)
    return out, memory


def measured(cmd: list[str], rss_file: Path) -> list[str]:
    """`cmd` under RSS_WRAPPER, which writes its peak RSS (bytes) to `rss_file` when it exits."""
    return [sys.executable, "-S", str(RSS_WRAPPER), str(rss_file), *cmd]


def start_probes(repeats: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {rt: [] for rt in RUNTIMES}
    with tempfile.TemporaryDirectory(prefix="footprint-start-") as tmp:
        rss_file = Path(tmp) / "rss"
        for r in range(repeats):
            for name in RUNTIMES if r % 2 == 0 else RUNTIMES[::-1]:
                proc = subprocess.run(measured([sys.executable, "-c", START_PROBE, name], rss_file),
                                      capture_output=True, text=True, env=probe_env(), check=True, timeout=600)
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["rss_mib"] = int(rss_file.read_text()) / 2**20
                out[name].append(result)
    return out


def fleet_job(edge_runtime: str, workdir: Path) -> list[dict]:
    """A 2-round FedGen job of two devices of `edge_runtime`; per device: peak RSS, train seconds of round 1."""
    from server_api.devfleet.fleet import Fleet, FleetConfig

    cfg = FleetConfig(clients=2, active=2, rounds=2, algorithm="fedgen", dataset="mnist-subset", alpha=0.1,
                      samples_per_class=1000, local_steps=20, seed=0, round_timeout_s=300, progress=False,
                      edge_runtime=edge_runtime, workdir=workdir)
    fleet = Fleet(cfg)
    try:
        fleet.start_broker()
        fleet.start_server()
        fleet.request("POST", "/jobs", cfg.job_config())
        procs = {}
        for k in range(cfg.clients):  # Fleet.start_client's command, under the RSS wrapper
            cmd = [sys.executable, "-m", "edge_client.cli", "--broker", fleet.broker_url, "--job", fleet.job_id,
                   "--client-id", f"c{k}", "--partition", cfg.partition_spec(k), "--state-dir",
                   str(workdir / "edge" / f"c{k}"), "--runtime", cfg.runtime_of(k), "-v"]
            with open(workdir / f"edge-c{k}.log", "wb") as log:
                procs[f"c{k}"] = subprocess.Popen(measured(cmd, workdir / f"rss-c{k}"), stdout=log,
                                                  stderr=subprocess.STDOUT, env=probe_env())
        fleet.clients = dict(enumerate(procs.values()))  # stopped with the fleet if anything fails
        summary = fleet.wait(timeout=900)
        if summary["job_status"] != "finished":
            raise RuntimeError(f"the job did not finish: {summary}")
        for p in procs.values():
            p.wait(timeout=120)
        rss = {cid: int((workdir / f"rss-{cid}").read_text()) for cid in procs}
        detail = fleet.request("GET", f"/jobs/{fleet.job_id}/rounds/1")
        updates = {u["client_id"]: u for a in detail["attempts"] for u in a["updates"] if u["status"] == "accepted"}
        clients = {c["client_id"]: c for c in fleet.request("GET", f"/clients?job_id={fleet.job_id}")["items"]}
        return [{"client": cid, "runtime": clients[cid]["device_info"].get("runtime"), "rc": procs[cid].returncode,
                 "peak_rss_mib": rss[cid] / 2**20, "train_ms": 1000 * updates[cid]["metrics"]["train_seconds"]}
                for cid in procs]
    finally:
        fleet.stop()


def fleet_memory(jobs: int) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {rt: [] for rt in RUNTIMES}
    with tempfile.TemporaryDirectory(prefix="footprint-fleet-") as tmp:
        for j in range(jobs):
            for name in RUNTIMES if j % 2 == 0 else RUNTIMES[::-1]:
                devices = fleet_job(name, Path(tmp) / f"{name}-{j}")
                assert all(d["runtime"] == name and d["rc"] == 0 for d in devices), devices
                out[name].extend(devices)
    return out


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def install_sizes() -> dict[str, dict]:
    """Installed size of `.[edge]` and `.[edge-lite]`: fresh venvs, the project's wheel (built from a copy of the
    checkout's files), site-packages less that of an empty venv."""
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="footprint-install-") as tmp:
        tmp = Path(tmp)
        files = subprocess.run(["git", "ls-files", "-c", "-o", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
        src = tmp / "src"
        for name in filter(None, files):
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp / "dist"),
                        str(src)], check=True, timeout=900)
        wheel = next((tmp / "dist").glob("fedgen_fleet-*.whl"))
        for extra in ("edge", "edge-lite"):
            venv = tmp / f"venv-{extra}"
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            site = next(venv.glob("lib/python*/site-packages"))
            base = _tree_bytes(site)
            t0 = time.monotonic()
            subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"{wheel}[{extra}]"], check=True,
                           timeout=1800)
            seconds = time.monotonic() - t0
            dists = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; "
                                    "print('\\n'.join(sorted(f'{d.metadata[\"Name\"]}=={d.version}' "
                                    "for d in m.distributions())))"], check=True, capture_output=True,
                                   text=True, cwd=tmp).stdout.split()  # not the checkout: its egg-info
            dists = [d for d in dists if not d.lower().startswith(("pip==", "setuptools=="))]
            out[extra] = {"mib": (_tree_bytes(site) - base) / 2**20, "seconds": seconds, "dists": dists}
    return out


def server_close_times(repeats: int) -> dict[str, list[float]]:
    import torch

    from server_api.rounds.runtime import JobRuntime
    from shared.algorithm.config import AlgorithmConfig
    from shared.algorithm.local import local_update
    from shared.data.datasets import load_dataset
    from shared.data.partition import PartitionSpec, partition
    from shared.protocol.job import JobConfig

    torch.set_num_threads(1)
    users = partition(load_dataset("mnist-subset"), PartitionSpec(users=20, alpha=0.1, samples_per_class=1000))
    out: dict[str, list[float]] = {}
    for algo in ("fedavg", "fedgen"):
        runtime = JobRuntime(JobConfig(dataset="mnist-subset", algorithm=AlgorithmConfig(algorithm=algo)))
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
    import numpy as np

    from server_api.rounds.runtime import JobRuntime
    from shared.algorithm.config import AlgorithmConfig
    from shared.algorithm.federation import RoundAccumulator
    from shared.algorithm.local import local_update
    from shared.protocol.job import JobConfig
    from shared.protocol.tensors import encode_tensors

    sizes = {}
    for partial in (False, True):
        runtime = JobRuntime(JobConfig(dataset="mnist-subset",
                                       algorithm=AlgorithmConfig(algorithm="fedgen", partial=partial)))
        gs = runtime.global_state
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


def _versions() -> str:
    import numpy
    import onnxruntime
    import torch

    return f"torch {torch.__version__}, numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}"


def report(args, local, memory, starts, fleet, installs, server, sizes, loads) -> list[str]:
    med = statistics.median
    lines = [
        "# Footprint: speed and memory",
        "",
        f"Command: `python bench/footprint.py --repeats {args.repeats} --jobs {args.jobs}"
        f"{' --skip-install' if args.skip_install else ''}`. Machine: {platform.machine()}, {os.cpu_count()} "
        f"cores, Python {platform.python_version()}, {_versions()}; one compute thread. Load average (1 min) "
        f"before / after: {loads[0]:.2f} / {loads[1]:.2f} (the machine is shared: other work inflates timings; "
        "compare rows of one run, not runs of different days). Torch and lite ran in alternating fresh processes "
        "of the same run.",
        "",
        "## Local update (one round on a device: T = 20 steps, B = 32, reference CNN), ms, median (min-max)",
        "",
        "Through `edge_client.runtime` (what a device runs, numpy state in and out), from the server's state after "
        "round 0, round 1 (FedGen's terms on), the generator as each runtime loads it on a device (torch: "
        "onnxruntime; lite: numpy, from the ONNX file's weights).",
        "",
        "| algorithm | torch | lite | lite / torch |",
        "|---|---|---|---|",
        *[f"| {a} | {median_spread(local['torch'][a])} | {median_spread(local['lite'][a])} | "
          f"{med(local['lite'][a]) / med(local['torch'][a]):.2f}x |" for a in ALGORITHMS],
        "",
        f"FedGen / FedAvg: torch {med(local['torch']['fedgen']) / med(local['torch']['fedavg']):.2f}x, "
        f"lite {med(local['lite']['fedgen']) / med(local['lite']['fedavg']):.2f}x "
        "(the paper, Table 3, on EMNIST: 57-60 ms / 47.66 ms = 1.2x). Goal for lite: <= 3x torch "
        f"(FedGen: {med(local['lite']['fedgen']) / med(local['torch']['fedgen']):.2f}x: "
        f"{'met' if med(local['lite']['fedgen']) <= 3 * med(local['torch']['fedgen']) else 'not met'}).",
        "",
        f"## Edge client process, median (min-max) of {len(starts['torch'])} fresh interpreters per runtime",
        "",
        "| measure | torch | lite |",
        "|---|---|---|",
        "| cold start: import the client, build runtime and model (torch: and import onnx + onnxruntime) (s) | "
        f"{median_spread([p['start_s'] for p in starts['torch']], 2)} | "
        f"{median_spread([p['start_s'] for p in starts['lite']], 2)} |",
        f"| peak resident memory by then (MiB) | {median_spread([p['rss_mib'] for p in starts['torch']])} | "
        f"{median_spread([p['rss_mib'] for p in starts['lite']])} |",
        f"| torch loaded | {starts['torch'][0]['torch_loaded']} | {any(p['torch_loaded'] for p in starts['lite'])} |",
        "",
        f"## Edge client through a FedGen job ({args.jobs} jobs per runtime, 2 devices each: "
        f"{len(fleet['torch'])} processes per runtime)",
        "",
        "`edge-client --runtime torch|lite` processes of a real job (broker, server on SQLite, 2 devices of a "
        "2-user alpha = 0.1 partition of the subset, 2 rounds, FedGen, T = 20, B = 32): peak resident memory over "
        "the whole process (ru_maxrss, wait4) and the local update of round 1 (with the generator) as the device "
        "reported it (`train_seconds`; the two devices train at the same time on 2 cores).",
        "",
        "| measure | torch | lite |",
        "|---|---|---|",
        f"| peak resident memory (MiB) | {median_spread([d['peak_rss_mib'] for d in fleet['torch']])} | "
        f"{median_spread([d['peak_rss_mib'] for d in fleet['lite']])} |",
        f"| round-1 local update (ms) | {median_spread([d['train_ms'] for d in fleet['torch']])} | "
        f"{median_spread([d['train_ms'] for d in fleet['lite']])} |",
        "",
        f"Goal for lite: peak RSS <= 100 MiB on x86: "
        f"{'met' if med([d['peak_rss_mib'] for d in fleet['lite']]) <= 100 else 'not met'} "
        f"(median {med([d['peak_rss_mib'] for d in fleet['lite']]):.1f} MiB).",
        "",
        "Where it goes: peak resident memory after each stage of a round, one fresh process per runtime "
        "(the device c0 of the job above; MiB):",
        "",
        "| stage | torch | lite |",
        "|---|---|---|",
        *[f"| {t[0]} | {t[1]:.1f} | {lt[1]:.1f} |" for t, lt in zip(memory["torch"], memory["lite"])],
    ]
    if installs:
        lines += [
            "",
            "## Installed size (fresh venv, site-packages less an empty venv's)",
            "",
            "| extra | MiB | install s | packages |",
            "|---|---|---|---|",
            *[f"| `.[{extra}]` | {info['mib']:.1f} | {info['seconds']:.0f} | {', '.join(info['dists'])} |"
              for extra, info in installs.items()],
            "",
            "x86_64 here installs PyTorch's CPU-only wheel (`torch==2.13.0+cpu` from this machine's wheel folder); "
            "the default x86_64 wheel on PyPI pulls the CUDA libraries as well (several GB). aarch64: "
            "bench/results/arm64.md.",
        ]
    lines += [
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
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=int(os.environ.get("FOOTPRINT_REPEATS", "21")),
                   help="local updates per algorithm and runtime (default 21, or $FOOTPRINT_REPEATS)")
    p.add_argument("--jobs", type=int, default=3, help="FedGen jobs per runtime for the memory rows (default 3)")
    p.add_argument("--starts", type=int, default=5, help="cold starts per runtime (default 5)")
    p.add_argument("--skip-install", action="store_true", help="leave out the install-size rows")
    p.add_argument("--out", type=Path, default=RESULTS / "footprint.md")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    local, memory = local_update_times(args.repeats)
    starts = start_probes(args.starts)
    fleet = fleet_memory(args.jobs)
    installs = None if args.skip_install else install_sizes()
    import torch

    torch.set_num_threads(1)
    server = server_close_times(max(3, args.repeats // 4))
    sizes = artifact_sizes()
    lines = report(args, local, memory, starts, fleet, installs, server, sizes,
                   (load_before, os.getloadavg()[0]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
