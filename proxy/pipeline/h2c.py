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
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable

import h2.config
import h2.connection
import h2.events as ev
import h2.exceptions
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from hbone.limits import Abuse, InboundGuard
from hbone.settings import H2_STREAM_BACKSTOP_FACTOR, HboneSettings
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
# Envoy's max_headers_count default (100 per message), as for HTTP/1.1 (proxy/http1/codec.py
# MAX_HEADERS). Over it, or over MAX_HEADER_LIST_BYTES, a request is answered 431 on its stream (RFC 6585
# §5) and the connection keeps serving. (Envoy resets an HTTP/2 stream over max_headers_count; a 431 is
# the clearer answer and the one our HTTP/1.1 path gives.)
MAX_HEADERS = 100
# HPACK decoding stops here (an HPACK bomb): h2's DenialOfServiceError, GOAWAY ENHANCE_YOUR_CALM. Twice
# the advertised SETTINGS_MAX_HEADER_LIST_SIZE leaves room to answer a 431 for lists in between (the
# HBONE layer's rule, hbone/settings.py HEADER_LIST_HARD_BYTES).
HEADER_LIST_HARD_BYTES = 2 * MAX_HEADER_LIST_BYTES
# HPACK-compressed header block (HEADERS + CONTINUATION): over it, GOAWAY ENHANCE_YOUR_CALM on the
# frame headers, before h2 buffers the block (h2 4.4.1 keeps up to 64 CONTINUATION frames). HPACK never
# makes an honest block bigger than the list it decodes to, so the decoder's hard limit is the cap.
HEADER_BLOCK_MAX_BYTES = HEADER_LIST_HARD_BYTES
# RFC 9113 §6.5.2 SETTINGS_MAX_FRAME_SIZE initial value (2^14): we advertise no other (nor does Envoy's
# codec), so a longer frame is a FRAME_SIZE_ERROR, said on its 9-byte header before its body is buffered.
MAX_FRAME_BYTES = 16 * KiB
# Envoy's premature-reset rule (HCM, CVE-2023-44487 rapid reset): a stream that ends without a response
# head within overload.premature_reset_min_stream_lifetime_seconds (default 1) of its start is premature;
# once overload.premature_reset_total_stream_count (default 500) streams have closed, a connection whose
# premature resets are half of them or more is closed; before that, as soon as they reach half of 500
# (even if every later stream were good the ratio would be reached). Envoy aborts the connection; we send
# GOAWAY ENHANCE_YOUR_CALM first (as the HBONE layer does). A ratio, not a rate, so a busy gRPC client
# whose deadlines cancel a few per cent of its calls is never cut. Streams we refuse (over
# MAX_CONCURRENT_STREAMS) count as premature too: a client that keeps overrunning the limit is
# resetting streams as surely.
PREMATURE_RESET_TOTAL_STREAM_COUNT = 500
PREMATURE_RESET_MIN_STREAM_LIFETIME_S = 1.0
# Envoy HCM stream_idle_timeout default (5 min), which "also specifies the amount of time that Envoy will
# wait for the peer to open enough window to write any remaining stream data": a write that waits this
# long for the peer's flow-control window resets its stream (CANCEL), so a peer that never opens its
# window holds a stream (and the upstream request behind it) for this long at most, even on a route
# with no timeout (Istio's default).
STREAM_FLUSH_TIMEOUT_S = 300.0
# The frame-level flood limits (hbone/limits.py InboundGuard: CONTINUATION, empty frames, SETTINGS, PING,
# PRIORITY, WINDOW_UPDATE, unknown frames, frame and header block sizes) with the HBONE layer's numbers
# (hbone/settings.py, each quoted from Envoy/nghttp2 there): max_continuation_frames 8 (nghttp2
# max_continuations), max_empty_frames 1 (Envoy max_consecutive_inbound_frames_with_empty_payload),
# priority_frames_per_stream 100 (Envoy max_inbound_priority_frames_per_stream),
# window_updates_per_data_frame 10 (Envoy max_inbound_window_update_frames_per_data_frame_sent), 100
# SETTINGS / PING / unknown frames per 10 s; and this layer's frame and header sizes. Every verdict is a
# GOAWAY with its code (ENHANCE_YOUR_CALM, FRAME_SIZE_ERROR) ending this h2c connection only.
H2C_FLOOD_SETTINGS = HboneSettings(max_frame_size=MAX_FRAME_BYTES,
                                   server_max_header_list_size=MAX_HEADER_LIST_BYTES,
                                   header_list_hard_limit=HEADER_LIST_HARD_BYTES,
                                   max_header_block=HEADER_BLOCK_MAX_BYTES)
# Upstream: at most this many concurrent streams per endpoint connection (ztunnel's client bound).
# A request over the bound waits for a slot (up to the route's timeout), as Envoy's pool queues
# pending requests. A peer advertising a lower SETTINGS_MAX_CONCURRENT_STREAMS makes h2 refuse the
# extra stream locally: that is a refused stream (retriable), not a wait.
UPSTREAM_MAX_STREAMS = 100

# RFC 9113 §8.2.2: connection-specific fields must not appear in HTTP/2 messages.
CONNECTION_SPECIFIC = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade", b"host", b"http2-settings"))


