"""The origination pool against the real HBONE server over mTLS on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hbone.errors import ConnectFailed, TunnelRefused
from hbone.pool import HbonePool
from hbone.server import HboneServer, InboundTunnel
from hbone.settings import HboneSettings
from hbone.stream import StreamReset
from hbone.testing import LOOPS, Mesh, run

loops = pytest.mark.parametrize("loop", LOOPS)


@pytest.fixture(scope="module")
def mesh():
    return Mesh.create()


async def hold_handler(tunnel: InboundTunnel) -> None:
    """Accept, echo one read, then hold the tunnel open until the client's EOF."""
    stream = await tunnel.accept()
    while data := await stream.read():
        stream.write(data)
        await stream.drain()
    stream.write_eof()


class PoolEnv:
    def __init__(self, mesh, settings=HboneSettings(), handler=hold_handler):
        self.mesh, self.settings, self.handler = mesh, settings, handler
        self.srv_id = mesh.identity("ns1", "server")
        self.cli_id = mesh.identity("ns2", "client")

    async def __aenter__(self):
        self.server = await HboneServer(lambda: self.mesh.server_context(self.srv_id), self.handler,
                                        trust_domain=self.mesh.trust_domain).start("127.0.0.1", 0)
        self.pool = HbonePool(lambda: self.mesh.client_context(self.cli_id),
                              trust_domain=self.mesh.trust_domain, settings=self.settings)
        return self

    async def __aexit__(self, *exc):
        await self.pool.close()
        await self.server.close(0.5)

    def open(self, dst=None, dst_ids=None, authority="10.0.0.1:80"):
        return self.pool.open_tunnel(src_identity=self.cli_id,
                                     dst_identities=frozenset(dst_ids or {self.srv_id}),
                                     dst=dst or self.server.address, authority=authority,
                                     headers={"forwarded": 'for="10.0.0.9:1234"'})


@loops
def test_100_tunnels_per_connection_then_a_second(mesh, loop):
    async def main():
        async with PoolEnv(mesh) as env:
            streams = [await env.open() for _ in range(100)]
            assert repr(env.pool) == "<HbonePool keys=1 conns=1 streams=100>"
            assert env.server.connections == 1
            extra = await env.open()
            assert repr(env.pool) == "<HbonePool keys=1 conns=2 streams=101>"
            assert env.pool.dials == 2 and env.server.connections == 2
            for s in streams + [extra]:  # every tunnel works
                s.write(b"ping")
            for s in streams + [extra]:
                assert await s.read() == b"ping"
                s.write_eof()
            for s in streams + [extra]:
                assert await s.read() == b""
                await s.wait_closed()
            assert repr(env.pool) == "<HbonePool keys=1 conns=2 streams=0>"
            # freed slots are reused: no third connection
            again = await env.open()
            assert env.pool.dials == 2
            again.close()
    run(loop, main)


@loops
def test_50_concurrent_opens_share_one_dial(mesh, loop):
    async def main():
        async with PoolEnv(mesh) as env:
            streams = await asyncio.gather(*(env.open() for _ in range(50)))
            assert env.pool.dials == 1 and env.server.connections == 1
            assert len({s._conn for s in streams}) == 1
            for s in streams:
                s.close()
    run(loop, main)


@loops
@pytest.mark.timeout(20)   # the bug this pins down never yields: only the timeout can end it
def test_an_opener_that_finds_a_finished_dial_and_a_full_connection_dials_again(mesh, loop):
    """A dial has finished but its done-callback (which forgets it) has not run yet, and the
    connection it made is already full: a new opener must start the next dial. Awaiting the finished
    dial never yields, so re-awaiting it spun forever (seen under 2 000 concurrent SOCKS5 clients)."""
    async def main():
        async with PoolEnv(mesh, settings=HboneSettings(client_max_streams_per_connection=2)) as env:
            first = await asyncio.gather(env.open(), env.open())          # connection 1: full
            [key] = list(env.pool._conns)
            finished = asyncio.get_running_loop().create_future()
            finished.set_result(None)
            env.pool._dials[key] = finished                                # the window, made to stay open
            conn = await env.pool._checkout(key)
            assert conn not in {s._conn for s in first} and env.pool.dials == 2
            conn.reserved -= 1
            for s in first:
                s.close()
    run(loop, main)


@loops
def test_keys_are_separate(mesh, loop):
    async def main():
        async with PoolEnv(mesh) as env:
            a = await env.open()
            # same destination, a wider set of acceptable identities: another key, another connection
            b = await env.open(dst_ids={env.srv_id, mesh.identity("ns1", "other")})
            assert a._conn is not b._conn and env.pool.dials == 2
            assert "keys=2" in repr(env.pool)
    run(loop, main)


