"""The short-tunnel fast paths keep the protocol exact (untimed): the directly framed 200, the
server's own header checks in place of h2's, END_STREAM on the last DATA frame, and node mode's
outbound listeners accepting as ``TcpConnection`` so ``relay`` splices."""

from __future__ import annotations

import asyncio
import socket

import hyperframe.frame
import pytest

from hbone.connect import ConnectRequest
from hbone.protocol import ClientCore, Data, ServerCore, StreamEnded, TunnelRequested, TunnelState, TunnelResponse
from hbone.stream import TcpConnection, start_tcp_server
from tests.test_hbone_protocol import pump


def _open(c: ClientCore, s: ServerCore) -> int:
    sid = c.open_tunnel(ConnectRequest.build("10.0.0.1:80"))
    sev, _ = pump(c, s)
    assert [type(e) for e in sev] == [TunnelRequested]
    return sid


def _frames(data: bytes) -> list[hyperframe.frame.Frame]:
    out = []
    while data:
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def test_plain_200_is_one_static_table_byte_and_h2_state_follows(monkeypatch):
    c, s = ClientCore(), ServerCore()
    pump(c, s)
    sid = _open(c, s)
    called = []
    monkeypatch.setattr(s.h2, "send_headers", lambda *a, **k: called.append(a))
    s.respond(sid, 200)
    wire = s.data_to_send()
    frames = _frames(wire)
    assert [type(f) for f in frames] == [hyperframe.frame.HeadersFrame]
    assert frames[0].stream_id == sid and frames[0].data == b"\x88" and "END_HEADERS" in frames[0].flags
    assert called == []  # h2's generic path was not taken
    assert c.receive_data(wire) == [TunnelResponse(sid, 200, ())]
    # h2 on our side knows the response went out: data flows and the stream can end normally
    s.send(sid, b"reply")
    s.end_stream(sid)
    _, cev = pump(c, s)
    assert cev == [Data(sid, b"reply", 5), StreamEnded(sid)]


def test_direct_200s_interleave_with_dynamic_table_answers():
    """Answers with extra headers go through h2's encoder (dynamic table entries); the one-byte 200
    never touches that table, so later header blocks still decode on the peer."""
    c, s = ClientCore(), ServerCore()
    pump(c, s)
    for i in range(6):
        sid = _open(c, s)
        headers = (("x-served-by", f"node-{i % 2}"),) if i % 2 else ()
        s.respond(sid, 200, headers)
        _, cev = pump(c, s)
        assert cev == [TunnelResponse(sid, 200, headers)]


def test_pending_table_size_update_takes_h2s_path():
    """RFC 7541 §4.2: a table size change must open the next header block, so the fixed byte
    cannot be used then; h2's encoder emits the update and the 200."""
    c, s = ClientCore(), ServerCore()
    pump(c, s)
    sid = _open(c, s)
    s.h2.encoder.header_table_size = 256  # what h2 does on the peer's SETTINGS_HEADER_TABLE_SIZE
    assert s.h2.encoder.table_size_changes
    s.respond(sid, 200)
    wire = s.data_to_send()
    assert _frames(wire)[0].data != b"\x88"
    assert not s.h2.encoder.table_size_changes
    assert c.receive_data(wire) == [TunnelResponse(sid, 200, ())]


@pytest.mark.parametrize("name,value", [("bad name", "x"), ("X-Ok", "a\r\nb"), ("connection", "close"),
                                        (":status", "204"), ("", "x"), ("x-nul", "a\0b")])
def test_bad_extra_response_headers_raise_before_answering(name, value):
    c, s = ClientCore(), ServerCore()
    pump(c, s)
    sid = _open(c, s)
    with pytest.raises(ValueError):
        s.respond(sid, 200, ((name, value),))
    assert s.tunnel_state(sid) is TunnelState.REQUESTED  # still answerable
    s.respond(sid, 200)
    _, cev = pump(c, s)
    assert cev == [TunnelResponse(sid, 200, ())]


def test_last_queued_data_frame_carries_end_stream():
    c, s = ClientCore(), ServerCore()
    pump(c, s)
    sid = _open(c, s)
    s.respond(sid, 200)
    pump(c, s)
    s.send(sid, b"a" * 700)
    s.send(sid, b"b" * 324)
    s.end_stream(sid)
    s.flush()
    frames = _frames(s.data_to_send())
    assert [type(f) for f in frames] == [hyperframe.frame.DataFrame]
    assert frames[0].data == b"a" * 700 + b"b" * 324 and "END_STREAM" in frames[0].flags
    assert s.stream_closed(sid) is False  # the client's direction is still open
    # end_stream with nothing queued is still a bare END_STREAM
    c2, s2 = ClientCore(), ServerCore()
    pump(c2, s2)
    sid2 = _open(c2, s2)
    s2.respond(sid2, 200)
    pump(c2, s2)
    s2.end_stream(sid2)
    _, cev = pump(c2, s2)
    assert cev == [StreamEnded(sid2)]


