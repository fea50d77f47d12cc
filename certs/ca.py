"""A small mesh CA: a self-signed ECDSA P-256 root that issues SPIFFE workload certificates.

This is what Istio's built-in CA (istiod, "self-signed CA" mode) does for a mesh, reduced to files
in one directory: ``root-cert.pem`` (the trust bundle), ``root-key.pem`` (0600) and ``ca.json``
(the trust domain). Workload certificates follow the SPIFFE X509-SVID profile as Istio issues them:
empty subject, exactly one URI SAN ``spiffe://td/ns/N/sa/S`` (critical, since the subject is
empty, RFC 5280 §4.2.1.6), EKU serverAuth + clientAuth (a workload is both server and client of
HBONE), KU digitalSignature, not a CA. Time is a parameter: ``now=`` everywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs._pem import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    cert_pem,
    key_pem,
    load_certs,
    load_key,
    utc,
    whole_seconds,
    write_private,
    write_public,
)
from certs.errors import CertError
from certs.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeError, SpiffeId, check_trust_domain

ROOT_CERT_FILE = "root-cert.pem"  # Istio's name for the root in a cacerts secret
ROOT_KEY_FILE = "root-key.pem"
CA_META_FILE = "ca.json"
CA_META_FORMAT = 1  # bump if ca.json's fields change meaning

ROOT_TTL = timedelta(days=3650)  # Istio's self-signed root default: 10 years (SELF_SIGNED_CA_CERT_TTL)
WORKLOAD_TTL = timedelta(hours=24)  # Istio/ztunnel default workload cert TTL (SECRET_TTL, DEFAULT_TTL)
MIN_TTL = timedelta(seconds=1)  # X.509 validity has one-second resolution; anything shorter is empty
ROOT_ORG = "hbone-proxy"  # subject O of the root; CN names the trust domain so `inspect` says whose CA it is


@dataclass(frozen=True)
class IssuedCert:
    """A freshly issued workload certificate: PEM chain (leaf first), PEM key, and what it says."""

    chain_pem: bytes
    key_pem: bytes
    spiffe: SpiffeId
    not_before: datetime
    not_after: datetime

    def write(self, prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``PREFIX-cert.pem`` (the chain) and ``PREFIX-key.pem`` (0600). Each file is replaced
        atomically, so a proxy watching them (FileCertSource) never reads half a file."""
        prefix = Path(prefix)
        cert_path = prefix.with_name(prefix.name + "-cert.pem")
        key_path = prefix.with_name(prefix.name + "-key.pem")
        if not cert_path.parent.is_dir():
            raise CertError(f"{cert_path.parent}: no such directory")
        # Key first: a watcher that sees a new cert then finds a matching key, or sees only the new
        # key (mismatch → it keeps the old bundle and retries on the next check).
        write_private(key_path, self.key_pem)
        write_public(cert_path, self.chain_pem)
        return cert_path, key_path


