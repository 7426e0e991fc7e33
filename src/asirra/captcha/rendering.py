"""What the service does to a pool photo before a client sees it: the one definition, in PIL and in torch.

Every served copy is re-encoded with a fresh random edge trim, size and JPEG quality (`Jitter`,
drawn by `draw_jitter`), so neither a URL nor a hash of the bytes ties two servings of one photo
together. Three renderings of one jitter, tested against each other (tests/test_rendering.py):
- Pillow (`render_jpeg`, `encode_jitter`): the reference, used by the experiments that mimic the service;
- the service's fast path (`Renderer`): the photo is decoded once into a cache at `base_side` (the
  largest side a served copy can need, `to_base`), and each serving crops it to whole pixels, resizes
  with OpenCV's bilinear (~50 us, 6x Pillow's convolution resize) and encodes with libjpeg-turbo
  through simplejpeg (~90 us, 0.65x Pillow's); Pillow stands in for either when they are missing;
- torch (`served_view`): the defender's hardening needs the gradient, so the same jitter is applied to
  a tensor (crop and resize differentiable, JPEG straight-through) and then squashed to a model's input
  as `asirra.images.preprocess` does.

Imports nothing from the service, so the defend and attack layers use it without FastAPI; torch is
imported only by the torch half, OpenCV and simplejpeg only by a Renderer that uses them.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RenderSettings:
    """The ranges a served copy's jitter is drawn from."""

    image_side: tuple[int, int] = (200, 240)  # longest side of a served image, drawn per serving
    image_quality: tuple[int, int] = (72, 90)  # JPEG quality, drawn per serving
    max_crop: float = 0.06  # fraction trimmed from each edge, drawn per serving


@dataclass(frozen=True)
class Jitter:
    """One serving's draws: the fraction trimmed from each edge, the longest side and the JPEG quality."""

    left: float
    top: float
    right: float
    bottom: float
    side: int
    quality: int


def draw_jitter(rng: random.Random, settings: RenderSettings) -> Jitter:
    """The draws of one serving, in the one order every renderer uses (so a seeded rng replays exactly)."""
    left, top, right, bottom = (rng.uniform(0, settings.max_crop) for _ in range(4))
    side = rng.randint(*settings.image_side)
    quality = rng.randint(*settings.image_quality)
    return Jitter(left, top, right, bottom, side, quality)


# ---- Pillow: what the service sends --------------------------------------------------------


def render_jpeg(image: Image.Image, rng: random.Random, settings: RenderSettings) -> bytes:
    """A fresh JPEG of `image`: random edge trim, size and quality, and no metadata."""
    return encode_jitter(image, draw_jitter(rng, settings))


def encode_jitter(image: Image.Image, jitter: Jitter) -> bytes:
    """`image` trimmed, resized and JPEG-encoded as `jitter` says."""
    width, height = image.size
    box = (jitter.left * width, jitter.top * height, (1 - jitter.right) * width, (1 - jitter.bottom) * height)
    scale = jitter.side / max(box[2] - box[0], box[3] - box[1])
    size = (max(1, round((box[2] - box[0]) * scale)), max(1, round((box[3] - box[1]) * scale)))
    out = io.BytesIO()
    image.resize(size, Image.Resampling.BILINEAR, box=box).save(out, "JPEG", quality=jitter.quality)
    return out.getvalue()


# ---- the service's fast path: a cached base array, cropped, resized and encoded per serving ------------


def base_side(settings: RenderSettings) -> int:
    """The longest side a photo is cached at: a copy trimmed by max_crop on both sides still has the largest
    served side, so no serving upsamples a photo that was larger (smaller photos are cached as they are)."""
    return math.ceil(settings.image_side[1] / (1 - 2 * settings.max_crop))


def to_base(image: Image.Image, settings: RenderSettings) -> np.ndarray:
    """An upright RGB photo as the service caches it: uint8 (H, W, 3), longest side at most `base_side`
    (Pillow's antialiased bilinear, as `encode_jitter` resizes)."""
    side = base_side(settings)
    scale = side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def crop_geometry(height: int, width: int, jitter: Jitter) -> tuple[tuple[slice, slice], tuple[int, int]]:
    """The jitter's trim rounded to whole pixels (as `served_tensor` rounds it), and the served (height, width)."""
    top, left = round(jitter.top * height), round(jitter.left * width)
    rows = slice(top, max(top + 1, height - round(jitter.bottom * height)))
    cols = slice(left, max(left + 1, width - round(jitter.right * width)))
    crop_h, crop_w = rows.stop - rows.start, cols.stop - cols.start
    scale = jitter.side / max(crop_h, crop_w)
    return (rows, cols), (max(1, round(crop_h * scale)), max(1, round(crop_w * scale)))


