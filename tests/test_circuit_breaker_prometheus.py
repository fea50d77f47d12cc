"""The waypoint's circuit-breaker numbers in the Prometheus exposition, as Envoy exports its cluster stats
(proxy/telemetry/cluster_stats.py): ``envoy_cluster_<stat>{cluster_name="<cluster>"} N``, counters typed
``counter`` with no ``_total``, gauges ``gauge`` — exactly the set admin ``GET /stats`` shows.

The naming and the writer on their own, then ``Metrics`` wired to a real ``CircuitBreakers``, then end to end: a real
overflow through the waypoint harness (real TLS, the waypoint's HBONE server, reviews pods), scraped over HTTP from
the metrics listener and compared with admin ``/stats`` of the same waypoint.
"""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.server import AdminServer
from proxy.pipeline.circuit import CircuitBreakers, CircuitLimits
from proxy.telemetry.cluster_stats import (CLUSTER_STAT_TYPES, ClusterStatsCollector, cluster_families, envoy_series,
                                           sanitize, write_text)
from proxy.telemetry.metrics import Metrics
from tests.waypoint_harness import REVIEWS_VIP, config_docs, destination_rule, start_harness, until, virtual_service

C = "inbound-vip|9080|http/v1|reviews.default.svc.cluster.local"   # the waypoint's cluster for reviews subset v1
OUTBOUND = "outbound|9080|v1|reviews.default.svc.cluster.local"


def _envoy_families(text: str) -> dict[str, object]:
    """The ``envoy_`` families of an exposition, parsed by prometheus_client, by name."""
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("envoy_")}


def _series(text: str) -> dict[tuple[str, str], float]:
    """(family, cluster_name) → value of every ``envoy_cluster_`` series of an exposition."""
    return {(f.name, s.labels["cluster_name"]): s.value
            for f in _envoy_families(text).values() for s in f.samples}


def _from_stats(pairs) -> dict[tuple[str, str], float]:
    """What /stats' ``cluster.<name>.<stat>: N`` lines say, keyed as ``_series``."""
    out = {}
    for name, value in pairs:
        cluster, _, stat = name[len("cluster."):].rpartition(".")
        out[(f"envoy_cluster_{stat}", cluster)] = value
    return out


# ---------------------------------------------------------------------------------------------
# Naming: Envoy's metricName / sanitizeName with Istio's cluster_name tag


def test_cluster_stat_names_become_envoy_families_with_the_cluster_as_a_label():
    assert envoy_series(f"cluster.{OUTBOUND}.upstream_rq_pending_overflow") == (
        "envoy_cluster_upstream_rq_pending_overflow", {"cluster_name": OUTBOUND}, "counter",
        CLUSTER_STAT_TYPES["upstream_rq_pending_overflow"][1])
    family, labels, typ, _ = envoy_series(f"cluster.{C}.upstream_rq_active")
    assert (family, labels, typ) == ("envoy_cluster_upstream_rq_active", {"cluster_name": C}, "gauge")
    # A host outside .svc.cluster.local keeps its whole name (Istio's regex would cut it at the first dot).
    assert envoy_series("cluster.outbound|80||httpbin.org.upstream_cx_overflow")[:3] == (
        "envoy_cluster_upstream_cx_overflow", {"cluster_name": "outbound|80||httpbin.org"}, "counter")
    # Not a cluster stat, or one we have no type for: still shown, sanitized, typed unknown.
    assert envoy_series("server.live")[:3] == ("envoy_server_live", {}, "unknown")
    assert envoy_series(f"cluster.{C}.upstream-new")[:3] == ("envoy_cluster_upstream_new", {"cluster_name": C},
                                                              "unknown")
    assert sanitize("a.b|c-d/e:f_9") == "a_b_c_d_e_f_9"


def test_every_stat_that_admin_stats_shows_has_envoys_type():
    """The /stats set (CircuitBreakers.envoy_stats) is all typed: Envoy's *_active are gauges, the rest counters."""
    cb = CircuitBreakers()
    cb.begin_request(C, CircuitLimits(max_requests=1))
    names = [n.rsplit(".", 1)[1] for n, _ in cb.envoy_stats()]
    assert len(names) == 7 and set(names) == set(CLUSTER_STAT_TYPES)
    for stat in names:
        assert CLUSTER_STAT_TYPES[stat][0] == ("gauge" if stat.endswith("_active") else "counter")


# ---------------------------------------------------------------------------------------------
# The writer


