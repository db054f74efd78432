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
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime import __version__ as ort_version
from torch import nn

from fpn_serve import ClassifyResult, Engine, ModelError, __version__
from fpn_serve.contract import FORMAT, RESIDUAL, Manifest, load_manifest, sha256_file

from .calibrate import calibrate, model_card, plot
from .certify import measure_contraction
from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig
from .data import DataError, DatasetSpec, TensorSplit, dataset_spec, load_split
from .fpn import FPN
from .loop_graph import build_loop_model, build_single_loop_model, build_step_model, crop_unread_input
from .precision import PRECISIONS
from .precision import convert as convert_precision

log = logging.getLogger("fpn-export")

LOGIT_ATOL = 1e-4
MIN_OPSET, MAX_OPSET = 18, 23
GRAPH_FILES = {"fpn": "FPN.onnx", "fpn1": "FPN1.onnx"}  # other roles: ROLE.onnx
PRECISION_NOTES = {
    "fp16": "Q, T and S in float16 with float32 inputs and outputs (onnxconverter-common)",
    "int8": "Q with dynamic int8 weights (onnxruntime.quantization); T and S in float32",
}


def graph_file(role: str) -> str:
    return GRAPH_FILES.get(role, f"{role}.onnx")


class ExportError(RuntimeError):
    """The export cannot be completed; nothing was written."""


class _QGraph(nn.Module):
    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.q = model.Q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)


class _TGraph(nn.Module):
    """T with its spectrally normalised weights frozen into constants."""

    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.t = model.T
        with torch.no_grad():
            weights = model.T.weights()
        self.count = len(weights)
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w.detach().clone())

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        weights = tuple(getattr(self, f"w{i}") for i in range(self.count))
        return self.t.apply_for_export(weights, u, z)


class _SGraph(nn.Module):
    def __init__(self, model: FPN) -> None:
        super().__init__()
        self.s = model.S

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.s(u)


def _export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], output: str, path: Path, opset: int
) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    dynamic = {name: {0: batch} for name in names}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                input_names=names,
                output_names=[output],
                dynamic_shapes=dynamic,
                opset_version=opset,
                dynamo=True,
                external_data=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx cannot export {path.stem} at opset {opset}: {str(exc).splitlines()[0]}") from exc


def strip_graph(graph: onnx.GraphProto) -> None:
    """Remove doc strings and node metadata (the exporter's stack traces, with this machine's file
    paths) from a graph and every subgraph inside it, such as a Loop body."""
    graph.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
        for attr in node.attribute:
            if attr.HasField("g"):
                strip_graph(attr.g)
            for sub in attr.graphs:
                strip_graph(sub)


def _finish_graph(path: Path, name: str, role: str, opset: int) -> None:
    """Strip what varies between runs, stamp provenance metadata, and run the full ONNX checker."""
    model = onnx.load(str(path))
    model.doc_string = ""
    strip_graph(model.graph)
    del model.metadata_props[:]
    meta = {"fpn.model": name, "fpn.role": role, "fpn.format": FORMAT, "fpn.opset": str(opset)}
    onnx.helper.set_model_props(model, meta)
    model.producer_name, model.producer_version = "fpn-export", __version__
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def write_graphs(
    model: FPN, input_shape: tuple[int, ...], folder: Path, name: str, opset: int, precision: str, loop: bool
) -> list[str]:
    """Write Q, T, S (in ``precision``), step.onnx and, with ``loop``, FPN.onnx and FPN1.onnx; return the roles."""
    latent = model.config.latent_dim
    x = torch.zeros(2, *input_shape)
    u = torch.zeros(2, latent)
    _export_graph(_QGraph(model), (x,), ["x"], "z", folder / "Q.onnx", opset)
    onnx.save(crop_unread_input(onnx.load(str(folder / "Q.onnx"))), str(folder / "Q.onnx"))
    _export_graph(_TGraph(model), (u, u.clone()), ["u", "z"], "u_next", folder / "T.onnx", opset)
    _export_graph(_SGraph(model), (u,), ["u"], "logits", folder / "S.onnx", opset)
    convert_precision(folder, precision)
    q, t, s = (onnx.load(str(folder / f"{r}.onnx")) for r in ("Q", "T", "S"))
    onnx.save(build_step_model(t), str(folder / "step.onnx"))
    roles = ["Q", "T", "S", "step"]
    if loop:
        onnx.save(build_loop_model(q, t, s), str(folder / graph_file("fpn")))
        onnx.save(build_single_loop_model(q, t, s), str(folder / graph_file("fpn1")))
        roles += ["fpn", "fpn1"]
    for role in roles:
        _finish_graph(folder / graph_file(role), name, role, opset)
    return roles


