"""Training runs: what a run folder holds, seeded stratified splits, resume, refusal, and learning."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from model_support import tiny_train_config, write_pattern_dataset

from asirra.config import TrainConfig
from asirra.models import load_model
from asirra.splits import stratified_split
from asirra.stats import stratified_subset
from asirra.training import train

RUN_FILES = {"config.json", "env.json", "split.json", "metrics.csv", "curves.png", "checkpoint.pt", "model",
             "metrics.json", "unusable.json"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pattern_dataset(tmp_path_factory.mktemp("data") / "train", per_class=8)


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    """One completed epoch of a two-epoch plan (trained once, copied by the tests that change it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASIRRA_CACHE", str(tmp_path_factory.mktemp("cache")))
        return train(tiny_train_config(data, tmp_path_factory.mktemp("runs") / "run", epochs=1, batch_size=8))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


def metrics_rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def copy_of(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_run_folder_holds_config_environment_split_metrics_plots_checkpoint_and_model(first_run, data):
    assert RUN_FILES <= {p.name for p in first_run.iterdir()}
    config = TrainConfig.from_dict(json.loads((first_run / "config.json").read_text()))
    assert config.model == "seed-cnn" and config.data == str(data) and config.augment.rotation_deg > 0
    assert {"python", "torch", "threads"} <= json.loads((first_run / "env.json").read_text()).keys()
    assert [row["epoch"] for row in metrics_rows(first_run)] == ["1"]
    assert (first_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    split = json.loads((first_run / "split.json").read_text())
    assert len(split["train"]) == 12 and len(split["val"]) == 4
    assert not set(split["train"]) & set(split["val"])
    assert sorted(name.split(".")[0] for name in split["val_names"]) == ["cat", "cat", "dog", "dog"]

    metrics = json.loads((first_run / "metrics.json").read_text())
    assert metrics["val"]["n"] == 4 and 0 <= metrics["val"]["accuracy"] <= 1


def test_fitted_temperature_is_saved_with_the_model(first_run):
    _, config = load_model(first_run)
    metrics = json.loads((first_run / "metrics.json").read_text())
    assert config.temperature == pytest.approx(metrics["temperature"])
    assert config.temperature > 0
    assert json.loads((first_run / "model" / "model.json").read_text())["temperature"] == config.temperature
    assert config.extra["train_config"]["model"] == "seed-cnn"
    # Calibration is fitted to the validation log loss, so it can only lower it there.
    assert metrics["val"]["log_loss"] <= metrics["val_uncalibrated"]["log_loss"] + 1e-9


def test_the_same_seed_trains_the_same_weights(first_run, data, tmp_path):
    torch.rand(10)  # whatever ran before in this process must not matter
    again = train(tiny_train_config(data, tmp_path / "again", epochs=1, batch_size=8))
    first, _ = load_model(first_run)
    second, _ = load_model(again)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name


def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = np.array([0] * 30 + [1] * 20)
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    assert len(val_idx) == 10 and np.bincount(labels[val_idx]).tolist() == [6, 4]
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(50))

    again = stratified_split(labels, 0.2, seed=0)
    other = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(val_idx, again[1])
    assert not np.array_equal(val_idx, other[1])

    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_stratified_subset_keeps_class_balance():
    labels = np.array([0] * 60 + [1] * 40)
    keep = stratified_subset(labels, 20, seed=0)
    assert np.bincount(labels[keep]).tolist() == [12, 8]
    assert np.array_equal(keep, stratified_subset(labels, 20, seed=0))
    assert np.array_equal(stratified_subset(labels, None, seed=0), np.arange(100))


def test_resume_continues_from_the_last_completed_epoch(first_run, data, tmp_path):
    run = copy_of(first_run, tmp_path)
    before = metrics_rows(run)
    split = (run / "split.json").read_text()

    train(tiny_train_config(data, run, epochs=2, batch_size=8), resume=True)

    rows = metrics_rows(run)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[0] == before[0]  # epoch 1 was not trained again
    assert (run / "split.json").read_text() == split  # the same validation images


def test_a_killed_epoch_logged_without_its_checkpoint_is_dropped_on_resume(first_run, data, tmp_path):
    run = copy_of(first_run, tmp_path)
    with open(run / "metrics.csv", "a") as f:
        f.write("2,99,0,99,0,0.001,1\n")  # the process died after logging epoch 2, before its checkpoint

    train(tiny_train_config(data, run, epochs=2, batch_size=8), resume=True)

    rows = metrics_rows(run)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert rows[1]["train_loss"] != "99"


def test_a_first_epoch_killed_before_its_checkpoint_is_not_logged_twice(first_run, data, tmp_path):
    run = copy_of(first_run, tmp_path)
    (run / "checkpoint.pt").unlink()  # killed after logging epoch 1, before its checkpoint landed

    train(tiny_train_config(data, run, epochs=1, batch_size=8), resume=True)
    assert [row["epoch"] for row in metrics_rows(run)] == ["1"]


def test_existing_run_is_refused_without_resume(first_run, data):
    config_before = (first_run / "config.json").read_text()
    with pytest.raises(ValueError, match="already holds a training run; pass --resume"):
        train(tiny_train_config(data, first_run))
    assert (first_run / "config.json").read_text() == config_before


def test_resume_refuses_a_missing_run_or_a_different_model(first_run, data, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"):
        train(tiny_train_config(data, tmp_path / "empty"), resume=True)
    with pytest.raises(ValueError, match="holds a training run made with other settings .*model"):
        train(tiny_train_config(data, first_run, model="effnet-lite0"), resume=True)


@pytest.mark.slow
def test_seed_cnn_learns_two_patterns_per_class(tmp_path):
    data = write_pattern_dataset(tmp_path / "train", per_class=40)
    # Batch 8 gives enough steps per epoch for batch norm's running statistics to catch up
    # with the weights; validation runs in eval mode on those statistics.
    run = train(tiny_train_config(data, tmp_path / "run", epochs=8, batch_size=8))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["n"] == 16
    assert metrics["val"]["accuracy"] > 0.9


def test_train_config_file_reproduces_a_run_and_command_line_options_override_it(first_run, tmp_path):
    from typer.testing import CliRunner

    from asirra.cli import app

    again = tmp_path / "again"
    result = CliRunner().invoke(app, ["train", "--config", str(first_run / "config.json"), "--out", str(again)])
    assert result.exit_code == 0, result.output
    saved, reproduced = (json.loads((run / "config.json").read_text()) for run in (first_run, again))
    assert {k for k in saved if saved[k] != reproduced[k]} == {"out"}
    # Same data, split, seed and settings: the same first epoch, to the printed digit.
    assert metrics_rows(again)[0]["train_loss"] == metrics_rows(first_run)[0]["train_loss"]

    longer = CliRunner().invoke(app, ["train", "--config", str(first_run / "config.json"), "--out", str(tmp_path / "b"),
                                      "--epochs", "2", "--image-size", "64"])
    assert longer.exit_code == 0, longer.output
    changed = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (changed["epochs"], changed["image_size"], changed["batch_size"]) == (2, 64, saved["batch_size"])
    assert json.loads((tmp_path / "b" / "model" / "model.json").read_text())["image_size"] == 64


def test_seed_cnn_architecture_options_reach_the_saved_model(data, tmp_path):
    from asirra.models import load_model

    run = train(tiny_train_config(data, tmp_path / "run", epochs=1, batch_size=8, image_size=64,
                                  model_options={"widths": [8, 16], "dense": 32, "batch_norm": False}))
    net, config = load_model(run)
    assert config.image_size == 64 and config.options == {"widths": [8, 16], "dense": 32, "batch_norm": False}
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)] == [8, 16]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())


def test_bf16_autocast_defaults_to_what_the_cpu_computes_natively():
    import torch

    from asirra.config import TrainConfig
    from asirra.training import use_bf16

    assert TrainConfig(data="d", out="o").bf16 is None
    assert use_bf16(None) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert use_bf16(True) and not use_bf16(False)  # an explicit setting is obeyed
