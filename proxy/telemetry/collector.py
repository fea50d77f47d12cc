"""Prometheus metric families kept as plain numbers, exposed by a custom collector when scraped.

Why: a prometheus_client child pays, on every ``inc``/``observe``, a method call and a ``threading.Lock``
(a histogram two, plus a Python walk of its buckets). The proxy updates its per-tunnel and per-request
metrics from one thread, the event loop, so those locks buy nothing on the hot path. Here the hot path
adds to attributes of a *series* object (one per label set, found by a dict lookup on the label
tuple) and ``PlainCollector.collect`` turns the series into prometheus_client's own ``*MetricFamily``
objects, which ``generate_latest`` formats exactly as it formats Counter/Histogram/Gauge children: same
names, HELP/TYPE lines, label order, value formatting and sample order (series in first-use order, as
prometheus_client keeps its children). Tests compare the bytes with prometheus_client's children
(tests/test_telemetry_fastpaths.py).

``_created`` samples: none, as with the children under ``disable_created_metrics()``, which
``Metrics`` switches on for the whole process (Envoy and ztunnel expose no ``*_created`` series).

Consistency: ``/metrics`` is served by ``proxy.admin.server`` on the same event loop as the traffic
(an asyncio server started in ``ProxyApp.run``), so a scrape runs between two callbacks and sees
every update whole — a closed tunnel's count and its bytes together. The series list is copied before
it is walked, so a series added during a scrape from another thread could not break the walk either.

PERF NOTE (in-process micro-benchmark, best of 7 x 200 000, same box, alternating trees):
- TCP, per tunnel (``Metrics.tcp_opened`` + ``tcp_closed(labels, 1024, 1024)`` on a memoised 23-value
  label tuple, as the node proxy and the waypoint call them): prometheus_client children 1.30 µs →
  plain numbers 0.27 µs.
- ``hbone_tunnels_active``, per waypoint tunnel (``tunnel_opened`` + ``tunnel_closed``): Gauge 0.80 µs →
  0.08 µs; since then the waypoint, like the node proxy, has it read from its live-tunnel set at scrape
  (``Metrics.count_tunnels_with``): nothing per tunnel (0.08 µs → 0, below any end-to-end resolution).
- HTTP, per request: in-process ``HttpPipeline.handle`` 41.0 → 36.4 µs.
End to end the TCP gain is below the benchmark's resolution on a shared 2-core box (CPU ticks of
10 ms; other helpers' runs alongside): ``.venv/bin/python -m benchmarks --only short --repeat 1
--clients python-h2 --short-count 3000``, ours-node proxy µs/stream over 8 alternating runs, median
118 (110–137) before, 120 (107–147) after; with ``--short-count 15000``, 4 alternating runs: 113
(112–124) before, 112 (109–115) after — i.e. ~1 µs of ~115, as the micro-benchmark says.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric


class Series(Protocol):
    """One label set's numbers. ``values()`` gives, per family of the collector and in its order, the
    arguments after the labels of that family's ``add_metric`` (a counter: ``(value,)``; a histogram:
    ``(buckets, sum_value)``)."""

    labels: tuple[str, ...]

    def values(self) -> Sequence[tuple]: ...


# One family: its prometheus_client class (CounterMetricFamily, HistogramMetricFamily, ...), name, help.
FamilySpec = tuple[Callable[..., Metric], str, str]


class PlainCollector:
    """Families that share label names and whose values live in ``series`` (key → ``Series``).

    The owner adds series with ``add`` (once per new label set) and then updates their attributes
    directly; the key is whatever the owner looks series up by (e.g. the label tuple before the
    response code is inserted)."""

    def __init__(self, registry: CollectorRegistry, labelnames: tuple[str, ...],
                 families: Sequence[FamilySpec]) -> None:
        self.labelnames = labelnames
        self.specs = tuple(families)
        self.series: dict = {}
        registry.register(self)

    def add(self, key, labels: tuple, factory: Callable[[tuple[str, ...]], Series]) -> Series:
        """A new series for ``key``. As prometheus_client's ``labels()``: the count must match and
        values become ``str`` (so a bad value fails here, not in every later scrape)."""
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.specs[0][1]}…: expected {len(self.labelnames)} label values "
                             f"({', '.join(self.labelnames[:2])}, …; see traffic_labels()), got {len(labels)}")
        series = self.series[key] = factory(tuple(map(str, labels)))
        return series

    def _families(self) -> list[Metric]:
        return [kind(name, help_text, labels=self.labelnames) for kind, name, help_text in self.specs]

    def describe(self) -> list[Metric]:
        return self._families()

    def collect(self) -> list[Metric]:
        families = self._families()
        for s in list(self.series.values()):
            for family, args in zip(families, s.values()):
                family.add_metric(s.labels, *args)
        return families

    def views(self) -> Iterator["FamilyView"]:
        """One read-only view per family, in order."""
        return (FamilyView(self, i) for i in range(len(self.specs)))


class FamilyView:
    """One family of a ``PlainCollector``, read as a prometheus_client metric is (``collect()``);
    not registered itself (the collector is)."""

    __slots__ = ("_owner", "_index")

    def __init__(self, owner: PlainCollector, index: int) -> None:
        self._owner, self._index = owner, index

    @property
    def name(self) -> str:
        return self._owner.specs[self._index][1]

    @property
    def labelnames(self) -> tuple[str, ...]:
        return self._owner.labelnames

    def collect(self) -> list[Metric]:
        return [self._owner.collect()[self._index]]

    def __repr__(self) -> str:
        return f"<FamilyView {self.name} series={len(self._owner.series)}>"
