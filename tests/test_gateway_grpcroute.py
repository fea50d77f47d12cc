"""Gateway API GRPCRoute at the waypoint: the parser (Gateway API / Istio example YAML, istiod's
method-to-path translation, every field error named, only ConfigError on junk), the route table
(precedence, HTTPRoute vs GRPCRoute on one service, weights, filters) and routing by gRPC method to two
versions end to end: an h2c client (the h2 library) through a real waypoint on loopback."""

from __future__ import annotations

import copy
import random
from types import MappingProxyType

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from policy.errors import ConfigError, ConfigErrors, Where
from policy.routing.gateway_routes import GrpcRoute, parse_grpc_route
from policy.routing.select import DirectResponse, Forward, HttpRequestView, NoRoute, route_http
from policy.routing.table import build_route_table
from tests.gateway_route_helpers import mesh_of, versions_inventory
from tests.mutation_helpers import junk_json, mutate
from tests.test_waypoint_l7 import SAY_HELLO, RawH2, grpc_unframe, start_h2c_pod
from tests.waypoint_harness import start_harness

W = Where("grpc.yaml", 4)

# The Gateway API GRPCRoute guide's example (gateway-api.sigs.k8s.io/guides/grpc-routing), attached to a
# Service for the mesh as Istio's ambient docs attach routes (parentRefs kind Service, group "").
GUIDE_GRPCROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: grpc-app-1
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: greeter
    port: 9090
  hostnames:
  - "example.com"
  rules:
  - matches:
    - method:
        service: com.example.User
        method: Login
    backendRefs:
    - name: greeter-v1
      port: 9090
  - matches:
    - headers:
      - type: Exact
        name: magic
        value: foo
      method:
        service: com.Example.Login
        method: Login
    backendRefs:
    - name: greeter-v1
      port: 9090
  - matches:
    - method:
        service: com.example.User
    backendRefs:
    - name: greeter-v2
      port: 9090
"""
DOC = yaml.safe_load(GUIDE_GRPCROUTE)

# Routing by method to two versions: SayHello (and anything carrying x-canary: yes) to v2, the rest to v1.
GREETER_GRPCROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: default}
spec:
  parentRefs:
  - {group: "", kind: Service, name: greeter, port: 9090}
  rules:
  - matches:
    - method: {service: greeter.Greeter, method: SayHello}
    - headers: [{name: X-Canary, value: "yes"}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-routed-by, value: grpcroute}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-route, value: v2}]}
    backendRefs:
    - {name: greeter-v2, port: 9090}
  - backendRefs:
    - {name: greeter-v1, port: 9090}
"""

GREETER_VIP = "127.2.0.91"   # test_waypoint_l7's greeter is 127.2.0.90; these tests declare their own


def inventory(v1_ip: str = "10.0.8.1", v2_ip: str = "10.0.8.2") -> str:
    """greeter (gRPC, behind the reviews waypoint) and one Service per version, each pod backing both."""
    return versions_inventory("greeter", 9090, "grpc", (GREETER_VIP, "127.2.0.92", "127.2.0.93"), (v1_ip, v2_ip))


def routes_of(*texts: str, gateway: str | None = "default/waypoint"):
    mesh = mesh_of(inventory(), *texts)
    svc = mesh.inventory.services["default/greeter.default.svc.cluster.local"]
    tbl = build_route_table(mesh.inventory, [svc], mesh.virtual_services, mesh.destination_rules, mesh.http_routes,
                            waypoint_namespace="default", gateway=gateway)
    return tbl, tbl.http_routes_for(svc, 9090)


def grpc_request(path: str, headers: dict | None = None) -> HttpRequestView:
    hs = {"content-type": ("application/grpc",)} | {k.lower(): (v,) for k, v in (headers or {}).items()}
    return HttpRequestView("POST", path, "greeter:9090", MappingProxyType(hs), 9090)


