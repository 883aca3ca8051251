"""One FedGen job with an emulated arm64 device: the host runs a broker, the server and one host device; the
device c0 is `edge-client` inside the arm64 root file system (chroot; the kernel runs its aarch64 binaries with
qemu-user through binfmt_misc), connected over loopback (qemu-user processes share the host's network).

    python bench/arm64/job.py --root ROOT --venv /opt/fedgen-lite --runtime lite --out lite.json

Measures, for the arm64 device: its cold start under emulation (importing the client, building the runtime and
model; for torch importing onnx and onnxruntime), its peak resident memory through the job (ru_maxrss of the emulated
process: the guest's memory plus qemu's own, translated code included), its local update per round as it
reported it (`train_seconds`), the time from the round's start to its accepted update, and the job's accuracy.
Then (--reference) the same job with both devices on the host, c0 with the same runtime natively: the arm64
device's job must reach, round by round, that accuracy within PARITY_TOLERANCE (the fleet parity tests' 0.02).

--qemu-cpu sets the emulated CPU (QEMU_CPU): cortex-a53 is a Raspberry Pi Zero 2 W's or Pi 3's (ARMv8.0-A),
cortex-a72 a Pi 4's, cortex-a76 a Pi 5's; qemu's default, max, has every feature qemu knows (SVE, SME, ...),
which no Pi has. Writes the measurements as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.footprint import RSS_WRAPPER, START_PROBE  # noqa: E402
from server_api.devfleet.fleet import Fleet, FleetConfig  # noqa: E402

# The device's environment inside the root file system: nothing of the host's (its pip settings, paths).
GUEST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
PARITY_TOLERANCE = 0.02  # accuracy per round, as tests/fleet/test_fleet.py and test_edge_runtimes.py


def in_root(root: Path, argv: list[str], qemu_cpu: str | None = None) -> list[str]:
    env = {**GUEST_ENV, **({"QEMU_CPU": qemu_cpu} if qemu_cpu else {})}
    return ["chroot", str(root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]


def fleet_config(args: argparse.Namespace, workdir: Path) -> FleetConfig:
    """Two devices of a 2-user partition of the subset; both train every round."""
    return FleetConfig(clients=2, active=2, rounds=args.rounds, algorithm="fedgen", dataset="mnist-subset",
                       alpha=0.1, samples_per_class=1000, local_steps=20, seed=0, round_timeout_s=args.round_timeout,
                       progress=True, edge_runtime="lite", workdir=workdir)


def seconds_between(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True, help="the arm64 root file system")
    p.add_argument("--venv", required=True, help="the virtual environment inside it (a path in the root)")
    p.add_argument("--runtime", choices=("lite", "torch"), required=True, help="the arm64 device's runtime")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--round-timeout", type=int, default=900)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--qemu-cpu", default=None, help="the emulated CPU (QEMU_CPU), e.g. cortex-a53; default qemu's")
    p.add_argument("--reference", action="store_true", help="also run the job with both devices on the host")
    args = p.parse_args(argv)
    guest_python = f"{args.venv}/bin/python"
    result: dict = {"runtime": args.runtime, "venv": args.venv, "qemu_cpu": args.qemu_cpu or "max (qemu's default)"}

    t0 = time.monotonic()
    probe = subprocess.run(in_root(args.root, [guest_python, "-c", START_PROBE, args.runtime], args.qemu_cpu),
                           capture_output=True, text=True, timeout=900)
    if probe.returncode != 0:
        print(probe.stderr[-3000:], file=sys.stderr)
        args.out.write_text(json.dumps({**result, "probe_failed": probe.returncode,
                                        "probe_stderr": probe.stderr[-2000:]}, indent=1))
        raise SystemExit(f"the cold-start probe failed in the arm64 root ({probe.returncode}; CPU "
                         f"{result['qemu_cpu']})")
    result["probe"] = json.loads(probe.stdout.strip().splitlines()[-1])
    result["probe"]["wall_s"] = time.monotonic() - t0
    print(f"arm64 {args.runtime}: cold start {result['probe']['start_s']:.1f} s under emulation "
          f"({result['probe']['machine']}, CPU {result['qemu_cpu']}, Python {result['probe']['python']})", flush=True)

    # c0: the arm64 device; c1 runs on the host (lite)
    cfg = fleet_config(args, args.workdir)
    fleet = Fleet(cfg)
    state_dir = f"/var/lib/fedgen-edge/{args.runtime}-c0"
    subprocess.run(["rm", "-rf", str(args.root / state_dir.lstrip("/"))], check=True)
    rss_file = args.workdir / "arm64-c0.rss"
    try:
        fleet.start_broker()
        fleet.start_server()
        fleet.request("POST", "/jobs", cfg.job_config())
        device = [f"{args.venv}/bin/edge-client", "--broker", fleet.broker_url, "--job", fleet.job_id,
                  "--client-id", "c0", "--partition", cfg.partition_spec(0), "--state-dir", state_dir,
                  "--runtime", args.runtime, "--retry", "60", "-v"]
        started = time.monotonic()
        with open(args.workdir / "edge-c0-arm64.log", "wb") as log:
            arm64 = subprocess.Popen([sys.executable, "-S", str(RSS_WRAPPER), str(rss_file),
                                      *in_root(args.root, device, args.qemu_cpu)], stdout=log,
                                     stderr=subprocess.STDOUT)
        fleet.clients[0] = arm64  # stopped with the fleet
        fleet.start_client(1)
        summary = fleet.wait(timeout=args.rounds * args.round_timeout + 600)
        rc = arm64.wait(timeout=300)
        result["device_wall_s"] = time.monotonic() - started
        result["device_rc"] = rc
        result["peak_rss_mib"] = int(rss_file.read_text()) / 2**20 if rss_file.exists() else None
        result["job_status"] = summary["job_status"]
        result["accuracy"] = [r["accuracy"] for r in summary["rounds"]]
        rounds = []
        for r in range(args.rounds):
            detail = fleet.request("GET", f"/jobs/{fleet.job_id}/rounds/{r}")
            attempt = detail["attempts"][-1]
            ups = {u["client_id"]: u for u in attempt["updates"] if u["status"] == "accepted"}
            rounds.append({
                "round": r, "status": attempt["status"], "updates": sorted(ups),
                "round_s": seconds_between(attempt["started_at"], attempt["closed_at"]) if attempt["closed_at"]
                else None,
                "arm64_train_s": ups["c0"]["metrics"].get("train_seconds") if "c0" in ups else None,
                "arm64_update_after_s": seconds_between(attempt["started_at"], ups["c0"]["received_at"])
                if "c0" in ups else None,
                "host_train_s": ups["c1"]["metrics"].get("train_seconds") if "c1" in ups else None,
            })
        result["rounds"] = rounds
        clients = {c["client_id"]: c["device_info"] for c in
                   fleet.request("GET", f"/clients?job_id={fleet.job_id}")["items"]}
        result["arm64_presence"] = clients.get("c0")
    finally:
        fleet.stop()
    ok = result.get("job_status") == "finished" and result.get("device_rc") == 0 and \
        all("c0" in r["updates"] for r in result.get("rounds", []))
    if args.reference:  # the same job, c0 natively on the host with the same runtime
        ref_cfg = fleet_config(args, args.workdir.with_name(args.workdir.name + "-host"))
        ref_cfg.progress = False
        ref_cfg.extra_client_args = {0: ["--runtime", args.runtime]}
        ref_fleet = Fleet(ref_cfg)
        try:
            ref = ref_fleet.run(timeout=args.rounds * args.round_timeout + 600)
        finally:
            ref_fleet.stop()
        result["host_accuracy"] = [r["accuracy"] for r in ref["rounds"]]
        gaps = [abs(a - b) for a, b in zip(result.get("accuracy", []), result["host_accuracy"])]
        result["max_accuracy_gap"] = max(gaps) if gaps else None
        result["parity"] = len(gaps) == args.rounds and max(gaps) <= PARITY_TOLERANCE
        print(f"arm64 {args.runtime} accuracy {result.get('accuracy')} vs host {result['host_accuracy']}: "
              f"{'within' if result['parity'] else 'NOT within'} {PARITY_TOLERANCE}", flush=True)
        ok = ok and result["parity"]
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
