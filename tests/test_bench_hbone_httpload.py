"""benchmarks/hbone_httpload.c, the HTTP scenario's C load client (untimed).

Built the way the benchmark builds it (``benchmarks.cbuild``); skipped where there is no C compiler
or no OpenSSL headers, as the workers scenario's C client test is. Then:

- against a real waypoint (the demo's bookinfo: authz, DENY on ``x-deny``, 90/10 route) with our
  node proxy terminating its HBONE to the reviews pods: the split and the 403, closed and open loops
  whose counts agree with each other, tunnels spread over connections;
- plain mode through the real node-a's SOCKS5 listener (the ``ours`` rows' way in): the split and
  the 403 through all three proxies, the source IP it binds is the identity node-a picks (sleep's IP:
  the waypoint's 403; an IP that is no workload on node-a: SOCKS5 reply 0x02, a loud failure);
- against scripted SOCKS5 servers: every reply address type read whole before the HTTP bytes, and a
  refusal, a method refusal, a non-SOCKS answer or an EOF mid-handshake failing loudly;
- against a scripted HTTP/2 server on real mTLS: responses split anywhere across DATA frames,
  padded frames, chunked bodies, a 100 Continue in the same frame as its response, a send window
  the server opens late, PING answered, received window handed back;
- a server answering garbage, RST_STREAM, GOAWAY, a CONNECT 503, an unasked-for response or an EOF
  makes it fail loudly: exit 1 and the reason on stderr and in the JSON;
- the benchmark's own wp-only set-up (nghttpx as node-b), where nghttpx is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from datetime import datetime, timezone
from pathlib import Path

import hpack
import pytest

from benchmarks.cbuild import build_c
from proxy.demo.mesh import recv_exact   # (ConnectionError, an OSError, on a short read)

SOURCE = Path(__file__).parent.parent / "benchmarks" / "hbone_httpload.c"
CLIENT_TIMEOUT_S = 20.0
SERVER_TIMEOUT_S = 10.0

pytestmark = pytest.mark.skipif(
    not ((shutil.which("cc") or shutil.which("gcc")) and os.path.exists("/usr/include/openssl/ssl.h")),
    reason="no cc / OpenSSL headers (Debian libssl-dev): the C client cannot be built")


@pytest.fixture(scope="module")
def exe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hbl") / "hbone_httpload"
    why = build_c(SOURCE, path)
    assert why is None, why
    return path


def run(argv: list[str]) -> tuple[int, dict, str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, (json.loads(lines[-1]) if lines else {}), proc.stderr


def consistent(r: dict) -> None:
    """Every counted request has one status and one body key, and the rate is requests over wall."""
    assert r["errors"] == 0 and "error" not in r
    assert sum(r["statuses"].values()) == r["requests"] == sum(r["bodies"].values())
    assert r["rps"] == pytest.approx(r["requests"] / r["wall_s"], rel=1e-3)
    assert 0 < r["p50_ms"] <= r["p99_ms"]


# ----------------------------------------------------------------------------- a real waypoint


@pytest.mark.timeout(90)
def test_through_a_real_waypoint_split_deny_and_both_loops_and_node_a_socks5(exe, tmp_path):
    from benchmarks.http import DENY_POLICY
    from certs.ca import MeshCA
    from certs.spiffe import SpiffeId
    from proxy.demo import bookinfo as bi
    from proxy.demo.mesh import LoopbackMesh
    m = LoopbackMesh(tmp_path / "mesh")
    try:
        bi.write_config(m.layout, m.config_dir)
        m.write("bench-deny.yaml", DENY_POLICY)
        for name, body in (("reviews-v1-0", b"v1\n"), ("reviews-v2-0", b"v2\n")):
            m.http_backend(m.layout.pod_of(name).last, bi.APP_PORT, body)
        quiet = ("--access-log", "off", "--log-level", "warning")
        node_a = m.start_node("node-a", bi.INFRA["node-a"], extra=quiet, wait=False)
        m.start_node("node-b", bi.INFRA["node-b"], extra=quiet, wait=False)
        wp = m.start_waypoint(bi.INFRA["waypoint"], gateway=f"{bi.NAMESPACE}/{bi.GATEWAY}", pod_last=bi.WAYPOINT_POD,
                              extra=("--scope", bi.WAYPOINT_SCOPE, *quiet), wait=False)
        for p in m.procs:
            m.wait_ready(p)
        pp = m.layout.pod_of("productpage-v1-0")
        cert, key = MeshCA.load(m.ca_dir).issue(SpiffeId(bi.TRUST_DOMAIN, bi.NAMESPACE, pp.sa),
                                                now=datetime.now(timezone.utc)).write(tmp_path / "pp")
        base = [exe, "--connect", f"{m.layout.waypoint_ip}:15008",
                "--authority", f"{m.layout.service_vip('reviews')}:{bi.APP_PORT}", "--source-ip", m.layout.pod(pp.last),
                "--ca", m.ca_dir / "root-cert.pem", "--cert", cert, "--key", key, "--host", "reviews:9080",
                "--connect-header", f'forwarded: for="{m.layout.pod(pp.last)}:40000";host={bi.fqdn("reviews")}',
                "--cpu-pid", wp.popen.pid]

        rc, r, err = run(base + ["--count", "200", "--tunnels", "3"])
        assert rc == 0, err
        consistent(r)
        assert r["statuses"] == {"200": 200} and r["loop"] == "count" and r["connections"] == 1
        assert r["bodies"]["v1"] >= 150 and r["bodies"]["v2"] >= 5 and set(r["bodies"]) == {"v1", "v2"}
        assert r["pid_cpu_s"][str(wp.popen.pid)] > 0   # the waypoint worked for those 200 requests

        rc, r, err = run(base + ["--count", "1", "--header", "x-deny: 1"])
        assert rc == 0, err
        assert r["statuses"] == {"403": 1} and r["bodies"] == {"RBAC: access den": 1}

        rc, r, err = run(base + ["--tunnels", "8", "--streams-per-conn", "3", "--seconds", "0.5"])
        assert rc == 0, err
        consistent(r)
        assert r["loop"] == "closed" and r["connections"] == 3 and r["tunnels"] == 8
        assert r["requests"] > 8 and set(r["statuses"]) == {"200"} and r["bodies"].get("v2", 0) > 0

        rc, r, err = run(base + ["--rate", "200", "--tunnels", "4", "--seconds", "0.5"])
        assert rc == 0, err
        consistent(r)
        # Scheduled every 5 ms through 0.5 s: exactly the requests due in the window count.
        assert r["loop"] == "open" and 99 <= r["requests"] <= 101 and set(r["statuses"]) == {"200"}

        # Plain HTTP through node-a's SOCKS5 (the `ours` rows): client → node-a → HBONE → the
        # waypoint → HBONE → node-b → the reviews pods, from productpage's pod IP.
        vip = m.layout.service_vip("reviews")
        socks = [exe, "--plain", "--connect", f"{vip}:{bi.APP_PORT}", "--socks", f"{node_a.socks5[0]}:{node_a.socks5[1]}",
                 "--host", "reviews:9080"]
        rc, r, err = run(socks + ["--source-ip", m.layout.pod(pp.last), "--count", "200", "--tunnels", "3"])
        assert rc == 0, err
        consistent(r)
        assert r["client"] == "c-plain" and r["connections"] == 3 and r["statuses"] == {"200": 200}
        assert r["bodies"]["v1"] >= 150 and r["bodies"]["v2"] >= 5 and set(r["bodies"]) == {"v1", "v2"}
        rc, r, err = run(socks + ["--source-ip", m.layout.pod(pp.last), "--count", "1", "--header", "x-deny: 1"])
        assert rc == 0, err
        assert r["statuses"] == {"403": 1} and r["bodies"] == {"RBAC: access den": 1}
        rc, r, err = run(socks + ["--source-ip", m.layout.pod(pp.last), "--tunnels", "4", "--seconds", "0.3"])
        assert rc == 0, err
        consistent(r)
        assert r["loop"] == "closed" and r["requests"] > 4 and set(r["statuses"]) == {"200"}
        # The bound source IP is the identity: sleep (on node-a, not allowed to call reviews) gets the
        # waypoint's authz 403 on the same path ...
        rc, r, err = run(socks + ["--source-ip", m.layout.pod(m.layout.pod_of("sleep-0").last), "--count", "1"])
        assert rc == 0, err
        assert r["statuses"] == {"403": 1}
        # ... and an address that is no workload on node-a is refused by node-a itself (RFC 1928 reply
        # 0x02, ruleset): a loud failure, not a row of zeros.
        stranger = m.layout.pod(m.layout.pod_of("reviews-v1-0").last)   # a pod of node-b
        rc, r, err = run(socks + ["--source-ip", stranger, "--count", "1"])
        says = f"CONNECT to {vip}:{bi.APP_PORT} refused: reply 0x02 (not allowed by ruleset)"
        assert rc == 1 and says in err and says in r["error"] and r["errors"] == 1 and r["requests"] == 0, (err, r)
    finally:
        m.close()


# ----------------------------------------------------------------------------- a scripted HTTP/2 server

DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, ACK, END_HEADERS, PADDED = 1, 1, 4, 8
OK_CL = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nv1\n"
OK_CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nv\r\n2;ext=1\r\n2\n\r\n0\r\nX-T: 1\r\n\r\n"


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack("!I", len(payload))[1:] + bytes([kind, flags]) + struct.pack("!I", sid) + payload


class Peer:
    """The server side of one accepted mTLS connection, frame by frame; keeps what the client sent."""

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock
        self.buf = b""
        self.seen: list[tuple[int, int, int, bytes]] = []

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def frame(self) -> tuple[int, int, int, bytes]:
        self._fill(9)
        n = int.from_bytes(self.buf[:3], "big")
        self._fill(9 + n)
        kind, flags, sid = self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
        f = (kind, flags, sid, self.buf[9:9 + n])
        self.buf = self.buf[9 + n:]
        self.seen.append(f)
        return f

    def until(self, kind: int, count: int = 1) -> list[tuple[int, int, int, bytes]]:
        out = []
        while len(out) < count:
            f = self.frame()
            if f[0] == kind:
                out.append(f)
        return out

    def drain(self) -> None:
        """Read until the client goes away."""
        try:
            while True:
                self.frame()
        except (EOFError, OSError):
            pass

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from certs.ca import MeshCA
    from certs.spiffe import SpiffeId
    d = tmp_path_factory.mktemp("pki")
    now = datetime.now(timezone.utc)
    ca = MeshCA.init(d / "ca", trust_domain="cluster.local", now=now)
    server = ca.issue(SpiffeId("cluster.local", "default", "server"), now=now).write(d / "server")
    client = ca.issue(SpiffeId("cluster.local", "default", "client"), now=now).write(d / "client")
    return d / "ca" / "root-cert.pem", server, client


def converse(exe: Path, pki, script, *client_args: str) -> tuple[int, dict, str, Peer | None, BaseException | None]:
    """Run the client against a one-connection mTLS h2 server that plays ``script(peer)``."""
    ca, (scert, skey), (ccert, ckey) = pki
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(scert, skey)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SERVER_TIMEOUT_S)
    port = listener.getsockname()[1]
    box: dict = {}

    def serve():
        try:
            raw, _ = listener.accept()
            raw.settimeout(SERVER_TIMEOUT_S)
            with ctx.wrap_socket(raw, server_side=True) as sock:
                assert sock.selected_alpn_protocol() == "h2" and sock.version() == "TLSv1.3"
                peer = box["peer"] = Peer(sock)
                peer._fill(24)
                assert peer.buf[:24] == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                peer.buf = peer.buf[24:]
                script(peer)
                peer.drain()
        except BaseException as err:   # reported by the test, not lost in the thread
            box["error"] = err

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        rc, r, err = run([exe, "--connect", f"127.0.0.1:{port}", "--authority", "127.0.0.9:9080", "--ca", ca,
                          "--cert", ccert, "--key", ckey, *client_args])
    finally:
        t.join(SERVER_TIMEOUT_S)
        listener.close()
    return rc, r, err, box.get("peer"), box.get("error")


def open_tunnels(peer: Peer, n: int) -> list[int]:
    peer.send(frame(SETTINGS, 0, 0))
    heads = peer.until(HEADERS, n)
    sids = [f[2] for f in heads]
    peer.send(*(frame(HEADERS, END_HEADERS, sid, b"\x88") for sid in sids))
    return sids


def test_responses_split_anywhere_padded_chunked_and_interim(exe, pki):
    def script(peer: Peer):
        s1, s3 = open_tunnels(peer, 2)
        assert peer.until(DATA, 2)[0][3].startswith(b"GET / HTTP/1.1\r\nHost: 127.0.0.9:9080\r\n")
        # Round 1, both in one write: stream 1's head cut inside CRLFCRLF and its body in a padded
        # frame; stream 3 chunked ("v" + "2\n", a chunk extension and a trailer), cut inside a chunk-size line.
        a, b = OK_CL[:18], OK_CL[18:36]
        c = OK_CL[36:]
        peer.send(frame(DATA, 0, s1, a), frame(DATA, 0, s3, OK_CHUNKED[:48]), frame(DATA, 0, s1, b),
                  frame(DATA, PADDED, s1, bytes([4]) + c + b"\0" * 4), frame(DATA, 0, s3, OK_CHUNKED[48:]))
        peer.until(DATA, 2)
        # Round 2: a 100 Continue and the response in one frame; a byte-by-byte response.
        peer.send(frame(DATA, 0, s1, b"HTTP/1.1 100 Continue\r\n\r\n" + OK_CL.replace(b"v1", b"v2")))
        peer.send(*(frame(DATA, 0, s3, OK_CL[i:i + 1]) for i in range(len(OK_CL))))

    rc, r, err, peer, server_error = converse(exe, pki, script, "--count", "4", "--tunnels", "2")
    assert server_error is None, server_error
    assert rc == 0, err
    consistent(r)
    assert r["statuses"] == {"200": 4} and r["bodies"] == {"v1": 2, "v2": 2}   # the chunked one says v2
    settings = [f for f in peer.seen if f[0] == SETTINGS and not f[1] & ACK]
    assert settings and struct.unpack("!HI", settings[0][3][:6]) == (2, 0)   # ENABLE_PUSH = 0 first
    assert any(f[0] == SETTINGS and f[1] & ACK for f in peer.seen)          # ours acknowledged


def test_send_window_opened_late_ping_answered_and_window_handed_back(exe, pki):
    big = b"big\n" + b"x" * (1536 * 1024 - 4)     # 1.5 MiB: more than the client's 1 MiB hand-back step

    def script(peer: Peer):
        # Stream windows of 10 bytes: the ~60-byte request must wait for our WINDOW_UPDATE.
        peer.send(frame(SETTINGS, 0, 0, struct.pack("!HI", 4, 10)), frame(PING, 0, 0, b"12345678"))
        (_, _, sid, _), = peer.until(HEADERS)
        peer.send(frame(HEADERS, END_HEADERS, sid, b"\x88"))
        pong = peer.until(PING)[0]
        assert pong[1] & ACK and pong[3] == b"12345678"
        peer.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            peer.until(DATA)     # nothing may be sent beyond the window
        peer.sock.settimeout(SERVER_TIMEOUT_S)
        peer.send(frame(WINDOW_UPDATE, 0, sid, struct.pack("!I", 1000)))
        peer.until(DATA)
        body = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
        peer.send(*(frame(DATA, 0, sid, body[i:i + 16384]) for i in range(0, len(body), 16384)))

    rc, r, err, peer, server_error = converse(exe, pki, script, "--count", "1")
    assert server_error is None, server_error
    assert rc == 0, err
    assert r["statuses"] == {"200": 1} and r["bodies"] == {"big": 1}
    updates = [(f[2], struct.unpack("!I", f[3])[0]) for f in peer.seen if f[0] == WINDOW_UPDATE]
    assert updates[0] == (0, 2 ** 30)    # the connection window raised at the start
    # ... and the 1.5 MiB received handed back in 1 MiB steps, on the stream and on the connection.
    assert (1, 1024 * 1024) in updates[1:] and (0, 1024 * 1024) in updates[1:], updates


def _answer_then(*frames_after_request: bytes):
    def script(peer: Peer):
        (sid,) = open_tunnels(peer, 1)
        peer.until(DATA)
        peer.send(*frames_after_request)
    return script


def _close(peer: Peer):
    open_tunnels(peer, 1)
    peer.until(DATA)
    peer.sock.close()


@pytest.mark.parametrize("script, says", [
    (lambda peer: peer.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"), "not speaking HTTP/2"),
    (lambda peer: peer.send(frame(PING, 0, 0, b"x" * 8)), "did not open with SETTINGS"),
    (_answer_then(frame(RST, 0, 1, struct.pack("!I", 2))), "stream 1 reset by the server (RST_STREAM, error code 2)"),
    (lambda peer: peer.send(frame(SETTINGS, 0, 0), frame(GOAWAY, 0, 0, struct.pack("!II", 0, 11) + b"calm")),
     "GOAWAY from the server (last stream 0, error code 11: calm)"),
    (lambda peer: (peer.send(frame(SETTINGS, 0, 0)), peer.until(HEADERS),
                   peer.send(frame(HEADERS, END_HEADERS, 1, hpack.Encoder().encode([(":status", "503")])))),
     "CONNECT on stream 1 answered 503"),
    (_answer_then(frame(DATA, 0, 1, OK_CL + OK_CL)), "response bytes without a request"),
    (_answer_then(frame(DATA, 0, 1, b"SSH-2.0-OpenSSH\r\n\r\n")), "not an HTTP/1.1 response"),
    (_answer_then(frame(DATA, END_STREAM, 1, OK_CL)), "tunnel 1 ended by the server"),
    (_close, "closed the HBONE connection"),
], ids=["garbage", "no-settings", "rst", "goaway", "connect-503", "unasked-response", "not-http", "end-stream", "eof"])
def test_a_misbehaving_server_makes_it_fail_loudly(exe, pki, script, says):
    rc, r, err, _, server_error = converse(exe, pki, script, "--count", "3")
    assert rc == 1, (r, err)
    assert says in err and says in r["error"] and r["errors"] == 1, (err, r)
    assert server_error is None or isinstance(server_error, OSError), server_error


# ----------------------------------------------------------------------------- plain mode


def test_plain_mode_closed_and_open_loops(exe, tmp_path):
    from proxy.demo.mesh import HttpBackend
    backend = HttpBackend("127.0.0.1", 0, b"v1\n")
    port = backend.server.server_address[1]
    try:
        rc, r, err = run([exe, "--plain", "--connect", f"127.0.0.1:{port}", "--tunnels", "2", "--seconds", "0.3"])
        assert rc == 0, err
        consistent(r)
        assert r["client"] == "c-plain" and r["connections"] == 2 and r["requests"] > 0 and r["bodies"] == {"v1": r["requests"]}
        rc, r, err = run([exe, "--plain", "--connect", f"127.0.0.1:{port}", "--rate", "100", "--seconds", "0.3"])
        assert rc == 0, err
        consistent(r)
        assert 29 <= r["requests"] <= 31
    finally:
        backend.close()
    rc, r, err = run([exe, "--plain", "--connect", f"127.0.0.1:{port}", "--count", "1"])
    assert rc == 1 and "connect to 127.0.0.1" in err


# ----------------------------------------------------------------------------- SOCKS5, scripted


def socks_converse(exe: Path, script, *client_args: str) -> tuple[int, dict, str, list, BaseException | None]:
    """Run the client in plain mode through a one-connection SOCKS5 server that plays ``script(conn,
    seen)`` (seen: what it read, for the test); the client asks for 10.1.2.3:9080 from 127.0.0.1."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(SERVER_TIMEOUT_S)
    port = listener.getsockname()[1]
    seen: list = []
    box: dict = {}

    def serve():
        try:
            conn, peer = listener.accept()
            seen.append(peer[0])
            with conn:
                conn.settimeout(SERVER_TIMEOUT_S)
                script(conn, seen)
        except BaseException as err:   # reported by the test, not lost in the thread
            box["error"] = err

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        rc, r, err = run([exe, "--plain", "--connect", "10.1.2.3:9080", "--socks", f"127.0.0.1:{port}",
                          "--source-ip", "127.0.0.1", *client_args])
    finally:
        t.join(SERVER_TIMEOUT_S)
        listener.close()
    return rc, r, err, seen, box.get("error")


