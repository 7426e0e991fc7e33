"""The built documentation site in a real browser: the home page and a guide load with no script error,
search answers, and nothing is fetched from anywhere but the site itself (screenshots kept in
test-artifacts/)."""

from __future__ import annotations

import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from browser_support import ARTIFACTS, browser  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def site_url(built_site):
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(built_site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_site_reads_in_a_browser_without_the_network(browser, site_url):
    requests, errors = [], []
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.on("request", lambda request: requests.append(request.url))
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site_url + "/")
    assert page.inner_text("article h1").rstrip("¶") == "asirra"
    assert "Headline results" in page.inner_text("article")
    page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")
    page.screenshot(path=str(ARTIFACTS / "docs-home.png"), full_page=True)

    page.goto(site_url + "/guides/train-evaluate/")
    assert page.inner_text("article h1").rstrip("¶") == "Train and evaluate"
    assert "asirra train --model seed-cnn" in page.inner_text("article")
    page.screenshot(path=str(ARTIFACTS / "docs-guide.png"))

    page.keyboard.press("s")  # Material's search shortcut; typing (not fill) triggers the query
    page.keyboard.type("harden")
    page.wait_for_selector(".md-search-result__item", timeout=20_000)
    page.screenshot(path=str(ARTIFACTS / "docs-search.png"))
    assert not errors
    foreign = [url for url in requests if not url.startswith(site_url)]
    assert not foreign, foreign  # no fonts, scripts or pictures from anywhere else
