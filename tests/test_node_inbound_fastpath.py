"""The node proxy's inbound fast paths are in effect on a live InboundProxy (real mTLS, real HBONE
client, real sockets; not timed): the relay runs without a task per live tunnel, an allowed
tunnel's decision and metrics labels are memoised per config snapshot (a reload starts over), the
end-of-tunnel bookkeeping (metrics, tracker) still happens, and a policy reload still closes a
live tunnel it now denies (late rejection reaches detached relays)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from hbone.pool import HbonePool
from proxy.identity import Identities
from proxy.telemetry.metrics import Metrics
from tests.node_helpers import PORT, inbound_node
from tests.waypoint_harness import MESH, cert_source


INVENTORY = """
workloads:
- uid: Kubernetes//v1/Pod/default/sink-0
  name: sink-0
  namespace: default
  serviceAccount: sink
  workloadIps: ["{pod}"]
  protocol: HBONE
  node: {node}
- uid: Kubernetes//v1/Pod/default/client-0
  name: client-0
  namespace: default
  serviceAccount: client
  workloadIps: ["{client}"]
  protocol: HBONE
  node: other-node
"""

DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: default}
spec:
  action: DENY
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/client"]}
"""


async def _wait(cond, what: str, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def node(tmp_path: Path, loopback_ip):
    async with inbound_node(tmp_path, loopback_ip, INVENTORY) as n:
        yield n.proxy, n.store, n.tracker, n.metrics, n.tunnel, n.cfg


def _closed_total(metrics: Metrics) -> float:
    return sum(s.value for m in metrics.tcp_closed_total.collect() for s in m.samples if s.name.endswith("_total"))


async def _echoes(stream, data: bytes) -> bytes:
    stream.write(data)
    await stream.drain()
    got = b""
    while len(got) < len(data):
        got += await asyncio.wait_for(stream.read(), 5)
    return got


async def test_live_tunnels_hold_no_handler_task_and_share_one_memoised_decision(node):
    proxy, store, tracker, metrics, tunnel, _ = node
    a, b = await tunnel(), await tunnel()
    assert await _echoes(a, b"one") == b"one" and await _echoes(b, b"two") == b"two"
    conns = list(next(iter(proxy.servers.values()))._conns)
    await _wait(lambda: all(not c.handler_tasks for c in conns), "handlers to return")
    assert sum(len(c.streams) for c in conns) == 2            # the tunnels live on without their tasks
    assert len(tracker.live) == 2
    facts = [t.facts for t in tracker.live.values()]
    assert facts[0] is facts[1]                                 # the second tunnel hit the memo
    assert len(proxy._memo) == 1 and proxy._memo_snap is store.current
    for s in (a, b):
        s.write_eof()
        assert await asyncio.wait_for(s.read(), 5) == b""
    await _wait(lambda: not tracker.live, "tracker to forget both tunnels")
    assert _closed_total(metrics) == 2                          # the detached relays reported their end


async def test_a_reload_starts_the_memo_over_and_late_rejection_reaches_a_detached_relay(node):
    proxy, store, tracker, metrics, tunnel, cfg = node
    a = await tunnel()
    assert await _echoes(a, b"x") == b"x"
    first_snap = store.current
    (cfg / "deny.yaml").write_text(DENY_CLIENT)
    store.load()
    closed = tracker.recheck(store.current)                     # what NodeProxy.on_config does
    assert closed == 1
    with pytest.raises(ConnectionError):
        while await asyncio.wait_for(a.read(), 5):
            pass
    await _wait(lambda: not tracker.live, "the rejected tunnel's end")
    assert _closed_total(metrics) == 1
    assert proxy._memo_snap is first_snap                       # nothing new dialled yet
    from hbone.errors import TunnelRefused
    with pytest.raises(TunnelRefused) as info:
        await tunnel()
    assert info.value.status == 401                             # decided afresh on the new snapshot
    assert proxy._memo_snap is store.current and not proxy._memo   # denials are not memoised


async def test_an_unreachable_pod_port_is_answered_503_from_the_dial_callback(node, loopback_ip):
    proxy, store, tracker, metrics, tunnel, _ = node
    from hbone.errors import TunnelRefused
    pod = next(iter(proxy.servers))
    src = cert_source("default", "client")
    pool = HbonePool(src.client_context, trust_domain="cluster.local")
    try:
        with pytest.raises(TunnelRefused) as info:    # nothing listens on the pod's port 9001
            await pool.open_tunnel(src_identity=src.identity, dst=(pod, 15008), authority=f"{pod}:{PORT + 1}",
                                   dst_identities=frozenset({MESH.identity("default", "sink")}),
                                   local_host=loopback_ip())
        assert info.value.status == 503
    finally:
        await pool.close()
    await _wait(lambda: not tracker.live, "the refused tunnel to be forgotten")
    assert _closed_total(metrics) == 0
    assert all(not c.handler_tasks for s in proxy.servers.values() for c in s._conns)


# ---- node outbound (SOCKS5 → HBONE): relayed detached too ----

async def _socks_tunnel(socks_addr, client_ip: str, dst_ip: str, port: int):
    import struct
    reader, writer = await asyncio.open_connection(*socks_addr, local_addr=(client_ip, 0))
    writer.write(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(dst_ip) + struct.pack("!H", port))
    assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\x05\x00"
    reply = await asyncio.wait_for(reader.readexactly(10), 5)
    assert reply[1] == 0, reply
    return reader, writer


@pytest.fixture
async def outbound(node):
    proxy, store, tracker, metrics, tunnel, cfg = node
    from proxy.node.outbound import OutboundProxy
    inv = store.current.mesh.inventory
    client = next(w for w in inv.workloads.values() if w.name == "client-0")
    out_metrics = Metrics(process_metrics=False)
    out = OutboundProxy(snapshot=lambda: store.current, local_workloads=lambda: {client.workload_ips[0]: client},
                        identities=Identities(ca=MESH.ca), trust_domain="cluster.local", metrics=out_metrics)
    addr = await out.start_socks5(client.workload_ips[0], 0)
    try:
        yield out, addr, client.workload_ips[0], next(iter(proxy.servers)), out_metrics
    finally:
        await out.close()


async def test_outbound_tunnels_are_relayed_without_their_task_and_counted(outbound):
    out, addr, client_ip, pod, metrics = outbound
    reader, writer = await _socks_tunnel(addr, client_ip, pod, PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    await _wait(lambda: not out._conn_tasks, "the connection's task to end")
    assert out.active == 1 and len(out._live) == 1          # the relay lives on, detached, and counts
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await _wait(lambda: out.active == 0, "the relay's end")
    assert _closed_total(metrics) == 1                      # reported by the detached relay's end


async def test_outbound_drain_deadline_cuts_a_detached_relay(outbound):
    out, addr, client_ip, pod, metrics = outbound
    reader, writer = await _socks_tunnel(addr, client_ip, pod, PORT)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    await _wait(lambda: not out._conn_tasks, "the connection's task to end")
    await out.close(drain_deadline=0.1)
    assert out.active == 0 and _closed_total(metrics) == 1  # cut, and its end reported before close returned
    try:
        cut = await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:
        cut = True
    assert cut
    writer.close()
