"""A reusable loopback mesh for end-to-end tests: real ``hbone-proxy run`` subprocesses, as users run them.

``Mesh(tmp_path)`` writes a config directory from the bookinfo fixtures (plus extra YAML), makes a CA
with ``hbone-proxy certs init``, and starts proxies (``start_node``, ``start_waypoint``) on their own
addresses with their own admin/metrics/readiness ports, waiting for ``/healthz/ready``. Tiny backends
(``http_backend``, ``echo_backend``) bind the pod IPs. ``close()`` stops every process and backend —
the ``mesh`` fixture calls it even when a test fails. The backends, the SOCKS5 client and the console
script lookup are the ones ``hbone-proxy demo`` uses (``proxy/demo/mesh.py``).

The fixtures' addresses (pods 127.1.0.x, VIPs 127.2.0.x) are remapped to a random 127.A.B.x / 127.A.B+1.x
block per mesh, so parallel runs (and other test files using the fixtures' own addresses) never collide.
Proxy infrastructure listeners live in 127.A.B+2.x.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from proxy.demo.mesh import READY_TIMEOUT_S, STOP_TIMEOUT_S
from proxy.demo.mesh import Proc as _DemoProc
from proxy.demo.mesh import (EchoBackend, HttpBackend, SocksError, SocksHTTPConnection, StartError, Supervisor, get,
                             hbone_proxy_command, recv_exact, socks5_connect)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
BOOKINFO = ("inventory.yaml", "authz.yaml", "reviews-routing.yaml", "waypoint.yaml")
_rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))


_cli = hbone_proxy_command
_recv_exact = recv_exact


def _block_free(a: int, b: int) -> bool:
    for third in (b, b + 1, b + 2):
        with socket.socket() as s:
            try:
                s.bind((f"127.{a}.{third}.1", 15008))
            except OSError:
                return False
    return True


class Proc(_DemoProc):
    """``proxy.demo.mesh.Proc`` plus what tests read: the config dump and the access-log lines."""

    def config_dump(self) -> dict:
        status, body = self.get("admin", "/config_dump")
        assert status == 200, body
        return json.loads(body)

    def access_lines(self) -> list[dict]:
        if self.access_log is None or not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]


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
        self.supervisor = Supervisor(self.tmp, cwd=REPO, procs=self.procs, proc_type=Proc)
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

    # ---- proxies (started and stopped by proxy.demo.mesh.Supervisor, as the demo's) ----
    def _start(self, name: str, infra_ip: str, args: list[str], *, wait: bool = True,
               drain_deadline: float = 2.0) -> Proc:
        proc = self.supervisor.start(name, infra_ip, args, config=self.config_dir, drain_deadline=drain_deadline)
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

    def start_proxies(self, *, node_a_extra: tuple[str, ...] = ()) -> tuple[Proc, Proc, Proc]:
        """The bookinfo mesh's three proxies (node-a, node-b, the reviews waypoint), started together
        (their start-ups overlap) and then each waited for; also kept as node_a, node_b, waypoint."""
        procs = (self.start_node("node-a", 1, wait=False, extra=node_a_extra),
                 self.start_node("node-b", 2, wait=False), self.start_waypoint(3, wait=False))
        for p in procs:
            self.wait_ready(p)
        self.node_a, self.node_b, self.waypoint = procs
        return procs

    def wait_ready(self, proc: Proc, timeout: float = READY_TIMEOUT_S) -> None:
        try:
            self.supervisor.wait_ready(proc, timeout)
        except StartError as err:
            raise AssertionError(f"{err}:\n{proc.logs()}") from None

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.supervisor.stop(proc, sig, timeout)

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
        self.supervisor.stop_all()   # SIGKILL to each proxy's process group (its own session)
        for b in self.backends:
            try:
                b.close()
            except OSError:
                pass
        self.backends.clear()


__all__ = ["Mesh", "Proc", "HttpBackend", "EchoBackend", "SocksError", "SocksHTTPConnection",
           "socks5_connect", "get", "REPO"]
