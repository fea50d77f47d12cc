"""The waypoint's inner h2c server under abuse, over real sockets on loopback: each limit at its boundary
(N allowed, N+1 answered), the answer the client gets (GOAWAY with the limit's code, REFUSED_STREAM, 431),
other connections and the listener still serving afterwards; the premature-reset rule sans-IO with a fixed
clock; and a hypothesis test that random frame sequences bring nothing but our own events (or H2cError)
out of the h2c core, on either side."""

from __future__ import annotations

import asyncio
import struct

import pytest
from h2.errors import ErrorCodes
from hypothesis import HealthCheck, given, settings, strategies as st
from hyperframe.frame import (ContinuationFrame, DataFrame, HeadersFrame, PingFrame, PriorityFrame, SettingsFrame,
                              WindowUpdateFrame)

from proxy.pipeline.h2c import (H2C_FLOOD_SETTINGS, HEADER_LIST_HARD_BYTES, MAX_CONCURRENT_STREAMS, MAX_FRAME_BYTES,
                                MAX_HEADER_LIST_BYTES, MAX_HEADERS, PREMATURE_RESET_TOTAL_STREAM_COUNT, Data, Ended,
                                H2Core, H2cError, H2Limits, Headers, Refused, Rejected, Reset, Terminated, Trailers,
                                WindowOpened)
from tests.h2c_peers import (EYC, PREFACE, H2cServer, RawClient, get_fields, header_list_too_large_goaway, raw_frame,
                             server, still_serving)  # noqa: F401 — server: the h2c server fixture

FRAME_SIZE_ERROR = int(ErrorCodes.FRAME_SIZE_ERROR)
S = H2C_FLOOD_SETTINGS


# ---------------------------------------------------------------------------------------------
# Frame-level floods (hbone/limits.py InboundGuard inside the h2c server): N frames pass, N+1 is a GOAWAY


def continuation_block(c: RawClient, sid: int, n_continuations: int) -> list:
    """One GET whose header block is cut into a HEADERS frame and ``n_continuations`` non-empty
    CONTINUATION frames (an empty one would be the empty-frame limit instead)."""
    block = c.block(get_fields(b"/cont", [(b"x-pad", b"p" * 64)]))
    n = n_continuations + 1
    step = len(block) // n
    pieces = [block[i * step:(i + 1) * step] for i in range(n - 1)] + [block[(n - 1) * step:]]
    assert all(pieces)
    frames = [HeadersFrame(sid, data=pieces[0], flags=["END_STREAM"])]
    frames += [ContinuationFrame(sid, data=p) for p in pieces[1:]]
    frames[-1].flags.add("END_HEADERS")
    return frames


def flood(kind: str, c: RawClient, n: int) -> list:
    """``n`` frames of one abusive kind, as a client would send them after its preface SETTINGS."""
    if kind == "settings":     # the preface's SETTINGS is the first of them
        return [SettingsFrame(0) for _ in range(n - 1)]
    if kind == "ping":
        return [PingFrame(0, opaque_data=b"%08d" % i) for i in range(n)]
    if kind == "unknown":      # RFC 9113 §5.5: ignored, so counted
        return [raw_frame(0xFA, 0, 0, b"junk") for _ in range(n)]
    if kind == "priority":     # no stream opened yet: 100 x (1 + 0) allowed
        return [PriorityFrame(1, depends_on=0, stream_weight=16) for _ in range(n)]
    if kind == "window_update":   # nothing sent to the client yet: 5 + 2 x 0 allowed
        return [WindowUpdateFrame(0, window_increment=1) for _ in range(n)]
    if kind == "continuation":
        sid, c.next_sid = c.next_sid, c.next_sid + 2
        return continuation_block(c, sid, n)
    if kind == "empty_data":   # an open request stream, then empty DATA frames without END_STREAM
        sid, head = c.headers(get_fields(b"/upload"), end_stream=False)
        return head + [DataFrame(sid, data=b"") for _ in range(n)]
    if kind == "frame_size":   # one frame of n bytes (16 KiB allowed)
        sid, head = c.headers(get_fields(b"/upload"), end_stream=False)
        return head + [DataFrame(sid, data=b"x" * n)]
    raise AssertionError(kind)


