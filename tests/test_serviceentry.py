"""Istio ServiceEntry / WorkloadEntry: the parsers on istio.io's own examples, the conversion into inventory
services and workloads (istiod's ambient index: services.go constructServiceEntries, workloads.go
serviceEntryWorkloadBuilder / workloadEntryWorkloadBuilder), every field error named, only ConfigError on junk,
and a connection through real proxies on loopback to a STATIC endpoint by the ServiceEntry's VIP — straight
from the node proxy, and through the waypoint the entry names with ``istio.io/use-waypoint``."""

from __future__ import annotations

import copy
import socket

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from policy.errors import ConfigError, ConfigErrors, Where
from policy.inventory import CidrVip, GatewayAddress, LoadBalancer, Locality, NetworkAddress
from policy.loader import build_mesh_config
from policy.serviceentry import parse_service_entry, parse_workload_entry
from proxy.errors import NoHealthyUpstream
from tests.mutation_helpers import mutate

W = Where("entries.yaml", 1)

# istio.io reference docs, networking/service-entry: "external HTTPS services" (TLS, DNS, several hosts).
EXTERNAL_HTTPS = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc-https
spec:
  hosts:
  - api.dropboxapi.com
  - www.googleapis.com
  - api.facebook.com
  location: MESH_EXTERNAL
  ports:
  - number: 443
    name: https
    protocol: TLS
  resolution: DNS
"""
# ... "a MongoDB cluster" with STATIC endpoints behind a VIP range.
MONGO_STATIC = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc-mongocluster
spec:
  hosts:
  - mymongodb.somedomain # not used
  addresses:
  - 192.192.192.192/24 # VIPs
  ports:
  - number: 27018
    name: mongodb
    protocol: MONGO
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 2.2.2.2
  - address: 3.3.3.3
"""
# ... networking/workload-entry: "details-legacy" on a VM, selected by a ServiceEntry's workloadSelector.
VM_WORKLOAD_ENTRY = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: details-svc
spec:
  serviceAccount: details-legacy
  address: 2.2.2.2
  labels:
    app: details-legacy
    instance-id: vm1
"""
VM_SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: details-svc
spec:
  hosts:
  - details.bookinfo.com
  location: MESH_INTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
    targetPort: 8080
  resolution: STATIC
  workloadSelector:
    labels:
      app: details-legacy
"""
# ... "external services with DNS endpoints" (endpoint ports by port name, locality).
DNS_ENDPOINTS = """
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-svc-dns
spec:
  hosts:
  - foo.bar.com
  location: MESH_EXTERNAL
  ports:
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
  endpoints:
  - address: us.foo.bar.com
    ports:
      https: 8443
  - address: uk.foo.bar.com
    ports:
      https: 9443
"""
# istio.io docs/ambient (egress through a waypoint): the ServiceEntry names the waypoint by label.
EGRESS_WAYPOINT = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin.org
  namespace: egress
  labels:
    istio.io/use-waypoint: waypoint
