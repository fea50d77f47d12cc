"""The HBONE server over real mTLS on loopback, with certificates from our CA, against real h2
peers: our pool, and a raw h2 client for requests our pool would never send."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from pathlib import Path
from datetime import datetime, timedelta, timezone

import h2.config
import h2.connection
import h2.events
import pytest

from certs.testing import expired, issue_custom

from hbone import _h2fast
from hbone.errors import ConnectFailed, TunnelRefused
from hbone.pool import HbonePool
from hbone.server import HboneServer, InboundTunnel
from hbone.settings import HboneSettings, MiB
from hbone.stream import StreamReset
from hbone.testing import LOOPS, Mesh, echo_handler_factory, run, start_echo

loops = pytest.mark.parametrize("loop", LOOPS)


@pytest.fixture(scope="module")
def mesh():
    return Mesh.create()


class Env:
    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.srv_id = mesh.identity("ns1", "server")
        self.cli_id = mesh.identity("ns2", "client")
        self.tls_failures: list[tuple[str, tuple]] = []

    async def __aenter__(self):
        self.echo, self.echo_addr = await start_echo()
        handler = await echo_handler_factory(self.echo_addr)
        return await self.start(handler)

    async def start(self, handler, settings=HboneSettings()):
        self.server = await HboneServer(
            lambda: self.mesh.server_context(self.srv_id), handler, trust_domain=self.mesh.trust_domain,
            settings=settings, on_tls_failure=lambda r, a: self.tls_failures.append((r, a)),
        ).start("127.0.0.1", 0)
        self.pool = self.make_pool()
        return self

    def make_pool(self, settings=HboneSettings(), ctx=None):
        return HbonePool(ctx or (lambda: self.mesh.client_context(self.cli_id)),
                         trust_domain=self.mesh.trust_domain, settings=settings)

    async def open(self, pool=None, authority="10.0.0.1:80"):
        return await (pool or self.pool).open_tunnel(
            src_identity=self.cli_id, dst_identities=frozenset({self.srv_id}),
            dst=self.server.address, authority=authority)

    async def __aexit__(self, *exc):
        await self.pool.close()
        await self.server.close(1.0)
        if hasattr(self, "echo"):
            self.echo.close()


async def send_and_check(stream, total: int, chunk: int = 1 * MiB) -> None:
    """Send `total` random bytes while reading the echo; both sha256s must match."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    block = os.urandom(chunk)

    async def writer():
        left = total
        while left:
            piece = block[: min(chunk, left)]
            sent.update(piece)
            stream.write(piece)
            await stream.drain()
            left -= len(piece)
        stream.write_eof()

    task = asyncio.create_task(writer())
    n = 0
    while data := await stream.read():
        got.update(data)
        n += len(data)
    await task
    assert n == total and got.hexdigest() == sent.hexdigest()


@loops
def test_64_mib_each_way_byte_exact(mesh, loop):
    async def main():
        async with Env(mesh) as env:
            stream = await env.open()
            await send_and_check(stream, 64 * MiB)
            await stream.wait_closed()
    run(loop, main)


@loops
def test_200_concurrent_tunnels_on_one_connection(mesh, loop):
    async def main():
        async with Env(mesh) as env:
            # The server advertises 200 streams; let this client use all of them on one connection.
            pool = env.make_pool(HboneSettings(client_max_streams_per_connection=200))
            streams = await asyncio.gather(*(env.open(pool) for _ in range(200)))
            assert len(pool.connections()) == 1 and pool.dials == 1
            assert env.server.active_tunnels == 200
            await asyncio.gather(*(send_and_check(s, 64 * 1024 + i, chunk=16 * 1024) for i, s in enumerate(streams)))
            await pool.close()
    run(loop, main)


