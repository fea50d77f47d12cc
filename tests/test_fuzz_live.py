"""Issue 8 "the proxy process never dies on input": hypothesis-driven garbage and mutated valid input
against LIVE ``hbone-proxy run`` processes (node-a, node-b, the reviews waypoint) over real sockets.

* CONNECTs with random/mutated ``:authority`` and extra headers over a real mTLS HBONE connection
  (hand-built h2 frames) → 200/400/401/431/503, a RST_STREAM, or a GOAWAY;
* random bytes after the HTTP/2 preface → GOAWAY or a close;
* random bytes into the SOCKS5 listener → SOCKS replies (RFC 1928 codes) or a close;
* random/mutated HTTP/1.1 requests into the waypoint's HTTP chain → an HTTP status or a close;
* config files mutated, then SIGHUP → reload rejected or applied; the last good config stays.

After every batch (and after each config mutation) each process is alive, answers readiness, and
a good tunnel carries bytes. The in-process parser fuzzing lives in the parsers' own tests; here the
subject is the process. Examples are bounded so the file runs in well under a minute.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hyperframe.frame import GoAwayFrame, HeadersFrame, RstStreamFrame
from prometheus_client.parser import text_string_to_metric_families

from certs.bundle import CertBundle
from certs.ca import MeshCA
from certs.spiffe import SpiffeId
from certs.tls import client_context
from hbone.limits import CLIENT_PREFACE
from tests.e2e.mesh import Mesh, socks5_connect
from tests.test_faults import Backend, read_exactly_then_eof, serve_echo
from tests.test_hardening_h2 import Raw

ECHO_PORT = 9080
# No shrink phase: every example against a live proxy may wait CLOSE_WAIT_S, so shrinking a failure
# would outlast the test timeout; the failing input is printed as found (it found the padded-DATA
# frame-size bug fixed in hbone/limits.py).
LIVE = settings(max_examples=int(os.environ.get("HBONE_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CONNECT_ANSWERS = {200, 400, 401, 431, 503}
SOCKS_REPLY_CODES = set(range(0, 9)) | {0xFF}

FUZZ_CONFIG = """# Everything in namespace "fuzz" on addresses the mesh never uses: a mutation can break this file
# but cannot make it about the workloads the health checks use.
workloads:
- uid: Kubernetes//v1/Pod/fuzz/a-0
  name: a-0
  namespace: fuzz
  serviceAccount: a
  workloadIps: ["10.99.0.1"]
  protocol: HBONE
  node: node-b
  labels: {app: a}
  services:
    fuzz/a.fuzz.svc.cluster.local: {80: 8080}
services:
- name: a
  namespace: fuzz
  hostname: a.fuzz.svc.cluster.local
  vips: ["/10.99.1.1"]
  ports: {80: 8080}
  appProtocols: {80: http}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a, namespace: fuzz}
spec:
  selector: {matchLabels: {app: a}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/fuzz/sa/b"]}}]
    to: [{operation: {ports: ["8080"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a, namespace: fuzz}
spec:
  hosts: [a.fuzz.svc.cluster.local]
  http:
  - match: [{uri: {prefix: /v2}}]
    route: [{destination: {host: a.fuzz.svc.cluster.local, subset: v2}, weight: 100}]
    retries: {attempts: 2, perTryTimeout: 1s, retryOn: connect-failure}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a, namespace: fuzz}
spec:
  host: a.fuzz.svc.cluster.local
  subsets: [{name: v2, labels: {version: v2}}]
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("fuzz"))
    try:
        mesh.start_proxies()
        mesh.backends.append(Backend(mesh.pod(21), ECHO_PORT, serve_echo))   # reviews-v1 (direct: TCP echo)
        mesh.http_backend(22, ECHO_PORT, b"reviews-v2")
        ca = MeshCA.load(mesh.ca_dir)
        ident = SpiffeId("cluster.local", "default", "bookinfo-productpage")
        mesh.ctx = client_context(CertBundle.from_issued(ca.issue(ident, now=datetime.now(timezone.utc)),
                                                         ca.root_cert_pem))
        yield mesh
    finally:
        mesh.close()


def healthy(m: Mesh) -> None:
    """Every process alive and ready; a good tunnel node-a → node-b carries bytes both ways."""
    for p in (m.node_a, m.node_b, m.waypoint):
        assert p.popen.poll() is None, f"{p.name} died:\n{p.logs()[-3000:]}"
        assert p.get("readiness", "/healthz/ready")[0] == 200, p.name
    s = socks5_connect(m.node_a.socks5, m.pod(21), ECHO_PORT, source_ip=m.pod(10))
    try:
        s.sendall(b"good tunnel")
        s.shutdown(socket.SHUT_WR)
        assert read_exactly_then_eof(s) == b"good tunnel"
    finally:
        s.close()


@pytest.fixture
def checked(live):
    healthy(live)
    yield live
    healthy(live)


# ---- CONNECT requests over a real HBONE connection ---------------------------------------------

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
_header = st.one_of(
    st.tuples(_token, st.text(max_size=40)),
    st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=60)),    # not even a token
    st.tuples(st.sampled_from([":path", ":scheme", ":protocol", "connection", "te", "forwarded", "baggage",
                               "traceparent", "host", "content-length"]), st.text(max_size=40)))


