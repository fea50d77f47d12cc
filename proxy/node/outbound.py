"""Node proxy outbound (ztunnel ``src/proxy/outbound.rs``): decide where a captured connection goes.

``plan_outbound`` is pure — destination, source workload, snapshot and rng in, a frozen ``OutboundPlan``
out — and follows ztunnel's classification (reference/ztunnel.md §3 and §5.5):

* a service VIP (or service hostname, SOCKS5) whose service has a waypoint → HBONE to the waypoint's
  address ``:15008`` with ``:authority`` = VIP:port; the expected server identity is the waypoint
  workload's (plus the waypoint service's ``subjectAltNames``);
* a service without a waypoint → pick an endpoint (healthy, has the service port, weighted by
  ``capacity``) → HBONE to ``<pod ip>:15008`` with ``:authority`` = ``<pod ip>:<target port>``; the
  expected identity is that workload's plus the service's ``subjectAltNames``; a ``protocol: TCP``
  endpoint (not in the mesh) gets plain TCP to ``<pod ip>:<target port>``;
* a pod IP → its own waypoint if it has one (``:authority`` = pod ip:port), else HBONE to the pod,
  or plain TCP when the workload speaks TCP;
* anything else (outside the mesh) → plain TCP passthrough to the original destination.

``OutboundProxy`` is the asyncio shell: the 15001 listener (original destination from
``SO_ORIGINAL_DST``) and the SOCKS5 listener on 15080 feed the same ``plan → originate → relay``.

The source workload is the local workload whose IP is the client's source IP: each app binds its
pod IP (on loopback: ``curl --interface 127.1.0.10``). A connection from an IP that is not a local
workload is refused — ztunnel refuses traffic from pods it does not know, because it could not pick
the certificate (identity) to originate with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from certs.spiffe import SpiffeError, SpiffeId
from hbone.connect import Baggage, build_baggage, build_forwarded, format_authority, new_traceparent
from hbone.errors import ConnectFailed, HboneError, TunnelRefused
from hbone.pool import HbonePool
from hbone.relay import RelayResult, relay, relay_detached
from hbone.settings import CONNECT_TIMEOUT_S, HboneSettings
from hbone.stream import ByteStream, PrefixedStream, TcpConnection, TcpStream, start_tcp_server
from policy.inventory import GatewayAddress, Inventory, Service, Workload
from policy.routing.endpoints import endpoints_for
from policy.routing.select import pick_weighted
from proxy import socks5
from proxy.dns import STRICT_DNS, DnsFailure, Resolver, is_ip
from proxy.errors import (AuthorizationDenied, NoHealthyUpstream, ProxyError, SelfCall,
                          UnknownDestination, UpstreamConnectFailure)
from proxy.origdst import original_dst
from proxy.settings import HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, SOCKS5_PORT

if TYPE_CHECKING:
    from proxy.identity import Identities
    from proxy.snapshot import Snapshot
    from proxy.telemetry.accesslog import AccessLog
    from proxy.telemetry.metrics import Metrics

log = logging.getLogger("hbone.node.outbound")

# ztunnel config.rs: "illegal ports" a tunnel may not target on loopback: HBONE doesn't have
# redirection, "so we cannot have loops, but this would allow multiple layers of HBONE… for now just
# ban it." 15080 is added when SOCKS5 is enabled, as ztunnel does.
ILLEGAL_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT, SOCKS5_PORT})
# Istio's cluster domain, for SOCKS5 short names (reviews.default → reviews.default.svc.cluster.local).
CLUSTER_SUFFIX = ".svc.cluster.local"
LISTEN_BACKLOG = 1024
# Entries of the per-snapshot outbound memo (OutboundProxy._memo_for) before it starts over: bounded
# so many sources × destinations cannot grow it without limit; steady traffic needs far fewer.
OUTBOUND_MEMO_ENTRIES = 4096
# After the drain deadline cuts detached relays, close() waits at most this long for their end
# reports (access-log line, metrics: they run on the next loop turns) before closing the pools.
CUT_REPORT_WAIT_S = 1.0


class UnknownHost(ProxyError):
    """A SOCKS5 hostname that names no service or workload in the inventory."""
    hbone_status = 503
    http_status = 503
    flag = "NR"
    detail = "unknown_host"


class UnknownSource(ProxyError):
    """The client's source IP is not a workload this node proxy serves (ztunnel refuses it)."""
    hbone_status = 503
    http_status = 503
    flag = "-"
    detail = "unknown_source"


