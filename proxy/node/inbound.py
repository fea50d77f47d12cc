"""Node proxy inbound: HBONE on ``<pod ip>:15008`` for each local workload (ztunnel ``src/proxy/inbound.rs``).

One ``HboneServer`` per local workload IP, presenting that workload's certificate (ztunnel picks the
certificate by destination pod). Per CONNECT, in ztunnel's order (reference/ztunnel.md §1.5):

1. the ``:authority`` IP must be the workload this listener serves — the connection's destination IP
   (``validate_destination``) — else **400** ``IpMismatch``: a client may not reach pod B through pod
   A's listener, which would let it be authorized as B's traffic while presenting A's certificate;
2. that workload must still be one this node serves (a reload may have removed it) — else **503**;
3. the port must not be one of the proxy's own (15001/15006/15008) — else **503** ``SelfCall``;
4. L4 authorization with ztunnel semantics over ``PolicyIndex.for_workload`` — deny → **401**;
5. plaintext connect to ``<pod ip>:<port>`` (10 s) — failure → **503**;
6. only then **200**, and relay with half-close.

``plan_inbound`` is steps 1–4, pure. Live tunnels are registered before their first check (as
ztunnel's connection manager does, to avoid a race with a policy change) and ``recheck(snapshot)``
re-runs step 4 for each after a config change, closing those now denied (ztunnel
``AuthorizationPolicyLateRejection``).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from hbone.connect import ConnectRequest, format_authority, parse_forwarded
from hbone.relay import RelayResult, relay_detached
from hbone.server import HboneServer, InboundTunnel
from hbone.settings import CONNECT_TIMEOUT_S, HboneSettings
from hbone.stream import ByteStream, TcpConnection, TcpStream
from policy.authz.evaluate import AuthzRequest, Decision, Enforcement, authorize
from policy.inventory import Service, Workload
from proxy.errors import AuthorizationDenied, IpMismatch, ProxyError, SelfCall, UnknownDestination, UpstreamConnectFailure
from hbone.dial import dial_from
from proxy.settings import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT
from proxy.telemetry.refusals import refusal_recorder

if TYPE_CHECKING:
    from proxy.identity import Identities
    from proxy.snapshot import Snapshot
    from proxy.telemetry.accesslog import AccessLog
    from proxy.telemetry.metrics import Metrics

log = logging.getLogger("hbone.node.inbound")

# Allowed (pod IP, :authority, client IP, peer identity) combinations remembered per config
# snapshot (InboundProxy._handle); past this many the memo starts over, so a scan of many ports or
# clients cannot grow it without bound (an entry is ~0.5 KiB; a node's steady traffic needs far fewer).
INBOUND_MEMO_ENTRIES = 4096
# A dial from the client's IP that fails with one of these (the IP is not ours to bind, or no port
# is left on it) is made again from our own address, as ztunnel's freebind_connect does.
FREEBIND_FALLBACK_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EINVAL})

# ztunnel config.rs: inbound resolving to one of these is a SelfCall (503).
INBOUND_ILLEGAL_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT})


@dataclass(frozen=True)
class InboundFacts:
    """What an inbound decision is made from (kept per live tunnel for late re-checks)."""

    node: str | None
    local_ip: str                     # the IP the client connected to (the listener's pod)
    authority: tuple[str, int]
    src_ip: str
    src_principal: str | None         # "td/ns/x/sa/y"; None for plaintext (15006)


@dataclass(frozen=True)
class InboundPlan:
    workload: Workload
    target: tuple[str, int]
    decision: Decision


def forwarded_host(request: ConnectRequest) -> str | None:
    """The ``host=`` of the CONNECT's ``forwarded`` header: the Service the client addressed (ztunnel
    build_forwarded / parse_forwarded_host, as the waypoint's TunnelContext reads it); None when there is none."""
    return parse_forwarded(request.header("forwarded") or "").host or None


def guess_inbound_service(inventory, host: str | None, wl: Workload) -> Service | None:
    """The destination service for inbound telemetry, as ztunnel's guess_inbound_service: the Service the client
    says it addressed, if the destination workload is one of its endpoints ("the set of Services we look for is
    bounded, so we won't blindly trust bogus info"); else none (``destination_service="unknown"``)."""
    if not host:
        return None
    svc = inventory.service_by_hostname.get(host)
    if svc is None:
        return None
    return svc if any(w.uid == wl.uid for w, _ in inventory.endpoints_of(svc)) else None


