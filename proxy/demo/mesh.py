"""A loopback mesh's moving parts: ``hbone-proxy run`` subprocesses, tiny backends, a SOCKS5 client.

Shared by ``hbone-proxy demo`` and the end-to-end tests (``tests/e2e/mesh.py`` builds its fixture
mesh on these). Every "pod" is a 127.x address (all of 127.0.0.0/8 is loopback on Linux), so many
proxies and backends share one machine with Istio's real port numbers.

Processes are started the way an operator would: the console script, each in its own session (its
own process group), stdout/stderr to files, and — on Linux — with a parent-death signal so that
even a ``kill -9`` of the launcher leaves no proxy behind. ``Supervisor.stop_all`` ends whole groups.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# A proxy must be ready within this time on a loaded 2-core machine (import + config + certs + bind).
READY_TIMEOUT_S = 30.0
# Between readiness probes: short, because the demo's 30 s budget is mostly start-up.
READY_POLL_S = 0.05
# SIGTERM → exit: the proxy's drain deadline (set short by callers) plus interpreter shutdown.
STOP_TIMEOUT_S = 10.0
# An echo backend reads this much per recv: large enough that a MiB moves in a few calls.
ECHO_CHUNK_BYTES = 256 * 1024
# prctl(2) option: deliver a signal to this process when its parent thread exits.
PR_SET_PDEATHSIG = 1
# `hbone-proxy certs init` (key generation + imports) on a loaded machine.
CERTS_TIMEOUT_S = 60.0
# A random loopback block for a LoopbackMesh: 127.A.B with A in this range (the demo's fixed blocks
# are 127.10.x, the tunnel benchmarks' pods 127.60-120.x), B a multiple of 3 (B, B+1, B+2 in use).
RANDOM_BLOCK_A = (130, 250)
RANDOM_BLOCK_TRIES = 200


class StartError(Exception):
    """A process could not start or become ready; the message is one line saying why."""


def hbone_proxy_command() -> list[str]:
    """The ``hbone-proxy`` console script next to this interpreter, else ``python -m proxy.cli``."""
    script = Path(sys.executable).parent / "hbone-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy.cli"]


def _load_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):   # not Linux: process groups alone must do
        return None


_PRCTL = _load_prctl()   # resolved before any fork: the child must not import or dlopen


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL us when the launcher dies, however it dies."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def address_free(ip: str, port: int) -> bool:
    """Can ``ip:port`` be bound now? With SO_REUSEADDR, as the proxies bind (asyncio's default on
    Unix), so TIME_WAIT leftovers of an earlier run do not count as taken."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class Proc:
    """One running ``hbone-proxy run`` and where to reach it."""

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

    def addr(self, which: str) -> str:
        host, port = getattr(self, which)
        return f"{host}:{port}"

    def get(self, which: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url(which, path), timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def logs(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def __repr__(self) -> str:
        state = "running" if self.popen.poll() is None else f"exited {self.popen.returncode}"
        return f"<Proc {self.name} pid={self.popen.pid} {state} admin={self.addr('admin')}>"


@dataclass
class Supervisor:
    """Starts proxies in their own process groups and stops every one of them, exactly once each."""

    logdir: Path
    cwd: Path | None = None
    procs: list[Proc] = field(default_factory=list)
    proc_type: type = Proc          # tests use a subclass that also reads /config_dump and access logs

    def start(self, name: str, infra_ip: str, args: list[str], *, config: Path,
              drain_deadline: float = 2.0, poll_interval: float = 0.2) -> Proc:
        """``hbone-proxy run --config CONFIG`` with admin/metrics/readiness on ``infra_ip`` (15000,
        15020, 15021), its access log and output in ``logdir``. Does not wait: see ``wait_ready``."""
        out, err = self.logdir / f"{name}.out", self.logdir / f"{name}.err"
        access = self.logdir / f"{name}.access.log"
        cmd = hbone_proxy_command() + [
            "run", "--config", str(config), "--admin-addr", f"{infra_ip}:15000",
            "--metrics-addr", f"{infra_ip}:15020", "--readiness-addr", f"{infra_ip}:15021",
            "--access-log", str(access), "--drain-deadline", str(drain_deadline),
            "--config-poll-interval", str(poll_interval), *args]
        with out.open("wb") as fout, err.open("wb") as ferr:
            popen = subprocess.Popen(cmd, stdout=fout, stderr=ferr, stdin=subprocess.DEVNULL, cwd=self.cwd,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        proc = self.proc_type(name, popen, out, err, (infra_ip, 15000), (infra_ip, 15020), (infra_ip, 15021),
                              access_log=access)
        self.procs.append(proc)
        return proc

    def wait_ready(self, proc: Proc, timeout: float = READY_TIMEOUT_S) -> None:
        """Until ``/healthz/ready`` answers 200. Raises ``StartError`` (one line: the proxy's own
        last stderr line when it exited, e.g. ``--socks5-addr 127.0.0.1:15080: address already in use``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                why = last_line(proc.logs()) or f"exit status {proc.popen.returncode}"
                raise StartError(f"{proc.name} did not start: {why}")
            try:
                status, _ = proc.get("readiness", "/healthz/ready", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(READY_POLL_S)
        raise StartError(f"{proc.name} was not ready within {timeout:g}s (see {proc.stderr})")

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """One signal to the proxy itself (a graceful drain on SIGTERM), then its exit code."""
        if proc.popen.poll() is None:
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group(proc)
        return proc.popen.returncode

    def stop_all(self, grace: float = 0.0) -> None:
        """End every process group we started. ``grace`` > 0: SIGTERM first and wait that long."""
        live = [p for p in self.procs if p.popen.poll() is None]
        if grace > 0:
            for p in live:
                _signal_group(p.popen.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in live:
                try:
                    p.popen.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        for p in self.procs:
            self._kill_group(p)

    @staticmethod
    def _kill_group(proc: Proc) -> None:
        # Its own session: the group holds the proxy and any --workers children.
        _signal_group(proc.popen.pid, signal.SIGKILL)
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:   # pragma: no cover - SIGKILL does not take 5 s
            pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# A whole mesh on one loopback block: config directory, CA, proxies, backends


def block_free(a: int, b: int, port: int = 15008) -> bool:
    """Are 127.A.B.1, 127.A.B+1.1 and 127.A.B+2.1 free on ``port`` (no other mesh holds the block)?"""
    return all(address_free(f"127.{a}.{third}.1", port) for third in (b, b + 1, b + 2))


def random_block(rng: random.Random) -> tuple[int, int]:
    """A free 127.A.B block, so parallel meshes (tests, benchmarks) never collide."""
    for _ in range(RANDOM_BLOCK_TRIES):
        a, b = rng.randint(*RANDOM_BLOCK_A), rng.randrange(0, 250, 3)
        if block_free(a, b):
            return a, b
    raise StartError("no free 127.x block for the mesh")


_block_rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))


class LoopbackMesh:
    """``hbone-proxy run`` processes sharing one config directory and one CA, on one 127.A.B block
    (``proxy.demo.bookinfo.Layout``: pods 127.A.B.x, VIPs 127.A.B+1.x, proxies' admin, metrics,
    readiness and SOCKS5 on 127.A.B+2.x). Used by the end-to-end tests (``tests/e2e/mesh.py``, which
    writes the bookinfo fixtures) and the HTTP benchmark (the demo's generated bookinfo config).
    ``close()`` stops every process group and backend."""

    def __init__(self, workdir: Path, *, layout=None, proc_type: type = Proc, cwd: Path | None = None):
        from .bookinfo import Layout
        self.workdir = workdir
        self.layout = layout if layout is not None else Layout(*random_block(_block_rng))
        self.config_dir = workdir / "config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.backends: list = []
        self.supervisor = Supervisor(workdir, cwd=cwd, procs=self.procs, proc_type=proc_type)
        self.ca_dir = workdir / "ca"
        if (self.ca_dir / "root-cert.pem").exists():   # a work directory used before keeps its CA
            return
        try:
            r = subprocess.run(hbone_proxy_command() + ["certs", "init", "--dir", str(self.ca_dir)],
                               capture_output=True, text=True, cwd=cwd, timeout=CERTS_TIMEOUT_S,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise StartError(f"`hbone-proxy certs init` took more than {CERTS_TIMEOUT_S:g}s") from None
        if r.returncode != 0:
            raise StartError(f"`hbone-proxy certs init` failed: {last_line(r.stderr) or r.returncode}")

    # ---- addresses ----
    @property
    def a(self) -> int:
        return self.layout.a

    @property
    def b(self) -> int:
        return self.layout.b

    def pod(self, last) -> str:
        return self.layout.pod(last)

    def vip(self, last) -> str:
        return self.layout.vip(last)

    def infra(self, last) -> str:
        return self.layout.infra(last)

    # ---- configuration (polled by the proxies) ----
    def write(self, name: str, text: str) -> Path:
        path = self.config_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)   # atomic: a poller never reads half a file
        return path

    def remove(self, name: str) -> None:
        (self.config_dir / name).unlink()

    # ---- proxies ----
    def start(self, name: str, infra_ip: str, args: list[str], *, wait: bool = True,
              drain_deadline: float = 2.0) -> Proc:
        proc = self.supervisor.start(name, infra_ip, args, config=self.config_dir, drain_deadline=drain_deadline)
        if wait:
            self.wait_ready(proc)
        return proc

    def start_node(self, node: str, infra_last: int, *, extra: tuple[str, ...] = (), **kw) -> Proc:
        """A node proxy (ztunnel) for ``node``, with SOCKS5 and the outbound listener on its infra IP."""
        ip = self.infra(infra_last)
        proc = self.start(node, ip, ["--mode", "node", "--node", node, "--ca-dir", str(self.ca_dir),
                                     "--socks5-addr", f"{ip}:15080", "--outbound-addr", f"{ip}:15001", *extra], **kw)
        proc.socks5 = (ip, 15080)
        return proc

    def start_waypoint(self, infra_last: int, *, gateway: str, pod_last: int = 100,
                       extra: tuple[str, ...] = (), **kw) -> Proc:
        """The waypoint implementing ``gateway`` (NS/NAME), HBONE on its pod IP's 15008."""
        return self.start("waypoint", self.infra(infra_last),
                          ["--mode", "waypoint", "--ca-dir", str(self.ca_dir), "--gateway", gateway,
                           "--hbone-addr", f"{self.pod(pod_last)}:15008", *extra], **kw)

    def wait_ready(self, proc: Proc, timeout: float = READY_TIMEOUT_S) -> None:
        self.supervisor.wait_ready(proc, timeout)

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.supervisor.stop(proc, sig, timeout)

    # ---- backends ----
    def http_backend(self, pod_last: int, port: int, body: bytes) -> "HttpBackend":
        b = HttpBackend(self.pod(pod_last), port, body)
        self.backends.append(b)
        return b

    def echo_backend(self, pod_last: int, port: int) -> "EchoBackend":
        b = EchoBackend(self.pod(pod_last), port)
        self.backends.append(b)
        return b

    def close(self, grace: float = 0.0) -> None:
        """Stop every proxy's process group (SIGTERM and ``grace`` seconds first when > 0, then
        SIGKILL) and every backend."""
        self.supervisor.stop_all(grace)
        for b in self.backends:
            try:
                b.close()
            except OSError:
                pass
        self.backends.clear()


# ---------------------------------------------------------------------------------------------
# Backends (the "pods")


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
                    data = conn.recv(ECHO_CHUNK_BYTES)
                    if not data:
                        break
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes accept() on Linux
        except OSError:
            pass
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Clients: an app reaching the mesh through its node proxy's SOCKS5 listener (DESIGN §2, 15080)


class SocksError(ConnectionError):
    """The SOCKS5 proxy refused: ``code`` is the RFC 1928 reply (0x02 not allowed, 0x05 refused...)."""

    def __init__(self, code: int):
        super().__init__(f"SOCKS5 reply {code:#04x}")
        self.code = code


def socks5_connect(proxy: tuple[str, int], host: str, port: int, *, source_ip: str,
                   timeout: float = 10.0) -> socket.socket:
    """A TCP connection through a SOCKS5 proxy, made from ``source_ip`` (the client pod's IP: the
    node proxy picks the source identity by it). Raises ``SocksError(reply code)`` on refusal."""
    s = socket.socket()
    s.settimeout(timeout)
    try:
        s.bind((source_ip, 0))
        s.connect(proxy)
        s.sendall(b"\x05\x01\x00")   # RFC 1928 §3: version 5, one method, "no authentication"
        if recv_exact(s, 2) != b"\x05\x00":
            raise ConnectionError("the SOCKS5 proxy did not accept 'no authentication'")
        try:
            addr = b"\x01" + socket.inet_aton(host)
        except OSError:
            addr = b"\x03" + bytes([len(host)]) + host.encode()
        s.sendall(b"\x05\x01\x00" + addr + struct.pack("!H", port))   # §4: CONNECT
        head = recv_exact(s, 4)
        if head[1] != 0:
            raise SocksError(head[1])
        recv_exact(s, {1: 4, 4: 16}.get(head[3], 4) + 2)
        return s
    except BaseException:
        s.close()
        raise


def recv_exact(s: socket.socket, n: int) -> bytes:
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


__all__ = ["Proc", "Supervisor", "StartError", "LoopbackMesh", "block_free", "random_block",
           "HttpBackend", "EchoBackend", "SocksError", "SocksHTTPConnection",
           "socks5_connect", "recv_exact", "get", "hbone_proxy_command", "address_free", "last_line",
           "READY_TIMEOUT_S", "STOP_TIMEOUT_S"]
