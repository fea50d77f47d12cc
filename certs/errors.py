"""The errors certs/ raises. Every one is a ``CertError``; a failed peer check also says *why*
with a short, stable reason code, so the proxy can count it in a metric and name it in a log line."""

from __future__ import annotations

# The reason codes a PeerIdentityError (or classify_handshake_error) can carry. Stable strings:
# they become metric label values and access-log fields.
PEER_REASONS: frozenset[str] = frozenset(
    {
        "no_client_cert",  # the client sent no certificate (ztunnel: client cert is required)
        "unknown_ca",  # the chain does not verify to our trust bundle
        "expired",  # a certificate in the chain is past notAfter
        "not_yet_valid",  # a certificate in the chain is before notBefore
        "wrong_trust_domain",  # the SPIFFE id's trust domain is not ours (ztunnel: SanTrustDomainError)
        "no_spiffe_san",  # the leaf has no (valid) spiffe:// URI SAN
        "multiple_spiffe_san",  # the leaf has more than one spiffe:// URI SAN: ambiguous identity
        "bad_key_usage",  # KU/EKU do not allow this use (e.g. a serverAuth-only cert used as a client)
        "unexpected_identity",  # client side: the server is not one of the identities we expected
        "handshake",  # any other TLS failure (protocol, cipher, ALPN, reset mid-handshake, ...)
    }
)


class CertError(Exception):
    """Base for everything certs/ raises. ``str(err)`` is a complete, user-facing sentence."""


class PeerIdentityError(CertError):
    """The peer's certificate was refused. ``reason`` is one of ``PEER_REASONS``."""

    def __init__(self, reason: str, message: str):
        if reason not in PEER_REASONS:
            raise ValueError(f"unknown peer identity reason {reason!r}")
        self.reason = reason
        super().__init__(message)

    def __repr__(self) -> str:
        return f"PeerIdentityError({self.reason!r}, {str(self)!r})"
