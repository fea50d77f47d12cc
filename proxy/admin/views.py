"""Envoy-style views of a waypoint's configuration, for ``/config_dump`` and ``proxy-config``.

A waypoint in the seed (reviews waypoint, Istio 1.17/1.18) has three listeners: ``connect_terminate``
(HBONE in on 15008), the internal listener ``main_internal`` whose filter chains match on service
VIP:port (``inbound-vip|9080||<fqdn>-http``) or pod IP (``direct-tcp``, ``direct-http`` per application
protocol), and ``connect_originate`` (HBONE out). Clusters are named ``direction|port|subset|fqdn``
(``inbound-vip|9080|http/v1|reviews.default.svc.cluster.local``) and there are no ``outbound`` ones.

``build_waypoint_views`` turns a small, documented input (services with VIP/ports/subsets, pods with IP
and labels, HTTP routes) into frozen dataclasses; ``ConfigViews.to_dict()`` gives the JSON that
``/config_dump`` serves under ``listeners``, ``clusters``, ``routes``, ``endpoints``. The JSON keeps
Envoy's camelCase field names where Envoy has the field (route configurations are Envoy's shape, so
``proxy-config routes -o yaml`` reads like the seed's); ``proxy-config`` renders tables from the JSON
alone, as istioctl renders them from Envoy's dump.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

EMPTY: Mapping[str, str] = MappingProxyType({})

# Listener / cluster names Istio's waypoint uses (pilot/pkg/networking/core/waypoint.go).
CONNECT_TERMINATE = "connect_terminate"
MAIN_INTERNAL = "main_internal"
CONNECT_ORIGINATE = "connect_originate"
ENCAP = "encap"
INBOUND_VIP = "inbound-vip"          # model.TrafficDirectionInboundVIP
DIRECT_TCP = "direct-tcp"
DIRECT_HTTP = "direct-http"
# Application protocols a direct-http chain is built for, per pod (the seed: 'h2c' and 'http/1.1').
DIRECT_HTTP_PROTOCOLS = ("h2c", "http/1.1")
CONNECT_ROUTE = "default"            # connect_terminate's inline route configuration
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_HOSTS_TYPE = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
HOST_SELECTION_RETRY_MAX_ATTEMPTS = 5   # Istio's value for every retry policy (retry/retry.go)


# ---------------------------------------------------------------------------------------------
# Builder input (what the pipeline produces from the loaded config)


@dataclass(frozen=True)
class PodInput:
    """A pod behind the waypoint."""

    ip: str
    labels: Mapping[str, str] = field(default_factory=lambda: EMPTY)   # for DestinationRule subsets
    hbone: bool = True                     # in the mesh: reached through connect_originate; else plain TCP
    healthy: bool = True


@dataclass(frozen=True)
class PortInput:
    port: int                              # service port
    target_port: int                       # pod port
    protocol: str = "http"                 # "http" (http/http2/grpc/sniffed) or "tcp": what the chain does


@dataclass(frozen=True)
class SubsetInput:
    name: str                              # DestinationRule subset name (v1)
    labels: Mapping[str, str]


@dataclass(frozen=True)
class ServiceInput:
    """A service this waypoint serves (its ``waypoint`` names this proxy)."""

    hostname: str                          # reviews.default.svc.cluster.local
    namespace: str
    vip: str
    ports: tuple[PortInput, ...]
    pods: tuple[str, ...]                  # IPs of the pods (in ``pods``) that back it
    subsets: tuple[SubsetInput, ...] = ()
    destination_rule: str = ""             # "name.namespace" of the DestinationRule with the subsets


@dataclass(frozen=True)
class RetryInput:
    attempts: int
    retry_on: tuple[str, ...]
    retriable_status_codes: tuple[int, ...] = ()
    per_try_timeout_s: float | None = None


# Istio's default retry policy for routes without ``retries`` (reference/istio-semantics.md §2.1:
# 2 retries on connect-failure, refused-stream, unavailable, cancelled; no 503 retry in current Istio).
ISTIO_DEFAULT_RETRY = RetryInput(2, ("connect-failure", "refused-stream", "unavailable", "cancelled"))


@dataclass(frozen=True)
class RouteInput:
    """One HTTP route rule (a VirtualService ``http`` entry or an HTTPRoute rule), in order of precedence."""

    hostname: str                          # the service it applies to
    port: int                              # service port
    destinations: tuple[tuple[str, int], ...]   # (subset, weight); subset "" = the whole service
    match: tuple[str, str] = ("prefix", "/")    # ("prefix" | "exact" | "regex" | "path_separated_prefix", value)
    config: tuple[str, str, str] | None = None  # (kind "VirtualService" | "HTTPRoute" | "GRPCRoute", namespace, name)
    retries: RetryInput | None = ISTIO_DEFAULT_RETRY
    timeout_s: float | None = None         # None: no route timeout (Istio's default, rendered 0s)


@dataclass(frozen=True)
class ExtraClusterInput:
    """A cluster outside the service model (infrastructure), shown as-is."""

    name: str
    type: str                              # STATIC | STRICT_DNS | EDS | ORIGINAL_DST
    endpoints: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# The views


@dataclass(frozen=True)
class ChainMatch:
    destination_ip: str = ""
    destination_port: int | None = None
    application_protocol: str = ""

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.destination_ip:
            d["destinationIp"] = self.destination_ip
        if self.destination_port is not None:
            d["destinationPort"] = self.destination_port
        if self.application_protocol:
            d["applicationProtocol"] = self.application_protocol
        return d


@dataclass(frozen=True)
class FilterChain:
    name: str
    match: ChainMatch
    destination_kind: str                  # "cluster" | "route" | "inlineRoute"
    destination: str                       # cluster name or route configuration name
    route_match: str = ""                  # for inlineRoute: the first route's match, e.g. "/*"

    def to_dict(self) -> dict:
        dest: dict[str, Any] = {self.destination_kind: self.destination}
        if self.destination_kind == "inlineRoute":
            dest["match"] = self.route_match
        return {"name": self.name, "match": self.match.to_dict(), "destination": dest}


@dataclass(frozen=True)
class Listener:
    name: str
    address: str                           # "ip:port" for a socket, "envoy://<name>" for an internal listener
    internal: bool
    filter_chains: tuple[FilterChain, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "address": self.address, "internal": self.internal,
                "filterChains": [c.to_dict() for c in self.filter_chains]}


@dataclass(frozen=True)
class Cluster:
    name: str
    type: str
    destination_rule: str = ""

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "type": self.type}
        parts = self.name.split("|")
        if len(parts) == 4:   # model.ParseSubsetKey's fields, spelled out for readers of the JSON
            d.update(direction=parts[0], port=int(parts[1]), subset=parts[2], service=parts[3])
        if self.destination_rule:
            d["destinationRule"] = self.destination_rule
        return d


# Envoy ``retryOn`` conditions in the order Istio writes them (pilot/pkg/networking/core/route/retry
# ``DefaultPolicy`` then ``parseRetryOn`` appending retriable-status-codes), so the seed's
# "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes" reads back as it was,
# whatever order the routing library keeps its set in. Unknown conditions follow, alphabetically.
RETRY_ON_ORDER: tuple[str, ...] = (
    "connect-failure", "refused-stream", "unavailable", "cancelled", "5xx", "gateway-error", "reset",
    "reset-before-request", "deadline-exceeded", "internal", "resource-exhausted", "retriable-4xx",
    "envoy-ratelimited", "retriable-headers", "http3-post-connect-failure", "retriable-status-codes",
)
_RETRY_RANK = {c: i for i, c in enumerate(RETRY_ON_ORDER)}


def ordered_retry_on(conditions) -> tuple[str, ...]:
    """``conditions`` in Istio's order (``RETRY_ON_ORDER``), duplicates dropped."""
    return tuple(sorted(set(conditions), key=lambda c: (_RETRY_RANK.get(c, len(RETRY_ON_ORDER)), c)))


