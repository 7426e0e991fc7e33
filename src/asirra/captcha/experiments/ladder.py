"""The attacker ladder: model folders for `asirra attack --model`, from the shipped model to adaptive attackers.

Rungs, weakest knowledge first:
- shipped: the model asirra ships (nothing is built);
- seed-cnn-alt, lite2-probe: models the defender never used (its surrogates are seed-cnn and
  effnet-lite0 by the defender's recipe), trained on clean labelled photos;
- adv-trained, passed-challenges: adaptive attackers of the first study. They know the method but not
  the defender's surrogates, and learn from images *as served* (the service's crop, resize and
  JPEG re-encoding, and any hardening of its pool): fetched over HTTP when a service URL is given,
  else rendered with the service's own re-encoding (`asirra.captcha.rendering`) from the pool.
- bought-labels, bought-aug, residual, finetune, ensemble, self-trained, lookup: the top of the ladder
  (asirra.captcha.experiments.rungs), each learning from labels bought for served images; their
  folder's solver.json says how to answer (asirra.captcha.attack.solvers.load_solver).

Labels an attacker could buy from a solving farm come from the truth (it stands in for the farm);
over HTTP a served image is matched back to its pool photo by a small thumbnail, the way a farm's
answer would be tied to the image it was shown. Each build writes `attacker.json` beside its model
(recipe, the pool ids it used, so evaluations can hold them out, the label cost, seconds) and is
reused when asked again with the same settings.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from io import BytesIO
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from asirra.captcha.experiments import rungs
from asirra.errors import ConfigError
from asirra.fileio import write_json_atomic
from asirra.labels import CAT, DOG
from asirra.runs import check_stamp
from asirra.stats import random_subset

log = logging.getLogger(__name__)

SHIPPED = "shipped"
ATTACKERS: dict[str, str] = {
    SHIPPED: "the model shipped with asirra (effnet-lite2 fine-tuned on 15,200 photos)",
    "seed-cnn-alt": "seed-cnn from scratch by another recipe than the defender's (96 px, widths 24/48/96, "
                    "dense 256, label smoothing, no rotation/shear augmentation)",
    "lite2-probe": "effnet-lite2 (another size than the defender's lite0 surrogate) linear probe on clean photos",
    "bought-labels": "effnet-lite2 linear probe on a few hundred served images labelled by a solving farm "
                     "($0.5-3 per thousand labels; the truth stands in for the farm)",
    "adv-trained": "adversarial training: probe A on served images, PGD eps 4/255 against A with the published "
                   "method (harden.Hardener), then a probe on clean + hardened",
    "passed-challenges": "attacks with the shipped model, keeps the challenges it passed (a pass labels all 12 "
                         "images) and trains an effnet-lite2 probe on them",
}
# The ladder the study climbs (issue 17): the attacker that does not adapt, then rungs that learn from
# bought labels of images as served, then the lookup attack.
RUNGS: dict[str, str] = {
    SHIPPED: ATTACKERS[SHIPPED],
    "bought-labels": "effnet-lite2 linear probe on one served rendering of each bought photo, every label in the fit",
    "bought-aug": "the same probe on two served renderings of each bought photo, their mirrors and the "
                  "jpeg:50+median:5 counter-move; predicts on the image and its mirror",
    "residual": "the same probe on the residual (image minus its 5x5 median, x8): the noise the label rides on",
    "finetune": "effnet-lite2's top block and head fine-tuned on the bought photos (the shipped model's recipe)",
    "ensemble": "stacked logits of the shipped model after jpeg:50+median:5, bought-aug and residual "
                "(weights fitted out of fold on the bought labels)",
    "self-trained": "bought-aug, refitted on its own passed challenges against a practice service (a pass "
                    "labels 12 images for free)",
    "lookup": "a table from served thumbnails to bought labels: a photo seen before is answered from the table",
}
ATTACKERS.update({name: text for name, text in RUNGS.items() if name not in ATTACKERS or name == "bought-labels"})
# The rungs that learn from the defended pool as served (a study builds them per hardening setting).
ADAPTIVE = ("bought-labels", "adv-trained", "passed-challenges", "bought-aug", "residual", "finetune", "ensemble",
            "self-trained", "lookup")
# Images each rung trains on unless told (`budget`): minutes on 2 shared cores.
DEFAULT_BUDGET = {"seed-cnn-alt": 2000, "lite2-probe": 600, "bought-labels": 300, "adv-trained": 120,
                  "passed-challenges": 300, "bought-aug": 1000, "residual": 1000, "finetune": 1000, "ensemble": 1000,
                  "self-trained": 1000, "lookup": 1000}
RECORD = "attacker.json"
PROBE_MODEL = "effnet-lite2"
MATCH_SIDE = 12  # thumbnail side for tying a served image back to its pool photo
MAX_WAIT = 120.0  # seconds of Retry-After a build waits out in all
PRACTICE_CHALLENGES = 200  # self-training's practice against a service


class LadderError(ConfigError):
    """An unknown rung, or inputs a rung cannot be built from."""


# ---- the public entry point ----------------------------------------------------------------


def build_attacker(name: str, out: str | Path, *, train_data: str | Path | None = None,
                   service_url: str | None = None, budget: int | None = None, seed: int = 0,
                   progress: bool = True) -> Path:
    """Build rung `name` in `out` (reused if already built with these settings) -> what `asirra attack --model`
    takes: the model folder of the older rungs, the rung's folder (its solver.json) for those of
    asirra.captcha.experiments.rungs."""
    from asirra.models import default_model_path, resolve_model_folder

    if name not in ATTACKERS:
        raise LadderError(f"unknown attacker {name!r}; choose one of {', '.join(ATTACKERS)}")
    if name == SHIPPED:
        return default_model_path()
    if train_data is None or not Path(train_data).exists():
        raise LadderError(f"attacker {name} needs a labelled pool to train on (--data), got {train_data}")
    if service_url is not None and not service_url.startswith(("http://", "https://")):
        raise LadderError(f"the service URL must start with http:// or https://, got {service_url!r}")
    budget = DEFAULT_BUDGET[name] if budget is None else budget
    if budget < 12:
        raise LadderError(f"budget must be at least 12 images, got {budget}")
    out = Path(out)
    settings = {"name": name, "train_data": str(Path(train_data).resolve()), "service_url": service_url,
                "budget": budget, "seed": seed}
    bought_rung = name in rungs.BUILDERS
    # Reused when already built with these settings; refused when built with others.
    if check_stamp(out, settings, RECORD, f"attacker ({name})", keys=settings) is not None:
        return out if bought_rung else resolve_model_folder(out / "model")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if bought_rung:
        extra = _bought_rung(name, out, Path(train_data), service_url, budget, seed, progress)
    else:
        extra = BUILDERS[name](out, Path(train_data), service_url, budget, seed, progress)
    record = {**settings, "description": ATTACKERS[name], **extra,
              "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(out / RECORD, record)
    log.info(f"attacker {name} built in {record['seconds']:.0f} s -> {out}")
    return out if bought_rung else resolve_model_folder(out / "model")


def _bought_rung(name: str, out: Path, data: Path, url: str | None, budget: int, seed: int, progress: bool) -> dict:
    """A rung of asirra.captcha.experiments.rungs from `budget` photos of the pool as served (two renderings each
    when rendered locally; as many as were served when fetched over HTTP), their members built first."""
    from asirra.cache import default_cache_dir
    from asirra.captcha.experiments.features import FeatureStore

    bought, used = _bought(out / "served", data, url, budget, seed, progress)
    ctx = rungs.RungContext(FeatureStore(default_cache_dir()), seed=seed, progress=progress)
    for member in rungs.NEEDS.get(name, ()):
        folder = out / "members" / member
        if rungs.built(folder) is None:
            rungs.build_rung(member, folder, bought, ctx)
        ctx.members[member] = folder
    if name == "self-trained":
        ctx.practice = lambda folder: _practise(folder, data, url, set(used), seed, progress)
    record = rungs.build_rung(name, out, bought, ctx)
    return {**record, "used": sorted(set(used))}


def _bought(folder: Path, data: Path, url: str | None, budget: int, seed: int,
            progress: bool) -> tuple[list, list[str]]:
    """(BoughtPhoto per bought pool photo, their names); the renderings kept in `folder` as Kaggle-named JPEGs."""
    from asirra.cache import content_key
    from asirra.data import scan

    refs = scan(data, labelled=True)
    if not refs:
        raise LadderError(f"no labelled images in {data}")
    by_name: dict[str, list[bytes]] = {}
    if url is None:
        from asirra.captcha.rendering import RenderSettings, render_jpeg

        settings = RenderSettings()
        for ref in tqdm(_pick(refs, budget, seed), desc="served images", disable=not progress, leave=False):
            image, rng = ref.load(draft_size=settings.image_side[1]), random.Random(f"{seed}:{ref.name}")
            by_name[ref.name] = [render_jpeg(image, rng, settings) for _ in range(2)]
    else:
        matcher = _Matcher(refs)
        with _Session(url) as session:
            while len(by_name) < budget:
                cid, images = session.challenge()
                matched = [matcher.match(jpeg) for jpeg in images]
                for jpeg, ref in zip(images, matched):
                    if ref.name in by_name or len(by_name) < budget:
                        by_name.setdefault(ref.name, []).append(jpeg)
                # The farm's answer is submitted, as a farm-backed bot would, so no challenge is left pending.
                session.answer(cid, [i for i, ref in enumerate(matched) if ref.label == CAT])
    label = {ref.name: ref.label for ref in refs}
    folder.mkdir(parents=True, exist_ok=True)
    bought = []
    for i, (name, copies) in enumerate(sorted(by_name.items())):
        bought.append(rungs.BoughtPhoto(content_key(copies[0]), label[name], copies))
        _write_labelled(folder, i, label[name], copies[0])
    return bought, sorted(by_name)


def _practise(folder: Path, data: Path, url: str | None, bought: set, seed: int, progress: bool) -> tuple[list, dict]:
    """Self-training's practice: the live service at `url`, else a local one serving the photos not bought."""
    from asirra.captcha.attack.solvers import load_solver

    if url is not None:
        return rungs.practise(url, PRACTICE_CHALLENGES, load_solver(folder), progress=progress)
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service.app import create_app
    from asirra.captcha.service.run import running
    from asirra.data import scan

    pool = [ref for ref in scan(data, labelled=True) if ref.name not in bought]
    if len(pool) < 12:
        raise LadderError(f"self-training needs at least 12 photos it did not buy to practise on; {data} has {len(pool)}")
    with running(create_app(pool, parse_safeguard("none"), rungs.open_settings(seed))) as local:
        return rungs.practise(local, PRACTICE_CHALLENGES, load_solver(folder), progress=progress)