def h2_trailer_fields(trailers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Trailer fields as they go out on an HTTP/2 stream (either way: response trailers to an h2c client,
    request trailers to an HTTP/2 upstream): lower-case names, no connection-specific field (RFC 9113
    §8.2.2) and no pseudo-header (§8.1: never in trailers). h2 refuses such fields inbound already; this
    keeps one added on the way from making h2 refuse the whole outgoing block."""
    out = []
    for name, value in trailers:
        name = name.lower()
        if name not in CONNECTION_SPECIFIC and not name.startswith(b":"):
            out.append((name, value))
    return out


_INITIAL_CONNECTION_WINDOW = 65535   # RFC 9113 §6.9.2: only WINDOW_UPDATE on stream 0 raises it

# RFC 9113 §6.8: after a GOAWAY, "activity on streams numbered lower than or equal to the last stream
# identifier might still complete successfully" (a gRPC server's MaxConnectionAge drain sends GOAWAY with
# requests in flight, then finishes them). h2 4.4.1 moves its connection state machine to CLOSED on any
# GOAWAY, sent or received, and then rejects every later frame; this copy of its table keeps an open
# connection open instead (the HBONE core does the same: hbone/_h2fast.py). Set per connection, so other
# h2 users keep h2's behaviour; h2 is pinned and the asserts below stop us if its table changes. The core
# itself stops new work: no request goes to an upstream after its GOAWAY (``H2cConn.alive``), and our own
# GOAWAY closes the core (nothing more is read).
_GRACEFUL_TRANSITIONS = dict(h2.connection.H2ConnectionStateMachine._transitions)
for _state in (h2.connection.ConnectionState.CLIENT_OPEN, h2.connection.ConnectionState.SERVER_OPEN):
    for _input in (h2.connection.ConnectionInputs.SEND_GOAWAY, h2.connection.ConnectionInputs.RECV_GOAWAY):
        assert _GRACEFUL_TRANSITIONS[(_state, _input)] == (None, h2.connection.ConnectionState.CLOSED), "h2 changed"
        _GRACEFUL_TRANSITIONS[(_state, _input)] = (None, _state)


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
    """RST_STREAM from the peer (``code`` from RFC 9113 §7), or our own RST_STREAM PROTOCOL_ERROR for a field
    block over the limits (``reason`` names the block and the limit; empty for the peer's reset)."""
    stream_id: int
    code: int
    reason: str = ""


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



@dataclass(frozen=True, slots=True)
class Refused:
    """Server: a new stream was refused with RST_STREAM REFUSED_STREAM (over ``max_concurrent_streams``,
    RFC 9113 §5.1.2; the client may retry it, §8.7). Never reaches the shell as a request."""
    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """Server: the core answered a request itself (431: too many or too large headers) and reset what
    the client may still send (RST_STREAM NO_ERROR, RFC 9113 §8.1). Never reaches the shell as a request."""
    stream_id: int
    status: int
    reason: str


Event = Headers | Data | Trailers | Ended | Reset | WindowOpened | Terminated | Refused | Rejected


@dataclass(frozen=True, slots=True)
class H2Limits:
    """The bounds of one h2c connection (see the constants above for each number and its source)."""
    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    max_header_list_bytes: int = MAX_HEADER_LIST_BYTES
    stream_window: int = STREAM_WINDOW_BYTES
    connection_window: int = CONNECTION_WINDOW_BYTES
    max_headers: int = MAX_HEADERS
    header_list_hard_bytes: int = HEADER_LIST_HARD_BYTES
    premature_reset_total_stream_count: int = PREMATURE_RESET_TOTAL_STREAM_COUNT
    premature_reset_min_stream_lifetime_s: float = PREMATURE_RESET_MIN_STREAM_LIFETIME_S
    stream_flush_timeout_s: float = STREAM_FLUSH_TIMEOUT_S
    flood: HboneSettings = field(default=H2C_FLOOD_SETTINGS)

    def __post_init__(self) -> None:
        if self.header_list_hard_bytes < self.max_header_list_bytes:
            raise ValueError("header_list_hard_bytes must be at least max_header_list_bytes")
        if self.max_concurrent_streams < 1 or self.premature_reset_total_stream_count < 1:
            raise ValueError("stream limits must be positive")
        if self.stream_flush_timeout_s <= 0:
            raise ValueError("stream_flush_timeout_s must be positive")


DEFAULT_H2_LIMITS = H2Limits()


class H2Core:
    """Sans-IO HTTP/2 (h2c) endpoint, client or server. Bytes in, events out; no socket, no loop.

    Both sides run the HBONE layer's flood guard (hbone/limits.py ``InboundGuard``) on the raw bytes
    before h2 sees them: a downstream client and an upstream server are equally untrusted. The server
    side also refuses streams over ``max_concurrent_streams`` (REFUSED_STREAM), answers oversized
    request heads 431, and applies Envoy's premature-reset rule (rapid reset). Either side resets a stream
    whose other field blocks — request trailers; a response head or trailers — are over the same limits
    (``_over_limits``, ``_refuse``: RST_STREAM PROTOCOL_ERROR and a ``Reset`` naming the limit). Each connection-level
    verdict is a GOAWAY with its code and a ``Terminated`` event whose ``reason`` names the limit;
    ``abuse`` keeps the verdict (logs, tests). ``clock`` (seconds, monotonic) is a parameter.

    Cost of the limits (sans-IO server core, 16 GETs per chunk answered 200 with a 9-byte body; best of
    5 x 3200 requests, process time, this 2-core box): 67.2 -> 69.7 us per request, almost all of it h2's
    own work either way (the guard is ~0.3 us per request, the header-size sum ~0.3 us)."""

    def __init__(self, *, client_side: bool, limits: H2Limits = DEFAULT_H2_LIMITS,
                 clock: Callable[[], float] = time.monotonic):
        self.client_side = client_side
        self.limits = limits
        self.clock = clock
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None,
                                           validate_inbound_headers=True, normalize_inbound_headers=True)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.state_machine._transitions = _GRACEFUL_TRANSITIONS   # see there: a GOAWAY lets streams finish
        initial = {
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
            SettingCodes.ENABLE_PUSH: 0,     # no server push, either way
        }
        if not client_side:
            initial[SettingCodes.MAX_CONCURRENT_STREAMS] = limits.max_concurrent_streams
        self._h2.local_settings = Settings(client=client_side, initial_values=initial)
        self._h2.initiate_connection()   # the SETTINGS frame says what we advertised (above)
        if not client_side:
            # h2 treats a stream over its local SETTINGS_MAX_CONCURRENT_STREAMS as a connection error
            # (TooManyStreamsError → GOAWAY). We refuse the stream over our advertised limit ourselves
            # (REFUSED_STREAM, RFC 9113 §5.1.2: "MUST treat this as a stream error ... of type
            # PROTOCOL_ERROR or REFUSED_STREAM"), so h2 enforces a backstop above it, committed locally
            # after the SETTINGS frame went out (Settings.acknowledge(): h2's public API, no frame sent).
            # The backstop still bites within one read (h2 counts the whole chunk's streams before we
            # see any): a client that opens twice our limit at once gets GOAWAY PROTOCOL_ERROR, and h2's
            # per-stream count (a scan of its open streams) stays bounded.
            ls = self._h2.local_settings
            ls[SettingCodes.MAX_CONCURRENT_STREAMS] = limits.max_concurrent_streams * H2_STREAM_BACKSTOP_FACTOR
            ls.acknowledge()
        # h2 sets its HPACK decoder's limit only from a *changed* local setting (ours never change), so
        # it would stay at hpack's 64 KiB default: set the hard limit (an HPACK bomb stops there).
        self._h2.decoder.max_header_list_size = limits.header_list_hard_bytes
        extra = limits.connection_window - _INITIAL_CONNECTION_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self.guard = InboundGuard(limits.flood, server_side=not client_side)
        self.abuse: Abuse | None = None
        self.closed = False
        self.goaway_received = False
        # Server: streams handed to the shell and not yet forgotten (the concurrency count), when each
        # started (premature-reset lifetime), and which were answered (a response head went out).
        self._held: set[int] = set()
        self._started: dict[int, float] = {}
        self._answered: set[int] = set()
        self.closed_streams = 0       # Envoy's closed_non_internally_destroyed_requests_
        self.premature_resets = 0
        self.refused = 0
        self.rejected = 0

    # -- in --
    def receive(self, data: bytes, now: float | None = None) -> list[Event]:
        """Feed bytes from the peer. A protocol violation or a crossed limit sends GOAWAY and yields
        ``Terminated`` (the last event; nothing follows it)."""
        if self.closed:
            return []
        if now is None:
            now = self.clock()
        abuse = self.guard.feed(data, now)
        if abuse is not None:
            return [self._shut(abuse)]
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.DenialOfServiceError as err:
            # The HPACK decoder's hard limit (header_list_hard_bytes): ENHANCE_YOUR_CALM.
            return [self._shut(Abuse("header_list_too_large", ErrorCodes.ENHANCE_YOUR_CALM, str(err)))]
        except h2.exceptions.ProtocolError as err:
            return [self._fail(getattr(err, "error_code", ErrorCodes.PROTOCOL_ERROR), str(err) or type(err).__name__)]
        except (h2.exceptions.H2Error, ValueError, KeyError, IndexError, UnicodeError) as err:
            # hpack/h2 internals can raise these on garbage; every one is the peer's protocol error.
            return [self._fail(ErrorCodes.PROTOCOL_ERROR, f"{type(err).__name__}: {err}")]
        out: list[Event] = []
        malformed: set[int] | None = None   # streams this read reset for a block over the limits (_refuse)
        for e in h2_events:
            if malformed is not None and getattr(e, "stream_id", None) in malformed:
                # The rest of a stream we just reset, from the same read (its body after a refused head, its
                # END_STREAM after refused trailers): never delivered, so nothing takes a refused message for
                # a whole one; its DATA still gives the connection window back.
                if isinstance(e, ev.DataReceived):
                    self.ack(e.stream_id, e.flow_controlled_length)
                continue
            if isinstance(e, ev.RequestReceived):
                if not self.client_side:
                    self._on_request(e, now, out)
                    if self.closed:
                        return out
            elif isinstance(e, ev.ResponseReceived):
                reason = self._over_limits(e.headers, "response headers")
                if reason:
                    malformed = self._refuse(e.stream_id, reason, out, malformed)
                    continue
                out.append(Headers(e.stream_id, tuple(e.headers), e.stream_ended is not None))
            elif isinstance(e, ev.InformationalResponseReceived):
                continue   # 1xx: not forwarded (Envoy drops 100-continue from upstreams by default)
            elif isinstance(e, ev.DataReceived):
                out.append(Data(e.stream_id, e.data, e.flow_controlled_length))
            elif isinstance(e, ev.TrailersReceived):
                reason = self._over_limits(e.headers, "response trailers" if self.client_side else "request trailers")
                if reason:
                    malformed = self._refuse(e.stream_id, reason, out, malformed)
                    continue
                out.append(Trailers(e.stream_id, tuple(e.headers)))
            elif isinstance(e, ev.StreamEnded):
                out.append(Ended(e.stream_id))
            elif isinstance(e, ev.StreamReset):
                out.append(Reset(e.stream_id, int(e.error_code)))
                if not self.client_side and e.stream_id in self._started:
                    started = self._started.pop(e.stream_id)
                    self.closed_streams += 1
                    # Envoy isPrematureRstStream: no response code, and a lifetime within the minimum.
                    if (e.stream_id not in self._answered
                            and now - started <= self.limits.premature_reset_min_stream_lifetime_s):
                        verdict = self._premature()
                        if verdict is not None:
                            out.append(self._shut(verdict))
                            return out
            elif isinstance(e, ev.WindowUpdated):
                out.append(WindowOpened(e.stream_id))
            elif isinstance(e, ev.RemoteSettingsChanged):
                out.append(WindowOpened(0))   # INITIAL_WINDOW_SIZE may have grown every stream's window
            elif isinstance(e, ev.ConnectionTerminated):
                self.goaway_received = True
                # NO_ERROR: a graceful drain, keep reading what the peer still sends (see
                # _GRACEFUL_TRANSITIONS). An error code: the peer is closing; nothing more is taken.
                if e.error_code != ErrorCodes.NO_ERROR:
                    self.closed = True
                out.append(Terminated(int(e.error_code), e.last_stream_id or 0, True))
                if self.closed:
                    return out
        return out

    def _on_request(self, e: ev.RequestReceived, now: float, out: list[Event]) -> None:
        sid = e.stream_id
        lim = self.limits
        if len(self._held) >= lim.max_concurrent_streams:
            # Counted on the streams the shell still holds (their handlers run), not h2's open
            # streams: h2 has already read the whole chunk, later HEADERS included.
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            self.refused += 1
            self.closed_streams += 1
            out.append(Refused(sid, "max_concurrent_streams"))
            verdict = self._premature()
            if verdict is not None:
                out.append(self._shut(verdict))
            return
        headers = e.headers
        reason = self._over_limits(headers, "request headers")
        if reason:
            self.rejected += 1
            self.closed_streams += 1
            try:
                self._h2.send_headers(sid, [(b":status", b"431"), (b"content-length", b"0")], end_stream=True)
            except h2.exceptions.H2Error:
                pass
            if e.stream_ended is None:
                # RFC 9113 §8.1: a complete response may be followed by RST_STREAM NO_ERROR, so the
                # client stops sending a body we will never read.
                self.reset(sid, ErrorCodes.NO_ERROR)
            out.append(Rejected(sid, 431, reason))
            return
        self._held.add(sid)
        self._started[sid] = now
        out.append(Headers(sid, tuple(headers), e.stream_ended is not None))

    def _over_limits(self, headers, what: str) -> str:
        """Why a field block is over this connection's limits (``max_headers`` fields, ``max_header_list_bytes``
        by RFC 9113 §6.5.2's count: name + value + 32 octets per field), or "" when it is within them.

        Every block counts, either side: a request head (431, ``_on_request``), request trailers (server), a
        response head or response trailers (client, from an HTTP/2 upstream). Envoy's HTTP/2 codec checks each
        block the same way on both its connections (codec_impl.cc ``saveHeader``: the stream's current map —
        head or trailers — over ``max_headers_kb`` or ``max_headers_count``, details ``http2.too_many_headers``;
        ``ClientConnectionImpl`` gets the cluster's ``max_response_headers_kb`` / ``max_response_headers_count``,
        60 KiB and 100 by default, the request side's numbers)."""
        lim = self.limits
        if len(headers) > lim.max_headers:
            return f"{what}: {len(headers)} fields, limit {lim.max_headers} (max_headers_count)"
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32
        if size > lim.max_header_list_bytes:
            return f"{what}: field list of {size} bytes, limit {lim.max_header_list_bytes} (max_headers_kb)"
        return ""

    def _refuse(self, stream_id: int, reason: str, out: list[Event], malformed: set[int] | None) -> set[int]:
        """A block over the limits after a stream began (request trailers; a response head or trailers): reset
        that stream with PROTOCOL_ERROR and tell the shell with a ``Reset`` carrying ``reason``.

        RFC 9113 §8.1.1: a malformed message is a stream error of type PROTOCOL_ERROR; §10.5.1: a block over
        SETTINGS_MAX_HEADER_LIST_SIZE may be treated as one. Envoy's codec resets the stream too (``saveHeader``
        returns NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE: "This will cause the library to reset/close the stream",
        nghttp2 with INTERNAL_ERROR; we name the peer's fault, PROTOCOL_ERROR). No 431 for request trailers: the
        request may be upstream already and its response under way. The shell stops the stream as for the
        peer's own RST_STREAM (the downstream handler and its upstream request; the upstream request's caller:
        502, or a reset downstream once the head went) and reports ``reason`` (access log, metrics). Only this
        stream: the connection goes on. A block over ``header_list_hard_bytes`` never gets here: h2's HPACK
        guard makes it a GOAWAY (``receive``)."""
        self.reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
        out.append(Reset(stream_id, int(ErrorCodes.PROTOCOL_ERROR), reason))
        if malformed is None:
            malformed = set()
        malformed.add(stream_id)
        return malformed

    def _premature(self) -> Abuse | None:
        """Envoy ConnectionManagerImpl::maybeDrainDueToPrematureResets, after one more premature reset."""
        self.premature_resets += 1
        limit = self.limits.premature_reset_total_stream_count
        if self.closed_streams < limit:
            if self.premature_resets * 2 < limit:
                return None
        elif self.premature_resets * 2 < self.closed_streams:
            return None
        return Abuse("too_many_premature_resets", ErrorCodes.ENHANCE_YOUR_CALM,
                     f"{self.premature_resets} of {self.closed_streams} streams reset before an answer")

    def _shut(self, abuse: Abuse) -> Terminated:
        self.abuse = abuse
        return self._fail(abuse.code, abuse.reason)

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
        if not self.client_side:
            self._answered.add(stream_id)

    def sendable(self, stream_id: int) -> int:
        """Bytes of DATA the peer's windows allow on this stream now (0 when closed)."""
        try:
            return min(self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size)
        except h2.exceptions.H2Error:
            return 0

    def send_data(self, stream_id: int, data: bytes | memoryview, end: bool = False) -> int:
        """Send as much of ``data`` as the windows allow, in frames; returns how many bytes were sent.
        ``end``: END_STREAM on the frame that carries the last byte (when the windows let it go now)."""
        sent = 0
        frames = 0
        n = len(data)
        try:
            while sent < n:
                room = self.sendable(stream_id)
                if room <= 0:
                    break
                k = min(room, n - sent)
                self._h2.send_data(stream_id, bytes(data[sent:sent + k]), end_stream=end and sent + k == n)
                frames += 1
                sent += k
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError) as err:
            raise H2cStreamClosed(str(err)) from None
        except h2.exceptions.H2Error as err:
            raise H2cError(str(err) or type(err).__name__) from None
        finally:
            # Envoy's WINDOW_UPDATE bound grows with the DATA frames we sent (hbone/limits.py).
            self.guard.data_frame_sent(frames)
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

    def forget(self, stream_id: int) -> None:
        """Server: the shell is done with this stream (its handler ended): it no longer counts against
        ``max_concurrent_streams``, and it closed without a premature reset."""
        self._held.discard(stream_id)
        self._answered.discard(stream_id)
        if self._started.pop(stream_id, None) is not None:
            self.closed_streams += 1

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
        state = f"goaway {self.abuse.reason}" if self.abuse is not None else "closed" if self.closed else "open"
        extra = "" if self.client_side else (f" held={len(self._held)} refused={self.refused} rejected={self.rejected}"
                                             f" premature={self.premature_resets}/{self.closed_streams}")
        return f"<H2Core {side} open={self.open_streams}{extra} {state}>"


