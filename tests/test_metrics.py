"""asirra.metrics against small hand-computed cases, and against the binary code for N = 2."""

import math

import numpy as np
import pytest

from asirra import evaluation as evaluate
from asirra import metrics, plots
from asirra.calibration import InvalidPredictions

CLASSES = ["a", "b", "c"]
# Four images, three classes. Top-1 calls: a, b, a, c; truths: a, b, c, c.
Y = np.array([0, 1, 2, 2])
P = np.array([
    [0.7, 0.2, 0.1],   # a, right
    [0.1, 0.6, 0.3],   # b, right
    [0.5, 0.3, 0.2],   # a, wrong (true c is the least likely: not even top-2)
    [0.1, 0.3, 0.6],   # c, right
])


def test_top_k_accuracy_by_hand():
    assert metrics.top_k_accuracy(Y, P, 1) == 0.75
    assert metrics.top_k_accuracy(Y, P, 2) == 0.75  # image 2's true class ranks third
    assert metrics.top_k_accuracy(Y, P, 3) == 1.0
    assert metrics.top_k_accuracy(Y, P, 5) == 1.0


def test_confusion_and_per_class_by_hand():
    assert metrics.confusion(Y, P).tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    report = metrics.per_class(Y, P, CLASSES)
    assert report["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert report["b"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert report["c"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert metrics.macro_f1(Y, P) == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)


def test_undefined_per_class_scores_are_none_not_zero():
    y = np.array([0, 0])
    p = np.array([[0.9, 0.1, 0.0], [0.2, 0.0, 0.8]])
    report = metrics.per_class(y, p, CLASSES)
    assert report["b"] == {"precision": None, "recall": None, "f1": None, "support": 0}  # never predicted, absent
    assert report["c"]["precision"] == 0.0 and report["c"]["recall"] is None


def test_log_loss_by_hand_and_clipped():
    expected = -(math.log(0.7) + math.log(0.6) + math.log(0.2) + math.log(0.6)) / 4
    assert metrics.log_loss(Y, P) == pytest.approx(expected)
    # A certain, wrong call costs -ln(EPS), not infinity.
    assert metrics.log_loss([1], [[1.0, 0.0]]) == pytest.approx(-math.log(metrics.EPS))


def test_reliability_by_hand():
    # Confidences 0.7, 0.6, 0.5, 0.6 with 2 bins [0, .5], (.5, 1]: bin 0 holds image 2 (wrong),
    # bin 1 holds the three right ones at mean confidence 1.9 / 3.
    summary = metrics.reliability(Y, P, n_bins=2)
    low, high = summary["bins"]
    assert (low["count"], low["accuracy"], low["confidence"]) == (1, 0.0, 0.5)
    assert (high["count"], high["accuracy"]) == (3, 1.0)
    assert high["confidence"] == pytest.approx(1.9 / 3)
    assert summary["ece"] == pytest.approx(0.25 * 0.5 + 0.75 * (1 - 1.9 / 3))
    empty = metrics.reliability(Y, P, n_bins=10)["bins"][0]
    assert empty["count"] == 0 and empty["accuracy"] is None


def test_mistake_order_most_confident_first():
    y = np.array([0, 1, 2, 0])
    p = np.array([[0.1, 0.8, 0.1], [0.1, 0.9, 0.0], [0.95, 0.05, 0.0], [0.2, 0.2, 0.6]])
    assert metrics.mistake_order(y, p).tolist() == [2, 0, 3]
    assert metrics.mistake_order(y, p, k=1).tolist() == [2]


def test_multiclass_metrics_is_the_parts():
    report = metrics.multiclass_metrics(Y, P, CLASSES, top_k=(1, 2, 3, 5))
    assert report["n"] == 4 and report["classes"] == CLASSES
    assert report["top_k_accuracy"] == {"top_1": 0.75, "top_2": 0.75, "top_3": 1.0}  # k > N left out
    assert report["accuracy"] == 0.75
    assert report["log_loss"] == metrics.log_loss(Y, P)
    assert report["confusion"] == metrics.confusion(Y, P).tolist()
    assert len(report["reliability_bins"]) == 10


def test_binary_equals_the_existing_binary_code():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p_dog = np.clip(rng.random(500) * 0.6 + 0.4 * y, 0, 1)
    p_dog[:5] = [0.5, 0.0, 1.0, 0.5, 1.0]  # a tie at the threshold and saturated calls
    binary = evaluate.classification_metrics(y, p_dog)
    for proba in (p_dog, np.column_stack([1 - p_dog, p_dog])):
        assert metrics.top_k_accuracy(y, proba, 1) == binary["accuracy"]
        assert metrics.log_loss(y, proba) == pytest.approx(binary["log_loss"], rel=1e-12)
        assert metrics.confusion(y, proba).tolist() == binary["confusion"]


@pytest.mark.parametrize("y, p, message", [
    ([], np.zeros((0, 3)), "no predictions"),
    ([0, 1], [[0.5, 0.5]], "2 labels but proba has 1 rows"),
    ([0, 3], [[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]], "class indices 0..2; found [3]"),
    ([0], [[0.5, 0.6, 0.0]], "rows must sum to 1"),
    ([0], [[np.nan, 0.5, 0.5]], "non-finite"),
    ([0], [[1.5, -0.5]], "in [0, 1]"),
    ([0], [[1.0]], "at least 2 class columns"),
    ([0.5], [[0.5, 0.5]], "whole class indices"),
    ([[0]], [[0.5, 0.5]], "1-D"),
])
def test_bad_inputs_are_one_line_typed_errors(y, p, message):
    with pytest.raises(InvalidPredictions, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        metrics.top_k_accuracy(y, p)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_bad_k_and_class_count():
    with pytest.raises(InvalidPredictions, match="k must be"):
        metrics.top_k_accuracy(Y, P, 0)
    with pytest.raises(InvalidPredictions, match="2 class names for 3"):
        metrics.per_class(Y, P, ["a", "b"])


def test_mistake_titles_name_both_classes():
    titles = plots.mistake_titles(Y, P, CLASSES, [2], names=["x.png"] * 4)
    assert titles == ["x.png\ntrue: c / pred: a (0.50)"]
    assert plots.mistake_titles(Y, P, CLASSES, []) == []


def test_confusion_matrix_png(tmp_path):
    cm = metrics.confusion(Y, P)
    out = plots.plot_confusion_matrix(cm, tmp_path / "cm.png", CLASSES)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="3x3"):
        plots.plot_confusion_matrix(np.zeros((2, 2)), tmp_path / "bad.png", CLASSES)


def test_the_binary_helpers_have_their_home_here():
    assert evaluate.log_loss is metrics.log_loss
    y = np.array([0, 1, 0, 1])
    p_dog = np.array([0.6, 0.55, 0.9, 0.2])
    # At 0.5 images 0, 2 (cats called dog) and 3 (a dog called cat) are wrong, most confident first.
    assert evaluate.worst_mistakes(y, p_dog).tolist() == [2, 3, 0] == metrics.mistake_order(y, p_dog).tolist()
    # At 0.7 image 0 becomes a cat (right) and image 1 a cat (wrong, at P(cat) = 0.45).
    assert evaluate.worst_mistakes(y, p_dog, threshold=0.7).tolist() == [2, 3, 1]
    with pytest.raises(InvalidPredictions, match="3 calls for 4 images"):
        metrics.mistake_order(y, p_dog, predicted=[0, 1, 0])
