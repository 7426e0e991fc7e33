"""How often a bot and a human pass Asirra challenges, with and without safeguards.

Only the number of mistakes in each response matters to a safeguard, so a simulation is two
steps: draw one mistake count per challenge (vectorised), then feed the counts in order to a
safeguard holding one client's state (a bot attacks again and again from the same client).

`asirra.captcha.experiments.defend_grid` runs a bot and a human through a grid of safeguard settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from asirra.calibration import predicted_labels
from asirra.captcha.challenge import CHALLENGE_SIZE
from asirra.captcha.safeguards import NoSafeguard, Safeguard, describe
from asirra.errors import ConfigError
from asirra.stats import sample_subsets, wilson_interval

HUMAN_CHALLENGE_SUCCESS = 0.996  # Elson et al. (2007): humans solve 99.6% of Asirra challenges


class SimulationError(ConfigError):
    """Inputs a simulation cannot run on."""


@dataclass(frozen=True)
class SimulationResult:
    """One agent's challenges under one safeguard."""

    agent: str
    safeguard: str  # the spec `asirra.captcha.safeguards.parse_safeguard` reads back
    attempted: int
    solved: int  # "pass" verdicts
    almost: int  # "almost" verdicts (partial credit)
    per_image_accuracy: float
    size: int = CHALLENGE_SIZE

    @property
    def solve_rate(self) -> float:
        return self.solved / self.attempted

    @property
    def ci(self) -> tuple[float, float]:
        """Wilson 95% interval of the solve rate."""
        return wilson_interval(self.solved, self.attempted)

    @property
    def p12(self) -> float:
        """The solve rate of a safeguard-free challenge if every image were an independent coin."""
        return self.per_image_accuracy**self.size

    def summary_lines(self, images: int, skipped: int) -> list[str]:
        """The result in two lines of text (`asirra captcha simulate`)."""
        low, high = self.ci
        return [f"{self.agent} on {images} images ({skipped} skipped): per-image accuracy "
                f"{self.per_image_accuracy:.4f}, p^12 = {self.p12:.2%}",
                f"safeguard {self.safeguard}: solved {self.solved} of {self.attempted} challenges = "
                f"{self.solve_rate:.2%} (95% CI {low:.2%} to {high:.2%})"]

    def to_dict(self) -> dict:
        low, high = self.ci
        return {
            "agent": self.agent,
            "safeguard": self.safeguard,
            "attempted": self.attempted,
            "solved": self.solved,
            "almost": self.almost,
            "solve_rate": self.solve_rate,
            "ci_low": low,
            "ci_high": high,
            "per_image_accuracy": self.per_image_accuracy,
            "p12": self.p12,
        }


# ---- mistake counts ---------------------------------------------------------------------------


def accuracy_for_challenge_success(challenge_success: float, size: int = CHALLENGE_SIZE) -> float:
    """The per-image accuracy p with p**size == challenge_success (e.g. 0.996 -> 0.99967)."""
    _check_probability(challenge_success, "challenge success")
    return challenge_success ** (1 / size)


def model_mistakes(
    proba, labels, n_challenges: int, rng: np.random.Generator, size: int = CHALLENGE_SIZE
) -> tuple[np.ndarray, float]:
    """Mistakes per random challenge for a bot that calls every image with P(dog) < 0.5 a cat.

    Returns the counts and the bot's per-image accuracy on the pool. The pool's own mix of easy
    and hard images is kept: challenges are drawn from it, not from a coin with the same accuracy.
    """
    proba, labels = np.asarray(proba, dtype=float), np.asarray(labels)
    if proba.ndim != 1 or proba.shape != labels.shape:
        raise SimulationError(f"need one P(dog) per label, got shapes {proba.shape} and {labels.shape}")
    if len(labels) < size:
        raise SimulationError(f"a challenge needs {size} images but the pool holds only {len(labels)}")
    if not np.isin(labels, (0, 1)).all():
        raise SimulationError("labels must be 0 (cat) or 1 (dog)")
    if not np.isfinite(proba).all():
        raise SimulationError("P(dog) must be finite for every image")
    _check_count(n_challenges)
    wrong = predicted_labels(proba) != labels
    picks = sample_subsets(rng, len(labels), size, n_challenges)
    return wrong[picks].sum(axis=1), float(1 - wrong.mean())