# (kind, N allowed, GOAWAY code for N+1, Abuse.reason)
FLOODS = [
    ("settings", S.max_settings_frames, EYC, "settings_flood"),
    ("ping", S.max_ping_frames, EYC, "ping_flood"),
    ("unknown", S.max_unknown_frames, EYC, "unknown_frame_flood"),
    ("priority", S.priority_frames_per_stream, EYC, "priority_flood"),
    ("window_update", 5, EYC, "window_update_flood"),
    ("continuation", S.max_continuation_frames, EYC, "continuation_flood"),
    ("empty_data", S.max_empty_frames, EYC, "empty_frame_flood"),
    ("frame_size", MAX_FRAME_BYTES, FRAME_SIZE_ERROR, "frame_too_large"),
]


def test_flood_limits_are_envoys_and_nghttp2s_numbers():
    assert (S.max_continuation_frames, S.max_empty_frames, S.priority_frames_per_stream,
            S.window_updates_per_data_frame) == (8, 1, 100, 10)
    assert (S.max_settings_frames, S.max_ping_frames, S.max_unknown_frames, S.flood_window) == (100, 100, 100, 10.0)
    assert MAX_FRAME_BYTES == 16384 and S.max_frame_size == MAX_FRAME_BYTES
    assert (MAX_CONCURRENT_STREAMS, MAX_HEADERS, MAX_HEADER_LIST_BYTES, PREMATURE_RESET_TOTAL_STREAM_COUNT) == \
           (100, 100, 60 * 1024, 500)
    # The defaults are what serve_h2c and the upstream pool use: Envoy's stream_idle_timeout (5 min)
    # bounds a wait for the peer's window; Envoy's premature-reset minimum lifetime is 1 s.
    from proxy.pipeline.h2c import DEFAULT_H2_LIMITS
    assert (DEFAULT_H2_LIMITS.stream_flush_timeout_s, DEFAULT_H2_LIMITS.premature_reset_min_stream_lifetime_s,
            DEFAULT_H2_LIMITS.flood) == (300.0, 1.0, S)


@pytest.mark.parametrize("kind,allowed,code,reason", FLOODS, ids=[f[0] for f in FLOODS])
async def test_flood_boundary_goaway_and_listener_keeps_serving(server, kind, allowed, code, reason):
    bystander = await RawClient.open(server.addr)
    ok = await RawClient.open(server.addr)
    bad = await RawClient.open(server.addr)
    try:
        assert (await bystander.get())[0] == 200
        # N: served as usual, the connection stays.
        ok.send(*flood(kind, ok, allowed))
        status, _ = await ok.get(b"/after-flood")   # answered: every frame before it was taken
        assert status == 200 and ok.goaway is None, (ok.goaway, ok.resets)
        # N+1: GOAWAY with the limit's code, then the connection ends.
        bad.send(*flood(kind, bad, allowed + 1))
        got_code, _ = await bad.closed_by_server()
        assert got_code == code
        conn = (await server.finished(1))[0]
        assert conn.core.abuse is not None and conn.core.abuse.reason == reason
        assert conn.error.startswith(reason)
        await still_serving(server, bystander, ok)
    finally:
        for c in (bystander, ok, bad):
            c.close()


async def test_frame_checks_are_made_on_the_header_before_the_body(server):
    """A 1 MiB frame header is answered FRAME_SIZE_ERROR at once: the server never waits for the body."""
    c = await RawClient.open(server.addr)
    try:
        sid, head = c.headers(get_fields(b"/upload"), end_stream=False)
        c.send(*head, struct.pack(">BHBBL", 0x10, 0, 0x0, 0, sid))   # DATA header: length 1 MiB, no body
        code, _ = await c.closed_by_server()
        assert code == FRAME_SIZE_ERROR
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# Header lists: 431 on the stream (connection kept), HPACK bomb and oversized blocks: GOAWAY


