"""Endpoint choice, load balancing, outlier detection and retry decisions (reference/ztunnel.md §5.5,
istio-semantics.md §2.1–2.2), plus the weighted-choice property test."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from policy.routing import (
    DEFAULT_RETRY_POLICY, LoadBalancer, OutlierDetection, OutlierDetector, Outcome, RetryPolicy, endpoints_for,
    pick_weighted,
)
from policy.routing import Candidate
from tests.test_routing_common import MULTI, REVIEWS, inventory, wl

# ---------------------------------------------------------------------------------------------
# Weighted choice


@pytest.mark.parametrize("weights", [
    [90, 10], [50, 50], [1, 1, 1], [70, 20, 10], [1, 2, 3, 4], [5, 0, 5], [99, 1], [1_000_000, 500_000],
])
def test_weighted_choice_over_10000_draws_is_within_2_percent_of_its_weights(weights):
    rng = random.Random(0)
    counts = Counter(pick_weighted(list(enumerate(weights)), rng) for _ in range(10_000))
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(counts[i] / 10_000 - w / total) <= 0.02, (i, counts)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=1000), min_size=2, max_size=6).filter(lambda w: sum(w) > 0))
def test_weighted_choice_property_any_weight_vector(weights):
    rng = random.Random(0)
    counts = Counter(pick_weighted(list(enumerate(weights)), rng) for _ in range(10_000))
    total = sum(weights)
    for i, w in enumerate(weights):
        assert abs(counts[i] / 10_000 - w / total) <= 0.02
        if w == 0:
            assert counts[i] == 0       # weight 0 is never chosen


def test_weighted_choice_single_choice_gets_everything_and_all_zero_is_refused():
    assert pick_weighted([("only", 0)], random.Random(0)) == "only"
    with pytest.raises(ValueError):
        pick_weighted([("a", 0), ("b", 0)], random.Random(0))
    with pytest.raises(ValueError):
        pick_weighted([], random.Random(0))


# ---------------------------------------------------------------------------------------------
# Endpoints


def test_endpoints_are_healthy_only_and_must_have_the_service_port():
    inv = inventory()
    cands = endpoints_for(inv, REVIEWS, 9080, None)
    assert [c.workload.name for c in cands] == ["reviews-v1-0", "reviews-v2-0"]   # v3 is Unhealthy
    assert [c.key for c in cands] == ["10.0.1.1:9080", "10.0.1.2:9080"]
    assert endpoints_for(inv, MULTI, 80, None)[0].target_port == 8080
    assert endpoints_for(inv, MULTI, 9090, None) == ()          # the workload lacks port 9090


def test_endpoints_of_a_subset_have_all_its_labels():
    inv = inventory()
    assert [c.workload.name for c in endpoints_for(inv, REVIEWS, 9080, {"version": "v2"})] == ["reviews-v2-0"]
    assert endpoints_for(inv, REVIEWS, 9080, {"version": "v2", "app": "other"}) == ()
    assert endpoints_for(inv, REVIEWS, 9080, {"version": "v3"}) == ()       # only unhealthy ones


@pytest.mark.parametrize("lb", ["RANDOM", "ROUND_ROBIN", "LEAST_REQUEST"])
def test_load_balancing_is_weighted_by_workload_capacity(lb):
    cands = endpoints_for(inventory(), REVIEWS, 9080, None)         # capacities 1 and 3
    balancer, rng = LoadBalancer(), random.Random(0)
    counts = Counter(balancer.pick(cands, rng=rng, lb=lb, cluster="c").workload.name for _ in range(8000))
    assert abs(counts["reviews-v2-0"] / 8000 - 0.75) < 0.02


def test_round_robin_interleaves_deterministically():
    cands = endpoints_for(inventory(), REVIEWS, 9080, None)
    balancer = LoadBalancer()
    seq = [balancer.pick(cands, rng=random.Random(0), lb="ROUND_ROBIN", cluster="c").workload.name[8:10]
           for _ in range(8)]
    assert seq == ["v2", "v1", "v2", "v2"] * 2       # smooth weighted round robin, 3:1
    assert "round_robin_clusters=1" in repr(balancer)


def test_least_request_with_equal_weights_is_power_of_two_choices():
    a = Candidate(wl("a", "10.0.9.1", {}), "10.0.9.1", 80)
    b = Candidate(wl("b", "10.0.9.2", {}), "10.0.9.2", 80)
    rng = random.Random(0)
    picks = Counter(LoadBalancer().pick((a, b), rng=rng, lb="LEAST_REQUEST", active_requests={a.key: 5}).key
                    for _ in range(4000))
    # two random draws (with replacement): the busy host wins only when both draws land on it (1/4)
    assert picks[a.key] / 4000 == pytest.approx(0.25, abs=0.02)


def test_least_request_with_unequal_weights_scales_weight_by_active_requests():
    cands = endpoints_for(inventory(), REVIEWS, 9080, None)        # capacities 1 and 3
    rng = random.Random(0)
    picks = Counter(LoadBalancer().pick(cands, rng=rng, lb="LEAST_REQUEST", active_requests={"10.0.1.2:9080": 11}).key
                    for _ in range(4000))
    # v1 scores 1/(0+1) = 1, v2 scores 3/(11+1) = 0.25 ⇒ v1 gets 80 %
    assert picks["10.0.1.1:9080"] / 4000 == pytest.approx(0.8, abs=0.02)


def test_retry_avoids_previous_hosts_but_a_single_host_is_still_used():
    cands = endpoints_for(inventory(), REVIEWS, 9080, None)
    rng = random.Random(0)
    picks = Counter(LoadBalancer().pick(cands, rng=rng, lb="RANDOM", exclude=frozenset({"10.0.1.2:9080"})).key
                    for _ in range(4000))
    # Envoy previous_hosts + 5 reselections: the excluded host (weight 3/4) survives six draws in a row
    # with probability (3/4)^6 ≈ 18 %, after which "the last selected host will be used".
    assert picks["10.0.1.2:9080"] / 4000 == pytest.approx(0.75 ** 6, abs=0.03)
    rr = LoadBalancer()
    first = rr.pick(cands, rng=rng, lb="ROUND_ROBIN")
    assert rr.pick(cands, rng=rng, lb="ROUND_ROBIN", exclude=frozenset({first.key})).key != first.key
    single = cands[:1]
    assert LoadBalancer().pick(single, rng=rng, exclude=frozenset({single[0].key})) == single[0]


def test_no_usable_host_gives_none():
    cands = endpoints_for(inventory(), REVIEWS, 9080, None)
    assert LoadBalancer().pick((), rng=random.Random(0)) is None
    assert LoadBalancer().pick(cands, rng=random.Random(0), ejected={c.key for c in cands}) is None


# ---------------------------------------------------------------------------------------------
# Outlier detection


def test_outlier_detection_ejects_after_consecutive_5xx_for_base_time_times_ejection_count():
    od = OutlierDetector(OutlierDetection(consecutive_5xx_errors=3, base_ejection_time_s=30, max_ejection_percent=100))
    h = "10.0.1.1:9080"
    assert not od.record(h, 503, now=0, total_hosts=2)
    assert not od.record(h, 500, now=1, total_hosts=2)
    assert od.record(h, "connect-failure", now=2, total_hosts=2)       # local-origin failures count as 5xx
    assert od.ejected(31.9) == {h} and od.ejected(32) == set()
    for t in (33, 34, 35):
        od.record(h, 502, now=t, total_hosts=2)
    assert od.ejected(35 + 59) == {h} and od.ejected(35 + 60) == set()   # second ejection: 2 × 30 s


def test_outlier_detection_success_resets_the_consecutive_count():
    od = OutlierDetector(OutlierDetection(consecutive_5xx_errors=2))
    od.record("h", 503, 0, total_hosts=1)
    od.record("h", 200, 1, total_hosts=1)
    assert not od.record("h", 503, 2, total_hosts=1)
    assert od.ejected(2) == set()


def test_outlier_detection_max_ejection_percent_but_always_at_least_one_host():
    od = OutlierDetector(OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=10))
    assert od.record("a", 503, 0, total_hosts=3)       # 10 % of 3 < 1, but one host may always go
    assert not od.record("b", 503, 0, total_hosts=3)
    assert od.ejected(1) == {"a"}
    assert "ejected=1" in repr(od)


def test_outlier_detection_only_when_the_destination_rule_has_it():
    from policy.routing import TrafficPolicy
    assert OutlierDetector.for_policy(TrafficPolicy()) is None
    assert OutlierDetector.for_policy(TrafficPolicy(outlier_detection=OutlierDetection())) is not None
    d = OutlierDetection()
    assert (d.consecutive_5xx_errors, d.base_ejection_time_s, d.max_ejection_percent, d.interval_s) == (5, 30, 10, 10)


# ---------------------------------------------------------------------------------------------
# Retry decisions


@pytest.mark.parametrize("outcome,retried", [
    ("connect-failure", True), ("refused-stream", True), (503, True),     # seed default retries 503
    (502, False), (500, False), ("reset", False), ("per-try-timeout", False), (200, False), (404, False),
    (Outcome(status=200, grpc_status=14), True),     # gRPC UNAVAILABLE
    (Outcome(status=200, grpc_status=1), True),      # gRPC CANCELLED
    (Outcome(status=200, grpc_status=13), False),
])
def test_default_retry_policy_conditions(outcome, retried):
    assert DEFAULT_RETRY_POLICY.should_retry(1, outcome) is retried


def test_retries_stop_after_one_plus_attempts_requests():
    p = DEFAULT_RETRY_POLICY
    assert p.should_retry(1, "connect-failure") and p.should_retry(2, "connect-failure")
    assert not p.should_retry(3, "connect-failure")


@pytest.mark.parametrize("on,outcome,retried", [
    ({"5xx"}, 500, True), ({"5xx"}, "reset", True), ({"5xx"}, "per-try-timeout", True), ({"5xx"}, 404, False),
    ({"gateway-error"}, 504, True), ({"gateway-error"}, 500, False), ({"gateway-error"}, "per-try-timeout", True),
    ({"reset"}, "reset", True), ({"reset"}, 503, False), ({"retriable-4xx"}, 409, True),
    ({"connect-failure"}, "reset", False),
])
def test_retry_on_conditions_follow_envoy(on, outcome, retried):
    assert RetryPolicy(attempts=1, retry_on=frozenset(on)).should_retry(1, outcome) is retried


def test_retry_backoff_is_jittered_and_capped_at_ten_times_the_base():
    rng = random.Random(0)
    p = DEFAULT_RETRY_POLICY
    samples = [p.backoff_s(10, rng) for _ in range(1000)]
    assert 0 <= min(samples) and max(samples) < 0.25
    assert all(p.backoff_s(1, rng) < 0.025 for _ in range(100))
