"""TCP chains: weighted tcp route → endpoint → connect_originate → byte relay with half-close.

Envoy's TCP proxy decides the upstream once per connection. As ztunnel does, the CONNECT is answered
200 "only after it has connected to the upstream" — so a client whose upstream is down gets a 503
(``UF``) on the CONNECT instead of a tunnel that dies at once. Connect attempts go to different hosts
(previous ones excluded): Envoy's tcp_proxy ``max_connect_attempts`` — flags ``UF,URX`` when all failed.
The relay (hbone.relay) maps EOF ↔ END_STREAM per direction and turns a reset on either side into a
reset of the other: a byte stream is never silently truncated.

DestinationRule ``connectionPool.tcp.maxConnections`` (Envoy's cluster ``max_connections``): Envoy's tcp_proxy
checks ``connections().canCreate()`` before it opens anything ("because the TCP conn pool will queue our request
waiting for a connection that will never be released") and, over the limit, sets ``UO``, counts
``upstream_cx_overflow`` and closes the downstream: here the CONNECT is refused 503 ``UO``. The upstream
connection counts until it is closed (``CountedStream``, proxy/pipeline/circuit.py).
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from typing import Callable

from hbone.stream import ByteStream
from policy.routing.endpoints import Candidate, LoadBalancer, cluster_candidates, detector_for
from policy.routing.hashing import hash_key
from policy.routing.model import CONNECT_FAILURE, ConsistentHash, OutlierDetection
from policy.routing.select import route_tcp
from proxy.errors import NoHealthyUpstream, ProxyError, UpstreamOverflow
from proxy.snapshot import Snapshot

from .answers import DestinationUnavailable, exhausted
from .chains import INBOUND_VIP, Chain
from .circuit import CircuitBreakers, CircuitLimits, CountedStream, circuit_limits, release_connection
from .context import TunnelContext
from .originate import CONNECT_TIMEOUT_S, OriginateFailed, Originator

# Envoy tcp_proxy max_connect_attempts defaults to 1; we allow 1 + Istio's default num_retries (2), the
# same budget an HTTP route gets for connect failures, so one dead pod does not fail a TCP connection
# while its siblings are up.
TCP_MAX_CONNECT_ATTEMPTS = 3


@dataclass(frozen=True)
class TcpPlan:
    cluster: str
    service_hostname: str | None
    candidates: tuple[Candidate, ...]
    connect_timeout_s: float
    subject_alt_names: tuple[str, ...] = ()
    lb: str = "LEAST_REQUEST"
    # DestinationRule consistentHash: for TCP only ``useSourceIp`` gives a key (Istio sets the tcp_proxy
    # hash_policy to source_ip for it; headers, cookies and query parameters do not exist here), any other
    # key leaves a random point of the cluster's ring / Maglev table, as Envoy without a hash.
    consistent: ConsistentHash | None = None
    # DestinationRule connectionPool limits (only maxConnections applies to a TCP chain); None: none set.
    limits: CircuitLimits | None = None
    # DestinationRule outlierDetection: Envoy's tcp_proxy reports each connect attempt to the cluster's outlier
    # detector (LocalOriginConnectFailed / ...Success; with split_external_local_origin_errors off, as Istio
    # leaves it, a failure counts as a 5xx / gateway error and a success as a 200), and ejected hosts are not
    # picked. None: not set (Istio: "only when present").
    outlier: OutlierDetection | None = None


# Plans remembered per snapshot (plan_tcp's ``memo``): one per (route destination) of the config, so the bound only
# protects against a pathological config (the memo then starts afresh).
TCP_PLAN_MEMO_ENTRIES = 4096


def plan_tcp(chain: Chain, snapshot: Snapshot, *, rng: random.Random, memo: dict | None = None) -> TcpPlan:
    """Pure: the cluster and candidate endpoints for one TCP tunnel. Raises a ProxyError.

    ``memo``: a dict the caller keeps per snapshot. The plan of a route destination is the same for every tunnel
    that draws it, so it is made once: ``endpoints_for`` walks the service's endpoints, and the same candidates
    tuple lets a consistentHash cluster find its ring or Maglev view by identity (``LoadBalancer.pick``) instead
    of rebuilding it per tunnel. Keyed by the destination's identity; the memo holds it, so its id is not reused."""
    inv = snapshot.mesh.inventory
    if chain.kind != INBOUND_VIP:
        wl = chain.workload
        assert wl is not None
        return TcpPlan(f"inbound-pod|{chain.port}||{chain.destination[0]}", None,
                       (Candidate(wl, chain.destination[0], chain.port, wl.uid),), CONNECT_TIMEOUT_S)
    assert chain.service is not None and snapshot.routes is not None
    routes = snapshot.routes.tcp_routes_for(chain.service, chain.port)
    dest = route_tcp(routes, rng, destination_ip=chain.destination[0])
    if memo is not None:
        hit = memo.get(id(dest))
        if hit is not None and hit[0] is dest:
            return hit[1]
        plan = _plan_for(inv, dest, snapshot.proxy_workload)
        if len(memo) >= TCP_PLAN_MEMO_ENTRIES:
            memo.clear()
        memo[id(dest)] = (dest, plan)
        return plan
    return _plan_for(inv, dest, snapshot.proxy_workload)


