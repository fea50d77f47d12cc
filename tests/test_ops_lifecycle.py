"""Issue 5 "Must show": SIGTERM with 50 tunnels in flight, and certificate rotation under traffic, with
``hbone-proxy run`` subprocesses (node-a → reviews waypoint → node-b → a TCP echo).

* Drain (DESIGN §7, ztunnel ``src/app.rs``): readiness 503 at once, the HBONE listener closes (new
  connections refused), every in-flight tunnel finishes byte-exact before the deadline, exit 0.
* Rotation: the waypoint's ``--cert/--key/--ca`` files replaced on disk (same identity, new serial):
  new TLS connections present the new certificate, the open tunnel keeps working; and node mode's
  ``--ca-dir`` certificates re-minted at half-life (``--workload-cert-ttl``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
from cryptography import x509

from certs.bundle import CertBundle
from certs.ca import MeshCA
from certs.spiffe import SpiffeId
from certs.tls import client_context
from tests.e2e.conftest import make_mesh  # noqa: F401 - the fixture: meshes cleaned up even on failure
from tests.e2e.mesh import REPO, Mesh, SocksError, _cli, _recv_exact, echo_yaml, socks5_connect

ECHO = echo_yaml("echo-wp")

TUNNELS = 50
CHUNK = 64 * 1024            # each tunnel: one chunk before SIGTERM, one during the drain
DRAIN_DEADLINE_S = 15.0      # generous for a loaded 2-core box; the tunnels finish in well under it
PRODUCTPAGE = SpiffeId("cluster.local", "default", "bookinfo-productpage")


def _start(mesh: Mesh, *, waypoint_args: tuple[str, ...] = (), node_b_args: tuple[str, ...] = (),
           drain_deadline: float = 2.0):
    procs = [mesh.start_node("node-a", 1, wait=False), mesh.start_node("node-b", 2, wait=False, extra=node_b_args),
             mesh._start("waypoint", mesh.infra(3), ["--mode", "waypoint", "--gateway", "default/reviews-waypoint",
                                                     "--hbone-addr", f"{mesh.pod(100)}:15008", *waypoint_args],
                         wait=False, drain_deadline=drain_deadline)]
    for p in procs:
        mesh.wait_ready(p)
    mesh.echo_backend(50, 7000)
    return procs


def _echo_tunnel(mesh: Mesh, node_a) -> socket.socket:
    return socks5_connect(node_a.socks5, mesh.vip(51), 7000, source_ip=mesh.pod(10), timeout=30)


# ---------------------------------------------------------------------------------------------
# 4. SIGTERM with 50 tunnels in flight


@pytest.mark.parametrize("which", ["waypoint", "node-a"])
def test_sigterm_drains_50_tunnels_byte_exact(make_mesh, which):
    """The tunnels go app → node-a (SOCKS5) → waypoint (HBONE) → node-b → echo; SIGTERM one hop."""
    mesh: Mesh = make_mesh(extra_yaml=(ECHO,))
    node_a, _, waypoint = _start(mesh, waypoint_args=("--ca-dir", str(mesh.ca_dir)), drain_deadline=DRAIN_DEADLINE_S)
    if which == "node-a":   # restart node-a with the long deadline (the harness default is short)
        mesh.stop(node_a)
        node_a = mesh.start_node("node-a", 1, drain_deadline=DRAIN_DEADLINE_S)
    victim = waypoint if which == "waypoint" else node_a
    listener = (mesh.pod(100), 15008) if which == "waypoint" else node_a.socks5
    socks = [_echo_tunnel(mesh, node_a) for _ in range(TUNNELS)]
    payloads = [(os.urandom(CHUNK), os.urandom(CHUNK)) for _ in range(TUNNELS)]
    try:
        for s, (first, _) in zip(socks, payloads):      # mid-transfer: half of each tunnel's bytes are through
            s.sendall(first)
            assert _recv_exact(s, CHUNK) == first
        t_term = time.monotonic()
        victim.popen.send_signal(signal.SIGTERM)
        # Readiness fails first (ztunnel app.rs), then the listener stops accepting.
        deadline = time.monotonic() + 5
        while victim.get("readiness", "/healthz/ready")[0] != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert victim.get("readiness", "/healthz/ready") == (503, b"not ready: draining\n")
        deadline = time.monotonic() + 5
        while True:   # the listener closes just after readiness flips
            try:
                socket.create_connection(listener, timeout=2).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, f"{which} still accepts during the drain"
            time.sleep(0.02)
        with pytest.raises((SocksError, OSError)):   # so a new tunnel is refused
            _echo_tunnel(mesh, node_a).close()

        # Every in-flight tunnel finishes: the second half both ways, then a clean half-close.
        results: list[bytes | BaseException] = [b""] * TUNNELS

        def finish(i: int) -> None:
            s, (first, second) = socks[i], payloads[i]
            try:
                got = bytearray()
                s.sendall(second)
                s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(1 << 16):
                    got += chunk
                results[i] = bytes(got)
            except BaseException as err:  # noqa: BLE001 - asserted below
                results[i] = err

        threads = [threading.Thread(target=finish, args=(i,)) for i in range(TUNNELS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DRAIN_DEADLINE_S)
        done = time.monotonic() - t_term
        for i, r in enumerate(results):
            assert r == payloads[i][1], f"tunnel {i}: {r!r:.80}"
        assert done < DRAIN_DEADLINE_S
    finally:
        for s in socks:
            s.close()
    # With every tunnel done the proxy exits 0 well before the deadline.
    assert victim.popen.wait(DRAIN_DEADLINE_S + 5) == 0
    assert time.monotonic() - t_term < DRAIN_DEADLINE_S, victim.logs()
    assert "drained; exiting" in victim.logs()
    finished = [l for l in victim.access_lines() if l.get("kind") == "tunnel" and l.get("bytes_received") == 2 * CHUNK]
    assert len(finished) == TUNNELS and all(l["bytes_sent"] == 2 * CHUNK for l in finished)


def test_drain_deadline_cuts_what_did_not_finish_and_exits_0(make_mesh):
    """A tunnel that is still open at --drain-deadline is cut (ztunnel: "drain duration expired with
    pending connections, forcefully shutting down"); the proxy still exits 0, at the deadline."""
    mesh: Mesh = make_mesh(extra_yaml=(ECHO,))
    node_a, _, waypoint = _start(mesh, waypoint_args=("--ca-dir", str(mesh.ca_dir)), drain_deadline=1.5)
    s = _echo_tunnel(mesh, node_a)
    try:
        s.sendall(b"open")
        assert _recv_exact(s, 4) == b"open"
        t0 = time.monotonic()
        waypoint.popen.send_signal(signal.SIGTERM)
        assert waypoint.popen.wait(10) == 0
        took = time.monotonic() - t0
        assert 1.4 <= took < 6, took
        s.settimeout(10)
        try:
            cut = s.recv(1) == b""
        except OSError:
            cut = True
        assert cut
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# 5. rotation under traffic


def _issue(mesh: Mesh, prefix) -> str:
    r = subprocess.run(_cli() + ["certs", "issue", "--dir", str(mesh.ca_dir), "--namespace", "default",
                                 "--service-account", "reviews-waypoint", "--out", str(prefix)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    return _file_serial(f"{prefix}-cert.pem")


def _file_serial(path) -> str:
    with open(path, "rb") as f:
        return format(x509.load_pem_x509_certificate(f.read()).serial_number, "x")


def _peer_serial(mesh: Mesh, addr: tuple[str, int]) -> str:
    """The serial of the certificate a new HBONE (mTLS, ALPN h2) connection to ``addr`` is shown."""
    ca = MeshCA.load(mesh.ca_dir)
    ctx: ssl.SSLContext = client_context(CertBundle.from_issued(ca.issue(PRODUCTPAGE, now=_now()),
                                                                ca.root_cert_pem))
    with socket.create_connection(addr, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=None) as tls:
            der = tls.getpeercert(binary_form=True)
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


def _now():
    from datetime import datetime, timezone
    return datetime.now(timezone.utc)


def _wait(pred, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return v


def test_waypoint_cert_files_replaced_under_traffic(make_mesh, tmp_path):
    mesh: Mesh = make_mesh(extra_yaml=(ECHO,))
    cert, key = tmp_path / "wp-cert.pem", tmp_path / "wp-key.pem"
    old_serial = _issue(mesh, tmp_path / "wp")
    node_a, _, waypoint = _start(mesh, waypoint_args=("--cert", str(cert), "--key", str(key),
                                                      "--ca", str(mesh.ca_dir / "root-cert.pem")))
    hbone = (mesh.pod(100), 15008)
    assert _peer_serial(mesh, hbone) == old_serial
    tunnel = _echo_tunnel(mesh, node_a)
    try:
        digest_sent, digest_got = hashlib.sha256(), hashlib.sha256()

        def roundtrip(n: int = 32 * 1024) -> None:
            data = os.urandom(n)
            tunnel.sendall(data)
            got = _recv_exact(tunnel, n)
            digest_sent.update(data)
            digest_got.update(got)

        roundtrip()
        # A new certificate for the same identity, replaced on disk the way a Secret update lands
        # (each file renamed into place).
        new_serial = _issue(mesh, tmp_path / "next")
        assert new_serial != old_serial
        os.replace(tmp_path / "next-key.pem", key)
        roundtrip()
        os.replace(tmp_path / "next-cert.pem", cert)
        _wait(lambda: _peer_serial(mesh, hbone) == new_serial, "the new certificate on new connections")
        roundtrip()   # the open tunnel (TLS session with the old certificate) is unaffected
        [c] = waypoint.config_dump()["certificates"]
        assert (c["serial_number"], c["rotations"], c["identity"]) == (
            new_serial, 1, "spiffe://cluster.local/ns/default/sa/reviews-waypoint")
        # and a new tunnel through the rotated waypoint works too
        fresh = _echo_tunnel(mesh, node_a)
        try:
            fresh.sendall(b"after rotation")
            assert _recv_exact(fresh, 14) == b"after rotation"
        finally:
            fresh.close()
        roundtrip()
        tunnel.shutdown(socket.SHUT_WR)
        assert tunnel.recv(1) == b""
        assert digest_got.digest() == digest_sent.digest()
    finally:
        tunnel.close()
    assert "certificate rotated" in waypoint.logs()


def test_ca_dir_certificates_reminted_at_half_life(make_mesh):
    """node-b mints echo's certificate with a 4 s TTL: a new one every 2 s, the open tunnel keeps going."""
    mesh: Mesh = make_mesh(extra_yaml=(ECHO,))
    node_a, node_b, _ = _start(mesh, waypoint_args=("--ca-dir", str(mesh.ca_dir)),
                               node_b_args=("--workload-cert-ttl", "4s"))
    echo_hbone = (mesh.pod(50), 15008)
    first = _peer_serial(mesh, echo_hbone)
    tunnel = _echo_tunnel(mesh, node_a)
    try:
        seen = {first}
        deadline = time.monotonic() + 12
        while len(seen) < 3:     # two rotations at least
            assert time.monotonic() < deadline, seen
            tunnel.sendall(b"ping")
            assert _recv_exact(tunnel, 4) == b"ping"
            seen.add(_peer_serial(mesh, echo_hbone))
            time.sleep(0.3)
        tunnel.sendall(b"still here")
        assert _recv_exact(tunnel, 10) == b"still here"
    finally:
        tunnel.close()
    certs = {c["identity"]: c for c in node_b.config_dump()["certificates"]}
    echo = certs["spiffe://cluster.local/ns/default/sa/echo"]
    assert echo["rotations"] >= 2 and echo["source"] == "ca"
    from datetime import datetime
    life = datetime.fromisoformat(echo["not_after"]) - datetime.fromisoformat(echo["not_before"])
    assert life.total_seconds() == 4        # --workload-cert-ttl
    r = subprocess.run(_cli() + ["run", "--mode", "node", "--node", "x", "--config", "x", "--workload-cert-ttl", "0s"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 2 and "--workload-cert-ttl" in r.stderr and "Traceback" not in r.stderr
