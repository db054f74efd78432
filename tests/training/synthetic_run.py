"""``fpn-train`` on synthetic images of a data set's shape: the real command line and training loop,
with only ``load_split`` replaced (the distributed BatchNorm test has no CIFAR-10 files), in
float64: in float32, rounding in the deep BatchNorm trunk's gradient sums (which cancel) tips the
sign of Adam's first steps on some weights, and would hide whether two runs compute the same.

    python tests/training/synthetic_run.py --dataset cifar10 --arch cifar10_resnet ... --out DIR
    torchrun --nproc_per_node 2 tests/training/synthetic_run.py ...   # the same data in every process
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout, where run as a script

from training import train
from training.data import DATASETS, TensorSplit


def synthetic_split(name: str, root: Path, *, train: bool, limit: int | None = None) -> TensorSplit:
    """Random uint8 images and labels, the same for a given split on every call and process."""
    spec = DATASETS[name]
    gen = torch.Generator().manual_seed(1 if train else 2)
    n = limit or 64
    images = torch.randint(0, 256, (n, *spec.input_shape), dtype=torch.uint8, generator=gen)
    return TensorSplit(images, torch.randint(0, len(spec.labels), (n,), generator=gen), spec)


if __name__ == "__main__":
    train.load_split = synthetic_split  # type: ignore[assignment]
    torch.set_default_dtype(torch.float64)  # weights, and inputs normalised by float64 mean and std
    sys.exit(train.cli(sys.argv[1:]))
