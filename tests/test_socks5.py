"""SOCKS5: the sans-IO parser (whole, byte by byte, trailing data, every reply code, hypothesis)
and the shell with a real `curl --socks5-hostname` client through a tiny relay to an HTTP server."""

from __future__ import annotations

import asyncio
import shutil
import struct

import pytest
from hypothesis import given, settings, strategies as st

from hbone.stream import TcpStream
from proxy.socks5 import (ADDRESS_NOT_SUPPORTED, ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6,
                          COMMAND_NOT_SUPPORTED, CONNECTION_REFUSED, GENERAL_FAILURE,
                          HOST_UNREACHABLE, SUCCEEDED, TTL_EXPIRED, MethodsOffered, Socks5Error,
                          Socks5Parser, Socks5Request, accept_socks5, encode_reply, reply,
                          reply_code_for)

GREETING = b"\x05\x02\x00\x01"
REQ_V4 = b"\x05\x01\x00\x01" + bytes([10, 0, 0, 7]) + struct.pack("!H", 9080)
REQ_V6 = b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + struct.pack("!H", 443)
_NAME = b"reviews.default.svc.cluster.local"
REQ_DOMAIN = b"\x05\x01\x00\x03" + bytes([len(_NAME)]) + _NAME + struct.pack("!H", 9080)


@pytest.mark.parametrize("req,expected", [
    (REQ_V4, Socks5Request("10.0.0.7", 9080, ATYP_IPV4)),
    (REQ_V6, Socks5Request("::1", 443, ATYP_IPV6)),
    (REQ_DOMAIN, Socks5Request("reviews.default.svc.cluster.local", 9080, ATYP_DOMAIN)),
])
def test_whole_bytewise_trailing(req, expected):
    data = GREETING + req
    parser = Socks5Parser()
    assert parser.feed(data + b"GET / HTTP/1.1\r\n") == [MethodsOffered(b"\x00\x01"), expected]
    assert parser.trailing == b"GET / HTTP/1.1\r\n"
    parser.feed(b"more")
    assert parser.trailing == b"GET / HTTP/1.1\r\nmore"
    parser, events = Socks5Parser(), []
    for i in range(len(data)):
        events += parser.feed(data[i:i + 1])
    assert events == [MethodsOffered(b"\x00\x01"), expected] and parser.trailing == b""
    assert parser.method_selection() == b"\x05\x00"


@pytest.mark.parametrize("data,code", [
    (GREETING + b"\x05\x02\x00\x01" + bytes(6), COMMAND_NOT_SUPPORTED),   # BIND
    (GREETING + b"\x05\x03\x00\x01" + bytes(6), COMMAND_NOT_SUPPORTED),   # UDP ASSOCIATE
    (GREETING + b"\x05\x01\x00\x05" + bytes(6), ADDRESS_NOT_SUPPORTED),
    (GREETING + b"\x04\x01\x00\x01" + bytes(6), GENERAL_FAILURE),
    (GREETING + b"\x05\x01\x00\x03\x03\xff\xfe\xfd\x00\x50", HOST_UNREACHABLE),
    (GREETING + b"\x05\x01\x00\x03\x00\x00\x50", HOST_UNREACHABLE),
    (GREETING + b"\x05\x01\x00\x01\x0a\x00\x00\x01\x00\x00", HOST_UNREACHABLE),   # port 0
    (b"\x04\x01\x00\x50", None),                        # SOCKS4
    (b"\x05\x01\x02", None),                            # only user/password offered
    (b"\x05\x00", None),
])
def test_errors_carry_their_reply(data, code):
    with pytest.raises(Socks5Error) as err:
        Socks5Parser().feed(data)
    assert err.value.code == code
    if data.startswith(b"\x05\x01\x02") or data == b"\x05\x00":
        assert err.value.response == b"\x05\xff"    # RFC 1928 §3: no acceptable methods


def test_encode_reply():
    assert encode_reply(SUCCEEDED, ("127.0.0.1", 8080)) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90"
    assert encode_reply(CONNECTION_REFUSED) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    assert encode_reply(SUCCEEDED, ("::1", 1))[:4] == b"\x05\x00\x00\x04"
    assert reply_code_for(TimeoutError()) == TTL_EXPIRED
    assert reply_code_for(ConnectionRefusedError()) == CONNECTION_REFUSED


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=8))
def test_hypothesis_only_socks5error(data, step):
    parser = Socks5Parser()
    try:
        for i in range(0, len(data), step):
            for event in parser.feed(data[i:i + step]):
                assert isinstance(event, (MethodsOffered, Socks5Request))
    except Socks5Error as err:
        assert err.code is None or 0 <= err.code <= 8


# ---- shell --------------------------------------------------------------------------------------

async def _relay(a: TcpStream, b: TcpStream):
    async def pump(src, dst):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        dst.write_eof()
    await asyncio.gather(pump(a, b), pump(b, a), return_exceptions=True)
    a.close()
    b.close()


async def _socks_server(names: dict[str, tuple[str, int]]):
    """A minimal node-proxy stand-in: SOCKS5 handshake, resolve names from an inventory, relay."""
    async def on_conn(r, w):
        stream = TcpStream(r, w)
        try:
            req, early = await accept_socks5(stream, timeout=5)
        except Socks5Error:
            stream.close()
            return
        target = names.get(req.host, (req.host, req.port))
        try:
            upstream = await TcpStream.connect(*target)
        except OSError as err:
            await reply(stream, reply_code_for(err))
            stream.close()
            return
        await reply(stream, SUCCEEDED, upstream.local_addr)
        if early:
            upstream.write(early)
        await _relay(stream, upstream)

    return await asyncio.start_server(on_conn, "127.0.0.1", 0)


async def _http_backend(body: bytes):
    async def on_conn(r, w):
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body))
        await w.drain()
        w.close()
    return await asyncio.start_server(on_conn, "127.0.0.1", 0)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_socks5_hostname():
    backend = await _http_backend(b"reviews-v1")
    bport = backend.sockets[0].getsockname()[1]
    socks = await _socks_server({"reviews.default.svc.cluster.local": ("127.0.0.1", bport)})
    sport = socks.sockets[0].getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{sport}",
        f"http://reviews.default.svc.cluster.local:{bport}/reviews/1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out == b"reviews-v1"
    # Refused upstream: curl reports the SOCKS reply code (5 = connection refused).
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{sport}",
        "http://127.0.0.1:1/", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 97 and err.rstrip().endswith(b"(5)"), err
    for s in (socks, backend):
        s.close()
        await s.wait_closed()


async def test_shell_replies_and_timeout():
    accepted = asyncio.Queue()

    async def on_conn(r, w):
        stream = TcpStream(r, w)
        try:
            await accepted.put(await accept_socks5(stream, timeout=0.3))
        except Socks5Error as err:
            await accepted.put(err)
        stream.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = await TcpStream.connect("127.0.0.1", port)
    client.write(GREETING + b"\x05\x02\x00\x01" + bytes(6))       # BIND
    assert await client.read(2) == b"\x05\x00"
    assert await client.read(100) == encode_reply(COMMAND_NOT_SUPPORTED)
    assert (await accepted.get()).code == COMMAND_NOT_SUPPORTED
    client.close()
    client = await TcpStream.connect("127.0.0.1", port)              # silent client
    err = await asyncio.wait_for(accepted.get(), 5)
    assert isinstance(err, Socks5Error) and err.code == TTL_EXPIRED
    client.close()
    server.close()
    await server.wait_closed()
