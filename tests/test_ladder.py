"""The attacker ladder builds model folders `asirra attack --model` takes, from images as served.

The pools are the synthetic reddish cats / bluish dogs of captcha_service_support: the colour bot
labels them perfectly through the service's re-encoding, so it checks the labels an attacker got.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from captcha_service_support import GENEROUS, ColourClassifier, make_pool
from PIL import Image
from typer.testing import CliRunner

from asirra.captcha.experiments import ladder
from asirra.captcha.experiments.ladder import ATTACKERS, LadderError, build_attacker, used_ids
from asirra.captcha.safeguards import parse_safeguard
from asirra.captcha.service.app import create_app
from asirra.captcha.service.run import running
from asirra.cli import app
from asirra.data import scan
from asirra.errors import UserError
from asirra.labels import CAT
from asirra.models import DEFAULT_MODEL_DIR
from asirra.predict import load_classifier


def _labels_agree_with_colour(folder: Path) -> None:
    refs = scan(folder)
    assert refs
    seen = ColourClassifier().solve([ref.source for ref in refs])
    assert [ref.label == CAT for ref in refs] == seen


def test_unknown_rung_and_missing_data_are_one_line_errors(tmp_path):
    with pytest.raises(LadderError, match="unknown attacker"):
        build_attacker("oracle", tmp_path / "x", train_data=tmp_path)
    with pytest.raises(LadderError, match="labelled pool"):
        build_attacker("bought-labels", tmp_path / "x", train_data=tmp_path / "missing")
    with pytest.raises(LadderError, match="http"):
        build_attacker("bought-labels", tmp_path / "x", train_data=tmp_path, service_url="ftp://x")


def test_shipped_builds_nothing(tmp_path):
    assert build_attacker("shipped", tmp_path / "s") == DEFAULT_MODEL_DIR
    assert not (tmp_path / "s").exists()
    assert set(ladder.BUILDERS) | set(ladder.rungs.BUILDERS) | {"shipped"} == set(ATTACKERS)


def test_passed_challenges_keeps_only_passes_labelled_by_the_answers(tmp_path):
    pool = tmp_path / "pool"
    make_pool(pool, cats=14, dogs=14, disguised=4)  # the colour bot fails some challenges
    kept, tried, passed = ladder._passed(tmp_path / "served", pool, None, budget=36, seed=0,
                                         solver=ColourClassifier(), progress=False)
    assert 0 < passed <= tried and len(kept) == 12 * passed
    assert tried > passed  # 4 disguised cats in 28: most challenges hold one
    assert not {f"cat.{i}.jpg" for i in range(4)} & set(kept)  # a passed challenge never held a disguised cat
    _labels_agree_with_colour(tmp_path / "served")


@pytest.mark.slow
def test_bought_labels_over_http_then_attack_uses_it(tmp_path):
    pool_dir = tmp_path / "pool"
    pool = make_pool(pool_dir, cats=16, dogs=16)
    app = create_app(pool, parse_safeguard("none"), GENEROUS)
    out = tmp_path / "bought"
    with running(app) as url:
        folder = build_attacker("bought-labels", out, train_data=pool_dir, service_url=url, budget=24, progress=False)
        assert folder == out  # the rung's folder: its solver.json says how to answer
        _labels_agree_with_colour(out / "served")  # the farm's labels, matched back over HTTP, are right
        record = json.loads((out / "attacker.json").read_text())
        assert record["labels_bought"] == 24 and record["train_rows"] == 24  # every bought label in the fit
        assert used_ids(out) and used_ids(out) <= {ref.name for ref in pool}
        assert load_classifier(out / "model").config.name == "effnet-lite2"
        # Asked again with the same settings: reused, not rebuilt; other settings: refused.
        stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
        assert build_attacker("bought-labels", out, train_data=pool_dir, service_url=url, budget=24) == folder
        assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp
        with pytest.raises(UserError, match="other settings"):
            build_attacker("bought-labels", out, train_data=pool_dir, service_url=url, budget=36)
        result = subprocess.run([sys.executable, "-m", "asirra.cli", "attack", "--url", url, "--model", str(out),
                                 "--challenges", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-800:]
    report = json.loads(result.stdout)
    assert report["answered"] == 3
    # Trained on served bytes of this very pool, the probe should separate red from blue.
    assert report["passed"] >= 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["finetune", "ensemble", "self-trained", "residual", "lookup"])
def test_the_top_rungs_build_from_the_cli_and_answer_as_asirra_attack_would(tmp_path, name):
    pool = tmp_path / "pool"
    refs = make_pool(pool, cats=20, dogs=20)
    out = tmp_path / name
    result = CliRunner().invoke(app, ["captcha", "build-attacker", name, "--out", str(out), "--data", str(pool),
                                      "--budget", "24"])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.splitlines()[-1]) == out
    record = json.loads((out / "attacker.json").read_text())
    assert record["labels_bought"] == 24 and record["build_cpu_seconds"] > 0
    if name == "self-trained":  # it practised on the 16 photos it did not buy and learnt from its passes
        assert record["practice_challenges"] > 0 and record["self_labelled_images"] == 12 * record["practice_passed"]
    if name == "ensemble":
        assert set(record["weights"]) == {"shipped", "bought-aug", "residual"}
    from asirra.captcha.attack.solvers import SolverError, load_solver

    solver = load_solver(out)
    if name == "lookup":  # it answers the photos its table knows, and never guesses at another
        known = []
        for ref in refs:
            try:
                known.append((ref, solver.solve([ref.source])[0]))
            except SolverError as error:
                assert "does not know" in str(error)
        assert known and all(answer == (ref.label == CAT) for ref, answer in known)
        return
    answers = solver.solve([r.source for r in refs[:6]] + [r.source for r in refs[-6:]])
    assert len(answers) == 12


@pytest.mark.slow
def test_adv_trained_from_the_cli_hardens_its_own_images_within_eps_and_learns_from_both(tmp_path):
    pool = tmp_path / "pool"
    make_pool(pool, cats=12, dogs=12)
    out = tmp_path / "adv"
    result = CliRunner().invoke(app, ["captcha", "attacker", "adv-trained", "--out", str(out), "--data", str(pool),
                                      "--budget", "24"])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.splitlines()[-1]) == out / "model"  # the folder `asirra attack --model` takes
    record = json.loads((out / "attacker.json").read_text())
    assert record["hardening"]["epsilon_255"] == 4 and len(record["used"]) == 24
    # Its own adversarial copies: every stored file within 4/255 of the served image it was made from.
    manifest = [json.loads(line) for line in (out / "hardened" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 24
    for entry in manifest:
        made = np.asarray(Image.open(out / "hardened" / entry["file"]).convert("RGB"), dtype=np.int16)
        source = np.asarray(Image.open(entry["source"]).convert("RGB"), dtype=np.int16)
        assert made.shape == source.shape and np.abs(made - source).max() <= 4
    assert len(scan(out / "clean+hardened")) == 48  # it learns from the clean and the hardened copies
    clf = load_classifier(out / "model")
    assert sum(clf.solve([r.source for r in scan(pool)])) == 12  # red cats, blue dogs: an easy pool stays easy
