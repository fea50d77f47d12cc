"""Telemetry pieces the e2e ops tests do not reach: peer labels derived from CONNECT baggage, and the thread
/metrics is built on (the plain-number collectors rely on it being the event loop's)."""

from __future__ import annotations

from hbone.connect import Baggage, build_baggage, parse_baggage
from proxy.telemetry.metrics import LATEST, UNKNOWN, PeerInfo

PP = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


def test_peer_from_baggage_takes_names_from_baggage_and_identity_from_the_certificate():
    wire = build_baggage(Baggage(cluster="Kubernetes", namespace="evil", workload_name="productpage-v1",
                                 service_name="productpage", service_version="v1"))
    p = PeerInfo.from_baggage(PP, parse_baggage(wire))
    assert p == PeerInfo(workload="productpage-v1", namespace="default", principal=PP, app=UNKNOWN,
                         version=UNKNOWN, canonical_service="productpage", canonical_revision="v1",
                         cluster="Kubernetes")


def test_peer_from_baggage_defaults():
    assert PeerInfo.from_baggage(PP, None) == PeerInfo.from_identity(PP)
    p = PeerInfo.from_baggage(PP, parse_baggage("k8s.deployment.name=ratings-v1"))
    assert (p.workload, p.canonical_service, p.canonical_revision, p.cluster) == (
        "ratings-v1", "ratings-v1", LATEST, UNKNOWN)
    anon = PeerInfo.from_baggage(None, parse_baggage("k8s.namespace.name=ns1,k8s.pod.name=x"))
    assert (anon.principal, anon.namespace, anon.workload) == (UNKNOWN, "ns1", "x")
    assert PeerInfo.from_baggage(None, parse_baggage("garbage,,=;")) == PeerInfo()


async def test_metrics_are_scraped_on_the_event_loop_thread(loopback_ip):
    """The plain-number collectors (proxy/telemetry/collector.py) take no lock: they rely on /metrics
    being built on the same thread as the traffic that updates them, so a scrape sees each update
    whole. Here a live metrics listener serves a scrape; it is built on the loop's thread, and a
    tunnel closed just before is there with its count and bytes together."""
    import asyncio
    import threading

    from proxy.admin.server import AdminServer
    from proxy.telemetry.metrics import Metrics, traffic_labels

    metrics = Metrics(process_metrics=False)
    threads = []

    def scrape() -> bytes:
        threads.append(threading.get_ident())
        return metrics.exposition()

    labels = traffic_labels("destination", source=PeerInfo.from_identity(PP), destination=None, service=None,
                            request_protocol="tcp", security_policy="mutual_tls")
    metrics.tcp_opened(labels)
    metrics.tcp_closed(labels, 1234, 56)
    server = AdminServer(config_dump=dict, metrics=scrape, admin_addr=None, readiness_addr=None,
                         metrics_addr=f"{loopback_ip()}:0")
    async with server:
        reader, writer = await asyncio.open_connection(*server.addresses["metrics"])
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert response.startswith(b"HTTP/1.1 200")
    assert threads == [threading.get_ident()]      # this test's loop runs on this thread
    body = response.split(b"\r\n\r\n", 1)[1].decode()
    values = {line.split("{")[0]: line.rsplit(" ", 1)[1] for line in body.splitlines() if line.startswith("istio_tcp")}
    assert values == {"istio_tcp_connections_opened_total": "1.0", "istio_tcp_connections_closed_total": "1.0",
                      "istio_tcp_sent_bytes_total": "1234.0", "istio_tcp_received_bytes_total": "56.0"}
