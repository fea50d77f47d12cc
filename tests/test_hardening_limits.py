"""hbone/limits.py, pure: frames in (whole, byte by byte, with trailing data), verdicts out, with a
fixed clock. The live behaviour is in test_hardening_h2.py."""

from __future__ import annotations

from hypothesis import given, settings as hsettings, strategies as st
from hyperframe.frame import (ContinuationFrame, DataFrame, HeadersFrame, PingFrame, PriorityFrame,
                              SettingsFrame, WindowUpdateFrame)

from hbone.limits import CLIENT_PREFACE, Abuse, InboundGuard, SlidingWindow
from hbone.settings import HboneSettings

S = HboneSettings()
EYC, FRAME_SIZE = 11, 6


def frames(*fs) -> bytes:
    return CLIENT_PREFACE + b"".join(f.serialize() for f in fs)


def headers(sid: int, data: bytes = b"\x82", *, end_headers=True) -> HeadersFrame:
    f = HeadersFrame(sid, data=data)
    if end_headers:
        f.flags.add("END_HEADERS")
    return f


def feed_whole(data: bytes, now: float = 0.0, s: HboneSettings = S) -> tuple[Abuse | None, InboundGuard]:
    g = InboundGuard(s)
    return g.feed(data, now), g


def feed_bytewise(data: bytes, now: float = 0.0, s: HboneSettings = S) -> tuple[Abuse | None, InboundGuard]:
    g = InboundGuard(s)
    verdict = None
    for i in range(len(data)):
        verdict = g.feed(data[i:i + 1], now) or verdict
    return verdict, g


def both(data: bytes, **kw) -> Abuse | None:
    """Whole and byte by byte must agree, verdict and counters alike."""
    (v1, g1), (v2, g2) = feed_whole(data, **kw), feed_bytewise(data, **kw)
    assert v1 == v2
    assert (g1.streams_opened, g1.provoked_control_frames, g1.empty_in_a_row) == \
           (g2.streams_opened, g2.provoked_control_frames, g2.empty_in_a_row)
    return v1


def test_honest_connection_no_verdict():
    data = frames(SettingsFrame(0), headers(1), DataFrame(1, data=b"x" * 1000),
                  WindowUpdateFrame(0, window_increment=1000), PingFrame(0, opaque_data=b"8bytes!!"),
                  headers(3), DataFrame(3, data=b"", flags=["END_STREAM"]))
    assert both(data) is None
    _, g = feed_whole(data)
    assert g.streams_opened == 2 and g.provoked_control_frames == 2


def test_trailing_partial_frame_is_kept_for_next_feed():
    data = frames(headers(1), SettingsFrame(0))
    g = InboundGuard(S)
    assert g.feed(data[:-5], 0.0) is None and g.provoked_control_frames == 0
    assert g.feed(data[-5:], 0.0) is None and g.provoked_control_frames == 1


def test_oversized_frame_judged_on_header_alone():
    header = (S.max_frame_size + 1).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    v = both(CLIENT_PREFACE + header)
    assert v is not None and v.reason == "frame_too_large" and v.code == FRAME_SIZE


def test_oversized_padded_data_frame_judged_on_header_too():
    """Regression (live fuzzing): a PADDED DATA header skipped the size check when its pad-length byte
    came in the same read, so an 8.9 MB frame was waited for instead of refused."""
    garbage = b"\x88&\x06\x00\xaeV*>\xc3"          # length 0x882606, DATA, flags incl. PADDED
    for tail in (b"", b"\x00" * 64):                   # pad-length byte later / in the same read
        v = both(CLIENT_PREFACE + garbage + tail)
        assert v is not None and v.reason == "frame_too_large" and v.code == FRAME_SIZE


