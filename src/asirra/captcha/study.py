"""The study as one command: hardening methods x epsilon x attackers x counter-moves, scored on served bytes.

What it does, in order (every stage is cached under OUT, so a rerun resumes where it stopped):

1. Split. The labelled pool is split by a seeded, stratified rule (`split_pool`, recorded in
   OUT/split.json with every source) into a hidden *scored* set (`scored` images, half of each
   class) and a *crafting* set (everything else). Surrogates, universal perturbations and any
   attacker the ladder trains see crafting images only; hidden images are never crafted or tuned on.
2. Surrogates. Registry names (effnet-lite0, seed-cnn, ...) are trained on the crafting set into
   OUT/surrogates/NAME (a linear probe for EfficientNet-Lite, from scratch for seed-cnn); an
   existing model folder is used as given (the caller vouches that it never saw the hidden set).
3. For each method x epsilon, the hidden set is hardened into OUT/pools/METHOD-eEPS (harden_pool:
   resumable; epsilon 0 is the untouched originals, one row shared by every method), served by the
   real service (create_app on a loopback port, in-process uvicorn), and every hidden image is
   fetched once over HTTP (challenges are requested until each pool image has been served once;
   the study owns the service, so it reads which pool image a token is from the store, as the
   tests do). Those served JPEGs, the service's crop, resize and re-encoding included, are what
   every attacker x counter-move classifies: per-image accuracy with its Wilson 95% interval and
   the 12-image pass rate p^12 it implies (the interval's ends raised to the 12th).
4. Headline cells (by default, at each method x epsilon, the strongest attacker with its best
   counter-move on the served bytes) are attacked live with asirra.captcha.attack.attack() against
   the service with its default rate limits: pass rate among answered with its interval, refusals,
   passes per hour per IP, and what a thousand passes cost the bot in machine time.
5. OUT/report.md (every cell, and the goal check), results.csv, results.json, and plots.

The goal check: is there a setting where the strongest attacker passes <= 10% of live challenges
while the median SSIM stays >= 0.90? The report says which setting came closest if none does.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from asirra import CAT, CLASS_NAMES
from asirra.captcha.challenge import CHALLENGE_SIZE
from asirra.captcha.ladder import ADAPTIVE, ATTACKERS, LadderError, build_attacker
from asirra.evaluate import wilson_interval
from asirra.fileio import write_json_atomic, write_text_atomic

SHIPPED = "shipped"  # the attacker's model shipped with asirra (never a surrogate of headline rows)
GOAL_PASS_RATE = 0.10
GOAL_SSIM = 0.90
# Human solving farms' price per thousand CAPTCHAs (the issue's figure), for the cost comparison.
FARM_PRICE_PER_THOUSAND = (0.5, 3.0)
# What the bot's machine costs per hour: a 2-vCPU cloud instance, roughly (an assumption, stated
# in the report; override with --machine-cost).
MACHINE_COST_PER_HOUR = 0.10
SCORE_BATCH = 32  # served images per classifier call when scoring a cell
CLEAN = "none"  # the method name of the epsilon-0 row: no hardening at all


class StudyError(ValueError):
    """Study settings or an output folder the study cannot use; the message is one line."""


@dataclass(frozen=True)
class StudyConfig:
    scored: int = 300  # hidden images scored in every cell (half per class)
    craft_limit: int | None = 600  # crafting images the surrogates train on (None: all of them)
    methods: tuple[str, ...] = ("pgd",)
    epsilons: tuple[int, ...] = (0, 2, 4, 8, 16)  # in 0..255 units
    attackers: tuple[str, ...] = (SHIPPED,)
    preprocess: tuple[str, ...] = ("none", "jpeg:75", "median:3")
    surrogates: tuple[str, ...] = ("effnet-lite0",)
    steps: int | None = None  # harden's default per method
    eot: int = 2
    surrogate_epochs: int = 30
    headline: str = "strongest"  # "strongest", "all", or "none": which cells get a live attack
    live_challenges: int = 60
    # Crafting images (outside the surrogates' training subset) an adaptive attacker may learn from,
    # hardened like the served pool at each setting; the hidden set stays hidden from it too.
    attacker_pool: int = 300
    # The classic baseline: random distortions (asirra.captcha.distort kinds, "kind" or "kind:strength"),
    # served and attacked like the hardened pools; not bounded in L-infinity, so they have no epsilon.
    baselines: tuple[str, ...] = ()
    machine_cost: float = MACHINE_COST_PER_HOUR
    seed: int = 0

    def __post_init__(self):
        from asirra.captcha.counter import parse_preprocess
        from asirra.captcha.harden import METHODS

        if self.scored < CHALLENGE_SIZE or self.scored % 2:
            raise StudyError(f"--scored must be an even number of at least {CHALLENGE_SIZE}, got {self.scored}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise StudyError(f"unknown method {unknown[0]!r}; harden knows {', '.join(METHODS)}")
        if not self.methods or not self.epsilons or not self.attackers or not self.preprocess:
            raise StudyError("give at least one method, epsilon, attacker and preprocessing")
        if any(not 0 <= e <= 64 for e in self.epsilons) or len(set(self.epsilons)) != len(self.epsilons):
            raise StudyError(f"epsilons must be distinct integers in 0..64 (units of 1/255), got {self.epsilons}")
        for spec in self.preprocess:
            parse_preprocess(spec)  # CounterError (a ValueError) names the bad step
        for spec in self.baselines:
            distortion(spec)  # DistortError (a ValueError) names the bad kind or strength
        if self.headline not in ("strongest", "all", "none"):
            raise StudyError(f"--headline must be strongest, all or none, got {self.headline!r}")
        if self.live_challenges < 1:
            raise StudyError(f"--live-challenges must be at least 1, got {self.live_challenges}")


def quick_config(**overrides) -> StudyConfig:
    """A study in a few minutes: a tiny hidden set, 2 epsilons, fgsm, a noise baseline, one counter-move, a toy surrogate."""
    base = StudyConfig(scored=24, craft_limit=48, methods=("fgsm",), epsilons=(0, 8), preprocess=("none", "jpeg:75"),
                       surrogates=("seed-cnn",), surrogate_epochs=1, eot=1, live_challenges=12, baselines=("noise",))
    return replace(base, **overrides)


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_moves(text: str) -> tuple[str, ...]:
    """ "none,jpeg:75,jpeg:75+median:3" -> ("none", "jpeg:75", "jpeg:75,median:3"): + chains steps of one move."""
    return tuple(part.replace("+", ",") for part in parse_list(text))


def parse_epsilons(text: str) -> tuple[int, ...]:
    """ "0,2,4,8,16" (units of 1/255; "4/255" is accepted too) -> (0, 2, 4, 8, 16)."""
    values = []
    for part in parse_list(text):
        number = part.removesuffix("/255")
        if not number.isdigit():
            raise StudyError(f"epsilons are integers in units of 1/255, as in 0,2,4,8,16; got {part!r}")
        values.append(int(number))
    return tuple(values)


# ---- 1. the split ---------------------------------------------------------------------------


SPLIT_RULE = ("per class, a permutation of the pool's images (sorted by source) drawn by numpy "
              "default_rng(seed); the first scored/2 of each class are hidden, the rest craft")


def split_pool(refs: Sequence, scored: int, seed: int) -> tuple[list, list]:
    """(hidden, crafting): disjoint, stratified, reproducible from the seed alone."""
    if any(ref.label is None for ref in refs):
        raise StudyError("every pool image needs a label (cat or dog)")
    rng = np.random.default_rng(seed)
    hidden, craft = [], []
    for label in sorted({ref.label for ref in refs}):
        members = sorted((ref for ref in refs if ref.label == label), key=lambda r: r.source)
        if len(members) < scored // 2 + 1:
            raise StudyError(f"the pool has {len(members)} {CLASS_NAMES[label]} images; --scored {scored} needs "
                             f"{scored // 2} hidden and at least one to craft with")
        order = rng.permutation(len(members))
        hidden += [members[i] for i in order[: scored // 2]]
        craft += [members[i] for i in order[scored // 2:]]
    if len({r.label for r in hidden}) < 2:
        raise StudyError("the pool needs both cats and dogs")
    return sorted(hidden, key=lambda r: r.source), sorted(craft, key=lambda r: r.source)


def _record_split(out: Path, hidden: list, craft: list, config: StudyConfig) -> None:
    record = {"rule": SPLIT_RULE, "seed": config.seed, "scored": config.scored,
              "hidden": [r.source for r in hidden], "craft": [r.source for r in craft]}
    path = out / "split.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before["hidden"] != record["hidden"] or before["craft"] != record["craft"]:
            raise StudyError(f"{out} holds a study of another pool, seed or --scored; use a new --out")
        return
    write_json_atomic(path, record)


def _surrogate_share(craft: list, limit: int | None, seed: int) -> tuple[list, list]:
    """(the crafting images the surrogates train on, the rest): a seeded stratified subset."""
    chosen = _subset(craft, limit, seed)
    taken = {r.source for r in chosen}
    return chosen, [r for r in craft if r.source not in taken]


def _subset(refs: list, limit: int | None, seed: int) -> list:
    """A seeded stratified subset of `refs` in their own order (all of them without a limit)."""
    from asirra.splits import stratified_subset

    if not limit or limit >= len(refs):
        return list(refs)
    return [refs[i] for i in sorted(stratified_subset(np.array([r.label for r in refs]), limit, seed).tolist())]


def _link_folder(folder: Path, chosen: list) -> Path:
    """A Kaggle-named folder of (links to) `chosen` labelled images."""
    from asirra.data import MEMBER_SEPARATOR

    folder.mkdir(parents=True, exist_ok=True)
    for i, ref in enumerate(chosen):
        suffix = Path(ref.source.split(MEMBER_SEPARATOR)[-1]).suffix or ".jpg"
        target = folder / f"{CLASS_NAMES[ref.label]}.{i}{suffix}"
        if target.exists() or target.is_symlink():
            continue
        if MEMBER_SEPARATOR in ref.source:
            target.write_bytes(ref.read_bytes())
        else:
            target.symlink_to(Path(ref.source).resolve())
    return folder


# ---- 2. surrogates and attackers ------------------------------------------------------------


def _surrogate_folders(out: Path, craft_dir: Path, config: StudyConfig) -> list[str]:
    from asirra.config import Schedule, Strategy, TrainConfig
    from asirra.models import available_models, resolve_model_folder
    from asirra.train import train

    folders = []
    for spec in config.surrogates:
        if Path(spec).exists() or spec == SHIPPED:
            folders.append(spec)
            continue
        if spec not in available_models():
            raise StudyError(f"surrogate {spec!r} is neither a model folder nor one of {', '.join(available_models())}")
        run = out / "surrogates" / spec
        try:
            folders.append(str(resolve_model_folder(run)))
            continue
        except ValueError:
            pass
        scratch = spec == "seed-cnn"
        print(f"training surrogate {spec} on the crafting images ({run})", file=sys.stderr)
        train(TrainConfig(data=str(craft_dir), out=str(run), model=spec,
                          strategy=Strategy.scratch if scratch else Strategy.linear, views=1,
                          epochs=config.surrogate_epochs, schedule=Schedule.cosine, weight_decay=1e-4,
                          seed=config.seed, workers=1), resume=(run / "checkpoint.pt").exists())
        folders.append(str(resolve_model_folder(run)))
    return folders


def is_adaptive(name: str) -> bool:
    """Adaptive rungs learn from the defended pool as served, so each setting gets its own build."""
    return name in ADAPTIVE


def load_attacker(name: str, folder: Path, train_data: Path, config: StudyConfig):
    """The classifier an attacker name stands for: the shipped model, a model folder, or a ladder rung
    built in `folder` from the labelled images in `train_data` (reused when already built)."""
    from asirra.predict import load_classifier

    if name == SHIPPED:
        return load_classifier(None)
    if Path(name).exists():
        return load_classifier(name)
    if name not in ATTACKERS:
        raise StudyError(f"attacker {name!r} is neither a model folder nor one of {', '.join(ATTACKERS)}")
    return load_classifier(build_attacker(name, folder, train_data=train_data, seed=config.seed))


# ---- 3. pools, the service, the served bytes --------------------------------------------------


def distortion(spec: str):
    """ "noise" or "noise:20" -> its DistortConfig (the default strength when none is given)."""
    from asirra.captcha.distort import DistortConfig, DistortError

    kind, _, strength = spec.partition(":")
    try:
        return DistortConfig(kind=kind, strength=float(strength) if strength else None)
    except ValueError as exc:
        raise DistortError(str(exc) if isinstance(exc, DistortError) else f"bad strength in {spec!r}") from None


def pool_name(method: str, eps: int | None) -> str:
    """The pool's folder name; a distortion baseline (eps None) is named after its kind and strength."""
    if eps is None:
        return "distort-" + method.replace(":", "")
    return CLEAN if eps == 0 else f"{method}-e{eps}"


