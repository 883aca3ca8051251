"""Cross-device scale: updates accepted and acknowledged by the server per second against raw Mosquitto's
delivery rate for the same payloads, with the server's peak memory and round-close time, for rounds of N
devices; and how long the round takes to open when the N devices' presences arrive at once (a fleet coming
online). Writes bench/results/scale.md; its last line printed is one JSON object for the largest run.

    python bench/scale.py [--devices 1000,3000,10000] [--db sqlite,postgres] [--mode partial,full]
                          [--batch 256,1] [--backlog 1000,0] [--servers 1,2] [--repeats N] [--pg-url URL]
                          [--out FILE]

One paho connection publishes the round's N updates (valid FedAvg updates crafted for N device ids; the
server cannot tell them from N devices) at QoS 1 and collects the acks. "raw" publishes the same payloads
through the same broker to a plain paho subscriber, in the same run. `--batch` compares the ingest group
size (FEDGEN_INGEST_BATCH: updates stored per transaction; 1 is one transaction per update); `--backlog` the
server's bound on received, unhandled messages (FEDGEN_MAX_BACKLOG; 0: none, the link reads everything);
`--servers` the number of server processes sharing the ingest (2: `fedgen server --shared-subscription`
twice on the same database, docs/scaling.md; peak RSS is then the sum of the processes' peaks).
`--repeats N` runs everything N times over (raw Mosquitto again each time) and reports medians: lost and
duplicated are summed over the repeats, peak RSS is the largest.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server_api.devfleet.broker_process import start_broker  # noqa: E402
from server_api.devfleet.fleet import Fleet, FleetConfig  # noqa: E402
from server_api.resources import dev_broker_config  # noqa: E402
from server_api.rounds.runtime import JobRuntime  # noqa: E402
from shared.fsutil import sha256_hex  # noqa: E402
from shared.protocol.codec import convert  # noqa: E402
from shared.protocol.frames import split_chunks  # noqa: E402
from shared.protocol.job import JobConfig  # noqa: E402
from shared.protocol.messages import UpdateHeader, decode_ack, encode_update  # noqa: E402
from shared.protocol.tensors import encode_tensors  # noqa: E402
from shared.protocol.topics import Topics  # noqa: E402


class Collector:
    """A paho connection that counts what arrives on its subscriptions."""

    def __init__(self, port: int, client_id: str):
        self.count = 0
        self.keys: dict[str, list[str]] = {}
        self.done = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.acks = False

    def _on_message(self, client, userdata, msg) -> None:
        with self.done:
            self.count += 1
            if self.acks:
                ack = decode_ack(msg.payload)
                self.keys.setdefault(ack.idempotency_key, []).append(ack.status)
            self.done.notify_all()

    def subscribe(self, topic: str) -> None:
        result, _ = self.client.subscribe(topic, qos=1)
        assert result == paho.MQTT_ERR_SUCCESS
        time.sleep(0.3)

    def wait(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.done:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.done.wait(left)
        return True

    def publish_all(self, items: list[tuple[str, bytes]], retain: bool = False) -> None:
        infos = [self.client.publish(t, p, qos=1, retain=retain) for t, p in items]
        for info in infos:
            info.wait_for_publish(600)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def job_config(job: str, devices: int, mode: str) -> dict:
    return {"id": job, "dataset": "mnist-subset", "rounds": 1, "active": devices, "min_online": devices,
            "min_clients": 1, "round_timeout_s": 3600, "seed": 1,
            "algorithm": {"algorithm": "fedavg", "partial": mode == "partial"}}


def crafted_updates(config: dict, ids: list[str]) -> tuple[list[tuple[str, bytes]], int]:
    """One valid round-0 update per id (chunk frames on its update topic), and the payload size of one."""
    spec = JobRuntime(convert(JobConfig, config, "job")).upload_spec()
    rng = np.random.default_rng(0)
    tensors = {k: (rng.standard_normal(shape) * 0.01).astype(dtype) for k, (shape, dtype) in spec.items()}
    first = next(iter(tensors))
    topics, items, size = Topics(config["id"]), [], 0
    for i, client in enumerate(ids):
        tensors[first].flat[0] = 1e-6 * i  # every device's payload is its own (no blob is written twice)
        blob = encode_tensors(tensors)
        header = UpdateHeader(job=config["id"], round=0, attempt=0, client=client, base_version=0, num_samples=20,
                              label_counts=[2] * 10, idempotency_key=uuid.uuid4().hex,
                              tensors_sha256=sha256_hex(blob), metrics={})
        envelope = encode_update(header, blob)
        size = len(envelope)
        items += [(topics.update(client), chunk) for chunk in split_chunks(envelope, header.idempotency_key)]
    return items, size


def raw_rate(port: int, items: list[tuple[str, bytes]]) -> float:
    """Messages per second from one publisher to one subscriber through the broker, same payloads."""
    sub = Collector(port, f"raw-sub-{uuid.uuid4().hex[:6]}")
    pub = Collector(port, f"raw-pub-{uuid.uuid4().hex[:6]}")
    sub.subscribe("bench/raw/#")
    started = time.monotonic()
    pub.publish_all([(f"bench/raw/{i}", payload) for i, (_, payload) in enumerate(items)])
    assert sub.wait(len(items), 600), f"raw: {sub.count} of {len(items)} delivered"
    elapsed = time.monotonic() - started
    sub.close()
    pub.close()
    return len(items) / elapsed


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def server_run(broker_url: str, port: int, devices: int, mode: str, db_url: str | None, batch: int,
               workdir: Path, backlog: int = 1000, servers: int = 1) -> dict:
    job = f"scale-{mode}-{devices}-b{batch}-q{backlog}-s{servers}"
    config = job_config(job, devices, mode)
    ids = [f"d{i:06d}" for i in range(devices)]
    items, size = crafted_updates(config, ids)
    os.environ["FEDGEN_INGEST_BATCH"] = str(batch)
    os.environ["FEDGEN_MAX_BACKLOG"] = str(backlog)
    fleet = Fleet(FleetConfig(clients=0, broker_url=broker_url, db_url=db_url, workdir=workdir / job,
                              progress=False, servers=servers))
    raw = Collector(port, f"bench-{job}")
    try:
        fleet.start_servers()
        fleet.request("POST", "/jobs", config)
        topics = Topics(job)
        raw.acks = True
        raw.subscribe(f"{topics.base}/clients/+/ack")
        online_from = time.monotonic()  # the fleet comes online at once: the round opens once all are seen
        raw.publish_all([(topics.presence(c), json.dumps({"status": "online", "num_samples": 20}).encode())
                         for c in ids], retain=True)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            rounds = fleet.request("GET", f"/jobs/{job}/rounds")["items"]
            if rounds:
                break
            time.sleep(0.1)
        assert rounds, "round 0 did not open"
        open_s = time.monotonic() - online_from
        rss_before = sum(peak_rss_mib(proc.pid) for proc in fleet.servers.values())
        started = time.monotonic()
        raw.publish_all(items)
        assert raw.wait(devices, 1200), f"{raw.count} of {devices} acks"
        elapsed = time.monotonic() - started
        statuses = [s for v in raw.keys.values() for s in v]
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline:
            (rnd,) = fleet.request("GET", f"/jobs/{job}/rounds")["items"]
            if rnd["status"] in ("closed", "failed"):
                break
            time.sleep(0.5)
        close_s = (np.datetime64(rnd["closed_at"]) - np.datetime64(rnd["started_at"])) / np.timedelta64(1, "s") \
            if rnd["closed_at"] else float("nan")
        return {"devices": devices, "mode": mode, "batch": batch, "backlog": backlog, "payload_bytes": size,
                "seconds": elapsed,
                "server_per_s": devices / elapsed, "accepted": statuses.count("accepted"),
                "lost": devices - len(raw.keys), "duplicated": sum(len(v) - 1 for v in raw.keys.values()),
                "num_updates": rnd["num_updates"], "round_status": rnd["status"],
                "round_seconds_after_last_ack": close_s - elapsed if close_s == close_s else None,
                "peak_rss_mib": sum(peak_rss_mib(proc.pid) for proc in fleet.servers.values()),
                "rss_before_mib": rss_before, "servers": servers, "open_after_presence_s": open_s}
    finally:
        raw.close()
        fleet.stop()
        shutil.rmtree(workdir / job, ignore_errors=True)  # up to a GB of blobs per run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1000,3000,10000")
    parser.add_argument("--db", default="sqlite", help="sqlite, postgres or both (comma-separated)")
    parser.add_argument("--pg-url", default=os.environ.get("FEDGEN_TEST_POSTGRES_URL",
                                                           "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--mode", default="partial", help="partial (theta^p uploads), full, or both")
    parser.add_argument("--batch", default="256,1", help="FEDGEN_INGEST_BATCH values to compare")
    parser.add_argument("--backlog", default="1000", help="FEDGEN_MAX_BACKLOG values to compare (0: unbounded)")
    parser.add_argument("--servers", default="1", help="server processes sharing the ingest, values to compare")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every configuration (medians reported)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedgen-scale"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.md")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)  # a fresh database and store per run
    broker = start_broker(config=dev_broker_config(), workdir=args.workdir / "broker")
    rows = []
    try:
        for rep in range(args.repeats):
            rows += measure_all(args, broker, rep)
    finally:
        broker.stop()
    rows = medians(rows)
    write_report(rows, args)
    largest = max(rows, key=lambda r: (r["devices"], r["batch"], r["db"] == "sqlite", r["mode"] == "full",
                                       r["servers"]))
    print(json.dumps({k: largest[k] for k in ("devices", "server_per_s", "raw_per_s", "ratio", "lost",
                                              "duplicated", "peak_rss_mib", "batch", "backlog", "mode", "db",
                                              "servers", "repeats")}))
    return 0


def measure_all(args: argparse.Namespace, broker, rep: int) -> list[dict]:
    """One run (`rep`) of every configuration, raw Mosquitto measured before each (mode, devices)."""
    rows = []
    for mode in args.mode.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            items, _ = crafted_updates(job_config("raw", devices, mode), [f"d{i:06d}" for i in range(devices)])
            raw = raw_rate(broker.port, items)
            for db, batch, backlog, servers in itertools.product(
                    args.db.split(","), *([int(v) for v in values.split(",")]
                                          for values in (args.batch, args.backlog, args.servers))):
                db_url = None
                if db == "postgres":
                    db_url = fresh_postgres(args.pg_url, f"fedgen_scale_{mode}_{devices}_{batch}_{backlog}_{servers}")
                row = server_run(broker.url, broker.port, devices, mode, db_url, batch,
                                 args.workdir / f"r{rep}" / db, backlog, servers)
                row.update(raw_per_s=raw, ratio=row["server_per_s"] / raw, db=db)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def medians(rows: list[dict]) -> list[dict]:
    """One row per configuration: medians of the rates and times over its repeats, lost and duplicated
    summed, the largest peak RSS; `repeats` and the rates' range (min-max) added."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["devices"], r["db"], r["batch"], r["backlog"], r["servers"]), []).append(r)
    out = []
    for runs in groups.values():
        row = dict(runs[0])
        for key in ("seconds", "server_per_s", "raw_per_s", "ratio", "open_after_presence_s"):
            row[key] = statistics.median(r[key] for r in runs)
        closes = [r["round_seconds_after_last_ack"] for r in runs if r["round_seconds_after_last_ack"] is not None]
        row["round_seconds_after_last_ack"] = statistics.median(closes) if closes else None
        row.update(lost=sum(r["lost"] for r in runs), duplicated=sum(r["duplicated"] for r in runs),
                   accepted=sum(r["accepted"] for r in runs), peak_rss_mib=max(r["peak_rss_mib"] for r in runs),
                   repeats=len(runs), server_range=(min(r["server_per_s"] for r in runs),
                                                    max(r["server_per_s"] for r in runs)))
        out.append(row)
    return out