spec:
  hosts:
  - httpbin.org
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
"""


def load(*texts: str, inventory: str = ""):
    docs = [d for t in (*texts, inventory) if t for d in yaml.safe_load_all(t)]
    return build_mesh_config([(Where("entries.yaml", i + 1), d) for i, d in enumerate(docs)])


def doc(text: str) -> dict:
    return yaml.safe_load(text)


# ---------------------------------------------------------------------------------------------
# Parsers, on the docs' examples


def test_parse_external_https_example():
    se = parse_service_entry(doc(EXTERNAL_HTTPS), W)
    assert (se.namespace, se.name) == ("default", "external-svc-https")
    assert se.hosts == ("api.dropboxapi.com", "www.googleapis.com", "api.facebook.com")
    assert se.resolution == "DNS" and se.location == "MESH_EXTERNAL"
    assert [(p.number, p.name, p.protocol, p.target_port) for p in se.ports] == [(443, "https", "TLS", 0)]
    assert se.endpoints == () and se.workload_selector is None


def test_parse_static_mongo_example():
    se = parse_service_entry(doc(MONGO_STATIC), W)
    assert se.addresses == ("192.192.192.0/24",)          # masked, as istiod's parseCidrOrIP
    assert [e.address for e in se.endpoints] == ["2.2.2.2", "3.3.3.3"]
    assert se.resolution == "STATIC" and se.location == "MESH_INTERNAL"


def test_parse_vm_workload_entry_and_selector():
    we = parse_workload_entry(doc(VM_WORKLOAD_ENTRY), W)
    assert (we.namespace, we.name, we.spec.address, we.spec.service_account) == (
        "default", "details-svc", "2.2.2.2", "details-legacy")
    assert dict(we.labels) == {"app": "details-legacy", "instance-id": "vm1"}
    se = parse_service_entry(doc(VM_SERVICE_ENTRY), W)
    assert dict(se.workload_selector) == {"app": "details-legacy"}
    assert se.ports[0].target_port == 8080


def test_parse_dns_endpoints_keep_hostnames_and_port_names():
    se = parse_service_entry(doc(DNS_ENDPOINTS), W)
    assert [(e.address, dict(e.ports)) for e in se.endpoints] == [("us.foo.bar.com", {"https": 8443}),
                                                                   ("uk.foo.bar.com", {"https": 9443})]


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_every_api_version_loads(version):
    text = MONGO_STATIC.replace("networking.istio.io/v1", f"networking.istio.io/{version}")
    assert load(text).counts()["ServiceEntry"] == 1


# ---------------------------------------------------------------------------------------------
# Conversion: the Service / Workload fields


def test_static_endpoints_become_tcp_workloads_backing_the_service():
    mesh = load(MONGO_STATIC.replace("192.192.192.192/24", "10.9.0.1"))
    svc = mesh.inventory.services["default/mymongodb.somedomain"]
    assert (svc.name, svc.vips, dict(svc.ports), dict(svc.app_protocols)) == (
        "external-svc-mongocluster", (NetworkAddress("", "10.9.0.1"),), {27018: 27018}, {27018: "tcp"})
    assert svc.canonical and svc.load_balancer is None
    assert mesh.inventory.service_by_vip["10.9.0.1"] is svc
    eps = mesh.inventory.endpoints_of(svc)
    # workloads.go generateServiceEntryUID: <cluster>/networking.istio.io/ServiceEntry/<ns>/<name>/<address>
    assert [w.uid for w, _ in eps] == [
        "Kubernetes/networking.istio.io/ServiceEntry/default/external-svc-mongocluster/2.2.2.2",
        "Kubernetes/networking.istio.io/ServiceEntry/default/external-svc-mongocluster/3.3.3.3"]
    w, ep = eps[0]
    assert (w.name, w.workload_ips, w.protocol, w.service_account, w.status, w.workload_name) == (
        "external-svc-mongocluster", ("2.2.2.2",), "TCP", "default", "Healthy", "external-svc-mongocluster")
    assert dict(ep.ports) == {27018: 27018}
    assert mesh.counts()["Workload"] == 2 and mesh.counts()["Service"] == 1


def test_cidr_addresses_are_cidr_vips():
    svc = load(MONGO_STATIC).inventory.services["default/mymongodb.somedomain"]
    assert svc.vips == () and svc.cidr_vips == (CidrVip("", "192.192.192.0/24"),)


def test_endpoint_fields_and_port_names():
    text = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: shop, labels: {app: vms, version: v7}}
spec:
  hosts: [vms.example.com]
  addresses: [10.8.0.1]
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 8080}
  - {number: 81, name: grpc, protocol: GRPC}
  - {number: 82, name: raw}
  resolution: STATIC
  subjectAltNames: ["spiffe://cluster.local/ns/shop/sa/vm"]
  endpoints:
  - address: 10.8.1.1
    ports: {http: 9090}
    labels: {zone: a}
    network: net-2
    locality: us-east/zone-a/rack-1
    weight: 7
    serviceAccount: vm
"""
    mesh = load(text)
    svc = mesh.inventory.services["shop/vms.example.com"]
    assert dict(svc.ports) == {80: 8080, 81: 81, 82: 82}          # targetPort defaults to the port number
    assert dict(svc.app_protocols) == {80: "http", 81: "grpc"}    # no protocol: sniffed
    assert svc.subject_alt_names == ("spiffe://cluster.local/ns/shop/sa/vm",)
    (w, ep), = mesh.inventory.endpoints_of(svc)
    assert dict(ep.ports) == {80: 9090, 81: 81, 82: 82}           # the endpoint's ports[<name>] wins
    assert (w.network, w.locality, w.capacity, w.service_account, w.identity) == (
        "net-2", Locality("us-east", "zone-a", "rack-1"), 7, "vm", "spiffe://cluster.local/ns/shop/sa/vm")
    assert dict(w.labels) == {"zone": "a"}
    # kubelabels.CanonicalService from the ServiceEntry's labels
    assert (w.canonical_name, w.canonical_revision) == ("vms", "v7")


def test_redirection_annotation_or_tunnel_label_makes_endpoints_hbone():
    base = MONGO_STATIC.replace("name: external-svc-mongocluster", "name: m\n  annotations: "
                                "{ambient.istio.io/redirection: enabled}")
    w = next(iter(load(base).inventory.workloads.values()))
    assert (w.protocol, w.native_tunnel) == ("HBONE", False)
    tunnel = MONGO_STATIC.replace("name: external-svc-mongocluster", "name: m\n  labels: "
                                  "{networking.istio.io/tunnel: http}")
    w = next(iter(load(tunnel).inventory.workloads.values()))
    assert (w.protocol, w.native_tunnel) == ("HBONE", True)


def test_workload_entry_selected_by_service_entry():
    mesh = load(VM_WORKLOAD_ENTRY, VM_SERVICE_ENTRY)
    svc = mesh.inventory.services["default/details.bookinfo.com"]
    (w, ep), = mesh.inventory.endpoints_of(svc)
    assert w.uid == "Kubernetes/networking.istio.io/WorkloadEntry/default/details-svc"
    assert (w.workload_ips, w.service_account, w.protocol, dict(ep.ports)) == (
        ("2.2.2.2",), "details-legacy", "TCP", {80: 8080})
    assert (w.canonical_name, w.workload_name) == ("details-legacy", "details-svc")
    assert mesh.counts()["WorkloadEntry"] == 1
    assert any("no spec.addresses" in line for line in mesh.warnings)


def test_workload_entry_fields_waypoint_and_tunnel_label():
    text = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm-1
  namespace: shop
  labels: {istio.io/use-waypoint: shop-wp, networking.istio.io/tunnel: http}
spec:
  address: 10.40.0.1
  network: vm-net
  locality: eu-west/b
  weight: 3
  labels: {app: cart, version: v2, service.istio.io/workload-name: cart-vms}
