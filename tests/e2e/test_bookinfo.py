"""The bookinfo mesh end to end, with ``hbone-proxy run`` subprocesses as users run them (issue 4 "Must show").

One mesh serves the read-only tests of this module: node-a (productpage, ratings, details, a second
client "other"), node-b (reviews v1/v2/v3, a TCP echo), the reviews waypoint; a second namespace is
configured so the waypoint's scope can be checked. Tests that kill things get their own mesh.
"""

from __future__ import annotations

import collections
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from tests.e2e.mesh import OTHER_CLIENT, Mesh, SocksError, SocksHTTPConnection, echo_yaml, get, socks5_connect

REQUESTS = 1000
TOLERANCE = 0.03     # issue 4: "90 ± 3 % over 1000 requests"
MiB = 1024 * 1024

# Besides a second client identity on node-a (OTHER_CLIENT) and a TCP echo on node-b (one service
# L4-only, one through the waypoint: echo_yaml), a second namespace the reviews waypoint must not hold.
EXTRA = """
workloads:
- uid: Kubernetes//v1/Pod/shop/cart-0
  name: cart-0
  namespace: shop
  serviceAccount: cart
  workloadIps: ["127.1.0.60"]
  protocol: HBONE
  node: node-b
  labels: {app: cart}
  services:
    shop/cart.shop.svc.cluster.local: {8080: 8080}
services:
- name: cart
  namespace: shop
  hostname: cart.shop.svc.cluster.local
  vips: ["/127.2.0.60"]
  ports: {8080: 8080}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: cart-deny-all
  namespace: shop
spec:
  targetRefs:
  - {kind: Service, group: "", name: cart}
  action: DENY
  rules:
  - {}
"""


@pytest.fixture(scope="module")
def bookinfo(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("bookinfo"), extra_yaml=(OTHER_CLIENT, echo_yaml("echo", "echo-wp"), EXTRA))
    try:
        mesh.start_proxies()
        for v in (1, 2, 3):
            mesh.http_backend(20 + v, 9080, f"reviews-v{v}".encode())
        mesh.http_backend(30, 9080, b"ratings-v1")
        mesh.echo_backend(50, 7000)
        yield mesh
    finally:
        mesh.close()


def _client(mesh: Mesh, host: str, port: int = 9080, source: int = 10) -> SocksHTTPConnection:
    return SocksHTTPConnection(mesh.node_a.socks5, host, port, source_ip=mesh.pod(source))


def _split(mesh: Mesh, n: int) -> collections.Counter:
    conn = _client(mesh, mesh.vip(20))
    counts: collections.Counter = collections.Counter()
    try:
        for _ in range(n):
            status, body = get(conn)
            assert status == 200, body
            counts[body.decode()] += 1
    finally:
        conn.close()
    return counts


