"""DestinationRule ``connectionPool`` enforced as Envoy's cluster circuit breakers.

The pure core (proxy/pipeline/circuit.py) limit by limit — at the limit, and one over — then the waypoint
end to end (tests/waypoint_harness.py: real TLS from our CA, the waypoint's HBONE server, reviews pods
whose ``/slow?s=`` answers late, each request on its own tunnel): Istio's "Circuit Breaking" task in small.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbone.errors import TunnelRefused
from policy.routing.model import UNLIMITED, ConnectionPool
from proxy.pipeline.circuit import (DIAL, OVERFLOW, WAIT, CircuitBreakers, CircuitLimits, CountedStream,
                                    circuit_limits)
from hbone.stream import TcpStream
from proxy.http1.client import Http1Pool
from proxy.pipeline.h2c import H2UpstreamPool
from proxy.pipeline.http import Upstream
from policy.routing.model import DEFAULT_RETRY_POLICY
from tests.h2c_peers import H2cServer
from tests.waypoint_harness import (REVIEWS_VIP, TCP_VIP, config_docs, destination_rule, start_harness, until,
                                   virtual_service)

C = "inbound-vip|9080|http/v1|reviews.default.svc.cluster.local"   # the waypoint's cluster for subset v1
OVERFLOW_BODY = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
OVERFLOW_DETAIL = "upstream_reset_before_response_started{overflow}"


# ---------------------------------------------------------------------------------------------
# The limits istiod derives (applyConnectionPool)


def test_limits_from_connection_pool_as_istiod_builds_them():
    assert circuit_limits(None) is None
    assert circuit_limits(ConnectionPool()) is None
    # connectTimeout is applied where the upstream is dialed: still "no limits", the cluster stays plain.
    assert circuit_limits(ConnectionPool(connect_timeout_s=1.0)) is None
    # idleTimeout: http's, else tcp's (istiod), kept on the cluster's own connections.
    both = ConnectionPool(http_idle_timeout_s=5.0, idle_timeout_s=9.0)
    assert circuit_limits(both) == CircuitLimits(idle_timeout_s=5.0)
    assert circuit_limits(ConnectionPool(idle_timeout_s=9.0)) == CircuitLimits(idle_timeout_s=9.0)
    # istiod: each threshold only "if > 0" (the FIXME about zero): 0 retries / 0 per connection = unset.
    assert circuit_limits(ConnectionPool(max_retries=0, max_requests_per_connection=0)) is None
    lim = circuit_limits(ConnectionPool(max_connections=1, http1_max_pending_requests=2, http2_max_requests=3,
                                        max_retries=4, max_requests_per_connection=5))
    assert lim == CircuitLimits(1, 2, 3, 4, 5)
    only = circuit_limits(ConnectionPool(http2_max_requests=7))
    assert only == CircuitLimits(max_requests=7)
    assert only.max_connections == only.max_pending_requests == only.max_retries == UNLIMITED == 2**32 - 1


def test_an_upstream_with_limits_is_not_plain_one_without_is():
    base = dict(cluster=C, service=None, candidates=(), retry=DEFAULT_RETRY_POLICY, timeout_s=None,
                connect_timeout_s=1.0, lb="LEAST_REQUEST")
    assert Upstream(**base).plain
    assert not Upstream(**base, limits=CircuitLimits(max_requests=1)).plain


# ---------------------------------------------------------------------------------------------
# The core, limit by limit


def test_max_requests_at_the_limit_then_one_over():
    cb = CircuitBreakers()
    lim = CircuitLimits(max_requests=2)
    assert cb.begin_request(C, lim) and cb.begin_request(C, lim)
    assert not cb.begin_request(C, lim)   # the third: overflow (Envoy counts it as a pending overflow)
    assert cb.stats(C)["upstream_rq_pending_overflow"] == 1 and cb.stats(C)["rq_active"] == 2
    cb.end_request(C)
    assert cb.begin_request(C, lim)
    assert cb.stats(C)["rq_active"] == 2


def test_connections_dial_until_max_then_wait_until_max_pending_then_overflow():
    cb = CircuitBreakers()
    lim = CircuitLimits(max_connections=2, max_pending_requests=2)
    assert cb.acquire_connection(C, lim, "a") == DIAL
    assert cb.acquire_connection(C, lim, "a") == DIAL
    assert cb.stats(C)["cx_active"] == 2
    assert cb.acquire_connection(C, lim, "a") == WAIT
    cb.enqueue(C, "a", "w1")
    assert cb.acquire_connection(C, lim, "a") == WAIT
    cb.enqueue(C, "a", "w2")
    assert cb.acquire_connection(C, lim, "a") == OVERFLOW
    s = cb.stats(C)
    assert s["rq_pending_active"] == 2 and s["upstream_rq_pending_overflow"] == 1
    assert s["upstream_cx_overflow"] == 3   # every request that found no room for a connection


def test_a_host_without_any_connection_may_always_open_one():
    """Envoy: "Even if this circuit breaker has overflowed, Envoy will ensure that a host selected by cluster
    load balancing has at least one connection allocated"."""
    cb = CircuitBreakers()
    lim = CircuitLimits(max_connections=1, max_pending_requests=1)
    assert cb.acquire_connection(C, lim, "a") == DIAL
    assert cb.acquire_connection(C, lim, "b") == DIAL   # over the limit, but b had none
    assert cb.stats(C)["cx_active"] == 2 and cb.stats(C)["upstream_cx_overflow"] == 1
    assert cb.acquire_connection(C, lim, "b") == WAIT


