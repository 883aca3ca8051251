"""One lite edge client runs to the end of a short FedGen job under a kernel-enforced memory limit of 256 MiB, what
a Raspberry Pi Zero 2 W (512 MiB) leaves after its OS.

The limit is a memory cgroup made for the test, tried in this order:
* cgroup v2: a child of this process's cgroup (or of the hierarchy's root) with ``memory.max = 256M``;
* cgroup v1: a child in the ``memory`` hierarchy with ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``
  where swap accounting exists) = 256 MiB (machines whose memory controller is on v1, in a hybrid layout);
* ``systemd-run --scope -p MemoryMax=256M`` (a systemd host that lets us make no cgroup by hand).
The client is inside the limit from its first instruction (the wrapper shell joins the cgroup, then execs it).
Before the run, a process that allocates 320 MiB in the same kind of cgroup must be killed: the limit is enforced
by the kernel, not merely written down. Skipped with the reason when no cgroup can be made, unless
FEDGEN_REQUIRE_CGROUP=1, where it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server_api.devfleet.fleet import Fleet, FleetConfig

pytestmark = pytest.mark.slow
LIMIT = 256 * 2**20
REQUIRE_ENV = "FEDGEN_REQUIRE_CGROUP"


@dataclass
class MemoryCgroup:
    kind: str  # "v2", "v1" or "systemd-run"
    path: Path | None  # the cgroup directory (None for systemd-run: systemd makes and removes the scope)

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` started inside the cgroup (it joins before exec, so all of its life is inside)."""
        if self.path is None:
            return ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={LIMIT}", "-p", "MemorySwapMax=0", *cmd]
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *cmd]

    def peak_bytes(self) -> int | None:
        name = {"v2": "memory.peak", "v1": "memory.max_usage_in_bytes"}.get(self.kind)
        file = self.path / name if self.path is not None and name else None
        return int(file.read_text()) if file is not None and file.exists() else None

    def oom_kills(self) -> int | None:
        name = {"v2": "memory.events", "v1": "memory.oom_control"}.get(self.kind)
        if self.path is None or name is None or not (self.path / name).exists():
            return None
        fields = dict(line.split() for line in (self.path / name).read_text().splitlines() if line.strip())
        return int(fields.get("oom_kill", 0))

    def remove(self) -> None:
        if self.path is None:
            return
        for _ in range(50):  # a killed process leaves the cgroup a moment after it is reaped
            with contextlib.suppress(OSError):
                self.path.rmdir()
                return
            time.sleep(0.1)


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path in the v2 hierarchy (controller None) or in v1's `controller` hierarchy."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller and controller in controllers.split(",")):
            return path
    return None


def _mounts(fstype: str, option: str | None = None) -> list[Path]:
    found = []
    for line in Path("/proc/mounts").read_text().splitlines():
        _, target, kind, options = line.split()[:4]
        if kind == fstype and (option is None or option in options.split(",")):
            found.append(Path(target))
    return found


def _make_v2() -> MemoryCgroup | None:
    own = _own_cgroup(None)
    for mount in _mounts("cgroup2"):
        if "memory" not in (mount / "cgroup.controllers").read_text().split():
            continue
        parents = [mount / own.lstrip("/")] if own is not None else []
        for parent in [*parents, mount]:
            child = parent / f"fedgen-memtest-{uuid.uuid4().hex[:8]}"
            try:
                child.mkdir()
            except OSError:
                continue
            try:
                if not (child / "memory.max").exists():  # the parent does not pass the controller down yet
                    (parent / "cgroup.subtree_control").write_text("+memory")
                (child / "memory.max").write_text(str(LIMIT))
                if (child / "memory.swap.max").exists():
                    (child / "memory.swap.max").write_text("0")
                return MemoryCgroup("v2", child)
            except OSError:
                MemoryCgroup("v2", child).remove()
    return None


def _make_v1() -> MemoryCgroup | None:
    own = _own_cgroup("memory")
    for mount in _mounts("cgroup", "memory"):
        for parent in ([mount / own.lstrip("/")] if own is not None else []) + [mount]:
            child = parent / f"fedgen-memtest-{uuid.uuid4().hex[:8]}"
            try:
                child.mkdir()
            except OSError:
                continue
            try:
                (child / "memory.limit_in_bytes").write_text(str(LIMIT))
                if (child / "memory.memsw.limit_in_bytes").exists():  # swap accounting: no escape into swap
                    (child / "memory.memsw.limit_in_bytes").write_text(str(LIMIT))
                if int((child / "memory.limit_in_bytes").read_text()) > LIMIT:
                    raise OSError("the limit did not take")
                return MemoryCgroup("v1", child)
            except OSError:
                MemoryCgroup("v1", child).remove()
    return None


