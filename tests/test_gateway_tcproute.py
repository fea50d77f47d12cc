"""Gateway API TCPRoute at the waypoint: the parser (Istio's ambient "TCP traffic shifting" YAML, every
field error named, only ConfigError on junk), the loader, the route table (attachment, weights, invalid
backends, age order against VirtualService tcp routes) and an 80/20 split end to end through a real
waypoint on loopback, counted per pod over many tunnels."""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from hbone.errors import TunnelRefused
from policy.errors import ConfigError, ConfigErrors, Where
from policy.routing.gateway_routes import TcpRoute, parse_tcp_route
from policy.routing.select import route_tcp
from policy.routing.table import build_route_table
from policy.scope import WaypointScope
from proxy.snapshot import build_snapshot
from tests.gateway_route_helpers import (backends, echo_through, mesh_of, route_doc, start_version_pod, table_of,
                                         tcp_echo_inventory)
from tests.mutation_helpers import junk_json, mutate
from tests.waypoint_harness import start_harness, until

W = Where("routes.yaml", 2)

# istio.io "TCP traffic shifting" (ambient, Gateway API tab): 80 % to v1, 20 % to v2, attached to the
# tcp-echo Service behind its waypoint.
ISTIO_TCPROUTE = """
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-echo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: tcp-echo
    port: 9000
  rules:
  - backendRefs:
    - name: tcp-echo-v1
      port: 9000
      weight: 80
    - name: tcp-echo-v2
      port: 9000
      weight: 20
"""
DOC = yaml.safe_load(ISTIO_TCPROUTE)

def tcp_routes(*texts: str, port: int = 9000):
    mesh, tbl = table_of(*texts)
    return tbl.tcp_routes_for(mesh.inventory.services["default/tcp-echo.default.svc.cluster.local"], port)


# ---------------------------------------------------------------------------------------------
# Parser


def test_istio_task_yaml_parses_whole():
    r = parse_tcp_route(copy.deepcopy(DOC), W)
    assert isinstance(r, TcpRoute) and r.kind == "TCPRoute"
    assert (r.namespace, r.name, r.key) == ("default", "tcp-echo", "default/tcp-echo")
    (p,) = r.parent_refs
    assert (p.group, p.kind, p.name, p.namespace, p.port, p.is_service) == ("", "Service", "tcp-echo", None, 9000, True)
    (rule,) = r.rules
    assert [(b.name, b.port, b.weight, b.kind, b.group) for b in rule.backend_refs] == [
        ("tcp-echo-v1", 9000, 80, "Service", ""), ("tcp-echo-v2", 9000, 20, "Service", "")]
    assert r.warnings == () and r.hostnames == ()


def test_v1_is_accepted_and_weight_defaults_to_1():
    d = copy.deepcopy(DOC)
    d["apiVersion"] = "gateway.networking.k8s.io/v1"
    del d["spec"]["rules"][0]["backendRefs"][1]["weight"]
    r = parse_tcp_route(d, W)
    assert [b.weight for b in r.rules[0].backend_refs] == [80, 1]


def test_several_rules_parse_with_a_warning_that_only_the_first_is_used():
    d = copy.deepcopy(DOC)
    d["spec"]["rules"].append({"name": "second", "backendRefs": [{"name": "tcp-echo-v2", "port": 9000}]})
    r = parse_tcp_route(d, W)
    assert len(r.rules) == 2 and r.rules[1].name == "second"
    assert r.warnings == ("spec.rules: only the first of 2 rules is used (TCPRoute rules have no matches; "
                          "the waypoint takes the first TCP route)",)


def _mutate(edit):
    d = copy.deepcopy(DOC)
    edit(d)
    return d


