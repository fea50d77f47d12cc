"""Envoy's per-cluster stats (the waypoint's circuit breakers) in the Prometheus exposition, named as Envoy names them.

Istio users read a waypoint's or sidecar's circuit-breaker numbers through Prometheus as Envoy exports them::

    # TYPE envoy_cluster_upstream_rq_pending_overflow counter
    envoy_cluster_upstream_rq_pending_overflow{cluster_name="outbound|9080|v1|reviews.default.svc.cluster.local"} 3

Envoy gets there from the stat ``cluster.<name>.upstream_rq_pending_overflow`` (what admin ``/stats`` lists) so:

* tag extraction: Istio's bootstrap ``stats_tags`` entry ``cluster_name``, regex
  ``^cluster\\.((.+?(\\..+?\\.svc\\.cluster\\.local)?)\\.)``, moves the cluster's name into the label
  ``cluster_name`` and out of the stat's name, which becomes ``cluster.upstream_rq_pending_overflow``;
* ``PrometheusStatsFormatter::metricName`` (source/server/admin/prometheus_stats.cc): ``"envoy_"`` + the name with
  every character outside ``[a-zA-Z0-9_]`` made ``_`` (``sanitizeName``);
* ``outputStatType``: ``# TYPE <name> counter`` for a counter — no ``_total`` suffix — and ``gauge`` for a gauge;
  ``generateNumericOutput``: the value as the integer it is (``fmt::format("{}", metric.value())``).

The numbers come, at scrape time, from the same callable that answers admin ``/stats``
(``CircuitBreakers.envoy_stats``): both show exactly the same clusters and stats, and nothing on the request path
is touched. A cluster without limits is never kept there, so it has no series here either.

Why a writer of our own: prometheus_client's ``generate_latest`` names every counter family's ``# TYPE`` line
``<name>_total`` (exposition.py, "Munging from OpenMetrics into Prometheus format"), so Envoy's counter names cannot
pass through it. ``ClusterStatsCollector`` is a prometheus_client ``Collector`` (its families are ``Metric`` objects
any prometheus_client tool can read); ``write_text`` writes its families in the text format 0.0.4 as Envoy does,
and ``Metrics.exposition`` appends that to the registry's own output.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

ENVOY_PREFIX = "envoy_"                  # prometheus_stats.cc metricName: "add namespacing prefix"
CLUSTER_SCOPE = "cluster."               # every cluster's stats are rooted at cluster.<name>.
CLUSTER_NAME_LABEL = "cluster_name"      # Istio's bootstrap stats_tags tag_name (Envoy's Config::TagNames)

# Envoy's type and description of each cluster stat that admin /stats shows (Envoy docs,
# configuration/upstream/cluster_manager/cluster_stats: "Every cluster has a statistics tree rooted at
# cluster.<name>. with the following statistics").
CLUSTER_STAT_TYPES: dict[str, tuple[str, str]] = {
    "upstream_rq_pending_overflow": ("counter", "Total requests that overflowed connection pool or requests "
                                                "(mainly for HTTP/2 and above) circuit breaking and were failed"),
    "upstream_cx_overflow": ("counter", "Total times that the cluster's connection circuit breaker overflowed"),
    "upstream_rq_retry_overflow": ("counter", "Total requests not retried due to circuit breaking or exceeding "
                                              "the retry budget"),
    "upstream_cx_max_requests": ("counter", "Total connections closed due to maximum requests"),
    "upstream_rq_active": ("gauge", "Total active requests"),
    "upstream_cx_active": ("gauge", "Total active connections"),
    "upstream_rq_pending_active": ("gauge", "Total active requests pending a connection pool connection"),
}
# A stat missing from the table above is still shown (as /stats shows it), typed "unknown" (written ``untyped``):
# its number is visible, with no claim about what kind it is. tests/test_circuit_breaker_prometheus.py checks that
# every stat CircuitBreakers.envoy_stats lists is in the table.
UNKNOWN_STAT = ("unknown", "Envoy-style stat")

# Envoy's exposition order: every counter family, then every gauge family (statsAsPrometheus), each by name.
_TYPE_ORDER = {"counter": 0, "gauge": 1, "unknown": 2}
_NOT_PROMETHEUS = re.compile(r"[^a-zA-Z0-9_]")   # prometheus_stats.cc promRegex


def sanitize(name: str) -> str:
    """Envoy's ``sanitizeName``: every character outside ``[a-zA-Z0-9_]`` becomes ``_``."""
    return _NOT_PROMETHEUS.sub("_", name)


