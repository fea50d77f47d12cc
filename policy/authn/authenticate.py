"""The JWT check of one request, as the waypoint's Envoy runs Istio's ``jwt_authn`` config.

istiod (pilot/pkg/security/authn/policy_applier.go ``convertToEnvoyJwtConfig``) turns the rules into providers
``origins-<i>`` (rules sorted by issuer) and one requirement for every path:

- one rule: ``requires_any [origins-0, allow_missing]``;
- n rules: ``requires_any [origins-0, ..., origins-n-1, requires_all [requires_any [origins-i, allow_missing]
  for each i]]`` — "the innerAnd enforce a token, if provided, must be valid, and the outer OR aids the case
  where providers share the same location".

Envoy evaluates that tree (source/extensions/filters/http/jwt_authn/verifier.cc): a ``requires_any`` completes
with the first child that succeeds, else with the *last* child's status; ``requires_all`` with the first
failure; a provider verifier extracts the tokens at its provider's locations and needs every one valid (none
→ "Jwt is missing"); an ``allow_missing`` verifier extracts at the locations of its providers, passes when
there is no token, and otherwise reports the last token's status (authenticator.cc ``doneWithStatus``: "Unless
allowing failed or missing, all tokens must be verified successfully"). So, with ``allow_missing`` everywhere:
no token passes without a principal; a bad token is a 401 with the reason; a token from an issuer no rule
names is a 401 "Jwt issuer is not configured". We simulate that tree on a working copy of the request, so
header edits land exactly as Envoy's would (including sanitising the output headers a client may have sent).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence
from urllib.parse import unquote_to_bytes

from policy.authn.codec import freeze
from policy.authn.jwt import Jwt, parse_jwt, verify_signature, verify_time
from policy.authn.model import ALLOWED_NO_RULES, AuthnResult, JwtRule, Status
from policy.wire import ascii_lower

# source/common/jwt/jwt.h: "Clock skew defaults to one minute" (kClockSkewInSecond = 60); authenticator.cc
# uses it unless the provider sets clock_skew_seconds, which istiod never does.
CLOCK_SKEW_S = 60
# extractor.cc: the default locations when a rule names none — "Authorization: Bearer <token>", then the
# "access_token" query parameter (RFC 6750 §2.1, §2.3).
DEFAULT_HEADER = "authorization"
BEARER_PREFIX = "Bearer "
DEFAULT_PARAM = "access_token"
# filter.cc: "constexpr uint32_t MaximumUriLength = 256" — the path part of the realm in WWW-Authenticate.
MAX_REALM_PATH_BYTES = 256
# extractor.cc extractJWT: "as specified in RFC-4648 § 5, plus dot".
_B64URL_DOT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")


# ---- extraction (extractor.cc) --------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Location:
    kind: str                 # "header" | "param" | "cookie"
    name: str                 # lowercase header name, query parameter or cookie name (wire form)
    prefix: str               # header value prefix ("" = none)
    issuers: frozenset[str]   # JwtIssuerChecker: the issuers of the rules that named this location
    allow_all: bool           # "If a specified issuer is empty, it means to allow all issuers"

    def issuer_allowed(self, iss: str) -> bool:
        return self.allow_all or iss in self.issuers


@dataclass(frozen=True, eq=False)
class _Extractor:
    headers: tuple[_Location, ...]
    params: tuple[_Location, ...]
    cookies: tuple[_Location, ...]
    sanitize: tuple[str, ...]   # sanitizeHeaders: each rule's outputPayloadToHeader and claim headers

    @classmethod
    def build(cls, rules: Sequence[JwtRule]) -> "_Extractor":
        headers: dict[str, list] = {}
        params: dict[str, list] = {}
        cookies: dict[str, list] = {}
        sanitize: list[str] = []

        def add(table: dict, key: str, spec: tuple, issuer: str) -> None:
            entry = table.setdefault(key, [spec, set(), False])
            if issuer:
                entry[1].add(issuer)
            else:
                entry[2] = True

        for rule in rules:
            for h in rule.from_headers:
                add(headers, h.name + h.prefix, ("header", h.name, h.prefix), rule.issuer)
            for p in rule.from_params:
                add(params, p, ("param", p, ""), rule.issuer)
            for c in rule.from_cookies:
                add(cookies, c, ("cookie", c, ""), rule.issuer)
            # "If not specified, use default locations."
            if not (rule.from_headers or rule.from_params or rule.from_cookies):
                add(headers, DEFAULT_HEADER + BEARER_PREFIX, ("header", DEFAULT_HEADER, BEARER_PREFIX), rule.issuer)
                add(params, DEFAULT_PARAM, ("param", DEFAULT_PARAM, ""), rule.issuer)
            if rule.output_payload_to_header:
                sanitize.append(rule.output_payload_to_header)
            sanitize.extend(c.header for c in rule.output_claim_to_headers)

        def locations(table: dict) -> tuple[_Location, ...]:
            # std::map / btree_map: locations are tried in key order.
            return tuple(_Location(spec[0], spec[1], spec[2], frozenset(iss), allow)
                         for _, (spec, iss, allow) in sorted(table.items()))

        return cls(locations(headers), locations(params), locations(cookies), tuple(dict.fromkeys(sanitize)))


_B64URL_DOT_RUN = re.compile(r"[A-Za-z0-9\-_.]+")   # a run of _B64URL_DOT characters (ASCII only)


def _extract_jwt(value: str, after: int) -> str:
    """extractJWT: skip to the first base64url-or-dot character after the prefix and take the run of them;
    "if it finds no suitable string, it returns value_str as-is". (One regex search: the character loop it
    replaces took ~30 µs for a 600-byte token.)"""
    m = _B64URL_DOT_RUN.search(value, after)
    return value if m is None else m.group()


def _query_pairs(target: str) -> list[tuple[str, str, str]]:
    """Http::Utility::QueryParamsMulti::parseAndDecodeQueryString: (decoded key, decoded value, raw pair)."""
    q = target.find("?")
    if q < 0:
        return []
    out = []
    for raw in target[q + 1:].split("&"):
        if raw == "":
            continue
        key, eq, value = raw.partition("=")
        out.append((_pct(key), _pct(value) if eq else "", raw))
    return out


def _pct(text: str) -> str:
    # Percent-decoding of the request's bytes (one str char per byte), not of UTF-8 text.
    return unquote_to_bytes(text.encode("latin-1")).decode("latin-1") if "%" in text else text


def _cookies(headers: list[tuple[str, str]], wanted: set[str]) -> dict[str, str]:
    """Http::Utility::parseCookies: "k=v; k2=v2" in every Cookie header, surrounding quotes dropped, the first
    occurrence of a name kept."""
    found: dict[str, str] = {}
    for name, value in headers:
        if name != "cookie":
            continue
        for part in value.split(";"):
            part = part.lstrip(" \t")
            key, eq, val = part.partition("=")
            if not eq or key not in wanted or key in found:
                continue
            if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                val = val[1:-1]
            found[key] = val
    return found


@dataclass(frozen=True)
class _Token:
    value: str
    location: _Location


# ---- the working copy of the request ------------------------------------------------------------

@dataclass
class _Request:
    headers: list[tuple[str, str]]
    target: str
    removed: set[str] = field(default_factory=set)
    added: list[tuple[str, str]] = field(default_factory=list)
    payload: Any = None
    tokens: int = 0
    cache_until: float = math.inf

    def remove(self, name: str) -> None:
        if any(n == name for n, _ in self.headers):
            self.headers = [(n, v) for n, v in self.headers if n != name]
            self.added = [(n, v) for n, v in self.added if n != name]
        self.removed.add(name)

    def add(self, name: str, value: str) -> None:
        self.headers.append((name, value))
        self.added.append((name, value))

    def extract(self, ex: _Extractor) -> list[_Token]:
        tokens: list[_Token] = []
        for loc in ex.headers:
            # extractor.cc: "getAllOfHeaderAsString" — a header sent several times is one value, joined with ",",
            # and yields one token (the first after the prefix); not one per copy (found by review: a bad token
            # next to a good one in two Authorization headers was then let through).
            values = [value for name, value in self.headers if name == loc.name]
            if not values:
                continue
            value = values[0] if len(values) == 1 else ",".join(values)
            if loc.prefix:
                pos = value.find(loc.prefix)
                if pos < 0:
                    continue   # "value_prefix not found anywhere in value_str, so skip"
                value = _extract_jwt(value, pos + len(loc.prefix))
            tokens.append(_Token(value, loc))
        if ex.params:
            first: dict[str, str] = {}
            for key, value, _ in _query_pairs(self.target):
                first.setdefault(key, value)   # getFirstValue
            for loc in ex.params:
                if loc.name in first:
                    tokens.append(_Token(first[loc.name], loc))
        if ex.cookies:
            jar = _cookies(self.headers, {loc.name for loc in ex.cookies})
            for loc in ex.cookies:
                if loc.name in jar:
                    tokens.append(_Token(jar[loc.name], loc))
        return tokens

    def remove_token(self, token: _Token) -> None:
        loc = token.location
        if loc.kind == "header":
            self.remove(loc.name)   # JwtHeaderLocation::removeJwt: headers.remove(header_)
        elif loc.kind == "param":
            # JwtParamLocation::removeJwt drops the parameter from :path. (Envoy re-serialises the remaining
            # parameters sorted by name; we keep them as sent, in order.)
            path, q, _ = self.target.partition("?")
            if q:
                kept = [raw for key, _, raw in _query_pairs(self.target) if key != loc.name]
                self.target = path + ("?" + "&".join(kept) if kept else "")
        # JwtCookieLocation::removeJwt: "TODO(theshubhamp): remove JWT from cookies." — left in place.


# ---- verification of one token (authenticator.cc startVerify / verifyKey / handleGoodJwt) --------

def _sanitize_audience(aud: str) -> str:
    """check_audience.cc sanitizeAudience: drop a leading "http://" or "https://" and one trailing "/"."""
    if not aud:
        return aud
    for scheme in ("http://", "https://"):
        if aud.startswith(scheme):
            aud = aud[len(scheme):]
            break
    return aud[:-1] if aud.endswith("/") else aud


def _claim_text(value: Any) -> str:
    """authenticator.cc addJWTClaimToHeader: strings as they are, numbers by convertClaimDoubleToString (an
    integral value in [0, 2^64) as an integer, else std::to_string(double) = "%f"), booleans "true"/"false";
    anything else (lists, objects, null) adds nothing."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        try:
            d = float(value)
        except OverflowError:
            return ""
        if math.isfinite(d) and 0 <= d < 2.0**64 and d == int(d):
            return str(int(d))
        return "%f" % d
    return ""


