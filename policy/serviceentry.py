"""Istio ``ServiceEntry`` and ``WorkloadEntry`` (``networking.istio.io`` v1/v1beta1/v1alpha3), converted into
inventory ``Service``s and ``Workload``s as istiod's ambient index converts them for ztunnel and waypoints.

Sources (istio/istio ``pilot/pkg/serviceregistry/ambient/``; ``kube/controller/ambient/`` in older trees):

* ``services.go constructServiceEntries``: one ``workloadapi.Service`` **per host** — ``Name``/``Namespace`` of
  the ServiceEntry, ``Hostname: h``, ``Addresses`` from ``spec.addresses`` (``toNetworkAddressFromCidr``: a plain
  IP is a VIP, a CIDR keeps its prefix length), ``Ports`` ``{ServicePort: p.Number, TargetPort: p.TargetPort or
  p.Number, AppProtocol: toAppProtocolFromProtocol(p.Protocol)}``, ``Waypoint`` (``fetchWaypointForService``: the
  ``istio.io/use-waypoint`` label), ``SubjectAltNames``; with ``resolution: NONE`` the load balancer is
  ``{Mode: PASSTHROUGH, HealthPolicy: ALLOW_ALL}`` ("When resolution is NONE, we want to passthrough traffic to
  the destination address"). Without ``addresses``, istiod auto-allocates VIPs and publishes them in the
  ServiceEntry's ``status.addresses`` (``serviceentry.GetHostAddressesFromServiceEntry``); those are read here
  when the YAML carries them (``kubectl get -o yaml`` of a live ServiceEntry does).
* ``workloads.go serviceEntryWorkloadBuilder``: each inline ``spec.endpoints`` entry becomes a ``Workload`` with
  ``Uid: generateServiceEntryUID(cluster, ns, name, address)`` = ``<cluster>/networking.istio.io/ServiceEntry/
  <ns>/<name>/<address>``, ``Name``/``WorkloadName`` = the ServiceEntry's name, the endpoint's ``network``,
  ``serviceAccount``, locality (``region/zone/subzone``) and ``weight`` (→ ``Capacity`` when > 0), status
  HEALTHY, and membership of every host's Service with ports from ``constructServicesFromWorkloadEntry`` (the
  endpoint's ``ports[<port name>]``, else the Service's target port). With DNS resolution and neither endpoints
  nor a selector, istiod makes one "implicit endpoint" per host whose address is the hostname (ztunnel resolves
  it on demand). A hostname endpoint is a ``Workload`` with ``hostname`` and no ``workloadIps``, as ztunnel gets
  it; the proxies resolve it when they dial it (``proxy/dns.py``: cached for Istio's 60 s ``dnsRefreshRate``).
* ``workloads.go workloadEntryWorkloadBuilder``: a WorkloadEntry is one ``Workload`` (``Uid:
  generateWorkloadEntryUID`` = ``<cluster>/networking.istio.io/WorkloadEntry/<ns>/<name>``), selected by the
  ServiceEntries of its namespace whose ``workloadSelector`` labels it carries (``FilterSelectsNonEmpty``);
  pods are selected the same way (``features.EnableServiceEntrySelectPods``, on by default).
* ``setTunnelProtocol``: a workload speaks HBONE only when the annotation ``ambient.istio.io/redirection:
  enabled`` or the label ``networking.istio.io/tunnel: http`` says so — i.e. when it is captured by the mesh;
  otherwise it is a plain-TCP destination (a VM or external endpoint).

The inventory has no Kubernetes Service selectors and no Namespace objects, so istiod's "Kubernetes Services
select WorkloadEntries" and the namespace-level ``istio.io/use-waypoint`` label have nothing to act on here.

Parsers raise ``ConfigError`` naming file, document, resource and field (``policy.routing.parse``'s reader),
and follow istiod's validation (``pkg/config/validation/validation.go ValidateServiceEntry``). ``convert``
is pure: parsed resources and the ztunnel-shaped pods in, services, workloads and warnings out.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Mapping, Sequence

from policy.errors import ConfigError, Where
from policy.inventory import (
    DEFAULT_SERVICE_ACCOUNT, EMPTY, HBONE_PORT, CidrVip, GatewayAddress, LoadBalancer, Locality, NetworkAddress,
    Service, Workload,
)
from policy.routing.parse import _R, _envelope

GROUP = "networking.istio.io"
VERSIONS = tuple(f"{GROUP}/{v}" for v in ("v1", "v1beta1", "v1alpha3"))
DEFAULT_CLUSTER_ID = "Kubernetes"      # Istio's default cluster name (the loader's uid default uses the same)
CLUSTER_DOMAIN = "cluster.local"       # a waypoint's Service: <name>.<ns>.svc.cluster.local

# Labels and annotations istiod reads (istio/api label / annotation packages).
USE_WAYPOINT = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
WAYPOINT_NONE = "none"                 # "value none opts out (reserved)" (reference/istio-semantics.md §3)
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"   # constants.AmbientRedirectionEnabled = "enabled"
TUNNEL_LABEL = "networking.istio.io/tunnel"                # model.TunnelLabel; "http" = HBONE (model.TunnelHTTP)
WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"     # kubelabels.WorkloadNameFromWorkloadEntry
# kubelabels.CanonicalService: the first label present, else the workload name / "latest".
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")

LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
# DYNAMIC_DNS needs an egress waypoint doing dynamic forward proxying (Envoy's DFP cluster): not built here.
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
DNS_RESOLUTIONS = ("DNS", "DNS_ROUND_ROBIN")
# pkg/config/protocol Parse (case-insensitive) → the inventory's appProtocol. istiod's toAppProtocolFromProtocol
# tells ztunnel HTTP → HTTP11, HTTP2 → HTTP2, GRPC → GRPC and everything else UNKNOWN; the waypoint's Envoy builds
# a TCP chain for the declared non-HTTP protocols, so they are "tcp" here (never sniffed).
PROTOCOLS: Mapping[str, str | None] = MappingProxyType({
    "HTTP": "http", "HTTP2": "http2", "GRPC": "grpc", "GRPC-WEB": "grpc",
    "HTTPS": "tcp", "TLS": "tcp", "TCP": "tcp", "MONGO": "tcp", "MYSQL": "tcp", "REDIS": "tcp", "UDP": None,
})
MAX_PORT = 65535
MAX_WEIGHT = 2**32 - 1                 # WorkloadEntry.weight is a uint32
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")           # port names: DNS-1123 labels
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?")


@dataclass(frozen=True)
class SePort:
    """One ``spec.ports`` entry."""

    number: int
    name: str
    protocol: str = ""                 # upper-cased; "" = sniffed
    target_port: int = 0               # 0 = the port number (constructServiceEntries)


@dataclass(frozen=True)
class EntrySpec:
    """A WorkloadEntry's spec, which is also the shape of a ServiceEntry's inline ``endpoints``."""

    address: str                       # an IP (canonical text) or a hostname (DNS resolution only)
    ports: Mapping[str, int] = field(default_factory=lambda: EMPTY)   # SE port name → target port
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    network: str = ""
    locality: str = ""                 # "region/zone/subzone"
    weight: int = 0                    # 0 = unset (capacity 1)
    service_account: str = ""

    @property
    def is_ip(self) -> bool:
        return _ip_or_none(self.address) is not None


@dataclass(frozen=True)
class ServiceEntry:
    namespace: str
    name: str
    hosts: tuple[str, ...]
    ports: tuple[SePort, ...]
    resolution: str = "NONE"                                # Istio's default (enum 0)
    location: str = "MESH_EXTERNAL"                         # Istio's default (enum 0)
    addresses: tuple[str, ...] = ()                         # IPs and CIDRs, canonical text
    endpoints: tuple[EntrySpec, ...] = ()
    workload_selector: Mapping[str, str] | None = None
    export_to: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    status_addresses: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: EMPTY)  # host → auto-allocated IPs
    warnings: tuple[str, ...] = ()
    where: Where = field(default=Where(), compare=False)
    order: int = 0                                          # load order: istiod's "oldest wins" between entries

    kind: ClassVar[str] = "ServiceEntry"


@dataclass(frozen=True)
class WorkloadEntry:
    namespace: str
    name: str
    spec: EntrySpec
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)        # metadata.labels merged with spec.labels
    annotations: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    warnings: tuple[str, ...] = ()
    where: Where = field(default=Where(), compare=False)
    order: int = 0

    kind: ClassVar[str] = "WorkloadEntry"


def _ip_or_none(s: str) -> str | None:
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Parsers


def parse_service_entry(doc: dict, where: Where, *, order: int = 0) -> ServiceEntry:
    """A ``ServiceEntry`` document; raises ``ConfigError`` naming the field."""
    r, ns, name, meta, spec = _envelope(doc, where, ("ServiceEntry",), VERSIONS, "ServiceEntry")
    _check_namespace(r, ns)
    labels = r.labels(meta.get("labels"), "metadata.labels")
    annotations = r.labels(meta.get("annotations"), "metadata.annotations")
    r.map(spec, "spec", ("hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector",
                         "exportTo", "subjectAltNames"))
    hosts = tuple(_host(r, h, f"spec.hosts[{i}]") for i, h in enumerate(r.list(spec.get("hosts"), "spec.hosts")))
    if not hosts:
        raise r.fail("spec.hosts", "service entry must have at least one host")
    if len(set(hosts)) != len(hosts):
        raise r.fail("spec.hosts", "a host is listed twice")
    resolution = _enum(r, spec.get("resolution", "NONE"), "spec.resolution", RESOLUTIONS,
                       extra={"DYNAMIC_DNS": "resolution DYNAMIC_DNS needs an egress waypoint with dynamic forward "
                                             "proxying, which hbone-proxy does not implement"})
    location = _enum(r, spec.get("location", "MESH_EXTERNAL"), "spec.location", LOCATIONS)
    addresses = tuple(_address(r, a, f"spec.addresses[{i}]")
                      for i, a in enumerate(r.list(spec.get("addresses"), "spec.addresses")))
    if any("/" in a for a in addresses) and resolution not in ("NONE", "STATIC"):
        raise r.fail("spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types")
    ports = tuple(_se_port(r, p, f"spec.ports[{i}]") for i, p in enumerate(r.list(spec.get("ports"), "spec.ports")))
    names, numbers = set(), set()
    for i, p in enumerate(ports):
        if p.name in names:
            raise r.fail(f"spec.ports[{i}].name", f"service entry port name {p.name!r} already defined")
        if p.number in numbers:
            raise r.fail(f"spec.ports[{i}].number", f"service entry port {p.number} already defined")
        names.add(p.name)
        numbers.add(p.number)
    selector = None
    if spec.get("workloadSelector") is not None:
        sel = r.map(spec["workloadSelector"], "spec.workloadSelector", ("labels",))
        selector = _label_map(r, sel.get("labels"), "spec.workloadSelector.labels")
    raw_eps = r.list(spec.get("endpoints"), "spec.endpoints")
    if selector is not None and "endpoints" in spec:
        raise r.fail("spec.workloadSelector", "only one of WorkloadSelector or Endpoints is allowed in Service Entry")
    endpoints = tuple(_entry_spec(r, e, f"spec.endpoints[{i}]", port_names=names, dns=resolution in DNS_RESOLUTIONS)
                      for i, e in enumerate(raw_eps))
    if resolution == "NONE" and endpoints:
        raise r.fail("spec.endpoints", "no endpoints should be provided for resolution type none")
    if resolution == "NONE" and selector is not None:
        raise r.fail("spec.workloadSelector", "workloadSelector should not be set when resolution mode is NONE")
    if resolution == "DNS_ROUND_ROBIN" and len(endpoints) > 1:
        raise r.fail("spec.endpoints", "there must only be 0 or 1 endpoint for resolution mode DNS_ROUND_ROBIN")
    if resolution in DNS_RESOLUTIONS and not endpoints:
        for i, h in enumerate(hosts):
            if h.startswith("*"):
                raise r.fail(f"spec.hosts[{i}]", f"hosts must be FQDN if no endpoints are provided for resolution "
                                                 f"mode {resolution}")
    if resolution != "NONE" and len(hosts) > 1 and any(PROTOCOLS.get(p.protocol) not in ("http", "http2", "grpc")
                                                       and p.protocol not in ("HTTPS", "TLS") for p in ports):
        # ValidateServiceEntry: "for plain TCP there is no way to differentiate between the hosts".
        raise r.fail("spec.hosts", "multiple hosts provided with non-HTTP, non-TLS ports")
    export_to = r.strs(spec.get("exportTo"), "spec.exportTo")
    sans = r.strs(spec.get("subjectAltNames"), "spec.subjectAltNames")
    status = _status_addresses(r, doc.get("status"), hosts)
    if resolution == "STATIC" and not endpoints and selector is None:
        r.warn("spec.endpoints", "resolution STATIC with neither endpoints nor workloadSelector: the service has no "
                                 "endpoints")
    if export_to and set(export_to) != {"*"}:
        # istio/istio#55163 (open): ztunnel does not apply a ServiceEntry's exportTo; in ambient it "is NOT a
        # security boundary" (maintainer comment there). The service is visible mesh-wide here too.
        r.warn("spec.exportTo", "not applied in ambient mode (istio/istio#55163): the service is visible to every "
                                "namespace")
    return ServiceEntry(ns, name, hosts, ports, resolution, location, addresses, endpoints, selector, export_to,
                        sans, labels, annotations, status, tuple(r.warnings), where, order)


def parse_workload_entry(doc: dict, where: Where, *, order: int = 0) -> WorkloadEntry:
    """A ``WorkloadEntry`` document; raises ``ConfigError`` naming the field."""
    r, ns, name, meta, spec = _envelope(doc, where, ("WorkloadEntry",), VERSIONS, "WorkloadEntry")
    _check_namespace(r, ns)
    meta_labels = r.labels(meta.get("labels"), "metadata.labels")
    annotations = r.labels(meta.get("annotations"), "metadata.annotations")
    entry = _entry_spec(r, spec, "spec", port_names=None, dns=True)
    # serviceentry.ConvertClientWorkloadEntry: "WLE can put labels in multiple places; normalize this" — the
    # spec's labels merged over metadata.labels.
    labels = MappingProxyType({**meta_labels, **entry.labels})
    return WorkloadEntry(ns, name, entry, labels, annotations, tuple(r.warnings), where, order)


def _check_namespace(r: _R, ns: str) -> None:
    if not _DNS_LABEL.fullmatch(ns):
        raise r.fail("metadata.namespace", f"{ns!r} is not a valid namespace (lower-case RFC 1123 label)")


def _enum(r: _R, v: Any, path: str, choices: tuple[str, ...], extra: Mapping[str, str] = EMPTY) -> str:
    if isinstance(v, str) and v in extra:
        raise r.fail(path, extra[v])
    if not isinstance(v, str) or v not in choices:
        raise r.fail(path, f"expected one of {', '.join(choices)}, got {v!r}"[:200])
    return v


def _host(r: _R, v: Any, path: str) -> str:
    """ValidateWildcardDomain: DNS labels, a ``*`` only as the whole first label (``*.example.com``); the full
    wildcard ``*`` is "invalid host *". Folded to lower case (host matching is case-insensitive)."""
    s = r.str(v, path)
    if s == "*":
        raise r.fail(path, "invalid host *")
    name = s[2:] if s.startswith("*.") else s
    labels = name.rstrip(".").split(".")
    if len(s) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise r.fail(path, f"{s[:80]!r} is not a valid host (a DNS name, optionally '*.' first)")
    return s.rstrip(".").lower()


def _address(r: _R, v: Any, path: str) -> str:
    """ValidateIPSubnet: an IP or a CIDR; stored as parseCidrOrIP does (a masked prefix, or the plain IP)."""
    s = r.str(v, path)
    try:
        net = ipaddress.ip_network(s, strict=False)
    except ValueError:
        raise r.fail(path, f"{s[:80]!r} is not an IP address or CIDR") from None
    if "/" not in s or net.num_addresses == 1:
        return str(net.network_address)
    return str(net)


def _port(r: _R, v: Any, path: str, lo: int = 1) -> int:
    return r.int(v, path, lo, MAX_PORT)


def _se_port(r: _R, v: Any, path: str) -> SePort:
    m = r.map(v, path, ("number", "protocol", "name", "targetPort"))
    if "number" not in m:
        raise r.fail(f"{path}.number", "required")
    number = _port(r, m["number"], f"{path}.number")
    name = r.str(m.get("name"), f"{path}.name")
    if not _DNS_LABEL.fullmatch(name):
        raise r.fail(f"{path}.name", f"invalid port name: {name[:80]}")
    proto = r.str(m.get("protocol", ""), f"{path}.protocol", empty_ok=True).upper()
    if proto and proto not in PROTOCOLS:
        raise r.fail(f"{path}.protocol", f"unsupported protocol: {proto[:40]} (known: {', '.join(PROTOCOLS)})")
    target = 0 if m.get("targetPort") is None else _port(r, m["targetPort"], f"{path}.targetPort")
    if proto == "UDP":
        r.warn(path, "UDP ports are not proxied (ambient carries TCP only); the port is left out")
    return SePort(number, name, proto, target)


def _label_map(r: _R, v: Any, path: str) -> Mapping[str, str]:
    m = r.labels(v, path)
    for k in m:
        if not k or len(k) > 317:
            raise r.fail(f"{path}[{k[:40]!r}]", "not a valid label key")
    return m


def _entry_spec(r: _R, v: Any, path: str, *, port_names: set[str] | None, dns: bool) -> EntrySpec:
    m = r.map(v, path, ("address", "ports", "labels", "network", "locality", "weight", "serviceAccount"))
    address = r.str(m.get("address"), f"{path}.address")
    if address.startswith("unix://"):
        raise r.fail(f"{path}.address", "unix domain socket endpoints are for sidecars; not supported in ambient")
    ip = _ip_or_none(address)
    if ip is None:
        if not dns:
            raise r.fail(f"{path}.address", f"{address[:80]!r} is not an IP address (resolution STATIC needs IPs)")
        if not all(_HOST_LABEL.fullmatch(label) for label in address.rstrip(".").split(".")) or len(address) > 253:
            raise r.fail(f"{path}.address", f"endpoint address {address[:80]!r} is not a valid FQDN or an IP address")
        address = address.rstrip(".").lower()
    else:
        address = ip
    ports_in = r.map(m.get("ports"), f"{path}.ports")
    ports: dict[str, int] = {}
    for k, p in ports_in.items():
        kp = f"{path}.ports.{k}"
        if port_names is not None and k not in port_names:
            raise r.fail(kp, f"endpoint port {p!r} is not defined by the service entry (no port named {k!r})"[:200])
        ports[k] = _port(r, p, kp)
    labels = _label_map(r, m.get("labels"), f"{path}.labels")
    network = r.str(m.get("network", ""), f"{path}.network", empty_ok=True)
    locality = r.str(m.get("locality", ""), f"{path}.locality", empty_ok=True)
    if locality and (locality.count("/") > 2 or any(not part for part in locality.split("/"))):
        raise r.fail(f"{path}.locality", f"expected 'region[/zone[/subzone]]', got {locality[:80]!r}")
    weight = 0 if m.get("weight") is None else r.int(m["weight"], f"{path}.weight", 0, MAX_WEIGHT)
    sa = r.str(m.get("serviceAccount", ""), f"{path}.serviceAccount", empty_ok=True)
    if sa and not _DNS_LABEL.fullmatch(sa):
        raise r.fail(f"{path}.serviceAccount", f"{sa[:80]!r} is not a valid service account name")
    return EntrySpec(address, MappingProxyType(ports), labels, network, locality, weight, sa)


def _status_addresses(r: _R, status: Any, hosts: tuple[str, ...]) -> Mapping[str, tuple[str, ...]]:
    """``status.addresses: [{value, host}]``: the VIPs istiod auto-allocated (IP autoallocation v2)."""
    if status is None:
        return EMPTY
    st = r.map(status, "status")
    out: dict[str, list[str]] = {}
    for i, a in enumerate(r.list(st.get("addresses"), "status.addresses")):
        path = f"status.addresses[{i}]"
        m = r.map(a, path)
        value = r.str(m.get("value"), f"{path}.value")
        ip = _ip_or_none(value)
        if ip is None:
            raise r.fail(f"{path}.value", f"{value[:80]!r} is not an IP address")
        host = r.str(m.get("host"), f"{path}.host").lower()
        if host in hosts:
            out.setdefault(host, []).append(ip)
    return MappingProxyType({h: tuple(v) for h, v in out.items()})


# ---------------------------------------------------------------------------------------------
# Conversion


@dataclass(frozen=True)
class Item:
    """One converted object with where it came from, for the loader's duplicate checks and messages."""

    obj: Any                           # Service | Workload
    where: Where
    path: str


