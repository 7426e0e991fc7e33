"""The study's plan: its settings, which photos play which role, and the names of settings and cells.
Nothing here trains, serves or scores."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from asirra.captcha.challenge import CHALLENGE_SIZE
from asirra.captcha.experiments.ladder import RUNGS, SHIPPED
from asirra.errors import ConfigError
from asirra.stats import wilson_interval

log = logging.getLogger(__name__)

GOAL_PASS_RATE = 0.10  # (a): the strongest one-address attacker's upper 95% end must be at most this
GOAL_SSIM = 0.90
GOAL_PEOPLE = 0.99
GOAL_DOLLARS_PER_THOUSAND = 1.0  # (b): what a thousand passes must cost an attacker free to rotate addresses
CLEAN = "none"  # the method name of the epsilon-0 row: no hardening at all
SCORE_BATCH = 32  # served images per classifier call when scoring a cell
RECOMMENDED = "recommended"  # the policy `asirra captcha defend` recommends for the measured bot
ONE_ADDRESS, ROTATING = "one-address", "rotating"
HEADLINE_SEEDS, HEADLINE_CHALLENGES = 3, 200  # below these a run is exploratory and can never meet the goal


class StudyError(ConfigError):
    """Study settings or an output folder the study cannot use; the message is one line."""


@dataclass(frozen=True)
class StudyConfig:
    """The attacker's-bill study: what `asirra.captcha.study` and `asirra captcha study` run.

    Hardening x verdict policy x attacker x identity, attacked live over HTTP, with what a thousand passes
    cost. Checked when made (a `StudyError` names the first bad field); `quick_config()` is a few-minute
    version of it."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """Each draws its own scored set, attacker pool, labels and challenges."""
    scored: int = 300
    """Photos per seed the service serves and every cell is scored on (half per class)."""
    # PGD took 0.4-6 CPU-s a photo on this shared machine, and 3,300 photos did not all fit the budget: only the
    # scored sets and the attacker pools are hardened, once per setting, not once per seed.
    hardened: int = 3300
    """The service's photos: every seed draws its scored set from these."""
    attacker_pool: int = 1300
    """Each seed's attacker pool: the first this many service photos, less its scored ones."""
    surrogate_images: int = 500
    """The defender's surrogate trains on these (never hardened, scored or bought)."""
    surrogate_seed: int = 0
    """Draws the surrogate's photos and the service's photos from the pool."""
    surrogate: str = "effnet-lite0"
    """The defender's model the hardening is crafted against."""
    surrogate_epochs: int = 30
    """Epochs the surrogate trains."""
    method: str = "pgd"
    """The hardening method (asirra.harden's)."""
    epsilons: tuple[int, ...] = (0, 4)
    """In 0..255 units; 0 serves the photos unhardened."""
    steps: int | None = None
    """Harden's default for the method."""
    eot: int = 2
    """Random service transformations averaged per gradient."""
    bf16: bool = True
    """The surrogate's passes in bfloat16 while hardening (`HardenConfig.bf16`)."""
    budgets: tuple[int, ...] = (300, 1000)
    """Labels bought; nested prefixes of each seed's attacker pool."""
    attackers: tuple[str, ...] = ("shipped", "bought-labels", "bought-aug", "residual", "finetune", "ensemble",
                                  "self-trained", "lookup")
    """The ladder's rungs (`asirra captcha build-attacker` builds each)."""
    moves: tuple[str, ...] = ("none", "jpeg:50,median:5")
    """Counter-moves every classifier rung is scored with."""
    policies: tuple[str, ...] = ("none", RECOMMENDED)
    """Verdict policies served: "none", "recommended" (what `captcha defend` recommends) or a safeguard spec."""
    live_challenges: int = 200
    """Per headline cell and seed."""
    side_challenges: int = 100
    """Per side cell (seed 0 only: the runner-up rung, lookup)."""
    practice_challenges: int = 200
    """Self-training (first seed only): challenges against the practice service."""
    finetune_epochs: int = 6
    """Epochs the top-block fine-tuning rung trains."""
    exploratory: bool = False
    """Allow fewer seeds or challenges than a headline needs (such a run never meets the goal)."""
    quick: bool = field(default=False, metadata={"key": False})
    """The tests' few-minute version (set by `quick_config`)."""

    def __post_init__(self):
        from asirra.captcha.attack.counter import parse_preprocess
        from asirra.captcha.defend.config import METHODS

        if self.scored < CHALLENGE_SIZE or self.scored % 2:
            raise StudyError(f"--scored must be an even number of at least {CHALLENGE_SIZE}, got {self.scored}")
        if self.method not in METHODS:
            raise StudyError(f"unknown method {self.method!r}; harden knows {', '.join(METHODS)}")
        if any(not 0 <= e <= 64 for e in self.epsilons) or len(set(self.epsilons)) != len(self.epsilons) \
                or not self.epsilons:
            raise StudyError(f"epsilons must be distinct integers in 0..64 (units of 1/255), got {self.epsilons}")
        unknown = [a for a in self.attackers if a not in RUNGS]
        if unknown:
            raise StudyError(f"unknown attacker {unknown[0]!r}; the ladder has {', '.join(RUNGS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise StudyError(f"give distinct seeds, got {self.seeds}")
        if not self.budgets or any(b < CHALLENGE_SIZE or b % 2 for b in self.budgets) or list(self.budgets) != sorted(set(self.budgets)):
            raise StudyError(f"budgets must be increasing even numbers of at least {CHALLENGE_SIZE}, got {self.budgets}")
        if self.attacker_pool - self.scored < self.budgets[-1] or self.attacker_pool > self.hardened:
            raise StudyError(f"--attacker-pool {self.attacker_pool} (at most --hardened {self.hardened}) cannot hold a "
                             f"budget of {self.budgets[-1]} beside a seed's scored photos")
        for spec in self.moves:
            parse_preprocess(spec)  # CounterError (a ValueError) names the bad step
        bad = [p for p in self.policies if p != RECOMMENDED]
        for spec in bad:
            from asirra.captcha.safeguards import parse_safeguard

            parse_safeguard(spec)
        if self.live_challenges < 1 or self.side_challenges < 1:
            raise StudyError("live and side challenges must be at least 1")
        if not self.exploratory and (len(self.seeds) < HEADLINE_SEEDS or self.live_challenges < HEADLINE_CHALLENGES):
            raise StudyError(f"a headline run needs at least {HEADLINE_SEEDS} seeds and {HEADLINE_CHALLENGES} live "
                             "challenges per cell; pass --exploratory for a smaller run (it can never meet the goal)")

    @property
    def headline(self) -> bool:
        """Whether this run's cells can meet the goal (not exploratory: enough seeds and challenges)."""
        return not self.exploratory


@dataclass
class StudyResult:
    """What a study found, as results.json keeps it (`from_json` reads it back for `asirra captcha bill`)."""

    out: Path
    """The study's folder."""
    config: StudyConfig
    """The settings it ran with."""
    cells: list
    """Offline scores: setting x seed x rung x move, each with its 95% interval and SSIM."""
    live: list
    """Live cells: setting x seed x policy x identity x rung, passes, refusals, sustained rate, bytes, counters."""
    builds: list
    """Every rung built: labels bought, CPU-seconds."""
    people: list
    """Simulated people under each policy, alone and behind one address with a bot."""
    lookup: dict
    """The lookup attack: matcher precision by table size, and its live cells."""
    policies: dict
    """Setting -> {policy name: the safeguard spec it stood for}."""
    goal: dict = field(default_factory=dict)
    """The goal check, on the far ends of the 95% intervals: (a) one address, (b) the bill, people, SSIM."""
    bill: dict = field(default_factory=dict)
    """Dollars per thousand passes for each pooled live cell, from the cited prices."""
    files: dict = field(default_factory=dict)
    """The files written, by name: "report" (report.md), "json", the plots."""
    timings: dict = field(default_factory=dict)
    """Seconds per stage."""
    cache_stats: dict = field(default_factory=dict)
    """Cache hits and misses per kind."""
    machine: dict = field(default_factory=dict)
    """The CPU it ran on (`asirra.cpu.describe_cpu`): the attackers' CPU-seconds price the bill."""

    @classmethod
    def from_json(cls, path: str | Path) -> "StudyResult":
        """The result a study wrote, read back.

        Args:
            path: The study's results.json.

        Returns:
            The `StudyResult` it holds (files and the bill are recomputed by `asirra captcha bill`).
        """
        import json

        data = json.loads(Path(path).read_text())
        config = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["config"].items()})
        return cls(Path(path).parent, config, data["cells"], data["live"], data["builds"], data["people"],
                   data["lookup"], data["policies"], timings=data.get("timings", {}),
                   cache_stats=data.get("cache_stats", {}), machine=data.get("machine", {}))