def stored_spec(cfg: TrainConfig, payload: dict[str, Any]) -> DatasetSpec:
    """The data spec (normalisation, labels) the checkpoint was trained with; older checkpoints
    name only their dataset."""
    saved = payload.get("dataset_spec")
    if not isinstance(saved, dict):
        return dataset_spec(cfg.dataset)
    c, h, w = (int(v) for v in saved["input_shape"])
    return DatasetSpec(
        name=str(saved["name"]),
        input_shape=(c, h, w),
        mean=tuple(float(v) for v in saved["mean"]),
        std=tuple(float(v) for v in saved["std"]),
        labels=tuple(str(v) for v in saved["labels"]),
        scale=float(saved["scale"]),
    )


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
    precision: str,
) -> dict[str, Any]:
    spec = stored_spec(cfg, payload)
    metrics = payload.get("metrics", {})
    return {
        "format": FORMAT,
        "name": name,
        "version": "1",
        "graphs": {
            role: {"file": graph_file(role), "sha256": sha256_file(folder / graph_file(role))} for role in roles
        },
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
            "method": f"architectural bound of {type(model.T).__name__}: gamma times the spectral norms on "
            "T's u-path (each <= 1 by exact spectral normalisation); activations 1-Lipschitz",
        },
        "solver": {"tol": tol, "max_iter": max_iter, "residual": RESIDUAL, "start": "u = 0"},
        "opset": opset,
        "precision": {"name": precision},
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
        "calibration": {},
    }


@torch.no_grad()
def check_parity(model: FPN, engine: Engine, x: np.ndarray, tol: float, max_iter: int) -> dict[str, Any]:
    """Compare the ONNX loop with the torch model; raise ExportError with the size of any gap.

    Logits must agree within LOGIT_ATOL after the same fixed number of iterations (no early exit
    on either side), and labels must agree at the manifest's default tolerance.
    """
    xt = torch.from_numpy(x)
    fixed_iters = min(max_iter, 30)
    weights = model.T.weights()
    z = model.Q(xt)
    u = torch.zeros(len(x), model.config.latent_dim)
    for _ in range(fixed_iters):
        u = model.T.apply_with(weights, u, z)
    torch_fixed = model.S(u).numpy()
    onnx_fixed = engine.classify_fixed(x, fixed_iters).logits
    gap = float(np.abs(onnx_fixed - torch_fixed).max())
    torch_logits, torch_info = model(xt, tol, max_iter)
    onnx_res = engine.classify(x, tol=tol, max_iter=max_iter)  # the single-graph loop where there is one
    problem = compare_single_graphs(engine, x, tol, max_iter)
    if problem:
        raise ExportError(problem)
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


def compare_single_graphs(engine: Engine, x: np.ndarray, tol: float, max_iter: int) -> str | None:
    """Hold the single-graph loops the folder has to the three-graph loop on the same inputs:
    FPN.onnx on all of ``x`` at once, FPN1.onnx on each input alone. Iterations must be equal,
    residuals and error bounds equal within float rounding, logits within LOGIT_ATOL. Return what
    disagrees, or None."""

    def three_graph(xs: np.ndarray) -> ClassifyResult:
        return engine.decode(engine.solve(engine.encode(xs), tol, max_iter), tol)

    runs: dict[str, tuple[list[ClassifyResult], list[ClassifyResult]]] = {}
    if "fpn" in engine.manifest.graphs:  # a batch runs FPN.onnx
        runs["FPN.onnx"] = ([engine.classify(x, tol=tol, max_iter=max_iter)], [three_graph(x)])
    if "fpn1" in engine.manifest.graphs:  # one input runs FPN1.onnx
        alone = [x[i : i + 1] for i in range(len(x))]
        runs["FPN1.onnx"] = (
            [engine.classify(a, tol=tol, max_iter=max_iter) for a in alone],
            [three_graph(a) for a in alone],
        )
    for graph, (single, three) in runs.items():
        for field in ("iterations", "residuals", "error_bounds", "logits"):
            got = np.concatenate([getattr(r, field) for r in single])
            want = np.concatenate([getattr(r, field) for r in three])
            if field == "iterations":
                same = np.array_equal(got, want)
            else:
                same = np.allclose(got, want, rtol=1e-5, atol=LOGIT_ATOL if field == "logits" else 0.0)
            if not same:
                return f"the single-graph {graph} loop and the three-graph loop disagree on {field} at tol={tol:g}"
    return None


