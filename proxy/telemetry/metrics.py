"""Istio standard metrics plus the proxy's own counters, on a private prometheus_client registry.

Names, label names, label order and value conventions follow Istio (reference/istio-semantics.md §4):
``istio/proxy source/extensions/filters/http/istio_stats/istio_stats.cc`` for the HTTP metrics and
ztunnel ``src/proxy/metrics.rs`` (``CommonTrafficLabels``) for the TCP ones.

Hot path: the pipeline builds a label tuple once per tunnel (``traffic_labels``, memoised) and then
calls ``tcp_opened`` / ``tcp_closed`` / ``http_request``. Each finds its series by a dict lookup on the
tuple and adds to plain numbers; a ``collector.PlainCollector`` per group (the four TCP counters, the
four HTTP metrics) turns them into the families when scraped, byte for byte as prometheus_client's
Counter/Histogram children would (see ``collector.py`` for why and the measured gain).
"""

from __future__ import annotations

import functools
import itertools
import math
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .cluster_stats import ClusterStatsCollector, write_text
from .collector import FamilySpec, PlainCollector

if TYPE_CHECKING:  # policy/ is a pure library; importing it only for types keeps telemetry import-light
    from policy.inventory import Service, Workload

# The exposition Content-Type of /metrics and /stats/prometheus: the classic text format 0.0.4, as
# Envoy and pilot-agent serve it (generate_latest writes that format; every Prometheus reads it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

UNKNOWN = "unknown"   # istio_stats.cc / ztunnel DefaultedUnknown: a missing value is "unknown"
LATEST = "latest"     # istio_stats.cc: a missing canonical revision is "latest"
NO_FLAGS = "-"        # Envoy %RESPONSE_FLAGS% with no flag set

# Envoy's default histogram buckets (source/common/stats/histogram_impl.cc
# HistogramSettingsImpl::defaultBuckets); Istio uses them for durations (ms) and sizes (bytes) alike.
ENVOY_DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)

# traffic_labels' memo bound: distinct (source, destination, service, flags, ...) inputs whose label tuple
# is kept. 4096 covers every pair in the seed's 2 ns x 25 deployments mesh with room for flag and status
# variants; past it the least recently used is rebuilt on its next use (its series is not affected).
LABEL_CACHE_SIZE = 4096

# Label names in the exact order istio_stats.cc pushes them for HTTP metrics.
HTTP_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal",
    "destination_app", "destination_version", "destination_service",
    "destination_canonical_service", "destination_canonical_revision",
    "destination_service_name", "destination_service_namespace", "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags",
    "connection_security_policy",
)
# TCP metrics carry the same labels minus response_code and grpc_response_status (ztunnel
# CommonTrafficLabels; Istio's TCP metrics). ``traffic_labels`` returns values in this order.
TCP_LABELS: tuple[str, ...] = tuple(n for n in HTTP_LABELS if n not in ("response_code", "grpc_response_status"))
_HTTP_INSERT_AT = TCP_LABELS.index("response_flags")  # where response_code, grpc_response_status go

REPORTERS = frozenset({"waypoint", "destination", "source"})
SECURITY_POLICIES = frozenset({"mutual_tls", "none", "unknown"})
REQUEST_PROTOCOLS = frozenset({"http", "grpc", "tcp"})

# Canonical-service labels, in the order Istio reads them (pkg/model/labels; istio_stats peer metadata).
CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
CANONICAL_REVISION_LABELS = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


def _v(value: str | None) -> str:
    return value if value else UNKNOWN


