"""The mesh inventory: workloads and services, in ztunnel's local-config shape (reference/ztunnel.md §5),
plus two fields Kubernetes has and ztunnel's file lacks: a workload's ``labels`` and a service's
``appProtocols``.

Pure data: frozen dataclasses and an ``Inventory`` with the indexes every lookup needs. Parsing
from YAML lives in ``policy.loader``; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

DEFAULT_TRUST_DOMAIN = "cluster.local"  # Istio's default mesh trust domain (pkg/config/mesh/mesh.go)
DEFAULT_SERVICE_ACCOUNT = "default"      # what istiod's XDS conversion defaults to (state/workload.rs)
HBONE_PORT = 15008                       # Istio convention for HBONE (istio.io hbone docs)

EMPTY: Mapping = MappingProxyType({})


def _empty() -> Mapping:
    return EMPTY


@dataclass(frozen=True)
class NetworkAddress:
    """ztunnel's ``"<network>/<ip>"`` form; ``"/10.0.0.1"`` is the default network."""

    network: str
    ip: str

    def __str__(self) -> str:
        return f"{self.network}/{self.ip}"


@dataclass(frozen=True)
class GatewayAddress:
    """A waypoint (or network gateway) reference: ``destination`` is ``/<ip>`` or ``<ns>/<hostname>``."""

    address: NetworkAddress | None = None      # set when destination is "<network>/<ip>"
    hostname: str | None = None                # set when destination is "<ns>/<hostname>"
    namespace: str | None = None
    hbone_mtls_port: int = HBONE_PORT

    def __str__(self) -> str:
        if self.address is not None:
            return f"{self.address}:{self.hbone_mtls_port}"
        return f"{self.namespace}/{self.hostname}:{self.hbone_mtls_port}"


@dataclass(frozen=True)
class ApplicationTunnel:
    """ztunnel's ``applicationTunnel``: how the workload wants tunnelled traffic handed to it."""

    protocol: str = "NONE"                      # "NONE" | "PROXY"
    port: int | None = None


@dataclass(frozen=True)
class WeightedWaypoint:
    """One entry of a service's ``weightedWaypoints`` (per-connection canary between waypoints)."""

    destination: GatewayAddress
    weight: int


@dataclass(frozen=True)
class LoadBalancer:
    """A service's ``loadBalancer``: locality preferences, mode and health policy (ztunnel §5.5)."""

    routing_preferences: tuple[str, ...] = ()   # each "Region"|"Zone"|"Subzone"|"Node"|"Cluster"|"Network"
    mode: str = "Standard"                      # "Standard"|"Strict"|"Failover"|"Passthrough"
    health_policy: str = "OnlyHealthy"          # "OnlyHealthy"|"AllowAll"


@dataclass(frozen=True)
class CidrVip:
    network: str
    cidr: str


@dataclass(frozen=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True)
class Workload:
    uid: str
    name: str
    namespace: str
    workload_ips: tuple[str, ...]
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    protocol: str = "TCP"                       # inbound protocol it accepts: "TCP" | "HBONE"
    node: str = ""
    network: str = ""
    waypoint: GatewayAddress | None = None
    labels: Mapping[str, str] = field(default_factory=_empty)
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_name: str = ""
    workload_type: str = ""
    cluster_id: str = ""
    locality: Locality = Locality()
    capacity: int = 1                            # ztunnel's load-balancing weight
    status: str = "Healthy"                      # "Healthy" | "Unhealthy"
    # "<ns>/<hostname>" → {service port: target port}, as in ztunnel's LocalWorkload.services
    services: Mapping[str, Mapping[int, int]] = field(default_factory=_empty)
    authorization_policies: tuple[str, ...] = ()  # "ns/name" keys of selector-bound ztunnel policies
    hostname: str = ""
    network_mode: str = "Standard"               # "Standard" | "HostNetwork"
    network_gateway: GatewayAddress | None = None
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    # A hostname endpoint (a DNS ServiceEntry's, ``hostname`` set and no IPs): how it resolves — "LOGICAL_DNS"
    # (resolution DNS_ROUND_ROBIN: the first address, as Envoy's LOGICAL_DNS cluster) or "STRICT_DNS" / "" (any).
    dns_lookup: str = ""

    @property
    def identity(self) -> str:
        """The SPIFFE URI this workload's certificate carries."""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The identity as AuthorizationPolicy ``principals`` match it (no ``spiffe://``)."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def healthy(self) -> bool:
        return self.status == "Healthy"


@dataclass(frozen=True)
class Endpoint:
    """One workload serving one service, with its port map (service port → target port)."""

    workload_uid: str
    ports: Mapping[int, int]
    status: str = "Healthy"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...]
    ports: Mapping[int, int]                     # service port → target port (0 = named port)
    app_protocols: Mapping[int, str] = field(default_factory=_empty)     # service port → "http" | "http2" | "grpc" | "tcp"
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    endpoints: Mapping[str, Endpoint] = field(default_factory=_empty)    # workload uid → endpoint (explicit ones, from the file)
    canonical: bool = False
    cidr_vips: tuple[CidrVip, ...] = ()
    weighted_waypoints: tuple[WeightedWaypoint, ...] = ()
    load_balancer: LoadBalancer | None = None
    ip_families: str | None = None               # "Dual" | "IPv4" | "IPv6"
    visibility: str = "Public"                   # "Public" | "Namespace"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True)
