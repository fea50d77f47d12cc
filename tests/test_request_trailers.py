"""Request trailers through the waypoint, end to end over real HBONE tunnels (and, for the limits, the h2c
server alone on loopback).

Envoy's router forwards a downstream's request trailers on the upstream stream (``decodeTrailers`` →
``encodeTrailers``), keeps them for a retry and copies them to a shadow; its HTTP/1 codec drops them
unless ``enable_trailers`` is set, which Istio does not set. The upstreams here are real h2 peers (the h2
library directly, not our code) that record each request's frames in order, and a raw HTTP/1.1 server that
records the bytes it was sent."""

from __future__ import annotations

import asyncio

from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame

from proxy.pipeline.h2c import HEADER_LIST_HARD_BYTES, MAX_HEADER_LIST_BYTES, MAX_HEADERS, h2_trailer_fields
from tests.h2c_peers import (H2Upstream, RawClient, header_list_too_large_goaway, server,  # noqa: F401 — the fixture
                             still_serving)
from tests.test_waypoint_l7 import GREETER_VIP, SAY_HELLO, RawH2, grpc_frame, grpc_unframe, l7_harness
from tests.waypoint_harness import REVIEWS_VIP, config_docs, destination_rule, until, virtual_service

GRPC_HEADERS = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]

ROUTES = config_docs(virtual_service("greeter", """
    - match: [{uri: {prefix: /retry}}]
      retries: {attempts: 2, retryOn: 5xx}
      route: [{destination: {host: greeter}}]
    - match: [{uri: {prefix: /mirror}}]
      route: [{destination: {host: greeter, subset: v1}}]
      mirror: {host: greeter, subset: v2}
      mirrorPercentage: {value: 100}
    - route: [{destination: {host: greeter}}]
"""), destination_rule("greeter", subsets=("v1", "v2")))


# ---------------------------------------------------------------------------------------------
# Upstreams that record what reached them


class H2Recorder(H2Upstream):
    """On every greeter pod, recording each request's frames in order (``H2Upstream``). A path starting
    ``/retry`` is answered 503 the first time; a gRPC request gets one message back and ``grpc-status: 0``
    trailers; the rest ``200 got <n>``. Each answer goes once the request has ended."""

    def __init__(self):
        super().__init__()
        self.failed_once = False

    def on_end(self, conn, sid: int, r: dict) -> None:
        path = r["headers"][b":path"]
        if path.startswith(b"/retry") and not self.failed_once:
            self.failed_once = True
            conn.send_headers(sid, [(b":status", b"503"), (b"content-length", b"0")], end_stream=True)
        elif r["headers"].get(b"content-type") == b"application/grpc":
            conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            conn.send_data(sid, grpc_frame(b"got %d messages" % len(grpc_unframe(r["data"]))))
            conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        else:
            conn.send_headers(sid, [(b":status", b"200")])
            conn.send_data(sid, b"got %d" % len(r["data"]), end_stream=True)


class Http1Recorder:
    """A raw HTTP/1.1 server on every reviews pod: records each request's bytes as sent (head, framing,
    body, any trailer section) and answers ``200 ok``."""

    def __init__(self):
        self.requests: list[bytes] = []

    async def install(self, h) -> "Http1Recorder":
        for ip, pod in h.pods.items():
            if pod.version in ("v1", "v2", "v3"):
                await pod.stop_backend()
                pod.backend = await asyncio.start_server(self._serve, ip, 9080)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
            fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
            if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
                rest = b""
                while not (rest.endswith(b"\r\n\r\n") and b"\r\n0\r\n" in b"\r\n" + rest):
                    rest += await reader.read(65536)
            else:
                rest = await reader.readexactly(int(fields.get(b"content-length", b"0")))
            self.requests.append(head + rest)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def assert_one_request_without_trailers(self, body: bytes) -> None:
        """One request came, its ``body`` framed by content-length, and nothing of the client's trailer
        field (``x-trailer-field: dropped``)."""
        (sent,) = self.requests
        head, _, got = sent.partition(b"\r\n\r\n")
        assert got == body and b"content-length: %d" % len(body) in head.lower()
        assert b"x-trailer-field" not in sent.lower() and b"dropped" not in sent


def start_grpc(c: RawH2, message: bytes) -> int:
    """A gRPC call to greeter, opened with one message; its stream stays open."""
    return c.start(SAY_HELLO, method=b"POST", authority=b"greeter:9090", headers=GRPC_HEADERS,
                   body=grpc_frame(message), end=False)


