"""``MeshConfig``: everything one load of ``--config`` paths produced, as one frozen value.

The inventory (workloads, services) plus the parsed Istio / Gateway API resources, the files they
came from and the warnings the load produced. A proxy holds exactly one ``MeshConfig`` at a time
(a waypoint holds the one ``policy.scope.scope_for_waypoint`` cut down to its scope); a reload
builds a new one and swaps it in whole, or keeps the old one if loading failed.
"""

from __future__ import annotations

import gc
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from policy.inventory import Inventory

# Istio's default root namespace (MeshConfig.rootNamespace, pkg/config/mesh/mesh.go): policies here
# apply mesh-wide (ztunnel: scope Global; waypoints: targetRefs to GatewayClass istio-waypoint).
DEFAULT_ROOT_NAMESPACE = "istio-system"

# The kinds `counts()` reports, in the order `config check` prints them.
KINDS = ("Workload", "Service", "AuthorizationPolicy", "RequestAuthentication", "VirtualService", "DestinationRule",
         "HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute", "Gateway", "ServiceEntry", "WorkloadEntry")
# The Gateway API route kinds kept together in ``MeshConfig.http_routes``; each model's class attribute
# ``kind`` says which (policy.routing.gateway_routes; HTTPRoute's model has none).
ROUTE_KINDS = ("HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute")


@dataclass(frozen=True)
class MeshConfig:
    inventory: Inventory = field(default_factory=Inventory)
    authorization_policies: tuple[Any, ...] = ()   # policy.authz.model.AuthorizationPolicy (resources and ztunnel `policies:`)
    request_authentications: tuple[Any, ...] = ()  # policy.authn.model.RequestAuthentication (JWT rules)
    virtual_services: tuple[Any, ...] = ()         # policy.routing models
    destination_rules: tuple[Any, ...] = ()
    http_routes: tuple[Any, ...] = ()              # Gateway API routes: HTTPRoute, GRPCRoute, TCPRoute, TLSRoute (ROUTE_KINDS)
    gateways: tuple[Any, ...] = ()
    # policy.serviceentry models, as loaded: their converted services and workloads are in ``inventory``
    # (counted as Service / Workload too); a waypoint's scoped MeshConfig does not carry these.
    service_entries: tuple[Any, ...] = ()
    workload_entries: tuple[Any, ...] = ()
    sources: tuple[str, ...] = ()                  # the files read, in order
    warnings: tuple[str, ...] = ()                 # full lines: "FILE: document N (Kind ns/name): path: problem"
    root_namespace: str = DEFAULT_ROOT_NAMESPACE

    def resources(self, kind: str) -> tuple[Any, ...]:
        """The objects of one kind (``KINDS``), workloads and services included."""
        if kind == "Workload":
            return tuple(self.inventory.workloads.values())
        if kind == "Service":
            return tuple(self.inventory.services.values())
        if kind in ROUTE_KINDS:
            return tuple(r for r in self.http_routes if getattr(type(r), "kind", "HTTPRoute") == kind)
        return {
            "AuthorizationPolicy": self.authorization_policies,
            "RequestAuthentication": self.request_authentications,
            "VirtualService": self.virtual_services,
            "DestinationRule": self.destination_rules,
            "Gateway": self.gateways,
            "ServiceEntry": self.service_entries,
            "WorkloadEntry": self.workload_entries,
        }[kind]

    def counts(self) -> dict[str, int]:
        """Objects per kind, every kind of ``KINDS`` present (0 when none)."""
        return {kind: len(self.resources(kind)) for kind in KINDS}

    def counts_by_namespace(self) -> dict[str, dict[str, int]]:
        """``{namespace: {kind: n}}``, namespaces sorted, only non-zero kinds."""
        per: dict[str, Counter] = {}
        for kind in KINDS:
            for obj in self.resources(kind):
                per.setdefault(getattr(obj, "namespace", "") or "", Counter())[kind] += 1
        return {ns: dict(sorted(c.items(), key=lambda kv: KINDS.index(kv[0]))) for ns, c in sorted(per.items())}

    @property
    def namespaces(self) -> tuple[str, ...]:
        return tuple(self.counts_by_namespace())

    def __repr__(self) -> str:
        shown = " ".join(f"{kind}={n}" for kind, n in self.counts().items() if n)
        extra = f" warnings={len(self.warnings)}" if self.warnings else ""
        return f"<MeshConfig {shown or 'empty'}{extra}>"


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the duration (reference counting still frees everything
    else). A load composes a YAML node graph of ~100 objects per workload that lives only until the
    document is built: each full collection meanwhile walked all of it — 10 000 workloads took 9
    gen-2 collections of 84–524 ms each, half of a 4.9 s load, every one a pause of the whole process.
    A load and the snapshot it builds leave no cyclic garbage (measured: gc.collect() after a load and
    after dropping a snapshot found 0 objects), so nothing waits for the collector meanwhile. Not
    nested-safe across threads; loads run one at a time."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def load_mesh_config(paths: Sequence[str], *, root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> MeshConfig:
    """Read the files/directories and build a ``MeshConfig``; raises ``ConfigErrors`` listing every problem."""
    from policy.documents import load_documents, source_files
    from policy.loader import build_mesh_config

    with gc_paused():
        docs = load_documents(paths)
        return build_mesh_config(docs, sources=tuple(source_files(paths)), root_namespace=root_namespace)
