"""Each plot function writes a real PNG of a sensible size, atomically, from plain inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from asirra import plots


def assert_png(path, min_size=(200, 150), max_size=(3000, 3000)):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], image.size
    # Nothing left behind by the atomic write.
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.fixture
def predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    return y, np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1)


def write_metrics_csv(path, text):
    path.write_text(text)
    return path


def test_plot_curves_writes_png_with_extra_and_empty_columns(tmp_path):
    csv_path = write_metrics_csv(
        tmp_path / "metrics.csv",
        "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"
        "1,0.6,0.70,0.50,0.75,0.001,3.1\n"
        "2,0.4,0.80,0.35,0.85,0.001,3.0\n"
        "3,0.3,0.88,0.40,0.84,,2.9\n",
    )
    assert_png(plots.plot_curves(csv_path, tmp_path / "out" / "curves.png"))


def test_plot_curves_without_validation_columns_still_plots(tmp_path):
    csv_path = write_metrics_csv(tmp_path / "metrics.csv", "epoch,train_loss,train_acc\n1,0.6,0.7\n2,0.5,0.8\n")
    assert_png(plots.plot_curves(csv_path, tmp_path / "curves.png"))


@pytest.mark.parametrize(
    "text, message",
    [("", "no rows"), ("loss,acc\n0.5,0.8\n", "no 'epoch' column"), ("epoch,train_loss\n1,abc\n", "not a number")],
)
def test_plot_curves_rejects_unusable_metrics_file(tmp_path, text, message):
    csv_path = write_metrics_csv(tmp_path / "metrics.csv", text)
    with pytest.raises(plots.MetricsFileError, match=message):
        plots.plot_curves(csv_path, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_plot_curves_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(plots.MetricsFileError, match="file not found"):
        plots.plot_curves(tmp_path / "nope.csv", tmp_path / "curves.png")


def test_plot_confusion_writes_png(tmp_path):
    assert_png(plots.plot_confusion(np.array([[40, 10], [0, 0]]), tmp_path / "cm.png"))


def test_plot_confusion_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="2x2"):
        plots.plot_confusion(np.ones((3, 3)), tmp_path / "cm.png")


def test_plot_roc_writes_png(tmp_path, predictions):
    assert_png(plots.plot_roc(*predictions, tmp_path / "roc.png"))


def test_plot_roc_with_one_class_still_writes_png(tmp_path):
    assert_png(plots.plot_roc(np.zeros(5), np.linspace(0, 1, 5), tmp_path / "roc.png"))


def test_plot_reliability_with_before_and_after_series(tmp_path, predictions):
    y, p = predictions
    assert_png(plots.plot_reliability(y, p, tmp_path / "rel.png", n_bins=5, p_dog_after=p**2))


def test_plot_image_grid_accepts_arrays_and_pil_images_with_colours(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(5)]
    images.append(Image.new("RGB", (50, 50), "orange"))
    titles = [f"cat.{i}.jpg  P(dog)=0.9{i}" for i in range(6)]
    out = plots.plot_image_grid(images, titles, tmp_path / "grid.png", ncols=4, title="t", colors=["red"] * 6)
    assert_png(out, min_size=(600, 350))


def test_plot_image_grid_empty_says_no_images(tmp_path):
    assert_png(plots.plot_image_grid([], [], tmp_path / "grid.png"), min_size=(100, 100))


def test_plot_image_grid_rejects_mismatched_titles(tmp_path):
    with pytest.raises(ValueError, match="2 images but 1 titles"):
        plots.plot_image_grid([np.zeros((8, 8, 3), np.uint8)] * 2, ["a"], tmp_path / "grid.png")


def test_failed_write_keeps_previous_file(tmp_path):
    from asirra.fileio import atomic_path

    out = tmp_path / "curves.png"
    out.write_bytes(b"previous")
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert out.read_bytes() == b"previous"
    assert list(tmp_path.iterdir()) == [out]
