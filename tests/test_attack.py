"""The HTTP attacker: it solves what its classifier gets right, waits when told to, and reports
refusals apart from failures (solve rate = passed / answered). Time is faked: nothing sleeps."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import httpx
import pytest
from captcha_service_support import GENEROUS, ColourClassifier, FakeClock, make_pool
from PIL import Image
from typer.testing import CliRunner

import asirra.api
import asirra.predict
from asirra.captcha.attack.bot import DEFAULT_MAX_WAIT, AttackError, attack
from asirra.captcha.attack.counter import parse_preprocess
from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.run import running
from asirra.captcha.service.settings import ServiceSettings
from asirra.cli import app as cli
from asirra.config import DEFAULT_BACKEND
from asirra.stats import wilson_interval

REPORT_FIELDS = {"attempted", "answered", "passed", "results", "solve_rate", "solve_rate_ci", "refused",
                 "refused_total", "retries", "waited_seconds", "max_wait", "wall_seconds", "passes_per_hour",
                 "p50_ms", "p90_ms", "p99_ms", "preprocess", "backend", "kernels"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_pool(tmp_path_factory.mktemp("pool"), cats=20, dogs=20)


class FakeTime:
    """A clock shared by the service and the bot, moved only by the bot's sleeps (recorded)."""

    def __init__(self):
        self.clock = FakeClock()
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.now += seconds
        await asyncio.sleep(0)


def _attack_in_process(pool, classifier, n, safeguard="none", settings=GENEROUS, fake_time=None, **options):
    clock_options = {"clock": fake_time.clock, "sleep": fake_time.sleep} if fake_time else {}
    app = create_app(pool, make_safeguard(safeguard), settings, **({"clock": fake_time.clock} if fake_time else {}))
    return attack("http://captcha.test", n, classifier, transport=httpx.ASGITransport(app=app),
                  **clock_options, **options)


def _challenge_limit(rate: float, burst: int) -> ServiceSettings:
    return ServiceSettings(**{**GENEROUS.__dict__, "challenge_rate": rate, "challenge_burst": burst})


def test_classifier_that_is_always_right_solves_every_challenge(pool):
    report = _attack_in_process(pool, ColourClassifier(), n=6, concurrency=2)
    assert (report.attempted, report.answered, report.passed, report.solve_rate) == (6, 6, 6, 1.0)
    assert not report.refused and len(report.latencies_ms) == 6 and report.waited == 0
    summary = report.to_dict()
    assert REPORT_FIELDS <= set(summary) and summary["p50_ms"] > 0 and summary["passes_per_hour"] > 0
    assert summary["solve_rate_ci"] == list(wilson_interval(6, 6))


def test_classifier_that_is_always_wrong_solves_nothing(pool):
    report = _attack_in_process(pool, ColourClassifier(flip=True), n=4)
    assert report.passed == 0 and report.results["fail"] == 4 and report.solve_rate == 0.0


def test_a_429_with_retry_after_is_waited_out_and_the_challenge_then_passes(pool):
    fake_time = FakeTime()
    # 2 challenges at once, then one per 8 s: challenges 3, 4 and 5 each get "429, Retry-After: 8".
    report = _attack_in_process(pool, ColourClassifier(), n=5, settings=_challenge_limit(0.125, 2), fake_time=fake_time)
    assert fake_time.sleeps == [8.0, 8.0, 8.0]
    assert (report.passed, report.answered, report.results["fail"], report.refused) == (5, 5, 0, {})
    assert (report.waited, report.retries, report.wall_seconds) == (24.0, 3, 24.0)
    assert report.passes_per_hour == pytest.approx(5 * 3600 / 24)


def test_when_the_wait_budget_is_spent_a_challenge_is_refused_not_failed(pool):
    fake_time = FakeTime()
    report = _attack_in_process(pool, ColourClassifier(), n=5, settings=_challenge_limit(0.125, 2),
                                fake_time=fake_time, max_wait=12)
    # The third challenge's 8 s fit the 12 s budget; the next 8 s would not, so 4 and 5 are refused.
    assert fake_time.sleeps == [8.0]
    assert report.results == {"pass": 3} and report.refused == {"429": 2}
    assert report.wait_budget_exhausted and report.waited == 8.0
    assert report.solve_rate == 1.0 and report.to_dict()["refused_total"] == 2


