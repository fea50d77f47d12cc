"""The waypoint: connect_terminate (15008) → main_internal → connect_originate, per DESIGN §1.

``main_internal`` reads like Envoy's life of a request; each stage is one pure call, the awaits between
them are the only I/O:

    accept CONNECT (hbone.server)  →  chain = match_chain(authority, snapshot)          (503 NR if none)
    →  decision = l4_decision(chain, ...)        TCP chains only                         (401 on deny)
    →  TCP:  plan = plan_tcp(...)  →  upstream = await connect_upstream(...)            (503 UF / UF,URX)
             →  200  →  relay (half-close; reset ↔ reset)
    →  HTTP / unknown: 200  →  protocol = sniff (or appProtocol)
             →  http/1.1 or h2c: HttpPipeline.serve — per request L7 authz, route, fault, retries, mirrors
                (pipeline/http.py; h2c's front-end and upstream connections in pipeline/h2c.py)
             →  tcp (sniffed): the L4 decision now (a deny closes the stream, as Envoy's network RBAC does)
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

from certs.rotation import CertSource
from hbone.relay import relay
from hbone.server import HboneServer, InboundTunnel
from hbone.settings import HboneSettings
from hbone.stream import ByteStream
from policy.authz.evaluate import Decision
from policy.routing.endpoints import Candidate, LoadBalancer
from proxy.errors import AuthorizationDenied, ProxyError
from proxy.pipeline.answers import flags_of
from proxy.pipeline.authz import l4_decision
from proxy.pipeline.chains import Chain, match_chain
from proxy.pipeline.context import TunnelContext, addr_str
from proxy.pipeline.http import HttpPipeline
from proxy.pipeline.originate import Originator
from proxy.pipeline.tcp import connect_upstream, plan_tcp
from proxy.settings import ProxySettings
from proxy.snapshot import ConfigStore, Snapshot
from proxy.sniff import SNIFF_TIMEOUT_S, sniff
from proxy.telemetry.accesslog import AccessRecord
from proxy.telemetry.metrics import PeerInfo, ServiceInfo, traffic_labels
from proxy.telemetry.refusals import refusal_recorder

log = logging.getLogger("hbone.waypoint")


@dataclass(eq=False)
class LiveTunnel:
    """One tunnel in progress, with its L4 decision inputs (for ``recheck`` after a policy change)."""

    ctx: TunnelContext
    chain: Chain
    streams: list[ByteStream] = field(default_factory=list)
    closed_by_policy: bool = False

    def abort(self) -> None:
        self.closed_by_policy = True
        for s in self.streams:
            # abort() is RST_STREAM CONNECT_ERROR (RFC 9113 §8.5), not CANCEL: HBONE peers read CANCEL
            # as a clean end, and a tunnel cut by policy must not pass for a finished one.
            s.abort()


@dataclass
class _TunnelLog:
    start: float
    chain: str = ""
    protocol: str = ""
    status: int | None = None
    decision: Decision | None = None
    detail: str = ""
    flags: tuple[str, ...] = ()
    cluster: str = ""
    candidate: Candidate | None = None
    sent: int = 0
    received: int = 0
    error: str = ""


class Waypoint:
    """``await Waypoint.start(settings, store, cert_source, metrics, access_log)``."""

    def __init__(self, settings: ProxySettings, store: ConfigStore, cert_source: CertSource, metrics, access_log,
                 *, rng: random.Random | None = None, hbone_settings: HboneSettings = HboneSettings()):
        self.settings = settings
        self.store = store
        self.cert_source = cert_source
        self.metrics = metrics
        self.access_log = access_log
        self.rng = rng or random.Random()
        bind_ip = settings.hbone_addr[0]
        self.originator = Originator(cert_source, settings=hbone_settings, rng=self.rng,
                                     source_ip=None if bind_ip in ("0.0.0.0", "::", "") else bind_ip)
        self.http = HttpPipeline(self.originator, metrics=metrics, access_log=access_log, rng=self.rng)
        self.lb = LoadBalancer()
        # TCP chains' plans per config snapshot (plan_tcp's memo): (the snapshot, its memo).
        self._tcp_plans: tuple[Snapshot | None, dict] = (None, {})
        self.live: set[LiveTunnel] = set()
        if metrics is not None:
            # hbone_tunnels_active is the live set's size, read at scrape time (as the node proxy reads its
            # listeners' counts): no gauge update per tunnel. It counts the tunnels being served — from the
            # chain match to the end; a CONNECT refused for an unknown destination never was a tunnel.
            metrics.count_tunnels_with(self._live_count)
            # envoy_cluster_* (the circuit breakers, as Envoy exports them), read at scrape time from what admin
            # /stats shows: nothing per request.
            metrics.cluster_stats_from(self.http.breakers.envoy_stats)
        self.server = HboneServer(lambda: cert_source.server_context(), self.main_internal,
                                  trust_domain=cert_source.trust_domain, settings=hbone_settings,
                                  on_refusal=refusal_recorder(metrics, access_log, reporter="waypoint",
                                                              listener=settings.hbone_addr))

    @classmethod
    async def start(cls, settings: ProxySettings, store: ConfigStore, cert_source: CertSource, metrics, access_log,
                    *, rng: random.Random | None = None, hbone_settings: HboneSettings = HboneSettings()) -> "Waypoint":
        wp = cls(settings, store, cert_source, metrics, access_log, rng=rng, hbone_settings=hbone_settings)
        await wp.server.start(*settings.hbone_addr, reuse_port=settings.workers > 1)
        return wp

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def _snapshot(self) -> Snapshot:
        snap = self.store.current
        if snap is None:
            raise RuntimeError("the waypoint has no configuration loaded")
        return snap

    # ------------------------------------------------------------------------------------------
    # main_internal

    async def main_internal(self, tunnel: InboundTunnel) -> None:
        snapshot = self._snapshot()
        ctx = TunnelContext.of(tunnel, now=time.time())
        rec = _TunnelLog(ctx.start_time)
        t0 = time.monotonic()
        live: LiveTunnel | None = None
        try:
            try:
                chain = match_chain(ctx.authority, snapshot)
                rec.chain = chain.envoy_name
                live = LiveTunnel(ctx, chain)
                self.live.add(live)
                decision = l4_decision(chain, snapshot, ctx.source_ip, ctx.peer_identity)
                rec.decision = decision
                if decision is not None and not decision.allowed:
                    raise AuthorizationDenied(decision.reason, detail=decision.response_detail)
                if chain.protocol == "tcp":
                    rec.protocol = "tcp"
                    await self._tcp(tunnel, None, ctx, chain, snapshot, rec, live)
                    return
            except ProxyError as err:
                rec.status, rec.detail, rec.flags, rec.error = err.hbone_status, err.detail, flags_of(err), str(err)
                await tunnel.reject(err.hbone_status, str(err))
                return
            rec.status = 200
            stream = await tunnel.accept()
            live.streams.append(stream)
            # Declared HTTP ports skip the sniff timeout: the bytes are HTTP, only the version is open.
            proto, stream = await sniff(stream, timeout=None if chain.protocol == "http" else SNIFF_TIMEOUT_S)
            if chain.protocol == "http" and proto == "tcp":
                proto = "http/1.1"   # declared HTTP: the HTTP/1 codec answers garbage with 400
            rec.protocol = proto
            if proto == "tcp":
                chain = chain.resolved("tcp")
                rec.chain = chain.envoy_name
                live.chain = chain
                decision = l4_decision(chain, snapshot, ctx.source_ip, ctx.peer_identity)
                rec.decision = decision
                if decision is not None and not decision.allowed:
                    # The 200 is out already (sniffing needs bytes): Envoy's network RBAC closes the
                    # connection without data (istio-semantics §1.6).
                    rec.detail = decision.response_detail
                    stream.abort()
                    return
                try:
                    await self._tcp(tunnel, stream, ctx, chain, snapshot, rec, live)
                except ProxyError as err:
                    # After the 200 (sniffed): _tcp has reset the stream; only the log is left to say why.
                    rec.detail, rec.flags, rec.error = err.detail, flags_of(err), str(err)
            else:   # http/1.1 or h2c: the same per-request path (pipeline/http.py)
                chain = chain.resolved("http")
                rec.chain = chain.envoy_name
                live.chain = chain
                await self.http.serve(stream, ctx, chain, lambda: self.store.current or snapshot, proto)
        except (OSError, asyncio.IncompleteReadError) as err:
            rec.error = rec.error or f"{err.__class__.__name__}: {err}"
        finally:
            if live is not None:
                self.live.discard(live)
                if live.closed_by_policy:
                    rec.error = "closed: denied by a policy change"
                if rec.protocol in ("http/1.1", "h2c") and live.streams:
                    # HTTP tunnels: the tunnel line carries the tunnel's own byte counts (the per-request
                    # lines carry each request's); TCP chains set them from the relay result.
                    tunnel_stream = live.streams[0]
                    rec.received = getattr(tunnel_stream, "bytes_received", 0)
                    rec.sent = getattr(tunnel_stream, "bytes_sent", 0)
            self._log_tunnel(ctx, rec, t0)

    async def _tcp(self, tunnel: InboundTunnel, stream: ByteStream | None, ctx: TunnelContext, chain: Chain,
                   snapshot: Snapshot, rec: _TunnelLog, live: LiveTunnel) -> None:
        try:
            if self._tcp_plans[0] is not snapshot:
                self._tcp_plans = (snapshot, {})
            plan = plan_tcp(chain, snapshot, rng=self.rng, memo=self._tcp_plans[1])
            rec.cluster = plan.cluster
            upstream, cand, _ = await connect_upstream(plan, ctx, self.originator, self.lb, self.rng,
                                                       breakers=self.http.breakers, outliers=self.http.outliers)
        except ProxyError:
            if stream is not None:   # answered 200 already (sniffed): the client must see a reset
                stream.abort()
            raise
        rec.candidate = cand
        live.streams.append(upstream)
        if stream is None:
            # ztunnel: 200 only after the upstream is connected.
            rec.status = 200
            stream = await tunnel.accept()
            live.streams.append(stream)
        labels = None
        if self.metrics is not None:
            labels = traffic_labels(
                "waypoint", source=PeerInfo.from_baggage(ctx.peer_identity, ctx.baggage),
                destination=PeerInfo.from_workload(cand.workload),
                service=ServiceInfo.from_service(chain.service) if chain.service else None,
                request_protocol="tcp", security_policy="mutual_tls")
            self.metrics.tcp_opened(labels)
        try:
            result = await relay(stream, upstream)
            rec.received, rec.sent = result.a_to_b, result.b_to_a
            if result.reset:
                rec.error = f"reset: {result.reset}"
        finally:
            upstream.close()
            stream.close()
            if labels is not None:
                self.metrics.tcp_closed(labels, rec.sent, rec.received)

    def _log_tunnel(self, ctx: TunnelContext, rec: _TunnelLog, t0: float) -> None:
        if self.access_log is None or not self.access_log.enabled():
            return
        d = rec.decision
        self.access_log.emit(AccessRecord(
            start_time=rec.start, kind="tunnel", direction="inbound", reporter="waypoint",
            src_addr=addr_str(ctx.remote_addr), src_identity=ctx.peer_identity or "",
            dst_addr=addr_str(ctx.local_addr), dst_hbone_addr=addr_str(ctx.authority),
            dst_workload=rec.candidate.workload.name if rec.candidate else "",
            upstream_host=rec.candidate.key if rec.candidate else "", upstream_cluster=rec.cluster,
            chain=rec.chain, protocol=rec.protocol,
            authz=("allow" if d.allowed else "deny") if d is not None else "",
            authz_policy=(d.policy or "") if d is not None else "", response_code_details=rec.detail,
            status=rec.status, bytes_sent=rec.sent, bytes_received=rec.received,
            duration_ms=(time.monotonic() - t0) * 1000.0, response_flags=rec.flags or "-", error=rec.error))

    # ------------------------------------------------------------------------------------------
    # live tunnels, policy changes, shutdown

    def tunnels(self) -> list[LiveTunnel]:
        return list(self.live)

    def recheck(self, snapshot: Snapshot) -> int:
        """Close the live TCP tunnels the new snapshot denies at L4 (ztunnel's PolicyWatcher does the
        same for its connections); HTTP tunnels are checked per request anyway. Returns how many."""
        closed = 0
        for t in list(self.live):
            try:
                chain = match_chain(t.ctx.authority, snapshot)
            except ProxyError:
                t.abort()   # the destination left this waypoint's scope
                closed += 1
                continue
            if t.chain.protocol != "tcp":
                continue
            decision = l4_decision(chain.resolved("tcp"), snapshot, t.ctx.source_ip, t.ctx.peer_identity)
            if decision is not None and not decision.allowed:
                t.abort()
                closed += 1
        return closed

    @property
    def active_tunnels(self) -> int:
        return len(self.live)

    def _live_count(self) -> int:
        return len(self.live)

    def stop_accepting(self) -> None:
        self.server.stop_accepting()

    async def close(self, drain_deadline: float = 0.0) -> None:
        await self.server.close(drain_deadline)
        await self.http.close()
        await self.originator.close()

    def __repr__(self) -> str:
        tcp = sum(1 for t in self.live if t.chain.protocol == "tcp")
        return (f"<Waypoint {addr_str(self.server.address) if self.server.sockets else 'closed'} "
                f"tunnels={len(self.live)} tcp={tcp} http={len(self.live) - tcp} {self.http!r}>")


__all__ = ["Waypoint", "LiveTunnel"]
