"""TrainConfig is the one source of fpn-train's settings: flags, defaults, bounds and the stored config."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from training import presets
from training.backprop import BACKPROP
from training.config import RunPaths, TrainConfig, train_config_from_dict
from training.data import DATASETS
from training.errors import ConfigError
from training.flags import config_from_args, flag_name
from training.train import get_args_parser, model_config_for, parse_args


def test_every_field_is_a_flag_whose_default_is_the_fields() -> None:
    args = parse_args(["--out", "x"])
    assert config_from_args(TrainConfig, args) == TrainConfig()
    assert config_from_args(RunPaths, args) == RunPaths(out="x")
    given = parse_args(["--out", "x", "--epochs", "3", "--no-augment-flip", "--latent-dim", "7", "--lr", "0.5"])
    assert config_from_args(TrainConfig, given) == TrainConfig(epochs=3, latent_dim=7, lr=0.5)
    flags = {s for action in get_args_parser()._actions for s in action.option_strings}
    for cls in (TrainConfig, RunPaths):
        assert {flag_name(f.name) for f in dataclasses.fields(cls)} <= flags


def test_help_names_every_mode_data_set_and_output() -> None:
    cmd = [sys.executable, "-m", "training.train", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for word in [*BACKPROP, *DATASETS, "checkpoint.pt", "metrics.jsonl", "curves.png", "--resume CKPT", "--out DIR"]:
        assert word in text, word
    assert "--augment-flip, --no-augment-flip" in text and "(default: 128)" in text  # a bool and a default


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gamma", "1"], "--gamma must lie in (0, 1), got 1.0"),
        (["--dropout", "1"], "--dropout must lie in [0, 1), got 1.0"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--tol", "0"], "--tol must be > 0, got 0.0"),
        (["--limit-test", "0"], "--limit-test must be >= 1, got 0"),
        (["--augment-rotate", "181"], "--augment-rotate must lie in [0, 180], got 181.0"),
    ],
)
def test_a_value_outside_its_fields_bounds_is_refused_by_name(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--out", "x", *flags])
    assert message in capsys.readouterr().err
    field = flags[0][2:].replace("-", "_")
    value = int(flags[1]) if field == "limit_test" else float(flags[1])
    with pytest.raises(ConfigError, match=f"^{field} must"):  # the same check where a config is built in code
        TrainConfig(**{field: value})


def test_every_preset_is_a_valid_train_config() -> None:
    for name, values in presets.PRESETS.items():
        cfg = TrainConfig(**values)  # every key a field, every value within its bounds
        assert config_from_args(TrainConfig, parse_args(["--preset", name, "--out", "x"])) == dataclasses.replace(
            cfg, preset=name
        )


def test_a_stored_config_rebuilds_it_and_tolerates_older_and_newer_keys() -> None:
    cfg = TrainConfig(dataset="cifar10", arch="cifar10_conv", epochs=3, augment_flip=True)
    assert train_config_from_dict(dataclasses.asdict(cfg)) == cfg
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("arch", "gamma")}
    assert train_config_from_dict({**old, "retired_setting": 1}) == dataclasses.replace(cfg, arch="mnist_conv")
    with pytest.raises(ConfigError, match="epochs must be >= 1"):
        train_config_from_dict({"epochs": 0})


def test_the_model_comes_from_the_run_and_its_data_set() -> None:
    model = model_config_for(TrainConfig(dataset="svhn", arch="svhn_conv", gamma=0.5, dropout=0.1))
    assert (model.latent_dim, model.in_channels, model.num_classes, model.gamma) == (100, 3, 10, 0.5)
    assert model_config_for(TrainConfig(latent_dim=12)).latent_dim == 12
    with pytest.raises(ValueError, match="choose an architecture for this dataset"):
        model_config_for(TrainConfig(dataset="cifar10"))