@st.composite
def authorities(draw):
    # POD21/POD22 are replaced by the pods' addresses after mutation (a mutated placeholder stays junk).
    good = draw(st.sampled_from(["POD21:9080", "POD21:15008", "POD22:9080", "[::1]:80"]))
    kind = draw(st.sampled_from(["valid", "mutated", "random", "bytes"]))
    if kind == "random":
        return draw(st.text(max_size=60))
    if kind == "bytes":
        return draw(st.binary(max_size=60))
    if kind == "mutated":
        pos = draw(st.integers(0, 12))
        junk = draw(st.text(min_size=0, max_size=4))
        return good[:pos] + junk + good[pos + draw(st.integers(0, 2)):]
    return good


@LIVE
@given(authority=authorities(), extra=st.lists(_header, max_size=4),
       method=st.sampled_from(["CONNECT", "CONNECT", "CONNECT", "GET", "connect", ""]))
def test_fuzzed_connect_requests_get_an_answer_in_the_expected_set(checked, authority, extra, method):
    m = checked
    if isinstance(authority, str):
        authority = authority.replace("POD21", m.pod(21)).replace("POD22", m.pod(22))
    c = Raw((m.pod(21), 15008), m.ctx)
    try:
        sid = c.new_sid()
        headers = [(":method", method), (":authority", authority), *extra]
        assert c.send(c.headers_frame(sid, headers))
        f = c.until(lambda f: isinstance(f, GoAwayFrame)
                    or (f.stream_id == sid and isinstance(f, (HeadersFrame, RstStreamFrame))), timeout=5)
        assert f is not None or c.closed, f"no answer to {headers!r}"
        if isinstance(f, HeadersFrame):
            assert int(f.headers[b":status"]) in CONNECT_ANSWERS, (headers, f.headers)
    finally:
        c.close()


# Zeros after the garbage: they complete whatever frame the garbage left open (our max frame size
# is 1 MiB; a larger declared length is refused on the header alone), then form DATA frames on
# stream 0, a connection error (RFC 9113 §6.1) — so the server must end every connection.
FRAME_FLUSH = b"\x00" * (1024 * 1024 + 64)
CLOSE_WAIT_S = 5.0


@LIVE
@given(garbage=st.binary(min_size=1, max_size=2048))
def test_random_bytes_after_the_preface_get_goaway_or_close(checked, garbage):
    m = checked
    c = Raw((m.pod(21), 15008), m.ctx)      # preface + SETTINGS, then the garbage
    try:
        c.send(garbage + FRAME_FLUSH)         # False if the server hung up first: fine
        g = c.goaway(timeout=CLOSE_WAIT_S)
        assert g is not None or c.closed, "the server kept a connection that sent a protocol error open"
    finally:
        c.close()


# ---- SOCKS5 ---------------------------------------------------------------------------------------

@LIVE
@given(garbage=st.one_of(st.binary(min_size=1, max_size=300),
                         st.binary(max_size=300).map(lambda b: b"\x05\x01\x00" + b),          # past the greeting
                         st.binary(max_size=40).map(lambda b: b"\x05\x01\x00\x05\x01\x00" + b)))  # a request
