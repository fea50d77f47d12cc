"""HTTP/1.1 server loop over a ``ByteStream``: one downstream connection, many requests.

``serve_http1(stream, handler)`` reads requests one after another (keep-alive; pipelined requests
are answered in order, one at a time) and calls ``await handler(request, responder)``:

- ``request``: an ``Http1Request`` — the head's fields and ``async for chunk in request.body_chunks()``
  (streamed: bytes are read from the socket only as the handler asks, so TCP backpressure reaches
  the client; ``Expect: 100-continue`` is answered when the body is first asked for);
- ``responder``: ``await send_head(status, headers)``, ``await send_body(chunk)``, ``await end()``,
  or ``await send_local_reply(status, body, headers)`` (Envoy's local reply shape).

Protocol upgrades (WebSocket): a request with ``Connection: upgrade`` + ``Upgrade: X`` (not h2c) has
``request.upgrade == X``. The handler either answers it like any request (the connection then stays
HTTP/1.1: RFC 9110 §7.8) or calls ``await responder.switch_protocols(X, headers)``, which sends the
101 and returns the raw downstream ``ByteStream`` (bytes the client sent after the head first);
the connection serves no more requests and is closed after the handler returns.

The responder owns framing: it removes hop-by-hop and framing headers the handler passes, keeps a
given ``content-length``, else uses chunked (HTTP/1.1) or close-delimited (HTTP/1.0) bodies.
A handler exception becomes a 500 local reply if no head was sent, else the connection is aborted
(TCP RST) so that the client cannot take a truncated response for a whole one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Iterable

from hbone.stream import KiB, ByteStream, PrefixedStream

from .codec import (_REASONS, CHUNK_END, HOP_BY_HOP, LAST_CHUNK, MAX_BODY_BYTES, MAX_HEAD_BYTES, MAX_HEADERS,
                    Http1Error, MessageEnd, RequestHead, RequestReader, chunk_header,
                    encode_response_head, reason_phrase)


@dataclass(frozen=True, slots=True)
class Http1Limits:
    # See codec.py: Envoy's max_request_headers_kb (60 KiB) and max_headers_count (100).
    max_head_bytes: int = MAX_HEAD_BYTES
    max_headers: int = MAX_HEADERS
    max_body_bytes: int | None = MAX_BODY_BYTES
    # One socket read. Pipelined requests are parsed from at most this many buffered bytes at a
    # time and the next read waits until they are answered, so pipelining memory is bounded by it.
    read_bytes: int = 64 * KiB
    # Envoy's HTTP connection manager idle_timeout default: 1 h without a request → close.
    idle_timeout_s: float = 3600.0
    # From the first byte of a request head to its end (slowloris bound). Envoy's
    # request_headers_timeout is off by default; nginx's client_header_timeout is 60 s. → 408.
    head_timeout_s: float = 60.0
    # After a response, an unread request body up to this size is read and discarded to keep the
    # connection (Go net/http does the same with 256 KiB); a longer one closes the connection.
    discard_body_bytes: int = 256 * KiB
    discard_timeout_s: float = 5.0
    # Lingering close (RFC 9112 §9.6): after our FIN, read and drop what the client still sends for
    # up to 2 s (Apache's lingering-close time), so our close does not RST away the last response.
    linger_s: float = 2.0
    linger_bytes: int = 256 * KiB


DEFAULT_LIMITS = Http1Limits()

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
# Framing and connection management belong to the responder, never to the handler's headers.
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_NO_BODY_STATUS = frozenset((204, 304))
# Writes up to this size are joined with their chunk framing into one buffer (one send); larger
# ones are written as three buffers to avoid copying the payload.
_JOIN_BELOW = 16 * KiB

Handler = Callable[["Http1Request", "Responder"], Awaitable[None]]


class Http1Request:
    """One request on the connection: the parsed head and its streamed body."""

    # The head's fields are copied into slots once (one tuple unpacking) rather than read through a
    # property per access: the pipeline reads method, target, headers, host, has_body ~12 times a request.
    # With the request head's one-pass header scan (codec.py): in-process HttpPipeline.serve 44.5 → 43.3 µs.
    __slots__ = ("head", "_conn", "body_done", "body_bytes", "continue_sent", "method", "target", "version",
                 "headers", "keep_alive", "has_body", "content_length", "host", "upgrade")

    def __init__(self, head: RequestHead, conn: "_Conn"):
        self.head = head
        (self.method, self.target, self.version, self.headers, self.keep_alive, self.has_body, _,
         self.content_length, _, self.host, self.upgrade) = head
        self._conn = conn
        self.body_done = not head.has_body
        self.body_bytes = 0
        self.continue_sent = False

    @property
    def remote_addr(self) -> tuple[str, int]:
        return self._conn.stream.remote_addr

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The request body, piece by piece as it arrives. Raises ``Http1Error`` on a malformed
        body or a client that closed mid-body, ``StreamReset`` if the client reset."""
        if self.body_done:
            return
        conn = self._conn
        if self.head.expect_continue and not self.continue_sent and not conn.response_started:
            # RFC 9110 §10.1.1: the client waits for 100 (Continue) before sending the body.
            self.continue_sent = True
            conn.stream.write(CONTINUE_100)
        while True:
            event = await conn.next_event()
            if event is MessageEnd:
                self.body_done = True
                return
            if event is None:
                raise Http1Error(400, "connection closed mid-body")
            data = event.data
            self.body_bytes += len(data)
            yield data

    def __repr__(self) -> str:
        return (f"<Http1Request {self.head.method.decode()} {self.head.target.decode('latin-1')} "
                f"HTTP/{self.head.version.decode()} body={'done' if self.body_done else 'pending'}>")