def _resize_opencv(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    # Bilinear without antialiasing: from the base, a served copy shrinks to >= 0.73x or grows, where it
    # differs from Pillow's antialiased filter far less than the JPEG step does (tests/test_rendering.py).
    return cv2.resize(pixels, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def _resize_pillow(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def _encode_simplejpeg(pixels: np.ndarray, quality: int) -> bytes:
    import simplejpeg

    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB",
                                  colorsubsampling="420")  # as Pillow does below quality 95; JFIF header only


def _encode_pillow(pixels: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


RESIZERS: dict[str, Callable[[np.ndarray, tuple[int, int]], np.ndarray]] = {
    "opencv": _resize_opencv, "pillow": _resize_pillow}
ENCODERS: dict[str, Callable[[np.ndarray, int], bytes]] = {"simplejpeg": _encode_simplejpeg, "pillow": _encode_pillow}
MODULES = {"opencv": "cv2", "simplejpeg": "simplejpeg", "pillow": "PIL"}


def available(name: str) -> bool:
    """Whether the library behind a resizer or encoder imports here."""
    import importlib.util

    return importlib.util.find_spec(MODULES[name]) is not None


@dataclass(frozen=True)
class Renderer:
    """A served copy of a cached base array: trim, resize and JPEG as one jitter says."""

    resizer: str = "pillow"
    encoder: str = "pillow"

    @classmethod
    def fastest(cls, resizer: str = "auto", encoder: str = "auto") -> "Renderer":
        """OpenCV and simplejpeg where they import ("auto"), else Pillow; a named one must import."""
        def pick(name: str, choices: dict, fast: str) -> str:
            if name == "auto":
                return fast if available(fast) else "pillow"
            if name not in choices:
                raise ValueError(f"unknown renderer part {name!r}; choose auto, {', '.join(choices)}")
            if not available(name):
                raise ValueError(f"{name} is not installed (pip install 'asirra[serve]')")
            return name

        renderer = cls(pick(resizer, RESIZERS, "opencv"), pick(encoder, ENCODERS, "simplejpeg"))
        if renderer.resizer == "opencv":
            import cv2

            cv2.setNumThreads(1)  # a 200 px resize gains nothing from threads; the workers are the parallelism
        return renderer

    def jpeg(self, base: np.ndarray, jitter: Jitter) -> bytes:
        (rows, cols), size = crop_geometry(base.shape[0], base.shape[1], jitter)
        crop = base[rows, cols]
        resized = RESIZERS[self.resizer](np.ascontiguousarray(crop), size) if crop.shape[:2] != size else crop
        return ENCODERS[self.encoder](resized, jitter.quality)


# ---- torch: the same transform, differentiable -----------------------------------------------


def served_view(x: "torch.Tensor", rng: random.Random, settings: RenderSettings, size: int) -> "torch.Tensor":
    """(1, 3, H, W) in 0..255 -> (1, 3, size, size): what one model sees of one served copy, mirrored at random."""
    y = served_tensor(x, draw_jitter(rng, settings))
    y = resize(y, (size, size))  # images.preprocess: the whole frame squashed to a square
    return y.flip(3) if rng.random() < 0.5 else y


def served_tensor(x: "torch.Tensor", jitter: Jitter) -> "torch.Tensor":
    """(1, 3, H, W) in 0..255 -> the served copy as a tensor: trimmed, resized, JPEG round trip (straight-through)."""
    (rows, cols), served = crop_geometry(x.shape[2], x.shape[3], jitter)  # whole pixels, as the service's Renderer
    return jpeg_straight_through(resize(x[:, :, rows, cols], served), jitter.quality)


def resize(x: "torch.Tensor", size: tuple[int, int]) -> "torch.Tensor":
    """Antialiased bilinear: what PIL's BILINEAR resize computes when it shrinks."""
    import torch.nn.functional as F

    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def jpeg_straight_through(x: "torch.Tensor", quality: int) -> "torch.Tensor":
    """The real JPEG round trip (and uint8 rounding) forwards; the identity backwards (BPDA)."""
    import torch

    pixels = x.detach()[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    decoded = torch.from_numpy(decoded).permute(2, 0, 1).unsqueeze(0)
    return x + (decoded - x).detach()
