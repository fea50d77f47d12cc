"""What the Gateway API route tests (GRPCRoute, TCPRoute, TLSRoute, TCP outlier detection) share: a mesh from
YAML texts, an app with one Service per version as the Istio tasks deploy it, and the tcp-echo set of the TCP
tests (inventory, route table, TCPRoute documents, version pods that answer ``<version>:<what they read>``)."""

from __future__ import annotations

from collections import Counter

import yaml

from policy.errors import Where
from policy.loader import build_mesh_config
from policy.routing.table import build_route_table
from tests.stream_helpers import exchange
from tests.waypoint_harness import Pod, start_answering_pod

TCP_VIP = "127.2.0.61"   # the harness's own tcp-echo uses 127.2.0.60; these tests declare their own
WAYPOINT_LINE = '  waypoint: {destination: "default/reviews-waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}\n'


def mesh_of(*texts: str):
    docs = []
    for text in texts:
        for d in yaml.safe_load_all(text):
            if d is not None:
                docs.append((Where("mesh.yaml", len(docs) + 1), d))
    return build_mesh_config(docs)


def versions_inventory(app: str, port: int, protocol: str, vips: tuple[str, str, str], pod_ips: tuple[str, str], *,
                       waypoint: bool = True) -> str:
    """``app`` (``protocol`` on ``port``, behind the reviews waypoint unless ``waypoint`` is false) and one Service
    per version, ``app``-v1 and ``app``-v2 (``vips``: app's, v1's, v2's), as the Istio tasks deploy them: each
    version's pod (on ``pod_ips``, service account ``app``) backs ``app`` and its version's Service."""
    pods = ""
    for version, ip in zip(("v1", "v2"), pod_ips):
        pods += f"""
- uid: Kubernetes//v1/Pod/default/{app}-{version}-0
  name: {app}-{version}-0
  namespace: default
  serviceAccount: {app}
  workloadIps: ["{ip}"]
  protocol: HBONE
  labels: {{app: {app}, version: {version}}}
  services:
    default/{app}.default.svc.cluster.local: {{{port}: {port}}}
    default/{app}-{version}.default.svc.cluster.local: {{{port}: {port}}}
"""
    services = ""
    for name, vip in zip((app, f"{app}-v1", f"{app}-v2"), vips):
        services += f"""
- name: {name}
  namespace: default
  hostname: {name}.default.svc.cluster.local
  vips: ["/{vip}"]
  ports: {{{port}: {port}}}
  appProtocols: {{{port}: {protocol}}}
""" + (WAYPOINT_LINE if name == app and waypoint else "")
    return "workloads:" + pods + "services:" + services


def tcp_echo_inventory(v1_ip: str = "10.0.9.1", v2_ip: str = "10.0.9.2", *, waypoint: bool = True) -> str:
    """tcp-echo (a TCP port, behind the reviews waypoint) and one Service per version, as the Istio task
    deploys them (tcp-echo-services.yaml): each pod backs tcp-echo and its version's Service."""
    return versions_inventory("tcp-echo", 9000, "tcp", (TCP_VIP, "127.2.0.62", "127.2.0.63"), (v1_ip, v2_ip),
                              waypoint=waypoint)


def table_of(*texts: str, gateway: str | None = "default/waypoint"):
    mesh = mesh_of(tcp_echo_inventory(), *texts)
    bound = [mesh.inventory.services[k] for k in ("default/tcp-echo.default.svc.cluster.local",)]
    return mesh, build_route_table(mesh.inventory, bound, mesh.virtual_services, mesh.destination_rules,
                                   mesh.http_routes, waypoint_namespace="default", gateway=gateway)


def route_doc(rules: list, *, name: str = "tcp-echo", ns: str | None = None, parent: dict | None = None) -> str:
    meta = {"name": name} | ({"namespace": ns} if ns else {})
    parent = parent or {"group": "", "kind": "Service", "name": "tcp-echo", "port": 9000}
    if ns:
        parent = {**parent, "namespace": "default"}
    return yaml.safe_dump({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute", "metadata": meta,
                           "spec": {"parentRefs": [parent], "rules": rules}})


def backends(*pairs) -> list:
    return [{"backendRefs": [{"name": n, "port": 9000, "weight": w} for n, w in pairs]}]


async def start_version_pod(ip: str, version: str, counts: Counter) -> Pod:
    """A TCP pod that answers each connection with ``<version>:<what it read>`` and closes; counts them."""
    async def answer(stream) -> bytes:
        data = await stream.read()
        counts[version] += 1
        return data

    return await start_answering_pod(ip, version, answer)


async def echo_through(client, payload: bytes) -> bytes:
    """``payload`` on a tunnel of its own to tcp-echo, read to EOF without half-closing (a version pod answers
    after one read)."""
    t = await client.tunnel(f"{TCP_VIP}:9000")
    try:
        return await exchange(t, payload, half_close=False)
    finally:
        t.close()
