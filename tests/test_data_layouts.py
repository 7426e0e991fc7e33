"""asirra.data finds images and labels in every supported layout, in folders and in zips read in place."""

from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import write_image

from asirra import data
from asirra.data import ImageRef
from asirra.errors import DataError, DataNotFound
from asirra.images import UnusableImage
from asirra.labels import CAT, DOG

JUNK = b"not an image, and not named like one"

# layout -> (files to create: relative name -> "image" or raw bytes, expected (label, id, name) in scan order)
LAYOUTS = {
    "kaggle-flat": (
        {"cat.10.jpg": "image", "cat.2.jpg": "image", "dog.1.jpg": "image", "notes.txt": JUNK},
        [(CAT, "2", "cat.2.jpg"), (CAT, "10", "cat.10.jpg"), (DOG, "1", "dog.1.jpg")],
    ),
    "unlabelled": (
        {"10.jpg": "image", "2.jpg": "image", "1.png": "image"},
        [(None, "1", "1.png"), (None, "2", "2.jpg"), (None, "10", "10.jpg")],
    ),
    "class-folders": (
        {"Cat/x.jpg": "image", "cats/3.jpg": "image", "DOGS/1.jpeg": "image", "dog/y.JPG": "image"},
        [(CAT, "3", "cats/3.jpg"), (CAT, "x", "Cat/x.jpg"), (DOG, "1", "DOGS/1.jpeg"), (DOG, "y", "dog/y.JPG")],
    ),
    "petimages": (
        {
            "PetImages/Cat/1.jpg": "image",
            "PetImages/Cat/0.jpg": "image",
            "PetImages/Cat/Thumbs.db": JUNK,
            "PetImages/Dog/0.jpg": "image",
            "PetImages/Dog/Thumbs.db": JUNK,
            "readme[1].txt": JUNK,
            "CDLA-Permissive-2.0.pdf": JUNK,
        },
        [(CAT, "0", "PetImages/Cat/0.jpg"), (CAT, "1", "PetImages/Cat/1.jpg"), (DOG, "0", "PetImages/Dog/0.jpg")],
    ),
    "kaggle-root": (
        {"train/dog.0.jpg": "image", "train/cat.5.jpg": "image", "test1/1.jpg": "image", "sample.csv": JUNK},
        [(CAT, "5", "cat.5.jpg"), (DOG, "0", "dog.0.jpg")],
    ),
}


def _build(root: Path, files: dict) -> Path:
    for seed, (name, content) in enumerate(sorted(files.items())):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "image":
            write_image(path, format="PNG" if name.endswith(".png") else "JPEG", seed=seed)
        else:
            path.write_bytes(content)
    return root


def _zip(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as out:
        for path in sorted(folder.rglob("*")):
            out.write(path, path.relative_to(folder).as_posix())
    return archive


@pytest.fixture(params=["folder", "zip"])
def packaging(request):
    return request.param


def _make(layout: str, packaging: str, tmp_path: Path) -> Path:
    folder = _build(tmp_path / layout, LAYOUTS[layout][0])
    return folder if packaging == "folder" else _zip(folder, tmp_path / f"{layout}.zip")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_is_detected(layout, packaging, tmp_path):
    expected = layout if packaging == "folder" else f"zip:{layout}"
    assert data.detect_layout(_make(layout, packaging, tmp_path)) == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scan_finds_labels_ids_and_names_in_order(layout, packaging, tmp_path):
    refs = data.scan(_make(layout, packaging, tmp_path))
    assert [(ref.label, ref.id, ref.name) for ref in refs] == LAYOUTS[layout][1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_scanned_bytes_are_the_files_bytes(layout, packaging, tmp_path):
    source = _make(layout, packaging, tmp_path)
    folder = tmp_path / layout
    for ref in data.scan(source):
        member = ref.source.partition("::")[2] if packaging == "zip" else Path(ref.source).relative_to(folder)
        assert ref.read_bytes() == (folder / member).read_bytes()
        assert ref.load().mode == "RGB"


def test_zip_is_read_in_place_without_unpacking(tmp_path):
    (tmp_path / "a").mkdir()
    archive = _make("petimages", "zip", tmp_path / "a")
    before = sorted(p.name for p in archive.parent.iterdir())
    refs = data.scan(archive)
    assert all(ref.source.startswith(f"{archive}::PetImages/") for ref in refs)
    assert data.check(refs, progress=False).n_usable == 3
    assert sorted(p.name for p in archive.parent.iterdir()) == before


def test_kaggle_root_splits_into_labelled_train_and_unlabelled_test(tiny_kaggle_root):
    train = data.scan(tiny_kaggle_root)
    test = data.scan(tiny_kaggle_root, labelled=False)
    assert len(train) == 12 and {ref.label for ref in train} == {CAT, DOG}
    assert [ref.id for ref in test] == ["1", "2", "3", "4"] and {ref.label for ref in test} == {None}
    assert data.scan(tiny_kaggle_root, labelled=True) == train
    assert data.scan_all(tiny_kaggle_root) == train + test
    assert data.labelled_split_dirs(tiny_kaggle_root) == (tiny_kaggle_root / "train", tiny_kaggle_root / "test1")


def test_labelled_split_of_a_single_layout_is_all_on_one_side(tiny_kaggle_root):
    train, test = tiny_kaggle_root / "train", tiny_kaggle_root / "test1"
    assert data.labelled_split_dirs(train) == (train, None)
    assert data.labelled_split_dirs(test) == (None, test)


def test_labelled_false_drops_labels(tiny_kaggle_root):
    refs = data.scan(tiny_kaggle_root / "train", labelled=False)
    assert len(refs) == 12 and {ref.label for ref in refs} == {None}


def test_labelled_true_on_unlabelled_images_is_an_error(tiny_kaggle_root):
    with pytest.raises(DataError, match="no labelled images"):
        data.scan(tiny_kaggle_root / "test1", labelled=True)


def test_hidden_files_and_macos_resource_forks_are_ignored(tmp_path):
    folder = _build(tmp_path / "d", {"cat.1.jpg": "image", "__MACOSX/._cat.1.jpg": JUNK, ".cache/cat.2.jpg": "image"})
    assert [ref.name for ref in data.scan(folder)] == ["cat.1.jpg"]
    assert [ref.name for ref in data.scan(_zip(folder, tmp_path / "d.zip"))] == ["cat.1.jpg"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "no images"),
        (lambda p: _build(p, {"readme.txt": JUNK, "Thumbs.db": JUNK}), "no images"),
        (lambda p: p.write_text("hello"), "neither a folder nor a .zip"),
        (lambda p: None, "no such file or folder"),
    ],
    ids=["empty folder", "no image files", "plain file", "missing"],
)
def test_unusable_data_path_is_a_one_line_error(make, message, tmp_path):
    path = tmp_path / "data"
    make(path)
    with pytest.raises(DataError, match=message) as caught:
        data.scan(path)
    assert "\n" not in str(caught.value)


