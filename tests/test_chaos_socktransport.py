"""Chaos / property tests for hbone.socktransport.SocketTransport over real loopback sockets: random
schedules of writes (0..1 MiB, writelines, write_eof), pause/resume of reading, a peer that reads
slowly, in bursts or not at all for a while, half-closes each way and aborts (RST) at random moments.
What must hold (the tunnel contract, DESIGN §7 "loses nothing that was already accepted"): every
byte accepted before a clean end arrives, in order; a cut is reported as an error (a reset at the
peer, ``connection_lost(exc)`` with ``exc`` not None here), never as a clean end; nothing hangs
(each example runs under a deadline); the write queue never exceeds the high-water mark plus one
write. The unit tests (tests/test_hbone_socktransport.py) cover each path once; these mix them."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from hbone.socktransport import READ_BYTES, WRITE_HIGH_WATER_BYTES, SocketTransport
from hbone.testing import LOOPS, run
from tests.chaos_helpers import pattern, reader_ops, writer_ops

KiB = 1024
MiB = 1024 * KiB
EXAMPLE_DEADLINE_S = 20.0  # a hang fails the example; generous on a loaded 2-core box
_LINGER_RST = struct.pack("ii", 1, 0)  # close() sends RST: what TcpConnection.abort does


class Recorder(asyncio.Protocol):
    """Our side's protocol: records every callback and the transport's queue high mark."""

    def __init__(self, in_callback=()) -> None:
        # (n, action): what the protocol itself does in its n-th data_received, as TcpConnection
        # and the splice do: "pause" (resume on a later turn), "abort" (RST), "raise" (a bug)
        self.in_callback = dict(in_callback)
        self.calls = 0
        self.failed = False                     # aborted or raised inside a callback
        self.raised = False
        self.got = bytearray()
        self.eof = False
        self.lost: list = []                    # [exc] once connection_lost came
        self.paused_writing = False
        self.resumed = asyncio.Event()
        self.done = asyncio.Event()
        self.event = asyncio.Event()            # set on every callback: waiters re-check
        self.after_eof_data = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert not self.lost, "data after connection_lost"
        self.after_eof_data |= self.eof
        self.got += data
        self.event.set()
        self.calls += 1
        action = self.in_callback.get(self.calls)
        t = self.transport
        if action == "pause":
            t.pause_reading()
            asyncio.get_running_loop().call_later(0.005, t.resume_reading)
        elif action == "abort":
            self.failed = True
            t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            t.abort()
        elif action == "raise":
            self.failed = self.raised = True
            raise RuntimeError("a protocol bug (chaos test)")

    def eof_received(self) -> bool:
        assert not self.eof, "eof_received twice"
        self.eof = True
        self.event.set()
        return True  # half-close: our sending side stays open

    def pause_writing(self) -> None:
        assert not self.paused_writing
        self.paused_writing = True
        self.resumed.clear()

    def resume_writing(self) -> None:
        assert self.paused_writing
        self.paused_writing = False
        self.resumed.set()

    def connection_lost(self, exc) -> None:
        assert not self.lost, "connection_lost twice"
        self.lost.append(exc)
        self.resumed.set()  # a writer waiting for resume_writing must wake up
        self.done.set()
        self.event.set()


sizes = st.one_of(st.integers(0, 300), st.integers(0, 70 * KiB), st.integers(0, MiB),
                  st.sampled_from([READ_BYTES, WRITE_HIGH_WATER_BYTES, WRITE_HIGH_WATER_BYTES + 1]))
our_op = st.one_of(
    st.tuples(st.just("write"), sizes),
    st.tuples(st.just("writelines"), st.lists(sizes, min_size=0, max_size=5)),
    st.tuples(st.just("pause_reading")),
    st.tuples(st.just("resume_reading")),
    st.tuples(st.just("sleep"), st.integers(0, 30)),
    st.tuples(st.just("write_eof")),
    st.tuples(st.just("close")),
    st.tuples(st.just("abort")),
)
peer_op = writer_ops(sizes, 40)
peer_read = reader_ops(2 * MiB, 40)


def _dial(addr: tuple[str, int]) -> socket.socket:
    """A non-blocking socket connecting to ``addr`` (the handshake completes once the listener accepts)."""
    ours = socket.socket()
    ours.setblocking(False)
    try:
        ours.connect(addr)
    except BlockingIOError:
        pass
    return ours


async def _socket_pair(ip: str) -> tuple[socket.socket, socket.socket]:
    """(our socket, the peer's socket): a real loopback TCP connection, both non-blocking."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind((ip, 0))
    lsock.listen(1)
    ours = _dial(lsock.getsockname())
    peer, _ = await loop.sock_accept(lsock)
    lsock.close()
    peer.setblocking(False)
    return ours, peer


async def _connected(ip: str, in_callback=()):
    """(our SocketTransport + Recorder, the peer's socket): a real loopback TCP connection."""
    loop = asyncio.get_running_loop()
    ours, peer = await _socket_pair(ip)
    proto = Recorder(in_callback)
    SocketTransport(loop, ours, proto)
    return proto, peer


async def _schedule(ip: str, ours_ops, peer_ops, peer_reads, in_callback=()) -> None:
    loop = asyncio.get_running_loop()
    proto, peer = await _connected(ip, in_callback)
    t: SocketTransport = proto.transport
    high = t.get_write_buffer_limits()[1]

    sent = 0                  # bytes we handed to the transport
    sent_at_eof = None        # ... when we called write_eof/close (a clean end after them)
    we_aborted = False
    closed_early = False      # our close() before reading the peer's end (unread bytes: RST)
    peer_sent = 0
    peer_sent_at_eof = None
    peer_aborted = False
    peer_got = bytearray()
    peer_end = None           # "eof" | "reset"
    peer_write_failed = False
    peer_wlock = asyncio.Lock()

    async def ours() -> None:
        nonlocal sent, sent_at_eof, we_aborted, closed_early
        for op in ours_ops:
            if t.is_closing() or proto.lost:
                return
            kind = op[0]
            if kind in ("write", "writelines"):
                if sent_at_eof is not None:
                    continue  # write after write_eof raises: not a schedule we test
                # backpressure as a producer honours it (TcpConnection.drain): wait for resume
                while proto.paused_writing and not proto.lost:
                    await proto.resumed.wait()
                if proto.lost:
                    return
                if kind == "write":
                    data = pattern(sent, op[1])
                    t.write(data)
                    sent += len(data)
                    one = len(data)
                else:
                    chunks = []
                    for n in op[1]:
                        chunks.append(pattern(sent, n))
                        sent += n
                    t.writelines(chunks)
                    one = sum(op[1])
                # bounded: what backpressure allows plus this one write
                assert t.get_write_buffer_size() <= high + one, (t.get_write_buffer_size(), high, one)
            elif kind == "pause_reading":
                t.pause_reading()
            elif kind == "resume_reading":
                t.resume_reading()
            elif kind == "sleep":
                await asyncio.sleep(op[1] / 1000)
            elif kind == "write_eof":
                if sent_at_eof is None:
                    sent_at_eof = sent
                t.write_eof()
            elif kind == "close":
                if sent_at_eof is None:
                    sent_at_eof = sent
                closed_early = True
                t.close()
                return
            elif kind == "abort":
                we_aborted = True
                t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                t.abort()
                return
            await asyncio.sleep(0)
        # the end of our schedule: read everything (the peer always ends its side), then close
        t.resume_reading()
        while not (proto.eof or proto.lost):
            proto.event.clear()
            await proto.event.wait()
        if sent_at_eof is None and not t.is_closing():
            sent_at_eof = sent   # our close() below is the clean end (not one the transport made)
        t.close()

    async def peer_writer() -> None:
        nonlocal peer_sent, peer_sent_at_eof, peer_aborted, peer_write_failed
        try:
            for op in peer_ops:
                kind = op[0]
                if kind == "write" and peer_sent_at_eof is None:
                    data = pattern(peer_sent, op[1])
                    await loop.sock_sendall(peer, data)
                    peer_sent += len(data)
                elif kind == "stall":
                    await asyncio.sleep(op[1] / 1000)
                elif kind == "write_eof" and peer_sent_at_eof is None:
                    peer_sent_at_eof = peer_sent
                    peer.shutdown(socket.SHUT_WR)
                elif kind == "abort":
                    peer_aborted = True
                    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                    r.cancel()
                    await asyncio.sleep(0)
                    peer.close()  # RST
                    return
            if peer_sent_at_eof is None:
                peer_sent_at_eof = peer_sent
                peer.shutdown(socket.SHUT_WR)
        except OSError:
            # our abort/close. Linux reports a reset once, to whichever call comes first: a send
            # that took it leaves the reader a plain EOF, so the writer's error counts as the reset.
            peer_write_failed = True

    async def peer_reader() -> None:
        nonlocal peer_end
        try:
            for op in peer_reads:
                if peer_aborted:
                    return
                if op[0] == "stall":
                    await asyncio.sleep(op[1] / 1000)
                    continue
                data = await loop.sock_recv(peer, op[1])
                if not data:
                    peer_end = "eof"
                    return
                peer_got.extend(data)
            while not peer_aborted:
                data = await loop.sock_recv(peer, MiB)
                if not data:
                    peer_end = "eof"
                    return
                peer_got.extend(data)
        except OSError:
            peer_end = "reset"

    w = asyncio.ensure_future(peer_writer())
    r = asyncio.ensure_future(peer_reader())
    try:
        async with asyncio.timeout(EXAMPLE_DEADLINE_S):
            for res in await asyncio.gather(ours(), w, r, return_exceptions=True):
                if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                    raise res
            await proto.done.wait()   # connection_lost always comes
    except TimeoutError:
        raise AssertionError(
            f"hang: ours lost={proto.lost} eof={proto.eof} queued={t.get_write_buffer_size()} "
            f"reading={t.is_reading()} got={len(proto.got)}/{peer_sent} peer_end={peer_end} "
            f"peer_got={len(peer_got)}/{sent}") from None
    finally:
        w.cancel()
        r.cancel()
        peer.close()

    we_aborted |= proto.failed
    # what the peer got: a prefix of what we sent, all of it if it saw a clean end
    assert bytes(peer_got) == pattern(0, len(peer_got)), "reordered or corrupted toward the peer"
    assert len(peer_got) <= sent
    if peer_end == "eof" and peer_write_failed:
        peer_end = "reset"    # the reset went to the writer (see peer_writer)
    if peer_end == "eof":
        assert not we_aborted or sent_at_eof is not None, "our abort looked like a clean end"
        assert len(peer_got) == sent_at_eof, f"clean end after {len(peer_got)} of {sent_at_eof} bytes"
    elif not peer_aborted:
        assert peer_end == "reset" and (we_aborted or closed_early), f"the peer saw {peer_end}"
    # what we got: a prefix of what the peer sent, all of it if we saw a clean end
    assert bytes(proto.got) == pattern(0, len(proto.got)), "reordered or corrupted toward us"
    assert len(proto.got) <= peer_sent
    assert not proto.after_eof_data
    (exc,) = proto.lost
    if proto.eof:
        assert len(proto.got) == peer_sent_at_eof, f"clean end after {len(proto.got)} of {peer_sent_at_eof}"
    if peer_aborted and not (we_aborted or closed_early or proto.eof):
        # the peer's RST while we were still reading: an error, never a clean end
        assert exc is not None, "the peer's reset was reported as a clean close"
    if proto.raised:
        assert isinstance(exc, RuntimeError), f"a failing callback ended with {exc!r}"
    if not peer_aborted and not we_aborted:
        assert exc is None, exc
        if not closed_early:
            assert proto.eof and len(proto.got) == peer_sent


async def _checked(main) -> None:
    """Run `main` with the loop's exception handler recording: a protocol callback that fails is
    reported there (as asyncio's transports do); only the chaos test's own RuntimeError may be."""
    reported: list = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: reported.append(ctx))
    await main
    for ctx in reported:
        assert isinstance(ctx.get("exception"), RuntimeError), ctx


