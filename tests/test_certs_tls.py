"""Real mutual-TLS handshakes on loopback with certificates from our CA: the good path, and each
way a peer's certificate is refused, with the right reason code — and the server keeps serving."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import uvloop
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import testing
from certs.bundle import CertBundle
from certs.ca import IssuedCert, MeshCA
from certs.errors import PeerIdentityError
from certs.spiffe import SpiffeId
from certs.tls import check_server_identity, classify_handshake_error, client_context, peer_identity, server_context

TD = "cluster.local"
NOW = datetime.now(timezone.utc)  # OpenSSL checks validity against the real clock, so certs are issued around it
SERVER_ID = SpiffeId(TD, "default", "reviews")
CLIENT_ID = SpiffeId(TD, "default", "productpage")
HANDSHAKE_TIMEOUT_S = 5.0  # loopback handshakes take milliseconds; this only bounds a broken test



@pytest.fixture(params=["asyncio", "uvloop"])
def run_loop(request):
    """Run a test's ``main`` coroutine on a fresh loop of each kind: hbone/ runs on uvloop, whose TLS
    transport is its own code, and must behave the same on the stdlib loop."""

    def run(main):
        return uvloop.run(main()) if request.param == "uvloop" else asyncio.run(main())

    return run


@pytest.fixture(scope="module")
def cas(tmp_path_factory):
    base = tmp_path_factory.mktemp("cas")
    ca = MeshCA.init(base / "mesh", now=NOW - timedelta(days=1))
    other = MeshCA.init(base / "other", now=NOW - timedelta(days=1))
    return ca, other


def bundle(issued: IssuedCert, trust: bytes) -> CertBundle:
    return CertBundle.from_issued(issued, trust)


def raw_context(issued: IssuedCert | None, trust: bytes, tmp: Path, *, server: bool = False) -> ssl.SSLContext:
    """A context made without CertBundle's checks: how a misconfigured or hostile peer would look."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if not server:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=trust.decode())
    ctx.set_alpn_protocols(["h2"])
    if issued is not None:
        cert, key = issued.write(tmp / "raw")
        ctx.load_cert_chain(cert, key)
    return ctx