def socks_handshake(conn: socket.socket, seen: list, reply: bytes) -> None:
    seen.append(recv_exact(conn, 3))
    conn.sendall(b"\x05\x00")
    seen.append(recv_exact(conn, 10))
    for i in range(len(reply)):   # byte by byte: the client must read the reply whole, wherever it splits
        conn.sendall(reply[i:i + 1])


@pytest.mark.parametrize("bound", [
    b"\x01" + socket.inet_aton("127.0.0.1") + b"\x9c\x40",
    b"\x03\x09node-a.lo" + b"\x9c\x40",
    b"\x04" + socket.inet_pton(socket.AF_INET6, "::1") + b"\x9c\x40",
], ids=["ipv4", "domain", "ipv6"])
def test_socks5_handshake_bytes_and_every_reply_address_type(exe, bound):
    def script(conn, seen):
        socks_handshake(conn, seen, b"\x05\x00\x00" + bound)
        for _ in range(2):   # then the tunnel: the server's bytes start right after the reply
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += conn.recv(1)
            seen.append(head)
            conn.sendall(OK_CL)

    rc, r, err, seen, server_error = socks_converse(exe, script, "--count", "2", "--host", "reviews:9080")
    assert server_error is None, server_error
    assert rc == 0, err
    assert r["statuses"] == {"200": 2} and r["bodies"] == {"v1": 2} and r["connections"] == 1
    # From --source-ip; RFC 1928: greeting (v5, one method, no auth), CONNECT to IPv4 10.1.2.3:9080.
    assert seen[:3] == ["127.0.0.1", b"\x05\x01\x00", b"\x05\x01\x00\x01\x0a\x01\x02\x03\x23\x78"]
    assert seen[3] == b"GET / HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent: hbone-bench\r\n\r\n"


