"""Running the service: one process (`serve`), a test's background thread (`running`), or N worker
processes sharing Redis (`serve_workers`), and the rules a deployment must keep."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from fastapi import FastAPI

from asirra.captcha.safeguards import Safeguard, describe, parse_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.clients import load_sites, read_secret_file
from asirra.captcha.service.settings import ServiceError, ServiceSettings

log = logging.getLogger(__name__)

# Idle keep-alive connections live longer than clients keep them (httpx: 5 s), so a client never
# sends a request on a connection the server is closing at that moment.
KEEP_ALIVE = 15


def check_deployment(workers: int, redis_url: str | None, secret_file) -> None:
    """What several processes need to act as one service: shared state and a shared key."""
    if workers > 1 and not redis_url:
        raise ServiceError("--workers above 1 needs --redis: in-process state cannot be shared between worker processes")
    if redis_url and not secret_file:
        raise ServiceError("--redis needs --secret-file, so that every worker and restart signs cookies and "
                           "pass tokens alike")


def serve_pool(data, *, safeguard: str = "none", settings: ServiceSettings | None = None, workers: int = 1,
               host: str = "127.0.0.1", port: int = 8000, secret_file=None, sites_file=None) -> None:
    """`asirra serve`: the labelled images in `data` served until Ctrl-C, by one process or `workers` sharing Redis.

    Every setting is checked (and the Redis pool claimed) before the first request can arrive.
    """
    from asirra.captcha.service.app import read_pool
    from asirra.captcha.service.store import StoreError, claim_pool, pool_fingerprint

    settings = settings or ServiceSettings()
    check_deployment(workers, settings.redis_url, secret_file)
    policy = parse_safeguard(safeguard)
    if secret_file:
        settings = dataclasses.replace(settings, secret=read_secret_file(secret_file))
    sites = load_sites(sites_file) if sites_file else None
    pool = read_pool(data)
    if settings.redis_url:
        try:
            claim_pool(settings.redis_url, pool_fingerprint(pool))  # a clear error now, not one per request
        except StoreError as exc:
            raise ServiceError(str(exc)) from None
    web_app = create_app(pool, policy, settings, sites=sites) if workers == 1 else None
    store = f"Redis {settings.redis_url}" if settings.redis_url else "in-process state"
    log.info(f"serving {len(pool)} images, safeguard {policy.name}, {store}, {workers} worker(s), "
             f"{len(sites or ())} site(s), at http://{host}:{port}/")
    if web_app is not None:
        serve(web_app, host, port)
    else:
        config = worker_config(pool, policy, settings, str(Path(secret_file).resolve()),
                               str(Path(sites_file).resolve()) if sites_file else None)
        serve_workers(config, host, port, workers)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> None:
    """Serve an app (`asirra.create_app`'s) in this process until interrupted (Ctrl-C).

    Args:
        app: The service.
        host: The address to listen on; "0.0.0.0" opens it to the network.
        port: The port.
        access_log: Log one line per request.
    """
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", access_log=access_log, timeout_keep_alive=KEEP_ALIVE,
                proxy_headers=False)  # trusted proxies are the app's own setting (ServiceSettings.trusted_proxies)


@contextmanager
def running(app: FastAPI, host: str = "127.0.0.1", timeout: float = 10.0) -> Iterator[str]:
    """Serve an app on a free port from a background thread, for as long as the `with` block lasts.

    How notebooks and tests run a service: the block gets the base URL, and the server stops when
    the block ends.

    Args:
        app: The service (`asirra.create_app`'s).
        host: The address to listen on.
        timeout: Seconds to wait for the server to start (and to stop).

    Yields:
        The service's base URL, e.g. "http://127.0.0.1:41235".

    Examples:
        >>> with running(app) as url:
        ...     report = asirra.attack(url, 30)
    """
    import uvicorn

    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets that say they are TCP, and
    # with Nagle on, every keep-alive request waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=KEEP_ALIVE,
                                           proxy_headers=False))
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


# ---- many worker processes -------------------------------------------------------------------

CONFIG_ENV = "ASIRRA_SERVE_CONFIG"  # where each worker process finds what to build its app from


def worker_config(pool: Sequence, safeguard: Safeguard, settings: ServiceSettings,
                  secret_file: str | None, sites_file: str | None) -> dict:
    """Everything a worker needs, as JSON: the pool as checked once by the parent (so N workers do
    not decode it N times), the policy's spec, the settings; keys stay in their files."""
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "secret"}
    return {"pool": [[ref.source, ref.label, ref.id] for ref in pool], "safeguard": describe(safeguard),
            "settings": fields, "secret_file": secret_file, "sites_file": sites_file}


def app_from_config(config: dict) -> FastAPI:
    from asirra.data import ImageRef

    settings = dict(config["settings"])
    for name in ("image_side", "image_quality", "trusted_proxies"):
        settings[name] = tuple(settings[name])
    if config["secret_file"]:
        settings["secret"] = read_secret_file(config["secret_file"])
    sites = load_sites(config["sites_file"]) if config["sites_file"] else None
    pool = [ImageRef(source, label, ref_id) for source, label, ref_id in config["pool"]]
    return create_app(pool, parse_safeguard(config["safeguard"]), ServiceSettings(**settings), sites=sites)


def worker_app() -> FastAPI:
    """The app factory uvicorn calls in each worker process (`--workers N`)."""
    return app_from_config(json.loads(Path(os.environ[CONFIG_ENV]).read_text(encoding="utf-8")))


def serve_workers(config: dict, host: str, port: int, workers: int, access_log: bool = True) -> None:
    """Serve with `workers` uvicorn processes (restarted by uvicorn if one dies) until Ctrl-C."""
    import uvicorn

    from asirra.fileio import write_json_atomic

    with tempfile.TemporaryDirectory(prefix="asirra-serve-") as folder:
        path = write_json_atomic(Path(folder) / "config.json", config)
        os.environ[CONFIG_ENV] = str(path)  # inherited by the worker processes uvicorn spawns
        # A worker rebuilds a pool of 19,000 refs and imports the app before it answers uvicorn's
        # health pings: on 2 busy cores that can exceed uvicorn's default 5 s, and it would be killed.
        uvicorn.run("asirra.captcha.service.run:worker_app", factory=True, workers=workers, host=host, port=port,
                    log_level="info", access_log=access_log, timeout_keep_alive=KEEP_ALIVE, proxy_headers=False,
                    timeout_worker_healthcheck=30)