def pooled(cells: list, setting: str, attacker: str, move: str) -> dict | None:
    """One (setting, attacker, move) pooled over the seeds that scored it: counts, accuracy with its Wilson 95%
    interval, p^12, and each seed's accuracy beside them (their spread); None when no seed scored it."""
    rows = [c for c in cells if c["setting"] == setting and c["attacker"] == attacker and c["move"] == move]
    if not rows:
        return None
    k, n = sum(c["correct"] for c in rows), sum(c["n"] for c in rows)
    low, high = wilson_interval(k, n)
    return {"correct": k, "n": n, "accuracy": k / n, "low": low, "high": high, "p12": (k / n) ** CHALLENGE_SIZE,
            "per_seed": [c["accuracy"] for c in rows], "p12_per_seed": [c["p12"] for c in rows], "seeds": len(rows)}


def quick_config(**overrides) -> StudyConfig:
    """A study in a few minutes on a synthetic pool: tiny roles, fgsm at eps 8, a toy surrogate, few challenges."""
    base = StudyConfig(seeds=(0, 1), scored=24, hardened=96, attacker_pool=72, surrogate_images=24, surrogate="seed-cnn",
                       surrogate_epochs=1, method="fgsm", epsilons=(0, 8), eot=1, bf16=False, budgets=(24, 48),
                       attackers=("shipped", "bought-labels", "bought-aug", "residual", "ensemble", "lookup"),
                       moves=("none", "jpeg:50,median:5"), live_challenges=6, side_challenges=6,
                       practice_challenges=12, exploratory=True, quick=True)
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


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in parse_list(text))
    except ValueError:
        raise StudyError(f"expected comma-separated whole numbers, got {text!r}") from None


def setting_name(method: str, eps: int) -> str:
    return CLEAN if eps == 0 else f"{method}-e{eps}"


def is_classifier(name: str) -> bool:
    """Rungs scored image by image (lookup answers from a table and is measured on its own)."""
    return name != "lookup"


__all__ = ["CLEAN", "GOAL_PASS_RATE", "GOAL_SSIM", "GOAL_PEOPLE", "GOAL_DOLLARS_PER_THOUSAND", "SHIPPED",
           "StudyConfig", "StudyError", "quick_config"]
