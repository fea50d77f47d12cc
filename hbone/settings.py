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
