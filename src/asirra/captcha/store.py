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

import asyncio
import dataclasses
import hashlib
import json
import math
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from asirra.captcha.challenge import Challenge
from asirra.captcha.clients import RateLimiter, SafeguardStates, worst
from asirra.captcha.safeguards import Safeguard, Verdict, describe

KEY_PREFIX = "asirra:"
TOMBSTONE_SECONDS = 900.0  # how long Redis remembers why a challenge closed
STATE_SECONDS = 7 * 86400  # an idle client's verdict history is forgotten after this
CAS_ATTEMPTS = 50  # compare-and-set retries for one verdict before giving up (contention is rare)


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


class Full(StoreError):
    """Too many challenges outstanding across all clients."""


class Unavailable(StoreError):
    """The shared store cannot be reached (or disagrees with this worker); try again shortly."""


@dataclass(frozen=True)
class Limit:
    """A token bucket: `burst` at once, then `rate` per second, per key."""

    rate: float
    burst: int


@dataclass(frozen=True)
class StoreSettings:
    ttl_seconds: float
    max_challenges: int  # outstanding, across all clients
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


class Store(Protocol):
    async def issue(self, ip: str, positions: Sequence[int], sitekey: str | None) -> Issued: ...

    async def image(self, token: str):
        """The pool image behind an image token of a live challenge, else Unknown."""

    async def take(self, challenge_id: str) -> Issued:
        """Remove and return a live challenge (the one step making answers single-use), else Unknown/Closed."""

    async def judge(self, cookie_id: str, ip: str, mistakes: int) -> Verdict: ...

    async def spend(self, kind: str, key: str) -> float:
        """Take one token from `kind`'s bucket for `key`: 0.0 if allowed, else seconds to wait."""

    async def add_pass(self, nonce: str, sitekey: str) -> None: ...

    async def take_pass(self, nonce: str) -> str | None:
        """The site key a live pass token was issued for, removing it; None if unknown, used or expired."""

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


def _challenge(pool: Sequence, positions: Sequence[int]) -> Challenge:
    return Challenge(refs=tuple(pool[int(p)] for p in positions))


# ---- in process ----------------------------------------------------------------------------


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
        self._passes: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._states = SafeguardStates(safeguard, settings.max_clients)
        self._limits = {kind: RateLimiter(limit.rate, limit.burst, clock, settings.max_clients)
                        for kind, limit in settings.limits.items()}

    async def issue(self, ip: str, positions: Sequence[int], sitekey: str | None) -> Issued:
        with self._lock:
            now = self._clock()
            self._expire(now)
            if len(self._live) >= self._settings.max_challenges:
                raise Full()
            mine = self._by_ip.setdefault(ip, OrderedDict())
            while len(mine) >= self._settings.max_per_client:
                self._close(next(iter(mine)), "replaced")
            positions = tuple(int(p) for p in positions)
            tokens = tuple(secrets.token_urlsafe(16) for _ in positions)
            issued = Issued(secrets.token_urlsafe(16), positions, ip, now + self._settings.ttl_seconds, tokens,
                            sitekey, _challenge(self._pool, positions))
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

    async def add_pass(self, nonce: str, sitekey: str) -> None:
        with self._lock:
            now = self._clock()
            self._expire_passes(now)
            self._passes[nonce] = (sitekey, now + self._settings.pass_ttl_seconds)
            while len(self._passes) > self._settings.max_challenges:
                self._passes.popitem(last=False)

    async def take_pass(self, nonce: str) -> str | None:
        with self._lock:
            self._expire_passes(self._clock())
            entry = self._passes.pop(nonce, None)
            return entry[0] if entry else None

    async def outstanding(self) -> int:
        return len(self)

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


# ---- Redis ---------------------------------------------------------------------------------

# Shared by every script. `now` is the caller's clock when it sends one, else Redis's (TIME is
# allowed in scripts since Redis 5, which replicates effects, not scripts). Numbers go back to
# Python as strings: Redis would truncate a Lua float to an integer.
_LUA_COMMON = """
local function clock(arg)
  local n = tonumber(arg)
  if n then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function close(prefix, id, ip, reason, tomb_ms)
  local raw = redis.call('GET', prefix .. 'chal:' .. id)
  if raw then
    local record = cjson.decode(raw)
    for _, token in ipairs(record.tokens) do redis.call('DEL', prefix .. 'img:' .. token) end
    ip = record.ip
    redis.call('DEL', prefix .. 'chal:' .. id)
  end
  if ip then redis.call('LREM', prefix .. 'ip:' .. ip, 0, id) end
  redis.call('ZREM', prefix .. 'live', id)
  redis.call('SET', prefix .. 'tomb:' .. id, reason, 'PX', tomb_ms)
end
"""

