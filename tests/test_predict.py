"""The Classifier: mixed inputs, challenge solving, unreadable images, calibration, and Kaggle submissions."""

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from model_support import save_spread_model, varied_images
from PIL import Image

import asirra
import asirra.models
import asirra.predict
from asirra.calibration import fit_temperature
from asirra.data import scan
from asirra.evaluation import log_loss
from asirra.images import UnusableImage
from asirra.models import load_model, save_model
from asirra.predict import SUBMISSION_CLIP, Classifier, load_classifier, predict_refs, write_submission


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_spread_model(tmp_path_factory.mktemp("model") / "seed-cnn")


@pytest.fixture(scope="module")
def clf(model_folder):
    return load_classifier(model_folder, backend="torch")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_sources(tmp_path, make_image) -> list:
    """The same kinds of input a CAPTCHA solver gets: paths (str and Path), bytes, PIL images, PNG, greyscale, odd shapes."""
    wide, tall, noise, stripes, *_ = varied_images()
    return [
        make_image(tmp_path / "a.jpg", color=(200, 90, 40)),
        str(make_image(tmp_path / "b.png", size=(300, 40), color=(40, 90, 200))),  # 7.5:1
        make_image(tmp_path / "grey.jpg", mode="L", seed=3).read_bytes(),
        png_bytes(noise),
        bytearray(png_bytes(stripes.convert("RGBA"))),
        wide,
        tall.convert("L"),
    ]


def test_solve_on_mixed_inputs_returns_one_bool_per_image(clf, tmp_path, make_image):
    sources = mixed_sources(tmp_path, make_image)
    answer = clf.solve(sources)
    assert len(answer) == len(sources) and all(type(a) is bool for a in answer)
    assert answer == [bool(p < 0.5) for p in clf.predict_proba(sources)[:, 1]]  # True means cat, i.e. P(dog) < 0.5
    assert list(clf.predict(sources)) == ["cat" if is_cat else "dog" for is_cat in answer]


def test_the_same_image_gets_the_same_probability_whatever_its_wrapping(clf, tmp_path, make_image):
    path = make_image(tmp_path / "x.png", size=(70, 50), color=(120, 200, 90))
    p = clf.predict_proba([path, str(path), path.read_bytes(), Image.open(path)])
    assert p.shape == (4, 2)  # (n, n_classes) for every model, as in scikit-learn
    np.testing.assert_allclose(p, np.tile(p[0], (4, 1)), rtol=0, atol=1e-12)


def test_an_unreadable_image_in_a_challenge_names_its_position(clf, tmp_path, make_image):
    good = make_image(tmp_path / "good.jpg")
    with pytest.raises(UnusableImage) as caught:
        clf.solve([good, good, b"GIF89a not really", good])
    assert caught.value.reason == "not an image (unrecognised format)"
    assert "image 3 of 4" in str(caught.value)

    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UnusableImage, match=r"image 1 of 2 .*empty file"):
        clf.solve([tmp_path / "empty.jpg", good])


def test_predict_proba_wants_a_list(clf, tmp_path, make_image):
    with pytest.raises(TypeError, match="takes a list"):
        clf.predict_proba(str(make_image(tmp_path / "a.jpg")))
    assert clf.predict_proba([]).shape == (0, 2)


def test_tta_averages_the_logits_of_the_image_and_its_mirror(model_folder):
    pixels = np.stack([np.asarray(im.convert("RGB").resize((128, 128))) for im in varied_images()])
    plain = load_classifier(model_folder, backend="torch")
    tta = load_classifier(model_folder, backend="torch", tta=True)
    mirrored = plain.logits(np.ascontiguousarray(pixels[:, :, ::-1]))
    np.testing.assert_allclose(tta.logits(pixels), (plain.logits(pixels) + mirrored) / 2, atol=1e-6)
    assert not np.allclose(mirrored, plain.logits(pixels))  # the images are not symmetric


def test_package_level_solve_uses_the_given_model(model_folder, clf, tmp_path, make_image):
    images = [make_image(tmp_path / f"{i}.jpg", color=(40 * i, 90, 200 - 30 * i), seed=i) for i in range(4)]
    assert asirra.solve(images, model=model_folder, backend="torch") == clf.solve(images)


