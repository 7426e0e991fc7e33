"""Grad-CAM (asirra.gradcam): the map sits on what decides the output, explains the predicted class,
and `asirra explain` / `asirra evaluate --explain` write their files for seed-cnn and EfficientNet-Lite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_support import save_spread_model, write_pattern_dataset
from torch import nn
from typer.testing import CliRunner

from asirra.cli import app
from asirra.gradcam import gradcam, gradcam_overlays, target_layer
from asirra.labels import CAT, DOG

S = 32  # toy input side; the toy's feature map is S / 4 = 8 cells across
PATCH = 8
PNG_HEADER = b"\x89PNG\r\n\x1a\n"


class PatchToy(nn.Module):
    """A hand-built network: channel 0 of its feature map fires on red, channel 1 on green, and the
    logit (of dog) is red_weight * mean(red map) + green_weight * mean(green map). A red or green
    patch is the only thing in the image that can move the output."""

    def __init__(self, red_weight: float, green_weight: float):
        super().__init__()
        conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]]).view(2, 3, 1, 1) / 255.0)
        self.features = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(4))
        self.register_buffer("head", torch.tensor([red_weight, green_weight]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.features(x).mean((2, 3)) * self.head).sum(1) * 10.0


def picture(red_at=None, green_at=None, red_size=PATCH, green_size=PATCH, seed=0) -> np.ndarray:
    """Dark grey noise with a saturated red and/or green square whose top-left corner is (row, col)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 3, (S, S, 3)).clip(0, 255)  # faint enough that neither detector ever fires on it
    for at, size, colour in ((red_at, red_size, (255, 0, 0)), (green_at, green_size, (0, 255, 0))):
        if at is not None:
            image[at[0]:at[0] + size, at[1]:at[1] + size] = colour
    return image.astype(np.uint8)[None]


def peak(cam_map: np.ndarray) -> tuple[int, int]:
    return tuple(int(v) for v in np.unravel_index(np.argmax(cam_map), cam_map.shape))


def inside(point, corner, size=PATCH) -> bool:
    return all(c <= p < c + size for p, c in zip(point, corner))


# Off the diagonal, so a map transposed on upsampling would miss.
LOCATIONS = [((0, 20), (20, 4)), ((24, 8), (4, 24))]


@pytest.mark.parametrize("deciding, distractor", LOCATIONS)
def test_map_peaks_on_the_patch_that_decides_the_output_not_on_an_equally_bright_one(deciding, distractor):
    toy = PatchToy(red_weight=1.0, green_weight=0.0)  # only red counts
    result = gradcam(toy, picture(red_at=deciding, green_at=distractor), layer=toy.features)
    assert result.targets.tolist() == [DOG]
    assert inside(peak(result.maps[0]), deciding)
    # The green patch is as bright in its own channel, but the output ignores it: so does the map.
    g = distractor
    assert result.maps[0][g[0]:g[0] + PATCH, g[1]:g[1] + PATCH].max() < 0.05


def test_a_cat_prediction_is_explained_by_the_cat_evidence_and_forcing_dog_shows_the_dog_evidence():
    toy = PatchToy(red_weight=1.0, green_weight=-1.0)  # red says dog, green says cat
    red, green = (2, 18), (18, 2)
    image = picture(red_at=red, green_at=green, red_size=6, green_size=12)  # more green: a cat
    predicted = gradcam(toy, image, layer=toy.features)
    assert predicted.logits[0] < 0 and predicted.targets.tolist() == [CAT]
    assert inside(peak(predicted.maps[0]), green, 12)
    forced = gradcam(toy, image, targets=[DOG], layer=toy.features)
    assert inside(peak(forced.maps[0]), red, 6)
    assert np.allclose(forced.logits, predicted.logits)


def test_an_image_without_evidence_for_its_class_gets_an_all_zero_map_and_no_peak():
    toy = PatchToy(red_weight=1.0, green_weight=-1.0)
    result = gradcam(toy, picture(red_at=(4, 4)), targets=[CAT], layer=toy.features)  # only dog evidence
    assert result.maps.max() == 0 and result.peaks() == [None]


