"""A request the waypoint cannot read is answered, then logged and counted as Envoy's HCM does for an HTTP/1
codec error: one access-log line and one ``istio_requests_total`` sample with the answer's status, flag ``DPE``
and the codec's details (``http1.headers_too_large``, ``http1.codec_error``, ...). Before, only the tunnel's line
said anything had happened."""

from __future__ import annotations

import pytest

from proxy.http1.codec import Http1Error
from proxy.pipeline.http import bad_request_detail
from tests.waypoint_harness import REVIEWS_VIP, start_harness


@pytest.mark.parametrize("err,detail,flag", [
    (Http1Error(431, "headers too large"), "http1.headers_too_large", "DPE"),
    (Http1Error(431, "too many headers"), "http1.too_many_headers", "DPE"),
    (Http1Error(501, "unsupported transfer-coding 'gzip'"), "http1.invalid_transfer_encoding", "DPE"),
    (Http1Error(400, "invalid message (HttpParserInvalidURLError)"), "http1.codec_error", "DPE"),
    (Http1Error(501, "unknown method"), "http1.codec_error", "DPE"),
    (Http1Error(400, "connection closed mid-message"), "http1.codec_error", "DPE"),   # (a half-close: answered)
    (Http1Error(408, "request head not received in time"), "request_header_timeout", ""),
])
def test_what_a_refused_request_is_logged_as(err, detail, flag):
    assert bad_request_detail(err) == (detail, flag)


async def _raw(h, data: bytes) -> bytes:
    stream = await h.client().tunnel(f"{REVIEWS_VIP}:9080")
    try:
        stream.write(data)
        answer = b""
        while chunk := await stream.read():
            answer += chunk
        return answer
    finally:
        stream.close()


async def test_refused_requests_are_logged_and_counted(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip)
    try:
        too_many = b"GET / HTTP/1.1\r\nHost: reviews:9080\r\n" + b"".join(b"x-%d: 1\r\n" % i for i in range(101)) + b"\r\n"
        assert (await _raw(h, too_many)).startswith(b"HTTP/1.1 431 ")
        assert (await _raw(h, b"FOO / HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")).startswith(b"HTTP/1.1 501 ")
        assert (await _raw(h, b"GET /\xc3\xa9 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        # A good request still goes through on a tunnel of its own.
        assert (await h.client().fetch("/"))[0] == 200
        lines = await h.http_lines(4)
        got = [(l["status"], l["response_flags"], l.get("response_code_details")) for l in lines]
        assert got[:3] == [(431, "DPE", "http1.too_many_headers"), (501, "DPE", "http1.codec_error"),
                           (400, "DPE", "http1.codec_error")], got
        assert lines[0]["dst.service"] == "reviews.default.svc.cluster.local" and "method" not in lines[0]
        text = h.metrics.exposition().decode()
        dpe = [line for line in text.splitlines()
               if line.startswith("istio_requests_total{") and 'response_flags="DPE"' in line]
        assert {c for line in dpe for c in ("431", "501", "400") if f'response_code="{c}"' in line} == {"431", "501", "400"}
        assert all('reporter="waypoint"' in line and 'destination_service="reviews.default.svc.cluster.local"' in line
                   for line in dpe), dpe
    finally:
        await h.close()