class Server:
    """A TLS server on loopback that records, per connection, the peer identity or the refusal reason.

    It accepts like hbone/'s server (``sock_accept`` + ``connect_accepted_socket(ssl=...)``), so a
    failed handshake surfaces here as an exception on both loops (``StreamWriter.start_tls`` hangs
    server-side on uvloop 0.23). ``context`` is called per connection, as a CertSource would be."""

    def __init__(self, ctx, host: str, *, echo: bool = False):
        self.context = ctx if callable(ctx) else (lambda: ctx)
        self.host, self.echo = host, echo
        self.results: asyncio.Queue = asyncio.Queue()
        self.handlers: set[asyncio.Task] = set()

    async def __aenter__(self):
        self.sock = socket.create_server((self.host, 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.accepting = asyncio.create_task(self._accept())
        return self

    async def __aexit__(self, *exc):
        self.accepting.cancel()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(self.accepting, *self.handlers, return_exceptions=True)
        self.sock.close()

    async def _accept(self):
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = asyncio.create_task(self._handle(conn))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def _handle(self, conn: socket.socket):
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            # uvloop returns its own SSLProtocol as the second value, so keep ours from here
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.context(), ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S
            )
        except Exception as exc:  # noqa: BLE001 - the test asserts on the classification
            conn.close()
            self.results.put_nowait(("refused", classify_handshake_error(exc), exc))
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            try:
                ident = peer_identity(ssl_object, TD)
            except PeerIdentityError as exc:
                self.results.put_nowait(("refused", classify_handshake_error(exc), exc))
                return
            writer.write(f"hello {ident}\n".encode())
            await writer.drain()
            self.results.put_nowait(("ok", ident, ssl_object.selected_alpn_protocol(), ssl_object.version()))
            while self.echo and (line := await reader.readline()):
                writer.write(line.upper())
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def result(self):
        return await asyncio.wait_for(self.results.get(), HANDSHAKE_TIMEOUT_S)


async def connect(ctx: ssl.SSLContext, server: Server):
    """Open a TLS connection the way hbone/ does: no SNI (server_hostname="")."""
    return await asyncio.wait_for(
        asyncio.open_connection(server.host, server.port, ssl=ctx, server_hostname=""), HANDSHAKE_TIMEOUT_S
    )


async def good_exchange(server: Server, client_ctx: ssl.SSLContext) -> None:
    reader, writer = await connect(client_ctx, server)
    line = await asyncio.wait_for(reader.readline(), HANDSHAKE_TIMEOUT_S)
    assert line == f"hello {CLIENT_ID}\n".encode()
    ssl_object = writer.get_extra_info("ssl_object")
    assert check_server_identity(ssl_object, {SERVER_ID}, TD) == SERVER_ID
    writer.close()
    status, ident, alpn, version = await server.result()
    assert (status, ident, alpn, version) == ("ok", CLIENT_ID, "h2", "TLSv1.3")


@pytest.fixture
def server_ctx(cas):
    ca, _ = cas
    return server_context(bundle(ca.issue(SERVER_ID, now=NOW), ca.root_cert_pem))


@pytest.fixture
def good_client_ctx(cas):
    ca, _ = cas
    return client_context(bundle(ca.issue(CLIENT_ID, now=NOW), ca.root_cert_pem))


def test_good_client_and_server(server_ctx, good_client_ctx, loopback_ip, run_loop):
    async def main():
        async with Server(server_ctx, loopback_ip()) as server:
            await good_exchange(server, good_client_ctx)
            await good_exchange(server, good_client_ctx)  # and again: nothing is one-shot

    run_loop(main)


def _bad_clients(ca: MeshCA, other: MeshCA, tmp: Path) -> dict[str, tuple[ssl.SSLContext, str]]:
    """name → (client context, reason the server must give)."""
    trust = ca.root_cert_pem
    return {
        # signed by another mesh's root; the client itself trusts our root, so it gets as far as sending it
        "other_ca": (raw_context(other.issue(CLIENT_ID, now=NOW), trust, tmp), "unknown_ca"),
        "expired": (raw_context(testing.expired(ca, CLIENT_ID, now=NOW), trust, tmp), "expired"),
        "not_yet_valid": (raw_context(testing.not_yet_valid(ca, CLIENT_ID, now=NOW), trust, tmp), "not_yet_valid"),
        "wrong_trust_domain": (
            raw_context(testing.issue_custom(ca, spiffe=SpiffeId("other.local", "default", "productpage"), now=NOW), trust, tmp),
            "wrong_trust_domain",
        ),
        # a DNS SAN only: OpenSSL accepts it, our SPIFFE check refuses it
        "no_spiffe_san": (
            raw_context(testing.issue_custom(ca, spiffe=CLIENT_ID, now=NOW, uris=[], dns_names=["productpage.default.svc"]), trust, tmp),
            "no_spiffe_san",
        ),
        # no SAN at all (and Istio's empty subject): OpenSSL's strict checks refuse it first
        "no_san_at_all": (raw_context(testing.issue_custom(ca, spiffe=CLIENT_ID, now=NOW, uris=[]), trust, tmp), "no_spiffe_san"),
        "non_spiffe_uri_only": (
            raw_context(testing.issue_custom(ca, spiffe=CLIENT_ID, now=NOW, uris=["https://example.com/x"]), trust, tmp),
            "no_spiffe_san",
        ),
        "malformed_spiffe_uri": (
            raw_context(testing.issue_custom(ca, spiffe=CLIENT_ID, now=NOW, uris=["spiffe://cluster.local/ns/default/sa/x/"]), trust, tmp),
            "no_spiffe_san",
        ),
        "two_spiffe_sans": (
            raw_context(
                testing.issue_custom(ca, spiffe=CLIENT_ID, now=NOW, uris=[str(CLIENT_ID), str(SpiffeId(TD, "kube-system", "admin"))]),
                trust, tmp,
            ),
            "multiple_spiffe_san",
        ),
        # OpenSSL's purpose check (X509_PURPOSE_SSL_CLIENT) refuses it during the handshake
        "server_auth_only_eku": (
            raw_context(testing.issue_custom(ca, spiffe=CLIENT_ID, now=NOW, eku=testing.SERVER_AUTH_ONLY), trust, tmp),
            "bad_key_usage",
        ),
        "no_client_cert": (raw_context(None, trust, tmp), "no_client_cert"),
    }


BAD_CASES = ["other_ca", "expired", "not_yet_valid", "wrong_trust_domain", "no_spiffe_san", "no_san_at_all", "non_spiffe_uri_only",
             "malformed_spiffe_uri", "two_spiffe_sans", "server_auth_only_eku", "no_client_cert"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_server_refuses_bad_client_then_serves_good_one(case, cas, server_ctx, good_client_ctx, loopback_ip, tmp_path, run_loop):
    async def main():
        ca, other = cas
        client_ctx, want_reason = _bad_clients(ca, other, tmp_path)[case]
        async with Server(server_ctx, loopback_ip()) as server:
            # In TLS 1.3 the client finishes its side of the handshake before the server has checked the
            # client certificate, so the refusal reaches the client on its first read (alert or EOF).
            try:
                reader, writer = await connect(client_ctx, server)
            except (ssl.SSLError, ConnectionError):
                pass
            else:
                try:
                    got = await asyncio.wait_for(reader.read(100), HANDSHAKE_TIMEOUT_S)
                    assert not got.startswith(b"hello"), "a refused client must never get application data"
                except (ssl.SSLError, ConnectionError):
                    pass
                writer.close()
            status, reason, exc = await server.result()
            assert (status, reason) == ("refused", want_reason), exc
            # ... and the listener still serves a good client
            await good_exchange(server, good_client_ctx)

    run_loop(main)


@pytest.mark.parametrize(
    "case,reason_seen_by_client",
    [
        ("other_ca", "unknown_ca"),
        ("expired", "expired"),
        ("server_auth_only_eku", "bad_key_usage"),
        ("no_client_cert", "no_client_cert"),
        # OpenSSL sends bad_certificate for a not-yet-valid cert: the refused side cannot tell more.
        ("not_yet_valid", "handshake"),
    ],
)
def test_refused_client_classifies_the_alert(case, reason_seen_by_client, cas, server_ctx, loopback_ip, tmp_path):
    """What a refused client sees is the server's TLS alert. asyncio's server transport aborts a failed
    handshake without flushing the alert (the client then sees EOF → "handshake"), so this test uses
    a blocking server thread, which sends it, as ztunnel (rustls) does."""
    ca, other = cas
    client_ctx, _ = _bad_clients(ca, other, tmp_path)[case]
    host = loopback_ip()
    with socket.create_server((host, 0)) as listener:
        listener.settimeout(HANDSHAKE_TIMEOUT_S)
        server_error: list[BaseException] = []

        def serve_one():
            conn, _ = listener.accept()
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError) as exc:
                server_error.append(exc)

        thread = threading.Thread(target=serve_one)
        thread.start()
        try:
            with pytest.raises(ssl.SSLError) as info:
                with socket.create_connection(listener.getsockname(), timeout=HANDSHAKE_TIMEOUT_S) as raw:
                    with client_ctx.wrap_socket(raw) as tls:
                        tls.recv(100)  # TLS 1.3: the alert arrives after the client's handshake is done
        finally:
            thread.join(HANDSHAKE_TIMEOUT_S)
        assert classify_handshake_error(info.value) == reason_seen_by_client
        assert server_error and classify_handshake_error(server_error[0]) != "handshake"


def test_client_refuses_unexpected_server_identity(server_ctx, good_client_ctx, loopback_ip, run_loop):
    async def main():
        async with Server(server_ctx, loopback_ip()) as server:
            reader, writer = await connect(good_client_ctx, server)
            ssl_object = writer.get_extra_info("ssl_object")
            expected = {SpiffeId(TD, "default", "ratings"), SpiffeId(TD, "other", "reviews")}
            with pytest.raises(PeerIdentityError) as info:
                check_server_identity(ssl_object, expected, TD)
            assert info.value.reason == "unexpected_identity"
            assert str(SERVER_ID) in str(info.value) and "spiffe://cluster.local/ns/default/sa/ratings" in str(info.value)
            assert classify_handshake_error(info.value) == "unexpected_identity"
            with pytest.raises(PeerIdentityError) as info:
                check_server_identity(ssl_object, [], TD)  # nothing expected: fail closed
            assert info.value.reason == "unexpected_identity"
            # the identity is accepted when listed (a service's subjectAltNames may list several)
            assert check_server_identity(ssl_object, [SpiffeId(TD, "x", "y"), SERVER_ID], TD) == SERVER_ID
            writer.close()
            await server.result()

    run_loop(main)


@pytest.mark.parametrize(
    "make,reason",
    [
        (lambda ca: testing.issue_custom(ca, spiffe=SERVER_ID, now=NOW, uris=[], dns_names=["reviews"]), "no_spiffe_san"),
        (lambda ca: testing.issue_custom(ca, spiffe=SERVER_ID, now=NOW, uris=[str(SERVER_ID), str(CLIENT_ID)]), "multiple_spiffe_san"),
        (lambda ca: testing.issue_custom(ca, spiffe=SpiffeId("evil.local", "default", "reviews"), now=NOW), "wrong_trust_domain"),
    ],
)
def test_client_refuses_server_with_bad_spiffe_san(make, reason, cas, good_client_ctx, loopback_ip, tmp_path, run_loop):
    async def main():
        ca, _ = cas
        bad_server_ctx = raw_context(make(ca), ca.root_cert_pem, tmp_path, server=True)
        async with Server(bad_server_ctx, loopback_ip()) as server:
            reader, writer = await connect(good_client_ctx, server)
            with pytest.raises(PeerIdentityError) as info:
                check_server_identity(writer.get_extra_info("ssl_object"), {SERVER_ID}, TD)
            assert info.value.reason == reason
            writer.close()
            await server.result()

    run_loop(main)


def test_client_refuses_server_from_another_ca(cas, good_client_ctx, loopback_ip, tmp_path, run_loop):
    async def main():
        ca, other = cas
        bad_server_ctx = raw_context(other.issue(SERVER_ID, now=NOW), ca.root_cert_pem, tmp_path, server=True)
        async with Server(bad_server_ctx, loopback_ip()) as server:
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await connect(good_client_ctx, server)
            assert classify_handshake_error(info.value) == "unknown_ca"
            await server.result()

    run_loop(main)


def test_client_refuses_client_auth_only_server(cas, good_client_ctx, loopback_ip, tmp_path, run_loop):
    async def main():
        ca, _ = cas
        issued = testing.issue_custom(ca, spiffe=SERVER_ID, now=NOW, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])
        async with Server(raw_context(issued, ca.root_cert_pem, tmp_path, server=True), loopback_ip()) as server:
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await connect(good_client_ctx, server)
            assert classify_handshake_error(info.value) == "bad_key_usage"
            await server.result()

    run_loop(main)