# ARGV: prefix, now, id, ip, ttl (s), ttl_ms, max_challenges, max_per_client, tomb_ms, positions (JSON), sitekey, tokens...
_ISSUE = _LUA_COMMON + """
local prefix, now, id, ip = ARGV[1], clock(ARGV[2]), ARGV[3], ARGV[4]
local ttl, ttl_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_all, max_mine, tomb_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local positions, sitekey = cjson.decode(ARGV[10]), ARGV[11]
local tokens = {}
for i = 12, #ARGV do tokens[#tokens + 1] = ARGV[i] end
local live, mine = prefix .. 'live', prefix .. 'ip:' .. ip
redis.call('ZREMRANGEBYSCORE', live, '-inf', now)
if redis.call('ZCARD', live) >= max_all then return {'full'} end
-- A client's challenges, oldest first (one TTL for all: also the order they expire in).
while redis.call('LLEN', mine) > 0 do
  local head = redis.call('GET', prefix .. 'chal:' .. redis.call('LINDEX', mine, 0))
  if head and cjson.decode(head).expires_at > now then break end
  redis.call('LPOP', mine)
end
while redis.call('LLEN', mine) >= max_mine do
  close(prefix, redis.call('LINDEX', mine, 0), ip, 'replaced', tomb_ms)
end
local expires_at = now + ttl
local record = cjson.encode({ip = ip, positions = positions, tokens = tokens, expires_at = expires_at, sitekey = sitekey})
redis.call('SET', prefix .. 'chal:' .. id, record, 'PX', ttl_ms)
for i, token in ipairs(tokens) do
  redis.call('SET', prefix .. 'img:' .. token, id .. ' ' .. positions[i] .. ' ' .. expires_at, 'PX', ttl_ms)
end
-- Written now so that a challenge Redis expires on its own still explains itself later.
redis.call('SET', prefix .. 'tomb:' .. id, 'expired', 'PX', ttl_ms + tomb_ms)
redis.call('RPUSH', mine, id)
redis.call('PEXPIRE', mine, ttl_ms)
redis.call('ZADD', live, expires_at, id)
return {'ok', record}
"""

# ARGV: prefix, now, token -> the pool position, or false
_IMAGE = _LUA_COMMON + """
local value = redis.call('GET', ARGV[1] .. 'img:' .. ARGV[3])
if not value then return false end
local id, position, expires_at = string.match(value, '^(%S+) (%S+) (%S+)$')
if tonumber(expires_at) <= clock(ARGV[2]) then return false end
return position
"""

# ARGV: prefix, now, id, tomb_ms -> {'ok', record} | {'closed', reason} | {'unknown'}
_TAKE = _LUA_COMMON + """
local prefix, now, id, tomb_ms = ARGV[1], clock(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local raw = redis.call('GET', prefix .. 'chal:' .. id)
if not raw then
  local reason = redis.call('GET', prefix .. 'tomb:' .. id)
  if reason then return {'closed', reason} end
  return {'unknown'}
end
if cjson.decode(raw).expires_at <= now then
  close(prefix, id, nil, 'expired', tomb_ms)
  return {'closed', 'expired'}
end
close(prefix, id, nil, 'answered', tomb_ms)
return {'ok', raw}
"""

# KEYS: bucket; ARGV: now, rate, burst -> seconds to wait ("0" when allowed)
_SPEND = _LUA_COMMON + """
local now, rate, burst = clock(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(bucket[1]) or burst, tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return tostring(wait)
"""

# KEYS: state; ARGV: expected ('' = absent), new, ttl (s) -> 1 if written
_COMPARE_AND_SET = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: pass; ARGV: now, sitekey, ttl (s), ttl_ms
_ADD_PASS = _LUA_COMMON + """
redis.call('SET', KEYS[1], ARGV[2] .. ' ' .. (clock(ARGV[1]) + tonumber(ARGV[3])), 'PX', ARGV[4])
return 1
"""

# KEYS: pass; ARGV: now -> the site key, or false. GETDEL: exactly one caller ever sees it.
_TAKE_PASS = _LUA_COMMON + """
local value = redis.call('GETDEL', KEYS[1])
if not value then return false end
local sitekey, expires_at = string.match(value, '^(%S+) (%S+)$')
if tonumber(expires_at) <= clock(ARGV[1]) then return false end
return sitekey
"""