def picked(routes, path: str, headers: dict | None = None) -> str:
    d = route_http(grpc_request(path, headers), routes)
    if isinstance(d, NoRoute):
        return "404"
    if isinstance(d.action, DirectResponse):
        return str(d.action.status)
    assert isinstance(d.action, Forward)
    return "+".join(x.host.split(".")[0] for x in d.action.destinations)


# ---------------------------------------------------------------------------------------------
# Parser


def test_guide_yaml_parses_whole_and_methods_become_istios_path_matches():
    r = parse_grpc_route(copy.deepcopy(DOC), W)
    assert isinstance(r, GrpcRoute) and r.kind == "GRPCRoute" and r.key == "default/grpc-app-1"
    assert r.hostnames == ("example.com",) and r.parent_refs[0].is_service and r.parent_refs[0].port == 9090
    m0, m1, m2 = (rule.matches[0] for rule in r.rules)
    # istiod createGRPCURIMatch: Exact service+method → exact "/svc/method"; service only → prefix "/svc/".
    assert (m0.path_type, m0.path, m0.path_match.kind) == ("Exact", "/com.example.User/Login", "exact")
    assert (m1.path_type, m1.path) == ("Exact", "/com.Example.Login/Login")
    assert [(h.name, h.match.kind, h.match.value) for h in m1.headers] == [("magic", "exact", "foo")]
    assert (m2.path_type, m2.path, m2.path_match.kind) == ("Prefix", "/com.example.User/", "prefix")
    assert [(b.name, b.port, b.weight) for b in r.rules[2].backend_refs] == [("greeter-v2", 9090, 1)]
    assert r.warnings == ()


@pytest.mark.parametrize("method,ptype,path,hits,misses", [
    ({"method": "Login"}, "RegularExpression", "/[^/]+/Login", ["/a.B/Login"], ["/a/b/Login", "/a.B/Logout"]),
    ({"type": "RegularExpression", "service": r"com\.example\..*"}, "RegularExpression", r"/com\.example\..*/.+",
     ["/com.example.User/Get"], ["/com.example.User/", "/org.x/Get"]),
    ({"type": "RegularExpression", "method": "Get.*"}, "RegularExpression", "/[^/]+/Get.*",
     ["/s/GetUser"], ["/s/Put"]),
    ({"type": "RegularExpression", "service": "s[0-9]", "method": "M"}, "RegularExpression", "/s[0-9]/M",
     ["/s1/M"], ["/s1/MM", "/sx/M"]),
    ({"service": "pkg.Svc"}, "Prefix", "/pkg.Svc/", ["/pkg.Svc/Any"], ["/pkg.Svc", "/pkg.SvcX/Any"]),
    ({"service": "pkg.Svc", "method": "Do"}, "Exact", "/pkg.Svc/Do", ["/pkg.Svc/Do"], ["/pkg.Svc/DoIt"]),
])
def test_method_match_translation_table(method, ptype, path, hits, misses):
    d = copy.deepcopy(DOC)
    d["spec"]["rules"] = [{"matches": [{"method": method}], "backendRefs": [{"name": "greeter-v1", "port": 9090}]}]
    (m,) = parse_grpc_route(d, W).rules[0].matches
    assert (m.path_type, m.path) == (ptype, path)
    assert all(m.path_match.matches(p) for p in hits) and not any(m.path_match.matches(p) for p in misses)


def test_rule_without_matches_matches_everything_and_no_rules_is_a_warning():
    d = copy.deepcopy(DOC)
    d["spec"]["rules"] = [{"backendRefs": [{"name": "greeter-v1", "port": 9090}]}]
    (m,) = parse_grpc_route(d, W).rules[0].matches
    assert (m.path_type, m.path_match, m.headers) == ("Any", None, ())
    d["spec"].pop("rules")
    r = parse_grpc_route(d, W)
    assert r.rules == () and r.warnings == ("spec.rules: no rules: this GRPCRoute routes nothing",)


