"""policy.loader: inventory documents (ztunnel local-config shape), resource dispatch, duplicates,
and the all-errors-at-once contract: ``FILE: document N (Kind ns/name): field.path: problem``."""

from __future__ import annotations

import copy
import os
from types import MappingProxyType

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.documents import load_text
from policy.errors import ConfigError, ConfigErrors, Where
from policy.inventory import ApplicationTunnel, GatewayAddress, LoadBalancer, Locality, NetworkAddress
from policy.loader import build_mesh_config
from policy.mesh import load_mesh_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BOOKINFO = os.path.join(FIXTURES, "bookinfo", "inventory.yaml")

WORKLOAD = {
    "uid": "Kubernetes//v1/Pod/default/reviews-v1-0",
    "name": "reviews-v1-0",
    "namespace": "default",
    "serviceAccount": "bookinfo-reviews",
    "workloadIps": ["127.1.0.21"],
    "protocol": "HBONE",
    "node": "node-b",
    "labels": {"app": "reviews", "version": "v1"},
    "services": {"default/reviews.default.svc.cluster.local": {9080: 9080}},
}
SERVICE = {
    "name": "reviews",
    "namespace": "default",
    "hostname": "reviews.default.svc.cluster.local",
    "vips": ["/127.2.0.20"],
    "ports": {9080: 9080},
    "appProtocols": {9080: "http"},
    "waypoint": {"destination": "/127.1.0.100", "hboneMtlsPort": 15008},
}
W = "inv.yaml: document 1 (Workload default/reviews-v1-0): workloads[0]"
S = "inv.yaml: document 1 (Service default/reviews): services[0]"


def build(*docs: dict):
    return build_mesh_config([(Where("inv.yaml", i + 1), d) for i, d in enumerate(docs)])


def errors(*docs: dict) -> list[str]:
    with pytest.raises(ConfigErrors) as e:
        build(*docs)
    return e.value.message.splitlines()


def with_field(base: dict, path: str, value) -> dict:
    """A deep copy of base with base[path] set (``a.b``; value DELETE removes it)."""
    out = copy.deepcopy(base)
    *parents, last = path.split(".")
    target = out
    for p in parents:
        target = target.setdefault(p, {})
    if value is DELETE:
        target.pop(last, None)
    else:
        target[last] = value
    return out


DELETE = object()


def test_bookinfo_fixture_loads_with_defaults():
    mesh = load_mesh_config([BOOKINFO])
    inv = mesh.inventory
    assert mesh.warnings == ()
    assert len(inv.workloads) == 7 and len(inv.services) == 8
    reviews = inv.service_by_hostname["reviews.default.svc.cluster.local"]
    assert reviews.vips == (NetworkAddress("", "127.2.0.20"),)
    assert reviews.app_protocols == {9080: "http"}
    assert reviews.waypoint == GatewayAddress(hostname="reviews-waypoint.default.svc.cluster.local", namespace="default")
    eps = inv.endpoints_of(reviews)
    assert [(w.name, w.labels["version"], dict(ep.ports)) for w, ep in eps] == [
        ("reviews-v1-0", "v1", {9080: 9080}), ("reviews-v2-0", "v2", {9080: 9080}), ("reviews-v3-0", "v3", {9080: 9080})]
    v1 = inv.workload_by_ip["127.1.0.21"]
    # istiod's XDS defaults (ztunnel's file leaves them empty): trust domain cluster.local
    assert v1.identity == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    details = inv.workload_by_ip["127.1.0.40"]
    assert details.protocol == "TCP" and details.capacity == 1 and details.status == "Healthy"


def test_minimal_workload_defaults():
    mesh = build({"workloads": [{"name": "a", "namespace": "ns1", "workloadIps": ["10.0.0.1"]}]})
    (w,) = mesh.inventory.workloads.values()
    assert w.uid == "Kubernetes//v1/Pod/ns1/a"   # derived: ztunnel's uid shape
    assert w.service_account == "default" and w.trust_domain == "cluster.local"
    assert w.protocol == "TCP" and w.capacity == 1 and w.status == "Healthy"
    assert w.network_mode == "Standard" and w.waypoint is None and w.labels == {}


