"""The asyncio shell around the sans-IO core: one `asyncio.Protocol` per HBONE connection (a plain
TCP transport, with TLS done by hbone/_tls.py), and the `ByteStream` each HBONE stream is to the
rest of the proxy.

Why a Protocol and not StreamReader/Writer: each TCP read is decrypted whole (up to ~256 KiB of
plaintext) and fed straight into h2, saving a copy and a task wake-up per chunk. Writes are
coalesced: stream writes only queue in the core; one `SSLObject.write` and one `transport.write()`
per loop turn carry every frame produced since (performance.md: "one write per loop turn" helps).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections import deque
from typing import Callable

from hbone import _tls
from hbone import protocol as P
from hbone.protocol import ErrorCodes
from hbone.settings import HboneSettings
from hbone.stream import DEFAULT_READ_BYTES, StreamReset

log = logging.getLogger("hbone")

# Spliced HBONE -> TCP bytes held across TLS reads (hbone/relay.py `_Splice.h_data`). When the peer
# multiplexes many bulk tunnels (nghttp2 sends one 16 KiB frame per stream in turn), a 256 KiB read
# holds ~16 frames of ~16 different streams: writing each at the read's end was one send() and one
# window acknowledgement per 16 KiB frame. While the connection is streaming (reads of at least
# SPLICE_DEFER_MIN_READ bytes), a stream's bytes wait for more of its own frames, up to
# SPLICE_DEFER_BYTES or SPLICE_DEFER_READS reads, whichever first; as soon as a loop turn brings no
# read, everything held is written (HboneConnection._defer_check). Bytes are acknowledged when
# written, as before: holding them only delays the window hand-back, never loses or over-acks them.
# PERF NOTE (/tmp/h8/prof_relay.py multi 256 MiB, node-http2 client, 64 tunnels, benchmarks.relay
# in-process, this 2-core machine): see HboneConnection._end_batch.
SPLICE_DEFER = True
SPLICE_DEFER_MIN_READ = 128 * 1024  # bytes: a read this large means the peer is streaming (max 256 KiB)
SPLICE_DEFER_BYTES = 64 * 1024  # bytes per stream: 4 x 16 KiB frames per TCP write
SPLICE_DEFER_READS = 8  # reads: at most ~2 MiB held per connection, ~2 ms at 1 GB/s

_ping_ids = itertools.count(1)

# Skip HboneConnection.tls_data's flush after a read that left nothing to send (see there); False: flush
# after every read (what the skip is tested against: tests/test_perf_s4_writes.py).
# PERF NOTE (this 2-core box, shared; A/B alternating with the previous tree, 3 x each, medians of 5):
# small messages at low load pay a fixed cost per read and per flush, so each empty flush counted.
# `/tmp/s4h/rr.py 1 3000 5` (HboneServer + HbonePool in one process, a task on each side ping-ponging
# 200-byte messages: the waypoint's kind of stream): 36.5 / 35.7 / 35.6 -> 34.9 / 34.5 / 35.1 us per
# round trip; 64 tunnels at once (`rr.py 64 100 5`) 8.86 / 8.83 / 8.90 -> 8.86 / 8.81 / 8.86 (no change:
# reads there carry many frames). With HboneConnection.ack's skip, `/tmp/s4h/rr_splice.py 1 2000 5` (the
# server splices each tunnel to a TCP echo, as the node proxies do): 52.6 / 51.7 / 51.6 -> 49.3 / 48.8 /
# 48.9 us per round trip; 64 tunnels 19.5 / 20.0 / 19.7 -> 19.6 / 19.3 / 19.8. Flushes on the spliced
# side: 3 -> 1 per message (tests/test_perf_s4_writes.py). The HTTP scenario's mesh, both trees' meshes
# alive at once and httpload runs alternating between them (/tmp/s4h/ab2.py --rounds 8, 2 s runs, paired
# medians): all three proxies at c=1 351.9 -> 330.3 us per request (lower in 8 of 8 pairs; node-a -10,
# node-b -8, waypoint -6), at a fixed 1 000/s 434.9 -> 407.5 (7 of 8), at c=64 96.4 -> 97.1 (no change);
# `python -m benchmarks --only http --repeat 1 --http-seconds 3 --no-install`, 3 alternations: c=1
# 300 -> 291, c=64 83 -> 78, 1 000/s 377 -> 383 (noise).
_QUIET_READ = True


class HboneStream:
    """One CONNECT tunnel as a `ByteStream` (see hbone/stream.py for the contract).

    - read: b"" after END_STREAM or RST_STREAM NO_ERROR/CANCEL; `StreamReset` on other codes or if
      the connection died first. Bytes are acknowledged (window handed back) as `read` returns them.
    - write/drain: `drain` blocks while more than `settings.stream_send_buffer` bytes wait for the
      peer's flow-control window (or for a slow TLS transport).
    - write_eof: END_STREAM after queued bytes. abort: RST_STREAM CANCEL.
    - close: END_STREAM after queued bytes; if the peer is still sending, RST_STREAM NO_ERROR
      (a clean end) once our END_STREAM has left — we will not read any more.
    """

    __slots__ = ("_conn", "stream_id", "local_addr", "remote_addr", "_recv", "_recv_bytes",
                 "_recv_eof", "_error", "_read_waiter", "_drain_waiter", "_eof_sent", "_closing",
                 "_done", "_done_fut", "bytes_received", "bytes_sent", "_splice", "_on_lost", "__weakref__")

    def __init__(self, conn: "HboneConnection", stream_id: int):
        self._conn = conn
        self.stream_id = stream_id
        self.local_addr: tuple[str, int] = conn.local_addr
        self.remote_addr: tuple[str, int] = conn.remote_addr
        # Created on first buffered chunk: an empty deque is 624 bytes, and a spliced stream
        # (hbone/relay.py) never buffers.
        self._recv: deque[bytes] | None = None
        self._recv_bytes = 0
        self._recv_eof = False
        self._error: StreamReset | None = None
        self._read_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._eof_sent = False
        self._closing = False
        self._done = False
        self._done_fut: asyncio.Future | None = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self._splice = None  # hbone.relay._Splice while spliced to a TcpConnection
        self._on_lost: Callable[[StreamReset], None] | None = None   # see watch_lost

    # -- fed by the connection --
    def _feed(self, data: bytes) -> None:
        if self._closing and self._eof_sent:
            self._conn.core.ack(self.stream_id, len(data))  # close(): we read no more
            return
        splice = self._splice
        if splice is not None:
            self.bytes_received += len(data)
            splice.h_data(data)
            return
        recv = self._recv
        if recv is None:
            recv = self._recv = deque()
        recv.append(data)
        self._recv_bytes += len(data)
        self.bytes_received += len(data)
        w = self._read_waiter  # (_wake_reader, inlined: once per DATA frame)
        if w is not None and not w.done():
            w.set_result(None)

    def _feed_eof(self) -> None:
        self._recv_eof = True
        if self._splice is not None:
            self._splice.h_eof()
        self._wake_reader()

    def _fail(self, err: StreamReset) -> None:
        if self._error is None and not self._done:
            self._error = err
            if self._splice is not None:
                self._splice.h_error(err)
            if self._on_lost is not None:
                self._lost(err)
        self._wake_reader()
        self._wake_drain()

    def _lost(self, err: StreamReset) -> None:
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            try:
                on_lost(err)
            except Exception:   # noqa: BLE001 — a watcher's fault must not stop the connection failing its streams
                log.exception("HBONE stream %d: its loss watcher failed", self.stream_id)

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake_drain(self) -> None:
        if self._splice is not None:
            self._splice.h_writable()
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _finish(self) -> None:
        """Both directions are over (or the stream/connection was reset)."""
        self._done = True
        if self._on_lost is not None and not self._eof_sent:
            # Over before our END_STREAM: the peer reset it with NO_ERROR/CANCEL (read as a clean end, but
            # nothing can be written any more).
            self._lost(StreamReset("the peer closed the stream before it was answered"))
        self._wake_reader()
        self._wake_drain()
        if self._done_fut is not None and not self._done_fut.done():
            self._done_fut.set_result(None)

    # -- ByteStream --
    @property
    def buffered(self) -> int:
        """Received bytes waiting to be read (never more than the stream window)."""
        return self._recv_bytes

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        while not self._recv:
            if self._error is not None:
                raise self._error
            if self._recv_eof or self._done:
                return b""
            self._read_waiter = self._conn.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        chunk = self._recv[0]
        if len(chunk) <= max_bytes:
            self._recv.popleft()  # the common case: hand h2's bytes object over, no copy
        else:
            # Split through a memoryview so the remainder is not copied on every partial read.
            view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
            self._recv[0] = view[max_bytes:]
            chunk = view[:max_bytes]
        if isinstance(chunk, memoryview):
            chunk = chunk.tobytes()
        n = len(chunk)
        self._recv_bytes -= n
        # The bytes are consumed: hand their window back. A flush is scheduled only when that queued a
        # WINDOW_UPDATE (h2 hands window back once half a window was consumed), not on every read.
        # PERF NOTE (/tmp/wph/shell_rr.py: HboneConnection + ServerCore in-process over a fake
        # transport, 64 tunnels each served by a task reading one 200-byte request and writing a
        # 150-byte answer + drain; CPU per request-response, min of 9, alternating 2x): with _feed's
        # inlined wake-up, ServerCore.receive_data's settings shortcut and 5b.'s inlined window
        # accounting 4.35 -> 4.19 us; 5.53 us before this session's h2 send/ack cuts (7b./7c.).
        conn = self._conn
        if conn.core.ack(self.stream_id, n):
            conn.schedule_flush()
        return chunk

    # -- callbacks instead of read(): a listener (proxy.pipeline.lean; hbone.relay's splice uses the slot itself) --
    def listen(self, listener) -> None:
        """Hand what arrives to ``listener`` from inside the connection's callbacks instead of buffering it for
        ``read``: ``h_data(bytes)`` (acknowledge each with ``ack``), ``h_eof()``, ``h_error(StreamReset)`` and
        ``h_writable()`` (after ``over_send_buffer`` said True). ``None``: back to ``read``. What arrived before
        stays buffered: see ``take_buffered``, ``_recv_eof``/``_error`` via ``at_eof``/``error``."""
        self._splice = listener

    def watch_lost(self, on_lost: Callable[[StreamReset], None] | None) -> None:
        """Call ``on_lost(err)`` once if the stream is lost to the peer before our END_STREAM: reset with an error
        code, reset clean (NO_ERROR/CANCEL: ``read`` sees an end, yet nothing can be written any more), or its
        connection died. Not for ``abort``/``close`` of ours. ``None``: stop watching. Called before a reader or
        drainer waiting on this stream wakes (``waiting``), so the watcher can tell it would see the loss itself.
        What a server uses to stop work done for a client that is gone (proxy/pipeline/http.py: Envoy's HCM
        resets the upstream request when its downstream disconnects). Already lost: called at once."""
        self._on_lost = on_lost
        if on_lost is not None and self.lost:
            self._lost(self._error or StreamReset("the peer closed the stream before it was answered"))

    @property
    def lost(self) -> bool:
        """Lost to the peer before our END_STREAM (what ``watch_lost`` reports): reset, or over without our end."""
        return self._error is not None or (self._done and not self._eof_sent)

    @property
    def waiting(self) -> bool:
        """A task waits in ``read`` or ``drain`` on this stream and has not been woken yet (so it will see what
        happens to it; one already woken by data may go on to serve that data)."""
        r, d = self._read_waiter, self._drain_waiter
        return (r is not None and not r.done()) or (d is not None and not d.done())

    def take_buffered(self) -> list[bytes]:
        """The bytes received and not yet read (a listener's to acknowledge with ``ack``)."""
        recv = self._recv
        if not recv:
            return []
        self._recv = None
        self._recv_bytes = 0
        return [bytes(chunk) for chunk in recv]

    def ack(self, n: int) -> None:
        """``n`` received bytes are consumed: their flow-control window goes back to the peer."""
        self._conn.ack(self.stream_id, n)

    @property
    def at_eof(self) -> bool:
        """The peer ended its side (END_STREAM), or the stream is over."""
        return self._recv_eof or self._done

    @property
    def error(self) -> StreamReset | None:
        return self._error

    def over_send_buffer(self) -> bool:
        """More than ``settings.stream_send_buffer`` bytes wait to leave (what ``drain`` waits on); then the
        listener's ``h_writable`` is called once they are down to it (and may ask again)."""
        conn = self._conn
        if conn.core.pending(self.stream_id) <= conn.settings.stream_send_buffer:
            conn.drain_waiting.discard(self)
            return False
        conn.drain_waiting.add(self)
        return True

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._eof_sent or self._done:
            raise StreamReset("write after write_eof/close on an HBONE stream")
        if data:
            self.bytes_sent += len(data)
            self._conn.core.send(self.stream_id, data)
            self._conn.schedule_flush()

    async def drain(self) -> None:
        conn = self._conn
        bound = conn.settings.stream_send_buffer
        while conn.core.pending(self.stream_id) > bound:
            if self._error is not None:
                raise self._error
            if self._done:
                return
            self._drain_waiter = conn.loop.create_future()
            conn.drain_waiting.add(self)
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
                conn.drain_waiting.discard(self)
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        if self._eof_sent or self._done or self._error is not None:
            return
        self._eof_sent = True
        self._conn.core.end_stream(self.stream_id)
        self._conn.watch_done(self.stream_id)
        self._conn.schedule_flush()

    def close(self) -> None:
        if self._done:
            return
        self._on_lost = None   # (our own doing)
        self._closing = True
        # Anything unread will never be read: hand its window back now.
        if self._recv_bytes:
            self._conn.ack(self.stream_id, self._recv_bytes)
            self._recv = None
            self._recv_bytes = 0
        self.write_eof()

    def abort(self, code: int = ErrorCodes.CONNECT_ERROR) -> None:
        """RST_STREAM `code`. The ByteStream contract says abort() must tell the peer that bytes did
        not all arrive, and HBONE peers (ztunnel, ours) read CANCEL/NO_ERROR as a clean end; so the
        default is CONNECT_ERROR, what RFC 9113 §8.5 asks of a proxy whose other side failed.
        Pass CANCEL explicitly to say "no longer needed" without claiming an error."""
        if self._done:
            return
        self._on_lost = None   # (our own doing)
        self._conn.core.reset(self.stream_id, code)
        self._fail(StreamReset("stream aborted locally"))
        self._conn.stream_finished(self.stream_id)
        self._conn.schedule_flush()

    async def wait_closed(self) -> None:
        if self._done:
            return
        if self._done_fut is None:
            self._done_fut = self._conn.loop.create_future()
        await asyncio.shield(self._done_fut)

    def __repr__(self) -> str:
        state = ("reset" if self._error else "done" if self._done else
                 "eof-sent" if self._eof_sent else "eof-recv" if self._recv_eof else "open")
        return (f"<HboneStream id={self.stream_id} {state} buffered={self._recv_bytes} "
                f"pending={self._conn.core.pending(self.stream_id)}>")


# asyncio's and uvloop's SSL_SHUTDOWN_TIMEOUT: after our close_notify, how long we wait for the
# peer's (reading and discarding meanwhile, so unread input does not turn our close into a TCP RST
# that could destroy what we sent last) before dropping the connection.
TLS_SHUTDOWN_TIMEOUT_S = 30.0


class HboneConnection(asyncio.Protocol):
    """Shared by the server and client sides: drives a core over TLS over a plain TCP transport.

    The asyncio.Protocol methods (connection_made, data_received, eof_received, connection_lost)
    are the TCP transport's; TLS is hbone/_tls.py's TlsLayer, and what the sides override are the
    hooks after it: `tls_made()` once the handshake is done (identity checks), `tls_data(plaintext)`
    per read, `tls_eof()` when the peer ended the connection (close_notify or TCP FIN).
    `handshake_done` resolves when the handshake completed (the caller may then read `tls_made`'s
    verdict) or raises what failed it: ssl.SSLError, TimeoutError (tls_handshake_timeout, which
    also bounds a slowloris ClientHello), or ConnectionError (closed during the handshake).
    `transport` is the TCP transport; `close_transport()` is the clean close (close_notify first).

    PERF NOTE: see hbone/_tls.py and the commit message for the before -> after figures."""

    core: P._Core

    def __init__(self, core: P._Core, settings: HboneSettings, loop: asyncio.AbstractEventLoop,
                 context: ssl.SSLContext, *, server_side: bool):
        self.core = core
        self.settings = settings
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.tls = _tls.TlsLayer(context, server_side=server_side)
        self.handshake_done: asyncio.Future = loop.create_future()
        self._tls_timer: asyncio.TimerHandle | None = None  # handshake, then shutdown deadline
        self._tls_exc: BaseException | None = None  # why TLS ended the connection, for connection_lost
        self.streams: dict[int, HboneStream] = {}
        self.drain_waiting: set[HboneStream] = set()
        self._watch: set[int] = set()
        self._flush_scheduled = False
        self._writable = True
        self.lost = False
        self.lost_exc: BaseException | None = None
        self.local_addr: tuple[str, int] = ("", 0)
        self.remote_addr: tuple[str, int] = ("", 0)
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._ping_outstanding: bytes | None = None
        self.pings_acked = 0
        self._closed_fut: asyncio.Future = loop.create_future()
        # Splices holding HBONE → TCP bytes from the frames of the current data_received call,
        # written once at its end (hbone/relay.py `_Splice.h_data`); None outside data_received.
        self.splice_writes: list | None = None
        # Splices holding bytes across reads (SPLICE_DEFER above), the read count, and whether the
        # check that writes them once the connection goes quiet is scheduled.
        self.splice_deferred: list | None = None
        self.reads = 0
        self._defer_armed = False
        self._defer_bytes = min(SPLICE_DEFER_BYTES, settings.stream_window // 4)

    # -- asyncio.Protocol of the TCP transport: TLS --
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("sockname") or ("", 0)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.local_addr = (sock[0], sock[1])
        self.remote_addr = (peer[0], peer[1])
        # Bounded transport buffer (TLS bytes): above it, pause_writing stops moving stream bytes
        # into TLS.
        transport.set_write_buffer_limits(high=self.settings.transport_write_high_water)  # type: ignore[attr-defined]
        # asyncio sslproto `_start_handshake`: one deadline for the whole handshake, however the
        # peer trickles its bytes (a slowloris ClientHello is cut at the same time as a silent one).
        self._tls_timer = self.loop.call_later(self.settings.tls_handshake_timeout, self._handshake_timed_out)
        self._step_handshake(b"")  # the client's ClientHello; the server waits for it

    def data_received(self, data: bytes) -> None:
        tls = self.tls
        if tls.state == _tls.OPEN:
            try:
                plain = tls.decrypt(data)
            except ssl.SSLError as err:  # a bad record or a fatal alert: asyncio `_fatal_error`
                self._tls_failed(err)
                return
            if tls._backlog is not None:  # asyncio `_do_read`: a write that wanted a read retries
                tls.retry_backlog()
            if plain:
                self.tls_data(plain)
            elif tls.outgoing.pending:  # a post-handshake answer (KeyUpdate) with no h2 bytes
                self._push()
            if tls.peer_closed:
                self._peer_closed()
        elif tls.state == _tls.HANDSHAKE:
            self._step_handshake(data)
        elif tls.state == _tls.CLOSING:
            try:
                done = tls.drain_closing(data)
            except ssl.SSLError as err:
                self._tls_failed(err)
                return
            if done and self.transport is not None:
                self.transport.close()
        # CLOSED: nothing more is read (asyncio drops data after the shutdown)

    def eof_received(self) -> bool:
        """TCP FIN. asyncio sslproto `eof_received`: during the handshake it is a failure
        (ConnectionResetError); once open, a FIN without close_notify (a "ragged" EOF) ends the
        connection like close_notify would (the app's eof_received, then close); while we wait
        for the peer's close_notify it ends the wait."""
        tls = self.tls
        if tls.state == _tls.HANDSHAKE:
            self._handshake_failed(ConnectionResetError("the peer closed the connection during the TLS handshake"))
        elif tls.state == _tls.OPEN:
            self._tls_exc = ConnectionResetError("the peer closed the connection without TLS close_notify")
            self.tls_eof()
        return False  # the transport closes itself

    def _step_handshake(self, data: bytes) -> None:
        tls = self.tls
        try:
            done = tls.handshake(data)
        except ssl.SSLError as err:
            self._handshake_failed(err)
            return
        if not done:
            self._push()
            return
        if self._tls_timer is not None:
            self._tls_timer.cancel()
            self._tls_timer = None
        # asyncio `_on_handshake_complete`: the app's connection_made, the waiter, then a read of
        # what came with the handshake's last flight (a client's h2 preface rides with its Finished).
        self.tls_made()
        if not self.handshake_done.done():
            self.handshake_done.set_result(None)
        if tls.state == _tls.OPEN and not self.lost:
            # One TCP write for the handshake's end and HTTP/2's start: the client's Finished with
            # its preface, SETTINGS and WINDOW_UPDATE; the server's SETTINGS and WINDOW_UPDATE with
            # the SETTINGS ACK for a client preface that came with the client's Finished (the read
            # below flushes when it brings records; the flush after it when it does not).
            self.data_received(b"")
            self.flush_now()

    def _handshake_failed(self, err: BaseException) -> None:
        if self._tls_timer is not None:
            self._tls_timer.cancel()
            self._tls_timer = None
        self.tls.state = _tls.CLOSED
        self._tls_exc = err
        if not self.handshake_done.done():
            self.handshake_done.set_exception(err)
            self.handshake_done.exception()  # retrieved: whoever awaits it re-raises it
        transport = self.transport
        if transport is not None and not self.lost:
            # The alert OpenSSL wrote tells the peer why (ztunnel/rustls sends it too; asyncio's
            # SSL transport aborted without it and the peer saw a bare EOF), then a normal close.
            alert = self.tls.take()
            if alert:
                transport.write(alert)
            transport.close()

    def _handshake_timed_out(self) -> None:
        self._tls_timer = None
        if self.tls.state == _tls.HANDSHAKE:
            err = TimeoutError(f"TLS handshake not done within {self.settings.tls_handshake_timeout:g}s")
            self._handshake_failed(err)
            if self.transport is not None:
                self.transport.abort()

    def _tls_failed(self, err: ssl.SSLError) -> None:
        """A TLS error on an open connection: fatal (asyncio `_fatal_error`), reported to
        connection_lost as the reason."""
        self.tls.state = _tls.CLOSED
        self._tls_exc = err
        if self.transport is not None:
            self.transport.abort()

    def _peer_closed(self) -> None:
        """The peer's close_notify arrived (asyncio `_do_read__copied`: `_call_eof_received`, then
        `_start_shutdown`, which answers with our close_notify)."""
        self.tls_eof()
        if not self.lost:
            self.close_transport()

    def _push(self) -> None:
        out = self.tls.take()
        transport = self.transport
        if out and transport is not None and not self.lost and not transport.is_closing():
            transport.write(out)

    def close_transport(self) -> None:
        """The clean close: what h2 still has to send, close_notify, then the TCP close once the
        peer's close_notify (or FIN) arrives or TLS_SHUTDOWN_TIMEOUT_S has passed."""
        transport = self.transport
        if transport is None or self.lost:
            return
        tls = self.tls
        if tls.state == _tls.OPEN:
            # What h2 already framed goes before close_notify (callers flush_now() first when
            # stream bytes should go too; flush_now calls this when the core closed).
            data = self.core.data_to_send()
            if data:
                tls.write(data)
        elif tls.state == _tls.HANDSHAKE:  # asyncio `_start_shutdown` in DO_HANDSHAKE: abort
            self._handshake_failed(ConnectionAbortedError("connection closed during the TLS handshake"))
            transport.abort()
            return
        if tls.state == _tls.CLOSED:
            transport.close()
            return
        if tls.state == _tls.OPEN:
            done = tls.close()
            self._push()
            if done:
                transport.close()
            elif self._tls_timer is None:
                self._tls_timer = self.loop.call_later(TLS_SHUTDOWN_TIMEOUT_S, self._shutdown_timed_out)

    def _shutdown_timed_out(self) -> None:
        self._tls_timer = None
        if not self.lost and self.transport is not None:
            self._tls_exc = TimeoutError("TLS shutdown timed out")  # asyncio's words
            self.transport.abort()

    def get_extra_info(self, name: str, default=None):
        """What asyncio's SSL transport answered: ssl_object, peercert, cipher, compression, then
        the TCP transport's (peername, sockname, socket)."""
        value = self.tls.extra(name)
        if value is not None:
            return value
        if self.transport is not None:
            return self.transport.get_extra_info(name, default)
        return default

    # -- hooks after TLS --
    def tls_made(self) -> None:
        """The handshake is done: start HTTP/2 (subclasses check the peer's identity first). The
        h2 preface the core queued leaves with the next flush (_step_handshake's)."""
        self._ping_timer = self.loop.call_later(self.settings.ping_interval, self._ping_tick)

    def tls_eof(self) -> None:
        """The peer ended the TLS connection (close_notify or TCP FIN): the connection is over."""

    def tls_data(self, data: bytes) -> None:
        self.reads += 1
        events = self.core.receive_data(data)
        if len(events) > 1:
            # Several DATA frames of a spliced stream in one TLS read go to TCP in one write (and
            # one ack): PERF NOTE in hbone/relay.py `_Splice.h_data`.
            pending = self.splice_writes = []
            try:
                for event in events:
                    self.handle_event(event)
            finally:
                self.splice_writes = None
                self._end_batch(pending, len(data) >= SPLICE_DEFER_MIN_READ and SPLICE_DEFER)
        else:
            for event in events:
                self.handle_event(event)
        # The flush after a read only when the read left something to send or check (h2's own frames:
        # SETTINGS/PING ACKs, WINDOW_UPDATEs, an answer's HEADERS, RST_STREAM, GOAWAY; stream bytes queued;
        # a stream whose end is watched or a writer waiting to drain; a closed core): a read that only
        # handed DATA to its streams (the usual small request or response) has nothing, and flush_now
        # would still walk the core and build an empty bytes per read. See the PERF NOTE at _QUIET_READ.
        core = self.core
        if (not _QUIET_READ or core._queues or core._h2._data_to_send or self._watch or self.drain_waiting
                or core.closed or self.tls.outgoing.pending):
            self.flush_now()

    def _end_batch(self, pending: list, streaming: bool) -> None:
        """Write the splices' bytes of this read, or hold some while the peer streams (SPLICE_DEFER).
        PERF NOTE (this 2-core machine, quiet): in-process (/tmp/h8/prof_relay.py multi 268435456
        cpu node-http2: benchmarks.relay, 64 tunnels, 256 MiB, reads of ~258 KiB) 16 419 -> 5 756
        TCP writes (1.0 -> 2.9 frames each), 1.48-1.56 -> 1.17 proxy CPU-s per GiB (the one-tunnel
        upload: 1.14-1.19). `python -m benchmarks --only multi64 --repeat 3 --clients node-http2
        --bytes 268435456`: ours-relay 813 -> 994 MB per proxy CPU-s (1.18x -> 1.44x nghttpx's 688),
        ours-node 866 -> 895 (1.26x -> 1.30x); before: --repeat 1 of the same run."""
        deferred = self.splice_deferred
        if deferred:
            pending = deferred + pending
            self.splice_deferred = None
        if not streaming:
            for splice in pending:
                splice.h_flush()
            return
        keep = None
        limit, reads = self._defer_bytes, self.reads
        for splice in pending:
            if splice.h_buf is None:
                continue  # written meanwhile (its EOF, a failure)
            if splice.h_nbuf >= limit or reads - splice.h_since >= SPLICE_DEFER_READS:
                splice.h_flush()
            elif keep is None:
                keep = [splice]
            else:
                keep.append(splice)
        if keep is not None:
            self.splice_deferred = keep
            if not self._defer_armed:
                self._defer_armed = True
                self.loop.call_soon(self._defer_arm, reads)

    def _defer_arm(self, reads: int) -> None:
        # Runs before the loop's next poll for I/O; the check runs after it (a callback scheduled
        # from a callback runs on the following loop turn), so it sees whether that poll read more.
        self.loop.call_soon(self._defer_check, reads)

    def _defer_check(self, reads: int) -> None:
        self._defer_armed = False
        deferred = self.splice_deferred
        if not deferred:
            return
        if self.reads != reads and not self.lost:
            self._defer_armed = True  # still streaming: the reads handle the held bytes
            self.loop.call_soon(self._defer_arm, self.reads)
            return
        self.splice_deferred = None
        for splice in deferred:
            splice.h_flush()
        self.flush_now()  # the acknowledgements' WINDOW_UPDATEs

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self.flush_now()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        if exc is None:
            exc = self._tls_exc
        self.lost_exc = exc
        self.core.closed = True
        self.tls.state = _tls.CLOSED
        if not self.handshake_done.done():
            self.handshake_done.set_exception(
                exc or ConnectionResetError("connection closed during the TLS handshake"))
            self.handshake_done.exception()
        for timer in (self._ping_timer, self._ping_deadline, self._tls_timer):
            if timer is not None:
                timer.cancel()
        reason = f"HBONE connection lost: {exc}" if exc else "HBONE connection closed"
        for stream in list(self.streams.values()):
            stream._fail(StreamReset(reason))
            stream._finish()
        self.streams.clear()
        self.drain_waiting.clear()
        if not self._closed_fut.done():
            self._closed_fut.set_result(None)
        self.on_lost()

    # -- writing --
    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush_now)

    def flush_now(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        tls = self.tls
        if transport is None or self.lost or tls.state != _tls.OPEN:
            return
        core = self.core
        if self._writable:
            core.flush()
        data = core.data_to_send()
        if data:
            tls.write(data)
        if self.drain_waiting:
            bound = self.settings.stream_send_buffer
            for stream in list(self.drain_waiting):
                if core.pending(stream.stream_id) <= bound:
                    stream._wake_drain()
        if self._watch:
            # Each watched stream is checked once, then dropped unless it still has queued bytes
            # (its END_STREAM leaves after them). Whatever else can close it is an event that
            # re-adds it (peer END_STREAM) or a call that does (write_eof/close). Rechecking every
            # watched stream on every flush made short tunnels O(in-flight) per flush: 70 000
            # stream_closed() calls for 3 000 tunnels at 64 in flight (cProfile, perf report).
            watch = self._watch
            for sid in list(watch):
                if core.stream_closed(sid):
                    self.stream_finished(sid)
                    continue
                pending = core.pending(sid)
                stream = self.streams.get(sid)
                if stream is not None and stream._closing and stream._eof_sent \
                        and not stream._recv_eof and pending == 0:
                    # close(): our END_STREAM left; stop the peer's upload with a clean reset.
                    core.reset(sid, ErrorCodes.NO_ERROR)
                    self.stream_finished(sid)
                    data = core.data_to_send()
                    if data:
                        tls.write(data)
                elif pending == 0:
                    watch.discard(sid)
        # One TCP write per flush for everything TLS made of it.
        out = tls.outgoing
        if out.pending:
            transport.write(out.read())
        if core.closed and not self.lost and self.should_close_transport():
            self.close_transport()

    def should_close_transport(self) -> bool:
        return True

    def ack(self, stream_id: int, n: int) -> None:
        # A flush only when the acknowledgement queued a WINDOW_UPDATE (h2 hands window back once half
        # a window was consumed), as HboneStream.read does: the splice acknowledges every small frame it
        # writes to TCP, and each scheduled an empty flush_now (a loop callback) of its own.
        # PERF NOTE: with _QUIET_READ's (see there).
        if self.core.ack(stream_id, n):
            self.schedule_flush()

    def watch_done(self, stream_id: int) -> None:
        self._watch.add(stream_id)

    def stream_finished(self, stream_id: int) -> None:
        self._watch.discard(stream_id)
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.drain_waiting.discard(stream)
            stream._finish()
            self.on_stream_finished(stream)

    # -- events --
    def handle_event(self, event: P.Event) -> None:
        cls = event.__class__
        if cls is P.Data:
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.core.ack(event.stream_id, event.flow_len)  # nobody will read it
            else:
                stream._feed(event.data)
        elif cls is P.StreamEnded:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._feed_eof()
                self._watch.add(event.stream_id)
        elif cls is P.StreamReset:
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                if event.clean:
                    stream._feed_eof()  # ztunnel: NO_ERROR/CANCEL is a clean end
                else:
                    stream._fail(StreamReset(f"peer reset the stream (HTTP/2 error code {event.code})"))
                self.stream_finished(event.stream_id)
        elif cls is P.PingAcked:
            if event.data == self._ping_outstanding:
                self._ping_outstanding = None
                self.pings_acked += 1
                if self._ping_deadline is not None:
                    self._ping_deadline.cancel()
                    self._ping_deadline = None
        elif cls is P.ConnectionTerminated:
            self.on_goaway(event)
        else:
            self.on_event(event)

    # hooks for the server and client sides
    def on_event(self, event: P.Event) -> None:
        pass

    def on_goaway(self, event: P.ConnectionTerminated) -> None:
        pass

    def on_stream_finished(self, stream: HboneStream) -> None:
        pass

    def on_lost(self) -> None:
        pass

    # -- keepalive (ztunnel src/proxy/h2.rs do_ping_pong) --
    def _ping_tick(self) -> None:
        if self.lost:
            return
        if self._ping_outstanding is None:
            self._ping_outstanding = next(_ping_ids).to_bytes(8, "big")
            self.core.ping(self._ping_outstanding)
            self._ping_deadline = self.loop.call_later(self.settings.ping_timeout, self._ping_timed_out)
            self.schedule_flush()
        self._ping_timer = self.loop.call_later(self.settings.ping_interval, self._ping_tick)

    def _ping_timed_out(self) -> None:
        # ztunnel: client drops the connection; server sends GOAWAY and closes. Either way the
        # peer is unresponsive, so nothing queued would be read: abort.
        log.warning("HBONE ping timeout after %.0fs to %s:%s", self.settings.ping_timeout, *self.remote_addr)
        self.core.close_connection(ErrorCodes.NO_ERROR)
        if self.transport is not None:
            data = self.core.data_to_send()
            if data:
                self.tls.write(data)
                self._push()  # the TCP transport tries to send at once; abort drops the rest
            self.transport.abort()

    # -- shutdown --
    def goaway(self) -> None:
        self.core.goaway()
        self.flush_now()

    def abort(self) -> None:
        self.tls.state = _tls.CLOSED  # nothing more is read or written
        if self.transport is not None and not self.lost:
            self.transport.abort()

    async def wait_lost(self) -> None:
        await asyncio.shield(self._closed_fut)

    def new_stream(self, stream_id: int) -> HboneStream:
        stream = HboneStream(self, stream_id)
        self.streams[stream_id] = stream
        return stream


Callback = Callable[..., None]
