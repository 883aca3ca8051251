"""The library commands of `fedgen`: simulate, partition, data. They need only the base install and torch;
`server_api.cli` adds `server` and `fleet` and is the entry point."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec

from shared.algorithm.config import ALGORITHMS, MODELS
from shared.data.datasets import DATA_DIR_ENV, DataError


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to the help of every option of `parser` that has a default and does not say it."""
    for action in parser._actions:
        default = action.default
        if action.help and default is not None and default is not False and default != argparse.SUPPRESS \
                and "default" not in action.help:
            action.help += " (default: %(default)s)"

def samples_per_class_arg(text: str) -> int | None:
    """``--samples-per-class N`` or ``all`` (None)."""
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1 or 'all'")
    return value


def models_arg(text: str) -> tuple[str, ...]:
    """``--models cnn,cnn-small,mlp``: distinct names of shipped models."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a model is named twice in {text!r}")
    return names


def _add_partition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or the shipped mnist-subset")
    p.add_argument("--data-dir", default=None, help=f"folder holding <dataset>/ IDX files (default: ${DATA_DIR_ENV})")
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration (smaller = more skewed)")
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--samples-per-class", type=samples_per_class_arg, default=msgspec.UNSET,
                   help="training images kept per class before partitioning, or 'all' (default: the dataset's: "
                        "1500 for MNIST as the reference's setting, all 1000 of the shipped subset)")
    p.add_argument("--min-samples", type=int, default=10, help="redraw until every user has this many")
    p.add_argument("--validation", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this fraction (0..0.5) of each user's training images as its validation split "
                        "(simulate then reports val_accuracy; default 0: none)")
    p.add_argument("--seed", type=int, default=0)


def _partition_config(args: argparse.Namespace):
    from shared.data.partition import PartitionSpec

    return PartitionSpec(dataset=args.dataset, users=args.users, alpha=args.alpha,
                         samples_per_class=args.samples_per_class, min_samples=args.min_samples, seed=args.seed,
                         validation=args.validation or msgspec.UNSET)


def cmd_simulate(args: argparse.Namespace) -> int:
    import torch

    from shared.algorithm.config import AlgorithmConfig
    from shared.simulation import SimulationConfig, plot_curves, run_simulation, write_run

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"model": args.models[0], "models": list(args.models)} if args.models else {"model": args.model}
    algo = AlgorithmConfig.from_dict({"algorithm": args.algorithm, "partial": args.partial, **models,
                                      "local_steps": args.local_steps, "batch_size": args.batch_size,
                                      "learning_rate": args.learning_rate})
    cfg = SimulationConfig(dataset=args.dataset, data_dir=args.data_dir, rounds=args.rounds, active=args.active,
                           seed=args.seed, partition=_partition_config(args), algorithm=algo)
    run = run_simulation(cfg, progress=not args.quiet)
    print(f"final accuracy {run['final_accuracy']:.2%}, mean of the 5 best rounds {run['best5_mean_accuracy']:.2%}, "
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
    from shared.data.datasets import load_dataset
    from shared.data.partition import format_histogram, label_histogram, partition, plot_histogram

    users = partition(load_dataset(args.dataset, args.data_dir), _partition_config(args))
    hist = label_histogram(users)
    print(format_histogram(hist))
    print(f"test images per user: {[len(u.test_y) for u in users]}")
    if args.png:
        plot_histogram(hist, args.png, f"{args.dataset}, alpha={args.alpha:g}, seed={args.seed}")
        print(f"wrote {args.png}")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from shared.data.datasets import resolve_data_dir
    from shared.data.download import download

    root = resolve_data_dir(args.data_dir)
    if root is None:
        raise DataError(f"say where to put the files: --data-dir DIR or ${DATA_DIR_ENV}")
    for name in args.datasets:
        print(f"{name}: {download(name, root, mirrors=args.mirror)}")
    return 0


def cmd_data_make_subset(args: argparse.Namespace) -> int:
    from shared.data.datasets import SHIPPED_DIR, load_dataset, make_subset

    out = args.out or SHIPPED_DIR / "mnist-subset"
    make_subset(load_dataset(args.dataset, args.data_dir), out, args.train_per_class, args.test_per_class,
                args.seed)
    print(f"wrote {out}")
    return 0


def add_library_commands(sub: argparse._SubParsersAction) -> None:
    """simulate, partition and data, on the `fedgen` parser's sub-commands."""

    sim = sub.add_parser("simulate", help="run FedAvg / FedProx / FedGen in one process")
    _add_partition_args(sim)
    sim.add_argument("--algorithm", choices=ALGORITHMS, default="fedgen")
    sim.add_argument("--model", choices=MODELS, default="cnn")
    sim.add_argument("--models", type=models_arg, default=None, metavar="NAME,NAME,...",
                     help=f"devices with different models (needs --partial): users run these round-robin, user 0 "
                          f"the first ({', '.join(MODELS)}); overrides --model")
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

    data = sub.add_parser("data", help="dataset files").add_subparsers(dest="data_command", required=True)
    dl = data.add_parser("download", help="download and verify datasets into the data directory")
    dl.add_argument("datasets", nargs="*", default=["mnist", "fashion-mnist"], help="the datasets to fetch")
    dl.add_argument("--data-dir", default=None, help=f"where they go (default ${DATA_DIR_ENV})")
    dl.add_argument("--mirror", action="append", help="base URL to fetch from instead of the canonical ones "
                    "(repeatable; every file is checked against its known SHA-256 either way)")
    dl.set_defaults(func=cmd_data_download)
    show_defaults(dl)
    ms = data.add_parser("make-subset", help="(re)build the shipped class-balanced MNIST subset")
    ms.add_argument("--dataset", default="mnist")
    ms.add_argument("--data-dir", default=None)
    ms.add_argument("--train-per-class", type=int, default=1000)
    ms.add_argument("--test-per-class", type=int, default=300)
    ms.add_argument("--seed", type=int, default=0)
    ms.add_argument("--out", type=Path, help="default: the package's shared/datasets/mnist-subset")
    ms.set_defaults(func=cmd_data_make_subset)
