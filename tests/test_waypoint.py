"""The waypoint end to end, in process but real: our CA, the waypoint's HboneServer, an HBONE client
pool as the source node proxy, per-pod HBONE terminators in front of backend servers on 127.x."""

from __future__ import annotations

import asyncio

import pytest

from tests.waypoint_harness import REVIEWS_VIP, TCP_VIP, config_docs, destination_rule, start_harness, virtual_service


async def test_90_10_split_keepalive_and_authz(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip)
    try:
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        counts: dict[bytes, int] = {}
        for _ in range(1000):   # keep-alive: all on one tunnel
            status, headers, body = await client.request(stream)
            assert status == 200
            counts[body] = counts.get(body, 0) + 1
        assert set(counts) <= {b"v1", b"v2"}
        assert abs(counts.get(b"v2", 0) / 1000 - 0.10) <= 0.03, counts
        assert _tunnels_active(h) == 1   # the HTTP tunnel, open while its requests are served
        stream.close()
        # Another identity: 403 RBAC: access denied, text/plain, no response flag.
        other = h.client("bookinfo-ratings")
        s2 = await other.tunnel(f"{REVIEWS_VIP}:9080")
        status, headers, body = await other.request(s2)
        assert (status, body) == (403, b"RBAC: access denied")
        assert headers["content-type"] == "text/plain"
        s2.close()
        lines = await h.log_lines(1002)
        deny = [x for x in lines if x.get("status") == 403]
        assert deny and deny[0]["response_flags"] == "-"
        assert deny[0]["response_code_details"] == "rbac_access_denied_matched_policy[none]"
        assert deny[0]["chain"] == "inbound-vip|9080||reviews.default.svc.cluster.local-http"
        ok = [x for x in lines if x.get("status") == 200 and x["kind"] == "http"]
        assert ok[0]["upstream_cluster"].startswith("inbound-vip|9080|http/v")
        text = h.metrics.exposition().decode()
        assert "istio_requests_total{" in text and 'reporter="waypoint"' in text and 'response_code="403"' in text
        assert "tunnels=" in repr(h.waypoint)
    finally:
        await h.close()


async def test_httproute_split(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, httproute=True)
    try:
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        v2 = 0
        for _ in range(1000):
            status, _, body = await client.request(stream)
            assert status == 200 and body in (b"v1", b"v2")
            v2 += body == b"v2"
        assert abs(v2 / 1000 - 0.10) <= 0.03
    finally:
        await h.close()


async def test_unknown_authority_503(tmp_path, loopback_ip):
    from hbone.errors import TunnelRefused
    h = await start_harness(tmp_path, loopback_ip)
    try:
        client = h.client()
        with pytest.raises(TunnelRefused) as err:
            await client.tunnel("127.9.9.9:80")
        assert err.value.status == 503
        with pytest.raises(TunnelRefused) as err:   # a VIP in scope, on a port the service lacks
            await client.tunnel(f"{REVIEWS_VIP}:1234")
        assert err.value.status == 503
        lines = await h.log_lines(2)
        assert lines[0]["response_flags"] == "NR" and lines[0]["status"] == 503
    finally:
        await h.close()


TCP_DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-echo-only-productpage, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: tcp-echo}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]
"""


async def test_tcp_service_byte_exact_half_close_and_l4_deny(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, tcp_pod=True, extra=TCP_DENY)
    try:
        client = h.client()
        stream = await client.tunnel(f"{TCP_VIP}:9000")
        payload = bytes(range(256)) * (64 * 1024)   # 16 MiB

        async def send():
            view = memoryview(payload)
            for i in range(0, len(payload), 256 * 1024):
                stream.write(bytes(view[i:i + 256 * 1024]))
                await stream.drain()
            stream.write_eof()   # half-close: the echo answers everything, then closes its side

        sender = asyncio.ensure_future(send())
        got = bytearray()
        while chunk := await stream.read():
            got += chunk
        await sender
        assert len(got) == len(payload) and bytes(got) == payload
        stream.close()
        # L4 deny on a TCP chain: CONNECT 401.
        from hbone.errors import TunnelRefused
        other = h.client("bookinfo-ratings")
        with pytest.raises(TunnelRefused) as err:
            await other.tunnel(f"{TCP_VIP}:9000")
        assert err.value.status == 401
        lines = await h.log_lines(2)
        tcp = [x for x in lines if x.get("chain") == "inbound-vip|9000||tcp-echo.default.svc.cluster.local-tcp"]
        assert any(x["status"] == 200 and x["bytes_received"] == len(payload) for x in tcp)
        assert any(x["status"] == 401 and x["authz"] == "deny" for x in tcp)
    finally:
        await h.close()


async def test_one_pod_down_retries_then_all_down_503(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=None)   # Istio's default route: all pods, retries
    try:
        pods = list(h.pods.values())
        await pods[0].stop_backend()
        await pods[0].hbone.close()      # the pod's node side is gone too: connection refused
        pods[0].hbone = None
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        for _ in range(30):
            status, _, body = await client.request(stream)
            assert status == 200 and body != pods[0].version.encode()
        for p in pods[1:]:                # all pods killed: their node side goes with them
            await p.stop_backend()
            await p.hbone.close()
            p.hbone = None
        status, _, body = await client.request(stream)
        assert status == 503
        assert body.startswith(b"upstream connect error")
        lines = await h.log_lines(31)
        last = [x for x in lines if x["kind"] == "http"][-1]
        assert last["status"] == 503 and "URX" in last["response_flags"] and "UF" in last["response_flags"]
        assert last["attempts"] == 3
    finally:
        await h.close()


ROUTES = config_docs(
    virtual_service("reviews", """
  - match: [{uri: {prefix: /slow}}]
    timeout: 0.3s
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 0.2s, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /headers}}]
    headers:
      request: {set: {x-set: "yes"}, add: {x-add: b}, remove: [x-remove]}
      response: {remove: [x-drop], add: {x-resp: r}}
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /big}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{uri: {exact: /v1}}]
    route: [{destination: {host: reviews, subset: v1}}]
