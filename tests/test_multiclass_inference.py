"""Inference on models of N classes (issue 11): the Classifier, `asirra predict / evaluate / export / explain`,
and the CAPTCHA commands' refusal of a model that has no class to select.

The models are random seed-cnns (32 px, narrow) with their heads rescaled so that the test images get
spread-out logits: these tests check formats, the decision rule and agreement between code paths, not
accuracy (tests/test_multiclass_digits.py trains one).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import pattern_image, varied_images
from scipy.special import softmax
from torch import nn
from typer.testing import CliRunner

import asirra
from asirra import evaluation as evaluate
from asirra import plots
from asirra.cli import app
from asirra.data import scan
from asirra.gradcam import gradcam
from asirra.predict import TargetClassError, load_classifier

SIZE = 32
CLASSES = ["ant", "bee", "wasp"]
PNG = b"\x89PNG\r\n\x1a\n"
# One colour per class folder, in two stripe directions, so the images differ from each other.
COLOURS = {"ant": (210, 40, 40), "bee": (40, 200, 60), "wasp": (40, 60, 210), "zebra": (220, 210, 40)}


def save_class_model(folder: Path, classes, temperature: float = 1.0, tta: bool = False) -> Path:
    """A random N-class seed-cnn saved as train/export save one, its logits spread over several units."""
    from asirra.images import read_pixels
    from asirra.models import ModelConfig, create_model, save_model

    torch.manual_seed(0)
    options = {"widths": [8, 16], "dense": 32}
    model = create_model("seed-cnn", pretrained=False, image_size=SIZE, num_classes=len(classes), **options)
    x = torch.from_numpy(np.stack([read_pixels(im, SIZE) for im in varied_images()])).permute(0, 3, 1, 2).float()
    model.train()
    with torch.no_grad():
        model(x)  # batch-norm statistics other than the defaults
    model.eval()
    head = model.classifier[-1]
    with torch.no_grad():
        head.bias -= model(x).mean(0)  # centred per class, then scaled: z -> k z
        scale = 3.0 / model(x).std()
        head.weight *= scale
        head.bias *= scale
    config = ModelConfig("seed-cnn", SIZE, temperature=temperature, tta=tta, options=options, classes=list(classes))
    return save_model(model, config, folder)


def write_class_folders(root: Path, classes, per_class: int = 4) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pattern_image(COLOURS[name], "hv"[i % 2], (40, 36), seed=100 * c + i).save(root / name / f"{i}.png")
    return root


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model3(tmp_path_factory):
    return save_class_model(tmp_path_factory.mktemp("m3") / "model", CLASSES, temperature=2.0)


@pytest.fixture(scope="module")
def data3(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("d3") / "insects", CLASSES)


@pytest.fixture(scope="module")
def clf3(model3):
    return load_classifier(model3, backend="torch")


def sources(folder: Path) -> list[str]:
    return [r.source for r in scan(folder, labelled=True)]


# ---- the Classifier ---------------------------------------------------------------------------


def test_classifier_gives_calibrated_softmax_rows_in_class_order(clf3, data3):
    assert clf3.classes == tuple(CLASSES) and not clf3.is_cat_dog
    images = sources(data3)
    proba = clf3.predict_proba(images)
    z = clf3.logits(clf3.pixels(images))
    assert z.shape == (len(images), 3) and proba.shape == (len(images), 3)
    np.testing.assert_allclose(proba, softmax(z / 2.0, axis=1), rtol=0, atol=1e-12)  # T = 2 from model.json
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-12)
    assert len(set(proba.argmax(1))) > 1, "the spread model should call more than one class"
    assert clf3.predict_proba([]).shape == (0, 3)
    assert list(clf3.predict(images)) == [CLASSES[i] for i in proba.argmax(1)]


def test_the_old_class_probability_method_warns_and_gives_predict_proba(clf3, data3):
    images = sources(data3)
    with pytest.warns(FutureWarning, match="predict_classes_proba is deprecated"):
        old = clf3.predict_classes_proba(images)
    np.testing.assert_array_equal(old, clf3.predict_proba(images))


def test_tta_averages_the_n_logits_before_the_softmax(model3, data3):
    images = sources(data3)
    plain = load_classifier(model3, backend="torch")
    tta = load_classifier(model3, backend="torch", tta=True)
    pixels = plain.pixels(images)
    mean = (plain.logits(pixels) + plain.logits(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
    np.testing.assert_allclose(tta.predict_proba(images), softmax(mean / 2.0, axis=1), atol=1e-6)


def test_the_cat_dog_model_has_the_same_class_view_as_its_p_dog(tmp_path):
    from model_support import save_spread_model

    clf = load_classifier(save_spread_model(tmp_path / "catdog"), backend="torch")
    assert clf.classes == ("cat", "dog") and clf.is_cat_dog
    images = varied_images()
    z = clf.logits(clf.pixels(images))
    p_dog = 1 / (1 + np.exp(-z / clf.config.temperature))  # the calibrated sigmoid of the one logit
    proba = clf.predict_proba(images)
    np.testing.assert_allclose(proba[:, 1], p_dog, rtol=0, atol=1e-15)
    np.testing.assert_allclose(proba[:, 0], 1 - proba[:, 1], rtol=0, atol=0)
    assert clf.solve(images) == [bool(p < 0.5) for p in p_dog]
    assert clf.solve(images, target="dog") == [bool(p >= 0.5) for p in p_dog]


# ---- asirra predict ---------------------------------------------------------------------------


def test_predict_writes_class_names_and_unique_ids(model3, clf3, data3, tmp_path):
    result = run("predict", data3, "--model", model3, "--backend", "torch", "--out", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "label"]
    refs = scan(data3, labelled=False)
    # Every class folder holds 0.png..3.png: the Kaggle ids repeat, so the id is the path below the folder.
    assert sorted(r["id"] for r in rows) == sorted(r.name for r in refs) and len(rows) == 12
    expected = {r.name: CLASSES[i] for r, i in zip(refs, clf3.predict_proba([r.source for r in refs]).argmax(1))}
    assert {r["id"]: r["label"] for r in rows} == expected


def test_predict_proba_adds_one_column_per_class_summing_to_one(model3, clf3, data3, tmp_path):
    result = run("predict", data3, "--model", model3, "--backend", "torch", "--out", tmp_path / "p.csv", "--proba")
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "label", "p_ant", "p_bee", "p_wasp"]
    proba = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert [r["label"] for r in rows] == [CLASSES[i] for i in proba.argmax(1)]
    by_name = {r.name: r.source for r in scan(data3, labelled=False)}
    direct = clf3.predict_proba([by_name[r["id"]] for r in rows])
    np.testing.assert_allclose(proba, direct, atol=1e-6)  # float32 batches, 8 printed digits


def test_predict_one_image_prints_the_class_and_its_probability(model3, clf3, data3):
    image = data3 / "bee" / "1.png"
    result = run("predict", image, "--model", model3, "--backend", "torch")
    assert result.exit_code == 0, result.output
    row = clf3.predict_proba([image])[0]
    assert result.stdout.strip() == f"{CLASSES[row.argmax()]} {row.max():.2f}"


def test_a_two_class_model_not_named_cat_dog_writes_its_names(tmp_path):
    model = save_class_model(tmp_path / "m2", ["bee", "wasp"])
    data = write_class_folders(tmp_path / "d2", ["bee", "wasp"], per_class=3)
    result = run("predict", data, "--model", model, "--backend", "torch", "--out", tmp_path / "p.csv", "--proba")
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "p.csv")
    assert list(rows[0]) == ["id", "label", "p_bee", "p_wasp"]
    clf = load_classifier(model, backend="torch")
    assert clf.logits(clf.pixels(sources(data))).ndim == 1  # two classes keep one logit
    assert {r["label"] for r in rows} <= {"bee", "wasp"}
    assert all((r["label"] == "wasp") == (float(r["p_wasp"]) >= 0.5) for r in rows)  # the THRESHOLD rule


# ---- evaluation ---------------------------------------------------------------------------------

# Four images, three classes: calls a, b, a, c; truths a, b, c, c (as in tests/test_metrics.py).
Y = np.array([0, 1, 2, 2])
P = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.3, 0.2], [0.1, 0.3, 0.6]])


def test_class_report_by_hand(tmp_path, monkeypatch):
    drawn = {}
    real = plots.plot_image_grid

    def spy(images, titles, out, **kwargs):
        drawn["titles"], drawn["title"] = list(titles), kwargs.get("title")
        return real(images, titles, out, **kwargs)

    monkeypatch.setattr(plots, "plot_image_grid", spy)
    report = evaluate.evaluate_classes(Y, P, ["a", "b", "c"], info={"model": "m"})
    r = report.to_json()
    assert r["model"] == "m" and r["n"] == 4 and r["accuracy"] == 0.75
    assert r["top_k_accuracy"] == {"top_1": 0.75, "top_2": 0.75}  # image 2's true class ranks third
    assert r["macro_f1"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert r["log_loss"] == pytest.approx(-(math.log(0.7) + math.log(0.6) + math.log(0.2) + math.log(0.6)) / 4)
    assert r["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    assert r["per_class"]["c"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    names = [f"x{i}.png" for i in range(4)]
    files = evaluate.write_class_evaluation(report, Y, P, ["a", "b", "c"],
                                            lambda idx: [np.zeros((8, 8, 3), np.uint8) for _ in idx], names, tmp_path)
    assert set(files) == {"metrics", "confusion", "reliability", "mistakes"}
    assert all(files[k].read_bytes()[:8] == PNG for k in ("confusion", "reliability", "mistakes"))
    assert json.loads(files["metrics"].read_text())["accuracy"] == 0.75
    assert drawn["titles"] == ["x2.png\ntrue: c / pred: a (0.50)"] and drawn["title"] == "1 most confident mistakes"


def test_top_k_is_1_3_and_5_below_n():
    assert [evaluate.top_ks(n) for n in (2, 3, 4, 6, 10)] == [(1,), (1, 2), (1, 3), (1, 3, 5), (1, 3, 5)]


def test_evaluate_command_scores_an_n_class_model(model3, clf3, data3, tmp_path):
    out = tmp_path / "eval"
    result = run("evaluate", data3, "--model", model3, "--backend", "torch", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    refs = scan(data3, labelled=True)
    calls = clf3.predict_proba([r.source for r in refs]).argmax(1)
    labels = np.array([r.label for r in refs])
    assert report["classes"] == CLASSES and report["n"] == 12
    assert report["accuracy"] == pytest.approx(float(np.mean(calls == labels)))
    assert np.array(report["confusion"]).sum() == 12 and np.array(report["confusion"]).sum(1).tolist() == [4, 4, 4]
    assert set(report["top_k_accuracy"]) == {"top_1", "top_2"} and "auc" not in report
    for name in ("confusion.png", "reliability.png", "mistakes.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert "12 images, 3 classes  top-1" in result.stdout and "macro-F1" in result.stdout


def test_evaluate_maps_a_subset_of_classes_by_name_and_refuses_unknown_ones(model3, clf3, tmp_path):
    subset = write_class_folders(tmp_path / "subset", ["bee", "wasp"], per_class=3)
    result = run("evaluate", subset, "--model", model3, "--backend", "torch", "--out", tmp_path / "e", "--json",
                 "--no-explain")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert np.array(report["confusion"]).sum(1).tolist() == [0, 3, 3]  # bee and wasp rows: the model's indices 1, 2
    calls = clf3.predict_proba(sources(subset)).argmax(1)
    assert report["accuracy"] == pytest.approx(float(np.mean(calls == np.repeat([1, 2], 3))))
    stranger = write_class_folders(tmp_path / "stranger", ["bee", "zebra"], per_class=2)
    refused = run("evaluate", stranger, "--model", model3, "--backend", "torch", "--out", tmp_path / "e2")
    assert refused.exit_code == 2 and "the data's classes zebra are not among the model's (ant, bee, wasp)" in refused.output


# ---- export and the ONNX backends ---------------------------------------------------------------


def test_onnx_fp32_agrees_with_torch_on_n_outputs(model3, data3, tmp_path):
    import shutil

    folder = Path(shutil.copytree(model3, tmp_path / "model"))
    result = run("export", "--model", folder)
    assert result.exit_code == 0, result.output
    images = sources(data3) + varied_images()
    torch_clf, onnx_clf = load_classifier(folder, backend="torch"), load_classifier(folder, backend="onnx")
    assert onnx_clf.onnx_path() == folder / "model.onnx"  # the export beside the weights, not a cached one
    z_torch, z_onnx = (c.logits(c.pixels(images)) for c in (torch_clf, onnx_clf))
    assert z_onnx.shape == (len(images), 3) and np.ptp(z_torch) > 3  # confident outputs are compared too
    np.testing.assert_allclose(z_onnx, z_torch, atol=1e-4, rtol=1e-4)
    # A softmax moves each probability by at most half the largest logit change (divided by T = 2), so
    # logits within 1e-4 put the probabilities within 5e-5: 1e-4 leaves room and still catches a wrong head.
    p_torch, p_onnx = torch_clf.predict_proba(images), onnx_clf.predict_proba(images)
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4, rtol=0)
    assert np.array_equal(p_onnx.argmax(1), p_torch.argmax(1))


def test_int8_export_has_n_outputs_and_tracks_fp32(model3, data3, tmp_path):
    import shutil

    folder = Path(shutil.copytree(model3, tmp_path / "model"))
    result = run("export", "--model", folder, "--int8", "--calibration", data3)
    assert result.exit_code == 0, result.output
    images = sources(data3)
    fp32, int8 = load_classifier(folder, backend="onnx"), load_classifier(folder, backend="onnx-int8")
    assert int8.onnx_path().name == "model.int8.onnx"
    z32, z8 = fp32.logits(fp32.pixels(images)), int8.logits(int8.pixels(images))
    assert z8.shape == (12, 3) and not np.allclose(z8, z32, atol=1e-4)  # really the quantized network
    assert np.corrcoef(z32.ravel(), z8.ravel())[0, 1] > 0.95
    np.testing.assert_allclose(int8.predict_proba(images).sum(1), 1.0, atol=1e-12)


def test_only_a_cat_dog_model_can_become_the_default(model3, tmp_path):
    from asirra.export import package_model

    with pytest.raises(ValueError, match="only a cat/dog model can be the package's default; .* ant, bee, wasp"):
        package_model(model3, tmp_path / "weights")


# ---- Grad-CAM of one class among N ------------------------------------------------------------


class ColourToy(nn.Module):
    """Channel c of the feature map fires on pure colour c (red, green, blue); logit c is its mean, x10."""

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_((2 * torch.eye(3) - 1).view(3, 3, 1, 1) / 255.0)
        self.features = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3)) * 10.0


def patches(**at) -> np.ndarray:
    """Dark noise with square patches: red=(row, col, size), green=..., on a 32 px image."""
    image = np.random.default_rng(0).normal(40, 3, (32, 32, 3)).clip(0, 255)
    for name, (row, col, size) in at.items():
        image[row:row + size, col:col + size] = 255 * np.eye(3)[("red", "green", "blue").index(name)]
    return image.astype(np.uint8)[None]


def peak(m):
    return tuple(int(v) for v in np.unravel_index(np.argmax(m), m.shape))


def test_the_map_of_each_class_sits_on_its_own_evidence():
    toy = ColourToy()
    image = patches(red=(2, 18, 6), green=(18, 2, 12))  # more green: class 1 is predicted
    predicted = gradcam(toy, image, layer=toy.features)
    assert predicted.logits.shape == (1, 3) and predicted.targets.tolist() == [1]
    row, col = peak(predicted.maps[0])
    assert 18 <= row < 30 and 2 <= col < 14  # inside the green patch
    red = gradcam(toy, image, targets=[0], layer=toy.features)
    assert 2 <= peak(red.maps[0])[0] < 8 and 18 <= peak(red.maps[0])[1] < 24
    blue = gradcam(toy, image, targets=[2], layer=toy.features)
    assert blue.maps.max() == 0 and blue.peaks() == [None]  # no blue anywhere: no evidence
    with pytest.raises(ValueError, match="class indices, each 0..2"):
        gradcam(toy, image, targets=[3], layer=toy.features)


def test_explain_command_explains_the_predicted_class_or_the_one_asked(model3, clf3, data3, tmp_path):
    result = run("explain", data3, "--model", model3, "--out", tmp_path / "a", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["classes"] == CLASSES and len(report["images"]) == 12
    proba = clf3.predict_proba([item["source"] for item in report["images"]])
    for item, row in zip(report["images"], proba):
        assert item["predicted"] == item["explained_class"] == CLASSES[row.argmax()]
        assert item["probability"] == pytest.approx(row.max(), abs=1e-6) and "p_dog" not in item
        assert sum(item["probabilities"].values()) == pytest.approx(1.0)
        assert item["label"] == Path(item["source"]).parent.name and item["correct"] == (item["label"] == item["predicted"])
    forced = run("explain", data3 / "ant", "--model", model3, "--out", tmp_path / "b", "--class", "wasp", "--json")
    assert forced.exit_code == 0, forced.output
    forced_report = json.loads(forced.stdout)
    assert [i["explained_class"] for i in forced_report["images"]] == ["wasp"] * 4
    assert "class 'wasp'" in forced_report["method"]
    unknown = run("explain", data3 / "ant", "--model", model3, "--out", tmp_path / "c", "--class", "cat")
    assert unknown.exit_code == 2 and "no class 'cat' to explain: the model's classes are ant, bee, wasp" in unknown.output


def test_evaluate_draws_n_class_mistakes_under_their_predicted_class_map(model3, clf3, data3, tmp_path):
    from asirra.gradcam import gradcam_overlays
    from asirra.metrics import mistake_order

    evaluation = evaluate.evaluate_model(clf3, scan(data3, labelled=True), tmp_path, progress=False, explain=True)
    preds = evaluation.predictions
    worst = mistake_order(preds.labels, preds.proba).tolist()
    assert worst, "the random model should make mistakes"
    # The overlays evaluate drew are those of each mistake's predicted class.
    expected = gradcam_overlays(clf3.model, clf3.image_size, [preds.refs[i].read_bytes() for i in worst],
                                targets=preds.proba[worst].argmax(1))
    auto = gradcam_overlays(clf3.model, clf3.image_size, [preds.refs[i].read_bytes() for i in worst])
    assert all(np.array_equal(a, b) for a, b in zip(expected, auto))
    assert evaluation.files["mistakes"].read_bytes()[:8] == PNG


# ---- the CAPTCHA paths --------------------------------------------------------------------------


def test_solve_refuses_a_model_without_cats_and_selects_any_class_it_has(clf3, model3, data3):
    images = sources(data3)
    with pytest.raises(TargetClassError, match="cannot select every 'cat': its classes are ant, bee, wasp"):
        clf3.solve(images)
    with pytest.raises(TargetClassError):
        asirra.solve(images, model=model3, backend="torch")
    calls = clf3.predict_proba(images).argmax(1)
    assert clf3.solve(images, target="bee") == [bool(c == 1) for c in calls]
    selecting = load_classifier(model3, backend="torch").select("wasp")
    assert selecting.solve(images) == [bool(c == 2) for c in calls]


def test_a_model_with_cats_among_n_classes_selects_its_cats(tmp_path):
    model = save_class_model(tmp_path / "pets", ["bird", "cat", "dog"])
    clf = load_classifier(model, backend="torch")
    images = varied_images()
    calls = clf.predict_proba(images).argmax(1)
    assert clf.solve(images) == [bool(c == 1) for c in calls]


def test_attack_refuses_a_model_without_the_target_class_before_connecting(model3):
    result = run("attack", "--url", "http://127.0.0.1:9", "-n", 1, "--model", model3, "--backend", "torch")
    assert result.exit_code == 2
    assert "cannot select every 'cat': its classes are ant, bee, wasp" in result.output
    other = run("attack", "--url", "http://127.0.0.1:9", "-n", 1, "--model", model3, "--backend", "torch",
                "--target", "moth")
    assert other.exit_code == 2 and "cannot select every 'moth'" in other.output


def test_captcha_simulate_refuses_an_n_class_model(model3, data3):
    result = run("captcha", "simulate", "--data", data3, "--model", model3, "--backend", "torch", "-n", 5)
    assert result.exit_code == 2 and "the CAPTCHA simulation needs a cat/dog model" in result.output
