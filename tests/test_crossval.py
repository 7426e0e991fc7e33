"""`asirra cv`: copies never straddle folds, folds are stratified, a killed run continues,
out-of-fold predictions cover every image once, and a flipped label tops the suspects."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from model_support import tiny_train_config
from PIL import Image

# Small enough to learn the toy below in 3 epochs; no batch norm, whose running statistics
# would still be near their initial values after the few steps of a test.
TOY_MODEL = {"widths": [8, 16], "dense": 16, "batch_norm": False, "dropout_conv": 0.0, "dropout_dense": 0.0}


def distinct_image(label: str, seed: int, size=(48, 40)) -> Image.Image:
    """A photo stand-in: its own smooth random texture (so no two are near-identical), tinted red
    for a cat and blue for a dog (so the label is trivially learnable)."""
    rng = np.random.default_rng(seed)
    w, h = size
    texture = np.asarray(Image.fromarray(rng.uniform(40, 215, (4, 4)).astype(np.uint8))
                         .resize((w, h), Image.Resampling.BICUBIC), float)
    tint = np.array([1.0, 0.35, 0.25]) if label == "cat" else np.array([0.25, 0.4, 1.0])
    pixels = texture[..., None] * tint + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_distinct_dataset(folder: Path, per_class: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for c, label in enumerate(("cat", "dog")):
        for i in range(per_class):
            distinct_image(label, c * 10_000 + i).save(folder / f"{label}.{i}.jpg", quality=90)
    return folder


def toy_config(data: Path, out: Path, **overrides):
    settings = dict(image_size=32, lr=3e-3, model_options=dict(TOY_MODEL))
    settings.update(overrides)
    return tiny_train_config(data, out, **settings)


def near_copies(path: Path) -> list[bytes]:
    """The file's bytes, the same photo re-saved at JPEG quality 40, and resized to 70%."""
    image = Image.open(path)
    requality, resized = io.BytesIO(), io.BytesIO()
    image.save(requality, "JPEG", quality=40)
    image.resize((int(image.width * 0.7), int(image.height * 0.7)), Image.Resampling.LANCZOS).save(resized, "JPEG", quality=85)
    return [path.read_bytes(), requality.getvalue(), resized.getvalue()]


def hashes_of(sources) -> np.ndarray:
    from asirra.crossval import HASH_SIDE, dhash
    from asirra.images import read_pixels

    return dhash(np.stack([read_pixels(s, HASH_SIDE) for s in sources]))


def test_dhash_moves_a_few_bits_when_a_photo_is_reencoded_or_resized(tmp_path):
    from asirra.crossval import HAMMING_THRESHOLD

    data = write_distinct_dataset(tmp_path / "d", per_class=15)
    files = sorted(data.iterdir())
    for path in files[:6]:
        original, *copies = hashes_of(near_copies(path))
        assert all(np.bitwise_count(original ^ c) <= HAMMING_THRESHOLD for c in copies), path.name
    h = hashes_of(files)
    distances = np.bitwise_count(h[:, None] ^ h[None, :])[np.triu_indices(len(h), 1)]
    assert np.median(distances) > 3 * HAMMING_THRESHOLD // 2  # other images: far apart, as a rule


def test_union_find_joins_chains_and_leaves_singletons():
    from asirra.crossval import connected_groups

    groups = connected_groups(6, [(0, 2), (2, 4), (5, 5)])
    assert groups[0] == groups[2] == groups[4]
    assert len({groups[1], groups[3], groups[5], groups[0]}) == 4


def test_byte_identical_and_near_identical_copies_never_straddle_folds(tmp_path):
    from asirra.cache import PixelCache
    from asirra.crossval import duplicate_groups, make_folds
    from asirra.data import scan

    data = write_distinct_dataset(tmp_path / "d", per_class=15)
    copy_sets = []
    for n, name in enumerate(["cat.0.jpg", "cat.1.jpg", "dog.0.jpg", "dog.1.jpg", "dog.2.jpg"]):
        label = name.split(".")[0]
        members = [name]
        for j, content in enumerate([*near_copies(data / name)[:1], *near_copies(data / name)]):
            copy_name = f"{label}.{500 + 10 * n + j}.jpg"  # j = 0: byte-identical, then itself again, re-encoded, resized
            (data / copy_name).write_bytes(content)
            members.append(copy_name)
        copy_sets.append(members)
    # Straight from the pixel cache, not through load_pixels (which drops byte-identical files first).
    cached = PixelCache(32, tmp_path / "cache").build(scan(data, labelled=True), workers=1, progress=False)
    groups = duplicate_groups(cached, cache_dir=str(tmp_path / "cache"), workers=1)
    position = {ref.name: i for i, ref in enumerate(cached.refs)}
    assert len(set(groups)) == 30  # the 30 originals; every copy joined its original
    for seed in range(5):
        fold_of = {}
        for f, val in enumerate(make_folds(cached.labels, groups, 3, seed)):
            fold_of.update({int(i): f for i in val})
        for members in copy_sets:
            assert len({fold_of[position[m]] for m in members}) == 1, (seed, members)


