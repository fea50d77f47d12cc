"""relay(): both directions, half-close, resets propagate as errors (never a silent truncation)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from hbone.relay import relay
from hbone.server import InboundTunnel
from hbone.stream import StreamReset, TcpStream
from hbone.testing import LOOPS, Mesh, run

loops = pytest.mark.parametrize("loop", LOOPS)


async def tcp_pair() -> tuple[TcpStream, TcpStream]:
    """Two ends of one real loopback TCP connection (RST needs TCP, not a socketpair)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        s1 = socket.create_connection(listener.getsockname())
        s2, _ = listener.accept()
    r1, w1 = await asyncio.open_connection(sock=s1)
    r2, w2 = await asyncio.open_connection(sock=s2)
    return TcpStream(r1, w1), TcpStream(r2, w2)


def rst(stream: TcpStream) -> None:
    sock = stream._writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.abort()


@loops
def test_relay_half_close_both_ways_and_counts(loop):
    async def main():
        left_app, a = await tcp_pair()
        b, right_app = await tcp_pair()
        task = asyncio.create_task(relay(a, b))
        left_app.write(b"hello " * 1000)
        left_app.write_eof()  # left done sending; right keeps sending
        got = b""
        while d := await right_app.read():
            got += d
        assert got == b"hello " * 1000
        right_app.write(b"late reply")
        right_app.write_eof()
        back = b""
        while d := await left_app.read():
            back += d
        assert back == b"late reply"
        result = await asyncio.wait_for(task, 5)
        assert (result.a_to_b, result.b_to_a, result.reset) == (6000, 10, None)
        for s in (left_app, a, b, right_app):
            s.close()
            await s.wait_closed()
    run(loop, main)


@loops
def test_relay_reset_aborts_other_side(loop):
    async def main():
        left_app, a = await tcp_pair()
        b, right_app = await tcp_pair()
        task = asyncio.create_task(relay(a, b))
        left_app.write(b"partial")
        assert await right_app.read() == b"partial"
        rst(left_app)
        result = await asyncio.wait_for(task, 5)
        assert result.reset is not None and result.a_to_b == 7
        with pytest.raises((StreamReset, ConnectionError)):
            while await right_app.read():
                pass
        for s in (left_app, a, b, right_app):
            s.close()
    run(loop, main)


@loops
def test_upstream_reset_reaches_hbone_client_as_error(loop):
    """TCP RST behind the server → RST_STREAM CONNECT_ERROR → StreamReset at the client."""
    from tests.test_hbone_server import Env

    async def main():
        mesh = Mesh.create()
        resets = asyncio.get_running_loop().create_future()

        async def upstream(reader, writer):
            await reader.read(10)
            stream = TcpStream(reader, writer)
            rst(stream)
            writer.close()
            resets.set_result(True)

        up = await asyncio.start_server(upstream, "127.0.0.1", 0)
        up_addr = up.sockets[0].getsockname()[:2]

        async def handler(tunnel: InboundTunnel):
            tcp = await TcpStream.connect(*up_addr)
            stream = await tunnel.accept()
            result = await relay(stream, tcp)
            assert result.reset is not None
            tcp.close()

        env = Env(mesh)
        await env.start(handler)
        try:
            s = await env.open()
            s.write(b"hi")
            await resets
            with pytest.raises(StreamReset) as err:
                while await s.read():
                    pass
            assert "error code 10" in str(err.value)  # CONNECT_ERROR (0xa)
        finally:
            await env.__aexit__()
            up.close()
    run(loop, main)
