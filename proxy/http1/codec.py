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
- An unknown method → 501 (RFC 9110 §9.1), judged on the message's own bytes: a token (RFC 9110 §5.6.2)
  followed by SP is a well-formed method llhttp does not know → 501; bytes that are not a token and SP
  (TLS or binary sent to a plaintext port, ``GET\t/``) → 400. A token cut by a read boundary waits
  for its end, so the answer does not depend on where the reads end.
- Head size, as Envoy's ``max_request_headers_kb`` counts it: the target plus every field name and
  value over ``max_head_bytes`` (or more than ``max_headers`` fields) → 431 (502 for a response),
  judged when the head ends. A head is also bounded on the wire (``raw_head_limit``: the count's
  limit plus room for framing and whitespace, which the count cannot see while a field is
  incomplete): past it, the same answer, as soon as that byte arrives.
- Split-independence: the same bytes fed in one read, byte by byte or cut anywhere give the same events
  and the same error, the first problem in the byte stream (``tests/test_http1_codec_splits.py``).
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
- Trailers of chunked messages are parsed and dropped (Envoy drops HTTP/1 trailers unless ``enable_trailers``
  is set, which Istio does not set). The trailer section is bounded on the wire on its own (the head's count
  is not shared), as Envoy's parser bounds it (quiche BalsaFrame, READING_TRAILER: "Reuse the header length
  limit for trailer", ``trailer_length_ > max_header_length_`` → TRAILER_TOO_LONG, which Envoy's codec
  answers 431 ``http1.headers_too_large``): ``max_head_bytes`` bytes from its first byte through the LF of
  its empty line. Past it: 431 (502 for a response), at that byte, however the bytes are split into reads
  (llhttp holds a trailer field until it ends, so before this bound a trailer that never ended grew without
  limit). ``max_headers`` does not apply to trailers: Envoy counts them only with ``enable_trailers``.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Iterable, NamedTuple

import httptools

from hbone.stream import KiB

# Envoy's max_request_headers_kb default (60 KiB). What counts is Envoy's count
# (ServerConnectionImpl::getHeadersSize: "url_size + current_header_field_.size() +
# current_header_value_.size() + headersOrTrailers().byteSize()"): the request target plus every
# field name and value (a value with its trailing whitespace, as llhttp hands it over), not the
# method, version, separators or CRLFs. Past it: 431 (RFC 6585 §5). Envoy applies the same limit to
# upstream response heads (→ 502 here; the reason phrase is not counted, as in Envoy's client codec).
MAX_HEAD_BYTES = 60 * KiB
# While a head is incomplete, llhttp holds a partial field (httptools hands it over only once whole)
# and drops whitespace without a callback, so the count above cannot see them: the bytes on the wire
# are bounded too. A head (from the first byte of its start line through its blank line) longer than
# raw_head_limit(max_head_bytes) is refused like an oversized one, whether it arrived whole or in
# pieces. The margin over max_head_bytes is the framing the count leaves out (method, version, ": ",
# CRLFs: ~450 bytes for 100 fields) plus room for ordinary whitespace: 1/16 of the limit (3.75 KiB at
# the default), at least RAW_HEAD_MIN_SLACK_BYTES. Only heads padded with whitespace reach it (a
# slowloris trickling spaces after "X:", which the head timeout alone would let run for a minute).
RAW_HEAD_MIN_SLACK_BYTES = 512


