"""`edge-client`: the device side of the fleet."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import socket
import sys

from shared.data import DATA_DIR_ENV


def _client_id(text: str) -> str:
    if text != "auto":
        return text
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.") or "device"
    return host[:64]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-client", description="FedGen edge client: trains on local data, "
                                "uploads updates over MQTT.")
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--job", required=True)
    p.add_argument("--client-id", required=True, type=_client_id, help="this device's id, or 'auto' (hostname)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help=".npz with x, y (and optionally x_test, y_test), or a folder of class folders")
    data.add_argument("--partition", help="DATASET:alpha=A:users=U:index=I|auto[:seed=S][:spc=N|all][:min=M]")
    p.add_argument("--data-dir", default=None, help=f"dataset folder for --partition (default ${DATA_DIR_ENV})")
    p.add_argument("--state-dir", default=None, help="where the device keeps its state (default ./edge-state/ID)")
    p.add_argument("--username", default=None)
    p.add_argument("--password", default=None, help="MQTT password; prefer the environment variable "
                   "FEDGEN_MQTT_PASSWORD (a command line is visible to other users of the device)")
    p.add_argument("--tls-ca", default=None, help="CA certificate to verify the broker's TLS certificate")
    p.add_argument("--retry", type=float, default=10.0, help="seconds between re-sends of an unacknowledged update")
    p.add_argument("--keep-running", action="store_true", help="stay connected after the job finished")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from edge_client.client import EdgeClient, EdgeOptions
    from edge_client.data import PartitionSpec, load_image_folder, load_npz
    from shared.protocol import check_id
    from shared.wire import ValidationError

    torch.set_num_threads(max(1, args.threads))
    try:
        check_id(args.client_id, "client")
        check_id(args.job, "job")
        partition = PartitionSpec.parse(args.partition) if args.partition else None
        if args.tls_ca and not os.path.isfile(args.tls_ca):
            raise ValueError(f"--tls-ca {args.tls_ca}: no such file")
        if args.password and not args.username:
            raise ValueError("--password needs --username")
    except (ValueError, ValidationError) as exc:
        print(f"edge-client: error: {exc}", file=sys.stderr)
        return 2
    loader = None
    if args.data:
        load = load_image_folder if os.path.isdir(args.data) else load_npz
        loader = functools.partial(_load_user_data, load, args.data, args.client_id)
    opts = EdgeOptions(broker=args.broker, job=args.job, client_id=args.client_id,
                       state_dir=args.state_dir or os.path.join("edge-state", args.client_id),
                       partition=partition, data_loader=loader, data_dir=args.data_dir, username=args.username,
                       password=args.password or os.environ.get("FEDGEN_MQTT_PASSWORD"), tls_ca=args.tls_ca,
                       retry_s=args.retry, exit_when_finished=not args.keep_running)
    try:
        return EdgeClient(opts).run()
    except KeyboardInterrupt:
        return 130


def _load_user_data(load, path, client_id, image_shape, num_classes):  # noqa: ANN001, ANN202
    return load(path, image_shape, num_classes, client_id)


if __name__ == "__main__":
    sys.exit(main())
