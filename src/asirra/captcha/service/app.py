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

State lives in a store (`asirra.captcha.service.store`): this process's memory by default, or one Redis
shared by any number of workers (`ServiceSettings.redis_url`). When the store is unreachable,
clients get a 503 JSON error with Retry-After, and the next request after it returns just works.

Tests find answers through `app.state.store.peek(id)`; no route exposes them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import parse_qsl

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from asirra.captcha.challenge import CHALLENGE_SIZE, count_mistakes, draw_indices
from asirra.captcha.safeguards import Safeguard
from asirra.captcha.service.clients import CookieSigner, PassTokens, Sites, derive_key
from asirra.captcha.service.images import ImageServer
from asirra.captcha.service.settings import ServiceError, ServiceSettings
from asirra.captcha.service.store import (
    Closed,
    Limit,
    MemoryStore,
    RedisStore,
    StoreError,
    StoreSettings,
    Unavailable,
    Unknown,
    ordered_pool,
)
from asirra.images import UnusableImage

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "asirra_client"
MESSAGES = {
    "pass": "Correct: you passed.",
    "almost": "Almost: one slip. Solve another challenge to pass.",
    "fail": "Not quite. Try a new challenge.",
}
# Shown to browsers on every response: no framing (a solver farm could relay the page in a
# frame), no third-party anything, no referrer carrying challenge URLs elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    """A refusal the client sees as `status` and {"error": message}."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else None
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


class UntrustedForwarding:
    """Says once per process that X-Forwarded-For arrives from a proxy nobody trusted: behind it, every
    visitor shares the proxy's rate limits and safeguard state (a misconfiguration that locks people out)."""

    def __init__(self):
        self.warned = False

    def warn(self, peer: str) -> None:
        if not self.warned:
            self.warned = True
            log.warning(f"X-Forwarded-For from {peer} ignored: not a trusted proxy; every client behind it shares "
                        "one address's limits and safeguard state (asirra serve --trusted-proxy ADDRESS)")


