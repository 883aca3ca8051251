#!/usr/bin/env python3
"""Generate a development/test PKI for the Mosquitto TLS listener with ``openssl``.

Creates, in an output directory:

* ``ca.key`` / ``ca.crt``          -- a self-signed test CA (never use in production)
* ``server.key`` / ``server.crt``  -- a server certificate signed by that CA whose
  subjectAltName covers ``localhost`` and ``127.0.0.1`` (plus any ``--san`` given)
* ``<name>.key`` / ``<name>.crt``  -- optional client certificates (``--client NAME``),
  with the client name as CN, for the certificate listener (``require_certificate true``)
* ``crl.pem``                      -- the CA's certificate revocation list (empty at first; see
  :func:`revoke_cert`), which that listener checks, with its database ``ca-index.txt``

Stdlib only; shells out to the ``openssl`` binary (OpenSSL 1.1.1 or 3.x).
Keys are EC P-256 (fast to generate, supported by Mosquitto 2.0's OpenSSL builds).

Usage::

    python broker/certs.py --out ./certs
    python broker/certs.py --out ./certs --client dev-a --client dev-b --san DNS:broker.lan
    python broker/certs.py --out ./certs --renew-crl      # the revocation list, valid --days days again
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DAYS = 825
DEFAULT_SANS = ("DNS:localhost", "IP:127.0.0.1")


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class DevPKI:
    """Everything :func:`make_dev_pki` generated."""

    ca: CertPair
    server: CertPair
    clients: dict[str, CertPair]


class CertError(RuntimeError):
    """Raised when openssl is missing or fails."""


def _openssl() -> str:
    exe = shutil.which("openssl")
    if exe is None:
        raise CertError("openssl not found on PATH; install it (e.g. apt-get install openssl)")
    return exe


def _run(args: list[str]) -> None:
    proc = subprocess.run([_openssl(), *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CertError(f"openssl {' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()}")


def _gen_key(path: Path) -> None:
    _run(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)])
    os.chmod(path, 0o600)


def normalise_san(entry: str) -> str:
    """Turn ``localhost`` / ``10.0.0.5`` / ``DNS:x`` into an openssl SAN entry."""
    if ":" in entry and entry.split(":", 1)[0].upper() in {"DNS", "IP"}:
        kind, value = entry.split(":", 1)
        return f"{kind.upper()}:{value}"
    try:
        ipaddress.ip_address(entry)
    except ValueError:
        return f"DNS:{entry}"
    return f"IP:{entry}"


def make_ca(out: Path, days: int = DEFAULT_DAYS, cn: str = "fedgen dev CA") -> CertPair:
    """Create a self-signed CA certificate and key in ``out``."""
    pair = CertPair(out / "ca.crt", out / "ca.key")
    _gen_key(pair.key)
    _run([
        "req", "-x509", "-new", "-key", str(pair.key), "-sha256", "-days", str(days),
        "-subj", f"/CN={cn}/O=fedgen-dev",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(pair.cert),
    ])
    return pair


def _sign(ca: CertPair, name: str, out: Path, cn: str, extensions: str, days: int) -> CertPair:
    """Create key + CSR for ``cn`` and sign it with the CA using ``extensions``."""
    pair = CertPair(out / f"{name}.crt", out / f"{name}.key")
    _gen_key(pair.key)
    with tempfile.TemporaryDirectory() as tmp:
        csr, ext = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        ext.write_text(extensions, encoding="ascii")
        _run(["req", "-new", "-key", str(pair.key), "-subj", f"/CN={cn}/O=fedgen-dev", "-out", str(csr)])
        _run([
            "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
            "-CAcreateserial", "-CAserial", str(Path(tmp) / "ca.srl"), "-sha256",
            "-days", str(days), "-extfile", str(ext), "-out", str(pair.cert),
        ])
    return pair


def make_server_cert(ca: CertPair, out: Path, sans: list[str] | tuple[str, ...] = DEFAULT_SANS,
                     days: int = DEFAULT_DAYS, name: str = "server") -> CertPair:
    """Create a server (serverAuth) certificate whose SAN covers ``sans``."""
    san = ",".join(normalise_san(s) for s in sans)
    cn = next((s.split(":", 1)[1] for s in (normalise_san(x) for x in sans) if s.startswith("DNS:")), "localhost")
    ext = (
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={san}\n"
    )
    return _sign(ca, name, out, cn, ext, days)


def make_client_cert(ca: CertPair, out: Path, client: str, days: int = DEFAULT_DAYS) -> CertPair:
    """Create a client (clientAuth) certificate with ``client`` as CN."""
    if not client or any(c in client for c in "/+#:= \t\n\\"):
        raise CertError(f"invalid client name for a certificate: {client!r}")
    if client in {"ca", "server"}:
        raise CertError(f"client name {client!r} would overwrite the {client} certificate")
    ext = (
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n"
    )
    return _sign(ca, client, out, client, ext, days)


_CA_CONFIG = """[ca]
default_ca = fleet
[fleet]
database = {index}
certificate = {cert}
private_key = {key}
default_md = sha256
default_crl_days = {days}
"""


def _ca_command(ca: CertPair, args: list[str], days: int) -> None:
    """Run ``openssl ca`` with a minimal config whose database is ``ca-index.txt`` beside the CA."""
    if not ca.cert.is_file() or not ca.key.is_file():
        raise CertError(f"no CA in {ca.cert.parent} (ca.crt and ca.key)")
    index = ca.cert.parent / "ca-index.txt"
    index.touch()
    attr = index.with_name("ca-index.txt.attr")
    if not attr.exists():
        attr.write_text("unique_subject = no\n", encoding="ascii")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "ca.cnf"
        config.write_text(_CA_CONFIG.format(index=index.resolve(), cert=ca.cert.resolve(), key=ca.key.resolve(),
                                            days=days), encoding="ascii")
        _run(["ca", "-batch", "-config", str(config), *args])


def crl_path(ca: CertPair) -> Path:
    """The CA's revocation list, beside its certificate."""
    return ca.cert.parent / "crl.pem"


