"""`asirra serve --redis --workers 2` as real uvicorn worker processes sharing one real redis-server.

Every request below opens a fresh connection, so the kernel hands them to either worker; /healthz
names the worker that answered, which shows both took part.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from captcha_service_support import ColourClassifier, make_pool, serving
from redis_support import redis_server  # noqa: F401  (fixture)

from asirra.captcha.service.clients import Site

SITE = Site("worker-test-site", "worker-test-secret-" + "w" * 20)
pytestmark = pytest.mark.slow


@pytest.fixture
def service_args(tmp_path, redis_server):
    make_pool(tmp_path / "pool", cats=15, dogs=15)
    (tmp_path / "secret").write_text("a shared secret of at least 32 bytes\n")
    (tmp_path / "sites.json").write_text(json.dumps({"sites": [{"key": SITE.key, "secret": SITE.secret}]}))
    return ["--data", str(tmp_path / "pool"), "--redis", redis_server.url, "--secret-file", str(tmp_path / "secret"),
            "--sites", str(tmp_path / "sites.json"), "--challenge-rate", "1000"]


def _workers_seen(url: str, want: int = 2, tries: int = 200) -> set[int]:
    seen = set()
    for _ in range(tries):
        seen.add(httpx.get(f"{url}/healthz", timeout=5).json()["worker"])
        if len(seen) >= want:
            break
    return seen


def _challenge(url: str, sitekey: str | None = None) -> tuple[dict, list[int]]:
    """A challenge and its answer, read off its images by colour (the test knows no more than a client)."""
    params = {"sitekey": sitekey} if sitekey else None
    challenge = httpx.post(f"{url}/api/challenge", params=params, timeout=5).json()
    cats = ColourClassifier().solve([httpx.get(url + image, timeout=5).content for image in challenge["images"]])
    return challenge, [i for i, cat in enumerate(cats) if cat]


def _answer(url: str, challenge: dict, selected: list[int]) -> httpx.Response:
    return httpx.post(f"{url}/api/challenge/{challenge['id']}/answer", json={"selected": selected}, timeout=5)


def _verify(url: str, token: str) -> dict:
    return httpx.post(f"{url}/api/verify", data={"secret": SITE.secret, "response": token}, timeout=5).json()


def test_two_worker_processes_accept_one_answer_once(tmp_path, service_args):
    with serving([*service_args, "--workers", "2"], tmp_path / "serve.log") as (url, _):
        assert len(_workers_seen(url)) == 2
        challenge, selected = _challenge(url)

        async def race() -> list[int]:
            limits = httpx.Limits(max_keepalive_connections=0)  # a new connection, maybe another worker, each time
            async with httpx.AsyncClient(limits=limits, timeout=10) as client:
                replies = await asyncio.gather(*(
                    client.post(f"{url}/api/challenge/{challenge['id']}/answer", json={"selected": selected})
                    for _ in range(20)))
            return sorted(reply.status_code for reply in replies)

        assert asyncio.run(race()) == [200] + [409] * 19
        token = _answer(url, *_challenge(url, SITE.key)).json()["token"]
        verdicts = [_verify(url, token) for _ in range(6)]
        assert [v["success"] for v in verdicts] == [True] + [False] * 5
        assert all(v["error-codes"] == ["timeout-or-duplicate"] for v in verdicts[1:])


def test_two_worker_processes_report_one_sum_in_every_scrape(tmp_path, service_args):
    """Each worker counts its own requests; whichever answers /metrics sums them all (prometheus-client's
    multiprocess mode, in a folder `asirra serve` makes for it)."""
    from prometheus_client.parser import text_string_to_metric_families

    with serving([*service_args, "--workers", "2"], tmp_path / "serve.log") as (url, _):
        assert len(_workers_seen(url)) == 2
        limits = httpx.Limits(max_keepalive_connections=0)  # a new connection each time: either worker answers
        with httpx.Client(base_url=url, limits=limits, timeout=10) as client:
            for _ in range(20):
                assert client.post("/api/challenge").status_code == 200
            issued, scraped_by = [], set()
            for _ in range(10):
                scrape = client.get("/metrics")
                issued.append(sum(s.value for f in text_string_to_metric_families(scrape.text) for s in f.samples
                                  if s.name == "asirra_challenges_issued_total"))
                scraped_by.add(client.get("/healthz").json()["worker"])
    assert issued == [20] * 10 and len(scraped_by) == 2


def test_challenge_rate_limit_holds_across_worker_processes(tmp_path, service_args):
    args = [arg if arg != "1000" else "0.01" for arg in service_args]  # --challenge-rate 0.01: a burst of 10, then 429
    with serving([*args, "--workers", "2"], tmp_path / "serve.log") as (url, _):
        assert len(_workers_seen(url)) == 2
        statuses = [httpx.post(f"{url}/api/challenge", timeout=5).status_code for _ in range(14)]
        assert statuses == [200] * 10 + [429] * 4


def test_killed_worker_and_restarted_service_lose_no_challenge_or_token(tmp_path, service_args):
    with serving([*service_args, "--workers", "2"], tmp_path / "first.log") as (url, _):
        workers = _workers_seen(url)
        outstanding, selected = _challenge(url)
        token = _answer(url, *_challenge(url, SITE.key)).json()["token"]
        killed = min(workers)
        os.kill(killed, signal.SIGKILL)  # one worker dies; uvicorn starts another
        deadline = time.monotonic() + 60
        while len(_workers_seen(url) - {killed}) < 2:
            assert time.monotonic() < deadline, "no replacement worker came up"
            time.sleep(0.2)
        survivor, survivor_answer = _challenge(url)
    with serving([*service_args, "--workers", "2"], tmp_path / "second.log") as (url, _):  # a whole restart
        assert _answer(url, outstanding, selected).json()["result"] == "pass"
        assert _answer(url, survivor, survivor_answer).json()["result"] == "pass"
        assert _verify(url, token)["success"] is True
