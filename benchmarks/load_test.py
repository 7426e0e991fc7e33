"""Load test of the live CAPTCHA service on loopback: many concurrent bots, latency percentiles.

    python benchmarks/load_test.py [--data PATH] [--pool 500] [--clients 50] [--challenges 20] [--json]

The server runs in its own process (so the bots' work does not slow it down) on 127.0.0.1 only,
with rate limits raised out of the way; the bots guess at random, so the numbers measure the
service (challenge, 12 re-encoded JPEGs, verdict), not a model. Latency is per whole challenge.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from asirra.captcha.attack import RandomGuesser

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "dogs-vs-cats" / "train"
HOST = "127.0.0.1"  # never anything but loopback


def run_server(data: str, pool_size: int, port: int, max_challenges: int) -> None:
    from asirra.captcha.safeguards import make_safeguard
    from asirra.captcha.service import ServiceSettings, create_app, serve, usable_pool
    from asirra.data import scan

    refs = scan(data, labelled=True)
    picks = np.random.default_rng(0).choice(len(refs), size=min(pool_size, len(refs)), replace=False)
    pool = usable_pool([refs[i] for i in sorted(picks)], progress=False)
    settings = ServiceSettings(challenge_rate=1e6, challenge_burst=10**6, request_rate=1e6, request_burst=10**6,
                               max_per_client=10**6, max_challenges=max_challenges, seed=0)
    # One log line per request would cost the server more than some of the requests.
    serve(create_app(pool, make_safeguard("none"), settings), HOST, port, access_log=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, server: multiprocessing.Process, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.is_alive():
            sys.exit("error: the server process exited during startup")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"error: the server did not answer within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_TRAIN), help="labelled images (default: the shared train set)")
    parser.add_argument("--pool", type=int, default=500, help="images drawn from --data for the pool")
    parser.add_argument("--clients", type=int, default=50, help="concurrent bots")
    parser.add_argument("--challenges", type=int, default=20, help="challenges per bot")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"error: no data at {args.data}; pass --data PATH")

    from asirra.captcha.attack import attack

    port = free_port()
    url = f"http://{HOST}:{port}"
    total = args.clients * args.challenges
    server = multiprocessing.Process(target=run_server, args=(args.data, args.pool, port, 2 * total), daemon=True)
    server.start()
    try:
        wait_until_up(url, server)
        report = attack(url, total, RandomGuesser(), concurrency=args.clients, progress=not args.json)
    finally:
        server.terminate()
        server.join(10)
    summary = {**report.to_dict(), "clients": args.clients, "challenges_per_client": args.challenges,
               "requests_per_challenge": 14}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.clients} clients x {args.challenges} challenges ({total} challenges, {14 * total} requests) "
          f"in {report.seconds:.1f} s: {total / report.seconds:.1f} challenges/s")
    print(f"latency per challenge: p50 {summary['p50_ms']:.0f} ms, p90 {summary['p90_ms']:.0f} ms, "
          f"p99 {summary['p99_ms']:.0f} ms; errors: {dict(report.errors) or 'none'}")


if __name__ == "__main__":
    main()
