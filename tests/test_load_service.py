"""Many bots at once on loopback: the service answers every request, we see its latency, and /metrics, scraped
while the load runs, agrees with the bots' own counts."""

from __future__ import annotations

import sys
import threading

import httpx
import pytest
from captcha_service_support import GENEROUS, RandomGuesser, make_pool
from prometheus_client.parser import text_string_to_metric_families

from asirra.captcha.attack.bot import attack
from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.run import running
from asirra.captcha.service.settings import ServiceSettings

CLIENTS, CHALLENGES_EACH = 50, 4


def totals(text: str) -> dict[str, float]:
    """Each counter and histogram count of a scrape, summed over its labels, with the labels that matter kept."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = sample.name + "".join(f"/{sample.labels[k]}" for k in ("verdict", "kind") if k in sample.labels)
            elif sample.name == "asirra_request_duration_seconds_count":
                key = f"{sample.labels['method']} {sample.labels['route']} {sample.labels['status']}"
            else:
                continue
            found[key] = found.get(key, 0.0) + sample.value
    return found


class Scraper(threading.Thread):
    """Reads /metrics every `interval` seconds until stopped; every scrape is kept."""

    def __init__(self, url: str, interval: float = 0.2):
        super().__init__(daemon=True)
        self.url, self.interval, self.scrapes = url, interval, []
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.done.wait(self.interval):
                self.scrapes.append(totals(client.get(f"{self.url}/metrics").text))


@pytest.mark.slow
def test_fifty_concurrent_clients_get_every_challenge_judged_and_metrics_agree(tmp_path):
    pool = make_pool(tmp_path / "pool", cats=100, dogs=100)
    settings = ServiceSettings(**{**GENEROUS.__dict__, "max_challenges": 10 * CLIENTS, "access_log": False})
    app = create_app(pool, make_safeguard("token-bucket"), settings)
    with running(app) as url:
        scraper = Scraper(url)
        scraper.start()
        report = attack(url, CLIENTS * CHALLENGES_EACH, RandomGuesser(), concurrency=CLIENTS)
        scraper.done.set()
        scraper.join(10)
        final = totals(httpx.get(f"{url}/metrics").text)
    print(f"\n{CLIENTS} clients x {CHALLENGES_EACH} challenges: p50 {report.percentile_ms(50):.0f} ms, "
          f"p90 {report.percentile_ms(90):.0f} ms, p99 {report.percentile_ms(99):.0f} ms, "
          f"{report.attempted / report.wall_seconds:.1f} challenges/s; {len(scraper.scrapes)} scrapes during the load",
          file=sys.stderr)
    assert report.refused == {}
    assert report.attempted == sum(report.results.values()) == CLIENTS * CHALLENGES_EACH
    assert len(app.state.store) == 0  # every challenge was answered, none left behind

    # Scraped during the load: every scrape parsed, and no counter ever went down.
    assert len(scraper.scrapes) >= 2
    for before, after in zip(scraper.scrapes, scraper.scrapes[1:] + [final]):
        assert all(after.get(key, 0.0) >= value for key, value in before.items())
    # At the end: exactly the bots' own counts.
    assert final["asirra_challenges_issued_total"] == report.attempted
    for verdict in ("pass", "almost", "fail"):
        assert final.get(f"asirra_answers_total/{verdict}", 0.0) == report.results[verdict], verdict
    assert not any(key.startswith("asirra_refusals_total") for key in final)
    assert final["POST /api/challenge 2xx"] == report.attempted
    assert final["GET /api/image/{token} 2xx"] == 12 * report.attempted
    assert final["POST /api/challenge/{challenge_id}/answer 2xx"] == report.attempted
