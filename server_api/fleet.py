"""`fedgen fleet`: the native equivalent of `docker compose up`: a broker, the server (SQLite by default) and N
edge-client processes, one per partition, on this machine. Writes run.json like `fedgen simulate`."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from server_api.broker_process import find_free_port, start_broker
from server_api.settings import mask_url_password

log = logging.getLogger("fedgen.fleet")
# FleetConfig fields left out of run.json: paths and secrets
_NOT_IN_SUMMARY = frozenset({"workdir", "extra_client_args", "broker_password", "client_passwords"})
REPO_BROKER_CONFIG = Path(__file__).resolve().parents[1] / "broker" / "mosquitto" / "dev.conf"


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

    @property
    def active_clients(self) -> int:
        return self.active or math.ceil(self.clients / 2)

    def job_config(self) -> dict:
        spc = self.samples_per_class
        return {
            "id": f"fleet-{self.algorithm}{'-partial' if self.partial else ''}-{self.seed}",
            "dataset": self.dataset, "rounds": self.rounds, "active": self.active_clients,
            "min_clients": max(1, math.ceil(self.active_clients / 2)), "round_timeout_s": self.round_timeout_s,
            "seed": self.seed, "min_online": self.clients, "aggregation": self.aggregation,
            "algorithm": {"algorithm": self.algorithm, "partial": self.partial, "local_steps": self.local_steps},
            "server_eval": {"dataset": self.dataset, "alpha": self.alpha, "users": self.clients,
                            "samples_per_class": spc, "seed": self.seed},
        }

    def partition_spec(self, index: int) -> str:
        spc = "all" if self.samples_per_class is None else self.samples_per_class
        return f"{self.dataset}:alpha={self.alpha:g}:users={self.clients}:index={index}:spc={spc}:seed={self.seed}"


def job_summary(rounds: list[dict], config: dict) -> dict:
    """run.json (the schema of `fedgen simulate`) from the REST API's round list."""
    closed = sorted((r for r in rounds if r["status"] == "closed"), key=lambda r: r["index"])
    records = [{"round": r["index"], "accuracy": r["accuracy"], "loss": r["loss"], "bytes_up": r["bytes_up"],
                "bytes_down": r["bytes_down"], "generator_loss": r.get("generator_loss"),
                "num_updates": r["num_updates"], "attempt": r["attempt"]} for r in closed]
    accuracies = [r["accuracy"] for r in records if r["accuracy"] is not None]
    top5 = sorted(accuracies, reverse=True)[:5]
    return {"config": config, "rounds": records,
            "final_accuracy": accuracies[-1] if accuracies else None,
            "top5_accuracy": sum(top5) / len(top5) if top5 else None,
            "failed_rounds": sum(1 for r in rounds if r["status"] == "failed")}