def test_corrupt_archive_is_a_data_error(tmp_path):
    archive = tmp_path / "broken.zip"
    archive.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="cannot read the archive"):
        data.scan(archive)


def test_missing_or_corrupt_zip_member_is_unusable_not_fatal(tmp_path):
    archive = _make("kaggle-flat", "zip", tmp_path)
    missing = ImageRef(f"{archive}::cat.99.jpg", CAT, "99")
    with pytest.raises(UnusableImage, match="not in the archive"):
        missing.read_bytes()
    corrupt = tmp_path / "corrupt.zip"
    payload = archive.read_bytes()
    entropy_coded = data.scan(archive)[0].read_bytes()[-60:-40]  # unique to this image, unlike its headers
    assert payload.count(entropy_coded) == 1
    corrupt.write_bytes(payload.replace(entropy_coded, bytes(20)))  # the stored member's CRC is now wrong
    with pytest.raises(UnusableImage, match="cannot read from the archive"):
        data.scan(corrupt)[0].read_bytes()


def test_oversized_zip_member_is_refused_before_inflating(tmp_path, monkeypatch):
    archive = _make("kaggle-flat", "zip", tmp_path)
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 100)
    with pytest.raises(UnusableImage, match="file too large"):
        data.scan(archive)[0].read_bytes()


def test_zip_members_read_concurrently_from_many_threads_are_correct(tmp_path):
    folder = _build(tmp_path / "many", {f"cat.{i}.jpg": "image" for i in range(40)})
    refs = data.scan(_zip(folder, tmp_path / "many.zip"))
    expected = [(folder / ref.name).read_bytes() for ref in refs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(ImageRef.read_bytes, refs)) == expected


# ---- where the data is looked for --------------------------------------------------------------


def test_explicit_path_wins_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_DATA", str(tmp_path / "env"))
    (tmp_path / "explicit").mkdir()
    assert data.resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_environment_is_used_when_no_path_is_given(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("ASIRRA_DATA", str(tmp_path / "env"))
    assert data.resolve_data_root() == tmp_path / "env"


def test_default_locations_are_tried_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("ASIRRA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "dogs-vs-cats").mkdir(parents=True)
    assert data.resolve_data_root() == Path("data/dogs-vs-cats")


def test_downloaded_archive_is_found_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("ASIRRA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "kagglecatsanddogs_5340.zip").write_bytes(b"")
    assert data.resolve_data_root() == Path("data/kagglecatsanddogs_5340.zip")


def test_no_data_anywhere_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("ASIRRA_DATA", raising=False)
    work = tmp_path / "a" / "b"  # ../shared does not exist from here
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(DataNotFound, match="asirra download"):
        data.resolve_data_root()
    with pytest.raises(DataNotFound, match="asirra download"):
        data.resolve_data_root(tmp_path / "missing")


def test_each_thread_opens_an_archive_once_however_many_members_it_reads(tmp_path, monkeypatch):
    folder = _build(tmp_path / "many", {f"dog.{i}.jpg": "image" for i in range(25)})
    refs = data.scan(_zip(folder, tmp_path / "many.zip"))
    opened = []

    class CountingZipFile(zipfile.ZipFile):
        def __init__(self, *args, **kwargs):
            opened.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(data.zipfile, "ZipFile", CountingZipFile)
    for _ in range(2):
        with ThreadPoolExecutor(1) as pool:  # a new thread each time round
            list(pool.map(ImageRef.read_bytes, refs))
    assert len(opened) == 2
