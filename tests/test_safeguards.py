"""Exact verdict sequences for each safeguard policy, and how policies are named and built."""

import pytest

from asirra.captcha.safeguards import (
    NoSafeguard,
    PartialCredit,
    SafeguardError,
    TokenBucket,
    describe,
    make_safeguard,
    parse_safeguard,
)


def verdicts(policy, mistakes):
    state = policy.new_state()
    return [policy.judge(state, m) for m in mistakes]


def test_no_safeguard_passes_only_a_perfect_response():
    assert verdicts(NoSafeguard(), [0, 1, 2, 12, 0]) == ["pass", "fail", "fail", "fail", "pass"]


def test_partial_credit_second_consecutive_almost_passes():
    assert verdicts(PartialCredit(), [1, 1]) == ["almost", "pass"]


def test_partial_credit_pass_from_almosts_starts_a_new_streak():
    assert verdicts(PartialCredit(), [1, 1, 1, 1, 1]) == ["almost", "pass", "almost", "pass", "almost"]


def test_partial_credit_failure_resets_the_streak():
    assert verdicts(PartialCredit(), [1, 2, 1, 1]) == ["almost", "fail", "almost", "pass"]


def test_partial_credit_clean_pass_resets_the_streak():
    assert verdicts(PartialCredit(), [1, 0, 1, 1]) == ["almost", "pass", "almost", "pass"]


def test_partial_credit_needed_three_and_wider_almost():
    policy = PartialCredit(almost_mistakes=2, needed=3)
    assert verdicts(policy, [2, 1, 2, 3, 1]) == ["almost", "almost", "pass", "fail", "almost"]


def test_partial_credit_needed_one_passes_every_near_miss():
    assert verdicts(PartialCredit(needed=1), [1, 2]) == ["pass", "fail"]


def test_token_bucket_full_bucket_behaves_like_no_safeguard():
    assert verdicts(TokenBucket(capacity=3), [1, 0, 1, 0]) == ["fail", "pass", "fail", "pass"]


def test_token_bucket_empty_bucket_rejects_first_right_answer_then_accepts_the_next():
    # three failures empty a 3-token bucket; the right answer then only refills one token
    assert verdicts(TokenBucket(capacity=3), [1, 1, 1, 0, 0]) == ["fail", "fail", "fail", "fail", "pass"]


def test_token_bucket_failure_after_reopening_empties_it_again():
    assert verdicts(TokenBucket(capacity=3), [1, 1, 1, 0, 1, 0, 0]) == ["fail"] * 6 + ["pass"]


def test_token_bucket_wrong_answers_while_empty_keep_it_empty():
    assert verdicts(TokenBucket(capacity=1), [1, 1, 1, 0, 0]) == ["fail", "fail", "fail", "fail", "pass"]


def test_token_bucket_refill_is_capped_at_capacity():
    policy = TokenBucket(capacity=2)
    state = policy.new_state()
    for mistakes in [0, 0, 0, 1, 1]:
        policy.judge(state, mistakes)
    assert state.tokens == 0


def test_token_bucket_cost_per_failure_drains_faster():
    assert verdicts(TokenBucket(capacity=4, cost_per_failure=2), [1, 1, 0, 0]) == ["fail", "fail", "fail", "pass"]


def test_token_bucket_refill_when_empty_can_reopen_at_once():
    policy = TokenBucket(capacity=3, refill_when_empty=2)
    state = policy.new_state()
    assert [policy.judge(state, m) for m in [1, 1, 1, 0]] == ["fail"] * 4
    assert state.tokens == 2


def test_token_bucket_wrapping_partial_credit_charges_near_misses():
    policy = TokenBucket(capacity=1, inner=PartialCredit())
    # the almost costs the only token, so the second one finds the bucket empty and its inner pass only
    # refills; the next clean answer then passes
    assert verdicts(policy, [1, 1, 0]) == ["almost", "fail", "pass"]


def test_token_bucket_wrapping_partial_credit_lets_a_lone_slip_through():
    policy = TokenBucket(capacity=3, inner=PartialCredit())
    assert verdicts(policy, [0, 1, 1, 0]) == ["pass", "almost", "pass", "pass"]


def test_token_bucket_rejects_everything_while_empty_whatever_the_inner_verdict():
    policy = TokenBucket(capacity=1, inner=PartialCredit())
    assert verdicts(policy, [5, 1, 1, 0]) == ["fail", "fail", "fail", "pass"]


def test_each_client_state_is_independent():
    policy = TokenBucket(capacity=1)
    bot, human = policy.new_state(), policy.new_state()
    assert policy.judge(bot, 3) == "fail"
    assert policy.judge(human, 0) == "pass"
    assert policy.judge(bot, 0) == "fail"


@pytest.mark.parametrize("policy", [NoSafeguard(), PartialCredit(), TokenBucket()])
def test_negative_mistakes_are_refused(policy):
    with pytest.raises(SafeguardError, match="negative"):
        policy.judge(policy.new_state(), -1)


def test_make_safeguard_by_name_with_parameters():
    policy = make_safeguard("token-bucket", capacity=5, inner="partial-credit")
    assert policy == TokenBucket(capacity=5, inner=PartialCredit())
    assert make_safeguard("none") == NoSafeguard()


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("captcha-wall", {}, "unknown safeguard 'captcha-wall'"),
        ("token-bucket", {"size": 3}, "does not take size"),
        ("none", {"needed": 2}, "accepts no parameters"),
        ("token-bucket", {"capacity": 0}, "capacity to be a whole number >= 1"),
        ("partial-credit", {"needed": 1.5}, "needed to be a whole number"),
    ],
)
def test_make_safeguard_refuses_bad_names_and_parameters(name, params, message):
    with pytest.raises(SafeguardError, match=message):
        make_safeguard(name, **params)


@pytest.mark.parametrize(
    "spec", ["none", "partial-credit", "partial-credit:needed=3", "token-bucket:capacity=5,inner=partial-credit"]
)
def test_describe_and_parse_round_trip(spec):
    assert describe(parse_safeguard(spec)) == spec


@pytest.mark.parametrize("spec", ["token-bucket:capacity", "token-bucket:capacity=2.5", "token-bucket:capacity=x"])
def test_parse_safeguard_refuses_malformed_specs(spec):
    with pytest.raises(SafeguardError, match="capacity"):
        parse_safeguard(spec)
