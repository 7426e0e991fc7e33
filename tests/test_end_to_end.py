"""End to end on the shared Kaggle data: train, evaluate and submit from the command line; the shipped model's accuracy."""

import csv
import json

import numpy as np
import pytest
from model_support import run_cli

from asirra.cache import content_key
from asirra.data import scan
from asirra.models import DEFAULT_MODEL_DIR
from asirra.predict import load_classifier, predict_refs
from asirra.stats import stratified_subset

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


def test_train_evaluate_and_submit_on_shared_data(shared_data, tmp_path):
    model = tmp_path / "run"
    run_cli("train", "--data", shared_data / "train", "--out", model, "--limit", 300, "--epochs", 1)
    assert (model / "model" / "model.safetensors").is_file()
    assert len(json.loads((model / "split.json").read_text())["val"]) == 60

    # Its own validation images: content keys recorded at training time pick them out of the full set.
    report = json.loads(run_cli("evaluate", shared_data / "train", "--model", model, "--split", model, "--json",
                            "--out", tmp_path / "eval", "--challenges", 1000).stdout)
    assert report["n"] == 60
    assert 0 <= report["accuracy"] <= 1 and np.isfinite(report["log_loss"])
    assert (tmp_path / "eval" / "roc.png").is_file()

    run_cli("predict", shared_data / "test1", "--model", model, "--out", tmp_path / "submission.csv")
    with open(tmp_path / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"]
    ids = [int(r[0]) for r in rows[1:]]
    assert len(ids) == 500 and ids == sorted(ids) and len(set(ids)) == 500
    assert {r[1] for r in rows[1:]} <= {"0", "1"}


@pytest.fixture
def default_model():
    if not (DEFAULT_MODEL_DIR / "model.json").is_file() or not (DEFAULT_MODEL_DIR / "split.json").is_file():
        pytest.skip(f"no default model with its split.json in {DEFAULT_MODEL_DIR}")
    return DEFAULT_MODEL_DIR


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_default_model_is_accurate_on_300_held_out_images(shared_data, default_model, backend):
    val_keys = set(json.loads((default_model / "split.json").read_text())["val"])
    # Content keys, not names: a renamed training image must not count as held out.
    held_out = [r for r in scan(shared_data / "train", labelled=True) if content_key(r.read_bytes()) in val_keys]
    assert len(held_out) >= 300
    sample = [held_out[i] for i in stratified_subset(np.array([r.label for r in held_out]), 300, seed=0)]

    preds = predict_refs(load_classifier(None, backend=backend), sample, progress=False)
    assert len(preds.refs) == 300
    accuracy = float(np.mean((preds.p_dog >= 0.5) == preds.labels))
    assert accuracy > 0.98, f"default model accuracy {accuracy:.3f} on 300 held-out images ({backend})"
