"""Shared fixtures: the real MNIST data (fetched once into data/ or $FPN_DATA_ROOT) and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "models" / "mnist"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shipped_model() -> Path:
    """The committed models/mnist folder that fpn-serve serves by default."""
    return SHIPPED_MODEL


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A data root holding torchvision's MNIST files (prepared through the real offline path)."""
    pytest.importorskip("torch")
    from training.data import prepare_mnist

    root = Path(os.environ.get("FPN_DATA_ROOT", REPO / "data"))
    prepare_mnist(root)
    return root
