"""Small helpers shared by certs/ modules: time handling, PEM parsing, private file writes."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa

from certs.errors import CertError, PeerIdentityError
from certs.spiffe import SCHEME_PREFIX, SpiffeError, SpiffeId

PRIVATE_FILE_MODE = 0o600  # keys: readable by the owner only
PUBLIC_FILE_MODE = 0o644   # certificates and CA metadata: public by nature
PRIVATE_DIR_MODE = 0o700  # the CA directory holds the root key


def utc(now: datetime, what: str = "now") -> datetime:
    """An aware datetime in UTC. Naive datetimes are refused: a silent local-time guess would shift
    every validity window by the machine's UTC offset."""
    if not isinstance(now, datetime):
        raise CertError(f"{what} must be a datetime, not {type(now).__name__}")
    if now.tzinfo is None or now.utcoffset() is None:
        raise CertError(f"{what} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return now.astimezone(timezone.utc)


def whole_seconds(t: datetime) -> datetime:
    """X.509 times have one-second resolution; truncate so the certificate says exactly what we report."""
    return t.replace(microsecond=0)


def load_certs(data: bytes, where: str) -> list[x509.Certificate]:
    """All certificates in a PEM blob, in order; CertError naming ``where`` if none or malformed."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertError(f"{where}: no PEM certificate found")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as err:
        raise CertError(f"{where}: malformed PEM certificate: {err}") from None
    if not certs:
        raise CertError(f"{where}: no PEM certificate found")
    for i, cert in enumerate(certs):
        # cryptography parses lazily: touch every field we use later, so a damaged certificate is
        # reported here, naming the file, instead of as a ValueError deep in a handshake or a table.
        try:
            cert.subject, cert.issuer, cert.public_key(), cert.not_valid_before_utc, cert.not_valid_after_utc
            cert.serial_number, cert.extensions
        except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as err:
            n = f" (certificate {i + 1})" if len(certs) > 1 else ""
            raise CertError(f"{where}{n}: malformed certificate: {err}") from None
    return certs


KeyTypes = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


def load_key(data: bytes, where: str) -> KeyTypes:
    if b"PRIVATE KEY-----" not in data:
        raise CertError(f"{where}: no PEM private key found")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertError(f"{where}: the private key is encrypted; an unencrypted PEM key is required") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CertError(f"{where}: malformed PEM private key: {err}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise CertError(f"{where}: unsupported private key type {type(key).__name__}")
    return key


def key_pem(key: KeyTypes) -> bytes:
    # PKCS#8, unencrypted: what Istio writes (key.pem) and what ssl.load_cert_chain reads.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def spiffe_uris(cert: x509.Certificate) -> list[str]:
    """The certificate's URI SANs that claim to be SPIFFE ids (scheme ``spiffe://``, case-insensitive
    as RFC 3986 §3.1 says schemes are), in certificate order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError:  # a malformed extension: treat as having no usable SAN
        return []
    return [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX]


def single_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE id of a leaf, else PeerIdentityError ("no_spiffe_san" / "multiple_spiffe_san").

    Exactly one spiffe:// URI is required: SPIFFE X509-SVID §2 says "An X.509 SVID MUST contain
    exactly one URI SAN", and two SPIFFE ids would make the identity ambiguous (ztunnel takes the
    first parseable one; we refuse instead: fail closed). Like ztunnel we ignore non-SPIFFE URI
    SANs and DNS SANs rather than refuse them."""
    uris = spiffe_uris(cert)
    if not uris:
        raise PeerIdentityError("no_spiffe_san", "the certificate has no spiffe:// URI SAN")
    if len(uris) > 1:
        raise PeerIdentityError("multiple_spiffe_san", f"the certificate has {len(uris)} spiffe:// URI SANs ({', '.join(uris)}); exactly one is allowed")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeError as err:
        raise PeerIdentityError("no_spiffe_san", f"the certificate's URI SAN is not a valid SPIFFE id: {err}") from None


def read_pem_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of a PEM file; a missing, directory or unreadable path is a CertError that names it."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path}: not found") from None
    except IsADirectoryError:
        raise CertError(f"{path}: is a directory, expected a PEM file") from None
    except OSError as err:
        raise CertError(f"{path}: cannot read: {err.strerror}") from None


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, atomically (temp file in the same directory, then
    rename), so a reader (FileCertSource) never sees half a key and the key is never world-readable."""
    _write_atomic(path, data, PRIVATE_FILE_MODE)


def write_public(path: Path, data: bytes) -> None:
    """Atomic write, mode 0644 (certificates are public)."""
    _write_atomic(path, data, PUBLIC_FILE_MODE)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # The temp file is created with its final mode (O_EXCL: never someone else's file), synced, then
    # renamed over the target: a reader sees the old file or the whole new one, never a part.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
