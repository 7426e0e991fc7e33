"""A bot against a live CAPTCHA service: fetch a challenge, classify its 12 photos, answer. Repeat.

It uses only the public HTTP API, as any client would, with one cookie jar per concurrent worker
(like separate browser profiles). It behaves as a patient bot does: told "429/503, Retry-After N",
it waits N seconds and sends the same request again. A challenge the service would not let it
finish is a *refusal*, counted by kind and never as a failed challenge, so `solve_rate` (passed /
answered) measures the classifier and passes per hour measures what the rate limits leave of it.

Who the bot appears to be is its `identity`: `OneAddress` keeps one cookie jar and one address for
the whole run (the address sent as X-Forwarded-For, which a service counts only from a proxy it
trusts), `Rotating` comes from a fresh address with a fresh cookie jar and connection for every
challenge, as a bot renting residential proxies does, so every per-client state starts anew.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import httpx
import numpy as np
from tqdm import tqdm

from asirra.captcha.attack.counter import Pipeline
from asirra.errors import ConfigError
from asirra.images import UnusableImage
from asirra.stats import wilson_interval

VERDICTS = ("pass", "almost", "fail")
RETRYABLE = (429, 503)  # statuses whose Retry-After says "the same request will work later"
DEFAULT_MAX_WAIT = 300.0  # seconds of waiting per run before refusals stop being waited out
# Drop idle connections well before a server's keep-alive timeout (uvicorn's default is 5 s), so
# a request is never sent on a connection the server is closing at that moment.
LIMITS = httpx.Limits(keepalive_expiry=2.0)

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
# (the 12 served JPEGs, the bot's is-a-cat answers, the verdict): what a learning bot keeps of a challenge
Observer = Callable[[list, list, str], None]
FORWARDED = "X-Forwarded-For"


@dataclass(frozen=True)
class OneAddress:
    """One cookie jar and one address for the whole run (per worker); `address` None: the socket's own."""

    address: str | None = None
    name = "one-address"
    fresh_per_challenge = False

    def headers(self, ticket: int) -> dict:
        return {FORWARDED: self.address} if self.address else {}


@dataclass(frozen=True)
class Rotating:
    """A new address (the `ticket`-th host of `network`), cookie jar and connection for every challenge."""

    network: str = "198.18.0.0/15"  # RFC 2544's benchmarking range: never a real visitor
    name = "rotating"
    fresh_per_challenge = True

    def headers(self, ticket: int) -> dict:
        net = ipaddress.ip_network(self.network)
        if ticket + 1 >= net.num_addresses - 1:
            raise AttackError(f"{self.network} has no address left for challenge {ticket + 1}")
        return {FORWARDED: str(net[ticket + 1])}


class AttackError(ConfigError):
    """Attack settings that cannot work (bad URL, no challenges...)."""


class Refused(Exception):
    """The server answered with an error status, or with something that is not the API."""

    def __init__(self, kind: str, retry_after: float | None = None):
        super().__init__(kind)
        self.kind, self.retry_after = kind, retry_after


