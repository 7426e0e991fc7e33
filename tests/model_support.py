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
    from asirra.config import TrainConfig

    settings = dict(data=str(data), out=str(out), model="seed-cnn", epochs=1, batch_size=16, workers=1,
                    cache_dir=str(out.parent / "cache"), bf16=False)
    settings.update(overrides)
    return TrainConfig(**settings)


def varied_images() -> list[Image.Image]:
    """Inputs unlike each other: solid colours, noise, stripes, a gradient; square, wide, tall and greyscale."""
    rng = np.random.default_rng(5)
    gradient = np.linspace(0, 255, 90 * 60).reshape(60, 90)
    return [
        Image.new("RGB", (50, 50), (230, 30, 30)),
        Image.new("RGB", (40, 70), (20, 40, 220)),
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
        pattern_image((40, 200, 60), "v", (120, 30)),
        pattern_image((220, 210, 40), "h", (30, 100)),
        Image.fromarray(np.stack([gradient, gradient[::-1], np.full_like(gradient, 128)], -1).astype(np.uint8)),
        Image.fromarray(gradient.astype(np.uint8), "L"),
    ]


def save_spread_model(folder: Path, name: str = "seed-cnn", temperature: float = 1.0) -> Path:
    """A random (or, for effnet-lite0, ImageNet backbone + random head) model saved to `folder`,
    its head rescaled so that `varied_images` get logits spread over several units: agreement
    tests on probabilities all near 0.5 would prove little."""
    import torch

    from asirra.images import read_pixels
    from asirra.models import ModelConfig, create_model, image_size_of, save_model

    torch.manual_seed(0)
    size = image_size_of(name)
    model = create_model(name, pretrained=name == "effnet-lite0")
    x = torch.from_numpy(np.stack([read_pixels(im, size) for im in varied_images()])).permute(0, 3, 1, 2).float()
    if name == "seed-cnn":
        model.train()
        with torch.no_grad():
            model(x)  # batch-norm statistics other than the defaults
    model.eval()
    head = model.classifier[-1] if name == "seed-cnn" else model.head
    with torch.no_grad():
        z = model(x)
        head.weight *= 3.0 / z.std()
        head.bias -= model(x).mean()
    return save_model(model, ModelConfig(name, size, temperature=temperature), folder)


def run_cli(*args):
    """`asirra ARGS...` in-process; the result, after asserting it succeeded (its output on failure)."""
    from typer.testing import CliRunner

    from asirra.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result

