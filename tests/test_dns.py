"""Connect-time DNS for hostname endpoints (ServiceEntry ``resolution: DNS``): the pure cache and pick
(``proxy/dns.py``), the resolver on the system's getaddrinfo (``localhost`` from /etc/hosts, ``nonexistent.invalid``
never resolves: RFC 6761 §6.4), the waypoint's Originator, and end to end through real proxies on loopback — a
client reaches a DNS ServiceEntry's host through the node proxy, and through the waypoint its
``istio.io/use-waypoint`` label names."""

from __future__ import annotations

import asyncio
import logging
import random
import socket

import pytest

from policy.inventory import Workload
from policy.routing.endpoints import Candidate
from proxy.dns import (
    DNS_FAILURE_REFRESH_S, DNS_REFRESH_S, LOGICAL_DNS, STRICT_DNS, DnsCache, DnsEntry, DnsFailure, Resolver,
    after_failure, after_success, entry_state, order_addresses, pick_address, should_log_failure,
)
from tests.conftest import free_port

UNRESOLVABLE = "nonexistent.invalid"   # RFC 6761 §6.4: ".invalid" names never resolve


# ---------------------------------------------------------------------------------------------
# Pure core


def test_refresh_is_istios_mesh_default_and_a_failure_waits_as_long():
    assert DNS_REFRESH_S == 60.0 and DNS_FAILURE_REFRESH_S == DNS_REFRESH_S


def test_entry_state_over_time():
    assert entry_state(None, 0.0) == "resolve"
    ok = after_success(("10.0.0.2", "10.0.0.1"), now=100.0)
    assert ok == DnsEntry(("10.0.0.2", "10.0.0.1"), 100.0, "")
    assert entry_state(ok, 100.0) == "fresh"
    assert entry_state(ok, 159.999) == "fresh"
    assert entry_state(ok, 160.0) == "resolve"           # the refresh interval is over
    assert entry_state(ok, 99.0) == "resolve"            # a clock that stepped back: do not trust the entry
    assert entry_state(ok, 105.0, refresh_s=5.0) == "resolve"
    failed = after_failure(None, "Name or service not known", now=200.0)
    assert failed == DnsEntry((), 200.0, "Name or service not known")
    assert entry_state(failed, 200.0) == "failed"         # fail at once, no lookup per connection
    assert entry_state(failed, 259.0) == "failed"
    assert entry_state(failed, 260.0) == "resolve"
    assert entry_state(failed, 202.0, failure_refresh_s=2.0) == "resolve"
    assert after_failure(None, "", 0.0).error == "no address"


def test_a_failed_refresh_keeps_the_last_good_addresses_as_envoy_does():
    ok = after_success(("10.0.0.1",), now=0.0)
    kept = after_failure(ok, "timed out", now=60.0)
    assert kept == DnsEntry(("10.0.0.1",), 60.0, "timed out")
    assert entry_state(kept, 61.0) == "fresh"           # still dialled...
    assert entry_state(kept, 120.0) == "resolve"        # ...and retried after the failure interval


def test_failures_are_logged_once_per_name_and_interval():
    assert should_log_failure(None, 0.0)
    assert should_log_failure(after_success(("10.0.0.1",), 0.0), 1.0)        # was working: log
    failed = after_failure(None, "x", now=10.0)
    assert not should_log_failure(failed, 69.0)
    assert should_log_failure(failed, 70.0)


def test_order_puts_ipv4_first_and_drops_duplicates():
    assert order_addresses(["::1", "127.0.0.1", "::1", "10.0.0.1", ""]) == ("127.0.0.1", "10.0.0.1", "::1")


def test_pick_logical_dns_takes_the_first_strict_dns_any_of_the_family():
    addrs = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1")
    assert {pick_address(addrs, LOGICAL_DNS, random.Random(i)) for i in range(50)} == {"10.0.0.1"}
    assert {pick_address(addrs, STRICT_DNS, random.Random(i)) for i in range(50)} == {"10.0.0.1", "10.0.0.2",
                                                                                     "10.0.0.3"}
    assert pick_address(("fd00::1", "fd00::2"), LOGICAL_DNS, random.Random(0)) == "fd00::1"
    assert pick_address(("10.0.0.9",), STRICT_DNS, random.Random(0)) == "10.0.0.9"
    with pytest.raises(ValueError):
        pick_address((), STRICT_DNS, random.Random(0))


