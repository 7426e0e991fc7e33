"""`asirra ablate`: the corrected resampled t-test, variants on the baseline's folds, "half the
data" touching only training folds, and a report listing every variant."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from test_crossval import TOY_MODEL, write_distinct_dataset


def test_corrected_t_test_matches_a_hand_computation():
    from asirra.ablate import corrected_paired_ttest

    # d = [0.03, 0.04, 0.01]: mean 0.026667, sample variance 2.3333e-4; k = 3, n_test / n_train = 1/2.
    # Corrected: se = sqrt((1/3 + 1/2) * 2.3333e-4) = 0.013944, t = 1.91237; naive: se = 0.0088192, t = 3.02372.
    # With 2 degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2); t_0.975,2 = 4.302653.
    result = corrected_paired_ttest([0.80, 0.82, 0.79], [0.83, 0.86, 0.80], test_train_ratio=0.5)
    assert result["difference"] == pytest.approx(0.0266667, abs=1e-6)
    assert result["p"] == pytest.approx(1 - 1.91237 / math.sqrt(1.91237**2 + 2), abs=1e-5)
    assert result["ci95"] == pytest.approx([0.0266667 - 4.302653 * 0.0139443, 0.0266667 + 4.302653 * 0.0139443], abs=1e-5)
    assert result["naive_p"] == pytest.approx(1 - 3.02372 / math.sqrt(3.02372**2 + 2), abs=1e-5)
    naive_width = result["naive_ci95"][1] - result["naive_ci95"][0]
    assert naive_width == pytest.approx(2 * 4.302653 * 0.0088192, abs=1e-5)
    assert result["ci95"][1] - result["ci95"][0] > naive_width and result["p"] > result["naive_p"]


def test_identical_arms_differ_by_nothing():
    from asirra.ablate import corrected_paired_ttest

    result = corrected_paired_ttest([0.7, 0.8, 0.75], [0.7, 0.8, 0.75], 0.5)
    assert result["difference"] == 0 and result["p"] == 1.0


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BASELINE = f"""
[baseline]
image_size = 32
epochs = 1
batch_size = 16
lr = 3e-3
workers = 1
bf16 = false
model_options = {{ widths = {TOY_MODEL["widths"]}, dense = 16, batch_norm = false }}
"""


def test_variants_merge_model_options_and_refuse_settings_that_move_the_folds(tmp_path):
    from asirra.ablate import arm_config, read_ablation

    ok = read_ablation(write_toml(tmp_path / "ok.toml", BASELINE + """
[cv]
folds = 2
[variants.wide]
model_options = { dense = 32 }
[variants.plain]
augment = false
optimizer = "rmsprop"
"""))
    wide = arm_config(ok, "wide", "data", "out").config
    assert wide.model_options == {"widths": [8, 16], "dense": 32, "batch_norm": False}
    plain = arm_config(ok, "plain", "data", "out")
    assert plain.config.augment is None and plain.config.optimizer == "rmsprop" and plain.train_fraction == 1.0
    (tmp_path / "keys.csv").write_text("key,name\nabc,cat.1.jpg\ndef,dog.2.jpg\n")
    cleaned = read_ablation(write_toml(tmp_path / "clean.toml", BASELINE + '[variants.clean]\ndrop_from_training = "keys.csv"\n'))
    assert arm_config(cleaned, "clean", "data", "out").drop_from_training == {"abc", "def"}  # relative to the file
    for bad, message in [("limit = 10", "may not override limit"), ("seed = 3", "may not override seed"),
                         ("colour = 1", "unknown training settings: colour"),
                         ('optimizer = "adam"', "unknown optimizer 'adam'"), ("train_fraction = 2", "train_fraction")]:
        with pytest.raises(ValueError, match=message):
            read_ablation(write_toml(tmp_path / "bad.toml", BASELINE + f"[variants.v]\n{bad}\n"))


def test_ablate_command_reports_a_bad_file_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from asirra.cli import app

    bad = write_toml(tmp_path / "bad.toml", BASELINE + "[variants.v]\nlimit = 10\n")
    result = CliRunner().invoke(app, ["ablate", "--config", str(bad), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_optimizer_setting_chooses_the_optimizer():
    import torch

    from asirra.config import TrainConfig
    from asirra.training import _make_optimizer

    groups = lambda: [{"params": [torch.nn.Parameter(torch.zeros(2))]}]  # noqa: E731
    for name, kind in [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop)]:
        assert type(_make_optimizer(groups(), TrainConfig(data=".", out=".", optimizer=name))) is kind


# ---- a whole ablation on the toy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    from asirra.ablate import read_ablation, run_ablation

    root = tmp_path_factory.mktemp("ablate")
    data = write_distinct_dataset(root / "data", per_class=12)
    toml = write_toml(root / "a.toml", BASELINE + f"""
