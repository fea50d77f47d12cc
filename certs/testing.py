"""Deliberately wrong certificates, for tests only (ours and other areas').

A peer must refuse each of these; tests build them here so every area tests the same bad
certificates, signed by a real MeshCA. Production code never imports this module.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.ca import WORKLOAD_TTL, IssuedCert, MeshCA
from certs.spiffe import SpiffeId

SERVER_AUTH_ONLY = (ExtendedKeyUsageOID.SERVER_AUTH,)
CLIENT_AUTH_ONLY = (ExtendedKeyUsageOID.CLIENT_AUTH,)
BOTH_AUTH = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def issue_custom(
    ca: MeshCA,
    *,
    spiffe: SpiffeId,
    now: datetime,
    ttl: timedelta = WORKLOAD_TTL,
    uris: Sequence[str] | None = None,
    eku: Iterable[x509.ObjectIdentifier] | None = BOTH_AUTH,
    not_before: datetime | None = None,
    dns_names: Sequence[str] = (),
) -> IssuedCert:
    """Like ``ca.issue`` but without its checks: any trust domain, any URI SANs (``uris``; default
    ``[str(spiffe)]``; ``[]`` for none), any EKU (``None`` omits the extension), and any validity
    window (``not_before`` defaults to ``now``; the root's expiry is not enforced), plus optional
    DNS SANs (``dns_names``).

    ``spiffe`` is only recorded in the returned IssuedCert; what the certificate says is ``uris``.
    """
    return ca._issue(
        uris=[str(spiffe)] if uris is None else list(uris),
        spiffe=spiffe,
        now=now,
        ttl=ttl,
        eku=eku,
        not_before=not_before,
        clamp_to_root=False,
        dns_names=dns_names,
    )


def expired(ca: MeshCA, spiffe: SpiffeId, *, now: datetime) -> IssuedCert:
    """Valid for one hour, ending one hour before ``now``."""
    return issue_custom(ca, spiffe=spiffe, now=now, not_before=now - timedelta(hours=2), ttl=timedelta(hours=1))


def not_yet_valid(ca: MeshCA, spiffe: SpiffeId, *, now: datetime) -> IssuedCert:
    """Valid from one hour after ``now``."""
    return issue_custom(ca, spiffe=spiffe, now=now, not_before=now + timedelta(hours=1))
