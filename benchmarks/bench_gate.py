"""What one rate-limited request costs inside the app (no sockets, no uvicorn): the service's plain-ASGI gate
against the same refusal written as `@app.middleware("http")`, the shape the service had before.

    python benchmarks/bench_gate.py [--rounds 7] [--requests 3000]

Both apps run in one process, interleaved round by round, on a generated pool; the ratio is the figure to
trust on a shared machine (the absolute microseconds move with the load). Record the CPU beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the generated pool of the service tests


def old_style_app(store):
    """main before issue 18: cookie first, then the limit, then a JSONResponse, in BaseHTTPMiddleware."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from asirra.captcha.service.clients import CookieSigner

    app, signer = FastAPI(), CookieSigner()

    @app.middleware("http")
    async def limit(request: Request, call_next):
        request.state.ip = request.client.host
        client_id, cookie = signer.verify(request.cookies.get("asirra_client")), None
        if client_id is None:
            client_id, cookie = signer.issue()
        wait = await store.spend("request", request.state.ip)
        if wait:
            response = JSONResponse({"error": "too many requests; slow down"}, status_code=429,
                                    headers={"Retry-After": "1"})
        else:
            response = await call_next(request)
        if cookie:
            response.set_cookie("asirra_client", cookie, max_age=30 * 86400, httponly=True, samesite="strict")
        return response

    return app


SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
         "path": "/api/challenge", "raw_path": b"/api/challenge", "query_string": b"", "root_path": "",
         "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.9", 5000), "server": ("127.0.0.1", 8000)}


async def per_request_us(app, n: int, statuses: list) -> float:
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.perf_counter()
    for _ in range(n):
        await app(dict(SCOPE), receive, send)
    return (time.perf_counter() - started) / n * 1e6


async def measure(rounds: int, requests: int) -> dict:
    from captcha_service_support import GENEROUS, make_pool

    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service.app import create_app

    with tempfile.TemporaryDirectory() as folder:
        pool = make_pool(Path(folder), cats=12, dogs=12)
        settings = replace(GENEROUS, request_rate=1e-9, request_burst=1, access_log=False)
        gate = create_app(pool, parse_safeguard("none"), settings)
        old = old_style_app(gate.state.store)
        statuses: list[int] = []
        for app in (gate, old):
            await per_request_us(app, 200, statuses)  # warm up; the one token of the bucket is spent here
        times = {"gate_us": [], "middleware_us": []}
        for _ in range(rounds):
            times["gate_us"].append(await per_request_us(gate, requests, statuses))
            times["middleware_us"].append(await per_request_us(old, requests, statuses))
    assert set(statuses[400:]) == {429}, "every measured request must be a refusal"
    result = {name: statistics.median(values) for name, values in times.items()}
    result["ratio"] = result["middleware_us"] / result["gate_us"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    result = asyncio.run(measure(args.rounds, args.requests))
    print(f"a 429 inside the app, median of {args.rounds} x {args.requests}: plain-ASGI gate "
          f"{result['gate_us']:.1f} us, @app.middleware('http') {result['middleware_us']:.1f} us "
          f"({result['ratio']:.1f}x)")


if __name__ == "__main__":
    main()