def test_continuation_count_and_block_size():
    many = [headers(1, end_headers=False)] + [ContinuationFrame(1, data=b"\x00")] * (S.max_continuation_frames + 1)
    assert both(frames(*many)).reason == "continuation_flood"
    ok = [headers(1, end_headers=False)] + [ContinuationFrame(1, data=b"\x00")] * (S.max_continuation_frames - 1)
    last = ContinuationFrame(1, data=b"\x00")
    last.flags.add("END_HEADERS")
    assert both(frames(*ok, last)) is None
    big = frames(headers(1, b"\x00" * (S.max_header_block // 2), end_headers=False),
                 ContinuationFrame(1, data=b"\x00" * (S.max_header_block // 2 + 1)))
    v = both(big)
    assert v == Abuse("header_block_too_large", EYC, f"header block over {S.max_header_block} bytes")


def test_empty_frames_in_a_row_and_padding_only_data():
    assert both(frames(headers(1), DataFrame(1, data=b""), DataFrame(1, data=b""))).reason == "empty_frame_flood"
    # one empty frame, then a real one: fine (Envoy's default allows 1 in a row)
    assert both(frames(headers(1), DataFrame(1, data=b""), DataFrame(1, data=b"x"), DataFrame(1, data=b""))) is None
    # padding only counts as empty, whichever read the pad-length byte arrives in
    padded = DataFrame(1, data=b"", pad_length=10)
    padded.flags.add("PADDED")
    assert both(frames(headers(1), padded, padded)).reason == "empty_frame_flood"
    # END_STREAM on an empty DATA frame is a half-close, not abuse
    eos = DataFrame(1, data=b"")
    eos.flags.add("END_STREAM")
    assert both(frames(headers(1), eos, headers(3), eos)) is None


def test_ping_and_settings_windows_with_a_fixed_clock():
    g = InboundGuard(S)
    g.feed(CLIENT_PREFACE, 0.0)
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    # one every ~0.1 s (104/1024 s, exact in binary) for 30 s: at most 99 in any 10 s window
    t = 0.0
    for i in range(300):
        t = i * 104 / 1024
        assert g.feed(ping, t) is None
    in_window = len(g._ping_w)
    assert in_window == 99
    assert g.feed(ping, t) is None  # the 100th in the window
    assert g.feed(ping, t).reason == "ping_flood"  # the 101st
    g2 = InboundGuard(S)
    settings = SettingsFrame(0).serialize()
    verdicts = [g2.feed((CLIENT_PREFACE if i == 0 else b"") + settings, 5.0) for i in range(S.max_settings_frames + 1)]
    assert verdicts[:-1] == [None] * S.max_settings_frames and verdicts[-1].reason == "settings_flood"
    ack = SettingsFrame(0, flags=["ACK"]).serialize()
    assert InboundGuard(S).feed(CLIENT_PREFACE + ack * 1000, 0.0) is None  # ACKs are answers, not asks


def test_priority_and_window_update_ratios():
    assert both(frames(*[PriorityFrame(1, depends_on=0)] * S.priority_frames_per_stream)) is None
    assert both(frames(*[PriorityFrame(1, depends_on=0)] * (S.priority_frames_per_stream + 1))).reason == "priority_flood"
    g = InboundGuard(S)
    wu = WindowUpdateFrame(0, window_increment=1).serialize()
    assert g.feed(CLIENT_PREFACE + wu * 5, 0.0) is None
    assert g.feed(wu, 0.0).reason == "window_update_flood"
    g = InboundGuard(S)
    g.data_frame_sent(10)  # we sent 10 DATA frames: 5 + 2 * 10 * 10 = 205 allowed
    assert g.feed(CLIENT_PREFACE + wu * 205, 0.0) is None
    assert g.feed(wu, 0.0) is not None


def test_premature_resets_sliding_window():
    g = InboundGuard(S)
    for i in range(S.max_premature_resets):
        assert g.premature_reset(i * 0.2) is None  # 100 over 20 s: at most 50 per 10 s
    g = InboundGuard(S)
    for i in range(S.max_premature_resets):
        assert g.premature_reset(1.0) is None
    v = g.premature_reset(1.0)
    assert v.reason == "rapid_reset" and v.code == EYC
    assert g.feed(b"anything", 2.0) is v  # the verdict stands


def test_sliding_window_memory_bounded():
    w = SlidingWindow(10.0, 5)
    for i in range(1000):
        w.hit(0.0)
    assert len(w) == 6


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_any_bytes_any_split_only_a_verdict_comes_out(data, step):
    g = InboundGuard(HboneSettings(max_frame_size=16384))
    for i in range(0, len(data), step):
        v = g.feed(CLIENT_PREFACE + data[i:i + step] if i == 0 else data[i:i + step], float(i))
        assert v is None or isinstance(v, Abuse)
