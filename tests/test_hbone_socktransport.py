"""hbone.socktransport.SocketTransport: the node proxy's upstream connections (``dial_from(...,
socket_transport=True)``) over real loopback sockets. The same ByteStream contract as the uvloop
transport it replaces: bytes exact both ways, half-close each way, resets each way, bounded memory
against a slow reader and a fast writer. Not timed. The dial's failure paths are
tests/test_hbone_dial.py's, run with this transport too."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import pytest

from hbone.dial import IP_BIND_ADDRESS_NO_PORT
from hbone.relay import relay
from hbone.socktransport import READ_BYTES, WRITE_HIGH_WATER_BYTES, SocketTransport, poller_for
from hbone.stream import StreamReset, TcpConnection
from tests.test_hbone_dial import _dial as _dial_from, _full_listener

MiB = 1024 * 1024


def _dial(host: str, port: int, local_ip: str | None, timeout: float = 5.0):
    return _dial_from(host, port, local_ip, timeout, socket_transport=True)


class Peer:
    """A plain-socket server on a pod IP: the other end, driven by the test through asyncio streams."""

    def __init__(self):
        self.conns: asyncio.Queue = asyncio.Queue()

    async def start(self, ip: str) -> int:
        async def on_conn(reader, writer):
            await self.conns.put((reader, writer))
        self.server = await asyncio.start_server(on_conn, ip, 0)
        return self.server.sockets[0].getsockname()[1]

    async def accept(self):
        return await asyncio.wait_for(self.conns.get(), 5)

    def close(self):
        self.server.close()


@pytest.fixture
async def pair(loopback_ip):
    """(our TcpConnection over a SocketTransport, the peer's reader, the peer's writer)."""
    pod, client = loopback_ip(), loopback_ip()
    peer = Peer()
    port = await peer.start(pod)
    conn, err, at_once = await _dial(pod, port, client)
    assert err is None and at_once          # a local pod: established inside connect()
    reader, writer = await peer.accept()
    yield conn, reader, writer
    conn.abort()
    writer.close()
    peer.close()


async def test_the_connection_is_a_spliceable_tcp_connection_over_our_transport(pair):
    conn, reader, writer = pair
    assert conn.__class__ is TcpConnection and conn.transport.__class__ is SocketTransport
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1   # as uvloop's transport
    assert conn.remote_addr == writer.get_extra_info("sockname")[:2]
    assert conn.local_addr == writer.get_extra_info("peername")[:2]


async def test_bytes_are_exact_both_ways_and_half_close_each_way(pair):
    conn, reader, writer = pair
    up, down = os.urandom(3 * MiB + 17), os.urandom(2 * MiB + 5)

    async def send_up():
        for i in range(0, len(up), 100_000):
            conn.write(up[i:i + 100_000])
            await conn.drain()
        conn.write_eof()                              # our FIN: the peer reads EOF...

    async def read_down():
        got = bytearray()
        while chunk := await conn.read():
            assert len(chunk) <= READ_BYTES
            got += chunk
        return bytes(got)

    sender = asyncio.ensure_future(send_up())
    received_up = await asyncio.wait_for(reader.read(), 10)   # until our FIN
    await sender
    assert hashlib.sha256(received_up).digest() == hashlib.sha256(up).digest()
    writer.write(down)                                # ...and can still send after it
    writer.write_eof()                                # its FIN: we read b"" after every byte
    received_down = await asyncio.wait_for(read_down(), 10)
    assert received_down == down
    assert await conn.read() == b""                   # EOF stays EOF


async def test_after_the_peers_fin_we_can_still_send(pair):
    conn, reader, writer = pair
    writer.write(b"bye")
    writer.write_eof()
    assert await asyncio.wait_for(conn.read(), 5) == b"bye"
    assert await asyncio.wait_for(conn.read(), 5) == b""
    conn.write(b"still here")
    await conn.drain()
    conn.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"still here"


async def test_a_peer_reset_is_a_stream_reset(pair):
    conn, reader, writer = pair
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()                          # RST
    with pytest.raises(StreamReset):
        await asyncio.wait_for(conn.read(), 5)
    with pytest.raises(StreamReset):
        await conn.drain()


async def test_our_abort_is_a_reset_at_the_peer(pair):
    conn, reader, writer = pair
    conn.write(b"x" * 1000)
    await conn.drain()
    assert await asyncio.wait_for(reader.readexactly(1000), 5) == b"x" * 1000
    conn.abort()                                      # RST, not FIN: the peer must not see a clean end
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    await asyncio.wait_for(conn.wait_closed(), 5)


async def test_close_flushes_what_is_queued_then_ends(pair):
    conn, reader, writer = pair
    writer.transport.pause_reading()                  # the peer does not read yet: bytes queue up
    data = os.urandom(4 * MiB)
    conn.write(data)
    assert conn.transport.get_write_buffer_size() > 0
    conn.close()
    writer.transport.resume_reading()
    assert await asyncio.wait_for(reader.read(), 10) == data   # every byte, then FIN
    await asyncio.wait_for(conn.wait_closed(), 5)


async def test_a_slow_reader_pauses_our_writer_with_bounded_memory(pair):
    conn, reader, writer = pair
    writer.transport.pause_reading()                  # a pod that does not read
    chunk = os.urandom(64 * 1024)
    sent = 0
    drain = None
    for _ in range(2000):                             # up to 128 MiB: far beyond any socket buffer
        conn.write(chunk)
        sent += len(chunk)
        drain = asyncio.ensure_future(conn.drain())
        await asyncio.sleep(0)
        if not drain.done():
            break                                     # backpressure reached
        await drain
    assert drain is not None and not drain.done(), "drain() never waited"
    queued = conn.transport.get_write_buffer_size()
    assert queued <= WRITE_HIGH_WATER_BYTES + len(chunk)   # user space holds at most this
    await asyncio.sleep(0.05)
    assert not drain.done()
    writer.transport.resume_reading()                 # the pod reads: drain ends, nothing lost
    got = 0
    while got < sent:
        got += len(await asyncio.wait_for(reader.read(MiB), 10))
    await asyncio.wait_for(drain, 5)
    assert got == sent


async def test_a_fast_writer_pauses_our_reading_with_bounded_memory(pair):
    conn, reader, writer = pair
    block = os.urandom(MiB)
    for _ in range(16):                               # 16 MiB towards a reader that does not read
        writer.write(block)
    await asyncio.sleep(0.3)
    assert conn._reading_paused and not conn.transport.is_reading()
    assert conn._nbuf <= conn._limit + READ_BYTES     # buffered in user space: bounded
    got = bytearray()
    while len(got) < 16 * MiB:                        # reading again resumes it: every byte arrives
        got += await asyncio.wait_for(conn.read(), 5)
    assert got == block * 16


async def test_a_read_of_exactly_read_bytes_is_followed_by_another(pair):
    """Edge-triggered epoll reports readiness once: a recv that filled READ_BYTES must be followed by
    another one by ourselves, or the rest would wait for bytes that never come."""
    conn, reader, writer = pair
    data = os.urandom(3 * READ_BYTES)
    writer.write(data)
    await writer.drain()
    got = bytearray()
    while len(got) < len(data):
        got += await asyncio.wait_for(conn.read(), 5)
    assert got == data


async def test_spliced_to_itself_through_relay(loopback_ip):
    """Two SocketTransport connections relayed by hbone.relay's pump path: the upstream half of a
    tunnel as the node proxy sees it, with data and FIN both ways."""
    a_ip, b_ip, client = loopback_ip(), loopback_ip(), loopback_ip()
    pa, pb = Peer(), Peer()
    ca, _, _ = await _dial(a_ip, await pa.start(a_ip), client)
    cb, _, _ = await _dial(b_ip, await pb.start(b_ip), client)
    (ra, wa), (rb, wb) = await pa.accept(), await pb.accept()
    task = asyncio.ensure_future(relay(ca, cb))
    wa.write(b"a" * 300_000)
    wa.write_eof()
    wb.write(b"b" * 200_000)
    wb.write_eof()
    assert await asyncio.wait_for(rb.read(), 5) == b"a" * 300_000
    assert await asyncio.wait_for(ra.read(), 5) == b"b" * 200_000
    result = await asyncio.wait_for(task, 5)
    assert (result.a_to_b, result.b_to_a, result.reset) == (300_000, 200_000, None)
    for c, w, p in ((ca, wa, pa), (cb, wb, pb)):
        c.close()
        w.close()
        p.close()


# The dial's failure paths (refused, unbindable source, a handshake in flight, its timeout) are
# tests/test_hbone_dial.py's, run with this transport too.


async def test_closed_sockets_leave_the_poller(pair):
    conn, reader, writer = pair
    poller = poller_for(asyncio.get_running_loop())
    fd = conn.transport.get_extra_info("socket").fileno()
    assert poller.table[fd] is conn.transport
    conn.close()
    await asyncio.wait_for(conn.wait_closed(), 5)
    assert fd not in poller.table or poller.table[fd] is not conn.transport
    assert conn.transport.get_protocol() is None      # no protocol <-> transport cycle left


@pytest.mark.parametrize("size", [1033, 8 * MiB])
async def test_writelines_eof_sends_every_byte_then_fin(pair, size):
    """The splice's last write of an upload with END_STREAM: MSG_MORE + shutdown (one segment when
    it fits); a batch larger than the socket buffer is queued and the FIN follows the queue."""
    conn, reader, writer = pair
    data = os.urandom(size)
    parts = [data[:size // 3], data[size // 3:]]
    conn.transport.writelines_eof(parts)
    with pytest.raises(RuntimeError):
        conn.transport.write(b"after eof")
    assert await asyncio.wait_for(reader.read(), 10) == data     # read() returns at our FIN
    writer.write(b"reply")
    writer.write_eof()
    assert await asyncio.wait_for(conn.read(), 5) == b"reply"
    assert await asyncio.wait_for(conn.read(), 5) == b""


async def test_a_fin_that_comes_while_reading_is_paused_is_still_seen(pair):
    """Edge-triggered: the edges of bytes and a FIN that come while we are paused (our buffer is
    full) are dropped; resuming must read until EAGAIN or EOF by itself, or read() would wait
    forever after the last byte."""
    conn, reader, writer = pair
    conn._limit = 100                                 # 1 000 buffered bytes pause us
    writer.write(b"a" * 1000)
    await writer.drain()
    await asyncio.sleep(0.1)
    assert conn._reading_paused
    writer.write(b"b" * 50)                           # under the limit: read without pausing again
    writer.write_eof()
    await asyncio.sleep(0.1)
    got = bytearray()
    while chunk := await asyncio.wait_for(conn.read(), 5):
        got += chunk
    assert got == b"a" * 1000 + b"b" * 50


async def test_a_dialer_whose_dials_end_at_once_serves_a_long_queue_without_recursion(loopback_ip):
    """dial_tcp to an IP dials over a SocketTransport and reports a local peer at once, inside the
    call: a Dialer's slot then starts the next dial from inside the previous one. 1 500 dials queued
    behind one in its handshake would nest thousands of frames deep (RecursionError) once it ends,
    without Dialer's loop guard."""
    from hbone.stream import Dialer
    pod, slow = loopback_ip(), loopback_ip()
    accepted = []
    server = await asyncio.start_server(lambda r, w: accepted.append(w), pod, 0, backlog=2048)
    port = server.sockets[0].getsockname()[1]
    lsock, held = _full_listener(slow)
    dialer = Dialer(1)
    results: list = []

    def on_done(conn, err):
        results.append((conn.__class__, conn.transport.__class__, err) if conn else (None, None, err))
        if conn is not None:
            conn.abort()

    try:
        dialer.dial(*lsock.getsockname(), on_done)    # stays in its handshake: the slot is taken
        for _ in range(1500):
            dialer.dial(pod, port, on_done)
        assert dialer.in_flight == 1 and dialer.waiting == 1500
        lsock.setblocking(False)
        held.append(lsock.accept()[0])                # the first dial completes; the queue follows
        for _ in range(200):
            if len(results) == 1501:
                break
            await asyncio.sleep(0.05)
        assert results == [(TcpConnection, SocketTransport, None)] * 1501
        assert dialer.in_flight == 0 and dialer.waiting == 0
    finally:
        server.close()
        for s in (*held, lsock):
            s.close()
        for w in accepted:
            w.close()