class Responder:
    """Writes one response, with framing chosen from the request and the headers given."""

    __slots__ = ("_conn", "_request", "head_sent", "ended", "status", "_mode", "_remaining",
                 "body_bytes")

    def __init__(self, conn: "_Conn", request: Http1Request):
        self._conn = conn
        self._request = request
        self.head_sent = False
        self.ended = False
        self.status = 0
        self._mode = ""          # "none" | "length" | "chunked" | "eof"
        self._remaining = 0
        self.body_bytes = 0

    def _head_bytes(self, status: int, headers: Iterable[tuple[bytes, bytes]],
                    reason: bytes | None) -> bytes:
        if self.head_sent:
            raise RuntimeError("response head already sent")
        conn = self._conn
        request = self._request
        version = request.version
        # The head is encoded as it is decided: the status line, then each kept header as its four parts
        # (encode_response_head's bytes, without a list of pairs walked twice). PERF NOTE: timeit, a proxied
        # response with 5 headers, Responder + _head_bytes 1.72 -> 1.52 us (/tmp/wp/micro_heads.py, best
        # of 7); twin test against the two-step encoding in tests/test_http1_fastpaths.py.
        parts = [b"HTTP/", version, b" %d " % status, _REASONS.get(status, b"Unknown") if reason is None else reason,
                 b"\r\n"]
        length = None
        at = 5                   # content-length keeps its place among the headers
        for name, value in headers:
            name = name.lower()
            if name == b"content-length":
                length = int(value)
                at = len(parts)
            elif name not in _RESPONSE_DROP:
                parts += (name, b": ", value, b"\r\n")
        if request.method == b"HEAD" or status in _NO_BODY_STATUS or status < 200:
            # RFC 9110 §9.3.2/§15.3.5/§15.4.5: no body; a Content-Length still describes the
            # resource for HEAD and 304.
            self._mode = "none"
            if length is not None and status != 204:
                parts[at:at] = (b"content-length", b": ", b"%d" % length, b"\r\n")
        elif length is not None:
            self._mode = "length"
            self._remaining = length
            parts[at:at] = (b"content-length", b": ", b"%d" % length, b"\r\n")
        elif version == b"1.1":
            self._mode = "chunked"
            parts += (b"transfer-encoding", b": ", b"chunked", b"\r\n")
        else:
            self._mode = "eof"           # HTTP/1.0 client: the body ends when we close
            conn.keep_alive = False
        if not request.body_done and request.head.expect_continue and not request.continue_sent:
            # The client is still waiting to send a body we never asked for: close after this
            # response (RFC 9110 §10.1.1) rather than read a body that may never come.
            conn.keep_alive = False
        if not conn.keep_alive:
            parts += (b"connection", b": ", b"close", b"\r\n")
        elif version == b"1.0":
            parts += (b"connection", b": ", b"keep-alive", b"\r\n")
        parts.append(b"\r\n")
        self.head_sent = True
        self.status = status
        conn.response_started = True
        blob = b"".join(parts)
        # As codec._encode_fields: one CRLF per line (status line, headers, end), else a field or the
        # reason carried a CR or LF (header injection).
        lines = (len(parts) - 2) // 4 + 1
        if blob.count(b"\n") != lines or blob.count(b"\r") != lines:
            raise ValueError("CR or LF inside a header name or value")
        return blob

    async def send_head(self, status: int, headers: Iterable[tuple[bytes, bytes]] = (), *,
                        reason: bytes | None = None) -> None:
        """Start the response; the body follows with ``send_body`` and ``end``."""
        self._conn.stream.write(self._head_bytes(status, headers, reason))

    async def send_body(self, data: bytes) -> None:
        if not self.head_sent or self.ended:
            raise RuntimeError("send_body outside of a started response")
        if not data or self._mode == "none":
            return
        stream = self._conn.stream
        n = len(data)
        if self._mode == "chunked":
            if n < _JOIN_BELOW:
                stream.write(b"%x\r\n%b\r\n" % (n, data))
            else:
                stream.write(chunk_header(n))
                stream.write(data)
                stream.write(CHUNK_END)
        else:
            if self._mode == "length":
                if n > self._remaining:
                    self._conn.abort()
                    raise RuntimeError("response body longer than its content-length")
                self._remaining -= n
            stream.write(data)
        self.body_bytes += n
        await stream.drain()

    async def end(self) -> None:
        if not self.head_sent:
            raise RuntimeError("end() before send_head()")
        if self.ended:
            return
        if self._mode == "length" and self._remaining:
            # Never let a short body pass for a whole one: the client sees a reset.
            self._conn.abort()
            raise RuntimeError(f"response body {self._remaining} bytes short of its content-length")
        self.ended = True
        if self._mode == "chunked":
            self._conn.stream.write(LAST_CHUNK)
        await self._conn.stream.drain()

    async def send_response(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, *,
                            reason: bytes | None = None) -> None:
        """``send_head`` + ``send_body(body)`` + ``end()`` for a body that is all there: the same framing
        and checks, one write and one drain (a proxied small response costs one HBONE write, not three)."""
        stream = self._conn.stream
        stream.write(self.response_bytes(status, headers, body, reason))
        await stream.drain()

    def response_bytes(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes,
                       reason: bytes | None = None) -> bytes:
        """What ``send_response`` writes (the response counts as sent once this returns): for a caller that
        writes it itself, inside a stream's callbacks (proxy.pipeline.lean)."""
        head = self._head_bytes(status, headers, reason)
        n = len(body)
        mode = self._mode
        if not n or mode == "none":
            data = head
        elif mode == "chunked":
            data = b"%b%x\r\n%b\r\n" % (head, n, body)
        else:
            if mode == "length":
                if n > self._remaining:
                    self._conn.abort()
                    raise RuntimeError("response body longer than its content-length")
                self._remaining -= n
            data = head + body
        if n and mode != "none":
            self.body_bytes += n
        if mode == "length" and self._remaining:
            # Never let a short body pass for a whole one: the client sees a reset.
            self._conn.abort()
            raise RuntimeError(f"response body {self._remaining} bytes short of its content-length")
        self.ended = True
        if mode == "chunked":
            data += LAST_CHUNK
        return data

    async def send_local_reply(self, status: int, body: bytes = b"",
                               headers: Iterable[tuple[bytes, bytes]] = (), *,
                               content_type: bytes = b"text/plain") -> None:
        """A whole response generated by the proxy, in Envoy's shape: ``content-length``, and
        ``content-type: text/plain`` when there is a body (e.g. 403 ``RBAC: access denied``)."""
        fields = [(b"content-length", b"%d" % len(body))]
        if body:
            fields.append((b"content-type", content_type))
        fields.extend(headers)
        head = self._head_bytes(status, fields, None)
        stream = self._conn.stream
        if self._mode == "none":
            body = b""
        stream.write(head + body if len(body) < _JOIN_BELOW else head)
        if len(body) >= _JOIN_BELOW:
            stream.write(body)
        self.body_bytes = len(body)
        self.ended = True
        await stream.drain()

    async def switch_protocols(self, upgrade: bytes, headers: Iterable[tuple[bytes, bytes]] = (), *,
                               reason: bytes | None = None) -> ByteStream:
        """Answer an upgrade request with ``101 Switching Protocols`` (``Connection: upgrade``,
        ``Upgrade: upgrade`` and ``headers`` minus hop-by-hop and framing fields) and return the raw
        downstream stream: what the client sent after the request head comes first. The response
        counts as ended; the connection serves no more HTTP and is closed once the handler returns."""
        if self.head_sent:
            raise RuntimeError("response head already sent")
        conn = self._conn
        if self._request.upgrade is None or not conn.reader.upgrading:
            raise RuntimeError("switch_protocols() on a request that asked for no upgrade")
        out = [(n, v) for n, v in ((n.lower(), v) for n, v in headers) if n not in _RESPONSE_DROP]
        out += ((b"connection", b"upgrade"), (b"upgrade", upgrade))
        conn.stream.write(encode_response_head(101, reason, out))
        self.head_sent = self.ended = True
        self.status = 101
        self._mode = "none"
        conn.response_started = True
        conn.keep_alive = False
        conn.upgraded = True
        conn.stop_timer()   # the idle/head timeouts are HTTP's; the relay has its own life
        tail = conn.reader.take_upgrade_tail()
        events = conn.events
        while events and events[0] is MessageEnd:
            events.popleft()   # the upgrade request's own end (it has no body)
        if conn.prefix:
            tail, conn.prefix = tail + conn.prefix, b""
        await conn.stream.drain()
        return PrefixedStream(conn.stream, tail) if tail else conn.stream

    def __repr__(self) -> str:
        state = "ended" if self.ended else ("streaming" if self.head_sent else "pending")
        return f"<Responder {state} status={self.status} mode={self._mode or '-'} sent={self.body_bytes}>"


