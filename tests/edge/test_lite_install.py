"""What `pip install '.[edge-lite]'` brings, and that the lite client starts with nothing else."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "onnx", "onnxruntime", "protobuf", "fastapi", "sqlalchemy", "uvicorn", "psycopg"}
HEAVY_MODULES = HEAVY - {"protobuf"} | {"google"}  # protobuf's import name is google.protobuf


def closure(extra: str) -> set[str]:
    """Names of every distribution `fedgen-fleet[extra]` installs: the extra's list from pyproject.toml (the
    source, not an installed copy of the metadata), then its dependencies' installed metadata."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    seen: set[str] = set()
    todo: list[tuple[str, set[str]]] = []
    for text in [*project["dependencies"], *project["optional-dependencies"][extra]]:
        req = Requirement(text)
        seen.add(req.name.lower().replace("_", "-"))
        todo.append((req.name, set(req.extras)))
    while todo:
        name, extras = todo.pop()
        if name.lower().replace("_", "-") == "fedgen-fleet":  # .[edge] names other extras of the project
            for sub in extras:
                seen |= closure(sub)
            continue
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
                continue
            key = req.name.lower().replace("_", "-")
            if key not in seen:
                seen.add(key)
                todo.append((req.name, set(req.extras)))
    return seen


def test_edge_lite_pulls_no_torch_onnx_or_server_packages() -> None:
    lite = closure("edge-lite")
    assert {"numpy", "paho-mqtt", "msgspec", "safetensors"} <= lite
    assert not lite & HEAVY, sorted(lite & HEAVY)
    assert {"torch", "onnxruntime"} <= closure("edge")  # the control: the torch device's extra


def test_lite_client_help_runs_with_the_heavy_packages_absent() -> None:
    code = ("import runpy, sys\n"
            f"for name in {sorted(HEAVY_MODULES)!r}: sys.modules[name] = None\n"
            "sys.argv = ['edge-client', '--runtime', 'lite', '--help']\n"
            "runpy.run_module('edge_client.cli', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "--runtime" in done.stdout and "lite" in done.stdout
