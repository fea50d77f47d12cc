"""Sans-IO HTTP/1.1 codec: bytes in, plain events out; serializers for heads and chunked bodies.

Parsing is llhttp through httptools (≈7× cheaper per request than h11; see
``reference/performance.md``): callbacks append plain tuples to a list, no per-request objects.

Events (``NamedTuple``s, cheap to build):
    ``RequestHead`` / ``ResponseHead``, ``BodyChunk(data)``, ``MessageEnd`` (a singleton).
Errors: ``Http1Error(status, reason)`` only — ``status`` is the answer the proxy gives
(400/413/431/501 for a bad request; 502 for a bad upstream response).

Rules (each is a decision a user of Envoy would recognise):
- Header names are lower-cased (Envoy normalises HTTP/1 header keys to lower case); order is kept.
- Request smuggling: ``Transfer-Encoding`` with ``Content-Length``, duplicate differing
  ``Content-Length``, a bare LF line end or an obs-fold line are 400 (RFC 9112 §6.1: such a message
  "ought to be handled as an error"; llhttp in strict mode refuses them all).
- A transfer coding other than ``chunked`` → 501 (RFC 9112 §6.1: "A server that receives a request
  message with a transfer coding it does not understand SHOULD respond with 501").
- An HTTP/1.1 request without ``Host``, or with two, → 400 (RFC 9112 §3.2).
- An unknown method → 501 (RFC 9110 §9.1).
- Upgrade: ``Upgrade: h2c`` (RFC 7540 §3.2 upgrade) is ignored and the request served as HTTP/1.1,
  as Envoy does. Any other upgrade request (``Connection: upgrade`` + ``Upgrade: X``, no body) is
  passed on as a ``RequestHead`` with ``upgrade=X``: whether X is allowed (Istio's HCM has
  ``upgrade_configs: [{upgrade_type: websocket}]``; others get Envoy's 403) is the pipeline's call.
  The reader then holds the bytes after that head unparsed until the caller either takes them
  (``take_upgrade_tail``: a 101 was sent, they belong to the new protocol) or resumes HTTP/1.1
  (``resume_http``: the upstream refused, RFC 9110 §7.8 "the connection continues in HTTP/1.1").
  HTTP/1 ``CONNECT`` is passed on with ``upgrade=b"CONNECT"`` and ``keep_alive`` false: the pipeline
  answers it 404 NR, as Envoy does without ``upgrade_type: CONNECT`` (which Istio does not configure).
  A response reader told ``expect(method, upgrade=True)`` accepts a 101 the same way.
- Trailers of chunked messages are parsed, counted against the head limit and dropped (Envoy drops
  HTTP/1 trailers unless ``enable_trailers`` is set).
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Iterable, NamedTuple

import httptools

from hbone.stream import KiB

# Envoy's max_request_headers_kb default (60 KiB) — request line and all headers together. Past it:
# 431 (RFC 6585 §5). Envoy applies the same limit to upstream response heads (→ 502 here).
MAX_HEAD_BYTES = 60 * KiB
# Envoy's max_headers_count default: 100 headers per message; one more → 431.
MAX_HEADERS = 100
# Request bodies are streamed, so no limit by default (Envoy's HCM has none either; a buffer filter
# adds one). A number makes longer bodies a 413.
MAX_BODY_BYTES: int | None = None
# Chunk sizes: llhttp parses a chunk-size as a 64-bit hex number and refuses an overflow (400);
# a huge chunk is never buffered, it arrives as BodyChunk pieces of at most one read each.

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# RFC 9110 §7.6.1: hop-by-hop fields a proxy must not forward (plus Proxy-Connection, which Envoy
# also removes, and the ones listed in Connection, removed by strip_hop_by_hop).
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"))
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_METHOD_LIKE = re.compile(rb"[A-Z][A-Z_-]{0,31}(?: |$)")


class Http1Error(Exception):
    """A malformed or unacceptable message; ``status`` is the answer (or 502 for an upstream)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class RequestHead(NamedTuple):
    method: bytes
    target: bytes
    version: bytes            # b"1.1" or b"1.0"
    headers: list             # list[tuple[bytes, bytes]], names lower-case, in order
    keep_alive: bool          # llhttp's should_keep_alive: version default + Connection header
    has_body: bool
    chunked: bool
    content_length: int | None
    expect_continue: bool     # Expect: 100-continue
    host: bytes               # the Host header (b"" only for an HTTP/1.0 request without one)
    upgrade: bytes | None = None   # the Upgrade value of an upgrade request (not h2c), else None