def test_cache_is_bounded_least_recently_used_first_out():
    cache = DnsCache(max_entries=2)
    e = after_success(("10.0.0.1",), 0.0)
    cache.put("a", e)
    cache.put("b", e)
    assert cache.get("a") == e        # a is now the most recently used
    cache.put("c", e)
    assert ("a" in cache, "b" in cache, "c" in cache, len(cache)) == (True, False, True, 2)


# ---------------------------------------------------------------------------------------------
# The asyncio shell


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_resolver_caches_for_the_refresh_interval_and_coalesces_lookups():
    calls: list[str] = []
    answers = {"svc.example": ["10.0.0.1", "10.0.0.2"]}

    async def lookup(host: str) -> list[str]:   # a resolver of our own, counting what it is asked
        calls.append(host)
        await asyncio.sleep(0.01)
        return answers[host]

    clock = _Clock()
    r = Resolver(lookup=lookup, clock=clock, rng=random.Random(1))
    got = await asyncio.gather(*(r.addresses("svc.example") for _ in range(5)))
    assert got == [("10.0.0.1", "10.0.0.2")] * 5 and calls == ["svc.example"]   # one lookup for five dials
    clock.now += DNS_REFRESH_S - 1
    assert await r.addresses("SVC.example.") == ("10.0.0.1", "10.0.0.2") and len(calls) == 1   # case, root dot
    answers["svc.example"] = ["10.0.0.3"]
    clock.now += 1
    assert await r.address_for("svc.example", LOGICAL_DNS) == "10.0.0.3" and len(calls) == 2


async def test_resolver_failure_is_a_dns_failure_cached_logged_once_and_last_good_kept(caplog):
    answers: dict[str, object] = {"svc.example": ["10.0.0.1"]}
    calls: list[str] = []

    async def lookup(host: str) -> list[str]:
        calls.append(host)
        a = answers.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(a, BaseException):
            raise a
        return a

    clock = _Clock()
    r = Resolver(lookup=lookup, clock=clock)
    caplog.set_level(logging.WARNING, logger="hbone.dns")
    for _ in range(3):
        with pytest.raises(DnsFailure, match="gone.example: DNS resolution failed: Name or service not known"):
            await r.addresses("gone.example")
    assert calls == ["gone.example"]                      # cached: one lookup, one log line
    assert [rec.getMessage() for rec in caplog.records] == [
        "DNS resolution of gone.example failed: Name or service not known (next try in 60s)"]
    clock.now += DNS_FAILURE_REFRESH_S
    with pytest.raises(DnsFailure):
        await r.addresses("gone.example")
    assert len(calls) == 2 and len(caplog.records) == 2   # the next interval: tried and logged again
    # A name that worked and then fails keeps its addresses (Envoy keeps the cluster's hosts).
    assert await r.addresses("svc.example") == ("10.0.0.1",)
    del answers["svc.example"]
    clock.now += DNS_REFRESH_S
    assert await r.addresses("svc.example") == ("10.0.0.1",)
    assert "keeping 10.0.0.1" in caplog.records[-1].getMessage()
    answers["empty.example"] = []
    with pytest.raises(DnsFailure, match="no address"):
        await r.addresses("empty.example")


async def test_resolver_times_out_as_a_failure():
    async def lookup(host: str) -> list[str]:
        await asyncio.sleep(10)
        return ["10.0.0.1"]

    r = Resolver(lookup=lookup, timeout_s=0.05)
    with pytest.raises(DnsFailure, match="no answer within 0.05s"):
        await r.addresses("slow.example")


async def test_a_timeout_is_tried_again_soon_and_any_lookup_error_is_a_failure():
    """A lookup with no answer in time is retried after DNS_TIMEOUT_RETRY_S, not the 60 s a definite failure waits
    (the resolver may only have been busy); an unexpected error from the lookup is a DnsFailure too (review)."""
    from proxy.dns import DNS_TIMEOUT_RETRY_S
    now = [100.0]
    calls = []

    async def lookup(host: str) -> list[str]:
        calls.append(host)
        if len(calls) == 1:
            await asyncio.sleep(10)
        if host == "broken.example":
            raise RuntimeError("cannot schedule new futures after shutdown")
        return ["10.0.0.7"]

    r = Resolver(lookup=lookup, timeout_s=0.05, clock=lambda: now[0])
    with pytest.raises(DnsFailure):
        await r.addresses("slow.example")
    with pytest.raises(DnsFailure):          # within the retry delay: fails at once, no lookup
        await r.addresses("slow.example")
    assert len(calls) == 1
    now[0] += DNS_TIMEOUT_RETRY_S
    assert await r.addresses("slow.example") == ("10.0.0.7",)
    with pytest.raises(DnsFailure, match="RuntimeError"):
        await r.addresses("broken.example")


