"""The page a person uses, driven in headless Chromium: clicking the cats passes, a wrong pick fails.

Uses Debian's /usr/bin/chromium (`make chromium`), never a browser Playwright would download.
The test reads each challenge's answer from the app in-process, as a person would read the photos.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_support import ARTIFACTS, browser  # noqa: F401  (fixture)
from captcha_service_support import GENEROUS, make_pool

from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.run import running
from asirra.data import scan

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "dogs-vs-cats" / "train"
IMAGES_SHOWN = (
    "() => { const imgs = [...document.querySelectorAll('#grid img')];"
    " return imgs.length === 12 && imgs.every((img) => img.complete && img.naturalWidth > 0); }"
)


@pytest.fixture
def page(browser):
    return browser.new_page(viewport={"width": 760, "height": 700})


@pytest.fixture
def pool(tmp_path):
    # Real photos make the kept screenshot worth looking at; synthetic ones prove the same thing.
    if SHARED_TRAIN.is_dir():
        refs = scan(SHARED_TRAIN)
        return [ref for ref in refs if ref.label == 0][:40] + [ref for ref in refs if ref.label == 1][:40]
    return make_pool(tmp_path / "pool", cats=24, dogs=24)


def _show_challenge(page, previous: str = "") -> str:
    page.wait_for_function(
        f"() => document.querySelector('#captcha').dataset.challenge !== {previous!r} && ({IMAGES_SHOWN})()"
    )
    return page.get_attribute("#captcha", "data-challenge")


def _select(page, indices) -> None:
    for index in sorted(indices):
        page.click(f'.tile[data-index="{index}"]')
    pressed = page.eval_on_selector_all('.tile[aria-pressed="true"]', "tiles => tiles.map(t => Number(t.dataset.index))")
    assert sorted(pressed) == sorted(indices)


def test_person_selecting_the_cats_passes_and_a_wrong_selection_fails(page, pool):
    app = create_app(pool, make_safeguard("none"), GENEROUS)
    ARTIFACTS.mkdir(exist_ok=True)
    with running(app) as url:
        page.goto(url)
        first = _show_challenge(page)
        _select(page, app.state.store.peek(first).challenge.answer)
        page.screenshot(path=str(ARTIFACTS / "captcha-page.png"))
        page.click("#verify")
        page.wait_for_selector('#captcha[data-result="pass"]')
        assert "passed" in page.inner_text("#result")
        page.screenshot(path=str(ARTIFACTS / "captcha-pass.png"))

        page.click("#new")
        second = _show_challenge(page, previous=first)
        answer = app.state.store.peek(second).challenge.answer
        _select(page, set(range(12)) - answer)  # every image wrong
        page.click("#verify")
        page.wait_for_selector('#captcha[data-result="fail"]')
        page.screenshot(path=str(ARTIFACTS / "captcha-fail.png"))
    assert len(app.state.store) == 0  # both challenges were used up


def test_the_hardened_pool_page_shows_each_original_beside_its_hardened_copy(page, tmp_path):
    """What `asirra captcha harden` writes for people to judge: the real browser draws both versions."""
    import torch

    from asirra.captcha.defend.config import HardenConfig
    from asirra.captcha.defend.harden import harden_pool, load_surrogate
    from asirra.models import ModelConfig, SeedCNN, save_model

    torch.manual_seed(0)  # an untrained surrogate has gradients like any network, at a fraction of the cost
    surrogate = load_surrogate(str(save_model(SeedCNN(), ModelConfig("seed-cnn", 128), tmp_path / "surrogate")))
    source = scan(SHARED_TRAIN) if SHARED_TRAIN.is_dir() else make_pool(tmp_path / "pool", cats=4, dogs=4)
    refs = [ref for ref in source if ref.label == 0][:4] + [ref for ref in source if ref.label == 1][:4]
    config = HardenConfig(method="pgd", epsilon=16 / 255, steps=2, eot=1, surrogates=(surrogate.name,))
    harden_pool(refs, tmp_path / "hardened", config, [surrogate], progress=False)

    page.goto((tmp_path / "hardened" / "compare.html").as_uri())
    figures = page.eval_on_selector_all(
        "figure", "figs => figs.map(f => [...f.querySelectorAll('img')].map(i => i.complete && i.naturalWidth > 0))")
    assert figures == [[True, True]] * len(refs)  # every original and every hardened copy decoded and drawn
    assert "SSIM" in page.inner_text("figcaption")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "hardened-compare.png"), full_page=True)
