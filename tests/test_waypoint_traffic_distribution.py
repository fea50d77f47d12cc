"""A Service's traffic distribution (Kubernetes ``trafficDistribution: PreferClose`` / ``PreferSameZone`` /
``PreferSameNode``, ztunnel's ``loadBalancer``) at the waypoint, as istiod configures the waypoint's Envoy:
failover priorities by the preferred topology labels relative to the waypoint's pod, without outlier detection,
with the unready endpoints counted in their priority's health and no panic; ``mode: Strict`` (istiod's
``internalTrafficPolicy: Local``) as endpoint filtering; ``healthPolicy: AllowAll``; the DestinationRule's
localityLbSetting first. Then the loader's ``trafficDistribution`` and one end-to-end run through a real
waypoint on loopback."""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import given, settings, strategies as st

from policy.errors import ConfigErrors, Where
from policy.inventory import LoadBalancer as ServiceLB, Locality, Workload
from policy.loader import TRAFFIC_DISTRIBUTIONS, parse_inventory
from policy.routing.endpoints import (
    Candidate, LoadBalancer, Prioritized, lb_candidates, priority_loads, service_locality_setting, strict_match,
)
from policy.routing.hashing import hash64
from policy.routing.model import (
    HASH_SOURCE_IP, LABEL_HOSTNAME, LABEL_NETWORK, LABEL_REGION, LABEL_SUBZONE, LABEL_ZONE, ConsistentHash, LocalityLbSetting,
    OutlierDetection, TrafficPolicy, Warmup,
)
from tests.locality_helpers import WAYPOINT_GATEWAY, named_pods_and_waypoint, reviews_inventory

PREFER_CLOSE = TRAFFIC_DISTRIBUTIONS["PreferClose"]
PREFER_SAME_NODE = TRAFFIC_DISTRIBUTIONS["PreferSameNode"]
NODE_LOCAL = ServiceLB(("Node",), "Strict", "OnlyHealthy")          # istiod's internalTrafficPolicy: Local
OD = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100.0)


def wl(name: str, loc: str = "", *, node: str = "", network: str = "", n: int = 0) -> Workload:
    region, zone, subzone = (loc.split("/") + ["", "", ""])[:3]
    return Workload(uid=f"uid-{name}", name=name, namespace="default", workload_ips=(f"10.0.0.{n}",),
                    locality=Locality(region, zone, subzone), node=node, network=network)


def cands(*specs: str, node: str = "") -> tuple[Candidate, ...]:
    """Pods p0, p1, … at the given ``region/zone/subzone`` localities (10.0.0.1, …)."""
    out = []
    for i, loc in enumerate(specs):
        w = wl(f"p{i}", loc, node=node, n=i + 1)
        out.append(Candidate(w, w.workload_ips[0], 9080, w.uid))
    return tuple(out)


def levels(pri: Prioritized) -> list[list[str]]:
    return [[c.ip for c in hosts] for hosts in pri.plan.level_hosts]


WAYPOINT = wl("waypoint", "r1/z1/s1", node="node-1", n=99)


# ---------------------------------------------------------------------------------------------
# istiod: the failoverPriority a traffic distribution becomes


def test_the_loadbalancer_reads_back_as_istiods_failover_priority():
    # loadbalancer.go GetLocalityLbSetting: PreferSameZone (PreferClose) → network, region, zone;
    # PreferSameNode → network, region, zone, subzone, hostname.
    assert service_locality_setting(PREFER_CLOSE) == LocalityLbSetting(
        enabled=True, failover_priority=(LABEL_NETWORK, LABEL_REGION, LABEL_ZONE))
    assert service_locality_setting(TRAFFIC_DISTRIBUTIONS["PreferSameZone"]) == service_locality_setting(PREFER_CLOSE)
    assert service_locality_setting(PREFER_SAME_NODE).failover_priority == (
        LABEL_NETWORK, LABEL_REGION, LABEL_ZONE, LABEL_SUBZONE, LABEL_HOSTNAME)
    # Strict, Standard, Passthrough, no preference: no traffic distribution.
    for lb in (NODE_LOCAL, ServiceLB(("Zone",), "Standard"), ServiceLB(("Zone",), "Passthrough"),
               ServiceLB((), "Failover"), None):
        assert service_locality_setting(lb) is None