def test_v1alpha2_is_accepted_and_duplicate_header_names_keep_the_first():
    d = copy.deepcopy(DOC)
    d["apiVersion"] = "gateway.networking.k8s.io/v1alpha2"
    d["spec"]["rules"][1]["matches"][0]["headers"].append({"name": "MAGIC", "value": "bar"})
    (m,) = parse_grpc_route(d, W).rules[1].matches
    assert [(h.name, h.match.value) for h in m.headers] == [("magic", "foo")]


def _mutate(edit):
    d = copy.deepcopy(DOC)
    edit(d)
    return d


def _rule(d, i=0):
    return d["spec"]["rules"][i]


def _method(d):
    return d["spec"]["rules"][0]["matches"][0]["method"]


ERRORS = [
    (lambda d: d.update(apiVersion="gateway.networking.k8s.io/v1beta1"), "apiVersion", "expected one of"),
    (lambda d: d["spec"].update(extra=1), "spec.extra", "unknown field"),
    (lambda d: d["spec"].pop("parentRefs"), "spec.parentRefs", "at least one parentRef"),
    (lambda d: d["spec"]["parentRefs"][0].update(kind=""), "spec.parentRefs[0].kind", "expected a non-empty string"),
    (lambda d: d["spec"].update(hostnames=["a"] * 17), "spec.hostnames", "at most 16 entries"),
    (lambda d: d["spec"].update(hostnames=[3]), "spec.hostnames[0]", "expected a non-empty string"),
    (lambda d: d["spec"].update(rules=d["spec"]["rules"] * 6), "spec.rules", "at most 16 entries"),
    (lambda d: _rule(d).update(matches=[{}] * 9), "spec.rules[0].matches", "at most 8 entries"),
    (lambda d: _rule(d).update(timeouts={"request": "1s"}), "spec.rules[0].timeouts", "unknown field"),
    (lambda d: _rule(d).update(name="a") or _rule(d, 1).update(name="a"), "spec.rules[1].name", "duplicate rule name"),
    (lambda d: _rule(d)["matches"][0].update(path={"value": "/"}), "spec.rules[0].matches[0].path", "unknown field"),
    (lambda d: _method(d).update(type="Prefix"), "spec.rules[0].matches[0].method.type",
     "expected Exact or RegularExpression"),
    (lambda d: _rule(d)["matches"][0].update(method={}), "spec.rules[0].matches[0].method",
     "one or both of 'service' or 'method' must be specified"),
    (lambda d: _method(d).update(service="com/example"), "spec.rules[0].matches[0].method.service",
     "must only contain valid characters"),
    (lambda d: _method(d).update(method="Log.in"), "spec.rules[0].matches[0].method.method",
     "must only contain valid characters"),
    (lambda d: _method(d).update(method=""), "spec.rules[0].matches[0].method.method", "expected a non-empty string"),
    (lambda d: _method(d).update(method="x" * 1025), "spec.rules[0].matches[0].method.method", "at most 1024"),
    (lambda d: _method(d).update(type="RegularExpression", service="("), "spec.rules[0].matches[0].method",
     "invalid regular expression '/(/Login'"),
    (lambda d: _rule(d)["matches"][0].update(headers=[{"name": "a b", "value": "x"}]),
     "spec.rules[0].matches[0].headers[0].name", "expected a header name"),
    (lambda d: _rule(d)["matches"][0].update(headers=[{"name": "a", "value": ""}]),
     "spec.rules[0].matches[0].headers[0].value", "expected a non-empty string"),
    (lambda d: _rule(d)["matches"][0].update(headers=[{"name": "a", "value": "x", "type": "Prefix"}]),
     "spec.rules[0].matches[0].headers[0].type", "expected Exact or RegularExpression"),
    (lambda d: _rule(d)["matches"][0].update(headers=[{"name": "a", "value": "(", "type": "RegularExpression"}]),
     "spec.rules[0].matches[0].headers[0].value", "invalid regular expression"),
    (lambda d: _rule(d)["matches"][0].update(headers=[{"name": f"h{i}", "value": "x"} for i in range(17)]),
     "spec.rules[0].matches[0].headers", "at most 16 entries"),
    (lambda d: _rule(d).update(filters=[{"type": "URLRewrite", "urlRewrite": {}}]), "spec.rules[0].filters[0].type",
     "expected one of RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, ExtensionRef"),
    (lambda d: _rule(d).update(filters=[{"type": "RequestHeaderModifier", "requestHeaderModifier": {},
                                         "requestMirror": {}}]),
     "spec.rules[0].filters[0].requestMirror", "must not be set when type is RequestHeaderModifier"),
    (lambda d: _rule(d).update(filters=[{"type": "RequestHeaderModifier"}]),
     "spec.rules[0].filters[0].requestHeaderModifier", "required for this filter type"),
    (lambda d: _rule(d).update(filters=[{"type": "ResponseHeaderModifier", "responseHeaderModifier": {}}] * 2),
     "spec.rules[0].filters[1]", "ResponseHeaderModifier filter cannot be repeated"),
    (lambda d: _rule(d).update(filters=[{"type": "ExtensionRef", "extensionRef": {"name": "x"}}]),
     "spec.rules[0].filters[0]", "ExtensionRef filters are not supported"),
    (lambda d: _rule(d).update(filters=[{"type": "RequestHeaderModifier",
                                         "requestHeaderModifier": {"set": [{"name": "a", "value": "x\ny"}]}}]),
     "spec.rules[0].filters[0].requestHeaderModifier.set[0].value", "must not contain"),
    (lambda d: _rule(d).update(filters=[{"type": "RequestMirror", "requestMirror": {"backendRef": {}}}]),
     "spec.rules[0].filters[0].requestMirror.backendRef.name", "expected a non-empty string"),
    (lambda d: _rule(d)["backendRefs"][0].update(filters=[{"type": "RequestMirror",
                                                           "requestMirror": {"backendRef": {"name": "x"}}}]),
     "spec.rules[0].backendRefs[0].filters[0]", "RequestMirror is not supported on a backendRef"),
    (lambda d: _rule(d)["backendRefs"][0].update(weight=True), "spec.rules[0].backendRefs[0].weight",
     "expected an integer 0..1000000"),
    (lambda d: _rule(d)["backendRefs"][0].pop("port"), "spec.rules[0].backendRefs[0].port",
     "required for a Service backendRef"),
    (lambda d: _rule(d)["backendRefs"][0].update(name="a.b"), "spec.rules[0].backendRefs[0].name",
     "not a hostname"),
    (lambda d: _rule(d).update(backendRefs=[{"name": "x", "port": 1}] * 17), "spec.rules[0].backendRefs",
     "at most 16 entries"),
]