"""
    (w,) = load(text).inventory.workloads.values()
    assert (w.uid, w.name, w.workload_ips, w.network, w.locality, w.capacity) == (
        "Kubernetes/networking.istio.io/WorkloadEntry/shop/vm-1", "vm-1", ("10.40.0.1",), "vm-net",
        Locality("eu-west", "b", ""), 3)
    assert (w.protocol, w.native_tunnel, w.service_account, w.workload_name) == ("HBONE", True, "default", "cart-vms")
    assert (w.canonical_name, w.canonical_revision) == ("cart", "v2")
    assert w.waypoint == GatewayAddress(hostname="shop-wp.shop.svc.cluster.local", namespace="shop")
    assert dict(w.services) == {}     # no ServiceEntry selects it: a workload of its own (pod-IP traffic)
    hostname = load(text.replace("address: 10.40.0.1", "address: vm-1.corp.example"))
    (w,) = hostname.inventory.workloads.values()
    assert (w.workload_ips, w.hostname) == ((), "vm-1.corp.example")
    assert any("spec.address: 'vm-1.corp.example' is a hostname" in line for line in hostname.warnings)


def test_selector_selects_pods_of_its_namespace_only_and_not_with_empty_selector():
    inventory = """
workloads:
- {name: legacy-0, namespace: default, workloadIps: ["10.1.0.5"], protocol: HBONE, labels: {app: details-legacy}}
- {name: legacy-1, namespace: other, workloadIps: ["10.1.0.6"], labels: {app: details-legacy}}
- {name: unrelated, namespace: default, workloadIps: ["10.1.0.7"], labels: {app: x}}
"""
    mesh = load(VM_SERVICE_ENTRY, VM_WORKLOAD_ENTRY, inventory=inventory)
    svc = mesh.inventory.services["default/details.bookinfo.com"]
    names = {w.name: dict(ep.ports) for w, ep in mesh.inventory.endpoints_of(svc)}
    assert names == {"legacy-0": {80: 8080}, "details-svc": {80: 8080}}
    pod = mesh.inventory.workload_by_ip["10.1.0.5"]
    assert dict(pod.services) == {"default/details.bookinfo.com": {80: 8080}} and pod.protocol == "HBONE"
    empty = VM_SERVICE_ENTRY.replace("labels:\n      app: details-legacy", "labels: {}")
    mesh = load(empty, inventory=inventory)
    assert mesh.inventory.endpoints_of(mesh.inventory.services["default/details.bookinfo.com"]) == []


# resolution NONE: a passthrough entry (one host; two hosts sharing the address).
PASSTHROUGH_DB = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db-range}
spec:
  hosts: [db.internal]
  addresses: [10.20.0.7]
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  resolution: NONE
"""
PASSTHROUGH_DB_TWO_HOSTS = PASSTHROUGH_DB.replace("hosts: [db.internal]", "hosts: [a.db.internal, b.db.internal]")


def test_resolution_none_is_passthrough():
    text = PASSTHROUGH_DB
    mesh = load(text)
    svc = mesh.inventory.services["default/db.internal"]
    # services.go: "When resolution is NONE, we want to passthrough traffic to the destination address."
    assert svc.load_balancer == LoadBalancer((), "Passthrough", "AllowAll")
    assert mesh.inventory.workloads == {}
    assert not any("spec.resolution" in line for line in mesh.warnings)


def test_node_plan_passthrough_service_goes_to_the_original_destination():
    """ztunnel find_upstream: a Passthrough service's connection goes where the app sent it (plain TCP)."""
    text = PASSTHROUGH_DB
    mesh = load(text, inventory=CLIENT)
    plan = _plan(mesh, ("10.20.0.7", 5432))
    assert (plan.protocol, plan.dst, plan.reason, plan.host, plan.workload) == \
        ("tcp", ("10.20.0.7", 5432), "passthrough", "db.internal", None)
    assert _plan(mesh, ("db.internal", 5432)).dst == ("10.20.0.7", 5432)   # by name (SOCKS5): its address
    no_address = load(text.replace("  addresses: [10.20.0.7]\n", ""), inventory=CLIENT)
    with pytest.raises(NoHealthyUpstream):   # by name, with no address: no original destination to go to
        _plan(no_address, ("db.internal", 5432))


def test_dns_without_endpoints_keeps_one_hostname_endpoint_per_host_and_warns():
    mesh = load(EXTERNAL_HTTPS)
    assert sorted(mesh.inventory.services) == ["default/api.dropboxapi.com", "default/api.facebook.com",
                                               "default/www.googleapis.com"]
    svc = mesh.inventory.services["default/www.googleapis.com"]
    (w, ep), = mesh.inventory.endpoints_of(svc)
    assert (w.uid, w.hostname, w.workload_ips) == (
        "Kubernetes/networking.istio.io/ServiceEntry/default/external-svc-https/www.googleapis.com",
        "www.googleapis.com", ())
    assert dict(ep.ports) == {443: 443}
    assert not any("spec.resolution" in line for line in mesh.warnings)   # resolved when dialled (proxy/dns.py)
    # DNS endpoints with hostnames: one workload per endpoint, resolved when dialled
    mesh = load(DNS_ENDPOINTS)
    eps = mesh.inventory.endpoints_of(mesh.inventory.services["default/foo.bar.com"])
    assert [(w.hostname, dict(ep.ports)) for w, ep in eps] == [("uk.foo.bar.com", {443: 9443}),
                                                                ("us.foo.bar.com", {443: 8443})]