@dataclass(frozen=True)
class OutboundPlan:
    """What to do with one outbound connection: dial ``dst`` with HBONE (CONNECT ``authority``,
    server identity in ``identities``) or plain TCP."""

    protocol: str                              # "hbone" | "tcp"
    dst: tuple[str, int]                       # the address dialled (x:15008 for HBONE)
    authority: str | None = None               # HBONE :authority
    identities: frozenset[SpiffeId] = frozenset()
    service: Service | None = None             # the service addressed, if any
    workload: Workload | None = None           # the workload dialled (endpoint or waypoint), if known
    via_waypoint: bool = False
    host: str | None = None                    # service hostname, for `forwarded: ...;host=`
    reason: str = ""                           # why this plan, for logs: "waypoint", "endpoint", "pod", "passthrough"

    def __str__(self) -> str:
        how = f"HBONE {self.dst[0]}:{self.dst[1]} :authority {self.authority}" if self.protocol == "hbone" \
            else f"TCP {self.dst[0]}:{self.dst[1]}"
        return f"{self.reason}: {how}"


def _ident(uri: str) -> SpiffeId | None:
    try:
        return SpiffeId.parse(uri)
    except SpiffeError:
        return None


def source_baggage(w: Workload) -> str:
    """ztunnel's ``baggage`` for the source workload (src/baggage.rs ``baggage_header_val``): the
    destination side names the caller in its metrics from it."""
    from proxy.telemetry.metrics import PeerInfo
    peer = PeerInfo.from_workload(w)   # canonical service/revision derived once, as the metrics do
    return build_baggage(Baggage(
        cluster=w.cluster_id, namespace=w.namespace, workload_name=w.workload_name or w.name,
        workload_type=w.workload_type or "pod",
        service_name=peer.canonical_service, service_version=peer.canonical_revision))


# PERF NOTE: SpiffeId validates its parts on construction and ipaddress parses with Python code;
# per outbound connection the same few identities and addresses came back several times (source
# identity twice, destination identity, SANs, the destination IP). Cached by value (pure functions
# of strings), bounded so hostile SOCKS5 hostnames cannot grow them. Measured with the rest of the
# outbound memo, see OutboundProxy._memo_for.
_CACHE_ENTRIES = 4096


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _spiffe_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    return SpiffeId(trust_domain, namespace, service_account)


def _workload_id(w: Workload) -> SpiffeId:
    return _spiffe_id(w.trust_domain, w.namespace, w.service_account)


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _sans_of(subject_alt_names: tuple[str, ...]) -> frozenset[SpiffeId]:
    return frozenset(i for i in map(_ident, subject_alt_names) if i is not None)


def _sans(service: Service | None) -> frozenset[SpiffeId]:
    if service is None:
        return frozenset()
    return _sans_of(service.subject_alt_names)


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _canonical_ip(host: str) -> str | None:
    """``host`` as a canonical IP address text, or None when it is not an IP address (a hostname)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def resolve_hostname(inventory: Inventory, host: str) -> Service | Workload | None:
    """A SOCKS5 hostname → the service (or hostname workload) it names. Accepts the FQDN and the
    short forms a pod's DNS search path completes (``name.ns``, ``name.ns.svc``)."""
    h = host.lower().rstrip(".")
    svc = inventory.service_by_hostname.get(h)
    if svc is None and not h.endswith(CLUSTER_SUFFIX):
        if h.endswith(".svc"):
            svc = inventory.service_by_hostname.get(h + ".cluster.local")
        elif h.count(".") == 1:
            svc = inventory.service_by_hostname.get(h + CLUSTER_SUFFIX)
    if svc is not None:
        return svc
    return next((w for w in inventory.workloads.values() if w.hostname and w.hostname.lower() == h), None)


def _waypoint_endpoint(inventory: Inventory, gw: GatewayAddress, rng: random.Random
                       ) -> tuple[tuple[str, int], frozenset[SpiffeId], Workload | None]:
    """Where a ``waypoint: {destination: ...}`` reference points: (ip, hbone port), the identities the
    waypoint may present, and its workload. ``/<ip>`` names the waypoint pod (or a waypoint service
    VIP); ``<ns>/<hostname>`` names the Gateway's Service, whose endpoints are the waypoint pods."""
    port = gw.hbone_mtls_port or HBONE_PORT
    if gw.address is not None:
        ip = gw.address.ip
        wl = inventory.workload_by_ip.get(ip)
        if wl is not None:
            return (ip, port), frozenset({_workload_id(wl)}), wl
        svc = inventory.service_by_vip.get(ip)
        if svc is None:
            raise UnknownDestination(f"waypoint {gw} is neither a workload nor a service in the inventory")
    else:
        svc = inventory.services.get(f"{gw.namespace}/{gw.hostname}")
        if svc is None:
            raise UnknownDestination(f"waypoint service {gw.namespace}/{gw.hostname} is not in the inventory")
    pods = [(w, max(w.capacity, 0)) for w, ep in inventory.endpoints_of(svc)
            if w.healthy and ep.status == "Healthy" and w.workload_ips and w.capacity > 0]
    if not pods:
        raise NoHealthyUpstream(f"waypoint {gw} has no healthy pod")
    wl = pick_weighted(pods, rng)
    return (wl.workload_ips[0], port), frozenset({_workload_id(wl)}) | _sans(svc), wl