def test_an_idle_connection_goes_to_the_oldest_waiter_for_its_host_fifo():
    cb = CircuitBreakers()
    lim = CircuitLimits(max_connections=2, max_pending_requests=10)
    assert cb.acquire_connection(C, lim, "a") == DIAL
    assert cb.acquire_connection(C, lim, "b") == DIAL
    for host, token in (("a", "a1"), ("b", "b1"), ("a", "a2"), ("a", "a3")):
        assert cb.acquire_connection(C, lim, host) == WAIT
        cb.enqueue(C, host, token)
    assert cb.connection_idle(C, "a") == "a1"
    assert cb.connection_idle(C, "a") == "a2"
    assert cb.connection_idle(C, "b") == "b1"
    assert cb.connection_idle(C, "b") is None   # nobody waits for b: pool it
    assert cb.stats(C)["rq_pending_active"] == 1


def test_a_closed_connection_lets_the_oldest_waiter_dial():
    cb = CircuitBreakers()
    lim = CircuitLimits(max_connections=1, max_pending_requests=10)
    assert cb.acquire_connection(C, lim, "a") == DIAL
    for token in ("w1", "w2"):
        assert cb.acquire_connection(C, lim, "a") == WAIT
        cb.enqueue(C, "a", token)
    assert cb.connection_closed(C, "a", lim) == ("a", "w1")   # its slot is reserved for it
    assert cb.stats(C)["cx_active"] == 1
    assert cb.connection_closed(C, "a", lim) == ("a", "w2")
    assert cb.connection_closed(C, "a", lim) is None
    assert cb.stats(C)["cx_active"] == 0


def test_a_cancelled_waiter_leaves_the_queue():
    cb = CircuitBreakers()
    lim = CircuitLimits(max_connections=1, max_pending_requests=1)
    cb.acquire_connection(C, lim, "a")
    assert cb.acquire_connection(C, lim, "a") == WAIT
    cb.enqueue(C, "a", "w1")
    assert cb.cancel_wait(C, "w1") and not cb.cancel_wait(C, "w1")
    assert cb.acquire_connection(C, lim, "a") == WAIT   # its place is free again
    cb.enqueue(C, "a", "w2")
    assert cb.connection_idle(C, "a") == "w2"   # the cancelled one is never handed anything


