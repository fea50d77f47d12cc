"""Authorization decisions per second with 1, 100 and 10 000 AuthorizationPolicies in the mesh.

The policies are spread over many namespaces (``POLICIES_PER_NAMESPACE`` each), as a real mesh's
are; the request's own scope (namespace ``ns-0`` plus the root namespace) always holds the same
handful. A decision is what the proxy does per connection or request: ``PolicyIndex`` lookup for the
destination, then ``authorize``. Because the index buckets policies by namespace and by target, the
rate should barely move from 1 to 10 000 policies; the "unindexed" row (evaluate every policy in the
mesh, as a naive implementation would) shows what the index saves.

``python -m benchmarks.authz [--full]`` prints a table; ``run(quick=True) -> dict`` is what
``make bench`` calls (benchmarks/authz_scenario.py).
"""

from __future__ import annotations

import argparse
import time

from policy.authz import AuthzRequest, Enforcement, HttpAttributes, PolicyIndex, authorize, parse_authorization_policy
from policy.errors import Where

MESH_SIZES = (1, 100, 10_000)
POLICIES_PER_NAMESPACE = 5   # one of each shape below; 10 000 policies = 2 000 namespaces
QUICK_DECISIONS = 3_000      # per measurement; ~0.1-0.3 s each on a loaded 2-core box
FULL_DECISIONS = 30_000
UNINDEXED_MAX_DECISIONS = 300  # evaluating 10 000 policies per decision is slow by design; keep it short
ROOT = "istio-system"


def _doc(ns: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def _namespace_policies(ns: str) -> list[dict]:
    """Five realistic policies per namespace: L4 and L7, ALLOW and DENY, all three attachment kinds."""
    return [
        _doc(ns, "allow-same-ns", {"rules": [{"from": [{"source": {"namespaces": [ns, ROOT]}}]}]}),
        _doc(ns, "deny-plaintext", {"action": "DENY", "selector": {"matchLabels": {"app": "app-0"}},
                                    "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}]}),
        _doc(ns, "allow-get-api", {"targetRefs": [{"kind": "Service", "group": "", "name": "svc-0"}],
                                   "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/client"]}}],
                                              "to": [{"operation": {"methods": ["GET", "HEAD"], "paths": ["/api/*"]}}]}]}),
        _doc(ns, "deny-admin", {"action": "DENY",
                                "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                                "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]},
                                          {"when": [{"key": "request.headers[x-debug]", "values": ["*"]}]}]}),
        _doc(ns, "allow-monitoring", {"selector": {"matchLabels": {"app": "app-0"}},
                                      "rules": [{"from": [{"source": {"ipBlocks": ["10.200.0.0/16"]}}],
                                                 "to": [{"operation": {"ports": ["15020"]}}]}]}),
    ]


def build_mesh(n: int) -> list:
    docs: list[dict] = []
    i = 0
    while len(docs) < n:
        docs.extend(_namespace_policies(f"ns-{i}"))
        i += 1
    return [parse_authorization_policy(d, Where("bench.yaml", k + 1)) for k, d in enumerate(docs[:n])]


WORKLOAD_REQUEST = AuthzRequest("10.1.0.7", "cluster.local/ns/ns-0/sa/client", "10.1.0.9", 8080)
WAYPOINT_REQUEST = AuthzRequest(
    "10.1.0.7", "cluster.local/ns/ns-0/sa/client", "10.96.0.10", 80,
    HttpAttributes("GET", "/api/items?page=2", "svc-0.ns-0.svc.cluster.local", {"user-agent": ("bench",)}))


def _rate(fn, count: int) -> float:
    fn()  # warm up caches and lazily built state
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return count / (time.perf_counter() - start)


def measure(n: int, decisions: int) -> dict:
    policies = build_mesh(n)
    t0 = time.perf_counter()
    index = PolicyIndex.build(policies, root_namespace=ROOT)
    build_ms = (time.perf_counter() - t0) * 1000
    labels = {"app": "app-0"}

    def node_decision():
        applies = index.for_workload(namespace="ns-0", labels=labels)
        return authorize(WORKLOAD_REQUEST, applies, Enforcement.ZTUNNEL)

    def waypoint_decision():
        applies = index.for_waypoint(gateway=("ns-0", "waypoint"), services=(("ns-0", "svc-0"),))
        return authorize(WAYPOINT_REQUEST, applies, Enforcement.WAYPOINT)

    def unindexed_decision():
        return authorize(WAYPOINT_REQUEST, policies, Enforcement.WAYPOINT)

    node = node_decision()
    wp = waypoint_decision()
    assert node.allowed and wp.allowed, (node, wp)  # the benchmark measures real, allowed decisions
    return {
        "node_decisions_per_s": _rate(node_decision, decisions),
        "waypoint_decisions_per_s": _rate(waypoint_decision, decisions),
        "unindexed_decisions_per_s": _rate(unindexed_decision, min(decisions, UNINDEXED_MAX_DECISIONS)),
        "in_scope_node": len(index.for_workload(namespace="ns-0", labels=labels)),
        "in_scope_waypoint": len(index.for_waypoint(gateway=("ns-0", "waypoint"), services=(("ns-0", "svc-0"),))),
        "index_build_ms": build_ms,
    }


def run(quick: bool = True) -> dict:
    decisions = QUICK_DECISIONS if quick else FULL_DECISIONS
    return {f"policies_{n}": measure(n, decisions) for n in MESH_SIZES}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.authz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help=f"{FULL_DECISIONS} decisions per row (default {QUICK_DECISIONS})")
    args = ap.parse_args(argv)
    result = run(quick=not args.full)
    print(f"{'policies in mesh':>16} {'in scope (node/wp)':>19} {'node dec/s':>11} {'waypoint dec/s':>15} "
          f"{'unindexed dec/s':>16} {'index build':>12}")
    for n in MESH_SIZES:
        r = result[f"policies_{n}"]
        print(f"{n:>16,} {r['in_scope_node']:>9}/{r['in_scope_waypoint']:<9} {r['node_decisions_per_s']:>11,.0f} "
              f"{r['waypoint_decisions_per_s']:>15,.0f} {r['unindexed_decisions_per_s']:>16,.0f} "
              f"{r['index_build_ms']:>9.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
