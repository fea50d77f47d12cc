"""Parsers for the routing resources users already write: ``networking.istio.io`` VirtualService and
DestinationRule, ``gateway.networking.k8s.io`` HTTPRoute and Gateway.

Each takes one decoded YAML document and returns a frozen model, or raises ``ConfigError`` naming the
exact field (``spec.http[0].route[1].weight: expected an integer 0..``). Unknown fields inside ``spec``
are errors, as ``kubectl apply`` does with its default strict field validation; fields we read but do
not enforce (localityLbSetting with consistentHash) are accepted and reported in ``.warnings``.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import binascii
import math
import re
from types import MappingProxyType
from typing import Any, Callable, Iterable

from policy.errors import ConfigError, Where
from policy.wire import ascii_lower, wire_form

from .regex import Regex, RegexError, check_rewrite, compile_regex
from .tls import TlsMatch, TlsRule, sni_host_within
from .hashing import MAGLEV_BUILD_MAX_TABLE_SIZE, RING_BUILD_MAX_SIZE, is_prime
from .model import (
    HASH_COOKIE, HASH_HEADER, HASH_QUERY, HASH_SOURCE_IP, MAGLEV, MAGLEV_TABLE_SIZE_DEFAULT,
    MAGLEV_TABLE_SIZE_LIMIT, RING_HASH, RING_HASH_MAX_SIZE, RING_HASH_MIN_SIZE_DEFAULT, UNMATCHED_PREFLIGHTS,
    ConsistentHash, CorsPolicy, HttpCookie, LABEL_REGION, LABEL_SUBZONE, LABEL_ZONE, LocalityDistribute,
    LocalityFailover, LocalityLbSetting, WARMUP_AGGRESSION_DEFAULT, WARMUP_MIN_PERCENT_DEFAULT, Warmup,
    BackendRef, ConnectionPool, DestinationRule, Fault, Gateway, GwHeaderMatch, GwMatch, GwRule,
    HeaderOps, HeaderRules, HttpMatch, HttpRoute, HttpRule, KNOWN_RETRY_ON, Listener, MirrorSpec,
    NO_HEADER_RULES, OutlierDetection, ParentRef, RedirectSpec, RetryPolicy, RewriteSpec, StringMatch,
    Subset, TcpMatch, TcpRule, TrafficPolicy, VirtualService, VsDestination, DEFAULT_RETRY_POLICY,
)

ISTIO_NETWORKING_VERSIONS = ("networking.istio.io/v1", "networking.istio.io/v1beta1",
                             "networking.istio.io/v1alpha3")
GATEWAY_API_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
DEFAULT_NAMESPACE = "default"   # what kubectl applies a namespaced resource to when metadata has none
MAX_PORT = 65535
MAX_U32 = 2**32 - 1
GATEWAY_MAX_WEIGHT = 1_000_000  # Gateway API BackendRef.weight: "Maximum=1000000"
MAX_DURATION_S = 315_576_000_000  # protobuf Duration's documented maximum (10 000 years)
# Gateway API CRD limits on match values (apis/v1/httproute_types.go, kubebuilder MaxLength), which bound a
# RegularExpression there in place of istiod's 1024-byte VirtualService limit.
GW_PATH_VALUE_MAX = 1024      # HTTPPathMatch.Value
GW_HEADER_VALUE_MAX = 4096    # HTTPHeaderMatch.Value
GW_QUERY_VALUE_MAX = 1024     # HTTPQueryParamMatch.Value

# gRPC status names Istio accepts for fault.abort.grpcStatus (grpc codes.proto).
GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")


# ---------------------------------------------------------------------------------------------
# Typed field readers: each either returns the value or raises ConfigError with the field's path.


class _R:
    """Field reader bound to one document; collects warnings."""

    def __init__(self, where: Where):
        self.where = where
        self.warnings: list[str] = []

    def fail(self, path: str, problem: str) -> ConfigError:
        return ConfigError(self.where, path, problem)

    def warn(self, path: str, problem: str) -> None:
        self.warnings.append(f"{path}: {problem}")

    def map(self, v: Any, path: str, allowed: Iterable[str] | None = None) -> dict:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise self.fail(path, "expected a mapping")
        for k in v:
            if not isinstance(k, str):
                raise self.fail(path, f"expected string keys, got {k!r}")
        if allowed is not None:
            allowed = set(allowed)
            for k in v:
                if k not in allowed:
                    raise self.fail(f"{path}.{k}" if path else k, "unknown field")
        return v

    def list(self, v: Any, path: str) -> list:
        if v is None:
            return []
        if not isinstance(v, list):
            raise self.fail(path, "expected a list")
        return v

    def str(self, v: Any, path: str, *, empty_ok: bool = False) -> str:
        if not isinstance(v, str) or (not empty_ok and v == ""):
            raise self.fail(path, "expected a non-empty string" if not empty_ok else "expected a string")
        if not v.isascii():
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                # A YAML "\ud800" escape: protobuf strings (Istio's CRDs, Envoy's config) must be UTF-8.
                raise self.fail(path, "not valid UTF-8 (a lone surrogate)") from None
        return v

    def wire_str(self, v: Any, path: str, *, empty_ok: bool = False) -> str:
        """A string the waypoint puts on the wire (a header name or value, a rewritten path or authority,
        a redirect's parts). Envoy validates each as HTTP_HEADER_VALUE with strict: false — "disallows
        NUL, CR and LF" (envoy/type/matcher/v3, validate.proto) — and rejects the config otherwise; here
        the same characters would split the header block."""
        s = self.str(v, path, empty_ok=empty_ok)
        bad = next((c for c in s if c in _HEADER_BREAKERS), None)
        if bad is not None:
            raise self.fail(path, f"must not contain {bad!r} (NUL, CR and LF are not allowed in HTTP values)")
        return s

    def opt_wire_str(self, v: Any, path: str) -> str | None:
        return None if v is None else self.wire_str(v, path)

    def opt_str(self, v: Any, path: str) -> str | None:
        return None if v is None else self.str(v, path)

    def strs(self, v: Any, path: str) -> tuple[str, ...]:
        return tuple(self.str(x, f"{path}[{i}]") for i, x in enumerate(self.list(v, path)))

    def int(self, v: Any, path: str, lo: int = 0, hi: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            rng = f"{lo}..{hi}" if hi is not None else f"{lo}.."
            raise self.fail(path, f"expected an integer {rng}")
        return v

    def opt_int(self, v: Any, path: str, lo: int = 0, hi: int | None = None) -> int | None:
        return None if v is None else self.int(v, path, lo, hi)

    def bool(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(path, "expected true or false")
        return v

    def percent(self, v: Any, path: str) -> float:
        """Istio ``Percent {value: double}``, 0–100."""
        m = self.map(v, path, ("value",))
        x = m.get("value", 0.0)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0.0 <= float(x) <= 100.0):
            raise self.fail(f"{path}.value", "expected a number 0..100")
        return float(x)

    def duration(self, v: Any, path: str) -> float:
        """Seconds from ``"10s"``, ``"0.5s"``, ``"100ms"``, ``"1h30m"`` (protobuf Duration and Gateway
        API GEP-2257 durations both fit)."""
        if not isinstance(v, str):
            raise self.fail(path, 'expected a duration such as "10s" or "250ms"')
        s = _parse_duration(v)
        if s is None:
            raise self.fail(path, f'expected a duration such as "10s" or "250ms", got {v!r}')
        return s

    def opt_duration(self, v: Any, path: str) -> float | None:
        return None if v is None else self.duration(v, path)

    def regex(self, v: Any, path: str, *, max_chars: int | None = None) -> Regex:
        """A config regex, compiled with RE2 as istiod validates it and Envoy loads it
        (``policy/routing/regex.py``): empty, too long, non-RE2 syntax or too large a program is an error."""
        s = self.str(v, path, empty_ok=True)
        if s == "":
            # istiod validateStringMatchRegexp: "regex string match should not be empty".
            raise self.fail(path, "invalid regular expression: regex string match should not be empty")
        try:
            return compile_regex(s, max_chars=max_chars)
        except RegexError as e:
            raise self.fail(path, f"invalid regular expression: {e}") from None

    def labels(self, v: Any, path: str) -> MappingProxyType:
        m = self.map(v, path)
        for k, x in m.items():
            if not isinstance(x, str):
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    raise self.fail(f"{path}.{k}", "expected a string (quote numbers in YAML)")
                raise self.fail(f"{path}.{k}", "expected a string")
        return MappingProxyType(dict(m))


_HEADER_BREAKERS = frozenset("\0\r\n")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def _parse_duration(text: str) -> float | None:
    if not text or len(text) > 64:
        return None
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    return total if total <= MAX_DURATION_S else None


# ---------------------------------------------------------------------------------------------
# Common document envelope


def _envelope(doc: Any, where: Where, kinds: tuple[str, ...], versions: tuple[str, ...],
              kind: str) -> tuple[_R, str, str, dict, dict]:
    r = _R(where)
    if not isinstance(doc, dict):
        raise r.fail("", "expected a mapping (a Kubernetes resource)")
    r.map(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if doc.get("kind") != kind:
        raise r.fail("kind", f"expected {kind}")
    api = doc.get("apiVersion")
    if api not in versions:
        raise r.fail("apiVersion", "expected one of " + ", ".join(versions))
    meta = r.map(doc.get("metadata"), "metadata")
    name = r.str(meta.get("name"), "metadata.name")
    namespace = meta.get("namespace", DEFAULT_NAMESPACE)
    namespace = r.str(namespace, "metadata.namespace")
    r.where = where.with_resource(kind, f"{namespace}/{name}")
    if "spec" not in doc:
        raise r.fail("spec", "required")
    spec = r.map(doc.get("spec"), "spec")
    return r, namespace, name, meta, spec


# ---------------------------------------------------------------------------------------------
# VirtualService


def parse_virtual_service(doc: dict, where: Where, *, order: int = 0) -> VirtualService:
    r, ns, name, _, spec = _envelope(doc, where, (), ISTIO_NETWORKING_VERSIONS, "VirtualService")
    r.map(spec, "spec", ("hosts", "gateways", "http", "tcp", "tls", "exportTo"))
    hosts = r.strs(spec.get("hosts"), "spec.hosts")
    if not hosts:
        raise r.fail("spec.hosts", "at least one host is required")
    gateways = r.strs(spec.get("gateways"), "spec.gateways")
    http = tuple(_vs_http_rule(r, x, f"spec.http[{i}]") for i, x in enumerate(r.list(spec.get("http"), "spec.http")))
    if all(g == "mesh" for g in gateways):
        _refuse_claim_routing(r, spec.get("http") or [], gateways)
    tcp = tuple(_vs_tcp_rule(r, x, f"spec.tcp[{i}]") for i, x in enumerate(r.list(spec.get("tcp"), "spec.tcp")))
    # TLS rules ride in ``tcp`` as ``TlsRule`` (policy.routing.tls explains how a waypoint applies them).
    tls = tuple(_vs_tls_rule(r, x, f"spec.tls[{i}]", hosts) for i, x in enumerate(r.list(spec.get("tls"), "spec.tls")))
    if tls:
        tcp = tcp + tls
    export_to = r.strs(spec.get("exportTo"), "spec.exportTo")
    return VirtualService(ns, name, hosts, gateways, http, tcp, export_to, order, tuple(r.warnings))


def _refuse_claim_routing(r: _R, http: list, gateways: tuple[str, ...]) -> None:
    """istiod's webhook (validation.go ValidateVirtualService), for a VirtualService that does not apply to a
    gateway: "if jwt.ToRoutingClaim(key).Match { msg := fmt.Sprintf("JWT claim based routing (key: %s) is only
    supported for gateway, found no gateways: %v", key, virtualService.Gateways)". Accepting it here would match a
    header of that name that any client can send."""
    for i, rule in enumerate(http):
        # The rules parsed already: a part that is not a mapping here is an absent one (None).
        for j, match in enumerate((rule or {}).get("match") or ()):
            for field in ("headers", "withoutHeaders"):
                for key in ((match or {}).get(field) or {}):
                    if isinstance(key, str) and key.startswith(("@request.auth.claims.", "@request.auth.claims[")):
                        raise r.fail(f"spec.http[{i}].match[{j}].{field}.{key}",
                                     f"JWT claim based routing (key: {key}) is only supported for gateway, found no "
                                     f"gateways: [{' '.join(gateways)}]")


_HTTP_MATCH_FIELDS = ("name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels",
                      "gateways", "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace",
                      "statPrefix")
_HTTP_RULE_FIELDS = ("name", "match", "route", "redirect", "directResponse", "delegate", "rewrite", "timeout",
                     "retries", "fault", "mirror", "mirrorPercentage", "mirrorPercent", "mirrors",
                     "corsPolicy", "headers")


def _vs_http_rule(r: _R, v: Any, path: str) -> HttpRule:
    m = r.map(v, path, _HTTP_RULE_FIELDS)
    name = r.str(m.get("name", ""), f"{path}.name", empty_ok=True)
    matches = tuple(_vs_match(r, x, f"{path}.match[{i}]") for i, x in enumerate(r.list(m.get("match"), f"{path}.match")))
    if m.get("delegate") is not None:
        # One-level delegation only works for gateways' root VirtualServices; waypoints never follow it.
        raise r.fail(f"{path}.delegate", "delegate is not supported (only gateways follow delegation)")
    route = tuple(_vs_route_dest(r, x, f"{path}.route[{i}]") for i, x in enumerate(r.list(m.get("route"), f"{path}.route")))
    redirect = _vs_redirect(r, m.get("redirect"), f"{path}.redirect") if m.get("redirect") is not None else None
    direct = _vs_direct_response(r, m.get("directResponse"), f"{path}.directResponse") \
        if m.get("directResponse") is not None else None
    # Istio validation: a rule needs exactly one of route / redirect / directResponse (or delegate).
    actions = [k for k, x in (("route", route), ("redirect", redirect), ("directResponse", direct)) if x]
    if not actions:
        raise r.fail(path, "one of route, redirect or directResponse is required")
    if len(actions) > 1:
        raise r.fail(path, f"{' and '.join(actions)} cannot be used together")
    if len(route) > 1 and sum(d.weight or 0 for d in route) == 0:
        # Istio validation (validateHTTPRouteDestinations): "total destination weight = 0".
        raise r.fail(f"{path}.route", "total destination weight = 0")
    rewrite = _vs_rewrite(r, m.get("rewrite"), f"{path}.rewrite") if m.get("rewrite") is not None else None
    if rewrite is not None and redirect is not None:
        raise r.fail(f"{path}.rewrite", "rewrite cannot be used with redirect")
    timeout = r.opt_duration(m.get("timeout"), f"{path}.timeout")
    retries = _vs_retries(r, m.get("retries"), f"{path}.retries") if m.get("retries") is not None else None
    fault = _vs_fault(r, m.get("fault"), f"{path}.fault") if m.get("fault") is not None else None
    mirrors: list[MirrorSpec] = []
    if m.get("mirror") is not None:
        d = _vs_destination(r, m.get("mirror"), f"{path}.mirror")
        pct = 100.0
        if m.get("mirrorPercentage") is not None:
            pct = r.percent(m.get("mirrorPercentage"), f"{path}.mirrorPercentage")
        elif m.get("mirrorPercent") is not None:
            pct = float(r.int(m.get("mirrorPercent"), f"{path}.mirrorPercent", 0, 100))
        mirrors.append(MirrorSpec(d.host, d.subset, d.port, pct))
    for i, x in enumerate(r.list(m.get("mirrors"), f"{path}.mirrors")):
        p = f"{path}.mirrors[{i}]"
        mm = r.map(x, p, ("destination", "percentage"))
        d = _vs_destination(r, mm.get("destination"), f"{p}.destination")
        pct = r.percent(mm["percentage"], f"{p}.percentage") if mm.get("percentage") is not None else 100.0
        mirrors.append(MirrorSpec(d.host, d.subset, d.port, pct))
    headers = _vs_headers(r, m.get("headers"), f"{path}.headers")
    if m.get("corsPolicy") is not None:
        # The policy rides with the rule's header rules to its action: the Forward's (HeaderRules.cors), or a
        # redirect's / directResponse's own ``cors`` (table.py ``_vs_action``) — Envoy's CORS filter runs before
        # the router on every route, whatever answers it.
        headers = HeaderRules(headers.request, headers.response, _vs_cors(r, m.get("corsPolicy"), f"{path}.corsPolicy"),
                              headers.authority)
    rewrite = _host_rewrite(r, rewrite, headers, route, path)
    return HttpRule(name, matches, route, redirect, direct, rewrite, timeout, retries, fault, tuple(mirrors), headers)


def _host_rewrite(r: _R, rewrite: RewriteSpec | None, headers: HeaderRules, route: tuple[VsDestination, ...],
                  path: str) -> RewriteSpec | None:
    """The rule's rewrite with the host its ``headers`` set (istiod route.go applyHTTPRouteDestination: the
    headers' authority, overridden by "if in.Rewrite.GetAuthority() != "" { authority = in.Rewrite.GetAuthority()
    }", becomes the route's HostRewriteLiteral). A single destination's own host is used when the rule sets none
    (processDestination: "we only override if the top level rewrite is not set")."""
    if not route:
        return rewrite   # a redirect or directResponse: istiod applies the host only to a forwarding route
    authority = headers.authority
    if authority is not None and rewrite is not None and rewrite.authority is not None:
        # validateAuthorityRewrite starts from "current := rewrite.GetAuthority()".
        raise r.fail(f"{path}.headers.request", f'authority header cannot be set multiple times: have '
                                                f'"{rewrite.authority}", attempting to set "{authority}"')
    if authority is None and (rewrite is None or rewrite.authority is None) and len(route) == 1:
        authority = route[0].headers.authority
    # (Several destinations: a destination's own host stays with it — istiod sets it per weighted cluster,
    # processWeightedDestination: ClusterWeight HostRewriteLiteral — and the waypoint applies it when that
    # destination is drawn: proxy/pipeline/http.py Upstream.host_rewrite.)
    if authority is None or (rewrite is not None and rewrite.authority is not None):
        return rewrite
    if rewrite is None:
        return RewriteSpec(authority=authority)
    return dataclasses.replace(rewrite, authority=authority)


_CORS_FIELDS = ("allowOrigin", "allowOrigins", "allowMethods", "allowHeaders", "exposeHeaders", "maxAge",
                "allowCredentials", "unmatchedPreflights")
# istiod validateHTTPMethod: `"%q is not a supported HTTP method"` outside this set (validation.go).
_CORS_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"))
# RFC 9110 §5.6.2 tchar: what a header name in allowHeaders / exposeHeaders may hold (istiod rejects empty
# names; these lists become header values, so nothing else may pass either). The ASCII a cookie name may
# hold too (_http_cookie).
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _vs_cors(r: _R, v: Any, path: str) -> CorsPolicy:
    """A VirtualService ``corsPolicy``, checked as istiod's validateCORSPolicy does and translated as its
    TranslateCORSPolicy hands it to Envoy (``policy.routing.model.CorsPolicy``)."""
    m = r.map(v, path, _CORS_FIELDS)
    origins: list[StringMatch] = []
    for i, x in enumerate(r.list(m.get("allowOrigins"), f"{path}.allowOrigins")):
        p = f"{path}.allowOrigins[{i}]"
        sm = _string_match(r, x, p, empty_is_presence=True)
        if sm.kind == "presence" or sm.value == "":
            # istiod validateAllowOrigins: "'' is not a valid match type for CORS allow origins".
            raise r.fail(p, "an empty origin match is not valid for CORS allow origins")
        origins.append(sm)
    if not origins:
        # The deprecated allowOrigin: istiod uses it only without allowOrigins, as exact matches.
        origins = [StringMatch("exact", r.str(x, f"{path}.allowOrigin[{i}]"))
                   for i, x in enumerate(r.list(m.get("allowOrigin"), f"{path}.allowOrigin"))]
    elif m.get("allowOrigin") is not None:
        r.strs(m.get("allowOrigin"), f"{path}.allowOrigin")
        r.warn(f"{path}.allowOrigin", "ignored: allowOrigins is set (allowOrigin is deprecated)")
    methods = r.strs(m.get("allowMethods"), f"{path}.allowMethods")
    for i, x in enumerate(methods):
        if x not in _CORS_METHODS:
            raise r.fail(f"{path}.allowMethods[{i}]", f"{x!r} is not a supported HTTP method")

    def names(key: str) -> str:
        # istiod: strings.Join(in.AllowHeaders, ",")
        return _cors_header_names(r, r.strs(m.get(key), f"{path}.{key}"), f"{path}.{key}")

    max_age = ""
    if m.get("maxAge") is not None:
        secs = r.duration(m.get("maxAge"), f"{path}.maxAge")
        if secs < 0.001:
            # istiod ValidateDuration: "duration must be greater than 1ms".
            raise r.fail(f"{path}.maxAge", "duration must be greater than 1ms")
        if secs != int(secs):
            # istiod validateCORSPolicy: "max_age duration is accurate only to seconds precision".
            raise r.fail(f"{path}.maxAge", "max_age duration is accurate only to seconds precision")
        max_age = str(int(secs))   # istiod: strconv.FormatInt(in.MaxAge.GetSeconds(), 10)
    credentials = r.bool(m["allowCredentials"], f"{path}.allowCredentials") \
        if m.get("allowCredentials") is not None else False
    unmatched = m.get("unmatchedPreflights", "UNSPECIFIED")
    if unmatched not in UNMATCHED_PREFLIGHTS:
        raise r.fail(f"{path}.unmatchedPreflights", "expected one of " + ", ".join(UNMATCHED_PREFLIGHTS))
    return CorsPolicy(tuple(origins), ",".join(methods), names("allowHeaders"), names("exposeHeaders"), max_age,
                      credentials, forward_unmatched_preflights=unmatched != "IGNORE")


def _cors_header_names(r: _R, names: list[str] | tuple[str, ...], path: str, max_len: int | None = None) -> str:
    """A CORS header-name list (allowHeaders, exposeHeaders) as the one value Envoy gets: each name an RFC 9110
    token (tchar) of at most ``max_len`` characters, joined with ","."""
    for i, x in enumerate(names):
        bad = next((c for c in x if c not in _TCHARS), None)
        if bad is not None:
            raise r.fail(f"{path}[{i}]", f"not a valid header name (character {bad!r})")
        if max_len is not None and len(x) > max_len:
            raise r.fail(f"{path}[{i}]", f"longer than {max_len} characters")
    return ",".join(names)


def _string_match(r: _R, v: Any, path: str, *, empty_is_presence: bool, ignore_case: bool = False,
                  empty_regex_is_presence: bool = False) -> StringMatch:
    m = r.map(v, path, ("exact", "prefix", "regex"))
    set_ = [k for k in ("exact", "prefix", "regex") if m.get(k) is not None]
    if len(set_) > 1:
        raise r.fail(path, "only one of exact, prefix, regex may be set")
    if not set_:
        if empty_is_presence:
            return StringMatch("presence")
        raise r.fail(path, "one of exact, prefix, regex is required")
    kind = set_[0]
    value = r.str(m[kind], f"{path}.{kind}", empty_ok=True)
    if value == "" and (kind == "prefix" and empty_is_presence or kind == "regex" and empty_regex_is_presence):
        # Istio: an empty prefix value on a header is a presence match (route.go translateHeaderMatch). An
        # empty regex is one too, but istiod's validateStringMatchRegexp rejects it ("regex string match
        # should not be empty") everywhere it validates: uri, scheme, method, authority, headers,
        # queryParams — not withoutHeaders, where it stays a presence test (then negated).
        return StringMatch("presence")
    if kind == "regex":
        return StringMatch("regex", value, pattern=r.regex(value, f"{path}.regex"))
    return StringMatch(kind, value, ignore_case=ignore_case)


def _named_matches(r: _R, v: Any, path: str, *, lower: bool, without: bool = False) -> tuple[tuple[str, StringMatch], ...]:
    out = []
    for k, x in r.map(v, path).items():
        p = f"{path}.{k}"
        if without and isinstance(x, dict) and x.get("regex") == "*":
            # Istio: withoutHeaders `regex: "*"` is converted to a presence test (routing.go
            # "without headers regex convert to present_match"). route.go canBeConvertedToPresentMatch: only
            # `{}` ("in.MatchType == nil") and `regex: "*"` become present_match; `exact: ""` stays an exact
            # match of the empty value (ConvertToEnvoyMatch: StringMatcher_Exact{Exact: ""}).
            out.append((_match_name(r, k, p, lower), StringMatch("presence")))
            continue
        out.append((_match_name(r, k, p, lower), _string_match(r, x, p, empty_is_presence=True,
                                                               empty_regex_is_presence=without)))
    return tuple(out)


def _match_name(r: _R, name: str, path: str, lower: bool) -> str:
    """A header or query parameter name as the request holds it: wire form (the request's bytes as
    latin-1), header names lowercased ASCII-only (Envoy LowerCaseString: absl::AsciiStrToLower)."""
    w = wire_form(r.str(name, path))
    return ascii_lower(w) if lower else w


def _vs_match(r: _R, v: Any, path: str) -> HttpMatch:
    m = r.map(v, path, _HTTP_MATCH_FIELDS)
    ignore_case = r.bool(m.get("ignoreUriCase", False), f"{path}.ignoreUriCase")
    uri = _string_match(r, m["uri"], f"{path}.uri", empty_is_presence=False,
                        ignore_case=ignore_case) if m.get("uri") is not None else None
    if uri is not None and uri.kind == "regex" and ignore_case:
        # Istio: ignoreUriCase applies to exact and prefix only.
        r.warn(f"{path}.ignoreUriCase", "has no effect on a regex uri match")

    def sm(key: str) -> StringMatch | None:
        return _string_match(r, m[key], f"{path}.{key}", empty_is_presence=False) if m.get(key) is not None else None

    port = r.opt_int(m.get("port"), f"{path}.port", 1, MAX_PORT)
    source_labels = r.labels(m.get("sourceLabels"), f"{path}.sourceLabels")
    return HttpMatch(
        name=r.str(m.get("name", ""), f"{path}.name", empty_ok=True),
        uri=uri, scheme=sm("scheme"), method=sm("method"), authority=sm("authority"),
        headers=_named_matches(r, m.get("headers"), f"{path}.headers", lower=True),
        without_headers=_named_matches(r, m.get("withoutHeaders"), f"{path}.withoutHeaders", lower=True, without=True),
        query_params=_named_matches(r, m.get("queryParams"), f"{path}.queryParams", lower=False),
        port=port, source_labels=source_labels,
        source_namespace=r.str(m.get("sourceNamespace", ""), f"{path}.sourceNamespace", empty_ok=True),
        gateways=r.strs(m.get("gateways"), f"{path}.gateways"),
    )


def _vs_destination(r: _R, v: Any, path: str) -> VsDestination:
    m = r.map(v, path, ("host", "subset", "port"))
    host = r.str(m.get("host"), f"{path}.host")
    subset = r.opt_str(m.get("subset"), f"{path}.subset")
    port = None
    if m.get("port") is not None:
        pm = r.map(m.get("port"), f"{path}.port", ("number",))
        port = r.int(pm.get("number"), f"{path}.port.number", 1, MAX_PORT)
    return VsDestination(host, subset, port)


def _vs_route_dest(r: _R, v: Any, path: str) -> VsDestination:
    m = r.map(v, path, ("destination", "weight", "headers"))
    d = _vs_destination(r, m.get("destination"), f"{path}.destination")
    weight = r.opt_int(m.get("weight"), f"{path}.weight", 0, 2**31 - 1)
    return VsDestination(d.host, d.subset, d.port, weight, _vs_headers(r, m.get("headers"), f"{path}.headers"))


def _header_ops_map(r: _R, v: Any, path: str) -> HeaderOps:
    m = r.map(v, path, ("set", "add", "remove"))

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for k, x in r.map(m.get(key), f"{path}.{key}").items():
            name = ascii_lower(r.wire_str(k, f"{path}.{key}.{k}"))
            out.append((name, r.wire_str(x, f"{path}.{key}.{k}", empty_ok=True)))
        return tuple(out)

    return HeaderOps(pairs("set"), pairs("add"), _removed(r, m.get("remove"), f"{path}.remove"))


_AUTHORITY_HEADERS = ("host", ":authority")   # istiod route.go isAuthorityHeader (strings.EqualFold)


def _vs_header_ops(r: _R, v: Any, path: str, *, request: bool) -> tuple[HeaderOps, str | None]:
    """A VirtualService ``headers.request`` / ``headers.response`` block, checked as istiod's webhook checks
    it, and the host rewrite it asks for (request only). ValidateHTTPHeaderWithAuthorityOperationName (request
    set/add): "// Authority header is validated later  if isInternalHeader(name) && !isAuthorityHeader(name) {
    return fmt.Errorf(`invalid header %q: header cannot have ":" prefix`, name) }"; ValidateHTTPHeaderOperationName
    (request remove, every response operation): "if strings.EqualFold(name, "host") { return fmt.Errorf(`invalid
    header %q: cannot set Host header`, name) }" and the same ":" prefix error. validateAuthorityRewrite: "authority
    header cannot be set multiple times: have %q, attempting to set %q"."""
    if v is None:
        return HeaderOps(), None
    ops = _header_ops_map(r, v, path)
    m = r.map(v, path)
    authority: str | None = None
    for key in ("set", "add"):
        for k, x in r.map(m.get(key), f"{path}.{key}").items():
            lower = ascii_lower(k)
            if request and lower in _AUTHORITY_HEADERS:
                if authority is not None:
                    raise r.fail(f"{path}.{key}.{k}", f'authority header cannot be set multiple times: have '
                                                      f'"{authority}", attempting to set "{x}"')
                authority = x
            elif not request and lower == "host":
                raise r.fail(f"{path}.{key}.{k}", f'invalid header "{k}": cannot set Host header')
            elif k.startswith(":"):
                raise r.fail(f"{path}.{key}.{k}", f'invalid header "{k}": header cannot have ":" prefix')
    for i, k in enumerate(r.list(m.get("remove"), f"{path}.remove")):
        if ascii_lower(k) == "host":
            raise r.fail(f"{path}.remove[{i}]", f'invalid header "{k}": cannot set Host header')
        if k.startswith(":"):
            raise r.fail(f"{path}.remove[{i}]", f'invalid header "{k}": header cannot have ":" prefix')
    if authority is not None:
        # route.go translateAppendHeaders: "if isAuthorityHeader(key) { authority = value }  if isInternalHeader(key)
        # { continue }" — the host is not sent as a header; it becomes the route's host rewrite.
        ops = HeaderOps(tuple(p for p in ops.set if p[0] not in _AUTHORITY_HEADERS),
                        tuple(p for p in ops.add if p[0] not in _AUTHORITY_HEADERS), ops.remove)
    return ops, authority


def _removed(r: _R, v: Any, path: str) -> tuple[str, ...]:
    # Header names fold ASCII-only, as Envoy's LowerCaseString (absl::AsciiStrToLower).
    return tuple(ascii_lower(r.wire_str(x, f"{path}[{i}]")) for i, x in enumerate(r.list(v, path)))


def _vs_headers(r: _R, v: Any, path: str) -> HeaderRules:
    if v is None:
        return NO_HEADER_RULES
    m = r.map(v, path, ("request", "response"))
    request, authority = _vs_header_ops(r, m.get("request"), f"{path}.request", request=True)
    response, _ = _vs_header_ops(r, m.get("response"), f"{path}.response", request=False)
    return HeaderRules(request, response, authority=authority)


def _vs_redirect(r: _R, v: Any, path: str) -> RedirectSpec:
    m = r.map(v, path, ("uri", "authority", "port", "derivePort", "scheme", "redirectCode"))
    if m.get("port") is not None and m.get("derivePort") is not None:
        raise r.fail(path, "port and derivePort cannot be used together")
    derive = m.get("derivePort")
    if derive is not None and derive not in ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"):
        raise r.fail(f"{path}.derivePort", "expected FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT")
    uri = r.opt_wire_str(m.get("uri"), f"{path}.uri")
    return RedirectSpec(
        status=r.int(m.get("redirectCode", 301), f"{path}.redirectCode", 300, 399),  # Istio default 301
        scheme=r.opt_wire_str(m.get("scheme"), f"{path}.scheme"),
        authority=r.opt_wire_str(m.get("authority"), f"{path}.authority"),
        port=r.opt_int(m.get("port"), f"{path}.port", 1, MAX_PORT),
        derive_port=derive,
        # VS redirect.uri: "On a redirect, overwrite the Path portion of the URL with this value."
        path_kind="full" if uri is not None else None,
        path=uri or "",
    )


def _vs_direct_response(r: _R, v: Any, path: str) -> tuple[int, str]:
    m = r.map(v, path, ("status", "body"))
    status = r.int(m.get("status"), f"{path}.status", 200, 599)
    body = ""
    if m.get("body") is not None:
        b = r.map(m.get("body"), f"{path}.body", ("string", "bytes"))
        if b.get("string") is not None and b.get("bytes") is not None:
            raise r.fail(f"{path}.body", "only one of string, bytes may be set")
        if b.get("string") is not None:
            body = r.str(b["string"], f"{path}.body.string", empty_ok=True)
        elif b.get("bytes") is not None:
            raw = r.str(b["bytes"], f"{path}.body.bytes", empty_ok=True)
            try:
                body = base64.b64decode(raw, validate=True).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                raise r.fail(f"{path}.body.bytes", "expected base64") from None
    return (status, body)


def _vs_rewrite(r: _R, v: Any, path: str) -> RewriteSpec:
    m = r.map(v, path, ("uri", "authority", "uriRegexRewrite"))
    uri = r.opt_wire_str(m.get("uri"), f"{path}.uri")
    authority = r.opt_wire_str(m.get("authority"), f"{path}.authority")
    if m.get("uriRegexRewrite") is not None:
        if uri is not None:
            raise r.fail(path, "uri and uriRegexRewrite cannot be used together")
        rr = r.map(m.get("uriRegexRewrite"), f"{path}.uriRegexRewrite", ("match", "rewrite"))
        # istiod validateURIRegexRewrite: "UriRegexRewrite requires both Rewrite and Match fields to be
        # specified"; the match is validated as any regex (validateStringRegexp).
        pat = r.regex(rr.get("match"), f"{path}.uriRegexRewrite.match")
        sub = r.wire_str(rr.get("rewrite"), f"{path}.uriRegexRewrite.rewrite")
        # Envoy regex_rewrite is RE2::GlobalReplace: \1..\9 name groups, \0 the match, \\ a backslash
        # (not Python's \g<1> or \n). istiod does not check the rewrite string and Envoy applies it
        # unchecked (a bad escape cuts each replacement short, a missing group leaves the path as it
        # was); we follow Istio — accept it, apply it as RE2 would (Regex.replace_all) — and warn, so
        # `config check` shows the typo RE2::CheckRewriteString would have caught.
        problem = check_rewrite(sub, pat.groups)
        if problem is not None and sub:
            r.warn(f"{path}.uriRegexRewrite.rewrite", f"RE2 would not apply this rewrite as written: {problem}")
        elif problem is not None:
            raise r.fail(f"{path}.uriRegexRewrite.rewrite", f"invalid RE2 rewrite: {problem}")
        return RewriteSpec("regex", "", pat, sub, authority)
    return RewriteSpec("prefix" if uri is not None else None, uri or "", None, "", authority)


def _parse_retry_on(r: _R, v: Any, path: str) -> tuple[frozenset[str], frozenset[int]]:
    text = r.str(v, path, empty_ok=True)
    on: set[str] = set()
    codes: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.isdigit():
            # Istio retry.go parseRetryOn: integers become retriable_status_codes and add
            # "retriable-status-codes" to retry_on.
            code = int(part)
            if not 100 <= code <= 599:
                raise r.fail(path, f"{part!r} is not an HTTP status code")
            codes.add(code)
            on.add("retriable-status-codes")
        elif part in KNOWN_RETRY_ON:
            on.add(part)
        else:
            raise r.fail(path, f"{part!r} is not a known retry policy")
    return frozenset(on), frozenset(codes)


def _vs_retries(r: _R, v: Any, path: str) -> RetryPolicy:
    m = r.map(v, path, ("attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities",
                        "retryIgnorePreviousHosts", "backoff"))
    # Istio: "MUST be >= 0. If 0, retries will be disabled."
    attempts = r.int(m.get("attempts", 0), f"{path}.attempts", 0, 2**31 - 1)
    if attempts == 0 and any(m.get(k) is not None for k in ("perTryTimeout", "retryOn", "retryRemoteLocalities")):
        # istiod's webhook (validation.go validateHTTPRetry): "if retries.Attempts == 0 && (retries.PerTryTimeout !=
        # nil || retries.RetryOn != "" || retries.RetryRemoteLocalities != nil)" — an unset attempts is 0 too.
        raise r.fail(f"{path}.attempts", "http retry policy configured when attempts are set to 0 (disabled)")
    per_try = r.opt_duration(m.get("perTryTimeout"), f"{path}.perTryTimeout")
    if per_try is not None:
        # validateHTTPRetry checks it with ValidateDuration, so a 0s per-try timeout (every attempt timed out at
        # once: 504 UT) is refused at load.
        _check_ms_duration(r, per_try, f"{path}.perTryTimeout")
    ignore_prev = r.bool(m.get("retryIgnorePreviousHosts", True), f"{path}.retryIgnorePreviousHosts")
    if m.get("retryRemoteLocalities") is not None:
        r.bool(m.get("retryRemoteLocalities"), f"{path}.retryRemoteLocalities")
    # retry.go ConvertPolicy starts from the default policy and overrides what the VS sets.
    on, codes = DEFAULT_RETRY_POLICY.retry_on, DEFAULT_RETRY_POLICY.retriable_status_codes
    if m.get("retryOn") is not None:
        on, codes = _parse_retry_on(r, m.get("retryOn"), f"{path}.retryOn")
    base = DEFAULT_RETRY_POLICY.backoff_base_s
    if m.get("backoff") is not None:
        base = r.duration(m.get("backoff"), f"{path}.backoff")
        if base <= 0:
            raise r.fail(f"{path}.backoff", "expected a positive duration")
    return RetryPolicy(attempts, on, codes, per_try, ignore_prev, backoff_base_s=base, backoff_max_s=base * 10,
                       ignore_previous_hosts_set=m.get("retryIgnorePreviousHosts") is True)


_NS_PER_MS = 1_000_000


def _check_ms_duration(r: _R, seconds: float, path: str) -> None:
    """istiod ValidateDuration: "if dur < time.Millisecond { return errors.New("duration must be greater than
    1ms") }; if dur%time.Millisecond != 0 { return errors.New("only durations to ms precision are supported") }"."""
    ns = round(seconds * 1e9)
    if ns < _NS_PER_MS:
        raise r.fail(path, "duration must be greater than 1ms")
    if ns % _NS_PER_MS:
        raise r.fail(path, "only durations to ms precision are supported")


def _vs_fault(r: _R, v: Any, path: str) -> Fault:
    m = r.map(v, path, ("delay", "abort"))
    delay_s, delay_pct = None, 0.0
    if m.get("delay") is not None:
        p = f"{path}.delay"
        d = r.map(m.get("delay"), p, ("fixedDelay", "exponentialDelay", "percentage", "percent"))
        if d.get("exponentialDelay") is not None:
            raise r.fail(f"{p}.exponentialDelay", "not supported (Istio does not implement it either)")
        delay_s = r.duration(d.get("fixedDelay"), f"{p}.fixedDelay")
        delay_pct = _fault_percent(r, d, p)
    abort_status = abort_grpc = None
    abort_pct = 0.0
    if m.get("abort") is not None:
        p = f"{path}.abort"
        a = r.map(m.get("abort"), p, ("httpStatus", "grpcStatus", "http2Error", "percentage"))
        kinds = [k for k in ("httpStatus", "grpcStatus", "http2Error") if a.get(k) is not None]
        if len(kinds) != 1:
            raise r.fail(p, "exactly one of httpStatus, grpcStatus is required")
        if kinds[0] == "http2Error":
            raise r.fail(f"{p}.http2Error", "not supported")
        if kinds[0] == "httpStatus":
            abort_status = r.int(a["httpStatus"], f"{p}.httpStatus", 200, 599)
        else:
            g = a["grpcStatus"]
            if isinstance(g, str) and g in GRPC_CODES:
                abort_grpc = GRPC_CODES[g]
            else:
                raise r.fail(f"{p}.grpcStatus", "expected a gRPC status name such as UNAVAILABLE")
        abort_pct = _fault_percent(r, a, p)
    if delay_s is None and abort_status is None and abort_grpc is None:
        raise r.fail(path, "one of delay, abort is required")
    return Fault(delay_s, delay_pct, abort_status, abort_grpc, abort_pct)


def _fault_percent(r: _R, m: dict, path: str) -> float:
    # Istio: "If left unspecified, no request will be delayed/aborted" (route.go TranslateFault).
    if m.get("percentage") is not None:
        return r.percent(m["percentage"], f"{path}.percentage")
    if m.get("percent") is not None:
        return float(r.int(m["percent"], f"{path}.percent", 0, 100))
    return 0.0


def _vs_tcp_rule(r: _R, v: Any, path: str) -> TcpRule:
    m = r.map(v, path, ("match", "route"))
    matches = []
    for i, x in enumerate(r.list(m.get("match"), f"{path}.match")):
        p = f"{path}.match[{i}]"
        mm = r.map(x, p, ("destinationSubnets", "port", "sourceLabels", "gateways", "sourceNamespace", "sourceSubnet"))
        matches.append(TcpMatch(
            port=r.opt_int(mm.get("port"), f"{p}.port", 1, MAX_PORT),
            destination_subnets=r.strs(mm.get("destinationSubnets"), f"{p}.destinationSubnets"),
            source_labels=r.labels(mm.get("sourceLabels"), f"{p}.sourceLabels"),
            source_namespace=r.str(mm.get("sourceNamespace", ""), f"{p}.sourceNamespace", empty_ok=True),
            gateways=r.strs(mm.get("gateways"), f"{p}.gateways"),
        ))
    route = []
    for i, x in enumerate(r.list(m.get("route"), f"{path}.route")):
        p = f"{path}.route[{i}]"
        mm = r.map(x, p, ("destination", "weight"))
        d = _vs_destination(r, mm.get("destination"), f"{p}.destination")
        route.append(VsDestination(d.host, d.subset, d.port, r.opt_int(mm.get("weight"), f"{p}.weight", 0, 2**31 - 1)))
    if not route:
        raise r.fail(f"{path}.route", "at least one destination is required")
    if len(route) > 1 and sum(d.weight or 0 for d in route) == 0:
        raise r.fail(f"{path}.route", "total destination weight = 0")
    return TcpRule(tuple(matches), tuple(route))


def _vs_tls_rule(r: _R, v: Any, path: str, hosts: tuple[str, ...]) -> TlsRule:
    """A VirtualService ``tls`` rule, checked as Istio's validateTLSRoute / validateTLSMatch check it."""
    m = r.map(v, path, ("match", "route"))
    matches_v = r.list(m.get("match"), f"{path}.match")
    if not matches_v:
        raise r.fail(f"{path}.match", "TLS route must have at least one match condition")
    matches = []
    for i, x in enumerate(matches_v):
        p = f"{path}.match[{i}]"
        mm = r.map(x, p, ("sniHosts", "destinationSubnets", "port", "sourceLabels", "gateways", "sourceNamespace"))
        sni = r.strs(mm.get("sniHosts"), f"{p}.sniHosts")
        if not sni:
            raise r.fail(f"{p}.sniHosts", "TLS match must have at least one SNI host")
        for j, h in enumerate(sni):
            if not sni_host_within(h, hosts):
                raise r.fail(f"{p}.sniHosts[{j}]", f"SNI host {h!r} is not a compatible subset of any of the "
                                                   f"virtual service hosts: [{', '.join(hosts)}]")
        subnets = r.strs(mm.get("destinationSubnets"), f"{p}.destinationSubnets")
        for j, s in enumerate(subnets):
            try:
                ipaddress.ip_network(s, strict=False)
            except ValueError:
                raise r.fail(f"{p}.destinationSubnets[{j}]", f"{s!r} is not an IP address or CIDR range") from None
        matches.append(TlsMatch(
            port=r.opt_int(mm.get("port"), f"{p}.port", 1, MAX_PORT),
            destination_subnets=subnets,
            source_labels=r.labels(mm.get("sourceLabels"), f"{p}.sourceLabels"),
            source_namespace=r.str(mm.get("sourceNamespace", ""), f"{p}.sourceNamespace", empty_ok=True),
            gateways=r.strs(mm.get("gateways"), f"{p}.gateways"),
            sni_hosts=sni,   # compared as written, as istiod compares them
        ))
    base = _vs_tcp_rule(r, {"route": m.get("route")}, path)   # the destinations are a tcp rule's
    return TlsRule(tuple(matches), base.route)


# ---------------------------------------------------------------------------------------------
# DestinationRule


def parse_destination_rule(doc: dict, where: Where, *, order: int = 0) -> DestinationRule:
    r, ns, name, _, spec = _envelope(doc, where, (), ISTIO_NETWORKING_VERSIONS, "DestinationRule")
    r.map(spec, "spec", ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"))
    host = r.str(spec.get("host"), "spec.host")
    tp = _traffic_policy(r, spec.get("trafficPolicy"), "spec.trafficPolicy", top=True) \
        if spec.get("trafficPolicy") is not None else None
    subsets = []
    seen: set[str] = set()
    for i, x in enumerate(r.list(spec.get("subsets"), "spec.subsets")):
        p = f"spec.subsets[{i}]"
        m = r.map(x, p, ("name", "labels", "trafficPolicy"))
        sname = r.str(m.get("name"), f"{p}.name")
        if sname in seen:
            raise r.fail(f"{p}.name", f"duplicate subset {sname!r}")
        seen.add(sname)
        stp = _traffic_policy(r, m.get("trafficPolicy"), f"{p}.trafficPolicy", top=True) \
            if m.get("trafficPolicy") is not None else None
        subsets.append(Subset(sname, r.labels(m.get("labels"), f"{p}.labels"), stp))
    selector = None
    if spec.get("workloadSelector") is not None:
        ws = r.map(spec.get("workloadSelector"), "spec.workloadSelector", ("matchLabels",))
        selector = r.labels(ws.get("matchLabels"), "spec.workloadSelector.matchLabels")
    return DestinationRule(ns, name, host, tuple(subsets), tp, r.strs(spec.get("exportTo"), "spec.exportTo"),
                           selector, order, tuple(r.warnings))


def _traffic_policy(r: _R, v: Any, path: str, *, top: bool) -> TrafficPolicy:
    fields = ["loadBalancer", "connectionPool", "outlierDetection", "tls", "tunnel", "proxyProtocol"]
    if top:
        fields.append("portLevelSettings")
    else:
        fields.append("port")
    m = r.map(v, path, fields)
    lb, ch, locality, warmup = None, None, None, None
    if m.get("loadBalancer") is not None:
        p = f"{path}.loadBalancer"
        lbm = r.map(m.get("loadBalancer"), p, ("simple", "consistentHash", "localityLbSetting",
                                                "warmupDurationSecs", "warmup"))
        if lbm.get("simple") is not None and lbm.get("consistentHash") is not None:
            raise r.fail(p, "only one of simple, consistentHash may be set")
        if lbm.get("simple") is not None:
            if lbm["simple"] not in LB_SIMPLE:
                raise r.fail(f"{p}.simple", "expected one of " + ", ".join(LB_SIMPLE))
            lb = lbm["simple"]
        if lbm.get("consistentHash") is not None:
            ch = _consistent_hash(r, lbm["consistentHash"], f"{p}.consistentHash")
        if lbm.get("localityLbSetting") is not None:
            loc = _locality_lb(r, lbm["localityLbSetting"], f"{p}.localityLbSetting",
                               outlier=m.get("outlierDetection") is not None)
            if ch is not None:
                # Our consistent-hash tables take priorities only from a Service's traffic distribution. The
                # setting is kept all the same: istiod's precedence (GetLocalityLbSetting: the DR's setting, then
                # the traffic distribution) means a DR setting — even ``enabled: false`` — turns the distribution
                # off (found by review; endpoints.lb_candidates reads it).
                r.warn(f"{p}.localityLbSetting",
                       "locality load balancing is not supported with consistentHash; ignored, except that it "
                       "overrides the Service's traffic distribution, as in istiod")
            locality = loc
        if lbm.get("warmup") is not None:
            warmup = _warmup(r, lbm["warmup"], f"{p}.warmup")
            if lbm.get("warmupDurationSecs") is not None:
                _positive(r, lbm["warmupDurationSecs"], f"{p}.warmupDurationSecs", 0.0)
                # istiod applyRoundRobinLoadBalancer: ``case loadbalancer.GetWarmup() != nil`` comes first.
                r.warn(f"{p}.warmupDurationSecs", "ignored: warmup is set")
        elif lbm.get("warmupDurationSecs") is not None:
            # Deprecated: istiod setSlowStartConfig sets only the window (Envoy's defaults for the rest).
            warmup = Warmup(_positive(r, lbm["warmupDurationSecs"], f"{p}.warmupDurationSecs", 0.0))
        if warmup is not None and (ch is not None or lb in ("RANDOM", "PASSTHROUGH")):
            # istiod sets slow_start_config only in applyRoundRobinLoadBalancer / applyLeastRequestLoadBalancer
            # (Envoy: "slow start is supported in Round Robin and Least Request load balancer types").
            r.warn(f"{p}.warmup" if lbm.get("warmup") is not None else f"{p}.warmupDurationSecs",
                   "slow start applies to ROUND_ROBIN and LEAST_REQUEST only; ignored")
            warmup = None
    pool = _connection_pool(r, m.get("connectionPool"), f"{path}.connectionPool") \
        if m.get("connectionPool") is not None else None
    od = _outlier(r, m.get("outlierDetection"), f"{path}.outlierDetection") \
        if m.get("outlierDetection") is not None else None
    tls_mode = None
    if m.get("tls") is not None:
        t = r.map(m.get("tls"), f"{path}.tls")
        if t.get("mode") is not None:
            if t["mode"] not in ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"):
                raise r.fail(f"{path}.tls.mode", "expected DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL")
            tls_mode = t["mode"]
    for k in ("tunnel", "proxyProtocol"):
        if m.get(k) is not None:
            r.map(m.get(k), f"{path}.{k}")
            r.warn(f"{path}.{k}", "not supported; ignored")
    port_level = []
    if top:
        for i, x in enumerate(r.list(m.get("portLevelSettings"), f"{path}.portLevelSettings")):
            p = f"{path}.portLevelSettings[{i}]"
            sub = _traffic_policy(r, x, p, top=False)
            pm = r.map(r.map(x, p).get("port"), f"{p}.port", ("number",))
            port_level.append((r.int(pm.get("number"), f"{p}.port.number", 1, MAX_PORT), sub))
    return TrafficPolicy(lb, ch, pool, od, tls_mode, tuple(port_level), locality_lb=locality, warmup=warmup)


def _warmup(r: _R, v: Any, path: str) -> Warmup:
    """``loadBalancer.warmup`` (destination_rule.proto WarmupConfiguration): ``duration`` required;
    ``minimumPercent`` 0..100; ``aggression`` at least 1 (the CRD's minimum)."""
    m = r.map(v, path, ("duration", "minimumPercent", "aggression"))
    if m.get("duration") is None:
        raise r.fail(f"{path}.duration", "required field is missing")
    duration = _positive(r, m["duration"], f"{path}.duration", 0.0)

    def number(key: str, default: float, lo: float, hi: float | None) -> float:
        x = m.get(key)
        if x is None:
            return default
        bad = isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
        if bad or x < lo or (hi is not None and x > hi):
            raise r.fail(f"{path}.{key}", f"expected a number {lo:g}..{hi:g}" if hi is not None
                         else f"expected a number >= {lo:g}")
        return float(x)

    return Warmup(duration, number("minimumPercent", WARMUP_MIN_PERCENT_DEFAULT, 0.0, 100.0),
                  number("aggression", WARMUP_AGGRESSION_DEFAULT, 1.0, None))


_TOPOLOGY_LOCALITY_LABELS = (LABEL_REGION, LABEL_ZONE, LABEL_SUBZONE)


def _locality_lb(r: _R, v: Any, path: str, *, outlier: bool) -> LocalityLbSetting:
    """``loadBalancer.localityLbSetting`` (destination_rule.proto LocalityLoadBalancerSetting), validated as
    istiod's ``ValidateLocalityLbSetting`` (pkg/config/validation/validation.go) does."""
    m = r.map(v, path, ("enabled", "distribute", "failover", "failoverPriority"))
    enabled = None if m.get("enabled") is None else r.bool(m["enabled"], f"{path}.enabled")
    raw_distribute = r.list(m.get("distribute"), f"{path}.distribute")
    raw_failover = r.list(m.get("failover"), f"{path}.failover")
    if raw_distribute and raw_failover:
        # istiod: "can not simultaneously specify 'distribute' and 'failover'".
        raise r.fail(path, "can not simultaneously specify 'distribute' and 'failover'")
    priority = r.strs(m.get("failoverPriority"), f"{path}.failoverPriority")
    for i, item in enumerate(priority):
        name, eq, value = item.partition("=")
        # istiod splits "label=value" at '=' (priorityLabelOverrides); the value overrides the proxy's own.
        if not name or "=" in value:
            raise r.fail(f"{path}.failoverPriority[{i}]", "expected a label name, or name=value")
        if raw_failover and name in _TOPOLOGY_LOCALITY_LABELS:
            # istiod: "can not simultaneously set 'failover' and topology label '%s' in 'failover_priority'".
            raise r.fail(f"{path}.failoverPriority[{i}]",
                         f"can not simultaneously set 'failover' and topology label '{name}' in 'failoverPriority'")
    distribute = []
    sources = []
    for i, x in enumerate(raw_distribute):
        p = f"{path}.distribute[{i}]"
        dm = r.map(x, p, ("from", "to"))
        src = r.str(dm.get("from"), f"{p}.from")
        to = r.map(dm.get("to"), f"{p}.to")
        if not to:
            raise r.fail(f"{p}.to", "at least one locality is required")
        weights = []
        for loc, w in to.items():
            # istiod: "locality weight must be in range [1, 100]"; "total locality weight %v != 100".
            weights.append((loc, r.int(w, f"{p}.to.{loc}", 1, 100)))
        total = sum(w for _, w in weights)
        if total != 100:
            raise r.fail(f"{p}.to", f"total locality weight {total} != 100")
        _check_localities(r, [loc for loc, _ in weights], f"{p}.to")
        sources.append(src)
        distribute.append(LocalityDistribute(src, tuple(weights)))
    _check_localities(r, sources, f"{path}.distribute")
    failover = []
    for i, x in enumerate(raw_failover):
        p = f"{path}.failover[{i}]"
        fm = r.map(x, p, ("from", "to"))
        src, dst = r.str(fm.get("from"), f"{p}.from"), r.str(fm.get("to"), f"{p}.to")
        if src == dst:
            raise r.fail(p, "locality lb failover settings must specify different regions")
        for key, val in (("from", src), ("to", dst)):
            if "/" in val:
                raise r.fail(f"{p}.{key}", "locality lb failover only specify region")
            if "*" in val:
                raise r.fail(f"{p}.{key}", "locality lb failover region should not contain '*' wildcard")
        failover.append(LocalityFailover(src, dst))
    if (failover or priority) and not outlier:
        # istiod's warning; without outlier detection no host is ever unhealthy, so nothing fails over.
        r.warn(path, "outlier detection policy must be provided for failover; failover is not applied")
    if distribute and priority:
        # istiod ApplyLocalityLoadBalancer: "one of Distribute or Failover settings can be applied" — distribute.
        r.warn(f"{path}.failoverPriority", "ignored: distribute is set")
    return LocalityLbSetting(enabled, tuple(distribute), tuple(failover), priority)


def _check_localities(r: _R, localities: list[str], path: str) -> None:
    """istiod ``validateLocalities``: at most one '*', only as the last segment; no empty segment; no
    locality overlapping one listed before it (the same walk over a region → zone → subzone tree)."""
    tree: dict[str, dict[str, set[str]]] = {}
    for loc in localities:
        n = loc.count("*")
        if n and (n > 1 or not loc.endswith("*")):
            raise r.fail(path, f"locality {loc} wildcard '*' number can not exceed 1 and must be in the end")
        if "*" in tree:
            raise r.fail(path, f"locality {loc} overlap with previous specified ones")
        items = loc.split("/", 2)
        if any(x == "" for x in items):
            raise r.fail(path, f"locality {loc} must not contain empty region/zone/subzone info")
        overlap = False
        region = items[0]
        if len(items) == 1:
            overlap = region in tree
            tree[region] = {"*": {"*"}}
        elif len(items) == 2:
            zones = tree.setdefault(region, {})
            overlap = "*" in zones or items[1] in zones
            zones[items[1]] = {"*"}
        else:
            zones = tree.setdefault(region, {})
            subs = zones.setdefault(items[1], set()) if "*" not in zones else {"*"}
            overlap = "*" in zones or "*" in subs or items[2] in subs
            subs.add(items[2])
        if overlap:
            raise r.fail(path, f"locality {loc} overlap with previous specified ones")


_HASH_KEYS = (HASH_HEADER, HASH_COOKIE, HASH_SOURCE_IP, HASH_QUERY)


def _consistent_hash(r: _R, v: Any, path: str) -> ConsistentHash:
    """``loadBalancer.consistentHash`` (destination_rule.proto ConsistentHashLB), validated as istiod's
    ``validateLoadBalancer`` does, plus what Envoy would reject when loading the cluster."""
    m = r.map(v, path, (*_HASH_KEYS, "ringHash", "maglev", "minimumRingSize"))
    keys = [k for k in _HASH_KEYS if m.get(k) is not None]
    if len(keys) > 1:
        # ``oneof hash_key``: a second member is a decoding error for the API server.
        raise r.fail(path, f"only one of {', '.join(_HASH_KEYS)} may be set (got {', '.join(keys)})")
    kind: str | None = keys[0] if keys else None
    name = ""
    cookie = None
    if kind == HASH_HEADER:
        name = r.wire_str(m[kind], f"{path}.{kind}")
    elif kind == HASH_QUERY:
        name = r.wire_str(m[kind], f"{path}.{kind}")
        if "&" in name or "=" in name:
            raise r.fail(f"{path}.{kind}", "a query parameter name cannot contain '&' or '='")
    elif kind == HASH_SOURCE_IP:
        if not r.bool(m[kind], f"{path}.{kind}"):
            # istiod: ConnectionProperties{SourceIp: false}; Envoy then builds no hash method.
            r.warn(f"{path}.{kind}", "false hashes nothing: every request gets a random host of the ring")
            kind = None
    elif kind == HASH_COOKIE:
        cookie = _http_cookie(r, m[kind], f"{path}.{kind}")
        name = cookie.name
    if not keys:
        # istiod accepts a consistentHash without a hash key; Envoy then has no hash policy and "just
        # choose[s] a random value (this effectively becomes the random LB)" (thread_aware_lb_impl.cc).
        r.warn(path, "no hash key (httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName): "
                     "every request gets a random host of the ring")
    if m.get("ringHash") is not None and m.get("maglev") is not None:
        raise r.fail(path, "only one of ringHash, maglev may be set")     # ``oneof hash_algorithm``
    legacy = r.int(m.get("minimumRingSize", 0), f"{path}.minimumRingSize", 0, RING_HASH_MAX_SIZE)
    if legacy and (m.get("ringHash") is not None or m.get("maglev") is not None):
        # istiod: "only one of MinimumRingSize or Maglev/Ringhash can be specified".
        raise r.fail(f"{path}.minimumRingSize", "only one of minimumRingSize or maglev/ringHash can be specified")
    if legacy:
        # istiod: "consistent hash MinimumRingSize is deprecated, use ConsistentHashLB's RingHash
        # configuration instead" (a warning; the value is still used).
        r.warn(f"{path}.minimumRingSize", "deprecated; use ringHash.minimumRingSize")
    algorithm, ring, table = RING_HASH, legacy or RING_HASH_MIN_SIZE_DEFAULT, MAGLEV_TABLE_SIZE_DEFAULT
    if m.get("ringHash") is not None:
        rh = r.map(m["ringHash"], f"{path}.ringHash", ("minimumRingSize",))
        # Envoy RingHash.minimum_ring_size: "limited to 8M entries"; istiod passes 0 as "unset" (1024).
        ring = r.int(rh.get("minimumRingSize", 0), f"{path}.ringHash.minimumRingSize", 0,
                     RING_HASH_MAX_SIZE) or RING_HASH_MIN_SIZE_DEFAULT
    if m.get("maglev") is not None:
        algorithm = MAGLEV
        mg = r.map(m["maglev"], f"{path}.maglev", ("tableSize",))
        p = f"{path}.maglev.tableSize"
        size = mg.get("tableSize", 0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise r.fail(p, "expected a prime number below 5000011")
        # istiod validateLoadBalancer, in this order.
        if size == 0:
            raise r.fail(p, "tableSize must be set for maglev")
        if size >= MAGLEV_TABLE_SIZE_LIMIT:
            raise r.fail(p, "tableSize must be less than 5000011 for maglev")
        if not is_prime(size):
            raise r.fail(p, "tableSize must be a prime number for maglev")
        table = size
        if size > MAGLEV_BUILD_MAX_TABLE_SIZE:
            r.warn(p, f"this proxy builds Maglev tables of at most {MAGLEV_BUILD_MAX_TABLE_SIZE} slots; "
                      f"{MAGLEV_BUILD_MAX_TABLE_SIZE} is used")
    elif ring > RING_BUILD_MAX_SIZE:
        r.warn(f"{path}.ringHash.minimumRingSize" if m.get("ringHash") is not None else f"{path}.minimumRingSize",
               f"this proxy builds rings of at most {RING_BUILD_MAX_SIZE} points; {RING_BUILD_MAX_SIZE} is used")
    return ConsistentHash(kind, name, cookie, algorithm, ring, table)


def _http_cookie(r: _R, v: Any, path: str) -> HttpCookie:
    m = r.map(v, path, ("name", "path", "ttl", "attributes"))
    if m.get("name") in (None, ""):
        raise r.fail(f"{path}.name", "name required for HttpCookie")          # istiod's message
    name = r.wire_str(m["name"], f"{path}.name")
    # RFC 6265 §4.1.1: cookie-name is a token, RFC 2616 §2.2 "any CHAR except CTLs or separators": among
    # ASCII exactly RFC 9110's tchar. A non-ASCII character is neither a CTL nor a separator and passes.
    bad = next((c for c in name if c.isascii() and c not in _TCHARS), None)
    if bad is not None:
        raise r.fail(f"{path}.name", f"{bad!r} cannot be in a cookie name (RFC 6265: a token)")
    cpath = r.wire_str(m.get("path", ""), f"{path}.path", empty_ok=True)
    if ";" in cpath:
        raise r.fail(f"{path}.path", "';' cannot be in a cookie path (it would end the Set-Cookie attribute)")
    # istiod no longer requires ttl (it once said "ttl required for HttpCookie"); without one, Envoy never
    # generates the cookie and a request without it is not hashed.
    ttl = r.opt_duration(m.get("ttl"), f"{path}.ttl")
    attrs = []
    for i, x in enumerate(r.list(m.get("attributes"), f"{path}.attributes")):
        p = f"{path}.attributes[{i}]"
        a = r.map(x, p, ("name", "value"))
        an = r.wire_str(a.get("name"), f"{p}.name")
        av = r.wire_str(a.get("value", ""), f"{p}.value", empty_ok=True)
        if ";" in an or ";" in av or "=" in an:
            raise r.fail(p, "';' (and '=' in the name) cannot be in a cookie attribute")
        attrs.append((an, av))
    return HttpCookie(name, cpath, ttl, tuple(attrs))


def _connection_pool(r: _R, v: Any, path: str) -> ConnectionPool:
    m = r.map(v, path, ("tcp", "http"))
    t = r.map(m.get("tcp"), f"{path}.tcp", ("maxConnections", "connectTimeout", "tcpKeepalive",
                                            "maxConnectionDuration", "idleTimeout"))
    h = r.map(m.get("http"), f"{path}.http", ("http1MaxPendingRequests", "http2MaxRequests",
                                              "maxRequestsPerConnection", "maxRetries", "idleTimeout",
                                              "h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams"))
    if t.get("tcpKeepalive") is not None:
        r.map(t.get("tcpKeepalive"), f"{path}.tcp.tcpKeepalive")
    if h.get("h2UpgradePolicy") is not None and h["h2UpgradePolicy"] not in ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"):
        raise r.fail(f"{path}.http.h2UpgradePolicy", "expected DEFAULT, DO_NOT_UPGRADE or UPGRADE")
    if h.get("useClientProtocol") is not None:
        r.bool(h.get("useClientProtocol"), f"{path}.http.useClientProtocol")
    return ConnectionPool(
        max_connections=r.opt_int(t.get("maxConnections"), f"{path}.tcp.maxConnections", 1, MAX_U32),
        connect_timeout_s=r.opt_duration(t.get("connectTimeout"), f"{path}.tcp.connectTimeout"),
        idle_timeout_s=r.opt_duration(t.get("idleTimeout"), f"{path}.tcp.idleTimeout"),
        max_connection_duration_s=r.opt_duration(t.get("maxConnectionDuration"), f"{path}.tcp.maxConnectionDuration"),
        http1_max_pending_requests=r.opt_int(h.get("http1MaxPendingRequests"), f"{path}.http.http1MaxPendingRequests", 1, MAX_U32),
        http2_max_requests=r.opt_int(h.get("http2MaxRequests"), f"{path}.http.http2MaxRequests", 1, MAX_U32),
        max_requests_per_connection=r.opt_int(h.get("maxRequestsPerConnection"), f"{path}.http.maxRequestsPerConnection", 0, MAX_U32),
        max_retries=r.opt_int(h.get("maxRetries"), f"{path}.http.maxRetries", 0, MAX_U32),
        http_idle_timeout_s=r.opt_duration(h.get("idleTimeout"), f"{path}.http.idleTimeout"),
        max_concurrent_streams=r.opt_int(h.get("maxConcurrentStreams"), f"{path}.http.maxConcurrentStreams", 1, MAX_U32),
    )


def _outlier(r: _R, v: Any, path: str) -> OutlierDetection:
    m = r.map(v, path, ("consecutiveErrors", "consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
                        "baseEjectionTime", "maxEjectionPercent", "minHealthPercent",
                        "splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures"))
    d = OutlierDetection()
    c5 = m.get("consecutive5xxErrors", m.get("consecutiveErrors"))
    if m.get("splitExternalLocalOriginErrors") is not None:
        r.bool(m["splitExternalLocalOriginErrors"], f"{path}.splitExternalLocalOriginErrors")
    r.opt_int(m.get("consecutiveLocalOriginFailures"), f"{path}.consecutiveLocalOriginFailures", 0, MAX_U32)

    def pct(key: str, default: float) -> float:
        x = m.get(key)
        if x is None:
            return default
        return float(r.int(x, f"{path}.{key}", 0, 100))

    return OutlierDetection(
        consecutive_5xx_errors=d.consecutive_5xx_errors if c5 is None else r.int(
            c5, f"{path}.{'consecutive5xxErrors' if 'consecutive5xxErrors' in m else 'consecutiveErrors'}", 0, MAX_U32),
        consecutive_gateway_errors=r.int(m.get("consecutiveGatewayErrors", 0), f"{path}.consecutiveGatewayErrors", 0, MAX_U32),
        interval_s=_positive(r, m.get("interval"), f"{path}.interval", d.interval_s),
        base_ejection_time_s=_positive(r, m.get("baseEjectionTime"), f"{path}.baseEjectionTime", d.base_ejection_time_s),
        max_ejection_percent=pct("maxEjectionPercent", d.max_ejection_percent),
        min_health_percent=pct("minHealthPercent", d.min_health_percent),
    )


def _positive(r: _R, v: Any, path: str, default: float) -> float:
    if v is None:
        return default
    s = r.duration(v, path)
    if s <= 0:
        raise r.fail(path, "expected a positive duration")
    return s


# ---------------------------------------------------------------------------------------------
# Gateway API: HTTPRoute


def parse_http_route(doc: dict, where: Where, *, order: int = 0) -> HttpRoute:
    r, ns, name, _, spec = _envelope(doc, where, (), GATEWAY_API_VERSIONS, "HTTPRoute")
    r.map(spec, "spec", ("parentRefs", "hostnames", "rules"))
    parents = _read_parent_refs(r, r.list(spec.get("parentRefs"), "spec.parentRefs"))
    hostnames = tuple(h.lower() for h in r.strs(spec.get("hostnames"), "spec.hostnames"))
    rules_v = r.list(spec.get("rules"), "spec.rules")
    # Gateway API: rules default to one rule matching PathPrefix "/" with no backends.
    rules = tuple(_gw_rule(r, x, f"spec.rules[{i}]") for i, x in enumerate(rules_v)) if rules_v else (GwRule(),)
    return HttpRoute(ns, name, parents, hostnames, rules, order, tuple(r.warnings))


def _read_parent_refs(r: _R, items: list) -> tuple[ParentRef, ...]:
    """A Gateway API route's ``spec.parentRefs`` (``items``, the list as read): group defaults to the Gateway API
    group, kind to Gateway; at least one is required."""
    parents = []
    for i, x in enumerate(items):
        p = f"spec.parentRefs[{i}]"
        m = r.map(x, p, ("group", "kind", "name", "namespace", "port", "sectionName"))
        parents.append(ParentRef(
            group=r.str(m.get("group", "gateway.networking.k8s.io"), f"{p}.group", empty_ok=True),
            kind=r.str(m.get("kind", "Gateway"), f"{p}.kind"),
            name=r.str(m.get("name"), f"{p}.name"),
            namespace=r.opt_str(m.get("namespace"), f"{p}.namespace"),
            port=r.opt_int(m.get("port"), f"{p}.port", 1, MAX_PORT),
            section_name=r.opt_str(m.get("sectionName"), f"{p}.sectionName"),
        ))
    if not parents:
        raise r.fail("spec.parentRefs", "at least one parentRef is required (a Service or the waypoint Gateway)")
    return tuple(parents)


def _gw_rule(r: _R, v: Any, path: str) -> GwRule:
    m = r.map(v, path, ("name", "matches", "filters", "backendRefs", "timeouts", "retry", "sessionPersistence"))
    matches_v = r.list(m.get("matches"), f"{path}.matches")
    # Gateway API: an empty matches list defaults to PathPrefix "/".
    matches = tuple(_gw_match(r, x, f"{path}.matches[{i}]") for i, x in enumerate(matches_v)) or (GwMatch(),)
    f = _gw_filters(r, m.get("filters"), f"{path}.filters", allow_redirect=True)
    if f["rewrite"] is not None and f["rewrite"].path_kind == "prefix" or \
            f["redirect"] is not None and f["redirect"].path_kind == "prefix":
        for i, mm in enumerate(matches):
            if mm.path_type != "PathPrefix":
                # Gateway API: "ReplacePrefixMatch is only compatible with a PathPrefix HTTPRouteMatch."
                raise r.fail(f"{path}.filters", "ReplacePrefixMatch needs every match to be a PathPrefix match")
    if f["rewrite"] is not None and f["redirect"] is not None:
        raise r.fail(f"{path}.filters", "URLRewrite and RequestRedirect cannot be used together")
    backends = []
    for i, x in enumerate(r.list(m.get("backendRefs"), f"{path}.backendRefs")):
        p = f"{path}.backendRefs[{i}]"
        b = r.map(x, p, ("group", "kind", "name", "namespace", "port", "weight", "filters"))
        bf = _gw_filters(r, b.get("filters"), f"{p}.filters", allow_redirect=False)
        backends.append(BackendRef(
            name=r.str(b.get("name"), f"{p}.name"),
            namespace=r.opt_str(b.get("namespace"), f"{p}.namespace"),
            port=r.opt_int(b.get("port"), f"{p}.port", 1, MAX_PORT),
            weight=r.int(b.get("weight", 1), f"{p}.weight", 0, GATEWAY_MAX_WEIGHT),
            group=r.str(b.get("group", ""), f"{p}.group", empty_ok=True),
            kind=r.str(b.get("kind", "Service"), f"{p}.kind"),
            headers=bf["headers"],
        ))
    if f["redirect"] is not None and backends:
        raise r.fail(f"{path}.backendRefs", "RequestRedirect cannot be used with backendRefs")
    req_t = back_t = None
    if m.get("timeouts") is not None:
        t = r.map(m.get("timeouts"), f"{path}.timeouts", ("request", "backendRequest"))
        req_t = r.opt_duration(t.get("request"), f"{path}.timeouts.request")
        back_t = r.opt_duration(t.get("backendRequest"), f"{path}.timeouts.backendRequest")
        # Gateway API: a zero duration ("0s") disables the timeout.
        req_t = req_t or None
        back_t = back_t or None
        if req_t is not None and back_t is not None and back_t > req_t:
            raise r.fail(f"{path}.timeouts.backendRequest", "must not be longer than timeouts.request")
    retries = None
    if m.get("retry") is not None:
        retries = _gw_retry(r, m.get("retry"), f"{path}.retry", back_t)
    elif back_t is not None:
        # istiod conversion.go convertHTTPRoute: "if vs.Retries != nil { vs.Retries.PerTryTimeout = timeout }
        # else { vs.Timeout = timeout }" — without a retry block backendRequest is the route timeout (it
        # replaces timeouts.request), and the route keeps the default retry policy, with no per-try timeout.
        req_t = back_t
    if m.get("sessionPersistence") is not None:
        r.map(m.get("sessionPersistence"), f"{path}.sessionPersistence")
        r.warn(f"{path}.sessionPersistence", "not supported; ignored")
    return GwRule(
        name=r.str(m.get("name", ""), f"{path}.name", empty_ok=True),
        matches=matches, backend_refs=tuple(backends), headers=f["headers"], rewrite=f["rewrite"],
        redirect=f["redirect"], mirrors=f["mirrors"], request_timeout_s=req_t,
        backend_request_timeout_s=back_t, retries=retries,
    )


def _gw_retry(r: _R, v: Any, path: str, per_try: float | None) -> RetryPolicy:
    m = r.map(v, path, ("codes", "attempts", "backoff"))
    codes = frozenset(r.int(c, f"{path}.codes[{i}]", 400, 599) for i, c in enumerate(r.list(m.get("codes"), f"{path}.codes")))
    # Istio's gateway conversion: attempts default 2; the default retry_on plus the codes given.
    attempts = r.int(m.get("attempts", DEFAULT_RETRY_POLICY.attempts), f"{path}.attempts", 0, 2**31 - 1)
    base = DEFAULT_RETRY_POLICY.backoff_base_s
    if m.get("backoff") is not None:
        base = r.duration(m.get("backoff"), f"{path}.backoff") or base
    on = frozenset({"connect-failure", "refused-stream", "unavailable", "cancelled"})
    if codes:
        on |= {"retriable-status-codes"}
    return RetryPolicy(attempts, on, codes, per_try, backoff_base_s=base, backoff_max_s=base * 10)


def _gw_path_match_value(r: _R, v: Any, path: str) -> str:
    s = r.str(v, path)
    if not s.startswith("/"):
        raise r.fail(path, 'expected a path starting with "/"')
    return s


def _gw_match(r: _R, v: Any, path: str) -> GwMatch:
    m = r.map(v, path, ("path", "headers", "queryParams", "method"))
    ptype, pvalue, pmatch = "PathPrefix", "/", None
    if m.get("path") is not None:
        pm = r.map(m.get("path"), f"{path}.path", ("type", "value"))
        ptype = pm.get("type", "PathPrefix")
        if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
            raise r.fail(f"{path}.path.type", "expected Exact, PathPrefix or RegularExpression")
        if ptype == "RegularExpression":
            pvalue = r.str(pm.get("value", "/"), f"{path}.path.value")
            pmatch = StringMatch("regex", pvalue, pattern=r.regex(pvalue, f"{path}.path.value",
                                                                  max_chars=GW_PATH_VALUE_MAX))
        else:
            pvalue = _gw_path_match_value(r, pm.get("value", "/"), f"{path}.path.value")
            if ptype == "Exact":
                pmatch = StringMatch("exact", pvalue)
    headers: list[GwHeaderMatch] = []
    seen: set[str] = set()
    for i, x in enumerate(r.list(m.get("headers"), f"{path}.headers")):
        name, sm = _gw_kv_match(r, x, f"{path}.headers[{i}]", max_chars=GW_HEADER_VALUE_MAX)
        # Wire form, lowercased ASCII-only (Envoy LowerCaseString: absl::AsciiStrToLower).
        lname = ascii_lower(wire_form(name))
        # Gateway API: "If multiple entries specify equivalent header names, only the first entry with
        # an equivalent name MUST be considered for a match."
        if lname not in seen:
            seen.add(lname)
            headers.append(GwHeaderMatch(lname, sm))
    qps: list[tuple[str, StringMatch]] = []
    seen_q: set[str] = set()
    for i, x in enumerate(r.list(m.get("queryParams"), f"{path}.queryParams")):
        name, sm = _gw_kv_match(r, x, f"{path}.queryParams[{i}]", max_chars=GW_QUERY_VALUE_MAX)
        if name not in seen_q:  # query names are case-sensitive
            seen_q.add(name)
            qps.append((wire_form(name), sm))
    method = None
    if m.get("method") is not None:
        method = r.str(m.get("method"), f"{path}.method")
        if method not in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"):
            raise r.fail(f"{path}.method", "expected an HTTP method (GET, POST, ...)")
    return GwMatch(ptype, pvalue, pmatch, tuple(headers), tuple(qps), method)


def _gw_kv_match(r: _R, v: Any, path: str, *, max_chars: int) -> tuple[str, StringMatch]:
    m = r.map(v, path, ("type", "name", "value"))
    name = r.str(m.get("name"), f"{path}.name")
    t = m.get("type", "Exact")
    value = r.str(m.get("value"), f"{path}.value", empty_ok=True)
    if t == "Exact":
        return name, StringMatch("exact", value)
    if t == "RegularExpression":
        return name, StringMatch("regex", value, pattern=r.regex(value, f"{path}.value", max_chars=max_chars))
    raise r.fail(f"{path}.type", "expected Exact or RegularExpression")


def _gw_header_ops(r: _R, v: Any, path: str) -> HeaderOps:
    m = r.map(v, path, ("set", "add", "remove"))

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, x in enumerate(r.list(m.get(key), f"{path}.{key}")):
            p = f"{path}.{key}[{i}]"
            e = r.map(x, p, ("name", "value"))
            out.append((ascii_lower(r.wire_str(e.get("name"), f"{p}.name")),
                        r.wire_str(e.get("value"), f"{p}.value", empty_ok=True)))
        return tuple(out)

    return HeaderOps(pairs("set"), pairs("add"), _removed(r, m.get("remove"), f"{path}.remove"))


# Gateway API HTTPCORSFilter (GEP-1767; apis/v1/httproute_types.go). The CRD's own limits and enums, which
# the API server enforces before istiod sees the route (MaxItems, +listType=set: no duplicates).
GW_CORS_MAX_ORIGINS = 64      # allowOrigins: "MaxItems=64"
GW_CORS_MAX_METHODS = 9       # allowMethods: "MaxItems=9" (the nine methods; "*" only alone)
GW_CORS_MAX_HEADERS = 64      # allowHeaders / exposeHeaders: "MaxItems=64"
GW_HEADER_NAME_MAX = 256      # HTTPHeaderName's CRD MaxLength
GW_CORS_MAX_AGE_DEFAULT = 5   # maxAge: "+kubebuilder:default=5" ("The default value of Access-Control-Max-Age ... is 5")
GW_CORS_MAX_AGE_MAX = 2**31 - 1   # maxAge is an int32 ("Minimum=1")
# HTTPMethodWithWildcard: "Enum=GET;HEAD;POST;PUT;DELETE;CONNECT;OPTIONS;TRACE;PATCH;*".
_GW_CORS_METHODS = frozenset(_CORS_METHODS | {"*"})
# CORSOrigin: "*", or "<scheme>://<host>(:<port>)" (the CRD's doc; its pattern refuses a path, query or
# fragment and a port of more than 5 digits); the host may hold "*" wildcards.
_GW_ORIGIN = re.compile(r"\*|[a-zA-Z][a-zA-Z0-9+\-.]+://[^:/?#]+(:[0-9]{1,5})?")
# What current istiod makes of a wildcard origin (below): one or more DNS labels, or an IP literal.
_ORIGIN_HOST_RE = r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])"
_ORIGIN_ANY_RE = r"[A-Za-z][A-Za-z0-9+.-]*://" + _ORIGIN_HOST_RE + r"(?::[0-9]{1,5})?"
_ORIGIN_LABELS_RE = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"


def _gw_cors(r: _R, v: Any, path: str) -> CorsPolicy:
    """A Gateway API ``CORS`` filter (HTTPCORSFilter), checked as its CRD does and translated as istiod's
    gateway conversion does (``createCorsFilter`` in pilot/pkg/config/kube/gateway/conversion.go) into
    the VirtualService corsPolicy that TranslateCORSPolicy then hands to Envoy — so the same
    ``CorsPolicy`` the VirtualService parser builds.

    istiod as of istio/istio#59018 ("gatewayapi: fix cors origin and preflight filters": "Support
    wildcards on origins (uses the same approach of kgateway)", "Disable forwarding unmatched
    preflights") and #59026 ("make the cors origin stricter with wildcards": for ``*``, "Use strict regex
    that only matches valid origin formats per RFC 6454 / Format: <scheme>://<host>(:<port>)?"), both
    back-ported to release-1.28 (#59360). Before them istiod made every origin an exact match ("TODO:
    support wildcards (https://github.com/kubernetes-sigs/gateway-api/issues/3648)"), so
    ``https://*.example.com`` never matched a real origin — istio/istio#58729. So:

    - an origin without ``*`` is an exact match; ``*`` alone allows any well-formed origin
      (``<scheme>://<host>(:<port>)``); a ``*`` inside the host stands for one or more DNS labels (the
      CRD: "``*`` is a greedy match to the left, including any number of DNS labels"), the rest literal.
      (The two regexes are ours, written to those rules: the PRs' exact expressions were not at hand.)
    - unmatched preflights are not forwarded (IGNORE): a preflight from another origin is answered 200
      without ``access-control-allow-origin`` (the CRD: "the gateway returns 204/200 response but
      doesn't set the relevant cross-origin response headers").
    - ``maxAge`` has the CRD's default, 5 s; istiod passes it on when > 0 (the CRD's minimum is 1).
    - ``allowCredentials: true`` sets the header; false or unset omits it.
    - ``*`` in allowMethods / allowHeaders is handed on as is: Envoy's filter echoes the preflight's
      requested method / headers for it (policy/routing/cors.py), which is also what the CRD asks for
      with credentials ("the value ... is same as the Access-Control-Request-Method header").
    """
    m = r.map(v, path, ("allowOrigins", "allowCredentials", "allowMethods", "allowHeaders", "exposeHeaders",
                        "maxAge"))

    def items(key: str, limit: int) -> tuple[str, ...]:
        out = r.strs(m.get(key), f"{path}.{key}")
        if len(out) > limit:
            raise r.fail(f"{path}.{key}", f"at most {limit} items")
        for i, x in enumerate(out):
            if x in out[:i]:
                raise r.fail(f"{path}.{key}[{i}]", f"duplicate value {x!r}")
        return out

    origins_v = items("allowOrigins", GW_CORS_MAX_ORIGINS)
    if "*" in origins_v and len(origins_v) > 1:
        raise r.fail(f"{path}.allowOrigins", "AllowOrigins cannot contain '*' alongside other origins")
    origins: list[StringMatch] = []
    for i, x in enumerate(origins_v):
        p = f"{path}.allowOrigins[{i}]"
        if not _GW_ORIGIN.fullmatch(x):
            raise r.fail(p, "expected \"*\" or <scheme>://<host>(:<port>), without a path")
        if "*" not in x:
            origins.append(StringMatch("exact", x))
            continue
        text = _ORIGIN_ANY_RE if x == "*" else _ORIGIN_LABELS_RE.join(re.escape(part) for part in x.split("*"))
        try:
            origins.append(StringMatch("regex", text, pattern=compile_regex(text)))
        except RegexError as e:
            raise r.fail(p, f"cannot be made a regular expression: {e}") from None
    methods = items("allowMethods", GW_CORS_MAX_METHODS)
    for i, x in enumerate(methods):
        if x not in _GW_CORS_METHODS:
            raise r.fail(f"{path}.allowMethods[{i}]", f"{x!r} is not one of " + ", ".join(sorted(_GW_CORS_METHODS)))
    if "*" in methods and len(methods) > 1:
        raise r.fail(f"{path}.allowMethods", "AllowMethods cannot contain '*' alongside other methods")

    def names(key: str) -> str:
        # HTTPHeaderName: an RFC 9110 token (tchar), as the VirtualService check, of at most its CRD length.
        # istiod appends each, TranslateCORSPolicy joins them with ",".
        return _cors_header_names(r, items(key, GW_CORS_MAX_HEADERS), f"{path}.{key}", GW_HEADER_NAME_MAX)

    max_age = r.int(m.get("maxAge", GW_CORS_MAX_AGE_DEFAULT), f"{path}.maxAge", 1, GW_CORS_MAX_AGE_MAX)
    credentials = r.bool(m["allowCredentials"], f"{path}.allowCredentials") \
        if m.get("allowCredentials") is not None else False
    return CorsPolicy(tuple(origins), ",".join(methods), names("allowHeaders"), names("exposeHeaders"),
                      str(max_age), credentials, forward_unmatched_preflights=False)


_FILTER_FIELD = {
    "RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
    "URLRewrite": "urlRewrite", "RequestRedirect": "requestRedirect", "RequestMirror": "requestMirror",
    "CORS": "cors", "ExtensionRef": "extensionRef",
}


def _gw_filters(r: _R, v: Any, path: str, *, allow_redirect: bool) -> dict:
    """A rule's (``allow_redirect``) or a backendRef's filters."""
    req, resp = HeaderOps(), HeaderOps()
    cors: CorsPolicy | None = None
    rewrite: RewriteSpec | None = None
    redirect: RedirectSpec | None = None
    mirrors: list[MirrorSpec] = []
    for i, x in enumerate(r.list(v, path)):
        p = f"{path}[{i}]"
        m = r.map(x, p, ("type", *_FILTER_FIELD.values()))
        t = m.get("type")
        if not isinstance(t, str) or t not in _FILTER_FIELD:
            raise r.fail(f"{p}.type", "expected one of " + ", ".join(_FILTER_FIELD))
        body_path = f"{p}.{_FILTER_FIELD[t]}"
        body = m.get(_FILTER_FIELD[t])
        if t != "ExtensionRef" and body is None:
            raise r.fail(body_path, "required for this filter type")
        if t == "RequestHeaderModifier":
            req = _merge_ops(req, _gw_header_ops(r, body, body_path))
        elif t == "ResponseHeaderModifier":
            resp = _merge_ops(resp, _gw_header_ops(r, body, body_path))
        elif t == "URLRewrite":
            if rewrite is not None:
                raise r.fail(p, "URLRewrite may appear only once")
            rewrite = _gw_rewrite(r, body, body_path)
        elif t == "RequestRedirect":
            if not allow_redirect:
                raise r.fail(p, "RequestRedirect is not allowed on a backendRef")
            if redirect is not None:
                raise r.fail(p, "RequestRedirect may appear only once")
            redirect = _gw_redirect(r, body, body_path)
        elif t == "RequestMirror":
            mirrors.append(_gw_mirror(r, body, body_path))
        elif t == "CORS":
            if not allow_redirect:
                # A CORS policy is the route's (Envoy's CORS filter reads it per route, istiod puts it on the
                # route it builds from the rule), not one backend's.
                raise r.fail(p, "CORS is not allowed on a backendRef (it is a rule's filter)")
            if cors is not None:
                raise r.fail(p, "CORS may appear only once")
            cors = _gw_cors(r, body, body_path)
        else:
            raise r.fail(p, "ExtensionRef filters are not supported")
    # The rule's CORS policy rides with its header rules to its action, as a VirtualService rule's corsPolicy
    # does (HeaderRules.cors; a redirect's or direct response's own ``cors``: table.py ``_gw_action``).
    return {"headers": HeaderRules(req, resp, cors) if (req or resp or cors) else NO_HEADER_RULES,
            "rewrite": rewrite, "redirect": redirect, "mirrors": tuple(mirrors)}


def _merge_ops(a: HeaderOps, b: HeaderOps) -> HeaderOps:
    return HeaderOps(a.set + b.set, a.add + b.add, a.remove + b.remove)


def _gw_path_modifier(r: _R, v: Any, path: str) -> tuple[str, str]:
    m = r.map(v, path, ("type", "replaceFullPath", "replacePrefixMatch"))
    t = m.get("type")
    # (Sent upstream or in Location: wire_str's NUL/CR/LF check as well.)
    if t == "ReplaceFullPath":
        p = f"{path}.replaceFullPath"
        return "full", r.wire_str(_gw_path_match_value(r, m.get("replaceFullPath"), p), p)
    if t == "ReplacePrefixMatch":
        p = f"{path}.replacePrefixMatch"
        return "prefix", r.wire_str(_gw_path_match_value(r, m.get("replacePrefixMatch"), p), p)
    raise r.fail(f"{path}.type", "expected ReplaceFullPath or ReplacePrefixMatch")


def _gw_rewrite(r: _R, v: Any, path: str) -> RewriteSpec:
    m = r.map(v, path, ("hostname", "path"))
    kind, value = (None, "")
    if m.get("path") is not None:
        kind, value = _gw_path_modifier(r, m.get("path"), f"{path}.path")
    return RewriteSpec(kind, value, None, "", r.opt_wire_str(m.get("hostname"), f"{path}.hostname"), element_wise=True)


def _gw_redirect(r: _R, v: Any, path: str) -> RedirectSpec:
    m = r.map(v, path, ("scheme", "hostname", "path", "port", "statusCode"))
    scheme = m.get("scheme")
    if scheme is not None and scheme not in ("http", "https"):
        raise r.fail(f"{path}.scheme", "expected http or https")
    status = m.get("statusCode", 302)  # Gateway API default 302
    if status not in (301, 302, 303, 307, 308) or isinstance(status, bool):
        raise r.fail(f"{path}.statusCode", "expected one of 301, 302, 303, 307, 308")
    kind, value = (None, "")
    if m.get("path") is not None:
        kind, value = _gw_path_modifier(r, m.get("path"), f"{path}.path")
    return RedirectSpec(status, scheme, r.opt_wire_str(m.get("hostname"), f"{path}.hostname"),
                        r.opt_int(m.get("port"), f"{path}.port", 1, MAX_PORT), None, kind, value, element_wise=True)


def _gw_mirror(r: _R, v: Any, path: str) -> MirrorSpec:
    m = r.map(v, path, ("backendRef", "percent", "fraction"))
    b = r.map(m.get("backendRef"), f"{path}.backendRef", ("group", "kind", "name", "namespace", "port"))
    name = r.str(b.get("name"), f"{path}.backendRef.name")
    ns = r.opt_str(b.get("namespace"), f"{path}.backendRef.namespace")
    pct = 100.0
    if m.get("percent") is not None:
        pct = float(r.int(m.get("percent"), f"{path}.percent", 0, 100))
    elif m.get("fraction") is not None:
        fr = r.map(m.get("fraction"), f"{path}.fraction", ("numerator", "denominator"))
        num = r.int(fr.get("numerator"), f"{path}.fraction.numerator", 0)
        den = r.int(fr.get("denominator", 100), f"{path}.fraction.denominator", 1)
        if num > den:
            raise r.fail(f"{path}.fraction", "numerator must not exceed denominator")
        pct = 100.0 * num / den
    host = name if ns is None else f"{name}.{ns}"
    return MirrorSpec(host, None, r.opt_int(b.get("port"), f"{path}.backendRef.port", 1, MAX_PORT), pct)


# ---------------------------------------------------------------------------------------------
# Gateway API: Gateway (the waypoint)


def parse_gateway(doc: dict, where: Where, *, order: int = 0) -> Gateway:
    r, ns, name, meta, spec = _envelope(doc, where, (), GATEWAY_API_VERSIONS, "Gateway")
    r.map(spec, "spec", ("gatewayClassName", "listeners", "addresses", "infrastructure", "backendTLS",
                         "allowedListeners"))
    labels = r.labels(meta.get("labels"), "metadata.labels")
    cls = r.str(spec.get("gatewayClassName"), "spec.gatewayClassName")
    listeners = []
    for i, x in enumerate(r.list(spec.get("listeners"), "spec.listeners")):
        p = f"spec.listeners[{i}]"
        m = r.map(x, p, ("name", "hostname", "port", "protocol", "tls", "allowedRoutes"))
        frm = "Same"
        if m.get("allowedRoutes") is not None:
            ar = r.map(m.get("allowedRoutes"), f"{p}.allowedRoutes", ("namespaces", "kinds"))
            nsm = r.map(ar.get("namespaces"), f"{p}.allowedRoutes.namespaces", ("from", "selector"))
            frm = nsm.get("from", "Same")
            if frm not in ("All", "Same", "Selector", "None"):
                raise r.fail(f"{p}.allowedRoutes.namespaces.from", "expected All, Same, Selector or None")
        listeners.append(Listener(
            name=r.str(m.get("name"), f"{p}.name"),
            port=r.int(m.get("port"), f"{p}.port", 1, MAX_PORT),
            protocol=r.str(m.get("protocol"), f"{p}.protocol"),
            hostname=r.opt_str(m.get("hostname"), f"{p}.hostname"),
            allowed_routes_from=frm,
        ))
    if cls == Gateway.WAYPOINT_CLASS:
        wf = labels.get("istio.io/waypoint-for", "service")
        if wf not in ("service", "workload", "all", "none"):
            raise r.fail("metadata.labels.istio.io/waypoint-for", "expected service, workload, all or none")
        if not any(lst.protocol == "HBONE" for lst in listeners):
            # istioctl waypoint generate: listener "mesh", port 15008, protocol HBONE.
            raise r.fail("spec.listeners", "a waypoint needs an HBONE listener (name mesh, port 15008, protocol HBONE)")
    return Gateway(ns, name, cls, tuple(listeners), labels, order)


PARSERS: dict[str, Callable[..., Any]] = {
    "VirtualService": parse_virtual_service,
    "DestinationRule": parse_destination_rule,
    "HTTPRoute": parse_http_route,
    "Gateway": parse_gateway,
}
