"""The configuration a proxy acts on, as one immutable value, and the store that swaps it.

Decide, then do: every pipeline stage reads the ``Snapshot`` it was handed at the start of the tunnel
or request and never a global. A reload builds a whole new ``Snapshot`` and swaps it in; a failed
reload keeps the last good one (DESIGN §4).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from policy.authn.remote import remote_sources, with_key_sets
from policy.authz.select import PolicyIndex
from policy.authz.trust_domain import for_waypoint
from policy.errors import ConfigError
from policy.inventory import Workload
from policy.mesh import MeshConfig, gc_paused, load_mesh_config
from policy.routing.endpoints import proxy_workload
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
    # The waypoint's own workload (its pod: locality and labels, for DestinationRule localityLbSetting), looked
    # up in the whole mesh by its HBONE address, as proxy/identity.py finds its identity; its scope does not hold
    # it (traffic to the waypoint's own IP would then get a direct chain back to itself).
    proxy_workload: Workload | None = None
    # What this proxy's view of the config makes worth a warning (logged when the snapshot is installed).
    warnings: tuple[str, ...] = ()

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
            root_namespace=held.root_namespace,
        )
    else:
        held, routes = mesh, None
    authz = held.authorization_policies
    if mode == "waypoint" and trust_domains:
        authz = for_waypoint(authz, trust_domains)
        held = replace(held, authorization_policies=authz)
    policies = PolicyIndex.build(authz, root_namespace=held.root_namespace)
    me = proxy_workload(mesh.inventory, scope.address_ip) if scope is not None else None
    return Snapshot(version, held, policies, routes, scope, now, held.sources, proxy_workload=me,
                    warnings=strict_without_proxy(held, scope, me))


def strict_without_proxy(held: MeshConfig, scope: WaypointScope | None, me: Workload | None) -> tuple[str, ...]:
    """A waypoint whose own pod is not in the inventory, serving a Service whose ``loadBalancer`` is ``mode:
    Strict``: every endpoint with a value for one of the preferred scopes is dropped (``strict_match`` compares
    with a proxy whose labels are all empty, as istiod's endpoint filter compares with ``GetNodeName()`` of a
    proxy without a node) — which istiod does silently; said here, once per snapshot."""
    if scope is None or me is not None:
        return ()
    strict = sorted(f"{s.namespace}/{s.name}" for s in held.inventory.services.values()
                    if s.load_balancer is not None and s.load_balancer.mode == "Strict")
    if not strict:
        return ()
    where = scope.address_ip or "(none: --hbone-addr is a wildcard address)"
    return (f"waypoint: no workload in the inventory has this waypoint's address {where}, so it has no locality; "
            f"{'Service' if len(strict) == 1 else 'Services'} {', '.join(strict)} (loadBalancer mode: Strict) "
            f"{'keeps' if len(strict) == 1 else 'keep'} only endpoints with no value for any of the routingPreferences' "
            f"labels here — add the waypoint's pod to the inventory",)


def with_fetched_key_sets(snap: Snapshot, resolver) -> Snapshot:
    """``snap`` with the key sets ``resolver`` has (or fetches now) for its RequestAuthentication rules that name
    theirs by URL — what istiod inlines into a waypoint's config (proxy/jwks_resolver.py)."""
    authns = snap.mesh.request_authentications
    key_sets = resolver.key_sets(remote_sources(authns))
    if not key_sets:
        return snap
    return replace(snap, mesh=replace(snap.mesh, request_authentications=with_key_sets(authns, key_sets)))