@pytest.mark.parametrize("edit,path,problem", ERRORS)
def test_each_bad_field_is_named_with_file_document_and_resource(edit, path, problem):
    with pytest.raises(ConfigError) as e:
        parse_grpc_route(_mutate(edit), W)
    assert e.value.path == path and problem in e.value.problem, e.value.message
    if path != "apiVersion":
        assert e.value.message.startswith(f"grpc.yaml: document 4 (GRPCRoute default/grpc-app-1): {path}: ")


def test_loader_reads_grpcroute_and_counts_it_as_its_own_kind():
    mesh = mesh_of(inventory(), GREETER_GRPCROUTE)
    assert mesh.counts()["GRPCRoute"] == 1 and mesh.counts()["HTTPRoute"] == 0
    with pytest.raises(ConfigErrors) as e:
        mesh_of(GREETER_GRPCROUTE.replace("/v1\n", "/v1beta1\n"))
    assert "is not a supported version of GRPCRoute; use gateway.networking.k8s.io/v1 or " \
           "gateway.networking.k8s.io/v1alpha2" in e.value.message


json_values = junk_json(
    ["Service", "", "Exact", "RegularExpression", "(", "a.B", "Login", "RequestMirror", "RequestHeaderModifier",
     "ExtensionRef"],
    ["parentRefs", "rules", "matches", "method", "service", "headers", "filters", "type", "backendRefs", "name",
     "value", "port", "weight", "requestHeaderModifier", "requestMirror", "backendRef", "set", "add", "remove", "x"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=json_values, data=st.data())
def test_junk_only_ever_raises_config_error(spec, data):
    docs = [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute", "metadata": {"name": "n"},
             "spec": spec}]
    docs.append(mutate(yaml.safe_load(GREETER_GRPCROUTE), data, json_values))
    for doc in docs:
        try:
            parse_grpc_route(doc, W)
        except ConfigError:
            pass


