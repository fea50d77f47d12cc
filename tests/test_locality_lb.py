"""DestinationRule ``localityLbSetting`` at the waypoint: istiod's priorities and locality weights
(``locality_plan``), Envoy's load per priority (``priority_loads``), the pick that follows them, the parser's
validation, and one end-to-end failover through a real waypoint on loopback."""

from __future__ import annotations

import collections
import random
import time

import pytest
from hypothesis import given, settings, strategies as st

from policy.errors import ConfigError, Where
from policy.inventory import Locality, Workload
from policy.routing import parse_destination_rule
from policy.routing.endpoints import (
    Candidate, LoadBalancer, Prioritized, lb_candidates, lb_priority, locality_matches, locality_plan,
    priority_loads, proxy_workload, topology_labels,
)
from policy.routing.model import (
    LocalityDistribute, LocalityFailover, LocalityLbSetting, OutlierDetection, TrafficPolicy,
)
from tests.locality_helpers import WAYPOINT_GATEWAY, named_pods_and_waypoint, reviews_inventory

OD = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100.0)


def wl(name: str, ip: str, loc: str = "", *, labels=None, network: str = "", capacity: int = 1) -> Workload:
    region, zone, subzone = (loc.split("/") + ["", "", ""])[:3]
    return Workload(uid=f"uid-{name}", name=name, namespace="default", workload_ips=(ip,),
                    labels=labels or {}, network=network, locality=Locality(region, zone, subzone),
                    capacity=capacity)


def cand(w: Workload) -> Candidate:
    return Candidate(w, w.workload_ips[0], 9080, w.uid)


def cands(*specs) -> tuple[Candidate, ...]:
    return tuple(cand(wl(f"p{i}", f"10.0.0.{i + 1}", loc)) for i, loc in enumerate(specs))


def levels(plan) -> list[list[str]]:
    """The plan as host IPs per priority."""
    return [[c.ip for c in hosts] for hosts in plan.level_hosts]


PROXY = wl("waypoint", "10.9.9.9", "r1/z1/s1")


# ---------------------------------------------------------------------------------------------
# istiod's side: util.LocalityMatch, util.LbPriority, ApplyLocalityLoadBalancer


@pytest.mark.parametrize("rule,loc,ok", [
    ("r1", "r1/z9/s9", True), ("r1/z1", "r1/z1/s9", True), ("r1/z1/s1", "r1/z1/s1", True),
    ("r1/z1/s1", "r1/z1/s2", False), ("r1/*", "r1/z2/s3", True), ("*", "r7/z7/s7", True),
    ("r1/z1/*", "r1/z2/s1", False), ("r2", "r1/z1/s1", False), ("r1/z1", "r1//", False),
])
def test_locality_match_is_istiods(rule, loc, ok):
    assert locality_matches(Locality(*loc.split("/") + [""] * (3 - len(loc.split("/")))), rule) is ok


@pytest.mark.parametrize("ep,prio", [("r1/z1/s1", 0), ("r1/z1/s2", 1), ("r1/z2/s1", 2), ("r2/z1/s1", 3)])
def test_lb_priority_counts_the_first_locality_part_that_differs(ep, prio):
    assert lb_priority(Locality("r1", "z1", "s1"), Locality(*ep.split("/"))) == prio


def test_default_failover_needs_outlier_detection_and_a_proxy_locality():
    hosts = cands("r1/z1/s1", "r1/z1/s2", "r1/z2/s1", "r2/z1/s1", "r1/z1/s1")
    # The mesh default (enabled: true) applies with outlier detection: four priorities, renumbered 0..3.
    plan = locality_plan(hosts, None, PROXY, outlier=OD)
    assert levels(plan) == [["10.0.0.1", "10.0.0.5"], ["10.0.0.2"], ["10.0.0.3"], ["10.0.0.4"]]
    assert not plan.locality_weighted and plan.panic_threshold_pct == 0.0   # Istio's minHealthPercent default
    # istiod: "Failover needs outlier detection, otherwise Envoy will never drop down to a lower priority."
    assert locality_plan(hosts, None, PROXY, outlier=None) is None
    assert locality_plan(hosts, LocalityLbSetting(enabled=False), PROXY, outlier=OD) is None
    assert locality_plan(hosts, None, None, outlier=OD) is None                     # who am I? unknown
    assert locality_plan(hosts, None, wl("wp", "10.9.9.9"), outlier=OD) is None     # no locality known
    # All in one locality: one priority, nothing to change — the plain path.
    assert locality_plan(cands("r1/z1/s1", "r1/z1/s1"), None, PROXY, outlier=OD) is None


