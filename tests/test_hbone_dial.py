"""hbone.dial: the node proxy's dials from a pod's IP keep that source IP and leave the port to
connect() (IP_BIND_ADDRESS_NO_PORT), so TIME_WAIT sockets on a busy client IP cannot make each dial
scan the ephemeral range (the perf note in hbone/dial.py). Not timed: it asserts the setting."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket

import pytest

from hbone.stream import TcpConnection, TcpStream
from proxy.errors import UpstreamConnectFailure
from hbone.dial import IP_BIND_ADDRESS_NO_PORT, connect_from, dial_from
from hbone.socktransport import SocketTransport
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


async def _check_dialled_from(conn, client: str, peers: list, payload: bytes) -> None:
    """A dial from ``client``'s IP: bound without a port first (IP_BIND_ADDRESS_NO_PORT), the bytes echo,
    and the pod saw the caller's address."""
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT) == 1
    assert conn.local_addr[0] == client and conn.local_addr[1] != 0
    conn.write(payload)
    assert await asyncio.wait_for(conn.read(100), 5) == payload
    assert peers == [conn.local_addr]        # the pod saw the caller's IP


@pytest.mark.parametrize("dial", ["connect_from", "TcpStream.connect"])
async def test_dial_comes_from_the_given_ip_with_the_port_left_to_connect(loopback_ip, dial):
    """hbone.dial.connect_from, and TcpStream.connect(local_host=) which uses it for an IP target
    (the waypoint's dials from its pod IP, the node's plain-TCP outbound)."""
    pod, client = loopback_ip(), loopback_ip()
    server, port, peers = await _listener(pod)
    async with server:
        if dial == "connect_from":
            conn = await connect_from(pod, port, client)
        else:
            conn = await TcpStream.connect(pod, port, local_host=client)
        try:
            assert isinstance(conn, TcpConnection)   # what hbone.relay splices (no pump tasks)
            await _check_dialled_from(conn, client, peers, b"ping")
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


# ---- dial_from: the callback dial of the node's inbound handler (no task) ----

async def _dial(host: str, port: int, local_ip: str | None, timeout: float = 5.0, *, socket_transport: bool = False):
    """dial_from as an awaitable for the tests: (conn, err), and whether it answered before returning."""
    fut = asyncio.get_running_loop().create_future()
    dial_from(host, port, local_ip, lambda c, e: fut.set_result((c, e)), timeout=timeout,
              socket_transport=socket_transport)
    answered_at_once = fut.done()
    conn, err = await asyncio.wait_for(fut, timeout + 5)
    return conn, err, answered_at_once