# ---------------------------------------------------------------------------------------------
# Route table


def test_compiled_rules_are_the_selectors_own_objects_in_istio_precedence():
    _, routes = routes_of(GUIDE_GRPCROUTE)
    assert routes.kind == "GRPCRoute" and routes.sources == ("GRPCRoute default/grpc-app-1",)
    # istiod sortHTTPRoutes: Exact (longest uri first, then more headers) before Prefix.
    assert [(r.index, r.matchers[0].m.path) for r in routes.rules] == [
        (1, "/com.Example.Login/Login"), (0, "/com.example.User/Login"), (2, "/com.example.User/")]
    assert all(type(r.matchers[0]).__name__ == "GwMatcher" and isinstance(r.action, Forward) for r in routes.rules)
    assert picked(routes, "/com.example.User/Login") == "greeter-v1"
    assert picked(routes, "/com.example.User/Get") == "greeter-v2"
    assert picked(routes, "/com.Example.Login/Login") == "404"          # needs magic: foo
    assert picked(routes, "/com.Example.Login/Login", {"Magic": "foo"}) == "greeter-v1"
    assert picked(routes, "/other.Svc/Login") == "404"                  # Gateway API: no match ⇒ 404


def test_method_by_version_rules_and_a_catch_all_rule_go_last():
    _, routes = routes_of(GREETER_GRPCROUTE)
    assert [len(r.matchers) for r in routes.rules] == [1, 1, 0]         # exact, header-only, catch-all
    assert picked(routes, "/greeter.Greeter/SayHello") == "greeter-v2"
    assert picked(routes, "/greeter.Greeter/Other") == "greeter-v1"
    assert picked(routes, "/greeter.Greeter/Other", {"x-canary": "yes"}) == "greeter-v2"
    fwd = routes.rules[0].action
    assert fwd.headers.request.add == (("x-routed-by", "grpcroute"),) and fwd.headers.response.set == (("x-route", "v2"),)
    assert fwd.destinations[0].cluster_name == "outbound|9090||greeter-v2.default.svc.cluster.local"


def _route(rules: list, name: str = "g", ns: str = "default", parent: dict | None = None, kind: str = "GRPCRoute",
           api: str = "gateway.networking.k8s.io/v1") -> str:
    parent = parent or {"group": "", "kind": "Service", "name": "greeter", "namespace": "default"}
    return yaml.safe_dump({"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": ns},
                           "spec": {"parentRefs": [parent], "rules": rules}})


