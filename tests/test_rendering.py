"""The served-image transform has one definition: the service's Pillow path and the hardening's torch path
draw the same jitter and produce the same picture (up to resampling and JPEG noise)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from asirra.captcha.rendering import (
    ENCODERS,
    RESIZERS,
    Jitter,
    Renderer,
    RenderSettings,
    available,
    base_side,
    draw_jitter,
    encode_jitter,
    render_jpeg,
    resize,
    served_tensor,
    served_view,
    to_base,
)
from asirra.captcha.service.settings import ServiceSettings


def photo(width: int = 320, height: int = 260, seed: int = 0) -> Image.Image:
    """A picture with structure at every scale (smooth gradients, edges, texture), like a photo has."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), np.sin(9 * xx * yy)], axis=-1)
    pixels = 120 + 90 * base + rng.normal(0, 12, base.shape)
    pixels[height // 3: height // 2, width // 4: 3 * width // 4] = (230, 40, 40)  # a sharp-edged block
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float()


def decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float32)


def test_one_seeded_rng_replays_the_same_servings():
    settings = RenderSettings()
    first = [draw_jitter(random.Random(7), settings) for _ in range(3)]
    assert first[0] == first[1] == first[2]
    image = photo()
    assert render_jpeg(image, random.Random(7), settings) == encode_jitter(image, first[0])


def test_jitter_stays_in_the_settings_ranges():
    settings = RenderSettings(image_side=(150, 160), image_quality=(60, 70), max_crop=0.1)
    rng = random.Random(0)
    for _ in range(200):
        j = draw_jitter(rng, settings)
        assert all(0 <= f <= 0.1 for f in (j.left, j.top, j.right, j.bottom))
        assert 150 <= j.side <= 160 and 60 <= j.quality <= 70
    assert ServiceSettings(max_crop=0.1, image_side=(150, 160), image_quality=(60, 70)).rendering == settings


@pytest.mark.parametrize("seed", range(6))
def test_the_pil_and_torch_paths_serve_the_same_picture(seed):
    image = photo(seed=seed)
    jitter = draw_jitter(random.Random(seed), RenderSettings())
    pil = decoded(encode_jitter(image, jitter))
    tensor = served_tensor(as_tensor(image), jitter)
    assert abs(tensor.shape[2] - pil.shape[0]) <= 1 and abs(tensor.shape[3] - pil.shape[1]) <= 1
    assert max(tensor.shape[2:]) == max(pil.shape[:2]) == jitter.side  # the longest side is the drawn one
    torch_pixels = resize(tensor, pil.shape[:2])[0].permute(1, 2, 0).numpy()
    # Measured: 1-3 levels (the crop rounds to whole pixels in torch, and both carry their own JPEG noise);
    # a transform that skipped the crop or the JPEG step, or resized differently, lands far above.
    assert np.abs(torch_pixels - pil).mean() < 4.0
    assert np.corrcoef(torch_pixels.ravel(), pil.ravel())[0, 1] > 0.98


def test_a_different_transform_would_not_pass_for_the_served_one():
    """The bound above separates the real transform from near misses: no crop, or another quality."""
    image = photo(seed=1)
    jitter = draw_jitter(random.Random(3), RenderSettings(max_crop=0.06))
    pil = decoded(encode_jitter(image, jitter))
    uncropped = Jitter(0.0, 0.0, 0.0, 0.0, jitter.side, jitter.quality)
    wrong = resize(served_tensor(as_tensor(image), uncropped), pil.shape[:2])[0].permute(1, 2, 0).numpy()
    assert np.abs(wrong - pil).mean() > 4.0


def test_a_view_is_the_served_copy_squashed_to_the_model_input_and_keeps_its_gradient():
    x = as_tensor(photo()).requires_grad_(True)
    view = served_view(x, random.Random(0), RenderSettings(), size=96)
    assert view.shape == (1, 3, 96, 96)
    view.sum().backward()  # JPEG is straight-through: the gradient reaches the original pixels
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---- the service's fast path: cached base array, whole-pixel crop, OpenCV / Pillow resize, simplejpeg / Pillow -----

RENDERERS = [Renderer(resizer, encoder) for resizer in RESIZERS for encoder in ENCODERS
             if available(resizer) and available(encoder)]


@pytest.mark.parametrize("renderer", RENDERERS, ids=lambda r: f"{r.resizer}+{r.encoder}")
@pytest.mark.parametrize("seed", range(4))
def test_the_services_renderer_serves_the_same_picture_from_its_cached_base(renderer, seed):
    image = photo(seed=seed)
    settings = RenderSettings()
    base = to_base(image, settings)
    assert max(base.shape[:2]) == base_side(settings) == 273  # 240 / (1 - 2 * 0.06), rounded up
    jitter = draw_jitter(random.Random(seed), settings)
    served = decoded(renderer.jpeg(base, jitter))
    assert max(served.shape[:2]) == jitter.side
    tensor = served_tensor(as_tensor(image), jitter)  # the defender's model of it, from the full-size photo
    torch_pixels = resize(tensor, served.shape[:2])[0].permute(1, 2, 0).numpy()
    # The same bound as the Pillow reference above: the base's extra resampling stays inside it.
    assert np.abs(torch_pixels - served).mean() < 4.0
    assert np.corrcoef(torch_pixels.ravel(), served.ravel())[0, 1] > 0.98


def test_a_photo_smaller_than_the_base_is_cached_as_it_is():
    image = photo(200, 150)
    assert np.array_equal(to_base(image, RenderSettings()), np.asarray(image))


def test_the_fastest_renderer_falls_back_to_pillow_and_refuses_what_is_missing(monkeypatch):
    import asirra.captcha.rendering as rendering

    monkeypatch.setattr(rendering, "available", lambda name: name == "pillow")
    assert Renderer.fastest() == Renderer("pillow", "pillow")
    with pytest.raises(ValueError, match="opencv is not installed"):
        Renderer.fastest(resizer="opencv")
