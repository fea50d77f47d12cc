"""Header operations of a rule with several weighted destinations, as istiod configures Envoy: each destination's
operations go on its weighted cluster, applied before the route's (so a rule-level ``set`` wins over a
destination's), and a destination's ``host`` becomes that weighted cluster's host rewrite
(processWeightedDestination: ClusterWeight HostRewriteLiteral)."""

from __future__ import annotations

import json

from tests.waypoint_harness import config_docs, destination_rule, start_harness, virtual_service

ROUTING = config_docs(virtual_service("reviews", """
- headers: {request: {set: {x-who: rule}}}
  route:
  - destination: {host: reviews, subset: v1}
    weight: 50
    headers: {request: {set: {x-who: v1-dest, x-only-dest: v1, host: v1.reviews.example}}}
  - destination: {host: reviews, subset: v2}
    weight: 50
    headers: {request: {set: {x-who: v2-dest, x-only-dest: v2}}}
"""), destination_rule("reviews", subsets=("v1", "v2")))


async def test_weighted_destinations_headers_and_host(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=ROUTING, authz=False)
    try:
        c = h.client()
        seen = {}
        for _ in range(40):
            status, headers, body = await c.fetch("/headers")
            assert status == 200
            seen[headers["x-version"]] = json.loads(body)
            if len(seen) == 2:
                break
        assert set(seen) == {"v1", "v2"}
        for version, got in seen.items():
            assert got["x-who"] == "rule", got                 # the rule's set comes after the destination's
            assert got["x-only-dest"] == version, got          # the destination's own still applies
        assert seen["v1"]["host"] == "v1.reviews.example"      # its weighted cluster's host rewrite
        assert seen["v2"]["host"] == "reviews:9080"            # the other keeps the request's host
    finally:
        await h.close()
