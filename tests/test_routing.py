"""Routing semantics (reference/istio-semantics.md §2, §6 items 9–10): VirtualService first-match
routing, DestinationRule subsets and policies, Gateway API HTTPRoute precedence, and the defaults.
Each test is named after the Istio / Gateway API behaviour it pins down."""

from __future__ import annotations

import random

import pytest

from policy.routing import (
    DEFAULT_RETRY_POLICY, DirectResponse, Forward, NoRoute, Redirect, RouteDecision, choose_destination,
    decide_fault, mirrors_for, route_http, route_tcp,
)
from policy.routing.model import RedirectSpec, SEED_DEFAULT_RETRIABLE_CODES
from tests.test_routing_common import (
    H, MULTI, REVIEWS, REVIEWS_V1, SUBSETS_DR, dr, hr, req, table, vs,
)

RV = {"host": "reviews", "subset": None}


def dest(host="reviews", subset=None, port=None):
    d = {"host": host}
    if subset:
        d["subset"] = subset
    if port:
        d["port"] = {"number": port}
    return d


def route_of(t, r=None, service=REVIEWS, port=9080):
    return route_http(r or req(), t.http_routes_for(service, port))


def clusters(decision) -> list[str]:
    assert isinstance(decision, RouteDecision), decision
    assert isinstance(decision.action, Forward)
    return [d.cluster_name for d in decision.action.destinations]


# ---------------------------------------------------------------------------------------------
# Default route


def test_default_route_without_config_forwards_to_all_endpoints_with_default_retries_and_no_timeout():
    d = route_of(table())
    assert d.route_config == "inbound-vip|9080|http|reviews.default.svc.cluster.local"
    assert d.route_name == "default"
    assert clusters(d) == ["inbound-vip|9080|http|reviews.default.svc.cluster.local"]
    fwd = d.action
    assert fwd.timeout_s is None                         # "default is disabled"
    assert fwd.retry == DEFAULT_RETRY_POLICY
    assert fwd.destinations[0].subset_labels is None     # all endpoints


def test_default_retry_policy_is_the_seeds_two_retries_on_connect_failure_and_503():
    p = DEFAULT_RETRY_POLICY
    assert p.attempts == 2 and p.max_requests == 3
    assert p.retry_on == {"connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes"}
    assert p.retriable_status_codes == SEED_DEFAULT_RETRIABLE_CODES == {503}
    assert p.retry_ignore_previous_hosts and p.host_selection_max_attempts == 5
    assert p.backoff_base_s == 0.025 and p.backoff_max_s == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------
# VirtualService matching


def two_rule_vs(first_match: dict, first=("reviews", "v2"), second_match=None):
    rules = [{"match": [first_match], "route": [{"destination": dest(*first)}]}]
    second = {"route": [{"destination": dest("reviews", "v1")}]}
    if second_match is not None:
        second["match"] = [second_match]
    rules.append(second)
    return table([vs({"hosts": ["reviews"], "http": rules})], [dr(SUBSETS_DR)])


V1 = "inbound-vip|9080|http/v1|reviews.default.svc.cluster.local"
V2 = "inbound-vip|9080|http/v2|reviews.default.svc.cluster.local"


def test_vs_rules_are_evaluated_in_order_first_match_wins():
    t = table([vs({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"prefix": "/a"}}], "route": [{"destination": dest("reviews", "v1")}]},
        {"match": [{"uri": {"prefix": "/a/b"}}], "route": [{"destination": dest("reviews", "v2")}]},
    ]})], [dr(SUBSETS_DR)])
    d = route_of(t, req("/a/b/c"))
    assert clusters(d) == [V1] and d.rule_index == 0 and d.route_name == "reviews.default"


def test_vs_rule_without_match_is_catch_all_and_short_circuits_later_rules():
    t = table([vs({"hosts": ["reviews"], "http": [
        {"route": [{"destination": dest("reviews", "v1")}]},
        {"match": [{"uri": {"exact": "/x"}}], "route": [{"destination": dest("reviews", "v2")}]},
    ]})], [dr(SUBSETS_DR)])
    assert clusters(route_of(t, req("/x"))) == [V1]


def test_vs_with_rules_but_no_match_is_404_nr():
    t = table([vs({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"exact": "/only"}}], "route": [{"destination": dest()}]}]})])
    d = route_of(t, req("/other"))
    assert isinstance(d, NoRoute) and d.status == 404 and d.flag == "NR"


