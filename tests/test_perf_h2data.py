"""The receive fast paths of hbone/_h2fast.py (5. DATA, 6. HEADERS opening a stream) and its send
fast path (7. DATA / END_STREAM) against h2's own path, byte for byte.

The same wire bytes — real h2 client output: DATA of many sizes, padded DATA, PING, SETTINGS,
WINDOW_UPDATE, RST_STREAM, new streams, END_STREAM, and hand-made protocol errors — are fed, split
at random points (including inside frame headers), to two servers: one with the fast path, one
without. Their events, their h2 state (flow-control windows, stream states) and the bytes they
answer with must be identical."""

from __future__ import annotations

import os
import random

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hyperframe.frame
import pytest

from hbone import _h2fast

REQUEST = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.1:80")]


def _server(normalize: bool = True) -> _h2fast.H2Connection:
    # normalize=False is the HBONE ServerCore's own configuration (6.'s lean receive_headers).
    s = _h2fast.H2Connection(config=h2.config.H2Configuration(client_side=False, header_encoding=None,
                                                              validate_inbound_headers=False,
                                                              normalize_inbound_headers=normalize))
    s.initiate_connection()
    s.data_to_send()
    return s


def _norm(events) -> list:
    out = []
    for e in events:
        item = [type(e).__name__, getattr(e, "stream_id", None)]
        if isinstance(e, h2.events.DataReceived):
            item += [e.data, e.flow_controlled_length, e.stream_ended is not None]
        if isinstance(e, h2.events.RequestReceived):
            item += [[tuple(h) for h in e.headers], e.stream_ended is not None, e.priority_updated is not None]
        out.append(tuple(item))
    return out


def _state(s: _h2fast.H2Connection) -> tuple:
    return (s.state_machine.state, s._inbound_flow_control_window_manager.current_window_size,
            s.outbound_flow_control_window, s.highest_inbound_stream_id, s.open_inbound_streams,
            list(s.decoder.header_table.dynamic_entries),
            sorted((sid, st.state_machine.state, st._inbound_window_manager.current_window_size,
                    st.outbound_flow_control_window, st.state_machine.stream_closed_by)
                   for sid, st in s.streams.items()),
            sorted(s._closed_streams.items()))


_SWITCHES = ("DATA_FAST_PATH", "HEADERS_FAST_PATH", "SEND_FAST_PATH", "HPACK_MEMO")


def _switch(monkeypatch, on: bool) -> None:
    for name in _SWITCHES:
        monkeypatch.setattr(_h2fast, name, on)


class Twin:
    """A fast-path server and an h2-only server fed the same bytes."""

    def __init__(self, monkeypatch, rng: random.Random, normalize: bool = True):
        self.monkeypatch = monkeypatch
        self.rng = rng
        self.fast, self.slow = _server(normalize), _server(normalize)
        self.got: dict[int, bytes] = {}   # stream → bytes delivered (identical on both servers)
        self.outbox = b""                 # what the servers answered (identical), for the client

    def feed(self, wire: bytes, *, max_split: int = 40_000) -> list:
        pieces, i = [], 0
        while i < len(wire):
            step = self.rng.choice([1, 3, 9, 10, 17, self.rng.randint(1, max_split)])
            pieces.append(wire[i:i + step])
            i += step
        all_events = []
        for piece in pieces:
            outcome = []
            for flag, server in ((True, self.fast), (False, self.slow)):
                _switch(self.monkeypatch, flag)
                try:
                    outcome.append(("ok", _norm(server.receive_data(piece))))
                except h2.exceptions.ProtocolError as err:
                    outcome.append(("error", type(err).__name__))
            assert outcome[0] == outcome[1]
            assert _state(self.fast) == _state(self.slow)
            out = self.fast.data_to_send()
            assert out == self.slow.data_to_send()
            self.outbox += out
            if outcome[0][0] == "error":
                return all_events + [outcome[0]]
            all_events += outcome[0][1]
        for e in all_events:
            if e[0] == "DataReceived":
                self.got[e[1]] = self.got.get(e[1], b"") + e[2]
        return all_events

    def take(self) -> bytes:
        out, self.outbox = self.outbox, b""
        return out

    def both(self, call) -> None:
        """The same send-side call on both servers (fast, then h2's own path): same outcome, same
        state, same bytes."""
        outcome = []
        for flag, server in ((True, self.fast), (False, self.slow)):
            _switch(self.monkeypatch, flag)
            try:
                call(server)
                outcome.append("ok")
            except (h2.exceptions.H2Error, ValueError) as err:
                outcome.append(type(err).__name__)
        assert outcome[0] == outcome[1]
        assert _state(self.fast) == _state(self.slow)
        out = self.fast.data_to_send()
        assert out == self.slow.data_to_send()
        self.outbox += out

    def ack(self, events) -> None:
        for e in events:
            if e[0] == "DataReceived" and e[3]:
                for s in (self.fast, self.slow):
                    s.acknowledge_received_data(e[3], e[1])
        out = self.fast.data_to_send()
        assert out == self.slow.data_to_send()
        self.outbox += out