@dataclass
class AttackReport:
    """What `asirra.attack` measured: challenges attempted, answered and passed, refusals by kind, waits and latencies.
    
    `solve_rate` (passed / answered, with its Wilson 95% interval `solve_rate_ci`) measures the
    classifier; `passes_per_hour` measures what the service's limits leave of it."""

    url: str
    """The service attacked."""
    model: str
    """The classifier's name."""
    backend: str | None = None
    """The classifier's inference engine, when it has one."""
    kernels: str | None = None
    """Its kernel path (int8: "avx512-vnni", "exact-u8u8", ...; "fp32"; "torch")."""
    preprocess: str = "none"
    """The counter-moves applied to each served image ("none" for none)"""
    max_wait: float = DEFAULT_MAX_WAIT
    """Seconds the run could spend waiting out Retry-After."""
    attempted: int = 0
    """Challenges started."""
    results: Counter = field(default_factory=Counter)
    """Verdict -> challenges answered."""
    refused: Counter = field(default_factory=Counter)
    """"429", "410", "ConnectError"... -> challenges without a verdict."""
    retries: int = 0
    """Requests sent again after waiting out a Retry-After."""
    waited: float = 0.0
    """Seconds paused on Retry-After, summed over workers."""
    wait_budget_exhausted: bool = False
    """A Retry-After was not waited out because max_wait was spent."""
    latencies_ms: list[float] = field(default_factory=list)
    """Answered challenges, fetch -> verdict, waits excluded."""
    wall_seconds: float = 0.0
    """The run's duration, waits included."""
    identity: str = OneAddress.name
    """"one-address", or "rotating": a fresh address, cookie jar and connection per challenge."""
    timeline: list[tuple[float, float, str, bool]] = field(default_factory=list)
    """Per challenge: started, ended (seconds from the run's start), verdict or refusal kind, and whether the
    burst allowance was spent by its end."""
    first_limited: float | None = None
    """Seconds from the start to the first 429: the burst allowance spent."""
    bytes_up: int = 0
    """HTTP request lines, headers and bodies sent."""
    bytes_down: int = 0
    """HTTP status lines, headers and bodies received."""

    @property
    def answered(self) -> int:
        """Challenges that got a verdict (pass, almost or fail)."""
        return sum(self.results.values())

    @property
    def passed(self) -> int:
        """Challenges passed."""
        return self.results["pass"]

    @property
    def unreachable(self) -> bool:
        """No challenge got past connecting: there is no service at the URL."""
        return self.attempted > 0 and self.refused.get("ConnectError") == self.attempted

    @property
    def solve_rate(self) -> float | None:
        """Passes over answered challenges: the classifier's figure, refusals left out."""
        return self.passed / self.answered if self.answered else None

    @property
    def solve_rate_ci(self) -> tuple[float, float] | None:
        """Wilson 95% interval of `solve_rate`."""
        return wilson_interval(self.passed, self.answered) if self.answered else None

    @property
    def passes_per_hour(self) -> float | None:
        """What the bot achieved against the clock, waits and refusals included (the burst allowance too)."""
        return self.passed * 3600 / self.wall_seconds if self.wall_seconds > 0 else None

    @property
    def sustained_passes_per_hour(self) -> float | None:
        """Passes per hour once the burst allowance is spent: over the challenges that met or followed the first
        429, from the first of them starting to the last verdict. A bot never told to slow down ran below
        the limits throughout, so its whole run is sustained."""
        if self.first_limited is None:
            return self.passes_per_hour
        after = [t for t in self.timeline if t[3]]
        span = max((t[1] for t in after), default=self.first_limited) - min(t[0] for t in after) if after else 0
        return sum(t[2] == "pass" for t in after) * 3600 / span if span > 0 else None

    @property
    def bytes_per_challenge(self) -> float | None:
        """HTTP bytes both ways per attempted challenge: what a proxy sold by the gigabyte bills."""
        return (self.bytes_up + self.bytes_down) / self.attempted if self.attempted else None

    def percentile_ms(self, q: float) -> float | None:
        """A percentile of the answered challenges' latency (fetch to verdict, waits excluded).

        Args:
            q: The percentile, 0-100 (50: the median).

        Returns:
            Milliseconds, or None when nothing was answered.
        """
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def to_dict(self) -> dict:
        """The report as JSON-ready values: what `asirra attack --json` prints.

        Returns:
            Every count, rate, interval and latency percentile, by name.
        """
        ci = self.solve_rate_ci
        return {
            "url": self.url,
            "model": self.model,
            "backend": self.backend,
            "kernels": self.kernels,
            "preprocess": self.preprocess,
            "attempted": self.attempted,
            "answered": self.answered,
            "passed": self.passed,
            "results": {verdict: self.results[verdict] for verdict in VERDICTS},
            "solve_rate": self.solve_rate,
            "solve_rate_ci": list(ci) if ci else None,
            "refused": dict(self.refused),
            "refused_total": sum(self.refused.values()),
            "retries": self.retries,
            "waited_seconds": self.waited,
            "max_wait": self.max_wait,
            "wait_budget_exhausted": self.wait_budget_exhausted,
            "wall_seconds": self.wall_seconds,
            "passes_per_hour": self.passes_per_hour,
            "sustained_passes_per_hour": self.sustained_passes_per_hour,
            "first_limited_seconds": self.first_limited,
            "identity": self.identity,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_per_challenge": self.bytes_per_challenge,
            "p50_ms": self.percentile_ms(50),
            "p90_ms": self.percentile_ms(90),
            "p99_ms": self.percentile_ms(99),
        }

    def summary_lines(self) -> list[str]:
        """The report as text: what `asirra attack` prints.

        Returns:
            A few lines of counts, the solve rate with its interval, waits and passes per hour.
        """
        results = ", ".join(f"{verdict} {self.results[verdict]}" for verdict in VERDICTS)
        refused = ", ".join(f"{kind} x{count}" for kind, count in self.refused.items()) or "none"
        rate = "n/a (none answered)"
        if self.answered:
            low, high = self.solve_rate_ci
            rate = f"{self.solve_rate:.2%} (95% CI {low:.2%}-{high:.2%})"
        per_hour = f"{self.passes_per_hour:,.0f}" if self.passes_per_hour is not None else "n/a"
        lines = [
            f"{self.model} ({self.backend or 'no backend'}, preprocess {self.preprocess}): "
            f"attempted {self.attempted}, answered {self.answered} ({results}); solve rate among answered {rate}",
            f"refused: {refused}; waited {self.waited:.1f} s on Retry-After ({self.retries} retries, "
            f"budget {self.max_wait:g} s); wall {self.wall_seconds:.1f} s: {per_hour} passes per hour",
        ]
        if self.wait_budget_exhausted:
            lines.append(f"the wait budget (--max-wait {self.max_wait:g}) ran out: later refusals were not waited out")
        if self.latencies_ms:
            lines.append(f"latency per answered challenge (waits excluded): p50 {self.percentile_ms(50):.0f} ms, "
                         f"p90 {self.percentile_ms(90):.0f} ms, p99 {self.percentile_ms(99):.0f} ms")
        return lines


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the delta form; an HTTP date is not worth a bot's trouble)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 and np.isfinite(seconds) else None