in_callback = st.lists(st.tuples(st.integers(1, 8), st.sampled_from(["pause", "pause", "abort", "raise"])),
                       max_size=2)


@hsettings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(loop=st.sampled_from(LOOPS),
       ours_ops=st.lists(our_op, max_size=12),
       peer_ops=st.lists(peer_op, max_size=6),
       peer_reads=st.lists(peer_read, max_size=6),
       in_cb=in_callback)
def test_random_schedules_conserve_bytes_or_report_a_reset(loopback_ip, loop, ours_ops, peer_ops, peer_reads,
                                                           in_cb):
    run(loop, lambda: _checked(_schedule(loopback_ip(), ours_ops, peer_ops, peer_reads, in_cb)))


@hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(loop=st.sampled_from(LOOPS),
       schedules=st.lists(st.tuples(st.lists(our_op, max_size=8), st.lists(peer_op, max_size=4),
                                    st.lists(peer_read, max_size=4), in_callback),
                          min_size=2, max_size=6))
def test_concurrent_schedules_share_the_poller_without_losing_a_wakeup(loopback_ip, loop, schedules):
    """Several connections on one loop's epoll at once: their events come in the same batches,
    connections end and new ones start (fd numbers reused) mid-batch; each keeps the contract."""
    async def main():
        await asyncio.gather(*(_schedule(loopback_ip(), *sch) for sch in schedules))
    run(loop, lambda: _checked(main()))


