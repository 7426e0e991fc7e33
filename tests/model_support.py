"""Generated data sets a small network can learn in a few epochs, for the model and training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Two patterns per class, so the network must learn more than one colour channel's mean.
CAT_PATTERNS = (((210, 40, 40), "h"), ((40, 200, 60), "v"))
DOG_PATTERNS = (((40, 60, 210), "h"), ((220, 210, 40), "v"))


def pattern_image(color, stripes: str, size=(64, 56), seed: int = 0) -> Image.Image:
    """Noisy stripes of `color` on dark grey: horizontal ("h") or vertical ("v")."""
    rng = np.random.default_rng(seed)
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    on = ((ys if stripes == "h" else xs) // 8) % 2 == 0
    pixels = np.where(on[..., None], np.array(color, float), 60.0) + rng.normal(0, 15, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_pattern_dataset(folder: Path, per_class: int = 40, size=(64, 56), first_id: int = 0) -> Path:
    """cat.N.jpg and dog.N.jpg in `folder`, half of each class in each of its two patterns."""
    folder.mkdir(parents=True, exist_ok=True)
    for c, (label, patterns) in enumerate((("cat", CAT_PATTERNS), ("dog", DOG_PATTERNS))):
        for i in range(per_class):
            color, stripes = patterns[i % 2]
            n = first_id + i
            pattern_image(color, stripes, size, seed=c * 100_000 + n).save(folder / f"{label}.{n}.jpg", quality=90)
    return folder


def tiny_train_config(data: Path, out: Path, **overrides):
    """A TrainConfig sized for a test: small batches, few epochs, no compile, one worker thread."""
    from asirra.train import TrainConfig

    settings = dict(data=str(data), out=str(out), model="seed-cnn", epochs=1, batch_size=16, workers=1,
                    cache_dir=str(out.parent / "cache"), bf16=False)
    settings.update(overrides)
    return TrainConfig(**settings)
