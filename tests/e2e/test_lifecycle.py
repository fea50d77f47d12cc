"""``hbone-proxy run`` as an operator meets it: bad config, a port in use, SIGTERM drain, hot reload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.mesh import BAD_POLICY, REPO, Mesh, SocksError, _cli, _recv_exact, echo_yaml, socks5_connect

ECHO = echo_yaml("echo")
# Enough connections that SO_REUSEPORT's hash very likely gives each of two workers some; the test
# does not depend on it (the totals must add up either way).
CONNECTIONS_OVER_WORKERS = 12

# Only the reviews identity may reach echo: productpage's live tunnel is now denied.
ECHO_LOCKDOWN = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: echo-only-reviews
  namespace: default
spec:
  selector:
    matchLabels: {app: echo}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]
"""


def _metric(proc, name: str, labels: dict) -> float:
    status, body = proc.get("metrics", "/metrics")
    assert status == 200
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _total(proc, path: str, name: str) -> float:
    """The sum of a family's samples over all label sets."""
    status, body = proc.get("metrics", path)
    assert status == 200, body
    return sum(s.value for fam in text_string_to_metric_families(body.decode()) for s in fam.samples
               if s.name == name)


def _workers_dirs(pids) -> set[str]:
    """The --workers private directories the workers' metrics sockets are in (``ss -xlp`` lists them)."""
    dirs = set()
    for pid in pids:
        out = subprocess.run(["ss", "-xlpn"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if f"pid={pid}," in line and "hbone-proxy-workers-" in line:
                path = next(p for p in line.split() if "hbone-proxy-workers-" in p)
                dirs.add(os.path.dirname(path))
    return dirs


def _echo_roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return _recv_exact(sock, len(data))


def test_bad_config_exits_2_with_the_precise_message(tmp_path):
    (tmp_path / "bad.yaml").write_text(BAD_POLICY)
    r = subprocess.run(_cli() + ["run", "--mode", "node", "--node", "node-a", "--ca-dir", str(tmp_path / "none"),
                                 "--config", str(tmp_path / "bad.yaml")],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"{tmp_path / 'bad.yaml'}: document 1 (AuthorizationPolicy default/bad): "
                                "spec.rules[0].from[0].source.principalz: unknown field (did you mean 'principals'?)")
    assert "Traceback" not in r.stderr


def test_usage_errors_exit_2(tmp_path):
    for args, needle in ((["--mode", "node", "--config", "x"], "--node NAME"),
                         (["--mode", "node", "--node", "a", "--config", "x", "--socks5-addr", "nope"],
                          "expected IP:PORT")):
        r = subprocess.run(_cli() + ["run", *args], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_address_in_use_is_one_line_and_exit_2(make_mesh):
    mesh: Mesh = make_mesh()
    ip = mesh.infra(1)
    with socket.socket() as squatter:
        squatter.bind((ip, 15080))
        squatter.listen()
        proc = mesh.start_node("node-a", 1, wait=False)
        assert proc.popen.wait(30) == 2
    err = proc.logs().strip().splitlines()
    assert err[-1] == f"hbone-proxy run: --socks5-addr {ip}:15080: address already in use", err
    assert "Traceback" not in proc.logs()


def test_sigterm_drains_in_flight_tunnel_and_exits_0(make_mesh):
    mesh: Mesh = make_mesh(extra_yaml=(ECHO,))
    node_a = mesh.start_node("node-a", 1, wait=False, drain_deadline=10.0)
    node_b = mesh.start_node("node-b", 2, wait=False)
    mesh.wait_ready(node_a)
    mesh.wait_ready(node_b)
    mesh.echo_backend(50, 7000)
    sock = socks5_connect(node_a.socks5, mesh.vip(50), 7000, source_ip=mesh.pod(10))
    try:
        assert _echo_roundtrip(sock, b"before") == b"before"
        node_a.popen.send_signal(signal.SIGTERM)
        # Draining: readiness fails, new connections are refused, the live tunnel still works.
        deadline = time.monotonic() + 5
        while node_a.get("readiness", "/healthz/ready")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node_a.get("readiness", "/healthz/ready") == (503, b"not ready: draining\n")
        with pytest.raises(OSError):
            socks5_connect(node_a.socks5, mesh.vip(50), 7000, source_ip=mesh.pod(10), timeout=2)
        assert _echo_roundtrip(sock, b"during drain") == b"during drain"
        assert node_a.popen.poll() is None
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""          # the echo's FIN: the tunnel finished cleanly
    finally:
        sock.close()
    assert node_a.popen.wait(10) == 0


def test_reload_late_rejection_and_bad_reload_keeps_last_good(make_mesh):
    mesh: Mesh = make_mesh(extra_yaml=(ECHO,))
    node_a = mesh.start_node("node-a", 1, wait=False)
    node_b = mesh.start_node("node-b", 2, wait=False)
    mesh.wait_ready(node_a)
    mesh.wait_ready(node_b)
    mesh.echo_backend(50, 7000)
    live = socks5_connect(node_a.socks5, mesh.vip(50), 7000, source_ip=mesh.pod(10))
    try:
        assert _echo_roundtrip(live, b"x" * 100) == b"x" * 100
        # 1. A broken file: rejected, the old config stays, the failure counter goes up.
        mesh.write("broken.yaml", BAD_POLICY)
        deadline = time.monotonic() + 10
        while _metric(node_b, "hbone_config_reloads_total", {"result": "failure"}) < 1:
            assert time.monotonic() < deadline, node_b.logs()
            time.sleep(0.05)
        assert "config reload failed" in node_b.logs() and "principalz" in node_b.logs()
        assert _echo_roundtrip(live, b"still") == b"still"
        mesh.remove("broken.yaml")
        # 2. A policy that denies the live tunnel: node-b closes it (ztunnel late rejection), and a
        #    new tunnel from productpage is refused at once, while reviews is let in.
        mesh.write("lockdown.yaml", ECHO_LOCKDOWN)
        live.settimeout(10)
        deadline = time.monotonic() + 10
        closed = False
        while time.monotonic() < deadline and not closed:
            try:
                live.sendall(b"ping")
                closed = live.recv(4) == b""
            except OSError:
                closed = True
        assert closed, node_b.logs()
    finally:
        live.close()
    with pytest.raises(SocksError) as err:
        socks5_connect(node_a.socks5, mesh.vip(50), 7000, source_ip=mesh.pod(10))
    assert err.value.code == 0x02
    reviews_pod_on_b = socks5_connect(node_b.socks5, mesh.vip(50), 7000, source_ip=mesh.pod(21))
    try:
        assert _echo_roundtrip(reviews_pod_on_b, b"ok") == b"ok"
    finally:
        reviews_pod_on_b.close()
    assert _metric(node_b, "hbone_config_reloads_total", {"result": "success"}) >= 1
    assert any(l.get("response_flags") == "DENY" and "late rejection" in l.get("error", "")
               for l in node_b.access_lines())


def test_sighup_reloads_at_once(make_mesh):
    mesh: Mesh = make_mesh()
    node = mesh.start_node("node-a", 1, extra=("--config-poll-interval", "0"))
    before = node.config_dump()["config"]["version"]
    node.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while node.config_dump()["config"]["version"] == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert mesh.stop(node) == 0


def test_quitquitquit_drains_and_exits_0(make_mesh):
    import urllib.request
    mesh: Mesh = make_mesh()
    node = mesh.start_node("node-a", 1)
    req = urllib.request.Request(node.url("admin", "/quitquitquit"), method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200
    assert node.popen.wait(10) == 0


def test_workers_share_ports_and_stop_together(make_mesh):
    """--workers 2: two processes on SO_REUSEPORT sockets; traffic works; SIGTERM stops both, exit 0."""
    mesh: Mesh = make_mesh(extra_yaml=(ECHO,))
    node_a = mesh.start_node("node-a", 1, extra=("--workers", "2"))
    node_b = mesh.start_node("node-b", 2)
    mesh.echo_backend(50, 7000)
    for _ in range(CONNECTIONS_OVER_WORKERS):
        s = socks5_connect(node_a.socks5, mesh.vip(50), 7000, source_ip=mesh.pod(10))
        try:
            assert _echo_roundtrip(s, b"hello") == b"hello"
        finally:
            s.close()
    children = subprocess.run(["pgrep", "-P", str(node_a.popen.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    # /metrics on worker 0's port counts both workers' connections (proxy/admin/workers.py);
    # ?worker=K is one worker's own, and the two add up to the whole.
    opened = "istio_tcp_connections_opened_total"
    assert _total(node_a, "/metrics", opened) == CONNECTIONS_OVER_WORKERS
    per_worker = [_total(node_a, f"/metrics?worker={k}", opened) for k in (0, 1)]
    assert sum(per_worker) == CONNECTIONS_OVER_WORKERS, per_worker
    assert _metric(node_a, "hbone_workers", {"state": "reporting"}) == 2
    assert node_a.get("metrics", "/metrics?worker=2")[0] == 400
    workers_dirs = _workers_dirs(children)
    assert len(workers_dirs) == 1
    workers_dir = workers_dirs.pop()
    assert os.path.isdir(workers_dir)
    assert mesh.stop(node_a) == 0
    assert not os.path.exists(workers_dir)   # the supervisor removes it
    assert mesh.stop(node_b) == 0
