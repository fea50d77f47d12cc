"""What one proxy needs to know: a waypoint's scope, a node proxy's workloads, and the seed's
configuration-scaling table.

The seed: "each waypoint only needs to know the configuration of its own namespace" — a waypoint
serves one namespace (default) or one service account, and holds only that scope's services, their
endpoints, and the policies and routes attached to them. ``scope_for_waypoint`` cuts a whole-mesh
``MeshConfig`` down to exactly that; the proxy then holds nothing else (issue 4: "Nothing else is
held in memory").

What a waypoint receives follows istiod's ``findWaypointResources``
(pilot/pkg/networking/core/waypoint.go; reference/istio-semantics.md §3):
- services bound to it (their ``waypoint`` is this proxy) and their endpoints;
- the services its routes send traffic to (``filterWaypointOutboundServices``: the reviews-v1..v3
  backends of an HTTPRoute), with their endpoints, but not their policies or routes;
- AuthorizationPolicies by ``targetRefs`` only (``PolicyIndex.for_waypoint``, §1.4);
- VirtualServices for the bound hosts from the service's or the waypoint's namespace, bound to the
  ``mesh`` gateway (§2.1); DestinationRules for the kept hosts; HTTPRoutes whose parentRef is a
  bound Service or the waypoint's Gateway (§2.3).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Sequence

from policy.inventory import (
    DEFAULT_TRUST_DOMAIN,
    Endpoint,
    GatewayAddress,
    Inventory,
    NetworkAddress,
    Service,
    Workload,
)
from policy.mesh import MeshConfig
from policy.routing.table import host_matches

# Kubernetes' default cluster domain: a Service's hostname is <name>.<ns>.svc.cluster.local.
CLUSTER_DOMAIN = "cluster.local"
MESH_GATEWAY = "mesh"  # Istio: the reserved gateway name for sidecars/waypoints ("mesh" is implicit when `gateways` is empty)
GATEWAY_API_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True)
class WaypointScope:
    """Who this waypoint is: its HBONE address IP, the Gateway it serves, and its scope.

    ``service_account`` set = the seed's per-service-account waypoint (``bookinfo-reviews``): only
    services whose endpoints run as that account, and only those endpoints.
    """

    address_ip: str | None = None
    gateway: tuple[str, str] | None = None   # (namespace, name) of its Gateway (--gateway NS/NAME)
    namespace: str = "default"
    service_account: str | None = None

    @classmethod
    def parse(cls, scope: str, *, address_ip: str | None = None, gateway: str | None = None) -> "WaypointScope":
        """From the flags: ``--scope NS | NS/SA`` and ``--gateway NS/NAME``. Raises ValueError.

        Each part is one non-empty name: ``a/b/c`` (no service account has a slash; it would hold no
        workload, an empty scope) and ``ns/`` are refused, not read as namespace ``a``, account ``b/c``."""
        ns, slash, sa = scope.partition("/")
        if not ns or (slash and not sa) or "/" in sa:
            raise ValueError(f"--scope {scope!r}: expected NS or NS/SA")
        gw = None
        if gateway:
            gns, slash, gname = gateway.partition("/")
            if not slash or not gns or not gname or "/" in gname:
                raise ValueError(f"--gateway {gateway!r}: expected NS/NAME")
            gw = (gns, gname)
        return cls(address_ip=address_ip, gateway=gw, namespace=ns, service_account=sa or None)

    @property
    def gateway_hostname(self) -> str | None:
        """The hostname services name this waypoint by: ``<name>.<ns>.svc.cluster.local``."""
        if self.gateway is None:
            return None
        ns, name = self.gateway
        return f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"

    @property
    def waypoint_namespace(self) -> str:
        return self.gateway[0] if self.gateway else self.namespace

    def is_this(self, addr: GatewayAddress | None) -> bool:
        """Does a ``waypoint: {destination: ...}`` name this proxy?"""
        if addr is None:
            return False
        if addr.address is not None:
            return self.address_ip is not None and addr.address.ip == _norm_ip(self.address_ip)
        return (
            self.gateway is not None
            and addr.namespace == self.gateway[0]
            and (addr.hostname or "").lower() == self.gateway_hostname
        )

    def holds(self, workload: Workload) -> bool:
        """Is the workload inside the scope (namespace, and service account if set)?"""
        if workload.namespace != self.namespace:
            return False
        return self.service_account is None or workload.service_account == self.service_account

    def __str__(self) -> str:
        sa = f"/{self.service_account}" if self.service_account else ""
        gw = f" gateway={self.gateway[0]}/{self.gateway[1]}" if self.gateway else ""
        ip = f" ip={self.address_ip}" if self.address_ip else ""
        return f"{self.namespace}{sa}{gw}{ip}"


def _norm_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


def serves(scope: WaypointScope, service: Service) -> bool:
    """Is this service bound to this waypoint (its ``waypoint`` or one of ``weightedWaypoints``)?"""
    if scope.is_this(service.waypoint):
        return True
    return any(scope.is_this(w.destination) for w in service.weighted_waypoints)


def resolve_host(host: str, namespace: str) -> str:
    """Istio's ResolveShortnameToFQDN: a name without a dot is ``<name>.<ns>.svc.cluster.local``;
    ``*``, IPs and names with a dot are taken as written (pilot/pkg/model/config.go)."""
    h = host.lower().rstrip(".")
    if h == "*" or "." in h or ":" in h:
        return h
    return f"{h}.{namespace}.svc.{CLUSTER_DOMAIN}"


def scope_for_waypoint(mesh: MeshConfig, scope: WaypointScope) -> MeshConfig:
    """The part of ``mesh`` a waypoint with this scope needs, and nothing else (module docstring)."""
    inv = mesh.inventory
    # 1. Services bound to this waypoint, inside the scope.
    bound: list[Service] = []
    keep_eps: dict[str, dict[str, Endpoint]] = {}
    for svc in inv.services.values():
        if svc.namespace != scope.namespace or not serves(scope, svc):
            continue
        eps = {w.uid: ep for w, ep in inv.endpoints_of(svc) if scope.service_account is None or scope.holds(w)}
        if scope.service_account is not None and not eps:
            continue  # NS/SA scope: a service is in scope when its endpoints run as that SA
        bound.append(svc)
        keep_eps[svc.key] = eps
    bound_keys = {s.key for s in bound}

    # 2. Routes attached to the bound services.
    virtual_services = tuple(vs for vs in mesh.virtual_services if _vs_applies(vs, bound, scope))
    http_routes = tuple(r for r in mesh.http_routes if _route_applies(r, bound, scope))

    # 3. Services those routes send to (outbound clusters), with all their endpoints.
    by_name = {(s.namespace, s.name): s for s in inv.services.values()}
    backends: list[Service] = []
    for svc in _route_backends(virtual_services, http_routes, inv, by_name):
        if svc.key not in bound_keys and svc.key not in keep_eps:
            backends.append(svc)
            keep_eps[svc.key] = {w.uid: ep for w, ep in inv.endpoints_of(svc)}
    services = bound + backends
    service_keys = {s.key for s in services}

    # 4. Workloads: endpoints of kept services, plus workloads that name this waypoint themselves
    #    (pod-IP traffic: the seed's direct-tcp / direct-http chains).
    uids = {uid for eps in keep_eps.values() for uid in eps}
    uids |= {w.uid for w in inv.workloads.values() if scope.is_this(w.waypoint) and scope.holds(w)}
    # In the full inventory's order, not sorted: Inventory.build gives a shared address to the first listed (the
    # loader lists hand-written items before those made from ServiceEntries), and the waypoint must agree with the
    # node proxies on it (found by review).
    workloads = [_trim_workload(w, service_keys) for uid, w in inv.workloads.items() if uid in uids]
    order = {key: i for i, key in enumerate(inv.services)}
    services_out = [
        dataclasses.replace(s, endpoints=MappingProxyType({u: e for u, e in s.endpoints.items() if u in keep_eps[s.key]}))
        for s in sorted(services, key=lambda s: order.get(s.key, len(order)))
    ]
    inventory = Inventory.build(workloads, services_out)

    # 5. Policies (targetRefs only, §1.4), destination rules, the waypoint's own Gateway.
    policies: tuple[Any, ...] = ()
    if mesh.authorization_policies:
        from policy.authz.select import PolicyIndex

        index = PolicyIndex.build(mesh.authorization_policies, root_namespace=mesh.root_namespace)
        policies = tuple(index.for_waypoint(gateway=scope.gateway, services=[(s.namespace, s.name) for s in bound]))
    authentications: tuple[Any, ...] = ()
    if mesh.request_authentications:
        from policy.authn.select import policies_for_waypoint as authn_for_waypoint

        # RequestAuthentication attaches as AuthorizationPolicy does (targetRefs only: policy/authn/select.py).
        authentications = authn_for_waypoint(mesh.request_authentications, gateway=scope.gateway,
                                             services=[(s.namespace, s.name) for s in bound],
                                             root_namespace=mesh.root_namespace)
    hostnames = {s.hostname for s in services}
    destination_rules = tuple(
        dr for dr in mesh.destination_rules
        if _exported_to(dr, scope.waypoint_namespace)
        and any(host_matches(resolve_host(dr.host, dr.namespace), h) for h in hostnames)
    )
    gateways = tuple(
        g for g in mesh.gateways if scope.gateway is not None and (g.namespace, g.name) == tuple(scope.gateway)
    )
    return MeshConfig(
        inventory=inventory,
        authorization_policies=policies,
        request_authentications=authentications,
        virtual_services=virtual_services,
        destination_rules=destination_rules,
        http_routes=http_routes,
        gateways=gateways,
        sources=mesh.sources,
        warnings=mesh.warnings,
        root_namespace=mesh.root_namespace,
    )


def _trim_workload(w: Workload, service_keys: set[str]) -> Workload:
    """Drop the workload's memberships of services outside the scope (they would leak in as endpoints)."""
    if all(k in service_keys for k in w.services):
        return w
    return dataclasses.replace(w, services=MappingProxyType({k: v for k, v in w.services.items() if k in service_keys}))


