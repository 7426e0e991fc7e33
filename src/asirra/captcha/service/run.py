"""Running the service: one process (`serve`), a test's background thread (`running`), or N worker
processes sharing Redis (`serve_workers`), and the rules a deployment must keep."""

from __future__ import annotations

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
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI

from asirra.captcha.safeguards import Safeguard, describe, parse_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.clients import Sites, load_sites, load_sites_text, read_secret_file
from asirra.captcha.service.observe import MULTIPROCESS_ENV, log_config, use_log_format
from asirra.captcha.service.settings import (
    DEFAULT_SAFEGUARD,
    SECRET_ENV,
    SITES_ENV,
    Loaded,
    ServiceError,
    ServiceSettings,
)

log = logging.getLogger(__name__)

# Idle keep-alive connections live longer than clients keep them (httpx: 5 s), so a client never
# sends a request on a connection the server is closing at that moment.
KEEP_ALIVE = 15


def serve_pool(loaded: Loaded) -> None:
    """`asirra serve`: the labelled images in `data` served until Ctrl-C, by one process or `workers` sharing Redis.

    Every setting is checked (and the Redis pool claimed) before the first request can arrive.
    """
    from asirra.captcha.service.app import read_pool
    from asirra.captcha.service.store import StoreError, claim_pool, pool_fingerprint

    settings, service = loaded.settings, loaded.settings.service
    use_log_format(settings.log_format)
    policy = parse_safeguard(settings.safeguard)
    sites = loaded.sites
    for warning in [*loaded.warnings, *deployment_warnings(sites)]:
        log.warning(warning)
    pool = read_pool(settings.data)
    if service.redis_url:
        try:
            claim_pool(service.redis_url, pool_fingerprint(pool))  # a clear error now, not one per request
        except StoreError as exc:
            raise ServiceError(str(exc)) from None
    store = f"Redis {redact(service.redis_url)}" if service.redis_url else "in-process state"
    default = " (the default)" if settings.safeguard == DEFAULT_SAFEGUARD else ""
    log.info(f"serving {len(pool)} images, safeguard {describe(policy)}{default}, {store}, {settings.workers} "
             f"worker(s), {len(sites or ())} site(s), trusted proxies: {', '.join(service.trusted_proxies) or 'none'}, "
             f"at http://{settings.host}:{settings.port}/")
    stack = serving_stack(service)
    log.info(f"event loop {stack['event_loop']}, HTTP parser {stack['http_parser']}, served images by "
             f"{stack['renderer']}, image cache {service.image_cache_mb:g} MiB per worker")
    if settings.workers == 1:
        os.environ.pop(MULTIPROCESS_ENV, None)  # one process keeps its metrics in memory
        serve(create_app(pool, policy, service, sites=sites), settings.host, settings.port, settings.log_format)
    else:
        config = worker_config(pool, policy, service,
                               str(Path(settings.secret_file).resolve()) if settings.secret_file else None,
                               str(Path(settings.sites_file).resolve()) if settings.sites_file else None,
                               secret_from_env=loaded.secret_from == "env", sites_from_env=loaded.sites_from_env)
        serve_workers(config, settings.host, settings.port, settings.workers, settings.log_format)


