"""FedGen's generator training against the number of clients in a round: the teacher term over K linear
predictors as one matrix product (what `train_generator` does), the generic vmap over the predictor module
(what it does for a non-linear predictor, and did before for every one) and the loop over clients both
replaced, and the estimate from M clients drawn per sample (`generator_teacher_clients`), side by side in
one run. Writes bench/results/generator_scale.md.

    python bench/generator_scale.py [--clients 10,100,1000,10000] [--loop-up-to 1000] [--sample 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.algorithm.config import AlgorithmConfig  # noqa: E402
from shared.algorithm.distill import (  # noqa: E402
    StackedPredictors,
    diversity_loss,
    label_weights,
    make_generator,
    make_generator_optimizer,
    stack_predictors,
    train_generator,
)
from shared.algorithm.models import LATENT_DIM, sample_noise  # noqa: E402

NUM_CLASSES = 10


def client_states(k: int, seed: int) -> tuple[list[dict[str, torch.Tensor]], np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    states = [{"predictor.weight": 0.1 * torch.randn(NUM_CLASSES, LATENT_DIM, generator=gen),
               "predictor.bias": 0.1 * torch.randn(NUM_CLASSES, generator=gen)} for _ in range(k)]
    counts = np.random.default_rng(seed).integers(0, 100, (k, NUM_CLASSES))
    return states, counts


def looped(states: list[dict[str, torch.Tensor]], counts: np.ndarray, cfg: AlgorithmConfig) -> None:
    """The per-client loop (the implementation before batching), for comparison."""
    generator = make_generator(NUM_CLASSES, LATENT_DIM, cfg, seed=1)
    optimizer = make_generator_optimizer(generator, cfg)
    rng = torch.Generator().manual_seed(0)
    available = torch.as_tensor(np.flatnonzero(counts.sum(axis=0) > 0))
    weights = torch.as_tensor(label_weights(counts), dtype=torch.float32)
    for _ in range(cfg.generator_steps):
        y = available[torch.randint(len(available), (cfg.generator_batch_size,), generator=rng)]
        noise = sample_noise(len(y), generator.noise_dim, rng)
        z = generator(noise, y)
        teacher = torch.zeros(())
        for k, state in enumerate(states):
            logits = F.linear(z, state["predictor.weight"], state["predictor.bias"])
            teacher = teacher + (weights[k, y] * F.cross_entropy(logits, y, reduction="none")).mean()
        loss = teacher + cfg.diversity_weight * diversity_loss(noise, z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def batched(stacked: StackedPredictors, counts: np.ndarray, cfg: AlgorithmConfig) -> None:
    """What a round close runs: the predictors arrive stacked (the round accumulator keeps them so)."""
    generator = make_generator(NUM_CLASSES, LATENT_DIM, cfg, seed=1)
    train_generator(generator, make_generator_optimizer(generator, cfg), nn.Linear(LATENT_DIM, NUM_CLASSES),
                    stacked, counts, cfg, 0, torch.Generator().manual_seed(0))


def sampled(stacked: StackedPredictors, counts: np.ndarray, cfg: AlgorithmConfig, m: int) -> None:
    """The teacher term from m clients drawn per generated sample (`generator_teacher_clients: m`)."""
    batched(stacked, counts, msgspec.structs.replace(cfg, generator_teacher_clients=m))


def vmapped(stacked: StackedPredictors, counts: np.ndarray, cfg: AlgorithmConfig) -> None:
    """The same weights behind an nn.Sequential: train_generator's generic path (torch.func.vmap)."""
    generator = make_generator(NUM_CLASSES, LATENT_DIM, cfg, seed=1)
    renamed = StackedPredictors({f"0.{k}": v for k, v in stacked.params.items()})
    train_generator(generator, make_generator_optimizer(generator, cfg),
                    nn.Sequential(nn.Linear(LATENT_DIM, NUM_CLASSES)), renamed, counts, cfg, 0,
                    torch.Generator().manual_seed(0))


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100,1000,10000")
    parser.add_argument("--loop-up-to", type=int, default=1000, help="time the loop only up to this many clients")
    parser.add_argument("--sample", type=int, default=64, help="M clients drawn per sample in the sampled column")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generator_scale.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = AlgorithmConfig(algorithm="fedgen")
    rows = []
    warm_states, warm_counts = client_states(10, seed=0)
    batched(StackedPredictors(stack_predictors(warm_states)), warm_counts, cfg)  # torch's lazy set-up, untimed
    for k in (int(x) for x in args.clients.split(",")):
        states, counts = client_states(k, seed=k)
        stacked = StackedPredictors(stack_predictors(states))
        fast = median_seconds(functools.partial(batched, stacked, counts, cfg), args.repeats)
        vmap = median_seconds(functools.partial(vmapped, stacked, counts, cfg), args.repeats)
        slow = median_seconds(functools.partial(looped, states, counts, cfg), args.repeats) \
            if k <= args.loop_up_to else None
        drawn = median_seconds(functools.partial(sampled, stacked, counts, cfg, args.sample), args.repeats)
        rows.append((k, fast, vmap, slow, drawn))
        print(f"{k:>6} clients: matmul {fast:.3f} s, vmap {vmap:.3f} s, M = {args.sample} drawn {drawn:.3f} s"
              + (f", loop {slow:.3f} s ({slow / fast:.1f}x)" if slow else ""), flush=True)
    base = rows[0][1]
    at_100 = next((r for r in rows if r[0] == 100), rows[0])
    lines = ["# FedGen generator training against the clients in a round", "",
             f"`python bench/generator_scale.py --clients {args.clients} --sample {args.sample} "
             f"--repeats {args.repeats}` on "
             f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}, 1 thread; "
             f"{cfg.generator_steps} Adam steps of batch {cfg.generator_batch_size}, the reference CNN's predictor "
             f"({LATENT_DIM} -> {NUM_CLASSES}). Median of {args.repeats} runs, loop and batched side by side in one "
             "run (a shared, noisy machine: compare the ratios); the predictors are stacked before the clock "
             "starts, as the round accumulator hands them over.", "",
             "| clients | one matrix product (s) | vs the smallest round | vmap (s) | vmap / matmul "
             f"| loop over clients (s) | loop / matmul | M = {args.sample} drawn clients (s) "
             f"| drawn vs {at_100[0]:,} clients, exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, fast, vmap, slow, drawn in rows:
        lines.append(f"| {k:,} | {fast:.3f} | {fast / base:.1f}x | {vmap:.3f} | {vmap / fast:.1f}x | "
                     f"{'' if slow is None else f'{slow:.3f}'} | {'' if slow is None else f'{slow / fast:.1f}x'} | "
                     f"{drawn:.3f} | {drawn / at_100[1]:.2f}x |")
    lines += ["", f"The drawn column is the unbiased estimate (`generator_teacher_clients: {args.sample}`, "
              "docs/algorithm.md); where a round has no more clients than M it is the exact term. Accuracy with "
              "it: bench/results/teacher_sampling.md."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