def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    return c


@pytest.mark.parametrize("seed", range(6))
def test_fast_path_matches_h2_byte_for_byte_with_interleaved_control_frames(monkeypatch, seed):
    rng = random.Random(seed)
    twin, c = Twin(monkeypatch, rng), _client()
    twin.feed(c.data_to_send())
    sent: dict[int, bytes] = {}
    open_ids: list[int] = []
    next_id = 1
    for _ in range(60):
        action = rng.choice(["open", "data", "data", "data", "padded", "ping", "settings", "window",
                             "end", "reset"])
        if action == "open" or not open_ids:
            c.send_headers(next_id, REQUEST)
            open_ids.append(next_id)
            sent[next_id] = b""
            next_id += 2
        elif action in ("data", "padded"):
            sid = rng.choice(open_ids)
            room = min(c.local_flow_control_window(sid), c.max_outbound_frame_size)
            if room > 300:
                payload = os.urandom(rng.randint(0, min(room - 256, 20_000)))
                c.send_data(sid, payload, pad_length=rng.randint(0, 255) if action == "padded" else None)
                sent[sid] += payload
        elif action == "ping":
            c.ping(os.urandom(8))
        elif action == "settings":
            c.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: rng.randint(10, 100)})
        elif action == "window":
            c.increment_flow_control_window(rng.randint(1, 10_000))
        elif action == "end":
            sid = open_ids.pop(rng.randrange(len(open_ids)))
            c.end_stream(sid)
        else:
            sid = open_ids.pop(rng.randrange(len(open_ids)))
            c.reset_stream(sid)
            sent.pop(sid)
        events = twin.feed(c.data_to_send())
        twin.ack(events)
        c.receive_data(twin.take())  # WINDOW_UPDATEs, PING and SETTINGS ACKs
    # every byte sent on a stream that was not reset arrived, in order
    for sid, data in sent.items():
        assert twin.got.get(sid, b"") == data


def test_fast_path_delivers_exact_bytes_per_stream_and_end_stream(monkeypatch):
    rng = random.Random(7)
    twin, c = Twin(monkeypatch, rng), _client()
    twin.feed(c.data_to_send())
    payloads = {1: os.urandom(50_000), 3: os.urandom(33_333)}
    for sid in payloads:
        c.send_headers(sid, REQUEST)
    got = {1: b"", 3: b""}
    ended = set()
    offsets = {1: 0, 3: 0}
    while offsets[1] < len(payloads[1]) or offsets[3] < len(payloads[3]):
        for sid, data in payloads.items():
            if offsets[sid] < len(data):
                n = min(rng.randint(1, 16_384), c.local_flow_control_window(sid))
                if n <= 0:
                    continue
                c.send_data(sid, data[offsets[sid]:offsets[sid] + n])
                offsets[sid] += n
                if offsets[sid] >= len(data):
                    c.end_stream(sid)
        events = twin.feed(c.data_to_send(), max_split=5_000)
        for e in events:
            if e[0] == "DataReceived":
                got[e[1]] += e[2]
            if e[0] == "StreamEnded":
                ended.add(e[1])
        twin.ack(events)
        c.receive_data(twin.take())
    assert got == payloads and ended == {1, 3}