def test_every_ztunnel_workload_field_is_read():
    item = dict(WORKLOAD, trustDomain="td.example", network="net1", networkMode="HostNetwork",
                waypoint={"destination": "default/wp.default.svc.cluster.local"},
                networkGateway={"destination": "net1/10.9.9.9", "hboneMtlsPort": 15009},
                workloadName="reviews-v1", workloadType="deployment", canonicalName="reviews",
                canonicalRevision="v1", hostname="", nativeTunnel=True,
                applicationTunnel={"protocol": "PROXY", "port": 15088},
                authorizationPolicies=["default/p"], status="Unhealthy", clusterId="c1",
                locality={"region": "r", "zone": "z", "subzone": "s"}, capacity=3)
    item["workloadIps"] = ["127.1.0.21", "::1"]
    mesh = build({"workloads": [item]})
    w = mesh.inventory.workloads[item["uid"]]
    assert w.trust_domain == "td.example" and w.network == "net1" and w.network_mode == "HostNetwork"
    assert w.waypoint == GatewayAddress(hostname="wp.default.svc.cluster.local", namespace="default")
    assert w.network_gateway == GatewayAddress(address=NetworkAddress("net1", "10.9.9.9"), hbone_mtls_port=15009)
    assert (w.workload_name, w.workload_type, w.canonical_name, w.canonical_revision) == ("reviews-v1", "deployment", "reviews", "v1")
    assert w.native_tunnel is True and w.application_tunnel == ApplicationTunnel("PROXY", 15088)
    assert w.authorization_policies == ("default/p",) and w.status == "Unhealthy" and not w.healthy
    assert w.cluster_id == "c1" and w.locality == Locality("r", "z", "s") and w.capacity == 3
    assert w.workload_ips == ("127.1.0.21", "::1")
    assert w.services == {"default/reviews.default.svc.cluster.local": {9080: 9080}}
    # unknown policy key: ztunnel skips it with a warning
    assert mesh.warnings == (
        f"{W}.services['default/reviews.default.svc.cluster.local']: no such service; endpoint unused",
        f"{W}.authorizationPolicies[0]: no policy 'default/p' is loaded; ignored",
    )


def test_every_ztunnel_service_field_is_read():
    item = dict(SERVICE, subjectAltNames=["spiffe://cluster.local/ns/default/sa/reviews"], canonical=True,
                cidrVips=[{"network": "", "cidr": "10.0.0.0/24"}],
                weightedWaypoints=[{"destination": {"destination": "/10.0.0.3", "hboneMtlsPort": 15008}, "weight": 90}],
                loadBalancer={"routingPreferences": ["Network", "Zone"], "mode": "Failover", "healthPolicy": "AllowAll"},
                ipFamilies="IPv4", visibility="Namespace",
                endpoints={WORKLOAD["uid"]: {"workloadUid": WORKLOAD["uid"], "port": {9080: 9081}, "status": "Healthy"}})
    mesh = build({"workloads": [WORKLOAD], "services": [item]})
    s = mesh.inventory.services["default/reviews.default.svc.cluster.local"]
    assert s.subject_alt_names == ("spiffe://cluster.local/ns/default/sa/reviews",) and s.canonical
    assert s.cidr_vips[0].cidr == "10.0.0.0/24"
    assert s.weighted_waypoints[0].weight == 90 and s.weighted_waypoints[0].destination.address.ip == "10.0.0.3"
    assert s.load_balancer == LoadBalancer(("Network", "Zone"), "Failover", "AllowAll")
    assert s.ip_families == "IPv4" and s.visibility == "Namespace"
    assert s.waypoint.address == NetworkAddress("", "127.1.0.100") and s.waypoint.hbone_mtls_port == 15008
    assert dict(s.endpoints[WORKLOAD["uid"]].ports) == {9080: 9081}


def test_json_style_string_port_keys_are_ports():
    item = dict(SERVICE, ports={"9080": 9080}, appProtocols={"9080": "http"})
    s = build({"services": [item]}).inventory.services["default/reviews.default.svc.cluster.local"]
    assert s.ports == {9080: 9080} and s.app_protocols == {9080: "http"}


def test_target_port_zero_means_named_port():
    item = dict(SERVICE, ports={9080: 0})
    s = build({"services": [item]}).inventory.services["default/reviews.default.svc.cluster.local"]
    assert s.ports == MappingProxyType({9080: 0})


