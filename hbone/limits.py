"""Abuse accounting for one inbound HTTP/2 connection: frame headers in, a verdict out.

Pure: no sockets, no clock (every call that needs time takes `now`, seconds on any monotonic
scale), no h2. `InboundGuard.feed(data, now)` reads the raw bytes the peer sent *before* h2 does,
so a limit trips on a frame's 9-byte header, before h2 buffers its body. That matters for:

- CONTINUATION floods (CVE-2024-27316 class): h2 4.4.1's FrameBuffer keeps up to 64
  (`CONTINUATION_BACKLOG`) frames of a header block, each up to our 1 MiB max frame size, i.e.
  ~64 MiB per connection, before it decodes anything;
- oversized frames: h2 buffers the whole frame body and only then checks its length against
  SETTINGS_MAX_FRAME_SIZE (up to 16 MiB per connection).

The verdict (`Abuse`) carries its answer: the GOAWAY error code and a reason for metrics and logs.
Limits come from `HboneSettings` (see settings.py for each default and where it comes from).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from h2.errors import ErrorCodes

from hbone.settings import HboneSettings

# RFC 9113 §6 frame types and the flags we look at.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FRAME_HEADER_BYTES = 9  # RFC 9113 §4.1
# The 9 bytes: 24-bit length (as 8 + 16 bits), type, flags, R + 31-bit stream id.
_HEADER = struct.Struct(">BHBBL")
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4; h2 validates it, we skip it


@dataclass(frozen=True, slots=True)
class Abuse:
    """Why a connection is being shut: GOAWAY `code`, `reason` for counters and access logs."""
    reason: str
    code: int
    detail: str = ""


@dataclass(frozen=True, slots=True)
class FrameHead:
    type: int
    flags: int
    length: int
    stream_id: int


class SlidingWindow:
    """Exact count of events in the last `window` seconds. Memory is at most `limit + 1`
    timestamps: once over the limit the caller acts, so older entries are never needed."""

    __slots__ = ("window", "limit", "_times")

    def __init__(self, window: float, limit: int):
        self.window = window
        self.limit = limit
        self._times: deque[float] = deque()

    def hit(self, now: float) -> bool:
        """Record one event at `now`; True if the window now holds more than `limit` events."""
        times = self._times
        times.append(now)
        horizon = now - self.window
        while times and times[0] <= horizon:
            times.popleft()
        while len(times) > self.limit + 1:
            times.popleft()
        return len(times) > self.limit

    def __len__(self) -> int:
        return len(self._times)


class InboundGuard:
    """Per-connection accounting of what the peer sends (server side of HBONE).

    Feed it every byte received, in order, before h2 sees them. The first limit crossed is the
    verdict; after that the connection is going away and the guard answers the same verdict."""

    def __init__(self, settings: HboneSettings, *, server_side: bool = True):
        self.s = settings
        self._preface_left = len(CLIENT_PREFACE) if server_side else 0
        self._hdr = bytearray()          # a frame header split across reads
        self._body_left = 0               # bytes of the current frame's body still to come
        self._pad_head: FrameHead | None = None  # a PADDED DATA frame whose pad-length byte is next
        self._block_stream = 0            # stream of an unfinished header block (0: none)
        self._block_bytes = 0
        self._block_frames = 0
        self._highest_stream = 0
        self.verdict: Abuse | None = None
        # counters (state you can see; also the ratios below)
        self.streams_opened = 0
        self.data_frames_sent = 0
        self.priority_frames = 0
        self.window_updates = 0
        self.empty_in_a_row = 0
        self.provoked_control_frames = 0  # PING/SETTINGS ACKs we owe the peer
        self.premature_resets = 0
        # The HEADERS frames feed() checks inline: within both the frame size and the header block
        # limits. PERF NOTE (/tmp/h8/guard_bench.py: a fresh guard fed 64 x [HEADERS 40 B + DATA
        # 1 KiB END_STREAM] in one read, best of 7 x 300, this 2-core machine): 1.35-1.39 -> 0.72 us
        # per tunnel. (The short-tunnel benchmark's ~100 us per stream is too noisy to show it.)
        self._headers_inline_max = min(settings.max_frame_size, settings.max_header_block)
        w = settings.flood_window
        self._settings_w = SlidingWindow(w, settings.max_settings_frames)
        self._ping_w = SlidingWindow(w, settings.max_ping_frames)
        self._unknown_w = SlidingWindow(w, settings.max_unknown_frames)
        self._reset_w = SlidingWindow(settings.reset_window, settings.max_premature_resets)

    # -- bytes in --
    def feed(self, data: bytes | memoryview, now: float) -> Abuse | None:
        if self.verdict is not None:
            return self.verdict
        view = memoryview(data)
        n = len(view)
        pos = 0
        if self._preface_left:
            k = min(self._preface_left, n)
            self._preface_left -= k
            pos = k
        while pos < n:
            if self._pad_head is not None:
                head, self._pad_head = self._pad_head, None
                verdict = self._on_data(head, view[pos])
                if verdict is not None:
                    return self._set(verdict)
            if self._body_left:
                k = min(self._body_left, n - pos)
                self._body_left -= k
                pos += k
                continue
            need = FRAME_HEADER_BYTES - len(self._hdr)
            if need < FRAME_HEADER_BYTES or n - pos < FRAME_HEADER_BYTES:
                self._hdr += view[pos:pos + need]
                pos += min(need, n - pos)
                if len(self._hdr) < FRAME_HEADER_BYTES:
                    break
                hi, lo, ftype, flags, sid = _HEADER.unpack(self._hdr)
                self._hdr.clear()
            else:
                hi, lo, ftype, flags, sid = _HEADER.unpack_from(view, pos)
                pos += FRAME_HEADER_BYTES
            length = (hi << 16) | lo
            if (ftype == DATA and not flags & FLAG_PADDED and length <= self.s.max_frame_size
                    and not self._block_stream):
                # PERF NOTE: the frame a bulk tunnel sends thousands of (16 KiB-frame peers: 16
                # per 256 KiB read) — what _check_frame and _on_data decide for it, inline, with no
                # FrameHead: nothing to count but the empty-frame run. Measured with 5b. of
                # hbone/_h2fast.py: 16 KiB-frame upload 1.25 -> 1.11 proxy CPU-s per GiB (see there).
                self._body_left = length
                if length or flags & FLAG_END_STREAM:
                    self.empty_in_a_row = 0
                else:
                    verdict = self._empty(True)
                    if verdict is not None:
                        return self._set(verdict)
                continue
            if (ftype == HEADERS and flags & FLAG_END_HEADERS and 0 < length <= self._headers_inline_max
                    and not self._block_stream):
                # PERF NOTE: a tunnel's CONNECT, one complete header block in one frame: what
                # _check_frame and _empty decide for it, inline, with no FrameHead (a new stream
                # counted; the block opened and closed at once; a non-empty frame ends the
                # empty-frame run). Measured: see the PERF NOTE at _headers_inline_max.
                sid &= 0x7FFFFFFF
                if sid > self._highest_stream:
                    self._highest_stream = sid
                    self.streams_opened += 1
                self._block_bytes, self._block_frames = length, 0
                self.empty_in_a_row = 0
                self._body_left = length
                continue
            head = FrameHead(ftype, flags, length, sid & 0x7FFFFFFF)
            self._body_left = head.length
            if head.type == DATA and head.flags & FLAG_PADDED and head.length:
                # What the header alone tells comes first (frame size above all): a padded DATA frame
                # must not skip it (found by live fuzzing: an 8.9 MB padded frame hung the connection).
                verdict = self._check_frame(head, now)
                if verdict is None:
                    if pos < n:
                        verdict = self._on_data(head, view[pos])
                    else:
                        self._pad_head = head  # decided when the pad-length byte arrives
            else:
                verdict = self._check_frame(head, now)
                if verdict is None and head.type == DATA:
                    verdict = self._on_data(head, None)
            if verdict is not None:
                return self._set(verdict)
        return None

    def _set(self, verdict: Abuse) -> Abuse:
        self.verdict = verdict
        return verdict

    def _check_frame(self, f: FrameHead, now: float) -> Abuse | None:
        """Everything about a frame that its header alone tells (DATA emptiness aside)."""
        s = self.s
        if f.length > s.max_frame_size:
            # RFC 9113 §4.2: FRAME_SIZE_ERROR. Said on the header, so the body is never buffered.
            return Abuse("frame_too_large", ErrorCodes.FRAME_SIZE_ERROR,
                         f"{f.length}-byte frame, limit {s.max_frame_size}")
        t = f.type
        if self._block_stream and t != CONTINUATION:
            return None  # h2 answers PROTOCOL_ERROR (RFC 9113 §6.10); nothing for us to count
        if t == HEADERS or t == CONTINUATION:
            if t == HEADERS:
                if f.stream_id > self._highest_stream:
                    self._highest_stream = f.stream_id
                    self.streams_opened += 1
                self._block_stream, self._block_bytes, self._block_frames = f.stream_id, 0, 0
            else:
                if not self._block_stream:
                    return None  # a naked CONTINUATION: h2's PROTOCOL_ERROR
                self._block_frames += 1
                if self._block_frames > s.max_continuation_frames:
                    return Abuse("continuation_flood", ErrorCodes.ENHANCE_YOUR_CALM,
                                 f"more than {s.max_continuation_frames} CONTINUATION frames in one header block")
            self._block_bytes += f.length
            if self._block_bytes > s.max_header_block:
                return Abuse("header_block_too_large", ErrorCodes.ENHANCE_YOUR_CALM,
                             f"header block over {s.max_header_block} bytes")
            if f.flags & FLAG_END_HEADERS:
                self._block_stream = 0
            return self._empty(f.length == 0 and not (t == HEADERS and f.flags & FLAG_END_STREAM))
        if t == DATA:
            return None  # emptiness needs the pad-length byte: _on_data
        if t == SETTINGS:
            if f.flags & FLAG_ACK:
                return None
            self.provoked_control_frames += 1
            if self._settings_w.hit(now):
                return Abuse("settings_flood", ErrorCodes.ENHANCE_YOUR_CALM,
                             f"more than {s.max_settings_frames} SETTINGS in {s.flood_window:g}s")
        elif t == PING:
            if f.flags & FLAG_ACK:
                return None
            self.provoked_control_frames += 1
            if self._ping_w.hit(now):
                return Abuse("ping_flood", ErrorCodes.ENHANCE_YOUR_CALM,
                             f"more than {s.max_ping_frames} PINGs in {s.flood_window:g}s")
        elif t == PRIORITY:
            self.priority_frames += 1
            allowed = s.priority_frames_per_stream * (1 + self.streams_opened)
            if self.priority_frames > allowed:
                return Abuse("priority_flood", ErrorCodes.ENHANCE_YOUR_CALM,
                             f"{self.priority_frames} PRIORITY frames for {self.streams_opened} streams")
        elif t == WINDOW_UPDATE:
            self.window_updates += 1
            # Envoy's codec bound: 5 + 2 * (opened streams + N * DATA frames we sent).
            allowed = 5 + 2 * (self.streams_opened + s.window_updates_per_data_frame * self.data_frames_sent)
            if self.window_updates > allowed:
                return Abuse("window_update_flood", ErrorCodes.ENHANCE_YOUR_CALM,
                             f"{self.window_updates} WINDOW_UPDATEs for {self.data_frames_sent} DATA frames sent")
        elif t > CONTINUATION:
            # RFC 9113 §5.5: unknown frame types are ignored, which makes them free for the peer.
            if self._unknown_w.hit(now):
                return Abuse("unknown_frame_flood", ErrorCodes.ENHANCE_YOUR_CALM,
                             f"more than {s.max_unknown_frames} unknown frames in {s.flood_window:g}s")
        return None

    def _on_data(self, f: FrameHead, pad_byte: int | None) -> Abuse | None:
        payload = f.length
        if f.flags & FLAG_PADDED and pad_byte is not None:
            payload = f.length - 1 - pad_byte
        return self._empty(payload <= 0 and not f.flags & FLAG_END_STREAM)

    def _empty(self, empty: bool) -> Abuse | None:
        # Envoy max_consecutive_inbound_frames_with_empty_payload: HEADERS/CONTINUATION/DATA with
        # no payload and no END_STREAM cost us a frame's work and carry nothing.
        if not empty:
            self.empty_in_a_row = 0
            return None
        self.empty_in_a_row += 1
        if self.empty_in_a_row > self.s.max_empty_frames:
            return Abuse("empty_frame_flood", ErrorCodes.ENHANCE_YOUR_CALM,
                         f"more than {self.s.max_empty_frames} empty frames in a row")
        return None

    # -- what the core tells us --
    def premature_reset(self, now: float) -> Abuse | None:
        """A stream ended before we answered it: the client reset it (CVE-2023-44487, rapid reset)
        or we refused it (REFUSED_STREAM) because the client opened more than it may."""
        if self.verdict is not None:
            return self.verdict
        self.premature_resets += 1
        if self._reset_w.hit(now):
            s = self.s
            return self._set(Abuse("rapid_reset", ErrorCodes.ENHANCE_YOUR_CALM,
                                   f"more than {s.max_premature_resets} streams reset before an answer "
                                   f"in {s.reset_window:g}s"))
        return None

    def data_frame_sent(self, n: int = 1) -> None:
        self.data_frames_sent += n

    def __repr__(self) -> str:
        return (f"<InboundGuard streams={self.streams_opened} premature_resets={self.premature_resets} "
                f"control_owed={self.provoked_control_frames} verdict={self.verdict and self.verdict.reason}>")
