"""A job's algorithm state on the server: settings, the global state, its persisted form and its artifacts.

The server state of a version (global model, generator, the generator's Adam state and RNG, the label prior)
is saved as one safetensors blob, so a restarted server continues bit-for-bit where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_tensors

from server_api.metrics import GENERATOR_SECONDS
from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.federation import GlobalState, RoundAccumulator
from shared.algorithm.local import EvalResult, evaluate
from shared.data.datasets import dataset_info, load_dataset
from shared.data.partition import partition
from shared.protocol.delta import make_delta
from shared.protocol.job import JobConfig
from shared.protocol.onnx_export import export_classifier_onnx, export_generator_onnx, export_predictor_onnx
from shared.protocol.tensors import encode_tensors, state_sha256, tensor_spec


@dataclass
class VersionArtifacts:
    """The blobs of one model version (sha256 is computed by the store)."""

    state_sha256: str
    model_onnx: bytes
    predictor_onnx: bytes
    server_state: bytes
    generator_onnx: bytes | None = None
    delta: bytes | None = None


class JobRuntime:
    """GlobalState plus what the server needs around it: version number, evaluation, persistence, export."""

    def __init__(self, config: JobConfig, data_dir: str | None = None):
        self.config = config
        self.data_dir = data_dir
        info = dataset_info(config.dataset)
        self.info = info
        self.global_state = GlobalState(config.algorithm, info.image_shape, info.num_classes, config.seed)
        self.version = 0
        self._eval_data: tuple[np.ndarray, np.ndarray] | None = None
        self._other_models_onnx: dict[str, bytes] | None = None

    @property
    def cfg(self) -> AlgorithmConfig:
        return self.config.algorithm

    def upload_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Names, shapes and dtypes an update must carry: the shared entries, nothing else."""
        return tensor_spec(self.global_state.shared_state())

    def new_accumulator(self) -> RoundAccumulator:
        return RoundAccumulator(mode=self.config.aggregation, trim_ratio=self.config.trim_ratio)

    # ------------------------------------------------------------------------------------------ rounds
    def close_round(self, acc: RoundAccumulator, round_idx: int) -> tuple[VersionArtifacts, dict]:
        """Aggregate, train the generator, advance the version; returns its artifacts and round metrics."""
        old = {k: v.clone() for k, v in self.global_state.shared_state().items()}
        started = time.perf_counter()
        stats = self.global_state.close_round(acc, round_idx)
        if stats is not None:
            GENERATOR_SECONDS.labels(self.config.id).observe(time.perf_counter() - started)
        delta, canonical = make_delta(old, self.global_state.shared_state())
        # old + delta exactly, what a device computes
        self.global_state.state.update({k: torch.from_numpy(v) for k, v in canonical.items()})
        self.version += 1
        metrics: dict[str, float | None] = {"generator_loss": stats.teacher_loss if stats else None}
        metrics.update(self.server_evaluation())
        return self.build_artifacts(delta), metrics

    def server_evaluation(self) -> dict[str, float | None]:
        """Accuracy of the global model on the pooled test splits of the job's `server_eval` partition
        (full sharing only: in partial mode the model lives partly on the devices)."""
        spec = self.config.server_eval
        if spec is None or self.cfg.partial:
            return {"accuracy": None, "loss": None}
        if self._eval_data is None:
            users = partition(load_dataset(spec.dataset or self.config.dataset, self.data_dir), spec)
            self._eval_data = (np.concatenate([u.test_x for u in users]), np.concatenate([u.test_y for u in users]))
        result: EvalResult = evaluate(self.global_state.model, self.global_state.state, *self._eval_data)
        return {"accuracy": result.accuracy, "loss": result.loss_sum / max(1, result.count)}

    # ------------------------------------------------------------------------------------------ artifacts
    def build_artifacts(self, delta: dict[str, np.ndarray] | None) -> VersionArtifacts:
        gs = self.global_state
        generator_onnx = None
        if gs.generator is not None and gs.generator_trained:
            generator_onnx = export_generator_onnx(gs.generator)
        return VersionArtifacts(
            state_sha256=state_sha256(gs.shared_state()),
            model_onnx=export_classifier_onnx(gs.model, gs.state, image_shape=self.info.image_shape),
            predictor_onnx=export_predictor_onnx(gs.model, gs.state),
            server_state=self.server_state(),
            generator_onnx=generator_onnx,
            delta=encode_tensors(delta) if delta is not None else None,
        )

    def other_models_onnx(self) -> dict[str, bytes]:
        """A job with several models: every model but the default one as ONNX, its initial theta^f with the
        initial theta^p. The same bytes for the whole job (and after a restart: both are drawn from the job's
        seed), so they are published once and stay."""
        if self._other_models_onnx is None:
            gs = self.global_state
            self._other_models_onnx = {
                name: export_classifier_onnx(gs.models[name], {**gs.initial_features[name], **gs.initial_predictor},
                                             image_shape=self.info.image_shape)
                for name in self.cfg.allowed_models if name != self.cfg.model}
        return self._other_models_onnx

    # ------------------------------------------------------------------------------------------ persistence
    def server_state(self) -> bytes:
        """Everything needed to resume: model state, generator (+ Adam state, RNG), label prior, version."""
        gs = self.global_state
        tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in gs.state.items()}
        tensors["prior/counts"] = torch.as_tensor(gs.prior.counts, dtype=torch.int64)
        tensors["meta/version"] = torch.tensor([self.version], dtype=torch.int64)
        tensors["meta/generator_trained"] = torch.tensor([int(gs.generator_trained)], dtype=torch.int64)
        tensors["rng/generator_train"] = gs.generator_rng.get_state()
        if gs.generator is not None:
            tensors.update({f"generator/{k}": v for k, v in gs.generator.state_dict().items()})
            for idx, slot in gs.generator_optimizer.state_dict()["state"].items():
                for name, value in slot.items():
                    tensors[f"adam/{idx}/{name}"] = torch.as_tensor(value)
        return encode_tensors(tensors)

    def restore(self, blob: bytes) -> None:
        """Load a blob written by server_state() (our own, read back from the hash-checked store)."""
        tensors = load_tensors(blob)
        gs = self.global_state
        model = {k[len("model/"):]: v.clone() for k, v in tensors.items() if k.startswith("model/")}
        if tensor_spec(model) != tensor_spec(gs.state):
            raise ValueError("stored server state does not match this job's model")
        gs.state = model
        gs.prior.counts = tensors["prior/counts"].numpy().astype(np.int64).copy()
        self.version = int(tensors["meta/version"][0])
        gs.generator_trained = bool(tensors["meta/generator_trained"][0])
        gs.generator_rng.set_state(tensors["rng/generator_train"].clone())
        if gs.generator is not None:
            gs.generator.load_state_dict({k[len("generator/"):]: v for k, v in tensors.items()
                                          if k.startswith("generator/")})
            gs.generator.eval()
            opt_state = gs.generator_optimizer.state_dict()
            slots: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in tensors.items():
                if key.startswith("adam/"):
                    _, idx, name = key.split("/")
                    slots.setdefault(int(idx), {})[name] = value.clone()
            opt_state["state"] = slots
            gs.generator_optimizer.load_state_dict(opt_state)
