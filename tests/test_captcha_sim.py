"""The challenge simulator: solve rates match theory, safeguards separate bots from humans."""

import math

import numpy as np
import pytest

from asirra.captcha.challenge import count_mistakes
from asirra.captcha.experiments.defend_grid import family
from asirra.captcha.experiments.simulate import (
    SimulationError,
    accuracy_for_challenge_success,
    agent_mistakes,
    judge_responses,
    model_mistakes,
    simulate_agent,
    simulate_model,
)
from asirra.captcha.safeguards import NoSafeguard, PartialCredit, TokenBucket
from asirra.stats import sample_subsets

HUMAN = 0.996


def within_standard_errors(rate, expected, n, k=4):
    return abs(rate - expected) <= k * math.sqrt(expected * (1 - expected) / n)


def test_agent_solve_rate_matches_p_to_the_twelfth():
    result = simulate_agent(0.9, n_challenges=4000, rng=np.random.default_rng(0))
    assert result.attempted == 4000
    assert result.p12 == pytest.approx(0.9**12)
    assert within_standard_errors(result.solve_rate, 0.9**12, 4000)
    assert result.ci[0] < 0.9**12 < result.ci[1]


def test_agent_mistakes_follow_the_binomial_mean():
    mistakes = agent_mistakes(0.8, 20_000, np.random.default_rng(1))
    assert mistakes.min() >= 0 and mistakes.max() <= 12
    assert mistakes.mean() == pytest.approx(12 * 0.2, abs=0.05)


def test_human_from_challenge_success():
    assert accuracy_for_challenge_success(HUMAN) ** 12 == pytest.approx(HUMAN)
    result = simulate_agent(challenge_success=HUMAN, n_challenges=20_000, agent="human")
    assert result.agent == "human"
    assert within_standard_errors(result.solve_rate, HUMAN, 20_000)


def test_agent_needs_exactly_one_skill_measure():
    with pytest.raises(SimulationError, match="exactly one"):
        simulate_agent(0.9, challenge_success=0.5, n_challenges=10)
    with pytest.raises(SimulationError, match="exactly one"):
        simulate_agent(n_challenges=10)


@pytest.mark.parametrize("accuracy", [-0.1, 1.5])
def test_agent_accuracy_must_be_a_probability(accuracy):
    with pytest.raises(SimulationError, match="between 0 and 1"):
        simulate_agent(accuracy, n_challenges=10)


def test_perfect_and_hopeless_agents():
    assert simulate_agent(1.0, n_challenges=500).solve_rate == 1.0
    assert simulate_agent(0.0, n_challenges=500).solve_rate == 0.0


def test_same_seed_same_result():
    run = lambda: simulate_agent(0.85, n_challenges=2000, safeguard=TokenBucket(), rng=np.random.default_rng(5))
    assert run() == run()


def test_token_bucket_holds_a_bot_well_below_its_raw_rate_while_humans_pass():
    rng = np.random.default_rng(2)
    bot_raw = simulate_agent(0.9, n_challenges=10_000, rng=rng).solve_rate
    bot = simulate_agent(0.9, n_challenges=10_000, safeguard=TokenBucket(), rng=rng).solve_rate
    human = simulate_agent(challenge_success=HUMAN, n_challenges=10_000, safeguard=TokenBucket(), rng=rng)
    assert bot < 0.5 * bot_raw
    assert human.solve_rate > 0.99


def test_partial_credit_helps_a_bot_more_than_a_human():
    mistakes = agent_mistakes(0.9, 10_000, np.random.default_rng(3))
    bare = judge_responses(mistakes, NoSafeguard(), "bot", 0.9).solve_rate
    lenient = judge_responses(mistakes, PartialCredit(), "bot", 0.9)
    assert lenient.solve_rate > bare + 0.05
    assert lenient.almost > 0


def test_judge_keeps_one_client_state_across_challenges():
    # a 1-token bucket: after the failure, the right answer is refused, the one after passes
    result = judge_responses([1, 0, 0], TokenBucket(capacity=1), "bot", 0.9)
    assert (result.attempted, result.solved) == (3, 1)


def test_model_mistakes_count_wrong_images_in_each_challenge():
    labels = np.array([0, 1] * 12)
    proba = np.where(labels == 1, 0.9, 0.1)
    proba[[0, 1]] = [0.7, 0.2]  # one cat called a dog, one dog called a cat
    rng = np.random.default_rng(4)
    mistakes, accuracy = model_mistakes(proba, labels, 300, rng)
    assert accuracy == pytest.approx(22 / 24)
    # the same draws, counted the slow way through the challenge answer
    picks = sample_subsets(np.random.default_rng(4), 24, 12, 300)
    cats = proba < 0.5
    slow = [count_mistakes(np.flatnonzero(cats[row]), frozenset(np.flatnonzero(labels[row] == 0))) for row in picks]
    assert mistakes.tolist() == slow


def test_model_at_half_is_called_a_dog():
    labels = np.zeros(12, dtype=int)
    result = simulate_model(np.full(12, 0.5), labels, 10)
    assert result.per_image_accuracy == 0.0 and result.solved == 0


def test_model_solve_rate_matches_its_accuracy():
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 2, 5000)
    wrong = rng.random(5000) < 0.05
    proba = np.where(labels == 1, 0.8, 0.2)
    proba[wrong] = 1 - proba[wrong]
    result = simulate_model(proba, labels, 4000, rng=rng)
    assert result.per_image_accuracy == pytest.approx(1 - wrong.mean())
    assert within_standard_errors(result.solve_rate, result.p12, 4000)


@pytest.mark.parametrize(
    "proba, labels, message",
    [
        (np.full(5, 0.2), np.zeros(5, dtype=int), "pool holds only 5"),
        (np.full(20, 0.2), np.zeros(19, dtype=int), "one P\\(dog\\) per label"),
        (np.full(20, np.nan), np.zeros(20, dtype=int), "finite"),
        (np.full(20, 0.2), np.full(20, 2), "0 \\(cat\\) or 1 \\(dog\\)"),
    ],
)
def test_model_simulation_refuses_bad_pools(proba, labels, message):
    with pytest.raises(SimulationError, match=message):
        simulate_model(proba, labels, 10)


def test_result_dict_has_the_reported_fields():
    fields = simulate_agent(0.9, n_challenges=100).to_dict()
    for key in ("attempted", "solved", "solve_rate", "ci_low", "ci_high", "per_image_accuracy", "p12", "safeguard"):
        assert key in fields
    assert fields["safeguard"] == "none"


@pytest.mark.parametrize(
    "safeguard, expected",
    [
        (NoSafeguard(), "none"),
        (PartialCredit(needed=3), "partial-credit"),
        (TokenBucket(capacity=5), "token-bucket"),
        (TokenBucket(inner=PartialCredit()), "token-bucket + partial-credit"),
    ],
)
def test_family_groups_settings_by_kind(safeguard, expected):
    assert family(safeguard) == expected
