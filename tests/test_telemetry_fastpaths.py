"""The Istio metrics' (and hbone_tunnels_active's) plain-number collectors (proxy/telemetry/collector.py) expose exactly what
prometheus_client's own Counter and Histogram children would for the same traffic (untimed): names,
help, types, label order, buckets, sums, value formatting and sample order, byte for byte."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.telemetry.collector import PlainCollector
from proxy.telemetry.metrics import ENVOY_DEFAULT_BUCKETS, HTTP_LABELS, TCP_LABELS, Metrics


class _Reference:
    """The eight Istio metrics and the tunnels gauge as prometheus_client children, registered in the order
    ``Metrics`` had them
    and updated as its code did before the collectors (all of a label set's children made at its first
    use; byte counts added only when non-zero, as Counter.inc refuses nothing else)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.total = Counter("istio_requests", "Requests processed by the proxy", HTTP_LABELS, registry=r)
        self.hists = [Histogram(name, help_text, HTTP_LABELS, buckets=ENVOY_DEFAULT_BUCKETS, registry=r)
                      for name, help_text in (
                          ("istio_request_duration_milliseconds", "Request duration in milliseconds"),
                          ("istio_request_bytes", "HTTP request body size in bytes"),
                          ("istio_response_bytes", "HTTP response body size in bytes"))]
        self.tcp = [Counter(name, help_text, TCP_LABELS, registry=r) for name, help_text in (
            ("istio_tcp_connections_opened", "TCP connections opened"),
            ("istio_tcp_connections_closed", "TCP connections closed"),
            ("istio_tcp_sent_bytes", "Bytes sent to the downstream during the connection"),
            ("istio_tcp_received_bytes", "Bytes received from the downstream during the connection"))]
        self._tcp_children: dict = {}
        self.active = Gauge("hbone_tunnels_active", "HBONE tunnels currently open", registry=r)

    def _tcp_child(self, labels):
        if labels not in self._tcp_children:
            self._tcp_children[labels] = tuple(c.labels(*labels) for c in self.tcp)
        return self._tcp_children[labels]

    def tcp_opened(self, labels) -> None:
        self._tcp_child(labels)[0].inc()

    def tcp_closed(self, labels, sent, received) -> None:
        _, closed, s, r = self._tcp_child(labels)
        closed.inc()
        if sent:
            s.inc(sent)
        if received:
            r.inc(received)

    def http_request(self, labels, status, duration_ms, request_bytes, response_bytes, grpc_status="") -> None:
        full = labels[:-2] + (str(status), grpc_status) + labels[-2:]
        children = [m.labels(*full) for m in (self.total, *self.hists)]
        children[0].inc()
        for h, v in zip(children[1:], (duration_ms, request_bytes, response_bytes)):
            h.observe(v)

    def tunnel_opened(self) -> None:
        self.active.inc()

    def tunnel_closed(self) -> None:
        self.active.dec()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _istio_part(text: bytes) -> bytes:
    """The lines of the Istio families and the tunnels gauge (HELP, TYPE and samples), in order."""
    keep = []
    for line in text.decode().splitlines():
        name = line.split()[2] if line.startswith("#") else line.split("{")[0].split()[0]
        if name.startswith("istio_") or name == "hbone_tunnels_active":
            keep.append(line)
    return "\n".join(keep).encode()


def _label_sets(n: int) -> list[tuple[str, ...]]:
    # Values that need escaping in the exposition (quote, backslash, newline) included.
    return [tuple(f'{name}-{i}' if j % 5 else f'v"\\{i}\n' for j, name in enumerate(TCP_LABELS)) for i in range(n)]


def test_http_metrics_expose_what_prometheus_children_would():
    rng = random.Random(5)
    label_sets = _label_sets(3)
    # Values on, between and beyond the bucket bounds (0, 0.5, 1, 3 000 000, ...), and the +Inf bucket.
    values = [0, 0.5, 0.7, 1, 1.0001, 5, 9.99, 250, 3_600_000, 5_000_000] + [rng.uniform(0, 20_000) for _ in range(50)]
    m, ref = Metrics(process_metrics=False), _Reference()
    assert _istio_part(m.exposition()) == _istio_part(ref.exposition())   # HELP/TYPE only, before any traffic
    seen = set()
    for _ in range(400):
        labels, status, grpc = rng.choice(label_sets), rng.choice((200, 403, 0)), rng.choice(("", "7"))
        args = (labels, status, rng.choice(values), rng.choice(values), rng.choice(values), grpc)
        m.http_request(*args)
        ref.http_request(*args)
        seen.add((labels, status, grpc))
    ours = _istio_part(m.exposition())
    assert ours == _istio_part(ref.exposition())
    assert ours.count(b"istio_requests_total{") == len(seen)