def test_weights_zero_weight_and_all_zero_and_unknown_backends():
    split = [{"backendRefs": [{"name": "greeter-v1", "port": 9090, "weight": 90},
                              {"name": "greeter-v2", "port": 9090, "weight": 10},
                              {"name": "gone", "port": 9090, "weight": 0}]}]
    _, routes = routes_of(_route(split))
    fwd = routes.rules[0].action
    assert [(d.host.split(".")[0], d.weight, d.fail_status) for d in fwd.destinations] == [
        ("greeter-v1", 90, None), ("greeter-v2", 10, None), ("gone", 0, 500)]
    zero = [{"backendRefs": [{"name": "greeter-v1", "port": 9090, "weight": 0}]}]
    _, routes = routes_of(_route(zero))
    # istiod convertGRPCRoute: "return 500 when there are no >0 weight backends".
    assert isinstance(routes.rules[0].action, DirectResponse) and routes.rules[0].action.status == 500
    _, routes = routes_of(_route([{"backendRefs": [{"name": "gone", "port": 9090}]}]))
    (d,) = routes.rules[0].action.destinations
    assert (d.fail_status, d.problem) == (500, "unknown service gone.default.svc.cluster.local")


def test_consumer_routes_and_routes_without_rules_do_not_attach():
    consumer = _route([{"backendRefs": [{"name": "greeter-v2", "port": 9090}]}], ns="client")
    empty = yaml.safe_dump({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
                            "metadata": {"name": "e", "namespace": "default"},
                            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "greeter"}]}})
    tbl, routes = routes_of(consumer, empty)
    assert routes.kind == "default"


HTTPROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: h, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter}]
  rules: [{backendRefs: [{name: greeter-v1, port: 9090}]}]