def fields_of_size(size: int) -> list[tuple[bytes, bytes]]:
    """A GET whose RFC 9113 §6.5.2 header list size is exactly ``size``."""
    base = get_fields(b"/h")
    used = sum(len(n) + len(v) + 32 for n, v in base) + len(b"x-big") + 32
    return base + [(b"x-big", b"v" * (size - used))]


async def test_header_list_size_and_count_boundaries_answer_431(server):
    c = await RawClient.open(server.addr)
    try:
        status, _ = await c.get(b"/h", fields_of_size(MAX_HEADER_LIST_BYTES)[4:])
        assert status == 200
        status, sid = await c.get(b"/h", fields_of_size(MAX_HEADER_LIST_BYTES + 1)[4:])
        assert status == 431 and sid in c.ended
        many = [(b"x-h%d" % i, b"v") for i in range(MAX_HEADERS - 4)]   # with the 4 pseudo-headers: 100
        assert (await c.get(b"/n", many))[0] == 200
        assert (await c.get(b"/n", many + [(b"x-one-more", b"v")]))[0] == 431
        # A 431 for a request with a body: the client is told to stop sending it (RST_STREAM NO_ERROR).
        sid, head = c.headers(fields_of_size(MAX_HEADER_LIST_BYTES + 1), end_stream=False)
        c.send(*head)
        await c.pump(lambda: sid in c.resets)
        assert c.heads[sid][b":status"] == b"431" and c.resets[sid] == ErrorCodes.NO_ERROR
        assert c.goaway is None and (await c.get(b"/ok"))[0] == 200
        # Up to the decoder's hard limit a list is still answered 431; one byte over it, GOAWAY.
        assert (await c.get(b"/h", fields_of_size(HEADER_LIST_HARD_BYTES)[4:]))[0] == 431 and c.goaway is None
        c.request(b"/h", fields_of_size(HEADER_LIST_HARD_BYTES + 1)[4:])
        await header_list_too_large_goaway(c, server)
    finally:
        c.close()


async def test_hpack_bomb_and_oversized_block_are_goaway_enhance_your_calm(server):
    bomb = await RawClient.open(server.addr)
    big = await RawClient.open(server.addr)
    try:
        # One 4 KiB field added to the dynamic table, then referenced 40 times (one byte each): a
        # few KiB on the wire, 160 KiB decoded, over the decoder's hard limit.
        first = bomb.block([(b"x-bomb", b"b" * 4000)])   # literal with incremental indexing → index 62
        block = bomb.block(get_fields(b"/bomb")) + first + b"\xbe" * 40
        bomb.send(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]))
        code, _ = await bomb.closed_by_server()
        assert code == EYC
        # A header block over HEADER_BLOCK_MAX_BYTES, in 16 KiB CONTINUATIONs: refused on the frame
        # headers (h2 never buffers it).
        raw = big.block(get_fields(b"/big")) + big.block([(b"x-%d" % i, b"v" * 8000) for i in range(20)])
        assert len(raw) > HEADER_LIST_HARD_BYTES
        frames = [HeadersFrame(1, data=raw[:16000], flags=["END_STREAM"])]
        frames += [ContinuationFrame(1, data=raw[i:i + 16000]) for i in range(16000, len(raw), 16000)]
        frames[-1].flags.add("END_HEADERS")
        big.send(*frames)
        code, _ = await big.closed_by_server()
        assert code == EYC
        reasons = {c.core.abuse.reason for c in await server.finished(2)}
        assert reasons == {"header_list_too_large", "header_block_too_large"}
        await still_serving(server)
    finally:
        bomb.close()
        big.close()


