"""The live CAPTCHA: a FastAPI app that serves Asirra challenges to people and bots alike.

What a client may learn, and what it may not:
- the answer never leaves the server; an answer gets back only a verdict;
- image URLs are random per-challenge tokens, and every image is re-encoded on the way out with
  a small random crop, size and JPEG quality and no metadata, so neither a URL nor a hash of the
  bytes identifies a pool image across challenges (a perceptual hash still would: the pool must
  stay large and private, as Asirra's was);
- a challenge is answered at most once and before it expires; a replayed, expired, unknown or
  malformed answer is a 4xx with a JSON {"error": ...} and changes no state;
- a challenge requested for a site (`POST /api/challenge?sitekey=KEY`) earns, when passed, a
  single-use pass token that the site's server checks with `POST /api/verify` (as reCAPTCHA's and
  Turnstile's siteverify): the browser's word alone never convinces a site.

Other sites embed it with `/asirra.js` and `/widget` (asirra.captcha.service.widget); every request passes
the plain-ASGI gate (asirra.captcha.service.gate: rate limits, cookie, headers) and is observed
(asirra.captcha.service.observe: `/metrics`, the access log).

State lives in a store (`asirra.captcha.service.store`): this process's memory by default, or one Redis
shared by any number of workers (`ServiceSettings.redis_url`). When the store is unreachable,
clients get a 503 JSON error with Retry-After, and the next request after it returns just works.

Tests find answers through `app.state.store.peek(id)`; no route exposes them.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Callable, Sequence
from urllib.parse import parse_qsl

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from asirra.captcha.challenge import CHALLENGE_SIZE, count_mistakes, draw_indices
from asirra.captcha.safeguards import Safeguard
from asirra.captcha.service.clients import CookieSigner, PassTokens, Sites, derive_key
from asirra.captcha.service.gate import STORE_DOWN, Gate, error_body
from asirra.captcha.service.images import ImageServer
from asirra.captcha.service.observe import Metrics, Observer
from asirra.captcha.service.settings import ServiceError, ServiceSettings
from asirra.captcha.service.store import (
    Closed,
    Limit,
    MemoryStore,
    PassRecord,
    RedisStore,
    StoreError,
    StoreSettings,
    Unavailable,
    Unknown,
    ordered_pool,
)
from asirra.captcha.service.widget import STATIC, WidgetRefused, check_page, check_widget_request, widget_page
from asirra.images import UnusableImage

log = logging.getLogger(__name__)

MESSAGES = {
    "pass": "Correct: you passed.",
    "almost": "Almost: one slip. Solve another challenge to pass.",
    # Neutral on purpose: under the token bucket a right answer also fails while the client's bucket is empty.
    "fail": "Not passed. Try a new challenge.",
}


# A refusal's kind when it names none: by its status.
KIND_BY_STATUS = {400: "bad_request", 413: "bad_request", 422: "bad_request", 404: "not_found", 429: "rate_limited",
                  503: "unavailable"}


class ApiError(Exception):
    """A refusal the client sees as `status` and {"error": message, "kind": kind} (kinds: observe.REFUSALS)."""

    def __init__(self, status: int, message: str, kind: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after
        self.kind = kind or KIND_BY_STATUS.get(status, "bad_request")

    def response(self) -> Response:
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else {}
        return Response(error_body(self.message, self.kind), status_code=self.status, headers=headers,
                        media_type="application/json")


def refusal(exc: StoreError, unknown: str = "unknown challenge") -> ApiError:
    """What the client is told when the store says no."""
    if isinstance(exc, Closed):
        if exc.reason == "answered":
            return ApiError(409, "challenge already answered", "already_answered")
        if exc.reason == "expired":
            return ApiError(410, "challenge expired", "expired")
        return ApiError(410, "challenge was replaced by a newer one", "replaced")
    if isinstance(exc, Unknown):
        return ApiError(404, unknown, "unknown_challenge")
    if isinstance(exc, Unavailable):  # the same words as when the gate meets it
        log.error("store unavailable: %s", exc)
        return ApiError(STORE_DOWN.status, STORE_DOWN.message, STORE_DOWN.kind, retry_after=STORE_DOWN.retry_after)
    raise TypeError(f"no refusal for {exc!r}")


# ---- images --------------------------------------------------------------------------------


def usable_pool(refs: Sequence, progress: bool = True) -> list:
    """The refs whose image decodes (checked by `asirra.data.check`); the others are logged and left out."""
    from asirra.data import check

    report = check(refs, progress=progress)
    for item in report.unusable:
        log.warning("pool image left out: %s: %s", item["path"], item["reason"])
    broken = {item["path"] for item in report.unusable}
    return [ref for ref in refs if ref.source not in broken]


# ---- the app -------------------------------------------------------------------------------


def parse_selection(body: bytes, size: int = CHALLENGE_SIZE) -> list[int]:
    """The indices in an answer body {"selected": [...]}, or an ApiError saying what is wrong."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(payload, dict) or "selected" not in payload:
        raise ApiError(422, 'expected a JSON object {"selected": [indices of the cats]}')
    selected = payload["selected"]
    if not isinstance(selected, list):
        raise ApiError(422, '"selected" must be a list of image indices')
    if len(selected) > size:
        raise ApiError(422, f"at most {size} indices can be selected, got {len(selected)}")
    for index in selected:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ApiError(422, f"indices must be integers, got {json.dumps(index)[:40]}")
        if not 0 <= index < size:
            raise ApiError(422, f"index {index} is out of range 0..{size - 1}")
    if len(set(selected)) != len(selected):
        raise ApiError(422, "each index may be selected once")
    return selected


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the body is over {limit} bytes")
    return bytes(body)


