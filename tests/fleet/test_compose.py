"""Static checks of compose.yaml, the Dockerfiles, .dockerignore and the demo job file.

No Docker engine is needed (none runs on the CI machines): compose.yaml is validated against the Compose
Specification JSON Schema, and every file it or a Dockerfile refers to is checked to exist and to be part of
the build context. `docker compose config` is run as well when a Docker CLI with the compose plugin exists.

The schema is looked up at $FEDGEN_COMPOSE_SCHEMA, else at ../shared/schemas/compose-spec.json next to the
repository; the schema test is skipped (with the reason) when neither exists.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read compose.yaml (pip install pyyaml)")
if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="Python 3.10 needs tomli to read pyproject.toml")

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yaml"
JOB_FILE = REPO / "docker" / "demo-job.json"
SERVER_DOCKERFILE = REPO / "docker" / "server.Dockerfile"
EDGE_DOCKERFILE = REPO / "docker" / "edge.Dockerfile"
SCHEMA_ENV = "FEDGEN_COMPOSE_SCHEMA"
DEFAULT_SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "compose-spec.json"

JOB_KEYS = {"id", "dataset", "rounds", "active", "min_clients", "round_timeout_s", "seed", "algorithm"}


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE_FILE.open(encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict), "compose.yaml must be a mapping"
    return data


def _services(compose: dict) -> dict:
    return compose["services"]


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose-style interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, $VAR, $$) against `env`
    (default: empty, so that the development defaults written in compose.yaml are what is checked)."""
    env = {} if env is None else env

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        if op == "-":
            return env.get(name, default)
        if op in (":?", "?"):
            if name not in env or (op == ":?" and not env[name]):
                raise KeyError(f"{name} is required by compose.yaml")
            return env[name]
        return env.get(name, "")

    return _VAR.sub(sub, value)


def short_volume(spec: str) -> tuple[str | None, str, str]:
    """(source or None for an anonymous volume, target, mode) of a short-syntax volume entry."""
    parts = spec.split(":")
    if len(parts) == 1:
        return None, parts[0], ""
    if len(parts) == 2:
        return parts[0], parts[1], ""
    return parts[0], parts[1], ":".join(parts[2:])


def volumes_of(service: dict) -> list[tuple[str | None, str, str]]:
    out = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            out.append(short_volume(interpolate(entry)))
        else:
            ro = "ro" if entry.get("read_only") else ""
            out.append((entry.get("source"), entry["target"], ro))
    return out


