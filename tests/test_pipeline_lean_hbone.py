"""proxy.pipeline.lean through a real waypoint (real HBONE both sides, real pods): the common request is
answered inside the streams' callbacks once the pool has a connection (an untimed regression check), and
everything else on the same tunnel still gets its right answer — retries, streamed bodies, request bodies,
pipelined and split heads, a client that ends or resets. The twin tests: tests/test_pipeline_lean_callbacks.py."""

from __future__ import annotations

import asyncio

from proxy.http1.codec import ResponseReader, MessageEnd, ResponseHead
from tests.waypoint_harness import REVIEWS_VIP, start_harness

SEQUENTIAL = 60


async def _read_responses(stream, n: int, methods=None) -> list[tuple[int, bytes]]:
    """n responses read off a raw tunnel (the client side of pipelining)."""
    reader = ResponseReader()
    out, body, status = [], b"", 0
    while len(out) < n:
        if methods:
            reader.expect(methods[len(out)])
        data = await asyncio.wait_for(stream.read(), 10)
        assert data, f"tunnel ended after {len(out)} responses"
        for ev in reader.feed(data):
            if isinstance(ev, ResponseHead):
                status, body = ev.status, b""
            elif ev is MessageEnd:
                out.append((status, body))
            else:
                body += ev.data
    return out


async def test_keepalive_requests_are_answered_in_callbacks(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip)
    try:
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        bodies = [(await c.request(stream)) for _ in range(SEQUENTIAL)]
        stream.close()
        assert {b for s, _, b in bodies if s == 200} <= {b"v1", b"v2"} and all(s == 200 for s, _, _ in bodies)
        pipe = h.waypoint.http
        # Every request but the first to each endpoint (which dial) is answered inline.
        assert pipe.inline >= SEQUENTIAL - 2, repr(pipe)
        lines = await h.http_lines(SEQUENTIAL)
        assert [l["status"] for l in lines[-SEQUENTIAL:]] == [200] * SEQUENTIAL
    finally:
        await h.close()


async def test_one_tunnel_mixes_every_kind_of_request(tmp_path, loopback_ip):
    """On one keep-alive tunnel: inline GETs, a retried 503, a large streamed
    answer, a request with a body (the tunnel goes on in serve_http1), then more GETs."""
    h = await start_harness(tmp_path, loopback_ip)
    try:
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        for _ in range(5):
            assert (await c.request(stream))[0] == 200
        # 503 is retriable (Istio's default retry policy): handed over to _forward, retried, answered 503.
        assert (await c.request(stream, "/status/503"))[0] == 503
        status, _, body = await c.request(stream, "/big?n=300000")
        assert status == 200 and len(body) == 300000
        status, _, body = await c.request(stream, "/echo", method=b"POST", body=b"payload")
        assert status == 200 and body.endswith(b" payload")
        for _ in range(5):
            assert (await c.request(stream))[0] == 200
        stream.close()
        assert h.waypoint.http.inline >= 4
        lines = await h.http_lines(13)
        assert [l["status"] for l in lines if l["path"] == "/status/503"] == [503]
        # (Istio's default: 2 retries, so 3 attempts)
        assert [l["attempts"] for l in lines if l["path"] == "/status/503"] == [3]
    finally:
        await h.close()


async def test_pipelined_and_split_heads(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip)
    try:
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        get = b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n"
        stream.write(get)
        assert [s for s, _ in await _read_responses(stream, 1)] == [200]
        stream.write(get * 3)   # pipelined: answered in order
        assert [s for s, _ in await _read_responses(stream, 3)] == [200] * 3
        stream.write(get[:9])   # a head in two reads
        await asyncio.sleep(0.05)
        stream.write(get[9:])
        assert [s for s, _ in await _read_responses(stream, 1)] == [200]
        stream.write_eof()      # the client ends: the waypoint ends its side too
        assert await asyncio.wait_for(stream.read(), 10) == b""
    finally:
        await h.close()


async def test_client_ends_and_resets_leave_nothing_in_flight(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip)
    try:
        c = h.client()
        for _ in range(3):
            stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
            assert (await c.request(stream))[0] == 200
            stream.write(b"GET /slow?s=0.2 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
            await asyncio.sleep(0.05)
            stream.abort()      # reset while the request is upstream
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        assert (await c.request(stream))[0] == 200
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 10) == b""
        for _ in range(100):
            if not h.waypoint.http.active:
                break
            await asyncio.sleep(0.05)
        assert not h.waypoint.http.active
        lines = await h.http_lines(7, path="/slow?s=0.2")
        assert any(l["path"] == "/slow?s=0.2" for l in lines)
    finally:
        await h.close()