ERRORS = [
    (lambda d: d.update(apiVersion="gateway.networking.k8s.io/v1beta1"), "apiVersion", "expected one of"),
    (lambda d: d["metadata"].pop("name"), "metadata.name", "expected a non-empty string"),
    (lambda d: d.pop("spec"), "spec", "required"),
    (lambda d: d["spec"].update(hostnames=["a"]), "spec.hostnames", "unknown field"),
    (lambda d: d["spec"].pop("parentRefs"), "spec.parentRefs", "at least one parentRef"),
    (lambda d: d["spec"]["parentRefs"][0].update(port=0), "spec.parentRefs[0].port", "expected an integer 1..65535"),
    (lambda d: d["spec"]["parentRefs"][0].pop("name"), "spec.parentRefs[0].name", "expected a non-empty string"),
    (lambda d: d["spec"]["parentRefs"][0].update(extra=1), "spec.parentRefs[0].extra", "unknown field"),
    (lambda d: d["spec"].update(parentRefs=[{"name": f"g{i}"} for i in range(33)]), "spec.parentRefs",
     "at most 32 entries"),
    (lambda d: d["spec"].pop("rules"), "spec.rules", "required"),
    (lambda d: d["spec"].update(rules=[]), "spec.rules", "at least one rule"),
    (lambda d: d["spec"].update(rules="x"), "spec.rules", "expected a list"),
    (lambda d: d["spec"].update(rules=d["spec"]["rules"] * 17), "spec.rules", "at most 16 entries"),
    (lambda d: d["spec"]["rules"][0].update(matches=[]), "spec.rules[0].matches", "unknown field"),
    (lambda d: d["spec"]["rules"][0].update(backendRefs=[]), "spec.rules[0].backendRefs", "at least one backendRef"),
    (lambda d: d["spec"]["rules"][0].update(name=5), "spec.rules[0].name", "expected a string"),
    (lambda d: d["spec"].update(rules=[{"name": "a", "backendRefs": [{"name": "x", "port": 1}]}] * 2),
     "spec.rules[1].name", "duplicate rule name 'a'"),
    (lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(weight=-1), "spec.rules[0].backendRefs[0].weight",
     "expected an integer 0..1000000"),
    (lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(weight=1_000_001),
     "spec.rules[0].backendRefs[0].weight", "expected an integer 0..1000000"),
    (lambda d: d["spec"]["rules"][0]["backendRefs"][1].pop("port"), "spec.rules[0].backendRefs[1].port",
     "required for a Service backendRef"),
    (lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(name="tcp-echo-v1.default.svc.cluster.local"),
     "spec.rules[0].backendRefs[0].name", "the name of the Service must be used, not a hostname"),
    (lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(filters=[]), "spec.rules[0].backendRefs[0].filters",
     "unknown field"),
    (lambda d: d["spec"]["rules"][0]["backendRefs"][0].update(namespace=""), "spec.rules[0].backendRefs[0].namespace",
     "expected a non-empty string"),
]


@pytest.mark.parametrize("edit,path,problem", ERRORS)
def test_each_bad_field_is_named_with_file_document_and_resource(edit, path, problem):
    with pytest.raises(ConfigError) as e:
        parse_tcp_route(_mutate(edit), W)
    assert e.value.path == path and problem in e.value.problem, e.value.message
    if path not in ("apiVersion", "metadata.name"):
        assert e.value.message.startswith(f"routes.yaml: document 2 (TCPRoute default/tcp-echo): {path}: ")


def test_loader_reads_tcproute_next_to_httproutes_and_counts_it_as_its_own_kind():
    mesh = mesh_of(tcp_echo_inventory(), ISTIO_TCPROUTE)
    assert mesh.counts()["TCPRoute"] == 1 and mesh.counts()["HTTPRoute"] == 0
    assert [r.key for r in mesh.resources("TCPRoute")] == ["default/tcp-echo"]
    assert "TCPRoute=1" in repr(mesh)


def test_loader_refuses_an_unknown_version_naming_the_accepted_ones():
    with pytest.raises(ConfigErrors) as e:
        mesh_of(ISTIO_TCPROUTE.replace("v1alpha2", "v1beta1"))
    assert "'gateway.networking.k8s.io/v1beta1' is not a supported version of TCPRoute; use " \
           "gateway.networking.k8s.io/v1alpha2 or gateway.networking.k8s.io/v1" in e.value.message


