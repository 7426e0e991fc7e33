"""Finding a data set's images, whatever its layout, and checking that they decode.

Listing reads names only (no image is opened), so `scan` is cheap even for 25,000 files; broken
files are found by `check`, which decodes every image through `asirra.images`. Archives are read
in place: a zip member is addressed as "<archive.zip>::<member name>".

Layouts, as `detect_layout` names them (each may also sit inside a .zip, then prefixed "zip:"):
  kaggle-flat    cat.N.jpg / dog.N.jpg in one folder
  unlabelled     any other image files (e.g. Kaggle's test1/N.jpg)
  class-folders  Cat/, Dog/, cats/, dogs/ (any case) holding the images; or, for any other task, one
                 folder per class with any names (0/ ... 9/, airplane/ ship/ ...), as Keras's
                 image_dataset_from_directory and fastai's from_folder read them
  petimages      Microsoft's PetImages/Cat, PetImages/Dog (non-image files such as Thumbs.db ignored)
  kaggle-root    train/ (labelled) beside test1/ (unlabelled)

Labels are indices into `class_names(path)`: ("cat", "dog") for every cat/dog layout (CAT = 0,
DOG = 1), else the class folders' names sorted as spelled on disk (Keras's order). Class folders
may sit inside wrapper folders (digits.zip holding digits/0/...); images may nest below a class
folder, which names them all.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import statistics
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple, Sequence

from PIL import Image
from tqdm import tqdm

from asirra.download import archive_path
from asirra.errors import DataError, DataNotFound
from asirra.images import MAX_FILE_BYTES, UnusableImage, load_image, read_file
from asirra.labels import CAT, CLASS_NAMES, DOG

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
CLASS_FOLDERS = {"cat": CAT, "cats": CAT, "dog": DOG, "dogs": DOG}
TRAIN_FOLDERS = ("train",)
TEST_FOLDERS = ("test1", "test")
MEMBER_SEPARATOR = "::"
# Where the data is looked for when neither --data nor $ASIRRA_DATA says (relative to the cwd).
DEFAULT_ROOTS = (Path("data/dogs-vs-cats"), archive_path(), Path("../shared/datasets/dogs-vs-cats"))

_KAGGLE_NAME = re.compile(r"(cat|dog)\.(\d+)\.\w+", re.IGNORECASE)


@dataclass(frozen=True)
class ImageRef:
    """One image of a data set: where its bytes are, its label, its Kaggle id."""

    source: str  # a filesystem path, or "<archive.zip>::<member name>"
    label: int | None  # index into the data set's class_names (CAT, DOG for cat/dog), or None when unlabelled
    id: str
    # The path below the class root for any-name class folders ("airplane/x.png"); not part of identity.
    display: str | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """Short display name: the file name, with its class folder (and PetImages/) when it has one."""
        if self.display is not None:
            return self.display
        archive, member = _split_source(self.source)
        parts = PurePosixPath(member).parts if archive else Path(member).parts
        keep = 1
        if len(parts) > 1 and parts[-2].lower() in CLASS_FOLDERS:
            keep = 3 if len(parts) > 2 and parts[-3].lower() == "petimages" else 2
        return "/".join(parts[-keep:])

    def read_bytes(self) -> bytes:
        """The file's bytes (a zip member is read in place); UnusableImage naming it if unreadable."""
        archive, member = _split_source(self.source)
        try:
            return read_file(member) if archive is None else _read_member(archive, member)
        except UnusableImage as exc:
            raise UnusableImage(exc.reason, self.name) from None

    def load(self, draft_size: int | None = None) -> Image.Image:
        """`asirra.images.load_image` on this image; UnusableImage carries this image's name."""
        try:
            return load_image(self.read_bytes(), draft_size)
        except UnusableImage as exc:
            raise UnusableImage(exc.reason, self.name) from None


# ---- locating and listing --------------------------------------------------------------------


