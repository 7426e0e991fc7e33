"""The widget's server side: who may frame it, who may ask for its challenges, what the loader is served as.

The browser half (a page on one origin, the widget from another) is tests/test_browser_widget.py.
"""

from __future__ import annotations

import json

import pytest
from captcha_service_support import GENEROUS, TestClient, make_pool

from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.clients import ClientConfigError, Site, Sites, load_sites_text
from asirra.captcha.service.widget import parse_origin

SHOP = Site("shop-site-key", "shop-secret-" + "a" * 30, "a shop", hostnames=("shop.example", "*.shop.example"))
BARE = Site("bare-site-key", "bare-secret-" + "b" * 30, "no hostnames")
PAGE = "https://shop.example"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    pool = make_pool(tmp_path_factory.mktemp("pool"), cats=12, dogs=12)
    app = create_app(pool, make_safeguard("none"), GENEROUS, sites=Sites([SHOP, BARE]))
    with TestClient(app) as client:
        client.app_state = app.state
        yield client


def _widget(client, headers=None, **params):
    query = {"sitekey": SHOP.key, "origin": PAGE, "id": "1", **params}
    return client.get("/widget", params={k: v for k, v in query.items() if v is not None}, headers=headers or {})


def _main(response) -> str:
    return response.text[response.text.index("<main"):response.text.index(">", response.text.index("<main"))]


def test_widget_page_is_framable_only_by_the_origin_it_was_verified_for(client):
    page = _widget(client, headers={"Referer": PAGE + "/signup", "Sec-Fetch-Dest": "iframe"})
    assert page.status_code == 200 and 'data-error=""' in _main(page)
    assert page.headers["content-security-policy"] == f"default-src 'self'; img-src 'self'; frame-ancestors {PAGE}"
    assert "x-frame-options" not in page.headers and page.headers["cache-control"] == "no-store"
    sub = _widget(client, origin="http://www.shop.example:8080")  # *.shop.example, any scheme and port
    assert sub.status_code == 200 and sub.headers["content-security-policy"].endswith("frame-ancestors http://www.shop.example:8080")
    for path in ("/", "/api/challenge", "/healthz"):  # everything else: never framed
        reply = client.get(path) if path != "/api/challenge" else client.post(path)
        assert reply.headers["x-frame-options"] == "DENY"
        assert reply.headers["content-security-policy"].endswith("frame-ancestors 'none'")


@pytest.mark.parametrize("params, headers, kind, framer", [
    ({"sitekey": "no-such-site"}, {}, "unknown_sitekey", PAGE),
    ({"sitekey": BARE.key}, {}, "hostname_not_allowed", PAGE),  # registered no hostnames
    ({"origin": "https://evil.example"}, {}, "hostname_not_allowed", "https://evil.example"),
    ({"origin": "https://a.b.shop.example"}, {}, None, "https://a.b.shop.example"),  # deeper subdomains match
    ({"origin": "https://shop.example.evil.example"}, {}, "hostname_not_allowed", "https://shop.example.evil.example"),
    ({"origin": "https://shop.example/"}, {}, "hostname_not_allowed", None),  # not an origin: frames nowhere
    ({"origin": "javascript:alert(1)"}, {}, "hostname_not_allowed", None),
    ({"origin": "https://shop.example; script-src *"}, {}, "hostname_not_allowed", None),
    ({"origin": "HTTPS://SHOP.EXAMPLE"}, {}, "hostname_not_allowed", None),
    ({"origin": "https://shop.example:443"}, {}, "hostname_not_allowed", None),
    ({"origin": "https://user@shop.example"}, {}, "hostname_not_allowed", None),
    ({"id": "1", "extra": "x"}, {}, "bad_request", PAGE),
    ({"id": "<b>"}, {}, "bad_request", PAGE),
    ({}, {"Referer": "https://evil.example/page"}, "hostname_not_allowed", PAGE),
    ({}, {"Sec-Fetch-Dest": "document"}, "not_framed", PAGE),  # opened as a page of its own
])
def test_widget_refusals_name_a_fixed_kind_and_frame_only_a_well_formed_origin(client, params, headers, kind, framer):
    page = _widget(client, headers=headers, **params)
    csp = page.headers["content-security-policy"]
    assert csp.endswith(f"frame-ancestors {framer or chr(39) + 'none' + chr(39)}")
    if kind is None:
        assert page.status_code == 200
        return
    assert page.status_code == 403 and f'data-error="{kind}"' in _main(page)
    assert "evil" not in page.text and "script-src *" not in page.text  # no request text echoed


