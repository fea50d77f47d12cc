"""The destination node proxy names the Service a tunnel was for in its metrics as ztunnel's
guess_inbound_service does: the ``host=`` of the CONNECT's ``forwarded`` header (what the source node proxy
sends when its client addressed a Service, build_forwarded), trusted only when the destination workload is one
of that Service's endpoints; else ``destination_service="unknown"`` (it always was)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from hbone.connect import ConnectRequest
from proxy.node.inbound import forwarded_host, guess_inbound_service
from tests.node_helpers import inbound_node
from tests.test_node_inbound_fastpath import _echoes

INVENTORY = """workloads:
- uid: Kubernetes//v1/Pod/default/sink-0
  name: sink-0
  namespace: default
  serviceAccount: sink
  workloadIps: ["{pod}"]
  protocol: HBONE
  node: {node}
  services:
    default/sink.default.svc.cluster.local: {{9000: 9000}}
- uid: Kubernetes//v1/Pod/default/client-0
  name: client-0
  namespace: default
  serviceAccount: client
  workloadIps: ["{client}"]
  protocol: HBONE
  node: other-node
services:
- name: sink
  namespace: default
  hostname: sink.default.svc.cluster.local
  vips: ["/10.96.7.7"]
  ports: {{9000: 9000}}
- name: other
  namespace: default
  hostname: other.default.svc.cluster.local
  vips: ["/10.96.7.8"]
  ports: {{9000: 9000}}
"""


def test_forwarded_host_and_the_guess():
    req = ConnectRequest.build("10.0.0.1:9000", {"baggage": "x",
                                                 "forwarded": 'for="1.2.3.4:5";host=sink.default.svc.cluster.local'})
    assert forwarded_host(req) == "sink.default.svc.cluster.local"
    assert forwarded_host(ConnectRequest.build("10.0.0.1:9000", {"forwarded": 'for="1.2.3.4:5"'})) is None
    assert forwarded_host(ConnectRequest.build("10.0.0.1:9000")) is None


@pytest.fixture
async def node(tmp_path: Path, loopback_ip):
    async with inbound_node(tmp_path, loopback_ip, INVENTORY) as n:
        async def tunnel(host: str | None):
            fwd = f'for="{n.client_ip}:5555"' + (f";host={host}" if host else "")
            return await n.tunnel({"forwarded": fwd})
        yield n.store, n.metrics, tunnel


async def test_the_destination_service_comes_from_the_forwarded_host(node):
    store, metrics, tunnel = node
    inv = store.current.mesh.inventory
    wl = next(w for w in inv.workloads.values() if w.name == "sink-0")
    assert guess_inbound_service(inv, "sink.default.svc.cluster.local", wl).name == "sink"
    assert guess_inbound_service(inv, "other.default.svc.cluster.local", wl) is None   # not its endpoint
    assert guess_inbound_service(inv, "nowhere.example", wl) is None
    for host in ("sink.default.svc.cluster.local", "other.default.svc.cluster.local", None):
        s = await tunnel(host)
        assert await _echoes(s, b"hello") == b"hello"
        s.close()
    end = time.monotonic() + 5
    while time.monotonic() < end:
        text = metrics.exposition().decode()
        opened = [l for l in text.splitlines() if l.startswith("istio_tcp_connections_opened_total{")]
        if sum(float(l.rsplit(" ", 1)[1]) for l in opened) >= 3:
            break
        await asyncio.sleep(0.02)
    by_service = {}
    for line in opened:
        svc = line.split('destination_service="', 1)[1].split('"', 1)[0]
        by_service[svc] = by_service.get(svc, 0) + float(line.rsplit(" ", 1)[1])
    assert by_service == {"sink.default.svc.cluster.local": 1.0, "unknown": 2.0}, opened