def resolve_data_root(explicit: str | os.PathLike | None = None) -> Path:
    """--data if given, else $ASIRRA_DATA, else the first of DEFAULT_ROOTS that exists."""
    how_to_get = "run `asirra download`, or pass --data PATH, or set $ASIRRA_DATA"
    if explicit is not None or os.environ.get("ASIRRA_DATA"):
        path = Path(explicit if explicit is not None else os.environ["ASIRRA_DATA"])
        if not path.exists():
            origin = "" if explicit is not None else " (from $ASIRRA_DATA)"
            raise DataNotFound(f"no data at {path}{origin}; {how_to_get}")
        return path
    for path in DEFAULT_ROOTS:
        if path.exists():
            return path
    looked = ", ".join(str(p) for p in DEFAULT_ROOTS)
    raise DataNotFound(f"no data found (looked for {looked}); {how_to_get}")


def detect_layout(path: str | os.PathLike) -> str:
    """The layout name (see the module docstring), "zip:"-prefixed for an archive."""
    survey = _survey(Path(path))
    return ("zip:" if survey.archive else "") + survey.layout


def class_names(path: str | os.PathLike) -> tuple[str, ...]:
    """The data set's classes in label order: ImageRef.label indexes this tuple.

    ("cat", "dog") for the cat/dog layouts (kaggle-flat, petimages, kaggle-root, Cat/ and Dog/
    folders in any of their spellings); the sorted folder names for any other class folders;
    () for unlabelled images. An empty class folder is a DataError.
    """
    survey = _survey(Path(path))
    _refuse_empty_classes(Path(path), survey)
    if survey.classes is not None:
        return survey.classes
    return () if survey.layout == "unlabelled" else CLASS_NAMES


def scan(path: str | os.PathLike, labelled: bool | None = None) -> list[ImageRef]:
    """Every image under `path` (folder or .zip), sorted by label then numeric id; nothing is decoded.

    labelled=None takes labels where the layout has them; True keeps only labelled images and
    fails if there are none; False drops labels. For a Kaggle root, None and True mean its
    train/ part and False its test1/ part.
    """
    path = Path(path)
    return _select(path, _survey(path), labelled=labelled)


def scan_all(path: str | os.PathLike) -> list[ImageRef]:
    """Like scan(path), but a Kaggle root gives both parts: its train/ and its test1/ images."""
    path = Path(path)
    survey = _survey(path)
    if survey.layout == "kaggle-root":
        return _select(path, survey, labelled=None) + _select(path, survey, labelled=False)
    return _select(path, survey, labelled=None)


def _select(path: Path, survey: "_Survey", labelled: bool | None) -> list[ImageRef]:
    """scan's choice of images and labels, on an existing listing."""
    names = survey.names
    if survey.layout == "kaggle-root":
        names = [n for n in names if _folder(n) in (TEST_FOLDERS if labelled is False else TRAIN_FOLDERS)]
    if labelled is not False:
        _refuse_empty_classes(path, survey)
    refs = [_make_ref(path, survey, name, keep_label=labelled is not False) for name in names]
    if labelled:
        refs = [ref for ref in refs if ref.label is not None]
        if not refs:
            raise DataError(
                f"no labelled images in {path}: expected cat.N.jpg/dog.N.jpg names or one folder per class"
            )
    return sorted(refs, key=_sort_key)


def _refuse_empty_classes(path: Path, survey: "_Survey") -> None:
    if survey.empty:
        folders = ", ".join(f"{name}/" for name in survey.empty)
        raise DataError(f"class folder{'s' if len(survey.empty) > 1 else ''} {folders} in {path} "
                        f"hold{'' if len(survey.empty) > 1 else 's'} no images: add images or remove "
                        f"{'them' if len(survey.empty) > 1 else 'it'}")


