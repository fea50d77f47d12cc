"""Issue 5 "Must show" on a live mesh of ``hbone-proxy run`` subprocesses (node-a, node-b, the reviews
waypoint): metrics after known traffic, the access log for that traffic, and a reload under live traffic.

Known traffic: HTTP requests with known body sizes from productpage (allowed: 200) and from "other"
(denied by the waypoint: 403), and one TCP flow through the waypoint with a different number of bytes
each way (so Istio's byte-direction convention is visible). Each test filters on paths or counters it
alone produces, so the tests of this module share one mesh. The reload test changes the routing and
runs last.
"""

from __future__ import annotations

import collections
import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.mesh import BAD_POLICY, FIXTURES, OTHER_CLIENT, Mesh, SocksHTTPConnection, socks5_connect

REVIEWS = "reviews.default.svc.cluster.local"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
OTHER = "spiffe://cluster.local/ns/default/sa/other"
REVIEWS_SA = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
WAYPOINT_SA = "spiffe://cluster.local/ns/default/sa/reviews-waypoint"
RBAC_BODY = b"RBAC: access denied"
# The TCP flow: the client sends SINK_IN bytes and half-closes; the sink answers SINK_OUT bytes.
SINK_IN, SINK_OUT = 300_000, 70_001
SINK_PORT = 7100
# How long a counter may take to show a finished flow (close → record on three proxies).
SETTLE_S = 10.0

EXTRA = f"""
workloads:
- uid: Kubernetes//v1/Pod/default/sink-0
  name: sink-0
  namespace: default
  serviceAccount: sink
  workloadIps: ["127.1.0.52"]
  protocol: HBONE
  node: node-b
  canonicalName: sink
  canonicalRevision: v7
  workloadName: sink
  labels: {{app: sink, version: v7}}
  services:
    default/sink.default.svc.cluster.local: {{{SINK_PORT}: {SINK_PORT}}}
services:
- name: sink
  namespace: default
  hostname: sink.default.svc.cluster.local
  vips: ["/127.2.0.52"]
  ports: {{{SINK_PORT}: {SINK_PORT}}}
  appProtocols: {{{SINK_PORT}: tcp}}
  waypoint: {{destination: "default/reviews-waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
"""