def _refuse(code: int):
    return lambda conn, seen: socks_handshake(conn, seen, bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))


def _method_refused(conn, seen):
    recv_exact(conn, 3)
    conn.sendall(b"\x05\xff")   # RFC 1928 3: no acceptable methods


def _not_socks(conn, seen):
    recv_exact(conn, 3)
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")


def _eof_mid_reply(conn, seen):
    recv_exact(conn, 3)
    conn.sendall(b"\x05\x00")
    recv_exact(conn, 10)
    conn.sendall(b"\x05\x00")


@pytest.mark.parametrize("script, says", [
    (_refuse(5), "CONNECT to 10.1.2.3:9080 refused: reply 0x05 (connection refused)"),
    (_refuse(2), "CONNECT to 10.1.2.3:9080 refused: reply 0x02 (not allowed by ruleset)"),
    (_refuse(0x7f), "refused: reply 0x7f (unassigned)"),
    (_method_refused, "refused 'no authentication' (answered 05 ff)"),
    (_not_socks, "refused 'no authentication' (answered 48 54)"),
    (_eof_mid_reply, "closed the connection during the handshake"),
], ids=["refused", "ruleset", "unassigned", "method", "not-socks", "eof"])
def test_a_socks5_refusal_makes_it_fail_loudly(exe, script, says):
    rc, r, err, _, server_error = socks_converse(exe, script, "--tunnels", "2", "--seconds", "0.3")
    assert server_error is None, server_error
    assert rc == 1, (r, err)
    assert says in err and says in r["error"] and r["errors"] == 1 and r["requests"] == 0, (err, r)