def _vs_applies(vs: Any, bound: Sequence[Service], scope: WaypointScope) -> bool:
    gateways = tuple(getattr(vs, "gateways", ()) or ())
    if gateways and MESH_GATEWAY not in gateways:
        return False  # bound to ingress gateways only (the seed's bookinfo-productpage route)
    hosts = [resolve_host(h, vs.namespace) for h in vs.hosts]
    for svc in bound:
        # Istio: VirtualServices "in the service's namespace or the waypoint's namespace" (§2.1).
        if vs.namespace not in (svc.namespace, scope.waypoint_namespace):
            continue
        if any(host_matches(h, svc.hostname) for h in hosts):
            return True
    return False


def _route_applies(route: Any, bound: Sequence[Service], scope: WaypointScope) -> bool:
    names = {(s.namespace, s.name) for s in bound}
    for ref in route.parent_refs:
        ns = ref.namespace or route.namespace
        kind, group = ref.kind, ref.group or ""
        if kind == "Service" and group in ("", "core") and (ns, ref.name) in names:
            return True
        if kind == "Gateway" and group == GATEWAY_API_GROUP and scope.gateway is not None and (ns, ref.name) == tuple(scope.gateway):
            return True
    return False


def _route_backends(virtual_services: Iterable[Any], http_routes: Iterable[Any], inv: Inventory,
                    by_name: dict[tuple[str, str], Service]) -> list[Service]:
    found: list[Service] = []
    for vs in virtual_services:
        for rule in tuple(getattr(vs, "http", ())) + tuple(getattr(vs, "tcp", ())):
            dests = list(getattr(rule, "route", ())) + list(getattr(rule, "mirrors", ()))
            for dest in dests:
                svc = inv.service_by_hostname.get(resolve_host(dest.host, vs.namespace))
                if svc is not None:
                    found.append(svc)
    for route in http_routes:
        for rule in getattr(route, "rules", ()):
            for ref in getattr(rule, "backend_refs", ()):
                if getattr(ref, "kind", "Service") == "Service" and (getattr(ref, "group", "") or "") in ("", "core"):
                    svc = by_name.get((ref.namespace or route.namespace, ref.name))
                    if svc is not None:
                        found.append(svc)
    return found


