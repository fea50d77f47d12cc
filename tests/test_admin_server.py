"""The admin/metrics/readiness listeners over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hypothesis import given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.server import (
    MAX_REQUEST_BYTES,
    AdminServer,
    BadRequest,
    LoggingControl,
    RequestParser,
    parse_addr,
)
from proxy.telemetry.accesslog import AccessLog
from proxy.telemetry.metrics import Metrics


async def exchange(addr, raw: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one response (the server closes or we read Content-Length)."""
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(raw)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v for k, _, v in (h.partition(": ") for h in header_lines if h)}
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    writer.close()
    return int(status_line.split()[1]), headers, body


def loopback(port_ip):
    return f"{port_ip}:0"


@pytest.fixture
async def admin(loopback_ip):
    state = {"ready": "config not loaded", "quit": 0}
    metrics = Metrics(process_metrics=False)
    log = AccessLog(None)

    async def quit_():
        state["quit"] += 1

    def explain(req):
        if req.get("to") == "bad":
            raise ValueError("to: HOST:PORT is required")
        return {"decision": "allow", "echo": req}

    server = AdminServer(
        config_dump=lambda: {"listeners": [{"name": "main_internal"}], "clusters": []},
        quit=quit_, readiness=lambda: state["ready"], metrics=metrics.exposition, explain=explain,
        logging=LoggingControl(access_log=log),
        admin_addr=f"{loopback_ip()}:0", metrics_addr=f"{loopback_ip()}:0", readiness_addr=f"{loopback_ip()}:0")
    async with server:
        yield server, state, metrics, log
    log.close()


def test_default_addresses_bind_admin_to_localhost_only():
    s = AdminServer(config_dump=dict)
    assert s.servers["admin"].host == "127.0.0.1" and s.servers["admin"].port == 15000
    assert (s.servers["metrics"].port, s.servers["readiness"].port) == (15020, 15021)
    assert parse_addr("[::1]:15000") == ("::1", 15000)
    assert parse_addr(":15020") == ("0.0.0.0", 15020)
    with pytest.raises(ValueError):
        parse_addr("127.0.0.1:http")
    off = AdminServer(config_dump=dict, metrics_addr=None, readiness_addr=None)
    assert list(off.servers) == ["admin"]