def used_ids(out: str | Path) -> set[str]:
    """The pool photos (file names) a built attacker learnt from: hold them out when measuring it."""
    path = Path(out) / RECORD
    return set(json.loads(path.read_text()).get("used", [])) if path.exists() else set()


# ---- rungs ----------------------------------------------------------------------------------


def _seed_cnn_alt(out, data, url, budget, seed, progress) -> dict:
    from asirra.config import AugmentConfig, Schedule, Strategy, TrainConfig

    config = TrainConfig(data=str(data), out=str(out / "run"), model="seed-cnn", image_size=96,
                         model_options={"widths": [24, 48, 96], "dense": 256}, strategy=Strategy.scratch,
                         epochs=8, batch_size=32, lr=2e-3, label_smoothing=0.1, schedule=Schedule.cosine,
                         weight_decay=5e-4, augment=AugmentConfig(rotation_deg=0.0, shear=0.0, zoom=0.1, shift=0.05),
                         limit=budget, seed=seed + 101, workers=1)
    return _train_and_keep(config, out, used=_limited_names(data, budget, seed + 101))


def _lite2_probe(out, data, url, budget, seed, progress) -> dict:
    config = _probe_config(data, out / "run", seed + 202, limit=budget, views=2)
    return _train_and_keep(config, out, used=_limited_names(data, budget, seed + 202))