def envoy_series(stat_name: str) -> tuple[str, dict[str, str], str, str]:
    """An admin ``/stats`` name → (Prometheus family name, labels, type, help), as Envoy with Istio's tags exports
    it: ``cluster.<name>.<stat>`` → ``envoy_cluster_<stat>`` with ``cluster_name="<name>"``.

    The cluster's name is everything between ``cluster.`` and the last dot (a stat's own name has none), whatever it
    ends with. Istio's regex gets the same for every ``*.svc.cluster.local`` cluster; for another host (a
    ServiceEntry's ``httpbin.org``) it would stop at the host's first dot and put the rest in the metric's name
    (``envoy_cluster_org_upstream_...``), which no one queries for: the whole name is what a user expects."""
    if stat_name.startswith(CLUSTER_SCOPE):
        cluster, dot, stat = stat_name[len(CLUSTER_SCOPE):].rpartition(".")
        if dot and cluster:
            typ, doc = CLUSTER_STAT_TYPES.get(stat, UNKNOWN_STAT)
            return f"{ENVOY_PREFIX}cluster_{sanitize(stat)}", {CLUSTER_NAME_LABEL: cluster}, typ, doc
    typ, doc = CLUSTER_STAT_TYPES.get(stat_name.rpartition(".")[2], UNKNOWN_STAT)
    return ENVOY_PREFIX + sanitize(stat_name), {}, typ, doc


def cluster_families(stats: Iterable[tuple[str, int]]) -> list[Metric]:
    """``(name, value)`` pairs as admin ``/stats`` lists them → the Prometheus families, Envoy's order (counters,
    then gauges, each by name; the series in the order given: ``envoy_stats`` sorts them by cluster). Each sample is
    named as its family (no ``_total``: Envoy's counters have none)."""
    families: dict[str, Metric] = {}
    for name, value in stats:
        family, labels, typ, doc = envoy_series(name)
        metric = families.get(family)
        if metric is None:
            metric = families[family] = Metric(family, doc, typ)
        metric.add_sample(family, labels, value)
    return sorted(families.values(), key=lambda m: (_TYPE_ORDER.get(m.type, len(_TYPE_ORDER)), m.name))


class ClusterStatsCollector(Collector):
    """Reads ``source()`` — the ``(name, value)`` pairs admin ``/stats`` shows, e.g. ``CircuitBreakers.envoy_stats`` —
    at every scrape. No source (a node proxy, or before the waypoint is built): no families."""

    def __init__(self, source: Callable[[], Iterable[tuple[str, int]]] | None = None) -> None:
        self.source = source

    def collect(self) -> list[Metric]:
        return cluster_families(self.source()) if self.source is not None else []

    def describe(self) -> list[Metric]:
        # The family names depend on the stats kept at scrape time: nothing to announce (or collect) at registration.
        return []

    def __repr__(self) -> str:
        return f"<ClusterStatsCollector {'wired' if self.source is not None else 'unwired'}>"


def _number(value: float) -> str:
    # /stats and Envoy write a count as the integer it is ("3"); anything else as prometheus_client would.
    return str(value) if isinstance(value, int) else floatToGoString(value)


def _label_value(value: str) -> str:
    # Text format 0.0.4: "label_value can be any sequence of UTF-8 characters, but the backslash (\), double-quote
    # ("), and line feed (\n) characters have to be escaped as \\, \", and \n, respectively."
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def write_text(families: Iterable[Metric]) -> bytes:
    """Families of single-number series (counters, gauges, unknown) in the text format 0.0.4, named as given:
    ``# HELP``, ``# TYPE`` (``untyped`` for unknown, as generate_latest writes it), then one line per series.
    A family without series writes nothing (Envoy's outputStatType skips an empty group)."""
    out: list[str] = []
    for m in families:
        if not m.samples:
            continue
        doc = m.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {m.name} {doc}\n# TYPE {m.name} {'untyped' if m.type == 'unknown' else m.type}\n")
        for s in m.samples:
            labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in s.labels.items())
            out.append(f"{s.name}{{{labels}}} {_number(s.value)}\n" if labels else f"{s.name} {_number(s.value)}\n")
    return "".join(out).encode("utf-8")


__all__ = ["ClusterStatsCollector", "cluster_families", "envoy_series", "write_text", "sanitize",
           "CLUSTER_STAT_TYPES", "CLUSTER_NAME_LABEL", "ENVOY_PREFIX"]
