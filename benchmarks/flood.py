"""Floods: what a client asking far past its rate limit costs the service, and whether people beside it notice.

    python benchmarks/flood.py [--data POOL] [--pool 200] [--seconds 30] [--people 4] [--rate 4000]
                               [--refusals 200000] [--addresses 120000] [--hoarders 2000] [--redis] [--json]

The service runs with its default limits (40 requests/s per address, burst 120; 1 challenge/s, burst 10;
10,000 outstanding challenges, 8 per address; rate tables of 100,000 addresses per kind), pinned to
one core; the clients run on the other (serve_cost.py's pinning, CPU accounting and raw HTTP client).
Loopback gives every client its own address: --people people at 127.0.0.2, .4, .5, ... (one challenge
per second each, the 12 images and an answer), the flood at 127.0.0.3, and many addresses at once through
X-Forwarded-For from 127.0.0.1, the one trusted proxy (`ServiceSettings.trusted_proxies`).

1. baseline: the people alone for --seconds; their latency per whole challenge and the server's CPU;
2. one address at --rate requests/s (default 4,000: 100x its limit; cookie-less POST /api/challenge and
   GET /api/image/<junk>) beside the people: their latency again (p99 ratio, goal < 2x) and success; the
   flood's statuses (beyond its burst: 429 with Retry-After, nothing else); server CPU per refusal =
   (window CPU - baseline CPU) / refusals;
3. the same address as fast as it can until --refusals refusals: CPU per refusal with nothing else running,
   the server's memory before and after;
4. --addresses distinct addresses, one request each: the rate tables stop at max_clients (memory measured);
5. --hoarders addresses asking for challenges to their burst and never answering: outstanding challenges stop at
   max_challenges (memory measured); then what the people get while the table is full;
6. (in-process store) the store's own memory by tracemalloc after --store-refusals refusals from one address
   (default a million), --addresses addresses' buckets and 50,000 challenges abandoned by as many addresses.
The server's output is searched for tracebacks and errors; every status the clients saw is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from load_test import SHARED_TRAIN, start_redis  # benchmarks/, beside this script
from report import cpu_line
from serve_cost import Connection, Server, cores, machine

FLOOD = "127.0.0.3"


def people_addresses(n: int) -> list[str]:
    """n people, each at an address of their own (127.0.0.2, .4, .5, ...: never the flood's)."""
    return [f"127.0.0.{i}" for i in range(2, n + 3) if f"127.0.0.{i}" != FLOOD][:n]
PROXY = "127.0.0.1"  # the trusted proxy: its X-Forwarded-For names the client


def build_flood_config(data: str, pool_size: int, secret_file: str, redis_url: str | None,
                       max_challenges: int | None = None) -> dict:
    """The pool and the service's default limits (but `max_challenges` if given); 127.0.0.1 a trusted proxy."""
    from asirra.captcha.safeguards import make_safeguard
    from asirra.captcha.service.app import usable_pool
    from asirra.captcha.service.run import worker_config
    from asirra.captcha.service.settings import ServiceSettings
    from asirra.data import scan

    refs = scan(data, labelled=True)
    picks = np.random.default_rng(0).choice(len(refs), size=min(pool_size, len(refs)), replace=False)
    pool = usable_pool([refs[i] for i in sorted(picks)], progress=False)
    settings = ServiceSettings(seed=0, trusted_proxies=(PROXY,), redis_url=redis_url,
                               **({"max_challenges": max_challenges} if max_challenges else {}))
    return worker_config(pool, make_safeguard("none"), settings, secret_file, None)


class Statuses(dict):
    def add(self, status: int, headers: dict) -> None:
        self[status] = self.get(status, 0) + 1
        if status == 429 and "retry-after" not in headers:
            self["429 without Retry-After"] = self.get("429 without Retry-After", 0) + 1
        if status == 429 and "set-cookie" in headers:
            self["429 with Set-Cookie"] = self.get("429 with Set-Cookie", 0) + 1


async def person(port: int, address: str, until: float, latencies: list, statuses: Statuses, period: float = 1.0,
                 headers: dict | None = None, limit: int | None = None) -> None:
    """One challenge per `period` seconds: challenge, 12 images over 4 connections, an answer; its latency."""
    conns = [await Connection(port, address, headers).open() for _ in range(4)]
    cookie = None
    try:
        while time.perf_counter() < until and (limit is None or len(latencies) < limit):
            started = time.perf_counter()
            status, head, body = await conns[0].request("POST", "/api/challenge", cookie=cookie)
            statuses.add(status, head)
            cookie = head["set-cookie"][0].split(";")[0] if "set-cookie" in head else cookie
            ok = status == 200
            if ok:
                challenge = json.loads(body)

                async def fetch(conn, urls):
                    nonlocal ok
                    for url in urls:
                        got, got_head, _ = await conn.request("GET", url, cookie=cookie)
                        statuses.add(got, got_head)
                        ok = ok and got == 200

                await asyncio.gather(*(fetch(c, challenge["images"][i::4]) for i, c in enumerate(conns)))
                got, got_head, _ = await conns[0].request("POST", f"/api/challenge/{challenge['id']}/answer",
                                                          body=b'{"selected": []}', cookie=cookie)
                statuses.add(got, got_head)
                ok = ok and got == 200
            latencies.append(((time.perf_counter() - started) * 1000, ok))
            await asyncio.sleep(max(0.0, period - (time.perf_counter() - started)))
    finally:
        for conn in conns:
            conn.close()


def junk_request(rng: random.Random) -> tuple[str, str]:
    """What a flood sends: a cookie-less challenge request or an image request for a made-up token."""
    return ("POST", "/api/challenge") if rng.random() < 0.5 else ("GET", f"/api/image/{secrets.token_urlsafe(16)}")


async def flood(port: int, address: str, statuses: Statuses, until: float | None = None, rate: float | None = None,
                refusals: int | None = None, connections: int = 16) -> int:
    """Requests from one address: paced at `rate` until `until`, or back to back until `refusals` 429s. Returns
    the requests sent."""
    conns = [await Connection(port, address).open() for _ in range(connections)]
    sent = 0

    async def one(conn: Connection, seed: int) -> None:
        nonlocal sent
        rng, due = random.Random(seed), time.perf_counter()
        while (until is None or time.perf_counter() < until) and (refusals is None or statuses.get(429, 0) < refusals):
            status, head, _ = await conn.request(*junk_request(rng))
            statuses.add(status, head)
            sent += 1
            if rate:
                due += connections / rate
                await asyncio.sleep(max(0.0, due - time.perf_counter()))

    try:
        await asyncio.gather(*(one(c, i) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            conn.close()
    return sent


def address(i: int) -> str:
    """The i-th of many client addresses (10.0.0.0/8), as a trusted proxy would name them."""
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


async def many_addresses(port: int, count: int, statuses: Statuses, method: str, path: str, repeat: int = 1,
                         connections: int = 16) -> None:
    """`repeat` requests from each of `count` addresses behind the trusted proxy."""
    queue = iter(range(count))
    conns = [await Connection(port, PROXY).open() for _ in range(connections)]

    async def one(conn: Connection) -> None:
        for i in queue:
            conn.extra = f"X-Forwarded-For: {address(i)}\r\n"
            for _ in range(repeat):
                status, head, _ = await conn.request(method, path)
                statuses.add(status, head)

    try:
        await asyncio.gather(*(one(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()


def latency_summary(samples: list) -> dict:
    times = [t for t, _ in samples]
    if not times:
        return {"challenges": 0}
    return {"challenges": len(samples), "succeeded": sum(ok for _, ok in samples),
            **{q: float(np.percentile(times, int(q[1:]))) for q in ("p50", "p90", "p99")}, "max": max(times)}


def flood_process(port: int, seconds: float, rate: float, results) -> None:
    """The paced flood in a process of its own: its event loop must not delay the people's (in the parent), and
    on the clients' shared core it yields to them (a real attacker's CPU is not the people's)."""
    os.nice(10)
    statuses = Statuses()
    sent = asyncio.run(flood(port, FLOOD, statuses, until=time.perf_counter() + seconds, rate=rate))
    results.put((sent, dict(statuses)))


def window(server: Server, seconds: float, people: int, flood_rate: float | None = None) -> dict:
    """The people for `seconds`, with or without a paced flood (another process, the same core) beside them."""
    import multiprocessing

    statuses, samples = Statuses(), []
    cpu, wall = server.cpu(), time.perf_counter()
    if flood_rate:
        results = multiprocessing.Queue()
        flooder = multiprocessing.Process(target=flood_process, args=(server.port, seconds, flood_rate, results))
        flooder.start()
    asyncio.run(people_for(server.port, seconds, samples, statuses, people))
    sent, flood_statuses = results.get(timeout=seconds + 60) if flood_rate else (0, {})
    if flood_rate:
        flooder.join(30)
    cpu, wall = server.cpu() - cpu, time.perf_counter() - wall
    return {"seconds": wall, "server_cpu_seconds": cpu, "people": latency_summary(samples),
            "people_statuses": statuses, "flood_sent": sent, "flood_statuses": flood_statuses}


def warm(server: Server, challenges: int = 10, addresses: int = 30) -> None:
    """Fill the image cache from addresses of their own (127.0.1.x), each within its challenge burst."""
    async def run():
        await asyncio.gather(*(person(server.port, f"127.0.1.{i + 1}", time.perf_counter() + 60, [], Statuses(),
                                      period=0.0, limit=challenges) for i in range(addresses)))

    async def bounded():
        try:
            await asyncio.wait_for(run(), timeout=60)
        except asyncio.TimeoutError:
            pass

    asyncio.run(bounded())


def store_memory(pool: list, refusals: int, addresses: int, abandoned: int) -> dict:
    """The in-process store's own memory (tracemalloc) after a million refusals from one address, many addresses'
    rate buckets, and challenges abandoned by many addresses: every table stops at its bound."""
    import tracemalloc

    from asirra.captcha.challenge import draw_indices
    from asirra.captcha.safeguards import make_safeguard
    from asirra.captcha.service.app import make_store
    from asirra.captcha.service.settings import ServiceSettings
    from asirra.data import ImageRef

    settings = ServiceSettings(seed=0)
    refs = [ImageRef(source, label, ref_id) for source, label, ref_id in pool]
    rng = np.random.default_rng(0)

    async def run() -> dict:
        tracemalloc.start()
        store = make_store(refs, make_safeguard("none"), settings, None)
        start = tracemalloc.get_traced_memory()[0]
        cpu = time.process_time()
        for _ in range(refusals):
            await store.spend("request", "203.0.113.7")
        spend_us = (time.process_time() - cpu) * 1e6 / refusals
        after_refusals = tracemalloc.get_traced_memory()[0]
        for i in range(addresses):
            await store.spend("request", address(i))
            await store.spend("challenge", address(i))
        after_addresses = tracemalloc.get_traced_memory()[0]
        for i in range(abandoned):
            await store.issue(address(i), draw_indices(len(refs), rng), None)
        after_abandoned = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        buckets = {kind: len(limiter._buckets) for kind, limiter in store._limits.items()}
        return {"refusals": refusals, "us_per_spend_traced": spend_us,
                "kib_after_refusals": (after_refusals - start) / 1024,
                "addresses": addresses, "buckets": buckets, "max_clients": settings.max_clients,
                "mib_after_addresses": (after_addresses - after_refusals) / 2**20,
                "bytes_per_bucket": (after_addresses - after_refusals) / max(1, sum(buckets.values())),
                "abandoned_issued": abandoned, "outstanding": len(store), "max_challenges": settings.max_challenges,
                "mib_after_abandoned": (after_abandoned - after_addresses) / 2**20,
                "bytes_per_outstanding_challenge": (after_abandoned - after_addresses) / max(1, len(store))}

    return asyncio.run(run())


def errors_in(output: str) -> dict:
    return {"tracebacks": output.count("Traceback"), "error_lines": len(re.findall(r"^ERROR", output, re.M)),
            "5xx_in_log": len(re.findall(r'" 5\d\d ', output))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_TRAIN), help="labelled images (default: the shared train set)")
    parser.add_argument("--pool", type=int, default=200, help="images drawn from --data for the pool")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the baseline and the flood windows")
    parser.add_argument("--rate", type=float, default=4000.0, help="the paced flood's requests per second")
    parser.add_argument("--people", type=int, default=4, help="people solving one challenge a second each")
    parser.add_argument("--refusals", type=int, default=200_000, help="refusals in the unpaced phase")
    parser.add_argument("--addresses", type=int, default=120_000, help="distinct addresses in phase 4")
    parser.add_argument("--hoarders", type=int, default=2_000, help="addresses hoarding challenges in phase 5")
    parser.add_argument("--max-challenges", type=int, default=None,
                        help="outstanding challenges the service holds (default: its own, 10,000)")
    parser.add_argument("--store-refusals", type=int, default=1_000_000,
                        help="refusals from one address spent on the in-process store directly (its memory)")
    parser.add_argument("--redis", action="store_true",
                        help="the Redis store (a private redis-server) instead of in-process")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"error: no data at {args.data}; pass --data PATH")

    server_core, load_core = cores()
    load_before = os.getloadavg()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    result = {}
    with tempfile.TemporaryDirectory(prefix="asirra-flood-") as tmp:
        folder = Path(tmp)
        secret = folder / "secret"
        secret.write_text("flood secret, only ever on loopback, 32+ bytes")
        redis_process, redis_url = start_redis(folder) if args.redis else (None, None)
        if server_core is not None:
            os.sched_setaffinity(0, {load_core})
            if redis_process:
                os.sched_setaffinity(redis_process.pid, {server_core})
        config = build_flood_config(args.data, args.pool, str(secret), redis_url, args.max_challenges)
        server = Server(config, core=server_core).start(folder)
        try:
            say("warming the image cache ...")
            warm(server)
            rss = {"warm": server.rss()}
            say(f"baseline: the people alone for {args.seconds:.0f} s ...")
            result["baseline"] = window(server, args.seconds, args.people)
            say(f"flood: one address at {args.rate:.0f} requests/s beside them ...")
            result["flood"] = window(server, args.seconds, args.people, args.rate)
            rss["after_paced_flood"] = server.rss()

            say(f"unpaced flood until {args.refusals} refusals ...")
            statuses = Statuses()
            cpu, wall = server.cpu(), time.perf_counter()
            sent = asyncio.run(flood(server.port, FLOOD, statuses, refusals=args.refusals))
            cpu, wall = server.cpu() - cpu, time.perf_counter() - wall
            result["unpaced"] = {"sent": sent, "seconds": wall, "requests_per_second": sent / wall,
                                 "server_cpu_seconds": cpu, "server_us_per_request": cpu * 1e6 / sent,
                                 "statuses": statuses}
            rss["after_unpaced_flood"] = server.rss()

            say(f"{args.addresses} addresses, one request each ...")
            statuses = Statuses()
            cpu, wall = server.cpu(), time.perf_counter()
            asyncio.run(many_addresses(server.port, args.addresses, statuses, "GET", "/api/image/unknown"))
            cpu, wall = server.cpu() - cpu, time.perf_counter() - wall
            result["many_addresses"] = {"addresses": args.addresses, "seconds": wall, "statuses": statuses,
                                        "server_us_per_request": cpu * 1e6 / args.addresses}
            rss["after_many_addresses"] = server.rss()

            say(f"{args.hoarders} addresses hoarding challenges ...")
            statuses = Statuses()
            asyncio.run(many_addresses(server.port, args.hoarders, statuses, "POST", "/api/challenge", repeat=10))
            health = asyncio.run(_health(server.port))
            rss["after_hoarding"] = server.rss()
            people, samples = Statuses(), []
            asyncio.run(people_for(server.port, 10.0, samples, people, args.people))
            result["hoarding"] = {"addresses": args.hoarders, "requests_each": 10, "statuses": statuses,
                                  "outstanding": health.get("outstanding"), "people_then": latency_summary(samples),
                                  "people_statuses": people}
            result["rss_mib"] = {k: v / 2**20 for k, v in rss.items()}
        finally:
            server.stop()
            output = Path(folder / f"server-{server.port}.log").read_text()
            if redis_process:
                redis_process.terminate()
                redis_process.wait(10)
    result["server_log"] = errors_in(output)
    if not args.redis:
        say(f"the store's own memory: {args.store_refusals} refusals, {args.addresses} addresses, 50,000 abandoned ...")
        result["store_memory"] = store_memory(config["pool"], args.store_refusals, args.addresses, 50_000)
    base, fl = result["baseline"], result["flood"]
    refused = fl["flood_statuses"].get(429, 0)
    extra = fl["server_cpu_seconds"] - base["server_cpu_seconds"] * fl["seconds"] / base["seconds"]
    result["paced_us_per_refusal"] = extra * 1e6 / refused if refused else None
    result["people_p99_ratio"] = fl["people"]["p99"] / base["people"]["p99"]
    summary = {"machine": machine(load_before, server_core, load_core), "store": "redis" if args.redis else "memory",
               "pool": args.pool, "rate": args.rate, **result}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print_summary(summary)


async def people_for(port: int, seconds: float, samples: list, statuses: Statuses, people: int) -> None:
    until = time.perf_counter() + seconds
    await asyncio.gather(*(person(port, a, until, samples, statuses) for a in people_addresses(people)))


async def _health(port: int) -> dict:
    from serve_cost import get_json

    return await get_json(port, "/healthz") or {}


def print_summary(s: dict) -> None:
    m = s["machine"]
    print(f"\n{cpu_line(m['cpu'], m['load_before'], m['load_after'])}\nserver on core {m['server_core']}, clients on "
          f"core {m['load_core']}; {s['store']} store")
    base, fl = s["baseline"], s["flood"]
    for name, w in (("people alone", base), (f"people beside {s['rate']:.0f} req/s", fl)):
        p = w["people"]
        print(f"{name:28s} {p['succeeded']}/{p['challenges']} challenges passed through, p50 {p['p50']:.1f} ms, "
              f"p99 {p['p99']:.1f} ms, max {p['max']:.1f} ms; server CPU {w['server_cpu_seconds']:.2f} s in "
              f"{w['seconds']:.0f} s; people saw {dict(w['people_statuses'])}")
    print(f"flood statuses {dict(fl['flood_statuses'])} ({fl['flood_sent']} sent); "
          f"~{s['paced_us_per_refusal']:.0f} us of server CPU per refusal; people's p99 x{s['people_p99_ratio']:.2f}")
    u = s["unpaced"]
    print(f"unpaced: {u['sent']} requests at {u['requests_per_second']:.0f}/s, {u['server_us_per_request']:.1f} us "
          f"server CPU each; {dict(u['statuses'])}")
    a = s["many_addresses"]
    print(f"{a['addresses']} addresses: {a['server_us_per_request']:.1f} us each; {dict(a['statuses'])}")
    h = s["hoarding"]
    print(f"{h['addresses']} hoarders x 10: {dict(h['statuses'])}; outstanding {h['outstanding']}; then the people: "
          f"{h['people_then'].get('succeeded')}/{h['people_then'].get('challenges')} through, "
          f"{dict(h['people_statuses'])}")
    print("server RSS MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in s["rss_mib"].items()))
    print(f"server log: {s['server_log']}")
    if "store_memory" in s:
        m = s["store_memory"]
        print(f"the in-process store itself (tracemalloc): {m['refusals']:,} refusals from one address +"
              f"{m['kib_after_refusals']:.1f} KiB; {m['addresses']:,} addresses -> buckets {m['buckets']} (bound "
              f"{m['max_clients']:,}), +{m['mib_after_addresses']:.1f} MiB ({m['bytes_per_bucket']:.0f} B each); "
              f"{m['abandoned_issued']:,} abandoned challenges -> {m['outstanding']:,} outstanding (bound "
              f"{m['max_challenges']:,}), +{m['mib_after_abandoned']:.1f} MiB "
              f"({m['bytes_per_outstanding_challenge']:.0f} B each)")


if __name__ == "__main__":
    main()
