"""Issue 8 "No identity spoofing", against a live node proxy (``hbone-proxy run --mode node``): a client
holding a VALID mesh certificate opens CONNECTs on node-b's HBONE listener for reviews-v1 with
``:authority`` values it should not be able to use. ztunnel's rules (reference/ztunnel.md §1.5, §3):

* ``:authority`` IP ≠ the workload this listener (the connection's destination IP) serves — another
  node's pod, another local pod, a VIP, an unknown IP, the same IP spelt as IPv4-mapped IPv6, a
  hostname → **400** (``IpMismatch`` / malformed), and nothing is dialled;
* the local workload on one of the proxy's own ports 15001/15006/15008 → **503** (``SelfCall``), and
  nothing is dialled;
* the listener keeps serving good tunnels, on the same connection and on a new one.

A canary listener on every spoofed target counts connections: it must see none.
"""

from __future__ import annotations

import socket
from datetime import datetime, timezone

import pytest
from hyperframe.frame import DataFrame, HeadersFrame, RstStreamFrame

from certs.bundle import CertBundle
from certs.ca import MeshCA
from certs.spiffe import SpiffeId
from certs.tls import client_context
from tests.e2e.mesh import Mesh, SocksError, socks5_connect
from tests.test_faults import Backend, field_of, serve_echo, serve_read_all, wait_log
from tests.test_hardening_h2 import Raw

PORT = 9080
PRODUCTPAGE = SpiffeId("cluster.local", "default", "bookinfo-productpage")
SOCKS_NOT_ALLOWED = 0x02


@pytest.fixture(scope="module")
def spoof(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("spoof"))
    try:
        mesh.node_a = mesh.start_node("node-a", 1, wait=False)
        mesh.node_b = mesh.start_node("node-b", 2, wait=False)
        for p in (mesh.node_a, mesh.node_b):
            mesh.wait_ready(p)
        ca = MeshCA.load(mesh.ca_dir)
        bundle = CertBundle.from_issued(ca.issue(PRODUCTPAGE, now=datetime.now(timezone.utc)), ca.root_cert_pem)
        mesh.ctx = client_context(bundle)
        mesh.listener = (mesh.pod(21), 15008)                      # node-b, reviews-v1
        mesh.good = Backend(mesh.pod(21), PORT, serve_echo)       # reviews-v1's app
        mesh.canaries = [Backend(mesh.pod(30), PORT, serve_read_all),   # ratings, on node-a
                         Backend(mesh.pod(22), PORT, serve_read_all),   # reviews-v2, on node-b
                         Backend(mesh.pod(21), 15001, serve_read_all),
                         Backend(mesh.pod(21), 15006, serve_read_all)]
        mesh.backends += [mesh.good, *mesh.canaries]
        yield mesh
    finally:
        mesh.close()


def connect_status(c: Raw, authority: str) -> int | str:
    """CONNECT ``authority`` on connection ``c``: the :status, or "reset" if the stream was refused."""
    sid = c.new_sid()
    assert c.send(c.connect_frame(sid, authority))
    f = c.until(lambda f: f.stream_id == sid and isinstance(f, (HeadersFrame, RstStreamFrame)))
    assert f is not None, f"no answer to CONNECT {authority}"
    if isinstance(f, RstStreamFrame):
        return "reset"
    status = int(f.headers[b":status"])
    if status != 200:
        assert "END_STREAM" in f.flags, "a refusal must end the stream (ztunnel send_error)"
    return status


def good_tunnel(c: Raw, m: Mesh, payload: bytes = b"a good tunnel") -> None:
    sid = c.new_sid()
    assert c.send(c.connect_frame(sid, f"{m.pod(21)}:{PORT}"))
    resp = c.until(lambda f: isinstance(f, HeadersFrame) and f.stream_id == sid)
    assert resp is not None and resp.headers[b":status"] == b"200", resp
    end = DataFrame(sid, data=payload)
    end.flags.add("END_STREAM")
    c.send(end.serialize())
    got = b""
    for f in c.frames():
        if isinstance(f, DataFrame) and f.stream_id == sid:
            got += f.data
            if "END_STREAM" in f.flags:
                break
    assert got == payload


