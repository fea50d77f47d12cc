"""DestinationRule ``consistentHash`` through a real waypoint: the request path computes the key once per
request (header, cookie, query parameter, source IP), picks the host on the ring / Maglev table
(policy/routing/hashing.py, tested there), and adds the Set-Cookie Envoy generates for an ``httpCookie``
with a ``ttl``. Real TLS from our CA, the waypoint's HBONE server, three reviews pods answering their
version (tests/waypoint_harness.py)."""

from __future__ import annotations

import random

from policy.routing.model import HASH_SOURCE_IP, ConsistentHash
from proxy.pipeline.chains import match_chain
from proxy.pipeline.tcp import plan_tcp
from tests.waypoint_harness import TCP_VIP, config_docs, destination_rule, start_harness, virtual_service


def _routing(consistent_hash: str, *, retries: str = "") -> str:
    """reviews without a VirtualService split (all three pods are one cluster) plus a DestinationRule
    with this ``consistentHash`` body (YAML flow mapping)."""
    dr = destination_rule("reviews", traffic_policy=f"{{loadBalancer: {{consistentHash: {consistent_hash}}}}}")
    if not retries:
        return dr
    return config_docs(dr, virtual_service("reviews", f"""
        - route: [{{destination: {{host: reviews}}}}]
          retries: {retries}
    """))


async def _versions(h, path: str = "/", headers=(), n: int = 1, source: str = "127.0.0.1") -> list[bytes]:
    """n GETs, each on its own tunnel (a new connection's pick, not a pooled one), from ``source``."""
    client = h.client()
    out = []
    for _ in range(n):
        status, hdrs, body = await client.fetch(path, headers=headers, source=source)
        assert status == 200, (status, body)
        out.append((body, hdrs))
    return out


async def _sticky(h, keys: int, per_key: int, request) -> set[bytes]:
    """For each of ``keys`` keys, ``per_key`` requests (``request(h, i, n)`` makes them): every request of
    a key answered by the same pod; returns the pods the keys went to, which must be at least two (all
    keys on one of 3 equal pods has probability 3 * (1/3)^keys)."""
    chosen = set()
    for i in range(keys):
        bodies = {b for b, _ in await request(h, i, per_key)}
        assert len(bodies) == 1, (i, bodies)
        chosen |= bodies
    assert len(chosen) >= 2, chosen
    return chosen


async def test_a_header_key_sends_each_user_to_one_pod_and_users_over_several(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=_routing("{httpHeaderName: x-user}"), authz=False)
    try:
        await _sticky(h, 24, 4, lambda h, i, n: _versions(h, headers=[(b"x-user", f"user-{i}".encode())], n=n))
        # No header: no hash, a random point of the same table (Envoy) — spread over the pods.
        spread = {b for b, _ in await _versions(h, n=30)}
        assert len(spread) >= 2
        assert not any("set-cookie" in hd for _, hd in await _versions(h, n=2))
    finally:
        await h.close()


async def test_a_query_parameter_key_is_sticky(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=_routing("{httpQueryParameterName: session}"),
                            authz=False)
    try:
        await _sticky(h, 12, 3, lambda h, i, n: _versions(h, f"/?a=1&session=s{i}", n=n))
    finally:
        await h.close()


async def test_source_ip_key_follows_the_original_client(tmp_path, loopback_ip):
    """useSourceIp at a waypoint: the original client (``forwarded: for=`` from its node proxy)."""
    h = await start_harness(tmp_path, loopback_ip, routing=_routing("{useSourceIp: true}"), authz=False)
    try:
        await _sticky(h, 12, 3, lambda h, i, n: _versions(h, n=n, source=f"10.0.0.{i + 1}"))
    finally:
        await h.close()


