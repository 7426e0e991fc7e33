"""`asirra serve` and `asirra attack`: the live CAPTCHA service, and a bot against one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from asirra.captcha.attack.bot import DEFAULT_MAX_WAIT
from asirra.captcha.service.settings import DEFAULT_SAFEGUARD, Given, defaults, env_name, load_serve_settings
from asirra.cli.captcha import SAFEGUARD_HELP
from asirra.cli.common import DEFAULT_BACKEND, BackendOption, JsonFlag, ModelOption, emit_json
from asirra.errors import require

_DEFAULTS = defaults()


def _default(name: str) -> str:
    value = _DEFAULTS[name]
    if isinstance(value, tuple):
        value = ",".join(map(str, value)) or "none"
    return f"{env_name(name)}; default {'none' if value is None else value}"


def serve_command(
    ctx: typer.Context,
    data: Optional[Path] = typer.Option(None, "--data", show_default=False,
                                        help="Labelled images: the pool challenges are drawn from (ASIRRA_DATA)."),
    port: int = typer.Option(_DEFAULTS["port"], "--port", show_default=False, help=_default("port")),
    host: str = typer.Option(_DEFAULTS["host"], "--host", show_default=False,
                             help="Address to listen on; 0.0.0.0 opens it to the network. " + _default("host")),
    safeguard: str = typer.Option(DEFAULT_SAFEGUARD, "--safeguard", show_default=False,
                                  help=f"{SAFEGUARD_HELP}. The default is what `asirra captcha defend` recommends; "
                                       f"none turns it off. {_default('safeguard')}"),
    ttl: float = typer.Option(_DEFAULTS["ttl_seconds"], "--ttl", show_default=False,
                              help="Seconds a challenge stays answerable. " + _default("ttl_seconds")),
    seed: Optional[int] = typer.Option(None, "--seed", show_default=False,
                                       help="Seeds which challenges are drawn (tokens stay random). "
                                            + _default("seed")),
    challenge_rate: float = typer.Option(_DEFAULTS["challenge_rate"], "--challenge-rate", show_default=False,
                                         help="New challenges per second per client (raise it to measure a bot "
                                              "unthrottled). " + _default("challenge_rate")),
    redis_url: Optional[str] = typer.Option(None, "--redis", show_default=False,
                                            help="Keep all state in Redis, e.g. redis://127.0.0.1:6379/0 (shared by "
                                                 "every worker and instance; needs a secret). "
                                                 + _default("redis_url")),
    workers: int = typer.Option(_DEFAULTS["workers"], "--workers", show_default=False,
                                help="Worker processes (more than 1 needs --redis). " + _default("workers")),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", show_default=False,
                                               help="File of >= 32 random bytes: the key for cookies and pass tokens, "
                                                    "shared by every worker and instance (or the key itself in "
                                                    "ASIRRA_SECRET). " + _default("secret_file")),
    sites_file: Optional[Path] = typer.Option(None, "--sites", show_default=False,
                                              help='JSON {"sites": [{"key": ..., "secret": ..., "hostnames": [...]}]}: '
                                                   "the sites that may embed the widget and verify pass tokens (or the "
                                                   "JSON itself in ASIRRA_SITES). " + _default("sites_file")),
    trusted_proxy: Optional[list[str]] = typer.Option(None, "--trusted-proxy", show_default=False,
                                                      help="A proxy (address or network; repeat for more) whose "
                                                           "X-Forwarded-For names the client. Default: none, so no "
                                                           "client can claim another address. ASIRRA_TRUSTED_PROXIES "
                                                           "(comma-separated)."),
    metrics_allow: Optional[list[str]] = typer.Option(None, "--metrics-allow", show_default=False,
                                                      help="An address or network (repeat for more) that may read "
                                                           "/metrics; none turns it off. " + _default("metrics_allow")),
    log_format: str = typer.Option(_DEFAULTS["log_format"], "--log-format", show_default=False,
                                   help="Log lines as text (key=value) or json. " + _default("log_format")),
    access_log: bool = typer.Option(_DEFAULTS["access_log"], "--access-log/--no-access-log", show_default=False,
                                    help="One structured line per request. " + _default("access_log")),
    image_cache_mb: float = typer.Option(_DEFAULTS["image_cache_mb"], "--image-cache-mb", show_default=False,
                                         help="MiB of decoded pool photos each worker keeps (~0.12 MiB per photo); "
                                              "0 decodes on every serving. " + _default("image_cache_mb")),
    config: Optional[Path] = typer.Option(None, "--config", show_default=False,
                                          help="A TOML file of settings (name = value, the names of the environment "
                                               "variables without ASIRRA_, lower case). ASIRRA_CONFIG."),
) -> None:
    """Serve challenges on a web page, a JSON API and an embeddable widget until Ctrl-C.

    Every setting can also come from an ASIRRA_<NAME> environment variable or the --config file; flags win over
    the environment, which wins over the file.
    """
    require("fastapi", "serve")
    require("uvicorn", "serve")
    from asirra.captcha.service.run import serve_pool

    flags = {}
    for param, name, flag in _FLAGS:
        if getattr(ctx.get_parameter_source(param), "name", None) == "COMMANDLINE":  # given, not a default
            value = ctx.params[param]
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() \
                if isinstance(value, bool) else str(value)
            flags[name] = Given(text, f"{flag} {text}")
    serve_pool(load_serve_settings(flags, config_file=config))


# Each flag of `asirra serve`: its parameter, the setting it gives, its spelling (for the errors).
_FLAGS = [("data", "data", "--data"), ("port", "port", "--port"), ("host", "host", "--host"),
          ("safeguard", "safeguard", "--safeguard"), ("ttl", "ttl_seconds", "--ttl"), ("seed", "seed", "--seed"),
          ("challenge_rate", "challenge_rate", "--challenge-rate"), ("redis_url", "redis_url", "--redis"),
          ("workers", "workers", "--workers"), ("secret_file", "secret_file", "--secret-file"),
          ("sites_file", "sites_file", "--sites"), ("trusted_proxy", "trusted_proxies", "--trusted-proxy"),
          ("metrics_allow", "metrics_allow", "--metrics-allow"), ("log_format", "log_format", "--log-format"),
          ("access_log", "access_log", "--access-log")]


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
    from asirra import api

    report = api.attack(url, challenges, model=model, backend=backend, target=target, concurrency=concurrency,
                        timeout=timeout, max_wait=max_wait, preprocess=preprocess, progress=True)
    if as_json:
        emit_json(report.to_dict())
        return
    for line in report.summary_lines():
        typer.echo(line)
