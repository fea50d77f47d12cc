"""SPIFFE identities in Istio's one shape: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

Parsing follows ztunnel (``src/identity/manager.rs``, ``impl FromStr for Identity``): the string must
start with ``spiffe://``; what follows, split on ``/``, must be exactly five parts, and parts 1 and 3
must be ``ns`` and ``sa``. So ``spiffe://td/ns//sa/`` (empty namespace and service account) is
accepted, while a trailing ``/``, extra segments or another layout are refused.

On top of ztunnel's shape we apply the SPIFFE ID standard's character rules (SPIFFE-ID.md §2.1, §2.2),
because every id we accept may end up in a certificate's URI SAN (IA5String, ASCII only) and is
compared byte for byte by AuthorizationPolicy ``principals``:

- the trust domain is non-empty, at most 255 characters, of ``a-z 0-9 . - _`` (lowercase only);
- a namespace / service account uses ``a-z A-Z 0-9 . - _`` and is not ``.`` or ``..``
  (empty is allowed, as ztunnel does);
- the whole id is at most 2048 bytes (SPIFFE-ID.md §2.3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from certs.errors import CertError

SCHEME_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"  # ztunnel DEFAULT_TRUST_DOMAIN, Istio's default meshConfig.trustDomain

MAX_TRUST_DOMAIN_CHARS = 255  # SPIFFE-ID.md §2.1: "Trust domain names ... MUST NOT exceed 255 bytes"
MAX_SPIFFE_ID_BYTES = 2048  # SPIFFE-ID.md §2.3: "URIs with a total length exceeding 2048 bytes ... SHOULD NOT be accepted"

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]*")


class SpiffeError(CertError, ValueError):
    """A string that is not a SPIFFE id of Istio's shape, or an invalid part of one."""


def _check_trust_domain(td: object) -> None:
    if not isinstance(td, str):
        raise SpiffeError(f"trust domain must be a string, not {type(td).__name__}")
    if not td:
        raise SpiffeError("trust domain is empty")
    if len(td) > MAX_TRUST_DOMAIN_CHARS:
        raise SpiffeError(f"trust domain is longer than {MAX_TRUST_DOMAIN_CHARS} characters")
    if not _TRUST_DOMAIN_RE.fullmatch(td):
        raise SpiffeError(f"trust domain {td!r} may only contain a-z, 0-9, '.', '-' and '_'")


def _check_segment(what: str, value: object) -> None:
    if not isinstance(value, str):
        raise SpiffeError(f"{what} must be a string, not {type(value).__name__}")
    if not _SEGMENT_RE.fullmatch(value):
        raise SpiffeError(f"{what} {value!r} may only contain letters, digits, '.', '-' and '_'")
    if value in (".", ".."):
        # SPIFFE-ID.md §2.2: "Path segments MUST NOT be dot segments"
        raise SpiffeError(f"{what} must not be {value!r}")


def check_trust_domain(td: str) -> str:
    """Validate a trust domain name (e.g. from a flag); returns it or raises SpiffeError."""
    _check_trust_domain(td)
    return td


@dataclass(frozen=True, order=True)
class SpiffeId:
    """An Istio workload identity. Construct with ``SpiffeId(td, ns, sa)`` or ``SpiffeId.parse(uri)``;
    both validate, so ``SpiffeId.parse(str(x)) == x`` always holds."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        _check_segment("namespace", self.namespace)
        _check_segment("service account", self.service_account)
        if len(str(self).encode()) > MAX_SPIFFE_ID_BYTES:
            raise SpiffeError(f"SPIFFE id is longer than {MAX_SPIFFE_ID_BYTES} bytes")

    @classmethod
    def parse(cls, uri: str) -> "SpiffeId":
        if not isinstance(uri, str):
            raise SpiffeError(f"SPIFFE id must be a string, not {type(uri).__name__}")
        shown = uri if len(uri) <= 120 else uri[:117] + "..."
        if len(uri) > MAX_SPIFFE_ID_BYTES:
            raise SpiffeError(f"SPIFFE id {shown!r} is longer than {MAX_SPIFFE_ID_BYTES} bytes")
        # ztunnel: `if !s.starts_with(URI_PREFIX) { return Err(...) }` — the scheme is case-sensitive there.
        if not uri.startswith(SCHEME_PREFIX):
            raise SpiffeError(f"{shown!r} is not a SPIFFE id: it must start with {SCHEME_PREFIX!r}")
        parts = uri[len(SCHEME_PREFIX) :].split("/")
        # ztunnel: `if split.len() != 5 ...; if split[1] != NAMESPACE || split[3] != SERVICE_ACCOUNT ...`
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise SpiffeError(
                f"{shown!r} is not a SPIFFE id of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        try:
            return cls(parts[0], parts[2], parts[4])
        except SpiffeError as err:
            raise SpiffeError(f"{shown!r}: {err}") from None

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.principal}"

    @property
    def principal(self) -> str:
        """The form AuthorizationPolicy ``source.principals`` match: ``td/ns/N/sa/S`` (no scheme)."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
