"""The one place hbone/ touches h2/hyperframe internals (h2 pinned to 4.4.1 in pyproject.toml).

1. Eager frame repr. h2 4.4.1 `H2Connection._receive_frame` runs
   `self.config.logger.trace("Received frame: %s", repr(frame))` for every frame, even with the
   no-op logger, and hyperframe's `DataFrame` repr serializes the payload (a copy) and hex-encodes
   it before truncating. performance.md measured this as about half the CPU of an upload: removing
   it took a tuned relay from ~437 to ~880 MB/s. Measured here (2026-11, this machine, h2 alone
   receiving 256 x 1 MiB DATA frames): 358 MiB/s with the repr, 8 600 MiB/s without. We replace the DATA body repr with its length: the trace
   line stays informative, and costs nothing.

2. Graceful GOAWAY. h2 4.4.1's connection state machine moves to CLOSED on sending *or* receiving
   GOAWAY, after which every frame (DATA, WINDOW_UPDATE, RST_STREAM...) is a ProtocolError. RFC 9113
   §6.8 says the opposite: streams up to the last stream id "can still complete successfully", and
   graceful shutdown (DESIGN §7: GOAWAY, then let in-flight tunnels finish) depends on it.
   `allow_streams_after_goaway(conn)` gives one connection a transition table in which GOAWAY keeps
   the open (or, before the first stream, idle) state; the HBONE core itself refuses new streams after GOAWAY (client: no new CONNECT;
   server: REFUSED_STREAM) and stops on connection errors. Per instance, so other h2 users in the
   process keep h2's behaviour.

3. Stream counting. h2 counts open streams by scanning every stream each time one opens
   (`_open_streams`, also where it purges closed streams), so opening n streams on a connection is
   O(n^2). Measured here with our cores (sans-IO, limits raised): 1 000 / 4 000 / 8 000 streams in
   0.19 / 1.96 / 7.92 s CPU. `H2Connection` below keeps per-parity counts and re-checks only the
   streams touched since the last count (every call or received event naming a stream); a full
   scan still runs once per max(64, streams) opens as a safety net, so the cost is amortised O(1).

4. The 200 that opens a tunnel. `send_response_200` frames it directly: HPACK encodes `:status 200`
   as the static-table index 8 (RFC 7541 Appendix A), one byte 0x88 whatever the dynamic table
   holds, so no encoder state is involved — except a pending table-size update (RFC 7541 §4.2: it
   must open the next header block), in which case h2's own path runs. h2's state machines still
   make the same transitions (connection SEND_HEADERS, stream SEND_HEADERS), so h2 knows the
   response was sent. Measured (short tunnels, benchmarks/relay.py in-process, this 2-core machine):
   h2's `send_headers` was ~43 µs per stream under cProfile; see PERF NOTE in hbone/protocol.py.

5. DATA frames (the 16 KiB-frame peer's cost: 16 frames per 256 KiB read, each a hyperframe
   object, a flags set, a repr for the trace log, a dispatch). `receive_data` walks the frame
   headers itself; a complete, unpadded DATA frame on a stream h2 has open is handled with exactly
   h2's own steps (connection state RECV_DATA, connection window consumed, `H2Stream.receive_data`
   — stream state, stream window, content length, END_STREAM), so h2's state and flow-control
   accounting are unchanged. Everything else is handed to h2's `receive_data` in order. Measured
   (/tmp/perf/prof_relay.py: benchmarks.relay in-process, 1 GiB upload from the node-http2 client,
   16 KiB frames, this 2-core machine, medians of 3): 1.61 → 1.13 proxy CPU-s per GiB
   (667 → 950 MB per CPU-second; nghttpx ~840 in the same harness). Switched by DATA_FAST_PATH.

5b. Bulk DATA (no END_STREAM) on an open stream of an open connection, whose request had no
   content-length (a CONNECT tunnel never has one): h2's own steps reduce to two window
   accountings, the received-length count and a DataReceived event — the connection machine stays
   in its open state with no callback, the stream machine stays in OPEN/HALF_CLOSED_LOCAL and only
   checks that headers came first (`headers_received`). Those are done here directly, without the
   two state-machine lookups (each hashes Python-level Enum members) and the event plumbing;
   an END_STREAM frame, or any other state, takes 5. as before. With `data_event` set (the HBONE
   core sets its `Data` event class), the event made is the core's own, not h2's DataReceived
   (the core passes it through untranslated), and a frame with END_STREAM takes this path too:
   the stream machine then gets RECV_END_STREAM (h2's own transition and StreamEnded event) — its
   RECV_DATA transition, an identity in these states, is what is skipped. Measured: see PERF NOTE
   at DATA_FAST_PATH.

6. The HEADERS that open a tunnel (a short tunnel's first cost). In the same walk as 5., a complete
   HEADERS frame with END_HEADERS and neither PADDED nor PRIORITY that opens a new client stream is
   handled with exactly h2's `_receive_headers_frame` steps (stream limit, HPACK decode with h2's
   own decoder and error mapping, connection RECV_HEADERS, `_begin_new_stream`,
   `H2Stream.receive_headers`), minus the FrameBuffer walk, the HeadersFrame/Flags objects and the
   eager `repr(frame)` of the trace log. Anything else (CONTINUATION, padding, priority, a known or
   lower stream id) is h2's. Switched by HEADERS_FAST_PATH.

7. Sending DATA (and handing window back). `send_data` / `end_stream` on an existing stream,
   without padding, make h2's state
   transitions (connection SEND_DATA; stream SEND_DATA and SEND_END_STREAM) and window accounting
   themselves and append the 9-byte frame header and the payload to h2's send buffer: no DataFrame,
   Flags or serialize(), and the payload is copied once instead of twice. Any case h2 would refuse
   (window, frame size, unknown stream, padding) goes to h2's own method, so its errors are h2's.
   `acknowledge_received_data` likewise asks h2's own window managers and frames the
   WINDOW_UPDATEs they ask for directly (9 + 4 bytes each). Switched by SEND_FAST_PATH.
   7b. On an open connection and an OPEN / HALF_CLOSED_REMOTE stream, h2's SEND_DATA transitions
   are identities without a callback (asserted against h2's tables at import), so `send_data`
   skips those two process_input calls; END_STREAM and every other state still go through them.
   7c. `acknowledge_received_data` tests h2's window-update rule (WindowManager._maybe_update_window)
   itself first: when it cannot hand window back, the acknowledgement is just added to the
   manager's processed bytes, as process_bytes would; otherwise h2's own process_bytes decides.

8. HPACK blocks of indexed fields only. A pooled client's CONNECTs to the same destination encode
   as a few one-byte indexed fields (RFC 7541 §6.1): after the first request, `:method CONNECT`
   and `:authority ip:port` are dynamic-table entries. Decoding such a block reads the table and
   changes nothing (no literal, no size update), so its result is a function of the bytes and the
   table. `_MemoDecoder` (h2's decoder object, class-swapped) remembers the headers of such blocks
   while the dynamic table is unchanged — a version counter on the table (`_CountingTable`) is
   bumped by every insertion and resize, and the memo is dropped when it moves. Any other block
   goes to hpack's own decode. Measured: hpack's decode of a 2-byte indexed block is 5.8 us.

10. Header blocks sent without Huffman coding. hpack Huffman-codes every literal in pure Python,
   and a CONNECT carries literals that are new on every tunnel (`traceparent`, and `forwarded` /
   `:authority` per client and destination), which the receiver must Huffman-decode, also in pure
   Python. RFC 7541 §5.2 lets each string be sent raw (H bit 0) and every decoder must accept both,
   so `_PlainEncoder` (h2's encoder object, class-swapped) encodes with `huffman=False`: the block
   is ~30 % larger (94 vs 73 bytes for a node's CONNECT with baggage, forwarded, traceparent), both
   ends do less. See the PERF NOTE at PLAIN_HEADER_STRINGS.

   Measured for 6. + 7. (/tmp/hb7/core_short.py: ServerCore alone, sans-IO, driven by an h2 client
   in-process, 64 short tunnels — CONNECT, 1 KiB each way, END_STREAM both ways — per batch, median
   of 5 x 6 400 tunnels, this 2-core machine): see PERF NOTE at HEADERS_FAST_PATH below.
"""

