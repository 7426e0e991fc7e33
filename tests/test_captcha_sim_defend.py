"""`defend`: the safeguard grid, its recommendation and the files it writes."""

import csv
import json

import numpy as np
import pytest

from asirra.captcha.experiments.defend_grid import DefendGrid, defend, recommend
from asirra.captcha.experiments.simulate import SimulationError
from asirra.captcha.safeguards import parse_safeguard

SMALL_GRID = DefendGrid(needed=(2,), capacity=(1, 3), cost_per_failure=(1,), refill_when_empty=(1,))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("defend")
    return defend(out, bot_accuracy=0.9, n_challenges=8000, sweep_challenges=1000, grid=SMALL_GRID, seed=0)


def test_defend_writes_csv_json_and_png(report):
    rows = list(csv.DictReader(open(report.files["csv"])))
    assert [row["safeguard"] for row in rows] == [row["safeguard"] for row in report.settings]
    saved = json.load(open(report.files["json"]))
    assert saved["recommended"] == report.recommended
    assert len(saved["settings"]) == len(SMALL_GRID.safeguards())
    assert open(report.files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_defend_recommends_a_safeguard_that_keeps_humans_and_stops_the_bot(report):
    best = report.recommended
    bare = next(row for row in report.settings if row["safeguard"] == "none")
    assert best["human_ci_low"] > 0.99
    assert best["bot_solve_rate"] < 0.5 * bare["bot_solve_rate"]
    assert all(
        row["bot_solve_rate"] >= best["bot_solve_rate"] for row in report.settings if row["human_ci_low"] > 0.99
    )
    parse_safeguard(best["safeguard"])  # the printed setting can be fed back to `captcha simulate`


def test_bare_setting_matches_theory(report):
    bare = next(row for row in report.settings if row["safeguard"] == "none")
    assert bare["bot_ci_low"] <= 0.9**12 <= bare["bot_ci_high"]
    assert bare["human_ci_low"] <= 0.996 <= bare["human_ci_high"]


def test_sweep_covers_every_accuracy_for_each_curve(report):
    accuracies = sorted({row["per_image_accuracy"] for row in report.sweep})
    assert accuracies[0] == 0.5 and accuracies[-1] == 1.0 and len(accuracies) == 11
    curves = {row["safeguard"] for row in report.sweep}
    assert {"none", "partial-credit", "token-bucket"} <= curves
    assert all(row["solve_rate"] == 1.0 for row in report.sweep if row["per_image_accuracy"] == 1.0)


def test_defend_is_deterministic(tmp_path):
    run = lambda out: defend(out, bot_accuracy=0.85, n_challenges=2000, sweep_challenges=200, grid=SMALL_GRID, seed=3)
    assert run(tmp_path / "a").settings == run(tmp_path / "b").settings


def test_defend_with_a_scored_pool_uses_its_measured_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    proba = np.where(labels == 1, 0.9, 0.1)
    proba[:40] = 1 - proba[:40]  # 10% wrong
    result = defend(
        tmp_path, bot_proba=proba, bot_labels=labels, n_challenges=1000, sweep_challenges=100, grid=SMALL_GRID
    )
    assert result.bot_accuracy == pytest.approx(0.9)


def test_defend_needs_exactly_one_bot(tmp_path):
    with pytest.raises(SimulationError, match="either"):
        defend(tmp_path)
    with pytest.raises(SimulationError, match="either"):
        defend(tmp_path, bot_accuracy=0.9, bot_proba=[0.1] * 12, bot_labels=[0] * 12)


def test_recommend_requires_the_human_interval_above_the_floor():
    rows = [
        {"safeguard": "a", "bot_solve_rate": 0.01, "human_solve_rate": 0.992, "human_ci_low": 0.989},
        {"safeguard": "b", "bot_solve_rate": 0.05, "human_solve_rate": 0.995, "human_ci_low": 0.993},
        {"safeguard": "c", "bot_solve_rate": 0.05, "human_solve_rate": 0.997, "human_ci_low": 0.995},
    ]
    assert recommend(rows, 0.99)["safeguard"] == "c"
    assert recommend(rows, 0.999) is None
