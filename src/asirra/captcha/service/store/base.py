"""Where the live service keeps its state: outstanding challenges, pass tokens, rate limits, verdict histories.

Two implementations of one interface (`Store`):

- `MemoryStore`, the embedded default: plain tables in this process, bounded by count. One
  worker only; a restart forgets everything.
- `RedisStore`: every worker and instance sharing one Redis sees one state. Each step that reads
  and then writes runs as one Lua script (or a Lua compare-and-set), so two workers can never both
  accept one answer or both spend one pass token, and a rate limit holds across workers.

A challenge is stored as data any worker can rebuild, never as Python objects: the pool positions
of its 12 images and their random URL tokens. Every worker therefore needs the same pool in the
same order (`ordered_pool`); `RedisStore` records the pool's fingerprint and refuses a worker whose
pool differs. Time comes from the caller's clock when one is given (tests use a fake one) and
from Redis's own clock otherwise, so all workers agree on when something expires.

A closed challenge leaves a tombstone saying why (answered, expired, replaced), so a late or
repeated answer gets a precise refusal rather than "unknown".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence

from asirra.captcha.challenge import Challenge
from asirra.captcha.safeguards import Verdict

KEY_PREFIX = "asirra:"


# ---- what callers see ----------------------------------------------------------------------


class StoreError(Exception):
    """A refusal from the store; the service turns each kind into an HTTP status."""


class Unknown(StoreError):
    """No such challenge or image (or it was forgotten long ago)."""


class Closed(StoreError):
    """The challenge exists no more; `reason` is "answered", "expired" or "replaced"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Unavailable(StoreError):
    """The shared store cannot be reached (or disagrees with this worker); try again shortly.

    `op` names the step that failed (a metric's label: which store operation is erroring)."""

    def __init__(self, message: str = "", op: str = "store"):
        super().__init__(message)
        self.op = op


@dataclass(frozen=True)
class Limit:
    """A token bucket: `burst` at once, then `rate` per second, per key."""

    rate: float
    burst: int


@dataclass(frozen=True)
class StoreSettings:
    ttl_seconds: float
    # Outstanding across all clients, which bounds memory (~3 KB each). When full, a new challenge replaces
    # the oldest one of its own client if it holds any, else the oldest of all; nobody is refused. So hoarders
    # churn only their own, and pushing out a person's 30-s-old challenge takes ~max_challenges / 30
    # challenges a second from addresses that hold none (benchmarks/README.md, floods).
    max_challenges: int
    max_per_client: int  # outstanding per IP; a newer challenge replaces the oldest
    max_clients: int  # in-process tables forget the least recently seen beyond this
    pass_ttl_seconds: float
    limits: dict[str, Limit]  # kind ("request", "challenge", "verify") -> bucket


@dataclass(frozen=True)
class Issued:
    id: str
    positions: tuple[int, ...]  # where the 12 images sit in the (ordered) pool
    ip: str
    expires_at: float
    image_tokens: tuple[str, ...]
    sitekey: str | None
    challenge: Challenge  # the pool images at `positions`, rebuilt by whichever worker reads it
    hostname: str = ""  # where the challenge is shown: the embedding page's host, or the service's own


@dataclass(frozen=True)
class PassRecord:
    """What a live pass token stands for: the site, where it was solved, and when (wall-clock seconds)."""

    sitekey: str
    hostname: str
    solved_at: float


class Store(Protocol):
    async def issue(self, ip: str, positions: Sequence[int], sitekey: str | None, hostname: str = "") -> Issued: ...

    async def image(self, token: str):
        """The pool image behind an image token of a live challenge, else Unknown."""

    async def take(self, challenge_id: str) -> Issued:
        """Remove and return a live challenge (the one step making answers single-use), else Unknown/Closed."""

    async def judge(self, cookie_id: str, ip: str, mistakes: int) -> Verdict: ...

    async def spend(self, kind: str, key: str) -> float:
        """Take one token from `kind`'s bucket for `key`: 0.0 if allowed, else seconds to wait."""

    async def add_pass(self, nonce: str, record: PassRecord) -> None: ...

    async def take_pass(self, nonce: str) -> PassRecord | None:
        """What a live pass token was issued for, removing it; None if unknown, used or expired."""

    async def outstanding(self) -> int: ...

    def peek(self, challenge_id: str) -> Issued | None:
        """A live challenge, answer included, without touching it: for tests, never for routes."""

    async def aclose(self) -> None:
        """Let go of connections (at shutdown)."""


def ordered_pool(pool: Sequence) -> list:
    """The pool in an order every worker reproduces from the same data, wherever it is mounted."""
    return sorted(pool, key=lambda ref: (ref.label, ref.name, ref.id, ref.source))


def pool_fingerprint(pool: Sequence) -> str:
    """Names and labels in pool order, hashed: equal exactly when positions mean the same images."""
    digest = hashlib.sha256()
    for ref in pool:
        digest.update(f"{ref.label}\t{ref.name}\n".encode())
    return f"{len(pool)}:{digest.hexdigest()[:32]}"


def challenge_at(pool: Sequence, positions: Sequence[int]) -> Challenge:
    return Challenge(refs=tuple(pool[int(p)] for p in positions))