def eps_label(eps: int | None) -> str:
    return "-" if eps is None else str(eps)


def _harden(refs: list, folder: Path, craft_dir: Path, method: str, eps: int, surrogates, config: StudyConfig):
    """`refs` hardened into `folder` (cached on disk: harden_pool resumes) -> (refs of the pool, manifest
    records, summary); at epsilon 0, the refs themselves."""
    from asirra.captcha.derived_pool import SUMMARY, read_manifest
    from asirra.captcha.distort import distort_pool
    from asirra.captcha.harden import UNIVERSAL, HardenConfig, harden_pool
    from asirra.data import scan

    if eps == 0:
        return list(refs), [], {}
    if eps is None:  # a distortion baseline
        distort_pool(refs, folder, replace(distortion(method), seed=config.seed), progress=True)
        return scan(folder, labelled=True), list(read_manifest(folder).values()), {}
    # Image-agnostic methods craft their pattern on the surrogates' crafting images only.
    options = {"crafting": str(craft_dir)} if method in UNIVERSAL else {}
    hconfig = HardenConfig(method=method, epsilon=eps / 255, surrogates=tuple(s.name for s in surrogates),
                           steps=config.steps, eot=config.eot, seed=config.seed, **options)
    harden_pool(refs, folder, hconfig, surrogates, progress=True)
    summary = json.loads((folder / SUMMARY).read_text()) if (folder / SUMMARY).exists() else {}
    return scan(folder, labelled=True), list(read_manifest(folder).values()), summary


