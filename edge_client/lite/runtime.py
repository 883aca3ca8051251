"""`LiteRuntime`: the device's training runtime without torch (numpy only), behind the seam of
`edge_client.runtime.Runtime`. It runs what `TorchRuntime` runs (`shared.algorithm.local` semantics) for the
shipped models; tests/edge/test_lite_parity.py holds it to the torch runtime.

Compute threads: numpy's BLAS reads OMP_NUM_THREADS / OPENBLAS_NUM_THREADS when it is loaded, before this
runtime exists; set them in the environment of the device's process (the arrays here are small, one thread
is the right choice on most devices).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_client.lite.local import evaluate, local_update
from edge_client.lite.model import LiteModel, build_model
from edge_client.runtime import Evaluated, Trained
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.schedule import LatentSampler
from shared.data.partition import UserData
from shared.protocol.onnx_load import WeightsGenerator


class LiteRuntime:
    """The shared algorithm's local update and evaluation in vectorised numpy (edge_client.lite)."""

    name = "lite"

    def __init__(self, threads: int = 1, eval_batch_size: int = 256):
        self.version = np.__version__
        self.threads = threads  # informational: see the module docstring
        self.eval_batch_size = eval_batch_size
        self.cfg: AlgorithmConfig | None = None
        self.model: LiteModel | None = None

    def prepare(self, cfg: AlgorithmConfig, image_shape: tuple[int, int, int], num_classes: int) -> None:
        """Build the job's model; ValueError when it is not one the lite runtime runs."""
        self.model = build_model(cfg.model, tuple(image_shape), num_classes)
        self.cfg = cfg

    def template(self) -> dict[str, np.ndarray]:
        return self._model().template()

    def shared_keys(self, partial: bool) -> list[str]:
        return self._model().shared_keys(partial)

    def evaluate(self, state: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluated:
        correct, count, loss_sum = evaluate(self._model(), state, x, y, self.eval_batch_size)
        return Evaluated(correct, count, loss_sum)

    def load_generator(self, blob: bytes, cfg: AlgorithmConfig, latent_dim: int, num_classes: int,
                       max_bytes: int) -> LatentSampler:
        """Evaluated in numpy from the file's weights (`WeightsGenerator`): no onnxruntime on the device."""
        return WeightsGenerator(blob, noise_dim=cfg.noise_dim, latent_dim=latent_dim, num_classes=num_classes,
                                hidden=cfg.generator_hidden, max_bytes=max_bytes)

    def train(self, start: Mapping[str, np.ndarray], data: UserData, round_idx: int, seed: int,
              sampler: LatentSampler | None, prior: np.ndarray | None) -> Trained:
        result = local_update(self._model(), start, data.train_x, data.train_y, self.cfg, round_idx, seed, sampler,
                              prior)
        return Trained(result.state, result.upload, result.num_samples, [int(c) for c in result.label_counts],
                       result.train_loss)

    def _model(self) -> LiteModel:
        if self.model is None:
            raise RuntimeError("LiteRuntime.prepare was not called")
        return self.model