def labelled_split_dirs(root: str | os.PathLike) -> tuple[Path | None, Path | None]:
    """(labelled part, unlabelled part) of a data root, each scannable on its own.

    A Kaggle root gives (its train/, its test1/); any other layout is wholly one or the other.
    """
    root = Path(root)
    survey = _survey(root)
    archive, names, layout = survey.archive, survey.names, survey.layout
    if layout == "kaggle-root":
        if archive:
            raise DataError(f"{root} holds train/ and test1/ inside one archive; unpack it to use the parts separately")
        train = next(n for n in names if _folder(n) in TRAIN_FOLDERS)
        test = next(n for n in names if _folder(n) in TEST_FOLDERS)
        return root / PurePosixPath(train).parent, root / PurePosixPath(test).parent
    return (None, root) if layout == "unlabelled" else (root, None)


def labelled_root(explicit: str | os.PathLike | None = None) -> Path:
    """The labelled images the --data lookup finds: a Kaggle root's train/, else the root itself."""
    root = resolve_data_root(explicit)
    return labelled_split_dirs(root)[0] or root


class _Survey(NamedTuple):
    archive: str | None  # the .zip, or None for a folder
    names: list[str]  # '/'-separated names of the image files under the path
    layout: str
    class_root: str = ""  # any-name class folders: the folder holding them ("" = the path itself), with "/"
    classes: tuple[str, ...] | None = None  # class folders found below class_root: the class names, in label order
    empty: tuple[str, ...] = ()  # class folders holding no image
    label_of: dict | None = None  # class folder name -> label


