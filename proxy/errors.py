"""Errors that carry their answer.

One place in the pipeline (``proxy.pipeline``) turns a ``ProxyError`` into a status, a reset, a metric
and a log line. Each subclass says what the client sees on each path:

* ``hbone_status``: the answer to the CONNECT (ztunnel: 400 malformed, 401 policy deny, 503 unknown
  destination or upstream connect failure);
* ``http_status``: the local reply to an HTTP request inside a tunnel (Envoy's);
* ``flag``: Envoy's ``%RESPONSE_FLAGS%`` short code (``-`` when none), reference/istio-semantics.md §4.
"""

from __future__ import annotations


class ProxyError(Exception):
    hbone_status = 503
    http_status = 503
    flag = "-"
    detail = "proxy_error"   # Envoy-style %RESPONSE_CODE_DETAILS%

    def __init__(self, message: str = "", *, detail: str | None = None):
        super().__init__(message or self.__class__.__doc__ or self.__class__.__name__)
        if detail is not None:
            self.detail = detail


class BadRequest(ProxyError):
    """Malformed request."""
    hbone_status = 400
    http_status = 400
    flag = "DPE"   # DownstreamProtocolError
    detail = "bad_request"


class UnknownDestination(ProxyError):
    """No chain matches the tunnel's destination (not a service VIP or pod in this proxy's scope)."""
    hbone_status = 503
    http_status = 503
    flag = "NR"    # Envoy: "no filter chain for TCP"
    detail = "filter_chain_not_found"


class AuthorizationDenied(ProxyError):
    """An AuthorizationPolicy denied it.

    Istio: HTTP 403 ``RBAC: access denied`` with NO response flag (the reason goes in
    %RESPONSE_CODE_DETAILS%); ztunnel answers the CONNECT 401 and reports flag ``DENY`` in its metrics.
    """
    hbone_status = 401
    http_status = 403
    flag = "-"
    detail = "rbac_access_denied_matched_policy[none]"
    body = b"RBAC: access denied"


class NoRoute(ProxyError):
    """No route matched the request."""
    hbone_status = 503
    http_status = 404
    flag = "NR"
    detail = "route_not_found"


class NoHealthyUpstream(ProxyError):
    """The chosen cluster has no healthy endpoint."""
    hbone_status = 503
    http_status = 503
    flag = "UH"
    detail = "no_healthy_upstream"


class UpstreamConnectFailure(ProxyError):
    """Connecting to the upstream (TCP or HBONE) failed."""
    hbone_status = 503
    http_status = 503
    flag = "UF"
    detail = "upstream_reset_before_response_started{connection_failure}"


class RetriesExhausted(ProxyError):
    """Every attempt the retry policy allowed failed."""
    hbone_status = 503
    http_status = 503
    flag = "URX"
    detail = "upstream_reset_before_response_started{retries_exhausted}"


class UpstreamTimeout(ProxyError):
    """The route timeout expired before the upstream answered."""
    hbone_status = 504
    http_status = 504
    flag = "UT"
    detail = "upstream_response_timeout"


class UpstreamReset(ProxyError):
    """The upstream reset the stream or closed the connection."""
    hbone_status = 503
    http_status = 503
    flag = "UC"
    detail = "upstream_reset_before_response_started{connection_termination}"


class UpstreamOverflow(ProxyError):
    """A DestinationRule connectionPool limit was reached (circuit breaker)."""
    hbone_status = 503
    http_status = 503
    flag = "UO"
    detail = "upstream_overflow"


class SelfCall(ProxyError):
    """A tunnel to one of the proxy's own ports (ztunnel: 15001/15006/15008 are illegal targets)."""
    hbone_status = 503
    http_status = 503
    flag = "NR"
    detail = "self_call"


class IpMismatch(ProxyError):
    """ztunnel validate_destination: the :authority IP is not a workload this node proxy serves."""
    hbone_status = 400
    http_status = 400
    flag = "-"
    detail = "ip_mismatch"
