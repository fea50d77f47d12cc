"""Gateway API ``TCPRoute``, ``TLSRoute`` and ``GRPCRoute`` for the waypoint, parsed as istiod translates them.

Both attach like an HTTPRoute (``parentRefs`` to a Service, ``group: ""``, optional ``port``, or to the
waypoint's Gateway; table.py ``_hr_applies``) and are compiled by ``policy.routing.table`` into the
objects the route selector already handles, so the request path does not change:

* TCPRoute → the service port's ``TcpRoutes`` (a ``TcpRule`` per rule, weighted per tunnel), merged in
  age order with the VirtualServices' ``tcp`` routes, as istiod turns each TCPRoute into a VirtualService
  with ``tcp`` routes (``pilot/pkg/config/kube/gateway/route_collections.go TCPRouteCollection``) and the
  waypoint takes the first TCP route whose match fits the port across those VirtualServices
  (``pilot/pkg/networking/core/listener_waypoint.go getWaypointTCPRoutes``).
* TLSRoute → a TLS route of the service port's ``TcpRoutes``, which wins over every TCP route; the waypoint
  does not read the SNI, so a TLSRoute applies only when its hostnames allow the Service's own hostname
  (policy.routing.tls has istiod's rule, quoted).
* GRPCRoute → ``CompiledRule``s of ``GwMatcher`` over a path match, because istiod turns a
  ``GRPCMethodMatch`` into a VirtualService ``uri`` match (``conversion.go createGRPCURIMatch``):

  =====================  =================================  ==============================
  type                   service and method                 uri
  =====================  =================================  ==============================
  Exact (default)        both                               exact ``/<service>/<method>``
  Exact                  service only                       prefix ``/<service>/``
  Exact                  method only                        regex ``/[^/]+/<method>``
  RegularExpression      both                               regex ``/<service>/<method>``
  RegularExpression      service only                       regex ``/<service>/.+``
  RegularExpression      method only                        regex ``/[^/]+/<method>``
  =====================  =================================  ==============================

  ``GwMatch.path_type`` says which: ``Exact``, ``Prefix`` (a plain string prefix, Istio's VirtualService
  ``prefix``, not Gateway API's segment-wise ``PathPrefix``), ``RegularExpression`` (RE2 full match), or
  ``Any`` (no method match: every path).

Models are frozen; the parsers raise ``ConfigError`` naming file, document, resource and field, as the
other routing parsers do (they reuse ``policy.routing.parse``'s field reader and filter parser).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from policy.errors import Where
from policy.wire import ascii_lower, wire_form

from .model import (
    NO_HEADER_RULES, BackendRef, GwHeaderMatch, GwMatch, GwRule, NamespacedResource, ParentRef, StringMatch,
)
from .parse import (
    GATEWAY_MAX_WEIGHT, GW_HEADER_NAME_MAX, GW_HEADER_VALUE_MAX, MAX_PORT, _R, _TCHARS, _envelope, _gw_filters,
    _read_parent_refs,
)
from .regex import RegexError, compile_regex

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
# TCPRoute: v1alpha2 is what Istio's controller reads (sigs.k8s.io/gateway-api/apis/v1alpha2 TCPRoute in
# route_collections.go); Gateway API later served the same schema as v1 (apis/v1/tcproute_types.go).
TCP_ROUTE_VERSIONS = tuple(f"{GATEWAY_API_GROUP}/{v}" for v in ("v1alpha2", "v1"))
# TLSRoute: v1alpha2 is what Istio's controller reads (gatewayalpha.TLSRoute in route_collections.go
# TLSRouteCollection); later Gateway API serves the same fields as v1 (Istio converts v1 to v1alpha2,
# convertTLSRouteV1ToV1Alpha2).
TLS_ROUTE_VERSIONS = tuple(f"{GATEWAY_API_GROUP}/{v}" for v in ("v1alpha2", "v1"))
# GRPCRoute: v1 since Gateway API v1.1.0 (Standard channel), v1alpha2 before; same schema.
GRPC_ROUTE_VERSIONS = tuple(f"{GATEWAY_API_GROUP}/{v}" for v in ("v1", "v1alpha2"))

# The CRDs' own bounds (apis/v1alpha2/tcproute_types.go, apis/v1/grpcroute_types.go, shared_types.go),
# which the API server enforces before istiod sees a route.
MAX_PARENT_REFS = 32          # CommonRouteSpec.ParentRefs "MaxItems=32"
MAX_RULES = 16                # TCPRouteSpec.Rules / GRPCRouteSpec.Rules "MaxItems=16"
MAX_BACKEND_REFS = 16         # TCPRouteRule.BackendRefs / GRPCRouteRule.BackendRefs "MaxItems=16"
MAX_HOSTNAMES = 16            # GRPCRouteSpec.Hostnames / TLSRouteSpec.Hostnames "MaxItems=16"
MAX_GRPC_MATCHES = 8          # GRPCRouteRule.Matches "MaxItems=8" (16 x 8 is within the CRD's 128-match total)
MAX_FILTERS = 16              # GRPCRouteRule.Filters / GRPCBackendRef.Filters "MaxItems=16"
MAX_GRPC_HEADERS = 16         # GRPCRouteMatch.Headers "MaxItems=16"
GRPC_NAME_MAX = 1024          # GRPCMethodMatch.Service / .Method "MaxLength=1024"

# GRPCMethodMatch CEL rules for type Exact ("service must only contain valid characters ...").
_GRPC_SERVICE = re.compile(r"(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*")
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")

# GRPCRouteFilterType "Enum=ResponseHeaderModifier;RequestHeaderModifier;RequestMirror;ExtensionRef".
_GRPC_FILTER_FIELD = {
    "RequestHeaderModifier": "requestHeaderModifier", "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror", "ExtensionRef": "extensionRef",
}
_HEADER_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier")


# ---------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class TcpRouteRule:
    name: str = ""
    backend_refs: tuple[BackendRef, ...] = ()


@dataclass(frozen=True)
class TcpRoute(NamespacedResource):
    """A Gateway API TCPRoute. ``hostnames`` is always empty (TCPRoute has none); it is there so the
    attachment check shared with HTTPRoute (table.py ``_hr_applies``) reads every route kind alike."""

    kind: ClassVar[str] = "TCPRoute"
    namespace: str
    name: str
    parent_refs: tuple[ParentRef, ...]
    rules: tuple[TcpRouteRule, ...] = ()
    order: int = 0                   # load order, standing in for creationTimestamp ("oldest first")
    warnings: tuple[str, ...] = ()
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsRoute(NamespacedResource):
    """A Gateway API TLSRoute: a TCPRoute with ``hostnames`` (the SNI names). Its rules are ``TcpRouteRule``s
    (TLSRouteRule has the same fields). How a waypoint applies it: policy.routing.tls."""

    kind: ClassVar[str] = "TLSRoute"
    namespace: str
    name: str
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...] = ()
    rules: tuple[TcpRouteRule, ...] = ()
    order: int = 0
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class GrpcRoute(NamespacedResource):
    """A Gateway API GRPCRoute; its rules are ``GwRule``s (matches as ``GwMatch`` over the path, see the
    module docstring), so table.py builds their actions exactly as an HTTPRoute rule's."""

    kind: ClassVar[str] = "GRPCRoute"
    namespace: str
    name: str
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...] = ()
    rules: tuple[GwRule, ...] = ()
    order: int = 0
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _bounded_list(r: _R, v: Any, path: str, max_items: int) -> list:
    items = r.list(v, path)
    if len(items) > max_items:
        raise r.fail(path, f"at most {max_items} entries are allowed, got {len(items)}")
    return items


