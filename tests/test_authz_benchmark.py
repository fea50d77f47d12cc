"""The authorization benchmark's workload is real and scoped (no timing assertions here)."""

from __future__ import annotations

from benchmarks import authz


def test_benchmark_mesh_keeps_the_request_scope_constant_as_the_mesh_grows():
    small, large = authz.measure(100, 5), authz.measure(1_000, 5)
    for r in (small, large):
        assert r["node_decisions_per_s"] > 0 and r["waypoint_decisions_per_s"] > 0
    # The index hands the request the same policies whatever the size of the rest of the mesh.
    assert (small["in_scope_node"], small["in_scope_waypoint"]) == (large["in_scope_node"], large["in_scope_waypoint"]) == (3, 2)


def test_benchmark_mesh_policies_are_spread_over_namespaces():
    mesh = authz.build_mesh(1_000)
    assert len(mesh) == 1_000 and len({p.namespace for p in mesh}) == 1_000 // authz.POLICIES_PER_NAMESPACE
