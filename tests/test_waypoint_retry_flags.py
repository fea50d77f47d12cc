"""A retriable answer that is still there after the last allowed retry is forwarded flagged ``URX``, as Envoy's
router does (router.cc onUpstreamHeaders: ``RetryStatus::NoRetryLimitExceeded`` sets
UpstreamRetryLimitExceeded); an answer that is not retriable, or that came on the first try, has no flag."""

from __future__ import annotations

from tests.waypoint_harness import start_harness


async def test_retries_run_out_on_a_retriable_status(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=None)   # no VirtualService: the default retries (503)
    try:
        c = h.client()
        assert (await c.fetch("/status/503"))[0] == 503
        assert (await c.fetch("/status/404"))[0] == 404
        assert (await c.fetch("/"))[0] == 200
        (l503,) = await h.http_lines(1, path="/status/503")
        assert (l503["status"], l503["response_flags"], l503["attempts"]) == (503, "URX", 3), l503
        (l404,) = await h.http_lines(1, path="/status/404")
        assert (l404["status"], l404["response_flags"]) == (404, "-"), l404
        text = h.metrics.exposition().decode()
        assert any('response_code="503"' in line and 'response_flags="URX"' in line
                   for line in text.splitlines() if line.startswith("istio_requests_total{")), text
    finally:
        await h.close()