def fresh_postgres(url: str, name: str) -> str:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    lines = ["# Ingest at scale: the server against raw Mosquitto", "",
             f"`python bench/scale.py --devices {args.devices} --db {args.db} --mode {args.mode} --batch "
             f"{args.batch} --backlog {args.backlog} --servers {args.servers} --repeats {args.repeats}` on "
             f"{platform.machine()} "
             f"({os.cpu_count()} cores), Python "
             f"{platform.python_version()}. "
             "One publisher, QoS 1; raw: the same payloads to a plain paho subscriber through the same broker, "
             "in the same run. Server: accepted and acknowledged updates per second, from the first publish to "
             "the last ack; peak RSS of the server process (VmHWM). A shared, noisy machine: compare the rows of "
             "one run. With repeats: medians (the server's range over the repeats in brackets), lost and "
             "duplicated summed over them, the largest peak RSS.", "",
             "| mode | database | devices | payload (B) | ingest batch | max backlog | server processes "
             "| server (upd/s) | raw (msg/s) | server / raw | lost | duplicated | accepted "
             "| round closed after the last ack (s) | peak RSS (MiB) | round open after the presences (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['db']} | {r['devices']:,} | {r['payload_bytes']:,} | {r['batch']} | "
                     f"{r['backlog'] or 'none'} | {r.get('servers', 1)} | "
                     f"{r['server_per_s']:.0f}{_range(r)} | "
                     f"{r['raw_per_s']:.0f} | {r['ratio']:.3f} | {r['lost']} | {r['duplicated']} | {r['accepted']:,} | "
                     f"{_seconds(r.get('round_seconds_after_last_ack'))} | {r['peak_rss_mib']:.0f} | "
                     f"{_seconds(r.get('open_after_presence_s'))} |")
    plot = args.out.with_suffix(".png")
    write_plot(rows, plot)
    lines += ["", f"![throughput, ratio, round close and peak RSS against the number of devices]({plot.name})"]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out} and {plot}")


