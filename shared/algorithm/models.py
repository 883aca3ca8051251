"""Classifiers split into a feature extractor theta^f and a predictor theta^p, and the FedGen generator.

Every classifier has two child modules and nothing else: ``features`` (theta^f, x -> z in the latent space Z)
and ``predictor`` (theta^p, the last linear layer, z -> logits). Parameter names therefore start with
``features.`` or ``predictor.``, which is how partial sharing selects theta^p.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from shared.algorithm.config import MODELS as MODEL_NAMES

PREDICTOR_PREFIX = "predictor."
LATENT_DIM = 32  # one latent space for every model: devices with different models share theta^p and G
CNN_CHANNELS = {"cnn": (6, 16), "cnn-small": (4, 8), "cnn-wide": (16, 32)}  # edge_client.lite.model has a copy


class SplitClassifier(nn.Module):
    """features (theta^f) followed by predictor (theta^p); forward returns logits."""

    def __init__(self, features: nn.Module, latent_dim: int, num_classes: int,
                 image_shape: tuple[int, int, int] | None = None):
        super().__init__()
        self.features = features
        self.predictor = nn.Linear(latent_dim, num_classes)
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.image_shape = image_shape  # (C, H, W) it was built for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.features(x))


def cnn(in_channels: int, image_hw: tuple[int, int], num_classes: int, latent_dim: int = LATENT_DIM,
        channels: tuple[int, int] = (6, 16)) -> SplitClassifier:
    """Two stride-2 3x3 convolutions (padding 1) with BatchNorm and ReLU, then a linear map to the latent space.
    The default channels (6, 16) are the reference code's MNIST CNN (26,434 parameters for 1x28x28 input and
    10 classes); `cnn_small` and `cnn_wide` are the same network narrower and wider."""
    h, w = image_hw
    for _ in range(2):  # two stride-2 convolutions with padding 1
        h, w = (h + 1) // 2, (w + 1) // 2
    first, second = channels
    features = nn.Sequential(
        nn.Conv2d(in_channels, first, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(first),
        nn.ReLU(),
        nn.Conv2d(first, second, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(second),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(second * h * w, latent_dim),
    )
    return SplitClassifier(features, latent_dim, num_classes)


def reference_cnn(in_channels: int, image_hw: tuple[int, int], num_classes: int,
                  latent_dim: int = LATENT_DIM) -> SplitClassifier:
    """The reference code's MNIST CNN: channels 6 and 16."""
    return cnn(in_channels, image_hw, num_classes, latent_dim, CNN_CHANNELS["cnn"])


def cnn_small(in_channels: int, image_hw: tuple[int, int], num_classes: int,
              latent_dim: int = LATENT_DIM) -> SplitClassifier:
    """A smaller device's CNN: channels 4 and 8 (13,266 parameters for MNIST), the same latent space."""
    return cnn(in_channels, image_hw, num_classes, latent_dim, CNN_CHANNELS["cnn-small"])


def cnn_wide(in_channels: int, image_hw: tuple[int, int], num_classes: int,
             latent_dim: int = LATENT_DIM) -> SplitClassifier:
    """A bigger device's CNN: channels 16 and 32 (55,434 parameters for MNIST), the same latent space."""
    return cnn(in_channels, image_hw, num_classes, latent_dim, CNN_CHANNELS["cnn-wide"])


def mlp(in_channels: int, image_hw: tuple[int, int], num_classes: int, latent_dim: int = LATENT_DIM,
        hidden: int = 200) -> SplitClassifier:
    """A two-layer perceptron feature extractor (the paper's MNIST-MLP setting) with the same latent size."""
    features = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_hw[0] * image_hw[1], hidden),
        nn.ReLU(),
        nn.Linear(hidden, latent_dim),
    )
    return SplitClassifier(features, latent_dim, num_classes)


MODELS: dict[str, Callable[..., SplitClassifier]] = {"cnn": reference_cnn, "cnn-small": cnn_small,
                                                    "cnn-wide": cnn_wide, "mlp": mlp}
if set(MODELS) != set(MODEL_NAMES):  # the names are declared once, in shared.algorithm.config
    raise ImportError(f"model builders {sorted(MODELS)} do not match the declared names {sorted(MODEL_NAMES)}")


def build_model(name: str, image_shape: tuple[int, int, int], num_classes: int,
                generator: torch.Generator | None = None) -> SplitClassifier:
    """A classifier by name (`MODELS`) for images of shape (C, H, W); with `generator`, its weights are
    drawn from it (`init_parameters`), so that building a model never depends on the process-wide RNG."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name](image_shape[0], (image_shape[1], image_shape[2]), num_classes)
    model.image_shape = tuple(image_shape)
    if generator is not None:
        init_parameters(model, generator)
    return model


def init_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Re-draw the weights of every Linear / Conv layer exactly as PyTorch's default initialisation does
    (Kaiming-uniform weights with a = sqrt(5), uniform biases in +-1/sqrt(fan_in)), in construction order, from
    `generator`: the same values as building the module after ``torch.manual_seed`` with the generator's seed,
    without touching the process-wide RNG (two jobs starting together cannot race on it)."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                if layer.bias is not None:
                    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(layer.weight)
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


class Generator(nn.Module):
    """G(z | y): concat(noise eps, one-hot y) -> Linear -> BatchNorm1d -> ReLU -> Linear -> z."""

    def __init__(self, num_classes: int, latent_dim: int = LATENT_DIM, noise_dim: int = 32, hidden: int = 256):
        super().__init__()
        self.num_classes = num_classes
        self.noise_dim = noise_dim
        self.latent_dim = latent_dim
        self.net = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, latent_dim),
        )

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        onehot = nn.functional.one_hot(labels, self.num_classes).to(noise.dtype)
        return self.net(torch.cat([noise, onehot], dim=1))


def sample_noise(n: int, noise_dim: int, rng: torch.Generator) -> torch.Tensor:
    """Generator input noise, eps ~ Uniform[0, 1) (the reference's choice; see docs/algorithm.md)."""
    return torch.rand(n, noise_dim, generator=rng)


def is_predictor_key(name: str) -> bool:
    return name.startswith(PREDICTOR_PREFIX)


def shared_keys(state: Mapping[str, torch.Tensor], partial: bool) -> list[str]:
    """The state-dict entries that travel and are aggregated.

    Full sharing: every floating-point entry (parameters and BatchNorm running statistics).
    Partial sharing: only theta^p. Integer buffers (BatchNorm's num_batches_tracked) never travel.
    """
    return [k for k, v in state.items()
            if v.is_floating_point() and (not partial or is_predictor_key(k))]


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(theta^f, theta^p) of a classifier state dict, by parameter name."""
    features = {k: v for k, v in state.items() if not is_predictor_key(k)}
    predictor = {k: v for k, v in state.items() if is_predictor_key(k)}
    return features, predictor


def predictor_params(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta^p with the 'predictor.' prefix removed, ready for torch.func.functional_call on model.predictor."""
    return {k[len(PREDICTOR_PREFIX):]: v for k, v in state.items() if is_predictor_key(k)}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def clone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