def test_status_addresses_are_the_auto_allocated_vips():
    text = EGRESS_WAYPOINT + """status:
  addresses:
  - {host: httpbin.org, value: 240.240.0.1}
  - {host: other.org, value: 240.240.0.2}
"""
    svc = load(text).inventory.services["egress/httpbin.org"]
    assert svc.vips == (NetworkAddress("", "240.240.0.1"),)


def test_use_waypoint_label_binds_the_service():
    mesh = load(EGRESS_WAYPOINT)
    svc = mesh.inventory.services["egress/httpbin.org"]
    assert svc.waypoint == GatewayAddress(hostname="waypoint.egress.svc.cluster.local", namespace="egress")
    other_ns = EGRESS_WAYPOINT.replace("istio.io/use-waypoint: waypoint",
                                       "istio.io/use-waypoint: egress-gw\n    istio.io/use-waypoint-namespace: istio-egress")
    svc = load(other_ns).inventory.services["egress/httpbin.org"]
    assert svc.waypoint == GatewayAddress(hostname="egress-gw.istio-egress.svc.cluster.local", namespace="istio-egress")
    none = EGRESS_WAYPOINT.replace("istio.io/use-waypoint: waypoint", "istio.io/use-waypoint: none")
    assert load(none).inventory.services["egress/httpbin.org"].waypoint is None


def test_a_workload_only_waypoint_does_not_take_a_service_entry():
    gateway = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: egress, labels: {istio.io/waypoint-for: workload}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""
    mesh = load(EGRESS_WAYPOINT, gateway)
    assert mesh.inventory.services["egress/httpbin.org"].waypoint is None
    assert any("is for 'workload' traffic, not service traffic" in line for line in mesh.warnings)


def test_endpoint_labels_bind_the_endpoint_workload_to_a_waypoint():
    text = MONGO_STATIC.replace("  - address: 3.3.3.3", "  - address: 3.3.3.3\n    labels: {istio.io/use-waypoint: wp}")
    wls = {w.workload_ips[0]: w for w in load(text).inventory.workloads.values()}
    assert wls["3.3.3.3"].waypoint == GatewayAddress(hostname="wp.default.svc.cluster.local", namespace="default")
    assert wls["2.2.2.2"].waypoint is None


def test_a_ztunnel_service_with_the_same_host_wins_and_the_entry_is_warned_about():
    inventory = """
services:
- {name: details, namespace: default, hostname: details.bookinfo.com, vips: ["/10.0.0.9"], ports: {80: 9080}}
"""
    mesh = load(VM_SERVICE_ENTRY, VM_WORKLOAD_ENTRY, inventory=inventory)
    assert mesh.inventory.services["default/details.bookinfo.com"].name == "details"
    assert any("already defined; it wins" in line for line in mesh.warnings)
    # its endpoints are not sent either ("pruned by deduplication")
    assert not any("WorkloadEntry" in w.uid and w.services for w in mesh.inventory.workloads.values())


def test_multi_host_entry_gives_the_vips_to_the_first_host():
    text = EXTERNAL_HTTPS.replace("location:", "addresses: [10.3.0.1]\n  location:").replace("resolution: DNS",
                                                                                            "resolution: STATIC")
    mesh = load(text)
    assert mesh.inventory.service_by_vip["10.3.0.1"].hostname == "api.dropboxapi.com"
    assert any("attributed to 'api.dropboxapi.com'" in line for line in mesh.warnings)


def test_a_vip_a_ztunnel_service_already_has_stays_its_own_with_a_warning_naming_both():
    """istiod accepts it (ztunnel keeps one service per VIP): a warning, not a load failure; the first keeps it."""
    inventory = """
services:
- {name: a, namespace: default, hostname: a.default.svc.cluster.local, vips: ["/10.9.0.1"], ports: {80: 80}}
"""
    mesh = load(MONGO_STATIC.replace("192.192.192.192/24", "10.9.0.1"), inventory=inventory)
    assert mesh.inventory.service_by_vip["10.9.0.1"].hostname == "a.default.svc.cluster.local"
    assert "mymongodb.somedomain" in {s.hostname for s in mesh.inventory.services.values()}
    (line,) = [w for w in mesh.warnings if "service VIP /10.9.0.1 is already used" in w]
    assert "(ServiceEntry default/external-svc-mongocluster): spec.hosts[0].vips[0]:" in line and "services[0]" in line


def test_an_endpoint_ip_a_pod_already_has_stays_the_pods_and_the_endpoint_still_backs_its_service():
    inventory = """
workloads:
- {name: p, namespace: default, workloadIps: ["2.2.2.2"]}
"""
    mesh = load(MONGO_STATIC, inventory=inventory)
    assert mesh.inventory.workload_by_ip["2.2.2.2"].name == "p"
    assert any("spec.endpoints[0].workloadIps[0]: workload IP 2.2.2.2 (network '') is already used" in w
               for w in mesh.warnings)
    svc = mesh.inventory.services["default/mymongodb.somedomain"]
    assert "2.2.2.2" in {w.workload_ips[0] for w, _ in mesh.inventory.endpoints_of(svc)}


