"""Which address a client is: its own connection's, unless a trusted proxy names it (X-Forwarded-For).

Real sockets on loopback: clients connect from chosen 127.0.0.x addresses, so the service sees the peer
address exactly as it would behind (or without) a reverse proxy.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace

import httpx
import pytest
from captcha_service_support import GENEROUS, make_pool, serving

from asirra.captcha.safeguards import parse_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.run import running
from asirra.captcha.service.settings import ServiceError, ServiceSettings

# One new challenge per client, then a wait: the challenge rate limit is what tells clients apart here.
ONE_CHALLENGE = replace(GENEROUS, challenge_rate=0.001, challenge_burst=1)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), cats=12, dogs=12)


def client_from(url: str, address: str) -> httpx.Client:
    """A client whose connections come from `address` (any 127.0.0.x is this machine)."""
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=10)


def new_challenge(client: httpx.Client, forwarded_for: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return client.post("/api/challenge", headers=headers).status_code


def test_without_a_trusted_proxy_a_forged_address_changes_nothing(pool, caplog):
    app = create_app(pool, parse_safeguard("none"), ONE_CHALLENGE)
    with running(app) as url, client_from(url, "127.0.0.2") as client, caplog.at_level(logging.WARNING):
        assert new_challenge(client) == 200
        # Claiming to be someone else does not reset this client's limit: it is still 127.0.0.2.
        assert [new_challenge(client, f"203.0.113.{i}") for i in range(3)] == [429, 429, 429]
    assert sum("X-Forwarded-For from 127.0.0.2 ignored" in r.message for r in caplog.records) == 1  # said once


def test_behind_a_trusted_proxy_each_client_it_names_has_its_own_limits(pool):
    app = create_app(pool, parse_safeguard("none"), replace(ONE_CHALLENGE, trusted_proxies=("127.0.0.3",)))
    with running(app) as url, client_from(url, "127.0.0.3") as proxy, client_from(url, "127.0.0.4") as direct:
        assert new_challenge(proxy, "198.51.100.7") == 200
        assert new_challenge(proxy, "198.51.100.7") == 429  # the same visitor, limited
        assert new_challenge(proxy, "198.51.100.8") == 200  # another visitor behind the same proxy
        # The proxy appends the address it saw: a visitor's own forged entry further left does not count.
        assert new_challenge(proxy, "10.9.9.9, 198.51.100.8") == 429
        # A client that is not the proxy cannot name anyone.
        assert new_challenge(direct) == 200
        assert new_challenge(direct, "198.51.100.99") == 429


def test_safeguard_state_follows_the_address_the_trusted_proxy_names(pool):
    settings = replace(GENEROUS, trusted_proxies=("127.0.0.0/24",))
    app = create_app(pool, parse_safeguard("token-bucket:capacity=1"), settings)
    with running(app) as url, client_from(url, "127.0.0.5") as proxy:
        def answer_wrong(visitor: str) -> str:
            headers = {"X-Forwarded-For": visitor}
            proxy.cookies.clear()  # a bot drops its cookie; its address still counts
            challenge = proxy.post("/api/challenge", headers=headers).json()
            answer = sorted(app.state.store.peek(challenge["id"]).challenge.answer)
            wrong = answer[1:] if answer else [0]
            return proxy.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": wrong},
                              headers=headers).json()["result"]

        def answer_right(visitor: str) -> str:
            headers = {"X-Forwarded-For": visitor}
            proxy.cookies.clear()
            challenge = proxy.post("/api/challenge", headers=headers).json()
            answer = sorted(app.state.store.peek(challenge["id"]).challenge.answer)
            return proxy.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": answer},
                              headers=headers).json()["result"]

        assert answer_wrong("198.51.100.1") == "fail"  # empties 198.51.100.1's bucket (capacity 1)
        assert answer_right("198.51.100.1") == "fail"  # its bucket is empty: a right answer only refills it
        assert answer_right("198.51.100.2") == "pass"  # another visitor's bucket is full


@pytest.mark.parametrize("bad", ["nginx", "*", "0.0.0.0/0", "::/0", "10.0.0.300"])
def test_a_proxy_setting_that_would_trust_anyone_or_nothing_is_refused(bad):
    with pytest.raises(ServiceError, match="trusted proxy"):
        ServiceSettings(trusted_proxies=(bad,))
    assert ServiceSettings(trusted_proxies=("10.0.0.7", "10.1.0.0/16 ")).trusted_proxies == ("10.0.0.7", "10.1.0.0/16")


def test_serve_takes_trusted_proxies_and_refuses_a_bad_one_in_one_line(tmp_path):
    make_pool(tmp_path / "pool", cats=12, dogs=12)
    with serving(["--data", str(tmp_path / "pool"), "--challenge-rate", "0.001", "--trusted-proxy", "127.0.0.6"],
                 tmp_path / "serve.log") as (url, _):
        with client_from(url, "127.0.0.6") as proxy:
            assert [new_challenge(proxy, "198.51.100.1"), new_challenge(proxy, "198.51.100.2")] == [200, 200]
            # Up to the burst of 10 per visitor; a visitor who asks for more is limited.
            assert 429 in [new_challenge(proxy, "198.51.100.3") for _ in range(12)]
    refused = subprocess.run([sys.executable, "-m", "asirra", "serve", "--data", str(tmp_path / "pool"),
                              "--trusted-proxy", "everyone"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "trusted proxy 'everyone'" in refused.stderr
