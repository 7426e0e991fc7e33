"""`asirra data check` and `asirra data show`: one JSON object on stdout, readable text, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from asirra.cli import app

runner = CliRunner()


@pytest.fixture
def root_with_a_broken_file(tiny_kaggle_root):
    (tiny_kaggle_root / "train" / "cat.6.jpg").write_text("<!DOCTYPE html><html>error page</html>")
    return tiny_kaggle_root


def test_check_json_is_one_object_with_counts_and_unusable_files(root_with_a_broken_file):
    result = runner.invoke(app, ["data", "check", str(root_with_a_broken_file), "--json"])
    assert result.exit_code == 0  # unusable files are findings, not failures
    report = json.loads(result.stdout)
    assert report["layout"] == "kaggle-root"
    assert report["n_images"] == 17  # train/ and test1/ both
    assert report["per_class"] == {"cat": 7, "dog": 6, "unlabelled": 4}
    assert [item["path"].rsplit("/", 1)[-1] for item in report["unusable"]] == ["cat.6.jpg"]
    assert "HTML" in report["unusable"][0]["reason"]


def test_check_text_shows_counts_sizes_and_reasons(root_with_a_broken_file):
    result = runner.invoke(app, ["data", "check", str(root_with_a_broken_file)])
    assert result.exit_code == 0
    assert "17 images (7 cat, 6 dog, 4 unlabelled); 16 usable, 1 unusable" in result.stdout
    assert "width: min 48  median 48  max 48" in result.stdout
    assert "cat.6.jpg: not an image (HTML/XML text)" in result.stdout


def test_check_uses_the_data_lookup_when_no_path_is_given(tiny_kaggle_root, monkeypatch):
    monkeypatch.setenv("ASIRRA_DATA", str(tiny_kaggle_root))
    result = runner.invoke(app, ["data", "check", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["path"] == str(tiny_kaggle_root)


@pytest.mark.parametrize("command", ["check", "show"])
def test_missing_path_is_one_line_and_exit_2(command, tmp_path):
    args = ["data", command, str(tmp_path / "nowhere")] + (["--out", str(tmp_path / "g.png")] if command == "show" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: no data at {tmp_path / 'nowhere'}; run `asirra download`, or pass --data PATH, or set $ASIRRA_DATA"
    ]


def test_folder_without_images_is_one_line_and_exit_2(tmp_path):
    result = runner.invoke(app, ["data", "check", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: no images in") and result.stderr.count("\n") == 1


def test_show_writes_a_png_grid(tiny_kaggle_root, tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["data", "show", str(tiny_kaggle_root), "--out", str(out), "--n", "6"])
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG"


def test_check_json_stdout_is_clean_when_run_as_a_program(root_with_a_broken_file):
    # Progress bars must go to stderr so that `asirra data check --json | jq` works.
    result = subprocess.run(
        [sys.executable, "-m", "asirra", "data", "check", str(root_with_a_broken_file), "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_images"] == 17
    assert "checking images" in result.stderr
