"""Parsers for VirtualService, DestinationRule, HTTPRoute and Gateway: whole documents, exact error
paths, every leaf of a valid document replaced by bad values, and a hypothesis test that only
ConfigError escapes."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from policy.errors import ConfigError, Where
from policy.routing import parse_destination_rule, parse_gateway, parse_http_route, parse_virtual_service
from policy.routing.parse import PARSERS
from tests.mutation_helpers import leaves, mutate, set_at

W = Where("mesh.yaml", 3)

BOOKINFO = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /reviews}
      ignoreUriCase: true
      queryParams: {debug: {exact: ""}}
      withoutHeaders: {x-skip: {regex: "*"}}
      method: {exact: GET}
      port: 9080
    route:
    - destination: {host: reviews, subset: v2, port: {number: 9080}}
      headers: {request: {set: {x-v: "2"}}}
    timeout: 3s
    retries: {attempts: 3, perTryTimeout: 1s, retryOn: "5xx,connect-failure,409", retryIgnorePreviousHosts: true}
    fault:
      delay: {fixedDelay: 100ms, percentage: {value: 10}}
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.5}}
    rewrite: {uri: /v2, authority: reviews-v2}
    mirror: {host: ratings}
    mirrorPercentage: {value: 12.5}
    corsPolicy: {allowOrigins: [{exact: "*"}]}
    headers:
      request: {add: {x-a: b}, remove: [x-r]}
      response: {set: {x-s: t}}
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
  tcp:
  - match: [{port: 9090, destinationSubnets: [10.0.0.0/8]}]
    route: [{destination: {host: reviews}, weight: 100}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 30ms, tcpKeepalive: {time: 7200s}}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 10, maxRetries: 3}
    outlierDetection: {consecutive5xxErrors: 7, interval: 5m, baseEjectionTime: 15m, maxEjectionPercent: 50}
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: ROUND_ROBIN}
  subsets:
  - {name: v1, labels: {version: v1}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: RANDOM}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: X-Version, value: "2"}, {type: RegularExpression, name: x-b, value: "a.*"}]
      queryParams: [{name: q, value: "1"}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: a, value: b}], add: [{name: c, value: d}], remove: [e]}
    - type: URLRewrite
      urlRewrite: {hostname: h, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: ratings, port: 9080}, percent: 5}
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 90}
    - name: reviews-v2
      port: 9080
      weight: 10
      filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x, value: y}]}}]
    timeouts: {request: 10s, backendRequest: 500ms}
    retry: {codes: [503], attempts: 2, backoff: 100ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: default
  labels: {istio.io/waypoint-for: service}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
"""

DOCS = list(yaml.safe_load_all(BOOKINFO))


def parse(d, kind=None):
    return PARSERS[kind or d["kind"]](d, W)


def test_bookinfo_documents_parse_whole():
    v, d, h, g = (parse(x) for x in DOCS)
    assert (v.namespace, v.name, v.hosts) == ("default", "reviews", ("reviews",))
    r0 = v.http[0]
    assert r0.timeout_s == 3 and r0.retries.attempts == 3 and r0.retries.retriable_status_codes == {409}
    assert r0.fault.delay_s == 0.1 and r0.fault.abort_grpc_status == 14 and r0.fault.abort_percent == 0.5
    assert r0.mirrors[0].percent == 12.5 and r0.matches[0].port == 9080
    # corsPolicy is enforced now (tests/test_cors.py): parsed onto the rule's header rules, no warning.
    assert r0.headers.cors is not None and not any("corsPolicy" in w for w in v.warnings)
    assert [x.weight for x in v.http[1].route] == [90, 10]
    assert d.namespace == "default" and [s.name for s in d.subsets] == ["v1", "v2"]
    assert d.traffic_policy.outlier_detection.base_ejection_time_s == 900
    assert d.traffic_policy.connection_pool.connect_timeout_s == pytest.approx(0.03)
    assert d.policy_for("v2", 9080).lb_algorithm == "RANDOM" and d.policy_for("v1", 9080).lb_algorithm == "ROUND_ROBIN"
    assert h.parent_refs[0].is_service and h.parent_refs[0].port == 9080
    rule = h.rules[0]
    assert rule.matches[0].headers[0].name == "x-version" and rule.backend_refs[1].weight == 10
    assert rule.request_timeout_s == 10 and rule.retries.per_try_timeout_s == 0.5 and rule.retries.backoff_base_s == 0.1
    assert g.is_waypoint and g.waypoint_for == "service" and g.listeners[0].protocol == "HBONE"


