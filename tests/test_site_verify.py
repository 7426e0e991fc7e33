"""Site verification: a pass earns a single-use token for one site, which only that site's secret can verify.

Runs on both stores; the example site shows (and this test walks) the whole loop a web site uses.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

import httpx
import pytest
from captcha_service_support import GENEROUS, ColourClassifier, FakeClock, TestClient, make_pool
from redis_support import redis_server  # noqa: F401  (fixture)

from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.clients import ClientConfigError, PassTokens, Site, Sites, load_sites
from asirra.captcha.service.example_site import create_site
from asirra.captcha.service.run import running
from asirra.captcha.service.settings import ServiceSettings

SHOP = Site("shop-site-key", "shop-secret-" + "a" * 30, "a shop")
BLOG = Site("blog-site-key", "blog-secret-" + "b" * 30, "a blog")
SHOP_WIDGET = Site("shop-widget-key", "shop-widget-secret-" + "w" * 30, "a shop's widget", hostnames=("127.0.0.1",))


@pytest.fixture
def pool(tmp_path):
    return make_pool(tmp_path / "pool", cats=15, dogs=15)


@pytest.fixture(params=["memory", "redis"])
def make_app(request, pool):
    """Builds the service on the in-process store, then on a real Redis."""
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None

    def build(clock=None, **settings):
        base = {**GENEROUS.__dict__, "secret": b"k" * 32, "redis_url": url, **settings}
        return create_app(pool, make_safeguard("none"), ServiceSettings(**base), clock=clock, sites=Sites([SHOP, BLOG, SHOP_WIDGET]))

    return build


def _pass(app, client, sitekey) -> str:
    """Solve one challenge requested for `sitekey`; the pass token."""
    challenge = client.post("/api/challenge", params={"sitekey": sitekey}).json()
    truth = sorted(app.state.store.peek(challenge["id"]).challenge.answer)
    reply = client.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": truth}).json()
    assert reply["result"] == "pass"
    return reply["token"]


def _verify(client, secret, token, **extra):
    return client.post("/api/verify", data={"secret": secret, "response": token, **extra})


def test_token_verifies_once_for_its_own_site_only(make_app):
    app = make_app()
    with TestClient(app) as client:
        token = _pass(app, client, SHOP.key)
        foreign = _verify(client, BLOG.secret, token)
        assert foreign.status_code == 200 and foreign.json() == {"success": False, "error-codes": ["invalid-input-response"]}
        before = time.time()
        ok = client.post("/api/verify", json={"secret": SHOP.secret, "response": token})  # JSON, as Turnstile takes
        # The blog's attempt did not spend it; siteverify says where and when it was solved, as Turnstile's does.
        assert set(ok.json()) == {"success", "error-codes", "hostname", "challenge_ts"} and ok.json()["success"] is True
        assert ok.json()["error-codes"] == [] and ok.json()["hostname"] == "testserver"  # the service's own page
        solved = datetime.fromisoformat(ok.json()["challenge_ts"].replace("Z", "+00:00")).timestamp()
        assert ok.json()["challenge_ts"].endswith("Z") and before - 5 < solved <= before + 0.001
        assert _verify(client, SHOP.secret, token).json()["error-codes"] == ["timeout-or-duplicate"]


def test_expired_forged_and_tampered_tokens_are_refused(make_app):
    clock = FakeClock()
    app = make_app(clock=clock)
    with TestClient(app) as client:
        token = _pass(app, client, SHOP.key)
        forged = PassTokens(b"another key of thirty-two bytes!").mint(SHOP.key)[1]
        tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
        for bad in (forged, tampered, "not-a-token"):
            assert _verify(client, SHOP.secret, bad).json()["error-codes"] == ["invalid-input-response"]
        clock.now += 121  # a token lives 2 minutes
        assert _verify(client, SHOP.secret, token).json()["error-codes"] == ["timeout-or-duplicate"]


def test_only_a_pass_for_a_site_earns_a_token(make_app):
    app = make_app()
    with TestClient(app) as client:
        challenge = client.post("/api/challenge", params={"sitekey": SHOP.key}).json()
        wrong = set(range(12)) - app.state.store.peek(challenge["id"]).challenge.answer
        failed = client.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": sorted(wrong)}).json()
        assert failed["result"] == "fail" and "token" not in failed
        plain = client.post("/api/challenge").json()  # no site: the page's own demo
        truth = sorted(app.state.store.peek(plain["id"]).challenge.answer)
        passed = client.post(f"/api/challenge/{plain['id']}/answer", json={"selected": truth}).json()
        assert set(passed) == {"result", "message"}


@pytest.mark.parametrize("query, words", [
    ({"sitekey": "no-such-site"}, "unknown site key"),
    ({"sitekey": ""}, "unknown site key"),
    ({"site": SHOP.key}, "unknown query parameter"),
    ([("sitekey", SHOP.key), ("sitekey", BLOG.key)], "one sitekey"),
])
def test_challenge_for_an_unknown_or_malformed_site_is_refused_and_spends_nothing(make_app, query, words):
    app = make_app(challenge_rate=0.001, challenge_burst=1)  # one challenge allowed in all
    with TestClient(app) as client:
        refused = client.post("/api/challenge", params=query)
        assert refused.status_code == 400 and words in refused.json()["error"]
        assert client.post("/api/challenge", params={"sitekey": SHOP.key}).status_code == 200


VALID = "VALID"  # stands for a genuine, unspent token in the table below


@pytest.mark.parametrize("content, content_type, status, codes", [
    (b"{not json", "application/json", 400, ["bad-request"]),
    (b'["a"]', "application/json", 400, ["bad-request"]),
    (json.dumps({"secret": SHOP.secret, "response": VALID, "extra": "1"}), "application/json", 400, ["bad-request"]),
    (json.dumps({"secret": 5, "response": VALID}), "application/json", 400, ["bad-request"]),
    (json.dumps({"secret": SHOP.secret, "response": "x" * 600}), "application/json", 400, ["bad-request"]),
    (b"secret=&response=", "application/x-www-form-urlencoded", 400, ["missing-input-secret", "missing-input-response"]),
    (json.dumps({"response": VALID}), "application/json", 400, ["missing-input-secret"]),
    (json.dumps({"secret": SHOP.secret}), "application/json", 400, ["missing-input-response"]),
    (f"secret={SHOP.secret}&secret={BLOG.secret}&response=VALID", "application/x-www-form-urlencoded", 400, ["bad-request"]),
    (b"\xff\xfe=1", "application/x-www-form-urlencoded", 400, ["bad-request"]),
    (json.dumps({"secret": "wrong-secret", "response": VALID}), "application/json", 403, ["invalid-input-secret"]),
    (b"x" * 5000, "application/x-www-form-urlencoded", 413, ["bad-request"]),
])
def test_malformed_verify_request_is_refused_and_leaves_the_token_unspent(make_app, content, content_type, status, codes):
    app = make_app()
    with TestClient(app) as client:
        token = _pass(app, client, SHOP.key)
        if isinstance(content, str):
            content = content.replace(VALID, token).encode()
        refused = client.post("/api/verify", content=content, headers={"content-type": content_type})
        assert refused.status_code == status, refused.text
        assert refused.json()["success"] is False and refused.json()["error-codes"] == codes and refused.json()["error"]
        assert _verify(client, SHOP.secret, token).json()["success"] is True


def test_example_site_lets_in_a_verified_visitor_once(make_app):
    app = make_app()
    with running(app) as service_url:
        site = create_site(service_url, SHOP_WIDGET.key, SHOP_WIDGET.secret, hostnames=SHOP_WIDGET.hostnames)
        with running(site) as site_url, httpx.Client(base_url=service_url) as browser:
            page = httpx.get(site_url)
            # The two lines of the page: the service's script, and the element in the form (the widget fills it in).
            assert f'<script src="{service_url}/asirra.js" async defer></script>' in page.text
            assert f'<div class="asirra-captcha" data-sitekey="{SHOP_WIDGET.key}"' in page.text
            policy = page.headers["content-security-policy"]
            assert f"script-src 'self' {service_url}; frame-src {service_url}" in policy
            # The visitor's browser solves the challenge in the widget (here by colour, through the public API only).
            challenge = browser.post("/api/challenge", params={"sitekey": SHOP_WIDGET.key, "origin": site_url}).json()
            cats = ColourClassifier().solve([browser.get(url).content for url in challenge["images"]])
            selected = [i for i, cat in enumerate(cats) if cat]
            reply = browser.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": selected}).json()
            assert reply["token_expires_in"] == 120
            form = {"name": "Ada", "asirra-response": reply["token"]}
            welcome = httpx.post(f"{site_url}/signup", data=form).json()  # the third line: the server's check
            assert welcome["welcome"] == "Ada" and welcome["hostname"] == "127.0.0.1" and welcome["challenge_ts"]
            replay = httpx.post(f"{site_url}/signup", data=form)
            assert replay.status_code == 403 and replay.json()["error-codes"] == ["timeout-or-duplicate"]
            assert httpx.post(f"{site_url}/signup", data={"name": "Eve"}).status_code == 403


def test_a_site_checking_hostnames_refuses_a_pass_earned_elsewhere(make_app):
    app = make_app()
    with running(app) as service_url:
        site = create_site(service_url, SHOP.key, SHOP.secret, hostnames=("shop.example",))
        with running(site) as site_url, httpx.Client(base_url=service_url) as browser:
            token = _pass(app, browser, SHOP.key)  # earned on the service's own page, not on shop.example
            refused = httpx.post(f"{site_url}/signup", data={"name": "Ada", "asirra-response": token})
            assert refused.status_code == 403 and refused.json()["error-codes"] == ["hostname-mismatch"]


def test_verify_calls_have_their_own_rate_limit(make_app):
    app = make_app(verify_rate=0.001, verify_burst=2, request_rate=0.001, request_burst=40)
    with TestClient(app) as client:
        for _ in range(2):
            assert _verify(client, SHOP.secret, "not-a-token").status_code == 200
        assert _verify(client, SHOP.secret, "not-a-token").status_code == 429
        assert client.post("/api/challenge").status_code == 200  # the browser-facing budget is separate


def test_sites_file_is_read_and_bad_ones_are_refused_in_one_line(tmp_path):
    path = tmp_path / "sites.json"
    path.write_text(json.dumps({"sites": [{"key": SHOP.key, "secret": SHOP.secret, "name": "a shop"}]}))
    sites = load_sites(path)
    assert sites.known(SHOP.key) and sites.by_secret(SHOP.secret).name == "a shop" and sites.by_secret("x") is None
    bad = {
        "not json": "{",
        "no sites list": json.dumps({"site": []}),
        "short secret": json.dumps({"sites": [{"key": SHOP.key, "secret": "short"}]}),
        "bad key": json.dumps({"sites": [{"key": "no spaces allowed", "secret": SHOP.secret}]}),
        "unknown field": json.dumps({"sites": [{"key": SHOP.key, "secret": SHOP.secret, "colour": "red"}]}),
        "same key twice": json.dumps({"sites": [{"key": SHOP.key, "secret": SHOP.secret},
                                                {"key": SHOP.key, "secret": BLOG.secret}]}),
    }
    for case, text in bad.items():
        path.write_text(text)
        with pytest.raises(ClientConfigError) as error:
            load_sites(path)
        assert "\n" not in str(error.value), case
    with pytest.raises(ClientConfigError, match="cannot read"):
        load_sites(tmp_path / "missing.json")