def raw_head_limit(max_head_bytes: int) -> int:
    """The most bytes a head may take on the wire, for a count limit of ``max_head_bytes``."""
    return max_head_bytes + max(max_head_bytes // 16, RAW_HEAD_MIN_SLACK_BYTES)


# RFC 9110 §9.1 methods are tokens; the longest llhttp knows is 13 bytes. A token longer than this is
# judged unknown (501) without waiting for what follows it, so a bad method buffers at most this much.
MAX_METHOD_BYTES = 32
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
_OWS = b" \t"   # RFC 9110 §5.6.3 optional whitespace: SP / HTAB
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
# RFC 9110 §5.6.2: token = 1*tchar; tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." /
# "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")


def _method_status(lead: bytes, final: bool) -> int | None:
    """The answer to a request llhttp refused at its method, from the message's first bytes ``lead``:
    501 for a token then SP (well-formed, unknown: RFC 9110 §9.1 "SHOULD respond with the 501"), 400
    for anything else; None while ``lead`` is a token not yet ended (more bytes decide; ``final``: none
    will come)."""
    end = _TOKEN.match(lead).end()
    if end > MAX_METHOD_BYTES:
        return 501
    if end < len(lead):
        return 501 if end and lead[end] == 0x20 else 400
    return 400 if final else None


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
_HEADS = (RequestHead, ResponseHead)

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

    __slots__ = ("_parser", "_events", "_headers", "_head_bytes", "_raw_head", "_head_lead", "_head_tail",
                 "_room", "_raw_limit", "_body_head", "_chunk_state", "_in_chunked", "_resume_at", "_judging",
                 "_divert", "_awaiting_head", "_in_message", "_body_bytes", "_error", "_cb_error", "max_head_bytes",
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
        # The raw bound (see raw_head_limit) and the state that keeps it exact across reads: of a head
        # still incomplete at the end of a read, its length so far (_raw_head), first bytes (to judge a
        # bad method) and last 3 (its CRLFCRLF may straddle reads); _room, the read length past which
        # feed() must look at where heads begin (-1 for one read after a response to HEAD). See _settle.
        # _room is max_head_bytes, not the raw bound: no shorter read can hold a head past its raw bound
        # nor a trailer section past its own bound (max_head_bytes too) that begins in it.
        self._raw_limit = raw_head_limit(max_head_bytes)
        self._room = max_head_bytes
        self._raw_head = 0
        self._head_lead = b""
        self._head_tail = b""
        self._body_head = None      # the head whose body the last read ended in (to walk past its end)
        self._chunk_state = _CHUNK_START   # where in its chunked framing that read ended (_walk_chunks)
        self._in_chunked = False    # the last read ended inside a chunked body (the next is walked first)
        self._resume_at = None      # (ResponseReader, HEAD) where llhttp took over in this read
        self._judging = None        # the first bytes of a message whose bad method is not judged yet
        # feed's one test for the unusual states: a head carried in, a method being judged, an upgrade.
        self._divert = False
        self._awaiting_head = True
        self._in_message = False
        self._body_bytes = 0
        self._error: Http1Error | None = None
        self._cb_error: Http1Error | None = None
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
        # Counted here, judged when the head ends: httptools hands a field over
        # when the next one begins, and only if that one's first bytes are good when they come in the
        # same read, so a limit judged here would answer 431 byte by byte where the whole read finds the
        # next field bad (400). Until the end, what is held is bounded raw (see raw_head_limit).
        self._head_bytes += len(name) + len(value)
        if self._awaiting_head:
            self._headers.append((name.lower(), value))
        # (else a trailer: counted, then dropped)

    def _check_head(self) -> None:
        if self._head_bytes > self.max_head_bytes:
            self._fail(self._too_large, "headers too large")
        if len(self._headers) > self.max_headers:
            self._fail(self._too_large, "too many headers")

    def on_body(self, body: bytes) -> None:
        if self.max_body_bytes is not None:
            self._body_bytes += len(body)
            if self._body_bytes > self.max_body_bytes:
                # The bytes up to the limit are passed on first, so the events before the 413 are the
                # same however the body was split into reads.
                allowed = len(body) - (self._body_bytes - self.max_body_bytes)
                if allowed > 0:
                    self._events.append(_tuple_new(BodyChunk, (body[:allowed],)))
                self._fail(413, "body too large")
        self._events.append(_tuple_new(BodyChunk, (body,)))

    def on_message_complete(self) -> None:
        # (Trailers: bounded on the wire, on their own, while they arrive: see _feed_chunked.)
        self._in_message = False
        self._awaiting_head = True
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
        if self._divert:
            return self._feed_chunked(data) if self._in_chunked else self._feed_diverted(data)
        events = self._events = []
        began_in = self._in_message
        try:
            self._execute(data)
        except Exception as exc:  # noqa: BLE001 — _settle classifies: httptools' oddities must not escape
            return self._settle(data, began_in, exc)
        # PERF NOTE (split-independent answers, tests/test_http1_codec_splits.py): a read that ends
        # between messages, no longer than the raw bound, with no head carried in, costs this one test
        # (and the _divert test above, in place of the _upgrading one); every other read goes to
        # _settle, which finds where heads begin. It replaces the per-read "first 32 bytes" slice and
        # raw count of the old method and size checks, and the limits moved from each field to the
        # head's end: RequestReader.feed of a 5-header GET 2.34 -> 2.20 us, ResponseReader.feed (after
        # expect) of a 2-byte response 1.93 -> 1.84 us (timeit, 200 000 feeds each, this codec and the
        # one before loaded side by side, 15 alternating rounds, medians; paired new/old 0.94, 0.96).
        # What it costs: a read inside a streamed body goes to _settle: a 16 KiB read of a
        # Content-Length body 0.44 -> 0.51 us; of a chunked body (two 8 KiB chunks) 0.68 -> 1.89 us,
        # the walk that keeps the body's place in its chunked framing (~0.45 us a chunk, _walk_chunks).
        # PERF NOTE (trailer bound): a chunked body's reads now take _feed_chunked through the _divert test
        # above (no _settle): a 16 KiB chunked read 1.82 -> 1.74 us, a 64 KiB one 5.51 -> 5.29 us; a
        # chunked POST in two reads 3.82 -> 3.89 us (the flag set when its first read ends in the body);
        # "the read length past which" (_room) is max_head_bytes, no longer the raw bound (timeit, the
        # codec before/after side by side, 11 alternating rounds, medians; GET and response unchanged).
        if self._in_message or len(data) > self._room:
            return self._settle(data, began_in, None)
        return events

    # the slow path: where heads begin, the raw bound, a bad method's status -----------------------
    def _feed_core(self, data: bytes) -> list:
        """feed() without its first tests (the same steps; feed has them inline, one call less)."""
        events = self._events = []
        began_in = self._in_message
        try:
            self._execute(data)
        except Exception as exc:  # noqa: BLE001 — as in feed
            return self._settle(data, began_in, exc)
        if self._in_message or len(data) > self._room:
            return self._settle(data, began_in, None)
        return events

    def _feed_diverted(self, data: bytes) -> list:
        if self._judging is not None:
            return self._judge_method(data, False)
        if self._upgrading:
            self._held += data
            return []
        # A head carried in from earlier reads: llhttp sees no more of it than the raw bound allows, so
        # a problem before that byte is found first and the bound is crossed at the same byte, however
        # the reads fall (and the head's bytes need not be kept for _probe).
        cut = self._raw_limit - self._raw_head
        if len(data) <= cut:
            return self._feed_core(data)
        events = self._feed_core(data[:cut])
        if self._error is not None:
            return events
        if self._raw_head == self._raw_limit and self._judging is None:
            # That head, still incomplete: data[cut] crosses the bound. (A head begun after it in
            # data[:cut] is shorter; a method being judged or an upgrade take the rest below.)
            self._error = Http1Error(self._too_large, "headers too large")
            if not events:
                raise self._error
            return events
        try:
            return events + self.feed(data[cut:])
        except Http1Error:
            if events:
                return events                     # (the error stays in failed, raised by the next feed)
            raise

    def _feed_chunked(self, data: bytes) -> list:
        """A read that begins inside a chunked body (RFC 9112 §7.1). Its trailer section is bounded like a
        head, on its own: ``max_head_bytes`` bytes on the wire, from its first byte through the LF of its
        empty line (see _walk_chunks); past that, 431 (a response: 502), at the same byte of the stream
        however the reads fall, and an error llhttp finds before that byte comes first."""
        state = self._chunk_state
        limit = self.max_head_bytes
        if len(data) <= (limit - state[1][1] if state[0] == _TRAILERS else limit):
            # No trailer section can cross its bound in this read: llhttp first, then the walk that keeps
            # the body's place, only if the body goes on (a read that ends it and ends between messages,
            # the last read of a body, costs what it did before the bound).
            events = self._events = []
            try:
                self._execute(data)
            except Exception as exc:  # noqa: BLE001 — as in feed (the walk starts where this read did)
                # An error, or a next message's method cut by the read's end (_settle waits for it): either
                # way no chunked body goes on.
                self._in_chunked = False
                return self._settle(data, True, exc)
            if not self._in_message:
                self._in_chunked = False
                self._divert = self._upgrading     # (an upgrade request may have followed the body)
                return events
            pos, state = _walk_chunks(data, 0, state, limit)
            if pos is None:
                self._chunk_state = state
                return events
            # The body ended and another message began: _settle measures its head (walking this body
            # again from where the read began, to find it).
            self._in_chunked = False
            self._divert = self._upgrading
            return self._settle(data, True, None)
        # A longer read (or a section near its bound): walked before llhttp sees it, so that a section
        # crossing the bound is cut there (llhttp, which holds a trailer field until it ends, never gets
        # more of it, and what it finds before that byte comes first).
        pos, state = _walk_chunks(data, 0, state, limit)
        if pos is not None:
            # The body ends in this read: the usual path (what follows is measured by _settle).
            self._in_chunked = self._divert = False
            return self._feed_core(data)
        if state[0] == _OVER:
            data = data[:state[1]]
        events = self._events = []
        try:
            self._execute(data)
        except Exception as exc:  # noqa: BLE001 — as in feed
            self._in_chunked = False
            return self._settle(data, True, exc)
        if state[0] != _OVER:
            self._chunk_state = state
            return events
        self._error = Http1Error(self._too_large, "trailers too large")
        if not events:
            raise self._error
        return events

    def _settle(self, data: bytes, began_in: bool, exc: Exception | None) -> list:
        """After llhttp has seen ``data``: apply the raw bound to every head this read touched, judge a
        bad method on its own bytes, carry what the next read needs of a head still incomplete.

        Each head is measured from its own first byte (llhttp skips empty lines before it), found by
        walking the read (_head_spans): so the bound is crossed at the same byte of the stream however
        the reads fall. A head begun in this read and past the bound is answered as if the stream
        stopped there: a fresh parser (_probe) reads its first raw-bound bytes, and an error inside them
        (the first problem in the stream) is the answer; else the head is too large. Events of that head
        and after are dropped. (A head carried in is cut at the bound before llhttp sees it:
        _feed_diverted.)"""
        events = self._events
        if exc is None and began_in and not self._awaiting_head and not self._raw_head \
                and MessageEnd not in events and self._resume_at is None:
            # Within one body from start to end (a streamed body's reads): no head to measure. (A chunked
            # body's reads do not come here: _feed_chunked walks them.)
            return events
        n = len(data)
        resume = self._resume_at
        self._resume_at = None
        spans = self._head_spans(data, began_in, events, resume)
        verdict = None
        limit = self._raw_limit
        for start, end, index in spans:
            if (n if end is None else end) - start > limit:
                # (a head carried in never gets here: _feed_diverted cut the read at the bound)
                verdict = self._probe(data[start:start + limit]) if start >= 0 else \
                    Http1Error(self._too_large, "headers too large")
                if verdict is not None:
                    if index is not None:
                        del events[index:]
                    break
        if verdict is None and self._chunk_state[0] == _OVER:
            # The last message's trailer section began in this read and grew past its bound in it
            # (_past_body; a section carried in is cut at the bound before llhttp sees it: _feed_chunked).
            # The answer is the first problem in the stream: an error a fresh reader finds in that
            # message's body up to the bound's byte, else "trailers too large"; events from there on go.
            _, body, index = spans[-1] if spans else (0, None, -1)   # (spans: always, see _feed_chunked)
            verdict = body is not None and self._probe_trailers(data[body:self._chunk_state[1]]) or \
                Http1Error(self._too_large, "trailers too large")
            for j in range(index + 1, len(events)):
                if events[j] is MessageEnd:
                    del events[j:]
                    break
        if verdict is None and exc is not None:
            lead = b""
            if spans and isinstance(self, RequestReader):
                start = spans[-1][0]
                lead = data[start:start + MAX_METHOD_BYTES + 1] if start >= 0 else \
                    (self._head_lead + data)[:MAX_METHOD_BYTES + 1]
            verdict = self._classify(exc, lead, False)
            if verdict is None:          # a method token cut by the end of this read: wait for its end
                self._judging = lead
                self._divert = True
                return events
        if verdict is not None:
            self._error = verdict
            if not events:
                raise verdict
            return events
        # Carry what the next read needs of a head still incomplete.
        if self._in_message and self._awaiting_head and spans and spans[-1][1] is None:
            start = spans[-1][0]
            if start >= 0:
                self._raw_head = n - start
                self._head_lead = data[start:start + MAX_METHOD_BYTES + 1]
                self._head_tail = data[max(start, n - 3):]
            else:
                self._raw_head += n
                if len(self._head_lead) <= MAX_METHOD_BYTES:
                    self._head_lead = (self._head_lead + data)[:MAX_METHOD_BYTES + 1]
                self._head_tail = (self._head_tail + data)[-3:]
            if len(self._headers) > self.max_headers:
                # More fields than a head may have: it is refused (431) when it ends. Until then one too many
                # is kept, not all: within the raw bound a head of "a:\r\n" lines is 16 000 fields, ~1.5 MB
                # of tuples held across reads (found auditing what grows while incomplete).
                del self._headers[self.max_headers + 1:]
            self._divert = True
        elif self._raw_head:
            self._raw_head = 0
            self._head_lead = self._head_tail = b""
            self._divert = self._upgrading
        self._room = self.max_head_bytes
        if self._in_message and not self._awaiting_head:
            for e in reversed(events):
                if e.__class__ is RequestHead or e.__class__ is ResponseHead:
                    self._body_head = e
                    break
            if self._body_head.chunked and not self._upgrading:   # (a 101's body is the new protocol's)
                # Inside a chunked body: the next reads go to _feed_chunked, which keeps its place.
                self._in_chunked = self._divert = True
        return events

    def _head_spans(self, data: bytes, began_in: bool, events: list, resume) -> list:
        """[start, end or None, index of its head event or None] of each head this read touched, in
        order: ``start`` < 0 for a head carried in from earlier reads (``-_raw_head``), ``end`` None
        for one still incomplete (or refused) at the end of the read.

        llhttp reports no offsets, so the walk recomputes them from the bytes and the events: a head
        ends at the first CRLFCRLF after its start (strict llhttp refuses bare LF, obs-fold and CR/LF in
        a field, so nothing else in a head looks like that); a body is Content-Length bytes, or chunked
        framing walked size line by size line (_walk_chunks; llhttp has accepted it), its place kept
        from read to read while the body lasts; the walk goes past a message only once its MessageEnd
        is among the events."""
        n = len(data)
        spans: list = []
        i = pos = 0
        if resume is not None:       # a response to HEAD cut out by ResponseReader._execute
            pos, i = resume
        elif began_in:
            if self._raw_head:       # a head carried in: it ends at the first CRLFCRLF across the boundary
                tail = self._head_tail
                k = (tail + data).find(b"\r\n\r\n")
                head = events[0] if events and events[0].__class__ in _HEADS else None
                if k < 0 or head is None:
                    return [[-self._raw_head, None, None]]
                spans.append([-self._raw_head, k + 4 - len(tail), 0])
                nxt = self._past_body(data, k + 4 - len(tail), _body_kind(head), events, 1, _CHUNK_START)
            else:                    # the read began in a body
                kind = _body_kind(self._body_head) if self._body_head is not None else "open"
                if kind == "chunked":
                    nxt = self._past_body(data, 0, kind, events, 0, self._chunk_state)
                elif kind.__class__ is int:
                    while i < len(events) and events[i] is not MessageEnd:   # Content-Length: its events
                        pos += len(events[i].data)
                        i += 1
                    nxt = (pos, i + 1) if i < len(events) else None
                else:
                    return spans
            if nxt is None:
                return spans
            pos, i = nxt
        while True:
            while pos < n and data[pos] in (13, 10):   # empty lines before a message (RFC 9112 §2.2)
                pos += 1
            if pos >= n:
                return spans
            head = events[i] if i < len(events) and events[i].__class__ in _HEADS else None
            if head is None:
                # A message llhttp began (not bytes it refused after a closing message) with no head
                # event: incomplete, or refused in its head.
                if self._in_message:
                    spans.append([pos, None, None])
                return spans
            k = data.find(b"\r\n\r\n", pos)
            if k < 0:                # (cannot happen for a head llhttp completed)
                spans.append([pos, None, i])
                return spans
            spans.append([pos, k + 4, i])
            nxt = self._past_body(data, k + 4, _body_kind(head), events, i + 1, _CHUNK_START)
            if nxt is None:
                return spans
            pos, i = nxt

    def _past_body(self, data: bytes, pos: int, kind, events: list, i: int,
                   chunk_state: tuple) -> tuple[int, int] | None:
        """(offset, event index) just past the message whose body (``kind``, see _body_kind) starts at
        ``pos`` and whose events after its head start at ``i``; None if it does not end in this read
        (a chunked body's place is kept in _chunk_state for the next read)."""
        if kind == "chunked":
            pos, state = _walk_chunks(data, pos, chunk_state, self.max_head_bytes)
            if pos is None:
                self._chunk_state = state
                return None
        elif kind.__class__ is not int:
            return None
        else:
            pos += kind
        while i < len(events) and events[i] is not MessageEnd:
            i += 1
        return (pos, i + 1) if i < len(events) else None

    def _probe(self, head: bytes) -> Http1Error | None:
        """The answer for a head longer than the raw bound, from its first raw-bound bytes ``head``: an
        error a fresh reader finds within them, else "headers too large"; None if the head ends within
        them. (Here, for responses, every answer is 502, so which comes first does not matter;
        RequestReader reads them.)"""
        return Http1Error(self._too_large, "headers too large")

    def _probe_trailers(self, body: bytes) -> Http1Error | None:
        """The error in ``body`` (a chunked body from its first byte up to the trailer bound's byte) a
        fresh reader finds, or None. (Here, for responses, every answer is 502; RequestReader reads it.)"""
        return None

    def _classify(self, exc: Exception, lead: bytes, final: bool) -> Http1Error | None:
        """The Http1Error for an exception out of llhttp or a callback (None: a method not judged yet)."""
        if isinstance(exc, Http1Error):
            return exc
        if self._cb_error is not None:
            # A callback's own Http1Error comes back wrapped (HPE_USER / HPE_CB_*): prefer it.
            return self._cb_error
        if isinstance(exc, httptools.HttpParserInvalidMethodError) or (
                isinstance(self, RequestReader) and isinstance(exc, httptools.HttpParserError)
                and str(exc).startswith("Invalid method")):   # llhttp's "Invalid method for HTTP/x.x request"
            status = _method_status(lead, final)
            if status is None:
                return None
            return Http1Error(status, "unknown method" if status == 501 else "invalid method")
        if isinstance(exc, httptools.HttpParserError):
            return Http1Error(self._err_status, str(exc) or "invalid message")
        return Http1Error(self._err_status, f"invalid message ({type(exc).__name__})")

    def _judge_method(self, data: bytes, final: bool) -> list:
        lead = self._judging = (self._judging + data)[:MAX_METHOD_BYTES + 1]
        status = _method_status(lead, final)
        if status is None:
            return []
        self._judging = None
        self._divert = False
        self._error = Http1Error(status, "unknown method" if status == 501 else "invalid method")
        raise self._error

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
        self._upgrading = self._divert = False
        return self.feed(held) if held else []

    def feed_eof(self) -> list:
        """The peer finished sending; a message cut short is an error."""
        if self._error is not None:
            raise self._error
        if self._judging is not None:
            return self._judge_method(b"", True)
        if self._upgrading:
            return []   # the held bytes stay for the caller; the EOF is theirs to see on the raw stream
        if self._in_message:
            self._error = Http1Error(self._err_status, "connection closed mid-message")
            raise self._error
        return []


def _body_kind(head) -> int | str:
    """How the body after ``head`` ends: a byte count, "chunked", or "open" (until EOF, or an upgrade:
    no HTTP message follows it in the same read)."""
    if head.__class__ is RequestHead:
        if head.upgrade is not None:
            return "open"
        if head.chunked:
            return "chunked"
        return head.content_length or 0
    if head.status == 101:
        return "open"
    if not head.has_body:
        return 0
    if head.chunked:
        return "chunked"
    return "open" if head.content_length is None else head.content_length


# A chunked request head, for RequestReader._probe_trailers.
_PROBE_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


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
        # Counted here, judged at the head's end (see on_header): llhttp hands the target over in pieces
        # at read boundaries, so judging a piece would answer 431 where the whole read finds a bad byte
        # further on (400) first.
        self._url += url
        self._head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """``_Reader.on_header`` with the value's trailing whitespace trimmed. RFC 9110 §5.5: "a field value does
        not include leading or trailing whitespace"; llhttp drops the leading OWS only, Envoy's codec trims both,
        so routes, policies and upstreams see ``a``, not ``a `` (request fields only: what the waypoint matches on;
        a response's fields are passed on, and their recipient ignores the OWS — ~40 ns per field saved there)."""
        if value and value[-1] in _OWS:
            value = value.rstrip(b" \t")
        self._head_bytes += len(name) + len(value)
        if self._awaiting_head:
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._awaiting_head = False
        if self._head_bytes > self.max_head_bytes or len(self._headers) > self.max_headers:
            self._check_head()
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
                self._upgrading = self._divert = True
                keep_alive = False
            elif chunked or length:
                self._fail(501, "protocol upgrade with a request body is not supported")
            else:
                tokens = {t.strip().lower() for t in (upgrade or b"").split(b",")}
                if tokens != {b"h2c"}:
                    upgrade_to = upgrade or b""
                    self._upgrading = self._divert = True
        if length is not None and self.max_body_bytes is not None and length > self.max_body_bytes:
            self._fail(413, "body too large")   # known up front: refuse before reading it
        has_body = chunked or bool(length)
        self._events.append(_tuple_new(RequestHead, (method, self._url, version, headers, keep_alive, has_body,
                                                     chunked, length, expect, host, upgrade_to)))

    def _probe(self, head: bytes) -> Http1Error | None:
        probe = RequestReader(max_head_bytes=self.max_head_bytes, max_headers=self.max_headers,
                              max_body_bytes=self.max_body_bytes)
        try:
            probe._execute(head)
        except Exception as exc:  # noqa: BLE001 — classified like feed's
            return probe._classify(exc, head[:MAX_METHOD_BYTES + 1], True)
        return Http1Error(431, "headers too large") if probe._awaiting_head else None

    def _probe_trailers(self, body: bytes) -> Http1Error | None:
        # The body's parse does not depend on the head it follows beyond "chunked" (no upgrade, not CONNECT:
        # those were refused with a body), so a stand-in head puts a fresh reader where this one was. The
        # head is read under the default limits (ours may be too small for it), the body under ours.
        probe = RequestReader(max_body_bytes=self.max_body_bytes)
        probe.feed(_PROBE_HEAD)
        probe.max_head_bytes = self.max_head_bytes
        probe.max_headers = self.max_headers
        try:
            probe.feed(body)
        except Http1Error as err:
            return err
        return probe.failed

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
        self._reason += reason     # (not counted, as in Envoy's client codec; bounded raw)

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._awaiting_head = False
        if self._head_bytes > self.max_head_bytes or len(self._headers) > self.max_headers:
            self._check_head()
        status = parser.get_status_code()
        if status == 101:
            if not self._upgrade_expected:
                self._fail(502, "unexpected 101 Switching Protocols")
            self._upgrading = self._divert = True
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
        # The heads are cut out here, so their raw bound is checked here, exactly (see _Reader._settle);
        # where llhttp takes over, _settle walks on from (_resume_at).
        size = len(data)
        data = self._pending + data
        self._pending = b""
        self._resume_at = (size, len(self._events))
        self._room = -1
        while data:
            data = data.lstrip(b"\r\n")      # empty lines before a head, as llhttp skips them
            end = data.find(b"\r\n\r\n")
            if (len(data) if end < 0 else end + 4) > self._raw_limit:
                raise Http1Error(502, "headers too large")
            if end < 0:
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
                self._resume_at = (size - len(data), len(self._events))
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


# Where a read ended in chunked framing (RFC 9112 §7.1), for _walk_chunks: (phase, detail).
_SIZE_LINE, _CHUNK_DATA, _TRAILERS, _OVER = 0, 1, 2, 3
_CHUNK_START = (_SIZE_LINE, b"")     # detail: the size line so far, kept short (see CHUNK_LINE_KEPT_BYTES)
# detail of _CHUNK_DATA: data bytes + CRLF still to come; of _TRAILERS: (the line so far is empty, the
# section's bytes so far); of _OVER (a result, never carried): the offset in the read of the byte that takes
# the trailer section past its bound.
# A size line is walked, not held: of one cut by a read boundary the walker keeps its first bytes, its leading
# zeros collapsed to one (llhttp accepts any number of them), which always include the whole size (at most 16
# hex digits: llhttp refuses a larger one) and the ";" after it. The rest of the line (chunk extensions, which
# llhttp checks and httptools does not hand over) is neither kept nor bounded, as in Envoy: its parser,
# quiche's BalsaFrame (READING_CHUNK_EXTENSION), scans extensions to the LF without a limit and Envoy's
# BalsaParser::OnChunkExtensionInput drops them. So an endless extension costs time (the stream's timeouts
# bound it), never memory.
CHUNK_LINE_KEPT_BYTES = 64


def _walk_chunks(data: bytes, pos: int, state: tuple, limit: int) -> tuple:
    """Walk chunked framing from ``pos`` in ``state``: (offset just past the body's last CRLF, None),
    or (None, the state at the end of ``data``), or (None, (_OVER, offset)) when the trailer section
    grows past ``limit`` bytes at data[offset]. Size lines (hex size, optional extensions), data and
    its CRLF, then trailer lines up to an empty one. Nothing is checked (llhttp checks the same bytes,
    and any error it finds before the walk's answer comes first), but on bytes llhttp accepts the walk
    is exact."""
    phase, detail = state
    n = len(data)
    while True:
        if phase == _CHUNK_DATA:
            pos += detail
            if pos > n:
                return None, (_CHUNK_DATA, pos - n)
            phase, detail = _SIZE_LINE, b""
        elif phase == _SIZE_LINE:
            lf = data.find(b"\n", pos)
            if lf < 0:
                line = detail + data[pos:]
                if line and line[0] == 48 and len(line) > 1:      # "0"
                    line = b"0" + line.lstrip(b"0")
                return None, (_SIZE_LINE, line[:CHUNK_LINE_KEPT_BYTES])
            line = detail + data[pos:lf] if detail else data[pos:lf]
            try:
                size = int(line.partition(b";")[0], 16)   # (int() drops the CR)
            except ValueError:   # bytes llhttp refused (the read ends in an error): no end to find
                return None, state
            pos = lf + 1
            phase, detail = (_CHUNK_DATA, size + 2) if size else (_TRAILERS, (True, 0))
        else:
            # The trailer section: lines up to an empty one, bounded as a whole (see _Reader._feed_chunked):
            # the section's byte number limit + 1 (at data[stop]) is over the bound.
            empty, seen = detail
            start = pos - seen
            stop = start + limit
            while True:
                lf = data.find(b"\n", pos, stop)
                if lf < 0:
                    if n > stop:
                        return None, (_OVER, stop)
                    return None, (_TRAILERS, (empty and (pos == n or (pos == n - 1 and data[pos] == 13)),
                                              n - start))
                if empty and (lf == pos or (lf == pos + 1 and data[pos] == 13)):
                    return lf + 1, None
                pos = lf + 1
                empty = True


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
           "header_value", "HOP_BY_HOP", "MAX_HEAD_BYTES", "MAX_HEADERS", "MAX_BODY_BYTES", "raw_head_limit"]