from __future__ import annotations

import struct

import hyperframe.frame
from hpack import Decoder, Encoder
from hpack.table import HeaderTable
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.connection import H2Connection as _H2Connection
from h2.connection import _decode_headers
from h2.events import DataReceived, TrailersReceived
from h2.exceptions import FlowControlError, ProtocolError, TooManyStreamsError
from h2.utilities import is_informational_response
from h2 import stream as _h2_stream
from h2.stream import StreamInputs, StreamState

_PATCHED = False
# 5. and 5b. below. PERF NOTE (5b. with the inline DATA check of hbone/limits.py InboundGuard.feed;
# /tmp/hb7/prof_relay.py upload 1 GiB, node-http2 client, 16 KiB frames, benchmarks.relay
# in-process, alternating with the session's starting tree, medians of 3, this 2-core machine):
# 1.25 -> 1.11 proxy CPU-s per GiB. With the core's data_event (5b., /tmp/hb7/core_up.py, ServerCore
# alone): 4.62 -> 2.37 us per 16 KiB frame; END_STREAM frames too: ~23.6 -> ~21.6 us per short
# tunnel (/tmp/hb7/core_short.py).
# tests/test_perf_h2data.py checks it against h2's own path event by event, and
# tests/test_perf_h2data.py::test_fast_path_is_on that it is in effect.
DATA_FAST_PATH = True
# 6. and 7. below; tests/test_perf_h2data.py compares each with h2's own path byte for byte.
# PERF NOTE (/tmp/hb7/core_short.py, see 6./7. in the module docstring): ServerCore CPU per short
# tunnel 41 -> 30 us (HEADERS alone: 41 -> 33.5; send alone: 41 -> 38).
HEADERS_FAST_PATH = True
# 9. below. PERF NOTE (/tmp/hb7/core_short.py with the flag off / on, alternating 3x, this 2-core
# machine): ServerCore per short tunnel 18.3-18.4 -> 17.2-17.5 us.
TRANSITION_FAST_PATH = True
# 7b. and 7c. (with the direct window read in hbone/protocol.py _Core.flush). PERF NOTE
# (/tmp/wph/core_rr.py: ServerCore alone, sans-IO, 64 open tunnels, per round one 200-byte DATA
# frame in and a 150-byte answer out per tunnel, acked, one flush; min of 9, alternating 2x with
# the previous tree, this 2-core machine): 3.79 / 3.97 -> 2.72 / 2.73 us per request-response.
# tests/test_perf_h2data.py test_acknowledgement_shortcut_matches_h2_through_empty_windows and
# test_send_shortcut_matches_h2_in_every_stream_state compare them with h2's own path.
SEND_FAST_PATH = True
# 8. below. PERF NOTE (/tmp/hb7/core_short.py): ServerCore CPU per short tunnel 27.8 -> 23.1 us.
HPACK_MEMO = True
# 10. above. PERF NOTE (/tmp/hpk.py: ClientCore.open_tunnel + framing, then ServerCore.receive_data,
# 3 000 CONNECTs with a node's baggage, forwarded and a fresh traceparent each, process time, two
# runs each, this 2-core machine): client 61.2 -> 46.8 us, server 53.1 -> 39.8 us per CONNECT.
# tests/test_hbone_h2fast.py checks the wire form and that h2's own decoder reads it back.
PLAIN_HEADER_STRINGS = True
# Distinct indexed-only blocks remembered per connection and table version (a node's destinations).
HPACK_MEMO_ENTRIES = 256
# One-byte indexed field representations (RFC 7541 §6.1): high bit set, index 1..126 (0 is an
# error, 127 starts a multi-byte integer). A block made only of these bytes is memoisable.
_INDEXED_ONE_BYTE = bytes(range(0x81, 0xFF))
_STATUS_200 = ((b":status", b"200"),)
# A HEADERS frame header (RFC 9113 §4.1): length 1 (24 bits), type HEADERS (0x1), flags END_HEADERS
# (0x4), then the stream id; the first 5 bytes are fixed.
_HEADERS_200 = struct.Struct(">5sL")
_HEADERS_200_PREFIX = b"\x00\x00\x01\x01\x04"
# RFC 9113 §4.1 frame header: 24-bit length (as 8 + 16 bits), type, flags, R + 31-bit stream id.
_FRAME_HEADER = struct.Struct(">BHBBL")
_END_STREAM, _PADDED = 0x1, 0x8  # DATA flags (RFC 9113 §6.1)
# HEADERS flags (RFC 9113 §6.2): END_HEADERS, PADDED, PRIORITY. The fast path takes END_HEADERS
# without the other two: (flags & _HEADERS_MASK) == _END_HEADERS.
_END_HEADERS, _HEADERS_MASK = 0x4, 0x4 | 0x8 | 0x20
_DATA_HEADER = struct.Struct(">BHBBL")  # = _FRAME_HEADER, for frames we build
# WINDOW_UPDATE (RFC 9113 §6.9): the frame header (length 4, type 0x8) and R + 31-bit increment.
_WINDOW_UPDATE = struct.Struct(">BHBBLL")
# Stream states in which h2 accepts DATA without an error (RECV_DATA is a valid input).
# A tuple, not a set: `in` compares by identity first, where a set would hash the Enum members with
# Enum's Python-level __hash__ (one call per DATA frame).
_RECV_DATA_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)
# Connection states in which RECV_DATA leaves the connection state machine where it is, with no
# side effect (h2 4.4.1 H2ConnectionStateMachine._transitions; also in _GRACEFUL_TRANSITIONS).
_OPEN_CONNECTION = (ConnectionState.SERVER_OPEN, ConnectionState.CLIENT_OPEN)
# 7b.: the states in which h2's SEND_DATA transition is an identity without a callback (checked
# against h2's tables at import, below), compared by identity: `in` a set would hash the Enum members
# with Enum's Python-level __hash__.
_SERVER_OPEN, _CLIENT_OPEN = ConnectionState.SERVER_OPEN, ConnectionState.CLIENT_OPEN
_STREAM_OPEN, _HALF_CLOSED_REMOTE = StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE
# The safety-net full scan runs after this many stream opens (or len(streams), if larger).
_FULL_SCAN_MIN_OPENS = 64