def test_the_pending_queue_is_bounded_even_when_unlimited():
    cb = CircuitBreakers(pending_hard_limit=3)
    lim = CircuitLimits(max_connections=1)   # max_pending_requests: 2^32-1
    cb.acquire_connection(C, lim, "a")
    for i in range(3):
        assert cb.acquire_connection(C, lim, "a") == WAIT
        cb.enqueue(C, "a", i)
    assert cb.acquire_connection(C, lim, "a") == OVERFLOW


@settings(max_examples=150, deadline=None)
@given(max_connections=st.integers(1, 3), max_pending=st.integers(1, 3),
       ops=st.lists(st.tuples(st.sampled_from(["request", "idle", "close", "cancel"]), st.sampled_from("abc"),
                              st.integers(0, 10)), max_size=60))
def test_connections_and_pending_stay_bounded_and_fifo(max_connections, max_pending, ops):
    """Any sequence of requests, releases, closes and cancellations: the counts match the connections that
    exist, stay within Envoy's bound (max_connections + one per host), the queue within max_pending, and each
    host's waiters are served in arrival order."""
    cb = CircuitBreakers()
    lim = CircuitLimits(max_connections=max_connections, max_pending_requests=max_pending)
    open_conns: list[str] = []          # one entry per open connection (its host)
    queued: dict[str, list] = {}        # host -> tokens in arrival order
    served: list = []
    n = 0
    for op, host, pick in ops:
        if op == "request":
            d = cb.acquire_connection(C, lim, host)
            if d == DIAL:
                open_conns.append(host)
            elif d == WAIT:
                n += 1
                cb.enqueue(C, host, n)
                queued.setdefault(host, []).append(n)
            else:
                assert d == OVERFLOW and sum(map(len, queued.values())) == max_pending
        elif op == "idle" and open_conns:
            h = open_conns[pick % len(open_conns)]
            token = cb.connection_idle(C, h)
            if queued.get(h):
                assert token == queued[h].pop(0)   # the oldest waiter for that host
                served.append(token)
            else:
                assert token is None
        elif op == "close" and open_conns:
            h = open_conns.pop(pick % len(open_conns))
            grant = cb.connection_closed(C, h, lim)
            if grant is not None:
                gh, token = grant
                assert token == queued[gh].pop(0)
                open_conns.append(gh)   # the woken waiter dials
        elif op == "cancel":
            waiting = [t for ts in queued.values() for t in ts]
            if waiting:
                token = waiting[pick % len(waiting)]
                assert cb.cancel_wait(C, token)
                for ts in queued.values():
                    if token in ts:
                        ts.remove(token)
        s = cb.stats(C)
        assert s["cx_active"] == len(open_conns)
        assert s["cx_active"] <= max_connections + len(set(open_conns))
        assert s["rq_pending_active"] == sum(map(len, queued.values())) <= max_pending
        state = cb.clusters.get(C)
        assert (state.host_connections if state else {}) == {h: open_conns.count(h) for h in set(open_conns)}


def test_max_retries_at_the_limit_then_one_over():
    cb = CircuitBreakers()
    lim = CircuitLimits(max_retries=1)
    assert cb.begin_retry(C, lim)
    assert not cb.begin_retry(C, lim)
    assert cb.stats(C)["upstream_rq_retry_overflow"] == 1
    cb.end_retry(C)
    assert cb.begin_retry(C, lim)


def test_max_requests_per_connection():
    cb = CircuitBreakers()
    assert not cb.spent(C, CircuitLimits(max_requests_per_connection=0), 10**6)   # 0: unlimited
    lim = CircuitLimits(max_requests_per_connection=2)
    assert not cb.spent(C, lim, 1)
    assert cb.spent(C, lim, 2)
    assert cb.stats(C)["upstream_cx_max_requests"] == 1


def test_tcp_connections_have_no_host_exemption():
    cb = CircuitBreakers()
    lim = CircuitLimits(max_connections=1)
    assert cb.begin_tcp_connection(C, lim, "a")
    assert not cb.begin_tcp_connection(C, lim, "b")   # tcp_proxy checks canCreate() only
    assert cb.stats(C)["upstream_cx_overflow"] == 1
    cb.connection_closed(C, "a", lim)
    assert cb.begin_tcp_connection(C, lim, "b")


