"""The new-connection load client: each connection is TCP + a full mTLS handshake + one CONNECT with
1 KiB each way + close, as its own process (``--procs`` forked copies of it).

``python -m benchmarks.conn_client --connect IP:PORT --authority IP:PORT --ca CA --cert C --key K
[--count N] [--concurrency M] [--procs P] [--verify-peer]``

What one connection costs this client, and why it is as little as Python allows: the TLS handshake
runs in OpenSSL (P-256 ECDHE, an ECDSA signature for our client certificate, a verification of the
peer's CertificateVerify); everything around it is a hand-rolled HTTP/2 exchange from precomputed
bytes (no h2 state machine: preface + SETTINGS + HEADERS in one write, the DATA frame in the next,
the 200 recognised by its one-byte HPACK form, with ``hpack`` only as the fallback) on asyncio
Protocols under uvloop. There is no resumption (each connection is a new ``SSLObject`` given no
session, and our proxy sends no tickets), so every connection is a full handshake, as ztunnel
clients do (``Resumption::disabled()``). The peer's certificate chain is not verified unless
``--verify-peer``: checking it is one more ECDSA verification per connection (~42 µs here) on the
client's side of a shared 2-core box, and says nothing about the proxy.

The forked copies share nothing; each takes ``count / procs`` connections with ``concurrency /
procs`` in flight. They start together (after loading their certificates) and each reports the CPU
of its own measured phase; the parent prints one JSON object: ``connections``, ``wall_s`` (first
start to last finish), ``cpu_user_s``/``cpu_sys_s`` (summed over the copies), ``p50_ms``/``p99_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import struct
import sys
import time

from benchmarks import wire
from benchmarks.procstat import self_cpu
from benchmarks.sink import parse_addr
from benchmarks.stats import percentile
from benchmarks.tuning import tune_process

PAYLOAD_BYTES = 1024          # "1 KiB each way", as in the short-tunnel scenario
CONNECT_TIMEOUT_S = 10.0      # one connection, TCP + TLS + CONNECT + echo, on a loaded box
START_TIMEOUT_S = 30.0        # all copies loaded their certificates and are waiting for the go

# RFC 9113 §4.1 frame header; §6 frame types and flags.
FRAME = struct.Struct("!BHBBL")   # 24-bit length split as 8 + 16 bits, type, flags, stream id
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STATUS_200_INDEXED = 0x88     # RFC 7541 Appendix A: static index 8 is ":status: 200"
STREAM = 1                    # the only stream of each connection


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME.pack(n >> 16, n & 0xFFFF, ftype, flags, stream) + payload


def literal(index: int, value: bytes) -> bytes:
    """RFC 7541 §6.2.2 literal without indexing, indexed name (4-bit prefix), raw value (< 127 bytes)."""
    assert index < 15 and len(value) < 127
    return bytes([index, len(value)]) + value


def request_bytes(authority: str) -> tuple[bytes, bytes]:
    """(first write, DATA write): preface + empty SETTINGS + HEADERS(CONNECT), then the echo request
    with END_STREAM. Static table: 2 is :method, 1 is :authority."""
    block = literal(2, b"CONNECT") + literal(1, authority.encode())
    first = PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, STREAM, block)
    body = wire.encode_header("echo", PAYLOAD_BYTES) + wire.PAYLOAD_BLOCK[:PAYLOAD_BYTES]
    return first, frame(DATA, END_STREAM, STREAM, body)


SETTINGS_ACK = frame(SETTINGS, ACK, 0)
GOAWAY_OK = frame(GOAWAY, 0, 0, struct.pack("!LL", 0, 0))


class ConnError(Exception):
    pass


def response_status(block: bytes) -> int:
    """The :status of a response header block: the one-byte indexed form, else a full HPACK decode."""
    if block[:1] == bytes([STATUS_200_INDEXED]):
        return 200
    import hpack
    for name, value in hpack.Decoder().decode(block, raw=True):
        if name == b":status":
            return int(value)
    return 0


class OneConnect(asyncio.Protocol):
    """One connection's exchange, driven by the frames it receives."""

    __slots__ = ("first", "data", "done", "transport", "buf", "status", "received", "ended")

    def __init__(self, first: bytes, data: bytes, done: asyncio.Future):
        self.first, self.data, self.done = first, data, done
        self.transport = None
        self.buf = b""
        self.status = 0
        self.received = 0

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.first)

    def data_received(self, chunk: bytes):
        buf = self.buf + chunk if self.buf else chunk
        out = []
        pos = 0
        while len(buf) - pos >= 9:
            hi, lo, ftype, flags, sid = FRAME.unpack_from(buf, pos)
            n = (hi << 16) | lo
            if len(buf) - pos - 9 < n:
                break
            payload = buf[pos + 9:pos + 9 + n]
            pos += 9 + n
            if ftype == SETTINGS:
                if not flags & ACK:
                    out.append(SETTINGS_ACK)
            elif ftype == HEADERS and sid == STREAM:
                block = _unpad(payload, flags)
                if not self.status:
                    self.status = response_status(block)
                    if self.status != 200:
                        return self._fail(f"CONNECT answered {self.status}")
                    out.append(self.data)
                if flags & END_STREAM:
                    return self._finish()
            elif ftype == DATA and sid == STREAM:
                self.received += len(_unpad(payload, flags))
                if flags & END_STREAM:
                    return self._finish()
            elif ftype == PING and not flags & ACK:
                out.append(frame(PING, ACK, 0, payload))
            elif ftype == RST_STREAM:
                return self._fail(f"stream reset (error {struct.unpack('!L', payload)[0]})")
            elif ftype == GOAWAY:
                return self._fail("GOAWAY before the exchange finished")
            # WINDOW_UPDATE, PRIORITY, unknown types: nothing to do for 1 KiB
        self.buf = buf[pos:]
        if out:
            self.transport.write(b"".join(out))

    def _finish(self):
        if self.received != PAYLOAD_BYTES:
            return self._fail(f"got {self.received} of {PAYLOAD_BYTES} bytes back")
        self.transport.write(GOAWAY_OK)
        self.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, why: str):
        self.transport.abort()
        if not self.done.done():
            self.done.set_exception(ConnError(why))

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(ConnError(f"connection lost: {exc or 'closed by the peer'}"))


