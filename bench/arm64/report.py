"""The report of `make test-arm64` (bench/arm64/test-arm64.sh) from the files of its run directory: the step times
(times.tsv), the notes (notes.tsv), the installed sizes and package lists, and the jobs (job-lite.json,
job-torch.json, written by bench/arm64/job.py). Prints it and writes it to --out (bench/results/arm64.md)."""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path


def rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def fmt(value, digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def job_rows(job: dict) -> list[str]:
    probe = job["probe"]
    rounds = job.get("rounds", [])
    lines = [
        f"| cold start: import the client, build runtime and model (torch: and onnx + onnxruntime) | "
        f"{probe['start_s']:.1f} s |",
        f"| peak resident memory of the emulated edge-client process (qemu + guest) | "
        f"{fmt(job.get('peak_rss_mib'), 1, ' MiB')} |",
    ]
    for r in rounds:
        generator = ", with the generator" if r["round"] else ""
        lines.append(f"| round {r['round']}: local update (T = 20, B = 32{generator}) / round start to its accepted "
                     f"update / whole round | {fmt(r['arm64_train_s'], 2, ' s')} / "
                     f"{fmt(r['arm64_update_after_s'], 1, ' s')} / {fmt(r['round_s'], 1, ' s')} |")
    lines += [
        f"| the same local update on the host device (native x86_64, lite) | "
        f"{' / '.join(fmt(r['host_train_s'], 3, ' s') for r in rounds)} |",
        f"| edge-client process, start to exit | {fmt(job.get('device_wall_s'), 1, ' s')} |",
        f"| job | {job.get('job_status')}, exit {job.get('device_rc')}, accuracy by round "
        f"{', '.join(fmt(a, 4) for a in job.get('accuracy', []))} |",
        f"| the same job, both devices on the host | accuracy by round "
        f"{', '.join(fmt(a, 4) for a in job.get('host_accuracy', [])) or 'n/a'}; largest gap "
        f"{fmt(job.get('max_accuracy_gap'), 4)}: {'within' if job.get('parity') else 'NOT within'} 0.02 |",
        f"| the device's presence | machine {(job.get('arm64_presence') or {}).get('machine')}, runtime "
        f"{(job.get('arm64_presence') or {}).get('runtime')} "
        f"{(job.get('arm64_presence') or {}).get(job['runtime'])}, Python "
        f"{(job.get('arm64_presence') or {}).get('python')} |",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--total", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--when", help="the run's end, UTC (default now)")
    p.add_argument("--load", type=float, help="the 1-minute load average at its end (default now)")
    args = p.parse_args()
    run = args.run
    notes = rows(run / "notes.tsv")
    times = rows(run / "times.tsv")
    jobs = {path.stem[len("job-"):]: json.loads(path.read_text()) for path in sorted(run.glob("job-*.json"))}
    installed = {extra: int((run / f"install-bytes-{extra}").read_text()) / 2**20
                 for extra in ("edge-lite", "edge") if (run / f"install-bytes-{extra}").exists()}
    load = args.load if args.load is not None else os.getloadavg()[0]
    when = args.when or f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
    lines = [
        "# arm64 under emulation: the edge client on aarch64 (`make test-arm64`)",
        "",
        f"Run {when} UTC on {platform.machine()}, {os.cpu_count()} cores "
        f"(load average at the end {load:.2f}; the machine is shared); the arm64 side runs under qemu-user "
        "emulation (qemu-user-static through binfmt_misc), so its times are the emulator's, many times a real "
        "device's; they are here to show the path works end to end and how it scales, not as a device benchmark. "
        "The emulated CPU is a Cortex-A53 (QEMU_CPU; a Raspberry Pi Zero 2 W's and Pi 3's, ARMv8.0-A) unless a "
        "section says otherwise; qemu's default CPU, max, has every extension qemu knows (SVE, SME, ...), which "
        "no Pi has. What it does: bench/arm64/test-arm64.sh.",
        "",
        f"**Whole target: {args.total:.0f} s ({args.total / 60:.1f} min).**",
        "",
        "## Steps",
        "",
        "| step | s | exit |",
        "|---|---|---|",
        *[f"| {name} | {secs} | {rc} |" for name, secs, rc in times],
        "",
        "## Notes",
        "",
        *[f"- {key}: {text}" for key, text in notes],
        "",
        "## Installed size in the arm64 root (site-packages of a fresh venv, less its pip)",
        "",
        "| extra | MiB |",
        "|---|---|",
        *[f"| `.[{extra}]` | {mib:.1f} |" for extra, mib in installed.items()],
    ]
    for extra in installed:
        pkgs = (run / f"packages-{extra}.txt")
        if pkgs.exists():
            lines += ["", f"`.[{extra}]` on aarch64: {', '.join(pkgs.read_text().split())}"]
    for job in jobs.values():
        name, cpu = job["runtime"], job.get("qemu_cpu")
        if "probe_failed" in job:
            lines += ["", f"## `--runtime {name}` on an emulated {cpu}: does not start", "",
                      f"The cold-start probe exited {job['probe_failed']}; its last output:", "", "```",
                      job.get("probe_stderr", "").strip()[-1200:], "```"]
            continue
        lines += [
            "",
            f"## FedGen job, 2 rounds, mnist-subset: the arm64 device with `--runtime {name}` on an emulated {cpu}",
            "",
            "Broker, server (SQLite) and a second device (c1, lite, native) on the host; the arm64 device c0 in "
            "the root file system, over loopback. A 2-user alpha = 0.1 partition of the subset; both devices "
            "train in every round; one compute thread.",
            "",
            "| measure | value |",
            "|---|---|",
            *job_rows(job),
        ]
    parity = sorted(run.glob("parity-*.out"))
    if parity:
        lines += [
            "",
            "## torch against lite inside the root, per emulated CPU (bench/arm64/parity_probe.py)",
            "",
            "One FedAvg local update (T = 20, B = 32) by each runtime from the same start on the same batches; "
            "on x86 they agree within 5e-6 (tests/edge/test_lite_parity.py). Then a 64x300 @ 300x50 matrix "
            "product in torch, on 1 thread (the edge client's default) and on 2, against float64.",
            "",
            "| emulated CPU | lite loss | torch loss | max abs state difference | torch GEMM, 1 thread | "
            "2 threads | exit |",
            "|---|---|---|---|---|---|---|",
        ]
        for path in parity:
            parts, status = {}, "0"
            for line in path.read_text().splitlines():
                if line.startswith("{"):
                    part = json.loads(line)
                    parts[part["part"]] = part
                elif line.startswith("exit"):
                    status = line.split()[1]
            up = parts.get("update")
            signal = f" (signal {int(status) - 128}{': illegal instruction' if status == '132' else ''})" \
                if status.isdigit() and int(status) > 128 else ""
            diff = f"{up['max_state_diff']:.1e} ({up['worst_entry']})" if up else "n/a"
            products = [f"error {parts[k]['max_err']:.1e}" if k in parts else "did not finish"
                        for k in ("gemm1", "gemm2")]
            lines.append(f"| {path.stem[len('parity-'):]} | {fmt(up and up['lite_loss'], 6)} | "
                         f"{fmt(up and up['torch_loss'], 6)} | {diff} | {' | '.join(products)} | "
                         f"{status}{signal} |")
    if not any(j["runtime"] == "torch" and "probe_failed" not in j for j in jobs.values()):
        lines += ["", "## torch on arm64", "", "No torch job ran to the end: see the notes."]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
