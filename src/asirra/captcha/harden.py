"""Hardened pools: CAPTCHA images carrying L-infinity-bounded adversarial perturbations.

Each image is perturbed at its own resolution and stored losslessly (derived_pool.py), so every
file is within round(eps * 255) of its original on every channel of every pixel. The gradient is
taken where the attacker will look: through the service's own transformations (random edge crop,
resize to the served size, JPEG re-encoding; see service.render_jpeg), a random mirror, and the
squash to each surrogate's input size, averaged over `eot` random draws (expectation over
transformation, Athalye et al. 2018). Crops and resizes are differentiable as they are; JPEG is
not, so the forward pass runs the real encoder (PIL, at a quality drawn from the service's range)
and the backward pass treats it as the identity (straight-through, BPDA).

Methods (what the perturbation pushes the surrogates towards):
  fgsm           one signed-gradient step away from the true label (Goodfellow et al. 2015)
  pgd            `steps` such steps from a random start, with momentum (Madry et al.; Dong et al. 2018)
  random-target  `steps` steps towards a class drawn by coin flip per image, independent of its label
  feature        `steps` steps pushing the surrogates' penultimate features away from the clean
                 image's, with no label at all

fgsm and pgd write the label into the noise: every cat is pushed the same way, so an attacker who
buys a few hundred labels learns the push and reads it back (the issue's calibration run: a probe
on 240 hardened photos read new hardened photos at 86%). random-target makes the push independent
of the label by construction; feature uses no label, but pushing away from "this cat" may still
point away from cats in general, so its leak is measured rather than assumed
(benchmarks/bench_harden.py).

Surrogates are the defender's models: run or model folders, registry names resolved under
runs/surrogates/<name> ($ASIRRA_SURROGATES), or `shipped` (the attacker's model: white-box only).
"""

from __future__ import annotations

import io
import os
import random
import re
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from asirra import DOG
from asirra.captcha.derived_pool import DerivedPoolSummary, derive_pool
from asirra.captcha.service import ServiceSettings

METHODS = ("fgsm", "pgd", "random-target", "feature")
DEFAULT_STEPS = {"fgsm": 1, "pgd": 4, "random-target": 4, "feature": 4}
MAX_EPSILON = Fraction(64, 255)  # far beyond what people tolerate; a bound against typos like "4"
SHIPPED = "shipped"


class HardenError(ValueError):
    """Settings hardening cannot run with; the message is one line."""


@dataclass(frozen=True)
class HardenConfig:
    method: str = "fgsm"
    epsilon: float = 4 / 255  # L-infinity bound as a fraction of the 0..255 range
    surrogates: tuple[str, ...] = ("effnet-lite0",)
    steps: int | None = None  # None: DEFAULT_STEPS[method]
    eot: int = 2  # random service transformations averaged per gradient
    step_size: float | None = None  # in 0..255 units; None: 2.5 * eps / steps (Madry et al.)
    momentum: float = 1.0  # MI-FGSM's decay; helps perturbations transfer to unseen models
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise HardenError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0 <= self.epsilon <= MAX_EPSILON:
            raise HardenError(f"epsilon must be between 0 and {MAX_EPSILON}, got {self.epsilon:g}")
        if self.steps is not None and self.steps < 1:
            raise HardenError(f"steps must be at least 1, got {self.steps}")
        if self.method == "fgsm" and self.steps not in (None, 1):
            raise HardenError("fgsm is one step by definition; use --method pgd for more steps")
        if self.eot < 1:
            raise HardenError(f"eot must be at least 1, got {self.eot}")
        if not self.surrogates:
            raise HardenError("give at least one surrogate model")

    @property
    def n_steps(self) -> int:
        return 1 if self.method == "fgsm" else self.steps or DEFAULT_STEPS[self.method]

    @property
    def epsilon_255(self) -> int:
        """The bound on the stored files, in 0..255 units."""
        return round(self.epsilon * 255)


def parse_epsilon(text: str) -> float:
    """"4/255" or "0.0157" -> a fraction of the 0..255 range; HardenError (one line) otherwise."""
    text = text.strip()
    if not re.fullmatch(r"\d+(\.\d*)?(/\d+(\.\d*)?)?|\.\d+", text):
        raise HardenError(f"epsilon must look like 4/255 or 0.0157, got {text!r}")
    try:
        value = Fraction(text) if "/" in text else Fraction(float(text))
    except ZeroDivisionError:
        raise HardenError(f"epsilon {text!r} divides by zero") from None
    if value > MAX_EPSILON:
        raise HardenError(f"epsilon {text} is over {MAX_EPSILON} (fractions of 255: write 4/255, not 4)")
    return float(value)


# ---- surrogates ---------------------------------------------------------------------------


def surrogate_root() -> Path:
    return Path(os.environ.get("ASIRRA_SURROGATES", "runs/surrogates"))


