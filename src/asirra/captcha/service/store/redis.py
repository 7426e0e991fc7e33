"""The Redis store: every worker and instance sharing one Redis sees one state.

Each step that reads and then writes runs as one Lua script (or a Lua compare-and-set), so two
workers can never both accept one answer or both spend one pass token, and a rate limit holds
across workers. Time comes from the caller's clock when one is given, else from Redis's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
from typing import Callable, Sequence

from asirra.captcha.safeguards import Safeguard, Verdict, describe
from asirra.captcha.service.clients import worst
from asirra.captcha.service.store.base import (
    KEY_PREFIX,
    Closed,
    Issued,
    PassRecord,
    StoreSettings,
    Unavailable,
    Unknown,
    challenge_at,
    pool_fingerprint,
)
from asirra.errors import require

TOMBSTONE_SECONDS = 900.0  # how long Redis remembers why a challenge closed
STATE_SECONDS = 7 * 86400  # an idle client's verdict history is forgotten after this
CAS_ATTEMPTS = 50  # compare-and-set retries for one verdict before giving up (contention is rare)


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

# ARGV: prefix, now, id, ip, ttl (s), ttl_ms, max_challenges, max_per_client, tomb_ms, positions (JSON), sitekey,
# hostname, tokens...
_ISSUE = _LUA_COMMON + """
local prefix, now, id, ip = ARGV[1], clock(ARGV[2]), ARGV[3], ARGV[4]
local ttl, ttl_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local max_all, max_mine, tomb_ms = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local positions, sitekey, hostname = cjson.decode(ARGV[10]), ARGV[11], ARGV[12]
local tokens = {}
for i = 13, #ARGV do tokens[#tokens + 1] = ARGV[i] end
local live, mine = prefix .. 'live', prefix .. 'ip:' .. ip
redis.call('ZREMRANGEBYSCORE', live, '-inf', now)
-- A client's challenges, oldest first (one TTL for all: also the order they expire in).
while redis.call('LLEN', mine) > 0 do
  local head = redis.call('GET', prefix .. 'chal:' .. redis.call('LINDEX', mine, 0))
  if head and cjson.decode(head).expires_at > now then break end
  redis.call('LPOP', mine)
end
while redis.call('LLEN', mine) >= max_mine do
  close(prefix, redis.call('LINDEX', mine, 0), ip, 'replaced', tomb_ms)
end
-- Full (StoreSettings.max_challenges): a client holding challenges replaces its own oldest, one holding none the
-- oldest of all; nobody is refused and the table never grows.
if redis.call('ZCARD', live) >= max_all then
  if redis.call('LLEN', mine) > 0 then
    close(prefix, redis.call('LINDEX', mine, 0), ip, 'replaced', tomb_ms)
  else
    close(prefix, redis.call('ZRANGE', live, 0, 0)[1], nil, 'replaced', tomb_ms)
  end
end
local expires_at = now + ttl
local record = cjson.encode({ip = ip, positions = positions, tokens = tokens, expires_at = expires_at, sitekey = sitekey,
                             hostname = hostname})
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

# KEYS: pass; ARGV: now, sitekey, ttl (s), ttl_ms, solved_at, hostname. The value is
# "sitekey expires_at solved_at hostname"; a value written before hostnames existed has the first two only.
_ADD_PASS = _LUA_COMMON + """
local value = ARGV[2] .. ' ' .. (clock(ARGV[1]) + tonumber(ARGV[3])) .. ' ' .. ARGV[5] .. ' ' .. ARGV[6]
redis.call('SET', KEYS[1], value, 'PX', ARGV[4])
return 1
"""

# KEYS: pass; ARGV: now -> the stored value, or false. GETDEL: exactly one caller ever sees it.
_TAKE_PASS = _LUA_COMMON + """
local value = redis.call('GETDEL', KEYS[1])
if not value then return false end
local sitekey, expires_at = string.match(value, '^(%S+) (%S+)')
if tonumber(expires_at) <= clock(ARGV[1]) then return false end
return value
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
        require("redis.asyncio", "serve")  # fail here, at start-up, in one line, if the client is missing

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
            raise Unavailable(f"Redis is unreachable: {exc}", op=script) from None

    def _now(self) -> str:
        return "" if self._clock is None else repr(float(self._clock()))

    def _issued(self, challenge_id: str, raw: str) -> Issued:
        record = json.loads(raw)
        positions = tuple(int(p) for p in record["positions"])
        return Issued(challenge_id, positions, record["ip"], float(record["expires_at"]), tuple(record["tokens"]),
                      record["sitekey"] or None, challenge_at(self._pool, positions), record.get("hostname", ""))

    async def issue(self, ip: str, positions: Sequence[int], sitekey: str | None, hostname: str = "") -> Issued:
        challenge_id = secrets.token_urlsafe(16)
        positions = [int(p) for p in positions]
        tokens = [secrets.token_urlsafe(16) for _ in positions]
        ttl = self._settings.ttl_seconds
        reply = await self._run("issue", args=[
            self._prefix, self._now(), challenge_id, ip, repr(ttl), math.ceil(ttl * 1000),
            self._settings.max_challenges, self._settings.max_per_client, int(TOMBSTONE_SECONDS * 1000),
            json.dumps(positions), sitekey or "", hostname, *tokens])
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
                raise Unavailable(f"Redis is unreachable: {exc}", op="judge") from None
            state = state_from_json(self._safeguard, raw)
            verdict = self._safeguard.judge(state, mistakes)
            if await self._run("cas", keys=[key], args=[raw or "", state_to_json(state), STATE_SECONDS]):
                return verdict
        raise Unavailable("too much contention on one client's history", op="judge")

    async def spend(self, kind: str, key: str) -> float:
        limit = self._settings.limits[kind]
        wait = await self._run("spend", keys=[f"{self._prefix}rate:{kind}:{key}"],
                               args=[self._now(), repr(float(limit.rate)), limit.burst])
        return float(wait)

    async def add_pass(self, nonce: str, record: PassRecord) -> None:
        ttl = self._settings.pass_ttl_seconds
        await self._run("add_pass", keys=[f"{self._prefix}pass:{nonce}"],
                        args=[self._now(), record.sitekey, repr(ttl), math.ceil(ttl * 1000), repr(record.solved_at),
                              record.hostname])

    async def take_pass(self, nonce: str) -> PassRecord | None:
        value = await self._run("take_pass", keys=[f"{self._prefix}pass:{nonce}"], args=[self._now()])
        if value is None:
            return None
        sitekey, expires_at, *rest = value.split(" ", 3)
        if not rest:  # written before passes carried where and when they were solved
            return PassRecord(sitekey, "", float(expires_at) - self._settings.pass_ttl_seconds)
        return PassRecord(sitekey, rest[1] if len(rest) > 1 else "", float(rest[0]))

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
