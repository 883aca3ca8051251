"""The shipped classifiers (`shared.algorithm.models`: ``cnn``, ``cnn-small``, ``cnn-wide``, ``mlp``) as numpy
layer lists.

A `LiteModel` holds only the architecture; weights live in a state dict keyed exactly as torch's
``state_dict()`` (``features.0.weight``, ``features.1.running_mean``, ``features.1.num_batches_tracked``,
``predictor.weight``, ...), with torch's shapes and dtypes (float32, and int64 0-d counters). A state that
does not match the architecture entry for entry is refused with ValueError, never adapted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_client.lite import layers as L

LATENT_DIM = 32  # shared.algorithm.models.LATENT_DIM (not imported: that module needs torch)
MLP_HIDDEN = 200
CNN_CHANNELS = {"cnn": (6, 16), "cnn-small": (4, 8), "cnn-wide": (16, 32)}  # shared.algorithm.models's
LITE_MODELS = (*CNN_CHANNELS, "mlp")
PREDICTOR = "predictor"
Entries = dict[str, tuple[tuple[int, ...], np.dtype]]
State = dict[str, np.ndarray]
F32, I64 = np.dtype(np.float32), np.dtype(np.int64)


def _uniform_init(entries: Entries, rng: np.random.Generator) -> State:
    """torch's default for a Linear / Conv2d (weight, bias): kaiming-uniform with a = sqrt(5), i.e. uniform in
    +-1/sqrt(fan_in), and the bias likewise."""
    (weight, (shape, _)), (bias, (bias_shape, _)) = entries.items()
    bound = 1 / np.sqrt(np.prod(shape[1:]))
    return {weight: rng.uniform(-bound, bound, shape).astype(F32),
            bias: rng.uniform(-bound, bound, bias_shape).astype(F32)}


@dataclass(frozen=True)
class Linear:
    name: str
    fan_in: int
    fan_out: int

    def entries(self) -> Entries:
        return {f"{self.name}.weight": ((self.fan_out, self.fan_in), F32), f"{self.name}.bias": ((self.fan_out,), F32)}

    def init(self, rng: np.random.Generator) -> State:
        return _uniform_init(self.entries(), rng)

    def forward(self, s: State, x: np.ndarray, train: bool) -> tuple[np.ndarray, Any]:
        return L.linear(x, s[f"{self.name}.weight"], s[f"{self.name}.bias"]), x

    def backward(self, s: State, x: Any, dy: np.ndarray, need_dx: bool) -> tuple[np.ndarray | None, State]:
        dx, dw, db = L.linear_backward(dy, x, s[f"{self.name}.weight"], need_dx)
        return dx, {f"{self.name}.weight": dw, f"{self.name}.bias": db}


@dataclass(frozen=True)
class Conv2d:
    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int

    def entries(self) -> Entries:
        shape = (self.out_channels, self.in_channels, self.kernel, self.kernel)
        return {f"{self.name}.weight": (shape, F32), f"{self.name}.bias": ((self.out_channels,), F32)}

    def init(self, rng: np.random.Generator) -> State:
        return _uniform_init(self.entries(), rng)

    def forward(self, s: State, x: np.ndarray, train: bool) -> tuple[np.ndarray, Any]:
        return L.conv2d(x, s[f"{self.name}.weight"], s[f"{self.name}.bias"], self.stride, self.padding)

    def backward(self, s: State, cache: Any, dy: np.ndarray, need_dx: bool) -> tuple[np.ndarray | None, State]:
        dx, dw, db = L.conv2d_backward(dy, cache, s[f"{self.name}.weight"], need_dx)
        return dx, {f"{self.name}.weight": dw, f"{self.name}.bias": db}


@dataclass(frozen=True)
class BatchNorm2d:
    """Training mode replaces the running statistics in the state and counts the batch, as torch does."""

    name: str
    channels: int

    def entries(self) -> Entries:
        c, n = (self.channels,), self.name
        return {f"{n}.weight": (c, F32), f"{n}.bias": (c, F32), f"{n}.running_mean": (c, F32),
                f"{n}.running_var": (c, F32), f"{n}.num_batches_tracked": ((), I64)}

    def init(self, rng: np.random.Generator) -> State:
        c, n = self.channels, self.name
        ones, zeros = np.ones(c, F32), np.zeros(c, F32)
        return {f"{n}.weight": ones, f"{n}.bias": zeros, f"{n}.running_mean": zeros.copy(),
                f"{n}.running_var": ones.copy(), f"{n}.num_batches_tracked": np.zeros((), I64)}

    def forward(self, s: State, x: np.ndarray, train: bool) -> tuple[np.ndarray, Any]:
        n = self.name
        args = (x, s[f"{n}.weight"], s[f"{n}.bias"], s[f"{n}.running_mean"], s[f"{n}.running_var"])
        if not train:
            return L.batch_norm_eval(*args), None
        y, cache, s[f"{n}.running_mean"], s[f"{n}.running_var"] = L.batch_norm_train(*args)
        s[f"{n}.num_batches_tracked"] = s[f"{n}.num_batches_tracked"] + 1
        return y, cache

    def backward(self, s: State, cache: Any, dy: np.ndarray, need_dx: bool) -> tuple[np.ndarray | None, State]:
        dx, dw, db = L.batch_norm_backward(dy, cache, s[f"{self.name}.weight"])
        return dx, {f"{self.name}.weight": dw, f"{self.name}.bias": db}


@dataclass(frozen=True)
class ReLU:
    def entries(self) -> Entries:
        return {}

    def init(self, rng: np.random.Generator) -> State:
        return {}

    def forward(self, s: State, x: np.ndarray, train: bool) -> tuple[np.ndarray, Any]:
        y = L.relu(x)
        return y, y

    def backward(self, s: State, y: Any, dy: np.ndarray, need_dx: bool) -> tuple[np.ndarray | None, State]:
        return L.relu_backward(dy, y), {}


@dataclass(frozen=True)
class Flatten:
    def entries(self) -> Entries:
        return {}

    def init(self, rng: np.random.Generator) -> State:
        return {}

    def forward(self, s: State, x: np.ndarray, train: bool) -> tuple[np.ndarray, Any]:
        return x.reshape(len(x), -1), x.shape

    def backward(self, s: State, shape: Any, dy: np.ndarray, need_dx: bool) -> tuple[np.ndarray | None, State]:
        return dy.reshape(shape), {}


Layer = Linear | Conv2d | BatchNorm2d | ReLU | Flatten


@dataclass(frozen=True)
class LiteModel:
    """features (theta^f, a layer list: x [N, C, H, W] -> z [N, latent]) then predictor (theta^p, Linear)."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    features: tuple[Layer, ...]
    predictor: Linear

    @property
    def latent_dim(self) -> int:
        return self.predictor.fan_in

    def entries(self) -> Entries:
        """Every state-dict entry, in torch's order: name -> (shape, dtype)."""
        out: Entries = {}
        for layer in (*self.features, self.predictor):
            out.update(layer.entries())
        return out

    def parameter_names(self) -> list[str]:
        """The trainable entries (torch's named_parameters): weights and biases, not the BatchNorm buffers."""
        return [k for k in self.entries() if k.endswith((".weight", ".bias"))]

    def shared_keys(self, partial: bool) -> list[str]:
        """Every floating-point entry, or only theta^p (``predictor.*``) in partial mode."""
        return [k for k, (_, dtype) in self.entries().items()
                if dtype == F32 and (not partial or k.startswith(PREDICTOR + "."))]

    def template(self, seed: int = 0) -> State:
        """A state in torch's default initialisation (Linear / Conv2d weights and biases uniform in
        +-1/sqrt(fan_in); BatchNorm weight 1, bias 0, running mean 0, variance 1, counter 0), drawn from a numpy
        generator seeded with `seed`."""
        rng, state = np.random.default_rng(seed), {}
        for layer in (*self.features, self.predictor):
            state.update(layer.init(rng))
        return state

    def load(self, state: Mapping[str, Any]) -> State:
        """A private copy of `state` checked entry for entry (names, shapes, numeric kinds), cast to float32 /
        int64; ValueError naming the first mismatch."""
        expected = self.entries()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or extra:
            raise ValueError(f"state does not fit the lite {self.name}: missing {missing}, unexpected {extra}")
        out: State = {}
        for name, (shape, dtype) in expected.items():
            value = np.asarray(state[name])
            if value.shape != shape:
                raise ValueError(f"{name} has shape {value.shape}, the lite {self.name} needs {shape}")
            kind_ok = value.dtype.kind == "f" if dtype == F32 else value.dtype.kind in "iu"
            if not kind_ok:
                raise ValueError(f"{name} has dtype {value.dtype}, the lite {self.name} needs {dtype}")
            out[name] = np.array(value, dtype=dtype, copy=True)
        return out

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """x as float32 [N, C, H, W] of the model's image shape; ValueError otherwise."""
        x = np.asarray(x)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"input of shape {x.shape}; the lite {self.name} takes [N, {self.image_shape}]")
        return np.ascontiguousarray(x, dtype=np.float32)

    def forward(self, state: State, x: np.ndarray, train: bool) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        """(z [N, latent], logits [N, classes], caches for `backward`). Training mode updates the BatchNorm
        entries of `state` in place (dictionary entries are replaced, arrays are never written)."""
        caches = []
        for layer in self.features:
            x, cache = layer.forward(state, x, train)
            caches.append(cache)
        logits, _ = self.predictor.forward(state, x, train)
        return x, logits, caches

    def backward(self, state: State, z: np.ndarray, caches: list[Any], dlogits: np.ndarray) -> State:
        """The gradient of every parameter of a loss whose gradient wrt the logits is `dlogits` [N, classes],
        from `forward`'s z and caches (the first layer's input gradient is not computed)."""
        dy, grads = self.predictor.backward(state, z, dlogits, need_dx=True)
        for i in reversed(range(len(self.features))):
            dy, g = self.features[i].backward(state, caches[i], dy, need_dx=i > 0)
            grads.update(g)
        return grads


