"""The HTTP/1.1 codec's answer does not depend on how the bytes are split into reads: the same bytes
fed whole, byte by byte, or cut at any point give the same events and the same error status.

The cases first found by fuzzing (an unknown method cut at a read boundary; a head just over the
size limit sent in pieces), then the two rules they pin down (RFC 9110 §9.1 method status; Envoy's
max_request_headers_kb count plus the raw bound on an incomplete head), then hypothesis: random valid
and invalid heads, alone or after a message with a body, and streams of pipelined messages of every
framing, cut at random points."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from proxy.http1.codec import (BodyChunk, Http1Error, MessageEnd, RequestHead, RequestReader,
                               ResponseReader, raw_head_limit)
from tests.test_http1_codec import _collapse


def _run(make, pieces):
    """(collapsed events, error status or None) of feeding ``pieces`` then EOF to a fresh reader."""
    reader = make()
    events = []
    try:
        for p in pieces:
            events += reader.feed(p)
        events += reader.feed(b"")
        events += reader.feed_eof()
    except Http1Error as err:
        assert reader.failed is err
        return _collapse(events), err.status
    return _collapse(events), None


def _cut(data, cuts):
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


def _all_splits_agree(make, data, *, every_cut=True):
    """Whole, byte by byte and (small inputs) every single cut give the same answer; returns it."""
    whole = _run(make, [data])
    assert _run(make, [data[i:i + 1] for i in range(len(data))]) == whole, "byte by byte"
    if every_cut:
        for c in range(1, len(data)):
            assert _run(make, _cut(data, [c])) == whole, f"cut at {c}"
    return whole


# ---- 1. the method's status (RFC 9110 §9.1) ----------------------------------------------------

HOSTED = b" / HTTP/1.1\r\nHost: a\r\n\r\n"
GET_A = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("data,status", [
    # Found by fuzzing: llhttp stops at "O" (no method starts "FO"); the old check then looked at the
    # bytes of that read only: byte by byte "FO" looked like a method (501), whole "FO\x00" did not (400).
    (b"FO\x00" + HOSTED, 400),
    # ... and the leading empty line (skipped by llhttp, RFC 9112 §2.2) hid the method from the whole read.
    (b"\r\nFOO" + HOSTED, 501),
    (b"FOO" + HOSTED, 501),
    (b"GETX" + HOSTED, 501),                       # a known method's prefix, then more token
    (b"PATC" + HOSTED, 501),
    (b"get" + HOSTED, 501),                        # methods are case-sensitive tokens: "get" is unknown
    (b"M-SEARCH2" + HOSTED, 501),
    (b"DESCRIBE" + HOSTED, 501),                   # RTSP's: llhttp knows it, HTTP does not
    (b"X" * 33 + b"\x00", 501),                     # a token longer than any method: unknown whatever follows
    (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # a method ends with SP, nothing else
    (b"FOO\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01", 400),            # TLS to a plaintext port
    (b"FO", 400),                                  # cut short by EOF: never a request line
])
def test_method_status_is_split_independent(data, status):
    events, got = _all_splits_agree(RequestReader, data)
    assert (events, got) == ([], status)


def test_bad_method_after_a_pipelined_request_is_judged_on_its_own_bytes():
    # Found by fuzzing: the old check read the first bytes of the *read* (the good request's "GET"), so
    # TLS bytes pipelined behind a request were 501 when they came in the same read and 400 alone.
    for tail, status in ((b"\x16\x03\x01\x00", 400), (b"FOO" + HOSTED, 501), (b"\r\n\r\nFO\x00 /", 400)):
        events, got = _all_splits_agree(RequestReader, GET_A + tail)
        assert got == status and len(events) == 2 and events[1] is MessageEnd
    body = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nGET /"
    events, got = _all_splits_agree(RequestReader, body + b"FOO" + HOSTED)
    assert got == 501 and events[1] == BodyChunk(b"GET /")


def test_a_method_cut_short_waits_for_its_end_and_stays_quiet():
    reader = RequestReader()
    assert reader.feed(b"FO") == [] and reader.feed(b"O") == []
    assert reader.failed is None and not reader.idle and not reader.upgrading
    with pytest.raises(Http1Error) as err:
        reader.feed(b" / HTTP/1.1\r\n")
    assert err.value.status == 501 and reader.failed is err.value


# ---- 2. the head-size limit ---------------------------------------------------------------------

LIMIT = 100
RAW_LIMIT = raw_head_limit(LIMIT)   # 612: LIMIT + the 512-byte minimum margin


def _head(url=b"/", fields=((b"Host", b"a"),), ows=b" "):
    return (b"GET " + url + b" HTTP/1.1\r\n"
            + b"".join(n + b":" + ows + v + b"\r\n" for n, v in fields) + b"\r\n")


def _limited():
    return RequestReader(max_head_bytes=LIMIT)


def _envoy_size(url, fields):
    # Envoy's count (ServerConnectionImpl::getHeadersSize): the URL plus each name and value.
    return len(url) + sum(len(n) + len(v) for n, v in fields)


@pytest.mark.parametrize("extra,status", [(0, None), (1, 431)])
def test_envoy_count_at_the_limit_and_one_over_whole_and_split(extra, status):
    fields = [(b"Host", b"a"), (b"X-Pad", b"")]
    fields[1] = (b"X-Pad", b"v" * (LIMIT - _envoy_size(b"/", fields) + extra))
    data = _head(fields=fields)
    assert _envoy_size(b"/", fields) == LIMIT + extra
    events, got = _all_splits_agree(_limited, data)
    assert got == status
    if status is None:
        assert isinstance(events[0], RequestHead) and events[1] is MessageEnd


def test_found_by_fuzzing_a_head_under_the_count_but_long_on_the_wire():
    # The old reader counted raw bytes while a head was incomplete and parsed bytes once complete:
    # this head (Envoy count 77, 105 bytes on the wire) passed whole and was 431 byte by byte.
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX:    " + b"v" * 70 + b"\r\n\r\n"
    events, got = _all_splits_agree(_limited, data)
    assert got is None and events[0].headers[1] == (b"x", b"v" * 70)


def test_padding_past_the_raw_bound_is_431_whole_and_split():
    # The raw bound only refuses heads padded with whitespace llhttp drops (here 612 bytes).
    raw_limit = RAW_LIMIT
    for pad, status in ((0, None), (1, 431)):
        base = _head(fields=[(b"Host", b"a"), (b"X", b"v")], ows=b"")
        data = base.replace(b"X:", b"X:" + b" " * (raw_limit - len(base) + pad))
        assert len(data) == raw_limit + pad
        assert _all_splits_agree(_limited, data)[1] == status


def test_an_error_before_the_raw_bound_wins_over_it_after_it_loses():
    # The answer is the first problem in the byte stream, wherever the reads end.
    # (every cut: the read that crosses the bound also holds the bad byte, or not)
    bad_early = b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * 500 + b"\x01" + b" " * 200
    assert _all_splits_agree(_limited, bad_early)[1] == 400
    bad_late = b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * 700 + b"\x01\r\n\r\n"
    assert _all_splits_agree(_limited, bad_late)[1] == 431
    long_url_bad_char = b"GET /" + b"a" * 700 + b"\x01 HTTP/1.1\r\n\r\n"
    assert _all_splits_agree(_limited, long_url_bad_char, every_cut=False)[1] == 431
    # The target's count is judged once it has ended (llhttp hands it over in pieces at read ends):
    # a bad byte inside a target over the count but under the raw bound is the first problem.
    url_over_count_bad_char = b"GET /" + b"a" * 150 + b"\x01 HTTP/1.1\r\n\r\n"
    assert _all_splits_agree(_limited, url_over_count_bad_char, every_cut=False)[1] == 400
    url_over_count = b"GET /" + b"a" * 150 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert _all_splits_agree(_limited, url_over_count, every_cut=False)[1] == 431


@pytest.mark.parametrize("first", [
    GET_A,
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n\r\n" + b"b" * 40,
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"006;e=\"a;b\"\r\nhe\r\n\r\n\r\n0\r\nT: x\r\n\r\n",     # (CRLFCRLF in the data, ; in the extension)
])
@pytest.mark.parametrize("pad", [0, 1])
def test_a_pipelined_head_is_measured_from_its_own_first_byte(first, pad):
    # Found while fixing: the raw count of an incomplete head included the bytes of the messages
    # before it in the same read, so a long body followed by the start of a head was a spurious 431.
    raw_limit = RAW_LIMIT
    base = _head(fields=[(b"Host", b"a"), (b"X", b"v")], ows=b"")
    second = base.replace(b"X:", b"X:" + b" " * (raw_limit - len(base) + pad))
    events, got = _all_splits_agree(_limited, first + second, every_cut=False)
    assert got == (431 if pad else None)
    assert sum(1 for e in events if e is MessageEnd) == (1 if pad else 2)


def test_a_read_cut_at_the_raw_bound_goes_on_with_the_rest():
    # A head carried in is fed no further than the bound; what follows it in the same read (here a
    # method token that straddles the bound's byte) is then read as usual.
    base = _head(fields=[(b"Host", b"a"), (b"X", b"v")], ows=b"")
    first = base.replace(b"X:", b"X:" + b" " * (RAW_LIMIT - 12 - len(base)))
    events, got = _all_splits_agree(_limited, first + b"X" * 20 + b" / HTTP/1.1\r\n\r\n")
    assert got == 501 and isinstance(events[0], RequestHead) and events[1] is MessageEnd
    up = _head(fields=[(b"Host", b"a"), (b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"X", b"v")],
               ows=b"")
    upgrade = up.replace(b"X:", b"X:" + b" " * (RAW_LIMIT - 5 - len(up)))
    reader = _limited()
    reader.feed(upgrade[:100])
    head, end = reader.feed(upgrade[100:] + b"\x00websocket bytes" * 40)
    assert head.upgrade == b"websocket" and end is MessageEnd and reader.upgrading
    assert reader.take_upgrade_tail() == b"\x00websocket bytes" * 40


def test_slowloris_whitespace_stays_bounded_at_the_default_limit():
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX:")
    with pytest.raises(Http1Error) as err:
        for _ in range(100):
            reader.feed(b" " * 1024)
    assert err.value.status == 431


def test_a_bad_method_after_a_chunked_body_that_spans_reads():
    # Found by hypothesis while fixing: a read that begins inside a chunked body and holds its end and
    # a bad request must find where that request begins (the chunked framing's place is kept per read).
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    data = head + b"4\r\n\r\n\r\n\r\n0\r\n\r\nFOO / HTTP/1.1\r\n\r\n"
    for cut in range(len(head), len(data)):
        events, got = _run(RequestReader, _cut(data, [cut]))
        assert got == 501 and events[1] == BodyChunk(b"\r\n\r\n") and events[2] is MessageEnd


@pytest.mark.parametrize("max_body", [1, 4, 10])
def test_body_limit_passes_the_same_bytes_before_413_however_split(max_body):
    data = (b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    events, got = _all_splits_agree(lambda: RequestReader(max_body_bytes=max_body), data)
    assert got == 413 and events[1] == BodyChunk(b"hello world"[:max_body])


def test_trailers_over_their_own_limit_whole_and_split():
    # Envoy's parser bounds the trailer section on its own, not with the head's count (quiche BalsaFrame
    # READING_TRAILER: trailer_length_ > max_header_length_): after a head at the count limit, a section of
    # LIMIT bytes on the wire passes; one byte more is 431.
    fields = [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked"), (b"X-Pad", b"")]
    fields[2] = (b"X-Pad", b"v" * (LIMIT - _envoy_size(b"/c", fields)))
    head = b"POST /c HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    data = head + b"1\r\nx\r\n0\r\n" + b"T: " + b"t" * (LIMIT - 7) + b"\r\n\r\n"
    assert _all_splits_agree(_limited, data)[1] is None          # the section is LIMIT bytes
    events, got = _all_splits_agree(_limited, data.replace(b"T: ", b"T: t"))
    assert got == 431 and events[1] == BodyChunk(b"x")


# ---- 3. responses -------------------------------------------------------------------------------

def _response_reader(method=b"GET"):
    def make():
        reader = ResponseReader(max_head_bytes=LIMIT)
        reader.expect(method)
        return reader
    return make


@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
@pytest.mark.parametrize("pad,status", [(0, None), (1, 502)])
def test_response_head_raw_bound_split_independent(method, pad, status):
    raw_limit = RAW_LIMIT
    base = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX:v\r\n\r\n"
    data = base.replace(b"X:", b"X:" + b" " * (raw_limit - len(base) + pad))
    events, got = _all_splits_agree(_response_reader(method), data, every_cut=False)
    assert got == status and (len(events) == 2) == (status is None)


# ---- 4. hypothesis: whole vs random cuts --------------------------------------------------------

_TOKEN = st.sampled_from([b"GET", b"POST", b"HEAD", b"FOO", b"get", b"GETX", b"M-SEARCH", b"PATC",
                          b"DESCRIBE", b"X" * 33, b"", b"G\x00", b"\x16\x03", b"GET\t"])
_FIELD = st.tuples(st.sampled_from([b"Host", b"X-A", b"Content-Length", b"Transfer-Encoding",
                                    b"Connection", b"Bad\x01", b""]),
                   st.sampled_from([b" ", b"", b"   ", b"\t", b" " * 40, b" " * 560]),
                   st.sampled_from([b"a", b"v" * 30, b"v" * 70, b"3", b"chunked", b"gzip", b"close",
                                    b"x\x00y", b"  ", b"1, 2"]))
_PREFIX = st.sampled_from([b"", b"\r\n", GET_A,
                           b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nGET /\r",
                           b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"4\r\n\r\n\r\n\r\n0\r\n\r\n"])


_GOOD_FIELD = st.tuples(st.sampled_from([b"X-A", b"Accept", b"X-Long-Name-" + b"n" * 40]),
                        st.sampled_from([b" ", b"", b"  ", b" " * 300]),
                        st.sampled_from([b"a", b"v" * 30, b"v" * 70, b"x y"]))


@st.composite
def _request_bytes(draw):
    if draw(st.booleans()):       # well-formed, sizes around the limits
        method, url = draw(st.sampled_from([b"GET", b"HEAD", b"OPTIONS"])), draw(
            st.sampled_from([b"/", b"/" + b"a" * 60, b"/" + b"a" * 120, b"/" + b"a" * 600]))
        version, sp = b"HTTP/1.1", b" "
        fields = [(b"Host", b" ", b"a")] + draw(st.lists(_GOOD_FIELD, max_size=4))
        end = draw(st.sampled_from([b"\r\n", b"\r\n" + GET_A]))
    else:
        method = draw(_TOKEN)
        url = draw(st.sampled_from([b"/", b"/" + b"a" * 60, b"/" + b"a" * 120, b"/" + b"a" * 600, b"/a\x01",
                                    b"*"]))
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTXP/1.1"]))
        sp = draw(st.sampled_from([b" ", b"  "]))
        fields = draw(st.lists(_FIELD, max_size=6))
        end = draw(st.sampled_from([b"\r\n", b"", b"\n", b"\r\n3\r\nabc\r\n0\r\n\r\n", b"\r\nabc",
                                    b"\r\n3\r\nabc\r\n0\r\nT: " + b"t" * 90 + b"\r\n\r\n"]))
    head = method + sp + url + b" " + version + b"\r\n" + b"".join(
        n + b":" + ows + v + b"\r\n" for n, ows, v in fields)
    data = b"".join(draw(st.lists(_PREFIX, max_size=2))) + head + end
    return _mutated(draw, data)


def _mutated(draw, data):
    """``data``, or (one time in four) with one byte changed: llhttp's errors at any position."""
    if draw(st.integers(min_value=0, max_value=3)):
        return data
    at = draw(st.integers(min_value=0, max_value=len(data) - 1).map(lambda i: len(data) - 1 - i))
    byte = draw(st.sampled_from([b"\x00", b" ", b"\r", b"\n", b":", b"\t", b"\x7f", b"z"]))
    return data[:at] + byte + data[at + 1:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_request_bytes(), st.lists(st.integers(min_value=1, max_value=800), max_size=6),
       st.sampled_from([64, 100, 160]), st.sampled_from([None, 4]))
