"""``fpn-export``: turn a checkpoint into a served model folder (Q.onnx, T.onnx, S.onnx, manifest.json).

The export checks itself: ``onnx.checker`` on every graph, then the folder is loaded by
``fpn_serve.Engine`` (the serving code, not torch) and compared with the torch model on real test
images, and calibrated over a grid of tolerances. ``export`` runs these as named steps on one
``ExportJob``: load the checkpoint, write the float32 graphs and check their parity with torch,
convert to the requested precision, certify the contraction, calibrate, and write the folder's
documents. Everything is written into a temporary sibling folder (``staging_folder``) that is
moved into place only when every step passed, and removed otherwise, so a failed export leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime import __version__ as ort_version

from fpn_serve import Engine, ModelError, __version__
from fpn_serve.contract import load_manifest

from .calibrate import calibrate, model_card, plot
from .certify import measure_contraction
from .checkpoint import CheckpointError, load_checkpoint
from .config import TrainConfig
from .data import DataError, TensorSplit, load_split
from .derive import DERIVABLE, derive_folder, normalised, source_manifest
from .export_graphs import GRAPH_FILES, ExportError, finish_graph, graph_file, strip_graph, write_graphs
from .export_manifest import DARK_BACKGROUND, build_manifest, dark_background, stored_spec, write_manifest
from .fpn import FPN
from .label_certificate import label_certificate
from .ort_format import write_ort
from .parity import check_parity, compare_single_graphs, measure_parity
from .precision import PRECISIONS, calibration_sample
from .recover import RECOVERED_FROM, write_recovered

__all__ = [
    "DARK_BACKGROUND",
    "GRAPH_FILES",
    "LOGIT_ATOL",
    "ExportError",
    "ExportJob",
    "build_manifest",
    "check_parity",
    "cli",
    "compare_single_graphs",
    "dark_background",
    "export",
    "finish_graph",
    "graph_file",
    "measure_parity",
    "staging_folder",
    "stored_spec",
    "strip_graph",
    "verify",
    "write_graphs",
]

log = logging.getLogger("fpn-export")

LOGIT_ATOL = 1e-4  # read when the checks run, so a test may tighten it
MIN_OPSET, MAX_OPSET = 18, 23
PRECISION_NOTES = {
    "fp16": "Q, T and S in float16 with float32 inputs and outputs (onnxconverter-common)",
    "int8": "Q with dynamic int8 weights (onnxruntime.quantization); T and S in float32",
    "int8-static": "Q statically quantized (QOperator: uint8 activations calibrated on training images, "
    "per-channel 7-bit int8 weights; first convolution in float32); T and S in float32",
}


@contextlib.contextmanager
def scratch_folder(out: Path, label: str = "") -> Iterator[Path]:
    """A temporary folder beside ``out``, removed on leaving, whatever happened."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{label}", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"cannot write into {out.parent}: {exc.strerror or exc}") from exc
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write the model into: moved into place (replacing ``out``)
    when the block finishes, removed when it raises."""
    with scratch_folder(out) as staging:
        yield staging
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)


@dataclass
class ExportJob:
    """One export's inputs and what its steps have found so far."""

    args: argparse.Namespace
    model: FPN
    cfg: TrainConfig
    payload: dict[str, Any]
    out: Path
    name: str
    tol: float
    max_iter: int
    x: np.ndarray  # normalised test inputs [n, *input_shape]
    y: np.ndarray  # their labels [n]
    manifest: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return stored_spec(self.cfg, self.payload).input_shape

    def calibration_set(self) -> tuple[np.ndarray, np.ndarray, str]:
        """The images the calibration table is measured on, and their name: the training images
        that training held out (``--limit-train N`` keeps images N.. of the training split unseen),
        so that the table, and the accuracy targets chosen from it, use images seen neither in
        training nor in the reported test figure; without such images, the test images."""
        limit = self.cfg.limit_train
        if limit is not None:
            train = load_split(self.cfg.dataset, Path(self.args.data_root), train=True)
            if len(train.labels) > limit:
                end = len(train.labels) if self.args.calibration_limit is None else limit + self.args.calibration_limit
                held = TensorSplit(
                    train.images[limit:end], train.labels[limit:end], stored_spec(self.cfg, self.payload)
                )
                name = f"held-out training images {limit}-{limit + len(held.labels) - 1} (never trained on)"
                return held.normalise(held.images).numpy(), held.labels.numpy(), name
        return self.x, self.y, "test"

    def quantization_inputs(self) -> np.ndarray:
        """The training images a static quantization measures its activation ranges on."""
        train = load_split(self.cfg.dataset, Path(self.args.data_root), train=True, limit=self.cfg.limit_train)
        train = TensorSplit(train.images, train.labels, stored_spec(self.cfg, self.payload))
        return calibration_sample(train.normalise(train.images).numpy(), self.args.quantization_images)


