"""The HTTP attacker: it solves what its classifier gets right, and counts refusals instead of crashing."""

from __future__ import annotations

import socket

import httpx
import pytest
from typer.testing import CliRunner

from asirra.captcha import attack as attack_module
from asirra.captcha.attack import AttackError, attack
from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service import ServiceSettings, create_app
from asirra.cli import app as cli
from captcha_service_support import GENEROUS, ColourClassifier, make_pool

REPORT_FIELDS = {"attempted", "solved", "solve_rate", "results", "errors", "p50_ms", "p90_ms", "p99_ms"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), cats=20, dogs=20)


def _attack_in_process(pool, classifier, n, safeguard="none", settings=GENEROUS, **options):
    app = create_app(pool, make_safeguard(safeguard), settings)
    return attack("http://captcha.test", n, classifier, transport=httpx.ASGITransport(app=app), **options)


def test_classifier_that_is_always_right_solves_every_challenge(pool):
    report = _attack_in_process(pool, ColourClassifier(), n=6, concurrency=2)
    assert (report.attempted, report.solved, report.solve_rate) == (6, 6, 1.0)
    assert not report.errors and len(report.latencies_ms) == 6
    summary = report.to_dict()
    assert REPORT_FIELDS <= set(summary) and summary["p50_ms"] > 0


def test_classifier_that_is_always_wrong_solves_nothing(pool):
    report = _attack_in_process(pool, ColourClassifier(flip=True), n=4)
    assert report.solved == 0 and report.results["fail"] == 4


def test_rate_limit_refusals_are_counted_and_waited_out(pool, monkeypatch):
    monkeypatch.setattr(attack_module, "MAX_BACKOFF", 0.01)
    settings = ServiceSettings(**{**GENEROUS.__dict__, "challenge_rate": 0.001, "challenge_burst": 2})
    report = _attack_in_process(pool, ColourClassifier(), n=5, settings=settings)
    assert report.solved == 2 and report.errors == {"429": 3}
    assert report.solve_rate == pytest.approx(2 / 5)


@pytest.mark.parametrize(
    "reply, error",
    [
        (httpx.Response(500, text="boom"), "500"),
        (httpx.Response(200, text="<html>not the API</html>"), "not JSON"),
        (httpx.Response(200, json={"unexpected": True}), "unexpected reply"),
    ],
)
def test_broken_server_replies_are_counted_not_raised(reply, error):
    transport = httpx.MockTransport(lambda request: reply)
    report = attack("http://captcha.test", 3, ColourClassifier(), transport=transport)
    assert report.attempted == 3 and report.errors == {error: 3} and report.solved == 0


def test_unreachable_server_is_counted_as_connection_errors():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    report = attack(f"http://127.0.0.1:{port}", 2, ColourClassifier(), timeout=2)
    assert report.errors == {"ConnectError": 2} and report.latencies_ms == []
    assert report.to_dict()["p50_ms"] is None


@pytest.mark.parametrize(
    "url, n, concurrency, words",
    [("127.0.0.1:8000", 1, 1, "http://"), ("http://127.0.0.1", 0, 1, "at least 1"), ("http://127.0.0.1", 1, 0, "concurrency")],
)
def test_impossible_attack_settings_are_refused(url, n, concurrency, words):
    with pytest.raises(AttackError, match=words):
        attack(url, n, ColourClassifier(), concurrency=concurrency)


def test_cli_attack_refuses_a_bad_url_before_loading_any_model():
    result = CliRunner().invoke(cli, ["attack", "--url", "ftp://127.0.0.1", "--challenges", "1"])
    assert result.exit_code == 2 and "error: the URL must start with http://" in result.output


@pytest.mark.parametrize("command", [["serve"], ["captcha", "serve"]])
def test_cli_serve_refuses_a_missing_data_folder_or_unknown_safeguard(tmp_path, command):
    missing = CliRunner().invoke(cli, [*command, "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "error: no such file or folder" in missing.output
    make_pool(tmp_path / "pool")
    unknown = CliRunner().invoke(cli, [*command, "--data", str(tmp_path / "pool"), "--safeguard", "moat"])
    assert unknown.exit_code == 2 and "error: unknown safeguard 'moat'" in unknown.output
