"""TLS routes at the waypoint: VirtualService ``tls`` rules and Gateway API TLSRoute, applied as istiod applies
them to a waypoint (policy.routing.tls): never by the connection's SNI, only when a match names exactly the
service's hostname (or a TLSRoute has no hostnames), and before every TCP route. Parsers (Istio's validation
rules, every field error named, only ConfigError on junk), the loader, the route table, the waypoint scope,
and end to end: real TLS ClientHellos with different SNIs through a real waypoint on loopback."""

from __future__ import annotations

import copy
import hashlib
import random
import ssl
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from policy.errors import ConfigError, ConfigErrors, Where
from policy.routing.gateway_routes import TlsRoute, parse_tls_route
from policy.routing.parse import parse_virtual_service
from policy.routing.select import route_tcp
from policy.routing.tls import TlsMatch, TlsRule, host_overlaps, tls_route_sni_hosts
from policy.scope import WaypointScope
from proxy.snapshot import build_snapshot
from tests.gateway_route_helpers import TCP_VIP, backends, mesh_of, route_doc, table_of, tcp_echo_inventory
from tests.mutation_helpers import junk_json
from tests.stream_helpers import exchange, read_all
from tests.waypoint_harness import Pod, start_answering_pod, start_harness

W = Where("routes.yaml", 2)
SVC = "tcp-echo.default.svc.cluster.local"
SVC_KEY = f"default/{SVC}"
V1 = "tcp-echo-v1.default.svc.cluster.local"
V2 = "tcp-echo-v2.default.svc.cluster.local"


def vs_doc(tls: list, *, tcp: list | None = None, name: str = "tcp-echo-tls", hosts=(SVC,)) -> str:
    # Istio validates each SNI host against the hosts as written (validateSniHost: host.Name.SubsetOf), so a
    # tls route for the service names its FQDN in ``hosts``.
    spec = {"hosts": list(hosts), "tls": tls} | ({"tcp": tcp} if tcp else {})
    return yaml.safe_dump({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                           "metadata": {"name": name, "namespace": "default"}, "spec": spec})


def tls_rule(sni: list, dest: str = "tcp-echo-v2", **match) -> dict:
    return {"match": [{"sniHosts": sni, **match}], "route": [{"destination": {"host": dest, "port": {"number": 9000}}}]}


def tcp_rule(dest: str = "tcp-echo-v1") -> dict:
    return {"route": [{"destination": {"host": dest, "port": {"number": 9000}}}]}


def tlsroute_doc(rules: list, *, hostnames: list | None = None, name: str = "tcp-echo-tls", parent: dict | None = None,
                 version: str = "v1alpha2") -> str:
    spec = {"parentRefs": [parent or {"group": "", "kind": "Service", "name": "tcp-echo", "port": 9000}],
            "rules": rules} | ({"hostnames": hostnames} if hostnames is not None else {})
    return yaml.safe_dump({"apiVersion": f"gateway.networking.k8s.io/{version}", "kind": "TLSRoute",
                           "metadata": {"name": name, "namespace": "default"}, "spec": spec})


def routes_of(*texts: str, port: int = 9000):
    mesh, tbl = table_of(*texts)
    return tbl, tbl.tcp_routes_for(mesh.inventory.services[SVC_KEY], port)


def hosts_of(routes) -> list[list[str]]:
    return [[d.host for d in r.destinations] for r in routes.rules]


# ---------------------------------------------------------------------------------------------
# VirtualService tls: parsing (Istio's validateTLSRoute / validateTLSMatch)

# istio.io VirtualService reference, "TLSRoute" example (sniHosts routed to a service), in our namespace.
ISTIO_VS_TLS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo-sni
  namespace: default
