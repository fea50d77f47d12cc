"""Bounds on every HTTP/2 header block either way, and END_STREAM where the end is known.

1. Response heads and trailers from an HTTP/2 upstream count against the same limits as a downstream's heads
   and trailers (MAX_HEADERS fields, MAX_HEADER_LIST_BYTES). Envoy's HTTP/2 codec applies them to its client
   connections too (``ClientConnectionImpl`` takes ``max_response_headers_kb`` / ``max_response_headers_count``;
   ``ConnectionImpl::saveHeader`` over either resets the stream, details ``http2.too_many_headers``); the
   router then answers 502 ``UPE`` ``upstream_reset_before_response_started{protocol_error}`` when no head went
   downstream, or resets the downstream stream (``upstream_reset_after_response_started{protocol_error}``).
2. END_STREAM rides on the last DATA frame when the body is whole (a buffered request, a whole response), and on
   a streamed request's last chunk when its end is already known — never an extra empty DATA frame then.
3. Request trailers refused for size are logged as Envoy's downstream protocol error (``DPE``), not as a client
   reset, and counted with the h2c protocol errors.

Real loopback sockets, real h2 peers (the h2 library, not our code) recording the frames they get, in order."""

from __future__ import annotations

import functools

import h2.config
import h2.connection
import h2.events as ev
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hypothesis import HealthCheck, given, settings, strategies as st

from hbone.stream import TcpStream
from proxy.pipeline.h2c import (HEADER_LIST_HARD_BYTES, MAX_HEADER_LIST_BYTES, MAX_HEADERS, Data, Ended, H2Core,
                                Headers, Reset, Trailers)
from tests.h2c_peers import H2cServer, H2Upstream
from tests.test_request_trailers import (GRPC_HEADERS, greeter, send_trailers, start_grpc, stream_two_messages,
                                         trailers_of_size)
from tests.test_waypoint_l7 import SAY_HELLO, RawH2, grpc_frame, grpc_unframe, l7_harness
from tests.waypoint_harness import REVIEWS_VIP, until

PROTOCOL_ERROR = int(ErrorCodes.PROTOCOL_ERROR)
RESET_BEFORE = "upstream_reset_before_response_started{protocol_error}"
RESET_AFTER = "upstream_reset_after_response_started{protocol_error}"


def fields_of_size(size: int, first=(b":status", b"200")) -> list[tuple[bytes, bytes]]:
    """``first`` plus one field, the RFC 9113 §6.5.2 list size exactly ``size``."""
    rest = size - (len(first[0]) + len(first[1]) + 32) - len(b"x-big") - 32
    return [first, (b"x-big", b"v" * rest)]


def many_fields(n: int, first=(b":status", b"200")) -> list[tuple[bytes, bytes]]:
    """``n`` fields in all, ``first`` included."""
    return [first, *((b"x-f%d" % i, b"v") for i in range(n - 1))]


class WireH2(RawH2):
    """``RawH2`` that also keeps, per stream, the frames as h2 reported them, in order: ``"headers"``,
    ``("data", length, END_STREAM)``, ``("trailers", END_STREAM)``, ``"end"``, ``("reset", code)``."""

    def __init__(self, stream):
        super().__init__(stream)
        self.frames: dict[int, list] = {}
        receive = self.conn.receive_data

        def recording(data: bytes):
            events = receive(data)
            for e in events:
                log = self.frames.setdefault(getattr(e, "stream_id", 0), [])
                if isinstance(e, ev.ResponseReceived):
                    log.append("headers")
                elif isinstance(e, ev.DataReceived):
                    log.append(("data", len(e.data), e.stream_ended is not None))
                elif isinstance(e, ev.TrailersReceived):
                    log.append(("trailers", e.stream_ended is not None))
                elif isinstance(e, ev.StreamEnded):
                    log.append("end")
                elif isinstance(e, ev.StreamReset):
                    log.append(("reset", int(e.error_code)))
            return events

        self.conn.receive_data = recording


# ---------------------------------------------------------------------------------------------
# 1. The client core: response heads and trailers over the limits (sans-IO, an h2 server as the peer)


def _pair() -> tuple[H2Core, h2.connection.H2Connection]:
    core = H2Core(client_side=True)
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    server.receive_data(core.data_to_send())
    core.receive(server.data_to_send())
    server.receive_data(core.data_to_send())
    return core, server


