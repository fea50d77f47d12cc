"""DestinationRule ``connectionPool`` as Envoy's cluster circuit breakers: the pure core.

istiod (networking/core/cluster_traffic_policy.go ``applyConnectionPool``) turns a DestinationRule's
``connectionPool`` into the cluster's ``circuit_breakers.thresholds`` and HTTP protocol options:

    http.http2MaxRequests        → max_requests           (concurrent requests, every protocol)
    http.http1MaxPendingRequests → max_pending_requests   (requests queued for a connection)
    http.maxRetries              → max_retries            (concurrent retries)
    tcp.maxConnections           → max_connections        (connections to all hosts of the cluster)
    http.maxRequestsPerConnection → common_http_protocol_options.max_requests_per_connection
    http.idleTimeout (else tcp.idleTimeout) → common_http_protocol_options.idle_timeout

Each only "if > 0" ("FIXME: zero is a valid value if explicitly set, otherwise we want to use the
default"), and every threshold not set is ``math.MaxUint32`` (``getDefaultCircuitBreakerThresholds``):
unset means effectively unlimited — so ``maxRetries: 0`` and ``maxRequestsPerConnection: 0`` are unlimited too.

What Envoy does with them (conn_pool_base.cc, router.cc, tcp_proxy.cc; the circuit-breaking overview):
- a request that finds no ready connection is queued as pending if ``max_pending_requests`` allows, else it is
  answered at once (pool failure ``Overflow``, counter ``upstream_rq_pending_overflow``);
- a stream is attached to a connection only if ``max_requests`` allows ("max streams overflow": the same
  failure and, as Envoy does, the same ``upstream_rq_pending_overflow`` counter);
- a connection is created only if ``max_connections`` allows (else ``upstream_cx_overflow``), except that "Envoy
  will ensure that a host selected by cluster load balancing has at least one connection allocated";
- the router turns the pool's ``Overflow`` into 503, flag ``UO``, details
  ``upstream_reset_before_response_started{overflow}``, and never retries it (retry_state_impl.cc: "we never
  retry if the reset reason is overflow");
- a retry is scheduled only if ``max_retries`` allows; otherwise it is not made (``RetryStatus::NoOverflow``:
  counter ``upstream_rq_retry_overflow``, flag ``UO``) and the attempt's own answer or error stands. The retry
  is held from that decision until the retried attempt's outcome is known (``resetRetry``);
- an HTTP connection that has served ``max_requests_per_connection`` requests takes no more (HTTP/1.1: closed
  after its response; HTTP/2: DRAINING, closed after its last stream) — counter ``upstream_cx_max_requests``;
- the TCP proxy checks ``max_connections`` before it opens anything: over it, flag ``UO``, counter
  ``upstream_cx_overflow``, and the downstream is closed (for us: the CONNECT is refused 503).

This module is decisions on plain counters (``ClusterCircuit``) per cluster, kept per proxy by
``CircuitBreakers``; the waits and the connections themselves are the asyncio glue's (proxy/pipeline/http.py,
tcp.py). Waiters in the pending queue are opaque tokens the glue supplies (its futures).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable

from hbone.stream import DEFAULT_READ_BYTES
from policy.routing.model import UNLIMITED, ConnectionPool

# A request's way to a connection when none is idle in the pool (``CircuitBreakers.acquire_connection``): a new
# one (its slot reserved), a place in the pending queue, or the overflow answer.
DIAL = "dial"
WAIT = "wait"
OVERFLOW = "overflow"

# Bound on the pending queue of one cluster whatever http1MaxPendingRequests says (its default is 2^32-1):
# the queue is entered only once maxConnections is reached, and each waiter holds a downstream request in
# memory; 65 536 waiting requests is far past any real use of a limited cluster (Envoy's own default
# max_pending_requests was 1 024), so past it the request gets the overflow answer rather than more memory.
PENDING_HARD_LIMIT = 65536
# Clusters whose state a proxy keeps. A cluster's state is dropped again once idle (no request, connection,
# retry or waiter: nothing to remember but its counters) when this many are held; live states are bounded by
# the live requests and connections themselves.
CLUSTERS_MAX = 4096


@dataclass(frozen=True)
class CircuitLimits:
    """A cluster's thresholds (Envoy ``CircuitBreakers.Thresholds`` as istiod builds them),
    ``max_requests_per_connection`` (0: unlimited) and the upstream connections' ``idle_timeout_s`` (None:
    the pool's own, Http1Pool.IDLE_TIMEOUT_S) — the last two are HTTP protocol options, not circuit breakers,
    enforced on the same per-cluster connections."""

    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED
    max_requests_per_connection: int = 0
    idle_timeout_s: float | None = None


def circuit_limits(pool: ConnectionPool | None) -> CircuitLimits | None:
    """The limits a ``connectionPool`` sets, or None when it sets none (the cluster then pays nothing: see
    ``Upstream.plain``). istiod applies each field only when > 0; unset ones stay 2^32-1."""
    if pool is None:
        return None

    def lim(v: int | None) -> int:
        return v if v is not None and v > 0 else UNLIMITED

    # istiod: "idleTimeout = settings.Http.IdleTimeout", then "if idleTimeout == nil { idleTimeout =
    # settings.Tcp.IdleTimeout }".
    idle = pool.http_idle_timeout_s if pool.http_idle_timeout_s is not None else pool.idle_timeout_s
    limits = CircuitLimits(lim(pool.max_connections), lim(pool.http1_max_pending_requests),
                           lim(pool.http2_max_requests), lim(pool.max_retries),
                           pool.max_requests_per_connection or 0, idle or None)
    return None if limits == NO_LIMITS else limits


NO_LIMITS = CircuitLimits()


@dataclass(slots=True)
class ClusterCircuit:
    """One cluster's live counts and Envoy's overflow counters."""

    requests: int = 0                                   # requests in flight (rq_active)
    connections: int = 0                                # open connections, idle ones included (cx_active)
    host_connections: dict[str, int] = field(default_factory=dict)
    pending: deque = field(default_factory=deque)       # (host, token), oldest first (rq_pending_active)
    retries: int = 0                                    # retries scheduled or in flight (rq_retry active)
    # Envoy's cluster stats of the same names.
    upstream_rq_pending_overflow: int = 0
    upstream_cx_overflow: int = 0
    upstream_rq_retry_overflow: int = 0
    upstream_cx_max_requests: int = 0

    @property
    def idle(self) -> bool:
        return not (self.requests or self.connections or self.pending or self.retries)

    def stats(self) -> dict[str, int]:
        return {"rq_active": self.requests, "cx_active": self.connections, "rq_pending_active": len(self.pending),
                "rq_retry_active": self.retries,
                "upstream_rq_pending_overflow": self.upstream_rq_pending_overflow,
                "upstream_cx_overflow": self.upstream_cx_overflow,
                "upstream_rq_retry_overflow": self.upstream_rq_retry_overflow,
                "upstream_cx_max_requests": self.upstream_cx_max_requests}


# ClusterCircuit.stats() keys → Envoy's cluster stat names (gauges *_active, counters *_overflow, *_max_requests).
# Active retries have no Envoy stat of their own (only the circuit_breakers.*.rq_retry_open flag): not listed.
_ENVOY_STAT_NAMES = (("rq_active", "upstream_rq_active"), ("cx_active", "upstream_cx_active"),
                     ("rq_pending_active", "upstream_rq_pending_active"),
                     ("upstream_rq_pending_overflow", "upstream_rq_pending_overflow"),
                     ("upstream_cx_overflow", "upstream_cx_overflow"),
                     ("upstream_rq_retry_overflow", "upstream_rq_retry_overflow"),
                     ("upstream_cx_max_requests", "upstream_cx_max_requests"))


class CircuitBreakers:
    """Every cluster's ``ClusterCircuit`` of one proxy, by cluster name. Decisions only: the caller acts on
    them (dials, waits, answers) and reports back what happened (``connection_closed``, ``end_request`` ...).
    Every acquire has exactly one matching release."""

    def __init__(self, *, clusters_max: int = CLUSTERS_MAX, pending_hard_limit: int = PENDING_HARD_LIMIT):
        self.clusters: dict[str, ClusterCircuit] = {}
        self.clusters_max = clusters_max
        self.pending_hard_limit = pending_hard_limit

    def _state(self, cluster: str) -> ClusterCircuit:
        st = self.clusters.get(cluster)
        if st is None:
            if len(self.clusters) >= self.clusters_max:
                for name in [n for n, s in self.clusters.items() if s.idle]:
                    del self.clusters[name]
            st = self.clusters[cluster] = ClusterCircuit()
        return st

    def stats(self, cluster: str) -> dict[str, int]:
        st = self.clusters.get(cluster)
        return (st or ClusterCircuit()).stats()

    def envoy_stats(self) -> list[tuple[str, int]]:
        """Every kept cluster's numbers under Envoy's admin ``/stats`` names (``cluster.<name>.<stat>``), what
        Istio's circuit-breaking task reads (``pilot-agent request GET stats | grep pending_overflow``)."""
        out = []
        for cluster, st in sorted(self.clusters.items()):
            s = st.stats()
            for ours, envoy in _ENVOY_STAT_NAMES:
                out.append((f"cluster.{cluster}.{envoy}", s[ours]))
        return out

    # -- max_requests --
    def begin_request(self, cluster: str, limits: CircuitLimits) -> bool:
        """A request to the cluster starts: False (counted) when ``max_requests`` are in flight already."""
        st = self._state(cluster)
        if st.requests >= limits.max_requests:
            st.upstream_rq_pending_overflow += 1
            return False
        st.requests += 1
        return True

    def end_request(self, cluster: str) -> None:
        st = self.clusters[cluster]
        st.requests -= 1

    # -- max_connections / max_pending_requests (HTTP/1.1) --
    def acquire_connection(self, cluster: str, limits: CircuitLimits, host: str) -> str:
        """How a request to ``host`` that found no idle connection in the pool gets one: DIAL (the slot is now
        reserved: ``connection_closed`` releases it, also when the dial fails), WAIT (the caller then
        ``enqueue``s its token) or OVERFLOW (counted). (An idle one is always taken: no limit applies.)"""
        st = self._state(cluster)
        if st.connections < limits.max_connections:
            self._opened(st, host)
            return DIAL
        st.upstream_cx_overflow += 1
        if not st.host_connections.get(host):
            # "Even if this circuit breaker has overflowed, Envoy will ensure that a host selected by cluster
            # load balancing has at least one connection allocated."
            self._opened(st, host)
            return DIAL
        if len(st.pending) >= min(limits.max_pending_requests, self.pending_hard_limit):
            st.upstream_rq_pending_overflow += 1
            return OVERFLOW
        return WAIT

    def enqueue(self, cluster: str, host: str, token: Hashable) -> None:
        """After WAIT: ``token`` waits (FIFO) for a connection to ``host``."""
        self._state(cluster).pending.append((host, token))

    def cancel_wait(self, cluster: str, token: Hashable) -> bool:
        """The waiter left the queue (its request was cancelled or timed out). False: it was not queued."""
        st = self.clusters.get(cluster)
        if st is None:
            return False
        for i, (_, t) in enumerate(st.pending):
            if t is token:
                del st.pending[i]
                return True
        return False

    def opened(self, cluster: str, host: str) -> None:
        """A connection opened outside ``acquire_connection`` (HTTP/2: one per host, see http.py): counted."""
        self._opened(self._state(cluster), host)

    @staticmethod
    def _opened(st: ClusterCircuit, host: str) -> None:
        st.connections += 1
        st.host_connections[host] = st.host_connections.get(host, 0) + 1

    def connection_idle(self, cluster: str, host: str) -> Hashable | None:
        """A connection to ``host`` finished its request and could be pooled: the oldest waiter for that host
        takes it instead (returned; it is off the queue), or None — pool it."""
        st = self.clusters.get(cluster)
        if st is None or not st.pending:
            return None
        for i, (h, token) in enumerate(st.pending):
            if h == host:
                del st.pending[i]
                return token
        return None

    def connection_closed(self, cluster: str, host: str, limits: CircuitLimits | None = None
                          ) -> tuple[str, Hashable] | None:
        """A connection to ``host`` closed (or a reserved dial was not made). If a waiter can now dial — there is
        room under ``max_connections``, or its host has no connection left — the oldest such waiter is taken
        off the queue with a dial slot reserved for it: (its host, its token). Else None."""
        st = self.clusters.get(cluster)
        if st is None:
            return None
        st.connections -= 1
        n = st.host_connections.get(host, 0) - 1
        if n > 0:
            st.host_connections[host] = n
        else:
            st.host_connections.pop(host, None)
        if not st.pending:
            if st.idle and len(self.clusters) > self.clusters_max:
                del self.clusters[cluster]
            return None
        room = st.connections < (limits.max_connections if limits is not None else UNLIMITED)
        for i, (h, token) in enumerate(st.pending):
            if room or not st.host_connections.get(h):
                del st.pending[i]
                self._opened(st, h)
                return h, token
        return None

    # -- max_retries --
    def begin_retry(self, cluster: str, limits: CircuitLimits) -> bool:
        """A retry is about to be scheduled: False (counted ``upstream_rq_retry_overflow``) when ``max_retries``
        are scheduled or in flight already — the retry is then not made."""
        st = self._state(cluster)
        if st.retries >= limits.max_retries:
            st.upstream_rq_retry_overflow += 1
            return False
        st.retries += 1
        return True

    def end_retry(self, cluster: str) -> None:
        self.clusters[cluster].retries -= 1

    # -- max_requests_per_connection --
    def spent(self, cluster: str, limits: CircuitLimits, served: int) -> bool:
        """Whether a connection that has served ``served`` requests takes no more (counted when so)."""
        n = limits.max_requests_per_connection
        if n and served >= n:
            self._state(cluster).upstream_cx_max_requests += 1
            return True
        return False

    # -- TCP proxy --
    def begin_tcp_connection(self, cluster: str, limits: CircuitLimits, host: str) -> bool:
        """Envoy tcp_proxy: "if (!cluster->resourceManager(...).connections().canCreate())" → UO, counted
        ``upstream_cx_overflow`` (no host exemption there). True: the connection is counted until
        ``connection_closed``."""
        st = self._state(cluster)
        if st.connections >= limits.max_connections:
            st.upstream_cx_overflow += 1
            return False
        self._opened(st, host)
        return True

    def __repr__(self) -> str:
        busy = sum(1 for s in self.clusters.values() if not s.idle)
        return f"<CircuitBreakers clusters={len(self.clusters)} busy={busy}>"