@pytest.mark.parametrize("kind_index,mutate,path,problem", [
    (0, lambda s: s["http"][1]["route"][1].__setitem__("weight", -1), "spec.http[1].route[1].weight", "expected an integer 0.."),
    (0, lambda s: s["http"][1]["route"][1].__setitem__("weight", "10"), "spec.http[1].route[1].weight", "expected an integer 0.."),
    (0, lambda s: s["http"][0].__setitem__("timeout", "3 seconds"), "spec.http[0].timeout", "expected a duration"),
    (0, lambda s: s["http"][0]["match"][0]["uri"].__setitem__("regex", "("), "spec.http[0].match[0].uri", "only one of"),
    (0, lambda s: s["http"][0]["match"][0].__setitem__("uri", {"regex": "(["}), "spec.http[0].match[0].uri.regex", "invalid regular expression"),
    (0, lambda s: s["http"][0]["retries"].__setitem__("retryOn", "5xx,bogus"), "spec.http[0].retries.retryOn", "not a known retry policy"),
    (0, lambda s: s["http"][0].__setitem__("colour", "red"), "spec.http[0].colour", "unknown field"),
    (0, lambda s: s["http"][1]["route"][0].__setitem__("weight", 0) or s["http"][1]["route"][1].__setitem__("weight", 0),
     "spec.http[1].route", "total destination weight = 0"),
    (0, lambda s: s["http"][1].__setitem__("redirect", {"uri": "/x"}), "spec.http[1]", "cannot be used together"),
    (0, lambda s: s.__setitem__("hosts", []), "spec.hosts", "at least one host"),
    (0, lambda s: s["http"][0]["fault"]["abort"].__setitem__("grpcStatus", "NOPE"), "spec.http[0].fault.abort.grpcStatus", "gRPC status"),
    (1, lambda s: s["trafficPolicy"]["loadBalancer"].__setitem__("simple", "FASTEST"), "spec.trafficPolicy.loadBalancer.simple", "expected one of"),
    (1, lambda s: s["subsets"][1].__setitem__("name", "v1"), "spec.subsets[1].name", "duplicate subset"),
    (1, lambda s: s["subsets"][0]["labels"].__setitem__("version", 1), "spec.subsets[0].labels.version", "quote numbers"),
    (1, lambda s: s["trafficPolicy"]["outlierDetection"].__setitem__("maxEjectionPercent", 101),
     "spec.trafficPolicy.outlierDetection.maxEjectionPercent", "expected an integer 0..100"),
    (2, lambda s: s["rules"][0]["backendRefs"][0].__setitem__("weight", 1_000_001), "spec.rules[0].backendRefs[0].weight", "0..1000000"),
    (2, lambda s: s["rules"][0]["matches"][0]["path"].__setitem__("type", "Glob"), "spec.rules[0].matches[0].path.type", "expected Exact"),
    (2, lambda s: s["rules"][0]["matches"][0]["path"].__setitem__("type", "Exact"), "spec.rules[0].filters", "ReplacePrefixMatch"),
    (2, lambda s: s["rules"][0]["filters"][0].__setitem__("type", "Magic"), "spec.rules[0].filters[0].type", "expected one of"),
    (2, lambda s: s.__setitem__("parentRefs", []), "spec.parentRefs", "at least one parentRef"),
    (2, lambda s: s["rules"][0]["timeouts"].__setitem__("backendRequest", "1m"), "spec.rules[0].timeouts.backendRequest", "must not be longer"),
    (3, lambda s: s["listeners"][0].__setitem__("protocol", "HTTP"), "spec.listeners", "HBONE listener"),
])
def test_bad_fields_are_reported_with_their_exact_path(kind_index, mutate, path, problem):
    d = copy.deepcopy(DOCS[kind_index])
    mutate(d["spec"])
    with pytest.raises(ConfigError) as e:
        parse(d)
    assert e.value.path == path and problem in e.value.problem, str(e.value)
    assert str(e.value).startswith(f"mesh.yaml: document 3 ({d['kind']} default/")


