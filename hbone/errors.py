"""HBONE errors. Each carries its answer: the HTTP status the server sends, or the response flag
the originating side reports (Envoy's `UF` upstream connection failure, `UT` timeout)."""

from __future__ import annotations


class HboneError(Exception):
    """Base of every error hbone/ raises on bad input or a failed tunnel."""

    status: int = 400

    def __init__(self, reason: str = ""):
        super().__init__(reason)
        self.reason = reason


class BadRequest(HboneError):
    """The CONNECT request is malformed (RFC 9113 §8.5, ztunnel `build_inbound_request`): 400."""

    status = 400


class BadAuthority(BadRequest):
    """`:authority` is not `ip:port` / `[v6]:port`: 400 (ztunnel answers 400 when unparseable)."""


class TunnelRefused(HboneError):
    """The peer answered the CONNECT with a non-200 status (401 deny, 503 no upstream, ...)."""

    flag = "UF"

    def __init__(self, status: int, reason: str = ""):
        super().__init__(reason or f"tunnel refused with status {status}")
        self.status = status


class ConnectFailed(HboneError):
    """Dialing the HBONE peer failed before any tunnel existed.

    ``reason`` is one of ``refused`` (TCP RST/unreachable), ``timeout`` (connect or handshake took
    longer than the connect timeout), ``tls`` (handshake failed), ``identity`` (the server's SPIFFE
    identity is not one we expect), ``protocol`` (the peer does not speak HTTP/2), ``closed``
    (the connection died while opening a stream). The server side answers such failures 503.
    """

    status = 503
    FLAGS = {"timeout": "UT"}

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.detail = detail

    @property
    def flag(self) -> str:
        # Envoy: UF = upstream connection failure (includes TLS errors), UT = upstream timeout.
        return self.FLAGS.get(self.reason, "UF")

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason
