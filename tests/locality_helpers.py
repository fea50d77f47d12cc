"""The locality end-to-end set-up shared by the locality load-balancing and traffic-distribution tests: named
HTTP pods behind their node proxies, the reviews Service behind a waypoint whose pod has a locality, and that
waypoint on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import time

from hbone.stream import TcpStream
from policy.scope import WaypointScope
from proxy.http1.server import serve_http1
from proxy.settings import ProxySettings
from proxy.snapshot import ConfigStore
from proxy.telemetry.accesslog import AccessLog
from proxy.telemetry.metrics import Metrics
from proxy.waypoint import Waypoint
from tests.waypoint_harness import Harness, cert_source, start_node_inbound

WAYPOINT_GATEWAY = """apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: reviews-waypoint, namespace: default}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def reviews_inventory(pod_docs: str, wp_ip: str, vip: str, *, zone: str, service_lines: str = "") -> str:
    """An inventory: the workloads ``pod_docs`` (YAML list items), the waypoint's pod on ``wp_ip`` in region
    us-east, zone ``zone``, and the reviews Service (HTTP on 9080, VIP ``vip``) behind that waypoint, with
    ``service_lines`` (YAML lines at its indentation) added to the Service."""
    return "workloads:" + pod_docs + f"""
- uid: Kubernetes//v1/Pod/default/reviews-waypoint-0
  name: reviews-waypoint-0
  namespace: default
  serviceAccount: reviews-waypoint
  workloadIps: ["{wp_ip}"]
  protocol: TCP
  locality: {{region: us-east, zone: {zone}, subzone: ""}}
  labels: {{gateway.networking.k8s.io/gateway-name: reviews-waypoint}}
services:
- name: reviews
  namespace: default
  hostname: reviews.default.svc.cluster.local
  vips: ["/{vip}"]
  ports: {{9080: 9080}}
  appProtocols: {{9080: http}}
{service_lines}  waypoint: {{destination: "default/reviews-waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
"""


@contextlib.asynccontextmanager
async def named_pods_and_waypoint(cfg, wp_ip: str, vip: str, pods: dict[str, str], broken: set[str] = frozenset()):
    """The end-to-end locality set-up: each pod (ip → name) an HTTP server answering its name (503 while its name
    is in ``broken``) behind its node proxy, and a waypoint on ``wp_ip`` reading ``cfg``. Yields (waypoint, config
    store, fetch): ``fetch()`` is one GET to ``vip:9080`` on a tunnel of its own, → (status, body)."""
    servers, terminators = [], []
    for ip, name in pods.items():
        async def handler(request, responder, name=name):
            async for _ in request.body_chunks():
                pass
            await responder.send_local_reply(503 if name in broken else 200, name.encode())

        async def serve(reader, writer, handler=handler):
            await serve_http1(TcpStream(reader, writer), handler)

        servers.append(await asyncio.start_server(serve, ip, 9080))
        terminators.append(await start_node_inbound(ip, "bookinfo-reviews"))
    scope = WaypointScope.parse("default", gateway="default/reviews-waypoint", address_ip=wp_ip)
    store = ConfigStore([str(cfg)], mode="waypoint", scope=scope, clock=time.time)
    store.load()
    metrics = Metrics(process_metrics=False)
    access_log = AccessLog(io.StringIO(), metrics=metrics)
    settings_ = ProxySettings(mode="waypoint", config_paths=(str(cfg),), hbone_addr=(wp_ip, 15008))
    wp = await Waypoint.start(settings_, store, cert_source("default", "reviews-waypoint"), metrics, access_log,
                              rng=random.Random(5))
    h = Harness(wp, store, {}, wp_ip, metrics, io.StringIO(), access_log)
    client = h.client()

    async def fetch() -> tuple[int, str]:
        stream = await client.tunnel(f"{vip}:9080")
        try:
            status, _, body = await client.request(stream, "/")
            return status, body.decode()
        finally:
            stream.close()

    try:
        yield wp, store, fetch
    finally:
        await h.close()
        for t in terminators:
            await t.close()
        for srv in servers:
            srv.close()
            await srv.wait_closed()