def agent_mistakes(
    per_image_accuracy: float, n_challenges: int, rng: np.random.Generator, size: int = CHALLENGE_SIZE
) -> np.ndarray:
    """Mistakes per challenge for an agent whose images are independently right with probability p."""
    _check_probability(per_image_accuracy, "per-image accuracy")
    _check_count(n_challenges)
    # the sum of `size` independent Bernoulli errors is one binomial draw
    return rng.binomial(size, 1 - per_image_accuracy, size=n_challenges)


def _check_probability(value: float, what: str) -> None:
    if not 0 <= value <= 1:
        raise SimulationError(f"{what} must be between 0 and 1, got {value}")


def _check_count(n_challenges: int) -> None:
    if n_challenges < 1:
        raise SimulationError(f"the number of challenges must be at least 1, got {n_challenges}")


# ---- judging ------------------------------------------------------------------------------------


def judge_responses(
    mistakes: Iterable[int], safeguard: Safeguard, agent: str, per_image_accuracy: float, size: int = CHALLENGE_SIZE
) -> SimulationResult:
    """Feed the responses, in order, to one client's state under `safeguard` and count verdicts."""
    state = safeguard.new_state()
    counts = {"pass": 0, "almost": 0, "fail": 0}
    for m in mistakes:
        counts[safeguard.judge(state, int(m))] += 1
    return SimulationResult(
        agent=agent,
        safeguard=describe(safeguard),
        attempted=sum(counts.values()),
        solved=counts["pass"],
        almost=counts["almost"],
        per_image_accuracy=per_image_accuracy,
        size=size,
    )


def simulate_model(
    proba,
    labels,
    n_challenges: int,
    safeguard: Safeguard | None = None,
    rng: np.random.Generator | None = None,
    agent: str = "model",
    size: int = CHALLENGE_SIZE,
) -> SimulationResult:
    """A classifier bot on random challenges from a labelled pool it has already scored.

    `proba` is P(dog) per pool image, computed once by the caller; `labels` are 0 cat / 1 dog.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    mistakes, accuracy = model_mistakes(proba, labels, n_challenges, rng, size)
    return judge_responses(mistakes, safeguard or NoSafeguard(), agent, accuracy, size)


def simulate_agent(
    per_image_accuracy: float | None = None,
    *,
    challenge_success: float | None = None,
    n_challenges: int,
    safeguard: Safeguard | None = None,
    rng: np.random.Generator | None = None,
    agent: str = "agent",
    size: int = CHALLENGE_SIZE,
) -> SimulationResult:
    """A synthetic agent with independent per-image errors, given its per-image accuracy or the
    fraction of bare challenges it solves (a human: challenge_success=0.996)."""
    if (per_image_accuracy is None) == (challenge_success is None):
        raise SimulationError("give exactly one of per_image_accuracy and challenge_success")
    if per_image_accuracy is None:
        per_image_accuracy = accuracy_for_challenge_success(challenge_success, size)
    rng = rng if rng is not None else np.random.default_rng(0)
    mistakes = agent_mistakes(per_image_accuracy, n_challenges, rng, size)
    return judge_responses(mistakes, safeguard or NoSafeguard(), agent, per_image_accuracy, size)


def score_pool(data, classifier, limit: int | None = None, seed: int = 0, progress: bool = True):
    """The labelled cat/dog pool at `data` (a random `limit` of it) scored once by `classifier`:
    asirra.predict.Predictions, unreadable images skipped and listed in `.unusable`."""
    from asirra.data import scan
    from asirra.predict import predict_refs
    from asirra.stats import random_subset

    if not classifier.is_cat_dog:  # the simulation scores P(dog) of a cat/dog pool
        raise SimulationError(f"the CAPTCHA simulation needs a cat/dog model; {classifier.name} has classes "
                              f"{', '.join(classifier.classes)}")
    refs = scan(data, labelled=True)
    return predict_refs(classifier, [refs[i] for i in random_subset(len(refs), limit, seed)], progress=progress)