def test_tls12_is_opt_in(cas, good_client_ctx, loopback_ip, run_loop):
    async def main():
        ca, _ = cas
        server_bundle = bundle(ca.issue(SERVER_ID, now=NOW), ca.root_cert_pem)
        client_bundle = bundle(ca.issue(CLIENT_ID, now=NOW), ca.root_cert_pem)
        tls12_client = client_context(client_bundle, tls12=True)
        tls12_client.maximum_version = ssl.TLSVersion.TLSv1_2  # a peer that only speaks 1.2

        # default server: TLS 1.3 only (ztunnel without TLS12_ENABLED) → the 1.2 client is refused
        async with Server(server_context(server_bundle), loopback_ip()) as server:
            with pytest.raises((ssl.SSLError, ConnectionError)) as info:  # alert, or reset by asyncio's abort
                await connect(tls12_client, server)
            assert classify_handshake_error(info.value) == "handshake"
            status, reason, _ = await server.result()
            assert (status, reason) == ("refused", "handshake")

        # opted in: 1.2 works, with ztunnel's ECDHE-ECDSA AES-GCM suites
        async with Server(server_context(server_bundle, tls12=True), loopback_ip()) as server:
            reader, writer = await connect(tls12_client, server)
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.version() == "TLSv1.2"
            assert ssl_object.cipher()[0] in ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256")
            assert await reader.readline() == f"hello {CLIENT_ID}\n".encode()
            writer.close()
            assert (await server.result())[:3] == ("ok", CLIENT_ID, "h2")

    run_loop(main)