# ---------------------------------------------------------------------------------------------
# The asyncio shell


class _Stream:
    __slots__ = ("id", "chunks", "ended", "reset", "waiter", "head", "trailers", "window", "local_done",
                 "refused")

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
        self.refused = ""                    # why we reset it for a field block over the limits (H2Core._refuse)


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
        self.lost = False   # the downstream connection (the tunnel) was lost with streams in flight (serve_h2c)
        self.requests = 0
        self._drain_lock = asyncio.Lock()
        self.flush()

    # -- plumbing --
    def flush(self) -> bool:
        """Write what the core has to send; True if there was something."""
        data = self.core.data_to_send()
        if data:
            try:
                self.stream.write(data)
            except (OSError, RuntimeError, AttributeError):
                pass   # the transport is gone: the reader loop ends the connection
            return True
        return False

    async def run(self) -> None:
        """Read until EOF, GOAWAY or a protocol error; then fail what is left."""
        try:
            while not self.core.closed:
                if self.terminated is not None and self.core.client_side and not self.streams:
                    break   # the upstream's graceful GOAWAY, and nothing of ours is left on it
                try:
                    data = await self.stream.read(READ_BYTES)
                except OSError as err:
                    self.error = f"{type(err).__name__}: {err}"
                    break
                if not data:
                    break
                self._dispatch(self.core.receive(data))
                if self.flush():
                    # What the peer's frames made us send (SETTINGS/PING ACKs, WINDOW_UPDATEs, RST_STREAM
                    # for each frame on a reset stream: h2 answers every one) must leave before we read
                    # more: a peer that writes and never reads stalls itself, never our memory (Envoy
                    # bounds the same with max_outbound_frames 10000 / max_outbound_control_frames 1000).
                    try:
                        await self.drain()
                    except OSError as err:
                        self.error = f"{type(err).__name__}: {err}"
                        break
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
                    st.refused = e.reason
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
                    abuse = self.core.abuse
                    self.error = (f"{abuse.reason}: {abuse.detail}" if abuse is not None
                                  else f"protocol error: {e.reason}")
                # A peer's GOAWAY names the last stream *we* initiated that it processes: ours are the
                # requests on the client side; on the server side (we push nothing) a graceful one
                # concerns none of the client's requests. Streams up to it finish (or, after an error
                # GOAWAY, fail when the reader stops: _fail_all).
                cut = not e.by_peer or self.core.client_side or self.core.closed
                for sid, st in self.streams.items():
                    if cut and (sid > e.last_stream_id or not e.by_peer):
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
        """Open for new streams: no GOAWAY either way. Streams already open may still finish after a
        peer's graceful GOAWAY (``core.closed`` is what ends them)."""
        return self.terminated is None and not self.core.closed

    def forget(self, sid: int) -> None:
        self.core.forget(sid)
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

    async def write(self, sid: int, data: bytes, *, end: bool = False) -> None:
        """Send body bytes, waiting for the peer's window; then for the transport to drain.

        ``end``: these are the body's last bytes — END_STREAM goes on the DATA frame that carries the last of
        them (RFC 9113 §8.1: the frame "bearing the END_STREAM flag" may be the last DATA), not on an extra
        empty DATA frame after them. Without bytes it is ``end()``."""
        st = self.streams.get(sid)
        if end and not data:
            self.end(sid)
            await self.drain()
            return
        view = memoryview(data)
        while view:
            if st is None or st.reset is not None or self.core.closed:   # (after a graceful GOAWAY: go on)
                raise StreamReset(f"h2c stream {sid} reset")
            try:
                n = self.core.send_data(sid, view, end)
            except H2cError as err:
                raise StreamReset(f"h2c stream {sid}: {err}") from None
            if end and n == len(view):
                st.local_done = True   # END_STREAM went with the last frame
            self.flush()
            view = view[n:]
            if view and n == 0:
                # Bounded wait (STREAM_FLUSH_TIMEOUT_S, Envoy's stream_idle_timeout for a peer that
                # never opens its window): a timer, not a timeout context, so nothing nests with the
                # route timeout around us; the timer resolves the future with False.
                loop = asyncio.get_running_loop()
                window = st.window = loop.create_future()
                timer = loop.call_later(self.core.limits.stream_flush_timeout_s, _wake, window, False)
                try:
                    opened = await window
                finally:
                    st.window = None
                    timer.cancel()
                if opened is False:
                    self.reset(sid, ErrorCodes.CANCEL)
                    raise StreamReset(f"h2c stream {sid}: the peer opened no window in "
                                      f"{self.core.limits.stream_flush_timeout_s:g}s")
        await self.drain()

    async def drain(self) -> None:
        """Wait until the transport takes more. One stream drain at a time per connection: the
        ``ByteStream``s under us (``HboneStream``, ``TcpConnection``) keep a single drain waiter, so a second
        concurrent ``drain()`` would replace the first one's waiter and leave it waiting forever (found
        with four 6 MiB responses on one h2c connection through the waypoint). Uncontended, the lock
        does not yield."""
        async with self._drain_lock:
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
        # RFC 9113 §8.5: a CONNECT has no :path; its target is the :authority, as HTTP/1.1's
        # authority-form (proxy/http1/codec.py), and the pipeline answers it as it answers that one.
        self.target = pseudo.get(b":path") or (pseudo.get(b":authority", b"") if self.method == b"CONNECT" else b"/")
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

    @property
    def refused(self) -> str:
        """Why we reset this request's stream ourselves (its trailers over the limits), or "" (not reset, or
        reset by the client)."""
        st = self.conn.streams.get(self.sid)
        return st.refused if st is not None else ""

    def body_chunks(self) -> "H2Body":
        """The body as it arrives (an async iterator that can also say whether its end is known: ``at_end``)."""
        return H2Body(self)

    def __repr__(self) -> str:
        return f"<H2Request {self.sid} {self.method.decode()} {self.target.decode('latin-1')}>"


