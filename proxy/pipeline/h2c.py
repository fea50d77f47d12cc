"""h2c: HTTP/2 with prior knowledge, in cleartext inside the HBONE tunnel — both ends of the waypoint.

Downstream (``serve_h2c``): a client that opened an h2c connection inside its tunnel (sniffed preface,
or a ``http2``/``grpc`` appProtocol port) gets one ``H2Request``/``H2Responder`` pair per stream, the
same duck-typed interface the HTTP/1.1 server gives, so ``HttpPipeline`` runs the one request path for
both (authorization, route, fault, retries, timeouts, header operations, mirrors).

Upstream (``H2Upstream``): one multiplexed h2c connection per endpoint, for service ports declared
``http2``/``grpc`` (and sniffed h2c on undeclared ports: Envoy's ``USE_DOWNSTREAM_PROTOCOL``).

Shape (STYLE: bytes in, events out): ``H2Core`` is the sans-IO protocol core over h2 — ``receive(bytes)``
returns our own events, never raises anything but ``H2cError`` (a protocol violation becomes GOAWAY and a
``Terminated`` event), and ``data_to_send()`` is written by the shell after every call. ``H2cConn`` is
the thin asyncio shell: a reader loop, per-stream inboxes, and flow control both ways:

* receive: DATA is acknowledged (WINDOW_UPDATE) only when the consumer takes it from the stream's
  inbox — i.e. when the previous chunk was written onward and drained — so a slow reader stalls its
  own stream (and, past the connection window, its connection), never the proxy's memory;
* send: ``write`` sends what the peer's windows allow and waits for WINDOW_UPDATE for the rest.

RST_STREAM from either side propagates (a reset downstream stream aborts the upstream request and
vice versa); GOAWAY from a peer fails the streams it did not process; a protocol error ends that
h2c connection (GOAWAY, the tunnel closes) and nothing else.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable

import h2.config
import h2.connection
import h2.events as ev
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from hbone.stream import KiB, MiB, ByteStream, StreamReset

# ---------------------------------------------------------------------------------------------
# Limits (each a bound on memory or work per connection)

# Streams a downstream h2c client may have open at once. Envoy's default is 2^31-1 (unbounded);
# we advertise ztunnel's client bound (100) so one client's connection holds at most 100 requests'
# state and buffers (each at most STREAM_WINDOW_BYTES of unread body).
MAX_CONCURRENT_STREAMS = 100
# Envoy's max_request_headers_kb default (60 KiB), as for HTTP/1.1 (proxy/http1/codec.py).
MAX_HEADER_LIST_BYTES = 60 * KiB
# Per-stream receive window: the most unread body one stream can buffer here. 1 MiB (Envoy's
# default is 256 MiB, which is memory we do not want per stream in Python) keeps a fast stream
# moving at loopback speed while 100 streams stay within the connection window below.
STREAM_WINDOW_BYTES = 1 * MiB
# Connection receive window: the most unread bytes one h2c connection can hold across its streams.
CONNECTION_WINDOW_BYTES = 4 * MiB
# One read from the tunnel stream.
READ_BYTES = 64 * KiB
# Upstream: at most this many concurrent streams per endpoint connection (ztunnel's client bound).
# A request over the bound waits for a slot (up to the route's timeout), as Envoy's pool queues
# pending requests. A peer advertising a lower SETTINGS_MAX_CONCURRENT_STREAMS makes h2 refuse the
# extra stream locally: that is a refused stream (retriable), not a wait.
UPSTREAM_MAX_STREAMS = 100

# RFC 9113 §8.2.2: connection-specific fields must not appear in HTTP/2 messages.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade", b"host", b"http2-settings"))
_INITIAL_CONNECTION_WINDOW = 65535   # RFC 9113 §6.9.2: only WINDOW_UPDATE on stream 0 raises it


class H2cError(Exception):
    """The only exception the h2c core raises: a call the connection/stream state does not allow."""


class H2cStreamClosed(H2cError):
    """The stream is closed or reset (send after END_STREAM/RST_STREAM)."""


# ---------------------------------------------------------------------------------------------
# Events out of the core


@dataclass(frozen=True, slots=True)
class Headers:
    """A request head (server) or a final response head (client). ``end_stream``: no body follows."""
    stream_id: int
    headers: tuple[tuple[bytes, bytes], ...]
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Data:
    """Body bytes; ``flow_len`` is what to ``ack`` once they were consumed."""
    stream_id: int
    data: bytes
    flow_len: int


@dataclass(frozen=True, slots=True)
class Trailers:
    stream_id: int
    headers: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Ended:
    """END_STREAM from the peer (after the body, or with the trailers)."""
    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    """RST_STREAM from the peer (``code`` from RFC 9113 §7)."""
    stream_id: int
    code: int


@dataclass(frozen=True, slots=True)
class WindowOpened:
    """The peer granted send window (``stream_id`` 0: the connection, or new settings)."""
    stream_id: int


@dataclass(frozen=True, slots=True)
class Terminated:
    """The connection is over: GOAWAY received (``by_peer``) or sent by us on a protocol error.
    Streams above ``last_stream_id`` were not processed by the peer."""
    code: int
    last_stream_id: int
    by_peer: bool
    reason: str = ""


Event = Headers | Data | Trailers | Ended | Reset | WindowOpened | Terminated


@dataclass(frozen=True, slots=True)
class H2Limits:
    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    max_header_list_bytes: int = MAX_HEADER_LIST_BYTES
    stream_window: int = STREAM_WINDOW_BYTES
    connection_window: int = CONNECTION_WINDOW_BYTES


DEFAULT_H2_LIMITS = H2Limits()


class H2Core:
    """Sans-IO HTTP/2 (h2c) endpoint, client or server. Bytes in, events out; no socket, no loop."""

    def __init__(self, *, client_side: bool, limits: H2Limits = DEFAULT_H2_LIMITS):
        self.client_side = client_side
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=True, normalize_inbound_headers=True)
        self._h2 = h2.connection.H2Connection(config=config)
        initial = {
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
            SettingCodes.ENABLE_PUSH: 0,     # no server push, either way
        }
        if not client_side:
            initial[SettingCodes.MAX_CONCURRENT_STREAMS] = limits.max_concurrent_streams
        self._h2.local_settings = Settings(client=client_side, initial_values=initial)
        self._h2.initiate_connection()
        extra = limits.connection_window - _INITIAL_CONNECTION_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self.closed = False
        self.goaway_received = False
        self._responded: set[int] = set()   # client: streams whose final response head arrived

    # -- in --
    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer. A protocol violation sends GOAWAY and yields ``Terminated``."""
        if self.closed:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            return [self._fail(getattr(err, "error_code", ErrorCodes.PROTOCOL_ERROR), str(err) or type(err).__name__)]
        except (h2.exceptions.H2Error, ValueError, KeyError, IndexError, UnicodeError) as err:
            # hpack/h2 internals can raise these on garbage; every one is the peer's protocol error.
            return [self._fail(ErrorCodes.PROTOCOL_ERROR, f"{type(err).__name__}: {err}")]
        out: list[Event] = []
        for e in h2_events:
            if isinstance(e, (ev.RequestReceived, ev.ResponseReceived)):
                if isinstance(e, ev.ResponseReceived):
                    self._responded.add(e.stream_id)
                out.append(Headers(e.stream_id, tuple(e.headers), e.stream_ended is not None))
            elif isinstance(e, ev.InformationalResponseReceived):
                continue   # 1xx: not forwarded (Envoy drops 100-continue from upstreams by default)
            elif isinstance(e, ev.DataReceived):
                out.append(Data(e.stream_id, e.data, e.flow_controlled_length))
            elif isinstance(e, ev.TrailersReceived):
                out.append(Trailers(e.stream_id, tuple(e.headers)))
            elif isinstance(e, ev.StreamEnded):
                out.append(Ended(e.stream_id))
            elif isinstance(e, ev.StreamReset):
                out.append(Reset(e.stream_id, int(e.error_code)))
            elif isinstance(e, ev.WindowUpdated):
                out.append(WindowOpened(e.stream_id))
            elif isinstance(e, ev.RemoteSettingsChanged):
                out.append(WindowOpened(0))   # INITIAL_WINDOW_SIZE may have grown every stream's window
            elif isinstance(e, ev.ConnectionTerminated):
                self.closed = True
                self.goaway_received = True
                out.append(Terminated(int(e.error_code), e.last_stream_id or 0, True))
        return out

    def _fail(self, code: int, reason: str) -> Terminated:
        try:
            self._h2.close_connection(error_code=code)
        except h2.exceptions.H2Error:
            pass
        self.closed = True
        return Terminated(int(code), self._h2.highest_inbound_stream_id, False, reason)

    # -- out --
    def next_stream_id(self) -> int:
        try:
            return self._h2.get_next_available_stream_id()
        except h2.exceptions.H2Error as err:
            raise H2cError(str(err)) from None

    def send_headers(self, stream_id: int, headers: Iterable[tuple[bytes, bytes]], *, end_stream: bool = False) -> None:
        try:
            self._h2.send_headers(stream_id, list(headers), end_stream=end_stream)
        except h2.exceptions.TooManyStreamsError as err:
            raise H2cError(f"too many streams: {err}") from None
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as err:
            raise H2cStreamClosed(str(err)) from None
        except h2.exceptions.H2Error as err:
            raise H2cError(str(err) or type(err).__name__) from None

    def sendable(self, stream_id: int) -> int:
        """Bytes of DATA the peer's windows allow on this stream now (0 when closed)."""
        try:
            return min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
        except h2.exceptions.H2Error:
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview) -> int:
        """Send as much of ``data`` as the windows allow, in frames; returns how many bytes left."""
        sent = 0
        n = len(data)
        try:
            while sent < n:
                room = self.sendable(stream_id)
                if room <= 0:
                    break
                k = min(room, n - sent)
                self._h2.send_data(stream_id, bytes(data[sent:sent + k]))
                sent += k
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as err:
            raise H2cStreamClosed(str(err)) from None
        except h2.exceptions.H2Error as err:
            raise H2cError(str(err) or type(err).__name__) from None
        return sent

    def end_stream(self, stream_id: int, trailers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        trailers = list(trailers)
        try:
            if trailers:
                self._h2.send_headers(stream_id, trailers, end_stream=True)
            else:
                self._h2.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as err:
            raise H2cStreamClosed(str(err)) from None
        except h2.exceptions.H2Error as err:
            raise H2cError(str(err) or type(err).__name__) from None

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        try:
            self._h2.reset_stream(stream_id, error_code=code)
        except h2.exceptions.H2Error:
            pass   # already closed: nothing to reset

    def ack(self, stream_id: int, n: int) -> None:
        """The consumer took ``n`` flow-controlled bytes: give the window back (WINDOW_UPDATE)."""
        if n <= 0 or self.closed:
            return
        try:
            self._h2.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError):
            try:   # the stream is gone; the connection's window must still come back
                self._h2.increment_flow_control_window(n)
            except h2.exceptions.H2Error:
                pass
        except h2.exceptions.H2Error:
            pass

    def goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        if not self.closed:
            try:
                self._h2.close_connection(error_code=code)
            except h2.exceptions.H2Error:
                pass
            self.closed = True

    @property
    def open_streams(self) -> int:
        return self._h2.open_outbound_streams if self.client_side else self._h2.open_inbound_streams

    @property
    def peer_max_streams(self) -> int:
        return self._h2.remote_settings.max_concurrent_streams

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def __repr__(self) -> str:
        side = "client" if self.client_side else "server"
        return f"<H2Core {side} open={self.open_streams} {'closed' if self.closed else 'open'}>"


