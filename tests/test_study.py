"""The hardening study: a --quick run end to end on a synthetic pool, its split, its report, its cache."""

from __future__ import annotations

import json
import os

import pytest
from captcha_service_support import make_pool
from typer.testing import CliRunner

from asirra.captcha.experiments.study import StudyConfig, StudyError, parse_epsilons, parse_moves, pool_name, split_pool
from asirra.cli import app
from asirra.errors import ConfigError

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    make_pool(root / "pool", cats=30, dogs=30)
    out = root / "out"
    result = runner.invoke(app, ["captcha", "study", "--data", str(root / "pool"), "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    return root, out, result


def test_split_is_disjoint_stratified_and_reproducible(tmp_path):
    refs = make_pool(tmp_path / "pool", cats=20, dogs=20)
    hidden, craft = split_pool(refs, 12, seed=3)
    assert len(hidden) == 12 and len(craft) == 28
    assert {r.source for r in hidden}.isdisjoint(r.source for r in craft)
    assert sorted(r.label for r in hidden) == [0] * 6 + [1] * 6
    assert [r.source for r in split_pool(refs, 12, seed=3)[0]] == [r.source for r in hidden]
    assert [r.source for r in split_pool(refs, 12, seed=4)[0]] != [r.source for r in hidden]
    with pytest.raises(StudyError, match="needs 20 hidden"):
        split_pool(refs, 40, seed=0)


def test_quick_study_reports_every_cell_with_intervals_around_the_estimates(quick_study):
    _, out, result = quick_study
    cells = json.loads((out / "results.json").read_text())["cells"]
    config = StudyConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in json.loads((out / "results.json").read_text())["config"].items()})
    settings = [(m, e) for m in config.methods for e in config.epsilons] + [(b, None) for b in config.baselines]
    assert config.baselines == ("noise",)  # the classic baseline is a row of every study that asks for it
    expected = {(pool_name(m, e), a, p) for m, e in settings for a in config.attackers for p in config.preprocess}
    assert {(pool_name(c["method"], c["epsilon"]), c["attacker"], c["preprocess"]) for c in cells} == expected
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ") and "/24)" in line]
    assert len(rows) == len(expected)  # every cell is in the report, none dropped for looking bad
    for cell in cells:
        assert cell["n"] == config.scored
        assert cell["accuracy"] == cell["correct"] / cell["n"]
        assert cell["accuracy_low"] <= cell["accuracy"] <= cell["accuracy_high"]
        assert cell["p12_low"] <= cell["p12"] <= cell["p12_high"]
        assert f"{cell['correct']}/{cell['n']}" in report
    hardened = [c for c in cells if c["epsilon"]]
    assert hardened and all(c["ssim_median"] < 1.0 and c["linf_max"] <= c["epsilon"] for c in hardened)
    live = json.loads((out / "results.json").read_text())["live"]
    assert len(live) == len(config.epsilons) + len(config.baselines)  # one headline per setting: the strongest cell
    noisy = [c for c in cells if c["epsilon"] is None]
    assert noisy and all(0 < c["ssim_median"] < 1.0 and c["linf_max"] > 8 for c in noisy)  # random noise, unbounded
    for attack in live:
        assert attack["answered"] + attack["refused_total"] == attack["attempted"] == config.live_challenges
        if attack["answered"]:
            low, high = attack["solve_rate_ci"]
            assert low <= attack["solve_rate"] <= high
    assert "## Goal" in report and ("**Met**" in report or "**Not met**" in report)
    for plot in ("accuracy.png", "pass_rate.png", "ssim.png"):
        assert (out / plot).stat().st_size > 1000


