"""Table 1 analogue: test accuracy and size of trained checkpoints, measured the same way for all.

    python benchmarks/table1.py runs/table1/*/checkpoint.pt models/mnist

Each checkpoint is evaluated on its dataset's full test split in eval mode: fixed point networks at
their training tolerance, explicit twins as their one latent layer. A model folder is evaluated
through ``fpn_serve`` (the served answer) at its manifest's default tolerance. Prints a markdown
table beside the paper's figures and writes ``benchmarks/results/table1.json`` and ``table1.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from fpn_serve import Engine  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data import load_split  # noqa: E402
from training.train import evaluate  # noqa: E402

# Table 1 of the paper: (dataset, architecture, explicit twin?) -> accuracy %
PAPER = {
    ("mnist", "mnist_fc", False): 98.6,
    ("mnist", "mnist_fc", True): 98.2,
    ("mnist", "mnist_conv", False): 99.5,
    ("mnist", "mnist_conv", True): 99.4,
    ("svhn", "svhn_conv", False): 92.8,
    ("svhn", "svhn_conv", True): 92.4,
    ("cifar10", "cifar10_conv", False): 80.7,
    ("cifar10", "cifar10_conv", True): 80.1,
    ("cifar10", "cifar10_resnet", False): 92.1,
}


def from_checkpoint(path: Path, data_root: Path) -> dict[str, Any]:
    model, cfg, payload = load_checkpoint(path)
    test = load_split(cfg.dataset, data_root, train=False)
    result = evaluate(model, test, cfg, "cpu")
    explicit = cfg.backprop == "explicit"
    return {
        "source": str(path),
        "dataset": cfg.dataset,
        "arch": model.config.arch,
        "model": f"{model.config.arch}{' (explicit twin)' if explicit else ''}",
        "backprop": cfg.backprop,
        "parameters": model.num_parameters(),
        "epochs": payload.get("epoch"),
        "trained_on": cfg.device,
        "test_accuracy": result["test_accuracy"],
        "mean_iterations": result["test_mean_iterations"],
        "evaluated": f"torch, eval mode, tol {cfg.tol:g}" if not explicit else "torch, eval mode, one latent layer",
        "paper_accuracy": PAPER.get((cfg.dataset, model.config.arch, explicit)),
    }


def from_folder(folder: Path, data_root: Path) -> dict[str, Any]:
    engine = Engine.load(folder)
    prov = engine.manifest.provenance
    test = load_split(str(prov["dataset"]), data_root, train=False)
    x, y = test.normalise(test.images).numpy(), test.labels.numpy()
    labels, iterations = [], []
    for i in range(0, len(x), 1000):
        out = engine.classify(x[i : i + 1000])
        labels.append(out.labels)
        iterations.append(out.iterations)
    accuracy = float((np.concatenate(labels) == y).mean())
    return {
        "source": str(folder),
        "dataset": prov["dataset"],
        "arch": prov["architecture"],
        "model": f"{prov['architecture']} (served)",
        "backprop": prov["backprop"],
        "parameters": prov["parameters"],
        "epochs": prov["epochs"],
        "trained_on": prov.get("train_config", {}).get("device"),
        "test_accuracy": accuracy,
        "mean_iterations": float(np.concatenate(iterations).mean()),
        "evaluated": f"fpn_serve, tol {engine.manifest.solver.tol:g}",
        "paper_accuracy": PAPER.get((str(prov["dataset"]), str(prov["architecture"]), False)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="checkpoint.pt files or exported model folders")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "table1.json"))
    args = p.parse_args()
    rows = []
    for raw in args.paths:
        path = Path(raw)
        row = from_folder(path, Path(args.data_root)) if path.is_dir() else from_checkpoint(path, Path(args.data_root))
        rows.append(row)
        print(f"  {row['model']} on {row['dataset']}: {100 * row['test_accuracy']:.2f} %", flush=True)
    lines = [
        "| dataset | model | parameters | epochs | trained on | test accuracy | paper | evaluated |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        paper = f"{r['paper_accuracy']:.1f} %" if r["paper_accuracy"] is not None else "-"
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['parameters']:,} | {r['epochs']} | {r['trained_on']} | "
            f"{100 * r['test_accuracy']:.2f} % | {paper} | {r['evaluated']} |"
        )
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