@loops
def test_half_close_client_eof_then_server_keeps_sending(mesh, loop):
    async def handler(tunnel: InboundTunnel):
        stream = await tunnel.accept()
        received = b""
        while data := await stream.read():
            received += data
        assert received == b"question"
        for i in range(5):  # after the client's EOF, the server still talks
            stream.write(b"answer%d;" % i)
            await stream.drain()
            await asyncio.sleep(0)
        stream.write_eof()
        await stream.wait_closed()

    async def main():
        env = Env(mesh)
        await env.start(handler)
        try:
            s = await env.open()
            s.write(b"question")
            s.write_eof()
            out = b""
            while data := await s.read():
                out += data
            assert out == b"".join(b"answer%d;" % i for i in range(5))
            await s.wait_closed()
        finally:
            await env.__aexit__()
    run(loop, main)


@loops
def test_half_close_server_eof_then_client_keeps_sending(mesh, loop):
    async def handler(tunnel: InboundTunnel):
        stream = await tunnel.accept()
        stream.write(b"banner")
        stream.write_eof()  # server done first
        received = b""
        while data := await stream.read():
            received += data
        assert received == b"".join(b"line%d\n" % i for i in range(5))

    async def main():
        env = Env(mesh)
        await env.start(handler)
        try:
            s = await env.open()
            assert await s.read() == b"banner"
            assert await s.read() == b""
            for i in range(5):
                s.write(b"line%d\n" % i)
                await s.drain()
            s.write_eof()
            await asyncio.wait_for(s.wait_closed(), 5)
        finally:
            await env.__aexit__()
    run(loop, main)