def _pick_waypoint(service: Service, rng: random.Random) -> GatewayAddress | None:
    # ztunnel sample_weighted_waypoint: "weighted_waypoints are sampled per connection proportional
    # to weight; with no usable set the single waypoint is used".
    usable = [(w.destination, w.weight) for w in service.weighted_waypoints if w.weight > 0]
    if usable:
        return pick_weighted(usable, rng)
    return service.waypoint


def _locality_rank(service: Service, wl: Workload, source: Workload | None) -> int:
    """ztunnel load_balance: the number of consecutive ``routingPreferences`` the endpoint shares
    with the source (only when the mode is not Standard)."""
    lb = service.load_balancer
    if lb is None or source is None:
        return 0
    rank = 0
    for pref in lb.routing_preferences:
        same = {
            "Network": wl.network == source.network,
            "Region": wl.locality.region == source.locality.region,
            "Zone": wl.locality.zone == source.locality.zone and wl.locality.region == source.locality.region,
            "Subzone": wl.locality == source.locality,
            "Node": wl.node == source.node,
            "Cluster": wl.cluster_id == source.cluster_id,
        }.get(pref, False)
        if not same:
            break
        rank += 1
    return rank


def _to_service(inventory: Inventory, service: Service, vip: str | None, port: int,
                source: Workload | None, rng: random.Random, memo: dict | None = None) -> OutboundPlan:
    authority_ip = vip or (service.vips[0].ip if service.vips else None)
    gw = _pick_waypoint(service, rng)
    if gw is not None:
        if authority_ip is None:
            # Bound to a waypoint but without an address (a ServiceEntry with no addresses, reached by name): the
            # waypoint's chains are found by VIP, so it cannot take this connection — refused, never sent around
            # the waypoint's policy to the endpoints (found by review).
            raise NoHealthyUpstream(f"{service.hostname} is served by its waypoint, which needs its address; it "
                                    "has none (a ServiceEntry without addresses)")
        dst, ids, wl = _waypoint_endpoint(inventory, gw, rng)
        return OutboundPlan("hbone", dst, format_authority(authority_ip, port), ids, service, wl, True,
                            service.hostname, "waypoint")
    lb = service.load_balancer
    if lb is not None and lb.mode == "Passthrough":
        # ztunnel state.rs find_upstream: "if lb.mode == LoadBalancerMode::Passthrough { return
        # Some(UpstreamDestination::OriginalDestination) }" — a ServiceEntry with resolution NONE: the connection
        # goes where the app sent it, in plain TCP (no endpoint, so no identity to check).
        if authority_ip is None:
            # By name, a host of a multi-host entry whose addresses went to its first host (policy/serviceentry.py:
            # one service per VIP): istiod gives every host the entry's addresses, so do those (found by review).
            # (Only another Passthrough service of the same entry: same namespace and name, same mode.)
            authority_ip = next((s.vips[0].ip for s in inventory.services.values()
                                 if s.namespace == service.namespace and s.name == service.name and s.vips
                                 and s.load_balancer is not None and s.load_balancer.mode == "Passthrough"), None)
        if authority_ip is None:
            raise NoHealthyUpstream(f"{service.hostname} passes connections through to their original "
                                    "destination, and a connection by name has none")
        return OutboundPlan("tcp", (authority_ip, port), None, frozenset(), service, None, False, service.hostname,
                            "passthrough")
    key = ("endpoints", service.namespace, service.hostname, port, source.uid if source is not None else None)
    weighted = memo.get(key) if memo is not None else None
    if weighted is None:
        weighted = _endpoint_choices(inventory, service, port, source)
        if memo is not None:
            memo[key] = weighted
    # ztunnel: `options.choose_weighted(&mut rng, |(_, wl)| wl.capacity)`.
    chosen = pick_weighted(weighted, rng)
    wl = chosen.workload
    if wl.protocol != "HBONE":
        return OutboundPlan("tcp", (chosen.ip, chosen.target_port), None, frozenset(), service, wl, False,
                            service.hostname, "endpoint")
    return OutboundPlan("hbone", (chosen.ip, HBONE_PORT), format_authority(chosen.ip, chosen.target_port),
                        frozenset({_workload_id(wl)}) | _sans(service), service, wl, False, service.hostname,
                        "endpoint")


