"""A bot against a live CAPTCHA service: fetch a challenge, classify its 12 photos, answer. Repeat.

It uses only the public HTTP API, as any client would, with one cookie jar per concurrent worker
(like separate browser profiles). A refusal from the server (429, 5xx...) is counted in the report,
never raised: measuring how often the defences say no is part of the point.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
from tqdm import tqdm

from asirra.images import UnusableImage

VERDICTS = ("pass", "almost", "fail")
MAX_BACKOFF = 5.0  # seconds: honour Retry-After, but never stall a run on one long wait
# Drop idle connections well before a server's keep-alive timeout (uvicorn's default is 5 s), so
# a request is never sent on a connection the server is closing at that moment.
LIMITS = httpx.Limits(keepalive_expiry=2.0)


class AttackError(ValueError):
    """Attack settings that cannot work (bad URL, no challenges...)."""


class Refused(Exception):
    """The server answered with an error status, or with something that is not the API."""

    def __init__(self, kind: str, retry_after: float | None = None):
        super().__init__(kind)
        self.kind, self.retry_after = kind, retry_after


@dataclass
class AttackReport:
    url: str
    model: str
    attempted: int = 0
    results: Counter = field(default_factory=Counter)  # verdict -> challenges
    errors: Counter = field(default_factory=Counter)  # "429", "503", "ConnectError"... -> challenges
    latencies_ms: list[float] = field(default_factory=list)  # challenge fetched -> verdict received
    seconds: float = 0.0

    @property
    def solved(self) -> int:
        return self.results["pass"]

    @property
    def solve_rate(self) -> float:
        """Passes over attempts: a challenge lost to a refusal counts as not solved."""
        return self.solved / self.attempted if self.attempted else 0.0

    def percentile_ms(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def to_dict(self) -> dict:
        return {
            "url": self.url,
            "model": self.model,
            "attempted": self.attempted,
            "solved": self.solved,
            "solve_rate": self.solve_rate,
            "results": {verdict: self.results[verdict] for verdict in VERDICTS},
            "errors": dict(self.errors),
            "p50_ms": self.percentile_ms(50),
            "p90_ms": self.percentile_ms(90),
            "p99_ms": self.percentile_ms(99),
            "seconds": self.seconds,
            "challenges_per_second": self.attempted / self.seconds if self.seconds else None,
        }


def _ok(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        retry_after = response.headers.get("retry-after", "")
        wait = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
        raise Refused(str(response.status_code), wait)
    return response


def _json(response: httpx.Response, *keys: str) -> dict:
    try:
        body = _ok(response).json()
    except ValueError:
        raise Refused("not JSON") from None
    if not isinstance(body, dict) or any(key not in body for key in keys):
        raise Refused("unexpected reply")
    return body


async def solve_one(client: httpx.AsyncClient, solve) -> str:
    """One challenge end to end; `solve` maps the 12 JPEGs to is-a-cat flags. Returns the verdict."""
    challenge = _json(await client.post("/api/challenge"), "id", "images")
    replies = await asyncio.gather(*(client.get(url) for url in challenge["images"]))
    cats = await solve([_ok(reply).content for reply in replies])
    selected = [index for index, is_cat in enumerate(cats) if is_cat]
    verdict = _json(await client.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": selected}), "result")
    if verdict["result"] not in VERDICTS:
        raise Refused("unexpected reply")
    return verdict["result"]


async def attack_async(url: str, n: int, classifier, concurrency: int = 1, timeout: float = 30.0,
                       progress: bool = False, transport: httpx.AsyncBaseTransport | None = None) -> AttackReport:
    report = AttackReport(url=url, model=getattr(classifier, "name", type(classifier).__name__))
    tickets = iter(range(n))  # shared by the workers; next() never awaits, so no lock is needed
    # One classification at a time: the model already uses every core, and a classifier object
    # is not promised to be thread-safe. Network waits of the other workers still overlap it.
    model_lock = asyncio.Lock()
    bar = tqdm(total=n, desc="attacking", unit="challenge", disable=not progress, leave=False)

    async def solve(images: list[bytes]) -> list[bool]:
        async with model_lock:
            return await asyncio.to_thread(classifier.solve, images)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport, limits=LIMITS) as client:
            for _ in tickets:
                report.attempted += 1
                started = time.perf_counter()
                try:
                    report.results[await solve_one(client, solve)] += 1
                    report.latencies_ms.append((time.perf_counter() - started) * 1000)
                except Refused as exc:
                    report.errors[exc.kind] += 1
                    if exc.retry_after:
                        await asyncio.sleep(min(exc.retry_after, MAX_BACKOFF))
                except httpx.HTTPError as exc:
                    report.errors[type(exc).__name__] += 1
                except UnusableImage:
                    report.errors["unusable image"] += 1
                bar.update(1)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        bar.close()
    report.seconds = time.perf_counter() - started
    return report


def check_settings(url: str, n: int, concurrency: int) -> None:
    """AttackError for settings that cannot work: checked before a model is loaded for nothing."""
    if not url.startswith(("http://", "https://")):
        raise AttackError(f"the URL must start with http:// or https://, got {url!r}")
    if n < 1:
        raise AttackError(f"the number of challenges must be at least 1, got {n}")
    if concurrency < 1:
        raise AttackError(f"concurrency must be at least 1, got {concurrency}")


def attack(url: str, n: int, classifier, concurrency: int = 1, timeout: float = 30.0,
           progress: bool = False, transport: httpx.AsyncBaseTransport | None = None) -> AttackReport:
    """Solve `n` challenges at `url` with `classifier` (anything with .solve(list of JPEG bytes)).

    `transport` lets tests attack an app in-process (httpx.ASGITransport) instead of over a socket.
    """
    check_settings(url, n, concurrency)
    return asyncio.run(attack_async(url, n, classifier, concurrency, timeout, progress, transport))


class RandomGuesser:
    """Picks cats at random: the baseline bot (solves 1 in 4,096), and a load generator costing no CPU."""

    name = "random"

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)

    def solve(self, sources) -> list[bool]:
        return [bool(flag) for flag in self._rng.random(len(sources)) < 0.5]