def _parent_refs(r: _R, spec: dict) -> tuple[ParentRef, ...]:
    # Read as parse_http_route reads them, within the CRD's bound on their number.
    return _read_parent_refs(r, _bounded_list(r, spec.get("parentRefs"), "spec.parentRefs", MAX_PARENT_REFS))


def _rule_name(r: _R, m: dict, path: str, seen: set[str]) -> str:
    name = r.str(m.get("name", ""), f"{path}.name", empty_ok=True)
    if name:
        if name in seen:
            # CRD: "Rule name must be unique within the route".
            raise r.fail(f"{path}.name", f"duplicate rule name {name!r} (rule names must be unique within the route)")
        seen.add(name)
    return name


def _backend_ref(r: _R, v: Any, path: str, *, grpc: bool) -> BackendRef:
    allowed = ("group", "kind", "name", "namespace", "port", "weight") + (("filters",) if grpc else ())
    b = r.map(v, path, allowed)
    group = r.str(b.get("group", ""), f"{path}.group", empty_ok=True)
    kind = r.str(b.get("kind", "Service"), f"{path}.kind")
    name = r.str(b.get("name"), f"{path}.name")
    port = r.opt_int(b.get("port"), f"{path}.port", 1, MAX_PORT)
    if group in ("", "core") and kind == "Service":
        if "." in name:
            # istiod buildDestination: "service name invalid; the name of the Service must be used, not
            # the hostname." — a hard error that keeps the whole route from being programmed.
            raise r.fail(f"{path}.name", "the name of the Service must be used, not a hostname")
        if port is None:
            # BackendObjectReference CEL: "Must have port for Service reference".
            raise r.fail(f"{path}.port", "required for a Service backendRef")
    headers = NO_HEADER_RULES
    if grpc and b.get("filters") is not None:
        fp = f"{path}.filters"
        _check_grpc_filters(r, b.get("filters"), fp, on_backend=True)
        headers = _gw_filters(r, b.get("filters"), fp, allow_redirect=False)["headers"]
    return BackendRef(
        name=name,
        namespace=r.opt_str(b.get("namespace"), f"{path}.namespace"),
        port=port,
        weight=r.int(b.get("weight", 1), f"{path}.weight", 0, GATEWAY_MAX_WEIGHT),   # "defaults to 1"
        group=group,
        kind=kind,
        headers=headers,
    )