@dataclass
class Surrogate:
    name: str  # as given on the command line
    folder: str
    model: torch.nn.Module
    size: int
    white_box: bool  # the attacker's own model

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate features, which any linear read-out (a probe, the head) sees."""
        if hasattr(self.model, "backbone"):
            return self.model.backbone(x)
        if hasattr(self.model, "features"):  # seed-cnn
            return self.model.features(x * (1.0 / 255.0)).flatten(1)
        raise HardenError(f"surrogate {self.name}: no feature layer known for {type(self.model).__name__}")


def load_surrogates(specs: Sequence[str]) -> list[Surrogate]:
    return [load_surrogate(spec) for spec in specs]


def load_surrogate(spec: str) -> Surrogate:
    """A defender's model by folder or registry name; the shipped model only as `shipped`."""
    from asirra.models import available_models, load_model, resolve_model_folder
    from asirra.predict import DEFAULT_MODEL_DIR

    if spec == SHIPPED:
        folder = DEFAULT_MODEL_DIR
    elif Path(spec).exists():
        folder = resolve_model_folder(spec)
    elif spec in available_models():
        folder = surrogate_root() / spec
        if not folder.exists():
            raise HardenError(
                f"no surrogate {spec} at {folder}; train one, e.g. `asirra train --model {spec} --strategy linear "
                f"--views 1 --limit 2000 --out {folder}` (effnet) or `--strategy scratch` (seed-cnn), or pass a run folder")
        folder = resolve_model_folder(folder)
    else:
        raise HardenError(f"surrogate {spec!r} is neither a model folder nor one of {', '.join(available_models())}, "
                          f"nor {SHIPPED!r}")
    white_box = _same_weights(folder, DEFAULT_MODEL_DIR)
    if white_box and spec != SHIPPED:
        raise HardenError(f"{spec} is the shipped attacker model; pass --surrogates {SHIPPED} for a white-box run")
    model, config = load_model(folder)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return Surrogate(spec, str(folder), model.eval(), config.image_size, white_box)


def _same_weights(folder: Path, shipped: Path) -> bool:
    from asirra.cache import content_key
    from asirra.models import WEIGHTS_FILE

    theirs, ours = Path(folder) / WEIGHTS_FILE, Path(shipped) / WEIGHTS_FILE
    if not ours.exists():
        return False
    return theirs.stat().st_size == ours.stat().st_size and content_key(theirs.read_bytes()) == content_key(ours.read_bytes())


# ---- the service's transformations, differentiable -----------------------------------------


def served_view(x: torch.Tensor, rng: random.Random, service: ServiceSettings, size: int) -> torch.Tensor:
    """(1, 3, H, W) in 0..255 -> (1, 3, size, size): what one surrogate sees of one served copy."""
    _, _, height, width = x.shape
    left, top, right, bottom = (rng.uniform(0, service.max_crop) for _ in range(4))
    rows = slice(round(top * height), max(round(top * height) + 1, height - round(bottom * height)))
    cols = slice(round(left * width), max(round(left * width) + 1, width - round(right * width)))
    crop = x[:, :, rows, cols]
    scale = rng.randint(*service.image_side) / max(crop.shape[2], crop.shape[3])
    served = (max(1, round(crop.shape[2] * scale)), max(1, round(crop.shape[3] * scale)))
    y = _resize(crop, served)
    y = jpeg_straight_through(y, rng.randint(*service.image_quality))
    y = _resize(y, (size, size))  # images.preprocess: the whole frame squashed to a square
    return y.flip(3) if rng.random() < 0.5 else y


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Antialiased bilinear is what PIL's BILINEAR resize computes when it shrinks.
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def jpeg_straight_through(x: torch.Tensor, quality: int) -> torch.Tensor:
    """The real JPEG round trip (and uint8 rounding) forwards; the identity backwards (BPDA)."""
    pixels = x.detach()[0].clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32)
    decoded = torch.from_numpy(decoded).permute(2, 0, 1).unsqueeze(0)
    return x + (decoded - x).detach()


# ---- crafting -----------------------------------------------------------------------------