def _endpoint_choices(inventory: Inventory, service: Service, port: int, source: Workload | None) -> tuple:
    """The (candidate, weight) pairs a connection from ``source`` to ``service:port`` picks from:
    deterministic for one snapshot (only the pick is random), hence memoisable per snapshot."""
    cands = list(endpoints_for(inventory, service, port, None))
    lb = service.load_balancer
    if lb is not None and lb.health_policy == "AllowAll":
        # ztunnel: "Only healthy endpoints are used, unless healthPolicy: AllowAll".
        seen = {c.uid for c in cands}
        for wl, ep in inventory.endpoints_of(service):
            target = ep.ports.get(port)
            if wl.uid not in seen and target and wl.workload_ips:
                from policy.routing.endpoints import Candidate
                cands.append(Candidate(wl, wl.workload_ips[0], target, wl.uid))
    if lb is not None and lb.mode != "Standard" and cands:
        ranks = {c.uid: _locality_rank(service, c.workload, source) for c in cands}
        if lb.mode == "Strict":
            full = len(lb.routing_preferences)
            cands = [c for c in cands if ranks[c.uid] == full]
        elif cands:
            best = max(ranks.values())
            cands = [c for c in cands if ranks[c.uid] == best]
    cands = [c for c in cands if c.weight > 0]
    if not cands:
        raise NoHealthyUpstream(f"no healthy endpoint of {service.hostname} serves port {port}")
    return tuple((c, c.weight) for c in cands)


def _to_pod(inventory: Inventory, wl: Workload, ip: str, port: int, rng: random.Random) -> OutboundPlan:
    if wl.waypoint is not None:
        dst, ids, wp = _waypoint_endpoint(inventory, wl.waypoint, rng)
        return OutboundPlan("hbone", dst, format_authority(ip, port), ids, None, wp, True, None, "waypoint")
    if wl.protocol != "HBONE":
        return OutboundPlan("tcp", (ip, port), None, frozenset(), None, wl, False, None, "pod")
    return OutboundPlan("hbone", (ip, HBONE_PORT), format_authority(ip, port), frozenset({_workload_id(wl)}),
                        None, wl, False, None, "pod")


def plan_outbound(dst: tuple[str, int], source_workload: Workload | None, snapshot: "Snapshot",
                  rng: random.Random, *, memo: dict | None = None) -> OutboundPlan:
    """Where a connection from ``source_workload`` to ``dst`` (an ``(ip, port)`` or, from SOCKS5,
    ``(hostname, port)``) goes. Raises ``ProxyError`` subclasses that carry the answer. ``memo``: a
    dict the caller keeps for this ``snapshot`` only (the deterministic parts are remembered in it)."""
    host, port = dst
    inv = snapshot.mesh.inventory
    ip = _canonical_ip(host)
    if ip is None:
        target = resolve_hostname(inv, host)
        if target is None:
            raise UnknownHost(f"{host} names no service or workload in the mesh")
        if isinstance(target, Service):
            return _to_service(inv, target, None, port, source_workload, rng, memo)
        if not target.workload_ips:
            raise UnknownHost(f"workload {target.name} has no address")
        return _to_pod(inv, target, target.workload_ips[0], port, rng)
    if port in ILLEGAL_PORTS and _is_loopback(ip) and ip not in inv.service_by_vip:
        # ztunnel: "Outbound to loopback on an illegal port → SelfCall deny".
        raise SelfCall(f"{ip}:{port} is one of the proxy's own ports")
    svc = inv.service_by_vip.get(ip)
    if svc is not None:
        return _to_service(inv, svc, ip, port, source_workload, rng, memo)
    wl = inv.workload_by_ip.get(ip)
    if wl is not None:
        return _to_pod(inv, wl, ip, port, rng)
    # Outside the mesh: ztunnel passthrough ("else passthrough TCP").
    return OutboundPlan("tcp", (ip, port), reason="passthrough")


# ---------------------------------------------------------------------------------------------
# The shell


