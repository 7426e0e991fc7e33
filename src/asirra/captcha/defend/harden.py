"""Hardened pools: CAPTCHA images carrying L-infinity-bounded adversarial perturbations.

Each image is perturbed at its own resolution and stored losslessly (derived_pool.py), so every
file is within round(eps * 255) of its original on every channel of every pixel. The gradient is
taken where the attacker will look: through the service's own transformations (random edge crop,
resize to the served size, JPEG re-encoding; asirra.captcha.rendering), a random mirror, and the
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
  balanced-target  a coin-flip target per image like random-target, but the objective is the move of
                 the surrogates' logit towards it, capped at `logit_clip`: a push towards the image's
                 own class counts as much as one towards the other, so both classes get moves of one
                 size in either direction (random-target's cross-entropy saturates towards the own class)
  universal      one image-agnostic perturbation (Moosavi-Dezfooli et al. 2017), crafted once over a
                 crafting set (`crafting`: a labelled folder that shares no image with the pool) by
                 `steps` passes of signed steps away from each crafting image's label, then resized to
                 every pool image's resolution and added: identical noise for a cat and a dog
  universal-uncertain  the same, with an objective that uses no label at all: every crafting image is
                 pushed towards the surrogates' maximum uncertainty (binary entropy)

fgsm and pgd write the label into the noise: every cat is pushed the same way, so an attacker who
buys a few hundred labels learns the push and reads it back (the issue's calibration run: a probe
on 240 hardened photos read new hardened photos at 86%). random-target makes the push independent
of the label by construction; feature uses no label, but pushing away from "this cat" may still
point away from cats in general, so its leak is measured rather than assumed
(benchmarks/bench_harden.py). balanced-target caps the push so its size does not depend on the
class; the universal methods add the same pixels to every image, so the noise itself cannot carry a
label, though a network's response to it still differs between cats and dogs (measured too).

Surrogates are the defender's models: run or model folders, registry names resolved under
runs/surrogates/<name> ($ASIRRA_SURROGATES), or `shipped` (the attacker's model: white-box only).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from asirra.captcha.defend.config import UNIVERSAL, HardenConfig, HardenError
from asirra.captcha.defend.derived_pool import DerivedPoolSummary, claim_folder, derive_pool
from asirra.captcha.rendering import RenderSettings, served_view
from asirra.errors import DataError
from asirra.fileio import atomic_path, write_json_atomic
from asirra.labels import DOG

PATTERN_SIDE = 224  # the universal pattern's resolution; bilinear resizing keeps it within epsilon
PATTERN_FILE = "universal-perturbation.npy"  # in the hardened pool, so a resumed run adds the same noise
SHIPPED = "shipped"

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
    from asirra.models import DEFAULT_MODEL_DIR, available_models, load_model, resolve_model_folder

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


# ---- crafting -----------------------------------------------------------------------------


class Hardener:
    """Crafts one image's perturbation against the surrogates; `__call__` fits derive_pool's Maker."""

    def __init__(self, config: HardenConfig, surrogates: Sequence[Surrogate], render: RenderSettings | None = None):
        self.config, self.surrogates = config, list(surrogates)
        self.render = render or RenderSettings()
        self.pattern: torch.Tensor | None = None  # universal*: (1, 3, PATTERN_SIDE, PATTERN_SIDE) in 0..255 units

    def __call__(self, original: np.ndarray, key: str, ref) -> tuple[np.ndarray, dict]:
        config = self.config
        rng = random.Random(f"{config.seed}:{key}")  # the same image gets the same draws after a resume
        x = torch.from_numpy(np.array(original)).permute(2, 0, 1).unsqueeze(0).float()
        target = self._target(ref.label, rng)
        eps = config.epsilon_255
        if config.method in UNIVERSAL:
            if self.pattern is None:
                raise HardenError("craft the universal perturbation first (Hardener.craft_universal)")
            adv = x + fit_pattern(self.pattern, x.shape[2:])
        else:
            adv = x if eps == 0 else self._craft(x, target, eps, rng)
        adv = torch.minimum(torch.maximum(adv.round(), x - eps), x + eps).clamp(0, 255)
        changed = adv[0].permute(1, 2, 0).to(torch.uint8).numpy()
        fields = {"method": config.method, "epsilon": config.epsilon, "epsilon_255": eps,
                  "surrogates": [s.name for s in self.surrogates],
                  "white_box": any(s.white_box for s in self.surrogates),
                  "steps": config.n_steps, "eot": config.eot, "seed": config.seed,
                  **self._surrogate_scores(x, adv, rng)}
        if config.method in ("random-target", "balanced-target"):
            fields["target"] = "dog" if target == DOG else "cat"
        return changed, fields

    def _target(self, label: int, rng: random.Random) -> float | None:
        """The class the loss is about (1.0 = dog): the label (to climb away from), a coin flip, or none."""
        if self.config.method in ("fgsm", "pgd"):
            return float(label == DOG)
        if self.config.method in ("random-target", "balanced-target"):
            return float(rng.random() < 0.5)
        return None

    def _craft(self, x: torch.Tensor, target: float | None, eps: int, rng: random.Random) -> torch.Tensor:
        config, steps = self.config, self.config.n_steps
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        clean = self._clean_features(x, rng) if config.method == "feature" else None
        if config.method == "balanced-target":
            clean = self._clean_logits(x, rng)
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
            if not grad.any():  # balanced-target: every view has made its capped move; stop, not coast on momentum
                break
            with torch.no_grad():
                velocity = config.momentum * velocity + grad / grad.abs().mean().clamp_min(1e-12)
                delta = (delta + step * velocity.sign()).clamp(-eps, eps)
                delta = (x + delta).clamp(0, 255) - x
        return x + delta.detach()

    def _objective(self, x: torch.Tensor, target: float | None, clean: list | None, rng: random.Random) -> torch.Tensor:
        """What the step climbs, averaged over surrogates and `eot` served views of x."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
            return self._objective_once(x, target, clean, rng).float()

    def _objective_once(self, x: torch.Tensor, target: float | None, clean: list | None, rng: random.Random) -> torch.Tensor:
        total = 0.0
        for i, surrogate in enumerate(self.surrogates):
            views = torch.cat([served_view(x, rng, self.render, surrogate.size) for _ in range(self.config.eot)])
            if self.config.method == "balanced-target":
                # Signed logit move towards the target, capped: no saturation, one size for either class.
                sign = 1.0 if target == 1.0 else -1.0
                move = sign * (surrogate.logits(views) - clean[i])
                total = total + move.clamp(max=self.config.logit_clip).mean()
                continue
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
    def _clean_logits(self, x: torch.Tensor, rng: random.Random) -> list[torch.Tensor]:
        return [s.logits(torch.cat([served_view(x, rng, self.render, s.size) for _ in range(self.config.eot)])).mean()
                for s in self.surrogates]

    def craft_universal(self, crafting: Sequence[np.ndarray], labels: Sequence[int], progress: bool = False) -> torch.Tensor:
        """One pattern for all images: `steps` passes of signed, momentum-averaged steps over the crafting
        images (each at its own resolution, through the served transformations), projected to epsilon."""
        config, eps = self.config, self.config.epsilon_255
        rng = random.Random(f"{config.seed}:universal")
        pattern = torch.zeros(1, 3, PATTERN_SIDE, PATTERN_SIDE)
        step = config.step_size or eps / 8  # many small steps: every crafting image gets a say
        velocity = torch.zeros_like(pattern)
        order = list(range(len(crafting)))
        images = [torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0).float() for image in crafting]
        with tqdm(total=config.n_steps * len(order), desc=f"crafting {config.method}", unit="img", file=sys.stderr,
                  disable=not progress) as bar:
            for _ in range(config.n_steps if eps else 0):
                rng.shuffle(order)
                for i in order:
                    pattern.requires_grad_(True)
                    x = images[i]
                    adv = (x + fit_pattern(pattern, x.shape[2:])).clamp(0, 255)
                    objective = self._universal_objective(adv, float(labels[i] == DOG), rng)
                    (grad,) = torch.autograd.grad(objective, pattern)
                    with torch.no_grad():
                        velocity = config.momentum * velocity + grad / grad.abs().mean().clamp_min(1e-12)
                        pattern = (pattern + step * velocity.sign()).clamp(-eps, eps)
                    bar.update()
        self.pattern = pattern.detach()
        return self.pattern

    def _universal_objective(self, x: torch.Tensor, label: float, rng: random.Random) -> torch.Tensor:
        total = 0.0
        for surrogate in self.surrogates:
            views = torch.cat([served_view(x, rng, self.render, surrogate.size) for _ in range(self.config.eot)])
            z = surrogate.logits(views)
            if self.config.method == "universal":  # away from the crafting image's label (the published method)
                total = total + F.binary_cross_entropy_with_logits(z, torch.full_like(z, label))
            else:  # binary entropy softplus(z) - z * sigmoid(z): highest at P(dog) = 0.5, whatever the label
                total = total + (F.softplus(z) - z * torch.sigmoid(z)).mean()
        return total / len(self.surrogates)

    @torch.no_grad()
    def _clean_features(self, x: torch.Tensor, rng: random.Random) -> list[torch.Tensor]:
        return [s.features(torch.cat([served_view(x, rng, self.render, s.size) for _ in range(self.config.eot)]))
                .mean(0, keepdim=True) for s in self.surrogates]

    @torch.no_grad()
    def _surrogate_scores(self, x: torch.Tensor, adv: torch.Tensor, rng: random.Random) -> dict:
        """The surrogates' mean P(dog) over fresh served views, before and after: did it take?"""
        def p_dog(image):
            return float(np.mean([torch.sigmoid(s.logits(torch.cat([served_view(image, rng, self.render, s.size)
                                                                     for _ in range(self.config.eot)]))).mean()
                                  for s in self.surrogates]))
        return {"surrogate_p_dog_before": round(p_dog(x), 4), "surrogate_p_dog_after": round(p_dog(adv), 4)}