async def test_resolver_on_the_system_resolver():
    r = Resolver()
    assert "127.0.0.1" in await r.addresses("localhost")          # /etc/hosts
    assert await r.address_for("localhost", LOGICAL_DNS) == "127.0.0.1"   # IPv4 first
    with pytest.raises(DnsFailure, match=UNRESOLVABLE):
        await r.addresses(UNRESOLVABLE)


# ---------------------------------------------------------------------------------------------
# The waypoint's connect_originate


def _hostname_workload(host: str) -> Workload:
    return Workload(uid=f"Kubernetes/networking.istio.io/ServiceEntry/default/e/{host}", name="e",
                    namespace="default", workload_ips=(), hostname=host, protocol="TCP")


async def test_originator_resolves_a_hostname_endpoint_and_fails_an_unresolvable_one_as_uf():
    from tests.stream_helpers import exchange
    from tests.test_pipeline_originate import _source
    from hbone.testing import start_echo
    from proxy.pipeline.originate import OriginateFailed, Originator

    echo, addr = await start_echo("127.0.0.1")
    orig = Originator(_source())
    try:
        stream = await orig.open(Candidate(_hostname_workload("localhost"), "localhost", addr[1]),
                                 source=("127.0.0.1", 1))
        assert await exchange(stream, b"by name") == b"by name"
        stream.close()
        assert orig.opened_tcp == 1
        with pytest.raises(OriginateFailed) as err:
            await orig.open(Candidate(_hostname_workload(UNRESOLVABLE), UNRESOLVABLE, 80), source=("127.0.0.1", 1))
        assert (err.value.reason, err.value.http_status, err.value.flag, err.value.outcome) == (
            "dns", 503, "UF", "connect-failure")
        assert "connection_failure,dns" in err.value.detail and f"{UNRESOLVABLE}:80" in str(err.value)
    finally:
        await orig.close()
        echo.close()


def test_dns_round_robin_endpoints_resolve_as_logical_dns_and_dns_ones_as_strict_dns():
    from tests.test_serviceentry import load
    entry = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: RESOLUTION
"""
    for resolution, lookup in (("DNS_ROUND_ROBIN", LOGICAL_DNS), ("DNS", STRICT_DNS)):
        mesh = load(entry.replace("RESOLUTION", resolution))
        (w,) = mesh.inventory.workloads.values()
        assert (w.hostname, w.dns_lookup) == ("api.example.com", lookup)


async def test_the_waypoints_dial_takes_the_first_address_for_logical_dns():
    """Envoy's LOGICAL_DNS cluster (DNS_ROUND_ROBIN) uses the first address the name resolves to; STRICT_DNS any."""
    from dataclasses import replace
    from tests.test_pipeline_originate import _source
    from proxy.pipeline.originate import Originator

    answers = {"multi.example": ["127.0.0.1", "127.0.0.2", "127.0.0.3"]}

    async def lookup(host: str) -> list[str]:
        return answers[host]

    orig = Originator(_source(), resolver=Resolver(lookup=lookup, rng=random.Random(3)))
    try:
        wl = _hostname_workload("multi.example")
        logical = {await orig._resolve("multi.example", 80, 1.0, replace(wl, dns_lookup=LOGICAL_DNS).dns_lookup)
                   for _ in range(20)}
        strict = {await orig._resolve("multi.example", 80, 1.0, STRICT_DNS) for _ in range(40)}
        assert logical == {"127.0.0.1"} and len(strict) > 1
    finally:
        await orig.close()


