"""The attacker's counter-moves: image transforms applied to served images before classifying them.

A defender who perturbs images (adversarial noise, random distortions) is answered by a bot that
cleans them first. Each move is one of the filters the literature found to undo perturbations:
JPEG re-compression (Dziugaite et al. 2016), median and Gaussian filtering (Ying et al. 2020),
and down-then-up resizing. `residual` goes the other way: it keeps only the fine detail (the image
minus its 5x5 median, amplified around mid-grey), where an adversarial perturbation that carries
the label lives, for a classifier trained to read it. A pipeline is written as comma-separated steps applied in order,
e.g. "jpeg:75,median:3"; the same spec names the move in reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from asirra.errors import ConfigError
from asirra.images import ImageSource, load_image


class CounterError(ConfigError):
    """A preprocessing spec that cannot be read."""


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Re-compress at `quality`: quantisation drops the fine detail a small perturbation lives in."""
    buffer = BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def median(image: Image.Image, size: int) -> Image.Image:
    """Median over size x size windows: removes isolated outliers (salt and pepper, sparse noise)."""
    return image.filter(ImageFilter.MedianFilter(size))


def blur(image: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` pixels (Pillow's radius is the sigma)."""
    return image.filter(ImageFilter.GaussianBlur(sigma))


def resize(image: Image.Image, factor: float) -> Image.Image:
    """Scale down by `factor`, then back to the original size: keeps the shape, loses the fine detail."""
    width, height = image.size
    small = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.BILINEAR)
    return small.resize((width, height), Image.Resampling.BILINEAR)


RESIDUAL_WINDOW = 5


def residual(image: Image.Image, gain: int) -> Image.Image:
    """128 + gain x (image - its 5x5 median), clipped: the noise layer, the picture mostly gone."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    smooth = np.asarray(image.convert("RGB").filter(ImageFilter.MedianFilter(RESIDUAL_WINDOW)), dtype=np.float32)
    return Image.fromarray(np.clip(128 + gain * (x - smooth), 0, 255).round().astype(np.uint8))


def _integer(text: str) -> int:
    if not text.isdigit():
        raise ValueError
    return int(text)


# kind -> (function, how to read its value, the valid range as words, check)
MOVES: dict[str, tuple[Callable, Callable[[str], float], str, Callable[[float], bool]]] = {
    "jpeg": (jpeg, _integer, "a quality from 1 to 100", lambda q: 1 <= q <= 100),
    "median": (median, _integer, "an odd window size from 3 to 15", lambda k: 3 <= k <= 15 and k % 2 == 1),
    "blur": (blur, float, "a sigma in pixels, above 0 and at most 20", lambda s: 0 < s <= 20),
    "resize": (resize, float, "a scale factor above 0 and below 1", lambda f: 0 < f < 1),
    "residual": (residual, _integer, "a gain from 1 to 32", lambda g: 1 <= g <= 32),
}
_EXAMPLES = {"jpeg": "75", "median": "3", "blur": "1.0", "resize": "0.5", "residual": "8"}
USAGE = "jpeg:QUALITY, median:SIZE, blur:SIGMA, resize:FACTOR, residual:GAIN (comma-separated, applied in order)"


@dataclass(frozen=True)
class Step:
    kind: str
    value: float

    def __call__(self, image: Image.Image) -> Image.Image:
        return MOVES[self.kind][0](image, self.value)

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.value:g}"


@dataclass(frozen=True)
class Pipeline:
    """Steps applied in order to each image; an empty pipeline passes images through untouched."""

    steps: tuple[Step, ...] = ()

    @property
    def spec(self) -> str:
        return ",".join(step.spec for step in self.steps) or "none"

    def __bool__(self) -> bool:
        return bool(self.steps)

    def apply(self, source: ImageSource) -> Image.Image:
        """The source (JPEG bytes, path or PIL image) decoded upright and run through every step."""
        image = load_image(source)
        for step in self.steps:
            image = step(image)
        return image

    def apply_all(self, sources: Sequence[ImageSource]) -> list:
        return [self.apply(source) for source in sources] if self.steps else list(sources)


def parse_step(text: str, whole: str) -> Step:
    kind, sep, value = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in MOVES:
        raise CounterError(f"unknown preprocessing {kind!r} in {whole!r}; choose from {USAGE}")
    _, read, words, valid = MOVES[kind]
    try:
        number = read(value.strip())
    except ValueError:
        number = None
    if not sep or number is None or not valid(number):
        raise CounterError(f"{kind} needs {words}, as in {kind}:{_EXAMPLES[kind]}; got {text.strip()!r}")
    return Step(kind, number)


def parse_preprocess(spec: str | None) -> Pipeline:
    """ "jpeg:75,median:3" -> Pipeline; None, "" or "none" -> the empty pipeline."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return Pipeline()
    parts = spec.split(",")
    if any(not part.strip() for part in parts):
        raise CounterError(f"empty step in preprocessing {spec!r}; expected {USAGE}")
    return Pipeline(tuple(parse_step(part, spec) for part in parts))
