from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fpn_serve import Engine, ModelError, load_manifest
from fpn_serve.contract.store import default_store, discover


@pytest.fixture
def model_copy(tmp_path: Path, shipped_model: Path) -> Path:
    dst = tmp_path / "mnist"
    shutil.copytree(shipped_model, dst)
    return dst


def _edit(folder: Path, change: dict[str, object]) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))


def test_the_shipped_manifest_has_the_core_fields(shipped_model: Path) -> None:
    m = load_manifest(shipped_model)
    assert m.format == "fpn-onnx/1" and m.name == "mnist"
    assert m.input.shape == (1, 28, 28) and m.input.layout == "NCHW"
    assert m.input.mean == (0.1307,) and m.input.std == (0.3081,)
    assert m.labels == tuple(str(i) for i in range(10))
    assert m.latent_shape == (46,) and 0 < m.contraction.gamma < 1
    assert m.provenance["parameters"] == 84_182
    assert default_store() == shipped_model.parent
    assert discover([shipped_model.parent]) == [
        shipped_model,
        shipped_model.parent / "mnist-int8",
    ]  # sorted: mnist first


def test_a_changed_graph_is_caught_by_its_checksum(model_copy: Path) -> None:
    with (model_copy / "T.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match=r"T.onnx has sha256 .* the file was changed or truncated"):
        Engine.load(model_copy)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "fpn-onnx/9"}, "format 'fpn-onnx/9' is not supported"),
        ({"name": "../../etc"}, "model name '../../etc' must be"),
        ({"latent_shape": [0]}, "latent_shape"),
        ({"labels": []}, "labels must be a non-empty list"),
        ({"solver": {"tol": -1, "max_iter": 10}}, "'tol' must be a positive number"),
        ({"graphs": {"Q": {"file": "../Q.onnx", "sha256": "0" * 64}}}, "must be a plain file name"),
    ],
)
def test_a_malformed_manifest_names_the_bad_field(model_copy: Path, change: dict[str, object], message: str) -> None:
    _edit(model_copy, change)
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_manifest(model_copy)


def test_latent_shape_that_disagrees_with_the_graphs_is_refused(model_copy: Path) -> None:
    _edit(model_copy, {"latent_shape": [47]})
    with pytest.raises(ModelError, match="has shape .* the manifest implies"):
        Engine.load(model_copy, device="cpu")


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no manifest.json"):
        load_manifest(tmp_path)
    with pytest.raises(ModelError, match="neither a model folder nor a store"):
        discover([tmp_path])


def test_fpn_serve_refuses_a_broken_folder_with_one_line(model_copy: Path) -> None:
    import subprocess
    import sys

    _edit(model_copy, {"latent_shape": [47]})
    proc = subprocess.run(
        [sys.executable, "-m", "fpn_serve.cli", str(model_copy), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "fpn-serve: error:" in proc.stderr and "the manifest implies" in proc.stderr
    assert "Traceback" not in proc.stderr