def test_two_entries_sharing_an_endpoint_address_both_load():
    """One VM or external IP behind two hosts: istiod accepts it (ztunnel's WorkloadByAddr holds several)."""
    other = MONGO_STATIC.replace("external-svc-mongocluster", "other-mongo").replace("mymongodb.somedomain",
                                                                                     "other.somedomain")
    other = other.replace("192.192.192.192/24", "192.192.193.1")
    mesh = load(MONGO_STATIC, other)
    for host in ("mymongodb.somedomain", "other.somedomain"):
        svc = mesh.inventory.services[f"default/{host}"]
        assert {w.workload_ips[0] for w, _ in mesh.inventory.endpoints_of(svc)} == {"2.2.2.2", "3.3.3.3"}


def test_duplicate_service_entry_name_is_an_error():
    with pytest.raises(ConfigErrors) as err:
        load(MONGO_STATIC, MONGO_STATIC)
    assert "duplicate ServiceEntry default/external-svc-mongocluster" in str(err.value)


def test_export_to_is_accepted_with_a_warning():
    mesh = load(MONGO_STATIC.replace("resolution: STATIC", "resolution: STATIC\n  exportTo: ['.']"))
    assert any("spec.exportTo: not applied in ambient mode (istio/istio#55163)" in w for w in mesh.warnings)


# ---------------------------------------------------------------------------------------------
# What the node proxy makes of the converted entries (pure plan, no sockets)

CLIENT = """
workloads:
- {name: client-0, namespace: default, serviceAccount: client, workloadIps: ["10.0.0.10"], protocol: HBONE, node: n1}
- {name: wp-0, namespace: egress, serviceAccount: waypoint, workloadIps: ["10.0.0.99"], protocol: HBONE,
   services: {egress/waypoint.egress.svc.cluster.local: {15008: 15008}}}
services:
- {name: waypoint, namespace: egress, hostname: waypoint.egress.svc.cluster.local, vips: ["/10.96.0.99"],
   ports: {15008: 15008}}
"""


def _plan(mesh, dst):
    import random
    from proxy.node.outbound import plan_outbound
    from proxy.snapshot import build_snapshot
    snap = build_snapshot(mesh, mode="node", scope=None, version=1, now=0.0)
    return plan_outbound(dst, mesh.inventory.workload_by_ip["10.0.0.10"], snap, random.Random(0))


def test_node_plan_static_endpoint_by_vip_is_plain_tcp_at_the_target_port():
    mesh = load(MONGO_STATIC.replace("192.192.192.192/24", "10.9.0.1"), inventory=CLIENT)
    plan = _plan(mesh, ("10.9.0.1", 27018))
    assert (plan.protocol, plan.dst[1], plan.reason, plan.host) == ("tcp", 27018, "endpoint", "mymongodb.somedomain")
    assert plan.dst[0] in ("2.2.2.2", "3.3.3.3")


def test_node_plan_hbone_endpoint_gets_hbone_with_the_endpoint_identity():
    text = MONGO_STATIC.replace("192.192.192.192/24", "10.9.0.1").replace(
        "name: external-svc-mongocluster", "name: m\n  annotations: {ambient.istio.io/redirection: enabled}").replace(
        "  - address: 3.3.3.3\n", "").replace("  - address: 2.2.2.2", "  - {address: 2.2.2.2, serviceAccount: db}")
    plan = _plan(load(text, inventory=CLIENT), ("10.9.0.1", 27018))
    assert (plan.protocol, plan.dst, plan.authority) == ("hbone", ("2.2.2.2", 15008), "2.2.2.2:27018")
    assert {str(i) for i in plan.identities} == {"spiffe://cluster.local/ns/default/sa/db"}


def test_node_plan_through_the_use_waypoint_waypoint():
    text = EGRESS_WAYPOINT.replace("resolution: DNS", "resolution: DNS\n  addresses: [10.9.0.80]")
    plan = _plan(load(text, inventory=CLIENT), ("10.9.0.80", 80))
    assert (plan.protocol, plan.dst, plan.authority, plan.reason) == ("hbone", ("10.0.0.99", 15008), "10.9.0.80:80",
                                                                       "waypoint")


def test_node_plan_dns_service_dials_the_hostname_endpoint_without_a_waypoint():
    # The plan names the hostname; OutboundProxy.originate resolves it when dialling (tests/test_dns.py).
    text = EGRESS_WAYPOINT.replace("resolution: DNS", "resolution: DNS\n  addresses: [10.9.0.80]").replace(
        "istio.io/use-waypoint: waypoint", "app: httpbin")
    plan = _plan(load(text, inventory=CLIENT), ("10.9.0.80", 80))
    assert (plan.protocol, plan.dst, plan.reason, plan.workload.hostname) == ("tcp", ("httpbin.org", 80),
                                                                              "endpoint", "httpbin.org")


def test_config_check_counts_entries_and_prints_their_warnings(tmp_path):
    import io
    from proxy.config_check import main

    path = tmp_path / "entries.yaml"
    path.write_text("---".join([VM_WORKLOAD_ENTRY, VM_SERVICE_ENTRY, EXTERNAL_HTTPS]))
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", str(path)], out=out, err=err) == 0, err.getvalue()
    rows = {line.split()[0]: line.split()[1:] for line in out.getvalue().splitlines() if line[:1].isupper()}
    assert rows["ServiceEntry"] == ["2", "2"] and rows["WorkloadEntry"] == ["1", "1"]
    assert rows["Service"] == ["4", "4"] and rows["Workload"] == ["4", "4"]
    assert "(ServiceEntry default/external-svc-https): spec.hosts[0]: no spec.addresses" in out.getvalue()
    bad = tmp_path / "bad.yaml"
    bad.write_text(VM_SERVICE_ENTRY.replace("protocol: HTTP", "protocol: QUIC"))
    out, err = io.StringIO(), io.StringIO()
    assert main(["check", str(bad)], out=out, err=err) == 2
    assert f"{bad}: document 1 (ServiceEntry default/details-svc): spec.ports[0].protocol: unsupported protocol: QUIC" \
        in err.getvalue()