@dataclass(frozen=True)
class RetryPolicy:
    num_retries: int
    retry_on: tuple[str, ...]
    retriable_status_codes: tuple[int, ...] = ()
    per_try_timeout_s: float | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {
            # int64 fields are strings in protobuf JSON; istioctl prints "5"
            "hostSelectionRetryMaxAttempts": str(HOST_SELECTION_RETRY_MAX_ATTEMPTS),
            "numRetries": self.num_retries,
        }
        if self.per_try_timeout_s is not None:
            d["perTryTimeout"] = duration(self.per_try_timeout_s)
        if self.retriable_status_codes:
            d["retriableStatusCodes"] = list(self.retriable_status_codes)
        # Istio always avoids the hosts already tried (retry.go: previous_hosts predicate).
        d["retryHostPredicate"] = [{"name": PREVIOUS_HOSTS, "typedConfig": {"@type": PREVIOUS_HOSTS_TYPE}}]
        d["retryOn"] = ",".join(ordered_retry_on(self.retry_on))
        return d


@dataclass(frozen=True)
class RouteEntry:
    match: tuple[str, str]                 # (kind, value) as in RouteInput
    clusters: tuple[tuple[str, int], ...]  # (cluster name, weight)
    retry_policy: RetryPolicy | None = None
    timeout_s: float | None = None
    config_path: str = ""                  # /apis/networking.istio.io/v1alpha3/namespaces/NS/virtual-service/NAME
    operation: str = ""                    # decorator operation, reviews:9080/*
    connect: bool = False                  # the CONNECT route of connect_terminate

    def to_dict(self) -> dict:
        kind, value = self.match
        key = {"prefix": "prefix", "exact": "path", "regex": "safeRegex",
               "path_separated_prefix": "pathSeparatedPrefix"}[kind]
        match: dict[str, Any] = {"connectMatcher": {}} if self.connect else (
            {key: {"regex": value}} if kind == "regex" else {key: value})
        d: dict[str, Any] = {}
        if self.operation:
            d["decorator"] = {"operation": self.operation}
        d["match"] = match
        if self.config_path:
            d["metadata"] = {"filterMetadata": {"istio": {"config": self.config_path}}}
        route: dict[str, Any] = {}
        if not self.operation:   # infrastructure routes (encap, CONNECT): a bare cluster, no policy
            route["cluster"] = self.clusters[0][0]
        else:
            route["maxGrpcTimeout"] = "0s"
            if self.retry_policy is not None:
                route["retryPolicy"] = self.retry_policy.to_dict()
            route["timeout"] = duration(self.timeout_s or 0)
            if len(self.clusters) == 1:
                route["cluster"] = self.clusters[0][0]
            else:
                route["weightedClusters"] = {"clusters": [{"name": n, "weight": w} for n, w in self.clusters]}
        if self.connect:
            route["upgradeConfigs"] = [{"upgradeType": "CONNECT", "connectConfig": {}}]
        d["route"] = route
        return d


