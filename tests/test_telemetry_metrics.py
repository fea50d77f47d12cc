"""Istio standard metrics: names, label names/order/values, exact counts and bytes, parsed back with
prometheus_client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from policy.inventory import Service, Workload, NetworkAddress
from proxy.telemetry.metrics import (
    ENVOY_DEFAULT_BUCKETS,
    HTTP_LABELS,
    LATEST,
    TCP_LABELS,
    Metrics,
    PeerInfo,
    ServiceInfo,
    traffic_labels,
)

PRODUCTPAGE = Workload(uid="pp", name="productpage-v1-6b746f74dc-9stvs", namespace="default",
                       workload_ips=("10.244.1.5",), service_account="bookinfo-productpage",
                       labels={"app": "productpage", "version": "v1"}, workload_name="productpage-v1",
                       cluster_id="Kubernetes")
REVIEWS_V1 = Workload(uid="r1", name="reviews-v1-abc", namespace="default", workload_ips=("10.244.2.11",),
                      service_account="bookinfo-reviews", labels={"app": "reviews", "version": "v1"},
                      workload_name="reviews-v1")
REVIEWS = Service(name="reviews", namespace="default", hostname="reviews.default.svc.cluster.local",
                  vips=(NetworkAddress("", "10.96.104.108"),), ports={9080: 9080})


def families(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}


def samples(m: Metrics, name: str, suffix: str = "") -> list:
    return [s for s in families(m)[name].samples if s.name == name + suffix]


def test_label_names_are_istios_in_order():
    assert HTTP_LABELS[:2] == ("reporter", "source_workload")
    assert HTTP_LABELS[-5:] == ("request_protocol", "response_code", "grpc_response_status", "response_flags",
                                "connection_security_policy")
    assert len(HTTP_LABELS) == 25 and len(TCP_LABELS) == 23
    assert set(HTTP_LABELS) - set(TCP_LABELS) == {"response_code", "grpc_response_status"}
    m = Metrics(process_metrics=False)
    assert m.requests.labelnames == HTTP_LABELS
    assert m.tcp_sent.labelnames == TCP_LABELS


def test_peer_info_from_workload_follows_istio_conventions():
    p = PeerInfo.from_workload(PRODUCTPAGE)
    assert p == PeerInfo(workload="productpage-v1", namespace="default",
                         principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
                         app="productpage", version="v1", canonical_service="productpage",
                         canonical_revision="v1", cluster="Kubernetes")
    bare = Workload(uid="x", name="x-pod", namespace="ns1", workload_ips=("1.1.1.1",))
    b = PeerInfo.from_workload(bare, principal="spiffe://td/ns/ns1/sa/other")
    # canonical service falls back to the workload name; revision to "latest"; missing → unknown
    assert (b.canonical_service, b.canonical_revision, b.app, b.version, b.cluster) == (
        "x-pod", LATEST, "unknown", "unknown", "unknown")
    assert b.principal == "spiffe://td/ns/ns1/sa/other"
    explicit = Workload(uid="y", name="y", namespace="n", workload_ips=("2.2.2.2",),
                        labels={"app": "a", "service.istio.io/canonical-name": "canon",
                                "service.istio.io/canonical-revision": "r7"})
    e = PeerInfo.from_workload(explicit)
    assert (e.app, e.canonical_service, e.canonical_revision) == ("a", "canon", "r7")
    ident = PeerInfo.from_identity("spiffe://cluster.local/ns/foo/sa/bar")
    assert (ident.namespace, ident.principal, ident.workload) == ("foo", "spiffe://cluster.local/ns/foo/sa/bar",
                                                                  "unknown")
    assert PeerInfo.from_identity(None) == PeerInfo()
    assert ServiceInfo.from_service(REVIEWS) == ServiceInfo("reviews.default.svc.cluster.local", "reviews", "default")


def test_traffic_labels_validates_and_memoises():
    kw = dict(source=PeerInfo.from_workload(PRODUCTPAGE), destination=PeerInfo.from_workload(REVIEWS_V1),
              service=ServiceInfo.from_service(REVIEWS), request_protocol="http", security_policy="mutual_tls")
    a = traffic_labels("waypoint", response_flags="-", **kw)
    assert traffic_labels("waypoint", response_flags="-", **kw) is a      # cached: same tuple object
    assert dict(zip(TCP_LABELS, a))["destination_service_name"] == "reviews"
    assert traffic_labels("waypoint", response_flags=("UF", "URX"), **kw)[TCP_LABELS.index("response_flags")] == "UF,URX"
    assert traffic_labels("waypoint", response_flags=(), **kw)[TCP_LABELS.index("response_flags")] == "-"
    with pytest.raises(ValueError):
        traffic_labels("sidecar", response_flags="-", **kw)
    with pytest.raises(ValueError):
        traffic_labels("waypoint", source=None, destination=None, service=None, request_protocol="http",
                       security_policy="tls")


def test_counts_and_bytes_exact_after_known_traffic():
    m = Metrics()
    src, dst = PeerInfo.from_workload(PRODUCTPAGE), PeerInfo.from_workload(REVIEWS_V1)
    svc = ServiceInfo.from_service(REVIEWS)
    tcp = traffic_labels("waypoint", source=src, destination=dst, service=svc, request_protocol="tcp",
                         response_flags="-", security_policy="mutual_tls")
    for sent, received in ((100, 7), (250, 3), (0, 0)):
        m.tcp_opened(tcp)
        m.tcp_closed(tcp, sent=sent, received=received)
    m.tcp_opened(tcp)   # still open
    http = traffic_labels("waypoint", source=src, destination=dst, service=svc, request_protocol="http",
                          response_flags="-", security_policy="mutual_tls")
    m.http_request(http, 200, 3.0, 120, 900)
    m.http_request(http, 200, 30.0, 80, 100)
    denied = traffic_labels("waypoint", source=src, destination=None, service=svc, request_protocol="http",
                            response_flags="-", security_policy="mutual_tls")
    m.http_request(denied, 403, 0.2, 60, 19)
    m.config_reload(True)
    m.config_reload(False)
    m.config_reload(False)
    m.tls_handshake_failure("no client certificate")
    m.h2_protocol_error("rapid_reset")
    m.tunnel_opened(); m.tunnel_opened(); m.tunnel_closed()

    expected_tcp = dict(zip(TCP_LABELS, tcp))
    [opened] = samples(m, "istio_tcp_connections_opened", "_total")
    assert opened.labels == expected_tcp and opened.value == 4
    [closed] = samples(m, "istio_tcp_connections_closed", "_total")
    assert closed.value == 3
    [sent] = samples(m, "istio_tcp_sent_bytes", "_total")
    [recv] = samples(m, "istio_tcp_received_bytes", "_total")
    assert (sent.value, recv.value) == (350, 10)
    assert expected_tcp["source_principal"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    assert expected_tcp["reporter"] == "waypoint" and expected_tcp["request_protocol"] == "tcp"

    reqs = {s.labels["response_code"]: s for s in samples(m, "istio_requests", "_total")}
    assert set(reqs) == {"200", "403"}
    assert reqs["200"].value == 2 and reqs["403"].value == 1
    assert set(reqs["200"].labels) == set(HTTP_LABELS)
    assert reqs["200"].labels["grpc_response_status"] == ""
    assert reqs["403"].labels["destination_workload"] == "unknown"
    assert reqs["403"].labels["destination_canonical_revision"] == "latest"

    def hist(name):
        out = {}
        for s in families(m)[name].samples:
            if s.labels.get("response_code") == "200":
                out[(s.name.rsplit("_", 1)[1], s.labels.get("le"))] = s.value
        return out
    d = hist("istio_request_duration_milliseconds")
    assert d[("count", None)] == 2 and d[("sum", None)] == 33.0
    assert d[("bucket", "1.0")] == 0 and d[("bucket", "5.0")] == 1 and d[("bucket", "50.0")] == 2
    les = sorted(float(le) for kind, le in d if kind == "bucket" and le != "+Inf")
    assert les == [float(b) for b in ENVOY_DEFAULT_BUCKETS]
    assert hist("istio_request_bytes")[("sum", None)] == 200
    assert hist("istio_response_bytes")[("sum", None)] == 1000

    reloads = {s.labels["result"]: s.value for s in samples(m, "hbone_config_reloads", "_total")}
    assert reloads == {"success": 1, "failure": 2}
    assert samples(m, "hbone_tls_handshake_failures", "_total")[0].labels == {"reason": "no client certificate"}
    assert samples(m, "hbone_h2_protocol_errors", "_total")[0].value == 1
    assert samples(m, "hbone_tunnels_active")[0].value == 1
    fams = families(m)
    assert "process_cpu_seconds" in fams and "python_info" in fams       # process + platform collectors
    assert not any(s.name.endswith("_created") for f in fams.values() for s in f.samples)  # as Istio: none
    assert "tunnels_active=1" in repr(m)


def test_registries_are_private_and_label_sets_checked():
    a, b = Metrics(process_metrics=False), Metrics(process_metrics=False)
    labels = [traffic_labels("destination", source=PeerInfo(workload=f"w{i}"), destination=None, service=None,
                             request_protocol="tcp", response_flags="-", security_policy="unknown")
              for i in range(5)]
    for lab in labels:
        b.tcp_opened(lab)
    assert len(samples(b, "istio_tcp_connections_opened", "_total")) == 5   # every series is kept
    assert samples(a, "istio_tcp_connections_opened", "_total") == []       # a saw nothing of b
    assert "tcp_label_sets=5" in repr(b)
    # The wrong number of label values is refused when the series would be made, as
    # prometheus_client's labels() did, and leaves nothing behind that would break a scrape.
    for bad in (("too", "short"), labels[0] + ("extra",)):
        with pytest.raises(ValueError, match="expected 23 label values"):
            b.tcp_opened(bad)
        with pytest.raises(ValueError, match="expected 23 label values"):
            b.tcp_closed(bad, 1, 1)
        with pytest.raises(ValueError, match="expected 25 label values"):
            b.http_request(bad, 200, 1.0, 1, 1)
    assert len(samples(b, "istio_tcp_connections_opened", "_total")) == 5
    # A non-str label value is exposed as its str(), as prometheus_client's labels() does.
    odd = labels[0][:-1] + (None,)
    b.tcp_opened(odd)
    [none] = [s for s in samples(b, "istio_tcp_connections_opened", "_total")
              if s.labels["connection_security_policy"] == "None"]
    assert none.value == 1
