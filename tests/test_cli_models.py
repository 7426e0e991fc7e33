"""`asirra train / predict / evaluate / export` on generated images: outputs, files, and one-line errors."""

import csv
import json
import re
import shutil

import pytest
from model_support import save_spread_model, write_pattern_dataset
from typer.testing import CliRunner

from asirra.cli import app
from asirra.predict import load_classifier


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_spread_model(tmp_path_factory.mktemp("model") / "seed-cnn")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_pattern_dataset(tmp_path_factory.mktemp("labelled") / "train", per_class=8)


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def isolated_cache(module_cache, monkeypatch):
    # Shared by the module's tests so the model is exported to ONNX once.
    monkeypatch.setenv("ASIRRA_CACHE", str(module_cache))


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_predict_one_image_prints_the_class_and_its_probability(model, tmp_path, make_image):
    photo = make_image(tmp_path / "photo.jpg", size=(90, 60), color=(230, 30, 30))
    result = run("predict", photo, "--model", model)
    assert result.exit_code == 0, result.output
    match = re.fullmatch(r"(cat|dog) (\d\.\d\d)\n", result.stdout)
    assert match, result.stdout

    p_dog = load_classifier(model, backend="torch").predict_proba([photo])[0, 1]
    assert match.group(1) == ("dog" if p_dog >= 0.5 else "cat")
    assert float(match.group(2)) == pytest.approx(max(p_dog, 1 - p_dog), abs=0.006)


def test_predict_folder_writes_a_sorted_submission(model, tmp_path, make_image):
    for i in (100, 2, 10, 1):
        make_image(tmp_path / "test1" / f"{i}.jpg", color=(20 + 2 * i, 90, 200 - i), seed=i)
    (tmp_path / "test1" / "7.jpg").write_bytes(b"\xff\xd8\xff truncated")

    result = run("predict", tmp_path / "test1", "--model", model, "--out", tmp_path / "sub.csv")
    assert result.exit_code == 0, result.output
    assert "4 predictions" in result.stdout and "1 unreadable skipped" in result.stdout
    assert "skipped" in result.stderr and "7.jpg" in result.stderr
    with open(tmp_path / "sub.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "10", "100"]
    assert {r[1] for r in rows[1:]} <= {"0", "1"}

    result = run("predict", tmp_path / "test1", "--model", model, "--out", tmp_path / "p.csv", "--proba")
    with open(tmp_path / "p.csv", newline="") as f:
        probabilities = [float(r["label"]) for r in csv.DictReader(f)]
    assert all(0.005 <= p <= 0.995 for p in probabilities)


def test_evaluate_json_prints_one_object_and_writes_the_plots(model, labelled, tmp_path):
    out = tmp_path / "eval"
    result = run("evaluate", labelled, "--model", model, "--json", "--out", out, "--challenges", 300)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds exactly one JSON object
    assert report["n"] == 16
    assert report["engine"]["backend"] == report["backend"] and report["engine"]["kernels"]  # what answered
    assert 0 <= report["accuracy"] <= 1 and report["log_loss"] > 0 and 0 <= report["auc"] <= 1
    assert 0 <= report["challenge_solve_rate"] <= 1
    for plot in ("confusion.png", "roc.png", "mistakes.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG", plot
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == report["accuracy"]


def test_evaluate_text_output_names_the_figures(model, labelled, tmp_path):
    result = run("evaluate", labelled, "--model", model, "--backend", "torch", "--out", tmp_path, "--challenges", 300)
    assert result.exit_code == 0, result.output
    assert re.search(r"16 images  accuracy \d\.\d{4}  log loss", result.stdout)
    assert "12-image challenges solved" in result.stdout and str(tmp_path / "roc.png") in result.stdout


def test_train_then_predict_with_the_run_folder(labelled, tmp_path, make_image):
    result = run("train", "--data", labelled, "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert f"run folder: {tmp_path / 'run'}" in result.stdout
    result = run("predict", make_image(tmp_path / "x.jpg"), "--model", tmp_path / "run", "--backend", "torch")
    assert result.exit_code == 0 and re.fullmatch(r"(cat|dog) \d\.\d\d\n", result.stdout), result.output


def test_export_writes_model_onnx_beside_the_weights_and_predict_uses_it(model, tmp_path):
    folder = shutil.copytree(model, tmp_path / "m")
    result = run("export", "--model", folder)
    assert result.exit_code == 0, result.output
    assert (folder / "model.onnx").is_file()
    assert load_classifier(folder).onnx_path() == folder / "model.onnx"


def test_export_int8_calibrates_on_a_folder_and_predict_can_use_it(model, labelled, tmp_path, make_image):
    folder = shutil.copytree(model, tmp_path / "m")
    photo = make_image(tmp_path / "photo.jpg")
    assert_one_line_error(run("predict", photo, "--model", folder, "--backend", "onnx-int8"), "no int8 export")
    assert_one_line_error(run("export", "--model", folder, "--int8"), "--int8 needs --calibration")

    result = run("export", "--model", folder, "--int8", "--calibration", labelled)
    assert result.exit_code == 0, result.output
    assert "calibrated on 16 images" in result.output and (folder / "model.int8.onnx").is_file()
    result = run("predict", photo, "--model", folder, "--backend", "onnx-int8")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"(cat|dog) [01]\.\d+", result.output.strip().splitlines()[-1])


def test_missing_image_or_folder_is_one_error_line(model, tmp_path):
    assert_one_line_error(run("predict", tmp_path / "nowhere.jpg", "--model", model), "nowhere.jpg")
    assert_one_line_error(run("evaluate", tmp_path / "nowhere", "--model", model), "nowhere")


def test_missing_model_is_one_error_line(labelled, tmp_path, make_image):
    photo = make_image(tmp_path / "photo.jpg")
    assert_one_line_error(run("predict", photo, "--model", tmp_path / "no-model"), "no model at")
    assert_one_line_error(run("evaluate", labelled, "--model", tmp_path / "no-model"), "no model at")


def test_unreadable_image_or_bad_option_is_one_error_line(model, tmp_path):
    (tmp_path / "page.jpg").write_text("<html>not a photo</html>")
    assert_one_line_error(run("predict", tmp_path / "page.jpg", "--model", model), "page.jpg", "not an image")
    assert_one_line_error(run("predict", tmp_path / "page.jpg", "--model", model, "--backend", "tf"), "unknown backend")


def test_train_refuses_an_existing_run_or_missing_data(labelled, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    assert_one_line_error(run("train", "--data", labelled, "--out", tmp_path / "run"), "pass --resume")
    assert_one_line_error(run("train", "--data", tmp_path / "nothing", "--out", tmp_path / "r2"), "no data at")


def test_evaluate_split_without_a_split_file_is_one_error_line(model, labelled, tmp_path):
    assert_one_line_error(run("evaluate", labelled, "--model", model, "--split", tmp_path), "split.json")
