"""Reading one image safely, and the one preprocessing function every model input goes through.

Training, evaluation, prediction, the CAPTCHA solver and the ONNX backend all call
`load_image` then `preprocess`: a different resize at predict time than at train time is the
classic "every image is a dog" bug, so there is exactly one place where pixels are made.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import TypeAlias, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from asirra.errors import DataError

# A decompression bomb is refused before any pixel buffer is allocated. 64 Mpx is far above any
# pet photo (Kaggle's largest is ~0.5 Mpx) and far below what would exhaust memory.
MAX_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Truncated JPEGs must fail loudly rather than come back grey-padded.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Images smaller than this on either side carry no usable signal (tracking pixels, placeholders).
MIN_SIDE = 8
# No file larger than an uncompressed 24-bit image at the pixel limit can be one we would accept,
# so it is refused before it is read into memory.
MAX_FILE_BYTES = 3 * MAX_PIXELS

# Pillow reports odd-but-handled metadata (corrupt EXIF, palette transparency) as one UserWarning
# per file, which would bury a long run's progress bar; and bombs are refused by our own size check
# below. Process-wide filters, because warnings.catch_warnings() is not thread-safe and images are
# decoded in worker threads.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ImageSource: TypeAlias = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]
"""Anything an image argument accepts: a file path, the file's encoded bytes, or a PIL image."""


class UnusableImage(DataError):
    """An input that cannot become model pixels; `reason` is a short, stable, human phrase."""

    def __init__(self, reason: str, name: str = ""):
        self.reason = reason
        self.name = name
        super().__init__(f"{name}: {reason}" if name else reason)


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return f"<{len(source)} bytes>"


def read_file(path: str | os.PathLike) -> bytes:
    """A file's bytes, or UnusableImage saying in a few words why they cannot be read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UnusableImage(f"file too large ({size:,} bytes)")
        return path.read_bytes()
    except PermissionError:
        raise UnusableImage("permission denied") from None
    except IsADirectoryError:
        raise UnusableImage("is a directory") from None
    except FileNotFoundError:
        raise UnusableImage("file not found") from None
    except OSError as exc:
        raise UnusableImage(f"cannot read file ({exc.strerror or exc})") from None


def _open(source: ImageSource) -> Image.Image:
    """Identify the format and read the header only: no pixel buffer exists yet."""
    if isinstance(source, Image.Image):
        return source
    data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else read_file(source)
    if not data:
        raise UnusableImage("empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UnusableImage(f"decompression bomb refused (over {MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<svg")):
            raise UnusableImage("not an image (HTML/XML text)") from None
        raise UnusableImage("not an image (unrecognised format)") from None


def load_image(source: ImageSource, draft_size: int | None = None) -> Image.Image:
    """Open `source` (path, bytes or PIL image) as an upright RGB image, or raise UnusableImage.

    `draft_size` lets the JPEG decoder work at a reduced scale (DCT scaling) while keeping both
    sides >= draft_size: decoding a 500x375 photo for a 128 px network costs a quarter as much.
    """
    name = _describe(source)
    try:
        image = _open(source)
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise UnusableImage(f"decompression bomb refused ({width}x{height} pixels)")
        if min(width, height) < MIN_SIDE:
            raise UnusableImage(f"too small ({width}x{height})")
        if draft_size and image.format == "JPEG":
            # EXIF rotation swaps sides, and draft keeps both >= the request, so a square request is safe.
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        image = _to_rgb(_upright(image))
    except UnusableImage as exc:
        raise UnusableImage(exc.reason, name) from None
    except Exception as exc:  # Pillow raises many types on malformed data (OSError, struct.error, IndexError...)
        raise UnusableImage(_failure_reason(exc), name) from None
    return image


def _failure_reason(exc: Exception) -> str:
    text = str(exc).lower()
    if "truncated" in text or "premature end" in text or isinstance(exc, EOFError):
        return "truncated image data"
    if "decompression bomb" in text:
        return f"decompression bomb refused (over {MAX_PIXELS:,} pixels)"
    return f"corrupt image ({type(exc).__name__}: {exc})"


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a photo whose EXIF block is broken is still a usable photo."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF raises anything from KeyError to struct.error
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (CMYK, L, P, I;16, LA, RGBA...) to RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / max(peak, 255.0))).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> uint8 array (size, size, 3): the whole frame squashed to a square.

    Squashing keeps the whole animal in view (a centre crop can cut off the head of a cat lying
    along the frame); the network sees the same distortion at train and at predict time.
    """
    if image.mode != "RGB":
        image = _to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def read_pixels(source: ImageSource, size: int) -> np.ndarray:
    """load_image + preprocess: the path every model input takes."""
    return preprocess(load_image(source, draft_size=size), size)