def refusal(exc: StoreError, unknown: str = "unknown challenge") -> ApiError:
    """What the client is told when the store says no."""
    if isinstance(exc, Closed):
        if exc.reason == "answered":
            return ApiError(409, "challenge already answered")
        return ApiError(410, "challenge expired" if exc.reason == "expired" else "challenge was replaced by a newer one")
    if isinstance(exc, Unknown):
        return ApiError(404, unknown)
    if isinstance(exc, Unavailable):
        log.error("store unavailable: %s", exc)
        return ApiError(503, "the challenge store is unavailable; try again shortly", retry_after=2)
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

    def response(self) -> JSONResponse:
        return JSONResponse({"success": False, "error-codes": self.codes, "error": self.message},
                            status_code=self.status)


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
    images = ImageServer(pool, settings)
    app.state.images = images  # its cache's size and hit rate: /healthz
    untrusted_forwarding = UntrustedForwarding()
    signer = CookieSigner(derive_key(settings.secret, "cookie") if settings.secret else None)
    passes = PassTokens(derive_key(settings.secret, "pass-token") if settings.secret else None)
    rng = np.random.default_rng(settings.seed)

    @app.exception_handler(ApiError)
    async def refuse(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StoreError)
    async def store_refused(request: Request, exc: StoreError) -> JSONResponse:
        return refusal(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail).lower()}, status_code=exc.status_code)

    @app.middleware("http")
    async def identify_and_limit(request: Request, call_next):
        request.state.ip = request.client.host if request.client else "unknown"
        if not settings.trusted_proxies and "x-forwarded-for" in request.headers:
            untrusted_forwarding.warn(request.state.ip)
        path = request.url.path
        site_to_service = path == "/api/verify"  # a site's server: no cookie, its own (higher) limit
        client_id = signer.verify(request.cookies.get(COOKIE))
        new_cookie = None
        if client_id is None and not site_to_service:
            client_id, new_cookie = signer.issue()
        request.state.client_id = client_id
        try:
            wait = await store.spend("verify" if site_to_service else "request", request.state.ip) \
                if path.startswith("/api/") else 0.0
        except StoreError as exc:
            response = refusal(exc).response()
        else:
            if wait:
                response = ApiError(429, "too many requests; slow down", retry_after=wait).response()
            else:
                response = await call_next(request)
        if new_cookie:
            response.set_cookie(COOKIE, new_cookie, max_age=30 * 86400, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        response.headers.update(SECURITY_HEADERS)
        return response

    if settings.trusted_proxies:
        # Outermost, so every limit and safeguard keys on the address the trusted proxy saw. uvicorn's
        # own handling is off (run.py), or it would trust 127.0.0.1 to name anyone.
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=list(settings.trusted_proxies))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    async def health() -> dict:
        # The worker's pid tells an operator (and the tests) which process of --workers N answered.
        return {"status": "ok", "outstanding": await store.outstanding(), "worker": os.getpid(),
                "image_cache": images.cache.stats(), "renderer": f"{images.renderer.resizer}+{images.renderer.encoder}"}

    @app.post("/api/challenge")
    async def new_challenge(request: Request) -> dict:
        sitekey = requested_site(request, sites)  # refused before any state is touched
        wait = await store.spend("challenge", request.state.ip)
        if wait:
            raise ApiError(429, "too many new challenges; slow down", retry_after=wait)
        issued = await store.issue(request.state.ip, draw_indices(len(pool), rng), sitekey)
        return {
            "id": issued.id,
            "images": [f"/api/image/{token}" for token in issued.image_tokens],
            "expires_in": settings.ttl_seconds,
        }

    @app.get("/api/image/{token}")
    async def image(token: str) -> Response:
        try:
            ref = await store.image(token)
        except Unknown:
            raise ApiError(404, "unknown or expired image") from None
        # A cached photo renders here (~0.15 ms, less than a thread hop); decoding one goes off the event loop.
        jpeg = images.cached_jpeg(ref)
        if jpeg is None:
            try:
                jpeg = await run_in_threadpool(images.jpeg, ref)
            except UnusableImage:
                raise ApiError(503, "image temporarily unavailable; request a new challenge") from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/api/challenge/{challenge_id}/answer")
    async def answer(challenge_id: str, request: Request) -> dict:
        selected = parse_selection(await read_body(request, settings.max_body_bytes))
        issued = await store.take(challenge_id)
        mistakes = count_mistakes(selected, issued.challenge.answer)
        verdict = await store.judge(request.state.client_id, request.state.ip, mistakes)
        reply = {"result": verdict, "message": MESSAGES[verdict]}
        if verdict == "pass" and issued.sitekey:
            nonce, reply["token"] = passes.mint(issued.sitekey)
            await store.add_pass(nonce, issued.sitekey)
        return reply

    @app.post("/api/verify")
    async def verify(request: Request) -> JSONResponse:
        """siteverify: is this pass token genuine, for this site, unexpired and unused? Spends it if so."""
        try:
            body = await read_body(request, settings.max_verify_bytes)
            fields = parse_verify(body, request.headers.get("content-type", ""))
        except ApiError as exc:
            return VerifyRefused(exc.status, ["bad-request"], exc.message).response()
        except VerifyRefused as exc:
            return exc.response()
        site = sites.by_secret(fields["secret"])
        if site is None:
            return VerifyRefused(403, ["invalid-input-secret"], "unknown secret").response()
        nonce = passes.open(fields["response"], site.key)
        if nonce is None:  # forged, mangled, or minted for another site: nothing is spent
            return JSONResponse({"success": False, "error-codes": ["invalid-input-response"]})
        if await store.take_pass(nonce) != site.key:
            return JSONResponse({"success": False, "error-codes": ["timeout-or-duplicate"]})
        return JSONResponse({"success": True, "error-codes": []})

    return app


def requested_site(request: Request, sites: Sites) -> str | None:
    """The site key a challenge is requested for (`?sitekey=KEY`), None for none, else a 400."""
    params = request.query_params
    unknown = sorted(set(params) - {"sitekey"})
    if unknown:
        raise ApiError(400, f"unknown query parameter {unknown[0][:40]!r}; only sitekey is accepted")
    keys = params.getlist("sitekey")
    if not keys:
        return None
    if len(keys) > 1:
        raise ApiError(400, "give one sitekey")
    if not sites.known(keys[0]):
        raise ApiError(400, "unknown site key")
    return keys[0]