def test_writer_writes_envoys_text_counters_without_total_and_integers_as_stats_does():
    text = write_text(cluster_families([(f"cluster.{OUTBOUND}.upstream_rq_pending_overflow", 3),
                                        (f"cluster.{OUTBOUND}.upstream_rq_active", 0),
                                        ("cluster.b.upstream_rq_pending_overflow", 12)])).decode()
    assert text == (
        "# HELP envoy_cluster_upstream_rq_pending_overflow Total requests that overflowed connection pool or requests"
        " (mainly for HTTP/2 and above) circuit breaking and were failed\n"
        "# TYPE envoy_cluster_upstream_rq_pending_overflow counter\n"
        f'envoy_cluster_upstream_rq_pending_overflow{{cluster_name="{OUTBOUND}"}} 3\n'
        'envoy_cluster_upstream_rq_pending_overflow{cluster_name="b"} 12\n'
        "# HELP envoy_cluster_upstream_rq_active Total active requests\n"
        "# TYPE envoy_cluster_upstream_rq_active gauge\n"
        f'envoy_cluster_upstream_rq_active{{cluster_name="{OUTBOUND}"}} 0\n')
    assert write_text(cluster_families([])) == b""
    assert write_text(cluster_families([("server.live", 1)])) == (
        b"# HELP envoy_server_live Envoy-style stat\n# TYPE envoy_server_live untyped\nenvoy_server_live 1\n")


@settings(max_examples=150, deadline=None)
@given(cluster=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
       value=st.integers(min_value=0, max_value=2**64 - 1))
def test_any_cluster_name_round_trips_through_the_prometheus_parser(cluster, value):
    """Quotes, backslashes and newlines in a label value are escaped (text format 0.0.4); the parser reads back
    the same name and number."""
    text = write_text(cluster_families([(f"cluster.{cluster}.upstream_cx_overflow", value)])).decode()
    (family,) = text_string_to_metric_families(text)
    assert (family.name, family.type) == ("envoy_cluster_upstream_cx_overflow", "counter")
    assert [(s.labels, s.value) for s in family.samples] == [({"cluster_name": cluster}, value)]


# ---------------------------------------------------------------------------------------------
# Metrics wired to real circuit breakers


def test_no_cluster_kept_no_series_and_the_rest_of_the_exposition_unchanged():
    """A node proxy (nothing wired) and a waypoint whose clusters have no limits (none is kept) add nothing:
    the exposition is the registry's, byte for byte."""
    m = Metrics(process_metrics=False)
    assert m.exposition() == generate_latest(m.registry)
    cb = CircuitBreakers()
    m.cluster_stats_from(cb.envoy_stats)
    cb.stats(C)   # reading a cluster's numbers does not keep it
    assert m.exposition() == generate_latest(m.registry) and b"envoy_" not in m.exposition()


def test_the_exposition_shows_exactly_what_admin_stats_shows_read_at_scrape_time():
    m = Metrics(process_metrics=False)
    cb = CircuitBreakers()
    m.cluster_stats_from(cb.envoy_stats)
    one = CircuitLimits(max_connections=1, max_pending_requests=1, max_requests=1, max_retries=1)
    assert cb.begin_request(OUTBOUND, one) and not cb.begin_request(OUTBOUND, one)   # 1 pending overflow
    assert cb.begin_retry(C, one) and not cb.begin_retry(C, one)                      # 1 retry overflow
    text = m.exposition().decode()
    assert _series(text) == _from_stats(cb.envoy_stats())
    assert len(_series(text)) == 14   # two clusters x the seven stats /stats lists
    lines = text.splitlines()
    assert f'envoy_cluster_upstream_rq_pending_overflow{{cluster_name="{OUTBOUND}"}} 1' in lines
    assert f'envoy_cluster_upstream_rq_retry_overflow{{cluster_name="{C}"}} 1' in lines
    assert f'envoy_cluster_upstream_rq_active{{cluster_name="{OUTBOUND}"}} 1' in lines
    families = _envoy_families(text)
    assert {n: f.type for n, f in families.items()} == {
        f"envoy_cluster_{stat}": typ for stat, (typ, _) in CLUSTER_STAT_TYPES.items()}
    # Nothing is cached: the next scrape reads the breakers again.
    cb.end_request(OUTBOUND)
    assert not cb.begin_request(OUTBOUND, CircuitLimits(max_requests=0))
    lines = m.exposition().decode().splitlines()
    assert f'envoy_cluster_upstream_rq_pending_overflow{{cluster_name="{OUTBOUND}"}} 2' in lines
    assert f'envoy_cluster_upstream_rq_active{{cluster_name="{OUTBOUND}"}} 0' in lines
    # A later source replaces the first (one waypoint per proxy): no family twice.
    m.cluster_stats_from(CircuitBreakers().envoy_stats)
    assert b"envoy_" not in m.exposition()
    assert repr(ClusterStatsCollector()) == "<ClusterStatsCollector unwired>"