def _raw(frame: hyperframe.frame.Frame) -> bytes:
    return frame.serialize()


@pytest.mark.parametrize("case", ["over_window", "unknown_stream", "after_end", "too_large", "stream_zero",
                                  "content_length_over", "content_length_exact"])
def test_protocol_errors_are_h2s_own(monkeypatch, case):
    rng = random.Random(1)
    twin, c = Twin(monkeypatch, rng), _client()
    twin.feed(c.data_to_send())
    headers = REQUEST + [(b"content-length", b"10")] if case.startswith("content_length") else REQUEST
    c.send_headers(1, headers, end_stream=(case == "after_end"))
    twin.feed(c.data_to_send())
    if case == "content_length_over":  # 5b. must not take a stream with a declared length
        wire = _raw(_data(1, b"x" * 6)) + _raw(_data(1, b"x" * 6))
    elif case == "content_length_exact":
        wire = _raw(_data(1, b"x" * 6)) + _raw(_data(1, b"x" * 4))
    elif case == "over_window":
        wire = b"".join(_raw(_data(1, b"x" * 16_384)) for _ in range(5))  # 80 KiB > 64 KiB window
    elif case == "unknown_stream":
        wire = _raw(_data(7, b"late"))
    elif case == "after_end":
        wire = _raw(_data(1, b"after END_STREAM"))
    elif case == "too_large":
        wire = _raw(_data(1, b"x" * 20_000))  # above the default 16 384 max frame size
    else:  # hyperframe will not build it: by hand (RFC 9113 §6.1: DATA on stream 0 is an error)
        wire = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"
    events = twin.feed(wire)
    assert events  # something happened, and identically on both (checked inside feed)


def _data(sid: int, payload: bytes) -> hyperframe.frame.DataFrame:
    f = hyperframe.frame.DataFrame(sid)
    f.data = payload
    return f


def test_fast_path_is_on():
    """Regression check (issue 7): the measured fast paths are in effect."""
    assert _h2fast.DATA_FAST_PATH is True
    assert _h2fast.HEADERS_FAST_PATH is True
    assert _h2fast.SEND_FAST_PATH is True
    assert _h2fast.HPACK_MEMO is True
    s = _server()
    assert isinstance(s.decoder, _h2fast._MemoDecoder)  # on a live h2 connection of ours


def test_hpack_memo_follows_every_dynamic_table_change():
    """8.: the same indexed-only bytes mean other headers once the table changed (insertions
    shift the indices; a size update evicts); the memo must never answer for an older table."""
    import hpack
    enc = hpack.Encoder()
    plain, memo = hpack.Decoder(), _h2fast.H2Connection(config=h2.config.H2Configuration(
        client_side=False, header_encoding=None)).decoder
    rng = random.Random(11)
    names = [b":authority", b"x-a", b"x-b"]
    for step in range(400):
        roll = rng.random()
        if roll < 0.15:  # a new value: literal with incremental indexing, shifts every index
            block = enc.encode([(rng.choice(names), str(rng.randint(0, 30)).encode())])
        elif roll < 0.2:
            enc.header_table_size = rng.choice([0, 64, 4096])
            block = enc.encode([(b":method", b"CONNECT")])
            plain.header_table_size = memo.header_table_size = 4096
        else:  # indexed-only blocks, repeated: the memo's case
            dyn = len(enc.header_table.dynamic_entries)
            if not dyn:
                continue
            block = bytes(0x80 | (62 + rng.randrange(min(dyn, 60))) for _ in range(rng.randint(1, 3)))
        try:
            want = ("ok", plain.decode(block, raw=True))
        except hpack.HPACKError as err:
            want = ("error", type(err))
        try:
            got = ("ok", memo.decode(block, raw=True))
        except hpack.HPACKError as err:
            got = ("error", type(err))
        assert got == want, step
        assert list(memo.header_table.dynamic_entries) == list(plain.header_table.dynamic_entries)
    assert memo._hb_memo  # the memo was used