def fit_pattern(pattern: torch.Tensor, size) -> torch.Tensor:
    """The universal pattern resized to one image's (H, W); bilinear interpolation never leaves [-eps, eps]."""
    return F.interpolate(pattern, size=tuple(size), mode="bilinear", align_corners=False)


def harden_pool(refs: Sequence, out: str | os.PathLike, config: HardenConfig, surrogates: Sequence[Surrogate] | None = None,
                progress: bool = True, **derive_options) -> DerivedPoolSummary:
    """Write the hardened pool of the labelled `refs` in `out` (resumable; see derived_pool)."""
    surrogates = load_surrogates(config.surrogates) if surrogates is None else list(surrogates)
    fields = asdict(config)
    # Settings only a method uses are recorded only for it, so pools made before these fields resume unchanged.
    if config.method not in UNIVERSAL:
        del fields["crafting"], fields["crafting_limit"]
    if config.method != "balanced-target":
        del fields["logit_clip"]
    if not config.bf16:
        del fields["bf16"]
    settings = {"maker": "harden", **fields, "surrogates": [s.name for s in surrogates],
                "surrogate_folders": [s.folder for s in surrogates], "steps": config.n_steps,
                "epsilon_255": config.epsilon_255, "white_box": any(s.white_box for s in surrogates),
                "eot_transforms": "service crop/resize (differentiable) + JPEG (straight-through) + mirror",
                "service": asdict(RenderSettings())}
    hardener = Hardener(config, surrogates)
    crafted = _universal_pattern(refs, Path(out), settings, hardener, progress) if config.method in UNIVERSAL else None
    summary = derive_pool(refs, out, settings, hardener, progress=progress,
                          desc=f"hardening ({config.method}, eps {config.epsilon_255}/255)", **derive_options)
    if crafted is not None:  # the defender's one-off cost, beside the per-image seconds derive_pool sums
        path = Path(summary.files["summary"])
        write_json_atomic(path, {**json.loads(path.read_text()), **crafted,
                                 "crafting_seconds_per_image": round(crafted["crafting_seconds"] / max(1, summary.written), 4)})
    return summary