def _range(row: dict) -> str:
    low, high = row.get("server_range", (0, 0))
    return f" [{low:.0f}-{high:.0f}]" if row.get("repeats", 1) > 1 else ""


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def write_plot(rows: list[dict], path: Path) -> None:
    """Throughput, server/raw ratio, round-close time and peak RSS against the number of devices, one line
    per (mode, database, batch, backlog)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("server_per_s", "server (updates/s)"), ("ratio", "server / raw Mosquitto"),
              ("round_seconds_after_last_ack", "round closed after the last ack (s)"),
              ("peak_rss_mib", "server peak RSS (MiB)"))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    series: dict[tuple, list[dict]] = {}
    for r in rows:
        series.setdefault((r["mode"], r["db"], r["batch"], r["backlog"], r.get("servers", 1)), []).append(r)
    for (mode, db, batch, backlog, servers), points in series.items():
        points = sorted(points, key=lambda p: p["devices"])
        for ax, (key, _) in zip(axes, panels):
            ax.plot([p["devices"] for p in points], [p.get(key) or float("nan") for p in points], marker="o",
                    label=f"{mode}, {db}, batch {batch}, backlog {backlog or 'none'}, {servers} server(s)")
    for ax, (_, title) in zip(axes, panels):
        ax.set_xscale("log")
        ax.set_xlabel("devices in the round")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