def _headers(sid: int, *, flags=("END_HEADERS",), block: bytes | None = None, pad: int | None = None,
             priority: bool = False) -> bytes:
    f = hyperframe.frame.HeadersFrame(sid)
    f.data = block if block is not None else _ENCODER.encode(REQUEST)
    for flag in flags:
        f.flags.add(flag)
    if pad is not None:
        f.flags.add("PADDED")
        f.pad_length = pad
    if priority:
        f.flags.add("PRIORITY")
        f.depends_on, f.stream_weight = 0, 15
    return f.serialize()


_ENCODER = __import__("hpack").Encoder()


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("case", [
    "plain", "end_stream", "padded", "priority", "continuation", "many", "too_many", "reused_id",
    "even_id", "lower_id", "bad_hpack", "dynamic_table", "too_large", "data_before_end_headers",
    "informational", "content_length",
])
def test_headers_fast_path_matches_h2(monkeypatch, case, normalize):
    """6.: every HEADERS shape, honest or not, gives the same events, state, answer and errors."""
    rng = random.Random(3)
    twin, c = Twin(monkeypatch, rng, normalize), _client()
    twin.feed(c.data_to_send())
    if case == "plain":
        wire = _headers(1)
    elif case == "end_stream":
        wire = _headers(1, flags=("END_HEADERS", "END_STREAM"))
    elif case == "padded":
        wire = _headers(1, pad=7)
    elif case == "priority":
        wire = _headers(1, priority=True)
    elif case == "continuation":
        block = _ENCODER.encode(REQUEST + [(b"x-long", b"v" * 300)])
        cont = hyperframe.frame.ContinuationFrame(1)
        cont.data = block[100:]
        cont.flags.add("END_HEADERS")
        wire = _headers(1, flags=(), block=block[:100]) + cont.serialize()
    elif case == "many":
        wire = b"".join(_headers(sid) for sid in range(1, 200, 2))
    elif case == "too_many":  # h2's own limit: the default local max_concurrent_streams is 100
        twin.both(lambda s: s.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 3}))
        c.receive_data(twin.take())
        twin.feed(c.data_to_send())  # the client's SETTINGS ACK commits the limit
        wire = b"".join(_headers(sid) for sid in (1, 3, 5, 7))
    elif case == "reused_id":
        wire = _headers(1) + _headers(1)
    elif case == "even_id":
        wire = _headers(2)
    elif case == "lower_id":
        wire = _headers(5) + _headers(3)
    elif case == "bad_hpack":
        wire = _headers(1, block=b"\xff\xff\xff\xff\xff")
    elif case == "dynamic_table":  # literal with incremental indexing, then the indexed form
        wire = b"".join(_headers(sid, block=_ENCODER.encode(REQUEST + [(b"x-trace", b"abc")]))
                        for sid in (1, 3, 5))
    elif case == "too_large":
        wire = _headers(1, block=_ENCODER.encode(REQUEST + [(b"x-big", b"v" * 20_000)]))
    elif case == "informational":  # a request carrying a 1xx :status, with END_STREAM: h2's error
        wire = _headers(1, flags=("END_HEADERS", "END_STREAM"),
                        block=_ENCODER.encode([(b":status", b"100")] + REQUEST))
    elif case == "content_length":
        wire = _headers(1, block=_ENCODER.encode(REQUEST + [(b"content-length", b"12")]))
    else:  # a DATA frame in the middle of a header block: PROTOCOL_ERROR
        wire = _headers(1, flags=()) + _raw(_data(1, b"x")) + _headers(3)
    events = twin.feed(wire)
    assert events


