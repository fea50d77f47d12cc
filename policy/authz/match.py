"""The value matchers AuthorizationPolicy fields are made of: Istio's four-form string match, CIDRs,
URI path templates, and the request-side normalisation (path without query, BASE normalisation).

Pure functions over strings; the parser builds these once per policy so a decision only compares.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field

from policy.wire import ascii_lower, wire_form

# The four forms of Istio's string match (proto `message Rule` comment; ztunnel rbac.rs StringMatch).
EXACT = "exact"
PREFIX = "prefix"
SUFFIX = "suffix"
PRESENCE = "presence"
STRING_MATCH_KINDS = (EXACT, PREFIX, SUFFIX, PRESENCE)


# Wire form (policy/wire.py): values matched against HTTP request attributes (hosts, methods, paths,
# header values) are compared in their wire form, as Envoy's RBAC matchers compare the config string's
# UTF-8 bytes with the request's; ASCII-only case folding.


@dataclass(frozen=True)
class StringMatch:
    """One Istio string value: ``abc`` exact, ``abc*`` prefix, ``*abc`` suffix, ``*`` presence.

    Istio: "Presence match: `*` will match when value is not empty." Only a single leading or trailing
    ``*`` is special; it is not a glob (``*abc*`` is the suffix ``abc*``, as istiod's StringMatcherWithPrefix
    checks the leading ``*`` first).

    ``on_wire``: the value is compared with an HTTP request attribute (hosts, methods, paths, header
    values), i.e. in its wire form; identities and JWT claims are text and compared as text.
    """

    kind: str
    value: str = ""            # as written (explain output, describe)
    ignore_case: bool = False  # hosts: Envoy HostMatcher uses ignoreCase (matcher/header.go)
    on_wire: bool = False
    # What ``matches`` compares with (derived): the value, in wire form if on_wire, ASCII-lowered if ignore_case.
    needle: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        v = wire_form(self.value) if self.on_wire else self.value
        object.__setattr__(self, "needle", ascii_lower(v) if self.ignore_case else v)

    @classmethod
    def parse(cls, text: str, *, ignore_case: bool = False, on_wire: bool = False) -> "StringMatch":
        if ignore_case:
            text = ascii_lower(text)
        if text == "*":
            return cls(PRESENCE, "", ignore_case, on_wire)
        if text.startswith("*"):
            return cls(SUFFIX, text[1:], ignore_case, on_wire)
        if text.endswith("*"):
            return cls(PREFIX, text[:-1], ignore_case, on_wire)
        return cls(EXACT, text, ignore_case, on_wire)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.ignore_case:
            value = ascii_lower(value)
        kind = self.kind
        if kind == EXACT:
            return value == self.needle
        if kind == PREFIX:
            return value.startswith(self.needle)
        if kind == SUFFIX:
            return value.endswith(self.needle)
        return value != ""  # presence: "matches any non-empty value" (ztunnel test string_match)

    def __str__(self) -> str:
        if self.kind == PRESENCE:
            return "*"
        if self.kind == PREFIX:
            return self.value + "*"
        if self.kind == SUFFIX:
            return "*" + self.value
        return self.value


@dataclass(frozen=True)
class HeaderMatch(StringMatch):
    """A request header value. Istio's HeaderMatcher turns ``*`` into Envoy's ``present_match``, so a
    header that is present but empty still matches ``*`` (matcher/header.go HeaderMatcher)."""

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.kind == PRESENCE:
            return True
        return StringMatch.matches(self, value)


@dataclass(frozen=True)
class Cidr:
    """An IP block: a CIDR, or a single IP meaning /32 (/128) (Istio ValidateIPs; ztunnel IpNet)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    text: str = field(compare=False, default="")

    @classmethod
    def parse(cls, text: str) -> "Cidr":
        """Raise ValueError on a bad address. Like Go's netip.ParsePrefix, host bits may be set
        (``10.1.2.3/8`` is the block 10.0.0.0/8) — Envoy masks them too."""
        if "/" in text:
            net = ipaddress.ip_network(text, strict=False)
        else:
            net = ipaddress.ip_network(ipaddress.ip_address(text))
        return cls(net, text)

    def contains(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        if ip is None or ip.version != self.network.version:
            return False
        return ip in self.network

    def __str__(self) -> str:
        return self.text or str(self.network)


# Request-side addresses remembered parsed: a proxy sees the same few peers and destinations on every
# request, and ipaddress.ip_address costs ~3 µs (cProfile of the waypoint under load: parse_ip was ~5 %
# of its CPU). The address objects are immutable, so sharing them is safe.
PARSED_IP_CACHE_ENTRIES = 4096


@functools.lru_cache(maxsize=PARSED_IP_CACHE_ENTRIES)
def parse_ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A request-side address; None when absent or unparsable (so every positive IP match fails).

    An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, what a dual-stack socket reports) is compared as
    the IPv4 address, as ztunnel does with ``to_canonical()`` before RBAC.
    """
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# ---- paths --------------------------------------------------------------------------------------

MATCH_ONE_TEMPLATE = "{*}"   # one path segment (Envoy uri_template `*`)
MATCH_ANY_TEMPLATE = "{**}"  # zero or more segments, must be last (Envoy uri_template `**`)
# Valid literal segment in a path template: RFC 3986 pchar (Istio security.go validLiteral).
# fullmatch, not ^…$: `$` also matches before a final "\n", so "a\n" passed (found by fuzzing the same
# pattern in hbone/connect.py and policy/loader.py).
_VALID_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")
_PCHARS = r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]"


def contains_path_template(value: str) -> bool:
    return MATCH_ONE_TEMPLATE in value or MATCH_ANY_TEMPLATE in value


def check_path_template(value: str) -> str | None:
    """Istio's CheckValidPathTemplate: the problem with ``value`` as a path, or None if it is fine."""
    templated = contains_path_template(value)
    found_any = False
    for glob in value.strip("/").split("/"):
        if glob in (MATCH_ONE_TEMPLATE, MATCH_ANY_TEMPLATE):
            if found_any:
                return f"invalid path {value!r}: {{**}} is not the last operator"
            found_any = glob == MATCH_ANY_TEMPLATE
            continue
        if "{" in glob or "}" in glob:
            return f"invalid path {value!r}: contains '{{' or '}}' beyond a supported path template"
        if templated and not _VALID_LITERAL.fullmatch(glob):
            return f"invalid path {value!r}: segment {glob!r} is not a valid literal"
    return None