def _request(core: H2Core, server, *, end: bool = True) -> int:
    sid = core.next_stream_id()
    core.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
                      end_stream=end)
    server.receive_data(core.data_to_send())
    return sid


def _answer(core: H2Core, server, sid: int, head, *, body: bytes = b"", trailers=None) -> list:
    # No Huffman coding for the big test blocks: hpack's Python coder is slow at 60 KiB, and HPACK allows both.
    server.encoder.encode = functools.partial(server.encoder.encode, huffman=False)
    server.send_headers(sid, head, end_stream=not body and trailers is None)
    if body:
        server.send_data(sid, body, end_stream=trailers is None)
    if trailers is not None:
        server.send_headers(sid, trailers, end_stream=True)
    return core.receive(server.data_to_send())


def _resets_sent(core: H2Core, server) -> dict[int, int]:
    return {e.stream_id: int(e.error_code) for e in server.receive_data(core.data_to_send())
            if isinstance(e, ev.StreamReset)}


def test_the_client_core_keeps_the_server_sides_hpack_hard_limit_and_advertised_list_size():
    """h2 sets its HPACK decoder's limit only from a changed local setting: both sides set it themselves."""
    for side in (True, False):
        core = H2Core(client_side=side)
        assert core._h2.decoder.max_header_list_size == HEADER_LIST_HARD_BYTES
        assert core._h2.local_settings[SettingCodes.MAX_HEADER_LIST_SIZE] == MAX_HEADER_LIST_BYTES


@pytest.mark.parametrize("head, over", [
    (many_fields(MAX_HEADERS), False),
    (many_fields(MAX_HEADERS + 1), True),
    (fields_of_size(MAX_HEADER_LIST_BYTES), False),
    (fields_of_size(MAX_HEADER_LIST_BYTES + 1), True),
])
def test_client_core_resets_a_response_head_over_the_limits(head, over):
    core, server = _pair()
    sid = _request(core, server, end=False)   # the request still open: the peer sees our reset as a reset
    events = _answer(core, server, sid, head, body=b"abc")
    if not over:
        assert [type(e) for e in events[:3]] == [Headers, Data, Ended]
        return
    # A Reset naming the limit (our own RST_STREAM PROTOCOL_ERROR), and nothing else for that stream: not the
    # head, not its body, not its end.
    assert [type(e) for e in events] == [Reset], events
    (reset,) = events
    assert reset.stream_id == sid and reset.code == PROTOCOL_ERROR
    assert "response headers" in reset.reason and ("limit 100" in reset.reason or "limit 61440" in reset.reason)
    assert _resets_sent(core, server) == {sid: PROTOCOL_ERROR}
    # The connection goes on: the next stream is answered.
    sid2 = _request(core, server)
    assert [type(e) for e in _answer(core, server, sid2, [(b":status", b"204")])] == [Headers, Ended]


@pytest.mark.parametrize("trailers, over", [
    (many_fields(MAX_HEADERS, (b"grpc-status", b"0")), False),
    (many_fields(MAX_HEADERS + 1, (b"grpc-status", b"0")), True),
    (fields_of_size(MAX_HEADER_LIST_BYTES + 1, (b"grpc-status", b"0")), True),
])
def test_client_core_resets_response_trailers_over_the_limits(trailers, over):
    core, server = _pair()
    sid = _request(core, server, end=False)   # the request still open: the peer sees our reset as a reset
    events = _answer(core, server, sid, [(b":status", b"200")], body=b"abc", trailers=trailers)
    kinds = [type(e) for e in events]
    if not over:
        assert kinds == [Headers, Data, Trailers, Ended]
        return
    assert kinds == [Headers, Data, Reset], events   # the body came; the trailers and the end did not
    assert events[-1].code == PROTOCOL_ERROR and "response trailers" in events[-1].reason
    assert _resets_sent(core, server) == {sid: PROTOCOL_ERROR}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(MAX_HEADERS - 5, MAX_HEADERS + 5), st.integers(0, 700), st.booleans())