def test_bad_backend_or_missing_default_model_is_a_value_error(model_folder, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        load_classifier(model_folder, backend="tensorflow")
    monkeypatch.setattr(asirra.models, "DEFAULT_MODEL_DIR", tmp_path / "no-weights")
    with pytest.raises(ValueError, match="default model is missing"):
        load_classifier(None)


def test_auto_backend_is_the_int8_export_only_when_one_was_made_from_these_weights(model_folder, tmp_path):
    from asirra.export import ONNX_FILES, state_fingerprint
    from asirra.predict import resolve_backend

    folder = Path(shutil.copytree(model_folder, tmp_path / "model"))
    net, _ = load_model(folder)
    assert resolve_backend("auto", net, folder) == "onnx"  # no int8 export
    int8 = folder / ONNX_FILES["onnx-int8"]
    int8.write_bytes(b"stand-in: resolving never opens it")
    Path(f"{int8}.weights").write_text("made from other weights")
    assert resolve_backend("auto", net, folder) == "onnx"  # a stale export is never used
    Path(f"{int8}.weights").write_text(state_fingerprint(net))
    assert resolve_backend("auto", net, folder) == "onnx-int8"
    assert resolve_backend("auto", net, None) == "onnx"
    assert [resolve_backend(name, net, folder) for name in ("onnx", "onnx-int8", "torch")] == ["onnx", "onnx-int8", "torch"]


def test_every_entry_point_defaults_to_the_one_backend_rule():
    import inspect

    import typer.main

    from asirra.cli import app
    from asirra.config import DEFAULT_BACKEND
    from asirra.demo import run_demo

    assert DEFAULT_BACKEND == "auto"
    for function in (asirra.solve, load_classifier, Classifier, run_demo):
        assert inspect.signature(function).parameters["backend"].default == DEFAULT_BACKEND, function

    def commands(group, prefix=()):
        for name, command in group.commands.items():
            yield from commands(command, (*prefix, name)) if hasattr(command, "commands") else [((*prefix, name), command)]

    defaults = {" ".join(name): param.default for name, command in commands(typer.main.get_command(app))
                for param in command.params if param.name == "backend"}
    assert {"evaluate", "predict", "demo", "attack", "captcha simulate", "captcha defend"} <= set(defaults)
    assert set(defaults.values()) == {DEFAULT_BACKEND}


def test_the_shipped_model_runs_its_int8_export_by_default():
    try:
        clf = load_classifier(None)
    except ValueError as exc:
        pytest.skip(f"no default model: {exc}")
    assert clf.backend == "onnx-int8" and clf.onnx_path().name == "model.int8.onnx"


def test_predict_refs_skips_and_reports_unreadable_files(clf, tmp_path, make_image):
    for i in (1, 2, 3):
        make_image(tmp_path / "test1" / f"{i}.jpg", seed=i)
    (tmp_path / "test1" / "4.jpg").write_text("<!doctype html>")
    preds = predict_refs(clf, scan(tmp_path / "test1", labelled=False), batch_size=2, progress=False)
    assert [r.id for r in preds.refs] == ["1", "2", "3"]
    assert preds.unusable == [{"path": str(tmp_path / "test1" / "4.jpg"), "reason": "not an image (HTML/XML text)"}]
    np.testing.assert_allclose(preds.p_dog, clf.predict_proba([r.source for r in preds.refs])[:, 1], atol=1e-5)  # float32 batches


def read_rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_submission_sorts_ids_numerically_with_1_for_dog(tmp_path):
    ids = ["100", "2", "10", "1", "11"]
    out = write_submission(ids, np.array([0.9, 0.1, 0.5, 0.49, 1.0]), tmp_path / "sub.csv")
    rows = read_rows(out)
    assert rows[0] == ["id", "label"]
    assert rows[1:] == [["1", "0"], ["2", "0"], ["10", "1"], ["11", "1"], ["100", "1"]]
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_probability_submission_is_clipped(tmp_path):
    out = write_submission(["1", "2", "3"], np.array([0.0, 1.0, 0.25]), tmp_path / "sub.csv", proba=True)
    labels = [float(label) for _, label in read_rows(out)[1:]]
    assert labels == pytest.approx([SUBMISSION_CLIP, 1 - SUBMISSION_CLIP, 0.25])


def test_temperature_saved_with_the_model_improves_held_out_log_loss(model_folder, tmp_path):
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    overconfident = 4 * true_logits  # what a network overfitted to its training set tends to output
    fit, held_out = slice(0, 2000), slice(2000, None)

    temperature = fit_temperature(overconfident[fit], labels[fit])
    assert temperature > 1  # softening an overconfident model

    net, config = load_model(model_folder)
    config.temperature = temperature
    calibrated = load_classifier(save_model(net, config, tmp_path / "calibrated"), backend="torch")
    raw = Classifier(net, load_model(model_folder)[1], backend="torch")
    assert raw.config.temperature == 1.0
    before = log_loss(labels[held_out], raw.proba_from_logits(overconfident[held_out])[:, 1])
    after = log_loss(labels[held_out], calibrated.proba_from_logits(overconfident[held_out])[:, 1])
    assert after < before - 0.05
