"""HTTP/1.1 protocol upgrades (WebSocket) through a real waypoint on loopback: HBONE client →
waypoint (route, L7 authz, weighted subset) → HBONE → node inbound → a backend that answers the
RFC 6455 handshake with 101 and echoes bytes. Istio's HCM has upgrade_configs [{upgrade_type:
websocket}]; other upgrades get Envoy's 403 "upgrade_failed", HTTP/1 CONNECT Envoy's 404 NR."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from pathlib import Path

import pytest

from hbone.stream import TcpStream
from proxy.http1.client import forward_request
from proxy.http1.codec import MessageEnd, ResponseHead, ResponseReader, header_value
from proxy.http1.server import serve_http1
from tests.waypoint_harness import REVIEWS_VIP, start_harness

FIXTURES = Path(__file__).parent / "fixtures"
# RFC 6455 §1.3: the GUID appended to Sec-WebSocket-Key before hashing.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
EXPECTED_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="   # RFC 6455 §1.3's own worked example for KEY
GREETING = b"\x81\x05hello"                        # a text frame the backend sends right after its 101
MiB = 1024 * 1024


def ws_accept(key: bytes) -> bytes:
    """RFC 6455 §4.2.2 step 5.4: base64(SHA-1(key + GUID))."""
    return base64.b64encode(hashlib.sha1(key.strip() + WS_GUID).digest())


def upgrade_request(path: str = "/ws", upgrade: bytes = b"websocket", extra: bytes = b"") -> bytes:
    return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: reviews:9080\r\nConnection: Upgrade\r\n"
            b"Upgrade: " + upgrade + b"\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY +
            b"\r\n\r\n" + extra)


class WsBackend:
    """A WebSocket endpoint on our own HTTP/1.1 server: /ws… answers 101 (after ?delay=s), sends a
    greeting frame, then echoes until EOF and half-closes; /plain… (or no upgrade) a plain 200."""

    def __init__(self, version: str):
        self.version = version.encode()
        self.requests: list = []   # (target, upgrade, headers) as the backend saw them

    async def handle(self, request, responder) -> None:
        self.requests.append((request.target, request.upgrade, dict(request.headers)))
        target = request.target.decode()
        if request.upgrade is None or target.startswith("/plain"):
            await responder.send_local_reply(200, b"plain " + self.version, [(b"x-version", self.version)])
            return
        if "delay=" in target:
            await asyncio.sleep(float(target.split("delay=")[1]))
        key = header_value(request.headers, b"sec-websocket-key")
        raw = await responder.switch_protocols(b"websocket", [(b"sec-websocket-accept", ws_accept(key)),
                                                              (b"x-version", self.version)])
        raw.write(GREETING)
        await raw.drain()
        if "reset" in target:   # the upstream connection dies mid-relay
            await asyncio.sleep(0.05)
            raw.abort()
            return
        if "pause=" in target:   # longer than the route timeout: the relay is not bounded by it
            await asyncio.sleep(float(target.split("pause=")[1].split("&")[0]))
        while data := await raw.read(256 * 1024):
            raw.write(data)
            await raw.drain()
        raw.write_eof()
        await raw.drain()


@contextlib.asynccontextmanager
async def ws_harness(tmp_path, loopback_ip, routing: str | None = "default"):
    """The reviews harness with each pod's backend a ``WsBackend`` (same address and port); yields (harness,
    backends by version) and closes the harness after."""
    h = await start_harness(tmp_path, loopback_ip, routing=routing)
    backends = {}
    for ip, pod in h.pods.items():
        await pod.stop_backend()
        backend = WsBackend(pod.version)

        async def serve(reader, writer, backend=backend):
            await serve_http1(TcpStream(reader, writer), backend.handle)

        pod.backend = await asyncio.start_server(serve, ip, 9080)
        backends[pod.version] = backend
    try:
        yield h, backends
    finally:
        await h.close()


async def handshake(stream, request: bytes) -> tuple[ResponseHead, bytes]:
    """Send raw request bytes, read the answer's head; the bytes after it (the new protocol's, or the
    body of a non-101 answer)."""
    stream.write(request)
    await stream.drain()
    reader = ResponseReader()
    reader.expect(b"GET", upgrade=True)
    events: list = []
    while not events:
        data = await asyncio.wait_for(stream.read(), 5)
        assert data, "closed before the response head"
        events += reader.feed(data)
    head = events[0]
    if head.status == 101:
        return head, reader.take_upgrade_tail()
    body = b""
    while True:
        for e in events[1:]:
            if e is MessageEnd:
                return head, body
            body += e.data
        events = reader.feed(await asyncio.wait_for(stream.read(), 5))
        events.insert(0, head)


async def read_exactly(stream, n: int, have: bytes = b"") -> bytes:
    buf = bytearray(have)
    while len(buf) < n:
        data = await asyncio.wait_for(stream.read(256 * 1024), 10)
        assert data, f"EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


async def test_websocket_101_accept_then_1mib_each_way_byte_exact_and_half_close(tmp_path, loopback_ip):
    async with ws_harness(tmp_path, loopback_ip) as (h, backends):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        # The client's first frame rides in the same write as the handshake: it must reach the backend
        # after the 101, not be parsed as HTTP.
        early = b"\x81\x05early"
        head, tail = await handshake(stream, upgrade_request(extra=early))
        assert head.status == 101
        headers = dict(head.headers)
        assert headers[b"sec-websocket-accept"] == EXPECTED_ACCEPT == ws_accept(KEY)
        assert headers[b"upgrade"].lower() == b"websocket" and headers[b"connection"].lower() == b"upgrade"
        got = await read_exactly(stream, len(GREETING) + len(early), tail)
        assert got == GREETING + early
        payload = bytes(range(256)) * (4 * 1024)   # 1 MiB, every byte value
        assert len(payload) == MiB

        async def send():
            for i in range(0, MiB, 64 * 1024):
                stream.write(payload[i:i + 64 * 1024])
                await stream.drain()
            stream.write_eof()   # half-close: the echo must still come back whole
            await stream.drain()

        sender = asyncio.ensure_future(send())
        echoed = await read_exactly(stream, MiB)
        await sender
        assert echoed == payload
        assert await asyncio.wait_for(stream.read(), 5) == b""   # the backend's FIN came through
        stream.close()
        # The backend saw an upgrade request with the WebSocket headers kept, and Host/route applied.
        target, upgrade, seen = [r for b in backends.values() for r in b.requests][0]
        assert (target, upgrade) == (b"/ws", b"websocket")
        assert seen[b"sec-websocket-key"] == KEY and seen[b"connection"].lower() == b"upgrade"
        assert b"x-request-id" in seen
        # One access-log line for the upgrade: status 101, the relayed bytes, written when the relay ended.
        lines = await h.log_lines(2)
        ws = [x for x in lines if x.get("kind") == "http"]
        assert len(ws) == 1 and ws[0]["status"] == 101 and ws[0]["path"] == "/ws"
        assert ws[0]["bytes_received"] == len(early) + MiB
        assert ws[0]["bytes_sent"] == len(GREETING) + len(early) + MiB
        assert ws[0]["upstream_cluster"].startswith("inbound-vip|9080|http/v")
        text = h.metrics.exposition().decode()
        assert 'response_code="101"' in text
        assert repr(h.waypoint.http).count("idle=0") >= 1   # the upgraded connection was not pooled


async def test_upgrade_follows_the_90_10_route(tmp_path, loopback_ip):
    async with ws_harness(tmp_path, loopback_ip) as (h, backends):
        client = h.client()
        versions: dict[bytes, int] = {}
        for _ in range(200):
            stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
            resp = await forward_request(stream, b"GET", b"/ws", b"reviews:9080",
                                         [(b"sec-websocket-key", KEY), (b"sec-websocket-version", b"13")],
                                         upgrade=b"websocket")
            assert resp.status == 101
            raw = resp.upgraded_stream()
            assert await read_exactly(raw, len(GREETING)) == GREETING
            v = header_value(resp.headers, b"x-version")
            versions[v] = versions.get(v, 0) + 1
            raw.write_eof()
            assert await asyncio.wait_for(raw.read(), 5) == b""
            raw.close()
        assert set(versions) <= {b"v1", b"v2"}
        assert 8 <= versions.get(b"v2", 0) <= 36, versions     # 10 % of 200, generous bounds


async def test_denied_upgrade_is_403_and_nothing_is_relayed(tmp_path, loopback_ip):
    async with ws_harness(tmp_path, loopback_ip) as (h, backends):
        other = h.client("bookinfo-ratings")   # reviews allows only productpage
        stream = await other.tunnel(f"{REVIEWS_VIP}:9080")
        head, body = await handshake(stream, upgrade_request())
        assert (head.status, body) == (403, b"RBAC: access denied")
        stream.close()
        assert all(not b.requests for b in backends.values())
        lines = await h.log_lines(1)
        deny = [x for x in lines if x.get("kind") == "http"]
        assert deny[0]["status"] == 403 and deny[0]["authz"] == "deny"


async def test_non_101_answer_is_a_normal_response_and_the_connection_stays_http(tmp_path, loopback_ip):
    async with ws_harness(tmp_path, loopback_ip) as (h, backends):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        # The next request is pipelined right behind the refused upgrade: held, then parsed as HTTP.
        nxt = b"GET /plain2 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n"
        head, body = await handshake(stream, upgrade_request("/plain", extra=nxt))
        assert head.status == 200 and body.startswith(b"plain v")
        head2, body2 = await handshake(stream, b"")   # the pipelined request's answer
        assert head2.status == 200 and body2.startswith(b"plain v")
        status, _, body3 = await client.request(stream, "/plain3")
        assert status == 200 and body3.startswith(b"plain v")
        stream.close()
        seen = [r[0] for b in backends.values() for r in b.requests]
        assert sorted(seen) == [b"/plain", b"/plain2", b"/plain3"]


async def test_unconfigured_upgrade_403_and_http1_connect_404_nr(tmp_path, loopback_ip):
    async with ws_harness(tmp_path, loopback_ip) as (h, backends):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        head, body = await handshake(stream, upgrade_request(upgrade=b"foo"))
        assert (head.status, body) == (403, b"")
        status, _, body = await client.request(stream, "/plain")   # the connection still serves HTTP
        assert status == 200
        stream.close()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        head, body = await handshake(stream, b"CONNECT reviews:9080 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
        # Envoy without upgrade_configs CONNECT: authz ran (productpage is allowed), then no route: 404 NR.
        assert head.status == 404
        assert await asyncio.wait_for(stream.read(), 5) == b""   # then closed
        stream.close()
        for _ in range(100):   # the CONNECT's line is written when its tunnel's handler ends
            lines = await h.log_lines(3)
            connect = [x for x in lines if x.get("kind") == "http" and x.get("status") == 404]
            if connect:
                break
            await asyncio.sleep(0.05)
        assert connect and connect[0]["response_flags"] == "NR" and connect[0]["method"] == "CONNECT"
        failed = [x for x in lines if x.get("kind") == "http" and x.get("status") == 403]
        assert failed and failed[0]["response_code_details"] == "upgrade_failed"
        assert [r[0] for b in backends.values() for r in b.requests] == [b"/plain"]   # foo never left


TIMED_ROUTING = (FIXTURES / "bookinfo" / "reviews-routing.yaml").read_text().replace(
    "  http:\n  - route:",
    "  http:\n  - match: [{uri: {prefix: /timed}}]\n    timeout: 0.5s\n"
    "    route: [{destination: {host: reviews, subset: v1}}]\n  - route:", 1)


async def test_route_timeout_bounds_the_handshake_not_the_relay(tmp_path, loopback_ip):
    assert "timeout: 0.5s" in TIMED_ROUTING
    async with ws_harness(tmp_path, loopback_ip, routing=TIMED_ROUTING) as (h, backends):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        head, body = await handshake(stream, upgrade_request("/timed/ws?delay=2"))
        assert (head.status, body) == (504, b"upstream request timeout")
        stream.close()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        head, tail = await handshake(stream, upgrade_request("/timed/ws?pause=1.0&x"))
        assert head.status == 101
        assert await read_exactly(stream, len(GREETING), tail) == GREETING
        stream.write(b"after the timeout")   # echoed once the backend's pause (2x the timeout) is over
        assert await read_exactly(stream, 17) == b"after the timeout"
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 5) == b""
        stream.close()


async def test_upstream_reset_mid_relay_resets_the_client(tmp_path, loopback_ip):
    async with ws_harness(tmp_path, loopback_ip) as (h, backends):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        head, tail = await handshake(stream, upgrade_request("/ws?reset"))
        assert head.status == 101
        assert await read_exactly(stream, len(GREETING), tail) == GREETING
        # Never a clean EOF: the tunnel is reset (RST_STREAM), so the client knows bytes may be lost.
        with pytest.raises(OSError):
            async with asyncio.timeout(5):
                while await stream.read():
                    pass
        stream.close()
        lines = await h.log_lines(2)
        ws = [x for x in lines if x.get("kind") == "http"]
        assert ws[0]["status"] == 101 and "reset" in ws[0]["error"] and ws[0]["response_flags"] == "UC"


FAULT_ROUTING = (FIXTURES / "bookinfo" / "reviews-routing.yaml").read_text().replace(
    "  http:\n  - route:",
    "  http:\n  - match: [{uri: {prefix: /aborted}}]\n    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}\n"
    "    route: [{destination: {host: reviews, subset: v1}}]\n"
    "  - match: [{uri: {prefix: /moved}}]\n    headers: {request: {set: {x-moved: \"yes\"}}}\n"
    "    route: [{destination: {host: reviews, subset: v2}}]\n  - route:", 1)


async def test_upgrade_gets_fault_and_header_operations_of_its_route(tmp_path, loopback_ip):
    """The upgrade request goes through the route like any request: a fault abort answers it (and the
    connection stays HTTP), a rule's header set reaches the upstream, its subset is the one chosen."""
    assert "/aborted" in FAULT_ROUTING and "/moved" in FAULT_ROUTING
    async with ws_harness(tmp_path, loopback_ip, routing=FAULT_ROUTING) as (h, backends):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        head, body = await handshake(stream, upgrade_request("/aborted/ws", upgrade=b"WebSocket"))
        assert (head.status, body) == (503, b"fault filter abort")
        head, tail = await handshake(stream, upgrade_request("/moved/ws", upgrade=b"WebSocket"))
        assert head.status == 101 and header_value(head.headers, b"x-version") == b"v2"
        assert await read_exactly(stream, len(GREETING), tail) == GREETING
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 5) == b""
        stream.close()
        target, upgrade, seen = backends["v2"].requests[0]
        assert (target, upgrade, seen[b"x-moved"]) == (b"/moved/ws", b"WebSocket", b"yes")
        assert not backends["v1"].requests
        lines = await h.log_lines(3)
        flags = {x["path"]: x["response_flags"] for x in lines if x.get("kind") == "http"}
        assert flags == {"/aborted/ws": "FI", "/moved/ws": "-"}
