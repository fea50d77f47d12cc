"""The sans-IO core, client core against server core (both real h2), no sockets."""

from __future__ import annotations

import pytest

from hbone.connect import ConnectRequest
from hbone.protocol import (ClientCore, ConnectionTerminated, Data, ErrorCodes, ServerCore,
                            SettingsChanged, StreamEnded, StreamReset, TunnelRequested, TunnelResponse)
from hbone.settings import HboneSettings, MiB


def pump(c: ClientCore, s: ServerCore) -> tuple[list, list]:
    """Exchange bytes until quiet; returns (server events, client events)."""
    sev, cev = [], []
    while True:
        c.flush()
        s.flush()
        a, b = c.data_to_send(), s.data_to_send()
        if not a and not b:
            return sev, cev
        if a:
            sev += s.receive_data(a)
        if b:
            cev += c.receive_data(b)


def open_pair(settings=HboneSettings()):
    c, s = ClientCore(settings), ServerCore(settings)
    pump(c, s)
    sid = c.open_tunnel(ConnectRequest.build("10.0.0.1:80"))
    sev, _ = pump(c, s)
    assert [type(e) for e in sev] == [TunnelRequested]
    s.respond(sid, 200)
    _, cev = pump(c, s)
    assert cev == [TunnelResponse(sid, 200, ())]
    return c, s, sid


def test_ztunnel_settings_in_effect_both_sides():
    c, s, sid = open_pair()
    for core in (c, s):
        h = core.h2
        assert h.local_settings.initial_window_size == 4 * MiB
        assert h.local_settings.max_frame_size == 1 * MiB
        assert h.max_inbound_frame_size == 1 * MiB  # performance.md pitfall
        assert h.inbound_flow_control_window >= 16 * MiB - 65535  # connection window raised
        assert h.local_settings.enable_push == 0
    assert s.h2.local_settings.max_concurrent_streams == 200
    assert c.h2.remote_settings.max_concurrent_streams == 200
    assert c.h2.local_settings.max_header_list_size == 16 * 1024
    assert s.h2.local_settings.max_header_list_size == 64 * 1024
    assert c.h2.max_outbound_frame_size == 1 * MiB  # the peer's 1 MiB frames are used


def test_receive_window_only_reopens_on_ack():
    """Backpressure: unacked DATA closes the window; the sender stops with bytes still queued."""
    c, s, sid = open_pair()
    c.send(sid, b"x" * (6 * MiB))
    sev, _ = pump(c, s)
    got = sum(len(e.data) for e in sev if isinstance(e, Data))
    assert got == 4 * MiB  # exactly the stream window; nothing more until acked
    assert c.pending(sid) == 2 * MiB
    s.ack(sid, got)
    sev, _ = pump(c, s)
    assert sum(len(e.data) for e in sev if isinstance(e, Data)) == 2 * MiB
    assert c.pending(sid) == 0
    assert max(len(e.data) for e in sev if isinstance(e, Data)) <= 1 * MiB


def test_half_close_each_direction_independently():
    c, s, sid = open_pair()
    c.send(sid, b"request")
    c.end_stream(sid)  # client EOF after its bytes
    sev, _ = pump(c, s)
    assert [type(e) for e in sev] == [Data, StreamEnded]
    for i in range(3):  # the server keeps sending after the client's EOF
        s.send(sid, b"reply%d" % i)
        _, cev = pump(c, s)
        assert cev == [Data(sid, b"reply%d" % i, 6)]
    s.end_stream(sid)
    _, cev = pump(c, s)
    assert cev == [StreamEnded(sid)]
    assert c.stream_closed(sid) and s.stream_closed(sid)


def test_end_stream_waits_for_queued_bytes():
    c, s, sid = open_pair()
    c.send(sid, b"y" * (5 * MiB))
    c.end_stream(sid)
    sev, _ = pump(c, s)
    assert not any(isinstance(e, StreamEnded) for e in sev)  # 1 MiB still queued behind the window
    s.ack(sid, 4 * MiB)
    sev, _ = pump(c, s)
    assert isinstance(sev[-1], StreamEnded)


@pytest.mark.parametrize("code,clean", [(ErrorCodes.NO_ERROR, True), (ErrorCodes.CANCEL, True),
                                        (ErrorCodes.INTERNAL_ERROR, False), (ErrorCodes.PROTOCOL_ERROR, False)])
def test_reset_codes(code, clean):
    c, s, sid = open_pair()
    c.send(sid, b"z" * 100)
    c.reset(sid, code)
    assert c.pending(sid) == 0  # queued bytes are dropped with the stream
    sev, _ = pump(c, s)
    resets = [e for e in sev if isinstance(e, StreamReset)]
    assert resets == [StreamReset(sid, code)] and resets[0].clean is clean


def test_error_answers_end_the_stream():
    c, s = ClientCore(), ServerCore()
    pump(c, s)
    sid = c.open_tunnel(ConnectRequest.build("10.0.0.1:80"))
    pump(c, s)
    s.respond(sid, 401)
    _, cev = pump(c, s)
    # HEADERS+END_STREAM, then RST_STREAM NO_ERROR so the client stops uploading (RFC 9113 §8.1)
    assert cev == [TunnelResponse(sid, 401, ()), StreamEnded(sid), StreamReset(sid, ErrorCodes.NO_ERROR)]
    with pytest.raises(RuntimeError):
        s.respond(sid, 200)  # the state table has no (answered, accept) transition


def test_goaway_refuses_new_streams_keeps_old():
    c, s, sid = open_pair()
    s.goaway()
    _, cev = pump(c, s)
    assert cev == [ConnectionTerminated(0, sid, True)]
    with pytest.raises(Exception):
        c.open_tunnel(ConnectRequest.build("10.0.0.1:80"))
    s.send(sid, b"still flowing")
    _, cev = pump(c, s)
    assert cev == [Data(sid, b"still flowing", 13)]


def test_peer_flow_control_violation_is_goaway_not_exception():
    c, s, sid = open_pair()
    # Forge a DATA frame larger than the 4 MiB stream window by lying about our view of the window.
    c.h2._get_stream_by_id(sid).outbound_flow_control_window = 2**30
    c.h2.outbound_flow_control_window = 2**30
    c.send(sid, b"w" * (5 * MiB))
    sev, cev = pump(c, s)
    assert any(isinstance(e, (ConnectionTerminated, StreamReset)) for e in sev + cev)


def test_settings_reject_out_of_range():
    with pytest.raises(ValueError):
        HboneSettings(max_frame_size=1000)
    with pytest.raises(ValueError):
        HboneSettings(stream_window=2**31)
    assert SettingsChanged(5).max_concurrent_streams == 5
