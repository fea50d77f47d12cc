"""Issue 8 "Faults", against live ``hbone-proxy run`` subprocesses (node-a, node-b, the reviews waypoint)
over real mTLS on loopback: every fault gets its answer, and no byte stream is ever truncated silently.

* upstream refused (the pod's port is closed) → CONNECT 503 / SOCKS5 "connection refused" with flag
  ``UF`` — node inbound, node outbound (a pod outside the mesh), waypoint TCP; HTTP 503 ``UF,URX``
  (Envoy's body) through the waypoint, whose default retry policy retries connect failures;
* upstream reset mid-stream (the backend sends part, then RST with SO_LINGER 0) → the client's TCP
  connection is reset, never a clean EOF after a short stream; likewise a client reset reaches the
  backend as a reset; an HTTP response cut mid-body resets the client connection;
* black-holed upstream (a listener whose accept queue is full drops SYNs: loopback only, no external
  traffic) → 503 ``UF`` within the DestinationRule's ``connectTimeout`` (1 s here) at the waypoint,
  within ztunnel's 10 s at the node proxy (marked slow);
* a node proxy or the waypoint SIGKILLed mid-traffic → in-flight tunnels are reset at the client (not
  cleanly ended), and once it is restarted new tunnels succeed (the client side's pool drops the dead
  connection).

The helpers here (backends that misbehave on purpose, ``fd_count``/``rss_kib``/``close_wait``) are
shared with the soak, spoofing and live-fuzz tests.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import make_mesh  # noqa: F401 - the fixture: meshes cleaned up even on failure
from tests.e2e.mesh import Mesh, SocksError, SocksHTTPConnection, get, socks5_connect

KiB, MiB = 1024, 1024 * 1024
SOCKS_CONNECTION_REFUSED, SOCKS_HOST_UNREACHABLE = 0x05, 0x04
# What the backends that cut a stream send before their RST: several TLS records and h2 DATA frames'
# worth, so the cut lands mid-stream at every hop, yet below every window so nothing blocks.
CUT_AFTER_BYTES = 64 * KiB
# The HTTP response that is cut: it announces more than it sends.
CUT_BODY_ANNOUNCED = 200 * KiB
# DestinationRule connectTimeout for the black-hole services (Istio's default is 10 s).
SHORT_CONNECT_TIMEOUT_S = 1.0
# How long an answer may take beyond the connect timeout on a loaded 2-core box.
ANSWER_SLACK_S = 4.0
# An access-log line may lag the answer (written after the tunnel closes).
LOG_SETTLE_S = 10.0

# Ports on the faulty pod (node-b, HBONE) and on the legacy pod (node-b, not in the mesh).
CLOSED, RESET, BLACKHOLE, SINK, ECHO, HTTP_CUT, HTTP_CLOSED = 7000, 7001, 7002, 7003, 7004, 8080, 8082
HTTP_OK = 8081
# A port with no appProtocol: the waypoint sniffs it, so its 200 goes out before the upstream is dialled.
SNIFFED_CLOSED = 7005

FAULTS_YAML = f"""
workloads:
- uid: Kubernetes//v1/Pod/default/faulty-0
  name: faulty-0
  namespace: default
  serviceAccount: faulty
  workloadIps: ["127.1.0.50"]
  protocol: HBONE
  node: node-b
  labels: {{app: faulty}}
  services:
    default/faults.default.svc.cluster.local: {{{CLOSED}: {CLOSED}, {RESET}: {RESET}, {BLACKHOLE}: {BLACKHOLE}, {SINK}: {SINK}, {ECHO}: {ECHO}}}
    default/faults-wp.default.svc.cluster.local: {{{CLOSED}: {CLOSED}, {RESET}: {RESET}, {BLACKHOLE}: {BLACKHOLE}, {SINK}: {SINK}, {ECHO}: {ECHO}, {HTTP_CUT}: {HTTP_CUT}, {HTTP_OK}: {HTTP_OK}, {HTTP_CLOSED}: {HTTP_CLOSED}, {SNIFFED_CLOSED}: {SNIFFED_CLOSED}}}
