"""DestinationRule ``warmup`` / ``warmupDurationSecs`` (Envoy slow start): the factor, the weights, the pick
that follows them with join times kept per cluster and host across config reloads, and the parser."""

from __future__ import annotations

import collections
import random

import pytest

from policy.errors import ConfigError, Where
from policy.inventory import Workload
from policy.routing import parse_destination_rule
from policy.routing.endpoints import (
    Candidate, LoadBalancer, Prioritized, lb_candidates, slow_start_factor, slow_start_weights,
)
from policy.routing.model import TrafficPolicy, Warmup


def cand(i: int, capacity: int = 1) -> Candidate:
    w = Workload(uid=f"u{i}", name=f"p{i}", namespace="default", workload_ips=(f"10.0.0.{i}",), capacity=capacity)
    return Candidate(w, f"10.0.0.{i}", 9080, w.uid)


W10 = Warmup(10.0)


@pytest.mark.parametrize("age,warmup,factor", [
    (0.0, W10, 0.1),                                   # max(1 ms / 10 s, 10 %): the minimum weight
    (5.0, W10, 0.5),                                   # linear with aggression 1
    (9.99, W10, 0.999),
    (10.0, W10, 1.0), (300.0, W10, 1.0),               # the window is over
    (2.5, Warmup(10.0, aggression=2.0), 0.5),          # 0.25 ^ (1 / 2)
    (1.0, Warmup(10.0, minimum_percent=30.0), 0.3),    # 0.1 < 30 %
    (0.0, Warmup(10.0, minimum_percent=0.0), 0.0001),  # Envoy: max(1 ms, age) / window
])
def test_slow_start_factor_is_envoys(age, warmup, factor):
    assert slow_start_factor(age, warmup) == pytest.approx(factor)


def test_slow_start_weights_are_none_once_no_host_warms():
    hosts = (cand(1, capacity=2), cand(2))
    assert slow_start_weights(hosts, {"10.0.0.1:9080": 0.0, "10.0.0.2:9080": 95.0}, W10, 100.0) == {
        "10.0.0.1:9080": 2.0, "10.0.0.2:9080": 0.5}
    assert slow_start_weights(hosts, {"10.0.0.1:9080": 0.0, "10.0.0.2:9080": 80.0}, W10, 100.0) is None


def rr_shares(lb, cands, now, n=2000, algo="ROUND_ROBIN", rng=None):
    rng = rng or random.Random(0)
    picks = collections.Counter(lb.pick(cands, rng=rng, lb=algo, cluster="c", now=now).ip for _ in range(n))
    return {ip: k / n for ip, k in picks.items()}


def test_a_new_host_ramps_up_over_the_window_and_join_times_survive_reloads():
    policy = TrafficPolicy(load_balancer="ROUND_ROBIN", warmup=W10)
    lb = LoadBalancer()
    first = lb_candidates((cand(1), cand(2)), policy, None)
    assert type(first) is Prioritized and first.plan.warmup == W10
    # The cluster's first hosts all start their window together (Envoy: "start slow start window from
    # current time"): equal factors, equal shares.
    assert rr_shares(lb, first, now=0.0) == {"10.0.0.1": 0.5, "10.0.0.2": 0.5}
    # A config reload adds pod 3 at t=20: it joins then, the others are long warm.
    second = lb_candidates((cand(1), cand(2), cand(3)), policy, None)
    s = rr_shares(lb, second, now=20.0, n=2100)
    assert s["10.0.0.3"] == pytest.approx(0.1 / 2.1, abs=0.002)
    assert rr_shares(lb, second, now=25.0, n=2500)["10.0.0.3"] == pytest.approx(0.5 / 2.5, abs=0.002)
    # Another reload with the same pods (a new candidates tuple): pod 3 keeps its join time.
    third = lb_candidates((cand(1), cand(2), cand(3)), policy, None)
    assert rr_shares(lb, third, now=27.5, n=2750)["10.0.0.3"] == pytest.approx(0.75 / 2.75, abs=0.002)
    assert rr_shares(lb, third, now=31.0, n=3000)["10.0.0.3"] == pytest.approx(1 / 3, abs=0.002)
    # Pod 3 leaves, then comes back: it warms up again, from its return.
    lb.pick(lb_candidates((cand(1), cand(2)), policy, None), rng=random.Random(1), lb="ROUND_ROBIN",
            cluster="c", now=40.0)
    back = lb_candidates((cand(1), cand(2), cand(3)), policy, None)
    lb.pick(back, rng=random.Random(1), lb="ROUND_ROBIN", cluster="c", now=40.0)
    assert rr_shares(lb, back, now=45.0, n=2500)["10.0.0.3"] == pytest.approx(0.5 / 2.5, abs=0.002)
    assert "slow_start_clusters=1>" in repr(lb)


