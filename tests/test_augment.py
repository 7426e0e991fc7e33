"""Batch augmentation: shape and dtype kept, seeded, identity at zero strength, flips are mirrors."""

import numpy as np
import pytest
import torch

from asirra.augment import random_affine, to_float_batch
from asirra.config import AugmentConfig

STILL = AugmentConfig(rotation_deg=0.0, shear=0.0, zoom=0.0, shift=0.0, hflip=False)


def batch(n: int = 6, size: int = 24) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_affine_keeps_shape_and_dtype(dtype):
    x = batch().to(dtype)
    y = random_affine(x, AugmentConfig(), seeded(0))
    assert y.shape == x.shape and y.dtype == dtype
    assert 0 <= y.min() and y.max() <= 255  # border padding and bilinear weights never leave the input range


def test_random_affine_is_deterministic_for_a_seeded_generator():
    x = batch()
    first = random_affine(x, AugmentConfig(), seeded(7))
    assert torch.equal(first, random_affine(x, AugmentConfig(), seeded(7)))
    assert not torch.allclose(first, random_affine(x, AugmentConfig(), seeded(8)))
    assert not torch.allclose(first, x)


def test_zero_ranges_without_flip_are_the_identity():
    x = batch()
    torch.testing.assert_close(random_affine(x, STILL, seeded(0)), x, atol=1e-3, rtol=0)


def test_flip_alone_mirrors_some_images_and_leaves_the_rest():
    x = batch(n=16)
    y = random_affine(x, AugmentConfig(0.0, 0.0, 0.0, 0.0, hflip=True), seeded(3))
    mirrored = [torch.allclose(y[i], x[i].flip(2), atol=1e-3) for i in range(len(x))]
    unchanged = [torch.allclose(y[i], x[i], atol=1e-3) for i in range(len(x))]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert any(mirrored) and any(unchanged)


def test_to_float_batch_makes_channels_first_floats_in_0_255():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    for channels_last in (True, False):
        x = to_float_batch(pixels, channels_last)
        assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
        np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), pixels.astype(np.float32))
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
