"""A destination node proxy's inbound side, in-process, for tests: one sink pod (an echo server on PORT) on its
node, a client pod elsewhere, real HBONE tunnels from the client with the client's certificate."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import NamedTuple

from hbone.pool import HbonePool
from proxy.identity import Identities
from proxy.node import local_workloads
from proxy.node.inbound import InboundProxy, InboundTracker
from proxy.snapshot import ConfigStore
from proxy.telemetry.metrics import Metrics
from tests.waypoint_harness import MESH, cert_source

NODE = "node-x"
PORT = 9000


class InboundNode(NamedTuple):
    proxy: InboundProxy
    store: ConfigStore
    tracker: InboundTracker
    metrics: Metrics
    tunnel: object    # async (headers=None) -> HboneStream: a tunnel from the client pod to the sink's PORT
    cfg: Path
    client_ip: str


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@asynccontextmanager
async def inbound_node(tmp_path: Path, loopback_ip, inventory: str):
    """``inventory``: YAML with ``{pod}``, ``{client}`` and ``{node}`` to fill in."""
    pod, client = loopback_ip(), loopback_ip()
    cfg = tmp_path / "mesh"
    cfg.mkdir()
    (cfg / "inventory.yaml").write_text(inventory.format(pod=pod, client=client, node=NODE))
    store = ConfigStore([str(cfg)], mode="node", scope=None, clock=time.time)
    store.load()
    metrics = Metrics(process_metrics=False)
    tracker = InboundTracker(NODE)
    proxy = InboundProxy(node=NODE, port=15008, snapshot=lambda: store.current, identities=Identities(ca=MESH.ca),
                         trust_domain="cluster.local", tracker=tracker, metrics=metrics)
    await proxy.reconcile(local_workloads(store.current, NODE))
    backend = await asyncio.start_server(echo, pod, PORT)
    src = cert_source("default", "client")
    pool = HbonePool(src.client_context, trust_domain="cluster.local")

    async def tunnel(headers: dict | None = None):
        return await pool.open_tunnel(src_identity=src.identity, dst=(pod, 15008), authority=f"{pod}:{PORT}",
                                      dst_identities=frozenset({MESH.identity("default", "sink")}), local_host=client,
                                      headers=headers or {})

    try:
        yield InboundNode(proxy, store, tracker, metrics, tunnel, cfg, client)
    finally:
        await pool.close()
        await proxy.close()
        backend.close()
