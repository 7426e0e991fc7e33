"""How the live service is configured: two frozen dataclasses, validated when they are made, and the one
reader that fills them from flags, `ASIRRA_*` environment variables and an optional TOML file.

- `ServiceSettings`: what one app needs (limits, expiries, jitter, store, proxies, metrics). The command
  line, the worker processes of `--workers N` and the tests all build their app from one.
- `ServeSettings`: the process around it (`asirra serve`): data, address, workers, safeguard, where the
  secrets are, logging; and its `service`.

Every default lives here (the served-image jitter's in asirra.captcha.rendering.RenderSettings) and the
CLI's help reads it from here. `load_serve_settings` merges the sources, lowest first: defaults, the config
file (`--config` / `ASIRRA_CONFIG`), the environment, the flags given. Each setting has one name: the field
name, `ASIRRA_<NAME>` in the environment and `<name> = ...` in the file. A bad value stops the start with one
line naming where it came from. Secrets are never settings values: the master secret comes from a file
(`secret_file`) or `ASIRRA_SECRET`, the sites (with their secrets) from a file (`sites_file`) or `ASIRRA_SITES`.

Why our own reader rather than pydantic-settings: both settings stay plain dataclasses that tests and
workers build directly without the environment leaking in, flags stay typer's, and every error names its
source in one line; what remains is turning text into six kinds of values.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping

from asirra.captcha.rendering import RenderSettings
from asirra.captcha.safeguards import parse_safeguard
from asirra.captcha.service.clients import (
    ClientConfigError,
    Sites,
    check_secret,
    load_sites,
    load_sites_text,
    read_secret_file,
)
from asirra.errors import ConfigError, UserError

_RENDER = RenderSettings()
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
RENDERERS = ("auto", "pillow")
# The verdict policy `asirra serve` starts with: the one `asirra captcha defend --accuracy 0.99` recommends
# (the lowest bot pass rate among settings whose human 95% interval stays above 99%; tests/test_serve_settings.py
# holds the two equal). Its cost: people sharing an address with a failing bot share its empty bucket.
DEFAULT_SAFEGUARD = "token-bucket:capacity=1"
ENV_PREFIX = "ASIRRA_"
SECRET_ENV, SITES_ENV, CONFIG_ENV = "ASIRRA_SECRET", "ASIRRA_SITES", "ASIRRA_CONFIG"
# ASIRRA_* variables that are not serve settings but mean something elsewhere: no warning for them.
KNOWN_ELSEWHERE = {"ASIRRA_CACHE", "ASIRRA_SURROGATES", "ASIRRA_SERVE_CONFIG", "ASIRRA_SITE_SECRET",
                   "ASIRRA_REQUIRE_BROWSER", "ASIRRA_REQUIRE_REDIS", "ASIRRA_REQUIRE_DATA", "ASIRRA_REQUIRE_NGINX",
                   SECRET_ENV, SITES_ENV, CONFIG_ENV}
LOG_FORMATS = ("text", "json")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|[0-9A-Fa-f:.]{2,45}")  # a name or an IPv4 / IPv6 address


class ServiceError(ConfigError):
    """Settings or a pool the service cannot run with."""


class SettingError(ServiceError):
    """One setting's value is wrong; `name` says which, so the reader can say where the value came from."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class ServiceSettings:
    """The live service's limits, lifetimes and rendering: what `asirra.create_app` and `asirra serve` run with.

    Frozen and checked when made; every default of `asirra serve` is read from here."""

    ttl_seconds: float = 120.0
    """A person needs ~30 s for 12 photos; a bot needs far less."""
    max_challenges: int = 10_000
    """Outstanding, across all clients: bounds memory."""
    max_per_client: int = 8
    """Outstanding per IP; a newer challenge evicts the oldest."""
    challenge_rate: float = 1.0
    """New challenges per second per IP, sustained..."""
    challenge_burst: int = 10
    """...after this many at once."""
    request_rate: float = 40.0
    """Any /api request per second per IP (12 images per challenge)."""
    request_burst: int = 120
    """...after this many at once."""
    max_body_bytes: int = 1024
    """An answer is at most ~60 bytes of JSON."""
    max_clients: int = 100_000
    """Per-client tables forget the least recently seen beyond this."""
    image_side: tuple[int, int] = _RENDER.image_side
    """Longest side of a served image, drawn per request."""
    image_quality: tuple[int, int] = _RENDER.image_quality
    """JPEG quality of a served image, drawn per request."""
    max_crop: float = _RENDER.max_crop
    """Fraction trimmed from each edge, drawn per request."""
    image_cache_mb: float = 256.0
    """Decoded pool photos kept in memory per worker, at most this many MiB (~0.12 MiB per photo: a 500-photo
    pool takes ~60 MiB); 0 decodes every serving. Served bytes are fresh either way."""
    renderer: str = "auto"
    """"auto": OpenCV resize + simplejpeg encode where installed, else Pillow; or "pillow"."""
    seed: int | None = None
    """Which challenges are drawn; never the tokens or the image jitter."""
    # Never printed, never a setting read from text (it comes from secret_file or ASIRRA_SECRET), never
    # written to a worker's config.
    secret: bytes | None = field(default=None, repr=False)
    """Master key for cookies and pass tokens; random per process when None."""
    redis_url: str | None = None
    """The shared store; None keeps state in this process."""
    pass_ttl_seconds: float = 120.0
    """A pass token must be verified by the site this soon."""
    verify_rate: float = 100.0
    """/api/verify calls per second per address (a site's server)..."""
    verify_burst: int = 200
    """...after this many at once."""
    max_verify_bytes: int = 2048
    """Secret + token + remote IP, form or JSON."""
    trusted_proxies: tuple[str, ...] = ()
    """Proxies (addresses or networks) whose X-Forwarded-For names the client. None by default: then no
    client can claim another address, and behind a proxy every visitor is the proxy's address."""
    metrics_allow: tuple[str, ...] = ("127.0.0.0/8", "::1")
    """Who may read /metrics: addresses or networks, checked on the connection's own address, and never
    through a proxy (a request carrying X-Forwarded-For is refused). Empty: /metrics is off."""
    access_log: bool = True
    """One structured line per request (rate-limited refusals are counted, not logged)."""

    def __post_init__(self) -> None:
        positive = ("ttl_seconds", "max_challenges", "max_per_client", "challenge_rate",
                    "challenge_burst", "request_rate", "request_burst", "max_body_bytes", "max_clients",
                    "pass_ttl_seconds", "verify_rate", "verify_burst", "max_verify_bytes")
        for name in positive:
            if not getattr(self, name) > 0:
                raise SettingError(name, f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.max_crop < 0.25:
            raise SettingError("max_crop", f"max_crop must be in [0, 0.25), got {self.max_crop}")
        for name in ("image_side", "image_quality"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise SettingError(name, f"{name} must be a range (low, high) with 0 < low <= high")
        if self.image_quality[1] > 100:
            raise SettingError("image_quality", f"image_quality is a JPEG quality, at most 100, "
                                                f"got {self.image_quality[1]}")
        if not self.image_cache_mb >= 0:
            raise SettingError("image_cache_mb", f"image_cache_mb must be 0 or more, got {self.image_cache_mb!r}")
        if self.renderer not in RENDERERS:
            raise SettingError("renderer", f"unknown renderer {self.renderer!r}; choose {', '.join(RENDERERS)}")
        if self.redis_url is not None and not self.redis_url.startswith(REDIS_SCHEMES):
            raise SettingError("redis_url", f"--redis must be a redis://HOST:PORT/DB URL, got {self.redis_url!r}")
        object.__setattr__(self, "trusted_proxies", tuple(proxy_network(p) for p in self.trusted_proxies))
        object.__setattr__(self, "metrics_allow", tuple(network(p, "metrics_allow") for p in self.metrics_allow))

    @property
    def rendering(self) -> RenderSettings:
        """The jitter of every served copy (asirra.captcha.rendering)."""
        return RenderSettings(image_side=self.image_side, image_quality=self.image_quality, max_crop=self.max_crop)

    def to_dict(self) -> dict:
        """Every setting but the secret, as JSON-able values (a worker's config)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "secret"}

    @classmethod
    def from_dict(cls, values: Mapping, secret: bytes | None = None) -> ServiceSettings:
        """`to_dict` read back (JSON turned the tuples into lists).

        Args:
            values: What `to_dict` returned, possibly through JSON.
            secret: The key, which `to_dict` never writes.

        Returns:
            The settings, checked as new ones are.
        """
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()},
                   secret=secret)


def network(text: str, name: str) -> str:
    """An address or network in canonical form ("10.0.0.0/24", "10.0.0.5"); a one-line SettingError otherwise."""
    try:
        net = ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise SettingError(name, f"{name}: {text!r} is not an IP address or network (e.g. 10.0.0.5 or "
                                 "10.0.0.0/24)") from None
    return str(net.network_address if net.num_addresses == 1 else net)


def proxy_network(text: str) -> str:
    """A trusted proxy's address or network in canonical form; one-line SettingError otherwise.

    Everything is refused that would trust any client to name its own address: "*", a /0 network.
    """
    try:
        canonical = network(text, "trusted_proxies")
    except SettingError:
        raise SettingError("trusted_proxies", f"trusted proxy {text!r} is not an IP address or network "
                                              "(e.g. 10.0.0.5 or 10.0.0.0/24)") from None
    if ipaddress.ip_network(canonical).prefixlen == 0:
        raise SettingError("trusted_proxies", f"trusted proxy {text!r} would trust every address to name any client")
    return canonical


@dataclass(frozen=True)
class ServeSettings:
    """`asirra serve`: the process around the app. Secrets are not fields: see `load_serve_settings`."""

    data: str | None = None  # labelled images: the pool challenges are drawn from (required)
    host: str = "127.0.0.1"  # 0.0.0.0 opens it to the network
    port: int = 8000
    workers: int = 1  # more than 1 needs redis_url and a shared secret
    safeguard: str = DEFAULT_SAFEGUARD
    secret_file: str | None = None  # >= 32 random bytes; or ASIRRA_SECRET
    sites_file: str | None = None  # {"sites": [...]}; or ASIRRA_SITES (the same JSON)
    log_format: str = "text"  # the access log and every other log line: text (key=value) or json (one object a line)
    service: ServiceSettings = ServiceSettings()

    def __post_init__(self) -> None:
        if self.data is None or not str(self.data).strip():
            raise SettingError("data", "no images to serve: give --data PATH (or ASIRRA_DATA)")
        if not Path(self.data).exists():
            raise SettingError("data", f"no such file or folder: {self.data}")
        if not _HOST.fullmatch(self.host):
            raise SettingError("host", f"host must be an address to listen on (127.0.0.1, 0.0.0.0, ::), "
                                       f"got {self.host!r}")
        if not 1 <= self.port <= 65535:
            raise SettingError("port", f"port must be 1-65535, got {self.port}")
        if self.workers < 1:
            raise SettingError("workers", f"workers must be at least 1, got {self.workers}")
        if self.log_format not in LOG_FORMATS:
            raise SettingError("log_format", f"log_format must be {' or '.join(LOG_FORMATS)}, got {self.log_format!r}")
        try:
            parse_safeguard(self.safeguard)
        except UserError as exc:
            raise SettingError("safeguard", str(exc)) from None


# ---- reading them -----------------------------------------------------------------------------


def setting_types() -> dict[str, type]:
    """Every setting of `asirra serve` by name (ServeSettings' and ServiceSettings' fields), with its type."""
    serve = {name: kind for name, kind in typing.get_type_hints(ServeSettings).items() if name != "service"}
    service = {name: kind for name, kind in typing.get_type_hints(ServiceSettings).items() if name != "secret"}
    assert not set(serve) & set(service), "a setting name must mean one thing"
    return {**serve, **service}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parse_value(text: str, kind) -> object:
    """A setting's text (an environment variable, a flag, a file value) as `kind`; ValueError says why not."""
    text = text.strip()
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        if text.lower() in ("", "none"):
            return None
        return parse_value(text, next(a for a in args if a is not type(None)))
    if typing.get_origin(kind) is tuple:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if args[-1] is Ellipsis:  # tuple[str, ...]: a list, "none" for an empty one
            return () if text.lower() in ("", "none") else tuple(parse_value(p, args[0]) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"must be {len(args)} comma-separated values, e.g. "
                             f"{','.join(str(i * 100) for i in range(1, len(args) + 1))}")
        return tuple(parse_value(p, a) for p, a in zip(parts, args))
    if kind is bool:
        words = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}
        if text.lower() not in words:
            raise ValueError("must be true or false (also 1/0, yes/no, on/off)")
        return words[text.lower()]
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("must be a whole number") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("must be a number") from None
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    return text


def _file_text(value: object) -> str:
    """A TOML value as the text an environment variable would hold (arrays comma-separated)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_file_text(v) for v in value) if value else "none"
    return str(value)


@dataclass(frozen=True)
class Given:
    """One setting's text and where it came from, for the error that names it."""

    text: str
    source: str  # "ASIRRA_TTL_SECONDS='0'", "--ttl 0", "asirra.toml: ttl_seconds = 0"


def read_config_file(path: str | Path) -> dict[str, Given]:
    """The settings in a TOML file of top-level `name = value` lines; an unknown name or a secret is refused."""
    try:
        payload = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServiceError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ServiceError(f"the config file {path} is not valid TOML: {exc}") from None
    known = setting_types()
    given = {}
    for name, value in payload.items():
        if name in ("secret", "sites"):
            raise ServiceError(f"{path}: {name} is a secret, never a config file value (config files get committed); "
                               f"give {name}_file or {env_name(name)}")
        if name not in known:
            raise ServiceError(f"{path}: unknown setting {name!r}{_suggest(name, known)}")
        if isinstance(value, dict):
            raise ServiceError(f"{path}: {name} must be a value, not a table")
        given[name] = Given(_file_text(value), f"{path}: {name} = {value!r}")
    return given


def read_environment(environ: Mapping[str, str]) -> tuple[dict[str, Given], list[str]]:
    """The settings given as ASIRRA_<NAME>, and a warning for each ASIRRA_* variable that is no setting."""
    known = setting_types()
    given, warnings = {}, []
    for variable, text in sorted(environ.items()):
        if not variable.startswith(ENV_PREFIX) or variable in KNOWN_ELSEWHERE:
            continue
        name = variable[len(ENV_PREFIX):].lower()
        if name in known:
            given[name] = Given(text, f"{variable}={text!r}")
        else:
            warnings.append(f"{variable} is not a setting of asirra serve and is ignored"
                            f"{_suggest(name, known, env=True)}")
    return given, warnings


def _suggest(name: str, known, env: bool = False) -> str:
    close = [k for k in known if k.startswith(name + "_")] or difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {env_name(close[0]) if env else close[0]}?" if close else ""


@dataclass(frozen=True)
class Loaded:
    """What `load_serve_settings` found: the settings, the secrets (never in `settings`) and any warnings."""

    settings: ServeSettings
    secret: bytes | None = field(repr=False)  # from secret_file or ASIRRA_SECRET
    secret_from: str | None  # "file" or "env": how a worker finds it again without it being written down
    sites: Sites | None  # from sites_file or ASIRRA_SITES
    sites_from_env: bool
    warnings: list[str]


def load_serve_settings(flags: Mapping[str, Given] | None = None, environ: Mapping[str, str] | None = None,
                        config_file: str | Path | None = None) -> Loaded:
    """The settings of `asirra serve`: defaults < config file < environment < flags, each value checked.

    `config_file` is `--config` (else ASIRRA_CONFIG names it). A bad value raises a one-line ServiceError
    naming the flag, variable or file line it came from.
    """
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get(CONFIG_ENV) or None
    given: dict[str, Given] = dict(read_config_file(config_file)) if config_file else {}
    from_env, warnings = read_environment(environ)
    given.update(from_env)
    given.update(flags or {})

    kinds = setting_types()
    values = {}
    for name, item in given.items():
        try:
            values[name] = parse_value(item.text, kinds[name])
        except ValueError as exc:
            raise ServiceError(f"{item.source}: {name} {exc}") from None
    service_names = {f.name for f in fields(ServiceSettings)}
    try:
        service = ServiceSettings(**{k: v for k, v in values.items() if k in service_names})
        settings = ServeSettings(**{k: v for k, v in values.items() if k not in service_names}, service=service)
    except SettingError as exc:
        raise ServiceError(_from(given, exc.name, exc)) from None

    secret, secret_from = read_secret(settings, environ, given)
    sites = read_sites(settings, environ, given)
    check_deployment(settings, secret is not None)
    return Loaded(replace(settings, service=replace(settings.service, secret=secret)), secret, secret_from, sites,
                  sites_from_env=bool(environ.get(SITES_ENV)), warnings=warnings)


def read_secret(settings: ServeSettings, environ: Mapping[str, str], given: Mapping[str, Given]):
    """(the master secret, "file" or "env"), or (None, None) for a random one per process."""
    secret_text = environ.get(SECRET_ENV)
    if secret_text and settings.secret_file:
        raise ServiceError(f"give the secret once: {SECRET_ENV} or secret_file ({settings.secret_file}), not both")
    try:
        if settings.secret_file:
            return read_secret_file(settings.secret_file), "file"
        if secret_text:
            return check_secret(secret_text.encode().strip(), SECRET_ENV), "env"
    except ClientConfigError as exc:
        raise ServiceError(_from(given, "secret_file", exc)) from None
    return None, None


def read_sites(settings: ServeSettings, environ: Mapping[str, str], given: Mapping[str, Given]) -> Sites | None:
    sites_text = environ.get(SITES_ENV)
    if sites_text and settings.sites_file:
        raise ServiceError(f"give the sites once: {SITES_ENV} or sites_file ({settings.sites_file}), not both")
    try:
        if settings.sites_file:
            return load_sites(settings.sites_file)
        return load_sites_text(sites_text, SITES_ENV) if sites_text else None
    except ClientConfigError as exc:
        raise ServiceError(_from(given, "sites_file", exc)) from None


def _from(given: Mapping[str, Given], name: str, exc: Exception) -> str:
    """`exc`'s message, after the flag, variable or file line that gave `name` (if one did)."""
    return f"{given[name].source}: {exc}" if name in given else str(exc)


def check_deployment(settings: ServeSettings, has_secret: bool) -> None:
    """What several processes need to act as one service: shared state and a shared key."""
    if settings.workers > 1 and not settings.service.redis_url:
        raise ServiceError("--workers above 1 needs --redis: in-process state cannot be shared between worker "
                           "processes")
    if settings.service.redis_url and not has_secret:
        raise ServiceError("--redis needs --secret-file (or ASIRRA_SECRET), so that every worker and restart signs "
                           "cookies and pass tokens alike")


def defaults() -> dict[str, object]:
    """Every setting's default by name (for help texts and the README's table)."""
    found = {}
    for cls in (ServeSettings, ServiceSettings):
        for f in fields(cls):
            if f.name not in ("service", "secret"):
                found[f.name] = f.default if f.default is not MISSING else f.default_factory()
    return found