def test_a_reset_right_after_data_is_a_reset_not_a_clean_end(loopback_ip):
    """Found by the schedule test above (peer_ops=[write 1, abort]): the peer's bytes and its RST
    reach us before we poll, so one edge reports EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR. The
    read returns the bytes; taking EPOLLRDHUP for a FIN then ended the stream cleanly
    (eof_received) and the reset was never reported: a pod that crashed mid-response looked like
    one that finished (a relay would pass END_STREAM, not RST_STREAM)."""
    async def main(ip: str):
        for paused in (False, True):
            proto, peer = await _connected(ip)
            t = proto.transport
            if paused:
                t.pause_reading()
            peer.sendall(b"partial response")
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            peer.close()
            await asyncio.sleep(0.05)
            t.resume_reading()
            await asyncio.wait_for(proto.done.wait(), 5)
            assert bytes(proto.got) == b"partial response"
            assert not proto.eof, "the reset was taken for a FIN"
            assert isinstance(proto.lost[0], ConnectionResetError), proto.lost

    for loop in LOOPS:
        run(loop, lambda: main(loopback_ip()))


def test_a_failing_callback_with_writes_queued_is_a_reset_at_the_peer(loopback_ip):
    """Found with the in-callback actions above (made deterministic here): a protocol callback that
    raises ends its connection (connection_lost(exc), as asyncio's transports do), dropping what was
    queued; the socket was then closed with a FIN, so the peer read a clean end after a part of the
    bytes (3.9 of 8 MB): a silent truncation. It must be a reset."""
    async def main(ip: str):
        asyncio.get_running_loop().set_exception_handler(lambda _loop, _ctx: None)
        proto, peer = await _connected(ip, [(1, "raise")])
        t = proto.transport
        t.write(pattern(0, 32 * MiB))           # more than both socket buffers: part stays queued
        assert t.get_write_buffer_size() > 0
        peer.sendall(b"x")                       # our data_received raises
        await asyncio.wait_for(proto.done.wait(), 5)
        assert isinstance(proto.lost[0], RuntimeError)
        loop = asyncio.get_running_loop()
        got = 0
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                while data := await loop.sock_recv(peer, MiB):
                    got += len(data)
        assert got < 32 * MiB
        peer.close()

    for loop in LOOPS:
        run(loop, lambda: main(loopback_ip()))