# ---------------------------------------------------------------------------------------------
# Errors: each names its field


def _set(d: dict, path: list, value) -> dict:
    d = copy.deepcopy(d)
    node = d
    for p in path[:-1]:
        node = node[p]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


SE_ERRORS = [
    (["spec", "hosts"], [], "spec.hosts: service entry must have at least one host"),
    (["spec", "hosts", 0], "*", "spec.hosts[0]: invalid host *"),
    (["spec", "hosts", 0], "bad host!", "spec.hosts[0]: 'bad host!' is not a valid host"),
    (["spec", "hosts", 0], 7, "spec.hosts[0]: expected a non-empty string"),
    (["spec", "addresses", 0], "10.0.0.300", "spec.addresses[0]: '10.0.0.300' is not an IP address or CIDR"),
    (["spec", "ports", 0, "number"], 0, "spec.ports[0].number: expected an integer 1..65535"),
    (["spec", "ports", 0, "number"], KeyError, "spec.ports[0].number: required"),
    (["spec", "ports", 0, "name"], "Mongo_DB", "spec.ports[0].name: invalid port name: Mongo_DB"),
    (["spec", "ports", 0, "protocol"], "SCTP", "spec.ports[0].protocol: unsupported protocol: SCTP"),
    (["spec", "ports", 0, "targetPort"], 70000, "spec.ports[0].targetPort: expected an integer 1..65535"),
    (["spec", "ports", 0, "nmber"], 1, "spec.ports[0].nmber: unknown field"),
    (["spec", "resolution"], "DYNAMIC_DNS", "spec.resolution: resolution DYNAMIC_DNS needs an egress waypoint"),
    (["spec", "resolution"], "MAGIC", "spec.resolution: expected one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"),
    (["spec", "resolution"], "NONE", "spec.endpoints: no endpoints should be provided for resolution type none"),
    (["spec", "location"], "MARS", "spec.location: expected one of MESH_EXTERNAL, MESH_INTERNAL"),
    (["spec", "endpoints", 0, "address"], "db.example.com",
     "spec.endpoints[0].address: 'db.example.com' is not an IP address (resolution STATIC needs IPs)"),
    (["spec", "endpoints", 0, "address"], "unix:///var/run/a.sock", "spec.endpoints[0].address: unix domain socket"),
    (["spec", "endpoints", 0, "ports"], {"http": 80}, "spec.endpoints[0].ports.http: endpoint port 80 is not defined"),
    (["spec", "endpoints", 0, "weight"], -1, "spec.endpoints[0].weight: expected an integer 0..4294967295"),
    (["spec", "endpoints", 0, "locality"], "a//b", "spec.endpoints[0].locality: expected 'region[/zone[/subzone]]'"),
    (["spec", "endpoints", 0, "labels"], {"a": 1}, "spec.endpoints[0].labels.a: expected a string"),
    (["spec", "endpoints", 0, "serviceAccount"], "Bad SA", "spec.endpoints[0].serviceAccount: 'Bad SA' is not a valid"),
    (["spec", "workloadSelector"], {"labels": {"app": "x"}},
     "spec.workloadSelector: only one of WorkloadSelector or Endpoints is allowed"),
    (["spec", "exportTo"], "*", "spec.exportTo: expected a list"),
    (["spec", "subjectAltNames"], [""], "spec.subjectAltNames[0]: expected a non-empty string"),
    (["spec", "hostz"], [], "spec.hostz: unknown field"),
    (["metadata", "namespace"], "Bad_NS", "metadata.namespace: 'Bad_NS' is not a valid namespace"),
    (["metadata", "name"], KeyError, "metadata.name: expected a non-empty string"),
    (["spec"], KeyError, "spec: required"),
]


@pytest.mark.parametrize("path,value,message", SE_ERRORS, ids=[m.split(":")[0] + "=" + str(v)[:12]
                                                              for _, v, m in SE_ERRORS])
def test_service_entry_errors_name_the_field(path, value, message):
    bad = _set(doc(MONGO_STATIC), path, value)
    with pytest.raises(ConfigError) as err:
        parse_service_entry(bad, W)
    text = str(err.value)
    assert message in text, text
    assert text.startswith("entries.yaml: document 1")