class SizedBackend:
    """A reviews pod: GET or POST ``/any?n=N`` answers ``vK:`` padded to N bytes (default 10); a POST
    body is read and counted. HTTP/1.1 keep-alive."""

    def __init__(self, ip: str, port: int, version: str):
        self.received: list[int] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self, body_len: int) -> None:
                received.append(body_len)
                q = parse_qs(urlsplit(self.path).query)
                n = int(q.get("n", ["10"])[0])
                body = (f"{version}:".encode() + b"." * n)[:n]
                self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

            def do_GET(self):  # noqa: N802
                self._answer(0)

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length", "0"))
                data = self.rfile.read(n)
                self._answer(len(data))

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                pass

        self.server = Server((ip, port), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SinkBackend:
    """TCP: read until the client's FIN, then answer SINK_OUT bytes and close."""

    def __init__(self, ip: str, port: int):
        self.sock = socket.create_server((ip, port), reuse_port=False)
        self.got: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            n = 0
            while chunk := conn.recv(1 << 16):
                n += len(chunk)
            self.got.append(n)
            conn.sendall(b"s" * SINK_OUT)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = Mesh(tmp_path_factory.mktemp("ops"), extra_yaml=(OTHER_CLIENT, EXTRA))
    try:
        m.start_proxies()
        for v in (1, 2, 3):
            m.backends.append(SizedBackend(m.pod(20 + v), 9080, f"v{v}"))
        m.sink = SinkBackend(m.pod(52), SINK_PORT)
        m.backends.append(m.sink)
        yield m
    finally:
        m.close()


# ---------------------------------------------------------------------------------------------
# helpers


def scrape(proc) -> list:
    status, body = proc.get("metrics", "/metrics")
    assert status == 200
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def total(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def series(samples, name: str, **labels) -> list:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def client(mesh: Mesh, source: int = 10) -> SocksHTTPConnection:
    return SocksHTTPConnection(mesh.node_a.socks5, mesh.vip(20), 9080, source_ip=mesh.pod(source))


def request(conn, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    conn.request(method, path, body=body or None, headers={"Content-Length": str(len(body))} if body else {})
    r = conn.getresponse()
    return r.status, r.read()


def wait_for(pred, what: str, timeout: float = SETTLE_S):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def tcp_flow(mesh: Mesh) -> bytes:
    s = socks5_connect(mesh.node_a.socks5, mesh.vip(52), SINK_PORT, source_ip=mesh.pod(10), timeout=30)
    try:
        s.sendall(b"c" * SINK_IN)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(1 << 16):
            got += chunk
        return bytes(got)
    finally:
        s.close()


# Known HTTP traffic: (method, request body size, response body size), all from productpage.
ALLOWED = [("POST", 1000, 10), ("POST", 2500, 300), ("GET", 0, 4096), ("POST", 1, 1), ("GET", 0, 77)] * 4
DENIED = 3


def send_known_http(mesh: Mesh, tag: str) -> None:
    conn = client(mesh)
    try:
        for i, (method, req_n, resp_n) in enumerate(ALLOWED):
            status, body = request(conn, method, f"/{tag}/{i}?n={resp_n}", b"b" * req_n)
            assert status == 200 and len(body) == resp_n, (status, body[:40])
    finally:
        conn.close()
    conn = client(mesh, source=11)   # sa "other": only productpage may call reviews
    try:
        for i in range(DENIED):
            assert request(conn, "GET", f"/{tag}/denied/{i}") == (403, RBAC_BODY)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# 2. metrics after known traffic


def test_metrics_count_and_bytes_exactly_with_istio_labels(mesh):
    procs = (mesh.waypoint, mesh.node_a, mesh.node_b)
    before = {p.name: scrape(p) for p in procs}
    send_known_http(mesh, "metrics")
    assert tcp_flow(mesh) == b"s" * SINK_OUT

    def delta(proc, samples, name, **labels):
        return total(samples, name, **labels) - total(before[proc.name], name, **labels)

    wp = mesh.waypoint
    # --- HTTP at the waypoint (reporter="waypoint", istio_stats.cc) ---
    after = wait_for(lambda: (s := scrape(wp)) and delta(wp, s, "istio_requests_total", reporter="waypoint")
                     >= len(ALLOWED) + DENIED and s, "waypoint request counts")
    ok = dict(reporter="waypoint", response_code="200", destination_service=REVIEWS, source_principal=PRODUCTPAGE)
    denied = dict(reporter="waypoint", response_code="403", destination_service=REVIEWS, source_principal=OTHER)
    assert delta(wp, after, "istio_requests_total", **ok) == len(ALLOWED)
    assert delta(wp, after, "istio_requests_total", **denied) == DENIED
    assert delta(wp, after, "istio_requests_total", reporter="waypoint") == len(ALLOWED) + DENIED
    # Histograms: count = requests; sum = body bytes (Istio: "measures HTTP request/response body sizes").
    assert delta(wp, after, "istio_request_bytes_count", **ok) == len(ALLOWED)
    assert delta(wp, after, "istio_request_bytes_sum", **ok) == sum(r for _, r, _ in ALLOWED)
    assert delta(wp, after, "istio_response_bytes_sum", **ok) == sum(r for _, _, r in ALLOWED)
    assert delta(wp, after, "istio_response_bytes_sum", **denied) == DENIED * len(RBAC_BODY)
    assert delta(wp, after, "istio_request_duration_milliseconds_count", **ok) == len(ALLOWED)
    # Istio's label names and values.
    [ok_series] = [s for s in series(after, "istio_requests_total", **ok) if s.labels["destination_version"] == "v1"]
    labels = ok_series.labels
    assert labels == labels | {
        "source_principal": PRODUCTPAGE, "source_workload_namespace": "default",
        # The waypoint holds only its scope: it names the caller from the baggage node-a put on the CONNECT.
        "source_workload": "productpage-v1", "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "destination_principal": REVIEWS_SA, "destination_workload": "reviews-v1",
        "destination_workload_namespace": "default", "destination_app": "reviews", "destination_version": "v1",
        "destination_service": REVIEWS, "destination_service_name": "reviews",
        "destination_service_namespace": "default", "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v1", "request_protocol": "http", "response_code": "200",
        "grpc_response_status": "", "response_flags": "-", "connection_security_policy": "mutual_tls"}
    assert set(labels) == {
        "reporter", "source_workload", "source_canonical_service", "source_canonical_revision",
        "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
        "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
        "destination_version", "destination_service", "destination_canonical_service",
        "destination_canonical_revision", "destination_service_name", "destination_service_namespace",
        "destination_cluster", "request_protocol", "response_code", "grpc_response_status", "response_flags",
        "connection_security_policy"}
    assert not any(v == "" for k, v in labels.items() if k != "grpc_response_status")   # missing → "unknown"
    # The denied request never reached a pod: no destination workload (Istio: "unknown").
    [d] = series(after, "istio_requests_total", **denied)
    assert d.labels["destination_workload"] == "unknown" and d.labels["response_flags"] == "-"
    # The split: 20 requests over v1/v2 only, exactly as many as the waypoint's log says per cluster.
    per_version = {v: delta(wp, after, "istio_requests_total", destination_version=v, **ok) for v in ("v1", "v2", "v3")}
    assert sum(per_version.values()) == len(ALLOWED) and per_version["v3"] == 0
    lines = [l for l in wp.access_lines() if l.get("kind") == "http" and l.get("path", "").startswith("/metrics/")
             and l["status"] == 200]
    assert collections.Counter(l["upstream_cluster"].split("|")[2] for l in lines) == collections.Counter(
        {f"http/{v}": n for v, n in per_version.items() if n})

    # --- TCP: the same flow at all three proxies; received = client→server bytes, sent = server→client
    # (Istio's convention for every reporter, istio/istio#32399; ztunnel CommonTrafficLabels) ---
    sink = dict(destination_service="sink.default.svc.cluster.local", request_protocol="tcp")
    for proc, reporter, src in ((mesh.waypoint, "waypoint", PRODUCTPAGE), (mesh.node_a, "source", PRODUCTPAGE),
                                (mesh.node_b, "destination", WAYPOINT_SA)):
        want = dict(reporter=reporter, source_principal=src, **(sink if reporter != "destination" else {}),
                    **({"destination_workload": "sink"} if reporter == "destination" else {}))
        s = wait_for(lambda: (x := scrape(proc)) and delta(proc, x, "istio_tcp_connections_closed_total", **want) >= 1
                     and x, f"{proc.name} tcp close")
        assert delta(proc, s, "istio_tcp_connections_opened_total", **want) == 1, proc.name
        assert delta(proc, s, "istio_tcp_connections_closed_total", **want) == 1, proc.name
        assert delta(proc, s, "istio_tcp_received_bytes_total", **want) == SINK_IN, proc.name
        assert delta(proc, s, "istio_tcp_sent_bytes_total", **want) == SINK_OUT, proc.name
        [one] = series(s, "istio_tcp_sent_bytes_total", **want)
        assert one.labels["connection_security_policy"] == "mutual_tls" and one.labels["response_flags"] == "-"
        if reporter != "source":
            assert one.labels["destination_canonical_service"] == "sink"
            assert one.labels["destination_canonical_revision"] == "v7"
            assert one.labels["destination_principal"] == "spiffe://cluster.local/ns/default/sa/sink"
    # node-a knows its own pod: the source reporter names productpage in full.
    a = scrape(mesh.node_a)
    [src] = series(a, "istio_tcp_sent_bytes_total", reporter="source", **sink)
    assert {k: src.labels[k] for k in ("source_workload", "source_canonical_service", "source_canonical_revision",
                                       "source_app", "source_version")} == {
        "source_workload": "productpage-v1", "source_canonical_service": "productpage",
        "source_canonical_revision": "v1", "source_app": "productpage", "source_version": "v1"}


def test_metrics_endpoints_and_proxy_counters(mesh):
    for proc in (mesh.waypoint, mesh.node_a):
        status, body = proc.get("metrics", "/stats/prometheus")
        assert status == 200
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert {"hbone_config_reloads", "hbone_tls_handshake_failures", "hbone_h2_protocol_errors",
                "process_cpu_seconds", "process_resident_memory_bytes"} <= names


def test_tunnels_active_counts_a_live_flow_at_all_three_proxies(mesh):
    """``hbone_tunnels_active`` on node-a (outbound), the waypoint and node-b (inbound) while one TCP
    flow is open, and back once it has closed (the node proxy reads its per-listener counts at scrape)."""
    procs = (mesh.node_a, mesh.waypoint, mesh.node_b)

    def active(proc) -> float:
        return total(scrape(proc), "hbone_tunnels_active")

    before = {p.name: active(p) for p in procs}
    s = socks5_connect(mesh.node_a.socks5, mesh.vip(52), SINK_PORT, source_ip=mesh.pod(10), timeout=30)
    try:
        s.sendall(b"c" * 1000)   # no half-close: the sink answers only after EOF, the flow stays open
        for proc in procs:
            wait_for(lambda: active(proc) >= before[proc.name] + 1, f"{proc.name} counting the open tunnel")
        s.shutdown(socket.SHUT_WR)
        while s.recv(1 << 16):
            pass
    finally:
        s.close()
    for proc in procs:
        wait_for(lambda: active(proc) == before[proc.name], f"{proc.name} counting the tunnel closed")


# ---------------------------------------------------------------------------------------------
# 6. the access log for known traffic


def test_access_log_one_line_per_request_and_tunnel(mesh):
    wp = mesh.waypoint

    def tunnel(proc, **match):
        return [l for l in proc.access_lines() if l.get("kind") == "tunnel"
                and all(l.get(k) == v for k, v in match.items()) and l.get("bytes_received") == SINK_IN]

    hops = ((mesh.node_a, {"dst.service": "sink.default.svc.cluster.local"}),
            (wp, {"dst.hbone_addr": f"{mesh.vip(52)}:{SINK_PORT}"}),
            (mesh.node_b, {"dst.workload": "sink-0"}))
    before = [len(tunnel(proc, **match)) for proc, match in hops]
    send_known_http(mesh, "log")
    assert tcp_flow(mesh) == b"s" * SINK_OUT

    def http_lines():
        return [l for l in wp.access_lines() if l.get("kind") == "http" and l.get("path", "").startswith("/log/")]

    lines = wait_for(lambda: (x := http_lines()) and len(x) >= len(ALLOWED) + DENIED and x, "http lines")
    assert len(lines) == len(ALLOWED) + DENIED
    allowed = [l for l in lines if l["status"] == 200]
    assert len(allowed) == len(ALLOWED)
    by_path = {l["path"]: l for l in allowed}
    for i, (method, req_n, resp_n) in enumerate(ALLOWED):
        l = by_path[f"/log/{i}?n={resp_n}"]
        assert (l["method"], l["bytes_received"], l["bytes_sent"]) == (method, req_n, resp_n)
        assert l["level"] == "info" and l["reporter"] == "waypoint" and l["direction"] == "inbound"
        assert l["src.identity"] == PRODUCTPAGE and l["dst.service"] == REVIEWS
        assert l["chain"] == f"inbound-vip|9080||{REVIEWS}-http"   # as proxy-config listeners names it
        assert l["authz"] == "allow" and l["authz.policy"] == "default/reviews-allow-productpage"
        assert l["route"] == f"inbound-vip|9080|http|{REVIEWS}"
        assert l["upstream_cluster"] in (f"inbound-vip|9080|http/v1|{REVIEWS}", f"inbound-vip|9080|http/v2|{REVIEWS}")
        version = l["upstream_cluster"].split("|")[2].split("/")[1]
        assert l["upstream_host"] == f"{mesh.pod(20 + int(version[1]))}:9080"
        assert l["response_flags"] == "-" and l["attempts"] == 1 and l["duration_ms"] >= 0
        assert l["start_time"].endswith("Z")
    # The HTTP tunnel's own line counts the tunnel's bytes (heads included, so at least the bodies).
    http_tunnels = wait_for(lambda: [l for l in wp.access_lines() if l.get("kind") == "tunnel"
                                     and l.get("chain") == f"inbound-vip|9080||{REVIEWS}-http"
                                     and l.get("bytes_received", 0) >= sum(r for _, r, _ in ALLOWED)], "tunnel line")
    assert any(l["bytes_sent"] >= sum(r for _, _, r in ALLOWED) for l in http_tunnels)
    for l in (l for l in lines if l["status"] == 403):
        assert l["src.identity"] == OTHER and l["authz"] == "deny" and l["bytes_sent"] == len(RBAC_BODY)
        assert l["response_code_details"].startswith("rbac_access_denied_matched_policy[")
        assert "upstream_host" not in l and l["response_flags"] == "-"

    # One new tunnel line at each hop for this flow, bytes in each direction (access logs are not
    # flipped: bytes_sent is what went to the downstream).
    a, w, b = (wait_for(lambda p=proc, m=match, n=n: (x := tunnel(p, **m)) and len(x) > n and x, f"{proc.name} line")
               for (proc, match), n in zip(hops, before))
    assert [len(x) - n for x, n in zip((a, w, b), before)] == [1, 1, 1]
    for l in (a[-1], w[-1], b[-1]):
        assert (l["bytes_received"], l["bytes_sent"], l["response_flags"]) == (SINK_IN, SINK_OUT, "-")
        assert l["duration_ms"] > 0 and l["level"] == "info"
    assert a[-1]["direction"] == "outbound" and a[-1]["src.identity"] == PRODUCTPAGE
    assert w[-1]["chain"].startswith(f"inbound-vip|{SINK_PORT}|") and w[-1]["protocol"] == "tcp"
    assert w[-1]["authz"] == "allow" and w[-1]["upstream_host"] == f"{mesh.pod(52)}:{SINK_PORT}"
    assert w[-1]["upstream_cluster"] == f"inbound-vip|{SINK_PORT}|tcp|sink.default.svc.cluster.local"
    assert b[-1]["direction"] == "inbound" and b[-1]["src.identity"] == WAYPOINT_SA and b[-1]["authz"] == "allow"
    # The waypoint dials from its own pod IP, so node-b sees (and authorizes) the waypoint's address.
    assert b[-1]["src.addr"].rsplit(":", 1)[0] == mesh.pod(100)


# ---------------------------------------------------------------------------------------------
# 3. reload under live traffic (runs last: it changes the routing)



class Loop:
    """A client sending requests back to back on one keep-alive connection until stopped; every
    answer is checked complete (http.client raises IncompleteRead on a short body)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self.results: list[tuple[float, int, str]] = []     # (monotonic time sent, status, version)
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = client(self.mesh)
        try:
            while not self.stop.is_set():
                n = 2000 + len(self.results) % 7
                sent = time.monotonic()
                status, body = request(conn, "POST", f"/reload?n={n}", b"r" * 333)
                if status != 200 or len(body) != n:
                    raise AssertionError(f"{status} {len(body)} != {n}")
                self.results.append((sent, status, body.split(b":")[0].decode()))
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.errors.append(err)
        finally:
            conn.close()

    def since(self, t: float) -> collections.Counter:
        return collections.Counter(v for ts, _, v in self.results if ts > t)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)


def test_reload_under_live_traffic_then_a_broken_file(mesh):
    wp = mesh.waypoint
    loop = Loop(mesh)
    try:
        wait_for(lambda: len(loop.results) >= 100 or loop.errors, "traffic before the reload", 30)
        before = loop.since(0)
        assert set(before) <= {"v1", "v2"} and before["v1"] > before["v2"], before
        version = wp.config_dump()["config"]["version"]
        ok0 = total(scrape(wp), "hbone_config_reloads_total", result="success")
        routing = (FIXTURES / "bookinfo" / "reviews-routing.yaml").read_text()
        assert "weight: 90" in routing and "weight: 10" in routing
        mesh.write("reviews-routing.yaml", routing.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 100"))
        wait_for(lambda: wp.config_dump()["config"]["version"] != version, "the reload")
        reloaded_at = time.monotonic()
        assert total(scrape(wp), "hbone_config_reloads_total", result="success") == ok0 + 1
        wait_for(lambda: sum(loop.since(reloaded_at).values()) >= 100 or loop.errors, "traffic after the reload", 30)
        after = loop.since(reloaded_at)
        assert after == collections.Counter({"v2": sum(after.values())}), after   # 0/100 at once

        # A broken file: rejected, the last good config stays, the failure counter goes up.
        version = wp.config_dump()["config"]["version"]
        failed0 = total(scrape(wp), "hbone_config_reloads_total", result="failure")
        mesh.write("broken.yaml", BAD_POLICY)
        wait_for(lambda: total(scrape(wp), "hbone_config_reloads_total", result="failure") == failed0 + 1,
                 "the failed reload")
        broken_at = time.monotonic()
        dump = wp.config_dump()
        assert dump["config"]["version"] == version and "principalz" in dump["config"]["last_error"]
        wait_for(lambda: sum(loop.since(broken_at).values()) >= 50 or loop.errors, "traffic after the bad file", 30)
        assert set(loop.since(broken_at)) == {"v2"}
    finally:
        loop.finish()
        try:
            mesh.remove("broken.yaml")
        except FileNotFoundError:
            pass
    assert not loop.errors, loop.errors
    assert all(status == 200 for _, status, _ in loop.results) and len(loop.results) >= 250
