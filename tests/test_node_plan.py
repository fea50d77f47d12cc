"""Pure node-proxy decisions on the bookinfo fixture: plan_outbound (ztunnel outbound classification)
and plan_inbound (ztunnel inbound order: IpMismatch 400, unknown 503, SelfCall 503, deny 401)."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import pytest

from certs.spiffe import SpiffeId
from policy.mesh import load_mesh_config
from proxy.errors import AuthorizationDenied, IpMismatch, NoHealthyUpstream, SelfCall, UnknownDestination
from proxy.node import local_workloads
from proxy.node.inbound import InboundFacts, plan_inbound
from proxy.node.outbound import UnknownHost, plan_outbound
from proxy.snapshot import build_snapshot

BOOKINFO = Path(__file__).parent / "fixtures" / "bookinfo"


@pytest.fixture(scope="module")
def snap():
    mesh = load_mesh_config([str(BOOKINFO)])
    return build_snapshot(mesh, mode="node", scope=None, version=1, now=0.0)


def _wl(snap, ip):
    return snap.mesh.inventory.workload_by_ip[ip]


def sid(sa: str) -> SpiffeId:
    return SpiffeId("cluster.local", "default", sa)


def test_service_with_waypoint_goes_to_the_waypoint_with_vip_authority(snap):
    plan = plan_outbound(("127.2.0.20", 9080), _wl(snap, "127.1.0.10"), snap, random.Random(0))
    assert (plan.protocol, plan.dst, plan.authority, plan.via_waypoint) == ("hbone", ("127.1.0.100", 15008),
                                                                           "127.2.0.20:9080", True)
    assert plan.identities == frozenset({sid("reviews-waypoint")})
    assert plan.host == "reviews.default.svc.cluster.local"


def test_service_without_waypoint_picks_an_endpoint(snap):
    plan = plan_outbound(("127.2.0.21", 9080), _wl(snap, "127.1.0.10"), snap, random.Random(0))
    assert (plan.protocol, plan.dst, plan.authority) == ("hbone", ("127.1.0.21", 15008), "127.1.0.21:9080")
    assert plan.identities == frozenset({sid("bookinfo-reviews")})


def test_service_sans_are_accepted_identities(snap):
    plan = plan_outbound(("127.2.0.10", 9080), None, snap, random.Random(0))
    assert sid("bookinfo-productpage") in plan.identities


def test_tcp_workload_gets_plain_tcp(snap):
    plan = plan_outbound(("127.2.0.40", 9080), None, snap, random.Random(0))
    assert (plan.protocol, plan.dst, plan.authority) == ("tcp", ("127.1.0.40", 9080), None)


def test_pod_ip_direct_and_passthrough(snap):
    plan = plan_outbound(("127.1.0.22", 9080), None, snap, random.Random(0))
    assert (plan.protocol, plan.dst, plan.authority, plan.reason) == ("hbone", ("127.1.0.22", 15008),
                                                                      "127.1.0.22:9080", "pod")
    plan = plan_outbound(("127.9.9.9", 80), None, snap, random.Random(0))
    assert (plan.protocol, plan.dst, plan.reason) == ("tcp", ("127.9.9.9", 80), "passthrough")


def test_hostnames_and_short_names(snap):
    for host in ("reviews.default.svc.cluster.local", "reviews.default", "reviews.default.svc", "REVIEWS.default."):
        plan = plan_outbound((host, 9080), None, snap, random.Random(0))
        assert plan.authority == "127.2.0.20:9080", host
    with pytest.raises(UnknownHost):
        plan_outbound(("nope.default.svc.cluster.local", 9080), None, snap, random.Random(0))


def test_self_call_and_missing_port(snap):
    with pytest.raises(SelfCall):
        plan_outbound(("127.1.0.21", 15008), None, snap, random.Random(0))
    with pytest.raises(NoHealthyUpstream):
        plan_outbound(("127.2.0.21", 1234), None, snap, random.Random(0))


def test_endpoints_weighted_by_capacity():
    mesh = load_mesh_config([str(BOOKINFO)])
    from dataclasses import replace
    from policy.inventory import Inventory
    inv = mesh.inventory
    wls = [replace(w, capacity=3) if w.name == "reviews-v3-0" else w for w in inv.workloads.values()]
    mesh = replace(mesh, inventory=Inventory.build(wls, list(inv.services.values())))
    snap = build_snapshot(mesh, mode="node", scope=None, version=1, now=0.0)
    svc = snap.mesh.inventory.services["default/reviews.default.svc.cluster.local"]
    svc_nowp = replace(svc, waypoint=None)
    from proxy.node.outbound import _to_service
    rng = random.Random(7)
    counts = collections.Counter(_to_service(snap.mesh.inventory, svc_nowp, "127.2.0.20", 9080, None, rng).dst[0]
                                 for _ in range(5000))
    assert abs(counts["127.1.0.23"] / 5000 - 0.6) < 0.03, counts   # capacity 3 of 5


def test_local_workloads_exclude_the_waypoint_pod(snap):
    assert set(local_workloads(snap, "node-a")) == {"127.1.0.10", "127.1.0.30", "127.1.0.40"}
    assert set(local_workloads(snap, "node-b")) == {"127.1.0.21", "127.1.0.22", "127.1.0.23"}


def _facts(local, authority, principal="cluster.local/ns/default/sa/bookinfo-reviews", node="node-a"):
    return InboundFacts(node, local, authority, "127.1.0.21", principal)


def test_inbound_order(snap):
    # 1. :authority must be the pod this connection reached (no identity spoofing): 400.
    with pytest.raises(IpMismatch) as e:
        plan_inbound(_facts("127.1.0.10", ("127.1.0.30", 9080)), snap)
    assert e.value.hbone_status == 400
    # 2. not a workload of this node: 503.
    with pytest.raises(UnknownDestination) as e:
        plan_inbound(_facts("127.1.0.21", ("127.1.0.21", 9080)), snap)
    assert e.value.hbone_status == 503
    # 3. the proxy's own port: 503.
    with pytest.raises(SelfCall) as e:
        plan_inbound(_facts("127.1.0.30", ("127.1.0.30", 15006)), snap)
    assert e.value.hbone_status == 503
    # 4. L4 policy (ratings allows only the reviews identity): 401 for productpage and plaintext.
    assert plan_inbound(_facts("127.1.0.30", ("127.1.0.30", 9080)), snap).target == ("127.1.0.30", 9080)
    for principal in ("cluster.local/ns/default/sa/bookinfo-productpage", None):
        with pytest.raises(AuthorizationDenied) as e:
            plan_inbound(_facts("127.1.0.30", ("127.1.0.30", 9080), principal), snap)
        assert e.value.hbone_status == 401
    # No policy selects productpage: default allow, even for plaintext.
    assert plan_inbound(_facts("127.1.0.10", ("127.1.0.10", 9080), None), snap).decision.allowed


def test_a_per_snapshot_memo_changes_no_plan_and_no_random_draw(snap):
    """plan_outbound(memo=) remembers the endpoint choices (deterministic per snapshot) but still
    draws the weighted pick from rng each time: with the same seed, the same plans in the same order."""
    from dataclasses import replace
    from proxy.node.outbound import _to_service
    src = _wl(snap, "127.1.0.10")
    dsts = [("reviews-v1.default.svc.cluster.local", 9080), ("127.2.0.20", 9080), ("127.2.0.30", 9080),
            ("127.1.0.21", 9080), ("ratings.default", 9080), ("203.0.113.9", 443)] * 20
    rng_plain, rng_memo = random.Random(11), random.Random(11)
    memo: dict = {}
    plain = [plan_outbound(d, src, snap, rng_plain) for d in dsts]
    memoised = [plan_outbound(d, src, snap, rng_memo, memo=memo) for d in dsts]
    assert memoised == plain
    assert any(k[0] == "endpoints" for k in memo)       # the memo is in effect
    # Three weighted endpoints (reviews without its waypoint): the same picks, draw for draw.
    svc = replace(snap.mesh.inventory.services["default/reviews.default.svc.cluster.local"], waypoint=None)
    inv = snap.mesh.inventory
    picks_plain = [_to_service(inv, svc, "127.2.0.20", 9080, src, rng_plain).dst for _ in range(300)]
    picks_memo = [_to_service(inv, svc, "127.2.0.20", 9080, src, rng_memo, memo).dst for _ in range(300)]
    assert picks_memo == picks_plain and len(set(picks_plain)) == 3
    assert rng_plain.random() == rng_memo.random()      # the same number of draws
    for _ in range(2):                                  # failures are not remembered as answers
        with pytest.raises(NoHealthyUpstream):
            plan_outbound(("127.2.0.30", 9999), src, snap, rng_memo, memo=memo)
