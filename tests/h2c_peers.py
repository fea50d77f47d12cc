"""Real h2c peers on loopback for the h2c tests: our ``serve_h2c`` behind a TCP listener, a raw
frame-level client (hyperframe frames, an HPACK encoder; it reads the server's frames as they come), a
raw hostile upstream (frames it is told to send, whatever our client says), and ``H2Upstream``: an h2c
server on the h2 library (not our code) in place of a waypoint harness's pods, recording what reaches it."""

from __future__ import annotations

import asyncio
import functools
import struct
from typing import Self

import h2.config
import h2.connection
import h2.events as ev
import h2.exceptions
import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame

from hbone.stream import TcpStream
from proxy.pipeline.h2c import DEFAULT_H2_LIMITS, H2cConn, H2Limits, serve_h2c

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EYC = int(ErrorCodes.ENHANCE_YOUR_CALM)


def get_fields(path: bytes = b"/", extra=()) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", path), *extra]


def raw_frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    """Any frame, by hand (unknown types included): RFC 9113 §4.1."""
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


class LoopbackListener:
    """A TCP listener on a loopback address, port chosen by the system: ``start(ip)``, then ``addr``;
    each accepted connection goes to the subclass's ``_serve(reader, writer)``."""

    server: asyncio.Server | None = None
    addr: tuple[str, int] = ("", 0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self, ip: str) -> Self:
        self.server = await asyncio.start_server(self._serve, ip, 0)
        self.addr = self.server.sockets[0].getsockname()[:2]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class H2cServer(LoopbackListener):
    """``serve_h2c`` on a loopback port with a small handler: ``/hang`` waits for ``release``; every
    request is answered ``200 ok <path>``. ``conns`` collects each finished connection's ``H2cConn``."""

    def __init__(self, limits: H2Limits = DEFAULT_H2_LIMITS):
        self.limits = limits
        self.conns: list[H2cConn] = []
        self.release = asyncio.Event()
        self.accepted = 0

    async def handle(self, request, responder) -> None:
        async for _ in request.body_chunks():
            pass
        if request.target == b"/hang":
            await self.release.wait()
        elif request.target == b"/big":
            await responder.send_head(200, [])
            await responder.send_body(b"x" * (256 * 1024))
            await responder.end()
            return
        await responder.send_local_reply(200, b"ok " + request.target)

    async def _serve(self, reader, writer) -> None:
        self.accepted += 1
        stream = TcpStream(reader, writer)
        try:
            self.conns.append(await serve_h2c(stream, self.handle, limits=self.limits))
        finally:
            stream.close()

    async def close(self) -> None:
        self.release.set()
        await super().close()

    async def finished(self, n: int, timeout: float = 5.0) -> list[H2cConn]:
        async with asyncio.timeout(timeout):
            while len(self.conns) < n:
                await asyncio.sleep(0.01)
        return self.conns


