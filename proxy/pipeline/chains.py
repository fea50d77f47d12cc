"""main_internal's filter-chain match: which chain serves a tunnel, from its ``:authority`` alone (pure).

The seed's waypoint (Istio ``pilot/pkg/networking/core/waypoint.go``) has, on its internal listener
``main_internal``, one chain per service VIP:port it serves — named by route configuration
``inbound-vip|9080|http|reviews.default.svc.cluster.local`` (Envoy's filter-chain name is
``inbound-vip|9080||reviews.default.svc.cluster.local-http``) — and, for traffic addressed to a pod IP
in its scope, ``direct-tcp`` / ``direct-http``. Anything else has no chain: Envoy's "no filter chain
found" (flag ``NR``), which the CONNECT answers 503 (ztunnel answers unknown destinations 503).

Protocol (Istio's protocol selection): the Service port's ``appProtocol`` decides (``http``,
``http2``, ``grpc`` → HTTP; ``tcp`` → TCP); without one the stream is sniffed (``proxy.sniff``). A
chain whose protocol is still unknown has ``protocol=None`` and ``resolved(proto)`` picks the variant.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

from policy.inventory import Service, Workload
from proxy.errors import UnknownDestination
from proxy.snapshot import Snapshot

INBOUND_VIP = "inbound-vip"
DIRECT = "direct"
# Kubernetes appProtocol values Istio treats as HTTP (http2/grpc as HTTP/2 prior knowledge, h2c).
HTTP_APP_PROTOCOLS = frozenset({"http", "http2", "grpc", "grpc-web", "h2c"})
TCP_APP_PROTOCOLS = frozenset({"tcp"})


@dataclass(frozen=True)
class Chain:
    """The chain a tunnel matched. ``protocol``: "http" | "tcp" | None (sniff first)."""

    kind: str                         # "inbound-vip" | "direct"
    destination: tuple[str, int]      # the CONNECT :authority (VIP:port or pod IP:port)
    protocol: str | None
    service: Service | None = None    # inbound-vip: the service addressed
    workload: Workload | None = None  # direct: the pod addressed
    declared: str | None = None       # the port's appProtocol, if any

    @property
    def name(self) -> str:
        """``inbound-vip|9080|http|reviews.default.svc.cluster.local`` | ``direct-http`` | ``direct-tcp``
        (``...|unknown|...`` / ``direct-unknown`` before sniffing)."""
        proto = self.protocol or "unknown"
        if self.kind == INBOUND_VIP:
            assert self.service is not None
            return f"{INBOUND_VIP}|{self.destination[1]}|{proto}|{self.service.hostname}"
        return f"{DIRECT}-{proto}"

    @property
    def envoy_name(self) -> str:
        """The filter-chain name as Envoy's config dump shows it (``proxy-config listeners``)."""
        if self.kind == INBOUND_VIP:
            assert self.service is not None
            return f"{INBOUND_VIP}|{self.destination[1]}||{self.service.hostname}-{self.protocol or 'unknown'}"
        return self.name

    @functools.cached_property
    def port(self) -> int:
        # Cached (read a few times per request; a frozen dataclass allows cached_property).
        return self.destination[1]

    def resolved(self, protocol: str) -> "Chain":
        """The chain once sniffing decided: "http" for HTTP/1.1 and h2c, else "tcp"."""
        return replace(self, protocol="tcp" if protocol == "tcp" else "http")


def protocol_of(declared: str | None) -> str | None:
    """Istio protocol selection from a port's ``appProtocol``: "http", "tcp", or None (sniff)."""
    if declared is None:
        return None
    d = declared.lower()
    if d in HTTP_APP_PROTOCOLS:
        return "http"
    if d in TCP_APP_PROTOCOLS:
        return "tcp"
    return None   # an appProtocol Istio does not know (e.g. "kubernetes.io/ws") is sniffed, as undeclared


def match_chain(authority: tuple[str, int], snapshot: Snapshot) -> Chain:
    """Pick main_internal's chain for a CONNECT ``:authority``; ``UnknownDestination`` when none."""
    ip, port = authority
    inv = snapshot.mesh.inventory
    svc = inv.service_by_vip.get(ip)
    if svc is not None and _served(svc, snapshot):
        if port not in svc.ports:
            raise UnknownDestination(f"service {svc.hostname} has no port {port}")
        declared = svc.app_protocols.get(port)
        return Chain(INBOUND_VIP, authority, protocol_of(declared), service=svc, declared=declared)
    wl = inv.workload_by_ip.get(ip)
    if wl is not None and (snapshot.scope is None or snapshot.scope.holds(wl)):
        declared = _workload_app_protocol(wl, port, snapshot)
        return Chain(DIRECT, authority, protocol_of(declared), workload=wl, declared=declared)
    raise UnknownDestination(f"{ip}:{port} is not a service VIP or pod in this waypoint's scope")


def _served(svc: Service, snapshot: Snapshot) -> bool:
    """A VIP gets an inbound-vip chain only when the service names this waypoint (route backends the
    snapshot also holds, e.g. ``reviews-v1`` for an HTTPRoute, are upstream clusters, not chains)."""
    scope = snapshot.scope
    return scope is None or scope.is_this(svc.waypoint)


def _workload_app_protocol(wl: Workload, target_port: int, snapshot: Snapshot) -> str | None:
    """A pod port's protocol: the appProtocol of a service port that targets it (Kubernetes puts
    appProtocol on the Service), if all such ports agree."""
    found = set()
    inv = snapshot.mesh.inventory
    for key, ports in wl.services.items():
        svc = inv.services.get(key)
        if svc is None:
            continue
        for sport, tport in ports.items():
            if (tport or svc.ports.get(sport)) == target_port and sport in svc.app_protocols:
                found.add(svc.app_protocols[sport])
    return found.pop() if len(found) == 1 else None


__all__ = ["Chain", "match_chain", "protocol_of", "INBOUND_VIP", "DIRECT"]
