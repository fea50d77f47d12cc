"""The tiny request protocol between load clients and the sink, spoken inside each tunnel.

Every tunnel starts with a 9-byte header: one op byte and a big-endian 64-bit length N.

- ``U`` upload:   the client sends N bytes; the sink answers with N as 8 bytes once all arrived, then closes.
- ``D`` download: the sink sends N bytes, then closes.
- ``E`` echo:     the client sends N bytes; the sink sends N bytes back once all arrived, then closes.
- ``I`` idle:     the sink holds the tunnel open, sending nothing, until the client closes it.

Completion is decided by counting bytes, never by waiting for a half-close: nghttpx does not pass
END_STREAM on to an HTTP/1.1 backend as a TCP half-close, so an EOF-based protocol would hang there.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("!cQ")
HEADER_BYTES = HEADER.size  # 9
ACK = struct.Struct("!Q")

OPS = {b"U": "upload", b"D": "download", b"E": "echo", b"I": "idle"}
OP_BY_NAME = {name: op for op, name in OPS.items()}

# The byte pattern sent as payload: not all zeros, so nothing along the path can shortcut it.
PAYLOAD_BLOCK_BYTES = 1024 * 1024
PAYLOAD_BLOCK = bytes(range(256)) * (PAYLOAD_BLOCK_BYTES // 256)


class WireError(ValueError):
    """A malformed request header."""


def encode_header(op_name: str, length: int) -> bytes:
    return HEADER.pack(OP_BY_NAME[op_name], length)


def decode_header(data: bytes) -> tuple[str, int]:
    if len(data) < HEADER_BYTES:
        raise WireError(f"header needs {HEADER_BYTES} bytes, got {len(data)}")
    op, length = HEADER.unpack_from(data)
    if op not in OPS:
        raise WireError(f"unknown op {op!r}")
    return OPS[op], length


def find_http_head_end(buf: bytes) -> int:
    """Offset just past the blank line ending an HTTP/1.1 request head, or -1 if not complete yet."""
    i = buf.find(b"\r\n\r\n")
    return -1 if i < 0 else i + 4