@pytest.mark.parametrize("match,path,hit", [
    ({"uri": {"prefix": "/v2"}}, "/v2example", True),          # VS prefix is a plain string prefix
    ({"uri": {"prefix": "/v2"}}, "/v1/v2", False),
    ({"uri": {"exact": "/p"}}, "/p?x=1", True),                # query string removed before matching
    ({"uri": {"exact": "/p"}}, "/P", False),                   # exact is case-sensitive
    ({"uri": {"exact": "/p"}, "ignoreUriCase": True}, "/P", True),
    ({"uri": {"prefix": "/API"}, "ignoreUriCase": True}, "/api/x", True),
    ({"uri": {"regex": "/p/[0-9]+"}}, "/p/12", True),
    ({"uri": {"regex": "/p/[0-9]+"}}, "/p/12/x", False),       # RE2 full match, not search
    ({"uri": {"regex": "/p/[0-9]+"}}, "/p/12?q=a", True),
])
def test_vs_uri_matching(match, path, hit):
    d = route_of(two_rule_vs(match), req(path))
    assert clusters(d) == ([V2] if hit else [V1])


@pytest.mark.parametrize("match,headers,hit", [
    ({"headers": {"end-user": {"exact": "jason"}}}, {"End-User": "jason"}, True),   # names lowercase
    ({"headers": {"end-user": {"exact": "jason"}}}, {"end-user": "Jason"}, False),  # values case-sensitive
    ({"headers": {"end-user": {}}}, {"end-user": ""}, True),                        # {} = presence
    ({"headers": {"end-user": {}}}, {}, False),
    ({"headers": {"x": {"prefix": "ab"}}}, {"x": "abc"}, True),
    ({"headers": {"x": {"regex": "a.c"}}}, {"x": "abcd"}, False),
    ({"headers": {"x": {"exact": "a,b"}}}, {"x": ("a", "b")}, True),              # lines joined with ","
    ({"withoutHeaders": {"x": {"regex": "*"}}}, {}, True),                       # "*" ⇒ presence, negated
    ({"withoutHeaders": {"x": {"regex": "*"}}}, {"x": "1"}, False),
    ({"withoutHeaders": {"x": {"exact": "1"}}}, {"x": "2"}, True),
])
def test_vs_header_and_without_header_matching(match, headers, hit):
    assert clusters(route_of(two_rule_vs(match), req("/", headers=headers))) == ([V2] if hit else [V1])


@pytest.mark.parametrize("match,path,hit", [
    ({"queryParams": {"key": {"exact": ""}}}, "/p?key", True),          # exact "" matches ?key
    ({"queryParams": {"key": {"exact": ""}}}, "/p?key=1", False),
    ({"queryParams": {"key": {"exact": "1"}}}, "/p?a=b&key=1", True),
    ({"queryParams": {"key": {"exact": "1"}}}, "/p?KEY=1", False),       # names case-sensitive
    ({"queryParams": {"key": {"regex": "[0-9]+"}}}, "/p?key=42", True),
])
def test_vs_query_param_matching(match, path, hit):
    assert clusters(route_of(two_rule_vs(match), req(path))) == ([V2] if hit else [V1])


@pytest.mark.parametrize("match,r,hit", [
    ({"method": {"exact": "POST"}}, req(method="POST"), True),
    ({"method": {"exact": "POST"}}, req(method="post"), False),           # methods case-sensitive
    ({"scheme": {"exact": "https"}}, req(scheme="http"), False),
    ({"authority": {"exact": "reviews:9080"}}, req(authority="reviews:9080"), True),
    ({"authority": {"prefix": "reviews"}}, req(authority="ratings"), False),
    ({"port": 9080}, req(port=9080), True),
    # fields inside one match are ANDed
    ({"method": {"exact": "GET"}, "uri": {"prefix": "/x"}}, req("/y"), False),
])
def test_vs_method_scheme_authority_port_matching(match, r, hit):
    assert clusters(route_of(two_rule_vs(match), r)) == ([V2] if hit else [V1])


def test_vs_match_entries_are_ored():
    t = table([vs({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"exact": "/a"}}, {"uri": {"exact": "/b"}}], "route": [{"destination": dest("reviews", "v2")}]},
        {"route": [{"destination": dest("reviews", "v1")}]}]})], [dr(SUBSETS_DR)])
    assert clusters(route_of(t, req("/b"))) == [V2]
    assert clusters(route_of(t, req("/c"))) == [V1]


def test_vs_source_labels_match_is_dropped_at_waypoint_not_turned_into_catch_all():
    # istio/istio#51565: waypoints drop sourceLabels matches; a rule left without matches does not apply.
    t = two_rule_vs({"sourceLabels": {"app": "productpage"}})
    assert clusters(route_of(t)) == [V1]
    assert any("sourceLabels" in w for w in t.warnings)


def test_vs_port_match_selects_rules_per_service_port():
    t = table([vs({"hosts": ["multi"], "http": [
        {"match": [{"port": 9090}], "route": [{"destination": dest("multi", port=9090)}]},
    ]}, name="multi")])
    on_9090 = route_of(t, req(port=9090), MULTI, 9090)
    assert clusters(on_9090) == ["inbound-vip|9090|http|multi.default.svc.cluster.local"]
    # port 80 has no applicable rule: the default route serves it
    assert route_of(t, req(port=80), MULTI, 80).route_name == "default"


