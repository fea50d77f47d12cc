"""``/explain``: how the waypoint would handle one request, computed by the same pure stages the
pipeline runs (chain match, authorization with per-rule results, route, endpoints) — no traffic sent.
The answer's schema is ``proxy/admin/explain.py``'s."""

from __future__ import annotations

import random
from typing import Any, Mapping

from policy.authz.evaluate import Enforcement, HttpAttributes, authorize, explain
from policy.routing.endpoints import endpoints_for
from policy.wire import ascii_lower, wire_form
from policy.routing.select import DirectResponse, Forward, HttpRequestView, NoRoute, Redirect, route_http
from proxy.admin.views import ordered_retry_on
from proxy.errors import ProxyError
from proxy.snapshot import Snapshot

from .answers import NO_FLAGS
from .authz import authz_request, policies_for
from .chains import INBOUND_VIP, match_chain


def _resolve(snapshot: Snapshot, host: str) -> str:
    """A hostname (FQDN or short name) → its VIP; an IP stays as it is."""
    inv = snapshot.mesh.inventory
    svc = inv.service_by_hostname.get(host) or next(
        (s for s in inv.services.values() if s.name == host or s.hostname.startswith(host + ".")), None)
    return svc.vips[0].ip if svc is not None and svc.vips else host


def explain_request(snapshot: Snapshot, from_principal: str | None, to: tuple[str, int], method: str | None = None,
                    path: str | None = None, headers: Mapping[str, str] | None = None,
                    source_ip: str = "0.0.0.0") -> dict[str, Any]:
    host, port = to
    authority = (_resolve(snapshot, host), port)
    notes: list[str] = []
    try:
        chain = match_chain(authority, snapshot)
    except ProxyError as err:
        return {"decision": "unknown-destination", "notes": [str(err)],
                "response": {"status": err.hbone_status, "flags": err.flag}}
    is_http = method is not None or path is not None
    if chain.protocol is None:
        chain = chain.resolved("http" if is_http else "tcp")
        notes.append("port protocol not declared: sniffed at run time")
    out: dict[str, Any] = {"chain": chain.envoy_name, "protocol": chain.protocol}
    if chain.service is not None:
        out["service"] = chain.service.hostname
    http = None
    # The pipeline matches request bytes held as latin-1 strs; what the user typed is text: ask about the
    # bytes a client would send for it (UTF-8), as policy/routing/model.py wire_form describes.
    hmap = {ascii_lower(wire_form(k)): (wire_form(v),) for k, v in (headers or {}).items()}
    if chain.protocol == "http":
        method, path = method or "GET", path or "/"
        w_method, w_path, w_host = wire_form(method), wire_form(path), wire_form(f"{host}:{port}")
        http = HttpAttributes(method=w_method, path=w_path, host=w_host, headers=hmap)
    elif is_http:
        notes.append("a TCP chain: the method/path are not visible; evaluated at L4")
    policies = policies_for(chain, snapshot)
    req = authz_request(chain, source_ip, from_principal, http)
    decision = authorize(req, policies, Enforcement.WAYPOINT)
    results = explain(req, policies, Enforcement.WAYPOINT)
    out["authorization"] = {
        "decidedBy": decision.policy, "rule": decision.rule, "detail": decision.response_detail,
        "reason": decision.reason,
        "policies": [{"name": r.policy, "action": r.action, "effect": r.effect,
                      "matched": r.matched_rule is not None, "rule": r.matched_rule,
                      "rules": [{"index": x.index, "matched": x.matched, "note": x.note} for x in r.rules]}
                     for r in results]}
    if not decision.allowed:
        out["decision"] = "deny"
        out["response"] = ({"status": 403, "body": "RBAC: access denied", "flags": NO_FLAGS}
                           if chain.protocol == "http" else {"status": 401, "flags": NO_FLAGS})
        out["notes"] = notes
        return out
    out["decision"] = "allow"
    inv = snapshot.mesh.inventory
    destinations = []
    if chain.kind != INBOUND_VIP:
        out["endpoints"] = [{"address": f"{authority[0]}:{port}", "cluster": chain.name, "status": "HEALTHY",
                             "hbone": chain.workload is not None and chain.workload.protocol == "HBONE"}]
        out["notes"] = notes
        return out
    assert chain.service is not None and snapshot.routes is not None
    if chain.protocol == "http":
        routes = snapshot.routes.http_routes_for(chain.service, port)
        view = HttpRequestView(w_method, w_path, w_host, hmap, port)
        decided = route_http(view, routes)
        if isinstance(decided, NoRoute):
            out["decision"] = "no-route"
            out["route"] = {"name": decided.route_config}
            out["response"] = {"status": 404, "flags": "NR"}
            out["notes"] = notes
            return out
        action = decided.action
        route: dict[str, Any] = {"name": decided.route_config, "config": decided.route_name,
                                 "rule": decided.rule_index}
        if isinstance(action, Forward):
            route["timeout"] = f"{action.timeout_s or 0:g}s"
            route["retries"] = {"attempts": action.retry.attempts, "retryOn": ",".join(ordered_retry_on(action.retry.retry_on))}
            route["clusters"] = [{"name": d.cluster_name, "weight": d.weight} for d in action.destinations]
            destinations = list(action.destinations)
        elif isinstance(action, Redirect):
            location = action.location.encode("latin-1").decode("utf-8", "replace")   # bytes → text for humans
            out["response"] = {"status": action.status, "location": location, "flags": NO_FLAGS}
        elif isinstance(action, DirectResponse):
            out["response"] = {"status": action.status, "body": action.body, "flags": NO_FLAGS}
        out["route"] = route
    else:
        tcp = snapshot.routes.tcp_routes_for(chain.service, port)
        destinations = [d for rule in tcp.rules for d in rule.destinations] or [tcp.default]
        out["route"] = {"name": tcp.route_config, "clusters": [{"name": d.cluster_name, "weight": d.weight}
                                                                for d in destinations]}
    eps = []
    for d in destinations:
        svc = inv.services.get(d.service_key) if d.service_key else None
        if svc is None or d.port is None:
            notes.append(f"{d.cluster_name}: {d.problem or 'no service'}")
            continue
        for c in endpoints_for(inv, svc, d.port, d.subset_labels):
            eps.append({"address": c.key, "cluster": d.cluster_name, "status": "HEALTHY",
                        "hbone": c.workload.protocol == "HBONE"})
    out["endpoints"] = eps
    out["notes"] = notes
    return out


__all__ = ["explain_request"]
