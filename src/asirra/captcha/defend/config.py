"""What a hardening is, as settings: the methods, their step counts, and epsilon with its one unit rule.

Light on purpose (no torch): the CLI and the study read the defaults and parse epsilons from here;
asirra.captcha.defend.harden does the crafting.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

from asirra.errors import ConfigError

METHODS = ("fgsm", "pgd", "random-target", "feature", "balanced-target", "universal", "universal-uncertain")
UNIVERSAL = ("universal", "universal-uncertain")  # one pattern for every image; `steps` = passes over the crafting set
DEFAULT_STEPS = {"fgsm": 1, "pgd": 4, "random-target": 4, "feature": 4, "balanced-target": 4, "universal": 3,
                 "universal-uncertain": 3}
MAX_EPSILON = Fraction(64, 255)  # far beyond what people tolerate: a bound against typos


class HardenError(ConfigError):
    """Settings hardening cannot run with; the message is one line."""


@dataclass(frozen=True)
class HardenConfig:
    """How `asirra.harden` perturbs a pool: the method, the bound, the defender's surrogate models.
    
    Checked when made; `asirra.harden(..., **options)` takes the same names."""

    method: str = "fgsm"
    """fgsm, pgd, random-target / balanced-target (label-independent targets), feature, universal or universal-
    uncertain (one pattern for every image)"""
    epsilon: float = 4 / 255
    """L-infinity bound as a fraction of the 0..255 range."""
    surrogates: tuple[str, ...] = ("effnet-lite0",)
    """The defender's models the perturbation is crafted against: run folders, registry names (runs/surrogates/NAME) or
    "shipped" (the attacker's own model: white-box rows only)"""
    steps: int | None = None
    """None: DEFAULT_STEPS[method]."""
    eot: int = 2
    """Random service transformations averaged per gradient."""
    step_size: float | None = None
    """In 0..255 units; None: 2.5 * eps / steps (Madry et al.)"""
    momentum: float = 1.0
    """MI-FGSM's decay; helps perturbations transfer to unseen models."""
    seed: int = 0
    """Seeds the sample, the service transformations and random targets."""
    crafting: str | None = None
    """Universal*: a labelled folder of the defender's own images, none of them in the pool."""
    crafting_limit: int = 64
    """Universal*: crafting images drawn (seeded) from `crafting`."""
    logit_clip: float = 4.0
    """Balanced-target: the surrogate-logit move each image gets, in either direction."""
    bf16: bool = False
    """The surrogates' passes in bfloat16 (autocast): half the CPU time where the CPU computes bf16 natively
    (AVX-512-BF16, AMX), many times more where it emulates it. PGD steps by the gradient's sign, which bf16
    keeps well enough that the surrogate is fooled alike (benchmarks/bench_harden_bf16.py)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise HardenError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0 <= self.epsilon <= MAX_EPSILON:
            raise HardenError(f"epsilon must be between 0 and {MAX_EPSILON}, got {self.epsilon:g}")
        if self.steps is not None and self.steps < 1:
            raise HardenError(f"steps must be at least 1, got {self.steps}")
        if self.method == "fgsm" and self.steps not in (None, 1):
            raise HardenError("fgsm is one step by definition; use --method pgd for more steps")
        if self.eot < 1:
            raise HardenError(f"eot must be at least 1, got {self.eot}")
        if not self.surrogates:
            raise HardenError("give at least one surrogate model")
        if self.method in UNIVERSAL and not self.crafting:
            raise HardenError(f"{self.method} needs a crafting set (--crafting DATA) of images that are not in the pool")
        if self.crafting_limit < 1:
            raise HardenError(f"crafting_limit must be at least 1, got {self.crafting_limit}")
        if self.logit_clip <= 0:
            raise HardenError(f"logit_clip must be positive, got {self.logit_clip:g}")

    @property
    def n_steps(self) -> int:
        """The gradient steps this method takes (1 for fgsm, else `steps` or the method's default)."""
        return 1 if self.method == "fgsm" else self.steps or DEFAULT_STEPS[self.method]

    @property
    def epsilon_255(self) -> int:
        """The bound on the stored files, in 0..255 units."""
        return round(self.epsilon * 255)


def parse_epsilon(text: str) -> float:
    """An L-infinity bound as a fraction of the 0..255 range, in the one unit rule of every command:
    a whole number counts 255ths ("4" and "4/255" are both 4/255), a decimal is the fraction itself
    ("0.0157"). HardenError (one line) for anything else or anything above MAX_EPSILON."""
    text = text.strip()
    if not re.fullmatch(r"\d+(/\d+)?|\d*\.\d+", text):
        raise HardenError(f"epsilon must look like 4 or 4/255 (255ths) or 0.0157 (a fraction), got {text!r}")
    if "." in text:
        value = Fraction(float(text))
    else:
        numerator, _, denominator = text.partition("/")
        if denominator and int(denominator) == 0:
            raise HardenError(f"epsilon {text!r} divides by zero")
        value = Fraction(int(numerator), int(denominator or 255))
    if value > MAX_EPSILON:
        raise HardenError(f"epsilon {text} is over {MAX_EPSILON} (far beyond what people tolerate)")
    return float(value)


def epsilon_in_255ths(text: str) -> int:
    """parse_epsilon for settings that must be whole 255ths (a study's pools are named by them)."""
    value = Fraction(parse_epsilon(text)).limit_denominator(10_000) * 255
    if value.denominator != 1:
        raise HardenError(f"epsilon {text} is not a whole number of 255ths; write e.g. 4 or 4/255")
    return int(value)
