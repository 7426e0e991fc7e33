"""The study's photos: only photos the model under attack never trained on, made by a command, checked on use.

A figure measured on a photo that trained the shipped model says how well it remembers, not how
well it reads. The shipped model's run folder records its validation split as content keys
(`split.json["val"]`, asirra.runs.content_key of the file bytes), so the rule is checkable:

- `make_pool` (`asirra captcha pool`) hashes every labelled file of a data set and links, under its
  own name, each one whose content is in the validation split (on duplicate content the first
  name wins), then writes `pool.json`: the rule, the split file's key, one [name, key, label] row
  per photo. Rerunning it is a no-op; another data set or split into the same folder is refused.
- `load_pool` hashes the folder's files again (2 s for 3,800 photos) and refuses, in one line, a
  pool holding any photo outside the split: what the study calls before it scores anything.
- `partition` splits the pool into disjoint roles by content key (a photo with two names can hold
  one role only): the defender's surrogate set (fixed across seeds: the defender hardens its pool
  once), and per seed the scored set and the attacker's pool, whose label budgets are nested,
  stratified prefixes of one seeded order (300 of them are in the 1,000, which are in the 3,000).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from asirra.errors import ConfigError
from asirra.fileio import write_json_atomic
from asirra.labels import CLASS_NAMES
from asirra.runs import content_key, file_key

POOL_FILE = "pool.json"
POOL_RULE = ("every labelled photo of DATA whose content key (blake2b-16 of the file bytes) is in the split "
             "file's \"val\" list; on duplicate content the first name (sorted) is kept")


class PoolError(ConfigError):
    """A pool the study must not use (photos that trained the model under attack), or cannot make."""


@dataclass(frozen=True)
class PoolPhoto:
    """One photo of a pool: the ImageRef to read it, its content key and label."""

    ref: object
    key: str

    @property
    def label(self) -> int:
        return self.ref.label

    @property
    def name(self) -> str:
        return self.ref.name


def default_split_file() -> Path:
    from asirra.models import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR / "split.json"


def validation_keys(split_file: str | os.PathLike) -> set[str]:
    path = Path(split_file)
    try:
        keys = json.loads(path.read_text())["val"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PoolError(f"{path} is not a split file with a \"val\" list of content keys ({exc})") from None
    return set(keys)


def _hashed(refs: Sequence, progress: bool) -> list[PoolPhoto]:
    return [PoolPhoto(ref, content_key(ref.read_bytes()))
            for ref in tqdm(refs, desc="hashing photos", unit="img", disable=not progress, leave=False)]


def make_pool(data: str | os.PathLike, out: str | os.PathLike, split_file: str | os.PathLike | None = None,
              limit: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Link the validation photos of `data` into `out` and record them in out/pool.json -> the record."""
    from asirra.data import scan
    from asirra.stats import stratified_subset

    split_file = Path(split_file or default_split_file())
    val = validation_keys(split_file)
    seen, kept = set(), []
    for photo in _hashed(scan(data, labelled=True), progress):
        if photo.key in val and photo.key not in seen:
            seen.add(photo.key)
            kept.append(photo)
    if limit:
        kept = [kept[i] for i in stratified_subset(np.array([p.label for p in kept]), limit, seed)]
    if not kept:
        raise PoolError(f"none of the labelled photos in {data} is in {split_file}'s validation split")
    rows = [[p.name, p.key, CLASS_NAMES[p.label]] for p in kept]
    record = {"rule": POOL_RULE, "split_file": str(split_file), "split_key": file_key(split_file),
              "limit": limit, "seed": seed if limit else None, "photos": len(rows), "rows": rows}
    out = Path(out)
    existing = out / POOL_FILE
    if existing.exists():
        before = json.loads(existing.read_text())
        if before.get("rows") != rows or before.get("split_key") != record["split_key"]:
            raise PoolError(f"{out} holds another pool (other photos or another split); choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise PoolError(f"{out} is not empty and holds no {POOL_FILE}; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for photo in kept:
        link = out / photo.name
        if not link.exists():
            link.symlink_to(Path(photo.ref.source).resolve())
    write_json_atomic(existing, record)
    return record


def load_pool(folder: str | os.PathLike, split_file: str | os.PathLike | None = None,
              progress: bool = True) -> list[PoolPhoto]:
    """Every photo of `folder`, hashed now, after checking that none of them trained the model under attack.

    Refused: a photo whose content is not in the split's validation list; a folder whose pool.json
    (when there is one) no longer describes its files (a photo changed or was swapped since).
    """
    from asirra.data import scan

    split_file = Path(split_file or default_split_file())
    val = validation_keys(split_file)
    photos = _hashed(scan(folder, labelled=True), progress)
    outside = [p for p in photos if p.key not in val]
    if outside:
        raise PoolError(f"{len(outside):,} of {len(photos):,} pool photos trained the model under attack (not in "
                        f"{split_file} \"val\"; e.g. {outside[0].name}); make the pool with `asirra captcha pool`")
    record_path = Path(folder) / POOL_FILE
    if record_path.exists():
        recorded = {name: key for name, key, _ in json.loads(record_path.read_text())["rows"]}
        changed = [p.name for p in photos if recorded.get(p.name) != p.key]
        if changed:
            raise PoolError(f"{len(changed)} photos of {folder} differ from its {POOL_FILE} (e.g. {changed[0]}); "
                            "make the pool again with `asirra captcha pool`")
    unique, seen = [], set()
    for photo in photos:  # the same content under two names holds one role only
        if photo.key not in seen:
            seen.add(photo.key)
            unique.append(photo)
    return unique


# ---- roles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roles:
    """One seed's photos by role; disjoint by content key. `attacker` is in budget order (any prefix
    of an even length is stratified)."""

    seed: int
    surrogate: list
    scored: list
    attacker: list

    def budget(self, n: int) -> list:
        return self.attacker[:n]

    def to_json(self) -> dict:
        return {"seed": self.seed, **{role: [[p.name, p.key, p.label] for p in getattr(self, role)]
                                      for role in ("surrogate", "scored", "attacker")}}


def _class_orders(photos: Sequence[PoolPhoto], rng: np.random.Generator) -> dict[int, list]:
    by_label: dict[int, list] = {}
    for photo in sorted(photos, key=lambda p: p.key):  # an order that does not depend on names or folders
        by_label.setdefault(photo.label, []).append(photo)
    return {label: [members[i] for i in rng.permutation(len(members))] for label, members in sorted(by_label.items())}


def _interleaved(orders: dict[int, list], n: int) -> list:
    """n photos, alternating classes (so every even prefix holds as many of each)."""
    out = []
    for i in range(max(len(m) for m in orders.values())):
        for members in orders.values():
            if i < len(members) and len(out) < n:
                out.append(members[i])
    return out


def partition(photos: Sequence[PoolPhoto], seed: int, scored: int, attacker: int, surrogate: int,
              surrogate_seed: int = 0) -> Roles:
    """The surrogate set (drawn by `surrogate_seed`, the same for every seed), then this seed's scored set
    and attacker pool from the rest; every role stratified, every role disjoint."""
    labels = sorted({p.label for p in photos})
    if len(labels) != 2:
        raise PoolError("the pool needs both cats and dogs")
    if scored % 2 or surrogate % 2 or attacker % 2:
        raise PoolError("role sizes must be even (half of each class)")
    counts = {label: sum(p.label == label for p in photos) for label in labels}
    need = (scored + attacker + surrogate) // 2
    if min(counts.values()) < need:
        raise PoolError(f"the pool has {min(counts.values())} photos of its smaller class; {surrogate} surrogate + "
                        f"{scored} scored + {attacker} attacker photos need {need} of each")
    defender = _class_orders(photos, np.random.default_rng([surrogate_seed, 17]))
    surrogate_set = [p for members in defender.values() for p in members[: surrogate // 2]]
    taken = {p.key for p in surrogate_set}
    rest = [p for p in photos if p.key not in taken]
    orders = _class_orders(rest, np.random.default_rng([seed, 71]))
    scored_set = [p for members in orders.values() for p in members[: scored // 2]]
    attacker_orders = {label: members[scored // 2:] for label, members in orders.items()}
    return Roles(seed, sorted(surrogate_set, key=lambda p: p.name), sorted(scored_set, key=lambda p: p.name),
                 _interleaved(attacker_orders, attacker))
