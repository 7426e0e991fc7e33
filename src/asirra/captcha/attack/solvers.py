"""What a bot answers with, beyond one classifier: a classifier behind its own counter-move, a stacked
ensemble, and a lookup table of photos seen before. Each has `.solve(images) -> [is a cat]`, as the bot
(asirra.captcha.attack.bot) asks, and `load_solver` reads any of them from the folder the ladder wrote.

The lookup attack needs no model: the service re-encodes every serving with a fresh crop, size and
quality, so the bytes never repeat, but a small thumbnail of the photo's centre barely moves. A
served image whose nearest thumbnail in the table is clearly nearer than the second nearest (the
ratio test) is answered with that photo's label; any other is passed to a fallback (a classifier,
or a farm that sells the label, after which the table knows it).
"""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from asirra.captcha.attack.counter import Pipeline, parse_preprocess
from asirra.errors import ConfigError
from asirra.images import load_image

SOLVER_FILE = "solver.json"  # in a rung's folder: how to answer with what is in it
THUMB_SIDE = 12
THUMB_CENTRE = 0.84  # the service trims at most 6% of each edge (rendering.RenderSettings.max_crop)
MATCH_RATIO = 0.7  # accept the nearest photo when its distance is under this share of the second nearest's...
# ...and under this L2 distance (0..255 per channel): two servings of one photo were at most 852 apart and at
# median 297, the nearest other photo at least 581 (600 photos of the pool), so a small table cannot pass a
# stranger off as a photo it knows; a known photo's rare far serving is bought again, not misread.
MATCH_DISTANCE = 600.0


class SolverError(ConfigError):
    """A solver folder that cannot be read."""


def thumbnail(source) -> np.ndarray:
    """A 12x12 box-filtered thumbnail of the central 84% of an image (bytes, path or PIL), float32 (432,)."""
    image = load_image(source) if not isinstance(source, Image.Image) else source.convert("RGB")
    w, h = image.size
    margin = (1 - THUMB_CENTRE) / 2
    crop = image.crop((margin * w, margin * h, (1 - margin) * w, (1 - margin) * h))
    return np.asarray(crop.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), dtype=np.float32).ravel()


class MovedSolver:
    """A classifier that sees each served image through its own counter-move first."""

    def __init__(self, classifier, pipeline: Pipeline):
        self.classifier, self.pipeline = classifier, pipeline
        self.name = f"{getattr(classifier, 'name', 'model')}+{pipeline.spec}"
        self.backend = getattr(classifier, "backend", None)

    def logits(self, images: Sequence) -> np.ndarray:
        moved = self.pipeline.apply_all(list(images))
        return self.classifier.logits(self.classifier.pixels(moved))

    def solve(self, images: Sequence) -> list[bool]:
        return [bool(z < 0) for z in self.logits(images)]  # logit P(dog) < 0: a cat


class EnsembleSolver:
    """Stacked members: cat iff bias + sum of weight x member logit (P(dog)) is below 0."""

    def __init__(self, members: Sequence[MovedSolver], weights: Sequence[float], bias: float):
        self.members, self.weights, self.bias = list(members), np.asarray(weights, np.float64), float(bias)
        self.name = "ensemble(" + ", ".join(m.name for m in self.members) + ")"
        self.backend = None

    def logits(self, images: Sequence) -> np.ndarray:
        return self.bias + sum(w * m.logits(images) for w, m in zip(self.weights, self.members))

    def solve(self, images: Sequence) -> list[bool]:
        return [bool(z < 0) for z in self.logits(images)]


class LookupSolver:
    """Answers from a table of thumbnails -> labels (1 = dog); what the table does not know goes to `fallback`.

    `fallback(image) -> is a cat` is a classifier's answer or a farm's; with `learn`, every answer the
    fallback gave joins the table (a farm's label is as good as the truth). `looked_up` and `fell_back`
    count the images each way.
    """

    def __init__(self, thumbs: np.ndarray | None = None, labels: np.ndarray | None = None,
                 fallback: Callable[[bytes], bool] | None = None, learn: bool = False, ratio: float = MATCH_RATIO):
        self.thumbs = np.zeros((0, THUMB_SIDE * THUMB_SIDE * 3), np.float32) if thumbs is None else np.asarray(thumbs, np.float32)
        self.labels = np.zeros(0, np.int64) if labels is None else np.asarray(labels, np.int64)
        self.fallback, self.learn, self.ratio = fallback, learn, ratio
        self.looked_up = self.fell_back = 0
        self.name, self.backend = "lookup", None

    def match(self, thumb: np.ndarray) -> int | None:
        """The table row the thumbnail is, or None when the ratio test is not passed."""
        if len(self.thumbs) == 0:
            return None
        distances = np.sqrt(((self.thumbs - thumb) ** 2).sum(axis=1))
        nearest = int(np.argmin(distances))
        if distances[nearest] >= MATCH_DISTANCE:
            return None
        if len(distances) == 1:
            return nearest
        second = np.partition(distances, 1)[1]
        return nearest if distances[nearest] < self.ratio * second else None

    def solve(self, images: Sequence) -> list[bool]:
        answers = []
        for image in images:
            thumb = thumbnail(image)
            row = self.match(thumb)
            if row is not None:
                self.looked_up += 1
                answers.append(bool(self.labels[row] == 0))
                continue
            if self.fallback is None:
                raise SolverError("the lookup table does not know an image and has no fallback")
            self.fell_back += 1
            is_cat = bool(self.fallback(image))
            answers.append(is_cat)
            if self.learn:
                self.thumbs = np.vstack([self.thumbs, thumb[None]])
                self.labels = np.append(self.labels, 0 if is_cat else 1)
        return answers


def load_solver(folder: str | Path | None, backend: str = "auto"):
    """What a ladder rung's folder answers with (its solver.json), or the classifier of a model folder."""
    from asirra.predict import load_classifier

    if folder is None or not (Path(folder) / SOLVER_FILE).exists():
        return load_classifier(folder, backend=backend)
    folder = Path(folder)
    spec = json.loads((folder / SOLVER_FILE).read_text())

    def member(entry: dict) -> MovedSolver:
        model = entry.get("model")
        return MovedSolver(load_classifier(None if model is None else folder / model, backend=backend),
                           parse_preprocess(entry.get("move", "none")))

    kind = spec.get("kind")
    if kind == "classifier":
        return member(spec)
    if kind == "ensemble":
        return EnsembleSolver([member(m) for m in spec["members"]], [m["weight"] for m in spec["members"]], spec["bias"])
    if kind == "lookup":
        table = np.load(folder / spec["table"])
        fallback = load_solver(folder / spec["fallback"], backend) if spec.get("fallback") else None
        return LookupSolver(table["thumbs"], table["labels"],
                            (lambda image: fallback.solve([image])[0]) if fallback else None, ratio=spec["ratio"])
    raise SolverError(f"{folder / SOLVER_FILE}: unknown solver kind {kind!r}")


def write_solver(folder: Path, spec: dict) -> Path:
    from asirra.fileio import write_json_atomic

    return write_json_atomic(Path(folder) / SOLVER_FILE, spec)


def decode_rgb(data: bytes) -> Image.Image:
    return Image.open(BytesIO(data)).convert("RGB")