def test_send_fast_path_matches_h2(monkeypatch):
    """7.: DATA with and without END_STREAM, memoryviews, empty frames, END_STREAM alone, and the
    calls h2 refuses (over the window, over the frame size, on a closed or unknown stream, padded)."""
    rng = random.Random(5)
    twin, c = Twin(monkeypatch, rng), _client()
    twin.feed(c.data_to_send())
    for sid in range(1, 16, 2):
        c.send_headers(sid, REQUEST)
    twin.feed(c.data_to_send())
    for sid in range(1, 16, 2):
        twin.both(lambda s, sid=sid: s.send_headers(sid, [(b":status", b"200")]))
    payload = os.urandom(20_000)
    twin.both(lambda s: s.send_data(1, payload[:1000]))
    twin.both(lambda s: s.send_data(1, memoryview(payload)[1000:3000], end_stream=True))
    twin.both(lambda s: s.send_data(1, b"after end"))          # StreamClosedError
    twin.both(lambda s: s.send_data(3, b""))                   # empty DATA
    twin.both(lambda s: s.end_stream(3))                       # empty DATA + END_STREAM
    twin.both(lambda s: s.end_stream(3))                       # twice: h2's error
    twin.both(lambda s: s.send_data(5, payload[:17_000]))      # over the 16 384 max frame size
    twin.both(lambda s: s.send_data(5, payload[:100], pad_length=10))
    twin.both(lambda s: s.send_data(99, b"x"))                 # a stream that never existed
    for _ in range(4):                                          # the 65 535 windows run out
        twin.both(lambda s: s.send_data(7, payload[:16_384]))
    twin.both(lambda s: s.send_data(9, payload[:16_384]))
    twin.both(lambda s: s.reset_stream(11))
    twin.both(lambda s: s.send_data(11, b"x"))                 # after our own reset
    # handing window back: small, large (WINDOW_UPDATEs due), on a reset stream, unknown, bad sizes
    for sid, n in ((13, 100), (13, 40_000), (15, 65_535), (11, 500), (1, 10), (99, 5), (13, -1), (13, 0)):
        twin.both(lambda s, sid=sid, n=n: s.acknowledge_received_data(n, sid))
    # the client reads exactly what h2 itself would have framed
    events = c.receive_data(twin.take())
    got: dict[int, bytes] = {}
    for e in events:
        if isinstance(e, h2.events.DataReceived):
            got[e.stream_id] = got.get(e.stream_id, b"") + e.data
    assert got[1] == payload[:3000]
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 3 for e in events)


def test_headers_and_send_fast_paths_are_taken(monkeypatch):
    """The fast paths really run (else the twin tests would compare h2 with itself)."""
    _switch(monkeypatch, True)
    c, s = _client(), _server()
    s.receive_data(c.data_to_send())
    c.send_headers(1, REQUEST)
    wire = c.data_to_send()
    with monkeypatch.context() as m:  # the server side only: the client parses with hyperframe
        m.setattr(hyperframe.frame.HeadersFrame, "parse_body",
                  lambda self, data: pytest.fail("HEADERS went through hyperframe"))
        m.setattr(hyperframe.frame.DataFrame, "serialize",
                  lambda self: pytest.fail("DATA was framed by hyperframe"))
        events = s.receive_data(wire)
        assert [type(e).__name__ for e in events] == ["RequestReceived"]
        s.send_response_200(1)
        s.send_data(1, b"hello")
        s.end_stream(1)
        out = s.data_to_send()
    events = [type(e).__name__ for e in c.receive_data(out)]
    assert events[1:] == ["ResponseReceived", "DataReceived", "DataReceived", "StreamEnded"], events


