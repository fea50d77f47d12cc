"""Which policies apply at an enforcement point (reference/istio-semantics.md §1.4,
``pilot/pkg/model/policyattachment.go ShouldAttachPolicy``; ztunnel ``state/policy.rs``).

A :class:`PolicyIndex` is built once per config snapshot. Policies are bucketed by namespace and by
target, so a lookup touches only the buckets of the request's scope: a mesh of 10 000 policies costs a
request in namespace ``a`` no more than the handful that live in ``a`` (plus the root namespace).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

from policy.authz import model as m

DEFAULT_ROOT_NAMESPACE = "istio-system"   # meshConfig.rootNamespace default (pkg/config/mesh/mesh.go)
WAYPOINT_GATEWAY_CLASS = "istio-waypoint"  # constants.WaypointGatewayClassName
GATEWAY_GROUP = "gateway.networking.k8s.io"


def _sorted(policies) -> tuple[m.AuthorizationPolicy, ...]:
    # A stable order (by key), so that which DENY "decided" does not depend on file order.
    return tuple(sorted(policies, key=lambda p: (p.namespace, p.name, p.origin)))


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    # Istio: "workloads ... whose labels are a superset" of matchLabels (an empty selector selects all).
    for k, v in selector.items():
        if labels.get(k) != v:
            return False
    return True


class PolicyIndex:
    def __init__(self, root_namespace: str):
        self.root_namespace = root_namespace
        self.namespace_wide: dict[str, tuple] = {}    # ns → Istio policies with neither selector nor targetRefs
        self.with_selector: dict[str, tuple] = {}     # ns → Istio selector policies
        self.by_target: dict[tuple[str, str, str], tuple] = {}  # (kind, ns, name) → targetRef policies
        self.zt_global: tuple = ()
        self.zt_namespace: dict[str, tuple] = {}
        self.by_key: dict[str, tuple] = {}            # "ns/name" → selector-bound policies (ztunnel keys)
        self.count = 0

    @classmethod
    def build(cls, policies: Iterable[m.AuthorizationPolicy], *, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> "PolicyIndex":
        idx = cls(root_namespace)
        ns_wide, sel, target, zt_ns, by_key = (defaultdict(list) for _ in range(5))
        zt_global = []
        for p in policies:
            idx.count += 1
            if p.origin == m.ORIGIN_ZTUNNEL:
                if p.ztunnel_scope == m.SCOPE_GLOBAL:
                    zt_global.append(p)
                elif p.ztunnel_scope == m.SCOPE_NAMESPACE:
                    zt_ns[p.namespace].append(p)
                else:
                    by_key[p.key].append(p)
            elif p.target_refs:
                for ref in p.target_refs:
                    kind = ref.kind
                    if kind == "Service" and ref.canonical_group == "core":
                        target[("Service", p.namespace, ref.name)].append(p)
                    elif kind == "Gateway" and ref.group == GATEWAY_GROUP:
                        target[("Gateway", p.namespace, ref.name)].append(p)
                    elif (kind == "GatewayClass" and ref.group == GATEWAY_GROUP and ref.name == WAYPOINT_GATEWAY_CLASS
                          and p.namespace == root_namespace):
                        # "kind: GatewayClass, name: istio-waypoint and the policy is in the root namespace
                        # (applies to every waypoint)"
                        target[("GatewayClass", "", WAYPOINT_GATEWAY_CLASS)].append(p)
                    # ServiceEntry targets: not attached (parse.read_target_ref warns), as policy/authn/select.py.
            elif p.selector is not None:
                sel[p.namespace].append(p)
                by_key[p.key].append(p)
            else:
                ns_wide[p.namespace].append(p)
        idx.namespace_wide = {k: _sorted(v) for k, v in ns_wide.items()}
        idx.with_selector = {k: _sorted(v) for k, v in sel.items()}
        idx.by_target = {k: _sorted(_dedupe(v)) for k, v in target.items()}
        idx.zt_global = _sorted(zt_global)
        idx.zt_namespace = {k: _sorted(v) for k, v in zt_ns.items()}
        idx.by_key = {k: tuple(v) for k, v in by_key.items()}
        return idx

    def for_waypoint(self, *, gateway: tuple[str, str] | None,
                     services: Iterable[tuple[str, str]]) -> tuple[m.AuthorizationPolicy, ...]:
        """Policies a waypoint enforces: targetRefs to its Gateway (same namespace), to the Services it
        serves (kind Service, group ""/core, same namespace), and root-namespace policies targeting
        GatewayClass istio-waypoint. "Waypoints never use selector": selector and namespace-wide
        policies (including root-namespace allow-nothing) are ignored here."""
        found: list[m.AuthorizationPolicy] = []
        get = self.by_target.get
        if gateway is not None:
            found.extend(get(("Gateway", gateway[0], gateway[1]), ()))
        for ns, name in services:
            found.extend(get(("Service", ns, name), ()))
        found.extend(get(("GatewayClass", "", WAYPOINT_GATEWAY_CLASS), ()))
        return _dedupe(found)

    def for_workload(self, *, namespace: str, labels: Mapping[str, str],
                     workload_policy_keys: Iterable[str] = ()) -> tuple[m.AuthorizationPolicy, ...]:
        """Policies the node proxy enforces for a destination workload. targetRef policies are ignored
        ("TargetRef is not intended for ztunnel")."""
        found: list[m.AuthorizationPolicy] = []
        root = self.root_namespace
        # No selector: the whole namespace; in the root namespace: the whole mesh (istiod scope GLOBAL).
        found.extend(self.namespace_wide.get(namespace, ()))
        if namespace != root:
            found.extend(self.namespace_wide.get(root, ()))
        # Selector policies: "the policy lives in the workload's namespace or the root namespace and the
        # labels match" (ambient/workloads.go nsMatch).
        for ns in (namespace, root) if namespace != root else (namespace,):
            for p in self.with_selector.get(ns, ()):
                if _labels_match(p.selector, labels):
                    found.append(p)
        # ztunnel-format policies (state/policy.rs): Global, the workload's namespace, and the
        # workload's own authorizationPolicies keys ("each workload will list the policies that select it").
        found.extend(self.zt_global)
        found.extend(self.zt_namespace.get(namespace, ()))
        for key in workload_policy_keys:
            for p in self.by_key.get(key, ()):
                # A listed Istio selector policy counts only where Istio would bind it.
                if p.origin == m.ORIGIN_ZTUNNEL or p.namespace in (namespace, root):
                    found.append(p)
        return _dedupe(found)

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"<PolicyIndex policies={self.count} namespaces={len(set(self.namespace_wide) | set(self.with_selector))}"
                f" targets={len(self.by_target)} root={self.root_namespace}>")


def _dedupe(policies) -> tuple[m.AuthorizationPolicy, ...]:
    seen: set[int] = set()
    out = []
    for p in policies:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return tuple(out)