cache_dir = "{root / 'cache'}"
[cv]
folds = 3
[variants.half-data]
train_fraction = 0.5
[variants.sgd]
optimizer = "sgd"
lr = 0.01
""")
    run_ablation(read_ablation(toml), str(data), root / "out")
    return root / "out"


def split_of(run: Path) -> dict:
    return json.loads((run / "split.json").read_text())


def test_half_the_data_trains_on_half_and_validates_on_the_baselines_folds(ablation):
    for fold in ("fold-1", "fold-2", "fold-3"):
        base, half = split_of(ablation / "baseline" / fold), split_of(ablation / "half-data" / fold)
        assert half["val"] == base["val"]
        assert set(half["train"]) < set(base["train"])
        assert len(half["train"]) == round(len(base["train"]) / 2)
        assert not set(half["train"]) & set(base["val"])


def test_every_variant_is_scored_on_the_same_folds(ablation):
    folds = (ablation / "folds.json").read_text()
    for arm in ("baseline", "half-data", "sgd"):
        assert json.loads((ablation / arm / "folds.json").read_text())["val_keys"] == json.loads(folds)["val_keys"]
        assert [split_of(ablation / arm / f"fold-{k}")["val"] for k in (1, 2, 3)] == \
               [split_of(ablation / "baseline" / f"fold-{k}")["val"] for k in (1, 2, 3)]
    assert json.loads((ablation / "sgd" / "fold-1" / "config.json").read_text())["optimizer"] == "sgd"


def test_report_lists_every_variant_with_its_comparison(ablation):
    report = (ablation / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| variant")
            and not line.startswith("| ---")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["baseline", "half-data", "sgd"]
    saved = json.loads((ablation / "ablation.json").read_text())
    for name in ("half-data", "sgd"):
        c = saved["comparison"][name]["accuracy"]
        per_fold = [v["accuracy"] - b["accuracy"] for v, b in
                    zip(saved["arms"][name]["per_fold"], saved["arms"]["baseline"]["per_fold"])]
        assert c["difference"] == pytest.approx(np.mean(per_fold))
        assert f"{c['p']:.3f}" in next(row for row in rows if row.startswith(f"| {name} "))
        assert f"**{name}**" in report
    assert (ablation / "ablation.png").stat().st_size > 0


def test_a_finished_ablation_reruns_without_training(ablation, monkeypatch):
    import asirra.training
    from asirra.ablate import read_ablation, run_ablation

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(asirra.training, "train_on", no_training)
    toml = ablation.parent / "a.toml"
    before = (ablation / "report.md").read_text()
    run_ablation(read_ablation(toml), str(ablation.parent / "data"), ablation)
    assert (ablation / "report.md").read_text() == before
    assert run_ablation(read_ablation(toml), str(ablation.parent / "data"), ablation, train=False)["comparison"]
    assert (ablation / "report.md").read_text() == before


def test_a_report_made_mid_ablation_lists_the_unfinished_variants(ablation):
    from asirra.ablate import read_ablation, run_ablation

    toml = ablation.parent / "a.toml"
    longer = write_toml(ablation.parent / "longer.toml", toml.read_text() + "[variants.not-run]\nepochs = 2\n")
    run_ablation(read_ablation(longer), str(ablation.parent / "data"), ablation, train=False)
    report = (ablation / "report.md").read_text()
    assert "Not finished yet (rerun the ablation to continue): not-run." in report
    assert not (ablation / "not-run").exists()