def _full_listener(ip: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full (backlog 0, one connection queued and not accepted):
    the kernel drops further SYNs, so a new dial stays in its handshake (the slow path)."""
    lsock = socket.socket()
    lsock.bind((ip, 0))
    lsock.listen(0)
    filler = socket.socket()
    filler.setblocking(False)
    filler.connect_ex(lsock.getsockname())
    return lsock, [filler]


async def test_dial_from_a_local_pod_keeps_the_source_ip(loopback_ip):
    pod, client = loopback_ip(), loopback_ip()
    server, port, peers = await _listener(pod)
    async with server:
        conn, err, _ = await _dial(pod, port, client)
        try:
            assert err is None and conn.__class__ is TcpConnection   # what hbone.relay splices
            await _check_dialled_from(conn, client, peers, b"hi")
        finally:
            conn.abort()


# The dial's failure paths, with a uvloop transport and with hbone.socktransport's (the node proxy's).
TRANSPORTS = pytest.mark.parametrize("socket_transport", [False, True], ids=["uvloop", "socktransport"])


@TRANSPORTS
async def test_dial_from_waits_for_a_handshake_in_flight(loopback_ip, socket_transport):
    pod, client = loopback_ip(), loopback_ip()
    lsock, held = _full_listener(pod)
    try:
        task = asyncio.ensure_future(_dial(*lsock.getsockname(), client, socket_transport=socket_transport))
        await asyncio.sleep(0.1)
        assert not task.done()                   # the SYN was dropped: still waiting
        lsock.setblocking(False)
        held.append(lsock.accept()[0])           # room in the queue: the SYN retransmit gets in
        conn, err, _ = await asyncio.wait_for(task, 10)
        assert err is None and conn.local_addr[0] == client
        assert (conn.transport.__class__ is SocketTransport) == socket_transport
        conn.abort()
    finally:
        for s in (*held, lsock):
            s.close()


@TRANSPORTS
async def test_dial_from_times_out_a_handshake_that_never_completes(loopback_ip, socket_transport):
    pod, client = loopback_ip(), loopback_ip()
    lsock, held = _full_listener(pod)
    try:
        conn, err, _ = await _dial(*lsock.getsockname(), client, timeout=0.2, socket_transport=socket_transport)
        assert conn is None and isinstance(err, TimeoutError)
    finally:
        for s in (*held, lsock):
            s.close()


@TRANSPORTS
async def test_dial_from_reports_refusal_and_an_unbindable_source(loopback_ip, socket_transport):
    pod, client = loopback_ip(), loopback_ip()
    with socket.socket() as s:
        s.bind((pod, 0))
        port = s.getsockname()[1]
    conn, err, _ = await _dial(pod, port, client, socket_transport=socket_transport)
    assert conn is None and isinstance(err, OSError) and err.errno == errno.ECONNREFUSED
    conn, err, at_once = await _dial(pod, port, "192.0.2.1", socket_transport=socket_transport)
    assert conn is None and err.errno == errno.EADDRNOTAVAIL and at_once   # found at bind(): at once


async def test_dial_from_without_a_source_ip_uses_our_own_address(loopback_ip):
    pod = loopback_ip()
    server, port, peers = await _listener(pod)
    async with server:
        conn, err, _ = await _dial(pod, port, None)
        try:
            assert err is None and ipaddress.ip_address(conn.local_addr[0]).is_loopback
            conn.write(b"hi")
            assert await asyncio.wait_for(conn.read(100), 5) == b"hi"
            assert peers == [conn.local_addr]
        finally:
            conn.abort()


@pytest.mark.parametrize("entry", ["dial_tcp", "Dialer"])
async def test_callback_dials_with_local_host_bind_the_ip_only(loopback_ip, entry):
    """hbone.stream.dial_tcp / Dialer with local_host go through dial_from for an IP target, like
    TcpStream.connect(local_host=): the port is left to connect() (the TIME_WAIT fix)."""
    from hbone.stream import Dialer, dial_tcp
    pod, client = loopback_ip(), loopback_ip()
    server, port, peers = await _listener(pod)
    async with server:
        fut = asyncio.get_running_loop().create_future()
        on_done = lambda c, e: fut.set_result((c, e))  # noqa: E731
        if entry == "dial_tcp":
            dial_tcp(pod, port, on_done, local_host=client)
        else:
            Dialer(4).dial(pod, port, on_done, local_host=client)
        conn, err = await asyncio.wait_for(fut, 10)
        try:
            assert err is None and conn.__class__ is TcpConnection
            await _check_dialled_from(conn, client, peers, b"cb")
        finally:
            conn.abort()


async def test_dial_tcp_with_local_host_times_out_a_handshake_that_hangs(loopback_ip):
    pod, client = loopback_ip(), loopback_ip()
    lsock, held = _full_listener(pod)
    try:
        from hbone.stream import dial_tcp
        fut = asyncio.get_running_loop().create_future()
        dial_tcp(*lsock.getsockname(), lambda c, e: fut.set_result((c, e)), local_host=client, timeout=0.2)
        conn, err = await asyncio.wait_for(fut, 10)
        assert conn is None and isinstance(err, TimeoutError)
    finally:
        lsock.close()
        for s in held:
            s.close()