def _exported_to(resource: Any, namespace: str) -> bool:
    """Istio exportTo: empty or "*" = everywhere, "." = its own namespace, else the listed namespaces."""
    export = tuple(getattr(resource, "export_to", ()) or ())
    if not export or "*" in export or namespace in export:
        return True
    return "." in export and resource.namespace == namespace


# ---------------------------------------------------------------------------------------------
# Node proxy

def node_scope(mesh: MeshConfig, node: str) -> tuple[Workload, ...]:
    """The workloads a node proxy (``--node NAME``) serves: those whose ``node`` is NAME, by uid."""
    return tuple(w for _, w in sorted(mesh.inventory.workloads.items()) if w.node == node)


# ---------------------------------------------------------------------------------------------
# The seed's configuration-scaling table

@dataclass(frozen=True)
class MeshShape:
    """The seed's example: 2 namespaces × 25 deployments × 10 pods, waypoints with 2 replicas."""

    namespaces: int = 2
    deployments: int = 25
    pods: int = 10
    waypoint_replicas: int = 2


@dataclass(frozen=True)
class ScalingRow:
    namespace: str
    sidecars: int              # pods in the namespace, each with a sidecar
    configs_per_sidecar: int   # services that sidecar is configured for
    waypoints: int             # waypoint replicas for the namespace
    configs_per_waypoint: int  # services in the waypoint's scope (scope_for_waypoint)

    @property
    def sidecar_total(self) -> int:
        return self.sidecars * self.configs_per_sidecar

    @property
    def waypoint_total(self) -> int:
        return self.waypoints * self.configs_per_waypoint