def export(args: argparse.Namespace) -> Path:
    model, cfg, payload = load_checkpoint(args.checkpoint)
    if cfg.backprop == "explicit":
        raise ExportError(
            f"{args.checkpoint} is an explicit twin (trained with --backprop explicit): a one-layer baseline, "
            "not a fixed point network, so it has no fixed-point loop to serve"
        )
    out = Path(args.out)
    name = args.name or out.name
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        fp32_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32.", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write into {out.parent}: {exc.strerror or exc}") from exc
    try:
        spec = stored_spec(cfg, payload)
        tol = args.tol if args.tol is not None else cfg.tol
        max_iter = args.max_iter if args.max_iter is not None else max(100, cfg.max_iter)
        test = load_split(cfg.dataset, Path(args.data_root), train=False, limit=args.calibration_limit)
        test = TensorSplit(test.images, test.labels, spec)  # normalised as in training
        x, y = test.normalise(test.images).numpy(), test.labels.numpy()
        log.info("exporting %s (%d parameters) to ONNX opset %d", model.config.arch, model.num_parameters(), args.opset)

        # The float32 graphs first: they must match torch before anything else happens.
        roles = write_graphs(model, spec.input_shape, fp32_dir, name, args.opset, "fp32", args.loop)
        manifest = build_manifest(name, model, cfg, payload, fp32_dir, tol, max_iter, args.opset, roles, "fp32")
        _write_manifest(fp32_dir, manifest)
        fp32 = _load_engine(fp32_dir)
        parity = check_parity(model, fp32, x[: args.parity_images], tol, max_iter)
        log.info("parity: %d images, max logit gap %.2e, all labels agree", parity["images"], parity["max_logit_gap"])

        if args.precision == "fp32":
            shutil.rmtree(staging)
            fp32_dir.rename(staging)
            engine = fp32
        else:
            roles = write_graphs(model, spec.input_shape, staging, name, args.opset, args.precision, args.loop)
            manifest = build_manifest(
                name, model, cfg, payload, staging, tol, max_iter, args.opset, roles, args.precision
            )
            _write_manifest(staging, manifest)
            engine = _load_engine(staging)
            reference = float((fp32.classify(x, tol=tol, max_iter=max_iter).labels == y).mean())
            accuracy = float((engine.classify(x, tol=tol, max_iter=max_iter).labels == y).mean())
            manifest["precision"].update(
                {
                    "converted": PRECISION_NOTES[args.precision],
                    "accuracy": accuracy,
                    "accuracy_fp32": reference,
                    "accuracy_difference": accuracy - reference,
                    "at_tol": tol,
                }
            )
            log.info("%s: accuracy %.2f %% (fp32 %.2f %%)", args.precision, 100 * accuracy, 100 * reference)
        manifest["parity"] = parity

        certificate = measure_contraction(engine, x[: args.certify_images])
        manifest["contraction"]["empirical"] = certificate
        log.info(
            "contraction: bound %.4f, measured %.4f", manifest["contraction"]["gamma"], certificate["measured_factor"]
        )
        if certificate["measured_factor"] >= 1.0 and not args.allow_non_contractive:
            raise ExportError(
                f"the exported T is not a contraction: measured factor {certificate['measured_factor']:.4f} >= 1 "
                "(pass --allow-non-contractive to export it anyway)"
            )

        manifest["calibration"] = calibrate(engine, x, y, max_iter)
        if args.tol is None:
            # A lower precision cannot reach every tolerance (fp16 stalls near 1e-3): default to the
            # tightest calibrated tolerance at or above the training one that still converges.
            ok = [r["tol"] for r in manifest["calibration"]["tolerances"] if r["converged_fraction"] >= 0.99]
            reachable = [t for t in ok if t >= tol]
            if tol not in ok and reachable:
                log.info("default tol %g does not converge at %s; using %g", tol, args.precision, min(reachable))
                manifest["solver"]["tol"] = min(reachable)
        for row in manifest["calibration"]["tolerances"]:
            log.info(
                "tol %-7g mean iterations %6.2f  p99 %3d  accuracy %.2f %%  %.0f us at batch 1",
                row["tol"],
                row["mean_iterations"],
                row["p99_iterations"],
                100 * row["accuracy"],
                row["latency_us_batch1"],
            )
        _write_manifest(staging, manifest)
        plot(manifest["calibration"], f"{name} ({manifest['precision']['name']})", staging / "calibration.png")
        model_card(manifest, staging / "README.md")
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
    finally:
        shutil.rmtree(fp32_dir, ignore_errors=True)
    log.info("wrote %s", out)
    return out


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    Manifest.from_dict(manifest)  # the serving side must accept what we write
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _load_engine(folder: Path) -> Engine:
    try:
        return Engine.load(folder, device="cpu")
    except ModelError as exc:
        raise ExportError(f"ONNX Runtime cannot run the exported graphs: {exc}") from exc


