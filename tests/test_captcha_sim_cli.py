"""`asirra captcha simulate` and `asirra captcha defend` from the command line."""

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import asirra.predict
from asirra.cli import app
from asirra.models import ModelConfig
from asirra.predict import Classifier

runner = CliRunner()


class ColourNet(torch.nn.Module):
    """Logit of "dog" = how much bluer than red the image is: the test images are painted to order."""

    def forward(self, x):
        return ((x[:, 2] - x[:, 0]).mean(dim=(1, 2)) / 10).unsqueeze(1)


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
    """The real Classifier around ColourNet, returned by load_classifier whatever model is asked for.

    Tests pass --backend torch: the ONNX backend would export ColourNet, which proves nothing here.
    """
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))
    loaded = {}

    def load_classifier(model=None, backend="onnx", tta=False):
        loaded.update(model=model, backend=backend)
        return Classifier(ColourNet(), ModelConfig(name="colour-bot", image_size=16), backend=backend)

    monkeypatch.setattr(asirra.predict, "load_classifier", load_classifier)
    return loaded


@pytest.fixture
def pool(tmp_path):
    """20 cats (2 painted blue, so the bot gets them wrong), 20 dogs, and one corrupt cat."""
    folder = tmp_path / "pool"
    folder.mkdir()
    for i in range(20):
        Image.new("RGB", (32, 32), (0, 0, 200) if i < 2 else (200, 0, 0)).save(folder / f"cat.{i}.jpg")
        Image.new("RGB", (32, 32), (0, 0, 200)).save(folder / f"dog.{i}.jpg")
    (folder / "cat.99.jpg").write_bytes(b"not a jpeg at all")
    return folder


SIMULATE = ["captcha", "simulate", "--backend", "torch"]


def run_json(*args):
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_simulate_scores_the_pool_and_reports_the_solve_rate(pool, fake_model):
    out = run_json(*SIMULATE, "--data", str(pool), "--challenges", "3000", "--model", "runs/colour")
    assert fake_model == {"model": "runs/colour", "backend": "torch"}
    assert out["attempted"] == 3000
    assert out["images"] == 40
    assert out["per_image_accuracy"] == pytest.approx(38 / 40)
    assert out["ci_low"] <= out["solve_rate"] <= out["ci_high"]
    assert out["p12"] == pytest.approx((38 / 40) ** 12)
    assert [item["path"] for item in out["skipped"]] == [str(pool / "cat.99.jpg")]


def test_simulate_under_a_token_bucket_solves_less(pool, fake_model):
    bare = run_json(*SIMULATE, "--data", str(pool), "-n", "2000")
    guarded = run_json(*SIMULATE, "--data", str(pool), "-n", "2000", "--safeguard", "token-bucket:capacity=1")
    assert guarded["safeguard"] == "token-bucket:capacity=1"
    assert guarded["solve_rate"] < bare["solve_rate"]


def test_simulate_text_output_names_the_model_and_the_skipped_image(pool, fake_model):
    result = runner.invoke(app, [*SIMULATE, "--data", str(pool), "-n", "500"])
    assert result.exit_code == 0, result.output
    assert "colour-bot on 40 images (1 skipped)" in result.stdout
    assert f"skipped {pool / 'cat.99.jpg'}: " in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--safeguard", "moat"], "unknown safeguard 'moat'"),
        (["--backend", "tensorflow"], "unknown backend 'tensorflow'"),
    ],
)
def test_simulate_refuses_bad_options_in_one_line(pool, fake_model, args, message):
    result = runner.invoke(app, [*SIMULATE, "--data", str(pool), *args])
    assert result.exit_code == 2
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.output


def test_simulate_refuses_an_unlabelled_pool(tmp_path, fake_model):
    for i in range(15):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{i}.jpg")
    result = runner.invoke(app, [*SIMULATE, "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "error: no labelled images" in result.stderr


def test_defend_with_an_accuracy_writes_files_and_recommends(tmp_path):
    out = run_json("captcha", "defend", "--accuracy", "0.9", "--out", str(tmp_path / "d"), "-n", "5000")
    assert out["bot_accuracy"] == 0.9
    assert out["recommended"]["human_solve_rate"] > 0.99
    for name in ("defend.csv", "defend.json", "defend.png"):
        assert (tmp_path / "d" / name).is_file()


def test_defend_text_output_prints_the_recommendation(tmp_path):
    result = runner.invoke(app, ["captcha", "defend", "--accuracy", "0.9", "--out", str(tmp_path), "-n", "5000"])
    assert result.exit_code == 0, result.output
    assert "recommended: token-bucket" in result.stdout


def test_defend_says_so_when_no_setting_keeps_humans_in(tmp_path):
    args = ["--accuracy", "0.9", "--human", "0.9", "--out", str(tmp_path), "-n", "2000"]
    result = runner.invoke(app, ["captcha", "defend", *args])
    assert result.exit_code == 0, result.output
    assert "no setting keeps humans above 99.0%" in result.stdout


def test_defend_measures_the_model_on_data(pool, fake_model, tmp_path):
    out = run_json("captcha", "defend", "--backend", "torch", "--data", str(pool), "--out", str(tmp_path), "-n", "1000")
    assert out["bot_accuracy"] == pytest.approx(38 / 40)


@pytest.mark.parametrize("args", [[], ["--accuracy", "0.9", "--data", "somewhere"]])
def test_defend_needs_exactly_one_bot(tmp_path, args):
    result = runner.invoke(app, ["captcha", "defend", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert "error: give the bot as" in result.stderr