def _plan_for(inv, dest, proxy_workload) -> TcpPlan:
    if dest.fail_status is not None:
        raise DestinationUnavailable(dest.fail_status, dest.fail_flag, dest.problem)
    svc = inv.services.get(dest.service_key) if dest.service_key else None
    if svc is None:
        raise DestinationUnavailable(503, "NC", f"unknown service {dest.host}")
    tp = dest.traffic_policy
    pool = tp.connection_pool
    timeout = pool.connect_timeout_s if pool is not None and pool.connect_timeout_s else CONNECT_TIMEOUT_S
    # Locality (DestinationRule localityLbSetting, the Service's traffic distribution), warmup, the panic
    # threshold: as for an HTTP cluster (cluster_candidates), relative to the waypoint's own pod.
    return TcpPlan(dest.cluster_name, svc.hostname,
                   cluster_candidates(inv, svc, dest.port, dest.subset_labels, tp, proxy_workload),
                   timeout, tuple(svc.subject_alt_names), tp.lb_algorithm, tp.consistent_hash, circuit_limits(pool),
                   tp.outlier_detection)


async def connect_upstream(plan: TcpPlan, ctx: TunnelContext, originator: Originator, lb: LoadBalancer,
                           rng: random.Random, attempts: int = TCP_MAX_CONNECT_ATTEMPTS, *,
                           breakers: CircuitBreakers, outliers: dict | None = None,
                           clock: Callable[[], float] = time.monotonic) -> tuple[ByteStream, Candidate, int]:
    """Open the upstream, trying up to ``attempts`` distinct hosts. Raises ProxyError (UF / UF,URX / UH; UO over
    the cluster's maxConnections). ``breakers``: the proxy's circuit breakers (the waypoint's HTTP pipeline's,
    shared); with limits, the stream returned is counted until it is closed. ``outliers``: the proxy's outlier
    detectors by (cluster, config) (the HTTP pipeline's, shared: clusters differ by name), for a plan with
    ``outlier``."""
    limits = plan.limits
    tried: set[str] = set()
    last: ProxyError | None = None
    ch = plan.consistent
    key = hash_key(ch, headers=(), query=b"", source_ip=ctx.client_addr[0]) if ch is not None else None
    detector = detector_for(outliers, plan.cluster, plan.outlier) \
        if plan.outlier is not None and outliers is not None else None
    for attempt in range(1, attempts + 1):
        now = clock()
        cand = lb.pick(plan.candidates, rng=rng, exclude=frozenset(tried), lb=plan.lb, cluster=plan.cluster,
                       consistent=ch, hash_key=key, ejected=detector.ejected(now) if detector else frozenset(),
                       now=now)
        if cand is None:
            raise NoHealthyUpstream(f"cluster {plan.cluster} has no healthy endpoint")
        if cand.key in tried:
            break   # every host was tried: no point dialing a dead one again
        tried.add(cand.key)
        release = None
        if limits is not None:
            if not breakers.begin_tcp_connection(plan.cluster, limits, cand.key):
                raise UpstreamOverflow(f"cluster {plan.cluster}: {limits.max_connections} connections open "
                                       f"(maxConnections)")
            release = functools.partial(release_connection, breakers, plan.cluster, cand.key, limits)
        try:
            stream = await originator.open(cand, source=ctx.client_addr, service_hostname=plan.service_hostname,
                                           timeout=plan.connect_timeout_s, subject_alt_names=plan.subject_alt_names)
        except OriginateFailed as err:
            last = err
            if release is not None:
                release()
            if detector is not None:
                detector.record(cand.key, CONNECT_FAILURE, clock(), total_hosts=len(plan.candidates))
            continue
        except BaseException:
            if release is not None:
                release()
            raise
        if detector is not None:
            detector.record(cand.key, 200, clock(), total_hosts=len(plan.candidates))
        return (stream if release is None else CountedStream(stream, release)), cand, attempt
    assert last is not None
    raise exhausted(last, len(tried))


__all__ = ["TcpPlan", "plan_tcp", "connect_upstream", "TCP_MAX_CONNECT_ATTEMPTS", "TCP_PLAN_MEMO_ENTRIES"]
