"""An asyncio transport over a plain non-blocking TCP socket, polled by our own epoll: what the node
proxy's upstream dial (``hbone.dial.dial_from(..., socket_transport=True)``) hands its
``TcpConnection`` instead of a uvloop TCP transport.

One ``select.epoll`` per event loop (``_Poller``), itself registered once with the loop
(``add_reader`` on its fd). Each socket is registered with it once, edge-triggered, for reading,
writing and the peer's FIN (``EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET``); closing the socket
removes it from the epoll (no syscall). Pausing reading takes EPOLLIN out (EPOLL_CTL_MOD), resuming
puts it back, which re-polls the socket: what came while paused is reported then. Edge-triggered
means a readiness is reported once, so a read that filled ``READ_BYTES`` is followed by another
(more may be queued), and a queued write waits for ``EPOLLOUT``, which the kernel reports when a
send that did not fit (it sets SOCK_NOSPACE) gets room again.

Same contract as asyncio's selector socket transport (``asyncio.selector_events
._SelectorSocketTransport``), which the Protocol side (``hbone.stream.TcpConnection`` and
``hbone.relay``'s splice) already relies on:

- reading: ``data_received`` for each ``recv`` (at most ``READ_BYTES``), ``eof_received`` once at
  the peer's FIN (reading stops; returning True keeps our sending side open: half-close), and
  ``pause_reading`` / ``resume_reading`` for backpressure;
- writing: ``write`` sends at once when nothing is queued, else queues; ``pause_writing`` once more
  than ``WRITE_HIGH_WATER_BYTES`` are queued, ``resume_writing`` once the queue has drained;
  ``write_eof`` sends FIN after the queue (TCP SHUT_WR);
- ending: ``close`` flushes the queue first, ``abort`` does not; ``connection_lost(exc)`` is called
  exactly once, on a later loop turn (never from inside ``close``/``abort``), with the error for a
  reset or a failed send/recv and None otherwise. The socket is closed right after it.

PERF NOTE — why not ``loop.create_connection(sock=)`` or ``loop.add_reader(sock)``: per
connection, uvloop's transport costs a Python-level ``WeakValueDictionary`` insert, a second ``FIONBIO`` ioctl, ``getsockname`` and
``getpeername`` at ``connection_made``, and the dial a coroutine stepped twice plus a future; the
uvloop ``TCPTransport`` and its libuv handle are also larger (session 2 measured 1 470 vs 830 bytes
per connection). Dial + 1 KiB echo + close, 5 000 connections, 64 at once, dialling process CPU
(/tmp/nd/micro.py, this 2-core box, three alternating runs each): 54 / 56 / 60 µs per connection
with ``dial_from`` + uvloop transport; 44 / 43 / 44 with uvloop's ``add_reader`` on each socket
(libuv's poll handle costs 4 epoll_ctl, 3 of them failing DELs, and a FIONBIO ioctl per socket:
strace); 37 / 38 / 37 with one edge-triggered epoll of our own (one epoll_ctl per socket, none to
remove it; a pause and its resume cost one EPOLL_CTL_MOD each). End to end, see
proxy/node/inbound.py ``InboundProxy._handle`` and hbone/stream.py ``dial_tcp``.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import weakref
from collections import deque
from itertools import islice
from typing import Any

KiB = 1024

# One recv() reads at most this much: asyncio's selector transport and uvloop read 256 KiB at once
# (ztunnel grows its copy buffer to 256 KiB too); hbone.stream.DEFAULT_READ_BYTES, the splice's
# read size.
READ_BYTES = 256 * KiB

# Queued (not yet accepted by the kernel) bytes above which the protocol is told to pause writing:
# asyncio's and uvloop's default high-water mark. The splice acknowledges HBONE DATA only while
# writing is not paused, so this plus one flow-control window bounds what a slow pod makes us hold.
WRITE_HIGH_WATER_BYTES = 64 * KiB

# sendmsg() takes at most IOV_MAX (1024 on Linux) buffers; a longer batch is joined first.
MAX_IOV = 1024

# Events taken from our epoll per loop callback; more stay ready and the loop calls again.
MAX_EVENTS = 512

_TRY_AGAIN = (BlockingIOError, InterruptedError)
_EP_MASK = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_EP_PAUSED = select.EPOLLOUT | select.EPOLLET
_EP_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_EP_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
# A FIN reported together with an error is a reset (tcp_reset sets sk_err and shuts both ways).
_EP_END = select.EPOLLRDHUP | select.EPOLLERR
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
# SO_LINGER on, 0 s: close() sends RST (hbone.stream's _LINGER_RST, for a failing callback here)
_LINGER_RST = struct.pack("ii", 1, 0)


class _Poller:
    """The per-loop epoll all ``SocketTransport``s of that loop are registered with."""

    __slots__ = ("ep", "table", "batch", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.ep = select.epoll()
        self.table: dict[int, SocketTransport] = {}   # fd -> transport, while its socket is open
        # Incremented per poll: a transport registered while a batch is being dispatched ignores
        # that batch's events (they were for a socket closed earlier in the batch whose fd number
        # the new socket reuses; a stale EPOLLRDHUP must not end the new one).
        self.batch = 0
        loop.add_reader(self.ep.fileno(), self._ready)

    def _ready(self) -> None:
        self.batch = batch = self.batch + 1
        table = self.table
        for fd, events in self.ep.poll(0, MAX_EVENTS):
            t = table.get(fd)
            if t is not None and t._since != batch:
                try:
                    t._on_events(events)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    # A protocol callback failed: that connection ends (as asyncio's transports do),
                    # the others of this batch still get their events (edge-triggered: never again).
                    t._fatal(exc)


_pollers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Poller]" = weakref.WeakKeyDictionary()
_last: list = [None, None]  # (weakref to the loop, its poller): the common case without a dict lookup


def poller_for(loop: asyncio.AbstractEventLoop) -> _Poller:
    ref = _last[0]
    if ref is not None and ref() is loop:
        return _last[1]
    poller = _pollers.get(loop)
    if poller is None:
        poller = _pollers[loop] = _Poller(loop)
    _last[0], _last[1] = weakref.ref(loop), poller
    return poller


class SocketTransport(asyncio.Transport):
    """See the module docstring. ``protocol.connection_made(self)`` is called by the constructor."""

    __slots__ = ("_sock", "_fd", "_loop", "_protocol", "_poller", "_since", "_wbuf", "_wlen", "_reading", "_eof",
                 "_read_eof", "_closing", "_lost", "_paused_writing", "_high")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol):
        # asyncio.Transport.__init__ would set an _extra dict: not needed (get_extra_info below).
        self._sock = sock
        self._fd = fd = sock.fileno()
        self._loop = loop
        self._protocol = protocol
        self._wbuf: deque | None = None      # queued buffers, None while empty (nothing per idle tunnel)
        self._wlen = 0                       # bytes in them
        self._reading = True
        self._eof = False                    # write_eof() called
        self._read_eof = False               # the peer's FIN read
        self._closing = False
        self._lost = False                   # connection_lost scheduled or delivered
        self._paused_writing = False
        self._high = WRITE_HIGH_WATER_BYTES
        poller = self._poller = poller_for(loop)
        self._since = poller.batch
        poller.ep.register(fd, _EP_MASK)     # OSError (bad fd...) goes to the caller
        poller.table[fd] = self
        protocol.connection_made(self)

    def _on_events(self, events: int) -> None:
        if events & _EP_READ and self._reading and not self._closing:
            self._read_ready(events & _EP_END)
        if events & _EP_WRITE and self._wbuf is not None and not self._lost:
            self._write_ready()

    # -- reading --
    def _read_ready(self, rdhup: int = 0) -> None:
        """An edge: read once. A read short of READ_BYTES emptied the queue, and bytes (or a FIN)
        arriving after it make a new edge, so we stop there. ``rdhup``: the edge's EPOLLRDHUP and
        EPOLLERR bits (``_EP_END``)."""
        if not self._reading or self._closing or self._read_eof:
            return
        data = self._recv_one()
        if data is None or len(data) == READ_BYTES:
            return
        if rdhup and self._reading and not self._closing:
            if rdhup & select.EPOLLERR:
                # Not a FIN but a reset that came right after the bytes (one edge for both): the
                # next recv reports it (ECONNRESET) and no further edge will come. Taking it for a
                # FIN ended the stream cleanly (tests/test_chaos_socktransport.py).
                self._read_until_again()
                return
            # The peer's FIN had come (EPOLLRDHUP) and this short read emptied the queue (TCP queues
            # the FIN after every byte before it): the next recv would return b"". Skip it.
            self._on_eof()

    def _read_more(self) -> None:
        """``_read_until_again`` from a loop callback, a failing protocol callback ending the
        connection as in ``_Poller._ready``."""
        try:
            self._read_until_again()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal(exc)

    def _fatal(self, exc: BaseException) -> None:
        self._loop.call_exception_handler({
            "message": "protocol callback failed on a SocketTransport", "exception": exc,
            "transport": self, "protocol": self._protocol})
        # What was queued is dropped: the peer must see a reset (RST: SO_LINGER 0 makes close()
        # send one), not a FIN that ends a truncated stream cleanly (asyncio's transports send the
        # FIN; hbone.relay's contract is never a silent truncation; tests/test_chaos_socktransport.py).
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
        self._force_close(exc)

    def _read_until_again(self) -> None:
        """Read until EAGAIN or the EOF: after a full read (edges that come meanwhile are only for
        newer bytes)."""
        while self._reading and not self._closing and not self._read_eof:
            data = self._recv_one()
            if data is None or len(data) == READ_BYTES:   # (a full read: one per loop turn while busy)
                return

    def _recv_one(self) -> bytes | None:
        """One ``recv`` handed to the protocol: its bytes, or None when there were none (EAGAIN) or the
        read ended the stream (the peer's FIN: ``eof_received``; ECONNRESET...: the peer aborted). A
        full read (``READ_BYTES``) schedules the next one: more may be queued and no new edge will say so."""
        try:
            data = self._sock.recv(READ_BYTES)
        except _TRY_AGAIN:
            return None
        except OSError as exc:
            self._force_close(exc)
            return None
        if not data:
            self._on_eof()
            return None
        self._protocol.data_received(data)
        if len(data) == READ_BYTES:
            self._loop.call_soon(self._read_more)
        return data

    def _on_eof(self) -> None:
        self._read_eof = True
        if not self._protocol.eof_received():
            self.close()

    def pause_reading(self) -> None:
        """Stops reading and takes EPOLLIN out of the registration: edge-triggered, every segment
        that arrives while paused would still wake the loop (a bulk download pauses often)."""
        if self._reading:
            self._reading = False
            if not self._closing and not self._read_eof:
                self._modify(_EP_PAUSED)

    def resume_reading(self) -> None:
        """EPOLL_CTL_MOD re-polls the socket and queues an event if it is readable (or the FIN came)
        meanwhile: what arrived while paused is reported then, on a later loop turn."""
        if not self._reading and not self._closing:
            self._reading = True
            if not self._read_eof:
                self._modify(_EP_MASK)

    def _modify(self, mask: int) -> None:
        try:
            self._poller.ep.modify(self._fd, mask)
        except OSError as exc:
            self._force_close(exc)

    def is_reading(self) -> bool:
        return self._reading and not self._closing and not self._read_eof

    # -- writing --
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or not data:
            return  # asyncio drops writes after close (it only logs them)
        if self._wbuf is None:
            try:
                n = self._sock.send(data)
            except _TRY_AGAIN:
                n = 0
            except OSError as exc:
                self._force_close(exc)
                return
            if n == len(data):
                return
            self._queue([data], n)  # EPOLLOUT will come: the send that did not fit set NOSPACE
        else:
            self._queue([data], 0)

    def writelines(self, list_of_data) -> None:
        """One ``sendmsg`` (writev) for a batch."""
        if self._eof:
            raise RuntimeError("Cannot call writelines() after write_eof()")
        if self._closing:
            return
        if self._wbuf is not None or len(list_of_data) > MAX_IOV:
            was_empty = self._wbuf is None
            self._queue(list_of_data, 0)
            if was_empty:
                self._write_ready()   # no send is waiting for EPOLLOUT: send now
            return
        try:
            n = self._sock.sendmsg(list_of_data)
        except _TRY_AGAIN:
            n = 0
        except OSError as exc:
            self._force_close(exc)
            return
        if n != sum(map(len, list_of_data)):
            self._queue(list_of_data, n)

    def writelines_eof(self, list_of_data) -> None:
        """``writelines(list_of_data)`` then ``write_eof()``, the FIN in the same segment as the last
        bytes when they fit: sent with MSG_MORE (the kernel holds a part-filled segment), then
        shutdown(), which sets FIN on that unsent segment and pushes it (tcp_send_fin).

        PERF NOTE: a short tunnel's upload is one DATA frame with END_STREAM; as two segments
        (data, then FIN) the pod's kernel handles one packet more, and so does ours in loopback
        softirq. /tmp/nd/micro.py (dial + 1 KiB echo + close, 5 000 connections, dialling process
        CPU, this 2-core box): 40.6 / 41.8 / 43.0 -> 38.8 / 39.9 / 39.3 µs per connection."""
        if self._eof or self._closing or self._wbuf is not None or len(list_of_data) > MAX_IOV:
            self.writelines(list_of_data)
            self.write_eof()
            return
        try:
            n = self._sock.sendmsg(list_of_data, (), _MSG_MORE)
        except _TRY_AGAIN:
            n = 0
        except OSError as exc:
            self._force_close(exc)
            return
        self._eof = True
        if n != sum(map(len, list_of_data)):
            self._queue(list_of_data, n)   # the FIN follows the queue (_write_ready)
            return
        self._shutdown()

    def _queue(self, list_of_data, sent: int) -> None:
        """Queue what ``sent`` bytes into ``list_of_data`` did not cover, without copying it (a
        memoryview of a part-sent buffer; a caller's bytearray is copied, as it may change)."""
        buf = self._wbuf
        if buf is None:
            buf = self._wbuf = deque()
        for data in list_of_data:
            size = len(data)
            if sent >= size:
                sent -= size
                continue
            if data.__class__ is not bytes:
                data = bytes(data)
            if sent:
                data = memoryview(data)[sent:]
                size -= sent
                sent = 0
            buf.append(data)
            self._wlen += size
        if not buf:
            self._wbuf = None
        elif not self._paused_writing and self._wlen > self._high:
            self._paused_writing = True
            self._protocol.pause_writing()

    def _write_ready(self) -> None:
        buf = self._wbuf
        while buf:
            chunks = list(islice(buf, MAX_IOV)) if len(buf) > 1 else None
            try:
                n = self._sock.sendmsg(chunks) if chunks is not None else self._sock.send(buf[0])
            except _TRY_AGAIN:
                return
            except OSError as exc:
                self._force_close(exc)
                return
            self._wlen -= n
            while n:
                size = len(buf[0])
                if n >= size:
                    buf.popleft()
                    n -= size
                else:
                    buf[0] = memoryview(buf[0])[n:]
                    n = 0
        self._wbuf = None
        self._wlen = 0
        if self._paused_writing:
            self._paused_writing = False
            self._protocol.resume_writing()
            if self._wbuf is not None:
                # resume_writing queued more (asyncio's _write_ready: "May append to buffer"); its
                # EPOLLOUT comes back here. Going on to the FIN / the close now cut those bytes off
                # behind a clean end (tests/test_chaos_socktransport.py).
                return
        if self._closing:
            self._schedule_lost(None)
        elif self._eof:
            self._shutdown()

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        self._eof = True
        if self._wbuf is None:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already reset: the read side reports it

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self._wlen

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, self._high)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = WRITE_HIGH_WATER_BYTES if high is None else high
        if self._wbuf is not None and not self._paused_writing and self._wlen > self._high:
            self._paused_writing = True
            self._protocol.pause_writing()

    # -- ending --
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._reading = False
        if self._wbuf is None:
            self._schedule_lost(None)
        # else: _write_ready schedules it once the queue is flushed

    def abort(self) -> None:
        self._force_close(None)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._closing = True
        self._reading = False
        self._wbuf = None
        self._wlen = 0
        self._schedule_lost(exc)

    def _schedule_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        protocol, self._protocol = self._protocol, None  # breaks the protocol <-> transport cycle
        try:
            protocol.connection_lost(exc)
        finally:
            table = self._poller.table
            if table.get(self._fd) is self:
                del table[self._fd]
            self._sock.close()  # also leaves the epoll (no other descriptor refers to the socket)

    # -- info --
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        try:
            if name == "sockname":
                return self._sock.getsockname()
            if name == "peername":
                return self._sock.getpeername()
        except OSError:
            return default
        return default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<SocketTransport fd={self._fd} {state} queued={self.get_write_buffer_size()}>"


__all__ = ["SocketTransport", "poller_for", "READ_BYTES", "WRITE_HIGH_WATER_BYTES"]