async def test_admin_routes(admin):
    server, state, _, _ = admin
    addr = server.addresses["admin"]
    status, headers, body = await exchange(addr, b"GET /config_dump HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["listeners"] == [{"name": "main_internal"}]
    status, _, body = await exchange(addr, b"GET /config_dump?resource=clusters HTTP/1.1\r\n\r\n")
    assert json.loads(body) == {"clusters": []}
    status, _, body = await exchange(addr, b"GET /config_dump?resource=nope HTTP/1.1\r\n\r\n")
    assert status == 404
    status, _, body = await exchange(addr, b"GET / HTTP/1.1\r\n\r\n")
    assert status == 200 and b"/quitquitquit" in body and b"/config_dump" in body
    status, _, _ = await exchange(addr, b"GET /nowhere HTTP/1.1\r\n\r\n")
    assert status == 404


async def test_state_changing_endpoints_refuse_get(admin):
    server, state, _, _ = admin
    addr = server.addresses["admin"]
    for path in (b"/quitquitquit", b"/logging", b"/explain"):
        status, headers, _ = await exchange(addr, b"GET " + path + b" HTTP/1.1\r\n\r\n")
        assert status == 405 and headers["allow"] == "POST"
    assert state["quit"] == 0
    status, _, body = await exchange(addr, b"POST /quitquitquit HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert (status, body, state["quit"]) == (200, b"OK\n", 1)


async def test_logging_endpoint_changes_levels(admin):
    server, _, _, log = admin
    addr = server.addresses["admin"]
    target = logging.getLogger("hbone.test.admin")
    status, _, body = await exchange(
        addr, b"POST /logging?level=hbone.test.admin:debug,access:error HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 200 and b"hbone.test.admin: debug" in body and b"access: error" in body
    assert target.level == logging.DEBUG and log.level == "error"
    status, _, body = await exchange(addr, b"POST /logging?level=loud HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 400 and b"unknown level" in body
    assert target.level == logging.DEBUG          # a bad spec changes nothing
    target.setLevel(logging.NOTSET)


async def test_explain_endpoint_json_in_out(admin):
    server, _, _, _ = admin
    addr = server.addresses["admin"]
    body = json.dumps({"from": "spiffe://cluster.local/ns/a/sa/b", "to": "1.2.3.4:80"}).encode()
    status, _, out = await exchange(addr, b"POST /explain HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert status == 200 and json.loads(out)["echo"]["to"] == "1.2.3.4:80"
    status, _, out = await exchange(addr, b"POST /explain HTTP/1.1\r\nContent-Length: 3\r\n\r\n{x]")
    assert status == 400 and "not JSON" in json.loads(out)["error"]
    bad = b'{"to": "bad"}'
    status, _, out = await exchange(addr, b"POST /explain HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(bad), bad))
    assert status == 400 and json.loads(out)["error"] == "to: HOST:PORT is required"


async def test_metrics_listener_serves_exposition_on_both_paths(admin):
    server, _, metrics, _ = admin
    metrics.config_reload(True)
    for path in (b"/metrics", b"/stats/prometheus"):
        status, headers, body = await exchange(server.addresses["metrics"], b"GET " + path + b" HTTP/1.1\r\n\r\n")
        assert status == 200 and headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        ok = [s for s in fams["hbone_config_reloads"].samples if s.labels == {"result": "success"}]
        assert ok[0].value == 1


async def test_readiness_flips(admin):
    server, state, _, _ = admin
    addr = server.addresses["readiness"]
    status, _, body = await exchange(addr, b"GET /healthz/ready HTTP/1.1\r\n\r\n")
    assert (status, body) == (503, b"not ready: config not loaded\n")
    state["ready"] = None
    status, _, body = await exchange(addr, b"GET /healthz/ready HTTP/1.1\r\n\r\n")
    assert (status, body) == (200, b"ready\n")
    state["ready"] = "draining"
    status, _, body = await exchange(addr, b"GET /healthz/ready HTTP/1.1\r\n\r\n")
    assert (status, body) == (503, b"not ready: draining\n")
    status, _, _ = await exchange(addr, b"POST /healthz/ready HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status == 405


async def test_garbage_gets_400_and_the_listener_keeps_serving(admin):
    server, _, _, _ = admin
    addr = server.addresses["admin"]
    for raw in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,   # a TLS ClientHello
                b"GET / HTTP/9.9\r\n\r\n", b"NOT A REQUEST\r\n\r\n",
                b"GET / HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
                b"CONNECT 1.2.3.4:80 HTTP/1.1\r\n\r\n"):
        status, headers, _ = await exchange(addr, raw)
        assert status == 400 and headers["connection"] == "close"
    big = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (MAX_REQUEST_BYTES + 10) + b"\r\n\r\n"
    status, _, _ = await exchange(addr, big)
    assert status == 413
    status, _, _ = await exchange(addr, b"GET / HTTP/1.1\r\n\r\n")
    assert status == 200


async def test_keep_alive_pipelining_and_connection_close(admin):
    server, _, _, _ = admin
    reader, writer = await asyncio.open_connection(*server.addresses["readiness"])
    writer.write(b"GET /healthz/ready HTTP/1.1\r\n\r\nGET /healthz/ready HTTP/1.1\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)    # server closes after the second response
    assert data.count(b"HTTP/1.1 503") == 2
    assert b"Connection: keep-alive" in data and data.rstrip().endswith(b"not ready: config not loaded")
    assert b"Connection: close" in data
    writer.close()
    # HTTP/1.0 without keep-alive is closed after one response
    reader, writer = await asyncio.open_connection(*server.addresses["readiness"])
    writer.write(b"GET /healthz/ready HTTP/1.0\r\n\r\n")
    assert b"Connection: close" in await asyncio.wait_for(reader.read(), 5)
    writer.close()


async def test_handler_error_is_500_and_close_is_clean(loopback_ip):
    def broken():
        raise RuntimeError("boom")
    server = AdminServer(config_dump=broken, admin_addr=f"{loopback_ip()}:0", metrics_addr=None, readiness_addr=None)
    await server.start()
    addr = server.addresses["admin"]
    status, _, body = await exchange(addr, b"GET /config_dump HTTP/1.1\r\n\r\n")
    assert status == 500 and b"RuntimeError: boom" in body
    idle_r, idle_w = await asyncio.open_connection(*addr)     # an idle connection must not block close()
    assert "listening" in repr(server.servers["admin"])
    await asyncio.wait_for(server.close(), 5)
    assert await asyncio.wait_for(idle_r.read(), 5) == b""
    idle_w.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(*addr)


REQ = b"POST /explain?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"


def test_parser_whole_byte_by_byte_and_trailing_data():
    whole = RequestParser().feed(REQ)
    assert [(r.method, r.path, r.query, r.body) for r in whole] == [("POST", "/explain", {"x": ["1"]}, b"hello")]
    p = RequestParser()
    got = []
    for i in range(len(REQ)):
        got += p.feed(REQ[i:i + 1])
    assert got == whole
    p = RequestParser()
    two = p.feed(REQ + b"GET /a HTTP/1.1\r\n\r\nGET /b")   # trailing partial request stays buffered
    assert [r.path for r in two] == ["/explain", "/a"] and p.in_message
    assert [r.path for r in p.feed(b" HTTP/1.1\r\n\r\n")] == ["/b"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parser_only_raises_bad_request(data):
    p = RequestParser(max_bytes=128)
    try:
        p.feed(data)
    except BadRequest as err:
        assert err.status in (400, 413)


async def test_stats_endpoint_lists_envoy_style_lines_with_an_re2_filter(loopback_ip):
    numbers = [("cluster.a|80||x.svc.upstream_rq_pending_overflow", 3), ("cluster.a|80||x.svc.upstream_cx_active", 1)]
    server = AdminServer(config_dump=dict, stats=lambda: numbers, admin_addr=f"{loopback_ip()}:0",
                         metrics_addr=None, readiness_addr=None)
    bare = AdminServer(config_dump=dict, admin_addr=f"{loopback_ip()}:0", metrics_addr=None, readiness_addr=None)
    await server.start()
    await bare.start()
    try:
        addr = server.addresses["admin"]
        status, _, body = await exchange(addr, b"GET /stats HTTP/1.1\r\n\r\n")
        assert status == 200 and body == (b"cluster.a|80||x.svc.upstream_rq_pending_overflow: 3\n"
                                          b"cluster.a|80||x.svc.upstream_cx_active: 1\n")
        status, _, body = await exchange(addr, b"GET /stats?filter=pending HTTP/1.1\r\n\r\n")
        assert status == 200 and body == b"cluster.a|80||x.svc.upstream_rq_pending_overflow: 3\n"
        status, _, body = await exchange(addr, b"GET /stats?filter=%28 HTTP/1.1\r\n\r\n")   # "(": not RE2
        assert status == 400 and b"bad filter" in body
        status, _, body = await exchange(bare.addresses["admin"], b"GET /stats HTTP/1.1\r\n\r\n")
        assert status == 501 and b"not wired" in body   # (as /explain: a listener without the proxy behind it)
        status, _, body = await exchange(addr, b"GET / HTTP/1.1\r\n\r\n")
        assert b"/stats" in body   # listed in the index
    finally:
        await server.close()
        await bare.close()