class RawClient:
    """A frame-level h2c client: sends what it is given, records what the server says."""

    def __init__(self, stream: TcpStream):
        self.stream = stream
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder(max_header_list_size=1 << 20)
        self.buf = b""
        self.goaway: tuple[int, int] | None = None   # (error code, last stream id)
        self.resets: dict[int, int] = {}
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.data: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.pings = 0
        self.eof = False
        self.next_sid = 1

    @classmethod
    async def open(cls, addr, *, settings: dict | None = None) -> "RawClient":
        c = cls(await TcpStream.connect(addr[0], addr[1]))
        f = SettingsFrame(0)
        f.settings.update(settings or {})
        c.send(PREFACE + f.serialize())
        return c

    def send(self, *parts: bytes | Frame) -> None:
        self.stream.write(b"".join(p if isinstance(p, bytes) else p.serialize() for p in parts))

    def block(self, fields) -> bytes:
        # No Huffman coding (RFC 7541 §5.2 allows either): hpack codes it byte by byte in Python, and the
        # tests' 60-120 KiB header lists would spend seconds there on both sides.
        return self.enc.encode(list(fields), huffman=False)

    def headers(self, fields, *, end_stream: bool = True, sid: int | None = None) -> tuple[int, list[Frame]]:
        """A request head as HEADERS (+ CONTINUATION frames of at most 16 KiB, the default frame size)."""
        if sid is None:
            sid, self.next_sid = self.next_sid, self.next_sid + 2
        block = self.block(fields)
        frames: list[Frame] = [HeadersFrame(sid, data=block[:16384])]
        frames += [ContinuationFrame(sid, data=block[i:i + 16384]) for i in range(16384, len(block), 16384)]
        frames[-1].flags.add("END_HEADERS")
        if end_stream:
            frames[0].flags.add("END_STREAM")
        return sid, frames

    def request(self, path: bytes = b"/", extra=()) -> int:
        sid, frames = self.headers(get_fields(path, extra))
        self.send(*frames)
        return sid

    def reset(self, sid: int, code: int = ErrorCodes.CANCEL) -> None:
        self.send(RstStreamFrame(sid, error_code=code))

    def done(self, sid: int) -> bool:
        return sid in self.ended or sid in self.resets

    async def pump(self, until, timeout: float = 5.0) -> None:
        """Read frames until ``until()`` holds, GOAWAY, or EOF."""
        async with asyncio.timeout(timeout):
            while not until() and not self.eof:
                data = await self.stream.read(65536)
                if not data:
                    self.eof = True
                    return
                self.buf += data
                self._parse()

    async def closed_by_server(self, timeout: float = 5.0) -> tuple[int, int]:
        await self.pump(lambda: False, timeout)   # GOAWAY, then the server closes the connection
        assert self.eof and self.goaway is not None, (self.goaway, self.eof)
        return self.goaway

    async def ping_roundtrip(self) -> None:
        """Every frame sent before this has been processed once the PING's ACK comes back."""
        before = self.pings
        self.send(PingFrame(0, opaque_data=b"roundtri"))
        await self.pump(lambda: self.pings > before or self.goaway is not None)

    async def get(self, path: bytes = b"/", extra=()) -> tuple[int, int]:
        """(status, stream id); status 0 when the stream was reset or the connection went away."""
        sid = self.request(path, extra)
        await self.pump(lambda: self.done(sid) or self.goaway is not None)
        return int(self.heads.get(sid, {}).get(b":status", b"0")), sid

    def _parse(self) -> None:
        while len(self.buf) >= 9:
            hi, lo, ftype, flags, sid = struct.unpack(">BHBBL", self.buf[:9])
            n = (hi << 16) | lo
            if len(self.buf) < 9 + n:
                return
            payload, self.buf = self.buf[9:9 + n], self.buf[9 + n:]
            sid &= 0x7FFFFFFF
            if ftype == 0x0:   # DATA (the server never pads)
                self.data[sid] = self.data.get(sid, b"") + payload
                if n:   # keep the server's windows open
                    self.send(raw_frame(0x8, 0, 0, struct.pack(">L", n)), raw_frame(0x8, 0, sid, struct.pack(">L", n)))
            elif ftype == 0x1:   # HEADERS (our server's heads fit one frame)
                self.heads[sid] = dict(self.dec.decode(payload, raw=True))
            elif ftype == 0x3:
                self.resets[sid] = struct.unpack(">L", payload)[0]
            elif ftype == 0x6 and flags & 0x1:
                self.pings += 1
            elif ftype == 0x7:
                last, code = struct.unpack(">LL", payload[:8])
                self.goaway = (code, last & 0x7FFFFFFF)
            if ftype in (0x0, 0x1) and flags & 0x1:
                self.ended.add(sid)

    def close(self) -> None:
        self.stream.close()


class HostileUpstream(LoopbackListener):
    """An h2c "server" that answers whatever our client sends with ``script(conn_bytes) -> bytes`` once,
    then only reads (and records) what comes: a peer that floods, never opens windows, never answers."""

    def __init__(self, script, *, after_requests: int = 1):
        self.script = script
        self.after_requests = after_requests   # the script runs once this many HEADERS have arrived
        self.received = b""
        self.streams: list[TcpStream] = []

    async def _serve(self, reader, writer) -> None:
        stream = TcpStream(reader, writer)
        self.streams.append(stream)
        sent = False
        try:
            while True:
                data = await stream.read(65536)
                if not data:
                    return
                self.received += data
                if not sent and self._types().count(b"\x01") >= self.after_requests:
                    sent = True
                    stream.write(self.script())
                    await stream.drain()
        except OSError:
            return
        finally:
            stream.close()

    def _types(self) -> bytes:
        data = self.received[len(PREFACE):]
        out = bytearray()
        while len(data) >= 9:
            n = int.from_bytes(data[:3], "big")
            out.append(data[3])
            data = data[9 + n:]
        return bytes(out)

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        """(type, flags, stream id, payload) of every complete frame our client sent."""
        data = self.received[len(PREFACE):]
        out = []
        while len(data) >= 9:
            hi, lo, ftype, flags, sid = struct.unpack(">BHBBL", data[:9])
            n = (hi << 16) | lo
            if len(data) < 9 + n:
                break
            out.append((ftype, flags, sid & 0x7FFFFFFF, data[9:9 + n]))
            data = data[9 + n:]
        return out

    async def close(self) -> None:
        for s in self.streams:
            s.close()
        await super().close()