@dataclass(frozen=True)
class VirtualHost:
    name: str
    domains: tuple[str, ...]
    routes: tuple[RouteEntry, ...]

    def to_dict(self) -> dict:
        return {"domains": list(self.domains), "name": self.name, "routes": [r.to_dict() for r in self.routes]}


@dataclass(frozen=True)
class RouteConfig:
    name: str
    virtual_hosts: tuple[VirtualHost, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "validateClusters": False,
                "virtualHosts": [v.to_dict() for v in self.virtual_hosts]}


@dataclass(frozen=True)
class EndpointView:
    address: str                           # envoy://connect_originate/10.244.1.6:9080, or ip:port
    cluster: str
    status: str = "HEALTHY"                # HEALTHY | UNHEALTHY
    outlier_check: str = "OK"              # OK | FAILED (outlier-ejected)

    def to_dict(self) -> dict:
        return {"address": self.address, "status": self.status, "outlierCheck": self.outlier_check,
                "cluster": self.cluster}


@dataclass(frozen=True)
class ConfigViews:
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    endpoints: tuple[EndpointView, ...] = ()

    def to_dict(self) -> dict:
        """The ``listeners``/``clusters``/``routes``/``endpoints`` part of ``/config_dump``."""
        return {"listeners": [x.to_dict() for x in self.listeners],
                "clusters": [x.to_dict() for x in self.clusters],
                "routes": [x.to_dict() for x in self.routes],
                "endpoints": [x.to_dict() for x in self.endpoints]}

    def __repr__(self) -> str:
        chains = sum(len(x.filter_chains) for x in self.listeners)
        return (f"<ConfigViews listeners={len(self.listeners)} chains={chains} clusters={len(self.clusters)} "
                f"routes={len(self.routes)} endpoints={len(self.endpoints)}>")


