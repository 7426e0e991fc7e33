"""The top of the attacker ladder: attackers that buy labels for images as served and learn from them.

Every rung here starts from the same purchase, a `Bought` set: photos of the service's pool, each
with the label a solving farm sold for it (the truth stands in for the farm) and one or more of
its served renderings (the service re-renders on every request, so asking twice gives a second,
correctly distributed copy for free). Every bought label is in the final fit: no label is held
out, the recipes were fixed before any scored photo was looked at, and the scored photos are never
among the bought ones.

- bought-labels  a linear probe on the frozen ImageNet EfficientNet-Lite2, one rendering per photo
- bought-aug     the same on every rendering, their mirrors and the jpeg:50+median:5 counter-move of
                 the first; predicts on the image and its mirror
- residual       the same on the residual view (counter.residual: the image minus its 5x5 median, x8)
                 of every rendering and its mirror; answers through that view
- finetune       the top block and head fine-tuned on the renderings (`make model`'s recipe, cached
                 activations below the block), every label in the fit
- ensemble       the shipped model after jpeg:50+median:5, bought-aug and residual, stacked by a
                 logistic regression on out-of-fold logits of the bought photos (the shipped model
                 never trained on them: pool photos are outside its training split)
- self-trained   bought-aug refitted on the photos of its own passed challenges against a practice
                 service, labelled by its own answers (a pass means all 12 were right)
- lookup         a table of the renderings' thumbnails and labels (attack.solvers.LookupSolver)

A rung is a folder: `solver.json` says how to answer (attack.solvers.load_solver reads it, so
`asirra attack --model FOLDER` runs any rung), `head.npz` keeps a probe's read-out for the study's
feature-space scoring, and `attacker.json` records the recipe, labels bought and build seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from asirra.captcha.attack.solvers import thumbnail, write_solver
from asirra.captcha.experiments.features import FeatureStore, fit_head, save_probe
from asirra.fileio import write_json_atomic
from asirra.labels import CAT, CLASS_NAMES, DOG

log = logging.getLogger(__name__)

RECORD = "attacker.json"
HEAD = "head.npz"
PROBE_C = 0.1  # inverse L2 strength on standardised features, fixed before any scored photo was seen
AUG_MOVE = "jpeg:50,median:5"  # the harshest counter-move of the earlier study: the shipped model's best at eps 4
RESIDUAL_MOVE = "residual:8"
STACK_FOLDS = 5
LOOKUP_RATIO = 0.7


@dataclass
class BoughtPhoto:
    key: str  # the pool photo's content key
    label: int
    renderings: list  # served JPEG bytes (at least one)


@dataclass
class RungContext:
    store: FeatureStore
    seed: int = 0
    members: dict = field(default_factory=dict)  # rung name -> built folder (the ensemble's and self-training's inputs)
    # self-trained: (folder of the rung that practises) -> [(12 served JPEGs, its answers)] of passed challenges, and a record
    practice: Callable | None = None
    progress: bool = False


# ---- probes ---------------------------------------------------------------------------------------

# A probe's training rows: (which rendering, view) per bought photo; predict views are its read-out at attack time.
PROBES = {
    "bought-labels": {"train": [(0, "none")], "predict": ["none"], "move": "none"},
    "bought-aug": {"train": [("all", "none"), ("all", "none|mirror"), (0, AUG_MOVE)], "predict": ["none", "none|mirror"],
                   "move": "none"},
    "residual": {"train": [("all", RESIDUAL_MOVE), ("all", RESIDUAL_MOVE + "|mirror")],
                 "predict": [RESIDUAL_MOVE, RESIDUAL_MOVE + "|mirror"], "move": RESIDUAL_MOVE},
}


def probe_rows(bought: Sequence[BoughtPhoto], recipe: list) -> list[tuple[int, bytes, str]]:
    """(photo index, image bytes, view) of every training row of a probe recipe."""
    rows = []
    for i, photo in enumerate(bought):
        for which, view in recipe:
            renderings = photo.renderings if which == "all" else photo.renderings[which:which + 1]
            rows += [(i, data, view) for data in renderings]
    return rows


def probe_features(store: FeatureStore, rows: list, progress: bool = False) -> np.ndarray:
    out = np.zeros((len(rows), 1280), np.float32)
    for view in sorted({v for _, _, v in rows}):
        at = [j for j, r in enumerate(rows) if r[2] == view]
        out[at] = store.get([rows[j][1] for j in at], view, progress=progress)
    return out


def _fit_probe(name: str, bought, ctx: RungContext) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    recipe = PROBES[name if name in PROBES else "bought-aug"]
    rows = probe_rows(bought, recipe["train"])
    x = probe_features(ctx.store, rows, ctx.progress)
    y = np.array([bought[i].label for i, _, _ in rows])
    w, b = fit_head(x, y, PROBE_C, ctx.seed)
    return w, b, x, np.array([i for i, _, _ in rows])


def _save_probe_rung(out: Path, name: str, w, b, ctx: RungContext, extra: dict) -> dict:
    recipe = PROBES[name if name in PROBES else "bought-aug"]
    tta = len(recipe["predict"]) > 1
    save_probe(out / "model", ctx.store, w, b, tta=tta, extra={"rung": name, **extra})
    np.savez(out / HEAD, w=w, b=np.float32(b), views=np.array(recipe["predict"]))
    write_solver(out, {"kind": "classifier", "model": "model", "move": recipe["move"]})
    return {"predict_views": recipe["predict"], "move": recipe["move"]}


def build_probe(name: str, out: Path, bought, ctx: RungContext) -> dict:
    w, b, _, _ = _fit_probe(name, bought, ctx)
    return {**_save_probe_rung(out, name, w, b, ctx, {}), "train_rows": len(probe_rows(bought, PROBES[name]["train"])),
            "c": PROBE_C}


def head_logits(store: FeatureStore, folder: Path, images: Sequence[bytes], move: str = "none") -> np.ndarray:
    """A probe rung's logits P(dog) on served images, from stored features: the mean over its predict views,
    each view's counter-move replaced by `move` (the residual rung keeps its own)."""
    head = np.load(Path(folder) / HEAD)
    total = 0.0
    views = [str(v) for v in head["views"]]
    for view in views:
        spec, _, flip = view.partition("|")
        if not spec.startswith("residual"):
            spec = move
        total = total + store.get(list(images), spec + ("|" + flip if flip else "")) @ head["w"] + float(head["b"])
    return total / len(views)