def test_client_core_block_limit_is_exactly_the_model(n_fields, value_len, as_trailers):
    """Around both limits at once: a block passes if and only if it has at most MAX_HEADERS fields and an RFC
    9113 §6.5.2 size of at most MAX_HEADER_LIST_BYTES; otherwise the stream (only it) is reset, naming the limit."""
    first = (b"grpc-status", b"0") if as_trailers else (b":status", b"200")
    block = [first, *((b"x-f%03d" % i, b"v" * value_len) for i in range(n_fields - 1))]
    size = sum(len(n) + len(v) + 32 for n, v in block)
    within = n_fields <= MAX_HEADERS and size <= MAX_HEADER_LIST_BYTES
    core, server = _pair()
    sid = _request(core, server, end=False)
    if as_trailers:
        events = _answer(core, server, sid, [(b":status", b"200")], body=b"x", trailers=block)
    else:
        events = _answer(core, server, sid, block, body=b"x")
    refused = [e for e in events if isinstance(e, Reset)]
    if within:
        assert not refused and isinstance(events[-1], Ended)
    else:
        assert len(refused) == 1 and events[-1] is refused[0] and refused[0].code == PROTOCOL_ERROR
        limit = "limit 100" if n_fields > MAX_HEADERS else "limit 61440"
        assert limit in refused[0].reason
        assert _resets_sent(core, server) == {sid: PROTOCOL_ERROR}
    assert not core.closed   # a stream error, never the connection


# ---------------------------------------------------------------------------------------------
# 1. Through the waypoint: an HTTP/2 upstream answering with oversized heads and trailers


class BigUpstream(H2Upstream):
    """On both greeter pods (``H2Upstream``), answering each request as its HEADERS arrive, by path:
    ``/head-count`` / ``/head-size`` a head one over the limits (and no END_STREAM: its stream stays open, so
    our reset reaches it as a reset); ``/head-at`` a head exactly at both limits; ``/trailers`` a 200 head, a
    body and trailers one field over; ``/hard`` a head over the HPACK hard limit; the rest ``200 fine``."""

    huffman = False   # its heads of 60-120 KiB (see H2Upstream.huffman)

    def served_by_one_connection_per_pod(self) -> bool:
        pods = [c["pod"] for c in self.connections]
        return len(pods) == len(set(pods)) and all(c["goaway"] is None for c in self.connections)

    def on_request(self, conn, sid: int, r: dict) -> None:
        path = r["headers"][b":path"]
        if path.startswith(b"/head-count"):
            conn.send_headers(sid, many_fields(MAX_HEADERS + 1))
        elif path.startswith(b"/head-size"):
            conn.send_headers(sid, fields_of_size(MAX_HEADER_LIST_BYTES + 1))
        elif path.startswith(b"/head-at"):
            conn.send_headers(sid, many_fields(MAX_HEADERS))
            conn.send_data(sid, b"at the limit", end_stream=True)
        elif path.startswith(b"/trailers"):
            conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            conn.send_data(sid, grpc_frame(b"partial"))
            conn.send_headers(sid, many_fields(MAX_HEADERS + 1, (b"grpc-status", b"0")), end_stream=True)
        elif path.startswith(b"/hard"):
            conn.send_headers(sid, fields_of_size(HEADER_LIST_HARD_BYTES + 1))
        else:
            conn.send_headers(sid, [(b":status", b"200")])
            conn.send_data(sid, b"fine", end_stream=True)


def _protocol_errors(h, kind: str) -> float:
    for line in h.metrics.exposition().decode().splitlines():
        if line.startswith(f'hbone_h2_protocol_errors_total{{kind="{kind}"}} '):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _still_served(c: RawH2) -> None:
    """Four more requests on the same tunnel are answered (the waypoint spreads them over both pods)."""
    for _ in range(4):
        assert (await c.get(b"/after", authority=b"greeter:9090"))["data"] == b"fine"


async def _lines_for(h, path: str, n: int = 1) -> list[dict]:
    lines = await h.http_lines(n, path=path)
    assert len(lines) >= n, f"{n} access-log lines for {path}: {lines}"
    return lines