def duration(seconds: float) -> str:
    """protobuf JSON Duration: "0s", "10s", "1.500s"."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}s"


def cluster_name(direction: str, port: int, subset: str, hostname: str) -> str:
    """model.BuildSubsetKey: ``direction|port|subset|hostname``."""
    return f"{direction}|{port}|{subset}|{hostname}"


def config_path(kind: str, namespace: str, name: str) -> str:
    """Istio's route metadata ``config`` value naming the resource that produced a route."""
    if kind == "HTTPRoute":
        return f"/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/http-route/{name}"
    if kind == "GRPCRoute":
        return f"/apis/gateway.networking.k8s.io/v1/namespaces/{namespace}/grpc-route/{name}"
    return f"/apis/networking.istio.io/v1alpha3/namespaces/{namespace}/virtual-service/{name}"


def _operation(name: str, port: int, match: tuple[str, str]) -> str:
    # Istio getRouteOperation: "<vs name>:<port><path>", path "/*" for prefix "/" and "<prefix>*".
    kind, value = match
    path = f"{value}*" if kind in ("prefix", "path_separated_prefix") else value if kind == "exact" else "/*"
    return f"{name}:{port}{path}"


def _subset_cluster(svc: ServiceInput, port: PortInput, subset: str) -> str:
    return cluster_name(INBOUND_VIP, port.port, f"{port.protocol}/{subset}" if subset else port.protocol, svc.hostname)