def test_context_settings(cas):
    ca, _ = cas
    b = bundle(ca.issue(SERVER_ID, now=NOW), ca.root_cert_pem)
    s, c = server_context(b), client_context(b)
    for ctx in (s, c):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert c.check_hostname is False
    assert s.num_tickets == 0
    assert server_context(b, tls12=True).minimum_version == ssl.TLSVersion.TLSv1_2


def test_classify_handshake_error_unwraps_and_defaults():
    inner = PeerIdentityError("expired", "x")
    try:
        try:
            raise inner
        except PeerIdentityError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as outer:
        assert classify_handshake_error(outer) == "expired"
    assert classify_handshake_error(ConnectionResetError()) == "handshake"
    assert classify_handshake_error(asyncio.TimeoutError()) == "handshake"
    with pytest.raises(ValueError):
        PeerIdentityError("not-a-reason", "x")


def _memory_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A real TLS 1.3 handshake between two SSLObjects over memory BIOs: (server side, client side)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_side=False, server_hostname=None)
    done = {srv: False, cli: False}
    for _ in range(10):   # TLS 1.3 with a client certificate: two flights each way
        for obj, outgoing, peer_in in ((cli, c_out, s_in), (srv, s_out, c_in)):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(outgoing.read())
        if all(done.values()):
            return srv, cli
    raise AssertionError("the in-memory handshake did not finish")


