"""Run inside the arm64 root with the torch venv (bench/arm64/test-arm64.sh): one local update by the lite and
by the torch runtime from the same start, on the same batches (tests/edge/test_lite_parity.py holds them within
5e-6 on x86), then a larger matrix product in torch on one thread and on two. Prints one JSON line after each
part, so that a crash in a later one (an illegal instruction, say) leaves the earlier ones."""

from __future__ import annotations

import json
import sys

import numpy as np

from edge_client.runtime import make_runtime
from shared.algorithm.config import AlgorithmConfig
from shared.data.datasets import load_dataset
from shared.data.partition import PartitionSpec, partition

users = partition(load_dataset("mnist-subset"), PartitionSpec(users=10, alpha=0.1, samples_per_class=200))
cfg = AlgorithmConfig(algorithm="fedavg")
trained = {}
for name in ("lite", "torch"):
    runtime = make_runtime(name)
    runtime.prepare(cfg, (1, 28, 28), 10)
    if name == "lite":
        start = runtime.template()
    trained[name] = runtime.train(start, users[0], 0, 1, None, None)
diffs = {k: float(np.abs(trained["lite"].state[k] - trained["torch"].state[k]).max())
         for k in trained["lite"].state if trained["lite"].state[k].dtype.kind == "f"}
worst = max(diffs, key=diffs.get)
print(json.dumps({"part": "update", "lite_loss": trained["lite"].train_loss, "torch_loss": trained["torch"].train_loss,
                  "max_state_diff": diffs[worst], "worst_entry": worst}), flush=True)

import torch  # noqa: E402

torch.manual_seed(0)
a, b = torch.randn(64, 300), torch.randn(300, 50)
for threads in (1, 2):  # the edge client's default (--threads 1), then two threads
    torch.set_num_threads(threads)
    err = float(((a @ b).double() - a.double() @ b.double()).abs().max())
    print(json.dumps({"part": f"gemm{threads}", "shape": "64x300 @ 300x50", "max_err": err}), flush=True)
sys.exit(0)