def build_model(name: str, image_shape: tuple[int, int, int], num_classes: int) -> LiteModel:
    """The lite twin of `shared.algorithm.models.build_model` (`LITE_MODELS`); ValueError for anything else."""
    sizes = (*tuple(image_shape), num_classes)
    if len(sizes) != 4 or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in sizes):
        raise ValueError(f"the lite runtime needs an image shape of 3 positive sizes (C, H, W) and a positive "
                         f"number of classes, got {tuple(image_shape)} and {num_classes}")
    c, h, w, classes = (int(v) for v in sizes)
    predictor = Linear(PREDICTOR, LATENT_DIM, classes)
    if name in CNN_CHANNELS:  # shared.algorithm.models.cnn: two 3x3 convolutions with stride 2 and padding 1

        def out(size: int) -> int:
            return L.conv_output_size(L.conv_output_size(size, 3, 2, 1), 3, 2, 1)

        first, second = CNN_CHANNELS[name]
        features = (Conv2d("features.0", c, first, 3, 2, 1), BatchNorm2d("features.1", first), ReLU(),
                    Conv2d("features.3", first, second, 3, 2, 1), BatchNorm2d("features.4", second), ReLU(),
                    Flatten(), Linear("features.7", second * out(h) * out(w), LATENT_DIM))
    elif name == "mlp":
        features = (Flatten(), Linear("features.1", c * h * w, MLP_HIDDEN), ReLU(),
                    Linear("features.3", MLP_HIDDEN, LATENT_DIM))
    else:
        raise ValueError(f"the lite runtime cannot run model {name!r}; it runs: {', '.join(LITE_MODELS)}")
    return LiteModel(name, (c, h, w), classes, features, predictor)
