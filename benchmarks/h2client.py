"""The large-frame load client: HBONE (mTLS HTTP/2 CONNECT) with h2, as its own process.

``python -m benchmarks.h2client --connect IP:PORT --authority IP:PORT --ca CA --cert C --key K
--op upload|download|multi|short|idle [--bytes N] [--tunnels K] [--inflight M] [--count S]``
or ``--direct`` for plain TCP straight to the sink (the no-proxy baseline).

It advertises 1 MiB frames and 16 MiB stream / 64 MiB connection windows, and sends frames as large
as the peer allows (our relay: 1 MiB; nghttpx advertises no SETTINGS_MAX_FRAME_SIZE, so 16 KiB — the
JSON says which). It applies the same two fixes as the proxy (h2's eager DATA-frame repr, glibc
malloc thresholds) so that the client is not the bottleneck. It is deliberately independent of
``hbone/``: the load generator must not change when the proxy under test does.

Prints one JSON object on stdout. The clock starts once the connection is up (TLS + SETTINGS).
For ``idle`` it talks to the harness over stdin/stdout: ``WARM`` (1 tunnel open) → wait for a line
→ open K tunnels → ``OPEN {json}`` → wait for a line → close all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import hyperframe.frame

from benchmarks import wire
from benchmarks.procstat import self_cpu
from benchmarks.sink import parse_addr
from benchmarks.stats import percentile
from benchmarks.tuning import tune_process

KiB, MiB = 1024, 1024 * 1024
# Windows from performance.md: 16 MiB per stream / 64 MiB per connection took a relay from ~195 to
# ~220 MB/s and nghttpx from ~160-250 to ~690; the client must never be the one that stalls.
CLIENT_STREAM_WINDOW_BYTES = 16 * MiB
CLIENT_CONNECTION_WINDOW_BYTES = 64 * MiB
CLIENT_MAX_FRAME_BYTES = 1 * MiB  # the "large frames" of this client
CLIENT_READ_BYTES = 256 * KiB
# Keep at most this much queued in the transport before waiting for it to drain.
WRITE_HIGH_WATER_BYTES = 4 * MiB
# Stream cap we advertise; 8 000 idle tunnels all live on one connection.
CLIENT_MAX_CONCURRENT_STREAMS = 100_000
HANDSHAKE_TIMEOUT_S = 10.0
SHORT_PAYLOAD_BYTES = 1024  # "short tunnels: 1 KiB each way"


def _data_body_repr(self) -> str:
    # h2 4.4.1 formats repr(frame) for a trace log on every received frame, and hyperframe's DATA
    # repr hex-encodes the payload (performance.md: about half the CPU of an upload).
    return f"<data {len(self.data)} bytes>"


class CountingH2Connection(h2.connection.H2Connection):
    """h2 counts open streams by scanning every stream each time one opens (performance.md: opening
    1 000 / 4 000 / 8 000 tunnels took 0.3 / 1.9 / 5.6 s). The idle scenario times how fast the
    PROXY opens 8 000 tunnels, so the client keeps its own count (the tunnels it has not closed)."""

    tunnel_table: dict = {}

    @property
    def open_outbound_streams(self) -> int:
        return len(self.tunnel_table)


class Tunnel:
    __slots__ = ("sid", "status", "response", "received", "ended", "got", "window_open", "chunks_wanted")

    def __init__(self, sid: int, loop: asyncio.AbstractEventLoop):
        self.sid = sid
        self.status = 0
        self.response = loop.create_future()
        self.received = 0
        self.ended = loop.create_future()
        self.got = asyncio.Event()
        self.window_open = asyncio.Event()
        self.chunks_wanted = 0


class H2Client(asyncio.Protocol):
    """One HTTP/2 connection: a sans-IO h2 core with a thin Protocol shell."""

    def __init__(self, authority: str):
        self.loop = asyncio.get_running_loop()
        self.authority = authority
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = CountingH2Connection(config=cfg)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: CLIENT_STREAM_WINDOW_BYTES,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: CLIENT_MAX_FRAME_BYTES,
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: CLIENT_MAX_CONCURRENT_STREAMS,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        # performance.md pitfall: replacing local_settings leaves max_inbound_frame_size at 16 384.
        self.conn.max_inbound_frame_size = CLIENT_MAX_FRAME_BYTES
        self.tunnels: dict[int, Tunnel] = {}
        self.conn.tunnel_table = self.tunnels
        self.transport = None
        self.ready = self.loop.create_future()  # the peer's SETTINGS arrived
        self.closed = self.loop.create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.blocked: set[Tunnel] = set()  # tunnels waiting for flow-control window: only they are woken

    # -- shell
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER_BYTES)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CLIENT_CONNECTION_WINDOW_BYTES - 65535)
        self.flush()

    def flush(self):
        out = self.conn.data_to_send()
        if out and self.transport is not None:
            self.transport.write(out)

    def pause_writing(self):
        self.can_write.clear()

    def resume_writing(self):
        self.can_write.set()

    def connection_lost(self, exc):
        self.transport = None
        err = exc or ConnectionError("connection closed")
        for fut in (self.ready, self.closed):
            if not fut.done():
                fut.set_result(None) if fut is self.closed else fut.set_exception(err)
        for t in self.tunnels.values():
            for fut in (t.response, t.ended):
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection lost on stream {t.sid}"))
            t.got.set()
            t.window_open.set()
        self.can_write.set()

    def data_received(self, data: bytes):
        events = self.conn.receive_data(data)
        for ev in events:
            t = self.tunnels.get(getattr(ev, "stream_id", 0) or 0)
            if isinstance(ev, h2.events.DataReceived):
                if t is not None:
                    t.received += len(ev.data)
                    t.got.set()
                if ev.flow_controlled_length:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.ResponseReceived):
                if t is not None:
                    t.status = int(dict(ev.headers).get(b":status", b"0"))
                    if not t.response.done():
                        t.response.set_result(t.status)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                if t is not None:
                    if not t.response.done():
                        t.response.set_result(t.status)
                    if not t.ended.done():
                        t.ended.set_result(isinstance(ev, h2.events.StreamEnded) or ev.error_code in (0, 8))
                    t.got.set()
            elif isinstance(ev, h2.events.WindowUpdated):
                if ev.stream_id == 0:
                    for tt in self.blocked:
                        tt.window_open.set()
                elif t is not None:
                    t.window_open.set()
            elif isinstance(ev, h2.events.RemoteSettingsChanged):
                if not self.ready.done():
                    self.ready.set_result(None)
                for tt in self.blocked:
                    tt.window_open.set()
            elif isinstance(ev, h2.events.ConnectionTerminated):
                if self.transport is not None:
                    self.transport.close()
        self.flush()

    # -- tunnels
    async def open(self) -> Tunnel:
        sid = self.conn.get_next_available_stream_id()
        t = self.tunnels[sid] = Tunnel(sid, self.loop)
        self.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", self.authority.encode())])
        self.flush()
        status = await t.response
        if status != 200:
            raise ConnectionError(f"CONNECT {self.authority} answered {status}")
        return t

    async def send(self, t: Tunnel, head: bytes, length: int, *, end: bool) -> None:
        """Send head + length payload bytes on t, as large frames as flow control and the peer allow."""
        block = memoryview(wire.PAYLOAD_BLOCK)
        pending = memoryview(head)
        remaining = length
        while pending or remaining:
            if not self.can_write.is_set():
                await self.can_write.wait()
            if self.transport is None:
                raise ConnectionError("connection lost while sending")
            window = min(self.conn.local_flow_control_window(t.sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                t.window_open.clear()
                self.blocked.add(t)
                try:
                    await t.window_open.wait()
                finally:
                    self.blocked.discard(t)
                continue
            if pending:
                chunk, pending = pending[:window], pending[window:]
                if len(chunk) < window and remaining:
                    take = min(window - len(chunk), remaining, len(block))
                    chunk = bytes(chunk) + bytes(block[:take])
                    remaining -= take
            else:
                take = min(window, remaining, len(block))
                chunk = block[:take]
                remaining -= take
            self.conn.send_data(t.sid, chunk, end_stream=end and not pending and not remaining)
            self.flush()
        if end and length == 0 and not head:
            self.conn.end_stream(t.sid)
            self.flush()

    async def receive(self, t: Tunnel, want: int) -> int:
        """Wait until want bytes arrived on t (or it ended); returns the count."""
        while t.received < want and not t.ended.done():
            t.got.clear()
            await t.got.wait()
            if self.transport is None and t.received < want:
                break
        return t.received

    def close_tunnel(self, t: Tunnel) -> None:
        """End our side; if the peer already finished, forget the stream."""
        try:
            if self.conn.streams.get(t.sid) is not None and not self.conn.streams[t.sid].closed:
                self.conn.reset_stream(t.sid, 8)  # CANCEL: a clean end in HBONE terms
                self.flush()
        except Exception:  # already closed by the peer between the check and the reset
            pass
        self.tunnels.pop(t.sid, None)


async def connect_h2(host: str, port: int, authority: str, ctx: ssl.SSLContext) -> H2Client:
    loop = asyncio.get_running_loop()
    _, proto = await asyncio.wait_for(
        loop.create_connection(lambda: H2Client(authority), host, port, ssl=ctx, server_hostname=""),
        HANDSHAKE_TIMEOUT_S)
    await asyncio.wait_for(proto.ready, HANDSHAKE_TIMEOUT_S)
    return proto


def client_ssl_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # HBONE checks SPIFFE identities, not names; a load client checks the chain
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


# ------------------------------------------------------------------------------------- HBONE ops
async def h2_bulk(cli: H2Client, op: str, total: int, tunnels: int) -> int:
    per = [total // tunnels + (1 if i < total % tunnels else 0) for i in range(tunnels)]

    async def one(n: int) -> int:
        t = await cli.open()
        if op == "upload":
            await cli.send(t, wire.encode_header("upload", n), n, end=True)
            await cli.receive(t, wire.ACK.size)
            if t.received != wire.ACK.size:
                raise ConnectionError(f"upload of {n} bytes: sink acknowledged {t.received} bytes of reply")
            got = n  # the sink acknowledges only after counting all n bytes
        else:
            await cli.send(t, wire.encode_header("download", n), 0, end=True)
            got = await cli.receive(t, n)
        cli.close_tunnel(t)
        return got

    return sum(await asyncio.gather(*(one(n) for n in per)))


async def h2_short(cli: H2Client, count: int, inflight: int) -> tuple[int, list[float]]:
    latencies: list[float] = []
    done = 0
    sem = asyncio.Semaphore(inflight)

    async def one() -> None:
        nonlocal done
        async with sem:
            t0 = time.perf_counter()
            t = await cli.open()
            await cli.send(t, wire.encode_header("echo", SHORT_PAYLOAD_BYTES), SHORT_PAYLOAD_BYTES, end=True)
            got = await cli.receive(t, SHORT_PAYLOAD_BYTES)
            if got != SHORT_PAYLOAD_BYTES:
                raise ConnectionError(f"short tunnel {t.sid}: got {got} of {SHORT_PAYLOAD_BYTES} bytes")
            await t.ended  # the sink closes after replying; the proxy turns that into END_STREAM
            latencies.append(time.perf_counter() - t0)
            cli.close_tunnel(t)
            done += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return done, latencies


async def h2_idle(cli: H2Client, tunnels: int) -> dict:
    first = await cli.open()
    await cli.send(first, wire.encode_header("idle", 0), 0, end=False)
    await _handshake_line("WARM")
    t0 = time.perf_counter()
    opened = await asyncio.gather(*(cli.open() for _ in range(tunnels)))
    for t in opened:
        cli.conn.send_data(t.sid, wire.encode_header("idle", 0))
    cli.flush()
    open_s = time.perf_counter() - t0
    await _handshake_line("OPEN " + json.dumps({"open_s": open_s, "tunnels": len(opened)}))
    return {"open_s": open_s, "tunnels": len(opened)}


async def _handshake_line(msg: str) -> None:
    print(msg, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


# ------------------------------------------------------------------------------------ direct ops
async def tcp_bulk(host: str, port: int, op: str, total: int, tunnels: int) -> int:
    per = [total // tunnels + (1 if i < total % tunnels else 0) for i in range(tunnels)]

    async def one(n: int) -> int:
        r, w = await asyncio.open_connection(host, port, limit=CLIENT_READ_BYTES)
        if op == "upload":
            w.write(wire.encode_header("upload", n))
            block = memoryview(wire.PAYLOAD_BLOCK)
            left = n
            while left:
                take = min(left, len(block))
                w.write(block[:take])
                left -= take
                await w.drain()
            ack = await r.readexactly(wire.ACK.size)
            got = wire.ACK.unpack(ack)[0]
        else:
            w.write(wire.encode_header("download", n))
            got = 0
            while got < n:
                d = await r.read(CLIENT_READ_BYTES)
                if not d:
                    break
                got += len(d)
        w.close()
        return got

    return sum(await asyncio.gather(*(one(n) for n in per)))


async def tcp_short(host: str, port: int, count: int, inflight: int) -> tuple[int, list[float]]:
    latencies: list[float] = []
    sem = asyncio.Semaphore(inflight)
    payload = wire.encode_header("echo", SHORT_PAYLOAD_BYTES) + wire.PAYLOAD_BLOCK[:SHORT_PAYLOAD_BYTES]

    async def one() -> None:
        async with sem:
            t0 = time.perf_counter()
            r, w = await asyncio.open_connection(host, port)
            w.write(payload)
            await r.readexactly(SHORT_PAYLOAD_BYTES)
            await r.read()  # EOF: the sink closed
            latencies.append(time.perf_counter() - t0)
            w.close()

    await asyncio.gather(*(one() for _ in range(count)))
    return len(latencies), latencies


async def tcp_idle(host: str, port: int, tunnels: int) -> dict:
    async def one():
        r, w = await asyncio.open_connection(host, port)
        w.write(wire.encode_header("idle", 0))
        return w
    first = await one()
    await _handshake_line("WARM")
    t0 = time.perf_counter()
    ws = await asyncio.gather(*(one() for _ in range(tunnels)))
    open_s = time.perf_counter() - t0
    await _handshake_line("OPEN " + json.dumps({"open_s": open_s, "tunnels": len(ws)}))
    for w in [first, *ws]:
        w.close()
    return {"open_s": open_s, "tunnels": len(ws)}


# ------------------------------------------------------------------------------------------- main
async def run(args) -> dict:
    host, port = args.connect
    out: dict = {"client": "python-h2" if not args.direct else "python-tcp", "op": args.op}
    cli = None
    if not args.direct:
        cli = await connect_h2(host, port, args.authority, client_ssl_context(args.ca, args.cert, args.key))
        out["frame_out"] = cli.conn.max_outbound_frame_size
        out["frame_in_max"] = cli.conn.max_inbound_frame_size
    cpu0, t0 = self_cpu(), time.perf_counter()
    if args.op in ("upload", "download", "multi"):
        op = "upload" if args.op == "multi" else args.op
        tunnels = args.tunnels if args.op == "multi" else 1
        got = await (h2_bulk(cli, op, args.bytes, tunnels) if cli else tcp_bulk(host, port, op, args.bytes, tunnels))
        out.update(bytes=got, expected=args.bytes, tunnels=tunnels)
    elif args.op == "short":
        n, lat = await (h2_short(cli, args.count, args.inflight) if cli else
                        tcp_short(host, port, args.count, args.inflight))
        out.update(streams=n, expected=args.count, p50_ms=percentile(lat, 50) * 1e3,
                   p99_ms=percentile(lat, 99) * 1e3)
    elif args.op == "idle":
        out.update(await (h2_idle(cli, args.tunnels) if cli else tcp_idle(host, port, args.tunnels)))
    wall = time.perf_counter() - t0
    cpu = self_cpu() - cpu0
    out.update(wall_s=wall, cpu_user_s=cpu.user_s, cpu_sys_s=cpu.system_s)
    if cli is not None and cli.transport is not None:
        cli.conn.close_connection()
        cli.flush()
        cli.transport.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.h2client")
    ap.add_argument("--connect", type=parse_addr, required=True)
    ap.add_argument("--authority", default="")
    ap.add_argument("--direct", action="store_true", help="plain TCP to the sink, no proxy")
    ap.add_argument("--ca")
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--op", choices=["upload", "download", "multi", "short", "idle"], required=True)
    ap.add_argument("--bytes", type=int, default=16 * MiB)
    ap.add_argument("--tunnels", type=int, default=64)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = ap.parse_args(argv)
    if not args.direct and not (args.ca and args.cert and args.key and args.authority):
        ap.error("--ca, --cert, --key and --authority are required unless --direct")
    tune_process()
    hyperframe.frame.DataFrame._body_repr = _data_body_repr
    if args.loop == "uvloop":
        import uvloop
        result = uvloop.run(run(args))
    else:
        result = asyncio.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