def test_solve_rate_is_passes_over_answered_refusals_left_out(tmp_path):
    # 2 of 20 cats painted blue: the colour bot fails about half the challenges; a zero wait budget refuses others.
    mixed = make_pool(tmp_path / "mixed", cats=20, dogs=20, disguised=2)
    report = _attack_in_process(mixed, ColourClassifier(), n=14, settings=_challenge_limit(0.125, 10),
                                fake_time=FakeTime(), max_wait=0)
    assert report.answered == 10 and report.refused == {"429": 4} and report.attempted == 14
    assert 0 < report.passed < report.answered  # the premise: a mix of passes and failures
    assert report.solve_rate == report.passed / report.answered
    assert report.solve_rate_ci == wilson_interval(report.passed, report.answered)


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, "JPEG")
    return buffer.getvalue()


class ScriptedService:
    """A fake service: one challenge of 12 images (6 red cats, then 6 blue dogs). After `serve`
    image requests it refuses images with `status` for `window` seconds of `clock`, saying how
    long is left in Retry-After (or not, if `window` is None): a rate limit, scripted."""

    def __init__(self, clock=None, serve: int = 12, status: int = 429, window: float | None = 7.0):
        self.clock, self.serve, self.status, self.window = clock, serve, status, window
        self.requests: list[str] = []
        self.closed_until: float | None = None

    def refusal(self) -> httpx.Response | None:
        if self.serve > 0:
            self.serve -= 1
            return None
        now = self.clock() if self.clock else 0.0
        if self.closed_until is None:
            self.closed_until = now + (self.window or 0.0)
        if self.window is None:
            return httpx.Response(self.status, json={"error": "slow down"})
        if now < self.closed_until:
            headers = {"Retry-After": f"{self.closed_until - now:g}"}
            return httpx.Response(self.status, json={"error": "slow down"}, headers=headers)
        return None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        if path == "/api/challenge":
            return httpx.Response(200, json={"id": "c1", "images": [f"/api/image/{i}" for i in range(12)]})
        if path.startswith("/api/image/"):
            index = int(path.rsplit("/", 1)[1])
            refused = self.refusal()
            if refused is not None:
                return refused
            return httpx.Response(200, content=_jpeg((200, 30, 30) if index < 6 else (30, 30, 200)))
        selected = json.loads(request.content)["selected"]
        return httpx.Response(200, json={"result": "pass" if selected == list(range(6)) else "fail"})


def _scripted_attack(service, fake_time, **options):
    return attack("http://captcha.test", 1, ColourClassifier(), transport=httpx.MockTransport(service),
                  clock=fake_time.clock, sleep=fake_time.sleep, **options)


@pytest.mark.parametrize("status", [429, 503])
def test_a_refused_image_request_is_sent_again_after_the_wait_not_a_new_challenge(status):
    fake_time = FakeTime()
    service = ScriptedService(fake_time.clock, serve=2, status=status)
    report = _scripted_attack(service, fake_time)
    assert service.requests.count("POST /api/challenge") == 1
    assert service.requests.count("GET /api/image/2") == 2  # refused, then the same request again
    assert all(service.requests.count(f"GET /api/image/{i}") == 1 for i in (0, 1, *range(3, 12)))
    # The images not yet requested waited with it: the client paused once, for 7 s.
    assert report.waited == 7.0 and report.wall_seconds == 7.0 and report.retries == 1
    assert report.results == {"pass": 1} and not report.refused


def test_a_refusal_without_retry_after_is_refused_at_once():
    fake_time = FakeTime()
    service = ScriptedService(fake_time.clock, serve=0, window=None)
    report = _scripted_attack(service, fake_time)
    assert fake_time.sleeps == [] and report.refused == {"429": 1} and report.answered == 0
    assert report.solve_rate is None and report.to_dict()["solve_rate_ci"] is None


def test_preprocessing_runs_on_the_served_images_before_the_classifier():
    seen = []

    class Recorder(ColourClassifier):
        def solve(self, sources):
            seen.extend(sources)
            return super().solve(sources)

    report = attack("http://captcha.test", 1, Recorder(), transport=httpx.MockTransport(ScriptedService()),
                    preprocess=parse_preprocess("resize:0.5,median:3"))
    assert report.passed == 1 and report.preprocess == "resize:0.5,median:3"
    assert len(seen) == 12 and all(isinstance(image, Image.Image) and image.size == (40, 40) for image in seen)


@pytest.mark.parametrize(
    "reply, kind",
    [
        (httpx.Response(500, text="boom"), "500"),
        (httpx.Response(200, text="<html>not the API</html>"), "not JSON"),
        (httpx.Response(200, json={"unexpected": True}), "unexpected reply"),
    ],
)
def test_broken_server_replies_are_counted_as_refusals_not_raised(reply, kind):
    transport = httpx.MockTransport(lambda request: reply)
    report = attack("http://captcha.test", 3, ColourClassifier(), transport=transport)
    assert report.attempted == 3 and report.refused == {kind: 3} and report.answered == 0


