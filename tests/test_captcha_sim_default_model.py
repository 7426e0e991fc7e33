"""`asirra captcha simulate` end to end: the shipped model attacking challenges drawn from shared images."""

import json
import math

import pytest
from typer.testing import CliRunner

from asirra.cli import app


@pytest.fixture(scope="module")
def default_model():
    from asirra.models import default_model_path

    try:
        return default_model_path()
    except ValueError as exc:
        pytest.skip(f"default model not available: {exc}")


@pytest.mark.slow
def test_default_model_simulation_on_200_shared_images(shared_data, default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))
    args = ["captcha", "simulate", "--data", str(shared_data / "train"), "--limit", "200", "-n", "4000", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["images"] + len(out["skipped"]) == 200
    assert out["per_image_accuracy"] > 0.75  # a trained model, far from chance
    # challenges are drawn without replacement from this pool, so the exact solve rate is
    # hypergeometric: all 12 images drawn from the pool's correctly classified ones
    n = out["images"]
    right = round(out["per_image_accuracy"] * n)
    exact = math.comb(right, 12) / math.comb(n, 12)
    assert abs(out["solve_rate"] - exact) <= 4 * math.sqrt(exact * (1 - exact) / 4000) + 1e-9