def test_priorities_have_no_gaps():
    plan = locality_plan(cands("r1/z1/s1", "r2/z1/s1"), None, PROXY, outlier=OD)
    assert levels(plan) == [["10.0.0.1"], ["10.0.0.2"]]     # 0 and 3 become 0 and 1


def test_failover_sends_other_regions_behind_the_named_one():
    hosts = cands("r2/z1/s1", "r3/z1/s1", "r1/z1/s1")
    setting = LocalityLbSetting(failover=(LocalityFailover("r1", "r3"),))
    plan = locality_plan(hosts, setting, PROXY, outlier=OD)
    # r1 (own) 0, r3 (the failover target) 3, r2 4 → renumbered 0, 1, 2.
    assert levels(plan) == [["10.0.0.3"], ["10.0.0.2"], ["10.0.0.1"]]
    assert plan.locality_weighted   # explicit failover ⇒ locality_weighted_lb_config
    # A rule for another region changes nothing for this proxy.
    other = locality_plan(hosts, LocalityLbSetting(failover=(LocalityFailover("r9", "r3"),)), PROXY, outlier=OD)
    assert levels(other) == [["10.0.0.3"], ["10.0.0.1", "10.0.0.2"]]


def test_failover_priority_orders_by_the_first_label_that_differs():
    proxy = wl("wp", "10.9.9.9", "r1/z1/s1", labels={"tier": "gold"}, network="n1")
    hosts = (
        cand(wl("a", "10.0.0.1", "r2/z1", labels={"tier": "gold"}, network="n1")),   # both match: 0
        cand(wl("b", "10.0.0.2", "r1/z1", labels={"tier": "iron"}, network="n1")),   # 2nd differs: 2 - 1 = 1
        cand(wl("c", "10.0.0.3", "r1/z1", labels={"tier": "gold"}, network="n2")),   # 1st differs: 2 - 0 = 2
    )
    setting = LocalityLbSetting(failover_priority=("topology.istio.io/network", "tier"))
    plan = locality_plan(hosts, setting, proxy, outlier=OD)
    # Locality plays no part with failoverPriority alone (istiod applies applyLocalityFailover only when
    # failover is also set): host a, in another region, comes first.
    assert levels(plan) == [["10.0.0.1"], ["10.0.0.2"], ["10.0.0.3"]]
    # "name=value" overrides the proxy's own value: prefer the n2 network.
    forced = locality_plan(hosts, LocalityLbSetting(failover_priority=("topology.istio.io/network=n2",)),
                           proxy, outlier=OD)
    assert levels(forced) == [["10.0.0.3"], ["10.0.0.1", "10.0.0.2"]]
    # Topology labels come from the workload's locality, network, cluster and node (istiod AugmentLabels).
    assert topology_labels(hosts[0].workload)["topology.kubernetes.io/region"] == "r2"


def test_failover_priority_with_failover_combines_label_then_locality_priority():
    proxy = wl("wp", "10.9.9.9", "r1/z1/s1", labels={"tier": "gold"})
    hosts = (
        cand(wl("a", "10.0.0.1", "r2/z1/s1", labels={"tier": "gold"})),   # label 0, locality 3 → 3
        cand(wl("b", "10.0.0.2", "r1/z1/s1", labels={"tier": "iron"})),   # label 1, locality 0 → 5
        cand(wl("c", "10.0.0.3", "r1/z1/s1", labels={"tier": "gold"})),   # 0
        cand(wl("d", "10.0.0.4", "r3/z1/s1", labels={"tier": "gold"})),   # failover r1→r2: 4
    )
    setting = LocalityLbSetting(failover=(LocalityFailover("r1", "r2"),), failover_priority=("tier",))
    assert levels(locality_plan(hosts, setting, proxy, outlier=OD)) == [
        ["10.0.0.3"], ["10.0.0.1"], ["10.0.0.4"], ["10.0.0.2"]]


