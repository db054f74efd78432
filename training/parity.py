"""The export's parity checks: the ONNX loops against the torch model, and the single-graph loops
(FPN.onnx, FPN1.onnx) against the three-graph loop they fuse.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fpn_serve import ClassifyResult, Engine

from .export_graphs import ExportError
from .fpn import FPN

LOGIT_ATOL = 1e-4
FIXED_ITERATIONS = 30  # compared without early exit on either side (at most the manifest's max_iter)


@torch.no_grad()
def measure_parity(model: FPN, engine: Engine, x: np.ndarray, tol: float, max_iter: int) -> dict[str, Any]:
    """How far the ONNX loop is from the torch model on ``x`` (normalised inputs [n, *input_shape]):
    the largest logit gap after the same fixed number of iterations, and, at ``tol``, the number of
    inputs whose labels differ and the largest difference in iterations."""
    xt = torch.from_numpy(x)
    fixed_iters = min(max_iter, FIXED_ITERATIONS)
    weights = model.T.weights()
    z = model.Q(xt)
    u = torch.zeros(len(x), model.config.latent_dim)
    for _ in range(fixed_iters):
        u = model.T.apply_with(weights, u, z)
    torch_fixed = model.S(u).numpy()
    onnx_fixed = engine.classify_fixed(x, fixed_iters).logits
    torch_logits, torch_info = model(xt, tol, max_iter)
    onnx_res = engine.classify(x, tol=tol, max_iter=max_iter)  # the single-graph loop where there is one
    return {
        "images": len(x),
        "fixed_iterations": fixed_iters,
        "max_logit_gap": float(np.abs(onnx_fixed - torch_fixed).max()),
        "label_disagreements": int((torch_logits.argmax(1).numpy() != onnx_res.labels).sum()),
        "max_iteration_difference_at_default_tol": int(
            np.abs(onnx_res.iterations - torch_info.iterations.numpy()).max()
        ),
    }


def check_parity(
    model: FPN,
    engine: Engine,
    x: np.ndarray,
    tol: float,
    max_iter: int,
    *,
    atol: float = LOGIT_ATOL,
    allowed_label_disagreements: int = 0,
) -> dict[str, Any]:
    """Compare the ONNX loop with the torch model; return ``measure_parity``'s record, or raise
    ExportError with the size of any gap.

    Logits must agree within ``atol`` after the same fixed number of iterations (no early exit on
    either side), labels at ``tol`` on all but ``allowed_label_disagreements`` inputs, and the
    folder's single-graph loops must answer as its three-graph loop.
    """
    record = measure_parity(model, engine, x, tol, max_iter)
    problem = compare_single_graphs(engine, x, tol, max_iter, atol=atol)
    if problem:
        raise ExportError(problem)
    gap, disagree = record["max_logit_gap"], record["label_disagreements"]
    if gap > atol or disagree > allowed_label_disagreements:
        raise ExportError(
            f"ONNX and torch disagree on {len(x)} test images: max logit gap {gap:.3g} after "
            f"{record['fixed_iterations']} iterations (allowed {atol}), {disagree} labels differ at tol={tol}"
        )
    return record


def compare_single_graphs(
    engine: Engine, x: np.ndarray, tol: float, max_iter: int, *, atol: float = LOGIT_ATOL
) -> str | None:
    """Hold the single-graph loops the folder has to the three-graph loop on the same inputs:
    FPN.onnx on all of ``x`` at once, FPN1.onnx on each input alone. Iterations must be equal,
    residuals and error bounds equal within float rounding, logits within ``atol``. Return what
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
                same = np.allclose(got, want, rtol=1e-5, atol=atol if field == "logits" else 0.0)
            if not same:
                return f"the single-graph {graph} loop and the three-graph loop disagree on {field} at tol={tol:g}"
    return None
