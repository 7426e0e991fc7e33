"""The live CAPTCHA: a FastAPI app that serves Asirra challenges to people and bots alike.

What a client may learn, and what it may not:
- the answer never leaves the server; an answer gets back only a verdict;
- image URLs are random per-challenge tokens, and every image is re-encoded on the way out with
  a small random crop, size and JPEG quality and no metadata, so neither a URL nor a hash of the
  bytes identifies a pool image across challenges (a perceptual hash still would: the pool must
  stay large and private, as Asirra's was);
- a challenge is answered at most once and before it expires; a replayed, expired, unknown or
  malformed answer is a 4xx with a JSON {"error": ...} and changes no state.

Tests find answers through `app.state.store.peek(id)`, in-process; no route exposes them.
"""

from __future__ import annotations

import json
import logging
import math
import random
import secrets
import socket
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from asirra.captcha.challenge import CHALLENGE_SIZE, Challenge, count_mistakes, draw_indices
from asirra.captcha.clients import CookieSigner, RateLimiter, SafeguardStates
from asirra.captcha.safeguards import Safeguard
from asirra.images import UnusableImage

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
COOKIE = "asirra_client"
# Idle keep-alive connections live longer than clients keep them (httpx: 5 s), so a client never
# sends a request on a connection the server is closing at that moment.
KEEP_ALIVE = 15
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


class ServiceError(ValueError):
    """Settings or a pool the service cannot run with."""