# ---------------------------------------------------------------------------------------------
# End to end: a real overflow at the waypoint, scraped over HTTP


ROUTING_MAX_REQUESTS_1 = config_docs(
    virtual_service("reviews", "- route: [{destination: {host: reviews, subset: v1}}]"),
    destination_rule("reviews", traffic_policy="{connectionPool: {http: {http2MaxRequests: 1}}}", subsets=("v1",)))


async def _tunnel(h):
    client = h.client()
    return client, await client.tunnel(f"{REVIEWS_VIP}:9080")


async def _get(tunnel, path: str) -> tuple[int, bytes]:
    client, stream = tunnel
    try:
        status, _, body = await client.request(stream, path)
        return status, body
    finally:
        stream.close()


async def _http_get(addr: tuple[str, int], path: str) -> tuple[int, str, str]:
    """A real HTTP/1.1 GET on the listener: (status, content-type, body)."""
    reader, writer = await asyncio.open_connection(*addr)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *header_lines = head.decode().split("\r\n")
        headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in header_lines if x)}
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
        return int(status_line.split()[1]), headers["content-type"], body.decode()
    finally:
        writer.close()


async def test_an_overflow_at_the_waypoint_is_scraped_as_envoys_series(tmp_path, loopback_ip):
    """Istio's circuit-breaking task read through Prometheus: http2MaxRequests 1, a second request while the first
    is in flight gets 503 UO; /metrics and /stats/prometheus then carry
    ``envoy_cluster_upstream_rq_pending_overflow{cluster_name="<cluster>"} 1``, the same numbers as admin /stats."""
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=ROUTING_MAX_REQUESTS_1)
    breakers = h.waypoint.http.breakers
    admin = AdminServer(config_dump=dict, metrics=h.metrics.exposition, stats=breakers.envoy_stats,
                        admin_addr=f"{loopback_ip()}:0", metrics_addr=f"{loopback_ip()}:0", readiness_addr=None)
    try:
        await admin.start()
        metrics_addr = admin.addresses["metrics"]
        _, _, before = await _http_get(metrics_addr, "/metrics")
        assert "envoy_" not in before   # no limited cluster used yet: no series

        t1, t2 = await _tunnel(h), await _tunnel(h)
        first = asyncio.ensure_future(_get(t1, "/slow?s=0.5"))
        await until(lambda: breakers.stats(C)["rq_active"] == 1, "first request in flight")
        assert (await _get(t2, "/"))[0] == 503   # over http2MaxRequests: UO
        assert (await first)[0] == 200

        status, ctype, stats_body = await _http_get(admin.addresses["admin"], "/stats")
        assert status == 200 and f"cluster.{C}.upstream_rq_pending_overflow: 1" in stats_body.splitlines()
        stats_pairs = [(n, int(v)) for n, _, v in (line.rpartition(": ") for line in stats_body.splitlines())]
        for path in ("/metrics", "/stats/prometheus"):
            status, ctype, text = await _http_get(metrics_addr, path)
            assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
            lines = text.splitlines()
            assert "# TYPE envoy_cluster_upstream_rq_pending_overflow counter" in lines
            assert f'envoy_cluster_upstream_rq_pending_overflow{{cluster_name="{C}"}} 1' in lines
            assert "# TYPE envoy_cluster_upstream_rq_active gauge" in lines
            assert f'envoy_cluster_upstream_rq_active{{cluster_name="{C}"}} 0' in lines
            assert f'envoy_cluster_upstream_cx_overflow{{cluster_name="{C}"}} 0' in lines
            # The same set and numbers as /stats (only the limited cluster is kept), and the whole exposition —
            # Istio's families and ours — parses.
            assert _series(text) == _from_stats(stats_pairs) and len(stats_pairs) == 7
            families = list(text_string_to_metric_families(text))
            assert any(f.name == "istio_requests" for f in families)
            overflow = next(f for f in families if f.name == "envoy_cluster_upstream_rq_pending_overflow")
            assert overflow.type == "counter" and [(s.labels, s.value) for s in overflow.samples] == [
                ({"cluster_name": C}, 1)]
    finally:
        await admin.close()
        await h.close()
