"""Chaos / property tests for HBONE's TLS layer (hbone/_tls.py) with certificates from our CA:
plaintext is conserved, or the end is reported as an error — never a silent truncation taken for a
clean end. Two levels:

- the layer alone (sans-IO, fast): random plaintext writes, the TLS bytes cut at random points
  (byte by byte, random pieces, coalesced), close_notify at a random moment, and a fault at a random
  byte (the stream cut there = a FIN mid-record, garbage inserted, a bit flipped);
- a live connection (HboneServer + HbonePool over loopback) through a middlebox that re-chunks the
  server's TLS bytes at random sizes with random stalls and then cuts (FIN without close_notify),
  injects garbage or flips a bit at a random offset: the tunnel reads a prefix of the payload and
  then either its clean end with every byte, or StreamReset; the pool then serves a fresh tunnel.

tests/test_hbone_tls_layer.py has the one-path unit tests (byte by byte, close_notify exchange, a bad
record, arbitrary bytes); these mix them at random."""

from __future__ import annotations

import asyncio
import ssl

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from hbone import _tls
from hbone.errors import HboneError
from hbone.pool import HbonePool
from hbone.server import HboneServer
from hbone.stream import StreamReset
from hbone.testing import LOOPS, Mesh, run
from tests.chaos_helpers import pattern

KiB = 1024
EXAMPLE_DEADLINE_S = 20.0
# The middlebox cuts the server's first bytes this far (handshake, first records) into the test's
# tiny random pieces, then into pieces of at least 4 KiB: a 300 KiB answer byte by byte is minutes.
SMALL_CHUNKS_FOR_BYTES = 16 * KiB  # a hang fails the example; generous on a loaded 2-core box


@pytest.fixture(scope="module")
def mesh():
    return Mesh.create()


def _pair(mesh: Mesh) -> tuple[_tls.TlsLayer, _tls.TlsLayer]:
    cli = _tls.TlsLayer(mesh.client_context(mesh.identity("ns2", "client")), server_side=False)
    srv = _tls.TlsLayer(mesh.server_context(mesh.identity("ns1", "server")), server_side=True)
    done_c = cli.handshake(b"")
    done_s = False
    for _ in range(6):
        done_s = srv.handshake(cli.take()) or done_s
        done_c = cli.handshake(srv.take()) or done_c
        if done_c and done_s:
            break
    srv.decrypt(cli.take())
    cli.decrypt(srv.take())  # session tickets: the client has read everything before the test's bytes
    assert (cli.state, srv.state) == (_tls.OPEN, _tls.OPEN)
    return cli, srv


def _split(wire: bytes, how: str, cuts: list[int]) -> list[bytes]:
    if how == "bytewise":
        return [wire[i:i + 1] for i in range(len(wire))]
    if how == "coalesced":
        return [wire]
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(wire)]:
        pieces.append(wire[last:p])
        last = p
    return pieces


