"""How far a changed image is from its original: SSIM, PSNR and L-infinity, on uint8 pixels.

The human cost of a hardened or distorted CAPTCHA image is measured here, never assumed. SSIM
follows Wang et al. (2004) as published: an 11x11 Gaussian window (sigma 1.5), population
covariances, the mean over colour channels; PSNR and L-infinity are in 0..255 units.
"""

from __future__ import annotations

import numpy as np


def ssim(original: np.ndarray, changed: np.ndarray) -> float:
    """Structural similarity of two uint8 (H, W, 3) images of one size: 1.0 when identical."""
    from skimage.metrics import structural_similarity

    _check_pair(original, changed)
    # The 11-tap window needs 11 px; images down to images.MIN_SIDE (8 px) get a narrower Gaussian.
    radius = min(5, (min(original.shape[:2]) - 1) // 2)
    sigma = 1.5 if radius == 5 else radius / 3.5
    return float(structural_similarity(original, changed, channel_axis=2, data_range=255,
                                       gaussian_weights=True, sigma=sigma, use_sample_covariance=False))


def psnr(original: np.ndarray, changed: np.ndarray) -> float | None:
    """Peak signal-to-noise ratio in dB; None for identical images (infinite, and not valid JSON)."""
    _check_pair(original, changed)
    mse = float(np.mean((original.astype(np.float64) - changed.astype(np.float64)) ** 2))
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def linf(original: np.ndarray, changed: np.ndarray) -> int:
    """The largest change of any channel of any pixel, in 0..255 units."""
    _check_pair(original, changed)
    return int(np.abs(original.astype(np.int16) - changed.astype(np.int16)).max())


def compare(original: np.ndarray, changed: np.ndarray) -> dict:
    """{"ssim", "psnr", "linf"} of `changed` against `original`."""
    return {"ssim": ssim(original, changed), "psnr": psnr(original, changed), "linf": linf(original, changed)}


def _check_pair(original: np.ndarray, changed: np.ndarray) -> None:
    if original.shape != changed.shape or original.ndim != 3:
        raise ValueError(f"images must be (H, W, 3) of one size, got {original.shape} and {changed.shape}")