def _ok(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        retry_after = _retry_after(response) if response.status_code in RETRYABLE else None
        raise Refused(str(response.status_code), retry_after)
    return response


def _json(response: httpx.Response, *keys: str) -> dict:
    try:
        body = response.json()
    except ValueError:
        raise Refused("not JSON") from None
    if not isinstance(body, dict) or any(key not in body for key in keys):
        raise Refused("unexpected reply")
    return body


class Pacer:
    """One worker's pause on Retry-After, drawing on the run's wait budget.

    The service limits per client, so when one request is told to wait, the worker's other
    requests (the 12 images are fetched at once) wait for the same moment: the pause is counted
    once, not once per request.
    """

    def __init__(self, report: AttackReport, clock: Clock, sleep: Sleep, started: float = 0.0):
        self.report, self.clock, self.sleep, self.started = report, clock, sleep, started
        self.until = 0.0
        self.waited = 0.0  # this worker's share of report.waited

    async def ready(self) -> None:
        while (delay := self.until - self.clock()) > 0:
            await self.sleep(delay)

    def pause(self, refusal: Refused) -> bool:
        """Schedule the wait a refusal asks for; False when it cannot be retried (or the budget is spent)."""
        if refusal.retry_after is None:
            return False
        now = self.clock()
        if refusal.kind == "429" and self.report.first_limited is None:
            self.report.first_limited = now - self.started
        until = now + refusal.retry_after
        extra = max(0.0, until - max(self.until, now))
        if self.report.waited + extra > self.report.max_wait:
            self.report.wait_budget_exhausted = True
            return False
        self.report.waited += extra
        self.waited += extra
        self.until = max(self.until, until)
        self.report.retries += 1
        return True

    async def send(self, request: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        """The response to `request`, sent again after each wait the server asks for, until it is not refused."""
        while True:
            await self.ready()
            try:
                return _ok(self.count(await request()))
            except Refused as refusal:
                if not self.pause(refusal):
                    raise


    def count(self, response: httpx.Response) -> httpx.Response:
        """Add one exchange's bytes on the wire (HTTP/1.1 framing: lines, headers, bodies) to the report."""
        request = response.request
        head = len(request.method) + len(request.url.raw_path) + 12  # "GET /path HTTP/1.1\r\n"
        self.report.bytes_up += head + sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 2 + len(request.content)
        self.report.bytes_down += 17 + len(response.reason_phrase) + sum(
            len(k) + len(v) + 4 for k, v in response.headers.raw) + 2 + len(response.content)
        return response


async def solve_one(client: httpx.AsyncClient, pacer: Pacer, solve, observe: Observer | None = None) -> str:
    """One challenge end to end; `solve` maps the 12 JPEGs to is-a-cat flags. Returns the verdict."""
    challenge = _json(await pacer.send(lambda: client.post("/api/challenge")), "id", "images")
    replies = await asyncio.gather(*(pacer.send(lambda url=url: client.get(url)) for url in challenge["images"]),
                                   return_exceptions=True)
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    cats = await solve([reply.content for reply in replies])
    selected = [index for index, is_cat in enumerate(cats) if is_cat]
    answer_url = f"/api/challenge/{challenge['id']}/answer"
    verdict = _json(await pacer.send(lambda: client.post(answer_url, json={"selected": selected})), "result")
    if verdict["result"] not in VERDICTS:
        raise Refused("unexpected reply")
    if observe is not None:
        observe([reply.content for reply in replies], list(cats), verdict["result"])
    return verdict["result"]


async def attack_async(url: str, n: int, classifier, *, concurrency: int = 1, timeout: float = 30.0,
                       max_wait: float = DEFAULT_MAX_WAIT, preprocess: Pipeline | None = None, progress: bool = False,
                       transport: httpx.AsyncBaseTransport | None = None, clock: Clock = time.perf_counter,
                       sleep: Sleep = asyncio.sleep, identity: OneAddress | Rotating = OneAddress(),
                       observe: Observer | None = None) -> AttackReport:
    preprocess = preprocess or Pipeline()
    report = AttackReport(url=url, model=getattr(classifier, "name", type(classifier).__name__),
                          backend=getattr(classifier, "backend", None),
                          kernels=getattr(classifier, "engine", {}).get("kernels"), preprocess=preprocess.spec,
                          max_wait=max_wait, identity=identity.name)
    tickets = iter(range(n))  # shared by the workers; next() never awaits, so no lock is needed
    # One classification at a time: the model already uses every core, and a classifier object
    # is not promised to be thread-safe. Network waits of the other workers still overlap it.
    model_lock = asyncio.Lock()
    bar = tqdm(total=n, desc="attacking", unit="challenge", disable=not progress, leave=False)
    started = clock()

    def classify(images: list[bytes]) -> list[bool]:
        return classifier.solve(preprocess.apply_all(images))

    async def solve(images: list[bytes]) -> list[bool]:
        async with model_lock:
            return await asyncio.to_thread(classify, images)

    def client(ticket: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=url, timeout=timeout, transport=transport, limits=LIMITS,
                                 headers=identity.headers(ticket))

    async def one(session: httpx.AsyncClient, pacer: Pacer) -> None:
        report.attempted += 1
        begun, waited_before = clock(), pacer.waited
        outcome = None
        try:
            outcome = await solve_one(session, pacer, solve, observe)
            report.results[outcome] += 1
            working = clock() - begun - (pacer.waited - waited_before)
            report.latencies_ms.append(max(0.0, working) * 1000)
        except Refused as exc:
            outcome = exc.kind
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
        except UnusableImage:
            outcome = "unusable image"
        if outcome not in VERDICTS:
            report.refused[outcome] += 1
        report.timeline.append((begun - started, clock() - started, outcome, report.first_limited is not None))
        bar.update(1)
        bar.set_postfix(passed=report.passed, refused=sum(report.refused.values()), refresh=False)

    async def worker() -> None:
        pacer = Pacer(report, clock, sleep, started)
        if identity.fresh_per_challenge:  # a new address, cookie jar and connection every time
            for ticket in tickets:
                async with client(ticket) as session:
                    await one(session, pacer)
            return
        async with client(0) as session:
            for _ in tickets:
                await one(session, pacer)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        bar.close()
    report.wall_seconds = clock() - started
    return report


def check_settings(url: str, n: int, concurrency: int, max_wait: float = DEFAULT_MAX_WAIT) -> None:
    """AttackError for settings that cannot work: checked before a model is loaded for nothing."""
    if not url.startswith(("http://", "https://")):
        raise AttackError(f"the URL must start with http:// or https://, got {url!r}")
    if n < 1:
        raise AttackError(f"the number of challenges must be at least 1, got {n}")
    if concurrency < 1:
        raise AttackError(f"concurrency must be at least 1, got {concurrency}")
    if not max_wait >= 0:
        raise AttackError(f"the wait budget must be 0 seconds or more, got {max_wait}")


def aim(classifier, target: str = "cat"):
    """`classifier` set to select every `target` image: a model without that class is refused in one line.

    Solvers without class names (RandomGuesser, stand-ins with only .solve) can only answer "select every cat".
    """
    if hasattr(classifier, "select"):
        return classifier.select(target)
    if target != "cat":
        raise AttackError(f"{getattr(classifier, 'name', type(classifier).__name__)} can only select cats")
    return classifier


def attack(url: str, n: int, classifier, *, concurrency: int = 1, timeout: float = 30.0,
           max_wait: float = DEFAULT_MAX_WAIT, preprocess: Pipeline | None = None, progress: bool = False,
           transport: httpx.AsyncBaseTransport | None = None, clock: Clock = time.perf_counter,
           sleep: Sleep = asyncio.sleep, identity: OneAddress | Rotating = OneAddress(),
           observe: Observer | None = None) -> AttackReport:
    """Attempt `n` challenges at `url` with `classifier` (anything with .solve(list of images)).

    `max_wait` bounds the seconds spent waiting out Retry-After over the whole run (summed over
    workers): once spent, a refusal is recorded as refused instead of being waited out.
    `preprocess` runs on each served image before the classifier sees it (asirra.captcha.attack.counter).
    `transport` lets tests attack an app in-process (httpx.ASGITransport) instead of over a socket;
    `clock` and `sleep` let them pass time without waiting. `identity` is who the bot appears to be
    (OneAddress or Rotating); `observe(images, answers, verdict)` sees every answered challenge.
    """
    check_settings(url, n, concurrency, max_wait)
    return run_to_end(attack_async(url, n, classifier, concurrency=concurrency, timeout=timeout, max_wait=max_wait,
                                   preprocess=preprocess, progress=progress, transport=transport, clock=clock,
                                   sleep=sleep, identity=identity, observe=observe))


def run_to_end(coroutine):
    """asyncio.run(coroutine), also where this thread already runs an event loop (a Jupyter kernel does):
    then the coroutine gets its own loop in a worker thread, and this call still blocks until it ends."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(asyncio.run, coroutine).result()


class RandomGuesser:
    """Picks cats at random: the baseline bot (solves 1 in 4,096), and a load generator costing no CPU."""

    name = "random"

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)

    def solve(self, sources) -> list[bool]:
        return [bool(flag) for flag in self._rng.random(len(sources)) < 0.5]
