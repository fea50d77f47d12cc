"""The sans-IO HTTP/1.1 codec: requests and responses whole, byte by byte, pipelined; every limit
and smuggling rule answers with its status; hypothesis: only Http1Error escapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from proxy.http1.codec import (LAST_CHUNK, MAX_HEAD_BYTES, MAX_HEADERS, BodyChunk, Http1Error,
                               MessageEnd, RequestHead, RequestReader, ResponseHead,
                               ResponseReader, encode_chunk, encode_request_head,
                               encode_response_head, header_value, strip_hop_by_hop)

GET = b"GET /reviews/1?u=x HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent: t\r\nX-Dup: a\r\nX-Dup: b\r\n\r\n"
POST_CL = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world"
POST_CHUNKED = (b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
HTTP10 = b"GET /old HTTP/1.0\r\n\r\n"


def _collapse(events):
    """Merge BodyChunks so that whole and byte-by-byte parses compare equal."""
    out = []
    for e in events:
        if isinstance(e, BodyChunk) and out and isinstance(out[-1], BodyChunk):
            out[-1] = BodyChunk(out[-1].data + e.data)
        else:
            out.append(e)
    return out


def _feed_bytewise(reader, data):
    events = []
    for i in range(len(data)):
        events += reader.feed(data[i:i + 1])
    return events


def test_get_whole():
    [head, end] = RequestReader().feed(GET)
    assert head == RequestHead(b"GET", b"/reviews/1?u=x", b"1.1",
                               [(b"host", b"reviews:9080"), (b"user-agent", b"t"),
                                (b"x-dup", b"a"), (b"x-dup", b"b")],
                               True, False, False, None, False, b"reviews:9080")
    assert end is MessageEnd


@pytest.mark.parametrize("msg", [GET, POST_CL, POST_CHUNKED, HTTP10])
def test_whole_equals_bytewise(msg):
    whole = _collapse(RequestReader().feed(msg))
    assert _collapse(_feed_bytewise(RequestReader(), msg)) == whole
    assert whole[-1] is MessageEnd


def test_bodies():
    head, body, end = _collapse(RequestReader().feed(POST_CL))
    assert (head.has_body, head.chunked, head.content_length) == (True, False, 11)
    assert body == BodyChunk(b"hello world") and end is MessageEnd
    head, body, end = _collapse(RequestReader().feed(POST_CHUNKED))
    assert (head.has_body, head.chunked) == (True, True)
    assert body.data == b"hello world"     # chunk extensions and trailers dropped
    assert end is MessageEnd


def test_pipelined_requests_in_order_with_trailing_partial():
    reader = RequestReader()
    events = reader.feed(GET + POST_CHUNKED + POST_CL + GET[:10])
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.target for h in heads] == [b"/reviews/1?u=x", b"/c", b"/p"]
    assert events.count(MessageEnd) == 3
    assert not reader.idle                  # a fourth request has begun
    rest = reader.feed(GET[10:])
    assert rest[0].target == b"/reviews/1?u=x" and rest[1] is MessageEnd and reader.idle


def test_http10_keep_alive_rules():
    [head, _] = RequestReader().feed(HTTP10)
    assert head.version == b"1.0" and head.keep_alive is False and head.host == b""
    [head, _] = RequestReader().feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert head.keep_alive is True
    [head, _] = RequestReader().feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert head.keep_alive is False


def test_expect_continue_and_h2c_upgrade_ignored():
    [head] = RequestReader().feed(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                                  b"Expect: 100-continue\r\n\r\n")
    assert head.expect_continue and head.has_body
    reader = RequestReader()
    events = reader.feed(b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                         b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n" + GET)
    assert [e.target for e in events if isinstance(e, RequestHead)] == [b"/a", b"/reviews/1?u=x"]
    assert events.count(MessageEnd) == 2


BAD_REQUESTS = [
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                      # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\nHost: a\n\n", 400),                                 # bare LF
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),             # obs-fold
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
    (b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
    (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 501),             # a token, case-sensitive: unknown (RFC 9110 §9.1)
    (b"DESCRIBE / HTTP/1.1\r\nHost: a\r\n\r\n", 501),        # RTSP's, not HTTP's
    (b"FO\x00 / HTTP/1.1\r\nHost: a\r\n\r\n", 400),          # not a token then SP
    # whitespace padding past the raw bound (MAX_HEAD_BYTES + 1/16), though the count is tiny
    (b"GET / HTTP/1.1\r\nHost: a\r\nX:" + b" " * (MAX_HEAD_BYTES * 9 // 8) + b"v\r\n\r\n", 431),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 3\r\n\r\nabc", 400),   # CONNECT has no content
    # An upgrade with a request body (Content-Length or chunked): 501, the upgrade payload would be ambiguous.
    (b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nab", 501),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
    (b"GET /" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1\r\n\r\n", 431),
    (b"\x16\x03\x01\x00\x00", 400),
]


@pytest.mark.parametrize("data,status", BAD_REQUESTS)
def test_bad_requests_whole_and_bytewise(data, status):
    for size in (len(data), 1):
        reader = RequestReader()
        with pytest.raises(Http1Error) as err:
            for i in range(0, len(data), size):
                reader.feed(data[i:i + size])
            reader.feed(b"")   # an error found after complete events surfaces on the next call
        assert err.value.status == status
        assert reader.failed is err.value
        with pytest.raises(Http1Error):    # the reader stays failed
            reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")


def test_error_after_good_request_is_deferred():
    reader = RequestReader()
    events = reader.feed(GET + b"GET / HTTP/1.1\r\n\r\n")
    assert events[0].target == b"/reviews/1?u=x" and events[1] is MessageEnd
    assert reader.failed is not None and reader.failed.status == 400
    with pytest.raises(Http1Error):
        reader.feed(b"")


def test_trickled_whitespace_is_bounded():
    reader = RequestReader(max_head_bytes=1024)
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX:")
    with pytest.raises(Http1Error) as err:
        for _ in range(2000):
            reader.feed(b" ")
    assert err.value.status == 431


def test_body_limit_413():
    reader = RequestReader(max_body_bytes=5)
    with pytest.raises(Http1Error) as err:
        reader.feed(POST_CL)      # Content-Length known up front: refused before any event
    assert err.value.status == 413
    reader = RequestReader(max_body_bytes=5)
    events = reader.feed(POST_CHUNKED)
    assert isinstance(events[0], RequestHead) and reader.failed.status == 413


def test_eof_mid_message():
    reader = RequestReader()
    reader.feed(POST_CL[:-3])
    with pytest.raises(Http1Error) as err:
        reader.feed_eof()
    assert err.value.status == 400
    assert RequestReader().feed_eof() == []


# ---- responses ---------------------------------------------------------------------------------

RESP_CL = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello"
RESP_CHUNKED = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
RESP_204 = b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.mark.parametrize("msg", [RESP_CL, RESP_CHUNKED, RESP_204, b"HTTP/1.1 100 Continue\r\n\r\n" + RESP_CL])
def test_response_whole_equals_bytewise(msg):
    whole = _collapse(ResponseReader().feed(msg))
    assert _collapse(_feed_bytewise(ResponseReader(), msg)) == whole
    assert whole[-1] is MessageEnd


def test_response_fields_and_keepalive_sequence():
    reader = ResponseReader()
    events = _collapse(reader.feed(RESP_CL + RESP_CHUNKED + RESP_204))
    heads = [e for e in events if isinstance(e, ResponseHead)]
    assert [h.status for h in heads] == [200, 201, 204]
    assert heads[0] == ResponseHead(200, b"OK", b"1.1", [(b"content-length", b"5"), (b"server", b"x")],
                                    True, True, False, 5)
    assert heads[2].has_body is False
    assert [e.data for e in events if isinstance(e, BodyChunk)] == [b"hello", b"abc"]


def test_response_to_head_has_no_body_even_with_content_length():
    for chunking in (1, 1000):
        reader = ResponseReader()
        reader.expect(b"HEAD")
        data = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
        events = []
        for i in range(0, len(data), chunking):
            events += reader.feed(data[i:i + chunking])
        assert events[0].status == 200 and events[0].has_body is False
        assert events[0].content_length == 1234 and events[1] is MessageEnd
        reader.expect(b"GET")
        assert _collapse(reader.feed(RESP_CL))[1] == BodyChunk(b"hello")


def test_response_until_eof():
    reader = ResponseReader()
    events = reader.feed(b"HTTP/1.0 200 OK\r\n\r\npart")
    assert events[0].keep_alive is False and events[1] == BodyChunk(b"part")
    assert reader.feed_eof() == [MessageEnd]


def test_response_truncated_and_malformed_are_502():
    reader = ResponseReader()
    reader.feed(RESP_CL[:-2])
    with pytest.raises(Http1Error) as err:
        reader.feed_eof()
    assert err.value.status == 502
    for bad in (b"HTTP/1.1 2000 OK\r\n\r\n", b"XTTP/1.1 200 OK\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"):
        with pytest.raises(Http1Error) as err:
            ResponseReader().feed(bad)
        assert err.value.status == 502


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_hypothesis_request_reader_only_http1error(pieces):
    reader = RequestReader(max_head_bytes=256, max_headers=5)
    try:
        for p in [b"POST / HTTP/1.1\r\nHost: a\r\n"] + pieces:
            for e in reader.feed(p):
                assert e is MessageEnd or isinstance(e, (RequestHead, BodyChunk))
        reader.feed_eof()
    except Http1Error as err:
        assert err.status in (400, 408, 413, 431, 501)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"GET", b"HEAD"]))
def test_hypothesis_response_reader_only_http1error(data, method):
    reader = ResponseReader(max_head_bytes=128)
    reader.expect(method)
    try:
        reader.feed(b"HTTP/1.1 200 OK\r\n" + data)
        reader.feed_eof()
    except Http1Error as err:
        assert err.status == 502


# ---- serializers -------------------------------------------------------------------------------

def test_encoders_exact_bytes():
    assert encode_request_head(b"GET", b"/x", [(b"host", b"a"), (b"x-b", b"1")]) == \
        b"GET /x HTTP/1.1\r\nhost: a\r\nx-b: 1\r\n\r\n"
    assert encode_response_head(403, None, [(b"content-length", b"19")]) == \
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\n\r\n"
    assert encode_response_head(299, None, []) == b"HTTP/1.1 299 Unknown\r\n\r\n"
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n" and LAST_CHUNK == b"0\r\n\r\n"
    with pytest.raises(ValueError):
        encode_request_head(b"GET", b"/", [(b"x", b"a\r\ninjected: 1")])
    with pytest.raises(ValueError):
        encode_response_head(200, None, [(b"x\n", b"a")])


def test_roundtrip_encoded_request():
    data = encode_request_head(b"PUT", b"/r", [(b"host", b"h"), (b"transfer-encoding", b"chunked")])
    data += encode_chunk(b"abc") + LAST_CHUNK
    head, body, end = _collapse(RequestReader().feed(data))
    assert head.method == b"PUT" and body.data == b"abc" and end is MessageEnd


def test_strip_hop_by_hop():
    headers = [(b"host", b"a"), (b"connection", b"keep-alive, X-Secret"), (b"keep-alive", b"5"),
               (b"x-secret", b"s"), (b"te", b"trailers"), (b"transfer-encoding", b"chunked"),
               (b"upgrade", b"h2c"), (b"proxy-connection", b"x"), (b"trailer", b"t"),
               (b"x-keep", b"1")]
    assert strip_hop_by_hop(headers) == [(b"host", b"a"), (b"x-keep", b"1")]
    assert header_value(headers, b"x-keep") == b"1" and header_value(headers, b"nope") is None


WS_REQ = (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_upgrade_request_head_then_bytes_held_whole_and_bytewise(size):
    """A WebSocket upgrade: the head carries upgrade=b"websocket", and every byte after it (frames, or
    what looks like another request) is held unparsed for the new protocol."""
    data = WS_REQ + b"\x81\x02hi" + GET
    reader = RequestReader()
    events = []
    for i in range(0, len(data), size):
        events += reader.feed(data[i:i + size])
    events += reader.feed_eof()
    assert [type(e).__name__ for e in events] == ["RequestHead", "_MessageEnd"]
    head = events[0]
    assert head.upgrade == b"websocket" and head.keep_alive and not head.has_body
    assert (b"upgrade", b"websocket") in head.headers and reader.upgrading
    assert reader.take_upgrade_tail() == b"\x81\x02hi" + GET
    with pytest.raises(Http1Error):   # nothing more is HTTP on this connection
        reader.feed(GET)


def test_http1_connect_is_passed_on_as_an_upgrade_to_connect_and_never_kept_alive():
    """HTTP/1 CONNECT: the pipeline answers it (404 NR, as Envoy without upgrade_configs CONNECT); the
    bytes after its head are the would-be tunnel's, held unparsed, and the connection is not kept."""
    data = b"CONNECT reviews:9080 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n"
    reader = RequestReader()
    events = reader.feed(data + b"\x16\x03\x01 not http")
    head = events[0]
    assert head.method == b"CONNECT" and head.target == b"reviews:9080" and head.upgrade == b"CONNECT"
    assert not head.keep_alive and not head.has_body and reader.upgrading
    assert reader.take_upgrade_tail() == b"\x16\x03\x01 not http"