# ---------------------------------------------------------------------------------------------
# TCPRoute


def _l4_rules(r, spec: dict, kind: str) -> list[TcpRouteRule]:
    """A TCPRoute's or TLSRoute's ``rules``: each a name and its backendRefs (the CRDs: rules and each rule's
    backendRefs "MinItems=1", at most MAX_RULES / MAX_BACKEND_REFS)."""
    if spec.get("rules") is None:
        raise r.fail("spec.rules", f"required ({kind}: rules MinItems=1)")
    rules_v = _bounded_list(r, spec.get("rules"), "spec.rules", MAX_RULES)
    if not rules_v:
        raise r.fail("spec.rules", "at least one rule is required")
    rules = []
    names: set[str] = set()
    for i, x in enumerate(rules_v):
        p = f"spec.rules[{i}]"
        m = r.map(x, p, ("name", "backendRefs"))
        rule_name = _rule_name(r, m, p, names)
        refs_v = _bounded_list(r, m.get("backendRefs"), f"{p}.backendRefs", MAX_BACKEND_REFS)
        if not refs_v:
            raise r.fail(f"{p}.backendRefs", "at least one backendRef is required")   # "MinItems=1"
        refs = tuple(_backend_ref(r, b, f"{p}.backendRefs[{j}]", grpc=False) for j, b in enumerate(refs_v))
        rules.append(TcpRouteRule(rule_name, refs))
    return rules