def _make_systemd_scope() -> MemoryCgroup | None:
    if shutil.which("systemd-run") is None:
        return None
    probe = subprocess.run(["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={LIMIT}", "true"],
                           capture_output=True, timeout=30)
    return MemoryCgroup("systemd-run", None) if probe.returncode == 0 else None


def make_memory_cgroup() -> MemoryCgroup | None:
    for make in (_make_v2, _make_v1, _make_systemd_scope):
        try:
            group = make()
        except (OSError, ValueError, subprocess.SubprocessError):
            group = None
        if group is not None:
            return group
    return None


@pytest.fixture
def memory_cgroup() -> Iterator[Callable[[], MemoryCgroup]]:
    """A factory of fresh 256 MiB cgroups (one per process run in it), all removed at teardown."""
    made: list[MemoryCgroup] = []

    def make() -> MemoryCgroup:
        group = make_memory_cgroup()
        if group is None:
            reason = ("no memory cgroup could be made: no writable cgroup v2 hierarchy with the memory controller, "
                      "no writable cgroup v1 memory hierarchy, and no working `systemd-run --scope` (run as root, "
                      "or under systemd with user delegation)")
            if os.environ.get(REQUIRE_ENV) == "1":
                pytest.fail(f"{reason}; and {REQUIRE_ENV}=1")
            pytest.skip(reason)
        made.append(group)
        return group

    yield make
    for group in made:
        group.remove()


RSS_WRAPPER = Path(__file__).resolve().parents[2] / "bench" / "rss_wrapper.py"  # peak RSS of a command


def run(cmd: list[str], timeout: float, **kwargs) -> int:
    proc = subprocess.Popen(cmd, **kwargs)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_the_limit_is_enforced(memory_cgroup):
    group = memory_cgroup()
    rc = run(group.wrap([sys.executable, "-c", "b = bytearray(320 * 2**20); b[::4096] = b'x' * len(b[::4096])"]),
             timeout=60, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert rc != 0, f"a process that touched 320 MiB survived the {group.kind} limit of 256 MiB"
    if group.oom_kills() is not None:
        assert group.oom_kills() >= 1


def test_lite_client_finishes_a_job_in_256_mib(memory_cgroup, tmp_path):
    group = memory_cgroup()
    # One device, so its partition is the whole subset (10,000 training and 3,000 test images): more data than a
    # device of a fleet holds, the conservative case.
    cfg = FleetConfig(clients=1, active=1, rounds=2, algorithm="fedgen", dataset="mnist-subset", alpha=0.1,
                      samples_per_class=1000, local_steps=20, seed=0, round_timeout_s=300, progress=False,
                      edge_runtime="lite", workdir=tmp_path / "fleet")
    fleet = Fleet(cfg)  # its own broker, the server on SQLite; the one device is started here, in the cgroup
    try:
        fleet.start_broker()
        fleet.start_server()
        fleet.request("POST", "/jobs", cfg.job_config())
        cmd = [sys.executable, "-m", "edge_client.cli", "--broker", fleet.broker_url, "--job", fleet.job_id,
               "--client-id", "c0", "--partition", cfg.partition_spec(0), "--state-dir",
               str(fleet.workdir / "edge" / "c0"), "--runtime", "lite", "-v"]
        log, rss_file = fleet.workdir / "edge-c0.log", fleet.workdir / "edge-c0.rss"
        with open(log, "wb") as out:
            rc = run(group.wrap([sys.executable, "-S", str(RSS_WRAPPER), str(rss_file), *cmd]), timeout=600,
                     stdout=out, stderr=subprocess.STDOUT)
        summary = fleet.wait(timeout=60)
        tail = log.read_text(errors="replace")[-3000:]
        assert rc == 0, f"the edge client exited {rc} under the {group.kind} limit (oom kills: " \
                        f"{group.oom_kills()}); log:\n{tail}"
        assert summary["job_status"] == "finished" and len(summary["rounds"]) == 2, summary
        assert all(r["num_updates"] == 1 for r in summary["rounds"])
        clients = fleet.request("GET", f"/clients?job_id={fleet.job_id}")["items"]
        assert clients[0]["device_info"]["runtime"] == "lite"
        assert group.oom_kills() in (None, 0)
        peak, peak_rss = group.peak_bytes(), int(rss_file.read_text())
        # The cgroup's peak counts what the kernel charged to it (its anonymous memory and the page cache it
        # read first); RSS also counts shared library pages already in memory, charged elsewhere.
        print(f"{group.kind} cgroup, limit 256 MiB: client peak RSS {peak_rss / 2**20:.1f} MiB, cgroup peak "
              f"{'n/a' if peak is None else f'{peak / 2**20:.1f} MiB'}")
        if peak is not None:
            assert peak <= LIMIT
    finally:
        fleet.stop()
