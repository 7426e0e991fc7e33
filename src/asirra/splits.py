"""Which images train and which validate: stratified splits and subsets, recorded by content.

A split is saved as content keys (asirra.cache.content_key), not file names, so it survives
renames and copies: evaluation, the demo and a resumed run all find "the validation images of
run X" in any folder holding the same photos.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from asirra.errors import ConfigError, DataError
from asirra.fileio import write_json_atomic
from asirra.stats import stratified_subset

log = logging.getLogger(__name__)


def stratified_split(labels, val_fraction: float, seed: int,
                     classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) positions with each class's share kept in both.

    `classes` names the labels (default: "0", "1", ... up to the largest label); a class with too
    few images to split, or one the split leaves out of either side, is a DataError naming it.
    """
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    classes = _names(labels, classes)
    check_class_counts(labels, classes, 2, "to split into training and validation")
    index = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(index, test_size=val_fraction, stratify=labels, random_state=seed)
    except ValueError as exc:  # e.g. fewer validation images than classes
        raise DataError(f"cannot split {len(labels)} images of {len(classes)} classes with a validation share of "
                        f"{val_fraction:g} ({exc})") from None
    for side, positions in (("validation", val_idx), ("training", train_idx)):
        missing = np.setdiff1d(np.arange(len(classes)), labels[positions])
        if len(missing):
            c = int(missing[0])
            share = val_fraction if side == "validation" else 1 - val_fraction
            raise DataError(f"class {classes[c]!r} has no {side} images: it has {int((labels == c).sum())}, and a "
                            f"{side} share of {share:g} needs at least {math.ceil(1 / share)} per class")
    return np.sort(train_idx), np.sort(val_idx)


def check_class_counts(labels, classes: Sequence[str], needed: int, why: str) -> None:
    """DataError naming the first class with fewer than `needed` images (its count and the need)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    for name, count in zip(classes, counts):
        if count < needed:
            raise DataError(f"class {name!r} has {count} image{'' if count == 1 else 's'}; "
                            f"at least {needed} per class are needed {why}")


def _names(labels: np.ndarray, classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is not None:
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataError(f"labels outside 0..{len(classes) - 1} for the {len(classes)} classes {list(classes)}")
        return tuple(classes)
    return tuple(str(i) for i in range(max(2, int(labels.max()) + 1 if len(labels) else 2)))


def save_split(run: Path, cached, train_idx, val_idx) -> None:
    write_json_atomic(Path(run) / "split.json", {
        "train": [cached.keys[i] for i in train_idx],
        "val": [cached.keys[i] for i in val_idx],
        "val_names": [cached.refs[i].name for i in val_idx],
    })


def load_split(run: Path, cached) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the train and validation images of a run, matched by content key."""
    split = json.loads((Path(run) / "split.json").read_text())
    where = {key: i for i, key in enumerate(cached.keys)}

    def positions(keys):
        return np.array([where[k] for k in keys if k in where], dtype=np.int64)

    return positions(split["train"]), positions(split["val"])


def validation_refs(refs, split_file: Path) -> list:
    """The refs whose content is in a run's validation split (content keys survive renames)."""
    from asirra.cache import content_key
    from asirra.images import UnusableImage

    if not Path(split_file).is_file():
        raise ConfigError(f"no split.json at {split_file}: pass a training run folder")
    keys = set(json.loads(Path(split_file).read_text())["val"])
    kept = []
    for ref in refs:
        try:
            if content_key(ref.read_bytes()) in keys:
                kept.append(ref)
        except (OSError, UnusableImage):
            continue  # unreadable now: evaluation would skip it anyway
    return kept


def drop_duplicate_content(cached):
    """Keep the first of byte-identical images, so no photo sits in both training and validation."""
    first = {}
    for i, key in enumerate(cached.keys):
        first.setdefault(key, i)
    keep = np.array(sorted(first.values()), dtype=np.int64)
    if len(keep) == len(cached):
        return cached
    dropped = [{"path": cached.refs[i].source, "reason": f"same content as {cached.refs[first[k]].name}"}
               for i, k in enumerate(cached.keys) if first[k] != i]
    log.info(f"{len(dropped)} images duplicate another image's content and were dropped")
    return replace(cached, refs=[cached.refs[i] for i in keep], rows=cached.rows[keep],
                   keys=[cached.keys[i] for i in keep], unusable=cached.unusable + dropped)


def evaluation_sample(refs, split_file: Path | None = None, limit: int | None = None, seed: int = 0) -> list:
    """What an evaluation scores: a run's validation images (with `split_file`), then a stratified `limit` of them."""
    if split_file is not None:
        refs = validation_refs(refs, split_file)
    return [refs[i] for i in stratified_subset([r.label for r in refs], limit, seed)]