def test_a_service_without_a_preference_keeps_the_plain_path():
    hosts = cands("r1/z1/s1", "r2/z2/s2")
    for lb in (None, ServiceLB((), "Standard"), ServiceLB(("Zone",), "Standard"), ServiceLB(("Zone",), "Passthrough")):
        assert lb_candidates(hosts, TrafficPolicy(), WAYPOINT, service_lb=lb) is hosts


def test_prefer_close_orders_by_zone_then_region_without_outlier_detection():
    hosts = cands("r1/z1/s1", "r1/z1/s2", "r1/z2/s1", "r2/z1/s1")
    pri = lb_candidates(hosts, TrafficPolicy(), WAYPOINT, service_lb=PREFER_CLOSE)
    # Same zone (any subzone: PreferClose does not look at it) first, then the region, then the rest.
    assert type(pri) is Prioritized and tuple(pri) == hosts
    assert levels(pri) == [["10.0.0.1", "10.0.0.2"], ["10.0.0.3"], ["10.0.0.4"]]
    # cluster_traffic_policy.go: locality_weighted_lb_config with failoverPriority; SupportsUnhealthyEndpoints
    # → healthy_panic_threshold 0.
    assert pri.plan.locality_weighted and pri.plan.panic_threshold_pct == 0.0


def test_prefer_same_node_separates_subzones_and_nodes():
    near = wl("near", "r1/z1/s1", node="node-1", n=1)
    same_subzone = wl("other-node", "r1/z1/s1", node="node-2", n=2)
    other_subzone = wl("other-subzone", "r1/z1/s2", node="node-3", n=3)
    hosts = tuple(Candidate(w, w.workload_ips[0], 9080, w.uid) for w in (other_subzone, same_subzone, near))
    pri = lb_candidates(hosts, TrafficPolicy(), WAYPOINT, service_lb=PREFER_SAME_NODE)
    assert levels(pri) == [["10.0.0.1"], ["10.0.0.2"], ["10.0.0.3"]]
    # PreferClose puts the three together.
    assert lb_candidates(hosts, TrafficPolicy(), WAYPOINT, service_lb=PREFER_CLOSE).plan.level_hosts[0] == hosts


def test_another_network_comes_last():
    a = wl("same-net-far", "r2/z9/s9", network="net-1", n=1)
    b = wl("other-net-near", "r1/z1/s1", network="net-2", n=2)
    proxy = wl("waypoint", "r1/z1/s1", network="net-1", n=99)
    hosts = tuple(Candidate(w, w.workload_ips[0], 9080, w.uid) for w in (b, a))
    assert levels(lb_candidates(hosts, TrafficPolicy(), proxy, service_lb=PREFER_CLOSE)) == [["10.0.0.1"], ["10.0.0.2"]]


def test_the_destination_rules_locality_setting_comes_first():
    # "We follow this ordering of precedence: DR locality LB > prefer close > mesh config locality LB."
    hosts = cands("r1/z1/s1", "r1/z1/s2", "r2/z1/s1")
    own = LocalityLbSetting(failover_priority=(LABEL_REGION,))
    pri = lb_candidates(hosts, TrafficPolicy(locality_lb=own, outlier_detection=OD), WAYPOINT, service_lb=PREFER_CLOSE)
    assert levels(pri) == [["10.0.0.1", "10.0.0.2"], ["10.0.0.3"]]
    # The DR's own failover still needs outlier detection: without it the cluster is flat (no plan at all).
    flat = lb_candidates(hosts, TrafficPolicy(locality_lb=own), WAYPOINT, service_lb=PREFER_CLOSE)
    assert flat is hosts
    # enabled: false turns locality load balancing off, the traffic distribution too.
    off = TrafficPolicy(locality_lb=LocalityLbSetting(enabled=False))
    assert lb_candidates(hosts, off, WAYPOINT, service_lb=PREFER_CLOSE) is hosts