def parse_tcp_route(doc: dict, where: Where, *, order: int = 0) -> TcpRoute:
    r, ns, name, _, spec = _envelope(doc, where, (), TCP_ROUTE_VERSIONS, "TCPRoute")
    r.map(spec, "spec", ("parentRefs", "rules"))
    parents = _parent_refs(r, spec)
    rules = _l4_rules(r, spec, "TCPRoute")
    if len(rules) > 1:
        # TCPRoute rules have no matches; istiod makes each a match-less VirtualService tcp route and the
        # waypoint uses the first one that matches (getTCPRouteMatch returns on the first empty match).
        r.warn("spec.rules", f"only the first of {len(rules)} rules is used (TCPRoute rules have no matches; "
                             "the waypoint takes the first TCP route)")
    return TcpRoute(ns, name, parents, tuple(rules), order, tuple(r.warnings))


# ---------------------------------------------------------------------------------------------
# TLSRoute

# Gateway API ``Hostname``: "a fully qualified domain name ... Hostname MAY be prefixed with a wildcard label
# (*.)" (the CRD's pattern, shared_types.go: lowercase labels, "MaxLength=253").
_GW_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
GW_HOSTNAME_MAX = 253


def parse_tls_route(doc: dict, where: Where, *, order: int = 0) -> TlsRoute:
    r, ns, name, _, spec = _envelope(doc, where, (), TLS_ROUTE_VERSIONS, "TLSRoute")
    r.map(spec, "spec", ("parentRefs", "hostnames", "rules"))
    parents = _parent_refs(r, spec)
    hostnames = r.strs(_bounded_list(r, spec.get("hostnames"), "spec.hostnames", MAX_HOSTNAMES), "spec.hostnames")
    for i, h in enumerate(hostnames):
        if len(h) > GW_HOSTNAME_MAX or not _GW_HOSTNAME.fullmatch(h):
            raise r.fail(f"spec.hostnames[{i}]", f"{h!r} is not a hostname (a lowercase DNS name, "
                                                 "optionally prefixed with '*.')")
    rules = _l4_rules(r, spec, "TLSRoute")
    if len(rules) > 1:
        # Every rule gets the same match (the route's hostnames), so the first one always wins.
        r.warn("spec.rules", f"only the first of {len(rules)} rules is used (TLSRoute rules all match the "
                             "route's hostnames; the waypoint takes the first TLS route)")
    return TlsRoute(ns, name, parents, hostnames, tuple(rules), order, tuple(r.warnings))


# ---------------------------------------------------------------------------------------------
# GRPCRoute


def parse_grpc_route(doc: dict, where: Where, *, order: int = 0) -> GrpcRoute:
    r, ns, name, _, spec = _envelope(doc, where, (), GRPC_ROUTE_VERSIONS, "GRPCRoute")
    r.map(spec, "spec", ("parentRefs", "hostnames", "rules"))
    parents = _parent_refs(r, spec)
    hostnames = tuple(h.lower() for h in r.strs(_bounded_list(r, spec.get("hostnames"), "spec.hostnames",
                                                                 MAX_HOSTNAMES), "spec.hostnames"))
    rules_v = _bounded_list(r, spec.get("rules"), "spec.rules", MAX_RULES)
    rules = []
    names: set[str] = set()
    for i, x in enumerate(rules_v):
        rules.append(_grpc_rule(r, x, f"spec.rules[{i}]", names))
    if not rules:
        # istiod converts no rule, so it makes no VirtualService: the service keeps its other routes.
        r.warn("spec.rules", "no rules: this GRPCRoute routes nothing")
    return GrpcRoute(ns, name, parents, hostnames, tuple(rules), order, tuple(r.warnings))


