"""The model folder contract: ``manifest.json`` parsed into frozen dataclasses and validated.

A model folder holds ``Q.onnx`` (x -> z), ``T.onnx`` (u, z -> u_next), ``S.onnx`` (u -> logits)
and ``manifest.json``. ``training/`` writes it, this module is the only reader, and outside tools
may read its core fields (see the README).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

FORMAT = "fpn-onnx/1"
ROLES = ("Q", "T", "S")
# Optional graphs a model folder may add; the engine uses them when present.
#   step: inputs u, z -> outputs u_next, residual [batch], step_norm [batch]: T with the residual
#         fused in, so that one run per iteration is all the loop needs.
#   steps: inputs u, z, tol, max_iter, iterations [batch] -> outputs u_next, residual, step_norm,
#         iterations_next: k applications of T with each row's stopping rule inside (a row stops
#         moving once its residual is <= its tol or its count reaches its max_iter), so that the
#         loop's host work and syncs come once per k iterations.
#   fpn:  inputs x, tol, max_iter -> outputs logits, iterations, residual, step_norm: Q, the whole
#         fixed-point iteration (an ONNX Loop with per-sample freezing) and S in one graph.
#   fpn1: the same for exactly one input (batch axis fixed at 1): a Loop whose body is only T, the
#         residual and the stopping test, for the lowest latency on single requests.
OPTIONAL_ROLES = ("step", "steps", "fpn", "fpn1")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class GraphRef:
    file: str
    sha256: str


@dataclass(frozen=True)
class InputSpec:
    """How a raw pixel p becomes the model's input: ``x = (p * scale - mean[c]) / std[c]``."""

    shape: tuple[int, ...]  # without the batch axis, e.g. (1, 28, 28)
    dtype: str
    layout: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Light strokes on a dark background (MNIST-like): an image whose border is mostly light is
    # inverted before normalising, so dark ink on white paper reads the same. False for natural
    # images (SVHN, CIFAR-10), which are never inverted. The exporter writes it per dataset.
    dark_background: bool = False


@dataclass(frozen=True)
class Contraction:
    gamma: float
    method: str


@dataclass(frozen=True)
class SolverDefaults:
    tol: float
    max_iter: int
    residual: str


@dataclass(frozen=True)
class Certificate:
    """What certifies a label: ``pair_lipschitz[i][j]`` bounds how far the logit difference
    ``l_i - l_j`` can move per unit of ||u - u'||_2 (for an affine S, ``||s_i - s_j||_2``, the
    norm of the difference of two rows of its weight matrix)."""

    method: str
    pair_lipschitz: tuple[tuple[float, ...], ...]  # [classes, classes], symmetric, zero diagonal