def test_outlier_detection_alone_does_not_replace_the_traffic_distribution():
    # A DestinationRule with outlierDetection and no localityLbSetting: the traffic distribution's labels, not
    # the mesh default's locality failover (which would put the other subzone behind the waypoint's own).
    hosts = cands("r1/z1/s1", "r1/z1/s2", "r1/z2/s1")
    pri = lb_candidates(hosts, TrafficPolicy(outlier_detection=OD), WAYPOINT, service_lb=PREFER_CLOSE)
    assert levels(pri) == [["10.0.0.1", "10.0.0.2"], ["10.0.0.3"]]
    plain = lb_candidates(hosts, TrafficPolicy(outlier_detection=OD), WAYPOINT)
    assert levels(plain) == [["10.0.0.1"], ["10.0.0.2"], ["10.0.0.3"]]


def test_without_the_waypoints_own_pod_there_is_nothing_to_prefer():
    hosts = cands("r1/z1/s1", "r2/z1/s1")
    assert lb_candidates(hosts, TrafficPolicy(), None, service_lb=PREFER_CLOSE) is hosts


# ---------------------------------------------------------------------------------------------
# Unready endpoints: sent marked UNHEALTHY, so a zone losing pods spills by Envoy's overprovisioning factor


def test_an_unready_pod_in_the_zone_spills_its_share_to_the_next_priority():
    ready_local, far_a, far_b, unready_local = cands("r1/z1/s1", "r1/z2/s1", "r1/z2/s1", "r1/z1/s1")
    pri = lb_candidates((ready_local, far_a, far_b), TrafficPolicy(), WAYPOINT, service_lb=PREFER_CLOSE,
                        unready=(unready_local,))
    # The unready pod is in the plan (its priority has 2 hosts, 1 healthy) but never a candidate.
    assert levels(pri) == [["10.0.0.1", "10.0.0.4"], ["10.0.0.2", "10.0.0.3"]]
    assert tuple(pri) == (ready_local, far_a, far_b) and pri.plan.down == {unready_local.key}
    assert "down=1" in repr(pri)
    # Envoy: P0 health = 140 % × 1/2 = 70 % → 70 % of the load stays, 30 % goes to P1.
    assert priority_loads([(1, 2), (2, 2)], 0.0) == ((70, 30), (False, False))
    lb, rng = LoadBalancer(), random.Random(7)
    picks = collections.Counter(lb.pick(pri, rng=rng, cluster="c").ip for _ in range(4000))
    assert "10.0.0.4" not in picks
    assert 0.66 < picks["10.0.0.1"] / 4000 < 0.74
    # Without the unready pod counted, the local pod would take everything (what filtering alone gives).
    alone = lb_candidates((ready_local, far_a, far_b), TrafficPolicy(), WAYPOINT, service_lb=PREFER_CLOSE)
    assert {lb.pick(alone, rng=rng, cluster="d").ip for _ in range(200)} == {"10.0.0.1"}


def test_all_local_pods_unready_sends_everything_to_the_next_zone_and_none_ready_is_503():
    far_a, far_b, un_a, un_b = cands("r1/z2/s1", "r2/z1/s1", "r1/z1/s1", "r1/z1/s1")
    pri = lb_candidates((far_a, far_b), TrafficPolicy(), WAYPOINT, service_lb=PREFER_CLOSE, unready=(un_a, un_b))
    rng = random.Random(1)
    assert {LoadBalancer().pick(pri, rng=rng).ip for _ in range(200)} == {"10.0.0.1"}   # same region first
    # No ready pod at all: an empty cluster ("no healthy upstream").
    assert lb_candidates((), TrafficPolicy(), WAYPOINT, service_lb=PREFER_CLOSE, unready=(un_a,)) == ()