def _attacker_pool(refs: list, out: Path, craft_dir: Path, method: str, eps: int, surrogates,
                   config: StudyConfig) -> Path:
    """The labelled images an adaptive attacker learns from at one setting, defended as the served pool is."""
    name = pool_name(method, eps)
    if eps == 0:
        return _link_folder(out / "attacker-pools" / name, refs)
    _harden(refs, out / "attacker-pools" / name, craft_dir, method, eps, surrogates, config)
    return out / "attacker-pools" / name


def fetch_served(refs: list, seed: int, progress: bool = True) -> list[tuple[bytes, int, str]]:
    """Every pool image once, as the running service serves it over HTTP: (JPEG bytes, label, source)."""
    import httpx

    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service import ServiceSettings, create_app, running, usable_pool
    from asirra.captcha.store import ordered_pool

    pool = ordered_pool(usable_pool(refs, progress=False))
    # Limits out of the way: this is the defender measuring its own pool, not the bot's run.
    settings = ServiceSettings(challenge_rate=10_000, challenge_burst=10_000, request_rate=100_000,
                               request_burst=100_000, max_per_client=10_000, seed=seed)
    app = create_app(pool, parse_safeguard("none"), settings)
    served: dict[int, bytes] = {}
    bar = tqdm(total=len(pool), desc="fetching served images", unit="img", file=sys.stderr, disable=not progress,
               leave=False)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(200 * len(pool)):  # a bound; coupon collecting needs ~ln(n) n / 12 challenges
            if len(served) == len(pool):
                break
            response = client.post("/api/challenge")
            response.raise_for_status()
            body = response.json()
            issued = app.state.store.peek(body["id"])
            for position, image_url in zip(issued.positions, body["images"]):
                if position in served:
                    continue
                reply = client.get(image_url)
                reply.raise_for_status()
                served[position] = reply.content
                bar.update(1)
    bar.close()
    if len(served) < len(pool):
        raise StudyError(f"only {len(served)} of {len(pool)} pool images were served")
    return [(served[i], pool[i].label, pool[i].source) for i in range(len(pool))]