@dataclass(frozen=True)
class PathTemplate:
    """An Istio path template (``/foo/{*}/bar``, ``/foo/{**}``), compiled to the regex Envoy's
    uri_template matcher uses: ``*`` = one or more pchars (one segment), ``**`` = pchars and ``/``."""

    template: str
    regex: re.Pattern = field(compare=False, repr=False, default=None)  # type: ignore[assignment]

    @classmethod
    def parse(cls, template: str) -> "PathTemplate":
        out = []
        for i, part in enumerate(template.split("/")):
            if part == MATCH_ONE_TEMPLATE:
                out.append(_PCHARS + "+")
            elif part == MATCH_ANY_TEMPLATE:
                out.append(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=/]*")
            else:
                out.append(re.escape(part))
        return cls(template, re.compile("/".join(out)))

    def matches(self, value: str | None) -> bool:
        return value is not None and self.regex.fullmatch(value) is not None

    def __str__(self) -> str:
        return self.template


def parse_path_match(text: str) -> StringMatch | PathTemplate:
    # Istio: paths containing {*} / {**} become Envoy URI templates (security.ContainsPathTemplate);
    # everything else is the four-form string match on the path without query — Envoy's url_path
    # StringMatcher over the request's :path bytes, so in wire form. (A template's literals are RFC 3986
    # pchars, ASCII: check_path_template refuses anything else.)
    if contains_path_template(text):
        return PathTemplate.parse(text)
    return StringMatch.parse(text, on_wire=True)


def _is_dot(segment: str) -> bool:
    return segment == "." or segment.lower() == "%2e"


def _is_dotdot(segment: str) -> bool:
    return segment.lower() in ("..", ".%2e", "%2e.", "%2e%2e")


# RFC 3986 §2.3 unreserved characters: their percent-encodings are decoded (§6.2.2.2), in either hex case.
_UNRESERVED_ESCAPES = {f"%{c:02x}": chr(c) for c in
                       b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"}
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def decode_unreserved(path: str) -> str:
    """``%41``→``A`` and the other unreserved characters' escapes decoded, once (``%2561`` stays: no double
    decoding); every other escape — ``%2F``, ``%5C``, ``%00``, ``%25`` — as it was."""
    if "%" not in path:
        return path
    return _ESCAPE.sub(lambda m: _UNRESERVED_ESCAPES.get(m.group().lower(), m.group()), path)


def normalize_path(raw: str) -> str:
    """The path authorization matches: Istio's default ``pathNormalization: BASE``.

    Istio (security/normalization): BASE decodes the single percent-encoded unreserved characters
    ("%2d, %2e, %30-%39, %41-%5a, %5f, %61-%7a, %7e ... Enabled by default with the normalization option
    BASE"; "normalization happens only once, no double decoding"), then Envoy's ``normalize_path``:
    dot-segment removal (RFC 3986 §5.2.4), backslashes become ``/`` as Chromium's URL canonicaliser does.
    The query (``?``) and fragment (``#``) are dropped first: Envoy's ``url_path`` matcher "matches the
    path without the query string". ``%2F`` and ``%5C`` stay encoded and slashes are not merged (the
    DECODE_AND_MERGE_SLASHES / MERGE_SLASHES options, not the default). A ``%00`` stays here; a request with
    one never gets this far (the waypoint answers it 400, ``proxy.pipeline.http.normalized_target``).
    """
    if raw[:1] == "/" and "/." not in raw and "%" not in raw and "\\" not in raw and "?" not in raw \
            and "#" not in raw:
        # Nothing to normalise (no query or fragment, no dot segment — one starts "/." or is a %2e
        # form — no backslash): the result is the path itself. Most request paths take this branch.
        return raw
    return _normalize_path_segments(raw)


def _normalize_path_segments(raw: str) -> str:
    """``normalize_path`` the long way, segment by segment (any input)."""
    path = raw
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    path = decode_unreserved(path).replace("\\", "/")
    if not path.startswith("/"):
        # An absolute-form or empty request target never reaches here as a path in Envoy; treat it as
        # relative to the root so ``..`` cannot climb above it.
        path = "/" + path
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if _is_dot(seg):
            if last:
                out.append("")
            continue
        if _is_dotdot(seg):
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)