def test_hypothesis_requests_whole_equals_any_split(data, cuts, limit, max_body):
    def make():
        return RequestReader(max_head_bytes=limit, max_headers=6, max_body_bytes=max_body)
    whole = _run(make, [data])
    assert _run(make, _cut(data, cuts)) == whole
    assert _run(make, [data[i:i + 1] for i in range(len(data))]) == whole
    assert whole[1] in (None, 400, 413, 431, 501)


@st.composite
def _response_bytes(draw):
    status = draw(st.sampled_from([b"200 OK", b"204 No Content", b"100 Continue\r\n\r\nHTTP/1.1 200 OK",
                                   b"2000 X", b"200"]))
    fields = draw(st.lists(_FIELD, max_size=5))
    head = b"HTTP/1.1 " + status + b"\r\n" + b"".join(n + b":" + ows + v + b"\r\n" for n, ows, v in fields)
    end = draw(st.sampled_from([b"\r\n", b"", b"\r\nabc", b"\r\n3\r\nabc\r\n0\r\n\r\n"]))
    data = head + end + draw(st.sampled_from([b"", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz",
                                              b"HTTP/1.1 200 OK\r\nX:" + b" " * 600 + b"v\r\n\r\n"]))
    return _mutated(draw, data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_response_bytes(), st.lists(st.integers(min_value=1, max_value=800), max_size=5),
       st.sampled_from([b"GET", b"HEAD"]))
