"""Hyper-parameters of the three algorithms, with the reference code's defaults and their allowed ranges,
the names of the algorithms, models and aggregation rules, and seed derivation.

This module imports neither torch nor any transport: the REST schema and the CLIs import the lists from here.
`AlgorithmConfig` is a msgspec Struct so that the manifest decodes straight into it on the device; its bounds
are the ranges a job may ask for (docs/api.md lists them).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal, get_args

import msgspec

AlgorithmName = Literal["fedavg", "fedprox", "fedgen"]
ModelName = Literal["cnn", "cnn-small", "cnn-wide", "mlp"]
AggregationName = Literal["mean", "median", "trimmed_mean"]
ALGORITHMS: tuple[str, ...] = get_args(AlgorithmName)
MODELS: tuple[str, ...] = get_args(ModelName)
DEFAULT_MODEL = "cnn"
COEFFICIENT_DECAY, PARTIAL_COEFFICIENT_DECAY = 0.98, 0.99  # per-round decay of alpha_t, beta_t (Eq. 5)
AGGREGATIONS: tuple[str, ...] = get_args(AggregationName)


def _int(low: int, high: int) -> Any:
    return Annotated[int, msgspec.Meta(ge=low, le=high)]


def _float(low: float, high: float, *, open_low: bool = False) -> Any:
    return Annotated[float, msgspec.Meta(gt=low, le=high) if open_low else msgspec.Meta(ge=low, le=high)]


Rate = _float(0.0, 10.0, open_low=True)  # a learning rate: > 0
Decay = _float(0.0, 1.0, open_low=True)  # a per-round multiplier in (0, 1]
Weight = _float(0.0, 1e4)  # a loss weight >= 0
BatchSize = _int(1, 4096)


class AlgorithmConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything that decides what a round computes. docs/algorithm.md explains each choice."""

    algorithm: AlgorithmName = "fedgen"
    partial: bool = False  # share only theta^p; theta^f stays on the device
    model: ModelName = "cnn"  # the devices' default model (with `models`: their first, unless this names another)
    # heterogeneous devices (partial sharing only): every model a device may choose; they share one latent
    # space, theta^p and the generator. Unset: every device runs `model` (and the manifest is as before).
    models: tuple[ModelName, ...] | msgspec.UnsetType = msgspec.UNSET
    # client, all algorithms
    local_steps: _int(1, 10_000) = 20  # T mini-batch steps per round (not epochs)
    batch_size: BatchSize = 32  # B
    learning_rate: Rate = 0.01  # plain SGD, no momentum
    lr_decay: Decay = 0.99  # learning rate x lr_decay ** round
    prox_mu: _float(0.0, 1e3) = 0.01  # FedProx proximal weight, chosen on validation (bench/results/selection.md)
    # client, FedGen (Eq. 5)
    gen_batch_size: BatchSize = 32  # generated samples per local step
    generative_alpha: Weight = 10.0  # weight of CE(h(G(y_hat)), y_hat), x coefficient_decay ** round
    generative_beta: Weight = 10.0  # weight of KL(softmax(h(G(y))) || f(x)), x coefficient_decay ** round
    # None: 0.98 (the reference's), with partial sharing 0.99: chosen on validation (bench/results/selection.md);
    # filled in when the config is made, so stored configs and manifests carry the value
    coefficient_decay: Decay | None = None
    coefficient_floor: Weight = 1e-4
    # server, FedGen (Eq. 4)
    generator_steps: _int(1, 10_000) = 50  # Adam steps per round
    generator_batch_size: BatchSize = 32
    generator_lr: Rate = 3e-4  # x generator_lr_decay ** round
    generator_lr_decay: Decay = 0.98
    generator_weight_decay: _float(0.0, 10.0) = 1e-2
    diversity_weight: Weight = 1.0
    # teacher weights w[k, y] from the label counts as reported, or from each client's label proportions (the
    # reference's; always in the robust modes); label_smoothing is added to every count first (the reference: 1)
    label_weighting: Literal["counts", "proportions"] = "counts"
    label_smoothing: _float(0.0, 1e6) = 0.0
    noise_dim: _int(1, 1024) = 32
    generator_hidden: _int(1, 4096) = 256
    # rounds of many clients: the teacher term from M clients per generated sample, drawn with probability
    # w[k, y] (an unbiased estimate; seeded) instead of all K, so a step costs O(M), not O(K). Unset, or M >= K:
    # every client, exact (docs/algorithm.md, "Teacher term from a sample of clients")
    generator_teacher_clients: _int(1, 1024) | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        if self.coefficient_decay is None:
            msgspec.structs.force_setattr(self, "coefficient_decay", PARTIAL_COEFFICIENT_DECAY if self.partial
                                          else COEFFICIENT_DECAY)
        if self.models is msgspec.UNSET:
            return
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"models must list distinct model names, got {list(self.models)}")
        if self.model not in self.models and self.model != DEFAULT_MODEL:
            raise ValueError(f"model {self.model!r} is not one of models {list(self.models)}")
        if self.model == DEFAULT_MODEL:  # model not named (or named as the default): the first of models
            msgspec.structs.force_setattr(self, "model", self.models[0])
        if len(self.models) > 1 and not self.partial:
            raise ValueError("devices with different models share only theta^p: a job with several models "
                             "needs partial = true")

    @property
    def allowed_models(self) -> tuple[str, ...]:
        """The models a device of this job may run (`model` first)."""
        if self.models is msgspec.UNSET:
            return (self.model,)
        return (self.model, *(m for m in self.models if m != self.model))

    @property
    def uses_generator(self) -> bool:
        return self.algorithm == "fedgen"

    def client_lr(self, round_idx: int) -> float:
        return self.learning_rate * self.lr_decay**round_idx

    def generative_weights(self, round_idx: int) -> tuple[float, float]:
        """(alpha_t, beta_t) of Eq. 5; zero in round 0, when no generator has been trained yet."""
        if round_idx == 0:
            return 0.0, 0.0
        decay = self.coefficient_decay**round_idx
        return (max(self.coefficient_floor, self.generative_alpha * decay),
                max(self.coefficient_floor, self.generative_beta * decay))

    def generator_lr_at(self, round_idx: int) -> float:
        return self.generator_lr * self.generator_lr_decay**round_idx

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlgorithmConfig:
        """Settings checked against their types and ranges (missing ones take the defaults); ValueError names
        the offending setting."""
        try:
            return msgspec.convert(data, cls, strict=True)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid algorithm settings: {exc}") from None


def derive_seed(*keys: object) -> int:
    """A 63-bit seed from a tuple of keys (run seed, purpose, round, client...), stable across processes."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