def test_distribute_weights_localities_and_drops_unlisted_ones():
    hosts = cands("r1/z1/s1", "r1/z1/s2", "r2/za/s1", "r2/zb/s1", "r3/z1/s1")
    setting = LocalityLbSetting(distribute=(
        LocalityDistribute("r9/*", (("r3/*", 100),)),                         # not this proxy's
        LocalityDistribute("r1/z1/*", (("r1/z1/*", 80), ("r2/*", 20))),
    ))
    # Distribute applies with or without outlier detection (istiod applies it before the failover check).
    plan = locality_plan(hosts, setting, PROXY, outlier=None)
    (level,) = plan.levels
    got = {f"{g.locality.region}/{g.locality.zone}/{g.locality.subzone}": g.weight for g in level}
    # "the load balancing weight for a locality is divided by the sum of the weights of all localities":
    # r2/* = 20 over two one-host localities → ceil(20 × 1 / 2) = 10 each; r3 is in no ``to``: removed.
    assert got == {"r1/z1/s1": 40, "r1/z1/s2": 40, "r2/za/s1": 10, "r2/zb/s1": 10}
    assert plan.locality_weighted and plan.panic_threshold_pct == 50.0   # Envoy's default without outlier
    assert "10.0.0.5" not in [c.ip for c in plan.hosts]


def test_lb_candidates_leaves_the_common_cluster_alone():
    hosts = cands("r1/z1/s1", "r2/z1/s1")
    assert lb_candidates(hosts, TrafficPolicy(), PROXY) is hosts                          # no DR settings
    assert lb_candidates(hosts, TrafficPolicy(outlier_detection=OD), None) is hosts       # no proxy workload
    pri = lb_candidates(hosts, TrafficPolicy(outlier_detection=OD), PROXY)
    assert type(pri) is Prioritized and tuple(pri) == hosts and "per_priority=1/1" in repr(pri)


def test_the_proxy_is_the_workload_at_its_hbone_address():
    from policy.inventory import Inventory
    me = Workload(uid="wp", name="wp", namespace="default", workload_ips=("fd00::9",),
                  locality=Locality("r1", "z1", ""))
    inv = Inventory.build([me], [])
    assert proxy_workload(inv, "fd00::9") is me
    assert proxy_workload(inv, "fd00:0:0::9") is me            # another spelling of the same address
    assert proxy_workload(inv, "10.0.0.1") is None and proxy_workload(inv, None) is None
    assert proxy_workload(inv, "not-an-ip") is None


def test_topology_labels_are_istiods_augmented_labels():
    w = Workload(uid="u", name="n", namespace="default", workload_ips=("10.0.0.1",), node="node-a",
                 cluster_id="c1", network="n1", locality=Locality("r", "z", "s"),
                 labels={"app": "x", "topology.istio.io/network": "from-label"})
    assert topology_labels(w) == {
        "app": "x", "topology.kubernetes.io/region": "r", "topology.kubernetes.io/zone": "z",
        "topology.istio.io/subzone": "s", "topology.istio.io/cluster": "c1", "kubernetes.io/hostname": "node-a",
        # "In c.Network(), we already set the network label in priority order pod labels > ...": the pod's wins.
        "topology.istio.io/network": "from-label"}


# ---------------------------------------------------------------------------------------------
# Envoy's side: priority load, overprovisioning, panic


@pytest.mark.parametrize("healthy_pct,loads", [
    # Envoy docs (load_balancing/priority): P=0 healthy endpoints → load to P=0 / P=1, P=1 all healthy.
    (100, (100, 0)), (72, (100, 0)), (71, (99, 1)), (50, (70, 30)), (25, (35, 65)), (0, (0, 100)),
])
def test_priority_load_follows_the_overprovisioning_factor(healthy_pct, loads):
    assert priority_loads([(healthy_pct, 100), (100, 100)], 0.0) == (loads, (False, False))