def test_vs_the_waypoint_uses_only_the_first_http_vs_of_the_service_and_waypoint_namespaces():
    # istiod listener_waypoint.go buildWaypointInboundHTTPRouteConfig: "virtualServices :=
    # getVirtualServiceForWaypoint(...)" (the service's or the waypoint's namespace only), then
    # "vs := slices.FindFunc(virtualServices, func(c config.Config) bool { // Find the first HTTP virtual service
    # return c.Spec.(*networking.VirtualService).Http != nil })": one VirtualService, never a merge — the
    # oldest (sortConfigByCreationTime) of those two namespaces.
    a = vs({"hosts": ["reviews.default.svc.cluster.local"], "http": [
        {"match": [{"uri": {"prefix": "/c"}}], "route": [{"destination": dest("reviews", "v1")}]}]}, "a", order=2)
    b = vs({"hosts": ["reviews.default.svc.cluster.local"], "http": [
        {"match": [{"uri": {"prefix": "/a"}}], "route": [{"destination": dest("reviews.default.svc.cluster.local", "v2")}]},
        {"match": [{"uri": {"prefix": "/b"}}], "route": [{"destination": dest("reviews.default.svc.cluster.local", "v2")}]},
    ]}, "b", ns="istio-waypoints", order=1)
    other = vs({"hosts": ["reviews.default.svc.cluster.local"], "http": [
        {"route": [{"destination": dest("reviews.default.svc.cluster.local", "v1")}]}]}, "c", ns="elsewhere", order=0)
    t = table([a, b, other], [dr(SUBSETS_DR)], waypoint_namespace="istio-waypoints")
    routes = t.http_routes_for(REVIEWS, 9080)
    assert routes.sources == ("VirtualService istio-waypoints/b",)   # b is older: it is the one used
    assert clusters(route_http(req("/a"), routes)) == [V2]
    assert isinstance(route_http(req("/c"), routes), NoRoute)    # a's rule is not merged in
    assert isinstance(route_http(req("/z"), routes), NoRoute)    # the other namespace's catch-all is ignored
    assert any("VirtualService default/a is ignored" in w for w in t.warnings)
    assert not any("elsewhere/c" in w for w in t.warnings)       # not a candidate at all: no warning


def test_vs_short_host_is_resolved_in_the_vs_namespace():
    t = table([vs({"hosts": ["reviews"], "http": [{"route": [{"destination": dest()}]}]}, ns="other")])
    assert route_of(t).route_name == "default"


def test_vs_bound_to_gateways_only_does_not_apply_to_mesh():
    t = table([vs({"hosts": ["reviews"], "gateways": ["ingress"], "http": [{"route": [{"destination": dest()}]}]})])
    assert route_of(t).route_name == "default"


# ---------------------------------------------------------------------------------------------
# VirtualService destinations


def split(weights, subsets=("v1", "v2")):
    return table([vs({"hosts": ["reviews"], "http": [{"route": [
        {"destination": dest("reviews", s), "weight": w} for s, w in zip(subsets, weights)]}]})], [dr(SUBSETS_DR)])


def test_vs_subset_split_90_10_names_subset_clusters_and_labels():
    d = route_of(split([90, 10]))
    assert clusters(d) == [V1, V2]
    a, b = d.action.destinations
    assert (a.weight, b.weight) == (90, 10)
    assert dict(a.subset_labels) == {"version": "v1"} and a.fail_status is None
    rng = random.Random(0)
    n = sum(choose_destination(d.action, rng).subset == "v2" for _ in range(10_000))
    assert abs(n / 10_000 - 0.10) < 0.02


def test_vs_weight_zero_destination_never_receives_traffic():
    d = route_of(split([0, 5]))
    rng = random.Random(0)
    assert {choose_destination(d.action, rng).subset for _ in range(2000)} == {"v2"}


def test_vs_single_destination_receives_all_traffic_whatever_its_weight():
    t = table([vs({"hosts": ["reviews"], "http": [{"route": [{"destination": dest("reviews", "v1"), "weight": 0}]}]})],
              [dr(SUBSETS_DR)])
    d = route_of(t)
    assert choose_destination(d.action, random.Random(0)).subset == "v1"


def test_vs_missing_subset_routes_to_a_cluster_that_does_not_exist_503_nc():
    d = route_of(split([50, 50], subsets=("v1", "v9")))
    bad = d.action.destinations[1]
    assert bad.fail_status == 503 and bad.fail_flag == "NC" and "v9" in bad.problem
    assert d.action.destinations[0].fail_status is None


