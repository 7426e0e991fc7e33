"""What the service does to a pool photo before a client sees it: the one definition, in PIL and in torch.

Every served copy is re-encoded with a fresh random edge trim, size and JPEG quality (`Jitter`,
drawn by `draw_jitter`), so neither a URL nor a hash of the bytes ties two servings of one photo
together. The service applies it with Pillow (`render_jpeg`); the defender's hardening needs its
gradient, so `served_view` applies the same jitter to a torch tensor (crop and resize
differentiable, JPEG straight-through) and then squashes it to a model's input as
`asirra.images.preprocess` does. tests/test_rendering.py checks that the two agree.

Imports nothing from the service, so the defend and attack layers use it without FastAPI; torch is
imported only by the torch half.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


# ---- torch: the same transform, differentiable -----------------------------------------------


def served_view(x: "torch.Tensor", rng: random.Random, settings: RenderSettings, size: int) -> "torch.Tensor":
    """(1, 3, H, W) in 0..255 -> (1, 3, size, size): what one model sees of one served copy, mirrored at random."""
    y = served_tensor(x, draw_jitter(rng, settings))
    y = resize(y, (size, size))  # images.preprocess: the whole frame squashed to a square
    return y.flip(3) if rng.random() < 0.5 else y


def served_tensor(x: "torch.Tensor", jitter: Jitter) -> "torch.Tensor":
    """(1, 3, H, W) in 0..255 -> the served copy as a tensor: trimmed, resized, JPEG round trip (straight-through)."""
    _, _, height, width = x.shape
    rows = slice(round(jitter.top * height), max(round(jitter.top * height) + 1, height - round(jitter.bottom * height)))
    cols = slice(round(jitter.left * width), max(round(jitter.left * width) + 1, width - round(jitter.right * width)))
    crop = x[:, :, rows, cols]
    scale = jitter.side / max(crop.shape[2], crop.shape[3])
    served = (max(1, round(crop.shape[2] * scale)), max(1, round(crop.shape[3] * scale)))
    return jpeg_straight_through(resize(crop, served), jitter.quality)


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
