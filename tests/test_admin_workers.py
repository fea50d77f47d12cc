"""--workers N: worker 0's /metrics sums every worker's exposition (proxy/admin/workers.py)."""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request

import pytest

from proxy.admin.server import AdminServer
from proxy.admin.workers import (MAX_WORKER_EXPOSITION_BYTES, WorkerMetrics, WorkerMetricsPublisher, _parse,
                                 fetch_worker, merge_expositions, socket_path)
from proxy.telemetry import metrics as M


def _samples(text: str) -> dict[str, float]:
    return {k: v for fam in _parse(text) for k, v in fam.samples.items()}


def _labels(i: int) -> tuple[str, ...]:
    return tuple(f"v{i}-{n}" for n in M.TCP_LABELS)


def _traffic(m: M.Metrics, shape: list[tuple[int, int, float]]) -> None:
    for who, status, ms in shape:
        m.http_request(_labels(who), status, ms, 100 * who, 1000 + who)
        m.tcp_opened(_labels(who))
        m.tcp_closed(_labels(who), 10 * who, 20 * who)


def test_merge_of_two_workers_equals_one_proxy_that_saw_all_the_traffic():
    """Two Metrics objects with different traffic, merged, expose exactly the Istio and hbone series one
    Metrics object shows after seeing all of it (counters and histogram buckets summed, series only one
    worker has kept)."""
    a_shape = [(1, 200, 3.0), (1, 200, 40.0), (2, 503, 7.5)]
    b_shape = [(1, 200, 900.0), (3, 403, 0.2)]
    a, b, both = M.Metrics(process_metrics=False), M.Metrics(process_metrics=False), M.Metrics(process_metrics=False)
    _traffic(a, a_shape)
    _traffic(b, b_shape)
    _traffic(both, a_shape + b_shape)
    for m, reloads, n in ((a, 1, 2), (b, 1, 1), (both, 2, 3)):
        for _ in range(reloads):
            m.config_reload(True)
        for _ in range(n):
            m.tunnel_opened()
    merged = merge_expositions([a.exposition().decode(), b.exposition().decode()])
    got, want = _samples(merged), _samples(both.exposition().decode())
    assert got == want
    # Family order and HELP/TYPE lines come from worker 0's exposition.
    assert merged.splitlines()[:2] == both.exposition().decode().splitlines()[:2]
    assert got['hbone_config_reloads_total{result="success"}'] == 2.0
    assert got["hbone_tunnels_active"] == 3.0


def test_gauges_sum_or_take_the_earliest_or_worker_0s():
    w0 = ("# HELP process_start_time_seconds Start time.\n# TYPE process_start_time_seconds gauge\n"
          "process_start_time_seconds 200.0\n"
          "# HELP process_resident_memory_bytes RSS.\n# TYPE process_resident_memory_bytes gauge\n"
          "process_resident_memory_bytes 1000.0\n"
          "# HELP process_max_fds Max fds.\n# TYPE process_max_fds gauge\nprocess_max_fds 1024.0\n"
          '# HELP python_info Python platform information\n# TYPE python_info gauge\npython_info{version="3.11.7"} 1.0\n')
    w0 += ('# HELP envoy_cluster_upstream_rq_active Total active requests\n# TYPE envoy_cluster_upstream_rq_active gauge\n'
           'envoy_cluster_upstream_rq_active{cluster_name="outbound|9080||reviews"} 3\n')
    w1 = w0.replace("200.0", "150.0").replace("1000.0", "500.0").replace("1024.0", "4096.0")
    got = _samples(merge_expositions([w0, w1], reporting=2, unreachable=1))
    assert got['envoy_cluster_upstream_rq_active{cluster_name="outbound|9080||reviews"}'] == 6.0   # summed
    assert got["process_start_time_seconds"] == 150.0           # the earliest
    assert got["process_resident_memory_bytes"] == 1500.0       # summed
    assert got["process_max_fds"] == 1024.0                     # worker 0's
    assert got['python_info{version="3.11.7"}'] == 1.0          # not 2
    assert got['hbone_workers{state="reporting"}'] == 2.0
    assert got['hbone_workers{state="unreachable"}'] == 1.0