async def test_queued_writes_keep_order_and_bytes_with_writelines_of_every_shape(pair):
    """Writes queued behind a full socket (part-sent buffers kept as views, batches longer than
    IOV_MAX, bytearrays the caller changes afterwards) reach the peer in order, byte for byte."""
    from hbone.socktransport import MAX_IOV
    conn, reader, writer = pair
    writer.transport.pause_reading()
    t = conn.transport
    expected = bytearray()
    big = os.urandom(6 * MiB)
    t.write(big)                                      # fills the socket: the rest is queued
    expected += big
    assert t.get_write_buffer_size() > 0
    many = [bytes([i % 251]) * 7 for i in range(MAX_IOV + 300)]
    t.writelines(many)
    expected += b"".join(many)
    mutable = bytearray(b"m" * 1000)
    t.write(mutable)
    expected += mutable
    mutable[:] = b"X" * 1000                          # the queued copy must not change
    t.writelines([b"a" * 10, b"", b"b" * 20])
    expected += b"a" * 10 + b"b" * 20
    assert t.get_write_buffer_size() <= len(expected)
    conn.write_eof()
    writer.transport.resume_reading()
    assert await asyncio.wait_for(reader.read(), 10) == bytes(expected)


async def test_a_long_batch_on_an_idle_socket_is_sent_at_once(pair):
    from hbone.socktransport import MAX_IOV
    conn, reader, writer = pair
    many = [b"%05d" % i for i in range(MAX_IOV * 2)]
    conn.transport.writelines(many)                   # more buffers than one sendmsg takes
    conn.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"".join(many)