async def test_originator_hbone_to_a_hostname_endpoint_connects_to_the_address_it_resolved():
    # A DNS endpoint of an entry with ambient.istio.io/redirection: enabled speaks HBONE: mTLS to <resolved>:15008,
    # CONNECT <resolved>:<target port> (ztunnel uses the resolved IP as selected_workload_ip).
    from dataclasses import replace
    from hbone.server import HboneServer
    from hbone.testing import echo_handler_factory, start_echo
    from proxy.pipeline.originate import Originator
    from tests.stream_helpers import exchange
    from tests.test_pipeline_originate import MESH, _source

    echo, echo_addr = await start_echo("127.0.0.1")
    seen = []
    relay = await echo_handler_factory(echo_addr)

    async def handler(tunnel):
        seen.append(tunnel.request)
        await relay(tunnel)

    hbone_port = free_port("127.0.0.1")
    server = await HboneServer(lambda: MESH.server_context(MESH.identity("default", "bookinfo-reviews")),
                               handler, trust_domain="cluster.local").start("127.0.0.1", hbone_port)
    orig = Originator(_source(), hbone_port=hbone_port)
    try:
        wl = replace(_hostname_workload("localhost"), protocol="HBONE", service_account="bookinfo-reviews")
        stream = await orig.open(Candidate(wl, "localhost", echo_addr[1]), source=("127.9.9.9", 1))
        assert await exchange(stream, b"tunnelled") == b"tunnelled"
        assert seen[0].authority == ("127.0.0.1", echo_addr[1]) and orig.opened_hbone == 1
    finally:
        await orig.close()
        await server.close()
        echo.close()


async def test_node_proxy_resolves_the_plan_of_a_hostname_endpoint_hbone_authority_included():
    from proxy import socks5
    from proxy.errors import UpstreamConnectFailure
    from proxy.node.outbound import OutboundPlan, OutboundProxy, socks5_reply_for

    async def lookup(host: str) -> list[str]:   # a resolver of our own: "svc.example" only
        if host != "svc.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return ["10.0.0.7"]

    node = OutboundProxy(snapshot=lambda: None, local_workloads=dict, identities=None, trust_domain="cluster.local",
                         resolver=Resolver(lookup=lookup))
    wl = _hostname_workload("svc.example")
    hbone = OutboundPlan("hbone", ("svc.example", 15008), "svc.example:9443", frozenset(), None, wl, False,
                         "svc.example", "endpoint")
    got = await node._resolved(hbone, "svc.example")
    assert (got.dst, got.authority, got.workload) == (("10.0.0.7", 15008), "10.0.0.7:9443", wl)
    tcp = OutboundPlan("tcp", ("svc.example", 80), None, frozenset(), None, wl, False, "svc.example", "endpoint")
    assert (await node._resolved(tcp, "svc.example")).dst == ("10.0.0.7", 80)
    with pytest.raises(UpstreamConnectFailure, match="gone.example: DNS resolution failed") as err:
        await node._resolved(tcp, "gone.example")
    assert (err.value.flag, err.value.http_status) == ("UF", 503)
    assert socks5_reply_for(err.value) == socks5.HOST_UNREACHABLE


def test_endpoints_for_keeps_a_hostname_endpoint_with_its_name_as_the_address():
    from policy.routing.endpoints import endpoints_for
    from tests.test_serviceentry import DNS_ENDPOINTS, load
    mesh = load(DNS_ENDPOINTS)
    cands = endpoints_for(mesh.inventory, mesh.inventory.services["default/foo.bar.com"], 443, None)
    assert [(c.ip, c.target_port, c.key) for c in cands] == [("uk.foo.bar.com", 9443, "uk.foo.bar.com:9443"),
                                                            ("us.foo.bar.com", 8443, "us.foo.bar.com:8443")]


# ---------------------------------------------------------------------------------------------
# End to end: real proxies on loopback, the endpoint named "localhost" (backend on 127.0.0.1)

E2E_DNS = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: dns-db
  namespace: default
spec:
  hosts: [dns-db.example.com]
  addresses: [127.2.0.72]
  ports: [{{number: 7200, name: tcp-db, protocol: TCP, targetPort: {port}}}]
  resolution: DNS
  endpoints:
  - address: localhost
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
  namespace: default
  labels:
    istio.io/use-waypoint: reviews-waypoint
