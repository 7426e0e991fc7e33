"""Known answers for the metrics, the challenge solve rate, temperature scaling and the written report."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from scipy.special import expit

from asirra import calibration, stats
from asirra import evaluation as evaluate
from asirra.calibration import EPS, InvalidPredictions, fit_temperature
from asirra.evaluation import challenge_solve_rate, classification_metrics, worst_mistakes
from asirra.stats import wilson_interval

Y = np.array([0, 0, 1, 1, 0, 1])


# ---- classification metrics -------------------------------------------------------------------


def test_perfect_predictions_score_perfectly():
    m = classification_metrics(Y, Y.astype(float))
    assert m["n"] == 6
    assert m["accuracy"] == 1.0
    assert m["auc"] == 1.0
    assert m["log_loss"] == pytest.approx(-math.log(1 - EPS))
    assert m["log_loss"] < 1e-5
    assert m["brier"] == 0.0
    assert m["confusion"] == [[3, 0], [0, 3]]
    assert m["per_class_accuracy"] == {"cat": 1.0, "dog": 1.0}


def test_constant_half_has_log_loss_ln2_and_auc_half():
    m = classification_metrics(Y, np.full(6, 0.5))
    assert m["log_loss"] == pytest.approx(math.log(2))
    assert m["auc"] == pytest.approx(0.5)
    assert m["brier"] == pytest.approx(0.25)
    # A tie at the threshold counts as dog, so every cat is wrong.
    assert m["per_class_accuracy"] == {"cat": 0.0, "dog": 1.0}


def test_confidently_wrong_prediction_is_clipped_not_infinite():
    m = classification_metrics([0], [1.0])
    assert m["log_loss"] == pytest.approx(-math.log(EPS))


def test_confusion_rows_are_true_class_columns_predicted():
    m = classification_metrics([0, 0, 0, 1], [0.9, 0.1, 0.2, 0.3])
    assert m["confusion"] == [[2, 1], [1, 0]]
    assert m["per_class_accuracy"] == {"cat": pytest.approx(2 / 3), "dog": 0.0}
    assert m["accuracy"] == 0.5


def test_one_class_only_gives_no_auc_and_no_accuracy_for_missing_class():
    m = classification_metrics([1, 1, 1], [0.9, 0.8, 0.2])
    assert m["auc"] is None
    assert m["per_class_accuracy"]["cat"] is None
    assert m["per_class_accuracy"]["dog"] == pytest.approx(2 / 3)


def test_threshold_moves_the_decision():
    assert classification_metrics([0, 1], [0.6, 0.7], threshold=0.65)["accuracy"] == 1.0
    assert classification_metrics([0, 1], [0.6, 0.7])["accuracy"] == 0.5


def test_metrics_are_json_serialisable():
    json.dumps(classification_metrics(Y, np.linspace(0, 1, 6)))


@pytest.mark.parametrize(
    "y, p, message",
    [
        ([0, 1], [0.5], "2 labels but p_dog has 1"),
        ([[0, 1]], [[0.5, 0.5]], "must be 1-D"),
        ([], [], "empty"),
        ([0, 2], [0.1, 0.9], r"only 0 \(cat\) and 1 \(dog\); found \[2\]"),
        ([0, 1], [0.1, float("nan")], "non-finite"),
        ([0, 1], [0.1, 1.5], r"in \[0, 1\]"),
        (["cat", "dog"], [0.1, 0.9], "must be numeric"),
    ],
)
def test_invalid_inputs_raise_clear_value_errors(y, p, message):
    with pytest.raises(InvalidPredictions, match=message):
        classification_metrics(y, p)
    assert issubclass(InvalidPredictions, ValueError)


def test_bool_and_float_labels_are_accepted():
    assert classification_metrics(np.array([False, True]), [0.2, 0.8])["accuracy"] == 1.0
    assert classification_metrics(np.array([0.0, 1.0]), [0.2, 0.8])["accuracy"] == 1.0


# ---- Wilson interval --------------------------------------------------------------------------


def test_wilson_interval_known_value():
    # 50 of 100: centre 0.5, half-width 1.96*sqrt(.25/100 + 1.96^2/40000)/(1 + 1.96^2/100).
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)


def test_wilson_interval_stays_inside_unit_interval_at_the_extremes():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0 < high < 0.35
    low, high = wilson_interval(10, 10)
    assert 0.65 < low < 1 and high == 1.0


@pytest.mark.parametrize("successes, n", [(1, 0), (-1, 5), (6, 5)])
def test_wilson_interval_rejects_impossible_counts(successes, n):
    with pytest.raises(ValueError):
        wilson_interval(successes, n)


# ---- challenge solve rate ---------------------------------------------------------------------


def test_sample_subsets_draws_distinct_indices_uniformly():
    rng = np.random.default_rng(1)
    subsets = stats.sample_subsets(rng, n=20, size=12, count=20_000)
    assert subsets.shape == (20_000, 12)
    assert subsets.min() >= 0 and subsets.max() < 20
    assert all(len(set(row)) == 12 for row in subsets[:2000])
    # Each index appears in a fraction size/n = 0.6 of subsets.
    frequency = np.bincount(subsets.ravel(), minlength=20) / 20_000
    np.testing.assert_allclose(frequency, 0.6, atol=0.02)


def test_perfect_classifier_solves_every_challenge():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100)
    result = challenge_solve_rate(y, y.astype(float), n_challenges=500)
    assert result["challenge_solve_rate"] == 1.0
    assert result["p12"] == 1.0 and result["exact_solve_rate"] == 1.0
    assert result["ci_high"] == pytest.approx(1.0) and result["ci_low"] > 0.99


def test_one_error_in_a_pool_of_twelve_fails_every_challenge():
    y = np.array([0, 1] * 6)
    p = y.astype(float)
    p[3] = 1 - p[3]
    result = challenge_solve_rate(y, p, n_challenges=200)
    assert result["challenge_solve_rate"] == 0.0
    assert result["exact_solve_rate"] == 0.0
    assert result["p12"] == pytest.approx((11 / 12) ** 12)


def test_empirical_solve_rate_matches_accuracy_to_the_twelfth():
    rng = np.random.default_rng(3)
    n, accuracy = 20_000, 0.95
    y = rng.integers(0, 2, n)
    correct = rng.random(n) < accuracy
    p = np.where(correct, y, 1 - y) * 0.8 + 0.1
    result = challenge_solve_rate(y, p, n_challenges=10_000, seed=7)
    expected = result["p12"]
    standard_error = math.sqrt(expected * (1 - expected) / 10_000)
    assert abs(result["challenge_solve_rate"] - expected) < 4 * standard_error
    assert result["ci_low"] < result["exact_solve_rate"] < result["ci_high"]
    assert result["challenges"] == 10_000 and result["challenge_size"] == 12


def test_ten_thousand_challenges_from_19000_images_never_build_a_challenges_by_images_array():
    # What keeps the demo's 10,000 challenges cheap is Floyd's sampling: O(challenges x 12) work,
    # never a (challenges, images) array (190 MB even as booleans here). Allocated memory says so
    # deterministically; wall time would depend on the machine's load.
    y = np.random.default_rng(0).integers(0, 2, 19_000)
    p = y.astype(float)
    p[:190] = 1 - p[:190]  # 1% wrong, so some challenges fail
    tracemalloc.start()
    try:
        result = challenge_solve_rate(y, p, n_challenges=10_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"challenge_solve_rate allocated {peak / 2**20:.0f} MB at its peak"
    assert 0 < result["challenges_solved"] < 10_000


def test_same_seed_same_result_different_seed_can_differ():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y + rng.normal(0, 0.3, 200), 0, 1)
    first = challenge_solve_rate(y, p, n_challenges=300, seed=1)
    assert challenge_solve_rate(y, p, n_challenges=300, seed=1) == first
    assert challenge_solve_rate(y, p, n_challenges=300, seed=2)["challenges_solved"] != first["challenges_solved"]


def test_challenge_larger_than_pool_is_rejected():
    with pytest.raises(InvalidPredictions, match="between 1 and the 5 evaluated images"):
        challenge_solve_rate([0, 1, 0, 1, 0], [0.1] * 5)


# ---- worst mistakes ---------------------------------------------------------------------------


def test_worst_mistakes_most_confident_errors_first():
    y = np.array([0, 0, 1, 1, 0, 1])
    p = np.array([0.97, 0.10, 0.02, 0.90, 0.60, 0.45])
    assert worst_mistakes(y, p).tolist() == [2, 0, 4, 5]
    assert worst_mistakes(y, p, k=2).tolist() == [2, 0]


def test_worst_mistakes_of_a_perfect_classifier_is_empty():
    assert worst_mistakes(Y, Y.astype(float)).size == 0


# ---- temperature scaling ----------------------------------------------------------------------


def synthetic_logits(t_true, n=20_000, seed=0):
    """Labels drawn from sigmoid(z), reported as logits z * T_true: sigmoid(logit / T_true) is calibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, n)
    y = (rng.random(n) < expit(z)).astype(int)
    return z * t_true, y


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_known_temperature(t_true):
    logits, y = synthetic_logits(t_true)
    assert fit_temperature(logits, y) == pytest.approx(t_true, rel=0.1)


