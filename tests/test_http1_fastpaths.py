"""The HTTP/1.1 whole-response fast paths say exactly what the streamed path says (untimed):
``Responder.send_response`` writes the bytes ``send_head`` + ``send_body`` + ``end`` write, with the same
checks, in one write; ``Http1Response.complete_body`` hands over a response that arrived whole and
leaves the connection exactly as reading ``body_chunks`` to the end would."""

from __future__ import annotations

import pytest

from proxy.http1.client import forward_request
from proxy.http1.codec import RequestReader
from proxy.http1.server import DEFAULT_LIMITS, Http1Request, Responder, _Conn


class MemoryStream:
    """A ByteStream that records writes and serves scripted reads (None = EOF)."""

    def __init__(self, reads=()):
        self.writes: list[bytes] = []
        self.reads = list(reads)
        self.aborted = False
        self.remote_addr = self.local_addr = ("127.0.0.1", 1)

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    async def drain(self) -> None:
        pass

    async def read(self, n: int = 65536) -> bytes:
        return self.reads.pop(0) if self.reads else b""

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        pass

    def write_eof(self) -> None:
        pass


def _responder(request_bytes: bytes) -> tuple[Responder, MemoryStream]:
    stream = MemoryStream()
    conn = _Conn(stream, DEFAULT_LIMITS)
    head = RequestReader().feed(request_bytes)[0]
    conn.keep_alive = head.keep_alive
    return Responder(conn, Http1Request(head, conn)), stream


GET11 = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
CASES = [
    (GET11, 200, [(b"content-length", b"3"), (b"x-a", b"1")], b"v1\n"),           # length
    (GET11, 200, [(b"x-a", b"1"), (b"connection", b"x-a")], b"chunked body"),     # chunked, hop-by-hop dropped
    (GET11, 200, [], b""),                                                         # chunked, empty
    (b"GET / HTTP/1.0\r\n\r\n", 200, [(b"server", b"s")], b"eof body"),           # close-delimited
    (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n", 200, [(b"content-length", b"9")], b""),
    (GET11, 204, [(b"content-length", b"0")], b""),
    (GET11, 304, [(b"etag", b"x")], b""),
]


@pytest.mark.parametrize("request_bytes,status,headers,body", CASES)
async def test_send_response_writes_what_the_streamed_calls_write(request_bytes, status, headers, body):
    fast, fast_stream = _responder(request_bytes)
    await fast.send_response(status, headers, body)
    slow, slow_stream = _responder(request_bytes)
    await slow.send_head(status, headers)
    await slow.send_body(body)
    await slow.end()
    assert len(fast_stream.writes) == 1
    assert fast_stream.writes[0] == b"".join(slow_stream.writes)
    for attr in ("head_sent", "ended", "status", "body_bytes", "_mode", "_remaining"):
        assert getattr(fast, attr) == getattr(slow, attr), attr
    assert fast._conn.keep_alive == slow._conn.keep_alive


@pytest.mark.parametrize("body,message", [(b"toolong", "longer"), (b"ab", "short")])
async def test_send_response_refuses_a_body_that_contradicts_its_length(body, message):
    r, stream = _responder(GET11)
    with pytest.raises(RuntimeError, match=message):
        await r.send_response(200, [(b"content-length", b"3")], body)
    assert stream.aborted and not r._conn.keep_alive


RESPONSE = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


async def test_complete_body_of_a_response_that_arrived_whole():
    up = MemoryStream([RESPONSE])
    resp = await forward_request(up, b"GET", b"/", b"a", [])
    assert resp.complete_body() == b"hello"
    assert resp.done and resp.reusable
    assert [c async for c in resp.body_chunks()] == []   # nothing left to stream
    assert resp.complete_body() == b""


async def test_complete_body_declines_what_is_still_arriving_and_streaming_still_works():
    up = MemoryStream([RESPONSE[:-2], RESPONSE[-2:]])
    resp = await forward_request(up, b"GET", b"/", b"a", [])
    assert resp.complete_body() is None and not resp.done
    assert b"".join([c async for c in resp.body_chunks()]) == b"hello"
    assert resp.reusable


async def test_complete_body_declines_extra_bytes_after_the_response():
    up = MemoryStream([RESPONSE + b"HTTP/1.1 204 No Content\r\n\r\n"])
    resp = await forward_request(up, b"GET", b"/", b"a", [])
    assert resp.complete_body() is None
    assert b"".join([c async for c in resp.body_chunks()]) == b"hello"
    assert not resp.reusable   # as before the fast path: a connection with extra bytes is not pooled


async def test_complete_body_waits_for_a_request_body_still_being_sent():
    async def body():
        yield b"x"

    up = MemoryStream([RESPONSE])
    resp = await forward_request(up, b"POST", b"/", b"a", [], body())
    assert resp.complete_body() is None
    assert b"".join([c async for c in resp.body_chunks()]) == b"hello"


async def test_one_idle_timer_per_connection_still_times_out_each_wait():
    """The lazy idle timer: a request inside each idle period keeps the connection (the timer armed at
    the first wait fires, finds a later deadline and re-arms), silence for a whole period closes it."""
    import asyncio

    from hbone.stream import TcpStream
    from proxy.http1.server import Http1Limits
    from tests.test_http1_server import echo_handler, http1_server, read_until_close

    async with http1_server(echo_handler, limits=Http1Limits(idle_timeout_s=0.4, head_timeout_s=0.4)) as (port, _):
        client = await TcpStream.connect("127.0.0.1", port)
        for _ in range(3):   # 3 × 0.25 s > one idle period, each wait shorter than it
            await asyncio.sleep(0.25)
            client.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            reply = await client.read(65536)
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"GET /x 0:")
        assert await read_until_close(client) == b""   # then idle: closed quietly
        client = await TcpStream.connect("127.0.0.1", port)
        await asyncio.sleep(0.25)
        client.write(b"GET / HTTP/1.1\r\nHo")            # a head started late in the idle period
        assert (await read_until_close(client)).startswith(b"HTTP/1.1 408 Request Timeout\r\n")