def test_more_ready_sockets_than_one_poll_takes_all_get_their_bytes_and_end(loopback_ip):
    """MAX_EVENTS + 100 connections made ready at once (bytes then FIN, or bytes then RST): one
    epoll_wait returns at most MAX_EVENTS of them; the rest must come on the next call (our epoll fd
    stays readable for the loop), none lost. Every third one also has reading paused and resumed."""
    from hbone.socktransport import MAX_EVENTS

    async def main(ip: str):
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind((ip, 0))
        lsock.listen(MAX_EVENTS + 200)
        lsock.setblocking(False)
        pairs = []
        try:
            for i in range(MAX_EVENTS + 100):
                ours = _dial(lsock.getsockname())
                peer, _ = await loop.sock_accept(lsock)
                proto = Recorder()
                SocketTransport(loop, ours, proto)
                pairs.append((proto, peer))
            for i, (proto, peer) in enumerate(pairs):
                if i % 3 == 0:
                    proto.transport.pause_reading()
            for i, (proto, peer) in enumerate(pairs):   # all in one loop turn: one big batch
                peer.send(pattern(i, 100 + i))
                if i % 2:
                    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                    peer.close()
                else:
                    peer.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.01)
            for i, (proto, peer) in enumerate(pairs):
                if i % 3 == 0:
                    proto.transport.resume_reading()
            async with asyncio.timeout(10):
                for i, (proto, peer) in enumerate(pairs):
                    while not (proto.eof or proto.lost):
                        proto.event.clear()
                        await proto.event.wait()
            for i, (proto, peer) in enumerate(pairs):
                assert bytes(proto.got) == pattern(i, 100 + i), i
                if i % 2:
                    assert not proto.eof and isinstance(proto.lost[0], ConnectionResetError), (i, proto.lost)
                else:
                    assert proto.eof and not proto.lost, i
        finally:
            for proto, peer in pairs:
                proto.transport.abort()
                peer.close()
            lsock.close()
            await asyncio.sleep(0)

    for loop in LOOPS:
        run(loop, lambda: main(loopback_ip()))