async def _accept_one(send: bytes) -> tuple[TcpConnection, socket.socket]:
    got: asyncio.Queue = asyncio.Queue()
    server = await start_tcp_server(got.put_nowait, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(send)
    conn = await asyncio.wait_for(got.get(), 5)
    server.close()
    return conn, client


async def test_start_tcp_server_hands_over_tcp_connections_and_unread_keeps_order():
    conn, client = await _accept_one(b"world")
    try:
        assert conn.__class__ is TcpConnection  # exactly: relay() splices only this class
        first = await conn.read(2)
        conn.unread(b"hello ")
        rest = b""
        client.shutdown(socket.SHUT_WR)
        while chunk := await conn.read():
            rest += chunk
        assert first + b"|" + rest == b"wo|hello rld"
    finally:
        client.close()
        conn.close()


async def test_node_outbound_listener_gives_its_handlers_tcp_connections():
    """Node mode's 15001/SOCKS5 accept path: the stream a handler gets is a TcpConnection, so the
    relay to the HBONE upstream takes the splice (hbone/relay.py), not the pumps."""
    from proxy.node.outbound import OutboundProxy
    seen: asyncio.Queue = asyncio.Queue()
    proxy = OutboundProxy(snapshot=lambda: None, local_workloads=dict, identities=None,  # type: ignore[arg-type]
                          trust_domain="cluster.local")

    async def handler(stream, sock):
        seen.put_nowait((stream.__class__, sock is not None, await stream.read()))
        stream.close()

    host, port = await proxy._listen("127.0.0.1", 0, handler, False)
    client = socket.create_connection((host, port))
    try:
        client.sendall(b"x")
        cls, has_sock, data = await asyncio.wait_for(seen.get(), 5)
        assert cls is TcpConnection and has_sock and data == b"x"
    finally:
        client.close()
        for server in proxy.servers:
            server.close()


def test_request_response_data_skips_h2s_state_machines_on_both_sides(monkeypatch):
    """Regression check (issue 7, the waypoint's per-request path): once a tunnel is open, DATA sent
    and received — on the server side (the waypoint's inbound tunnels) and on the client side (its pooled
    upstream tunnels to node-b, hbone/pool.py) — takes hbone/_h2fast.py's fast paths (5b. receive, 7b.
    send, 7c. acknowledgement): no h2 state-machine step, no hyperframe DATA object."""
    import h2.connection
    import h2.stream
    c, s = ClientCore(), ServerCore()
    pump(c, s)
    sid = _open(c, s)
    s.respond(sid, 200)
    pump(c, s)
    steps = []
    for cls in (h2.stream.H2StreamStateMachine, h2.connection.H2ConnectionStateMachine):
        original = cls.process_input
        monkeypatch.setattr(cls, "process_input",
                            lambda self, i, _o=original: steps.append(i) or _o(self, i))
    monkeypatch.setattr(hyperframe.frame.DataFrame, "serialize",
                        lambda self: pytest.fail("DATA was framed by hyperframe"))
    for n in range(3):   # request → answer, three times on the same tunnel (a pooled connection)
        c.send(sid, b"GET / HTTP/1.1\r\n\r\n")
        c.flush()
        sev, _ = pump(c, s)
        assert sev == [Data(sid, b"GET / HTTP/1.1\r\n\r\n", 18)]
        s.ack(sid, 18)
        s.send(sid, b"HTTP/1.1 200 OK\r\n\r\n")
        s.flush()
        _, cev = pump(c, s)
        assert cev == [Data(sid, b"HTTP/1.1 200 OK\r\n\r\n", 19)]
        c.ack(sid, 19)
    assert steps == []


def _guard_state(g) -> tuple:
    return (g.verdict, g.streams_opened, g._highest_stream, g._block_stream, g._block_bytes,
            g._block_frames, g.empty_in_a_row, g._body_left)


def test_guard_inline_headers_check_decides_as_check_frame():
    """hbone/limits.py InboundGuard.feed checks a complete HEADERS frame inline (the CONNECT of every
    tunnel); a guard with the inline path off (_headers_inline_max = -1: every HEADERS through
    FrameHead + _check_frame) must end in the same state and verdict, fed whole and byte by byte."""
    import struct

    from hbone.limits import InboundGuard
    from hbone.settings import HboneSettings

    def frame(ftype: int, flags: int, sid: int, body: bytes) -> bytes:
        return struct.pack(">BHBBI", len(body) >> 16, len(body) & 0xFFFF, ftype, flags, sid) + body

    settings = HboneSettings(max_header_block=100)
    cases = {
        "tunnels": b"".join(frame(1, 4, 2 * i + 1, b"h" * 30) + frame(0, 1, 2 * i + 1, b"d" * 50)
                            for i in range(5)),
        "end_stream_and_padded_flags": frame(1, 4 | 1, 1, b"h" * 20) + frame(1, 4 | 8 | 0x20, 3, b"p" * 20),
        "lower_and_reserved_bit_ids": frame(1, 4, 7, b"h") + frame(1, 4, 3, b"h") + frame(1, 4, 0x80000009, b"h"),
        "block_over_the_limit": frame(1, 4, 1, b"h" * 101),
        "empty_headers_flood": frame(1, 4, 1, b"") + frame(1, 4, 3, b"") + frame(1, 4, 5, b""),
        "continuation_then_complete": frame(1, 0, 1, b"h" * 10) + frame(9, 4, 1, b"c" * 10) + frame(1, 4, 3, b"h"),
        "headers_inside_an_open_block": frame(1, 0, 1, b"h" * 10) + frame(1, 4, 3, b"h" * 10),
    }
    for name, data in cases.items():
        for chunked in (False, True):
            states = []
            for inline in (True, False):
                g = InboundGuard(settings, server_side=False)
                if not inline:
                    g._headers_inline_max = -1
                if chunked:
                    for i in range(len(data)):
                        g.feed(data[i:i + 1], 0.0)
                else:
                    g.feed(data, 0.0)
                states.append(_guard_state(g))
            assert states[0] == states[1], (name, chunked)
    g = InboundGuard(settings, server_side=False)
    g.feed(cases["block_over_the_limit"], 0.0)
    assert g.verdict is not None and g.verdict.reason == "header_block_too_large"