async def stream_two_messages(c: RawH2, rec: H2Recorder) -> int:
    """A gRPC call streamed: each of its two messages reaches the upstream before the client sends the next.
    Its stream stays open."""
    sid = start_grpc(c, b"one")
    await until(lambda: rec.requests and rec.requests[0]["data"] == grpc_frame(b"one"))
    c.send(sid, grpc_frame(b"two"), end=False)
    await until(lambda: rec.requests[0]["data"] == grpc_frame(b"one") + grpc_frame(b"two"))
    return sid


def send_trailers(c: RawH2, sid: int, fields) -> None:
    c.conn.send_headers(sid, list(fields), end_stream=True)
    c._flush()


async def greeter(tmp_path, loopback_ip, upstream: type[H2Upstream] = H2Recorder, client: type[RawH2] = RawH2):
    """The L7 harness routed by ROUTES, ``upstream`` on both greeter pods, and a ``client`` h2c connection
    over a tunnel to greeter: (harness, upstream, client)."""
    h, _, ips = await l7_harness(tmp_path, loopback_ip, ROUTES)
    up = await upstream().install(h, ips)
    return h, up, client(await h.client().tunnel(f"{GREETER_VIP}:9090"))


# ---------------------------------------------------------------------------------------------
# h2c downstream → HTTP/2 upstream: forwarded


async def test_grpc_client_streaming_trailers_reach_the_upstream_after_all_data(tmp_path, loopback_ip):
    h, rec, c = await greeter(tmp_path, loopback_ip)
    try:
        sid = await stream_two_messages(c, rec)
        send_trailers(c, sid, [(b"x-checksum", b"c0ffee"), (b"x-count", b"2")])
        await c.pump([sid])
        r = c.results[sid]
        assert r["headers"][b":status"] == b"200" and r["trailers"] == {b"grpc-status": b"0"}
        assert grpc_unframe(r["data"]) == [b"got 2 messages"]
        up = rec.requests[0]
        assert up["trailers"] == [(b"x-checksum", b"c0ffee"), (b"x-count", b"2")]
        # The trailers are the last frame (HEADERS with END_STREAM), after every DATA frame; no DATA frame
        # carried END_STREAM (an empty END_STREAM DATA before them would have ended the request there).
        assert up["events"][0] == "headers" and up["events"][-2:] == [("trailers", True), "end"]
        data = up["events"][1:-2]
        assert data and all(e[0] == "data" and e[1] > 0 and not e[2] for e in data)
        assert up["data"] == grpc_frame(b"one") + grpc_frame(b"two")
    finally:
        await h.close()


async def test_plain_h2c_body_and_trailers_to_an_http2_declared_upstream(tmp_path, loopback_ip):
    """Not gRPC: the body is buffered (replayable); the trailers follow it upstream all the same."""
    h, rec, c = await greeter(tmp_path, loopback_ip)
    try:
        body = b"x" * 70000   # over the client's initial window: several DATA frames, buffered here
        sid = c.start(b"/upload", method=b"POST", authority=b"greeter:9090",
                      headers=[(b"content-type", b"text/plain")], end=False)
        await c.upload(sid, body, end_stream=False)
        send_trailers(c, sid, [(b"x-digest", b"sha-256=abc")])
        await c.pump([sid])
        assert c.results[sid]["headers"][b":status"] == b"200" and c.results[sid]["data"] == b"got 70000"
        up = rec.requests[0]
        assert up["data"] == body and up["trailers"] == [(b"x-digest", b"sha-256=abc")]
        assert up["events"][-2:] == [("trailers", True), "end"]
        assert not any(e[2] for e in up["events"][1:-2])
        # A request without trailers still ends with a DATA frame carrying END_STREAM, as before.
        r = await c.get(b"/plain", method=b"POST", authority=b"greeter:9090", body=b"abc")
        assert r["data"] == b"got 3"
        plain = rec.requests[1]
        assert plain["trailers"] is None and plain["data"] == b"abc"
        assert plain["events"][-1] == "end" and plain["events"][-2][0] == "data" and plain["events"][-2][2]
    finally:
        await h.close()


async def test_a_retry_sends_the_body_and_the_trailers_again(tmp_path, loopback_ip):
    h, rec, c = await greeter(tmp_path, loopback_ip)
    try:
        sid = c.start(b"/retry", method=b"POST", authority=b"greeter:9090", body=b"payload", end=False)
        send_trailers(c, sid, [(b"x-trailer", b"t1")])
        await c.pump([sid])
        assert c.results[sid]["headers"][b":status"] == b"200" and c.results[sid]["data"] == b"got 7"
        assert len(rec.requests) == 2   # the 503, then the retry
        for up in rec.requests:
            assert up["data"] == b"payload" and up["trailers"] == [(b"x-trailer", b"t1")]
            assert up["events"][-2:] == [("trailers", True), "end"]
        lines = await h.http_lines(1)
        assert lines[0]["attempts"] == 2 and lines[0]["status"] == 200
    finally:
        await h.close()


