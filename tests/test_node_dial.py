"""proxy.node.dial: the node proxy's dials from a pod's IP keep that source IP and leave the port to
connect() (IP_BIND_ADDRESS_NO_PORT), so TIME_WAIT sockets on a busy client IP cannot make each dial
scan the ephemeral range (the perf note in proxy/node/dial.py). Not timed: it asserts the setting."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from hbone.stream import TcpConnection
from proxy.errors import UpstreamConnectFailure
from proxy.node.dial import IP_BIND_ADDRESS_NO_PORT, connect_from
from proxy.node.inbound import connect_workload


async def _listener(ip: str):
    peers: list[tuple[str, int]] = []

    async def on_conn(reader, writer):
        peers.append(writer.get_extra_info("peername")[:2])
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_conn, ip, 0)
    return server, server.sockets[0].getsockname()[1], peers


async def test_dial_comes_from_the_given_ip_with_the_port_left_to_connect(loopback_ip):
    pod, client = loopback_ip(), loopback_ip()
    server, port, peers = await _listener(pod)
    async with server:
        conn = await connect_from(pod, port, client)
        try:
            assert isinstance(conn, TcpConnection)   # what hbone.relay splices (no pump tasks)
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
            assert conn.local_addr[0] == client and conn.local_addr[1] != 0
            conn.write(b"ping")
            assert await asyncio.wait_for(conn.read(100), 5) == b"ping"
            assert peers == [conn.local_addr]        # the pod saw the caller's IP
        finally:
            conn.abort()


async def test_inbound_dial_is_spliceable_and_keeps_the_client_ip(loopback_ip):
    pod, client = loopback_ip(), loopback_ip()
    server, port, peers = await _listener(pod)
    async with server:
        up = await connect_workload((pod, port), client, timeout=5)
        try:
            assert up.__class__ is TcpConnection   # hbone.relay splices exactly this class
            assert up.local_addr[0] == client
        finally:
            up.abort()


async def test_refused_dial_is_an_upstream_connect_failure(loopback_ip):
    pod, client = loopback_ip(), loopback_ip()
    with socket.socket() as s:   # a port with nothing listening
        s.bind((pod, 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        await connect_from(pod, port, client)
    with pytest.raises(UpstreamConnectFailure) as info:
        await connect_workload((pod, port), client, timeout=5)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


async def test_an_unbindable_source_ip_falls_back_to_our_own_address(loopback_ip):
    """ztunnel freebind: when the client's IP cannot be bound here the dial still happens, from our address."""
    pod = loopback_ip()
    server, port, peers = await _listener(pod)
    async with server:
        with pytest.raises(OSError) as info:
            await connect_from(pod, port, "192.0.2.1")   # TEST-NET-1: not an address of this host
        assert info.value.errno == errno.EADDRNOTAVAIL
        up = await connect_workload((pod, port), "192.0.2.1", timeout=5)
        try:
            assert up.local_addr[0] != "192.0.2.1"
        finally:
            up.abort()
