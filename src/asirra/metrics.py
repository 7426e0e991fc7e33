"""How good an N-class classifier is, from its predictions: top-k accuracy, per-class scores, log loss.

Everything here works on `y_true` (class indices 0..N-1) and `proba` (an (n, N) array of predicted
class probabilities, one row per image), so it is independent of how the predictions were made and
of what the classes are called. For N = 2 a 1-D `proba` is read as P(class 1), e.g. P(dog), and the
figures equal the binary code's in asirra.evaluation: same decision rule, same log-loss clipping.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, top_k_accuracy_score

from asirra.calibration import EPS, InvalidPredictions, as_1d
from asirra.calibration import predicted_index as _predicted_index  # the one home of the top-1 rule

# Rows of `proba` must sum to 1 within this: float32 softmax outputs written to CSV with 6 digits
# drift by ~1e-6 per entry, so 1e-4 accepts them for any realistic N and still catches logits or
# unnormalised scores passed by mistake.
ROW_SUM_TOLERANCE = 1e-4


# ---- inputs ---------------------------------------------------------------------------------


def check_multiclass(y_true, proba, classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: labels -> int64 (n,), probabilities -> float64 (n, N) with rows summing to 1."""
    y = as_1d(y_true, "y_true")
    if len(y) == 0:
        raise InvalidPredictions("no predictions to evaluate (empty arrays)")
    if y.dtype.kind == "f" and not np.all(np.mod(y, 1) == 0):
        raise InvalidPredictions("y_true must hold whole class indices")
    y = y.astype(np.int64)
    p = np.asarray(proba)
    if p.dtype.kind not in "biuf":
        raise InvalidPredictions(f"proba must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if p.ndim == 1:  # binary P(class 1), e.g. P(dog)
        p = np.column_stack([1.0 - p, p])
    if p.ndim != 2:
        raise InvalidPredictions(f"proba must be (n, N) or 1-D P(class 1), got shape {p.shape}")
    if p.shape[1] < 2:
        raise InvalidPredictions(f"proba must have at least 2 class columns, got {p.shape[1]}")
    if len(p) != len(y):
        raise InvalidPredictions(f"y_true has {len(y)} labels but proba has {len(p)} rows")
    n_classes = p.shape[1]
    if classes is not None and len(classes) != n_classes:
        raise InvalidPredictions(f"{len(classes)} class names for {n_classes} probability columns")
    if not np.isfinite(p).all():
        raise InvalidPredictions(f"proba has {int((~np.isfinite(p)).sum())} non-finite values (NaN or inf)")
    if p.min() < 0 or p.max() > 1:
        raise InvalidPredictions(f"proba must be probabilities in [0, 1]; found range [{p.min():g}, {p.max():g}]")
    sums = p.sum(axis=1)
    bad = np.abs(sums - 1.0) > ROW_SUM_TOLERANCE
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InvalidPredictions(f"proba rows must sum to 1; {int(bad.sum())} do not (row {row} sums to {sums[row]:.6g})")
    unknown = (y < 0) | (y >= n_classes)
    if unknown.any():
        found = np.unique(y[unknown])[:5].tolist()
        raise InvalidPredictions(f"y_true must hold class indices 0..{n_classes - 1}; found {found}")
    return y, p


def _check_k(k: int) -> int:
    if int(k) != k or k < 1:
        raise InvalidPredictions(f"k must be a whole number >= 1, got {k}")
    return int(k)


# ---- metrics --------------------------------------------------------------------------------


def predictions(proba) -> np.ndarray:
    """The top-1 class index of each row (the package's decision rule; see asirra.calibration)."""
    return np.asarray(_predicted_index(np.asarray(proba)), dtype=np.int64)


def top_k_accuracy(y_true, proba, k: int = 1) -> float:
    """Fraction of images whose true class is among the k most probable. k >= N gives 1.0."""
    y, p = check_multiclass(y_true, proba)
    k = _check_k(k)
    if k == 1:  # the decision rule, so that N = 2 ties go the way the binary code sends them
        return float(np.mean(predictions(p) == y))
    if k >= p.shape[1]:
        return 1.0
    return float(top_k_accuracy_score(y, p, k=k, labels=np.arange(p.shape[1])))


def confusion(y_true, proba) -> np.ndarray:
    """(N, N) counts: rows are the true class, columns the predicted one."""
    y, p = check_multiclass(y_true, proba)
    return confusion_matrix(y, predictions(p), labels=np.arange(p.shape[1])).astype(np.int64)


def per_class(y_true, proba, classes: Sequence[str]) -> dict[str, dict]:
    """{class: {precision, recall, f1, support}}. Precision is None for a class never predicted,
    recall and F1 are None for a class absent from y_true: undefined, not zero."""
    y, p = check_multiclass(y_true, proba, classes)
    predicted = predictions(p)
    labels = np.arange(p.shape[1])
    precision, recall, f1, support = precision_recall_fscore_support(
        y, predicted, labels=labels, zero_division=0)
    n_predicted = np.bincount(predicted, minlength=len(labels))
    return {
        str(name): {
            "precision": float(precision[i]) if n_predicted[i] else None,
            "recall": float(recall[i]) if support[i] else None,
            "f1": float(f1[i]) if support[i] else None,
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }


def macro_f1(y_true, proba) -> float:
    """Unweighted mean of the per-class F1 over all N classes (an undefined F1 counts as 0)."""
    y, p = check_multiclass(y_true, proba)
    return float(f1_score(y, predictions(p), labels=np.arange(p.shape[1]), average="macro", zero_division=0))


def log_loss(y_true, proba) -> float:
    """Mean cross-entropy in nats, -ln p(true class), clipped to [EPS, 1 - EPS] as in asirra.calibration.

    Not sklearn.metrics.log_loss: it renormalises rows and clips at float eps, so one saturated
    wrong image would dominate; this clipping makes N = 2 equal the binary log loss exactly.
    """
    y, p = check_multiclass(y_true, proba)
    p_true = np.clip(p[np.arange(len(y)), y], EPS, 1 - EPS)
    return float(-np.mean(np.log(p_true)))


def reliability(y_true, proba, n_bins: int = 10) -> dict:
    """Confidence calibration of the top-1 call: expected calibration error (ECE) and its bins.

    Confidence is the highest probability of each row; `n_bins` equal bins (low, high] split [0, 1]
    (the first also holds 0). ECE = sum over bins of (count / n) * |accuracy - mean confidence|. Empty bins are
    listed with count 0 and None for their means.
    """
    y, p = check_multiclass(y_true, proba)
    if int(n_bins) != n_bins or n_bins < 1:
        raise InvalidPredictions(f"n_bins must be a whole number >= 1, got {n_bins}")
    n_bins = int(n_bins)
    confidence = p.max(axis=1)
    correct = (predictions(p) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        inside = which == b
        count = int(inside.sum())
        mean_conf = float(confidence[inside].mean()) if count else None
        accuracy = float(correct[inside].mean()) if count else None
        if count:
            ece += count / len(y) * abs(accuracy - mean_conf)
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "confidence": mean_conf, "accuracy": accuracy})
    return {"ece": float(ece), "n_bins": n_bins, "bins": bins}


def mistake_order(y_true, proba, k: int = 24, predicted=None) -> np.ndarray:
    """Indices of up to `k` wrong calls, the most confident (highest probability of the called class) first.

    The calls are the top-1 rule's unless `predicted` (one class index per image) gives them, e.g.
    cat/dog calls at a threshold other than 0.5 (asirra.evaluation.worst_mistakes).
    """
    y, p = check_multiclass(y_true, proba)
    k = _check_k(k)
    predicted = predictions(p) if predicted is None else np.asarray(predicted, dtype=np.int64)
    if predicted.shape != y.shape:
        raise InvalidPredictions(f"{len(predicted)} calls for {len(y)} images")
    wrong = np.flatnonzero(predicted != y)
    order = np.argsort(-p[wrong, predicted[wrong]], kind="stable")  # stable: ties keep dataset order
    return wrong[order[:k]]


def multiclass_metrics(y_true, proba, classes: Sequence[str], top_k: Sequence[int] = (1, 3), n_bins: int = 10) -> dict:
    """All of the above as one JSON-ready dict. Top-k entries with k > N are left out (k = N is 1.0)."""
    y, p = check_multiclass(y_true, proba, classes)
    n_classes = p.shape[1]
    calibration = reliability(y, p, n_bins)
    return {
        "n": int(len(y)),
        "classes": [str(c) for c in classes],
        "accuracy": top_k_accuracy(y, p, 1),
        "top_k_accuracy": {f"top_{k}": top_k_accuracy(y, p, k) for k in map(_check_k, top_k) if k <= n_classes},
        "macro_f1": macro_f1(y, p),
        "log_loss": log_loss(y, p),
        "ece": calibration["ece"],
        "per_class": per_class(y, p, classes),
        "confusion": confusion(y, p).tolist(),
        "reliability_bins": calibration["bins"],
    }