async def test_a_failing_protocol_ends_its_connection_only(loopback_ip):
    """An exception from a protocol callback ends that connection (connection_lost with it, reported
    to the loop's exception handler, as asyncio's transports do); the other connections' events of
    the same epoll batch still arrive (edge-triggered: a dropped event would never come again)."""
    loop = asyncio.get_running_loop()
    reported: list = []
    loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    pod = loopback_ip()
    peer = Peer()
    port = await peer.start(pod)

    class Proto(asyncio.Protocol):
        def __init__(self, fail: bool):
            self.fail, self.got, self.lost = fail, b"", loop.create_future()

        def data_received(self, data):
            if self.fail:
                raise ValueError("boom")
            self.got += data

        def eof_received(self):
            return True

        def connection_lost(self, exc):
            self.lost.set_result(exc)

    protos, writers = [], []
    for fail in (True, False, True, False):
        sock = socket.create_connection((pod, port))
        sock.setblocking(False)
        protos.append(Proto(fail))
        SocketTransport(loop, sock, protos[-1])
        writers.append((await peer.accept())[1])
    try:
        for w in writers:                             # all four readable in the same loop turn
            w.write(b"hello")
        await asyncio.sleep(0.2)
        for p in protos:
            if p.fail:
                assert isinstance(await asyncio.wait_for(p.lost, 5), ValueError)
            else:
                assert p.got == b"hello" and not p.lost.done()
        assert [type(ctx["exception"]) for ctx in reported] == [ValueError, ValueError]
    finally:
        loop.set_exception_handler(None)
        for w in writers:
            w.close()
        peer.close()
