"""Running the study: per setting and seed, the served scored set, the attackers built from bought labels,
every rung scored on the served bytes, then the strongest attacked live over HTTP under each verdict
policy, from one address and from a fresh address per challenge. Every stage is cached under
OUT/cache by the content of its inputs (asirra.runs.input_key): a killed run continues, a changed
weight file, image or setting recomputes exactly the cells that depend on it."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from asirra.captcha.challenge import CHALLENGE_SIZE
from asirra.captcha.experiments.pool import PoolPhoto, _class_orders, _interleaved
from asirra.captcha.experiments.rungs import (
    NEEDS,
    PROBES,
    RESIDUAL_MOVE,
    BoughtPhoto,
    RungContext,
    build_rung,
    built,
    head_logits,
    open_settings,
)
from asirra.captcha.experiments.rungs import practise as rungs_practise
from asirra.captcha.experiments.study.plan import (
    ONE_ADDRESS,
    RECOMMENDED,
    ROTATING,
    SCORE_BATCH,
    SHIPPED,
    StudyConfig,
    StudyError,
    StudyResult,
    pooled,
    setting_name,
)
from asirra.captcha.experiments.study.prepare import (
    harden,
    hardened_photos,
    photos_input,
    surrogate_photos,
    train_surrogate,
)
from asirra.errors import require
from asirra.fileio import write_json_atomic
from asirra.labels import CAT
from asirra.runs import Key, KeyedCache, claim, content_key, input_key
from asirra.stats import wilson_interval

log = logging.getLogger(__name__)

STAGE = {"served": 1, "renderings": 1, "attacker": 1, "score": 1, "cpu": 1, "live": 1, "people": 1, "lookup": 1}
TRUSTED = ("127.0.0.1",)  # the study's bots reach the service through loopback, as through a trusted proxy
PEOPLE_CHALLENGES = 100_000
ADDRESSES = "10.17.0.0/16"  # one-address bots: the i-th cell of a run gets the i-th address


# ---- photos per seed ----------------------------------------------------------------------------------


def seed_roles(hardened: list[PoolPhoto], seed: int, config: StudyConfig) -> tuple[list, list]:
    """(scored, attacker pool in budget order) of one seed: the scored photos drawn from all the service's photos,
    the attacker pool from the first `attacker_pool` of them less the scored ones; disjoint, both stratified."""
    orders = _class_orders(hardened, np.random.default_rng([seed, 71]))
    scored = sorted((p for members in orders.values() for p in members[: config.scored // 2]), key=lambda p: p.name)
    taken = {p.key for p in scored}
    candidates = [p for p in hardened[: config.attacker_pool] if p.key not in taken]
    rest = _class_orders(candidates, np.random.default_rng([seed, 72]))
    return scored, _interleaved(rest, len(candidates))


def photos_to_harden(hardened: list[PoolPhoto], config: StudyConfig) -> list[PoolPhoto]:
    """Every seed's scored photos and the attacker pools' photos: the only ones a setting hardens."""
    wanted = {p.key for seed in config.seeds for p in seed_roles(hardened, seed, config)[0]}
    wanted |= {p.key for p in hardened[: config.attacker_pool]}
    return [p for p in hardened if p.key in wanted]


def photo_file(photo: PoolPhoto, records: dict | None) -> Path:
    """Where the served version of a photo is: its hardened file, or at eps 0 the original."""
    return Path(photo.ref.source) if records is None else Path(records[photo.key]["path"])


def labelled_refs(photos, records: dict | None) -> list:
    """ImageRefs of the photos as served at a setting, for the service."""
    from asirra.data import ImageRef

    return [ImageRef(source=str(photo_file(p, records)), label=p.label, id=p.ref.id) for p in photos]


def files_input(photos, records) -> list:
    return sorted([content_key(photo_file(p, records).read_bytes()), int(p.label)] for p in photos)


# ---- the served scored set ----------------------------------------------------------------------------


def fetch_served(refs: list, seed: int, progress: bool = True) -> list[tuple[bytes, int, str]]:
    """Every pool image once, as the running service serves it over HTTP: (JPEG bytes, label, source)."""
    import httpx

    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service.app import create_app
    from asirra.captcha.service.run import running
    from asirra.captcha.service.store import ordered_pool

    pool = ordered_pool(refs)
    app = create_app(pool, parse_safeguard("none"), open_settings(seed, trusted_proxies=TRUSTED))
    served: dict[int, bytes] = {}
    bar = tqdm(total=len(pool), desc="fetching served images", unit="img", disable=not progress, leave=False)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(200 * len(pool)):  # a bound; coupon collecting needs ~ln(n) n / 12 challenges
            if len(served) == len(pool):
                break
            body = client.post("/api/challenge").raise_for_status().json()
            issued = app.state.store.peek(body["id"])
            for position, image_url in zip(issued.positions, body["images"]):
                if position not in served:
                    served[position] = client.get(image_url).raise_for_status().content
                    bar.update(1)
    bar.close()
    if len(served) < len(pool):
        raise StudyError(f"only {len(served)} of {len(pool)} pool images were served")
    return [(served[i], pool[i].label, pool[i].source) for i in range(len(pool))]


def served_scored(cache: KeyedCache, photos, records, seed: int, setting: str, progress: bool) -> tuple[Key, list]:
    """The scored photos as served over HTTP, fetched once and kept: [(JPEG bytes, label)]."""
    from asirra.captcha.service.settings import ServiceSettings

    key = input_key("served", version=STAGE["served"], files=files_input(photos, records),
                    rendering=asdict(ServiceSettings().rendering), seed=seed)
    folder = cache.folder(key)
    index = folder / "index.json"
    if index.exists():
        cache.reused(key)
        entries = json.loads(index.read_text())
    else:
        cache.note_miss(key, f"served-{setting}-s{seed}")
        entries = []
        for i, (data, label, _) in enumerate(fetch_served(labelled_refs(photos, records), seed, progress)):
            (folder / f"{i:05d}.jpg").write_bytes(data)
            entries.append({"file": f"{i:05d}.jpg", "label": label})
        write_json_atomic(index, entries)
    return key, [((folder / e["file"]).read_bytes(), e["label"]) for e in entries]


# ---- what the attacker bought -------------------------------------------------------------------------


def renderings(cache: KeyedCache, photos, records, setting: str, copies: int = 2) -> tuple[Key, dict]:
    """`copies` served renderings of each photo, rendered with the service's own transform and a generator
    seeded by the photo's content (so every seed that buys a photo bought the same copies) -> {key: [bytes]}."""
    from asirra.captcha.rendering import RenderSettings, render_jpeg
    from asirra.images import load_image

    settings = RenderSettings()
    key = input_key("renderings", version=STAGE["renderings"], files=files_input(photos, records),
                    rendering=asdict(settings), copies=copies)
    folder = cache.folder(key)
    out = {}
    todo = [p for p in photos if not (folder / f"{p.key}.{copies - 1}.jpg").exists()]
    if todo:
        cache.note_miss(key, f"renderings-{setting}")
    else:
        cache.reused(key)
    for photo in todo:
        image = load_image(photo_file(photo, records).read_bytes(), draft_size=settings.image_side[1])
        rng = random.Random(f"render:{photo.key}")
        for r in range(copies):
            (folder / f"{photo.key}.{r}.jpg").write_bytes(render_jpeg(image, rng, settings))
    for photo in photos:
        out[photo.key] = [(folder / f"{photo.key}.{r}.jpg").read_bytes() for r in range(copies)]
    return key, out