@loops
def test_goaway_and_dead_connections_are_not_reused(mesh, loop):
    async def main():
        async with PoolEnv(mesh) as env:
            s1 = await env.open()
            (sconn,) = env.server._conns
            sconn.start_drain()  # server GOAWAY; s1 stays usable
            await asyncio.sleep(0.05)
            s2 = await env.open()
            assert env.pool.dials == 2 and s2._conn is not s1._conn
            s1.write(b"after goaway")
            assert await s1.read() == b"after goaway"
            s1.write_eof()
            assert await s1.read() == b""
            # kill the second connection from the server side: the pool notices and redials
            for c in list(env.server._conns):
                c.abort()
            await asyncio.sleep(0.05)
            s3 = await env.open()
            assert env.pool.dials == 3 and s3._conn is not s2._conn
    run(loop, main)


@loops
def test_idle_connection_evicted(mesh, loop):
    async def main():
        async with PoolEnv(mesh, HboneSettings(pool_idle_timeout=0.2)) as env:
            s = await env.open()
            s.write_eof()
            assert await s.read() == b""
            await s.wait_closed()
            assert "conns=1" in repr(env.pool)
            await asyncio.sleep(0.4)
            assert repr(env.pool) == "<HbonePool keys=0 conns=0 streams=0>"
            assert env.server.connections == 0
    run(loop, main)


@loops
def test_connect_failures_are_classified(mesh, loop):
    async def main():
        async with PoolEnv(mesh, HboneSettings(connect_timeout=0.3)) as env:
            # refused: nothing listens
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                closed_port = sock.getsockname()[1]
            with pytest.raises(ConnectFailed) as err:
                await env.open(dst=("127.0.0.1", closed_port))
            assert err.value.reason == "refused" and err.value.flag == "UF" and err.value.status == 503
            # timeout: a TCP listener that never answers the TLS handshake
            writers = []
            silent = await asyncio.start_server(lambda r, w: writers.append(w), "127.0.0.1", 0)
            with pytest.raises(ConnectFailed) as err:
                await env.open(dst=silent.sockets[0].getsockname()[:2])
            assert err.value.reason == "timeout" and err.value.flag == "UT"
            silent.close()
            for w in writers:
                w.close()
            # identity: the server is not who we expect
            with pytest.raises(ConnectFailed) as err:
                await env.open(dst_ids={mesh.identity("ns1", "someone-else")})
            assert err.value.reason == "identity"
            # tls: a server from another CA
            other = Mesh.create()
            osrv = await HboneServer(lambda: other.server_context(other.identity("ns1", "server")),
                                     hold_handler, trust_domain=other.trust_domain).start("127.0.0.1", 0)
            with pytest.raises(ConnectFailed) as err:
                await env.open(dst=osrv.address)
            assert err.value.reason == "tls"
            await osrv.close(0)
            # the pool still works for good keys
            s = await env.open()
            s.close()
            assert env.pool.dials == 5
    run(loop, main)


@loops
def test_refused_tunnel_status(mesh, loop):
    async def deny(tunnel):
        await tunnel.reject(401, "policy")

    async def main():
        async with PoolEnv(mesh, handler=deny) as env:
            for _ in range(3):
                with pytest.raises(TunnelRefused) as err:
                    await env.open()
                assert err.value.status == 401
            assert env.pool.dials == 1
            assert "streams=0" in repr(env.pool)
    run(loop, main)


@loops
def test_ping_keepalive_and_dead_peer_detection(mesh, loop):
    async def main():
        fast = HboneSettings(ping_interval=0.05, ping_timeout=0.15)
        async with PoolEnv(mesh, fast) as env:
            s = await env.open()
            await asyncio.sleep(0.3)
            (conn,) = env.pool.connections()
            assert conn.pings_acked >= 2 and not conn.lost  # healthy: pings answered
            (sconn,) = env.server._conns
            sconn.transport.pause_reading()  # the server stops answering anything
            await asyncio.sleep(0.5)
            assert conn.lost  # client gave up after ping_timeout (ztunnel: 20 s by default)
            with pytest.raises(StreamReset):
                await s.read()
            s2 = await env.open()  # a fresh connection
            assert env.pool.dials == 2
            s2.close()
            sconn.transport.resume_reading()
    run(loop, main)


@loops
def test_local_host_is_part_of_the_key(mesh, loop, loopback_ip):
    seen = []

    async def handler(tunnel):
        seen.append(tunnel.remote_addr[0])
        await tunnel.reject(503)

    async def main():
        src_ip = loopback_ip()
        async with PoolEnv(mesh, handler=handler) as env:
            for local in (None, src_ip):
                with pytest.raises(TunnelRefused):
                    await env.pool.open_tunnel(src_identity=env.cli_id, dst_identities=frozenset({env.srv_id}),
                                               dst=env.server.address, authority="10.0.0.1:80", local_host=local)
            assert seen == ["127.0.0.1", src_ip] and env.pool.dials == 2
    run(loop, main)
