"""`asirra demo`, the README's main job (`make demo`): it evaluates the shipped model only on the
images it held out, writes a sorted Kaggle submission, simulates challenges under each safeguard
and draws the plots; on the shared data its figures agree with the shipped model card.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import asirra.models
import asirra.predict
from asirra.cache import content_key
from asirra.cli import app
from asirra.models import DEFAULT_MODEL_DIR

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ["data_sample.png", "predictions.png", "evaluation/confusion.png", "evaluation/roc.png",
         "evaluation/reliability.png", "evaluation/mistakes.png"]
SAFEGUARDS = ("none", "partial-credit", "token-bucket")
Z = 4.0  # binomial margins: a false alarm about once in 16,000 runs
SHIPPED_ENGINES = ("onnx", "onnx-int8")  # what the default backend may resolve to for the shipped model


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def assert_pngs(out: Path) -> None:
    for name in PLOTS:
        path = out / name
        assert path.read_bytes()[:8] == PNG, f"{name} is not a PNG"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert min(image.size) >= 100, f"{name} is only {image.size}"


def assert_submission(out: Path, n: int) -> list[int]:
    """submission.csv and submission_proba.csv: n rows sorted by numeric id, 0/1 labels that the probabilities round to."""
    rows, proba = read_csv(out / "submission.csv"), read_csv(out / "submission_proba.csv")
    assert rows[0] == ["id", "label"] and proba[0] == ["id", "label"]
    ids = [int(r[0]) for r in rows[1:]]
    assert len(ids) == n and ids == sorted(ids) and len(set(ids)) == n
    assert [int(r[0]) for r in proba[1:]] == ids
    labels = [int(r[1]) for r in rows[1:]]
    assert set(labels) <= {0, 1}
    p = [float(r[1]) for r in proba[1:]]
    assert all(0.005 <= x <= 0.995 for x in p)  # clipped as Kaggle's log loss wants
    assert labels == [int(x >= 0.5) for x in p]
    return labels


def assert_challenges_consistent(summary: dict, challenges: int) -> None:
    """Each safeguard's simulation attempted every challenge at the evaluation's per-image accuracy."""
    evaluation = summary["evaluation"]
    assert set(summary["challenges"]) == set(SAFEGUARDS)
    for name in SAFEGUARDS:
        result = summary["challenges"][name]
        assert result["attempted"] == challenges and 0 <= result["solved"] <= challenges
        assert result["per_image_accuracy"] == pytest.approx(evaluation["accuracy"])
        assert result["ci_low"] <= result["solve_rate"] <= result["ci_high"]
    assert evaluation["p12"] == pytest.approx(evaluation["accuracy"] ** 12)


# ---- fast: the demo on a tiny generated data set --------------------------------------------


@pytest.fixture
def held_out_model(tiny_kaggle_root, tmp_path, monkeypatch, make_image):
    """The shipped model, its split.json replaced by one that holds out the tiny data set's 12 labelled
    images; two more labelled images stand for training images the demo must not score."""
    folder = tmp_path / "weights"
    folder.mkdir()
    for source in DEFAULT_MODEL_DIR.iterdir():
        if source.name != "split.json":
            (folder / source.name).symlink_to(source)
    held_out = sorted((tiny_kaggle_root / "train").glob("*.jpg"))
    (folder / "split.json").write_text(json.dumps({"val": [content_key(p.read_bytes()) for p in held_out]}))
    make_image(tiny_kaggle_root / "train" / "cat.50.jpg", color=(190, 100, 50), seed=50)
    make_image(tiny_kaggle_root / "train" / "dog.50.jpg", color=(50, 100, 190), seed=51)
    monkeypatch.setattr(asirra.models, "DEFAULT_MODEL_DIR", folder)
    return folder


def test_demo_on_a_tiny_data_set_scores_only_held_out_images_and_writes_every_output(tiny_kaggle_root, held_out_model,
                                                                                      tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--data", str(tiny_kaggle_root), "--out", str(out), "--samples", "100", "--challenges", "300"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    summary = json.loads((out / "summary.json").read_text())
    evaluation = summary["evaluation"]
    assert evaluation["n"] == 12  # the 12 held-out images, not the 2 "training" ones beside them
    assert sum(map(sum, evaluation["confusion"])) == 12 and [sum(row) for row in evaluation["confusion"]] == [6, 6]
    assert evaluation["backend"] in SHIPPED_ENGINES and evaluation["challenges"] == 300
    assert json.loads((out / "evaluation" / "metrics.json").read_text()) == evaluation
    assert_challenges_consistent(summary, 300)
    assert_submission(out, 4)
    assert_pngs(out)
    assert "[5/5] outputs" in result.output


def test_demo_refuses_data_the_shipped_model_holds_nothing_out_of(tiny_kaggle_root, tmp_path):
    result = CliRunner().invoke(app, ["demo", "--data", str(tiny_kaggle_root), "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2
    assert "error: none of the default model's validation images are in" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "demo" / "summary.json").exists()


def test_demo_without_data_is_one_error_line(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "demo")])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path / "nowhere") in errors[0]


# ---- slow: `asirra demo` on the shared data, as `make demo` runs it ---------------------------


def card_figures() -> dict:
    """The shipped model's validation figures, as its model card records them (model.json)."""
    return json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())["extra"]["val"]


