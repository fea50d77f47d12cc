"""The one place a ``ProxyError`` becomes what the client sees: a CONNECT status (before the 200) or an
HTTP local reply (inside the tunnel), with its response flags and details for metrics and the log.

Local-reply bodies are Envoy's (``source/common/router/router.cc``, ``rbac_filter.cc``,
``fault_filter.cc``), so clients and tests that know Envoy's answers recognise them.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.errors import (AuthorizationDenied, NoHealthyUpstream, NoRoute, ProxyError, RetriesExhausted,
                          UpstreamConnectFailure, UpstreamOverflow, UpstreamReset, UpstreamTimeout)

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
    headers: tuple[tuple[bytes, bytes], ...] = ()   # beyond content-length/-type (JwtRejected's www-authenticate)


class JwtRejected(ProxyError):
    """A RequestAuthentication rejected the request's JWT (policy/authn: Envoy's jwt_authn filter as istiod
    configures it — a token that is present but invalid, or from an issuer no rule names). The answer is the
    filter's: 401 (403 "Audiences in Jwt are not allowed") with its text as the body and a ``www-authenticate``
    header, no response flag, details ``jwt_authn_access_denied{...}``; before authorization, as the filter
    comes before RBAC in the waypoint's chain."""
    hbone_status = 401
    http_status = 401
    flag = NO_FLAGS

    def __init__(self, result):
        super().__init__(result.body, detail=result.detail)
        self.http_status = result.status
        self.body_override = result.body.encode("latin-1")
        self.headers = tuple(result.response_headers)


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
    return LocalReply(getattr(err, "status_override", None) or err.http_status, body, flags_of(err), err.detail,
                      getattr(err, "headers", ()))


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
    """VirtualService fault abort (Envoy fault filter): the configured status, flag ``FI``.

    ``abort.grpcStatus``: Envoy's fault filter answers HTTP 200 with that gRPC status
    (``abortWithStatus``: ``sendLocalReply`` with the gRPC status and "fault filter abort"): a gRPC client sees
    ``grpc-status``; a non-gRPC request gets the plain local reply, HTTP 200 with the body."""
    flag = "FI"
    detail = "fault_filter_abort"

    def __init__(self, status: int | None, *, grpc_status: int | None = None):
        super().__init__(f"fault injected: abort {status if status is not None else f'grpc {grpc_status}'}")
        self.http_status = status if status is not None else 200
        self.hbone_status = self.http_status
        self.grpc_status = grpc_status
        self.body_override = b"fault filter abort"


# Envoy Grpc::Utility::httpToGrpcStatus (source/common/grpc/common.cc), after the gRPC spec's
# doc/http-grpc-status-mapping.md: the status a gRPC client sees for a local reply's HTTP status.
HTTP_TO_GRPC_STATUS: dict[int, int] = {
    400: 13,   # INTERNAL
    401: 16,   # UNAUTHENTICATED
    403: 7,    # PERMISSION_DENIED  (istio-semantics §1.6: RBAC deny → grpc-status 7)
    404: 12,   # UNIMPLEMENTED      (no route)
    429: 14,   # UNAVAILABLE
    502: 14,   # UNAVAILABLE
    503: 14,   # UNAVAILABLE
    504: 14,   # UNAVAILABLE        (Envoy maps a route timeout's 504 to UNAVAILABLE, not DEADLINE_EXCEEDED)
}
GRPC_UNKNOWN = 2


def http_to_grpc_status(status: int) -> int:
    return HTTP_TO_GRPC_STATUS.get(status, GRPC_UNKNOWN)


def is_grpc(headers) -> bool:
    """Envoy Grpc::Common::isGrpcRequestHeaders/hasGrpcContentType: ``application/grpc`` or
    ``application/grpc+<subtype>`` (``application/grpc-web`` is not gRPC)."""
    for name, value in headers:
        if name == b"content-type":
            v = value.split(b";", 1)[0].strip().lower()
            return v == b"application/grpc" or v.startswith(b"application/grpc+")
    return False


def _percent_encode(text: bytes) -> bytes:
    # gRPC spec (PROTOCOL-HTTP2.md): grpc-message is percent-encoded outside 0x20-0x7E and '%'.
    return b"".join(bytes([c]) if 0x20 <= c <= 0x7E and c != 0x25 else b"%%%02X" % c for c in text)


def grpc_local_reply(status: int, body: bytes, grpc_status: int | None = None) -> tuple[int, list]:
    """Envoy's local reply for a gRPC request (Utility::sendLocalReply, is_grpc): HTTP 200, a
    trailers-only response carrying ``grpc-status`` (from the HTTP status unless given) and the body
    as ``grpc-message``. Returns (http status, headers); headers[1] is grpc-status."""
    code = grpc_status if grpc_status is not None else http_to_grpc_status(status)
    fields = [(b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % code)]
    if body:
        fields.append((b"grpc-message", _percent_encode(body)))
    return 200, fields


class DestinationUnavailable(ProxyError):
    """A route destination that cannot be served (undefined subset/unknown host: 503 NC; an invalid
    Gateway API backendRef: 500)."""

    def __init__(self, status: int, flag: str, problem: str):
        super().__init__(problem, detail="cluster_not_found" if flag == "NC" else "invalid_backend")
        self.http_status = status
        self.flag = flag or NO_FLAGS


class UpgradeFailed(ProxyError):
    """An HTTP/1.1 upgrade to a protocol without an ``upgrade_configs`` entry (Istio configures only
    ``websocket``): Envoy's HCM answers 403 with an empty body, details ``upgrade_failed``, no flag."""
    http_status = 403
    hbone_status = 403
    flag = NO_FLAGS
    detail = "upgrade_failed"


class RequestOverflow(UpstreamOverflow):
    """A request over a cluster's circuit breakers (DestinationRule ``connectionPool``: http2MaxRequests, or
    http1MaxPendingRequests with maxConnections reached; proxy/pipeline/circuit.py). Envoy's connection pool
    fails the stream with ``Overflow``, which the router answers as an upstream reset with reason ``overflow``
    before any response: 503, flag ``UO``, details ``upstream_reset_before_response_started{overflow}``, body
    "upstream connect error or disconnect/reset before headers. reset reason: overflow" (the 81 bytes of
    Istio's circuit-breaking task), never retried ("we never retry if the reset reason is overflow")."""
    detail = "upstream_reset_before_response_started{overflow}"
    body_override = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


class PathRejected(ProxyError):
    """A request path Istio's ``pathNormalization: BASE`` refuses: a ``%00`` ("The request will always be rejected
    with HTTP code 400", security/normalization). Envoy's HCM answers it before any filter: 400 with an empty
    body, details ``path_normalization_failed``, no response flag (``maybeNormalizePath`` → Reject)."""
    http_status = 400
    hbone_status = 400
    flag = NO_FLAGS
    detail = "path_normalization_failed"


class BadUpstreamResponse(ProxyError):
    """The upstream's response was malformed (Envoy: 502, flag UPE)."""
    http_status = 502
    flag = "UPE"
    detail = "upstream_protocol_error"


__all__ = ["HTTP_TO_GRPC_STATUS", "http_to_grpc_status", "is_grpc", "grpc_local_reply", "LocalReply", "local_reply", "connect_status", "flags_of", "exhausted", "FaultAbort",
           "DestinationUnavailable", "BadUpstreamResponse", "PathRejected", "RequestOverflow", "UpgradeFailed", "NO_FLAGS"]