async def test_a_started_head_gets_the_head_timeout_even_past_the_idle_deadline():
    """As with one asyncio.timeout per wait: the first bytes of a head replace the idle deadline by
    the head's own, also when that one is later (a slow but progressing head is not cut as idle)."""
    import asyncio

    from hbone.stream import TcpStream
    from proxy.http1.server import Http1Limits
    from tests.test_http1_server import echo_handler, http1_server

    async with http1_server(echo_handler, limits=Http1Limits(idle_timeout_s=0.3, head_timeout_s=1.0)) as (port, _):
        client = await TcpStream.connect("127.0.0.1", port)
        await asyncio.sleep(0.1)
        client.write(b"GET /slow HTTP/1.1\r\n")          # head started at ~0.1 s: deadline ~1.1 s
        await asyncio.sleep(0.5)                          # past the idle deadline (0.3 s)
        client.write(b"Host: a\r\n\r\n")
        reply = await client.read(65536)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"GET /slow 0:")


async def _served(stream, prefix: bytes, limits=DEFAULT_LIMITS) -> list[tuple[bytes, bytes]]:
    from proxy.http1.server import serve_http1
    seen = []

    async def handler(request, responder):
        body = b"".join([c async for c in request.body_chunks()])
        seen.append((request.target, body))
        await responder.send_local_reply(200, b"ok")

    await serve_http1(stream, handler, prefix=prefix, limits=limits)
    return seen