class H2Connection(_H2Connection):
    """h2's connection with O(1) amortised open-stream counting (see 3. above)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._hb_counts = [0, 0]  # streams in self.streams, by stream id parity
        self._hb_dirty: set[int] = set()  # streams that may have closed since the last count
        self._hb_opens = 0
        self._hb_server = not self.config.client_side
        # 5b.: a class the bulk DATA path builds instead of h2's DataReceived, called as
        # data_event(stream_id, data, flow_len): the HBONE core sets its own `Data` event here, so
        # the bulk of a tunnel's frames is one object each, not two and a translation.
        self.data_event = None
        if PLAIN_HEADER_STRINGS:  # 10. above: same encoder object and state, no Huffman coding
            self.encoder.__class__ = _PlainEncoder
        if HPACK_MEMO:  # 8. above: same decoder object and state, memoising subclass
            self.decoder.__class__ = _MemoDecoder
            self.decoder.header_table.__class__ = _CountingTable
            self.decoder._hb_memo = {}
            self.decoder._hb_memo_version = 0

    def _begin_new_stream(self, stream_id, allowed_ids):
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        self._hb_counts[stream_id & 1] += 1
        self._hb_opens += 1
        return stream

    def _open_streams(self, remainder: int) -> int:
        streams = self.streams
        if self._hb_opens >= max(_FULL_SCAN_MIN_OPENS, len(streams)):
            count = super()._open_streams(remainder)  # purges every closed stream
            self._hb_opens = 0
            self._hb_dirty.clear()
            odd = sum(sid & 1 for sid in streams)
            self._hb_counts = [len(streams) - odd, odd]
            return count
        closed = self._closed_streams
        for sid in self._hb_dirty:
            stream = streams.get(sid)
            if stream is not None and stream.closed:
                del streams[sid]
                closed[sid] = stream.closed_by
                self._hb_counts[sid & 1] -= 1
        self._hb_dirty.clear()
        # Streams still in the dict are open: h2 checks the limit before creating the new stream,
        # and with push disabled no stream sits in a reserved state.
        return self._hb_counts[remainder]

    def receive_data(self, data):
        buf = self.incoming_buffer
        if not DATA_FAST_PATH or buf._preamble_len or buf._headers_buffer:
            events = super().receive_data(data)  # preface or a header block in progress: h2 alone
        else:
            events = self._receive_with_data_fast_path(data)
        dirty = self._hb_dirty
        data_event = self.data_event
        for event in events:
            if event.__class__ is data_event:
                continue  # 5b.'s bulk DATA closes no stream (its END_STREAM comes as a StreamEnded too)
            sid = getattr(event, "stream_id", None)
            if sid:
                dirty.add(sid)
        return events

    def send_headers(self, stream_id, *args, **kwargs):
        self._hb_dirty.add(stream_id)
        return super().send_headers(stream_id, *args, **kwargs)

    def _receive_with_data_fast_path(self, data) -> list:
        """See 5. above. Complete DATA frames on open streams skip h2's frame objects; every other
        frame (and any DATA frame h2 must judge: padded, oversized, unknown or closing stream)
        goes through h2's own receive_data, in order, so h2 stays the only judge of errors."""
        buf = self.incoming_buffer
        if buf._data:  # a partial frame from the previous read: it is the head of this data
            data = bytes(buf._data) + data
            del buf._data[:]
        events: list = []
        n = len(data)
        i = 0
        slow = -1  # start of frames not yet handed to h2
        unpack = _FRAME_HEADER.unpack_from
        streams = self.streams
        max_size = self.max_inbound_frame_size
        data_event = self.data_event
        while i + 9 <= n:
            hi, lo, ftype, flags, sid = unpack(data, i)
            length = (hi << 16) | lo
            end = i + 9 + length
            if end > n:
                break  # partial frame: h2 buffers it below
            if ftype == 0:
                fast = not flags & _PADDED
            elif ftype == 1:
                fast = (flags & _HEADERS_MASK) == _END_HEADERS and HEADERS_FAST_PATH and self._hb_server
            else:
                fast = False
            if fast:
                if slow >= 0:
                    # Frames before this one first: they may change the stream's state. An error
                    # in them is h2's own (GOAWAY already queued by h2's receive_data).
                    events += super().receive_data(data[slow:i])
                    slow = -1
                    max_size = self.max_inbound_frame_size
                sid &= 0x7FFFFFFF
                try:
                    if ftype == 0:
                        stream = streams.get(sid)
                        if (stream is not None and stream.state_machine.state in _RECV_DATA_STATES
                                and length <= max_size and not buf._headers_buffer):
                            if ((data_event is not None or not flags & _END_STREAM)
                                    and self.state_machine.state in _OPEN_CONNECTION
                                    and stream.state_machine.headers_received
                                    and stream._expected_content_length is None):
                                # 5b. (see the module docstring): the bulk of a tunnel's DATA.
                                # WindowManager.window_consumed, inlined (its exact steps and error).
                                manager = self._inbound_flow_control_window_manager
                                manager.current_window_size -= length
                                if manager.current_window_size < 0:
                                    raise FlowControlError("Flow control window shrunk below 0")
                                manager = stream._inbound_window_manager
                                manager.current_window_size -= length
                                if manager.current_window_size < 0:
                                    raise FlowControlError("Flow control window shrunk below 0")
                                stream._actual_content_length += length
                                if data_event is None:
                                    events.append(DataReceived(stream_id=sid, data=data[i + 9:end],
                                                               flow_controlled_length=length))
                                elif length:  # the HBONE core's own event (see 5b.); the core
                                    # drops empty DATA as well (nothing to deliver or acknowledge)
                                    events.append(data_event(sid, data[i + 9:end], length))
                                if flags & _END_STREAM:  # only with data_event (see 5b.)
                                    events += _stream_step(stream.state_machine, StreamInputs.RECV_END_STREAM,
                                                           _K_RECV_END_STREAM)
                                i = end
                                continue
                            # h2's _receive_data_frame, minus the DataFrame it would have parsed
                            events += self.state_machine.process_input(ConnectionInputs.RECV_DATA)
                            self._inbound_flow_control_window_manager.window_consumed(length)
                            events += stream.receive_data(data[i + 9:end], bool(flags & _END_STREAM), length)[1]
                            i = end
                            continue
                    elif (sid & 1 and sid > self.highest_inbound_stream_id and sid not in streams
                            and length <= max_size and not buf._headers_buffer):
                        events += self._receive_new_request(sid, data[i + 9:end], flags & _END_STREAM)
                        i = end
                        continue
                except ProtocolError as e:  # as h2's receive_data: GOAWAY queued, then raise
                    self._terminate_connection(e.error_code)
                    raise
            if slow < 0:
                slow = i
            i = end
        rest = data[slow if slow >= 0 else i:]
        if rest:
            events += super().receive_data(rest)
        return events

    def _receive_new_request(self, sid: int, block: bytes, end_stream: int) -> list:
        """h2's _receive_headers_frame for a HEADERS frame opening stream `sid` (see 6. above)."""
        max_open = self.local_settings.max_concurrent_streams
        if self.open_inbound_streams + 1 > max_open:
            raise TooManyStreamsError(f"Max inbound streams is {max_open}, {self.open_inbound_streams} open")
        headers = _decode_headers(self.decoder, block)
        events = _conn_step(self.state_machine, ConnectionInputs.RECV_HEADERS)
        stream = self._begin_new_stream(sid, AllowedStreamIDs.ODD)
        config = self.config
        if (config.validate_inbound_headers or config.normalize_inbound_headers or config.header_encoding
                or is_informational_response(headers)):
            frames, stream_events = stream.receive_headers(headers, bool(end_stream), config.header_encoding)
            self._prepare_for_sending(frames)
            return events + stream_events
        # H2Stream.receive_headers when inbound validation, normalisation and decoding are all off
        # (the HBONE server's configuration): its steps in its order, minus building the validation
        # flags and the empty processing pipeline that only those would use. PERF NOTE
        # (/tmp/hb7/core_short.py, alternating 3x): 22.6 -> 21.5 us per short tunnel.
        machine = stream.state_machine
        stream_events = _stream_step(machine, StreamInputs.RECV_HEADERS, _K_RECV_HEADERS)
        if end_stream:
            ended = _stream_step(machine, StreamInputs.RECV_END_STREAM, _K_RECV_END_STREAM)
            stream_events[0].stream_ended = ended[0]
            stream_events += ended
        stream._initialize_content_length(headers)
        if isinstance(stream_events[0], TrailersReceived) and not end_stream:
            raise ProtocolError("Trailers must have END_STREAM set")
        stream_events[0].headers = list(headers)
        return events + stream_events

    def send_response_200(self, stream_id: int) -> None:
        """HEADERS(:status 200, END_HEADERS) on a stream the peer opened (see 4. above)."""
        if self.encoder.table_size_changes:
            self.send_headers(stream_id, _STATUS_200)
            return
        self._hb_dirty.add(stream_id)
        _conn_step(self.state_machine, ConnectionInputs.SEND_HEADERS)
        stream = self._get_stream_by_id(stream_id)  # raises StreamClosedError like send_headers
        _stream_step(stream.state_machine, StreamInputs.SEND_HEADERS, _K_SEND_HEADERS)
        self._data_to_send += _HEADERS_200.pack(_HEADERS_200_PREFIX, stream_id & 0x7FFFFFFF) + b"\x88"

    def send_data(self, stream_id, data, end_stream=False, pad_length=None):
        """h2's send_data for unpadded DATA on an existing stream (see 7. above)."""
        self._hb_dirty.add(stream_id)
        stream = self.streams.get(stream_id)
        size = len(data)
        if (pad_length is not None or stream is None or not SEND_FAST_PATH
                or size > self.max_outbound_frame_size
                or size > self.outbound_flow_control_window or size > stream.outbound_flow_control_window):
            return super().send_data(stream_id, data, end_stream, pad_length)
        # 7b.: SEND_DATA leaves an open connection and an OPEN / HALF_CLOSED_REMOTE stream where they
        # are, with no callback (h2's tables, asserted below): those two process_input calls — each an
        # isinstance check and a dict lookup hashing two Python-level Enum members — are skipped.
        state = self.state_machine.state
        if state is not _SERVER_OPEN and state is not _CLIENT_OPEN:
            self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        machine = stream.state_machine
        state = machine.state
        if state is not _STREAM_OPEN and state is not _HALF_CLOSED_REMOTE:
            machine.process_input(StreamInputs.SEND_DATA)  # h2's own error for a closed stream
        if end_stream:
            _stream_step(machine, StreamInputs.SEND_END_STREAM, _K_SEND_END_STREAM)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        out = self._data_to_send
        out += _DATA_HEADER.pack(size >> 16, size & 0xFFFF, 0, _END_STREAM if end_stream else 0, stream_id)
        out += data
        return None

    def acknowledge_received_data(self, acknowledged_size, stream_id):
        """h2's acknowledge_received_data on a stream h2 still holds (see 7. above): the same two
        window managers decide, and their WINDOW_UPDATEs are framed directly."""
        stream = self.streams.get(stream_id)
        if stream is None or not SEND_FAST_PATH or acknowledged_size < 0 or stream_id <= 0:
            return super().acknowledge_received_data(acknowledged_size, stream_id)
        # 7c.: WindowManager.process_bytes adds to _bytes_processed, then its _maybe_update_window
        # hands window back only when the window is empty (and enough was processed) or half a
        # window was processed; otherwise it changes nothing and returns 0. That test is made here
        # first, so the usual small acknowledgement is two additions, not four method calls.
        manager = self._inbound_flow_control_window_manager
        processed = manager._bytes_processed + acknowledged_size
        if manager.current_window_size and processed < manager.max_window_size // 2:
            manager._bytes_processed = processed
        else:
            conn_increment = manager.process_bytes(acknowledged_size)
            if conn_increment:
                self._data_to_send += _WINDOW_UPDATE.pack(0, 4, 8, 0, 0, conn_increment & 0x7FFFFFFF)
        if stream.open:  # "No point incrementing the windows of closed streams" (h2)
            manager = stream._inbound_window_manager
            processed = manager._bytes_processed + acknowledged_size
            if manager.current_window_size and processed < manager.max_window_size // 2:
                manager._bytes_processed = processed
                return None
            increment = manager.process_bytes(acknowledged_size)
            if increment:
                self._data_to_send += _WINDOW_UPDATE.pack(0, 4, 8, 0, stream_id, increment & 0x7FFFFFFF)
        return None

    def end_stream(self, stream_id):
        """h2's end_stream (an empty DATA frame with END_STREAM) on an existing stream (see 7.)."""
        self._hb_dirty.add(stream_id)
        stream = self.streams.get(stream_id)
        if stream is None or not SEND_FAST_PATH:
            return super().end_stream(stream_id)
        _conn_step(self.state_machine, ConnectionInputs.SEND_DATA)
        _stream_step(stream.state_machine, StreamInputs.SEND_END_STREAM, _K_SEND_END_STREAM)
        self._data_to_send += _DATA_HEADER.pack(0, 0, 0, _END_STREAM, stream_id)
        return None

    def reset_stream(self, stream_id, *args, **kwargs):
        self._hb_dirty.add(stream_id)
        return super().reset_stream(stream_id, *args, **kwargs)


