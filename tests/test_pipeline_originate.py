"""connect_originate against real peers: an HBONE server (our CA, real mTLS) in front of a TCP echo,
and a plain TCP echo for a workload outside the mesh."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from certs.rotation import MintingCertSource
from hbone.server import HboneServer
from hbone.testing import Mesh, echo_handler_factory, start_echo
from policy.inventory import Workload
from policy.routing.endpoints import Candidate
from proxy.pipeline.originate import OriginateFailed, Originator
from tests.stream_helpers import exchange

MESH = Mesh.create()
WAYPOINT = MESH.identity("default", "reviews-waypoint")


def _source():
    return MintingCertSource(MESH.ca, WAYPOINT, now=datetime.now(timezone.utc) - timedelta(minutes=5))


def _workload(ip: str, sa: str = "bookinfo-reviews", protocol: str = "HBONE") -> Workload:
    return Workload(uid=f"uid-{ip}", name=f"pod-{ip}", namespace="default", workload_ips=(ip,),
                    service_account=sa, protocol=protocol)


async def test_hbone_to_pod_with_headers_and_identity(loopback_ip):
    pod = loopback_ip()
    echo, echo_addr = await start_echo(pod)
    seen = []
    relay = await echo_handler_factory(echo_addr)

    async def handler(tunnel):
        seen.append(tunnel.request)
        await relay(tunnel)

    server = await HboneServer(lambda: MESH.server_context(MESH.identity("default", "bookinfo-reviews")),
                               handler, trust_domain="cluster.local").start(pod, 15008)
    orig = Originator(_source())
    try:
        cand = Candidate(_workload(pod), pod, echo_addr[1])
        stream = await orig.open(cand, source=("127.9.9.9", 4444),
                                 service_hostname="reviews.default.svc.cluster.local", baggage="k8s.namespace.name=default")
        assert await exchange(stream, b"hello" * 1000) == b"hello" * 1000
        req = seen[0]
        assert req.authority == (pod, echo_addr[1])
        assert req.header("forwarded") == 'for="127.9.9.9:4444";host=reviews.default.svc.cluster.local'
        assert req.header("baggage") == "k8s.namespace.name=default"
        assert req.traceparent is not None
        assert "hbone=1" in repr(orig)

        # The pod presents another identity than the inventory says: refused (UF), not trusted.
        wrong = Candidate(_workload(pod, sa="someone-else"), pod, echo_addr[1])
        with pytest.raises(OriginateFailed) as err:
            await orig.open(wrong, source=("127.9.9.9", 1), timeout=2)
        assert err.value.reason == "identity" and err.value.flag == "UF" and err.value.http_status == 503
        # ...unless the service's subjectAltNames name it.
        ok = await orig.open(wrong, source=("127.9.9.9", 1), timeout=2,
                             subject_alt_names=["spiffe://cluster.local/ns/default/sa/bookinfo-reviews", "dns.example"])
        assert await exchange(ok, b"x") == b"x"
    finally:
        await orig.close()
        await server.close()
        echo.close()


async def test_tunnel_refused_and_connect_refused(loopback_ip):
    pod = loopback_ip()

    async def deny(tunnel):
        await tunnel.reject(401, "policy")

    server = await HboneServer(lambda: MESH.server_context(MESH.identity("default", "bookinfo-reviews")),
                               deny, trust_domain="cluster.local").start(pod, 15008)
    orig = Originator(_source())
    try:
        with pytest.raises(OriginateFailed) as err:
            await orig.open(Candidate(_workload(pod), pod, 9080), source=("127.0.0.1", 1))
        assert err.value.reason == "tunnel_401" and err.value.tunnel_status == 401
        assert err.value.outcome == "connect-failure"
        # Nobody listens on 15008 there: connection refused → UF.
        nobody = loopback_ip()
        with pytest.raises(OriginateFailed) as err:
            await orig.open(Candidate(_workload(nobody), nobody, 9080), source=("127.0.0.1", 1))
        assert err.value.reason == "refused"
        assert "connection_failure,refused" in err.value.detail
    finally:
        await orig.close()
        await server.close()


async def test_plain_tcp_for_workloads_outside_the_mesh(loopback_ip):
    pod = loopback_ip()
    echo, echo_addr = await start_echo(pod)
    orig = Originator(_source())
    try:
        stream = await orig.open(Candidate(_workload(pod, protocol="TCP"), pod, echo_addr[1]),
                                 source=("127.0.0.1", 1))
        assert await exchange(stream, b"plain") == b"plain"
        stream.close()
        assert orig.opened_tcp == 1 and orig.opened_hbone == 0
        with pytest.raises(OriginateFailed) as err:
            await orig.open(Candidate(_workload(pod, protocol="TCP"), pod, 1), source=("127.0.0.1", 1))
        assert err.value.reason == "refused"
    finally:
        await orig.close()
        echo.close()
