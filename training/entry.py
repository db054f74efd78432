"""Console entry points that say what to install when the ``train`` extra is missing.

``fpn-train`` and ``fpn-export`` need torch and the ONNX tools; a serving-only install has
neither, and a traceback is no way to say so.
"""

from __future__ import annotations

import importlib
import sys

TRAIN_EXTRA = {"torch", "torchvision", "onnx", "onnxscript", "onnxconverter_common", "tqdm", "matplotlib", "scipy"}


def _run(module: str, prog: str) -> None:
    try:
        cli = importlib.import_module(module).cli
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        print(
            f"{prog}: error: {exc.name} is not installed; {prog} needs the train extra: pip install 'fpn-serve[train]'",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.exit(cli())


def train() -> None:
    _run("training.train", "fpn-train")


def export() -> None:
    _run("training.export", "fpn-export")