# ---------------------------------------------------------------------------------------------
# Streams: over max_concurrent_streams → REFUSED_STREAM; rapid reset → GOAWAY ENHANCE_YOUR_CALM


async def test_concurrent_streams_boundary_refuses_the_extra_stream_only(server):
    c = await RawClient.open(server.addr)
    try:
        sids = [c.request(b"/hang") for _ in range(MAX_CONCURRENT_STREAMS)]
        await c.ping_roundtrip()
        assert not c.resets
        extra = c.request(b"/hang")
        await c.pump(lambda: extra in c.resets)
        assert c.resets[extra] == ErrorCodes.REFUSED_STREAM and c.goaway is None
        server.release.set()
        await c.pump(lambda: all(s in c.ended for s in sids))
        assert all(c.heads[s][b":status"] == b"200" for s in sids)
        assert (await c.get(b"/again"))[0] == 200   # the slots came back
        await still_serving(server, c)
        # Nothing per stream is kept once streams are done (a long-lived connection does not grow).
        c.close()
        core = next(x.core for x in await server.finished(2) if x.core.refused)
        assert not core._held and not core._started and not core._answered
        assert core.closed_streams == MAX_CONCURRENT_STREAMS + 3 and core.refused == 1   # + refused, /again, /still
    finally:
        c.close()


async def rapid_resets(c: RawClient, n: int, batch: int = 50) -> None:
    """``n`` streams opened and reset at once (HEADERS + RST_STREAM), in batches below the stream limit."""
    while n > 0:
        k = min(batch, n)
        frames = []
        for _ in range(k):
            sid, head = c.headers(get_fields(b"/hang"))
            frames += [*head, raw_frame(0x3, 0, sid, struct.pack(">L", ErrorCodes.CANCEL))]
        c.send(*frames)
        await c.ping_roundtrip()
        n -= k


async def test_rapid_reset_boundary_is_envoys_premature_reset_rule(server):
    limit = PREMATURE_RESET_TOTAL_STREAM_COUNT // 2   # 250: half of 500, before 500 streams closed
    ok = await RawClient.open(server.addr)
    bad = await RawClient.open(server.addr)
    try:
        await rapid_resets(ok, limit - 1)
        status, _ = await ok.get(b"/after-resets")
        assert status == 200 and ok.goaway is None
        await rapid_resets(bad, limit)
        code, last = await bad.closed_by_server()
        assert code == EYC and last == 2 * limit - 1   # the last stream id it saw
        conn = (await server.finished(1))[0]
        assert conn.core.abuse.reason == "too_many_premature_resets"
        assert conn.core.premature_resets == limit
        await still_serving(server, ok)
    finally:
        ok.close()
        bad.close()


def _core_with_client(clock):
    core = H2Core(client_side=False, clock=clock)
    core.receive(PREFACE + SettingsFrame(0).serialize())
    core.data_to_send()
    return core


def _open(core, enc, sid: int, now: float):
    return core.receive(HeadersFrame(sid, data=enc.encode(get_fields()), flags=["END_HEADERS", "END_STREAM"])
                        .serialize(), now=now)


