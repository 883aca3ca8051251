"""Hyper-parameters of the three algorithms, with the reference code's defaults, and seed derivation."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

ALGORITHMS = ("fedavg", "fedprox", "fedgen")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Everything that decides what a round computes. docs/algorithm.md explains each choice."""

    algorithm: str = "fedgen"
    partial: bool = False  # share only theta^p; theta^f stays on the device
    model: str = "cnn"
    # client, all algorithms
    local_steps: int = 20  # T mini-batch steps per round (not epochs)
    batch_size: int = 32  # B
    learning_rate: float = 0.01  # plain SGD, no momentum
    lr_decay: float = 0.99  # learning rate x lr_decay ** round
    prox_mu: float = 0.01  # FedProx proximal weight
    # client, FedGen (Eq. 5)
    gen_batch_size: int = 32  # generated samples per local step
    generative_alpha: float = 10.0  # weight of CE(h(G(y_hat)), y_hat), x coefficient_decay ** round
    generative_beta: float = 10.0  # weight of KL(softmax(h(G(y))) || f(x)), x coefficient_decay ** round
    coefficient_decay: float = 0.98
    coefficient_floor: float = 1e-4
    # server, FedGen (Eq. 4)
    generator_steps: int = 50  # Adam steps per round
    generator_batch_size: int = 32
    generator_lr: float = 3e-4  # x generator_lr_decay ** round
    generator_lr_decay: float = 0.98
    generator_weight_decay: float = 1e-2
    diversity_weight: float = 1.0
    noise_dim: int = 32
    generator_hidden: int = 256

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown algorithm {self.algorithm!r}; known: {', '.join(ALGORITHMS)}")
        for name in ("local_steps", "batch_size", "gen_batch_size", "generator_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AlgorithmConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown algorithm settings: {', '.join(sorted(unknown))}")
        return cls(**data)


def derive_seed(*keys: object) -> int:
    """A 63-bit seed from a tuple of keys (run seed, purpose, round, client...), stable across processes."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1