# (field path, value, expected "path: problem" suffix). Every field's validation error names the
# file, the document, the resource and the field path.
WORKLOAD_ERRORS = [
    ("namespace", DELETE, "namespace: required field is missing"),
    ("namespace", "Default", "namespace: 'Default' is not a valid namespace (lower-case RFC 1123 label, e.g. 'default')"),
    ("namespace", 7, "namespace: expected a string, got a number (7)"),
    ("workloadIps", DELETE, "workloadIps: required field is missing"),
    ("workloadIps", [], "workloadIps: needs at least one IP (or set hostname)"),
    ("workloadIps", "127.0.0.1", "workloadIps: expected a list, got a string ('127.0.0.1')"),
    ("workloadIps", ["127.0.0.1", "127.0.0.256"], "workloadIps[1]: '127.0.0.256' is not an IP address"),
    ("uid", "", "uid: must not be empty"),
    ("name", ["x"], "name: expected a string, got a list"),
    ("serviceAccount", "", "serviceAccount: must not be empty"),
    ("trustDomain", 1, "trustDomain: expected a string, got a number (1)"),
    ("protocol", "HTTP", "protocol: expected one of TCP, HBONE, got a string ('HTTP')"),
    ("status", "Ready", "status: expected one of Healthy, Unhealthy, got a string ('Ready')"),
    ("networkMode", "Host", "networkMode: expected one of Standard, HostNetwork, got a string ('Host')"),
    ("capacity", -1, "capacity: -1 is out of range (a non-negative integer 0–4294967295)"),
    ("capacity", 2**32, "capacity: 4294967296 is out of range (a non-negative integer 0–4294967295)"),
    ("capacity", True, "capacity: expected a non-negative integer, got a boolean"),
    ("nativeTunnel", "yes", "nativeTunnel: expected true or false, got a string ('yes')"),
    ("node", None, None),  # null means default
    ("labels", ["app"], "labels: expected a map of label: value, got a list"),
    ("labels", {"version": 1}, "labels.version: label values must be strings (quote it), got a number (1)"),
    ("labels", {"canary": True}, "labels.canary: label values must be strings (quote it), got a boolean"),
    ("labels", {"bad key!": "x"}, "labels['bad key!']: 'bad key!' is not a valid label key"),
    ("labels", {"app": "has space"}, "labels.app: 'has space' is not a valid label value (≤ 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends)"),
    ("waypoint", {"destination": "127.1.0.100"},
     "waypoint.destination: expected '/<ip>', '<network>/<ip>' or '<namespace>/<hostname>', got '127.1.0.100'"),
    ("waypoint", {"destination": "/not_an ip"},
     "waypoint.destination: 'not_an ip' is not a valid hostname (expected '/<ip>' or '<namespace>/<hostname>')"),
    ("waypoint", {"destination": "/127.1.0.100", "hboneMtlsPort": 0},
     "waypoint.hboneMtlsPort: 0 is out of range (a port 1–65535)"),
    ("waypoint", {"destination": "/127.1.0.100", "port": 15008},
     "waypoint.port: unknown field; known fields: destination, hboneMtlsPort"),
    ("waypoint", {"hboneMtlsPort": 15008}, "waypoint.destination: required field is missing"),
    ("waypoint", "/127.1.0.100", "waypoint: expected a mapping, got a string ('/127.1.0.100')"),
    ("networkGateway", {"destination": "x"},
     "networkGateway.destination: expected '/<ip>', '<network>/<ip>' or '<namespace>/<hostname>', got 'x'"),
    ("applicationTunnel", {"protocol": "HTTP"}, "applicationTunnel.protocol: expected one of NONE, PROXY, got a string ('HTTP')"),
    ("applicationTunnel", {"protocol": "PROXY", "port": 70000}, "applicationTunnel.port: 70000 is out of range (a port 1–65535)"),
    ("locality", {"region": "r", "zone": "z"}, "locality.subzone: required field is missing"),
    ("authorizationPolicies", ["nopolicy"], "authorizationPolicies[0]: expected '<namespace>/<name>', got 'nopolicy'"),
    ("services", {"reviews": {9080: 9080}}, "services.reviews: expected a key '<namespace>/<hostname>', got a string ('reviews')"),
    ("services", {"default/reviews.default.svc.cluster.local": {9080: 0}},
     "services['default/reviews.default.svc.cluster.local'].9080: 0 is out of range (a port 1–65535)"),
    ("services", {"default/reviews.default.svc.cluster.local": {70000: 80}},
     "services['default/reviews.default.svc.cluster.local'].70000: 70000 is out of range (a port 1–65535)"),
    ("services", {"default/reviews.default.svc.cluster.local": [9080]},
     "services['default/reviews.default.svc.cluster.local']: expected a map of port: port, got a list"),
    ("workloadIP", ["1.2.3.4"], "workloadIP: unknown field (did you mean 'workloadIps'?); known fields: "),
]