def test_premature_reset_rule_sans_io_lifetime_and_ratio():
    import hpack
    now = [0.0]
    core = _core_with_client(lambda: now[0])
    enc = hpack.Encoder()
    sid = 1

    def rst(s: int, t: float):
        return core.receive(raw_frame(0x3, 0, s, struct.pack(">L", ErrorCodes.CANCEL)), now=t)

    # A stream reset after more than the minimum lifetime (1 s) is not premature (Envoy).
    _open(core, enc, sid, 0.0)
    rst(sid, 1.5)
    core.forget(sid)
    assert core.premature_resets == 0 and core.closed_streams == 1
    # Nor is one reset after we answered it.
    sid += 2
    _open(core, enc, sid, 2.0)
    core.send_headers(sid, [(b":status", b"200")])
    rst(sid, 2.1)
    core.forget(sid)
    assert core.premature_resets == 0
    # 500 good streams closed: from then on the ratio decides (premature x 2 >= closed).
    for _ in range(PREMATURE_RESET_TOTAL_STREAM_COUNT):
        sid += 2
        _open(core, enc, sid, 3.0)
        core.send_headers(sid, [(b":status", b"200")], end_stream=True)
        core.forget(sid)
    good = core.closed_streams
    assert good == PREMATURE_RESET_TOTAL_STREAM_COUNT + 2
    # p premature of good + p closed trips when 2p >= good + p, i.e. at p = good.
    for p in range(1, good + 1):
        sid += 2
        _open(core, enc, sid, 4.0)
        events = rst(sid, 4.0)
        core.forget(sid)
        if p < good:
            assert not any(isinstance(e, Terminated) for e in events), p
    assert isinstance(events[-1], Terminated) and events[-1].code == EYC and core.abuse.reason == \
        "too_many_premature_resets"
    assert core.receive(b"more") == []


def test_core_limits_are_validated():
    with pytest.raises(ValueError):
        H2Limits(header_list_hard_bytes=10)
    with pytest.raises(ValueError):
        H2Limits(stream_flush_timeout_s=0)


# ---------------------------------------------------------------------------------------------
# A client that never opens its window: the response write is bounded (stream_flush_timeout_s)


async def test_client_that_never_opens_its_window_gets_its_stream_reset(loopback_ip):
    srv = await H2cServer(H2Limits(stream_flush_timeout_s=0.2)).start(loopback_ip())
    c = await RawClient.open(srv.addr, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    try:
        sid = c.request(b"/big")
        await c.pump(lambda: sid in c.resets)
        assert c.heads[sid][b":status"] == b"200" and c.resets[sid] == ErrorCodes.CANCEL
        assert sid not in c.data   # not one byte fitted the zero window
        # Other streams go on: one whose window the client does open is answered in full.
        small = c.request(b"/small")
        c.send(WindowUpdateFrame(small, window_increment=65535))
        await c.pump(lambda: c.done(small))
        assert c.heads[small][b":status"] == b"200" and c.data[small] == b"ok /small" and c.goaway is None
    finally:
        c.close()
        await srv.close()


# ---------------------------------------------------------------------------------------------
# Hypothesis: random frame sequences → only our events (or H2cError), on both sides


_FRAME = st.tuples(st.integers(0, 12), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 7, 0x7FFFFFFF]),
                   st.binary(max_size=40))
OUR_EVENTS = (Headers, Data, Trailers, Ended, Reset, WindowOpened, Terminated, Refused, Rejected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FRAME, max_size=24), st.booleans(), st.booleans(), st.integers(1, 64))
def test_random_frame_sequences_only_our_events(frames, client_side, valid_head, step):
    import hpack
    core = H2Core(client_side=client_side, clock=lambda: 0.0)
    enc = hpack.Encoder()
    wire = b"" if client_side else PREFACE
    wire += SettingsFrame(0).serialize()
    if valid_head and not client_side:
        wire += HeadersFrame(1, data=enc.encode(get_fields()), flags=["END_HEADERS"]).serialize()
    for ftype, flags, sid, payload in frames:
        wire += raw_frame(ftype, flags, sid, payload)
    events = []
    terminated = 0
    for i in range(0, len(wire), step):
        try:
            got = core.receive(wire[i:i + step])
        except H2cError:
            continue
        assert all(isinstance(e, OUR_EVENTS) for e in got), got
        terminated += sum(isinstance(e, Terminated) and not e.by_peer for e in got)
        events += got
    # Our own GOAWAY (a verdict or a protocol error) is the last event; a peer's graceful GOAWAY may
    # come more than once (RFC 9113 §6.8) with the streams it still finishes after it.
    assert terminated <= 1 and (not terminated or isinstance(events[-1], Terminated) and not events[-1].by_peer)
    core.data_to_send()


