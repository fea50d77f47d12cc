"""DestinationRule outlierDetection on a TCP service at the waypoint: Envoy's tcp_proxy reports every connect
attempt to the cluster's outlier detector (a failed one counts as a 5xx with split_external_local_origin_errors
off, as Istio leaves it), so a pod that refuses connections is ejected and later tunnels are not even tried on
it; before, every tunnel could dial it first and pay a failed attempt. Through a real waypoint on loopback."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from hbone.server import HboneServer
from tests.gateway_route_helpers import echo_through, start_version_pod, tcp_echo_inventory
from tests.waypoint_harness import Pod, cert_source, start_harness

DR = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo, namespace: default}
spec:
  host: tcp-echo
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, interval: 10s, baseEjectionTime: 60s, maxEjectionPercent: 100}
"""
TUNNELS = 24


async def _refusing_node(ip: str, tries: Counter) -> HboneServer:
    """v2's node proxy with nothing listening behind it: every CONNECT is answered 503 (a failed connect)."""
    async def node_inbound(tunnel):
        tries["v2"] += 1
        await tunnel.reject(503, "upstream connect failed")

    src = cert_source("default", "tcp-echo")
    return await HboneServer(src.server_context, node_inbound, trust_domain="cluster.local").start(ip, 15008)


async def test_a_pod_that_refuses_connections_is_ejected_from_a_tcp_cluster(tmp_path, loopback_ip):
    v1, v2 = loopback_ip(), loopback_ip()
    h = await start_harness(tmp_path, loopback_ip, routing=None, authz=False,
                            extra=tcp_echo_inventory(v1, v2) + "---\n" + DR, rng=random.Random(5))
    counts: Counter = Counter()
    tries: Counter = Counter()
    try:
        h.pods[v1] = await start_version_pod(v1, "v1", counts)
        h.pods[v2] = Pod(v2, "v2", hbone=await _refusing_node(v2, tries))
        client = h.client()
        replies = [await echo_through(client, b"n%d" % i) for i in range(TUNNELS)]
        # Every tunnel is served by v1 (a failed connect to v2 goes on to v1 within the tunnel's attempts) ...
        assert replies == [b"v1:n%d" % i for i in range(TUNNELS)]
        assert counts == Counter({"v1": TUNNELS})
        # ... and v2 is dialed once: its first failure ejects it (consecutive5xxErrors: 1) for 60 s. Without the
        # detector about half the tunnels would try v2 first (a random pick of two).
        assert tries["v2"] == 1
        (detector,) = [d for (cluster, _), d in h.waypoint.http.outliers.items() if "tcp-echo" in cluster]
        assert len(detector.ejected(asyncio.get_running_loop().time())) == 1
    finally:
        await h.close()


def test_detectors_are_made_once_and_bounded(monkeypatch):
    """One detector per (cluster, settings), looked up without allocating; reloads that rename clusters cannot
    grow the proxy's detectors, nor pod churn a detector's hosts, past their bounds (an ejection is kept)."""
    import policy.routing.endpoints as ep
    from policy.routing.model import OutlierDetection

    od = OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100.0)
    detectors: dict = {}
    first = ep.detector_for(detectors, "c0", od)
    assert ep.detector_for(detectors, "c0", od) is first
    first.record("pod-a", 503, 0.0)               # ejected: kept through pruning
    monkeypatch.setattr(ep, "OUTLIER_DETECTORS_MAX", 8)
    for i in range(1, 40):
        ep.detector_for(detectors, f"c{i}", od, now=1.0)
        assert len(detectors) <= 8
    assert detectors[("c0", od)] is first
    monkeypatch.setattr(ep, "OUTLIER_HOSTS_MAX", 16)
    for i in range(100):
        first.record(f"pod-{i}", 200, 1.0)
        assert len(first.hosts) <= 16
    assert first.ejected(1.0) == {"pod-a"}      # the ejected host is kept while others are forgotten
    for i in range(100):   # departed pods that keep a count or an ejection are forgotten too: the bound holds
        first.record(f"gone-{i}", 503, 2.0 + i / 1000)
        assert len(first.hosts) <= 16
    assert "gone-99" in first.hosts
    # A detector whose only ejection lapsed while it sat unused counts as having none.
    later: dict = {("old", od): ep.OutlierDetector(od)}
    later[("old", od)].record("x", 503, 0.0)      # ejected until 30
    monkeypatch.setattr(ep, "OUTLIER_DETECTORS_MAX", 1)
    ep.detector_for(later, "new", od, now=100.0)
    assert list(later) == [("new", od)]
