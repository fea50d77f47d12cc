"""Where a proxy's certificates come from (DESIGN §4): PEM files, or minted from a local mesh CA.

* ``--cert/--key/--ca``: one ``FileCertSource``; the identity is read from the certificate (ztunnel and
  Istio's SDS file mode do the same — the file, not a flag, says who we are).
* ``--ca-dir``: a ``MintingCertSource`` per identity, minted from the mesh CA made by
  ``hbone-proxy certs init``. Node mode: one per local workload's SPIFFE id (ztunnel presents the
  destination pod's certificate, so each pod's listener gets its own). Waypoint: its own workload,
  found in the inventory by its HBONE address IP (or ``--identity NS/SA``).

Rotation is ``certs.rotation.watch``'s job (half-life, as ztunnel's ``refresh_at``); a rotated source
serves new connections with the new certificate, live connections keep theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

from certs.ca import WORKLOAD_TTL, MeshCA
from certs.errors import CertError
from certs.rotation import CertSource, FileCertSource, MintingCertSource
from certs.spiffe import SpiffeId
from policy.inventory import Inventory, Workload


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class Identities:
    """The certificates one proxy process presents, by SPIFFE id.

    ``for_identity(id)`` returns the source for that identity, minting one on first use when a CA is
    available (a node proxy learns of a new local pod on reload). With files only, the one identity
    the files carry is all there is; asking for another raises ``CertError``.
    """

    ca: MeshCA | None = None
    file_source: FileCertSource | None = None
    ttl: timedelta = WORKLOAD_TTL
    clock: Callable[[], datetime] = _utcnow
    tls12: bool = False
    sources: dict[SpiffeId, CertSource] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, *, cert: str | None, key: str | None, ca: str | None, ca_dir: str | None,
                      clock: Callable[[], datetime] = _utcnow, ttl: timedelta = WORKLOAD_TTL) -> "Identities":
        """Raises ``CertError`` with a one-line reason (missing file, key mismatch, not a CA...)."""
        if cert or key or ca:
            missing = [flag for flag, v in (("--cert", cert), ("--key", key), ("--ca", ca)) if not v]
            if missing:
                raise CertError(f"--cert, --key and --ca go together; missing {', '.join(missing)}")
            src = FileCertSource(cert, key, ca)  # type: ignore[arg-type]
            ids = cls(file_source=src, clock=clock)
            ids.sources[src.identity] = src
            return ids
        if ca_dir:
            return cls(ca=MeshCA.load(ca_dir), clock=clock, ttl=ttl)
        raise CertError("no certificates: give --cert/--key/--ca, or --ca-dir (a CA made by `hbone-proxy certs init`)")

    @property
    def trust_domain(self) -> str:
        if self.file_source is not None:
            return self.file_source.trust_domain
        assert self.ca is not None
        return self.ca.trust_domain

    @property
    def file_identity(self) -> SpiffeId | None:
        return self.file_source.identity if self.file_source is not None else None

    def can_serve(self, identity: SpiffeId) -> bool:
        return identity in self.sources or self.ca is not None

    def for_identity(self, identity: SpiffeId) -> CertSource:
        src = self.sources.get(identity)
        if src is not None:
            return src
        if self.ca is None:
            raise CertError(f"no certificate for {identity}: the --cert file carries {self.file_identity}")
        src = MintingCertSource(self.ca, identity, self.ttl, now=self.clock())
        self.sources[identity] = src
        return src

    def for_workload(self, workload: Workload) -> CertSource:
        return self.for_identity(workload_identity(workload))

    def all(self) -> list[CertSource]:
        return list(self.sources.values())

    def describe(self) -> list[dict]:
        """For /config_dump: identity, validity and rotations of every certificate held (no keys)."""
        out = []
        for ident, src in sorted(self.sources.items()):
            b = src.current()
            out.append({"identity": str(ident), "not_before": b.not_before.isoformat(),
                        "not_after": b.not_after.isoformat(), "refresh_at": b.refresh_at().isoformat(),
                        "serial_number": serial_of(b),
                        "rotations": src.rotations, "source": "file" if src is self.file_source else "ca",
                        **({"last_error": str(src.last_error)} if src.last_error else {})})
        return out

    def __repr__(self) -> str:
        kind = "files" if self.file_source is not None else "ca"
        return f"<Identities {kind} identities={len(self.sources)}>"


def serial_of(bundle) -> str:
    """The leaf certificate's serial number in hex, as ztunnel's config dump shows it (``serialNumber``)
    and as a client sees it in the handshake."""
    from cryptography import x509
    return format(x509.load_pem_x509_certificate(bundle.chain_pem).serial_number, "x")


def workload_identity(workload: Workload) -> SpiffeId:
    return SpiffeId(workload.trust_domain, workload.namespace, workload.service_account)


def waypoint_identity(inventory: Inventory, *, hbone_ip: str | None, identity_flag: str | None,
                      trust_domain: str) -> tuple[SpiffeId, Workload | None]:
    """Who a waypoint minting from a CA is: ``--identity NS/SA``, else the workload whose IP is its
    HBONE address. Raises ``CertError`` saying what to do when neither works."""
    wl = inventory.workload_by_ip.get(hbone_ip) if hbone_ip else None
    if identity_flag:
        ns, slash, sa = identity_flag.partition("/")
        if not slash or not ns or not sa:
            raise CertError(f"--identity {identity_flag!r}: expected NS/SA")
        return SpiffeId(trust_domain, ns, sa), wl
    if wl is None:
        raise CertError(f"no workload in the inventory has the waypoint's HBONE address {hbone_ip}; "
                        f"set --hbone-addr to the waypoint pod's IP, or give --identity NS/SA")
    return workload_identity(wl), wl


__all__ = ["Identities", "serial_of", "workload_identity", "waypoint_identity"]
