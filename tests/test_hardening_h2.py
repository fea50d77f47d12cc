"""Abuse against a LIVE HBONE server (tests/hardening_server.py, its own process) over real mTLS
with certificates from our CA. The abuser is hand-built HTTP/2 frames (hyperframe + hpack) on a
blocking TLS socket, so nothing in the client softens the attack. For each abuse: the answer
(GOAWAY code, RST_STREAM, 431, close), the refusal line the server wrote, a good tunnel right
after on a new connection (and on a connection that was already open), and the server's RSS
growth under RSS_BOUND_KIB."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import hpack
import pytest
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)

from certs.testing import SERVER_AUTH_ONLY, expired, issue_custom, not_yet_valid
from hbone.limits import CLIENT_PREFACE
from hbone.testing import Mesh

HERE = Path(__file__).parent
KiB, MiB = 1024, 1024 * 1024
# Stated bound: the server's RSS may grow at most this much over one abuse (measured after a
# warm-up tunnel). Without the limits, the CONTINUATION flood below alone would make h2 buffer
# the 40 MiB it is sent.
RSS_BOUND_KIB = 20 * 1024
ENHANCE_YOUR_CALM, FRAME_SIZE_ERROR, REFUSED_STREAM, NO_ERROR, CANCEL = 11, 6, 7, 0, 8


class Server:
    """The subprocess, its port, and the refusal lines it printed."""

    def __init__(self, cert_dir: Path, settings: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "hardening_server.py"), str(cert_dir), json.dumps(settings or {}),
             os.environ.get("HBONE_HARDENING_LOOP", "uvloop")],  # asyncio: run the file again with it
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = json.loads(self.proc.stdout.readline())
        self.port, self.pid = first["port"], first["pid"]
        self.addr = ("127.0.0.1", self.port)
        self.refusals: list[dict] = []
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            obj = json.loads(line)
            self.lines.append(obj)
            if "refusal" in obj:
                self.refusals.append(obj["refusal"])

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def wait_refusal(self, kind: str, reason: str, count: int = 1, timeout: float = 5.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            hits = [r for r in self.refusals if r["kind"] == kind and r["reason"] == reason]
            if len(hits) >= count:
                return hits[-1]
            time.sleep(0.02)
        raise AssertionError(f"no {count}x {kind}:{reason} refusal; saw {self.refusals}")

    def stop(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(10)
        self._reader.join(5)
        return next((obj["repr"] for obj in self.lines if "repr" in obj), "")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    mesh = Mesh.create(directory=str(d))
    bundle = mesh.bundle(mesh.identity("ns1", "server"))
    for name, data in (("chain.pem", bundle.chain_pem), ("key.pem", bundle.key_pem),
                       ("trust.pem", bundle.trust_pem)):
        (d / name).write_bytes(data)
    return mesh, d


@pytest.fixture(scope="module")
def server(pki):
    srv = Server(pki[1])
    yield srv
    srv.stop()


def client_ctx(mesh: Mesh) -> ssl.SSLContext:
    return mesh.client_context(mesh.identity("ns2", "client"))


class Raw:
    """A hand-driven HTTP/2 client: frames in, frames out, nothing validated on our side."""

    def __init__(self, addr, ctx: ssl.SSLContext, *, big_windows: bool = False):
        raw = socket.create_connection(addr, timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname=None)
        self.enc, self.dec = hpack.Encoder(), hpack.Decoder()
        self.buf = bytearray()
        self.closed = False
        self.auto_window = True
        settings = SettingsFrame(0)
        if big_windows:
            settings.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1}
        out = CLIENT_PREFACE + settings.serialize()
        if big_windows:
            out += WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535).serialize()
        self.send(out)
        self.next_sid = 1

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
            return False

    def headers_frame(self, sid: int, headers, *, end_headers=True, end_stream=False) -> bytes:
        f = HeadersFrame(sid, data=self.enc.encode(headers))
        if end_headers:
            f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f.serialize()

    def connect_frame(self, sid: int, authority: str = "10.0.0.1:80") -> bytes:
        return self.headers_frame(sid, [(":method", "CONNECT"), (":authority", authority)])

    def new_sid(self) -> int:
        sid, self.next_sid = self.next_sid, self.next_sid + 2
        return sid

    def frames(self, timeout: float = 5.0):
        """Yield server frames until EOF/reset or timeout (then stop). HEADERS get `.headers`."""
        end = time.monotonic() + timeout
        while True:
            while len(self.buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(bytes(self.buf[:9])))
                if len(self.buf) < 9 + length:
                    break
                f.parse_body(memoryview(bytes(self.buf[9:9 + length])))
                del self.buf[:9 + length]
                if isinstance(f, (HeadersFrame, ContinuationFrame)):
                    f.headers = dict(self.dec.decode(f.data, raw=True))
                if isinstance(f, DataFrame) and f.flow_controlled_length and self.auto_window:
                    # an honest reader hands window back as it consumes (stream and connection)
                    n = f.flow_controlled_length
                    self.send(WindowUpdateFrame(f.stream_id, window_increment=n).serialize()
                              + WindowUpdateFrame(0, window_increment=n).serialize())
                if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                    ack = SettingsFrame(0)
                    ack.flags.add("ACK")
                    self.send(ack.serialize())
                yield f
            left = end - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(256 * KiB)
            except (TimeoutError, socket.timeout):
                return
            except (ConnectionResetError, ssl.SSLError, OSError):
                data = b""
            if not data:
                self.closed = True
                return
            self.buf += data

    def until(self, pred, timeout: float = 5.0):
        for f in self.frames(timeout):
            if pred(f):
                return f
        return None

    def goaway(self, timeout: float = 5.0) -> GoAwayFrame | None:
        return self.until(lambda f: isinstance(f, GoAwayFrame), timeout)

    def wait_eof(self, timeout: float = 5.0) -> bool:
        for _ in self.frames(timeout):
            pass
        return self.closed

    def tunnel(self, payload: bytes = b"hello hbone") -> None:
        """A good tunnel on this connection: CONNECT → 200 → bytes echoed."""
        sid = self.new_sid()
        assert self.send(self.connect_frame(sid))
        resp = self.until(lambda f: isinstance(f, HeadersFrame) and f.stream_id == sid)
        assert resp is not None and resp.headers[b":status"] == b"200", resp
        self.send(DataFrame(sid, data=payload).serialize())
        got = b""
        for f in self.frames():
            if isinstance(f, DataFrame) and f.stream_id == sid:
                got += f.data
                if len(got) >= len(payload):
                    break
        assert got == payload
        # half-close; the echo half-closes back: the tunnel is over on both sides
        end = DataFrame(sid, data=b"")
        end.flags.add("END_STREAM")
        self.send(end.serialize())
        assert self.until(lambda f: f.stream_id == sid and "END_STREAM" in f.flags
                          and isinstance(f, (DataFrame, HeadersFrame))) is not None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def good_tunnel(addr, mesh) -> None:
    c = Raw(addr, client_ctx(mesh))
    try:
        c.tunnel()
    finally:
        c.close()


class Abuse:
    """Bracket one abuse: an already-open good connection, RSS before/after, a new good tunnel."""

    def __init__(self, server: Server, mesh: Mesh):
        self.server, self.mesh = server, mesh

    def __enter__(self):
        self.bystander = Raw(self.server.addr, client_ctx(self.mesh))
        self.bystander.tunnel(b"warm-up")
        self.rss0 = self.server.rss_kib()
        self.attacker = Raw(self.server.addr, client_ctx(self.mesh))
        return self.attacker

    def __exit__(self, exc_type, *exc):
        self.attacker.close()
        if exc_type is not None:
            self.bystander.close()
            return False
        grown = self.server.rss_kib() - self.rss0
        assert grown < RSS_BOUND_KIB, f"server RSS grew {grown} KiB"
        self.bystander.tunnel(b"still served during and after the abuse")
        self.bystander.close()
        good_tunnel(self.server.addr, self.mesh)
        return False


def expect_goaway(c: Raw, code: int) -> GoAwayFrame:
    g = c.goaway()
    assert g is not None, "no GOAWAY"
    assert g.error_code == code, g
    assert c.wait_eof(3.0), "connection not closed after GOAWAY"
    return g


# ---- streams ----------------------------------------------------------------------------------

def test_stream_over_max_concurrent_refused_connection_keeps_serving(server, pki):
    mesh = pki[0]
    with Abuse(server, mesh) as c:
        sids = [c.new_sid() for _ in range(201)]
        c.send(b"".join(c.connect_frame(s) for s in sids))
        answered, refused = set(), None
        for f in c.frames(10):
            if isinstance(f, HeadersFrame):
                assert f.headers[b":status"] == b"200"
                answered.add(f.stream_id)
            elif isinstance(f, RstStreamFrame):
                refused = f
            if len(answered) == 200 and refused is not None:
                break
        assert refused is not None and refused.stream_id == sids[-1] and refused.error_code == REFUSED_STREAM
        assert answered == set(sids[:200])
        # end one tunnel cleanly (our END_STREAM, the echo's END_STREAM back), then the
        # connection takes a new one
        end = DataFrame(sids[0], data=b"")
        end.flags.add("END_STREAM")
        c.send(end.serialize())
        c.until(lambda f: isinstance(f, DataFrame) and f.stream_id == sids[0] and "END_STREAM" in f.flags)
        c.tunnel(b"after the refusal")
        assert not c.closed
    server.wait_refusal("stream", "max_concurrent_streams")


def test_rapid_reset_gets_goaway_enhance_your_calm(server, pki):
    with Abuse(server, pki[0]) as c:
        burst = b""
        for _ in range(300):
            sid = c.new_sid()
            burst += c.connect_frame(sid) + RstStreamFrame(sid, error_code=CANCEL).serialize()
        c.send(burst)
        expect_goaway(c, ENHANCE_YOUR_CALM)
    assert server.wait_refusal("connection", "rapid_reset")["code"] == ENHANCE_YOUR_CALM


# ---- header blocks ----------------------------------------------------------------------------

def test_continuation_flood_many_small_frames(server, pki):
    with Abuse(server, pki[0]) as c:
        sid = c.new_sid()
        out = c.headers_frame(sid, [(":method", "CONNECT")], end_headers=False)
        out += b"".join(ContinuationFrame(sid, data=b"\x00" * 100).serialize() for _ in range(50))
        c.send(out)
        expect_goaway(c, ENHANCE_YOUR_CALM)
    server.wait_refusal("connection", "continuation_flood")


def test_continuation_flood_huge_frames_not_buffered(server, pki):
    with Abuse(server, pki[0]) as c:
        sid = c.new_sid()
        c.send(c.headers_frame(sid, [(":method", "CONNECT")], end_headers=False))
        chunk = ContinuationFrame(sid, data=b"\x00" * (1 * MiB - 1)).serialize()
        for _ in range(40):  # 40 MiB offered; h2 alone would hold it all
            if not c.send(chunk):
                break
        expect_goaway(c, ENHANCE_YOUR_CALM)
    server.wait_refusal("connection", "header_block_too_large")


def test_oversized_frame_refused_on_its_header(server, pki):
    with Abuse(server, pki[0]) as c:
        # A DATA frame header announcing 16 MiB - 1; no body follows. h2 would wait for the body.
        header = (2**24 - 1).to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
        c.send(header)
        expect_goaway(c, FRAME_SIZE_ERROR)
    server.wait_refusal("connection", "frame_too_large")


def test_header_list_over_advertised_gets_431_connection_keeps_serving(server, pki):
    with Abuse(server, pki[0]) as c:
        sid = c.new_sid()
        big = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")] + \
              [(f"x-pad-{i}", os.urandom(1000).hex()) for i in range(40)]  # ~82 KiB > 64 KiB
        c.send(c.headers_frame(sid, big))
        resp = c.until(lambda f: isinstance(f, HeadersFrame) and f.stream_id == sid)
        assert resp is not None and resp.headers[b":status"] == b"431" and "END_STREAM" in resp.flags
        c.tunnel(b"same connection, next tunnel")
    server.wait_refusal("stream", "431")


def test_hpack_bomb_over_hard_limit_gets_goaway(server, pki):
    with Abuse(server, pki[0]) as c:
        sid = c.new_sid()
        # One 4 KB header enters the HPACK table, then 1-byte references to it: a ~170 KiB
        # header list from a ~4 KiB block.
        block = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")] + [("x-bomb", "b" * 4000)] * 42
        c.send(c.headers_frame(sid, block))
        expect_goaway(c, ENHANCE_YOUR_CALM)
    server.wait_refusal("connection", "header_list_too_large")


# ---- control-frame floods -----------------------------------------------------------------------

FLOODS = {
    "settings_flood": lambda: SettingsFrame(0).serialize() * 150,
    "ping_flood": lambda: b"".join(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(150)),
    "priority_flood": lambda: b"".join(PriorityFrame(2 * i + 1, depends_on=0, stream_weight=16).serialize()
                                       for i in range(150)),
    "window_update_flood": lambda: WindowUpdateFrame(0, window_increment=1).serialize() * 200,
    "unknown_frame_flood": lambda: (bytes([0, 0, 1, 0xFA, 0, 0, 0, 0, 0]) + b"x") * 150,
}


@pytest.mark.parametrize("reason", sorted(FLOODS))
def test_control_frame_floods_get_goaway(server, pki, reason):
    with Abuse(server, pki[0]) as c:
        c.send(FLOODS[reason]())
        expect_goaway(c, ENHANCE_YOUR_CALM)
    server.wait_refusal("connection", reason)


def test_empty_data_frames_get_goaway(server, pki):
    with Abuse(server, pki[0]) as c:
        sid = c.new_sid()
        c.send(c.connect_frame(sid))
        c.until(lambda f: isinstance(f, HeadersFrame) and f.stream_id == sid)
        c.send(DataFrame(sid, data=b"").serialize() * 10)
        expect_goaway(c, ENHANCE_YOUR_CALM)
    server.wait_refusal("connection", "empty_frame_flood")


def test_honest_client_end_stream_and_keepalive_are_not_abuse(server, pki):
    """What an honest peer does must never trip a limit: empty DATA with END_STREAM, a PING,
    SETTINGS + ACK, WINDOW_UPDATEs as data flows."""
    c = Raw(server.addr, client_ctx(pki[0]))
    try:
        for i in range(5):
            c.tunnel(os.urandom(100_000))
            c.send(PingFrame(0, opaque_data=b"12345678").serialize())
        assert c.until(lambda f: isinstance(f, PingFrame) and "ACK" in f.flags) is not None
        assert not c.closed
    finally:
        c.close()


# ---- TLS refusals -------------------------------------------------------------------------------

def _ctx(mesh: Mesh, issued=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.ca.root_cert_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if issued is not None:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            cert, key = Path(d, "c.pem"), Path(d, "k.pem")
            cert.write_bytes(issued.chain_pem)
            key.write_bytes(issued.key_pem)
            ctx.load_cert_chain(str(cert), str(key))
    return ctx


def bad_client_certs(mesh: Mesh) -> dict[str, ssl.SSLContext]:
    now = datetime.now(timezone.utc)
    cli = mesh.identity("ns2", "client")
    other = Mesh.create()  # another CA with the same trust-domain name
    past = now - timedelta(minutes=1)
    return {
        "no_client_cert": _ctx(mesh),
        "unknown_ca": _ctx(mesh, other.ca.issue(other.identity("ns2", "client"), now=past)),
        "expired": _ctx(mesh, expired(mesh.ca, cli, now=now)),
        "not_yet_valid": _ctx(mesh, not_yet_valid(mesh.ca, cli, now=now)),
        "wrong_trust_domain": _ctx(mesh, issue_custom(mesh.ca, spiffe=cli, now=past,
                                                      uris=["spiffe://evil.local/ns/ns2/sa/client"])),
        "no_spiffe_san": _ctx(mesh, issue_custom(mesh.ca, spiffe=cli, now=past, uris=[],
                                                 dns_names=["client.ns2.svc"])),
        "multiple_spiffe_san": _ctx(mesh, issue_custom(mesh.ca, spiffe=cli, now=past,
                                                       uris=[str(cli), "spiffe://cluster.local/ns/ns2/sa/other"])),
        "bad_key_usage": _ctx(mesh, issue_custom(mesh.ca, spiffe=cli, now=past, eku=SERVER_AUTH_ONLY)),
    }


def test_each_bad_client_certificate_refused_counted_logged(server, pki):
    mesh = pki[0]
    rss0 = server.rss_kib()
    for reason, ctx in bad_client_certs(mesh).items():
        before = len([r for r in server.refusals if r["kind"] == "tls"])
        served = False
        try:
            c = Raw(server.addr, ctx)
            c.send(c.connect_frame(c.new_sid()))
            served = c.until(lambda f: isinstance(f, HeadersFrame), 2.0) is not None
            c.close()
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        assert not served, f"{reason}: a tunnel was answered"
        r = server.wait_refusal("tls", reason)
        assert reason in r["line"]
        time.sleep(0.05)
        tls = [r for r in server.refusals if r["kind"] == "tls"]
        assert len(tls) == before + 1, f"{reason}: counted {len(tls) - before} times: {tls[before:]}"
        good_tunnel(server.addr, mesh)  # listener still serving
    assert server.rss_kib() - rss0 < RSS_BOUND_KIB


# ---- listener limits (a second server with tight timeouts) --------------------------------------

TIGHT = {"idle_timeout": 0.5, "tls_handshake_timeout": 0.5, "max_connections": 3}


@pytest.fixture(scope="module")
def tight(pki):
    srv = Server(pki[1], TIGHT)
    yield srv
    text = srv.stop()
    assert "refused[" in text


def test_idle_connection_gets_goaway_no_error(tight, pki):
    c = Raw(tight.addr, client_ctx(pki[0]))
    try:
        c.tunnel()  # a tunnel (ended both ways), then nothing: idle from when it ends
        start = time.monotonic()
        g = c.goaway(5.0)
        assert g is not None and g.error_code == NO_ERROR
        assert c.wait_eof(3.0)
        assert time.monotonic() - start < 3.0
    finally:
        c.close()
    tight.wait_refusal("idle", "idle_timeout")


def _client_hello_prefix(n: int) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()[:n]


@pytest.mark.parametrize("sent", [b"", "partial"])
def test_slowloris_handshake_times_out(tight, pki, sent):
    before = len([r for r in tight.refusals if r["reason"] == "timeout"])
    data = _client_hello_prefix(40) if sent == "partial" else b""
    s = socket.create_connection(tight.addr, timeout=5)
    try:
        s.sendall(data)
        start = time.monotonic()
        s.settimeout(5)
        try:
            assert s.recv(1024) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - start < 3.0
    finally:
        s.close()
    tight.wait_refusal("tls", "timeout", before + 1)
    good_tunnel(tight.addr, pki[0])


def test_max_connections_accept_then_close(tight, pki):
    mesh = pki[0]
    held = [Raw(tight.addr, client_ctx(mesh)) for _ in range(TIGHT["max_connections"])]
    try:
        for c in held:
            assert c.until(lambda f: isinstance(f, SettingsFrame), 2.0) is not None
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            extra = Raw(tight.addr, client_ctx(mesh))
            extra.tunnel()
        tight.wait_refusal("listener", "max_connections")
        held[0].tunnel(b"held connections keep working")
    finally:
        for c in held:
            c.close()
    time.sleep(0.2)
    good_tunnel(tight.addr, mesh)


# ---- a peer that never reads ----------------------------------------------------------------------

def test_peer_that_never_reads_cannot_grow_our_control_queue(pki):
    """The peer opens tunnels, makes the echo send back 8 MiB it never reads (our transport
    pauses), then sends PINGs: each owes it a PING ACK that could only pile up in our memory.
    Over max_outbound_control_frames the connection is aborted. (PING rate limit raised here so
    that the outbound bound, not the inbound one, is what trips.)"""
    mesh = pki[0]
    srv = Server(pki[1], {"max_ping_frames": 100_000, "max_outbound_control_frames": 200})
    try:
        rss0 = srv.rss_kib()
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # read nothing, buffer little
        raw.settimeout(5)
        raw.connect(srv.addr)
        c = Raw.__new__(Raw)
        c.sock = client_ctx(mesh).wrap_socket(raw, server_hostname=None)
        c.enc, c.dec, c.buf, c.closed, c.auto_window, c.next_sid = hpack.Encoder(), hpack.Decoder(), bytearray(), False, False, 1
        s = SettingsFrame(0)
        s.settings = {SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1}
        c.send(CLIENT_PREFACE + s.serialize() + WindowUpdateFrame(0, window_increment=2**31 - 1 - 65535).serialize())
        block = os.urandom(1 * MiB - 16)
        for _ in range(2):
            sid = c.new_sid()
            c.send(c.connect_frame(sid))
            for _ in range(4):  # 4 MiB: the server's stream window
                if not c.send(DataFrame(sid, data=block).serialize()):
                    break
        time.sleep(0.5)  # let the echo fill every buffer on the way back
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        for _ in range(50):
            if not c.send(ping * 10):
                break
            time.sleep(0.005)
        r = srv.wait_refusal("connection", "outbound_control_flood")
        assert r["code"] == ENHANCE_YOUR_CALM
        c.close()
        assert srv.rss_kib() - rss0 < RSS_BOUND_KIB
        good_tunnel(srv.addr, mesh)
    finally:
        srv.stop()
