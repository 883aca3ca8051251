"""The Mosquitto config a test or fleet broker runs with, derived from one of the project's config files:
only the listener port(s) and bind address, the persistence location, the TLS / password / ACL file
paths, the ``user`` to run as and the log destination are overridden (see
:func:`server_api.devfleet.broker_process.start_mosquitto`)."""

from __future__ import annotations

import os
import pwd
import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
TLS_KEYS = frozenset({"cafile", "capath", "certfile", "keyfile", "crlfile"})
# Settings that belong to the preceding `listener` line (mosquitto.conf(5), 2.0); any other
# setting written after a listener is global and is moved to the global section.
LISTENER_KEYS = TLS_KEYS | frozenset({
    "bind_interface", "ciphers", "ciphers_tls1.3", "dhparamfile", "http_dir", "max_connections",
    "max_topic_alias", "mount_point", "protocol", "psk_hint", "require_certificate", "socket_domain",
    "tls_engine", "tls_engine_kpass_sha1", "tls_keyform", "tls_version", "use_identity_as_username",
    "use_subject_as_username", "use_username_as_clientid", "websockets_headers_size", "websockets_log_level",
})
# Keys the derived config drops from the project config and writes itself.
_DROPPED_GLOBAL_KEYS = frozenset({
    "port", "bind_address", "persistence_location", "password_file", "acl_file",
    "user", "log_dest", "pid_file",
})


class BrokerStartError(RuntimeError):
    """The broker did not start or did not accept connections in time."""


@dataclass(frozen=True)
class TLSFiles:
    """Certificate paths for a config's TLS listeners (``port=None``: pick a free one).

    ``port`` is the password listener's; ``cert_port`` the client-certificate listener's (the one with
    ``require_certificate true``), which checks ``crlfile`` when one is given."""

    cafile: Path
    certfile: Path
    keyfile: Path
    port: int | None = None
    crlfile: Path | None = None
    cert_port: int | None = None


def find_free_port(host: str = DEFAULT_HOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class _Block:
    """A run of config lines: the global section (``header is None``) or one listener."""

    header: list[str] | None
    lines: list[str] = field(default_factory=list)

    def keys(self) -> set[str]:
        return {ln.split()[0] for ln in self.lines}

    @property
    def is_tls(self) -> bool:
        return bool(self.keys() & TLS_KEYS)

    @property
    def requires_certificate(self) -> bool:
        return "require_certificate true" in self.lines


def _split_blocks(text: str) -> list[_Block]:
    """Split a Mosquitto config into the global block and one block per ``listener``."""
    blocks = [_Block(None)]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "listener":
            blocks.append(_Block(words))
        elif words[0] in LISTENER_KEYS:
            blocks[-1].lines.append(line)
        else:
            blocks[0].lines.append(line)
    return blocks


def _resolve(value: str, base: Path) -> str:
    path = Path(value)
    return str(path if path.is_absolute() else (base / path).resolve())


def _global_lines(block: _Block, base: Path) -> list[str]:
    """Keep settings, dropping the ones the derived config writes itself."""
    kept = []
    for line in block.lines:
        key = line.split()[0]
        if key in _DROPPED_GLOBAL_KEYS or key in TLS_KEYS:
            continue
        if key in {"include_dir", "plugin"}:
            line = f"{key} {_resolve(line.split(None, 1)[1], base)}"
        kept.append(line)
    return kept


def _run_as_user() -> str | None:
    """Mosquitto started as root drops to user ``mosquitto`` unless told otherwise."""
    if os.geteuid() != 0:
        return None
    return pwd.getpwuid(os.geteuid()).pw_name


@dataclass
class _Derived:
    text: str
    port: int
    tls_port: int | None = None
    extra_ports: list[int] = field(default_factory=list)
    cert_port: int | None = None


def derive_mosquitto_config(config: Path, workdir: Path, host: str = DEFAULT_HOST, port: int | None = None,
                            tls: TLSFiles | None = None, password_file: Path | None = None,
                            acl_file: Path | None = None) -> _Derived:
    """Build the derived config text; see :func:`start_mosquitto` for the rules."""
    base = config.resolve().parent
    blocks = _split_blocks(config.read_text(encoding="utf-8"))
    glob, listeners = blocks[0], blocks[1:]
    if not listeners:
        raise BrokerStartError(f"{config}: no 'listener' line; the project configs must declare one")
    if tls is not None and not any(b.is_tls for b in listeners):
        raise BrokerStartError(f"{config}: TLS files given but the config has no TLS listener")
    out = [f"# Derived from {config.resolve()} by server_api/devfleet/broker_process.py -- do not edit",
           *_global_lines(glob, base)]
    out += _auth_lines(glob, base, password_file, acl_file)
    out += [f"persistence_location {workdir.resolve()}/", "log_dest stderr"]
    if (user := _run_as_user()) is not None:
        out.append(f"user {user}")
    derived = _listener_lines(listeners, host, port, tls, out)
    derived.text = "\n".join(out) + "\n"
    return derived


def _auth_lines(glob: _Block, base: Path, password_file: Path | None, acl_file: Path | None) -> list[str]:
    """password_file / acl_file: the argument wins, else the config's (resolved) path."""
    lines = []
    for key, override in (("password_file", password_file), ("acl_file", acl_file)):
        configured = [ln.split(None, 1)[1] for ln in glob.lines if ln.split()[0] == key]
        if override is not None:
            lines.append(f"{key} {Path(override).resolve()}")
        elif configured:
            lines.append(f"{key} {_resolve(configured[-1], base)}")
    return lines


def _tls_body(block: _Block, tls: TLSFiles) -> list[str]:
    """A TLS listener's settings with the given certificate paths instead of the config's."""
    body = [ln for ln in block.lines if ln.split()[0] not in TLS_KEYS]
    body += [f"cafile {tls.cafile.resolve()}", f"certfile {tls.certfile.resolve()}", f"keyfile {tls.keyfile.resolve()}"]
    if block.requires_certificate and tls.crlfile is not None:
        body.append(f"crlfile {tls.crlfile.resolve()}")
    return body


def _listener_lines(listeners: list[_Block], host: str, port: int | None, tls: TLSFiles | None,
                    out: list[str]) -> _Derived:
    """Append listener blocks with new ports to ``out``; TLS blocks only when ``tls`` is given (at most one
    password listener and one client-certificate listener)."""
    derived = _Derived("", 0)
    plain_port: int | None = None
    for block in listeners:
        if block.is_tls:
            taken = derived.cert_port if block.requires_certificate else derived.tls_port
            if tls is None or taken is not None:
                continue  # no certificates supplied (or a second listener of the kind): leave it out
            if block.requires_certificate:
                chosen = derived.cert_port = tls.cert_port or find_free_port(host)
            else:
                chosen = derived.tls_port = tls.port or find_free_port(host)
            out += ["", f"listener {chosen} {host}", *_tls_body(block, tls)]
            continue
        if plain_port is None:
            plain_port = port or find_free_port(host)
            chosen = plain_port
        else:
            chosen = find_free_port(host)
            derived.extra_ports.append(chosen)
        out += ["", f"listener {chosen} {host}", *block.lines]
    if plain_port is None:
        raise BrokerStartError("the config has no plain (non-TLS) listener")
    derived.port = plain_port
    return derived
