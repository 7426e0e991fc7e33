"""`asirra serve` and `asirra attack`: the live CAPTCHA service, and a bot against one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from asirra.captcha.attack.bot import DEFAULT_MAX_WAIT
from asirra.captcha.service.settings import DEFAULT_SAFEGUARD, ServiceSettings
from asirra.cli.captcha import SAFEGUARD_HELP
from asirra.cli.common import DEFAULT_BACKEND, BackendOption, JsonFlag, ModelOption, emit_json
from asirra.errors import require

_SERVICE = ServiceSettings()


def serve_command(
    data: Path = typer.Option(..., "--data", help="Labelled images: the pool challenges are drawn from."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network."),
    safeguard: str = typer.Option(DEFAULT_SAFEGUARD, "--safeguard", help=SAFEGUARD_HELP),
    ttl: float = typer.Option(_SERVICE.ttl_seconds, "--ttl", min=1.0, help="Seconds a challenge stays answerable."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds which challenges are drawn (tokens stay random)."),
    challenge_rate: float = typer.Option(_SERVICE.challenge_rate, "--challenge-rate", min=0.001,
                                         help="New challenges per second per client (raise it to measure a bot unthrottled)."),
    redis_url: Optional[str] = typer.Option(None, "--redis", help="Keep all state in Redis, e.g. redis://127.0.0.1:6379/0 "
                                            "(shared by every worker and instance; needs --secret-file)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Worker processes (more than 1 needs --redis)."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="File of >= 32 random bytes: the key for "
                                               "cookies and pass tokens, shared by every worker and instance."),
    sites_file: Optional[Path] = typer.Option(None, "--sites", help='JSON {"sites": [{"key": ..., "secret": ...}]}: '
                                              "the sites that may request challenges and verify pass tokens."),
    trusted_proxy: Optional[list[str]] = typer.Option(None, "--trusted-proxy", show_default=False,
                                                      help="A proxy (address or network; repeat for more) whose "
                                                           "X-Forwarded-For names the client. Default: none, so no "
                                                           "client can claim another address."),
    image_cache_mb: float = typer.Option(_SERVICE.image_cache_mb, "--image-cache-mb", min=0.0,
                                         help="MiB of decoded pool photos each worker keeps (~0.12 MiB per photo); "
                                              "0 decodes on every serving."),
) -> None:
    """Serve challenges on a web page and a JSON API until Ctrl-C."""
    require("fastapi", "serve")
    require("uvicorn", "serve")
    from asirra.captcha.service.run import serve_pool

    settings = ServiceSettings(ttl_seconds=ttl, seed=seed, challenge_rate=challenge_rate, redis_url=redis_url,
                               trusted_proxies=tuple(trusted_proxy or ()), image_cache_mb=image_cache_mb)
    serve_pool(data, safeguard=safeguard, settings=settings, workers=workers, host=host, port=port,
               secret_file=secret_file, sites_file=sites_file)


def attack_command(
    url: str = typer.Option(..., "--url", help="A running service, e.g. http://127.0.0.1:8000."),
    challenges: int = typer.Option(100, "--challenges", "-n", min=1, help="Challenges to attempt."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Challenges in flight at once."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait for each HTTP reply."),
    max_wait: float = typer.Option(DEFAULT_MAX_WAIT, "--max-wait", min=0.0,
                                   help="Seconds the whole run may spend waiting out Retry-After (429/503); "
                                        "past it, refusals are recorded as refused, not waited out."),
    preprocess: str = typer.Option("none", "--preprocess",
                                   help="Counter-moves applied to each served image before classifying, in order: "
                                        "jpeg:QUALITY, median:SIZE, blur:SIGMA, resize:FACTOR, e.g. jpeg:75,median:3."),
    target: str = typer.Option("cat", "--target", help="The class the challenge asks to select (one of the model's classes)."),
    as_json: JsonFlag = False,
) -> None:
    """Solve a running service's challenges over HTTP with the classifier, as a bot would.

    Refused challenges (rate limits, errors) are reported apart: the solve rate is passes / answered.
    """
    from asirra.captcha.attack.bot import AttackError, aim, attack, check_settings
    from asirra.captcha.attack.counter import parse_preprocess
    from asirra.predict import load_classifier

    check_settings(url, challenges, concurrency, max_wait)  # before a model is loaded for nothing
    pipeline = parse_preprocess(preprocess)
    classifier = aim(load_classifier(model, backend=backend), target)  # refuses a class the model lacks
    report = attack(url, challenges, classifier, concurrency=concurrency, timeout=timeout, max_wait=max_wait,
                    preprocess=pipeline, progress=True)
    if report.unreachable:
        raise AttackError(f"cannot connect to {url}; is the service running?")
    if as_json:
        emit_json(report.to_dict())
        return
    for line in report.summary_lines():
        typer.echo(line)
