"""A client that goes away while its request waits on the upstream: the waypoint resets the upstream request.

Envoy's HCM, on a downstream disconnect (conn_manager_impl.cc onEvent RemoteClose → doConnectionClose), resets every
active stream of the connection, and the router resets its upstream request: the pod's connection is closed rather
than left to finish a request nobody will read, and the request is logged with flag DC, details
``downstream_remote_disconnect`` and no status. Here the downstream connection is the HTTP/1.1 connection inside an
HBONE tunnel, so "goes away" is the tunnel's stream reset (with an error code, or clean: NO_ERROR/CANCEL, which
leaves nothing to answer on) or its HBONE connection lost. Through a real waypoint with real pods, on each of the
three ways a request is served: inline in the stream callbacks (proxy/pipeline/lean.py, a pooled connection), in
a task from the callbacks (no idle connection: a fresh dial) and by serve_http1 (after a request with a body)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from hbone.protocol import ErrorCodes
from tests.waypoint_harness import REVIEWS_VIP, start_harness, until

HANG = b"GET /hang HTTP/1.1\r\nHost: reviews:9080\r\n\r\n"


class _HangingPod:
    """A pod's HTTP/1.1 server that answers ``/`` (keep-alive) and never answers ``/hang``; it records each
    connection that ended while a ``/hang`` on it was unanswered."""

    def __init__(self, version: str):
        self.version = version.encode()
        self.served = 0
        self.hanging = 0          # /hang requests received
        self.dropped = 0          # connections that ended while one of them waited
        self.server: asyncio.AbstractServer | None = None

    async def start(self, ip: str) -> None:
        self.server = await asyncio.start_server(self._conn, ip, 9080)

    async def _conn(self, reader, writer) -> None:
        waiting = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"content-length:" in head.lower():
                    n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    await reader.readexactly(n)
                if head.startswith(b"GET /hang") or head.startswith(b"POST /hang"):
                    self.hanging += 1
                    waiting = True
                    continue   # no answer: read on until the waypoint gives up on the connection
                self.served += 1
                body = self.version
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (asyncio.IncompleteReadError, ConnectionError):
            if waiting:
                self.dropped += 1
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _harness(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip)
    pods = []
    for ip, pod in h.pods.items():
        await pod.stop_backend()
        hp = _HangingPod(pod.version)
        await hp.start(ip)
        pods.append(hp)
    return h, pods


@contextlib.asynccontextmanager
async def _mesh(tmp_path, loopback_ip):
    """The harness with hanging pods, closed after the test whatever happened."""
    h, pods = await _harness(tmp_path, loopback_ip)
    try:
        yield h, pods
    finally:
        await h.close()
        for p in pods:
            await p.stop()


async def _lose(stream, how: str) -> None:
    if how == "rst":
        stream.abort()                        # RST_STREAM CONNECT_ERROR
    elif how == "cancel":
        stream.abort(ErrorCodes.CANCEL)       # a clean reset: read as the end, yet nothing can be answered
    else:
        stream._conn.transport.abort()        # the client's HBONE connection dies (its node proxy went away)


async def _check_stopped(h, pods, n_hang: int = 1) -> None:
    # The pod's connection carrying /hang is closed by the waypoint (without the fix it stays open for good: the
    # route has no timeout, and the waypoint would wait for the answer).
    await until(lambda: sum(p.dropped for p in pods) == n_hang, "the pod's connection for /hang closed")
    lines = await h.http_lines(1, path="/hang")
    assert [(l["status"], l["response_flags"], l.get("response_code_details")) for l in lines] == \
        [(0, "DC", "downstream_remote_disconnect")] * n_hang
    await until(lambda: not h.waypoint.http.active, "no request in flight")
    # The waypoint goes on serving.
    c = h.client()
    stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
    assert (await c.request(stream))[0] == 200
    stream.close()


@pytest.mark.parametrize("how", ["rst", "cancel", "conn"])
async def test_inline_request_is_reset_upstream_when_the_client_goes(tmp_path, loopback_ip, how):
    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        for _ in range(200):   # until each pod has a pooled keep-alive connection: /hang is then answered inline
            assert (await c.request(stream))[0] == 200
            if all(p.served for p in pods):
                break
        inline = h.waypoint.http.inline
        assert inline > 0
        stream.write(HANG)
        await until(lambda: sum(p.hanging for p in pods) == 1, "/hang reached a pod")
        await _lose(stream, how)
        await _check_stopped(h, pods)
        assert sum(p.served for p in pods) == h.waypoint.http.requests - 1   # (no request was re-sent)


async def test_request_on_a_fresh_dial_is_reset_upstream_when_the_client_goes(tmp_path, loopback_ip):
    """No idle pooled connection: the callbacks hand the request to a task, which dials; the client resets."""
    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        stream.write(HANG)
        await until(lambda: sum(p.hanging for p in pods) == 1, "/hang reached a pod")
        await _lose(stream, "rst")
        await _check_stopped(h, pods)


@pytest.mark.parametrize("how", ["rst", "conn"])
async def test_request_served_by_serve_http1_is_reset_upstream_when_the_client_goes(tmp_path, loopback_ip, how):
    """After a request with a body the tunnel is served by serve_http1: its task is stopped the same way."""
    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        assert (await c.request(stream, "/", method=b"POST", body=b"payload"))[0] == 200
        stream.write(HANG)
        await until(lambda: sum(p.hanging for p in pods) == 1, "/hang reached a pod")
        await _lose(stream, how)
        await _check_stopped(h, pods)


async def test_a_client_that_only_half_closes_still_gets_its_answer(tmp_path, loopback_ip):
    """END_STREAM alone is not a loss: the tunnel can still carry the answer (HTTP/1.0-style clients send their
    request and shut their side), so the request goes on and is answered, as before. Envoy's HCM closes such a
    connection and resets the request (envoyproxy/envoy#17160, #2066: the known complaint about it); we answer,
    as nginx does — a deliberate leniency, the README says so."""
    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        assert (await c.request(stream))[0] == 200
        stream.write(b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        stream.write_eof()
        data = b""
        while chunk := await asyncio.wait_for(stream.read(), 10):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200")
        assert sum(p.dropped for p in pods) == 0


@pytest.mark.parametrize("how", ["rst", "cancel"])
async def test_h2c_requests_are_reset_upstream_when_the_tunnel_goes(tmp_path, loopback_ip, how):
    """h2c inside the tunnel: the tunnel is the client's HTTP/2 connection, so each of its streams in flight is
    stopped and its upstream request reset."""
    import h2.config
    import h2.connection

    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        for sid in (1, 3):
            client.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080"),
                                      (":path", "/hang")], end_stream=True)
        stream.write(client.data_to_send())
        await until(lambda: sum(p.hanging for p in pods) == 2, "both /hang requests reached a pod")
        await _lose(stream, how)
        await _check_stopped(h, pods, n_hang=2)


# ---------------------------------------------------------------------------------------------
# The loss in the same read as the request (found by review): the request's head and the tunnel's RST_STREAM
# leave the client in one flush, so the waypoint gets both from one TLS read, in one round of callbacks.

async def _head_and_reset_together(stream, data: bytes) -> None:
    stream.write(data)
    stream._conn.flush_now()   # the head goes out now ...
    stream.abort()             # ... and the RST_STREAM right behind it, before the waypoint reads either


async def _nothing_left(h, pods) -> None:
    """Every /hang that reached a pod had its connection closed, nothing is in flight, and the tunnel is over
    (its task ended: not waiting for good on a request task that never ran)."""
    await until(lambda: not h.waypoint.live, "the tunnel's task ended")
    await until(lambda: sum(p.dropped for p in pods) == sum(p.hanging for p in pods), "no /hang left upstream")
    await until(lambda: not h.waypoint.http.active, "no request in flight")


async def test_a_request_handed_to_a_task_in_the_read_that_resets_the_tunnel(tmp_path, loopback_ip):
    """Lean path: the request goes to a task (gRPC content-type: not the common request) created in the same
    round of callbacks as the loss; cancelled before its first step, it would never end the tunnel."""
    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        assert (await c.request(stream))[0] == 200
        await _head_and_reset_together(
            stream, b"GET /hang HTTP/1.1\r\nHost: reviews:9080\r\ncontent-type: application/grpc\r\n\r\n")
        await _nothing_left(h, pods)
        lines = await h.http_lines(1, path="/hang")
        assert [(l["status"], l["response_flags"]) for l in lines] == [(0, "DC")]


async def test_a_first_request_and_the_reset_in_one_read(tmp_path, loopback_ip):
    """Lean path on a fresh tunnel: the sniffer reads the head, the loss comes before the lean server watches."""
    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        await _head_and_reset_together(stream, HANG)
        await _nothing_left(h, pods)
        lines = await h.http_lines(1, path="/hang")
        assert [(l["status"], l["response_flags"]) for l in lines] == [(0, "DC")]


async def test_serve_http1_woken_by_data_in_the_read_that_resets_the_tunnel(tmp_path, loopback_ip):
    """serve_http1 waits in read; the head wakes it and the reset comes in the same read: its reader is woken
    already, so the loss must still stop it (the request is not sent upstream at all)."""
    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        assert (await c.request(stream, "/", method=b"POST", body=b"payload"))[0] == 200
        await asyncio.sleep(0.05)   # (serve_http1 now waits for the next head)
        await _head_and_reset_together(stream, HANG)
        await _nothing_left(h, pods)
        assert sum(p.hanging for p in pods) == 0


async def test_h2c_requests_read_after_the_tunnel_was_lost(tmp_path, loopback_ip):
    """h2c: the frames still buffered when the loss is seen are read, and their requests started after it."""
    import h2.config
    import h2.connection

    async with _mesh(tmp_path, loopback_ip) as (h, pods):
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "reviews:9080"),
                                (":path", "/hang")], end_stream=True)
        await _head_and_reset_together(stream, client.data_to_send())
        await _nothing_left(h, pods)
