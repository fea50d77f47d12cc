"""Routing behaviours an Istio/Envoy comparison found different (session 8 audit), each pinned against the
Istio or Envoy source it follows. The repro scripts were /tmp/audit8/p*.py."""

from __future__ import annotations

import pytest

from policy.errors import ConfigError, Where
from policy.routing import route_http
from policy.routing.model import (
    CONNECT_FAILURE, PER_TRY_TIMEOUT, REFUSED_STREAM, RESET, RESET_BEFORE_REQUEST, HTTP_RETRY_ON, HeaderOps,
    RedirectSpec, RetryPolicy,
)
from policy.routing.parse import parse_virtual_service
from policy.routing.select import NoRoute, redirect_for
from policy.routing.table import _dr_for
from tests.test_routing_common import NS, REVIEWS, dr, hr, req, table, vs

# ---------------------------------------------------------------------------------------------
# RetryPolicy.retriable for failures without a response (Envoy retry_state_impl.cc wouldRetryFromReset)

# Which retry_on names retry each failure kind, and which do not: every HTTP retry_on name is in exactly
# one of the two sets, so dropping or adding one name to a kind's row fails here.
RETRIED_BY = {
    # LocalConnectionFailure/RemoteConnectionFailure/ConnectionTimeout: connect-failure, then (nothing was
    # sent) reset-before-request, then reset, then 5xx / gateway-error.
    CONNECT_FAILURE: {"connect-failure", "reset-before-request", "reset", "5xx", "gateway-error"},
    # RemoteRefusedStreamReset after the headers went out: refused-stream, reset, 5xx, gateway-error.
    REFUSED_STREAM: {"refused-stream", "reset", "5xx", "gateway-error"},
    # A reset before any byte went upstream.
    RESET_BEFORE_REQUEST: {"reset-before-request", "reset", "5xx", "gateway-error"},
    # A reset after the request started.
    RESET: {"reset", "5xx", "gateway-error"},
    # router.cc onPerTryTimeoutCommon → maybeRetryReset(LocalReset): a reset after the request started.
    PER_TRY_TIMEOUT: {"reset", "5xx", "gateway-error"},
}


@pytest.mark.parametrize("error", sorted(RETRIED_BY))
@pytest.mark.parametrize("name", sorted(HTTP_RETRY_ON))
def test_each_retry_on_name_retries_exactly_the_failures_envoy_retries(error, name):
    assert RetryPolicy(2, frozenset({name})).retriable(error) is (name in RETRIED_BY[error])


def test_gateway_error_retries_every_reset_kind():
    # The audit's repro: all False before.
    p = RetryPolicy(2, frozenset({"gateway-error"}))
    assert [p.retriable(e) for e in (RESET, REFUSED_STREAM, RESET_BEFORE_REQUEST, CONNECT_FAILURE)] == [True] * 4


def test_grpc_names_and_unknown_errors_retry_no_failure():
    p = RetryPolicy(2, frozenset({"unavailable", "cancelled", "retriable-status-codes"}), frozenset({503}))
    assert not any(p.retriable(e) for e in (*RETRIED_BY, "no-such-failure"))


# ---------------------------------------------------------------------------------------------
# VirtualService retries: what istiod's webhook (validation.go validateHTTPRetry) refuses


def _vs_with_retries(retries: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": NS},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}],
                                                     "retries": retries}]}}


def _load_error(doc: dict) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        parse_virtual_service(doc, Where("t.yaml"))
    return e.value


