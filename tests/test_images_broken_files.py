"""Every broken or odd file has a defined outcome in asirra.images.load_image: an upright RGB image,
or UnusableImage with a short reason. All files are generated here."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image
from PIL import Image, ImageFile

from asirra import images
from asirra.images import UnusableImage, load_image, read_pixels


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height and which holds no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


# ---- unusable: each is refused with a reason, never a crash -----------------------------------

UNUSABLE = {
    "empty file": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated jpeg (half)": (lambda p: p.write_bytes(_jpeg_bytes()[: len(_jpeg_bytes()) // 2]), "truncated"),
    "truncated jpeg (headers only)": (lambda p: p.write_bytes(_jpeg_bytes()[:300]), "truncated"),
    "text named .jpg": (lambda p: p.write_text("just some notes\n"), "not an image"),
    "html named .jpg": (lambda p: p.write_text("<!DOCTYPE html><html><body>404</body></html>"), "HTML"),
    "1x1 image": (lambda p: write_image(p, size=(1, 1), format="JPEG"), "too small"),
    "bomb 30000x30000 png": (lambda p: p.write_bytes(_png_header_only(30_000, 30_000)), "decompression bomb"),
    "bomb 9000x9000 png": (lambda p: p.write_bytes(_png_header_only(9_000, 9_000)), "decompression bomb"),
    "directory named .jpg": (lambda p: p.mkdir(), "is a directory"),
    "missing file": (lambda p: None, "file not found"),
}


@pytest.mark.parametrize("case", UNUSABLE, ids=list(UNUSABLE))
def test_broken_file_is_refused_with_its_reason(case, tmp_path):
    make, reason = UNUSABLE[case]
    path = tmp_path / "x.jpg"
    make(path)
    with pytest.raises(UnusableImage) as caught:
        load_image(path)
    assert reason in caught.value.reason
    assert caught.value.name == str(path)


@pytest.mark.parametrize("side", [9_000, 30_000])
def test_decompression_bomb_is_refused_before_any_pixel_is_decoded(side, monkeypatch):
    def decode(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)
    with pytest.raises(UnusableImage, match="decompression bomb"):
        load_image(_png_header_only(side, side))


def test_unreadable_file_is_refused_as_permission_denied(tmp_path, monkeypatch):
    # Simulated, because root (as in CI containers) can read a chmod 000 file.
    path = write_image(tmp_path / "locked.jpg")

    def refuse(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(UnusableImage, match="permission denied"):
        load_image(path)


def test_file_larger_than_any_acceptable_image_is_not_read(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("the file was read"))
    with pytest.raises(UnusableImage, match="file too large"):
        load_image(path)


# ---- accepted: other formats under a .jpg name, and every mode, come back as RGB ---------------

ACCEPTED = {
    "png named .jpg": dict(format="PNG"),
    "gif named .jpg": dict(format="GIF"),
    "bmp named .jpg": dict(format="BMP"),
    "webp named .jpg": dict(format="WEBP"),
    "cmyk jpeg": dict(format="JPEG", mode="CMYK"),
    "greyscale jpeg": dict(format="JPEG", mode="L"),
    "palette png": dict(format="PNG", mode="P"),
    "rgba png": dict(format="PNG", mode="RGBA"),
    "greyscale+alpha png": dict(format="PNG", mode="LA"),
    "bilevel png": dict(format="PNG", mode="1"),
}


@pytest.mark.parametrize("case", ACCEPTED, ids=list(ACCEPTED))
def test_odd_but_readable_file_becomes_rgb(case, tmp_path):
    path = write_image(tmp_path / "x.jpg", size=(48, 40), **ACCEPTED[case])
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (48, 40)
    assert read_pixels(path, 32).shape == (32, 32, 3)


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (16, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    pixels = np.asarray(load_image(path))
    assert pixels[:, 0].max() < 10 and pixels[:, -1].min() > 245
    assert 100 < pixels[:, 32].mean() < 160


def test_transparent_pixels_are_composited_on_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # black, fully transparent
    rgba[:, 8:] = (0, 0, 0, 255)  # right half: opaque black
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(load_image(path))
    assert (pixels[:, :8] == 255).all() and (pixels[:, 8:] == 0).all()


def _left_red_right_blue_jpeg(path: Path, orientation: int) -> Path:
    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", exif=exif, quality=95)
    return path


@pytest.mark.parametrize("draft_size", [None, 16])
def test_exif_orientation_is_applied(tmp_path, draft_size):
    # Orientation 6: the stored image must be turned 90 degrees clockwise to be upright,
    # so the stored left (red) half ends up on top.
    path = _left_red_right_blue_jpeg(tmp_path / "turned.jpg", orientation=6)
    image = load_image(path, draft_size=draft_size)
    width, height = image.size
    assert height > width
    pixels = np.asarray(image, dtype=float)
    top, bottom = pixels[: height // 4], pixels[-height // 4 :]
    assert top[..., 0].mean() > 200 > top[..., 2].mean()
    assert bottom[..., 2].mean() > 200 > bottom[..., 0].mean()


def test_broken_exif_block_leaves_a_usable_unrotated_photo(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    exif = image.getexif()
    exif[0x0112] = 6
    path = tmp_path / "bad-exif.jpg"
    image.save(path, "JPEG", exif=exif.tobytes()[:20])  # the IFD is cut off mid-entry
    assert load_image(path).size == (40, 20)


def test_bytes_and_path_give_the_same_pixels(tmp_path):
    path = write_image(tmp_path / "x.jpg", size=(80, 60))
    assert np.array_equal(read_pixels(path, 32), read_pixels(path.read_bytes(), 32))
