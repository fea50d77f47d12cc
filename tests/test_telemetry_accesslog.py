"""The JSON access log: one valid JSON line per record with the DESIGN §6 fields; never blocks."""

from __future__ import annotations

import io
import json
import os
import threading
import time

import pytest

from proxy.telemetry.accesslog import (
    RBAC_NONE_MATCHED,
    AccessLog,
    AccessRecord,
    format_line,
    rbac_denied_detail,
)
from proxy.telemetry.metrics import Metrics

T0 = 1680000000.25   # 2023-03-28T10:40:00.250Z

TUNNEL = AccessRecord(
    start_time=T0, kind="tunnel", direction="inbound", reporter="waypoint",
    src_addr="10.244.1.5:40312", src_identity="spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    src_workload="productpage-v1", src_namespace="default", dst_addr="10.244.3.9:15008",
    dst_hbone_addr="10.96.104.108:9080", dst_service="reviews.default.svc.cluster.local",
    chain="inbound-vip|9080||reviews.default.svc.cluster.local-http", protocol="http/1.1", authz="allow",
    bytes_sent=1234, bytes_received=321, duration_ms=12.3456)

REQUEST = AccessRecord(
    start_time=T0, kind="http", direction="inbound", reporter="waypoint", src_addr="10.244.1.5:40312",
    chain="inbound-vip|9080||reviews.default.svc.cluster.local-http", protocol="http/1.1",
    authz="deny", authz_policy="default/deny-jason",
    response_code_details=rbac_denied_detail("default", "deny-jason", 0),
    route="inbound-vip|9080|http|reviews.default.svc.cluster.local",
    upstream_cluster="inbound-vip|9080|http/v1|reviews.default.svc.cluster.local",
    upstream_host="10.244.2.11:9080", attempts=1, method="GET", path="/reviews/0",
    authority="reviews:9080", status=403, bytes_sent=19, bytes_received=80, duration_ms=0.5)


def test_tunnel_line_fields():
    line = format_line(TUNNEL)
    assert line.endswith("\n") and line.count("\n") == 1
    d = json.loads(line)
    assert d == {
        "level": "info", "start_time": "2023-03-28T10:40:00.250Z", "kind": "tunnel", "direction": "inbound",
        "reporter": "waypoint", "src.addr": "10.244.1.5:40312",
        "src.identity": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "src.workload": "productpage-v1", "src.namespace": "default", "dst.addr": "10.244.3.9:15008",
        "dst.hbone_addr": "10.96.104.108:9080", "dst.service": "reviews.default.svc.cluster.local",
        "chain": "inbound-vip|9080||reviews.default.svc.cluster.local-http", "protocol": "http/1.1",
        "authz": "allow", "bytes_sent": 1234, "bytes_received": 321, "duration_ms": 12.346,
        "response_flags": "-"}


def test_http_line_names_policy_route_endpoint_and_flags():
    d = json.loads(format_line(REQUEST))
    assert d["response_code_details"] == \
        "rbac_access_denied_matched_policy[ns[default]-policy[deny-jason]-rule[0]]"
    assert (d["authz"], d["authz.policy"]) == ("deny", "default/deny-jason")
    assert (d["method"], d["path"], d["authority"], d["status"]) == ("GET", "/reviews/0", "reviews:9080", 403)
    assert (d["route"], d["upstream_host"], d["attempts"]) == (
        "inbound-vip|9080|http|reviews.default.svc.cluster.local", "10.244.2.11:9080", 1)
    assert d["response_flags"] == "-"       # RBAC denial has no response flag in Envoy
    failed = AccessRecord(start_time=T0, kind="http", status=503, response_flags=("UF", "URX"),
                          error="connection refused", attempts=3)
    f = json.loads(format_line(failed))
    assert (f["level"], f["response_flags"], f["error"], f["attempts"]) == ("error", "UF,URX", "connection refused", 3)
    assert RBAC_NONE_MATCHED == "rbac_access_denied_matched_policy[none]"


def test_writes_to_stream_and_file_and_levels(tmp_path):
    buf = io.StringIO()
    log = AccessLog(buf, "info")
    log.emit(TUNNEL)
    log.emit(REQUEST)
    log.close()
    lines = buf.getvalue().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["tunnel", "http"]
    assert log.written == 2 and log.dropped == 0

    path = tmp_path / "access.log"
    flog = AccessLog(str(path), "error")
    flog.emit(TUNNEL)                                            # info: below "error", skipped
    flog.emit(AccessRecord(start_time=T0, kind="tunnel", error="tls handshake failed"))
    assert not flog.enabled("info") and flog.enabled("error")
    flog.set_level("info")
    flog.emit(TUNNEL)
    flog.close()
    got = [json.loads(x) for x in path.read_text().splitlines()]
    assert [g["level"] for g in got] == ["error", "info"]
    with pytest.raises(ValueError):
        flog.set_level("loud")
    off = AccessLog(None)
    off.emit(TUNNEL)
    assert not off.enabled() and "off" in repr(off)
    off.close()


def test_a_stalled_sink_drops_and_counts_instead_of_blocking():
    """A pipe whose reader stopped reading: emit() must stay fast and count what it drops."""
    r, w = os.pipe()
    os.set_blocking(w, True)
    sink = os.fdopen(w, "w", buffering=1)
    metrics = Metrics(process_metrics=False)
    log = AccessLog(sink, "info", metrics=metrics, queue_lines=16)
    start = time.perf_counter()
    for _ in range(5000):           # ~2 MB of lines, far beyond the 64 KiB pipe buffer
        log.emit(TUNNEL)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"emit blocked for {elapsed:.2f}s"
    assert log.dropped > 0
    assert metrics.accesslog_dropped._value.get() == log.dropped
    # unblock the writer so close() finishes promptly
    drainer = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(r, 65536), b"")], daemon=True)
    drainer.start()
    log.close(timeout=5)
    sink.close()
    drainer.join(5)
    os.close(r)
    assert log.written + log.dropped == 5000
