"""The splice relay (hbone/relay.py `_Splice`: HboneStream <-> TcpConnection inside their callbacks)
keeps the relay contract: byte-exact both ways under backpressure, early data, half-close, counts,
and no pump tasks. Real mTLS HBONE client (our pool) and a real TCP echo on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os

import pytest

from hbone.relay import RelayResult, relay, relay_detached
from hbone.stream import Dialer, TcpConnection, TcpStream, dial_tcp
from hbone.testing import LOOPS, Mesh, run, start_echo
from tests.test_hbone_server import Env

MiB = 1024 * 1024
loops = pytest.mark.parametrize("loop", LOOPS)


@contextlib.asynccontextmanager
async def _echo_env(handler_for):
    """An HBONE server (a mesh of its own; ``env.open()`` tunnels to it) whose tunnel handler
    ``handler_for(echo_addr)`` makes, in front of a TCP echo; both closed after. Yields (env, echo_addr)."""
    echo, echo_addr = await start_echo()
    env = Env(Mesh.create())
    await env.start(handler_for(echo_addr))
    try:
        yield env, echo_addr
    finally:
        await env.__aexit__()
        echo.close()


async def _echo_blocks(s, payload: bytes, block: int) -> bytearray:
    """Write ``payload`` in ``block``-byte writes (drained each), then half-close, while reading the echo
    to its EOF (60 s at most): what came back."""
    got = bytearray()

    async def reader():
        while chunk := await s.read():
            got.extend(chunk)

    r = asyncio.get_running_loop().create_task(reader())
    for i in range(0, len(payload), block):
        s.write(payload[i:i + block])
        await s.drain()
    s.write_eof()
    await asyncio.wait_for(r, 60)
    return got


def _splicing(results: list, spliced: list):
    """The handler (per echo address) that relays each tunnel to the echo and records whether the splice took
    it (and the other tasks then alive) in ``spliced``, the relay's result in ``results``."""
    def handler_for(echo_addr):
        async def handler(tunnel):
            tcp = await TcpStream.connect(*echo_addr)
            stream = await tunnel.accept()
            task = asyncio.current_task()
            relaying = asyncio.get_running_loop().create_task(relay(stream, tcp))
            await asyncio.sleep(0)
            spliced.append((stream._splice is not None and tcp._splice is stream._splice, type(tcp),
                            {t for t in asyncio.all_tasks() if t is not task and t is not relaying}))
            try:
                results.append(await relaying)
            finally:
                tcp.close()
                stream.close()
        return handler
    return handler_for


@loops
def test_splice_is_byte_exact_both_ways_with_early_data_and_half_close(loop):
    async def main():
        results: list[RelayResult] = []
        spliced: list = []
        async with _echo_env(_splicing(results, spliced)) as (env, _):
            s = await env.open()
            payload = os.urandom(8 * MiB + 12345)  # above every window and buffer: backpressure
            # odd sizes: frames split and coalesce; the half-close: the echo answers EOF after echoing everything
            got = await _echo_blocks(s, payload, 300_001)
            assert len(got) == len(payload) and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            await asyncio.wait_for(_until(lambda: results), 10)
            assert results == [RelayResult(len(payload), len(payload), None)]
            ok, tcp_type, _ = spliced[0]
            assert ok and tcp_type is TcpConnection
    run(loop, main)


@loops
def test_splice_runs_without_pump_tasks(loop):
    async def main():
        results: list = []
        spliced: list = []
        async with _echo_env(_splicing(results, spliced)) as (env, _):
            streams = [await env.open() for _ in range(5)]
            await asyncio.wait_for(_until(lambda: len(spliced) == 5), 10)
            # Besides handler and relay() tasks, nothing per tunnel: the pumps were two tasks each.
            extra = set().union(*(tasks for _, _, tasks in spliced))
            pumps = [t for t in extra if t.get_coro().__qualname__ == "_pump_relay.<locals>.pump"]
            assert pumps == []
            for s in streams:
                s.write(b"ping")
                await s.drain()
                assert await s.read() == b"ping"
                s.write_eof()
                assert await s.read() == b""
    run(loop, main)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def _detaching(results: list, handlers_done: list):
    """The handler (per echo address) that hands each tunnel and its echo connection to ``relay_detached`` and
    returns: its stream id in ``handlers_done``, the relay's result in ``results``."""
    def handler_for(echo_addr):
        async def handler(tunnel):
            tcp = await TcpStream.connect(*echo_addr)
            stream = await tunnel.accept()

            def finished(result):
                results.append(result)
                tcp.close()
                stream.close()

            assert relay_detached(stream, tcp, finished)
            handlers_done.append(tunnel.stream_id)  # the handler returns while the tunnel lives on
        return handler
    return handler_for


