"""`fedgen fleet`: the native equivalent of `docker compose up`: a broker, the server (SQLite by default) and N
edge-client processes, one per partition, on this machine. Writes run.json like `fedgen simulate`."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from server_api.devfleet.broker_process import find_free_port, start_broker
from server_api.resources import dev_broker_config
from server_api.settings import mask_url_password
from shared.data.datasets import dataset_folder
from shared.data.partition import PartitionSpec, format_partition
from shared.mqtt import BrokerAddress
from shared.simulation import BEST5_KEY, top_k_mean

log = logging.getLogger("fedgen.fleet")
BROKER_CHECK_TIMEOUT_S = 5.0
SERVER_START_TIMEOUT_S = 300.0


class FleetError(ValueError):
    """The fleet cannot start or run: a one-line reason for the terminal."""


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "\n  " + "\n  ".join(tail) if tail else ""
# FleetConfig fields left out of run.json: paths and secrets
_NOT_IN_SUMMARY = frozenset({"workdir", "extra_client_args", "broker_password", "client_passwords"})
EDGE_RUNTIMES = ("torch", "lite", "mixed")  # mixed: even device indices torch, odd ones lite


@dataclass
class FleetConfig:
    clients: int = 10
    rounds: int = 10
    algorithm: str = "fedgen"
    partial: bool = False
    dataset: str = "mnist-subset"
    alpha: float = 0.1
    seed: int = 0
    active: int | None = None  # default: half the clients, rounded up
    samples_per_class: int | None = 1000
    local_steps: int = 20
    round_timeout_s: int = 120
    aggregation: str = "mean"
    broker_url: str | None = None  # default: start one
    db_url: str | None = None  # default: SQLite in the work directory
    port: int | None = None
    data_dir: str | None = None
    workdir: Path | None = None
    keep_serving: bool = False
    progress: bool = True
    edge_runtime: str = "torch"  # the devices' --runtime: torch, lite, or mixed (EDGE_RUNTIMES)
    models: tuple[str, ...] = ()  # devices with different models (partial): device i runs models[i % len]
    extra_client_args: dict[int, list[str]] = field(default_factory=dict)
    # A secured broker (docs/broker.md, "Running a secured fleet"). The server logs in as broker_username with
    # broker_password (FEDGEN_BROKER_USERNAME/PASSWORD); client <index> logs in as its client id "c<index>"
    # with client_passwords[index] (--username, and FEDGEN_MQTT_PASSWORD, never the command line); both verify
    # the broker's TLS certificate with broker_tls_ca (FEDGEN_BROKER_TLS_CA / --tls-ca) on an mqtts:// URL.
    # server_broker_url: the server's own URL when it differs from the devices' broker_url (e.g. the
    # loopback plain listener of prod.conf while devices use TLS).
    server_broker_url: str | None = None
    broker_username: str | None = None
    broker_password: str | None = field(default=None, repr=False)
    broker_tls_ca: str | None = None
    client_passwords: dict[int, str] = field(default_factory=dict, repr=False)
    # server processes on the one database (`fedgen server --shared-subscription`, docs/scaling.md; cluster:
    # that mode even for one process); the REST API of each listens on its own port; lease_s: FEDGEN_LEASE_S
    servers: int = 1
    cluster: bool = False
    lease_s: float | None = None

    def __post_init__(self) -> None:
        if self.edge_runtime not in EDGE_RUNTIMES:
            raise ValueError(f"edge_runtime {self.edge_runtime!r}; known: {', '.join(EDGE_RUNTIMES)}")

    def runtime_of(self, index: int) -> str:
        """The ``--runtime`` of device `index`: mixed gives the even indices torch and the odd ones lite."""
        if self.edge_runtime == "mixed":
            return "torch" if index % 2 == 0 else "lite"
        return self.edge_runtime

    def model_of(self, index: int) -> str | None:
        """The ``--model`` of device `index` (None: the job's default)."""
        return self.models[index % len(self.models)] if self.models else None

    @property
    def active_clients(self) -> int:
        return self.active or math.ceil(self.clients / 2)

    @property
    def partition(self) -> PartitionSpec:
        """The partition the devices train on (one user each) and the server evaluates on."""
        return PartitionSpec(dataset=self.dataset, alpha=self.alpha, users=self.clients,
                             samples_per_class=self.samples_per_class, seed=self.seed)

    def job_config(self) -> dict:
        return {
            "id": f"fleet-{self.algorithm}{'-partial' if self.partial else ''}-{self.seed}",
            "dataset": self.dataset, "rounds": self.rounds, "active": self.active_clients,
            "min_clients": max(1, math.ceil(self.active_clients / 2)), "round_timeout_s": self.round_timeout_s,
            "seed": self.seed, "min_online": self.clients, "aggregation": self.aggregation,
            "algorithm": {"algorithm": self.algorithm, "partial": self.partial, "local_steps": self.local_steps,
                          **({"model": self.models[0], "models": list(self.models)} if self.models else {})},
            "server_eval": msgspec.to_builtins(self.partition),
        }

    def partition_spec(self, index: int | str) -> str:
        """The ``--partition`` argument of device `index` (a number, or ``auto``)."""
        return format_partition(self.partition, index)


def job_summary(rounds: list[dict], config: dict) -> dict:
    """run.json (the schema of `fedgen simulate`) from the REST API's round list."""
    closed = sorted((r for r in rounds if r["status"] == "closed"), key=lambda r: r["index"])
    records = [{"round": r["index"], "accuracy": r["accuracy"], "loss": r["loss"], "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"], "generator_loss": r.get("generator_loss"),
                "num_updates": r["num_updates"], "attempt": r["attempt"],
                **({"model_stats": r["model_stats"]} if r.get("model_stats") else {})} for r in closed]
    accuracies = [r["accuracy"] for r in records if r["accuracy"] is not None]
    return {"config": config, "rounds": records,
            "final_accuracy": accuracies[-1] if accuracies else None,
            BEST5_KEY: top_k_mean(accuracies, 5) if accuracies else None,
            "failed_rounds": sum(1 for r in rounds if r["status"] == "failed")}