def socks5_reply_for(exc: BaseException) -> int:
    """The SOCKS5 reply code (RFC 1928 §6) for why a CONNECT failed."""
    if isinstance(exc, TunnelRefused):
        if exc.status == 401:
            return socks5.NOT_ALLOWED             # policy deny at the destination
        if exc.status == 503:
            return socks5.CONNECTION_REFUSED      # the far side could not reach the workload
        return socks5.GENERAL_FAILURE
    if isinstance(exc, ConnectFailed):
        if exc.reason == "timeout":
            return socks5.TTL_EXPIRED
        if exc.reason == "refused":
            return socks5.HOST_UNREACHABLE        # the peer's HBONE listener is not there
        return socks5.GENERAL_FAILURE             # TLS / identity / protocol
    if isinstance(exc, (UnknownHost, NoHealthyUpstream, UnknownDestination)):
        return socks5.HOST_UNREACHABLE
    if isinstance(exc, (SelfCall, AuthorizationDenied, UnknownSource)):
        return socks5.NOT_ALLOWED
    if isinstance(exc, UpstreamConnectFailure) and isinstance(exc.__cause__, DnsFailure):
        return socks5.HOST_UNREACHABLE            # the endpoint's hostname did not resolve
    if isinstance(exc, UpstreamConnectFailure) and exc.__cause__ is not None:
        return socks5.reply_code_for(exc.__cause__)
    return socks5.reply_code_for(exc)


def _flag_for(exc: BaseException) -> str:
    if isinstance(exc, ProxyError):
        return exc.flag
    if isinstance(exc, (HboneError, TunnelRefused)):
        return getattr(exc, "flag", "UF")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "UT"
    return "UF"


