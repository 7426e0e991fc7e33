"""The widget as a site deploys it, in headless Chromium: a sign-up page on one origin embeds the check from the
service on another, a person picks the cats (by mouse, touch or keyboard), and the site's server verifies the
token and lets the sign-up through; a wrong pick, an expired challenge, a replayed token and an unregistered
page each keep the door shut.

Three loopback addresses are three *sites* to the browser (127.0.0.1 the shop, 127.0.0.2 the service, 127.0.0.3
a stranger), so the frame is cross-site: it gets no cookie on http, and the test proves the widget works
without one. The pool is generated pictures (never dataset photos), so the screenshots can be shown anywhere.
Each screenshot is written to the test's tmp dir.
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import datetime

import httpx
import pytest
from browser_support import browser  # noqa: F401  (fixture)
from captcha_service_support import GENEROUS, FakeClock, make_pool

from asirra.captcha.safeguards import parse_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.clients import Site, Sites
from asirra.captcha.service.example_site import create_site
from asirra.captcha.service.run import running
from asirra.captcha.service.settings import DEFAULT_SAFEGUARD
from asirra.captcha.service.store import Unavailable

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHOP = Site("widget-shop", "widget-shop-secret-" + "s" * 20, "the shop", hostnames=("127.0.0.1",))
FRAME = "iframe[title^='Asirra']"
IMAGES_SHOWN = ("() => { const imgs = [...document.querySelectorAll('#grid img')];"
                " return imgs.length === 12 && imgs.every((img) => img.complete && img.naturalWidth > 0); }")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), cats=24, dogs=24)


class Deployment:
    """The service on 127.0.0.2, the shop's sign-up site on 127.0.0.1 and a stranger's copy of it on 127.0.0.3."""

    def __init__(self, pool, **settings):
        self.clock = FakeClock()
        config = replace(GENEROUS, secret=b"w" * 32, **settings)
        self.app = create_app(pool, parse_safeguard(DEFAULT_SAFEGUARD), config, clock=self.clock, sites=Sites([SHOP]))

    def __enter__(self):
        self._service = running(self.app, host="127.0.0.2")
        self.service = self._service.__enter__()
        shop = create_site(self.service, SHOP.key, SHOP.secret, hostnames=SHOP.hostnames)
        self._site = running(shop, host="127.0.0.1")
        self.site = self._site.__enter__()
        self._stranger = running(create_site(self.service, SHOP.key, SHOP.secret), host="127.0.0.3")
        self.stranger = self._stranger.__enter__()
        return self

    def __exit__(self, *exc):
        for server in (self._stranger, self._site, self._service):
            server.__exit__(*exc)

    def answer(self, frame) -> set[int]:
        """The cats of the challenge the frame shows (read in-process, as a person reads the photos)."""
        return set(self.app.state.store.peek(frame.get_attribute("#captcha", "data-challenge")).challenge.answer)


def widget_frame(page):
    page.wait_for_selector(FRAME)
    frame = page.frame(url=re.compile(r"/widget\?"))
    frame.wait_for_selector("#captcha[data-state]")
    return frame


def show_photos(frame, previous: str = "") -> str:
    main = "document.querySelector('#captcha')"
    frame.wait_for_function(f"() => {main}.dataset.challenge !== {previous!r} && {main}.dataset.state === 'choosing'"
                            f" && ({IMAGES_SHOWN})()")
    return frame.get_attribute("#captcha", "data-challenge")


def pressed(frame) -> list[int]:
    return frame.eval_on_selector_all('.tile[aria-pressed="true"]', "ts => ts.map(t => Number(t.dataset.index))")


def events(page) -> list:
    return page.evaluate("window.asirraEvents")


def sign_up(page) -> tuple[int, dict]:
    with page.expect_response(lambda r: r.url.endswith("/signup")) as reply:
        page.click("form button")
    return reply.value.status, reply.value.json()


def test_picking_the_cats_by_clicks_signs_up_once_and_a_replay_is_refused(browser, pool, tmp_path):
    with Deployment(pool) as site:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(site.site)
        page.fill("input[name=name]", "Ada")
        frame = widget_frame(page)
        page.screenshot(path=str(tmp_path / "widget-idle.png"))
        frame.click("#start")
        show_photos(frame)
        cats = site.answer(frame)
        for index in sorted(cats):
            frame.click(f'.tile[data-index="{index}"]')
        assert sorted(pressed(frame)) == sorted(cats)
        page.screenshot(path=str(tmp_path / "widget-selected.png"))
        frame.click("#verify")
        page.wait_for_function("() => document.querySelector('input[name=asirra-response]').value !== ''")
        token = page.input_value("input[name=asirra-response]")
        assert events(page) == [["pass"]] and page.evaluate("asirra.getResponse()") == token
        assert frame.get_attribute("#captcha", "data-state") == "passed"
        page.screenshot(path=str(tmp_path / "widget-passed.png"))

        status, body = sign_up(page)
        assert status == 200 and body["welcome"] == "Ada" and body["hostname"] == "127.0.0.1"
        assert datetime.fromisoformat(body["challenge_ts"].replace("Z", "+00:00"))

        # The same token again, put back into a fresh form by hand: spent.
        page.goto(site.site)
        widget_frame(page)
        page.fill("input[name=name]", "Eve")
        page.evaluate("t => { document.querySelector('input[name=asirra-response]').value = t; }", token)
        status, body = sign_up(page)
        assert status == 403 and body["error-codes"] == ["timeout-or-duplicate"]


def test_a_tap_on_a_touch_screen_selects_a_photo(browser, pool):
    with Deployment(pool) as site:
        context = browser.new_context(has_touch=True, is_mobile=True, viewport={"width": 390, "height": 800})
        page = context.new_page()
        page.goto(site.site)
        frame = widget_frame(page)
        frame.tap("#start")
        show_photos(frame)
        frame.tap('.tile[data-index="5"]')
        assert pressed(frame) == [5]
        frame.tap('.tile[data-index="5"]')
        assert pressed(frame) == []
        width = frame.evaluate("document.querySelector('.tile').getBoundingClientRect().width")
        assert width >= 44  # a finger's worth on a phone-sized screen
        context.close()


def test_keyboard_only_a_person_passes_and_signs_up(browser, pool, tmp_path):
    with Deployment(pool) as site:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(site.site)
        frame = widget_frame(page)
        page.focus("input[name=name]")
        page.keyboard.type("Grace")
        page.keyboard.press("Tab")  # into the frame: its first control
        assert frame.evaluate("document.activeElement.id") == "start"
        page.keyboard.press("Enter")
        show_photos(frame)
        assert frame.evaluate("document.activeElement.dataset.index") == "0"
        outline = frame.evaluate("getComputedStyle(document.activeElement).outlineStyle")
        assert outline != "none"  # focus is visible
        page.screenshot(path=str(tmp_path / "widget-keyboard-focus.png"))

        labels = frame.eval_on_selector_all(".tile", "ts => ts.map(t => t.getAttribute('aria-label'))")
        assert labels == [f"Photo {i} of 12" for i in range(1, 13)]
        grid_html = frame.inner_html("#grid").lower()
        assert "cat" not in grid_html and "dog" not in grid_html  # nothing in the grid says which is which
        assert frame.eval_on_selector_all("#grid img", "is => is.every(i => i.alt === '')")

        cats = site.answer(frame)
        page.keyboard.press("ArrowDown")  # one row down, then back: arrows move, Space selects
        assert frame.evaluate("document.activeElement.dataset.index") == "4"
        page.keyboard.press("Home")
        for index in range(12):
            if index in cats:
                page.keyboard.press("Space")
            if index < 11:
                page.keyboard.press("ArrowRight")
        assert sorted(pressed(frame)) == sorted(cats)
        page.keyboard.press("Tab")  # the grid is one Tab stop: next comes Verify
        assert frame.evaluate("document.activeElement.id") == "verify"
        page.keyboard.press("Enter")
        page.wait_for_function("() => document.querySelector('input[name=asirra-response]').value !== ''")
        page.keyboard.press("Tab")  # out of the frame, to the form's next control
        assert page.evaluate("document.activeElement.textContent") == "Sign up"
        with page.expect_response(lambda r: r.url.endswith("/signup")) as reply:
            page.keyboard.press("Enter")
        assert reply.value.status == 200 and reply.value.json()["welcome"] == "Grace"


def test_a_wrong_pick_and_an_expired_challenge_keep_the_door_shut(browser, pool):
    with Deployment(pool) as site:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(site.site)
        page.fill("input[name=name]", "Mallory")
        frame = widget_frame(page)
        frame.click("#start")
        first = show_photos(frame)
        for index in sorted(site.answer(frame)):  # right, but too late
            frame.click(f'.tile[data-index="{index}"]')
        site.clock.now += GENEROUS.ttl_seconds + 1
        frame.click("#verify")
        second = show_photos(frame, previous=first)
        assert "expired" in frame.inner_text("#status")
        assert page.input_value("input[name=asirra-response]") == ""

        for index in sorted(set(range(12)) - site.answer(frame)):  # every photo wrong
            frame.click(f'.tile[data-index="{index}"]')
        frame.click("#verify")
        show_photos(frame, previous=second)
        assert "Not passed" in frame.inner_text("#status")
        assert page.input_value("input[name=asirra-response]") == "" and events(page) == []

        status, body = sign_up(page)
        assert status == 403 and body["error-codes"] == ["missing-input-response"]


def test_an_expired_pass_empties_the_field_and_calls_the_expired_callback(browser, pool):
    with Deployment(pool, pass_ttl_seconds=2) as site:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(site.site)
        frame = widget_frame(page)
        frame.click("#start")
        show_photos(frame)
        for index in sorted(site.answer(frame)):
            frame.click(f'.tile[data-index="{index}"]')
        frame.click("#verify")
        page.wait_for_function("() => window.asirraEvents.length === 1")
        assert events(page) == [["pass"]] and page.input_value("input[name=asirra-response]") != ""
        page.wait_for_function("() => window.asirraEvents.length === 2", timeout=10_000)
        assert events(page) == [["pass"], ["expired"]]
        assert page.input_value("input[name=asirra-response]") == ""
        assert frame.get_attribute("#captcha", "data-state") == "idle" and "expired" in frame.inner_text("#status")


def test_a_page_on_an_unregistered_hostname_is_refused(browser, pool, tmp_path):
    with Deployment(pool) as site:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        messages = []
        page.on("console", lambda message: messages.append(message.text))
        page.goto(site.stranger)
        frame = widget_frame(page)
        page.wait_for_function("() => window.asirraEvents.length > 0")
        assert events(page) == [["error", "hostname-not-allowed"]]
        assert frame.get_attribute("#captcha", "data-error") == "hostname_not_allowed"
        assert "not allowed" in frame.inner_text("#status") and frame.is_hidden("#start")
        page.screenshot(path=str(tmp_path / "widget-refused.png"))

        # A page that lies about where it is: the service frames the widget only for the origin named,
        # and the browser refuses to draw it anywhere else.
        page.evaluate("""u => { const f = document.createElement('iframe'); f.id = 'liar'; f.src = u;
                                document.body.append(f); }""",
                      f"{site.service}/widget?sitekey={SHOP.key}&origin={site.site}&id=9")
        page.wait_for_function("() => document.getElementById('liar').contentWindow.length === 0", timeout=5000)
        page.wait_for_timeout(500)
        liar = [f for f in page.frames if f.name == "" and f.url.startswith("chrome-error")]
        assert liar, [f.url for f in page.frames]
        assert any("frame-ancestors" in text for text in messages), messages
        assert len(site.app.state.store) == 0  # no challenge was ever issued
        refused = httpx.post(f"{site.service}/api/challenge", params={"sitekey": SHOP.key, "origin": site.stranger})
        assert refused.status_code == 403 and refused.json()["kind"] == "hostname_not_allowed"


def test_rate_limits_and_outages_are_told_to_the_person_and_the_page(browser, pool, tmp_path):
    with Deployment(pool, challenge_rate=0.001, challenge_burst=1) as site:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(site.site)
        frame = widget_frame(page)
        frame.click("#start")
        show_photos(frame)
        frame.click("#new")  # a second challenge at once: over the per-address budget
        frame.wait_for_selector("#captcha[data-state=error]")
        status = frame.inner_text("#status")
        assert "Too many attempts" in status and re.search(r"in \d+ s", status)
        assert events(page) == [["error", "rate-limited"]] and frame.is_disabled("#start")
        page.screenshot(path=str(tmp_path / "widget-rate-limited.png"))

        async def down(*args, **kwargs):
            raise Unavailable("Redis is unreachable (simulated)", op="issue")

        site.app.state.store.issue = down
        site.app.state.store.spend = _always_allowed
        page.evaluate("asirra.reset()")
        frame.wait_for_selector("#captcha[data-state=idle]")
        frame.click("#start")
        frame.wait_for_selector("#captcha[data-state=error]")
        assert "unavailable" in frame.inner_text("#status")
        assert events(page)[-1] == ["error", "unavailable"]


async def _always_allowed(kind: str, key: str) -> float:
    return 0.0