def local_workload(snapshot: "Snapshot", node: str | None, ip: str) -> Workload | None:
    wl = snapshot.mesh.inventory.workload_by_ip.get(ip)
    if wl is None or (node is not None and wl.node != node):
        return None
    return wl


def authorize_inbound(snapshot: "Snapshot", wl: Workload, facts: InboundFacts) -> Decision:
    policies = snapshot.policies.for_workload(namespace=wl.namespace, labels=wl.labels,
                                              workload_policy_keys=wl.authorization_policies)
    req = AuthzRequest(source_ip=facts.src_ip, source_principal=facts.src_principal,
                       destination_ip=facts.authority[0], destination_port=facts.authority[1])
    return authorize(req, policies, Enforcement.ZTUNNEL)


def plan_inbound(facts: InboundFacts, snapshot: "Snapshot") -> InboundPlan:
    """Steps 1–4 above. Raises the ``ProxyError`` whose ``hbone_status`` is the answer."""
    ip, port = facts.authority
    if ip != facts.local_ip:
        raise IpMismatch(f":authority {ip} is not the destination {facts.local_ip} of this connection")
    wl = local_workload(snapshot, facts.node, ip)
    if wl is None:
        raise UnknownDestination(f"{ip} is not a workload on this node")
    if port in INBOUND_ILLEGAL_PORTS:
        raise SelfCall(f"port {port} is one of the proxy's own ports")
    decision = authorize_inbound(snapshot, wl, facts)
    if not decision.allowed:
        raise AuthorizationDenied(f"{facts.src_principal or 'plaintext'} -> {ip}:{port}: {decision.reason}",
                                  detail=decision.response_detail)
    return InboundPlan(wl, (ip, port), decision)


async def connect_workload(target: tuple[str, int], src_ip: str | None, timeout: float) -> TcpStream:
    """Plaintext to the local workload. Like ztunnel's ``freebind_connect(Some(src_ip), dst)``, the
    connection comes from the original client's IP when this host can bind it (every 127.x address
    can, on loopback), so the app sees who called it; otherwise from our own address."""
    try:
        async with asyncio.timeout(timeout):
            if src_ip is None:
                return await TcpStream.connect(*target)
            try:
                return await TcpStream.connect(*target, local_host=src_ip)
            except OSError as err:
                if err.errno not in FREEBIND_FALLBACK_ERRNOS:
                    raise
                return await TcpStream.connect(*target)
    except (OSError, TimeoutError) as err:
        raise UpstreamConnectFailure(f"{format_authority(*target)}: {err}") from err


class LiveTunnel:
    """One live inbound tunnel as the tracker sees it (late rejection aborts its streams).

    HBONE tunnels relayed without a task (``hbone.relay.relay_detached``) also keep here what their
    end-of-relay report needs (``InboundProxy._relay_done``): one object per tunnel instead of a
    task, coroutine frames and a closure."""

    __slots__ = ("facts", "streams", "rejected", "tid", "plan", "labels", "start", "tunnel", "upstream", "owner")

    def __init__(self, facts: InboundFacts):
        self.facts = facts
        self.streams: list[ByteStream] = []
        self.rejected: str | None = None
        self.tid = 0
        self.plan: InboundPlan | None = None
        self.labels: tuple[str, ...] | None = None
        self.start = 0.0
        self.tunnel: InboundTunnel | None = None   # kept only while the access log wants it
        self.upstream: TcpStream | None = None
        self.owner: "InboundProxy | None" = None

    # Callbacks as bound methods: no closure per tunnel.
    def dialled(self, upstream: "TcpConnection | None", err: BaseException | None) -> None:
        if self.owner is not None:
            self.owner._dialled(self, upstream, err, True)

    def dialled_plain(self, upstream: "TcpConnection | None", err: BaseException | None) -> None:
        if self.owner is not None:
            self.owner._dialled(self, upstream, err, False)

    def relay_done(self, result: RelayResult | None) -> None:
        if self.owner is not None:
            self.owner._relay_done(self, result)

    def close_denied(self, why: str) -> None:
        self.rejected = why
        for s in self.streams:
            s.abort()