@dataclass(frozen=True)
class Conversion:
    services: tuple[Item, ...] = ()
    workloads: tuple[Item, ...] = ()
    # pod uid → {"<ns>/<hostname>": {service port: target port}}: ServiceEntry memberships of selected pods
    pod_services: Mapping[str, Mapping[str, Mapping[int, int]]] = field(default_factory=lambda: EMPTY)
    warnings: tuple[str, ...] = ()     # full lines, as MeshConfig.warnings holds them


def convert(service_entries: Sequence[ServiceEntry], workload_entries: Sequence[WorkloadEntry], *,
            pods: Sequence[Workload] = (), taken_services: Iterable[str] = (), gateways: Sequence[Any] = (),
            cluster_id: str = DEFAULT_CLUSTER_ID) -> Conversion:
    """ServiceEntries and WorkloadEntries → inventory services and workloads.

    ``pods``: the ztunnel-shaped workloads (selectable by ``workloadSelector``); ``taken_services``: the keys
    (``ns/hostname``) of ztunnel-shaped services, which win over a ServiceEntry for the same host in the same
    namespace (``selectWorkloadServices``: "a Kubernetes Service always wins, else the oldest");
    ``gateways``: the loaded Gateway API Gateways, to check a waypoint binding's ``istio.io/waypoint-for``."""
    warnings: list[str] = []
    taken = set(taken_services)
    k8s_hosts = {key.partition("/")[2] for key in taken}
    gw_by_key = {(g.namespace, g.name): g for g in gateways}
    services: list[Item] = []
    se_services: dict[tuple[str, str], list[Service]] = {}      # (ns, se name) → the services it produced
    canonical_hosts: set[str] = set(k8s_hosts)
    for se in sorted(service_entries, key=lambda s: s.order):
        where = se.where.with_resource("ServiceEntry", f"{se.namespace}/{se.name}")
        waypoint = _waypoint(se.labels, se.namespace, gw_by_key, "service", where, "metadata.labels", warnings)
        produced = []
        for i, host in enumerate(se.hosts):
            path = f"spec.hosts[{i}]"
            key = f"{se.namespace}/{host}"
            if host.startswith("*"):
                warnings.append(ConfigError(where, path, "wildcard hosts are only reachable through DYNAMIC_DNS "
                                                         "egress, which hbone-proxy does not implement; host "
                                                         "skipped").message)
                continue
            if key in taken:
                warnings.append(ConfigError(where, path, f"a service {key} is already defined; it wins over this "
                                                         "ServiceEntry (istiod selectWorkloadServices: a Kubernetes "
                                                         "Service always wins, else the oldest)").message)
                continue
            taken.add(key)
            svc = _service(se, host, i, waypoint, where, warnings)
            if host not in canonical_hosts:
                # selectWorkloadServices: with no Kubernetes Service for the host, the oldest entry is canonical.
                svc = dataclasses.replace(svc, canonical=True)
                canonical_hosts.add(host)
            produced.append(svc)
            services.append(Item(svc, where, path))
        se_services[(se.namespace, se.name)] = produced

    workloads: list[Item] = []
    by_ns: dict[str, list[tuple[ServiceEntry, list[Service]]]] = {}
    for se in service_entries:
        if se.workload_selector and se_services.get((se.namespace, se.name)):
            by_ns.setdefault(se.namespace, []).append((se, se_services[(se.namespace, se.name)]))
    for se in service_entries:
        produced = se_services.get((se.namespace, se.name), [])
        if not produced:
            continue   # "pruned by deduplication. Endpoints from this ServiceEntry will not be sent"
        workloads.extend(_inline_workloads(se, produced, gw_by_key, cluster_id, warnings))
    for we in sorted(workload_entries, key=lambda w: w.order):
        where = we.where.with_resource("WorkloadEntry", f"{we.namespace}/{we.name}")
        selecting = [(se, svcs) for se, svcs in by_ns.get(we.namespace, ()) if _selects(se.workload_selector, we.labels)]
        memberships = {s.key: _entry_ports(se, s, we.spec) for se, svcs in selecting for s in svcs}
        waypoint = _waypoint(we.labels, we.namespace, gw_by_key, "workload", where, "metadata.labels", warnings)
        w = _workload(
            uid=f"{cluster_id}/networking.istio.io/WorkloadEntry/{we.namespace}/{we.name}", name=we.name,
            namespace=we.namespace, entry=we.spec, labels=we.labels, tunnel_from=(we.labels, we.annotations),
            workload_name=we.labels.get(WORKLOAD_NAME_LABEL, we.name), services=memberships, waypoint=waypoint,
            cluster_id=cluster_id)
        if not w.workload_ips and not any(se.resolution in DNS_RESOLUTIONS for se, _ in selecting):
            # istiod ValidateWorkloadEntry lets a hostname through; only a DNS ServiceEntry's cluster resolves it.
            warnings.append(ConfigError(where, "spec.address", f"{we.spec.address!r} is a hostname: only a DNS "
                                                               "ServiceEntry resolves it, and none selects this "
                                                               "entry; reachable through no service").message)
        workloads.append(Item(w, where, "spec"))
    pod_services: dict[str, dict[str, Mapping[int, int]]] = {}
    for pod in pods:
        for se, svcs in by_ns.get(pod.namespace, ()):
            if _selects(se.workload_selector, pod.labels):
                for s in svcs:
                    # constructServices: a pod's container port named like the SE port would win; the
                    # inventory's pods carry no container ports, so the Service's target port applies.
                    pod_services.setdefault(pod.uid, {})[s.key] = MappingProxyType(dict(s.ports))
    return Conversion(tuple(services), tuple(workloads),
                      MappingProxyType({k: MappingProxyType(v) for k, v in pod_services.items()}), tuple(warnings))