# -- glue: waiters are asyncio futures. A future resolved with None may dial (its slot is reserved); resolved with
# a value, it was handed that idle connection. A waiter cancelled meanwhile is skipped and what it would have
# got goes to the next one.


def release_connection(breakers: CircuitBreakers, cluster: str, host: str, limits: CircuitLimits | None) -> None:
    """A counted connection closed (or a reserved dial was not made): the oldest waiter that may dial now is
    woken to dial."""
    while True:
        grant = breakers.connection_closed(cluster, host, limits)
        if grant is None:
            return
        host, token = grant
        if not token.done():
            token.set_result(None)
            return
        # That waiter is gone: the slot just reserved for it is released in turn.


def hand_over(breakers: CircuitBreakers, cluster: str, host: str, conn: object) -> bool:
    """An idle connection to ``host``: given to the oldest live waiter for that host (True), else False (the
    caller pools it)."""
    while True:
        token = breakers.connection_idle(cluster, host)
        if token is None:
            return False
        if not token.done():
            token.set_result(conn)
            return True


class CountedStream:
    """A ``ByteStream`` counted against its cluster's connections until it is closed or aborted (the release
    runs once, on the first of them: ``on_close``). ``served``: requests sent on it (max_requests_per_connection).
    Wraps only connections of clusters with limits; others are never wrapped."""

    __slots__ = ("inner", "_on_close", "served", "__weakref__")

    def __init__(self, inner, on_close: Callable[[], None]):
        self.inner = inner
        self._on_close: Callable[[], None] | None = on_close
        self.served = 0

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        return await self.inner.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.inner.write(data)

    async def drain(self) -> None:
        await self.inner.drain()

    def write_eof(self) -> None:
        self.inner.write_eof()

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self._released()

    def abort(self) -> None:
        try:
            self.inner.abort()
        finally:
            self._released()

    async def wait_closed(self) -> None:
        await self.inner.wait_closed()

    def _released(self) -> None:
        cb, self._on_close = self._on_close, None
        if cb is not None:
            cb()

    @property
    def counted(self) -> bool:
        return self._on_close is not None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)   # bytes_sent / bytes_received and the like

    def __repr__(self) -> str:
        return f"<CountedStream served={self.served} {'open' if self.counted else 'released'} {self.inner!r}>"


__all__ = ["CircuitLimits", "NO_LIMITS", "circuit_limits", "ClusterCircuit", "CircuitBreakers", "CountedStream",
           "release_connection", "hand_over", "DIAL", "WAIT", "OVERFLOW",
           "PENDING_HARD_LIMIT", "CLUSTERS_MAX"]