@pytest.mark.slow
def test_make_demo_on_the_shared_data_agrees_with_the_model_card(shared_data, tmp_path):
    samples, challenges = 400, 2000
    out = tmp_path / "demo"
    asirra_command = Path(sys.executable).parent / "asirra"  # the installed console script, as `make demo` runs it
    assert asirra_command.is_file(), f"no {asirra_command}: install the project (make install)"
    completed = subprocess.run(
        [str(asirra_command), "demo", "--data", str(shared_data), "--out", str(out),
         "--samples", str(samples), "--challenges", str(challenges)],
        capture_output=True, text=True, env={**os.environ, "ASIRRA_CACHE": str(tmp_path / "cache")}, timeout=600)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]

    summary = json.loads((out / "summary.json").read_text())
    evaluation, card = summary["evaluation"], card_figures()
    assert evaluation["n"] == samples and [sum(row) for row in evaluation["confusion"]] == [samples // 2] * 2
    assert evaluation["backend"] in SHIPPED_ENGINES and evaluation["model"] == "effnet-lite2"
    # The sample is drawn from the card's 3,800 validation images: its accuracy is the card's within
    # a binomial margin for 400 images; log loss, driven by a few confident mistakes, within a factor.
    margin = Z * math.sqrt(card["accuracy"] * (1 - card["accuracy"]) / samples)
    assert evaluation["accuracy"] >= card["accuracy"] - margin, (evaluation["accuracy"], card["accuracy"])
    assert evaluation["log_loss"] <= 4 * card["log_loss"], (evaluation["log_loss"], card["log_loss"])
    assert evaluation["auc"] >= card["auc"] - 0.01

    # Challenges are drawn from this pool, so the simulated pass rate estimates its exact finite-pool rate.
    assert_challenges_consistent(summary, challenges)
    exact = evaluation["exact_solve_rate"]
    spread = Z * math.sqrt(max(exact * (1 - exact), 1 / challenges) / challenges)
    none = summary["challenges"]["none"]["solve_rate"]
    assert abs(none - exact) <= spread, (none, exact)
    assert abs(evaluation["challenge_solve_rate"] - exact) <= spread
    assert summary["challenges"]["token-bucket"]["solve_rate"] <= none + spread  # a safeguard never helps the bot...
    assert summary["challenges"]["partial-credit"]["solve_rate"] >= none - spread  # ...except partial credit

    labels = assert_submission(out, 500)  # all of test1/
    assert 0.35 < sum(labels) / len(labels) < 0.65  # Kaggle's test images are about half dogs
    assert_pngs(out)
    assert "[5/5] outputs" in completed.stdout + completed.stderr