class _Conn:
    __slots__ = ("stream", "limits", "reader", "events", "eof", "keep_alive", "response_started",
                 "aborted", "requests", "_task", "_timer", "_timer_at", "_wait_deadline", "_started_at",
                 "_waiting", "_expired", "prefix", "_loop", "upgraded")

    def __init__(self, stream: ByteStream, limits: Http1Limits, prefix: bytes = b""):
        self.stream = stream
        # Bytes already read from the stream (protocol sniffing), parsed before the first read.
        self.prefix = prefix
        # The running loop, looked up once per connection: asyncio.get_running_loop() is a getpid()
        # syscall on 3.11, and next_head wanted it for every request.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.limits = limits
        self.reader = RequestReader(max_head_bytes=limits.max_head_bytes,
                                    max_headers=limits.max_headers,
                                    max_body_bytes=limits.max_body_bytes)
        self.events: deque = deque()
        self.eof = False
        self.keep_alive = True
        self.response_started = False
        self.aborted = False
        self.upgraded = False   # a 101 was sent: the stream carries another protocol now
        self.requests = 0
        # The idle / head timeouts (see _arm): one timer per connection, re-armed only when it fires.
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._wait_deadline = 0.0      # loop time the current wait for a head ends
        self._started_at: float | None = None   # loop time the current head's first bytes came
        self._waiting = False
        self._expired = False

    def abort(self) -> None:
        self.aborted = True
        self.keep_alive = False
        self.stream.abort()

    async def next_event(self):
        """The next parser event, reading more bytes only when none is pending; None at EOF."""
        events = self.events
        while not events:
            reader = self.reader
            if reader.failed is not None:
                raise reader.failed
            if self.eof:
                return None
            if self.prefix:
                data = self._take_prefix()
            else:
                data = await self.stream.read(self.limits.read_bytes)
            if data:
                events.extend(reader.feed(data))
            else:
                self.eof = True
                events.extend(reader.feed_eof())
        return events.popleft()

    def _take_prefix(self) -> bytes:
        """The sniffed bytes, at most one read's worth at a time (as PrefixedStream.read replayed them)."""
        n = self.limits.read_bytes
        data, self.prefix = self.prefix[:n], self.prefix[n:]
        return data

    # -- idle and head timeouts --
    # asyncio.timeout() around each wait for a request costs a Timeout, a task lookup and a loop timer
    # set and cancelled per request — ~4 µs under uvloop, where a timer is a libuv handle (measured:
    # asyncio.timeout(3600) around an empty await 4.1 µs, call_at + cancel alone 2.9 µs). Instead each
    # wait only notes its deadline; one timer per connection fires at the earliest deadline it knew
    # of and then either ends the wait (deadline passed: the task is cancelled and next_head turns that
    # into "idle" / 408, as asyncio.timeout would) or re-arms itself for the current deadline. With a
    # 1 h idle timeout that is one timer per connection per hour instead of one per request.
    # Measured in-process (HttpPipeline.serve over faked streams, 10 000 keep-alive requests, the
    # waypoint's whole HTTP path without HBONE): 52.1 → 45.5 µs per request.
    def _arm(self, at: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= at:
                return   # fires earlier and will re-arm for `at` then
            timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _deadline(self) -> float:
        """The idle deadline until a head's first bytes come, then the head's own (which replaces it,
        later or not: a head that started has head_timeout_s, as the asyncio.timeout version had)."""
        started = self._started_at
        if started is None:
            return self._wait_deadline
        return started + self.limits.head_timeout_s

    def _on_timer(self) -> None:
        self._timer = None
        if not self._waiting:
            # Between waits: the next one ends at least a whole idle timeout from now.
            self._arm(self._loop.time() + self.limits.idle_timeout_s)
            return
        deadline = self._deadline()
        if self._loop.time() >= deadline:
            self._expired = True
            if self._task is not None:
                self._task.cancel()
        else:
            self._arm(deadline)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def next_head(self) -> RequestHead | None:
        events = self.events
        while events and events[0] is MessageEnd:
            events.popleft()   # the end of a bodiless request, parsed with its head
        if events:
            event = events.popleft()
        else:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
                self._task = asyncio.current_task()
            limits = self.limits
            self._wait_deadline = loop.time() + limits.idle_timeout_s
            self._started_at = None
            self._expired = False
            self._waiting = True
            self._arm(self._wait_deadline)
            try:
                while not events or events[0] is MessageEnd:
                    if events:
                        events.popleft()
                        continue
                    if self.reader.failed is not None:
                        raise self.reader.failed
                    if self.eof:
                        return None
                    if self.prefix:
                        data = self._take_prefix()
                    else:
                        data = await self.stream.read(limits.read_bytes)
                    if not data:
                        self.eof = True
                        events.extend(self.reader.feed_eof())
                        continue
                    events.extend(self.reader.feed(data))
                    if self._started_at is None and not self.reader.idle:
                        # The first bytes of a head: from now it has head_timeout_s to complete.
                        self._started_at = loop.time()
                        self._arm(self._deadline())
            except asyncio.CancelledError:
                task = self._task
                # Ours only if our timer cancelled and nobody else did too (asyncio.timeout's rule).
                if not self._expired or task is None or task.uncancel() > 0:
                    raise
                if self._started_at is not None:
                    raise Http1Error(408, "request head not received in time") from None
                return None  # idle keep-alive connection: close quietly, as Envoy does
            finally:
                self._waiting = False
            event = events.popleft()
        if not isinstance(event, RequestHead):
            raise Http1Error(400, "unexpected data between requests")
        return event

    async def discard_body(self, request: Http1Request) -> bool:
        """Read and drop the rest of an unread request body; False when it is too long or slow."""
        budget = self.limits.discard_body_bytes
        try:
            async with asyncio.timeout(self.limits.discard_timeout_s):
                while True:
                    event = await self.next_event()
                    if event is MessageEnd:
                        request.body_done = True
                        return True
                    if event is None:
                        return False
                    budget -= len(event.data)
                    if budget < 0:
                        return False
        except (TimeoutError, Http1Error, OSError):
            return False

    async def shutdown(self) -> None:
        self.stop_timer()
        stream = self.stream
        if self.aborted:
            return
        if self.upgraded:
            # The upgraded connection's relay already carried both directions' ends (half-close):
            # no FIN of ours to add and nothing HTTP to linger for.
            stream.close()
            return
        try:
            stream.write_eof()
            await stream.drain()
            if not self.eof:
                dropped = 0
                async with asyncio.timeout(self.limits.linger_s):
                    while dropped < self.limits.linger_bytes:
                        data = await stream.read(self.limits.read_bytes)
                        if not data:
                            break
                        dropped += len(data)
        except (TimeoutError, OSError):
            pass
        finally:
            stream.close()

    def __repr__(self) -> str:
        return (f"<Http1Conn requests={self.requests} pending_events={len(self.events)} "
                f"keep_alive={self.keep_alive} eof={self.eof}>")


async def _error_reply(conn: _Conn, request: Http1Request | None, status: int) -> None:
    """A local reply for a protocol error, then close (the framing can no longer be trusted)."""
    conn.keep_alive = False
    if request is None:
        dummy = RequestHead(b"GET", b"/", b"1.1", [], False, False, False, None, False, b"")
        request = Http1Request(dummy, conn)
    try:
        await Responder(conn, request).send_local_reply(status, reason_phrase(status))
    except OSError:
        conn.aborted = True


async def serve_http1(stream: ByteStream, handler: Handler, *, limits: Http1Limits = DEFAULT_LIMITS,
                      on_error: Callable[[BaseException], None] | None = None, prefix: bytes = b"",
                      on_bad_request: Callable[[Http1Error, bool], None] | None = None) -> None:
    """Serve HTTP/1.x requests on ``stream`` until the client closes, asks to close, an error, or
    the idle timeout; always closes ``stream`` before returning. ``on_error`` sees every protocol
    error and handler exception (for logs and metrics); it must not raise. ``on_bad_request`` sees a
    request that could not be read (the error, and whether its answer was written) once it was answered:
    no handler saw it, so its caller logs and counts it (it must not raise). ``prefix``: bytes of the
    stream already read (protocol sniffing), parsed first — what a ``PrefixedStream`` would replay,
    without its wrapper on every read and drain (``PrefixedStream.unwrap``)."""
    conn = _Conn(stream, limits, prefix)
    try:
        while conn.keep_alive:
            conn.response_started = False
            try:
                head = await conn.next_head()
            except Http1Error as err:
                if on_error:
                    on_error(err)
                await _error_reply(conn, None, err.status)
                if on_bad_request is not None:
                    on_bad_request(err, conn.response_started and not conn.aborted)
                return
            except OSError:  # StreamReset and other socket errors: nobody to answer
                conn.aborted = True
                return
            if head is None:
                return
            conn.requests += 1
            conn.keep_alive = head.keep_alive
            request = Http1Request(head, conn)
            responder = Responder(conn, request)
            try:
                await handler(request, responder)
                if not responder.ended:
                    raise RuntimeError("handler returned without ending the response")
            except Exception as exc:  # noqa: BLE001 — one place turns a failure into an answer
                if on_error:
                    on_error(exc)
                if responder.head_sent or conn.aborted:
                    conn.abort()
                    return
                status = exc.status if isinstance(exc, Http1Error) else 500
                await _error_reply(conn, request, status)
                return
            if head.upgrade is not None and not conn.upgraded:
                # The upgrade was answered with an ordinary response: the bytes held after its head
                # are HTTP/1.1 after all (RFC 9110 §7.8), parse them as the next request(s).
                try:
                    conn.events.extend(conn.reader.resume_http())
                except Http1Error:
                    pass   # raised again by next_head, which answers it
            if conn.keep_alive and not request.body_done:
                if not await conn.discard_body(request):
                    conn.keep_alive = False
    finally:
        await conn.shutdown()


__all__ = ["serve_http1", "Http1Request", "Responder", "Http1Limits", "DEFAULT_LIMITS", "Handler"]