@dataclass(frozen=True)
class PeerInfo:
    """What the metrics say about one end of a connection (source or destination workload)."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN            # full SPIFFE URI, e.g. spiffe://cluster.local/ns/default/sa/curl
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = LATEST
    cluster: str = UNKNOWN

    @classmethod
    def from_workload(cls, w: "Workload", *, principal: str | None = None) -> "PeerInfo":
        """Labels for a known workload. ``principal`` overrides the workload's own identity: on the
        source side Istio reports the *verified* peer certificate identity, not what the inventory says."""
        labels = w.labels
        canonical = w.canonical_name or next((labels[k] for k in CANONICAL_NAME_LABELS if labels.get(k)), "")
        revision = w.canonical_revision or next((labels[k] for k in CANONICAL_REVISION_LABELS if labels.get(k)), "")
        workload = w.workload_name or w.name
        return cls(
            workload=_v(workload),
            namespace=_v(w.namespace),
            principal=_v(w.identity if principal is None else principal),
            app=_v(labels.get("app")),
            version=_v(labels.get("version")),
            # Istio: canonical service falls back to the workload name when no label names it.
            canonical_service=_v(canonical or workload),
            canonical_revision=revision or LATEST,
            cluster=_v(w.cluster_id),
        )

    @classmethod
    def from_identity(cls, identity: str | None) -> "PeerInfo":
        """A peer known only by its verified SPIFFE identity (no workload in our inventory): as ztunnel's
        DerivedWorkload, the namespace comes from the identity's ``/ns/<ns>/`` segment."""
        if not identity:
            return cls()
        parts = identity.split("/")
        ns = parts[parts.index("ns") + 1] if "ns" in parts[:-1] else ""
        return cls(principal=identity, namespace=_v(ns))


    @classmethod
    def from_baggage(cls, identity: str | None, baggage) -> "PeerInfo":
        """A peer known by its verified identity plus the ``baggage`` its node proxy put on the CONNECT
        (``hbone.connect.Baggage``: ztunnel ``src/baggage.rs``), as ztunnel's ``with_derived_source``:
        workload name, canonical service (``service.name``) and revision (``service.version``) and
        cluster come from the baggage; the principal and namespace only from the certificate, since
        baggage is unauthenticated. ``source_app``/``source_version`` stay unknown (no such keys)."""
        base = cls.from_identity(identity)
        if baggage is None:
            return base
        workload = getattr(baggage, "workload_name", "") or ""
        return cls(
            workload=_v(workload), namespace=base.namespace if identity else _v(getattr(baggage, "namespace", "")),
            principal=base.principal,
            canonical_service=_v(getattr(baggage, "service_name", "") or workload),
            canonical_revision=getattr(baggage, "service_version", "") or LATEST,
            cluster=_v(getattr(baggage, "cluster", "")))


@dataclass(frozen=True)
class ServiceInfo:
    """The destination service as metrics name it."""

    fqdn: str = UNKNOWN                 # destination_service: details.default.svc.cluster.local
    name: str = UNKNOWN                 # destination_service_name: details
    namespace: str = UNKNOWN            # destination_service_namespace

    @classmethod
    def from_service(cls, s: "Service") -> "ServiceInfo":
        return cls(fqdn=_v(s.hostname), name=_v(s.name), namespace=_v(s.namespace))


_NO_PEER = PeerInfo()
_NO_SERVICE = ServiceInfo()


@functools.lru_cache(maxsize=LABEL_CACHE_SIZE)
def traffic_labels(
    reporter: str,
    *,
    source: PeerInfo | None,
    destination: PeerInfo | None,
    service: ServiceInfo | None,
    request_protocol: str,
    response_flags: str | Iterable[str] = NO_FLAGS,
    security_policy: str,
) -> tuple[str, ...]:
    """Label values in ``TCP_LABELS`` order. Pure and memoised (inputs are frozen dataclasses and str).

    ``response_flags`` is an Envoy short string (``"UF,URX"``) or ``"-"``; ``http_request`` inserts
    ``response_code`` and ``grpc_response_status`` at Istio's position for the HTTP metrics.
    """
    if reporter not in REPORTERS:
        raise ValueError(f"reporter must be one of {sorted(REPORTERS)}, not {reporter!r}")
    if security_policy not in SECURITY_POLICIES:
        raise ValueError(f"connection_security_policy must be one of {sorted(SECURITY_POLICIES)}")
    if request_protocol not in REQUEST_PROTOCOLS:
        raise ValueError(f"request_protocol must be one of {sorted(REQUEST_PROTOCOLS)}")
    s = source or _NO_PEER
    d = destination or _NO_PEER
    svc = service or _NO_SERVICE
    return (
        reporter,
        s.workload, s.canonical_service, s.canonical_revision, s.namespace, s.principal, s.app, s.version,
        s.cluster,
        d.workload, d.namespace, d.principal, d.app, d.version,
        svc.fqdn,
        d.canonical_service, d.canonical_revision,
        svc.name, svc.namespace,
        d.cluster,
        request_protocol,
        format_flags(response_flags),
        security_policy,
    )