def _adv_trained(out, data, url, budget, seed, progress) -> dict:
    from asirra.captcha.defend.config import HardenConfig
    from asirra.captcha.defend.harden import harden_pool, load_surrogate
    from asirra.data import scan
    from asirra.models import resolve_model_folder

    served, used = _served_labelled(out / "served", data, url, budget, seed, progress)
    own = out / "own"  # the attacker's own model: the surrogate it hardens against
    if not (own / "model").exists():
        _train(_probe_config(served, own, seed))
    config = HardenConfig(method="pgd", epsilon=4 / 255, surrogates=(str(own),), seed=seed)
    harden_pool(scan(served), out / "hardened", config, surrogates=[load_surrogate(str(resolve_model_folder(own)))],
                progress=progress)
    both = out / "clean+hardened"
    _link_labelled(both, scan(served), offset=0)
    _link_labelled(both, scan(out / "hardened"), offset=1_000_000)
    extra = _train_and_keep(_probe_config(both, out / "run", seed), out, used=used)
    return {**extra, "hardening": {"method": "pgd", "epsilon_255": 4, "surrogate": "its own probe (out/own)"}}


def _passed_challenges(out, data, url, budget, seed, progress, solver=None) -> dict:
    from asirra.predict import load_classifier

    solver = solver or load_classifier(None)
    served = out / "served"
    kept, tried, passed = _passed(served, data, url, budget, seed, solver, progress)
    if passed == 0:
        raise LadderError(f"the shipped model passed none of {tried} challenges: nothing to train on")
    extra = _train_and_keep(_probe_config(served, out / "run", seed), out, used=kept)
    return {**extra, "challenges_tried": tried, "challenges_passed": passed, "images": passed * 12}