def _universal_pattern(refs: Sequence, out: Path, settings: dict, hardener: Hardener, progress: bool) -> dict:
    """Craft (or, on a resumed run, reload) the one pattern, on crafting images that are not in the pool."""
    from asirra.cache import content_key
    from asirra.data import scan
    from asirra.images import UnusableImage, load_image

    config = hardener.config
    claim_folder(out, settings)  # refuses a folder made otherwise before any crafting time is spent
    pattern_path, info_path = out / PATTERN_FILE, out / "universal-crafting.json"
    if pattern_path.exists() and info_path.exists():
        hardener.pattern = torch.from_numpy(np.load(pattern_path))
        return json.loads(info_path.read_text())
    try:
        candidates = scan(config.crafting, labelled=True)
    except DataError as exc:
        raise HardenError(f"crafting set {config.crafting}: {exc}") from None
    pool_keys = set()
    for ref in refs:
        try:
            pool_keys.add(content_key(ref.read_bytes()))
        except OSError:
            continue
    random.Random(f"{config.seed}:crafting").shuffle(candidates)
    start = time.perf_counter()
    images, labels, overlap = [], [], 0
    for ref in candidates:
        if len(images) == config.crafting_limit:
            break
        data = ref.read_bytes()
        if content_key(data) in pool_keys:  # a crafting image must never be a scored one
            overlap += 1
            continue
        try:
            images.append(np.asarray(load_image(data), dtype=np.uint8))
        except UnusableImage:
            continue
        labels.append(ref.label)
    if not images:
        raise HardenError(f"crafting set {config.crafting} has no usable image outside the pool")
    pattern = hardener.craft_universal(images, labels, progress=progress)
    info = {"crafting_images": len(images), "crafting_skipped_in_pool": overlap,
            "crafting_seconds": round(time.perf_counter() - start, 2), "pattern_side": PATTERN_SIDE,
            "pattern_file": PATTERN_FILE, "pattern_linf_255": round(float(pattern.abs().max()), 3)}
    with atomic_path(pattern_path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, pattern.numpy())
    write_json_atomic(info_path, info)
    return info