@dataclass(frozen=True)
class ConfigScaling:
    shape: MeshShape
    rows: tuple[ScalingRow, ...]
    sidecar_visibility: str

    @property
    def sidecar_total(self) -> int:
        return sum(r.sidecar_total for r in self.rows)

    @property
    def waypoint_total(self) -> int:
        return sum(r.waypoint_total for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.waypoint_total / self.sidecar_total if self.sidecar_total else 0.0

    def table(self, indent: str = "") -> str:
        """The seed's table: per namespace, then the total (right-aligned)."""
        head = ["config distribution"] + [r.namespace for r in self.rows] + ["total"]
        side = ["Sidecars"] + [f"{r.configs_per_sidecar} configurations * {r.sidecars} sidecars" for r in self.rows] + [f"{self.sidecar_total}"]
        way = ["Waypoints"] + [f"{r.configs_per_waypoint} configurations * {r.waypoints} waypoints" for r in self.rows] + [f"{self.waypoint_total}"]
        pct = ["Waypoints / Sidecars"] + [format_pct(r.waypoint_total, r.sidecar_total) for r in self.rows] + [format_pct(self.waypoint_total, self.sidecar_total)]
        rows = (head, side, way, pct)
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        last = len(head) - 1
        return "\n".join(indent + " | ".join(c.rjust(w) if i == last else c.ljust(w)
                                             for i, (c, w) in enumerate(zip(row, widths))) for row in rows)


def format_pct(part: float, whole: float) -> str:
    """``part/whole`` as a percentage with two significant digits: the seed prints 0.8 %, and a mesh
    ten times larger must show 0.08 %, not round up to 0.1 %."""
    if not whole:
        return "-"
    pct = 100 * part / whole
    return f"{pct:.2g}%" if pct < 10 else f"{pct:.0f}%"


def synthetic_mesh(shape: MeshShape) -> MeshConfig:
    """A mesh of the given shape: per namespace ``ns-N`` a waypoint (Gateway ``waypoint``, replicas on
    10.N.255.x) and ``deployments`` services ``svc-D`` each with ``pods`` pods, bound to it."""
    workloads: list[Workload] = []
    services: list[Service] = []
    if shape.namespaces > 250 or shape.deployments > 250 or shape.pods > 250 or shape.waypoint_replicas > 250:
        raise ValueError("synthetic_mesh addresses at most 250 of each (10.N.D.P)")
    for n in range(1, shape.namespaces + 1):
        ns = f"ns-{n}"
        wp = GatewayAddress(hostname=f"waypoint.{ns}.svc.{CLUSTER_DOMAIN}", namespace=ns)
        for r in range(shape.waypoint_replicas):
            workloads.append(Workload(
                uid=f"Kubernetes//v1/Pod/{ns}/waypoint-{r}", name=f"waypoint-{r}", namespace=ns,
                workload_ips=(f"10.{n}.255.{r + 1}",), service_account="waypoint", protocol="HBONE",
                trust_domain=DEFAULT_TRUST_DOMAIN,
            ))
        for d in range(1, shape.deployments + 1):
            host = f"svc-{d}.{ns}.svc.{CLUSTER_DOMAIN}"
            key = f"{ns}/{host}"
            services.append(Service(
                name=f"svc-{d}", namespace=ns, hostname=host, vips=(NetworkAddress("", f"10.96.{n}.{d}"),),
                ports=MappingProxyType({80: 8080}), waypoint=wp,
            ))
            for p in range(1, shape.pods + 1):
                workloads.append(Workload(
                    uid=f"Kubernetes//v1/Pod/{ns}/svc-{d}-{p}", name=f"svc-{d}-{p}", namespace=ns,
                    workload_ips=(f"10.{n}.{d}.{p}",), service_account=f"svc-{d}", protocol="HBONE",
                    services=MappingProxyType({key: MappingProxyType({80: 8080})}),
                ))
    return MeshConfig(inventory=Inventory.build(workloads, services))


def config_scaling(shape: MeshShape = MeshShape(), *, sidecar_visibility: str = "namespace") -> ConfigScaling:
    """Config pieces for sidecars vs waypoints, counted on a generated mesh.

    A "configuration" is one service's config (the seed's unit: one per deployment). A waypoint's
    count is the number of services ``scope_for_waypoint`` keeps for it, times its replicas.

    ``sidecar_visibility``: what a sidecar is configured for. ``"namespace"`` reproduces the seed's
    table ("25 configurations * 250 sidecars" per namespace: its own namespace's deployments);
    ``"mesh"`` is the seed's figure (every sidecar knows every deployment: 4 × 4 = 16 for 2 × 2).
    """
    if sidecar_visibility not in ("namespace", "mesh"):
        raise ValueError("sidecar_visibility must be 'namespace' or 'mesh'")
    mesh = synthetic_mesh(shape)
    inv = mesh.inventory
    rows = []
    for n in range(1, shape.namespaces + 1):
        ns = f"ns-{n}"
        app_pods = [w for w in inv.workloads.values() if w.namespace == ns and w.service_account != "waypoint"]
        visible = [s for s in inv.services.values() if sidecar_visibility == "mesh" or s.namespace == ns]
        scoped = scope_for_waypoint(mesh, WaypointScope(gateway=(ns, "waypoint"), namespace=ns))
        replicas = [w for w in inv.workloads.values() if w.namespace == ns and w.service_account == "waypoint"]
        rows.append(ScalingRow(ns, len(app_pods), len(visible), len(replicas), len(scoped.inventory.services)))
    return ConfigScaling(shape, tuple(rows), sidecar_visibility)