BUILDERS: dict[str, Callable] = {"seed-cnn-alt": _seed_cnn_alt, "lite2-probe": _lite2_probe,
                                 "adv-trained": _adv_trained, "passed-challenges": _passed_challenges}


# ---- training ------------------------------------------------------------------------------


def _probe_config(data: Path, run: Path, seed: int, limit: int | None = None, views: int = 1):
    from asirra.config import Schedule, Strategy, TrainConfig

    # The linear path caches the frozen backbone's activations: seconds per epoch once cached.
    return TrainConfig(data=str(data), out=str(run), model=PROBE_MODEL, strategy=Strategy.linear, views=views,
                       epochs=30, schedule=Schedule.cosine, weight_decay=1e-4, limit=limit, seed=seed, workers=1)


def _train(config) -> Path:
    from asirra.training import train

    run = Path(config.out)
    return train(config, resume=(run / "checkpoint.pt").exists())


def _train_and_keep(config, out: Path, used: Sequence[str]) -> dict:
    """Train (resuming), then keep the model as out/model; the run's validation figures go in the record."""
    run = _train(config)
    target = out / "model"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(Path(run) / "model", target)
    metrics = {}
    config_json = json.loads((target / "model.json").read_text())
    val = config_json.get("extra", {}).get("val")
    if val:
        metrics = {"val_accuracy": val.get("accuracy"), "val_n": val.get("n")}
    return {"used": sorted(set(used)), "model": config.model, "strategy": str(config.strategy.value),
            "train_images": len(set(used)), **metrics}


def _limited_names(data: Path, limit: int, seed: int) -> list[str]:
    """The names `TrainConfig(limit=...)` draws (the same stratified subset), for the record."""
    from asirra.data import scan
    from asirra.stats import stratified_subset

    refs = scan(data, labelled=True)
    return [refs[i].name for i in stratified_subset(np.array([r.label for r in refs]), limit, seed)]


# ---- images as served ----------------------------------------------------------------------


def _pick(refs: list, n: int, seed: int) -> list:
    return [refs[i] for i in random_subset(len(refs), n, seed)]


def _write_labelled(folder: Path, index: int, label: int, jpeg: bytes) -> None:
    path = folder / f"{'cat' if label == CAT else 'dog'}.{index}.jpg"
    tmp = path.with_suffix(".part")
    tmp.write_bytes(jpeg)
    tmp.replace(path)


def _served_labelled(folder: Path, data: Path, url: str | None, budget: int, seed: int,
                     progress: bool) -> tuple[Path, list[str]]:
    """`budget` served JPEGs with their labels in `folder` (Kaggle names) -> (folder, pool names used).

    Resumable: a finished folder (its `used.json` written) is reused."""
    from asirra.data import scan

    done = folder / "used.json"
    if done.exists():
        return folder, json.loads(done.read_text())
    refs = scan(data, labelled=True)
    if not refs:
        raise LadderError(f"no labelled images in {data}")
    folder.mkdir(parents=True, exist_ok=True)
    used: list[str] = []
    if url is None:
        from asirra.captcha.rendering import RenderSettings, render_jpeg

        settings, rng = RenderSettings(), random.Random(seed)
        for i, ref in enumerate(tqdm(_pick(refs, budget, seed), desc="served images", disable=not progress)):
            _write_labelled(folder, i, ref.label, render_jpeg(ref.load(draft_size=settings.image_side[1]), rng, settings))
            used.append(ref.name)
    else:
        matcher = _Matcher(refs)
        with _Session(url) as session:
            bar = tqdm(total=budget, desc="served images (HTTP)", disable=not progress)
            while len(used) < budget:
                cid, images = session.challenge()
                labels = [matcher.match(jpeg) for jpeg in images]
                for jpeg, ref in list(zip(images, labels))[: budget - len(used)]:
                    _write_labelled(folder, len(used), ref.label, jpeg)
                    used.append(ref.name)
                    bar.update(1)
                # The farm's answer is submitted, as a farm-backed bot would, so no challenge is left pending.
                session.answer(cid, [i for i, ref in enumerate(labels) if ref.label == CAT])
            bar.close()
    write_json_atomic(done, used)
    return folder, used


