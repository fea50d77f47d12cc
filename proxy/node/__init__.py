"""Node mode (ztunnel): the L4 secure overlay for the workloads of one node.

``NodeProxy`` wires the listeners: HBONE inbound on each local workload's ``<ip>:15008``
(``inbound``), plaintext inbound 15006 (``inbound_plaintext``), outbound capture 15001 and SOCKS5
15080 (``outbound``). It reads the config in force from the ``ConfigStore`` on every new connection,
and on each reload re-checks live inbound tunnels (late rejection) and reconciles the per-pod
listeners with the new set of local workloads.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
from typing import TYPE_CHECKING

from hbone.settings import HboneSettings
from policy.inventory import Workload
from proxy.node.inbound import InboundProxy, InboundTracker
from proxy.node.inbound_plaintext import InboundPlaintextProxy
from proxy.node.outbound import OutboundProxy

if TYPE_CHECKING:
    from proxy.identity import Identities
    from proxy.settings import ProxySettings
    from proxy.snapshot import ConfigStore, Snapshot
    from proxy.telemetry.accesslog import AccessLog
    from proxy.telemetry.metrics import Metrics

log = logging.getLogger("hbone.node")

# Istio labels waypoint pods with the Gateway they implement; such pods terminate HBONE themselves
# (they are not captured by the node proxy: ambient excludes waypoints from redirection).
WAYPOINT_POD_LABEL = "gateway.networking.k8s.io/gateway-name"


def local_workloads(snapshot: "Snapshot", node: str) -> dict[str, Workload]:
    """IP → workload, for the workloads on ``node`` that this proxy serves (waypoint pods excluded)."""
    inv = snapshot.mesh.inventory
    waypoint_ips = {s.waypoint.address.ip for s in inv.services.values()
                    if s.waypoint is not None and s.waypoint.address is not None}
    out: dict[str, Workload] = {}
    for _, wl in sorted(inv.workloads.items()):
        if wl.node != node or WAYPOINT_POD_LABEL in wl.labels:
            continue
        for ip in wl.workload_ips:
            if ip not in waypoint_ips:
                out[ip] = wl
    return out


# Freeze the heap the node proxy starts with (imports, config snapshot, listeners) into the cyclic
# collector's permanent generation once it is up (see freeze_startup_heap). False: leave the
# collector as it is (an embedding that wants every object collectable).
FREEZE_HEAP_AT_START = True
_heap_frozen = False   # once per process: the first NodeProxy to start does it


def freeze_startup_heap() -> bool:
    """Collect, then ``gc.freeze()`` what is alive: the objects a proxy starts with live as long as
    it does, so the collector need not walk them again. Once per process; True when it froze now.

    PERF NOTE: every full (gen-2) collection walks the whole heap — ~40 000 container objects in a
    node proxy with a one-pod config, far more with a large inventory (policy/mesh.py: 84–524 ms
    per collection while loading 10 000 workloads) — while the per-tunnel garbage it is looking for
    is a few hundred young objects. Frozen objects are skipped by every later collection (CPython docs,
    gc.freeze: "move them to a permanent generation and ignore them in all the future
    collections"; gc.collect() at start costs one full collection, 12–19 ms, once); reference counting
    still frees them when dropped (a reload's old snapshot: policy/mesh.py measured no cyclic
    garbage in a snapshot). The collect first keeps start-up garbage out of the frozen set. In
    the short-tunnel benchmark the first full collection after start landed inside the run (12–19 ms,
    ~4 µs per stream of 3 000); with the freeze the run's trace (gc.callbacks) shows no full
    collection, its young ones 0.05–0.6 ms as before. Measured A/B (ours-node of `python -m
    benchmarks --only short --repeat 1 --clients python-h2 --no-install`, the previous tree run
    from a worktree with PYTHONPATH set to it, alternated with this one, this 2-core box shared with
    other helpers): 3 000 streams, 11 pairs: median 93 → 87 µs proxy CPU per stream (no pair worse;
    node minus ours-relay of the same run 13 → 7); `--short-count 9000`, 6 pairs (3 in each
    order): 90 → 86.5. In a long steady run the saving per tunnel is smaller (full collections are
    rarer) but each one stays short instead of a pause proportional to the config. Checked (not
    timed) by tests/test_perf_s4_node_gcfreeze.py."""
    global _heap_frozen
    if _heap_frozen or not FREEZE_HEAP_AT_START:
        return False
    _heap_frozen = True
    gc.collect()
    gc.freeze()
    return True


class NodeProxy:
    def __init__(self, settings: "ProxySettings", store: "ConfigStore", identities: "Identities", *,
                 metrics: "Metrics | None" = None, access_log: "AccessLog | None" = None,
                 hbone_settings: HboneSettings = HboneSettings(), rng: random.Random | None = None):
        if not settings.node:
            raise ValueError("node mode needs --node NAME (the node whose workloads this proxy serves)")
        self.settings = settings
        self.store = store
        self.identities = identities
        self.node = settings.node
        reuse = settings.workers > 1
        self.tracker = InboundTracker(self.node)
        self._local: dict[str, Workload] = {}
        td = identities.trust_domain
        self.inbound = InboundProxy(node=self.node, port=settings.hbone_addr[1], snapshot=self.snapshot,
                                    identities=identities, trust_domain=td, tracker=self.tracker,
                                    metrics=metrics, access_log=access_log, hbone_settings=hbone_settings,
                                    reuse_port=reuse)
        self.outbound = OutboundProxy(snapshot=self.snapshot, local_workloads=lambda: self._local,
                                      identities=identities, trust_domain=td, metrics=metrics,
                                      access_log=access_log, hbone_settings=hbone_settings, rng=rng)
        self.plaintext = InboundPlaintextProxy(node=self.node, snapshot=self.snapshot, tracker=self.tracker,
                                               access_log=access_log)
        self.addresses: dict[str, tuple[str, int]] = {}
        self._reconciling: asyncio.Task | None = None
        self._reuse = reuse
        self.binding: tuple[str, tuple[str, int]] = ("", ("", 0))

    def snapshot(self) -> "Snapshot":
        snap = self.store.current
        assert snap is not None, "NodeProxy used before the config was loaded"
        return snap

    async def start(self) -> None:
        """Bind every listener. On OSError (address in use...) ``self.binding`` is the (flag, address)
        being bound; a per-pod HBONE listener's error carries ``bind_addr``."""
        s = self.settings
        self._local = local_workloads(self.snapshot(), self.node)
        if not self._local:
            log.warning("no workloads on node %r in the inventory; inbound listeners: none", self.node)
        self.binding = ("--hbone-addr", s.hbone_addr)
        await self.inbound.reconcile(self._local)
        if s.outbound_addr is not None:
            self.binding = ("--outbound-addr", s.outbound_addr)
            self.addresses["outbound"] = await self.outbound.start_outbound(*s.outbound_addr, reuse_port=self._reuse)
        if s.socks5_addr is not None:
            self.binding = ("--socks5-addr", s.socks5_addr)
            self.addresses["socks5"] = await self.outbound.start_socks5(*s.socks5_addr, reuse_port=self._reuse)
        if s.inbound_plaintext_addr is not None:
            self.binding = ("--inbound-plaintext-addr", s.inbound_plaintext_addr)
            self.addresses["inbound_plaintext"] = await self.plaintext.start(*s.inbound_plaintext_addr,
                                                                             reuse_port=self._reuse)
        freeze_startup_heap()

    def on_config(self, old: "Snapshot | None", new: "Snapshot") -> None:
        """ConfigStore subscriber: new connections already see ``new``; here live tunnels are
        re-checked (ztunnel PolicyWatcher) and listeners follow the new set of local workloads."""
        self._local = local_workloads(new, self.node)
        closed = self.tracker.recheck(new)
        if closed:
            log.info("config v%s: closed %d live tunnel(s) now denied", new.version, closed)
        self._reconciling = asyncio.get_running_loop().create_task(self._reconcile())

    async def _reconcile(self) -> None:
        try:
            await self.inbound.reconcile(self._local)
        except OSError as err:
            log.error("cannot listen for a new local workload: %s", err)

    def cert_sources(self):
        return [self.identities.for_workload(w) for w in self._local.values()]

    def config_dump(self) -> dict:
        snap = self.snapshot()
        return {
            "mode": "node",
            "node": self.node,
            "local_workloads": [{"ip": ip, "name": w.name, "namespace": w.namespace, "identity": w.identity,
                                 "protocol": w.protocol} for ip, w in sorted(self._local.items())],
            "listeners": {**{f"hbone {ip}": f"{ip}:{self.settings.hbone_addr[1]}" for ip in self.inbound.servers},
                          **{k: f"{h}:{p}" for k, (h, p) in self.addresses.items()}},
            "live_inbound_tunnels": len(self.tracker.live),
            "late_rejections": self.tracker.late_rejections,
            "outbound": repr(self.outbound),
        }

    @property
    def active_tunnels(self) -> int:
        """Live connections through this node proxy, inbound and outbound."""
        return self.inbound.active_tunnels + self.outbound.active + self.plaintext.active

    def stop_accepting(self) -> None:
        """Every listener stops accepting at once (drain: readiness is already 503)."""
        self.outbound.stop_accepting()
        self.inbound.stop_accepting()
        self.plaintext.stop_accepting()

    async def close(self, drain_deadline: float = 0.0) -> None:
        if self._reconciling is not None:
            self._reconciling.cancel()
            await asyncio.gather(self._reconciling, return_exceptions=True)
        self.stop_accepting()
        await asyncio.gather(self.inbound.close(drain_deadline), self.plaintext.close(drain_deadline),
                             self.outbound.close(drain_deadline))

    def __repr__(self) -> str:
        return f"<NodeProxy {self.node} local={len(self._local)} {self.inbound!r} {self.outbound!r}>"


__all__ = ["NodeProxy", "local_workloads", "WAYPOINT_POD_LABEL"]