def test_peer_identity_is_remembered_per_certificate_role_and_trust_domain(cas, monkeypatch):
    """certs.tls PERF NOTE: a success is remembered per (certificate bytes, role, trust domain); another
    trust domain is still refused, a refusal is never remembered, and the memo stays bounded."""
    import certs.tls as tls
    ca, _ = cas
    monkeypatch.setattr(tls, "_identity_memo", {})
    parsed = []
    real = tls.x509.load_der_x509_certificate
    monkeypatch.setattr(tls.x509, "load_der_x509_certificate", lambda der: parsed.append(der) or real(der))
    srv_bundle = bundle(ca.issue(SERVER_ID, now=NOW), ca.root_cert_pem)
    cli_bundle = bundle(ca.issue(CLIENT_ID, now=NOW), ca.root_cert_pem)
    srv, cli = _memory_handshake(server_context(srv_bundle), client_context(cli_bundle))
    for _ in range(3):
        assert peer_identity(srv, TD) == CLIENT_ID
        assert peer_identity(cli, TD) == SERVER_ID
    assert len(parsed) == 2                          # once per (certificate, role), not per call
    for _ in range(2):
        with pytest.raises(PeerIdentityError) as err:
            peer_identity(srv, "other.local")       # the same certificate, another trust domain
        assert err.value.reason == "wrong_trust_domain"
    assert len(parsed) == 4                          # refusals are worked out each time
    # A second connection from the same client: the same bytes, no parse.
    srv2, _ = _memory_handshake(server_context(srv_bundle), client_context(cli_bundle))
    assert peer_identity(srv2, TD) == CLIENT_ID and len(parsed) == 4
    # Bounded: at the limit the memo starts over.
    monkeypatch.setattr(tls, "PEER_IDENTITY_MEMO_MAX", 2)
    srv3, _ = _memory_handshake(server_context(srv_bundle), client_context(bundle(ca.issue(SpiffeId(TD, "ns", "x"), now=NOW), ca.root_cert_pem)))
    assert peer_identity(srv3, TD) == SpiffeId(TD, "ns", "x")
    assert len(tls._identity_memo) == 1