@pytest.mark.parametrize("cut", [0, 1, 5, 16, 40, 58, 59, 80, 100])
async def test_a_sniffed_prefix_is_served_as_if_replayed_by_a_prefixed_stream(cut):
    """serve_http1(prefix=) — what the waypoint does with PrefixedStream.unwrap — answers exactly what
    the same bytes through a PrefixedStream get: cut anywhere (mid request line, mid body, between
    pipelined requests), the rest read from the stream."""
    from hbone.stream import PrefixedStream
    wire = (b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n")
    direct = MemoryStream([wire[cut:]])
    wrapped_inner = MemoryStream([wire[cut:]])
    wrapped = PrefixedStream(wrapped_inner, wire[:cut])
    got = await _served(direct, wire[:cut])
    assert got == await _served(wrapped, b"") == [(b"/a", b"hello"), (b"/b", b""), (b"/c", b"")]
    assert direct.writes == wrapped_inner.writes


async def test_a_prefix_longer_than_one_read_is_parsed_one_read_at_a_time():
    """A prefix is consumed at most read_bytes at a time, as PrefixedStream.read(read_bytes) replayed it
    (the pipelining bound), and an over-long head in it still gets the codec's answer."""
    from proxy.http1.server import Http1Limits
    limits = Http1Limits(read_bytes=16)
    wire = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" * 3
    assert await _served(MemoryStream(), wire, limits) == [(b"/x", b"")] * 3
    stream = MemoryStream()
    await _served(stream, b"GET /" + b"a" * 70_000, Http1Limits(max_head_bytes=1024))
    assert stream.writes and stream.writes[0].startswith(b"HTTP/1.1 431")


async def test_prefixed_stream_unwrap_hands_over_the_prefix_once():
    from hbone.stream import PrefixedStream
    inner = MemoryStream([b"rest"])
    wrapped = PrefixedStream(inner, b"head")
    assert wrapped.unwrap() == (inner, b"head")
    assert wrapped.unwrap() == (inner, b"")
    assert await wrapped.read() == b"rest"   # nothing replayed after the hand-over


# ---- encode_forward_head: request_headers + encode_request_head in one pass ------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_NAMES = [b"host", b"user-agent", b"connection", b"keep-alive", b"te", b"expect", b"content-length",
          b"transfer-encoding", b"upgrade", b"x-a", b"x-b", b"proxy-connection", b"trailer"]
_VALUES = [b"", b"v", b"close", b"x-a, X-B", b"keep-alive, te", b"a\rb", b"a\nb", b"100-continue", b"1"]


@settings(max_examples=300, deadline=None)
@given(headers=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=8),
       method=st.sampled_from([b"GET", b"HEAD", b"DELETE"]), target=st.sampled_from([b"/", b"/p?q=1"]),
       authority=st.sampled_from([b"reviews:9080", b"r", b"a\r\nb"]))
def test_encode_forward_head_is_request_headers_then_encode(headers, method, target, authority):
    from proxy.http1.client import encode_forward_head, request_headers
    from proxy.http1.codec import encode_request_head
    try:
        want = encode_request_head(method, target, request_headers(headers, authority))
    except ValueError as err:
        want = ("ValueError", str(err))
    try:
        got = encode_forward_head(method, target, authority, headers)
    except ValueError as err:
        got = ("ValueError", str(err))
    assert got == want


async def test_forward_bodiless_sends_and_returns_what_forward_request_does():
    """The lean client call against forward_request on the same scripted upstream bytes (whole, split,
    with a 100 Continue first, closed early): the same request bytes, response fields and body."""
    import asyncio

    from proxy.http1.client import UpstreamReset, forward_bodiless
    from proxy.http1.codec import ResponseReader

    class Up:
        def __init__(self, reads):
            self.reads, self.written = list(reads), bytearray()

        def write(self, data):
            self.written += data

        async def drain(self):
            pass

        async def read(self, n=65536):
            await asyncio.sleep(0)
            return self.reads.pop(0) if self.reads else b""

    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Y: z\r\n\r\nhi"
    cases = [[ok], [ok[:10], ok[10:30], ok[30:]], [b"HTTP/1.1 100 Continue\r\n\r\n", ok], [b"HTTP/1.1 200"], [],
             [b"HTTP/1.1 200 OK\r\n\r\nuntil-eof"], [b"garbage\r\n\r\n"]]
    hdrs = [(b"user-agent", b"t"), (b"connection", b"x-a"), (b"x-a", b"1"), (b"x-b", b"2")]
    for reads in cases:
        outs = []
        for lean in (True, False):
            up = Up(reads)
            try:
                if lean:
                    resp = await forward_bodiless(up, ResponseReader(), b"GET", b"/", b"r", hdrs)
                else:
                    resp = await forward_request(up, b"GET", b"/", b"r", hdrs, reader=ResponseReader())
                body = b"".join([c async for c in resp.body_chunks()])
                outs.append((bytes(up.written), resp.head, body, resp.reusable))
            except (UpstreamReset, Exception) as err:  # noqa: BLE001 — the same type and text both ways
                outs.append((bytes(up.written), type(err).__name__, str(err),
                             getattr(err, "before_response", None)))
        assert outs[0] == outs[1], reads


