"""The reviews pods behind nghttpx in the HTTP scenario's ``wp-only`` rows, as one process.

``python -m benchmarks.connect_http --listen IP:PORT --body POD_IP=TEXT [--body POD_IP=TEXT ...]``

nghttpx never dials a CONNECT's authority itself: it forwards each CONNECT to its backend as an
HTTP/1.1 ``CONNECT <authority> HTTP/1.1`` and, on a 2xx, relays the tunnel's bytes to that backend
connection (see benchmarks/sink.py, which plays the same part for the tunnel scenarios). nginx
answers a CONNECT 405, so it cannot be that backend; this is. Each connection: read the CONNECT head,
answer ``200``, then answer every HTTP/1.1 request head that arrives with a small keep-alive
response whose body is the TEXT given for the CONNECT authority's IP (``v1``/``v2``, as the nginx
backends of the other rows say), so the waypoint's 90/10 split shows in the bodies. Requests are
the benchmark's GETs: no request bodies (a head with Content-Length or Transfer-Encoding closes the
connection rather than being misread).

asyncio Protocols on uvloop, no per-connection coroutine, one write per read however many requests
it held, so that it costs little next to the proxy it feeds. Prints ``READY`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from benchmarks.sink import parse_addr
from benchmarks.tuning import tune_process

MAX_HEAD_BYTES = 16 * 1024  # a CONNECT head from nghttpx is ~100 bytes, a request ~100: more is junk
# Same head as the nginx backends' `return 200 "vN\n"` minus Server/Date (nginx: ~150 bytes).
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"


class Backend(asyncio.Protocol):
    def __init__(self, bodies: dict[str, bytes]):
        self.bodies = bodies
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.response: bytes | None = None   # None until the CONNECT head is in

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        buf = self.buf + data if self.buf else data
        if self.response is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._keep(buf)
                return
            line = buf[:buf.find(b"\r\n")].split()
            if len(line) != 3 or line[0] != b"CONNECT":
                self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()
                return
            body = self.bodies.get(line[1].rpartition(b":")[0].decode(errors="replace"))
            if body is None:
                self.transport.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                self.transport.close()
                return
            self.response = RESPONSE % (len(body), body)
            self.transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
            buf = buf[end + 4:]
        heads = buf.count(b"\r\n\r\n")
        if heads:
            cut = buf.rfind(b"\r\n\r\n") + 4
            done, buf = buf[:cut], buf[cut:]
            low = done.lower()
            if b"\ncontent-length:" in low or b"\ntransfer-encoding:" in low:
                self.transport.close()   # a request body: not what the benchmark sends
                return
            self.transport.write(self.response * heads)
        self._keep(buf)

    def _keep(self, buf: bytes) -> None:
        if len(buf) > MAX_HEAD_BYTES:
            self.transport.close()
            buf = b""
        self.buf = buf


async def serve(listen: tuple[str, int], bodies: dict[str, bytes]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Backend(bodies), *listen, backlog=4096, reuse_address=True)
    print("READY", flush=True)
    async with server:
        await server.serve_forever()


def parse_body(text: str) -> tuple[str, bytes]:
    ip, sep, body = text.partition("=")
    if not sep or not ip:
        raise argparse.ArgumentTypeError(f"--body {text!r}: expected POD_IP=TEXT")
    return ip, body.encode() + b"\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.connect_http", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=parse_addr, required=True)
    ap.add_argument("--body", type=parse_body, action="append", required=True,
                    help="POD_IP=TEXT: a CONNECT to POD_IP:any port gets responses saying TEXT")
    args = ap.parse_args(argv)
    tune_process()
    import uvloop
    try:
        uvloop.run(serve(args.listen, dict(args.body)))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