class InboundTracker:
    """Live inbound tunnels (HBONE and plaintext), for late rejection on policy change."""

    def __init__(self, node: str | None):
        self.node = node
        self._ids = itertools.count(1)
        self.live: dict[int, LiveTunnel] = {}
        self.late_rejections = 0

    def register(self, facts: InboundFacts) -> tuple[int, LiveTunnel]:
        t = LiveTunnel(facts)
        tid = t.tid = next(self._ids)
        self.live[tid] = t
        return tid, t

    def forget(self, tid: int) -> None:
        self.live.pop(tid, None)

    def recheck(self, snapshot: "Snapshot") -> int:
        """Re-run authorization for every live tunnel; close the denied ones. Returns how many."""
        closed = 0
        for tid, t in list(self.live.items()):
            wl = local_workload(snapshot, self.node, t.facts.authority[0])
            if wl is None:
                why = "workload no longer on this node"
            else:
                d = authorize_inbound(snapshot, wl, t.facts)
                if d.allowed:
                    continue
                why = d.reason
            log.info("late rejection of %s -> %s:%s: %s", t.facts.src_principal, *t.facts.authority, why)
            t.close_denied(why)
            closed += 1
        self.late_rejections += closed
        return closed


class InboundProxy:
    """The HBONE listeners of one node proxy: one per local workload IP, reconciled on reload."""

    def __init__(self, *, node: str | None, port: int, snapshot: Callable[[], "Snapshot"],
                 identities: "Identities", trust_domain: str, tracker: InboundTracker,
                 metrics: "Metrics | None" = None, access_log: "AccessLog | None" = None,
                 hbone_settings: HboneSettings = HboneSettings(), reuse_port: bool = False,
                 connect_timeout: float = CONNECT_TIMEOUT_S):
        self.node = node
        self.port = port
        self.snapshot = snapshot
        self.identities = identities
        self.trust_domain = trust_domain
        self.tracker = tracker
        self.metrics = metrics
        self.access_log = access_log
        self.hbone_settings = hbone_settings
        self.reuse_port = reuse_port
        self.connect_timeout = connect_timeout
        self.servers: dict[str, HboneServer] = {}   # pod ip → listener
        self._memo_snap: "Snapshot | None" = None
        self._memo: dict = {}
        self._loop: asyncio.AbstractEventLoop | None = None   # set by reconcile(), before any listener

    async def reconcile(self, workloads: dict[str, Workload]) -> None:
        """Listen on every local HBONE workload's IP; stop listening for ones that are gone.
        Raises OSError when a new listener cannot bind (the caller reports it)."""
        self._loop = asyncio.get_running_loop()
        wanted = {ip: wl for ip, wl in workloads.items() if wl.protocol == "HBONE"}
        for ip in [ip for ip in self.servers if ip not in wanted]:
            server = self.servers.pop(ip)
            await server.close(drain_deadline=0.0)
        for ip, wl in wanted.items():
            if ip in self.servers:
                continue
            cert = self.identities.for_workload(wl)
            server = HboneServer(cert.server_context, self._handle, trust_domain=self.trust_domain,
                                 settings=self.hbone_settings,
                                 on_refusal=refusal_recorder(self.metrics, self.access_log, reporter="destination",
                                                             listener=(ip, self.port)))
            try:
                await server.start(ip, self.port, reuse_port=self.reuse_port)
            except OSError as err:
                err.bind_addr = (ip, self.port)  # type: ignore[attr-defined]
                raise
            self.servers[ip] = server
            log.info("HBONE inbound for %s (%s) on %s:%s", wl.name, wl.identity, ip, self.port)

    def _memo_for(self, snap: "Snapshot") -> dict:
        """The per-snapshot memo of allowed tunnels' (facts, plan, labels) (see ``_handle``)."""
        if self._memo_snap is not snap:
            self._memo_snap = snap
            self._memo = {}
        elif len(self._memo) >= INBOUND_MEMO_ENTRIES:
            self._memo.clear()
        return self._memo

    def _handle(self, tunnel: InboundTunnel) -> None:
        """A plain-function handler (hbone.server runs it with no task): plan, then dial with a
        callback (``_dialled`` answers the tunnel and splices it).

        PERF NOTE: per tunnel, steps 1–4 and the metrics labels are pure functions of the
        snapshot and (pod IP, :authority, client IP, peer identity), so an allowed tunnel's facts,
        plan and labels are memoised per snapshot under that key (denials are rare and carry their
        own messages: computed each time); the relay runs detached (no task per live tunnel); the
        access record is built only when the access log would write it. Measured A/B (ours-node of
        `python -m benchmarks --only short --repeat 1 --clients python-h2 --short-count 3000`,
        alternating old/new trees 3 times, 3 runs each, this 2-core box): 160 → 137 µs proxy CPU
        per stream. Then no task and no coroutine per tunnel at all (this plain function,
        ``hbone.dial.dial_from``, ``accept_nowait``), same A/B: 137 → 122. Checked (not
        timed) by tests/test_node_inbound_fastpath.py. Then the upstream over
        ``hbone.socktransport.SocketTransport`` (``socket_transport=True``: one edge-triggered epoll
        of our own instead of a uvloop transport per pod connection; the upload's FIN in the same
        segment as its last bytes), A/B against the previous commit on a loaded box (session 3):
        /tmp/nd/short.py (ours-node, python-h2 client, 6 000 streams, 3 runs, medians of 3
        alternations) 108 / 103 / 107 → 87 / 90 / 95 µs proxy CPU per stream; `python -m benchmarks
        --only short --repeat 1 --short-count 3000 --clients python-h2`, ours-node, 5 alternations:
        107 / 103 / 107 / 103 / 127 → 97 / 90 / 93 / 117 / 103."""
        start = time.time()
        principal = tunnel.peer_identity.principal   # "td/ns/N/sa/S": the whole identity, as a str key
        src_ip = tunnel.remote_addr[0]
        snap = self.snapshot()
        memo = self._memo_for(snap)
        host = forwarded_host(tunnel.request)
        key = (tunnel.local_addr[0], tunnel.authority, src_ip, principal, host)
        hit = memo.get(key)
        if hit is not None:
            facts, plan, labels = hit
        else:
            facts = InboundFacts(self.node, key[0], key[1], src_ip, principal)
            plan = labels = None
        tid, live = self.tracker.register(facts)   # before the check: a policy change cannot slip between
        try:
            if plan is None:
                try:
                    plan = plan_inbound(facts, snap)
                except ProxyError as err:
                    self._refuse(live, tunnel, err, start)
                    return
                labels = self._labels(snap, tunnel, plan.workload, host)
                memo[key] = (facts, plan, labels)
            live.plan, live.labels, live.start, live.tunnel, live.owner = plan, labels, start, tunnel, self
            dial_from(*plan.target, src_ip, live.dialled, timeout=self.connect_timeout, loop=self._loop,
                      socket_transport=True)
        except BaseException:
            self.tracker.forget(tid)
            raise

    def _dialled(self, live: LiveTunnel, upstream: TcpConnection | None, err: BaseException | None,
                 may_fall_back: bool) -> None:
        """The upstream dial's outcome: answer the tunnel (503 on failure, 401 if a reload denied
        it meanwhile, else 200) and splice it to the pod."""
        tunnel, plan = live.tunnel, live.plan
        assert tunnel is not None and plan is not None
        try:
            if err is not None:
                if may_fall_back and isinstance(err, OSError) and err.errno in FREEBIND_FALLBACK_ERRNOS:
                    # ztunnel freebind: the client's IP cannot be bound here; dial from our own address.
                    dial_from(*plan.target, None, live.dialled_plain, timeout=self.connect_timeout,
                              loop=self._loop, socket_transport=True)
                    return
                failure = UpstreamConnectFailure(f"{format_authority(*plan.target)}: {err}")
                failure.__cause__ = err
                self._refuse(live, tunnel, failure, live.start)
                return
            assert upstream is not None
            if live.rejected:
                upstream.abort()
                tunnel.reject_nowait(401, live.rejected)
                self._forget(live)
                return
            stream = tunnel.accept_nowait()
            live.streams.extend((stream, upstream))
            live.upstream = upstream
            if live.labels is not None:
                self.metrics.tcp_opened(live.labels)  # type: ignore[union-attr]
            if self.access_log is None:
                live.tunnel = None   # kept only for the access record
            if not relay_detached(stream, upstream, live.relay_done):
                raise TypeError(f"not a spliceable pair: {stream!r}, {upstream!r}")
        except Exception:
            log.exception("inbound tunnel %s -> %s failed", live.facts.src_ip, format_authority(*plan.target))
            for s in (*live.streams, *((upstream,) if upstream is not None else ())):
                s.abort()
            if not tunnel.answered:
                tunnel.reject_nowait(UpstreamConnectFailure.hbone_status, "internal error")
            self._forget(live)

    def _refuse(self, live: LiveTunnel, tunnel: InboundTunnel, err: ProxyError, start: float) -> None:
        tunnel.reject_nowait(err.hbone_status, str(err))
        self._record(tunnel, live.facts, None, start, 0, 0, err.flag if err.hbone_status != 401 else "DENY",
                     str(err), err.hbone_status, getattr(err, "detail", ""))
        self._forget(live)

    def _forget(self, live: LiveTunnel) -> None:
        live.tunnel = live.upstream = live.owner = None
        self.tracker.forget(live.tid)

    def _relay_done(self, live: LiveTunnel, result: RelayResult | None) -> None:
        """The end of a relayed tunnel: close upstream, metrics, access log, forget it."""
        upstream = live.upstream
        if upstream is not None:
            upstream.close()
        sent = result.b_to_a if result else 0
        recv = result.a_to_b if result else 0
        if live.labels is not None:
            self.metrics.tcp_closed(live.labels, sent, recv)  # type: ignore[union-attr]
        tunnel, plan = live.tunnel, live.plan
        if tunnel is not None and plan is not None:
            flags = "DENY" if live.rejected else ("-" if result and not result.reset else "UC")
            error = f"late rejection: {live.rejected}" if live.rejected else (result.reset if result else "cancelled")
            self._record(tunnel, live.facts, plan, live.start, sent, recv, flags, error, 200,
                         plan.decision.policy or "")
        self._forget(live)

    def _labels(self, snap: "Snapshot", tunnel: InboundTunnel, wl: Workload, host: str | None = None):
        if self.metrics is None:
            return None
        svc = guess_inbound_service(snap.mesh.inventory, host, wl)
        from proxy.telemetry.metrics import PeerInfo, ServiceInfo, traffic_labels
        peer = snap.mesh.inventory.workload_by_ip.get(tunnel.remote_addr[0])
        principal = str(tunnel.peer_identity)
        src = PeerInfo.from_workload(peer, principal=principal) if peer is not None else PeerInfo.from_identity(principal)
        return traffic_labels("destination", source=src, destination=PeerInfo.from_workload(wl),
                              service=ServiceInfo.from_service(svc) if svc is not None else None,
                              request_protocol="tcp", security_policy="mutual_tls")

    def _record(self, tunnel: InboundTunnel, facts: InboundFacts, plan: InboundPlan | None, start: float,
                sent: int, recv: int, flags: str, error: str | None, status: int, policy: str) -> None:
        if self.access_log is None or not self.access_log.enabled("error" if error else "info"):
            return
        from proxy.telemetry.accesslog import AccessRecord
        wl = plan.workload if plan else None
        record = AccessRecord(
            start_time=start, kind="tunnel", direction="inbound", reporter="destination",
            src_addr=format_authority(*tunnel.remote_addr), src_identity=str(tunnel.peer_identity),
            dst_addr=format_authority(*tunnel.local_addr), dst_hbone_addr=tunnel.request.authority_str,
            dst_workload=wl.name if wl else "", dst_identity=wl.identity if wl else "",
            authz="deny" if status == 401 or flags == "DENY" else ("allow" if plan else ""),
            authz_policy=policy if plan else "", status=status,
            bytes_sent=sent, bytes_received=recv, duration_ms=(time.time() - start) * 1000,
            response_flags=flags, error=error or "")
        self.access_log.emit(record)

    @property
    def active_tunnels(self) -> int:
        return sum(s.active_tunnels for s in self.servers.values())

    def stop_accepting(self) -> None:
        for server in self.servers.values():
            server.stop_accepting()

    async def close(self, drain_deadline: float = 0.0) -> None:
        """GOAWAY on every connection; in-flight tunnels finish up to the deadline (DESIGN §7)."""
        servers = list(self.servers.values())
        self.servers.clear()
        await asyncio.gather(*(s.close(drain_deadline=drain_deadline) for s in servers))

    def __repr__(self) -> str:
        return f"<InboundProxy node={self.node} listeners={len(self.servers)} tunnels={self.active_tunnels}>"


__all__ = ["InboundFacts", "InboundPlan", "InboundProxy", "InboundTracker", "plan_inbound", "authorize_inbound",
           "local_workload", "INBOUND_ILLEGAL_PORTS"]