async def test_an_oversized_upstream_response_head_is_a_502_upe_and_the_waypoint_keeps_serving(tmp_path,
                                                                                                  loopback_ip):
    h, up, c = await greeter(tmp_path, loopback_ip, BigUpstream)
    try:
        for path, limit in ((b"/head-count", "limit 100"), (b"/head-size", "limit 61440")):
            r = await c.get(path, authority=b"greeter:9090")
            assert r["headers"][b":status"] == b"502", r
            assert r["data"] == (b"upstream connect error or disconnect/reset before headers. "
                                 b"reset reason: protocol error")
            # The upstream's stream was reset by us (PROTOCOL_ERROR), never left open.
            await until(lambda: up.requests[-1]["reset"] is not None)
            assert up.requests[-1]["reset"] == PROTOCOL_ERROR
            (line,) = await _lines_for(h, path.decode())
            assert line["status"] == 502 and line["response_flags"] == "UPE"
            assert line["response_code_details"] == RESET_BEFORE
            assert "response headers" in line["error"] and limit in line["error"]
        assert _protocol_errors(h, "h2c_upstream_response_headers_too_large") == 2
        # At both limits the head passes. The same upstream connection served all of it (a stream error).
        r = await c.get(b"/head-at", authority=b"greeter:9090")
        assert r["headers"][b":status"] == b"200" and r["data"] == b"at the limit"
        assert len(r["headers"]) == MAX_HEADERS
        await _still_served(c)
        assert up.served_by_one_connection_per_pod()
    finally:
        await h.close()


async def test_an_oversized_upstream_head_to_a_grpc_client_is_unavailable(tmp_path, loopback_ip):
    """A gRPC request gets Envoy's gRPC local reply for the 502: trailers-only, grpc-status 14 UNAVAILABLE."""
    h, up, c = await greeter(tmp_path, loopback_ip, BigUpstream)
    try:
        r = await c.get(b"/head-count/grpc", method=b"POST", authority=b"greeter:9090", headers=GRPC_HEADERS,
                        body=grpc_frame(b"hi"))
        assert r["headers"][b":status"] == b"200" and r["headers"][b"grpc-status"] == b"14"
        assert b"protocol error" in r["headers"][b"grpc-message"]
        (line,) = await _lines_for(h, "/head-count/grpc")
        assert line["response_flags"] == "UPE" and line["response_code_details"] == RESET_BEFORE
    finally:
        await h.close()


async def test_oversized_upstream_trailers_reset_the_downstream_stream_after_the_head(tmp_path, loopback_ip):
    """The head and the body went downstream already: the client's stream is reset (never ended as if
    complete, never given trailers), the upstream's too; the log says 200 UPE with the limit."""
    h, up, c = await greeter(tmp_path, loopback_ip, BigUpstream)
    try:
        sid = c.start(b"/trailers", method=b"POST", authority=b"greeter:9090", headers=GRPC_HEADERS,
                      body=grpc_frame(b"one"), end=False)
        await c.pump([sid])
        r = c.results[sid]
        assert r["headers"][b":status"] == b"200" and grpc_unframe(r["data"]) == [b"partial"]
        assert r["reset"] is not None and r["trailers"] is None and not r["ended"]
        await until(lambda: up.requests and up.requests[0]["reset"] is not None)
        assert up.requests[0]["reset"] == PROTOCOL_ERROR
        (line,) = await _lines_for(h, "/trailers")
        assert line["status"] == 200 and line["response_flags"] == "UPE"
        assert line["response_code_details"] == RESET_AFTER
        assert "response trailers" in line["error"] and "limit 100" in line["error"]
        assert _protocol_errors(h, "h2c_upstream_response_trailers_too_large") == 1
        # Same tunnel, same upstream connections: served.
        await _still_served(c)
        assert up.served_by_one_connection_per_pod()
    finally:
        await h.close()


async def test_a_head_over_the_hpack_hard_limit_ends_only_that_upstream_connection(tmp_path, loopback_ip):
    """Past HEADER_LIST_HARD_BYTES h2's decoder stops (an HPACK bomb): GOAWAY ENHANCE_YOUR_CALM to the upstream,
    the request fails as the connection's streams do (503 UC, the error naming the limit), that connection is
    closed, and the next requests are served (on a new connection where needed)."""
    h, up, c = await greeter(tmp_path, loopback_ip, BigUpstream)
    try:
        r = await c.get(b"/hard", authority=b"greeter:9090")
        assert r["headers"][b":status"] == b"503"
        (line,) = await _lines_for(h, "/hard")
        assert "UC" in line["response_flags"] and "header_list_too_large" in line["error"]
        await until(lambda: up.connections[0]["closed"])
        await _still_served(c)
        assert len(up.connections) >= 2 and not any(x["closed"] for x in up.connections[1:])
    finally:
        await h.close()


