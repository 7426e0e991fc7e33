"""Folder-per-class data sets with any class names (issue 11), on synthetic coloured squares:
class names and labels, the errors for unusable class layouts, and N-class training.

Cat/dog layouts keep ("cat", "dog") and a one-logit model; N >= 3 classes train an N-wide head
with softmax cross-entropy, recorded in model.json.
"""

from __future__ import annotations

import csv
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import tiny_train_config
from PIL import Image
from typer.testing import CliRunner

from asirra import data
from asirra.cli import app
from asirra.errors import DataError
from asirra.labels import CAT, DOG
from asirra.splits import stratified_split

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
# A small seed-cnn so a test epoch takes a second: two conv blocks, 16 hidden units.
SMALL = {"widths": [8, 16], "dense": 16}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


def square(path: Path, colour, seed: int, size: int = 24) -> Path:
    """A noisy square of one colour (PNG): easy to tell apart by colour, never byte-identical."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour, float) + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def class_folders(root: Path, per_class: int = 10, colours=COLOURS) -> Path:
    for c, (name, colour) in enumerate(colours.items()):
        for i in range(per_class):
            square(root / name / f"{name}-{i}.png", colour, seed=1000 * c + i)
    return root


# ---- class names and labels ---------------------------------------------------------------------


def test_any_folder_names_are_classes_sorted_as_spelled_and_label_the_images(tmp_path):
    root = class_folders(tmp_path / "colours", per_class=3)
    assert data.detect_layout(root) == "class-folders"
    assert data.class_names(root) == ("blue", "green", "red")
    refs = data.scan(root, labelled=True)
    assert [(r.label, r.name) for r in refs[:4]] == [(0, "blue/blue-0.png"), (0, "blue/blue-1.png"),
                                                      (0, "blue/blue-2.png"), (1, "green/green-0.png")]
    assert np.bincount([r.label for r in refs]).tolist() == [3, 3, 3]
    assert all(r.name.split("/")[0] == data.class_names(root)[r.label] for r in refs)


def test_class_order_is_python_sort_of_the_names_on_disk(tmp_path):
    for name in ("b_ship", "Zebra", "a_plane", "10", "2"):
        square(tmp_path / "d" / name / "x.png", (90, 90, 90), seed=len(name))
    assert data.class_names(tmp_path / "d") == ("10", "2", "Zebra", "a_plane", "b_ship")  # as Keras orders them


def test_cat_and_dog_layouts_keep_cat_0_and_dog_1(tmp_path):
    square(tmp_path / "cd" / "Dogs" / "1.png", COLOURS["blue"], 1)
    square(tmp_path / "cd" / "cat" / "2.png", COLOURS["red"], 2)
    assert data.class_names(tmp_path / "cd") == ("cat", "dog")
    assert [(r.label, r.name) for r in data.scan(tmp_path / "cd")] == [(CAT, "cat/2.png"), (DOG, "Dogs/1.png")]
    square(tmp_path / "flat" / "dog.3.png", COLOURS["blue"], 3)
    square(tmp_path / "flat" / "cat.4.png", COLOURS["red"], 4)
    assert data.class_names(tmp_path / "flat") == ("cat", "dog")
    square(tmp_path / "none" / "5.png", COLOURS["red"], 5)
    assert data.class_names(tmp_path / "none") == ()


def test_a_task_with_cat_and_dog_among_other_classes_keeps_every_class(tmp_path):
    # CIFAR-10 has cat/ and dog/ beside airplane/ ...: they must not turn it into a cat/dog set.
    root = class_folders(tmp_path / "cifar", per_class=2, colours={"bird": (1, 2, 3), "cat": (9, 9, 9), "dog": (5, 5, 5)})
    assert data.class_names(root) == ("bird", "cat", "dog")
    assert sorted({r.label for r in data.scan(root, labelled=True)}) == [0, 1, 2]
    assert len(data.scan(root, labelled=True)) == 6


def test_wrapper_folders_and_nested_images_in_a_zip(tmp_path):
    root = class_folders(tmp_path / "src" / "digits", per_class=2, colours={"0": (0, 0, 0), "1": (255, 255, 255)})
    square(root / "1" / "more" / "deep.png", (250, 250, 250), 7)
    archive = tmp_path / "digits.zip"
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(root.parent.rglob("*.png")):
            out.write(path, path.relative_to(root.parent).as_posix())  # digits/0/..., digits/1/...
    assert data.detect_layout(archive) == "zip:class-folders"
    assert data.class_names(archive) == ("0", "1")
    refs = data.scan(archive)
    assert [(r.label, r.name) for r in refs if r.id == "deep"] == [(1, "1/more/deep.png")]
    assert np.bincount([r.label for r in refs]).tolist() == [2, 3]


def test_one_folder_or_loose_images_beside_folders_stay_unlabelled(tmp_path):
    square(tmp_path / "one" / "test1" / "1.png", (1, 1, 1), 1)
    assert data.detect_layout(tmp_path / "one") == "unlabelled"
    class_folders(tmp_path / "mixed", per_class=1)
    square(tmp_path / "mixed" / "loose.png", (1, 1, 1), 2)
    assert data.detect_layout(tmp_path / "mixed") == "unlabelled"
    assert {r.label for r in data.scan(tmp_path / "mixed")} == {None}


# ---- errors ---------------------------------------------------------------------------------


def test_an_empty_class_folder_is_a_one_line_error_naming_it(tmp_path):
    root = class_folders(tmp_path / "d", per_class=2)
    (root / "yellow").mkdir()
    (root / "yellow" / "notes.txt").write_text("no images here")
    for call in (data.class_names, lambda p: data.scan(p, labelled=True)):
        with pytest.raises(DataError, match=r"^class folder yellow/ in .* holds no images") as caught:
            call(root)
        assert "\n" not in str(caught.value)
    assert len(data.scan(root, labelled=False)) == 6  # predicting on the folder needs no classes


def test_a_class_with_too_few_images_to_split_says_how_many_it_has_and_needs():
    labels = [0] * 10 + [1] * 10 + [2]
    with pytest.raises(DataError, match=r"class 'blue' has 1 image; at least 2 per class are needed"):
        stratified_split(labels, 0.2, seed=0, classes=("red", "green", "blue"))
    with pytest.raises(DataError, match=r"class 'blue' has 0 images"):
        stratified_split([0] * 10 + [1] * 10, 0.2, seed=0, classes=("red", "green", "blue"))


def test_a_class_left_out_of_the_validation_split_is_an_error_naming_it():
    # 40 + 40 + 2 images, a 0.05 validation share: 5 validation images, none for the class of 2.
    labels = [0] * 40 + [1] * 40 + [2] * 2
    with pytest.raises(DataError, match=r"class 'blue' has no validation images: it has 2, .*needs at least 20"):
        stratified_split(labels, 0.05, seed=0, classes=("red", "green", "blue"))


def test_split_is_stratified_over_n_classes():
    labels = np.repeat(np.arange(5), 20)
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[val_idx]).tolist() == [4] * 5
    assert np.bincount(labels[train_idx]).tolist() == [16] * 5
    assert not set(train_idx) & set(val_idx)


def test_data_check_counts_images_per_class_for_n_classes(tmp_path):
    root = class_folders(tmp_path / "d", per_class=2)
    square(root / "red" / "extra.png", COLOURS["red"], 99)
    result = CliRunner().invoke(app, ["data", "check", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["layout"] == "class-folders"
    assert report["per_class"] == {"blue": 2, "green": 2, "red": 3, "unlabelled": 0}
    text = CliRunner().invoke(app, ["data", "check", str(root)]).stdout
    assert "7 images (2 blue, 2 green, 3 red)" in text


# ---- training -------------------------------------------------------------------------------


def test_n_class_loss_is_cross_entropy_with_label_smoothing_and_binary_is_unchanged():
    from asirra.training import loss_and_accuracy, training_loss

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    targets = torch.tensor([0, 2])
    log_p = torch.log_softmax(logits, 1)
    smooth = 0.1
    expected = -((1 - smooth) * log_p[[0, 1], targets] + smooth / 3 * log_p.sum(1)).mean()
    assert training_loss(logits, targets, smooth).item() == pytest.approx(expected.item(), rel=1e-6)
    loss, accuracy = loss_and_accuracy(logits, targets)
    assert loss == pytest.approx(-log_p[[0, 1], targets].mean().item(), rel=1e-6) and accuracy == 0.5
    z, y = torch.tensor([1.0, -2.0]), torch.tensor([1, 1])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor([0.95, 0.95]))
    assert training_loss(z, y, smooth).item() == pytest.approx(bce.item(), rel=1e-6)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_seed_cnn_trains_three_classes_with_a_three_wide_head_and_records_them(tmp_path):
    from asirra.models import load_model
    from asirra.training import train

    root = class_folders(tmp_path / "d", per_class=10)
    config = tiny_train_config(root, tmp_path / "run", image_size=16, model_options=SMALL, augment=None, batch_size=8,
                               label_smoothing=0.1, epochs=1)
    run = train(config)
    model_json = json.loads((run / "model" / "model.json").read_text())
    assert model_json["classes"] == ["blue", "green", "red"]
    model, model_config = load_model(run)
    assert model.classifier[-1].out_features == 3
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    metrics = json.loads((run / "metrics.json").read_text())
    val = metrics["val"]
    assert val["n"] == 6 and val["classes"] == ["blue", "green", "red"]
    assert np.array(val["confusion"]).shape == (3, 3) and np.array(val["confusion"]).sum() == 6
    assert 0 <= val["accuracy"] <= 1 and np.isfinite(val["log_loss"]) and val["auc"] is None
    assert 0.05 <= metrics["temperature"] <= 20 and model_config.temperature == metrics["temperature"]
    split = json.loads((run / "split.json").read_text())
    assert sorted(name.split("/")[0] for name in split["val_names"]) == ["blue"] * 2 + ["green"] * 2 + ["red"] * 2
    rows = read_csv(run / "val_predictions.csv")
    assert rows[0] == ["key", "name", "label", "p_blue", "p_green", "p_red"] and len(rows) == 7
    assert np.allclose([sum(map(float, r[3:])) for r in rows[1:]], 1, atol=1e-4)


def test_a_resumed_three_class_run_continues_from_its_checkpoint(tmp_path):
    from asirra.training import train

    root = class_folders(tmp_path / "d", per_class=8)
    first = tiny_train_config(root, tmp_path / "run", image_size=16, model_options=SMALL, augment=None, batch_size=8,
                              epochs=1)
    train(first)
    split = (tmp_path / "run" / "split.json").read_text()
    longer = tiny_train_config(root, tmp_path / "run", image_size=16, model_options=SMALL, augment=None, batch_size=8,
                               epochs=2)
    run = train(longer, resume=True)
    assert [r[0] for r in read_csv(run / "metrics.csv")[1:]] == ["1", "2"]
    assert (run / "split.json").read_text() == split
    assert json.loads((run / "model" / "model.json").read_text())["classes"] == ["blue", "green", "red"]


def test_a_cat_dog_run_still_trains_one_logit(tmp_path):
    from asirra.models import load_model
    from asirra.training import train

    root = class_folders(tmp_path / "d", per_class=8, colours={"Cat": COLOURS["red"], "Dog": COLOURS["blue"]})
    run = train(tiny_train_config(root, tmp_path / "run", image_size=16, model_options=SMALL, augment=None,
                                  batch_size=8))
    assert json.loads((run / "model" / "model.json").read_text())["classes"] == ["cat", "dog"]
    model, _ = load_model(run)
    assert model.classifier[-1].out_features == 1
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2,)
    assert read_csv(run / "val_predictions.csv")[0] == ["key", "name", "label", "p_dog"]
    val = json.loads((run / "metrics.json").read_text())["val"]
    assert val["auc"] is not None and "brier" in val  # the binary figures, as before


def test_linear_probe_on_cached_features_trains_a_three_way_head(tmp_path):
    from asirra.models import load_model
    from asirra.training import train

    root = class_folders(tmp_path / "d", per_class=5)
    config = tiny_train_config(root, tmp_path / "run", model="effnet-lite0", image_size=64, strategy="linear",
                               augment=None, batch_size=4, epochs=3, lr=1e-2, views=1)
    run = train(config)
    model, model_config = load_model(run)
    assert model_config.classes == ["blue", "green", "red"] and model.head.out_features == 3
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    # Three colours apart on ImageNet features: a few epochs of the head separate them.
    assert json.loads((run / "metrics.json").read_text())["val"]["accuracy"] >= 2 / 3


def test_cross_validation_folds_are_stratified_over_three_classes(tmp_path):
    from asirra.crossval import cross_validate

    root = class_folders(tmp_path / "d", per_class=6)
    config = tiny_train_config(root, tmp_path / "cv", image_size=16, model_options=SMALL, augment=None, batch_size=8)
    summary = cross_validate(config, folds=2, n_suspects=4)
    assert [f["n_val"] for f in summary["per_fold"]] == [9, 9]
    assert set(summary["summary"]) == {"accuracy", "log_loss"}  # no AUC for three classes
    assert summary["oof"]["n"] == 18 and summary["oof"]["auc"] is None
    rows = read_csv(tmp_path / "cv" / "oof.csv")
    assert rows[0] == ["key", "name", "label", "p_blue", "p_green", "p_red", "fold"]
    for fold in ("1", "2"):  # each fold validates three images of each class
        labels = [r[2] for r in rows[1:] if r[-1] == fold]
        assert sorted(labels) == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    suspects = read_csv(tmp_path / "cv" / "suspects.csv")
    assert all(r[3] in COLOURS and r[4] in COLOURS and r[3] != r[4] for r in suspects[1:])


def test_cross_validation_refuses_more_folds_than_the_smallest_class_has_images(tmp_path):
    from asirra.crossval import cross_validate

    root = class_folders(tmp_path / "d", per_class=6)
    for path in sorted((root / "red").glob("*.png"))[2:]:
        path.unlink()
    config = tiny_train_config(root, tmp_path / "cv", image_size=16, model_options=SMALL, augment=None)
    with pytest.raises(ValueError, match=r"--folds must be between 2 and 2 \(the smallest class's size\), got 3"):
        cross_validate(config, folds=3)
    (root / "red").rename(tmp_path / "elsewhere")
    (root / "red").mkdir()
    with pytest.raises(DataError, match=r"class folder red/ in .* holds no images"):
        cross_validate(replace(config, out=str(tmp_path / "cv2")), folds=2)


@pytest.mark.slow  # a second backbone export
def test_finetuning_the_top_block_trains_a_three_way_head(tmp_path):
    from asirra.models import create_model, load_model
    from asirra.training import train

    root = class_folders(tmp_path / "d", per_class=5)
    config = tiny_train_config(root, tmp_path / "run", model="effnet-lite0", image_size=64, strategy="finetune",
                               unfreeze=1, augment=None, batch_size=4, epochs=2, lr=1e-2, views=1)
    run = train(config)
    model, model_config = load_model(run)
    assert model_config.classes == ["blue", "green", "red"] and model.head.out_features == 3
    pretrained = create_model("effnet-lite0", image_size=64)
    assert not torch.equal(model.backbone.blocks[15]._project_conv.weight,
                           pretrained.backbone.blocks[15]._project_conv.weight)  # the top block trained
    assert torch.equal(model.backbone.blocks[14]._project_conv.weight, pretrained.backbone.blocks[14]._project_conv.weight)
    val = json.loads((run / "metrics.json").read_text())["val"]
    assert val["n"] == 3 and np.array(val["confusion"]).shape == (3, 3)


def test_data_show_titles_images_with_their_class_names(tmp_path, monkeypatch):
    import asirra.plots

    root = class_folders(tmp_path / "d", per_class=2)
    seen = {}

    def record(images, captions, out, **kw):
        seen["captions"] = captions
        out.write_bytes(b"png")
        return out

    monkeypatch.setattr(asirra.plots, "plot_image_grid", record)
    result = CliRunner().invoke(app, ["data", "show", str(root), "--out", str(tmp_path / "grid.png"), "--n", "6"])
    assert result.exit_code == 0, result.output
    assert sorted(c.split()[0] for c in seen["captions"]) == ["blue", "blue", "green", "green", "red", "red"]


def test_check_without_the_class_names_of_a_many_class_set_is_a_clear_error(tmp_path):
    from asirra.data import ImageRef, check

    refs = [ImageRef(str(tmp_path / f"{i}.png"), label, str(i)) for i, label in enumerate([0, 1, 2])]
    with pytest.raises(DataError, match="labels go up to 2 but 2 class names"):
        check(refs, progress=False)
