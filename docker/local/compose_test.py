"""`make compose-test`: compose.yaml really run, on a machine that reaches no image registry.

1. starts dockerd when none answers;
2. builds the base image fedgen-base:bookworm from a Debian root file system (mmdebstrap, Debian's packages:
   Python 3.11, Mosquitto, PostgreSQL) unless it exists;
3. builds the wheels of `.[server,edge]` on the host into docker/wheels/ (pip, from what the host can reach);
4. builds the server and edge images from them (no network inside the build) and runs
   `docker-compose up --scale edge=N` with docker/local/compose.local.yaml;
5. waits, through the REST API, until the demo job finishes, and checks its rounds, the label counts its devices
   reported and the dashboard;
6. tears everything down with its volumes (also on failure or Ctrl-C).

Exit status 0 when every check passed. Needs root (dockerd, mmdebstrap), docker.io, docker-compose and
mmdebstrap (apt-get install docker.io docker-compose mmdebstrap).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "fedgen-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,mosquitto,mosquitto-clients,postgresql,ca-certificates"
PROJECT = "fedgen-compose-test"


def log(text: str) -> None:
    print(f"compose-test: {text}", flush=True)


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_dockerd(timeout: float = 60) -> None:
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return
    log("starting dockerd (log: /tmp/fedgen-dockerd.log)")
    with open("/tmp/fedgen-dockerd.log", "ab") as out:
        subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit("compose-test: dockerd did not answer within a minute (see /tmp/fedgen-dockerd.log)")
        time.sleep(1)


def ensure_base_image(rebuild: bool) -> None:
    if not rebuild and subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode == 0:
        return
    log(f"building {BASE_IMAGE} with mmdebstrap (Debian bookworm: {BASE_PACKAGES})")
    with tempfile.TemporaryDirectory() as tmp:
        tar = Path(tmp) / "rootfs.tar"
        run("mmdebstrap", "--quiet", "--variant=apt", f"--include={BASE_PACKAGES}", "bookworm", str(tar))
        run("docker", "import", str(tar), BASE_IMAGE, stdout=subprocess.DEVNULL)


def build_wheels() -> None:
    wheels = REPO / "docker" / "wheels"
    log(f"building the wheels of .[server,edge] into {wheels.relative_to(REPO)}/")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), f"{REPO}[server,edge]",
        "setuptools>=77", cwd=REPO)
    for own in wheels.glob("fedgen_fleet-*.whl"):  # the images install the project from its source
        own.unlink()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def wait_for_job(api: str, job: str, timeout: float) -> dict:
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            status = get_json(f"{api}/jobs/{job}")
        except OSError:
            time.sleep(2)
            continue
        if (status["status"], status["current_round"]) != last:
            last = (status["status"], status["current_round"])
            log(f"job {job}: {status['status']}, round {status['current_round']}")
        if status["status"] in ("finished", "failed", "cancelled"):
            return status
        time.sleep(2)
    raise SystemExit(f"compose-test: job {job} did not finish within {timeout:.0f} s")


def check_fleet(api: str, job: str, edges: int) -> list[str]:
    """What is wrong with the finished job (empty: nothing)."""
    problems = []
    spec = json.loads((REPO / "docker" / "demo-job.json").read_text())
    status = get_json(f"{api}/jobs/{job}")
    if status["status"] != "finished":
        problems.append(f"job status {status['status']} ({status.get('error')})")
    rounds = get_json(f"{api}/jobs/{job}/rounds?limit=1000")["items"]
    closed = sorted({r["index"] for r in rounds if r["status"] == "closed"})
    if closed != list(range(spec["rounds"])):
        problems.append(f"closed rounds {closed}, expected 0..{spec['rounds'] - 1}")
    if rounds and not (rounds[-1].get("accuracy") or 0) > 0.5:
        problems.append(f"last round's accuracy {rounds[-1].get('accuracy')}")
    clients = get_json(f"{api}/clients?job_id={job}&limit=1000")["items"]
    if len(clients) != edges:
        problems.append(f"{len(clients)} devices registered, expected {edges}")
    for update in get_json(f"{api}/jobs/{job}/rounds/0")["attempts"][-1]["updates"]:
        counts = update.get("label_counts") or []
        if update["status"] == "accepted" and sum(counts) != update["num_samples"]:
            problems.append(f"{update['client_id']}: label counts {counts} do not sum to {update['num_samples']}")
    with urllib.request.urlopen(f"{api}/", timeout=10) as resp:
        if b"FedGen" not in resp.read():
            problems.append("the dashboard page does not load")
    dashboard = get_json(f"{api}/jobs/{job}/dashboard")
    if len(dashboard["rounds"]) < spec["rounds"] or dashboard["clients_total"] != edges:
        problems.append(f"dashboard: {len(dashboard['rounds'])} rounds, {dashboard['clients_total']} clients")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edges", type=int, default=12, help="edge replicas (default 12)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds the demo job may take (default 1200)")
    p.add_argument("--rebuild-base", action="store_true", help=f"rebuild {BASE_IMAGE} even if it exists")
    p.add_argument("--keep", action="store_true", help="leave the fleet running (tear down by hand)")
    args = p.parse_args(argv)
    for tool in ("docker", "docker-compose", "mmdebstrap"):
        if shutil.which(tool) is None:
            raise SystemExit(f"compose-test: {tool} not found (apt-get install docker.io docker-compose mmdebstrap)")
    started = time.monotonic()
    ensure_dockerd()
    ensure_base_image(args.rebuild_base)
    build_wheels()
    http_port, mqtt_port = free_port(), free_port()
    env = {**os.environ, "FEDGEN_BASE_IMAGE": BASE_IMAGE, "FEDGEN_HTTP_PORT": str(http_port),
           "FEDGEN_MQTT_PORT": str(mqtt_port)}
    compose = ["docker-compose", "-p", PROJECT, "-f", str(REPO / "compose.yaml"),
               "-f", str(REPO / "docker" / "local" / "compose.local.yaml")]
    api = f"http://127.0.0.1:{http_port}"
    try:
        log("building the server and edge images (offline, from docker/wheels/)")
        run(*compose, "build", env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        log(f"docker-compose up --scale edge={args.edges} (dashboard: {api}/)")
        run(*compose, "up", "-d", "--scale", f"edge={args.edges}", env=env, cwd=REPO)
        wait_for_job(api, "demo", args.timeout)
        problems = check_fleet(api, "demo", args.edges)
    finally:
        if not args.keep:
            subprocess.run([*compose, "logs", "--no-color", "--tail=30", "server"], env=env, cwd=REPO,
                           stdout=open("/tmp/fedgen-compose-test-server.log", "w"), check=False)
            subprocess.run([*compose, "down", "-v", "--remove-orphans"], env=env, cwd=REPO, check=False,
                           capture_output=True)
    for problem in problems:
        log(f"FAILED: {problem}")
    log(f"{'passed' if not problems else 'failed'} in {time.monotonic() - started:.0f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