def _grpc_rule(r: _R, v: Any, path: str, names: set[str]) -> GwRule:
    m = r.map(v, path, ("name", "matches", "filters", "backendRefs", "sessionPersistence"))
    rule_name = _rule_name(r, m, path, names)
    matches_v = _bounded_list(r, m.get("matches"), f"{path}.matches", MAX_GRPC_MATCHES)
    # "If no matches are specified, the implementation MUST match every gRPC request."
    matches = tuple(_grpc_match(r, x, f"{path}.matches[{i}]") for i, x in enumerate(matches_v)) or (GwMatch("Any"),)
    fp = f"{path}.filters"
    _check_grpc_filters(r, m.get("filters"), fp, on_backend=False)
    f = _gw_filters(r, m.get("filters"), fp, allow_redirect=True)
    refs_v = _bounded_list(r, m.get("backendRefs"), f"{path}.backendRefs", MAX_BACKEND_REFS)
    backends = tuple(_backend_ref(r, b, f"{path}.backendRefs[{j}]", grpc=True) for j, b in enumerate(refs_v))
    if m.get("sessionPersistence") is not None:
        r.map(m.get("sessionPersistence"), f"{path}.sessionPersistence")
        r.warn(f"{path}.sessionPersistence", "not supported; ignored")
    # No timeouts or retry on a GRPCRoute rule: istiod's convertGRPCRoute sets neither, so the route gets
    # Istio's default retry policy (table.py: retries None ⇒ DEFAULT_RETRY_POLICY) and no timeout.
    return GwRule(name=rule_name, matches=matches, backend_refs=backends, headers=f["headers"], mirrors=f["mirrors"])


def _check_grpc_filters(r: _R, v: Any, path: str, *, on_backend: bool) -> None:
    """What a GRPCRoute filter list may hold, before ``_gw_filters`` (HTTPRoute's parser) reads the bodies."""
    seen: set[str] = set()
    for i, x in enumerate(_bounded_list(r, v, path, MAX_FILTERS)):
        p = f"{path}[{i}]"
        m = r.map(x, p)
        t = m.get("type")
        if not isinstance(t, str) or t not in _GRPC_FILTER_FIELD:
            # (HTTPRoute's URLRewrite, RequestRedirect and CORS are not GRPCRoute filters.)
            raise r.fail(f"{p}.type", "expected one of " + ", ".join(_GRPC_FILTER_FIELD))
        r.map(x, p, ("type", *_GRPC_FILTER_FIELD.values()))
        for other, key in _GRPC_FILTER_FIELD.items():
            if other != t and m.get(key) is not None:
                # CEL: "filter.<x> must be nil if the filter.type is not <X>".
                raise r.fail(f"{p}.{key}", f"must not be set when type is {t}")
        if t in _HEADER_FILTERS:
            if t in seen:
                raise r.fail(p, f"{t} filter cannot be repeated")
            seen.add(t)
        if t == "ExtensionRef":
            # istiod convertGRPCRoute: any other filter type is "unsupported filter type", and the route
            # is not programmed.
            raise r.fail(p, "ExtensionRef filters are not supported")
        if on_backend and t not in _HEADER_FILTERS:
            # istiod buildGRPCDestination honours only the header modifiers on a backendRef.
            raise r.fail(p, f"{t} is not supported on a backendRef (only RequestHeaderModifier and "
                            "ResponseHeaderModifier are)")


def _grpc_match(r: _R, v: Any, path: str) -> GwMatch:
    m = r.map(v, path, ("method", "headers"))
    ptype, pvalue, pmatch = "Any", "/", None
    if m.get("method") is not None:
        ptype, pvalue, pmatch = _grpc_method(r, m.get("method"), f"{path}.method")
    headers: list[GwHeaderMatch] = []
    seen: set[str] = set()
    for i, x in enumerate(_bounded_list(r, m.get("headers"), f"{path}.headers", MAX_GRPC_HEADERS)):
        name, sm = _grpc_header(r, x, f"{path}.headers[{i}]")
        lname = ascii_lower(wire_form(name))
        # "If multiple entries specify equivalent header names, only the first entry with an equivalent
        # name MUST be considered for a match."
        if lname not in seen:
            seen.add(lname)
            headers.append(GwHeaderMatch(lname, sm))
    return GwMatch(ptype, pvalue, pmatch, tuple(headers))


