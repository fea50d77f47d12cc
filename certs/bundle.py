"""A workload's certificate material: chain + key + trust bundle, and the identity they carry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from certs._pem import load_certs, load_key, read_pem_file, single_spiffe_id
from certs.ca import IssuedCert
from certs.errors import CertError, PeerIdentityError
from certs.spiffe import SpiffeId


@dataclass(frozen=True)
class CertBundle:
    """Everything a TLS context needs, validated together: the key matches the leaf, the leaf
    carries exactly one SPIFFE id, and the chain verifies to the trust bundle (so a mix-up is
    reported at load time, not as a mysterious handshake failure on every connection)."""

    chain_pem: bytes
    key_pem: bytes
    trust_pem: bytes
    identity: SpiffeId
    not_before: datetime
    not_after: datetime

    def __repr__(self) -> str:  # never print the key
        return f"<CertBundle {self.identity} valid {self.not_before.isoformat()}..{self.not_after.isoformat()}>"

    @property
    def trust_domain(self) -> str:
        return self.identity.trust_domain

    def refresh_at(self) -> datetime:
        """When to renew: at half-life, as ztunnel (``certificate.rs`` ``refresh_at``:
        ``not_before + valid_for / 2``)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    @classmethod
    def from_files(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str], ca: str | os.PathLike[str]) -> "CertBundle":
        """Load PEM chain (leaf first), PEM key and PEM trust bundle. CertError naming the file on any problem."""
        return cls.from_pem(read_pem_file(cert), read_pem_file(key), read_pem_file(ca), names=(str(cert), str(key), str(ca)))

    @classmethod
    def from_issued(cls, issued: IssuedCert, trust_pem: bytes) -> "CertBundle":
        return cls.from_pem(issued.chain_pem, issued.key_pem, trust_pem, names=(f"certificate for {issued.spiffe}", "its key", "trust bundle"))

    @classmethod
    def from_pem(cls, chain_pem: bytes, key_pem: bytes, trust_pem: bytes, *, names: tuple[str, str, str] = ("cert", "key", "ca")) -> "CertBundle":
        cert_name, key_name, ca_name = names
        chain = load_certs(chain_pem, cert_name)
        trust = load_certs(trust_pem, ca_name)
        key = load_key(key_pem, key_name)
        leaf = chain[0]
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, pub) != leaf.public_key().public_bytes(serialization.Encoding.DER, pub):
            raise CertError(f"{key_name}: the private key does not match the first certificate in {cert_name}")
        try:
            identity = single_spiffe_id(leaf)
        except PeerIdentityError as err:
            raise CertError(f"{cert_name}: {err}") from None
        _check_chains_to(chain, trust, cert_name, ca_name)
        # Normalise PEM: re-encode what we parsed, so stray text around the blocks never reaches OpenSSL.
        pem = serialization.Encoding.PEM
        return cls(
            chain_pem=b"".join(c.public_bytes(pem) for c in chain),
            key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            trust_pem=b"".join(c.public_bytes(pem) for c in trust),
            identity=identity,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _check_chains_to(chain: list[x509.Certificate], trust: list[x509.Certificate], cert_name: str, ca_name: str) -> None:
    """Each chain certificate must be signed by the next, and the last by a trust anchor (or be one).
    Signatures only: validity in time is the handshake's business (it has the real clock)."""
    for child, parent in zip(chain, chain[1:]):
        if not _issued_by(child, parent):
            raise CertError(f"{cert_name}: the chain is out of order: {child.subject.rfc4514_string() or '(empty subject)'} is not signed by the next certificate")
    top = chain[-1]
    if any(top == anchor or _issued_by(top, anchor) for anchor in trust):
        return
    raise CertError(f"{cert_name}: the certificate chain does not verify to any CA in {ca_name} (issuer {top.issuer.rfc4514_string()!r})")