def load_job(args: argparse.Namespace) -> ExportJob:
    """Step 1: the checkpoint, the output folder's name, the defaults and the test inputs."""
    model, cfg, payload = load_checkpoint(args.checkpoint)
    if cfg.backprop == "explicit":
        raise ExportError(
            f"{args.checkpoint} is an explicit twin (trained with --backprop explicit): a one-layer baseline, "
            "not a fixed point network, so it has no fixed-point loop to serve"
        )
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
    if out.is_dir() and Path(args.checkpoint).resolve().is_relative_to(out.resolve()):
        raise ExportError(
            f"{out} holds the checkpoint {args.checkpoint}, which replacing the folder would delete; "
            "export into another folder"
        )
    test = load_split(cfg.dataset, Path(args.data_root), train=False, limit=args.calibration_limit)
    test = TensorSplit(test.images, test.labels, stored_spec(cfg, payload))  # normalised as in training
    return ExportJob(
        args=args,
        model=model,
        cfg=cfg,
        payload=payload,
        out=out,
        name=args.name or out.name,
        tol=args.tol if args.tol is not None else cfg.tol,
        max_iter=args.max_iter if args.max_iter is not None else max(100, cfg.max_iter),
        x=test.normalise(test.images).numpy(),
        y=test.labels.numpy(),
    )


def write_model(job: ExportJob, folder: Path, precision: str) -> Engine:
    """Write the graphs in ``precision`` and their manifest into ``folder``; the engine that serves them."""
    args = job.args
    calibration = job.quantization_inputs() if precision == "int8-static" else None
    roles = write_graphs(job.model, job.input_shape, folder, job.name, args.opset, precision, args.loop, calibration)
    job.manifest = build_manifest(
        job.name, job.model, job.cfg, job.payload, folder, job.tol, job.max_iter, args.opset, roles, precision
    )
    write_manifest(folder, job.manifest)
    return _load_engine(folder)


def check_fp32(job: ExportJob, folder: Path) -> Engine:
    """Step 2: the float32 graphs, which must match torch before anything else happens."""
    log.info(
        "exporting %s (%d parameters) to ONNX opset %d",
        job.model.config.arch,
        job.model.num_parameters(),
        job.args.opset,
    )
    engine = write_model(job, folder, "fp32")
    x = job.x[: job.args.parity_images]
    job.parity = check_parity(job.model, engine, x, job.tol, job.max_iter, atol=LOGIT_ATOL)
    log.info(
        "parity: %d images, max logit gap %.2e, %d labels differ",
        job.parity["images"],
        job.parity["max_logit_gap"],
        job.parity["label_disagreements"],
    )
    return engine


def convert(job: ExportJob, fp32: Engine, folder: Path) -> Engine:
    """Step 3 (fp16, int8): the graphs in the lower precision, and the accuracy that costs."""
    precision = job.args.precision
    engine = write_model(job, folder, precision)
    reference = float((fp32.classify(job.x, tol=job.tol, max_iter=job.max_iter).labels == job.y).mean())
    accuracy = float((engine.classify(job.x, tol=job.tol, max_iter=job.max_iter).labels == job.y).mean())
    job.manifest["precision"].update(
        {
            "converted": PRECISION_NOTES[precision],
            "accuracy": accuracy,
            "accuracy_fp32": reference,
            "accuracy_difference": accuracy - reference,
            "at_tol": job.tol,
        }
    )
    log.info("%s: accuracy %.2f %% (fp32 %.2f %%)", precision, 100 * accuracy, 100 * reference)
    return engine