class Fleet:
    """Starts and stops the processes; `run()` drives a job to its end."""

    def __init__(self, cfg: FleetConfig):
        self.cfg = cfg
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="fedgen-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(24)
        self.port = cfg.port or find_free_port()
        self.ports = [self.port] + [find_free_port() for _ in range(1, max(1, cfg.servers))]
        self.broker = None
        self.servers: dict[int, subprocess.Popen] = {}
        self.clients: dict[int, subprocess.Popen] = {}
        self.broker_url = cfg.broker_url
        self.api = f"http://127.0.0.1:{self.port}"

    @property
    def server(self) -> subprocess.Popen | None:
        """The first server process."""
        return self.servers.get(0)

    # ------------------------------------------------------------------------------------------ processes
    def preflight(self) -> None:
        """What would otherwise fail later, in a log file: the dataset is there, a given broker answers."""
        try:
            dataset_folder(self.cfg.dataset, self.cfg.data_dir)
        except ValueError as exc:
            raise FleetError(str(exc)) from None
        if self.broker_url:
            address = BrokerAddress.parse(self.broker_url)
            try:
                socket.create_connection((address.host, address.port), timeout=BROKER_CHECK_TIMEOUT_S).close()
            except OSError as exc:
                raise FleetError(f"cannot reach the broker at {self.broker_url}: {exc} (leave out --broker to "
                                 "start one)") from None

    def start_broker(self) -> None:
        if self.broker_url:
            return
        self.broker = start_broker(config=dev_broker_config(), workdir=self.workdir / "broker")
        self.broker_url = self.broker.url

    def start_servers(self) -> None:
        for index in range(len(self.ports)):
            self.start_server(index)

    def server_log(self, index: int = 0) -> Path:
        return self.workdir / ("server.log" if index == 0 else f"server-{index}.log")

    def start_server(self, index: int = 0) -> None:
        """Start server process `index` (of cfg.servers) and wait until its API answers."""
        env = {**os.environ, "FEDGEN_ADMIN_TOKEN": self.token,
               "FEDGEN_DATABASE_URL": self.cfg.db_url or f"sqlite:///{self.workdir / 'fedgen.db'}",
               "FEDGEN_BROKER_URL": self.broker_url, "FEDGEN_ARTIFACT_DIR": str(self.workdir / "artifacts"),
               "FEDGEN_HOST": "127.0.0.1", "FEDGEN_PORT": str(self.ports[index])}
        args = []
        if len(self.ports) > 1 or self.cfg.cluster:
            env["FEDGEN_CLIENT_ID"] = f"fedgen-server-{index}"
            args = ["--shared-subscription"]
            if self.cfg.lease_s is not None:
                env["FEDGEN_LEASE_S"] = str(self.cfg.lease_s)
        if self.cfg.server_broker_url:
            env["FEDGEN_BROKER_URL"] = self.cfg.server_broker_url
        for name, value in (("FEDGEN_BROKER_USERNAME", self.cfg.broker_username),
                            ("FEDGEN_BROKER_PASSWORD", self.cfg.broker_password),
                            ("FEDGEN_BROKER_TLS_CA", self.cfg.broker_tls_ca)):
            if value:
                env[name] = str(value)
        if self.cfg.data_dir:
            env["FEDGEN_DATA_DIR"] = self.cfg.data_dir
        log_file = open(self.server_log(index), "ab")  # lives as long as the process
        self.servers[index] = subprocess.Popen(
            [sys.executable, "-m", "server_api.cli", "-v", "server", *args], env=env, stdout=log_file,
            stderr=subprocess.STDOUT, process_group=0)  # Ctrl-C reaches only `fedgen fleet`, which stops it
        self._wait_healthy(index)

    def start_client(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "edge_client.cli", "--broker", self.broker_url, "--job", self.job_id,
               "--client-id", f"c{index}", "--partition", self.cfg.partition_spec(index),
               "--state-dir", str(self.workdir / "edge" / f"c{index}"), "--runtime", self.cfg.runtime_of(index),
               "--job-wait", "300", "-v"]  # the job is created first; 300 s covers a loaded machine
        if self.cfg.data_dir:
            cmd += ["--data-dir", self.cfg.data_dir]
        if self.cfg.model_of(index):
            cmd += ["--model", self.cfg.model_of(index)]
        env = dict(os.environ)
        if self.cfg.broker_tls_ca:
            cmd += ["--tls-ca", str(self.cfg.broker_tls_ca)]
        if index in self.cfg.client_passwords:
            cmd += ["--username", f"c{index}"]
            env["FEDGEN_MQTT_PASSWORD"] = self.cfg.client_passwords[index]
        cmd += self.cfg.extra_client_args.get(index, [])  # last: may override the options above
        log_file = open(self.workdir / f"edge-c{index}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, process_group=0)
        self.clients[index] = proc
        return proc

    def stop(self) -> None:
        for proc in [*self.clients.values(), *self.servers.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.clients.values(), *self.servers.values()]:
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.broker is not None:
            self.broker.stop()

    # ------------------------------------------------------------------------------------------ REST
    def request(self, method: str, path: str, body: dict | None = None, server: int | None = None) -> dict:
        """A call to the REST API of server `server`, or of the first running one (any of them serves it)."""
        data = json.dumps(body).encode() if body is not None else None
        index = server if server is not None else next(
            (i for i, proc in sorted(self.servers.items()) if proc.poll() is None), 0)
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[index]}{path}", data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def _wait_healthy(self, index: int = 0, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        log_path = self.server_log(index)
        proc = self.servers[index]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise FleetError(f"the server exited with status {proc.returncode}; the end of {log_path}:"
                                 f"{_log_tail(log_path)}")
            try:
                self.request("GET", "/health", server=index)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        raise FleetError(f"the server did not become healthy in {timeout} s; the end of {log_path}:"
                         f"{_log_tail(log_path)}")

    # ------------------------------------------------------------------------------------------ the run
    @property
    def job_id(self) -> str:
        return self.cfg.job_config()["id"]

    def rounds(self) -> list[dict]:
        return self.request("GET", f"/jobs/{self.job_id}/rounds?limit=1000")["items"]

    def run(self, out: Path | None = None, timeout: float | None = None) -> dict:
        self.preflight()
        self.start_broker()
        self.start_servers()
        self.request("POST", "/jobs", self.cfg.job_config())
        for index in range(self.cfg.clients):
            self.start_client(index)
        summary = self.wait(timeout)
        if out is not None:
            Path(out).write_text(json.dumps(summary, indent=1))
        return summary

    def summary(self, rounds: list[dict], status: str) -> dict:
        fleet_cfg = {k: v for k, v in self.cfg.__dict__.items() if k not in _NOT_IN_SUMMARY}
        if fleet_cfg.get("db_url"):
            fleet_cfg["db_url"] = mask_url_password(fleet_cfg["db_url"])
        summary = job_summary(rounds, {"fleet": fleet_cfg, "job": self.cfg.job_config()})
        summary["job_status"] = status
        return summary

    def wait(self, timeout: float | None = None) -> dict:
        """Poll the API until the job is finished (or failed), printing a line per closed round."""
        started, shown = time.monotonic(), set()
        while True:
            job = self.request("GET", f"/jobs/{self.job_id}")
            rounds = self.rounds()
            for r in sorted(rounds, key=lambda r: (r["index"], r["attempt"])):
                key = (r["index"], r["attempt"], r["status"])
                if r["status"] in ("closed", "failed") and key not in shown and self.cfg.progress:
                    shown.add(key)
                    print(round_line(r), flush=True)
            if job["status"] in ("finished", "failed", "cancelled"):
                if job["status"] != "finished" and job.get("error") and self.cfg.progress:
                    print(f"job {job['status']}: {job['error']}", flush=True)
                return self.summary(rounds, job["status"])
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"job {self.job_id} not finished after {timeout} s (workdir {self.workdir})")
            time.sleep(1.0)


