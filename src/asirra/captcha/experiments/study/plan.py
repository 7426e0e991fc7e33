"""The study's plan: its settings, how the pool splits into hidden (scored) and crafting images,
and the names of its pools and settings. Nothing here trains, serves or scores."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from asirra.captcha.challenge import CHALLENGE_SIZE
from asirra.captcha.experiments.ladder import ADAPTIVE
from asirra.errors import ConfigError
from asirra.labels import CLASS_NAMES
from asirra.runs import claim
from asirra.stats import stratified_subset

log = logging.getLogger(__name__)

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


class StudyError(ConfigError):
    """Study settings or an output folder the study cannot use; the message is one line."""


@dataclass(frozen=True)
class StudyConfig:
    """The hardening study's matrix: what `asirra.captcha.study` and `asirra captcha study` run.
    
    Checked when made; `quick=True` is a few-minute version of it."""

    scored: int = 300
    """Hidden images scored in every cell (half per class)"""
    craft_limit: int | None = 600
    """Crafting images the surrogates train on (None: all of them)"""
    methods: tuple[str, ...] = ("pgd",)
    """Hardening methods (asirra.harden's)"""
    epsilons: tuple[int, ...] = (0, 2, 4, 8, 16)
    """In 0..255 units."""
    attackers: tuple[str, ...] = (SHIPPED,)
    """"shipped", model folders, or attacker-ladder names (lite2-probe, bought-labels, adv-trained, passed-challenges,
    seed-cnn-alt)"""
    preprocess: tuple[str, ...] = ("none", "jpeg:75", "median:3")
    """The attackers' counter-moves; + chains steps, e.g. jpeg:75+median:3."""
    surrogates: tuple[str, ...] = ("effnet-lite0",)
    """The defender's models, trained on the crafting images."""
    steps: int | None = None
    """Harden's default per method."""
    eot: int = 2
    """Random service transformations averaged per gradient."""
    surrogate_epochs: int = 30
    """Epochs the surrogates train."""
    headline: str = "strongest"
    """"strongest", "all", or "none": which cells get a live attack."""
    live_challenges: int = 60
    """Challenges per live attack."""
    # Crafting images (outside the surrogates' training subset) an adaptive attacker may learn from,
    # hardened like the served pool at each setting; the hidden set stays hidden from it too.
    attacker_pool: int = 300
    """Crafting images (outside the surrogates' training share) an adaptive attacker may learn from, hardened like the
    served pool at each setting."""
    # The classic baseline: random distortions (asirra.captcha.defend.distort kinds, "kind" or "kind:strength"),
    # served and attacked like the hardened pools; not bounded in L-infinity, so they have no epsilon.
    baselines: tuple[str, ...] = ()
    """The classic baseline: random distortions ("kind" or "kind:strength"), served and attacked like the hardened
    pools."""
    machine_cost: float = MACHINE_COST_PER_HOUR
    """Dollars per 2-vCPU hour, for the bot's cost per thousand passes."""
    seed: int = 0
    """Seeds the split, the surrogates, the hardening and the attacks."""

    def __post_init__(self):
        from asirra.captcha.attack.counter import parse_preprocess
        from asirra.captcha.defend.config import METHODS

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
    """A study in a few minutes: a tiny hidden set, 2 epsilons, fgsm, a noise baseline, one counter-move, a toy
    surrogate."""
    base = StudyConfig(scored=24, craft_limit=48, methods=("fgsm",), epsilons=(0, 8), preprocess=("none", "jpeg:75"),
                       surrogates=("seed-cnn",), surrogate_epochs=1, eot=1, live_challenges=12, baselines=("noise",))
    return replace(base, **overrides)


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_moves(text: str) -> tuple[str, ...]:
    """ "none,jpeg:75,jpeg:75+median:3" -> ("none", "jpeg:75", "jpeg:75,median:3"): + chains steps of one move."""
    return tuple(part.replace("+", ",") for part in parse_list(text))


def parse_epsilons(text: str) -> tuple[int, ...]:
    """ "0,2,4,8,16" -> (0, 2, 4, 8, 16): whole 255ths, read by the one epsilon rule ("4/255" is 4 too)."""
    from asirra.captcha.defend.config import epsilon_in_255ths

    return tuple(epsilon_in_255ths(part) for part in parse_list(text))


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


def record_split(out: Path, hidden: list, craft: list, config: StudyConfig) -> None:
    """split.json: which images are hidden and which craft; a rerun must split the same way."""
    record = {"rule": SPLIT_RULE, "seed": config.seed, "scored": config.scored,
              "hidden": [r.source for r in hidden], "craft": [r.source for r in craft]}
    claim(out, record, "split.json", "study", keys=("hidden", "craft"))


def surrogate_share(craft: list, limit: int | None, seed: int) -> tuple[list, list]:
    """(the crafting images the surrogates train on, the rest): a seeded stratified subset."""
    chosen = subset(craft, limit, seed)
    taken = {r.source for r in chosen}
    return chosen, [r for r in craft if r.source not in taken]


def subset(refs: list, limit: int | None, seed: int) -> list:
    """A seeded stratified subset of `refs` in their own order (all of them without a limit)."""
    if not limit or limit >= len(refs):
        return list(refs)
    return [refs[i] for i in sorted(stratified_subset(np.array([r.label for r in refs]), limit, seed).tolist())]


def link_folder(folder: Path, chosen: list) -> Path:
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


def is_adaptive(name: str) -> bool:
    """Adaptive rungs learn from the defended pool as served, so each setting gets its own build."""
    return name in ADAPTIVE


def distortion(spec: str):
    """ "noise" or "noise:20" -> its DistortConfig (the default strength when none is given)."""
    from asirra.captcha.defend.distort import DistortConfig, DistortError

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