@dataclass(frozen=True)
class Manifest:
    name: str
    graphs: dict[str, GraphRef]
    input: InputSpec
    latent_shape: tuple[int, ...]
    labels: tuple[str, ...]
    contraction: Contraction
    solver: SolverDefaults
    format: str = FORMAT
    version: str = "1"
    provenance: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    precision: dict[str, Any] = field(default_factory=dict)
    certificate: Certificate | None = None  # None: labels are never certified

    @property
    def precision_name(self) -> str:
        return str(self.precision.get("name", "fp32"))

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate a parsed manifest; raise ModelError naming the first bad field."""
        if not isinstance(data, dict):
            raise ModelError("manifest must be a JSON object")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ModelError(f"manifest format {fmt!r} is not supported; expected {FORMAT!r}")
        try:
            name = _str(data, "name")
            if not _NAME_RE.match(name):
                raise ModelError(f"model name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
            graphs_raw = _obj(data, "graphs")
            graphs = {}
            unknown = set(graphs_raw) - set(ROLES) - set(OPTIONAL_ROLES)
            if unknown:
                raise ModelError(f"unknown graphs {sorted(unknown)}; allowed: {', '.join(ROLES + OPTIONAL_ROLES)}")
            for role in ROLES + tuple(r for r in OPTIONAL_ROLES if r in graphs_raw):
                g = _obj(graphs_raw, role)
                file = _str(g, "file")
                if Path(file).name != file or file in ("", ".", ".."):
                    raise ModelError(f"graphs.{role}.file must be a plain file name, got {file!r}")
                digest = _str(g, "sha256")
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise ModelError(f"graphs.{role}.sha256 is not a hex sha256 digest")
                graphs[role] = GraphRef(file, digest)
            spec = _input_spec(_obj(data, "input"))
            labels = data.get("labels")
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
                raise ModelError("labels must be a non-empty list of strings")
            con = _obj(data, "contraction")
            gamma = _positive(con, "gamma")
            sol = _obj(data, "solver")
            tol = _positive(sol, "tol")
            max_iter = sol.get("max_iter")
            if not isinstance(max_iter, int) or max_iter < 1:
                raise ModelError("solver.max_iter must be an integer >= 1")
            calibration = data.get("calibration", {})
            if not isinstance(calibration, dict):
                raise ModelError("calibration must be an object")
            provenance = data.get("provenance", {})
            if not isinstance(provenance, dict):
                raise ModelError("provenance must be an object")
            return cls(
                name=name,
                graphs=graphs,
                input=spec,
                latent_shape=_dims(data, "latent_shape"),
                labels=tuple(labels),
                contraction=Contraction(gamma, str(con.get("method", ""))),
                solver=SolverDefaults(tol, max_iter, str(sol.get("residual", ""))),
                format=fmt,
                version=str(data.get("version", "1")),
                provenance=provenance,
                calibration=calibration,
                precision=_optional_obj(data, "precision"),
                certificate=_certificate(data.get("certificate"), len(labels)),
            )
        except (TypeError, ValueError) as exc:  # a value of the wrong JSON type
            raise ModelError(f"manifest is malformed: {exc}") from exc


def _input_spec(inp: dict[str, Any]) -> InputSpec:
    dark = inp.get("dark_background", False)
    if not isinstance(dark, bool):
        raise ModelError(f"input.dark_background must be true or false, got {dark!r}")
    spec = InputSpec(
        shape=_dims(inp, "shape"),
        dtype=_str(inp, "dtype"),
        layout=_str(inp, "layout"),
        scale=_positive(inp, "scale"),
        mean=tuple(_floats(inp, "mean")),
        std=tuple(_floats(inp, "std")),
        dark_background=dark,
    )
    if spec.dtype != "float32":
        raise ModelError(f"input.dtype {spec.dtype!r} is not supported; expected 'float32'")
    channels = spec.shape[0] if spec.layout == "NCHW" else spec.shape[-1]
    if len(spec.mean) != channels or len(spec.std) != channels or min(spec.std) <= 0:
        raise ModelError(f"input.mean and input.std need one value per channel ({channels}), std > 0")
    return spec


def _certificate(raw: Any, classes: int) -> Certificate | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelError("certificate must be an object")
    rows = raw.get("pair_lipschitz")
    if (
        not isinstance(rows, list)
        or len(rows) != classes
        or not all(isinstance(r, list) and len(r) == classes for r in rows)
        or not all(_number(v) and math.isfinite(v) and v >= 0 for r in rows for v in r)
    ):
        raise ModelError(f"certificate.pair_lipschitz must be a {classes} x {classes} table of finite numbers >= 0")
    return Certificate(str(raw.get("method", "")), tuple(tuple(float(v) for v in r) for r in rows))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _obj(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    if not isinstance(v, dict):
        raise ModelError(f"manifest field {key!r} must be an object")
    return v


def _optional_obj(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key, {})
    if not isinstance(v, dict):
        raise ModelError(f"manifest field {key!r} must be an object")
    return v


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ModelError(f"manifest field {key!r} must be a string")
    return v


def _positive(d: dict[str, Any], key: str) -> float:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ModelError(f"manifest field {key!r} must be a positive number, got {v!r}")
    return float(v)


def _floats(d: dict[str, Any], key: str) -> list[float]:
    v = d.get(key)
    if not isinstance(v, list) or not all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
    ):
        raise ModelError(f"manifest field {key!r} must be a list of numbers")
    return [float(x) for x in v]


def _dims(d: dict[str, Any], key: str) -> tuple[int, ...]:
    v = d.get(key)
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        raise ModelError(f"manifest field {key!r} must be a list of positive integers")
    return tuple(v)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(model_dir: Path | str, *, verify_hashes: bool = True) -> Manifest:
    """Read ``model_dir/manifest.json``, validate it, and check each graph's sha256."""
    model_dir = Path(model_dir)
    path = model_dir / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{model_dir} is not a model folder: it has no manifest.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path} cannot be read as JSON: {exc}") from exc
    manifest = Manifest.from_dict(data)
    if verify_hashes:
        for role, ref in manifest.graphs.items():
            graph = model_dir / ref.file
            if not graph.is_file():
                raise ModelError(f"{model_dir}: graph {role} ({ref.file}) is missing")
            digest = sha256_file(graph)
            if digest != ref.sha256:
                raise ModelError(
                    f"{model_dir}: {ref.file} has sha256 {digest[:12]}..., the manifest says "
                    f"{ref.sha256[:12]}...; the file was changed or truncated"
                )
    return manifest
