"""Route selection shortcuts give the answers of the plain code (untimed): choose_destination with the
cumulative weights cached per route action draws exactly what pick_weighted draws."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from policy.routing.select import Forward, choose_destination, pick_weighted


@dataclass(frozen=True)
class _Dest:
    name: str
    weight: int


@given(st.lists(st.integers(min_value=-5, max_value=100), min_size=1, max_size=6), st.integers(0, 2**32))
def test_choose_destination_draws_what_pick_weighted_draws(weights, seed):
    forward = Forward(tuple(_Dest(f"d{i}", w) for i, w in enumerate(weights)), None, None)
    a, b = random.Random(seed), random.Random(seed)
    for _ in range(20):
        try:
            expected = pick_weighted([(d, d.weight) for d in forward.destinations], b)
        except ValueError as err:
            try:
                choose_destination(forward, a)
            except ValueError as mine:
                assert str(mine) == str(err)
            else:
                raise AssertionError("choose_destination did not refuse all-zero weights")
            return
        assert choose_destination(forward, a) is expected
    assert a.random() == b.random()   # the same number of draws


def test_should_retry_by_status_table_answers_what_retriable_answers():
    """RetryPolicy.should_retry looks a plain status up in a table built from retriable(): every status,
    with and without a gRPC status and for errors, under policies covering each retry_on family."""
    from policy.routing.model import (CONNECT_FAILURE, DEFAULT_RETRY_POLICY, GRPC_RETRY_ON, NO_RETRY,
                                      PER_TRY_TIMEOUT, REFUSED_STREAM, RESET, RESET_BEFORE_REQUEST, Outcome,
                                      RetryPolicy)
    policies = [DEFAULT_RETRY_POLICY, NO_RETRY,
                RetryPolicy(3, frozenset({"5xx"})), RetryPolicy(2, frozenset({"gateway-error", "retriable-4xx"})),
                RetryPolicy(1, frozenset({"retriable-status-codes"}), frozenset({418, 999, 1001})),
                RetryPolicy(2, frozenset({"envoy-ratelimited", "unavailable", "reset"}))]
    outcomes = [Outcome(s) for s in range(0, 1005)] + [Outcome(None)] + [
        Outcome(200, None, g) for g in list(GRPC_RETRY_ON.values()) + [0, 2]] + [
        Outcome(error=e) for e in (CONNECT_FAILURE, REFUSED_STREAM, RESET, RESET_BEFORE_REQUEST, PER_TRY_TIMEOUT, "x")]
    for policy in policies:
        for attempt in (1, 2, 3, 4):
            for o in outcomes:
                assert policy.should_retry(attempt, o) == (attempt < policy.max_requests and policy.retriable(o)), \
                    (policy, attempt, o)
        assert policy.should_retry(1, 503) == (policy.max_requests > 1 and policy.retriable(503))   # ints, strs too
        assert policy.should_retry(1, RESET) == (policy.max_requests > 1 and policy.retriable(RESET))
