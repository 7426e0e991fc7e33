"""data.check decodes every image, reports each unusable one with its reason and never stops on one;
data.show_grid draws a labelled sample. Images are generated here; one slow test reads the shared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_image
from PIL import Image

from asirra import data


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Kaggle-flat folder: 2 good images, 4 broken ones under image names, 1 non-image file."""
    folder = tmp_path / "mixed"
    write_image(folder / "cat.0.jpg", size=(60, 40))
    write_image(folder / "dog.1.jpg", size=(30, 50), format="PNG")  # a PNG under a .jpg name is fine
    (folder / "cat.1.jpg").write_bytes(b"")
    good = (folder / "cat.0.jpg").read_bytes()
    (folder / "cat.2.jpg").write_bytes(good[: len(good) // 2])
    (folder / "dog.0.jpg").write_text("<html><body>moved</body></html>")
    write_image(folder / "dog.2.jpg", size=(1, 1))
    (folder / "Thumbs.db").write_bytes(b"junk")
    return folder


EXPECTED_REASONS = {
    "cat.1.jpg": "empty file",
    "cat.2.jpg": "truncated",
    "dog.0.jpg": "HTML",
    "dog.2.jpg": "too small",
}


def test_check_counts_sizes_and_reports_each_unusable_file(mixed_folder):
    report = data.check(data.scan(mixed_folder), progress=False)
    assert report.n_images == 6 and report.n_usable == 2
    assert report.per_class == {"cat": 3, "dog": 3, "unlabelled": 0}
    reasons = {Path(item["path"]).name: item["reason"] for item in report.unusable}
    assert reasons.keys() == EXPECTED_REASONS.keys()
    for name, expected in EXPECTED_REASONS.items():
        assert expected in reasons[name]
    assert report.width == {"min": 30, "median": 45, "max": 60}
    assert report.height == {"min": 40, "median": 45, "max": 50}


def test_unreadable_file_is_reported_and_the_run_goes_on(mixed_folder, monkeypatch):
    original = Path.read_bytes

    def read_bytes(self):
        if self.name == "cat.0.jpg":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    report = data.check(data.scan(mixed_folder), progress=False)
    reasons = {Path(item["path"]).name: item["reason"] for item in report.unusable}
    assert reasons["cat.0.jpg"] == "permission denied"
    assert report.n_usable == 1


@pytest.mark.parametrize("workers", [1, 3])
def test_report_does_not_depend_on_the_number_of_workers(mixed_folder, workers):
    refs = data.scan(mixed_folder)
    assert data.check(refs, workers=workers, progress=False) == data.check(refs, workers=2, progress=False)


def test_report_json_holds_the_documented_fields(mixed_folder):
    report = json.loads(json.dumps(data.check(data.scan(mixed_folder), progress=False).to_json()))
    assert {"n_images", "per_class", "unusable", "size"} <= report.keys()
    assert {"cat", "dog"} <= report["per_class"].keys()
    assert all(item.keys() == {"path", "reason"} for item in report["unusable"])


def test_text_report_names_every_unusable_file(mixed_folder):
    text = data.check(data.scan(mixed_folder), progress=False).to_text()
    assert text.splitlines()[0].startswith("6 images (3 cat, 3 dog); 2 usable, 4 unusable")
    for name in EXPECTED_REASONS:
        assert name in text


def test_show_grid_writes_a_png_even_with_unusable_images_in_the_sample(mixed_folder, tmp_path):
    out = data.show_grid(data.scan(mixed_folder), tmp_path / "plots" / "grid.png", n=16)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 100
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temporary file left behind


def test_show_grid_sample_depends_on_the_seed_only(tiny_kaggle_root, tmp_path):
    refs = data.scan(tiny_kaggle_root)
    first = data.show_grid(refs, tmp_path / "a.png", n=4, seed=1).read_bytes()
    again = data.show_grid(refs, tmp_path / "b.png", n=4, seed=1).read_bytes()
    other = data.show_grid(refs, tmp_path / "c.png", n=4, seed=2).read_bytes()
    assert first == again != other


def test_show_grid_rejects_titles_that_do_not_match_the_images(tiny_kaggle_root, tmp_path):
    refs = data.scan(tiny_kaggle_root)
    with pytest.raises(data.DataError, match="titles"):
        data.show_grid(refs, tmp_path / "grid.png", titles=["one"])


@pytest.mark.slow
def test_check_on_the_first_few_hundred_shared_images(shared_data):
    refs = data.scan(shared_data / "train")
    sample = [ref for ref in refs if int(ref.id) < 150]  # the native-size originals, both classes
    report = data.check(sample, progress=False)
    assert report.n_images == 300
    assert report.per_class == {"cat": 150, "dog": 150, "unlabelled": 0}
    assert report.n_usable == 300 - len(report.unusable)
    assert all(item["reason"] for item in report.unusable)
    assert 8 <= report.width["min"] <= report.width["median"] <= report.width["max"] <= 10_000
