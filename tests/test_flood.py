"""Floods: a client far past its rate limit gets 429s with Retry-After and nothing else, changes no state,
and leaves other clients their challenges; many addresses cannot grow the rate tables past their bound.
(What a refusal costs in CPU, and people's latency beside a flood, are measured by benchmarks/flood.py.)"""

from __future__ import annotations

import logging

import pytest
from captcha_service_support import FakeClock, TestClient, make_pool, new_challenge

from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.settings import ServiceSettings

DEFAULTS = ServiceSettings(seed=0)  # the limits the service ships with: 40 requests/s per address, burst 120


@pytest.fixture
def pool(tmp_path):
    return make_pool(tmp_path / "pool", cats=8, dogs=8)


def flood_requests(n: int):
    """What a flood sends, round robin: cookie-less challenge requests, made-up images and answers."""
    kinds = [("POST", "/api/challenge"), ("GET", "/api/image/made-up-token"), ("POST", "/api/challenge/made-up-id/answer")]
    return [kinds[i % len(kinds)] for i in range(n)]


def test_a_flood_past_the_limit_gets_429s_with_retry_after_and_nothing_else(pool, caplog):
    clock = FakeClock()  # frozen: no token comes back during the flood
    app = create_app(pool, make_safeguard("none"), DEFAULTS, clock=clock)
    bot = TestClient(app, client=("203.0.113.7", 5000))  # raises any server exception: a traceback fails the test
    caplog.set_level(logging.WARNING)
    statuses = []
    for i, (method, path) in enumerate(flood_requests(10 * DEFAULTS.request_burst)):
        reply = bot.request(method, path)
        statuses.append(reply.status_code)
        if i >= DEFAULTS.request_burst:  # its burst spent: refusals, and only refusals
            assert reply.status_code == 429, (method, path, reply.text)
            assert int(reply.headers["retry-after"]) >= 1
            assert reply.json() == {"error": "too many requests; slow down", "kind": "rate_limited"}
            assert "set-cookie" not in reply.headers  # a refusal changes nothing, the cookie jar included
    assert not [s for s in statuses if s >= 500]
    assert statuses[: DEFAULTS.request_burst].count(429) < DEFAULTS.request_burst  # the burst itself was served
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_refusals_change_no_state_and_others_keep_getting_challenges(pool):
    clock = FakeClock()
    app = create_app(pool, make_safeguard("none"), DEFAULTS, clock=clock)
    store = app.state.store
    bot = TestClient(app, client=("203.0.113.7", 5000))
    for _ in range(DEFAULTS.request_burst):  # spend the burst
        bot.get("/api/image/made-up-token")
    outstanding, buckets = len(store), {kind: len(limiter._buckets) for kind, limiter in store._limits.items()}
    for method, path in flood_requests(1000):
        assert bot.request(method, path).status_code == 429
    assert len(store) == outstanding
    assert {kind: len(limiter._buckets) for kind, limiter in store._limits.items()} == buckets
    person = TestClient(app, client=("198.51.100.2", 5000))
    challenge = new_challenge(person)
    assert all(person.get(url).status_code == 200 for url in challenge["images"])


def test_many_addresses_keep_every_rate_table_at_its_bound(pool):
    settings = ServiceSettings(seed=0, max_clients=50)
    app = create_app(pool, make_safeguard("none"), settings, clock=FakeClock())
    for i in range(300):
        client = TestClient(app, client=(f"10.0.{i >> 8}.{i & 255}", 5000))
        assert client.post("/api/challenge").status_code == 200
    store = app.state.store
    assert {kind: len(limiter._buckets) for kind, limiter in store._limits.items() if len(limiter._buckets)} == {
        "request": 50, "challenge": 50}
    assert len(store) == 300  # outstanding challenges have their own bound (max_challenges)
