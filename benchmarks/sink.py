"""The sink: the destination workload of every tunnel benchmark, as its own process.

``python -m benchmarks.sink --listen IP:PORT [--connect-listen IP:PORT]``

``--listen`` speaks the ``benchmarks.wire`` protocol directly (what our relay and the direct client
reach). ``--connect-listen`` first reads an HTTP/1.1 ``CONNECT`` request head and answers ``200``:
nghttpx never dials a CONNECT's authority itself, it forwards the CONNECT to its backend as
HTTP/1.1, so the sink plays that backend. The extra head costs the sink, not the proxy.

Written with asyncio Protocols on uvloop (no per-connection coroutine) so that it is cheap next to
the proxy it feeds. Prints ``READY`` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from benchmarks import wire
from benchmarks.tuning import tune_process

# How much the sink queues in the kernel+transport before pausing a download: enough to keep the
# socket busy between loop turns, bounded so memory stays flat however large the transfer.
WRITE_HIGH_WATER_BYTES = 4 * 1024 * 1024
MAX_HTTP_HEAD_BYTES = 16 * 1024  # a CONNECT head from nghttpx is ~100 bytes; anything past this is junk


class SinkProtocol(asyncio.Protocol):
    """One tunnel's worth of the wire protocol; see ``benchmarks.wire``."""

    def __init__(self, expect_http: bool):
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.expect_http = expect_http
        self.op: str | None = None  # None until the header is in; then upload/download/echo/idle/done
        self.length = 0
        self.received = 0
        self.to_send = 0
        self.writing_paused = False

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)

    def data_received(self, data: bytes):
        if self.op is None:
            data = self._parse_head(data)
            if data is None:
                return
        if self.op in ("upload", "echo"):
            self.received += len(data)
            if self.received >= self.length:
                if self.op == "upload":
                    self.op = "done"
                    self.transport.write(wire.ACK.pack(self.received))
                    self.transport.close()
                else:
                    self.op = "download"
                    self.to_send = self.length
                    self._send()
        # idle, download, done: whatever else the client sends is ignored

    def _parse_head(self, data: bytes) -> bytes | None:
        """Consume the optional CONNECT head and the wire header; return the payload bytes after
        them, or None while incomplete (or after refusing the connection)."""
        self.buf += data
        if self.expect_http:
            end = wire.find_http_head_end(self.buf)
            if end < 0:
                if len(self.buf) > MAX_HTTP_HEAD_BYTES:
                    self.transport.abort()
                return None
            if not self.buf.startswith(b"CONNECT "):
                self.transport.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                self.transport.close()
                return None
            self.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
            self.buf = self.buf[end:]
            self.expect_http = False
        if len(self.buf) < wire.HEADER_BYTES:
            return None
        try:
            self.op, self.length = wire.decode_header(self.buf)
        except wire.WireError:
            self.transport.abort()
            return None
        rest, self.buf = self.buf[wire.HEADER_BYTES:], b""
        if self.op == "download":
            self.to_send = self.length
            self._send()
        return rest

    def _send(self):
        block = wire.PAYLOAD_BLOCK
        while self.to_send > 0 and not self.writing_paused:
            n = min(self.to_send, len(block))
            self.transport.write(block if n == len(block) else block[:n])
            self.to_send -= n
        if self.to_send <= 0:
            self.op = "done"
            self.transport.close()

    def pause_writing(self):
        self.writing_paused = True

    def resume_writing(self):
        self.writing_paused = False
        if self.op == "download" and self.transport is not None:
            self._send()

    def eof_received(self):
        # The client half-closed (our relay passes END_STREAM on as TCP SHUT_WR). Keep our sending
        # side open: a download continues after the request; an idle or finished tunnel just ends.
        if self.op in ("download", "upload", "echo"):
            return True
        self.op = "done"
        return False  # asyncio closes the transport

    def connection_lost(self, exc):
        self.transport = None
        self.op = "done"


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve(listen: tuple[str, int], connect_listen: tuple[str, int] | None) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda: SinkProtocol(False), *listen, backlog=4096, reuse_address=True)]
    if connect_listen:
        servers.append(await loop.create_server(lambda: SinkProtocol(True), *connect_listen, backlog=4096,
                                                reuse_address=True))
    print("READY", flush=True)
    await asyncio.Event().wait()  # until the harness terminates us


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sink")
    ap.add_argument("--listen", type=parse_addr, required=True)
    ap.add_argument("--connect-listen", type=parse_addr)
    args = ap.parse_args(argv)
    tune_process()
    import uvloop
    try:
        uvloop.run(serve(args.listen, args.connect_listen))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
