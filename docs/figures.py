"""The site's and the README's pictures that are drawn, not photographed: `make docs-figures`.

- assets/study-live.png: the hardening study's live pass rates by epsilon, from assets/study-live.csv
  (transcribed from the study's reports; the table on results/hardening-study.md holds the same numbers).
- assets/challenge-page.png: the service's page in Chromium, over generated striped images (dataset
  photos are never committed).

Excluded from the site itself (mkdocs.yml: exclude_docs).
"""

from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

DOCS = Path(__file__).resolve().parent
ASSETS = DOCS / "assets"
CHROMIUM = "/usr/bin/chromium"


def study_plot() -> Path:
    with open(DOCS / "assets/study-live.csv") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.add_subplot()
    labels = {"default": "a bot that does not adapt (the shipped model, best counter-move)",
              "ladder": "the strongest attacker (from eps 2: a probe on 300 bought labels)"}
    for study, colour, marker in (("default", "C0", "o"), ("ladder", "C3", "s")):
        part = [r for r in rows if r["study"] == study]
        x = np.array([int(r["epsilon"]) for r in part])
        rate = np.array([int(r["passed"]) / int(r["answered"]) for r in part])
        low, high = np.array([float(r["ci_low"]) for r in part]), np.array([float(r["ci_high"]) for r in part])
        ax.errorbar(x, rate, yerr=[rate - low, high - rate], color=colour, marker=marker, capsize=3,
                    label=labels[study])
    ax.axhline(0.10, color="grey", linestyle="--", linewidth=1)
    ax.text(16, 0.115, "goal: at most 10%", ha="right", fontsize=8, color="grey")
    ssim = {int(r["epsilon"]): r["ssim_median"] for r in rows if r["study"] == "default"}
    ax.set_xticks(sorted(ssim), [f"{e}\nSSIM {ssim[e]}" for e in sorted(ssim)], fontsize=8)
    ax.set(xlabel="hardening: PGD epsilon (/255) and the photos' median SSIM", ylabel="live challenges passed",
           ylim=(0, 1.02), title="Hardening the photos, attacked live (60 challenges per point, 95% intervals)")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8, loc="upper right")
    out = ASSETS / "study-live.png"
    fig.savefig(out, dpi=110)
    return out


def striped(colour, vertical: bool, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:150, 0:200]
    on = (((xs if vertical else ys) + seed * 7) // 12) % 2 == 0
    pixels = np.where(on[..., None], np.array(colour, float), 235.0) + rng.normal(0, 10, (150, 200, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def challenge_page() -> Path:
    from playwright.sync_api import sync_playwright

    import asirra
    from asirra.captcha import ServiceSettings, running

    with tempfile.TemporaryDirectory() as folder:
        pool = Path(folder)
        for i in range(24):  # generated pictures, never photos: cats warm and vertical, dogs cool and horizontal
            striped((220, 120, 60), True, i).save(pool / f"cat.{i}.jpg", quality=90)
            striped((60, 110, 210), False, 100 + i).save(pool / f"dog.{i}.jpg", quality=90)
        app = asirra.create_app(pool, settings=ServiceSettings(seed=3))
        out = ASSETS / "challenge-page.png"
        with running(app) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 760, "height": 760})
            page.goto(url)
            shown = "() => [...document.querySelectorAll('#grid img')].filter(i => i.complete && i.naturalWidth).length"
            page.wait_for_function(f"{shown} === 12")
            png = page.screenshot(full_page=True)
            browser.close()
    import io

    Image.open(io.BytesIO(png)).convert("RGB").quantize(64).save(out, optimize=True)  # a palette: a tenth of the bytes
    return out


def main() -> None:
    ASSETS.mkdir(exist_ok=True)
    print(study_plot())
    if "--no-browser" not in sys.argv:
        print(challenge_page())


if __name__ == "__main__":
    main()