def test_panic_threshold_is_zero_for_a_traffic_distribution_even_with_min_health_percent():
    # cluster_traffic_policy.go applyOutlierDetection: "if service.SupportsUnhealthyEndpoints() {
    # minHealthPercent = 0 }".
    hosts = cands("r1/z1/s1", "r1/z2/s1")
    od = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100.0, min_health_percent=50.0)
    pri = lb_candidates(hosts, TrafficPolicy(outlier_detection=od), WAYPOINT, service_lb=PREFER_CLOSE)
    assert pri.plan.panic_threshold_pct == 0.0
    # Both ejected: no panic, no host.
    assert LoadBalancer().pick(pri, rng=random.Random(0), ejected={c.key for c in hosts}) is None
    # Without a traffic distribution the same DestinationRule keeps its panic threshold.
    assert lb_candidates(hosts, TrafficPolicy(outlier_detection=od), WAYPOINT).plan.panic_threshold_pct == 50.0


def test_an_ejected_local_pod_fails_over_too():
    hosts = cands("r1/z1/s1", "r1/z2/s1")
    pri = lb_candidates(hosts, TrafficPolicy(outlier_detection=OD), WAYPOINT, service_lb=PREFER_CLOSE)
    rng = random.Random(3)
    assert {LoadBalancer().pick(pri, rng=rng).ip for _ in range(100)} == {"10.0.0.1"}
    assert {LoadBalancer().pick(pri, rng=rng, ejected={hosts[0].key}).ip for _ in range(100)} == {"10.0.0.2"}


def test_warmup_keeps_the_priorities():
    hosts = cands("r1/z1/s1", "r1/z1/s1", "r2/z1/s1")
    pri = lb_candidates(hosts, TrafficPolicy(warmup=Warmup(duration_s=10.0)), WAYPOINT, service_lb=PREFER_CLOSE)
    assert pri.plan.warmup is not None and len(pri.plan.levels) == 2


# ---------------------------------------------------------------------------------------------
# Strict (internalTrafficPolicy: Local) and AllowAll (publishNotReadyAddresses)


def test_strict_keeps_only_the_waypoints_node():
    here = cands("r1/z1/s1", node="node-1")
    there = tuple(Candidate(wl("far", "r1/z1/s1", node="node-2", n=7), "10.0.0.7", 9080, "uid-far") for _ in (0,))
    out = lb_candidates(here + there, TrafficPolicy(), WAYPOINT, service_lb=NODE_LOCAL)
    assert out == here
    # No endpoint on this node: an empty cluster (istiod's NodeLocal filter), even with an unready one here.
    assert lb_candidates(there, TrafficPolicy(), WAYPOINT, service_lb=NODE_LOCAL, unready=here) == ()
    # Without its own pod the waypoint has no node: only endpoints without one match (istiod's GetNodeName "").
    assert strict_match(None, wl("x"), ("Node",)) and not strict_match(None, here[0].workload, ("Node",))
    # Filtering holds for a consistent-hash cluster too.
    ch = TrafficPolicy(consistent_hash=ConsistentHash(key_kind=HASH_SOURCE_IP))
    assert lb_candidates(here + there, ch, WAYPOINT, service_lb=NODE_LOCAL) == here


def test_allow_all_uses_unready_endpoints():
    ready, unready = cands("r1/z1/s1", "r1/z1/s1")
    allow = ServiceLB((), "Standard", "AllowAll")
    assert lb_candidates((ready,), TrafficPolicy(), WAYPOINT, service_lb=allow, unready=(unready,)) == (ready, unready)
    # With a traffic distribution too: they are healthy there, not down.
    both = ServiceLB(("Network", "Region", "Zone"), "Failover", "AllowAll")
    pri = lb_candidates((ready,), TrafficPolicy(), WAYPOINT, service_lb=both, unready=(unready,))
    assert tuple(pri) == (ready, unready) and not pri.plan.down