def test_label_values_with_spaces_and_bad_lines():
    text = ('# HELP x_total a help text with spaces\n# TYPE x_total counter\n'
            'x_total{flags="a b",code="200"} 2.0\nx_total{flags="a b",code="503"} 1.0\n')
    merged = merge_expositions([text, text])
    assert 'x_total{flags="a b",code="200"} 4.0' in merged.splitlines()
    assert "# HELP x_total a help text with spaces" in merged
    with pytest.raises(ValueError):
        merge_expositions(["# TYPE x counter\nnot-a-sample-line\n"])
    with pytest.raises(ValueError):
        merge_expositions(["# TYPE x counter\nx abc\n"])


async def test_publisher_fetch_and_an_unreachable_worker(tmp_path):
    d = str(tmp_path)
    pub = WorkerMetricsPublisher(d, 1, lambda: b"# TYPE x_total counter\nx_total 5.0\n")
    await pub.start()
    try:
        assert await fetch_worker(d, 1) == b"# TYPE x_total counter\nx_total 5.0\n"
        assert await fetch_worker(d, 2, timeout_s=0.2) is None          # no such worker (restarting)
        wm = WorkerMetrics(d, 3, lambda: b"# TYPE x_total counter\nx_total 1.0\n", timeout_s=0.2)
        got = _samples((await wm.merged()).decode())
        assert got["x_total"] == 6.0
        assert got['hbone_workers{state="reporting"}'] == 2.0
        assert got['hbone_workers{state="unreachable"}'] == 1.0
        assert await wm.one(1) == b"# TYPE x_total counter\nx_total 5.0\n"
        assert await wm.one(2) is None
    finally:
        await pub.close()
    assert not os.path.exists(socket_path(d, 1))


async def test_a_silent_or_oversized_worker_is_left_out(tmp_path):
    d = str(tmp_path)

    async def silent(reader, writer):
        await asyncio.sleep(5)
        writer.close()
    server = await asyncio.start_unix_server(silent, socket_path(d, 1))
    try:
        assert await fetch_worker(d, 1, timeout_s=0.2) is None
    finally:
        server.close()
        await server.wait_closed()
    huge = WorkerMetricsPublisher(d, 2, lambda: b"#" * (MAX_WORKER_EXPOSITION_BYTES + 10))
    await huge.start()
    try:
        assert await fetch_worker(d, 2) is None
    finally:
        await huge.close()


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def test_metrics_route_merged_and_per_worker(tmp_path, loopback_ip):
    d = str(tmp_path)
    pub = WorkerMetricsPublisher(d, 1, lambda: b"# TYPE x_total counter\nx_total 5.0\n")
    await pub.start()
    own = lambda: b"# TYPE x_total counter\nx_total 1.0\n"   # noqa: E731
    admin = AdminServer(config_dump=dict, metrics=own, worker_metrics=WorkerMetrics(d, 3, own, timeout_s=0.2),
                        admin_addr=None, readiness_addr=None, metrics_addr=(loopback_ip(), 0))
    server = admin.servers["metrics"]
    await server.start()
    try:
        host, port = server.address
        base = f"http://{host}:{port}"
        loop = asyncio.get_running_loop()
        status, body = await loop.run_in_executor(None, _get, base + "/metrics")
        assert status == 200 and _samples(body.decode())["x_total"] == 6.0
        assert await loop.run_in_executor(None, _get, base + "/metrics?worker=1") == (200, b"# TYPE x_total counter\nx_total 5.0\n")
        assert await loop.run_in_executor(None, _get, base + "/metrics?worker=0") == (200, own())
        status, body = await loop.run_in_executor(None, _get, base + "/stats/prometheus?worker=2")
        assert status == 503 and b"worker 2" in body
        for bad in ("3", "-1", "x", ""):
            status, body = await loop.run_in_executor(None, _get, base + f"/metrics?worker={bad}")
            assert status == 400 and b"0..2" in body, bad
    finally:
        await server.close()
        await pub.close()
