"""Calibration of an exported model through ``fpn_serve``: what each tolerance buys and costs.

For each tolerance of a grid: mean and p99 iterations, accuracy, converged fraction, and latency
per input at batch 1 and at batch 256 on this machine; for fixed iteration counts 1, 2, 3, ...
(no early exit) the accuracy, up to where it stops changing. ``plot`` draws calibration.png and
``model_card`` writes the folder's README.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fpn_serve import Engine

TOLS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def _latency_per_input(engine: Engine, x: np.ndarray, tol: float, max_iter: int, batch: int, budget: int) -> float:
    """Median seconds per input over a few batched calls (batch 1: ``budget`` single calls)."""
    if batch == 1:
        times = []
        for i in range(min(budget, len(x))):
            t = time.perf_counter()
            engine.classify(x[i : i + 1], tol=tol, max_iter=max_iter)
            times.append(time.perf_counter() - t)
        return float(np.median(times))
    xb = x[:batch]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        engine.classify(xb, tol=tol, max_iter=max_iter)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / len(xb)


def calibrate(
    engine: Engine, x: np.ndarray, y: np.ndarray, max_iter: int, chunk: int = 1000, split: str = "test"
) -> dict[str, Any]:
    """The calibration table of ``engine`` on the labelled inputs ``x``, ``y`` (named ``split``)."""
    tol_rows = []
    for tol in TOLS:
        iters, correct, conv = [], 0, 0
        for i in range(0, len(x), chunk):
            res = engine.classify(x[i : i + chunk], tol=tol, max_iter=max_iter)
            iters.append(res.iterations)
            correct += int((res.labels == y[i : i + chunk]).sum())
            conv += int(res.converged.sum())
        it = np.concatenate(iters)
        tol_rows.append(
            {
                "tol": tol,
                "max_iter": max_iter,
                "images": len(x),
                "mean_iterations": round(float(it.mean()), 3),
                "p99_iterations": int(np.percentile(it, 99)),
                "max_iterations": int(it.max()),
                "accuracy": correct / len(x),
                "correct": correct,
                "converged_fraction": conv / len(x),
                "latency_us_batch1": round(1e6 * _latency_per_input(engine, x, tol, max_iter, 1, 200), 2),
                "latency_us_per_input_batch256": round(1e6 * _latency_per_input(engine, x, tol, max_iter, 256, 5), 2),
            }
        )
    fixed_rows: list[dict[str, Any]] = []
    unchanged = 0
    for k in range(1, max_iter + 1):
        correct = 0
        for i in range(0, len(x), chunk):
            correct += int((engine.classify_fixed(x[i : i + chunk], k).labels == y[i : i + chunk]).sum())
        acc = correct / len(x)
        unchanged = unchanged + 1 if fixed_rows and acc == fixed_rows[-1]["accuracy"] else 0
        fixed_rows.append({"iterations": k, "accuracy": acc})
        if unchanged >= 3:  # accuracy has stopped changing
            break
    calibration: dict[str, Any] = {"split": split, "tolerances": tol_rows, "fixed_iterations": fixed_rows}
    if engine.certifier.available:
        calibration["certified_stop"] = _certified_stop(engine, x, y, max_iter, chunk)
    return calibration


def _certified_stop(engine: Engine, x: np.ndarray, y: np.ndarray, max_iter: int, chunk: int) -> dict[str, Any]:
    """What ``stop=certified`` costs and gives: iterations, accuracy, the fraction certified by each
    iteration count, and latency at batch 1."""
    iters, certified, correct = [], [], 0
    for i in range(0, len(x), chunk):
        res = engine.classify(x[i : i + chunk], max_iter=max_iter, stop="certified")
        iters.append(res.iterations)
        certified.append(res.certified)
        correct += int((res.labels == y[i : i + chunk]).sum())
    it, cert = np.concatenate(iters), np.concatenate(certified)
    last = int(it[cert].max()) if cert.any() else 0
    times = []
    for i in range(min(200, len(x))):
        t = time.perf_counter()
        engine.classify(x[i : i + 1], max_iter=max_iter, stop="certified")
        times.append(time.perf_counter() - t)
    return {
        "max_iter": max_iter,
        "images": len(x),
        "mean_iterations": round(float(it.mean()), 3),
        "p99_iterations": int(np.percentile(it, 99)),
        "max_iterations": int(it.max()),
        "accuracy": correct / len(x),
        "correct": correct,
        "certified_fraction": float(cert.mean()),
        "certified_by_iteration": [
            {"iterations": k, "fraction": round(float((cert & (it <= k)).mean()), 5)} for k in range(1, last + 1)
        ],
        "latency_us_batch1": round(1e6 * float(np.median(times)), 2),
    }


def plot(calibration: dict[str, Any], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = calibration["tolerances"]
    tols = [r["tol"] for r in rows]
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.semilogx(tols, [100 * r["accuracy"] for r in rows], "o-", color="tab:blue")
    ax1.set_xlabel("tolerance (per-sample relative residual)")
    ax1.set_ylabel("test accuracy (%)", color="tab:blue")
    ax1.invert_xaxis()
    ax2 = ax1.twinx()
    ax2.semilogx(tols, [r["latency_us_batch1"] for r in rows], "s--", color="tab:red", label="batch 1")
    ax2.semilogx(tols, [r["latency_us_per_input_batch256"] for r in rows], "^:", color="tab:orange", label="batch 256")
    ax2.set_ylabel("latency per input (us)", color="tab:red")
    ax2.legend(loc="lower right")
    for r in rows:
        ax1.annotate(
            f"{r['mean_iterations']:.1f} it",
            (r["tol"], 100 * r["accuracy"]),
            fontsize=8,
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
        )
    ax1.set_title("accuracy and latency against tolerance")
    fixed = calibration["fixed_iterations"]
    ax3.plot([r["iterations"] for r in fixed], [100 * r["accuracy"] for r in fixed], "o-")
    ax3.set_xlabel("fixed number of iterations (no early exit)")
    ax3.set_ylabel("test accuracy (%)")
    ax3.set_title("accuracy against depth")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def model_card(manifest: dict[str, Any], path: Path) -> None:
    """README.md of a model folder: what it is, what each tolerance buys, how it was checked."""
    prov = manifest["provenance"]
    cal = manifest["calibration"]
    default = next((r for r in cal["tolerances"] if r["tol"] == manifest["solver"]["tol"]), None)
    lines = [
        f"# {manifest['name']}",
        "",
        f"A Fixed Point Network ({prov['architecture']}, {prov['parameters']:,} parameters) trained on "
        f"{prov['dataset']} with {prov['backprop']} backprop, exported by `fpn-export` "
        f"(precision {manifest['precision']['name']}, opset {manifest['opset']}).",
        "",
    ]
    split = cal.get("split", "test")
    if default:
        lines += [
            f"Accuracy at the default `tol={manifest['solver']['tol']:g}` "
            f"(max_iter {manifest['solver']['max_iter']}): **{100 * default['accuracy']:.2f} %** on "
            f"{default['images']:,} {'test images' if split == 'test' else split}, measured through `fpn_serve`.",
            "",
        ]
    if "checkpoint_test_accuracy" in prov and split != "test":
        lines += [f"Test accuracy of the checkpoint: {100 * prov['checkpoint_test_accuracy']:.2f} %.", ""]
    lines += [
        "![calibration](calibration.png)",
        "",
        f"Measured on {'the test images' if split == 'test' else 'the ' + split}:",
        "",
        "| tol | mean iterations | p99 | accuracy | converged | us / input, batch 1 | us / input, batch 256 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in cal["tolerances"]:
        lines.append(
            f"| {r['tol']:g} | {r['mean_iterations']:.2f} | {r['p99_iterations']} | {100 * r['accuracy']:.2f} % | "
            f"{100 * r['converged_fraction']:.1f} % | {r['latency_us_batch1']:.0f} | "
            f"{r['latency_us_per_input_batch256']:.1f} |"
        )
    stop = cal.get("certified_stop")
    if stop:
        lines.append(
            f"| certified stop | {stop['mean_iterations']:.2f} | {stop['p99_iterations']} | "
            f"{100 * stop['accuracy']:.2f} % | {100 * stop['certified_fraction']:.1f} % certified | "
            f"{stop['latency_us_batch1']:.0f} | |"
        )
    con = manifest["contraction"]
    lines += [
        "",
        f"Contraction: certified bound gamma = {con['gamma']:.4f} ({con['method']}); measured on the "
        f"exported T: {con['empirical']['measured_factor']:.4f}. So "
        "`||u_k - u*|| <= gamma / (1 - gamma) * ||u_k - u_(k-1)||`, the `error_bound` the server reports.",
        "",
        "With `stop=certified` each input stops at its first iteration whose label is provably that of "
        "the exact fixed point (from gamma and S's pairwise Lipschitz table in the manifest's `certificate`)."
        if stop
        else "S is not affine, so no label is certified.",
        "",
        "Latencies were measured on the exporting machine; the folder's `manifest.json` holds every figure.",
        "",
    ]
    path.write_text("\n".join(lines))