def _survey(path: Path) -> _Survey:
    """What is under `path`: its image files, their layout, and for any-name class folders the classes."""
    if path.is_dir():
        names, folders = _walk(path)
        archive = None
    elif path.is_file() and path.suffix.lower() == ".zip":
        infos = _open_archive(path).infolist()
        names = [info.filename for info in infos if not info.is_dir()]
        # Folders are explicit entries (an empty class folder has only that) and every member's parents.
        entries = [info.filename.rstrip("/") for info in infos]
        folders = {"/".join(e.split("/")[:i]) for e in entries for i in range(1, e.count("/") + 1)}
        folders |= {info.filename.rstrip("/") for info in infos if info.is_dir()}
        folders = {f for f in folders if f and not any(map(_hidden, f.split("/")))}
        archive = str(path)
    elif path.exists():
        raise DataError(f"{path} is neither a folder nor a .zip archive")
    else:
        raise DataError(f"no such file or folder: {path}")
    names = [name for name in names if _is_image_name(name)]
    if not names:
        raise DataError(f"no images in {path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    layout = _layout(names)
    if layout != "unlabelled":
        return _Survey(archive, names, layout)
    # Checked before the looser cat/dog rule below, so a task whose classes include cat/ and dog/
    # (CIFAR-10's airplane/ ... cat/ dog/ ... truck/) keeps all its classes.
    found = _any_class_folders(archive, names, folders)
    if found is None and any(_folder(name) in CLASS_FOLDERS for name in names):
        return _Survey(archive, names, "class-folders")  # Cat/ and Dog/ beside loose unlabelled images
    return found or _Survey(archive, names, "unlabelled")


def _any_class_folders(archive: str | None, names: list[str], folders: set[str]) -> _Survey | None:
    """Class folders with any names: below any single wrapper folders, two or more folders and no
    loose images beside them; None when the images are not laid out so."""
    root = ""
    while True:
        loose = any("/" not in n[len(root):] for n in names if n.startswith(root))
        children = sorted({f[len(root):] for f in folders if f.startswith(root) and "/" not in f[len(root):]})
        if loose or not children:
            return None
        if len(children) >= 2:
            break
        root += children[0] + "/"  # a wrapper folder (digits.zip holding digits/): look inside it
    counts = dict.fromkeys(children, 0)
    for name in names:
        counts[name[len(root):].split("/", 1)[0]] += 1
    empty = tuple(c for c, n in counts.items() if n == 0)
    if all(c.lower() in CLASS_FOLDERS for c in children):  # cat/ and dog/ holding subfolders: still cat/dog
        return _Survey(archive, names, "class-folders", root, CLASS_NAMES, empty,
                       {c: CLASS_FOLDERS[c.lower()] for c in children})
    return _Survey(archive, names, "class-folders", root, tuple(children), empty,
                   {c: i for i, c in enumerate(children)})


def _walk(root: Path) -> tuple[list[str], set[str]]:
    """The files and the folders under `root`, '/'-separated and relative; hidden ones left out."""
    names, folders = [], set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [name for name in subfolders if not _hidden(name)]  # prune: never descend into them
        relative = Path(folder).relative_to(root).as_posix()
        prefix = "" if relative == "." else f"{relative}/"
        names += [prefix + file for file in files]
        folders.update(prefix + sub for sub in subfolders)
    return names, folders


def _hidden(part: str) -> bool:
    # Hidden files and macOS's __MACOSX/._x.jpg resource forks carry image suffixes but no image.
    return part.startswith(".") or part == "__MACOSX"


def _is_image_name(name: str) -> bool:
    parts = name.split("/")
    return posixpath.splitext(parts[-1])[1].lower() in IMAGE_SUFFIXES and not any(map(_hidden, parts))


def _layout(names: list[str]) -> str:
    # Names are '/'-separated strings and handled as such: pathlib is 10x slower over 25,000 of them.
    folders = [name.split("/")[:-1] for name in names]
    if any(len(f) >= 2 and f[-1].lower() in CLASS_FOLDERS and f[-2].lower() == "petimages" for f in folders):
        return "petimages"
    if all(f and f[-1].lower() in CLASS_FOLDERS for f in folders):  # every image in a Cat/ or Dog/ folder
        return "class-folders"
    parents = {_folder(name) for name in names}
    if parents & set(TRAIN_FOLDERS) and parents & set(TEST_FOLDERS):
        return "kaggle-root"
    if any(_KAGGLE_NAME.fullmatch(posixpath.basename(name)) for name in names):
        return "kaggle-flat"
    return "unlabelled"


def _folder(name: str) -> str:
    """The lower-cased name of the folder directly holding `name` ("" at the top)."""
    return posixpath.basename(posixpath.dirname(name)).lower()


def _make_ref(root: Path, survey: _Survey, name: str, keep_label: bool) -> ImageRef:
    archive = survey.archive
    source = f"{archive}{MEMBER_SEPARATOR}{name}" if archive else os.path.join(root, name)
    if survey.label_of is not None:  # class folders below a class root: the folder below it is the class
        below = name[len(survey.class_root):]
        label = survey.label_of[below.split("/", 1)[0]] if keep_label else None
        return ImageRef(source=source, label=label, id=posixpath.splitext(posixpath.basename(name))[0], display=below)
    label, image_id = _label_and_id(name)
    return ImageRef(source=source, label=label if keep_label else None, id=image_id)


def _label_and_id(name: str) -> tuple[int | None, str]:
    file = posixpath.basename(name)
    kaggle = _KAGGLE_NAME.fullmatch(file)
    if kaggle:
        return (CAT if kaggle[1].lower() == "cat" else DOG), kaggle[2]
    return CLASS_FOLDERS.get(_folder(name)), posixpath.splitext(file)[0]


def _sort_key(ref: ImageRef) -> tuple:
    label = sys.maxsize if ref.label is None else ref.label  # unlabelled images last
    numeric = int(ref.id) if ref.id.isdigit() else sys.maxsize
    return label, numeric, ref.id, ref.source


# ---- reading zip members in place ------------------------------------------------------------


def _split_source(source: str) -> tuple[str | None, str]:
    """("a.zip", "member") for "a.zip::member"; (None, source) for a plain path."""
    archive, sep, member = source.partition(MEMBER_SEPARATOR)
    if sep and archive.lower().endswith(".zip"):
        return archive, member
    return None, source


class _ArchiveHandles(threading.local):
    """Open ZipFiles, one per thread (a ZipFile serialises reads through one file position) and
    per process (a handle inherited through fork shares its file offset with the parent)."""

    def __init__(self):
        self.pid = os.getpid()
        self.files: dict[str, zipfile.ZipFile] = {}

    def get(self, archive: str) -> zipfile.ZipFile:
        if self.pid != os.getpid():
            self.pid, self.files = os.getpid(), {}
        if archive not in self.files:
            self.files[archive] = zipfile.ZipFile(archive)
        return self.files[archive]


_archives = _ArchiveHandles()


def _open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return _archives.get(str(path))
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"cannot read the archive {path} ({exc})") from None