class OutboundProxy:
    """The 15001 and 15080 listeners of one node proxy.

    ``snapshot()`` returns the config in force (read once per connection); ``local_workloads()`` the
    workloads this node serves, by IP. One ``HbonePool`` per source identity: the pool's TLS client
    context carries that workload's certificate (ztunnel keys its pool on the source identity too).
    """

    def __init__(self, *, snapshot: Callable[[], "Snapshot"], local_workloads: Callable[[], dict[str, Workload]],
                 identities: "Identities", trust_domain: str, metrics: "Metrics | None" = None,
                 access_log: "AccessLog | None" = None, hbone_settings: HboneSettings = HboneSettings(),
                 rng: random.Random | None = None, connect_timeout: float = CONNECT_TIMEOUT_S,
                 resolver: Resolver | None = None):
        self.snapshot = snapshot
        self.local_workloads = local_workloads
        self.identities = identities
        self.trust_domain = trust_domain
        self.metrics = metrics
        self.access_log = access_log
        self.hbone_settings = hbone_settings
        self.rng = rng or random.Random()
        self.connect_timeout = connect_timeout
        # DNS ServiceEntry endpoints (a hostname, no IP) are resolved when dialled, with a cache (proxy/dns.py).
        self.resolver = resolver or Resolver(rng=self.rng)
        self.pools: dict[SpiffeId, HbonePool] = {}
        self.servers: list[asyncio.base_events.Server] = []
        self._conn_tasks: set[asyncio.Task] = set()
        self._live: set["_OutboundRelay"] = set()   # relayed detached (their tasks have ended)
        self._draining = False
        self._memo_snap: "Snapshot | None" = None
        self._memo: dict = {}

    def _memo_for(self, snap: "Snapshot") -> dict:
        """What is deterministic per connection for one config snapshot: endpoint choices
        (``plan_outbound(memo=)``), the source's baggage header, the metrics labels.

        PERF NOTE: with the caches of identities and addresses above and socks5.encode_reply's,
        per short SOCKS5 connection (client → node-a SOCKS5 by service hostname → HBONE → node-b
        → echo on the pod, 1 KiB each way, 2 000 connections, 32 in flight; old and new trees
        alternated twice, 3 runs each, this 2-core box): node-a 355/375 → 325/325 µs CPU per
        connection. Most of what is left is hbone's (HPACK-encoding the CONNECT headers with
        Huffman, ~28 µs) and the kernel's."""
        if self._memo_snap is not snap:
            self._memo_snap = snap
            self._memo = {}
        elif len(self._memo) >= OUTBOUND_MEMO_ENTRIES:
            self._memo.clear()
        return self._memo

    # ---- listeners ----
    async def start_outbound(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        return await self._listen(host, port, self._on_captured, reuse_port)

    async def start_socks5(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        return await self._listen(host, port, self._on_socks5, reuse_port)

    async def _listen(self, host: str, port: int, cb, reuse_port: bool) -> tuple[str, int]:
        # Accepted as hbone.stream.TcpConnection (not asyncio.start_server's reader/writer pair) so
        # that relay() splices it to the HBONE stream in the protocol callbacks: no pump tasks, no
        # future per read (hbone/relay.py; measured in the benchmarks' perf notes).
        async def serve(stream: TcpConnection) -> None:
            try:
                await cb(stream, stream.transport.get_extra_info("socket"))
            except Exception:
                log.exception("outbound connection from %s failed", stream.remote_addr)
                stream.abort()

        loop = asyncio.get_running_loop()

        def accept(stream: TcpConnection) -> None:
            task = loop.create_task(serve(stream))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

        server = await start_tcp_server(accept, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port or None)
        self.servers.append(server)
        name = server.sockets[0].getsockname()
        return name[0], name[1]

    # ---- per connection ----
    def _source(self, stream: ByteStream) -> Workload:
        ip = stream.remote_addr[0]
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        wl = self.local_workloads().get(ip)
        if wl is None:
            raise UnknownSource(f"source {ip} is not a workload on this node")
        return wl

    async def _on_captured(self, stream: TcpStream, sock: socket.socket | None) -> None:
        dst = original_dst(sock) if sock is not None else stream.local_addr
        try:
            source = self._source(stream)
            snap = self.snapshot()
            memo = self._memo_for(snap)
            plan = plan_outbound(dst, source, snap, self.rng, memo=memo)
        except ProxyError as err:
            log.info("outbound %s -> %s:%s refused: %s", stream.remote_addr, dst[0], dst[1], err)
            self._log_failure(stream, dst, None, err, time.time())
            stream.abort()   # ztunnel closes the captured connection; there is no protocol to answer in
            return
        await self._run(stream, source, plan, dst, b"", None, memo)

    async def _on_socks5(self, stream: TcpStream, sock: socket.socket | None) -> None:
        try:
            request, early = await socks5.accept_socks5(stream)
        except socks5.Socks5Error as err:
            log.info("SOCKS5 handshake from %s failed: %s", stream.remote_addr, err)
            stream.close()
            return
        dst = (request.host, request.port)
        try:
            source = self._source(stream)
            snap = self.snapshot()
            memo = self._memo_for(snap)
            plan = plan_outbound(dst, source, snap, self.rng, memo=memo)
        except ProxyError as err:
            log.info("SOCKS5 %s -> %s:%s refused: %s", stream.remote_addr, dst[0], dst[1], err)
            self._log_failure(stream, dst, None, err, time.time())
            await self._socks_fail(stream, socks5_reply_for(err))
            return
        await self._run(stream, source, plan, dst, early, stream, memo)

    async def _socks_fail(self, stream: ByteStream, code: int) -> None:
        try:
            await socks5.reply(stream, code)
        except (ConnectionError, OSError):
            pass
        stream.close()

    async def _run(self, client: TcpStream, source: Workload, plan: OutboundPlan, dst: tuple[str, int],
                   early: bytes, socks: TcpStream | None, memo: dict | None = None) -> None:
        """``memo``: the plan's snapshot's memo (``_memo_for``), for the baggage and the labels."""
        start = time.time()
        try:
            # A DNS endpoint resolved here, so that the access log names the address dialled, as ztunnel's does.
            plan = await self.resolve(plan)
            upstream = await self.originate(plan, source, client.remote_addr, memo=memo)
        except (ProxyError, HboneError, OSError, TimeoutError) as err:
            log.info("outbound %s -> %s (%s) failed: %s", client.remote_addr, dst, plan, err)
            self._log_failure(client, dst, plan, err, start)
            if socks is not None:
                await self._socks_fail(socks, socks5_reply_for(err))
            else:
                client.abort()
            return
        if socks is not None:
            try:
                await socks5.reply(socks, socks5.SUCCEEDED, upstream.local_addr if plan.protocol == "tcp" else None)
            except (ConnectionError, OSError):
                upstream.abort()
                client.abort()
                return
        labels = self._labels(source, plan, memo)
        if self.metrics is not None and labels is not None:
            self.metrics.tcp_opened(labels)
        if isinstance(client, TcpConnection):
            client.unread(early)  # stays a TcpConnection: relay() can splice it
            down: ByteStream = client
        else:
            down = PrefixedStream(client, early) if early else client
        live = _OutboundRelay(self, client, upstream, dst, plan, start, labels)
        # An HBONE upstream and the accepted TcpConnection are spliced detached: this connection's
        # task ends here instead of staying suspended for the tunnel's whole life (its frames —
        # serve, _on_socks5, _run, relay — freed; the end is reported by live.done). Plain-TCP
        # upstreams (TCP ↔ TCP) take the pumps, awaited as before. PERF NOTE: Python heap per live
        # SOCKS5 → HBONE tunnel, 300 open (tracemalloc, one process holding the client, this outbound,
        # an InboundProxy and the echo server): 21 779 → 19 880 bytes; CPU per short connection
        # unchanged within noise (node-a 310/310 → 300/320 µs, A/B alternating).
        if relay_detached(down, upstream, live.done):
            self._live.add(live)
            return
        result = None
        try:
            result = await relay(down, upstream)
        finally:
            live.done(result)

    def _relay_done(self, live: "_OutboundRelay", result: RelayResult | None) -> None:
        self._live.discard(live)
        client, upstream = live.client, live.upstream
        client.close()
        upstream.close()
        sent = result.b_to_a if result else 0
        received = result.a_to_b if result else 0
        if self.metrics is not None and live.labels is not None:
            self.metrics.tcp_closed(live.labels, sent, received)
        self._log(client, live.dst, live.plan, live.start, sent, received,
                  "-" if result and not result.reset else "UC", result.reset if result else "cancelled")

    async def originate(self, plan: OutboundPlan, source: Workload, client_addr: tuple[str, int], *,
                        memo: dict | None = None) -> ByteStream:
        """Open the upstream the plan names. HBONE goes through the source identity's pool; the
        connection is made from the source pod's IP (ztunnel spoofs the pod's source address so the
        destination sees and authorizes the real client IP)."""
        local_ip = source.workload_ips[0] if source.workload_ips else None
        plan = await self.resolve(plan)
        if plan.protocol == "tcp":
            try:
                async with asyncio.timeout(self.connect_timeout):
                    return await TcpStream.connect(plan.dst[0], plan.dst[1], local_host=local_ip)
            except OSError as err:
                raise UpstreamConnectFailure(f"{plan.dst[0]}:{plan.dst[1]}: {err.strerror or err}") from err
        pool = self._pool(source)
        # ztunnel create_hbone_request: forwarded (client address, service host) and a fresh traceparent.
        headers = {"forwarded": build_forwarded(client_addr, plan.host),
                   "traceparent": str(new_traceparent(self.rng)),
                   "baggage": self._baggage(source, memo)}
        assert plan.authority is not None
        return await pool.open_tunnel(src_identity=_workload_id(source), dst_identities=plan.identities,
                                      dst=plan.dst, authority=plan.authority, headers=headers,
                                      local_host=local_ip)

    async def resolve(self, plan: OutboundPlan) -> OutboundPlan:
        """The plan itself, or for a DNS ServiceEntry endpoint not resolved yet, the plan to the address its
        hostname resolves to now (``_resolved``); raises ``UpstreamConnectFailure``."""
        wl = plan.workload
        if wl is not None and not wl.workload_ips and wl.hostname and plan.reason == "endpoint" \
                and not is_ip(plan.dst[0]):
            return await self._resolved(plan, wl.hostname)
        return plan

    async def _resolved(self, plan: OutboundPlan, host: str) -> OutboundPlan:
        """The plan with a DNS ServiceEntry endpoint's hostname replaced by the address it resolves to now:
        ztunnel state.rs ``pick_workload_destination_or_resolve`` → ``resolve_on_demand_dns`` ("Randomly pick an
        IP"); a name that does not resolve fails the connection (``Error::NoResolvedAddresses``): 503 ``UF``."""
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    # ztunnel picks one at random whatever the entry's resolution (Envoy's LOGICAL_DNS, the first
                    # address, is the waypoint's: proxy/pipeline/originate.py).
                    ip = await self.resolver.address_for(host, STRICT_DNS)
            except TimeoutError:
                raise DnsFailure(host, f"not resolved within {self.connect_timeout:g}s") from None
        except DnsFailure as err:
            raise UpstreamConnectFailure(str(err)) from err
        authority = plan.authority
        if authority is not None:   # an HBONE endpoint: CONNECT to <resolved ip>:<target port>
            authority = format_authority(ip, int(authority.rpartition(":")[2]))
        return dataclasses.replace(plan, dst=(ip, plan.dst[1]), authority=authority)

    @staticmethod
    def _baggage(source: Workload, memo: dict | None) -> str:
        if memo is None:
            return source_baggage(source)
        key = ("baggage", source.uid)
        value = memo.get(key)
        if value is None:
            value = memo[key] = source_baggage(source)
        return value

    def _pool(self, source: Workload) -> HbonePool:
        ident = _workload_id(source)
        pool = self.pools.get(ident)
        if pool is None:
            cert = self.identities.for_identity(ident)
            pool = HbonePool(cert.client_context, trust_domain=self.trust_domain, settings=self.hbone_settings)
            self.pools[ident] = pool
        return pool

    # ---- telemetry ----
    def _labels(self, source: Workload, plan: OutboundPlan, memo: dict | None = None):
        if self.metrics is None:
            return None
        if memo is None:
            return self._make_labels(source, plan)
        svc, wl = plan.service, plan.workload
        key = ("labels", source.uid, wl.uid if wl is not None else None,
               (svc.namespace, svc.hostname) if svc is not None else None, plan.protocol)
        labels = memo.get(key)
        if labels is None:
            labels = memo[key] = self._make_labels(source, plan)
        return labels

    def _make_labels(self, source: Workload, plan: OutboundPlan):
        from proxy.telemetry.metrics import PeerInfo, ServiceInfo, traffic_labels
        return traffic_labels(
            "source", source=PeerInfo.from_workload(source),
            destination=PeerInfo.from_workload(plan.workload) if plan.workload is not None else None,
            service=ServiceInfo.from_service(plan.service) if plan.service is not None else None,
            request_protocol="tcp", security_policy="mutual_tls" if plan.protocol == "hbone" else "unknown")

    def _log(self, client: ByteStream, dst, plan: OutboundPlan | None, start: float, sent: int, received: int,
             flags: str, error: str | None) -> None:
        if self.access_log is None or not self.access_log.enabled("error" if error else "info"):
            return
        from proxy.telemetry.accesslog import AccessRecord
        src = self.local_workloads().get(client.remote_addr[0])
        self.access_log.emit(AccessRecord(
            start_time=start, kind="tunnel", direction="outbound", reporter="source",
            src_addr=format_authority(*client.remote_addr),
            src_identity=src.identity if src else "", src_workload=src.name if src else "",
            src_namespace=src.namespace if src else "",
            dst_addr=format_authority(*plan.dst) if plan else f"{dst[0]}:{dst[1]}",
            dst_hbone_addr=(plan.authority or "") if plan else "",
            dst_service=plan.service.hostname if plan and plan.service else "",
            dst_workload=plan.workload.name if plan and plan.workload else "",
            route=plan.reason if plan else "",
            bytes_sent=sent, bytes_received=received, duration_ms=(time.time() - start) * 1000,
            response_flags=flags, error=error or ""))

    def _log_failure(self, client: ByteStream, dst, plan: OutboundPlan | None, err: BaseException, start: float) -> None:
        self._log(client, dst, plan, start, 0, 0, _flag_for(err), f"{err.__class__.__name__}: {err}")

    # ---- lifecycle ----
    def stop_accepting(self) -> None:
        self._draining = True
        for s in self.servers:
            s.close()

    @property
    def active(self) -> int:
        """Connections in progress: being set up (a task each) or relayed detached."""
        return len(self._conn_tasks) + len(self._live)

    async def close(self, drain_deadline: float = 0.0) -> None:
        """Stop accepting; in-flight connections get up to ``drain_deadline`` seconds, then are cut."""
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, drain_deadline)
        while (self._conn_tasks or self._live) and loop.time() < end:
            await asyncio.sleep(0.05)
        for t in list(self._conn_tasks):
            t.cancel()
        for live in list(self._live):   # cut: the relay fails, reports (its done runs next turn)
            live.client.abort()
            live.upstream.abort()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        while self._live and loop.time() < end + CUT_REPORT_WAIT_S:
            await asyncio.sleep(0.01)
        for pool in self.pools.values():
            await pool.close()
        for s in self.servers:
            s.close()

    def __repr__(self) -> str:
        return (f"<OutboundProxy listeners={len(self.servers)} conns={len(self._conn_tasks)} "
                f"relayed={len(self._live)} pools={len(self.pools)}>")


class _OutboundRelay:
    """One outbound connection relayed detached (``relay_detached``): what its end needs."""

    __slots__ = ("owner", "client", "upstream", "dst", "plan", "start", "labels")

    def __init__(self, owner: OutboundProxy, client: ByteStream, upstream: ByteStream, dst,
                 plan: OutboundPlan, start: float, labels):
        self.owner, self.client, self.upstream, self.dst = owner, client, upstream, dst
        self.plan, self.start, self.labels = plan, start, labels

    def done(self, result: RelayResult | None) -> None:
        self.owner._relay_done(self, result)


__all__ = ["OutboundPlan", "OutboundProxy", "plan_outbound", "resolve_hostname", "socks5_reply_for",
           "UnknownHost", "UnknownSource", "ILLEGAL_PORTS"]
