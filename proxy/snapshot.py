"""The configuration a proxy acts on, as one immutable value, and the store that swaps it.

Decide, then do: every pipeline stage reads the ``Snapshot`` it was handed at the start of the tunnel
or request and never a global. A reload builds a whole new ``Snapshot`` and swaps it in; a failed
reload keeps the last good one (DESIGN §4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from policy.authz.select import PolicyIndex
from policy.authz.trust_domain import for_waypoint
from policy.errors import ConfigError
from policy.mesh import MeshConfig, load_mesh_config
from policy.routing.table import RouteTable, build_route_table
from policy.scope import WaypointScope, scope_for_waypoint

log = logging.getLogger("hbone.config")


@dataclass(frozen=True)
class Snapshot:
    version: int
    mesh: MeshConfig                 # what this proxy holds: the waypoint's scope, or the whole mesh (node)
    policies: PolicyIndex
    routes: RouteTable | None        # waypoint only
    scope: WaypointScope | None = None
    loaded_at: float = 0.0           # time.time() when built (for /config_dump)
    sources: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:
        return f"<Snapshot v{self.version} {self.mesh!r} scope={self.scope}>"


def build_snapshot(mesh: MeshConfig, *, mode: str, scope: WaypointScope | None, version: int,
                   now: float, trust_domains: tuple[str, ...] = ()) -> Snapshot:
    """Pure: the full mesh config in, what this proxy holds out. ``trust_domains``: the mesh's trust
    domain, then its aliases; a waypoint's policies get istiod's principal rewriting for them
    (``policy.authz.trust_domain``; node mode, like ztunnel, matches principals as written)."""
    if mode == "waypoint":
        if scope is None:
            raise ValueError("a waypoint needs a scope")
        held = scope_for_waypoint(mesh, scope)
        bound = [s for s in held.inventory.services.values() if scope.is_this(s.waypoint)]
        routes = build_route_table(
            held.inventory, bound, held.virtual_services, held.destination_rules, held.http_routes,
            waypoint_namespace=scope.waypoint_namespace,
            gateway=f"{scope.gateway[0]}/{scope.gateway[1]}" if scope.gateway else None,
        )
    else:
        held, routes = mesh, None
    authz = held.authorization_policies
    if mode == "waypoint" and trust_domains:
        authz = for_waypoint(authz, trust_domains)
        held = replace(held, authorization_policies=authz)
    policies = PolicyIndex.build(authz, root_namespace=held.root_namespace)
    return Snapshot(version, held, policies, routes, scope, now, held.sources)


class ConfigStore:
    """Holds the current ``Snapshot``; ``reload()`` loads the paths again and swaps on success.

    Subscribers are called with (old, new) after each successful swap (e.g. to re-check live tunnels
    against new policies, as ztunnel's PolicyWatcher does).
    """

    def __init__(self, paths: Sequence[str], *, mode: str, scope: WaypointScope | None,
                 clock: Callable[[], float], trust_domains: tuple[str, ...] = ()):
        self.paths = tuple(paths)
        self.trust_domains = tuple(trust_domains)
        self.mode = mode
        self.scope = scope
        self._clock = clock
        self._version = 0
        self.current: Snapshot | None = None
        self.last_error: str | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._subscribers: list[Callable[[Snapshot | None, Snapshot], None]] = []

    def subscribe(self, fn: Callable[[Snapshot | None, Snapshot], None]) -> None:
        self._subscribers.append(fn)

    def load(self) -> Snapshot:
        """Load and swap in; raises ``ConfigError`` (the store keeps what it had)."""
        mesh = load_mesh_config(self.paths)
        snap = build_snapshot(mesh, mode=self.mode, scope=self.scope, version=self._version + 1, now=self._clock(),
                              trust_domains=self.trust_domains)
        old, self.current = self.current, snap
        self._version = snap.version
        self.reloads_ok += 1
        self.last_error = None
        for fn in self._subscribers:
            fn(old, snap)
        return snap

    def reload(self) -> bool:
        """Like ``load`` but never raises: a bad config keeps the last good one, logs why, counts it."""
        try:
            self.load()
            return True
        except ConfigError as err:
            self.reloads_failed += 1
            self.last_error = str(err)
            log.error("config reload failed; keeping version %s:\n%s", self._version, err)
            return False

    def __repr__(self) -> str:
        return (f"<ConfigStore v{self._version} ok={self.reloads_ok} failed={self.reloads_failed}"
                f" paths={len(self.paths)}>")