def _one_error(doc: dict, head: str, field: str) -> None:
    """``doc`` gets exactly one error: its resource part starts with ``head``, its field part with ``field``."""
    lines = errors(doc)
    assert len(lines) == 1, lines
    got_head, _, rest = lines[0].partition("): ")
    assert got_head.startswith(head)
    assert rest.startswith(field), lines[0]


@pytest.mark.parametrize("path, value, expected", [r for r in WORKLOAD_ERRORS if r[2] is not None],
                         ids=[f"{r[0]}={r[1]!r}"[:60] for r in WORKLOAD_ERRORS if r[2] is not None])
def test_workload_field_errors_name_file_document_resource_and_path(path, value, expected):
    _one_error({"workloads": [with_field(WORKLOAD, path, value)]}, "inv.yaml: document 1 (Workload ",
               f"workloads[0].{expected}")


def test_null_optional_field_is_its_default():
    w = build({"workloads": [with_field(WORKLOAD, "node", None)]}).inventory.workloads[WORKLOAD["uid"]]
    assert w.node == ""


SERVICE_ERRORS = [
    ("name", DELETE, "name: required field is missing"),
    ("name", "Reviews", "name: 'Reviews' is not a valid name (lower-case RFC 1123 label)"),
    ("hostname", DELETE, "hostname: required field is missing"),
    ("hostname", "bad host", "hostname: 'bad host' is not a valid hostname"),
    ("vips", DELETE, "vips: required field is missing"),
    ("vips", ["127.2.0.20"], "vips[0]: expected '<network>/<ip>', got '127.2.0.20' (write '/127.2.0.20' for the default network)"),
    ("vips", ["/127.2.0"], "vips[0]: '127.2.0' is not an IP address"),
    ("ports", DELETE, "ports: required field is missing"),
    ("ports", {0: 9080}, "ports.0: 0 is out of range (a port 1–65535)"),
    ("ports", {9080: 65536}, "ports.9080: 65536 is out of range (a target port (0 = named port) 0–65535)"),
    ("ports", {9080: "http"}, "ports.9080: expected a target port (0 = named port), got a string ('http')"),
    ("ports", [9080], "ports: expected a map of port: port, got a list"),
    ("appProtocols", {9080: "https"}, "appProtocols.9080: expected one of http, http2, grpc, tcp, got a string ('https')"),
    ("appProtocols", {8080: "http"}, "appProtocols.8080: port 8080 is not one of the service's ports [9080]"),
    ("subjectAltNames", "spiffe://x", "subjectAltNames: expected a list, got a string ('spiffe://x')"),
    ("subjectAltNames", [""], "subjectAltNames[0]: must not be empty"),
    ("canonical", "true", "canonical: expected true or false, got a string ('true')"),
    ("visibility", "Private", "visibility: expected one of Public, Namespace, got a string ('Private')"),
    ("ipFamilies", "Both", "ipFamilies: expected one of Dual, IPv4, IPv6, got a string ('Both')"),
    ("cidrVips", [{"network": "", "cidr": "10.0.0.0/33"}], "cidrVips[0].cidr: '10.0.0.0/33' is not a CIDR (e.g. 10.0.0.0/8)"),
    ("weightedWaypoints", [{"destination": {"destination": "/10.0.0.3"}}], "weightedWaypoints[0].weight: required field is missing"),
    ("weightedWaypoints", [{"destination": {"destination": "/10.0.0.3"}, "weight": -5}],
     "weightedWaypoints[0].weight: -5 is out of range (a non-negative integer 0–4294967295)"),
    ("loadBalancer", {"routingPreferences": ["Zone"], "mode": "Failover"}, "loadBalancer.healthPolicy: required field is missing"),
    ("loadBalancer", {"routingPreferences": ["Rack"], "mode": "Failover", "healthPolicy": "AllowAll"},
     "loadBalancer.routingPreferences[0]: expected one of Region, Zone, Subzone, Node, Cluster, Network, got a string ('Rack')"),
    ("endpoints", {"u1": {"workloadUid": "u1", "port": {9080: 9080}}}, "endpoints.u1.status: required field is missing"),
    ("endpoints", {"u1": {"workloadUid": "u2", "port": {9080: 9080}, "status": "Healthy"}},
     "endpoints.u1.workloadUid: 'u2' differs from the key 'u1'"),
    ("endpoints", {"u1": []}, "endpoints.u1: expected a mapping, got a list"),
    ("waypoint", {"destination": "default/"}, "waypoint.destination: expected '/<ip>', '<network>/<ip>' or '<namespace>/<hostname>', got 'default/'"),
    ("exportTo", ["*"], "exportTo: unknown field; known fields: "),
]