# ---------------------------------------------------------------------------------------------
# 2. END_STREAM on the last DATA frame: requests to an HTTP/2 upstream


async def test_a_buffered_request_body_ends_on_its_last_data_frame(tmp_path, loopback_ip):
    h, rec, c = await greeter(tmp_path, loopback_ip, client=WireH2)
    try:
        r = await c.get(b"/small", method=b"POST", authority=b"greeter:9090", body=b"abc")
        assert r["data"] == b"got 3"
        assert rec.requests[0]["events"] == ["headers", ("data", 3, True), "end"]
        # Over the upstream's initial window (65 535): several frames, waiting for WINDOW_UPDATEs; END_STREAM
        # is on the last of them, and no frame is empty.
        sid = c.start(b"/large", method=b"POST", authority=b"greeter:9090", end=False)
        await c.upload(sid, b"y" * 100_000)
        await c.pump([sid])
        assert c.results[sid]["data"] == b"got 100000"
        events = rec.requests[1]["events"]
        assert events[0] == "headers" and events[-1] == "end"
        data = events[1:-1]
        assert sum(e[1] for e in data) == 100_000 and all(e[0] == "data" and e[1] > 0 for e in data)
        assert [e[2] for e in data] == [False] * (len(data) - 1) + [True]
    finally:
        await h.close()


async def test_a_streamed_grpc_body_ends_on_its_last_message_and_each_message_still_goes_at_once(tmp_path,
                                                                                                   loopback_ip):
    h, rec, c = await greeter(tmp_path, loopback_ip, client=WireH2)
    try:
        sid = await stream_two_messages(c, rec)
        # The last message with END_STREAM on its DATA frame: the upstream gets it the same way.
        c.conn.send_data(sid, grpc_frame(b"three"), end_stream=True)
        c._flush()
        await c.pump([sid])
        assert grpc_unframe(c.results[sid]["data"]) == [b"got 3 messages"]
        events = rec.requests[0]["events"]
        assert events[0] == "headers" and events[-1] == "end"
        assert events[1:-1] == [("data", len(grpc_frame(b"one")), False), ("data", len(grpc_frame(b"two")), False),
                                ("data", len(grpc_frame(b"three")), True)]
        # An end that comes later, on its own (an empty DATA frame with END_STREAM): the upstream gets the same
        # — the message was forwarded before its end was known.
        sid = start_grpc(c, b"solo")
        await until(lambda: len(rec.requests) == 2 and rec.requests[1]["data"] == grpc_frame(b"solo"))
        c.send(sid, b"", end=True)
        await c.pump([sid])
        assert rec.requests[1]["events"][-2:] == [("data", 0, True), "end"]
        assert c.results[sid]["ended"]
    finally:
        await h.close()


async def test_a_body_past_the_buffer_limit_still_ends_on_its_last_data_frame(tmp_path, loopback_ip):
    """Not gRPC, over the buffer limit: streamed (read part, then the rest); its end is known with the last chunk."""
    h, rec, c = await greeter(tmp_path, loopback_ip, client=WireH2)
    try:
        h.waypoint.http.buffer_limit = 1000   # (the limit is a pipeline parameter; small here to stay fast)
        sid = c.start(b"/stream", method=b"POST", authority=b"greeter:9090", end=False)
        c.send(sid, b"a" * 1500, end=False)
        c.send(sid, b"b" * 500, end=True)
        await c.pump([sid])
        assert c.results[sid]["data"] == b"got 2000"
        events = rec.requests[0]["events"]
        assert events[-1] == "end" and events[-2][0] == "data" and events[-2][1] > 0 and events[-2][2]
        assert all(e[1] > 0 for e in events[1:-1])
    finally:
        await h.close()


# ---------------------------------------------------------------------------------------------
# 2. END_STREAM on the last DATA frame: responses to an h2c client


