"""A reusable loopback mesh for end-to-end tests: real ``hbone-proxy run`` subprocesses, as users run them.

``Mesh(tmp_path)`` writes a config directory from the bookinfo fixtures (plus extra YAML), makes a CA
with ``hbone-proxy certs init``, and starts proxies (``start_node``, ``start_waypoint``) on their own
addresses with their own admin/metrics/readiness ports, waiting for ``/healthz/ready``. Tiny backends
(``http_backend``, ``echo_backend``) bind the pod IPs. ``close()`` stops every process and backend —
the ``mesh`` fixture calls it even when a test fails.

The fixtures' addresses (pods 127.1.0.x, VIPs 127.2.0.x) are remapped to a random 127.A.B.x / 127.A.B+1.x
block per mesh, so parallel runs (and other test files using the fixtures' own addresses) never collide.
Proxy infrastructure listeners live in 127.A.B+2.x.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
BOOKINFO = ("inventory.yaml", "authz.yaml", "reviews-routing.yaml", "waypoint.yaml")
# A proxy must be ready within this time on a loaded 2-core machine (import + config + certs + bind).
READY_TIMEOUT_S = 30.0
# SIGTERM → exit: drain deadline (set short by the harness) plus interpreter shutdown.
STOP_TIMEOUT_S = 10.0
_rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "hbone-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]


def _block_free(a: int, b: int) -> bool:
    for third in (b, b + 1, b + 2):
        with socket.socket() as s:
            try:
                s.bind((f"127.{a}.{third}.1", 15008))
            except OSError:
                return False
    return True


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    stdout: Path
    stderr: Path
    admin: tuple[str, int]
    metrics: tuple[str, int]
    readiness: tuple[str, int]
    socks5: tuple[str, int] | None = None
    access_log: Path | None = None

    def url(self, which: str, path: str) -> str:
        host, port = getattr(self, which)
        return f"http://{host}:{port}{path}"

    def get(self, which: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url(which, path), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def config_dump(self) -> dict:
        status, body = self.get("admin", "/config_dump")
        assert status == 200, body
        return json.loads(body)

    def access_lines(self) -> list[dict]:
        if self.access_log is None or not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def logs(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""


class HttpBackend:
    """An HTTP/1.1 keep-alive server answering ``body`` to every request (a "reviews vN" pod)."""

    def __init__(self, ip: str, port: int, body: bytes):
        answer = body

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802
                # One write for head and body: two small writes meet Nagle + delayed ACK (40 ms each).
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(answer)}\r\n"
                        f"X-Client: {self.client_address[0]}\r\n\r\n").encode()
                self.wfile.write(head + answer)

            def log_message(self, *args):  # quiet
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request, client_address):  # a client reset at teardown is not news
                pass

            def process_request(self, request, client_address):
                conns.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                conns.discard(request)
                super().shutdown_request(request)

        conns: set[socket.socket] = set()
        self.conns = conns
        self.server = Server((ip, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Like a pod being killed: the listener goes and so does every open connection."""
        self.server.shutdown()
        self.server.server_close()
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class EchoBackend:
    """TCP echo that preserves half-close: echoes until the client's FIN, then sends its own FIN."""

    def __init__(self, ip: str, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(64)
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    data = conn.recv(256 * 1024)
                    if not data:
                        break
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@dataclass
class Mesh:
    tmp: Path
    extra_yaml: tuple[str, ...] = ()
    fixtures: tuple[str, ...] = BOOKINFO
    procs: list[Proc] = field(default_factory=list)
    backends: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for _ in range(200):
            a, b = _rng.randint(130, 250), _rng.randrange(0, 250, 3)
            if _block_free(a, b):
                break
        else:  # pragma: no cover
            raise RuntimeError("no free 127.x block for the mesh")
        self.a, self.b = a, b
        self.config_dir = self.tmp / "config"
        self.config_dir.mkdir(parents=True)
        for name in self.fixtures:
            self.write(name, (FIXTURES / "bookinfo" / name).read_text())
        for i, text in enumerate(self.extra_yaml):
            self.write(f"extra-{i}.yaml", text)
        self.ca_dir = self.tmp / "ca"
        r = subprocess.run(_cli() + ["certs", "init", "--dir", str(self.ca_dir)], capture_output=True, text=True,
                           cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr

    # ---- addresses ----
    def remap(self, text: str) -> str:
        """127.1.0.x (pods) → 127.A.B.x, 127.2.0.x (VIPs) → 127.A.B+1.x."""
        text = re.sub(r"\b127\.1\.0\.(\d+)\b", lambda m: f"127.{self.a}.{self.b}.{m.group(1)}", text)
        return re.sub(r"\b127\.2\.0\.(\d+)\b", lambda m: f"127.{self.a}.{self.b + 1}.{m.group(1)}", text)

    def pod(self, last: int) -> str:
        return f"127.{self.a}.{self.b}.{last}"

    def vip(self, last: int) -> str:
        return f"127.{self.a}.{self.b + 1}.{last}"

    def infra(self, last: int) -> str:
        return f"127.{self.a}.{self.b + 2}.{last}"

    def write(self, name: str, text: str) -> Path:
        path = self.config_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.remap(text))
        os.replace(tmp, path)   # atomic: a poller never reads half a file
        return path

    def remove(self, name: str) -> None:
        (self.config_dir / name).unlink()

    # ---- proxies ----
    def _start(self, name: str, infra_ip: str, args: list[str], *, wait: bool = True,
               drain_deadline: float = 2.0) -> Proc:
        out, err = self.tmp / f"{name}.out", self.tmp / f"{name}.err"
        access = self.tmp / f"{name}.access.log"
        cmd = _cli() + ["run", "--config", str(self.config_dir), "--admin-addr", f"{infra_ip}:15000",
                        "--metrics-addr", f"{infra_ip}:15020", "--readiness-addr", f"{infra_ip}:15021",
                        "--access-log", str(access), "--drain-deadline", str(drain_deadline),
                        "--config-poll-interval", "0.2", *args]
        popen = subprocess.Popen(cmd, stdout=out.open("wb"), stderr=err.open("wb"), cwd=REPO,
                                 start_new_session=True)
        proc = Proc(name, popen, out, err, (infra_ip, 15000), (infra_ip, 15020), (infra_ip, 15021),
                    access_log=access)
        self.procs.append(proc)
        if wait:
            self.wait_ready(proc)
        return proc

    def start_node(self, node: str, infra_last: int, *, extra: tuple[str, ...] = (), **kw) -> Proc:
        ip = self.infra(infra_last)
        proc = self._start(node, ip, ["--mode", "node", "--node", node, "--ca-dir", str(self.ca_dir),
                                      "--socks5-addr", f"{ip}:15080", "--outbound-addr", f"{ip}:15001", *extra], **kw)
        proc.socks5 = (ip, 15080)
        return proc

    def start_waypoint(self, infra_last: int, *, pod_last: int = 100, gateway: str = "default/reviews-waypoint",
                       extra: tuple[str, ...] = (), **kw) -> Proc:
        return self._start("waypoint", self.infra(infra_last),
                           ["--mode", "waypoint", "--ca-dir", str(self.ca_dir), "--gateway", gateway,
                            "--hbone-addr", f"{self.pod(pod_last)}:15008", *extra], **kw)

    def wait_ready(self, proc: Proc, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise AssertionError(f"{proc.name} exited {proc.popen.returncode}:\n{proc.logs()}")
            try:
                status, _ = proc.get("readiness", "/healthz/ready", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{proc.name} not ready within {timeout}s:\n{proc.logs()}")

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        return proc.popen.returncode

    # ---- backends ----
    def http_backend(self, pod_last: int, port: int, body: bytes) -> HttpBackend:
        b = HttpBackend(self.pod(pod_last), port, body)
        self.backends.append(b)
        return b

    def echo_backend(self, pod_last: int, port: int) -> EchoBackend:
        b = EchoBackend(self.pod(pod_last), port)
        self.backends.append(b)
        return b

    def close(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                try:
                    os.killpg(proc.popen.pid, signal.SIGKILL)   # its own session: the proxy and its workers
                except ProcessLookupError:
                    pass
                proc.popen.wait(5)
        for b in self.backends:
            try:
                b.close()
            except OSError:
                pass
        self.backends.clear()


# ---------------------------------------------------------------------------------------------
# Clients


class SocksError(ConnectionError):
    def __init__(self, code: int):
        super().__init__(f"SOCKS5 reply {code:#04x}")
        self.code = code


def socks5_connect(proxy: tuple[str, int], host: str, port: int, *, source_ip: str,
                   timeout: float = 10.0) -> socket.socket:
    """A TCP connection through a SOCKS5 proxy, made from ``source_ip`` (the client pod's IP).
    Raises ``SocksError(reply code)`` when the proxy refuses."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.bind((source_ip, 0))
        s.connect(proxy)
        s.sendall(b"\x05\x01\x00")
        assert _recv_exact(s, 2) == b"\x05\x00"
        try:
            addr = b"\x01" + socket.inet_aton(host)
        except OSError:
            addr = b"\x03" + bytes([len(host)]) + host.encode()
        s.sendall(b"\x05\x01\x00" + addr + struct.pack("!H", port))
        head = _recv_exact(s, 4)
        if head[1] != 0:
            raise SocksError(head[1])
        _recv_exact(s, {1: 4, 4: 16}[head[3]] + 2)
        return s
    except BaseException:
        s.close()
        raise


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


class SocksHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over SOCKS5 from a pod IP: keep-alive, so many requests share one tunnel."""

    def __init__(self, proxy: tuple[str, int], host: str, port: int, *, source_ip: str, timeout: float = 10.0):
        super().__init__(host, port, timeout=timeout)
        self._proxy = proxy
        self._source_ip = source_ip

    def connect(self) -> None:
        self.sock = socks5_connect(self._proxy, self.host, self.port, source_ip=self._source_ip,
                                   timeout=self.timeout)


def get(conn: http.client.HTTPConnection, path: str = "/", headers: dict | None = None) -> tuple[int, bytes]:
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.read()


__all__ = ["Mesh", "Proc", "HttpBackend", "EchoBackend", "SocksError", "SocksHTTPConnection",
           "socks5_connect", "get", "REPO"]
