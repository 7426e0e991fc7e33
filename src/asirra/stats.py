"""Intervals and random subsets: the one home of each, for every figure and every `--limit`.

- `wilson_interval`: a binomial proportion's 95% interval (accuracy on n images, challenges passed);
- `t_interval`: the mean of k fold scores with a Student-t interval, optionally corrected for the
  overlap of cross-validation training sets (Nadeau & Bengio);
- `stratified_subset`: a seeded subset keeping each class's share (`train --limit`, `evaluate --limit`);
- `random_subset`: a seeded uniform subset, for unlabelled or any-order pools;
- `sample_subsets`: many random k-subsets at once (simulated 12-image challenges).

Light on purpose: scipy and scikit-learn load inside the two functions that need them, so the HTTP
bot can report intervals without them.
"""

from __future__ import annotations

import math

import numpy as np

from asirra.errors import DataError


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% for z = 1.96).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n
    successes, which is exactly where solve rates of good and bad classifiers sit.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    rate = successes / n
    denominator = 1 + z**2 / n
    centre = (rate + z**2 / (2 * n)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / n + z**2 / (4 * n**2)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def t_interval(values, test_train_ratio: float = 0.0, level: float = 0.95) -> dict:
    """Mean, std and a Student-t interval of the mean over k fold scores.

    With test_train_ratio = n_test / n_train the variance of the mean is Nadeau & Bengio's
    corrected (1/k + n_test/n_train) s^2 instead of s^2 / k: the folds' training sets overlap, so
    their scores are correlated and the plain interval is too narrow (Nadeau & Bengio, "Inference
    for the generalization error", Machine Learning 52, 2003).
    """
    from scipy import stats

    values = np.asarray(values, np.float64)
    k = len(values)
    mean = float(values.mean())
    if k < 2:
        return {"mean": mean, "std": None, "ci95": [None, None]}
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf((1 + level) / 2, k - 1) * math.sqrt((1 / k + test_train_ratio) * std**2))
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def stratified_subset(labels, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a stratified random `limit` of the images (all of them when limit is None)."""
    if not limit or limit >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    n_classes = len(np.unique(np.asarray(labels)))
    if limit < n_classes:
        raise DataError(f"a stratified subset of {limit} images cannot hold one of each of the {n_classes} classes")
    keep, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=np.asarray(labels), random_state=seed)
    return np.sort(keep)


def random_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a uniformly random `limit` of n items (all of them when limit is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def sample_subsets(rng: np.random.Generator, n: int, size: int, count: int) -> np.ndarray:
    """`count` uniformly random `size`-subsets of range(n), as a (count, size) index array.

    Floyd's algorithm, vectorised across rows: `size` steps of O(count * size) work, whatever n is,
    so 10,000 challenges from a pool of 19,000 images need no (count, n) matrix.
    """
    chosen = np.empty((count, size), dtype=np.int64)
    for step, j in enumerate(range(n - size, n)):
        candidate = rng.integers(0, j + 1, size=count)
        taken = (chosen[:, :step] == candidate[:, None]).any(axis=1)
        chosen[:, step] = np.where(taken, j, candidate)
    return chosen
