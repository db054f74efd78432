"""Training curves: loss, accuracy and iterations per epoch, drawn from ``metrics.jsonl`` into a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