def certify(job: ExportJob, engine: Engine) -> Engine:
    """Step 4: measure T's contraction factor at the data, refusing an expanding T unless allowed;
    write S's label certificate where S is affine. Returns the engine of the certified folder."""
    certificate = measure_contraction(engine, job.x[: job.args.certify_images])
    job.manifest["contraction"]["empirical"] = certificate
    labels = label_certificate(onnx.load(str(engine.model_dir / "S.onnx")))
    if labels is not None:  # S is affine: labels can be certified (fpn_serve's stop=certified)
        job.manifest["certificate"] = labels
    factor = certificate["measured_factor"]
    log.info("contraction: bound %.4f, measured %.4f", job.manifest["contraction"]["gamma"], factor)
    if factor >= 1.0 and not job.args.allow_non_contractive:
        raise ExportError(
            f"the exported T is not a contraction: measured factor {factor:.4f} >= 1 "
            "(pass --allow-non-contractive to export it anyway)"
        )
    write_manifest(engine.model_dir, job.manifest)
    return _load_engine(engine.model_dir)


def calibrate_tolerances(job: ExportJob, engine: Engine) -> None:
    """Step 5: the calibration table, and a default tol the precision can reach."""
    manifest = job.manifest
    x, y, split = job.calibration_set()
    manifest["calibration"] = calibrate(engine, x, y, job.max_iter, split=split)
    if job.args.tol is None:
        # A lower precision cannot reach every tolerance (fp16 stalls near 1e-3): default to the
        # tightest calibrated tolerance at or above the training one that still converges.
        ok = [r["tol"] for r in manifest["calibration"]["tolerances"] if r["converged_fraction"] >= 0.99]
        reachable = [t for t in ok if t >= job.tol]
        if job.tol not in ok and reachable:
            log.info("default tol %g does not converge at %s; using %g", job.tol, job.args.precision, min(reachable))
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


def write_documents(job: ExportJob, folder: Path) -> None:
    """Step 6: the final manifest, calibration.png, the model card and the training history."""
    write_manifest(folder, job.manifest)
    title = f"{job.name} ({job.manifest['precision']['name']})"
    plot(job.manifest["calibration"], title, folder / "calibration.png")
    model_card(job.manifest, folder / "README.md")
    metrics = Path(job.args.checkpoint).parent / "metrics.jsonl"
    if metrics.is_file():  # the training history travels with the model
        shutil.copyfile(metrics, folder / "metrics.jsonl")


def export(args: argparse.Namespace) -> Path:
    """Run every step of the export (see the module doc); return the model folder written."""
    job = load_job(args)
    with staging_folder(job.out) as staging, contextlib.ExitStack() as stack:
        fp32_dir = staging if args.precision == "fp32" else stack.enter_context(scratch_folder(job.out, "fp32."))
        engine = fp32 = check_fp32(job, fp32_dir)
        if args.precision != "fp32":
            engine = convert(job, fp32, staging)
        job.manifest["parity"] = job.parity
        engine = certify(job, engine)
        calibrate_tolerances(job, engine)
        write_documents(job, staging)
        if args.ort:
            job.manifest["ort"] = write_ort(staging)
            write_manifest(staging, job.manifest)
    log.info("wrote %s", job.out)
    return job.out


