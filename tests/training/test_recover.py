"""The checkpoint recovered from an fp32 model folder: the shipped models/mnist/checkpoint.pt, its
weights to the bit, its answers against ONNX Runtime, and the folders it refuses."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from fpn_serve import Engine
from training import export as export_mod
from training.checkpoint import load_checkpoint
from training.errors import CheckpointError
from training.fpn import FPN
from training.recover import RECOVERED_FROM, recover, write_recovered
from training.train import cli as train_cli

REPO = Path(__file__).resolve().parents[2]
SHIPPED, INT8 = REPO / "models" / "mnist", REPO / "models" / "mnist-int8"
CHECKPOINT = SHIPPED / "checkpoint.pt"


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def recovered() -> FPN:
    model, _, _ = recover(SHIPPED)
    return model


@pytest.fixture
def copy_of_shipped(tmp_path: Path) -> Path:
    folder = tmp_path / "mnist"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("*.png", "checkpoint.pt"))
    return folder


def _rewrite(folder: Path, graph: str, change: dict[str, np.ndarray]) -> None:
    """Replace initializers of ``graph`` and keep the manifest's sha256 of it valid."""
    model = onnx.load(str(folder / graph))
    for init in model.graph.initializer:
        if init.name in change:
            init.CopyFrom(numpy_helper.from_array(change[init.name], init.name))
    onnx.save(model, str(folder / graph))
    manifest = json.loads((folder / "manifest.json").read_text())
    for ref in manifest["graphs"].values():
        if ref["file"] == graph:
            ref["sha256"] = hashlib.sha256((folder / graph).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_recovered_weights_are_the_folders_to_the_bit(recovered: FPN) -> None:
    q, t, s = (_initializers(SHIPPED / f"{r}.onnx") for r in "QTS")
    state = recovered.state_dict()
    for key in ("0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"):
        np.testing.assert_array_equal(state[f"Q.{key}"].numpy(), q[f"q.{key}"], strict=True)
    np.testing.assert_array_equal(state["S.weight"].numpy(), s["s.weight"], strict=True)
    w = recovered.T.weights()[0].detach().numpy()  # W as T applies it, after the spectral rescaling
    np.testing.assert_array_equal(w, t["permute_1"].T, strict=True)
    np.testing.assert_array_equal((0.99 * recovered.T.weights()[0]).T.detach().numpy(), t["permute"], strict=True)
    assert recovered.num_parameters() == 84182


def test_the_recovered_model_answers_as_onnx_runtime_runs_the_folder(recovered: FPN, mnist_root: Path) -> None:
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=1000)
    x = test.normalise(test.images)
    engine = Engine.load(SHIPPED, device="cpu")
    with torch.no_grad():
        weights = recovered.T.weights()
        z = recovered.Q(x)
        u = torch.zeros(len(x), 46)
        for _ in range(30):
            u = recovered.T.apply_with(weights, u, z)
        torch_fixed = recovered.S(u).numpy()
        torch_logits, _ = recovered(x, tol=1e-4, max_iter=100)
    onnx_fixed = engine.classify_fixed(x.numpy(), 30).logits
    assert np.abs(onnx_fixed - torch_fixed).max() < 3e-5  # float rounding of the same weights, no more
    result = engine.classify(x.numpy(), tol=1e-4, max_iter=100)
    np.testing.assert_array_equal(torch_logits.argmax(1).numpy(), result.labels)
    assert (result.labels == test.labels.numpy()).mean() > 0.99


def test_the_shipped_checkpoint_is_a_fresh_recovery_of_the_folder(recovered: FPN) -> None:
    _, cfg, payload = load_checkpoint(CHECKPOINT)
    fresh = recovered.state_dict()
    assert list(payload["state_dict"]) == list(fresh)
    for key, value in fresh.items():
        assert torch.equal(payload["state_dict"][key], value), key
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    shas = [manifest["graphs"][r]["sha256"] for r in "QTS"]
    assert payload[RECOVERED_FROM] == "mnist " + " ".join(f"{r}={sha}" for r, sha in zip("QTS", shas, strict=True))
    assert payload["model_config"] == manifest["provenance"]["model_config"]
    assert (cfg.epochs, cfg.augment_rotate, cfg.dropout, cfg.seed) == (40, 10.0, 0.1, 0)
    assert payload["epoch"] == 40 and payload["metrics"]["test_accuracy"] == 0.9957
    assert not {"optimizer", "scheduler", "generator"} & set(payload)


def test_the_cli_writes_a_checkpoint_and_will_not_replace_one(tmp_path: Path) -> None:
    out = tmp_path / "checkpoint.pt"
    assert export_mod.cli(["--recover-checkpoint", str(SHIPPED), "--out", str(out)]) == 0
    model, _, _ = load_checkpoint(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, load_checkpoint(CHECKPOINT)[0].state_dict()[key]), key
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        write_recovered(SHIPPED, out)
    write_recovered(SHIPPED, out, force=True)


def test_a_non_fp32_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "c.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "training.export", "--recover-checkpoint", str(INT8), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "holds int8-static graphs" in proc.stderr and "recover from an fp32 folder" in proc.stderr
    assert not out.exists()


def test_a_changed_graph_is_refused(copy_of_shipped: Path) -> None:
    (copy_of_shipped / "T.onnx").write_bytes((copy_of_shipped / "T.onnx").read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="T.onnx has sha256 .* the file was changed or truncated"):
        recover(copy_of_shipped)


def test_a_latent_matrix_the_rescaling_would_change_is_refused(copy_of_shipped: Path) -> None:
    t = _initializers(copy_of_shipped / "T.onnx")
    w = t["permute_1"].T * np.float32(1.01)  # ||W||_2 = 1.01: no raw gives back this W
    _rewrite(copy_of_shipped, "T.onnx", {"permute_1": np.ascontiguousarray(w.T), "permute": (np.float32(0.99) * w).T})
    with pytest.raises(CheckpointError, match=r"spectral norm 1\.0099\d* > 1 .* no stored raw gives back W"):
        recover(copy_of_shipped)


def test_weights_that_do_not_fit_the_architecture_are_refused(copy_of_shipped: Path) -> None:
    manifest = json.loads((copy_of_shipped / "manifest.json").read_text())
    manifest["provenance"]["model_config"]["latent_dim"] = 40
    (copy_of_shipped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"initializer q\.7\.weight has shape \[46, 1000\]"):
        recover(copy_of_shipped)
    manifest["provenance"]["model_config"].update(arch="svhn_conv", in_channels=3, latent_dim=100)
    (copy_of_shipped / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="ResidualLeakyLatent cannot be recovered"):
        recover(copy_of_shipped)


def test_the_folder_holding_the_checkpoint_is_not_replaced_by_its_export(
    tmp_path: Path, mnist_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mnist"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("*.png"))
    before = sorted(p.name for p in folder.iterdir())
    args = [str(folder / "checkpoint.pt"), "--out", str(folder), "--force", "--data-root", str(mnist_root)]
    assert export_mod.cli(args) == 1
    assert "holds the checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_training_cannot_resume_a_recovered_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli(["--resume", str(CHECKPOINT), "--out", str(tmp_path)]) == 1
    assert "has no optimizer state to resume from" in capsys.readouterr().err