class _CountingTable(HeaderTable):
    """hpack's HeaderTable with a version bumped by every change (see 8. above)."""

    _hb_version = 0

    def add(self, name: bytes, value: bytes) -> None:
        self._hb_version += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self._hb_version += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


class _PlainEncoder(Encoder):
    """10. above: hpack's encoder, string literals sent raw (RFC 7541 §5.2, H bit 0)."""

    def encode(self, headers, huffman: bool = False) -> bytes:
        return super().encode(headers, huffman=False)


class _MemoDecoder(Decoder):
    """hpack's Decoder remembering indexed-only blocks (see 8. above)."""

    def decode(self, data, raw: bool = False):
        if not (HPACK_MEMO and raw and data.__class__ is bytes and data
                and not data.translate(None, _INDEXED_ONE_BYTE)):
            return super().decode(data, raw)
        table = self.header_table
        memo = self._hb_memo
        if self._hb_memo_version != table._hb_version:
            memo.clear()
            self._hb_memo_version = table._hb_version
        key = (data, self.max_header_list_size, self.max_allowed_table_size)
        hit = memo.get(key)
        if hit is not None:
            return list(hit)
        headers = super().decode(data, raw)  # raises as hpack does; nothing is remembered then
        if len(memo) >= HPACK_MEMO_ENTRIES:
            memo.clear()
        memo[key] = tuple(headers)
        return headers