async def test_a_cookie_with_ttl_is_generated_once_then_keeps_the_client_on_its_pod(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, authz=False,
                            routing=_routing("{httpCookie: {name: sticky, path: /, ttl: 3600s}}"))
    try:
        [(body, hdrs)] = await _versions(h, source="10.1.0.7")
        cookie = hdrs["set-cookie"]
        # Envoy's generated cookie: name="<16 hex>"; Max-Age=<ttl s>; Path=<path>; HttpOnly.
        name_value, *attrs = [p.strip() for p in cookie.split(";")]
        assert name_value.startswith('sticky="') and len(name_value) == len('sticky=""') + 16
        assert "Max-Age=3600" in attrs and "Path=/" in attrs and "HttpOnly" in attrs
        # The generated value is the key this request was hashed by: with it, every later request sticks
        # to the same pod, and carries no new cookie.
        value = name_value.split("=", 1)[1].strip('"')
        for _, hd in await _versions(h, headers=[(b"cookie", f"other=1; sticky={value}".encode())], n=6):
            assert "set-cookie" not in hd
        later = {b for b, _ in await _versions(h, headers=[(b"cookie", f"sticky={value}".encode())], n=6)}
        assert later == {body}
        # The same client address gets the same generated cookie (Envoy hashes the connection's addresses).
        [(_, again)] = await _versions(h, source="10.1.0.7")
        assert again["set-cookie"] == cookie
        lines = await h.http_lines(14)   # 1 + 6 + 6 + 1 requests, each answered 200
        assert len(lines) == 14 and all(line["status"] == 200 for line in lines)
    finally:
        await h.close()


async def test_a_cookie_without_ttl_is_never_generated(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, authz=False, routing=_routing("{httpCookie: {name: sticky}}"))
    try:
        got = await _versions(h, n=3)
        assert not any("set-cookie" in hd for _, hd in got)
        bodies = {b for b, _ in await _versions(h, headers=[(b"cookie", b"sticky=abc")], n=5)}
        assert len(bodies) == 1
    finally:
        await h.close()


async def test_maglev_is_sticky_through_the_waypoint_too(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, authz=False,
                            routing=_routing("{httpHeaderName: x-user, maglev: {tableSize: 65537}}"))
    try:
        await _sticky(h, 12, 3, lambda h, i, n: _versions(h, headers=[(b"x-user", f"m{i}".encode())], n=n))
    finally:
        await h.close()


async def test_retries_with_consistent_hashing_stay_on_the_hashed_pod(tmp_path, loopback_ip):
    """Istio retry.go: with a hash policy the previous_hosts predicate is not added ("When Consistent
    Hashing is enabled, we don't want to use other hosts during retries"): a 503 is retried on the
    same pod, so a user's retried request is answered by that pod again."""
    h = await start_harness(tmp_path, loopback_ip, authz=False,
                            routing=_routing("{httpHeaderName: x-user}", retries="{attempts: 2, retryOn: 5xx}"))
    try:
        [(first, _)] = await _versions(h, "/", headers=[(b"x-user", b"carol")])
        status, _, body = await h.client().fetch("/status/503", headers=[(b"x-user", b"carol")])
        assert (status, body) == (503, first)   # every attempt on carol's pod, which answered 503
        lines = await h.http_lines(1, path="/status/503")
        assert lines and lines[-1]["attempts"] == 3
        hosts = {p.ip for p in h.pods.values() if p.version.encode() == first}
        assert lines[-1]["upstream_host"].split(":")[0] in hosts
    finally:
        await h.close()


async def test_a_tcp_chain_carries_the_destination_rule_hash_policy(tmp_path, loopback_ip):
    """TCP: Istio sets the tcp_proxy hash_policy to source_ip for useSourceIp; the plan carries the
    DestinationRule's policy, and a tunnel through it still works."""
    dr = destination_rule("tcp-echo", traffic_policy="{loadBalancer: {consistentHash: {useSourceIp: true}}}")
    h = await start_harness(tmp_path, loopback_ip, tcp_pod=True, extra=dr, authz=False)
    try:
        snap = h.store.current
        plan = plan_tcp(match_chain((TCP_VIP, 9000), snap), snap, rng=random.Random(1))
        assert isinstance(plan.consistent, ConsistentHash) and plan.consistent.key_kind == HASH_SOURCE_IP
        client = h.client()
        for _ in range(3):
            stream = await client.tunnel(f"{TCP_VIP}:9000")
            stream.write(b"ping")
            await stream.drain()
            stream.write_eof()
            got = b""
            while data := await stream.read():
                got += data
            assert got == b"ping"
        # The plan is made once per snapshot and destination (plan_tcp's memo): the three tunnels shared its
        # candidates tuple, by which a cluster's hash view is found (LoadBalancer.pick; this one-pod cluster needs
        # none), instead of a new tuple and view per tunnel.
        memo_snapshot, memo = h.waypoint._tcp_plans
        assert memo_snapshot is snap and len(memo) == 1
        (_, memo_plan), = memo.values()
        assert memo_plan == plan and plan_tcp(match_chain((TCP_VIP, 9000), snap), snap, rng=random.Random(1),
                                              memo=memo) is memo_plan
    finally:
        await h.close()