def test_envelope_errors_name_the_document():
    with pytest.raises(ConfigError, match=r"mesh.yaml: document 3: kind: expected VirtualService"):
        parse_virtual_service({"kind": "Other"}, W)
    with pytest.raises(ConfigError, match=r"apiVersion: expected one of"):
        parse_virtual_service({"kind": "VirtualService", "apiVersion": "networking.istio.io/v2"}, W)
    with pytest.raises(ConfigError, match=r"metadata.name: expected a non-empty string"):
        parse_destination_rule({"kind": "DestinationRule", "apiVersion": "networking.istio.io/v1", "spec": {}}, W)
    with pytest.raises(ConfigError, match=r"\(HTTPRoute default/x\): spec: required"):
        parse_http_route({"kind": "HTTPRoute", "apiVersion": "gateway.networking.k8s.io/v1", "metadata": {"name": "x"}}, W)
    with pytest.raises(ConfigError, match=r"expected a mapping"):
        parse_gateway(["not", "a", "mapping"], W)  # type: ignore[arg-type]


def test_delegate_is_rejected_clearly():
    d = copy.deepcopy(DOCS[0])
    d["spec"]["http"][1] = {"delegate": {"name": "child"}}
    with pytest.raises(ConfigError, match="delegate is not supported"):
        parse(d)


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("0.5s", 0.5), ("250ms", 0.25), ("1h30m", 5400), ("0s", 0)])
def test_durations_in_protobuf_and_gateway_api_forms(text, seconds):
    d = copy.deepcopy(DOCS[0])
    d["spec"]["http"][0]["timeout"] = text
    assert parse(d).http[0].timeout_s == pytest.approx(seconds)


# ---------------------------------------------------------------------------------------------
# Robustness: only ConfigError escapes


BAD_VALUES = [None, "", "x", -1, 0, 70000, 1.5, True, [], {}, ["x"], {"x": 1}, {"exact": 1}, "(["]


@pytest.mark.parametrize("index", range(len(DOCS)))
def test_every_field_replaced_by_bad_values_gives_config_error_or_a_model(index):
    base = DOCS[index]
    for path in list(leaves(base)):
        for bad in BAD_VALUES:
            d = copy.deepcopy(base)
            set_at(d, path, copy.deepcopy(bad))
            try:
                parse(d, base["kind"])
            except ConfigError:
                pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True) | st.text(max_size=8)
    | st.sampled_from(["exact", "prefix", "regex", "Service", "Exact", "PathPrefix", "/", "10s", "(", "*"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["host", "hosts", "http", "match", "route", "destination", "uri", "weight", "subset",
                         "subsets", "rules", "matches", "path", "type", "value", "name", "backendRefs", "filters",
                         "parentRefs", "headers", "trafficPolicy", "listeners", "port", "x"]) | st.text(max_size=5),
        children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(PARSERS)), spec=json_values, meta=json_values)
def test_random_documents_only_raise_config_error(kind, spec, meta):
    api = "gateway.networking.k8s.io/v1" if kind in ("HTTPRoute", "Gateway") else "networking.istio.io/v1"
    for d in ({"apiVersion": api, "kind": kind, "metadata": {"name": "n"}, "spec": spec},
              {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}):
        try:
            PARSERS[kind](d, W)
        except ConfigError:
            pass


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, len(DOCS) - 1), data=st.data())
def test_mutated_valid_documents_only_raise_config_error(index, data):
    d = mutate(copy.deepcopy(DOCS[index]), data, json_values)
    try:
        parse(d, DOCS[index]["kind"])
    except ConfigError:
        pass
