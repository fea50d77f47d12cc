"""The HTTP metrics' plain-number collector exposes exactly what prometheus_client's own Counter and
Histogram children would for the same requests (untimed): names, help, types, label order, buckets,
sums and sample order, byte for byte."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.telemetry.metrics import ENVOY_DEFAULT_BUCKETS, HTTP_LABELS, TCP_LABELS, Metrics

_HTTP_FAMILIES = ("istio_requests", "istio_request_duration_milliseconds", "istio_request_bytes",
                  "istio_response_bytes")


def _reference(observations) -> bytes:
    """The same observations through prometheus_client's Counter and Histograms."""
    r = CollectorRegistry(auto_describe=True)
    total = Counter("istio_requests", "Requests processed by the proxy", HTTP_LABELS, registry=r)
    hists = [Histogram(name, help_text, HTTP_LABELS, buckets=ENVOY_DEFAULT_BUCKETS, registry=r) for name, help_text in (
        ("istio_request_duration_milliseconds", "Request duration in milliseconds"),
        ("istio_request_bytes", "Request size in bytes (headers and body as received)"),
        ("istio_response_bytes", "Response size in bytes (headers and body as sent)"))]
    for labels, status, grpc, values in observations:
        full = labels[:-2] + (str(status), grpc) + labels[-2:]
        total.labels(*full).inc()
        for h, v in zip(hists, values):
            h.labels(*full).observe(v)
    return generate_latest(r)


def _http_part(text: bytes) -> bytes:
    """The lines of the four HTTP families (HELP, TYPE and samples), in order."""
    keep = []
    for line in text.decode().splitlines():
        name = line.split()[2] if line.startswith("#") else line.split("{")[0]
        if any(name == f or name.startswith(f + "_") for f in _HTTP_FAMILIES):
            keep.append(line)
    return "\n".join(keep).encode()


def test_http_metrics_expose_what_prometheus_children_would():
    rng = random.Random(5)
    label_sets = [tuple(f"{n}-{i}" for n in TCP_LABELS) for i in range(3)]
    # Values on, between and beyond the bucket bounds (0, 0.5, 1, 3 000 000, ...), and the +Inf bucket.
    values = [0, 0.5, 0.7, 1, 1.0001, 5, 9.99, 250, 3_600_000, 5_000_000] + [rng.uniform(0, 20_000) for _ in range(50)]
    observations = [(rng.choice(label_sets), rng.choice((200, 403, 0)), rng.choice(("", "7")),
                     (rng.choice(values), rng.choice(values), rng.choice(values))) for _ in range(400)]
    m = Metrics(process_metrics=False)
    empty = _http_part(m.exposition())
    assert empty == _http_part(_reference([]))   # HELP/TYPE only, before the first request
    for labels, status, grpc, (d, req, resp) in observations:
        m.http_request(labels, status, d, req, resp, grpc)
    ours = _http_part(m.exposition())
    assert ours == _http_part(_reference(observations))
    assert ours.count(b"istio_requests_total{") == len({(o[0], o[1], o[2]) for o in observations})
