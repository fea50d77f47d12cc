"""Which policies apply where (reference/istio-semantics.md §1.4, §6 item 6): PolicyIndex.for_waypoint and
PolicyIndex.for_workload, and the end-to-end result of selection + decision at each enforcement point."""

from __future__ import annotations

from policy.authz import PolicyIndex, authorize
from tests.test_authz_helpers import CLIENT, WAYPOINT, ZTUNNEL, allow, policy, tcp, ztunnel_policy

GW = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
SVC = {"group": "", "kind": "Service", "name": "reviews"}
SVC_CORE = {"group": "core", "kind": "Service", "name": "ratings"}
CLASS = {"group": "gateway.networking.k8s.io", "kind": "GatewayClass", "name": "istio-waypoint"}


def keys(policies):
    return sorted(p.key for p in policies)


def mesh():
    return [
        policy({}, name="ns-wide", namespace="default"),                                      # no selector/targetRefs
        policy({}, name="root-wide", namespace="istio-system"),                               # mesh-wide at ztunnel
        policy({"selector": {"matchLabels": {"app": "reviews"}}}, name="sel-reviews", namespace="default"),
        policy({"selector": {"matchLabels": {"app": "other"}}}, name="sel-other", namespace="default"),
        policy({"selector": {"matchLabels": {"app": "reviews"}}}, name="root-sel", namespace="istio-system"),
        policy({"selector": {"matchLabels": {"app": "reviews"}}}, name="foreign-sel", namespace="foreign"),
        policy({"targetRefs": [GW]}, name="to-gw", namespace="default"),
        policy({"targetRefs": [GW]}, name="to-gw-elsewhere", namespace="foreign"),
        policy({"targetRefs": [SVC]}, name="to-svc", namespace="default"),
        policy({"targetRefs": [SVC_CORE, SVC]}, name="to-two-svcs", namespace="default"),
        policy({"targetRefs": [CLASS]}, name="to-class", namespace="istio-system"),
        policy({"targetRefs": [CLASS]}, name="class-outside-root", namespace="default"),
        policy({"targetRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "reviews"}]},
               name="to-se", namespace="default"),
        ztunnel_policy([[]], name="zt-global", namespace="", scope="Global"),
        ztunnel_policy([[]], name="zt-ns", namespace="default", scope="Namespace"),
        ztunnel_policy([[]], name="zt-ns-foreign", namespace="foreign", scope="Namespace"),
        ztunnel_policy([[]], name="zt-sel", namespace="default", scope="WorkloadSelector"),
    ]


def test_waypoint_uses_only_target_refs_to_its_gateway_its_services_and_the_waypoint_class():
    idx = PolicyIndex.build(mesh())
    got = idx.for_waypoint(gateway=("default", "waypoint"), services=[("default", "reviews")])
    assert keys(got) == ["default/to-gw", "default/to-svc", "default/to-two-svcs", "istio-system/to-class"]


def test_waypoint_ignores_selector_and_namespace_wide_policies_including_root_allow_nothing():
    idx = PolicyIndex.build(mesh())
    got = keys(idx.for_waypoint(gateway=("default", "waypoint"), services=[]))
    assert "istio-system/root-wide" not in got and "default/ns-wide" not in got and "default/sel-reviews" not in got
    assert got == ["default/to-gw", "istio-system/to-class"]


def test_waypoint_service_refs_accept_group_core_and_need_the_same_namespace():
    idx = PolicyIndex.build(mesh())
    assert keys(idx.for_waypoint(gateway=None, services=[("default", "ratings")])) == [
        "default/to-two-svcs", "istio-system/to-class"]
    assert keys(idx.for_waypoint(gateway=None, services=[("foreign", "reviews")])) == ["istio-system/to-class"]


def test_a_policy_targeting_two_services_of_one_waypoint_appears_once():
    idx = PolicyIndex.build(mesh())
    got = idx.for_waypoint(gateway=None, services=[("default", "reviews"), ("default", "ratings")])
    assert [p.key for p in got].count("default/to-two-svcs") == 1


def test_gateway_class_targets_count_only_in_the_root_namespace():
    idx = PolicyIndex.build(mesh(), root_namespace="mesh-root")
    assert keys(idx.for_waypoint(gateway=None, services=[])) == []
    idx2 = PolicyIndex.build(mesh())
    assert keys(idx2.for_waypoint(gateway=None, services=[])) == ["istio-system/to-class"]


def test_workload_gets_namespace_root_and_selected_policies_but_no_target_refs():
    idx = PolicyIndex.build(mesh())
    got = keys(idx.for_workload(namespace="default", labels={"app": "reviews", "version": "v1"},
                                workload_policy_keys=["default/zt-sel"]))
    assert got == ["/zt-global", "default/ns-wide", "default/sel-reviews", "default/zt-ns", "default/zt-sel",
                   "istio-system/root-sel", "istio-system/root-wide"]


def test_selector_must_be_a_subset_of_the_workload_labels():
    idx = PolicyIndex.build(mesh())
    got = keys(idx.for_workload(namespace="default", labels={"version": "v1"}))
    assert "default/sel-reviews" not in got and "istio-system/root-sel" not in got


def test_selector_policies_from_other_namespaces_do_not_apply_even_if_listed():
    idx = PolicyIndex.build(mesh())
    got = keys(idx.for_workload(namespace="default", labels={"app": "reviews"},
                                workload_policy_keys=["foreign/foreign-sel", "nope/missing"]))
    assert "foreign/foreign-sel" not in got


def test_workload_in_the_root_namespace_gets_root_policies_once():
    idx = PolicyIndex.build(mesh())
    got = [p.key for p in idx.for_workload(namespace="istio-system", labels={"app": "reviews"})]
    assert got.count("istio-system/root-wide") == 1 and got.count("istio-system/root-sel") == 1


def test_ztunnel_selector_policies_bind_only_through_the_workload_keys():
    idx = PolicyIndex.build(mesh())
    assert "default/zt-sel" not in keys(idx.for_workload(namespace="default", labels={}))


def test_root_namespace_allow_nothing_blocks_at_ztunnel_and_waypoint_class_policy_blocks_at_waypoint():
    # ambient baseline_test TestAuthorizationWaypointDefaultDeny: root-ns `spec: {}` blocks everything at
    # ztunnel; an ALLOW from the waypoint principal re-opens it; a GatewayClass-targeted policy with no
    # rules blocks at the waypoint.
    waypoint_principal = "cluster.local/ns/default/sa/waypoint"
    root_deny_all = policy({}, name="allow-nothing", namespace="istio-system")
    allow_wp = allow({"from": [{"source": {"principals": [waypoint_principal]}}]}, name="allow-waypoint")
    idx = PolicyIndex.build([root_deny_all, allow_wp])
    at_pod = idx.for_workload(namespace="default", labels={})
    assert not authorize(tcp(principal=CLIENT), at_pod, ZTUNNEL).allowed
    assert authorize(tcp(principal=waypoint_principal), at_pod, ZTUNNEL).allowed
    # The waypoint itself ignores both (no targetRefs)...
    assert authorize(tcp(), idx.for_waypoint(gateway=("default", "waypoint"), services=[]), WAYPOINT).allowed
    # ...until a GatewayClass policy without rules exists.
    idx2 = PolicyIndex.build([root_deny_all, policy({"targetRefs": [CLASS]}, name="wp-nothing", namespace="istio-system")])
    d = authorize(tcp(), idx2.for_waypoint(gateway=("default", "waypoint"), services=[]), WAYPOINT)
    assert not d.allowed and d.response_detail == "rbac_access_denied_matched_policy[none]"


def test_deny_attached_to_the_service_applies_at_the_waypoint_only():
    targeted = policy({"action": "DENY", "targetRefs": [SVC], "rules": [{}]}, name="deny-reviews")
    idx = PolicyIndex.build([targeted])
    assert not authorize(tcp(), idx.for_waypoint(gateway=None, services=[("default", "reviews")]), WAYPOINT).allowed
    at_pod = idx.for_workload(namespace="default", labels={"app": "reviews"})
    assert at_pod == () and authorize(tcp(), at_pod, ZTUNNEL).allowed


def test_index_repr_and_len_show_its_state():
    idx = PolicyIndex.build(mesh())
    assert len(idx) == 17
    assert repr(idx).startswith("<PolicyIndex policies=17 ")