class Fleet:
    """Starts and stops the processes; `run()` drives a job to its end."""

    def __init__(self, cfg: FleetConfig):
        self.cfg = cfg
        self.workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="fedgen-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(24)
        self.port = cfg.port or find_free_port()
        self.broker = None
        self.server: subprocess.Popen | None = None
        self.clients: dict[int, subprocess.Popen] = {}
        self.broker_url = cfg.broker_url
        self.api = f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------------------------------ processes
    def start_broker(self) -> None:
        if self.broker_url:
            return
        self.broker = start_broker(config=REPO_BROKER_CONFIG, workdir=self.workdir / "broker")
        self.broker_url = self.broker.url

    def start_server(self) -> None:
        env = {**os.environ, "FEDGEN_ADMIN_TOKEN": self.token,
               "FEDGEN_DATABASE_URL": self.cfg.db_url or f"sqlite:///{self.workdir / 'fedgen.db'}",
               "FEDGEN_BROKER_URL": self.broker_url, "FEDGEN_ARTIFACT_DIR": str(self.workdir / "artifacts"),
               "FEDGEN_HOST": "127.0.0.1", "FEDGEN_PORT": str(self.port)}
        if self.cfg.server_broker_url:
            env["FEDGEN_BROKER_URL"] = self.cfg.server_broker_url
        for name, value in (("FEDGEN_BROKER_USERNAME", self.cfg.broker_username),
                            ("FEDGEN_BROKER_PASSWORD", self.cfg.broker_password),
                            ("FEDGEN_BROKER_TLS_CA", self.cfg.broker_tls_ca)):
            if value:
                env[name] = str(value)
        if self.cfg.data_dir:
            env["FEDGEN_DATA_DIR"] = self.cfg.data_dir
        log_file = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.server = subprocess.Popen([sys.executable, "-m", "shared.cli", "-v", "server"], env=env,
                                       stdout=log_file, stderr=subprocess.STDOUT)
        self._wait_healthy()

    def start_client(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "edge_client.cli", "--broker", self.broker_url, "--job", self.job_id,
               "--client-id", f"c{index}", "--partition", self.cfg.partition_spec(index),
               "--state-dir", str(self.workdir / "edge" / f"c{index}"), "-v"]
        if self.cfg.data_dir:
            cmd += ["--data-dir", self.cfg.data_dir]
        env = dict(os.environ)
        if self.cfg.broker_tls_ca:
            cmd += ["--tls-ca", str(self.cfg.broker_tls_ca)]
        if index in self.cfg.client_passwords:
            cmd += ["--username", f"c{index}"]
            env["FEDGEN_MQTT_PASSWORD"] = self.cfg.client_passwords[index]
        cmd += self.cfg.extra_client_args.get(index, [])  # last: may override the options above
        log_file = open(self.workdir / f"edge-c{index}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        self.clients[index] = proc
        return proc

    def stop(self) -> None:
        for proc in [*self.clients.values(), self.server]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [*self.clients.values(), self.server]:
            if proc is not None:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.broker is not None:
            self.broker.stop()

    # ------------------------------------------------------------------------------------------ REST
    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def _wait_healthy(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RuntimeError(f"the server exited ({self.server.returncode}); see {self.workdir / 'server.log'}")
            try:
                self.request("GET", "/health")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        raise TimeoutError(f"the server did not become healthy in {timeout} s; see {self.workdir / 'server.log'}")

    # ------------------------------------------------------------------------------------------ the run
    @property
    def job_id(self) -> str:
        return self.cfg.job_config()["id"]

    def rounds(self) -> list[dict]:
        return self.request("GET", f"/jobs/{self.job_id}/rounds?limit=1000")["items"]

    def run(self, out: Path | None = None, timeout: float | None = None) -> dict:
        self.start_broker()
        self.start_server()
        self.request("POST", "/jobs", self.cfg.job_config())
        for index in range(self.cfg.clients):
            self.start_client(index)
        summary = self.wait(timeout)
        if out is not None:
            Path(out).write_text(json.dumps(summary, indent=1))
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
                    acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "n/a"
                    print(f"round {r['index']:>3}.{r['attempt']} {r['status']:<6} updates {r['num_updates']:>3}"
                          f"  accuracy {acc}  up {r['bytes_up']:>9,} B  down {r['bytes_down']:>10,} B", flush=True)
            if job["status"] in ("finished", "failed"):
                fleet_cfg = {k: v for k, v in self.cfg.__dict__.items() if k not in _NOT_IN_SUMMARY}
                if fleet_cfg.get("db_url"):
                    fleet_cfg["db_url"] = mask_url_password(fleet_cfg["db_url"])
                summary = job_summary(rounds, {"fleet": fleet_cfg,
                                               "job": self.cfg.job_config()})
                summary["job_status"] = job["status"]
                return summary
            if timeout is not None and time.monotonic() - started > timeout:
                raise TimeoutError(f"job {self.job_id} not finished after {timeout} s (workdir {self.workdir})")
            time.sleep(1.0)


def run_fleet(cfg: FleetConfig, out: Path | None = None) -> dict:
    fleet = Fleet(cfg)
    try:
        summary = fleet.run(out)
        if cfg.keep_serving:
            print(f"serving on {fleet.api} (broker {fleet.broker_url}); Ctrl-C to stop", flush=True)
            while True:
                time.sleep(3600)
        return summary
    except KeyboardInterrupt:
        return {}
    finally:
        fleet.stop()