@dataclass(frozen=True)
class ServiceSettings:
    ttl_seconds: float = 120.0  # a person needs ~30 s for 12 photos; a bot needs far less
    max_challenges: int = 10_000  # outstanding, across all clients: bounds memory
    max_per_client: int = 8  # outstanding per IP; a newer challenge evicts the oldest
    challenge_rate: float = 1.0  # new challenges per second per IP, sustained...
    challenge_burst: int = 10  # ...after this many at once
    request_rate: float = 40.0  # any /api request per second per IP (12 images per challenge)
    request_burst: int = 120
    max_body_bytes: int = 1024  # an answer is at most ~60 bytes of JSON
    max_clients: int = 100_000  # per-client tables forget the least recently seen beyond this
    image_side: tuple[int, int] = (200, 240)  # longest side of a served image, drawn per request
    image_quality: tuple[int, int] = (72, 90)
    max_crop: float = 0.06  # fraction trimmed from each edge, drawn per request
    seed: int | None = None  # which challenges are drawn; never the tokens or the image jitter
    secret: bytes | None = None  # cookie-signing key; random per process when None

    def __post_init__(self) -> None:
        positive = ("ttl_seconds", "max_challenges", "max_per_client", "challenge_rate",
                    "challenge_burst", "request_rate", "request_burst", "max_body_bytes", "max_clients")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ServiceError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.max_crop < 0.25:
            raise ServiceError(f"max_crop must be in [0, 0.25), got {self.max_crop}")
        for name in ("image_side", "image_quality"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ServiceError(f"{name} must be a range (low, high) with 0 < low <= high")


class ApiError(Exception):
    """A refusal the client sees as `status` and {"error": message}."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after else None
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


@dataclass(frozen=True)
class Issued:
    id: str
    challenge: Challenge
    ip: str
    expires_at: float
    image_tokens: tuple[str, ...]


class ChallengeStore:
    """Draws challenges and holds the outstanding ones: the only place answers live.

    Challenges are kept in issue order, which is also expiry order (one TTL for all), so
    expiring is popping from the front. A closed challenge leaves a bounded tombstone saying why,
    so a late or repeated answer gets a precise refusal rather than "unknown".
    """

    def __init__(self, pool: Sequence, settings: ServiceSettings, clock: Callable[[], float]):
        self._pool, self._settings, self._clock = pool, settings, clock
        self._rng = np.random.default_rng(settings.seed)
        self._lock = threading.Lock()
        self._live: OrderedDict[str, Issued] = OrderedDict()
        self._images: dict[str, tuple[str, int]] = {}
        self._by_ip: dict[str, OrderedDict[str, None]] = {}
        self._closed: OrderedDict[str, ApiError] = OrderedDict()

    def issue(self, ip: str) -> Issued:
        with self._lock:
            now = self._clock()
            self._expire(now)
            if len(self._live) >= self._settings.max_challenges:
                raise ApiError(503, "the server is busy; try again shortly", retry_after=5)
            mine = self._by_ip.setdefault(ip, OrderedDict())
            while len(mine) >= self._settings.max_per_client:
                self._close(next(iter(mine)), ApiError(410, "challenge was replaced by a newer one"))
            # The pool was checked for labels at start-up: draw positions only, no rescan per request.
            challenge = Challenge(refs=tuple(self._pool[int(i)] for i in draw_indices(len(self._pool), self._rng)))
            tokens = tuple(secrets.token_urlsafe(16) for _ in challenge.refs)
            issued = Issued(secrets.token_urlsafe(16), challenge, ip, now + self._settings.ttl_seconds, tokens)
            self._live[issued.id] = issued
            self._images.update((token, (issued.id, i)) for i, token in enumerate(tokens))
            mine[issued.id] = None
            return issued

    def image(self, token: str):
        """The pool image behind an image token of a live challenge."""
        with self._lock:
            self._expire(self._clock())
            where = self._images.get(token)
            if where is None:
                raise ApiError(404, "unknown or expired image")
            challenge_id, index = where
            return self._live[challenge_id].challenge.refs[index]

    def take(self, challenge_id: str) -> Issued:
        """Remove and return a live challenge: the one step that makes answers single-use."""
        with self._lock:
            self._expire(self._clock())
            issued = self._live.get(challenge_id)
            if issued is None:
                raise self._closed.get(challenge_id) or ApiError(404, "unknown challenge")
            self._close(challenge_id, ApiError(409, "challenge already answered"))
            return issued

    def peek(self, challenge_id: str) -> Issued | None:
        """A live challenge, answer included, without touching it: for tests, never for routes."""
        with self._lock:
            return self._live.get(challenge_id)

    def __len__(self) -> int:
        return len(self._live)

    def _expire(self, now: float) -> None:
        while self._live:
            oldest = next(iter(self._live.values()))
            if oldest.expires_at > now:
                break
            self._close(oldest.id, ApiError(410, "challenge expired"))

    def _close(self, challenge_id: str, reason: ApiError) -> None:
        issued = self._live.pop(challenge_id)
        for token in issued.image_tokens:
            del self._images[token]
        mine = self._by_ip[issued.ip]
        del mine[challenge_id]
        if not mine:
            del self._by_ip[issued.ip]
        self._closed[challenge_id] = reason
        while len(self._closed) > self._settings.max_challenges:
            self._closed.popitem(last=False)


# ---- images --------------------------------------------------------------------------------


def usable_pool(refs: Sequence, progress: bool = True) -> list:
    """The refs whose image decodes (checked by `asirra.data.check`); the others are logged and left out."""
    from asirra.data import check

    report = check(refs, progress=progress)
    for item in report.unusable:
        log.warning("pool image left out: %s: %s", item["path"], item["reason"])
    broken = {item["path"] for item in report.unusable}
    return [ref for ref in refs if ref.source not in broken]


def render_jpeg(image: Image.Image, rng: random.Random, settings: ServiceSettings) -> bytes:
    """A fresh JPEG of `image`: random edge trim, size and quality, and no metadata."""
    width, height = image.size
    left, top, right, bottom = (rng.uniform(0, settings.max_crop) for _ in range(4))
    box = (left * width, top * height, (1 - right) * width, (1 - bottom) * height)
    scale = rng.randint(*settings.image_side) / max(box[2] - box[0], box[3] - box[1])
    size = (max(1, round((box[2] - box[0]) * scale)), max(1, round((box[3] - box[1]) * scale)))
    out = BytesIO()
    image.resize(size, Image.Resampling.BILINEAR, box=box).save(
        out, "JPEG", quality=rng.randint(*settings.image_quality)
    )
    return out.getvalue()


class ImageServer:
    """Pool image -> served JPEG. A pool image that has become unreadable since startup is
    replaced by another of the same label, which keeps the challenge's answer true."""

    ATTEMPTS = 5

    def __init__(self, pool: Sequence, settings: ServiceSettings):
        self._settings = settings
        self._rng = random.SystemRandom()  # jitter an attacker cannot replay
        self._by_label: dict[int, list] = {}
        for ref in pool:
            self._by_label.setdefault(ref.label, []).append(ref)

    def jpeg(self, ref) -> bytes:
        for candidate in self._candidates(ref):
            try:
                image = candidate.load(draft_size=self._settings.image_side[1])
            except UnusableImage as exc:
                log.warning("pool image unreadable while serving: %s", exc)
                continue
            return render_jpeg(image, self._rng, self._settings)
        raise ApiError(503, "image temporarily unavailable; request a new challenge")

    def _candidates(self, ref) -> Iterator:
        """`ref`, then (only if it fails) up to ATTEMPTS other images of its label."""
        yield ref
        same_label = self._by_label[ref.label]
        picks = self._rng.sample(same_label, min(self.ATTEMPTS + 1, len(same_label)))
        yield from [pick for pick in picks if pick is not ref][: self.ATTEMPTS]


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


def create_app(
    pool: Sequence,
    safeguard: Safeguard,
    settings: ServiceSettings | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The CAPTCHA service over `pool`: labelled ImageRefs, best checked with `usable_pool` first."""
    settings = settings or ServiceSettings()
    pool = list(pool)
    if len(pool) < CHALLENGE_SIZE:
        raise ServiceError(f"the pool needs at least {CHALLENGE_SIZE} usable images, has {len(pool)}")
    if any(ref.label is None for ref in pool):
        raise ServiceError("every pool image needs a label (cat or dog) for the service to judge answers")
    app = FastAPI(title="asirra captcha", docs_url=None, redoc_url=None, openapi_url=None)
    store = app.state.store = ChallengeStore(pool, settings, clock)
    images = ImageServer(pool, settings)
    signer = CookieSigner(settings.secret)
    states = SafeguardStates(safeguard, settings.max_clients)
    any_request = RateLimiter(settings.request_rate, settings.request_burst, clock, settings.max_clients)
    new_challenges = RateLimiter(settings.challenge_rate, settings.challenge_burst, clock, settings.max_clients)

    @app.exception_handler(ApiError)
    async def refuse(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def not_found(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail).lower()}, status_code=exc.status_code)

    @app.middleware("http")
    async def identify_and_limit(request: Request, call_next):
        request.state.ip = request.client.host if request.client else "unknown"
        client_id = signer.verify(request.cookies.get(COOKIE))
        new_cookie = None
        if client_id is None:
            client_id, new_cookie = signer.issue()
        request.state.client_id = client_id
        wait = any_request.take(request.state.ip) if request.url.path.startswith("/api/") else 0.0
        if wait:
            response = ApiError(429, "too many requests; slow down", retry_after=wait).response()
        else:
            response = await call_next(request)
        if new_cookie:
            response.set_cookie(COOKIE, new_cookie, max_age=30 * 86400, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    def health() -> dict:
        return {"status": "ok", "outstanding": len(store)}

    @app.post("/api/challenge")
    def new_challenge(request: Request) -> dict:
        wait = new_challenges.take(request.state.ip)
        if wait:
            raise ApiError(429, "too many new challenges; slow down", retry_after=wait)
        issued = store.issue(request.state.ip)
        return {
            "id": issued.id,
            "images": [f"/api/image/{token}" for token in issued.image_tokens],
            "expires_in": settings.ttl_seconds,
        }

    @app.get("/api/image/{token}")
    def image(token: str) -> Response:
        jpeg = images.jpeg(store.image(token))
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.post("/api/challenge/{challenge_id}/answer")
    async def answer(challenge_id: str, request: Request) -> dict:
        selected = parse_selection(await read_body(request, settings.max_body_bytes))
        issued = store.take(challenge_id)
        mistakes = count_mistakes(selected, issued.challenge.answer)
        verdict = states.judge(request.state.client_id, request.state.ip, mistakes)
        return {"result": verdict, "message": MESSAGES[verdict]}

    return app


# ---- running it ----------------------------------------------------------------------------


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, timeout_keep_alive=KEEP_ALIVE)


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", timeout: float = 10.0) -> Iterator[str]:
    """Serve `app` on a free port of `host` from a background thread; yields its base URL."""
    import uvicorn

    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets that say they are TCP, and
    # with Nagle on, every keep-alive request waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=KEEP_ALIVE))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
