"""Chaos / property test for the splice (hbone/relay.py ``relay_detached``) between an HBONE tunnel
(HboneServer + HbonePool, mTLS from our CA, real loopback) and a ``SocketTransport`` connection from
``dial_tcp`` to a "pod" on its own 127.x address: random transfer shapes both ways (0..1 MiB writes),
random stalls of the pod's reading (backpressure through the splice into HTTP/2 flow control) and of
the client's, half-closes each way, and random aborts (RST_STREAM from the client, TCP RST from the
pod). What must hold (hbone/relay.py: "never a silent truncation"): each side reads a prefix of what
the other sent, all of it when it sees a clean end; a reset is seen only when someone aborted; the
relay reports its end (on_done) with exact counts when nobody aborted; nothing hangs; and the same
HBONE connection then serves a fresh tunnel."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from hbone.pool import HbonePool
from hbone.relay import relay_detached
from hbone.server import HboneServer
from hbone.settings import HboneSettings
from hbone.socktransport import WRITE_HIGH_WATER_BYTES
from hbone.stream import StreamReset, dial_tcp
from hbone.testing import LOOPS, Mesh, run
from tests.chaos_helpers import pattern, reader_ops, writer_ops

KiB = 1024
MiB = 1024 * KiB
EXAMPLE_DEADLINE_S = 25.0  # a hang fails the example; generous on a loaded 2-core box
_LINGER_RST = struct.pack("ii", 1, 0)
_MESH: list = []


def _mesh() -> Mesh:
    if not _MESH:
        _MESH.append(Mesh.create())
    return _MESH[0]


sizes = st.one_of(st.integers(0, 300), st.integers(0, 200 * KiB), st.integers(0, MiB))
client_op = writer_ops(sizes, 30, st.tuples(st.just("close")))
writer_op = writer_ops(sizes, 30)
reader_op = reader_ops(MiB, 50)


class Side:
    """What one end sent and saw."""

    def __init__(self) -> None:
        self.sent = 0
        self.sent_at_eof: int | None = None
        self.aborted = False
        self.got = bytearray()
        self.end: str | None = None       # "eof" | "reset"
        self.write_failed = False
        self.closed = False        # the client's close(): END_STREAM, and it reads no more


async def _example(ip_server: str, ip_pod: str, client_ops, client_reads, pod_ops, pod_reads) -> None:
    loop = asyncio.get_running_loop()
    mesh = _mesh()
    srv_id, cli_id = mesh.identity("ns1", "server"), mesh.identity("ns2", "client")
    server_ctx, client_ctx = mesh.server_context(srv_id), mesh.client_context(cli_id)
    results: list = []
    upstreams: list = []      # the pod-side TcpConnection (over a SocketTransport)
    queued_max = [0]          # its transport's largest write queue seen

    def handler(tunnel) -> None:  # benchmarks/relay.py's: dial_tcp, accept_nowait, relay_detached
        host, port = tunnel.authority

        def connected(upstream, err) -> None:
            if err is not None:
                tunnel.reject_nowait(503, str(err))
                return
            upstreams.append(upstream)
            assert relay_detached(tunnel.accept_nowait(), upstream, results.append)

        dial_tcp(host, port, connected, loop=loop)

    lsock = socket.socket()
    lsock.bind((ip_pod, 0))
    lsock.listen(8)
    lsock.setblocking(False)
    pod_port = lsock.getsockname()[1]
    server = await HboneServer(lambda: server_ctx, handler, trust_domain=mesh.trust_domain).start(ip_server, 0)
    pool = HbonePool(lambda: client_ctx, trust_domain=mesh.trust_domain)

    def open_tunnel():
        return pool.open_tunnel(src_identity=cli_id, dst_identities=frozenset({srv_id}), dst=server.address,
                                authority=f"{ip_pod}:{pod_port}")

    cli, pod = Side(), Side()
    tasks: list[asyncio.Task] = []
    psock = None
    try:
        async with asyncio.timeout(EXAMPLE_DEADLINE_S):
            s = await open_tunnel()
            psock, _ = await loop.sock_accept(lsock)
            psock.setblocking(False)
            (conn,) = pool.connections()

            async def client_writer() -> None:
                try:
                    for op in client_ops:
                        if op[0] == "write" and cli.sent_at_eof is None:
                            s.write(pattern(cli.sent, op[1]))
                            cli.sent += op[1]
                            await s.drain()
                        elif op[0] == "stall":
                            await asyncio.sleep(op[1] / 1000)
                        elif op[0] == "write_eof" and cli.sent_at_eof is None:
                            cli.sent_at_eof = cli.sent
                            s.write_eof()
                        elif op[0] == "abort":
                            cli.aborted = True
                            s.abort()      # RST_STREAM CONNECT_ERROR
                            return
                        elif op[0] == "close":
                            if cli.sent_at_eof is None:
                                cli.sent_at_eof = cli.sent
                            cli.closed = True
                            s.close()      # END_STREAM; RST_STREAM NO_ERROR if the pod still sends
                            return
                    if cli.sent_at_eof is None:
                        cli.sent_at_eof = cli.sent
                        s.write_eof()
                except StreamReset:
                    cli.write_failed = True

            async def client_reader() -> None:
                try:
                    for op in itertools.chain(client_reads, itertools.repeat(("read", MiB))):
                        if cli.aborted or cli.closed:
                            return
                        if op[0] == "stall":
                            await asyncio.sleep(op[1] / 1000)
                            continue
                        data = await s.read(op[1])
                        if not data:
                            cli.end = "eof"
                            return
                        cli.got += data
                except StreamReset:
                    cli.end = "reset"

            async def pod_writer() -> None:
                try:
                    for op in pod_ops:
                        if op[0] == "write" and pod.sent_at_eof is None:
                            await loop.sock_sendall(psock, pattern(pod.sent, op[1]))
                            pod.sent += op[1]
                        elif op[0] == "stall":
                            await asyncio.sleep(op[1] / 1000)
                        elif op[0] == "write_eof" and pod.sent_at_eof is None:
                            pod.sent_at_eof = pod.sent
                            psock.shutdown(socket.SHUT_WR)
                        elif op[0] == "abort":
                            pod.aborted = True
                            psock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                            pod_r.cancel()
                            await asyncio.sleep(0)
                            psock.close()  # RST
                            return
                    if pod.sent_at_eof is None:
                        pod.sent_at_eof = pod.sent
                        psock.shutdown(socket.SHUT_WR)
                except OSError:
                    pod.write_failed = True  # Linux reports a reset once: maybe to this send

            async def pod_reader() -> None:
                try:
                    for op in itertools.chain(pod_reads, itertools.repeat(("read", MiB))):
                        if op[0] == "stall":
                            await asyncio.sleep(op[1] / 1000)
                            continue
                        data = await loop.sock_recv(psock, op[1])
                        if not data:
                            pod.end = "eof"
                            return
                        pod.got += data
                except OSError:
                    pod.end = "reset"

            async def sampler() -> None:
                transport = upstreams[0].transport
                while True:
                    queued_max[0] = max(queued_max[0], transport.get_write_buffer_size())
                    await asyncio.sleep(0.001)

            sampling = asyncio.ensure_future(sampler())
            tasks[:] = [asyncio.ensure_future(c()) for c in (client_writer, client_reader, pod_writer)]
            pod_r = asyncio.ensure_future(pod_reader())
            tasks.append(pod_r)
            for res in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                    raise res
            sampling.cancel()
            if not pod.aborted:
                psock.close()
            while not results:   # the relay always reports its end
                await asyncio.sleep(0.005)
            result = results[0]

            # the HBONE connection survives whatever happened to one tunnel: a fresh one works
            s2 = await open_tunnel()
            p2, _ = await loop.sock_accept(lsock)
            s2.write(b"ping")
            assert await loop.sock_recv(p2, 10) == b"ping"
            await loop.sock_sendall(p2, b"pong")
            assert await s2.read() == b"pong"
            assert pool.connections() == [conn], "the HBONE connection did not survive"
            s2.abort()
            p2.close()
    except TimeoutError:
        raise AssertionError(f"hang: client sent={cli.sent} got={len(cli.got)} end={cli.end}; "
                             f"pod sent={pod.sent} got={len(pod.got)} end={pod.end}; relay={results}") from None
    finally:
        for t in tasks:
            t.cancel()
        if psock is not None:
            psock.close()
        lsock.close()
        await pool.close()
        await server.close(0.2)

    # bounded: a stalled pod makes the splice stop acknowledging HBONE DATA once the transport is
    # above its high-water mark, so at most one stream window more is ever queued (hbone/relay.py)
    assert queued_max[0] <= WRITE_HIGH_WATER_BYTES + HboneSettings().stream_window, queued_max
    someone_aborted = cli.aborted or pod.aborted
    # client -> pod
    assert bytes(pod.got) == pattern(0, len(pod.got)), "corrupted toward the pod"
    assert len(pod.got) <= cli.sent
    if pod.end == "eof" and pod.write_failed:
        pod.end = "reset"    # the RST went to the pod's send (reported once)
    if pod.end == "eof":
        assert len(pod.got) == cli.sent_at_eof, f"clean FIN at the pod after {len(pod.got)} of {cli.sent_at_eof}"
    elif not pod.aborted:
        # the client's abort, or its close while the pod was still sending (the splice cannot pass
        # the pod's bytes on: it resets the pod, as ztunnel does)
        assert cli.aborted or cli.closed, f"the pod saw {pod.end} though nobody aborted"
    # pod -> client
    assert bytes(cli.got) == pattern(0, len(cli.got)), "corrupted toward the client"
    assert len(cli.got) <= pod.sent
    if cli.end == "eof" and not cli.closed:
        assert len(cli.got) == pod.sent_at_eof, f"clean END_STREAM after {len(cli.got)} of {pod.sent_at_eof}"
    elif not (cli.aborted or cli.closed):
        assert pod.aborted, f"the client saw {cli.end} though nobody aborted"
    if not someone_aborted and not cli.closed:
        assert pod.end == "eof" and cli.end == "eof"
        assert result.reset is None, result
        # relay(a=HBONE stream, b=TCP): a_to_b is the upload
        assert (result.a_to_b, result.b_to_a) == (cli.sent, pod.sent), result


@hsettings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(loop=st.sampled_from(LOOPS),
       client_ops=st.lists(client_op, max_size=5),
       client_reads=st.lists(reader_op, max_size=4),
       pod_ops=st.lists(writer_op, max_size=5),
       pod_reads=st.lists(reader_op, max_size=4))
def test_splice_conserves_bytes_or_both_sides_see_a_reset(loopback_ip, loop, client_ops, client_reads,
                                                          pod_ops, pod_reads):
    run(loop, lambda: _example(loopback_ip(), loopback_ip(), client_ops, client_reads, pod_ops, pod_reads))