def test_least_request_weights_by_slow_start_and_active_requests():
    policy = TrafficPolicy(warmup=Warmup(10.0, minimum_percent=0.0))   # LEAST_REQUEST (Istio's default)
    lb = LoadBalancer()
    lb.pick(lb_candidates((cand(1), cand(2)), policy, None), rng=random.Random(0), cluster="c", now=0.0)
    cands = lb_candidates((cand(1), cand(2), cand(3)), policy, None)
    # Pod 3 joins at t=100, pods 1 and 2 are warm; at t=102.5 its weight is 0.25: 0.25 / 2.25 of picks.
    lb.pick(cands, rng=random.Random(0), cluster="c", now=100.0)
    s = rr_shares(lb, cands, now=102.5, n=20000, algo="LEAST_REQUEST", rng=random.Random(2))
    assert 0.095 < s["10.0.0.3"] < 0.127
    # Envoy divides the weight by active requests + 1: two in flight on pod 1 cut its weight to a third.
    rng = random.Random(4)
    many = collections.Counter(lb.pick(cands, rng=rng, cluster="c", now=102.5,
                                       active_requests={"10.0.0.1:9080": 2}).ip for _ in range(20000))
    # weights 1/3, 1, 0.25 → pod 1 gets (1/3) / (1/3 + 1 + 0.25)
    assert abs(many["10.0.0.1"] / 20000 - (1 / 3) / (1 / 3 + 1.25)) < 0.015


def test_warm_clusters_and_random_pick_as_without_warmup():
    policy = TrafficPolicy(load_balancer="ROUND_ROBIN", warmup=W10)
    lb = LoadBalancer()
    cands = lb_candidates((cand(1), cand(2, capacity=3)), policy, None)
    lb.pick(cands, rng=random.Random(0), lb="ROUND_ROBIN", cluster="c", now=0.0)
    # Past the window: the plain weights (capacity 1 : 3), as a cluster without warmup.
    assert rr_shares(lb, cands, now=50.0, n=4000) == {"10.0.0.1": 0.25, "10.0.0.2": 0.75}
    # RANDOM has no slow start in Envoy (the parser drops warmup there; a cluster that still reaches the
    # pick with RANDOM is not slowed): pod 3, new at t=50, gets its full third at once.
    fresh = lb_candidates((cand(1), cand(2), cand(3)), policy, None)
    s = rr_shares(lb, fresh, now=50.0, n=20000, algo="RANDOM", rng=random.Random(5))
    assert all(0.31 < s[f"10.0.0.{i}"] < 0.36 for i in (1, 2, 3))
    # No warmup, no locality: the candidates stay the plain tuple (the pick's usual path).
    plain = (cand(1), cand(2))
    assert lb_candidates(plain, TrafficPolicy(load_balancer="ROUND_ROBIN"), None) is plain


W = Where("dr.yaml", 1)


def dr(lb: dict):
    return parse_destination_rule({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                                   "metadata": {"name": "reviews", "namespace": "default"},
                                   "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": lb}}}, W)


def test_parse_warmup_and_the_deprecated_duration():
    assert dr({"warmup": {"duration": "30s", "minimumPercent": 5, "aggression": 1.5}}).traffic_policy.warmup == \
        Warmup(30.0, 5.0, 1.5)
    assert dr({"simple": "ROUND_ROBIN", "warmupDurationSecs": "60s"}).traffic_policy.warmup == Warmup(60.0, 10.0, 1.0)
    both = dr({"warmup": {"duration": "10s"}, "warmupDurationSecs": "60s"})
    assert both.traffic_policy.warmup == Warmup(10.0) and any("ignored: warmup is set" in w for w in both.warnings)
    for lb in ({"simple": "RANDOM", "warmup": {"duration": "10s"}},
               {"consistentHash": {"httpHeaderName": "x"}, "warmupDurationSecs": "10s"}):
        rule = dr(lb)
        assert rule.traffic_policy.warmup is None
        assert any("slow start applies to ROUND_ROBIN and LEAST_REQUEST only" in w for w in rule.warnings)
    assert dr({"warmup": {"duration": "10s"}}).warnings == ()


@pytest.mark.parametrize("lb,where,problem", [
    ({"warmup": {}}, "warmup.duration", "required field is missing"),
    ({"warmup": {"duration": "0s"}}, "warmup.duration", "expected a positive duration"),
    ({"warmup": {"duration": "10s", "aggression": 0.5}}, "warmup.aggression", "expected a number >= 1"),
    ({"warmup": {"duration": "10s", "minimumPercent": 101}}, "warmup.minimumPercent", "expected a number 0..100"),
    ({"warmup": {"duration": "10s", "minimumPercent": float("nan")}}, "warmup.minimumPercent", "expected a number"),
    ({"warmup": {"duration": "10s", "slope": 2}}, "warmup.slope", "unknown field"),
    ({"warmupDurationSecs": 10}, "warmupDurationSecs", "expected a duration"),
])
def test_warmup_errors_name_the_field(lb, where, problem):
    with pytest.raises(ConfigError) as e:
        dr(lb)
    assert str(e.value).startswith(
        f"dr.yaml: document 1 (DestinationRule default/reviews): spec.trafficPolicy.loadBalancer.{where}: ")
    assert problem in str(e.value)