@pytest.mark.parametrize("text,fix,message", [
    (EXTERNAL_HTTPS, ("protocol: TLS", "protocol: TCP"), "spec.hosts: multiple hosts provided with non-HTTP, non-TLS"),
    (EXTERNAL_HTTPS, ("resolution: DNS", "resolution: DNS\n  addresses: [10.0.0.0/8]"),
     "spec.addresses: CIDR addresses are allowed only for NONE/STATIC resolution types"),
    (EGRESS_WAYPOINT, ("- httpbin.org", "- '*.httpbin.org'"),
     "spec.hosts[0]: hosts must be FQDN if no endpoints are provided for resolution mode DNS"),
    (DNS_ENDPOINTS, ("resolution: DNS", "resolution: DNS_ROUND_ROBIN"),
     "spec.endpoints: there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN"),
    (VM_SERVICE_ENTRY, ("resolution: STATIC", "resolution: NONE"),
     "spec.workloadSelector: workloadSelector should not be set when resolution mode is NONE"),
    (MONGO_STATIC, ("protocol: MONGO", "protocol: MONGO\n  - {number: 27018, name: other}"),
     "spec.ports[1].number: service entry port 27018 already defined"),
    (MONGO_STATIC, ("protocol: MONGO", "protocol: MONGO\n  - {number: 1, name: mongodb}"),
     "spec.ports[1].name: service entry port name 'mongodb' already defined"),
    (DNS_ENDPOINTS, ("address: us.foo.bar.com", "address: 'us foo'"),
     "spec.endpoints[0].address: endpoint address 'us foo' is not a valid FQDN or an IP address"),
])
def test_cross_field_errors(text, fix, message):
    with pytest.raises(ConfigError) as err:
        parse_service_entry(doc(text.replace(*fix)), W)
    assert message in str(err.value)


@pytest.mark.parametrize("path,value,message", [
    (["spec", "address"], KeyError, "spec.address: expected a non-empty string"),
    (["spec", "address"], "bad name!", "spec.address: endpoint address 'bad name!' is not a valid FQDN"),
    (["spec", "weight"], "7", "spec.weight: expected an integer"),
    (["spec", "ports"], [80], "spec.ports: expected a mapping"),
    (["spec", "ports"], {"http": 0}, "spec.ports.http: expected an integer 1..65535"),
    (["spec", "adress"], "1.1.1.1", "spec.adress: unknown field"),
    (["kind"], "WorkloadEntri", "kind: unsupported resource networking.istio.io/v1 WorkloadEntri"),
])
def test_workload_entry_errors_name_the_field(path, value, message):
    bad = _set(doc(VM_WORKLOAD_ENTRY), path, value)
    with pytest.raises(ConfigErrors) as err:
        build_mesh_config([(W, bad)])
    kind = bad["kind"]
    assert f"entries.yaml: document 1 ({kind} default/details-svc): {message}" in str(err.value), str(err.value)


def test_loader_reports_service_entry_errors_with_file_document_and_resource():
    bad = MONGO_STATIC.replace("protocol: MONGO", "protocol: SCTP")
    with pytest.raises(ConfigErrors) as err:
        load(bad)
    assert str(err.value).startswith("entries.yaml: document 1 (ServiceEntry default/external-svc-mongocluster): "
                                     "spec.ports[0].protocol: unsupported protocol: SCTP")


# ---------------------------------------------------------------------------------------------
# Junk: only our own error type escapes

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 70000) | st.text(max_size=12)
    | st.sampled_from(["*", "10.0.0.1", "10.0.0.0/8", "a.b", "STATIC", "DNS", "NONE", "http", "HTTP", "unix://x"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["address", "ports", "labels", "number", "name", "hosts", "x", "http", "weight"]) | st.text(max_size=6),
        inner, max_size=3),
    max_leaves=8)