def test_socks_is_for_plain_mode_and_wants_an_ipv4_address(exe):
    rc, _, err = run([exe, "--connect", "127.0.0.1:1", "--socks", "127.0.0.1:2", "--authority", "a:1", "--ca", "x",
                      "--cert", "x", "--key", "x"])
    assert rc == 2 and "--socks is for --plain" in err
    rc, _, err = run([exe, "--plain", "--connect", "127.0.0.1:1", "--socks", "node-a:15080"])
    assert rc == 2 and "--socks IPv4:PORT" in err


# ----------------------------------------------------------------------------- the benchmark's set-up


@pytest.mark.timeout(90)
@pytest.mark.skipif(shutil.which("nghttpx") is None, reason="nghttpx (Debian nghttp2-proxy) not installed")
def test_wp_only_rows_measure_the_waypoint_alone(exe, tmp_path):
    from benchmarks.http import (C_CLIENT, NoWaypoint, WaypointL4, WaypointOnly, _measure_c, run_c_client,
                                 waypoint_only_notes)
    from benchmarks.report import Row, ScenarioResult
    wp = WaypointOnly(tmp_path, shutil.which("nghttpx"), exe)
    try:
        wp.check_split_and_deny()
        row = Row("wp-only", f"{C_CLIENT} c=4")
        _measure_c(row, wp, 0.5, exe)
        l4 = WaypointL4(wp)
        l4.check()
        l4_row = Row("wp-l4", f"{C_CLIENT} c=4")
        _measure_c(l4_row, l4, 0.5, exe)
        base = Row("no-waypoint", f"{C_CLIENT} c=4")
        _measure_c(base, NoWaypoint(wp), 0.5, exe)
        # The L4 service is TCP: an x-deny header means nothing there (the DENY rule targets reviews only).
        l4_denied = run_c_client(wp.l4_argv("--count", "3", "--header", "x-deny: 1"))
    finally:
        wp.close()
    assert row.note is None and base.note is None and l4_row.note is None
    # wp-l4: the same waypoint process (its CPU is the proxy's), no L7 — the x-deny rule does not apply, and
    # each tunnel goes to one pod (reviews-v1 or -v2), whichever the TCP chain picked.
    assert l4_row.samples["proxy_us_per_req"] == l4_row.samples["waypoint_us_per_req"]
    assert l4_row.samples["rps"][0] > 0 and set(l4_row.info["bodies"]) <= {"v1", "v2"}
    assert l4_denied["statuses"] == {"200": 3}
    for metric in ("rps", "p99_ms", "proxy_us_per_req", "waypoint_us_per_req", "nghttpx_us_per_req",
                   "backend_us_per_req", "client_us_per_req"):
        assert row.samples[metric][0] > 0, metric
    assert row.samples["proxy_us_per_req"] == row.samples["waypoint_us_per_req"]   # the waypoint alone
    assert set(row.info["bodies"]) == {"v1", "v2"}
    # Without the waypoint: reviews-v1 only, and the only proxy left is nghttpx.
    assert set(base.info["bodies"]) == {"v1"} and "waypoint_us_per_req" not in base.samples
    assert base.samples["proxy_us_per_req"] == base.samples["nghttpx_us_per_req"]
    notes = waypoint_only_notes(ScenarioResult("http", "t", [], rows=[row, base]))
    assert notes[0].startswith("wp-only backend") and notes[1].startswith("added p50 / p99 hop for hop")


