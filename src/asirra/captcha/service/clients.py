"""What the live service remembers about each client: who it is, how fast it asks, how it has answered.

A client is known two ways at once: by a signed random cookie, and by its IP address. The cookie
tells apart people behind one address (an office NAT); the address keeps tracking a bot that
simply drops its cookie. Every table here is bounded (least recently seen entries are forgotten
first), so a flood of new cookies or addresses costs memory in proportion to the bound, not to
the flood.

Sites are clients too: a web site that embeds the CAPTCHA holds a public site key (sent with
each challenge request) and a secret (sent server to server to /api/verify). A passed challenge
earns a pass token bound to its site key; the token's MAC proves the service minted it for that
site, and the store (single use, short expiry) proves it was not spent yet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

from asirra.captcha.safeguards import Safeguard, Verdict
from asirra.errors import ConfigError

T = TypeVar("T")

# Worst first: when the cookie's history and the address's history disagree, the stricter wins.
_SEVERITY = {"fail": 2, "almost": 1, "pass": 0}


class BoundedTable(Generic[T]):
    """A dict that forgets its least recently used entry beyond `capacity`, safe across threads."""

    def __init__(self, capacity: int, make: Callable[[], T]):
        self._capacity = capacity
        self._make = make
        self._entries: OrderedDict[str, T] = OrderedDict()
        self.lock = threading.Lock()
        self.created = 0  # entries ever made (monotonic; forgotten ones included): the service's own counter

    def get(self, key: str) -> T:
        """The entry for `key`, created if new; callers hold `lock` while they use it."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        entry = self._entries[key] = self._make()
        self.created += 1
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return entry

    def __len__(self) -> int:
        return len(self._entries)


class CookieSigner:
    """Issues random client ids and recognises only the ones it issued (HMAC-SHA256)."""

    def __init__(self, secret: bytes | None = None):
        self._key = secret or secrets.token_bytes(32)

    def _mac(self, client_id: str) -> str:
        return hmac.new(self._key, client_id.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self) -> tuple[str, str]:
        """A new (client id, cookie value)."""
        client_id = secrets.token_urlsafe(16)
        return client_id, f"{client_id}.{self._mac(client_id)}"

    def verify(self, cookie: str | None) -> str | None:
        """The client id inside a genuine cookie, or None for a missing, forged or mangled one."""
        client_id, _, mac = (cookie or "").partition(".")
        if client_id and hmac.compare_digest(mac, self._mac(client_id)):
            return client_id
        return None


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.tokens, self.stamp = tokens, stamp


class RateLimiter:
    """A token bucket per key: `burst` requests at once, then `rate` per second."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float], capacity: int = 100_000):
        self._rate, self._burst, self._clock = rate, burst, clock
        self._buckets = BoundedTable(capacity, lambda: _Bucket(float(burst), clock()))

    def take(self, key: str) -> float:
        """Spend one token: 0.0 if allowed, else the seconds to wait before one is available."""
        with self._buckets.lock:
            bucket = self._buckets.get(key)
            now = self._clock()
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self._rate

    @property
    def keys_created(self) -> int:
        """Clients (keys) this limiter has ever started a bucket for."""
        return self._buckets.created


class SafeguardStates:
    """The safeguard's per-client state, kept separately per cookie and per IP address.

    Separate tables so that minting thousands of cookies cannot push the addresses' histories
    out of memory. Each answer is judged against both histories and the stricter verdict wins;
    the price is that people sharing one address share that address's history.
    """

    def __init__(self, safeguard: Safeguard, capacity: int = 100_000):
        self.safeguard = safeguard
        self._tables = {
            kind: BoundedTable(capacity, safeguard.new_state) for kind in ("cookie", "ip")
        }

    def judge(self, cookie_id: str, ip: str, mistakes: int) -> Verdict:
        verdicts = [
            self._judge_one(self._tables["cookie"], cookie_id, mistakes),
            self._judge_one(self._tables["ip"], ip, mistakes),
        ]
        return worst(verdicts)

    def states_created(self) -> dict[str, int]:
        """Histories ever started, per kind ("cookie", "ip"): a client that comes back fresh each time adds one of each."""
        return {kind: table.created for kind, table in self._tables.items()}

    def _judge_one(self, table: BoundedTable, key: str, mistakes: int) -> Verdict:
        with table.lock:
            return self.safeguard.judge(table.get(key), mistakes)


def worst(verdicts: Iterable[Verdict]) -> Verdict:
    return max(verdicts, key=_SEVERITY.__getitem__)


# ---- keys shared by every worker, and the sites that use the service -----------------------

MIN_SECRET_BYTES = 32
SITE_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")
MIN_SITE_SECRET, MAX_SITE_SECRET = 32, 256
_TOKEN = re.compile(r"([A-Za-z0-9_-]{32})\.([A-Za-z0-9_-]{43})")


class ClientConfigError(ConfigError):
    """A secret file or a sites file the service cannot use; the message is one line."""


def read_secret_file(path: str | Path) -> bytes:
    """The service's master secret: at least 32 bytes (surrounding whitespace ignored)."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ClientConfigError(f"cannot read the secret file {path}: {exc.strerror or exc}") from None
    return check_secret(secret, f"the secret file {path}")