@pytest.mark.parametrize("path, value, expected", SERVICE_ERRORS, ids=[f"{r[0]}={r[1]!r}"[:60] for r in SERVICE_ERRORS])
def test_service_field_errors_name_file_document_resource_and_path(path, value, expected):
    _one_error({"services": [with_field(SERVICE, path, value)]}, "inv.yaml: document 1 (Service default/",
               f"services[0].{expected}")


def test_all_field_errors_of_all_items_are_reported_at_once():
    bad_w = dict(WORKLOAD, protocol="QUIC", capacity=-1)
    bad_s = dict(SERVICE, vips=["nope"], ports={9080: -1})
    lines = errors({"workloads": [WORKLOAD, bad_w], "services": [bad_s]}, {"workloads": "x"})
    w1 = "inv.yaml: document 1 (Workload default/reviews-v1-0): workloads[1]"
    assert lines == [
        f"{w1}.protocol: expected one of TCP, HBONE, got a string ('QUIC')",
        f"{w1}.capacity: -1 is out of range (a non-negative integer 0–4294967295)",
        f"{S}.vips[0]: expected '<network>/<ip>', got 'nope' (write '/nope' for the default network)",
        f"{S}.ports.9080: -1 is out of range (a target port (0 = named port) 0–65535)",
        "inv.yaml: document 2: workloads: expected a list, got a string ('x')",
    ]


def test_top_level_unknown_key_and_item_not_a_mapping():
    lines = errors({"workloads": ["reviews"], "service": []})
    assert lines == [
        "inv.yaml: document 1: service: unknown field (did you mean 'services'?); known fields: workloads, services, policies",
        "inv.yaml: document 1 (Workload): workloads[0]: expected a mapping, got a string ('reviews')",
    ]


def test_document_that_is_neither_inventory_nor_resource():
    assert errors({"spec": {}, "metadata": {}}) == [
        "inv.yaml: document 1: neither an inventory (workloads:, services:, policies:) nor a Kubernetes resource "
        "(apiVersion:, kind:); top-level keys: 'spec', 'metadata'"]


def test_empty_mapping_is_an_empty_inventory():
    assert build({}).counts()["Workload"] == 0


@pytest.mark.parametrize("second, expected", [
    (dict(WORKLOAD, name="other", workloadIps=["127.1.0.99"]), "workloads[1].uid: duplicate workload uid 'Kubernetes//v1/Pod/default/reviews-v1-0'"),
    (dict(WORKLOAD, uid="u2", name="other"), "workloads[1].workloadIps[0]: duplicate workload IP 127.1.0.21 (network '')"),
])
def test_duplicate_workloads(second, expected):
    lines = errors({"workloads": [WORKLOAD, second]})
    assert len(lines) == 1
    assert expected in lines[0]
    assert "(first defined at inv.yaml: document 1 (Workload default/reviews-v1-0): workloads[0]" in lines[0]


def test_same_ip_on_different_networks_is_fine():
    other = dict(WORKLOAD, uid="u2", name="other", network="net2")
    assert len(build({"workloads": [WORKLOAD, other]}).inventory.workloads) == 2


def test_duplicate_services_across_documents():
    lines = errors({"services": [SERVICE]}, {"services": [dict(SERVICE, vips=["/127.2.0.99"])]})
    assert lines == [
        "inv.yaml: document 2 (Service default/reviews): services[0].hostname: duplicate service "
        "default/reviews.default.svc.cluster.local (first defined at inv.yaml: document 1 (Service default/reviews): services[0])"]
    lines = errors({"services": [SERVICE, dict(SERVICE, name="other", hostname="other.default.svc.cluster.local")]})
    assert lines == [
        "inv.yaml: document 1 (Service default/other): services[1].vips[0]: duplicate service VIP /127.2.0.20 "
        "(first defined at inv.yaml: document 1 (Service default/reviews): services[0])"]


