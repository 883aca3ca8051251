"""The device's training runtime, behind one seam: build the model for a job, evaluate it, and run one local
update (`shared.algorithm.local.local_update` semantics) on numpy state dicts.

States cross this seam as numpy arrays keyed by state-dict name, so that the model cache, the device state and
the upload format do not depend on the runtime. `TorchRuntime` runs the shared algorithm code with PyTorch;
a runtime without torch plugs in here too. `make_runtime("auto")` picks torch when it is installed.

The torch runtime trains on a `device`: "auto" (the default) is CUDA when `torch.cuda.is_available()` (a
Jetson with NVIDIA's torch wheel), else the CPU. On CUDA, `_on_device_mode` runs the same shared algorithm code
(`shared.algorithm.local`, which makes its input tensors with `torch.from_numpy`, on the CPU) by moving an op's
CPU tensor arguments to the device whenever another of its arguments is already there.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shared.algorithm.config import AlgorithmConfig
from shared.algorithm.schedule import LatentSampler
from shared.data.partition import UserData

RUNTIMES = ("auto", "torch", "lite")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Trained:
    state: dict[str, np.ndarray]  # the whole trained state (theta^f stays on the device in partial mode)
    upload: dict[str, np.ndarray]  # the shared entries, what is sent
    num_samples: int
    label_counts: list[int]
    train_loss: float


@dataclass
class Evaluated:
    correct: int
    count: int
    loss_sum: float


class Runtime(Protocol):
    name: str
    version: str  # of the framework behind it, for the device's presence

    def prepare(self, cfg: AlgorithmConfig, image_shape: tuple[int, int, int], num_classes: int) -> None:
        """Build the job's model; ValueError when this runtime cannot run it."""

    def template(self) -> dict[str, np.ndarray]:
        """Every state-dict entry of the model (initial values): names, shapes and dtypes."""

    def shared_keys(self, partial: bool) -> list[str]:
        """The entries that travel: every floating-point entry, or theta^p only in partial mode."""

    def evaluate(self, state: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluated: ...

    def load_generator(self, blob: bytes, cfg: AlgorithmConfig, latent_dim: int, num_classes: int,
                       max_bytes: int) -> LatentSampler:
        """The job's FedGen generator from its published ONNX file; ValidationError when it is refused."""

    def train(self, start: Mapping[str, np.ndarray], data: UserData, round_idx: int, seed: int,
              sampler: LatentSampler | None, prior: np.ndarray | None) -> Trained: ...


class TorchRuntime:
    """The shared algorithm code (`shared.algorithm`) on PyTorch."""

    name = "torch"

    def __init__(self, threads: int = 1, device: str = "auto"):
        import torch

        torch.set_num_threads(max(1, threads))
        self.torch = torch
        self.version = torch.__version__
        self.device = resolve_device(device)
        self.cfg: AlgorithmConfig | None = None
        self.model = None

    def prepare(self, cfg: AlgorithmConfig, image_shape: tuple[int, int, int], num_classes: int) -> None:
        from shared.algorithm.models import build_model

        self.cfg = cfg
        self.model = build_model(cfg.model, image_shape, num_classes)

    def template(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def shared_keys(self, partial: bool) -> list[str]:
        from shared.algorithm.models import shared_keys

        return shared_keys(self.model.state_dict(), partial)

    def evaluate(self, state: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Evaluated:
        from shared.algorithm.local import evaluate

        with self._on_device():
            result = evaluate(self.model, self._tensors(state), x, y)
        return Evaluated(result.correct, result.count, result.loss_sum)

    def load_generator(self, blob: bytes, cfg: AlgorithmConfig, latent_dim: int, num_classes: int,
                       max_bytes: int) -> LatentSampler:
        """Through onnxruntime, after the graph passed the job's budget (`shared.protocol.onnx_load`)."""
        from shared.protocol.onnx_load import OnnxGenerator, generator_budget

        budget = generator_budget(cfg.noise_dim, num_classes, cfg.generator_hidden, latent_dim)
        return OnnxGenerator(blob, noise_dim=cfg.noise_dim, latent_dim=latent_dim, num_classes=num_classes,
                             max_bytes=max_bytes, budget=budget)

    def train(self, start: Mapping[str, np.ndarray], data: UserData, round_idx: int, seed: int,
              sampler: LatentSampler | None, prior: np.ndarray | None) -> Trained:
        from shared.algorithm.local import local_update

        with self._on_device():
            result = local_update(self.model, self._tensors(start), data.train_x, data.train_y, self.cfg,
                                  round_idx, seed, sampler, prior)
        return Trained({k: v.cpu().numpy() for k, v in result.state.items()},
                       {k: v.cpu().numpy() for k, v in result.upload.items()}, result.num_samples,
                       [int(c) for c in result.label_counts], result.train_loss)

    def _tensors(self, state: Mapping[str, np.ndarray]) -> dict:
        return {k: self.torch.from_numpy(np.array(v, copy=True)).to(self.device) for k, v in state.items()}

    def _on_device(self):
        if self.device == "cpu":
            return contextlib.nullcontext()
        self.model.to(self.device)
        return _on_device_mode(self.torch, self.device)


def resolve_device(name: str = "auto") -> str:
    """"cpu" or "cuda" for --device `name`; "auto": cuda when torch sees a CUDA device. ValueError otherwise."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
    return name


def _on_device_mode(torch, device: str):
    """A torch function mode that moves an op's CPU tensor arguments (not 0-dim scalars) to `device` when another
    of its tensor arguments is already there; ops on CPU tensors alone (indexing, .numpy()) stay on the CPU."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves, tree_map

    target = torch.device(device).type

    def movable(a) -> bool:
        return isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0

    class OnDevice(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            leaves = tree_leaves((args, kwargs))
            if any(movable(a) for a in leaves) and \
                    any(isinstance(a, torch.Tensor) and a.device.type == target for a in leaves):
                args, kwargs = tree_map(lambda a: a.to(device) if movable(a) else a, (args, kwargs))
            return func(*args, **kwargs)

    return OnDevice()


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def make_runtime(name: str = "auto", threads: int = 1, device: str = "auto") -> Runtime:
    """The runtime called `name`; "auto": torch when it is installed. `device` (torch only): auto, cpu or cuda.
    ValueError when it cannot be had."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; known: {', '.join(DEVICES)}")
    if name == "auto":
        name = "torch" if torch_available() else "lite"
    if name == "torch":
        if not torch_available():
            raise ValueError("--runtime torch needs PyTorch: pip install '.[edge]'")
        return TorchRuntime(threads, device)
    if name == "lite":
        if device == "cuda":
            raise ValueError("--device cuda needs the torch runtime (the lite runtime computes on the CPU)")
        from edge_client.lite.runtime import LiteRuntime

        return LiteRuntime(threads)
    raise ValueError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)}")