def test_tcp_metrics_expose_what_prometheus_children_would():
    rng = random.Random(7)
    label_sets = _label_sets(6)
    # Byte counts: none, one, a frame, a large transfer, and one past 2**32.
    sizes = [0, 1, 1024, 16_384, 1 << 30, (1 << 32) + 5]
    m, ref = Metrics(process_metrics=False), _Reference()
    assert _istio_part(m.exposition()) == _istio_part(ref.exposition())
    for step in range(600):
        labels = rng.choice(label_sets[:-1])   # the last set: opened only, below
        op = rng.random()
        if op < 0.45:
            for target in (m, ref):
                target.tcp_opened(labels)
        elif op < 0.9:
            args = (labels, rng.choice(sizes), rng.choice(sizes))
            for target in (m, ref):
                target.tcp_closed(*args)
        elif op < 0.95:   # an HTTP request among the tunnels: the families stay apart and in order
            args = (labels, 200, 3.0, 10, 20, "")
            for target in (m, ref):
                target.http_request(*args)
        else:   # the waypoint's live-tunnel gauge, below zero too (as a Gauge allows)
            for target in (m, ref):
                target.tunnel_closed() if op < 0.97 else target.tunnel_opened()
        if step % 150 == 0:   # scraped mid-traffic, as Prometheus does
            assert _istio_part(m.exposition()) == _istio_part(ref.exposition())
    for target in (m, ref):
        target.tcp_opened(label_sets[-1])     # still open: closed and bytes are 0 for it
    ours = _istio_part(m.exposition())
    assert ours == _istio_part(ref.exposition())
    assert ours.count(b"istio_tcp_sent_bytes_total{") == len(label_sets)
    # A closed tunnel's count and bytes land together (one label set, one scrape).
    closed_before = sum(s.value for f in m.tcp_closed_total.collect() for s in f.samples)
    m.tcp_closed(label_sets[0], 5, 6)
    [closed] = m.tcp_closed_total.collect()
    assert closed.name == "istio_tcp_connections_closed" and closed.type == "counter"
    assert sum(s.value for s in closed.samples) == closed_before + 1
    assert {s.name for s in closed.samples} == {"istio_tcp_connections_closed_total"}


def test_the_hot_path_uses_plain_collectors_not_prometheus_children():
    """Regression check (untimed): the eight Istio families and the tunnels gauge are served by
    PlainCollectors, so a tunnel or a request takes no prometheus_client lock; the families keep the
    order they had as prometheus_client metrics."""
    m = Metrics(process_metrics=False)
    collectors = list(m.registry._collector_to_names)
    plain = [c for c in collectors if isinstance(c, PlainCollector)]
    assert [c.labelnames for c in plain] == [HTTP_LABELS, TCP_LABELS, ()]
    names = {n for c in plain for n in m.registry._collector_to_names[c]}
    assert {"istio_requests_total", "istio_tcp_connections_opened_total", "istio_tcp_sent_bytes_total",
            "istio_request_duration_milliseconds_bucket", "hbone_tunnels_active"} <= names
    others = {n for c in collectors if c not in plain for n in m.registry._collector_to_names[c]}
    assert not any(n.startswith("istio_") for n in others)
    order = [line.split()[2] for line in m.exposition().decode().splitlines() if line.startswith("# HELP")]
    assert order == [
        "istio_requests_total", "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes",
        "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total", "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total", "hbone_config_reloads_total", "hbone_tls_handshake_failures_total",
        "hbone_h2_protocol_errors_total", "hbone_listener_refusals_total", "hbone_tunnels_active",
        "hbone_accesslog_dropped_lines_total"]
