"""certs/: SPIFFE identities, a small mesh CA and the TLS contexts HBONE uses. A library: never imports proxy/.

Public API (see each module): ``SpiffeId``, ``MeshCA``, ``IssuedCert``, ``CertBundle``,
``server_context``, ``client_context``, ``peer_identity``, ``check_server_identity``,
``classify_handshake_error``, ``CertSource`` / ``FileCertSource`` / ``MintingCertSource``;
errors ``CertError``, ``PeerIdentityError``, ``SpiffeError``. Test-only bad certificates: ``certs.testing``.
"""

from certs.bundle import CertBundle
from certs.ca import IssuedCert, MeshCA
from certs.errors import CertError, PeerIdentityError
from certs.rotation import CertSource, FileCertSource, MintingCertSource
from certs.spiffe import SpiffeError, SpiffeId
from certs.tls import check_server_identity, classify_handshake_error, client_context, peer_identity, server_context

__all__ = [
    "CertBundle",
    "CertError",
    "CertSource",
    "FileCertSource",
    "IssuedCert",
    "MeshCA",
    "MintingCertSource",
    "PeerIdentityError",
    "SpiffeError",
    "SpiffeId",
    "check_server_identity",
    "classify_handshake_error",
    "client_context",
    "peer_identity",
    "server_context",
]