def make_crl(ca: CertPair, days: int = DEFAULT_DAYS) -> Path:
    """(Re)write the CA's CRL from its database; valid ``days`` days (an expired CRL refuses every client)."""
    _ca_command(ca, ["-gencrl", "-out", str(crl_path(ca))], days)
    return crl_path(ca)


def revoke_cert(ca: CertPair, cert: Path, days: int = DEFAULT_DAYS) -> Path:
    """Mark ``cert`` revoked in the CA's database and rewrite the CRL; returns the CRL's path.

    Revoking a certificate twice is not an error (the CRL is rewritten all the same)."""
    try:
        _ca_command(ca, ["-revoke", str(cert)], days)
    except CertError as exc:
        if "already revoked" not in str(exc).lower():
            raise
    return make_crl(ca, days)


def make_dev_pki(out: Path, extra_sans: list[str] | None = None, clients: list[str] | None = None,
                 days: int = DEFAULT_DAYS) -> DevPKI:
    """Generate CA, server certificate and optional client certificates into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ca = make_ca(out, days)
    server = make_server_cert(ca, out, [*DEFAULT_SANS, *(extra_sans or [])], days)
    client_pairs = {c: make_client_cert(ca, out, c, days) for c in clients or []}
    make_crl(ca, days)
    return DevPKI(ca, server, client_pairs)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate a dev/test CA and TLS certificates for Mosquitto.")
    p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    p.add_argument("--san", action="append", default=[],
                   help="extra server subjectAltName (DNS:name, IP:addr, or a bare name/address); repeatable")
    p.add_argument("--client", action="append", default=[], help="also create a client certificate; repeatable")
    p.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity in days (default {DEFAULT_DAYS})")
    p.add_argument("--renew-crl", action="store_true",
                   help="only rewrite the revocation list crl.pem of the CA in --out (valid --days days again)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.renew_crl:
        try:
            print(f"crlfile  {make_crl(CertPair(args.out / 'ca.crt', args.out / 'ca.key'), args.days)}")
        except CertError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        pki = make_dev_pki(args.out, args.san, args.client, args.days)
    except CertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cafile   {pki.ca.cert}")
    print(f"certfile {pki.server.cert}")
    print(f"keyfile  {pki.server.key}")
    print(f"crlfile  {crl_path(pki.ca)}")
    for name, pair in pki.clients.items():
        print(f"client {name}: {pair.cert} {pair.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