json_values = junk_json(
    ["Service", "", "core", "tcp-echo", "a.b", "Gateway"],
    ["parentRefs", "rules", "backendRefs", "name", "port", "weight", "group", "kind", "namespace", "sectionName", "x"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=json_values, data=st.data())
def test_junk_only_ever_raises_config_error(spec, data):
    docs = [{"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute", "metadata": {"name": "n"},
             "spec": spec}]
    docs.append(mutate(copy.deepcopy(DOC), data, json_values))
    for doc in docs:
        try:
            parse_tcp_route(doc, W)
        except ConfigError:
            pass


# ---------------------------------------------------------------------------------------------
# Route table


def test_80_20_split_per_tunnel_names_outbound_clusters():
    routes = tcp_routes(ISTIO_TCPROUTE)
    assert routes.sources == ("TCPRoute default/tcp-echo",)
    (rule,) = routes.rules
    assert [(d.cluster_name, d.weight, d.fail_status) for d in rule.destinations] == [
        ("outbound|9000||tcp-echo-v1.default.svc.cluster.local", 80, None),
        ("outbound|9000||tcp-echo-v2.default.svc.cluster.local", 20, None)]
    rng = random.Random(0)
    n = Counter(route_tcp(routes, rng).host for _ in range(5000))
    assert 3800 < n["tcp-echo-v1.default.svc.cluster.local"] < 4200   # 4000 expected; fixed seed


def test_parent_port_limits_the_route_to_that_port_and_no_port_means_every_port():
    text = tcp_echo_inventory().replace("ports: {9000: 9000}\n  appProtocols: {9000: tcp}\n  waypoint",
                               "ports: {9000: 9000, 9001: 9001}\n  appProtocols: {9000: tcp, 9001: tcp}\n  waypoint")
    mesh = mesh_of(text, ISTIO_TCPROUTE)
    svc = mesh.inventory.services["default/tcp-echo.default.svc.cluster.local"]
    tbl = build_route_table(mesh.inventory, [svc], (), (), mesh.http_routes, waypoint_namespace="default")
    assert tbl.tcp_routes_for(svc, 9000).rules and not tbl.tcp_routes_for(svc, 9001).rules
    mesh = mesh_of(text, ISTIO_TCPROUTE.replace("    port: 9000\n  rules", "  rules"))
    tbl = build_route_table(mesh.inventory, [svc], (), (), mesh.http_routes, waypoint_namespace="default")
    assert tbl.tcp_routes_for(svc, 9000).rules and tbl.tcp_routes_for(svc, 9001).rules


def test_consumer_route_in_another_namespace_and_routes_for_other_services_are_ignored():
    other_ns = route_doc(backends(("tcp-echo-v2", 1)), name="consumer", ns="client")
    other_svc = route_doc(backends(("tcp-echo-v2", 1)), parent={"group": "", "kind": "Service", "name": "tcp-echo-v1"})
    routes = tcp_routes(other_ns, other_svc)
    assert routes.rules == () and routes.default.cluster_name == "inbound-vip|9000|tcp|tcp-echo.default.svc.cluster.local"


def test_gateway_parent_applies_to_every_service_of_the_waypoint():
    gw = route_doc(backends(("tcp-echo-v2", 1)), parent={"name": "waypoint"})
    (rule,) = tcp_routes(gw).rules
    assert [d.service_key for d in rule.destinations] == ["default/tcp-echo-v2.default.svc.cluster.local"]
    assert tcp_routes(route_doc(backends(("tcp-echo-v2", 1)), parent={"name": "other-gateway"})).rules == ()


def test_zero_weights_are_dropped_and_a_single_live_backend_takes_every_connection():
    (rule,) = tcp_routes(route_doc(backends(("tcp-echo-v1", 0), ("tcp-echo-v2", 7)))).rules
    assert [(d.host, d.weight) for d in rule.destinations] == [("tcp-echo-v2.default.svc.cluster.local", 1)]


def test_all_weights_zero_rejects_every_connection_503_nc():
    routes = tcp_routes(route_doc(backends(("tcp-echo-v1", 0), ("tcp-echo-v2", 0))))
    d = route_tcp(routes, random.Random(1))
    assert (d.fail_status, d.fail_flag, d.cluster_name) == (503, "NC", "outbound|65535|zero-weight|internal.cluster.local")
    assert "no backendRef with weight > 0" in d.problem


def test_unknown_unsupported_and_cross_namespace_backends_reject_their_share():
    rules = [{"backendRefs": [{"name": "nope", "port": 9000, "weight": 1},
                              {"name": "x", "group": "example.com", "kind": "Thing", "weight": 1},
                              {"name": "tcp-echo-v1", "namespace": "other", "port": 9000, "weight": 1},
                              {"name": "tcp-echo-v2", "port": 9000, "weight": 1}]}]
    (rule,) = tcp_routes(route_doc(rules)).rules
    got = [(d.fail_status, d.fail_flag, d.problem) for d in rule.destinations]
    assert got == [(503, "NC", "unknown service nope.default.svc.cluster.local"),
                   (503, "NC", "backendRef kind example.com/Thing is not supported"),
                   (503, "NC", "cross-namespace backendRef without ReferenceGrant"),
                   (None, "", "")]


VS_TCP = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: tcp-echo-vs}
spec:
  hosts: [tcp-echo]
  tcp:
  - route: [{destination: {host: tcp-echo-v2, port: {number: 9000}}}]
