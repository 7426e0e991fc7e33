"""The attacker's counter-moves: specs parse (or fail in one line), and each transform does what it claims."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from asirra.captcha.attack.counter import CounterError, Pipeline, blur, jpeg, median, parse_preprocess, resize


def noise_image(seed: int = 0, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_a_spec_parses_into_steps_in_order_and_names_itself():
    pipeline = parse_preprocess("jpeg:75, median:3,blur:1.5,resize:0.5")
    assert [(step.kind, step.value) for step in pipeline.steps] == [("jpeg", 75), ("median", 3), ("blur", 1.5),
                                                                    ("resize", 0.5)]
    assert pipeline.spec == "jpeg:75,median:3,blur:1.5,resize:0.5"
    assert parse_preprocess(pipeline.spec) == pipeline


@pytest.mark.parametrize("spec", [None, "", "none", " None "])
def test_no_preprocessing_passes_images_through_untouched(spec):
    pipeline = parse_preprocess(spec)
    sources = [b"jpeg bytes", noise_image()]
    assert not pipeline and pipeline.spec == "none"
    assert all(a is b for a, b in zip(pipeline.apply_all(sources), sources))


@pytest.mark.parametrize(
    "spec, words",
    [
        ("sharpen:2", "unknown preprocessing 'sharpen' in 'sharpen:2'; choose from jpeg:QUALITY"),
        ("jpeg", "jpeg needs a quality from 1 to 100, as in jpeg:75; got 'jpeg'"),
        ("jpeg:0", "jpeg needs a quality from 1 to 100"),
        ("jpeg:7.5", "jpeg needs a quality from 1 to 100"),
        ("median:4", "median needs an odd window size from 3 to 15"),
        ("blur:0", "blur needs a sigma in pixels, above 0"),
        ("blur:nan", "blur needs a sigma in pixels, above 0"),
        ("resize:1", "resize needs a scale factor above 0 and below 1"),
        ("resize:half", "resize needs a scale factor"),
        ("jpeg:75,,median:3", "empty step in preprocessing 'jpeg:75,,median:3'"),
    ],
)
def test_an_ill_formed_spec_is_one_clear_line(spec, words):
    with pytest.raises(CounterError) as caught:
        parse_preprocess(spec)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_steps_apply_in_the_order_written():
    image = noise_image(1)
    expected = median(resize(image, 0.5), 3)
    got = parse_preprocess("resize:0.5,median:3").apply(image)
    np.testing.assert_array_equal(pixels(got), pixels(expected))
    other_order = parse_preprocess("median:3,resize:0.5").apply(image)
    assert not np.array_equal(pixels(got), pixels(other_order))


def test_a_pipeline_reads_served_jpeg_bytes():
    buffer = io.BytesIO()
    noise_image(2).save(buffer, "JPEG", quality=90)
    out = parse_preprocess("blur:1.0").apply(buffer.getvalue())
    assert out.mode == "RGB" and out.size == (64, 48)


def test_median_removes_salt_noise():
    rng = np.random.default_rng(0)
    grey = np.full((60, 80, 3), 128, dtype=np.uint8)
    salted = grey.copy()
    salt = rng.random((60, 80)) < 0.03  # isolated white specks
    salted[salt] = 255
    cleaned = pixels(median(Image.fromarray(salted), 3))
    assert salt.sum() > 50 and (cleaned == 255).sum() == 0
    assert np.abs(cleaned - 128).max() == 0


def test_jpeg_keeps_the_size_and_loses_detail_with_quality():
    image = noise_image(3)
    error = {}
    for quality in (95, 30):
        out = jpeg(image, quality)
        assert out.size == image.size and out.mode == "RGB"
        error[quality] = np.abs(pixels(out) - pixels(image)).mean()
    assert 0 < error[95] < error[30]


def test_blur_smooths_noise_more_as_sigma_grows():
    image = noise_image(4)
    spread = [pixels(image).std()] + [pixels(blur(image, sigma)).std() for sigma in (0.5, 1.0, 2.0)]
    assert blur(image, 1.0).size == image.size
    assert spread == sorted(spread, reverse=True) and spread[-1] < spread[0] / 3


def test_resize_halves_then_restores_the_resolution():
    checker = ((np.indices((48, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)  # 1-pixel detail
    gradient = np.tile(np.linspace(0, 255, 64), (48, 1)).astype(np.uint8)  # smooth content
    for array, survives in ((checker, False), (gradient, True)):
        image = Image.fromarray(np.stack([array] * 3, axis=-1))
        out = resize(image, 0.5)
        assert out.size == image.size
        difference = np.abs(pixels(out) - pixels(image)).mean()
        assert (difference < 5) == survives, f"mean difference {difference:.1f}"


def test_an_unreadable_served_image_raises_unusable_image():
    from asirra.images import UnusableImage

    with pytest.raises(UnusableImage):
        Pipeline(parse_preprocess("jpeg:75").steps).apply(b"<html>not an image</html>")
