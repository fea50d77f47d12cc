"""Certificate rotation with a fixed clock: half-life re-minting, file replacement, a broken new
file keeping the old bundle, and — over real TLS — new connections get the new certificate while
a live connection keeps working on the old one."""

from __future__ import annotations

import asyncio
import os
import re
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from certs import testing
from certs.bundle import CertBundle
from certs.ca import MeshCA
from certs.errors import CertError
from certs.rotation import FORCED_RECHECK_INTERVAL, FileCertSource, MintingCertSource, watch
from certs.spiffe import SpiffeId
from certs.tls import check_server_identity, client_context
from tests.test_certs_tls import Server, run_loop  # noqa: F401 - run_loop is a fixture

T0 = datetime(2030, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
TTL = timedelta(hours=24)
ID = SpiffeId("cluster.local", "default", "reviews")
CLIENT_ID = SpiffeId("cluster.local", "default", "productpage")
IO_TIMEOUT_S = 5.0  # loopback I/O takes milliseconds; this only bounds a broken test


@pytest.fixture
def ca(tmp_path):
    return MeshCA.init(tmp_path / "ca", now=T0 - timedelta(days=30))


def serial(bundle) -> int:
    return x509.load_pem_x509_certificate(bundle.chain_pem).serial_number


# ---------------------------------------------------------------- minting


def test_minting_source_rotates_at_half_life(ca):
    src = MintingCertSource(ca, ID, TTL, T0)
    first, server1, client1 = src.current(), src.server_context(), src.client_context()
    assert first.identity == ID and first.not_before == T0 and first.refresh_at() == T0 + TTL / 2
    assert src.server_context() is server1 and src.client_context() is client1  # built once per bundle
    assert not src.maybe_rotate(T0 + TTL / 2 - timedelta(seconds=1))
    assert src.current() is first and src.rotations == 0
    assert src.maybe_rotate(T0 + TTL / 2)
    second = src.current()
    assert second.not_before == T0 + TTL / 2 and second.not_after == T0 + TTL / 2 + TTL
    assert serial(second) != serial(first)
    assert src.server_context() is not server1 and src.client_context() is not client1
    assert src.rotations == 1 and src.last_error is None
    assert not src.maybe_rotate(T0 + TTL / 2 + timedelta(hours=1))  # the new one is not due yet
    assert "rotations=1" in repr(src) and str(ID) in repr(src)


def test_minting_source_keeps_old_bundle_when_ca_cannot_issue(tmp_path):
    ca = MeshCA.init(tmp_path / "short", now=T0, ttl=timedelta(hours=30))
    src = MintingCertSource(ca, ID, TTL, T0)
    first = src.current()
    assert not src.maybe_rotate(T0 + timedelta(hours=31))  # the root has expired: cannot mint
    assert src.current() is first
    assert isinstance(src.last_error, CertError) and "root is not valid" in str(src.last_error)


def test_minting_source_needs_a_clock(ca):
    with pytest.raises(CertError, match="now="):
        MintingCertSource(ca, ID, TTL)


# ---------------------------------------------------------------- files


@pytest.fixture
def files(ca, tmp_path):
    cert, key = ca.issue(ID, now=T0, ttl=TTL).write(tmp_path / "wl")
    return cert, key, tmp_path / "ca" / "root-cert.pem"


def test_file_source_picks_up_replaced_files(ca, files, tmp_path):
    src = FileCertSource(*files)
    first = src.current()
    assert not src.maybe_rotate(T0 + timedelta(minutes=1))  # nothing changed
    os.utime(files[0])  # touched, same content: no rotation
    assert not src.maybe_rotate(T0 + timedelta(minutes=2))
    assert src.current() is first and src.rotations == 0
    new = ca.issue(ID, now=T0 + timedelta(hours=1), ttl=TTL)
    new.write(tmp_path / "wl")
    assert src.maybe_rotate(T0 + timedelta(hours=1))
    assert src.current().chain_pem == new.chain_pem and src.current().not_before == T0 + timedelta(hours=1)
    assert src.rotations == 1 and src.last_error is None


@pytest.mark.parametrize(
    "breakage,match",
    [
        (lambda cert, key: cert.write_text("-----BEGIN CERTIFICATE-----\ntruncat"), r"wl-cert\.pem: malformed PEM certificate"),
        (lambda cert, key: cert.write_text(""), r"wl-cert\.pem: no PEM certificate"),
        (lambda cert, key: key.unlink(), r"wl-key\.pem: not found"),
    ],
)
def test_broken_new_file_keeps_old_bundle(files, ca, tmp_path, breakage, match):
    src = FileCertSource(*files)
    first, ctx = src.current(), src.server_context()
    breakage(files[0], files[1])
    assert not src.maybe_rotate(T0 + timedelta(minutes=1))
    assert src.current() is first and src.server_context() is ctx
    assert isinstance(src.last_error, CertError)
    assert re.search(match, str(src.last_error)), str(src.last_error)
    assert "last_error=" in repr(src)
    # the broken set is not re-parsed on every check...
    err = src.last_error
    assert not src.maybe_rotate(T0 + timedelta(minutes=2)) and src.last_error is err
    # ...and a good set written later is picked up, clearing the error
    ca.issue(ID, now=T0 + timedelta(minutes=3), ttl=TTL).write(tmp_path / "wl")
    assert src.maybe_rotate(T0 + timedelta(minutes=3))
    assert src.last_error is None and src.current().not_before == T0 + timedelta(minutes=3)


def test_half_written_rotation_waits_for_the_matching_pair(ca, files, tmp_path):
    src = FileCertSource(*files)
    first = src.current()
    new = ca.issue(ID, now=T0 + timedelta(hours=2), ttl=TTL)
    files[1].write_bytes(new.key_pem)  # the key landed, the cert not yet
    assert not src.maybe_rotate(T0 + timedelta(hours=2))
    assert src.current() is first and "does not match" in str(src.last_error)
    files[0].write_bytes(new.chain_pem)
    assert src.maybe_rotate(T0 + timedelta(hours=2, seconds=5))
    assert src.current().chain_pem == new.chain_pem


def test_expired_new_certificate_is_refused(ca, files):
    src = FileCertSource(*files)
    first = src.current()
    testing.expired(ca, ID, now=T0).write(files[0].with_name("wl"))
    assert not src.maybe_rotate(T0)
    assert src.current() is first and "expired" in str(src.last_error)


def test_half_life_rereads_even_if_stat_looks_unchanged(ca, files):
    """A change that keeps mtime, size and inode (an in-place rewrite with the times restored) is
    invisible to stat; from half-life on the files are re-read anyway."""
    src = FileCertSource(*files)
    first = src.current()
    old_cert, old_key = files[0].read_bytes(), files[1].read_bytes()
    for _ in range(50):  # ECDSA signatures vary in length: find a certificate of the same size
        new = ca.issue(ID, now=T0 + timedelta(hours=11), ttl=TTL)
        if len(new.chain_pem) == len(old_cert) and len(new.key_pem) == len(old_key):
            break
    else:
        pytest.skip("no same-size certificate found")
    for path, data in ((files[0], new.chain_pem), (files[1], new.key_pem)):
        st = path.stat()
        with open(path, "r+b") as f:  # same inode
            f.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not src.maybe_rotate(T0 + TTL / 2 - timedelta(seconds=1))  # stat unchanged, not yet half-life
    assert src.current() is first
    assert src.maybe_rotate(T0 + TTL / 2)
    assert src.current().chain_pem == new.chain_pem


def test_past_half_life_without_new_files_rechecks_at_an_interval(files, monkeypatch):
    src = FileCertSource(*files)
    reads = []
    real_read = src._read
    monkeypatch.setattr(src, "_read", lambda: reads.append(1) or real_read())
    half = T0 + TTL / 2
    assert not src.maybe_rotate(half)
    assert not src.maybe_rotate(half + FORCED_RECHECK_INTERVAL / 2)
    assert len(reads) == 1  # once at half-life, then not again until the interval has passed
    assert not src.maybe_rotate(half + FORCED_RECHECK_INTERVAL)
    assert len(reads) == 2 and src.last_error is None


def test_first_load_errors_raise(files, tmp_path):
    with pytest.raises(CertError, match=r"nope\.pem: not found"):
        FileCertSource(files[0], files[1], tmp_path / "nope.pem")


# ---------------------------------------------------------------- live connections over real TLS


def test_rotation_reaches_new_connections_and_spares_live_ones(tmp_path, loopback_ip, run_loop):
    async def main():
        now = datetime.now(timezone.utc)  # OpenSSL checks validity with the real clock
        ca = MeshCA.init(tmp_path / "ca", now=now - timedelta(days=1))
        src = MintingCertSource(ca, ID, TTL, now - timedelta(hours=20))  # past half-life at `now`
        client = client_context(CertBundle.from_issued(ca.issue(CLIENT_ID, now=now), ca.root_cert_pem))

        async def open_conn(server):
            reader, writer = await asyncio.open_connection(server.host, server.port, ssl=client, server_hostname="")
            ssl_object = writer.get_extra_info("ssl_object")
            assert check_server_identity(ssl_object, {ID}, "cluster.local") == ID
            assert await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S) == f"hello {CLIENT_ID}\n".encode()
            return reader, writer, x509.load_der_x509_certificate(ssl_object.getpeercert(True)).serial_number

        async def roundtrip(reader, writer, msg: bytes):
            writer.write(msg + b"\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readline(), IO_TIMEOUT_S) == msg.upper() + b"\n"

        # the server asks the source for its context at each accept, as hbone/'s server does
        async with Server(src.server_context, loopback_ip(), echo=True) as server:
            r1, w1, serial1 = await open_conn(server)
            await roundtrip(r1, w1, b"before")
            assert serial1 == serial(src.current())
            assert src.maybe_rotate(now)
            r2, w2, serial2 = await open_conn(server)
            assert serial2 == serial(src.current()) != serial1  # a new connection gets the new certificate
            await roundtrip(r1, w1, b"live tunnel untouched")  # the old connection keeps working
            await roundtrip(r2, w2, b"new")
            for w in (w1, w2):
                w.close()
            assert [(await server.result())[:2] for _ in range(2)] == [("ok", CLIENT_ID)] * 2

    run_loop(main)


def test_watch_drives_rotation_and_reports_errors_once(ca, files, run_loop):
    async def main():
        src = FileCertSource(*files)
        times = iter([T0, T0 + timedelta(minutes=1), T0 + timedelta(minutes=2), T0 + timedelta(minutes=3)] + [T0 + timedelta(minutes=4)] * 1000)
        rotated, errors = [], []
        files[0].write_text("broken")
        task = asyncio.create_task(watch([src], interval_s=0, clock=lambda: next(times), on_rotate=rotated.append,
                                         on_error=lambda s, e: errors.append(e)))
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(errors) == 1 and not rotated  # reported once, not on every tick
        ca.issue(ID, now=T0 + timedelta(minutes=1), ttl=TTL).write(files[0].with_name("wl"))
        for _ in range(20):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert rotated == [src] and src.last_error is None

    run_loop(main)