class Inventory:
    """All workloads and services, with indexes. Build with ``Inventory.build``."""

    workloads: Mapping[str, Workload] = field(default_factory=_empty)                 # uid → workload
    services: Mapping[str, Service] = field(default_factory=_empty)                   # "ns/hostname" → service
    # derived indexes
    workload_by_ip: Mapping[str, Workload] = field(default_factory=_empty, compare=False)
    service_by_vip: Mapping[str, Service] = field(default_factory=_empty, compare=False)      # vip ip → service
    service_by_hostname: Mapping[str, Service] = field(default_factory=_empty, compare=False)  # hostname → service
    endpoints: Mapping[str, Mapping[str, Endpoint]] = field(default_factory=_empty, compare=False)  # svc key → uid → ep

    @classmethod
    def build(cls, workloads: list[Workload], services: list[Service]) -> "Inventory":
        wl = {w.uid: w for w in workloads}
        sv = {s.key: s for s in services}
        # The first workload / service listed keeps an address (the loader lists hand-written entries before those
        # made from ServiceEntries, which may share one: ztunnel prefers a pod's workload for its address).
        by_ip: dict[str, Workload] = {}
        for w in workloads:
            for ip in w.workload_ips:
                by_ip.setdefault(ip, w)
        by_vip: dict[str, Service] = {}
        for s in services:
            for v in s.vips:
                by_vip.setdefault(v.ip, s)
        by_host: dict[str, Service] = {}
        for s in services:
            by_host.setdefault(s.hostname, s)   # (first wins, as for addresses: by name and by VIP agree)
        eps: dict[str, dict[str, Endpoint]] = {key: dict(s.endpoints) for key, s in sv.items()}
        # As ztunnel's LocalClient does: each workload's ``services`` map becomes service endpoints.
        for w in workloads:
            for svc_key, ports in w.services.items():
                eps.setdefault(svc_key, {})[w.uid] = Endpoint(w.uid, MappingProxyType(dict(ports)), w.status)
        return cls(
            workloads=MappingProxyType(wl),
            services=MappingProxyType(sv),
            workload_by_ip=MappingProxyType(by_ip),
            service_by_vip=MappingProxyType(by_vip),
            service_by_hostname=MappingProxyType(by_host),
            endpoints=MappingProxyType({k: MappingProxyType(v) for k, v in eps.items()}),
        )

    def endpoints_of(self, service: Service) -> list[tuple[Workload, Endpoint]]:
        """The service's endpoints whose workload is known, in a stable order (by uid)."""
        eps = self.endpoints.get(service.key, EMPTY)
        return [(self.workloads[uid], ep) for uid, ep in sorted(eps.items()) if uid in self.workloads]

    def __repr__(self) -> str:
        return f"<Inventory workloads={len(self.workloads)} services={len(self.services)}>"