def test_a_challenge_for_a_site_with_hostnames_needs_a_registered_origin(client):
    ok = client.post("/api/challenge", params={"sitekey": SHOP.key, "origin": PAGE})
    assert ok.status_code == 200
    assert client.app_state.store.peek(ok.json()["id"]).hostname == "shop.example"
    for params, kind in [({"sitekey": SHOP.key}, "hostname_not_allowed"),
                         ({"sitekey": SHOP.key, "origin": "https://evil.example"}, "hostname_not_allowed"),
                         ({"sitekey": BARE.key, "origin": PAGE}, "hostname_not_allowed"),
                         ({"origin": PAGE}, "bad_request")]:
        refused = client.post("/api/challenge", params=params)
        assert refused.status_code in (400, 403) and refused.json()["kind"] == kind, (params, refused.text)
    legacy = client.post("/api/challenge", params={"sitekey": BARE.key})  # the service's own page, /?sitekey=
    assert legacy.status_code == 200 and client.app_state.store.peek(legacy.json()["id"]).hostname == "testserver"


def test_a_foreign_page_cannot_use_the_api_from_a_visitors_browser(client):
    """Fetch Metadata: a browser says a request comes from another site, and page scripts cannot hide it."""
    headers = {"Sec-Fetch-Site": "cross-site"}
    refused = client.post("/api/challenge", params={"sitekey": SHOP.key, "origin": PAGE}, headers=headers)
    assert refused.status_code == 403 and refused.json()["kind"] == "cross_site"
    challenge = client.post("/api/challenge", headers={"Sec-Fetch-Site": "same-origin"}).json()
    answer = client.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": []}, headers=headers)
    assert answer.status_code == 403 and answer.json()["kind"] == "cross_site"
    assert client.app_state.store.peek(challenge["id"]) is not None  # the refused answer spent nothing


def test_loader_script_is_served_for_other_sites_pages(client):
    script = client.get("/asirra.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert script.headers["cross-origin-resource-policy"] == "cross-origin"
    assert "max-age=300" in script.headers["cache-control"] and "set-cookie" not in script.headers
    assert 'name = "asirra-response"' in script.text and "asirra-captcha" in script.text


def test_cookie_is_partitioned_on_https_and_strict_on_http(client):
    with TestClient(client.app) as plain_client:
        plain = plain_client.get("/").headers["set-cookie"]
    assert "SameSite=Strict" in plain and "Secure" not in plain and "HttpOnly" in plain
    with TestClient(client.app, base_url="https://testserver") as secure_client:
        secure = secure_client.get("/").headers["set-cookie"]
    assert "SameSite=None" in secure and "Secure" in secure and "Partitioned" in secure


@pytest.mark.parametrize("text, ok", [
    ("https://shop.example", True), ("http://127.0.0.1:8080", True), ("http://[::1]:8000", True),
    ("https://shop.example:443", False), ("http://shop.example:80", False), ("https://shop.example/", False),
    ("ftp://shop.example", False), ("https://", False), ("https://shop.example:99999", False),
    ("https://shöp.example", False), ("", False),
])
def test_origins_are_accepted_only_as_a_browser_serialises_them(text, ok):
    assert (parse_origin(text) == text) is ok


@pytest.mark.parametrize("hostnames, words", [
    (["https://shop.example"], "must be a bare hostname"),
    (["shop.example:8080"], "must be a bare hostname"),
    (["*.example"], "must be a bare hostname"),
    ([], "list of 1-50"),
    ("shop.example", "list of 1-50"),
    ([5], "must be a string"),
])
def test_bad_hostnames_are_refused_in_one_line(hostnames, words):
    text = json.dumps({"sites": [{"key": SHOP.key, "secret": SHOP.secret, "hostnames": hostnames}]})
    with pytest.raises(ClientConfigError, match=words) as error:
        load_sites_text(text)
    assert "\n" not in str(error.value)


def test_hostnames_match_exactly_or_by_wildcard_below_the_apex():
    sites = load_sites_text('{"sites": [{"key": "%s", "secret": "%s", "hostnames": ["Shop.Example.", "*.shop.example",'
                            ' "127.0.0.1", "[::1]"]}]}' % (SHOP.key, SHOP.secret))
    site = sites.get(SHOP.key)
    assert site.hostnames == ("shop.example", "*.shop.example", "127.0.0.1", "::1")
    hosts = ("shop.example", "SHOP.example.", "a.shop.example", "a.b.shop.example", "evilshop.example", "127.0.0.1",
             "::1")
    assert [site.allows(h) for h in hosts] == [True, True, True, True, False, True, True]
    old = load_sites_text('{"sites": [{"key": "%s", "secret": "%s"}]}' % (SHOP.key, SHOP.secret))
    assert old.get(SHOP.key).hostnames == () and not old.get(SHOP.key).allows("shop.example")  # old files still load
