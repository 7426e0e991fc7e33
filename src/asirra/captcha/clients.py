"""What the live service remembers about each client: who it is, how fast it asks, how it has answered.

A client is known two ways at once: by a signed random cookie, and by its IP address. The cookie
tells apart people behind one address (an office NAT); the address keeps tracking a bot that
simply drops its cookie. Every table here is bounded (least recently seen entries are forgotten
first), so a flood of new cookies or addresses costs memory in proportion to the bound, not to
the flood.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from typing import Callable, Generic, Iterable, TypeVar

from asirra.captcha.safeguards import Safeguard, Verdict

T = TypeVar("T")

# Worst first: when the cookie's history and the address's history disagree, the stricter wins.
_SEVERITY = {"fail": 2, "almost": 1, "pass": 0}


class BoundedTable(Generic[T]):
    """A dict that forgets its least recently used entry beyond `capacity`, safe across threads."""

    def __init__(self, capacity: int, make: Callable[[], T]):
        self._capacity = capacity
        self._make = make
        self._entries: OrderedDict[str, T] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: str) -> T:
        """The entry for `key`, created if new; callers hold `lock` while they use it."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = self._entries[key] = self._make()
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)


class CookieSigner:
    """Issues random client ids and recognises only the ones it issued (HMAC-SHA256)."""

    def __init__(self, secret: bytes | None = None):
        self._key = secret or secrets.token_bytes(32)

    def _mac(self, client_id: str) -> str:
        return hmac.new(self._key, client_id.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> tuple[str, str]:
        """A new (client id, cookie value)."""
        client_id = secrets.token_urlsafe(16)
        return client_id, f"{client_id}.{self._mac(client_id)}"

    def verify(self, cookie: str | None) -> str | None:
        """The client id inside a genuine cookie, or None for a missing, forged or mangled one."""
        client_id, _, mac = (cookie or "").partition(".")
        if client_id and hmac.compare_digest(mac, self._mac(client_id)):
            return client_id
        return None


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.tokens, self.stamp = tokens, stamp


class RateLimiter:
    """A token bucket per key: `burst` requests at once, then `rate` per second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float], capacity: int = 100_000):
        self._rate, self._burst, self._clock = rate, burst, clock
        self._buckets = BoundedTable(capacity, lambda: _Bucket(float(burst), clock()))

    def take(self, key: str) -> float:
        """Spend one token: 0.0 if allowed, else the seconds to wait before one is available."""
        with self._buckets.lock:
            bucket = self._buckets.get(key)
            now = self._clock()
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self._rate


class SafeguardStates:
    """The safeguard's per-client state, kept separately per cookie and per IP address.

    Separate tables so that minting thousands of cookies cannot push the addresses' histories
    out of memory. Each answer is judged against both histories and the stricter verdict wins;
    the price is that people sharing one address share that address's history.
    """

    def __init__(self, safeguard: Safeguard, capacity: int = 100_000):
        self.safeguard = safeguard
        self._tables = {
            kind: BoundedTable(capacity, safeguard.new_state) for kind in ("cookie", "ip")
        }

    def judge(self, cookie_id: str, ip: str, mistakes: int) -> Verdict:
        verdicts = [
            self._judge_one(self._tables["cookie"], cookie_id, mistakes),
            self._judge_one(self._tables["ip"], ip, mistakes),
        ]
        return worst(verdicts)

    def _judge_one(self, table: BoundedTable, key: str, mistakes: int) -> Verdict:
        with table.lock:
            return self.safeguard.judge(table.get(key), mistakes)


def worst(verdicts: Iterable[Verdict]) -> Verdict:
    return max(verdicts, key=_SEVERITY.__getitem__)
