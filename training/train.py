"""``fpn-train``: train a Fixed Point Network and write ``OUT/checkpoint.pt`` and ``OUT/metrics.jsonl``.

Reads top to bottom: ``train_one_epoch``, ``evaluate``, the ``Trainer`` that runs them epoch by
epoch (resume, epoch, evaluate, record), ``main(args)``, ``get_args_parser()``. Every flag and
its default comes from ``TrainConfig`` and ``RunPaths`` (``training.config``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import architectures, presets
from .augment import augment
from .backprop import BACKPROP, AdjointCounter, explicit, get_backprop
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ModelConfig, RunPaths, TrainConfig
from .curves import plot_curves
from .data import DATASETS, TensorSplit, load_split
from .distributed import (
    World,
    barrier,
    device_for,
    max_over_ranks,
    param_divergence,
    prepare_data_once,
    setup,
    sum_gradients,
    sum_over_ranks,
    teardown,
    use_global_batchnorm,
)
from .errors import CheckpointError, ConfigError, DataError
from .flags import add_config_flags, config_from_args, flag_name
from .fpn import FPN
from .solvers import SOLVERS, SolverInfo, measured_contraction

log = logging.getLogger("fpn-train")


def loss_sum(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over the batch: cross entropy, or squared error between softmax and one-hot ("mse")."""
    if kind == "mse":
        target = nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)
        return ((logits.softmax(dim=1) - target) ** 2).sum()
    return nn.functional.cross_entropy(logits, y, reduction="sum")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.lr_schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_decay)
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))


def peak_memory_mb(device: str) -> tuple[float, str]:
    """Peak memory so far: CUDA memory allocated by torch on a GPU, else the process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_peak_rss"


def to_device(model: FPN, device: str) -> FPN:
    """Move the model, with NHWC convolution weights (inputs follow in train_one_epoch): with
    pooling before the activation, this more than halves a CPU training step of mnist_conv."""
    return model.to(device).to(memory_format=torch.channels_last)


@dataclass
class _Tally:
    """Running sums of one process's epoch."""

    loss: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    iterations: float = 0.0
    max_iterations: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, info: SolverInfo) -> None:
        self.loss += float(loss.detach())
        self.correct += float((logits.argmax(1) == y).sum())
        self.seen += y.shape[0]
        self.iterations += float(info.iterations.sum())
        if y.shape[0]:
            self.max_iterations = max(self.max_iterations, int(info.iterations.max()))