def export_from_model(args: argparse.Namespace) -> Path:
    """``--from-model``: the ``args.precision`` variant of an exported fp32 folder, from its own graphs
    (``training.derive``): Q quantized with ranges measured on the dataset's training images, the
    accuracy against the source on the test images and the calibration table through ``fpn_serve``."""
    src, out = Path(args.from_model), Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ExportError(f"{out} exists and is not empty; pass --force to replace it")
    try:
        document = source_manifest(src)
    except (ModelError, ValueError) as exc:
        raise ExportError(str(exc)) from exc
    dataset, root = document["provenance"]["dataset"], Path(args.data_root)
    train = load_split(dataset, root, train=True)
    calibration = calibration_sample(normalised(train.images.numpy(), document), args.quantization_images)
    test = load_split(dataset, root, train=False, limit=args.calibration_limit)
    x, y = normalised(test.images.numpy(), document), test.labels.numpy()
    with staging_folder(out) as staging:
        manifest = derive_folder(src, staging, args.name or out.name, args.precision, calibration)
        engine, reference = _load_engine(staging), _load_engine(src)
        tol, max_iter = manifest["solver"]["tol"], manifest["solver"]["max_iter"]
        accuracy = float((engine.classify(x, tol=tol, max_iter=max_iter).labels == y).mean())
        accuracy_fp32 = float((reference.classify(x, tol=tol, max_iter=max_iter).labels == y).mean())
        manifest["precision"].update(
            {
                "converted": PRECISION_NOTES[args.precision],
                "calibration_images": len(calibration),
                "accuracy": accuracy,
                "accuracy_fp32": accuracy_fp32,
                "accuracy_difference": accuracy - accuracy_fp32,
                "at_tol": tol,
                "test_images": len(y),
            }
        )
        log.info("%s: accuracy %.2f %% (fp32 %.2f %%)", args.precision, 100 * accuracy, 100 * accuracy_fp32)
        manifest["calibration"] = calibrate(engine, x, y, max_iter, split="test")
        write_manifest(staging, manifest)
        plot(manifest["calibration"], f"{manifest['name']} ({args.precision})", staging / "calibration.png")
        model_card(manifest, staging / "README.md")
        if args.ort:
            manifest["ort"] = write_ort(staging)
            write_manifest(staging, manifest)
    log.info("wrote %s", out)
    return out


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
    problem = compare_single_graphs(engine, x, manifest.solver.tol, manifest.solver.max_iter, atol=LOGIT_ATOL)
    if problem:
        problems.append(problem)
    if checkpoint is not None:
        try:
            model, cfg, _ = load_checkpoint(checkpoint)
            test = load_split(cfg.dataset, data_root, train=False, limit=parity_images)
            xt = test.normalise(test.images).numpy()
            if manifest.precision_name == "fp32":
                parity = check_parity(model, engine, xt, manifest.solver.tol, manifest.solver.max_iter, atol=LOGIT_ATOL)
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
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="numeric precision of the graphs: fp16 (every graph), int8 (Q with dynamic int8 weights; "
        "slower than fp32 on CPUs), int8-static (Q quantized statically, calibrated on training images; "
        "the fast int8 on CPUs); T and S stay float32 in the int8 variants",
    )
    p.add_argument(
        "--from-model",
        metavar="MODEL_DIR",
        help="instead of a checkpoint, derive the --precision variant (int8 or int8-static) of an exported "
        "fp32 folder from its own graphs, e.g. models/mnist -> models/mnist-int8",
    )
    p.add_argument(
        "--recover-checkpoint",
        metavar="MODEL_DIR",
        help="instead of exporting, write the checkpoint (--out FILE) of an exported fp32 folder from its own "
        "graphs: the weights to the bit and the manifest's configs, without optimiser state (see training.recover)",
    )
    p.add_argument("--quantization-images", type=int, default=1024, help="training images that calibrate int8-static")
    p.add_argument(
        "--ort",
        action="store_true",
        help="also write every graph in ONNX Runtime's ORT format (X.ort beside X.onnx) and "
        "required_operators.config for a reduced (mobile) ONNX Runtime build; each is checked against its .onnx",
    )
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
    if args.recover_checkpoint is not None:
        if args.out is None or args.checkpoint is not None or args.from_model is not None or args.verify is not None:
            parser.error("--recover-checkpoint MODEL_DIR takes --out FILE (and --force) only")
        try:
            _, extra = write_recovered(args.recover_checkpoint, args.out, force=args.force)
        except (CheckpointError, OSError) as exc:
            print(f"fpn-export: error: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}: the weights of {extra[RECOVERED_FROM]}")
        return 0
    one_source = (args.checkpoint is None) != (args.from_model is None)
    if args.verify is None and (args.out is None or not one_source):
        parser.error(
            "give a CHECKPOINT (or --from-model MODEL_DIR) and --out MODEL_DIR to export, "
            "or --verify MODEL_DIR to check a folder, or --recover-checkpoint MODEL_DIR --out FILE"
        )
    if args.from_model is not None and args.precision not in DERIVABLE:
        parser.error(f"--from-model derives {' or '.join(DERIVABLE)}, not --precision {args.precision}")
    if args.quantization_images < 1:
        parser.error(f"--quantization-images must be >= 1, got {args.quantization_images}")
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
        export(args) if args.from_model is None else export_from_model(args)
    except (ExportError, CheckpointError, DataError, OSError) as exc:
        print(f"fpn-export: error: {exc}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    entry()
