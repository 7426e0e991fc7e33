"""Which images train and which validate: stratified splits and subsets, recorded by content.

A split is saved as content keys (asirra.cache.content_key), not file names, so it survives
renames and copies: evaluation, the demo and a resumed run all find "the validation images of
run X" in any folder holding the same photos.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from asirra.fileio import write_json_atomic


def stratified_split(labels, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) positions with each class's share kept in both."""
    from sklearn.model_selection import train_test_split

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, stratify=np.asarray(labels), random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


def stratified_subset(labels, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a stratified random `limit` of the images (all of them when limit is None)."""
    if not limit or limit >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=np.asarray(labels), random_state=seed)
    return np.sort(keep)


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
        raise ValueError(f"no split.json at {split_file}: pass a training run folder")
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
    print(f"{len(dropped)} images duplicate another image's content and were dropped")
    return replace(cached, refs=[cached.refs[i] for i in keep], rows=cached.rows[keep],
                   keys=[cached.keys[i] for i in keep], unusable=cached.unusable + dropped)


def evaluation_sample(refs, split_file: Path | None = None, limit: int | None = None, seed: int = 0) -> list:
    """What an evaluation scores: a run's validation images (with `split_file`), then a stratified `limit` of them."""
    if split_file is not None:
        refs = validation_refs(refs, split_file)
    return [refs[i] for i in stratified_subset([r.label for r in refs], limit, seed)]
