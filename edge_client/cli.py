"""`edge-client`: the device side of the fleet."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from edge_client.state import auto_client_id, lock_state_dir
from shared.algorithm.config import MODELS
from shared.data.datasets import DATA_DIR_ENV, dataset_folder
from shared.mqtt import BrokerAddress, client_certificate_name


def _check_data_file(path: str) -> None:
    """--data at start-up: the file or folder exists and an .npz holds arrays x and y (loaded in full later)."""
    if os.path.isdir(path):
        return
    if not os.path.isfile(path):
        raise ValueError(f"--data {path}: no such file or folder")
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
    except (OSError, ValueError) as exc:
        raise ValueError(f"--data {path}: not a readable .npz ({exc})") from None
    if missing:
        raise ValueError(f"--data {path}: lacks the array(s) {', '.join(missing)}")


def _certificate_name(args: argparse.Namespace) -> str | None:
    """The CN of --tls-cert (checked against --tls-key), or None without a client certificate."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    return client_certificate_name(args.tls_cert, args.tls_key) if args.tls_cert else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-client", description="FedGen edge client: trains on local data, "
                                "uploads updates over MQTT.")
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--job", required=True)
    p.add_argument("--client-id", required=True, help="this device's id, or 'auto': its --username when given, "
                   "else the host name plus a random suffix, kept in the state directory; with a production "
                   "broker it must be the --username")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help=".npz with x, y (and optionally x_test, y_test), or a folder of class folders")
    data.add_argument("--partition", help="DATASET:alpha=A:users=U:index=I|auto[:seed=S][:spc=N|all][:min=M]")
    p.add_argument("--data-dir", default=None, help=f"dataset folder for --partition (default ${DATA_DIR_ENV})")
    p.add_argument("--state-dir", default=None, help="where the device keeps its state, one directory per device "
                   "process (default ./edge-state/ID; ./edge-state/auto for --client-id auto)")
    p.add_argument("--username", default=None)
    p.add_argument("--password", default=None, help="MQTT password; prefer the environment variable "
                   "FEDGEN_MQTT_PASSWORD (a command line is visible to other users of the device)")
    p.add_argument("--tls-ca", default=None, help="CA certificate to verify the broker's TLS certificate")
    p.add_argument("--tls-cert", default=None, help="this device's client certificate (from `fedgen devices add "
                   "--cert`), for the broker's certificate listener: no password needed; its CN is the client id")
    p.add_argument("--tls-key", default=None, help="the private key of --tls-cert")
    p.add_argument("--retry", type=float, default=10.0, help="seconds between re-sends of an unacknowledged update")
    p.add_argument("--keep-running", action="store_true", help="stay connected after the job finished")
    p.add_argument("--job-wait", type=float, default=60.0, metavar="SECONDS",
                   help="exit (status 3) when nothing of the job arrives within this many seconds of connecting "
                   "to the broker (default 60; 0 waits forever)")
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "lite"),
                   help="training runtime: torch, lite (numpy, no torch) or auto: torch when installed (default)")
    p.add_argument("--model", default=None, choices=MODELS,
                   help="the model this device runs, one the job allows (default: the job's first)")
    p.add_argument("--threads", type=int, default=1, help="compute threads (default 1)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the torch runtime trains: cuda, cpu or auto: cuda when available (default)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edge_client.client import EdgeClient, EdgeOptions
    from edge_client.data import load_image_folder, load_npz
    from edge_client.runtime import make_runtime
    from shared.data.partition import parse_partition
    from shared.protocol.errors import ValidationError
    from shared.protocol.ids import check_id

    try:
        BrokerAddress.parse(args.broker)
        state_dir, lock = args.state_dir, None
        cert_name = _certificate_name(args)
        if cert_name is not None and args.client_id in ("auto", cert_name):
            args.client_id = cert_name
        elif cert_name is not None:
            raise ValueError(f"--client-id {args.client_id} differs from the CN of --tls-cert ({cert_name}): the "
                             "certificate listener gives the device its certificate's name as client id")
        elif args.client_id == "auto" and args.username:
            args.client_id = args.username
        elif args.client_id == "auto":
            state_dir = state_dir or os.path.join("edge-state", "auto")
            lock = lock_state_dir(state_dir)  # before choosing: two processes must not share the id
            args.client_id = auto_client_id(state_dir)
        if args.username and args.client_id != args.username:
            raise ValueError(f"--client-id {args.client_id} differs from --username {args.username}: the production "
                             "broker gives every device its user name as client id (docs/broker.md)")
        check_id(args.client_id, "client")
        check_id(args.job, "job")
        spec, index = parse_partition(args.partition) if args.partition else (None, None)
        if args.tls_ca and not os.path.isfile(args.tls_ca):
            raise ValueError(f"--tls-ca {args.tls_ca}: no such file")
        if args.password and not args.username:
            raise ValueError("--password needs --username")
        if args.job_wait < 0:
            raise ValueError("--job-wait must be >= 0")
        if spec is not None:
            dataset_folder(spec.dataset, args.data_dir)  # the dataset is there (loaded once the job says how)
        if args.data:
            _check_data_file(args.data)
        state_dir = state_dir or os.path.join("edge-state", args.client_id)
        if lock is None:
            lock = lock_state_dir(state_dir)
        runtime = make_runtime(args.runtime, args.threads, args.device)
    except (ValueError, ValidationError, OSError) as exc:
        print(f"edge-client: error: {exc}", file=sys.stderr)
        return 2
    loader = None
    if args.data:
        load = load_image_folder if os.path.isdir(args.data) else load_npz
        loader = functools.partial(_load_user_data, load, args.data, args.client_id)
    opts = EdgeOptions(broker=args.broker, job=args.job, client_id=args.client_id,
                       state_dir=state_dir,
                       partition=spec, partition_index=index, data_loader=loader, data_dir=args.data_dir,
                       username=args.username, password=args.password or os.environ.get("FEDGEN_MQTT_PASSWORD"),
                       tls_ca=args.tls_ca, tls_cert=(args.tls_cert, args.tls_key) if args.tls_cert else None,
                       retry_s=args.retry, exit_when_finished=not args.keep_running,
                       runtime=args.runtime, threads=args.threads, device=args.device, model=args.model,
                       job_wait_s=args.job_wait or None)
    try:
        client = EdgeClient(opts, runtime)
        code = client.run()
    except KeyboardInterrupt:
        return 130
    finally:
        lock.close()
    if client.end_reason:
        print(f"edge-client: {client.end_reason}", file=sys.stderr)
    return code


def _load_user_data(load, path, client_id, image_shape, num_classes):
    return load(path, image_shape, num_classes, client_id)


if __name__ == "__main__":
    sys.exit(main())