"""),
    destination_rule("reviews", subsets=("v1", "v2", "v3")),
)


async def test_timeout_fault_headers_noroute_streaming(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=ROUTES)
    try:
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        status, _, body = await client.request(stream, "/slow?s=2")
        assert (status, body) == (504, b"upstream request timeout")
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        status, _, body = await client.request(stream, "/abort")
        assert (status, body) == (418, b"fault filter abort")
        t0 = asyncio.get_running_loop().time()
        status, _, body = await client.request(stream, "/delay")
        assert status == 200 and asyncio.get_running_loop().time() - t0 >= 0.2
        status, headers, body = await client.request(stream, "/headers", headers=[(b"x-remove", b"1"), (b"x-add", b"a")])
        import json
        seen = json.loads(body)
        assert seen["x-set"] == "yes" and seen["x-add"] == "a,b" and "x-remove" not in seen
        assert seen["host"] == "reviews:9080" and "x-request-id" in seen
        assert headers["x-resp"] == "r" and "x-drop" not in headers
        status, _, _ = await client.request(stream, "/nowhere")
        assert status == 404
        # A large response is streamed through (chunked from the backend), byte-exact.
        n = 8 * 1024 * 1024 + 123
        status, headers, body = await client.request(stream, f"/big?n={n}")
        assert status == 200 and len(body) == n and headers["x-version"] == "v3"
        assert body[:256] == bytes(range(256))
        # POST with a body, buffered (retriable) and forwarded with its length.
        status, _, body = await client.request(stream, "/v1", method=b"POST", body=b"hello")
        assert (status, body) == (200, b"v1 hello")
        lines = await h.log_lines(8)
        http = [x for x in lines if x["kind"] == "http"]
        by_path = {x["path"].split("?")[0]: x for x in http}
        assert by_path["/slow"]["response_flags"] == "UT"
        assert by_path["/abort"]["response_flags"] == "FI"
        assert by_path["/delay"]["response_flags"] == "DI"
        assert by_path["/nowhere"]["response_flags"] == "NR"
    finally:
        await h.close()


async def test_recheck_closes_tcp_tunnels_denied_after_a_policy_change(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, tcp_pod=True, extra=TCP_DENY)
    try:
        client = h.client()
        stream = await client.tunnel(f"{TCP_VIP}:9000")
        stream.write(b"ping")
        await stream.drain()
        assert await stream.read() == b"ping"
        assert [t.chain.protocol for t in h.waypoint.tunnels()] == ["tcp"]
        assert _tunnels_active(h) == 1   # the live set, read at scrape time
        assert h.waypoint.recheck(h.store.current) == 0     # still allowed
        (tmp_path / "config" / "extra.yaml").write_text(TCP_DENY.replace("bookinfo-productpage", "nobody"))
        h.store.load()
        assert h.waypoint.recheck(h.store.current) == 1
        with pytest.raises(ConnectionError):   # reset, not a clean end
            while await stream.read():
                pass
        for _ in range(200):
            if not h.waypoint.tunnels():
                break
            await asyncio.sleep(0.01)
        assert _tunnels_active(h) == 0
    finally:
        await h.close()


def _tunnels_active(h) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(h.metrics.exposition().decode()):
        if family.name == "hbone_tunnels_active":
            return family.samples[0].value
    raise AssertionError("hbone_tunnels_active is not exposed")


async def test_an_internal_error_is_answered_500_and_logged_as_500(tmp_path, loopback_ip, monkeypatch):
    """A fault of ours (an exception that is not a ProxyError) inside the request path: the client gets
    500 and the HTTP/1.1 connection closes (state unknown), the access log and metrics say 500 with the
    error (they said 0 before), and the next tunnel is served."""
    from proxy.pipeline import http as pipeline_http

    async def broken(*args, **kwargs):
        raise RuntimeError("boom")

    h = await start_harness(tmp_path, loopback_ip)
    try:
        client = h.client()
        with monkeypatch.context() as m:
            m.setattr(pipeline_http.HttpPipeline, "_execute_lean", broken)
            m.setattr(pipeline_http.HttpPipeline, "_execute", broken)
            stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
            status, headers, _ = await client.request(stream)
            assert status == 500 and headers.get("connection") == "close"
            stream.close()
        line = [x for x in await h.log_lines(1) if x["kind"] == "http"][-1]
        assert line["status"] == 500 and "internal error: RuntimeError: boom" in line["error"]
        assert 'response_code="500"' in h.metrics.exposition().decode()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        status, _, body = await client.request(stream)
        assert status == 200 and body in (b"v1", b"v2")
        stream.close()
    finally:
        await h.close()
