"""HBONE's own TLS layer (hbone/_tls.py: SSLObject + MemoryBIOs over a plain TCP transport), with
real mTLS from our CA on loopback: bulk both ways, backpressure, refusals, closes with and without
close_notify, and that a live connection really runs on it (untimed regression check)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from certs.tls import server_context
from hbone import _tls
from hbone._conn import HboneConnection
from hbone.pool import HbonePool
from hbone.server import HboneServer
from hbone.settings import MAX_FRAME_BYTES, MiB, HboneSettings
from hbone.stream import StreamReset
from hbone.testing import LOOPS, Mesh, run

loops = pytest.mark.parametrize("loop", LOOPS)
WAIT_S = 10.0  # generous bound for anything that must happen "soon" on a loaded 2-core box


@pytest.fixture(scope="module")
def mesh():
    return Mesh.create()


async def echo_handler(tunnel) -> None:
    stream = await tunnel.accept()
    try:
        while data := await stream.read():
            stream.write(data)
            await stream.drain()
        stream.write_eof()
        await stream.wait_closed()
    except StreamReset:
        pass


class Env:
    def __init__(self, mesh: Mesh, handler=echo_handler, settings: HboneSettings = HboneSettings(),
                 server_ctx=None):
        self.mesh, self.handler, self.settings = mesh, handler, settings
        self.srv_id = mesh.identity("ns1", "server")
        self.cli_id = mesh.identity("ns2", "client")
        self.server_ctx = server_ctx or mesh.server_context(self.srv_id)
        self.client_ctx = mesh.client_context(self.cli_id)
        self.refusals: list = []

    async def __aenter__(self) -> "Env":
        self.server = await HboneServer(lambda: self.server_ctx, self.handler, trust_domain=self.mesh.trust_domain,
                                        settings=self.settings, on_refusal=self.refusals.append).start("127.0.0.1", 0)
        self.pool = HbonePool(lambda: self.client_ctx, trust_domain=self.mesh.trust_domain, settings=self.settings)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pool.close()
        await self.server.close(0.5)

    def open(self):
        return self.pool.open_tunnel(src_identity=self.cli_id, dst_identities=frozenset({self.srv_id}),
                                     dst=self.server.address, authority="10.0.0.1:80")

    async def tunnel_works(self) -> None:
        s = await self.open()
        s.write(b"still serving")
        assert await asyncio.wait_for(s.read(), WAIT_S) == b"still serving"
        s.close()


async def until(cond, what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while not cond():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT_S:g}s: {what}") from None


def server_conn(env: Env) -> HboneConnection:
    (conn,) = env.server._conns
    return conn


# ---- the layer is in effect (regression check, not timed) ----------------------------------------

@loops
def test_live_connection_runs_our_tls_over_a_plain_transport(mesh, loop):
    async def main():
        async with Env(mesh) as env:
            s = await env.open()
            (cli,) = env.pool.connections()
            srv = server_conn(env)
            for conn in (cli, srv):
                assert isinstance(conn.tls, _tls.TlsLayer) and conn.tls.state == _tls.OPEN
                # the event loop's transport is plain TCP: no SSL transport underneath us
                assert conn.transport.get_extra_info("ssl_object") is None
                assert conn.transport.get_extra_info("sslcontext") is None
                obj = conn.get_extra_info("ssl_object")
                assert obj is conn.tls.sslobj and obj.version() == "TLSv1.3"
                assert obj.selected_alpn_protocol() == "h2"
                assert conn.get_extra_info("peercert")  # what asyncio's SSL transport answered
                assert conn.get_extra_info("cipher")[1] == "TLSv1.3"
                assert conn.get_extra_info("peername") == conn.transport.get_extra_info("peername")
            assert srv.peer_identity == env.cli_id and cli.server_identity == env.srv_id
            assert cli.tls.sslobj.server_side is False and srv.tls.sslobj.server_side is True
            assert cli.tls.sslobj.server_hostname is None  # no SNI (ztunnel enable_sni = false)
            s.close()
    run(loop, main)


def test_tls12_opt_in_runs_on_the_layer(mesh):
    """certs.tls's TLS 1.2 opt-in (ztunnel TLS12_ENABLED) through the same layer, renegotiation off."""
    async def main():
        srv_id = mesh.identity("ns1", "server")
        ctx12 = server_context(mesh.bundle(srv_id), tls12=True)
        ctx12.maximum_version = ssl.TLSVersion.TLSv1_2  # force 1.2 for the test
        async with Env(mesh, server_ctx=ctx12) as env:
            env.client_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            s = await env.open()
            s.write(b"twelve")
            assert await asyncio.wait_for(s.read(), WAIT_S) == b"twelve"
            (cli,) = env.pool.connections()
            assert cli.get_extra_info("ssl_object").version() == "TLSv1.2"
            assert server_conn(env).tls.sslobj.version() == "TLSv1.2"
            s.close()
    run("uvloop", main)


