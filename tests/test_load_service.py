"""Many bots at once on loopback: the service answers every request, and we see its latency."""

from __future__ import annotations

import sys

import pytest
from captcha_service_support import GENEROUS, RandomGuesser, make_pool

from asirra.captcha.attack.bot import attack
from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.run import running
from asirra.captcha.service.settings import ServiceSettings

CLIENTS, CHALLENGES_EACH = 50, 4


@pytest.mark.slow
def test_fifty_concurrent_clients_get_every_challenge_judged_without_errors(tmp_path):
    pool = make_pool(tmp_path / "pool", cats=100, dogs=100)
    settings = ServiceSettings(**{**GENEROUS.__dict__, "max_challenges": 10 * CLIENTS})
    app = create_app(pool, make_safeguard("token-bucket"), settings)
    with running(app) as url:
        report = attack(url, CLIENTS * CHALLENGES_EACH, RandomGuesser(), concurrency=CLIENTS)
    print(f"\n{CLIENTS} clients x {CHALLENGES_EACH} challenges: p50 {report.percentile_ms(50):.0f} ms, "
          f"p90 {report.percentile_ms(90):.0f} ms, p99 {report.percentile_ms(99):.0f} ms, "
          f"{report.attempted / report.wall_seconds:.1f} challenges/s", file=sys.stderr)
    assert report.refused == {}
    assert report.attempted == sum(report.results.values()) == CLIENTS * CHALLENGES_EACH
    assert len(app.state.store) == 0  # every challenge was answered, none left behind
