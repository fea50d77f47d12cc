"""Adapter: a waypoint ``Snapshot`` → the small documented inputs of ``proxy.admin.views.build_waypoint_views``
(for ``/config_dump`` and ``proxy-config``). Pure.

What is shown is what the pipeline acts on: the services bound to this waypoint (the inbound-vip chains),
the pods of its scope (direct-tcp / direct-http chains), the compiled route rules in evaluation order,
and DestinationRule subsets."""

from __future__ import annotations

from typing import Any

from policy.routing.model import RetryPolicy
from policy.routing.select import Forward, GwMatcher, VsMatcher
from proxy.admin.views import PodInput, PortInput, RetryInput, RouteInput, ServiceInput, SubsetInput
from proxy.snapshot import Snapshot

from .chains import protocol_of


def _retry(r: RetryPolicy) -> RetryInput | None:
    if r.attempts == 0:
        return None
    return RetryInput(r.attempts, tuple(sorted(r.retry_on)), tuple(sorted(r.retriable_status_codes)),
                      r.per_try_timeout_s)


def _match(matchers: tuple) -> tuple[str, str]:
    for mt in matchers:
        if isinstance(mt, VsMatcher) and mt.m.uri is not None:
            kind = "regex" if mt.m.uri.kind == "regex" else mt.m.uri.kind
            return (kind if kind in ("prefix", "exact", "regex") else "prefix", mt.m.uri.value)
        if isinstance(mt, GwMatcher):
            t = mt.m.path_type
            # "Prefix": a GRPCRoute's service-only method match, a plain string prefix (/svc/) as istiod writes it.
            return ({"Exact": "exact", "RegularExpression": "regex", "Prefix": "prefix"}.get(
                t, "path_separated_prefix" if mt.m.path not in ("", "/") else "prefix"), mt.m.path or "/")
    return ("prefix", "/")


def views_input(snapshot: Snapshot) -> dict[str, Any]:
    """Keyword arguments for ``build_waypoint_views(**views_input(snapshot), hbone_addr=...)``."""
    inv = snapshot.mesh.inventory
    scope = snapshot.scope
    bound = [s for s in inv.services.values() if scope is None or scope.is_this(s.waypoint)]
    pods = [PodInput(w.workload_ips[0], dict(w.labels), w.protocol == "HBONE", w.healthy)
            for w in sorted(inv.workloads.values(), key=lambda w: w.uid) if w.workload_ips
            and (scope is None or scope.holds(w))]
    services, routes = [], []
    drs = snapshot.mesh.destination_rules
    for svc in sorted(bound, key=lambda s: s.key):
        ports = tuple(PortInput(p, t or p, protocol_of(svc.app_protocols.get(p)) or "http")
                      for p, t in sorted(svc.ports.items()))
        dr = next((d for d in drs if d.host in (svc.hostname, svc.name)), None)
        subsets = tuple(SubsetInput(s.name, dict(s.labels)) for s in dr.subsets) if dr else ()
        pod_ips = tuple(w.workload_ips[0] for w, _ in inv.endpoints_of(svc) if w.workload_ips)
        services.append(ServiceInput(svc.hostname, svc.namespace, svc.vips[0].ip if svc.vips else "", ports, pod_ips,
                                     subsets, f"{dr.name}.{dr.namespace}" if dr else ""))
        if snapshot.routes is None:
            continue
        for port in ports:
            if port.protocol != "http":
                continue
            table = snapshot.routes.http.get((svc.key, port.port))
            if table is None:
                continue   # Istio's default route (build_waypoint_views adds it)
            for rule in table.rules:
                if not isinstance(rule.action, Forward):
                    continue
                name, _, ns = rule.route_name.partition(".")
                routes.append(RouteInput(
                    svc.hostname, port.port, tuple((d.subset or "", d.weight) for d in rule.action.destinations),
                    _match(rule.matchers), (table.kind, ns, name) if table.kind != "default" else None,
                    _retry(rule.action.retry), rule.action.timeout_s))
    return {"services": tuple(services), "pods": tuple(pods), "routes": tuple(routes)}


__all__ = ["views_input"]