def _read_member(archive: str, member: str) -> bytes:
    try:
        handle = _archives.get(archive)
        info = handle.getinfo(member)
        if info.file_size > MAX_FILE_BYTES:  # checked before inflating: a zip bomb stays compressed
            raise UnusableImage(f"file too large ({info.file_size:,} bytes)")
        return handle.read(info)
    except KeyError:
        raise UnusableImage("not in the archive") from None
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError) as exc:
        # CRC mismatch, unsupported compression, encryption, or the archive itself unreadable
        raise UnusableImage(f"cannot read from the archive ({exc})") from None


class LabelMismatch(DataError):
    """Labelled images of a class the model was not trained on."""


def align_labels(refs: Sequence, data_classes: Sequence[str], model_classes: Sequence[str],
                 strict: bool = True) -> list:
    """Refs relabelled from the data set's class order (asirra.data.class_names) to the model's, by name.

    A data set may hold a subset of the model's classes (its labels then index a shorter tuple).
    A class the model does not know cannot be scored: a clear error, or with strict=False no label.
    """
    from dataclasses import replace

    data_classes, model_classes = tuple(data_classes), tuple(model_classes)
    if data_classes == model_classes:
        return list(refs)
    unknown = [c for c in data_classes if c not in model_classes]
    if unknown and strict:
        raise LabelMismatch(f"the data's classes {', '.join(unknown[:5])} are not among the model's "
                            f"({', '.join(model_classes[:10])}{', ...' if len(model_classes) > 10 else ''})")
    index = [model_classes.index(c) if c in model_classes else None for c in data_classes]
    return [ref if ref.label is None else replace(ref, label=index[ref.label]) for ref in refs]


# ---- checking ---------------------------------------------------------------------------------


@dataclass
class CheckReport:
    """What `check` found: counts, the images that cannot be used and why, image sizes."""

    n_images: int
    per_class: dict[str, int]  # listed images per class, in label order ("cat", "dog"), then "unlabelled"
    unusable: list[dict[str, str]]  # {"path": source, "reason": short phrase}
    width: dict[str, float]  # min / median / max over usable images (empty if none)
    height: dict[str, float]
    path: str | None = None  # the folder or archive checked, and its layout, when check_folder checked one
    layout: str | None = None

    @property
    def n_usable(self) -> int:
        return self.n_images - len(self.unusable)

    def to_json(self) -> dict:
        where = {"path": self.path, "layout": self.layout} if self.path is not None else {}
        return {
            **where,
            "n_images": self.n_images,
            "n_usable": self.n_usable,
            "per_class": self.per_class,
            "unusable": self.unusable,
            "size": {"width": self.width, "height": self.height},
        }

    def to_text(self) -> str:
        classes = ", ".join(f"{count} {name}" for name, count in self.per_class.items() if count)
        lines = [f"{self.path} ({self.layout})"] if self.path is not None else []
        lines += [f"{self.n_images} images ({classes}); {self.n_usable} usable, {len(self.unusable)} unusable"]
        for axis, stats in (("width", self.width), ("height", self.height)):
            if stats:
                lines.append(f"{axis:>6}: min {stats['min']:g}  median {stats['median']:g}  max {stats['max']:g}")
        lines += [f"unusable: {item['path']}: {item['reason']}" for item in self.unusable]
        return "\n".join(lines)


