"""Image polarity end to end: a CIFAR-10 model trained, exported and served takes a light photograph
as it is; MNIST-like models (light strokes on black) invert a light-background upload."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fpn_serve import Engine, load_manifest
from training import export as export_mod
from training.train import cli as train_cli

from ..conftest import running_server  # type: ignore[import-not-found]

CLASSES = 10
SIDE = 32


def _light_images(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """uint8 [n, 32, 32, 3]: a light, slightly noisy background with a dark coloured square whose
    place and colour depend on the class, so that a few training steps learn something."""
    rng = np.random.default_rng(seed)
    labels = [int(k) for k in rng.integers(0, CLASSES, n)]
    images = rng.integers(205, 256, (n, SIDE, SIDE, 3)).astype(np.uint8)
    for image, k in zip(images, labels, strict=True):
        row, col = 2 + 6 * (k // 4), 2 + 7 * (k % 4)
        colour = (40 + 20 * k, 120 - 10 * k, 30 + 15 * (k % 3))
        image[row : row + 9, col : col + 9] = colour
    return images, labels


def write_cifar10_root(root: Path, train: int, test: int) -> Path:
    """A data root in torchvision's CIFAR-10 layout (cifar-10-batches-py: pickled dicts of
    row-major R, G, B planes): five training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = _light_images(train + test, seed=0)
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # [n, 3 * 32 * 32]
    per_batch = train // 5
    splits = {f"data_batch_{i + 1}": slice(i * per_batch, (i + 1) * per_batch) for i in range(5)}
    splits["test_batch"] = slice(train, train + test)
    for name, part in splits.items():
        batch = {"batch_label": name, "data": planes[part], "labels": labels[part]}
        batch["filenames"] = [f"{name}_{i}.png" for i in range(len(batch["labels"]))]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3 * SIDE * SIDE}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


@pytest.fixture(scope="module")
def cifar_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cifar10_conv model from a short real training run on the tiny root, exported by fpn-export."""
    from torchvision.datasets import cifar

    root = write_cifar10_root(tmp_path_factory.mktemp("cifar"), train=200, test=260)
    run, out = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("models") / "cifar"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FPN_OFFLINE", "1")
        # torchvision checks each file's md5 against the real CIFAR-10's, which no stand-in matches:
        # here it checks that the file exists; torchvision's own loader still reads every file
        m.setattr(cifar, "check_integrity", lambda fpath, md5=None: Path(fpath).is_file())
        common = ["--data-root", str(root)]
        train = ["--dataset", "cifar10", "--arch", "cifar10_conv", "--epochs", "1", "--batch-size", "50"]
        limits = ["--limit-train", "200", "--limit-test", "260", "--max-iter", "30", "--seed", "0"]
        assert train_cli([*train, *limits, "--out", str(run), *common]) == 0
        export = ["--parity-images", "256", "--calibration-limit", "260", "--certify-images", "16"]
        assert export_mod.cli([str(run / "checkpoint.pt"), "--out", str(out), *export, *common]) == 0
    return out


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _normalised(pixels: np.ndarray, folder: Path, inverted: bool) -> np.ndarray:
    """float32 [1, 3, 32, 32] by the manifest's formula (p * scale - mean) / std, on 255 - p if inverted."""
    spec = load_manifest(folder).input
    p = (255 - pixels if inverted else pixels).astype(np.float32).transpose(2, 0, 1)
    mean = np.array(spec.mean, np.float32)[:, None, None]
    std = np.array(spec.std, np.float32)[:, None, None]
    return ((p * np.float32(spec.scale) - mean) / std)[None].astype(np.float32)


@pytest.mark.slow
def test_the_exporter_writes_each_datasets_polarity(cifar_model: Path) -> None:
    manifest = json.loads((cifar_model / "manifest.json").read_text())
    assert manifest["input"]["dark_background"] is False and manifest["input"]["shape"] == [3, 32, 32]
    assert load_manifest(cifar_model).input.dark_background is False
    assert [export_mod.dark_background(d) for d in ("mnist", "fashion-mnist", "svhn", "cifar10")] == [
        True,
        True,
        False,
        False,
    ]
    with pytest.raises(export_mod.ExportError, match="no image polarity is known for dataset 'imagenet'"):
        export_mod.dark_background("imagenet")


@pytest.mark.slow
def test_a_served_colour_model_reads_a_light_photo_without_inverting_it(cifar_model: Path, tmp_path: Path) -> None:
    pixels, _ = _light_images(1, seed=7)
    border = np.concatenate([pixels[0, 0], pixels[0, -1], pixels[0, :, 0], pixels[0, :, -1]])
    assert border.mean() > 127  # an MNIST-like model would invert this image
    engine = Engine.load(cifar_model, device="cpu")
    plain = engine.classify(_normalised(pixels[0], cifar_model, inverted=False))
    inverted = engine.classify(_normalised(pixels[0], cifar_model, inverted=True))
    assert np.abs(plain.probabilities - inverted.probabilities).max() > 1e-3  # the test can tell them apart
    with running_server(cifar_model, tmp_path) as client:
        response = client.post("/classify", content=_png(pixels[0]), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    np.testing.assert_allclose(prediction["probabilities"], plain.probabilities[0], rtol=1e-6, atol=1e-7)
    assert prediction["index"] == int(plain.labels[0])
    assert prediction["iterations"] == int(plain.iterations[0])
