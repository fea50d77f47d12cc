"""Telemetry pieces the e2e ops tests do not reach: peer labels derived from CONNECT baggage."""

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
