"""HBONE's sans-IO core: HTTP/2 CONNECT tunnels on top of h2, no sockets, no event loop.

Bytes in (`receive_data`) → events out; after every call the shell writes `data_to_send()`.
The core owns h2's state and both directions of flow control:

- Receive: DATA is acknowledged only when the shell calls `ack(stream_id, n)`, i.e. when the bytes
  were consumed (written onward). That is the backpressure of DESIGN §3: a slow reader stalls its
  own stream's window, never the proxy's memory.
- Send: `send()` queues bytes per stream; `flush()` turns as much as the peer's windows allow into
  DATA frames (up to the peer's max frame size). `pending(stream_id)` is what a shell's `drain()`
  compares with its bound. `end_stream()` sends END_STREAM once the queue is empty (half-close).

ztunnel semantics kept here: RST_STREAM NO_ERROR/CANCEL is a clean end (`StreamReset.clean`);
error answers are HEADERS with END_STREAM; a malformed request is a 400 on that stream (h2's own
request validation is off, so one bad request cannot kill the other tunnels on the connection);
protocol violations end the connection with GOAWAY and a `ConnectionTerminated` event — never an
exception out of `receive_data`.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass

import h2.events as ev
import h2.exceptions
from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.settings import SettingCodes, Settings

from hbone import _h2fast
from hbone.connect import ConnectRequest
from hbone.errors import HboneError
from hbone.limits import Abuse, InboundGuard
from hbone.settings import H2_STREAM_BACKSTOP_FACTOR, HboneSettings

__all__ = [
    "Event", "TunnelRequested", "RequestRejected", "TunnelResponse", "Data", "StreamEnded",
    "StreamReset", "ConnectionTerminated", "PingAcked", "SettingsChanged", "StreamRefused",
    "ServerCore", "ClientCore", "ErrorCodes", "TunnelState", "header_list_size",
]

# RFC 9113 §6.9.2: the connection window starts at 65 535 whatever SETTINGS say; only a
# WINDOW_UPDATE on stream 0 raises it (h2: `increment_flow_control_window(n)`).
_H2_DEFAULT_CONNECTION_WINDOW = 65535
# RST_STREAM codes ztunnel treats as a clean end of the stream (src/proxy/h2.rs).
_CLEAN_RESET_CODES = frozenset({ErrorCodes.NO_ERROR, ErrorCodes.CANCEL})


# ---- events ------------------------------------------------------------------------------------

class Event:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class TunnelRequested(Event):
    """Server: a valid CONNECT arrived; answer it with `respond()`."""
    stream_id: int
    request: ConnectRequest


@dataclass(frozen=True, slots=True)
class RequestRejected(Event):
    """Server: a CONNECT was malformed and the core already answered `status` (for logs/metrics)."""
    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class TunnelResponse(Event):
    """Client: the answer to our CONNECT. 200 opens the tunnel; anything else ends it."""
    stream_id: int
    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Data(Event):
    """Tunnel bytes. `flow_len` is what the shell must `ack()` once consumed (padding, if the
    peer sent any, was acknowledged by the core on receipt)."""
    stream_id: int
    data: bytes
    flow_len: int


@dataclass(frozen=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed (END_STREAM): read EOF on this stream; we may still send."""
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset(Event):
    """RST_STREAM from the peer. `clean` (NO_ERROR/CANCEL) reads as EOF, else as an abort."""
    stream_id: int
    code: int

    @property
    def clean(self) -> bool:
        return self.code in _CLEAN_RESET_CODES


@dataclass(frozen=True, slots=True)
class ConnectionTerminated(Event):
    """GOAWAY received (or sent by us on a protocol error or abuse). Streams above
    `last_stream_id` were never processed by the peer; no new streams may be opened on this
    connection. `reason` names why we sent it (hbone/limits.py `Abuse.reason`, or
    `protocol_error`); empty when the peer sent it."""
    code: int
    last_stream_id: int
    by_peer: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class StreamRefused(Event):
    """Server: a new stream was refused with RST_STREAM `code` (REFUSED_STREAM: over the
    concurrent-stream or pending-tunnel limit; the client may retry it, RFC 9113 §8.7)."""
    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class PingAcked(Event):
    data: bytes


