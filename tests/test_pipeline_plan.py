"""The pipeline's pure stages against the bookinfo snapshot: chain match, per-request plans, explain,
and the config-dump adapter."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from policy.mesh import load_mesh_config
from policy.routing.select import HttpRequestView
from policy.scope import WaypointScope
from proxy.admin.views import build_waypoint_views
from proxy.errors import AuthorizationDenied, NoRoute, UnknownDestination
from proxy.pipeline.answers import exhausted, local_reply
from proxy.pipeline.authz import l4_decision
from proxy.pipeline.chains import match_chain, protocol_of
from proxy.pipeline.context import TunnelContext
from proxy.pipeline.explain import explain_request
from proxy.pipeline.http import plan_request
from proxy.pipeline.originate import OriginateFailed
from proxy.pipeline.views_input import views_input
from proxy.snapshot import build_snapshot

FIX = Path(__file__).parent / "fixtures"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


@pytest.fixture(scope="module")
def snap():
    mesh = load_mesh_config([str(FIX / "bookinfo")])
    scope = WaypointScope.parse("default", gateway="default/reviews-waypoint", address_ip="127.1.0.100")
    return build_snapshot(mesh, mode="waypoint", scope=scope, version=1, now=0)


def _ctx(principal=PRODUCTPAGE, authority=("127.2.0.20", 9080)):
    return TunnelContext(authority, principal, ("127.1.0.10", 40000), ("127.1.0.100", 15008), ("127.1.0.10", 40000))


def test_chain_match(snap):
    c = match_chain(("127.2.0.20", 9080), snap)
    assert c.name == "inbound-vip|9080|http|reviews.default.svc.cluster.local"
    assert c.envoy_name == "inbound-vip|9080||reviews.default.svc.cluster.local-http"
    d = match_chain(("127.1.0.22", 9080), snap)      # a reviews pod: direct, protocol from the service port
    assert d.name == "direct-http" and d.workload.name == "reviews-v2-0"
    assert d.resolved("tcp").name == "direct-tcp"
    for bad in [("127.2.0.30", 9080), ("127.2.0.20", 1), ("127.1.0.10", 9080), ("10.0.0.1", 80)]:
        with pytest.raises(UnknownDestination):   # other services, other ports, pods outside the scope
            match_chain(bad, snap)
    assert protocol_of("grpc") == "http" and protocol_of("TCP") == "tcp" and protocol_of(None) is None
    assert protocol_of("kubernetes.io/ws") is None
    # HTTP chains are not decided per tunnel (Envoy has no network RBAC filter on them).
    assert l4_decision(c, snap, "127.1.0.10", "spiffe://cluster.local/ns/default/sa/other") is None
    # ...while the same tunnel as a TCP chain is denied by the ALLOW-only-productpage policy.
    assert not l4_decision(c.resolved("tcp"), snap, "127.1.0.10", "spiffe://cluster.local/ns/default/sa/other").allowed
    assert l4_decision(c.resolved("tcp"), snap, "127.1.0.10", PRODUCTPAGE).allowed


def test_plan_request(snap):
    view = HttpRequestView("GET", "/reviews/1", "reviews:9080", {}, 9080)
    rng = random.Random(1)
    clusters = {}
    for _ in range(2000):
        plan = plan_request(_ctx(), snap, view, rng=rng)
        assert plan.error is None and plan.decision.allowed
        clusters[plan.upstream.cluster] = clusters.get(plan.upstream.cluster, 0) + 1
        assert all(c.workload.labels["version"] == plan.upstream.cluster.split("/")[1].split("|")[0]
                   for c in plan.upstream.candidates)
    assert abs(clusters["inbound-vip|9080|http/v2|reviews.default.svc.cluster.local"] / 2000 - 0.1) < 0.03
    denied = plan_request(_ctx("spiffe://cluster.local/ns/default/sa/x"), snap, view, rng=rng)
    assert isinstance(denied.error, AuthorizationDenied)
    reply = local_reply(denied.error)
    assert (reply.status, reply.body, reply.flags) == (403, b"RBAC: access denied", ())
    gone = plan_request(_ctx(authority=("127.2.0.99", 9080)), snap, view, rng=rng)
    assert isinstance(gone.error, UnknownDestination)
    assert local_reply(NoRoute()).status == 404 and local_reply(NoRoute()).flags == ("NR",)


def test_exhausted_flags():
    err = OriginateFailed("refused", "x", upstream="1.2.3.4:15008")
    assert local_reply(exhausted(err, 1)).flags == ("UF",)
    r = local_reply(exhausted(err, 3))
    assert r.flags == ("UF", "URX") and r.status == 503 and b"retried" in r.body


def test_explain(snap):
    ans = explain_request(snap, PRODUCTPAGE, ("reviews", 9080), "GET", "/")
    assert ans["decision"] == "allow" and ans["chain"] == "inbound-vip|9080||reviews.default.svc.cluster.local-http"
    assert [c["weight"] for c in ans["route"]["clusters"]] == [90, 10]
    assert {e["address"] for e in ans["endpoints"]} == {"127.1.0.21:9080", "127.1.0.22:9080"}
    deny = explain_request(snap, "spiffe://cluster.local/ns/default/sa/x", ("127.2.0.20", 9080), "GET", "/")
    assert deny["decision"] == "deny" and deny["response"]["body"] == "RBAC: access denied"
    assert deny["authorization"]["policies"][0]["rules"][0]["matched"] is False
    assert explain_request(snap, None, ("1.2.3.4", 80))["decision"] == "unknown-destination"


def test_views_input(snap):
    d = build_waypoint_views(**views_input(snap)).to_dict()
    names = {c["name"] for c in d["clusters"]}
    assert "inbound-vip|9080|http/v1|reviews.default.svc.cluster.local" in names
    assert not any(n.startswith("outbound|") for n in names)   # nothing outside the scope
    chains = [fc["name"] for listener in d["listeners"] for fc in listener.get("filterChains", [])]
    assert "inbound-vip|9080||reviews.default.svc.cluster.local-http" in chains
    assert chains.count("direct-tcp") == 3   # one per reviews pod