@loops
def test_detached_relay_is_byte_exact_and_reports_once_after_the_handler_returned(loop):
    async def main():
        results: list[RelayResult] = []
        handlers_done: list = []
        async with _echo_env(_detaching(results, handlers_done)) as (env, _):
            s = await env.open()
            await asyncio.wait_for(_until(lambda: handlers_done), 10)
            await asyncio.sleep(0.05)
            # no handler task left for this live tunnel: the splice is owned by its streams
            assert all(not conn.handler_tasks for conn in env.server._conns)
            payload = os.urandom(3 * MiB + 7)
            got = await _echo_blocks(s, payload, 200_003)
            assert bytes(got) == payload
            await asyncio.wait_for(_until(lambda: results), 10)
            await asyncio.sleep(0.05)
            assert results == [RelayResult(len(payload), len(payload), None)]  # once
    run(loop, main)


@loops
def test_detached_relay_reports_a_cut_connection(loop):
    async def main():
        results: list[RelayResult] = []
        handlers_done: list = []
        async with _echo_env(_detaching(results, handlers_done)) as (env, _):
            s = await env.open()
            s.write(b"hello")
            await s.drain()
            assert await s.read() == b"hello"
            for conn in list(env.server._conns):
                conn.abort()  # the HBONE connection is cut: the splice must fail and report
            await asyncio.wait_for(_until(lambda: results), 10)
            assert results[0].a_to_b == 5 and results[0].reset is not None
    run(loop, main)


def test_detached_relay_refuses_pairs_it_cannot_splice():
    class NotSpliceable:
        pass
    called = []
    assert relay_detached(NotSpliceable(), NotSpliceable(), called.append) is False  # type: ignore[arg-type]
    assert called == []


@loops
def test_detached_relay_without_on_done_closes_both_streams(loop):
    """relay_detached(a, b) with no callback: byte-exact, and both streams closed once it is over."""
    async def main():
        pairs: list = []

        def handler_for(echo_addr):
            async def handler(tunnel):
                tcp = await TcpStream.connect(*echo_addr)
                stream = await tunnel.accept()
                pairs.append((stream, tcp))
                assert relay_detached(stream, tcp)
            return handler

        async with _echo_env(handler_for) as (env, _):
            s = await env.open()
            payload = os.urandom(300_000)
            s.write(payload)
            s.write_eof()
            got = bytearray()
            while chunk := await s.read():
                got.extend(chunk)
            assert bytes(got) == payload
            stream, tcp = pairs[0]
            await asyncio.wait_for(tcp.wait_closed(), 10)
            await asyncio.wait_for(stream.wait_closed(), 10)
            assert stream._splice is None and tcp._splice is None
    run(loop, main)


@loops
def test_plain_function_handler_runs_without_a_task(loop):
    """A handler that is a plain function answers from its own callbacks; the server keeps no task
    for it, and one that raises is answered 503 like an async handler that fails."""
    async def main():
        seen: list = []

        def handler_for(echo_addr):
            def handler(tunnel):
                seen.append(asyncio.current_task())
                if tunnel.authority[1] == 1:
                    raise RuntimeError("boom")
                loop_ = asyncio.get_running_loop()

                async def dial():  # the test's own task, not the server's
                    tcp = await TcpStream.connect(*echo_addr)
                    assert relay_detached(await tunnel.accept(), tcp)
                loop_.create_task(dial())
            return handler

        async with _echo_env(handler_for) as (env, echo_addr):
            s = await env.open()
            assert all(not conn.handler_tasks for conn in env.server._conns)
            s.write(b"ping")
            s.write_eof()
            assert await s.read() == b"ping"
            assert await s.read() == b""
            with pytest.raises(Exception) as err:
                await env.open(authority=f"{echo_addr[0]}:1")
            assert "503" in str(err.value)
            assert len(seen) == 2 and seen == [None, None]  # called from data_received, in no task
    run(loop, main)


@loops
def test_dial_tcp_reports_a_connection_or_the_error_without_a_task(loop):
    async def main():
        echo, echo_addr = await start_echo()
        done = asyncio.get_running_loop().create_future()
        tasks_before = len(asyncio.all_tasks())
        dial_tcp(*echo_addr, lambda conn, err: done.set_result((conn, err)))
        assert len(asyncio.all_tasks()) == tasks_before  # no task for the dial
        conn, err = await asyncio.wait_for(done, 10)
        assert err is None and type(conn) is TcpConnection
        conn.write(b"hi")
        conn.write_eof()
        assert await conn.read() == b"hi"
        conn.close()
        # a refused dial reports its OSError
        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
        sock.close()
        failed = asyncio.get_running_loop().create_future()
        dial_tcp("127.0.0.1", closed_port, lambda conn, err: failed.set_result((conn, err)))
        conn, err = await asyncio.wait_for(failed, 10)
        assert conn is None and isinstance(err, OSError)
        echo.close()
    run(loop, main)