def test_cross_reference_warnings():
    svc = dict(SERVICE, endpoints={"ghost": {"workloadUid": "ghost", "port": {9080: 9080}, "status": "Healthy"}})
    w = with_field(WORKLOAD, "services", {"default/reviews.default.svc.cluster.local": {9081: 9081}})
    mesh = build({"workloads": [w], "services": [svc]})
    assert mesh.warnings == (
        f"{W}.services['default/reviews.default.svc.cluster.local']: port(s) [9081] are not ports of service "
        "default/reviews.default.svc.cluster.local",
        f"{S}.endpoints.ghost: no workload has this uid; endpoint unused",
    )


# --- resources -------------------------------------------------------------------------------

def resource(api: str, kind: str, name: str = "x", ns: str = "default", spec=None) -> dict:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec or {}}


def test_unknown_kind_says_which_kinds_are_supported():
    (line,) = errors(resource("apps/v1", "Deployment", "productpage"))
    assert line.startswith("inv.yaml: document 1 (Deployment default/productpage): kind: unsupported resource apps/v1 "
                           "Deployment; supported: security.istio.io/v1|v1beta1 AuthorizationPolicy, "
                           "networking.istio.io/v1|v1beta1|v1alpha3 VirtualService")
    assert "gateway.networking.k8s.io/v1|v1beta1 HTTPRoute" in line


def test_unsupported_version_of_a_known_kind():
    (line,) = errors(resource("security.istio.io/v2", "AuthorizationPolicy"))
    assert line == ("inv.yaml: document 1 (AuthorizationPolicy default/x): apiVersion: 'security.istio.io/v2' is not a "
                    "supported version of AuthorizationPolicy; use security.istio.io/v1 or security.istio.io/v1beta1")


def test_resource_without_apiversion():
    (line,) = errors({"kind": "AuthorizationPolicy", "metadata": {"name": "x"}})
    assert line.startswith("inv.yaml: document 1 (AuthorizationPolicy default/x): apiVersion: required string field")


ALLOW_PRODUCTPAGE = resource("security.istio.io/v1", "AuthorizationPolicy", "allow", spec={
    "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
    "action": "ALLOW",
    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]}],
})


def test_authorization_policy_is_dispatched_to_the_authz_parser():
    pytest.importorskip("policy.authz.parse")
    mesh = build(ALLOW_PRODUCTPAGE, with_field(ALLOW_PRODUCTPAGE, "apiVersion", "security.istio.io/v1beta1") | {
        "metadata": {"name": "allow2", "namespace": "default"}})
    assert [(p.namespace, p.name, p.action) for p in mesh.authorization_policies] == [
        ("default", "allow", "ALLOW"), ("default", "allow2", "ALLOW")]
    assert mesh.counts()["AuthorizationPolicy"] == 2


def test_authorization_policy_errors_come_through_with_document_and_path():
    pytest.importorskip("policy.authz.parse")
    bad = with_field(ALLOW_PRODUCTPAGE, "spec.action", "allow")
    bad2 = with_field(ALLOW_PRODUCTPAGE, "spec.rulez", [])
    lines = errors(WORKLOAD and {"workloads": [WORKLOAD]}, bad, bad2)
    assert lines[0].startswith("inv.yaml: document 2 (AuthorizationPolicy default/allow): spec.action: ")
    assert lines[1].startswith("inv.yaml: document 3 (AuthorizationPolicy default/allow): spec.rulez: ")
    assert len(lines) == 2


def test_duplicate_resources():
    pytest.importorskip("policy.authz.parse")
    (line,) = errors(ALLOW_PRODUCTPAGE, ALLOW_PRODUCTPAGE)
    assert line == ("inv.yaml: document 2 (AuthorizationPolicy default/allow): metadata.name: duplicate AuthorizationPolicy "
                    "default/allow (first defined at inv.yaml: document 1 (AuthorizationPolicy default/allow))")