def _cached_served(folder: Path, refs: list, seed: int) -> list[tuple[bytes, int, str]]:
    """fetch_served, kept in `folder` (index.json + JPEGs) so a rerun scores the same bytes."""
    index = folder / "index.json"
    if index.exists():
        entries = json.loads(index.read_text())
        return [((folder / e["file"]).read_bytes(), e["label"], e["source"]) for e in entries]
    served = fetch_served(refs, seed)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (data, label, source) in enumerate(served):
        name = f"{i:05d}.jpg"
        (folder / name).write_bytes(data)
        entries.append({"file": name, "label": label, "source": source})
    write_json_atomic(index, entries)
    return served


# ---- scoring ------------------------------------------------------------------------------


def _adaptive_attackers(out: Path, setting: str, pool: Path, config: StudyConfig) -> tuple[dict, list[dict]]:
    """The adaptive rungs built on one setting's defended crafting pool -> ({name: classifier}, [why not])."""
    built, failed = {}, []
    for attacker in (a for a in config.attackers if is_adaptive(a)):
        try:
            built[attacker] = load_attacker(attacker, out / "attackers" / f"{attacker}--{setting}", pool, config)
        except LadderError as exc:  # e.g. passed-challenges when the shipped model passes nothing
            failed.append({"attacker": attacker, "reason": str(exc)})
    return built, failed


def _scores(out: Path, setting: str, attackers: dict, pipelines: dict, served: list) -> list[tuple[str, str, dict]]:
    """(attacker, counter-move, score_cell) for every pair, cached per cell: the out folder pins the
    pool, the served bytes and every attacker's build, so a cached score is the score."""
    rows = []
    pairs = [(a, spec) for a in attackers for spec in pipelines]
    for attacker, spec in tqdm(pairs, desc=f"scoring {setting}", unit="cell", file=sys.stderr, leave=False):
        path = out / "scores" / f"{setting}--{_file_part(attacker)}--{_file_part(spec)}.json"
        if path.exists():
            score = json.loads(path.read_text())
        else:
            score = score_cell(attackers[attacker], pipelines[spec], served)
            write_json_atomic(path, score)
        rows.append((attacker, spec, score))
    return rows


def _file_part(text: str) -> str:
    """An attacker or counter-move name as part of a file name ("jpeg:75,median:3" -> "jpeg75,median3")."""
    return text.replace("/", "_").replace(":", "")


def score_cell(classifier, pipeline, served: list[tuple[bytes, int, str]]) -> dict:
    """Per-image accuracy on the served bytes, its Wilson interval, and the p^12 it implies."""
    # In batches: one call on 300 images at 300 px grows ONNX Runtime's arena by gigabytes per model,
    # and a study holds several models (it was OOM-killed at 21 GB that way).
    flags = []
    for start in range(0, len(served), SCORE_BATCH):
        chunk = served[start:start + SCORE_BATCH]
        flags += classifier.solve(pipeline.apply_all([data for data, _, _ in chunk]))
    correct = sum(bool(flag) == (label == CAT) for flag, (_, label, _) in zip(flags, served))
    n = len(served)
    low, high = wilson_interval(correct, n)
    acc = correct / n
    return {"n": n, "correct": correct, "accuracy": acc, "accuracy_low": low, "accuracy_high": high,
            "p12": acc**CHALLENGE_SIZE, "p12_low": low**CHALLENGE_SIZE, "p12_high": high**CHALLENGE_SIZE}