# KEYS: pool; ARGV: fingerprint -> the fingerprint recorded (this one if none was)
_CLAIM_POOL = """
local recorded = redis.call('GET', KEYS[1])
if recorded then return recorded end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# KEYS: live; ARGV: now -> challenges not yet expired
_OUTSTANDING = _LUA_COMMON + """
return redis.call('ZCOUNT', KEYS[1], '(' .. clock(ARGV[1]), '+inf')
"""

_SCRIPTS = {"outstanding": _OUTSTANDING, "issue": _ISSUE, "image": _IMAGE, "take": _TAKE, "spend": _SPEND, "cas": _COMPARE_AND_SET,
            "add_pass": _ADD_PASS, "take_pass": _TAKE_PASS, "claim_pool": _CLAIM_POOL}


class PoolMismatch(Unavailable):
    """This worker's pool is not the one the shared store's challenges point into."""


def _connection_options(retry_class) -> dict:
    """Fail fast when Redis is down (clients get a 503 at once), but retry once, so that a
    connection left stale by a Redis restart is replaced without the client noticing."""
    from redis.backoff import ExponentialBackoff

    return {"decode_responses": True, "socket_timeout": 2.0, "socket_connect_timeout": 1.0,
            "health_check_interval": 10, "retry": retry_class(ExponentialBackoff(cap=0.2, base=0.02), 1)}


def claim_pool(url: str, fingerprint: str, prefix: str = KEY_PREFIX) -> None:
    """Record the pool's fingerprint in Redis, or raise PoolMismatch / Unavailable (sync: for start-up)."""
    import redis
    from redis.retry import Retry

    try:
        client = redis.Redis.from_url(url, **_connection_options(Retry))
        try:
            recorded = client.eval(_CLAIM_POOL, 1, prefix + "pool", fingerprint)
        finally:
            client.close()
    except redis.RedisError as exc:
        raise Unavailable(f"cannot use Redis at {url}: {exc}") from None
    if recorded != fingerprint:
        raise PoolMismatch(_mismatch(fingerprint, recorded))


def _mismatch(mine: str, recorded: str) -> str:
    return (f"this worker's image pool ({mine}) differs from the one recorded in Redis ({recorded}); "
            "serve the same --data everywhere, or use another Redis database")