class Hardener:
    """Crafts one image's perturbation against the surrogates; `__call__` fits derive_pool's Maker."""

    def __init__(self, config: HardenConfig, surrogates: Sequence[Surrogate], service: ServiceSettings | None = None):
        self.config, self.surrogates = config, list(surrogates)
        self.service = service or ServiceSettings()

    def __call__(self, original: np.ndarray, key: str, ref) -> tuple[np.ndarray, dict]:
        config = self.config
        rng = random.Random(f"{config.seed}:{key}")  # the same image gets the same draws after a resume
        x = torch.from_numpy(np.array(original)).permute(2, 0, 1).unsqueeze(0).float()
        target = self._target(ref.label, rng)
        eps = config.epsilon_255
        adv = x if eps == 0 else self._craft(x, target, eps, rng)
        adv = torch.minimum(torch.maximum(adv.round(), x - eps), x + eps).clamp(0, 255)
        changed = adv[0].permute(1, 2, 0).to(torch.uint8).numpy()
        fields = {"method": config.method, "epsilon": config.epsilon, "epsilon_255": eps,
                  "surrogates": [s.name for s in self.surrogates],
                  "white_box": any(s.white_box for s in self.surrogates),
                  "steps": config.n_steps, "eot": config.eot, "seed": config.seed,
                  **self._surrogate_scores(x, adv, rng)}
        if config.method == "random-target":
            fields["target"] = "dog" if target == DOG else "cat"
        return changed, fields

    def _target(self, label: int, rng: random.Random) -> float | None:
        """The class the loss is about (1.0 = dog): the label (to climb away from), a coin flip, or none."""
        if self.config.method in ("fgsm", "pgd"):
            return float(label == DOG)
        if self.config.method == "random-target":
            return float(rng.random() < 0.5)
        return None

    def _craft(self, x: torch.Tensor, target: float | None, eps: int, rng: random.Random) -> torch.Tensor:
        config, steps = self.config, self.config.n_steps
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        clean = self._clean_features(x, rng) if config.method == "feature" else None
        if config.method == "fgsm":
            delta = torch.zeros_like(x)
            step = float(eps)
        else:
            delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * eps
            step = config.step_size or 2.5 * eps / steps
        velocity = torch.zeros_like(x)
        for _ in range(steps):
            delta.requires_grad_(True)
            objective = self._objective((x + delta).clamp(0, 255), target, clean, rng)
            (grad,) = torch.autograd.grad(objective, delta)
            with torch.no_grad():
                velocity = config.momentum * velocity + grad / grad.abs().mean().clamp_min(1e-12)
                delta = (delta + step * velocity.sign()).clamp(-eps, eps)
                delta = (x + delta).clamp(0, 255) - x
        return x + delta.detach()

    def _objective(self, x: torch.Tensor, target: float | None, clean: list | None, rng: random.Random) -> torch.Tensor:
        """What the step climbs, averaged over surrogates and `eot` served views of x."""
        total = 0.0
        for i, surrogate in enumerate(self.surrogates):
            views = torch.cat([served_view(x, rng, self.service, surrogate.size) for _ in range(self.config.eot)])
            if clean is not None:
                moved = surrogate.features(views) - clean[i]
                total = total + (moved.pow(2).sum(1) / clean[i].pow(2).sum(1).clamp_min(1e-12)).mean()
                continue
            logits = surrogate.logits(views)
            aim = torch.full_like(logits, target)
            loss = F.binary_cross_entropy_with_logits(logits, aim)
            # Untargeted methods climb the loss of the true label; random-target descends towards its target.
            total = total + (loss if self.config.method in ("fgsm", "pgd") else -loss)
        return total / len(self.surrogates)

    @torch.no_grad()
    def _clean_features(self, x: torch.Tensor, rng: random.Random) -> list[torch.Tensor]:
        return [s.features(torch.cat([served_view(x, rng, self.service, s.size) for _ in range(self.config.eot)]))
                .mean(0, keepdim=True) for s in self.surrogates]

    @torch.no_grad()
    def _surrogate_scores(self, x: torch.Tensor, adv: torch.Tensor, rng: random.Random) -> dict:
        """The surrogates' mean P(dog) over fresh served views, before and after: did it take?"""
        def p_dog(image):
            return float(np.mean([torch.sigmoid(s.logits(torch.cat([served_view(image, rng, self.service, s.size)
                                                                     for _ in range(self.config.eot)]))).mean()
                                  for s in self.surrogates]))
        return {"surrogate_p_dog_before": round(p_dog(x), 4), "surrogate_p_dog_after": round(p_dog(adv), 4)}


def harden_pool(refs: Sequence, out: str | os.PathLike, config: HardenConfig, surrogates: Sequence[Surrogate] | None = None,
                progress: bool = True, **derive_options) -> DerivedPoolSummary:
    """Write the hardened pool of the labelled `refs` in `out` (resumable; see derived_pool)."""
    surrogates = load_surrogates(config.surrogates) if surrogates is None else list(surrogates)
    settings = {"maker": "harden", **asdict(config), "surrogates": [s.name for s in surrogates],
                "surrogate_folders": [s.folder for s in surrogates], "steps": config.n_steps,
                "epsilon_255": config.epsilon_255, "white_box": any(s.white_box for s in surrogates),
                "eot_transforms": "service crop/resize (differentiable) + JPEG (straight-through) + mirror",
                "service": {k: v for k, v in asdict(ServiceSettings()).items()
                            if k in ("max_crop", "image_side", "image_quality")}}
    return derive_pool(refs, out, settings, Hardener(config, surrogates), progress=progress,
                       desc=f"hardening ({config.method}, eps {config.epsilon_255}/255)", **derive_options)
