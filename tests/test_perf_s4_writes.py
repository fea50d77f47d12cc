"""Small request/response messages through HBONE cost one TLS write per message on each hop (untimed).

What the session-4 profile of the HTTP scenario found at low load (strace -c of each proxy at c=1:
node-a and node-b 2 reads + 2 writes per request, the waypoint the same): every small message leaves
in one TCP write carrying one TLS record, with no WINDOW_UPDATE or extra flush of its own and no
second write per frame. These tests pin that on live loopback connections, counting the transport
writes of both kinds of hop: a spliced one (node proxies: HboneStream <-> TcpConnection in the
protocol callbacks, hbone/relay.py) and a task that reads and writes its stream (the waypoint's
HTTP/1.1 side, hbone/_conn.py HboneStream.read/write/drain).

And one flush per message: a read that only hands DATA to its stream is not followed by a flush of
its own (hbone/_conn.py ``_QUIET_READ``), and the splice's acknowledgement of each small frame
schedules none unless it queued a WINDOW_UPDATE (``HboneConnection.ack``); the writes are the same
with and without the skip, and a read that makes h2 answer (PING) is still flushed at once.
"""

from __future__ import annotations

import asyncio

import pytest

import hbone._conn as hconn
from hbone.relay import relay_detached
from hbone.stream import TcpStream
from hbone.testing import LOOPS, Mesh, run, start_echo
from tests.test_hbone_server import Env

loops = pytest.mark.parametrize("loop", LOOPS)

MESSAGE = b"q" * 200  # an HTTP/1.1 request or response of the benchmark's size
WARMUP = 10  # ping-pongs before counting (the tunnel's 200, the first window bookkeeping)
ROUNDS = 300  # ~60 KB each way: far below half a stream window, so no WINDOW_UPDATE is due


class _Counting:
    """Delegates to a transport and counts its write calls (each one a send on the socket)."""

    def __init__(self, inner):
        self._inner = inner
        self.writes = 0

    def write(self, data):
        self.writes += 1
        return self._inner.write(data)

    def writelines(self, data):
        self.writes += 1
        return self._inner.writelines(data)

    def __getattr__(self, name):
        return getattr(self._inner, name)


async def _ping_pong(stream, n: int) -> None:
    for _ in range(n):
        stream.write(MESSAGE)
        await stream.drain()
        got = 0
        while got < len(MESSAGE):
            chunk = await stream.read()
            assert chunk, "the echo ended early"
            got += len(chunk)


@pytest.mark.parametrize("quiet", [True, False])
@loops
def test_spliced_hop_and_reading_task_write_once_per_small_message(loop, quiet, monkeypatch):
    monkeypatch.setattr(hconn, "_QUIET_READ", quiet)

    async def main():
        echo, echo_addr = await start_echo()
        counters: dict[str, _Counting] = {}
        spliced = asyncio.Event()

        async def handler(tunnel):
            tcp = await TcpStream.connect(*echo_addr)
            stream = await tunnel.accept()
            conn = stream._conn
            counters["hbone"] = conn.transport = _Counting(conn.transport)
            counters["tcp"] = tcp.transport = _Counting(tcp.transport)
            assert relay_detached(stream, tcp)  # the node proxies' splice
            spliced.set()

        env = Env(Mesh.create())
        await env.start(handler)
        try:
            s = await env.open()
            client_conn = s._conn
            counters["client"] = client_conn.transport = _Counting(client_conn.transport)
            await asyncio.wait_for(spliced.wait(), 10)
            await _ping_pong(s, WARMUP)
            before = {k: c.writes for k, c in counters.items()}
            await _ping_pong(s, ROUNDS)
            after = {k: c.writes for k, c in counters.items()}
            # One TLS write per echoed message on the spliced side, one TCP send per message to the
            # pod, one TLS write per message from the reading/writing task: no per-frame flushes,
            # no WINDOW_UPDATE writes of their own, no split records.
            assert {k: after[k] - before[k] for k in after} == {"hbone": ROUNDS, "tcp": ROUNDS, "client": ROUNDS}
            s.write_eof()
            assert await asyncio.wait_for(s.read(), 10) == b""
        finally:
            await env.pool.close()
            await env.server.close(0.5)
            echo.close()

    run(loop, main)


@loops
def test_one_flush_per_small_message_and_h2_answers_still_flushed_at_once(loop):
    async def main():
        echo, echo_addr = await start_echo()
        server_conns = []

        async def handler(tunnel):
            tcp = await TcpStream.connect(*echo_addr)
            stream = await tunnel.accept()
            server_conns.append(stream._conn)
            assert relay_detached(stream, tcp)

        env = Env(Mesh.create())
        await env.start(handler)
        flushes = {"server": 0, "client": 0}
        try:
            s = await env.open()
            await _ping_pong(s, WARMUP)
            server, client = server_conns[0], s._conn

            def counting(conn, key):
                real = conn.flush_now

                def flush_now():
                    flushes[key] += 1
                    real()
                return flush_now

            server.flush_now = counting(server, "server")
            client.flush_now = counting(client, "client")
            await _ping_pong(s, ROUNDS)
            # the flush that sends each message, and no other (an empty one after each read, one per
            # acknowledgement of a spliced frame, before the skip: three per message on the spliced side)
            assert flushes == {"server": ROUNDS, "client": ROUNDS}
            # A read that makes h2 answer is flushed by itself: the server's PING ACK comes back with
            # nothing else to carry it.
            acked = client.pings_acked
            client._ping_outstanding = b"s4-quiet"
            client.core.ping(b"s4-quiet")
            client.flush_now()
            for _ in range(200):
                if client.pings_acked > acked:
                    break
                await asyncio.sleep(0.005)
            assert client.pings_acked == acked + 1
        finally:
            await env.pool.close()
            await env.server.close(0.5)
            echo.close()

    run(loop, main)