def test_fitted_temperature_improves_held_out_log_loss():
    logits, y = synthetic_logits(3.0, seed=1)
    half = len(y) // 2
    t = fit_temperature(logits[:half], y[:half])
    before = evaluate.log_loss(y[half:], expit(logits[half:]))
    after = evaluate.log_loss(y[half:], calibration.apply_temperature(logits[half:], t))
    assert after < before - 0.05


def test_fit_temperature_on_separable_data_stays_at_the_lower_bound():
    y = np.array([0, 1] * 50)
    logits = np.where(y == 1, 4.0, -4.0)
    assert fit_temperature(logits, y) == pytest.approx(calibration.T_MIN, rel=0.01)


def test_fit_temperature_rejects_bad_inputs():
    with pytest.raises(InvalidPredictions, match="2 labels but logits has 3"):
        fit_temperature([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(InvalidPredictions, match="non-finite"):
        fit_temperature([0.1, float("inf")], [0, 1])


def test_logit_inverts_sigmoid():
    p = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(expit(calibration.logit(p)), p)


# ---- report -----------------------------------------------------------------------------------


def test_report_json_is_flat_with_headline_numbers():
    y = np.array([0, 1] * 10)
    report = evaluate.evaluate_predictions(y, np.where(y == 1, 0.9, 0.2), n_challenges=50, info={"model": "m"})
    flat = report.to_json()
    for key in ("model", "n", "accuracy", "log_loss", "auc", "challenge_solve_rate", "p12", "confusion",
                "per_class_accuracy", "ci_low", "ci_high"):
        assert key in flat
    json.dumps(flat)


def test_write_evaluation_writes_metrics_and_all_plots(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.clip(0.5 * y + 0.5 * rng.random(60), 0, 1)
    names = [f"{'dog' if label else 'cat'}.{i}.jpg" for i, label in enumerate(y)]
    requested = []

    def images_for(indices):
        requested.extend(indices)
        return [np.full((32, 32, 3), 10 * i % 256, np.uint8) for i in indices]

    report = evaluate.evaluate_predictions(y, p, n_challenges=100)
    paths = evaluate.write_evaluation(report, y, p, images_for, names, tmp_path / "eval", k_mistakes=5)

    assert set(paths) == {"metrics", "confusion", "roc", "reliability", "mistakes"}
    for key, path in paths.items():
        assert path.parent == tmp_path / "eval" and path.stat().st_size > 0
        if key != "metrics":
            with Image.open(path) as image:
                assert image.format == "PNG"
    assert json.loads(paths["metrics"].read_text()) == json.loads(json.dumps(report.to_json()))
    assert requested == worst_mistakes(y, p, k=5).tolist()  # only the shown mistakes are loaded


def test_report_on_fewer_images_than_a_challenge_has_no_solve_rate():
    flat = evaluate.evaluate_predictions(Y, Y.astype(float)).to_json()
    assert flat["challenge_solve_rate"] is None and flat["challenges"] == 0
    assert flat["p12"] == 1.0 and flat["accuracy"] == 1.0


def test_write_evaluation_rejects_names_of_wrong_length(tmp_path):
    report = evaluate.evaluate_predictions(Y, Y.astype(float), n_challenges=10)
    with pytest.raises(InvalidPredictions, match="5 names for 6 predictions"):
        evaluate.write_evaluation(report, Y, Y.astype(float), lambda i: [], ["a"] * 5, tmp_path)