def test_upgrade_refused_resumes_http_with_the_held_bytes():
    reader = RequestReader()
    events = reader.feed(WS_REQ + GET[:10])
    assert events[0].upgrade == b"websocket" and reader.feed(GET[10:]) == []
    events = reader.resume_http()
    assert [type(e).__name__ for e in events] == ["RequestHead", "_MessageEnd"]
    assert events[0].upgrade is None and events[0].target == b"/reviews/1?u=x"
    assert not reader.upgrading


def test_other_upgrade_tokens_are_passed_on_and_h2c_ignored():
    head = RequestReader().feed(WS_REQ.replace(b"websocket", b"foo/2"))[0]
    assert head.upgrade == b"foo/2"
    head = RequestReader().feed(GET.replace(b"\r\n\r\n", b"\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"))[0]
    assert head.upgrade is None
    # Upgrade without "Connection: upgrade" is not an upgrade request (RFC 9110 §7.8).
    head = RequestReader().feed(GET.replace(b"\r\n\r\n", b"\r\nUpgrade: websocket\r\n\r\n"))[0]
    assert head.upgrade is None


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_response_101_only_when_an_upgrade_was_asked(size):
    resp = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello")
    reader = ResponseReader()
    reader.expect(b"GET", upgrade=True)
    events = []
    for i in range(0, len(resp), size):
        events += reader.feed(resp[i:i + size])
    assert events[0].status == 101 and events[1] is MessageEnd and len(events) == 2
    assert reader.take_upgrade_tail() == b"\x81\x05hello"
    # A 200 to an upgrade request is an ordinary response.
    reader = ResponseReader()
    reader.expect(b"GET", upgrade=True)
    events = reader.feed(RESP_CL)
    assert events[0].status == 200 and events[-1] is MessageEnd and not reader.upgrading


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans(), st.sampled_from([b"websocket", b"foo", b"h2c"]))
def test_hypothesis_upgrade_then_anything_only_http1error(pieces, resume, token):
    """After an upgrade head, any bytes: held, then either taken whole or re-parsed as HTTP/1.1 where
    only Http1Error may escape."""
    reader = RequestReader(max_head_bytes=256, max_headers=8)
    head = reader.feed(WS_REQ.replace(b"websocket", token))[0]
    assert head.upgrade == (None if token == b"h2c" else token)
    try:
        for p in pieces:
            events = reader.feed(p)
            if head.upgrade is not None:
                assert events == []
        if head.upgrade is None:
            return
        if resume:
            for e in reader.resume_http() + reader.feed_eof():
                assert e is MessageEnd or isinstance(e, (RequestHead, BodyChunk))
        else:
            assert reader.take_upgrade_tail() == b"".join(pieces)
    except Http1Error as err:
        assert err.status in (400, 408, 413, 431, 501)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 120))