@pytest.mark.parametrize("retries,field,problem", [
    # ValidateDuration: "if dur < time.Millisecond { return errors.New("duration must be greater than 1ms") }" —
    # a 0s per-try timeout made every attempt time out at once (504 UT).
    ({"attempts": 3, "perTryTimeout": "0s"}, "perTryTimeout", "duration must be greater than 1ms"),
    ({"attempts": 3, "perTryTimeout": "0.5ms"}, "perTryTimeout", "duration must be greater than 1ms"),
    # "if dur%time.Millisecond != 0 { return errors.New("only durations to ms precision are supported") }"
    ({"attempts": 3, "perTryTimeout": "1.5ms"}, "perTryTimeout", "only durations to ms precision are supported"),
    # "retries.Attempts == 0 && (retries.PerTryTimeout != nil || retries.RetryOn != "" ||
    # retries.RetryRemoteLocalities != nil)": an unset attempts is 0 there too.
    ({"attempts": 0, "retryOn": "5xx"}, "attempts",
     "http retry policy configured when attempts are set to 0 (disabled)"),
    ({"attempts": 0, "perTryTimeout": "1s"}, "attempts", "http retry policy configured when attempts are set to 0"),
    ({"retryOn": "5xx"}, "attempts", "http retry policy configured when attempts are set to 0 (disabled)"),
    ({"retryRemoteLocalities": False}, "attempts", "http retry policy configured when attempts are set to 0"),
])
def test_retries_the_webhook_refuses_fail_the_load_naming_the_field(retries, field, problem):
    e = _load_error(_vs_with_retries(retries))
    assert e.path == f"spec.http[0].retries.{field}" and problem in e.problem, str(e)


@pytest.mark.parametrize("retries,attempts,per_try", [
    ({"attempts": 0}, 0, None),                          # retries disabled, nothing else set: valid
    ({"attempts": 2, "perTryTimeout": "1ms"}, 2, 0.001),  # the smallest valid per-try timeout
    ({"attempts": 1, "perTryTimeout": "2.5s"}, 1, 2.5),
])
def test_valid_retries_still_load(retries, attempts, per_try):
    p = parse_virtual_service(_vs_with_retries(retries), Where("t.yaml")).http[0].retries
    assert (p.attempts, p.per_try_timeout_s) == (attempts, per_try)


# ---------------------------------------------------------------------------------------------
# HTTPRoute timeouts.backendRequest (istiod conversion.go convertHTTPRoute)

def _gw_forward(timeouts: dict, retry: dict | None = None):
    rule = {"backendRefs": [{"name": "reviews", "port": 9080}], "timeouts": timeouts}
    if retry is not None:
        rule["retry"] = retry
    spec = {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}], "rules": [rule]}
    return route_http(req(), table(hrs=[hr(spec)]).http_routes_for(REVIEWS, 9080)).action


@pytest.mark.parametrize("timeouts,retry,route_timeout,per_try,attempts", [
    # "if vs.Retries != nil { vs.Retries.PerTryTimeout = timeout } else { vs.Timeout = timeout }": without a
    # retry block backendRequest is the route timeout, and it replaces timeouts.request.
    ({"backendRequest": "1s"}, None, 1.0, None, 2),
    ({"request": "10s", "backendRequest": "1s"}, None, 1.0, None, 2),
    ({"request": "10s"}, None, 10.0, None, 2),
    # With a retry block it is the per-try timeout and the request timeout stays.
    ({"request": "10s", "backendRequest": "1s"}, {"attempts": 3}, 10.0, 1.0, 3),
    ({"backendRequest": "1s"}, {"attempts": 3}, None, 1.0, 3),
])
def test_backend_request_timeout_is_the_route_timeout_without_a_retry_block(timeouts, retry, route_timeout, per_try,
                                                                           attempts):
    fwd = _gw_forward(timeouts, retry)
    assert (fwd.timeout_s, fwd.retry.per_try_timeout_s, fwd.retry.attempts) == (route_timeout, per_try, attempts)


# ---------------------------------------------------------------------------------------------
# VirtualService header matches (istiod route.go translateHeaderMatch / TranslateRouteMatch)

def _matches(match: dict, request) -> bool:
    spec = {"hosts": ["reviews"], "http": [{"match": [match], "route": [{"destination": {"host": "reviews"}}]}]}
    d = route_http(request, table(vss=[vs(spec)]).http_routes_for(REVIEWS, 9080))
    return not isinstance(d, NoRoute)