class MeshCA:
    """The mesh's root of trust. Make one with ``MeshCA.init(dir, now=...)``, reopen with ``MeshCA.load(dir)``."""

    def __init__(self, directory: Path, trust_domain: str, root_cert: x509.Certificate, root_key: ec.EllipticCurvePrivateKey):
        self.directory = directory
        self.trust_domain = trust_domain
        self._root_cert = root_cert
        self._root_key = root_key
        self.root_cert_pem: bytes = cert_pem(root_cert)

    def __repr__(self) -> str:
        return (
            f"<MeshCA {self.trust_domain} dir={str(self.directory)!r} "
            f"root_serial={self._root_cert.serial_number:x} not_after={self._root_cert.not_valid_after_utc.isoformat()}>"
        )

    @property
    def root_cert(self) -> x509.Certificate:
        return self._root_cert

    # ---------------------------------------------------------------- create / open

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        now: datetime,
        ttl: timedelta = ROOT_TTL,
    ) -> "MeshCA":
        """Create a new CA in ``directory`` (created 0700 if missing). Refuses to overwrite any CA file:
        replacing a root silently would cut every workload off from every other."""
        try:
            check_trust_domain(trust_domain)
        except SpiffeError as err:
            raise CertError(f"invalid trust domain: {err}") from None
        now = whole_seconds(utc(now))
        if ttl < MIN_TTL:
            raise CertError(f"CA ttl must be at least {MIN_TTL}, got {ttl}")
        directory = Path(directory)
        existing = [n for n in (ROOT_CERT_FILE, ROOT_KEY_FILE, CA_META_FILE) if (directory / n).exists()]
        if existing:
            raise CertError(f"{directory}: a CA already exists here ({', '.join(existing)}); refusing to overwrite it")
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        except OSError as err:
            raise CertError(f"{directory}: cannot create the CA directory: {err.strerror}") from None
        if not directory.is_dir():
            raise CertError(f"{directory}: not a directory")

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ROOT_ORG),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} root CA"),
            ]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + ttl)
            # path_length=0: this root signs workload leaves directly, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        # Key first, with O_EXCL: two concurrent `certs init` cannot both win.
        try:
            fd = os.open(directory / ROOT_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
        except FileExistsError:
            raise CertError(f"{directory}: a CA already exists here ({ROOT_KEY_FILE}); refusing to overwrite it") from None
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem(key))
        write_public(directory / ROOT_CERT_FILE, cert_pem(cert))
        meta = {"format": CA_META_FORMAT, "trust_domain": trust_domain}
        write_public(directory / CA_META_FILE, (json.dumps(meta, indent=2) + "\n").encode())
        return cls(directory, trust_domain, cert, key)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "MeshCA":
        """Open a CA made by ``init``. CertError naming the file on any problem."""
        directory = Path(directory)
        meta_path, cert_path, key_path = directory / CA_META_FILE, directory / ROOT_CERT_FILE, directory / ROOT_KEY_FILE

        def read(path: Path) -> bytes:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise CertError(f"{path}: not found (is {directory} a CA made by `hbone-proxy certs init`?)") from None
            except OSError as err:
                raise CertError(f"{path}: cannot read: {err.strerror}") from None

        raw_meta = read(meta_path)
        try:
            meta = json.loads(raw_meta)
            trust_domain = meta["trust_domain"]
            check_trust_domain(trust_domain)
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError and SpiffeError are ValueErrors
            raise CertError(f"{meta_path}: not a valid CA description: {err}") from None
        certs = load_certs(read(cert_path), str(cert_path))
        if len(certs) != 1:
            raise CertError(f"{cert_path}: expected exactly one certificate, found {len(certs)}")
        cert = certs[0]
        key = load_key(read(key_path), str(key_path))
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{key_path}: the CA key must be an ECDSA key, got {type(key).__name__}")
        if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise CertError(f"{key_path}: the key does not belong to the certificate in {cert_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CertError(f"{cert_path}: not a CA certificate (basicConstraints CA:TRUE missing)")
        return cls(directory, trust_domain, cert, key)

    # ---------------------------------------------------------------- issue

    def issue(self, spiffe: SpiffeId, *, now: datetime, ttl: timedelta = WORKLOAD_TTL) -> IssuedCert:
        """A workload certificate for ``spiffe``, valid from ``now`` for ``ttl`` (capped at the root's
        own expiry: a leaf cannot outlive the root that vouches for it)."""
        if not isinstance(spiffe, SpiffeId):
            raise CertError(f"issue() needs a SpiffeId, not {type(spiffe).__name__}")
        if spiffe.trust_domain != self.trust_domain:
            # Istio's CA signs only identities of its own trust domain; a peer would refuse it anyway
            # (ztunnel TrustDomainVerifier), so fail here where the mistake is made.
            raise CertError(f"cannot issue {spiffe}: this CA serves trust domain {self.trust_domain!r}, not {spiffe.trust_domain!r}")
        return self._issue(
            uris=[str(spiffe)], spiffe=spiffe, now=now, ttl=ttl,
            eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        )

    def _issue(
        self,
        *,
        uris: Iterable[str],
        spiffe: SpiffeId,
        now: datetime,
        ttl: timedelta,
        eku: Iterable[x509.ObjectIdentifier] | None,
        not_before: datetime | None = None,
        clamp_to_root: bool = True,
        dns_names: Iterable[str] = (),
    ) -> IssuedCert:
        """The one place leaves are built. ``issue`` calls it with the profile above; ``certs.testing``
        calls it with deliberately wrong profiles to test that peers refuse them."""
        now = whole_seconds(utc(now))
        if ttl < MIN_TTL:
            raise CertError(f"certificate ttl must be at least {MIN_TTL}, got {ttl}")
        start = whole_seconds(utc(not_before, "not_before")) if not_before is not None else now
        end = start + ttl
        root_start, root_end = self._root_cert.not_valid_before_utc, self._root_cert.not_valid_after_utc
        if clamp_to_root:
            if not root_start <= now < root_end:
                raise CertError(f"the CA root is not valid at {now.isoformat()} (valid {root_start.isoformat()} to {root_end.isoformat()})")
            end = min(end, root_end)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))  # SPIFFE X509-SVID / Istio: identity lives in the SAN only
            .issuer_name(self._root_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    self._root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                ),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns_names]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        cert = builder.sign(self._root_key, hashes.SHA256())
        # The chain is the leaf alone: the root travels in the trust bundle, and sending it in every
        # handshake would only add bytes (RFC 8446 §4.4.2: the root "MAY be omitted").
        return IssuedCert(
            chain_pem=cert_pem(cert),
            key_pem=key_pem(key),
            spiffe=spiffe,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
        )