# ---------------------------------------------------------------------------------------------
# The asyncio shell


class _Stream:
    __slots__ = ("id", "chunks", "ended", "reset", "waiter", "head", "trailers", "window", "local_done")

    def __init__(self, sid: int):
        self.id = sid
        self.chunks: deque[Data] = deque()
        self.ended = False
        self.reset: int | None = None        # RST_STREAM code from the peer (or connection loss)
        self.waiter: asyncio.Future | None = None
        self.head: asyncio.Future | None = None   # client: the response head
        self.trailers: tuple[tuple[bytes, bytes], ...] = ()
        self.window: asyncio.Future | None = None
        self.local_done = False              # we sent END_STREAM or RST_STREAM


def _wake(fut: asyncio.Future | None, value=None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(value)


class H2cConn:
    """One h2c connection over a ``ByteStream`` (downstream: a tunnel; upstream: a stream to a pod)."""

    def __init__(self, stream: ByteStream, core: H2Core, *,
                 on_request: Callable[[int, tuple, bool], None] | None = None,
                 on_reset: Callable[[int], None] | None = None):
        self.stream = stream
        self.core = core
        self.streams: dict[int, _Stream] = {}
        self.on_request = on_request
        self.on_reset = on_reset
        self.terminated: Terminated | None = None
        self.error: str = ""
        self.requests = 0
        self.flush()

    # -- plumbing --
    def flush(self) -> None:
        data = self.core.data_to_send()
        if data:
            try:
                self.stream.write(data)
            except (OSError, RuntimeError, AttributeError):
                pass   # the transport is gone: the reader loop ends the connection

    async def run(self) -> None:
        """Read until EOF, GOAWAY or a protocol error; then fail what is left."""
        try:
            while self.terminated is None:
                try:
                    data = await self.stream.read(READ_BYTES)
                except OSError as err:
                    self.error = f"{type(err).__name__}: {err}"
                    break
                if not data:
                    break
                self._dispatch(self.core.receive(data))
                self.flush()
        finally:
            self._fail_all()

    def _dispatch(self, events: list[Event]) -> None:
        for e in events:
            if isinstance(e, Headers):
                st = self.streams.get(e.stream_id)
                if st is None:
                    if self.core.client_side:
                        continue   # a stream we gave up on
                    st = self.streams[e.stream_id] = _Stream(e.stream_id)
                    self.requests += 1
                    if e.end_stream:
                        st.ended = True
                    assert self.on_request is not None
                    self.on_request(e.stream_id, e.headers, e.end_stream)
                    continue
                if e.end_stream:
                    st.ended = True
                _wake(st.head, e.headers)
                _wake(st.waiter)
            elif isinstance(e, Data):
                st = self.streams.get(e.stream_id)
                if st is None or st.local_done and st.reset is not None:
                    self.core.ack(e.stream_id, e.flow_len)
                    continue
                if not e.data:
                    self.core.ack(e.stream_id, e.flow_len)
                    continue
                st.chunks.append(e)
                _wake(st.waiter)
            elif isinstance(e, Trailers):
                st = self.streams.get(e.stream_id)
                if st is not None:
                    st.trailers = e.headers
            elif isinstance(e, Ended):
                st = self.streams.get(e.stream_id)
                if st is not None:
                    st.ended = True
                    _wake(st.waiter)
                    _wake(st.head, None)
            elif isinstance(e, Reset):
                st = self.streams.get(e.stream_id)
                if st is not None:
                    st.reset = e.code
                    st.local_done = True
                    _wake(st.waiter)
                    _wake(st.head, None)
                    _wake(st.window)
                    if self.on_reset is not None:
                        self.on_reset(e.stream_id)
            elif isinstance(e, WindowOpened):
                if e.stream_id == 0:
                    for st in self.streams.values():
                        _wake(st.window)
                else:
                    st = self.streams.get(e.stream_id)
                    if st is not None:
                        _wake(st.window)
            elif isinstance(e, Terminated):
                self.terminated = e
                if not e.by_peer:
                    self.error = f"protocol error: {e.reason}"
                for sid, st in self.streams.items():
                    if sid > e.last_stream_id or not e.by_peer:
                        st.reset = st.reset if st.reset is not None else int(ErrorCodes.REFUSED_STREAM if e.by_peer
                                                                              else ErrorCodes.PROTOCOL_ERROR)
                        st.local_done = True
                        _wake(st.waiter)
                        _wake(st.head, None)
                        _wake(st.window)

    def _fail_all(self) -> None:
        for st in self.streams.values():
            if not st.ended and st.reset is None:
                st.reset = int(ErrorCodes.CANCEL if self.terminated is None else ErrorCodes.INTERNAL_ERROR)
            _wake(st.waiter)
            _wake(st.head, None)
            _wake(st.window)

    @property
    def alive(self) -> bool:
        return self.terminated is None and not self.core.closed

    def forget(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is not None:
            unread = sum(d.flow_len for d in st.chunks)
            st.chunks.clear()
            self.core.ack(sid, unread)   # the connection window comes back even for unread bytes
            self.flush()

    # -- per stream --
    async def read(self, sid: int) -> bytes:
        """The next body chunk, b"" at END_STREAM; ``StreamReset`` when the peer reset the stream.
        The chunk is acknowledged now: the caller writes it onward before asking for the next."""
        st = self.streams.get(sid)
        if st is None:
            raise StreamReset(f"h2c stream {sid} is closed")
        while not st.chunks:
            if st.reset is not None:
                raise StreamReset(f"h2c stream {sid} reset (code {st.reset})")
            if st.ended:
                return b""
            st.waiter = asyncio.get_running_loop().create_future()
            try:
                await st.waiter
            finally:
                st.waiter = None
        d = st.chunks.popleft()
        self.core.ack(sid, d.flow_len)
        self.flush()
        return d.data

    async def write(self, sid: int, data: bytes) -> None:
        """Send body bytes, waiting for the peer's window; then for the transport to drain."""
        st = self.streams.get(sid)
        view = memoryview(data)
        while view:
            if st is None or st.reset is not None or not self.alive:
                raise StreamReset(f"h2c stream {sid} reset")
            try:
                n = self.core.send_data(sid, view)
            except H2cError as err:
                raise StreamReset(f"h2c stream {sid}: {err}") from None
            self.flush()
            view = view[n:]
            if view and n == 0:
                st.window = asyncio.get_running_loop().create_future()
                try:
                    await st.window
                finally:
                    st.window = None
        await self.stream.drain()

    def end(self, sid: int, trailers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        st = self.streams.get(sid)
        if st is None or st.local_done:
            return
        st.local_done = True
        try:
            self.core.end_stream(sid, trailers)
        except H2cError as err:
            raise StreamReset(f"h2c stream {sid}: {err}") from None
        self.flush()

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        st = self.streams.get(sid)
        if st is not None and st.local_done and st.reset is None and st.ended:
            return   # finished both ways: nothing to reset
        if st is not None:
            st.local_done = True
            if st.reset is None:   # our own reset also ends what waits on this stream here
                st.reset = int(code)
            _wake(st.waiter)
            _wake(st.head, None)
            _wake(st.window)
        self.core.reset(sid, code)
        self.flush()

    def close(self, code: int = ErrorCodes.NO_ERROR) -> None:
        self.core.goaway(code)
        self.flush()

    def __repr__(self) -> str:
        state = "open" if self.alive else "closed"
        return f"<H2cConn {state} streams={len(self.streams)} requests={self.requests}>"


# ---------------------------------------------------------------------------------------------
# Downstream: requests and responses for the pipeline


def _pseudo(headers: tuple[tuple[bytes, bytes], ...]) -> tuple[dict[bytes, bytes], list[tuple[bytes, bytes]]]:
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.startswith(b":"):
            pseudo[name] = value
        else:
            regular.append((name, value))
    return pseudo, regular


class H2Request:
    """One downstream request, with the fields ``HttpPipeline`` reads from an ``Http1Request``."""

    __slots__ = ("conn", "sid", "method", "target", "host", "headers", "content_length", "has_body",
                 "body_bytes", "scheme", "_done")

    def __init__(self, conn: H2cConn, sid: int, raw: tuple[tuple[bytes, bytes], ...], ended: bool):
        pseudo, regular = _pseudo(raw)
        self.conn = conn
        self.sid = sid
        self.method = pseudo.get(b":method", b"GET")
        self.target = pseudo.get(b":path", b"/")
        self.scheme = pseudo.get(b":scheme", b"http")
        host = pseudo.get(b":authority")
        if host is None:   # RFC 9113 §8.3.1: without :authority, a Host field may carry it
            host = next((v for n, v in regular if n == b"host"), b"")
        self.host = host
        self.headers = [(n, v) for n, v in regular if n != b"host"]
        cl = next((v for n, v in regular if n == b"content-length"), None)
        self.content_length = int(cl) if cl is not None and cl.isdigit() else None
        self.has_body = not ended
        self.body_bytes = 0
        self._done = ended

    @property
    def trailers(self) -> tuple[tuple[bytes, bytes], ...]:
        st = self.conn.streams.get(self.sid)
        return st.trailers if st is not None else ()

    async def body_chunks(self) -> AsyncIterator[bytes]:
        if self._done:
            return
        while True:
            data = await self.conn.read(self.sid)
            if not data:
                self._done = True
                return
            self.body_bytes += len(data)
            yield data

    def __repr__(self) -> str:
        return f"<H2Request {self.sid} {self.method.decode()} {self.target.decode('latin-1')}>"


class H2Responder:
    """Writes one response on a downstream stream (the ``Responder`` interface, plus trailers)."""

    __slots__ = ("conn", "sid", "head_sent", "ended", "status", "body_bytes", "_head_only")

    def __init__(self, conn: H2cConn, sid: int, method: bytes):
        self.conn = conn
        self.sid = sid
        self.head_sent = False
        self.ended = False
        self.status = 0
        self.body_bytes = 0
        self._head_only = method == b"HEAD"

    def _head(self, status: int, headers: Iterable[tuple[bytes, bytes]], end: bool) -> None:
        if self.head_sent:
            raise RuntimeError("response head already sent")
        fields = [(b":status", b"%d" % status)]
        fields.extend((n.lower(), v) for n, v in headers if n.lower() not in CONNECTION_SPECIFIC
                      and not n.startswith(b":"))
        self.head_sent = True
        self.status = status
        try:
            self.conn.core.send_headers(self.sid, fields, end_stream=end)
        except H2cError as err:
            raise StreamReset(f"h2c stream {self.sid}: {err}") from None
        st = self.conn.streams.get(self.sid)
        if end and st is not None:
            st.local_done = True
        self.conn.flush()

    async def send_head(self, status: int, headers: Iterable[tuple[bytes, bytes]] = (), *,
                        reason: bytes | None = None) -> None:
        self._head(status, headers, False)
        await self.conn.stream.drain()

    async def send_body(self, data: bytes) -> None:
        if not self.head_sent or self.ended:
            raise RuntimeError("send_body outside of a started response")
        if not data or self._head_only:
            return
        await self.conn.write(self.sid, data)
        self.body_bytes += len(data)

    async def end(self, trailers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        if not self.head_sent:
            raise RuntimeError("end() before send_head()")
        if self.ended:
            return
        self.ended = True
        self.conn.end(self.sid, [(n.lower(), v) for n, v in trailers if n.lower() not in CONNECTION_SPECIFIC])
        await self.conn.stream.drain()

    async def send_local_reply(self, status: int, body: bytes = b"", headers: Iterable[tuple[bytes, bytes]] = (),
                               *, content_type: bytes = b"text/plain") -> None:
        fields = [(b"content-length", b"%d" % len(body))]
        if body:
            fields.append((b"content-type", content_type))
        fields.extend(headers)
        if not body or self._head_only:
            self._head(status, fields, True)
            self.ended = True
            await self.conn.stream.drain()
            return
        self._head(status, fields, False)
        await self.send_body(body)
        await self.end()

    def __repr__(self) -> str:
        state = "ended" if self.ended else ("streaming" if self.head_sent else "pending")
        return f"<H2Responder {self.sid} {state} status={self.status} sent={self.body_bytes}>"


Handler = Callable[[H2Request, H2Responder], Awaitable[None]]


async def serve_h2c(stream: ByteStream, handler: Handler, *, limits: H2Limits = DEFAULT_H2_LIMITS,
                    on_error: Callable[[BaseException], None] | None = None) -> H2cConn:
    """Serve one downstream h2c connection (its preface is the stream's first bytes) until it ends.
    Each stream's handler runs in this connection's TaskGroup: every task has an owner."""
    core = H2Core(client_side=False, limits=limits)
    async with asyncio.TaskGroup() as tg:
        conn: H2cConn
        handlers: dict[int, asyncio.Task] = {}

        def start(sid: int, raw: tuple, end: bool) -> None:
            handlers[sid] = tg.create_task(one(sid, raw, end))

        def downstream_reset(sid: int) -> None:
            # RST_STREAM from the client: stop its request (Envoy: downstream remote reset → the
            # upstream request is reset too; the cancellation reaches it through the executor).
            task = handlers.get(sid)
            if task is not None and not task.done():
                task.cancel()

        async def one(sid: int, raw: tuple, bodiless: bool) -> None:
            st = conn.streams.get(sid)
            request = H2Request(conn, sid, raw, bodiless)
            responder = H2Responder(conn, sid, request.method)
            try:
                await handler(request, responder)
                if not responder.ended:
                    raise RuntimeError("handler returned without ending the response")
                if st is not None and not st.ended and st.reset is None:
                    # RFC 9113 §8.1: the response is complete before the request body ended; tell
                    # the client to stop sending it (NO_ERROR), as Envoy does.
                    conn.reset(sid, ErrorCodes.NO_ERROR)
            except Exception as exc:  # noqa: BLE001 — one place turns a failure into an answer
                if on_error is not None:
                    on_error(exc)
                if not responder.head_sent and conn.alive and (st is None or st.reset is None):
                    try:
                        await responder.send_local_reply(500, b"")
                    except (OSError, RuntimeError):
                        conn.reset(sid, ErrorCodes.INTERNAL_ERROR)
                else:
                    conn.reset(sid, ErrorCodes.INTERNAL_ERROR)
            finally:
                handlers.pop(sid, None)
                conn.forget(sid)

        conn = H2cConn(stream, core, on_request=start, on_reset=downstream_reset)
        try:
            await conn.run()
        finally:
            if not core.closed:
                conn.close()
    # Every stream is answered (or reset): the GOAWAY goes out, then the tunnel ends (END_STREAM).
    try:
        await stream.drain()
    except OSError:
        pass
    stream.close()
    return conn


# ---------------------------------------------------------------------------------------------
# Upstream: one multiplexed h2c connection per endpoint


class H2UpstreamReset(ConnectionError):
    """The upstream reset the stream or went away. ``before_response``: no response head came, so
    it can be retried; ``refused``: REFUSED_STREAM or beyond a GOAWAY's last stream (RFC 9113 §8.7:
    "the request has not been processed")."""

    def __init__(self, message: str, *, before_response: bool, refused: bool = False):
        super().__init__(message)
        self.before_response = before_response
        self.refused = refused


class H2Response:
    """An upstream response: status and headers now, body streamed, trailers after the body."""

    __slots__ = ("up", "sid", "status", "headers", "reason", "_sender", "done", "reusable", "trailers")

    def __init__(self, up: "H2Upstream", sid: int, head: tuple, sender: asyncio.Task | None):
        pseudo, regular = _pseudo(head)
        self.up = up
        self.sid = sid
        self.status = int(pseudo.get(b":status", b"0") or 0)
        self.headers = regular
        self.reason = None
        self._sender = sender
        self.done = False
        self.reusable = False   # the connection is shared: never returned to an HTTP/1.1 pool
        self.trailers: tuple[tuple[bytes, bytes], ...] = ()   # set once the body ended

    async def body_chunks(self) -> AsyncIterator[bytes]:
        if self.done:
            return
        conn = self.up.conn
        try:
            while True:
                try:
                    data = await conn.read(self.sid)
                except StreamReset as err:
                    raise H2UpstreamReset(f"upstream reset mid-response: {err}", before_response=False) from None
                if not data:
                    self.done = True
                    st = conn.streams.get(self.sid)
                    self.trailers = st.trailers if st is not None else ()
                    return
                yield data
        finally:
            if self.done:
                self._finish()

    def _finish(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()   # the upstream answered before taking the whole body
            self.up.conn.reset(self.sid, ErrorCodes.CANCEL)
        self.up.release(self.sid)

    def abort(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
        self.up.conn.reset(self.sid, ErrorCodes.CANCEL)
        self.up.release(self.sid)

    def __repr__(self) -> str:
        return f"<H2Response {self.status} {'done' if self.done else 'streaming'}>"


class H2Upstream:
    """One h2c connection to an endpoint, multiplexing at most ``max_streams`` requests."""

    def __init__(self, stream: ByteStream, *, max_streams: int = UPSTREAM_MAX_STREAMS,
                 limits: H2Limits = DEFAULT_H2_LIMITS):
        self.conn = H2cConn(stream, H2Core(client_side=True, limits=limits))
        self.max_streams = max_streams
        self.slots = asyncio.Semaphore(max_streams)
        self.active: set[int] = set()
        self.reader: asyncio.Task = asyncio.get_running_loop().create_task(self.conn.run())
        self.reader.add_done_callback(lambda _: stream.close())

    @property
    def alive(self) -> bool:
        return self.conn.alive and not self.reader.done()

    def release(self, sid: int) -> None:
        if sid in self.active:
            self.active.discard(sid)
            self.slots.release()
            self.conn.forget(sid)

    async def request(self, method: bytes, target: bytes, authority: bytes, headers: Iterable[tuple[bytes, bytes]],
                      body: bytes | AsyncIterable[bytes] | None, *, scheme: bytes = b"http") -> H2Response:
        """Send a request; return once the response head arrived (``H2UpstreamReset`` otherwise)."""
        await self.slots.acquire()
        conn = self.conn
        sid = 0
        try:
            if not self.alive:
                raise H2cError("upstream h2c connection is closed")
            sid = conn.core.next_stream_id()
            fields = [(b":method", method), (b":scheme", scheme), (b":authority", authority), (b":path", target)]
            fields.extend((n, v) for n, v in headers if n not in CONNECTION_SPECIFIC and n not in (b"te", b"expect")
                          and not n.startswith(b":"))
            if any(n == b"te" and v.strip().lower() == b"trailers" for n, v in headers):
                fields.append((b"te", b"trailers"))   # RFC 9113 §8.2.2: the only TE value allowed
            st = conn.streams[sid] = _Stream(sid)
            self.active.add(sid)
            conn.core.send_headers(sid, fields, end_stream=body is None)
            st.local_done = body is None
            conn.flush()
        except H2cError as err:
            if sid in self.active:
                self.release(sid)
            else:
                self.slots.release()
            raise H2UpstreamReset(f"upstream h2c: {err}", before_response=True, refused=True) from None
        sender = None
        if isinstance(body, (bytes, bytearray, memoryview)):
            sender = asyncio.get_running_loop().create_task(self._send(sid, _once(bytes(body))))
        elif body is not None:
            sender = asyncio.get_running_loop().create_task(self._send(sid, body))
        try:
            st.head = asyncio.get_running_loop().create_future()
            head = await st.head
            if head is None:
                code = st.reset
                refused = code == ErrorCodes.REFUSED_STREAM
                raise H2UpstreamReset(f"upstream reset before the response (code {code})",
                                      before_response=True, refused=refused)
            return H2Response(self, sid, head, sender)
        except BaseException:
            if sender is not None and not sender.done():
                sender.cancel()
            conn.reset(sid, ErrorCodes.CANCEL)
            self.release(sid)
            raise

    async def _send(self, sid: int, body: AsyncIterable[bytes]) -> None:
        try:
            async for chunk in body:
                if chunk:
                    await self.conn.write(sid, chunk)
            self.conn.end(sid)
        except OSError:
            return   # the upstream stream is gone: reading the response reports it
        except BaseException:
            # The body source failed (client reset) or we were cancelled: the upstream must see a
            # reset, never a short request that looks complete.
            self.conn.reset(sid, ErrorCodes.CANCEL)
            raise

    async def close(self) -> None:
        self.conn.close()
        self.conn.stream.close()
        self.reader.cancel()
        try:
            await self.reader
        except BaseException:  # noqa: BLE001 — closing: its end is expected
            pass

    def __repr__(self) -> str:
        return f"<H2Upstream {'alive' if self.alive else 'closed'} active={len(self.active)}/{self.max_streams}>"


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class H2UpstreamPool:
    """Upstream h2c connections, one per endpoint key, shared by all requests to that endpoint.

    Decide, then act: ``get(key)`` returns a live connection or None (the caller dials and ``add``s).
    Concurrent dials to one key are not merged: the loser's connection is closed (rare; it costs one
    HBONE stream)."""

    def __init__(self, max_streams: int = UPSTREAM_MAX_STREAMS):
        self.conns: dict[str, H2Upstream] = {}
        self.max_streams = max_streams
        self.opened = 0

    def get(self, key: str) -> H2Upstream | None:
        up = self.conns.get(key)
        if up is not None and not up.alive:
            del self.conns[key]
            return None
        return up

    def add(self, key: str, stream: ByteStream) -> H2Upstream:
        existing = self.get(key)
        if existing is not None:
            stream.close()
            return existing
        up = self.conns[key] = H2Upstream(stream, max_streams=self.max_streams)
        self.opened += 1
        return up

    async def close(self) -> None:
        conns, self.conns = list(self.conns.values()), {}
        for up in conns:
            await up.close()

    def __repr__(self) -> str:
        return f"<H2UpstreamPool conns={len(self.conns)} opened={self.opened}>"


__all__ = ["H2Core", "H2cConn", "H2cError", "H2cStreamClosed", "H2Limits", "DEFAULT_H2_LIMITS", "H2Request",
           "H2Responder", "serve_h2c", "H2Upstream", "H2UpstreamPool", "H2Response", "H2UpstreamReset",
           "Headers", "Data", "Trailers", "Ended", "Reset", "WindowOpened", "Terminated",
           "MAX_CONCURRENT_STREAMS", "MAX_HEADER_LIST_BYTES", "STREAM_WINDOW_BYTES", "CONNECTION_WINDOW_BYTES",
           "UPSTREAM_MAX_STREAMS", "CONNECTION_SPECIFIC"]
