"""The classic baseline: distorted pools are valid pools, measured on the files, and refuse bad strengths."""

from __future__ import annotations

import json

import numpy as np
import pytest
from captcha_service_support import make_pool
from PIL import Image
from typer.testing import CliRunner

from asirra.captcha.defend.derived_pool import MANIFEST
from asirra.captcha.defend.distort import DEFAULT_STRENGTH, DistortConfig, DistortError, distort, distort_pool
from asirra.captcha.defend.similarity import ssim
from asirra.cli import app
from asirra.data import scan
from asirra.images import load_image

runner = CliRunner()


def records(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


@pytest.fixture
def photo():
    """A smooth image with edges (a bright disc on a gradient): noise, blur and warps all change it."""
    rows, cols = np.mgrid[0:60, 0:80]
    image = np.stack([rows * 3, cols * 2, 255 - rows * 2], axis=-1).astype(float)
    image[(rows - 30) ** 2 + (cols - 40) ** 2 < 300] = 240
    return image.astype(np.uint8)


@pytest.mark.parametrize("kind", sorted(DEFAULT_STRENGTH))
def test_each_kind_writes_a_pool_whose_manifest_measures_the_files(tmp_path, kind):
    pool = make_pool(tmp_path / "pool", cats=6, dogs=6)
    summary = distort_pool(pool, tmp_path / kind, DistortConfig(kind=kind), progress=False)
    assert summary.written == 12
    assert sorted((r.label, r.id) for r in scan(tmp_path / kind)) == sorted((r.label, r.id) for r in pool)
    for record in records(tmp_path / kind):
        stored = np.asarray(Image.open(tmp_path / kind / record["file"]))
        original = np.asarray(load_image(record["source"]))
        assert stored.shape == original.shape
        assert record["linf"] == np.abs(stored.astype(int) - original).max() > 0
        assert record["ssim"] == pytest.approx(ssim(original, stored)) and record["ssim"] < 1


@pytest.mark.parametrize("kind, weak, strong", [("noise", 4, 32), ("blur", 0.7, 3), ("warp", 2, 12),
                                                ("contrast", 0.8, 0.3), ("clutter", 0.05, 0.3)])
def test_stronger_distortions_cost_more_similarity(photo, kind, weak, strong):
    def similarity(strength):
        return ssim(photo, distort(photo, kind, strength, np.random.default_rng(0)))

    assert similarity(strong) < similarity(weak) < 1.0


def test_neutral_strengths_change_nothing(photo):
    for kind, strength in (("noise", 0), ("blur", 0), ("warp", 0), ("contrast", 1), ("clutter", 0)):
        assert np.array_equal(distort(photo, kind, strength, np.random.default_rng(0)), photo), kind


def test_clutter_covers_about_the_asked_fraction(photo):
    changed = distort(photo, "clutter", 0.2, np.random.default_rng(1))
    covered = np.any(changed != photo, axis=-1).mean()
    assert 0.15 <= covered <= 0.45  # strokes may repaint pixels in their own colour; others overshoot a little


def test_distortions_are_seeded_per_image(tmp_path):
    pool = make_pool(tmp_path / "pool", cats=6, dogs=6)
    for out in ("a", "b"):
        distort_pool(pool, tmp_path / out, DistortConfig(kind="noise", seed=3), progress=False)
    files = [r["file"] for r in records(tmp_path / "a")]
    assert all(np.array_equal(np.asarray(Image.open(tmp_path / "a" / f)), np.asarray(Image.open(tmp_path / "b" / f)))
               for f in files)
    first, second = (np.asarray(Image.open(tmp_path / "a" / f), dtype=int) - np.asarray(load_image(r["source"]))
                     for f, r in zip(files[:2], records(tmp_path / "a")[:2]))
    assert not np.array_equal(first[:8, :8], second[:8, :8])  # not one noise pattern for every image


@pytest.mark.parametrize("kind, strength, message", [("snow", None, "unknown kind 'snow'"),
                                                     ("contrast", 0.0, "--strength for contrast must be between")])
def test_bad_settings_are_refused_in_one_line(tmp_path, kind, strength, message):
    with pytest.raises(DistortError, match=message):
        DistortConfig(kind=kind, strength=strength)
    make_pool(tmp_path / "pool")
    args = ["captcha", "distort", "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "out"), "--kind", kind]
    result = runner.invoke(app, args + ([] if strength is None else ["--strength", str(strength)]))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1


def test_the_cli_writes_a_distorted_pool(tmp_path):
    make_pool(tmp_path / "pool")
    result = runner.invoke(app, ["captcha", "distort", "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
                                 "--kind", "blur", "--strength", "2", "--limit", "12"])
    assert result.exit_code == 0, result.output
    assert len(scan(tmp_path / "out")) == 12
    assert {r["strength"] for r in records(tmp_path / "out")} == {2.0}