def test_folds_are_stratified_and_partition_the_images():
    from asirra.crossval import make_folds

    labels = np.array([0] * 30 + [1] * 18)
    folds = make_folds(labels, np.arange(len(labels)), 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(labels)))
    for val in folds:
        assert np.bincount(labels[val], minlength=2).tolist() == [10, 6]


def test_too_many_folds_for_the_smaller_class_is_refused():
    from asirra.crossval import make_folds

    with pytest.raises(ValueError, match="between 2 and 4"):
        make_folds(np.array([0] * 10 + [1] * 4), np.arange(14), 5, seed=0)


def test_training_fraction_subsamples_only_the_training_images(tmp_path):
    from asirra.crossval import training_positions

    class Fake:
        labels = np.array([0, 1] * 20)

        def __len__(self):
            return 40

    val = np.arange(0, 40, 5)  # 4 of each class
    train = training_positions(Fake(), val, 0.5, seed=0)
    assert len(train) == 16 and not set(train) & set(val)
    assert np.bincount(Fake.labels[train]).tolist() == [8, 8]
    assert len(training_positions(Fake(), val, 1.0, seed=0)) == 32


# ---- a whole cross-validation on the toy, with one label flipped ------------------------------


@pytest.fixture(scope="module")
def flipped_cv(tmp_path_factory):
    from asirra.crossval import cross_validate

    root = tmp_path_factory.mktemp("cv")
    data = write_distinct_dataset(root / "data", per_class=20)
    distinct_image("cat", 777).save(data / "dog.999.jpg", quality=90)  # a red (cat) photo labelled dog
    config = toy_config(data, root / "cv", epochs=3)
    summary = cross_validate(config, folds=3, n_suspects=5)
    return root / "cv", summary


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_out_of_fold_predictions_cover_every_image_exactly_once(flipped_cv):
    out, summary = flipped_cv
    oof = read_csv(out / "oof.csv")
    folds = json.loads((out / "folds.json").read_text())["val_keys"]
    assert len(oof) == 41 == len({row["key"] for row in oof})
    assert {row["key"] for row in oof} == {key for keys in folds for key in keys}
    for row in oof:
        assert row["key"] in folds[int(row["fold"]) - 1]
    assert summary["oof"]["n"] == 41


def test_the_flipped_label_is_the_first_suspect(flipped_cv):
    out, summary = flipped_cv
    suspects = read_csv(out / "suspects.csv")
    assert suspects[0]["name"] == "dog.999.jpg" and suspects[0]["label"] == "dog"
    assert float(suspects[0]["p_dog"]) < 0.5
    assert (out / "suspects.png").stat().st_size > 0


def test_cv_summary_is_the_mean_of_its_folds(flipped_cv):
    out, summary = flipped_cv
    saved = json.loads((out / "cv.json").read_text())
    accuracies = [f["accuracy"] for f in saved["per_fold"]]
    assert len(accuracies) == 3
    s = saved["summary"]["accuracy"]
    assert s["mean"] == pytest.approx(np.mean(accuracies))
    assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    low, high = saved["summary_corrected"]["accuracy"]["ci95"]
    assert high - low >= s["ci95"][1] - s["ci95"][0]  # corrected for overlapping training sets: never narrower
    assert (out / "cv.png").stat().st_size > 0


def test_continuing_with_other_settings_is_refused(flipped_cv):
    from asirra.crossval import cross_validate

    out, _ = flipped_cv
    config = json.loads((out / "fold-1" / "config.json").read_text())
    with pytest.raises(ValueError, match="other settings .*epochs"):
        cross_validate(toy_config(Path(config["data"]), out, epochs=4), folds=3)


# ---- resume ------------------------------------------------------------------------------------