def similarity_summary(records: list[dict], pool_summary: dict | None = None) -> dict:
    """SSIM / PSNR of the hardened pool from its manifest, and the defender's seconds per image
    (a universal pattern's one-off crafting time shared over the pool's images, when there is one)."""
    made = [r for r in records if "file" in r]
    if not made:  # the clean row: the originals themselves
        return {"ssim_median": 1.0, "ssim_p10": 1.0, "psnr_median": None, "linf_max": 0, "seconds_per_image": 0.0}
    shared = (pool_summary or {}).get("crafting_seconds_per_image", 0.0)
    ssims = [r["ssim"] for r in made]
    psnrs = [r["psnr"] for r in made if r["psnr"] is not None]
    return {"ssim_median": statistics.median(ssims), "ssim_p10": float(np.percentile(ssims, 10)),
            "psnr_median": statistics.median(psnrs) if psnrs else None, "linf_max": max(r["linf"] for r in made),
            "seconds_per_image": statistics.median(r["seconds"] for r in made) + shared}


def live_attack(refs: list, classifier, pipeline, config: StudyConfig) -> dict:
    """A full attack over HTTP on the pool served with the service's default rate limits."""
    from asirra.captcha.attack import attack
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service import ServiceSettings, create_app, running, usable_pool
    from asirra.captcha.store import ordered_pool

    app = create_app(ordered_pool(usable_pool(refs, progress=False)), parse_safeguard("none"),
                     ServiceSettings(seed=config.seed))
    with running(app) as url:
        report = attack(url, config.live_challenges, classifier, preprocess=pipeline, max_wait=3600, progress=True)
    result = report.to_dict()
    per_hour = report.passes_per_hour
    result["cost_per_thousand"] = (1000 / per_hour * config.machine_cost) if per_hour else None
    return result


# ---- the study ----------------------------------------------------------------------------


@dataclass
class StudyResult:
    out: Path
    cells: list[dict]
    live: list[dict]
    goal: dict
    unbuilt: list = field(default_factory=list)  # adaptive attackers that could not be built, and why
    attacker_pool: int = 0  # images each adaptive attacker could learn from
    files: dict = field(default_factory=dict)


def run_study(data: str | os.PathLike, out: str | os.PathLike, config: StudyConfig) -> StudyResult:
    import torch

    from asirra.captcha.counter import parse_preprocess
    from asirra.captcha.harden import load_surrogates
    from asirra.data import scan

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / "study.json"
    if settings_path.exists():
        before = json.loads(settings_path.read_text())
        fixed = ("scored", "craft_limit", "surrogates", "steps", "eot", "seed", "surrogate_epochs")
        changed = [k for k in fixed if before.get(k) != json.loads(json.dumps(asdict(config)))[k]]
        if changed:
            raise StudyError(f"{out} was studied with other {', '.join(changed)}; use a new --out")
    write_json_atomic(settings_path, {**asdict(config), "data": str(data)})
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + round(now - clock, 2)
        clock = now

    hidden, craft = split_pool(scan(data, labelled=True), config.scored, config.seed)
    _record_split(out, hidden, craft, config)
    surrogate_share, rest = _surrogate_share(craft, config.craft_limit, config.seed)
    craft_dir = _link_folder(out / "craft", surrogate_share)
    # Adaptive attackers learn from crafting images the surrogates never trained on when there are
    # enough (so the defender's noise on them is like its noise on the hidden set), else from all of them.
    learn_from = _subset(rest if len(rest) >= 2 * CHALLENGE_SIZE else craft, config.attacker_pool, config.seed)
    surrogates = load_surrogates(_surrogate_folders(out, craft_dir, config))
    lap("surrogates")
    fixed = {name: load_attacker(name, out / "attackers" / name.replace("/", "_"), craft_dir, config)
             for name in config.attackers if not is_adaptive(name)}
    lap("attackers")
    pipelines = {spec: parse_preprocess(spec) for spec in config.preprocess}

    settings = [(CLEAN, 0)] if 0 in config.epsilons else []
    settings += [(m, e) for m in config.methods for e in config.epsilons if e]
    settings += [(spec, None) for spec in config.baselines]
    cells, live, unbuilt = [], [], []
    for method, eps in tqdm(settings, desc="study", unit="setting", file=sys.stderr):
        name = pool_name(method, eps)
        refs, records, pool_summary = _harden(hidden, out / "pools" / name, craft_dir, method, eps, surrogates, config)
        lap("harden")
        attackers = dict(fixed)
        if any(is_adaptive(a) for a in config.attackers):
            pool = _attacker_pool(learn_from, out, craft_dir, method, eps, surrogates, config)
            lap("harden_attacker_pool")
            built, failed = _adaptive_attackers(out, name, pool, config)
            attackers.update(built)
            unbuilt += [{"method": method, "epsilon": eps, **f} for f in failed]
            lap("attackers")
        served = _cached_served(out / "served" / name, refs, config.seed)
        lap("serve_and_fetch")
        similar = similarity_summary(records, pool_summary)
        mine = [{"method": method, "epsilon": eps, "attacker": attacker, "preprocess": spec, **score, **similar}
                for attacker, spec, score in _scores(out, name, attackers, pipelines, served)]
        lap("score")
        best = max(mine, key=lambda r: (r["accuracy"], -config.preprocess.index(r["preprocess"])))
        for row in mine:
            row["strongest"] = row is best
        cells += mine
        targets = mine if config.headline == "all" else [best] if config.headline == "strongest" else []
        for row in targets:
            path = out / "live" / f"{name}--{_file_part(row['attacker'])}--{_file_part(row['preprocess'])}.json"
            if path.exists():
                result = json.loads(path.read_text())
            else:
                result = live_attack(refs, attackers[row["attacker"]], pipelines[row["preprocess"]], config)
                write_json_atomic(path, result)
            live.append({"method": method, "epsilon": eps, "attacker": row["attacker"], "preprocess": row["preprocess"],
                         "ssim_median": row["ssim_median"], **result})
        lap("live_attack")
    goal = goal_check(cells, live)
    result = StudyResult(out, cells, live, goal, unbuilt=unbuilt, attacker_pool=len(learn_from))
    result.files = write_outputs(result, config, hidden, craft, timings)
    return result