# ---- fine-tuning -------------------------------------------------------------------------------------


def write_renderings(folder: Path, bought: Sequence[BoughtPhoto], first_only: bool = False) -> Path:
    """The renderings as a Kaggle-named training folder (cat.N.jpg / dog.N.jpg)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for photo in bought:
        for data in photo.renderings[:1] if first_only else photo.renderings:
            path = folder / f"{CLASS_NAMES[photo.label]}.{n}.jpg"
            if not path.exists():
                path.write_bytes(data)
            n += 1
    return folder


def build_finetune(out: Path, bought, ctx: RungContext, epochs: int = 6) -> dict:
    """`make model`'s recipe (top block + head on cached activations of 2 views) on the first rendering of
    every bought photo, every label in the fit: train_on with the whole set as its own "validation", so
    the kept epoch is the one with the lowest training loss (and the temperature, which changes no
    answer, is fitted on it)."""
    from asirra.config import Schedule, Strategy, TrainConfig
    from asirra.training import load_pixels, prepare_run, train_on

    data = write_renderings(out / "served", bought, first_only=True)
    run = out / "run"
    config = TrainConfig(data=str(data), out=str(run), model="effnet-lite2", strategy=Strategy.finetune, unfreeze=1,
                         views=2, epochs=epochs, schedule=Schedule.cosine, label_smoothing=0.1, weight_decay=1e-4,
                         patience=epochs + 1, seed=ctx.seed, workers=1)
    resume = (run / "checkpoint.pt").exists()
    run = prepare_run(config, resume)
    cached = load_pixels(config, run)
    everything = np.arange(len(cached))
    train_on(cached, everything, everything, config, run, resume=resume)
    if (out / "model").exists():
        shutil.rmtree(out / "model")
    shutil.copytree(run / "model", out / "model")
    write_solver(out, {"kind": "classifier", "model": "model", "move": "none"})
    return {"train_images": len(cached), "epochs": epochs, "move": "none"}


# ---- the ensemble ----------------------------------------------------------------------------------


def _out_of_fold(name: str, bought, ctx: RungContext) -> np.ndarray:
    """Each bought photo's logit from a probe fitted without it (grouped folds: a photo's renderings stay together),
    read out on its first rendering as the rung reads a served image."""
    recipe = PROBES[name]
    rows = probe_rows(bought, recipe["train"])
    x = probe_features(ctx.store, rows)
    y = np.array([bought[i].label for i, _, _ in rows])
    groups = np.array([i for i, _, _ in rows])
    firsts = [p.renderings[0] for p in bought]
    read = sum(ctx.store.get(firsts, v) for v in recipe["predict"]) / len(recipe["predict"])
    fold_of = np.random.default_rng(ctx.seed).permutation(len(bought)) % STACK_FOLDS
    logits = np.zeros(len(bought))
    for fold in range(STACK_FOLDS):
        train = fold_of[groups] != fold
        w, b = fit_head(x[train], y[train], PROBE_C, ctx.seed)
        held = fold_of == fold
        logits[held] = read[held] @ w + b
    return logits


def build_ensemble(out: Path, bought, ctx: RungContext) -> dict:
    from sklearn.linear_model import LogisticRegression

    from asirra.captcha.attack.counter import parse_preprocess
    from asirra.captcha.attack.solvers import MovedSolver
    from asirra.predict import load_classifier

    firsts = [p.renderings[0] for p in bought]
    shipped = MovedSolver(load_classifier(None), parse_preprocess(AUG_MOVE))
    z_shipped = np.concatenate([shipped.logits(firsts[i:i + 32]) for i in range(0, len(firsts), 32)])
    columns = [z_shipped, _out_of_fold("bought-aug", bought, ctx), _out_of_fold("residual", bought, ctx)]
    x = np.stack(columns, 1)
    y = np.array([p.label for p in bought])
    stack = LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
    members = []
    for name, column in zip(("shipped", "bought-aug", "residual"), range(3)):
        entry = {"name": name, "weight": float(stack.coef_[0][column])}
        if name == "shipped":
            entry.update(model=None, move=AUG_MOVE)
        else:
            source = Path(ctx.members[name])
            target = out / name
            if not target.exists():  # hard links: the members' weights are not copied
                shutil.copytree(source / "model", target, copy_function=os.link)
                os.link(source / HEAD, target / HEAD)  # the study scores members from stored features
            entry.update(model=name, move=PROBES[name]["move"])
        members.append(entry)
    write_solver(out, {"kind": "ensemble", "members": members, "bias": float(stack.intercept_[0])})
    return {"weights": {m["name"]: m["weight"] for m in members}, "bias": float(stack.intercept_[0]),
            "stacked_on": "out-of-fold logits of the bought photos' first renderings"}


# ---- self-training ---------------------------------------------------------------------------------


def open_settings(seed: int, **overrides):
    """Service settings with the limits out of the way: a practice service, or the defender measuring its pool."""
    from asirra.captcha.service.settings import ServiceSettings

    return ServiceSettings(challenge_rate=10_000, challenge_burst=10_000, request_rate=100_000, request_burst=100_000,
                           max_per_client=10_000, seed=seed, **overrides)


def practise(url: str, n: int, solver, identity=None, progress: bool = False) -> tuple[list, dict]:
    """`n` challenges at `url` -> ([(12 served JPEGs, the answers) of every passed challenge], a record)."""
    from asirra.captcha.attack.bot import OneAddress, attack

    passed = []

    def keep(images, answers, verdict):
        if verdict == "pass":
            passed.append((images, answers))

    report = attack(url, n, solver, identity=identity or OneAddress(), progress=progress, observe=keep, max_wait=120)
    return passed, {"practice_challenges": report.attempted, "practice_passed": report.passed,
                    "practice_bytes": report.bytes_up + report.bytes_down}



def build_self_trained(out: Path, bought, ctx: RungContext) -> dict:
    """bought-aug's recipe on the bought photos plus the photos of its own passed practice challenges."""
    if ctx.practice is None:
        raise ValueError("self-training needs a practice service (RungContext.practice)")
    passed, record = ctx.practice(Path(ctx.members["bought-aug"]))
    extra = [BoughtPhoto(key=f"practice-{i}", label=CAT if is_cat else DOG, renderings=[data])
             for i, (images, answers) in enumerate(passed) for data, is_cat in zip(images, answers)]
    w, b, _, _ = _fit_probe("self-trained", list(bought) + extra, ctx)
    return {**_save_probe_rung(out, "self-trained", w, b, ctx, {}), **record, "self_labelled_images": len(extra)}