def _unpad(payload: bytes, flags: int) -> bytes:
    """RFC 9113 §6.1/§6.2: strip padding (and a HEADERS priority block)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        start, end = 1, end - payload[0]
    if flags & PRIORITY:
        start += 5
    return payload[start:end]


def _connected(connecting: asyncio.Task, done: asyncio.Future) -> None:
    """A failed TCP connect or handshake fails the connection's future at once."""
    if not connecting.cancelled() and connecting.exception() is not None and not done.done():
        done.set_exception(ConnError(f"connect: {connecting.exception()}"))


def client_context(ca: str, cert: str, key: str, verify_peer: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False   # HBONE checks SPIFFE identities, not names
    ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def drive(host: str, port: int, authority: str, ctx: ssl.SSLContext, count: int,
                concurrency: int) -> list[float]:
    """count connections, at most concurrency at once; returns each one's latency in seconds."""
    loop = asyncio.get_running_loop()
    first, data = request_bytes(authority)
    latencies: list[float] = []
    left = count

    def expire(fut: asyncio.Future) -> None:
        if not fut.done():
            fut.set_exception(ConnError(f"no answer within {CONNECT_TIMEOUT_S:.0f} s"))

    async def lane() -> None:
        # One timer per connection rather than asyncio.wait_for, which wraps each await in a new Task.
        nonlocal left
        while left > 0:
            left -= 1
            t0 = time.perf_counter()
            done = loop.create_future()
            timer = loop.call_later(CONNECT_TIMEOUT_S, expire, done)
            connecting = loop.create_task(loop.create_connection(
                lambda: OneConnect(first, data, done), host, port, ssl=ctx, server_hostname=""))
            connecting.add_done_callback(lambda c, done=done: _connected(c, done))
            try:
                await done
            finally:
                timer.cancel()
                if not connecting.done():
                    connecting.cancel()
                elif not connecting.cancelled() and connecting.exception() is None:
                    connecting.result()[0].close()
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(lane() for _ in range(min(concurrency, count))))
    return latencies


