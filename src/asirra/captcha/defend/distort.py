"""The classic CAPTCHA baseline: random distortions of the kinds text and image CAPTCHAs long used.

Not an attack on any model and not bounded in L-infinity (the manifest records the measured
L-infinity instead): the same random kind of damage for every image, at strengths chosen so the
animal stays easy to see. No human study is possible here; "people still read it" is a judgement
from looking at compare.html, and the manifest's SSIM / PSNR are the measured side of it.

kinds and what --strength means (default in brackets):
  noise     Gaussian noise, standard deviation in 0..255 units  [12]
  blur      Gaussian blur, sigma in pixels of the original        [1.5]
  warp      elastic warp, largest displacement in pixels          [6]
  contrast  contrast kept around the mean, 1 = unchanged          [0.5]
  clutter   fraction of the image covered by random strokes       [0.1]

Each image's randomness is seeded by --seed and its content, so a resumed run redraws the same.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from asirra.captcha.defend.derived_pool import DerivedPoolSummary, derive_pool
from asirra.errors import ConfigError

DEFAULT_STRENGTH = {"noise": 12.0, "blur": 1.5, "warp": 6.0, "contrast": 0.5, "clutter": 0.1}
LIMITS = {"noise": (0, 128), "blur": (0, 20), "warp": (0, 60), "contrast": (0.05, 1), "clutter": (0, 0.6)}


class DistortError(ConfigError):
    """Settings distortion cannot run with; the message is one line."""


@dataclass(frozen=True)
class DistortConfig:
    kind: str
    strength: float | None = None  # None: DEFAULT_STRENGTH[kind]
    seed: int = 0

    def __post_init__(self):
        if self.kind not in DEFAULT_STRENGTH:
            raise DistortError(f"unknown kind {self.kind!r}; choose one of {', '.join(DEFAULT_STRENGTH)}")
        low, high = LIMITS[self.kind]
        if not low <= self.value <= high:
            raise DistortError(f"--strength for {self.kind} must be between {low:g} and {high:g}, got {self.value:g}")

    @property
    def value(self) -> float:
        return DEFAULT_STRENGTH[self.kind] if self.strength is None else float(self.strength)


def distort(image: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) -> the same size, distorted."""
    return {"noise": _noise, "blur": _blur, "warp": _warp, "contrast": _contrast, "clutter": _clutter}[kind](
        image.astype(np.float64), strength, rng)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _noise(x, sigma, rng):
    return _to_uint8(x + rng.normal(0.0, sigma, x.shape))


def _blur(x, sigma, rng):
    return _to_uint8(ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0)))


def _warp(x, amplitude, rng):
    """Elastic deformation (Simard et al. 2003): a smooth random displacement field, scaled so its
    largest displacement is `amplitude` pixels."""
    height, width = x.shape[:2]
    smooth = max(height, width) / 12  # a few bumps across the frame: wavy, not shredded
    fields = [ndimage.gaussian_filter(rng.uniform(-1, 1, (height, width)), smooth) for _ in range(2)]
    peak = max(float(np.abs(f).max()) for f in fields) or 1.0
    dy, dx = (f * (amplitude / peak) for f in fields)
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    coords = [rows + dy, cols + dx]
    return _to_uint8(np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="reflect")
                               for c in range(3)], axis=-1))


def _contrast(x, keep, rng):
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8(mean + keep * (x - mean))


def _clutter(x, coverage, rng):
    """Random strokes (lines and rings in random colours) until `coverage` of the pixels is hidden."""
    image = Image.fromarray(_to_uint8(x))
    mask = Image.new("L", image.size, 0)
    draw, mask_draw = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    width, height = image.size
    stroke = max(1, round(min(width, height) / 40))
    area = width * height
    for _ in range(10_000):  # a bound: each stroke adds coverage, so this ends far sooner
        if np.count_nonzero(np.asarray(mask)) >= coverage * area:
            break
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.5:
            box = [x0, y0, x0 + rng.uniform(-0.5, 0.5) * width, y0 + rng.uniform(-0.5, 0.5) * height]
            for canvas, fill in ((draw, colour), (mask_draw, 255)):
                canvas.line(box, fill=fill, width=stroke)
        else:
            radius = rng.uniform(0.03, 0.12) * min(width, height)
            box = [x0 - radius, y0 - radius, x0 + radius, y0 + radius]
            for canvas, fill in ((draw, colour), (mask_draw, 255)):
                canvas.ellipse(box, outline=fill, width=stroke)
    return np.asarray(image, dtype=np.uint8)


class Distorter:
    """derive_pool's Maker for one DistortConfig."""

    def __init__(self, config: DistortConfig):
        self.config = config

    def __call__(self, original: np.ndarray, key: str, ref) -> tuple[np.ndarray, dict]:
        rng = np.random.default_rng([self.config.seed, int(key[:15], 16)])
        changed = distort(original, self.config.kind, self.config.value, rng)
        return changed, {"kind": self.config.kind, "strength": self.config.value, "seed": self.config.seed}


def distort_pool(refs: Sequence, out: str | os.PathLike, config: DistortConfig, progress: bool = True,
                 **derive_options) -> DerivedPoolSummary:
    """Write the distorted pool of the labelled `refs` in `out` (resumable; see derived_pool)."""
    settings = {"maker": "distort", **asdict(config), "strength": config.value}
    return derive_pool(refs, out, settings, Distorter(config), progress=progress,
                       desc=f"distorting ({config.kind} {config.value:g})", **derive_options)
