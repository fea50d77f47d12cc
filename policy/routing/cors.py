"""What Envoy's CORS filter (envoy.filters.http.cors, ``cors_filter.cc``) does with one request on a route
that has a VirtualService ``corsPolicy`` (``policy.routing.model.CorsPolicy``): answer a preflight itself,
or let the request through and set CORS headers on the upstream's answer, or nothing.

Pure: the request's method and headers in, a ``CorsAnswer`` (or None) out. Header names are lowercase
bytes, as both of the waypoint's codecs hand them over; values are bytes (matched in the waypoint's form,
latin-1 decoded, as every other StringMatch).

Envoy's rules (``CorsFilter::decodeHeaders`` / ``encodeHeaders``):

- no ``Origin``, or an empty one: nothing at all.
- the origin is allowed when one ``allow_origin_string_match`` matches it — or matches the literal ``*``
  (``allow_origin->match("*") || allow_origin->match(origin)``), so ``exact: "*"`` allows every origin.
- a preflight is ``OPTIONS`` with a non-empty ``Access-Control-Request-Method``. Envoy answers it itself,
  200 with no body (details ``cors_response``), unless the origin is not allowed and
  ``forward_not_matching_preflights`` (Istio's default, FORWARD): then it goes upstream untouched and the
  answer gets nothing added. The answer carries ``access-control-allow-origin: <the Origin>`` only when the
  origin is allowed; ``-allow-credentials: true`` when set; ``-allow-methods`` (``*`` echoes the request's
  method); ``-allow-headers`` (``*`` echoes ``Access-Control-Request-Headers``); ``-max-age``. So under
  IGNORE a preflight from another origin is answered 200 *without* ``access-control-allow-origin`` (the
  browser then fails it) but with the other headers. ``access-control-allow-private-network`` needs Envoy's
  ``allow_private_network_access``, which istiod never sets (VirtualService has no such field): never sent.
- any other request with an allowed origin goes upstream, and the answer gets
  ``access-control-allow-origin: <the Origin>``, ``-allow-credentials: true`` when set and
  ``-expose-headers`` when set, each replacing what the upstream sent (``setInline``). An origin that is
  not allowed adds nothing ("Origin did not match. Do not modify the response headers.").
  ``access-control-expose-headers`` goes on actual responses only, not on the preflight answer (Envoy
  PR #3852, "Set the access-control-expose-headers response header on the actual CORS request (not
  preflight)"; the Fetch standard: "a CORS request that is not a CORS-preflight request").

Envoy reads ``Origin`` and the two request headers as inline headers, which fold repeated fields into one
comma-joined value; so does ``_header`` here.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from .model import CorsPolicy

ORIGIN = b"origin"
REQUEST_METHOD = b"access-control-request-method"
REQUEST_HEADERS = b"access-control-request-headers"
ALLOW_ORIGIN = b"access-control-allow-origin"
ALLOW_CREDENTIALS = b"access-control-allow-credentials"
ALLOW_METHODS = b"access-control-allow-methods"
ALLOW_HEADERS = b"access-control-allow-headers"
MAX_AGE = b"access-control-max-age"
EXPOSE_HEADERS = b"access-control-expose-headers"
# Envoy's response code details for the filter's own preflight answer (HttpResponseCodeDetailValues).
CORS_RESPONSE_DETAIL = "cors_response"
PREFLIGHT_STATUS = 200   # Envoy: Http::Code::OK, headers only

PREFLIGHT = "preflight"  # answer now with ``headers``; nothing goes upstream
RESPONSE = "response"    # forward; set ``headers`` on the upstream's answer


class CorsAnswer(NamedTuple):
    kind: str                                  # PREFLIGHT | RESPONSE
    headers: tuple[tuple[bytes, bytes], ...]   # lowercase names, in Envoy's order


def _header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes:
    values = [v for n, v in headers if n == name]
    return b",".join(values) if len(values) > 1 else (values[0] if values else b"")


def origin_allowed(policy: CorsPolicy, origin: str) -> bool:
    return any(m.matches("*") or m.matches(origin) for m in policy.allow_origins)


def decide(policy: CorsPolicy, method: bytes, headers: Iterable[tuple[bytes, bytes]]) -> CorsAnswer | None:
    """Envoy's CORS filter for one request (see the module docstring); None: the filter does nothing."""
    headers = tuple(headers)
    origin = _header(headers, ORIGIN)
    if not origin:
        return None
    allowed = origin_allowed(policy, origin.decode("latin-1"))
    request_method = _header(headers, REQUEST_METHOD) if method == b"OPTIONS" else b""
    if not request_method:
        # Not a preflight: the upstream answers; an allowed origin gets its headers set on that answer.
        if not allowed:
            return None
        out = [(ALLOW_ORIGIN, origin)]
        if policy.allow_credentials:
            out.append((ALLOW_CREDENTIALS, b"true"))
        if policy.expose_headers:
            out.append((EXPOSE_HEADERS, policy.expose_headers.encode("latin-1")))
        return CorsAnswer(RESPONSE, tuple(out))
    if not allowed and policy.forward_unmatched_preflights:
        return None   # FORWARD: the preflight goes upstream, its answer untouched
    out = []
    if allowed:
        out.append((ALLOW_ORIGIN, origin))
    if policy.allow_credentials:
        out.append((ALLOW_CREDENTIALS, b"true"))
    if policy.allow_methods:
        out.append((ALLOW_METHODS, request_method if policy.allow_methods == "*"
                    else policy.allow_methods.encode("latin-1")))
    if policy.allow_headers:
        out.append((ALLOW_HEADERS, _header(headers, REQUEST_HEADERS) if policy.allow_headers == "*"
                    else policy.allow_headers.encode("latin-1")))
    if policy.max_age:
        out.append((MAX_AGE, policy.max_age.encode("latin-1")))
    return CorsAnswer(PREFLIGHT, tuple(out))


def set_headers(headers: Iterable[tuple[bytes, bytes]], add: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """``headers`` (lowercase names) with each of ``add`` replacing any field of its name, as Envoy's
    ``setInline`` does on the response."""
    names = {n for n, _ in add}
    return [*(f for f in headers if f[0] not in names), *add]


__all__ = ["CorsAnswer", "PREFLIGHT", "RESPONSE", "CORS_RESPONSE_DETAIL", "PREFLIGHT_STATUS", "decide",
           "origin_allowed", "set_headers"]
