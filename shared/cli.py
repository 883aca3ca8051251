"""The `fedgen` command: simulate, partition, data."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shared.data import DATA_DIR_ENV, DataError


def _samples_per_class(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1 or 'all'")
    return value


def _add_partition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or the shipped mnist-subset")
    p.add_argument("--data-dir", default=None, help=f"folder holding <dataset>/ IDX files (default: ${DATA_DIR_ENV})")
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (smaller = more skewed)")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--samples-per-class", type=_samples_per_class, default=1500,
                   help="training images kept per class before partitioning, or 'all' (default 1500, as the "
                        "reference's MNIST setting)")
    p.add_argument("--min-samples", type=int, default=10, help="redraw until every user has this many")
    p.add_argument("--seed", type=int, default=0)


def _partition_config(args: argparse.Namespace):
    from shared.partition import PartitionConfig

    return PartitionConfig(users=args.users, alpha=args.alpha, samples_per_class=args.samples_per_class,
                           min_samples=args.min_samples, seed=args.seed)


def cmd_simulate(args: argparse.Namespace) -> int:
    import torch

    from shared.config import AlgorithmConfig
    from shared.simulation import SimulationConfig, plot_curves, run_simulation, write_run

    if args.threads:
        torch.set_num_threads(args.threads)
    algo = AlgorithmConfig(algorithm=args.algorithm, partial=args.partial, model=args.model,
                           local_steps=args.local_steps, batch_size=args.batch_size,
                           learning_rate=args.learning_rate)
    cfg = SimulationConfig(dataset=args.dataset, data_dir=args.data_dir, rounds=args.rounds, active=args.active,
                           seed=args.seed, partition=_partition_config(args), algorithm=algo)
    run = run_simulation(cfg, progress=not args.quiet)
    print(f"final accuracy {run['final_accuracy']:.4f}, top-5 accuracy {run['top5_accuracy']:.4f}, "
          f"{run['seconds']:.1f} s")
    if args.out:
        write_run(run, args.out)
        print(f"wrote {args.out}")
    if args.plot:
        plot_curves({args.algorithm: [r["accuracy"] for r in run["rounds"]]}, args.plot,
                    f"{args.dataset}, alpha={args.alpha:g}{', partial' if args.partial else ''}")
        print(f"wrote {args.plot}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from shared.data import load_dataset
    from shared.partition import format_histogram, label_histogram, partition, plot_histogram

    users = partition(load_dataset(args.dataset, args.data_dir), _partition_config(args))
    hist = label_histogram(users)
    print(format_histogram(hist))
    print(f"test images per user: {[len(u.test_y) for u in users]}")
    if args.png:
        plot_histogram(hist, args.png, f"{args.dataset}, alpha={args.alpha:g}, seed={args.seed}")
        print(f"wrote {args.png}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from shared.data import resolve_data_dir
    from shared.download import download

    root = resolve_data_dir(args.data_dir)
    if root is None:
        raise DataError(f"say where to put the files: --data-dir DIR or ${DATA_DIR_ENV}")
    for name in args.datasets:
        print(f"{name}: {download(name, root, mirrors=args.mirror)}")
    return 0


def cmd_data_make_subset(args: argparse.Namespace) -> int:
    from shared.data import SHIPPED_DIR, load_dataset, make_subset

    out = args.out or SHIPPED_DIR / "mnist-subset"
    make_subset(load_dataset(args.dataset, args.data_dir), out, args.train_per_class, args.test_per_class,
                args.seed)
    print(f"wrote {out}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from server_api.main import run_server
    from server_api.settings import ServerSettings

    overrides = {k: v for k, v in {"broker_url": args.broker, "database_url": args.db, "host": args.host,
                                   "port": args.port, "artifact_dir": args.artifacts}.items() if v is not None}
    run_server(ServerSettings(**overrides), job_file=args.job_file, client_id=args.client_id,
               shared_subscription=args.shared_subscription)
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from server_api.fleet import FleetConfig, run_fleet

    cfg = FleetConfig(clients=args.clients, rounds=args.rounds, algorithm=args.algorithm, partial=args.partial,
                      dataset=args.dataset, alpha=args.alpha, seed=args.seed, active=args.active,
                      samples_per_class=args.samples_per_class, local_steps=args.local_steps,
                      round_timeout_s=args.round_timeout, aggregation=args.aggregation, broker_url=args.broker,
                      db_url=args.db, port=args.port, data_dir=args.data_dir, workdir=args.workdir,
                      keep_serving=args.keep_serving)
    summary = run_fleet(cfg, args.out)
    if summary:
        print(f"job {summary.get('job_status')}: final accuracy {summary.get('final_accuracy')}, "
              f"top-5 {summary.get('top5_accuracy')}")
        if args.out:
            print(f"wrote {args.out}")
    return 0 if summary.get("job_status") == "finished" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgen", description="FedGen federated learning: simulation, data, fleet.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run FedAvg / FedProx / FedGen in one process")
    _add_partition_args(sim)
    sim.add_argument("--algorithm", choices=["fedavg", "fedprox", "fedgen"], default="fedgen")
    sim.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    sim.add_argument("--active", type=int, default=10, help="clients selected per round")
    sim.add_argument("--rounds", type=int, default=200)
    sim.add_argument("--local-steps", type=int, default=20, help="T mini-batch steps per round")
    sim.add_argument("--batch-size", type=int, default=32)
    sim.add_argument("--learning-rate", type=float, default=0.01)
    sim.add_argument("--partial", action="store_true", help="share only the predictor theta^p")
    sim.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    sim.add_argument("--out", type=Path, help="write run.json here")
    sim.add_argument("--plot", type=Path, help="write the learning curve (PNG) here")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    sim.set_defaults(func=cmd_simulate)

    part = sub.add_parser("partition", help="print (and plot) the per-user label histogram")
    _add_partition_args(part)
    part.add_argument("--png", type=Path, help="save a scatter plot like the paper's Figure 4")
    part.set_defaults(func=cmd_partition)

    srv = sub.add_parser("server", help="run the REST API and round orchestrator (needs .[server])")
    srv.add_argument("--broker", help="mqtt://HOST:PORT (default $FEDGEN_BROKER_URL or mqtt://127.0.0.1:1883)")
    srv.add_argument("--db", help="SQLAlchemy URL (default $FEDGEN_DATABASE_URL or sqlite:///fedgen.db)")
    srv.add_argument("--host", help="REST API address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="REST API port (default 8000)")
    srv.add_argument("--artifacts", type=Path, help="artifact store folder (default ./fedgen-artifacts)")
    srv.add_argument("--job-file", type=Path, help="create this job (JSON, as POST /jobs) on start if missing")
    srv.add_argument("--client-id", default="fedgen-server", help="MQTT client id (distinct per server process)")
    srv.add_argument("--shared-subscription", action="store_true",
                     help="ingest updates through $share/fedgen-server/... (several server processes)")
    srv.set_defaults(func=cmd_server)

    fleet = sub.add_parser("fleet", help="broker + server + N edge clients on this machine (like compose)")
    fleet.add_argument("--clients", type=int, default=10)
    fleet.add_argument("--rounds", type=int, default=10)
    fleet.add_argument("--algorithm", choices=["fedavg", "fedprox", "fedgen"], default="fedgen")
    fleet.add_argument("--partial", action="store_true")
    fleet.add_argument("--dataset", default="mnist-subset")
    fleet.add_argument("--data-dir", default=None)
    fleet.add_argument("--alpha", type=float, default=0.1)
    fleet.add_argument("--seed", type=int, default=0)
    fleet.add_argument("--active", type=int, default=None, help="clients per round (default: half)")
    fleet.add_argument("--samples-per-class", type=_samples_per_class, default=1000)
    fleet.add_argument("--local-steps", type=int, default=20)
    fleet.add_argument("--round-timeout", type=int, default=120)
    fleet.add_argument("--aggregation", choices=["mean", "median", "trimmed_mean"], default="mean")
    fleet.add_argument("--broker", help="use this broker instead of starting one")
    fleet.add_argument("--db", help="database URL (default: SQLite in the work directory)")
    fleet.add_argument("--port", type=int, help="REST API port (default: a free one)")
    fleet.add_argument("--workdir", type=Path, help="logs, database, artifacts, device states (default: temp)")
    fleet.add_argument("--out", type=Path, help="write run.json here")
    fleet.add_argument("--keep-serving", action="store_true", help="keep broker and server up after the job")
    fleet.set_defaults(func=cmd_fleet)

    data = sub.add_parser("data", help="dataset files").add_subparsers(dest="data_command", required=True)
    dl = data.add_parser("download", help="download and verify datasets into the data directory")
    dl.add_argument("datasets", nargs="*", default=["mnist", "fashion-mnist"])
    dl.add_argument("--data-dir", default=None)
    dl.add_argument("--mirror", action="append", help="base URL to fetch from instead of the canonical ones")
    dl.set_defaults(func=cmd_data_download)
    ms = data.add_parser("make-subset", help="(re)build the shipped class-balanced MNIST subset")
    ms.add_argument("--dataset", default="mnist")
    ms.add_argument("--data-dir", default=None)
    ms.add_argument("--train-per-class", type=int, default=1000)
    ms.add_argument("--test-per-class", type=int, default=300)
    ms.add_argument("--seed", type=int, default=0)
    ms.add_argument("--out", type=Path, help="default: the package's shared/datasets/mnist-subset")
    ms.set_defaults(func=cmd_data_make_subset)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (DataError, ValueError) as exc:
        print(f"fedgen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
