"""The compiled route table: per service port, the rules a waypoint evaluates, built once per config
snapshot so the per-request work is only matching.

Which configuration applies (reference/istio-semantics.md §2, §3):

* HTTPRoutes whose ``parentRefs`` name the Service (group ``""``/core, kind Service, optional port) or
  the waypoint Gateway, ordered by Gateway API precedence across all their rules (§2.3);
* otherwise the first VirtualService with http routes for the service's host from the service's namespace or
  the waypoint's namespace (``getVirtualServiceForWaypoint`` + ``slices.FindFunc(... Http != nil)``; the others
  are ignored with a warning — reference §2.1's "merged" is what gateways do, not waypoints); match entries using
  ``sourceLabels``/``sourceNamespace`` are dropped at waypoints (istio/istio#51565);
* otherwise Istio's default route: all endpoints of the service, the default retry policy, no timeout.

Mixing VirtualService and HTTPRoute for one service "is not supported and leads to undefined
behavior" (istio.io migrate-policies); here HTTPRoutes win and a warning says so.

GRPCRoute and TCPRoute (``policy.routing.gateway_routes``) arrive in the same ``http_routes`` list:

* GRPCRoutes compile into the same ``CompiledRule``/``GwMatcher``/``Forward`` objects as HTTPRoute rules,
  ordered as istiod's ``sortHTTPRoutes`` orders the VirtualService routes it converts them to (uri match
  Exact > Prefix > Regex > none, longer uri first, more header matches first; then oldest route,
  ``{namespace}/{name}``, rule and match order). A service port with both HTTPRoutes and GRPCRoutes keeps
  only the kind of the oldest of them: Gateway API (GRPCRouteSpec.Hostnames) "MUST accept exactly one of
  these two routes ... The oldest Route based on creation timestamp", and the waypoint builds its HTTP
  routes from the first VirtualService with http routes only (listener_waypoint.go
  ``buildWaypointInboundHTTPRouteConfig``), each route kind being converted to VirtualServices of its own.
* TLS routes (VirtualService ``tls``, TLSRoute; policy.routing.tls) come first: the first one that applies to the
  port, in age order across them all, is the port's only TCP route (``getWaypointTCPRoutes`` looks for a TLS
  route before any TCP route). A waypoint does not read the SNI: a match applies only when its ``sniHosts`` is
  exactly the service's hostname (``getTLSRouteMatch``); the others are skipped with a warning.
* TCPRoutes add ``TcpRule``s: istiod makes a VirtualService with ``tcp`` routes of each, and the waypoint
  takes the first TCP route that matches the port across all the service's VirtualServices in age order
  (``getWaypointTCPRoutes``), so TCPRoutes and VirtualService ``tcp`` routes interleave by age.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

import ipaddress

from policy.inventory import Inventory, Service

from .model import (
    DEFAULT_RETRY_POLICY, EMPTY, NO_HEADER_RULES, NO_TRAFFIC_POLICY, DestinationRule, Gateway, GwRule,
    HeaderRules, HttpRoute, HttpRule, RetryPolicy, TrafficPolicy, VirtualService,
)
from .gateway_routes import GrpcRoute, TcpRoute, TlsRoute
from .tls import TlsRule, tls_match_applies, tls_route_sni_hosts
from .select import DirectResponse, Forward, GwMatcher, VsMatcher

CLUSTER_DOMAIN = "cluster.local"   # Kubernetes' default cluster domain (svc.cluster.local)
NOT_FOUND_FLAG = "NC"              # Envoy: "NC: Upstream cluster not found"
ROOT_NAMESPACE_DEFAULT = "istio-system"   # MeshConfig.rootNamespace default (policy.mesh DEFAULT_ROOT_NAMESPACE)


@dataclass(frozen=True)
class Destination:
    """One weighted upstream of a route: a service (or subset) port, named as Envoy names the cluster.

    ``fail_status`` set means "answer this instead of forwarding": Istio routes to a subset no
    DestinationRule defines (or an unknown host) produce a cluster that does not exist (503, flag NC);
    an invalid Gateway API backendRef gets 500 for its share of the traffic (§2.3).
    """

    host: str
    service_key: str | None
    subset: str | None
    port: int | None
    weight: int
    cluster_name: str
    subset_labels: Mapping[str, str] | None = None
    traffic_policy: TrafficPolicy = NO_TRAFFIC_POLICY
    headers: HeaderRules = NO_HEADER_RULES
    fail_status: int | None = None
    fail_flag: str = ""
    problem: str = ""


@dataclass(frozen=True)
class Mirror:
    destination: Destination
    percent: float


@dataclass(frozen=True)
class CompiledRule:
    index: int                 # rule index within its resource
    name: str
    route_name: str            # "name.namespace" of the VirtualService / HTTPRoute, or "default"
    matchers: tuple            # () = catch-all
    action: object             # Forward | RedirectSpec | DirectResponse


@dataclass(frozen=True)
class ServiceRoutes:
    route_config: str          # "inbound-vip|9080|http|reviews.default.svc.cluster.local"
    service_key: str
    port: int
    kind: str                  # "VirtualService" | "HTTPRoute" | "default"
    rules: tuple[CompiledRule, ...]
    sources: tuple[str, ...] = ()       # "VirtualService default/reviews", ...
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TcpRule:
    subnets: tuple              # ip_network objects; () = any destination
    destinations: tuple[Destination, ...]


@dataclass(frozen=True)
class TcpRoutes:
    route_config: str
    service_key: str
    port: int
    rules: tuple[TcpRule, ...]
    default: Destination
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteTable:
    http: Mapping[tuple[str, int], ServiceRoutes]
    tcp: Mapping[tuple[str, int], TcpRoutes]
    warnings: tuple[str, ...] = ()
    _ctx: object = field(default=None, compare=False, repr=False)

    def http_routes_for(self, service: Service, port: int) -> ServiceRoutes:
        got = self.http.get((service.key, port))
        if got is None:
            got = _default_http(self._ctx, service, port)
        return got

    def tcp_routes_for(self, service: Service, port: int) -> TcpRoutes:
        got = self.tcp.get((service.key, port))
        if got is None:
            got = TcpRoutes(route_name(service, port, "tcp"), service.key, port, (),
                            _self_destination(self._ctx, service, port, "tcp"))
        return got

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for r in self.http.values():
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        return f"<RouteTable http={len(self.http)} {kinds} tcp={len(self.tcp)} warnings={len(self.warnings)}>"


def route_name(service: Service, port: int, proto: str) -> str:
    return f"inbound-vip|{port}|{proto}|{service.hostname}"


# ---------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    inventory: Inventory
    in_scope: set[str]                       # keys of services behind this waypoint
    destination_rules: list[DestinationRule]
    waypoint_namespace: str
    warnings: list[str]
    root_namespace: str = ROOT_NAMESPACE_DEFAULT


def build_route_table(inventory: Inventory, services: Iterable[Service], virtual_services: Iterable[VirtualService],
                      destination_rules: Iterable[DestinationRule], http_routes: Iterable[HttpRoute], *,
                      waypoint_namespace: str, gateway: Gateway | str | None = None,
                      root_namespace: str = ROOT_NAMESPACE_DEFAULT) -> RouteTable:
    """Compile routes for every port of every service behind this waypoint.

    ``gateway``: the waypoint's Gateway (or "ns/name"), so HTTPRoutes whose parentRef names it apply to
    all these services. ``root_namespace``: the mesh's root namespace, whose DestinationRules apply to
    every service that has none in the waypoint's or its own namespace."""
    services = list(services)
    vss = _waypoint_vs_order(virtual_services, waypoint_namespace)
    drs = sorted(destination_rules, key=lambda d: (d.order, d.namespace, d.name))
    # Gateway API precedence falls back to "oldest route, then {namespace}/{name}"; load order stands in
    # for creationTimestamp.
    every = sorted(http_routes, key=lambda h: (h.order, h.namespace, h.name))
    # ``http_routes`` holds every Gateway API route kind (policy.mesh ROUTE_KINDS).
    hrs = [h for h in every if not isinstance(h, (GrpcRoute, TcpRoute, TlsRoute))]
    grs = [g for g in every if isinstance(g, GrpcRoute) and g.rules]   # no rules: istiod converts nothing
    trs = [t for t in every if isinstance(t, (TcpRoute, TlsRoute))]
    gw_key = gateway.key if isinstance(gateway, Gateway) else gateway
    warnings: list[str] = []
    ctx = _Ctx(inventory, {s.key for s in services}, drs, waypoint_namespace, warnings, root_namespace)
    for res in (*vss, *drs, *every):
        kind = getattr(type(res), "kind", None) or type(res).__name__
        warnings.extend(f"{kind} {res.key}: {w}" for w in res.warnings)
    http: dict[tuple[str, int], ServiceRoutes] = {}
    tcp: dict[tuple[str, int], TcpRoutes] = {}
    for svc in services:
        svc_vss = [v for v in vss if _vs_applies(v, svc, waypoint_namespace)]
        for port in sorted(svc.ports):
            routes = [h for h in hrs if _hr_applies(h, svc, port, gw_key)]
            grpcs = [g for g in grs if _hr_applies(g, svc, port, gw_key)] if grs else []
            if routes and grpcs:
                routes, grpcs = _one_route_kind(ctx, svc, port, routes, grpcs)
            if routes or grpcs:
                kind = "HTTPRoute" if routes else "GRPCRoute"
                if svc_vss:
                    warnings.append(f"service {svc.key}: both {kind} and VirtualService attach; "
                                    f"using {kind} (Istio: mixing them is undefined behavior)")
                http[(svc.key, port)] = (_compile_http_routes(ctx, svc, port, routes) if routes
                                         else _compile_grpc_routes(ctx, svc, port, grpcs))
            else:
                http[(svc.key, port)] = _compile_vs(ctx, svc, port, svc_vss) or _default_http(ctx, svc, port)
            svc_trs = [t for t in trs if _hr_applies(t, svc, port, gw_key)] if trs else []
            tcp[(svc.key, port)] = _compile_tcp(ctx, svc, port, svc_vss, svc_trs, gw_key)
    return RouteTable(MappingProxyType(http), MappingProxyType(tcp), tuple(warnings), ctx)


