"""The h2 internals hbone/ relies on (h2 pinned to 4.4.1): the frame-repr workaround and graceful
GOAWAY are in effect and h2 still works with them; the allocator tuning applies."""

from __future__ import annotations

import ctypes
import platform

import h2.connection
import h2.stream
import h2.config
import hyperframe.frame
import pytest

from hbone import _h2fast, _malloc
from hbone.connect import ConnectRequest
from hbone.protocol import ClientCore, Data, ServerCore, StreamEnded


def test_data_frame_repr_is_cheap_and_h2_still_parses_frames():
    assert _h2fast.is_installed()
    frame = hyperframe.frame.DataFrame(1, b"\xab" * (1 << 20))
    text = repr(frame)
    assert "1048576 bytes" in text and "abab" not in text  # no hex dump of the payload
    # h2's receive path (which formats that repr for every frame) still delivers data intact
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "x")])
    client.send_data(1, b"payload", end_stream=True)
    events = server.receive_data(client.data_to_send())
    assert [e.data for e in events if hasattr(e, "data") and isinstance(e.data, bytes)] == [b"payload"]


def test_repr_is_not_called_with_a_hex_dump_on_the_hot_path(monkeypatch):
    """If a future h2 stops routing DATA through our cheap repr, this fails instead of silently
    halving upload throughput (performance.md)."""
    calls = []
    original = hyperframe.frame.DataFrame._body_repr
    monkeypatch.setattr(hyperframe.frame.DataFrame, "_body_repr",
                        lambda self: calls.append(len(self.data)) or original(self))
    c, s = ClientCore(), ServerCore()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    sid = c.open_tunnel(ConnectRequest.build("10.0.0.1:80"))
    s.receive_data(c.data_to_send())
    c.send(sid, b"x" * 1000)
    c.flush()
    events = s.receive_data(c.data_to_send())
    assert [e.data for e in events if isinstance(e, Data)] == [b"x" * 1000]
    # Either way no hex dump is built: with the DATA fast path (on) the unpadded frame never reaches
    # hyperframe at all; without it, h2 calls repr on the frame and gets our cheap one.
    assert calls == ([] if _h2fast.DATA_FAST_PATH else [1000])
    assert original is _h2fast._data_body_repr


def test_graceful_goaway_transitions_are_per_connection():
    c = ClientCore()
    assert c.h2.state_machine._transitions is _h2fast._GRACEFUL_TRANSITIONS
    plain = h2.connection.H2Connection()
    assert plain.state_machine._transitions is not _h2fast._GRACEFUL_TRANSITIONS
    # after GOAWAY, existing streams still finish
    s = ServerCore()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    sid = c.open_tunnel(ConnectRequest.build("10.0.0.1:80"))
    s.receive_data(c.data_to_send())
    s.respond(sid, 200)
    s.goaway()
    c.receive_data(s.data_to_send())
    c.send(sid, b"late")
    c.flush()
    c.end_stream(sid)
    events = s.receive_data(c.data_to_send())
    assert [type(e) for e in events] == [Data, StreamEnded]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_malloc_tuning_applies_on_glibc():
    assert _malloc.tune_malloc() is True
    assert _malloc.tune_malloc() is True  # idempotent
    assert _malloc.is_tuned()
    # glibc has no getter for the thresholds; check that a 256 KiB block (a TLS read) now comes
    # from the heap (brk/arena), not a fresh mmap: mallinfo2's hblkhd counts mmapped bytes.
    libc = ctypes.CDLL("libc.so.6")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")]
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc < 2.33")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(256 * 1024)
    during = libc.mallinfo2().hblkhd
    libc.free(p)
    assert during == before  # not mmapped


from hypothesis import given, settings, strategies as st  # noqa: E402

from hbone.protocol import TunnelRequested  # noqa: E402
from hbone.settings import HboneSettings  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["open", "c_end", "s_end", "c_reset", "s_reset"]),
                          st.integers(0, 30)), max_size=80))
def test_incremental_stream_count_matches_a_full_scan(ops):
    many = HboneSettings(server_max_concurrent_streams=1000, client_max_streams_per_connection=1000)
    c, s = ClientCore(many), ServerCore(many)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    sids: list[int] = []
    for op, pick in ops:
        if op == "open":
            sids.append(c.open_tunnel(ConnectRequest.build("10.0.0.1:80")))
        elif sids:
            sid = sids[pick % len(sids)]
            {"c_end": lambda: c.end_stream(sid), "s_end": lambda: s.end_stream(sid),
             "c_reset": lambda: c.reset(sid), "s_reset": lambda: s.reset(sid)}[op]()
        for e in s.receive_data(c.data_to_send()):
            if isinstance(e, TunnelRequested):
                s.respond(e.stream_id, 200)
        c.receive_data(s.data_to_send())
        for core, prop in ((s, "open_inbound_streams"), (c, "open_outbound_streams")):
            expected = sum(1 for st_ in core.h2.streams.values() if st_.open)
            assert getattr(core.h2, prop) == expected