def train_one_epoch(
    model: FPN,
    data: TensorSplit,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    generator: torch.Generator,
    epoch: int,
    world: World | None = None,
) -> dict[str, float]:
    """One pass over ``data``; with several processes each trains on its slice of every global batch."""
    world = world or World()
    model.train()
    step = get_backprop(cfg.backprop)
    adjoint = {"adjoint": cfg.adjoint} if cfg.backprop == "ift" else {}
    order = torch.randperm(len(data), generator=generator)  # the same on every process
    # augmentation draws its own numbers, per epoch and process, so shuffling stays in step
    draws = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + world.rank)
    global_batch = cfg.batch_size * world.size
    AdjointCounter.products = 0
    device = device_for(world, cfg.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tally = _Tally()
    started = time.perf_counter()
    bar = tqdm(
        range(0, len(data), global_batch),
        desc=f"epoch {epoch}/{cfg.epochs}",
        unit="batch",
        leave=False,
        disable=None if world.is_main else True,
    )
    for start in bar:
        chunk = order[start : start + global_batch]
        # a short last batch may leave this slice empty; it is stepped all the same, so that every
        # process makes the same collective calls (GlobalBatchNorm's, the gradient sum)
        idx = chunk.tensor_split(world.size)[world.rank]
        optimizer.zero_grad(set_to_none=True)
        images = augment(
            data.images[idx].to(device),
            draws,
            shift=cfg.augment_shift,
            rotate_deg=cfg.augment_rotate,
            scale=cfg.augment_scale,
            flip=cfg.augment_flip,
        )
        x = data.normalise(images).contiguous(memory_format=torch.channels_last)
        y = data.labels[idx].to(device)
        logits, info = step(model, x, cfg.tol, cfg.max_iter, cfg.solver, **adjoint)
        # each process's share of the mean over the global batch: summed over processes below,
        # the gradient is exactly that of one process on the whole global batch
        batch_loss = loss_sum(logits, y, cfg.loss)
        torch.autograd.backward(batch_loss / len(chunk))
        tally.add(batch_loss, logits, y, info)
        sum_gradients(model, world)
        optimizer.step()
        if tally.seen:
            bar.set_postfix(
                loss=f"{tally.loss / tally.seen:.4f}",
                acc=f"{tally.correct / tally.seen:.4f}",
                iters=f"{tally.iterations / tally.seen:.1f}",
                img_s=f"{tally.seen * world.size / (time.perf_counter() - started):.0f}",
            )
    sums = [tally.loss, tally.correct, tally.seen, tally.iterations]
    loss, correct, seen, iters = sum_over_ranks(sums, world, device)
    return {
        "train_loss": loss / seen,
        "train_accuracy": correct / seen,
        "mean_iterations": iters / seen,
        "max_iterations": int(max_over_ranks(tally.max_iterations, world, device)),
        "jacobian_products": AdjointCounter.products,  # of the implicit backward (ift); 0 otherwise
    }


@torch.no_grad()
def evaluate(
    model: FPN, data: TensorSplit, cfg: TrainConfig, device: str | None = None, batch_size: int = 1000
) -> dict[str, float]:
    """Test accuracy in eval mode (no dropout), solving to the training tolerance (explicit twins: one layer)."""
    model.eval()
    correct = iters_sum = 0.0
    iters_max = 0
    for x, y in data.batches(batch_size, device=device or cfg.device):
        if cfg.backprop == "explicit":  # the explicit twin is evaluated as what it is: one latent layer
            logits, info = explicit(model, x, cfg.tol, cfg.max_iter)
        else:
            logits, info = model(x, cfg.tol, cfg.max_iter, cfg.solver)
        correct += float((logits.argmax(1) == y).sum())
        iters_sum += float(info.iterations.sum())
        iters_max = max(iters_max, int(info.iterations.max()))
    n = len(data)
    return {
        "test_accuracy": correct / n,
        "test_mean_iterations": iters_sum / n,
        "test_max_iterations": iters_max,
        "measured_contraction": contraction_at_data(model, data, cfg, device or cfg.device),
    }


def contraction_at_data(model: FPN, data: TensorSplit, cfg: TrainConfig, device: str, images: int = 256) -> float:
    """The largest ||dT/du|| at the fixed points of the first ``images`` test images (power iteration)."""
    model.eval()
    x, _ = next(data.batches(min(images, len(data)), device=device))
    with torch.no_grad():
        z = model.Q(x)
        u_star, _ = model.solve(z, cfg.tol, cfg.max_iter, cfg.solver)
        weights = model.T.weights()
    return measured_contraction(lambda u: model.T.apply_with(weights, u, z), u_star)


class Trainer:
    """One run, in named steps: ``start`` or ``resume``, then for every epoch ``run_epoch`` (all
    processes), ``evaluate`` and ``record`` (process 0 only, the others wait); ``fit`` runs the epochs."""

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, paths: RunPaths, world: World) -> None:
        if not world.is_main:
            log.setLevel(logging.WARNING)
        self.cfg, self.world, self.out = cfg, world, Path(paths.out)
        self.device = device_for(world, cfg.device)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.model = to_device(FPN(model_cfg), self.device)
        if world.active:
            use_global_batchnorm(self.model)  # normalise by the global batch, as one process would
        root = Path(paths.data_root)
        prepare_data_once(world, lambda: load_split(cfg.dataset, root, train=False, limit=1))
        self.train_data = load_split(cfg.dataset, root, train=True, limit=cfg.limit_train)
        self.test_data = load_split(cfg.dataset, root, train=False, limit=cfg.limit_test)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.metrics_path = self.out / "metrics.jsonl"
        self.first_epoch = 1
        self.epoch_started = time.perf_counter()
        log.info(
            "%s on %s: %d parameters, %d train / %d test images, backprop %s, device %s, %d process(es)",
            model_cfg.arch,
            cfg.dataset,
            self.model.num_parameters(),
            len(self.train_data),
            len(self.test_data),
            cfg.backprop,
            cfg.device,
            world.size,
        )

    def start(self) -> None:
        """A fresh run: an empty metrics.jsonl."""
        if self.world.is_main:
            self.metrics_path.write_text("")

    def resume(self, payload: dict[str, Any], checkpoint: Path) -> None:
        """Continue from a checkpoint: weights, optimiser, schedule and random state, and its metrics so far."""
        self.model.load_state_dict(payload["state_dict"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.generator.set_state(payload["generator"])
        if "rng_state" in payload:
            torch.set_rng_state(payload["rng_state"])
        self.first_epoch = int(payload["epoch"]) + 1
        log.info(
            "resuming %s at epoch %d of %d (its model and training settings; this command's other training flags "
            "are not used)",
            checkpoint,
            self.first_epoch,
            self.cfg.epochs,
        )
        earlier = checkpoint.parent / "metrics.jsonl"
        if self.world.is_main and earlier.is_file() and earlier.resolve() != self.metrics_path.resolve():
            self.metrics_path.write_text(earlier.read_text())  # the new folder holds the whole history
        if self.first_epoch > self.cfg.epochs:
            raise CheckpointError(f"{checkpoint} already finished all {self.cfg.epochs} epochs")

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch on every process; the row of metrics that all processes know."""
        self.epoch_started = started = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        row.update(
            train_one_epoch(self.model, self.train_data, self.optimizer, self.cfg, self.generator, epoch, self.world)
        )
        self.scheduler.step()
        row["train_seconds"] = time.perf_counter() - started
        row["processes"] = self.world.size
        row["param_divergence"] = param_divergence(self.model, self.world)  # 0.0: the processes are in step
        return row

    def evaluate(self, row: dict[str, Any]) -> None:
        """Add the test metrics, the contraction and the memory to ``row``; stop a diverged run."""
        row.update(evaluate(self.model, self.test_data, self.cfg, self.device))
        row["seconds"] = time.perf_counter() - self.epoch_started
        row["lipschitz_bound"] = self.model.T.lipschitz_bound()
        row["peak_memory_mb"], row["peak_memory_kind"] = peak_memory_mb(self.device)
        row["device"] = self.cfg.device
        if not math.isfinite(row["train_loss"]):
            raise CheckpointError(f"training diverged at epoch {row['epoch']} (loss {row['train_loss']})")

    def record(self, row: dict[str, Any]) -> None:
        """Append the row to metrics.jsonl, write the checkpoint and the curves."""
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        save_checkpoint(
            self.out / "checkpoint.pt",
            self.model,
            self.cfg,
            extra={
                "epoch": row["epoch"],
                "metrics": row,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(),
                "rng_state": torch.get_rng_state(),
                "contraction": {"bound": row["lipschitz_bound"], "measured": row["measured_contraction"]},
                "dataset_spec": asdict(self.test_data.spec),  # normalisation and labels, for the export
            },
        )
        plot_curves(self.metrics_path, self.out / "curves.png")
        log.info(
            "epoch %d/%d: loss %.4f, test accuracy %.2f %%, mean iterations %.1f (max %d), contraction %.3f "
            "(bound %.3f), %.1f s",
            row["epoch"],
            self.cfg.epochs,
            row["train_loss"],
            100 * row["test_accuracy"],
            row["mean_iterations"],
            row["max_iterations"],
            row["measured_contraction"],
            row["lipschitz_bound"],
            row["seconds"],
        )

    def fit(self) -> None:
        for epoch in range(self.first_epoch, self.cfg.epochs + 1):
            row = self.run_epoch(epoch)
            if self.world.is_main:
                self.evaluate(row)
                self.record(row)
            barrier(self.world)  # process 0 evaluates and writes; the others wait for it
        log.info("wrote %s, %s and %s", self.out / "checkpoint.pt", self.metrics_path, self.out / "curves.png")


def model_config_for(cfg: TrainConfig) -> ModelConfig:
    """The model a fresh run builds; ValueError naming the fitting architectures if its inputs do not fit the data."""
    arch = architectures.get(cfg.arch)
    spec = DATASETS[cfg.dataset]
    if spec.input_shape != arch.input_shape:
        fitting = [a for a in architectures.available() if architectures.get(a).input_shape == spec.input_shape]
        raise ValueError(
            f"{arch.name} is built for {'x'.join(map(str, arch.input_shape))} inputs but {cfg.dataset} images are "
            f"{'x'.join(map(str, spec.input_shape))}; choose an architecture for this dataset ({', '.join(fitting)})"
        )
    return ModelConfig(
        arch=cfg.arch,
        gamma=cfg.gamma,
        latent_dim=cfg.latent_dim or arch.latent_dim,
        dropout=cfg.dropout,
        in_channels=spec.input_shape[0],
        num_classes=len(spec.labels),
    )


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    if not os.access(out, os.W_OK):
        raise CheckpointError(f"output folder {out} is not writable")


def main(args: argparse.Namespace) -> None:
    cfg = config_from_args(TrainConfig, args)
    paths = config_from_args(RunPaths, args)
    payload: dict[str, Any] | None = None
    if paths.resume:
        # Continue a run: its model and training config come from the checkpoint; only where it
        # runs (--device, --data-root, --out) comes from this command line.
        resumed, saved_cfg, payload = load_checkpoint(paths.resume)
        model_cfg, cfg = resumed.config, replace(saved_cfg, device=cfg.device)
        for key in ("optimizer", "scheduler", "generator", "epoch"):
            if key not in payload:
                raise CheckpointError(f"{paths.resume} has no {key} state to resume from")
    else:
        model_cfg = model_config_for(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but torch sees no CUDA device")
    _check_writable(Path(paths.out))
    world = setup(cfg.device)
    try:
        trainer = Trainer(model_cfg, cfg, paths, world)
        if payload is not None and paths.resume:
            trainer.resume(payload, Path(paths.resume))
        else:
            trainer.start()
        trainer.fit()
    finally:
        teardown(world)


def get_args_parser() -> argparse.ArgumentParser:
    from fpn_serve import __version__

    p = argparse.ArgumentParser(
        prog="fpn-train",
        description="Train a Fixed Point Network with Jacobian-free backprop (JFB), or with the Jacobian-based, "
        "unrolled or explicit baselines (--backprop). Writes "
        "OUT/checkpoint.pt (weights and the config that rebuilds the model), OUT/metrics.jsonl "
        "(one JSON object per epoch) and OUT/curves.png after every epoch. Under torchrun, data-parallel "
        "over the processes (--batch-size per process).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    registries = {
        "dataset": sorted(DATASETS),
        "backprop": sorted(BACKPROP),
        "solver": sorted(SOLVERS),
        "preset": sorted(presets.PRESETS),
    }
    more_help = {"arch": f": {', '.join(architectures.available())}", "preset": ". " + presets.describe()}
    add_config_flags(p, TrainConfig, choices=registries, help_suffix=more_help)
    add_config_flags(p, RunPaths)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with its --preset applied: the preset replaces the defaults, and any flag
    given explicitly still wins. Every value is checked against its TrainConfig field."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**presets.PRESETS[args.preset])
        args = parser.parse_args(argv)
    try:
        architectures.get(args.arch)
        config_from_args(TrainConfig, args)
    except ConfigError as exc:
        parser.error(f"{flag_name(exc.name)} {exc.reason}")
    except ValueError as exc:
        parser.error(str(exc))
    return args


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main(args)
    except (DataError, CheckpointError, ValueError, OSError) as exc:
        print(f"fpn-train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fpn-train: interrupted; the last finished epoch's checkpoint is kept", file=sys.stderr)
        return 130
    return 0


def entry() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    entry()
