"""`fedgen devices add | list | revoke`: the broker credentials of a fleet's devices.

A thin layer over the broker tools that ship with the server (broker/create_users.py: password-file entries and
the ACL; broker/certs.py: client certificates signed by the fleet CA), plus reloading the running Mosquitto
(SIGHUP re-reads the password file and the ACL: a revoked device can no longer connect, and its open
connection can no longer publish or receive anything).

Paths come from options or the environment: FEDGEN_BROKER_PASSWORD_FILE, FEDGEN_BROKER_ACL_FILE,
FEDGEN_BROKER_PID_FILE (or --broker-pid), FEDGEN_BROKER_CA_DIR (ca.crt and ca.key, for --cert; the CA keeps a
copy of each certificate it issues in issued/ and its revocation list in crl.pem, which the broker's
certificate listener checks).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from server_api.resources import shipped_dir


def _broker_tool(name: str) -> ModuleType:
    """broker/<name>.py, the stdlib-only script shipped with the server, as a module."""
    path = shipped_dir("broker") / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fedgen_broker_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _files(args: argparse.Namespace) -> tuple[str, str]:
    """The broker's password file and ACL file, from the options or the environment."""
    password_file = args.password_file or os.environ.get("FEDGEN_BROKER_PASSWORD_FILE")
    acl_file = args.acl_file or os.environ.get("FEDGEN_BROKER_ACL_FILE")
    if not password_file or not acl_file:
        raise ValueError("say where the broker's files are: --password-file and --acl-file (or "
                         "FEDGEN_BROKER_PASSWORD_FILE and FEDGEN_BROKER_ACL_FILE)")
    return password_file, acl_file


def _paths(args: argparse.Namespace) -> list[str]:
    password_file, acl_file = _files(args)
    return ["--password-file", password_file, "--acl-file", acl_file]


