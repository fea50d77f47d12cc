"""The DATA-frame receive fast path (hbone/_h2fast.py 5.) against h2's own path, byte for byte.

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


def _server() -> _h2fast.H2Connection:
    s = _h2fast.H2Connection(config=h2.config.H2Configuration(client_side=False, header_encoding=None,
                                                              validate_inbound_headers=False))
    s.initiate_connection()
    s.data_to_send()
    return s


def _norm(events) -> list:
    out = []
    for e in events:
        item = [type(e).__name__, getattr(e, "stream_id", None)]
        if isinstance(e, h2.events.DataReceived):
            item += [e.data, e.flow_controlled_length, e.stream_ended is not None]
        out.append(tuple(item))
    return out


def _state(s: _h2fast.H2Connection) -> tuple:
    return (s.state_machine.state, s._inbound_flow_control_window_manager.current_window_size,
            sorted((sid, st.state_machine.state, st._inbound_window_manager.current_window_size)
                   for sid, st in s.streams.items()))


class Twin:
    """A fast-path server and an h2-only server fed the same bytes."""

    def __init__(self, monkeypatch, rng: random.Random):
        self.monkeypatch = monkeypatch
        self.rng = rng
        self.fast, self.slow = _server(), _server()
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
                self.monkeypatch.setattr(_h2fast, "DATA_FAST_PATH", flag)
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


@pytest.mark.parametrize("case", ["over_window", "unknown_stream", "after_end", "too_large", "stream_zero"])
def test_protocol_errors_are_h2s_own(monkeypatch, case):
    rng = random.Random(1)
    twin, c = Twin(monkeypatch, rng), _client()
    twin.feed(c.data_to_send())
    c.send_headers(1, REQUEST, end_stream=(case == "after_end"))
    twin.feed(c.data_to_send())
    if case == "over_window":
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
    """Regression check (issue 7): the measured DATA fast path is in effect."""
    assert _h2fast.DATA_FAST_PATH is True


def test_unpadded_data_skips_hyperframe_padded_data_does_not(monkeypatch):
    """The fast path really is taken (else the twin tests would compare h2 with itself)."""
    parsed = []
    original = hyperframe.frame.DataFrame.parse_body
    monkeypatch.setattr(hyperframe.frame.DataFrame, "parse_body",
                        lambda self, data: parsed.append(len(data)) or original(self, data))
    monkeypatch.setattr(_h2fast, "DATA_FAST_PATH", True)
    c, s = _client(), _server()
    s.receive_data(c.data_to_send())
    c.send_headers(1, REQUEST)
    c.send_data(1, b"a" * 1000)
    c.send_data(1, b"b" * 1000, pad_length=10)
    c.send_data(1, b"c" * 1000, end_stream=True)
    events = s.receive_data(c.data_to_send())
    data = [e.data for e in events if isinstance(e, h2.events.DataReceived)]
    assert data == [b"a" * 1000, b"b" * 1000, b"c" * 1000]
    assert parsed == [1011]  # only the padded frame (1 pad-length byte + 1000 + 10) went through h2
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
