"""Copy bytes both ways between two `ByteStream`s: the last stage of every tunnel.

ztunnel `src/copy.rs` `copy_bidirectional`: the two directions run concurrently and independently
(`join!`, not `try_join!`): one side's EOF half-closes the other side (TCP FIN ↔ END_STREAM) while
the other direction keeps flowing. A reset (RST, RST_STREAM with an error) on either side aborts
the other side — TCP RST, or RST_STREAM CONNECT_ERROR (RFC 9113 §8.5; `HboneStream.abort`'s default)
— so its peer learns the bytes did not all arrive: never a silent truncation.
Buffering is bounded: read at most `read_bytes`, write, then `drain()` before reading again.

Two ways to run it, same semantics:
- the splice (`_Splice`): an `HboneStream` and a `TcpConnection` (what `TcpStream.connect` returns),
  the pair every HBONE terminator and originator relays. Bytes move inside the protocol callbacks
  (h2 DATA → `transport.write`; TCP `data_received` → stream send queue): no pump tasks, no future
  per read, no `asyncio.wait`. Backpressure is kept: HBONE DATA is acknowledged only once the TCP
  transport took it below its high-water mark (else when it resumes writing), and TCP reading pauses
  while the HBONE stream's send queue is above `stream_send_buffer`. Measured against the pump path
  over asyncio streams (benchmarks/relay.py, this 2-core machine, 2026-11): Python heap per idle
  tunnel 11.7 → 4.3 KB (tracemalloc), RSS per idle tunnel ~8.9 → 5.5 KiB, short tunnels 223 → 163 µs
  proxy CPU each, 1 MiB-frame upload 866 → 1 118 MB per proxy CPU-second (no task wake-ups per chunk).
- the pumps: any other pair of `ByteStream`s (PrefixedStream, TcpStream over asyncio streams...).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from hbone._conn import HboneStream
from hbone.socktransport import SocketTransport
from hbone.stream import DEFAULT_READ_BYTES, ByteStream, StreamReset, TcpConnection


@dataclass(frozen=True, slots=True)
class RelayResult:
    a_to_b: int
    b_to_a: int
    # Why the relay was cut short ("a: <error>" / "b: <error>"), or None if both sides ended cleanly.
    reset: str | None = None


def _splice_for(a: ByteStream, b: ByteStream) -> "_Splice | None":
    ca, cb = a.__class__, b.__class__
    if ca is HboneStream and cb is TcpConnection:
        return _Splice(a, b, True)  # type: ignore[arg-type]
    if ca is TcpConnection and cb is HboneStream:
        return _Splice(b, a, False)  # type: ignore[arg-type]
    return None


async def relay(a: ByteStream, b: ByteStream, *, read_bytes: int = DEFAULT_READ_BYTES) -> RelayResult:
    """Relay until both directions hit EOF, or one side resets (then both are aborted).
    Does not close the streams: the caller owns them."""
    splice = _splice_for(a, b)
    if splice is None:
        return await _pump_relay(a, b, read_bytes)
    # Awaited here rather than in a method coroutine: one coroutine frame less per idle tunnel.
    fut = splice.start()
    try:
        await fut
    except asyncio.CancelledError:
        splice.cancel()
        raise
    return splice.result()


def relay_detached(a: ByteStream, b: ByteStream, on_done: Callable[[RelayResult], None] | None = None) -> bool:
    """``relay`` for a spliceable pair (an ``HboneStream`` and a ``TcpConnection``) without awaiting
    it: returns True at once and calls ``on_done(result)`` from the event loop when the relay is
    over (same semantics and result as ``relay``). Returns False, starting nothing, for any other
    pair: the caller then awaits ``relay``. The streams stay the caller's to close in ``on_done``;
    without ``on_done`` the relay closes both itself when it is over (PERF NOTE: no closure kept per
    tunnel — 208 bytes each, tracemalloc, /tmp/hb7/mem_idle2.py 1000).

    Why: a handler that awaits ``relay`` keeps its task and three coroutine frames (the server's
    wrapper, the handler, relay) alive for the tunnel's whole life. Returning at once frees them;
    the splice is owned by its two streams (an HBONE connection cut or drained past its deadline
    aborts the stream, which fails the splice, which aborts the TCP side and calls ``on_done``).
    PERF NOTE (benchmarks/relay.py uses it; this 2-core machine): Python heap per idle tunnel
    4 377 → 2 885 bytes (tracemalloc, 1 000 idle tunnels, /tmp/perf/mem_idle.py vs mem_idle2.py);
    `python -m benchmarks --only short,idle --repeat 3 --clients python-h2`: RSS per idle tunnel
    5.47 → 5.00 KiB (1 000) and 5.88 → 5.77 KiB (8 000), short tunnels 147 → 140 µs proxy CPU.
    """
    splice = _splice_for(a, b)
    if splice is None:
        return False
    splice.start(_CLOSE_BOTH if on_done is None else on_done)
    return True


def _CLOSE_BOTH(_result: RelayResult) -> None:
    """Marker for _Splice.start: detached, closing both streams when over (never called)."""


class _Splice:
    """An HboneStream `h` and a TcpConnection `t` relayed inside their callbacks (see the module
    docstring). `h_is_a` maps the two directions back to relay()'s (a, b) for the result."""

    __slots__ = ("h", "t", "h_is_a", "h_to_t", "t_to_h", "h_done", "t_done", "unacked", "reset",
                 "fut", "t_paused", "h_buf", "h_nbuf", "h_since", "on_done", "over")

    def __init__(self, h: HboneStream, t: TcpConnection, h_is_a: bool):
        self.h = h
        self.t = t
        self.h_is_a = h_is_a
        self.h_to_t = 0  # bytes moved HBONE → TCP
        self.t_to_h = 0
        self.h_done = False  # HBONE → TCP direction finished (EOF passed on)
        self.t_done = False
        self.unacked = 0  # HBONE bytes written to TCP, to acknowledge once TCP drains
        self.reset: str | None = None
        self.fut: asyncio.Future | None = None  # relay(): awaited by the caller
        self.on_done: Callable[[RelayResult], None] | None = None  # relay_detached(): called instead
        self.over = False  # the relay is finished (both directions ended, or failed)
        self.t_paused = False  # we paused TCP reading: the HBONE send queue is full
        # HBONE DATA of the current data_received batch, not yet written (None: nothing; no list
        # kept per idle tunnel)
        self.h_buf: list[bytes] | None = None
        self.h_nbuf = 0  # bytes in h_buf
        self.h_since = 0  # the connection's read count when h_buf was started (hbone/_conn.py)

    def start(self, on_done: Callable[[RelayResult], None] | None = None) -> asyncio.Future | None:
        """Hook into both streams. Without ``on_done``, returns a future done when the relay is
        over; with it, ``on_done(result)`` is called (soon, from the loop) instead."""
        h, t = self.h, self.t
        if on_done is None:
            self.fut = h._conn.loop.create_future()
        elif on_done is not _CLOSE_BOTH:
            self.on_done = on_done
        h._splice = self
        t._splice = self
        self._pass_on_early()
        return self.fut

    def _finish(self) -> None:
        self.over = True
        if self.fut is not None:
            if not self.fut.done():  # cancelled with its awaiting task: relay() handles that
                self.fut.set_result(None)
        elif self.on_done is None:
            # relay_detached without a callback: close both now. Closing is safe inside their
            # protocol callbacks (the transports close on a later loop turn) and saves a loop
            # callback per tunnel.
            self._report()
        else:
            # call_soon: on_done is the caller's code; not from inside the streams' callbacks.
            self.h._conn.loop.call_soon(self._report)

    def _report(self) -> None:
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            on_done(self.result())
        else:  # relay_detached without on_done: the relay owns closing both streams
            self._unhook()
            self.h.close()
            self.t.close()

    def cancel(self) -> None:
        self._unhook()
        self.h.abort()
        self.t.abort()

    def result(self) -> RelayResult:
        self._unhook()
        if self.h_is_a:
            return RelayResult(self.h_to_t, self.t_to_h, self.reset)
        return RelayResult(self.t_to_h, self.h_to_t, self.reset)

    def _pass_on_early(self) -> None:
        """Pass on what arrived before the splice: buffered bytes, EOFs, errors."""
        h, t = self.h, self.t
        if h._error is not None:
            return self.h_error(h._error)
        if t._error is not None:
            return self.tcp_lost(None)
        if h._recv:
            chunks = list(h._recv)
            h._recv = None
            h._recv_bytes = 0
            for chunk in chunks:
                self.h_data(bytes(chunk))
        if t._chunks:
            chunks = t._chunks
            t._chunks = ()
            t._nbuf = 0
            if t._reading_paused:
                t._reading_paused = False
                t.transport.resume_reading()
            for chunk in chunks:
                self.tcp_data(chunk)
        if h._recv_eof or (h._done and h._error is None):
            self.h_eof()
        if t._eof:
            self.tcp_eof()
        elif t._lost:
            self.tcp_lost(None)

    def _unhook(self) -> None:
        if self.h._splice is self:
            self.h._splice = None
        if self.t._splice is self:
            self.t._splice = None
        self.h._conn.drain_waiting.discard(self.h)
        if self.t_paused:
            self.t_paused = False
            if not self.t._lost:
                self.t.transport.resume_reading()

    def _check_done(self) -> None:
        if self.h_done and self.t_done and not self.over:
            self._finish()

    def _fail(self, side: str, err: BaseException) -> None:
        if self.over:
            return
        self.reset = f"{side}: {err.__class__.__name__}: {err}"
        self._unhook()
        self.h.abort()
        self.t.abort()
        self._finish()

    def _side(self, h_to_t: bool) -> str:
        return "a->b" if h_to_t == self.h_is_a else "b->a"

    # -- HBONE → TCP --
    def h_data(self, data: bytes) -> None:
        """PERF NOTE: a 16 KiB-frame peer (Node/nghttp2, Envoy) sends 16 frames per 256 KiB TLS
        read; writing each to TCP was one send() syscall and one h2 ack per frame. Within one
        HboneConnection.data_received the frames are collected and written with one writelines
        (uvloop: one writev) and one ack, after the whole batch (`h_flush`). Measured in-process
        (/tmp/perf/prof_relay.py upload 1 GiB, node-http2 client, this 2-core machine, medians of 3):
        1.69 → 1.61 proxy CPU-s per GiB (635 → 667 MB per CPU-second)."""
        if self.h_done:
            return
        buf = self.h_buf
        if buf is None:
            conn = self.h._conn
            batch = conn.splice_writes
            self.h_buf = [data]
            self.h_nbuf = len(data)
            if batch is None:
                self.h_flush()
            else:
                self.h_since = conn.reads
                batch.append(self)
        else:
            buf.append(data)
            self.h_nbuf += len(data)

    def h_flush(self, eof: bool = False) -> None:
        """Write the batch's HBONE DATA to TCP. ``eof`` (from h_eof, the peer's END_STREAM came in
        the same batch): over a ``SocketTransport`` the FIN leaves with the last bytes
        (``writelines_eof``: one segment instead of two)."""
        buf = self.h_buf
        if buf is None:
            return
        self.h_buf = None
        if self.h_done or self.over:
            return  # ended or failed meanwhile
        t = self.t
        if t._lost:
            self._fail(self._side(True), t._error or StreamReset("TCP connection lost"))
            return
        transport = t.transport
        if eof and transport.__class__ is SocketTransport and not t._eof_sent:
            n = sum(map(len, buf))
            t._eof_sent = True
            transport.writelines_eof(buf)
        elif len(buf) == 1:
            n = len(buf[0])
            transport.write(buf[0])
        else:
            n = sum(map(len, buf))
            transport.writelines(buf)
        self.h_to_t += n
        if t._write_paused:
            self.unacked += n  # acknowledged when the TCP transport drains (tcp_writable)
        else:
            self.h._conn.ack(self.h.stream_id, n)

    def h_eof(self) -> None:
        if self.h_done:
            return
        self.h_flush(True)  # bytes before the EOF go first
        if self.over:
            return  # the flush found TCP gone and failed the relay
        self.h_done = True
        if self.unacked:
            self.h._conn.ack(self.h.stream_id, self.unacked)
            self.unacked = 0
        self.t.write_eof()
        self._check_done()

    def h_error(self, err: StreamReset) -> None:
        self._fail(self._side(True), err)

    def tcp_writable(self) -> None:
        if self.unacked:
            n, self.unacked = self.unacked, 0
            self.h._conn.ack(self.h.stream_id, n)

    # -- TCP → HBONE --
    def tcp_data(self, data: bytes) -> None:
        if self.t_done:
            return
        h = self.h
        try:
            h.write(data)
        except StreamReset as err:
            self._fail(self._side(False), err)
            return
        self.t_to_h += len(data)
        conn = h._conn
        if not self.t_paused and conn.core.pending(h.stream_id) > conn.settings.stream_send_buffer:
            self.t_paused = True
            self.t.transport.pause_reading()
            conn.drain_waiting.add(h)  # flush_now calls h._wake_drain → h_writable

    def h_writable(self) -> None:
        h = self.h
        if self.t_paused and h._conn.core.pending(h.stream_id) <= h._conn.settings.stream_send_buffer:
            self.t_paused = False
            h._conn.drain_waiting.discard(h)
            if not self.t._lost:
                self.t.transport.resume_reading()

    def tcp_eof(self) -> None:
        if self.t_done:
            return
        self.t_done = True
        self.h.write_eof()
        self._check_done()

    def tcp_lost(self, exc: BaseException | None) -> None:
        t = self.t
        if t._error is not None:
            self._fail(self._side(False), t._error)
        elif not (self.t_done and self.h_done):
            self._fail(self._side(False), StreamReset("TCP connection closed"))


async def _pump_relay(a: ByteStream, b: ByteStream, read_bytes: int) -> RelayResult:
    counts = [0, 0]

    async def pump(src: ByteStream, dst: ByteStream, idx: int) -> None:
        while True:
            data = await src.read(read_bytes)
            if not data:
                break
            dst.write(data)
            counts[idx] += len(data)
            await dst.drain()  # backpressure: a slow dst stalls this direction only
        dst.write_eof()
        await dst.drain()

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(a, b, 0)), loop.create_task(pump(b, a, 1))]
    reset: str | None = None
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                exc = failed[0].exception()
                side = "a->b" if failed[0] is tasks[0] else "b->a"
                reset = f"{side}: {exc.__class__.__name__}: {exc}"
                for t in pending:
                    t.cancel()
                a.abort()
                b.abort()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
                for t in tasks:  # retrieve the other side's error, if any, so it is not logged
                    if t.done() and not t.cancelled():
                        t.exception()
                if not isinstance(exc, (StreamReset, ConnectionError, OSError)):
                    raise exc
                break
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        a.abort()
        b.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return RelayResult(counts[0], counts[1], reset)