def test_virtualservice_90_10_through_socks5_waypoint_and_node_b(bookinfo):
    counts = _split(bookinfo, REQUESTS)
    assert set(counts) <= {"reviews-v1", "reviews-v2"}, counts   # v3 gets nothing
    assert abs(counts["reviews-v1"] / REQUESTS - 0.90) <= TOLERANCE, counts
    assert abs(counts["reviews-v2"] / REQUESTS - 0.10) <= TOLERANCE, counts
    # The waypoint logged the route it chose, and node-b served the pods (destination reporter).
    lines = [l for l in bookinfo.waypoint.access_lines() if l.get("kind") == "http"]
    assert {l["upstream_cluster"] for l in lines} <= {
        "inbound-vip|9080|http/v1|reviews.default.svc.cluster.local",
        "inbound-vip|9080|http/v2|reviews.default.svc.cluster.local"}
    assert lines[-1]["src.identity"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


def test_another_identity_gets_403_rbac_access_denied(bookinfo):
    conn = _client(bookinfo, bookinfo.vip(20), source=11)   # the "other" pod: sa other
    try:
        status, body = get(conn)
    finally:
        conn.close()
    assert (status, body) == (403, b"RBAC: access denied")
    conn = _client(bookinfo, bookinfo.vip(20))
    try:
        assert get(conn)[0] == 200   # productpage itself is still allowed
    finally:
        conn.close()


@pytest.mark.parametrize("service", ["echo", "echo-wp"])
def test_tcp_16mib_byte_exact_with_half_close(bookinfo, service):
    """L4 only (node-a → node-b) and through the waypoint's TCP chain: our FIN reaches the echo server,
    which only then sends its own FIN; every byte comes back in order."""
    vip = bookinfo.vip(50 if service == "echo" else 51)
    payload = os.urandom(16 * MiB)
    sock = socks5_connect(bookinfo.node_a.socks5, vip, 7000, source_ip=bookinfo.pod(10), timeout=60)
    received = bytearray()

    def reader():
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)   # half-close: we still read the echo after this
        t.join(60)
    finally:
        sock.close()
    assert not t.is_alive()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_real_curl_socks5_hostname(bookinfo):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    host, port = bookinfo.node_a.socks5
    r = subprocess.run([curl, "-sS", "--max-time", "20", "--interface", bookinfo.pod(10),
                        "--socks5-hostname", f"{host}:{port}", "http://reviews.default.svc.cluster.local:9080/"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout in ("reviews-v1", "reviews-v2")


def test_node_l4_policy_deny_is_socks_not_allowed(bookinfo):
    """ratings allows only the reviews identity (selector policy, enforced by node-a's inbound: 401)."""
    with pytest.raises(SocksError) as err:
        socks5_connect(bookinfo.node_a.socks5, bookinfo.vip(30), 9080, source_ip=bookinfo.pod(10))
    assert err.value.code == 0x02
    # reviews-v1 (on node-b) may call ratings (on node-a): the HBONE hop crosses nodes.
    conn = SocksHTTPConnection(bookinfo.node_b.socks5, "ratings.default.svc.cluster.local", 9080,
                               source_ip=bookinfo.pod(21))
    try:
        assert get(conn) == (200, b"ratings-v1")
    finally:
        conn.close()
    deny = [l for l in bookinfo.node_a.access_lines() if l.get("status") == 401]
    assert deny and deny[-1]["response_flags"] == "DENY"
    assert deny[-1]["src.identity"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


def test_unknown_source_ip_is_refused(bookinfo):
    """ztunnel refuses traffic from pods it does not serve: the source IP picks the identity."""
    with pytest.raises(SocksError) as err:
        socks5_connect(bookinfo.node_a.socks5, bookinfo.vip(20), 9080, source_ip=bookinfo.pod(21))
    assert err.value.code == 0x02


def test_waypoint_holds_only_its_scope(bookinfo):
    dump = bookinfo.waypoint.config_dump()
    services = {s["hostname"] for s in dump["services"]}
    assert "reviews.default.svc.cluster.local" in services
    assert "echo-wp.default.svc.cluster.local" in services
    held = repr(dump)
    # Nothing of the other namespace: services, endpoints (workloads) or policies.
    assert "shop" not in held and "cart" not in held, held
    assert all(w["namespace"] == "default" for w in dump["workloads"])
    assert "shop/cart-deny-all" not in dump["policies"]
    # Nor the default namespace's services without this waypoint (ztunnel-only traffic).
    assert not services & {"ratings.default.svc.cluster.local", "details.default.svc.cluster.local",
                           "productpage.default.svc.cluster.local"}
    # The node proxies hold the whole mesh (they need every service to route outbound).
    node_services = {s["hostname"] for s in bookinfo.node_a.config_dump()["services"]}
    assert "cart.shop.svc.cluster.local" in node_services


def test_metrics_and_readiness_are_served(bookinfo):
    for p in (bookinfo.node_a, bookinfo.node_b, bookinfo.waypoint):
        assert p.get("readiness", "/healthz/ready") == (200, b"ready\n")
        status, body = p.get("metrics", "/metrics")
        assert status == 200 and b'hbone_config_reloads_total{result="success"}' in body


# ---------------------------------------------------------------------------------------------
# Meshes of their own


def test_httproute_90_10(make_mesh):
    from tests.e2e.mesh import FIXTURES
    mesh = make_mesh(fixtures=("inventory.yaml", "authz.yaml", "waypoint.yaml"),
                     extra_yaml=((FIXTURES / "bookinfo-httproute.yaml").read_text(),))
    mesh.start_proxies()
    for v in (1, 2, 3):
        mesh.http_backend(20 + v, 9080, f"reviews-v{v}".encode())
    counts = _split(mesh, REQUESTS)
    assert set(counts) <= {"reviews-v1", "reviews-v2"}, counts
    assert abs(counts["reviews-v1"] / REQUESTS - 0.90) <= TOLERANCE, counts


def test_pod_killed_retries_then_all_down_503(make_mesh):
    """No VirtualService: reviews is one cluster of three pods. One pod down → Istio's default retry
    (connect-failure, another host) hides it; all down → 503 with UF/URX in the waypoint's log."""
    mesh = make_mesh(fixtures=("inventory.yaml", "authz.yaml", "waypoint.yaml"))
    _, _, waypoint = mesh.start_proxies()
    backends = [mesh.http_backend(20 + v, 9080, f"reviews-v{v}".encode()) for v in (1, 2, 3)]
    backends[0].close()                     # reviews-v1 killed: its node proxy answers the CONNECT 503
    counts = _split(mesh, 60)
    assert counts["reviews-v1"] == 0 and sum(counts.values()) == 60, counts
    for b in backends[1:]:
        b.close()
    conn = _client(mesh, mesh.vip(20))
    try:
        status, _ = get(conn)
    finally:
        conn.close()
    assert status == 503
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        failed = [l for l in waypoint.access_lines() if l.get("kind") == "http" and l.get("status") == 503]
        if failed:
            break
        time.sleep(0.05)
    flags = set(failed[-1]["response_flags"].split(","))
    assert flags & {"UF", "URX"}, failed[-1]


def test_proxy_config_and_explain_against_the_running_waypoint(bookinfo):
    from tests.e2e.mesh import REPO, _cli
    admin = "{}:{}".format(*bookinfo.waypoint.admin)
    r = subprocess.run(_cli() + ["proxy-config", "clusters", "--admin", admin], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "reviews.default.svc.cluster.local" in r.stdout and "outbound" not in r.stdout
    r = subprocess.run(_cli() + ["explain", "--admin", admin, "--from",
                                 "spiffe://cluster.local/ns/default/sa/other", "--to", f"{bookinfo.vip(20)}:9080",
                                 "--method", "GET", "--path", "/"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "reviews-allow-productpage" in r.stdout


OLD_TD_POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-allow-productpage-old-td, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["old-td/ns/default/sa/bookinfo-productpage"]
"""


def test_trust_domain_alias_keeps_an_old_trust_domain_policy_working(make_mesh):
    """Istio's trust domain migration: the mesh is cluster.local, the policy still names old-td; with
    ``--trust-domain-aliases old-td`` the waypoint admits productpage and still denies the others."""
    mesh = make_mesh(fixtures=("inventory.yaml", "waypoint.yaml", "reviews-routing.yaml"), extra_yaml=(OTHER_CLIENT, OLD_TD_POLICY))
    procs = (mesh.start_node("node-a", 1, wait=False), mesh.start_node("node-b", 2, wait=False),
             mesh.start_waypoint(3, wait=False, extra=("--trust-domain-aliases", "old-td")))
    for p in procs:
        mesh.wait_ready(p)
    mesh.node_a = procs[0]
    for v in (1, 2, 3):
        mesh.http_backend(20 + v, 9080, f"reviews-v{v}".encode())
    for source, want in ((10, 200), (11, 403)):
        conn = _client(mesh, mesh.vip(20), source=source)
        try:
            assert get(conn)[0] == want, source
        finally:
            conn.close()