def test_cluster_states_are_bounded_idle_ones_dropped():
    cb = CircuitBreakers(clusters_max=4)
    lim = CircuitLimits(max_requests=1)
    busy = [f"busy-{i}" for i in range(2)]
    for name in busy:
        assert cb.begin_request(name, lim)
    for i in range(50):
        cb.begin_request(f"c{i}", lim)
        cb.end_request(f"c{i}")
    assert len(cb.clusters) <= 4
    assert all(name in cb.clusters for name in busy)   # live state is never dropped


def test_http1_pool_take_with_an_idle_timeout_closes_connections_idle_longer():
    now = [100.0]
    pool = Http1Pool(now=lambda: now[0])

    class S:
        closed = False

        def close(self):
            self.closed = True

    old, new = S(), S()
    pool.put("k", old, "r-old")
    now[0] += 5.0
    pool.put("k", new, "r-new")
    now[0] += 1.0
    assert pool.take("k", 2.0) == (new, "r-new")   # idle 1 s: reused
    assert pool.take("k", 2.0) is None and old.closed   # idle 6 s: closed, never reused
    pool.put("k", new, "r-new")
    now[0] += 1.5
    assert pool.take("k", 1.0) is None and new.closed


async def test_h2_connection_takes_no_new_stream_after_max_requests_then_closes(loopback_ip):
    """HTTP/2 upstream, maxRequestsPerConnection 2: the stream reaching the limit turns the connection DRAINING
    (out of the pool, its streams still finishing); the next request gets a new connection; the drained one
    closes after its last stream."""
    srv = await H2cServer().start(loopback_ip())
    pool = H2UpstreamPool()

    async def dial():
        return await TcpStream.connect(*srv.addr)

    async def body(resp) -> bytes:
        return b"".join([c async for c in resp.body_chunks()])

    try:
        a = await pool.connect("ep", dial, max_requests=2)
        hang = asyncio.ensure_future(a.request(b"GET", b"/hang", b"svc", [], None))
        assert (await pool.connect("ep", dial, max_requests=2)) is a and a.draining
        assert await body(await a.request(b"GET", b"/2", b"svc", [], None)) == b"ok /2"
        assert a.alive   # /hang still runs on it
        b = await pool.connect("ep", dial, max_requests=2)
        assert b is not a and not b.draining and srv.accepted == 2
        assert await body(await b.request(b"GET", b"/3", b"svc", [], None)) == b"ok /3"
        srv.release.set()
        assert await body(await hang) == b"ok /hang"
        await until(lambda: not a.alive, "the drained connection closed after its last stream")
        assert b.alive and pool.get("ep") is b
        # Without a limit the pool is as before: one connection for everything.
        assert (await pool.connect("other", dial)) is (await pool.connect("other", dial))
    finally:
        await pool.close()
        await srv.close()


def test_counted_stream_releases_once():
    released = []

    class Inner:
        closed = aborted = 0
        bytes_sent = 7

        def close(self):
            self.closed += 1

        def abort(self):
            self.aborted += 1

    inner = Inner()
    s = CountedStream(inner, lambda: released.append(1))
    assert s.counted and s.bytes_sent == 7
    s.abort()
    s.close()
    assert released == [1] and inner.aborted == 1 and inner.closed == 1 and not s.counted


# ---------------------------------------------------------------------------------------------
# Through a real waypoint