# ---- lookup ------------------------------------------------------------------------------------------


def build_lookup(out: Path, bought, ctx: RungContext) -> dict:
    thumbs = np.stack([thumbnail(data) for p in bought for data in p.renderings])
    labels = np.array([p.label for p in bought for _ in p.renderings])
    np.savez(out / "table.npz", thumbs=thumbs, labels=labels)
    write_solver(out, {"kind": "lookup", "table": "table.npz", "ratio": LOOKUP_RATIO, "fallback": None})
    return {"table_rows": int(len(labels))}


BUILDERS: dict[str, Callable] = {
    "bought-labels": lambda out, bought, ctx: build_probe("bought-labels", out, bought, ctx),
    "bought-aug": lambda out, bought, ctx: build_probe("bought-aug", out, bought, ctx),
    "residual": lambda out, bought, ctx: build_probe("residual", out, bought, ctx),
    "finetune": build_finetune,
    "ensemble": build_ensemble,
    "self-trained": build_self_trained,
    "lookup": build_lookup,
}
NEEDS = {"ensemble": ("bought-aug", "residual"), "self-trained": ("bought-aug",)}


def build_rung(name: str, out: Path, bought: Sequence[BoughtPhoto], ctx: RungContext, **options) -> dict:
    """Build rung `name` from `bought` into `out` (attacker.json last: a folder without it is unfinished)."""
    out.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    computed_before = ctx.store.computed
    extra = BUILDERS[name](out, list(bought), ctx, **options)
    record = {"name": name, "labels_bought": len(bought), "seed": ctx.seed, **extra,
              "build_seconds": round(time.perf_counter() - wall, 2),
              "build_cpu_seconds": round(time.process_time() - cpu, 2),
              "features_computed": ctx.store.computed - computed_before}
    write_json_atomic(out / RECORD, record)
    return record


def built(out: Path) -> dict | None:
    path = Path(out) / RECORD
    return json.loads(path.read_text()) if path.exists() else None