class _WritesOnResume(Recorder):
    """A protocol that, told it may write again, writes its last bytes and ends its side at once
    (asyncio allows it: its transport's _write_ready notes "May append to buffer")."""

    def __init__(self, last: bytes, end: str) -> None:
        super().__init__()
        self.last, self.end = last, end

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.last:
            last, self.last = self.last, b""
            self.transport.write(last)
            self.transport.write_eof() if self.end == "write_eof" else self.transport.close()


def test_bytes_written_inside_resume_writing_then_eof_or_close_all_arrive(loopback_ip):
    """Found by reading _write_ready against asyncio's: after resume_writing it went on to the FIN
    (write_eof) or the end of the connection (close) without looking at what resume_writing had
    queued meanwhile, so the peer read a clean end without those bytes."""
    async def main(ip: str, end: str):
        loop = asyncio.get_running_loop()
        ours, peer = await _socket_pair(ip)
        first, last = pattern(0, 16 * MiB), pattern(16 * MiB, 16 * MiB)
        proto = _WritesOnResume(last, end)
        t = SocketTransport(loop, ours, proto)
        t.write(first)                       # above the high-water mark: pause_writing, later resume
        assert proto.paused_writing
        got = bytearray()
        async with asyncio.timeout(10):
            while data := await loop.sock_recv(peer, MiB):
                got += data
        peer.close()
        assert len(got) == len(first) + len(last) and bytes(got) == first + last, (end, len(got))
        if end == "close":
            await asyncio.wait_for(proto.done.wait(), 5)
            assert proto.lost == [None]
        else:
            t.close()

    for loop in LOOPS:
        for end in ("write_eof", "close"):
            run(loop, lambda: main(loopback_ip(), end))