def _routing(pool: str, *, retries: str = "", timeout: str = "", slow_apart: bool = False) -> str:
    """All of reviews to subset v1 (one pod: the limits are per cluster, the pick does not matter) with this
    ``connectionPool`` (YAML flow mapping) on the DestinationRule, and the route's ``retries`` / ``timeout``
    if given. ``slow_apart``: ``/slow`` has a route of its own first, without them."""
    rule = "- route: [{destination: {host: reviews, subset: v1}}]"
    if retries:
        rule += f"\n  retries: {retries}"
    if timeout:
        rule += f"\n  timeout: {timeout}"
    if slow_apart:
        rule = "- match: [{uri: {prefix: /slow}}]\n  route: [{destination: {host: reviews, subset: v1}}]\n" + rule
    return config_docs(virtual_service("reviews", rule),
                       destination_rule("reviews", traffic_policy=f"{{connectionPool: {pool}}}", subsets=("v1",)))


async def _tunnel(h):
    """A tunnel of its own (a new client: its own HBONE connection) to reviews: (client, stream)."""
    client = h.client()
    return client, await client.tunnel(f"{REVIEWS_VIP}:9080")


async def _get(h, path: str, tunnel=None):
    """One GET on its own tunnel (``tunnel``: opened beforehand, so that what the test times is the request
    alone, not a TLS handshake on a loaded box): (status, headers, body)."""
    if tunnel is None:
        return await h.client().fetch(path)
    client, stream = tunnel
    try:
        return await client.request(stream, path)
    finally:
        stream.close()


async def _upstream_connections_for(h, n: int, pause_s: float = 0.0) -> int:
    """``n`` GETs one after the other on one kept-alive downstream tunnel, each answered by v1 and followed
    by a pause of ``pause_s``: how many upstream connections the waypoint opened for them."""
    client = h.client()
    stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
    before = h.waypoint.originator.opened_hbone
    try:
        for _ in range(n):
            status, _, body = await client.request(stream, "/")
            assert (status, body) == (200, b"v1")
            if pause_s:
                await asyncio.sleep(pause_s)
    finally:
        stream.close()
    return h.waypoint.originator.opened_hbone - before


def _stats(h) -> dict:
    return h.waypoint.http.breakers.stats(C)


async def _http_lines(h, n: int) -> list[dict]:
    """The access log's request lines, once there are at least ``n``."""
    lines = await h.http_lines(n)
    assert len(lines) >= n, f"{n} request lines in the access log: {lines}"
    return lines


async def test_max_connections_1_pending_1_three_slow_requests(tmp_path, loopback_ip):
    """Istio's task: maxConnections 1, http1MaxPendingRequests 1. The first request holds the one connection,
    the second waits for it (and is served on it), the third finds the queue full: 503 UO at once."""
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=_routing(
        "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}"))
    try:
        t1, t2, t3 = [await _tunnel(h) for _ in range(3)]
        first = asyncio.ensure_future(_get(h, "/slow?s=0.5", t1))
        await until(lambda: _stats(h)["cx_active"] == 1 and _stats(h)["rq_active"] == 1, "first request in flight")
        second = asyncio.ensure_future(_get(h, "/slow?s=0.5", t2))
        await until(lambda: _stats(h)["rq_pending_active"] == 1, "second request queued")
        assert not first.done()
        status, _, body = await _get(h, "/slow?s=0.5", t3)
        assert (status, body) == (503, OVERFLOW_BODY)
        assert not first.done()   # answered at once, not after a wait
        assert [r[0] for r in await asyncio.gather(first, second)] == [200, 200]
        assert h.waypoint.originator.opened_hbone == 1   # the second went on the first's connection
        s = _stats(h)
        assert s["upstream_rq_pending_overflow"] == 1 and s["upstream_cx_overflow"] >= 2
        assert s["rq_active"] == 0 and s["rq_pending_active"] == 0 and s["cx_active"] <= 1
        lines = await _http_lines(h, 3)
        uo = [x for x in lines if x.get("status") == 503]
        assert len(uo) == 1 and uo[0]["response_flags"] == "UO"
        assert uo[0]["response_code_details"] == OVERFLOW_DETAIL
        assert [x["response_flags"] for x in lines if x.get("status") == 200] == ["-", "-"]
        # The admin /stats lines Istio's circuit-breaking task greps (pilot-agent request GET stats).
        envoy = dict(h.waypoint.http.breakers.envoy_stats())
        assert envoy[f"cluster.{C}.upstream_rq_pending_overflow"] == 1
        assert envoy[f"cluster.{C}.upstream_rq_pending_active"] == 0
        assert all(name.startswith(f"cluster.{C}.upstream_") for name in envoy)
    finally:
        await h.close()