def _data_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<data {len(self.data)} bytes, pad {self.pad_length}>"


_GRACEFUL_TRANSITIONS = dict(H2ConnectionStateMachine._transitions)
# IDLE too (SETTINGS exchanged, no stream yet): h2 went CLOSED there, so the next keepalive ping raised
# ProtocolError out of the core and a later HEADERS was a connection error, not REFUSED_STREAM (found
# by fuzzing ServerCore). A table entry: no per-frame work.
for _state in (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN, ConnectionState.IDLE):
    for _input in (ConnectionInputs.SEND_GOAWAY, ConnectionInputs.RECV_GOAWAY):
        assert _GRACEFUL_TRANSITIONS[(_state, _input)] == (None, ConnectionState.CLOSED), "h2 changed"
        _GRACEFUL_TRANSITIONS[(_state, _input)] = (None, _state)


for _state in (_SERVER_OPEN, _CLIENT_OPEN):  # 7b.: SEND_DATA is an identity there, in both tables
    assert H2ConnectionStateMachine._transitions[(_state, ConnectionInputs.SEND_DATA)] == (None, _state), "h2 changed"
    assert _GRACEFUL_TRANSITIONS[(_state, ConnectionInputs.SEND_DATA)] == (None, _state), "h2 changed"
for _state in (_STREAM_OPEN, _HALF_CLOSED_REMOTE):
    assert _h2_stream._transitions[(_state, StreamInputs.SEND_DATA)] == (None, _state), "h2 changed"