"""


def test_httproute_and_grpcroute_on_one_service_the_older_kind_is_used():
    grpc = _route([{"backendRefs": [{"name": "greeter-v2", "port": 9090}]}], name="a")
    tbl, routes = routes_of(HTTPROUTE, grpc)
    assert routes.kind == "HTTPRoute" and picked(routes, "/x/y") == "greeter-v1"
    assert any("both HTTPRoute and GRPCRoute attach; the older kind (HTTPRoute) is used, GRPCRoute default/a ignored"
               in w for w in tbl.warnings)
    tbl, routes = routes_of(grpc, HTTPROUTE)
    assert routes.kind == "GRPCRoute" and picked(routes, "/x/y") == "greeter-v2"
    assert any("the older kind (GRPCRoute) is used, HTTPRoute default/h ignored" in w for w in tbl.warnings)


def test_grpcroute_wins_over_a_virtualservice_with_a_warning():
    vs = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: greeter}\n"
          "spec: {hosts: [greeter], http: [{route: [{destination: {host: greeter-v1}}]}]}\n")
    tbl, routes = routes_of(vs, _route([{"backendRefs": [{"name": "greeter-v2", "port": 9090}]}]))
    assert routes.kind == "GRPCRoute" and picked(routes, "/a/b") == "greeter-v2"
    assert "service default/greeter.default.svc.cluster.local: both GRPCRoute and VirtualService attach; " \
           "using GRPCRoute (Istio: mixing them is undefined behavior)" in tbl.warnings


def test_mirror_filter_becomes_the_rules_mirror():
    rules = [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "greeter-v1", "port": 9090},
                                                                     "percent": 25}}],
              "backendRefs": [{"name": "greeter-v2", "port": 9090}]}]
    _, routes = routes_of(_route(rules))
    (m,) = routes.rules[0].action.mirrors
    assert m.percent == 25.0 and m.destination.cluster_name == "outbound|9090||greeter-v1.default.svc.cluster.local"


# ---------------------------------------------------------------------------------------------
# End to end: h2c gRPC through a real waypoint, routed by method


async def test_grpcroute_routes_by_method_to_two_versions_end_to_end(tmp_path, loopback_ip):
    v1, v2 = loopback_ip(), loopback_ip()
    h = await start_harness(tmp_path, loopback_ip, routing=None, authz=False,
                            extra=inventory(v1, v2) + "---\n" + GREETER_GRPCROUTE, rng=random.Random(5))
    try:
        backends = {}
        for ip, version in ((v1, "v1"), (v2, "v2")):
            pod, backends[version] = await start_h2c_pod(ip, version)
            h.pods[ip] = pod
        c = RawH2(await h.client().tunnel(f"{GREETER_VIP}:9090"))
        hello = [c.grpc(SAY_HELLO, b"n%d" % i, authority=b"greeter:9090") for i in range(6)]
        other = [c.grpc(b"/greeter.Greeter/Other", b"o%d" % i, authority=b"greeter:9090") for i in range(6)]
        canary = c.start(b"/greeter.Greeter/Other", method=b"POST", authority=b"greeter:9090",
                         headers=[(b"content-type", b"application/grpc"), (b"x-canary", b"yes")], body=b"")
        await c.pump(hello + other + [canary])
        for i, sid in enumerate(hello):
            r = c.results[sid]
            assert grpc_unframe(r["data"]) == [b"hello n%d from v2" % i], r
            assert r["trailers"][b"grpc-status"] == b"0" and r["headers"][b"x-route"] == b"v2"
        for sid in other:
            r = c.results[sid]
            assert r["headers"][b":status"] == b"200" and r["headers"][b"x-version"] == b"v1"
            assert b"x-route" not in r["headers"]
        assert c.results[canary]["headers"][b"x-version"] == b"v2"
        assert len(backends["v2"].requests) == 7 and len(backends["v1"].requests) == 6
        assert all(q["headers"][b"x-routed-by"] == b"grpcroute" for q in backends["v2"].requests)
        assert not any(b"x-routed-by" in q["headers"] for q in backends["v1"].requests)
        lines = await h.http_lines(13)
        assert {x["route"] for x in lines} == {"inbound-vip|9090|http|greeter.default.svc.cluster.local"}
        assert {x["upstream_cluster"] for x in lines} == {"outbound|9090||greeter-v1.default.svc.cluster.local",
                                                          "outbound|9090||greeter-v2.default.svc.cluster.local"}
    finally:
        await h.close()


def test_proxy_config_routes_name_the_grpcroute_that_made_them():
    from proxy.admin.views import build_waypoint_views
    from proxy.pipeline.views_input import views_input
    from proxy.snapshot import build_snapshot
    from policy.scope import WaypointScope

    snap = build_snapshot(mesh_of(inventory(), GREETER_GRPCROUTE), mode="waypoint", version=1, now=0.0,
                          scope=WaypointScope.parse("default", gateway="default/reviews-waypoint"))
    (cfg,) = [r for r in build_waypoint_views(**views_input(snap)).to_dict()["routes"]
              if r["name"] == "inbound-vip|9090|http|greeter.default.svc.cluster.local"]
    entries = cfg["virtualHosts"][0]["routes"]
    assert len(entries) == 3
    assert {e["metadata"]["filterMetadata"]["istio"]["config"] for e in entries} == {
        "/apis/gateway.networking.k8s.io/v1/namespaces/default/grpc-route/greeter"}


def test_proxy_config_routes_show_a_service_only_method_match_as_a_prefix():
    """istiod writes a service-only Exact method match as a plain prefix ``/<service>/``: the view says prefix."""
    from proxy.admin.views import build_waypoint_views
    from proxy.pipeline.views_input import views_input
    from proxy.snapshot import build_snapshot
    from policy.scope import WaypointScope

    route = GREETER_GRPCROUTE.replace("- method: {service: greeter.Greeter, method: SayHello}",
                                      "- method: {service: greeter.Greeter}")
    snap = build_snapshot(mesh_of(inventory(), route), mode="waypoint", version=1, now=0.0,
                          scope=WaypointScope.parse("default", gateway="default/reviews-waypoint"))
    (cfg,) = [r for r in build_waypoint_views(**views_input(snap)).to_dict()["routes"]
              if r["name"] == "inbound-vip|9090|http|greeter.default.svc.cluster.local"]
    assert [e["match"] for e in cfg["virtualHosts"][0]["routes"]] == [
        {"prefix": "/greeter.Greeter/"}, {"prefix": "/"}, {"prefix": "/"}]