ABSENT, EMPTY, VALUE_A, VALUE_B = None, "", "a", "b"


def _req_with(x):
    return req() if x is None else req(headers={"x": x})


@pytest.mark.parametrize("match,expected", [
    # canBeConvertedToPresentMatch: "if in == nil || in.MatchType == nil { return true }" — {} is presence...
    ({"headers": {"x": {}}}, {ABSENT: False, EMPTY: True, VALUE_A: True}),
    # ...and `exact: ""` is not: ConvertToEnvoyMatch gives StringMatcher_Exact{Exact: ""}, which only an empty
    # value matches (the audit's p2.py: "a" matched before).
    ({"headers": {"x": {"exact": ""}}}, {ABSENT: False, EMPTY: True, VALUE_A: False}),
    ({"headers": {"x": {"exact": "a"}}}, {ABSENT: False, EMPTY: False, VALUE_A: True}),
    # withoutHeaders: "matcher.InvertMatch = true; // treat_missing_header_as_empty conflict with present_match
    # if !canBeConvertedToPresentMatch(stringMatch) { matcher.TreatMissingHeaderAsEmpty = true }" — a missing
    # header is "" to every match but the presence ones.
    ({"withoutHeaders": {"x": {}}}, {ABSENT: True, EMPTY: False, VALUE_A: False}),
    ({"withoutHeaders": {"x": {"regex": "*"}}}, {ABSENT: True, EMPTY: False, VALUE_A: False}),
    ({"withoutHeaders": {"x": {"exact": ""}}}, {ABSENT: False, EMPTY: False, VALUE_A: True}),
    ({"withoutHeaders": {"x": {"exact": "a"}}}, {ABSENT: True, EMPTY: True, VALUE_A: False, VALUE_B: True}),
    ({"withoutHeaders": {"x": {"prefix": "a"}}}, {ABSENT: True, EMPTY: True, VALUE_A: False, VALUE_B: True}),
    ({"withoutHeaders": {"x": {"regex": "a*"}}}, {ABSENT: False, EMPTY: False, VALUE_A: False, VALUE_B: True}),
])
def test_header_matches_follow_istio_translate_header_match(match, expected):
    got = {x: _matches(match, _req_with(x)) for x in expected}
    assert got == expected


# ---------------------------------------------------------------------------------------------
# Which DestinationRule applies (istiod PushContext.destinationRule)


WILD = "*.default.svc.cluster.local"


def _dr(host: str, name: str, ns: str, lb: str = "RANDOM", order: int = 0, subsets=()):
    spec = {"host": host, "trafficPolicy": {"loadBalancer": {"simple": lb}}}
    if subsets:
        spec["subsets"] = [{"name": s, "labels": {"version": s}} for s in subsets]
    return dr(spec, name=name, ns=ns, order=order)


def _chosen(drs, waypoint_namespace="wp", **kw):
    got = _dr_for(table(drs=drs, waypoint_namespace=waypoint_namespace, **kw)._ctx, REVIEWS)
    return None if got is None else f"{got.namespace}/{got.name}"


def test_a_destination_rule_in_an_unrelated_namespace_is_never_used():
    # p3.py: "1. select destination rule from proxy config namespace", "2. ... from service namespace",
    # "4. ... in the config root namespace" — no other namespace is looked at.
    assert _chosen([_dr("reviews.default.svc.cluster.local", "x", "team-x")]) is None
    assert _chosen([_dr("*", "x", "team-x")]) is None


def test_the_proxy_namespace_wins_over_the_service_namespace_even_with_a_wildcard():
    # The namespaces are searched in turn, the most specific host only *within* one: a wildcard in the
    # waypoint's namespace beats an exact host in the service's (p3.py: the exact one won before).
    drs = [_dr(WILD, "wild", "wp", order=1), _dr("reviews", "exact", "default", "ROUND_ROBIN", order=0)]
    assert _chosen(drs) == "wp/wild"
    assert _chosen(list(reversed(drs))) == "wp/wild"


