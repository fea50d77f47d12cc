"""The waypoint's L7 coverage beyond HTTP/1.1, end to end over real HBONE tunnels: h2c downstream (a
raw h2 client written against the h2 library, not our code), gRPC to an h2c upstream (hand-framed
gRPC messages), gRPC local replies, fault abort grpcStatus, RST_STREAM both ways, protocol errors,
mirrors, and which metrics an HTTP chain reports."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import h2.config
import h2.connection
import h2.events as ev
from h2.errors import ErrorCodes

from hbone.stream import TcpStream
from proxy.pipeline.h2c import serve_h2c
from tests.waypoint_harness import (REVIEWS_VIP, Pod, config_docs, destination_rule, send_big, start_harness,
                                    start_node_inbound, start_pod, virtual_service)

FIXTURES = Path(__file__).parent / "fixtures"
GREETER_VIP = "127.2.0.90"
PLAIN_HTTP_VIP = "127.2.0.70"
PLAIN_TCP_VIP = "127.2.0.71"
SAY_HELLO = b"/greeter.Greeter/SayHello"


def grpc_frame(msg: bytes) -> bytes:
    """gRPC length-prefixed message (PROTOCOL-HTTP2.md): compressed flag, 4-byte length, bytes."""
    return struct.pack(">BI", 0, len(msg)) + msg


def grpc_unframe(data: bytes) -> list[bytes]:
    out = []
    while data:
        _, n = struct.unpack(">BI", data[:5])
        out.append(data[5:5 + n])
        data = data[5 + n:]
    return out


# ---------------------------------------------------------------------------------------------
# A raw h2 client (the h2 library directly) over an HBONE stream


class RawH2:
    def __init__(self, stream):
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.results: dict[int, dict] = {}
        self.goaway: ev.ConnectionTerminated | None = None
        self.eof = False
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.stream.write(data)

    def start(self, path: bytes, *, method: bytes = b"GET", authority: bytes = b"reviews:9080", headers=(),
              body: bytes | None = None, end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path),
                  *headers]
        self.results[sid] = {"headers": None, "data": b"", "trailers": None, "reset": None, "ended": False}
        self.conn.send_headers(sid, fields, end_stream=body is None and end)
        if body is not None:
            self.send(sid, body, end=end)
        self._flush()
        return sid

    def send(self, sid: int, body: bytes, *, end: bool = True) -> None:
        view = memoryview(body)
        while view:   # the tests send bodies below the initial windows, or call pump() in between
            n = min(len(view), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            assert n > 0, "window exhausted"
            self.conn.send_data(sid, bytes(view[:n]))
            view = view[n:]
        if end:
            self.conn.end_stream(sid)
        self._flush()

    def grpc(self, path: bytes, msg: bytes, authority: bytes = b"greeter:9090") -> int:
        return self.start(path, method=b"POST", authority=authority,
                          headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers")],
                          body=grpc_frame(msg))

    async def upload(self, sid: int, body: bytes, end_stream: bool = True) -> None:
        """Send a body larger than the windows: wait for WINDOW_UPDATEs (read and handle frames); then
        END_STREAM, unless ``end_stream`` is false (trailers are to end the stream)."""
        view = memoryview(body)
        while view:
            n = min(len(view), self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if n == 0:
                await self._read_once()
                continue
            self.conn.send_data(sid, bytes(view[:n]))
            view = view[n:]
            self._flush()
        if end_stream:
            self.conn.end_stream(sid)
            self._flush()

    def reset(self, sid: int, code=ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(sid, code)
        self._flush()

    def _done(self, sid: int) -> bool:
        r = self.results[sid]
        return r["ended"] or r["reset"] is not None

    async def pump(self, sids=(), timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while (not sids or not all(self._done(s) for s in sids)) and self.goaway is None and not self.eof:
                await self._read_once()

    async def _read_once(self) -> None:
        data = await self.stream.read()
        if not data:
            self.eof = True
            return
        for e in self.conn.receive_data(data):
            r = self.results.get(getattr(e, "stream_id", 0))
            if isinstance(e, ev.ResponseReceived):
                r["headers"] = dict(e.headers)
            elif isinstance(e, ev.DataReceived):
                r["data"] += e.data
                self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, ev.TrailersReceived):
                r["trailers"] = dict(e.headers)
            elif isinstance(e, ev.StreamEnded):
                r["ended"] = True
            elif isinstance(e, ev.StreamReset):
                r["reset"] = e.error_code
            elif isinstance(e, ev.ConnectionTerminated):
                self.goaway = e
        self._flush()

    async def get(self, path: bytes, **kw) -> dict:
        sid = self.start(path, **kw)
        await self.pump([sid])
        return self.results[sid]


# ---------------------------------------------------------------------------------------------
# gRPC-shaped h2c pods (our h2c server, h2 underneath) behind per-pod HBONE terminators


class H2Backend:
    def __init__(self, version: str):
        self.version = version
        self.resets = 0
        self.requests: list[dict] = []

    async def handle(self, request, responder) -> None:
        path = request.target
        self.requests.append({"path": path, "authority": request.host, "headers": dict(request.headers)})
        body = b""
        try:
            async for chunk in request.body_chunks():
                body += chunk
            if path == b"/hang":
                await asyncio.sleep(30)
        except (ConnectionError, asyncio.CancelledError):   # reset read, or handler cancelled by RST_STREAM
            self.resets += 1
            raise
        if path == SAY_HELLO:
            names = grpc_unframe(body)
            await responder.send_head(200, [(b"content-type", b"application/grpc")])
            for n in names:
                await responder.send_body(grpc_frame(b"hello " + n + b" from " + self.version.encode()))
            await responder.end([(b"grpc-status", b"0"), (b"grpc-message", b"")])
        elif path == b"/greeter.Greeter/Fail":
            await responder.send_local_reply(200, b"", [(b"content-type", b"application/grpc"),
                                                        (b"grpc-status", b"14")])
        elif path.startswith(b"/big"):
            await send_big(responder, int(path.split(b"=")[1]), self.version)
        elif path == b"/reset-mid":
            await responder.send_head(200, [])
            await responder.send_body(b"partial")
            raise RuntimeError("backend fails mid-response")   # serve_h2c resets the stream
        else:
            await responder.send_local_reply(200, self.version.encode() + (b" " + body if body else b""),
                                             [(b"x-version", self.version.encode())])


async def start_h2c_pod(ip: str, version: str, port: int = 9090) -> tuple[Pod, H2Backend]:
    pod = Pod(ip, version)
    backend = H2Backend(version)

    async def serve(reader, writer):
        stream = TcpStream(reader, writer)
        try:
            await serve_h2c(stream, backend.handle)
        finally:
            stream.close()

    pod.backend = await asyncio.start_server(serve, ip, port)
    pod.hbone = await start_node_inbound(ip, "greeter")
    return pod, backend


async def l7_harness(tmp_path, loopback_ip, routing: str | None = None, authz: bool = True,
                     reviews_routing: bool = True):
    """The bookinfo harness plus the L7 fixture: two greeter (gRPC/h2c) pods, a plain HTTP/1.1 pod and
    a plain TCP echo pod on undeclared ports. Returns (harness, {version: H2Backend}, ips)."""
    ips = {k: loopback_ip() for k in ("GREETER1", "GREETER2", "PLAINHTTP", "PLAINTCP")}
    text = (FIXTURES / "l7" / "inventory.yaml").read_text()
    for k, ip in ips.items():
        text = text.replace(f"@{k}@", ip)
    if routing:
        text += "\n---\n" + routing
    h = await start_harness(tmp_path, loopback_ip, extra=text, routing="default" if reviews_routing else None,
                            authz=authz)
    backends = {}
    for key, version in (("GREETER1", "v1"), ("GREETER2", "v2")):
        pod, backend = await start_h2c_pod(ips[key], version)
        h.pods[ips[key]] = pod
        backends[version] = backend
    h.pods[ips["PLAINHTTP"]] = await start_pod(ips["PLAINHTTP"], "plain", sa="plain", port=7000)
    h.pods[ips["PLAINTCP"]] = await start_pod(ips["PLAINTCP"], "tcp", sa="plain", port=7100, kind="echo")
    return h, backends, ips


GREETER_ROUTES = virtual_service("greeter", """
  - match: [{uri: {prefix: /greeter.Greeter/Abort}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: greeter}}]
  - match: [{uri: {prefix: /greeter.Greeter/Slow}}]
    timeout: 0.2s
    route: [{destination: {host: greeter, port: {number: 9999}}}]
  - match: [{uri: {prefix: /greeter.Greeter/}}]
    route: [{destination: {host: greeter}}]
  - match: [{uri: {prefix: /hang}}]
    route: [{destination: {host: greeter}}]
  - match: [{uri: {prefix: /big}}]
    route: [{destination: {host: greeter}}]
  - match: [{uri: {prefix: /reset-mid}}]
    route: [{destination: {host: greeter}}]
