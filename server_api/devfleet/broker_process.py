"""Start and control an MQTT broker process for the fleet command and the test suite.

Two back ends:

* :func:`start_mosquitto` runs the real ``mosquitto`` binary from one of the project's
  config files (``broker/mosquitto/dev.conf`` or ``prod.conf``).  The project file is
  never edited: a *derived* config is written into ``workdir`` that overrides only the
  listener port(s) and bind address, the persistence location, the TLS / password / ACL
  file paths, the ``user`` to run as and the log destination.  Every other setting
  (queue limits, ``allow_anonymous`` ...) is kept exactly as written, so tests exercise
  the real policy.
* :func:`start_embedded_broker` runs the project's own pure-Python MQTT 3.1.1 broker
  (:mod:`server_api.devfleet.embedded`, standard library only) in a subprocess, for machines
  without a ``mosquitto`` binary.  Development and tests only: no TLS, no ACL.

:func:`start_broker` picks one.  Every function returns a :class:`BrokerProcess`, which
is a context manager with ``url``, ``port``, ``stop()``, ``kill()`` and ``restart()``.

Running this module starts a broker in the foreground::

    python -m server_api.devfleet.broker_process mosquitto broker/mosquitto/dev.conf --workdir state/dev
    python -m server_api.devfleet.broker_process embedded --port 1883
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from server_api.devfleet.mosquitto_config import (  # noqa: F401 - the broker API, re-exported
    DEFAULT_HOST,
    BrokerStartError,
    TLSFiles,
    derive_mosquitto_config,
    find_free_port,
)
from server_api.resources import dev_broker_config

_log = logging.getLogger("fedgen.broker")
DEFAULT_START_TIMEOUT = 10.0
MOSQUITTO_FALLBACK_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


def find_mosquitto() -> str | None:
    """Locate the ``mosquitto`` binary on PATH or in the usual sbin directories."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in MOSQUITTO_FALLBACK_DIRS:
        candidate = Path(directory) / "mosquitto"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class BrokerProcess:
    """A broker running as a child process; restartable on the same ports and state."""

    argv: list[str]
    workdir: Path
    host: str
    port: int
    tls_port: int | None = None
    extra_ports: list[int] = field(default_factory=list)
    kind: str = "mosquitto"
    cert_port: int | None = None  # the client-certificate TLS listener
    env: dict[str, str] | None = None
    cwd: Path | None = None
    start_timeout: float = DEFAULT_START_TIMEOUT
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str | None:
        return None if self.tls_port is None else f"mqtts://{self.host}:{self.tls_port}"

    @property
    def cert_url(self) -> str | None:
        return None if self.cert_port is None else f"mqtts://{self.host}:{self.cert_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.kind}.log"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def all_ports(self) -> list[int]:
        tls = [p for p in (self.tls_port, self.cert_port) if p is not None]
        return [self.port, *self.extra_ports, *tls]

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the broker's log (stdout and stderr)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log written)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> BrokerProcess:
        """Spawn the process and wait until every listener accepts connections."""
        if self.running:
            raise BrokerStartError(f"{self.kind} broker already running (pid {self.pid})")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # argv is built by this module
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = self.all_ports()
        while pending:
            if self.proc is not None and self.proc.poll() is not None:
                raise BrokerStartError(
                    f"{self.kind} exited with code {self.proc.returncode} during start-up "
                    f"(argv: {' '.join(self.argv)}). Log tail:\n{self.log_tail()}")
            pending = [p for p in pending if not port_accepts(self.host, p)]
            if pending and time.monotonic() > deadline:
                self.kill()
                raise BrokerStartError(
                    f"{self.kind} did not accept connections on {self.host}:{pending} within "
                    f"{self.start_timeout:.0f}s. Log tail:\n{self.log_tail()}")
            if pending:
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): Mosquitto writes its persistence file on the way out."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """Hard stop (SIGKILL): anything not yet autosaved is lost, like a power cut."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self.proc.wait(5)

    def restart(self) -> BrokerProcess:
        """Stop gracefully and start again on the same ports with the same persistence."""
        self.stop()
        return self.start()

    def __enter__(self) -> BrokerProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --------------------------------------------------------------------------- config rewriting


def start_mosquitto(config: Path, workdir: Path, port: int | None = None, tls: TLSFiles | None = None, *,
                    password_file: Path | None = None, acl_file: Path | None = None,
                    host: str = DEFAULT_HOST, start_timeout: float = DEFAULT_START_TIMEOUT,
                    mosquitto: str | None = None) -> BrokerProcess:
    """Start ``mosquitto -c <derived config>`` and wait until it accepts connections.

    The derived config (``workdir/mosquitto.conf``) keeps every setting of ``config`` except:

    * each ``listener`` is rebound to ``host``; the first plain listener gets ``port``
      (a free port when ``None``), further plain listeners get free ports;
    * TLS listeners (those with cafile/certfile/keyfile) are kept only when ``tls`` is
      given, with its certificate paths and ``tls.port`` (free port when ``None``); the
      client-certificate listener (``require_certificate true``) gets ``tls.cert_port`` and
      ``tls.crlfile``;
    * ``persistence_location`` becomes ``workdir``; ``log_dest`` becomes stderr, captured
      in ``workdir/mosquitto.log``; ``pid_file`` is dropped;
    * ``password_file`` / ``acl_file`` come from the arguments, else from ``config``
      (relative paths resolved against the config file's directory);
    * when running as root, ``user`` is set to root's name so the broker can read the
      work directory (Mosquitto otherwise drops privileges to user ``mosquitto``).
    """
    exe = mosquitto or find_mosquitto()
    if exe is None:
        raise BrokerStartError("mosquitto binary not found on PATH or in /usr/sbin; install it "
                               "(apt-get install mosquitto) or use start_embedded_broker()")
    workdir.mkdir(parents=True, exist_ok=True)
    derived = derive_mosquitto_config(Path(config), workdir, host, port, tls, password_file, acl_file)
    conf_path = workdir / "mosquitto.conf"
    conf_path.write_text(derived.text, encoding="utf-8")
    broker = BrokerProcess([exe, "-c", str(conf_path)], workdir, host, derived.port, derived.tls_port,
                           derived.extra_ports, "mosquitto", cert_port=derived.cert_port,
                           start_timeout=start_timeout)
    return broker.start()


