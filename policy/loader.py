"""From documents to a ``MeshConfig``: inventory parsing and resource dispatch.

A document (see ``policy.documents``) is either

1. an **inventory** in ztunnel's local-config shape (reference/ztunnel.md §5): top-level
   ``workloads:``, ``services:``, ``policies:``, camelCase fields, unknown fields rejected (ztunnel's
   serde ``deny_unknown_fields``), plus a workload's ``labels`` and a service's ``appProtocols`` and
   ``trafficDistribution`` (Kubernetes' field, read as the ``loadBalancer`` istiod makes of it); or
2. a **Kubernetes resource** (``apiVersion`` + ``kind``), dispatched by API group and kind to the
   parser that owns it (``policy.authz``, ``policy.authn``, ``policy.routing``, ``policy.serviceentry``).
   ServiceEntries and WorkloadEntries are then converted into inventory services and workloads
   (``_add_entries``), which pass the same duplicate and reference checks as ``workloads:``/``services:``.

All problems across all documents are collected and raised together as one ``ConfigErrors``, one
line each: ``FILE: document N (Kind ns/name): field.path: problem``.

Defaults that differ from ztunnel's local file, on purpose:
- ``trustDomain`` defaults to ``cluster.local`` and ``serviceAccount`` to ``default``: what istiod's
  XDS conversion sends (ztunnel's *file* leaves them empty, which yields an identity no certificate
  carries — a trap ztunnel.md §5.3 warns about).
- ``uid`` defaults to ``<clusterId or Kubernetes>//v1/Pod/<namespace>/<name>`` (ztunnel's uid shape)
  so a hand-written inventory need not repeat it; a workload needs a uid or a name.
- a waypoint's ``hboneMtlsPort`` defaults to 15008, the HBONE port.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

from policy.errors import ConfigError, ConfigErrors, Where
from policy.inventory import (
    DEFAULT_SERVICE_ACCOUNT,
    DEFAULT_TRUST_DOMAIN,
    HBONE_PORT,
    ApplicationTunnel,
    CidrVip,
    Endpoint,
    GatewayAddress,
    Inventory,
    LoadBalancer,
    Locality,
    NetworkAddress,
    Service,
    WeightedWaypoint,
    Workload,
)
from policy.mesh import DEFAULT_ROOT_NAMESPACE, MeshConfig

DEFAULT_CLUSTER_ID = "Kubernetes"  # Istio's default cluster name (values.global.multiCluster.clusterName)
U32_MAX = 2**32 - 1                # ztunnel's capacity / weight fields are u32

# ---------------------------------------------------------------------------------------------
# Resource dispatch: (API group, kind) → accepted versions, and "module:function" of the parser.
# Parsers are imported when first needed, so policy.loader works while a parser module is absent.

@dataclass(frozen=True)
class ResourceKind:
    group: str
    kind: str
    versions: tuple[str, ...]
    parser: str          # "module:function", called as fn(doc, where)
    field: str           # the MeshConfig field the parsed object goes into


RESOURCE_KINDS: tuple[ResourceKind, ...] = (
    ResourceKind("security.istio.io", "AuthorizationPolicy", ("v1", "v1beta1"),
                 "policy.authz.parse:parse_authorization_policy", "authorization_policies"),
    ResourceKind("networking.istio.io", "VirtualService", ("v1", "v1beta1", "v1alpha3"),
                 "policy.routing.parse:parse_virtual_service", "virtual_services"),
    ResourceKind("networking.istio.io", "DestinationRule", ("v1", "v1beta1", "v1alpha3"),
                 "policy.routing.parse:parse_destination_rule", "destination_rules"),
    ResourceKind("gateway.networking.k8s.io", "HTTPRoute", ("v1", "v1beta1"),
                 "policy.routing.parse:parse_http_route", "http_routes"),
    ResourceKind("gateway.networking.k8s.io", "Gateway", ("v1", "v1beta1"),
                 "policy.routing.parse:parse_gateway", "gateways"),
    # GRPCRoute, TCPRoute and TLSRoute share MeshConfig.http_routes with HTTPRoute (the Gateway API routes, each kind
    # its own model): scoping (policy.scope) and the route table read that one list.
    ResourceKind("gateway.networking.k8s.io", "GRPCRoute", ("v1", "v1alpha2"),
                 "policy.routing.gateway_routes:parse_grpc_route", "http_routes"),
    ResourceKind("gateway.networking.k8s.io", "TCPRoute", ("v1alpha2", "v1"),
                 "policy.routing.gateway_routes:parse_tcp_route", "http_routes"),
    ResourceKind("gateway.networking.k8s.io", "TLSRoute", ("v1alpha2", "v1"),
                 "policy.routing.gateway_routes:parse_tls_route", "http_routes"),
    ResourceKind("security.istio.io", "RequestAuthentication", ("v1", "v1beta1"),
                 "policy.authn.parse:parse_request_authentication", "request_authentications"),
    # ServiceEntry / WorkloadEntry are kept as parsed and converted into inventory services and workloads by
    # _build_inventory (policy.serviceentry.convert, as istiod's ambient index converts them for ztunnel).
    ResourceKind("networking.istio.io", "ServiceEntry", ("v1", "v1beta1", "v1alpha3"),
                 "policy.serviceentry:parse_service_entry", "service_entries"),
    ResourceKind("networking.istio.io", "WorkloadEntry", ("v1", "v1beta1", "v1alpha3"),
                 "policy.serviceentry:parse_workload_entry", "workload_entries"),
)
_BY_GROUP_KIND = {(r.group, r.kind): r for r in RESOURCE_KINDS}
SUPPORTED_KINDS_TEXT = ", ".join(f"{r.group}/{'|'.join(r.versions)} {r.kind}" for r in RESOURCE_KINDS)
ZTUNNEL_POLICY_PARSER = "policy.authz.parse:parse_ztunnel_policy"
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"  # Istio's constants.WaypointGatewayClassName

INVENTORY_KEYS = ("workloads", "services", "policies")


def _resolve(spec: str) -> Callable[..., Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------
# Field reading with paths. Conversions raise _Invalid(path, problem); _Fields turns that into a
# ConfigError at the right Where and keeps going, so one run reports every bad field.

# ... up to this many problems. A document may hold 1M nodes (policy.documents), and a 2 MiB list of
# 1M numbers where workloads go made 1M ConfigErrors: 14.6 s, 1 GiB RSS and an 86 MiB message
# (found by fuzzing). The first thousand say what is wrong; reading stops there.
MAX_REPORTED_ERRORS = 1000


class _TooManyErrors(Exception):
    """The error list reached MAX_REPORTED_ERRORS at ``where``: stop reading (see build_mesh_config)."""

    def __init__(self, where: Where):
        super().__init__(where)
        self.where = where


def _check_error_count(errors: list, where: Where) -> None:
    if len(errors) >= MAX_REPORTED_ERRORS:
        raise _TooManyErrors(where)


class _Invalid(Exception):
    def __init__(self, path: str, problem: str):
        super().__init__(problem)
        self.path = path
        self.problem = problem


_MISSING: Any = object()


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _key(path: str, key: Any) -> str:
    """The path of a map entry: ``ports.9080``, ``labels.app``; keys with dots or slashes in
    brackets: ``services['default/reviews.default.svc.cluster.local']``."""
    if isinstance(key, int) or (isinstance(key, str) and _PLAIN_KEY.fullmatch(key)):
        return _join(path, key)
    return f"{path}[{key!r}]"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


class _Fields:
    """One mapping being read: rejects unknown keys, reads each field through a conversion."""

    def __init__(self, ctx: "_Ctx", value: Any, path: str, allowed: Iterable[str]):
        self.ctx = ctx
        self.path = path
        self.ok = isinstance(value, dict)
        self.m: dict = value if self.ok else {}
        self.allowed = tuple(allowed)
        if not self.ok:
            ctx.error(path, f"expected a mapping, got {_type_name(value)}")
            return
        for key in self.m:
            if key not in self.allowed:
                key_path = _key(path, key)
                hint = difflib.get_close_matches(str(key), self.allowed, n=1, cutoff=0.75)
                ctx.error(key_path, "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; known fields: {', '.join(self.allowed)}")

    def get(self, key: str, conv: Callable[[Any, str], Any], default: Any = _MISSING) -> Any:
        path = _join(self.path, key)
        if key not in self.m or (self.m[key] is None and default is not _MISSING):
            if default is _MISSING:
                if self.ok:
                    self.ctx.error(path, "required field is missing")
                return None
            return default
        try:
            return conv(self.m[key], path)
        except _Invalid as bad:
            self.ctx.error(bad.path, bad.problem)
            return None if default is _MISSING else default


class _Ctx:
    """Errors and warnings for one document (or one inventory item), at one Where."""

    def __init__(self, where: Where, errors: list[ConfigError], warnings: list[str]):
        self.where = where
        self.errors = errors
        self.warnings = warnings
        self.failed = False

    def error(self, path: str, problem: str) -> None:
        self.failed = True
        self.errors.append(ConfigError(self.where, path, problem))
        _check_error_count(self.errors, self.where)

    def warn(self, path: str, problem: str) -> None:
        self.warnings.append(ConfigError(self.where, path, problem).message)

    def at(self, where: Where) -> "_Ctx":
        return _Ctx(where, self.errors, self.warnings)


# --- scalar conversions ----------------------------------------------------------------------

def _str(v: Any, path: str) -> str:
    if not isinstance(v, str):
        raise _Invalid(path, f"expected a string, got {_type_name(v)}")
    return v


def _nonempty_str(v: Any, path: str) -> str:
    s = _str(v, path)
    if not s:
        raise _Invalid(path, "must not be empty")
    return s


def _bool(v: Any, path: str) -> bool:
    if not isinstance(v, bool):
        raise _Invalid(path, f"expected true or false, got {_type_name(v)}")
    return v


def _int(v: Any, path: str, lo: int, hi: int, what: str = "an integer") -> int:
    # bool is an int subclass in Python; `port: true` is a mistake, not port 1.
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, str) and v.isdigit() and len(v) < 12:
            v = int(v)  # JSON cannot have integer map keys; "9080" as a key is 9080
        else:
            raise _Invalid(path, f"expected {what}, got {_type_name(v)}")
    if not lo <= v <= hi:
        raise _Invalid(path, f"{v} is out of range ({what} {lo}–{hi})")
    return v


def _port(v: Any, path: str) -> int:
    return _int(v, path, 1, 65535, "a port")


def _target_port(v: Any, path: str) -> int:
    # ztunnel: "0 = named port, resolved per endpoint" (Service.ports, reference/ztunnel.md §5.3)
    return _int(v, path, 0, 65535, "a target port (0 = named port)")


def _u32(v: Any, path: str) -> int:
    return _int(v, path, 0, U32_MAX, "a non-negative integer")


def _enum(*choices: str) -> Callable[[Any, str], str]:
    def conv(v: Any, path: str) -> str:
        if v not in choices or not isinstance(v, str):
            raise _Invalid(path, f"expected one of {', '.join(choices)}, got {_type_name(v)}")
        return v
    return conv


def _ip(v: Any, path: str) -> str:
    s = _str(v, path)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise _Invalid(path, f"{s!r} is not an IP address") from None


def _cidr(v: Any, path: str) -> str:
    s = _str(v, path)
    try:
        return str(ipaddress.ip_network(s, strict=False))
    except ValueError:
        raise _Invalid(path, f"{s!r} is not a CIDR (e.g. 10.0.0.0/8)") from None


# Kubernetes object names: namespaces and Service names are RFC 1123 labels. These are used with
# fullmatch: with match, a `$` also matches before a final newline, so "default\n" passed as a
# namespace (the same bug the fuzzer found in hbone/connect.py's header-name check).
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_NAME_LABEL = re.compile(r"[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?")
# Label keys: optional DNS-subdomain prefix + "/" + name (≤ 63, alnum at both ends, -_. inside).
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def _namespace(v: Any, path: str) -> str:
    s = _nonempty_str(v, path)
    if not _DNS_LABEL.fullmatch(s):
        raise _Invalid(path, f"{s!r} is not a valid namespace (lower-case RFC 1123 label, e.g. 'default')")
    return s


def _dns_label(v: Any, path: str) -> str:
    s = _nonempty_str(v, path)
    if not _DNS_LABEL.fullmatch(s):
        raise _Invalid(path, f"{s!r} is not a valid name (lower-case RFC 1123 label)")
    return s


def _hostname(v: Any, path: str) -> str:
    """A DNS name; folded to lower case because host matching is case-insensitive (RFC 4343)."""
    s = _nonempty_str(v, path)
    labels = s.rstrip(".").split(".")
    if len(s) > 253 or not all(_DNS_NAME_LABEL.fullmatch(label) for label in labels):
        raise _Invalid(path, f"{s!r} is not a valid hostname")
    return s.rstrip(".").lower()


def _list(conv: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple]:
    def read(v: Any, path: str) -> tuple:
        if not isinstance(v, list):
            raise _Invalid(path, f"expected a list, got {_type_name(v)}")
        return tuple(conv(item, f"{path}[{i}]") for i, item in enumerate(v))
    return read


def _network_address(v: Any, path: str) -> NetworkAddress:
    s = _str(v, path)
    network, slash, ip = s.partition("/")
    if not slash:
        raise _Invalid(path, f"expected '<network>/<ip>', got {s!r} (write '/{s}' for the default network)")
    return NetworkAddress(network, _ip(ip, path))


def _gateway_address(v: Any, path: str, ctx: "_Ctx") -> GatewayAddress | None:
    f = _Fields(ctx, v, path, ("destination", "hboneMtlsPort"))
    if not f.ok:
        return None
    dest = f.get("destination", _str)
    port = f.get("hboneMtlsPort", _port, HBONE_PORT)
    if dest is None:
        return None
    dpath = _join(path, "destination")
    left, slash, right = dest.partition("/")
    if not slash or not right:
        ctx.error(dpath, f"expected '/<ip>', '<network>/<ip>' or '<namespace>/<hostname>', got {dest!r}")
        return None
    try:
        ip = str(ipaddress.ip_address(right))
    except ValueError:
        ip = None
    if ip is not None:
        return GatewayAddress(address=NetworkAddress(left, ip), hbone_mtls_port=port)
    try:
        ns = _namespace(left, dpath) if left else None
        host = _hostname(right, dpath)
    except _Invalid as bad:
        ctx.error(bad.path, bad.problem + " (expected '/<ip>' or '<namespace>/<hostname>')")
        return None
    if ns is None:
        ctx.error(dpath, f"{dest!r}: a hostname destination needs a namespace ('<namespace>/<hostname>'); "
                         f"an IP needs a valid address")
        return None
    return GatewayAddress(hostname=host, namespace=ns, hbone_mtls_port=port)


def _port_map(key_conv: Callable[[Any, str], int], value_conv: Callable[[Any, str], int]):
    def read(v: Any, path: str) -> Mapping[int, int]:
        if not isinstance(v, dict):
            raise _Invalid(path, f"expected a map of port: port, got {_type_name(v)}")
        out: dict[int, int] = {}
        for k, val in v.items():
            kp = key_conv(k, _key(path, k))
            if kp in out:
                raise _Invalid(_key(path, k), f"port {kp} listed twice")
            out[kp] = value_conv(val, _key(path, k))
        return MappingProxyType(out)
    return read


_service_ports = _port_map(_port, _target_port)
_workload_ports = _port_map(_port, _port)


def _labels(v: Any, path: str) -> Mapping[str, str]:
    if not isinstance(v, dict):
        raise _Invalid(path, f"expected a map of label: value, got {_type_name(v)}")
    out: dict[str, str] = {}
    for k, val in v.items():
        kp = _key(path, k)
        if not isinstance(k, str):
            raise _Invalid(kp, f"label keys must be strings, got {_type_name(k)}")
        prefix, slash, name = k.rpartition("/")
        if not _LABEL_NAME.fullmatch(name) or (slash and not _hostname_ok(prefix)):
            raise _Invalid(kp, f"{k!r} is not a valid label key")
        if not isinstance(val, str):
            # Kubernetes label values are strings; `version: 1` or `canary: true` must be quoted.
            raise _Invalid(kp, f"label values must be strings (quote it), got {_type_name(val)}")
        if val and not _LABEL_NAME.fullmatch(val):
            raise _Invalid(kp, f"{val!r} is not a valid label value (≤ 63 of A-Z a-z 0-9 - _ ., alphanumeric at both ends)")
        out[k] = val
    return MappingProxyType(out)


def _hostname_ok(s: str) -> bool:
    try:
        _hostname(s, "")
        return True
    except _Invalid:
        return False


# Kubernetes Service.ports[].appProtocol values we act on (DESIGN §4); others: sniffed.
APP_PROTOCOLS = ("http", "http2", "grpc", "tcp")


# ---------------------------------------------------------------------------------------------
# Inventory items

WORKLOAD_FIELDS = (
    "uid", "name", "namespace", "trustDomain", "serviceAccount", "workloadIps", "network", "protocol",
    "networkMode", "waypoint", "networkGateway", "workloadName", "workloadType", "canonicalName",
    "canonicalRevision", "hostname", "node", "nativeTunnel", "applicationTunnel", "authorizationPolicies",
    "status", "clusterId", "locality", "capacity", "services", "labels",
)
SERVICE_FIELDS = (
    "name", "namespace", "hostname", "vips", "ports", "appProtocols", "cidrVips", "endpoints",
    "subjectAltNames", "waypoint", "weightedWaypoints", "loadBalancer", "ipFamilies", "canonical", "visibility",
    "trafficDistribution",
)


def _peek_name(item: Any) -> str:
    """"ns/name" for a Where, best effort, before validation."""
    if not isinstance(item, dict):
        return ""
    ns, name = item.get("namespace"), item.get("name")
    ns = ns if isinstance(ns, str) else ""
    name = name if isinstance(name, str) else ""
    if not name and isinstance(item.get("uid"), str):
        name = item["uid"]
    return f"{ns}/{name}" if ns or name else ""


def parse_workload(item: Any, ctx: _Ctx, path: str) -> Workload | None:
    """One entry of ``workloads:`` (ztunnel's LocalWorkload + ``labels``)."""
    ctx = ctx.at(ctx.where.with_resource("Workload", _peek_name(item)))
    f = _Fields(ctx, item, path, WORKLOAD_FIELDS)
    if not f.ok:
        return None
    namespace = f.get("namespace", _namespace)
    name = f.get("name", _str, "")
    uid = f.get("uid", _nonempty_str, "")
    cluster_id = f.get("clusterId", _str, "")
    ips = f.get("workloadIps", _list(_ip))
    hostname = f.get("hostname", lambda v, p: _hostname(v, p) if v != "" else "", "")
    if ips == () and not hostname:
        ctx.error(_join(path, "workloadIps"), "needs at least one IP (or set hostname)")
    if not uid:
        if name and namespace:
            uid = f"{cluster_id or DEFAULT_CLUSTER_ID}//v1/Pod/{namespace}/{name}"
        elif f.ok and namespace is not None:
            ctx.error(_join(path, "uid"), "a workload needs a uid or a name")
    waypoint = f.get("waypoint", lambda v, p: _gateway_address(v, p, ctx), None)
    network_gateway = f.get("networkGateway", lambda v, p: _gateway_address(v, p, ctx), None)
    services = f.get("services", lambda v, p: _workload_services(v, p, ctx), MappingProxyType({}))
    w = dict(
        uid=uid, name=name, namespace=namespace, workload_ips=ips,
        service_account=f.get("serviceAccount", _nonempty_str, DEFAULT_SERVICE_ACCOUNT),
        trust_domain=f.get("trustDomain", _nonempty_str, DEFAULT_TRUST_DOMAIN),
        protocol=f.get("protocol", _enum("TCP", "HBONE"), "TCP"),
        node=f.get("node", _str, ""),
        network=f.get("network", _str, ""),
        waypoint=waypoint,
        labels=f.get("labels", _labels, MappingProxyType({})),
        canonical_name=f.get("canonicalName", _str, ""),
        canonical_revision=f.get("canonicalRevision", _str, ""),
        workload_name=f.get("workloadName", _str, ""),
        workload_type=f.get("workloadType", _str, ""),
        cluster_id=cluster_id,
        locality=f.get("locality", lambda v, p: _locality(v, p, ctx), Locality()),
        capacity=f.get("capacity", _u32, 1),
        status=f.get("status", _enum("Healthy", "Unhealthy"), "Healthy"),
        services=services,
        authorization_policies=f.get("authorizationPolicies", _list(_policy_key), ()),
        hostname=hostname,
        network_mode=f.get("networkMode", _enum("Standard", "HostNetwork"), "Standard"),
        network_gateway=network_gateway,
        native_tunnel=f.get("nativeTunnel", _bool, False),
        application_tunnel=f.get("applicationTunnel", lambda v, p: _application_tunnel(v, p, ctx), None),
    )
    if ctx.failed:
        return None
    return Workload(**w)


def _policy_key(v: Any, path: str) -> str:
    s = _str(v, path)
    ns, slash, name = s.partition("/")
    if not slash or not name:
        raise _Invalid(path, f"expected '<namespace>/<name>', got {s!r}")
    return s


def _workload_services(v: Any, path: str, ctx: _Ctx) -> Mapping[str, Mapping[int, int]]:
    if not isinstance(v, dict):
        raise _Invalid(path, f"expected a map of '<namespace>/<hostname>': {{port: targetPort}}, got {_type_name(v)}")
    out: dict[str, Mapping[int, int]] = {}
    for k, ports in v.items():
        kp = _key(path, k)
        if not isinstance(k, str) or "/" not in k:
            raise _Invalid(kp, f"expected a key '<namespace>/<hostname>', got {_type_name(k)}")
        ns, _, host = k.partition("/")
        key = f"{_namespace(ns, kp)}/{_hostname(host, kp)}"
        out[key] = _workload_ports(ports if ports is not None else {}, kp)
    return MappingProxyType(out)


def _locality(v: Any, path: str, ctx: _Ctx) -> Locality:
    # ztunnel: "all three keys required when present"
    f = _Fields(ctx, v, path, ("region", "zone", "subzone"))
    if not f.ok:
        return Locality()
    return Locality(f.get("region", _str) or "", f.get("zone", _str) or "", f.get("subzone", _str) or "")


def _application_tunnel(v: Any, path: str, ctx: _Ctx) -> ApplicationTunnel | None:
    f = _Fields(ctx, v, path, ("protocol", "port"))
    if not f.ok:
        return None
    return ApplicationTunnel(f.get("protocol", _enum("NONE", "PROXY"), "NONE"), f.get("port", _port, None))


def parse_service(item: Any, ctx: _Ctx, path: str) -> Service | None:
    """One entry of ``services:`` (ztunnel's Service + ``appProtocols``)."""
    ctx = ctx.at(ctx.where.with_resource("Service", _peek_name(item)))
    f = _Fields(ctx, item, path, SERVICE_FIELDS)
    if not f.ok:
        return None
    s = dict(
        name=f.get("name", _dns_label),
        namespace=f.get("namespace", _namespace),
        hostname=f.get("hostname", _hostname),
        vips=f.get("vips", _list(_network_address)),
        ports=f.get("ports", _service_ports),
        app_protocols=f.get("appProtocols", _app_protocols, MappingProxyType({})),
        subject_alt_names=f.get("subjectAltNames", _list(_nonempty_str), ()),
        waypoint=f.get("waypoint", lambda v, p: _gateway_address(v, p, ctx), None),
        endpoints=f.get("endpoints", lambda v, p: _endpoints(v, p, ctx), MappingProxyType({})),
        canonical=f.get("canonical", _bool, False),
        cidr_vips=f.get("cidrVips", _list(lambda v, p: _cidr_vip(v, p, ctx)), ()),
        weighted_waypoints=f.get("weightedWaypoints", _list(lambda v, p: _weighted_waypoint(v, p, ctx)), ()),
        load_balancer=f.get("loadBalancer", lambda v, p: _load_balancer(v, p, ctx), None),
        ip_families=f.get("ipFamilies", _enum("Dual", "IPv4", "IPv6"), None),
        visibility=f.get("visibility", _enum("Public", "Namespace"), "Public"),
    )
    distribution = f.get("trafficDistribution", _enum(*TRAFFIC_DISTRIBUTIONS), None)
    if distribution is not None:
        if s["load_balancer"] is not None:
            ctx.error(_join(path, "trafficDistribution"), "set either loadBalancer or trafficDistribution, not both "
                      "(istiod derives the one from the other)")
        s["load_balancer"] = TRAFFIC_DISTRIBUTIONS[distribution]
    ports = s["ports"]
    for p in s["app_protocols"] or {}:
        if ports is not None and p not in ports:
            ctx.error(_key(_join(path, "appProtocols"), p), f"port {p} is not one of the service's ports {sorted(ports)}")
    if ctx.failed:
        return None
    return Service(**s)


def _app_protocols(v: Any, path: str) -> Mapping[int, str]:
    if not isinstance(v, dict):
        raise _Invalid(path, f"expected a map of port: {'|'.join(APP_PROTOCOLS)}, got {_type_name(v)}")
    out = {}
    for k, proto in v.items():
        port = _port(k, _key(path, k))
        out[port] = _enum(*APP_PROTOCOLS)(proto, _key(path, k))
    return MappingProxyType(out)


def _endpoints(v: Any, path: str, ctx: _Ctx) -> Mapping[str, Endpoint]:
    if not isinstance(v, dict):
        raise _Invalid(path, f"expected a map of workloadUid: endpoint, got {_type_name(v)}")
    out: dict[str, Endpoint] = {}
    for uid, ep in v.items():
        ep_path = _key(path, uid)
        if not isinstance(uid, str) or not uid:
            raise _Invalid(ep_path, f"endpoint keys are workload uids (strings), got {_type_name(uid)}")
        # ztunnel: workloadUid, port and status are all required here.
        f = _Fields(ctx, ep, ep_path, ("workloadUid", "port", "status"))
        if not f.ok:
            continue
        wuid = f.get("workloadUid", _nonempty_str)
        ports = f.get("port", _workload_ports)
        status = f.get("status", _enum("Healthy", "Unhealthy"))
        if wuid is not None and wuid != uid:
            ctx.error(_join(ep_path, "workloadUid"), f"{wuid!r} differs from the key {uid!r}")
        if wuid is not None and ports is not None and status is not None:
            out[uid] = Endpoint(uid, ports, status)
    return MappingProxyType(out)


def _cidr_vip(v: Any, path: str, ctx: _Ctx) -> CidrVip | None:
    f = _Fields(ctx, v, path, ("network", "cidr"))
    if not f.ok:
        return None
    return CidrVip(f.get("network", _str, ""), f.get("cidr", _cidr) or "")


def _weighted_waypoint(v: Any, path: str, ctx: _Ctx) -> WeightedWaypoint | None:
    f = _Fields(ctx, v, path, ("destination", "weight"))
    if not f.ok:
        return None
    dest = f.get("destination", lambda d, p: _gateway_address(d, p, ctx))
    weight = f.get("weight", _u32)
    return WeightedWaypoint(dest, weight) if dest is not None and weight is not None else None


ROUTING_PREFERENCES = ("Region", "Zone", "Subzone", "Node", "Cluster", "Network")

# A Kubernetes Service's ``spec.trafficDistribution`` as istiod hands it to ztunnel
# (serviceregistry/kube/controller/ambient/services.go): model.GetTrafficDistribution maps "PreferClose" and
# "PreferSameZone" to TrafficDistributionPreferSameZone → preferSameZoneLoadBalancer ``{routingPreference:
# [NETWORK, REGION, ZONE], mode: FAILOVER}`` ("Prefer endpoints in close zones, but allow spilling over to further
# endpoints where required"); "PreferSameNode" → preferSameNodeLoadBalancer ``[NETWORK, REGION, ZONE, SUBZONE,
# NODE]``. The waypoint reads the same loadBalancer back as istiod's Envoy failoverPriority
# (policy.routing.endpoints.service_locality_setting). The Kubernetes API server rejects other values.
TRAFFIC_DISTRIBUTIONS: Mapping[str, LoadBalancer] = MappingProxyType({
    "PreferClose": LoadBalancer(("Network", "Region", "Zone"), "Failover", "OnlyHealthy"),
    "PreferSameZone": LoadBalancer(("Network", "Region", "Zone"), "Failover", "OnlyHealthy"),
    "PreferSameNode": LoadBalancer(("Network", "Region", "Zone", "Subzone", "Node"), "Failover", "OnlyHealthy"),
})


def _load_balancer(v: Any, path: str, ctx: _Ctx) -> LoadBalancer | None:
    # ztunnel: routingPreferences, mode and healthPolicy are all required when loadBalancer is present.
    f = _Fields(ctx, v, path, ("routingPreferences", "mode", "healthPolicy"))
    if not f.ok:
        return None
    return LoadBalancer(
        f.get("routingPreferences", _list(_enum(*ROUTING_PREFERENCES))) or (),
        f.get("mode", _enum("Standard", "Strict", "Failover", "Passthrough")) or "Standard",
        f.get("healthPolicy", _enum("OnlyHealthy", "AllowAll")) or "OnlyHealthy",
    )


# ---------------------------------------------------------------------------------------------
# Documents → MeshConfig

@dataclass
class _Collected:
    workloads: list[tuple[Workload, Where, str]] = field(default_factory=list)
    services: list[tuple[Service, Where, str]] = field(default_factory=list)
    resources: dict[str, list[Any]] = field(default_factory=lambda: {r.field: [] for r in RESOURCE_KINDS})
    seen: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (kind, ns, name) → where first
    derived: set[int] = field(default_factory=set)   # ids of the workloads/services made from Service/WorkloadEntries


def build_mesh_config(
    docs: Sequence[tuple[Where, dict]],
    *,
    sources: Sequence[str] = (),
    root_namespace: str = DEFAULT_ROOT_NAMESPACE,
) -> MeshConfig:
    """Parse every document; raise ``ConfigErrors`` with all problems, or return the ``MeshConfig``."""
    errors: list[ConfigError] = []
    warnings: list[str] = []
    got = _Collected()
    try:
        inventory = _build_mesh_parts(docs, got, errors, warnings)
    except _TooManyErrors as stop:
        del errors[MAX_REPORTED_ERRORS:]   # (a parser's ConfigErrors may have added a few at once)
        errors.append(ConfigError(stop.where, "", f"more than {MAX_REPORTED_ERRORS} problems; "
                                                  "the rest of the configuration was not checked"))
        raise ConfigErrors(errors) from None
    if errors:
        raise ConfigErrors(errors)
    for gw in got.resources["gateways"]:
        cls = getattr(gw, "gateway_class", WAYPOINT_GATEWAY_CLASS)
        if cls != WAYPOINT_GATEWAY_CLASS:
            warnings.append(f"Gateway {gw.namespace}/{gw.name}: gatewayClassName {cls!r} is not "
                            f"{WAYPOINT_GATEWAY_CLASS!r}; no waypoint serves it")
    return MeshConfig(
        inventory=inventory,
        authorization_policies=tuple(got.resources["authorization_policies"]),
        request_authentications=tuple(got.resources["request_authentications"]),
        virtual_services=tuple(got.resources["virtual_services"]),
        destination_rules=tuple(got.resources["destination_rules"]),
        http_routes=tuple(got.resources["http_routes"]),
        gateways=tuple(got.resources["gateways"]),
        service_entries=tuple(got.resources["service_entries"]),
        workload_entries=tuple(got.resources["workload_entries"]),
        sources=tuple(sources),
        warnings=tuple(warnings),
        root_namespace=root_namespace,
    )


def _build_mesh_parts(docs: Sequence[tuple[Where, dict]], got: _Collected, errors: list[ConfigError],
                      warnings: list[str]) -> Inventory:
    """Every document into ``got`` (problems into ``errors``), then the checked ``Inventory``."""
    for where, doc in docs:
        ctx = _Ctx(where, errors, warnings)
        if "apiVersion" in doc or "kind" in doc:
            _load_resource(doc, ctx, got)
        elif not doc or any(k in doc for k in INVENTORY_KEYS):
            _load_inventory(doc, ctx, got)
        else:
            keys = ", ".join(repr(k) for k in list(doc)[:5])
            ctx.error("", f"neither an inventory (workloads:, services:, policies:) nor a Kubernetes resource "
                          f"(apiVersion:, kind:); top-level keys: {keys}")
    return _build_inventory(got, errors, warnings)


def _load_inventory(doc: dict, ctx: _Ctx, got: _Collected) -> None:
    top = _Fields(ctx, doc, "", INVENTORY_KEYS)
    lists = {k: top.get(k, lambda v, p: _raw_list(v, p), ()) for k in INVENTORY_KEYS}
    for i, item in enumerate(lists["workloads"] or ()):
        path = f"workloads[{i}]"
        w = parse_workload(item, ctx, path)
        if w is not None:
            got.workloads.append((w, ctx.where.with_resource("Workload", f"{w.namespace}/{w.name or w.uid}"), path))
    for i, item in enumerate(lists["services"] or ()):
        path = f"services[{i}]"
        s = parse_service(item, ctx, path)
        if s is not None:
            got.services.append((s, ctx.where.with_resource("Service", f"{s.namespace}/{s.name}"), path))
    for i, item in enumerate(lists["policies"] or ()):
        path = f"policies[{i}]"
        where = ctx.where.with_resource("AuthorizationPolicy", _peek_name(item))
        policy = _call_parser(ZTUNNEL_POLICY_PARSER, "ztunnel-format policies", ctx.at(where), item, where, path)
        if policy is not None:
            _add_resource(policy, "AuthorizationPolicy", "authorization_policies", ctx.at(where), got, path)


def _raw_list(v: Any, path: str) -> tuple:
    if not isinstance(v, list):
        raise _Invalid(path, f"expected a list, got {_type_name(v)}")
    return tuple(v)


def _load_resource(doc: dict, ctx: _Ctx, got: _Collected) -> None:
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else ""
    ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
    where = ctx.where.with_resource(kind if isinstance(kind, str) else "", f"{ns or 'default'}/{name}" if name else "")
    ctx = ctx.at(where)
    if not isinstance(api_version, str) or not isinstance(kind, str):
        what = "apiVersion" if not isinstance(api_version, str) else "kind"
        ctx.error(what, f"required string field is missing or not a string; supported: {SUPPORTED_KINDS_TEXT}")
        return
    group, slash, version = api_version.rpartition("/")
    rk = _BY_GROUP_KIND.get((group, kind))
    if rk is None:
        ctx.error("kind", f"unsupported resource {api_version} {kind}; supported: {SUPPORTED_KINDS_TEXT}")
        return
    if version not in rk.versions:
        ctx.error("apiVersion", f"{api_version!r} is not a supported version of {kind}; use "
                                f"{' or '.join(f'{group}/{v}' for v in rk.versions)}")
        return
    obj = _call_parser(rk.parser, kind, ctx, doc, where)
    if obj is not None:
        _add_resource(obj, kind, rk.field, ctx, got, "metadata.name")


def _call_parser(spec: str, what: str, ctx: _Ctx, *args: Any) -> Any:
    try:
        parse = _resolve(spec)
    except (ImportError, AttributeError):
        ctx.error("", f"{what} are not supported by this build (parser {spec} is missing)")
        return None
    except Exception as err:  # noqa: BLE001 - a broken parser module must not become a traceback
        ctx.error("", f"internal error loading the parser for {what} ({type(err).__name__}: {err}); please report this")
        return None
    try:
        return parse(*args)
    except ConfigErrors as errs:
        ctx.errors.extend(errs.errors)
    except ConfigError as err:
        ctx.errors.append(err)
    except _TooManyErrors:
        raise
    except Exception as err:  # noqa: BLE001 - a parser bug must not become a traceback; fail closed
        ctx.error("", f"internal error while parsing ({type(err).__name__}: {err}); please report this")
    ctx.failed = True
    _check_error_count(ctx.errors, ctx.where)
    return None


def _add_resource(obj: Any, kind: str, field_name: str, ctx: _Ctx, got: _Collected, path: str) -> None:
    key = (kind, getattr(obj, "namespace", ""), getattr(obj, "name", ""))
    first = got.seen.get(key)
    if first is not None:
        ctx.error(path, f"duplicate {kind} {key[1]}/{key[2]} (first defined at {first})")
        return
    got.seen[key] = ctx.where.describe()
    if dataclasses.is_dataclass(obj) and "order" in {f.name for f in dataclasses.fields(obj)}:
        # Routing precedence ties break on age ("oldest route first"); load order stands in for
        # creationTimestamp, across all files.
        obj = dataclasses.replace(obj, order=sum(len(v) for v in got.resources.values()))
    for w in getattr(obj, "warnings", ()) or ():
        ctx.warn(path if path != "metadata.name" else "", str(w))
    got.resources[field_name].append(obj)


def _build_inventory(got: _Collected, errors: list[ConfigError], warnings: list[str]) -> Inventory:
    """Check cross-item rules (duplicates, references) and build the indexed ``Inventory``."""
    if got.resources["service_entries"] or got.resources["workload_entries"]:
        _add_entries(got, warnings)
    workloads: dict[str, Workload] = {}
    first_at: dict[Any, str] = {}

    def claim(key: Any, where: Where, item_path: str, path: str, what: str, derived: bool = False) -> bool:
        prev = first_at.get(key)
        if prev is not None:
            if derived:
                # Made from a ServiceEntry/WorkloadEntry: istiod accepts these (ztunnel keeps several workloads per
                # address and one service per VIP — WorkloadByAddr, by_vip), so the first one keeps the address or
                # name and this is a warning, not a load failure (found by review).
                warnings.append(ConfigError(where, path, f"{what} is already used (first at {prev}); the first "
                                                         "keeps it").message)
                return False
            errors.append(ConfigError(where, path, f"duplicate {what} (first defined at {prev})"))
            _check_error_count(errors, where)
            return False
        first_at[key] = f"{where.describe()}: {item_path}"
        return True

    derived = got.derived
    for w, where, path in got.workloads:
        d = id(w) in derived
        if not claim(("uid", w.uid), where, path, _join(path, "uid"), f"workload uid {w.uid!r}", d):
            continue
        ok = True
        for i, ip in enumerate(w.workload_ips):
            ok &= claim(("ip", w.network, ip), where, path, f"{path}.workloadIps[{i}]",
                        f"workload IP {ip} (network {w.network!r})", d)
        if ok or d:   # (a derived workload sharing an address still backs its service; the address stays the first's)
            workloads[w.uid] = w
    services: dict[str, Service] = {}
    for s, where, path in got.services:
        d = id(s) in derived
        if not claim(("svc", s.key), where, path, _join(path, "hostname"), f"service {s.key}", d):
            continue
        ok = True
        for i, vip in enumerate(s.vips):
            ok &= claim(("vip", vip.network, vip.ip), where, path, f"{path}.vips[{i}]", f"service VIP {vip}", d)
        if ok or d:
            services[s.key] = s
    # References that ztunnel tolerates (it stages endpoints until the service appears, and skips
    # unknown policy keys with a warning): warnings, not errors.
    policy_keys = {f"{p.namespace}/{p.name}" for p in got.resources["authorization_policies"]}
    for w, where, path in got.workloads:
        for key, ports in w.services.items():
            svc = services.get(key)
            if svc is None:
                warnings.append(ConfigError(where, _key(f"{path}.services", key), "no such service; endpoint unused").message)
            else:
                missing = sorted(set(ports) - set(svc.ports))
                if missing:
                    warnings.append(ConfigError(where, _key(f"{path}.services", key),
                                                f"port(s) {missing} are not ports of service {key}").message)
        for i, key in enumerate(w.authorization_policies):
            if key not in policy_keys:
                warnings.append(ConfigError(where, f"{path}.authorizationPolicies[{i}]",
                                            f"no policy {key!r} is loaded; ignored").message)
    for s, where, path in got.services:
        for uid in s.endpoints:
            if uid not in workloads:
                warnings.append(ConfigError(where, _key(f"{path}.endpoints", uid), "no workload has this uid; endpoint unused").message)
    return Inventory.build(list(workloads.values()), list(services.values()))


def _add_entries(got: _Collected, warnings: list[str]) -> None:
    """ServiceEntries and WorkloadEntries → inventory services and workloads (``policy.serviceentry.convert``),
    added to ``got`` before the duplicate and reference checks, which they then pass like ztunnel-shaped
    entries, except that what they share with an earlier item is a warning (``claim``'s ``derived``). Pods a
    ServiceEntry's ``workloadSelector`` selects gain its services in their ``services`` map, as istiod's pod
    builder adds them."""
    from policy.serviceentry import convert

    conv = convert(got.resources["service_entries"], got.resources["workload_entries"],
                   pods=[w for w, _, _ in got.workloads], taken_services=[s.key for s, _, _ in got.services],
                   gateways=got.resources["gateways"], cluster_id=DEFAULT_CLUSTER_ID)
    warnings.extend(conv.warnings)
    if conv.pod_services:
        got.workloads = [
            (dataclasses.replace(w, services=MappingProxyType({**conv.pod_services[w.uid], **w.services}))
             if w.uid in conv.pod_services else w, where, path)
            for w, where, path in got.workloads
        ]
    got.services.extend((item.obj, item.where, item.path) for item in conv.services)
    got.workloads.extend((item.obj, item.where, item.path) for item in conv.workloads)
    got.derived.update(id(item.obj) for item in (*conv.services, *conv.workloads))


def parse_inventory(doc: dict, where: Where) -> Inventory:
    """Parse one inventory document alone (for tests and tools); raises ``ConfigErrors``."""
    return build_mesh_config([(where, doc)]).inventory