class ResponseHead(NamedTuple):
    status: int
    reason: bytes
    version: bytes
    headers: list
    keep_alive: bool
    has_body: bool
    chunked: bool
    content_length: int | None


class BodyChunk(NamedTuple):
    data: bytes


class _MessageEnd:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MessageEnd"


MessageEnd = _MessageEnd()

# The events built per message with tuple.__new__ and every field in order, not through the NamedTuples'
# generated __new__ (a Python function): ~0.07 us less each (timeit), three or four per request.
_tuple_new = tuple.__new__


def _framing(headers: list, err_status: int) -> tuple[bool, int | None]:
    """(chunked, content_length) from the headers; llhttp already refused conflicts and bad numbers."""
    chunked = False
    length = None
    for name, value in headers:
        if name == b"transfer-encoding":
            codings = [c.strip().lower() for c in value.split(b",")]
            if codings != [b"chunked"]:
                raise Http1Error(err_status, f"unsupported transfer-coding {value!r}")
            if chunked:
                raise Http1Error(400 if err_status == 501 else err_status,
                                 "chunked applied more than once")
            chunked = True
        elif name == b"content-length":
            length = int(value)
    return chunked, length


class _Reader:
    """Shared callback machinery of the request and response readers."""

    __slots__ = ("_parser", "_events", "_headers", "_head_bytes", "_raw_head", "_awaiting_head",
                 "_in_message", "_body_bytes", "_error", "_cb_error", "_lead", "max_head_bytes",
                 "max_headers", "max_body_bytes", "_upgrading", "_held", "__weakref__")

    _err_status = 400
    _too_large = 431

    def __init__(self, *, max_head_bytes: int = MAX_HEAD_BYTES, max_headers: int = MAX_HEADERS,
                 max_body_bytes: int | None = MAX_BODY_BYTES):
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self._events: list = []
        self._headers: list = []
        self._head_bytes = 0
        self._raw_head = 0
        self._awaiting_head = True
        self._in_message = False
        self._body_bytes = 0
        self._error: Http1Error | None = None
        self._cb_error: Http1Error | None = None
        self._lead = b""   # the first bytes of the current message, to judge a bad method
        # After an upgrade head (request: not h2c; response: 101 to an upgrade request) the bytes
        # that follow are not HTTP until the caller says so: held here, unparsed (see take_upgrade_tail).
        self._upgrading = False
        self._held = b""

    @property
    def failed(self) -> Http1Error | None:
        """The error this reader stopped on (raised again by every later ``feed``)."""
        return self._error

    @property
    def idle(self) -> bool:
        """True between messages (nothing of a next message received yet)."""
        return not self._in_message

    def _fail(self, status: int, reason: str) -> None:
        err = Http1Error(status, reason)
        self._cb_error = err
        raise err

    # llhttp callbacks -------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_message = True
        self._headers = []
        self._head_bytes = 0
        self._body_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_bytes = self._head_bytes + len(name) + len(value) + 4
        if size > self.max_head_bytes:
            self._fail(self._too_large, "headers too large")
        if not self._awaiting_head:
            return  # a trailer: counted, then dropped
        headers = self._headers
        if len(headers) >= self.max_headers:
            self._fail(self._too_large, "too many headers")
        headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        if self.max_body_bytes is not None:
            self._body_bytes += len(body)
            if self._body_bytes > self.max_body_bytes:
                self._fail(413, "body too large")
        self._events.append(_tuple_new(BodyChunk, (body,)))

    def on_message_complete(self) -> None:
        self._in_message = False
        self._awaiting_head = True
        self._raw_head = 0
        self._events.append(MessageEnd)

    # driving ----------------------------------------------------------------------------------
    def _execute(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def feed(self, data: bytes) -> list:
        """Parse ``data``; return the events it completes, in order.

        On bad input the events before the error are returned and the error is raised by the
        next ``feed``/``feed_eof`` (check ``failed`` before waiting for more bytes)."""
        if self._error is not None:
            raise self._error
        # PERF NOTE: what an ordinary request pays for upgrades is this flag, one more RequestHead field
        # and a local in on_headers_complete: RequestReader.feed of a 5-header GET 2.28 -> 2.32 us
        # (timeit, 200 000 feeds, the codec before/after this change side by side, 3 alternating runs);
        # the whole server loop with the pipeline's checks (serve_http1 over an in-memory stream, 50 000
        # keep-alive GETs answered with send_response, best of 5, old/new trees alternating):
        # 5.12 / 4.97 -> 5.16 / 5.00 us per request.
        if self._upgrading:
            self._held += data
            return []
        events = self._events = []
        if not self._in_message:
            self._lead = data[:32]
        elif len(self._lead) < 32 and self._awaiting_head:
            self._lead = (self._lead + data)[:32]
        try:
            self._execute(data)
            if self._awaiting_head and self._in_message:
                # Bytes of a head still incomplete: bound them even where llhttp has no callback
                # for them yet (long whitespace, a header name split across reads).
                self._raw_head += len(data)
                if self._raw_head > self.max_head_bytes:
                    self._fail(self._too_large, "headers too large")
        except Http1Error as err:
            self._error = err
        except httptools.HttpParserInvalidMethodError:
            # A well-formed but unknown method is 501 (RFC 9110 §9.1); bytes that are not a
            # method at all (TLS to a plaintext port, binary) are a plain 400.
            lead = self._lead if isinstance(self, RequestReader) else b""
            status = 501 if _METHOD_LIKE.match(lead) else 400
            self._error = self._cb_error or Http1Error(status, "unknown method")
        except httptools.HttpParserError as err:
            # A callback's own Http1Error comes back wrapped (HPE_USER / HPE_CB_*): prefer it.
            self._error = self._cb_error or Http1Error(self._err_status,
                                                       str(err) or "invalid message")
        except Exception as err:  # noqa: BLE001 — httptools' own oddities must not escape
            self._error = self._cb_error or Http1Error(
                self._err_status, f"invalid message ({type(err).__name__})")
        if self._error is not None and not events:
            raise self._error
        return events

    @property
    def upgrading(self) -> bool:
        """An upgrade head was parsed; what follows is held until ``take_upgrade_tail``/``resume_http``."""
        return self._upgrading

    def take_upgrade_tail(self) -> bytes:
        """The protocol switched: the bytes received after the upgrade head (they belong to the new
        protocol). The reader parses nothing more afterwards."""
        tail, self._held = self._held, b""
        self._error = Http1Error(self._err_status, "connection upgraded")
        return tail

    def resume_http(self) -> list:
        """The upgrade was refused (a non-101 answer): parse the held bytes as HTTP/1.1 and return
        their events."""
        held, self._held = self._held, b""
        self._upgrading = False
        return self.feed(held) if held else []

    def feed_eof(self) -> list:
        """The peer finished sending; a message cut short is an error."""
        if self._error is not None:
            raise self._error
        if self._upgrading:
            return []   # the held bytes stay for the caller; the EOF is theirs to see on the raw stream
        if self._in_message:
            self._error = Http1Error(self._err_status, "connection closed mid-message")
            raise self._error
        return []


class RequestReader(_Reader):
    """Incremental HTTP/1.x request parser for one downstream connection (keep-alive, pipelining)."""

    __slots__ = ("_url",)

    def __init__(self, **limits):
        super().__init__(**limits)
        self._url = b""
        self._parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:   # (_Reader.on_message_begin inlined: one call less per request)
        self._in_message = True
        self._headers = []
        self._head_bytes = 0
        self._body_bytes = 0
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > self.max_head_bytes:
            self._fail(431, "request line too long")

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._awaiting_head = False
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._fail(400, "unsupported HTTP version")
        method = parser.get_method()
        headers = self._headers
        host = None
        expect = False
        upgrade = None
        framing = two_hosts = False
        for name, value in headers:   # one pass; _framing only when a framing header is there
            if name == b"host":
                two_hosts = host is not None
                host = value
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
            elif name == b"upgrade":
                upgrade = value
            elif name in _FRAMING:
                framing = True
        if framing:
            try:
                chunked, length = _framing(headers, 501)
            except Http1Error as err:
                self._cb_error = err
                raise
        else:
            chunked, length = False, None
        if two_hosts:   # (after the framing checks, whose answer comes first)
            self._fail(400, "more than one Host header")
        if host is None:
            if version == b"1.1":
                self._fail(400, "missing Host header")
            host = b""
        upgrade_to = None
        keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():
            if method == b"CONNECT":
                # Envoy proxies HTTP/1 CONNECT only with upgrade_configs: [{upgrade_type: CONNECT}], which
                # Istio's waypoint does not set; without it the request (it has no :path) matches no route
                # and is answered 404 NR after the filters ran (envoyproxy/envoy#11048 "http: pathless
                # CONNECT": "changing Envoy's default response to CONNECT requests from 403 ... to 404
                # (route not found)"). So it is passed on, marked as an upgrade to CONNECT, for the
                # pipeline to answer; the bytes after its head are the would-be tunnel's and are never
                # parsed as HTTP: the connection closes after the answer.
                if chunked or length:
                    self._fail(400, "CONNECT with a body")   # RFC 9110 §9.3.6: it has no content
                upgrade_to = b"CONNECT"
                self._upgrading = True
                keep_alive = False
            elif chunked or length:
                self._fail(501, "protocol upgrade with a request body is not supported")
            else:
                tokens = {t.strip().lower() for t in (upgrade or b"").split(b",")}
                if tokens != {b"h2c"}:
                    upgrade_to = upgrade or b""
                    self._upgrading = True
        if length is not None and self.max_body_bytes is not None and length > self.max_body_bytes:
            self._fail(413, "body too large")   # known up front: refuse before reading it
        has_body = chunked or bool(length)
        self._events.append(_tuple_new(RequestHead, (method, self._url, version, headers, keep_alive, has_body,
                                                     chunked, length, expect, host, upgrade_to)))

    def _execute(self, data: bytes) -> None:
        while True:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as up:
                # httptools has resumed the parser. An h2c upgrade: go on with the bytes after the
                # request as HTTP/1.1. Another upgrade: hold them (see take_upgrade_tail).
                offset = up.args[0] if up.args else len(data)
                data = data[offset:]
                if self._upgrading:
                    self._held += data
                    return
                if not data:
                    return


class ResponseReader(_Reader):
    """Incremental HTTP/1.x response parser for one upstream connection.

    Call ``expect(method)`` before each request's response: a response to HEAD has no body whatever
    its Content-Length says (RFC 9110 §9.3.2), which llhttp cannot be told through httptools, so the
    head is cut out here and the parser restarted after it."""

    __slots__ = ("_reason", "_head_request", "_pending", "_upgrade_expected")

    _err_status = 502
    _too_large = 502

    def __init__(self, **limits):
        super().__init__(**limits)
        self._reason = b""
        self._head_request = False
        self._pending = b""
        self._upgrade_expected = False
        self._parser = httptools.HttpResponseParser(self)

    def expect(self, method: bytes, upgrade: bool = False) -> None:
        """The next response answers ``method``; ``upgrade``: the request asked for a protocol
        upgrade, so a 101 Switching Protocols is its answer (else a 101 is a 502)."""
        self._head_request = method == b"HEAD"
        self._upgrade_expected = upgrade

    def on_message_begin(self) -> None:   # (_Reader.on_message_begin inlined: one call less per response)
        self._in_message = True
        self._headers = []
        self._head_bytes = 0
        self._body_bytes = 0
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._head_bytes += len(reason)

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._awaiting_head = False
        status = parser.get_status_code()
        if status == 101:
            if not self._upgrade_expected:
                self._fail(502, "unexpected 101 Switching Protocols")
            self._upgrading = True
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._fail(502, "unsupported HTTP version")
        headers = self._headers
        try:
            chunked, length = _framing(headers, 502)
        except Http1Error as err:
            self._cb_error = err
            raise
        no_body = status < 200 or status in (204, 304) or self._head_request
        has_body = not no_body and (chunked or length is None or length > 0)
        self._events.append(_tuple_new(ResponseHead, (status, self._reason, version, headers,
                                                      parser.should_keep_alive(), has_body, chunked, length)))

    def _execute(self, data: bytes) -> None:
        # (A _ClosedParser refuses the bytes even if the caller expects another HEAD answer.)
        if not self._head_request or self._parser.__class__ is _ClosedParser:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as up:
                # A 101 (only accepted after expect(upgrade=True)): the rest is the new protocol's.
                if not self._upgrading:
                    raise Http1Error(502, "unexpected protocol upgrade") from None
                self._held += data[up.args[0] if up.args else len(data):]
            return
        data = self._pending + data
        self._pending = b""
        while data:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > self.max_head_bytes:
                    self._fail(502, "headers too large")
                self._pending = data
                return
            head, data = data[:end + 4], data[end + 4:]
            self._parser.feed_data(head)
            if self._in_message:
                # A final response to HEAD: its body is empty, so end it here and restart llhttp,
                # which would otherwise wait for Content-Length bytes that never come.
                keep_alive = self._parser.should_keep_alive()
                self.on_message_complete()
                # Without keep-alive this response is the connection's last: what follows answers
                # no request. llhttp refuses such bytes after any other response ("Data after
                # `Connection: close`"); a fresh parser here would read them as a next response
                # when they come in a later read (found by fuzzing: a desync), so it refuses too.
                self._parser = httptools.HttpResponseParser(self) if keep_alive else _ClosedParser()
                self._head_request = False
                self._parser.feed_data(data)
                return

    def feed_eof(self) -> list:
        if self._error is not None:
            raise self._error
        if self._pending:
            # Part of a response head to HEAD, held unparsed (see _execute): cut short like any other
            # head, though llhttp never saw it begin (found by fuzzing: it ended silently).
            self._error = Http1Error(502, "connection closed mid-message")
            raise self._error
        if self._in_message and not self._awaiting_head and self._body_until_eof():
            self._events = []
            self.on_message_complete()
            events, self._events = self._events, []
            return events
        return super().feed_eof()

    def _body_until_eof(self) -> bool:
        for name, _ in self._headers:
            if name in _FRAMING:
                return False
        return True


class _ClosedParser:
    """Stands in for llhttp after a response to HEAD that closed the connection (see _execute)."""

    __slots__ = ()

    def feed_data(self, data: bytes) -> None:
        if data:
            raise Http1Error(502, "data after a response that closes the connection")


# ---- serializers ------------------------------------------------------------------------------

def _encode_fields(parts: list, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    count = 0
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
        count += 1
    parts.append(b"\r\n")
    blob = b"".join(parts)
    # One CRLF per line: a CR or LF inside a name or value would split the message (header
    # injection, RFC 9110 §5.5: "a recipient ... MUST either reject the message or replace each of
    # those characters with SP"). Counting is one C pass over the bytes.
    if blob.count(b"\n") != count + 2 or blob.count(b"\r") != count + 2:
        raise ValueError("CR or LF inside a header name or value")
    return blob


def encode_request_head(method: bytes, target: bytes,
                        headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """``METHOD target HTTP/1.1`` and the headers, as given (callers add framing headers)."""
    return _encode_fields([method, b" ", target, b" HTTP/1.1\r\n"], headers)


def encode_response_head(status: int, reason: bytes | None,
                         headers: Iterable[tuple[bytes, bytes]], version: bytes = b"1.1") -> bytes:
    """``HTTP/1.1 status reason`` and the headers; ``reason=None`` takes the standard phrase."""
    if reason is None:
        reason = _REASONS.get(status, b"Unknown")
    return _encode_fields([b"HTTP/", version, b" %d " % status, reason, b"\r\n"], headers)


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


# Chunked framing (RFC 9112 §7.1): "<hex size>\r\n<data>\r\n" ... "0\r\n\r\n".
CHUNK_END = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def chunk_header(size: int) -> bytes:
    return b"%x\r\n" % size


def encode_chunk(data: bytes) -> bytes:
    """One chunk as one buffer (for small data; large data: write header, data, CHUNK_END)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers without hop-by-hop fields (RFC 9110 §7.6.1) and without those named in Connection
    ("a proxy ... MUST remove any header fields listed in the Connection header field")."""
    headers = list(headers)
    drop = HOP_BY_HOP
    for name, value in headers:
        if name == b"connection":
            listed = {t.strip().lower() for t in value.split(b",")}
            listed.discard(b"")
            drop = drop | listed
    return [(n, v) for n, v in headers if n not in drop]


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case), or None."""
    for n, v in headers:
        if n == name:
            return v
    return None


__all__ = ["Http1Error", "RequestHead", "ResponseHead", "BodyChunk", "MessageEnd", "RequestReader",
           "ResponseReader", "encode_request_head", "encode_response_head", "reason_phrase",
           "chunk_header", "encode_chunk", "CHUNK_END", "LAST_CHUNK", "strip_hop_by_hop",
           "header_value", "HOP_BY_HOP", "MAX_HEAD_BYTES", "MAX_HEADERS", "MAX_BODY_BYTES"]
