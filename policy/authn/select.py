"""Which RequestAuthentication policies a waypoint enforces — the same attachment rule as AuthorizationPolicy
(``policy.authz.select.PolicyIndex.for_waypoint``): istiod's ``pilot/pkg/model/authentication.go
getConfigsForWorkload`` picks RequestAuthentications with ``selectionOpts.WithRootNamespace(rootNamespace)
.ShouldAttachPolicy(...)``, the same ``policyattachment.go`` check AuthorizationPolicy uses: targetRefs to the waypoint's Gateway (policy in the Gateway's
namespace), to a Service it serves (policy in the Service's namespace; group "" or "core"), or, for a policy in
the root namespace, to GatewayClass ``istio-waypoint`` (every waypoint). "Waypoints never use selector": a
policy with a selector or with neither field does not apply to a waypoint.
"""

from __future__ import annotations

from typing import Iterable

from policy.authn.authenticate import EMPTY_RULE_SET, JwtRuleSet
from policy.authn.model import RequestAuthentication
from policy.authz.select import DEFAULT_ROOT_NAMESPACE, GATEWAY_GROUP, WAYPOINT_GATEWAY_CLASS


def policies_for_waypoint(policies: Iterable[RequestAuthentication], *, gateway: tuple[str, str] | None,
                          services: Iterable[tuple[str, str]] = (),
                          root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> tuple[RequestAuthentication, ...]:
    """The policies attached to a waypoint, each once, sorted by ``ns/name`` (a stable order)."""
    svc = set(services)
    found: dict[int, RequestAuthentication] = {}
    for p in policies:
        for ref in p.target_refs:
            if ref.kind == "Service" and ref.canonical_group == "core":
                hit = (p.namespace, ref.name) in svc
            elif ref.kind == "Gateway" and ref.group == GATEWAY_GROUP:
                hit = gateway is not None and (p.namespace, ref.name) == tuple(gateway)
            elif ref.kind == "GatewayClass" and ref.group == GATEWAY_GROUP:
                hit = ref.name == WAYPOINT_GATEWAY_CLASS and p.namespace == root_namespace
            else:
                hit = False   # ServiceEntry: our inventory has none to attach to
            if hit:
                found[id(p)] = p
                break
    return tuple(sorted(found.values(), key=lambda p: (p.namespace, p.name)))


def jwt_rules_for_waypoint(policies: Iterable[RequestAuthentication], *, gateway: tuple[str, str] | None,
                           services: Iterable[tuple[str, str]] = (),
                           root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> JwtRuleSet:
    """Every jwtRule of the attached policies, compiled (sorted by issuer, as istiod's newPolicyApplier does:
    "TODO should we need to deduplicate JWT with the same issuer" — it does not, neither do we). Build it once
    per config snapshot (and per Service if the lead wants per-Service chains); empty → ``EMPTY_RULE_SET``."""
    attached = policies_for_waypoint(policies, gateway=gateway, services=services, root_namespace=root_namespace)
    rules = [r for p in attached for r in p.jwt_rules]
    return JwtRuleSet.of(rules) if rules else EMPTY_RULE_SET
