"""Table 2 analogue: the training modes side by side on one model, one dataset, one forward tolerance.

    python benchmarks/backprop.py                       # the full run (MNIST, about 20 minutes on 2 cores)
    python benchmarks/backprop.py --limit-train 5000    # a quicker look

For each mode (``jfb``, ``ift`` with the fixed-point adjoint, ``ift`` with conjugate gradient on
the normal equations, ``unrolled``, ``explicit``) a fresh copy of the same initial weights trains
``--epochs`` epochs on the same batches, the modes taking turns epoch by epoch; reported are the
median seconds per epoch (training only), Jacobian-vector products per epoch and the test
accuracy afterwards. Then the memory that
one training step keeps for its backward pass, for ``jfb`` against ``unrolled`` at depths 5, 50
and 500 (tolerance 0, so every depth is really run): the bytes of the distinct tensors autograd
saves, which is what grows with depth (on a GPU, also torch's peak allocation).

Defaults follow the paper's own MNIST code: the 84,182-parameter model, batch 50, forward
tolerance 1e-5, at most 500 iterations. Prints two tables and writes
``benchmarks/results/backprop.json`` and ``backprop.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from training.backprop import get_backprop  # noqa: E402
from training.config import ModelConfig, TrainConfig  # noqa: E402
from training.data import load_split  # noqa: E402
from training.fpn import FPN  # noqa: E402
from training.train import evaluate, loss_sum, to_device, train_one_epoch  # noqa: E402

# (label, --backprop, --adjoint)
MODES = (
    ("jfb", "jfb", "fixed_point"),
    ("ift (fixed-point adjoint)", "ift", "fixed_point"),
    ("ift (CG, normal equations)", "ift", "cg"),
    ("unrolled", "unrolled", "fixed_point"),
    ("explicit", "explicit", "fixed_point"),
)


def train_modes(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    train = load_split("mnist", Path(args.data_root), train=True, limit=args.limit_train)
    test = load_split("mnist", Path(args.data_root), train=False)
    torch.manual_seed(args.seed)
    initial = FPN(ModelConfig(arch=args.arch))
    warm = to_device(copy.deepcopy(initial), device)  # first-use costs (thread pools, allocator) are not any mode's
    warm_cfg = TrainConfig(batch_size=args.batch_size, tol=args.tol, max_iter=args.max_iter, device=device)
    warm_data = load_split("mnist", Path(args.data_root), train=True, limit=20 * args.batch_size)
    for backprop in ("jfb", "ift"):
        train_one_epoch(
            warm,
            warm_data,
            torch.optim.Adam(warm.parameters()),
            replace(warm_cfg, backprop=backprop),
            torch.Generator().manual_seed(0),
            0,
        )
    runs = []
    for label, backprop, adjoint in MODES:
        if args.modes and backprop not in args.modes and label not in args.modes:
            continue
        model = to_device(copy.deepcopy(initial), device)
        cfg = TrainConfig(
            backprop=backprop,
            adjoint=adjoint,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_schedule="constant",
            tol=args.tol,
            max_iter=args.max_iter,
            seed=args.seed,
            device=device,
        )
        runs.append(
            {
                "label": label,
                "model": model,
                "cfg": cfg,
                "optimizer": torch.optim.Adam(model.parameters(), lr=cfg.lr),
                "generator": torch.Generator().manual_seed(args.seed),  # the same batches for every mode
                "seconds": [],
                "products": [],
                "iterations": [],
            }
        )
    # round robin: epoch 1 of every mode, then epoch 2, ..., so a noisy neighbour slows all modes alike
    for epoch in range(1, args.epochs + 1):
        for run in runs:
            started = time.perf_counter()
            stats = train_one_epoch(run["model"], train, run["optimizer"], run["cfg"], run["generator"], epoch)
            run["seconds"].append(time.perf_counter() - started)
            run["products"].append(stats["jacobian_products"])
            run["iterations"].append(stats["mean_iterations"])
            print(
                f"  {run['label']}: epoch {epoch}: {run['seconds'][-1]:.1f} s, {run['products'][-1]:.3g} JVPs",
                flush=True,
            )
    rows = []
    for run in runs:
        cfg = run["cfg"]
        result = evaluate(run["model"], test, cfg, device)
        rows.append(
            {
                "mode": run["label"],
                "backprop": cfg.backprop,
                "adjoint": cfg.adjoint if cfg.backprop == "ift" else None,
                "seconds_per_epoch_median": statistics.median(run["seconds"]),
                "seconds_per_epoch": run["seconds"],
                "jacobian_products_per_epoch": statistics.median(run["products"]),
                "mean_forward_iterations": run["iterations"][-1],
                "test_accuracy": result["test_accuracy"],
                "epochs": args.epochs,
            }
        )
    return rows


def saved_for_backward(model: FPN, x: torch.Tensor, y: torch.Tensor, backprop: str, depth: int) -> dict[str, float]:
    """Bytes of the distinct tensors autograd keeps for one training step's backward pass."""
    step = get_backprop(backprop)
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        seen[key] = t.untyped_storage().nbytes()
        return t

    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, info = step(model, x, 0.0, depth)  # tol 0: every sample runs all `depth` iterations
        loss = loss_sum(logits, y, "ce")
    loss.backward()
    out = {"saved_mib": sum(seen.values()) / 2**20, "iterations": float(info.iterations.max())}
    if cuda:
        torch.cuda.synchronize()
        out["cuda_peak_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    model.zero_grad(set_to_none=True)
    return out


def memory_table(args: argparse.Namespace, device: str) -> list[dict[str, Any]]:
    data = load_split("mnist", Path(args.data_root), train=False, limit=args.batch_size)
    x = data.normalise(data.images).to(device)
    y = data.labels.to(device)
    torch.manual_seed(args.seed)
    model = to_device(FPN(ModelConfig(arch=args.arch)), device).train()
    rows = []
    for depth in args.depths:
        for backprop in ("jfb", "unrolled"):
            m = saved_for_backward(model, x, y, backprop, depth)
            rows.append({"backprop": backprop, "max_iter": depth, **m})
            print(f"  {backprop} at depth {depth}: {m['saved_mib']:.2f} MiB saved for backward", flush=True)
    return rows


def markdown(train_rows: list[dict[str, Any]], mem_rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Training modes on MNIST, `{args.arch}`, batch {args.batch_size}, forward tol {args.tol:g}, "
        f"max_iter {args.max_iter}, {args.epochs} epochs each from the same initial weights "
        f"({args.limit_train or 60000} training images).",
        "",
        "| mode | s/epoch (median) | JVPs/epoch | mean forward iterations | test accuracy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in train_rows:
        lines.append(
            f"| {r['mode']} | {r['seconds_per_epoch_median']:.1f} | {r['jacobian_products_per_epoch']:.3g} | "
            f"{r['mean_forward_iterations']:.1f} | {100 * r['test_accuracy']:.2f} % |"
        )
    lines += [
        "",
        f"Memory kept for the backward pass of one training step (batch {args.batch_size}, tol 0):",
        "",
        "| max_iter | jfb (MiB) | unrolled (MiB) |",
        "| ---: | ---: | ---: |",
    ]
    by = {(r["backprop"], r["max_iter"]): r for r in mem_rows}
    for depth in args.depths:
        lines.append(
            f"| {depth} | {by[('jfb', depth)]['saved_mib']:.2f} | {by[('unrolled', depth)]['saved_mib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data")
    p.add_argument("--arch", default="mnist_conv")
    p.add_argument("--epochs", type=int, default=3, help="epochs per mode (the median epoch time is reported)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--max-iter", type=int, default=500)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--modes", nargs="*", default=None, help="only these --backprop modes (default: all)")
    p.add_argument("--depths", type=int, nargs="*", default=[5, 50, 500], help="max_iter values for the memory table")
    p.add_argument("--skip-training", action="store_true", help="only the memory table")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "backprop.json"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    print(f"training modes ({args.epochs} epochs each):", flush=True)
    train_rows = [] if args.skip_training else train_modes(args, args.device)
    print("memory for the backward pass:", flush=True)
    mem_rows = memory_table(args, args.device)
    table = markdown(train_rows, mem_rows, args)
    print()
    print(table)
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "training": train_rows,
        "memory": mem_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
