"""The pixel cache: decode once, share rows by content, remember broken files, survive a torn write."""

import shutil

import numpy as np
import pytest

import asirra.cache
from asirra.cache import PixelCache
from asirra.data import scan
from asirra.images import read_pixels

SIZE = 32


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def decodes(monkeypatch):
    """Counts calls of the cache's decoder."""
    calls = []
    real = asirra.cache.read_pixels

    def counting(source, size):
        calls.append(size)
        return real(source, size)

    monkeypatch.setattr(asirra.cache, "read_pixels", counting)
    return calls


@pytest.fixture
def folder(tmp_path, make_image):
    images = tmp_path / "images"
    for i in range(4):
        make_image(images / f"cat.{i}.jpg", size=(40 + i, 30), color=(200, 90, 40), seed=i)
        make_image(images / f"dog.{i}.png", size=(30, 50), color=(40, 90, 200), seed=10 + i)
    return images


def test_cached_pixels_equal_read_pixels_and_keep_listing_order(folder):
    refs = scan(folder)
    cached = PixelCache(SIZE).build(refs, progress=False)

    assert len(cached) == len(refs) == 8
    assert [r.source for r in cached.refs] == [r.source for r in refs]
    assert cached.labels.tolist() == [r.label for r in refs]
    expected = np.stack([read_pixels(r.source, SIZE) for r in refs])
    assert cached.pixels(range(len(refs))).dtype == np.uint8
    np.testing.assert_array_equal(cached.pixels(range(len(refs))), expected)
    np.testing.assert_array_equal(cached.pixels([5, 2]), expected[[5, 2]])


def test_store_lives_under_asirra_cache(tmp_path):
    cache = PixelCache(SIZE)
    assert cache.dir.parent == tmp_path / "cache"
    assert str(SIZE) in cache.dir.name


def test_second_build_decodes_nothing(folder, decodes):
    refs = scan(folder)
    first = PixelCache(SIZE).build(refs, progress=False)
    assert len(decodes) == len(refs)

    decodes.clear()
    second = PixelCache(SIZE).build(refs, progress=False)  # a new process would open the store like this
    assert decodes == []
    np.testing.assert_array_equal(second.rows, first.rows)
    np.testing.assert_array_equal(second.pixels(range(len(refs))), first.pixels(range(len(refs))))


def test_identical_content_in_two_files_shares_one_row(folder):
    shutil.copy(folder / "cat.0.jpg", folder / "cat.17.jpg")
    cache = PixelCache(SIZE)
    cached = cache.build(scan(folder), progress=False)

    names = [r.name for r in cached.refs]
    original, copy = names.index("cat.0.jpg"), names.index("cat.17.jpg")
    assert cached.rows[original] == cached.rows[copy]
    assert cached.keys[original] == cached.keys[copy]
    assert cache.store_path.stat().st_size == 8 * cache.row_bytes  # 9 files, 8 distinct images


def test_broken_files_are_reported_with_a_reason_skipped_and_remembered(folder, decodes):
    (folder / "cat.50.jpg").write_bytes(b"<html>404 not found</html>")
    good = (folder / "dog.0.png").read_bytes()
    (folder / "dog.51.png").write_bytes(good[: len(good) // 2])
    (folder / "dog.52.jpg").write_bytes(b"")

    refs = scan(folder)
    cached = PixelCache(SIZE).build(refs, progress=False)
    reasons = {item["path"].rsplit("/", 1)[-1]: item["reason"] for item in cached.unusable}
    assert reasons.keys() == {"cat.50.jpg", "dog.51.png", "dog.52.jpg"}
    assert reasons["cat.50.jpg"] == "not an image (HTML/XML text)"
    assert "truncated" in reasons["dog.51.png"] or "corrupt" in reasons["dog.51.png"]
    assert reasons["dog.52.jpg"] == "empty file (0 bytes)"
    assert len(cached) == 8 and not {r.name for r in cached.refs} & reasons.keys()

    decodes.clear()
    again = PixelCache(SIZE).build(refs, progress=False)
    assert decodes == []  # broken files are not decoded a second time either
    assert again.unusable == cached.unusable


def test_torn_tail_is_cut_back_on_the_next_build(folder, make_image):
    cache = PixelCache(SIZE)
    cache.build(scan(folder), progress=False)
    with open(cache.store_path, "ab") as store:
        store.write(b"\xff" * (cache.row_bytes // 3))  # a build killed mid-row

    make_image(folder / "cat.9.jpg", color=(10, 200, 10), seed=99)
    refs = scan(folder)
    cached = PixelCache(SIZE).build(refs, progress=False)

    assert cache.store_path.stat().st_size == 9 * cache.row_bytes
    expected = np.stack([read_pixels(r.source, SIZE) for r in refs])
    np.testing.assert_array_equal(cached.pixels(range(len(refs))), expected)


def test_an_empty_listing_builds_an_empty_set():
    cached = PixelCache(SIZE).build([], progress=False)
    assert len(cached) == 0 and cached.unusable == []