def _matches(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def build_waypoint_views(
    *,
    services: Sequence[ServiceInput],
    pods: Sequence[PodInput],
    routes: Sequence[RouteInput] = (),
    hbone_addr: str = "0.0.0.0:15008",
    admin_addr: str | None = "127.0.0.1:15000",
    metrics_addr: str | None = "127.0.0.1:15020",
    extra_clusters: Sequence[ExtraClusterInput] = (),
    default_retry: RetryInput | None = ISTIO_DEFAULT_RETRY,
) -> ConfigViews:
    """Views of a waypoint serving ``services`` (backed by ``pods``) with ``routes``.

    Infrastructure clusters are the ones this proxy really has: ``connect_originate``, ``encap``,
    ``main_internal``, and — when their addresses are given — ``prometheus_stats`` (the admin
    listener, Envoy's stats source) and ``agent`` (the metrics/readiness agent), as in the seed.
    ``extra_clusters`` are appended as given.
    """
    pod_by_ip = {p.ip: p for p in pods}
    routes_by_port: dict[tuple[str, int], list[RouteInput]] = {}
    for r in routes:
        routes_by_port.setdefault((r.hostname, r.port), []).append(r)

    # ---- clusters and endpoints ----
    clusters: list[Cluster] = [Cluster(CONNECT_ORIGINATE, "ORIGINAL_DST"), Cluster(ENCAP, "STATIC"),
                               Cluster(MAIN_INTERNAL, "STATIC")]
    endpoints: list[EndpointView] = [EndpointView(f"envoy://{CONNECT_ORIGINATE}/", ENCAP),
                                     EndpointView(f"envoy://{MAIN_INTERNAL}/", MAIN_INTERNAL)]
    if admin_addr:
        clusters.append(Cluster("prometheus_stats", "STATIC"))
        endpoints.append(EndpointView(admin_addr, "prometheus_stats"))
    if metrics_addr:
        clusters.append(Cluster("agent", "STATIC"))
        endpoints.append(EndpointView(metrics_addr, "agent"))
    for extra in extra_clusters:
        clusters.append(Cluster(extra.name, extra.type))
        endpoints.extend(EndpointView(a, extra.name) for a in extra.endpoints)

    def pod_endpoint(pod: PodInput, port: PortInput, cluster: str) -> EndpointView:
        addr = f"{pod.ip}:{port.target_port}"
        return EndpointView(f"envoy://{CONNECT_ORIGINATE}/{addr}" if pod.hbone else addr, cluster,
                            "HEALTHY" if pod.healthy else "UNHEALTHY")

    vip_chains: list[FilterChain] = []
    service_routes: list[RouteConfig] = []
    for svc in services:
        backing = [pod_by_ip[ip] for ip in svc.pods if ip in pod_by_ip]
        short = svc.hostname.split(".")[0]
        for port in svc.ports:
            base = _subset_cluster(svc, port, "")
            clusters.append(Cluster(base, "EDS", svc.destination_rule))
            endpoints.extend(pod_endpoint(p, port, base) for p in backing)
            for subset in svc.subsets:
                name = _subset_cluster(svc, port, subset.name)
                clusters.append(Cluster(name, "EDS", svc.destination_rule))
                endpoints.extend(pod_endpoint(p, port, name) for p in backing if _matches(p.labels, subset.labels))
            chain_name = f"{cluster_name(INBOUND_VIP, port.port, '', svc.hostname)}-{port.protocol}"
            match = ChainMatch(destination_ip=svc.vip, destination_port=port.port)
            if port.protocol != "http":
                vip_chains.append(FilterChain(chain_name, match, "cluster", base))
                continue
            entries = []
            for r in routes_by_port.get((svc.hostname, port.port), []):
                kind, ns, name = r.config if r.config else ("", "", "")
                entries.append(RouteEntry(
                    match=r.match,
                    clusters=tuple((_subset_cluster(svc, port, s), w) for s, w in r.destinations),
                    retry_policy=_retry(r.retries),
                    timeout_s=r.timeout_s,
                    config_path=config_path(kind, ns, name) if r.config else "",
                    operation=_operation(name or short, port.port, r.match)))
            if not entries:   # no VirtualService/HTTPRoute: Istio's default route to the whole service
                entries.append(RouteEntry(("prefix", "/"), ((base, 100),), _retry(default_retry), None, "",
                                          _operation(short, port.port, ("prefix", "/"))))
            route_name = cluster_name(INBOUND_VIP, port.port, port.protocol, svc.hostname)
            service_routes.append(RouteConfig(route_name, (VirtualHost(f"inbound|http|{port.port}", ("*",),
                                                                       tuple(entries)),)))
            vip_chains.append(FilterChain(chain_name, match, "inlineRoute", route_name,
                                          describe_match(entries[0].to_dict()["match"])))

    # ---- listeners ----
    all_pods = [p for p in pods]
    direct = [FilterChain(DIRECT_TCP, ChainMatch(destination_ip=p.ip), "cluster", ENCAP) for p in all_pods]
    direct += [FilterChain(DIRECT_HTTP, ChainMatch(destination_ip=p.ip, application_protocol=proto), "cluster", ENCAP)
               for p in all_pods for proto in DIRECT_HTTP_PROTOCOLS]
    listeners = (
        Listener(CONNECT_ORIGINATE, f"envoy://{CONNECT_ORIGINATE}", True,
                 (FilterChain("", ChainMatch(), "cluster", CONNECT_ORIGINATE),)),
        Listener(MAIN_INTERNAL, f"envoy://{MAIN_INTERNAL}", True, tuple(vip_chains + direct)),
        Listener(CONNECT_TERMINATE, hbone_addr, False,
                 (FilterChain(CONNECT_ROUTE, ChainMatch(), "inlineRoute", CONNECT_ROUTE, ""),)),
    )

    # ---- route configurations ----
    encap_route = RouteConfig(ENCAP, (VirtualHost(ENCAP, ("*",), (RouteEntry(("prefix", "/"), ((ENCAP, 100),)),)),))
    # connect_terminate accepts any CONNECT authority (the internal listener matches it), so its
    # virtual host has no domains to show: the seed's row for it is the bare name "default".
    connect_route = RouteConfig(CONNECT_ROUTE, (VirtualHost(CONNECT_ROUTE, (), (
        RouteEntry(("prefix", ""), ((MAIN_INTERNAL, 100),), connect=True),)),))
    return ConfigViews(listeners, tuple(clusters), (encap_route, *service_routes, connect_route), tuple(endpoints))


def _retry(r: RetryInput | None) -> RetryPolicy | None:
    if r is None or r.attempts <= 0:   # Istio: attempts 0 disables retries (no policy)
        return None
    return RetryPolicy(r.attempts, r.retry_on, r.retriable_status_codes, r.per_try_timeout_s)


# ---------------------------------------------------------------------------------------------
# Describers shared with proxy-config (istioctl/pkg/writer/envoy/configdump/*.go), on the JSON form


def describe_match(match: Mapping[str, Any]) -> str:
    """istioctl describeMatch: ``/*`` for prefix ``/``, ``PathPrefix:/x``, exact path, ``regex R``."""
    conds = []
    if match.get("prefix"):
        conds.append(f"{match['prefix']}*")
    if match.get("pathSeparatedPrefix"):
        conds.append(f"PathPrefix:{match['pathSeparatedPrefix']}")
    if match.get("path"):
        conds.append(match["path"])
    if match.get("safeRegex"):
        conds.append(f"regex {match['safeRegex'].get('regex', '')}")
    return " ".join(conds)


def describe_domains(domains: Iterable[str]) -> str:
    """istioctl describeRouteDomains: one domain as is, else the shortest port-less ones."""
    domains = list(domains)
    if not domains:
        return ""
    if len(domains) == 1:
        return domains[0]
    without_port = sorted((d for d in domains if ":" not in d), key=len)
    if len(without_port) > 2:
        return f"{without_port[0]}, {without_port[1]} + {len(without_port) - 2} more..."
    return ", ".join(without_port)


def describe_management(route: Mapping[str, Any]) -> str:
    """istioctl describeManagement: ``<name>.<namespace>`` of the config in the route's istio metadata."""
    cfg = route.get("metadata", {}).get("filterMetadata", {}).get("istio", {}).get("config", "")
    if not cfg:
        return ""
    pieces = cfg.split("/")   # /apis/<group>/<version>/namespaces/<ns>/<kind>/<name>
    if len(pieces) != 8 or pieces[4] != "namespaces":
        return "<unknown>"
    return f"{pieces[7]}.{pieces[5]}"


def describe_chain_match(match: Mapping[str, Any]) -> str:
    """The waypoint listener view's MATCH: ``ip=X -> port=N``, ``ip=X -> application-protocol='P'``,
    ``ip=X -> ANY``, or ``ALL``."""
    ip, port, proto = match.get("destinationIp"), match.get("destinationPort"), match.get("applicationProtocol")
    if not ip and port is None and not proto:
        return "ALL"
    head = f"ip={ip} -> " if ip else ""
    if port is not None:
        return f"{head}port={port}"
    if proto:
        return f"{head}application-protocol='{proto}'"
    return f"{head}ANY"


def describe_destination(dest: Mapping[str, Any]) -> str:
    """istioctl getFilterType: ``Cluster: X``, ``Route: X`` or ``Inline Route: <match>``."""
    if "cluster" in dest:
        return f"Cluster: {dest['cluster']}"
    if "route" in dest:
        return f"Route: {dest['route']}"
    if "inlineRoute" in dest:
        return f"Inline Route: {dest.get('match', '')}"
    return "Non-HTTP/Non-TCP"