def test_hypothesis_responses_whole_equals_any_split(data, cuts, method):
    make = _response_reader(method)
    whole = _run(make, [data])
    assert _run(make, _cut(data, cuts)) == whole
    assert _run(make, [data[i:i + 1] for i in range(len(data))]) == whole
    assert whole[1] in (None, 502)


# Streams of whole messages (every framing: none, Content-Length, chunked with extensions, leading
# zeros, CRLFCRLF in its data and trailers; empty lines between; a padded head; bad methods), cut anywhere.
_REQUESTS = st.sampled_from([
    GET_A,
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 7\r\n\r\nGET / \r",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;x=\"a;b\"\r\n\r\n\r\r\n00A\r\n0123456789\r\n000\r\nT: 1\r\nU: 2\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    b"\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\nX:" + b" " * 580 + b"v\r\n\r\n",
    b"FOO / HTTP/1.1\r\n\r\n", b"FO\x00", b"GET\t/", b"\x16\x03\x01",
])
_RESPONSES = st.sampled_from([
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;x=\"a;b\"\r\n\r\n\r\r\n00A\r\n0123456789\r\n000\r\nT: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX:" + b" " * 580 + b"v\r\nContent-Length: 0\r\n\r\n",
    b"\r\n", b"HTTP/1.1 2000 X\r\n\r\n",
])


def _stream_and_cuts(messages):
    return st.lists(messages, min_size=1, max_size=5).map(b"".join).flatmap(
        lambda d: st.tuples(st.just(d), st.lists(st.integers(min_value=1, max_value=len(d)), max_size=8)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stream_and_cuts(_REQUESTS), st.sampled_from([64, 100]))
def test_hypothesis_request_streams_whole_equals_any_split(stream, limit):
    data, cuts = stream
    def make():
        return RequestReader(max_head_bytes=limit, max_headers=6)
    assert _run(make, _cut(data, cuts)) == _run(make, [data])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stream_and_cuts(_RESPONSES), st.sampled_from([b"GET", b"HEAD"]))
def test_hypothesis_response_streams_whole_equals_any_split(stream, method):
    data, cuts = stream
    make = _response_reader(method)
    assert _run(make, _cut(data, cuts)) == _run(make, [data])