def check_secret(secret: bytes, where: str) -> bytes:
    """`secret` if it is long enough to be a key, else a one-line error saying how to make one."""
    if len(secret) < MIN_SECRET_BYTES:
        raise ClientConfigError(
            f"{where} holds {len(secret)} bytes; it needs at least {MIN_SECRET_BYTES} random ones "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return secret


def derive_key(secret: bytes, purpose: str) -> bytes:
    """One key per purpose from the master secret, so a cookie MAC can never pass for a token MAC."""
    return hmac.new(secret, f"asirra/{purpose}".encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class Site:
    key: str  # public: the site's pages send it with each challenge request
    secret: str = field(repr=False)  # private: the site's server sends it to /api/verify
    name: str = ""
    # Where the site's pages may show the widget: bare hostnames ("shop.example"), IP literals, or
    # "*.shop.example" (any subdomain, not the apex). None registered: the widget is refused for the site.
    hostnames: tuple[str, ...] = ()

    def allows(self, hostname: str) -> bool:
        """Whether a page on `hostname` may ask for this site's challenges (case and a trailing dot ignored)."""
        hostname = hostname.lower().rstrip(".")
        return any(hostname == allowed or (allowed.startswith("*.") and hostname.endswith(allowed[1:]))
                   for allowed in self.hostnames)


class Sites:
    """The sites allowed to request challenges and verify pass tokens."""

    def __init__(self, sites: Iterable[Site] = ()):
        self._sites = list(sites)
        self._by_key = {site.key: site for site in self._sites}

    def known(self, key: str) -> bool:
        return key in self._by_key

    def get(self, key: str) -> Site | None:
        return self._by_key.get(key)

    def by_secret(self, secret: str) -> Site | None:
        """The site holding `secret`, comparing against every site in constant time."""
        found = None
        for site in self._sites:
            if hmac.compare_digest(site.secret.encode(), secret.encode()):
                found = site
        return found

    def __iter__(self):
        return iter(self._sites)

    def __len__(self) -> int:
        return len(self._sites)


def load_sites(path: str | Path) -> Sites:
    """Sites from a JSON file: {"sites": [{"key": "...", "secret": "...", "name": "...", "hostnames": [...]}]}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ClientConfigError(f"cannot read the sites file {path}: {exc.strerror or exc}") from None
    return load_sites_text(text, f"the sites file {path}")


def load_sites_text(text: str, where: str = "ASIRRA_SITES") -> Sites:
    """Sites from their JSON text (a file's, or the ASIRRA_SITES variable's); `where` names it in errors."""
    try:
        payload = json.loads(text)
    except ValueError as exc:
        raise ClientConfigError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or set(payload) != {"sites"} or not isinstance(payload["sites"], list):
        raise ClientConfigError(f'{where} must hold {{"sites": [{{"key": ..., "secret": ...}}, ...]}}')
    sites = [_site(entry, f"site {i} in {where}") for i, entry in enumerate(payload["sites"])]
    for name in ("key", "secret"):
        values = [getattr(site, name) for site in sites]
        if len(set(values)) != len(values):
            raise ClientConfigError(f"{where} gives two sites the same {name}")
    return Sites(sites)


SITE_FIELDS = {"key", "secret", "name", "hostnames"}
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
MAX_HOSTNAMES = 50


def _site(entry: object, where: str) -> Site:
    if not isinstance(entry, dict) or not {"key", "secret"} <= set(entry) <= SITE_FIELDS:
        raise ClientConfigError(f'{where} must be an object with "key", "secret" and optionally "name", "hostnames"')
    if not all(isinstance(entry[name], str) for name in ("key", "secret", "name") if name in entry):
        raise ClientConfigError(f"{where}: key, secret and name must be strings")
    if not SITE_KEY.fullmatch(entry["key"]):
        raise ClientConfigError(f"{where}: the key must be 8-64 characters of A-Z a-z 0-9 _ -")
    if not MIN_SITE_SECRET <= len(entry["secret"]) <= MAX_SITE_SECRET or not entry["secret"].isprintable() \
            or any(c.isspace() for c in entry["secret"]):
        raise ClientConfigError(f"{where}: the secret must be {MIN_SITE_SECRET}-{MAX_SITE_SECRET} printable "
                                "characters without spaces")
    hostnames = entry.get("hostnames")
    if hostnames is not None:
        if not isinstance(hostnames, list) or not 1 <= len(hostnames) <= MAX_HOSTNAMES:
            raise ClientConfigError(f"{where}: hostnames must be a list of 1-{MAX_HOSTNAMES} names "
                                    "(leave it out to register none)")
        hostnames = tuple(registered_hostname(name, where) for name in hostnames)
    return Site(entry["key"], entry["secret"], entry.get("name", ""), hostnames or ())


def registered_hostname(name: object, where: str) -> str:
    """A hostname a site registers: "shop.example", "*.shop.example" or an IP literal, lower-cased."""
    if not isinstance(name, str):
        raise ClientConfigError(f"{where}: every hostname must be a string")
    text = name.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        pass
    labels = (text[2:] if text.startswith("*.") else text).split(".")
    if not text or len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels) \
            or (text.startswith("*.") and len(labels) < 2):
        raise ClientConfigError(f"{where}: hostname {name!r} must be a bare hostname like shop.example or "
                                "*.shop.example (no scheme, port or path)")
    return text


class PassTokens:
    """Mints pass tokens "<nonce>.<MAC of nonce and site key>" and opens only genuine ones.

    The MAC binds a token to its site without storing anything; the nonce is what the store
    keeps (and deletes on first use), which makes the token single-use and short-lived.
    """

    def __init__(self, key: bytes | None = None):
        self._key = key or secrets.token_bytes(32)

    def _mac(self, nonce: str, sitekey: str) -> str:
        digest = hmac.new(self._key, f"{nonce}.{sitekey}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def mint(self, sitekey: str) -> tuple[str, str]:
        """A new (nonce, token) for `sitekey`."""
        nonce = secrets.token_urlsafe(24)
        return nonce, f"{nonce}.{self._mac(nonce, sitekey)}"

    def open(self, token: str, sitekey: str) -> str | None:
        """The nonce of a token minted here for `sitekey`; None for a forged, mangled or other site's one."""
        match = _TOKEN.fullmatch(token)
        if match and hmac.compare_digest(match[2], self._mac(match[1], sitekey)):
            return match[1]
        return None