fault = st.one_of(
    st.none(),
    st.tuples(st.just("fin"), st.integers(0, 10**6)),
    st.tuples(st.just("garbage"), st.integers(0, 10**6), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
)


@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(writes=st.lists(st.one_of(st.integers(0, 300), st.integers(0, 40 * KiB)), max_size=6),
       close_at=st.one_of(st.none(), st.integers(0, 6)),
       how=st.sampled_from(["bytewise", "pieces", "coalesced"]),
       cuts=st.lists(st.integers(0, 10**6), max_size=12),
       fault=fault)
def test_layer_plaintext_is_conserved_or_the_end_is_not_clean(mesh, writes, close_at, how, cuts, fault):
    cli, srv = _pair(mesh)
    sent = 0
    close_at = None if close_at is None else min(close_at, len(writes))
    for i, n in enumerate(writes + [None]):
        if close_at == i:
            cli.close()
        if n is not None:
            cli.write(pattern(sent, n))
            if cli.state == _tls.OPEN:
                sent += n
    wire = cli.take()
    if how == "bytewise" and len(wire) > 3000:
        how = "pieces"  # byte by byte is for the small cases (each byte is a decrypt call)
    ended_by_fin = False
    if fault is not None:
        pos = fault[1] % (len(wire) + 1)
        if fault[0] == "fin":
            wire, ended_by_fin = wire[:pos], True
        elif fault[0] == "garbage":
            wire = wire[:pos] + fault[2] + wire[pos:]
        elif pos < len(wire):
            wire = wire[:pos] + bytes([wire[pos] ^ (1 << fault[2])]) + wire[pos + 1:]
    got = bytearray()
    error = None
    try:
        for piece in _split(wire, how, cuts):
            if srv.state == _tls.OPEN:
                got += srv.decrypt(piece)
                srv.take()
                if srv.peer_closed:
                    srv.close()  # the connection answers close_notify with its own (hbone/_conn.py)
            elif srv.state == _tls.CLOSING:
                srv.drain_closing(piece)  # discarded, never plaintext
            # CLOSED: the connection reads nothing more
    except ssl.SSLError as err:
        error = err
    # never garbage, never reordered: a prefix of what was sent
    assert bytes(got) == pattern(0, len(got)), "corrupted plaintext"
    assert len(got) <= sent
    if srv.peer_closed:
        # a clean end (close_notify) means every byte came
        assert len(got) == sent, f"close_notify after {len(got)} of {sent} bytes"
    if fault is None:
        assert error is None and len(got) == sent
        assert srv.peer_closed == (close_at is not None)
    elif ended_by_fin and not srv.peer_closed:
        # cut short of close_notify: the FIN that follows is a ragged EOF, which the connection
        # reports as a reset to its streams (hbone/_conn.py eof_received; tested live below)
        assert error is None


# ---- live: a middlebox between the pool and the server -------------------------------------------

class Middlebox:
    """A TCP relay on its own loopback address: client→server bytes pass as they are; server→client
    bytes are re-chunked (random sizes, random stalls) and, on the first connection only, faulted at
    byte `at` (see _fault_record): "fin" (a FIN with no close_notify, maybe mid-record), "junk_fin"
    (any bytes then FIN), "garbage" (a well-framed foreign record), "flip" (a bit of a record's body).
    Faults keep the record framing, except where a FIN follows: a corrupted length would only make
    the client wait for bytes (until HTTP/2's PING deadline, 20 s), which is right but slow."""

    def __init__(self, upstream: tuple[str, int], chunks: list[int], stalls: list[int], fault, at: int,
                 upward: bool = False):
        self.upstream, self.chunks, self.stalls, self.fault, self.at = upstream, chunks, stalls, fault, at
        self.upward = upward  # the chaos is on the client's bytes instead of the server's
        self.conns = 0
        self.tasks: set[asyncio.Task] = set()
        self.faulted = False

    async def start(self, ip: str) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._on_conn, ip, 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _on_conn(self, creader, cwriter) -> None:
        self.conns += 1
        first = self.conns == 1
        ureader, uwriter = await asyncio.open_connection(*self.upstream)
        if self.upward:
            up = asyncio.ensure_future(self._chaos(creader, uwriter, first))
            down = asyncio.ensure_future(self._plain(ureader, cwriter))
        else:
            up = asyncio.ensure_future(self._plain(creader, uwriter))
            down = asyncio.ensure_future(self._chaos(ureader, cwriter, first))
        self.tasks |= {up, down}
        try:
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            for w in (cwriter, uwriter):
                w.transport.abort()

    @staticmethod
    async def _plain(reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.transport.abort()

    def _fault_record(self, rec: bytes, k: int) -> tuple[bytes, bool]:
        """Apply the fault to one whole TLS record at byte k of it: (what to send, then FIN?)."""
        kind = self.fault[0]
        if kind == "fin":
            return rec[:k], True              # FIN with no close_notify, maybe mid-record
        if kind == "junk_fin":
            return rec[:k] + self.fault[1], True  # any bytes, then FIN
        if kind == "garbage":
            # a well-framed record that is not ours (fails AEAD): framing intact, so the client's
            # TLS must see it and fail, not wait for bytes that never come
            junk = self.fault[1]
            return bytes([0x17, 3, 3, len(junk) >> 8, len(junk) & 255]) + junk + rec, False
        body = len(rec) - 5                    # flip: one bit of the record's body
        if body <= 0:
            return rec, False
        i = 5 + k % body
        return rec[:i] + bytes([rec[i] ^ 0x20]) + rec[i + 1:], False

    async def _chaos(self, reader, writer, first: bool) -> None:
        done = 0        # TLS bytes of the server taken (whole records)
        sent = 0        # ... and sent on
        i = 0
        buf = bytearray()
        fault_pending = first and self.fault is not None
        try:
            while data := await reader.read(65536):
                buf += data
                out = bytearray()
                fin = False
                while len(buf) >= 5 and len(buf) >= 5 + (size := int.from_bytes(buf[3:5], "big")):
                    rec = bytes(buf[:5 + size])
                    del buf[:5 + size]
                    if fault_pending and self.at < done + len(rec):
                        fault_pending = False
                        self.faulted = True
                        rec, fin = self._fault_record(rec, max(0, self.at - done))
                    done += len(rec)
                    out += rec
                    if fin:
                        break
                while out:
                    n = self.chunks[i % len(self.chunks)] if self.chunks else len(out)
                    if sent > SMALL_CHUNKS_FOR_BYTES:
                        n = max(n, 4 * KiB)  # tiny pieces for the handshake and first records only
                    writer.write(bytes(out[:n]))
                    del out[:n]
                    sent += n
                    await writer.drain()
                    if self.stalls and i % 8 == 0:
                        await asyncio.sleep(self.stalls[i // 8 % len(self.stalls)] / 1000)
                    i += 1
                if fin:
                    writer.write_eof()
                    return
            writer.write(bytes(buf))
            writer.write_eof()
        except (OSError, RuntimeError):
            writer.transport.abort()

    async def close(self) -> None:
        self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _live(mesh: Mesh, ip: str, size: int, chunks, stalls, fault, at, upward=False) -> None:
    srv_id, cli_id = mesh.identity("ns1", "server"), mesh.identity("ns2", "client")
    server_ctx, client_ctx = mesh.server_context(srv_id), mesh.client_context(cli_id)

    async def handler(tunnel) -> None:
        stream = await tunnel.accept()
        try:
            want = int((await stream.read()).decode())
            for off in range(0, want, 32 * KiB):
                stream.write(pattern(off, min(32 * KiB, want - off)))
                await stream.drain()
            stream.write_eof()
            await stream.wait_closed()
        except (StreamReset, ValueError):
            stream.abort()

    server = await HboneServer(lambda: server_ctx, handler, trust_domain=mesh.trust_domain).start(ip, 0)
    box = Middlebox(server.address, chunks, stalls, fault, at, upward)
    box_addr = await box.start(ip)
    pool = HbonePool(lambda: client_ctx, trust_domain=mesh.trust_domain)

    def open_tunnel():
        return pool.open_tunnel(src_identity=cli_id, dst_identities=frozenset({srv_id}), dst=box_addr,
                                authority="10.0.0.1:80")

    try:
        async with asyncio.timeout(EXAMPLE_DEADLINE_S):
            got = bytearray()
            end = None
            try:
                s = await open_tunnel()
                s.write(str(size).encode())
                while True:
                    data = await s.read()
                    if not data:
                        end = "clean"
                        break
                    got += data
            except (StreamReset, HboneError) as err:
                end = err
            assert bytes(got) == pattern(0, len(got)), "corrupted bytes reached the tunnel"
            if end == "clean":
                assert len(got) == size, f"a clean end after {len(got)} of {size} bytes"
            else:
                assert box.faulted, f"an error without a fault: {end!r}"
            # the pool drops the broken connection and serves a fresh tunnel (no fault the 2nd time).
            # A fault after the first answer's END_STREAM may reach the client just after this tunnel
            # opened on the same connection: that tunnel is reset (right), and the next one works.
            for attempt in (1, 2):
                try:
                    s2 = await open_tunnel()
                    s2.write(b"5")
                    assert await s2.read() == pattern(0, 5)
                    s2.abort()
                    break
                except (StreamReset, HboneError):
                    if attempt == 2 or not box.faulted:
                        raise
    except TimeoutError:
        raise AssertionError(f"hang: {box.faulted=} {len(got)=} of {size}") from None
    finally:
        await pool.close()
        await server.close(0.2)
        await box.close()


@hsettings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(loop=st.sampled_from(LOOPS),
       size=st.one_of(st.integers(0, 100), st.integers(KiB, 300 * KiB), st.integers(KiB, 300 * KiB)),
       chunks=st.lists(st.integers(1, 20 * KiB), max_size=5),
       stalls=st.lists(st.integers(0, 5), max_size=3),
       fault=st.one_of(st.none(), st.tuples(st.just("fin")), st.tuples(st.just("flip")),
                       st.tuples(st.sampled_from(["garbage", "junk_fin"]), st.binary(min_size=1, max_size=30))),
       at=st.floats(0, 1.05),
       upward=st.booleans())
def test_live_tunnel_through_a_faulty_middlebox_conserves_or_resets(mesh, loopback_ip, loop, size, chunks,
                                                                     stalls, fault, at, upward):
    # `at` as a share of the faulted side's TLS bytes (the server: ~5 KiB of handshake and HTTP/2
    # set-up, then the answer; the client: ~3 KiB with its certificate and the request), so that
    # faults land in the handshake, the answer and after it alike
    total = 3000 if upward else size * 1.01 + 5000
    run(loop, lambda: _live(mesh, loopback_ip(), size, chunks, stalls, fault, int(at * total), upward))


async def _close_notify_mid_answer(mesh: Mesh, ip: str, size: int, cut_after: int, flush_first: bool) -> None:
    srv_id, cli_id = mesh.identity("ns1", "server"), mesh.identity("ns2", "client")
    server_ctx, client_ctx = mesh.server_context(srv_id), mesh.client_context(cli_id)
    cut: list[bool] = [False]

    async def handler(tunnel) -> None:
        stream = await tunnel.accept()
        off = 0
        while off < size:
            if off >= cut_after:
                conn = stream._conn
                if flush_first:
                    conn.flush_now()
                cut[0] = True
                conn.close_transport()   # close_notify: a clean TLS end, mid-answer
                return
            n = min(8 * KiB, size - off)
            stream.write(pattern(off, n))
            off += n
            await stream.drain()
        stream.write_eof()
        await stream.wait_closed()

    server = await HboneServer(lambda: server_ctx, handler, trust_domain=mesh.trust_domain).start(ip, 0)
    pool = HbonePool(lambda: client_ctx, trust_domain=mesh.trust_domain)
    try:
        async with asyncio.timeout(EXAMPLE_DEADLINE_S):
            s = await pool.open_tunnel(src_identity=cli_id, dst_identities=frozenset({srv_id}),
                                       dst=server.address, authority="10.0.0.1:80")
            got = bytearray()
            try:
                while data := await s.read():
                    got += data
                end = "clean"
            except StreamReset:
                end = "reset"
            assert bytes(got) == pattern(0, len(got))
            if cut[0]:
                # TLS closed cleanly, but the tunnel had no END_STREAM: a reset, never a clean end
                assert end == "reset", f"a clean end after {len(got)} of {size} bytes"
            else:
                assert end == "clean" and len(got) == size
    finally:
        await pool.close()
        await server.close(0.2)


@hsettings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(loop=st.sampled_from(LOOPS), size=st.integers(1, 200 * KiB), cut=st.floats(0, 1.1),
       flush_first=st.booleans())
def test_close_notify_mid_answer_is_a_reset_for_the_open_tunnel(mesh, loopback_ip, loop, size, cut, flush_first):
    """The server's TLS ends cleanly (close_notify, then TCP close) while a tunnel's answer is half
    sent: the TLS end is clean, the tunnel's is not (no END_STREAM), so its reader gets StreamReset."""
    run(loop, lambda: _close_notify_mid_answer(mesh, loopback_ip(), size, int(cut * size), flush_first))