def round_line(r: dict) -> str:
    """One closed or failed round attempt, as `fedgen fleet` prints it."""
    acc = f"{100 * r['accuracy']:6.2f}%" if r["accuracy"] is not None else "    n/a"
    reason = f"  ({r['failure_reason']})" if r.get("failure_reason") else ""
    return (f"round {r['index']:>3} (attempt {r['attempt']}) {r['status']:<6} updates {r['num_updates']:>3}  "
            f"accuracy {acc}  up {r['bytes_up']:>9,} B  down {r['bytes_down']:>10,} B{reason}")


def run_fleet(cfg: FleetConfig, out: Path | None = None) -> dict:
    fleet = Fleet(cfg)
    summary: dict = {}
    try:
        summary = fleet.run(out)
        if cfg.keep_serving:
            print(f"serving on {fleet.api} (broker {fleet.broker_url}); Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
        return summary
    except KeyboardInterrupt:
        if not summary:
            summary = _partial_summary(fleet, out)
        return summary
    finally:
        fleet.stop()


def _partial_summary(fleet: Fleet, out: Path | None) -> dict:
    """After Ctrl-C: the rounds closed so far, as run.json with job_status "interrupted" (written to `out`)."""
    try:
        rounds = fleet.rounds()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, ValueError, KeyError):
        rounds = []
    summary = fleet.summary(rounds, "interrupted")
    if out is not None:
        Path(out).write_text(json.dumps(summary, indent=1))
    print(f"\ninterrupted: {len(summary['rounds'])} closed round(s) kept"
          f"{f' in {out}' if out is not None else ''}; stopping the fleet", file=sys.stderr, flush=True)
    return summary