# ---- bulk and backpressure -------------------------------------------------------------------------

@loops
def test_large_transfer_byte_exact_both_ways_with_1mib_frames(mesh, loop):
    total = 12 * MiB
    block = os.urandom(3 * MiB + 17)  # not a multiple of a frame or a record

    async def main():
        async with Env(mesh) as env:
            s = await env.open()
            (cli,) = env.pool.connections()
            srv = server_conn(env)
            # 1 MiB frames both ways (ztunnel HTTP2_FRAME_SIZE), over 16 KiB TLS records
            assert cli.core._h2.max_outbound_frame_size == MAX_FRAME_BYTES
            assert srv.core._h2.max_outbound_frame_size == MAX_FRAME_BYTES
            sent, got = hashlib.sha256(), hashlib.sha256()

            async def writer():
                left = total
                while left:
                    piece = block[: min(len(block), left)]
                    s.write(piece)
                    sent.update(piece)
                    left -= len(piece)
                    await s.drain()
                s.write_eof()

            async def reader():
                n = 0
                while data := await s.read():
                    got.update(data)
                    n += len(data)
                return n

            w = asyncio.ensure_future(writer())
            n = await asyncio.wait_for(reader(), 60)
            await w
            assert n == total and got.digest() == sent.digest()
            assert srv.reads > 1 and cli.reads > 1
    run(loop, main)


