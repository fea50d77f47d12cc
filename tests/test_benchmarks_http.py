"""benchmarks.httpload, the HTTP scenario's Python load client (untimed): closed loop, fixed-rate open
loop, and the SOCKS5 path, against real sockets on loopback; which rows the scenario has in quick
and full mode; the ``ours`` mesh from the package alone."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from benchmarks import httpload
from benchmarks.tunnel import NODE_INVENTORY, pick_pod_ip


async def _http_server():
    """Keep-alive HTTP/1.1 server answering every GET with 'v1\\n'; counts requests."""
    count = [0]

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                count[0] += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nv1\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], count


async def _socks_server(seen: list):
    """Minimal RFC 1928 server (no auth, CONNECT IPv4): records (source ip, target), then relays."""
    async def pipe(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        w.close()

    async def serve(reader, writer):
        assert await reader.readexactly(3) == b"\x05\x01\x00"
        writer.write(b"\x05\x00")
        head = await reader.readexactly(10)
        assert head[:4] == b"\x05\x01\x00\x01"
        host, port = socket.inet_ntoa(head[4:8]), struct.unpack("!H", head[8:10])[0]
        seen.append((writer.get_extra_info("peername")[0], host, port))
        r2, w2 = await asyncio.open_connection(host, port)
        writer.write(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x00")
        await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _args(**kw):
    base = dict(host=None, socks=None, source_ip=None, connections=2, rate=None, seconds=0.3, header=[])
    base.update(kw)
    return type("Args", (), base)


async def test_closed_loop_counts_every_response():
    server, port, count = await _http_server()
    async with server:
        out = await httpload.run(_args(target=("127.0.0.1", port), connections=4))
    assert out["requests"] > 0 and out["statuses"] == {"200": out["requests"]}
    assert out["bodies"] == {"v1": out["requests"]}
    assert count[0] >= out["requests"]  # warm-up requests are served but not counted
    assert out["p50_ms"] <= out["p99_ms"]


async def test_open_loop_never_sends_ahead_of_its_schedule():
    server, port, count = await _http_server()
    rate, seconds = 200.0, 0.3
    async with server:
        out = await httpload.run(_args(target=("127.0.0.1", port), rate=rate, seconds=seconds, connections=4))
    scheduled_max = rate * (seconds + httpload.WARMUP_S) + 1
    assert 0 < out["requests"] <= scheduled_max and count[0] <= scheduled_max
    assert out["statuses"] == {"200": out["requests"]}


async def test_socks5_path_binds_the_source_ip_and_reaches_the_target(loopback_ip):
    server, port, count = await _http_server()
    seen: list = []
    socks, socks_port = await _socks_server(seen)
    src = loopback_ip()
    async with server, socks:
        out = await httpload.run(_args(target=("127.0.0.1", port), socks=("127.0.0.1", socks_port),
                                       source_ip=src, connections=3))
    assert out["requests"] > 0 and out["statuses"] == {"200": out["requests"]}
    assert seen == [(src, "127.0.0.1", port)] * 3


async def test_socks5_refusal_is_a_load_error():
    async def refuse(reader, writer):
        await reader.readexactly(3)
        writer.write(b"\x05\x00")
        await reader.readexactly(10)
        writer.write(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")  # 0x02: not allowed by ruleset
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    async with server:
        with pytest.raises(httpload.LoadError, match="0x02"):
            await httpload.run(_args(target=("127.0.0.1", 9), socks=("127.0.0.1", server.sockets[0].getsockname()[1])))


def test_node_row_sink_pod_is_a_free_loopback_address_in_the_inventory():
    import yaml
    ip = pick_pod_ip()
    assert ip.startswith("127.")
    doc = yaml.safe_load(NODE_INVENTORY.format(pod=ip))
    (wl,) = doc["workloads"]
    assert wl["workloadIps"] == [ip] and wl["protocol"] == "HBONE" and wl["node"] == "bench-node"


# An installed copy (the Docker image, see .dockerignore) has no `tests` package: the mesh the `ours`
# rows run on must come from the package alone.
OURS_MESH_WITHOUT_TESTS = r"""
import importlib.abc, sys, tempfile
from pathlib import Path