async def test_a_pending_request_that_times_out_leaves_the_queue(tmp_path, loopback_ip):
    """The wait for a connection counts against the route timeout: 504 UT, out of the queue, nothing leaked —
    the connection then serves the next request."""
    # /slow without a timeout holds the one connection; everything else has a 0.3 s route timeout.
    routing = _routing("{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 5}}", timeout="0.3s",
                       slow_apart=True)
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=routing)
    try:
        t1, t2 = [await _tunnel(h) for _ in range(2)]
        first = asyncio.ensure_future(_get(h, "/slow?s=0.8", t1))
        await until(lambda: _stats(h)["rq_active"] == 1 and _stats(h)["cx_active"] == 1, "first request in flight")
        status, _, body = await _get(h, "/", t2)   # waits for the one connection, past the route timeout
        assert (status, body) == (504, b"upstream request timeout")
        assert _stats(h)["rq_pending_active"] == 0
        assert not first.done()
        assert (await first)[0] == 200
        assert (await _get(h, "/"))[0] == 200
        s = _stats(h)
        assert s["rq_active"] == s["rq_pending_active"] == 0 and s["cx_active"] <= 1
    finally:
        await h.close()


async def test_the_per_try_timeout_starts_when_the_connection_is_ready(tmp_path, loopback_ip):
    """Envoy starts the per-try timer at onPoolReady: a request that waited longer than its perTryTimeout for
    the one connection is still served once it has it."""
    routing = _routing("{tcp: {maxConnections: 1}}", retries="{attempts: 1, perTryTimeout: 0.2s, retryOn: retriable-4xx}", slow_apart=True)
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=routing)
    try:
        t1, t2 = [await _tunnel(h) for _ in range(2)]
        first = asyncio.ensure_future(_get(h, "/slow?s=0.6", t1))
        await until(lambda: _stats(h)["rq_active"] == 1 and _stats(h)["cx_active"] == 1, "first request in flight")
        status, _, body = await _get(h, "/", t2)   # pending ~0.6 s, three times its per-try timeout
        assert (status, body) == (200, b"v1")
        assert first.done() and (await first)[0] == 200
        assert h.waypoint.originator.opened_hbone == 1
    finally:
        await h.close()


async def test_max_requests_per_connection_1_means_a_new_connection_per_request(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=_routing(
        "{http: {maxRequestsPerConnection: 1}}"))
    try:
        assert await _upstream_connections_for(h, 3) == 3   # one upstream connection per request
        s = _stats(h)
        assert s["upstream_cx_max_requests"] == 3 and s["cx_active"] == 0
    finally:
        await h.close()


async def test_without_limits_a_kept_alive_upstream_connection_is_reused(tmp_path, loopback_ip):
    """The control for the test above: the same requests share one upstream connection."""
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=_routing("{tcp: {connectTimeout: 2s}}"))
    try:
        assert await _upstream_connections_for(h, 3) == 1
        assert not h.waypoint.http.breakers.clusters   # no limits: the circuit breakers never saw it
    finally:
        await h.close()


async def test_idle_timeout_a_connection_idle_longer_is_not_reused(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=_routing("{http: {idleTimeout: 0.001s}}"))
    try:
        assert await _upstream_connections_for(h, 2, pause_s=0.05) == 2   # ≫ 1 ms idle between them
    finally:
        await h.close()


