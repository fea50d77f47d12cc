"""One byte-stream interface for a TCP socket and an HBONE stream alike.

Later pipeline stages never ask where the bytes came from: they get a ``ByteStream``.

Contract (every implementation):

- ``await read(max_bytes)`` returns 1..max_bytes bytes, or ``b""`` once the peer has finished sending
  (TCP FIN / HTTP/2 END_STREAM, or RST_STREAM NO_ERROR/CANCEL, which ztunnel treats as a clean end).
  It raises ``StreamReset`` when the peer aborted (TCP RST, RST_STREAM with an error code).
- ``write(data)`` queues bytes; ``await drain()`` waits until the queue is below the stream's bound.
  Callers that write in a loop must ``await drain()`` between writes: that is the backpressure.
- ``write_eof()`` half-closes our sending side (TCP SHUT_WR / END_STREAM); reading may continue.
- ``close()`` ends both directions gracefully once queued bytes are flushed;
  ``abort()`` ends them at once (TCP RST / RST_STREAM CONNECT_ERROR): the peer must learn the bytes
  did not all arrive (HBONE peers read CANCEL as a clean end, so it is not used for this). ``await wait_closed()`` waits until the transport is gone.
- ``local_addr`` / ``remote_addr`` are ``(host, port)`` tuples.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import deque
from typing import Callable, Protocol, runtime_checkable

from hbone.settings import CONNECT_TIMEOUT_S

KiB = 1024
MiB = 1024 * KiB

# Read size for relays: ztunnel grows its copy buffer to 256 KiB after 10 MiB of traffic; a single
# large read amortises the per-call Python overhead. Bounded, so one read never holds more than this.
DEFAULT_READ_BYTES = 256 * KiB


# struct linger {l_onoff = 1, l_linger = 0}: close() discards unsent data and sends RST.
_LINGER_RST = struct.pack("ii", 1, 0)


class StreamReset(ConnectionError):
    """The peer aborted the stream; bytes in flight may be lost, so the error must propagate."""


@runtime_checkable
class ByteStream(Protocol):
    local_addr: tuple[str, int]
    remote_addr: tuple[str, int]

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    async def wait_closed(self) -> None: ...


class TcpStream:
    """A ``ByteStream`` over an asyncio (uvloop) TCP connection."""

    __slots__ = ("_reader", "_writer", "local_addr", "remote_addr", "_eof_sent")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        sock_local = writer.get_extra_info("sockname") or ("", 0)
        sock_remote = writer.get_extra_info("peername") or ("", 0)
        self.local_addr = (sock_local[0], sock_local[1])
        self.remote_addr = (sock_remote[0], sock_remote[1])
        self._eof_sent = False

    @classmethod
    async def connect(cls, host: str, port: int, *, local_host: str | None = None,
                      limit: int = DEFAULT_READ_BYTES) -> "TcpConnection":
        """Dial `host:port`. Returns a `TcpConnection` (same ByteStream contract, lighter: see there).

        With `local_host` and an IP-address `host` (every proxy caller: the node dialling from the
        client's or source pod's IP, the waypoint from its own pod IP), `hbone.dial.connect_from`
        binds the IP only and leaves the port to connect(): `bind(ip, 0)` scans the ephemeral range
        past every TIME_WAIT socket on that IP (hbone/dial.py's PERF NOTE: 2 877 -> 31 us per dial
        with 16 000 of them)."""
        if local_host and _is_ip(host):
            from hbone.dial import connect_from  # hbone.dial builds on this module
            return await connect_from(host, port, local_host, limit=limit)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: TcpConnection(limit), host, port, local_addr=(local_host, 0) if local_host else None)
        return conn

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        try:
            return await self._reader.read(max_bytes)
        except ConnectionResetError as err:
            raise StreamReset(str(err)) from err

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionResetError as err:
            raise StreamReset(str(err)) from err

    def write_eof(self) -> None:
        if not self._eof_sent and not self._writer.is_closing():
            self._eof_sent = True
            try:
                self._writer.write_eof()
            except OSError:
                pass

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        transport = self._writer.transport
        if transport is not None:
            # asyncio's abort() only closes the socket, which sends FIN: the peer would read a
            # clean EOF. SO_LINGER {on, 0 s} makes close() send RST, so the peer learns the
            # stream was cut (RFC 9113 §8.5 maps RST_STREAM CONNECT_ERROR ↔ TCP RST).
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except (OSError, ValueError):
                    # ValueError: uvloop hands a closed transport's socket over as a PseudoSocket of fd -1
                    # ("negative file descriptor"); there is nothing left to reset then.
                    pass
            transport.abort()

    async def wait_closed(self) -> None:
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    def __repr__(self) -> str:
        state = "closing" if self._writer.is_closing() else "open"
        return f"<TcpStream {self.local_addr[0]}:{self.local_addr[1]}->{self.remote_addr[0]}:{self.remote_addr[1]} {state}>"


def _is_ip(host: str) -> bool:
    """An IPv4/IPv6 literal (no name resolution involved)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return False
    return True