def test_priority_load_when_both_levels_are_degraded_and_panic():
    # Envoy docs (panic threshold, 50 %): P0 20 % healthy (28), P1 30 % (42): normalized total 70 < 100,
    # both below the threshold → total panic, load by host count.
    assert priority_loads([(2, 10), (3, 10)], 50.0) == ((50, 50), (True, True))
    # P1 at the threshold: normalized 28 + 70 = 98; loads 28 × 100 // 98 = 28 and 71, the rounding's 1 to
    # the first available priority; only P0 (20 % < 50 %) panics.
    assert priority_loads([(2, 10), (5, 10)], 50.0) == ((29, 71), (True, False))
    # Normalized total 100: never panic, even with P0 at 20 %.
    assert priority_loads([(2, 10), (10, 10)], 50.0) == ((28, 72), (False, False))
    # Istio's default minHealthPercent 0 with nothing healthy: P0 gets the load but no host (503 UH).
    assert priority_loads([(0, 3), (0, 3)], 0.0) == ((100, 0), (False, False))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)).map(lambda t: (min(t), max(t))), min_size=1,
                max_size=6), st.floats(0, 100))
def test_priority_loads_always_sum_to_100(health, threshold):
    loads, panic = priority_loads(health, threshold)
    assert sum(loads) == 100 and all(x >= 0 for x in loads) and len(panic) == len(health)


# ---------------------------------------------------------------------------------------------
# The pick


def share(picks, ips) -> float:
    return sum(1 for c in picks if c is not None and c.ip in ips) / len(picks)


@pytest.mark.parametrize("algo", ["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"])
def test_pick_stays_local_then_spills_by_health_then_fails_over(algo):
    hosts = cands("r1/z1/s1", "r1/z1/s1", "r2/z1/s1", "r2/z1/s1")
    pri = lb_candidates(hosts, TrafficPolicy(outlier_detection=OD), PROXY)
    lb, rng = LoadBalancer(), random.Random(1)
    local, remote = {"10.0.0.1", "10.0.0.2"}, {"10.0.0.3", "10.0.0.4"}
    n = 4000
    assert share([lb.pick(pri, rng=rng, lb=algo, cluster="c") for _ in range(n)], local) == 1.0
    # One of two local hosts ejected: P0 health 140 × 1 // 2 = 70 → 70 % stays, 30 % spills to P1.
    half = [lb.pick(pri, rng=rng, lb=algo, cluster="c", ejected={"10.0.0.1:9080"}) for _ in range(n)]
    assert 0.65 < share(half, {"10.0.0.2"}) < 0.75 and share(half, remote) == 1 - share(half, {"10.0.0.2"})
    # Both ejected: everything to the other region.
    gone = {"10.0.0.1:9080", "10.0.0.2:9080"}
    assert share([lb.pick(pri, rng=rng, lb=algo, cluster="c", ejected=gone) for _ in range(n)], remote) == 1.0
    # Everything ejected, minHealthPercent 0: no host (503 UH), as Envoy with panic disabled.
    everyone = {c.key for c in hosts}
    assert lb.pick(pri, rng=rng, lb=algo, cluster="c", ejected=everyone) is None


def test_pick_in_panic_uses_ejected_hosts():
    od = OutlierDetection(min_health_percent=50.0)
    pri = lb_candidates(cands("r1/z1/s1", "r2/z1/s1"), TrafficPolicy(outlier_detection=od), PROXY)
    rng = random.Random(2)
    everyone = {"10.0.0.1:9080", "10.0.0.2:9080"}
    picks = [LoadBalancer().pick(pri, rng=rng, cluster="c", ejected=everyone) for _ in range(2000)]
    # Total panic: load by host count (50/50), regardless of health.
    assert 0.44 < share(picks, {"10.0.0.1"}) < 0.56 and share(picks, {"10.0.0.2"}) > 0.44