# 9. h2's state transitions on the short-tunnel path (7 per tunnel: connection RECV_HEADERS,
# SEND_HEADERS, SEND_DATA; stream RECV_HEADERS, SEND_HEADERS, SEND_END_STREAM, RECV_END_STREAM). h2's
# process_input checks isinstance and looks (state, input) up in its table, hashing each plain Enum
# member with Enum's Python-level __hash__ (StreamState is an IntEnum: C-level int hash).
# _conn_step: those connection inputs are identities without a callback in an open connection (h2's
# tables, both the plain and the graceful one: asserted below), so nothing is done there.
# _stream_step: h2's stream table re-keyed by (state, input value), the same entries, then exactly
# process_input's steps; any pair h2's table lacks goes to process_input for h2's own error.
# Measured: see the PERF NOTE at TRANSITION_FAST_PATH.
_CONN_IDENTITY_INPUTS = (ConnectionInputs.RECV_HEADERS, ConnectionInputs.SEND_HEADERS,
                         ConnectionInputs.SEND_DATA, ConnectionInputs.RECV_DATA)
for _state in (_SERVER_OPEN, _CLIENT_OPEN):
    for _input in _CONN_IDENTITY_INPUTS:
        assert H2ConnectionStateMachine._transitions[(_state, _input)] == (None, _state), "h2 changed"
        assert _GRACEFUL_TRANSITIONS[(_state, _input)] == (None, _state), "h2 changed"
