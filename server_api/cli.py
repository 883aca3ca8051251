"""`fedgen`: the one command. The library commands (simulate, partition, data) come from `shared.cli`; this
module adds `server` and `fleet`, which need the server extra, and is the only place that may import both."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from pathlib import Path

from server_api.devices import add_device_commands
from server_api.jobs_cli import add_job_commands
from shared.algorithm.config import AGGREGATIONS, ALGORITHMS
from shared.cli import add_library_commands, models_arg, samples_per_class_arg, show_defaults
from shared.data.datasets import DataError


def cmd_server(args: argparse.Namespace) -> int:
    from server_api.main import run_server
    from server_api.settings import ServerSettings

    overrides = {k: v for k, v in {"broker_url": args.broker, "database_url": args.db, "host": args.host,
                                   "port": args.port, "artifact_dir": args.artifacts, "client_id": args.client_id,
                                   "data_dir": args.data_dir}.items() if v is not None}
    run_server(ServerSettings(**overrides), job_file=args.job_file, shared_subscription=args.shared_subscription)
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from server_api.devfleet.fleet import FleetConfig, run_fleet

    cfg = FleetConfig(clients=args.clients, rounds=args.rounds, algorithm=args.algorithm, partial=args.partial,
                      dataset=args.dataset, alpha=args.alpha, seed=args.seed, active=args.active,
                      samples_per_class=args.samples_per_class, local_steps=args.local_steps,
                      round_timeout_s=args.round_timeout, aggregation=args.aggregation, broker_url=args.broker,
                      db_url=args.db, port=args.port, data_dir=args.data_dir, workdir=args.workdir,
                      keep_serving=args.keep_serving, edge_runtime=args.edge_runtime, models=args.models or (),
                      servers=args.servers)
    summary = run_fleet(cfg, args.out)
    if summary:
        final, best5 = summary.get("final_accuracy"), summary.get("best5_mean_accuracy")
        print(f"job {summary.get('job_status')}: final accuracy {'n/a' if final is None else f'{final:.2%}'}, "
              f"mean of the 5 best rounds {'n/a' if best5 is None else f'{best5:.2%}'}")
        if args.out:
            print(f"wrote {args.out}")
    if summary.get("job_status") == "interrupted":
        return 130
    return 0 if summary.get("job_status") == "finished" else 1


def _add_server_commands(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("server", help="run the REST API and round orchestrator (needs .[server])")
    srv.add_argument("--broker", help="mqtt://HOST:PORT (default $FEDGEN_BROKER_URL or mqtt://127.0.0.1:1883)")
    srv.add_argument("--db", help="SQLAlchemy URL (default $FEDGEN_DATABASE_URL or sqlite:///fedgen.db)")
    srv.add_argument("--host", help="REST API address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="REST API port (default 8000)")
    srv.add_argument("--artifacts", type=Path, help="artifact store folder (default ./fedgen-artifacts)")
    srv.add_argument("--data-dir", type=Path, help="datasets for server-side evaluation (default $FEDGEN_DATA_DIR)")
    srv.add_argument("--job-file", type=Path, help="create this job (JSON, as POST /jobs) on start if missing")
    srv.add_argument("--client-id", help="MQTT client id, distinct per server process (default fedgen-server)")
    srv.add_argument("--shared-subscription", action="store_true",
                     help="one of several server processes on one database: ingest updates through a secret "
                          "MQTT share group ($FEDGEN_INGEST_GROUP, or derived from $FEDGEN_ADMIN_TOKEN); each "
                          "job's rounds are run by the process holding its lease ($FEDGEN_LEASE_S, default 10 s)")
    srv.set_defaults(func=cmd_server)

    fleet = sub.add_parser("fleet", help="broker + server + N edge clients on this machine (like compose)")
    fleet.add_argument("--clients", type=int, default=10, help="edge-client processes, one partition each")
    fleet.add_argument("--rounds", type=int, default=10, help="communication rounds")
    fleet.add_argument("--algorithm", choices=ALGORITHMS, default="fedgen", help="the federated algorithm")
    fleet.add_argument("--partial", action="store_true", help="partial sharing: devices upload only theta^p")
    fleet.add_argument("--dataset", default="mnist-subset", help="mnist-subset ships with the package; the "
                       "others need --data-dir")
    fleet.add_argument("--data-dir", default=None, help="folder of the IDX datasets (default $FEDGEN_DATA_DIR)")
    fleet.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration of the label split "
                       "(smaller: more heterogeneous)")
    fleet.add_argument("--seed", type=int, default=0, help="seeds the partition, the selection and training")
    fleet.add_argument("--active", type=int, default=None, help="clients per round (default: half, rounded up)")
    fleet.add_argument("--samples-per-class", type=samples_per_class_arg, default=1000,
                       help="training images per class taken from the dataset ('all' for every one)")
    fleet.add_argument("--local-steps", type=int, default=20, help="SGD steps per device per round")
    fleet.add_argument("--round-timeout", type=int, default=120, help="seconds a round waits for updates")
    fleet.add_argument("--aggregation", choices=AGGREGATIONS, default="mean",
                       help="how updates are combined (robust rules: docs/algorithm.md)")
    fleet.add_argument("--broker", help="use this broker (mqtt://HOST:PORT) instead of starting one")
    fleet.add_argument("--db", help="database URL (default: SQLite in the work directory)")
    fleet.add_argument("--port", type=int, help="REST API port (default: a free one)")
    fleet.add_argument("--servers", type=int, choices=range(1, 9), default=1, metavar="N",
                       help="server processes on the one database (>1: --shared-subscription, docs/scaling.md)")
    fleet.add_argument("--workdir", type=Path, help="logs, database, artifacts, device states (default: temp)")
    fleet.add_argument("--out", type=Path, help="write run.json here")
    fleet.add_argument("--keep-serving", action="store_true", help="keep broker and server up after the job")
    fleet.add_argument("--edge-runtime", choices=("torch", "lite", "mixed"), default="torch",
                       help="the devices' training runtime; mixed: even-numbered devices torch, odd ones lite")
    fleet.add_argument("--models", type=models_arg, default=None, metavar="NAME,NAME,...",
                       help="devices with different models (needs --partial): device i runs the i-th, round-robin")
    fleet.set_defaults(func=cmd_fleet)
    show_defaults(fleet)


# imported only by the commands that need `.[server]`: a missing one means the extra is not installed
SERVER_EXTRA_MODULES = frozenset({"fastapi", "fastapi_offline", "uvicorn", "sqlalchemy", "alembic", "psycopg",
                                  "pydantic_settings", "prometheus_client", "onnxscript", "matplotlib", "torch",
                                  "onnx", "onnxruntime", "paho"})


def _version() -> str:
    try:
        return importlib.metadata.version("fedgen-fleet")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgen", description="FedGen federated learning: simulation, data, "
                                     "server, fleet.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO (`fedgen server` always does)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_library_commands(sub)
    _add_server_commands(sub)
    add_device_commands(sub)
    add_job_commands(sub)
    for command in sub.choices.values():  # `fedgen server -v` as well as `fedgen -v server`
        if "-v" not in command._option_string_actions:
            command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                 help="log at INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.verbose or args.command == "server"  # a server says what it does: rounds, devices, refusals
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (DataError, ValueError) as exc:
        print(f"fedgen: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in SERVER_EXTRA_MODULES:
            print(f"fedgen: error: `fedgen {args.command}` needs the server extra (module {exc.name} is missing): "
                  "pip install 'fedgen-fleet[server]' (README, Install)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