def _claim_at(payload: dict, path: tuple[str, ...]) -> Any:
    v: Any = payload
    for key in path:
        if not isinstance(v, dict) or key not in v:
            return None
        v = v[key]
    return v


def _safe_header_value(text: str) -> str | None:
    # A claim is attacker-chosen text: never let CR, LF or NUL reach a header (request smuggling).
    raw = text.encode("utf-8", "surrogatepass").decode("latin-1")
    return None if any(c in raw for c in "\r\n\0") else raw


def _metadata_payload(jwt: Jwt, rule: JwtRule) -> dict:
    """payload_in_metadata with NormalizePayloadInMetadata.space_delimited_claims: each listed top-level claim
    that is a string becomes the list of its space-separated words (what RBAC's request.auth.claims sees)."""
    payload = dict(jwt.payload)
    for name in rule.space_delimited_claims:
        v = payload.get(name)
        if isinstance(v, str):
            payload[name] = [w for w in v.split(" ") if w]
    return payload


def _verify_token(req: _Request, token: _Token, provider: JwtRule | None, rules: "JwtRuleSet", now: int) -> Status:
    req.tokens += 1
    jwt = parse_jwt(token.value)
    if isinstance(jwt, Status):
        return jwt
    # "Check if `iss` is allowed." — by the rules that named the location this token came from.
    if not token.location.issuer_allowed(jwt.iss):
        return Status.JWT_UNKNOWN_ISSUER
    rule = provider if provider is not None else rules.find_by_issuer(jwt.iss)
    if rule is None:
        return Status.JWT_UNKNOWN_ISSUER
    status = verify_time(jwt, now, CLOCK_SKEW_S)
    if status is Status.OK:
        if jwt.exp:
            req.cache_until = min(req.cache_until, jwt.exp + CLOCK_SKEW_S + 1)
    elif status is Status.JWT_NOT_YET_VALID:
        req.cache_until = min(req.cache_until, jwt.nbf - CLOCK_SKEW_S)
    if status is not Status.OK:
        return status
    # CheckAudience::areAudiencesAllowed: no configured audiences allows any; else one of the token's must match.
    if rule.audiences:
        allowed = {_sanitize_audience(a) for a in rule.audiences}
        if not any(_sanitize_audience(a) in allowed for a in jwt.audiences):
            return Status.JWT_AUDIENCE_NOT_ALLOWED
    if rule.jwks is None or not rule.jwks.keys:
        return Status.JWKS_NO_VALID_KEYS
    status = verify_signature(jwt, rule.jwks)
    if status is not Status.OK:
        return status
    # handleGoodJwt
    if rule.output_payload_to_header:
        req.add(rule.output_payload_to_header, jwt.payload_b64)
    for c in rule.output_claim_to_headers:
        text = _claim_text(_claim_at(jwt.payload, c.path))
        value = _safe_header_value(text) if text else None
        if value:
            req.add(c.header, value)
    if not rule.forward_original_token:
        req.remove_token(token)
    req.payload = _metadata_payload(jwt, rule)
    return Status.OK