def test_the_service_namespace_wins_over_the_root_namespace_even_with_a_wildcard():
    drs = [_dr("reviews.default.svc.cluster.local", "root", "istio-system"), _dr("*", "any", "default")]
    assert _chosen(drs) == "default/any"
    assert _chosen(drs[:1]) == "istio-system/root"    # "4. ... search for any exported destination rule in
    #                                                     the config root namespace"


def test_within_a_namespace_the_exact_host_then_the_most_specific_wildcard_wins():
    # MostSpecificHostMatch: "exact match first", then mostSpecificHostWildcardMatch (host.MoreSpecific).
    drs = [_dr("*", "star", "default", order=0), _dr("*.svc.cluster.local", "svc", "default", order=1),
           _dr(WILD, "ns", "default", order=2)]
    assert _chosen(drs) == "default/ns"
    assert _chosen(drs[:2]) == "default/svc"
    assert _chosen([*drs, _dr("reviews", "exact", "default", order=3)]) == "default/exact"


def test_drs_for_the_same_host_in_the_chosen_namespace_merge_and_others_do_not():
    # istiod merges the DestinationRules of one namespace for one host (subsets appended, the first top-level
    # traffic policy kept); a DR in another namespace is never merged in.
    a = _dr("reviews", "a", "default", "ROUND_ROBIN", order=0, subsets=("v1",))
    b = _dr("reviews.default.svc.cluster.local", "b", "default", "RANDOM", order=1, subsets=("v2", "v1"))
    root = _dr("reviews.default.svc.cluster.local", "r", "istio-system", order=2, subsets=("v3",))
    got = _dr_for(table(drs=[b, root, a], waypoint_namespace="wp")._ctx, REVIEWS)
    assert [s.name for s in got.subsets] == ["v1", "v2"]
    assert dict(got.subsets[0].labels) == {"version": "v1"}      # a's v1: the first one kept
    assert got.traffic_policy.load_balancer == "ROUND_ROBIN"     # a is older (load order)