async def test_a_mirror_copy_carries_the_trailers(tmp_path, loopback_ip):
    """Envoy's router sends the shadow the downstream's trailers too (``decodeTrailers``: each shadow stream
    ``captureAndSendTrailers`` a copy; before streaming shadows, the shadow message got ``trailers(...)``)."""
    h, rec, c = await greeter(tmp_path, loopback_ip)
    try:
        sid = c.start(b"/mirror", method=b"POST", authority=b"greeter:9090", body=b"copy me", end=False)
        send_trailers(c, sid, [(b"x-trailer", b"m")])
        await c.pump([sid])
        assert c.results[sid]["data"] == b"got 7"
        await until(lambda: len(rec.requests) == 2 and all(r["ended"] for r in rec.requests))
        shadow = next(r for r in rec.requests if r["headers"][b":authority"] == b"greeter-shadow:9090")
        main = next(r for r in rec.requests if r is not shadow)
        for up in (main, shadow):
            assert up["data"] == b"copy me" and up["trailers"] == [(b"x-trailer", b"m")]
    finally:
        await h.close()


def test_trailer_fields_sent_upstream_drop_connection_specific_and_pseudo_fields():
    fields = [(b"X-Sum", b"1"), (b"connection", b"close"), (b"transfer-encoding", b"chunked"), (b":path", b"/"),
              (b"grpc-status", b"0"), (b"keep-alive", b"1"), (b"host", b"h"), (b"upgrade", b"x")]
    assert h2_trailer_fields(fields) == [(b"x-sum", b"1"), (b"grpc-status", b"0")]
    assert h2_trailer_fields(()) == []


# ---------------------------------------------------------------------------------------------
# Toward HTTP/1.1 upstreams: dropped (Envoy's HTTP/1 codec without enable_trailers)


async def test_h2c_request_trailers_are_dropped_toward_an_http1_upstream(tmp_path, loopback_ip):
    h, _, _ = await l7_harness(tmp_path, loopback_ip)
    try:
        rec = await Http1Recorder().install(h)
        c = RawH2(await h.client().tunnel(f"{REVIEWS_VIP}:9080"))   # reviews: appProtocol http
        sid = c.start(b"/up", method=b"POST", body=b"hello ", end=False)
        c.send(sid, b"world", end=False)
        send_trailers(c, sid, [(b"x-trailer-field", b"dropped")])
        await c.pump([sid])
        assert c.results[sid]["headers"][b":status"] == b"200" and c.results[sid]["data"] == b"ok"
        rec.assert_one_request_without_trailers(b"hello world")
    finally:
        await h.close()


async def test_http1_chunked_request_trailers_are_dropped_and_the_request_works(tmp_path, loopback_ip):
    h, _, _ = await l7_harness(tmp_path, loopback_ip)
    try:
        rec = await Http1Recorder().install(h)
        s = await h.client().tunnel(f"{REVIEWS_VIP}:9080")
        s.write(b"POST /chunked HTTP/1.1\r\nhost: reviews:9080\r\ntransfer-encoding: chunked\r\n"
                b"trailer: x-trailer-field\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer-field: dropped\r\n\r\n")
        got = b""
        async with asyncio.timeout(5):
            while not got.endswith(b"ok"):
                got += await s.read()
        assert got.startswith(b"HTTP/1.1 200")
        rec.assert_one_request_without_trailers(b"hello world")
    finally:
        await h.close()


# ---------------------------------------------------------------------------------------------
# Malformed and oversized trailers


async def test_pseudo_header_in_trailers_is_a_protocol_error_and_the_upstream_sees_a_reset(tmp_path, loopback_ip):
    """RFC 9113 §8.1: pseudo-header fields in trailers make the request malformed. h2 raises it as a
    connection error: GOAWAY PROTOCOL_ERROR — Envoy's default too (``override_stream_error_on_invalid_http_message``
    unset: "the whole HTTP/2 connection is terminated upon receiving invalid HEADERS frame"). The request
    already streaming upstream is reset there, never completed; other tunnels and new ones are served."""
    h, rec, c = await greeter(tmp_path, loopback_ip)
    try:
        other = RawH2(await h.client().tunnel(f"{GREETER_VIP}:9090"))
        sid = start_grpc(c, b"one")
        await until(lambda: rec.requests and rec.requests[0]["data"])
        c.conn.config.validate_outbound_headers = False   # our h2 client would refuse to send it
        send_trailers(c, sid, [(b":path", b"/other"), (b"x-trailer", b"t")])
        await c.pump([sid])
        assert c.goaway is not None and c.goaway.error_code == ErrorCodes.PROTOCOL_ERROR
        await until(lambda: rec.requests[0]["reset"] is not None)
        assert rec.requests[0]["trailers"] is None and not rec.requests[0]["ended"]
        r = await other.get(b"/after", method=b"POST", authority=b"greeter:9090", body=b"ab")
        assert r["headers"][b":status"] == b"200" and r["data"] == b"got 2"
        again = RawH2(await h.client().tunnel(f"{GREETER_VIP}:9090"))
        assert (await again.get(b"/again", authority=b"greeter:9090"))["headers"][b":status"] == b"200"
    finally:
        await h.close()