def _authenticate(req: _Request, ex: _Extractor, provider: JwtRule | None, allow_missing: bool,
                  rules: "JwtRuleSet", now: int) -> Status:
    """AuthenticatorImpl::verify + doneWithStatus: tokens are taken from the back of the extracted list."""
    for name in ex.sanitize:
        req.remove(name)     # sanitizeHeaders, before extraction
    tokens = req.extract(ex)
    if not tokens:
        return Status.OK if allow_missing else Status.JWT_MISSED
    status = Status.OK
    while tokens:
        status = _verify_token(req, tokens.pop(), provider, rules, now)
        if status is not Status.OK and not allow_missing:
            break
    return status


# ---- the requirement tree -----------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class _Node:
    kind: str                          # "provider" | "allow_missing" | "any" | "all"
    rule: JwtRule | None = None
    extractor: _Extractor | None = None
    children: tuple["_Node", ...] = ()


def _run(node: _Node, req: _Request, rules: "JwtRuleSet", now: int) -> Status:
    if node.kind == "provider":
        return _authenticate(req, node.extractor, node.rule, False, rules, now)
    if node.kind == "allow_missing":
        return _authenticate(req, node.extractor, None, True, rules, now)
    if node.kind == "any":
        status = Status.OK
        for child in node.children:
            status = _run(child, req, rules, now)
            if status is Status.OK:
                return status
        return status            # "number_completed_children_ == verifiers_.size()": the last child's status
    for child in node.children:  # "all"
        status = _run(child, req, rules, now)
        if status is not Status.OK:
            return status
    return Status.OK