def test_tta_map_of_the_mirror_is_the_mirrored_map():
    toy = PatchToy(red_weight=1.0, green_weight=-0.5)
    image = picture(red_at=(0, 20), green_at=(20, 4), green_size=6)
    a = gradcam(toy, image, tta=True, layer=toy.features)
    b = gradcam(toy, np.ascontiguousarray(image[:, :, ::-1]), tta=True, layer=toy.features)
    assert np.allclose(a.maps[0], b.maps[0][:, ::-1], atol=1e-6) and np.allclose(a.logits, b.logits)


def test_gradcam_leaves_the_weights_without_gradients_and_the_model_as_it_was():
    from asirra.models import create_model

    net = create_model("seed-cnn", image_size=32, widths=(4, 8)).train()  # train mode on purpose
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    result = gradcam(net, x)
    assert net.training and all(p.requires_grad and p.grad is None for p in net.parameters())
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2).float()).double().numpy()
    assert np.allclose(result.logits, expected, atol=1e-5)  # the hook changes no output
    assert result.maps.shape == (3, 32, 32) and 0 <= result.maps.min() and result.maps.max() <= 1


def test_target_layer_is_the_last_conv_block_per_model_type():
    from asirra.models import create_model

    seed = create_model("seed-cnn", image_size=32, widths=(4, 8))
    lite = create_model("effnet-lite0", pretrained=False, image_size=64)
    assert target_layer(seed) == ("features[-1]", seed.features[-1])
    assert target_layer(lite) == ("backbone.top", lite.backbone.top)
    with pytest.raises(ValueError, match="no Grad-CAM target layer"):
        target_layer(nn.Linear(2, 1))


# ---- end to end, through the command line --------------------------------------------------------


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = write_pattern_dataset(tmp_path_factory.mktemp("explain") / "pets", per_class=2)
    (folder / "broken.jpg").write_bytes(b"<!doctype html><html>not a photo</html>")
    return folder


@pytest.fixture(scope="module")
def lite_model(tmp_path_factory):
    from asirra.models import ModelConfig, create_model, save_model

    torch.manual_seed(0)
    net = create_model("effnet-lite0", pretrained=False, image_size=96)
    return save_model(net, ModelConfig("effnet-lite0", 96), tmp_path_factory.mktemp("lite") / "model")


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory):
    return save_spread_model(tmp_path_factory.mktemp("seed") / "model")


