"""HTTP/1.1 to an upstream over a ``ByteStream``: send one request, stream its response back.

``forward_request`` writes the head (framing chosen here: ``content-length`` when known, else
chunked), streams the body concurrently with reading the response (an upstream may answer early),
and returns an ``Http1Response`` once the final response head arrived (1xx are skipped).

Failures say whether a retry is safe: ``UpstreamReset.before_response`` is True when the upstream
closed or reset before any response byte — Envoy's ``retry_on: reset`` case, and the usual fate of a
pooled keep-alive connection the upstream closed while idle. After the head, it is False: the
response is broken and the downstream must be reset, not answered again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import AsyncIterable, AsyncIterator, Callable, Hashable, Iterable

from hbone.stream import KiB, ByteStream, PrefixedStream

from .codec import (CHUNK_END, HOP_BY_HOP, LAST_CHUNK, Http1Error, MessageEnd, ResponseHead,
                    ResponseReader, chunk_header, encode_request_head)

# One socket read from the upstream; also the largest BodyChunk handed to the caller.
READ_BYTES = 64 * KiB
# Request framing and connection management are ours; Expect is answered by our own server side
# (Envoy does not proxy 100-continue by default), so the upstream never sees it.
_REQUEST_DROP = HOP_BY_HOP | {b"content-length", b"expect", b"host"}
_JOIN_BELOW = 16 * KiB

BodySource = bytes | AsyncIterable[bytes] | None


class UpstreamReset(ConnectionError):
    """The upstream connection ended abnormally. ``before_response``: no response byte was
    received, so the request can be retried elsewhere (if its body can be replayed:
    ``body_bytes_sent`` tells how much of it left)."""

    def __init__(self, message: str, *, before_response: bool, body_bytes_sent: int = 0):
        super().__init__(message)
        self.before_response = before_response
        self.body_bytes_sent = body_bytes_sent


class Http1Response:
    """An upstream response: head fields now, body as it streams in."""

    # The head's fields in slots, set once, rather than a property per access (see Http1Request).
    __slots__ = ("head", "_stream", "_reader", "_events", "_sender", "_sent", "done", "_failed", "status",
                 "reason", "headers", "content_length")

    def __init__(self, head: ResponseHead, stream: ByteStream, reader: ResponseReader,
                 events: deque, sender: asyncio.Task | None, sent: list):
        self.head = head
        self.status, self.reason, _, self.headers, _, _, _, self.content_length = head
        self._stream = stream
        self._reader = reader
        self._events = events
        self._sender = sender
        self._sent = sent
        self.done = False
        self._failed = False

    @property
    def reusable(self) -> bool:
        """The upstream connection can carry another request: the response was read to its end,
        both sides keep the connection alive, the request body went out whole, nothing extra
        arrived."""
        sender = self._sender
        return (self.done and not self._failed and self.head.keep_alive and not self._events
                and (sender is None or (sender.done() and not sender.cancelled()
                                        and sender.exception() is None and self._sent[1])))

    async def body_chunks(self) -> AsyncIterator[bytes]:
        """The response body, as it arrives. Raises ``UpstreamReset(before_response=False)`` when
        the upstream ends it early and ``Http1Error(502)`` when it is malformed."""
        if self.done:
            return
        while True:
            event = await _next_event(self._stream, self._reader, self._events, self._sender,
                                      self._sent, before_response=False)
            if event is MessageEnd:
                self.done = True
                await self._finish_sender()
                return
            yield event.data

    def upgraded_stream(self) -> ByteStream:
        """After a ``101 Switching Protocols`` (``forward_request(..., upgrade=...)``): the raw upstream
        stream, bytes the upstream sent after the 101 first. The connection is the caller's to close,
        never pooled again (``reusable`` stays False)."""
        if self.status != 101:
            raise RuntimeError("upgraded_stream() without a 101 response")
        self._failed = True
        events = self._events
        while events and events[0] is MessageEnd:
            events.popleft()
        tail = self._reader.take_upgrade_tail()
        return PrefixedStream(self._stream, tail) if tail else self._stream

    def complete_body(self) -> bytes | None:
        """The whole body when the response already arrived in full with its head (the usual small
        response: one read held head, body and end) and no request body is still being sent; it is
        then done, as if ``body_chunks`` had been read to the end. None otherwise: stream it.

        Lets the caller answer with one write instead of an async generator, a write and a drain per
        chunk (see HttpPipeline._execute for the measured gain)."""
        if self.done:
            return b""
        if self._sender is not None:
            return None   # the request body is still going out: body_chunks ends it properly
        events = self._events
        if len(events) == 2 and events[1] is MessageEnd and events[0] is not MessageEnd:
            # (the usual case — one body piece and the end — without the count, list and join below)
            data = events[0].data
            events.clear()
            self.done = True
            return data
        if not events or events[-1] is not MessageEnd or events.count(MessageEnd) != 1:
            return None   # still streaming, or more than this message buffered (a misbehaving upstream)
        parts = [events.popleft().data for _ in range(len(events) - 1)]
        events.popleft()
        self.done = True
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _finish_sender(self) -> None:
        sender = self._sender
        if sender is None or sender.done():
            if sender is not None and not sender.cancelled():
                exc = sender.exception()
                if exc is not None:
                    self._failed = True
                    raise exc
            return
        # The upstream answered before taking the whole body (e.g. an early 413): the request
        # can never end cleanly on this connection, so stop sending and do not reuse it.
        self._failed = True
        sender.cancel()
        try:
            await sender
        except BaseException:  # noqa: BLE001 — its failure is already accounted for
            pass

    def abort(self) -> None:
        """Give up on this response (e.g. the downstream went away): reset the upstream."""
        self._failed = True
        if self._sender is not None:
            self._sender.cancel()
        self._stream.abort()

    def __repr__(self) -> str:
        state = "done" if self.done else "streaming"
        return f"<Http1Response {self.head.status} {state} reusable={self.reusable}>"


def _parse_read(reader: ResponseReader, events: deque, data: bytes | None) -> bool:
    """One read's bytes (``b""``: EOF, None: a reset) into the parser: True when the caller may go on
    (bytes parsed, or the EOF ended a message that ends at EOF), False when the read ended the
    connection with a message still open (broken: the caller raises). Http1Error(502) on a malformed
    response."""
    if data:
        events.extend(reader.feed(data))
        return True
    if data is not None:
        try:
            tail = reader.feed_eof()
        except Http1Error:
            tail = None
        if tail:
            events.extend(tail)
            return True
    return False


async def _next_event(stream: ByteStream, reader: ResponseReader, events: deque,
                      sender: asyncio.Task | None, sent: list, *, before_response: bool):
    while not events:
        reset = None
        try:
            data = await stream.read(READ_BYTES)
        except OSError as err:
            data = None
            reset = err
        if _parse_read(reader, events, data):
            continue
        if sender is not None and sender.done() and not sender.cancelled() and sender.exception():
            raise sender.exception()  # the request body source failed: its error is the cause
        what = "reset" if reset is not None else "closed the connection"
        when = "before the response" if before_response else "mid-response"
        raise UpstreamReset(f"upstream {what} {when}", before_response=before_response,
                            body_bytes_sent=sent[0]) from reset
    return events.popleft()


async def _send_body(upstream: ByteStream, body: AsyncIterable[bytes], chunked: bool,
                     sent: list) -> None:
    try:
        async for data in body:
            n = len(data)
            if not n:
                continue
            if chunked:
                if n < _JOIN_BELOW:
                    upstream.write(b"%x\r\n%b\r\n" % (n, data))
                else:
                    upstream.write(chunk_header(n))
                    upstream.write(data)
                    upstream.write(CHUNK_END)
            else:
                upstream.write(data)
            sent[0] += n
            await upstream.drain()
        if chunked:
            upstream.write(LAST_CHUNK)
        await upstream.drain()
        sent[1] = True
    except OSError:
        return  # the upstream went away: reading the response reports it
    except BaseException:
        # The body source failed (client reset, malformed chunk) or we were cancelled: the request
        # cannot be completed, so the upstream must see a reset, not a short request.
        upstream.abort()
        raise


def request_headers(headers: Iterable[tuple[bytes, bytes]], authority: bytes) -> list:
    """End-to-end request headers for the upstream: hop-by-hop fields removed (RFC 9110 §7.6.1,
    including those named in Connection), Host first."""
    if not isinstance(headers, (list, tuple)):
        headers = list(headers)   # walked twice below
    drop = _REQUEST_DROP
    for name, value in headers:
        if name == b"connection":
            drop = drop | {t.strip().lower() for t in value.split(b",")}
    out = [(b"host", authority)]
    # The kept (name, value) pairs themselves, not rebuilt: a generator re-making each tuple was ~1 %
    # of the waypoint's CPU in a sampling profile (timeit, 4 headers: 0.59 → 0.44 µs).
    out += [h for h in headers if h[0] not in drop]
    return out


def encode_forward_head(method: bytes, target: bytes, authority: bytes, headers: list) -> bytes:
    """``encode_request_head(method, target, request_headers(headers, authority))`` — the same bytes, the
    same ValueError for a CR or LF inside a field — in one pass over the headers when none is a
    Connection header (which names more fields to drop: then the two-step way).

    PERF NOTE: timeit (/tmp/wp/micro_heads.py, best of 7), the waypoint's upstream request (4 headers):
    1.14 -> 0.65 us."""
    parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
    count = 1
    drop = _REQUEST_DROP
    for name, value in headers:
        if name not in drop:
            parts += (name, b": ", value, b"\r\n")
            count += 1
        elif name == b"connection":
            return encode_request_head(method, target, request_headers(headers, authority))
    parts.append(b"\r\n")
    blob = b"".join(parts)
    # As codec._encode_fields: one CRLF per line, else a name or value carried a CR or LF.
    if blob.count(b"\n") != count + 2 or blob.count(b"\r") != count + 2:
        raise ValueError("CR or LF inside a header name or value")
    return blob


async def forward_request(upstream: ByteStream, method: bytes, target: bytes, authority: bytes,
                          headers: Iterable[tuple[bytes, bytes]], body: BodySource = None, *,
                          content_length: int | None = None,
                          reader: ResponseReader | None = None,
                          upgrade: bytes | None = None) -> Http1Response:
    """Send one request on ``upstream`` and return the response once its final head arrived.

    ``headers`` are lower-case end-to-end headers (hop-by-hop, framing, Host and Expect are
    dropped here); ``authority`` becomes Host. ``body``: None, bytes, or an async iterable (e.g.
    ``request.body_chunks()``), framed with ``content_length`` when given, else chunked.
    ``reader`` lets a pooled connection keep its parser (must be idle). ``upgrade``: the request asks
    for that protocol upgrade — ``Connection: upgrade`` and ``Upgrade`` are sent (hop-by-hop fields
    otherwise dropped; Envoy keeps them for an upgrade it proxies) and a ``101`` is returned as the
    response (then ``Http1Response.upgraded_stream()``)."""
    if reader is None:
        reader = ResponseReader()
    fields = request_headers(headers, authority)
    if upgrade is None:
        reader.expect(method)
    else:
        reader.expect(method, upgrade=True)
        fields += ((b"connection", b"upgrade"), (b"upgrade", upgrade))
    sent = [0, body is None]   # [body bytes written, body complete]
    sender = None
    if isinstance(body, (bytes, bytearray, memoryview)):
        if content_length is not None and content_length != len(body):
            raise ValueError("content_length does not match the body")
        content_length = len(body)
    if content_length is not None and (body is not None or content_length or
                                       method in (b"POST", b"PUT", b"PATCH")):
        fields.append((b"content-length", b"%d" % content_length))
        chunked = False
    else:
        chunked = body is not None
        if chunked:
            fields.append((b"transfer-encoding", b"chunked"))
    head = encode_request_head(method, target, fields)
    try:
        if body is None:
            upstream.write(head)
            await upstream.drain()
        elif isinstance(body, (bytes, bytearray, memoryview)):
            if len(body) < _JOIN_BELOW:
                upstream.write(head + body)
            else:
                upstream.write(head)
                upstream.write(body)
            await upstream.drain()
            sent[0] = len(body)
            sent[1] = True
        else:
            upstream.write(head)
            sender = asyncio.get_running_loop().create_task(
                _send_body(upstream, body, chunked, sent))
    except OSError as err:
        raise UpstreamReset(f"upstream write failed: {err}", before_response=True) from err
    events: deque = deque()
    try:
        while True:
            event = await _next_event(upstream, reader, events, sender, sent, before_response=True)
            if isinstance(event, ResponseHead) and (event.status >= 200 or event.status == 101 and upgrade):
                return Http1Response(event, upstream, reader, events, sender, sent)
            # 1xx interim responses (RFC 9110 §15.2): skipped, with their MessageEnd.
    except BaseException:
        if sender is not None and not sender.done():
            sender.cancel()
        raise


async def forward_bodiless(upstream: ByteStream, reader: ResponseReader, method: bytes, target: bytes,
                           authority: bytes, headers: Iterable[tuple[bytes, bytes]]) -> Http1Response:
    """``forward_request(upstream, method, target, authority, headers, reader=reader)``: a request without a
    body and without an upgrade — the same bytes sent, the same response or exception — with the generic
    body, framing and sender handling left out and the response read inline (one coroutine, not two per
    read). The waypoint's common request (``HttpPipeline._execute_lean``), where that bookkeeping was
    ~1 µs of ~40 (see its PERF NOTE)."""
    reader.expect(method)
    head = encode_forward_head(method, target, authority, headers)
    try:
        upstream.write(head)
        await upstream.drain()
    except OSError as err:
        raise UpstreamReset(f"upstream write failed: {err}", before_response=True) from err
    events: deque = deque()
    while True:
        while not events:   # (_next_event with no body sender, before the response, inline)
            reset = None
            try:
                data = await upstream.read(READ_BYTES)
            except OSError as err:
                data = None
                reset = err
            if _parse_read(reader, events, data):
                continue
            what = "reset" if reset is not None else "closed the connection"
            raise UpstreamReset(f"upstream {what} before the response", before_response=True,
                                body_bytes_sent=0) from reset
        event = events.popleft()
        if isinstance(event, ResponseHead) and event.status >= 200:
            return Http1Response(event, upstream, reader, events, None, [0, True])
        # 1xx interim responses (RFC 9110 §15.2): skipped, with their MessageEnd.


class Http1Pool:
    """Idle upstream HTTP/1.1 connections per key (e.g. endpoint ip:port), bounded and aging out.

    Decide, then act: ``take(key)`` returns an idle connection (and its parser) or None — the
    caller dials then; ``put(key, stream, reader)`` returns a finished, reusable one. A pooled
    connection the upstream closed meanwhile fails with ``UpstreamReset(before_response=True)``,
    which the caller retries on a fresh connection (Envoy does the same)."""

    # Envoy's cluster default has no idle-connection cap: what a burst opened stays for the next
    # one. The cap only bounds file descriptors after an unusual burst. It was 16: a waypoint
    # serving 64 keep-alive downstream connections closed every connection beyond 16 idle and
    # re-dialled it moments later (an HBONE CONNECT + a node-side TCP dial each time) — 1 011
    # upstream tunnels for 2 304 requests in tests/test_perf_waypoint_pool.py, ~1 936 for 5 291
    # in the benchmark. Idle connections are cheap (an HBONE stream, ~2 KiB) and age out below.
    # Measured (python -m benchmarks --only http, load c=64): 3 746 → 6 467 req/s, proxy CPU
    # 459 → 230 µs per request over the three proxies (waypoint 273 → 170).
    MAX_IDLE_PER_KEY = 1024
    # Envoy's upstream idle_timeout default is 1 h; upstream servers often close after 5–60 s of
    # idleness (nginx keepalive_timeout 75 s), so older connections are likely dead anyway.
    IDLE_TIMEOUT_S = 60.0

    def __init__(self, *, max_idle_per_key: int = MAX_IDLE_PER_KEY,
                 idle_timeout_s: float = IDLE_TIMEOUT_S,
                 now: Callable[[], float] = time.monotonic):
        self._idle: dict[Hashable, deque] = {}
        self._max = max_idle_per_key
        self._ttl = idle_timeout_s
        self._now = now

    def take(self, key: Hashable, max_idle_s: float | None = None) -> tuple[ByteStream, ResponseReader] | None:
        """An idle connection for ``key``, most recently used first (likeliest alive), or None; one idle
        longer than the pool's TTL — or ``max_idle_s``, a DestinationRule's ``idleTimeout`` (Envoy's upstream
        ``idle_timeout``: "the connection will be closed" once idle that long) — is closed, never reused
        (lazily: when looked at here, or by ``put``'s aging)."""
        conns = self._idle.get(key)
        now = self._now()
        ttl = self._ttl if max_idle_s is None or max_idle_s > self._ttl else max_idle_s
        while conns:
            stream, reader, since = conns.pop()
            if now - since > ttl:
                stream.close()
            elif getattr(stream, "buffered", 0):
                # Bytes that came while the connection sat idle answer no request: read as the next request's
                # answer they would reach the wrong client (found by tests/test_chaos_lean.py). Envoy's HTTP/1
                # client codec refuses them (a premature response: a codec error, the connection closed); so is
                # this connection, and the request goes on another one.
                take = getattr(stream, "take_buffered", None)
                if take is not None:
                    stream.ack(sum(map(len, take())))   # (their flow-control window goes back to the connection)
                stream.abort()
            elif getattr(stream, "at_eof", False) or getattr(stream, "error", None) is not None:
                stream.close()   # the upstream closed or reset it while idle: a fresh one, without a failed try
            else:
                if not conns:
                    del self._idle[key]
                return stream, reader
        self._idle.pop(key, None)
        return None

    def put(self, key: Hashable, stream: ByteStream, reader: ResponseReader) -> None:
        conns = self._idle.get(key)
        if conns is None:
            conns = self._idle[key] = deque()
        now = self._now()
        conns.append((stream, reader, now))
        while len(conns) > self._max:
            conns.popleft()[0].close()
        # take() pops the newest, so the oldest (left) would never be looked at while the key is
        # busy: close one that outlived the idle timeout on each put (amortised O(1)).
        if conns and now - conns[0][2] > self._ttl:
            conns.popleft()[0].close()

    def close(self) -> None:
        for conns in self._idle.values():
            for stream, _, _ in conns:
                stream.close()
        self._idle.clear()

    def __repr__(self) -> str:
        return f"<Http1Pool keys={len(self._idle)} idle={sum(len(c) for c in self._idle.values())}>"


__all__ = ["forward_request", "forward_bodiless", "encode_forward_head", "Http1Response", "UpstreamReset", "Http1Pool",
           "request_headers",
           "READ_BYTES"]