def check(refs: Sequence[ImageRef], workers: int = 2, progress: bool = True,
          classes: Sequence[str] = CLASS_NAMES) -> CheckReport:
    """Decode every image (in `workers` threads) and report counts, sizes and unusable files.

    `classes` names the labels (the data set's `class_names`). An unusable file is recorded with
    its reason and the run goes on; nothing is raised for one.
    """
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        outcomes = list(tqdm(pool.map(_decoded_size, refs), total=len(refs), desc="checking images",
                             unit="img", file=sys.stderr, disable=not progress))
    labels = {ref.label for ref in refs if ref.label is not None}
    if labels and max(labels) >= len(classes):
        raise DataError(f"labels go up to {max(labels)} but {len(classes)} class names were given "
                        f"({', '.join(classes)}); pass the data set's class_names(path)")
    per_class = dict.fromkeys((*classes, "unlabelled"), 0)
    for ref in refs:
        per_class["unlabelled" if ref.label is None else classes[ref.label]] += 1
    sizes = [outcome for outcome in outcomes if isinstance(outcome, tuple)]
    unusable = [
        {"path": ref.source, "reason": outcome} for ref, outcome in zip(refs, outcomes) if isinstance(outcome, str)
    ]
    return CheckReport(
        n_images=len(refs),
        per_class=per_class,
        unusable=unusable,
        width=_spread([w for w, _ in sizes]),
        height=_spread([h for _, h in sizes]),
    )


def check_folder(path: str | os.PathLike | None = None, workers: int = 2, progress: bool = True) -> CheckReport:
    """`check` on every image under `path` (the --data lookup when None), labelled or not, with the
    folder and its layout recorded: what `asirra data check` prints and `asirra.check_data` returns."""
    root = resolve_data_root(path)
    classes = class_names(root) or CLASS_NAMES  # unlabelled: counted as before, cat 0, dog 0
    report = check(scan_all(root), workers=workers, progress=progress, classes=classes)
    report.path, report.layout = str(root), detect_layout(root)
    return report


def show_folder(path: str | os.PathLike | None, out: str | os.PathLike, n: int = 16, seed: int = 0) -> Path:
    """`show_grid` of `n` random images under `path` (the --data lookup when None), titled with their class."""
    root = resolve_data_root(path)
    return show_grid(scan(root), out, n=n, seed=seed, classes=class_names(root) or CLASS_NAMES)


def _decoded_size(ref: ImageRef) -> tuple[int, int] | str:
    """(width, height) of the upright decoded image, or why it cannot be decoded."""
    try:
        return ref.load().size
    except UnusableImage as exc:
        return exc.reason


def _spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


# ---- looking ----------------------------------------------------------------------------------


def show_grid(
    refs: Sequence[ImageRef],
    out: str | os.PathLike,
    n: int = 16,
    seed: int = 0,
    titles: Sequence[str] | None = None,
    classes: Sequence[str] = CLASS_NAMES,
) -> Path:
    """A PNG grid of `n` images drawn at random (by `seed`) from `refs`, each titled class + id.

    `titles`, if given, replaces the default titles and runs parallel to `refs`; `classes` names the labels.
    """
    import numpy as np

    from asirra.plots import plot_image_grid

    if not refs:
        raise DataError("no images to show")
    if titles is not None and len(titles) != len(refs):
        raise DataError(f"got {len(titles)} titles for {len(refs)} images")
    picked = sorted(random.Random(seed).sample(range(len(refs)), min(n, len(refs))))
    images, captions = [], []
    for index in picked:
        caption = titles[index] if titles is not None else _default_title(refs[index], classes)
        try:
            images.append(refs[index].load(draft_size=160))
        except UnusableImage as exc:
            images.append(np.full((8, 8, 3), 200, dtype=np.uint8))  # a grey tile where the picture would be
            caption = f"{caption}\nunusable: {exc.reason}"
        captions.append(caption)
    return plot_image_grid(images, captions, Path(out), ncols=max(1, round(len(picked) ** 0.5)))


def _default_title(ref: ImageRef, classes: Sequence[str]) -> str:
    return f"{'unlabelled' if ref.label is None else classes[ref.label]} {ref.id}"