@pytest.mark.timeout(90)
def test_ours_rows_drive_the_three_proxy_mesh_through_node_a_socks5(exe, tmp_path):
    """The benchmark's ``ours`` set-up (node-a, the waypoint and node-b started by the package's
    launcher, nginx as the reviews pods) measured by the C client through node-a's SOCKS5: proxy CPU is
    all three proxies, the waypoint's share its own column, both loops."""
    from benchmarks.http import C_CLIENT, FIXED_RATE, OursMesh, _measure_c
    from benchmarks.report import Row
    from benchmarks.tools import which
    nginx = which("nginx")
    if nginx is None:
        pytest.skip("needs nginx (Debian nginx-light) for the reviews backends")
    ours = OursMesh(tmp_path, nginx)
    try:
        ours.check_split_and_deny()
        closed, rate = Row("ours", f"{C_CLIENT} c=4"), Row("ours", f"{C_CLIENT} {FIXED_RATE}/s")
        _measure_c(closed, ours, 0.5, exe)
        _measure_c(rate, ours, 0.5, exe)
    finally:
        ours.close()
    for row in (closed, rate):
        assert row.note is None
        assert set(row.info["bodies"]) == {"v1", "v2"}
        proxy, waypoint = row.samples["proxy_us_per_req"][0], row.samples["waypoint_us_per_req"][0]
        assert proxy > waypoint > 0 and row.samples["client_us_per_req"][0] > 0
        assert "nghttpx_us_per_req" not in row.samples
    # Open loop at 1 000/s for 0.5 s: the requests due in the window, no more.
    assert 0.5 * FIXED_RATE * 0.99 <= rate.samples["rps"][0] * 0.5 <= 0.5 * FIXED_RATE * 1.01 + 1


def test_waypoint_notes_subtract_the_ends_and_direct():
    from benchmarks.http import waypoint_only_notes
    from benchmarks.report import Row, ScenarioResult

    def row(target, p50, p99, **more):
        r = Row(target, "c-load 1000/s")
        for k, v in dict(p50_ms=p50, p99_ms=p99, **more).items():
            r.add(k, v)
        return r
    res = ScenarioResult("http", "t", [], rows=[
        row("direct", 0.05, 0.10), row("nginx", 0.09, 0.20), row("wp-only", 0.45, 0.90, backend_us_per_req=30),
        row("no-waypoint", 0.25, 0.50)])
    backend, added = waypoint_only_notes(res)
    assert backend == "wp-only backend (benchmarks.connect_http, Python) CPU µs/req: 1000/s 30"
    assert added.endswith("1000/s: waypoint +0.20 / +0.40 ms, nginx +0.04 / +0.10")