def test_min_health_percent_is_the_panic_threshold_without_localities_too():
    # Istio: below minHealthPercent healthy hosts "the proxy will load balance across all hosts in the pool
    # (healthy and unhealthy)". No proxy locality here: one priority.
    hosts = cands("", "", "")
    od = OutlierDetection(min_health_percent=50.0)
    pri = lb_candidates(hosts, TrafficPolicy(outlier_detection=od), None)
    assert type(pri) is Prioritized and len(pri.plan.levels) == 1
    rng, lb = random.Random(6), LoadBalancer()
    two_out = {"10.0.0.1:9080", "10.0.0.2:9080"}                       # 33 % healthy < 50 %: panic
    picks = [lb.pick(pri, rng=rng, cluster="c", ejected=two_out) for _ in range(3000)]
    assert 0.6 < share(picks, {"10.0.0.1", "10.0.0.2"}) < 0.73
    # 2 of 3 healthy (67 %): no panic, the ejected host gets nothing.
    picks = [lb.pick(pri, rng=rng, cluster="c", ejected={"10.0.0.1:9080"}) for _ in range(500)]
    assert share(picks, {"10.0.0.1"}) == 0.0
    # Istio's default 0 % keeps the plain path (the candidates as they are).
    assert lb_candidates(hosts, TrafficPolicy(outlier_detection=OD), None) is hosts


def test_retry_avoids_the_previous_host_across_priorities():
    pri = lb_candidates(cands("r1/z1/s1", "r2/z1/s1"), TrafficPolicy(outlier_detection=OD), PROXY)
    rng = random.Random(3)
    picks = [LoadBalancer().pick(pri, rng=rng, cluster="c", exclude=frozenset({"10.0.0.1:9080"}))
             for _ in range(500)]
    # Each reselection lands in P0 again; after host_selection_max_attempts (5) the last pick is used, as
    # Envoy's previous_hosts predicate does: the single local host is still picked (a one-host priority).
    assert share(picks, {"10.0.0.1"}) == 1.0


def test_distribute_shares_follow_the_locality_weights():
    hosts = cands("r1/z1/s1", "r1/z1/s1", "r1/z2/s1", "r2/z1/s1")
    setting = LocalityLbSetting(distribute=(LocalityDistribute("r1/z1/*", (("r1/z1/*", 70), ("r1/z2", 20),
                                                                         ("r2", 10))),))
    pri = lb_candidates(hosts, TrafficPolicy(locality_lb=setting), PROXY)
    lb, rng = LoadBalancer(), random.Random(4)
    picks = collections.Counter(lb.pick(pri, rng=rng, lb="ROUND_ROBIN", cluster="c").ip for _ in range(20000))
    assert 0.67 < (picks["10.0.0.1"] + picks["10.0.0.2"]) / 20000 < 0.73
    assert abs(picks["10.0.0.1"] - picks["10.0.0.2"]) <= 1          # round robin inside the locality
    assert 0.18 < picks["10.0.0.3"] / 20000 < 0.22 and 0.08 < picks["10.0.0.4"] / 20000 < 0.12
    # A locality with an ejected host loses weight by its availability: r1/z1 at 1 of 2 → min(1, 1.4 × 0.5) =
    # 0.7 × 70 = 49 against 20 and 10.
    picks = collections.Counter(lb.pick(pri, rng=rng, cluster="c", ejected={"10.0.0.1:9080"}).ip
                                for _ in range(20000))
    assert 0.58 < picks["10.0.0.2"] / 20000 < 0.66 and picks["10.0.0.1"] == 0


# ---------------------------------------------------------------------------------------------
# Parsing and validation


W = Where("dr.yaml", 2)


def dr(lb: dict, *, outlier: bool = True):
    tp = {"loadBalancer": lb}
    if outlier:
        tp["outlierDetection"] = {"consecutive5xxErrors": 2}
    return parse_destination_rule({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                                   "metadata": {"name": "reviews", "namespace": "default"},
                                   "spec": {"host": "reviews", "trafficPolicy": tp}}, W)


def test_parse_keeps_the_setting_and_no_longer_warns():
    rule = dr({"simple": "ROUND_ROBIN", "localityLbSetting": {
        "enabled": True, "failover": [{"from": "us-east", "to": "eu-west"}],
        "failoverPriority": ["topology.istio.io/network", "tier=gold"]}})
    assert rule.traffic_policy.locality_lb == LocalityLbSetting(
        True, (), (LocalityFailover("us-east", "eu-west"),), ("topology.istio.io/network", "tier=gold"))
    assert rule.warnings == ()
    d = dr({"localityLbSetting": {"distribute": [{"from": "r1/z1/*", "to": {"r1/z1/*": 60, "r2/*": 40}}]}},
           outlier=False)
    assert d.traffic_policy.locality_lb.distribute == (LocalityDistribute("r1/z1/*", (("r1/z1/*", 60), ("r2/*", 40))),)
    # A subset's loadBalancer replaces the whole field (Istio MergeTrafficPolicy), locality setting included.
    assert d.traffic_policy.overridden_by(TrafficPolicy(load_balancer="RANDOM")).locality_lb is None