@dataclass(frozen=True, slots=True)
class SettingsChanged(Event):
    """The peer's SETTINGS arrived (the first one completes the handshake)."""
    max_concurrent_streams: int


# ---- tunnel state (server side), a table ------------------------------------------------------

class TunnelState(enum.Enum):
    REQUESTED = "requested"   # CONNECT received, not answered
    OPEN = "open"             # 200 sent
    ANSWERED = "answered"     # error status sent with END_STREAM: finished


class _Act(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"


# A missing pair (answering twice, answering an unknown stream) is a bug: respond() raises.
_TUNNEL_TRANSITIONS: dict[tuple[TunnelState, _Act], TunnelState] = {
    (TunnelState.REQUESTED, _Act.ACCEPT): TunnelState.OPEN,
    (TunnelState.REQUESTED, _Act.REJECT): TunnelState.ANSWERED,
}


# ---- the core ----------------------------------------------------------------------------------

# RFC 9110 §5.1 token characters, lowercase (RFC 9113 §8.2.1: field names must be lowercase).
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _check_response_header(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """What h2's outbound validation would have checked, for the (rare) extra response headers:
    a lowercase token name that is not a pseudo-header or connection-specific (RFC 9113 §8.2.2), and
    a value without CR, LF or NUL (§8.2.1)."""
    if not name or not _TOKEN_CHARS.issuperset(name) or name in (
            b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"):
        raise ValueError(f"response header name {name!r} is not allowed")
    if b"\r" in value or b"\n" in value or b"\0" in value:
        raise ValueError(f"response header {name.decode()} has a forbidden character")
    return name, value.strip(b" \t")


class _Core:
    """What client and server share: h2 set-up with ztunnel's settings, send queues, acks."""

    client_side: bool

    def __init__(self, settings: HboneSettings = HboneSettings()):
        _h2fast.install()
        self.settings = settings
        config = H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            # Server: request validation is ours (ConnectRequest.from_h2_headers) so that a bad
            # request is a 400 on its stream; h2 would make it a connection error.
            validate_inbound_headers=self.client_side,
            normalize_inbound_headers=self.client_side,
            # Server: what we send is ":status" plus headers `respond` has already lowercased and
            # checked (_check_response_header), so h2's per-header validation and normalisation
            # of our own answer is pure overhead on every tunnel (previous perf round's profile).
            validate_outbound_headers=self.client_side,
            normalize_outbound_headers=self.client_side,
        )
        self._h2 = _h2fast.H2Connection(config=config)
        _h2fast.allow_streams_after_goaway(self._h2)
        # Bulk DATA frames become our Data events directly (hbone/_h2fast.py 5b.; no padding there,
        # so flow_len is the payload length, as _translate would compute). PERF NOTE (/tmp/hb7/
        # core_up.py: ServerCore alone, 16 x 16 KiB DATA frames per call, acked): with 5b., 4.62 -> 2.37 us
        # per frame against the session's starting tree.
        self._h2.data_event = Data
        header_list = (settings.client_max_header_list_size if self.client_side
                       else settings.server_max_header_list_size)
        initial = {
            SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: header_list,
            SettingCodes.ENABLE_PUSH: 0,  # ztunnel: enable_push(false); we never push either
        }
        if not self.client_side:
            initial[SettingCodes.MAX_CONCURRENT_STREAMS] = settings.server_max_concurrent_streams
        self._h2.local_settings = Settings(client=self.client_side, initial_values=initial)
        # performance.md pitfall: replacing local_settings leaves max_inbound_frame_size at 16 384,
        # so a peer honouring our advertised 1 MiB frames would get FRAME_SIZE_ERROR.
        self._h2.max_inbound_frame_size = settings.max_frame_size
        self._h2.initiate_connection()
        # Settings alone do not raise the connection window (RFC 9113 §6.9.2).
        extra = settings.connection_window - _H2_DEFAULT_CONNECTION_WINDOW
        if extra > 0:
            self._h2.increment_flow_control_window(extra)
        self.data_frames_sent = 0  # DATA frames framed by flush() (abuse ratios; stats)
        self._queues: dict[int, deque[bytes | memoryview]] = {}
        self._queued: dict[int, int] = {}
        self._eof_after_queue: set[int] = set()
        self.goaway_sent = False
        self.goaway_received = False
        self.closed = False  # connection-level failure or GOAWAY exchange finished
        self.peer_settings_received = False

    # -- introspection --
    @property
    def h2(self):
        """The h2 connection, for read-only inspection (tests assert the live settings)."""
        return self._h2

    @property
    def peer_max_concurrent_streams(self) -> int:
        return self._h2.remote_settings.max_concurrent_streams

    def pending(self, stream_id: int) -> int:
        """Bytes queued by `send()` on this stream that are not yet in DATA frames."""
        return self._queued.get(stream_id, 0)

    def stream_closed(self, stream_id: int) -> bool:
        """Both directions finished (or reset) as far as HTTP/2 is concerned."""
        stream = self._h2.streams.get(stream_id)
        return stream is None or stream.closed

    def send_window(self, stream_id: int) -> int:
        try:
            return self._h2.local_flow_control_window(stream_id)
        except h2.exceptions.H2Error:
            return 0

    # -- bytes in / out --
    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def receive_data(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.H2Error as err:
            # h2 has queued GOAWAY with the right code (e.g. FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR).
            self.closed = True
            self._drop_all_queues()
            code = getattr(err, "error_code", None) or ErrorCodes.PROTOCOL_ERROR
            reason = ("header_list_too_large" if isinstance(err, h2.exceptions.DenialOfServiceError)
                      else "protocol_error")
            return [ConnectionTerminated(int(code), self._h2.highest_inbound_stream_id, False, reason)]
        out: list[Event] = []
        for event in h2_events:
            if event.__class__ is Data:  # made by _h2fast's bulk DATA path (h2.data_event below)
                out.append(event)
            else:
                self._translate(event, out)
        return out

    def _translate(self, event: ev.Event, out: list[Event]) -> None:
        cls = event.__class__
        if cls is ev.DataReceived:
            data = event.data
            padding = event.flow_controlled_length - len(data)
            if padding:
                self.ack(event.stream_id, padding)  # padding is never "consumed" by anyone
            if data:
                out.append(Data(event.stream_id, data, len(data)))
        elif cls is ev.WindowUpdated:
            pass  # the shell flushes after every receive
        elif cls is ev.StreamEnded:
            # h2 reports END_STREAM both on the carrying event (.stream_ended) and as this
            # standalone event; we translate only the standalone one.
            out.append(StreamEnded(event.stream_id))
        elif cls is ev.RequestReceived:
            self._on_request(event, out)
        elif cls is ev.ResponseReceived:
            self._on_response(event, out)
        elif cls is ev.StreamReset:
            self._drop_queue(event.stream_id)
            out.append(StreamReset(event.stream_id, int(event.error_code)))
            self._on_reset(event.stream_id, out)
        elif cls is ev.RemoteSettingsChanged:
            self.peer_settings_received = True
            out.append(SettingsChanged(self._h2.remote_settings.max_concurrent_streams))
        elif cls is ev.ConnectionTerminated:
            self.goaway_received = True
            out.append(ConnectionTerminated(int(event.error_code), event.last_stream_id or 0, True))
        elif cls is ev.PingAckReceived:
            out.append(PingAcked(event.ping_data))
        # SettingsAcknowledged, PingReceived (h2 answers it), TrailersReceived (a tunnel has no
        # trailers; StreamEnded follows), PriorityUpdated, InformationalResponseReceived,
        # UnknownFrameReceived, AlternativeServiceAvailable: nothing to do.

    def _on_request(self, event: ev.RequestReceived, out: list[Event]) -> None:
        self._protocol_violation(out, "a client received a request")

    def _on_reset(self, stream_id: int, out: list[Event]) -> None:
        pass

    def _on_response(self, event: ev.ResponseReceived, out: list[Event]) -> None:
        self._protocol_violation(out, "a server received a response")

    def _protocol_violation(self, out: list[Event], _why: str) -> None:
        self.close_connection(ErrorCodes.PROTOCOL_ERROR)
        out.append(ConnectionTerminated(int(ErrorCodes.PROTOCOL_ERROR),
                                        self._h2.highest_inbound_stream_id, False))

    # -- flow control --
    def ack(self, stream_id: int, n: int) -> bool:
        """The shell consumed `n` flow-controlled bytes of this stream: hand window back.
        h2's WindowManager batches: it emits WINDOW_UPDATE once half a window was consumed.
        Returns True when that queued bytes to send (a WINDOW_UPDATE): only then is a flush due."""
        if n <= 0 or self.closed:
            return False
        h2c = self._h2
        before = len(h2c._data_to_send)
        try:
            h2c.acknowledge_received_data(n, stream_id)
        except h2.exceptions.H2Error:
            return False  # stream or connection already gone: nothing to hand back
        return len(h2c._data_to_send) != before

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue tunnel bytes; `flush()` frames them as windows allow."""
        if not data:
            return
        q = self._queues.get(stream_id)
        if q is None:
            q = self._queues[stream_id] = deque()
            self._queued[stream_id] = 0
        # bytes are kept as given (immutable: no copy); a bytearray/memoryview is copied, since the
        # caller may reuse its buffer after write() returns, as asyncio transports allow.
        if not isinstance(data, bytes):
            data = bytes(data)
        q.append(data)
        self._queued[stream_id] += len(data)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction (END_STREAM) once queued bytes are framed."""
        if self._queued.get(stream_id):
            self._eof_after_queue.add(stream_id)
            return
        try:
            self._h2.end_stream(stream_id)
        except h2.exceptions.H2Error:
            pass  # already ended or reset: half-close is then moot

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM (ztunnel and we treat CANCEL/NO_ERROR from the peer as a clean end)."""
        self._drop_queue(stream_id)
        try:
            self._h2.reset_stream(stream_id, error_code=code)
        except h2.exceptions.H2Error:
            pass  # already closed

    def flush(self, budget: int = 1 << 62) -> int:
        """Frame queued bytes as the windows allow, up to `budget` bytes. Returns bytes framed.
        Streams take turns (one frame each per round) so one bulk tunnel cannot starve others.

        PERF NOTE: the window is read from h2's stream object directly (what h2's
        local_flow_control_window returns, minus two method calls and its exception set-up); with
        7b. in hbone/_h2fast.py (DATA sent without h2's identity state transitions): see the PERF
        NOTE at SEND_FAST_PATH there for the measured gain."""
        queues = self._queues
        if not queues or self.closed:
            return 0
        h2c = self._h2
        max_frame = h2c.max_outbound_frame_size
        streams = h2c.streams
        queued = self._queued
        eof_after = self._eof_after_queue
        total = 0
        progress = True
        while progress and queues and total < budget:
            progress = False
            for sid in list(queues):
                q = queues[sid]
                stream = streams.get(sid)
                if stream is None:  # closed or unknown: h2's local_flow_control_window would raise
                    self._drop_queue(sid)
                    continue
                window = h2c.outbound_flow_control_window
                if stream.outbound_flow_control_window < window:
                    window = stream.outbound_flow_control_window
                if window <= 0:
                    continue
                n = min(window, max_frame, budget - total)
                head = q[0]
                if len(head) > n:
                    view = head if isinstance(head, memoryview) else memoryview(head)
                    chunk, q[0] = view[:n], view[n:]
                else:
                    chunk = q.popleft()
                    # Coalesce small queued writes into one frame, up to n.
                    if q and len(chunk) < n:
                        parts = [chunk]
                        size = len(chunk)
                        while q and size + len(q[0]) <= n:
                            part = q.popleft()
                            parts.append(part)
                            size += len(part)
                        chunk = b"".join(parts)
                size = len(chunk)
                # The last queued bytes of a half-closed direction carry END_STREAM themselves:
                # one DATA frame instead of DATA + an empty DATA(END_STREAM). PERF NOTE: short
                # tunnels (the sink answers 1 KiB then FIN) save an h2 end_stream call and a frame.
                last = not q and sid in eof_after
                try:
                    h2c.send_data(sid, chunk, end_stream=last)
                except h2.exceptions.H2Error:
                    self._drop_queue(sid)
                    continue
                total += size
                self.data_frames_sent += 1
                progress = True
                if not q:
                    del queues[sid]
                    del queued[sid]
                    if last:
                        eof_after.discard(sid)
                else:
                    queued[sid] -= size
                if total >= budget:
                    break
        return total

    def _drop_queue(self, stream_id: int) -> None:
        self._queues.pop(stream_id, None)
        self._queued.pop(stream_id, None)
        self._eof_after_queue.discard(stream_id)

    def _drop_all_queues(self) -> None:
        self._queues.clear()
        self._queued.clear()
        self._eof_after_queue.clear()

    # -- connection --
    def ping(self, opaque: bytes) -> None:
        if self.closed:
            return
        try:
            self._h2.ping(opaque)
        except h2.exceptions.H2Error:
            # h2 sends nothing more on this connection (its state machine went CLOSED, e.g. the GOAWAY
            # before the first stream that fuzzing found): it is over, as for a connection error. Raising
            # here would escape the shell's keepalive timer, which would then never run again.
            self.closed = True
            self._drop_all_queues()

    def goaway(self, code: int = ErrorCodes.NO_ERROR) -> None:
        """Graceful shutdown (RFC 9113 §6.8): tell the peer the last stream we will process.
        Streams it opens afterwards are refused (REFUSED_STREAM) and may be retried elsewhere."""
        if self.goaway_sent or self.closed:
            return
        self.goaway_sent = True
        self._h2.close_connection(error_code=code, last_stream_id=self._h2.highest_inbound_stream_id)

    def close_connection(self, code: int = ErrorCodes.NO_ERROR) -> None:
        if self.closed:
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            try:
                self._h2.close_connection(error_code=code)
            except h2.exceptions.H2Error:
                pass
        self.closed = True
        self._drop_all_queues()


class ServerCore(_Core):
    """The terminating side (port 15008): validates CONNECTs, answers them."""

    client_side = False

    def __init__(self, settings: HboneSettings = HboneSettings(), *, clock=time.monotonic):
        super().__init__(settings)
        self._tunnels: dict[int, TunnelState] = {}
        self._pending: set[int] = set()  # streams in TunnelState.REQUESTED
        self.clock = clock
        self.guard = InboundGuard(settings)
        self.abuse: Abuse | None = None
        # HPACK decoding stops (h2 DenialOfServiceError → GOAWAY ENHANCE_YOUR_CALM) only at the
        # hard limit, so a list between the advertised SETTINGS_MAX_HEADER_LIST_SIZE and it can
        # still be answered 431 on its stream. h2 sets its decoder only from *changed* local
        # settings; our initial values never change, so this stays.
        self._h2.decoder.max_header_list_size = settings.header_list_hard_limit
        self._advertised_streams = settings.server_max_concurrent_streams
        self._stream_backstop = settings.server_max_concurrent_streams * H2_STREAM_BACKSTOP_FACTOR

    def receive_data(self, data: bytes, now: float | None = None) -> list[Event]:
        if self.closed:
            return []
        abuse = self.guard.feed(data, self.clock() if now is None else now)
        if abuse is not None:
            return self._shut_for(abuse)
        # h2 refuses a stream over local_settings.max_concurrent_streams with a connection error.
        # While it reads, it enforces a backstop above what we advertised, so the stream over our
        # advertised limit reaches _on_request and is refused alone (REFUSED_STREAM); outside
        # this call local_settings shows what we advertised. Settings.acknowledge() commits the
        # value without sending a SETTINGS frame (h2's public Settings API).
        ls = self._h2.local_settings
        values = ls._settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        if values is not None and len(values) == 1:
            # No local change pending (the core never makes one after start): the committed value is
            # values[0] (h2 4.4.1 Settings keeps [committed, pending...] per setting), which is exactly
            # what set + acknowledge() leave there. PERF NOTE: the two set + acknowledge pairs were
            # 2.1 us per received chunk (timeit), every request's at low concurrency.
            values[0] = self._stream_backstop
            try:
                events = super().receive_data(data)
            finally:
                values[0] = self._advertised_streams
        else:
            ls[SettingCodes.MAX_CONCURRENT_STREAMS] = self._stream_backstop
            ls.acknowledge()
            try:
                events = super().receive_data(data)
            finally:
                ls[SettingCodes.MAX_CONCURRENT_STREAMS] = self._advertised_streams
                ls.acknowledge()
        if self.abuse is not None and not self.closed:
            return events + self._shut_for(self.abuse)
        return events

    def _shut_for(self, abuse: Abuse) -> list[Event]:
        """GOAWAY with the abuse's code; the shell closes the connection."""
        self.abuse = abuse
        self.close_connection(abuse.code)
        return [ConnectionTerminated(int(abuse.code), self._h2.highest_inbound_stream_id, False, abuse.reason)]

    def flush(self, budget: int = 1 << 62) -> int:
        before = self.data_frames_sent
        n = super().flush(budget)
        if self.data_frames_sent != before:
            self.guard.data_frame_sent(self.data_frames_sent - before)
        return n

    def _premature(self) -> None:
        verdict = self.guard.premature_reset(self.clock())
        if verdict is not None and self.abuse is None:
            self.abuse = verdict

    def _on_reset(self, stream_id: int, out: list[Event]) -> None:
        # Reset by the client before we answered: the rapid-reset pattern (CVE-2023-44487).
        if self._tunnels.get(stream_id) is TunnelState.REQUESTED:
            self._premature()

    def _refuse(self, sid: int, reason: str, out: list[Event]) -> None:
        self.reset(sid, ErrorCodes.REFUSED_STREAM)
        out.append(StreamRefused(sid, int(ErrorCodes.REFUSED_STREAM), reason))
        self._premature()  # a client that keeps overrunning our limits is resetting streams too

    def _on_request(self, event: ev.RequestReceived, out: list[Event]) -> None:
        sid = event.stream_id
        if self.goaway_sent:
            # After our GOAWAY, new streams are refused; RFC 9113 §8.7: REFUSED_STREAM means the
            # request was not processed and can be retried.
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        if len(self._tunnels) >= self._advertised_streams:
            # RFC 9113 §5.1.2: over SETTINGS_MAX_CONCURRENT_STREAMS → REFUSED_STREAM, this stream
            # only. Counted on our tunnels (live until the shell forgets them), not h2's open
            # streams: h2 has already read the whole chunk, later HEADERS included.
            self._refuse(sid, "max_concurrent_streams", out)
            return
        if len(self._pending) >= self.settings.max_pending_tunnels:
            self._refuse(sid, "max_pending_tunnels", out)
            return
        size = header_list_size(event.headers)
        if size > self.settings.server_max_header_list_size:
            # RFC 6585 §5 431 Request Header Fields Too Large; the connection keeps serving.
            self._answer_error(sid, 431)
            out.append(RequestRejected(sid, 431, f"header list of {size} bytes over "
                                                 f"{self.settings.server_max_header_list_size}"))
            return
        try:
            request = ConnectRequest.from_h2_headers(event.headers)
        except HboneError as err:
            self._answer_error(sid, err.status)
            out.append(RequestRejected(sid, err.status, err.reason))
            return
        self._tunnels[sid] = TunnelState.REQUESTED
        self._pending.add(sid)
        out.append(TunnelRequested(sid, request))

    def _answer_error(self, sid: int, status: int) -> None:
        # ztunnel H2Request::send_error: HEADERS with END_STREAM, no body.
        try:
            self._h2.send_headers(sid, [(b":status", str(status).encode())], end_stream=True)
        except h2.exceptions.H2Error:
            return
        # The client may still be sending on its side; we will never read it. RFC 9113 §8.1:
        # a server may RST_STREAM(NO_ERROR) after a complete response to stop the upload.
        stream = self._h2.streams.get(sid)
        if stream is not None and not stream.closed:
            self.reset(sid, ErrorCodes.NO_ERROR)

    def tunnel_state(self, stream_id: int) -> TunnelState | None:
        return self._tunnels.get(stream_id)

    def respond(self, stream_id: int, status: int, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """200 opens the tunnel; any other status ends the stream (HEADERS + END_STREAM)."""
        state = self._tunnels.get(stream_id)
        act = _Act.ACCEPT if status == 200 else _Act.REJECT
        nxt = _TUNNEL_TRANSITIONS.get((state, act)) if state is not None else None
        if nxt is None:
            raise RuntimeError(f"stream {stream_id}: cannot {act.value} in state {state}")
        self._pending.discard(stream_id)
        if nxt is TunnelState.ANSWERED:
            del self._tunnels[stream_id]
            self._answer_error(stream_id, status)
            return
        # Extra headers are checked before any state changes: a bad one leaves the tunnel unanswered.
        block = [(b":status", b"200")]
        for k, v in headers:
            block.append(_check_response_header(k.lower().encode(), v.encode("latin-1")))
        self._tunnels[stream_id] = nxt
        try:
            if len(block) == 1:
                # PERF NOTE: the plain 200 of almost every tunnel is framed by hbone/_h2fast.py (4.).
                # With the server's outbound validation off (above) and 200s flushed once per loop
                # turn (server.py answer): short tunnels (/tmp/perf/prof_relay.py short 3000 —
                # benchmarks.relay in-process, CONNECT + 1 KiB each way, 64 in flight, rusage) went
                # ~153 → ~140 µs proxy CPU per stream on this 2-core machine.
                self._h2.send_response_200(stream_id)
            else:
                self._h2.send_headers(stream_id, block)
        except h2.exceptions.H2Error:
            pass  # the client reset the stream meanwhile; its StreamReset event says so

    def forget(self, stream_id: int) -> None:
        """The shell is done with this stream (both directions ended or reset)."""
        self._tunnels.pop(stream_id, None)
        self._pending.discard(stream_id)
        self._drop_queue(stream_id)

    @property
    def pending_tunnels(self) -> int:
        """CONNECTs received and not yet answered."""
        return len(self._pending)


def header_list_size(headers) -> int:
    """RFC 9113 §6.5.2 SETTINGS_MAX_HEADER_LIST_SIZE: "the uncompressed size of header fields,
    including the length of the name and value in octets plus an overhead of 32 octets for each"."""
    size = 0
    for k, v in headers:  # a loop, not sum() over a generator: one call less per request
        size += len(k) + len(v) + 32
    return size


class ClientCore(_Core):
    """The originating side: opens CONNECT streams and reads their answers."""

    client_side = True

    def open_tunnel(self, request: ConnectRequest) -> int:
        """Send the CONNECT; returns the stream id. The answer arrives as TunnelResponse."""
        if self.goaway_received or self.goaway_sent or self.closed:
            raise h2.exceptions.ProtocolError("connection is going away")
        sid = self._h2.get_next_available_stream_id()
        block = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.to_h2_headers()]
        self._h2.send_headers(sid, block)
        return sid

    def _on_response(self, event: ev.ResponseReceived, out: list[Event]) -> None:
        status = 0
        headers = []
        for k, v in event.headers:
            k = k.decode("latin-1") if isinstance(k, bytes) else k
            v = v.decode("latin-1") if isinstance(v, bytes) else v
            if k == ":status":
                status = int(v) if v.isdigit() else 0
            elif not k.startswith(":"):
                headers.append((k, v))
        out.append(TunnelResponse(event.stream_id, status, tuple(headers)))
