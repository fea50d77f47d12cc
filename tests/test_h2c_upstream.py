"""The waypoint's upstream h2c client against hostile upstreams (real sockets on loopback): a control-frame
flood is a GOAWAY and fails the request as a retriable reset; a peer that sends beyond the windows we gave
is a FLOW_CONTROL_ERROR (what we buffer is bounded by those windows); a peer that never opens its window
holds a request only until the route timeout, or, with none, the stream flush timeout. And the pool: N
concurrent requests to an endpoint with no connection share one dial; a failed dial fails them all with
its own error."""

from __future__ import annotations

import asyncio
import struct

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, HeadersFrame, PingFrame, SettingsFrame

import hpack
from hbone.stream import TcpStream
from proxy.pipeline.h2c import H2Limits, H2Upstream, H2UpstreamPool, H2UpstreamReset
from proxy.pipeline.originate import OriginateFailed
from tests.h2c_peers import EYC, HostileUpstream, RawClient, raw_frame
from tests.h2c_peers import server as h2c_server  # noqa: F401 — the h2c server fixture, as h2c_server

RST_STREAM, GOAWAY = 0x3, 0x7
BIG_BODY = b"u" * (200 * 1024)   # more than the 64 KiB a peer's default window lets through


def status_200() -> bytes:
    f = HeadersFrame(1, data=hpack.Encoder().encode([(b":status", b"200")]))
    f.flags.add("END_HEADERS")
    return f.serialize()


async def upstream_for(script, ip: str, limits: H2Limits = H2Limits()):
    peer = await HostileUpstream(script).start(ip)
    up = H2Upstream(await TcpStream.connect(*peer.addr), limits=limits)
    return peer, up


async def wait_for(pred, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


def goaway_code(peer: HostileUpstream) -> int | None:
    codes = [int.from_bytes(p[4:8], "big") for t, _, _, p in peer.frames() if t == GOAWAY]
    return codes[0] if codes else None


async def test_upstream_ping_flood_is_goaway_and_a_retriable_reset(loopback_ip):
    flood = SettingsFrame(0).serialize() + b"".join(PingFrame(0, opaque_data=b"%08d" % i).serialize()
                                                     for i in range(101))
    peer, up = await upstream_for(lambda: flood, loopback_ip())
    try:
        with pytest.raises(H2UpstreamReset) as err:
            await up.request(b"GET", b"/", b"svc", [], None)
        assert err.value.before_response and not err.value.refused
        await wait_for(lambda: goaway_code(peer) is not None)
        assert goaway_code(peer) == EYC
        assert up.conn.core.abuse.reason == "ping_flood" and not up.alive
        # 100 PING ACKs at most were owed; the 101st was never answered.
        acks = [f for f in peer.frames() if f[0] == 0x6 and f[1] & 0x1]
        assert len(acks) <= 100
    finally:
        await up.close()
        await peer.close()


async def test_upstream_sending_beyond_our_window_is_a_flow_control_error(loopback_ip):
    # The head, then 1 MiB + 16 KiB of DATA on one stream: more than the stream window we advertised.
    piece = DataFrame(1, data=b"d" * 16384).serialize()
    peer, up = await upstream_for(lambda: SettingsFrame(0).serialize() + status_200() + piece * 65, loopback_ip())
    try:
        resp = await up.request(b"GET", b"/", b"svc", [], None)
        assert resp.status == 200
        await wait_for(lambda: goaway_code(peer) is not None)
        assert goaway_code(peer) == ErrorCodes.FLOW_CONTROL_ERROR
        # What was buffered for the stream stayed within its window (nothing was read yet).
        st = up.conn.streams.get(resp.sid)
        assert st is None or sum(len(d.data) for d in st.chunks) <= up.conn.core.limits.stream_window
        with pytest.raises(H2UpstreamReset):
            async for _ in resp.body_chunks():
                pass
    finally:
        await up.close()
        await peer.close()


def zero_window() -> bytes:
    f = SettingsFrame(0)
    f.settings[SettingsFrame.INITIAL_WINDOW_SIZE] = 0
    return f.serialize()


async def test_upstream_that_never_opens_its_window_is_bounded_by_the_route_timeout(loopback_ip):
    peer, up = await upstream_for(zero_window, loopback_ip())
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):   # the route timeout around the attempt (pipeline/http.py)
                await up.request(b"POST", b"/", b"svc", [], BIG_BODY)
        # The upstream stream was reset and its slot given back; the connection still serves.
        await wait_for(lambda: any(t == RST_STREAM for t, _, _, _ in peer.frames()))
        assert [int.from_bytes(p, "big") for t, _, s, p in peer.frames() if t == RST_STREAM] == [ErrorCodes.CANCEL]
        assert not up.active and up.alive
    finally:
        await up.close()
        await peer.close()


async def test_without_a_route_timeout_the_stream_flush_timeout_resets_it(loopback_ip):
    peer, up = await upstream_for(zero_window, loopback_ip(), H2Limits(stream_flush_timeout_s=0.2))
    try:
        with pytest.raises(H2UpstreamReset) as err:
            async with asyncio.timeout(5):   # only a guard for the test itself
                await up.request(b"POST", b"/", b"svc", [], BIG_BODY)
        assert err.value.before_response   # retriable: nothing came back
        await wait_for(lambda: any(t == RST_STREAM for t, _, _, _ in peer.frames()))
        assert not up.active and up.alive
    finally:
        await up.close()
        await peer.close()


# ---------------------------------------------------------------------------------------------
# The pool: one dial for concurrent requests, one error for all of them