def test_core_gets_its_data_events_from_the_bulk_path_exactly_as_translated():
    """5b. with the core's data_event: the same Data events (empty frames dropped) as h2's
    DataReceived translated by the core, and the same acknowledgement accounting."""
    from hbone.protocol import Data, ServerCore, StreamEnded, TunnelRequested

    def run(fast: bool) -> list:
        core = ServerCore()
        if not fast:
            core._h2.data_event = None
        c = _client()
        core.receive_data(c.data_to_send())
        c.receive_data(core.data_to_send())
        c.send_headers(1, REQUEST)
        out = []
        for e in core.receive_data(c.data_to_send()):
            if isinstance(e, TunnelRequested):
                core.respond(1, 200)
        c.receive_data(core.data_to_send())
        for payload in (b"a" * 100, b"", b"b" * 16_384, b"c"):
            c.send_data(1, payload)
        c.send_data(1, b"last", end_stream=True)
        for e in core.receive_data(c.data_to_send()):
            out.append(e)
            if isinstance(e, Data):
                core.ack(1, e.flow_len)
        out.append(core._h2._inbound_flow_control_window_manager.current_window_size)
        return out

    fast, slow = run(True), run(False)
    assert fast == slow
    assert [type(e).__name__ for e in fast[:-1]] == ["Data", "Data", "Data", "Data", "StreamEnded"]


def _windows(s: _h2fast.H2Connection) -> tuple:
    """Every inbound window manager's whole state (7c. reads and writes _bytes_processed)."""
    managers = [(0, s._inbound_flow_control_window_manager)] + sorted(
        (sid, st._inbound_window_manager) for sid, st in s.streams.items())
    return tuple((sid, m.max_window_size, m.current_window_size, m._bytes_processed) for sid, m in managers)


@pytest.mark.parametrize("seed", range(4))
def test_acknowledgement_shortcut_matches_h2_through_empty_windows(monkeypatch, seed):
    """7c.: acknowledgements of random sizes (zero, small, up to whole windows), while the peer fills
    the 65 535-byte stream and connection windows to zero and beyond half: every window manager's
    state and every WINDOW_UPDATE byte are h2's own."""
    rng = random.Random(seed)
    twin, c = Twin(monkeypatch, rng), _client()
    twin.feed(c.data_to_send())
    for sid in (1, 3):
        c.send_headers(sid, REQUEST)
    twin.feed(c.data_to_send())
    for sid in (1, 3):
        twin.both(lambda s, sid=sid: s.send_headers(sid, [(b":status", b"200")]))
    c.receive_data(twin.take())
    unacked = {1: 0, 3: 0}
    seen_empty = False
    for _ in range(300):
        sid = rng.choice((1, 3))
        room = min(c.local_flow_control_window(sid), c.max_outbound_frame_size)
        if room and rng.random() < 0.6:
            n = rng.choice((1, 100, 1023, 1025, rng.randint(1, room), room))
            c.send_data(sid, b"x" * min(n, room))
            for e in twin.feed(c.data_to_send()):
                if e[0] == "DataReceived":
                    unacked[e[1]] += e[3]
        elif unacked[sid] or rng.random() < 0.1:
            n = rng.choice((0, min(1, unacked[sid]), unacked[sid], rng.randint(0, unacked[sid])))
            unacked[sid] -= n
            twin.both(lambda s, sid=sid, n=n: s.acknowledge_received_data(n, sid))
        assert _windows(twin.fast) == _windows(twin.slow)
        seen_empty = seen_empty or any(w[2] == 0 for w in _windows(twin.fast))
        c.receive_data(twin.take())
    assert seen_empty   # the window-empty branch of h2's rule was exercised