- uid: Kubernetes//v1/Pod/default/legacy-0
  name: legacy-0
  namespace: default
  serviceAccount: legacy
  workloadIps: ["127.1.0.60"]
  protocol: TCP
  node: node-b
  labels: {{app: legacy}}
  services:
    default/legacy-wp.default.svc.cluster.local: {{{CLOSED}: {CLOSED}, {BLACKHOLE}: {BLACKHOLE}}}
services:
- name: faults
  namespace: default
  hostname: faults.default.svc.cluster.local
  vips: ["/127.2.0.50"]
  ports: {{{CLOSED}: {CLOSED}, {RESET}: {RESET}, {BLACKHOLE}: {BLACKHOLE}, {SINK}: {SINK}, {ECHO}: {ECHO}}}
  appProtocols: {{{CLOSED}: tcp, {RESET}: tcp, {BLACKHOLE}: tcp, {SINK}: tcp, {ECHO}: tcp}}
- name: faults-wp
  namespace: default
  hostname: faults-wp.default.svc.cluster.local
  vips: ["/127.2.0.51"]
  ports: {{{CLOSED}: {CLOSED}, {RESET}: {RESET}, {BLACKHOLE}: {BLACKHOLE}, {SINK}: {SINK}, {ECHO}: {ECHO}, {HTTP_CUT}: {HTTP_CUT}, {HTTP_OK}: {HTTP_OK}, {HTTP_CLOSED}: {HTTP_CLOSED}, {SNIFFED_CLOSED}: {SNIFFED_CLOSED}}}
  appProtocols: {{{CLOSED}: tcp, {RESET}: tcp, {BLACKHOLE}: tcp, {SINK}: tcp, {ECHO}: tcp, {HTTP_CUT}: http, {HTTP_OK}: http, {HTTP_CLOSED}: http}}
  waypoint: {{destination: "default/reviews-waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
- name: legacy-wp
  namespace: default
  hostname: legacy-wp.default.svc.cluster.local
  vips: ["/127.2.0.60"]
  ports: {{{CLOSED}: {CLOSED}, {BLACKHOLE}: {BLACKHOLE}}}
  appProtocols: {{{CLOSED}: tcp, {BLACKHOLE}: tcp}}
  waypoint: {{destination: "default/reviews-waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
""" + "".join(f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: default}}
spec:
  host: {name}.default.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp: {{connectTimeout: {SHORT_CONNECT_TIMEOUT_S:g}s}}
""" for name in ("faults-wp", "legacy-wp"))   # the black-hole services' short connect timeout


# ---------------------------------------------------------------------------------------------
# Backends that misbehave on purpose (threads; each closes what it opened)


def hard_close(sock: socket.socket) -> None:
    """Close with SO_LINGER {on, 0}: the kernel sends RST instead of FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Backend:
    """A listener whose per-connection behaviour is ``serve(conn)``; it records how each ended."""

    def __init__(self, ip: str, port: int, serve, *, backlog: int = 128):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(backlog)
        self.serve = serve
        self.accepted = 0
        self.endings: list[tuple[str, int]] = []   # ("eof" | "reset", bytes read)
        self.closed = False
        self.conns: set[socket.socket] = set()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.add(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.serve(self, conn)
        except OSError:
            pass
        finally:
            self.conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def read_all(self, conn: socket.socket) -> tuple[str, int]:
        n = 0
        try:
            while chunk := conn.recv(256 * KiB):
                n += len(chunk)
        except ConnectionResetError:
            self.endings.append(("reset", n))
            return "reset", n
        self.endings.append(("eof", n))
        return "eof", n

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve_reset_mid_stream(b: Backend, conn: socket.socket) -> None:
    conn.sendall(os.urandom(CUT_AFTER_BYTES))
    time.sleep(0.2)   # let the bytes leave: the cut must land mid-stream, not before the first byte
    hard_close(conn)


def serve_read_all(b: Backend, conn: socket.socket) -> None:
    """Read until EOF or reset (recording which); answer nothing."""
    b.read_all(conn)
    conn.shutdown(socket.SHUT_WR)


def serve_echo(b: Backend, conn: socket.socket) -> None:
    while data := conn.recv(256 * KiB):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def serve_http_cut(b: Backend, conn: socket.socket) -> None:
    """Reads one request head, answers a 200 announcing more body than it sends, then RSTs."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(64 * KiB)
        if not chunk:
            return
        head += chunk
    chunked = b"chunked" in head.split(b"\r\n", 1)[0]   # GET /chunked: a chunked body cut mid-chunk
    if chunked:
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{CUT_BODY_ANNOUNCED:x}\r\n".encode() + b"x" * CUT_AFTER_BYTES)
    else:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {CUT_BODY_ANNOUNCED}\r\n\r\n".encode()
                     + b"x" * CUT_AFTER_BYTES)
    time.sleep(0.2)
    hard_close(conn)


class BlackHole:
    """A listener that never accepts, with its accept queue filled: the kernel drops further SYNs, so
    a connect to it hangs until the caller's timeout — a black-holed address, on loopback."""

    FILLERS = 4   # listen(0) queues one connection; the rest sit in SYN_SENT, keeping the queue full

    def __init__(self, ip: str, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(0)
        self.fillers = []
        for _ in range(self.FILLERS):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect((ip, port))
            except BlockingIOError:
                pass
            self.fillers.append(c)
        time.sleep(0.1)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect((ip, port))
            raise AssertionError("the black hole accepted a connection")
        except TimeoutError:
            pass
        finally:
            probe.close()

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Process facts (shared with the soak test)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
              "0B": "CLOSING"}


def socket_states(pid: int) -> dict[str, int]:
    """State → count of the TCP sockets this process holds (its fds' inodes, looked up in
    /proc/<pid>/net/tcp{,6}, which lists the whole network namespace)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    states: dict[str, int] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[9] in inodes:
                name = TCP_STATES.get(cols[3], cols[3])
                states[name] = states.get(name, 0) + 1
    return states


# ---------------------------------------------------------------------------------------------
# Client-side helpers


def read_until_end(sock: socket.socket, timeout: float = 15.0) -> tuple[str, int]:
    """Read until the connection ends: ("eof" | "reset", bytes read)."""
    sock.settimeout(timeout)
    n = 0
    try:
        while chunk := sock.recv(256 * KiB):
            n += len(chunk)
    except ConnectionResetError:
        return "reset", n
    return "eof", n


def echo_ok(mesh: Mesh, node, host: str, port: int, source: int = 10, payload: bytes = b"still serving") -> None:
    s = socks5_connect(node.socks5, host, port, source_ip=mesh.pod(source))
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert read_exactly_then_eof(s) == payload
    finally:
        s.close()


def read_exactly_then_eof(sock: socket.socket, timeout: float = 15.0) -> bytes:
    sock.settimeout(timeout)
    buf = bytearray()
    while chunk := sock.recv(256 * KiB):
        buf += chunk
    return bytes(buf)


def socks_refusal(mesh: Mesh, node, host: str, port: int, source: int = 10, timeout: float = 30.0) -> int:
    with pytest.raises(SocksError) as err:
        socks5_connect(node.socks5, host, port, source_ip=mesh.pod(source), timeout=timeout).close()
    return err.value.code


def wait_log(proc, pred, what: str, timeout: float = LOG_SETTLE_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        hits = [line for line in proc.access_lines() if pred(line)]
        if hits:
            return hits[-1]
        assert time.monotonic() < deadline, f"no access-log line for {what} in {proc.name}:\n" \
                                            f"{proc.access_lines()[-5:]}"
        time.sleep(0.05)


def field_of(line: dict, key: str):
    """An access-log field by its Python-friendly name: ``dst_hbone_addr`` is ``dst.hbone_addr``."""
    return line[key] if key in line else line.get(key.replace("_", ".", 1))


def has(line: dict, **kv) -> bool:
    return all(str(field_of(line, k)) == str(v) for k, v in kv.items())


# ---------------------------------------------------------------------------------------------
# The mesh of the non-destructive fault tests


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("faults"), extra_yaml=(FAULTS_YAML,))
    holes: list[BlackHole] = []
    try:
        mesh.start_proxies()
        faulty, legacy = mesh.pod(50), mesh.pod(60)
        mesh.reset = Backend(faulty, RESET, serve_reset_mid_stream)
        mesh.legacy_reset = Backend(legacy, RESET, serve_reset_mid_stream)
        mesh.sink = Backend(faulty, SINK, serve_read_all)
        mesh.echo = Backend(faulty, ECHO, serve_echo)
        mesh.http_cut = Backend(faulty, HTTP_CUT, serve_http_cut)
        mesh.backends += [mesh.reset, mesh.legacy_reset, mesh.sink, mesh.echo, mesh.http_cut]
        holes += [BlackHole(faulty, BLACKHOLE), BlackHole(legacy, BLACKHOLE)]
        yield mesh
    finally:
        for h in holes:
            h.close()
        mesh.close()


# ---- upstream refused -------------------------------------------------------------------------

def test_refused_node_inbound_answers_503_uf(faults):
    m = faults
    # node-a → HBONE → node-b; node-b's connect to faulty-0:7000 is refused: CONNECT 503 (ztunnel).
    assert socks_refusal(m, m.node_a, m.vip(50), CLOSED) == SOCKS_CONNECTION_REFUSED
    line = wait_log(m.node_b, lambda l: has(l, dst_hbone_addr=f"{m.pod(50)}:{CLOSED}", status=503),
                    "the refused inbound tunnel")
    assert line["response_flags"] == "UF" and "refused" in line["error"].lower(), line
    wait_log(m.node_a, lambda l: has(l, dst_hbone_addr=f"{m.pod(50)}:{CLOSED}", response_flags="UF"),
             "node-a's failed outbound tunnel")


def test_refused_node_outbound_to_a_pod_outside_the_mesh(faults):
    m = faults
    # legacy-0 speaks plain TCP: node-a dials it directly, and the refusal is node-a's own.
    assert socks_refusal(m, m.node_a, m.pod(60), CLOSED) == SOCKS_CONNECTION_REFUSED
    line = wait_log(m.node_a, lambda l: has(l, dst_addr=f"{m.pod(60)}:{CLOSED}"), "the refused passthrough")
    assert line["response_flags"] == "UF" and "refused" in line["error"].lower(), line


@pytest.mark.parametrize("vip,pod", [(51, 50), (60, 60)], ids=["hbone-pod", "tcp-pod"])
def test_refused_at_the_waypoint_tcp_answers_503_uf(faults, vip, pod):
    m = faults
    assert socks_refusal(m, m.node_a, m.vip(vip), CLOSED) == SOCKS_CONNECTION_REFUSED
    line = wait_log(m.waypoint, lambda l: has(l, dst_hbone_addr=f"{m.vip(vip)}:{CLOSED}", status=503),
                    "the waypoint's refused tunnel")
    # One endpoint: Envoy's previous-hosts predicate lets the retries land on it again (UF,URX), or a
    # single attempt (UF) — both say "upstream connection failure"; never a 200 then a dead tunnel.
    assert line["response_flags"] in ("UF", "UF,URX"), line


def test_refused_at_the_waypoint_http_answers_503_uf_urx(faults):
    m = faults
    with socks5_connect(m.node_a.socks5, m.vip(51), HTTP_CLOSED, source_ip=m.pod(10)) as s:
        s.sendall(b"GET /refused HTTP/1.1\r\nHost: faults-wp\r\n\r\n")
        s.settimeout(15)
        head = b""
        while b"retried" not in head:
            chunk = s.recv(4096)
            assert chunk, head
            head += chunk
    assert head.startswith(b"HTTP/1.1 503 "), head
    assert b"upstream connect error or disconnect/reset before headers" in head, head
    line = wait_log(m.waypoint, lambda l: l.get("path") == "/refused", "the HTTP request")
    assert line["status"] == 503 and line["response_flags"] == "UF,URX", line


# ---- upstream reset mid-stream --------------------------------------------------------------

@pytest.mark.parametrize("host", ["node", "waypoint", "outbound"])
def test_upstream_reset_mid_stream_resets_the_client(faults, host):
    m = faults
    target = {"node": (m.vip(50), RESET), "waypoint": (m.vip(51), RESET), "outbound": (m.pod(60), RESET)}[host]
    with socks5_connect(m.node_a.socks5, *target, source_ip=m.pod(10)) as s:
        how, n = read_until_end(s)
    # The backend sent CUT_AFTER_BYTES then RST: the client must not see those bytes followed by a
    # clean FIN (a truncated stream that looks complete).
    assert how == "reset", f"{host}: clean EOF after {n} bytes of a stream the upstream reset"
    assert n <= CUT_AFTER_BYTES


@pytest.mark.parametrize("host", ["node", "waypoint"])
def test_client_reset_mid_stream_resets_the_backend(faults, host):
    m = faults
    target = (m.vip(50) if host == "node" else m.vip(51), SINK)
    before = len(m.sink.endings)
    s = socks5_connect(m.node_a.socks5, *target, source_ip=m.pod(10))
    s.sendall(b"z" * CUT_AFTER_BYTES)
    time.sleep(0.3)
    hard_close(s)
    deadline = time.monotonic() + 10
    while len(m.sink.endings) == before:
        assert time.monotonic() < deadline, "the backend never saw the connection end"
        time.sleep(0.02)
    how, n = m.sink.endings[-1]
    assert how == "reset", f"{host}: the backend saw a clean EOF after {n} bytes of a stream the client reset"


@pytest.mark.parametrize("path", ["/content-length", "/chunked"])
def test_http_response_cut_mid_body_resets_the_client(faults, path):
    m = faults
    with socks5_connect(m.node_a.socks5, m.vip(51), HTTP_CUT, source_ip=m.pod(10)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: faults-wp\r\n\r\n".encode())
        s.settimeout(15)
        data = bytearray()
        how = "eof"
        try:
            while chunk := s.recv(256 * KiB):
                data += chunk
        except ConnectionResetError:
            how = "reset"
    assert data.startswith(b"HTTP/1.1 200"), bytes(data[:200])
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert len(body) < CUT_BODY_ANNOUNCED + 16
    assert how == "reset", f"clean EOF after a {len(body)}-byte body the upstream cut ({head!r})"


def test_sniffed_port_refused_after_200_resets_the_client(faults):
    """A port without appProtocol is sniffed: the CONNECT is answered 200 before the waypoint knows
    it is TCP and dials. When that dial is refused the client must see a reset, not a clean EOF."""
    m = faults
    with socks5_connect(m.node_a.socks5, m.vip(51), SNIFFED_CLOSED, source_ip=m.pod(10)) as s:
        s.sendall(b"\x00\x01 not http, so the sniffer says tcp")
        how, n = read_until_end(s)
    assert (how, n) == ("reset", 0), "clean EOF from a tunnel whose upstream was refused"
    line = wait_log(m.waypoint, lambda l: has(l, dst_hbone_addr=f"{m.vip(51)}:{SNIFFED_CLOSED}"), "the sniffed tunnel")
    # The CONNECT really was answered 200 (sniffing needs the client's bytes first), so the line says
    # 200; the flags and the error say the upstream was refused.
    assert "UF" in line["response_flags"] and line["error"], line


# ---- black-holed upstream -----------------------------------------------------------------------

@pytest.mark.parametrize("vip", [51, 60], ids=["hbone-pod", "tcp-pod"])
def test_blackhole_at_the_waypoint_503_uf_within_connect_timeout(faults, vip):
    m = faults
    t0 = time.monotonic()
    code = socks_refusal(m, m.node_a, m.vip(vip), BLACKHOLE)
    took = time.monotonic() - t0
    assert code == SOCKS_CONNECTION_REFUSED
    # Up to three attempts (one endpoint, retried), each bounded by connectTimeout.
    assert took < 3 * SHORT_CONNECT_TIMEOUT_S + ANSWER_SLACK_S, took
    line = wait_log(m.waypoint, lambda l: has(l, dst_hbone_addr=f"{m.vip(vip)}:{BLACKHOLE}", status=503),
                    "the black-holed tunnel")
    assert set(line["response_flags"].split(",")) <= {"UF", "UT", "URX"} and "UF" in line["response_flags"], line
    # The waypoint still serves after the timeouts.
    echo_ok(m, m.node_a, m.vip(51), ECHO)


@pytest.mark.slow
def test_blackhole_at_the_node_proxy_503_within_10s(faults):
    m = faults
    t0 = time.monotonic()
    assert socks_refusal(m, m.node_a, m.vip(50), BLACKHOLE) == SOCKS_CONNECTION_REFUSED
    took = time.monotonic() - t0
    assert 9.0 < took < 10.0 + ANSWER_SLACK_S, took   # ztunnel's CONNECTION_TIMEOUT, 10 s
    line = wait_log(m.node_b, lambda l: has(l, dst_hbone_addr=f"{m.pod(50)}:{BLACKHOLE}", status=503),
                    "the black-holed inbound tunnel")
    assert line["response_flags"] == "UF", line


# ---- a proxy SIGKILLed mid-traffic, then restarted ---------------------------------------------

# Tunnels held open across the kill, per path.
IN_FLIGHT = 8


@pytest.fixture(scope="module")
def restartable(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("restart"), extra_yaml=(FAULTS_YAML,))
    try:
        mesh.start_proxies()
        mesh.backends.append(Backend(mesh.pod(50), ECHO, serve_echo))
        mesh.http_backend(50, HTTP_OK, b"ok")
        yield mesh
    finally:
        mesh.close()


def _open_echo_tunnels(m: Mesh, vip_last: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socks5_connect(m.node_a.socks5, m.vip(vip_last), ECHO, source_ip=m.pod(10))
        socks.append(s)
        s.sendall(b"before %d" % i)
        s.settimeout(10)
        assert s.recv(64) == b"before %d" % i
    return socks


def _sigkill(proc) -> None:
    os.killpg(proc.popen.pid, signal.SIGKILL)   # its own session: the whole group
    proc.popen.wait(10)


def _endings(socks: list[socket.socket]) -> list[str]:
    """How each tunnel ended. A write goes first (a client that only reads would also learn of a
    reset, but one that writes is the harder case): Linux reports a received RST once, to whichever
    call comes next, so a write that fails with ECONNRESET/EPIPE is the reset; after it, recv() reads
    0 — which is why the write's outcome must be counted."""
    out = []
    for s in socks:
        try:
            s.sendall(b"after the kill")
        except (ConnectionResetError, BrokenPipeError):
            out.append("reset")
        else:
            out.append(read_until_end(s, timeout=20)[0])
        s.close()
    return out


def _new_tunnels_work(m: Mesh) -> None:
    for vip_last in (50, 51):     # straight to node-b, and through the waypoint
        echo_ok(m, m.node_a, m.vip(vip_last), ECHO, payload=b"after the restart")
    conn = SocksHTTPConnection(m.node_a.socks5, m.vip(51), HTTP_OK, source_ip=m.pod(10))
    try:
        assert get(conn, "/after-restart") == (200, b"ok")
    finally:
        conn.close()


def test_node_proxy_killed_in_flight_tunnels_reset_then_new_tunnels_work(restartable):
    m = restartable
    _new_tunnels_work(m)   # node-a's and the waypoint's pools now hold connections to node-b
    direct, via_wp = _open_echo_tunnels(m, 50, IN_FLIGHT), _open_echo_tunnels(m, 51, IN_FLIGHT)
    _sigkill(m.node_b)
    assert _endings(direct) == ["reset"] * IN_FLIGHT, "a tunnel through the killed node proxy ended cleanly"
    assert _endings(via_wp) == ["reset"] * IN_FLIGHT, "a tunnel via the waypoint to the killed node ended cleanly"
    m.node_b = m.start_node("node-b", 2)
    _new_tunnels_work(m)
    assert m.node_a.popen.poll() is None and m.waypoint.popen.poll() is None


def test_waypoint_killed_in_flight_tunnels_reset_then_new_tunnels_work(restartable):
    m = restartable
    _new_tunnels_work(m)
    via_wp = _open_echo_tunnels(m, 51, IN_FLIGHT)
    _sigkill(m.waypoint)
    assert _endings(via_wp) == ["reset"] * IN_FLIGHT, "a tunnel through the killed waypoint ended cleanly"
    m.waypoint = m.start_waypoint(3)
    _new_tunnels_work(m)
