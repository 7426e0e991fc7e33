"""Running the study: surrogates and attackers built, pools hardened and served by the real service,
every cell scored on the served bytes (cached), the headline cells attacked live over HTTP."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from asirra.captcha.challenge import CHALLENGE_SIZE
from asirra.captcha.experiments.ladder import ATTACKERS, LadderError, build_attacker
from asirra.captcha.experiments.study.plan import (
    CLEAN,
    SCORE_BATCH,
    SHIPPED,
    StudyConfig,
    StudyError,
    distortion,
    is_adaptive,
    link_folder,
    pool_name,
    record_split,
    split_pool,
    subset,
    surrogate_share,
)
from asirra.captcha.experiments.study.report import StudyResult, goal_check, write_outputs
from asirra.errors import ModelError, require
from asirra.fileio import write_json_atomic
from asirra.labels import CAT
from asirra.runs import claim
from asirra.stats import wilson_interval

log = logging.getLogger(__name__)

# ---- 2. surrogates and attackers ------------------------------------------------------------


def _surrogate_folders(out: Path, craft_dir: Path, config: StudyConfig) -> list[str]:
    from asirra.config import Schedule, Strategy, TrainConfig
    from asirra.models import available_models, resolve_model_folder
    from asirra.training import train

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
        except ModelError:  # not trained yet
            pass
        scratch = spec == "seed-cnn"
        log.info(f"training surrogate {spec} on the crafting images ({run})")
        train(TrainConfig(data=str(craft_dir), out=str(run), model=spec,
                          strategy=Strategy.scratch if scratch else Strategy.linear, views=1,
                          epochs=config.surrogate_epochs, schedule=Schedule.cosine, weight_decay=1e-4,
                          seed=config.seed, workers=1), resume=(run / "checkpoint.pt").exists())
        folders.append(str(resolve_model_folder(run)))
    return folders


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

def _harden(refs: list, folder: Path, craft_dir: Path, method: str, eps: int, surrogates, config: StudyConfig):
    """`refs` hardened into `folder` (cached on disk: harden_pool resumes) -> (refs of the pool, manifest
    records, summary); at epsilon 0, the refs themselves."""
    from asirra.captcha.defend.config import UNIVERSAL, HardenConfig
    from asirra.captcha.defend.derived_pool import SUMMARY, read_manifest
    from asirra.captcha.defend.distort import distort_pool
    from asirra.captcha.defend.harden import harden_pool
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
        return link_folder(out / "attacker-pools" / name, refs)
    _harden(refs, out / "attacker-pools" / name, craft_dir, method, eps, surrogates, config)
    return out / "attacker-pools" / name


def fetch_served(refs: list, seed: int, progress: bool = True) -> list[tuple[bytes, int, str]]:
    """Every pool image once, as the running service serves it over HTTP: (JPEG bytes, label, source)."""
    import httpx

    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service.app import create_app, usable_pool
    from asirra.captcha.service.run import running
    from asirra.captcha.service.settings import ServiceSettings
    from asirra.captcha.service.store import ordered_pool

    pool = ordered_pool(usable_pool(refs, progress=False))
    # Limits out of the way: this is the defender measuring its own pool, not the bot's run.
    settings = ServiceSettings(challenge_rate=10_000, challenge_burst=10_000, request_rate=100_000,
                               request_burst=100_000, max_per_client=10_000, seed=seed)
    app = create_app(pool, parse_safeguard("none"), settings)
    served: dict[int, bytes] = {}
    bar = tqdm(total=len(pool), desc="fetching served images", unit="img", disable=not progress,
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
    for attacker, spec in tqdm(pairs, desc=f"scoring {setting}", unit="cell", leave=False):
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
    from asirra.captcha.attack.bot import attack
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service.app import create_app, usable_pool
    from asirra.captcha.service.run import running
    from asirra.captcha.service.settings import ServiceSettings
    from asirra.captcha.service.store import ordered_pool

    app = create_app(ordered_pool(usable_pool(refs, progress=False)), parse_safeguard("none"),
                     ServiceSettings(seed=config.seed))
    with running(app) as url:
        report = attack(url, config.live_challenges, classifier, preprocess=pipeline, max_wait=3600, progress=True)
    result = report.to_dict()
    per_hour = report.passes_per_hour
    result["cost_per_thousand"] = (1000 / per_hour * config.machine_cost) if per_hour else None
    return result


# ---- the study ----------------------------------------------------------------------------


def run_study(data: str | os.PathLike, out: str | os.PathLike, config: StudyConfig) -> StudyResult:
    import torch

    from asirra.captcha.attack.counter import parse_preprocess
    from asirra.captcha.defend.harden import load_surrogates
    from asirra.data import scan

    require("fastapi", "serve")  # the study serves its pools with the real service
    require("uvicorn", "serve")
    out = Path(out)
    # What a rerun may change: which attackers, counter-moves, settings and live attacks; never what was built.
    claim(out, {**asdict(config), "data": str(data)}, "study.json", "study", restamp=True,
          keys=("scored", "craft_limit", "surrogates", "steps", "eot", "seed", "surrogate_epochs"))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + round(now - clock, 2)
        clock = now

    hidden, craft = split_pool(scan(data, labelled=True), config.scored, config.seed)
    record_split(out, hidden, craft, config)
    surrogate_share_, rest = surrogate_share(craft, config.craft_limit, config.seed)
    craft_dir = link_folder(out / "craft", surrogate_share_)
    # Adaptive attackers learn from crafting images the surrogates never trained on when there are
    # enough (so the defender's noise on them is like its noise on the hidden set), else from all of them.
    learn_from = subset(rest if len(rest) >= 2 * CHALLENGE_SIZE else craft, config.attacker_pool, config.seed)
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
    for method, eps in tqdm(settings, desc="study", unit="setting"):
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