async def test_oversized_trailers_reset_the_stream_and_its_upstream_request(tmp_path, loopback_ip):
    """Over the head's limit the client's stream is reset (PROTOCOL_ERROR); the gRPC request already streaming
    upstream is reset there (never completed without its trailers), and the same h2c connection goes on."""
    h, rec, c = await greeter(tmp_path, loopback_ip)
    try:
        sid = start_grpc(c, b"one")
        await until(lambda: rec.requests and rec.requests[0]["data"])
        send_trailers(c, sid, trailers_of_size(MAX_HEADER_LIST_BYTES + 1))
        await c.pump([sid])
        assert c.results[sid]["reset"] == ErrorCodes.PROTOCOL_ERROR and c.goaway is None
        await until(lambda: rec.requests[0]["reset"] is not None)
        assert rec.requests[0]["trailers"] is None and not rec.requests[0]["ended"]
        sid = start_grpc(c, b"two")
        send_trailers(c, sid, [(b"x-ok", b"1")])
        await c.pump([sid])
        assert c.results[sid]["trailers"] == {b"grpc-status": b"0"}
        assert rec.requests[1]["trailers"] == [(b"x-ok", b"1")]
    finally:
        await h.close()


def trailers_of_size(size: int) -> list[tuple[bytes, bytes]]:
    """Trailer fields whose RFC 9113 §6.5.2 list size is exactly ``size``."""
    return [(b"x-big", b"v" * (size - len(b"x-big") - 32))]


async def trailed_request(c: RawClient, trailers) -> int:
    """A POST with a 3-byte body, then ``trailers`` (HEADERS + CONTINUATIONs, END_STREAM)."""
    sid, head = c.headers([(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/t")],
                          end_stream=False)
    _, tail = c.headers(trailers, sid=sid)
    c.send(*head, DataFrame(sid, data=b"abc"), *tail)
    await c.pump(lambda: c.done(sid) or c.goaway is not None)
    return sid


async def test_trailer_list_limits_reset_the_stream_and_the_connection_goes_on(server):
    """Trailers count against the head's limits (Envoy max_request_headers_kb / max_headers_count, per
    block): at the limit served, one over it RST_STREAM PROTOCOL_ERROR on that stream (RFC 9113 §8.1.1:
    malformed; the response may already be under way, so no 431), and the connection keeps serving."""
    c = await RawClient.open(server.addr)
    try:
        sid = await trailed_request(c, trailers_of_size(MAX_HEADER_LIST_BYTES))
        assert c.heads[sid][b":status"] == b"200" and c.data[sid] == b"ok /t"
        sid = await trailed_request(c, trailers_of_size(MAX_HEADER_LIST_BYTES + 1))
        assert c.resets[sid] == ErrorCodes.PROTOCOL_ERROR and sid not in c.heads and c.goaway is None
        sid = await trailed_request(c, [(b"x-t%d" % i, b"v") for i in range(MAX_HEADERS)])
        assert c.heads[sid][b":status"] == b"200"
        sid = await trailed_request(c, [(b"x-t%d" % i, b"v") for i in range(MAX_HEADERS + 1)])
        assert c.resets[sid] == ErrorCodes.PROTOCOL_ERROR and c.goaway is None
        assert (await c.get(b"/next"))[0] == 200
        # Over the HPACK decoder's hard limit (h2's DenialOfServiceError): GOAWAY ENHANCE_YOUR_CALM, this
        # connection only.
        await trailed_request(c, trailers_of_size(HEADER_LIST_HARD_BYTES + 1))
        await header_list_too_large_goaway(c, server)
    finally:
        c.close()


async def test_pseudo_header_in_trailers_is_goaway_protocol_error_and_the_listener_serves(server):
    bystander = await RawClient.open(server.addr)
    c = await RawClient.open(server.addr)
    try:
        await trailed_request(c, [(b":status", b"200")])
        code, _ = await c.closed_by_server()
        assert code == ErrorCodes.PROTOCOL_ERROR
        await still_serving(server, bystander)
    finally:
        c.close()
        bystander.close()