async def test_http2_max_requests_1_a_concurrent_second_request_overflows(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=_routing("{http: {http2MaxRequests: 1}}"))
    try:
        t1, t2 = [await _tunnel(h) for _ in range(2)]
        first = asyncio.ensure_future(_get(h, "/slow?s=0.5", t1))
        await until(lambda: _stats(h)["rq_active"] == 1, "first request in flight")
        status, _, body = await _get(h, "/", t2)
        assert (status, body) == (503, OVERFLOW_BODY)
        assert (await first)[0] == 200
        assert (await _get(h, "/"))[0] == 200   # the slot is free again
        assert _stats(h)["upstream_rq_pending_overflow"] == 1 and _stats(h)["rq_active"] == 0
        lines = await _http_lines(h, 3)
        assert [x["response_flags"] for x in lines if x.get("status") == 503] == ["UO"]
    finally:
        await h.close()


async def test_max_retries_1_a_second_concurrent_retry_is_not_made(tmp_path, loopback_ip):
    """One request's retry is in flight (its first try hit the per-try timeout); another request's 503 would be
    retried, but maxRetries 1 is used up: no retry, the upstream's own 503 answers it, flag UO."""
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=_routing(
        "{http: {maxRetries: 1}}", retries="{attempts: 1, perTryTimeout: 0.5s, retryOn: '5xx'}"))
    try:
        t1, t2 = [await _tunnel(h) for _ in range(2)]
        slow = asyncio.ensure_future(_get(h, "/slow?s=2", t1))
        await until(lambda: _stats(h)["rq_retry_active"] == 1, "the slow request's retry scheduled")
        status, _, body = await _get(h, "/status/503", t2)
        assert (status, body) == (503, b"v1")   # the upstream's answer, not a local reply
        assert (await slow)[0] == 504
        assert _stats(h)["upstream_rq_retry_overflow"] == 1 and _stats(h)["rq_retry_active"] == 0
        lines = await _http_lines(h, 2)
        mine = [x for x in lines if x.get("path") == "/status/503"]
        assert len(mine) == 1 and mine[0]["response_flags"] == "UO" and mine[0]["attempts"] == 1
        other = [x for x in lines if x.get("path") == "/slow?s=2"]
        assert other[0]["attempts"] == 2
    finally:
        await h.close()


async def test_max_retries_0_is_unset_as_istiod_reads_it(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=_routing(
        "{http: {maxRetries: 0}}", retries="{attempts: 2, retryOn: '5xx'}"))
    try:
        assert (await _get(h, "/status/503"))[0] == 503
        lines = await _http_lines(h, 1)
        assert lines[-1]["attempts"] == 3 and "UO" not in lines[-1]["response_flags"]
    finally:
        await h.close()


TCP_POOL = destination_rule("tcp-echo", traffic_policy="{connectionPool: {tcp: {maxConnections: 1}}}")


async def test_tcp_max_connections_1_a_second_tunnel_is_refused(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, authz=False, tcp_pod=True, extra=TCP_POOL)
    try:
        client = h.client()
        first = await client.tunnel(f"{TCP_VIP}:9000")
        first.write(b"ping")
        await first.drain()
        assert await first.read() == b"ping"
        with pytest.raises(TunnelRefused) as err:
            await client.tunnel(f"{TCP_VIP}:9000")
        assert err.value.status == 503
        first.close()
        cb = h.waypoint.http.breakers
        cluster = next(iter(cb.clusters))
        await until(lambda: cb.stats(cluster)["cx_active"] == 0, "the first tunnel's upstream released")
        again = await client.tunnel(f"{TCP_VIP}:9000")   # room again
        again.write(b"pong")
        await again.drain()
        assert await again.read() == b"pong"
        again.close()
        assert cb.stats(cluster)["upstream_cx_overflow"] == 1
        refused: list[dict] = []

        def logged() -> bool:
            refused[:] = [x for x in map(json.loads, h.log_sink.getvalue().splitlines())
                          if x.get("kind") == "tunnel" and x.get("status") == 503]
            return bool(refused)

        await until(logged, "the refused tunnel's line")
        assert len(refused) == 1 and refused[0]["response_flags"] == "UO"
    finally:
        await h.close()
