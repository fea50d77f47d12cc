"""Byte-stream chores shared by the end-to-end tests (any ``ByteStream``: an HBONE tunnel, a TCP stream)."""

from __future__ import annotations


async def read_all(stream) -> bytes:
    """Everything ``stream`` yields until its EOF."""
    got = b""
    while chunk := await stream.read():
        got += chunk
    return got


async def exchange(stream, payload: bytes, *, half_close: bool = True) -> bytes:
    """Write ``payload`` and drain, half-close (unless ``half_close`` is false: a peer that answers after one
    read), then read the answer to EOF."""
    stream.write(payload)
    await stream.drain()
    if half_close:
        stream.write_eof()
    return await read_all(stream)