def goal_check(cells: list[dict], live: list[dict]) -> dict:
    """Per setting: the strongest attacker's pass rate (live when attacked live, else p^12) and the SSIM."""
    rows = []
    for cell in (c for c in cells if c["strongest"]):
        attacked = next((r for r in live if (r["method"], r["epsilon"], r["attacker"], r["preprocess"])
                         == (cell["method"], cell["epsilon"], cell["attacker"], cell["preprocess"])), None)
        if attacked is not None and attacked["solve_rate"] is not None:
            rate, (low, high), source = attacked["solve_rate"], attacked["solve_rate_ci"], "live"
        else:
            rate, low, high, source = cell["p12"], cell["p12_low"], cell["p12_high"], "p^12"
        rows.append({"method": cell["method"], "epsilon": cell["epsilon"], "attacker": cell["attacker"],
                     "preprocess": cell["preprocess"], "pass_rate": rate, "pass_low": low, "pass_high": high,
                     "source": source, "ssim_median": cell["ssim_median"],
                     # Unhardened originals are the baseline, never a setting that meets the goal.
                     "meets": cell["epsilon"] != 0 and rate <= GOAL_PASS_RATE and cell["ssim_median"] >= GOAL_SSIM})
    met = [r for r in rows if r["meets"]]
    # How close: the lowest pass rate among settings people can still see (SSIM ok), else overall.
    hardened = [r for r in rows if r["epsilon"] != 0]
    seeable = [r for r in hardened if r["ssim_median"] >= GOAL_SSIM]
    candidates = seeable or hardened
    closest = min(candidates, key=lambda r: r["pass_rate"]) if candidates else None
    return {"pass_rate_at_most": GOAL_PASS_RATE, "ssim_median_at_least": GOAL_SSIM, "met": bool(met),
            "settings": rows, "closest": closest, "closest_keeps_ssim": bool(seeable)}


# ---- outputs ------------------------------------------------------------------------------


def _setting(row: dict) -> str:
    if row["epsilon"] is None:
        return f"distortion {row['method']}"
    return f"{row['method']} eps {row['epsilon']}/255"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _ci(row: dict, key: str) -> str:
    return f"{_pct(row[key])} [{_pct(row[key + '_low'])}, {_pct(row[key + '_high'])}]"


def write_outputs(result: StudyResult, config: StudyConfig, hidden: list, craft: list, timings: dict) -> dict:
    out = result.out
    columns = ["method", "epsilon", "attacker", "preprocess", "n", "correct", "accuracy", "accuracy_low",
               "accuracy_high", "p12", "p12_low", "p12_high", "strongest", "ssim_median", "ssim_p10", "psnr_median",
               "linf_max", "seconds_per_image"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(result.cells)
    files = {"csv": str(write_text_atomic(out / "results.csv", buffer.getvalue()))}
    files["json"] = str(write_json_atomic(out / "results.json", {
        "config": asdict(config), "hidden": len(hidden), "craft": len(craft), "cells": result.cells,
        "live": result.live, "goal": result.goal, "unbuilt": result.unbuilt,
        "attacker_pool": result.attacker_pool, "timings_seconds": timings}))
    # Every run's stage times, so the first (uncached) run's cost stays on record after reruns.
    with open(out / "timings.jsonl", "a", encoding="utf-8") as history:
        history.write(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **timings}) + "\n")
    files.update(write_plots(result, out))
    files["report"] = str(write_text_atomic(out / "report.md", report_markdown(result, config, hidden, craft, timings)))
    return files