@pytest.mark.parametrize("algorithm", ["RING_HASH", "MAGLEV"])
def test_consistent_hash_picks_the_priority_by_the_same_hash_then_its_own_table(algorithm):
    # Envoy ThreadAwareLoadBalancerBase chooseHost: ``choosePriority(h, healthy_priority_load, ...)`` with the
    # request's hash h, then the chosen priority's ring / Maglev table.
    near_a, near_b, far_a, far_b = cands("r1/z1/s1", "r1/z1/s2", "r1/z2/s1", "r2/z1/s1")
    ch = ConsistentHash(key_kind=HASH_SOURCE_IP, algorithm=algorithm, table_size=65537)
    tp = TrafficPolicy(consistent_hash=ch)
    pri = lb_candidates((near_a, near_b, far_a, far_b), tp, WAYPOINT, service_lb=PREFER_CLOSE)
    assert levels(pri) == [["10.0.0.1", "10.0.0.2"], ["10.0.0.3"], ["10.0.0.4"]]
    lb, rng = LoadBalancer(), random.Random(0)
    keys = [f"10.1.{i // 250}.{i % 250}".encode() for i in range(400)]
    first = {k: lb.pick(pri, rng=rng, consistent=ch, hash_key=k) for k in keys}
    assert {c.ip for c in first.values()} == {"10.0.0.1", "10.0.0.2"}                  # all in the zone
    assert all(lb.pick(pri, rng=rng, consistent=ch, hash_key=k) == c for k, c in first.items())  # sticky
    # One zone pod ejected: P0 keeps 70 % of the keys (by the hash), the rest go to the next priority.
    moved = {k: lb.pick(pri, rng=rng, consistent=ch, hash_key=k, ejected={near_a.key}) for k in keys}
    share = sum(1 for c in moved.values() if c == near_b) / len(keys)
    assert 0.6 < share < 0.8 and {c.ip for c in moved.values()} == {"10.0.0.2", "10.0.0.3"}
    # The priority is the hash's: ``h % 100 + 1`` up to 70 stays in P0 (a key already on near_b stays there),
    # above goes to P1.
    points = {k: hash64(k) % 100 + 1 for k in keys}
    stay = [k for k, c in first.items() if c == near_b and points[k] <= 70]
    assert stay and all(moved[k] == near_b for k in stay)
    assert all((moved[k] == far_a) == (points[k] > 70) for k in keys)
    # Both zone pods ejected: every key goes to the region's other zone; none ready at all: no host.
    both = {near_a.key, near_b.key}
    assert {lb.pick(pri, rng=rng, consistent=ch, hash_key=k, ejected=both).ip for k in keys} == {"10.0.0.3"}
    assert lb.pick(pri, rng=rng, consistent=ch, hash_key=b"k", ejected={c.key for c in pri}) is None
    # Without a traffic distribution the cluster keeps its one table.
    hosts = (near_a, far_b)
    assert lb_candidates(hosts, tp, WAYPOINT) is hosts


# ---------------------------------------------------------------------------------------------
# The loader: trafficDistribution on an inventory Service


def _service_doc(**extra) -> dict:
    return {"services": [dict(name="reviews", namespace="default", hostname="reviews.default.svc.cluster.local",
                              vips=["/10.96.0.10"], ports={9080: 9080}, **extra)]}


@pytest.mark.parametrize("value,prefs", [
    ("PreferClose", ("Network", "Region", "Zone")),
    ("PreferSameZone", ("Network", "Region", "Zone")),
    ("PreferSameNode", ("Network", "Region", "Zone", "Subzone", "Node")),
])
def test_traffic_distribution_is_the_loadbalancer_istiod_sends_ztunnel(value, prefs):
    inv = parse_inventory(_service_doc(trafficDistribution=value), Where("inv.yaml"))
    assert inv.services["default/reviews.default.svc.cluster.local"].load_balancer == ServiceLB(prefs, "Failover")


@pytest.mark.parametrize("extra,problem", [
    (dict(trafficDistribution="preferClose"),
     "services[0].trafficDistribution: expected one of PreferClose, PreferSameZone, PreferSameNode"),
    (dict(trafficDistribution=["PreferClose"]), "services[0].trafficDistribution: expected one of"),
    (dict(trafficDistribution="PreferClose",
          loadBalancer={"routingPreferences": ["Zone"], "mode": "Failover", "healthPolicy": "OnlyHealthy"}),
     "services[0].trafficDistribution: set either loadBalancer or trafficDistribution, not both"),
])
def test_traffic_distribution_errors_name_the_field(extra, problem):
    with pytest.raises(ConfigErrors) as err:
        parse_inventory(_service_doc(**extra), Where("inv.yaml"))
    assert problem in str(err.value) and "(Service default/reviews)" in str(err.value)


