"""The h2c core (sans-IO) fed by a real h2 client: whole, byte by byte, with trailing data; bounded
settings; acks as WINDOW_UPDATEs; a hypothesis test that only our events (never an exception other than
H2cError) come out of receive(); and the pure gRPC / mirror helpers."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events as ev
from h2.settings import SettingCodes
from hypothesis import HealthCheck, given, settings, strategies as st

from proxy.pipeline.answers import grpc_local_reply, http_to_grpc_status, is_grpc
from proxy.pipeline.h2c import (MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_BYTES, Data, Ended, H2Core, H2cError,
                                Headers, Refused, Rejected, Reset, Terminated, Trailers, WindowOpened)
from proxy.pipeline.mirror import shadow_authority
from proxy.sniff import H2C_PREFACE

EVENT_TYPES = (Headers, Data, Trailers, Ended, Reset, WindowOpened, Terminated, Refused, Rejected)


def client_bytes() -> tuple[h2.connection.H2Connection, bytes]:
    """A real h2 client's preface, a gRPC-ish POST with a body and trailers, and a second GET."""
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    c.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"greeter:9090"),
                       (b":path", b"/g.G/M"), (b"content-type", b"application/grpc")])
    c.send_data(1, b"\x00\x00\x00\x00\x03abc")
    c.send_headers(1, [(b"x-trailer", b"t")], end_stream=True)
    c.send_headers(3, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
                   end_stream=True)
    return c, c.data_to_send()


def summary(events) -> list:
    """Events with DATA joined per stream (byte-by-byte feeding splits DATA frames differently)."""
    out: list = []
    for e in events:
        assert isinstance(e, EVENT_TYPES)
        if isinstance(e, Data) and out and isinstance(out[-1], Data) and out[-1].stream_id == e.stream_id:
            out[-1] = Data(e.stream_id, out[-1].data + e.data, out[-1].flow_len + e.flow_len)
        elif not isinstance(e, WindowOpened):
            out.append(e)
    return out


def test_whole_and_byte_by_byte_give_the_same_events():
    _, data = client_bytes()
    assert data.startswith(H2C_PREFACE)
    whole = summary(H2Core(client_side=False).receive(data))
    core = H2Core(client_side=False)
    single = []
    for i in range(len(data)):
        single.extend(core.receive(data[i:i + 1]))
    assert summary(single) == whole
    kinds = [type(e).__name__ for e in whole]
    assert kinds == ["Headers", "Data", "Trailers", "Ended", "Headers", "Ended"]
    assert whole[0].headers[3] == (b":path", b"/g.G/M") and not whole[0].end_stream
    assert whole[1].data == b"\x00\x00\x00\x00\x03abc" and whole[2].headers == ((b"x-trailer", b"t"),)
    assert whole[4].end_stream


def test_trailing_data_after_a_request_is_kept_for_the_next_call():
    _, data = client_bytes()
    core = H2Core(client_side=False)
    cut = len(data) - 5   # the second request's HEADERS frame split across two calls
    first = summary(core.receive(data[:cut]))
    rest = summary(core.receive(data[cut:]))
    assert [type(e).__name__ for e in first] == ["Headers", "Data", "Trailers", "Ended"]
    assert [type(e).__name__ for e in rest] == ["Headers", "Ended"] and rest[0].stream_id == 3


def test_settings_are_bounded_and_acks_become_window_updates():
    client, data = client_bytes()
    server = H2Core(client_side=False)
    server.receive(data)
    settings_events = [e for e in client.receive_data(server.data_to_send()) if isinstance(e, ev.RemoteSettingsChanged)]
    changed = settings_events[0].changed_settings
    assert changed[SettingCodes.MAX_CONCURRENT_STREAMS].new_value == MAX_CONCURRENT_STREAMS
    assert changed[SettingCodes.MAX_HEADER_LIST_SIZE].new_value == MAX_HEADER_LIST_BYTES
    assert changed[SettingCodes.ENABLE_PUSH].new_value == 0
    server.receive(client.data_to_send())   # the client's SETTINGS ack
    server.data_to_send()
    # DATA is acknowledged only when ack() is called (the consumer took it): then WINDOW_UPDATE
    # (h2 batches updates until half a window was consumed, so send 600 KiB of a 1 MiB window).
    client.send_headers(5, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")])
    body = b"x" * (600 * 1024)
    for i in range(0, len(body), 16384):
        client.send_data(5, body[i:i + 16384])
    got = [e for e in server.receive(client.data_to_send()) if isinstance(e, Data)]
    assert sum(len(e.data) for e in got) == len(body)
    assert not [e for e in client.receive_data(server.data_to_send()) if isinstance(e, ev.WindowUpdated)]
    server.ack(5, sum(e.flow_len for e in got))
    updates = [e for e in client.receive_data(server.data_to_send()) if isinstance(e, ev.WindowUpdated)]
    assert {u.stream_id for u in updates} >= {5}


def test_protocol_error_is_goaway_and_a_terminated_event_then_silence():
    _, data = client_bytes()
    core = H2Core(client_side=False)
    core.receive(data)
    events = core.receive(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")   # DATA on stream 0
    assert len(events) == 1 and isinstance(events[0], Terminated) and not events[0].by_peer
    assert core.closed and core.data_to_send()   # the GOAWAY frame
    assert core.receive(b"anything") == []


def test_send_on_a_closed_stream_raises_our_error():
    _, data = client_bytes()
    core = H2Core(client_side=False)
    core.receive(data)
    core.send_headers(3, [(b":status", b"200")], end_stream=True)
    try:
        core.send_headers(3, [(b":status", b"200")])
    except H2cError:
        pass
    else:
        raise AssertionError("expected H2cError")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=8), st.booleans())
def test_only_our_events_come_out_of_receive(chunks, with_preface):
    core = H2Core(client_side=False)
    prefix = client_bytes()[1][:len(H2C_PREFACE) + 30] if with_preface else b""
    for chunk in [prefix, *chunks]:
        try:
            events = core.receive(chunk)
        except H2cError:
            continue
        assert all(isinstance(e, EVENT_TYPES) for e in events)
    core.data_to_send()


def test_grpc_status_mapping_is_envoys():
    # Envoy Grpc::Utility::httpToGrpcStatus.
    assert [http_to_grpc_status(s) for s in (400, 401, 403, 404, 429, 502, 503, 504, 500, 418)] == \
        [13, 16, 7, 12, 14, 14, 14, 14, 2, 2]
    status, fields = grpc_local_reply(403, b"RBAC: access denied")
    assert status == 200 and dict(fields) == {b"content-type": b"application/grpc", b"grpc-status": b"7",
                                              b"grpc-message": b"RBAC: access denied"}
    assert dict(grpc_local_reply(200, b"50% \xff", 14)[1])[b"grpc-message"] == b"50%25 %FF"
    assert is_grpc([(b"content-type", b"application/grpc")])
    assert is_grpc([(b"content-type", b"application/grpc+proto; charset=x")])
    assert not is_grpc([(b"content-type", b"application/grpc-web")])
    assert not is_grpc([(b"content-type", b"text/plain")]) and not is_grpc([])


def test_shadow_authority_as_envoy():
    assert shadow_authority(b"reviews:9080") == b"reviews-shadow:9080"
    assert shadow_authority(b"reviews") == b"reviews-shadow"
    assert shadow_authority(b"[fd00::1]:80") == b"[fd00::1]-shadow:80"
