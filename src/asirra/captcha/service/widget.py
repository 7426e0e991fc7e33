"""The embeddable widget's rules: which page may show a site's challenges, checked before anything is issued.

A site's page loads `/asirra.js` and puts `<div class="asirra-captcha" data-sitekey="KEY">` in its form; the
script frames `/widget?sitekey=KEY&origin=ORIGIN&id=N` (the grid, served here, in the service's own origin)
and gets the pass token back by postMessage, into a hidden `asirra-response` field.

Why an iframe rather than a component in the host page: the grid, its images and its state live in the
service's origin under the service's CSP, out of reach of the host page's scripts and styles (as with
reCAPTCHA, hCaptcha and Turnstile); the API stays same-origin (no CORS); and the browser itself enforces the
origin binding: /widget is sent with `frame-ancestors ORIGIN`, so an honest browser draws it only inside the
registered origin it was asked for.

What this binds, and what it does not: an honest browser shows a site's challenges only on that site's
registered hostnames, and a foreign page cannot call the API from a visitor's browser (Fetch Metadata). A bot
forging headers is stopped by nothing origin-based (site key and origin are public): by the challenge itself,
the rate limits, the safeguard and single-use, site-bound, short-lived pass tokens verified with the secret.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from urllib.parse import urlsplit

from asirra.captcha.service.clients import Site, Sites

STATIC = Path(__file__).parent / "static"
WIDGET_PARAMS = {"sitekey", "origin", "id"}
_WIDGET_ID = re.compile(r"[A-Za-z0-9]{1,16}")
_HOST = re.compile(r"[a-z0-9.-]{1,253}|[0-9a-f:.]{2,45}")  # a DNS name or an IPv4 / IPv6 literal
MAX_ORIGIN_CHARS = 300
DEFAULT_PORTS = {"http": 80, "https": 443}

# Refusal kinds the widget page can carry (data-error); the words a visitor reads are in static/widget.js.
WIDGET_REFUSALS = frozenset({"bad_request", "unknown_sitekey", "hostname_not_allowed", "not_framed"})


class WidgetRefused(Exception):
    """The widget (or a challenge for it) may not be shown: `kind` is one of WIDGET_REFUSALS."""

    def __init__(self, kind: str, message: str, origin: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.origin = kind, message, origin


def parse_origin(text: str) -> str | None:
    """`text` if it is an origin exactly as a browser writes one ("https://shop.example", "http://127.0.0.1:8080"),
    else None. Nothing else passes, so an origin can go into a header (CSP frame-ancestors) as it is."""
    if not text or len(text) > MAX_ORIGIN_CHARS or not text.isascii():
        return None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or "@" in parts.netloc:
        return None
    if not _HOST.fullmatch(parts.hostname):  # urlsplit lets spaces and semicolons through: a header could be forged
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != DEFAULT_PORTS[parts.scheme]:
        host += f":{port}"
    rebuilt = f"{parts.scheme}://{host}"
    return text if rebuilt == text else None


def origin_host(origin: str) -> str:
    return urlsplit(origin).hostname or ""


def check_page(site: Site | None, origin_text: str | None) -> tuple[str, str]:
    """(origin, hostname) of the page asking for `site`'s challenges, or WidgetRefused saying why not."""
    origin = parse_origin(origin_text or "")
    if site is None:
        raise WidgetRefused("unknown_sitekey", "unknown site key", origin)
    if origin is None:
        raise WidgetRefused("hostname_not_allowed", "the embedding page's origin is missing or malformed")
    if not site.hostnames:
        raise WidgetRefused("hostname_not_allowed", "this site key has no hostnames registered", origin)
    if not site.allows(origin_host(origin)):
        raise WidgetRefused("hostname_not_allowed", "this hostname is not registered for the site key", origin)
    return origin, origin_host(origin)


def check_widget_request(params, headers, sites: Sites) -> str:
    """The origin that may frame /widget for this request, or WidgetRefused (with the origin to tell, if any)."""
    keys = list(params.keys())
    if set(keys) != WIDGET_PARAMS or len(keys) != len(WIDGET_PARAMS) or not _WIDGET_ID.fullmatch(params["id"]):
        raise WidgetRefused("bad_request", "expected exactly sitekey, origin and id",
                            parse_origin(params.get("origin", "")))
    origin, _ = check_page(sites.get(params["sitekey"]), params["origin"])
    referer = headers.get("referer")
    if referer:
        parts = urlsplit(referer)
        if parse_origin(f"{parts.scheme}://{parts.netloc}") != origin:
            raise WidgetRefused("hostname_not_allowed", "the page framing the check is not the one it names", origin)
    if headers.get("sec-fetch-dest", "iframe") != "iframe":
        raise WidgetRefused("not_framed", "the check is shown only in a frame", origin)
    return origin


@functools.cache
def widget_page(refusal: str | None = None) -> str:
    """The widget's HTML; a refused one says which refusal (a fixed kind, never request text) for its script."""
    assert refusal is None or refusal in WIDGET_REFUSALS
    page = (STATIC / "widget.html").read_text(encoding="utf-8")
    return page.replace('data-error=""', f'data-error="{refusal}"') if refusal else page