def test_send_shortcut_matches_h2_in_every_stream_state(monkeypatch):
    """7b.: DATA skips h2's identity transitions only in OPEN / HALF_CLOSED_REMOTE; in the other
    states (after our END_STREAM, after a reset, both ends closed) h2's own state machine answers,
    with its own error. States and bytes are h2's own throughout."""
    rng = random.Random(7)
    twin, c = Twin(monkeypatch, rng), _client()
    twin.feed(c.data_to_send())
    for sid in (1, 3, 5, 7):
        c.send_headers(sid, REQUEST, end_stream=sid == 3)   # 3: HALF_CLOSED_REMOTE on the server
    twin.feed(c.data_to_send())
    for sid in (1, 3, 5, 7):
        twin.both(lambda s, sid=sid: s.send_headers(sid, [(b":status", b"200")]))
    twin.both(lambda s: s.send_data(1, b"open"))
    twin.both(lambda s: s.send_data(3, b"half-closed remote"))
    twin.both(lambda s: s.send_data(5, b"last", end_stream=True))
    twin.both(lambda s: s.send_data(5, b"after our END_STREAM"))    # HALF_CLOSED_LOCAL: h2's error
    twin.both(lambda s: s.send_data(3, b"closing", end_stream=True))
    twin.both(lambda s: s.send_data(3, b"closed"))                  # CLOSED: h2's error
    twin.both(lambda s: s.reset_stream(7))
    twin.both(lambda s: s.send_data(7, b"reset"))
    twin.both(lambda s: s.close_connection())
    twin.both(lambda s: s.send_data(1, b"after GOAWAY"))
    events = c.receive_data(twin.take())
    got = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived) and e.stream_id == 1)
    assert got == b"openafter GOAWAY" or got == b"open"


def test_core_ack_says_when_a_window_update_is_due():
    """HboneStream.read schedules a flush only when ServerCore.ack says it queued bytes (a
    WINDOW_UPDATE): True exactly when there is something to send."""
    from hbone.protocol import Data, ServerCore, TunnelRequested
    from hbone.settings import HboneSettings

    core = ServerCore(HboneSettings(stream_window=65_535, connection_window=65_535))
    c = _client()
    core.receive_data(c.data_to_send())
    c.receive_data(core.data_to_send())
    c.send_headers(1, REQUEST)
    for e in core.receive_data(c.data_to_send()):
        if isinstance(e, TunnelRequested):
            core.respond(1, 200)
    core.data_to_send()
    answers = []
    for size in (100, 16_000, 16_000, 16_000, 10):
        c.send_data(1, b"x" * size)
        for e in core.receive_data(c.data_to_send()):
            if isinstance(e, Data):
                queued = core.ack(1, e.flow_len)
                answers.append(queued)
                assert queued == bool(core.data_to_send())
    assert True in answers and False in answers
    assert core.ack(1, 0) is False and core.ack(99, 10) is False


def test_stream_backstop_shortcut_leaves_h2s_settings_as_set_and_acknowledge_would():
    """ServerCore.receive_data raises h2's stream limit to the backstop only while it reads, by writing
    the committed value of h2's Settings directly (no pending change exists): outside the call
    local_settings shows what we advertised, with nothing pending, and the stream over the advertised
    limit is refused alone (REFUSED_STREAM), as with Settings' own set + acknowledge."""
    from h2.settings import SettingCodes
    from hbone.protocol import ServerCore, StreamRefused, TunnelRequested
    from hbone.settings import HboneSettings

    core = ServerCore(HboneSettings(server_max_concurrent_streams=3))
    c = _client()
    core.receive_data(c.data_to_send())
    c.receive_data(core.data_to_send())
    encoder = __import__("hpack").Encoder()   # by hand: h2's client would not exceed the limit
    wire = b"".join(_headers(sid, block=encoder.encode(REQUEST)) for sid in (1, 3, 5, 7))
    events = core.receive_data(wire)
    assert [type(e).__name__ for e in events].count("TunnelRequested") == 3
    assert [e.stream_id for e in events if isinstance(e, StreamRefused)] == [7]
    assert not any(isinstance(e, TunnelRequested) and e.stream_id == 7 for e in events)
    ls = core.h2.local_settings
    assert ls.max_concurrent_streams == 3
    assert list(ls._settings[SettingCodes.MAX_CONCURRENT_STREAMS]) == [3]   # nothing left pending