def test_a_subset_from_a_lower_priority_namespace_is_not_found():
    # The route names subset v3, defined only by the root namespace's DR, which the service namespace's DR
    # hides: the cluster does not exist (503 NC).
    drs = [_dr("reviews", "svc", "default", subsets=("v1",)), _dr("reviews.default.svc.cluster.local", "r",
                                                                  "istio-system", subsets=("v3",))]
    spec = {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v3"}}]}]}
    d = route_http(req(), table(vss=[vs(spec)], drs=drs, waypoint_namespace="wp").http_routes_for(REVIEWS, 9080))
    assert (d.action.destinations[0].fail_status, d.action.destinations[0].fail_flag) == (503, "NC")


def test_a_waypoint_in_the_root_namespace_prefers_the_service_namespace_unless_the_root_dr_is_local():
    # "If the proxy config namespace is same as the root config namespace look for dest rules in the service's
    # namespace first" — except a root DR exported only to "." ("this must be meant for this proxy").
    root = _dr("reviews.default.svc.cluster.local", "root", "istio-system")
    svc = _dr("reviews", "svc", "default")
    assert _chosen([root, svc], waypoint_namespace="istio-system") == "default/svc"
    local = dr({"host": "reviews.default.svc.cluster.local", "exportTo": ["."]}, name="local", ns="istio-system")
    assert _chosen([local, svc], waypoint_namespace="istio-system") == "istio-system/local"


# ---------------------------------------------------------------------------------------------
# Several VirtualServices for one host: the waypoint uses the first with http routes

def _http_vs(name: str, ns: str, prefix: str, order: int, export_to=None, tcp_only: bool = False):
    spec = {"hosts": ["reviews.default.svc.cluster.local"]}
    if export_to is not None:
        spec["exportTo"] = export_to
    if tcp_only:
        spec["tcp"] = [{"route": [{"destination": {"host": "reviews.default.svc.cluster.local"}}]}]
    else:
        spec["http"] = [{"match": [{"uri": {"prefix": prefix}}],
                         "route": [{"destination": {"host": "reviews.default.svc.cluster.local"}}]}]
    return vs(spec, name=name, ns=ns, order=order)


def _used(vss, waypoint_namespace="wp"):
    t = table(vss=vss, waypoint_namespace=waypoint_namespace)
    return t.http_routes_for(REVIEWS, 9080).sources, t.warnings


def test_two_vs_in_one_namespace_the_first_is_used_and_the_other_ignored_with_a_warning():
    # p7.py: the second VirtualService's catch-all answered /b before.
    first = _http_vs("first", NS, "/a", order=0)
    second = vs({"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]},
                name="second", order=1)
    t = table(vss=[second, first])
    routes = t.http_routes_for(REVIEWS, 9080)
    assert routes.sources == ("VirtualService default/first",)
    assert isinstance(route_http(req("/b"), routes), NoRoute)
    assert [w for w in t.warnings if "is ignored for http" in w] == [
        "service default/reviews.default.svc.cluster.local: VirtualService default/second is ignored for http: "
        "the waypoint uses only the first VirtualService with http routes for a host, default/first "
        "(istiod listener_waypoint.go)"]


def test_equal_ages_order_by_name_then_namespace_as_sort_config_by_creation_time():
    # "if r := cmp.Compare(configs[i].Name, configs[j].Name); r != 0 { return r == -1 }; return
    # cmp.Compare(configs[i].Namespace, configs[j].Namespace) == -1" — name before namespace.
    alpha_in_wp = _http_vs("alpha", "wp", "/a", order=0)
    beta_in_default = _http_vs("beta", NS, "/b", order=0)
    assert _used([beta_in_default, alpha_in_wp])[0] == ("VirtualService wp/alpha",)
    same_name = [_http_vs("r", "wp", "/a", order=0), _http_vs("r", NS, "/b", order=0)]
    assert _used(same_name)[0] == ("VirtualService default/r",)
    # An older VirtualService wins whatever its name.
    assert _used([_http_vs("zz", NS, "/a", order=0), _http_vs("aa", NS, "/b", order=1)])[0] == (
        "VirtualService default/zz",)


def test_a_vs_exported_only_to_the_waypoints_namespace_comes_first():
    # SelectVirtualServices: "loopAndAdd(vsidx.privateByNamespaceAndGateway[n]); loopAndAdd(
    # vsidx.exportedToNamespaceByGateway[n]); loopAndAdd(vsidx.publicByGateway[constants.IstioMeshGateway])".
    public_old = _http_vs("old", NS, "/a", order=0)
    private_new = _http_vs("new", "wp", "/b", order=5, export_to=["."])
    assert _used([public_old, private_new])[0] == ("VirtualService wp/new",)
    # A VirtualService the service's namespace keeps to itself is not seen by a waypoint elsewhere.
    hidden = _http_vs("hidden", NS, "/c", order=0, export_to=["."])
    assert _used([hidden, _http_vs("seen", NS, "/d", order=1)])[0] == ("VirtualService default/seen",)


def test_a_vs_without_http_routes_is_passed_over():
    # "Find the first HTTP virtual service ... Http != nil".
    sources, warnings = _used([_http_vs("tcp", NS, "", order=0, tcp_only=True), _http_vs("h", NS, "/a", order=1)])
    assert sources == ("VirtualService default/h",)
    assert not any("is ignored for http" in w for w in warnings)


# ---------------------------------------------------------------------------------------------
# headers.request set/add of host / :authority (istiod route.go TranslateHeadersOperations)

def _vs_doc(rule: dict) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": NS}, "spec": {"hosts": ["reviews"], "http": [rule]}}


RV_ROUTE = [{"destination": {"host": "reviews"}}]


def _decision(rule: dict):
    v = parse_virtual_service(_vs_doc(rule), Where("t.yaml"))
    return route_http(req(), table(vss=[v]).http_routes_for(REVIEWS, 9080)), v


@pytest.mark.parametrize("headers", [
    {"request": {"set": {"host": "new.example"}}},
    {"request": {"set": {"Host": "new.example"}}},
    {"request": {"add": {":authority": "new.example"}}},
    {"request": {"set": {"x-a": "1", ":Authority": "new.example"}}},
])
def test_a_host_set_or_added_in_request_headers_is_the_routes_host_rewrite(headers):
    # translateAppendHeaders: "if isAuthorityHeader(key) { authority = value }  if isInternalHeader(key) { continue }"
    # and applyHTTPRouteDestination: "if authority != "" { action.HostRewriteSpecifier = ... HostRewriteLiteral }".
    d, v = _decision({"route": RV_ROUTE, "headers": headers})
    assert d.authority == "new.example"                  # the audit: the pod saw reviews:9080
    assert all(n not in ("host", ":authority") for n, _ in (*v.http[0].headers.request.set,
                                                            *v.http[0].headers.request.add))


def test_a_single_destinations_host_applies_unless_the_rule_sets_one():
    # processDestination: "if operations.Authority != "" && action.HostRewriteSpecifier == nil".
    dest_host = [{"destination": {"host": "reviews"}, "headers": {"request": {"set": {"host": "dest.example"}}}}]
    assert _decision({"route": dest_host})[0].authority == "dest.example"
    assert _decision({"route": dest_host, "headers": {"request": {"set": {"host": "rule.example"}}}})[0].authority \
        == "rule.example"
    assert _decision({"route": dest_host, "rewrite": {"authority": "rw.example"}})[0].authority == "rw.example"


def test_a_host_on_one_of_several_weighted_destinations_stays_with_that_destination():
    # (Not the route's host rewrite: the waypoint applies it when that destination is drawn, as Envoy's weighted
    # cluster host_rewrite_literal — end to end in tests/test_waypoint_weighted_headers.py.)
    route = [{"destination": {"host": "reviews"}, "weight": 50, "headers": {"request": {"set": {"host": "a.example"}}}},
             {"destination": {"host": "reviews"}, "weight": 50}]
    d, v = _decision({"route": route})
    assert d.authority == "reviews:9080"
    assert not any("headers.request" in w for w in v.warnings)


@pytest.mark.parametrize("rule,field,problem", [
    # validateAuthorityRewrite: "authority header cannot be set multiple times: have %q, attempting to set %q".
    ({"route": RV_ROUTE, "rewrite": {"authority": "a"}, "headers": {"request": {"set": {"host": "b"}}}},
     "spec.http[0].headers.request", 'authority header cannot be set multiple times: have "a", attempting to set "b"'),
    ({"route": RV_ROUTE, "headers": {"request": {"set": {"host": "a"}, "add": {":authority": "b"}}}},
     "spec.http[0].headers.request.add.:authority", "authority header cannot be set multiple times"),
    # ValidateHTTPHeaderOperationName: "invalid header %q: cannot set Host header".
    ({"route": RV_ROUTE, "headers": {"request": {"remove": ["x-a", "Host"]}}},
     "spec.http[0].headers.request.remove[1]", 'invalid header "Host": cannot set Host header'),
    ({"route": RV_ROUTE, "headers": {"response": {"set": {"host": "a"}}}},
     "spec.http[0].headers.response.set.host", 'invalid header "host": cannot set Host header'),
    # ... and `invalid header %q: header cannot have ":" prefix`.
    ({"route": RV_ROUTE, "headers": {"request": {"remove": [":authority"]}}},
     "spec.http[0].headers.request.remove[0]", 'invalid header ":authority": header cannot have ":" prefix'),
    ({"route": RV_ROUTE, "headers": {"request": {"set": {":path": "/x"}}}},
     "spec.http[0].headers.request.set.:path", 'invalid header ":path": header cannot have ":" prefix'),
    ({"route": [{"destination": {"host": "reviews"}, "headers": {"request": {"remove": ["host"]}}}]},
     "spec.http[0].route[0].headers.request.remove[0]", "cannot set Host header"),
])
def test_header_operations_the_webhook_refuses_fail_the_load(rule, field, problem):
    e = _load_error(_vs_doc(rule))
    assert e.path == field and problem in e.problem, str(e)


# ---------------------------------------------------------------------------------------------
# Pins for behaviour the audit's mutations showed unpinned


@pytest.mark.parametrize("spec,scheme,port,location", [
    # istiod route.go ApplyRedirect: "// Do not put explicit :80 or :443 when its http/https  if
    # action.Redirect.PortRedirect == 80 && scheme == "http" { action.Redirect.PortRedirect = 0 }  if
    # action.Redirect.PortRedirect == 443 && scheme == "https" { action.Redirect.PortRedirect = 0 }".
    (RedirectSpec(301, authority="x.example", port=80), "http", 9080, "http://x.example/p"),
    (RedirectSpec(301, scheme="https", authority="x.example", port=443), "http", 9080, "https://x.example/p"),
    (RedirectSpec(301, authority="x.example", derive_port="FROM_REQUEST_PORT"), "http", 80, "http://x.example/p"),
    # Only the scheme's own well-known port is left out.
    (RedirectSpec(301, scheme="https", authority="x.example", port=80), "http", 9080, "https://x.example:80/p"),
    (RedirectSpec(301, authority="x.example", port=443), "http", 9080, "http://x.example:443/p"),
    (RedirectSpec(301, authority="x.example", port=8080), "http", 9080, "http://x.example:8080/p"),
    # Gateway API RequestRedirect: "If redirect scheme is not-empty, the redirect port MUST be the well-known port
    # associated with the redirect scheme" — and that port is not written.
    (RedirectSpec(302, scheme="https", authority="x.example", element_wise=True), "http", 9080, "https://x.example/p"),
    (RedirectSpec(302, scheme="https", authority="x.example", port=443, element_wise=True), "http", 9080,
     "https://x.example/p"),
])
def test_redirect_location_leaves_out_the_schemes_well_known_port(spec, scheme, port, location):
    r = req("/p", port=port, scheme=scheme, authority=f"reviews:{port}")
    assert redirect_for(spec, r, "/").location == location


def test_header_ops_remove_before_set_and_add():
    # Envoy header_parser.cc evaluateHeaders: "Removing headers in the headers_to_remove list first makes
    # remove-before-add the default behavior as expected by users." — a header both removed and set (or added)
    # ends up with the configured value only.
    ops = HeaderOps(set=(("x-set", "new"),), add=(("x-add", "more"),), remove=("x-set", "x-add", "x-gone"))
    got = ops.apply({"x-set": ("old",), "x-add": ("old",), "x-gone": ("v",), "x-kept": ("k",)})
    assert got == {"x-set": ("new",), "x-add": ("more",), "x-kept": ("k",)}
    # Without a remove, add appends to what is there ("will create a comma-separated list of values").
    assert HeaderOps(add=(("x-add", "more"),)).apply({"x-add": ("old",)}) == {"x-add": ("old,more",)}


@pytest.mark.parametrize("gateways,field", [(None, "headers"), (["mesh"], "withoutHeaders")])
def test_jwt_claim_routing_on_a_mesh_virtual_service_is_refused(gateways, field):
    # p8.py: the match loaded and a client-sent header named "@request.auth.claims.group" satisfied it.
    doc = _vs_doc({"match": [{field: {"@request.auth.claims.group": {"exact": "admin"}}}], "route": RV_ROUTE})
    if gateways is not None:
        doc["spec"]["gateways"] = gateways
    e = _load_error(doc)
    assert e.path == f"spec.http[0].match[0].{field}.@request.auth.claims.group"
    assert e.problem == (f"JWT claim based routing (key: @request.auth.claims.group) is only supported for gateway, "
                         f"found no gateways: [{' '.join(gateways or [])}]")
