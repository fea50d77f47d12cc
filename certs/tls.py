"""``ssl.SSLContext`` builders for HBONE's mutual TLS, and the SPIFFE checks after the handshake.

Settings mirror ztunnel (``src/tls/lib.rs``, ``src/tls/certificate.rs``, ``src/tls/workload.rs``):

- TLS 1.3 only; TLS 1.2 only when asked (ztunnel: env ``TLS12_ENABLED=true``);
- ALPN ``h2`` on both sides; no SNI (ztunnel: ``enable_sni = false``), no hostname check: the peer is
  identified by its SPIFFE URI SAN, never by a DNS name;
- the server requires a client certificate (``WebPkiClientVerifier``), chained to the trust bundle;
- no session resumption (ztunnel client: ``Resumption::disabled()``), so the server sends no tickets.

Python's ``ssl`` has no certificate-verify callback, so the SPIFFE rules that ztunnel runs inside
the handshake (``TrustDomainVerifier``, ``IdentityVerifier``) run right after it: call
``peer_identity`` (server) or ``check_server_identity`` (client) before using the connection.
OpenSSL itself still checks chain, validity dates and key purpose during the handshake.

Cipher suites: ztunnel offers only TLS13_AES_256_GCM_SHA384 and TLS13_AES_128_GCM_SHA256. Python's
``ssl`` cannot set TLS 1.3 suites (no ``SSL_CTX_set_ciphersuites`` binding), so OpenSSL's default
1.3 list applies (it adds TLS_CHACHA20_POLY1305_SHA256; every suite in it is an AEAD with a
256/128-bit key). For TLS 1.2 we set ztunnel's ECDHE + AES-GCM list.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from pathlib import Path
from typing import Collection, Iterator

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs._pem import single_spiffe_id
from certs.bundle import CertBundle
from certs.errors import PeerIdentityError
from certs.spiffe import SpiffeId

ALPN_PROTOCOLS = ["h2"]  # ztunnel: `alpn_protocols = vec![b"h2".into()]`, server and client
# ztunnel's TLS 1.2 list (src/tls/lib.rs provider(), only when TLS12_ENABLED): ECDHE with AES-GCM.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-RSA-AES128-GCM-SHA256"
)
SERVER_SESSION_TICKETS = 0  # ztunnel clients never resume, so TLS 1.3 tickets would be wasted bytes per connection


# ------------------------------------------------------------------ contexts


def server_context(bundle: CertBundle, *, tls12: bool = False) -> ssl.SSLContext:
    """The 15008 listener's context: our certificate, client certificate REQUIRED and verified to
    the trust bundle, ALPN h2. After the handshake call ``peer_identity(ssl_object, td)``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, bundle, tls12)
    ctx.num_tickets = SERVER_SESSION_TICKETS
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 tickets likewise
    return ctx


def client_context(bundle: CertBundle, *, tls12: bool = False) -> ssl.SSLContext:
    """The originating side's context: presents our certificate, verifies the server's chain to the
    trust bundle; no hostname check (identity is checked by ``check_server_identity`` after the
    handshake). Connect with ``server_hostname=None`` for an IP, or ``""`` with asyncio, to send no SNI."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # must come before verify_mode is set; we check SPIFFE ids, not names
    _common(ctx, bundle, tls12)
    return ctx


def _common(ctx: ssl.SSLContext, bundle: CertBundle, tls12: bool) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if tls12 else ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    # RFC 5280 conformance checks on the peer chain (what Python 3.13's default context turns on).
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=bundle.trust_pem.decode("ascii"))
    with _pem_paths(bundle.chain_pem, bundle.key_pem) as (cert_path, key_path):
        ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(ALPN_PROTOCOLS)
    if tls12:
        ctx.set_ciphers(TLS12_CIPHERS)
        ctx.options |= ssl.OP_NO_RENEGOTIATION


@contextlib.contextmanager
def _pem_paths(chain_pem: bytes, key_pem: bytes) -> Iterator[tuple[str, str]]:
    """Paths ``load_cert_chain`` can read (it takes no in-memory data). On Linux: anonymous memory
    files (memfd), so the key never touches a disk. Elsewhere: a private 0700 temp dir, removed at once."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds: list[int] = []
        try:
            for name, data in (("hbone-cert", chain_pem), ("hbone-key", key_pem)):
                fd = os.memfd_create(name, os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="hbone-certs-") as d:  # created 0700 by mkdtemp
        cert_path, key_path = Path(d, "cert.pem"), Path(d, "key.pem")
        for path, data in ((cert_path, chain_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        yield str(cert_path), str(key_path)


# ------------------------------------------------------------------ after the handshake

# PERF NOTE: a workload presents the same certificate on every connection for the certificate's life (Istio's
# default 24 h), and OpenSSL checks this connection's chain and validity dates in the handshake before
# peer_identity runs; what peer_identity adds (parse the DER, key usage, the single SPIFFE URI SAN, the trust
# domain) is a pure function of the certificate's bytes, this side's role and the trust domain, so a success is
# remembered under those three (a refusal is worked out again each time: it ends its connection). Measured
# (/tmp/s8/hs.py, in-memory handshakes, 500 rounds): peer_identity 33 -> 2.9 us per connection (getpeercert and the key hash are what remains); the node
# proxy's new-connection path (benchmarks workers scenario, ours-node x1): see README "Figures: the eighth round".
PEER_IDENTITY_MEMO_MAX = 4096   # distinct (certificate, role, trust domain) verdicts kept; cleared when full,
#                                 so a peer set larger than this costs the parse again, never unbounded memory
_identity_memo: dict[tuple[bytes, bool, str], SpiffeId] = {}


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str) -> SpiffeId:
    """The peer's SPIFFE id, after the handshake (asyncio: ``transport.get_extra_info("ssl_object")``).

    Rules (ztunnel ``TrustDomainVerifier`` plus the SVID profile): the peer's leaf must carry exactly
    one ``spiffe://`` URI SAN, of Istio's shape, whose trust domain equals ``trust_domain``; its key
    usage must allow this side's role. Anything else raises PeerIdentityError with a reason code.
    """
    der = ssl_object.getpeercert(binary_form=True)
    server_side = bool(getattr(ssl_object, "server_side", False))
    key = (der, server_side, trust_domain)
    known = _identity_memo.get(key)
    if known is not None:
        return known
    if not der:
        if server_side:
            raise PeerIdentityError("no_client_cert", "the client presented no certificate (a client certificate is required)")
        raise PeerIdentityError("handshake", "the server presented no certificate")
    try:
        leaf = x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise PeerIdentityError("handshake", f"the peer certificate cannot be parsed: {err}") from None
    _check_usage(leaf, server_side)
    identity = single_spiffe_id(leaf)  # raises no_spiffe_san / multiple_spiffe_san
    if identity.trust_domain != trust_domain:
        # ztunnel workload.rs verify_trust_domain → SanTrustDomainError; the connection is refused.
        raise PeerIdentityError(
            "wrong_trust_domain", f"peer identity {identity} is not in our trust domain {trust_domain!r}"
        )
    if len(_identity_memo) >= PEER_IDENTITY_MEMO_MAX:
        _identity_memo.clear()
    _identity_memo[key] = identity
    return identity


def check_server_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: Collection[SpiffeId], trust_domain: str) -> SpiffeId:
    """Client side: the server's identity, which must be one of ``expected`` (ztunnel
    ``IdentityVerifier::verify_full_san``: the destination workload's identity or the service's
    ``subjectAltNames``). An empty ``expected`` refuses every server: fail closed."""
    identity = peer_identity(ssl_object, trust_domain)
    if identity not in expected:
        shown = ", ".join(sorted(str(e) for e in expected)) or "(none)"
        raise PeerIdentityError("unexpected_identity", f"server identity {identity} is not one of the expected identities: {shown}")
    return identity