def reload_broker(args: argparse.Namespace) -> None:
    """SIGHUP to the broker named by --broker-pid or the pid file, if one is named."""
    pid = args.broker_pid
    pid_file = args.broker_pid_file or os.environ.get("FEDGEN_BROKER_PID_FILE")
    if pid is None and pid_file:
        try:
            pid = int(Path(pid_file).read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise ValueError(f"cannot read the broker's pid from {pid_file}: {exc}") from None
    if pid is None:
        print("the broker was not reloaded (no --broker-pid / FEDGEN_BROKER_PID_FILE): send it SIGHUP",
              file=sys.stderr)
        return
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise ValueError(f"cannot signal the broker (pid {pid}): {exc}") from None
    print(f"broker (pid {pid}) reloaded", file=sys.stderr)


def _fleet_ca(args: argparse.Namespace, required: bool) -> tuple[ModuleType, Any] | None:
    """broker/certs.py and the fleet CA of --ca-dir / FEDGEN_BROKER_CA_DIR (None when not named and not required)."""
    named = args.ca_dir or os.environ.get("FEDGEN_BROKER_CA_DIR")
    if not named and not required:
        return None
    ca_dir = Path(named or "")
    if not (ca_dir / "ca.crt").is_file() or not (ca_dir / "ca.key").is_file():
        raise ValueError(f"no fleet CA in {ca_dir}: --ca-dir DIR (or FEDGEN_BROKER_CA_DIR) must hold ca.crt and ca.key")
    certs = _broker_tool("certs")
    return certs, certs.CertPair(ca_dir / "ca.crt", ca_dir / "ca.key")


def _issued(ca: Any, device: str) -> Path:
    """The CA's copy of a device's certificate, kept to revoke it later."""
    return ca.cert.parent / "issued" / f"{device}.crt"


def _issue_certificate(args: argparse.Namespace, certs: ModuleType, ca: Any) -> None:
    issued = _issued(ca, args.device)
    try:
        out_dir = Path(args.out_dir or ".")
        out_dir.mkdir(parents=True, exist_ok=True)
        pair = certs.make_client_cert(ca, out_dir, args.device)
        issued.parent.mkdir(exist_ok=True)
        issued.write_bytes(pair.cert.read_bytes())
        if not certs.crl_path(ca).exists():
            certs.make_crl(ca)
    except certs.CertError as exc:
        raise ValueError(str(exc)) from None
    print(f"client certificate {pair.cert} and key {pair.key} (copy both to the device; it connects to the "
          "certificate listener with --tls-cert/--tls-key)", file=sys.stderr)


def _revoke_certificate(args: argparse.Namespace) -> None:
    found = _fleet_ca(args, required=False)
    if found is None:
        return
    certs, ca = found
    issued = _issued(ca, args.device)
    if not issued.exists():
        return
    try:
        crl = certs.revoke_cert(ca, issued)
    except certs.CertError as exc:
        raise ValueError(str(exc)) from None
    issued.rename(issued.with_suffix(".revoked"))
    print(f"certificate of {args.device} revoked in {crl}: Mosquitto 2.0 reads the CRL at start-up, so restart the "
          "broker to refuse its TLS connections (until then the ACL denies it every topic)", file=sys.stderr)


def cmd_add(args: argparse.Namespace) -> int:
    argv = [*_paths(args), "add-device", args.device, "--job", args.job]
    if args.password_stdin:
        argv.append("--password-stdin")
    fleet_ca = _fleet_ca(args, required=True) if args.cert else None  # checked before anything is written
    if fleet_ca is not None and _issued(fleet_ca[1], args.device).exists():
        raise ValueError(f"the fleet CA already issued a certificate for {args.device}: revoke it first")
    users = _broker_tool("create_users")
    known = {e.user for e in users.read_entries(Path(_files(args)[1]))}
    code = users.main(argv)
    if code == 0 and fleet_ca is not None:
        try:
            _issue_certificate(args, *fleet_ca)
        except (ValueError, OSError):
            if args.device not in known:  # all or nothing for a new device
                users.main([*_paths(args), "remove-device", args.device])
            raise
    if code == 0:
        reload_broker(args)
    return code


def cmd_list(args: argparse.Namespace) -> int:
    return _broker_tool("create_users").main([*_paths(args), "list"])


def cmd_revoke(args: argparse.Namespace) -> int:
    code = _broker_tool("create_users").main([*_paths(args), "remove-device", args.device])
    if code == 0:
        _revoke_certificate(args)
        reload_broker(args)
    return code


def add_device_commands(sub: argparse._SubParsersAction) -> None:
    """`fedgen devices ...` on the `fedgen` parser's sub-commands."""
    devices = sub.add_parser("devices", help="broker credentials of the fleet's devices (production broker)")
    cmds = devices.add_subparsers(dest="devices_command", required=True)

    def common(p: argparse.ArgumentParser, reload: bool = True) -> None:
        p.add_argument("--password-file", help="Mosquitto password file (default $FEDGEN_BROKER_PASSWORD_FILE)")
        p.add_argument("--acl-file", help="Mosquitto ACL file (default $FEDGEN_BROKER_ACL_FILE)")
        if reload:
            p.add_argument("--broker-pid", type=int, help="reload this Mosquitto process (SIGHUP) afterwards")
            p.add_argument("--broker-pid-file", help="... or the one whose pid is in this file "
                           "(default $FEDGEN_BROKER_PID_FILE)")

    add = cmds.add_parser("add", help="add a device of a job (prints a generated password once)")
    add.add_argument("device", help="the device's id: its MQTT user name and client id")
    add.add_argument("--job", required=True, help="the job the device may take part in")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--cert", action="store_true", help="also issue a client certificate signed by the fleet CA")
    add.add_argument("--ca-dir", help="the fleet CA's folder, ca.crt and ca.key (default $FEDGEN_BROKER_CA_DIR)")
    add.add_argument("--out-dir", help="where --cert writes <device>.crt and <device>.key (default: here)")
    common(add)
    add.set_defaults(func=cmd_add)
    listing = cmds.add_parser("list", help="the server users and devices (with their jobs)")
    common(listing, reload=False)
    listing.set_defaults(func=cmd_list)
    revoke = cmds.add_parser("revoke", help="remove a device: it can no longer connect or upload")
    revoke.add_argument("device")
    revoke.add_argument("--ca-dir", help="the fleet CA's folder: also revoke the device's certificate there "
                        "(default $FEDGEN_BROKER_CA_DIR)")
    common(revoke)
    revoke.set_defaults(func=cmd_revoke)