def is_bind_source(source: str | None) -> bool:
    return source is not None and (source.startswith((".", "/", "~")))


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comment lines dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
        current = ""
    assert not current, f"{path.name} ends inside a continuation line"
    return instructions


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def copy_sources(path: Path) -> list[str]:
    """Sources of the COPY/ADD instructions that read from the build context (not --from=<stage>)."""
    sources = []
    for word, args in dockerfile_instructions(path):
        if word not in ("COPY", "ADD"):
            continue
        if args.startswith("["):
            items = exec_form(args)
        else:
            items = args.split()
        flags = [i for i in items if i.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [i for i in items if not i.startswith("--")]
        assert len(paths) >= 2, f"{path.name}: {word} {args}"
        sources.extend(paths[:-1])
    return sources


def dockerignore_rules() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per .dockerignore line, in order (Docker: the last matching line wins)."""
    rules = []
    path = REPO / ".dockerignore"
    if not path.exists():
        return rules
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line[1:] if negated else line).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def dockerignored(relpath: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether .dockerignore keeps `relpath` out of the build context (a rule matching a parent directory
    applies to everything below it, as in Docker's pattern matcher)."""
    parts = PurePosixPath(relpath).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


def project_files_under(relpath: str) -> list[str]:
    """Files of the project under `relpath` (caches and build leftovers skipped)."""
    root = REPO / relpath
    if root.is_file():
        return [relpath]
    skip_dirs = {"__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.endswith(".egg-info")]
        for name in filenames:
            if name.endswith((".pyc", ".pyo", ".db")):
                continue
            files.append(Path(dirpath, name).relative_to(REPO).as_posix())
    return files


def arg_value(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def pyproject() -> dict:
    with (REPO / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


# ------------------------------------------------------------------------------------------------ schema
def _schema_path() -> Path:
    return Path(os.environ[SCHEMA_ENV]) if os.environ.get(SCHEMA_ENV) else DEFAULT_SCHEMA


@pytest.fixture(scope="module")
def compose_validator():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed for the schema check")
    path = _schema_path()
    if not path.is_file():
        pytest.skip(f"Compose JSON schema not found at {path} (set {SCHEMA_ENV} to compose-spec.json)")
    schema = json.loads(path.read_text(encoding="utf-8"))
    # The spec's $schema is draft-07; name the validator explicitly (its $schema URL lacks the trailing '#').
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_is_valid_against_the_compose_spec(compose, compose_validator):
    errors = sorted(compose_validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_validation_really_rejects_mistakes(compose, compose_validator):
    broken = json.loads(json.dumps(compose))
    broken["services"]["edge"]["container_nme"] = "typo"  # unknown key
    broken["services"]["server"]["depends_on"]["db"]["condition"] = "service_ready"  # not in the enum
    assert len(list(compose_validator.iter_errors(broken))) >= 2


# ------------------------------------------------------------------------------------------------ files
def test_services_present(compose):
    assert set(_services(compose)) >= {"broker", "db", "server", "edge"}


def test_build_contexts_and_dockerfiles_exist(compose):
    built = {}
    for name, service in _services(compose).items():
        build = service.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (COMPOSE_FILE.parent / build.get("context", ".")).resolve()
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        built[name] = dockerfile
    assert built == {"server": SERVER_DOCKERFILE, "edge": EDGE_DOCKERFILE}
    assert (REPO / ".dockerignore").is_file()


def test_bind_mounts_exist_and_are_relative(compose):
    for name, service in _services(compose).items():
        for source, target, _ in volumes_of(service):
            if not is_bind_source(source):
                continue
            assert source.startswith("./"), f"{name}: bind source {source} must be relative to compose.yaml"
            assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} (mounted at {target}) is missing"


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in _services(compose).items():
        for source, _target, _ in volumes_of(service):
            if source is not None and not is_bind_source(source):
                assert source in declared, f"{name}: volume {source} is not declared at the top level"


def test_broker_runs_the_projects_own_config(compose):
    broker = _services(compose)["broker"]
    assert broker["image"].startswith("eclipse-mosquitto:2")
    mounts = {target: (source, mode) for source, target, mode in volumes_of(broker)}
    source, mode = mounts["/mosquitto/config/mosquitto.conf"]
    assert (COMPOSE_FILE.parent / source).resolve() == REPO / "broker" / "mosquitto" / "dev.conf"
    assert "ro" in mode.split(","), "mount the config read-only (the image's entrypoint chowns /mosquitto)"


def test_broker_persistence_lands_on_a_volume(compose):
    """dev.conf's persistence_location, resolved against the container's working directory, must be a
    named volume (else retained messages and sessions are lost with the container or cannot be written)."""
    broker = _services(compose)["broker"]
    conf = (REPO / "broker" / "mosquitto" / "dev.conf").read_text(encoding="utf-8")
    location = re.search(r"^\s*persistence_location\s+(\S+)", conf, re.MULTILINE).group(1)
    resolved = posixpath.normpath(posixpath.join(broker.get("working_dir", "/"), location))
    named = [target for source, target, _ in volumes_of(broker) if source and not is_bind_source(source)]
    assert any(resolved == posixpath.normpath(t) or resolved.startswith(t.rstrip("/") + "/") for t in named), (
        f"persistence_location resolves to {resolved}, which is on none of the volumes {named}")
    # The image's entrypoint hands /mosquitto (and so a volume below it) to the user the broker runs as.
    assert resolved.startswith("/mosquitto/")


def test_job_file_is_mounted_and_valid(compose):
    server = _services(compose)["server"]
    mounts = {target: source for source, target, _ in volumes_of(server)}
    argv = server["command"]
    job_target = arg_value(argv, "--job-file")
    assert job_target in mounts, "the --job-file path must be a mounted file"
    assert (COMPOSE_FILE.parent / mounts[job_target]).resolve() == JOB_FILE
    job = json.loads(JOB_FILE.read_text(encoding="utf-8"))
    assert set(job) >= JOB_KEYS
    assert job["id"] == "demo" and job["dataset"] == "mnist-subset"
    assert job["algorithm"]["algorithm"] in ("fedavg", "fedprox", "fedgen")
    for key in ("rounds", "active", "min_clients", "round_timeout_s", "seed"):
        assert isinstance(job[key], int) and not isinstance(job[key], bool) and job[key] >= 0, key
    assert 1 <= job["min_clients"] <= job["active"]
    edge = _services(compose)["edge"]["command"]
    assert arg_value(edge, "--job") == job["id"], "the edge devices must join the job the server creates"
    partition = arg_value(edge, "--partition")
    assert partition.split(":")[0] == job["dataset"]
    users = int(re.search(r":users=(\d+)", partition).group(1))
    assert users >= job["active"], "fewer partitions than clients per round"
    try:
        from shared.protocol.ids import check_id
    except ImportError:  # the wire protocol module is not there yet
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", job["id"])
    else:
        check_id(job["id"], "job")


# ------------------------------------------------------------------------------------------------ services
def test_server_healthcheck_and_dependencies(compose):
    services = _services(compose)
    server = services["server"]
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD" and "python" in test[1]
    assert any("/health" in part for part in test) and any(":8000/" in part for part in test)
    for dep in ("broker", "db"):
        assert server["depends_on"][dep]["condition"] == "service_healthy"
        assert "test" in services[dep]["healthcheck"], f"{dep} needs a healthcheck for service_healthy"
    assert services["edge"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert "pg_isready" in services["db"]["healthcheck"]["test"]
    assert any("8000:8000" in interpolate(p) for p in server["ports"])


def test_edge_can_scale(compose):
    edge = _services(compose)["edge"]
    assert "container_name" not in edge, "a fixed container_name makes --scale fail"
    assert "hostname" not in edge, "--client-id auto relies on per-replica hostnames"
    for port in edge.get("ports", []):
        spec = interpolate(port) if isinstance(port, str) else port
        if isinstance(spec, dict):
            assert "published" not in spec, "a fixed host port makes --scale fail"
        else:
            assert ":" not in str(spec), f"edge publishes a fixed host port ({spec}); replicas would collide"
    assert int(edge["deploy"]["replicas"]) >= 1
    argv = edge["command"]
    assert arg_value(argv, "--client-id") == "auto"
    assert "index=auto" in arg_value(argv, "--partition")
    state_dir = arg_value(argv, "--state-dir")
    anonymous = [target for source, target, _ in volumes_of(edge) if source is None]
    assert state_dir in anonymous, "each replica needs its own (anonymous) state volume"


def test_no_secret_on_a_command_line_and_defaults_are_overridable(compose):
    url_with_password = re.compile(r"://[^/@\s]*:[^/@\s]*@")
    for name, service in _services(compose).items():
        for arg in service.get("command") or []:
            assert not url_with_password.search(str(arg)), f"{name}: credentials on the command line: {arg}"
    server_env = _services(compose)["server"]["environment"]
    assert server_env["FEDGEN_ADMIN_TOKEN"].startswith("${FEDGEN_ADMIN_TOKEN:-")
    assert "${FEDGEN_DB_PASSWORD:-" in server_env["FEDGEN_DATABASE_URL"]
    assert _services(compose)["db"]["environment"]["POSTGRES_PASSWORD"].startswith("${FEDGEN_DB_PASSWORD:-")
    # The database URL the server gets agrees with what the database container is initialised with.
    db_env = _services(compose)["db"]["environment"]
    url = interpolate(server_env["FEDGEN_DATABASE_URL"])
    assert url == (f"postgresql+psycopg://{db_env['POSTGRES_USER']}:{interpolate(db_env['POSTGRES_PASSWORD'])}"
                   f"@db:5432/{db_env['POSTGRES_DB']}")
    env = {"FEDGEN_DB_PASSWORD": "s3cret"}
    assert ":s3cret@db:" in interpolate(server_env["FEDGEN_DATABASE_URL"], env)


# ------------------------------------------------------------------------------------------------ Dockerfiles
@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, EDGE_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_copy_sources_exist_and_are_in_the_context(dockerfile):
    rules = dockerignore_rules()
    sources = copy_sources(dockerfile)
    assert sources, f"{dockerfile.name} copies nothing"
    for source in sources:
        assert not source.startswith(("/", "..")), f"{dockerfile.name}: COPY {source} is outside the context"
        assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} does not exist"
        files = project_files_under(source)
        assert files, f"{dockerfile.name}: COPY source {source} is empty"
        left_out = [f for f in files if dockerignored(f, rules)]
        assert not left_out, f"{dockerfile.name}: .dockerignore excludes {left_out[:5]} of COPY {source}"


def test_dockerignore_keeps_local_state_out():
    rules = dockerignore_rules()
    for path in (".git/config", ".venv/bin/python", "runs/demo.json", "bench/results/paper_table.md",
                 "state/mosquitto/mosquitto.db", "shared/__pycache__/cli.cpython-311.pyc", ".env",
                 "fedgen_fleet.egg-info/PKG-INFO", "tests/fleet/test_compose.py"):
        assert dockerignored(path, rules), f"{path} would be sent to the Docker build context"
    # The dataset shipped as package data must reach the edge image.
    for path in project_files_under("shared/datasets"):
        assert not dockerignored(path, rules), path


def _instructions(dockerfile: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for word, args in dockerfile_instructions(dockerfile):
        out.setdefault(word, []).append(args)
    return out


@pytest.mark.parametrize("dockerfile", [SERVER_DOCKERFILE, EDGE_DOCKERFILE], ids=lambda p: p.name)
def test_dockerfile_basics(dockerfile):
    ins = _instructions(dockerfile)
    # the base image is a build argument whose default is the official image a user pulls
    assert ins["FROM"] == ["${BASE_IMAGE}"] and "BASE_IMAGE=python:3.11-slim" in ins["ARG"]
    users = ins.get("USER", [])
    assert users and users[-1] not in ("root", "0"), "the image must run as an unprivileged user"
    order = [w for w, _ in dockerfile_instructions(dockerfile)]
    assert len(order) - 1 - order[::-1].index("USER") < order.index("ENTRYPOINT")
    # torch: same pin as pyproject.toml, installed from an explicit index for the CPU build.
    pins = {re.sub(r"\s+", "", dep) for extra in pyproject()["project"]["optional-dependencies"].values()
            for dep in extra if dep.replace(" ", "").startswith("torch==")}
    assert len(pins) == 1, pins
    pinned = pins.pop().split("==")[1]
    versions = [a.split("=", 1)[1] for a in ins["ARG"] if a.startswith("TORCH_VERSION=")]
    assert versions == [pinned], f"{dockerfile.name} installs torch {versions}, pyproject pins {pinned}"
    run = " ".join(ins["RUN"])
    assert "download.pytorch.org/whl/cpu" in " ".join(ins["ARG"]) and "--index-url" in run


def test_server_dockerfile():
    ins = _instructions(SERVER_DOCKERFILE)
    assert exec_form(ins["ENTRYPOINT"][-1]) == ["fedgen", "server"]
    assert "8000" in " ".join(ins["EXPOSE"]).split()
    health = ins["HEALTHCHECK"][-1]
    assert "python" in health and "/health" in health and "curl" not in health
    run = " ".join(ins["RUN"])
    assert '".[server]"' in run or "'.[server]'" in run or ".[server]" in run.split()
    # The server upgrades the schema from <source root>/migrations, which must therefore ship.
    assert "migrations" in copy_sources(SERVER_DOCKERFILE)


def test_edge_dockerfile(compose):
    ins = _instructions(EDGE_DOCKERFILE)
    assert exec_form(ins["ENTRYPOINT"][-1]) == ["edge-client"]
    run = " ".join(ins["RUN"])
    assert ".[edge]" in run and "server]" not in run and "'server'" not in run
    assert "server_api" not in copy_sources(EDGE_DOCKERFILE)
    state_dir = arg_value(_services(compose)["edge"]["command"], "--state-dir")
    assert any(state_dir in exec_form(v) for v in ins["VOLUME"])
    assert "EXPOSE" not in ins
    # arm64: torch from PyPI (CPU-only aarch64 wheel) when BuildKit says so.
    assert "TARGETARCH" in " ".join(ins["ARG"]) and "arm64" in run


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (also inside top-level if/try blocks; not inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return names


def test_edge_image_has_everything_edge_client_imports():
    """The edge image ships shared/ and edge_client/ only: what edge_client imports at module level,
    transitively, must not need server_api/."""
    seen: set[Path] = set()
    todo = list((REPO / "edge_client").glob("*.py"))
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _top_level_imports(path):
            top = module.split(".")[0]
            assert top != "server_api", f"{path.relative_to(REPO)} imports {module}, absent from the edge image"
            if top in ("shared", "edge_client"):
                base = REPO.joinpath(*module.split("."))
                for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                    if candidate.is_file():
                        todo.append(candidate)
    assert seen


# ------------------------------------------------------------------------------------------------ commands
def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse has no public accessor for subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_server_command_uses_existing_fedgen_flags(compose):
    from server_api.cli import build_parser

    parser = build_parser()
    if "server" not in _subcommands(parser):
        pytest.skip("`fedgen server` is not implemented in shared/cli.py yet; its flags cannot be checked")
    entrypoint = exec_form(_instructions(SERVER_DOCKERFILE)["ENTRYPOINT"][-1])
    argv = entrypoint[1:] + [interpolate(str(a)) for a in _services(compose)["server"]["command"]]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown flag or a bad value (message on stderr)
        pytest.fail(f"`fedgen {' '.join(argv)}` is rejected by server_api.cli.build_parser() (exit {exc.code})")
    assert args.command == "server"


def test_edge_client_console_script_is_declared():
    scripts = pyproject()["project"]["scripts"]
    assert scripts.get("edge-client") == "edge_client.cli:main"
    assert (REPO / "edge_client" / "cli.py").is_file()
    assert scripts.get("fedgen") == "server_api.cli:main"


# ------------------------------------------------------------------------------------------------ docker
def _docker_compose_available() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30,
                               check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _docker_compose_available(),
                    reason="needs the Docker CLI with the compose plugin (`docker compose version` failed)")
def test_docker_compose_config_accepts_the_file():
    """`docker compose config` parses, interpolates and validates without contacting a Docker engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDGEN_", "COMPOSE_"))}
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose (Debian's, 1.29)")
def test_debians_docker_compose_accepts_the_file_and_the_local_override():
    """docker-compose 1.29 (what Debian ships, and what `make compose-test` runs) knows only part of the Compose
    spec: it refused a top-level `name:`. Both files must parse with it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDGEN_", "COMPOSE_"))}
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE_FILE), "-f", str(REPO / "docker" / "local" /
                             "compose.local.yaml"), "config", "--quiet"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=env, check=False)
    assert result.returncode == 0, result.stderr
