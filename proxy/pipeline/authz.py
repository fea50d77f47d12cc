"""Authorization at the waypoint (pure): which policies apply to a chain, and the L4 / L7 requests.

Istio's waypoint puts AuthorizationPolicy in two places (reference/istio-semantics.md §1.4–1.6):

* TCP chains get Envoy's *network* RBAC filter: evaluated once per tunnel, before any byte is relayed,
  with HTTP-only fields handled as Envoy does on TCP (ALLOW rules using them dropped; DENY fields
  ignored — a broader deny). Here a deny answers the CONNECT **401** (ztunnel's answer to an L4
  deny, DESIGN §3) — before the 200, so the client never gets a half-open tunnel.
* HTTP chains get only the *HTTP* RBAC filter: evaluated per request, when method, path, host and
  headers are known. Nothing is decided at the tunnel level for an HTTP chain: evaluating the same
  policies without the HTTP attributes would drop every ALLOW rule that names a path or method and
  wrongly deny (or, for DENY, wrongly widen) — exactly what Envoy avoids by not installing a network
  RBAC filter on HTTP chains. A deny is 403 ``RBAC: access denied`` with no response flag.

Which policies: ``targetRefs`` to the waypoint's Gateway, to the Service addressed (inbound-vip
chains), and root-namespace policies targeting GatewayClass ``istio-waypoint`` (``PolicyIndex.for_waypoint``;
"waypoints never use selector"). A pod-addressed (direct) tunnel did not address a Service, so only
the Gateway-level and GatewayClass-level policies apply to it.
"""

from __future__ import annotations

from typing import Mapping

from policy.authn import EMPTY_RULE_SET, JwtRuleSet, jwt_rules_for_waypoint
from policy.authz.evaluate import AuthzRequest, Authorizer, Decision, Enforcement, HttpAttributes, authorize

from proxy.snapshot import Snapshot

from .chains import INBOUND_VIP, Chain


def policies_for(chain: Chain, snapshot: Snapshot) -> tuple:
    scope = snapshot.scope
    gateway = scope.gateway if scope is not None else None
    services = []
    if chain.kind == INBOUND_VIP and chain.service is not None:
        services.append((chain.service.namespace, chain.service.name))
    return snapshot.policies.for_waypoint(gateway=gateway, services=services)


def authz_request(chain: Chain, source_ip: str, principal: str | None,
                  http: HttpAttributes | None = None) -> AuthzRequest:
    # Istio §6 item 7: at a waypoint chain, `ports` are the Service port addressed (the :authority's).
    return AuthzRequest(source_ip=source_ip, source_principal=principal,
                        destination_ip=chain.destination[0], destination_port=chain.destination[1], http=http)


def l4_decision(chain: Chain, snapshot: Snapshot, source_ip: str, principal: str | None) -> Decision | None:
    """The per-tunnel decision for a TCP chain; None for HTTP chains (decided per request)."""
    if chain.protocol != "tcp":
        return None
    return authorize(authz_request(chain, source_ip, principal), policies_for(chain, snapshot), Enforcement.WAYPOINT)


def l7_authorizer(chain: Chain, snapshot: Snapshot, memo: dict | None = None) -> Authorizer:
    """The HTTP chain's policies at the waypoint, prepared for per-request decisions. ``memo``: a dict
    the caller keeps per snapshot (the chain and its policies cannot change within one), keyed by the
    chain's identity and holding the chain, so the id cannot be reused while cached.

    Measured as ``python -m benchmarks --only http``'s "waypoint µs/req" (its OursMesh driven by
    benchmarks.httpload at c=64 for 6 s, the session-start waypoint and this one run alternately): this
    memo, Authorizer's compiled rules and memoised Decisions, lru-cached parse_ip/_peer, normalize_path's
    shortcut and no AuthzRequest/HttpAttributes per request took the waypoint from 143 / 153 to
    116 / 125 µs per request (~ −20 %)."""
    if memo is None:
        return Authorizer(policies_for(chain, snapshot), Enforcement.WAYPOINT)
    key = ("authz", id(chain))
    hit = memo.get(key)
    if hit is not None and hit[0] is chain:
        return hit[1]
    authorizer = Authorizer(policies_for(chain, snapshot), Enforcement.WAYPOINT)
    memo[key] = (chain, authorizer)
    return authorizer


def l7_decision(chain: Chain, snapshot: Snapshot, source_ip: str, principal: str | None, *, method: str,
                path: str, host: str, headers: Mapping[str, tuple[str, ...]], memo: dict | None = None,
                claims: Mapping | None = None) -> Decision:
    """The per-request decision on an HTTP chain (``memo``: see ``l7_authorizer``; ``claims``: the request's JWT
    as the waypoint's RequestAuthentication validated it, ``jwt_rules``)."""
    # Istio §6 item 7: at a waypoint chain, `ports` are the Service port addressed (the :authority's).
    return l7_authorizer(chain, snapshot, memo).decide_http(
        source_ip, principal, chain.destination[0], chain.destination[1], method=method, path=path, host=host,
        headers=headers, claims=claims)


def jwt_rules(chain: Chain, snapshot: Snapshot, memo: dict) -> JwtRuleSet:
    """The JWT rules of the RequestAuthentications attached to this chain at the waypoint (targetRefs to the
    waypoint's Gateway, the Service addressed, or GatewayClass istio-waypoint from the root namespace, as
    ``policies_for`` picks AuthorizationPolicies), compiled once per chain and snapshot (``memo``: as
    ``l7_authorizer``'s). Empty — falsy — for a chain without any: the request path then skips authentication."""
    key = ("authn", id(chain))
    hit = memo.get(key)
    if hit is not None and hit[0] is chain:
        return hit[1]
    policies = snapshot.mesh.request_authentications
    if not policies:
        rules = EMPTY_RULE_SET
    else:
        scope = snapshot.scope
        services = [(chain.service.namespace, chain.service.name)] if chain.kind == INBOUND_VIP and chain.service \
            else []
        rules = jwt_rules_for_waypoint(policies, gateway=scope.gateway if scope is not None else None,
                                       services=services, root_namespace=snapshot.mesh.root_namespace)
    memo[key] = (chain, rules)
    return rules


__all__ = ["policies_for", "authz_request", "l4_decision", "l7_authorizer", "l7_decision", "jwt_rules"]
