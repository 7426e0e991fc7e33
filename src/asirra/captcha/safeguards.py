"""Policies that turn a response's mistake count into a verdict, remembering each client's history.

A classifier that labels one image right with probability p solves a 12-image challenge with
probability p**12, while humans solve 99.6% (Elson et al., 2007). The policies here widen that
gap using the one thing the two differ in, how often they are *nearly* right and how often they
fail outright:

- `NoSafeguard`: pass iff the response has no mistake.
- `PartialCredit` (Elson et al.): one mistake earns "almost"; two almosts in a row pass. Meant to
  forgive a human's rare slip, it mostly helps bots, which are one image off far more often
  (Golle, 2008, recommends against it; `asirra captcha defend` shows why).
- `TokenBucket` (Elson, Howell & Douceur's token-bucket HIP; evaluated by Golle, 2008): each client
  holds a few tokens that failures drain; once the bucket is empty, even a correct answer is
  rejected (it refills the bucket a little), so a client that fails often must then be right
  twice in quick succession. Humans almost never empty the bucket; bots live in it.

Every policy has the same two methods so the simulator and the HTTP service share them:
`new_state()` makes one client's state, `judge(state, mistakes)` updates it and returns the verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Literal, Protocol

from asirra.errors import ConfigError

Verdict = Literal["pass", "almost", "fail"]


class SafeguardError(ConfigError):
    """An unknown safeguard name or an invalid parameter."""


class Safeguard(Protocol):
    name: str

    def new_state(self) -> object: ...

    def judge(self, state: object, mistakes: int) -> Verdict: ...


def _check_mistakes(mistakes: int) -> None:
    if mistakes < 0:
        raise SafeguardError(f"a mistake count cannot be negative, got {mistakes}")


def _check_counts(policy: object, *names: str) -> None:
    """Every named parameter must be a whole number >= 1 (a bucket of 2.5 tokens means nothing)."""
    for name in names:
        value = getattr(policy, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SafeguardError(f"{policy.name} needs {name} to be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class NoSafeguard:
    """Pass iff the response is exactly right; nothing is remembered between challenges."""

    name: str = field(default="none", init=False)

    def new_state(self) -> None:
        return None

    def judge(self, state: None, mistakes: int) -> Verdict:
        _check_mistakes(mistakes)
        return "pass" if mistakes == 0 else "fail"


@dataclass
class PartialCreditState:
    streak: int = 0  # consecutive "almost" responses so far


@dataclass(frozen=True)
class PartialCredit:
    """A response with 1..`almost_mistakes` mistakes is "almost"; `needed` almosts in a row pass.

    The `needed`-th consecutive almost returns "pass" and starts a fresh streak, as does a clean
    pass (the streak counts *consecutive* near misses, and a pass ends the run). A response with
    more mistakes fails and also resets the streak.
    """

    almost_mistakes: int = 1
    needed: int = 2
    name: str = field(default="partial-credit", init=False)

    def __post_init__(self) -> None:
        _check_counts(self, "almost_mistakes", "needed")

    def new_state(self) -> PartialCreditState:
        return PartialCreditState()

    def judge(self, state: PartialCreditState, mistakes: int) -> Verdict:
        _check_mistakes(mistakes)
        if mistakes == 0:
            state.streak = 0
            return "pass"
        if mistakes > self.almost_mistakes:
            state.streak = 0
            return "fail"
        state.streak += 1
        if state.streak >= self.needed:
            state.streak = 0
            return "pass"
        return "almost"


@dataclass
class TokenBucketState:
    tokens: int
    inner: object = None  # the wrapped policy's state


@dataclass(frozen=True)
class TokenBucket:
    """A per-client bucket of tokens that failures drain, wrapped around an inner policy.

    The inner policy (default: `NoSafeguard`) judges the response first; then, with the bucket
    starting full at `capacity` tokens:

    - bucket not empty: an inner "pass" passes and adds `refill_per_pass` tokens (capped at
      `capacity`); anything else is returned unchanged and removes `cost_per_failure` tokens
      (floored at 0). A near miss ("almost") costs like a failure: a bucket blind to near misses
      would let a bot that is often one image off collect them for free.
    - bucket empty: every response fails. An inner "pass" still adds `refill_when_empty` tokens,
      so with the defaults a client that emptied its bucket must be right twice in a row
      (the first right answer only buys the second a chance).
    """

    capacity: int = 3
    cost_per_failure: int = 1
    refill_per_pass: int = 1
    refill_when_empty: int = 1
    inner: Safeguard = field(default_factory=NoSafeguard)
    name: str = field(default="token-bucket", init=False)

    def __post_init__(self) -> None:
        _check_counts(self, "capacity", "cost_per_failure", "refill_per_pass", "refill_when_empty")

    def new_state(self) -> TokenBucketState:
        return TokenBucketState(tokens=self.capacity, inner=self.inner.new_state())

    def judge(self, state: TokenBucketState, mistakes: int) -> Verdict:
        verdict = self.inner.judge(state.inner, mistakes)
        if state.tokens == 0:
            if verdict == "pass":
                state.tokens = min(self.capacity, state.tokens + self.refill_when_empty)
            return "fail"
        if verdict == "pass":
            state.tokens = min(self.capacity, state.tokens + self.refill_per_pass)
        else:
            state.tokens = max(0, state.tokens - self.cost_per_failure)
        return verdict


SAFEGUARDS = {"none": NoSafeguard, "partial-credit": PartialCredit, "token-bucket": TokenBucket}


def make_safeguard(name: str, **params) -> Safeguard:
    """A policy by name ("none", "partial-credit", "token-bucket") with keyword parameters.

    A token bucket's `inner` may be given as a policy or as a name ("partial-credit").
    """
    if name not in SAFEGUARDS:
        raise SafeguardError(f"unknown safeguard {name!r}; choose one of {', '.join(SAFEGUARDS)}")
    cls = SAFEGUARDS[name]
    allowed = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        accepted = ", ".join(allowed) or "no parameters"
        raise SafeguardError(f"{name} does not take {', '.join(unknown)} (it accepts {accepted})")
    if isinstance(params.get("inner"), str):
        params["inner"] = make_safeguard(params["inner"])
    return cls(**params)


def parse_safeguard(spec: str) -> Safeguard:
    """A policy from its one-line spec, e.g. "token-bucket:capacity=5,inner=partial-credit".

    The spec is what `describe` writes, so a setting from a defend table can be pasted into
    `asirra captcha simulate --safeguard`. Values are whole numbers, except `inner`, a policy name.
    """
    name, _, rest = spec.strip().partition(":")
    params: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise SafeguardError(f"cannot read {item!r} in safeguard {spec!r}; write key=value")
        if key == "inner":
            params[key] = value
        elif re.fullmatch(r"\d+", value):
            params[key] = int(value)
        else:
            raise SafeguardError(f"{key} in safeguard {spec!r} must be a whole number, got {value!r}")
    return make_safeguard(name.strip(), **params)


def describe(safeguard: Safeguard) -> str:
    """The spec `parse_safeguard` reads back: the name, then every parameter that is not the default."""
    defaults = type(safeguard)()
    params = []
    for f in fields(safeguard):
        value = getattr(safeguard, f.name)
        if not f.init or value == getattr(defaults, f.name):
            continue
        params.append(f"{f.name}={describe(value) if f.name == 'inner' else value}")
    return safeguard.name + (":" + ",".join(params) if params else "")
