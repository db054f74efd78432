"""Typed, frozen configuration stored beside the weights, so a checkpoint rebuilds its model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild an FPN's modules (not its weights)."""

    arch: str = "mnist_conv"
    gamma: float = 0.99  # contraction factor of T in u, guaranteed by construction
    latent_dim: int = 46
    dropout: float = 0.0  # applied to Q's output in training only
    in_channels: int = 1
    num_classes: int = 10


@dataclass(frozen=True)
class TrainConfig:
    """One training run, as given on the ``fpn-train`` command line."""

    dataset: str = "mnist"
    backprop: str = "jfb"
    adjoint: str = "fixed_point"  # ift only: the adjoint solver, "fixed_point" (as DEQ) or "cg" (as the paper)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine annealing over the run, "step" decay, or "constant"
    lr_step_epochs: int = 10  # step schedule: multiply by lr_decay every this many epochs
    lr_decay: float = 0.98
    loss: str = "ce"  # cross entropy, or "mse" between softmax and one-hot (the paper's MNIST choice)
    weight_decay: float = 0.0
    tol: float = 1e-4
    max_iter: int = 50
    solver: str = "fixed_point"
    augment_shift: int = 0  # random translation by up to this many pixels, training only
    augment_rotate: float = 0.0  # random rotation by up to this many degrees, training only
    augment_scale: float = 0.0  # random zoom by a factor in [1 - s, 1 + s], training only
    augment_flip: bool = False  # random horizontal flip, training only (CIFAR-10, not digits)
    preset: str | None = None  # the --preset the run started from, for the record
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    device: str = "cpu"


def to_dict(cfg: ModelConfig | TrainConfig) -> dict[str, Any]:
    return asdict(cfg)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
    return ModelConfig(**data)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})