def bought_set(attacker_pool, copies: dict, budget: int) -> list[BoughtPhoto]:
    return [BoughtPhoto(p.key, p.label, copies[p.key]) for p in attacker_pool[:budget]]


# ---- rungs --------------------------------------------------------------------------------------------


def middle_budget(config: StudyConfig) -> int:
    return config.budgets[1] if len(config.budgets) > 1 else config.budgets[0]


def rung_budgets(name: str, config: StudyConfig) -> list[int]:
    """Which budgets a rung is built at: probes at every one (seconds each once the features are stored); the
    fine-tuned model, the ensemble and self-training at the middle one (minutes each: the compute budget)."""
    if name in ("bought-labels", "bought-aug", "residual"):
        return list(config.budgets)
    if name in ("finetune", "ensemble", "self-trained", "lookup"):
        return [middle_budget(config)]
    return []


def rung_label(name: str, budget: int | None) -> str:
    return name if budget is None else f"{name}@{budget}"


class Study:
    """One run's state: the config, the cache, the pool and the stage timings."""

    def __init__(self, data, out, config: StudyConfig, split_file=None, progress: bool = True):
        from asirra.captcha.experiments.features import FeatureStore
        from asirra.captcha.experiments.pool import load_pool

        self.out, self.config, self.progress = Path(out), config, progress
        self.cache = KeyedCache(self.out / "cache")
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()
        self.photos = load_pool(data, split_file, progress=progress)
        self.surrogate = train_surrogate(self.cache, surrogate_photos(self.photos, config), config)
        self.hardened = hardened_photos(self.photos, config)
        self.store = FeatureStore(self.out / "cache")
        self.lap("pool_and_surrogate")
        self._shipped = None

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - self._clock, 1)
        self._clock = now

    def shipped(self):
        if self._shipped is None:
            from asirra.predict import load_classifier

            self._shipped = load_classifier(None)
        return self._shipped

    # -- rungs --

    def rung_key(self, name: str, budget: int, seed: int, bought: list[BoughtPhoto], members: dict) -> Key:
        from asirra.captcha.experiments.rungs import LOOKUP_RATIO, PROBE_C
        from asirra.models import default_model_path

        inputs = {"bought": sorted([b.key, b.label, [content_key(r) for r in b.renderings]] for b in bought),
                  "features": self.store.key, "c": PROBE_C, "budget": budget, "seed": seed}
        if name == "finetune":
            inputs["epochs"] = self.config.finetune_epochs
        if name == "ensemble":
            inputs["shipped"] = default_model_path()
        if name == "lookup":
            inputs["ratio"] = LOOKUP_RATIO
        return input_key("attacker", version=STAGE["attacker"], name=name, members=members, **inputs)

    def build(self, name: str, budget: int, bought, seed: int, members: dict, practice=None) -> tuple[Key, Path, dict]:
        key = self.rung_key(name, budget, seed, bought, {m: k for m, (k, _) in members.items()})
        folder = self.cache.folder(key)
        record = built(folder)
        if record is None:
            self.cache.note_miss(key, f"{name}@{budget}-s{seed}")
            ctx = RungContext(self.store, seed=seed, members={m: f for m, (_, f) in members.items()},
                              practice=practice, progress=self.progress)
            options = {"epochs": self.config.finetune_epochs} if name == "finetune" else {}
            record = build_rung(name, folder, bought, ctx, **options)
        else:
            self.cache.reused(key)
        return key, folder, record

    # -- scoring --

    def logits(self, name: str, folder: Path | None, served: list, move: str) -> np.ndarray:
        """A rung's logits P(dog) on the served images with a counter-move (probes read from stored features;
        the ensemble from its members' logits, weighted as its solver.json says)."""
        images = [data for data, _ in served]
        if name in PROBES or name == "self-trained":
            return head_logits(self.store, folder, images, move)
        if name == "ensemble":
            spec = json.loads((folder / "solver.json").read_text())
            total = np.full(len(images), spec["bias"])
            for member in spec["members"]:
                z = self.logits(SHIPPED, None, served, member["move"]) if member["model"] is None else \
                    head_logits(self.store, folder / member["model"], images, member["move"])
                total = total + member["weight"] * z
            return total
        solver = solver_for(self, name, folder, move)
        return np.concatenate([solver.logits(images[i:i + SCORE_BATCH]) for i in range(0, len(images), SCORE_BATCH)])

    def score(self, served_key: Key, served: list, name: str, budget, attacker_key: Key | None,
              folder: Path | None, move: str, label: str) -> dict:
        key = input_key("score", version=STAGE["score"], served=served_key, attacker=attacker_key or name, move=move)

        def compute():
            z = self.logits(name, folder, served, move)
            correct = [bool((zi < 0) == (lab == CAT)) for zi, lab in zip(z, (lab for _, lab in served))]
            return score_summary(correct)

        return self.cache.get_or_compute(key, compute, label=label)

    def solver_cpu(self, name: str, folder: Path | None, move: str, served: list, attacker_key) -> float:
        """CPU-seconds per image of the rung answering as the live bot does (no service running meanwhile)."""
        key = input_key("cpu", version=STAGE["cpu"], attacker=attacker_key or name, move=move)

        def compute():
            solver = solver_for(self, name, folder, move)
            images = [data for data, _ in served[: 4 * CHALLENGE_SIZE]]
            solver.solve(images[:CHALLENGE_SIZE])  # warm-up: sessions, arenas
            start = time.process_time()
            for i in range(0, len(images), CHALLENGE_SIZE):
                solver.solve(images[i:i + CHALLENGE_SIZE])
            return {"cpu_seconds_per_image": (time.process_time() - start) / len(images), "images": len(images)}

        return self.cache.get_or_compute(key, compute)["cpu_seconds_per_image"]