def verify(folder: Path, checkpoint: str | None, data_root: Path, parity_images: int) -> list[str]:
    """Re-check a model folder; return the problems found (empty when it is sound)."""
    problems: list[str] = []
    try:
        manifest = load_manifest(folder)  # format, fields, sha256 of every graph
    except ModelError as exc:
        return [str(exc)]
    log.info("manifest and sha256 of %d graphs: ok", len(manifest.graphs))
    for role, ref in manifest.graphs.items():
        try:
            graph = onnx.load(str(folder / ref.file))
            onnx.checker.check_model(graph, full_check=True)
        except Exception as exc:
            problems.append(f"{ref.file}: onnx.checker: {str(exc).splitlines()[0]}")
            continue
        meta = {p.key: p.value for p in graph.metadata_props}
        if meta.get("fpn.role", role) != role or meta.get("fpn.model", manifest.name) != manifest.name:
            problems.append(
                f"{ref.file}: its metadata says role {meta.get('fpn.role')!r} of model "
                f"{meta.get('fpn.model')!r}; the manifest says role {role!r} of {manifest.name!r}"
            )
    try:
        engine = Engine.load(folder, device="cpu")  # I/O names, shapes, a first run
    except ModelError as exc:
        return [*problems, str(exc)]
    log.info("onnx.checker, metadata, ONNX Runtime signatures: %s", "ok" if not problems else "see below")
    x = np.random.default_rng(0).standard_normal((64, *manifest.input.shape)).astype(np.float32)
    problem = compare_single_graphs(engine, x, 1e-4, manifest.solver.max_iter)
    if problem:
        problems.append(problem)
    if checkpoint is not None:
        try:
            model, cfg, _ = load_checkpoint(checkpoint)
            test = load_split(cfg.dataset, data_root, train=False, limit=parity_images)
            xt = test.normalise(test.images).numpy()
            if manifest.precision_name == "fp32":
                parity = check_parity(model, engine, xt, manifest.solver.tol, manifest.solver.max_iter)
                log.info("parity with %s: max logit gap %.2e", checkpoint, parity["max_logit_gap"])
            else:
                log.info("parity with torch skipped: the graphs are %s", manifest.precision_name)
        except (ExportError, CheckpointError, DataError) as exc:
            problems.append(str(exc))
    return problems


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fpn-export",
        description="Export an fpn-train checkpoint as Q.onnx, T.onnx, S.onnx and manifest.json, "
        "check them with onnx.checker, compare the ONNX loop with the torch model on real test "
        "images (refusing to finish if they disagree), and record a tolerance calibration table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("checkpoint", nargs="?", help="OUT/checkpoint.pt written by fpn-train")
    p.add_argument("--out", help="model folder to write, e.g. models/mnist")
    p.add_argument(
        "--verify",
        metavar="MODEL_DIR",
        help="re-check a model folder (checker, sha256, metadata, shapes; parity when CHECKPOINT is given)",
    )
    p.add_argument("--name", default=None, help="model name in the manifest (default: the folder's name)")
    p.add_argument("--data-root", default="data", help="dataset folder for the parity check and calibration")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="numeric precision of the graphs")
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
        help="also write FPN.onnx (Q, the whole fixed-point loop as an ONNX Loop, and S in one graph) and "
        "FPN1.onnx (the same for one input, with a lean loop body)",
    )
    p.add_argument("--certify-images", type=int, default=256, help="test images for the empirical contraction check")
    p.add_argument(
        "--allow-non-contractive",
        action="store_true",
        help="export even if the measured contraction factor of T is >= 1",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    return p


def cli(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.verify is None and (args.checkpoint is None or args.out is None):
        parser.error("give a CHECKPOINT and --out MODEL_DIR to export, or --verify MODEL_DIR to check a folder")
    if args.parity_images < 256:
        parser.error(f"--parity-images must be at least 256, got {args.parity_images}")
    if args.tol is not None and not 0 < args.tol <= 1:
        parser.error(f"--tol must satisfy 0 < tol <= 1, got {args.tol}")
    if args.max_iter is not None and args.max_iter < 1:
        parser.error(f"--max-iter must be >= 1, got {args.max_iter}")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        parser.error(
            f"--opset {args.opset} is not supported: fpn-export writes opsets {MIN_OPSET} to {MAX_OPSET} "
            f"(the torch exporter needs >= {MIN_OPSET}; ONNX Runtime {ort_version} runs up to {MAX_OPSET})"
        )
    if args.calibration_limit is not None and args.calibration_limit < args.parity_images:
        parser.error("--calibration-limit must be at least --parity-images")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("fpn-export", "fpn_serve"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.verify is not None:
        problems = verify(Path(args.verify), args.checkpoint, Path(args.data_root), args.parity_images)
        for problem in problems:
            print(f"fpn-export: {args.verify}: {problem}", file=sys.stderr)
        if not problems:
            log.info("%s: every check passed", args.verify)
        return 1 if problems else 0
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