# ---------------------------------------------------------------------------------------------
# Host resolution


def fqdn(host: str, namespace: str) -> str:
    """Istio resolves a short name (no dots) in the resource's namespace: ``reviews`` in ``default`` is
    ``reviews.default.svc.cluster.local`` (ResolveShortnameToFQDN)."""
    if "." in host or host == "*":
        return host
    return f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}"


def host_matches(pattern: str, hostname: str) -> bool:
    """``*`` matches all; ``*.suffix`` matches names ending in ``.suffix``; else equality."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return hostname.endswith(pattern[1:])
    return pattern == hostname


def _find_service(inv: Inventory, host: str, namespace: str) -> Service | None:
    svc = inv.service_by_hostname.get(fqdn(host, namespace))
    if svc is not None:
        return svc
    # Inventories in ztunnel's shape may use hostnames like "example.com"; also accept the Service's
    # Kubernetes name, short ("reviews") or qualified ("reviews.default", "reviews.default.svc").
    parts = host.split(".")
    if len(parts) == 1:
        name, ns = host, namespace
    elif len(parts) == 2 or parts[2] == "svc":
        name, ns = parts[0], parts[1]
    else:
        return None
    return next((s for s in inv.services.values() if s.name == name and s.namespace == ns), None)


def _waypoint_vs_order(virtual_services: Iterable[VirtualService], waypoint_ns: str) -> list[VirtualService]:
    """The VirtualServices the waypoint sees, in the order istiod lists them for it (the default sidecar scope's
    egress listener, sidecar.go SelectVirtualServices): those of the waypoint's namespace exported only to it,
    then those exported to it by name, then the public ones (no exportTo, or "*"); each group as istiod's
    sortConfigByCreationTime orders it — creationTimestamp (load order here), then name, then namespace. A
    VirtualService exported elsewhere only ("." in another namespace, "~") is not seen."""
    private: list[VirtualService] = []
    exported: list[VirtualService] = []
    public: list[VirtualService] = []
    for vs in sorted(virtual_services, key=lambda v: (v.order, v.name, v.namespace)):
        export = tuple(vs.export_to)
        if not export or "*" in export:
            public.append(vs)
        elif "~" in export:
            continue
        elif vs.namespace == waypoint_ns and ("." in export or waypoint_ns in export):
            private.append(vs)
        elif waypoint_ns in export:
            exported.append(vs)
    return [*private, *exported, *public]


def _vs_applies(vs: VirtualService, svc: Service, waypoint_ns: str) -> bool:
    # Waypoints read VirtualServices from the service's namespace or their own (§2.1).
    if vs.namespace not in (svc.namespace, waypoint_ns):
        return False
    if vs.gateways and "mesh" not in vs.gateways:
        return False
    for h in vs.hosts:
        if host_matches(fqdn(h, vs.namespace), svc.hostname):
            return True
        if "." not in h and h == svc.name and vs.namespace == svc.namespace:
            return True
    return False


def _hr_applies(hr: HttpRoute, svc: Service, port: int, gw_key: str | None) -> bool:
    for p in hr.parent_refs:
        ns = p.namespace or hr.namespace
        if p.is_service:
            # GEP-1426: a route in the Service's namespace is a "producer route" and applies to all
            # clients; consumer routes (other namespaces) only to their own clients, never at a waypoint.
            if p.name == svc.name and ns == svc.namespace and hr.namespace == svc.namespace and \
                    (p.port is None or p.port == port):
                return True
        elif p.kind == "Gateway" and p.group == "gateway.networking.k8s.io" and gw_key == f"{ns}/{p.name}":
            if p.port is not None and p.port != port and p.port != 15008:
                continue
            # Hostnames apply to Gateway parents (matched against the service hostname); for Service
            # parents GEP-1426 has the Service itself define the host.
            if not hr.hostnames or any(host_matches(h, svc.hostname) for h in hr.hostnames):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# Destinations


def _dr_for(ctx: _Ctx, svc: Service) -> DestinationRule | None:
    """The DestinationRule for a service, as istiod's PushContext.destinationRule finds it for the waypoint:
    "1. select destination rule from proxy config namespace", then "2. select destination rule from service
    namespace", then "4. ... search for any exported destination rule in the config root namespace" — never
    another namespace (exportTo is applied before: policy.scope). The first namespace with a DR for the host
    wins, and within it MostSpecificHostMatch picks the host: "exact match first", then the most specific
    wildcard. A waypoint in the root namespace looks there first only for DRs exported to "." ("If this is a
    namespace local DR in the same namespace, this must be meant for this proxy"). istiod merges the DRs of one
    namespace for one host (subsets appended, the first top-level traffic policy kept)."""
    root = ctx.root_namespace
    if ctx.waypoint_namespace != root:
        steps = [(ctx.waypoint_namespace, False), (svc.namespace, False), (root, False)]
    else:
        steps = [(root, True), (svc.namespace, False), (root, False)]
    seen: set[tuple[str, bool]] = set()
    for ns, local_only in steps:
        if (ns, local_only) in seen:
            continue
        seen.add((ns, local_only))
        best = _most_specific_drs(ctx, svc, ns, local_only)
        if best:
            return _merged(best)
    return None


def _most_specific_drs(ctx: _Ctx, svc: Service, namespace: str, local_only: bool) -> list[DestinationRule]:
    """The DRs of ``namespace`` for the most specific of their hosts that matches ``svc`` (load order)."""
    best: list[DestinationRule] = []
    best_rank: tuple[int, int] | None = None
    best_host = ""
    for dr in ctx.destination_rules:
        if dr.namespace != namespace or (local_only and tuple(dr.export_to) != (".",)):
            continue
        h = fqdn(dr.host, dr.namespace)
        exact = h == svc.hostname or ("." not in dr.host and dr.host == svc.name and dr.namespace == svc.namespace)
        if exact:
            h = svc.hostname
        elif not host_matches(h, svc.hostname):
            continue
        # host.MoreSpecific: an exact host beats any wildcard; of two wildcards the longer one is more specific.
        rank = (0, 0) if exact else (1, -len(h))
        if best_rank is None or rank < best_rank:
            best, best_rank, best_host = [dr], rank, h
        elif rank == best_rank and h == best_host:
            best.append(dr)
    return best


def _merged(drs: list[DestinationRule]) -> DestinationRule:
    if len(drs) == 1:
        return drs[0]
    # istiod mergeDestinationRule: "Duplicate subset %s found while merging destination rules" — the first is
    # kept; "If there is no top level policy and the incoming rule has top level traffic policy, use the one
    # from the incoming rule."
    subsets, names = [], set()
    for dr in drs:
        for s in dr.subsets:
            if s.name not in names:
                names.add(s.name)
                subsets.append(s)
    tp = next((dr.traffic_policy for dr in drs if dr.traffic_policy is not None), None)
    first = drs[0]
    return DestinationRule(first.namespace, first.name, first.host, tuple(subsets), tp, first.export_to,
                           first.workload_selector, first.order)


def cluster_name(ctx: _Ctx, svc: Service, port: int, subset: str | None, proto: str) -> str:
    if svc.key in ctx.in_scope:
        # The waypoint's own services: inbound-vip|9080|http/v1|reviews.default.svc.cluster.local (§3).
        return f"inbound-vip|{port}|{proto}{'/' + subset if subset else ''}|{svc.hostname}"
    return f"outbound|{port}|{subset or ''}|{svc.hostname}"


def _destination(ctx: _Ctx, host: str, namespace: str, subset: str | None, port: int | None, weight: int,
                 addressed_port: int, proto: str, headers: HeaderRules = NO_HEADER_RULES,
                 invalid_status: int = 503) -> Destination:
    svc = _find_service(ctx.inventory, host, namespace)
    name = fqdn(host, namespace)
    if svc is None:
        return Destination(name, None, subset, port, weight, f"outbound|{port or addressed_port}|{subset or ''}|{name}",
                           headers=headers, fail_status=invalid_status,
                           fail_flag=NOT_FOUND_FLAG if invalid_status == 503 else "",
                           problem=f"unknown service {name}")
    if port is None:
        # Istio: "Port may be omitted if the service has a single port"; otherwise the port addressed.
        if len(svc.ports) == 1:
            port = next(iter(svc.ports))
        elif addressed_port in svc.ports:
            port = addressed_port
    cname = cluster_name(ctx, svc, port or addressed_port, subset, proto)
    if port is None or port not in svc.ports:
        return Destination(svc.hostname, svc.key, subset, port, weight, cname, headers=headers,
                           fail_status=invalid_status, fail_flag=NOT_FOUND_FLAG if invalid_status == 503 else "",
                           problem=f"service {svc.key} has no port {port}")
    dr = _dr_for(ctx, svc)
    labels = None
    if subset is not None:
        s = dr.subset(subset) if dr is not None else None
        if s is None:
            # Istio: the subset "must exist in a DestinationRule for the host"; if not, the route names a
            # cluster that was never built and Envoy answers 503 (NC).
            return Destination(svc.hostname, svc.key, subset, port, weight, cname, headers=headers,
                               fail_status=503, fail_flag=NOT_FOUND_FLAG,
                               problem=f"subset {subset!r} is not defined by a DestinationRule for {svc.hostname}")
        labels = s.labels
    tp = dr.policy_for(subset, port) if dr is not None else NO_TRAFFIC_POLICY
    return Destination(svc.hostname, svc.key, subset, port, weight, cname, labels, tp, headers)


def _self_destination(ctx: _Ctx, svc: Service, port: int, proto: str) -> Destination:
    dr = _dr_for(ctx, svc) if ctx is not None else None
    in_scope = ctx.in_scope if ctx is not None else {svc.key}
    cname = f"inbound-vip|{port}|{proto}|{svc.hostname}" if svc.key in in_scope else f"outbound|{port}||{svc.hostname}"
    tp = dr.policy_for(None, port) if dr is not None else NO_TRAFFIC_POLICY
    return Destination(svc.hostname, svc.key, None, port, 1, cname, None, tp)


def _default_http(ctx: _Ctx | None, svc: Service, port: int) -> ServiceRoutes:
    # Istio's default route: all endpoints, the default retry policy, no timeout ("default is disabled").
    fwd = Forward((_self_destination(ctx, svc, port, "http"),), None, DEFAULT_RETRY_POLICY, headers=NO_HEADER_RULES)
    rule = CompiledRule(-1, "default", "default", (), fwd)
    return ServiceRoutes(route_name(svc, port, "http"), svc.key, port, "default", (rule,))


# ---------------------------------------------------------------------------------------------
# VirtualService


def _first_http_vs(ctx: _Ctx, svc: Service, vss: list[VirtualService]) -> VirtualService | None:
    """The one VirtualService whose http routes the waypoint uses for ``svc``: istiod's
    buildWaypointInboundHTTPRouteConfig takes ``getVirtualServiceForWaypoint(...)`` (the service's or the
    waypoint's namespace, in the egress listener's order: ``_waypoint_vs_order``) and then
    ``slices.FindFunc(virtualServices, func(c config.Config) bool { // Find the first HTTP virtual service
    return c.Spec.(*networking.VirtualService).Http != nil })`` — the others' http routes are never merged in."""
    first = next((v for v in vss if v.http), None)
    if first is not None:
        for other in vss:
            if other.http and other is not first:
                _warn_once(ctx, f"service {svc.key}: VirtualService {other.key} is ignored for http: the waypoint "
                                f"uses only the first VirtualService with http routes for a host, "
                                f"{first.key} (istiod listener_waypoint.go)")
    return first


def _compile_vs(ctx: _Ctx, svc: Service, port: int, vss: list[VirtualService]) -> ServiceRoutes | None:
    rules: list[CompiledRule] = []
    sources = []
    warns = []
    first = _first_http_vs(ctx, svc, vss)
    for vs in (first,) if first is not None else ():
        sources.append(f"VirtualService {vs.key}")
        for i, r in enumerate(vs.http):
            matchers = []
            for j, m in enumerate(r.matches):
                if m.source_labels or m.source_namespace:
                    # istio/istio#51565: waypoints drop match entries that select on the source.
                    warns.append(f"VirtualService {vs.key}: spec.http[{i}].match[{j}]: sourceLabels/"
                                 "sourceNamespace cannot be evaluated at a waypoint; match dropped")
                    continue
                if m.gateways and "mesh" not in m.gateways:
                    continue
                if m.port is not None and m.port != port:
                    continue
                matchers.append(VsMatcher(m))
            if r.matches and not matchers:
                continue   # every match was dropped: the rule does not apply (it is not a catch-all)
            rules.append(CompiledRule(i, r.name, f"{vs.name}.{vs.namespace}", tuple(matchers),
                                      _vs_action(ctx, vs, r, port)))
    if not rules:
        return None
    ctx.warnings.extend(w for w in warns if w not in ctx.warnings)
    return ServiceRoutes(route_name(svc, port, "http"), svc.key, port, "VirtualService", tuple(rules),
                         tuple(sources), tuple(warns))


def _vs_action(ctx: _Ctx, vs: VirtualService, r: HttpRule, port: int):
    cors = r.headers.cors
    if r.redirect is not None:
        return r.redirect if cors is None else dataclasses.replace(r.redirect, cors=cors)
    if r.direct_response is not None:
        return DirectResponse(*r.direct_response, cors=cors)
    dests = []
    for d in r.route:
        # "If there is only one destination in a rule, it will receive all traffic."
        w = 1 if len(r.route) == 1 else (d.weight or 0)
        dests.append(_destination(ctx, d.host, vs.namespace, d.subset, d.port, w, port, "http", d.headers))
    mirrors = tuple(Mirror(_destination(ctx, m.host, vs.namespace, m.subset, m.port, 1, port, "http"), m.percent)
                    for m in r.mirrors)
    retry = r.retries if r.retries is not None else DEFAULT_RETRY_POLICY
    return Forward(tuple(dests), r.timeout_s, retry, r.fault, r.rewrite, r.headers, mirrors)


def _compile_tcp(ctx: _Ctx, svc: Service, port: int, vss: list[VirtualService],
                 tcp_routes: list = (), gw_key: str | None = None) -> TcpRoutes:
    rules = []
    sources = []
    # VirtualServices and TCPRoutes / TLSRoutes (istiod: VirtualServices too) in age order: the first TCP route
    # whose match fits wins (getWaypointTCPRoutes), so a TCPRoute's rule sits where its age puts it.
    ordered = sorted([*vss, *tcp_routes], key=lambda v: (v.order, v.namespace, v.name)) if tcp_routes else vss
    tls = _waypoint_tls_route(ctx, svc, port, ordered, gw_key)
    if tls is not None:
        # getWaypointTCPRoutes: "respect TLS routes before TCP routes" — a TLS route found in any of the
        # service's VirtualServices is the port's only route; no TCP route is looked at.
        rule, source = tls
        return TcpRoutes(route_name(svc, port, "tcp"), svc.key, port, (rule,),
                         _self_destination(ctx, svc, port, "tcp"), (source,))
    for vs in ordered:
        if isinstance(vs, TlsRoute):
            continue
        if isinstance(vs, TcpRoute):
            for tr in vs.rules:
                rules.append(TcpRule((), _tcp_route_destinations(ctx, vs, tr, port)))
            sources.append(f"TCPRoute {vs.key}")
            continue
        for r in vs.tcp:
            if isinstance(r, TlsRule):
                continue   # looked at above
            subnets: list = []
            applies = not r.matches
            for m in r.matches:
                if m.source_labels or m.source_namespace or (m.gateways and "mesh" not in m.gateways):
                    continue
                if m.port is not None and m.port != port:
                    continue
                applies = True
                for s in m.destination_subnets:
                    try:
                        subnets.append(ipaddress.ip_network(s, strict=False))
                    except ValueError:
                        ctx.warnings.append(f"VirtualService {vs.key}: bad destinationSubnet {s!r}; ignored")
            if not applies:
                continue
            n = len(r.route)
            dests = tuple(_destination(ctx, d.host, vs.namespace, d.subset, d.port, 1 if n == 1 else (d.weight or 0),
                                       port, "tcp") for d in r.route)
            rules.append(TcpRule(tuple(subnets), dests))
            if f"VirtualService {vs.key}" not in sources:
                sources.append(f"VirtualService {vs.key}")
    return TcpRoutes(route_name(svc, port, "tcp"), svc.key, port, tuple(rules),
                     _self_destination(ctx, svc, port, "tcp"), tuple(sources))


# ---------------------------------------------------------------------------------------------
# HTTPRoute


_URI_RANK = {"Exact": 3, "PathPrefix": 2, "RegularExpression": 1}


def _compile_http_routes(ctx: _Ctx, svc: Service, port: int, routes: list[HttpRoute]) -> ServiceRoutes:
    entries = []
    for ri, hr in enumerate(routes):
        for i, rule in enumerate(hr.rules):
            action = _gw_action(ctx, hr, rule, port)
            for j, m in enumerate(rule.matches):
                plen = len(m.path.rstrip("/")) if m.path_type == "PathPrefix" else len(m.path)
                # Gateway API precedence (HTTPRouteRule.Matches): Exact path > longest PathPrefix > has
                # method > most headers > most query params; then oldest route, then
                # "{namespace}/{name}" alphabetical, then rule order. (Istio ranks Exact > Prefix > Regex.)
                key = (-_URI_RANK[m.path_type], -plen, 0 if m.method else 1, -len(m.headers),
                       -len(m.query_params), hr.order, f"{hr.namespace}/{hr.name}", i, j)
                entries.append((key, CompiledRule(i, rule.name, f"{hr.name}.{hr.namespace}", (GwMatcher(m),), action)))
    entries.sort(key=lambda e: e[0])
    return ServiceRoutes(route_name(svc, port, "http"), svc.key, port, "HTTPRoute", tuple(e[1] for e in entries),
                         tuple(f"HTTPRoute {h.key}" for h in routes))


def _gw_action(ctx: _Ctx, hr: HttpRoute, rule: GwRule, port: int):
    # The rule's CORS filter (HeaderRules.cors) applies whatever answers: istiod puts it on the route it
    # builds from the rule (vs.CorsPolicy), which Envoy's CORS filter reads before the router forwards,
    # redirects or answers 500 — so a redirect and the no-backend 500 carry it as a Forward does.
    cors = rule.headers.cors
    if rule.redirect is not None:
        return rule.redirect if cors is None else dataclasses.replace(rule.redirect, cors=cors)
    dests = []
    for b in rule.backend_refs:
        ns = b.namespace or hr.namespace
        if b.kind != "Service" or b.group not in ("", "core"):
            d = Destination(b.name, None, None, b.port, b.weight, f"unsupported|{b.kind}|{b.name}",
                            fail_status=500, problem=f"backendRef kind {b.group}/{b.kind} is not supported")
        elif ns != hr.namespace:
            # Cross-namespace references need a ReferenceGrant, which this proxy does not read:
            # Gateway API treats the ref as invalid (RefNotPermitted) ⇒ 500 for its share.
            d = Destination(f"{b.name}.{ns}", None, None, b.port, b.weight, f"outbound|{b.port or port}||{b.name}.{ns}",
                            fail_status=500, problem="cross-namespace backendRef without ReferenceGrant")
        else:
            d = _destination(ctx, b.name, ns, None, b.port, b.weight, port, "http", b.headers, invalid_status=500)
        dests.append(d)
    if not dests or all(d.weight == 0 for d in dests):
        # Gateway API: "If all entries in BackendRefs are invalid, and there are also no filters specified
        # in this route rule, all traffic which matches this rule MUST receive a 500 status code"; Istio
        # answers 500 for a rule without backends too.
        return DirectResponse(500, "", "", cors=cors)
    if len(dests) == 1 and dests[0].weight > 0:
        dests = [_reweight(dests[0], 1)]
    mirrors = tuple(Mirror(_destination(ctx, m.host, hr.namespace, None, m.port, 1, port, "http"), m.percent)
                    for m in rule.mirrors)
    retry: RetryPolicy = rule.retries if rule.retries is not None else DEFAULT_RETRY_POLICY
    return Forward(tuple(dests), rule.request_timeout_s, retry, None, rule.rewrite, rule.headers, mirrors)


# ---------------------------------------------------------------------------------------------
# GRPCRoute and TCPRoute (policy.routing.gateway_routes)

# istiod getURIRank: Exact 3 > Prefix 2 > Regex 1 > no uri match -1 (sortHTTPRoutes).
_GRPC_URI_RANK = {"Exact": 3, "Prefix": 2, "RegularExpression": 1, "Any": -1}
ZERO_WEIGHT_HOST = "internal.cluster.local"   # istiod convertTCPRoute's stand-in for "reject the connection"


def _one_route_kind(ctx: _Ctx, svc: Service, port: int, routes: list[HttpRoute],
                    grpcs: list[GrpcRoute]) -> tuple[list[HttpRoute], list[GrpcRoute]]:
    """Both kinds attach to one service port: keep the kind of the oldest route (then ``{namespace}/{name}``),
    as GRPCRouteSpec.Hostnames requires ("MUST accept exactly one of these two routes, determined by ...
    The oldest Route based on creation timestamp. The Route appearing first in alphabetical order by
    {namespace}/{name}")."""
    h0, g0 = routes[0], grpcs[0]   # each list is in (order, namespace, name) order
    keep_http = (h0.order, f"{h0.namespace}/{h0.name}") <= (g0.order, f"{g0.namespace}/{g0.name}")
    dropped = grpcs if keep_http else routes
    kept = "HTTPRoute" if keep_http else "GRPCRoute"
    names = ", ".join(r.key for r in dropped)
    w = (f"service {svc.key} port {port}: both HTTPRoute and GRPCRoute attach; the older kind ({kept}) is used, "
         f"{'GRPCRoute' if keep_http else 'HTTPRoute'} {names} ignored (Gateway API: exactly one is accepted)")
    if w not in ctx.warnings:
        ctx.warnings.append(w)
    return (routes, []) if keep_http else ([], grpcs)


def _compile_grpc_routes(ctx: _Ctx, svc: Service, port: int, routes: list[GrpcRoute]) -> ServiceRoutes:
    entries = []
    for gr in routes:
        for i, rule in enumerate(gr.rules):
            # A GRPCRoute rule's action is an HTTPRoute rule's: weights, 500 without a live backend
            # (istiod: "return 500 when there are no >0 weight backends"), header filters, mirrors.
            action = _gw_action(ctx, gr, rule, port)
            for j, m in enumerate(rule.matches):
                has_uri = m.path_type != "Any"
                key = (-_GRPC_URI_RANK[m.path_type], -len(m.path) if has_uri else 0, -len(m.headers),
                       gr.order, f"{gr.namespace}/{gr.name}", i, j)
                matchers = (GwMatcher(m),) if has_uri or m.headers else ()
                entries.append((key, CompiledRule(i, rule.name, f"{gr.name}.{gr.namespace}", matchers, action)))
    entries.sort(key=lambda e: e[0])
    return ServiceRoutes(route_name(svc, port, "http"), svc.key, port, "GRPCRoute", tuple(e[1] for e in entries),
                         tuple(f"GRPCRoute {g.key}" for g in routes))


def _tcp_route_destinations(ctx: _Ctx, tr: TcpRoute, rule, port: int) -> tuple[Destination, ...]:
    """istiod convertTCPRoute / buildTCPDestination: weight-0 backendRefs are dropped, a single one left
    takes all connections; none left ⇒ a destination that rejects every connection ("The spec requires us
    to reject connections when there are no >0 weight backends"); an invalid backendRef rejects its share
    ("Connection rejections must respect weight", TCPRouteRule.BackendRefs)."""
    live = [b for b in rule.backend_refs if b.weight > 0]
    if not live:
        return (Destination(ZERO_WEIGHT_HOST, None, "zero-weight", 65535, 1,
                            f"outbound|65535|zero-weight|{ZERO_WEIGHT_HOST}", fail_status=503, fail_flag=NOT_FOUND_FLAG,
                            problem=f"TCPRoute {tr.key}: no backendRef with weight > 0"),)
    out = []
    for b in live:
        w = 1 if len(live) == 1 else b.weight
        ns = b.namespace or tr.namespace
        if b.kind != "Service" or b.group not in ("", "core"):
            # istiod: an unsupported backend kind leaves an empty destination ⇒ cluster "UnknownService".
            out.append(Destination(b.name, None, None, b.port, w, "UnknownService", fail_status=503,
                                   fail_flag=NOT_FOUND_FLAG, problem=f"backendRef kind {b.group}/{b.kind} is not supported"))
        elif ns != tr.namespace:
            # As for HTTPRoute and GRPCRoute here (_gw_action): no ReferenceGrant is read, so a
            # cross-namespace backendRef is refused (RefNotPermitted) for its share.
            out.append(Destination(f"{b.name}.{ns}", None, None, b.port, w, "UnknownService", fail_status=503,
                                   fail_flag=NOT_FOUND_FLAG, problem="cross-namespace backendRef without ReferenceGrant"))
        else:
            # An unknown Service: istiod keeps the destination (backend not found), whose cluster does not
            # exist, so the connection is refused (503, NC).
            out.append(_destination(ctx, b.name, ns, None, b.port, w, port, "tcp"))
    return tuple(out)


def _waypoint_tls_route(ctx: _Ctx, svc: Service, port: int, ordered: list, gw_key: str | None):
    """The first TLS route that applies to this service port at a waypoint (policy.routing.tls: istiod's
    getTLSRouteMatch, which decides on the configuration, never on the connection's SNI), as a catch-all
    ``TcpRule`` and the source naming it; None without one. TLS matches that the waypoint skips because they
    name other SNI hosts are reported, since an Istio user may expect SNI routing there."""
    for res in ordered:
        if isinstance(res, TlsRoute):
            if not res.rules:
                continue
            kinds = {("service" if p.is_service else "gateway") for p in res.parent_refs
                     if _hr_applies(dataclasses.replace(res, parent_refs=(p,)), svc, port, gw_key)}
            if any(tls_route_sni_hosts(res.hostnames, svc.hostname, mesh=(k == "service")) == (svc.hostname,)
                   for k in kinds):
                return TcpRule((), _tcp_route_destinations(ctx, res, res.rules[0], port)), f"TLSRoute {res.key}"
            _warn_once(ctx, f"TLSRoute {res.key}: hostnames {list(res.hostnames)} do not narrow to "
                            f"{svc.hostname}: the waypoint does not route by SNI, so this route does not apply "
                            f"to port {port} (istiod getTLSRouteMatch)")
            continue
        if isinstance(res, TcpRoute):
            continue
        for r in res.tcp:
            if not isinstance(r, TlsRule):
                continue
            if not r.matches or any(tls_match_applies(m, svc.hostname, port) for m in r.matches):
                n = len(r.route)
                dests = tuple(_destination(ctx, d.host, res.namespace, d.subset, d.port,
                                           1 if n == 1 else (d.weight or 0), port, "tcp") for d in r.route)
                return TcpRule((), dests), f"VirtualService {res.key}"
            if any(m.sni_hosts != (svc.hostname,) for m in r.matches):
                _warn_once(ctx, f"VirtualService {res.key}: a tls route matching sniHosts other than exactly "
                                f"[{svc.hostname}] is ignored at the waypoint, which does not route by SNI "
                                f"(istiod getTLSRouteMatch)")
    return None


def _warn_once(ctx: _Ctx, w: str) -> None:
    if w not in ctx.warnings:
        ctx.warnings.append(w)


def _reweight(d: Destination, w: int) -> Destination:
    return Destination(d.host, d.service_key, d.subset, d.port, w, d.cluster_name, d.subset_labels,
                       d.traffic_policy, d.headers, d.fail_status, d.fail_flag, d.problem)


__all__ = ["Destination", "Mirror", "CompiledRule", "ServiceRoutes", "TcpRoutes", "TcpRule", "RouteTable",
           "build_route_table", "route_name", "fqdn", "EMPTY"]
