"""How the live service is configured: one frozen dataclass, validated when it is made.

The command line (`asirra serve`), the worker processes of `--workers N` and the tests all build
their app from a ServiceSettings; every default lives here (the served-image jitter's in
asirra.captcha.rendering.RenderSettings) and the CLI's help reads it from here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from asirra.captcha.rendering import RenderSettings
from asirra.errors import ConfigError

_RENDER = RenderSettings()
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
RENDERERS = ("auto", "pillow")
DEFAULT_SAFEGUARD = "none"  # the verdict policy `asirra serve` starts with (asirra.captcha.safeguards)


class ServiceError(ConfigError):
    """Settings or a pool the service cannot run with."""


@dataclass(frozen=True)
class ServiceSettings:
    ttl_seconds: float = 120.0  # a person needs ~30 s for 12 photos; a bot needs far less
    max_challenges: int = 10_000  # outstanding, across all clients: bounds memory
    max_per_client: int = 8  # outstanding per IP; a newer challenge evicts the oldest
    challenge_rate: float = 1.0  # new challenges per second per IP, sustained...
    challenge_burst: int = 10  # ...after this many at once
    request_rate: float = 40.0  # any /api request per second per IP (12 images per challenge)
    request_burst: int = 120
    max_body_bytes: int = 1024  # an answer is at most ~60 bytes of JSON
    max_clients: int = 100_000  # per-client tables forget the least recently seen beyond this
    image_side: tuple[int, int] = _RENDER.image_side  # longest side of a served image, drawn per request
    image_quality: tuple[int, int] = _RENDER.image_quality
    max_crop: float = _RENDER.max_crop  # fraction trimmed from each edge, drawn per request
    # Decoded pool photos kept in memory per worker, at most this many MiB (~0.12 MiB per photo: a 500-photo
    # pool takes ~60 MiB); 0 decodes every serving. Served bytes are fresh either way.
    image_cache_mb: float = 256.0
    renderer: str = "auto"  # "auto": OpenCV resize + simplejpeg encode where installed, else Pillow; "pillow"
    seed: int | None = None  # which challenges are drawn; never the tokens or the image jitter
    secret: bytes | None = None  # master key for cookies and pass tokens; random per process when None
    redis_url: str | None = None  # the shared store; None keeps state in this process
    pass_ttl_seconds: float = 120.0  # a pass token must be verified by the site this soon
    verify_rate: float = 100.0  # /api/verify calls per second per address (a site's server)...
    verify_burst: int = 200
    max_verify_bytes: int = 2048  # secret + token + remote IP, form or JSON
    # Proxies (addresses or networks) whose X-Forwarded-For names the client. None by default: then no
    # client can claim another address, and behind a proxy every visitor is the proxy's address.
    trusted_proxies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        positive = ("ttl_seconds", "max_challenges", "max_per_client", "challenge_rate",
                    "challenge_burst", "request_rate", "request_burst", "max_body_bytes", "max_clients",
                    "pass_ttl_seconds", "verify_rate", "verify_burst", "max_verify_bytes")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ServiceError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 <= self.max_crop < 0.25:
            raise ServiceError(f"max_crop must be in [0, 0.25), got {self.max_crop}")
        for name in ("image_side", "image_quality"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ServiceError(f"{name} must be a range (low, high) with 0 < low <= high")
        if not self.image_cache_mb >= 0:
            raise ServiceError(f"image_cache_mb must be 0 or more, got {self.image_cache_mb!r}")
        if self.renderer not in RENDERERS:
            raise ServiceError(f"unknown renderer {self.renderer!r}; choose {', '.join(RENDERERS)}")
        if self.redis_url is not None and not self.redis_url.startswith(REDIS_SCHEMES):
            raise ServiceError(f"--redis must be a redis://HOST:PORT/DB URL, got {self.redis_url!r}")
        object.__setattr__(self, "trusted_proxies", tuple(proxy_network(p) for p in self.trusted_proxies))

    @property
    def rendering(self) -> RenderSettings:
        """The jitter of every served copy (asirra.captcha.rendering)."""
        return RenderSettings(image_side=self.image_side, image_quality=self.image_quality, max_crop=self.max_crop)


def proxy_network(text: str) -> str:
    """A trusted proxy's address or network in canonical form ("10.0.0.0/24"); one-line ServiceError otherwise.

    Everything is refused that would trust any client to name its own address: "*", a /0 network.
    """
    try:
        network = ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ServiceError(f"trusted proxy {text!r} is not an IP address or network (e.g. 10.0.0.5 or "
                           "10.0.0.0/24)") from None
    if network.prefixlen == 0:
        raise ServiceError(f"trusted proxy {text!r} would trust every address to name any client")
    return str(network.network_address if network.num_addresses == 1 else network)