def _check_usage(leaf: x509.Certificate, server_side: bool) -> None:
    """OpenSSL's purpose check already refuses these during the handshake; repeated here so the
    rule holds whatever the context's settings, and so the reason code is ours."""
    role, wanted = ("client", ExtendedKeyUsageOID.CLIENT_AUTH) if server_side else ("server", ExtendedKeyUsageOID.SERVER_AUTH)
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None  # RFC 5280 §4.2.1.12: no EKU extension means no restriction
    if eku is not None and wanted not in eku and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in eku:
        raise PeerIdentityError("bad_key_usage", f"the peer certificate may not be used as a TLS {role} (extendedKeyUsage lacks {wanted._name})")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.digital_signature:
        # TLS 1.3 authenticates by signature (CertificateVerify, RFC 8446 §4.4.3).
        raise PeerIdentityError("bad_key_usage", "the peer certificate's keyUsage lacks digitalSignature")


# ------------------------------------------------------------------ error classification

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) → our reasons. Seen on the side that verifies.
_VERIFY_CODES: dict[int, str] = {
    2: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT
    7: "unknown_ca",  # CERT_SIGNATURE_FAILURE: signed by a different key with the same issuer name
    9: "not_yet_valid",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
    18: "unknown_ca",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown_ca",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    26: "bad_key_usage",  # INVALID_PURPOSE: e.g. a serverAuth-only certificate presented by a client
    27: "unknown_ca",  # CERT_UNTRUSTED
    28: "unknown_ca",  # CERT_REJECTED
    32: "bad_key_usage",  # KEYUSAGE_NO_CERTSIGN
    # VERIFY_X509_STRICT: an empty subject and no SAN at all is a certificate with no identity
    84: "no_spiffe_san",  # SUBJECT_NAME_EMPTY
    87: "no_spiffe_san",  # EMPTY_SUBJECT_ALT_NAME
}

# OpenSSL reason strings (ssl.SSLError.reason) → our reasons. The alerts are what the *other* side
# sees when its certificate was refused. OpenSSL sends "certificate expired" for both expired and
# not-yet-valid (ssl_verify_alarm_type), so the refused side cannot tell those two apart.
_SSL_REASONS: dict[str, str] = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",  # server: the client sent an empty Certificate
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_client_cert",  # client: RFC 8446 §4.4.2.4 certificate_required
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "bad_key_usage",
    "UNSUPPORTED_CERTIFICATE_PURPOSE": "bad_key_usage",
}

_MAX_CAUSE_DEPTH = 8  # how far down __cause__/__context__ to look for the TLS error; wrappers are shallow


def classify_handshake_error(exc: BaseException) -> str:
    """Map a handshake failure (or a wrapper around one) to a PeerIdentityError reason code, for
    metrics and access logs. Unknown failures are ``"handshake"``."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    for _ in range(_MAX_CAUSE_DEPTH):
        if cur is None or id(cur) in seen:
            break
        seen.add(id(cur))
        if isinstance(cur, PeerIdentityError):
            return cur.reason
        if isinstance(cur, ssl.SSLCertVerificationError):
            code = getattr(cur, "verify_code", None)
            if code in _VERIFY_CODES:
                return _VERIFY_CODES[code]
        if isinstance(cur, ssl.SSLError):
            reason = getattr(cur, "reason", None)
            if reason in _SSL_REASONS:
                return _SSL_REASONS[reason]
            return "handshake"
        cur = cur.__cause__ or cur.__context__
    return "handshake"