def test_hidden_images_never_craft(quick_study):
    _, out, _ = quick_study
    split = json.loads((out / "split.json").read_text())
    hidden = {os.path.realpath(s) for s in split["hidden"]}
    assert len(hidden) == 24 and hidden.isdisjoint(os.path.realpath(s) for s in split["craft"])
    crafting = {os.path.realpath(p) for p in (out / "craft").iterdir()}
    assert crafting and crafting.isdisjoint(hidden) and crafting <= {os.path.realpath(s) for s in split["craft"]}
    hardened = [json.loads(line)["source"] for line in (out / "pools" / "fgsm-e8" / "manifest.jsonl").read_text().splitlines()]
    assert {os.path.realpath(s) for s in hardened} == hidden  # only hidden images are hardened and scored


def test_a_rerun_resumes_from_the_cache_and_reports_the_same(quick_study):
    root, out, _ = quick_study
    before = (out / "results.csv").read_text()
    again = runner.invoke(app, ["captcha", "study", "--data", str(root / "pool"), "--out", str(out), "--quick"])
    assert again.exit_code == 0, again.output
    assert (out / "results.csv").read_text() == before
    changed = runner.invoke(app, ["captcha", "study", "--data", str(root / "pool"), "--out", str(out), "--quick",
                                  "--scored", "12"])
    assert changed.exit_code == 2 and "choose another --out" in changed.output


def test_lists_parse_and_bad_settings_fail_in_one_line(tmp_path):
    assert parse_epsilons("0,2,4/255") == (0, 2, 4)
    assert parse_moves("none,jpeg:75,jpeg:75+median:3") == ("none", "jpeg:75", "jpeg:75,median:3")
    with pytest.raises(ConfigError, match="not a whole number of 255ths"):
        parse_epsilons("0.01")
    assert parse_epsilons("0,4/255,8") == (0, 4, 8)  # the one epsilon rule: whole numbers are 255ths
    make_pool(tmp_path / "pool", cats=12, dogs=12)
    for option, value in (("--methods", "nonsense"), ("--preprocess", "jpeg:500"), ("--epsilons", "1,1")):
        result = runner.invoke(app, ["captcha", "study", "--data", str(tmp_path / "pool"), "--out",
                                     str(tmp_path / "out"), "--quick", option, value])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "error:" in result.output, result.output


@pytest.mark.slow
def test_an_adaptive_attacker_learns_from_defended_crafting_images_never_the_hidden_set(tmp_path):
    make_pool(tmp_path / "pool", cats=50, dogs=50)  # 76 crafting images: 48 train the surrogate, 28 left
    out = tmp_path / "out"
    result = runner.invoke(app, ["captcha", "study", "--data", str(tmp_path / "pool"), "--out", str(out), "--quick",
                                 "--attackers", "shipped,bought-labels", "--attacker-pool", "24", "--headline", "none"])
    assert result.exit_code == 0, result.output
    split = json.loads((out / "split.json").read_text())
    hidden = {os.path.realpath(s) for s in split["hidden"]}
    surrogate_share = {os.path.realpath(p) for p in (out / "craft").iterdir()}
    # At eps 8 the attacker learns from hardened copies of crafting images the surrogates never saw.
    taught = [json.loads(line)["source"] for line in
              (out / "attacker-pools" / "fgsm-e8" / "manifest.jsonl").read_text().splitlines()]
    assert len(taught) == 24
    taught = {os.path.realpath(s) for s in taught}
    assert taught <= {os.path.realpath(s) for s in split["craft"]}
    assert taught.isdisjoint(hidden) and taught.isdisjoint(surrogate_share)
    for setting in ("none", "fgsm-e8"):  # one build per setting, each from that setting's pool
        record = json.loads((out / "attackers" / f"bought-labels--{setting}" / "attacker.json").read_text())
        assert record["train_data"] == str((out / "attacker-pools" / setting).resolve())
        assert record["labels_bought"] == 24
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert {(c["epsilon"], c["attacker"]) for c in cells} >= {(0, "bought-labels"), (8, "bought-labels")}
    assert "rebuilt at every setting from 24 crafting images" in (out / "report.md").read_text()
