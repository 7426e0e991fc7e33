"""`asirra serve` behind a real nginx, configured as docs/guides/deploying.md says: with nginx trusted,
two visitors behind it have their own rate limits and safeguard state and cannot forge each other's
address; without it, every visitor is nginx (which is why the setting exists, and why the service says so)."""

from __future__ import annotations

import httpx
import pytest
from captcha_service_support import ColourClassifier, make_pool, serving
from nginx_support import nginx_binary, nginx_in_front_of

pytestmark = pytest.mark.slow


def visitor(url: str, address: str) -> httpx.Client:
    """A visitor whose connections to nginx come from `address` (any 127.0.0.x is this machine)."""
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=10)


def new_challenge(client: httpx.Client, **headers) -> httpx.Response:
    client.cookies.clear()  # a bot drops its cookie: only its address can tie its requests together
    return client.post("/api/challenge", headers=headers)


def solve(client: httpx.Client, right: bool) -> str:
    challenge = new_challenge(client).json()
    cats = ColourClassifier(flip=not right).solve([client.get(url).content for url in challenge["images"]])
    selected = [i for i, cat in enumerate(cats) if cat]
    return client.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": selected}).json()["result"]


@pytest.fixture
def pool(tmp_path):
    nginx_binary()  # skip (or, in CI, fail) before starting anything
    make_pool(tmp_path / "pool", cats=15, dogs=15)
    return tmp_path / "pool"


def test_behind_trusted_nginx_two_visitors_have_their_own_limits_and_safeguard_state(tmp_path, pool):
    # The default safeguard (token bucket of capacity 1) and a burst of 10 challenges per address.
    args = ["--data", str(pool), "--challenge-rate", "0.01", "--trusted-proxy", "127.0.0.1"]
    with serving(args, tmp_path / "serve.log") as (service, _), \
            nginx_in_front_of(int(service.rsplit(":", 1)[1]), tmp_path / "nginx") as proxy, \
            visitor(proxy, "127.0.0.5") as bot, visitor(proxy, "127.0.0.6") as person:
        assert solve(bot, right=False) == "fail"  # empties the bot's bucket...
        assert solve(bot, right=True) == "fail"  # ...so its next right answer fails too
        assert solve(person, right=True) == "pass"  # the person's bucket is their own
        statuses = [new_challenge(bot).status_code for _ in range(10)]
        assert statuses.count(200) == 8 and statuses[-1] == 429  # 2 of its burst of 10 were spent above
        assert new_challenge(person).status_code == 200  # the person is not limited with the bot
        # The bot claims to be the person: nginx appends the address it really came from, and that one counts.
        assert new_challenge(bot, **{"X-Forwarded-For": "127.0.0.6"}).status_code == 429
        assert new_challenge(person).status_code == 200
    assert "ignored: not a trusted proxy" not in (tmp_path / "serve.log").read_text()


def test_behind_untrusted_nginx_every_visitor_is_nginx(tmp_path, pool):
    args = ["--data", str(pool), "--challenge-rate", "0.01"]
    with serving(args, tmp_path / "serve.log") as (service, _), \
            nginx_in_front_of(int(service.rsplit(":", 1)[1]), tmp_path / "nginx") as proxy, \
            visitor(proxy, "127.0.0.5") as bot, visitor(proxy, "127.0.0.6") as person:
        assert solve(bot, right=False) == "fail"
        assert solve(person, right=True) == "fail"  # one bucket for everyone behind nginx: the person pays
        assert [new_challenge(bot).status_code for _ in range(8)] == [200] * 8  # 10 in all: the shared burst
        assert new_challenge(person).status_code == 429
    assert "X-Forwarded-For from 127.0.0.1 ignored: not a trusted proxy" in (tmp_path / "serve.log").read_text()
