"""One byte-stream interface for a TCP socket and an HBONE stream alike.

Later pipeline stages never ask where the bytes came from: they get a ``ByteStream``.

Contract (every implementation):

- ``await read(max_bytes)`` returns 1..max_bytes bytes, or ``b""`` once the peer has finished sending
  (TCP FIN / HTTP/2 END_STREAM, or RST_STREAM NO_ERROR/CANCEL, which ztunnel treats as a clean end).
  It raises ``StreamReset`` when the peer aborted (TCP RST, RST_STREAM with an error code).
- ``write(data)`` queues bytes; ``await drain()`` waits until the queue is below the stream's bound.
  Callers that write in a loop must ``await drain()`` between writes: that is the backpressure.
- ``write_eof()`` half-closes our sending side (TCP SHUT_WR / END_STREAM); reading may continue.
- ``close()`` ends both directions gracefully once queued bytes are flushed;
  ``abort()`` ends them at once (TCP RST / RST_STREAM CANCEL): the peer must learn the bytes did not
  all arrive. ``await wait_closed()`` waits until the transport is gone.
- ``local_addr`` / ``remote_addr`` are ``(host, port)`` tuples.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol, runtime_checkable

KiB = 1024
MiB = 1024 * KiB

# Read size for relays: ztunnel grows its copy buffer to 256 KiB after 10 MiB of traffic; a single
# large read amortises the per-call Python overhead. Bounded, so one read never holds more than this.
DEFAULT_READ_BYTES = 256 * KiB


# struct linger {l_onoff = 1, l_linger = 0}: close() discards unsent data and sends RST.
_LINGER_RST = struct.pack("ii", 1, 0)


class StreamReset(ConnectionError):
    """The peer aborted the stream; bytes in flight may be lost, so the error must propagate."""


@runtime_checkable
class ByteStream(Protocol):
    local_addr: tuple[str, int]
    remote_addr: tuple[str, int]

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes: ...
    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    def write_eof(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    async def wait_closed(self) -> None: ...


class TcpStream:
    """A ``ByteStream`` over an asyncio (uvloop) TCP connection."""

    __slots__ = ("_reader", "_writer", "local_addr", "remote_addr", "_eof_sent")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader = reader
        self._writer = writer
        sock_local = writer.get_extra_info("sockname") or ("", 0)
        sock_remote = writer.get_extra_info("peername") or ("", 0)
        self.local_addr = (sock_local[0], sock_local[1])
        self.remote_addr = (sock_remote[0], sock_remote[1])
        self._eof_sent = False

    @classmethod
    async def connect(cls, host: str, port: int, *, local_host: str | None = None,
                      limit: int = DEFAULT_READ_BYTES) -> "TcpStream":
        reader, writer = await asyncio.open_connection(
            host, port, limit=limit, local_addr=(local_host, 0) if local_host else None)
        return cls(reader, writer)

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        try:
            return await self._reader.read(max_bytes)
        except ConnectionResetError as err:
            raise StreamReset(str(err)) from err

    def write(self, data: bytes) -> None:
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionResetError as err:
            raise StreamReset(str(err)) from err

    def write_eof(self) -> None:
        if not self._eof_sent and not self._writer.is_closing():
            self._eof_sent = True
            try:
                self._writer.write_eof()
            except OSError:
                pass

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        transport = self._writer.transport
        if transport is not None:
            # asyncio's abort() only closes the socket, which sends FIN: the peer would read a
            # clean EOF. SO_LINGER {on, 0 s} makes close() send RST, so the peer learns the
            # stream was cut (RFC 9113 §8.5 maps RST_STREAM CONNECT_ERROR ↔ TCP RST).
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            transport.abort()

    async def wait_closed(self) -> None:
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    def __repr__(self) -> str:
        state = "closing" if self._writer.is_closing() else "open"
        return f"<TcpStream {self.local_addr[0]}:{self.local_addr[1]}->{self.remote_addr[0]}:{self.remote_addr[1]} {state}>"


class PrefixedStream:
    """A ``ByteStream`` that first replays bytes already read (e.g. by protocol sniffing)."""

    __slots__ = ("_inner", "_prefix")

    def __init__(self, inner: ByteStream, prefix: bytes):
        self._inner = inner
        self._prefix = prefix

    @property
    def local_addr(self) -> tuple[str, int]:
        return self._inner.local_addr

    @property
    def remote_addr(self) -> tuple[str, int]:
        return self._inner.remote_addr

    async def read(self, max_bytes: int = DEFAULT_READ_BYTES) -> bytes:
        if self._prefix:
            head, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            return head
        return await self._inner.read(max_bytes)

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    async def drain(self) -> None:
        await self._inner.drain()

    def write_eof(self) -> None:
        self._inner.write_eof()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()

    def __repr__(self) -> str:
        return f"<PrefixedStream pending={len(self._prefix)} {self._inner!r}>"
