"""The in-process store: plain tables in this process's memory, bounded by count. One worker only;
a restart forgets everything."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from typing import Callable, Sequence

from asirra.captcha.safeguards import Safeguard, Verdict
from asirra.captcha.service.clients import RateLimiter, SafeguardStates
from asirra.captcha.service.store.base import Closed, Issued, PassRecord, StoreSettings, Unknown, challenge_at


class MemoryStore:
    """All state in this process's memory, bounded by count; the embedded single-worker default.

    Challenges are kept in issue order, which is also expiry order (one TTL for all), so
    expiring is popping from the front.
    """

    def __init__(self, pool: Sequence, safeguard: Safeguard, settings: StoreSettings, clock: Callable[[], float]):
        self._pool, self._settings, self._clock = pool, settings, clock
        self._lock = threading.Lock()  # peek() is called from test threads
        self._live: OrderedDict[str, Issued] = OrderedDict()
        self._images: dict[str, tuple[str, int]] = {}
        self._by_ip: dict[str, OrderedDict[str, None]] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()
        self._passes: OrderedDict[str, tuple[PassRecord, float]] = OrderedDict()
        self._states = SafeguardStates(safeguard, settings.max_clients)
        self._limits = {kind: RateLimiter(limit.rate, limit.burst, clock, settings.max_clients)
                        for kind, limit in settings.limits.items()}

    async def issue(self, ip: str, positions: Sequence[int], sitekey: str | None, hostname: str = "") -> Issued:
        with self._lock:
            now = self._clock()
            self._expire(now)
            while len(self._by_ip.get(ip, ())) >= self._settings.max_per_client:
                self._close(next(iter(self._by_ip[ip])), "replaced")
            if len(self._live) >= self._settings.max_challenges:  # full: StoreSettings.max_challenges
                self._close(next(iter(self._by_ip[ip] if ip in self._by_ip else self._live)), "replaced")
            mine = self._by_ip.setdefault(ip, OrderedDict())  # after the closes, which drop an emptied entry
            positions = tuple(int(p) for p in positions)
            tokens = tuple(secrets.token_urlsafe(16) for _ in positions)
            issued = Issued(secrets.token_urlsafe(16), positions, ip, now + self._settings.ttl_seconds, tokens,
                            sitekey, challenge_at(self._pool, positions), hostname)
            self._live[issued.id] = issued
            self._images.update((token, (issued.id, i)) for i, token in enumerate(tokens))
            mine[issued.id] = None
            return issued

    async def image(self, token: str):
        with self._lock:
            self._expire(self._clock())
            where = self._images.get(token)
            if where is None:
                raise Unknown()
            challenge_id, index = where
            return self._live[challenge_id].challenge.refs[index]

    async def take(self, challenge_id: str) -> Issued:
        with self._lock:
            self._expire(self._clock())
            issued = self._live.get(challenge_id)
            if issued is None:
                reason = self._closed.get(challenge_id)
                raise Closed(reason) if reason else Unknown()
            self._close(challenge_id, "answered")
            return issued

    async def judge(self, cookie_id: str, ip: str, mistakes: int) -> Verdict:
        return self._states.judge(cookie_id, ip, mistakes)

    async def spend(self, kind: str, key: str) -> float:
        return self._limits[kind].take(key)

    async def add_pass(self, nonce: str, record: PassRecord) -> None:
        with self._lock:
            now = self._clock()
            self._expire_passes(now)
            self._passes[nonce] = (record, now + self._settings.pass_ttl_seconds)
            while len(self._passes) > self._settings.max_challenges:
                self._passes.popitem(last=False)

    async def take_pass(self, nonce: str) -> PassRecord | None:
        with self._lock:
            self._expire_passes(self._clock())
            entry = self._passes.pop(nonce, None)
            return entry[0] if entry else None

    async def outstanding(self) -> int:
        return len(self)

    def counters(self) -> dict:
        """Monotonic counts of the per-client state this store has started: verdict histories per cookie and
        per address, rate-limit buckets per kind. A client that keeps its cookie and address adds one of each
        once; one that arrives fresh every challenge adds one per challenge."""
        return {"client_states_created": self._states.states_created(),
                "limit_keys_created": {kind: limiter.keys_created for kind, limiter in self._limits.items()}}

    async def aclose(self) -> None:
        pass  # nothing to let go of

    def peek(self, challenge_id: str) -> Issued | None:
        with self._lock:
            return self._live.get(challenge_id)

    def __len__(self) -> int:
        return len(self._live)

    def _expire(self, now: float) -> None:
        while self._live:
            oldest = next(iter(self._live.values()))
            if oldest.expires_at > now:
                break
            self._close(oldest.id, "expired")

    def _expire_passes(self, now: float) -> None:
        while self._passes and next(iter(self._passes.values()))[1] <= now:
            self._passes.popitem(last=False)

    def _close(self, challenge_id: str, reason: str) -> None:
        issued = self._live.pop(challenge_id)
        for token in issued.image_tokens:
            del self._images[token]
        mine = self._by_ip[issued.ip]
        del mine[challenge_id]
        if not mine:
            del self._by_ip[issued.ip]
        self._closed[challenge_id] = reason
        while len(self._closed) > self._settings.max_challenges:
            self._closed.popitem(last=False)