_junk = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=12),
                  st.sampled_from(list(TRAFFIC_DISTRIBUTIONS) + ["Standard", "Failover", "Zone"]),
                  st.lists(st.sampled_from(["Zone", "Node", "x"]), max_size=3),
                  st.dictionaries(st.sampled_from(["routingPreferences", "mode", "healthPolicy", "x"]),
                                  st.sampled_from(["Zone", "Failover", "Strict", "AllowAll", 1]), max_size=4))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["trafficDistribution", "loadBalancer"]), _junk, max_size=2))
def test_only_config_errors_escape_the_service_loader(extra):
    try:
        parse_inventory(_service_doc(**extra), Where("inv.yaml"))
    except ConfigErrors:
        pass


# ---------------------------------------------------------------------------------------------
# End to end: a real waypoint on loopback keeps PreferClose traffic in its zone, and spills when pods there
# are not ready (config reload with their status Unhealthy)


async def test_waypoint_keeps_prefer_close_traffic_in_its_zone(tmp_path, loopback_ip):
    wp_ip, vip = loopback_ip(), loopback_ip()
    pods = {loopback_ip(): name for name in ("near-a", "near-b", "far-a", "far-b")}

    def write_config(unready: set[str]) -> None:
        def pod_doc(ip: str, name: str) -> str:
            zone = "us-east-1a" if name.startswith("near") else "us-east-1b"
            status = "Unhealthy" if name in unready else "Healthy"
            return f"""
- uid: Kubernetes//v1/Pod/default/{name}
  name: {name}
  namespace: default
  serviceAccount: bookinfo-reviews
  workloadIps: ["{ip}"]
  protocol: HBONE
  status: {status}
  locality: {{region: us-east, zone: {zone}, subzone: ""}}
  services:
    default/reviews.default.svc.cluster.local: {{9080: 9080}}"""

        inventory = reviews_inventory("".join(pod_doc(ip, name) for ip, name in pods.items()), wp_ip, vip,
                                      zone="us-east-1a", service_lines="  trafficDistribution: PreferClose\n")
        (cfg / "mesh.yaml").write_text("---\n".join([inventory, WAYPOINT_GATEWAY]))

    cfg = tmp_path / "config"
    cfg.mkdir()
    write_config(set())

    async with named_pods_and_waypoint(cfg, wp_ip, vip, pods) as (wp, store, fetch):
        # All ready: every request stays in the waypoint's zone, no DestinationRule, no outlier detection.
        answers = collections.Counter([await fetch() for _ in range(30)])
        assert set(answers) == {(200, "near-a"), (200, "near-b")} and sum(answers.values()) == 30
        # Both pods of the zone not ready (a config reload): the other zone of the region takes over.
        write_config({"near-a", "near-b"})
        assert store.reload()
        after = collections.Counter([await fetch() for _ in range(20)])
        assert set(after) == {(200, "far-a"), (200, "far-b")} and sum(after.values()) == 20
        # One back: it takes 70 % (Envoy's overprovisioning over 1 ready of 2), the other zone the rest.
        write_config({"near-b"})
        assert store.reload()
        mixed = collections.Counter(body for _, body in [await fetch() for _ in range(60)])
        assert set(mixed) <= {"near-a", "far-a", "far-b"} and "near-b" not in mixed
        assert 25 <= mixed["near-a"] <= 55


# ---------------------------------------------------------------------------------------------
# Properties over random topologies


_loc = st.tuples(st.sampled_from(["r1", "r2"]), st.sampled_from(["z1", "z2"]), st.sampled_from(["s1", "s2"]),
                 st.sampled_from(["node-1", "node-2"]), st.sampled_from(["", "net-2"]), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(_loc, min_size=1, max_size=8), st.sampled_from(list(TRAFFIC_DISTRIBUTIONS)), st.integers(0, 2**16))
