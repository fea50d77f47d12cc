"""A refused client certificate at a live `hbone-proxy run` is counted (by kind and reason, and in the
TLS handshake failures counter) and written as one access-log line naming the reason."""

from __future__ import annotations

import socket
import ssl
import time

from prometheus_client.parser import text_string_to_metric_families

from certs.bundle import CertBundle
from certs.ca import MeshCA
from certs.spiffe import SpiffeId
from certs.tls import client_context
from tests.e2e.mesh import Mesh


def _sample(text: str, name: str, labels: dict[str, str]) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_untrusted_client_cert_is_counted_and_logged(make_mesh, tmp_path):
    mesh: Mesh = make_mesh()
    node_b = mesh.start_node("node-b", 2)
    ip = mesh.pod(21)   # a reviews pod on node-b: its HBONE listener
    # A certificate from another CA (same trust domain): the server must refuse it with `unknown_ca`.
    from datetime import datetime, timedelta, timezone
    now = datetime.now(timezone.utc)
    other = MeshCA.init(tmp_path / "other-ca", trust_domain="cluster.local", now=now - timedelta(minutes=1))
    issued = other.issue(SpiffeId("cluster.local", "default", "intruder"), now=now - timedelta(minutes=1))
    ctx = client_context(CertBundle.from_issued(issued, other.root_cert_pem))
    with socket.create_connection((ip, 15008), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                tls.settimeout(5)
                tls.recv(1)   # TLS 1.3: the refusal shows on the first read
        except (ssl.SSLError, OSError):
            pass
    deadline = time.monotonic() + 10
    while True:
        text = node_b.get("metrics", "/metrics")[1].decode()
        refused = _sample(text, "hbone_listener_refusals_total", {"kind": "tls"})
        if refused >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert refused == 1
    assert _sample(text, "hbone_tls_handshake_failures_total", {}) == 1
    lines = node_b.access_lines()
    failed = [l for l in lines if l.get("kind") == "connection"]
    assert len(failed) == 1 and "connection failed: tls:" in failed[0]["error"]
    assert failed[0]["dst.addr"] == f"{ip}:15008"