spec:
  hosts: [localhost]
  addresses: [127.2.0.73]
  ports: [{{number: {http_port}, name: http, protocol: HTTP}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: gone-egress
  namespace: default
  labels:
    istio.io/use-waypoint: reviews-waypoint
spec:
  hosts: [egress.invalid]
  addresses: [127.2.0.75]
  ports: [{{number: 7500, name: http, protocol: HTTP}}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: gone
  namespace: default
spec:
  hosts: [{bad}]
  addresses: [127.2.0.74]
  ports: [{{number: 7400, name: tcp-gone, protocol: TCP}}]
  resolution: DNS_ROUND_ROBIN
"""


def _wait_count(proc, pred, n: int, timeout: float = 5.0) -> list[dict]:
    """The access-log lines matching ``pred`` once there are ``n`` (each connection writes its line on close)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in proc.access_lines() if pred(line)]
        if len(lines) >= n or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_end_to_end_dns_entry_through_the_node_proxy_and_through_the_waypoint(tmp_path):
    from proxy.demo.mesh import EchoBackend, HttpBackend, SocksError
    from tests.e2e.mesh import Mesh, socks5_connect
    from tests.test_serviceentry import _echo, _wait_lines

    port, http_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    mesh = Mesh(tmp_path, extra_yaml=(E2E_DNS.format(port=port, http_port=http_port, bad=UNRESOLVABLE),))
    try:
        node_a = mesh.start_node("node-a", 1, wait=False)
        waypoint = mesh.start_waypoint(3, wait=False)
        for p in (node_a, waypoint):
            mesh.wait_ready(p)
        mesh.backends.append(EchoBackend("127.0.0.1", port))
        mesh.backends.append(HttpBackend("127.0.0.1", http_port, b"httpbin"))
        client = mesh.pod(10)   # productpage, on node-a
        # 1. No waypoint (ztunnel's on-demand DNS): node-a resolves the endpoint "localhost" and dials 127.0.0.1.
        for _ in range(2):
            sock = socks5_connect(node_a.socks5, mesh.vip(72), 7200, source_ip=client)
            assert _echo(sock, b"db" * 500) == b"db" * 500
        direct = _wait_count(node_a, lambda l: l.get("dst.service") == "dns-db.example.com", 2)
        assert [(l["route"], l["dst.workload"], l["response_flags"]) for l in direct] == [
            ("endpoint", "dns-db", "-")] * 2
        assert [l["dst.addr"] for l in direct] == [f"127.0.0.1:{port}"] * 2   # the address dialled, as ztunnel logs
        # 2. istio.io/use-waypoint (Istio's ambient egress example, with the implicit endpoint = the host): node-a →
        #    HBONE → the waypoint, whose cluster for the entry resolves the host (Envoy STRICT_DNS) and dials it.
        #    The example's HTTP port: the waypoint's HTTP chain picks the endpoint, Originator resolves it.
        get = b"GET /get HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        answer = _echo(socks5_connect(node_a.socks5, mesh.vip(73), http_port, source_ip=client), get)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"httpbin"), answer
        at_wp = _wait_lines(waypoint, lambda l: l.get("upstream_cluster", "").endswith("|localhost"))
        assert [(l["upstream_cluster"], l["upstream_host"], l["status"]) for l in at_wp] == [
            (f"inbound-vip|{http_port}|http|localhost", f"localhost:{http_port}", 200)]
        #    An egress host that does not resolve: the waypoint answers 503 UF (a connect failure, retried as one).
        get = b"GET / HTTP/1.1\r\nHost: egress.invalid\r\nConnection: close\r\n\r\n"
        answer = _echo(socks5_connect(node_a.socks5, mesh.vip(75), 7500, source_ip=client), get)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        at_wp = _wait_lines(waypoint, lambda l: l.get("upstream_cluster", "").endswith("|egress.invalid"))
        assert [(l["status"], l["response_flags"]) for l in at_wp] == [(503, "UF,URX")], at_wp   # Envoy: retried
        assert at_wp[0]["response_code_details"] == "upstream_reset_before_response_started{connection_failure,dns}"
        # 3. A name that does not resolve: a connect failure (UF), the proxy carries on.
        with pytest.raises(SocksError) as err:
            _echo(socks5_connect(node_a.socks5, mesh.vip(74), 7400, source_ip=client), b"x")
        assert err.value.code == 4   # RFC 1928 host unreachable
        failed = _wait_lines(node_a, lambda l: l.get("dst.service") == UNRESOLVABLE)
        assert [(l["response_flags"], UNRESOLVABLE in l["error"]) for l in failed] == [("UF", True)]
        assert _echo(socks5_connect(node_a.socks5, mesh.vip(72), 7200, source_ip=client), b"ok") == b"ok"
    finally:
        mesh.close()