class NoTests(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tests" or name.startswith("tests."):
            raise ModuleNotFoundError(f"no module named {name!r} (installed copy)")
        return None

sys.meta_path.insert(0, NoTests())
from benchmarks.http import OursMesh, ours_waypoint_status
assert ours_waypoint_status() is None, ours_waypoint_status()
ours = OursMesh(Path(tempfile.mkdtemp(dir=sys.argv[2])), sys.argv[1])
try:
    ours.check_split_and_deny()   # 90/10 over 200 requests and x-deny -> 403, through all three proxies
    print("OK", sorted(ours.pids), " ".join(ours.load_args()))
finally:
    ours.close()
"""


@pytest.mark.timeout(120)
def test_the_http_mesh_runs_from_the_package_without_the_tests_directory(tmp_path):
    """The `ours` HTTP rows used to build their mesh with tests/e2e/mesh.py and the tests' fixtures,
    so `hbone-proxy bench --only http` from an installed package had none. Now: node-a (SOCKS5) →
    the reviews waypoint (authz, DENY on x-deny, 90/10) → node-b → nginx, with `tests` unimportable."""
    import subprocess
    import sys

    from benchmarks.tools import which
    nginx = which("nginx")
    if nginx is None:
        pytest.skip("needs nginx (Debian nginx-light) for the reviews backends")
    r = subprocess.run([sys.executable, "-c", OURS_MESH_WITHOUT_TESTS, nginx, str(tmp_path)], capture_output=True,
                       text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("OK ['node-a', 'node-b', 'waypoint']"), line
    assert "--host reviews:9080" in line and "--socks" in line and "--source-ip" in line


# ----------------------------------------------------------------------------- the table's rows


def _rows(**kw):
    from benchmarks.http import plan_rows
    args = dict(full=False, missing={}, wrk=True, c_client_why=None)
    args.update(kw)
    return [(r.target, r.client, r.note) for r in plan_rows(**args)]


def test_quick_mode_drives_every_target_with_the_c_client_at_three_load_points():
    rows = _rows()
    targets = ["direct", "nginx", "haproxy", "ours", "wp-only", "wp-l4", "no-waypoint"]
    assert rows == [(t, f"c-load {point}", None) for point in ("c=1", "c=64", "1000/s") for t in targets]


def test_full_mode_adds_wrk_where_it_reaches_and_httpload_where_socks5_is_needed():
    rows = _rows(full=True, missing={"haproxy": "not available: haproxy not installed"})
    clients = {}
    for target, client, _ in rows:
        clients.setdefault(client, []).append(target)
    assert clients["wrk c=1"] == clients["wrk c=64"] == ["direct", "nginx", "haproxy"]   # no SOCKS5: no ours
    assert clients["load c=1"] == clients["load 1000/s"] == ["direct", "nginx", "haproxy", "ours"]
    assert clients["c-load c=64"] == ["direct", "nginx", "haproxy", "ours", "wp-only", "wp-l4", "no-waypoint"]
    assert list(clients)[:2] == ["wrk c=1", "wrk c=64"] and len(rows) == 2 * 3 + 3 * 4 + 3 * 7
    assert {note for t, _, note in rows if t == "haproxy"} == {"not available: haproxy not installed"}
    assert {note for t, _, note in rows if t != "haproxy"} == {None}


def test_without_the_c_client_quick_mode_falls_back_to_httpload_and_wrk_rows_say_what_is_missing():
    rows = _rows(c_client_why="no C compiler (cc)")
    assert [(t, c) for t, c, _ in rows] == [(t, f"load {p}") for p in ("c=1", "c=64", "1000/s")
                                            for t in ("direct", "nginx", "haproxy", "ours")]
    full = _rows(full=True, wrk=False, c_client_why="no C compiler (cc)")
    notes = {c.split(" ")[0]: n for _, c, n in full}
    assert notes["wrk"] == "not available: wrk not installed (Debian package wrk)"
    assert notes["c-load"].startswith("not available: the C client") and notes["c-load"].endswith("(no C compiler (cc))")
    assert notes["load"] is None