def test_vs_subset_without_any_destination_rule_is_503_nc():
    t = table([vs({"hosts": ["reviews"], "http": [{"route": [{"destination": dest("reviews", "v1")}]}]})])
    assert route_of(t).action.destinations[0].fail_status == 503


def test_vs_destination_port_optional_for_single_port_service_and_other_service_is_outbound_cluster():
    t = table([vs({"hosts": ["reviews"], "http": [{"route": [{"destination": dest("ratings")}]}]})],
              services=[REVIEWS])
    (d,) = route_of(t).action.destinations
    assert d.port == 9080 and d.cluster_name == "outbound|9080||ratings.default.svc.cluster.local"


def test_vs_unknown_destination_host_is_503():
    t = table([vs({"hosts": ["reviews"], "http": [{"route": [{"destination": dest("nope")}]}]})])
    assert route_of(t).action.destinations[0].fail_status == 503


def test_vs_timeout_is_disabled_by_default_and_taken_from_the_rule():
    t = table([vs({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"prefix": "/slow"}}], "timeout": "0.5s", "route": [{"destination": dest()}]},
        {"route": [{"destination": dest()}]}]})])
    assert route_of(t, req("/slow")).action.timeout_s == 0.5
    assert route_of(t, req("/")).action.timeout_s is None


def test_vs_retries_override_the_default_and_integers_in_retry_on_become_status_codes():
    t = table([vs({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"prefix": "/r"}}], "retries": {"attempts": 3, "perTryTimeout": "2s",
                                                          "retryOn": "gateway-error,409"},
         "route": [{"destination": dest()}]},
        {"retries": {"attempts": 0}, "route": [{"destination": dest()}]}]})])
    p = route_of(t, req("/r")).action.retry
    assert p.attempts == 3 and p.max_requests == 4 and p.per_try_timeout_s == 2.0
    assert p.retry_on == {"gateway-error", "retriable-status-codes"} and p.retriable_status_codes == {409}
    off = route_of(t, req("/")).action.retry
    assert off.attempts == 0 and not off.should_retry(1, "connect-failure")   # attempts 0 disables


def test_vs_retries_without_retry_on_keep_the_default_conditions():
    t = table([vs({"hosts": ["reviews"], "http": [{"retries": {"attempts": 5}, "route": [{"destination": dest()}]}]})])
    p = route_of(t).action.retry
    assert p.attempts == 5 and p.retry_on == DEFAULT_RETRY_POLICY.retry_on


def test_vs_fault_percentage_absent_means_no_request_is_delayed_or_aborted():
    t = table([vs({"hosts": ["reviews"], "http": [{"fault": {"delay": {"fixedDelay": "7s"},
                                                              "abort": {"httpStatus": 500}},
                                                    "route": [{"destination": dest()}]}]})])
    fwd = route_of(t).action
    rng = random.Random(0)
    assert all(decide_fault(fwd, rng).delay_s is None and decide_fault(fwd, rng).abort_status is None
               for _ in range(500))


def test_vs_fault_percentages_apply_per_request():
    t = table([vs({"hosts": ["reviews"], "http": [{"fault": {
        "delay": {"fixedDelay": "7s", "percentage": {"value": 100}},
        "abort": {"httpStatus": 503, "percentage": {"value": 25}}}, "route": [{"destination": dest()}]}]})])
    fwd = route_of(t).action
    rng = random.Random(0)
    draws = [decide_fault(fwd, rng) for _ in range(10_000)]
    assert all(x.delay_s == 7.0 for x in draws)
    assert abs(sum(x.abort_status == 503 for x in draws) / 10_000 - 0.25) < 0.02


def test_vs_rewrite_uri_replaces_the_matched_prefix_and_keeps_the_query():
    t = table([vs({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"prefix": "/old"}}], "rewrite": {"uri": "/new", "authority": "backend:80"},
         "route": [{"destination": dest()}]},
        {"match": [{"uri": {"exact": "/e"}}], "rewrite": {"uri": "/whole"}, "route": [{"destination": dest()}]},
        {"match": [{"uri": {"prefix": "/rx"}}], "rewrite": {"uriRegexRewrite": {"match": "^/rx/(.*)$", "rewrite": "/\\1"}},
         "route": [{"destination": dest()}]},
    ]})])
    d = route_of(t, req("/old/path?q=1"))
    assert (d.path, d.authority) == ("/new/path?q=1", "backend:80")
    assert route_of(t, req("/e?a")).path == "/whole?a"
    assert route_of(t, req("/rx/a/b")).path == "/a/b"