def report_markdown(result: StudyResult, config: StudyConfig, hidden: list, craft: list, timings: dict) -> str:
    n = config.scored
    half = {p: (wilson_interval(round(p * n), n)[1] - wilson_interval(round(p * n), n)[0]) / 2 for p in (0.5, 0.9, 0.99)}
    lines = [
        "# Hardening study", "",
        f"Hidden scored set: **{len(hidden)} images** ({len(hidden) // 2} per class), never crafted or tuned on; "
        f"{len(craft)} crafting images ({config.craft_limit or 'all'} of them train the surrogates). "
        f"With {n} images a per-image accuracy's 95% Wilson interval is about "
        f"+/-{half[0.5]:.1%} at 50%, +/-{half[0.9]:.1%} at 90%, +/-{half[0.99]:.1%} at 99%.",
        f"Split rule (split.json): {SPLIT_RULE}; seed {config.seed}.",
        f"Surrogates (the defender's; trained on crafting images): {', '.join(config.surrogates)}. "
        f"Attackers: {', '.join(config.attackers)}. Counter-moves: {', '.join(config.preprocess)}."
        + (f" Distortion baselines (random, not bounded in L-inf; eps shown as -): {', '.join(config.baselines)}."
           if config.baselines else ""),
        "Every figure is on the JPEG bytes the live service served over HTTP (its crop, resize and re-encoding).",
        "",
        "## Goal: strongest attacker <= 10% of challenges passed, median SSIM >= 0.90", "",
    ]
    goal = result.goal
    if goal["met"]:
        winners = [r for r in goal["settings"] if r["meets"]]
        lines.append("**Met** by: " + "; ".join(f"{_setting(r)} ({_pct(r['pass_rate'])} "
                                                 f"{r['source']}, SSIM {r['ssim_median']:.3f})" for r in winners))
    else:
        closest = goal["closest"]
        among = f"with median SSIM >= {GOAL_SSIM}" if goal["closest_keeps_ssim"] else \
            f"(no setting kept median SSIM >= {GOAL_SSIM})"
        lines.append("**Not met** by any setting studied." + (
            f" Closest {among}: {_setting(closest)}, "
            f"{closest['attacker']} + {closest['preprocess']} passes {_pct(closest['pass_rate'])} "
            f"[{_pct(closest['pass_low'])}, {_pct(closest['pass_high'])}] ({closest['source']}), SSIM "
            f"{closest['ssim_median']:.3f}." if closest else ""))
    adaptive = [a for a in config.attackers if is_adaptive(a)]
    lines.append(f"\n\"Strongest\" means the strongest of this run's attackers ({', '.join(config.attackers)}) with its "
                 "best counter-move on the served bytes; the verdict holds for those attackers only. " + (
                     f"Adaptive attackers ({', '.join(adaptive)}) are rebuilt at every setting from "
                     f"{result.attacker_pool} crafting images (never the hidden set) hardened exactly as the served pool is, "
                     "rendered with the service's crop, resize and JPEG re-encoding." if adaptive else
                     "No adaptive attacker (one that learns from labelled hardened images) is in this run."))
    for r in result.unbuilt:
        lines.append(f"- not built: {r['attacker']} at {_setting(r)}: {r['reason']}")
    lines += ["", "| method | eps/255 | strongest attacker | counter-move | pass rate [95% CI] | from | median SSIM | goal |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in goal["settings"]:
        lines.append(f"| {r['method']} | {eps_label(r['epsilon'])} | {r['attacker']} | {r['preprocess']} | {_pct(r['pass_rate'])} "
                     f"[{_pct(r['pass_low'])}, {_pct(r['pass_high'])}] | {r['source']} | {r['ssim_median']:.3f} | "
                     f"{'met' if r['meets'] else 'no'} |")
    lines += ["", "## Every cell (served bytes; p^12 assumes independent mistakes)", "",
              "| method | eps/255 | attacker | counter-move | accuracy [95% CI] | p^12 [95% CI] | SSIM median / p10 | "
              "PSNR median | defender s/img |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result.cells:
        psnr = "inf" if c["psnr_median"] is None else f"{c['psnr_median']:.1f} dB"
        mark = " **(strongest)**" if c["strongest"] else ""
        lines.append(f"| {c['method']} | {eps_label(c['epsilon'])} | {c['attacker']} | {c['preprocess']}{mark} | {_ci(c, 'accuracy')} "
                     f"({c['correct']}/{c['n']}) | {_ci(c, 'p12')} | {c['ssim_median']:.3f} / {c['ssim_p10']:.3f} | {psnr} | "
                     f"{c['seconds_per_image']:.2f} |")
    lines += ["", f"## Live attacks ({config.live_challenges} challenges each, the service's default rate limits)", "",
              f"Cost per thousand passes = machine time at ${config.machine_cost:.2f}/hour (an assumed 2-vCPU cloud "
              f"price) / passes per hour, against ${FARM_PRICE_PER_THOUSAND[0]}-{FARM_PRICE_PER_THOUSAND[1]} per "
              "thousand at human solving farms. Passes per hour are per IP: the limits are per IP.", "",
              "| method | eps/255 | attacker | counter-move | answered | passed | pass rate [95% CI] | refused | waited s | "
              "passes/h/IP | $ per 1000 passes |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result.live:
        ci = r["solve_rate_ci"] or [None, None]
        cost = "n/a (no pass)" if r["cost_per_thousand"] is None else f"{r['cost_per_thousand']:.3f}"
        per_hour = "0" if not r["passes_per_hour"] else f"{r['passes_per_hour']:,.0f}"
        lines.append(f"| {r['method']} | {eps_label(r['epsilon'])} | {r['attacker']} | {r['preprocess']} | {r['answered']} | "
                     f"{r['passed']} | {_pct(r['solve_rate'])} [{_pct(ci[0])}, {_pct(ci[1])}] | {r['refused_total']} | "
                     f"{r['waited_seconds']:.0f} | {per_hour} | {cost} |")
    lines += ["", "## Time (seconds per run, from timings.jsonl; cached stages cost ~0 on a rerun)", ""]
    for run in _timing_history(result.out):
        stages = {k: v for k, v in run.items() if k != "finished"}
        lines.append(f"- {run.get('finished', '?')}: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
                     + f"; total {sum(stages.values()):.0f}")
    lines += ["", "Plots: accuracy.png, pass_rate.png, ssim.png.", ""]
    return "\n".join(lines)


def _timing_history(out: Path) -> list[dict]:
    path = out / "timings.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_plots(result: StudyResult, out: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from asirra.plots import save_figure

    cells = result.cells
    # Distortion baselines have no epsilon axis: they are in the report's tables, not on these curves.
    methods = sorted({c["method"] for c in cells if c["method"] != CLEAN and c["epsilon"] is not None}) or [CLEAN]
    series = sorted({(c["attacker"], c["preprocess"]) for c in cells})
    attackers = sorted({a for a, _ in series})
    moves = sorted({m for _, m in series})
    styles = ("-", "--", ":", "-.")

    def line(method, attacker, spec, key):
        rows = sorted((c for c in cells if c["attacker"] == attacker and c["preprocess"] == spec
                       and c["method"] in (method, CLEAN)), key=lambda c: c["epsilon"])
        return ([r["epsilon"] for r in rows], [r[key] for r in rows], [r[key + "_low"] for r in rows],
                [r[key + "_high"] for r in rows])

    files = {}
    for key, title, name in (("accuracy", "per-image accuracy", "accuracy.png"),
                             ("p12", "12-image pass rate", "pass_rate.png")):
        fig = Figure(figsize=(5 * len(methods), 4))
        for i, method in enumerate(methods):
            ax = fig.add_subplot(1, len(methods), i + 1)
            for attacker, spec in series:
                x, y, low, high = line(method, attacker, spec, key)
                # One colour per attacker, one line style per counter-move: 15 series stay readable.
                colour = f"C{attackers.index(attacker) % 10}"
                ax.plot(x, y, marker="o", color=colour, linestyle=styles[moves.index(spec) % len(styles)],
                        label=f"{Path(attacker).name} + {spec}")
                ax.fill_between(x, low, high, color=colour, alpha=0.08)
            if key == "p12":
                for r in (r for r in result.live if r["method"] in (method, CLEAN) and r["solve_rate"] is not None):
                    lo, hi = r["solve_rate_ci"]
                    ax.errorbar([r["epsilon"]], [r["solve_rate"]], yerr=[[r["solve_rate"] - lo], [hi - r["solve_rate"]]],
                                fmt="k*", markersize=10, capsize=3)
                ax.axhline(GOAL_PASS_RATE, color="red", linestyle="--", linewidth=1)
            ax.set(xlabel="epsilon (/255)", ylabel=title, title=f"{method}: {title}" +
                   (" (stars: live attack)" if key == "p12" else ""), ylim=(0, 1.02))
            ax.legend(fontsize=7)
        files[key] = str(save_figure(fig, out / name))
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for method in methods:
        rows = sorted({(c["epsilon"], c["ssim_median"], c["ssim_p10"]) for c in cells if c["method"] in (method, CLEAN)})
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", label=f"{method} median")
        ax.plot([r[0] for r in rows], [r[2] for r in rows], linestyle=":", label=f"{method} 10th percentile")
    ax.axhline(GOAL_SSIM, color="red", linestyle="--", linewidth=1)
    ax.set(xlabel="epsilon (/255)", ylabel="SSIM vs original", title="what hardening costs the picture")
    ax.legend(fontsize=7)
    files["ssim"] = str(save_figure(fig, out / "ssim.png"))
    return files