# --------------------------------------------------------------------------- embedded broker


# Keyword arguments of start_broker() that the embedded broker understands.
EMBEDDED_OPTIONS = frozenset({"host", "python", "start_timeout", "persistence", "max_queued_messages",
                              "autosave_interval", "log_level"})


def start_embedded_broker(port: int | None = None, workdir: Path | None = None, *, host: str = DEFAULT_HOST,
                          python: str | None = None, start_timeout: float = DEFAULT_START_TIMEOUT,
                          persistence: bool = True, max_queued_messages: int | None = None,
                          autosave_interval: float | None = None,
                          log_level: str = "info") -> BrokerProcess:
    """Start the project's pure-Python broker (:mod:`server_api.devfleet.embedded`) in a subprocess.

    Runs ``python -m server_api.devfleet.embedded --host HOST --port PORT`` (``python`` defaults
    to this interpreter; nothing beyond the standard library is needed) with, when
    ``persistence`` is true, ``--persistence workdir/embedded-broker.json``: retained messages
    and persistent sessions survive ``stop()``/``restart()`` (same port, same file), and a
    ``kill()`` loses what was not yet autosaved.  Plain TCP, no ACL: development and tests only;
    see docs/broker.md ("Embedded broker").  The log is ``workdir/embedded.log``.
    """
    workdir = workdir or Path.cwd() / "state" / "embedded-broker"
    workdir.mkdir(parents=True, exist_ok=True)
    chosen = port or find_free_port(host)
    project_root = Path(__file__).resolve().parents[2]  # the package's parent: importable from there
    pythonpath = os.pathsep.join(filter(None, [str(project_root), os.environ.get("PYTHONPATH")]))
    argv = [python or sys.executable, "-m", "server_api.devfleet.embedded", "--host", host, "--port", str(chosen),
            "--log-level", log_level]
    if persistence:
        argv += ["--persistence", str((workdir / "embedded-broker.json").resolve())]
    if max_queued_messages is not None:
        argv += ["--max-queued", str(max_queued_messages)]
    if autosave_interval is not None:
        argv += ["--autosave-interval", str(autosave_interval)]
    broker = BrokerProcess(argv, workdir, host, chosen, kind="embedded", env={**os.environ, "PYTHONPATH": pythonpath},
                           cwd=project_root, start_timeout=start_timeout)
    return broker.start()


# --------------------------------------------------------------------------- chooser / CLI


def start_broker(prefer: str = "mosquitto", config: Path | None = None, workdir: Path | None = None,
                 port: int | None = None, **kwargs: object) -> BrokerProcess:
    """Start Mosquitto when its binary exists (and ``prefer == "mosquitto"``), else the embedded broker.

    ``config`` defaults to ``broker/mosquitto/dev.conf`` next to this package; ``workdir``
    to ``./state/broker``.  Extra keyword arguments go to :func:`start_mosquitto`, or to
    :func:`start_embedded_broker` when that one is started (a warning is logged); Mosquitto-only
    options (``tls``, ``password_file``, ``acl_file`` ...) then raise :class:`BrokerStartError`
    rather than being silently dropped.
    """
    if prefer not in {"mosquitto", "embedded"}:
        raise ValueError(f"prefer must be 'mosquitto' or 'embedded', not {prefer!r}")
    workdir = workdir or Path.cwd() / "state" / "broker"
    if prefer == "mosquitto" and find_mosquitto() is not None:
        config = config or dev_broker_config()
        return start_mosquitto(config, workdir, port, **kwargs)  # type: ignore[arg-type]
    unsupported = sorted(k for k, v in kwargs.items() if k not in EMBEDDED_OPTIONS and v is not None)
    if unsupported:
        raise BrokerStartError(f"the embedded broker (used because {_why_embedded(prefer)}) does not support "
                               f"{', '.join(unsupported)}: it has no TLS, password file or ACL; install mosquitto")
    _log.warning("starting the embedded MQTT broker (development only: no TLS, no ACL) because %s%s",
                 _why_embedded(prefer), f"; {config} is not used" if config is not None else "")
    return start_embedded_broker(port, workdir, **kwargs)  # type: ignore[arg-type]


def _why_embedded(prefer: str) -> str:
    return "prefer='embedded'" if prefer == "embedded" else "no mosquitto binary was found"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server_api.devfleet.broker_process", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mosquitto", help="run mosquitto from a project config (foreground)")
    m.add_argument("config", type=Path)
    m.add_argument("--workdir", type=Path, default=Path("state/broker"))
    m.add_argument("--port", type=int)
    m.add_argument("--host", default=DEFAULT_HOST)
    sub.add_parser("embedded", add_help=False,
                   help="run the embedded broker (foreground); options: python -m server_api.devfleet.embedded -h")
    args, rest = p.parse_known_args(argv)
    if args.cmd != "embedded" and rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.cmd == "embedded":
        from server_api.devfleet.embedded import main as embedded_main

        return embedded_main(args.rest)
    broker = start_mosquitto(args.config, args.workdir, args.port, host=args.host)
    print(f"mosquitto running at {broker.url} (log: {broker.log_path}); Ctrl-C to stop", flush=True)
    try:
        assert broker.proc is not None
        broker.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