def _selects(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    # krt.FilterSelectsNonEmpty: an empty selector selects nothing.
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _service(se: ServiceEntry, host: str, index: int, waypoint: GatewayAddress | None, where: Where,
             warnings: list[str]) -> Service:
    ports: dict[int, int] = {}
    app: dict[int, str] = {}
    for p in se.ports:
        if p.protocol == "UDP":
            continue
        ports[p.number] = p.target_port or p.number      # constructServiceEntries: "if target == 0 {target = p.Number}"
        proto = PROTOCOLS.get(p.protocol)
        if proto is not None:
            app[p.number] = proto
    addresses = se.addresses
    if not addresses and se.resolution != "NONE":
        addresses = se.status_addresses.get(host, ())     # istiod's auto-allocated VIPs (status.addresses)
    vips = tuple(NetworkAddress("", a) for a in addresses if "/" not in a)
    cidrs = tuple(CidrVip("", a) for a in addresses if "/" in a)
    if vips and index > 0 and se.addresses:
        # Every host of the entry gets the same addresses in istiod; the inventory maps a VIP to one service,
        # so VIP-addressed traffic belongs to the first host (the others stay reachable by name).
        warnings.append(ConfigError(where, f"spec.hosts[{index}]", f"shares spec.addresses with "
                                                                   f"{se.hosts[0]!r}; connections to those VIPs are "
                                                                   f"attributed to {se.hosts[0]!r}").message)
        vips = ()
    if not vips and not cidrs and not (index > 0 and se.addresses):
        warnings.append(ConfigError(where, f"spec.hosts[{index}]", "no spec.addresses (and no auto-allocated "
                                                                   "status.addresses): reachable by hostname only "
                                                                   "(SOCKS5), not by a VIP").message)
    if se.resolution == "NONE" and waypoint is not None:
        # The waypoint would need Envoy's ORIGINAL_DST cluster for it, which it does not have (found by review).
        warnings.append(ConfigError(where, "spec.resolution", "NONE (passthrough) through a waypoint is not "
                                                              "implemented: the waypoint has no endpoint to send "
                                                              "these connections to (503 UH)").message)
    if cidrs:
        warnings.append(ConfigError(where, "spec.addresses", "CIDR addresses are kept as cidrVips, but the node "
                                                             "proxy matches exact VIPs only").message)
    lb = None
    if se.resolution == "NONE":
        # ztunnel state.rs find_upstream: "if lb.mode == LoadBalancerMode::Passthrough { return
        # Some(UpstreamDestination::OriginalDestination) }" (proxy/node/outbound.py _to_service).
        lb = LoadBalancer((), "Passthrough", "AllowAll")
    return Service(
        name=se.name, namespace=se.namespace, hostname=host, vips=vips, ports=MappingProxyType(ports),
        app_protocols=MappingProxyType(app), subject_alt_names=se.subject_alt_names, waypoint=waypoint,
        cidr_vips=cidrs, load_balancer=lb)


def _entry_ports(se: ServiceEntry, svc: Service, entry: EntrySpec) -> Mapping[int, int]:
    """constructServicesFromWorkloadEntry for a ServiceEntry: "name matching between the port names" — the
    entry's ``ports[<SE port name>]`` if present, else the Service's target port."""
    out = {}
    for p in se.ports:
        if p.number in svc.ports:
            out[p.number] = entry.ports.get(p.name, svc.ports[p.number])
    return MappingProxyType(out)


def _inline_workloads(se: ServiceEntry, services: list[Service], gw_by_key: Mapping, cluster_id: str,
                      warnings: list[str]) -> list[Item]:
    where = se.where.with_resource("ServiceEntry", f"{se.namespace}/{se.name}")
    entries: list[tuple[EntrySpec, list[Service], str]]
    if se.endpoints:
        entries = [(e, services, f"spec.endpoints[{i}]") for i, e in enumerate(se.endpoints)]
    elif se.resolution in DNS_RESOLUTIONS and se.workload_selector is None:
        # serviceEntryWorkloadBuilder implicitEndpoints: "For implicit endpoints, we generate each one from the
        # hostname it was from".
        entries = [(EntrySpec(s.hostname), [s], f"spec.hosts[{se.hosts.index(s.hostname)}]") for s in services]
    else:
        return []
    out = []
    for entry, svcs, path in entries:
        # computeWaypoint on an ObjectMeta made of the entry's own labels ("Endpoint does not have a real
        # ObjectMeta, so make one"); implicit endpoints get none.
        waypoint = (_waypoint(entry.labels, se.namespace, gw_by_key, "workload", where, f"{path}.labels", warnings)
                    if se.endpoints else None)
        w = _workload(
            uid=f"{cluster_id}/networking.istio.io/ServiceEntry/{se.namespace}/{se.name}/{entry.address}",
            name=se.name, namespace=se.namespace, entry=entry, labels=entry.labels,
            tunnel_from=(se.labels, se.annotations), workload_name=se.name,
            services={s.key: _entry_ports(se, s, entry) for s in svcs}, waypoint=waypoint, cluster_id=cluster_id,
            canonical_labels=se.labels, resolution=se.resolution)
        out.append(Item(w, where, path))
    return out


def _workload(*, uid: str, name: str, namespace: str, entry: EntrySpec, labels: Mapping[str, str],
              tunnel_from: tuple[Mapping[str, str], Mapping[str, str]], workload_name: str,
              services: Mapping[str, Mapping[int, int]], waypoint: GatewayAddress | None, cluster_id: str,
              canonical_labels: Mapping[str, str] | None = None, resolution: str = "") -> Workload:
    ip = _ip_or_none(entry.address)
    region, zone, subzone = (entry.locality.split("/") + ["", "", ""])[:3]   # labelutil.SplitLocalityLabel
    t_labels, t_annotations = tunnel_from
    # setTunnelProtocol: HBONE when redirection is enabled by annotation, or the workload supports the tunnel.
    native = "http" in (t_labels.get(TUNNEL_LABEL, "")).split(",")
    hbone = native or t_annotations.get(REDIRECTION_ANNOTATION) == "enabled"
    canon = canonical_labels if canonical_labels is not None else labels
    return Workload(
        uid=uid, name=name, namespace=namespace, workload_ips=(ip,) if ip else (),
        hostname="" if ip else entry.address,
        service_account=entry.service_account or DEFAULT_SERVICE_ACCOUNT,   # ztunnel's XDS default for ""
        protocol="HBONE" if hbone else "TCP", native_tunnel=native,
        network=entry.network, waypoint=waypoint, labels=MappingProxyType(dict(labels)),
        canonical_name=next((canon[k] for k in CANONICAL_NAME_LABELS if canon.get(k)), workload_name),
        canonical_revision=next((canon[k] for k in CANONICAL_REVISION_LABELS if canon.get(k)), "latest"),
        workload_name=workload_name, workload_type="pod",   # "HACK to impersonate pod" (workloads.go)
        cluster_id=cluster_id, locality=Locality(region, zone, subzone),
        capacity=entry.weight if entry.weight > 0 else 1,
        services=MappingProxyType(dict(services)),
        # Envoy: DNS_ROUND_ROBIN → a LOGICAL_DNS cluster (the first address), DNS → STRICT_DNS (any of them).
        dns_lookup=("LOGICAL_DNS" if resolution == "DNS_ROUND_ROBIN" else "STRICT_DNS") if not ip else "")


def _waypoint(labels: Mapping[str, str], namespace: str, gw_by_key: Mapping, traffic: str, where: Where,
              path: str, warnings: list[str]) -> GatewayAddress | None:
    """fetchWaypointForService / fetchWaypointForWorkload from the object's own labels: ``istio.io/use-waypoint:
    <gateway name>`` (``none`` opts out), in ``istio.io/use-waypoint-namespace`` or the object's namespace. The
    waypoint is named by its Service's hostname, as istiod's ``Waypoint.GetAddress`` does. A loaded Gateway whose
    ``istio.io/waypoint-for`` does not take this kind of traffic is not bound (istiod: a status error)."""
    name = labels.get(USE_WAYPOINT)
    if not name or name == WAYPOINT_NONE:
        return None
    ns = labels.get(USE_WAYPOINT_NAMESPACE) or namespace
    gw = gw_by_key.get((ns, name))
    if gw is not None:
        takes = getattr(gw, "waypoint_for", "service")
        if takes not in (traffic, "all"):
            warnings.append(ConfigError(where, f"{path}[{USE_WAYPOINT!r}]",
                                        f"waypoint {ns}/{name} is for {takes!r} traffic, not {traffic} traffic "
                                        "(istio.io/waypoint-for); not bound").message)
            return None
    return GatewayAddress(hostname=f"{name}.{ns}.svc.{CLUSTER_DOMAIN}", namespace=ns, hbone_mtls_port=HBONE_PORT)


__all__ = ["ServiceEntry", "WorkloadEntry", "EntrySpec", "SePort", "Conversion", "Item", "convert",
           "parse_service_entry", "parse_workload_entry", "VERSIONS"]