def _grpc_method(r: _R, v: Any, path: str) -> tuple[str, str, StringMatch]:
    mm = r.map(v, path, ("type", "service", "method"))
    t = mm.get("type", "Exact")
    if t not in ("Exact", "RegularExpression"):
        raise r.fail(f"{path}.type", "expected Exact or RegularExpression")
    service = r.opt_str(mm.get("service"), f"{path}.service")
    method = r.opt_str(mm.get("method"), f"{path}.method")
    if service is None and method is None:
        raise r.fail(path, "one or both of 'service' or 'method' must be specified")
    for key, value in (("service", service), ("method", method)):
        if value is not None and len(value) > GRPC_NAME_MAX:
            raise r.fail(f"{path}.{key}", f"at most {GRPC_NAME_MAX} characters")
    if t == "Exact":
        if service is not None and not _GRPC_SERVICE.fullmatch(service):
            raise r.fail(f"{path}.service", "must only contain valid characters (matching "
                                            r"^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$)")
        if method is not None and not _GRPC_METHOD.fullmatch(method):
            raise r.fail(f"{path}.method", "must only contain valid characters (matching ^[A-Za-z_][A-Za-z_0-9]*$)")
        # istiod createGRPCURIMatch, GRPCMethodMatchExact.
        if method is None:
            value = f"/{service}/"
            return "Prefix", value, StringMatch("prefix", value)
        if service is None:
            return _regex_match(r, f"/[^/]+/{method}", path)
        value = f"/{service}/{method}"
        return "Exact", value, StringMatch("exact", value)
    # GRPCMethodMatchRegularExpression: the user's expressions inside the path's shape.
    if method is None:
        return _regex_match(r, f"/{service}/.+", path)
    if service is None:
        return _regex_match(r, f"/[^/]+/{method}", path)
    return _regex_match(r, f"/{service}/{method}", path)


def _regex_match(r: _R, regex: str, path: str) -> tuple[str, str, StringMatch]:
    try:
        pattern = compile_regex(regex)
    except RegexError as e:
        raise r.fail(path, f"invalid regular expression {regex!r}: {e}") from None
    return "RegularExpression", regex, StringMatch("regex", regex, pattern=pattern)


def _grpc_header(r: _R, v: Any, path: str) -> tuple[str, StringMatch]:
    m = r.map(v, path, ("type", "name", "value"))
    name = r.str(m.get("name"), f"{path}.name")
    if len(name) > GW_HEADER_NAME_MAX or any(c not in _TCHARS for c in name):
        # GRPCHeaderName is an HTTPHeaderName: RFC 7230 token characters, at most 256.
        raise r.fail(f"{path}.name", f"expected a header name (token characters, at most {GW_HEADER_NAME_MAX})")
    t = m.get("type", "Exact")
    value = r.str(m.get("value"), f"{path}.value")          # "MinLength=1"
    if len(value) > GW_HEADER_VALUE_MAX:
        raise r.fail(f"{path}.value", f"at most {GW_HEADER_VALUE_MAX} characters")
    if t == "Exact":
        return name, StringMatch("exact", value)
    if t == "RegularExpression":
        return name, StringMatch("regex", value, pattern=r.regex(value, f"{path}.value", max_chars=GW_HEADER_VALUE_MAX))
    raise r.fail(f"{path}.type", "expected Exact or RegularExpression")


__all__ = ["TcpRoute", "TcpRouteRule", "TlsRoute", "GrpcRoute", "parse_tcp_route", "parse_tls_route",
           "parse_grpc_route",
           "TCP_ROUTE_VERSIONS", "TLS_ROUTE_VERSIONS", "GRPC_ROUTE_VERSIONS"]