def test_vs_header_operations_at_rule_and_destination_level():
    t = table([vs({"hosts": ["reviews"], "http": [{
        "headers": {"request": {"set": {"x-set": "1"}, "add": {"x-add": "b"}, "remove": ["x-drop"]},
                    "response": {"set": {"x-resp": "r"}}},
        "route": [{"destination": dest(), "headers": {"request": {"set": {"x-dest": "d"}}}}]}]})])
    fwd = route_of(t).action
    out = fwd.headers.request.apply({"x-add": ("a",), "x-drop": ("gone",), "x-set": ("0",)})
    assert out == {"x-add": ("a,b",), "x-set": ("1",)}          # add appends with ","
    assert fwd.headers.response.apply({}) == {"x-resp": ("r",)}
    assert fwd.destinations[0].headers.request.apply({}) == {"x-dest": ("d",)}


def test_vs_redirect_and_direct_response():
    t = table([vs({"hosts": ["reviews"], "http": [
        {"match": [{"uri": {"prefix": "/moved"}}], "redirect": {"uri": "/new", "authority": "other:8080"}},
        {"match": [{"uri": {"prefix": "/https"}}], "redirect": {"scheme": "https", "redirectCode": 308}},
        {"directResponse": {"status": 418, "body": {"string": "teapot"}}}]})])
    r1 = route_of(t, req("/moved/x?a=1")).action
    assert isinstance(r1, Redirect) and r1.status == 301 and r1.location == "http://other:8080/new?a=1"
    r2 = route_of(t, req("/https", authority="reviews:9080")).action
    assert (r2.status, r2.location) == (308, "https://reviews/https")
    r3 = route_of(t, req("/")).action
    assert r3 == DirectResponse(418, "teapot")


def test_vs_mirror_percentage_absent_means_all_requests():
    t = table([vs({"hosts": ["reviews"], "http": [{"mirror": {"host": "ratings"},
                                                    "route": [{"destination": dest()}]}]})])
    fwd = route_of(t).action
    (m,) = mirrors_for(fwd, random.Random(0))
    assert m.host == "ratings.default.svc.cluster.local"


def test_vs_tcp_routes_are_weighted_and_default_to_the_service():
    t = table([vs({"hosts": ["reviews"], "tcp": [{"match": [{"port": 9080}], "route": [
        {"destination": dest("reviews", "v1"), "weight": 80},
        {"destination": dest("reviews", "v2"), "weight": 20}]}]})], [dr(SUBSETS_DR)])
    routes = t.tcp_routes_for(REVIEWS, 9080)
    rng = random.Random(0)
    picks = [route_tcp(routes, rng).cluster_name for _ in range(10_000)]
    assert abs(picks.count("inbound-vip|9080|tcp/v1|reviews.default.svc.cluster.local") / 10_000 - 0.8) < 0.02
    plain = table().tcp_routes_for(REVIEWS, 9080)
    assert route_tcp(plain, rng).cluster_name == "inbound-vip|9080|tcp|reviews.default.svc.cluster.local"


# ---------------------------------------------------------------------------------------------
# DestinationRule