def cases(m: Mesh) -> list[tuple[str, int]]:
    return [
        (f"{m.pod(30)}:{PORT}", 400),             # a pod of another node
        (f"{m.pod(22)}:{PORT}", 400),             # another pod of this node, through reviews-v1's listener
        (f"{m.vip(20)}:{PORT}", 400),             # the reviews service VIP
        (f"{m.pod(99)}:{PORT}", 400),             # an address nobody has
        (f"[::ffff:{m.pod(21)}]:{PORT}", 400),    # this pod, spelt as IPv4-mapped IPv6
        (f"reviews.default.svc.cluster.local:{PORT}", 400),   # a hostname (ztunnel parses IPs here)
        (f"{m.pod(21)}:15008", 503),              # SelfCall: the HBONE port itself
        (f"{m.pod(21)}:15001", 503),              # SelfCall: outbound capture
        (f"{m.pod(21)}:15006", 503),              # SelfCall: inbound plaintext
    ]


def test_spoofed_authorities_are_refused_and_reach_nothing(spoof):
    m = spoof
    c = Raw(m.listener, m.ctx)
    try:
        good_tunnel(c, m, b"before")
        for authority, want in cases(m):
            assert connect_status(c, authority) == want, authority
        good_tunnel(c, m, b"same connection, after every refusal")
    finally:
        c.close()
    fresh = Raw(m.listener, m.ctx)
    try:
        good_tunnel(fresh, m, b"a new connection")
    finally:
        fresh.close()
    assert [b.accepted for b in m.canaries] == [0, 0, 0, 0], "a refused tunnel reached its target"
    assert m.node_b.popen.poll() is None
    # Each refusal is in node-b's access log with its reason.
    mismatch = wait_log(m.node_b, lambda l: field_of(l, "dst_hbone_addr") == f"{m.pod(22)}:{PORT}", "IpMismatch")
    assert mismatch["status"] == 400 and "not the destination" in mismatch["error"], mismatch
    selfcall = wait_log(m.node_b, lambda l: field_of(l, "dst_hbone_addr") == f"{m.pod(21)}:15001", "SelfCall")
    assert selfcall["status"] == 503 and "proxy's own ports" in selfcall["error"], selfcall


@pytest.mark.parametrize("port", [15001, 15006, 15008, 15080])
def test_outbound_to_a_proxy_port_on_loopback_is_a_self_call(spoof, port):
    """ztunnel: "Outbound to loopback on an illegal port → SelfCall deny" — SOCKS5 'not allowed'."""
    m = spoof
    with pytest.raises(SocksError) as err:
        socks5_connect(m.node_a.socks5, m.pod(21), port, source_ip=m.pod(10)).close()
    assert err.value.code == SOCKS_NOT_ALLOWED
    assert [b.accepted for b in m.canaries] == [0, 0, 0, 0]


def test_a_source_ip_that_is_not_a_local_workload_is_refused(spoof):
    """ztunnel picks the certificate by the client's pod IP: an unknown source gets no identity to
    borrow (node-b's pod reviews-v1 asking node-a to originate as it is refused)."""
    m = spoof
    with pytest.raises(SocksError) as err:
        socks5_connect(m.node_a.socks5, m.pod(30), PORT, source_ip=m.pod(21)).close()
    assert err.value.code == SOCKS_NOT_ALLOWED
    s = socks5_connect(m.node_a.socks5, m.pod(21), PORT, source_ip=m.pod(10))   # productpage: fine
    try:
        s.sendall(b"ok")
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        assert s.recv(10) == b"ok"
    finally:
        s.close()