def test_ztunnel_policies_in_inventory():
    pytest.importorskip("policy.authz.parse")
    doc = yaml.safe_load(open(os.path.join(FIXTURES, "shop", "inventory.yaml")))
    mesh = build(doc)
    (p,) = mesh.authorization_policies
    assert (p.namespace, p.name, p.action, p.origin) == ("shop", "shop-deny-9999", "DENY", "ztunnel")
    bad = copy.deepcopy(doc)
    del bad["policies"][0]["dryRun"]
    (line,) = errors(bad)
    assert line == "inv.yaml: document 1 (AuthorizationPolicy shop/shop-deny-9999): policies[0].dryRun: required field missing"


def test_list_items_are_dispatched_and_errors_name_the_item(tmp_path):
    pytest.importorskip("policy.authz.parse")
    lst = {"apiVersion": "v1", "kind": "List", "items": [ALLOW_PRODUCTPAGE, with_field(ALLOW_PRODUCTPAGE, "spec.action", "NOPE")]}
    f = tmp_path / "list.yaml"
    f.write_text(yaml.safe_dump({"workloads": []}) + "---\n" + yaml.safe_dump(lst))
    with pytest.raises(ConfigErrors) as e:
        load_mesh_config([str(f)])
    (line,) = e.value.message.splitlines()
    assert line.startswith(f"{f}: document 2 (List item 1: AuthorizationPolicy default/allow): spec.action: ")


def test_errors_are_collected_across_files(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump({"workloads": [dict(WORKLOAD, protocol="X")]}))
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump({"services": [dict(SERVICE, visibility="Everyone")]}) + "---\n" + yaml.safe_dump(resource("v1", "Pod")))
    with pytest.raises(ConfigErrors) as e:
        load_mesh_config([str(a), str(b)])
    lines = e.value.message.splitlines()
    assert lines[0].startswith(f"{a}: document 1 (Workload default/reviews-v1-0): workloads[0].protocol: ")
    assert lines[1].startswith(f"{b}: document 1 (Service default/reviews): services[0].visibility: ")
    assert lines[2].startswith(f"{b}: document 2 (Pod default/x): kind: unsupported resource v1 Pod")
    assert len(lines) == 3


def test_mesh_config_repr_and_counts():
    pytest.importorskip("policy.authz.parse")
    mesh = load_mesh_config([BOOKINFO, os.path.join(FIXTURES, "bookinfo", "authz.yaml"),
                             os.path.join(FIXTURES, "shop", "inventory.yaml")])
    assert repr(mesh) == "<MeshConfig Workload=11 Service=10 AuthorizationPolicy=3>"
    assert mesh.counts_by_namespace() == {
        "default": {"Workload": 7, "Service": 8, "AuthorizationPolicy": 2},
        "shop": {"Workload": 4, "Service": 2, "AuthorizationPolicy": 1},
    }
    assert mesh.sources[0] == BOOKINFO


# --- hypothesis: random documents only ever raise ConfigError -----------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 70000), st.sampled_from(
    ["", "default", "127.0.0.1", "/127.0.0.1", "default/x.default.svc.cluster.local", "TCP", "HBONE", "Healthy",
     "http", "x/y", "::1", "10.0.0.0/8", "PROXY", "Region"]))
KEYS = st.sampled_from(sorted({"uid", "name", "namespace", "workloadIps", "protocol", "waypoint", "services",
                               "labels", "capacity", "status", "locality", "hostname", "vips", "ports",
                               "appProtocols", "endpoints", "destination", "hboneMtlsPort", "weight",
                               "workloadUid", "port", "loadBalancer", "applicationTunnel"} | {9080, 0}, key=str))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["workloads", "services"]),
                       st.lists(st.dictionaries(KEYS, VALUES, max_size=8), max_size=3), max_size=2))
def test_random_inventory_documents_only_raise_config_error(doc):
    try:
        build(doc)
    except ConfigError as e:
        for line in e.message.splitlines():
            assert line.startswith("inv.yaml: document 1")
            assert "internal error" not in line


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "spec", "items"]), VALUES, max_size=5))
def test_random_resource_documents_only_raise_config_error(doc):
    try:
        build(doc)
    except ConfigError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 4000), st.integers(1, 40), st.text(max_size=20))
def test_mutated_fixture_text_only_raises_config_error(pos, length, junk):
    text = open(BOOKINFO).read()
    mutated = text[:pos] + junk + text[pos + length:]
    try:
        docs = load_text(mutated, "inv.yaml")
        build_mesh_config(docs)
    except ConfigError as e:
        assert "internal error" not in e.message
