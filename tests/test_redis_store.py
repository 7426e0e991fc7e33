"""The Redis store against a real redis-server: two workers (two apps, one Redis) act as one service.

Each app here stands for one worker process; they share nothing but the Redis and the secret, as
uvicorn workers or separate machines do. tests/test_redis_workers.py does it with real processes.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from captcha_service_support import (
    GENEROUS,
    FakeClock,
    TestClient,
    answer,
    check_a_full_table_replaces_instead_of_refusing,
    make_pool,
    new_challenge,
    truth,
)
from redis_support import redis_server  # noqa: F401  (fixture)

from asirra.captcha.safeguards import parse_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.clients import Site, Sites
from asirra.captcha.service.run import running
from asirra.captcha.service.settings import ServiceSettings
from asirra.captcha.service.store import PoolMismatch, claim_pool, ordered_pool, pool_fingerprint

SECRET = b"s" * 32
SITE = Site("example-site", "example-secret-" + "x" * 24)


@pytest.fixture
def pool(tmp_path):
    return make_pool(tmp_path / "pool", cats=15, dogs=15)


def _worker(pool, redis_url, safeguard="none", clock=None, **settings):
    base = {**GENEROUS.__dict__, "secret": SECRET, "redis_url": redis_url, **settings}
    return create_app(pool, parse_safeguard(safeguard), ServiceSettings(**base), clock=clock, sites=Sites([SITE]))








def _verify(client, token, secret=SITE.secret):
    return client.post("/api/verify", data={"secret": secret, "response": token}).json()


def test_a_challenge_issued_by_one_worker_is_answered_once_on_another(pool, redis_server):
    a, b = _worker(pool, redis_server.url), _worker(pool, redis_server.url)
    with TestClient(a) as on_a, TestClient(b) as on_b:
        challenge = new_challenge(on_a)
        assert on_b.get(challenge["images"][0]).headers["content-type"] == "image/jpeg"
        cats = truth(b, challenge)
        assert answer(on_b, challenge["id"], cats).json()["result"] == "pass"
        replay = answer(on_a, challenge["id"], cats)
        assert replay.status_code == 409 and "already answered" in replay.json()["error"]
        assert on_a.get(challenge["images"][0]).status_code == 404  # its images went with it


def test_simultaneous_answers_on_two_workers_accept_exactly_one(pool, redis_server):
    a, b = _worker(pool, redis_server.url), _worker(pool, redis_server.url)
    with running(a) as url_a, running(b) as url_b:
        challenge = httpx.post(f"{url_a}/api/challenge").json()
        cats = sorted(truth(a, challenge))

        async def race() -> list[int]:
            async with httpx.AsyncClient() as client:
                replies = await asyncio.gather(*(
                    client.post(f"{url}/api/challenge/{challenge['id']}/answer", json={"selected": cats})
                    for url in [url_a, url_b] * 10))
            return sorted(reply.status_code for reply in replies)

        assert asyncio.run(race()) == [200] + [409] * 19


def test_pass_token_verifies_once_whichever_worker_is_asked(pool, redis_server):
    a, b = _worker(pool, redis_server.url), _worker(pool, redis_server.url)
    with TestClient(a) as on_a, TestClient(b) as on_b:
        challenge = new_challenge(on_a, SITE.key)
        token = answer(on_b, challenge["id"], truth(a, challenge)).json()["token"]
        verdict = _verify(on_b, token)
        assert verdict["success"] is True and verdict["hostname"] == "testserver" and verdict["challenge_ts"]
        assert _verify(on_a, token) == {"success": False, "error-codes": ["timeout-or-duplicate"]}


def test_a_pass_written_before_hostnames_existed_still_verifies(pool, redis_server):
    """A rolling restart: a token minted by the old code ("sitekey expires_at" in Redis) verifies once with the new."""
    import redis

    app = _worker(pool, redis_server.url)
    with TestClient(app) as client:
        challenge = new_challenge(client, SITE.key)
        token = answer(client, challenge["id"], truth(app, challenge)).json()["token"]
        nonce = token.split(".")[0]
        raw = redis.Redis.from_url(redis_server.url, decode_responses=True)
        key = f"asirra:pass:{nonce}"
        expires_at = raw.get(key).split(" ")[1]
        raw.set(key, f"{SITE.key} {expires_at}", px=60_000)  # the old format
        verdict = _verify(client, token)
        assert verdict["success"] is True and verdict["hostname"] == "" and verdict["challenge_ts"].endswith("Z")
        assert _verify(client, token)["error-codes"] == ["timeout-or-duplicate"]


def test_pass_token_expires_after_its_ttl(pool, redis_server):
    clock = FakeClock()
    app = _worker(pool, redis_server.url, clock=clock, pass_ttl_seconds=120)
    with TestClient(app) as client:
        challenge = new_challenge(client, SITE.key)
        token = answer(client, challenge["id"], truth(app, challenge)).json()["token"]
        clock.now += 121
        assert _verify(client, token)["error-codes"] == ["timeout-or-duplicate"]


def test_challenge_rate_limit_holds_across_workers(pool, redis_server):
    clock = FakeClock()
    a, b = (_worker(pool, redis_server.url, clock=clock, challenge_rate=0.5, challenge_burst=3) for _ in range(2))
    with TestClient(a) as on_a, TestClient(b) as on_b:
        new_challenge(on_a), new_challenge(on_b), new_challenge(on_a)
        for client in (on_a, on_b):
            refused = client.post("/api/challenge")
            assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
        clock.now += 2
        new_challenge(on_b)


def test_token_bucket_state_is_shared_by_the_workers(pool, redis_server):
    a, b = (_worker(pool, redis_server.url, safeguard="token-bucket:capacity=1") for _ in range(2))
    with TestClient(a) as on_a, TestClient(b) as on_b:
        failed = new_challenge(on_a)
        assert answer(on_a, failed["id"], set(range(12)) - truth(a, failed)).json()["result"] == "fail"
        right = new_challenge(on_b)  # same address, other worker, other cookie: the bucket is still empty
        assert answer(on_b, right["id"], truth(b, right)).json()["result"] == "fail"


def test_a_restarted_worker_keeps_every_outstanding_challenge_and_token(pool, redis_server):
    before = _worker(pool, redis_server.url)
    with TestClient(before) as client:
        unanswered = new_challenge(client)
        cats = truth(before, unanswered)
        passed = new_challenge(client, SITE.key)
        token = answer(client, passed["id"], truth(before, passed)).json()["token"]
    del before  # the worker is gone; a new process builds its app from scratch
    after = _worker(pool, redis_server.url)
    with TestClient(after) as client:
        assert answer(client, unanswered["id"], cats).json()["result"] == "pass"
        assert _verify(client, token)["success"] is True


def test_expired_replaced_and_unknown_challenges_get_their_precise_refusal(pool, redis_server):
    clock = FakeClock()
    app = _worker(pool, redis_server.url, clock=clock, ttl_seconds=30, max_per_client=2)
    with TestClient(app) as client:
        expiring = new_challenge(client)
        clock.now += 31
        assert client.get(expiring["images"][0]).status_code == 404
        late = answer(client, expiring["id"], [])
        assert late.status_code == 410 and "expired" in late.json()["error"]
        first, _, _ = (new_challenge(client) for _ in range(3))
        replaced = answer(client, first["id"], [])
        assert replaced.status_code == 410 and "replaced" in replaced.json()["error"]
        assert answer(client, "no-such-challenge", []).status_code == 404
        assert client.get("/healthz").json()["outstanding"] == 2


def test_a_full_server_replaces_the_oldest_challenge_instead_of_refusing(pool, redis_server):
    app = _worker(pool, redis_server.url, max_challenges=2)
    with TestClient(app, client=("10.0.0.1", 1)) as a, TestClient(app, client=("10.0.0.2", 1)) as b, \
            TestClient(app, client=("10.0.0.3", 1)) as c:
        check_a_full_table_replaces_instead_of_refusing(a, b, c)


def test_redis_outage_is_a_503_with_retry_after_and_the_service_recovers(pool, redis_server):
    app = _worker(pool, redis_server.url)
    with TestClient(app) as client:
        challenge = new_challenge(client)
        redis_server.stop()
        for request in (lambda: client.post("/api/challenge"), lambda: client.get(challenge["images"][0]),
                        lambda: answer(client, challenge["id"], []), lambda: client.get("/healthz")):
            refused = request()
            assert refused.status_code == 503, refused.text
            assert "store is unavailable" in refused.json()["error"] and int(refused.headers["retry-after"]) >= 1
        redis_server.start()  # same port, empty (no persistence): the old challenge is gone, the service is back
        assert answer(client, challenge["id"], []).status_code == 404
        assert len(new_challenge(client)["images"]) == 12


def test_a_worker_with_another_pool_is_refused(pool, redis_server, tmp_path):
    claim_pool(redis_server.url, pool_fingerprint(ordered_pool(pool)))
    claim_pool(redis_server.url, pool_fingerprint(ordered_pool(list(reversed(pool)))))  # same images, same order
    other = make_pool(tmp_path / "other", cats=14, dogs=15)
    with pytest.raises(PoolMismatch, match="differs from the one recorded in Redis"):
        claim_pool(redis_server.url, pool_fingerprint(ordered_pool(other)))
    with TestClient(_worker(other, redis_server.url)) as client:
        refused = client.post("/api/challenge")
        assert refused.status_code == 503 and "unavailable" in refused.json()["error"]