spec:
  hosts:
  - "*.bookinfo.com"
  gateways:
  - mygateway
  tls:
  - match:
    - port: 443
      sniHosts:
      - login.bookinfo.com
    route:
    - destination:
        host: login.prod.svc.cluster.local
  - match:
    - port: 443
      sniHosts:
      - reviews.bookinfo.com
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
"""


def test_istio_reference_tls_example_parses_whole_into_tls_rules():
    vs = parse_virtual_service(yaml.safe_load(ISTIO_VS_TLS), W)
    assert [type(r) for r in vs.tcp] == [TlsRule, TlsRule] and not vs.warnings
    m = vs.tcp[0].matches[0]
    assert isinstance(m, TlsMatch) and m.sni_hosts == ("login.bookinfo.com",) and m.port == 443
    assert [r.route[0].host for r in vs.tcp] == ["login.prod.svc.cluster.local", "reviews.prod.svc.cluster.local"]


def test_tls_rules_follow_the_tcp_rules_of_the_same_virtual_service():
    vs = parse_virtual_service(yaml.safe_load(vs_doc([tls_rule([SVC])], tcp=[tcp_rule()])), W)
    assert [type(r).__name__ for r in vs.tcp] == ["TcpRule", "TlsRule"]


def _vs_mutate(edit) -> dict:
    d = yaml.safe_load(vs_doc([tls_rule([SVC])]))
    edit(d["spec"]["tls"][0])
    return d


VS_CASES = [
    (lambda t: t.pop("match"), "spec.tls[0].match", "at least one match condition"),
    (lambda t: t["match"][0].pop("sniHosts"), "spec.tls[0].match[0].sniHosts", "at least one SNI host"),
    (lambda t: t["match"][0].update(sniHosts=["a.example.com"]), "spec.tls[0].match[0].sniHosts[0]",
     f"not a compatible subset of any of the virtual service hosts: [{SVC}]"),
    (lambda t: t["match"][0].update(destinationSubnets=["10.0.0.0/33"]), "spec.tls[0].match[0].destinationSubnets[0]",
     "not an IP address or CIDR range"),
    (lambda t: t["match"][0].update(port=0), "spec.tls[0].match[0].port", ""),
    (lambda t: t["match"][0].update(sni="x"), "spec.tls[0].match[0].sni", "unknown field"),
    (lambda t: t.pop("route"), "spec.tls[0].route", "at least one destination is required"),
    (lambda t: t["route"].extend([{"destination": {"host": "a"}, "weight": 0}] * 2) or t["route"][0].update(weight=0),
     "spec.tls[0].route", "total destination weight = 0"),
    (lambda t: t.update(timeout="1s"), "spec.tls[0].timeout", "unknown field"),
]


@pytest.mark.parametrize("edit,path,problem", VS_CASES)
def test_each_bad_tls_field_is_named(edit, path, problem):
    with pytest.raises(ConfigError) as e:
        parse_virtual_service(_vs_mutate(edit), W)
    assert e.value.path == path and problem in e.value.problem, e.value.message
    assert e.value.message.startswith(f"routes.yaml: document 2 (VirtualService default/tcp-echo-tls): {path}: ")


def test_sni_hosts_must_sit_within_the_virtual_service_hosts_wildcards_included():
    ok = yaml.safe_load(vs_doc([tls_rule(["a.example.com", "*.b.example.com"])], hosts=("*.example.com",)))
    assert parse_virtual_service(ok, W).tcp[0].matches[0].sni_hosts == ("a.example.com", "*.b.example.com")
    with pytest.raises(ConfigError, match="'example.org' is not a compatible subset"):
        parse_virtual_service(yaml.safe_load(vs_doc([tls_rule(["example.org"])], hosts=("*.example.com",))), W)


# ---------------------------------------------------------------------------------------------
# TLSRoute: parsing and loading


def test_tlsroute_parses_with_hostnames_weights_and_both_versions():
    for version in ("v1alpha2", "v1"):
        r = parse_tls_route(yaml.safe_load(tlsroute_doc(backends(("tcp-echo-v1", 3), ("tcp-echo-v2", 1)),
                                                        hostnames=[SVC, "*.example.com"], version=version)), W)
        assert isinstance(r, TlsRoute) and r.kind == "TLSRoute" and r.hostnames == (SVC, "*.example.com")
        assert [(b.name, b.weight) for b in r.rules[0].backend_refs] == [("tcp-echo-v1", 3), ("tcp-echo-v2", 1)]
        assert not r.warnings


def _tr_mutate(edit) -> dict:
    d = yaml.safe_load(tlsroute_doc(backends(("tcp-echo-v1", 1)), hostnames=[SVC]))
    edit(d["spec"])
    return d


TR_CASES = [
    (lambda s: s.update(hostnames=["Upper.example.com"]), "spec.hostnames[0]", "is not a hostname"),
    (lambda s: s.update(hostnames=["a..b"]), "spec.hostnames[0]", "is not a hostname"),
    (lambda s: s.update(hostnames=["a" * 254]), "spec.hostnames[0]", "is not a hostname"),
    (lambda s: s.update(hostnames=[f"h{i}.example.com" for i in range(17)]), "spec.hostnames", "at most 16"),
    (lambda s: s.pop("rules"), "spec.rules", "required"),
    (lambda s: s.update(rules=[]), "spec.rules", "at least one rule"),
    (lambda s: s["rules"][0].update(backendRefs=[]), "spec.rules[0].backendRefs", "at least one backendRef"),
    (lambda s: s["rules"][0]["backendRefs"][0].pop("port"), "spec.rules[0].backendRefs[0].port", "required"),
    (lambda s: s["rules"][0].update(matches=[]), "spec.rules[0].matches", "unknown field"),
    (lambda s: s.pop("parentRefs"), "spec.parentRefs", "at least one parentRef"),
]


@pytest.mark.parametrize("edit,path,problem", TR_CASES)
def test_each_bad_tlsroute_field_is_named(edit, path, problem):
    with pytest.raises(ConfigError) as e:
        parse_tls_route(_tr_mutate(edit), W)
    assert e.value.path == path and problem in e.value.problem, e.value.message


def test_several_rules_warn_that_only_the_first_is_used():
    r = parse_tls_route(yaml.safe_load(tlsroute_doc(backends(("tcp-echo-v1", 1)) + backends(("tcp-echo-v2", 1)))), W)
    assert len(r.rules) == 2 and "only the first of 2 rules is used" in r.warnings[0]


def test_loader_reads_tlsroute_as_its_own_route_kind_and_refuses_other_versions():
    mesh = mesh_of(tcp_echo_inventory(), tlsroute_doc(backends(("tcp-echo-v1", 1))))
    assert mesh.counts()["TLSRoute"] == 1 and mesh.counts()["TCPRoute"] == 0
    assert [r.key for r in mesh.resources("TLSRoute")] == ["default/tcp-echo-tls"] and "TLSRoute=1" in repr(mesh)
    with pytest.raises(ConfigErrors) as e:
        mesh_of(tlsroute_doc(backends(("tcp-echo-v1", 1)), version="v1beta1"))
    assert "is not a supported version of TLSRoute; use gateway.networking.k8s.io/v1alpha2 or " \
           "gateway.networking.k8s.io/v1" in e.value.message


json_values = junk_json(
    ["Service", "", "tcp-echo", SVC, "*.a.b", "mesh", "1.2.3.0/24"],
    ["match", "route", "sniHosts", "port", "destination", "host", "weight", "gateways", "destinationSubnets",
     "sourceLabels", "hostnames", "rules", "backendRefs", "name"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tls=json_values, spec=json_values)
def test_junk_only_ever_raises_config_error(tls, spec):
    vs = yaml.safe_load(vs_doc([tls_rule([SVC])]))
    vs["spec"]["tls"] = [tls] if not isinstance(tls, list) else tls
    tr = yaml.safe_load(tlsroute_doc(backends(("tcp-echo-v1", 1))))
    tr["spec"] = spec if isinstance(spec, dict) else {"rules": spec, "parentRefs": tr["spec"]["parentRefs"]}
    for parse, doc in ((parse_virtual_service, vs), (parse_tls_route, tr)):
        try:
            parse(copy.deepcopy(doc), W)
        except ConfigError:
            pass


# ---------------------------------------------------------------------------------------------
# The route table: istiod's getWaypointTCPRoutes / getTLSRouteMatch


def test_a_tls_route_naming_the_service_host_wins_over_every_tcp_route_even_an_older_one():
    older_tcp = vs_doc([], tcp=[tcp_rule("tcp-echo-v1")], name="a-tcp")
    _, routes = routes_of(older_tcp, vs_doc([tls_rule([SVC], "tcp-echo-v2")], name="b-tls"))
    assert hosts_of(routes) == [[V2]] and routes.sources == ("VirtualService default/b-tls",)
    assert route_tcp(routes, random.Random(0)).host == V2


def test_sni_hosts_other_than_exactly_the_service_host_are_skipped_with_a_warning():
    for sni in (["a.example.com"], [SVC, "a.example.com"], ["tcp-echo"]):
        hosts = ("tcp-echo", "*.example.com", SVC)
        tbl, routes = routes_of(vs_doc([tls_rule(sni, "tcp-echo-v2")], tcp=[tcp_rule("tcp-echo-v1")], hosts=hosts))
        assert hosts_of(routes) == [[V1]], sni   # the tcp route: the waypoint never reads the SNI
        assert any("is ignored at the waypoint, which does not route by SNI" in w for w in tbl.warnings)


def test_a_later_matching_tls_rule_of_another_virtual_service_still_beats_tcp():
    first = vs_doc([tls_rule(["a.example.com"], "tcp-echo-v1")], tcp=[tcp_rule("tcp-echo-v1")], name="a",
                   hosts=(SVC, "*.example.com"))
    _, routes = routes_of(first, vs_doc([tls_rule([SVC], "tcp-echo-v2")], name="b"))
    assert hosts_of(routes) == [[V2]]


@pytest.mark.parametrize("extra,applies", [
    ({"port": 9000}, True), ({"port": 9001}, False), ({"gateways": ["mesh"]}, True),
    ({"gateways": ["istio-system/ingress"]}, False), ({"sourceLabels": {"app": "x"}}, False),
    ({"sourceNamespace": "default"}, False), ({"destinationSubnets": ["10.9.9.0/24"]}, True),
])
def test_match_fields_the_waypoint_can_check_statically(extra, applies):
    _, routes = routes_of(vs_doc([tls_rule([SVC], "tcp-echo-v2", **extra)]))
    assert hosts_of(routes) == ([[V2]] if applies else []), extra
    if not applies:
        assert routes.default.host == SVC   # no route: the service itself


def test_weighted_tls_route_splits_like_a_tcp_route():
    rule = {"match": [{"sniHosts": [SVC]}], "route": [
        {"destination": {"host": "tcp-echo-v1"}, "weight": 80}, {"destination": {"host": "tcp-echo-v2"}, "weight": 20},
        {"destination": {"host": "tcp-echo"}, "weight": 0}]}
    _, routes = routes_of(vs_doc([rule]))
    rng = random.Random(5)
    got = Counter(route_tcp(routes, rng).host for _ in range(1000))
    assert set(got) == {V1, V2} and 720 <= got[V1] <= 880


def test_tlsroute_without_hostnames_applies_and_beats_an_older_tcproute():
    older = route_doc(backends(("tcp-echo-v1", 1)), name="a-tcp")
    _, routes = routes_of(older, tlsroute_doc(backends(("tcp-echo-v2", 1)), name="b-tls"))
    assert hosts_of(routes) == [[V2]] and routes.sources == ("TLSRoute default/b-tls",)


@pytest.mark.parametrize("hostnames,applies", [
    ([SVC], True),                              # exactly the Service's hostname
    ([SVC, "a.example.com"], True),             # narrowed to the one overlapping the Service (compatibleRoutesForHost)
    (["a.example.com"], False),                 # one other name: kept as it is, never equal
    ([SVC, "*.svc.cluster.local"], False),      # both overlap: two sniHosts, not exactly one
    (["*.default.svc.cluster.local"], False),   # a wildcard is not the hostname
])
def test_tlsroute_hostnames_apply_only_when_they_narrow_to_the_service_hostname(hostnames, applies):
    tbl, routes = routes_of(tlsroute_doc(backends(("tcp-echo-v2", 1)), hostnames=hostnames),
                            route_doc(backends(("tcp-echo-v1", 1)), name="z-tcp"))
    assert hosts_of(routes) == ([[V2]] if applies else [[V1]]), hostnames
    assert applies or any("the waypoint does not route by SNI" in w for w in tbl.warnings)


def test_tlsroute_port_and_gateway_parents():
    on_other_port = {"group": "", "kind": "Service", "name": "tcp-echo", "port": 9001}
    _, routes = routes_of(tlsroute_doc(backends(("tcp-echo-v2", 1)), parent=on_other_port))
    assert hosts_of(routes) == []
    gw = {"name": "waypoint", "namespace": "default"}
    _, routes = routes_of(tlsroute_doc(backends(("tcp-echo-v2", 1)), hostnames=[SVC], parent=gw))
    assert hosts_of(routes) == [[V2]]
    # A Gateway parent without hostnames gives istiod no VirtualService host, so nothing applies.
    _, routes = routes_of(tlsroute_doc(backends(("tcp-echo-v2", 1)), parent=gw))
    assert hosts_of(routes) == []


def test_tlsroute_zero_weights_reject_and_single_backend_takes_all():
    _, routes = routes_of(tlsroute_doc(backends(("tcp-echo-v1", 0), ("tcp-echo-v2", 0))))
    d = route_tcp(routes, random.Random(0))
    assert d.fail_status == 503 and d.fail_flag == "NC"
    _, routes = routes_of(tlsroute_doc(backends(("tcp-echo-v1", 0), ("tcp-echo-v2", 7))))
    assert [(d.host, d.weight) for d in routes.rules[0].destinations] == [(V2, 1)]


def test_sni_host_helpers_follow_istio():
    assert host_overlaps("a.b.c", "*.b.c") and host_overlaps("*.b.c", "*.c") and not host_overlaps("a.b.c", "*.x.c")
    assert tls_route_sni_hosts((), SVC, mesh=True) == (SVC,) and tls_route_sni_hosts((), SVC, mesh=False) == ("*",)
    assert tls_route_sni_hosts((SVC, "x.y"), SVC, mesh=True) == (SVC,)
    assert tls_route_sni_hosts(("x.y",), SVC, mesh=True) == ("x.y",)


def test_waypoint_scope_keeps_the_tls_route_backends():
    mesh = mesh_of(tcp_echo_inventory(), vs_doc([tls_rule([SVC], "tcp-echo-v2")]))
    scope = WaypointScope.parse("default", gateway="default/reviews-waypoint")
    snap = build_snapshot(mesh, mode="waypoint", scope=scope, version=1, now=0.0)
    assert f"default/{V2}" in snap.mesh.inventory.services
    svc = snap.mesh.inventory.services[SVC_KEY]
    assert [d.host for d in snap.routes.tcp_routes_for(svc, 9000).rules[0].destinations] == [V2]


# ---------------------------------------------------------------------------------------------
# End to end: TLS ClientHellos with different SNIs through a real waypoint


def client_hello(sni: str) -> bytes:
    """The first flight of a real TLS client (Python's ssl, SNI ``sni``), as it would reach the waypoint."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 0x16 and sni.encode() in hello   # a handshake record carrying the server_name
    return hello


async def start_hello_pod(ip: str, version: str, seen: list) -> Pod:
    """A pod that reads the whole connection and answers ``<version>:<sha256 of what it read>``."""
    async def answer(stream) -> bytes:
        data = await read_all(stream)
        seen.append((version, data))
        return hashlib.sha256(data).hexdigest().encode()

    return await start_answering_pod(ip, version, answer)


async def _send(client, payload: bytes) -> bytes:
    t = await client.tunnel(f"{TCP_VIP}:9000")
    try:
        return await exchange(t, payload)
    finally:
        t.close()


async def test_tls_clients_reach_the_tls_route_whatever_their_sni(tmp_path, loopback_ip):
    """An older TCPRoute sends to v1, a newer TLSRoute (no hostnames) to v2: every tunnel goes to v2, whatever
    the ClientHello's SNI (the waypoint does not read it), and the backend gets the ClientHello byte for byte."""
    v1, v2 = loopback_ip(), loopback_ip()
    config = (tcp_echo_inventory(v1, v2) + "---\n" + route_doc(backends(("tcp-echo-v1", 1)), name="a-tcp")
              + "---\n" + tlsroute_doc(backends(("tcp-echo-v2", 1)), name="b-tls"))
    h = await start_harness(tmp_path, loopback_ip, routing=None, authz=False, extra=config, rng=random.Random(1))
    seen: list = []
    try:
        h.pods[v1] = await start_hello_pod(v1, "v1", seen)
        h.pods[v2] = await start_hello_pod(v2, "v2", seen)
        client = h.client()
        hellos = {sni: client_hello(sni) for sni in ("a.example.com", "b.example.com", SVC)}
        for sni, hello in hellos.items():
            reply = await _send(client, hello)
            assert reply == b"v2:" + hashlib.sha256(hello).hexdigest().encode(), sni
        assert [v for v, _ in seen] == ["v2"] * 3 and [d for _, d in seen] == list(hellos.values())
    finally:
        await h.close()


async def test_a_virtual_service_tls_route_for_another_sni_leaves_the_tcp_route(tmp_path, loopback_ip):
    v1, v2 = loopback_ip(), loopback_ip()
    vs = vs_doc([tls_rule(["a.example.com"], "tcp-echo-v2")], tcp=[tcp_rule("tcp-echo-v1")],
                hosts=(SVC, "*.example.com"))
    h = await start_harness(tmp_path, loopback_ip, routing=None, authz=False,
                            extra=tcp_echo_inventory(v1, v2) + "---\n" + vs)
    seen: list = []
    try:
        h.pods[v1] = await start_hello_pod(v1, "v1", seen)
        h.pods[v2] = await start_hello_pod(v2, "v2", seen)
        hello = client_hello("a.example.com")
        assert (await _send(h.client(), hello)).startswith(b"v1:")   # istiod: SNI matches are not applied
        assert seen == [("v1", hello)]
    finally:
        await h.close()