def test_hypothesis_response_101_then_anything(tail, cut):
    """A 101 to an upgrade request, split anywhere, with any bytes after it: the head, its end, and
    exactly those bytes held."""
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n" + tail
    reader = ResponseReader()
    reader.expect(b"GET", upgrade=True)
    cut = min(cut, len(data))
    events = reader.feed(data[:cut]) + reader.feed(data[cut:])
    assert events[0].status == 101 and events[1:] == [MessageEnd]
    assert reader.take_upgrade_tail() == tail


def test_field_values_lose_their_trailing_whitespace_as_envoy_trims_them():
    """RFC 9110 §5.5: a field value has no leading or trailing whitespace. llhttp drops the leading OWS only;
    the request codec trims the trailing too, as Envoy's does (routes and policies then match "a", not "a "); a
    response's fields are passed on as they came (their recipient ignores the OWS)."""
    head = RequestReader().feed(b"GET / HTTP/1.1\r\nHost: a \r\nX: b \t\r\nY:  \r\nZ: c d\r\n\r\n")[0]
    assert head.host == b"a" and head.headers == [(b"host", b"a"), (b"x", b"b"), (b"y", b""), (b"z", b"c d")]
    r = ResponseReader()
    r.expect(b"GET")
    events = r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2 \r\nX-A: v \r\n\r\nok")
    assert events[0].content_length == 2 and events[1].data == b"ok"
