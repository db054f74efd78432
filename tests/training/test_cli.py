"""fpn-train and fpn-export as a user runs them: real MNIST, real files, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fpn_serve import Engine, load_manifest
from training import export as export_mod
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.train import cli as train_cli
from training.train import loss_sum, make_scheduler
from training.train import parse_args as train_parse


def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    rc = train_cli(
        [
            "--epochs",
            "2",
            "--limit-train",
            "4000",
            "--limit-test",
            "1000",
            "--batch-size",
            "100",
            "--out",
            str(out),
            "--data-root",
            str(mnist_root),
            "--seed",
            "3",
        ]
    )
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    rc = export_mod.cli(
        [
            str(trained / "checkpoint.pt"),
            "--out",
            str(out),
            "--data-root",
            str(mnist_root),
            "--calibration-limit",
            "600",
            "--parity-images",
            "256",
        ]
    )
    assert rc == 0
    return out


@pytest.mark.slow
def test_training_writes_metrics_and_a_weights_only_checkpoint(trained: Path) -> None:
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "test_accuracy", "mean_iterations", "max_iterations", "seconds"):
        assert all(key in r for r in rows), key
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert rows[1]["test_accuracy"] > 0.85  # real digits: a broken pipeline stays near 0.1
    assert 1 <= rows[1]["mean_iterations"] <= rows[1]["max_iterations"] <= 50
    for r in rows:  # the certified bound really bounds the measured factor, and memory is recorded
        assert 0 < r["measured_contraction"] <= r["lipschitz_bound"] * (1 + 1e-4) <= 0.99 * (1 + 1e-4)
        assert r["peak_memory_mb"] > 10 and r["peak_memory_kind"] == "process_peak_rss"
    assert (trained / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = torch.load(trained / "checkpoint.pt", weights_only=True)
    assert payload["model_config"]["arch"] == "mnist_conv"
    assert payload["contraction"]["measured"] == rows[-1]["measured_contraction"]
    assert payload["dataset_spec"]["mean"] == (0.1307,) and payload["dataset_spec"]["labels"][7] == "7"
    model, cfg, _ = load_checkpoint(trained / "checkpoint.pt")
    assert model.num_parameters() == 84_182 and cfg.limit_train == 4000


@pytest.mark.slow
def test_export_writes_a_valid_folder_that_matches_torch(exported: Path, trained: Path, mnist_root: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [
        "FPN.onnx",
        "FPN1.onnx",
        "Q.onnx",
        "README.md",
        "S.onnx",
        "T.onnx",
        "calibration.png",
        "manifest.json",
        "metrics.jsonl",
        "step.onnx",
        "steps.onnx",
    ]
    manifest = load_manifest(exported)
    assert manifest.name == "tiny" and manifest.input.shape == (1, 28, 28) and manifest.latent_shape == (46,)
    assert 0 < manifest.contraction.gamma <= 0.99 + 1e-6
    # a tighter tolerance never takes fewer iterations on average
    rows = manifest.calibration["tolerances"]
    means = [row["mean_iterations"] for row in rows]
    assert [row["tol"] for row in rows] == sorted((r["tol"] for r in rows), reverse=True)
    assert means == sorted(means)
    assert all(r["latency_us_batch1"] > 0 and r["latency_us_per_input_batch256"] > 0 for r in rows)

    from training.data import load_split

    test = load_split("mnist", mnist_root, train=False, limit=300)
    x = test.normalise(test.images)
    model, _, _ = load_checkpoint(trained / "checkpoint.pt")
    engine = Engine.load(exported, device="cpu")
    with torch.no_grad():
        torch_logits, info = model(x, 1e-4, 100)
    result = engine.classify(x.numpy(), tol=1e-4, max_iter=100)
    assert np.array_equal(result.labels, torch_logits.argmax(1).numpy())
    same = result.iterations == info.iterations.numpy()
    assert same.mean() > 0.95
    np.testing.assert_allclose(result.logits[same], torch_logits.numpy()[same], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_refuses_when_onnx_and_torch_disagree(
    trained: Path, tmp_path: Path, mnist_root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(export_mod, "LOGIT_ATOL", -1.0)  # no gap can pass: the check must trip
    out = tmp_path / "never"
    rc = export_mod.cli(
        [
            str(trained / "checkpoint.pt"),
            "--out",
            str(out),
            "--data-root",
            str(mnist_root),
            "--calibration-limit",
            "300",
            "--parity-images",
            "256",
        ]
    )
    assert rc == 1
    assert "disagree" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.slow
def test_export_will_not_overwrite_a_folder_without_force(trained: Path, exported: Path) -> None:
    proc = run("training.export", str(trained / "checkpoint.pt"), "--out", str(exported))
    assert proc.returncode == 1
    assert "not empty" in proc.stderr and "--force" in proc.stderr


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("training.train", ["--dataset", "imagenet", "--out", "x"], "invalid choice: 'imagenet'"),
        (
            "training.train",
            ["--arch", "vgg", "--out", "x"],
            "unknown architecture 'vgg'; available: cifar10_conv, cifar10_resnet, mnist_conv, mnist_fc, svhn_conv",
        ),
        ("training.train", ["--dataset", "svhn", "--out", "x"], "mnist_conv is built for 1x28x28 inputs but svhn"),
        (
            "training.train",
            ["--dataset", "cifar10", "--arch", "cifar10_conv", "--out", "x"],
            "put the folder cifar-10-batches-py",
        ),
        ("training.train", ["--preset", "svhn", "--out", "x"], "put train_32x32.mat and test_32x32.mat"),
        ("training.train", ["--lr-decay", "1.5", "--out", "x"], "--lr-decay must lie in (0, 1]"),
        ("training.train", ["--epochs", "0", "--out", "x"], "--epochs must be >= 1"),
        ("training.export", ["missing.pt", "--out", "x"], "checkpoint missing.pt does not exist"),
    ],
)
def test_cli_mistakes_get_one_clear_line(module: str, args: list[str], expected: str, tmp_path: Path) -> None:
    env = {**os.environ, "FPN_OFFLINE": "1"}  # SVHN/CIFAR-10: no download attempt in this test
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env
    )
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_preset_sets_the_papers_values_and_explicit_flags_override_it() -> None:
    args = train_parse(["--preset", "cifar10", "--out", "x"])
    assert (args.dataset, args.arch, args.lr, args.tol, args.max_iter) == ("cifar10", "cifar10_conv", 5e-4, 1e-3, 2000)
    assert (args.lr_schedule, args.loss) == ("cosine", "ce")
    args = train_parse(["--preset", "mnist", "--out", "x", "--lr", "1e-3", "--loss", "ce"])
    assert (args.lr, args.loss, args.lr_schedule, args.lr_decay, args.tol) == (1e-3, "ce", "step", 0.98, 1e-6)
    args = train_parse(["--out", "x"])  # no preset: fpn-train's own defaults
    assert (args.lr, args.loss, args.lr_schedule) == (1e-3, "ce", "cosine")


def test_the_step_schedule_decays_every_n_epochs_and_mse_compares_probabilities() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    sched = make_scheduler(opt, TrainConfig(lr_schedule="step", lr_step_epochs=3, lr_decay=0.5))
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    logits = torch.tensor([[10.0, -10.0], [0.0, 0.0]])
    y = torch.tensor([0, 1])
    assert float(loss_sum(logits, y, "mse")) == pytest.approx(0.0 + 0.25 + 0.25, abs=1e-6)
    assert float(loss_sum(logits, y, "ce")) == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-4)


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    proc = run("training.export", str(bad), "--out", str(tmp_path / "m"))
    assert proc.returncode == 1
    assert "cannot be read" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_an_explicit_twin_is_not_exported_as_a_fixed_point_network(tmp_path: Path) -> None:
    from training.checkpoint import save_checkpoint
    from training.config import ModelConfig
    from training.fpn import FPN

    save_checkpoint(tmp_path / "checkpoint.pt", FPN(ModelConfig()), TrainConfig(backprop="explicit"))
    proc = run("training.export", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "m"))
    assert proc.returncode == 1 and "explicit twin" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_an_unwritable_output_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run("training.train", "--out", str(blocker / "sub"), "--epochs", "1")
    assert proc.returncode == 1
    assert "cannot create output folder" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(
    tmp_path: Path, mnist_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import train as train_mod

    common = [
        "--epochs",
        "2",
        "--limit-train",
        "640",
        "--limit-test",
        "128",
        "--batch-size",
        "64",
        "--seed",
        "5",
        "--dropout",
        "0.1",
        "--augment-shift",
        "2",
        "--augment-rotate",
        "8",
        "--data-root",
        str(mnist_root),
    ]
    assert train_cli([*common, "--out", str(tmp_path / "full")]) == 0

    real = train_mod.train_one_epoch

    def interrupted(*args: object, **kwargs: object) -> dict[str, float]:
        if args[5] == 2:  # the epoch number: stop the run as Ctrl-C would
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "train_one_epoch", interrupted)
    assert train_cli([*common, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert train_cli(["--resume", str(cut / "checkpoint.pt"), "--out", str(cut), "--data-root", str(mnist_root)]) == 0

    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == full["epoch"] == 2
    for name, tensor in full["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    assert len((cut / "metrics.jsonl").read_text().splitlines()) == 2


def test_train_and_export_without_torch_say_what_to_install() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; from training.entry import train; sys.argv = ['fpn-train']; train()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "pip install 'fpn-serve[train]'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_on_the_global_batch(tmp_path: Path, mnist_root: Path) -> None:
    common = [
        "--epochs",
        "2",
        "--limit-train",
        "256",
        "--limit-test",
        "64",
        "--seed",
        "4",
        "--data-root",
        str(mnist_root),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ddp = subprocess.run(
        [*torchrun, "-m", "training.train", *common, "--batch-size", "32", "--out", str(tmp_path / "ddp")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    # one thread, like each torchrun process: oneDNN's NHWC convolution sums in a thread-dependent order
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_cli([*common, "--batch-size", "64", "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    assert single == 0
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in rows] == [2, 2]
    assert all(r["param_divergence"] == 0.0 for r in rows)  # the two processes stayed identical
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["state_dict"]
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    one_rows = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] == pytest.approx(one_rows[-1]["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_torchrun_with_batchnorm_matches_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """cifar10_resnet's BatchNorm layers under two processes normalise by the global batch, and every
    process keeps the running statistics one process would: parameters and buffers alike. 17 images
    in global batches of 8 leave the second process an empty slice of the last batch."""
    script = Path(__file__).with_name("synthetic_run.py")
    common = ["--dataset", "cifar10", "--arch", "cifar10_resnet", "--epochs", "2", "--limit-train", "17"]
    common += ["--limit-test", "8", "--max-iter", "20", "--seed", "2"]  # no augmentation: it draws per process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "ddp": [*torchrun, str(script), *common, "--batch-size", "4"],
        "one": [sys.executable, str(script), *common, "--batch-size", "8"],
    }
    for name, cmd in runs.items():
        cmd = [*cmd, "--out", str(tmp_path / name)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in rows] == [2, 2]
    assert all(r["param_divergence"] == 0.0 for r in rows)  # parameters and running statistics in step
    a = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["state_dict"]
    buffers = [name for name in b if "running_" in name or "num_batches_tracked" in name]
    assert len(buffers) == 3 * 57  # every BatchNorm of the ResNet-56 trunk
    assert int(b[buffers[2]]) == 2 * 3  # num_batches_tracked: three batches per epoch
    assert a[buffers[0]].dtype == torch.float64  # synthetic_run trains in float64: agreement to rounding
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-7, atol=1e-9, msg=name)