def test_dr_subset_traffic_policy_overrides_top_level_field_wise():
    rule = dr({"host": "reviews", "trafficPolicy": {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {"tcp": {"maxConnections": 10}},
        "outlierDetection": {"consecutive5xxErrors": 3}},
        "subsets": [{"name": "v1", "labels": {"version": "v1"},
                     "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}]})
    p = rule.policy_for("v1", 9080)
    assert p.lb_algorithm == "RANDOM"
    assert p.connection_pool.max_connections == 10 and p.outlier_detection.consecutive_5xx_errors == 3
    assert rule.policy_for(None, 9080).lb_algorithm == "ROUND_ROBIN"


def test_dr_port_level_settings_replace_the_top_level_policy_for_that_port():
    rule = dr({"host": "multi", "trafficPolicy": {
        "loadBalancer": {"simple": "ROUND_ROBIN"}, "connectionPool": {"tcp": {"maxConnections": 10}},
        "portLevelSettings": [{"port": {"number": 9090}, "loadBalancer": {"simple": "RANDOM"}}]}})
    p = rule.policy_for(None, 9090)
    # Istio: "port level policies do not inherit and instead to defaults if not provided"
    assert p.lb_algorithm == "RANDOM" and p.connection_pool is None
    assert rule.policy_for(None, 80).connection_pool.max_connections == 10


@pytest.mark.parametrize("simple,algo", [(None, "LEAST_REQUEST"), ("UNSPECIFIED", "LEAST_REQUEST"),
                                         ("LEAST_CONN", "LEAST_REQUEST"), ("ROUND_ROBIN", "ROUND_ROBIN"),
                                         ("RANDOM", "RANDOM"), ("LEAST_REQUEST", "LEAST_REQUEST")])
def test_dr_load_balancer_unspecified_is_least_request_and_least_conn_is_its_alias(simple, algo):
    spec = {"host": "reviews"}
    if simple:
        spec["trafficPolicy"] = {"loadBalancer": {"simple": simple}}
    assert dr(spec).policy_for(None, 9080).lb_algorithm == algo


def test_dr_consistent_hash_is_parsed_and_supported():
    rule = dr({"host": "reviews", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}})
    ch = rule.traffic_policy.consistent_hash
    assert (ch.key_kind, ch.key_wire, ch.algorithm) == ("httpHeaderName", b"x-user", "RING_HASH")
    t = table(drs=[rule])
    assert not any("consistent" in w for w in t.warnings)   # supported now (tests/test_consistent_hash*.py)


def test_dr_connection_pool_limits_and_defaults_are_exposed_to_the_proxy():
    rule = dr({"host": "reviews", "trafficPolicy": {"connectionPool": {
        "tcp": {"maxConnections": 100, "connectTimeout": "250ms"},
        "http": {"http1MaxPendingRequests": 5, "http2MaxRequests": 50, "maxRequestsPerConnection": 1,
                 "maxRetries": 3}}}})
    d = route_of(table(drs=[rule])).action.destinations[0]
    cp = d.traffic_policy.connection_pool
    assert (cp.max_connections, cp.connect_timeout_s, cp.http1_max_pending_requests, cp.http2_max_requests,
            cp.max_requests_per_connection, cp.max_retries) == (100, 0.25, 5, 50, 1, 3)


def test_dr_in_the_waypoint_namespace_beats_the_service_namespace():
    a = dr({"host": "reviews.default.svc.cluster.local", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}, "a")
    b = dr({"host": "reviews.default.svc.cluster.local", "subsets": [{"name": "v1", "labels": {"version": "v2"}}]},
           "b", ns="wp")
    t = table([vs({"hosts": ["reviews"], "http": [{"route": [{"destination": dest("reviews", "v1")}]}]})], [a, b],
              waypoint_namespace="wp")
    assert dict(route_of(t).action.destinations[0].subset_labels) == {"version": "v2"}


# ---------------------------------------------------------------------------------------------
# Gateway API HTTPRoute (mesh)

PARENT = [{"group": "", "kind": "Service", "name": "reviews"}]


def backend(name, weight=None, port=9080):
    b = {"name": name, "port": port}
    if weight is not None:
        b["weight"] = weight
    return b


def rule(match, name):
    r = {"backendRefs": [backend(name)]}
    if match is not None:
        r["matches"] = [match]
    return r


def gw_cluster(d) -> str:
    return clusters(d)[0].split("|")[-1].split(".")[0]


def test_httproute_exact_path_beats_prefix_whatever_the_order():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [
        rule({"path": {"type": "PathPrefix", "value": "/a"}}, "reviews-v1"),
        rule({"path": {"type": "Exact", "value": "/a"}}, "reviews-v2")]})])
    assert gw_cluster(route_of(t, req("/a"))) == "reviews-v2"
    assert gw_cluster(route_of(t, req("/a/b"))) == "reviews-v1"


def test_httproute_longest_prefix_wins():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [
        rule({"path": {"type": "PathPrefix", "value": "/"}}, "reviews-v1"),
        rule({"path": {"type": "PathPrefix", "value": "/api/v2"}}, "reviews-v2")]})])
    assert gw_cluster(route_of(t, req("/api/v2/x"))) == "reviews-v2"


def test_httproute_method_then_header_count_then_query_count_break_ties():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [
        rule({"headers": [{"name": "a", "value": "1"}]}, "reviews-v1"),
        rule({"method": "GET"}, "reviews-v2"),
        rule({"headers": [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]}, "ratings"),
        rule({"queryParams": [{"name": "q", "value": "1"}]}, "reviews"),
    ]})])
    assert gw_cluster(route_of(t, req("/", "GET", {"a": "1", "b": "2"}))) == "reviews-v2"   # method first
    assert gw_cluster(route_of(t, req("/", "POST", {"a": "1", "b": "2"}))) == "ratings"     # more headers
    assert gw_cluster(route_of(t, req("/?q=1", "POST", {"a": "1"}))) == "reviews-v1"        # headers > query
    assert gw_cluster(route_of(t, req("/?q=1", "POST"))) == "reviews"


def test_httproute_ties_go_to_the_oldest_route_then_namespace_name_alphabetical():
    same = {"parentRefs": PARENT, "rules": [rule(None, "reviews-v1")]}
    other = {"parentRefs": PARENT, "rules": [rule(None, "reviews-v2")]}
    t = table(hrs=[hr(other, "z-newer", order=2), hr(same, "y-older", order=1)])
    assert route_of(t).route_name == "y-older.default"
    # Age before name, where they disagree: the older route wins although its name sorts last.
    t1 = table(hrs=[hr(other, "a-newer", order=2), hr(same, "z-older", order=1)])
    assert route_of(t1).route_name == "z-older.default"
    t2 = table(hrs=[hr(other, "b", order=1), hr(same, "a", order=1)])
    assert route_of(t2).route_name == "a.default"


