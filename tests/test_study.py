"""The attacker's bill end to end: a --quick study on a synthetic pool, its cells, its live cells and their
counters, its cache, and a report whose cost figures and goal verdict are recomputed from its inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from captcha_service_support import make_pool
from typer.testing import CliRunner

from asirra.captcha.experiments import bill as billing
from asirra.captcha.experiments.study import StudyConfig, StudyResult, parse_epsilons, parse_moves
from asirra.captcha.experiments.study.report import dollars
from asirra.cli import app
from asirra.errors import ConfigError
from asirra.runs import content_key

runner = CliRunner()
pytestmark = pytest.mark.slow  # one --quick study (a few minutes on 2 cores), shared by the tests below


def _study(root, *extra):
    return runner.invoke(app, ["captcha", "study", "--data", str(root / "pool"), "--out", str(root / "out"), "--quick",
                               "--split", str(root / "split.json"), *extra])


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    refs = make_pool(root / "photos", cats=60, dogs=60)
    (root / "split.json").write_text(json.dumps({"val": [content_key(r.read_bytes()) for r in refs]}))
    made = runner.invoke(app, ["captcha", "pool", "--data", str(root / "photos"), "--out", str(root / "pool"),
                               "--split", str(root / "split.json")])
    assert made.exit_code == 0, made.output
    result = _study(root)
    assert result.exit_code == 0, result.output
    return root, root / "out", json.loads((root / "out" / "results.json").read_text())


def test_every_cell_is_scored_and_reported_with_its_interval(quick_study):
    _, out, results = quick_study
    config = StudyResult.from_json(out / "results.json").config
    cells = results["cells"]
    for eps in config.epsilons:
        for seed in config.seeds:
            mine = {(c["attacker"], c["move"]) for c in cells if c["epsilon"] == eps and c["seed"] == seed}
            assert {("shipped", m) for m in config.moves} <= mine
            if eps:  # the bought-label rungs at every budget, the residual through its own view, the ensemble
                for budget in config.budgets:
                    assert {(f"bought-labels@{budget}", m) for m in config.moves} <= mine
                    assert (f"residual@{budget}", "residual:8") in mine
                assert (f"ensemble@{config.budgets[1]}", "own") in mine
    report = (out / "report.md").read_text()
    for c in cells:
        assert c["n"] == config.scored and c["accuracy"] == c["correct"] / c["n"]
        assert c["accuracy_low"] <= c["accuracy"] <= c["accuracy_high"]
        assert f"| {c['setting']} | {c['seed']} | {c['attacker']} | {c['move']} | {c['correct']}/{c['n']} |" in report
    assert (out / "bill.png").stat().st_size > 5000 and (out / "budget.png").stat().st_size > 5000


def test_no_scored_photo_is_ever_bought_or_trains_the_surrogate(quick_study):
    _, out, _ = quick_study
    split = json.loads((out / "split.json").read_text())
    surrogate = {k for k, _ in split["surrogate"]}
    for seed in split["seeds"].values():
        scored = {k for k, _ in seed["scored"]}
        bought = {k for k, _ in seed["attacker"]}
        assert scored and bought and not scored & bought and not (scored | bought) & surrogate
        assert scored | bought <= {k for k, _ in split["hardened"]}


def test_live_cells_answer_every_challenge_and_the_rotating_bot_starts_fresh_each_time(quick_study):
    _, _, results = quick_study
    live = results["live"]
    assert {c["identity"] for c in live} == {"one-address", "rotating"}
    for cell in live:
        assert cell["answered"] + cell["refused_total"] == cell["attempted"] == cell["challenges"]
        states = cell["counters"]["client_states_created"]
        if cell["identity"] == "rotating":  # the service's own counters: one new cookie and address per challenge
            assert states == {"cookie": cell["attempted"], "ip": cell["attempted"]}
            assert cell["counters"]["limit_keys_created"]["challenge"] == cell["attempted"]
        else:
            assert states == {"cookie": 1, "ip": 1}
        assert cell["bytes_per_challenge"] > 12 * 1000  # twelve JPEGs and the API calls, counted on the wire
    rotating = [c for c in live if c["identity"] == "rotating"]
    assert rotating and all(c["safeguard"] != "none" for c in rotating)


def test_the_goal_verdict_and_every_cost_figure_are_recomputed_from_the_results(quick_study, tmp_path):
    _, out, results = quick_study
    result = StudyResult.from_json(out / "results.json")
    prices = billing.load_prices()
    bill = billing.bill(result, prices)
    assert json.loads(json.dumps(bill)) == results["bill"]  # the stored bill is a function of the stored quantities
    result.bill = bill
    goal = billing.goal_check(result, prices)
    assert json.loads(json.dumps(goal)) == results["goal"]
    assert not goal["met"] and not goal["headline"]  # an exploratory run can never meet the goal
    report = (out / "report.md").read_text()
    for row in bill["pooled"]:
        assert f"{dollars(row['per_thousand_low'])}-{dollars(row['per_thousand_high'])}" in report
    for row in goal["settings"]:
        verdict = "**met**" if row["meets"] else "not met"
        assert f"| {row['setting']} | {row['safeguard']} | {row['attacker']} ({row['move']}) |" in report
        assert report.count(f"{verdict} |") >= 1
    # Another price: `asirra captcha bill` reprices the same quantities; the rotating bill moves with the proxy price.
    copy = tmp_path / "study"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("cache"))
    dearer = tmp_path / "prices.toml"
    dearer.write_text(billing.PRICES_FILE.read_text().replace("high = 5.00", "high = 50.00"))
    repriced = runner.invoke(app, ["captcha", "bill", "--study", str(copy), "--prices", str(dearer)])
    assert repriced.exit_code == 0, repriced.output
    again = json.loads((copy / "results.json").read_text())["bill"]["pooled"]
    before = {(r["setting"], r["policy"], r["identity"], r["role"]): r for r in results["bill"]["pooled"]}
    for row in again:
        old = before[(row["setting"], row["policy"], row["identity"], row["role"])]
        assert row["per_thousand_low"] == old["per_thousand_low"]  # the low end uses the low proxy price
        if row["identity"] == "rotating" and row["p_lo"] > 0:
            assert row["per_thousand_high"] > 5 * old["per_thousand_high"]
            assert dollars(row["per_thousand_high"]) in (copy / "report.md").read_text()


def test_a_rerun_reuses_every_cached_result_and_a_changed_setting_recomputes_only_its_cells(quick_study):
    root, out, results = quick_study
    again = _study(root)
    assert again.exit_code == 0, again.output
    history = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert all(stats["computed"] == 0 for stats in history[-1]["cache"].values())
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]
    changed = _study(root, "--side-challenges", "5")
    assert changed.exit_code == 0, changed.output
    stats = json.loads((out / "timings.jsonl").read_text().splitlines()[-1])["cache"]
    assert stats["live"]["computed"] > 0  # the side and lookup cells, whose keys hold their challenge count...
    assert all(s["computed"] == 0 for kind, s in stats.items() if kind != "live")  # ...and nothing else
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]


def test_the_feature_scoring_is_what_the_live_bot_computes(quick_study):
    """The study scores probes from stored features; the bot runs the saved model folder: the same logits."""
    from asirra.captcha.attack.counter import parse_preprocess
    from asirra.captcha.attack.solvers import MovedSolver, load_solver
    from asirra.captcha.experiments.features import FeatureStore
    from asirra.captcha.experiments.rungs import head_logits
    from asirra.predict import load_classifier

    _, out, _ = quick_study
    folders = [p.parent for p in (out / "cache" / "attacker").glob("*/head.npz")]
    served = sorted((out / "cache" / "served").glob("*/0000*.jpg"))[:12]
    images = [p.read_bytes() for p in served]
    store = FeatureStore(out / "cache")
    checked = 0
    for folder in folders:
        record = json.loads((folder / "attacker.json").read_text())
        move = "residual:8" if record["name"] == "residual" else "jpeg:50,median:5"
        stored = head_logits(store, folder, images, move)
        bot = MovedSolver(load_classifier(folder / "model"), parse_preprocess(move)).logits(images)
        assert np.abs(stored - bot).max() < 0.05 and ((stored < 0) == (bot < 0)).all()
        assert load_solver(folder).solve(images[:4]) is not None  # the folder is what `asirra attack --model` takes
        checked += 1
    assert checked >= 3


def test_lists_parse_and_bad_settings_fail_in_one_line(tmp_path):
    assert parse_epsilons("0,2,4/255") == (0, 2, 4)
    assert parse_moves("none,jpeg:75,jpeg:75+median:3") == ("none", "jpeg:75", "jpeg:75,median:3")
    with pytest.raises(ConfigError, match="not a whole number of 255ths"):
        parse_epsilons("0.01")
    with pytest.raises(ConfigError, match="a headline run needs at least 3 seeds"):
        StudyConfig(seeds=(0, 1))
    make_pool(tmp_path / "pool", cats=12, dogs=12)
    for option, value in (("--moves", "jpeg:500"), ("--epsilons", "1,1"), ("--attackers", "oracle"),
                          ("--budgets", "30,24")):
        result = runner.invoke(app, ["captcha", "study", "--data", str(tmp_path / "pool"), "--out",
                                     str(tmp_path / "out"), "--quick", option, value])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output, result.output
