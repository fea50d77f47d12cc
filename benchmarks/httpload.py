"""A small HTTP/1.1 keep-alive load client that can reach its target through SOCKS5 (the HTTP scenario).

``python -m benchmarks.httpload --target IP:PORT [--socks IP:PORT --source-ip IP] (--connections N
--seconds S | --rate R --seconds S)``

The HTTP scenario's ``load`` rows: with ``--full`` (next to wrk's and the C client's), and in quick
mode only where the C client (benchmarks/hbone_httpload.c, which now speaks SOCKS5 too and costs a
few µs per request where this costs ~27) cannot be built.

Why not wrk: wrk cannot speak SOCKS5, and the only way an app outside a pod network namespace
reaches our mesh on loopback is node-a's SOCKS5 listener (15080) from the client pod's IP; wrk also
has no fixed-rate mode (wrk2 is not in Debian), which the issue's "added p99 at a fixed 1 000 req/s"
needs. One process, uvloop, one asyncio ``Protocol`` per connection, responses parsed with httptools
(llhttp) — so it costs a few µs per request, not the proxy's.

- closed loop (``--connections N``): each connection sends its next GET as soon as the previous
  response is complete (as wrk does);
- open loop (``--rate R``): requests are scheduled every 1/R s and handed to an idle connection (or
  queued for the next one free); latency is measured from the *scheduled* time, so a stall counts in
  full (no coordinated omission).

Prints one JSON line: requests, wall_s, rps, p50_ms, p99_ms, status counts, bodies (first line of
each body: "v1"/"v2" shows the split), errors, and the client's own CPU during the measured phase.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import struct
import sys
import time

import httptools

from benchmarks.procstat import self_cpu
from benchmarks.sink import parse_addr
from benchmarks.stats import percentile

REQUEST_TEMPLATE = "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: hbone-bench\r\n{extra}\r\n"
WARMUP_S = 0.3  # first requests pay TLS handshakes and h2 connection set-up at each hop: not measured
CONNECT_TIMEOUT_S = 10.0
# Open loop: how many scheduled requests may wait for a free connection before the run is declared
# overloaded (latencies would be meaningless; the row says so instead).
MAX_BACKLOG = 10_000


class LoadError(Exception):
    pass


async def open_socks5(socks: tuple[str, int], source_ip: str | None, host: str, port: int) -> socket.socket:
    """A connected, non-blocking socket through SOCKS5 (RFC 1928: no auth, CONNECT to an IPv4 address)."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        if source_ip:
            s.bind((source_ip, 0))
        await loop.sock_connect(s, socks)
        await loop.sock_sendall(s, b"\x05\x01\x00")
        if await _recv_exact(loop, s, 2) != b"\x05\x00":
            raise LoadError("SOCKS5 proxy refused 'no authentication'")
        await loop.sock_sendall(s, b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
        head = await _recv_exact(loop, s, 4)
        if head[1] != 0:
            raise LoadError(f"SOCKS5 reply {head[1]:#04x}")
        await _recv_exact(loop, s, {1: 4, 4: 16}.get(head[3], 4) + 2)
        return s
    except BaseException:
        s.close()
        raise


async def _recv_exact(loop, s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(s, n - len(buf))
        if not chunk:
            raise LoadError("SOCKS5 proxy closed the connection")
        buf += chunk
    return buf


class Conn(asyncio.Protocol):
    """One keep-alive connection: send a GET, parse the response, tell the driver."""

    def __init__(self, driver: "Driver", request: bytes):
        self.driver = driver
        self.request = request
        self.parser = httptools.HttpResponseParser(self)
        self.transport = None
        self.started = 0.0
        self.body = b""
        self.busy = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, started: float) -> None:
        self.started = started
        self.busy = True
        self.body = b""
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            self.driver.fail(f"bad response: {err}")

    def on_body(self, body: bytes) -> None:
        if len(self.body) < 16:
            self.body += body

    def on_message_complete(self) -> None:
        self.busy = False
        self.driver.done(self, self.parser.get_status_code(), self.body)

    def connection_lost(self, exc) -> None:
        if not self.driver.stopping:
            self.driver.fail(f"connection lost: {exc or 'EOF'}")


class Driver:
    def __init__(self, rate: float | None):
        self.rate = rate
        self.latencies: list[float] = []
        self.statuses: collections.Counter = collections.Counter()
        self.bodies: collections.Counter = collections.Counter()
        self.measuring = False
        self.stopping = False
        self.error: str | None = None
        self.idle: list[Conn] = []
        self.backlog: collections.deque[float] = collections.deque()
        self.requests = 0

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why

    def done(self, conn: Conn, status: int, body: bytes) -> None:
        now = time.perf_counter()
        if self.measuring:
            self.latencies.append(now - conn.started)
            self.statuses[status] += 1
            self.bodies[body.split(b"\n", 1)[0].decode(errors="replace")] += 1
            self.requests += 1
        if self.stopping:
            return
        if self.rate is None:
            conn.send(now)
        elif self.backlog:
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def schedule(self, at: float) -> None:
        if self.idle:
            self.idle.pop().send(at)
        else:
            self.backlog.append(at)
            if len(self.backlog) > MAX_BACKLOG:
                self.fail(f"overloaded: {MAX_BACKLOG} requests waiting for a free connection")


async def run(args) -> dict:
    loop = asyncio.get_running_loop()
    host, port = args.target
    extra = "".join(f"{h}\r\n" for h in args.header)
    request = REQUEST_TEMPLATE.format(host=args.host or f"{host}:{port}", extra=extra).encode()
    driver = Driver(args.rate)
    conns: list[Conn] = []
    async with asyncio.timeout(CONNECT_TIMEOUT_S):
        for _ in range(args.connections):
            if args.socks:
                sock = await open_socks5(args.socks, args.source_ip, host, port)
                _, conn = await loop.create_connection(lambda: Conn(driver, request), sock=sock)
            else:
                _, conn = await loop.create_connection(lambda: Conn(driver, request), host, port)
            conns.append(conn)
    for c in conns:
        c.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if args.rate is None:
        for c in conns:
            c.send(time.perf_counter())
        await asyncio.sleep(WARMUP_S)
        driver.measuring = True
        cpu0, t0 = self_cpu(), time.perf_counter()
        await asyncio.sleep(args.seconds)
    else:
        driver.idle = list(conns)
        interval = 1.0 / args.rate
        t_start = time.perf_counter()
        n = 0
        cpu0 = t0 = None
        end = t_start + WARMUP_S + args.seconds
        while driver.error is None:
            now = time.perf_counter()
            if cpu0 is None and now >= t_start + WARMUP_S:
                driver.measuring = True
                cpu0, t0 = self_cpu(), now
            if now >= end:
                break
            due = t_start + n * interval
            while due <= now:
                driver.schedule(due)
                n += 1
                due = t_start + n * interval
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
    wall = time.perf_counter() - t0
    cpu = self_cpu() - cpu0
    driver.stopping = True
    # Let in-flight requests of the measured window finish (their latency counts), briefly.
    deadline = time.perf_counter() + 1.0
    while any(c.busy for c in conns) and time.perf_counter() < deadline and driver.error is None:
        await asyncio.sleep(0.005)
    for c in conns:
        c.transport.close()
    if driver.error:
        raise LoadError(driver.error)
    lat = sorted(driver.latencies)
    return {"requests": driver.requests, "wall_s": wall, "rps": driver.requests / wall,
            "p50_ms": percentile(lat, 50) * 1e3 if lat else None,
            "p99_ms": percentile(lat, 99) * 1e3 if lat else None,
            "statuses": {str(k): v for k, v in driver.statuses.items()}, "bodies": dict(driver.bodies),
            "cpu_user_s": cpu.user_s, "cpu_sys_s": cpu.system_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.httpload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=parse_addr, required=True, help="IP:PORT the requests go to")
    ap.add_argument("--host", help="Host header (default: the target)")
    ap.add_argument("--socks", type=parse_addr, help="reach the target through this SOCKS5 proxy")
    ap.add_argument("--source-ip", help="bind the SOCKS5 connections to this IP (the client pod)")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--rate", type=float, help="open loop: requests per second over all connections")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--header", action="append", default=[], help="extra request header 'Name: value'")
    args = ap.parse_args(argv)
    import uvloop
    try:
        out = uvloop.run(run(args))
    except (LoadError, OSError, TimeoutError) as err:
        print(f"httpload: {err.__class__.__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