def format_flags(flags: str | Iterable[str] | None) -> str:
    """Envoy %RESPONSE_FLAGS%: short codes joined with ``,``; ``-`` when there are none."""
    if not flags:
        return NO_FLAGS
    if isinstance(flags, str):
        return flags
    joined = ",".join(f for f in flags if f and f != NO_FLAGS)
    return joined or NO_FLAGS


# Upper bounds of the HTTP histograms' buckets, +Inf last (as prometheus_client appends it).
_BOUNDS: tuple[float, ...] = tuple(float(b) for b in ENVOY_DEFAULT_BUCKETS) + (math.inf,)
_LE = tuple(floatToGoString(b) for b in _BOUNDS)

# The families, in exposition order, with Istio's names (a counter family's samples get "_total").
TCP_FAMILIES: tuple[FamilySpec, ...] = (
    (CounterMetricFamily, "istio_tcp_connections_opened", "TCP connections opened"),
    (CounterMetricFamily, "istio_tcp_connections_closed", "TCP connections closed"),
    (CounterMetricFamily, "istio_tcp_sent_bytes", "Bytes sent to the downstream during the connection"),
    (CounterMetricFamily, "istio_tcp_received_bytes", "Bytes received from the downstream during the connection"),
)
HTTP_FAMILIES: tuple[FamilySpec, ...] = (
    (CounterMetricFamily, "istio_requests", "Requests processed by the proxy"),
    (HistogramMetricFamily, "istio_request_duration_milliseconds", "Request duration in milliseconds"),
    # Istio's standard metrics: "a DISTRIBUTION which measures HTTP request [response] body sizes"; the values
    # recorded are the body bytes (proxy/pipeline/http.py passes request.body_bytes, responder.body_bytes).
    (HistogramMetricFamily, "istio_request_bytes", "HTTP request body size in bytes"),
    (HistogramMetricFamily, "istio_response_bytes", "HTTP response body size in bytes"),
)


class _TcpSeries:
    """One TCP label set: connections opened and closed, bytes sent to and received from the downstream
    (added when the connection closes, as ztunnel and Envoy's tcp_stats do)."""

    __slots__ = ("labels", "opened", "closed", "sent", "received")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.opened = self.closed = self.sent = self.received = 0

    def values(self) -> tuple:
        return (self.opened,), (self.closed,), (self.sent,), (self.received,)


class _Number:
    """A family without labels: one number (``hbone_tunnels_active``)."""

    __slots__ = ("labels", "value", "source")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.value = 0
        self.source: Callable[[], int] | None = None   # read at scrape time instead of `value`

    def values(self) -> tuple:
        return ((self.value if self.source is None else self.source(),),)


class _HttpSeries:
    """One HTTP label set's observations: a count, and per histogram a sum and per-bucket counts (not yet
    cumulative). An observation goes into the first bucket whose bound is >= it, as Histogram.observe."""

    __slots__ = ("labels", "count", "duration_sum", "duration", "request_sum", "request", "response_sum",
                 "response")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.count = 0
        self.duration_sum = self.request_sum = self.response_sum = 0.0
        self.duration = [0] * len(_BOUNDS)
        self.request = [0] * len(_BOUNDS)
        self.response = [0] * len(_BOUNDS)

    def values(self) -> tuple:
        return ((self.count,),
                (list(zip(_LE, itertools.accumulate(self.duration))), self.duration_sum),
                (list(zip(_LE, itertools.accumulate(self.request))), self.request_sum),
                (list(zip(_LE, itertools.accumulate(self.response))), self.response_sum))