@pytest.mark.parametrize("which", ["seed_model", "lite_model"])
def test_explain_command_writes_overlays_grid_and_json_and_reports_the_unreadable_file(which, images, tmp_path, request):
    model = request.getfixturevalue(which)
    result = run("explain", images, "--model", model, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output and "not an image" in result.output
    report = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert report["target_layer"] == {"seed_model": "features[-1]", "lite_model": "backbone.top"}[which]
    assert [item["name"] for item in report["images"]] == ["cat.0.jpg", "cat.1.jpg", "dog.0.jpg", "dog.1.jpg"]
    assert [s["path"].endswith("broken.jpg") for s in report["skipped"]] == [True]
    for item in report["images"]:
        assert item["predicted"] in ("cat", "dog") and item["explained_class"] == item["predicted"]
        assert 0.5 <= item["probability"] <= 1 and item["label"] in ("cat", "dog")
        assert (item["predicted"] == "dog") == (item["p_dog"] >= 0.5)
        assert item["peak"] is None or (0 < item["peak"]["x"] < 1 and 0 < item["peak"]["y"] < 1)
        assert open(item["file"], "rb").read(8) == PNG_HEADER
    assert (tmp_path / "out" / "grid.png").read_bytes()[:8] == PNG_HEADER


def test_explain_peak_in_the_json_is_the_maximum_of_the_map(images, seed_model, tmp_path):
    from asirra.images import read_pixels
    from asirra.models import load_model

    result = run("explain", images / "dog.1.jpg", "--model", seed_model, "--out", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    item = json.loads(result.stdout)["images"][0]
    net, config = load_model(seed_model)
    cam = gradcam(net, read_pixels(images / "dog.1.jpg", config.image_size)[None])
    assert item["peak"]["input_px"] == [cam.peaks()[0][1], cam.peaks()[0][0]]


def test_explain_refuses_a_missing_path_and_a_folder_of_unreadable_files_in_one_line(tmp_path, seed_model):
    missing = run("explain", tmp_path / "nope.jpg", "--model", seed_model, "--out", tmp_path / "o")
    assert missing.exit_code == 2 and "no such file or folder" in missing.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    empty = run("explain", tmp_path / "bad", "--model", seed_model, "--out", tmp_path / "o")
    assert empty.exit_code == 2 and "none of the 1 images could be read" in empty.output


def test_evaluate_draws_the_mistakes_with_their_grad_cam_overlays(tmp_path, seed_model, monkeypatch):
    from asirra import plots
    from asirra.calibration import predicted_labels
    from asirra.data import scan
    from asirra.evaluation import evaluate_model, worst_mistakes
    from asirra.images import read_pixels
    from asirra.predict import load_classifier

    drawn = {}
    real_grid = plots.plot_image_grid

    def spy(images_, titles, out, **kwargs):
        drawn[out.parent.name] = (list(images_), kwargs.get("title"))
        return real_grid(images_, titles, out, **kwargs)

    monkeypatch.setattr(plots, "plot_image_grid", spy)
    data = write_pattern_dataset(tmp_path / "labelled", per_class=6)
    refs = scan(data, labelled=True)
    clf = load_classifier(seed_model, backend="torch")
    evaluate_model(clf, refs, tmp_path / "plain", n_challenges=10, progress=False)
    explained = evaluate_model(clf, refs, tmp_path / "explained", n_challenges=10, progress=False, explain=True)
    assert explained.files["mistakes"].read_bytes()[:8] == PNG_HEADER
    (pictures, title), (plain_pictures, plain_title) = drawn["explained"], drawn["plain"]
    assert len(pictures) == len(plain_pictures) > 0, "the random model should make mistakes"
    assert "Grad-CAM" in title and "Grad-CAM" not in plain_title
    # Each drawn mistake is its own overlay: recomputing the overlays for the worst mistakes gives the same pixels.
    preds = explained.predictions
    worst = worst_mistakes(preds.labels, preds.p_dog).tolist()
    expected = gradcam_overlays(clf.model, clf.image_size, [preds.refs[i].read_bytes() for i in worst],
                                targets=predicted_labels(preds.p_dog[worst]))
    assert all(np.array_equal(a, b) for a, b in zip(pictures, expected))
    assert not np.array_equal(pictures[0], read_pixels(preds.refs[worst[0]].read_bytes(), clf.image_size))


def test_evaluate_command_explains_by_default_and_not_with_no_explain(tmp_path, seed_model, monkeypatch):
    from asirra import evaluation as evaluate

    asked, real = [], evaluate.evaluate_model

    def spy(*args, **kwargs):
        asked.append(kwargs.get("explain", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    data = write_pattern_dataset(tmp_path / "labelled", per_class=6)
    for flags in ((), ("--no-explain",)):
        out = tmp_path / f"out{len(flags)}"
        result = run("evaluate", data, "--model", seed_model, "--backend", "torch", "--out", out, "--challenges", 10, *flags)
        assert result.exit_code == 0, result.output
        assert (out / "mistakes.png").read_bytes()[:8] == PNG_HEADER
    assert asked == [True, False]


def test_explain_imports_no_evaluation_code_so_evaluate_can_import_it():
    from test_structure import package_imports

    graph = package_imports()
    assert "asirra.evaluation" not in graph["asirra.gradcam"] and "asirra.gradcam" in graph["asirra.evaluation"]