def test_random_bytes_into_socks5_get_socks_replies_or_close(checked, garbage):
    m = checked
    s = socket.socket()
    s.bind((m.pod(10), 0))
    s.settimeout(CLOSE_WAIT_S)
    ended = False
    try:
        s.connect(m.node_a.socks5)
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)   # no more bytes: a half-read greeting or request must end
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
            ended = True
        except ConnectionResetError:
            ended = True
        except (TimeoutError, socket.timeout):
            pass
    finally:
        s.close()
    assert ended, f"node-a kept a SOCKS5 connection open after {garbage!r} and EOF"
    if got:
        assert got[0] == 0x05, got                      # RFC 1928: every reply starts with VER 5
        if len(got) >= 2:
            assert got[1] in SOCKS_REPLY_CODES, got


# ---- HTTP/1.1 into the waypoint ------------------------------------------------------------------

GOOD_REQUEST = b"GET /reviews/1 HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent: fuzz\r\nContent-Length: 0\r\n\r\n"


@st.composite
def http_requests(draw):
    kind = draw(st.sampled_from(["mutated", "mutated", "random", "headers"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=1024)) + b"\r\n\r\n"
    if kind == "headers":
        lines = draw(st.lists(st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b),
                              max_size=8))
        return b"GET / HTTP/1.1\r\nHost: reviews\r\n" + b"\r\n".join(lines) + b"\r\n\r\n"
    data = bytearray(GOOD_REQUEST)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif len(data) > 1:
            del data[pos]
    return bytes(data)


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@LIVE
@given(request=http_requests())
@example(request=H2_PREFACE)   # hypothesis found it once: the preface alone, then EOF
def test_mutated_http1_requests_into_the_waypoint_get_an_http_answer_or_close(checked, request):
    m = checked
    s = socks5_connect(m.node_a.socks5, m.vip(20), 9080, source_ip=m.pod(10), timeout=5)
    try:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)     # no more bytes: a request waiting for a body gets EOF
        s.settimeout(5)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (TimeoutError, socket.timeout, ConnectionResetError):
            pass
    finally:
        s.close()
    if got and request.startswith(H2_PREFACE):
        # The mutation kept the HTTP/2 connection preface whole: the waypoint sniffs h2c (prior
        # knowledge, RFC 9113 §3.3) and answers in HTTP/2 — its SETTINGS frame comes first.
        assert got[3] == 0x4 and got[4] == 0 and got[5:9] == b"\0\0\0\0", got[:30]
    elif got:
        assert got.startswith(b"HTTP/1.1 "), got[:100]
        status = int(got[9:12])
        assert status == 200 or 400 <= status <= 599, got[:200]


# ---- configuration mutated, then SIGHUP --------------------------------------------------------

def _reloads(proc, result: str) -> float:
    status, body = proc.get("metrics", "/metrics")
    assert status == 200
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == "hbone_config_reloads_total" and s.labels.get("result") == result:
                return s.value
    return 0.0


@st.composite
def mutated_config(draw):
    data = bytearray(FUZZ_CONFIG.encode())
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup-line"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.sampled_from(list(b" :-[]{}\n\t'\"&*!|>%@`#,?0123456789az\x00\xff")))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 20))]
        else:
            lines = bytes(data).split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            data = bytearray(b"\n".join(lines))
    return bytes(data)


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=mutated_config())
def test_mutated_config_then_sighup_never_kills_the_process(checked, text):
    m = checked
    path = m.config_dir / "fuzz.yaml"
    before = {p.name: _reloads(p, "success") + _reloads(p, "failure") for p in (m.node_b, m.waypoint)}
    path.write_bytes(text)
    for p in (m.node_b, m.waypoint):
        p.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    for p in (m.node_b, m.waypoint):
        # SIGHUP always re-reads the config: either outcome is counted.
        while _reloads(p, "success") + _reloads(p, "failure") <= before[p.name]:
            assert p.popen.poll() is None, p.logs()[-3000:]
            assert time.monotonic() < deadline, f"{p.name} did not reload"
            time.sleep(0.05)
    healthy(m)
    assert "Traceback" not in m.node_b.logs() + m.waypoint.logs()


def test_config_fuzz_leaves_the_last_good_config_restorable(checked):
    """Runs after the mutations: the original file loads again and the mesh still works."""
    m = checked
    (m.config_dir / "fuzz.yaml").write_text(FUZZ_CONFIG)
    ok = _reloads(m.node_b, "success")
    m.node_b.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while _reloads(m.node_b, "success") <= ok:
        assert time.monotonic() < deadline, m.node_b.logs()[-2000:]
        time.sleep(0.05)
    assert _reloads(m.node_b, "failure") >= 1, "no mutation was ever rejected: the fuzzer did not fuzz"