# ---------------------------------------------------------------------------------------------
# Through the real waypoint: an h2c client inside an HBONE tunnel


async def test_rapid_reset_through_the_waypoint_ends_only_that_tunnel(tmp_path, loopback_ip):
    from tests.test_waypoint_l7 import RawH2, l7_harness
    from tests.waypoint_harness import REVIEWS_VIP

    h, _, _ = await l7_harness(tmp_path, loopback_ip)
    try:
        client = h.client()
        good = RawH2(await client.tunnel(f"{REVIEWS_VIP}:9080"))
        assert (await good.get(b"/"))["headers"][b":status"] == b"200"
        bad = RawH2(await client.tunnel(f"{REVIEWS_VIP}:9080"))
        for _ in range(PREMATURE_RESET_TOTAL_STREAM_COUNT // 2):   # CVE-2023-44487: open, reset, repeat
            bad.reset(bad.start(b"/"))
        await bad.pump([], timeout=10)
        assert bad.goaway is not None and bad.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        bad.goaway = None
        await bad.pump([], timeout=5)   # then the tunnel ends
        assert bad.eof
        # The other tunnel on the same HBONE connection, and new ones, are unaffected.
        assert (await good.get(b"/"))["headers"][b":status"] == b"200"
        again = RawH2(await client.tunnel(f"{REVIEWS_VIP}:9080"))
        assert (await again.get(b"/"))["headers"][b":status"] == b"200"
        # Counted with the protocol errors, kind prefixed h2c_ (no request's access record covers it).
        text = h.metrics.exposition().decode()
        assert 'hbone_h2_protocol_errors_total{kind="h2c_too_many_premature_resets"} 1.0' in text.splitlines()
    finally:
        await h.close()


async def test_concurrent_responses_on_one_tunnel_all_finish_under_backpressure(tmp_path, loopback_ip):
    """Four large responses at once to a client that reads nothing for a while: every handler waits in
    drain() on the one tunnel stream at the same time, and every one must be woken (H2cConn.drain)."""
    from h2.settings import SettingCodes

    from tests.test_waypoint_l7 import GREETER_ROUTES, GREETER_VIP, RawH2, l7_harness

    h, _, _ = await l7_harness(tmp_path, loopback_ip, GREETER_ROUTES)
    try:
        c = RawH2(await h.client().tunnel(f"{GREETER_VIP}:9090"))
        c.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 8 * 1024 * 1024})   # the tunnel backs up first
        c.conn.increment_flow_control_window(32 * 1024 * 1024)
        n = 1536 * 1024
        sids = [c.start(b"/big?n=%d" % n, authority=b"greeter:9090") for _ in range(4)]
        await asyncio.sleep(0.3)
        await c.pump(sids, timeout=10)
        assert [len(c.results[s]["data"]) for s in sids] == [n] * 4 and all(c.results[s]["ended"] for s in sids)
    finally:
        await h.close()