"""


def test_tcproute_and_virtualservice_tcp_routes_interleave_by_age_the_older_wins():
    rng = random.Random(3)
    older_route = tcp_routes(route_doc(backends(("tcp-echo-v1", 1))), VS_TCP)
    assert [r.destinations[0].host for r in older_route.rules] == ["tcp-echo-v1.default.svc.cluster.local",
                                                                  "tcp-echo-v2.default.svc.cluster.local"]
    assert route_tcp(older_route, rng).host == "tcp-echo-v1.default.svc.cluster.local"
    older_vs = tcp_routes(VS_TCP, route_doc(backends(("tcp-echo-v1", 1))))
    assert route_tcp(older_vs, rng).host == "tcp-echo-v2.default.svc.cluster.local"
    assert older_vs.sources == ("VirtualService default/tcp-echo-vs", "TCPRoute default/tcp-echo")


def test_route_warnings_reach_the_table_and_the_route_backends_stay_in_the_waypoint_scope():
    d = copy.deepcopy(DOC)
    d["spec"]["rules"].append({"backendRefs": [{"name": "tcp-echo-v2", "port": 9000}]})
    mesh = mesh_of(tcp_echo_inventory(), yaml.safe_dump(d))
    scope = WaypointScope.parse("default", gateway="default/reviews-waypoint")
    snap = build_snapshot(mesh, mode="waypoint", scope=scope, version=1, now=0.0)
    # scope_for_waypoint keeps the route (it attaches to a bound Service) and the Services it sends to.
    assert [r.key for r in snap.mesh.resources("TCPRoute")] == ["default/tcp-echo"]
    assert {"default/tcp-echo-v1.default.svc.cluster.local", "default/tcp-echo-v2.default.svc.cluster.local"} <= \
        set(snap.mesh.inventory.services)
    assert any(w.startswith("TCPRoute default/tcp-echo: spec.rules: only the first of 2 rules")
               for w in snap.routes.warnings)
    svc = snap.mesh.inventory.services["default/tcp-echo.default.svc.cluster.local"]
    assert len(snap.routes.tcp_routes_for(svc, 9000).rules) == 2


# ---------------------------------------------------------------------------------------------
# End to end: a real waypoint, HBONE tunnels in, HBONE to the version pods


TUNNELS = 120          # per-tunnel split: enough draws that 80/20 is unmistakable
CONCURRENT = 8         # tunnels in flight at once (keeps the test short on a loaded box)


async def test_tcproute_80_20_split_end_to_end_counted_per_pod(tmp_path, loopback_ip):
    v1, v2 = loopback_ip(), loopback_ip()
    h = await start_harness(tmp_path, loopback_ip, routing=None, authz=False,
                            extra=tcp_echo_inventory(v1, v2) + "---\n" + ISTIO_TCPROUTE, rng=random.Random(11))
    counts: Counter = Counter()
    try:
        h.pods[v1] = await start_version_pod(v1, "v1", counts)
        h.pods[v2] = await start_version_pod(v2, "v2", counts)
        client = h.client()
        sem = asyncio.Semaphore(CONCURRENT)

        async def one(i: int) -> bytes:
            async with sem:
                return await echo_through(client, b"n%d" % i)

        replies = await asyncio.gather(*(one(i) for i in range(TUNNELS)))
        by_version = Counter(r.split(b":")[0] for r in replies)
        assert all(r.split(b":")[1] == b"n%d" % i for i, r in enumerate(replies))
        assert sum(by_version.values()) == TUNNELS and set(by_version) <= {b"v1", b"v2"}
        # Binomial(120, 0.2): mean 24, sd 4.4; [8, 45] is beyond 3.5 sd either side (and the seed is fixed).
        assert 8 <= by_version[b"v2"] <= 45, by_version
        assert counts == Counter({"v1": by_version[b"v1"], "v2": by_version[b"v2"]})
        # The access log names the version Services' clusters (the route's), not tcp-echo's own.
        lines: list[dict] = []

        def all_logged() -> bool:   # the access log is written by its own thread
            lines[:] = [x for x in map(json.loads, h.log_sink.getvalue().splitlines()) if x.get("kind") == "tunnel"]
            return len(lines) >= TUNNELS

        await until(all_logged, "a tunnel line per tunnel")
        assert Counter(x["upstream_cluster"] for x in lines) == Counter({
            "outbound|9000||tcp-echo-v1.default.svc.cluster.local": by_version[b"v1"],
            "outbound|9000||tcp-echo-v2.default.svc.cluster.local": by_version[b"v2"]})
    finally:
        await h.close()


async def test_tcproute_with_every_weight_zero_refuses_the_tunnel(tmp_path, loopback_ip):
    v1, v2 = loopback_ip(), loopback_ip()
    zero = route_doc(backends(("tcp-echo-v1", 0), ("tcp-echo-v2", 0)))
    h = await start_harness(tmp_path, loopback_ip, routing=None, authz=False,
                            extra=tcp_echo_inventory(v1, v2) + "---\n" + zero)
    counts: Counter = Counter()
    try:
        h.pods[v1] = await start_version_pod(v1, "v1", counts)
        with pytest.raises(TunnelRefused) as err:
            await echo_through(h.client(), b"x")
        assert err.value.status == 503 and not counts
    finally:
        await h.close()