def test_a_killed_cv_continues_at_the_fold_and_epoch_where_it_stopped(tmp_path, monkeypatch):
    import asirra.training
    from asirra.crossval import cross_validate

    data = write_distinct_dataset(tmp_path / "data", per_class=9)
    config = toy_config(data, tmp_path / "cv", epochs=2)
    real_train_on = asirra.training.train_on
    calls = []

    def killed_in_fold_2(cached, train_idx, val_idx, config, run, resume=False, **kw):
        calls.append((run.name, resume))

        def stop(row):
            if run.name == "fold-2" and row["epoch"] == 1:
                raise KeyboardInterrupt  # as Ctrl-C after the first epoch's checkpoint

        return real_train_on(cached, train_idx, val_idx, config, run, resume=resume, on_epoch=stop, **kw)

    monkeypatch.setattr(asirra.training, "train_on", killed_in_fold_2)
    with pytest.raises(KeyboardInterrupt):
        cross_validate(config, folds=3)
    assert calls == [("fold-1", False), ("fold-2", False)]
    first_epoch = read_csv(tmp_path / "cv" / "fold-2" / "metrics.csv")
    assert [r["epoch"] for r in first_epoch] == ["1"]
    fold_1_metrics = (tmp_path / "cv" / "fold-1" / "metrics.json").read_text()

    calls.clear()
    summary = cross_validate(config, folds=3)
    assert calls == [("fold-2", True), ("fold-3", False)]  # fold 1 skipped, fold 2 resumed
    rows = read_csv(tmp_path / "cv" / "fold-2" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[0] == first_epoch[0]
    assert (tmp_path / "cv" / "fold-1" / "metrics.json").read_text() == fold_1_metrics
    assert len(read_csv(tmp_path / "cv" / "oof.csv")) == 18 and len(summary["per_fold"]) == 3


# ---- the command -------------------------------------------------------------------------------


def test_cv_command_passes_training_options_to_every_fold(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from asirra.cli import app

    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))
    data = write_distinct_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, ["cv", "--data", str(data), "--out", str(out), "--folds", "2", "--epochs", "1",
                                      "--image-size", "32", "--batch-size", "8", "--lr", "0.002", "--no-augment",
                                      "--suspects", "3"])
    assert result.exit_code == 0, result.output
    for fold in ("fold-1", "fold-2"):
        config = json.loads((out / fold / "config.json").read_text())
        assert (config["batch_size"], config["lr"], config["augment"], config["out"]) == (8, 0.002, None, str(out / fold))
    assert len(read_csv(out / "suspects.csv")) <= 3
    refused = CliRunner().invoke(app, ["cv", "--data", str(data), "--out", str(tmp_path / "x"), "--folds", "9"])
    assert refused.exit_code == 2 and "error: --folds must be between 2 and 6" in refused.output
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_look_alike_layouts_with_different_content_are_not_joined(tmp_path):
    """Distinct photos can share a dHash (similar framing); the thumbnail correlation tells them apart."""
    from asirra.cache import PixelCache
    from asirra.crossval import HAMMING_THRESHOLD, duplicate_groups
    from asirra.data import scan

    rng = np.random.default_rng(3)
    # A blocky 9 x 8 layout whose neighbouring cells are >= 27 grey levels apart fixes every dHash bit;
    # strong pixel noise on top makes the two images different pictures (correlation ~0.75).
    cells = np.stack([rng.permutation(np.linspace(20, 235, 9)) for _ in range(8)])
    layout = np.kron(cells, np.ones((8, 8)))
    data = tmp_path / "d"
    data.mkdir()
    for n in range(2):
        detail = rng.normal(0, 110, (64, 72, 1)).repeat(3, 2)
        Image.fromarray(np.clip(layout[..., None] + detail, 0, 255).astype(np.uint8)).save(data / f"cat.{n}.png")
    cached = PixelCache(32, tmp_path / "cache").build(scan(data, labelled=True), workers=1, progress=False)
    a, b = hashes_of([data / "cat.0.png", data / "cat.1.png"])
    assert np.bitwise_count(a ^ b) <= HAMMING_THRESHOLD  # dHash alone would call them copies
    assert len(set(duplicate_groups(cached, cache_dir=str(tmp_path / "cache"), workers=1))) == 2


def test_images_dropped_from_training_are_still_validated_in_their_fold(tmp_path):
    from asirra.crossval import cross_validate, read_image_keys

    data = write_distinct_dataset(tmp_path / "data", per_class=9)
    cross_validate(toy_config(data, tmp_path / "all", epochs=1), folds=3)
    (tmp_path / "drop.csv").write_text("".join(line for line in (tmp_path / "all" / "oof.csv").open()
                                               if line.startswith("key,") or "cat.2." in line or "dog.5." in line))
    drop = read_image_keys(tmp_path / "drop.csv")
    assert len(drop) == 2
    cross_validate(toy_config(data, tmp_path / "clean", epochs=1), folds=3, drop_from_training=drop)
    assert (tmp_path / "clean" / "folds.json").read_text() == (tmp_path / "all" / "folds.json").read_text()
    for fold in ("fold-1", "fold-2", "fold-3"):
        full = json.loads((tmp_path / "all" / fold / "split.json").read_text())
        clean = json.loads((tmp_path / "clean" / fold / "split.json").read_text())
        assert clean["val"] == full["val"] and set(clean["train"]) == set(full["train"]) - drop
    assert {row["key"] for row in read_csv(tmp_path / "clean" / "oof.csv")} >= drop
    (tmp_path / "names.csv").write_text("name\ncat.1.jpg\n")
    with pytest.raises(ValueError, match="no key column"):
        read_image_keys(tmp_path / "names.csv")
