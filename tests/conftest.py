"""Shared fixtures: the shared data set (or a skip), and small generated images and data sets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "datasets" / "dogs-vs-cats"


def data_required() -> bool:
    """Under CI (CI=true, as CI services set it) or ASIRRA_REQUIRE_DATA=1 missing data fails a test instead of skipping it."""
    return os.environ.get("ASIRRA_REQUIRE_DATA") == "1" or os.environ.get("CI", "").lower() in ("true", "1")


def require_shared_data(root: Path = SHARED_DATA) -> Path:
    """`root` if it holds train/ and test1/; otherwise skip the test, or fail it when data is required."""
    missing = [name for name in ("train", "test1") if not (root / name).is_dir()]
    if missing:
        reason = f"shared data not found: no {' or '.join(missing)}/ in {root}"
        if data_required():
            pytest.fail(f"{reason} (required: ASIRRA_REQUIRE_DATA=1 or CI=true)", pytrace=False)
        pytest.skip(reason)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """<project root>/../shared/datasets/dogs-vs-cats (train/ and test1/); a skip, or under CI a failure, without it."""
    return require_shared_data()


def write_image(path: Path, size=(48, 40), color=(200, 90, 40), mode="RGB", format=None, seed=0, **save) -> Path:
    """A noisy image of roughly `color` written to `path` (format from the suffix unless given)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(color, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=format, **save)
    return path


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Pixel and activation caches in the test's own folder, never the user's."""
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def make_image():
    """write_image as a fixture: make_image(path, size=(w, h), color=(r, g, b), mode=..., format=...)."""
    return write_image


@pytest.fixture
def tiny_kaggle_root(tmp_path) -> Path:
    """A Kaggle-style root: train/cat.N.jpg and dog.N.jpg (6 each; cats reddish, dogs bluish)
    and test1/N.jpg (4 unlabelled), all small generated JPEGs."""
    root = tmp_path / "dogs-vs-cats"
    for i in range(6):
        write_image(root / "train" / f"cat.{i}.jpg", color=(200, 90, 40), seed=i)
        write_image(root / "train" / f"dog.{i}.jpg", color=(40, 90, 200), seed=100 + i)
    for i in range(1, 5):
        write_image(root / "test1" / f"{i}.jpg", color=(200, 90, 40) if i % 2 else (40, 90, 200), seed=200 + i)
    return root


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> Path:
    """The documentation site, built once per session in strict mode (a broken link, a missing page or an
    unresolved reference fails it): the folder holding index.html. Without mkdocs a skip, under CI a failure."""
    import subprocess
    import sys

    try:
        import material  # noqa: F401
        import mkdocs  # noqa: F401
    except ImportError:
        reason = "mkdocs / mkdocs-material not installed (pip install -e '.[docs]')"
        if data_required():
            pytest.fail(reason)
        pytest.skip(reason)
    site = tmp_path_factory.mktemp("site")
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                           cwd=PROJECT_ROOT, capture_output=True, text=True,
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stdout + built.stderr
    return site
