"""Drawing challenges from a labelled pool and counting a response's mistakes."""

from dataclasses import dataclass

import numpy as np
import pytest

from asirra.captcha.challenge import CHALLENGE_SIZE, ChallengeError, count_mistakes, draw_challenge
from asirra.labels import CAT, DOG


@dataclass(frozen=True)
class Ref:  # stands in for asirra.data.ImageRef: a challenge only reads the label
    name: str
    label: int | None


def pool(n, label_of=lambda i: CAT if i % 2 else DOG):
    return [Ref(f"img{i}", label_of(i)) for i in range(n)]


def test_challenge_has_twelve_distinct_images_from_the_pool():
    images = pool(40)
    challenge = draw_challenge(images, np.random.default_rng(0))
    assert len(challenge.refs) == CHALLENGE_SIZE
    assert len(set(challenge.refs)) == CHALLENGE_SIZE
    assert set(challenge.refs) <= set(images)


def test_answer_is_the_indices_of_the_cats():
    challenge = draw_challenge(pool(30), np.random.default_rng(1))
    assert challenge.answer == {i for i, ref in enumerate(challenge.refs) if ref.label == CAT}


def test_a_pool_of_exactly_twelve_is_shown_whole():
    images = pool(12)
    assert set(draw_challenge(images, np.random.default_rng(2)).refs) == set(images)


def test_same_seed_same_challenge_and_draws_vary():
    images = pool(100)
    first = draw_challenge(images, np.random.default_rng(7))
    assert first == draw_challenge(images, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    assert len({draw_challenge(images, rng) for _ in range(20)}) > 1


def test_too_small_pool_is_refused():
    with pytest.raises(ChallengeError, match="needs 12 images but the pool holds only 11"):
        draw_challenge(pool(11), np.random.default_rng(0))


def test_unlabelled_pool_is_refused():
    with pytest.raises(ChallengeError, match="1 of 20 in the pool have no label"):
        draw_challenge(pool(20, lambda i: None if i == 5 else CAT), np.random.default_rng(0))


def test_count_mistakes_is_the_symmetric_difference():
    answer = frozenset({0, 3, 7})
    assert count_mistakes([0, 3, 7], answer) == 0
    assert count_mistakes([0, 3], answer) == 1  # a cat missed
    assert count_mistakes([0, 3, 7, 11], answer) == 1  # a dog selected
    assert count_mistakes([1, 2], answer) == 5
    assert count_mistakes([0, 0, 3, 7], answer) == 0  # a repeated click is one selection


@pytest.mark.parametrize(
    "selected, message", [([12], "outside"), ([-1], "outside"), (["3"], "integer"), ([True], "integer")]
)
def test_count_mistakes_refuses_indices_that_are_not_in_the_challenge(selected, message):
    with pytest.raises(ChallengeError, match=message):
        count_mistakes(selected, frozenset({1}))