def dial_tcp(host: str, port: int, on_done: "Callable[[TcpConnection | None, BaseException | None], None]",
             *, local_host: str | None = None, limit: int = DEFAULT_READ_BYTES,
             loop: asyncio.AbstractEventLoop | None = None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """``TcpStream.connect`` for callback code: dial ``host:port`` and call ``on_done(conn, None)``
    or ``on_done(None, error)`` from the event loop. No task: the dial coroutine is stepped by the
    futures it waits on (`_Dial`), which is what a Task would do, minus the Task, its coroutine
    frames and its entry in asyncio's task registry. Not cancellable (the dial ends by itself).

    An IP-address ``host`` is dialled by ``hbone.dial.dial_from`` over an
    ``hbone.socktransport.SocketTransport`` (with ``local_host``, the IP bound and the port left to
    connect(): TcpStream.connect's reason, hbone/dial.py's PERF NOTE): an established dial is
    reported at once, from inside this call, and a handshake still in flight after ``timeout``
    seconds fails with TimeoutError (ztunnel's 10 s connect timeout by default). A host name goes
    through ``loop.create_connection`` (the kernel's SYN retries bound it).

    PERF NOTE (a plain-function handler in benchmarks/relay.py dials with this): while thousands of
    CONNECTs wait for their upstream dial, each held a Task with three coroutine frames. Measured
    (/tmp/hb7/mem_peak.py, /tmp/hb7/mem_idle2.py, 1 000 idle tunnels opened at once, tracemalloc,
    this 2-core machine): Python heap peak while opening 5 342 -> 4 353 bytes per tunnel, steady
    2 505 -> 2 438; `python -m benchmarks --only idle --idle-counts 1000,8000 --repeat 1`: RSS per
    idle tunnel 4.32 -> 4.06 KiB (1 000) and 4.95 -> 4.58 KiB (8 000)."""
    # `loop`: the caller's, when it has it (asyncio.get_running_loop() costs a getpid() syscall).
    if loop is None:
        loop = asyncio.get_running_loop()
    if _is_ip(host):
        # PERF NOTE: over hbone.socktransport.SocketTransport (see that module); what
        # benchmarks/relay.py (ours-relay) dials with. A/B vs a uvloop transport (`python -m
        # benchmarks --only short --repeat 1 --short-count 3000 --clients python-h2`, 3 alternations,
        # loaded 2-core box): ours-relay 100 / 103 / 107 -> 87 / 90 / 93 µs proxy CPU per stream;
        # `--only idle --repeat 1`: RSS per idle tunnel 2.71 / 2.92 -> 1.46 / 1.59 KiB (1 000 / 8 000).
        from hbone.dial import dial_from  # hbone.dial builds on this module
        dial_from(host, port, local_host or None, on_done, timeout=timeout, limit=limit, loop=loop,
                  socket_transport=True)
        return
    factory = TcpConnection if limit == DEFAULT_READ_BYTES else (lambda: TcpConnection(limit))
    coro = loop.create_connection(factory, host, port, local_addr=(local_host, 0) if local_host else None)
    _Dial(coro, on_done).step()


# Upstream dials a `Dialer` keeps in flight at once; more wait for a slot, in arrival order. Each
# dial in flight holds uvloop's create_connection coroutine next to its transport (~2.7 KB per dial,
# tracemalloc, /tmp/hb7/mem_peak.py), so 8 000 CONNECTs arriving together made ~20 MB of short-lived
# objects interleaved with the tunnels' long-lived ones: heap fragmentation that stays in RSS. An
# inbound dial goes to a pod on this node (tens of microseconds), so 128 at once is ample for any
# burst. PERF NOTE (`python -m benchmarks --only idle --idle-counts 1000,8000 --repeat 3`,
# benchmarks/relay.py, this 2-core machine), RSS per idle tunnel (1 000 / 8 000) and time to open
# 8 000: no cap 3.96 / 4.39 KiB, 0.69 s; 256: 3.16 / 2.85 KiB, 0.89 s; 128: 2.86 / 2.91 KiB, 0.56 s;
# 64: 2.76 / 2.96 KiB, 0.51 s (same run as 128; an earlier, busier one took 0.97 s).
MAX_CONCURRENT_DIALS = 128


class Dialer:
    """``dial_tcp`` with at most ``max_concurrent`` dials in flight (see MAX_CONCURRENT_DIALS): the
    rest wait in arrival order, none is refused. A queued dial starts when one in flight ends (either
    way). Not cancellable, like dial_tcp."""

    __slots__ = ("loop", "max_concurrent", "in_flight", "_waiting", "_starting")

    def __init__(self, max_concurrent: int = MAX_CONCURRENT_DIALS, *,
                 loop: asyncio.AbstractEventLoop | None = None):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self.loop = loop
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self._waiting: deque = deque()
        # A dial can end inside dial_tcp (a local peer, or an error found at once), and its slot
        # then starts the next one: the loop below takes it instead of a recursion per dial.
        self._starting = False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def dial(self, host: str, port: int, on_done: "Callable[[TcpConnection | None, BaseException | None], None]",
             *, local_host: str | None = None, limit: int = DEFAULT_READ_BYTES) -> None:
        self._waiting.append((host, port, on_done, local_host, limit))
        self._start()

    def _start(self) -> None:
        if self._starting:
            return  # a dial ended inside dial_tcp below: the running loop starts the next
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self._starting = True
        try:
            while self._waiting and self.in_flight < self.max_concurrent:
                host, port, on_done, local_host, limit = self._waiting.popleft()
                self.in_flight += 1
                dial_tcp(host, port, _DialSlot(self, on_done), local_host=local_host, limit=limit, loop=self.loop)
        finally:
            self._starting = False


class _DialSlot:
    """Frees the Dialer's slot, reports, then starts the next queued dial."""

    __slots__ = ("dialer", "on_done")

    def __init__(self, dialer: Dialer, on_done):
        self.dialer = dialer
        self.on_done = on_done

    def __call__(self, conn, err) -> None:
        dialer = self.dialer
        dialer.in_flight -= 1
        try:
            self.on_done(conn, err)
        finally:
            if dialer._waiting:
                dialer._start()


class _Dial:
    """Steps a ``create_connection`` coroutine to its end and reports (see dial_tcp; hbone.dial steps
    ``create_connection(sock=)`` with it too, handing over the socket to close if that fails)."""

    __slots__ = ("coro", "on_done", "sock")

    def __init__(self, coro, on_done, sock: socket.socket | None = None):
        self.coro = coro
        self.on_done = on_done
        self.sock = sock

    def step(self, _fut: object = None) -> None:
        try:
            fut = self.coro.send(None)
        except StopIteration as stop:
            _transport, conn = stop.value
            self.coro = None
            self.on_done(conn, None)
            return
        except Exception as err:  # OSError, TimeoutError...: the dial failed
            self.coro = None
            if self.sock is not None:
                self.sock.close()
            self.on_done(None, err)
            return
        if fut is None:  # a bare yield (sleep(0)): resume on the next loop turn
            asyncio.get_running_loop().call_soon(self.step)
            return
        fut._asyncio_future_blocking = False  # as asyncio.Task does with a future it waits on
        fut.add_done_callback(self.step)


class TcpConnection(asyncio.Protocol):
    """A ``ByteStream`` over a TCP connection that is its own asyncio ``Protocol``.

    What ``TcpStream.connect`` returns. One object per connection instead of asyncio's
    StreamReader + StreamWriter + StreamReaderProtocol + TcpStream: measured (tracemalloc, 1 000 idle
    relayed tunnels, /tmp/perf/mem_idle.py in the perf report) ~3.3 KiB per connection less, and
    no future per read when `hbone.relay` splices it to an HBONE stream (``_splice`` receives the
    protocol callbacks directly; see hbone/relay.py).

    Reads buffer at most ``limit`` bytes before the transport stops reading (backpressure);
    ``drain`` waits while the transport's write buffer is above its high-water mark.
    """

    __slots__ = ("transport", "_chunks", "_nbuf", "_limit", "_eof",
                 "_error", "_lost", "_read_waiter", "_write_paused", "_drain_waiter", "_closed_fut",
                 "_eof_sent", "_reading_paused", "_splice", "_on_made")

    def __init__(self, limit: int = DEFAULT_READ_BYTES, on_made=None):
        self.transport: asyncio.Transport | None = None
        # () until bytes are buffered: a spliced connection never buffers, and an empty list is 56
        # bytes per idle tunnel (tracemalloc, /tmp/hb7/mem_idle2.py).
        self._chunks: list[bytes] | tuple = ()
        self._nbuf = 0
        self._limit = limit
        self._eof = False
        self._error: StreamReset | None = None
        self._lost = False
        self._read_waiter: asyncio.Future | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future | None = None
        self._closed_fut: asyncio.Future | None = None  # created only if someone waits
        self._eof_sent = False
        self._reading_paused = False
        self._splice = None  # hbone.relay._Splice while spliced to an HBONE stream
        self._on_made = on_made  # accepted connections: start_tcp_server's per-connection callback

    # -- asyncio.Protocol --
    def connection_made(self, transport) -> None:
        self.transport = transport
        on_made = self._on_made
        if on_made is not None:
            self._on_made = None
            on_made(self)

    def unread(self, data: bytes) -> None:
        """Put bytes back in front of the read buffer: what a handshake parser (SOCKS5) read past
        its end belongs to the relay. Keeps the connection a plain ``TcpConnection``, so
        ``hbone.relay`` can still splice it (a ``PrefixedStream`` wrapper would force the pumps)."""
        if data:
            self._chunks = [data, *self._chunks]
            self._nbuf += len(data)

    # Addresses are read from the transport when asked (logs, access records), not stored: two
    # tuples per connection saved (~290 bytes measured) on what is mostly never read.
    @property
    def local_addr(self) -> tuple[str, int]:
        addr = self.transport.get_extra_info("sockname") if self.transport is not None else None
        return (addr[0], addr[1]) if addr else ("", 0)

    @property
    def remote_addr(self) -> tuple[str, int]:
        addr = self.transport.get_extra_info("peername") if self.transport is not None else None
        return (addr[0], addr[1]) if addr else ("", 0)

    def data_received(self, data: bytes) -> None:
        splice = self._splice
        if splice is not None:
            splice.tcp_data(data)
            return
        if self._chunks:
            self._chunks.append(data)  # type: ignore[union-attr]
        else:
            self._chunks = [data]
        self._nbuf += len(data)
        if self._nbuf > self._limit and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake(self._read_waiter)

    def eof_received(self) -> bool:
        self._eof = True
        if self._splice is not None:
            self._splice.tcp_eof()
        else:
            self._wake(self._read_waiter)
        return True  # keep the transport open: our sending side may continue (half-close)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._splice is not None:
            self._splice.tcp_writable()
        self._wake(self._drain_waiter)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None and self._error is None:
            self._error = StreamReset(str(exc) or exc.__class__.__name__)
        if self._splice is not None:
            self._splice.tcp_lost(exc)
        self._wake(self._read_waiter)
        self._wake(self._drain_waiter)
        if self._closed_fut is not None:
            self._wake(self._closed_fut)

    @staticmethod
    def _wake(fut: asyncio.Future | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- ByteStream --
    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof or self._lost:
                return b""
            self._read_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        if self._error is not None:
            raise self._error  # as asyncio's StreamReader: a reset wins over buffered bytes
        chunks = self._chunks
        head = chunks[0]
        self._chunks = ()
        if len(head) <= max_bytes and len(chunks) == 1:
            data = head
        else:
            data = b"".join(chunks)
            if len(data) > max_bytes:
                self._chunks = [data[max_bytes:]]
                data = data[:max_bytes]
        self._nbuf -= len(data)
        if self._reading_paused and self._nbuf <= self._limit:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        if self._error is not None:
            raise self._error
        if self._lost:
            raise StreamReset("connection lost")
        while self._write_paused and not self._lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._lost:
            raise self._error or StreamReset("connection lost")

    def write_eof(self) -> None:
        transport = self.transport
        if not self._eof_sent and transport is not None and not transport.is_closing():
            self._eof_sent = True
            try:
                transport.write_eof()
            except OSError:
                pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and not self._lost:
            try:  # RST, not FIN (see TcpStream.abort)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        transport.abort()

    async def wait_closed(self) -> None:
        if self._lost:
            return
        if self._closed_fut is None:
            self._closed_fut = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed_fut)

    @property
    def _writer(self) -> "TcpConnection":
        # tests/test_hbone_slow.py reads `tcp._writer.transport` (written for TcpStream); kept so
        # that test keeps measuring the transport's buffer.
        return self

    def __repr__(self) -> str:
        state = "lost" if self._lost else "eof" if self._eof else "open"
        return (f"<TcpConnection {self.local_addr[0]}:{self.local_addr[1]}->"
                f"{self.remote_addr[0]}:{self.remote_addr[1]} {state} buffered={self._nbuf}>")


async def start_tcp_server(on_connection, host: str, port: int, **kw) -> asyncio.base_events.Server:
    """Listen on ``host:port``; each accepted connection is a ``TcpConnection`` handed to
    ``on_connection(conn)`` once connected (the callback owns it: typically it starts a task).

    What node mode's outbound listeners (15001, SOCKS5) accept with instead of
    ``asyncio.start_server``: a ``TcpConnection`` is what ``hbone.relay`` splices to an HBONE stream
    in the protocol callbacks, while a StreamReader/StreamWriter pair takes the pump path (two
    tasks, a future per read). ``kw`` goes to ``loop.create_server`` (backlog, reuse_port...)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: TcpConnection(DEFAULT_READ_BYTES, on_connection), host, port, **kw)


class PrefixedStream:
    """A ``ByteStream`` that first replays bytes already read (e.g. by protocol sniffing)."""

    __slots__ = ("_inner", "_prefix")

    def __init__(self, inner: ByteStream, prefix: bytes):
        self._inner = inner
        self._prefix = prefix

    @property
    def local_addr(self) -> tuple[str, int]:
        return self._inner.local_addr

    @property
    def remote_addr(self) -> tuple[str, int]:
        return self._inner.remote_addr

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        if self._prefix:
            head, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return head
        return await self._inner.read(max_bytes)

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    async def drain(self) -> None:
        await self._inner.drain()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()

    def __getattr__(self, name: str):
        # What only some inner streams offer (an HboneStream's ``watch_lost``): theirs, or AttributeError as for
        # the inner stream itself. (Only for names not defined here: the ByteStream methods above stay direct.)
        if name in ("watch_lost", "waiting", "lost"):
            return getattr(self._inner, name)
        raise AttributeError(name)

    def unwrap(self) -> tuple[ByteStream, bytes]:
        """(the inner stream, the bytes not yet replayed), for a consumer that takes the prefix itself
        and then reads the inner stream directly: no wrapper call on every read and drain (a waypoint
        serving HTTP/1.1 on a sniffed HBONE stream does this, proxy/pipeline/http.py). The prefix is
        handed over once: this wrapper replays nothing afterwards."""
        prefix, self._prefix = self._prefix, b""
        return self._inner, prefix

    def __repr__(self) -> str:
        return f"<PrefixedStream pending={len(self._prefix)} {self._inner!r}>"