def test_opening_thousands_of_streams_is_linear(monkeypatch):
    """h2 4.4.1 counts open streams by scanning every stream (``H2Stream.open``) each time one opens:
    quadratic (performance.md: 8 000 tunnels took 5.6 s). Untimed: count the scan's property reads
    while opening 3 000 streams beside 1 000 already open; a scan would read ~4 000 per stream."""
    many = HboneSettings(server_max_concurrent_streams=100000, client_max_streams_per_connection=100000)
    c, s = ClientCore(many), ServerCore(many)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    req = ConnectRequest.build("10.0.0.1:80")

    def open_batch(n: int) -> None:
        for _ in range(n):
            c.open_tunnel(req)
            for e in s.receive_data(c.data_to_send()):
                s.respond(e.stream_id, 200) if isinstance(e, TunnelRequested) else None
            c.receive_data(s.data_to_send())

    open_batch(1000)
    reads = 0
    plain_open = h2.stream.H2Stream.open

    def counted(self):
        nonlocal reads
        reads += 1
        return plain_open.fget(self)

    monkeypatch.setattr(h2.stream.H2Stream, "open", property(counted))
    open_batch(3000)
    assert s.h2.open_inbound_streams == 4000
    assert reads / 3000 < 20, reads   # a handful per stream on both sides, not one per open stream


def _outcome(run):
    try:
        events = run()
    except Exception as err:  # h2's ProtocolError and friends: compared by type and text
        return ("raised", type(err), str(err))
    return ("ok", [(type(e), sorted(vars(e).items(), key=lambda kv: kv[0])) for e in events])


def test_transition_fast_path_steps_as_h2s_process_input():
    """9. in hbone/_h2fast.py: _stream_step is H2StreamStateMachine.process_input for every state and
    input of h2's stream machine (events, new state, error); _conn_step is the connection machine's
    process_input for the inputs it is used with, in every state, with the plain and the graceful
    (after-GOAWAY) table. Fails if h2's tables or callbacks change under the pin."""
    from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
    from h2.stream import H2StreamStateMachine, StreamInputs, StreamState

    assert _h2fast.TRANSITION_FAST_PATH
    checked = 0
    for state in StreamState:
        for input_ in StreamInputs:
            ours, theirs = H2StreamStateMachine(1), H2StreamStateMachine(1)
            ours.state = theirs.state = state
            got = _outcome(lambda: _h2fast._stream_step(ours, input_, input_.value))
            want = _outcome(lambda: theirs.process_input(input_))
            assert got == want, (state, input_)
            assert (ours.state, vars(ours)) == (theirs.state, vars(theirs)), (state, input_)
            checked += got[0] == "ok"
    assert checked > 20  # most pairs are valid transitions, not all errors
    for graceful in (False, True):
        for state in ConnectionState:
            for input_ in _h2fast._CONN_IDENTITY_INPUTS:
                ours, theirs = H2ConnectionStateMachine(), H2ConnectionStateMachine()
                if graceful:
                    ours._transitions = theirs._transitions = _h2fast._GRACEFUL_TRANSITIONS
                ours.state = theirs.state = state
                got = _outcome(lambda: _h2fast._conn_step(ours, input_))
                want = _outcome(lambda: theirs.process_input(input_))
                assert got == want and ours.state is theirs.state, (graceful, state, input_)


def test_connect_header_strings_are_sent_raw_and_read_back_by_plain_hpack():
    """10. in hbone/_h2fast.py: literals go on the wire without Huffman coding (RFC 7541 §5.2, H bit
    0), so a fresh traceparent is visible in the bytes; our server and hpack's own decoder (which
    every peer's HPACK must match) read the same headers back."""
    import hpack
    c, s = ClientCore(), ServerCore()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = [("baggage", "k8s.namespace.name=default,service.name=productpage"),
               ("forwarded", 'for="10.1.0.10:40000"'), ("traceparent", traceparent)]
    c.open_tunnel(ConnectRequest.build("10.1.2.3:9080", headers))
    wire = c.data_to_send()
    assert traceparent.encode() in wire and b"10.1.2.3:9080" in wire
    pos, block = 0, b""
    while pos < len(wire):   # the HEADERS frame (END_HEADERS: the block fits one frame)
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(wire[pos:pos + 9]))
        if isinstance(frame, hyperframe.frame.HeadersFrame):
            block = wire[pos + 9:pos + 9 + length]
        pos += 9 + length
    decoded = [(k.decode(), v.decode()) for k, v in hpack.Decoder().decode(block, raw=True)]
    assert decoded == [(":method", "CONNECT"), (":authority", "10.1.2.3:9080"), *headers]
    [req] = [e for e in s.receive_data(wire) if isinstance(e, TunnelRequested)]
    assert [(k, req.request.header(k)) for k, _ in headers] == headers
    # A second CONNECT on the same connection reuses the dynamic table as before (indexed fields).
    c.open_tunnel(ConnectRequest.build("10.1.2.3:9080", headers))
    assert len(c.data_to_send()) < len(wire)