def test_slow_reader_backpressure_keeps_memory_bounded(mesh):
    """The client stops reading its socket: our server's TCP transport fills and pauses writing
    (TLS bytes), h2 stops moving stream bytes into TLS, the handler's drain() blocks; nothing grows
    without bound. Then the client reads again and gets every byte, in order. Windows larger than
    the transfer, and small socket buffers, so that TCP (not flow control) is what stops it."""
    total = 48 * MiB
    chunk = os.urandom(256 * 1024)
    progress = {"written": 0, "done": False}
    settings = HboneSettings(stream_window=64 * MiB, connection_window=64 * MiB)
    socket_buffer = 64 * 1024  # bytes; the kernel doubles it

    async def pusher(tunnel):
        stream = await tunnel.accept()
        for _ in range(total // len(chunk)):
            stream.write(chunk)
            progress["written"] += len(chunk)
            await stream.drain()
        stream.write_eof()
        progress["done"] = True

    async def main():
        async with Env(mesh, handler=pusher, settings=settings) as env:
            s = await env.open()
            (cli,) = env.pool.connections()
            srv = server_conn(env)
            cli.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)
            srv.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
            cli.transport.pause_reading()  # the reader is slow: its TCP receive buffer fills up
            await until(lambda: not srv._writable, "server transport paused")
            await asyncio.sleep(0.3)  # would keep growing here if anything were unbounded
            stalled_at = progress["written"]
            await asyncio.sleep(0.2)
            assert progress["written"] == stalled_at and not progress["done"]
            # Bounded by the kernel's buffers, the transport's high-water mark (plus the flush that
            # crossed it) and the stream's send buffer: a few MiB of the 48.
            assert stalled_at <= 8 * MiB, stalled_at
            assert srv.core.pending(s.stream_id) <= settings.stream_send_buffer + len(chunk)
            assert srv.transport.get_write_buffer_size() <= settings.transport_write_high_water + 2 * MAX_FRAME_BYTES
            cli.transport.resume_reading()
            n, got, want = 0, hashlib.sha256(), hashlib.sha256()
            for _ in range(total // len(chunk)):
                want.update(chunk)
            while data := await asyncio.wait_for(s.read(), WAIT_S):
                got.update(data)
                n += len(data)
            assert n == total and got.digest() == want.digest() and progress["done"]
    run("uvloop", main)


# ---- refusals before TLS is up -------------------------------------------------------------------

# A plain-HTTP request, and a handshake record (type 22, TLS 1.0 legacy version) whose body is junk.
GARBAGE = {"http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
           "bad_record": b"\x16\x03\x01\x00\x08" + b"\x01\x00\x00\x04" + b"\xff" * 4}


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_garbage_instead_of_client_hello_is_refused_with_its_reason(mesh, garbage):
    async def main():
        async with Env(mesh) as env:
            loop = asyncio.get_running_loop()
            with socket.create_connection(env.server.address) as raw:
                raw.setblocking(False)
                await loop.sock_sendall(raw, GARBAGE[garbage])
                answer = b""
                async with asyncio.timeout(WAIT_S):
                    try:
                        while chunk := await loop.sock_recv(raw, 4096):
                            answer += chunk
                    except ConnectionResetError:
                        pass
                if garbage == "bad_record":
                    # The alert OpenSSL wrote is sent before the close (content type 21 = alert);
                    # OpenSSL writes none for a plain-HTTP request.
                    assert answer[:1] == b"\x15", answer
            await until(lambda: env.refusals, "refusal")
            (refusal,) = env.refusals
            assert (refusal.kind, refusal.reason) == ("tls", "handshake")
            assert env.server.refusals["tls:handshake"] == 1 and env.server.tls_failures == 1
            assert env.server.connections == 0 and env.server._handshaking == 0
            await env.tunnel_works()
    run("uvloop", main)


@pytest.mark.parametrize("sent", ["silent", "partial"])
def test_silent_or_trickling_client_hits_the_handshake_timeout(mesh, sent):
    async def main():
        settings = HboneSettings(tls_handshake_timeout=0.3)
        async with Env(mesh, settings=settings) as env:
            loop = asyncio.get_running_loop()
            with socket.create_connection(env.server.address) as raw:
                raw.setblocking(False)
                if sent == "partial":
                    hello = _client_hello()
                    await loop.sock_sendall(raw, hello[:30])
                start = loop.time()
                async with asyncio.timeout(WAIT_S):
                    try:
                        assert await loop.sock_recv(raw, 100) == b""
                    except ConnectionResetError:
                        pass  # aborted: as asyncio's SSL transport did
                assert loop.time() - start >= 0.25
            await until(lambda: env.refusals, "refusal")
            assert [(r.kind, r.reason) for r in env.refusals] == [("tls", "timeout")]
            assert env.server._handshaking == 0
            await env.tunnel_works()
    run("uvloop", main)


def _client_hello() -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


# ---- closes ---------------------------------------------------------------------------------------

@loops
def test_peer_closing_without_close_notify_resets_streams(mesh, loop):
    """The client's TCP connection ends (FIN) mid-stream with no close_notify: the server's streams
    are reset (the handler's read raises), its connection goes away; nothing hangs."""
    seen: list = []

    async def reader(tunnel):
        stream = await tunnel.accept()
        try:
            while await stream.read():
                pass
            seen.append("eof")
        except StreamReset as err:
            seen.append(err)

    async def main():
        async with Env(mesh, handler=reader) as env:
            s = await env.open()
            s.write(b"x" * 100_000)
            await s.drain()
            (cli,) = env.pool.connections()
            srv = server_conn(env)
            await until(lambda: s.stream_id in srv.streams and srv.streams[s.stream_id].bytes_received, "bytes in")
            cli.transport.close()  # the TCP transport itself: FIN, no TLS close_notify
            await until(lambda: seen and srv.lost, "server saw the end")
            assert isinstance(seen[0], StreamReset)
            assert "without TLS close_notify" in str(srv.lost_exc)
            assert not srv.tls.peer_closed
            await until(lambda: env.server.connections == 0, "connection gone")
            with pytest.raises(StreamReset):
                await asyncio.wait_for(s.read(), WAIT_S)
    run(loop, main)


@loops
def test_clean_close_sends_close_notify_both_ways(mesh, loop):
    async def main():
        async with Env(mesh) as env:
            s = await env.open()
            s.write(b"hi")
            assert await s.read() == b"hi"
            s.write_eof()
            assert await s.read() == b""
            await s.wait_closed()
            (cli,) = env.pool.connections()
            srv = server_conn(env)
            srv.goaway()
            srv.close_transport()  # the server's clean close: GOAWAY, close_notify, then TCP close
            await until(lambda: cli.lost and srv.lost, "both ends closed")
            assert cli.tls.peer_closed and srv.tls.peer_closed  # each got the other's close_notify
            assert cli.lost_exc is None and srv.lost_exc is None
            assert cli.core.goaway_received
    run(loop, main)


def test_tls_alert_after_the_handshake_is_the_connections_end_reason(mesh):
    """A corrupted record is fatal (bad_record_mac): the connection is aborted and connection_lost's
    reason is the ssl.SSLError, which the pool's and server's classifiers read."""
    async def main():
        async with Env(mesh) as env:
            s = await env.open()
            srv = server_conn(env)
            (cli,) = env.pool.connections()
            # 23 = application_data, TLS 1.2 legacy version, 32 bytes of junk: fails authentication
            cli.transport.write(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
            await until(lambda: srv.lost, "server dropped the connection")
            assert isinstance(srv.lost_exc, ssl.SSLError)
            with pytest.raises(StreamReset):
                await asyncio.wait_for(s.read(), WAIT_S)
            await env.tunnel_works()
    run("uvloop", main)


# ---- the layer alone (sans-IO: two TlsLayers wired through memory) --------------------------------

def _pair(mesh: Mesh) -> tuple[_tls.TlsLayer, _tls.TlsLayer]:
    cli = _tls.TlsLayer(mesh.client_context(mesh.identity("ns2", "client")), server_side=False)
    srv = _tls.TlsLayer(mesh.server_context(mesh.identity("ns1", "server")), server_side=True)
    done_c = cli.handshake(b"")
    done_s = False
    for _ in range(6):  # ClientHello; server flight; client Finished
        done_s = srv.handshake(cli.take()) or done_s
        done_c = cli.handshake(srv.take()) or done_c
        if done_c and done_s:
            break
    srv.decrypt(cli.take())  # the client's Finished, if the server had not read it yet
    assert (cli.state, srv.state) == (_tls.OPEN, _tls.OPEN)
    return cli, srv


def test_records_fed_byte_by_byte_give_the_same_plaintext(mesh):
    cli, srv = _pair(mesh)
    payload = os.urandom(70_000)  # five records, the last one short
    cli.write(payload)
    wire = cli.take()
    got = []
    for i in range(len(wire)):
        got.append(srv.decrypt(wire[i:i + 1]))
        assert not srv.peer_closed
    assert b"".join(got) == payload
    assert sum(1 for g in got if g) == 5  # plaintext only when a record completes
    # whole, with trailing partial record: the complete ones come out, the rest waits
    cli.write(b"a" * 100)
    cli.write(b"b" * 100)
    wire = cli.take()
    assert srv.decrypt(wire[:-10]) == b"a" * 100
    assert srv.decrypt(wire[-10:]) == b"b" * 100


def test_close_notify_exchange_and_writes_after_it_are_dropped(mesh):
    cli, srv = _pair(mesh)
    srv.write(b"last words")
    assert srv.close() is False  # ours is sent; the peer's has not come yet
    assert srv.state == _tls.CLOSING
    srv.write(b"dropped")        # asyncio drops app writes once shutting down
    wire = srv.take()
    assert cli.decrypt(wire) == b"last words" and cli.peer_closed
    assert cli.close() is True   # the peer's came first: closure complete at once
    assert cli.state == _tls.CLOSED
    assert srv.drain_closing(cli.take()) is True and srv.state == _tls.CLOSED


def test_peer_still_sending_after_our_close_notify_is_read_and_discarded(mesh):
    cli, srv = _pair(mesh)
    assert srv.close() is False
    cli.write(b"in flight" * 1000)  # the client had not seen our close_notify yet
    assert srv.drain_closing(cli.take()) is False  # discarded, still waiting
    cli.decrypt(srv.take())
    assert cli.close() is True
    assert srv.drain_closing(cli.take()) is True


@pytest.mark.parametrize("corrupt", ["flip", "garbage"])
def test_a_bad_record_is_an_ssl_error(mesh, corrupt):
    cli, srv = _pair(mesh)
    cli.write(b"x" * 100)
    wire = bytearray(cli.take())
    if corrupt == "flip":
        wire[-1] ^= 1  # the AEAD tag no longer matches
    else:
        wire = bytearray(b"\x17\x03\x03\x00\x05hello")
    with pytest.raises(ssl.SSLError):
        srv.decrypt(bytes(wire))


def test_extra_names_are_asyncios(mesh):
    cli, srv = _pair(mesh)
    assert cli.extra("ssl_object") is cli.sslobj
    assert cli.extra("cipher")[1] == "TLSv1.3" and srv.extra("peercert") is not None
    assert cli.extra("nothing", 7) == 7
    fresh = _tls.TlsLayer(mesh.client_context(mesh.identity("ns2", "client")), server_side=False)
    assert fresh.extra("peercert") is None  # not before the handshake


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(max_size=300), max_size=6), open_first=st.booleans())
def test_arbitrary_bytes_raise_only_ssl_errors(mesh, chunks, open_first):
    """Whatever a peer sends, in whatever pieces, before or after the handshake: the layer answers
    with ssl.SSLError (which the connection turns into a refusal or connection_lost's reason)."""
    if open_first:
        _, layer = _pair(mesh)
        step = layer.decrypt
    else:
        layer = _tls.TlsLayer(mesh.server_context(mesh.identity("ns1", "server")), server_side=True)
        step = layer.handshake
    try:
        for chunk in chunks:
            step(chunk)
            layer.take()
    except ssl.SSLError:
        pass