def _raw_client_ctx(trust_pem: bytes, chain_pem: bytes | None = None, key_pem: bytes | None = None) -> ssl.SSLContext:
    """A client context that trusts our server but presents whatever certificate we give it
    (CertBundle would refuse to load these bad certificates, which is the point of them)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=trust_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if chain_pem is not None:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
            Path(cert).write_bytes(chain_pem)
            Path(key).write_bytes(key_pem)
            ctx.load_cert_chain(cert, key)
    return ctx


def _bad_client_contexts(mesh: Mesh):
    now = datetime.now(timezone.utc)
    trust = mesh.ca.root_cert_pem
    cli = mesh.identity("ns2", "client")
    other = Mesh.create()  # another CA, same trust domain name
    other_cert = other.bundle(other.identity("ns2", "client"))
    exp = expired(mesh.ca, cli, now=now)
    # Wrong trust domain, signed by *our* CA (so only the SPIFFE check can catch it).
    wrong_td = issue_custom(mesh.ca, spiffe=cli, now=now - timedelta(minutes=1),
                            uris=["spiffe://evil.local/ns/ns2/sa/client"])
    return {
        "other_ca": _raw_client_ctx(trust, other_cert.chain_pem, other_cert.key_pem),
        "expired": _raw_client_ctx(trust, exp.chain_pem, exp.key_pem),
        "wrong_trust_domain": _raw_client_ctx(trust, wrong_td.chain_pem, wrong_td.key_pem),
        "no_cert": _raw_client_ctx(trust),
    }


@loops
def test_bad_client_certificates_refused_server_keeps_serving(mesh, loop):
    async def main():
        async with Env(mesh) as env:
            for name, ctx in _bad_client_contexts(mesh).items():
                bad_pool = env.make_pool(ctx=lambda c=ctx: c)
                with pytest.raises(ConnectFailed) as err:
                    await env.open(bad_pool)
                assert err.value.reason in ("tls", "closed"), (name, err.value)
                await bad_pool.close()
                # a good client is still served
                s = await env.open()
                await send_and_check(s, 1000)
            await asyncio.sleep(0.05)
            reasons = sorted(r for r, _ in env.tls_failures)
            assert reasons == ["expired", "no_client_cert", "unknown_ca", "wrong_trust_domain"]
            assert env.server.tls_failures == 4 and env.server.connections == 1  # the good client's
    run(loop, main)


async def raw_h2_request(env: Env, headers: list[tuple[bytes, bytes]]) -> tuple[int, bool]:
    """Send one request with a raw h2 client over mTLS; returns (status, end_stream)."""
    ctx = env.mesh.client_context(env.cli_id)
    reader, writer = await asyncio.open_connection(*env.server.address, ssl=ctx, server_hostname="")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    conn.initiate_connection()
    conn.send_headers(1, headers)
    writer.write(conn.data_to_send())
    status, ended = None, False
    try:
        while not ended:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "server closed the connection instead of answering"
            for e in conn.receive_data(data):
                if isinstance(e, h2.events.ResponseReceived):
                    status = int(dict(e.headers)[b":status"])
                    ended = e.stream_ended is not None
                elif isinstance(e, h2.events.StreamEnded):
                    ended = True
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    return status, ended


@loops
def test_non_connect_and_bad_authority_get_400(mesh, loop):
    called = []

    async def handler(tunnel):
        called.append(tunnel)
        await tunnel.reject(401, "denied")

    async def main():
        env = Env(mesh)
        await env.start(handler)
        try:
            for headers in (
                [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"10.0.0.1:80")],
                [(b":method", b"CONNECT"), (b":authority", b"reviews.default:9080")],
                [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80"), (b":path", b"/")],
            ):
                assert await raw_h2_request(env, headers) == (400, True)
            assert called == []  # answered by the server before any handler
            # the handler's own answer: 401 with END_STREAM
            assert await raw_h2_request(env, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]) == (401, True)
            with pytest.raises(TunnelRefused) as err:
                await env.open()
            assert err.value.status == 401
        finally:
            await env.__aexit__()
    run(loop, main)


@loops
def test_unanswered_or_failing_handler_gets_503(mesh, loop):
    async def handler(tunnel):
        if tunnel.authority[1] == 81:
            raise RuntimeError("boom")

    async def main():
        env = Env(mesh)
        await env.start(handler)
        try:
            for auth in ("10.0.0.1:80", "10.0.0.1:81"):
                with pytest.raises(TunnelRefused) as err:
                    await env.open(authority=auth)
                assert err.value.status == 503
        finally:
            await env.__aexit__()
    run(loop, main)


def test_live_connection_settings_and_repr_workaround(mesh):
    """Regression check for issue 7: ztunnel windows, 1 MiB frames and the repr fix are live."""
    async def main():
        async with Env(mesh) as env:
            s = await env.open()
            await send_and_check(s, 3 * MiB)
            (conn,) = env.pool.connections()
            (sconn,) = list(env.server._conns)
            for core in (conn.core, sconn.core):
                h = core.h2
                assert h.local_settings.initial_window_size == 4 * MiB
                assert h.remote_settings.initial_window_size == 4 * MiB
                assert h.local_settings.max_frame_size == h.max_inbound_frame_size == 1 * MiB
                assert h.max_outbound_frame_size == 1 * MiB
                assert h._inbound_flow_control_window_manager.max_window_size >= 16 * MiB
                assert h.state_machine._transitions is _h2fast._GRACEFUL_TRANSITIONS
            assert sconn.core.h2.local_settings.max_concurrent_streams == 200
            assert conn.limit == 100
            assert _h2fast.is_installed()
            assert "<data" in repr(__import__("hyperframe.frame").frame.DataFrame(1, b"x" * 100))
    run("uvloop", main)


@loops
def test_drain_lets_inflight_finish_then_resets(mesh, loop):
    async def main():
        async with Env(mesh) as env:
            s = await env.open()
            s.write(b"before")
            assert await s.read() == b"before"
            closing = asyncio.create_task(env.server.close(drain_deadline=0.5))
            await asyncio.sleep(0.1)
            s.write(b"during drain")  # in-flight tunnel still works after GOAWAY
            assert await s.read() == b"during drain"
            with pytest.raises(ConnectFailed):
                await env.open()  # listener closed / connection going away
            await closing  # deadline passed: the open tunnel is reset
            with pytest.raises((StreamReset,)):
                while await s.read():
                    pass
    run(loop, main)
