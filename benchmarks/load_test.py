"""Load test of the live CAPTCHA service on loopback: the in-process store with 1 worker beside Redis with 2 workers.

    python benchmarks/load_test.py [--data PATH] [--pool 500] [--clients 50] [--challenges 20] [--json]

Both servers serve the same pool with the same settings to the same bots, one after the other in
one run, so their ratio is the figure to trust on a shared machine. Each runs in its own processes
(the bots' work does not slow it down) on 127.0.0.1 only, with rate limits raised out of the way;
the Redis one gets a private redis-server on a free port, without persistence, stopped at the end.
The bots guess at random, so the numbers measure the service (challenge, 12 re-encoded JPEGs,
verdict), not a model. Latency is per whole challenge; every bot runs a bounded number of them. After each
run the server's /metrics is read and compared with the bots' own counts ("metrics_agree"; with 2 workers
the scrape sums both).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

# uvicorn's worker processes re-import this module as they start, before answering its health
# pings: keep the top light (asirra.captcha.attack pulls in scikit-learn; it is imported in measure).

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "dogs-vs-cats" / "train"
HOST = "127.0.0.1"  # never anything but loopback
REQUESTS_PER_CHALLENGE = 14


def build_config(data: str, pool_size: int, max_challenges: int, secret_file: str) -> dict:
    """What every server process builds its app from: the same pool and settings for both stores."""
    from asirra.captcha.safeguards import make_safeguard
    from asirra.captcha.service.app import usable_pool
    from asirra.captcha.service.run import worker_config
    from asirra.captcha.service.settings import ServiceSettings
    from asirra.data import scan

    refs = scan(data, labelled=True)
    picks = np.random.default_rng(0).choice(len(refs), size=min(pool_size, len(refs)), replace=False)
    pool = usable_pool([refs[i] for i in sorted(picks)], progress=False)
    # One log line per request would cost the server more than some of the requests.
    settings = ServiceSettings(challenge_rate=1e6, challenge_burst=10**6, request_rate=1e6, request_burst=10**6,
                               max_per_client=10**6, max_challenges=max_challenges, seed=0, access_log=False)
    return worker_config(pool, make_safeguard("none"), settings, secret_file, None)


def run_server(config: dict, port: int, workers: int) -> None:
    from asirra.captcha.service.run import app_from_config, serve, serve_workers

    if workers == 1:
        serve(app_from_config(config), HOST, port)
    else:
        serve_workers(config, HOST, port, workers)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def start_redis(folder: Path, timeout: float = 10.0) -> tuple[subprocess.Popen, str]:
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("error: redis-server is not installed (apt-get install redis-server, or `make redis-server` as root)")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
                                "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if redis.Redis(host=HOST, port=port, socket_connect_timeout=0.2).ping():
                return process, f"redis://{HOST}:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    sys.exit(f"error: redis-server did not start within {timeout:.0f} s")


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


def measure(config: dict, workers: int, total: int, clients: int, progress: bool) -> dict:
    """One server up, the bots at it, the server down: the attack report as a dict."""
    from asirra.captcha.attack.bot import RandomGuesser, attack

    port = free_port()
    url = f"http://{HOST}:{port}"
    # Not a daemon: a daemonic process may not start uvicorn's worker processes.
    server = multiprocessing.Process(target=run_server, args=(config, port, workers))
    server.start()
    try:
        wait_until_up(url, server)
        report = attack(url, total, RandomGuesser(), concurrency=clients, progress=progress)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text  # with --workers N, any worker answers for all
    finally:
        server.terminate()  # SIGTERM: uvicorn's supervisor stops its workers too
        server.join(15)
        if server.is_alive():
            server.kill()
    summary = report.to_dict()
    summary["challenges_per_second"] = total / report.wall_seconds
    summary["metrics"] = counted = service_counts(metrics)
    summary["metrics_agree"] = counted == {"issued": report.attempted, "answers": summary["results"],
                                           "images": 12 * report.attempted}
    return summary


def service_counts(text: str) -> dict:
    """What the service's /metrics says it did: challenges issued, answers by verdict, images served."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {"issued": 0, "answers": {"pass": 0, "almost": 0, "fail": 0}, "images": 0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "asirra_challenges_issued_total":
                counts["issued"] += int(sample.value)
            elif sample.name == "asirra_answers_total":
                counts["answers"][sample.labels["verdict"]] += int(sample.value)
            elif sample.name == "asirra_request_duration_seconds_count" \
                    and sample.labels["route"] == "/api/image/{token}":
                counts["images"] += int(sample.value)
    return counts


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

    total = args.clients * args.challenges
    with tempfile.TemporaryDirectory(prefix="asirra-load-") as folder:
        secret = Path(folder) / "secret"
        secret.write_text("load-test secret, only ever on loopback, 32+ bytes")
        config = build_config(args.data, args.pool, 2 * total, str(secret))
        redis_process, redis_url = start_redis(Path(folder))
        try:
            runs = {"in-process, 1 worker": measure(config, 1, total, args.clients, not args.json)}
            redis_config = {**config, "settings": {**config["settings"], "redis_url": redis_url}}
            runs["redis, 2 workers"] = measure(redis_config, 2, total, args.clients, not args.json)
        finally:
            redis_process.terminate()
            redis_process.wait(10)
    ratio = runs["redis, 2 workers"]["challenges_per_second"] / runs["in-process, 1 worker"]["challenges_per_second"]
    summary = {"clients": args.clients, "challenges_per_client": args.challenges,
               "requests_per_challenge": REQUESTS_PER_CHALLENGE, "runs": runs, "throughput_ratio": ratio}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{args.clients} clients x {args.challenges} challenges ({total} challenges, "
          f"{REQUESTS_PER_CHALLENGE * total} requests) against each server:")
    for name, run in runs.items():
        print(f"  {name:<22} {run['challenges_per_second']:6.1f} challenges/s in {run['wall_seconds']:.1f} s; latency "
              f"per challenge p50 {run['p50_ms']:.0f} ms, p90 {run['p90_ms']:.0f} ms, p99 {run['p99_ms']:.0f} ms; "
              f"errors: {run['refused'] or 'none'}; /metrics agrees with the bots: {run['metrics_agree']}")
    print(f"throughput, redis with 2 workers / in-process with 1: {ratio:.2f}x")


if __name__ == "__main__":
    main()