_STREAM_TABLE = {(_state, _input.value): _hit for (_state, _input), _hit in _h2_stream._transitions.items()}
assert StreamState.__hash__ is int.__hash__, "h2 changed: StreamState is no longer an IntEnum"
_K_RECV_HEADERS = StreamInputs.RECV_HEADERS.value
_K_SEND_HEADERS = StreamInputs.SEND_HEADERS.value
_K_SEND_END_STREAM = StreamInputs.SEND_END_STREAM.value
_K_RECV_END_STREAM = StreamInputs.RECV_END_STREAM.value
_STREAM_CLOSED = StreamState.CLOSED


def _conn_step(machine: H2ConnectionStateMachine, input_: ConnectionInputs) -> list:
    """machine.process_input(input_) for one of _CONN_IDENTITY_INPUTS (see 9. above)."""
    state = machine.state
    if (state is _SERVER_OPEN or state is _CLIENT_OPEN) and TRANSITION_FAST_PATH:
        return []
    return machine.process_input(input_)


def _stream_step(machine, input_: StreamInputs, key: int) -> list:
    """machine.process_input(input_), `key` being input_.value (see 9. above)."""
    previous = machine.state
    hit = _STREAM_TABLE.get((previous, key)) if TRANSITION_FAST_PATH else None
    if hit is None:
        return machine.process_input(input_)  # h2's ProtocolError, the stream CLOSED
    func, machine.state = hit
    if func is None:
        return []
    try:
        return func(machine, previous)
    except ProtocolError:
        machine.state = _STREAM_CLOSED
        raise
    except AssertionError as err:
        machine.state = _STREAM_CLOSED
        raise ProtocolError(err) from err


def allow_streams_after_goaway(conn: H2Connection) -> None:
    """Let existing streams finish after GOAWAY on this connection (see 2. above)."""
    conn.state_machine._transitions = _GRACEFUL_TRANSITIONS  # type: ignore[misc]


def install() -> None:
    """Idempotent. Called by every HboneConnection core before its first frame."""
    global _PATCHED
    if not _PATCHED:
        hyperframe.frame.DataFrame._body_repr = _data_body_repr  # type: ignore[method-assign]
        _PATCHED = True


def is_installed() -> bool:
    return hyperframe.frame.DataFrame._body_repr is _data_body_repr


install()

__all__ = ["H2Connection", "allow_streams_after_goaway", "install", "is_installed"]
