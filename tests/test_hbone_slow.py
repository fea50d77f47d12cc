"""Backpressure soak: 1 GiB offered to a tunnel whose far end reads slowly. The proxy (HBONE server
+ relay to TCP) must hold a bounded number of bytes, and every byte must arrive."""

from __future__ import annotations

import asyncio
import os
import resource
import time
import zlib

import pytest

from hbone.pool import HbonePool
from hbone.relay import relay
from hbone.server import HboneServer, InboundTunnel
from hbone.settings import HboneSettings, MiB
from hbone.stream import TcpStream
from hbone.testing import Mesh, run

TOTAL = 1024 * MiB
BLOCK = 1 * MiB
# The sink stalls this long after every STALL_EVERY bytes: each stall lets every buffer on the
# path fill to its bound, which is what the test measures.
STALL_S = 0.15
STALL_EVERY = 64 * MiB
# What the proxy side may hold for one tunnel: the HBONE stream's receive window (4 MiB), one relay
# read (256 KiB) and the TCP transport's write buffer (asyncio's 64 KiB high-water mark), with slack.
PROXY_BOUND_BYTES = 4 * MiB + 1 * MiB
# RSS growth allowed for the whole test process (sender, proxy and sink) while 1 GiB flows.
RSS_GROWTH_BOUND = 96 * MiB


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["uvloop"])
def test_slow_reader_bounded_memory_and_every_byte_arrives(loop):
    async def main():
        mesh = Mesh.create()
        srv_id, cli_id = mesh.identity("ns1", "server"), mesh.identity("ns2", "client")
        sink_state = {"n": 0, "crc": 0, "done": asyncio.get_running_loop().create_future()}

        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
            next_stall = STALL_EVERY
            while data := await reader.read(256 * 1024):
                sink_state["n"] += len(data)
                sink_state["crc"] = zlib.crc32(data, sink_state["crc"])
                if sink_state["n"] >= next_stall:
                    next_stall += STALL_EVERY
                    await asyncio.sleep(STALL_S)
            writer.close()
            sink_state["done"].set_result(None)

        sink_server = await asyncio.start_server(sink, "127.0.0.1", 0)
        sink_addr = sink_server.sockets[0].getsockname()[:2]
        proxied: dict = {}

        async def handler(tunnel: InboundTunnel):
            tcp = await TcpStream.connect(*sink_addr)
            stream = await tunnel.accept()
            proxied["hbone"], proxied["tcp"] = stream, tcp
            try:
                await relay(stream, tcp)
            finally:
                tcp.close()
                stream.close()

        server = await HboneServer(lambda: mesh.server_context(srv_id), handler,
                                   trust_domain=mesh.trust_domain).start("127.0.0.1", 0)
        pool = HbonePool(lambda: mesh.client_context(cli_id), trust_domain=mesh.trust_domain)
        stream = await pool.open_tunnel(src_identity=cli_id, dst_identities=frozenset({srv_id}),
                                        dst=server.address, authority="10.0.0.1:80")
        block = os.urandom(BLOCK)
        crc = 0
        peak = {"proxy": 0, "rss": 0}
        rss0 = _rss()

        async def sample():
            while True:
                s, t = proxied.get("hbone"), proxied.get("tcp")
                if s is not None:
                    held = s.buffered + t._writer.transport.get_write_buffer_size()
                    peak["proxy"] = max(peak["proxy"], held)
                peak["rss"] = max(peak["rss"], _rss() - rss0)
                await asyncio.sleep(0.01)

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        for _ in range(TOTAL // BLOCK):
            crc = zlib.crc32(block, crc)
            stream.write(block)
            await stream.drain()
        stream.write_eof()
        await asyncio.wait_for(sink_state["done"], 60)
        elapsed = time.perf_counter() - t0
        sampler.cancel()
        assert sink_state["n"] == TOTAL and sink_state["crc"] == crc
        assert 0 < peak["proxy"] <= PROXY_BOUND_BYTES, peak
        assert peak["rss"] <= RSS_GROWTH_BOUND, peak
        print(f"1 GiB through a slow reader in {elapsed:.1f}s; proxy held at most "
              f"{peak['proxy'] / MiB:.1f} MiB, RSS grew {peak['rss'] / MiB:.1f} MiB")
        await pool.close()
        await server.close(1.0)
        sink_server.close()

    run(loop, main)