class _JwksFetchCollector:
    def __init__(self) -> None:
        self.source: Callable[[], tuple[int, int]] | None = None

    def collect(self) -> list:
        if self.source is None:
            return []
        ok, failed = self.source()
        return [CounterMetricFamily("pilot_jwks_resolver_network_fetch_success",
                                    "Total number of successfully network fetch by pilot jwks resolver", value=ok),
                CounterMetricFamily("pilot_jwks_resolver_network_fetch_fail",
                                    "Total number of failed network fetch by pilot jwks resolver", value=failed)]

    def describe(self) -> list:
        return []   # (present only once a resolver is wired)


class Metrics:
    """All the proxy's metrics on one private registry (so tests and many proxies in one process
    never share series). Updated and scraped on the event loop's thread: the Istio families and
    ``hbone_tunnels_active`` are plain numbers without locks (collector.py says why that is safe); the
    rare counters (reloads, refusals, ...) stay prometheus_client metrics."""

    def __init__(self, *, process_metrics: bool = True) -> None:
        # Envoy and ztunnel expose no ``*_created`` series; prometheus_client's switch for them is
        # process-wide (checked at collect time), and this process is the proxy, so turn them off.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # --- Istio standard metrics (names exactly as Istio exposes them; Counter adds "_total") ---
        # The four per-request HTTP metrics and the four per-connection TCP ones: plain numbers per label
        # set, each group exposed by a collector (collector.py: why, and the measured gain).
        self.requests = PlainCollector(r, HTTP_LABELS, HTTP_FAMILIES)
        self.tcp = PlainCollector(r, TCP_LABELS, TCP_FAMILIES)
        # Each TCP family on its own, readable as a prometheus_client metric (``collect()``).
        self.tcp_opened_total, self.tcp_closed_total, self.tcp_sent, self.tcp_received = self.tcp.views()
        self._http_series = self.requests.series
        self._tcp_series = self.tcp.series
        # --- the proxy's own ---
        self.config_reloads = Counter(
            "hbone_config_reloads", "Configuration reloads by result", ("result",), registry=r)
        self.tls_handshake_failures = Counter(
            "hbone_tls_handshake_failures", "TLS handshakes that failed, by reason", ("reason",), registry=r)
        self.h2_protocol_errors = Counter(
            "hbone_h2_protocol_errors", "HTTP/2 protocol errors and abuse answered with GOAWAY/RST, by kind",
            ("kind",), registry=r)
        self.listener_refusals = Counter(
            "hbone_listener_refusals", "Everything an HBONE listener refused (hbone.server.Refusal), by kind and reason",
            ("kind", "reason"), registry=r)
        # Updated twice per waypoint tunnel: a plain number too (a Gauge's inc + dec took 0.80 µs, its lock
        # twice; now ~0.1 µs), exposed as the Gauge was.
        tunnels = PlainCollector(r, (), ((GaugeMetricFamily, "hbone_tunnels_active", "HBONE tunnels currently open"),))
        self._tunnels_active = tunnels.add((), (), _Number)
        (self.tunnels_active,) = tunnels.views()
        self.accesslog_dropped = Counter(
            "hbone_accesslog_dropped_lines", "Access-log lines dropped because the writer fell behind",
            registry=r)
        for result in ("success", "failure"):   # both series exist from the start, so rate() works at once
            self.config_reloads.labels(result=result)
        # istiod's JWKS resolver counters, where the waypoint does its fetching (proxy/jwks_resolver.py): read from
        # the resolver at scrape time (it counts on its own threads); no resolver, no families.
        self._jwks = _JwksFetchCollector()
        r.register(self._jwks)
        # --- Envoy's own names (envoy_cluster_*: the waypoint's circuit breakers, read at scrape time) ---
        # A registry of their own, written by cluster_stats.write_text and not generate_latest: that one names a
        # counter family's TYPE line "<name>_total", and Envoy's counters have no suffix (cluster_stats.py).
        self.envoy_registry = CollectorRegistry(auto_describe=False)
        self._cluster_stats = ClusterStatsCollector()
        self.envoy_registry.register(self._cluster_stats)
        if process_metrics:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    # ---- TCP (one per tunnel / connection) ----
    def tcp_opened(self, labels: tuple[str, ...]) -> None:
        series = self._tcp_series.get(labels)
        if series is None:
            series = self.tcp.add(labels, labels, _TcpSeries)
        series.opened += 1

    def tcp_closed(self, labels: tuple[str, ...], sent: int, received: int) -> None:
        """``sent``: bytes sent to the downstream (the client); ``received``: bytes received from it."""
        series = self._tcp_series.get(labels)
        if series is None:
            series = self.tcp.add(labels, labels, _TcpSeries)
        series.closed += 1
        series.sent += sent
        series.received += received

    # ---- HTTP (one per request) ----
    def http_request(self, labels: tuple[str, ...], status: int, duration_ms: float,
                     request_bytes: int, response_bytes: int, grpc_status: str = "") -> None:
        """Record one finished request. ``status`` 0 means no response was sent (istio_stats.cc)."""
        key = (labels, status, grpc_status)
        series = self._http_series.get(key)
        if series is None:
            full = labels[:_HTTP_INSERT_AT] + (str(int(status)), grpc_status) + labels[_HTTP_INSERT_AT:]
            series = self.requests.add(key, full, _HttpSeries)
        series.count += 1
        series.duration_sum += duration_ms
        series.duration[bisect_left(_BOUNDS, duration_ms)] += 1
        series.request_sum += request_bytes
        series.request[bisect_left(_BOUNDS, request_bytes)] += 1
        series.response_sum += response_bytes
        series.response[bisect_left(_BOUNDS, response_bytes)] += 1

    # ---- the proxy's own ----
    def config_reload(self, ok: bool) -> None:
        self.config_reloads.labels(result="success" if ok else "failure").inc()

    def tls_handshake_failure(self, reason: str) -> None:
        self.tls_handshake_failures.labels(reason=reason or UNKNOWN).inc()

    def h2_protocol_error(self, kind: str) -> None:
        self.h2_protocol_errors.labels(kind=kind or UNKNOWN).inc()

    def listener_refusal(self, kind: str, reason: str) -> None:
        """One refusal of an HBONE listener: the total by kind/reason, plus the TLS or HTTP/2 counter
        it belongs to (``tls`` → handshake failures; ``connection``/``stream`` → protocol errors)."""
        self.listener_refusals.labels(kind=kind or UNKNOWN, reason=reason or UNKNOWN).inc()
        if kind == "tls":
            self.tls_handshake_failure(reason)
        elif kind in ("connection", "stream"):
            self.h2_protocol_error(reason)

    def tunnel_opened(self) -> None:
        self._tunnels_active.value += 1

    def tunnel_closed(self) -> None:
        self._tunnels_active.value -= 1

    def count_tunnels_with(self, source: Callable[[], int]) -> None:
        """``hbone_tunnels_active`` read from ``source()`` at scrape time (the node proxy, which
        already counts its live tunnels per listener: no update per tunnel at all)."""
        self._tunnels_active.source = source

    def cluster_stats_from(self, source: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Envoy's per-cluster stats as ``envoy_cluster_<stat>{cluster_name="<name>"}`` families, read from
        ``source()`` at scrape time: the ``(cluster.<name>.<stat>, value)`` pairs admin ``/stats`` shows (the
        waypoint's ``CircuitBreakers.envoy_stats``). A later call replaces the source (one waypoint per proxy)."""
        self._cluster_stats.source = source

    def jwks_fetches_from(self, source: Callable[[], tuple[int, int]]) -> None:
        """``pilot_jwks_resolver_network_fetch_success_total`` / ``_fail_total`` (istiod's names) from
        ``source()`` = (successful, failed) fetches, at scrape time."""
        self._jwks.source = source

    def exposition(self) -> bytes:
        """The Prometheus text format (``CONTENT_TYPE``) of everything in this registry, then the Envoy-named
        families (``envoy_registry``)."""
        return generate_latest(self.registry) + write_text(self.envoy_registry.collect())

    def __repr__(self) -> str:
        return (f"<Metrics tcp_label_sets={len(self._tcp_series)} "
                f"http_label_sets={len(self._http_series)} tunnels_active={self._tunnels_active.value}>")