class RedisStore:
    """All state in one Redis, shared by every worker and instance pointed at it."""

    def __init__(self, url: str, pool: Sequence, safeguard: Safeguard, settings: StoreSettings,
                 clock: Callable[[], float] | None = None, prefix: str = KEY_PREFIX):
        import redis.asyncio  # noqa: F401  (fail here, at start-up, if the client is missing)

        self._url, self._pool, self._safeguard, self._settings = url, pool, safeguard, settings
        self._clock, self._prefix = clock, prefix
        self._fingerprint = pool_fingerprint(pool)
        self._pool_checked = False
        self._loop = self._client = None
        self._scripts: dict = {}
        self._state_prefix = f"{prefix}state:{describe(safeguard)}:"  # another policy's states never collide

    # The async client belongs to one event loop; a new loop (a test's, a restarted server's)
    # gets a new client rather than connections bound to a dead loop.
    def _redis(self):
        import redis.asyncio
        from redis.asyncio.retry import Retry

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._client = redis.asyncio.Redis.from_url(self._url, **_connection_options(Retry))
            self._scripts = {name: self._client.register_script(source) for name, source in _SCRIPTS.items()}
            self._loop = loop
        return self._client

    async def _run(self, script: str, keys: Sequence[str] = (), args: Sequence = ()):
        import redis

        client = self._redis()
        try:
            if not self._pool_checked:
                recorded = await self._scripts["claim_pool"](keys=[self._prefix + "pool"], args=[self._fingerprint])
                if recorded != self._fingerprint:
                    raise PoolMismatch(_mismatch(self._fingerprint, recorded))
                self._pool_checked = True
            return await self._scripts[script](keys=list(keys), args=list(args), client=client)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(f"Redis is unreachable: {exc}") from None

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    def _issued(self, challenge_id: str, raw: str) -> Issued:
        record = json.loads(raw)
        positions = tuple(int(p) for p in record["positions"])
        return Issued(challenge_id, positions, record["ip"], float(record["expires_at"]), tuple(record["tokens"]),
                      record["sitekey"] or None, _challenge(self._pool, positions))

    async def issue(self, ip: str, positions: Sequence[int], sitekey: str | None) -> Issued:
        challenge_id = secrets.token_urlsafe(16)
        positions = [int(p) for p in positions]
        tokens = [secrets.token_urlsafe(16) for _ in positions]
        ttl = self._settings.ttl_seconds
        reply = await self._run("issue", args=[
            self._prefix, self._now(), challenge_id, ip, repr(ttl), math.ceil(ttl * 1000),
            self._settings.max_challenges, self._settings.max_per_client, int(TOMBSTONE_SECONDS * 1000),
            json.dumps(positions), sitekey or "", *tokens])
        if reply[0] == "full":
            raise Full()
        return self._issued(challenge_id, reply[1])

    async def image(self, token: str):
        position = await self._run("image", args=[self._prefix, self._now(), token])
        if position is None:
            raise Unknown()
        return self._pool[int(position)]

    async def take(self, challenge_id: str) -> Issued:
        reply = await self._run("take", args=[self._prefix, self._now(), challenge_id, int(TOMBSTONE_SECONDS * 1000)])
        if reply[0] == "ok":
            return self._issued(challenge_id, reply[1])
        if reply[0] == "closed":
            raise Closed(reply[1])
        raise Unknown()

    async def judge(self, cookie_id: str, ip: str, mistakes: int) -> Verdict:
        if self._safeguard.new_state() is None:  # a stateless policy needs no round trip
            return self._safeguard.judge(None, mistakes)
        return worst([await self._judge_one(f"cookie:{cookie_id}", mistakes),
                      await self._judge_one(f"ip:{ip}", mistakes)])

    async def _judge_one(self, key: str, mistakes: int) -> Verdict:
        """Read the state, let the policy judge (its one home is Python), write back only if unchanged meanwhile."""
        import redis

        key = self._state_prefix + key
        for _ in range(CAS_ATTEMPTS):
            try:
                raw = await self._redis().get(key)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise Unavailable(f"Redis is unreachable: {exc}") from None
            state = state_from_json(self._safeguard, raw)
            verdict = self._safeguard.judge(state, mistakes)
            if await self._run("cas", keys=[key], args=[raw or "", state_to_json(state), STATE_SECONDS]):
                return verdict
        raise Unavailable("too much contention on one client's history")

    async def spend(self, kind: str, key: str) -> float:
        limit = self._settings.limits[kind]
        wait = await self._run("spend", keys=[f"{self._prefix}rate:{kind}:{key}"],
                               args=[self._now(), repr(float(limit.rate)), limit.burst])
        return float(wait)

    async def add_pass(self, nonce: str, sitekey: str) -> None:
        ttl = self._settings.pass_ttl_seconds
        await self._run("add_pass", keys=[f"{self._prefix}pass:{nonce}"],
                        args=[self._now(), sitekey, repr(ttl), math.ceil(ttl * 1000)])

    async def take_pass(self, nonce: str) -> str | None:
        return await self._run("take_pass", keys=[f"{self._prefix}pass:{nonce}"], args=[self._now()])

    async def outstanding(self) -> int:
        return int(await self._run("outstanding", keys=[self._prefix + "live"], args=[self._now()]))

    def peek(self, challenge_id: str) -> Issued | None:
        import redis

        client = redis.Redis.from_url(self._url, decode_responses=True)
        try:
            raw = client.get(f"{self._prefix}chal:{challenge_id}")
        finally:
            client.close()
        return self._issued(challenge_id, raw) if raw else None

    async def aclose(self) -> None:
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()  # a client of another (dead) loop is only dropped
        self._client = self._loop = None


# ---- verdict-policy states as JSON ---------------------------------------------------------


def state_to_json(state: object) -> str:
    return json.dumps(dataclasses.asdict(state) if dataclasses.is_dataclass(state) else state, sort_keys=True)


def state_from_json(safeguard: Safeguard, raw: str | None) -> object:
    """The policy's state stored as `raw`, rebuilt on a fresh state's shape; a fresh state for None."""
    state = safeguard.new_state()
    return state if raw is None else _fill(state, json.loads(raw))


def _fill(template: object, values: object) -> object:
    if not dataclasses.is_dataclass(template):
        return values
    for f in dataclasses.fields(template):
        setattr(template, f.name, _fill(getattr(template, f.name), values[f.name]))
    return template