class _Server(H2cServer):
    """``serve_h2c`` on loopback with a handler answering by path through the ``H2Responder`` API."""

    async def handle(self, request, responder) -> None:
        async for _ in request.body_chunks():
            pass
        path = request.target
        if path == b"/whole":
            await responder.send_response(200, [(b"x-a", b"1")], b"whole body")
        elif path == b"/whole-large":
            await responder.send_response(200, [], b"z" * 100_000)
        elif path == b"/whole-empty":
            await responder.send_response(204, [], b"")
        else:
            await responder.send_local_reply(404, b"no such thing")


async def test_whole_responses_end_on_their_data_frame(loopback_ip):
    srv = await _Server().start(loopback_ip())
    c = WireH2(await TcpStream.connect(*srv.addr))
    try:
        r = await c.get(b"/whole")
        assert r["headers"][b":status"] == b"200" and r["headers"][b"x-a"] == b"1" and r["data"] == b"whole body"
        sid = max(c.results)
        assert c.frames[sid] == ["headers", ("data", 10, True), "end"]
        r = await c.get(b"/missing")   # a local reply with a body
        assert r["headers"][b":status"] == b"404" and r["data"] == b"no such thing"
        assert c.frames[max(c.results)] == ["headers", ("data", 13, True), "end"]
        r = await c.get(b"/whole-empty")
        assert r["headers"][b":status"] == b"204" and r["data"] == b""
        assert c.frames[max(c.results)] == ["headers", "end"]
        r = await c.get(b"/whole-large", method=b"HEAD")   # HEAD: the head alone, ended
        assert r["headers"][b":status"] == b"200" and r["data"] == b""
        assert c.frames[max(c.results)] == ["headers", "end"]
        r = await c.get(b"/whole-large")   # past the client's window: several frames, END_STREAM on the last
        assert r["data"] == b"z" * 100_000
        data = c.frames[max(c.results)][1:-1]
        assert all(e[0] == "data" and e[1] > 0 for e in data)
        assert [e[2] for e in data] == [False] * (len(data) - 1) + [True]
    finally:
        c.stream.close()
        await srv.close()


async def test_an_http1_upstreams_small_response_reaches_an_h2c_client_in_two_frames(tmp_path, loopback_ip):
    """reviews is an HTTP/1.1 upstream: its whole small answer goes to the h2c client as HEADERS + one DATA
    frame with END_STREAM (``H2Responder.send_response``), not HEADERS, DATA, empty DATA."""
    h, _, _ = await l7_harness(tmp_path, loopback_ip)
    try:
        c = WireH2(await h.client().tunnel(f"{REVIEWS_VIP}:9080"))
        r = await c.get(b"/reviews/1")
        assert r["headers"][b":status"] == b"200" and r["data"]
        frames = c.frames[max(c.results)]
        assert frames == ["headers", ("data", len(r["data"]), True), "end"]
    finally:
        await h.close()


# ---------------------------------------------------------------------------------------------
# 3. Request trailers refused for size: a downstream protocol error, counted


async def test_oversized_request_trailers_are_logged_dpe_with_the_limit_and_counted(tmp_path, loopback_ip):
    h, rec, c = await greeter(tmp_path, loopback_ip, client=WireH2)
    try:
        sid = start_grpc(c, b"one")
        await until(lambda: rec.requests and rec.requests[0]["data"])
        send_trailers(c, sid, trailers_of_size(MAX_HEADER_LIST_BYTES + 1))
        await c.pump([sid])
        assert c.results[sid]["reset"] == ErrorCodes.PROTOCOL_ERROR
        (line,) = await _lines_for(h, SAY_HELLO.decode())
        assert line["status"] == 0 and line["response_flags"] == "DPE"
        assert line["response_code_details"] == "http2.too_many_headers"
        assert "request trailers" in line["error"] and "limit 61440" in line["error"]
        assert _protocol_errors(h, "h2c_request_trailers_too_large") == 1
        # A client's own reset stays DR.
        sid = start_grpc(c, b"two")
        await until(lambda: len(rec.requests) == 2 and rec.requests[1]["data"])
        c.reset(sid)
        lines = await _lines_for(h, SAY_HELLO.decode(), 2)
        assert lines[1]["response_flags"] == "DR"
        assert _protocol_errors(h, "h2c_request_trailers_too_large") == 1
    finally:
        await h.close()
