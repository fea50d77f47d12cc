"""The one place a ``ProxyError`` becomes what the client sees: a CONNECT status (before the 200) or an
HTTP local reply (inside the tunnel), with its response flags and details for metrics and the log.

Local-reply bodies are Envoy's (``source/common/router/router.cc``, ``rbac_filter.cc``,
``fault_filter.cc``), so clients and tests that know Envoy's answers recognise them.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import (AuthorizationDenied, NoHealthyUpstream, NoRoute, ProxyError, RetriesExhausted,
                          UpstreamConnectFailure, UpstreamReset, UpstreamTimeout)

NO_FLAGS = "-"

# Envoy router's local-reply bodies.
_BODIES: dict[type, bytes] = {
    AuthorizationDenied: b"RBAC: access denied",                       # rbac_filter.cc
    NoHealthyUpstream: b"no healthy upstream",                          # router.cc
    UpstreamConnectFailure: (b"upstream connect error or disconnect/reset before headers. "
                             b"reset reason: connection failure"),
    RetriesExhausted: (b"upstream connect error or disconnect/reset before headers. "
                       b"retried and the latest reset reason: connection failure"),
    UpstreamReset: (b"upstream connect error or disconnect/reset before headers. "
                    b"reset reason: connection termination"),
    UpstreamTimeout: b"upstream request timeout",
    NoRoute: b"",                                                       # Envoy: 404 with no body
}


@dataclass(frozen=True)
class LocalReply:
    status: int
    body: bytes
    flags: tuple[str, ...]
    detail: str


def flags_of(err: ProxyError) -> tuple[str, ...]:
    """Envoy %RESPONSE_FLAGS% for this error (several when retries were exhausted: ``UF,URX``)."""
    extra = getattr(err, "flags", None)
    if extra:
        return tuple(extra)
    return () if err.flag == NO_FLAGS else (err.flag,)


def connect_status(err: ProxyError) -> int:
    """The CONNECT answer (ztunnel: 400 malformed, 401 policy deny, 503 otherwise)."""
    return err.hbone_status


def local_reply(err: ProxyError) -> LocalReply:
    body = b""
    for cls in type(err).__mro__:
        if cls in _BODIES:
            body = _BODIES[cls]
            break
    body = getattr(err, "body_override", None) or body
    if isinstance(err, RetriesExhausted) or "URX" in flags_of(err):
        body = _BODIES[RetriesExhausted]
    return LocalReply(getattr(err, "status_override", None) or err.http_status, body, flags_of(err), err.detail)


def exhausted(last: ProxyError, attempts: int) -> ProxyError:
    """The error after the last allowed attempt failed: the last failure's flag, plus ``URX`` when
    there were retries (Envoy: "UpstreamRetryLimitExceeded")."""
    if attempts <= 1:
        return last
    err = RetriesExhausted(f"{attempts} attempts failed; last: {last}", detail=last.detail)
    err.flags = tuple(f for f in flags_of(last) if f != "URX") + ("URX",)  # type: ignore[attr-defined]
    err.status_override = last.http_status  # type: ignore[attr-defined]
    return err


class FaultAbort(ProxyError):
    """VirtualService fault abort (Envoy fault filter): the configured status, flag ``FI``."""
    flag = "FI"
    detail = "fault_filter_abort"

    def __init__(self, status: int):
        super().__init__(f"fault injected: abort {status}")
        self.http_status = status
        self.hbone_status = status
        self.body_override = b"fault filter abort"


class DestinationUnavailable(ProxyError):
    """A route destination that cannot be served (undefined subset/unknown host: 503 NC; an invalid
    Gateway API backendRef: 500)."""

    def __init__(self, status: int, flag: str, problem: str):
        super().__init__(problem, detail="cluster_not_found" if flag == "NC" else "invalid_backend")
        self.http_status = status
        self.flag = flag or NO_FLAGS


class BadUpstreamResponse(ProxyError):
    """The upstream's response was malformed (Envoy: 502, flag UPE)."""
    http_status = 502
    flag = "UPE"
    detail = "upstream_protocol_error"


__all__ = ["LocalReply", "local_reply", "connect_status", "flags_of", "exhausted", "FaultAbort",
           "DestinationUnavailable", "BadUpstreamResponse", "NO_FLAGS"]