VERIFY_FIELDS = ("secret", "response", "remoteip")  # remoteip is accepted, as siteverify does, and not used
MAX_FIELD_CHARS = 512


class VerifyRefused(Exception):
    """A /api/verify request refused before any token is looked at: `status` and siteverify error codes."""

    def __init__(self, status: int, codes: list[str], message: str):
        super().__init__(message)
        self.status, self.codes, self.message = status, codes, message

    def reply(self) -> dict:
        return {"success": False, "error-codes": self.codes, "error": self.message, "status": self.status}


def parse_verify(body: bytes, content_type: str) -> dict[str, str]:
    """The fields of a siteverify request, sent as a form (as reCAPTCHA's) or as JSON (as Turnstile's)."""
    bad = lambda message: VerifyRefused(400, ["bad-request"], message)  # noqa: E731
    if content_type.split(";")[0].strip().lower() == "application/json":
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise bad("the body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise bad('expected a JSON object {"secret": ..., "response": ...}')
        fields = payload
    else:
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
        except (ValueError, UnicodeDecodeError):
            raise bad("the body is not a valid form") from None
        if len({name for name, _ in pairs}) != len(pairs):
            raise bad("each field may be sent once")
        fields = dict(pairs)
    unknown = sorted(set(fields) - set(VERIFY_FIELDS))
    if unknown:
        raise bad(f"unknown field {unknown[0][:40]!r}; expected {', '.join(VERIFY_FIELDS)}")
    for name, value in fields.items():
        if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
            raise bad(f"{name} must be a string of at most {MAX_FIELD_CHARS} characters")
    missing = [f"missing-input-{name}" for name in ("secret", "response") if not fields.get(name)]
    if missing:
        raise VerifyRefused(400, missing, "the secret and the response (the pass token) are both needed")
    return fields


def read_pool(data: str | os.PathLike, limit: int | None = None, seed: int = 0, progress: bool = True) -> list:
    """The labelled images under `data` a service serves: a stratified random `limit` of them (all when
    None), the undecodable ones left out, in the order every worker agrees on."""
    from asirra.captcha.service.store import ordered_pool
    from asirra.data import scan
    from asirra.stats import stratified_subset

    refs = scan(data, labelled=True)
    refs = [refs[i] for i in stratified_subset([ref.label for ref in refs], limit, seed)]
    return ordered_pool(usable_pool(refs, progress=progress))


def make_store(pool: Sequence, safeguard: Safeguard, settings: ServiceSettings, clock: Callable[[], float] | None):
    """The store the settings ask for; the in-process one keeps time with `clock` (monotonic by default),
    Redis with Redis's own clock unless a clock is given."""
    store_settings = StoreSettings(
        ttl_seconds=settings.ttl_seconds, max_challenges=settings.max_challenges,
        max_per_client=settings.max_per_client, max_clients=settings.max_clients,
        pass_ttl_seconds=settings.pass_ttl_seconds,
        limits={"request": Limit(settings.request_rate, settings.request_burst),
                "challenge": Limit(settings.challenge_rate, settings.challenge_burst),
                "verify": Limit(settings.verify_rate, settings.verify_burst)})
    if settings.redis_url:
        return RedisStore(settings.redis_url, pool, safeguard, store_settings, clock)
    return MemoryStore(pool, safeguard, store_settings, clock or time.monotonic)


def create_app(
    pool: Sequence,
    safeguard: Safeguard,
    settings: ServiceSettings | None = None,
    clock: Callable[[], float] | None = None,
    sites: Sites | None = None,
) -> FastAPI:
    """The CAPTCHA service over `pool`: labelled ImageRefs, best checked with `usable_pool` first.

    `sites` may request challenges with their site key and verify the pass tokens they earn.
    """
    settings = settings or ServiceSettings()
    sites = sites or Sites()
    pool = ordered_pool(pool)  # positions are what the store keeps: every worker must agree on them
    if len(pool) < CHALLENGE_SIZE:
        raise ServiceError(f"the pool needs at least {CHALLENGE_SIZE} usable images, has {len(pool)}")
    if any(ref.label is None for ref in pool):
        raise ServiceError("every pool image needs a label (cat or dog) for the service to judge answers")
    store = make_store(pool, safeguard, settings, clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await store.aclose()  # a worker shutting down lets go of its Redis connections

    app = FastAPI(title="asirra captcha", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store
    app.state.metrics = metrics = Metrics()
    images = ImageServer(pool, settings)
    app.state.images = images  # its cache's size and hit rate: /healthz
    signer = CookieSigner(derive_key(settings.secret, "cookie") if settings.secret else None)
    passes = PassTokens(derive_key(settings.secret, "pass-token") if settings.secret else None)
    rng = np.random.default_rng(settings.seed)

    @app.exception_handler(ApiError)
    async def refuse(request: Request, exc: ApiError) -> Response:
        request.state.refusal = exc.kind
        return exc.response()

    @app.exception_handler(StoreError)
    async def store_refused(request: Request, exc: StoreError) -> Response:
        if isinstance(exc, Unavailable):
            metrics.store_errors.labels(exc.op).inc()
        return await refuse(request, refusal(exc))

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, exc: StarletteHTTPException) -> Response:
        return await refuse(request, ApiError(exc.status_code, str(exc.detail).lower()))

    # Plain ASGI, outermost but for the proxy headers: limits, cookie, headers, metrics and the access log.
    app.add_middleware(Gate, store=store, signer=signer, observer=Observer(metrics, settings.access_log),
                       trusts_proxies=bool(settings.trusted_proxies))
    if settings.trusted_proxies:
        # Outermost, so every limit and safeguard keys on the address the trusted proxy saw. uvicorn's
        # own handling is off (run.py), or it would trust 127.0.0.1 to name anyone.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/asirra.js", include_in_schema=False)
    def loader() -> FileResponse:
        """The script other sites' pages load: it draws the widget in their forms."""
        headers = {"Cache-Control": "public, max-age=300", "Cross-Origin-Resource-Policy": "cross-origin"}
        return FileResponse(STATIC / "asirra.js", media_type="text/javascript", headers=headers)

    @app.get("/widget", include_in_schema=False)
    def widget(request: Request) -> HTMLResponse:
        """The grid inside another site's page; framable only by the registered origin it was asked for."""
        try:
            request.state.frame_ancestors = check_widget_request(request.query_params, request.headers, sites)
            return HTMLResponse(widget_page(), headers={"Cache-Control": "no-store"})
        except WidgetRefused as exc:
            # The page it names hears why (its script shows it and calls the site's error callback); a
            # malformed origin frames nowhere and the site's script reports the check unreachable.
            request.state.frame_ancestors, request.state.refusal = exc.origin, exc.kind
            return HTMLResponse(widget_page(exc.kind), status_code=403, headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    async def health() -> dict:
        # The worker's pid tells an operator (and the tests) which process of --workers N answered.
        return {"status": "ok", "outstanding": await store.outstanding(), "worker": os.getpid(),
                "image_cache": images.cache.stats(), "renderer": f"{images.renderer.resizer}+{images.renderer.encoder}"}

    @app.get("/metrics", include_in_schema=False)
    async def scrape(request: Request) -> Response:
        """Prometheus, from an allowed address and never through a proxy; to anyone else there is no such page."""
        if not metrics_allowed(request, settings.metrics_allow):
            raise ApiError(404, "not found")
        body, content_type = await run_in_threadpool(metrics.render)
        return Response(body, media_type=content_type)

    @app.post("/api/challenge")
    async def new_challenge(request: Request) -> dict:
        same_origin_only(request)
        sitekey, hostname = requested_site(request, sites)  # refused before any state is touched
        request.state.site = sitekey or "none"
        wait = await store.spend("challenge", request.state.ip)
        if wait:
            raise ApiError(429, "too many new challenges; slow down", retry_after=wait)
        issued = await store.issue(request.state.ip, draw_indices(len(pool), rng), sitekey, hostname)
        metrics.issued.labels(sitekey or "none").inc()
        return {
            "id": issued.id,
            "images": [f"/api/image/{token}" for token in issued.image_tokens],
            "expires_in": settings.ttl_seconds,
        }

    async def image(request: Request) -> Response:
        try:
            ref = await store.image(request.path_params["token"])
        except Unknown:
            raise ApiError(404, "unknown or expired image", "unknown_image") from None
        # A cached photo renders here (~0.15 ms, less than a thread hop); decoding one goes off the event loop.
        jpeg = images.cached_jpeg(ref)
        if jpeg is None:
            try:
                jpeg = await run_in_threadpool(images.jpeg, ref)
            except UnusableImage:
                raise ApiError(503, "image temporarily unavailable; request a new challenge") from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    # 12 of a challenge's 14 requests: a plain Starlette route, without FastAPI's per-request dependency
    # solving and response handling (~30 us each; benchmarks/README.md, serving).
    app.router.routes.append(TemplateRoute("/api/image/{token}", image, methods=["GET"]))

    @app.post("/api/challenge/{challenge_id}/answer")
    async def answer(challenge_id: str, request: Request) -> dict:
        same_origin_only(request)
        selected = parse_selection(await read_body(request, settings.max_body_bytes))
        issued = await store.take(challenge_id)
        mistakes = count_mistakes(selected, issued.challenge.answer)
        verdict = await store.judge(request.state.client_id, request.state.ip, mistakes)
        request.state.site, request.state.verdict = issued.sitekey or "none", verdict
        metrics.answers.labels(issued.sitekey or "none", verdict).inc()
        reply = {"result": verdict, "message": MESSAGES[verdict]}
        if verdict == "pass" and issued.sitekey:
            nonce, reply["token"] = passes.mint(issued.sitekey)
            reply["token_expires_in"] = settings.pass_ttl_seconds
            await store.add_pass(nonce, PassRecord(issued.sitekey, issued.hostname, time.time()))
        return reply

    @app.post("/api/verify")
    async def verify(request: Request) -> JSONResponse:
        """siteverify: is this pass token genuine, for this site, unexpired and unused? Spends it if so.

        On success it says where (`hostname`) and when (`challenge_ts`) the challenge was passed, as
        Turnstile's and reCAPTCHA's siteverify do."""
        site, reply = await verified(request)
        result = "success" if reply.get("success") else reply["error-codes"][0]
        request.state.site = site.key if site else "unknown"
        metrics.verify.labels(request.state.site, result).inc()
        return JSONResponse(reply, status_code=reply.pop("status", 200))

    async def verified(request: Request) -> tuple:
        """(the site whose secret was given, or None; the siteverify reply, with "status" if not 200)."""
        try:
            body = await read_body(request, settings.max_verify_bytes)
            fields = parse_verify(body, request.headers.get("content-type", ""))
        except ApiError as exc:
            return None, VerifyRefused(exc.status, ["bad-request"], exc.message).reply()
        except VerifyRefused as exc:
            return None, exc.reply()
        site = sites.by_secret(fields["secret"])
        if site is None:
            return None, VerifyRefused(403, ["invalid-input-secret"], "unknown secret").reply()
        nonce = passes.open(fields["response"], site.key)
        if nonce is None:  # forged, mangled, or minted for another site: nothing is spent
            return site, {"success": False, "error-codes": ["invalid-input-response"]}
        record = await store.take_pass(nonce)
        if record is None or record.sitekey != site.key:
            return site, {"success": False, "error-codes": ["timeout-or-duplicate"]}
        return site, {"success": True, "error-codes": [], "challenge_ts": timestamp(record.solved_at),
                      "hostname": record.hostname}

    return app


def timestamp(seconds: float) -> str:
    """ISO 8601 in UTC with milliseconds, as siteverify writes `challenge_ts`: 2026-12-07T11:17:03.123Z."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def metrics_allowed(request: Request, allow: Sequence[str]) -> bool:
    """Whether this request may read /metrics: from an allowed address, and not forwarded by a proxy (a
    proxied request is a visitor's, however the proxy is configured; Prometheus scrapes directly)."""
    if not allow or "x-forwarded-for" in request.headers:
        return False
    try:
        address = ipaddress.ip_address(request.state.ip)
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(network) for network in allow)


def same_origin_only(request: Request) -> None:
    """A browser says where a request comes from (Fetch Metadata; page scripts cannot forge it): only the
    service's own pages (its page, its widget frame) may ask for or answer challenges from a browser."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise ApiError(403, "challenges are asked for and answered from the service's own pages only", "cross_site")


class TemplateRoute(Route):
    """A plain Starlette route that names itself in the scope as FastAPI's routes do (metrics label by template)."""

    def matches(self, scope):
        match, child = super().matches(scope)
        if match != Match.NONE:
            child["route"] = self
        return match, child


def requested_site(request: Request, sites: Sites) -> tuple[str | None, str]:
    """(site key, hostname) of a challenge request: `?sitekey=KEY&origin=ORIGIN` from a site's widget, `?sitekey=KEY`
    for a site without hostnames, or nothing (the service's own page); else a 400 or 403.

    The hostname is where the challenge is solved: the embedding page's, or the service's own."""
    params = request.query_params
    unknown = sorted(set(params) - {"sitekey", "origin"})
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0][:40]!r}; only sitekey and origin are accepted")
    keys, origins = params.getlist("sitekey"), params.getlist("origin")
    if len(keys) > 1 or len(origins) > 1:
        raise ApiError(400, "give one sitekey and at most one origin")
    if not keys:
        if origins:
            raise ApiError(400, "an origin needs a sitekey")
        return None, request.url.hostname or ""
    site = sites.get(keys[0])
    if site is None:
        raise ApiError(400, "unknown site key", "unknown_sitekey")
    if not site.hostnames and not origins:
        return site.key, request.url.hostname or ""  # the service's own page, opened as /?sitekey=KEY
    try:
        _, hostname = check_page(site, origins[0] if origins else None)
    except WidgetRefused as exc:
        raise ApiError(403, exc.message, exc.kind) from None
    return site.key, hostname
