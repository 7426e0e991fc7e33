"""What an operator watches: /metrics counts what the service did, exactly, and the access log says it without
a secret, a token or an answer in it. (test_metrics.py is the classifier's metrics.)"""

from __future__ import annotations

import logging
from dataclasses import replace

import httpx
import pytest
from captcha_service_support import GENEROUS, TestClient, answer, make_pool, new_challenge, truth
from prometheus_client.parser import text_string_to_metric_families
from redis_support import redis_server  # noqa: F401  (fixture)

from asirra.captcha.safeguards import parse_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.clients import Site, Sites
from asirra.captcha.service.run import running

LOOPBACK = ("127.0.0.1", 50000)  # where Prometheus scrapes from; TestClient's default "testclient" is no address
SITE = Site("metrics-site", "metrics-site-secret-" + "m" * 20, "metrics")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), cats=15, dogs=15)


def scrape(client) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, ((label, value), ...)): value}."""
    reply = client.get("/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(reply.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_follow_what_the_service_did(pool):
    app = create_app(pool, parse_safeguard("none"), replace(GENEROUS, secret=b"m" * 32), sites=Sites([SITE]))
    with TestClient(app, client=LOOPBACK) as client:
        challenges = [new_challenge(client, SITE.key) for _ in range(2)] + [new_challenge(client)]
        token = answer(client, challenges[0]["id"], truth(app, challenges[0])).json()["token"]  # pass
        answer(client, challenges[1]["id"], set(range(12)) - truth(app, challenges[1]))  # fail
        assert answer(client, challenges[0]["id"], []).status_code == 409  # replayed
        assert client.post("/api/challenge", params={"sitekey": "no-such-site"}).status_code == 400
        assert client.get("/api/image/no-such-token").status_code == 404
        for _ in range(2):
            client.post("/api/verify", data={"secret": SITE.secret, "response": token})
        client.post("/api/verify", data={"secret": "x" * 40, "response": token})
        samples = scrape(client)
    assert value(samples, "asirra_challenges_issued_total", site=SITE.key) == 2
    assert value(samples, "asirra_challenges_issued_total", site="none") == 1
    assert value(samples, "asirra_answers_total", site=SITE.key, verdict="pass") == 1
    assert value(samples, "asirra_answers_total", site=SITE.key, verdict="fail") == 1
    assert value(samples, "asirra_refusals_total", kind="already_answered") == 1
    assert value(samples, "asirra_refusals_total", kind="unknown_sitekey") == 1
    assert value(samples, "asirra_refusals_total", kind="unknown_image") == 1
    assert value(samples, "asirra_verify_total", site=SITE.key, result="success") == 1
    assert value(samples, "asirra_verify_total", site=SITE.key, result="timeout-or-duplicate") == 1
    assert value(samples, "asirra_verify_total", site="unknown", result="invalid-input-secret") == 1
    # Latency by route template, never by raw path: 4 answers (one refused), 4 challenge requests.
    assert value(samples, "asirra_request_duration_seconds_count", route="/api/challenge/{challenge_id}/answer",
                 method="POST", status="2xx") == 2
    assert value(samples, "asirra_request_duration_seconds_count", route="/api/challenge", method="POST",
                 status="2xx") == 3
    assert value(samples, "asirra_request_duration_seconds_count", route="/api/image/{token}", method="GET",
                 status="4xx") == 1


def test_rate_limited_requests_are_counted_and_never_leak_a_token(pool):
    app = create_app(pool, parse_safeguard("none"), replace(GENEROUS, request_rate=0.001, request_burst=3))
    with TestClient(app, client=LOOPBACK) as client:
        challenge = new_challenge(client)
        statuses = [client.get(url).status_code for url in challenge["images"][:4]]
        assert statuses == [200, 200, 429, 429]
        text = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
               for s in f.samples}
    assert value(samples, "asirra_refusals_total", kind="rate_limited") == 2
    assert challenge["id"] not in text and not any(url.rsplit("/", 1)[1] in text for url in challenge["images"])


def test_metrics_are_only_for_allowed_addresses_and_never_through_a_proxy(pool):
    app = create_app(pool, parse_safeguard("none"), replace(GENEROUS, metrics_allow=("127.0.0.1",)))
    with running(app) as url:
        local = httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.1"))
        other = httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.9"))
        assert local.get("/metrics").status_code == 200
        assert other.get("/metrics").status_code == 404
        assert local.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 404
    off = create_app(pool, parse_safeguard("none"), replace(GENEROUS, metrics_allow=()))
    with TestClient(off, client=LOOPBACK) as client:
        assert client.get("/metrics").status_code == 404


def test_store_errors_are_counted_by_operation(pool, redis_server):
    settings = replace(GENEROUS, redis_url=redis_server.url, secret=b"r" * 32)
    app = create_app(pool, parse_safeguard("none"), settings)
    with TestClient(app, client=LOOPBACK) as client:
        assert client.post("/api/challenge").status_code == 200
        redis_server.stop()
        refused = client.post("/api/challenge")
        assert refused.status_code == 503 and refused.json()["kind"] == "unavailable"
        samples = scrape(client)
    assert value(samples, "asirra_store_errors_total", op="spend") == 1
    assert value(samples, "asirra_refusals_total", kind="unavailable") == 1


def test_access_log_is_structured_and_carries_no_secret_token_or_answer(pool, caplog):
    app = create_app(pool, parse_safeguard("none"), replace(GENEROUS, secret=b"s" * 32), sites=Sites([SITE]))
    with TestClient(app, client=LOOPBACK) as client, caplog.at_level(logging.INFO, logger="asirra.access"):
        challenge = new_challenge(client, SITE.key)
        images = [client.get(url) for url in challenge["images"]]
        cats = sorted(truth(app, challenge))
        token = answer(client, challenge["id"], cats).json()["token"]
        client.post("/api/verify", data={"secret": SITE.secret, "response": token})
        cookie = client.cookies["asirra_client"]
    records = [r for r in caplog.records if r.name == "asirra.access"]
    assert len(records) == 1 + len(images) + 2
    for record in records:
        assert set(record.fields) >= {"method", "route", "status", "ms", "client", "worker"}
    answered = next(r.fields for r in records if r.fields["route"].endswith("/answer"))
    assert answered["verdict"] == "pass" and answered["site"] == SITE.key and answered["status"] == 200
    text = "\n".join(f"{r.getMessage()} {r.fields}" for r in records)
    secrets = [challenge["id"], token, token.split(".")[0], SITE.secret, cookie, "selected", str(cats)]
    secrets += [url.rsplit("/", 1)[1] for url in challenge["images"]]
    assert not [s for s in secrets if s in text]