""")


async def test_grpc_over_h2c_multiplexed_to_h2c_upstream(tmp_path, loopback_ip):
    h, backends, _ = await l7_harness(tmp_path, loopback_ip, GREETER_ROUTES)
    try:
        client = h.client()
        c = RawH2(await client.tunnel(f"{GREETER_VIP}:9090"))
        sids = [c.grpc(SAY_HELLO, b"n%d" % i) for i in range(40)]   # 40 concurrent streams, one tunnel
        await c.pump(sids)
        for i, sid in enumerate(sids):
            r = c.results[sid]
            assert r["headers"][b":status"] == b"200", r
            assert r["headers"][b"content-type"] == b"application/grpc"
            msgs = grpc_unframe(r["data"])
            assert len(msgs) == 1 and msgs[0].startswith(b"hello n%d from v" % i)
            assert r["trailers"][b"grpc-status"] == b"0"   # trailers passed through
        assert sum(len(b.requests) for b in backends.values()) == 40
        # Upstream: one multiplexed h2c connection per endpoint, not one per request; the 40 requests
        # arrived before any connection existed and shared the dials (H2UpstreamPool.connect).
        pool = h.waypoint.http.h2pool
        assert pool.opened <= 2 and pool.dials == pool.opened, (pool.opened, pool.dials)
        # te: trailers reached the gRPC server (RFC 9113 §8.2.2 allows only that value).
        seen = next(b for b in backends.values() if b.requests).requests[0]
        assert seen["headers"][b"te"] == b"trailers" and seen["authority"] == b"greeter:9090"
        # A gRPC status in the upstream's trailers-only answer passes through as such.
        sid = c.grpc(b"/greeter.Greeter/Fail", b"x")
        await c.pump([sid])
        r = c.results[sid]
        assert r["headers"][b"grpc-status"] == b"14" and r["ended"]
        text = h.metrics.exposition().decode()
        ok = [x for x in text.splitlines() if x.startswith("istio_requests_total{")
              and 'request_protocol="grpc"' in x and 'grpc_response_status="0"' in x]
        assert sum(float(x.rsplit(" ", 1)[1]) for x in ok) == 40
        lines = await h.log_lines(41)
        http = [x for x in lines if x["kind"] == "http"]
        assert {x["protocol"] for x in http} == {"h2c"}
        assert http[0]["chain"] == "inbound-vip|9090||greeter.default.svc.cluster.local-http"
    finally:
        await h.close()


async def test_grpc_local_replies_deny_noroute_fault_unavailable(tmp_path, loopback_ip):
    h, _, _ = await l7_harness(tmp_path, loopback_ip, GREETER_ROUTES)
    try:
        # RBAC deny for gRPC: HTTP 200, grpc-status 7 (PERMISSION_DENIED), grpc-message the body.
        other = RawH2(await h.client("bookinfo-ratings").tunnel(f"{GREETER_VIP}:9090"))
        sid = other.grpc(SAY_HELLO, b"x")
        await other.pump([sid])
        r = other.results[sid]
        assert r["headers"][b":status"] == b"200" and r["headers"][b"grpc-status"] == b"7"
        assert r["headers"][b"grpc-message"] == b"RBAC: access denied" and r["data"] == b"" and r["ended"]
        c = RawH2(await h.client().tunnel(f"{GREETER_VIP}:9090"))
        # No route: 404 → 12 UNIMPLEMENTED.
        sid = c.grpc(b"/other.Service/Method", b"x")
        await c.pump([sid])
        assert c.results[sid]["headers"][b"grpc-status"] == b"12"
        # fault.abort.grpcStatus UNAVAILABLE → 14, flag FI.
        sid = c.grpc(b"/greeter.Greeter/Abort", b"x")
        await c.pump([sid])
        assert c.results[sid]["headers"][b"grpc-status"] == b"14"
        assert c.results[sid]["headers"][b"grpc-message"] == b"fault filter abort"
        # The same fault for a plain HTTP request: Envoy's plain local reply, HTTP 200 with the body.
        r = await c.get(b"/greeter.Greeter/Abort", authority=b"greeter:9090")
        assert r["headers"][b":status"] == b"200" and r["data"] == b"fault filter abort"
        # A destination port the service lacks (cluster not found: 503 NC) → 14 UNAVAILABLE.
        sid = c.grpc(b"/greeter.Greeter/Slow", b"x")
        await c.pump([sid])
        assert c.results[sid]["headers"][b"grpc-status"] == b"14"
        lines = await h.log_lines(5)
        http = [x for x in lines if x["kind"] == "http"]
        assert any(x["response_flags"] == "FI" and x["status"] == 200 for x in http)
        text = h.metrics.exposition().decode()
        assert any('grpc_response_status="7"' in x and 'response_code="200"' in x and 'request_protocol="grpc"' in x
                   for x in text.splitlines() if x.startswith("istio_requests_total{"))
        assert any('grpc_response_status="12"' in x for x in text.splitlines())
    finally:
        await h.close()


async def test_h2c_to_http1_upstream_streams_both_ways(tmp_path, loopback_ip):
    h, _, _ = await l7_harness(tmp_path, loopback_ip)
    try:
        c = RawH2(await h.client().tunnel(f"{REVIEWS_VIP}:9080"))   # reviews: appProtocol http → HTTP/1.1 up
        counts: dict[bytes, int] = {}
        for _ in range(50):
            r = await c.get(b"/")
            assert r["headers"][b":status"] == b"200"
            counts[r["data"]] = counts.get(r["data"], 0) + 1
        assert set(counts) <= {b"v1", b"v2"}
        # POST with a body through to HTTP/1.1 (content-length framed there).
        r = await c.get(b"/", method=b"POST", body=b"hello h2")
        assert r["data"].endswith(b" hello h2")
        # A request body larger than the stream window (1 MiB): WINDOW_UPDATEs only as it is consumed.
        big = bytes(range(256)) * (6 * 1024)   # 1.5 MiB
        sid = c.start(b"/", method=b"POST", body=big[:60000], end=False)
        await c.upload(sid, big[60000:])
        await c.pump([sid])
        assert c.results[sid]["data"].endswith(big[-1000:]) and len(c.results[sid]["data"]) == 3 + len(big)
        # The h2c tunnel is an HTTP chain: request metrics only, no TCP connection metrics for it
        # (Istio installs istio_stats' network filter only on TCP chains).
        text = h.metrics.exposition().decode()
        assert "istio_requests_total{" in text
        assert not [x for x in text.splitlines() if x.startswith("istio_tcp_connections_opened_total{")]
    finally:
        await h.close()


async def test_rst_stream_both_ways_and_big_response(tmp_path, loopback_ip):
    h, backends, _ = await l7_harness(tmp_path, loopback_ip, GREETER_ROUTES)
    try:
        c = RawH2(await h.client().tunnel(f"{GREETER_VIP}:9090"))
        # Client resets a stream in flight: the upstream stream is reset too.
        sid = c.start(b"/hang", method=b"POST", authority=b"greeter:9090", body=b"x", end=False,
                      headers=[(b"content-type", b"application/grpc")])   # gRPC: the body streams at once
        for _ in range(50):
            await asyncio.sleep(0.02)
            if any(b.requests for b in backends.values()):
                break
        c.reset(sid)
        for _ in range(100):
            if sum(b.resets for b in backends.values()) == 1:
                break
            await asyncio.sleep(0.02)
        assert sum(b.resets for b in backends.values()) == 1
        # Upstream resets mid-response: the client's stream is reset, not ended cleanly.
        r = await c.get(b"/reset-mid", authority=b"greeter:9090")
        assert r["reset"] is not None and not r["ended"]
        # The connection is still good: an 8 MiB response streams through byte-exact.
        n = 8 * 1024 * 1024 + 7
        r = await c.get(b"/big?n=%d" % n, authority=b"greeter:9090")
        assert r["ended"] and len(r["data"]) == n and r["data"][:256] == bytes(range(256))
        lines = await h.log_lines(3)
        assert any("UC" in x["response_flags"] for x in lines if x["kind"] == "http" and x["path"] == "/reset-mid")
    finally:
        await h.close()


async def test_protocol_error_goaway_ends_only_that_tunnel(tmp_path, loopback_ip):
    h, _, _ = await l7_harness(tmp_path, loopback_ip)
    try:
        client = h.client()
        good = RawH2(await client.tunnel(f"{REVIEWS_VIP}:9080"))
        assert (await good.get(b"/"))["headers"][b":status"] == b"200"
        bad_stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        bad = RawH2(bad_stream)
        # A DATA frame on stream 0 (RFC 9113 §6.1: connection error PROTOCOL_ERROR).
        bad_stream.write(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
        await bad.pump([], timeout=5)
        assert bad.goaway is not None and bad.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        bad.goaway = None
        await bad.pump([], timeout=5)   # then the tunnel ends
        assert bad.eof
        # The other tunnel, and new ones, are unaffected.
        assert (await good.get(b"/"))["headers"][b":status"] == b"200"
        again = RawH2(await client.tunnel(f"{REVIEWS_VIP}:9080"))
        assert (await again.get(b"/"))["headers"][b":status"] == b"200"
    finally:
        await h.close()


MIRROR_ROUTES = config_docs(
    virtual_service("reviews", """
  - match: [{uri: {prefix: /dead}}]
    route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: reviews, subset: v3}
  - route: [{destination: {host: reviews, subset: v1}}]
    mirror: {host: greeter}
    mirrorPercentage: {value: 100}
