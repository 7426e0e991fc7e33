"""From a logit to a decision: temperature scaling and the one threshold rule.

Every P(dog) in the package is `apply_temperature(logit, T)` with the T fitted here on held-out
logits, and every cat/dog call is `predicted_labels(p)`: training, evaluation, prediction,
submissions and the CAPTCHA solver all decide the same way. For N classes, `probabilities` and
`predicted_index` are the same two steps (softmax(z / T), argmax), and reduce to them for two.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

from asirra.errors import UserError
from asirra.labels import CAT, DOG

THRESHOLD = 0.5  # P(dog) at or above it is a dog; a tie counts as dog

# Log loss clips probabilities to [EPS, 1 - EPS]. A float32 sigmoid rounds to exactly 0 or 1 for
# |logit| > ~17, and one such confidently wrong image would make the log loss infinite and the
# average meaningless. EPS = 1e-6 caps any single image's penalty at -ln(1e-6) ~ 13.8 nats, which
# still punishes overconfidence hard; Kaggle's 1e-15 is below float32 resolution near 1.
EPS = 1e-6

# Temperature scaling searches T in this range: a separable validation set drives the NLL-optimal
# T towards 0 (infinitely sharp), and a useless model drives it towards infinity.
T_MIN, T_MAX = 0.05, 20.0


class InvalidPredictions(UserError):
    """Labels or probabilities that cannot be evaluated (wrong shape, length, or values)."""


def as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise InvalidPredictions(f"{name} must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise InvalidPredictions(f"{name} must be numeric, got dtype {array.dtype}")
    return array


def check_labels(y_true) -> np.ndarray:
    """Validate and convert labels to a non-empty int array of CAT (0) / DOG (1)."""
    y = as_1d(y_true, "y_true")
    if len(y) == 0:
        raise InvalidPredictions("no predictions to evaluate (empty arrays)")
    unknown = ~np.isin(y, (CAT, DOG))
    if unknown.any():
        found = np.unique(y[unknown])[:5].tolist()
        raise InvalidPredictions(f"y_true must hold only {CAT} (cat) and {DOG} (dog); found {found}")
    return y.astype(np.int64)


# ---- the decision -------------------------------------------------------------------------


def predicted_labels(p_dog, threshold: float = THRESHOLD) -> np.ndarray:
    """DOG where P(dog) >= threshold, else CAT (a tie at the threshold counts as dog)."""
    return np.where(np.asarray(p_dog) >= threshold, DOG, CAT)


# ---- temperature scaling ------------------------------------------------------------------


def logit(p_dog, eps: float = EPS) -> np.ndarray:
    """log(p / (1 - p)), clipped like the log loss. Prefer a model's raw logits when available:
    clipping saturated probabilities caps the logits at +-13.8 and biases a fitted temperature."""
    p = np.clip(np.asarray(p_dog, dtype=np.float64), eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """P(dog) = sigmoid(logit / T) for 1-D logits; softmax(logits / T), (n, N), for 2-D N-class logits."""
    if np.ndim(logits) == 2:
        return probabilities(logits, temperature)
    return expit(np.asarray(logits, dtype=np.float64) / temperature)


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    # log(1 + e^s) - y*s == -[y log sigmoid(s) + (1-y) log(1 - sigmoid(s))], without overflow.
    scaled = logits / temperature
    return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))


def fit_temperature(logits, y_true) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the NLL of sigmoid(logits / T).

    Fit on held-out data, never on the training set (where the model is overconfident by design).
    T > 1 softens an overconfident model, T < 1 sharpens an underconfident one. The search is over
    log T within [T_MIN, T_MAX], so a separable set returns T_MIN rather than running off to 0.
    """
    if np.ndim(logits) == 2:
        return fit_temperature_multiclass(logits, y_true)
    y = check_labels(y_true)
    z = as_1d(logits, "logits").astype(np.float64)
    if not np.isfinite(z).all():
        raise InvalidPredictions(f"logits has {int((~np.isfinite(z)).sum())} non-finite values (NaN or inf)")
    if len(y) != len(z):
        raise InvalidPredictions(f"y_true has {len(y)} labels but logits has {len(z)} values")
    result = minimize_scalar(
        lambda log_t: _nll(z, y, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


# ---- N classes ----------------------------------------------------------------------------
# Binary models keep one logit (z = logit P(class 1)), so every cat/dog figure is unchanged;
# N >= 3 models have N logits and a softmax. These helpers give both one (n, N) view.


def probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """(n, N) class probabilities: columns [1 - p, p] for 1-D or (n, 1) logits, else softmax(logits / T)."""
    from scipy.special import softmax

    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 1:
        z = z[:, 0]
    if z.ndim == 1:
        p = apply_temperature(z, temperature)
        return np.stack([1 - p, p], axis=1)
    if z.ndim != 2:
        raise InvalidPredictions(f"logits must be 1-D or (n, N), got shape {z.shape}")
    return softmax(z / temperature, axis=1)


def describe_row(proba_row, classes) -> str:
    """'dog 0.97', '7 0.93': the predicted class of one row of N probabilities, and that class's probability."""
    row = np.asarray(proba_row, dtype=np.float64).reshape(1, -1)
    index = int(predicted_index(row)[0])
    return f"{classes[index]} {row[0, index]:.2f}"


def predicted_index(proba) -> np.ndarray:
    """The predicted class of each row of (n, N) probabilities: the THRESHOLD rule on column 1 for
    two classes (a tie counts as class 1, as for dogs), argmax otherwise."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise InvalidPredictions(f"probabilities must be (n, N), got shape {p.shape}")
    if p.shape[1] == 2:
        return predicted_labels(p[:, 1]).astype(np.int64)
    return np.argmax(p, axis=1).astype(np.int64)


def _nll_softmax(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    from scipy.special import logsumexp

    scaled = logits / temperature
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(y)), y]))


def fit_temperature_multiclass(logits, y_true) -> float:
    """Temperature scaling of (n, N) logits with integer labels 0..N-1 (softmax NLL), same bounds as binary."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise InvalidPredictions(f"logits must be (n, N), got shape {z.shape}")
    y = as_1d(y_true, "y_true").astype(np.int64)
    if len(y) != len(z) or len(y) == 0:
        raise InvalidPredictions(f"y_true has {len(y)} labels but logits has {len(z)} rows")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise InvalidPredictions(f"y_true must hold class indices 0..{z.shape[1] - 1}")
    if not np.isfinite(z).all():
        raise InvalidPredictions(f"logits has {int((~np.isfinite(z)).sum())} non-finite values (NaN or inf)")
    result = minimize_scalar(lambda log_t: _nll_softmax(z, y, math.exp(log_t)),
                             bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))
