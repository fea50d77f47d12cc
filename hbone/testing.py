"""Helpers for tests of hbone/ and of the areas built on it (never imported by production code):
a mesh CA with workload contexts, a TCP echo, and a runner for both event loops."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Awaitable, Callable, TypeVar

import uvloop

from certs.bundle import CertBundle
from certs.ca import MeshCA
from certs.spiffe import SpiffeId
from certs.tls import client_context, server_context

from hbone.server import InboundTunnel
from hbone.stream import TcpStream

T = TypeVar("T")
LOOPS = ("asyncio", "uvloop")
# A fixed clock for certificates: tests must not depend on the wall clock's date.
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def run(loop: str, main: Callable[[], Awaitable[T]]) -> T:
    """Run `main()` on a fresh asyncio or uvloop event loop."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


@dataclass
class Mesh:
    """One trust domain's CA and helpers to mint TLS contexts for workloads in it."""

    ca: MeshCA
    trust_domain: str
    _cache: dict = field(default_factory=dict)

    @classmethod
    def create(cls, trust_domain: str = "cluster.local", directory: str | None = None) -> "Mesh":
        d = directory or tempfile.mkdtemp(prefix="hbone-mesh-")
        ca = MeshCA.init(Path(d) / "ca", trust_domain=trust_domain, now=NOW - timedelta(days=1))
        return cls(ca, trust_domain)

    def identity(self, ns: str = "default", sa: str = "default") -> SpiffeId:
        return SpiffeId(self.trust_domain, ns, sa)

    def bundle(self, spiffe: SpiffeId) -> CertBundle:
        if spiffe not in self._cache:
            issued = self.ca.issue(spiffe, now=datetime.now(timezone.utc) - timedelta(minutes=5),
                                   ttl=timedelta(hours=24))
            self._cache[spiffe] = CertBundle.from_issued(issued, self.ca.root_cert_pem)
        return self._cache[spiffe]

    def server_context(self, spiffe: SpiffeId) -> ssl.SSLContext:
        return server_context(self.bundle(spiffe))

    def client_context(self, spiffe: SpiffeId) -> ssl.SSLContext:
        return client_context(self.bundle(spiffe))


async def echo_handler_factory(upstream: tuple[str, int]):
    """An HBONE handler that connects each tunnel to `upstream` and relays (like ztunnel inbound)."""
    from hbone.relay import relay

    async def handler(tunnel: InboundTunnel) -> None:
        try:
            tcp = await TcpStream.connect(*upstream)
        except OSError:
            await tunnel.reject(503, "upstream connect failed")
            return
        stream = await tunnel.accept()
        try:
            await relay(stream, tcp)
        finally:
            tcp.close()
            stream.close()
    return handler


async def start_echo(host: str = "127.0.0.1") -> tuple[asyncio.AbstractServer, tuple[str, int]]:
    """A TCP echo server that half-closes back when the client half-closes."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, host, 0, limit=256 * 1024)
    addr = server.sockets[0].getsockname()
    return server, (addr[0], addr[1])