def serving_stack(service: ServiceSettings) -> dict:
    """What serves requests here: uvicorn's event loop and HTTP parser (its "auto" picks uvloop and httptools
    when installed: the `serve` extra) and the served-image renderer (resize + encode)."""
    import importlib.util

    from asirra.captcha.service.images import renderer_for

    def installed(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    renderer = renderer_for(service.renderer)
    return {"event_loop": "uvloop" if installed("uvloop") else "asyncio",
            "http_parser": "httptools" if installed("httptools") else "h11",
            "renderer": f"{renderer.resizer}+{renderer.encoder}"}


def deployment_warnings(sites: Sites | None) -> list[str]:
    """What the start should say about settings that work but probably not as meant."""
    warnings = [f"site {site.name or site.key!r} has no hostnames: its widget is refused (the service's own page "
                f"/?sitekey={site.key} still works)" for site in sites or () if not site.hostnames]
    if os.environ.get("FORWARDED_ALLOW_IPS"):
        warnings.append("FORWARDED_ALLOW_IPS is ignored: name the proxies with --trusted-proxy or "
                        "ASIRRA_TRUSTED_PROXIES")
    if os.environ.get(MULTIPROCESS_ENV):
        warnings.append(f"{MULTIPROCESS_ENV} is ignored: asirra serve keeps its own metrics folder")
    return warnings


def redact(url: str) -> str:
    """A Redis URL fit for a log: its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_format: str = "text") -> None:
    """Serve an app (`asirra.create_app`'s) in this process until interrupted (Ctrl-C).

    Args:
        app: The service.
        host: The address to listen on; "0.0.0.0" opens it to the network.
        port: The port.
        log_format: "text" or "json" (one JSON object per line, for a log collector).
    """
    import uvicorn

    # uvicorn's access log is off: the app writes its own, structured and without tokens (observe.py).
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, log_config=log_config(log_format),
                timeout_keep_alive=KEEP_ALIVE,
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
                                           access_log=False,
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


def worker_config(pool: Sequence, safeguard: Safeguard, settings: ServiceSettings, secret_file: str | None,
                  sites_file: str | None, *, secret_from_env: bool = False, sites_from_env: bool = False) -> dict:
    """Everything a worker needs, as JSON: the pool as checked once by the parent (so N workers do not decode
    it N times), the policy's spec, the settings. Never a secret: only where each worker finds it again
    (a file, or a variable the workers inherit)."""
    return {"pool": [[ref.source, ref.label, ref.id] for ref in pool], "safeguard": describe(safeguard),
            "settings": settings.to_dict(), "secret_file": secret_file, "sites_file": sites_file,
            "secret_env": SECRET_ENV if secret_from_env else None, "sites_env": SITES_ENV if sites_from_env else None}


def app_from_config(config: dict) -> FastAPI:
    from asirra.data import ImageRef

    secret = None
    if config["secret_file"]:
        secret = read_secret_file(config["secret_file"])
    elif config.get("secret_env"):
        secret = os.environ[config["secret_env"]].encode().strip()
    sites = None
    if config["sites_file"]:
        sites = load_sites(config["sites_file"])
    elif config.get("sites_env"):
        sites = load_sites_text(os.environ[config["sites_env"]], config["sites_env"])
    pool = [ImageRef(source, label, ref_id) for source, label, ref_id in config["pool"]]
    return create_app(pool, parse_safeguard(config["safeguard"]), ServiceSettings.from_dict(config["settings"], secret),
                      sites=sites)


def worker_app() -> FastAPI:
    """The app factory uvicorn calls in each worker process (`--workers N`)."""
    return app_from_config(json.loads(Path(os.environ[CONFIG_ENV]).read_text(encoding="utf-8")))


def serve_workers(config: dict, host: str, port: int, workers: int, log_format: str = "text") -> None:
    """Serve with `workers` uvicorn processes (restarted by uvicorn if one dies) until Ctrl-C.

    Their metrics are summed through files in a folder of their own (prometheus-client's multiprocess mode):
    a scrape answered by any worker counts every worker's requests.
    """
    import uvicorn

    from asirra.fileio import write_json_atomic

    with tempfile.TemporaryDirectory(prefix="asirra-serve-") as folder:
        path = write_json_atomic(Path(folder) / "config.json", config)
        metrics = Path(folder) / "metrics"
        metrics.mkdir()
        # Inherited by the worker processes uvicorn spawns: each imports prometheus-client with it set.
        saved = {name: os.environ.get(name) for name in (CONFIG_ENV, MULTIPROCESS_ENV)}
        os.environ.update({CONFIG_ENV: str(path), MULTIPROCESS_ENV: str(metrics)})
        try:
            # A worker rebuilds a pool of 19,000 refs and imports the app before it answers uvicorn's
            # health pings: on 2 busy cores that can exceed uvicorn's default 5 s, and it would be killed.
            uvicorn.run("asirra.captcha.service.run:worker_app", factory=True, workers=workers, host=host, port=port,
                        log_level="info", access_log=False, log_config=log_config(log_format),
                        timeout_keep_alive=KEEP_ALIVE, proxy_headers=False, timeout_worker_healthcheck=30)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
