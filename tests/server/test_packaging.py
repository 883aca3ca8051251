"""The server from a wheel, not the checkout: `pip install` of the built wheel (not editable) into a fresh virtual
environment outside the repository, then `fedgen server` starts there, runs its migrations (shipped inside the
wheel) and answers /health.

The fresh environment takes the wheel's dependencies from the suite's own environment (a .pth line), so the test
needs no network; everything of the project itself comes from the wheel.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from shared.algorithm.config import MODELS as MODEL_NAMES

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = (root / "dist").glob("fedgen_fleet-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", where], check=True, capture_output=True,
                               text=True).stdout.strip())
    (site / "suite-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    return venv


def test_the_wheel_carries_migrations_and_broker_configs(wheel_env: Path):
    code = ("import server_api, server_api.resources as r; print(json.dumps([server_api.__file__, "
            "str(r.shipped_dir('migrations')), str(r.dev_broker_config())]))")
    out = subprocess.run([str(wheel_env / "bin" / "python"), "-c", f"import json; {code}"], check=True,
                         capture_output=True, text=True, cwd="/", timeout=120).stdout
    package, migrations, broker = (Path(p) for p in json.loads(out))
    assert wheel_env in package.parents and REPO not in package.parents  # the wheel's copy, not the checkout
    assert wheel_env in migrations.parents and (migrations / "env.py").is_file()
    assert sorted(p.name for p in (migrations / "versions").glob("0*.py"))[0] == "0001_initial.py"
    assert wheel_env in broker.parents and broker.is_file()


def test_the_wheel_carries_the_shipped_onnx_graphs(wheel_env: Path):
    code = ("import json, shared.protocol.onnx_export as e; "
            "print(json.dumps([str(e.TEMPLATE_DIR), sorted(p.name for p in e.TEMPLATE_DIR.glob('*.onnx'))]))")
    out = subprocess.run([str(wheel_env / "bin" / "python"), "-c", code], check=True, capture_output=True,
                         text=True, cwd="/", timeout=120).stdout
    where, names = json.loads(out)
    assert wheel_env in Path(where).parents
    assert names == sorted(p.name for p in (REPO / "shared" / "protocol" / "onnx_templates").glob("*.onnx"))
    # one split-classifier graph per shipped model, the predictor-only graph and the generator
    assert sum(n.startswith("splitclassifier-") for n in names) == len(MODEL_NAMES)
    assert sum(n.startswith("_predictoronly-") for n in names) == 1
    assert sum(n.startswith("generator-") for n in names) == 1


def test_fedgen_server_from_the_wheel_migrates_and_answers_health(wheel_env: Path, tmp_path: Path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDGEN_")}
    env.update(FEDGEN_DATABASE_URL=f"sqlite:///{tmp_path / 'fedgen.db'}", FEDGEN_PORT=str(port),
               FEDGEN_ARTIFACT_DIR=str(tmp_path / "artifacts"), FEDGEN_BROKER_URL=f"mqtt://127.0.0.1:{_free_port()}")
    proc = subprocess.Popen([str(wheel_env / "bin" / "fedgen"), "server"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        body, deadline = None, time.monotonic() + 120
        while body is None and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    body = json.loads(response.read())
            except urllib.error.HTTPError as exc:  # 503: degraded (no broker here), but it answers
                body = json.loads(exc.read())
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        assert body is not None, "the server did not answer /health"
        assert body["database"] == "ok" and body["broker"] == "disconnected"
        with sqlite3.connect(tmp_path / "fedgen.db") as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"jobs", "rounds", "updates", "alembic_version"} <= tables
    finally:
        proc.terminate()
        proc.wait(timeout=30)