def test_parse_warns_where_istiod_warns_and_ignores_it_with_consistent_hash():
    no_od = dr({"localityLbSetting": {"failover": [{"from": "a", "to": "b"}]}}, outlier=False)
    assert any("outlier detection policy must be provided for failover" in w for w in no_od.warnings)
    hashed = dr({"consistentHash": {"httpHeaderName": "x"}, "localityLbSetting": {"enabled": True}})
    # Kept (it takes precedence over a Service's traffic distribution), not applied to the hash table.
    assert hashed.traffic_policy.locality_lb is not None
    assert any("not supported with consistentHash" in w for w in hashed.warnings)


def test_a_destination_rule_setting_turns_a_traffic_distribution_off_under_consistent_hash_too():
    """istiod GetLocalityLbSetting: the DR's setting first — ``enabled: false`` returns none, and the Service's
    PreferClose then gives no priorities, with or without consistentHash (found by review)."""
    from policy.inventory import LoadBalancer as ServiceLB
    from policy.routing.endpoints import lb_candidates

    me = wl("me", "10.0.0.100", "us-east/a")
    cands = tuple(cand(w) for w in (wl("a1", "10.0.0.1", "us-east/a"), wl("b1", "10.0.0.2", "eu-west/b")))
    prefer_close = ServiceLB(("Network", "Region", "Zone"), "Failover", "OnlyHealthy")
    for spec in ({"consistentHash": {"useSourceIp": True}}, {}):
        off = dr({**spec, "localityLbSetting": {"enabled": False}}, outlier=False).traffic_policy
        assert lb_candidates(cands, off, me, service_lb=prefer_close) is cands   # plain: no priorities
        plain = dr(spec, outlier=False).traffic_policy
        assert lb_candidates(cands, plain, me, service_lb=prefer_close) is not cands   # the distribution applies


PREFIX = "dr.yaml: document 2 (DestinationRule default/reviews): spec.trafficPolicy.loadBalancer.localityLbSetting"


@pytest.mark.parametrize("setting,where,problem", [
    ({"distribute": [{"from": "a", "to": {"b": 100}}], "failover": [{"from": "a", "to": "b"}]},
     "", "can not simultaneously specify 'distribute' and 'failover'"),
    ({"distribute": [{"from": "a", "to": {"b": 60, "c": 30}}]}, ".distribute[0].to", "total locality weight 90 != 100"),
    ({"distribute": [{"from": "a", "to": {"b": 0, "c": 100}}]}, ".distribute[0].to.b", "expected an integer 1..100"),
    ({"distribute": [{"from": "a", "to": {"b/*/c": 100}}]}, ".distribute[0].to",
     "locality b/*/c wildcard '*' number can not exceed 1 and must be in the end"),
    ({"distribute": [{"from": "a", "to": {"b/*": 50, "b/z": 50}}]}, ".distribute[0].to",
     "locality b/z overlap with previous specified ones"),
    ({"distribute": [{"from": "a//c", "to": {"b": 100}}]}, ".distribute",
     "locality a//c must not contain empty region/zone/subzone info"),
    ({"failover": [{"from": "a", "to": "a"}]}, ".failover[0]",
     "locality lb failover settings must specify different regions"),
    ({"failover": [{"from": "a/z", "to": "b"}]}, ".failover[0].from", "locality lb failover only specify region"),
    ({"failover": [{"from": "a", "to": "b*"}]}, ".failover[0].to",
     "locality lb failover region should not contain '*' wildcard"),
    ({"failover": [{"from": "a", "to": "b"}], "failoverPriority": ["topology.kubernetes.io/zone"]},
     ".failoverPriority[0]", "can not simultaneously set 'failover' and topology label 'topology.kubernetes.io/zone'"),
    ({"failoverPriority": ["=x"]}, ".failoverPriority[0]", "expected a label name, or name=value"),
    ({"enabled": "yes"}, ".enabled", "expected true or false"),
    ({"distrbute": []}, ".distrbute", "unknown field"),
])
def test_validation_errors_name_the_file_document_resource_and_field(setting, where, problem):
    with pytest.raises(ConfigError) as e:
        dr({"localityLbSetting": setting})
    assert str(e.value).startswith(f"{PREFIX}{where}: ") and problem in str(e.value)