BASES = [doc(t) for t in (EXTERNAL_HTTPS, MONGO_STATIC, VM_SERVICE_ENTRY, DNS_ENDPOINTS, EGRESS_WAYPOINT,
                          VM_WORKLOAD_ENTRY)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_junk_only_ever_raises_config_error(data):
    docs = []
    for base in data.draw(st.lists(st.sampled_from(BASES), min_size=1, max_size=3)):
        docs.append(mutate(copy.deepcopy(base), data, json_values, min_times=0))
    try:
        mesh = build_mesh_config([(Where("j.yaml", i + 1), d) for i, d in enumerate(docs)])
    except ConfigErrors as err:
        assert all(e.message.startswith("j.yaml: document ") for e in err.errors)
        return
    for svc in mesh.inventory.services.values():
        assert svc.hostname and svc.namespace


# ---------------------------------------------------------------------------------------------
# End to end: real proxies on loopback (node-a, the reviews waypoint) and plain-TCP endpoints

E2E_ENTRIES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: legacy-db
  namespace: default
spec:
  hosts: [legacy-db.example.com]
  addresses: [127.2.0.70]
  ports: [{number: 7000, name: tcp-db, protocol: TCP}]
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 127.1.0.70
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: egress-api
  namespace: default
  labels:
    istio.io/use-waypoint: reviews-waypoint
spec:
  hosts: [api.example.com]
  addresses: [127.2.0.71]
  ports: [{number: 7100, name: tcp-api, protocol: TCP, targetPort: 7000}]
  location: MESH_EXTERNAL
  resolution: STATIC
  endpoints:
  - address: 127.1.0.71
"""


def _echo(sock: socket.socket, payload: bytes) -> bytes:
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


def _wait_lines(proc, pred, timeout: float = 5.0) -> list[dict]:
    """The proxy's access-log lines matching ``pred``, waiting for them to be written."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in proc.access_lines() if pred(line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_end_to_end_static_endpoint_by_vip_directly_and_through_the_waypoint(tmp_path):
    from tests.e2e.mesh import Mesh, socks5_connect

    mesh = Mesh(tmp_path, extra_yaml=(E2E_ENTRIES,))
    try:
        node_a = mesh.start_node("node-a", 1, wait=False)
        waypoint = mesh.start_waypoint(3, wait=False)
        for p in (node_a, waypoint):
            mesh.wait_ready(p)
        mesh.echo_backend(70, 7000)
        mesh.echo_backend(71, 7000)
        client = mesh.pod(10)   # productpage, on node-a
        # 1. No waypoint: node-a dials the endpoint itself, plain TCP (protocol TCP: not captured by the mesh).
        assert _echo(socks5_connect(node_a.socks5, mesh.vip(70), 7000, source_ip=client), b"db" * 1000) == b"db" * 1000
        direct = _wait_lines(node_a, lambda l: l.get("dst.service") == "legacy-db.example.com")
        assert [(l["route"], l["dst.addr"], l["dst.workload"]) for l in direct] == [
            ("endpoint", f"{mesh.pod(70)}:7000", "legacy-db")]
        # 2. istio.io/use-waypoint: node-a → HBONE (:authority VIP:7100) → the waypoint's inbound-vip chain for the
        #    entry's host → the endpoint at the target port 7000.
        assert _echo(socks5_connect(node_a.socks5, mesh.vip(71), 7100, source_ip=client), b"api") == b"api"
        via = _wait_lines(node_a, lambda l: l.get("dst.service") == "api.example.com")
        assert [(l["route"], l["dst.hbone_addr"]) for l in via] == [("waypoint", f"{mesh.vip(71)}:7100")]
        at_wp = _wait_lines(waypoint, lambda l: l.get("upstream_cluster", "").endswith("|api.example.com"))
        assert [(l["upstream_cluster"], l["upstream_host"], l["status"]) for l in at_wp] == [
            ("inbound-vip|7100|tcp|api.example.com", f"{mesh.pod(71)}:7000", 200)]
        assert not any("legacy-db" in str(l) for l in waypoint.access_lines())
    finally:
        mesh.close()


def test_passthrough_by_name_works_for_every_host_of_the_entry():
    text = PASSTHROUGH_DB_TWO_HOSTS
    mesh = load(text, inventory=CLIENT)
    for host in ("a.db.internal", "b.db.internal"):
        plan = _plan(mesh, (host, 5432))
        assert (plan.protocol, plan.dst, plan.reason, plan.host) == ("tcp", ("10.20.0.7", 5432), "passthrough", host)
    assert not any("reachable by hostname only" in w for w in mesh.warnings)


def test_passthrough_through_a_waypoint_is_warned_as_not_implemented():
    text = EGRESS_WAYPOINT.replace("resolution: DNS", "resolution: NONE\n  addresses: [10.20.0.9]")
    mesh = load(text)
    assert mesh.inventory.services["egress/httpbin.org"].waypoint is not None
    assert any("spec.resolution: NONE (passthrough) through a waypoint is not implemented" in w for w in mesh.warnings)
    assert not any("through a waypoint" in w for w in load(EGRESS_WAYPOINT).warnings)   # (only NONE)


# ---------------------------------------------------------------------------------------------
# Found by the third review


def test_a_waypoint_bound_entry_without_an_address_is_refused_by_name_not_sent_around_its_waypoint():
    mesh = load(EGRESS_WAYPOINT, inventory=CLIENT)   # use-waypoint, resolution DNS, no addresses
    with pytest.raises(NoHealthyUpstream, match="waypoint"):
        _plan(mesh, ("httpbin.org", 80))


def test_passthrough_by_name_takes_only_its_own_entrys_address():
    entry = PASSTHROUGH_DB_TWO_HOSTS.replace("name: db-range", "name: db")   # (the name the Service below has)
    same_name = CLIENT + """services:
- {name: db, namespace: default, hostname: db.default.svc.cluster.local, vips: ["/10.96.5.5"], ports: {5432: 5432}}
"""
    mesh = load(entry, inventory=same_name)
    assert _plan(mesh, ("b.db.internal", 5432)).dst == ("10.20.0.7", 5432)


def test_the_waypoint_and_the_node_proxies_agree_on_who_has_a_shared_address():
    """The waypoint's scoped inventory keeps the full one's order, so a pod and an entry's endpoint sharing an
    address resolve to the pod on both (a sorted order gave the waypoint the entry's plain-TCP endpoint)."""
    from policy.scope import WaypointScope, scope_for_waypoint
    wp = 'waypoint: {destination: "default/wp.default.svc.cluster.local", hboneMtlsPort: 15008}'
    inv = f"""
workloads:
- {{name: p, clusterId: cluster1, namespace: default, workloadIps: ["2.2.2.2"], protocol: HBONE, {wp}}}
"""
    se = MONGO_STATIC.replace("name: external-svc-mongocluster",
                              "name: external-svc-mongocluster\n  labels: {istio.io/use-waypoint: wp}")
    mesh = load(se, inventory=inv)
    scoped = scope_for_waypoint(mesh, WaypointScope.parse("default", gateway="default/wp"))
    assert mesh.inventory.workload_by_ip["2.2.2.2"].name == "p"
    assert scoped.inventory.workload_by_ip["2.2.2.2"].name == "p"


def test_by_name_and_by_address_agree_on_an_entry_loaded_twice():
    a = MONGO_STATIC.replace("metadata:\n  name: external-svc-mongocluster",
                             "metadata:\n  name: m\n  namespace: team-a").replace("192.192.192.192/24", "1.1.1.1")
    b = a.replace("team-a", "team-b")
    mesh = load(a, b)
    by_vip = mesh.inventory.service_by_vip["1.1.1.1"]
    assert mesh.inventory.service_by_hostname["mymongodb.somedomain"] is by_vip
