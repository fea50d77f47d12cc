"""The mesh CA and certificate bundles: init/load/issue round trip, the certificate profile, and
clear errors (naming the file) for every way the inputs can be wrong."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import testing
from certs._pem import load_certs
from certs.bundle import CertBundle
from certs.cli import describe
from certs.ca import MeshCA
from certs.errors import CertError
from certs.spiffe import SpiffeId

NOW = datetime(2030, 1, 2, 3, 4, 5, 678900, tzinfo=timezone.utc)  # fixed clock; microseconds on purpose
ID = SpiffeId("cluster.local", "default", "reviews")


@pytest.fixture
def ca(tmp_path):
    return MeshCA.init(tmp_path / "ca", now=NOW)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_writes_files_with_private_modes(tmp_path):
    ca = MeshCA.init(tmp_path / "ca", trust_domain="example.org", now=NOW)
    d = tmp_path / "ca"
    assert sorted(p.name for p in d.iterdir()) == ["ca.json", "root-cert.pem", "root-key.pem"]
    assert mode(d) == 0o700
    assert mode(d / "root-key.pem") == 0o600
    assert json.loads((d / "ca.json").read_text())["trust_domain"] == "example.org"
    root = x509.load_pem_x509_certificate((d / "root-cert.pem").read_bytes())
    assert (d / "root-cert.pem").read_bytes() == ca.root_cert_pem
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey) and root.public_key().curve.name == "secp256r1"
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    assert root.not_valid_before_utc == NOW.replace(microsecond=0)
    assert root.not_valid_after_utc - root.not_valid_before_utc == timedelta(days=3650)
    assert "example.org" in root.subject.rfc4514_string()


def test_init_refuses_to_overwrite(ca, tmp_path):
    before = (tmp_path / "ca" / "root-key.pem").read_bytes()
    with pytest.raises(CertError, match="already exists"):
        MeshCA.init(tmp_path / "ca", now=NOW)
    assert (tmp_path / "ca" / "root-key.pem").read_bytes() == before


def test_init_rejects_bad_trust_domain_and_naive_time(tmp_path):
    with pytest.raises(CertError, match="trust domain"):
        MeshCA.init(tmp_path / "a", trust_domain="Bad Domain", now=NOW)
    with pytest.raises(CertError, match="timezone-aware"):
        MeshCA.init(tmp_path / "b", now=datetime(2030, 1, 1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_load_round_trip_and_issue(ca, tmp_path):
    loaded = MeshCA.load(tmp_path / "ca")
    assert loaded.trust_domain == "cluster.local"
    assert loaded.root_cert_pem == ca.root_cert_pem
    issued = loaded.issue(ID, now=NOW)
    # a certificate from the reloaded CA verifies against the original root: same key
    CertBundle.from_issued(issued, ca.root_cert_pem)


def test_issued_certificate_profile(ca):
    issued = ca.issue(ID, now=NOW, ttl=timedelta(hours=24))
    assert issued.spiffe == ID
    assert issued.not_before == NOW.replace(microsecond=0)
    assert issued.not_after == issued.not_before + timedelta(hours=24)
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    assert len(chain) == 1  # the root travels in the trust bundle, not in every handshake
    leaf = chain[0]
    assert leaf.issuer == ca.root_cert.subject
    assert leaf.subject == x509.Name([])  # SPIFFE/Istio: identity is the SAN only
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # RFC 5280 §4.2.1.6: required when the subject is empty
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(ID)]
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.public_key().curve.name == "secp256r1"
    leaf.verify_directly_issued_by(ca.root_cert)
    assert b"PRIVATE KEY" in issued.key_pem


def test_issue_serials_are_unique(ca):
    serials = {x509.load_pem_x509_certificate(ca.issue(ID, now=NOW).chain_pem).serial_number for _ in range(20)}
    assert len(serials) == 20


def test_issue_refuses_other_trust_domain_and_bad_ttl(ca):
    with pytest.raises(CertError, match="trust domain 'cluster.local'"):
        ca.issue(SpiffeId("other.local", "default", "reviews"), now=NOW)
    with pytest.raises(CertError, match="ttl"):
        ca.issue(ID, now=NOW, ttl=timedelta(0))
    with pytest.raises(CertError, match="SpiffeId"):
        ca.issue("spiffe://cluster.local/ns/default/sa/reviews", now=NOW)


def test_leaf_never_outlives_root(tmp_path):
    ca = MeshCA.init(tmp_path / "ca", now=NOW, ttl=timedelta(days=2))
    issued = ca.issue(ID, now=NOW + timedelta(days=1, hours=12), ttl=timedelta(days=1))
    assert issued.not_after == ca.root_cert.not_valid_after_utc
    with pytest.raises(CertError, match="root is not valid"):
        ca.issue(ID, now=NOW + timedelta(days=3))


def test_write_creates_cert_and_private_key(ca, tmp_path):
    issued = ca.issue(ID, now=NOW)
    cert, key = issued.write(tmp_path / "reviews")
    assert (cert.name, key.name) == ("reviews-cert.pem", "reviews-key.pem")
    assert cert.read_bytes() == issued.chain_pem and key.read_bytes() == issued.key_pem
    assert mode(key) == 0o600
    # writing again replaces both (rotation with `certs issue`), leaving no temp files behind
    again = ca.issue(ID, now=NOW)
    again.write(tmp_path / "reviews")
    assert cert.read_bytes() == again.chain_pem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca", "reviews-cert.pem", "reviews-key.pem"]
    with pytest.raises(CertError, match="no such directory"):
        issued.write(tmp_path / "missing" / "x")


# ---------------------------------------------------------------- CA load errors


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda d: (d / "ca.json").unlink(), r"ca\.json: not found"),
        (lambda d: (d / "ca.json").write_text("{not json"), r"ca\.json: not a valid CA description"),
        (lambda d: (d / "ca.json").write_text('{"trust_domain": "UPPER"}'), r"ca\.json: not a valid CA description"),
        (lambda d: (d / "root-cert.pem").write_text("garbage"), r"root-cert\.pem: no PEM certificate"),
        (lambda d: (d / "root-key.pem").unlink(), r"root-key\.pem: not found"),
        (lambda d: (d / "root-key.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
         r"root-key\.pem: malformed PEM private key"),
    ],
)
def test_load_errors_name_the_file(ca, tmp_path, damage, match):
    damage(tmp_path / "ca")
    with pytest.raises(CertError, match=match):
        MeshCA.load(tmp_path / "ca")


def test_load_refuses_mismatched_key(tmp_path):
    MeshCA.init(tmp_path / "a", now=NOW)
    MeshCA.init(tmp_path / "b", now=NOW)
    (tmp_path / "a" / "root-key.pem").write_bytes((tmp_path / "b" / "root-key.pem").read_bytes())
    with pytest.raises(CertError, match="does not belong"):
        MeshCA.load(tmp_path / "a")


def test_load_missing_directory(tmp_path):
    with pytest.raises(CertError, match="certs init"):
        MeshCA.load(tmp_path / "nowhere")


# ---------------------------------------------------------------- bundles


def test_bundle_from_files(ca, tmp_path):
    cert, key = ca.issue(ID, now=NOW, ttl=timedelta(hours=24)).write(tmp_path / "w")
    b = CertBundle.from_files(cert, key, tmp_path / "ca" / "root-cert.pem")
    assert b.identity == ID and b.trust_domain == "cluster.local"
    assert b.not_before == NOW.replace(microsecond=0)
    assert b.refresh_at() == b.not_before + timedelta(hours=12)  # ztunnel: half-life
    assert "PRIVATE" not in repr(b) and str(ID) in repr(b)


def test_bundle_accepts_trust_bundle_with_several_roots(ca, tmp_path):
    other = MeshCA.init(tmp_path / "other", now=NOW)
    b = CertBundle.from_issued(ca.issue(ID, now=NOW), other.root_cert_pem + ca.root_cert_pem)
    assert b.trust_pem.count(b"BEGIN CERTIFICATE") == 2


def test_bundle_from_files_errors_name_the_file(ca, tmp_path):
    issued = ca.issue(ID, now=NOW)
    cert, key = issued.write(tmp_path / "w")
    root = tmp_path / "ca" / "root-cert.pem"
    other = MeshCA.init(tmp_path / "other", now=NOW)
    other_cert, other_key = other.issue(ID, now=NOW).write(tmp_path / "o")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")

    cases = [
        ((tmp_path / "missing.pem", key, root), r"missing\.pem: not found"),
        ((tmp_path, key, root), r"is a directory"),
        ((garbage, key, root), r"garbage\.pem: no PEM certificate"),
        ((cert, garbage, root), r"garbage\.pem: no PEM private key"),
        ((cert, cert, root), r"w-cert\.pem: no PEM private key"),
        ((cert, other_key, root), r"o-key\.pem: the private key does not match"),
        ((cert, key, garbage), r"garbage\.pem: no PEM certificate"),
        ((other_cert, other_key, root), r"o-cert\.pem: the certificate chain does not verify to any CA in .*root-cert\.pem"),
    ]
    for args, match in cases:
        with pytest.raises(CertError, match=match):
            CertBundle.from_files(*args)


def test_bundle_refuses_cert_without_single_spiffe_id(ca, tmp_path):
    for uris, match in (([], "no spiffe:// URI SAN"), ([str(ID), str(SpiffeId("cluster.local", "a", "b"))], "exactly one")):
        cert, key = testing.issue_custom(ca, spiffe=ID, now=NOW, uris=uris, dns_names=["x"]).write(tmp_path / "bad")
        with pytest.raises(CertError, match=match):
            CertBundle.from_files(cert, key, tmp_path / "ca" / "root-cert.pem")


def test_bundle_refuses_encrypted_key(ca, tmp_path):
    from cryptography.hazmat.primitives import serialization

    issued = ca.issue(ID, now=NOW)
    key = serialization.load_pem_private_key(issued.key_pem, None)
    enc = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw"))
    with pytest.raises(CertError, match="encrypted"):
        CertBundle.from_pem(issued.chain_pem, enc, ca.root_cert_pem)


def test_bundle_pem_with_surrounding_text_is_normalised(ca):
    issued = ca.issue(ID, now=NOW)
    noisy = b"subject=...\nissuer=...\n" + issued.chain_pem + b"\ntrailing notes\n"
    b = CertBundle.from_pem(noisy, b"# key\n" + issued.key_pem + b"junk", b"\n" + ca.root_cert_pem + b"\n\n")
    assert b.chain_pem == issued.chain_pem  # only the certificate reaches OpenSSL
    assert b.trust_pem == ca.root_cert_pem


def test_bundle_truncated_at_every_length_only_raises_cert_error(ca):
    """A half-written file (rotation in progress) is a CertError at every cut point, never a crash."""
    issued = ca.issue(ID, now=NOW)
    for blob_index in range(3):
        blobs = [issued.chain_pem, issued.key_pem, ca.root_cert_pem]
        full = blobs[blob_index]
        for cut in range(0, len(full)):
            blobs[blob_index] = full[:cut]
            try:
                CertBundle.from_pem(*blobs)
            except CertError:
                continue
            # a cut that only drops the trailing newline still holds a whole PEM block
            assert full[cut:].strip() == b"", (blob_index, cut)


@pytest.fixture(scope="module")
def fuzz_material(tmp_path_factory):
    ca = MeshCA.init(tmp_path_factory.mktemp("fuzzca") / "ca", now=NOW)
    return ca, ca.issue(ID, now=NOW)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_bundle_from_mutated_pem_only_raises_cert_error(data, fuzz_material):
    ca, issued = fuzz_material
    which = data.draw(st.integers(0, 2))
    blobs = [bytearray(issued.chain_pem), bytearray(issued.key_pem), bytearray(ca.root_cert_pem)]
    blob = blobs[which]
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    try:
        CertBundle.from_pem(*(bytes(b) for b in blobs))
    except CertError:
        pass
    if which != 1:  # `certs inspect` reads the same damaged certificate without crashing either
        try:
            for cert in load_certs(bytes(blob), "damaged.pem"):
                assert describe(cert, NOW)
        except CertError:
            pass
