"""A small real multi-class image set that installs with the project: scikit-learn's handwritten digits.

`sklearn.datasets.load_digits` ships 1,797 8x8 greyscale digits (10 classes, 0-16 intensity) inside
the scikit-learn wheel, so no download is needed. Written out as `0/ ... 9/` class folders of PNGs,
it exercises every folder-per-class command on a task that is not cats vs dogs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from asirra.errors import UserError
from asirra.fileio import atomic_path

DIGITS_MAX = 16  # load_digits intensities run 0..16


class SampleDataError(UserError):
    """The sample set cannot be written (a bad size, or an output path that is a file)."""


def write_digits(out: Path, size: int = 32) -> dict[str, int]:
    """Write the digits as out/<digit>/digit-<index>.png, `size` px RGB; returns {class: count}.

    Ink is dark on white, like scanned writing. Upscaling is nearest-neighbour so each of the 64
    original pixels stays a sharp block rather than being smeared into detail that is not there.
    Rerunning overwrites the same files (names are the dataset index), so the output is idempotent.
    """
    from sklearn.datasets import load_digits

    if int(size) != size or size < 8:
        raise SampleDataError(f"size must be a whole number of pixels >= 8, got {size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SampleDataError(f"{out} exists and is not a folder")
    digits = load_digits()
    counts: dict[str, int] = {}
    for index, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        grey = (255 - np.round(pixels * (255 / DIGITS_MAX))).astype(np.uint8)
        image = Image.fromarray(grey).resize((size, size), Image.NEAREST).convert("RGB")
        name = str(int(target))
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"digit-{index:04d}.png") as tmp:
            image.save(tmp, format="PNG")
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: int(item[0])))