def _build_tree(rules: tuple[JwtRule, ...]) -> _Node:
    def provider(r: JwtRule) -> _Node:
        return _Node("provider", r, _Extractor.build([r]))

    def optional(r: JwtRule) -> _Node:
        # AnyVerifierImpl: regular requirements first, then the allow_missing one over the providers they use.
        return _Node("any", children=(provider(r), _Node("allow_missing", extractor=_Extractor.build([r]))))

    if len(rules) == 1:
        return optional(rules[0])
    inner = _Node("all", children=tuple(optional(r) for r in rules))
    return _Node("any", children=tuple(provider(r) for r in rules) + (inner,))


@dataclass(frozen=True, eq=False)
class JwtRuleSet:
    """The JWT rules one waypoint enforces, compiled once per config snapshot (``jwt_rules_for_waypoint``).
    Identity matters (``eq=False``): a cache of results may key on the set object."""

    rules: tuple[JwtRule, ...]
    _tree: _Node | None = field(default=None, repr=False)

    @classmethod
    def of(cls, rules: Iterable[JwtRule]) -> "JwtRuleSet":
        # policy_applier.go: "Sort the jwt rules by the issuer alphabetically" (stable here).
        ordered = tuple(sorted(rules, key=lambda r: r.issuer))
        return cls(ordered, _build_tree(ordered) if ordered else None)

    def find_by_issuer(self, iss: str) -> JwtRule | None:
        """JwksCache::findByIssuer: the first provider with the issuer, else the first without one."""
        for r in self.rules:
            if r.issuer == iss:
                return r
        return next((r for r in self.rules if r.issuer == ""), None)

    def __len__(self) -> int:
        return len(self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def __repr__(self) -> str:
        return f"<JwtRuleSet rules={len(self.rules)} issuers={sorted({r.issuer for r in self.rules})}>"


EMPTY_RULE_SET = JwtRuleSet(())


# ---- the entry point ----------------------------------------------------------------------------

def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for n, v in headers if n == name), "")