def test_picks_are_ready_pods_of_the_closest_priority_that_has_one(specs, distribution, seed):
    pods = [Candidate(w, w.workload_ips[0], 9080, w.uid) for w in (
        Workload(uid=f"uid-{i}", name=f"p{i}", namespace="default", workload_ips=(f"10.0.1.{i}",),
                 locality=Locality(r, z, s), node=node, network=net)
        for i, (r, z, s, node, net, _) in enumerate(specs))]
    ready = tuple(c for c, spec in zip(pods, specs) if spec[5])
    unready = tuple(c for c, spec in zip(pods, specs) if not spec[5])
    lb_setting = TRAFFIC_DISTRIBUTIONS[distribution]
    out = lb_candidates(ready, TrafficPolicy(), WAYPOINT, service_lb=lb_setting, unready=unready)
    assert set(out) == set(ready)                      # the candidates are the ready pods, never an unready one
    if not ready:
        assert out == ()
        return
    labels = service_locality_setting(lb_setting).failover_priority
    from policy.routing.endpoints import topology_labels
    mine = topology_labels(WAYPOINT)

    def closeness(c: Candidate) -> int:   # how many preferred labels, in order, the pod shares with the waypoint
        theirs = topology_labels(c.workload)
        n = 0
        for name in labels:
            if mine.get(name, "") != theirs.get(name, ""):
                break
            n += 1
        return n

    rng = random.Random(seed)
    lb = LoadBalancer()
    picks = [lb.pick(out, rng=rng, cluster="c") for _ in range(20)]
    assert all(p in ready for p in picks)
    # A pick is never closer than the closest ready pod, and every pod of the best closeness class beats a
    # farther one unless that class has unready pods (then some load spills to the next class).
    best = max(closeness(c) for c in ready)
    assert all(closeness(p) <= best for p in picks)
    if not any(closeness(c) >= best for c in unready):
        assert all(closeness(p) == best for p in picks)


def test_a_waypoint_without_its_pod_warns_about_strict_services(caplog):
    """``mode: Strict`` compares endpoints with the waypoint's own pod; a waypoint whose address no workload has
    would drop every endpoint with a locality silently (as istiod does): the snapshot says so, logged once."""
    import dataclasses
    from pathlib import Path
    from policy.mesh import load_mesh_config
    from policy.scope import WaypointScope
    from proxy.snapshot import ConfigStore, build_snapshot

    mesh = load_mesh_config([str(Path(__file__).parent / "fixtures" / "bookinfo")])
    key = next(k for k, s in mesh.inventory.services.items() if s.name == "reviews")
    services = dict(mesh.inventory.services)
    services[key] = dataclasses.replace(services[key], load_balancer=NODE_LOCAL)
    strict = dataclasses.replace(mesh, inventory=dataclasses.replace(mesh.inventory, services=services))
    scope = WaypointScope.parse("default", gateway="default/reviews-waypoint", address_ip="127.250.0.1")
    snap = build_snapshot(strict, mode="waypoint", scope=scope, version=1, now=0)
    assert snap.proxy_workload is None
    assert len(snap.warnings) == 1 and "127.250.0.1" in snap.warnings[0]
    assert "default/reviews (loadBalancer mode: Strict)" in snap.warnings[0]
    # Not said without a Strict service, nor by a node proxy.
    assert build_snapshot(mesh, mode="waypoint", scope=scope, version=1, now=0).warnings == ()
    assert build_snapshot(strict, mode="node", scope=None, version=1, now=0).warnings == ()
    # Logged when the snapshot is installed, once (not again on a reload that still has it).
    store = ConfigStore([], mode="waypoint", scope=scope, clock=lambda: 0.0)
    with caplog.at_level("WARNING", logger="hbone.config"):
        store.install(snap)
        store.install(dataclasses.replace(snap, version=2))
    assert [r.getMessage() for r in caplog.records if r.name == "hbone.config"] == [snap.warnings[0]]