@pytest.mark.parametrize("prefix,path,hit", [
    ("/abc", "/abc", True), ("/abc", "/abc/", True), ("/abc", "/abc/def", True), ("/abc", "/abcd", False),
    ("/abc/", "/abc", True),                     # trailing "/" in the value is ignored
    ("/", "/anything", True),
])
def test_httproute_path_prefix_matches_whole_path_elements(prefix, path, hit):
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [rule({"path": {"type": "PathPrefix", "value": prefix}}, "reviews-v1")]})])
    assert isinstance(route_of(t, req(path)), RouteDecision) is hit


def test_httproute_exact_path_is_case_sensitive_and_regex_supported():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [
        rule({"path": {"type": "Exact", "value": "/Case"}}, "reviews-v1"),
        rule({"path": {"type": "RegularExpression", "value": "/r/[a-z]+"}}, "reviews-v2")]})])
    assert isinstance(route_of(t, req("/case")), NoRoute)
    assert gw_cluster(route_of(t, req("/r/abc"))) == "reviews-v2"


def test_httproute_header_names_case_insensitive_query_names_case_sensitive():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [
        rule({"headers": [{"name": "X-Version", "value": "2"}]}, "reviews-v2"),
        rule({"queryParams": [{"name": "animal", "value": "whale"}]}, "reviews-v1")]})])
    assert gw_cluster(route_of(t, req("/", headers={"x-version": "2"}))) == "reviews-v2"
    assert gw_cluster(route_of(t, req("/?animal=whale"))) == "reviews-v1"
    assert isinstance(route_of(t, req("/?ANIMAL=whale")), NoRoute)


def test_httproute_empty_matches_is_path_prefix_root_and_unmatched_is_404():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [{"backendRefs": [backend("reviews-v1")]}]})])
    assert gw_cluster(route_of(t, req("/any/thing"))) == "reviews-v1"
    t2 = table(hrs=[hr({"parentRefs": PARENT, "rules": [rule({"path": {"value": "/x"}}, "reviews-v1")]})])
    nr = route_of(t2, req("/y"))
    assert isinstance(nr, NoRoute) and (nr.status, nr.flag) == (404, "NR")


def test_httproute_version_split_uses_one_service_per_version_with_default_weight_1():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [{"backendRefs": [
        backend("reviews-v1", 90), backend("reviews-v2", 10)]}]})])
    d = route_of(t)
    assert clusters(d) == ["inbound-vip|9080|http|reviews-v1.default.svc.cluster.local",
                           "inbound-vip|9080|http|reviews-v2.default.svc.cluster.local"]
    t2 = table(hrs=[hr({"parentRefs": PARENT, "rules": [{"backendRefs": [backend("reviews-v1"), backend("reviews-v2")]}]})])
    assert [x.weight for x in route_of(t2).action.destinations] == [1, 1]
    rng = random.Random(0)
    n = sum(choose_destination(d.action, rng).host.startswith("reviews-v2") for _ in range(10_000))
    assert abs(n / 10_000 - 0.1) < 0.02


def test_httproute_all_weights_zero_or_no_backends_answer_500_and_invalid_backends_get_500_share():
    zero = table(hrs=[hr({"parentRefs": PARENT, "rules": [{"backendRefs": [backend("reviews-v1", 0)]}]})])
    assert route_of(zero).action == DirectResponse(500)
    none = table(hrs=[hr({"parentRefs": PARENT, "rules": [{"matches": [{"path": {"value": "/"}}]}]})])
    assert route_of(none).action == DirectResponse(500)
    partly = table(hrs=[hr({"parentRefs": PARENT, "rules": [{"backendRefs": [
        backend("reviews-v1"), backend("missing"), {"name": "x", "kind": "ConfigMap", "group": "", "port": 1}]}]})])
    ds = route_of(partly).action.destinations
    assert [d.fail_status for d in ds] == [None, 500, 500]


def test_httproute_parent_port_limits_the_route_to_that_service_port():
    t = table(hrs=[hr({"parentRefs": [{"group": "", "kind": "Service", "name": "multi", "port": 9090}],
                       "rules": [{"backendRefs": [{"name": "multi", "port": 9090}]}]}, "multi")])
    assert t.http_routes_for(MULTI, 9090).kind == "HTTPRoute"
    assert t.http_routes_for(MULTI, 80).kind == "default"