def _realm(headers: list[tuple[str, str]], target: str, authority: str | None, scheme: str) -> str:
    """Http::Utility::buildOriginalUri(headers, MaximumUriLength): x-forwarded-proto "://" host path, the
    path cut to 256 bytes."""
    proto = _header(headers, "x-forwarded-proto") or scheme
    host = authority if authority is not None else (_header(headers, ":authority") or _header(headers, "host"))
    return f"{proto}://{host}{target[:MAX_REALM_PATH_BYTES]}"


def authenticate(rules: JwtRuleSet | Sequence[JwtRule], headers: Sequence[tuple[bytes, bytes]], target: bytes, *,
                 now: float, method: bytes | None = None, authority: bytes | None = None,
                 scheme: bytes = b"http") -> AuthnResult:
    """Decide one request against the waypoint's JWT rules (Envoy jwt_authn as istiod configures it).

    ``headers``: the request headers as (name, value) bytes, names in any case (HTTP/2 pseudo-headers may be
    included); ``target``: the request target (path and query); ``now``: Unix seconds, finite (Envoy uses
    whole seconds); ``method``/``authority`` when not among ``headers`` (``:method``/``:authority``/``Host``).
    Pass the ``JwtRuleSet`` built once per snapshot (``jwt_rules_for_waypoint``); a plain sequence of rules
    is accepted but compiled on every call.

    O(1) without rules. Never raises for any header, target or token: bad input is a 401 (or 403 for
    "Audiences in Jwt are not allowed", as Envoy answers).

    Caching (what the lead may memoise): the result is a pure function of (the ``JwtRuleSet`` object, the
    header list, ``target``, ``method``, ``authority``, ``scheme``, ``int(now)``), and for fixed other inputs it
    does not change while ``int(now) < result.cache_until`` — the first second at which a validated token
    expires (exp + 60 s skew) or a not-yet-valid one becomes valid (nbf - 60 s); ``math.inf`` when no token's
    time was checked (no token, or rejected before the time check: bad format, signature, issuer, audience),
    or the token is already expired. So a cache keyed on the token bytes (plus rule set identity and the
    request's other credential-bearing headers/query parameters) is safe until ``cache_until``; the edits
    (``remove``/``add``/``target``) are part of the cached value and must be re-applied per request.
    """
    if not rules:
        return ALLOWED_NO_RULES
    rule_set = rules if isinstance(rules, JwtRuleSet) else JwtRuleSet.of(rules)
    hdrs = [(ascii_lower(n.decode("latin-1")), v.decode("latin-1")) for n, v in headers]
    tgt = target.decode("latin-1")
    meth = method.decode("latin-1") if method is not None else _header(hdrs, ":method")
    # Istio sets bypass_cors_preflight: "The CORS preflight doesn't include user credentials, bypass regardless
    # of JWT requirements" (filter.cc isCorsPreflightRequest: OPTIONS with non-empty Origin and
    # Access-Control-Request-Method). No sanitising either: the filter completes before any verifier runs.
    if meth == "OPTIONS" and _header(hdrs, "origin") and _header(hdrs, "access-control-request-method"):
        return ALLOWED_NO_RULES
    req = _Request(list(hdrs), tgt)
    now_s = int(math.floor(now))
    status = _run(rule_set._tree, req, rule_set, now_s)
    if status is Status.OK:
        claims = freeze(req.payload) if req.payload is not None else None
        principal = None
        if claims is not None and isinstance(claims.get("iss"), str) and isinstance(claims.get("sub"), str):
            principal = f"{claims['iss']}/{claims['sub']}"   # Istio: request principal = "<iss>/<sub>"
        return AuthnResult(
            allowed=True, claims=claims, principal=principal,
            remove=tuple(sorted(n.encode("latin-1") for n in req.removed)),
            add=tuple((n.encode("latin-1"), v.encode("latin-1")) for n, v in req.added),
            target=req.target.encode("latin-1") if req.target != tgt else None,
            cache_until=req.cache_until, tokens=req.tokens,
        )
    auth = authority.decode("latin-1") if authority is not None else None
    value = f'Bearer realm="{_realm(hdrs, tgt, auth, scheme.decode("latin-1"))}"'
    if status is not Status.JWT_MISSED:
        value += ', error="invalid_token"'
    value = "".join(c for c in value if c not in "\r\n\0")   # never split the response header
    return AuthnResult(
        allowed=False, status=status.http_status, body=status.text, detail=status.details,
        response_headers=((b"www-authenticate", value.encode("latin-1")),), reason=status,
        cache_until=req.cache_until, tokens=req.tokens,
    )
