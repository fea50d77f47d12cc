"""TLS routes at the waypoint: VirtualService ``tls`` rules and Gateway API ``TLSRoute``, as istiod applies them.

A waypoint does **not** route by SNI. istiod builds one TCP chain per service port and, for it, takes the
first TLS route whose match fits — decided when the configuration is built, not per connection
(``pilot/pkg/networking/core/listener_waypoint.go getTLSRouteMatch``):

    // Waypoint does not currently support SNI matches. This could be done, but would require more extensive
    // refactoring of filter chains. Given TLSRoute does not support a config *not* matching this check
    // (though VirtualService does) there is still some value in respecting the routes
    if len(m.SniHosts) != 1 || m.SniHosts[0] != svcHostname { continue }

so a match applies only if its ``sniHosts`` is exactly ``[<the service's hostname>]`` (the string as written,
compared with the FQDN), and then ``matchTLS`` checks what can be known statically: ``gateways`` (``mesh``),
``port``, no ``sourceLabels`` / ``sourceNamespace`` (the waypoint passes no proxy labels or namespace);
``destinationSubnets`` is not looked at. A rule without matches applies. TLS routes win over TCP routes: every
VirtualService of the service is searched for a TLS route before any is searched for a TCP route
(``getWaypointTCPRoutes``: "Per https://gateway-api.sigs.k8s.io/geps/gep-1294/ ... respect TLS routes before
TCP routes"). Envoy's tls_inspector is configured on the waypoint's ``main_internal`` only for ports whose
protocol is TLS, and no filter chain matches ``server_names``: the SNI never picks the route.

A TLSRoute is converted as istiod converts it (``route_collections.go TLSRouteCollection``,
``conversion.go convertTLSRoute / buildTLSMatch / augmentTLSPortMatch / compatibleRoutesForHost``): each rule
becomes a TLS route with one match whose ``sniHosts`` are the route's ``hostnames`` (``["*"]`` without), for a
Service parent ``"*"`` becomes the Service's hostname ("For mesh, we use parent hosts for SNI if
TLSRroute.hostnames were not specified") and several hostnames are narrowed to those overlapping it; so at a
waypoint a TLSRoute rule applies when it has no hostnames, or its hostnames narrow to exactly the Service's.

VirtualService ``tls`` rules ride in ``VirtualService.tcp`` as ``TlsRule`` (a ``TcpRule``), so every reader of
a VirtualService's L4 destinations (the waypoint scope's backend walk) sees theirs; the route table tells
them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import TcpMatch, TcpRule

MESH_GATEWAY = "mesh"   # istiod's meshGateways: the only gateway a waypoint's match may name


@dataclass(frozen=True)
class TlsMatch(TcpMatch):
    """VirtualService ``TLSMatchAttributes``: the L4 fields plus ``sniHosts`` (required, at least one)."""

    sni_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsRule(TcpRule):
    """A VirtualService ``tls`` rule (matches are ``TlsMatch``)."""


def host_overlaps(a: str, b: str) -> bool:
    """Istio ``host.Name.Matches``: equal, or one is a wildcard (``*`` / ``*.suffix``) covering the other."""
    if a == b or a == "*" or b == "*":
        return True
    if a.startswith("*.") and b.startswith("*."):
        return a.endswith(b[1:]) or b.endswith(a[1:])
    if a.startswith("*."):
        return b.endswith(a[1:])
    if b.startswith("*."):
        return a.endswith(b[1:])
    return False


def sni_host_within(sni: str, vs_hosts: tuple[str, ...]) -> bool:
    """Istio validation (validateSniHost): an SNI host must be a subset of one of the VirtualService's hosts."""
    for h in vs_hosts:
        if h == "*" or sni == h:
            return True
        if h.startswith("*.") and sni.endswith(h[1:]):
            return True
    return False


def tls_match_applies(m: TlsMatch, service_hostname: str, port: int) -> bool:
    """getTLSRouteMatch + matchTLS at a waypoint (see the module docstring)."""
    if len(m.sni_hosts) != 1 or m.sni_hosts[0] != service_hostname:
        return False
    if m.gateways and MESH_GATEWAY not in m.gateways:
        return False
    if m.source_labels or m.source_namespace:
        # matchTLS(m, nil, meshGateways, port, ""): labels ⊄ nil, namespace ≠ "".
        return False
    return m.port is None or m.port == port


def tls_rule_applies(rule: TlsRule, service_hostname: str, port: int) -> bool:
    return not rule.matches or any(tls_match_applies(m, service_hostname, port) for m in rule.matches)


def tls_route_sni_hosts(hostnames: tuple[str, ...], parent_host: str, *, mesh: bool) -> tuple[str, ...]:
    """The ``sniHosts`` istiod gives a TLSRoute rule for one parent: ``buildTLSMatch`` (hostnames, or ``*``),
    then for a Service parent ``augmentTLSPortMatch`` (``*`` → the Service's hostname) and
    ``compatibleRoutesForHost`` (several hostnames narrowed to those overlapping the Service's)."""
    sni = hostnames or ("*",)
    if not mesh:
        return sni
    if sni == ("*",):
        return (parent_host,)
    if len(sni) > 1:
        return tuple(h for h in sni if host_overlaps(parent_host, h))
    return sni


__all__ = ["TlsMatch", "TlsRule", "MESH_GATEWAY", "host_overlaps", "sni_host_within", "tls_match_applies",
           "tls_rule_applies", "tls_route_sni_hosts"]