def _two_step_head(status, headers, reason, method, version, keep_alive, expect_waiting):
    """The response head as _head_bytes built it before it encoded in one pass: a list of pairs, then
    encode_response_head (the reference of the twin test below)."""
    from proxy.http1.codec import encode_response_head
    from proxy.http1.server import _NO_BODY_STATUS, _RESPONSE_DROP
    out, length, at = [], None, 0
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            length, at = int(value), len(out)
        elif name not in _RESPONSE_DROP:
            out.append((name, value))
    if method == b"HEAD" or status in _NO_BODY_STATUS or status < 200:
        mode = "none"
        if length is not None and status != 204:
            out.insert(at, (b"content-length", b"%d" % length))
    elif length is not None:
        mode = "length"
        out.insert(at, (b"content-length", b"%d" % length))
    elif version == b"1.1":
        mode = "chunked"
        out.append((b"transfer-encoding", b"chunked"))
    else:
        mode, keep_alive = "eof", False
    if expect_waiting:
        keep_alive = False
    if not keep_alive:
        out.append((b"connection", b"close"))
    elif version == b"1.0":
        out.append((b"connection", b"keep-alive"))
    return encode_response_head(status, reason, out, version), mode, keep_alive


@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from([100, 101, 200, 204, 301, 304, 404, 503, 599, 999]),
       headers=st.lists(st.tuples(st.sampled_from([b"Content-Length", b"content-length", b"Server", b"x-a",
                                                   b"Connection", b"transfer-encoding", b"X-B", b"upgrade"]),
                                  st.sampled_from([b"0", b"12", b"v", b"a\nb", b"a\rb", b"close"])), max_size=6),
       reason=st.sampled_from([None, b"OK", b"", b"Bad\r\nX: y"]),
       method=st.sampled_from([b"GET", b"HEAD"]), version=st.sampled_from([b"1.1", b"1.0"]),
       keep_alive=st.booleans(), expect=st.booleans())
def test_head_bytes_encodes_what_the_two_step_encoding_did(status, headers, reason, method, version, keep_alive,
                                                             expect):
    from proxy.http1.codec import RequestHead
    if any(n.lower() == b"content-length" and not v.isdigit() for n, v in headers):
        return   # (int() of a non-number: the handler's bug, a ValueError either way)
    head = RequestHead(method, b"/", version, [], keep_alive, expect, False, 5 if expect else None, expect,
                       b"h")
    conn = _Conn(_Sink(), DEFAULT_LIMITS)
    conn.keep_alive = keep_alive
    request = Http1Request(head, conn)
    responder = Responder(conn, request)
    try:
        want = _two_step_head(status, headers, reason, method, version, keep_alive, expect)
    except ValueError as err:
        want = ("ValueError", str(err))
    try:
        got = (responder._head_bytes(status, headers, reason), responder._mode, conn.keep_alive)
    except ValueError as err:
        got = ("ValueError", str(err))
    assert got == want
    assert responder.head_sent and responder.status == status and conn.response_started


class _Sink:
    remote_addr = ("127.0.0.1", 1)

    def write(self, data):
        pass