def score_summary(correct: list[bool]) -> dict:
    n, k = len(correct), sum(correct)
    low, high = wilson_interval(k, n)
    acc = k / n
    return {"n": n, "correct": k, "accuracy": acc, "accuracy_low": low, "accuracy_high": high,
            "p12": acc ** CHALLENGE_SIZE, "p12_low": low ** CHALLENGE_SIZE, "p12_high": high ** CHALLENGE_SIZE,
            "flags": correct}


# ---- live ---------------------------------------------------------------------------------------------


def live_cell(study: Study, refs: list, solver, policy: str, identity, n: int, seed: int, key: Key,
              label: str, observe=None) -> dict:
    """One live attack on a fresh service (its own state and counters), cached under its key."""
    def compute():
        from asirra.captcha.attack.bot import attack
        from asirra.captcha.safeguards import parse_safeguard
        from asirra.captcha.service.app import create_app
        from asirra.captcha.service.run import running
        from asirra.captcha.service.settings import ServiceSettings

        settings = ServiceSettings(seed=seed, trusted_proxies=TRUSTED)
        app = create_app(refs, parse_safeguard(policy), settings)
        with running(app) as url:
            report = attack(url, n, solver, identity=identity, max_wait=7200, progress=study.progress,
                            concurrency=2 if identity.name == ROTATING else 1, observe=observe)
        result = report.to_dict()
        result["timeline"] = report.timeline
        result["counters"] = app.state.store.counters()
        result["limits"] = {"challenge_rate": settings.challenge_rate, "challenge_burst": settings.challenge_burst,
                            "request_rate": settings.request_rate, "request_burst": settings.request_burst}
        return result

    return study.cache.get_or_compute(key, compute, label=label)


