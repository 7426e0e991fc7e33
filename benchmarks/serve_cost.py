"""What a served challenge costs the defender: server CPU per challenge, measured from the server's own CPU time.

    python benchmarks/serve_cost.py [--data POOL] [--pool 500] [--challenges 400] [--warmup 120]
                                    [--before [LABEL=]SRC ...] [--json]

One challenge = POST /api/challenge, 12 image GETs (each a freshly cropped, resized, re-encoded JPEG),
and a random answer: 14 requests. The service runs in its own processes pinned to one core (with its
Redis, whose CPU is a defender cost too), the load generator on the other core (where there are two),
so the server's CPU time (Linux /proc/PID/stat, its worker processes included) divided by the challenges
served is the cost, whatever else runs on the machine. The load generator is a raw asyncio HTTP/1.1
keep-alive client (~30-50 us of its own CPU per request; an httpx client costs ~800 us and could not
load the server), each virtual client with its cookie and 4 connections, closed loop.

Arms, in one run: in-process store with 1 worker at 1 and 8 concurrent clients, Redis with 1 worker and
with 2 workers (both on the server core: per-challenge CPU stays comparable; worker scaling needs more
cores than the benchmark can give the server). Rate limits are lifted (the load would hit them).
`--before SRC` runs the same arms on another checkout's code (e.g. `git archive main src | tar -x -C /tmp/main`,
then `--before main=/tmp/main/src`; repeatable) with asyncio + h11, as its install ran, in the same run.

It also measures the floor a served challenge is compared against: 12 JPEG encodes of served-size
images with libjpeg-turbo on one core, and the whole per-image render (crop, resize, encode).

The JSON names the headline `server_cpu_ms_per_challenge` (this code, in-process, 1 worker, 8 clients).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from load_test import HOST, SHARED_TRAIN, build_config, free_port, start_redis  # benchmarks/, beside this script
from report import cpu_line, table

ROOT = Path(__file__).resolve().parents[1]
REQUESTS_PER_CHALLENGE = 14
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---- CPU time of a process tree, and cores -------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """pid and every process below it (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                todo += [int(c) for c in Path(f"/proc/{current}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def cpu_seconds(pid: int, tree: bool = True) -> float:
    """User + system CPU seconds of `pid` (and with `tree` its live descendants), from /proc/PID/stat."""
    total = 0
    for member in descendants(pid) if tree else [pid]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14-15 of stat(5), after "pid (comm)"
    return total / CLK_TCK


def rss_bytes(pid: int, tree: bool = True) -> int:
    total = 0
    for member in descendants(pid) if tree else [pid]:
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def cores() -> tuple[int | None, int | None]:
    """(server core, load core) when this process may use two or more cores, else (None, None): unpinned."""
    if not hasattr(os, "sched_getaffinity") or not Path("/proc/self/stat").exists():
        sys.exit("error: serve_cost.py reads CPU time from /proc: it runs on Linux")
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else (None, None)


# ---- the server, in its own processes --------------------------------------------------------------


def serve_main(args) -> None:
    """`serve_cost.py --serve CONFIG ...`: run the service from CONFIG, pinned (the code: whatever PYTHONPATH gives)."""
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})  # uvicorn's worker processes inherit it
    import functools

    import uvicorn

    from asirra.captcha.service import run
    from asirra.captcha.service.settings import ServiceSettings

    if args.loop != "auto" or args.http != "auto":
        uvicorn.run = functools.partial(uvicorn.run, loop=args.loop, http=args.http)
    import inspect

    config = json.loads(Path(args.serve).read_text())
    known = {f.name for f in dataclasses.fields(ServiceSettings)}  # an older checkout knows fewer settings
    config["settings"] = {k: v for k, v in config["settings"].items() if k in known}
    # No access log: one line per request would cost more than some requests (older code: an argument).
    quiet = {"access_log": False} if "access_log" in inspect.signature(run.serve).parameters else {}
    if args.workers == 1:
        run.serve(run.app_from_config(config), HOST, args.port, **quiet)
    else:
        run.serve_workers(config, HOST, args.port, args.workers, **quiet)


@dataclasses.dataclass
class Server:
    """A service started from a config file with the given code, pinned to `core`; stopped by `stop()`."""

    config: dict
    workers: int = 1
    src: Path = ROOT / "src"
    loop: str = "auto"
    http: str = "auto"
    core: int | None = None

    def start(self, folder: Path) -> "Server":
        self.port = free_port()
        path = folder / f"config-{self.port}.json"
        path.write_text(json.dumps(self.config))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.src), str(Path(__file__).parent)])}
        command = [sys.executable, __file__, "--serve", str(path), "--port", str(self.port), "--workers",
                   str(self.workers), "--loop", self.loop, "--http", self.http]
        if self.core is not None:
            command += ["--core", str(self.core)]
        self.log = open(folder / f"server-{self.port}.log", "w+")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_until_up()
        return self

    def _wait_until_up(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                sys.exit(f"error: the server exited during startup:\n{self.log.read()[-3000:]}")
            try:
                if asyncio.run(get_json(self.port, "/healthz")) is not None:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        sys.exit(f"error: the server did not answer within {timeout:.0f} s")

    def cpu(self) -> float:
        return cpu_seconds(self.process.pid)

    def rss(self) -> int:
        return rss_bytes(self.process.pid)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.process.terminate()  # SIGTERM: uvicorn's supervisor stops its workers too
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


# ---- the load generator: raw HTTP/1.1 keep-alive ---------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection, requests one at a time. `local` binds the client's address
    (any 127.x.y.z on Linux loopback), so one machine can play several clients."""

    def __init__(self, port: int, local: str | None = None, headers: dict | None = None):
        self.port, self.local = port, local
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())

    async def open(self) -> "Connection":
        self.reader, self.writer = await asyncio.open_connection(
            HOST, self.port, local_addr=(self.local, 0) if self.local else None)
        return self

    async def request(self, method: str, path: str, body: bytes = b"",
                      cookie: str | None = None) -> tuple[int, dict, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n{self.extra}"
        if cookie:
            head += f"Cookie: {cookie}\r\n"
        if method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status, headers = int(lines[0].split()[1]), {}
        for line in lines[1:]:
            if b":" in line:
                key, value = line.split(b":", 1)
                headers.setdefault(key.strip().lower().decode(), []).append(value.strip().decode())
        body = await self.reader.readexactly(int(headers.get("content-length", ["0"])[0]))
        return status, headers, body

    def close(self) -> None:
        self.writer.close()


async def get_json(port: int, path: str):
    connection = await Connection(port).open()
    try:
        status, _, body = await connection.request("GET", path)
        return json.loads(body) if status == 200 else None
    finally:
        connection.close()


@dataclasses.dataclass
class Tally:
    latencies_ms: list = dataclasses.field(default_factory=list)
    bytes_in: list = dataclasses.field(default_factory=list)
    statuses: dict = dataclasses.field(default_factory=dict)

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def solve_challenges(port: int, n: int, tally: Tally, seed: int, connections: int = 4, pause: float = 0.0,
                           local: str | None = None, headers: dict | None = None) -> None:
    """One virtual client: n whole challenges (challenge, 12 images over `connections`, a random answer)."""
    rng = random.Random(seed)
    conns = [await Connection(port, local, headers).open() for _ in range(connections)]
    cookie = None
    try:
        for _ in range(n):
            started = time.perf_counter()
            status, head, body = await conns[0].request("POST", "/api/challenge", cookie=cookie)
            tally.count(status)
            cookie = head["set-cookie"][0].split(";")[0] if "set-cookie" in head else cookie
            received = len(body)
            ok = status == 200
            if ok:
                challenge = json.loads(body)
                urls = challenge["images"]

                async def fetch(conn, part):
                    nonlocal received, ok
                    for url in part:
                        got, _, image = await conn.request("GET", url, cookie=cookie)
                        tally.count(got)
                        received += len(image)
                        ok = ok and got == 200

                await asyncio.gather(*(fetch(c, urls[i :: len(conns)]) for i, c in enumerate(conns)))
                selected = json.dumps({"selected": [i for i in range(12) if rng.random() < 0.5]}).encode()
                got, _, verdict = await conns[0].request("POST", f"/api/challenge/{challenge['id']}/answer",
                                                         body=selected, cookie=cookie)
                tally.count(got)
                received += len(verdict)
                ok = ok and got == 200
            if ok:
                tally.latencies_ms.append((time.perf_counter() - started) * 1000)
                tally.bytes_in.append(received)
            if pause:
                await asyncio.sleep(pause)
    finally:
        for conn in conns:
            conn.close()


def load(port: int, total: int, concurrency: int) -> tuple[Tally, float, float]:
    """`total` challenges from `concurrency` clients: the tally, wall seconds, and the generator's CPU seconds."""
    tally = Tally()

    async def clients():
        share = [total // concurrency + (i < total % concurrency) for i in range(concurrency)]
        await asyncio.gather(*(solve_challenges(port, n, tally, seed=i) for i, n in enumerate(share)))

    cpu, wall = time.process_time(), time.perf_counter()
    asyncio.run(clients())
    return tally, time.perf_counter() - wall, time.process_time() - cpu


# ---- one arm ----------------------------------------------------------------------------------------


def measure(server: Server, folder: Path, total: int, warmup: int, concurrency: int, redis_pid: int | None) -> dict:
    server.start(folder)
    try:
        load(server.port, warmup, 4)  # fills the image cache (a 500-photo pool: ~95% of it) and every lazy import
        redis_before = cpu_seconds(redis_pid, tree=False) if redis_pid else 0.0
        before = server.cpu()
        tally, wall, generator_cpu = load(server.port, total, concurrency)
        spent = server.cpu() - before
        redis_spent = (cpu_seconds(redis_pid, tree=False) - redis_before) if redis_pid else 0.0
        health = asyncio.run(get_json(server.port, "/healthz")) or {}
        rss = server.rss()
    finally:
        server.stop()
    n = len(tally.latencies_ms)
    server_ms = spent * 1000 / max(n, 1)
    return {
        "challenges": n, "concurrency": concurrency, "workers": server.workers,
        "server_cpu_ms_per_challenge": server_ms,
        "redis_cpu_ms_per_challenge": redis_spent * 1000 / max(n, 1),
        "defender_cpu_ms_per_challenge": (spent + redis_spent) * 1000 / max(n, 1),
        "challenges_per_second_per_core": 1000 / server_ms if server_ms else None,
        "wall_challenges_per_second": n / wall,
        "server_core_busy": spent / wall,
        "server_cpu_seconds": spent,
        "generator_cpu_us_per_request": generator_cpu * 1e6 / max(n * REQUESTS_PER_CHALLENGE, 1),
        "bytes_per_challenge": statistics.mean(tally.bytes_in) if tally.bytes_in else None,
        "latency_ms": {q: float(np.percentile(tally.latencies_ms, int(q[1:]))) if n else None
                       for q in ("p50", "p90", "p99")},
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "server_rss_mib": rss / 2**20,
        "image_cache": health.get("image_cache"),
        "renderer": health.get("renderer"),
        "event_loop": server.loop, "http_parser": server.http,
    }


# ---- the floor: libjpeg-turbo's encode of a served-size image on one core -----------------------------


def floor(config: dict, images: int = 40, repeats: int = 5) -> dict:
    """Per served image, thread CPU time on this core: the JPEG encode alone (libjpeg-turbo via simplejpeg), the
    service's whole render (crop, resize, encode) and the Pillow-only render, on served sizes of pool photos."""
    from asirra.captcha.rendering import (
        ENCODERS,
        RESIZERS,
        Renderer,
        RenderSettings,
        available,
        crop_geometry,
        draw_jitter,
    )
    from asirra.captcha.service.images import ImageServer
    from asirra.captcha.service.settings import ServiceSettings
    from asirra.data import ImageRef

    refs = [ImageRef(source, label, ref_id) for source, label, ref_id in config["pool"][:images]]
    server = ImageServer(refs, ServiceSettings())
    rng = random.Random(0)
    cases = [(server.base(ref), draw_jitter(rng, RenderSettings())) for ref in refs] * repeats
    resized = []
    for base, jitter in cases:
        (rows, cols), size = crop_geometry(base.shape[0], base.shape[1], jitter)
        resized.append((RESIZERS["pillow"](np.ascontiguousarray(base[rows, cols]), size), jitter.quality))

    def per_call(fn, items) -> float:
        times = []
        for item in items:
            started = time.thread_time_ns()
            fn(*item)
            times.append((time.thread_time_ns() - started) / 1000)
        return statistics.median(times)

    encoder = "simplejpeg" if available("simplejpeg") else "pillow"
    encode_us = per_call(ENCODERS[encoder], resized)
    crops = []
    for base, jitter in cases:
        (rows, cols), size = crop_geometry(base.shape[0], base.shape[1], jitter)
        crops.append((np.ascontiguousarray(base[rows, cols]), size))
    return {"encoder": encoder, "median_side": statistics.median(max(r.shape[:2]) for r, _ in resized),
            "resize_us": {name: per_call(fn, crops) for name, fn in resizers().items()},
            "jpeg_encode_us": encode_us, "jpeg_encode_x12_ms": 12 * encode_us / 1000,
            "renderer": f"{server.renderer.resizer}+{server.renderer.encoder}",
            "render_us": per_call(server.renderer.jpeg, cases),
            "pillow_render_us": per_call(Renderer("pillow", "pillow").jpeg, cases),
            "render_x12_ms": 12 * per_call(server.renderer.jpeg, cases) / 1000}


def resizers() -> dict:
    """The ways to resize a served copy that were weighed, each on a whole-pixel crop of the cached base."""
    from PIL import Image

    from asirra.captcha.rendering import RESIZERS, available

    def pillow_filter(kind):
        return lambda pixels, size: np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), kind))

    found = {"pillow bilinear (antialiased)": RESIZERS["pillow"], "pillow box": pillow_filter(Image.Resampling.BOX),
             "pillow nearest": pillow_filter(Image.Resampling.NEAREST)}
    if available("opencv"):
        found["opencv bilinear"] = RESIZERS["opencv"]
    try:
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(1)

        def torch_resize(pixels, size):
            x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
            return F.interpolate(x, size=size, mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()

        found["torch bilinear (antialiased, uint8)"] = torch_resize
    except ImportError:
        pass
    return found


# ---- the run ------------------------------------------------------------------------------------------


ARMS = [  # name, store, workers, concurrency
    ("in-process, 1 worker, 1 client", "memory", 1, 1),
    ("in-process, 1 worker, 8 clients", "memory", 1, 8),
    ("redis, 1 worker, 8 clients", "redis", 1, 8),
    ("redis, 2 workers, 8 clients", "redis", 2, 8),
]
HEADLINE = "in-process, 1 worker, 8 clients"


def machine(load_before, server_core, load_core) -> dict:
    from asirra.captcha.service.run import serving_stack
    from asirra.captcha.service.settings import ServiceSettings
    from asirra.cpu import describe_cpu

    return {"cpu": describe_cpu(), "load_before": load_before, "load_after": os.getloadavg(),
            "pinned": server_core is not None, "server_core": server_core, "load_core": load_core,
            **serving_stack(ServiceSettings())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_TRAIN), help="labelled images (default: the shared train set)")
    parser.add_argument("--pool", type=int, default=500, help="images drawn from --data for the pool")
    parser.add_argument("--challenges", type=int, default=400, help="measured challenges per arm")
    parser.add_argument("--warmup", type=int, default=120, help="challenges before measuring (fills the image cache)")
    parser.add_argument("--before", action="append", default=[], metavar="[LABEL=]SRC",
                        help="another checkout's src/ to run the same arms on (asyncio + h11, as it installed), "
                             "e.g. main's; repeat for more")
    parser.add_argument("--arms", default=None, help="comma-separated arm numbers to run (1-4; default all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run a server (see Server)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--loop", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--http", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve_main(args)
    if not Path(args.data).exists():
        sys.exit(f"error: no data at {args.data}; pass --data PATH")
    befores = []
    for given in args.before:
        label, _, src = given.rpartition("=")
        if not (Path(src) / "asirra" / "__init__.py").exists():
            sys.exit(f"error: --before {src} is not a src/ folder holding asirra/")
        befores.append((label or "before", Path(src), "asyncio", "h11"))

    server_core, load_core = cores()
    load_before = os.getloadavg()
    arms = [ARMS[int(i) - 1] for i in args.arms.split(",")] if args.arms else ARMS
    codes = [("this", ROOT / "src", "auto", "auto")] + befores
    runs = {}
    with tempfile.TemporaryDirectory(prefix="asirra-serve-cost-") as tmp:
        folder = Path(tmp)
        secret = folder / "secret"
        secret.write_text("serve-cost secret, only ever on loopback, 32+ bytes")
        config = build_config(args.data, args.pool, 10 * (args.challenges + args.warmup) + 10_000, str(secret))
        redis_process, redis_url = start_redis(folder) if any(arm[1] == "redis" for arm in arms) else (None, None)
        if server_core is not None:
            if redis_process:
                os.sched_setaffinity(redis_process.pid, {server_core})  # Redis's CPU is the defender's too
            os.sched_setaffinity(0, {load_core})
        try:
            limit = floor(config)
            for name, store, workers, concurrency in arms:
                for code, src, loop, http in codes:  # the two codes alternate, so load from others hits both alike
                    arm_config = config if store == "memory" else {
                        **config, "settings": {**config["settings"], "redis_url": redis_url}}
                    if store == "redis":
                        import redis

                        redis.Redis.from_url(redis_url).flushall()
                    server = Server(arm_config, workers, src, loop, http, server_core)
                    if not args.json:
                        print(f"{code}: {name} ...", file=sys.stderr)
                    runs[f"{code}: {name}"] = {"code": code, "store": store,
                                               **measure(server, folder, args.challenges, args.warmup, concurrency,
                                                         redis_process.pid if store == "redis" else None)}
        finally:
            if redis_process:
                redis_process.terminate()
                redis_process.wait(10)
    headline = runs.get(f"this: {HEADLINE}", {}).get("server_cpu_ms_per_challenge")
    summary = {"server_cpu_ms_per_challenge": headline, "machine": machine(load_before, server_core, load_core),
               "pool": args.pool, "challenges": args.challenges, "warmup": args.warmup,
               "requests_per_challenge": REQUESTS_PER_CHALLENGE, "floor": limit, "runs": runs,
               "before": {label: str(src) for label, src, _, _ in befores}}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print_summary(summary)


def print_summary(summary: dict) -> None:
    m = summary["machine"]
    print(f"\n{cpu_line(m['cpu'], m['load_before'], m['load_after'])}\nserver on core {m['server_core']}, load on "
          f"core {m['load_core']}; {m['event_loop']} + {m['http_parser']}")
    f = summary["floor"]
    print(f"floor: one JPEG encode ({f['encoder']}, median side {f['median_side']:.0f} px) "
          f"{f['jpeg_encode_us']:.0f} us "
          f"-> {f['jpeg_encode_x12_ms']:.2f} ms per challenge; whole render ({f['renderer']}) {f['render_us']:.0f} us "
          f"-> {f['render_x12_ms']:.2f} ms; Pillow-only render {f['pillow_render_us']:.0f} us")
    print("resize alone, us per served image: " + ", ".join(f"{k} {v:.0f}" for k, v in f["resize_us"].items()) + "\n")
    rows = [{"arm": name, **run, "p50": run["latency_ms"]["p50"], "p99": run["latency_ms"]["p99"],
             "kib": (run["bytes_per_challenge"] or 0) / 1024, "ok": run["statuses"].get("200", 0)}
            for name, run in summary["runs"].items()]
    print(table(rows, [("arm", "arm", ""), ("server_cpu_ms_per_challenge", "server ms CPU", ".2f"),
                       ("redis_cpu_ms_per_challenge", "+ redis", ".2f"),
                       ("challenges_per_second_per_core", "challenges/s/core", ".0f"),
                       ("wall_challenges_per_second", "wall /s", ".0f"), ("server_core_busy", "core busy", ".2f"),
                       ("p50", "p50 ms", ".1f"), ("p99", "p99 ms", ".1f"), ("kib", "KiB/chal", ".0f"),
                       ("ok", "200s", "d"), ("server_rss_mib", "RSS MiB", ".0f")]))
    print(f"\nserver_cpu_ms_per_challenge = {summary['server_cpu_ms_per_challenge']:.2f}")


if __name__ == "__main__":
    main()