async def test_a_client_that_never_reads_cannot_grow_what_we_owe_it(loopback_ip):
    """h2 answers every DATA frame on a reset stream with RST_STREAM. A client that sends thousands and
    reads nothing: the server stops reading once its transport is full, so what it buffers for the
    client stays near the transport's high-water mark plus one read's answers (not ~400 KB)."""
    import socket

    from hbone.stream import TcpStream
    from proxy.pipeline.h2c import serve_h2c

    ip = loopback_ip()
    transports, finished = [], []

    async def handler(request, responder):
        await responder.send_local_reply(200, b"")

    async def serve(reader, writer):
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transports.append(writer.transport)
        stream = TcpStream(reader, writer)
        try:
            finished.append(await serve_h2c(stream, handler))
        finally:
            stream.close()

    server = await asyncio.start_server(serve, ip, 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # set before connecting: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, server.sockets[0].getsockname()[:2])
    _, writer = await asyncio.open_connection(sock=sock)
    try:
        c = RawClient(None)
        head = c.headers(get_fields())[1]
        one_byte = raw_frame(0x0, 0, 1, b"x")
        n = 30000   # ~300 KB in; each answered by a 13-byte RST_STREAM (~390 KB out)
        writer.write(PREFACE + SettingsFrame(0).serialize() + b"".join(f.serialize() for f in head)
                     + raw_frame(0x3, 0, 1, struct.pack(">L", ErrorCodes.CANCEL)) + one_byte * n)
        sizes = [-1]
        for _ in range(100):   # until settled (the server stopped reading): the same size 4 times running
            await asyncio.sleep(0.05)
            sizes.append(transports[0].get_write_buffer_size() if transports else -1)
            if len(set(sizes[-4:])) == 1 and sizes[-1] > 0:
                break
        # Bounded by the transport's high-water mark (64 KiB) plus the answers to one 64 KiB read.
        assert len(set(sizes[-4:])) == 1 and 0 < sizes[-1] < 160 * 1024, sizes
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
    async with asyncio.timeout(5):   # and the connection ends when the client goes
        while not finished:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("kind,allowed,code,reason", FLOODS, ids=[f[0] for f in FLOODS])
def test_verdicts_whole_and_byte_by_byte_agree(kind, allowed, code, reason):
    """The core's verdict does not depend on how the bytes were cut, and nothing past it is taken."""
    c = RawClient(None)
    wire = PREFACE + SettingsFrame(0).serialize() + b"".join(f.serialize() if not isinstance(f, bytes) else f
                                                             for f in flood(kind, c, allowed + 1))
    trailing = raw_frame(0x6, 0, 0, b"trailing")   # after the verdict: ignored
    whole = H2Core(client_side=False, clock=lambda: 0.0)
    got = whole.receive(wire + trailing)
    single = H2Core(client_side=False, clock=lambda: 0.0)
    events = []
    for i in range(len(wire) + len(trailing)):
        events += single.receive((wire + trailing)[i:i + 1])
    for core, evs in ((whole, got), (single, events)):
        assert isinstance(evs[-1], Terminated) and evs[-1].code == code and evs[-1].reason == reason
        assert core.abuse.reason == reason and core.closed
    # One frame fewer: no verdict, either way.
    ok_wire = PREFACE + SettingsFrame(0).serialize() + b"".join(f.serialize() if not isinstance(f, bytes) else f
                                                                for f in flood(kind, RawClient(None), allowed))
    core = H2Core(client_side=False, clock=lambda: 0.0)
    assert not any(isinstance(e, Terminated) for e in core.receive(ok_wire)) and core.abuse is None


_SID = st.sampled_from([1, 3, 5, 7, 9, 0])
_PLAUSIBLE = st.one_of(
    st.tuples(st.just("headers"), _SID, st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("data"), _SID, st.booleans(), st.integers(0, 20000)),
    st.tuples(st.just("rst"), _SID, st.sampled_from([0, 1, 2, 8, 0xFFFF]), st.just(0)),
    st.tuples(st.just("window"), _SID, st.sampled_from([0, 1, 65535, 2**31 - 1]), st.just(0)),
    st.tuples(st.just("settings"), st.just(0), st.sampled_from([0, 1, 100, 2**31]), st.integers(1, 6)),
    st.tuples(st.just("ping"), st.just(0), st.booleans(), st.just(0)),
    st.tuples(st.just("priority"), _SID, st.booleans(), st.just(0)),
    st.tuples(st.just("continuation"), _SID, st.booleans(), st.just(0)),
    st.tuples(st.just("goaway"), st.just(0), st.sampled_from([0, 11]), st.just(0)),
    st.tuples(st.just("answer"), _SID, st.booleans(), st.just(0)),   # the shell answers / forgets a stream
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PLAUSIBLE, max_size=30), st.integers(1, 200))
def test_plausible_frame_sequences_only_our_events(ops, step):
    """Well-formed frames in any order (requests, bodies, resets, windows, settings, over-size lists, the
    shell answering and forgetting streams): only our events come out, never anything but H2cError."""
    now = [0.0]
    core = H2Core(client_side=False, clock=lambda: now[0])
    c = RawClient(None)
    wire = [PREFACE + SettingsFrame(0).serialize()]
    actions = []
    for op, sid, flag, n in ops:
        now[0] += 0.1
        if op == "headers":
            extra = [[], [(b"x-big", b"v" * MAX_HEADER_LIST_BYTES)], [(b"x-%d" % i, b"") for i in range(MAX_HEADERS)],
                     [(b"te", b"trailers")]][n]
            wire.append(b"".join(f.serialize() for f in c.headers(get_fields(b"/p", extra), end_stream=flag,
                                                                  sid=sid or 1)[1]))
        elif op == "data":
            wire.append(raw_frame(0x0, 0x1 if flag else 0, sid, b"d" * min(n, 16384)))
        elif op == "rst":
            wire.append(raw_frame(0x3, 0, sid, struct.pack(">L", flag)))
        elif op == "window":
            wire.append(raw_frame(0x8, 0, sid, struct.pack(">L", flag)))
        elif op == "settings":
            wire.append(raw_frame(0x4, 0, 0, struct.pack(">HL", n, flag)))
        elif op == "ping":
            wire.append(raw_frame(0x6, 0x1 if flag else 0, 0, b"12345678"))
        elif op == "priority":
            wire.append(raw_frame(0x2, 0, sid, struct.pack(">LB", sid if flag else 0, 15)))
        elif op == "continuation":
            wire.append(raw_frame(0x9, 0x4 if flag else 0, sid, c.block([(b"x-c", b"v")])))
        elif op == "goaway":
            wire.append(raw_frame(0x7, 0, 0, struct.pack(">LL", 0, flag)))
        else:
            actions.append((len(wire), sid, flag))
    blob = b"".join(wire)
    offsets = {}
    pos = 0
    for i, part in enumerate(wire):
        offsets[i] = pos
        pos += len(part)
    acts = sorted((offsets.get(i, len(blob)), sid, flag) for i, sid, flag in actions)
    events = []
    for i in range(0, len(blob), step):
        try:
            events += core.receive(blob[i:i + step])
        except H2cError:
            pass
        while acts and acts[0][0] <= i + step:
            _, sid, flag = acts.pop(0)
            try:
                if flag:
                    core.send_headers(sid, [(b":status", b"200")], end_stream=True)
                else:
                    core.send_data(sid, b"body")
            except H2cError:
                pass
            core.forget(sid)
        core.data_to_send()
    assert all(isinstance(e, OUR_EVENTS) for e in events), events
    ours = [i for i, e in enumerate(events) if isinstance(e, Terminated) and not e.by_peer]
    assert len(ours) <= 1 and (not ours or ours[0] == len(events) - 1)
    assert len(core._held) <= MAX_CONCURRENT_STREAMS


def test_streams_opened_in_one_read_refused_up_to_the_backstop():
    """h2 counts a whole read's streams before we see any: up to twice the limit in one read, the extra
    ones are refused one by one; beyond that, h2's own connection error (GOAWAY PROTOCOL_ERROR)."""
    for n, accepted, refused, code in ((150, 100, 50, None), (200, 100, 100, None),
                                       (201, 0, 0, int(ErrorCodes.PROTOCOL_ERROR))):
        c = RawClient(None)
        wire = PREFACE + SettingsFrame(0).serialize() + b"".join(
            f.serialize() for _ in range(n) for f in c.headers(get_fields())[1])
        core = H2Core(client_side=False, clock=lambda: 0.0)
        events = core.receive(wire)
        assert sum(isinstance(e, Headers) for e in events) == accepted
        assert sum(isinstance(e, Refused) for e in events) == refused
        assert [e.code for e in events if isinstance(e, Terminated)] == ([code] if code else [])