def run_copy(args, count: int, concurrency: int, go_fd: int, out_fd: int) -> None:
    """One forked copy: load certificates, wait for the go byte, run, write its JSON to out_fd."""
    import uvloop
    tune_process()
    ctx = client_context(args.ca, args.cert, args.key, args.verify_peer)
    os.write(out_fd, b"R")  # ready
    if not os.read(go_fd, 1):
        return
    cpu0, t0 = self_cpu(), time.time()
    err = None
    lat: list[float] = []
    try:
        lat = uvloop.run(drive(*args.connect, args.authority, ctx, count, concurrency))
    except Exception as e:  # the row says why instead of a number
        err = f"{type(e).__name__}: {e}"
    cpu = self_cpu() - cpu0
    doc = {"connections": len(lat), "start": t0, "end": time.time(), "cpu_user_s": cpu.user_s,
           "cpu_sys_s": cpu.system_s, "latencies": lat, "error": err}
    os.write(out_fd, (json.dumps(doc) + "\n").encode())


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, all cores, in clock ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def cpu_count() -> int:
    """The cores /proc/stat's first line sums (its cpuN lines)."""
    with open("/proc/stat") as f:
        return sum(1 for line in f if line.startswith("cpu") and line[3:4].isdigit())


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(args) -> dict:
    procs = max(1, min(args.procs, args.count))
    go_r, go_w = os.pipe()
    kids = []
    for count, conc in zip(split(args.count, procs), split(max(args.concurrency, procs), procs)):
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.close(out_r)
            code = 1
            try:
                run_copy(args, count, conc, go_r, out_w)
                code = 0
            finally:
                os._exit(code)
        os.close(out_w)
        kids.append((pid, os.fdopen(out_r, "rb")))
    os.close(go_r)
    deadline = time.monotonic() + START_TIMEOUT_S
    for _, f in kids:
        if f.read(1) != b"R" or time.monotonic() > deadline:
            raise SystemExit("conn_client: a copy failed to start")
    busy0, all0 = machine_busy_s()
    os.write(go_w, b"G" * len(kids))
    docs = []
    for pid, f in kids:
        line = f.readline()
        os.waitpid(pid, 0)
        if not line:
            raise SystemExit(f"conn_client: copy {pid} died without a result")
        docs.append(json.loads(line))
    busy1, all1 = machine_busy_s()
    os.close(go_w)
    errors = [d["error"] for d in docs if d["error"]]
    lat = [x for d in docs for x in d["latencies"]]
    out = {"client": "python-conn", "procs": procs, "concurrency": args.concurrency,
           "connections": sum(d["connections"] for d in docs), "expected": args.count,
           "wall_s": max(d["end"] for d in docs) - min(d["start"] for d in docs),
           "cpu_user_s": sum(d["cpu_user_s"] for d in docs), "cpu_sys_s": sum(d["cpu_sys_s"] for d in docs),
           "verify_peer": args.verify_peer,
           # the whole machine (this benchmark and anything else running), in cores
           "machine_busy_cores": (busy1 - busy0) / (all1 - all0) * cpu_count() if all1 > all0 else None}
    if lat:
        out.update(p50_ms=percentile(lat, 50) * 1e3, p99_ms=percentile(lat, 99) * 1e3)
    if errors:
        out["error"] = errors[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.conn_client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connect", type=parse_addr, required=True, help="the proxy's HBONE listener")
    ap.add_argument("--authority", required=True, help="the CONNECT target (the sink, IP:PORT)")
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--count", type=int, default=1000, help="connections in total")
    ap.add_argument("--concurrency", type=int, default=32, help="connections in flight in total")
    ap.add_argument("--procs", type=int, default=2, help="forked copies sharing the count")
    ap.add_argument("--verify-peer", action="store_true", help="verify the proxy's certificate chain too")
    args = ap.parse_args(argv)
    if args.count < 1 or args.concurrency < 1 or args.procs < 1:
        ap.error("--count, --concurrency and --procs must be at least 1")
    result = run(args)
    print(json.dumps(result), flush=True)
    if "error" in result:
        print(f"conn_client: {result['connections']} of {args.count} connections completed: {result['error']}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