def _passed(folder: Path, data: Path, url: str | None, budget: int, seed: int, solver,
            progress: bool) -> tuple[list[str], int, int]:
    """Attack until `budget` images are labelled by passes (or 3x the attempts that needs) -> (names, tried, passed).

    Locally the challenge is drawn and re-encoded as the service does; over HTTP it is a live challenge
    and only the verdict is known, so the pool names are matched back for the record."""
    from asirra.captcha.challenge import count_mistakes, draw_challenge
    from asirra.data import scan

    refs = scan(data, labelled=True)
    if len(refs) < 12:
        raise LadderError(f"{data} has {len(refs)} labelled images; a challenge needs 12")
    folder.mkdir(parents=True, exist_ok=True)
    want = math.ceil(budget / 12)
    tried = passed = 0
    kept: list[str] = []
    bar = tqdm(total=want, desc="challenges passed", disable=not progress)
    if url is None:
        from asirra.captcha.rendering import RenderSettings, render_jpeg

        settings, rng, np_rng = RenderSettings(), random.Random(seed), np.random.default_rng(seed)
        session, matcher = None, None
    else:
        session, matcher = _Session(url), _Matcher(refs)
    try:
        while passed < want and tried < 3 * want:
            tried += 1
            if session is None:
                challenge = draw_challenge(refs, np_rng)
                images = [render_jpeg(r.load(draft_size=settings.image_side[1]), rng, settings) for r in challenge.refs]
            else:
                cid, images = session.challenge()
            cats = solver.solve(images)
            selected = [i for i, is_cat in enumerate(cats) if is_cat]
            if session is None:
                ok = count_mistakes(selected, challenge.answer) == 0
                names = [r.name for r in challenge.refs]
            else:
                ok = session.answer(cid, selected) == "pass"
                names = [matcher.match(jpeg).name for jpeg in images] if ok else []
            if not ok:
                continue
            for jpeg, is_cat, name in zip(images, cats, names):  # a pass: the bot's answers are the truth
                _write_labelled(folder, len(kept), CAT if is_cat else DOG, jpeg)
                kept.append(name)
            passed += 1
            bar.update(1)
    finally:
        bar.close()
        if session is not None:
            session.close()
    return kept, tried, passed


class _Matcher:
    """Ties a served JPEG to its pool photo: nearest small thumbnail of the centre (the service trims the edges)."""

    def __init__(self, refs: Sequence):
        self.refs = list(refs)
        self.thumbs = np.stack([self._thumb(r.load(draft_size=64)) for r in tqdm(self.refs, desc="indexing pool",
                                                                                  leave=False)])

    @staticmethod
    def _thumb(image: Image.Image) -> np.ndarray:
        w, h = image.size
        crop = image.convert("RGB").crop((0.08 * w, 0.08 * h, 0.92 * w, 0.92 * h))
        return np.asarray(crop.resize((MATCH_SIDE, MATCH_SIDE), Image.Resampling.BOX), dtype=np.float32).ravel()

    def match(self, jpeg: bytes):
        thumb = self._thumb(Image.open(BytesIO(jpeg)))
        return self.refs[int(np.argmin(((self.thumbs - thumb) ** 2).sum(axis=1)))]


class _Session:
    """A patient client of the public API: waits out Retry-After (up to MAX_WAIT in all)."""

    def __init__(self, url: str):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=30.0)
        self.waited = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.client.close()

    def _send(self, method: str, path: str, **kwargs):
        while True:
            response = self.client.request(method, path, **kwargs)
            if response.status_code in (429, 503):
                delay = float(response.headers.get("Retry-After", "1") or 1)
                if self.waited + delay > MAX_WAIT:
                    raise LadderError(f"the service kept refusing ({response.status_code}) beyond {MAX_WAIT:.0f} s of waiting")
                self.waited += delay
                time.sleep(delay)
                continue
            if response.status_code >= 400:
                raise LadderError(f"{method} {path}: HTTP {response.status_code}: {response.text[:200]}")
            return response

    def challenge(self) -> tuple[str, list[bytes]]:
        body = self._send("POST", "/api/challenge").json()
        return body["id"], [self._send("GET", url).content for url in body["images"]]

    def answer(self, cid: str, selected: list[int]) -> str:
        return self._send("POST", f"/api/challenge/{cid}/answer", json={"selected": selected}).json()["result"]


def _link_labelled(folder: Path, refs: Sequence, offset: int) -> None:
    """Copy labelled images into one Kaggle-named training folder, numbered from `offset` (two sources stay apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, ref in enumerate(refs):
        target = folder / f"{'cat' if ref.label == CAT else 'dog'}.{offset + i}{Path(ref.source).suffix}"
        if not target.exists():
            shutil.copyfile(ref.source, target)



