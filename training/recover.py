"""A checkpoint recovered from an exported fp32 model folder, for a run whose checkpoint is lost.

The float32 graphs hold every weight of the network: ``Q.onnx`` and ``S.onnx`` are the torch
modules' parameters as initializers (in their order), and ``T.onnx`` of a single-matrix latent is
``u (gamma W)' + z W'``, so ``W'`` is the initializer multiplied with ``z``. The manifest's
``provenance`` holds the model and training configs. ``recover`` rebuilds the ``FPN`` from these,
sets each parameter to its initializer's float32 values, and checks what makes the recovery exact:

- every initializer has the shape of the parameter it fills, and no parameter is left over;
- T's stored ``raw`` is ``W`` itself, so ``SpectrallyBoundedLinear.weight()`` must give back ``W``
  to the bit: its float32 spectral norm must not exceed 1 (else the rescaling would change it, and
  the folder is refused rather than recovered approximately); and ``gamma W`` of the graph must be
  torch's ``gamma * W``;
- the rebuilt Q, T and S answer as ONNX Runtime's run of the graphs on random inputs.

``write_recovered`` saves the result with ``save_checkpoint``: the weights, the configs, the
epoch and its metrics row (from ``metrics.jsonl``) and the data spec, and ``recovered_from``
naming the folder and the sha256 of its Q, T and S. It holds no optimiser, scheduler or random
state, so ``fpn-train --resume`` refuses to continue it. ``fpn-export --recover-checkpoint
MODEL_DIR --out FILE`` runs it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from fpn_serve import ModelError
from fpn_serve.contract import load_manifest

from .architectures import _OneMatrixLatent
from .checkpoint import save_checkpoint
from .config import ModelConfig, TrainConfig, model_config_from_dict, train_config_from_dict
from .errors import CheckpointError, ConfigError
from .fpn import FPN

__all__ = ["RECOVERED_FROM", "recover", "write_recovered"]

RECOVERED_FROM = "recovered_from"  # the checkpoint key naming the folder it was recovered from
CHECK_ATOL = 1e-4  # the functional check's tolerance (the exporter's parity tolerance on logits)


def _float_initializers(graph: onnx.GraphProto) -> list[tuple[str, np.ndarray]]:
    """The float32 initializers in graph order (int64 shapes and slice bounds left out), as writable copies."""
    return [
        (init.name, np.array(numpy_helper.to_array(init), copy=True))
        for init in graph.initializer
        if init.data_type == onnx.TensorProto.FLOAT
    ]


def _fill(module: torch.nn.Module, arrays: list[tuple[str, np.ndarray]], graph: str, folder: Path) -> None:
    """Set ``module``'s parameters, in order, to ``arrays``: the same count and each the same shape."""
    state = module.state_dict()
    params = dict(module.named_parameters())
    buffers = [name for name in state if name not in params]
    if buffers:
        raise CheckpointError(
            f"{folder}: {graph} has buffers ({', '.join(buffers[:3])}...) that the exporter folds into its "
            "graph; recovery maps parameters only"
        )
    if len(arrays) != len(params):
        raise CheckpointError(
            f"{folder}: {graph} has {len(arrays)} float initializers, the architecture {len(params)} parameters"
        )
    for (key, param), (init, array) in zip(params.items(), arrays, strict=True):
        if tuple(array.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{folder}: {graph}'s initializer {init} has shape {list(array.shape)}, "
                f"the parameter {key} {list(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(torch.from_numpy(array))


def _latent_matrix(t: onnx.ModelProto, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(W, gamma W)`` from T.onnx ``ReLU(u (gamma W)' + z W')`` (or ``ReLU(u) (gamma W)' + z W'``)."""
    inits = dict(_float_initializers(t.graph))
    z_name = t.graph.input[1].name if len(t.graph.input) == 2 else None
    on_z = [n.input[1] for n in t.graph.node if n.op_type == "MatMul" and n.input[0] == z_name and n.input[1] in inits]
    others = [name for name in inits if name not in on_z]
    if len(inits) != 2 or len(on_z) != 1 or len(others) != 1:
        raise CheckpointError(
            f"{folder}: T.onnx is not a single-matrix latent u (gamma W)' + z W' "
            f"({len(inits)} float initializers, {len(on_z)} multiplied with z)"
        )
    return inits[on_z[0]].T.copy(), inits[others[0]].T.copy()


def _configs(document: dict[str, Any], folder: Path) -> tuple[ModelConfig, TrainConfig]:
    """The manifest's provenance configs. A training config written before TrainConfig had the model
    settings (arch, gamma, latent_dim, dropout) takes them from the model config that was built."""
    provenance = document.get("provenance")
    if not isinstance(provenance, dict) or not all(
        isinstance(provenance.get(k), dict) for k in ("model_config", "train_config")
    ):
        raise CheckpointError(f"{folder}: the manifest's provenance has no model_config and train_config")
    try:
        model_cfg = model_config_from_dict(provenance["model_config"])
        train = dict(provenance["train_config"])
        for key in ("arch", "gamma", "latent_dim", "dropout"):
            if key not in train:
                train[key] = getattr(model_cfg, key)
        return model_cfg, train_config_from_dict(train)
    except (TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{folder}: the manifest's provenance does not give a config: {exc}") from exc


def _check_against_graphs(model: FPN, folder: Path, document: dict[str, Any]) -> None:
    """Q, T and S of ``model`` answer as ONNX Runtime runs the folder's graphs, on random inputs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, *document["input"]["shape"])).astype(np.float32)
    u = np.abs(rng.standard_normal((4, *document["latent_shape"]))).astype(np.float32)
    z = np.abs(rng.standard_normal(u.shape)).astype(np.float32)

    def session(role: str) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        path = folder / document["graphs"][role]["file"]
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    with torch.no_grad():
        weights = model.T.weights()
        expected = {
            "Q": (session("Q").run(None, {"x": x})[0], model.Q(torch.from_numpy(x))),
            "T": (
                session("T").run(None, {"u": u, "z": z})[0],
                model.T.apply_for_export(weights, torch.from_numpy(u), torch.from_numpy(z)),
            ),
            "S": (session("S").run(None, {"u": u})[0], model.S(torch.from_numpy(u))),
        }
    for role, (onnx_out, torch_out) in expected.items():
        gap = float(np.max(np.abs(onnx_out - torch_out.numpy())))
        if not gap <= CHECK_ATOL:
            raise CheckpointError(
                f"{folder}: the recovered {role} differs from {role}.onnx by {gap:.3g} (> {CHECK_ATOL:g}); "
                "the graph's weights do not map onto the architecture's parameters"
            )


def _metrics_row(folder: Path, epoch: Any, provenance: dict[str, Any]) -> dict[str, Any]:
    """The metrics row of the checkpoint's epoch from the folder's metrics.jsonl; else its test accuracy."""
    history = folder / "metrics.jsonl"
    if history.is_file():
        for line in reversed(history.read_text().splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("epoch") == epoch:
                return row
    accuracy = provenance.get("checkpoint_test_accuracy")
    return {} if accuracy is None else {"test_accuracy": accuracy}


def recover(folder: Path | str) -> tuple[FPN, TrainConfig, dict[str, Any]]:
    """The model of an fp32 model folder, its training config and the checkpoint's extra keys;
    raise CheckpointError with a clear message for a folder it cannot recover to the bit."""
    folder = Path(folder)
    try:
        load_manifest(folder)  # format, fields, and the sha256 of every graph
        document: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    except (ModelError, OSError, ValueError) as exc:
        raise CheckpointError(str(exc)) from exc
    precision = document.get("precision", {}).get("name", "fp32")
    if precision != "fp32":
        raise CheckpointError(
            f"{folder} holds {precision} graphs, whose weights are not the network's; recover from an fp32 folder"
        )
    model_cfg, train_cfg = _configs(document, folder)
    try:
        model = FPN(model_cfg)
    except ValueError as exc:
        raise CheckpointError(f"{folder}: the manifest's model config does not build a model: {exc}") from exc
    if not isinstance(model.T, _OneMatrixLatent):
        raise CheckpointError(
            f"{folder}: {model_cfg.arch}'s latent {type(model.T).__name__} cannot be recovered from T.onnx; "
            "recovery maps the single-matrix latents (ContractiveReLULatent, LinearOfReLULatent)"
        )
    graphs = {}
    for role in ("Q", "T", "S"):
        try:
            graphs[role] = onnx.load(str(folder / document["graphs"][role]["file"]))
        except Exception as exc:
            raise CheckpointError(f"{folder}: {role}.onnx cannot be read: {exc}") from exc

    _fill(model.Q, _float_initializers(graphs["Q"].graph), "Q.onnx", folder)
    _fill(model.S, _float_initializers(graphs["S"].graph), "S.onnx", folder)
    w, gamma_w = _latent_matrix(graphs["T"], folder)
    linear = model.T.linear
    if tuple(w.shape) != tuple(linear.raw.shape):
        raise CheckpointError(f"{folder}: T.onnx's W has shape {list(w.shape)}, the latent {list(linear.raw.shape)}")
    w_t = torch.from_numpy(w)
    if not torch.equal(torch.from_numpy(gamma_w), model.T.gamma * w_t):
        raise CheckpointError(f"{folder}: T.onnx's gamma W is not gamma = {model.T.gamma} times its W")
    sigma = float(torch.linalg.matrix_norm(w_t, ord=2))
    with torch.no_grad():
        linear.raw.copy_(w_t)  # raw = W: weight() = raw / max(1, ||raw||_2) is W when ||W||_2 <= 1
        if not torch.equal(linear.weight(), w_t):
            raise CheckpointError(
                f"{folder}: T's W has spectral norm {sigma!r} > 1 in float32, so SpectrallyBoundedLinear would "
                "rescale it; no stored raw gives back W to the bit"
            )
    model.eval()
    provenance = document["provenance"]
    if provenance.get("parameters") not in (None, model.num_parameters()):
        raise CheckpointError(
            f"{folder}: the manifest says {provenance['parameters']} parameters, the model has {model.num_parameters()}"
        )
    _check_against_graphs(model, folder, document)

    shas = " ".join(f"{role}={document['graphs'][role]['sha256']}" for role in ("Q", "T", "S"))
    epoch = provenance.get("epochs")
    c, h, wd = (int(v) for v in document["input"]["shape"])
    extra: dict[str, Any] = {
        RECOVERED_FROM: f"{document['name']} {shas}",
        "epoch": epoch,
        "metrics": _metrics_row(folder, epoch, provenance),
        "dataset_spec": {
            "name": str(provenance.get("dataset", train_cfg.dataset)),
            "input_shape": (c, h, wd),
            "mean": tuple(float(v) for v in document["input"]["mean"]),
            "std": tuple(float(v) for v in document["input"]["std"]),
            "labels": tuple(str(v) for v in document["labels"]),
            "scale": float(document["input"]["scale"]),
        },
    }
    return model, train_cfg, extra


def write_recovered(folder: Path | str, out: Path | str, *, force: bool = False) -> tuple[FPN, dict[str, Any]]:
    """Recover the checkpoint of ``folder`` and save it as ``out`` (refusing to replace a file unless ``force``)."""
    out = Path(out)
    if out.is_dir():
        raise CheckpointError(f"{out} is a folder; give the checkpoint's file name, e.g. {out / 'checkpoint.pt'}")
    if out.exists() and not force:
        raise CheckpointError(f"{out} exists; pass --force to replace it")
    model, cfg, extra = recover(folder)
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise CheckpointError(f"cannot write {out}: {out.parent} is not a writable folder")
    save_checkpoint(out, model, cfg, extra)
    return model, extra