"""),
    destination_rule("reviews", subsets=("v1", "v3")),
)


async def test_mirror_copies_request_with_shadow_authority(tmp_path, loopback_ip):
    h, backends, _ = await l7_harness(tmp_path, loopback_ip, MIRROR_ROUTES, reviews_routing=False)
    try:
        client = h.client()
        s = await client.tunnel(f"{REVIEWS_VIP}:9080")
        for i in range(5):
            status, _, body = await client.request(s, "/x", method=b"POST", body=b"payload%d" % i)
            assert (status, body) == (200, b"v1 payload%d" % i)   # the main request is unaffected
        for _ in range(100):
            if sum(len(b.requests) for b in backends.values()) >= 5:
                break
            await asyncio.sleep(0.02)
        shadows = [r for b in backends.values() for r in b.requests]
        assert len(shadows) == 5
        assert {r["authority"] for r in shadows} == {b"reviews-shadow:9080"}   # Envoy's -shadow suffix
        assert all(r["path"] == b"/x" for r in shadows)
        # A mirror that cannot be reached (v3's pod is gone) never delays or fails the main request.
        v3 = next(p for p in h.pods.values() if p.version == "v3")
        await v3.stop_backend()
        await v3.hbone.close()
        v3.hbone = None
        t0 = asyncio.get_running_loop().time()
        status, _, body = await client.request(s, "/dead")
        assert status == 200 and asyncio.get_running_loop().time() - t0 < 1.0
        m = h.waypoint.http.mirrorer
        for _ in range(200):
            if not m.tasks:
                break
            await asyncio.sleep(0.02)
        assert m.sent == 6 and m.ok == 5 and m.failed == 1 and not m.tasks
        lines = await h.log_lines(12)
        mirror = [x for x in lines if x.get("route") == "mirror"]
        assert len(mirror) == 6 and sum(1 for x in mirror if x.get("status") == 200) == 5
        assert all(x["authority"] == "reviews-shadow:9080" for x in mirror)
    finally:
        await h.close()


async def test_h2c_connect_is_answered_404_nr_and_the_connection_goes_on(tmp_path, loopback_ip):
    """RFC 9113 §8.5 CONNECT over h2c (no :path): authorized, then 404 NR as HTTP/1.1 CONNECT is — Envoy
    matches CONNECT only with a connect_matcher route, which Istio does not build. It was taken for a
    GET of "/" with a body and waited for the body's end (the client hung)."""
    h, _, _ = await l7_harness(tmp_path, loopback_ip)
    try:
        c = RawH2(await h.client().tunnel(f"{REVIEWS_VIP}:9080"))
        sid = c.conn.get_next_available_stream_id()
        c.results[sid] = {"headers": None, "data": b"", "trailers": None, "reset": None, "ended": False}
        c.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"reviews:9080")], end_stream=False)
        c._flush()
        await c.pump([sid])
        assert c.results[sid]["headers"][b":status"] == b"404"
        # An extended CONNECT (RFC 8441 WebSocket; not advertised, sent anyway): the same answer.
        c.conn.config.validate_outbound_headers = False
        ext = c.conn.get_next_available_stream_id()
        c.results[ext] = {"headers": None, "data": b"", "trailers": None, "reset": None, "ended": False}
        c.conn.send_headers(ext, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
                                  (b":path", b"/chat"), (b":authority", b"reviews:9080")], end_stream=False)
        c._flush()
        await c.pump([ext])
        assert c.results[ext]["headers"][b":status"] == b"404"
        r = await c.get(b"/")   # the same h2c connection serves the next request
        assert r["headers"][b":status"] == b"200" and r["data"] in (b"v1", b"v2")
        lines = await h.http_lines(2)
        assert any(x["status"] == 404 and x["response_flags"] == "NR" for x in lines)
    finally:
        await h.close()
