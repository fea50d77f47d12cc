"""Pod-addressed tunnels (direct-http / direct-tcp) and sniffed ports (no appProtocol) through the
waypoint, end to end over real HBONE tunnels (fixture tests/fixtures/l7)."""

from __future__ import annotations

from tests.stream_helpers import read_all
from tests.test_waypoint_l7 import PLAIN_HTTP_VIP, PLAIN_TCP_VIP, RawH2, l7_harness


async def test_direct_http_and_direct_tcp_by_pod_ip(tmp_path, loopback_ip):
    h, _, ips = await l7_harness(tmp_path, loopback_ip)
    try:
        client = h.client()
        # direct-http: a reviews pod's IP (its port is appProtocol http via the service): that pod answers.
        v2 = next(p for p in h.pods.values() if p.version == "v2")
        s = await client.tunnel(f"{v2.ip}:9080")
        for _ in range(5):
            status, _, body = await client.request(s, "/")
            assert (status, body) == (200, b"v2")
        # The same pod over h2c (sniffed preface; upstream stays HTTP/1.1 as the port declares http).
        c = RawH2(await client.tunnel(f"{v2.ip}:9080"))
        r = await c.get(b"/")
        assert r["headers"][b":status"] == b"200" and r["data"] == b"v2"
        # direct-tcp: the TCP echo pod's IP on an undeclared port: sniffed as TCP, relayed byte-exact.
        t = await client.tunnel(f"{ips['PLAINTCP']}:7100")
        payload = bytes(range(256)) * 1024
        t.write(payload)
        t.write_eof()
        assert await read_all(t) == payload
        lines = await h.log_lines(8)
        chains = {x["chain"] for x in lines}
        assert "direct-http" in chains and "direct-tcp" in chains
        assert any(x["kind"] == "http" and x["chain"] == "direct-http" and x["dst.workload"] == "reviews-v2-0"
                   for x in lines)
        assert any(x["kind"] == "tunnel" and x["chain"] == "direct-tcp" and x["bytes_received"] == len(payload)
                   for x in lines)
    finally:
        await h.close()


async def test_sniffed_port_http_takes_l7_path_tcp_takes_l4_decision(tmp_path, loopback_ip):
    h, _, _ = await l7_harness(tmp_path, loopback_ip)
    try:
        client = h.client()
        # No appProtocol: HTTP/1.1 detected by sniffing → the per-request path (route, access log per request).
        s = await client.tunnel(f"{PLAIN_HTTP_VIP}:7000")
        status, headers, body = await client.request(s, "/", host=b"plain-http:7000")
        assert (status, body) == (200, b"plain")
        # Raw TCP detected → the L4 decision after the 200: productpage is allowed, bytes relayed.
        t = await client.tunnel(f"{PLAIN_TCP_VIP}:7100")
        t.write(b"\x00\x01binary, not HTTP")
        t.write_eof()
        assert await read_all(t) == b"\x00\x01binary, not HTTP"
        # Another identity: the policy denies at L4; the tunnel is closed without any data.
        other = h.client("bookinfo-ratings")
        d = await other.tunnel(f"{PLAIN_TCP_VIP}:7100")
        d.write(b"\x00\x01hello")
        got = b""
        try:   # Envoy's network RBAC: closed without data — the client sees EOF (or a reset)
            while chunk := await d.read():
                got += chunk
        except ConnectionError:
            pass
        assert got == b""
        lines = await h.log_lines(4)
        http = [x for x in lines if x["kind"] == "http"]
        assert http[0]["chain"] == "inbound-vip|7000||plain-http.default.svc.cluster.local-http"
        tunnels = [x for x in lines if x["kind"] == "tunnel" and "plain-tcp" in x["chain"]]
        assert {x["chain"] for x in tunnels} == {"inbound-vip|7100||plain-tcp.default.svc.cluster.local-tcp"}
        assert any(x["authz"] == "deny" and x["bytes_sent"] == 0 for x in tunnels)
        assert any(x["authz"] == "allow" and x["bytes_sent"] == 18 for x in tunnels)
        # TCP chains report Istio's TCP metrics; the HTTP chain's tunnel does not (no double count).
        text = h.metrics.exposition().decode()
        opened = [x for x in text.splitlines() if x.startswith("istio_tcp_connections_opened_total{")]
        assert opened and all('request_protocol="tcp"' in x for x in opened)
        assert all("plain-http" not in x for x in opened)
    finally:
        await h.close()
