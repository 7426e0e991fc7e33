"""A second, real task end to end: scikit-learn's bundled handwritten digits as 10 class folders.

Written out by `asirra data digits`, then trained, evaluated, predicted, exported and reloaded from
the command line; the ONNX backend must agree with PyTorch. Nothing is downloaded.
"""

import csv
import json
import shutil

import numpy as np
import pytest
from model_support import run_cli
from PIL import Image

from asirra.sample_data import SampleDataError, write_digits

DIGITS = [str(d) for d in range(10)]
pytestmark = pytest.mark.usefixtures("isolated_cache")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_write_digits_gives_ten_class_folders_of_real_images(tmp_path):
    out = run_cli("data", "digits", "--out", tmp_path / "digits", "--size", 16).stdout
    assert "1797 images in 10 classes" in out
    counts = {d: len(list((tmp_path / "digits" / d).glob("*.png"))) for d in DIGITS}
    assert sum(counts.values()) == 1797 and min(counts.values()) >= 170
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == DIGITS
    files = sorted((tmp_path / "digits" / "7").glob("*.png"))
    assert len(files) == counts["7"]
    image = Image.open(files[0])
    assert image.size == (16, 16) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.min() < 64 and pixels.max() == 255  # dark ink on a white page, not a blank square
    assert write_digits(tmp_path / "digits", size=16) == counts  # rerun overwrites, adds nothing
    assert len(list((tmp_path / "digits").rglob("*.png"))) == 1797


def test_write_digits_refuses_bad_arguments(tmp_path):
    with pytest.raises(SampleDataError, match="size"):
        write_digits(tmp_path / "d", size=4)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SampleDataError, match="not a folder"):
        write_digits(tmp_path / "file")


@pytest.mark.slow
def test_digits_train_evaluate_predict_export_and_onnx_agrees(tmp_path):
    digits = tmp_path / "digits"
    assert "1797 images in 10 classes" in run_cli("data", "digits", "--out", digits, "--size", 16).stdout
    model = tmp_path / "run"
    # No mirroring (augmentation flips, TTA averages with the mirror image): a mirrored 2 is not a 2.
    run_cli("train", "--data", digits, "--model", "seed-cnn", "--image-size", 16, "--epochs", 4, "--batch-size", 64,
        "--no-augment", "--no-tta", "--out", model)
    config = json.loads((model / "model" / "model.json").read_text())
    assert config["classes"] == DIGITS

    report = json.loads(run_cli("evaluate", digits, "--model", model, "--split", model, "--backend", "torch",
                            "--no-explain", "--json", "--out", tmp_path / "eval").stdout)
    assert report["classes"] == DIGITS
    assert np.array(report["confusion"]).shape == (10, 10)
    assert sum(map(sum, report["confusion"])) == report["n"]
    # Chance is 0.10 top-1 / 0.30 top-3; four epochs of a small CNN are far above it.
    assert report["accuracy"] > 0.5, report["accuracy"]
    assert report["top_k_accuracy"]["top_3"] >= report["accuracy"]
    assert 0 < report["macro_f1"] <= 1 and np.isfinite(report["log_loss"])
    for name in ("confusion", "mistakes"):
        assert (tmp_path / "eval" / f"{name}.png").is_file()

    # An unlabelled folder to predict: 60 images taken out of their class folders.
    flat = tmp_path / "flat"
    flat.mkdir()
    for digit in DIGITS:
        for path in sorted((digits / digit).glob("*.png"))[:6]:
            shutil.copy(path, flat / path.name)
    run_cli("predict", flat, "--model", model, "--backend", "torch", "--proba", "--out", tmp_path / "torch.csv")
    rows = read_csv(tmp_path / "torch.csv")
    assert rows[0] == ["id", "label", *(f"p_{d}" for d in DIGITS)]
    assert len(rows) == 61 and {r[1] for r in rows[1:]} <= set(DIGITS)
    proba = np.array([[float(x) for x in r[2:]] for r in rows[1:]])
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-4)

    run_cli("export", "--model", model)
    assert (model / "model" / "model.onnx").is_file()
    run_cli("predict", flat, "--model", model, "--backend", "onnx", "--proba", "--out", tmp_path / "onnx.csv")
    onnx_rows = read_csv(tmp_path / "onnx.csv")
    assert [r[:2] for r in onnx_rows] == [r[:2] for r in rows]  # same ids, same calls
    onnx_proba = np.array([[float(x) for x in r[2:]] for r in onnx_rows[1:]])
    assert np.abs(onnx_proba - proba).max() < 1e-4
