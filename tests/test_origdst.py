"""original_dst: a real iptables REDIRECT inside a throw-away network namespace (IPv4 and IPv6),
and the getsockname() fallback without NAT. The namespace is made with `unshare --net` around one
child process, so the kernel removes it (and its rules) when that process exits, pass or fail."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from proxy.origdst import original_dst, parse_sockaddr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import json, socket, sys
    sys.path.insert(0, sys.argv[1])
    from proxy.origdst import original_dst
    out = {}
    for family, listen_ip, dst in ((socket.AF_INET, "0.0.0.0", ("127.0.0.2", 8080)),
                                   (socket.AF_INET6, "::", ("::1", 8080))):
        srv = socket.socket(family)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        srv.bind((listen_ip, 15001))
        srv.listen()
        cli = socket.create_connection(dst, timeout=5)
        conn, _ = srv.accept()
        out[str(family.value)] = {"orig": original_dst(conn), "local": conn.getsockname()[:2]}
        for s in (cli, conn, srv):
            s.close()
    print(json.dumps(out))
""")

SETUP = (
    "ip link set lo up && "
    "iptables -t nat -A OUTPUT -p tcp -d 127.0.0.2 --dport 8080 -j REDIRECT --to-ports 15001 && "
    "ip6tables -t nat -A OUTPUT -p tcp -d ::1 --dport 8080 -j REDIRECT --to-ports 15001 && "
    'exec "$0" -c "$1" "$2"'
)


def _netns_unavailable() -> str | None:
    if shutil.which("iptables") is None or shutil.which("ip6tables") is None:
        return "iptables not installed (Debian package: iptables)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not installed (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.decode().strip()}"
    return None


@pytest.mark.root
def test_redirect_in_netns_sees_original_destination():
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["unshare", "--net", "--", "sh", "-c", SETUP, sys.executable, CHILD, ROOT],
                          capture_output=True, timeout=30)
    if proc.returncode != 0 and b"nat" in proc.stderr and b"table" in proc.stderr.lower():
        pytest.skip(f"iptables nat table unavailable: {proc.stderr.decode().strip()}")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    v4, v6 = out[str(socket.AF_INET.value)], out[str(socket.AF_INET6.value)]
    assert tuple(v4["orig"]) == ("127.0.0.2", 8080)
    assert tuple(v4["local"])[1] == 15001          # the listener really got a redirected socket
    assert tuple(v6["orig"]) == ("::1", 8080)
    assert tuple(v6["local"])[1] == 15001


def test_fallback_without_nat_is_local_address(loopback_ip):
    ip = loopback_ip()
    with socket.socket() as srv:
        srv.bind((ip, 0))
        srv.listen()
        with socket.create_connection(srv.getsockname()) as cli:
            conn, _ = srv.accept()
            with conn:
                assert original_dst(conn) == srv.getsockname()


def test_parse_sockaddr():
    raw4 = socket.AF_INET.to_bytes(2, sys.byteorder) + (8080).to_bytes(2, "big") + \
        socket.inet_aton("10.1.2.3") + bytes(8)
    assert parse_sockaddr(raw4) == ("10.1.2.3", 8080)
    raw6 = socket.AF_INET6.to_bytes(2, sys.byteorder) + (443).to_bytes(2, "big") + bytes(4) + \
        socket.inet_pton(socket.AF_INET6, "fd00::7") + bytes(4)
    assert parse_sockaddr(raw6) == ("fd00::7", 443)
    with pytest.raises(ValueError):
        parse_sockaddr(bytes(16))
