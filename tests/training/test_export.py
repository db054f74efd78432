"""fpn-export beyond the foundation: precisions, certificate, determinism, metadata, --verify, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from fpn_serve import Engine, load_manifest
from training import export as export_mod
from training.certify import measure_contraction
from training.loop_graph import build_single_loop_model, crop_unread_input
from training.train import cli as train_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    args = ["--epochs", "2", "--limit-train", "4000", "--limit-test", "300", "--batch-size", "100", "--seed", "2"]
    assert train_cli([*args, "--out", str(out), "--data-root", str(mnist_root)]) == 0
    return out / "checkpoint.pt"


def _export(checkpoint: Path, out: Path, mnist_root: Path, *extra: str) -> int:
    return export_mod.cli(
        [
            str(checkpoint),
            "--out",
            str(out),
            "--data-root",
            str(mnist_root),
            "--calibration-limit",
            "400",
            "--parity-images",
            "256",
            "--certify-images",
            "64",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def folders(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for precision in ("fp32", "fp16", "int8"):
        out[precision] = root / precision
        assert _export(checkpoint, out[precision], mnist_root, "--precision", precision) == 0
    return out


def _graph_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.onnx"))}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_precision_runs_in_onnx_runtime_with_float32_io(
    folders: dict[str, Path], precision: str, mnist_root: Path
) -> None:
    folder = folders[precision]
    manifest = load_manifest(folder)
    assert manifest.precision_name == precision
    engine = Engine.load(folder, device="cpu")
    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=400)
    x = test.normalise(test.images).numpy()
    result = engine.classify(x)
    assert result.logits.dtype == np.float32
    assert (result.labels == test.labels.numpy()).mean() > 0.85
    reference = Engine.load(folders["fp32"], device="cpu").classify(x)
    assert (result.labels == reference.labels).mean() >= 0.97  # lower precision, same answers
    assert result.converged.mean() > 0.95  # the default tol suits the precision
    q = onnx.load(str(folder / "Q.onnx"))
    types = {init.data_type for init in q.graph.initializer}
    ops = {node.op_type for node in q.graph.node}
    if precision == "fp16":
        assert onnx.TensorProto.FLOAT16 in types
    if precision == "int8":
        assert ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}
    if precision != "fp32":
        record = manifest.precision
        assert abs(record["accuracy_difference"]) < 0.02
        assert record["accuracy_difference"] == pytest.approx(record["accuracy"] - record["accuracy_fp32"])


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_the_single_graph_loops_answer_as_the_three_graph_loop(
    folders: dict[str, Path], precision: str, mnist_root: Path
) -> None:
    from training.data import load_split

    engine = Engine.load(folders[precision], device="cpu")
    assert {"fpn", "fpn1"} <= set(engine.manifest.graphs)
    test = load_split("mnist", mnist_root, train=False, limit=96)
    x = test.normalise(test.images).numpy()
    for tol in (1e-2, 1e-4, 1e-6):
        assert export_mod.compare_single_graphs(engine, x, tol, 100) is None
    one = onnx.load(str(folders[precision] / "FPN1.onnx"))
    assert one.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # a graph for one input
    (loop,) = [n for n in one.graph.node if n.op_type == "Loop"]
    body_ops = {n.op_type for n in loop.attribute[0].g.node}
    assert not body_ops & {"Where", "ReduceMax"}  # no per-sample freezing in its body


def test_the_same_checkpoint_gives_byte_identical_graphs(
    checkpoint: Path, folders: dict[str, Path], tmp_path: Path, mnist_root: Path
) -> None:
    assert _export(checkpoint, tmp_path / "again", mnist_root, "--name", "fp32") == 0
    assert _graph_hashes(tmp_path / "again") == _graph_hashes(folders["fp32"])


def test_graphs_carry_their_provenance(folders: dict[str, Path]) -> None:
    manifest = json.loads((folders["fp32"] / "manifest.json").read_text())
    assert manifest["opset"] == 18
    for role, ref in manifest["graphs"].items():
        graph = onnx.load(str(folders["fp32"] / ref["file"]))
        meta = {p.key: p.value for p in graph.metadata_props}
        expected = {"fpn.model": "fp32", "fpn.role": role, "fpn.format": "fpn-onnx/1", "fpn.opset": "18"}
        if role == "steps":
            expected["fpn.steps"] = "4"  # applications of T per run, which the runner reads
        assert meta == expected
        assert any(o.domain in ("", "ai.onnx") and o.version == 18 for o in graph.opset_import)


@pytest.mark.parametrize("where", ["export", "shipped"])
def test_no_graph_carries_doc_strings_or_node_metadata(folders: dict[str, Path], where: str) -> None:
    """The exporter's stack traces name files of the machine that exported; none may remain, also
    not inside a Loop body."""
    folder = folders["fp32"] if where == "export" else Path(__file__).parents[2] / "models" / "mnist"

    def nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
        found = list(graph.node)
        for node in graph.node:
            for attr in node.attribute:
                subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for sub in subgraphs:
                    assert not sub.doc_string
                    found += nodes(sub)
        return found

    for path in sorted(folder.glob("*.onnx")):
        model = onnx.load(str(path))
        every = nodes(model.graph)
        assert any(n.op_type == "Loop" for n in every) or path.stem not in ("FPN", "FPN1")
        assert not model.doc_string and not model.graph.doc_string, path.name
        assert not any(n.doc_string or len(n.metadata_props) for n in every), path.name


def test_calibration_and_certificate_are_recorded(folders: dict[str, Path]) -> None:
    folder = folders["fp32"]
    manifest = json.loads((folder / "manifest.json").read_text())
    fixed = manifest["calibration"]["fixed_iterations"]
    assert [r["iterations"] for r in fixed] == list(range(1, len(fixed) + 1))
    assert len(fixed) >= 4 and fixed[-1]["accuracy"] == fixed[-2]["accuracy"] == fixed[-3]["accuracy"]
    con = manifest["contraction"]
    assert 0 < con["empirical"]["measured_factor"] <= con["gamma"] * (1 + 1e-3) < 1
    assert (folder / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (folder / "README.md").read_text()
    assert "calibration.png" in card and "| 0.0001 |" in card


def test_measured_contraction_matches_the_truth_on_linear_maps(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fpn_serve"))
    from synthetic import linear_model  # type: ignore[import-not-found]

    x = np.random.default_rng(0).standard_normal((16, 1, 2, 2)).astype(np.float32)
    for scale in (0.5, 0.9, 1.5):
        engine = Engine.load(linear_model(tmp_path / f"s{scale}", scale=scale), device="cpu")
        measured = measure_contraction(engine, x)["measured_factor"]
        assert measured == pytest.approx(scale, rel=1e-2) or (scale > 1 and measured == float("inf"))


def test_a_non_contractive_export_is_refused_unless_allowed(
    checkpoint: Path,
    tmp_path: Path,
    mnist_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    real = export_mod.measure_contraction

    def says_expanding(engine: Engine, x: np.ndarray, **kw: Any) -> dict[str, Any]:
        return {**real(engine, x, **kw), "measured_factor": 1.25}

    monkeypatch.setattr(export_mod, "measure_contraction", says_expanding)
    assert _export(checkpoint, tmp_path / "no", mnist_root) == 1
    assert "not a contraction: measured factor 1.2500 >= 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    assert _export(checkpoint, tmp_path / "yes", mnist_root, "--allow-non-contractive") == 0


def test_verify_passes_a_sound_folder_and_names_what_is_wrong(
    checkpoint: Path, folders: dict[str, Path], tmp_path: Path, mnist_root: Path
) -> None:
    def verify(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "training.export", "--verify", str(folder), *args, "--data-root", str(mnist_root)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    ok = verify(folders["fp32"], str(checkpoint))
    assert ok.returncode == 0, ok.stderr
    assert "parity with" in ok.stderr and "every check passed" in ok.stderr

    broken = tmp_path / "broken"
    shutil.copytree(folders["fp32"], broken)
    with (broken / "S.onnx").open("ab") as fh:
        fh.write(b"\0")
    bad = verify(broken)
    assert bad.returncode == 1 and "S.onnx has sha256" in bad.stderr

    relabelled = tmp_path / "relabelled"
    shutil.copytree(folders["fp32"], relabelled)
    graph = onnx.load(str(relabelled / "T.onnx"))
    onnx.helper.set_model_props(graph, {"fpn.model": "fp32", "fpn.role": "S"})
    onnx.save(graph, str(relabelled / "T.onnx"))
    manifest = json.loads((relabelled / "manifest.json").read_text())
    manifest["graphs"]["T"]["sha256"] = hashlib.sha256((relabelled / "T.onnx").read_bytes()).hexdigest()
    (relabelled / "manifest.json").write_text(json.dumps(manifest))
    wrong = verify(relabelled)
    assert wrong.returncode == 1 and "its metadata says role 'S'" in wrong.stderr

    # an FPN1.onnx whose loop runs a slightly different T than T.onnx: well formed, wrong answers
    drifted = tmp_path / "drifted"
    shutil.copytree(folders["fp32"], drifted)
    t = onnx.load(str(drifted / "T.onnx"))
    for w in [i for i in t.graph.initializer if len(i.dims) == 2]:  # W, and gamma W where it is folded apart
        w.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(w) * np.float32(1.01), w.name))
    q, s = onnx.load(str(drifted / "Q.onnx")), onnx.load(str(drifted / "S.onnx"))
    onnx.save(build_single_loop_model(q, t, s), str(drifted / "FPN1.onnx"))
    export_mod.finish_graph(drifted / "FPN1.onnx", "fp32", "fpn1", 18)
    manifest = json.loads((drifted / "manifest.json").read_text())
    manifest["graphs"]["fpn1"]["sha256"] = hashlib.sha256((drifted / "FPN1.onnx").read_bytes()).hexdigest()
    (drifted / "manifest.json").write_text(json.dumps(manifest))
    off = verify(drifted)
    assert off.returncode == 1 and "FPN1.onnx loop and the three-graph loop disagree" in off.stderr, off.stderr


def test_bad_checkpoints_and_opsets_get_one_clear_line(checkpoint: Path, tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "training.export", *args], capture_output=True, text=True, timeout=120
        )

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    other = tmp_path / "other.pt"
    payload = torch.load(checkpoint, weights_only=True)
    payload["model_config"]["latent_dim"] = 64  # weights of a 46-wide latent under a 64-wide architecture
    torch.save(payload, other)
    for args, message in [
        ((str(truncated), "--out", str(tmp_path / "a")), "cannot be read"),
        ((str(other), "--out", str(tmp_path / "b")), "does not rebuild its model"),
        ((str(checkpoint), "--out", str(tmp_path / "c"), "--opset", "30"), "--opset 30 is not supported"),
    ]:
        proc = run(*args)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_q_reads_only_the_input_rows_and_columns_that_reach_z(folders: dict[str, Path]) -> None:
    import onnxruntime as ort

    q = onnx.load(str(folders["fp32"] / "Q.onnx"))
    crop = q.graph.node[0]
    assert crop.op_type == "Slice" and crop.input[0] == "x"
    ends = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in q.graph.initializer}[crop.input[2]]
    assert ends == [26, 26]  # 28 -> 3x3 conv -> 26 -> 2x2 pool -> 13 -> 3x3 conv -> 11 -> 2x2 pool reads 10
    # the same graph reading the whole input gives the same z to the bit
    whole = onnx.ModelProto()
    whole.CopyFrom(q)
    del whole.graph.node[0]
    kept = [i for i in whole.graph.initializer if i.name not in crop.input]
    del whole.graph.initializer[:]
    whole.graph.initializer.extend(kept)
    for node in whole.graph.node:
        node.input[:] = ["x" if name == crop.output[0] else name for name in node.input]
    x = np.random.default_rng(0).standard_normal((17, 1, 28, 28)).astype(np.float32)
    run = {
        name: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for name, m in [("crop", q), ("whole", whole)]
    }
    np.testing.assert_array_equal(run["crop"].run(None, {"x": x})[0], run["whole"].run(None, {"x": x})[0])
    assert crop_unread_input(whole).graph.node[0].op_type == "Slice"  # the pass finds it again
    # where every row is read (padding, or pools that tile), the graph stays as it is
    padded = onnx.ModelProto()
    padded.CopyFrom(whole)
    for attr in padded.graph.node[0].attribute:
        if attr.name == "pads":
            attr.ints[:] = [1, 1, 1, 1]
    assert crop_unread_input(padded) is padded


@pytest.mark.parametrize("precision", ["fp32", "int8"])  # int8 quantizes Q only: T stays float32
def test_the_loops_compute_the_injection_once(folders: dict[str, Path], precision: str) -> None:
    for graph in ("FPN.onnx", "FPN1.onnx"):
        model = onnx.load(str(folders[precision] / graph))
        (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
        outer = [n for n in model.graph.node if n.op_type == "MatMul" and "z" in n.input]
        assert len(outer) == 1, graph  # z W, before the loop
        assert not any("z" in n.input for n in loop.attribute[0].g.node), graph  # the body never reads z


def test_fp16_loops_keep_t_whole(folders: dict[str, Path]) -> None:
    # ONNX Runtime runs fp16 on the CPU through casts, which it can drop inside step.onnx but not at
    # a loop boundary: a term moved out of the loop would round differently from the step graph
    model = onnx.load(str(folders["fp16"] / "FPN1.onnx"))
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    assert any("z" in n.input for n in loop.attribute[0].g.node)


def test_an_exported_mnist_manifest_says_its_images_are_light_on_dark(folders: dict[str, Path]) -> None:
    for folder in folders.values():
        assert json.loads((folder / "manifest.json").read_text())["input"]["dark_background"] is True
        assert load_manifest(folder).input.dark_background is True


def _ignoring_tol(folder: Path, stop_at: float) -> None:
    """Rewrite ``folder``'s FPN1.onnx so that its loop stops at ``stop_at`` whatever tol it is given."""
    q, t, s = (onnx.load(str(folder / f"{r}.onnx")) for r in ("Q", "T", "S"))
    model = build_single_loop_model(q, t, s)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(stop_at, np.float32), "fixed_tol"))
    (loop,) = [n for n in model.graph.node if n.op_type == "Loop"]
    (cond,) = [n for n in loop.attribute[0].g.node if n.name == "body/cond"]
    cond.input[:] = [cond.input[0], "fixed_tol"]
    onnx.save(model, str(folder / "FPN1.onnx"))
    export_mod.finish_graph(folder / "FPN1.onnx", "fp32", "fpn1", 18)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["graphs"]["fpn1"]["sha256"] = hashlib.sha256((folder / "FPN1.onnx").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_verify_holds_the_single_graph_loops_to_the_manifests_tol(
    folders: dict[str, Path], tmp_path: Path, mnist_root: Path
) -> None:
    folder = tmp_path / "stuck"
    shutil.copytree(folders["fp32"], folder)
    _ignoring_tol(folder, 1e-4)  # right at 1e-4 only
    manifest = json.loads((folder / "manifest.json").read_text())
    for tol, sound in ((1e-4, True), (1e-2, False)):
        manifest["solver"]["tol"] = tol
        (folder / "manifest.json").write_text(json.dumps(manifest))
        problems = export_mod.verify(folder, None, mnist_root, 256)
        if sound:
            assert problems == []
        else:
            assert problems == [
                "the single-graph FPN1.onnx loop and the three-graph loop disagree on iterations at tol=0.01"
            ]


def test_parity_counts_the_labels_that_really_differ(
    checkpoint: Path, folders: dict[str, Path], mnist_root: Path
) -> None:
    from training.checkpoint import load_checkpoint
    from training.data import load_split

    model, _, _ = load_checkpoint(checkpoint)
    engine = Engine.load(folders["fp32"], device="cpu")
    test = load_split("mnist", mnist_root, train=False, limit=256)
    x = test.normalise(test.images).numpy()
    tol, max_iter = engine.manifest.solver.tol, engine.manifest.solver.max_iter
    exact = export_mod.check_parity(model, engine, x, tol, max_iter)
    assert exact["label_disagreements"] == 0 and exact["max_logit_gap"] <= export_mod.LOGIT_ATOL
    with torch.no_grad():  # S drifts from the exported graph: some labels change
        model.S.weight.add_(0.5 * torch.randn(model.S.weight.shape, generator=torch.Generator().manual_seed(0)))
        torch_labels = model(torch.from_numpy(x), tol, max_iter)[0].argmax(1).numpy()
    differ = int((torch_labels != engine.classify(x, tol=tol, max_iter=max_iter).labels).sum())
    assert 0 < differ < len(x)
    record = export_mod.check_parity(model, engine, x, tol, max_iter, atol=1e9, allowed_label_disagreements=len(x))
    assert record["label_disagreements"] == differ
    with pytest.raises(export_mod.ExportError, match=f"{differ} labels differ at tol="):
        export_mod.check_parity(model, engine, x, tol, max_iter, atol=1e9)


def test_calibration_uses_held_out_training_images_and_records_the_certificate(
    folders: dict[str, Path], mnist_root: Path
) -> None:
    """The checkpoint trained on the first 4,000 training images: the table is measured on the next
    400 (never trained on, not the test images), the certified stop has its row, and S's label
    certificate is the norms of its weight rows' differences."""
    from training.data import load_split

    folder = folders["fp32"]
    manifest = load_manifest(folder)
    cal = manifest.calibration
    assert cal["split"] == "held-out training images 4000-4399 (never trained on)"
    train = load_split("mnist", mnist_root, train=True)
    x = train.normalise(train.images[4000:4400]).numpy()
    y = train.labels[4000:4400].numpy()
    engine = Engine.load(folder, device="cpu")
    for row in cal["tolerances"]:
        result = engine.classify(x, tol=row["tol"], max_iter=row["max_iter"])
        assert row["images"] == 400 and row["correct"] == int((result.labels == y).sum())
    stop = cal["certified_stop"]
    certified = engine.classify(x, stop="certified")
    assert stop["mean_iterations"] == pytest.approx(float(certified.iterations.mean()), abs=1e-3)
    assert stop["certified_fraction"] == pytest.approx(float(certified.certified.mean()))
    s_graph = onnx.load(str(folder / "S.onnx")).graph
    weight = next(onnx.numpy_helper.to_array(t) for t in s_graph.initializer if len(t.dims) == 2).astype(np.float64)
    pair = np.linalg.norm(weight[:, None] - weight[None], axis=2)
    table = np.asarray(manifest.certificate.pair_lipschitz)  # type: ignore[union-attr]
    assert (table >= pair).all() and np.allclose(table, pair, rtol=1e-12)
