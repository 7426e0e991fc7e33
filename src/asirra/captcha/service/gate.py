"""The service's per-request middleware, as plain ASGI: rate limits, who the client is, response headers,
and the request's metrics and access-log line.

Plain ASGI rather than `@app.middleware("http")` (Starlette's BaseHTTPMiddleware), which costs ~95 us per
request (issue 19's measurements) by wrapping every request and response in objects and a task. The refusal
path is the cheap one: a rate-limited request is answered from prebuilt bytes before any cookie is read or
minted (a refusal changes no state, so it sets no cookie) and is counted, not logged, so a flood from one
address can neither fill the log nor churn cookies.

What the routes see: `request.state.ip` (the connection's address, or the one a trusted proxy named:
uvicorn's ProxyHeadersMiddleware runs outside this one when `trusted_proxies` is set) and
`request.state.client_id` (from the signed cookie, minted here when missing). What the routes tell it through
`request.state`: `frame_ancestors` (who may frame this response: only /widget sets it), and `site`, `verdict`,
`refusal` for the log and the refusal counter.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Awaitable, Callable

from starlette.requests import cookie_parser

from asirra.captcha.service.clients import CookieSigner
from asirra.captcha.service.observe import Observer
from asirra.captcha.service.store import Unavailable

log = logging.getLogger(__name__)

COOKIE = "asirra_client"
COOKIE_MAX_AGE = 30 * 86400
# Paths that never need to know the visitor: a site's server (/api/verify), Prometheus, and the loader
# script other sites' pages fetch (a cookie set there would be a third-party one).
NO_COOKIE = frozenset({"/api/verify", "/metrics", "/asirra.js"})

# Shown to browsers on every response: no framing (a solver farm could relay the page in a frame), nothing
# from other origins, no referrer carrying challenge URLs elsewhere. Only /widget may be framed, and only by
# the one origin it was verified for (its route sets state["frame_ancestors"]).
CSP = "default-src 'self'; img-src 'self'; frame-ancestors {}"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

Scope, Message = dict, dict
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def _header_list(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


_FRAMING_DENIED = _header_list({"Content-Security-Policy": CSP.format("'none'"), "X-Frame-Options": "DENY",
                                **SECURITY_HEADERS})
_SECURITY = _header_list(SECURITY_HEADERS)


def security_headers(frame_ancestors: str | None) -> list[tuple[bytes, bytes]]:
    """The headers every response carries; framing allowed only to `frame_ancestors` (an origin), if given."""
    if not frame_ancestors:
        return _FRAMING_DENIED
    return [(b"content-security-policy", CSP.format(frame_ancestors).encode("latin-1")), *_SECURITY]


def error_body(message: str, kind: str) -> bytes:
    """The JSON every refusal carries: what is wrong, for people, and its kind, for programs (the widget)."""
    return json.dumps({"error": message, "kind": kind}).encode()


class Refusal:
    """A prebuilt response: status, headers and body as bytes, only Retry-After filled in per request."""

    def __init__(self, status: int, message: str, kind: str, retry_after: float | None = None):
        self.status, self.message, self.kind, self.retry_after = status, message, kind, retry_after
        self.body = error_body(message, kind)
        self.headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode()),
                        *_FRAMING_DENIED]

    async def send(self, send: Callable, retry_after: float | None) -> None:
        headers = self.headers
        if retry_after:
            headers = [*headers, (b"retry-after", str(max(1, math.ceil(retry_after))).encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


RATE_LIMITED = Refusal(429, "too many requests; slow down", "rate_limited")
STORE_DOWN = Refusal(503, "the challenge store is unavailable; try again shortly", "unavailable", retry_after=2)


class UntrustedForwarding:
    """Says once per process that X-Forwarded-For arrives from a proxy nobody trusted: behind it, every
    visitor shares the proxy's rate limits and safeguard state (a misconfiguration that locks people out)."""

    def __init__(self):
        self.warned = False

    def warn(self, peer: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning(f"X-Forwarded-For from {peer} ignored: not a trusted proxy; every client behind it shares "
                        "one address's limits and safeguard state (asirra serve --trusted-proxy ADDRESS, or "
                        "ASIRRA_TRUSTED_PROXIES)")


class Gate:
    """Outermost middleware of the app (inside ProxyHeadersMiddleware when proxies are trusted)."""

    def __init__(self, app: ASGIApp, *, store, signer: CookieSigner, observer: Observer, trusts_proxies: bool):
        self.app, self.store, self.signer, self.observer = app, store, signer, observer
        self.trusts_proxies = trusts_proxies
        self.untrusted_forwarding = UntrustedForwarding()

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client = scope.get("client")
        ip = client[0] if client else "unknown"
        path = scope["path"]
        if path.startswith("/api/"):
            kind = "verify" if path == "/api/verify" else "request"
            refused = await self._limit(kind, ip, send)
            if refused:
                self.observer.metrics.refusals.labels(refused).inc()
                return
        state = scope.setdefault("state", {})
        state["ip"] = ip
        if not self.trusts_proxies and not self.untrusted_forwarding.warned \
                and any(name == b"x-forwarded-for" for name, _ in scope["headers"]):
            self.untrusted_forwarding.warn(ip)
        extra = []
        if path not in NO_COOKIE:
            client_id, cookie = self._identify(scope)
            state["client_id"] = client_id
            if cookie:
                extra.append((b"set-cookie", cookie))
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                   *security_headers(state.get("frame_ancestors")), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.observer.finished(scope, status, time.perf_counter() - started)

    async def _limit(self, kind: str, ip: str, send: Callable) -> str | None:
        """Spend one token of the address's `kind` bucket; when refused, answer here and say why."""
        try:
            wait = await self.store.spend(kind, ip)
        except Unavailable as exc:  # the one refusal a bucket can meet (a full challenge table refuses nobody)
            log.error("store unavailable: %s", exc)
            self.observer.metrics.store_errors.labels(exc.op).inc()
            await STORE_DOWN.send(send, STORE_DOWN.retry_after)
            return STORE_DOWN.kind
        if wait:
            await RATE_LIMITED.send(send, wait)
            return RATE_LIMITED.kind
        return None

    def _identify(self, scope: Scope) -> tuple[str, bytes | None]:
        """The client id in the request's signed cookie, or a new one and the Set-Cookie that carries it.

        In a cross-site frame (the widget on another site's page) the browser sends no first-party cookie:
        on https the cookie is `SameSite=None; Secure; Partitioned` (CHIPS: kept per embedding site, so it
        reaches the frame without tracking anyone across sites); on http it is `SameSite=Strict` and the
        widget works without it (the address's history still counts, and the stricter verdict wins).
        """
        for name, value in scope["headers"]:
            if name == b"cookie":
                client_id = self.signer.verify(cookie_parser(value.decode("latin-1")).get(COOKIE))
                if client_id is not None:
                    return client_id, None
                break
        client_id, value = self.signer.issue()
        attributes = "SameSite=None; Secure; Partitioned" if scope.get("scheme") == "https" else "SameSite=Strict"
        return client_id, f"{COOKIE}={value}; Max-Age={COOKIE_MAX_AGE}; Path=/; HttpOnly; {attributes}".encode()
