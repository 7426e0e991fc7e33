"""The defender's side of the study: the surrogate it hardens against and its hardened pool, each cached by
the content of its inputs (asirra.runs.input_key) so a killed run continues and a changed input recomputes.

The pool is hardened once per setting, not once per seed: `hardened` photos (outside the surrogate's
set, stratified, in one order drawn by the surrogate seed) are hardened photo by photo (each photo's
noise depends on its content, the settings and the surrogate only), and every seed draws its scored
set and attacker pool from them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from asirra.captcha.experiments.pool import PoolPhoto, _class_orders, _interleaved
from asirra.captcha.experiments.study.plan import StudyConfig, StudyError
from asirra.labels import CLASS_NAMES
from asirra.runs import Key, KeyedCache, input_key

log = logging.getLogger(__name__)

SURROGATE_VERSION = 1
HARDEN_VERSION = 1


def photos_input(photos) -> list:
    """Photos as a key sees them: content and label, in a canonical order."""
    return sorted([p.key, int(p.label)] for p in photos)


def link_photos(folder: Path, photos) -> Path:
    """A Kaggle-named folder of links to `photos` (their own names), for commands that read folders."""
    folder.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        target = folder / photo.name
        if not target.exists() and not target.is_symlink():
            target.symlink_to(Path(photo.ref.source).resolve())
    return folder


def surrogate_photos(photos: list[PoolPhoto], config: StudyConfig) -> list[PoolPhoto]:
    from asirra.captcha.experiments.pool import partition

    return partition(photos, seed=0, scored=0, attacker=0, surrogate=config.surrogate_images,
                     surrogate_seed=config.surrogate_seed).surrogate


def hardened_photos(photos: list[PoolPhoto], config: StudyConfig) -> list[PoolPhoto]:
    """The photos hardened at every setting: a stratified `hardened` of those outside the surrogate's set."""
    taken = {p.key for p in surrogate_photos(photos, config)}
    rest = [p for p in photos if p.key not in taken]
    orders = _class_orders(rest, np.random.default_rng([config.surrogate_seed, 23]))
    if min(len(m) for m in orders.values()) < config.hardened // 2:
        raise StudyError(f"the pool has {len(rest)} photos outside the surrogate's {config.surrogate_images}; "
                         f"--hardened {config.hardened} needs {config.hardened // 2} of each class")
    return _interleaved(orders, config.hardened)


def _pretrained_weights(model: str) -> Path | None:
    from asirra.models import _lite_weights_file, pretrained_models

    if model not in pretrained_models():
        return None
    return Path(_lite_weights_file(model.removeprefix("effnet-")))


def surrogate_key(photos: list[PoolPhoto], config: StudyConfig) -> Key:
    return input_key("surrogate", version=SURROGATE_VERSION, photos=photos_input(photos), model=config.surrogate,
                     epochs=config.surrogate_epochs, seed=config.surrogate_seed,
                     weights=_pretrained_weights(config.surrogate))


def train_surrogate(cache: KeyedCache, photos: list[PoolPhoto], config: StudyConfig) -> tuple[Key, Path]:
    """The defender's surrogate (an EfficientNet-Lite linear probe, or seed-cnn from scratch) -> (key, model folder)."""
    from asirra.config import Schedule, Strategy, TrainConfig
    from asirra.models import resolve_model_folder
    from asirra.training import train

    key = surrogate_key(photos, config)
    folder = cache.folder(key)
    if cache.done(key):
        cache.reused(key)
        return key, resolve_model_folder(folder / "run")
    cache.note_miss(key, "surrogate")
    data = link_photos(folder / "photos", photos)
    scratch = config.surrogate == "seed-cnn"
    run = folder / "run"
    train(TrainConfig(data=str(data), out=str(run), model=config.surrogate,
                      strategy=Strategy.scratch if scratch else Strategy.linear, views=1,
                      epochs=config.surrogate_epochs, schedule=Schedule.cosine, weight_decay=1e-4,
                      seed=config.surrogate_seed, workers=1), resume=(run / "checkpoint.pt").exists())
    cache.finish(key)
    return key, resolve_model_folder(run)


def harden_config(config: StudyConfig, eps: int, surrogate_folder: Path):
    from asirra.captcha.defend.config import HardenConfig

    return HardenConfig(method=config.method, epsilon=eps / 255, surrogates=(str(surrogate_folder),),
                        steps=config.steps, eot=config.eot, seed=config.surrogate_seed, bf16=config.bf16)


def harden_key(config: StudyConfig, eps: int, surrogate: Key) -> Key:
    settings = asdict(harden_config(config, eps, Path(".")))
    del settings["surrogates"]  # a folder path; the surrogate's key names its content
    return input_key("harden", version=HARDEN_VERSION, settings=settings, surrogate=surrogate)


def harden(cache: KeyedCache, photos: list[PoolPhoto], config: StudyConfig, eps: int, surrogate: tuple[Key, Path],
           progress: bool = True) -> dict[str, dict]:
    """Harden `photos` at eps (resumable, photo by photo) -> {original content key: manifest record}.

    The folder is keyed by the settings and the surrogate only: asking for more photos later
    hardens just those (each photo's noise depends on its content, the settings and the surrogate)."""
    from asirra.captcha.defend.derived_pool import read_manifest
    from asirra.captcha.defend.harden import harden_pool, load_surrogate

    key = harden_key(config, eps, surrogate[0])
    folder = cache.folder(key) / "pool"
    records = {r.get("original_key"): r for r in read_manifest(folder).values()} if folder.exists() else {}
    todo = [p for p in photos if p.key not in records]
    if todo:
        cache.note_miss(key, f"harden-e{eps}")
        harden_pool([p.ref for p in photos], folder, harden_config(config, eps, surrogate[1]),
                    [load_surrogate(str(surrogate[1]))], progress=progress)
        records = {r.get("original_key"): r for r in read_manifest(folder).values()}
    else:
        cache.reused(key)
    missing = [p.name for p in photos if p.key not in records or "file" not in records[p.key]]
    if missing:
        raise StudyError(f"{len(missing)} photos could not be hardened (e.g. {missing[0]}); see {folder}")
    for record in records.values():
        record["path"] = str(folder / record["file"]) if "file" in record else None
    return records


def prepare(pool_folder, out, config: StudyConfig, split_file=None, progress: bool = True) -> dict:
    """Pool check, surrogate, hardened pools: the defender's work, in the study's cache under OUT/cache."""
    from asirra.captcha.experiments.pool import load_pool

    cache = KeyedCache(Path(out) / "cache")
    photos = load_pool(pool_folder, split_file, progress=progress)
    surrogate = train_surrogate(cache, surrogate_photos(photos, config), config)
    hardened = hardened_photos(photos, config)
    pools = {eps: harden(cache, hardened, config, eps, surrogate, progress) for eps in config.epsilons if eps}
    return {"cache": cache, "photos": photos, "surrogate": surrogate, "hardened": hardened, "pools": pools}


def labels_json(photos) -> list:
    return [[p.name, CLASS_NAMES[p.label]] for p in photos]


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))