# ---------------------------------------------------------------------------------------------
# End to end: a real waypoint on loopback fails over to the other region when its own region's pods are ejected


async def test_waypoint_prefers_its_own_locality_and_fails_over_when_the_local_pods_are_ejected(tmp_path, loopback_ip):
    wp_ip, vip = loopback_ip(), loopback_ip()
    pods = {loopback_ip(): name for name in ("local-a", "local-b", "remote-a", "remote-b")}
    broken: set[str] = set()

    def pod_doc(ip: str, name: str) -> str:
        region = "us-east" if name.startswith("local") else "eu-west"
        return f"""
- uid: Kubernetes//v1/Pod/default/{name}
  name: {name}
  namespace: default
  serviceAccount: bookinfo-reviews
  workloadIps: ["{ip}"]
  protocol: HBONE
  locality: {{region: {region}, zone: {region}-1, subzone: ""}}
  labels: {{app: reviews}}
  services:
    default/reviews.default.svc.cluster.local: {{9080: 9080}}"""

    inventory = reviews_inventory("".join(pod_doc(ip, name) for ip, name in pods.items()), wp_ip, vip, zone="us-east-1")
    rule = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews.default.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 2, interval: 30s, baseEjectionTime: 60s, maxEjectionPercent: 100}
"""
    cfg = tmp_path / "config"
    cfg.mkdir()
    (cfg / "mesh.yaml").write_text("---\n".join([inventory, rule, WAYPOINT_GATEWAY]))
    async with named_pods_and_waypoint(cfg, wp_ip, vip, pods, broken) as (wp, store, fetch):
        # All healthy: every request stays in the waypoint's own region (priority 0).
        answers = collections.Counter([await fetch() for _ in range(30)])
        assert set(answers) <= {(200, "local-a"), (200, "local-b")} and sum(answers.values()) == 30
        # The local pods start failing: two consecutive 503s eject each (maxEjectionPercent 100); the
        # eu-west pods take over once both are out.
        broken.update({"local-a", "local-b"})
        # (The default retry policy retries a 503 on another host, so the client mostly sees 200s meanwhile;
        # the outlier detector sees every attempt.)
        local = {f"{ip}:9080" for ip, name in pods.items() if name.startswith("local")}

        def ejected() -> set[str]:
            return set().union(*(d.ejected(time.monotonic()) for d in wp.http.outliers.values()))

        for _ in range(60):
            await fetch()
            if local <= ejected():
                break
        assert ejected() == local
        after = collections.Counter([await fetch() for _ in range(30)])
        assert set(after) <= {(200, "remote-a"), (200, "remote-b")} and sum(after.values()) == 30


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 150), st.floats(allow_nan=True),
                  st.sampled_from(["r1", "r1/z1", "r1/*", "*", "a//b", "10s", "x=y", "=", "", "r1/z1/s1/x"]))
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["from", "to", "enabled", "distribute", "failover", "failoverPriority",
                                     "duration", "minimumPercent", "aggression", "r1", "r2/*", "x"]),
                    inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["localityLbSetting", "warmup", "warmupDurationSecs", "simple"]), _value,
                       max_size=3), st.booleans())
def test_only_config_errors_escape_the_load_balancer_parser(lb, outlier):
    try:
        rule = dr(lb, outlier=outlier)
    except ConfigError:
        return
    tp = rule.traffic_policy
    if tp.locality_lb is not None:   # what parses also plans without error
        locality_plan(cands("r1/z1/s1", "r2/z1/s1"), tp.locality_lb, PROXY, outlier=OD)
