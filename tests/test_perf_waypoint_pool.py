"""Upstream HTTP/1.1 connection reuse through a real waypoint (untimed: counts upstream HBONE tunnels).

Each miss in the waypoint's per-endpoint HTTP/1.1 pool costs a CONNECT to the destination node, a new
HBONE stream there and a TCP dial to the pod: the benchmark's waypoint once opened ~1 936 tunnels for
5 291 requests at 64 connections. Keep-alive clients must be served on reused upstream connections."""

from __future__ import annotations

import asyncio

from tests.waypoint_harness import REVIEWS_VIP, start_harness

SEQUENTIAL_REQUESTS = 200
CLIENTS = 64
REQUESTS_PER_CLIENT = 12
ROUNDS = 3   # the c=64 burst repeated: the pool must keep what a burst opened (no churn)


async def test_sequential_requests_reuse_one_connection_per_endpoint(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip)
    try:
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        versions = set()
        for _ in range(SEQUENTIAL_REQUESTS):
            status, headers, body = await c.request(stream)
            assert status == 200, body
            versions.add(body)
        stream.close()
        opened = h.waypoint.originator.opened_hbone
        # 90/10 split over v1/v2: one upstream connection per endpoint used, never one per request.
        assert versions <= {b"v1", b"v2"} and b"v1" in versions
        assert opened <= len(versions), (opened, versions)
    finally:
        await h.close()


async def test_concurrent_keepalive_clients_do_not_churn_upstream_connections(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip)
    try:
        c = h.client()
        streams = [await c.tunnel(f"{REVIEWS_VIP}:9080") for _ in range(CLIENTS)]
        done = 0

        async def client(stream) -> None:
            nonlocal done
            for _ in range(REQUESTS_PER_CLIENT):
                status, _, body = await c.request(stream)
                assert status == 200, body
                done += 1

        per_round = []
        for _ in range(ROUNDS):
            await asyncio.gather(*(client(s) for s in streams))
            per_round.append(h.waypoint.originator.opened_hbone)
        for s in streams:
            s.close()
        assert done == CLIENTS * REQUESTS_PER_CLIENT * ROUNDS
        # The first burst opens what its peak concurrency needs per endpoint (v1 and v2 can each peak
        # at CLIENTS in flight); later bursts reuse them all: no upstream tunnel is closed and re-dialled
        # (a 16-deep pool opened 1 011 tunnels here). Every one of them is idle in the pool at the end.
        first = per_round[0]
        assert first <= 2 * CLIENTS and per_round == [first] * ROUNDS, per_round
        assert repr(h.waypoint.http.h1pool) == f"<Http1Pool keys=2 idle={first}>"
    finally:
        await h.close()


async def test_routing_reload_applies_to_the_next_request_on_a_kept_alive_tunnel(tmp_path, loopback_ip):
    """Resolved upstreams are remembered per config snapshot: a reload that moves all traffic to v2
    takes effect on the very next request of an open keep-alive tunnel, on v2's own pooled connection."""
    h = await start_harness(tmp_path, loopback_ip)
    try:
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        before = {(await c.request(stream))[2] for _ in range(40)}
        assert b"v1" in before
        routing = tmp_path / "config" / "routing.yaml"
        text = routing.read_text()
        assert "weight: 90" in text and "weight: 10" in text
        routing.write_text(text.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 100"))
        h.store.load()
        after = [(await c.request(stream))[2] for _ in range(40)]
        assert after == [b"v2"] * 40
        stream.close()
        assert h.waypoint.originator.opened_hbone <= 2   # one per endpoint, kept across the reload
    finally:
        await h.close()