def limit_rate(result: dict, views_fetched: int = CHALLENGE_SIZE) -> float:
    """Challenges per hour the limits allow one address: the challenge rate, or the request rate over the
    requests a challenge takes (1 + 12 images + 1 answer), whichever binds."""
    limits = result["limits"]
    return 3600 * min(limits["challenge_rate"], limits["request_rate"] / (views_fetched + 2))


# ---- the study ----------------------------------------------------------------------------------------


def run_study(data, out, config: StudyConfig, split_file=None, prices_file=None, progress: bool = True) -> StudyResult:
    from asirra.captcha.experiments import bill as billing
    from asirra.captcha.experiments.study.report import write_outputs

    require("fastapi", "serve")
    require("uvicorn", "serve")
    out = Path(out)
    claim(out, {**asdict(config), "data": str(data)}, "study.json", "study", restamp=True,
          keys=("method", "surrogate", "surrogate_seed", "surrogate_images"))
    study = Study(data, out, config, split_file, progress)
    write_json_atomic(out / "split.json", split_record(study))
    cells, live, builds, policies, lookup = [], [], [], {}, {}
    for eps in config.epsilons:
        setting = setting_name(config.method, eps)
        records = harden(study.cache, photos_to_harden(study.hardened, config), config, eps, study.surrogate,
                         progress) if eps else None
        study.lap("harden")
        per_seed = {}
        for seed in config.seeds:
            per_seed[seed] = setting_seed(study, setting, eps, records, seed, cells, builds)
        strongest, runner_up = choose(cells, setting, config)
        policies[setting] = policy_specs(config)
        study.lap("policy")
        for seed in config.seeds:
            live += live_cells(study, setting, eps, records, seed, per_seed[seed], strongest, runner_up, policies[setting])
        if "lookup" in config.attackers and eps:  # against clean photos the story is the same, and cheaper to tell
            lookup[setting] = lookup_live(study, setting, eps, records, per_seed[config.seeds[0]], policies[setting])
        study.lap("live")
    specs = list(dict.fromkeys(p for s in policies.values() for p in s.values()))
    people = billing.people_rows(specs, PEOPLE_CHALLENGES, config.seeds[0])
    # Behind one address with the strongest bot of the last (most hardened) setting: what a per-address policy costs.
    strongest_accuracy = pooled(cells, setting, *strongest)["accuracy"]
    people += [{**billing.shared_address_people(spec, strongest_accuracy, seed=config.seeds[0]), "shared_with": strongest[0],
                "setting": setting} for spec in specs]
    if "lookup" in config.attackers:
        queries = min(300, len(study.photos) // 4)
        sizes = [n for n in (30, 100, 300, 1000, 3000) if n + queries <= len(study.photos)]
        lookup["precision"] = billing.matcher_precision(study.photos, config.seeds[0], progress, sizes, queries)
    study.lap("people_and_lookup")
    from asirra.cpu import describe_cpu

    # The attacker's CPU-seconds per challenge price the bill: the CPU they were measured on goes beside them.
    result = StudyResult(out, config, cells, live, builds, people, lookup, policies, timings=study.timings,
                         cache_stats=study.cache.stats, machine=describe_cpu())
    prices = billing.load_prices(prices_file)
    result.bill = billing.bill(result, prices)
    result.goal = billing.goal_check(result, prices)
    result.files = write_outputs(result, prices, prices_file)
    return result


def split_record(study: Study) -> dict:
    config = study.config
    record = {"rule": "surrogate set: stratified, drawn by the surrogate seed from the pool; the service's photos: a "
                      "stratified order of the rest (surrogate seed), its first --hardened; per seed: the scored set "
                      "stratified from the service's photos by the seed, the attacker pool the first --attacker-pool "
                      "of them less the scored set, in a seeded stratified order (budgets are its prefixes)",
              "surrogate": photos_input(surrogate_photos(study.photos, config)),
              "hardened": photos_input(study.hardened), "seeds": {}}
    for seed in config.seeds:
        scored, pool = seed_roles(study.hardened, seed, config)
        record["seeds"][str(seed)] = {"scored": photos_input(scored), "attacker": [[p.key, int(p.label)] for p in pool]}
    return record


def setting_seed(study: Study, setting: str, eps: int, records, seed: int, cells: list, builds: list) -> dict:
    """Serve the scored set, build every rung from bought labels, score every rung x move: one seed at one setting."""
    config = study.config
    scored, pool = seed_roles(study.hardened, seed, config)
    served_key, served = served_scored(study.cache, scored, records, seed, setting, study.progress)
    study.lap("serve_and_fetch")
    rungs: dict[str, tuple] = {}  # label -> (name, budget, key, folder)
    if SHIPPED in config.attackers:
        rungs[SHIPPED] = (SHIPPED, None, None, None)
    adaptive = [a for a in config.attackers if a not in (SHIPPED, "lookup")] if eps else []
    copies = renderings(study.cache, pool, records, setting)[1] if adaptive else {}
    study.lap("renderings")
    practice_pool = pool[middle_budget(config):]
    order = sorted(adaptive, key=lambda a: len(NEEDS.get(a, ())))  # members before the rungs built on them
    for name in order:
        for budget in rung_budgets(name, config):
            if budget > len(pool):
                continue
            members = {m: rungs[rung_label(m, budget)][2:] for m in NEEDS.get(name, ())
                       if rung_label(m, budget) in rungs}
            if len(members) < len(NEEDS.get(name, ())):
                continue
            practice = None
            if name == "self-trained":
                # A one-seed side row: practice costs minutes of live challenges per seed.
                if not practice_pool or seed != config.seeds[0]:
                    continue
                practice = lambda folder, s=seed: practise(study, setting, records, practice_pool, folder, s)  # noqa: E731
            bought = bought_set(pool, copies, budget)
            key, folder, record = study.build(name, budget, bought, seed, members, practice)
            rungs[rung_label(name, budget)] = (name, budget, key, folder)
            builds.append({"setting": setting, "epsilon": eps, "seed": seed, "attacker": rung_label(name, budget),
                           "rung": name, "budget": budget, **{k: v for k, v in record.items() if k in (
                               "labels_bought", "build_seconds", "build_cpu_seconds", "features_computed",
                               "practice_challenges", "practice_passed", "practice_bytes", "self_labelled_images",
                               "weights")}})
            study.lap("attackers")
    for label, (name, budget, key, folder) in rungs.items():
        moves = [RESIDUAL_MOVE] if name == "residual" else ["own"] if name == "ensemble" else list(config.moves)
        for move in moves:
            score = study.score(served_key, served, name, budget, key, folder, move,
                                label=f"{setting}-s{seed}-{label}-{move}")
            cells.append({"setting": setting, "epsilon": eps, "seed": seed, "attacker": label, "rung": name,
                          "budget": budget, "move": move, **score, **ssim_summary(records, scored)})
    study.lap("score")
    return {"scored": scored, "pool": pool, "served": served, "served_key": served_key, "rungs": rungs}


def ssim_summary(records, scored) -> dict:
    if records is None:
        return {"ssim_median": 1.0, "ssim_p10": 1.0, "psnr_median": None}
    ssims = [records[p.key]["ssim"] for p in scored]
    psnrs = [records[p.key]["psnr"] for p in scored if records[p.key]["psnr"] is not None]
    return {"ssim_median": float(np.median(ssims)), "ssim_p10": float(np.percentile(ssims, 10)),
            "psnr_median": float(np.median(psnrs)) if psnrs else None}


def choose(cells: list, setting: str, config: StudyConfig) -> tuple[tuple[str, str], tuple[str, str] | None]:
    """The strongest and the runner-up (attacker, move) at a setting: highest pooled per-image accuracy over
    every seed that built them (ties to the cheaper: fewer labels, then the listed order)."""
    mine = [c for c in cells if c["setting"] == setting]
    pairs = sorted({(c["attacker"], c["move"]) for c in mine})
    complete = [p for p in pairs if sum(1 for c in mine if (c["attacker"], c["move"]) == p) == len(config.seeds)]
    ranked = sorted(complete, key=lambda p: (-pooled(cells, setting, *p)["accuracy"], _budget_of(p[0])))
    best_per_attacker = []
    for pair in ranked:
        if pair[0] not in [a for a, _ in best_per_attacker]:
            best_per_attacker.append(pair)
    return best_per_attacker[0], best_per_attacker[1] if len(best_per_attacker) > 1 else None


def _budget_of(label: str) -> int:
    return int(label.split("@")[1]) if "@" in label else 0


RECOMMENDED_AGAINST = 0.99  # the bot `asirra captcha defend --accuracy 0.99` recommends against (the README's row)


def policy_specs(config: StudyConfig) -> dict:
    """Each policy name of the run -> the safeguard spec it stands for, each spec once. "recommended" is what
    `asirra captcha defend --accuracy 0.99` recommends (people at 99.6%): the grid's choice a site would deploy."""
    from asirra.captcha.experiments.defend_grid import compare_safeguards

    specs = {}
    for policy in config.policies:
        spec = policy
        if policy == RECOMMENDED:
            report = compare_safeguards(bot_accuracy=RECOMMENDED_AGAINST, n_challenges=20_000,
                                        sweep_accuracies=(RECOMMENDED_AGAINST,), sweep_challenges=100, seed=0)
            if report.recommended is None:
                raise StudyError("no safeguard keeps simulated people above the floor: nothing to recommend")
            spec = report.recommended["safeguard"]
        if spec not in specs.values():
            specs[policy] = spec
    return specs


def live_cells(study: Study, setting: str, eps: int, records, seed: int, state: dict, strongest, runner_up,
               policies: dict) -> list:
    """The headline cells (the strongest rung, every policy from one address, the recommended one also rotating)
    and, on the first seed, the side cells (the runner-up from one address)."""
    from asirra.captcha.attack.bot import OneAddress, Rotating

    config = study.config
    refs = labelled_refs(state["scored"], records)
    rows = []
    plan = []
    for policy, spec in policies.items():
        plan.append((strongest, policy, spec, ONE_ADDRESS, config.live_challenges, "headline"))
        if spec != "none":
            plan.append((strongest, policy, spec, ROTATING, config.live_challenges, "headline"))
    if runner_up is not None and seed == config.seeds[0]:
        for policy, spec in policies.items():
            plan.append((runner_up, policy, spec, ONE_ADDRESS, config.side_challenges, "side"))
    for i, ((attacker, move), policy, spec, identity_name, n, role) in enumerate(plan):
        name, budget, key, folder = state["rungs"][attacker]
        identity = Rotating() if identity_name == ROTATING else OneAddress(f"10.17.{seed}.{i + 1}")
        cell_key = input_key("live", version=STAGE["live"], served=state["served_key"], attacker=key or name,
                             move=move, policy=spec, identity=identity_name, n=n, seed=seed)
        solver = solver_for(study, name, folder, move)
        result = live_cell(study, refs, solver, spec, identity, n, seed, cell_key,
                           label=f"{setting}-s{seed}-{attacker}-{move}-{spec}-{identity_name}")
        cpu = study.solver_cpu(name, folder, move, state["served"], key)
        result = {k: v for k, v in result.items() if k != "timeline"} | {"timeline": result.get("timeline", [])}
        rows.append({"setting": setting, "epsilon": eps, "seed": seed, "attacker": attacker, "move": move,
                     "policy": policy, "safeguard": spec, "identity": identity_name, "role": role, "challenges": n,
                     "cpu_seconds_per_challenge": cpu * CHALLENGE_SIZE, "limit_challenges_per_hour": limit_rate(result),
                     **result})
    return rows


def solver_for(study: Study, name: str, folder: Path | None, move: str):
    from asirra.captcha.attack.counter import parse_preprocess
    from asirra.captcha.attack.solvers import MovedSolver, load_solver
    from asirra.predict import load_classifier

    if name == "ensemble":
        return load_solver(folder)
    classifier = study.shipped() if name == SHIPPED else load_classifier(folder / "model")
    return MovedSolver(classifier, parse_preprocess(move))


def practise(study: Study, setting: str, records, photos, folder: Path, seed: int) -> tuple[list, dict]:
    """Self-training's practice: the rung attacks a service serving photos it never bought (no scored one),
    from a fresh address per challenge; the photos of every passed challenge come back with its answers."""
    from asirra.captcha.attack.bot import Rotating
    from asirra.captcha.attack.solvers import load_solver
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service.app import create_app
    from asirra.captcha.service.run import running

    app = create_app(labelled_refs(photos, records), parse_safeguard("none"), open_settings(seed, trusted_proxies=TRUSTED))
    with running(app) as url:
        return rungs_practise(url, study.config.practice_challenges, load_solver(folder), Rotating(), study.progress)


def lookup_live(study: Study, setting: str, eps: int, records, state: dict, policies: dict) -> dict:
    """The lookup attack against the fixed scored pool, live from one address: every photo it has not seen
    is bought from the farm (the truth of the photo it shows: the defender-side match to the pool's files)
    and remembered; it pays for a photo once."""
    from asirra.captcha.attack.bot import OneAddress
    from asirra.captcha.attack.solvers import LookupSolver, thumbnail

    config = study.config
    scored = state["scored"]
    files = [photo_file(p, records) for p in scored]
    truth = np.stack([thumbnail(f.read_bytes()) for f in files])
    labels = np.array([p.label for p in scored])
    rows = []
    for policy, spec in policies.items():
        farm = {"bought": 0}

        def buy(image, farm=farm):
            farm["bought"] += 1
            return bool(labels[int(np.argmin(((truth - thumbnail(image)) ** 2).sum(1)))] == CAT)

        solver = LookupSolver(fallback=buy, learn=True)
        n = config.side_challenges
        key = input_key("live", version=STAGE["live"], served=state["served_key"], attacker="lookup-relay",
                        policy=spec, identity=ONE_ADDRESS, n=n, seed=config.seeds[0], ratio=solver.ratio)
        cached = study.cache.get(key)
        if cached is None:
            result = live_cell(study, labelled_refs(scored, records), solver, spec, OneAddress("10.17.99.1"), n,
                               config.seeds[0], key, label=f"{setting}-lookup-{spec}")
            result["labels_bought"] = farm["bought"]
            result["looked_up"] = solver.looked_up
            study.cache.put(key, result)
        else:
            study.cache.reused(key)
            result = cached
        rows.append({"setting": setting, "epsilon": eps, "policy": policy, "safeguard": spec, "pool": len(scored),
                     **{k: v for k, v in result.items() if k != "timeline"}, "timeline": result.get("timeline", [])})
    return {"live": rows}