def test_httproute_on_the_waypoint_gateway_applies_to_every_service_behind_it():
    t = table(hrs=[hr({"parentRefs": [{"name": "waypoint"}], "rules": [{"backendRefs": [backend("reviews-v1")]}]})],
              gateway="default/waypoint")
    assert t.http_routes_for(REVIEWS, 9080).kind == "HTTPRoute"
    assert t.http_routes_for(REVIEWS_V1, 9080).kind == "HTTPRoute"
    assert table(hrs=[hr({"parentRefs": [{"name": "waypoint"}], "rules": [{}]})],
                 gateway="default/other").http_routes_for(REVIEWS, 9080).kind == "default"


def test_httproute_filters_modify_headers_and_rewrite_the_url():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [
        {"matches": [{"path": {"value": "/strip-prefix"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"hostname": "elsewhere",
                                                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}},
                     {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                         "add": [{"name": "my-header", "value": "bar,baz"}], "remove": ["x-drop"]}},
                     {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "X-R", "value": "1"}]}}],
         "backendRefs": [backend("reviews-v1")]},
        {"matches": [{"path": {"value": "/full"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/replaced"}}}],
         "backendRefs": [backend("reviews-v1")]},
        {"matches": [{"path": {"value": "/pre"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/xyz"}}}],
         "backendRefs": [backend("reviews-v1")]},
    ]})])
    d = route_of(t, req("/strip-prefix/three?x=1"))
    assert (d.path, d.authority) == ("/three?x=1", "elsewhere")
    assert route_of(t, req("/strip-prefix")).path == "/"
    assert d.action.headers.request.apply({"my-header": ("foo",), "x-drop": ("1",)}) == {"my-header": ("foo,bar,baz",)}
    assert d.action.headers.response.apply({}) == {"x-r": ("1",)}
    assert route_of(t, req("/full/a/b")).path == "/replaced"
    assert [route_of(t, req(p)).path for p in ("/pre", "/pre/", "/pre/bar")] == ["/xyz", "/xyz/", "/xyz/bar"]


def test_httproute_request_redirect_defaults_to_302_and_the_service_port():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [
        {"matches": [{"path": {"value": "/r"}}], "filters": [{"type": "RequestRedirect", "requestRedirect": {
            "hostname": "example.com", "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}}}]},
        {"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}}]},
    ]})])
    r = route_of(t, req("/r")).action
    assert isinstance(r, Redirect) and (r.status, r.location) == (302, "http://example.com:9080/new")
    r2 = route_of(t, req("/other")).action
    assert (r2.status, r2.location) == (301, "https://reviews/other")


def test_httproute_timeouts_and_retry():
    t = table(hrs=[hr({"parentRefs": PARENT, "rules": [
        {"timeouts": {"request": "10s", "backendRequest": "2s"}, "retry": {"codes": [500, 503], "attempts": 4},
         "backendRefs": [backend("reviews-v1")]}]})])
    fwd = route_of(t).action
    assert fwd.timeout_s == 10 and fwd.retry.per_try_timeout_s == 2 and fwd.retry.attempts == 4
    assert fwd.retry.retriable_status_codes == {500, 503} and fwd.retry.should_retry(1, 500)
    plain = table(hrs=[hr({"parentRefs": PARENT, "rules": [{"backendRefs": [backend("reviews-v1")]}]})])
    assert route_of(plain).action.retry == DEFAULT_RETRY_POLICY and route_of(plain).action.timeout_s is None


def test_httproute_wins_over_virtual_service_for_the_same_service_with_a_warning():
    t = table([vs({"hosts": ["reviews"], "http": [{"route": [{"destination": dest()}]}]})],
              hrs=[hr({"parentRefs": PARENT, "rules": [{"backendRefs": [backend("reviews-v1")]}]})])
    assert t.http_routes_for(REVIEWS, 9080).kind == "HTTPRoute"
    assert any("undefined behavior" in w for w in t.warnings)


def test_httproute_consumer_route_from_another_namespace_is_ignored_at_the_waypoint():
    t = table(hrs=[hr({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "namespace": "default"}],
                       "rules": [{"backendRefs": [backend("reviews-v1")]}]}, ns="client")])
    assert t.http_routes_for(REVIEWS, 9080).kind == "default"


def test_redirect_spec_is_resolved_per_request():
    t = table([vs({"hosts": ["reviews"], "http": [{"redirect": {"authority": "x", "derivePort": "FROM_REQUEST_PORT"}}]})])
    d = route_of(t, req("/p", authority="reviews:9080"))
    assert not isinstance(d.action, RedirectSpec) and d.action.location == "http://x:9080/p"


def test_route_table_repr_shows_its_state():
    t = table([vs({"hosts": ["reviews"], "http": [{"route": [{"destination": dest()}]}]})])
    assert "VirtualService" in repr(t) and repr(t).startswith("<RouteTable http=")
    assert t.http_routes_for(REVIEWS, 9080).service_key == H
