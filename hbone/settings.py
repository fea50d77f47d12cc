"""HTTP/2 and connection settings for HBONE, with ztunnel's defaults.

Every number names its unit and why it has that value. Sources: ztunnel `src/config.rs`,
`src/proxy/h2/{client,server}.rs`, `src/proxy/h2.rs` (see `reference/ztunnel.md` §1.3, §2).
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB

# ztunnel HTTP2_STREAM_WINDOW_SIZE: 4 MiB per stream. h2's default 64 KiB caps one tunnel at
# ~195 MB/s here (performance.md); 4 MiB lets a stream keep a loopback pipe full.
STREAM_WINDOW_BYTES = 4 * MiB
# ztunnel HTTP2_CONNECTION_WINDOW_SIZE: 16 MiB. config.rs: "Setting this to the same value as
# window_size can introduce deadlocks in some applications where clients do not read data on streamA
# until they receive data on streamB... A 4x limit should be appropriate."
CONNECTION_WINDOW_BYTES = 16 * MiB
# ztunnel HTTP2_FRAME_SIZE: 1 MiB. Large frames amortise the per-frame Python work in h2.
MAX_FRAME_BYTES = 1 * MiB
# ztunnel's server advertises 200 ("default from hyper").
SERVER_MAX_CONCURRENT_STREAMS = 200
# ztunnel POOL_MAX_STREAMS_PER_CONNECTION: "Go: 100, Hyper: 200, ... Spec recommended minimum 100";
# effective per connection is min(this, peer's SETTINGS_MAX_CONCURRENT_STREAMS).
CLIENT_MAX_STREAMS_PER_CONNECTION = 100
# ztunnel: client 16 KiB, server 64 KiB of header list. A CONNECT carries 4 short headers.
CLIENT_MAX_HEADER_LIST_BYTES = 16 * KiB
SERVER_MAX_HEADER_LIST_BYTES = 64 * KiB
# ztunnel src/proxy/h2.rs do_ping_pong: PING_INTERVAL = 10 s, PING_TIMEOUT = 20 s, then the
# connection is dropped (client) or GOAWAY + close (server).
PING_INTERVAL_S = 10.0
PING_TIMEOUT_S = 20.0
# ztunnel: 10 s TCP connect timeout for origination (and for the server's upstream connect).
CONNECT_TIMEOUT_S = 10.0
# A TLS handshake that has not finished in 10 s is a stuck or hostile peer; asyncio's own default
# is 60 s, which would let half-open handshakes pile up.
TLS_HANDSHAKE_TIMEOUT_S = 10.0
# ztunnel POOL_UNUSED_RELEASE_TIMEOUT: a pooled connection unused for 5 minutes is released.
POOL_IDLE_TIMEOUT_S = 300.0
# Bytes a writer may queue on one stream before drain() blocks, on top of what the peer's window
# lets us put on the wire. ztunnel's server send buffer is 400 KiB; one 256 KiB relay read
# (stream.DEFAULT_READ_BYTES) plus change fits, so a relay never stalls on a half-empty buffer.
STREAM_SEND_BUFFER_BYTES = 400 * KiB
# Bytes the TLS transport may hold unsent before we stop moving stream data into it (asyncio
# pause_writing). Keeps a slow TCP peer from growing memory; 1 MiB holds one max-size frame.
TRANSPORT_WRITE_HIGH_WATER_BYTES = 1 * MiB
# How long close() waits for GOAWAY and queued frames to leave before dropping the transport.
GOAWAY_FLUSH_S = 1.0

# ---- abuse limits (issue 8: "make the HBONE listener impossible to knock over") ---------------
# Each trips per connection and ends only that connection (GOAWAY, then close), except where a
# stream-level answer exists (REFUSED_STREAM, 431). hbone/limits.py does the counting.

# h2 itself enforces this many open inbound streams (a PROTOCOL_ERROR beyond it, killing the
# connection). We advertise SERVER_MAX_CONCURRENT_STREAMS and refuse streams above it ourselves
# with RST_STREAM REFUSED_STREAM (RFC 9113 §5.1.2: "MUST treat this as a stream error ... of type
# PROTOCOL_ERROR or REFUSED_STREAM"), so one over-eager client loses a stream, not its connection.
# Refused streams close at once, so h2's count never gets near this backstop.
H2_STREAM_BACKSTOP_FACTOR = 2
# Unanswered CONNECTs (handler still deciding: authorizing, dialing upstream with its 10 s connect
# timeout) per connection. Excess: RST_STREAM REFUSED_STREAM (retryable, RFC 9113 §8.7). By default
# equal to the stream limit: a pool that opens its whole allowance at once on a burst is honest
# (our own pool with client_max_streams_per_connection=200 does), and each pending tunnel already
# counts as an open stream. Lower it to cap concurrent upstream dials per client connection.
MAX_PENDING_TUNNELS = SERVER_MAX_CONCURRENT_STREAMS
# Rapid reset (CVE-2023-44487): streams that end before we answered them (the client's RST_STREAM,
# or our REFUSED_STREAM) within RESET_WINDOW_S. Envoy counts the same "premature resets"
# (overload.premature_reset_total_stream_count = 500, min lifetime 1 s); the h2 crate ztunnel
# serves with allows 20 *pending* reset streams; nghttp2 a 1000 burst refilled at 33/s. HBONE
# clients cancel a CONNECT only when their app gives up before the answer, so 100 in 10 s (10/s
# sustained) is far above honest use. Over it: GOAWAY ENHANCE_YOUR_CALM.
RESET_WINDOW_S = 10.0
MAX_PREMATURE_RESETS = 100
# Header block (HEADERS + CONTINUATION, HPACK-compressed bytes): over it, GOAWAY ENHANCE_YOUR_CALM
# before h2 buffers it (h2 4.4.1 keeps up to 64 frames x 1 MiB). HPACK never makes an honest block
# bigger than the header list it decodes to, so the decoder's hard limit below is the right cap.
HEADER_BLOCK_MAX_BYTES = 128 * KiB
# nghttp2 1.61.0 (CVE-2024-28182) default max_continuations: "If more than those frames are
# received, the remote endpoint is considered to be misbehaving and session will be closed."
MAX_CONTINUATION_FRAMES = 8
# Decoded header list (RFC 9113 §6.5.2 size: name + value + 32 per field). Above the advertised
# SERVER_MAX_HEADER_LIST_BYTES a CONNECT is answered 431 (RFC 6585; Go's http2 server answers 431
# when MaxHeaderBytes is exceeded); above this hard limit HPACK decoding stops (an HPACK bomb) and
# h2 sends GOAWAY ENHANCE_YOUR_CALM. Twice the advertised size leaves room to answer a 431.
HEADER_LIST_HARD_BYTES = 2 * SERVER_MAX_HEADER_LIST_BYTES
# Control-frame floods (CVE-2019-9512 PING, -9515 SETTINGS): per connection, per FLOOD_WINDOW_S.
# An honest peer sends one SETTINGS at start and a PING every 10 s (ztunnel keepalive): 100 per
# 10 s is 100x that. Unknown frame types (RFC 9113 §5.5: ignored) are counted likewise.
FLOOD_WINDOW_S = 10.0
MAX_SETTINGS_FRAMES = 100
MAX_PING_FRAMES = 100
MAX_UNKNOWN_FRAMES = 100
# Envoy max_consecutive_inbound_frames_with_empty_payload default 1 (CVE-2019-9518): HEADERS,
# CONTINUATION or DATA with no payload and no END_STREAM, in a row.
MAX_EMPTY_FRAMES = 1
# Envoy max_inbound_priority_frames_per_stream default 100 (CVE-2019-9513): PRIORITY frames allowed
# = 100 x (1 + streams opened). RFC 9113 deprecated priority signalling; h2 still processes them.
PRIORITY_FRAMES_PER_STREAM = 100
# Envoy max_inbound_window_update_frames_per_data_frame_sent default 10 (CVE-2019-9517 class):
# WINDOW_UPDATEs allowed = 5 + 2 x (streams opened + 10 x DATA frames we sent).
WINDOW_UPDATES_PER_DATA_FRAME = 10
# Frames the peer made us owe (PING ACK, SETTINGS ACK) while our transport is paused because the
# peer does not read (CVE-2019-9512/9515 "reflection"). Envoy max_outbound_control_frames default
# 1000; Go's maxQueuedControlFrames is 10000. Over it: the connection is aborted (a GOAWAY would
# sit behind the unread bytes).
MAX_OUTBOUND_CONTROL_FRAMES = 1000
# A connection with no tunnel for this long is closed (GOAWAY NO_ERROR). ztunnel has none (users
# ask for one: ztunnel #1662, #1699); Envoy's HTTP connection manager defaults idle_timeout to 1 h
# ("Disabling this timeout has a high likelihood of yielding connection leaks due to lost TCP FIN
# packets"). PINGs do not count as activity (Envoy likewise). ztunnel's pool drops its own unused
# connections after 5 min (POOL_IDLE_TIMEOUT_S), so this only reaps abandoned ones.
CONNECTION_IDLE_TIMEOUT_S = 3600.0
# Connections (in TLS handshake or established) per listener; beyond it a new connection is
# accepted and closed at once, and counted. ztunnel and Envoy set no default; a node proxy sees
# about one pooled connection per (source, destination) workload pair, each carrying up to 200
# tunnels, so 4096 is ample and keeps us well inside a 65536 fd limit with two sockets per tunnel.
MAX_CONNECTIONS = 4096


@dataclass(frozen=True, slots=True)
class HboneSettings:
    """The knobs of one HBONE endpoint (server or client). Defaults are ztunnel's."""

    stream_window: int = STREAM_WINDOW_BYTES
    connection_window: int = CONNECTION_WINDOW_BYTES
    max_frame_size: int = MAX_FRAME_BYTES
    server_max_concurrent_streams: int = SERVER_MAX_CONCURRENT_STREAMS
    client_max_streams_per_connection: int = CLIENT_MAX_STREAMS_PER_CONNECTION
    client_max_header_list_size: int = CLIENT_MAX_HEADER_LIST_BYTES
    server_max_header_list_size: int = SERVER_MAX_HEADER_LIST_BYTES
    ping_interval: float = PING_INTERVAL_S
    ping_timeout: float = PING_TIMEOUT_S
    connect_timeout: float = CONNECT_TIMEOUT_S
    tls_handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT_S
    pool_idle_timeout: float = POOL_IDLE_TIMEOUT_S
    stream_send_buffer: int = STREAM_SEND_BUFFER_BYTES
    transport_write_high_water: int = TRANSPORT_WRITE_HIGH_WATER_BYTES
    # abuse limits (see the constants above)
    max_pending_tunnels: int = MAX_PENDING_TUNNELS
    reset_window: float = RESET_WINDOW_S
    max_premature_resets: int = MAX_PREMATURE_RESETS
    max_header_block: int = HEADER_BLOCK_MAX_BYTES
    max_continuation_frames: int = MAX_CONTINUATION_FRAMES
    header_list_hard_limit: int = HEADER_LIST_HARD_BYTES
    flood_window: float = FLOOD_WINDOW_S
    max_settings_frames: int = MAX_SETTINGS_FRAMES
    max_ping_frames: int = MAX_PING_FRAMES
    max_unknown_frames: int = MAX_UNKNOWN_FRAMES
    max_empty_frames: int = MAX_EMPTY_FRAMES
    priority_frames_per_stream: int = PRIORITY_FRAMES_PER_STREAM
    window_updates_per_data_frame: int = WINDOW_UPDATES_PER_DATA_FRAME
    max_outbound_control_frames: int = MAX_OUTBOUND_CONTROL_FRAMES
    idle_timeout: float = CONNECTION_IDLE_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        # RFC 9113 §6.5.2: SETTINGS_MAX_FRAME_SIZE must be within [2^14, 2^24-1]; §6.9.1: windows
        # are at most 2^31-1.
        if not (16384 <= self.max_frame_size <= 2**24 - 1):
            raise ValueError(f"max_frame_size {self.max_frame_size} outside [16384, 16777215]")
        for name in ("stream_window", "connection_window"):
            value = getattr(self, name)
            if not (65535 <= value <= 2**31 - 1):
                raise ValueError(f"{name} {value} outside [65535, 2147483647]")
        if self.ping_timeout <= 0 or self.ping_interval <= 0:
            raise ValueError("ping interval and timeout must be positive")
        if self.header_list_hard_limit < self.server_max_header_list_size:
            raise ValueError("header_list_hard_limit must be at least server_max_header_list_size")
        for name in ("reset_window", "flood_window", "idle_timeout", "tls_handshake_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
