"""Protocol sniffing: the pure classifier (whole, byte by byte, trailing data, hypothesis) and the
bounded-peek shell over real loopback sockets."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from hbone.stream import TcpStream
from proxy.sniff import H2C_PREFACE, HTTP1_METHODS, SNIFF_MAX_BYTES, classify, sniff

HTTP_CASES = [
    b"GET / HTTP/1.1\r\n",
    b"GET /reviews/1?x=y HTTP/1.1\r\nHost: reviews\r\n\r\n",
    b"POST http://a.example/b HTTP/1.0\r\n",
    b"OPTIONS * HTTP/1.1\r\n",
    b"M-SEARCH * HTTP/1.1\r\n",
    b"VERSION-CONTROL /x HTTP/1.1\r\n",
]
TCP_CASES = [
    b"\x16\x03\x01\x02\x00\x01",            # TLS ClientHello
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"*1\r\n$4\r\nPING\r\n",                # Redis
    b"get / HTTP/1.1\r\n",                  # methods are case-sensitive (RFC 9110 §9.1)
    b"FOO / HTTP/1.1\r\n",                  # not a method Envoy or llhttp knows
    b"GET  / HTTP/1.1\r\n",                 # empty request-target
    b"GET /a\tb HTTP/1.1\r\n",
    b"GET / HTTP/2.0\r\n",
    b"GET / HTTP/1.1\n",                    # bare LF: llhttp would refuse it too
    b"PRI * HTTP/1.1\r\n",                  # PRI is only the HTTP/2 preface
    b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
    b"\x00\x00\x00\x00",
    b"GETX / HTTP/1.1\r\n",
]


@pytest.mark.parametrize("data", HTTP_CASES)
def test_http1_whole_bytewise_trailing(data):
    assert classify(data) == "http/1.1"
    assert classify(data + b"trailing \x00\xff junk") == "http/1.1"
    line_end = data.index(b"\r\n") + 2
    for i in range(1, line_end):
        assert classify(data[:i]) is None, data[:i]


def test_h2c_preface_whole_bytewise_trailing():
    assert classify(H2C_PREFACE) == "h2c"
    assert classify(H2C_PREFACE + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00") == "h2c"
    for i in range(1, len(H2C_PREFACE)):
        assert classify(H2C_PREFACE[:i]) is None


@pytest.mark.parametrize("data", TCP_CASES)
def test_tcp_decided_as_soon_as_possible(data):
    assert classify(data) == "tcp"
    first = next(i for i in range(1, len(data) + 1) if classify(data[:i]) is not None)
    assert classify(data[:first]) == "tcp"
    for i in range(first, len(data) + 1):   # once decided, more bytes never change the answer
        assert classify(data[:i]) == "tcp"


def test_binary_is_tcp_at_first_byte():
    assert classify(b"\x16") == "tcp"
    assert classify(b"") is None


def test_every_method_is_recognised():
    for method in HTTP1_METHODS:
        assert classify(method + b" /x HTTP/1.1\r\n") == "http/1.1", method


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_hypothesis_only_answers(data):
    answer = classify(data)
    assert answer in ("http/1.1", "h2c", "tcp", None)
    if answer is not None:  # monotone: a decision holds for any continuation
        assert classify(data + b"GET / HTTP/1.1\r\n") == answer


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(HTTP1_METHODS)), st.binary(max_size=40), st.binary(max_size=20))
def test_hypothesis_request_like(method, target, tail):
    answer = classify(method + b" " + target + b" HTTP/1.1\r\n" + tail)
    clean = bool(target) and all(b > 0x20 and b != 0x7F for b in target)
    assert answer == ("http/1.1" if clean else "tcp")


# ---- shell over real sockets --------------------------------------------------------------------

async def _pair():
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_conn(r, w):
        accepted.set_result(TcpStream(r, w))

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await TcpStream.connect("127.0.0.1", port)
    srv = await accepted
    return server, client, srv


async def _close(server, *streams):
    for s in streams:
        s.close()
    server.close()
    await server.wait_closed()


async def test_sniff_http_trickled_and_replayed():
    server, client, srv = await _pair()
    request = b"GET /trickle HTTP/1.1\r\nHost: x\r\n\r\n"

    async def trickle():
        for b in request:
            client.write(bytes([b]))
            await client.drain()
            await asyncio.sleep(0)

    task = asyncio.create_task(trickle())
    proto, stream = await sniff(srv, timeout=5)
    await task
    assert proto == "http/1.1"
    got = b""
    while len(got) < len(request):
        got += await stream.read(1024)
    assert got == request      # nothing lost, nothing doubled
    await _close(server, client, srv)


async def test_sniff_h2c_and_tcp():
    server, client, srv = await _pair()
    client.write(H2C_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    proto, stream = await sniff(srv, timeout=5)
    assert proto == "h2c"
    assert (await stream.read(100)).startswith(H2C_PREFACE)
    await _close(server, client, srv)

    server, client, srv = await _pair()
    client.write(b"\x16\x03\x01\x00")
    proto, stream = await sniff(srv, timeout=5)
    assert proto == "tcp" and await stream.read(100) == b"\x16\x03\x01\x00"
    await _close(server, client, srv)


async def test_sniff_server_first_times_out_to_tcp():
    server, client, srv = await _pair()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    proto, stream = await sniff(srv, timeout=0.2)
    assert proto == "tcp"
    assert 0.15 < loop.time() - t0 < 2
    stream.write(b"220 smtp ready\r\n")         # the server speaks first; the stream still works
    await stream.drain()
    assert await client.read(100) == b"220 smtp ready\r\n"
    await _close(server, client, srv)


async def test_sniff_eof_while_undecided_is_tcp():
    server, client, srv = await _pair()
    client.write(b"GET /")
    client.write_eof()
    proto, stream = await sniff(srv, timeout=5)
    assert proto == "tcp"
    assert await stream.read(100) == b"GET /"
    assert await stream.read(100) == b""
    await _close(server, client, srv)


async def test_sniff_peek_is_bounded():
    server, client, srv = await _pair()
    client.write(b"GET /" + b"a" * (SNIFF_MAX_BYTES * 2))
    proto, stream = await sniff(srv, timeout=5)
    # An over-long request line is left to the HTTP/1 codec (which answers 431).
    assert proto == "http/1.1"
    assert len(stream._prefix) == SNIFF_MAX_BYTES
    await _close(server, client, srv)
