"""Typed, frozen configuration: ``TrainConfig`` (stored beside the weights) and ``ModelConfig``.

``TrainConfig`` is the one source of every training default: ``fpn-train``'s flags are generated
from its fields (name, type, default, and the help and bounds in each field's metadata; see
``training.flags``), and a field's bounds are checked whenever a config is built, from the command
line or from a checkpoint. ``ModelConfig`` is what rebuilds a model's modules; ``fpn-train``
derives it from the run's ``TrainConfig`` and its data set.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import ConfigError


def setting(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with its default (``MISSING``: required), its one-line help and the values it
    may take. ``None`` always passes the checks: it is an optional setting left unset."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "metavar": metavar}
    return field(default=default, metadata=metadata)


def _allowed(meta: Any) -> str:
    """The bounds of a field in words: "must be >= 1", "must lie in (0, 1]"."""
    low = ("[", ">=", meta["ge"]) if meta["ge"] is not None else ("(", ">", meta["gt"])
    high = ("]", "<=", meta["le"]) if meta["le"] is not None else (")", "<", meta["lt"])
    if low[2] is not None and high[2] is not None:
        return f"must lie in {low[0]}{low[2]:g}, {high[2]:g}{high[0]}"
    side = low if low[2] is not None else high
    return f"must be {side[1]} {side[2]:g}"


def check_settings(cfg: object) -> None:
    """Raise ConfigError naming the first field of a config dataclass whose value is not allowed."""
    for f in fields(cfg):  # type: ignore[arg-type]
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or not meta:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f.name, f"must be one of {', '.join(meta['choices'])}, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")
        ok = (
            (meta["ge"] is None or value >= meta["ge"])
            and (meta["gt"] is None or value > meta["gt"])
            and (meta["le"] is None or value <= meta["le"])
            and (meta["lt"] is None or value < meta["lt"])
        )
        if not ok:
            raise ConfigError(f.name, f"{_allowed(meta)}, got {value}")


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
    """One training run: every ``fpn-train`` setting but where it reads and writes (``RunPaths``).

    The model settings (arch, gamma, latent_dim, dropout) are the run's request; the checkpoint's
    ``ModelConfig`` records the model that was built from them.
    """

    dataset: str = setting("mnist", "training data")
    arch: str = setting(ModelConfig.arch, "architecture")
    backprop: str = setting("jfb", "gradient of the fixed point")
    adjoint: str = setting(
        "fixed_point",
        "--backprop ift: solve the adjoint equation by fixed-point iteration (as DEQ) or by conjugate gradient "
        "on the normal equations (as the paper)",
        choices=("fixed_point", "cg"),
    )
    epochs: int = setting(20, "passes over the training set", ge=1)
    batch_size: int = setting(128, "training batch size (per process under torchrun)", ge=1)
    lr: float = setting(1e-3, "initial Adam learning rate", gt=0)
    lr_schedule: str = setting(
        "cosine",
        "cosine annealing over the run, step decay (--lr-decay every --lr-step-epochs), or constant",
        choices=("cosine", "step", "constant"),
    )
    lr_step_epochs: int = setting(10, "step schedule: epochs between decays", ge=1)
    lr_decay: float = setting(0.98, "step schedule: factor applied at each decay", gt=0, le=1)
    loss: str = setting(
        "ce",
        "cross entropy, or squared error of softmax vs one-hot (the paper's MNIST choice)",
        choices=("ce", "mse"),
    )
    weight_decay: float = setting(0.0, "Adam weight decay", ge=0)
    tol: float = setting(1e-4, "forward solver tolerance on the per-sample relative residual", gt=0)
    max_iter: int = setting(50, "forward solver iteration cap", ge=1)
    solver: str = setting("fixed_point", "forward solver")
    gamma: float = setting(ModelConfig.gamma, "contraction factor of T in u", gt=0, lt=1)
    latent_dim: int | None = setting(None, "size of the latent u; unset: the architecture's", ge=1)
    dropout: float = setting(ModelConfig.dropout, "dropout on Q's output (training only)", ge=0, lt=1)
    augment_shift: int = setting(0, "random translation of training images by up to this many pixels", ge=0)
    augment_rotate: float = setting(0.0, "random rotation of training images by up to this many degrees", ge=0, le=180)
    augment_scale: float = setting(0.0, "random zoom of training images by a factor in [1-s, 1+s]", ge=0, lt=1)
    augment_flip: bool = setting(False, "random horizontal flips (CIFAR-10, not digits)")
    preset: str | None = setting(None, "the paper's settings for a data set (appendix C); flags given explicitly win")
    seed: int = setting(0, "random seed (weights, shuffling, augmentation)")
    limit_train: int | None = setting(None, "use only the first N training images", ge=1, metavar="N")
    limit_test: int | None = setting(None, "use only the first N test images", ge=1, metavar="N")
    device: str = setting("cpu", "torch device", choices=("cpu", "cuda"))

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(frozen=True)
class RunPaths:
    """Where a run reads and writes: given on every command line, never taken from a checkpoint."""

    out: str = setting(MISSING, "output folder for checkpoint.pt, metrics.jsonl and curves.png", metavar="DIR")
    data_root: str = setting("data", "dataset folder (torchvision layout)", metavar="D")
    resume: str | None = setting(
        None,
        "continue the run saved in CKPT (its model and training settings; --device, --data-root and --out "
        "from this command line)",
        metavar="CKPT",
    )


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
    return ModelConfig(**data)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A stored TrainConfig; keys it no longer has are dropped, fields it did not have take their defaults."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})
