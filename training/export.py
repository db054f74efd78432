"""``fpn-export``: turn a checkpoint into a served model folder (Q.onnx, T.onnx, S.onnx, manifest.json).

The export checks itself: ``onnx.checker`` on every graph, then the folder is loaded by
``fpn_serve.Engine`` (the serving code, not torch) and compared with the torch model on real test
images, and calibrated over a grid of tolerances. Everything is written to a temporary folder and
renamed into place only when every check passed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from fpn_serve import Engine, __version__
from fpn_serve.manifest import FORMAT, Manifest, sha256_file
from fpn_serve.solvers import RESIDUAL, RESIDUAL_EPS

from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig
from .data import DataError, dataset_spec, load_split
from .fpn import FPN
from .loop_graph import build_loop_model

log = logging.getLogger("fpn-export")

CALIBRATION_TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
LOGIT_ATOL = 1e-4


class ExportError(RuntimeError):
    """The export cannot be completed; nothing was written."""


class _QGraph(nn.Module):
    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.q = model.Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


class _TGraph(nn.Module):
    """T with its spectrally normalised weight frozen into a constant."""

    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.t = model.T
        self.register_buffer("weight", model.T.linear.weight().detach().clone())

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.t.apply_with(self.weight, u, z)


class _StepGraph(_TGraph):
    """T with the residual fused in: (u, z) -> (u_next, residual, step_norm), one run per iteration."""

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        u_next = self.t.apply_with(self.weight, u, z)
        step = (u_next - u).flatten(1).norm(dim=1)
        return u_next, step / (u_next.flatten(1).norm(dim=1) + RESIDUAL_EPS), step


class _SGraph(nn.Module):
    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.s = model.S

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.s(u)


def _export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], output: str | list[str], path: Path, opset: int
) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = {name: {0: batch} for name in names}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=names,
            output_names=[output] if isinstance(output, str) else output,
            dynamic_shapes=dynamic,
            opset_version=opset,
            dynamo=True,
            external_data=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def write_graphs(model: FPN, input_shape: tuple[int, ...], folder: Path, opset: int, loop: bool = True) -> list[str]:
    """Write Q, T, S and the fused step graph (and FPN.onnx with ``loop``); return the roles written."""
    latent = model.config.latent_dim
    x = torch.zeros(2, *input_shape)
    u = torch.zeros(2, latent)
    _export_graph(_QGraph(model), (x,), ["x"], "z", folder / "Q.onnx", opset)
    _export_graph(_TGraph(model), (u, u.clone()), ["u", "z"], "u_next", folder / "T.onnx", opset)
    _export_graph(_SGraph(model), (u,), ["u"], "logits", folder / "S.onnx", opset)
    step_outputs = ["u_next", "residual", "step_norm"]
    _export_graph(_StepGraph(model), (u, u.clone()), ["u", "z"], step_outputs, folder / "step.onnx", opset)
    roles = ["Q", "T", "S", "step"]
    if loop:
        graphs = [onnx.load(str(folder / f"{r}.onnx")) for r in ("Q", "T", "S")]
        onnx.save(build_loop_model(*graphs, opset=opset), str(folder / "fpn.onnx"))
        roles.append("fpn")
    return roles


def build_manifest(
    name: str,
    model: FPN,
    cfg: TrainConfig,
    payload: dict[str, Any],
    folder: Path,
    tol: float,
    max_iter: int,
    opset: int,
    roles: list[str],
) -> dict[str, Any]:
    spec = dataset_spec(cfg.dataset)
    metrics = payload.get("metrics", {})
    return {
        "format": FORMAT,
        "name": name,
        "version": "1",
        "graphs": {role: {"file": f"{role}.onnx", "sha256": sha256_file(folder / f"{role}.onnx")} for role in roles},
        "input": {
            "shape": list(spec.input_shape),
            "dtype": "float32",
            "layout": "NCHW",
            "scale": spec.scale,
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "latent_shape": [model.config.latent_dim],
        "labels": list(spec.labels),
        "contraction": {
            "gamma": model.T.lipschitz_bound(),
            "method": "architectural bound: gamma_u * ||W||_2 with ||W||_2 <= 1 enforced by "
            "exact spectral normalisation; ReLU is 1-Lipschitz",
        },
        "solver": {"tol": tol, "max_iter": max_iter, "residual": RESIDUAL, "start": "u = 0"},
        "opset": opset,
        "provenance": {
            "dataset": cfg.dataset,
            "architecture": model.config.arch,
            "parameters": model.num_parameters(),
            "backprop": cfg.backprop,
            "epochs": payload.get("epoch"),
            "train_config": asdict(cfg),
            "model_config": asdict(model.config),
            "checkpoint_test_accuracy": metrics.get("test_accuracy"),
            "exporter": f"fpn-export {__version__}, torch {torch.__version__}, onnx {onnx.__version__}",
        },
        "calibration": [],
    }


@torch.no_grad()
def check_parity(model: FPN, engine: Engine, x: np.ndarray, tol: float, max_iter: int) -> dict[str, Any]:
    """Compare the ONNX loop with the torch model; raise ExportError with the size of any gap.

    Logits must agree within LOGIT_ATOL after the same fixed number of iterations (no early exit
    on either side), and labels must agree at the manifest's default tolerance.
    """
    xt = torch.from_numpy(x)
    fixed_iters = min(max_iter, 30)
    weight = model.T.linear.weight()
    z = model.Q(xt)
    u = torch.zeros(len(x), model.config.latent_dim)
    for _ in range(fixed_iters):
        u = model.T.apply_with(weight, u, z)
    torch_fixed = model.S(u).numpy()
    onnx_fixed = engine.classify_fixed(x, fixed_iters).logits
    gap = float(np.abs(onnx_fixed - torch_fixed).max())
    torch_logits, torch_info = model(xt, tol, max_iter)
    onnx_res = engine.classify(x, tol=tol, max_iter=max_iter)  # the single-graph loop where there is one
    three_graph = engine.decode(engine.solve(engine.encode(x), tol, max_iter), tol)
    if not np.array_equal(three_graph.iterations, onnx_res.iterations) or not np.allclose(
        three_graph.logits, onnx_res.logits, rtol=0, atol=LOGIT_ATOL
    ):
        raise ExportError("the single-graph FPN.onnx loop and the three-graph loop disagree")
    disagree = int((torch_logits.argmax(1).numpy() != onnx_res.labels).sum())
    iteration_gap = int(np.abs(onnx_res.iterations - torch_info.iterations.numpy()).max())
    if gap > LOGIT_ATOL or disagree:
        raise ExportError(
            f"ONNX and torch disagree on {len(x)} test images: max logit gap {gap:.3g} after "
            f"{fixed_iters} iterations (allowed {LOGIT_ATOL}), {disagree} labels differ at tol={tol}"
        )
    return {
        "images": len(x),
        "fixed_iterations": fixed_iters,
        "max_logit_gap": gap,
        "label_disagreements": 0,
        "max_iteration_difference_at_default_tol": iteration_gap,
    }


def calibrate(engine: Engine, x: np.ndarray, y: np.ndarray, max_iter: int, batch: int = 1000) -> list[dict[str, Any]]:
    """tol -> mean / p99 iterations, accuracy and converged fraction on (x, y), via fpn_serve."""
    rows = []
    for tol in CALIBRATION_TOLS:
        iters, correct, conv = [], 0, 0
        started = time.perf_counter()
        for i in range(0, len(x), batch):
            res = engine.classify(x[i : i + batch], tol=tol, max_iter=max_iter)
            iters.append(res.iterations)
            correct += int((res.labels == y[i : i + batch]).sum())
            conv += int(res.converged.sum())
        it = np.concatenate(iters)
        rows.append(
            {
                "tol": tol,
                "max_iter": max_iter,
                "images": len(x),
                "mean_iterations": round(float(it.mean()), 3),
                "p99_iterations": int(np.percentile(it, 99)),
                "max_iterations": int(it.max()),
                "accuracy": correct / len(x),
                "converged_fraction": conv / len(x),
                "ms_per_input_batch1000": round(1000 * (time.perf_counter() - started) / len(x), 4),
            }
        )
    return rows


def export(args: argparse.Namespace) -> Path:
    model, cfg, payload = load_checkpoint(args.checkpoint)
    out = Path(args.out)
    name = args.name or out.name
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write into {out.parent}: {exc.strerror or exc}") from exc
    try:
        spec = dataset_spec(cfg.dataset)
        tol = args.tol if args.tol is not None else cfg.tol
        max_iter = args.max_iter if args.max_iter is not None else max(100, cfg.max_iter)
        log.info("exporting %s (%d parameters) to ONNX opset %d", model.config.arch, model.num_parameters(), args.opset)
        roles = write_graphs(model, spec.input_shape, staging, args.opset, loop=args.loop)
        manifest = build_manifest(name, model, cfg, payload, staging, tol, max_iter, args.opset, roles)
        Manifest.from_dict(manifest)  # the serving side must accept what we write
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

        test = load_split(cfg.dataset, Path(args.data_root), train=False, limit=args.calibration_limit)
        x = test.normalise(test.images).numpy()
        y = test.labels.numpy()
        engine = Engine.load(staging, device="cpu")
        parity = check_parity(model, engine, x[: args.parity_images], tol, max_iter)
        log.info("parity: %d images, max logit gap %.2e, all labels agree", parity["images"], parity["max_logit_gap"])
        manifest["parity"] = parity
        manifest["calibration"] = calibrate(engine, x, y, max_iter)
        for row in manifest["calibration"]:
            log.info(
                "tol %-7g mean iterations %6.2f  p99 %3d  accuracy %.2f %%",
                row["tol"],
                row["mean_iterations"],
                row["p99_iterations"],
                100 * row["accuracy"],
            )
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        metrics = Path(args.checkpoint).parent / "metrics.jsonl"
        if metrics.is_file():  # the training history travels with the model
            shutil.copyfile(metrics, staging / "metrics.jsonl")
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fpn-export",
        description="Export an fpn-train checkpoint as Q.onnx, T.onnx, S.onnx and manifest.json, "
        "check them with onnx.checker, compare the ONNX loop with the torch model on real test "
        "images (refusing to finish if they disagree), and record a tolerance calibration table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("checkpoint", help="OUT/checkpoint.pt written by fpn-train")
    p.add_argument("--out", required=True, help="model folder to write, e.g. models/mnist")
    p.add_argument("--name", default=None, help="model name in the manifest (default: the folder's name)")
    p.add_argument("--data-root", default="data", help="dataset folder for the parity check and calibration")
    p.add_argument("--precision", default="fp32", choices=["fp32"], help="numeric precision of the graphs")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset of the graphs")
    p.add_argument(
        "--tol", type=float, default=None, help="default tolerance in the manifest (default: the training tol)"
    )
    p.add_argument(
        "--max-iter",
        type=int,
        default=None,
        help="default iteration cap in the manifest (default: max(100, training max_iter))",
    )
    p.add_argument("--parity-images", type=int, default=512, help="test images compared against torch (at least 256)")
    p.add_argument(
        "--calibration-limit", type=int, default=None, help="calibrate on the first N test images (default: all)"
    )
    p.add_argument(
        "--loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write fpn.onnx: Q, the whole fixed-point loop (ONNX Loop) and S in one graph",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return p


def cli(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.parity_images < 256:
        parser.error(f"--parity-images must be at least 256, got {args.parity_images}")
    if args.tol is not None and not 0 < args.tol <= 1:
        parser.error(f"--tol must satisfy 0 < tol <= 1, got {args.tol}")
    if args.max_iter is not None and args.max_iter < 1:
        parser.error(f"--max-iter must be >= 1, got {args.max_iter}")
    if not 7 <= args.opset <= 23:
        parser.error(f"--opset must be between 7 and 23 (what this ONNX Runtime runs), got {args.opset}")
    if args.calibration_limit is not None and args.calibration_limit < args.parity_images:
        parser.error("--calibration-limit must be at least --parity-images")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("fpn-export", "fpn_serve"):
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        export(args)
    except (ExportError, CheckpointError, DataError, OSError) as exc:
        print(f"fpn-export: error: {exc}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    entry()
