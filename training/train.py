"""``fpn-train``: train a Fixed Point Network and write ``OUT/checkpoint.pt`` and ``OUT/metrics.jsonl``.

Reads top to bottom: ``train_one_epoch``, ``evaluate``, ``main(args)``, ``get_args_parser()``.
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
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import architectures, presets
from .backprop import BACKPROP, AdjointCounter, explicit, get_backprop
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import ModelConfig, TrainConfig
from .data import DATASETS, DataError, TensorSplit, load_split
from .distributed import (
    World,
    barrier,
    device_for,
    max_over_ranks,
    parameter_divergence,
    prepare_data_once,
    setup,
    sum_gradients,
    sum_over_ranks,
    teardown,
)
from .fpn import FPN
from .solvers import SOLVERS, measured_contraction

log = logging.getLogger("fpn-train")


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each uint8 image [B, C, H, W] by up to ``max_shift`` pixels, filling with 0."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    dev = images.device
    padded = nn.functional.pad(images, (max_shift,) * 4)
    oy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(dev)
    ox = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [B, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=dev)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=dev)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_affine(images: torch.Tensor, rotate_deg: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each image [B, C, H, W] by up to ``rotate_deg`` degrees and zoom by 1 +- ``scale``."""
    if rotate_deg <= 0 and scale <= 0:
        return images
    b = images.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (torch.rand(b, generator=generator) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(b)], 1), torch.stack([sin, cos, torch.zeros(b)], 1)], 1)
    theta = theta.to(images.device)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round().clamp(0, 255).to(images.dtype)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image [B, C, H, W] left to right with probability 1/2."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


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
    return model.to(device=device, memory_format=torch.channels_last)


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
    total_loss = correct = seen = iters_sum = 0.0
    iters_max = 0
    order = torch.randperm(len(data), generator=generator)  # the same on every process
    # augmentation draws its own numbers, per epoch and process, so shuffling stays in step
    augment = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + world.rank)
    global_batch = cfg.batch_size * world.size
    AdjointCounter.products = 0
    device = device_for(world, cfg.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
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
        idx = chunk.tensor_split(world.size)[world.rank]
        optimizer.zero_grad(set_to_none=True)
        if len(idx):
            images = random_shift(data.images[idx].to(device), cfg.augment_shift, augment)
            images = random_affine(images, cfg.augment_rotate, cfg.augment_scale, augment)
            if cfg.augment_flip:
                images = random_flip(images, augment)
            x = data.normalise(images).contiguous(memory_format=torch.channels_last)
            y = data.labels[idx].to(device)
            logits, info = step(model, x, cfg.tol, cfg.max_iter, cfg.solver, **adjoint)
            # each process's share of the mean over the global batch: summed over processes below,
            # the gradient is exactly that of one process on the whole global batch
            batch_loss = loss_sum(logits, y, cfg.loss)
            (batch_loss / len(chunk)).backward()
            n = y.shape[0]
            total_loss += float(batch_loss.detach())
            correct += float((logits.argmax(1) == y).sum())
            seen += n
            iters_sum += float(info.iterations.sum())
            iters_max = max(iters_max, int(info.iterations.max()))
        sum_gradients(model, world)
        optimizer.step()
        if seen:
            bar.set_postfix(
                loss=f"{total_loss / seen:.4f}",
                acc=f"{correct / seen:.4f}",
                iters=f"{iters_sum / seen:.1f}",
                img_s=f"{seen * world.size / (time.perf_counter() - started):.0f}",
            )
    total_loss, correct, seen, iters_sum = sum_over_ranks([total_loss, correct, seen, iters_sum], world, device)
    return {
        "train_loss": total_loss / seen,
        "train_accuracy": correct / seen,
        "mean_iterations": iters_sum / seen,
        "max_iterations": int(max_over_ranks(iters_max, world, device)),
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


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create output folder {out}: {exc.strerror or exc}") from exc
    if not os.access(out, os.W_OK):
        raise CheckpointError(f"output folder {out} is not writable")


def main(args: argparse.Namespace) -> None:
    arch = architectures.get(args.arch)
    spec = DATASETS[args.dataset]
    if spec.input_shape != arch.input_shape and not args.resume:  # a resumed run brings its own
        fitting = [a for a in architectures.available() if architectures.get(a).input_shape == spec.input_shape]
        raise ValueError(
            f"{arch.name} is built for {'x'.join(map(str, arch.input_shape))} inputs but {args.dataset} images are "
            f"{'x'.join(map(str, spec.input_shape))}; choose an architecture for this dataset "
            f"({', '.join(fitting)})"
        )
    model_cfg = ModelConfig(
        arch=args.arch,
        gamma=args.gamma,
        latent_dim=args.latent_dim or arch.latent_dim,
        dropout=args.dropout,
        in_channels=DATASETS[args.dataset].input_shape[0],
        num_classes=len(DATASETS[args.dataset].labels),
    )
    cfg = TrainConfig(
        dataset=args.dataset,
        backprop=args.backprop,
        adjoint=args.adjoint,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        lr_step_epochs=args.lr_step_epochs,
        lr_decay=args.lr_decay,
        loss=args.loss,
        weight_decay=args.weight_decay,
        tol=args.tol,
        max_iter=args.max_iter,
        solver=args.solver,
        augment_shift=args.augment_shift,
        augment_rotate=args.augment_rotate,
        augment_scale=args.augment_scale,
        augment_flip=args.augment_flip,
        preset=args.preset,
        seed=args.seed,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        device=args.device,
    )
    resume_payload: dict[str, Any] | None = None
    if args.resume:
        # Continue a run: its model and training config come from the checkpoint; only where it
        # runs (--device, --data-root, --out) comes from this command line.
        resumed, saved_cfg, resume_payload = load_checkpoint(args.resume)
        model_cfg, cfg = resumed.config, replace(saved_cfg, device=args.device)
        for key in ("optimizer", "scheduler", "generator", "epoch"):
            if key not in resume_payload:
                raise CheckpointError(f"{args.resume} has no {key} state to resume from")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for but torch sees no CUDA device")
    out = Path(args.out)
    _check_writable(out)
    world = setup(cfg.device)
    try:
        _train(args, model_cfg, cfg, resume_payload, out, world)
    finally:
        teardown(world)


def _train(
    args: argparse.Namespace,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    resume_payload: dict[str, Any] | None,
    out: Path,
    world: World,
) -> None:
    if not world.is_main:
        log.setLevel(logging.WARNING)
    device = device_for(world, cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = FPN(model_cfg)
    if resume_payload is not None:
        model.load_state_dict(resume_payload["state_dict"])
    to_device(model, device)
    prepare_data_once(world, lambda: load_split(cfg.dataset, Path(args.data_root), train=False, limit=1))
    train = load_split(cfg.dataset, Path(args.data_root), train=True, limit=cfg.limit_train)
    test = load_split(cfg.dataset, Path(args.data_root), train=False, limit=cfg.limit_test)
    log.info(
        "%s on %s: %d parameters, %d train / %d test images, backprop %s, device %s, %d process(es)",
        model_cfg.arch,
        cfg.dataset,
        model.num_parameters(),
        len(train),
        len(test),
        cfg.backprop,
        cfg.device,
        world.size,
    )

    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg)
    metrics_path = out / "metrics.jsonl"
    first_epoch = 1
    if resume_payload is not None:
        optimizer.load_state_dict(resume_payload["optimizer"])
        scheduler.load_state_dict(resume_payload["scheduler"])
        generator.set_state(resume_payload["generator"])
        if "rng_state" in resume_payload:
            torch.set_rng_state(resume_payload["rng_state"])
        first_epoch = int(resume_payload["epoch"]) + 1
        log.info(
            "resuming %s at epoch %d of %d (its model and training flags; this command's other training flags "
            "are not used)",
            args.resume,
            first_epoch,
            cfg.epochs,
        )
        earlier = Path(args.resume).parent / "metrics.jsonl"
        if world.is_main and earlier.is_file() and earlier.resolve() != metrics_path.resolve():
            metrics_path.write_text(earlier.read_text())  # the new folder holds the whole history
        if first_epoch > cfg.epochs:
            raise CheckpointError(f"{args.resume} already finished all {cfg.epochs} epochs")
    elif world.is_main:
        metrics_path.write_text("")
    for epoch in range(first_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        row: dict[str, Any] = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
        row.update(train_one_epoch(model, train, optimizer, cfg, generator, epoch, world))
        scheduler.step()
        row["train_seconds"] = time.perf_counter() - started
        row["processes"] = world.size
        row["param_divergence"] = parameter_divergence(model, world)  # 0.0: the processes are in step
        if not world.is_main:
            barrier(world)  # process 0 evaluates and writes; the others wait for it
            continue
        row.update(evaluate(model, test, cfg, device))
        row["seconds"] = time.perf_counter() - started
        row["lipschitz_bound"] = model.T.lipschitz_bound()
        row["peak_memory_mb"], row["peak_memory_kind"] = peak_memory_mb(device)
        row["device"] = cfg.device
        if not math.isfinite(row["train_loss"]):
            raise CheckpointError(f"training diverged at epoch {epoch} (loss {row['train_loss']})")
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        save_checkpoint(
            out / "checkpoint.pt",
            model,
            cfg,
            extra={
                "epoch": epoch,
                "metrics": row,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "rng_state": torch.get_rng_state(),
                "contraction": {"bound": row["lipschitz_bound"], "measured": row["measured_contraction"]},
                "dataset_spec": asdict(test.spec),  # normalisation and labels, for the export
            },
        )
        plot_curves(metrics_path, out / "curves.png")
        log.info(
            "epoch %d/%d: loss %.4f, test accuracy %.2f %%, mean iterations %.1f (max %d), contraction %.3f "
            "(bound %.3f), %.1f s",
            epoch,
            cfg.epochs,
            row["train_loss"],
            100 * row["test_accuracy"],
            row["mean_iterations"],
            row["max_iterations"],
            row["measured_contraction"],
            row["lipschitz_bound"],
            row["seconds"],
        )
        barrier(world)
    log.info("wrote %s, %s and %s", out / "checkpoint.pt", metrics_path, out / "curves.png")


def plot_curves(metrics_path: Path, png: Path, title: str | None = None) -> None:
    """Loss, accuracy and iterations per epoch from metrics.jsonl, drawn into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o", ms=3)
    axes[0].set(title="training loss", xlabel="epoch", yscale="log")
    axes[1].plot(epochs, [100 * r["train_accuracy"] for r in rows], marker="o", ms=3, label="train")
    axes[1].plot(epochs, [100 * r["test_accuracy"] for r in rows], marker="o", ms=3, label="test")
    axes[1].set(title="accuracy (%)", xlabel="epoch")
    axes[1].legend()
    axes[2].plot(epochs, [r["mean_iterations"] for r in rows], marker="o", ms=3, label="mean (train)")
    axes[2].plot(epochs, [r["max_iterations"] for r in rows], marker="o", ms=3, label="max (train)")
    axes[2].set(title="fixed-point iterations", xlabel="epoch")
    axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    last = rows[-1]
    accuracy = 100 * last["test_accuracy"]
    fig.suptitle(f"{title or png.parent.name}: test accuracy {accuracy:.2f} % after epoch {last['epoch']}")
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, png)


def get_args_parser() -> argparse.ArgumentParser:
    from fpn_serve import __version__

    p = argparse.ArgumentParser(
        prog="fpn-train",
        description="Train a Fixed Point Network with Jacobian-free backprop (JFB), or with the Jacobian-based, "
        "unrolled or explicit baselines (--backprop). Writes "
        "OUT/checkpoint.pt (weights and the config that rebuilds the model), OUT/metrics.jsonl "
        "(one JSON object per epoch) and OUT/curves.png after every epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--preset",
        default=None,
        choices=sorted(presets.PRESETS),
        help="the paper's settings for a dataset (appendix C); flags given explicitly override it. "
        + presets.describe(),
    )
    p.add_argument("--dataset", default="mnist", choices=sorted(DATASETS), help="training data")
    p.add_argument("--arch", default="mnist_conv", help=f"architecture: {', '.join(architectures.available())}")
    p.add_argument("--backprop", default="jfb", choices=sorted(BACKPROP), help="gradient of the fixed point")
    p.add_argument(
        "--adjoint",
        default="fixed_point",
        choices=["fixed_point", "cg"],
        help="--backprop ift: solve the adjoint equation by fixed-point iteration (as DEQ) or by conjugate "
        "gradient on the normal equations (as the paper)",
    )
    p.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="initial Adam learning rate")
    p.add_argument(
        "--lr-schedule",
        default="cosine",
        choices=["cosine", "step", "constant"],
        help="cosine annealing over the run, step decay (--lr-decay every --lr-step-epochs), or constant",
    )
    p.add_argument("--lr-step-epochs", type=int, default=10, help="step schedule: epochs between decays")
    p.add_argument("--lr-decay", type=float, default=0.98, help="step schedule: factor applied at each decay")
    p.add_argument(
        "--loss", default="ce", choices=["ce", "mse"], help="cross entropy, or squared error of softmax vs one-hot"
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    p.add_argument(
        "--tol", type=float, default=1e-4, help="forward solver tolerance on the per-sample relative residual"
    )
    p.add_argument("--max-iter", type=int, default=50, help="forward solver iteration cap")
    p.add_argument("--solver", default="fixed_point", choices=sorted(SOLVERS), help="forward solver")
    p.add_argument("--gamma", type=float, default=0.99, help="contraction factor of T in u, in (0, 1)")
    p.add_argument("--latent-dim", type=int, default=None, help="size of the latent u (default: the architecture's)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on Q's output (training only)")
    p.add_argument(
        "--augment-shift", type=int, default=0, help="random translation of training images by up to this many pixels"
    )
    p.add_argument(
        "--augment-rotate",
        type=float,
        default=0.0,
        help="random rotation of training images by up to this many degrees",
    )
    p.add_argument(
        "--augment-scale", type=float, default=0.0, help="random zoom of training images by a factor in [1-s, 1+s]"
    )
    p.add_argument(
        "--augment-flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flips"
    )
    p.add_argument("--out", required=True, help="output folder for checkpoint.pt and metrics.jsonl")
    p.add_argument("--data-root", default="data", help="dataset folder (torchvision layout)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="torch device")
    p.add_argument("--seed", type=int, default=0, help="random seed (weights, shuffling, augmentation)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    p.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    p.add_argument(
        "--resume",
        default=None,
        metavar="CKPT",
        help="continue the run saved in CKPT (its model and training flags; --device, --data-root and --out from here)",
    )
    return p


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.arch not in architectures.available():
        p.error(f"unknown architecture {args.arch!r}; available: {', '.join(architectures.available())}")
    positive = {
        "--epochs": args.epochs,
        "--batch-size": args.batch_size,
        "--max-iter": args.max_iter,
        "--lr-step-epochs": args.lr_step_epochs,
    }
    if args.latent_dim is not None and args.latent_dim < 1:
        p.error(f"--latent-dim must be >= 1, got {args.latent_dim}")
    if not 0 < args.lr_decay <= 1:
        p.error(f"--lr-decay must lie in (0, 1], got {args.lr_decay}")
    for flag, value in positive.items():
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    for flag, value in {"--lr": args.lr, "--tol": args.tol}.items():
        if not (value > 0 and math.isfinite(value)):
            p.error(f"{flag} must be a positive number, got {value}")
    if not 0 < args.gamma < 1:
        p.error(f"--gamma must lie in (0, 1), got {args.gamma}")
    if args.augment_shift < 0 or not 0 <= args.augment_rotate <= 180 or not 0 <= args.augment_scale < 1:
        p.error("--augment-shift must be >= 0, --augment-rotate in [0, 180], --augment-scale in [0, 1)")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    for flag, value in {"--limit-train": args.limit_train, "--limit-test": args.limit_test}.items():
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with its --preset applied: the preset replaces the defaults, and any flag
    given explicitly still wins."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**presets.PRESETS[args.preset])
        args = parser.parse_args(argv)
    _validate(parser, args)
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