def dialer(addr, counter: list, *, delay: float = 0.05, fail: BaseException | None = None):
    async def dial():
        counter.append(1)
        await asyncio.sleep(delay)   # the other requests arrive while this dial is in flight
        if fail is not None:
            raise fail
        return await TcpStream.connect(*addr)
    return dial


async def test_concurrent_requests_share_one_dial(h2c_server):
    pool = H2UpstreamPool()
    dials: list = []
    try:
        async def one(i: int) -> bytes:
            up = await pool.connect("ep", dialer(h2c_server.addr, dials))
            resp = await up.request(b"GET", b"/r%d" % i, b"svc", [], None)
            return b"".join([c async for c in resp.body_chunks()])

        bodies = await asyncio.gather(*(one(i) for i in range(20)))
        assert bodies == [b"ok /r%d" % i for i in range(20)]
        assert len(dials) == 1 and pool.dials == 1 and pool.opened == 1 and h2c_server.accepted == 1
        assert repr(pool) == "<H2UpstreamPool conns=1 opened=1 dialing=0>"
        # Later requests reuse the connection; a dead one is replaced by a fresh dial.
        up = await pool.connect("ep", dialer(h2c_server.addr, dials))
        assert len(dials) == 1
        await up.close()
        again = await pool.connect("ep", dialer(h2c_server.addr, dials))
        assert again is not up and again.alive and len(dials) == 2 and h2c_server.accepted == 2
    finally:
        await pool.close()


async def test_a_failed_dial_fails_every_waiter_with_its_error(h2c_server):
    pool = H2UpstreamPool()
    dials: list = []
    failure = OriginateFailed("refused", "connection refused", upstream="10.0.0.1:9090")
    try:
        results = await asyncio.gather(*(pool.connect("ep", dialer(h2c_server.addr, dials, fail=failure))
                                         for _ in range(5)), return_exceptions=True)
        assert all(r is failure for r in results)   # the router sees connect-failure (Envoy UF)
        assert len(dials) == 1 and not pool.conns and repr(pool).endswith("dialing=0>")
        # The next request dials again.
        up = await pool.connect("ep", dialer(h2c_server.addr, dials))
        assert up.alive and len(dials) == 2
    finally:
        await pool.close()


async def test_a_cancelled_waiter_does_not_cancel_the_shared_dial(h2c_server):
    pool = H2UpstreamPool()
    dials: list = []
    try:
        first = asyncio.ensure_future(pool.connect("ep", dialer(h2c_server.addr, dials, delay=0.2)))
        second = asyncio.ensure_future(pool.connect("ep", dialer(h2c_server.addr, dials)))
        await asyncio.sleep(0.05)
        first.cancel()   # its route timeout fired
        up = await second
        assert first.cancelled() and up.alive and len(dials) == 1
        resp = await up.request(b"GET", b"/x", b"svc", [], None)
        assert resp.status == 200
        async for _ in resp.body_chunks():
            pass
    finally:
        await pool.close()


# ---------------------------------------------------------------------------------------------
# Graceful GOAWAY (NO_ERROR): what the peer still processes finishes (RFC 9113 §6.8)


def goaway(last: int, code: int = 0) -> bytes:
    return raw_frame(GOAWAY, 0, 0, struct.pack(">LL", last, code))


async def test_upstream_graceful_goaway_lets_processed_streams_finish(loopback_ip):
    """A gRPC server's MaxConnectionAge drain: GOAWAY(NO_ERROR, last=1) with streams 1 and 3 in flight.
    Stream 1 (processed) gets its whole response; stream 3 is refused (retriable); no new requests go
    to this connection, which closes once stream 1 is done."""
    head = hpack.Encoder().encode([(b":status", b"200")])
    script = (SettingsFrame(0).serialize() + raw_frame(0x1, 0x4, 1, head) + goaway(1)
              + raw_frame(0x0, 0x0, 1, b"hello ") + raw_frame(0x0, 0x1, 1, b"after goaway"))
    peer = await HostileUpstream(lambda: script, after_requests=2).start(loopback_ip())
    up = H2Upstream(await TcpStream.connect(*peer.addr))
    try:
        first = asyncio.ensure_future(up.request(b"GET", b"/1", b"svc", [], None))
        second = asyncio.ensure_future(up.request(b"GET", b"/3", b"svc", [], None))
        resp = await first
        assert resp.sid == 1 and resp.status == 200
        assert b"".join([c async for c in resp.body_chunks()]) == b"hello after goaway"
        with pytest.raises(H2UpstreamReset) as err:
            await second
        assert err.value.refused and err.value.before_response   # RFC 9113 §8.7: retry elsewhere
        assert not up.alive
        with pytest.raises(H2UpstreamReset) as err:
            await up.request(b"GET", b"/new", b"svc", [], None)
        assert err.value.refused
        await wait_for(lambda: up.reader.done())   # closed once nothing is left on it
        assert not [f for f in peer.frames() if f[0] == RST_STREAM and f[2] == 1]
    finally:
        await up.close()
        await peer.close()


async def test_client_goaway_does_not_cut_its_own_requests(h2c_server):
    """A client's GOAWAY(NO_ERROR, 0) names the last *server-initiated* stream it takes (we push none):
    the requests it already made are still answered."""
    c = await RawClient.open(h2c_server.addr)
    try:
        sid = c.request(b"/hang")
        await c.ping_roundtrip()
        c.send(goaway(0))
        await asyncio.sleep(0.05)
        h2c_server.release.set()
        await c.pump(lambda: c.done(sid))
        assert c.heads[sid][b":status"] == b"200" and c.data[sid] == b"ok /hang" and sid not in c.resets
    finally:
        c.close()