def test_unreachable_server_is_counted_as_connection_errors():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    report = attack(f"http://127.0.0.1:{port}", 2, ColourClassifier(), timeout=2)
    assert report.refused == {"ConnectError": 2} and report.latencies_ms == []
    assert report.to_dict()["p50_ms"] is None


@pytest.mark.parametrize(
    "url, n, concurrency, max_wait, words",
    [("127.0.0.1:8000", 1, 1, 0, "http://"), ("http://127.0.0.1", 0, 1, 0, "at least 1"),
     ("http://127.0.0.1", 1, 0, 0, "concurrency"), ("http://127.0.0.1", 1, 1, -1, "wait budget")],
)
def test_impossible_attack_settings_are_refused(url, n, concurrency, max_wait, words):
    with pytest.raises(AttackError, match=words):
        attack(url, n, ColourClassifier(), concurrency=concurrency, max_wait=max_wait)


# ---- the command line ---------------------------------------------------------------------------


@pytest.fixture
def fake_loader(monkeypatch):
    """load_classifier replaced by the colour bot, recording what the command asked for."""
    asked = {}

    def load_classifier(model=None, backend=DEFAULT_BACKEND, tta=None):
        asked.update(model=model, backend=backend)
        return ColourClassifier()

    # Where `asirra attack` loads a model folder (through the ladder's solver loader).
    monkeypatch.setattr(asirra.predict, "load_classifier", load_classifier)
    return asked


def test_cli_attack_runs_against_a_live_service_and_passes_its_options_on(pool, fake_loader):
    app = create_app(pool, make_safeguard("none"), GENEROUS)
    with running(app) as url:
        result = CliRunner().invoke(cli, ["attack", "--url", url, "--challenges", "7", "--max-wait", "12.5",
                                          "--preprocess", "jpeg:75,median:3", "--model", "runs/colour",
                                          "--backend", "onnx", "--json"])
        assert result.exit_code == 0, result.output
        out, asked = json.loads(result.stdout), dict(fake_loader)
        text = CliRunner().invoke(cli, ["attack", "--url", url, "-n", "2"])
    assert asked == {"model": "runs/colour", "backend": "onnx"}
    assert (out["attempted"], out["answered"], out["passed"], out["refused"]) == (7, 7, 7, {})
    assert (out["max_wait"], out["preprocess"], out["solve_rate"]) == (12.5, "jpeg:75,median:3", 1.0)
    assert out["solve_rate_ci"] == list(wilson_interval(7, 7)) and out["passes_per_hour"] > 0
    # Without options: the package's defaults reach the attack.
    assert text.exit_code == 0, text.output
    assert fake_loader == {"model": None, "backend": DEFAULT_BACKEND}
    assert "attempted 2, answered 2 (pass 2, almost 0, fail 0)" in text.output
    assert f"budget {DEFAULT_MAX_WAIT:g} s" in text.output and "passes per hour" in text.output


@pytest.mark.parametrize(
    "options, words",
    [(["--url", "ftp://127.0.0.1"], "error: the URL must start with http://"),
     (["--url", "http://127.0.0.1:1", "--preprocess", "sharpen:2"], "error: unknown preprocessing 'sharpen'"),
     (["--url", "http://127.0.0.1:1", "--preprocess", "jpeg:high"], "error: jpeg needs a quality from 1 to 100")],
)
def test_cli_attack_refuses_bad_settings_before_loading_any_model(options, words, fake_loader):
    result = CliRunner().invoke(cli, ["attack", *options, "--challenges", "1"])
    assert result.exit_code == 2 and words in result.output
    assert fake_loader == {}


def test_cli_serve_refuses_a_missing_data_folder_or_unknown_safeguard(tmp_path):
    command = ["serve"]
    missing = CliRunner().invoke(cli, [*command, "--data", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "error: --data " in missing.output and "no such file or folder" in missing.output
    make_pool(tmp_path / "pool")
    unknown = CliRunner().invoke(cli, [*command, "--data", str(tmp_path / "pool"), "--safeguard", "moat"])
    assert unknown.exit_code == 2 and "error: --safeguard moat: unknown safeguard 'moat'" in unknown.output


def test_the_bot_runs_where_an_event_loop_is_already_running(pool):
    """A Jupyter kernel runs an event loop in its main thread: asyncio.run() alone would refuse."""
    import asyncio

    app = create_app(pool, make_safeguard("none"), GENEROUS)

    async def inside_a_loop():
        return attack("http://test", 3, ColourClassifier(), transport=httpx.ASGITransport(app=app))

    report = asyncio.run(inside_a_loop())
    assert (report.attempted, report.answered) == (3, 3)