async def in_daemon_thread(fn: Callable[[], object], name: str):
    """``fn()`` on a daemon thread of its own (a stop never waits for it); its result, or its exception raised
    here, once it ends."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def work() -> None:
        try:
            result: tuple = (fn(), None)
        except BaseException as err:   # noqa: BLE001 — handed to the loop, which decides
            result = (None, err)
        loop.call_soon_threadsafe(_settle, done, result)

    threading.Thread(target=work, name=name, daemon=True).start()
    value, err = await done
    if err is not None:
        raise err
    return value


def _settle(fut: asyncio.Future, result: tuple) -> None:
    if not fut.done():   # (the awaiting task was cancelled: a stop meanwhile)
        fut.set_result(result)


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
        # A waypoint's JWKS resolver (proxy.jwks_resolver.JwksResolver, set by its runner): RequestAuthentication
        # rules without an inline jwks get the key set it fetched, when the snapshot is built.
        self.jwks = None

    def subscribe(self, fn: Callable[[Snapshot | None, Snapshot], None]) -> None:
        self._subscribers.append(fn)

    def build(self) -> Snapshot:
        """Read the files and build the next snapshot without installing it; raises ``ConfigError``.
        Touches no state the event loop reads, so it may run on another thread (``reload_in_thread``)."""
        with gc_paused():   # (policy/mesh.py: the collector's full passes were half of a big load)
            mesh = load_mesh_config(self.paths)
            snap = build_snapshot(mesh, mode=self.mode, scope=self.scope, version=self._version + 1,
                                  now=self._clock(), trust_domains=self.trust_domains)
        if self.jwks is not None:   # (outside gc_paused: a fetch may wait for the network)
            snap = with_fetched_key_sets(snap, self.jwks)
        return snap

    def install(self, snap: Snapshot) -> Snapshot:
        """Swap ``snap`` in and tell the subscribers (on the event loop's thread)."""
        old, self.current = self.current, snap
        self._version = snap.version
        for w in snap.warnings:
            if old is None or w not in old.warnings:   # (said when it first holds, not on every reload)
                log.warning("%s", w)
        if old is not None:   # the first install is the initial load, not a reload (hbone_config_reloads_total)
            self.reloads_ok += 1
        self.last_error = None
        for fn in self._subscribers:
            fn(old, snap)
        return snap

    def load(self) -> Snapshot:
        """Load and swap in; raises ``ConfigError`` (the store keeps what it had)."""
        return self.install(self.build())

    def reload(self) -> bool:
        """Like ``load`` but never raises: a bad config keeps the last good one, logs why, counts it."""
        try:
            self.load()
            return True
        except ConfigError as err:
            self._failed(err)
            return False

    async def reload_in_thread(self) -> bool:
        """``reload`` with the reading and building on a thread of its own, so the data plane keeps
        serving while a large config loads. The loop shares the interpreter with that thread and gets
        it at least every ``sys.getswitchinterval()`` (5 ms) of Python code; the cyclic collector, whose
        full passes cannot be interrupted, is paused for the load (``policy.mesh.gc_paused``).
        Measured (/tmp/s3/reload_stall.py: 10 000 workloads, a 1 ms ticker on the loop): synchronous
        reload 4.5 s, the loop stopped for all of it; this way 2.0–2.4 s, the loop's longest pause
        65–80 ms, 99 % of its ticks within 15 ms. The new snapshot is installed, and the subscribers
        run, on the loop's thread. The thread is a daemon: a stop during a reload does not wait for it.
        Callers serialise reloads (``ProxyApp`` runs one at a time)."""
        try:
            snap = await in_daemon_thread(self.build, "config-reload")
        except asyncio.CancelledError:
            raise
        except ConfigError as err:
            self._failed(err)
            return False
        except BaseException as err:   # noqa: BLE001 — the thread's failure, handed over
            # A bug, not a bad config: still keep serving the last good snapshot, loudly.
            self.reloads_failed += 1
            self.last_error = f"{err.__class__.__name__}: {err}"
            log.error("config reload crashed; keeping version %s", self._version, exc_info=err)
            return False
        self.install(snap)
        return True

    def _failed(self, err: ConfigError) -> None:
        self.reloads_failed += 1
        self.last_error = str(err)
        log.error("config reload failed; keeping version %s:\n%s", self._version, err)

    def __repr__(self) -> str:
        return (f"<ConfigStore v{self._version} ok={self.reloads_ok} failed={self.reloads_failed}"
                f" paths={len(self.paths)}>")