class H2Upstream:
    """An h2c server on the h2 library (not our code) in place of a waypoint harness's pods' backends.

    It records each request, in arrival order, as a dict: ``headers`` (the head, a dict of bytes),
    ``events`` (what h2 reported, in order: ``"headers"``, ``("data", length, END_STREAM)``,
    ``("trailers", END_STREAM)``, ``"end"``), ``data``, ``trailers`` (a list of fields, or None),
    ``reset`` (the code of the RST_STREAM it got, or None) and ``ended``; and each connection it
    accepted: ``pod`` (the address it was made to), ``goaway`` (the code of a GOAWAY it got, or None),
    ``closed``. Subclasses answer through ``conn`` (an ``H2Connection``): ``on_request`` as a request's
    head arrives, ``on_end`` once the request has ended; what they queue is sent after each read."""

    # False: header blocks without Huffman coding (RFC 7541 §5.2 allows either): hpack's Python coder
    # spends seconds on the 60-120 KiB blocks of the limit tests.
    huffman = True

    def __init__(self):
        self.requests: list[dict] = []
        self.connections: list[dict] = []

    async def install(self, h, ips: dict, keys=("GREETER1", "GREETER2"), port: int = 9090) -> Self:
        """Serve ``port`` on the pods ``ips[key]`` of harness ``h`` (by default both greeter pods of
        tests/test_waypoint_l7.py ``l7_harness``) instead of their own backends."""
        for key in keys:
            pod = h.pods[ips[key]]
            await pod.stop_backend()
            pod.backend = await asyncio.start_server(self._serve, ips[key], port)
        return self

    def on_request(self, conn: h2.connection.H2Connection, sid: int, r: dict) -> None:
        """A request's head has arrived (``r`` its record)."""

    def on_end(self, conn: h2.connection.H2Connection, sid: int, r: dict) -> None:
        """The request has ended (END_STREAM): its body and trailers are all in ``r``."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = {"pod": writer.get_extra_info("sockname")[0], "goaway": None, "closed": False}
        self.connections.append(record)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        if not self.huffman:
            conn.encoder.encode = functools.partial(conn.encoder.encode, huffman=False)
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, dict] = {}
        try:
            while data := await reader.read(65536):
                for e in conn.receive_data(data):
                    sid = getattr(e, "stream_id", 0)
                    r = streams.get(sid)
                    if isinstance(e, ev.RequestReceived):
                        r = streams[sid] = {"headers": dict(e.headers), "events": ["headers"], "data": b"",
                                            "trailers": None, "reset": None, "ended": False}
                        self.requests.append(r)
                        self.on_request(conn, sid, r)
                    elif isinstance(e, ev.DataReceived):
                        r["events"].append(("data", len(e.data), e.stream_ended is not None))
                        r["data"] += e.data
                        conn.acknowledge_received_data(e.flow_controlled_length, sid)
                    elif isinstance(e, ev.TrailersReceived):
                        r["events"].append(("trailers", e.stream_ended is not None))
                        r["trailers"] = list(e.headers)
                    elif isinstance(e, ev.StreamEnded) and r is not None:
                        r["events"].append("end")
                        r["ended"] = True
                        self.on_end(conn, sid, r)
                    elif isinstance(e, ev.StreamReset) and r is not None:
                        r["reset"] = int(e.error_code)
                    elif isinstance(e, ev.ConnectionTerminated):
                        record["goaway"] = int(e.error_code)
                writer.write(conn.data_to_send())
                await writer.drain()
        except (OSError, h2.exceptions.H2Error):
            pass
        finally:
            record["closed"] = True
            writer.close()


# ---------------------------------------------------------------------------------------------
# The h2c server fixture and what the limit tests check after an abuse verdict


@pytest.fixture
async def server(loopback_ip):
    """An ``H2cServer`` (default limits) on a fresh loopback address, closed after the test. (The upstream pool
    tests import it as ``h2c_server``: pytest names a fixture after the module attribute that holds it.)"""
    srv = await H2cServer().start(loopback_ip())
    try:
        yield srv
    finally:
        await srv.close()


async def still_serving(srv: H2cServer, *alive: RawClient) -> None:
    """The listener takes a new connection and serves it; connections opened before still serve."""
    fresh = await RawClient.open(srv.addr)
    try:
        status, _ = await fresh.get(b"/after")
        assert status == 200 and fresh.goaway is None
    finally:
        fresh.close()
    for c in alive:
        status, _ = await c.get(b"/still")
        assert status == 200 and c.goaway is None


async def header_list_too_large_goaway(c: RawClient, srv: H2cServer) -> None:
    """After a header block (or trailers) over the HPACK decoder's hard limit (h2's DenialOfServiceError):
    GOAWAY ENHANCE_YOUR_CALM on ``c``'s connection with the abuse verdict header_list_too_large, and that
    connection only: the listener still serves."""
    code, _ = await c.closed_by_server()
    assert code == EYC
    assert (await srv.finished(1))[0].core.abuse.reason == "header_list_too_large"
    await still_serving(srv)
