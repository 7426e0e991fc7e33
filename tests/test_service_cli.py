"""`asirra serve` as a user runs it: each option reaches the running service, and bad ones are refused in one line."""

from __future__ import annotations

import httpx
import pytest
from captcha_service_support import ColourClassifier, free_port, make_pool, serving
from typer.testing import CliRunner

from asirra.cli import app as cli


def _solve(client: httpx.Client, challenge: dict, right: bool) -> str:
    cats = ColourClassifier(flip=not right).solve([client.get(url).content for url in challenge["images"]])
    selected = [i for i, cat in enumerate(cats) if cat]
    return client.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": selected}).json()["result"]


@pytest.mark.slow
def test_serve_options_reach_the_running_service(tmp_path):
    make_pool(tmp_path / "pool", cats=15, dogs=15)
    args = ["--data", str(tmp_path / "pool"), "--ttl", "7", "--challenge-rate", "0.01",
            "--safeguard", "token-bucket:capacity=1", "--seed", "3"]
    with serving(args, tmp_path / "serve.log") as (url, _), httpx.Client(base_url=url, timeout=10) as client:
        challenges = [client.post("/api/challenge") for _ in range(10)]  # the burst of 10
        assert all(reply.status_code == 200 for reply in challenges)
        assert challenges[0].json()["expires_in"] == 7  # --ttl
        refused = client.post("/api/challenge")
        assert refused.status_code == 429 and 90 <= int(refused.headers["retry-after"]) <= 100  # 1 / 0.01 s
        # Capacity 1: one failure empties the bucket, so the next right answer still fails.
        # (The per-client cap of 8 replaced the first two challenges; the last ones are live.)
        assert _solve(client, challenges[-2].json(), right=False) == "fail"
        assert _solve(client, challenges[-1].json(), right=True) == "fail"


def _serve(tmp_path, *args):
    make_pool(tmp_path / "pool", cats=6, dogs=6)
    return CliRunner().invoke(cli, ["serve", "--data", str(tmp_path / "pool"), *args])


def test_serve_refuses_several_workers_without_redis(tmp_path):
    result = _serve(tmp_path, "--workers", "2")
    assert result.exit_code == 2 and "error: --workers above 1 needs --redis" in result.output


def test_serve_refuses_redis_without_a_secret_file(tmp_path):
    result = _serve(tmp_path, "--redis", "redis://127.0.0.1:1/0")
    assert result.exit_code == 2 and "error: --redis needs --secret-file" in result.output


@pytest.mark.parametrize("content, words", [(None, "cannot read the secret file"), (b"too short\n", "at least 32")])
def test_serve_refuses_a_missing_or_short_secret_file(tmp_path, content, words):
    secret = tmp_path / "secret"
    if content is not None:
        secret.write_bytes(content)
    result = _serve(tmp_path, "--secret-file", str(secret))
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output


def test_serve_refuses_a_bad_sites_file_or_redis_url(tmp_path):
    (tmp_path / "sites.json").write_text('{"sites": [{"key": "k"}]}')
    (tmp_path / "secret").write_text("s" * 32)
    bad_sites = _serve(tmp_path, "--sites", str(tmp_path / "sites.json"))
    assert bad_sites.exit_code == 2 and "error: --sites " in bad_sites.output and ": site 0 in" in bad_sites.output
    bad_url = _serve(tmp_path, "--redis", "http://127.0.0.1/0", "--secret-file", str(tmp_path / "secret"))
    assert bad_url.exit_code == 2 and "--redis must be a redis://" in bad_url.output


def test_serve_says_so_when_redis_cannot_be_reached(tmp_path):
    (tmp_path / "secret").write_text("s" * 32)
    result = _serve(tmp_path, "--redis", f"redis://127.0.0.1:{free_port()}/0", "--secret-file", str(tmp_path / "secret"))
    assert result.exit_code == 2 and "error: cannot use Redis at redis://127.0.0.1:" in result.output