@loops
def test_benchmark_relay_handler_shape_answers_503_when_the_upstream_is_down(loop):
    """benchmarks/relay.py's handler shape (plain function + dial_tcp + reject_nowait/accept_nowait):
    a refused upstream is a 503, a live one relays."""
    async def main():
        def handler(tunnel):
            host, port = tunnel.authority

            def connected(upstream, err):
                if err is not None:
                    tunnel.reject_nowait(503, f"connect {host}:{port}: {err}")
                    return
                assert relay_detached(tunnel.accept_nowait(), upstream)
            dial_tcp(host, port, connected)

        async with _echo_env(lambda echo_addr: handler) as (env, echo_addr):
            s = await env.open(authority=f"{echo_addr[0]}:{echo_addr[1]}")
            s.write(b"ping")
            s.write_eof()
            assert await s.read() == b"ping"
            assert await s.read() == b""
            sock = __import__("socket").socket()
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
            sock.close()
            with pytest.raises(Exception) as err:
                await env.open(authority=f"127.0.0.1:{closed_port}")
            assert "503" in str(err.value)
    run(loop, main)


@loops
def test_dialer_keeps_at_most_max_concurrent_dials_in_flight_and_serves_all_in_order(loop):
    async def main():
        echo, echo_addr = await start_echo()
        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
        sock.close()
        dialer = Dialer(2)
        seen: list = []
        peak = [0]
        all_done = asyncio.get_running_loop().create_future()
        targets = [echo_addr[1], closed_port, echo_addr[1], echo_addr[1], closed_port, echo_addr[1]]

        def on_done(i):
            def report(conn, err):
                peak[0] = max(peak[0], dialer.in_flight + 1)
                seen.append((i, conn is not None, err is not None))
                if conn is not None:
                    conn.close()
                if len(seen) == len(targets):
                    all_done.set_result(None)
            return report

        for i, port in enumerate(targets):
            dialer.dial("127.0.0.1", port, on_done(i))
            assert dialer.in_flight <= 2
        # A dial to a local peer may end inside dial() (hbone.socktransport: reported at once), so
        # the queue may already have moved on; never more than 2 in flight either way.
        assert dialer.in_flight <= 2 and dialer.in_flight + dialer.waiting + len(seen) == len(targets)
        await asyncio.wait_for(all_done, 10)
        assert peak[0] <= 2 and dialer.in_flight == 0 and dialer.waiting == 0
        assert sorted(seen) == [(i, port == echo_addr[1], port != echo_addr[1]) for i, port in enumerate(targets)]
        with pytest.raises(ValueError):
            Dialer(0)
        echo.close()
    run(loop, main)


@loops
def test_multiplexed_16k_frames_are_held_across_reads_and_all_written_once_quiet(loop):
    """Many bulk tunnels on one connection with 16 KiB frames (what nghttp2 peers send): the splices
    hold a stream's bytes across TLS reads (hbone/_conn.py SPLICE_DEFER) and write them several
    frames at a time; when the peer stops sending (no END_STREAM, just waiting for the echo),
    everything held is still written: each tunnel gets back exactly what it sent."""
    from hbone import _conn
    from hbone.settings import HboneSettings

    async def main():
        echo, echo_addr = await start_echo()
        written: list[int] = []  # frames per TCP write of the deferred path
        orig_end_batch = _conn.HboneConnection._end_batch

        def end_batch(self, pending, streaming):
            if streaming:
                written.append(len(self.splice_deferred or ()))
            return orig_end_batch(self, pending, streaming)

        async def handler(tunnel):
            tcp = await TcpStream.connect(*echo_addr)
            assert relay_detached(await tunnel.accept(), tcp)

        env = Env(Mesh.create())
        await env.start(handler, HboneSettings(max_frame_size=16 * 1024))
        _conn.HboneConnection._end_batch = end_batch
        try:
            streams = [await env.open() for _ in range(8)]
            payloads = [os.urandom(1 * MiB + 1000 * i + 1) for i in range(len(streams))]

            async def one(s, payload):
                got = bytearray()

                async def reader():
                    while len(got) < len(payload):
                        got.extend(await s.read())
                r = asyncio.get_running_loop().create_task(reader())
                for i in range(0, len(payload), 65_537):
                    s.write(payload[i:i + 65_537])
                    await s.drain()
                await asyncio.wait_for(r, 30)  # no EOF sent: the held bytes must come out anyway
                assert bytes(got) == payload
                s.write_eof()
                assert await s.read() == b""

            await asyncio.gather(*(one(s, p) for s, p in zip(streams, payloads)))
            assert any(written), "no read held a splice's bytes: the deferral is not in effect"
            assert all(not conn.splice_deferred for conn in env.server._conns)
        finally:
            _conn.HboneConnection._end_batch = orig_end_batch
            await env.__aexit__()
            echo.close()
    run(loop, main)