class H2Body:
    """A downstream request's body chunks, as they arrive (each acknowledged when taken: ``H2cConn.read``).

    ``at_end()``: nothing more will come — the client's END_STREAM (on its last DATA frame, or with its
    trailers) has arrived and every chunk has been taken. Asked by the upstream sender right after a chunk,
    it lets that chunk carry END_STREAM upstream too, without waiting for anything: a gRPC stream's message
    still goes as soon as it arrives, and only when the client ends its stream later, on its own, does the
    upstream get that end on its own (an empty DATA frame), as it was sent."""

    __slots__ = ("request",)

    def __init__(self, request: H2Request):
        self.request = request

    def __aiter__(self) -> "H2Body":
        return self

    async def __anext__(self) -> bytes:
        r = self.request
        if r._done:
            raise StopAsyncIteration
        data = await r.conn.read(r.sid)
        if not data:
            r._done = True
            raise StopAsyncIteration
        r.body_bytes += len(data)
        return data

    def at_end(self) -> bool:
        r = self.request
        if r._done:
            return True
        st = r.conn.streams.get(r.sid)
        return st is not None and st.ended and not st.chunks and st.reset is None


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

    def _head(self, status: int, headers: Iterable[tuple[bytes, bytes]], end: bool, flush: bool = True) -> None:
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
        if flush:
            self.conn.flush()

    async def send_head(self, status: int, headers: Iterable[tuple[bytes, bytes]] = (), *,
                        reason: bytes | None = None) -> None:
        self._head(status, headers, False)
        await self.conn.drain()

    async def send_body(self, data: bytes, *, end: bool = False) -> None:
        """``end``: these are the body's last bytes and no trailers follow — END_STREAM goes on their DATA frame
        (the response is then ended), not on an empty DATA frame from ``end()`` after them."""
        if not self.head_sent or self.ended:
            raise RuntimeError("send_body outside of a started response")
        if not data or self._head_only:
            return   # (an end then still comes from end())
        if end:
            self.ended = True
        await self.conn.write(self.sid, data, end=end)
        self.body_bytes += len(data)

    async def end(self, trailers: Iterable[tuple[bytes, bytes]] = ()) -> None:
        if not self.head_sent:
            raise RuntimeError("end() before send_head()")
        if self.ended:
            return
        self.ended = True
        self.conn.end(self.sid, h2_trailer_fields(trailers))
        await self.conn.drain()

    async def send_response(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, *,
                            reason: bytes | None = None) -> None:
        """``send_head`` + ``send_body(body)`` + ``end()`` for a body that is all there (the HTTP/1.1 responder's
        call, taken by the pipeline for a whole upstream answer): HEADERS, then the body's DATA frames with
        END_STREAM on the last one — or END_STREAM on HEADERS for no body (or HEAD) — written together, instead
        of the head, the body and an extra empty DATA frame to end the stream. ``reason``: no such thing in
        HTTP/2 (RFC 9113 §8.3.2: only ``:status``)."""
        if not body or self._head_only:
            self._head(status, headers, True)
            self.ended = True
            await self.conn.drain()
            return
        self._head(status, headers, False, flush=False)   # goes out with the body's first frame
        self.ended = True
        await self.conn.write(self.sid, body, end=True)
        self.body_bytes += len(body)

    async def send_local_reply(self, status: int, body: bytes = b"", headers: Iterable[tuple[bytes, bytes]] = (),
                               *, content_type: bytes = b"text/plain") -> None:
        fields = [(b"content-length", b"%d" % len(body))]
        if body:
            fields.append((b"content-type", content_type))
        fields.extend(headers)
        await self.send_response(status, fields, body)

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
            task = handlers[sid] = tg.create_task(one(sid, raw, end))
            # A done-callback, not the coroutine's finally: a handler cancelled before it first ran (the
            # client reset its stream in the same read: rapid reset) never enters its try, and its
            # stream must still stop counting against max_concurrent_streams.
            task.add_done_callback(lambda _t, sid=sid: done(sid))
            if conn.lost:
                # The tunnel was lost, and its last frames are still being read: a request among them has no one
                # to answer (found by review). Cancelled after its first step, so that handle() reports it.
                asyncio.get_running_loop().call_soon(task.cancel)

        def done(sid: int) -> None:
            handlers.pop(sid, None)
            conn.forget(sid)

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
                if not responder.head_sent and not core.closed and (st is None or st.reset is None):
                    try:
                        await responder.send_local_reply(500, b"")
                    except (OSError, RuntimeError):
                        conn.reset(sid, ErrorCodes.INTERNAL_ERROR)
                else:
                    conn.reset(sid, ErrorCodes.INTERNAL_ERROR)

        def lost(err) -> None:
            # The tunnel, the client's HTTP/2 connection, is lost (reset, or its HBONE connection died: nothing can
            # be answered on it any more): every request in flight stops and its upstream request is reset, as
            # Envoy's HCM does for each active stream of a connection that went away (conn_manager_impl.cc onEvent
            # RemoteClose → doConnectionClose, flag DC). A half-close (END_STREAM) is not this: answers can still go.
            conn.lost = True
            for task in list(handlers.values()):
                if not task.done():
                    task.cancel()

        conn = H2cConn(stream, core, on_request=start, on_reset=downstream_reset)
        watch_lost = getattr(stream, "watch_lost", None)   # (an HboneStream: hbone/_conn.py)
        if watch_lost is not None:
            watch_lost(lost)
        try:
            await conn.run()
        finally:
            if watch_lost is not None:
                watch_lost(None)
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
    "the request has not been processed"); ``protocol_error``: we reset it ourselves because the upstream's
    response head or trailers were over the limits (``H2Core._refuse``), and why — Envoy's reset reason
    ``protocol_error``, flag ``UPE`` (its client codec's messaging errors set UpstreamProtocolError)."""

    def __init__(self, message: str, *, before_response: bool, refused: bool = False, protocol_error: str = ""):
        super().__init__(message)
        self.before_response = before_response
        self.refused = refused
        self.protocol_error = protocol_error


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
                    st = conn.streams.get(self.sid)
                    if st is not None and st.refused:
                        raise H2UpstreamReset(f"upstream {st.refused}", before_response=False,
                                              protocol_error=st.refused) from None
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

    def at_end(self) -> bool:
        """Nothing more will come but the end, and no trailers with it: the upstream's END_STREAM has arrived on
        its DATA and every chunk has been taken. Asked right after a chunk, it lets that chunk carry END_STREAM
        to an h2c client too (``H2Responder.send_body(end=True)``); an end that comes later, on its own, or with
        trailers, is passed on as it came."""
        st = self.up.conn.streams.get(self.sid)
        return st is not None and st.ended and not st.chunks and st.reset is None and not st.trailers

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
        # maxRequestsPerConnection (H2UpstreamPool.connect(max_requests=)): streams taken so far, those taken
        # but not yet started, and DRAINING — no new stream; closed once its last one is done.
        self.streams_taken = 0
        self.reserved = 0
        self.draining = False
        self.reader: asyncio.Task = asyncio.get_running_loop().create_task(self.conn.run())
        self.reader.add_done_callback(lambda _: stream.close())

    @property
    def alive(self) -> bool:
        return self.conn.alive and not self.reader.done()

    def take_stream(self, max_requests: int) -> bool:
        """Reserve one of the ``max_requests`` streams this connection may carry (Envoy's
        max_requests_per_connection; the caller's ``request`` follows at once). The one reaching the limit
        turns it DRAINING (conn_pool_base.cc: "maximum streams per connection, DRAINING"). False: draining."""
        if self.draining:
            return False
        self.streams_taken += 1
        self.reserved += 1
        if self.streams_taken >= max_requests:
            self.draining = True
        return True

    def _close_if_drained(self) -> None:
        if self.draining and not self.active and not self.reserved:
            self.conn.close()
            self.conn.stream.close()   # (its reader ends)

    def release(self, sid: int) -> None:
        if sid in self.active:
            self.active.discard(sid)
            self.slots.release()
            self.conn.forget(sid)
            if self.conn.terminated is not None and not self.conn.streams:
                # The last stream the upstream's GOAWAY let finish is done: close (its reader ends).
                self.conn.stream.close()
            elif self.draining:
                self._close_if_drained()

    async def request(self, method: bytes, target: bytes, authority: bytes, headers: Iterable[tuple[bytes, bytes]],
                      body: bytes | AsyncIterable[bytes] | None, *, scheme: bytes = b"http",
                      trailers: RequestTrailers = ()) -> H2Response:
        """Send a request; return once the response head arrived (``H2UpstreamReset`` otherwise).

        ``trailers``: the request's trailer fields, sent after the body as a HEADERS frame with END_STREAM
        instead of END_STREAM on the last DATA (Envoy's router: ``decodeTrailers`` → ``encodeTrailers`` on the
        upstream stream). The fields themselves, or — for a streamed body, whose trailers arrive after its
        last chunk — a function returning them, called once the body has ended. Ignored without a body."""
        try:
            await self.slots.acquire()
        except BaseException:   # cancelled while all streams were busy: its reservation is given up
            if self.reserved:
                self.reserved -= 1
                self._close_if_drained()
            raise
        if self.reserved:   # (take_stream's reservation: this request is it; from here on it counts as active)
            self.reserved -= 1
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
                if self.draining:
                    self._close_if_drained()
            raise H2UpstreamReset(f"upstream h2c: {err}", before_response=True, refused=True) from None
        sender = None
        if body is not None:
            sender = asyncio.get_running_loop().create_task(self._send(sid, body, trailers))
        try:
            st.head = asyncio.get_running_loop().create_future()
            head = await st.head
            if head is None:
                if st.refused:   # our own reset: the head was over the limits
                    raise H2UpstreamReset(f"upstream {st.refused}", before_response=True, protocol_error=st.refused)
                code = st.reset
                refused = code == ErrorCodes.REFUSED_STREAM
                # conn.error: why we ended the connection ourselves (a limit: an HPACK bomb, a flood), if we did.
                why = f": {conn.error}" if conn.error else ""
                raise H2UpstreamReset(f"upstream reset before the response (code {code}){why}",
                                      before_response=True, refused=refused)
            return H2Response(self, sid, head, sender)
        except BaseException:
            if sender is not None and not sender.done():
                sender.cancel()
            conn.reset(sid, ErrorCodes.CANCEL)
            self.release(sid)
            raise

    async def _send(self, sid: int, body: bytes | AsyncIterable[bytes], trailers: RequestTrailers) -> None:
        """The request body (then its trailers) on stream ``sid``. END_STREAM rides on the last DATA frame
        whenever the end is known there: a whole (buffered) body without trailers, or a streamed chunk after
        which the source says it has ended (``at_end()``, e.g. ``H2Body``: the client's own END_STREAM came with
        that chunk). Otherwise — the end learnt only after the last chunk went — it is an empty DATA frame
        with END_STREAM, or the trailers' HEADERS. Nothing waits for a lookahead: each chunk goes as it comes."""
        conn = self.conn
        try:
            if isinstance(body, (bytes, bytearray, memoryview)):
                if trailers:
                    await conn.write(sid, body)
                    self._end(sid, trailers)
                else:
                    await conn.write(sid, body, end=True)
                return
            source = body.__aiter__()
            at_end = getattr(source, "at_end", None)
            while True:
                try:
                    chunk = await source.__anext__()
                except StopAsyncIteration:
                    break
                except OSError:
                    # The body source failed: the client reset its stream, or its connection ended (our
                    # GOAWAY on a protocol error cuts every stream without cancelling the handlers). The
                    # upstream must see a reset, never a request left open or a short one that looks
                    # complete; the response reader then reports the reset.
                    conn.reset(sid, ErrorCodes.CANCEL)
                    return
                if not chunk:
                    continue
                if at_end is not None and at_end():
                    if callable(trailers):
                        trailers = trailers()   # (known: the source has ended)
                    if not trailers:
                        await conn.write(sid, chunk, end=True)
                        return
                    await conn.write(sid, chunk)
                    break
                await conn.write(sid, chunk)
            self._end(sid, trailers)
        except OSError:
            return   # the upstream stream is gone: reading the response reports it
        except BaseException:
            # We were cancelled (or the body source failed otherwise): the upstream must see a reset.
            conn.reset(sid, ErrorCodes.CANCEL)
            raise

    def _end(self, sid: int, trailers: RequestTrailers) -> None:
        """END_STREAM after the body's last DATA frame: the trailers' HEADERS, or an empty DATA frame."""
        if callable(trailers):
            trailers = trailers()
        try:
            self.conn.end(sid, h2_trailer_fields(trailers) if trailers else ())
        except OSError:
            # END_STREAM (or the trailers) could not go: never leave the upstream request open.
            self.conn.reset(sid, ErrorCodes.CANCEL)

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


# A request's trailer fields for ``H2Upstream.request``: the fields, or a function giving them once the
# (streamed) body has ended.
RequestTrailers = Iterable[tuple[bytes, bytes]] | Callable[[], Iterable[tuple[bytes, bytes]]]


class H2UpstreamPool:
    """Upstream h2c connections, one per endpoint key, shared by all requests to that endpoint.

    ``connect(key, dial)`` returns the live connection, or dials one: requests that arrive while that
    dial is in flight wait for it rather than dialing again (as ``hbone.pool.HbonePool`` merges opens,
    and Envoy's HTTP/2 pool queues pending requests on its one connecting client), and a failed dial
    fails every one of them with the dial's own error (``OriginateFailed``: the router's retry policy
    sees a connect-failure). A waiter's cancellation (its route timeout) never cancels the shared dial.
    ``get``/``add`` remain for callers that dial themselves (concurrent ``add``s keep the first
    connection and close the others)."""

    def __init__(self, max_streams: int = UPSTREAM_MAX_STREAMS, *, limits: H2Limits = DEFAULT_H2_LIMITS):
        self.conns: dict[str, H2Upstream] = {}
        self.max_streams = max_streams
        self.limits = limits
        self.opened = 0
        self.dials = 0   # dials started by connect(), for tests and metrics
        self._dials: dict[str, asyncio.Task] = {}
        # Connections that took their last stream (maxRequestsPerConnection), still finishing: closed by close().
        self._draining: set[H2Upstream] = set()

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
        up = self.conns[key] = H2Upstream(stream, max_streams=self.max_streams, limits=self.limits)
        self.opened += 1
        return up

    async def connect(self, key: str, dial: Callable[[], Awaitable[ByteStream]], *,
                      max_requests: int = 0) -> H2Upstream:
        """The live connection for ``key``; else one dial (``dial()``) shared by every concurrent caller.
        ``max_requests`` (DestinationRule maxRequestsPerConnection; 0: unlimited): the returned connection has
        one of its streams reserved for the caller; the one whose reservation reaches the limit leaves the pool
        (DRAINING: it finishes its streams, then closes) and the next caller gets a new connection."""
        if max_requests:
            return await self._connect_limited(key, dial, max_requests)
        while True:
            up = self.get(key)
            if up is not None:
                return up
            task = self._dials.get(key)
            if task is not None and task.done():
                # Finished, but its done-callback has not run yet (awaiting a done task does not yield):
                # its connection, if any, is in self.conns and was found dead above, so dial afresh.
                del self._dials[key]
                task = None
            if task is None:
                task = asyncio.get_running_loop().create_task(self._dial(key, dial))
                self._dials[key] = task
                task.add_done_callback(lambda t, k=key: self._dial_done(k, t))
            up = await asyncio.shield(task)   # the dial's error, if it failed, is raised here
            if up.alive:
                return up

    async def _connect_limited(self, key, dial: Callable[[], Awaitable[ByteStream]], max_requests: int) -> H2Upstream:
        while True:
            up = await self.connect(key, dial)
            if up.take_stream(max_requests):   # (no await between: nobody else can take it meanwhile)
                if up.draining and self.conns.get(key) is up:
                    del self.conns[key]
                    self._draining = {u for u in self._draining if u.alive}
                    self._draining.add(up)
                return up
            # Drained by a caller that shared its dial: a new connection.
            if self.conns.get(key) is up:
                del self.conns[key]

    async def _dial(self, key: str, dial: Callable[[], Awaitable[ByteStream]]) -> H2Upstream:
        self.dials += 1
        return self.add(key, await dial())

    def _dial_done(self, key: str, task: asyncio.Task) -> None:
        if self._dials.get(key) is task:
            del self._dials[key]
        if not task.cancelled():
            task.exception()   # retrieved here; every waiter re-raises it through shield()

    async def close(self) -> None:
        dials, self._dials = list(self._dials.values()), {}
        for task in dials:
            task.cancel()
        if dials:
            await asyncio.gather(*dials, return_exceptions=True)
        conns, self.conns = list(self.conns.values()), {}
        draining, self._draining = list(self._draining), set()
        for up in conns + draining:
            await up.close()

    def __repr__(self) -> str:
        return f"<H2UpstreamPool conns={len(self.conns)} opened={self.opened} dialing={len(self._dials)}>"


__all__ = ["H2Core", "H2cConn", "H2cError", "H2cStreamClosed", "H2Limits", "DEFAULT_H2_LIMITS", "H2Request",
           "H2Responder", "serve_h2c", "H2Upstream", "H2UpstreamPool", "H2Response", "H2UpstreamReset",
           "Headers", "Data", "Trailers", "Ended", "Reset", "WindowOpened", "Terminated", "Refused", "Rejected",
           "MAX_CONCURRENT_STREAMS", "MAX_HEADER_LIST_BYTES", "STREAM_WINDOW_BYTES", "CONNECTION_WINDOW_BYTES",
           "UPSTREAM_MAX_STREAMS", "CONNECTION_SPECIFIC", "MAX_HEADERS", "HEADER_LIST_HARD_BYTES",
           "HEADER_BLOCK_MAX_BYTES", "MAX_FRAME_BYTES", "PREMATURE_RESET_TOTAL_STREAM_COUNT",
           "PREMATURE_RESET_MIN_STREAM_LIFETIME_S", "STREAM_FLUSH_TIMEOUT_S", "H2C_FLOOD_SETTINGS",
           "h2_trailer_fields", "RequestTrailers"]
