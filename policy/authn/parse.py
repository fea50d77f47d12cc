"""Read a ``security.istio.io`` v1/v1beta1 ``RequestAuthentication`` document into the model.

Fail closed, as ``policy.authz.parse`` does: unknown fields and everything Istio's webhook refuses
(``pkg/config/validation/validation.go ValidateRequestAuthentication`` / ``validateJwtRule``) are errors that
name the file, document, resource and field. What loads but surprises — a ``jwksUri`` (no network here), a
policy that reaches no waypoint — goes to ``policy.warnings``.
"""

from __future__ import annotations

import re
from typing import Any, Iterator
from urllib.parse import urlsplit

from policy.authn.jwks import JwksError, fake_jwks, parse_jwks
from policy.authn.model import ClaimToHeader, FromHeader, JwtRule, RequestAuthentication
from policy.authz.parse import _best_effort_name, _join, _kind, read_attachment, security_envelope
from policy.authz.parse import _Reader as _SecurityReader
from policy.errors import ConfigError, Where
from policy.wire import ascii_lower, wire_form

KIND = "RequestAuthentication"   # (its apiVersions and top-level fields: policy.authz.parse.security_envelope)

SPEC_FIELDS = frozenset({"selector", "targetRef", "targetRefs", "jwtRules"})
RULE_FIELDS = frozenset({
    "issuer", "audiences", "jwksUri", "jwks", "fromHeaders", "fromParams", "fromCookies",
    "outputPayloadToHeader", "forwardOriginalToken", "outputClaimToHeaders", "timeout", "spaceDelimitedClaims",
})
FROM_HEADER_FIELDS = frozenset({"name", "prefix"})
CLAIM_TO_HEADER_FIELDS = frozenset({"header", "claim"})

# Our bounds: a policy with thousands of providers would make every request walk thousands of extractors.
MAX_JWT_RULES = 4096
MAX_LOCATIONS = 64          # per rule, per kind (fromHeaders / fromParams / fromCookies)
MAX_CLAIM_TO_HEADERS = 64   # per rule
MAX_CLAIM_PATH_DEPTH = 100  # "a.b.c" segments; a payload cannot nest deeper (codec.MAX_JSON_NESTING)

# policy_applier.go convertToEnvoyJwtConfig: "timeout := &durationpb.Duration{Seconds: 5}" when unset.
DEFAULT_JWKS_FETCH_TIMEOUT_S = 5.0
# policy_applier.go buildSpaceDelimitedClaims: "The default claims (\"scope\" and \"permission\") are always
# included" — Envoy splits these on spaces into lists in the payload it hands to RBAC.
DEFAULT_SPACE_DELIMITED_CLAIMS = ("permission", "scope")

# RFC 9110 §5.6.2 token: what validation.go ValidateStrictHTTPHeaderName accepts for outputClaimToHeaders.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Go time.ParseDuration units (Istio's CRDs take durations like "5s", "10ms").
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Reader(_SecurityReader):
    """AuthorizationPolicy's reader (mappings, fields, strings, errors at a path) plus what RequestAuthentication's
    fields need: warnings, bounded lists, header names."""

    def __init__(self, where: Where):
        super().__init__(where)
        self.warnings: list[str] = []

    def warn(self, path: str, problem: str) -> None:
        self.warnings.append(f"{path}: {problem}" if path else problem)

    def list(self, value: Any, path: str, limit: int) -> list:
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {_kind(value)}")
        if len(value) > limit:
            raise self.fail(path, f"may not have more than {limit} items")
        return value

    def entries(self, value: Any, path: str, limit: int, allowed: frozenset[str],
                null_problem: str) -> Iterator[tuple[str, dict]]:
        """A bounded list of mappings with only ``allowed`` fields: each entry's path and the entry. A null
        entry is ``null_problem``."""
        for i, item in enumerate(self.list(value, path, limit)):
            ipath = f"{path}[{i}]"
            if item is None:
                raise self.fail(ipath, null_problem)
            yield ipath, self.fields(item, ipath, allowed)

    def strings(self, value: Any, path: str, limit: int, empty_problem: str) -> tuple[str, ...]:
        items = self.list(value, path, limit)
        out = []
        for i, v in enumerate(items):
            s = self.string(v, f"{path}[{i}]")
            if s == "":
                raise self.fail(f"{path}[{i}]", empty_problem)
            out.append(s)
        return tuple(out)

    def header_name(self, value: Any, path: str) -> str:
        name = self.string(value, path)
        if not _HEADER_NAME.fullmatch(name):
            raise self.fail(path, f"invalid header name {name[:60]!r}: must be an HTTP token (RFC 9110 §5.6.2)")
        return ascii_lower(name)


def _parse_duration(text: str) -> float | None:
    """Go's time.ParseDuration for positive values; None if it is not one."""
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    return total if text else None


def _check_jwks_uri(uri: str) -> str | None:
    """security.ParseJwksURI: an http(s) URL with a host (and a numeric port if one is given)."""
    try:
        parts = urlsplit(uri)
        _ = parts.port   # raises for a non-numeric or out-of-range port
    except ValueError as err:
        return f"invalid jwks uri {uri[:120]!r}: {err}"
    if parts.scheme not in ("http", "https"):
        return f"invalid jwks uri {uri[:120]!r}: scheme must be http or https"
    if not parts.hostname:
        return f"invalid jwks uri {uri[:120]!r}: missing host"
    return None


class _Parser(_Reader):
    def jwt_rule(self, raw: Any, path: str, policy: str) -> JwtRule:
        body = self.fields(raw if raw is not None else {}, path, RULE_FIELDS)
        issuer = self.string(body.get("issuer", ""), _join(path, "issuer"))
        jwks_uri = self.string(body.get("jwksUri", ""), _join(path, "jwksUri"))
        jwks_text = self.string(body.get("jwks", ""), _join(path, "jwks"))
        if issuer == "" and jwks_uri == "":
            # validation.go validateJwtRule
            raise self.fail(path, "issuer or jwksUri must be non-empty string")
        audiences = ()
        if body.get("audiences") is not None:
            audiences = self.strings(body["audiences"], _join(path, "audiences"), MAX_LOCATIONS,
                                     "audience must be non-empty string")
        if jwks_uri:
            problem = _check_jwks_uri(jwks_uri)
            if problem:
                raise self.fail(_join(path, "jwksUri"), problem)
        if jwks_text:
            try:
                jwks = parse_jwks(jwks_text)
            except JwksError as err:
                raise self.fail(_join(path, "jwks"), f"jwks parse error: {err}") from None
        else:
            # The key set comes from the network: a waypoint fetches it when it builds its config
            # (proxy/jwks_resolver.py, as istiod's jwks_resolver.go); until a fetch succeeds it stands in istiod's
            # fake JWKS ("using a fake JWKS for now"), which rejects every token. A load here does not fetch.
            jwks = fake_jwks(jwks_uri)
            where = f"jwksUri {jwks_uri!r}" if jwks_uri else f"OpenID discovery for issuer {issuer!r}"
            self.warn(path, f"the key set comes from the network ({where}): a waypoint fetches it when it loads "
                            "the config and every 20 minutes; until a fetch succeeds it uses istiod's fake key set, "
                            "so every token for this rule is rejected with 401 \"Jwks doesn't have key to match kid "
                            "or alg from Jwt\". Put the key set inline in `jwks` to need no network")
        from_headers = []
        if body.get("fromHeaders") is not None:
            for ipath, h in self.entries(body["fromHeaders"], _join(path, "fromHeaders"), MAX_LOCATIONS,
                                         FROM_HEADER_FIELDS, "location header name must be non-null"):
                name = self.string(h.get("name", ""), _join(ipath, "name"))
                if name == "":
                    raise self.fail(_join(ipath, "name"), "location header name must be non-empty string")
                name = self.header_name(name, _join(ipath, "name"))
                prefix = self.string(h.get("prefix", ""), _join(ipath, "prefix"))
                from_headers.append(FromHeader(name, wire_form(prefix)))
        from_params = ()
        if body.get("fromParams") is not None:
            from_params = self.strings(body["fromParams"], _join(path, "fromParams"), MAX_LOCATIONS,
                                       "location query must be non-empty string")
        from_cookies = ()
        if body.get("fromCookies") is not None:
            from_cookies = self.strings(body["fromCookies"], _join(path, "fromCookies"), MAX_LOCATIONS,
                                        "cookie name must be non-empty string")
        payload_header = ""
        if body.get("outputPayloadToHeader") not in (None, ""):
            payload_header = self.header_name(body["outputPayloadToHeader"], _join(path, "outputPayloadToHeader"))
        forward = body.get("forwardOriginalToken", False)
        if not isinstance(forward, bool):
            raise self.fail(_join(path, "forwardOriginalToken"), f"expected a boolean, got {_kind(forward)}")
        claim_headers = []
        if body.get("outputClaimToHeaders") is not None:
            for ipath, c in self.entries(body["outputClaimToHeaders"], _join(path, "outputClaimToHeaders"),
                                         MAX_CLAIM_TO_HEADERS, CLAIM_TO_HEADER_FIELDS,
                                         "outputClaimToHeaders must not be null"):
                header = self.string(c.get("header", ""), _join(ipath, "header"))
                claim = self.string(c.get("claim", ""), _join(ipath, "claim"))
                if header == "" or claim == "":
                    raise self.fail(ipath, "outputClaimToHeaders header and claim value must be non-empty string")
                header = self.header_name(header, _join(ipath, "header"))
                claim_path = tuple(claim.split("."))
                if len(claim_path) > MAX_CLAIM_PATH_DEPTH:
                    raise self.fail(_join(ipath, "claim"), f"more than {MAX_CLAIM_PATH_DEPTH} nested names")
                claim_headers.append(ClaimToHeader(header, claim, claim_path))
        timeout_s = DEFAULT_JWKS_FETCH_TIMEOUT_S
        if body.get("timeout") is not None:
            text = self.string(body["timeout"], _join(path, "timeout"))
            parsed = _parse_duration(text)
            if parsed is None:
                raise self.fail(_join(path, "timeout"), f"invalid duration {text[:40]!r} (write e.g. \"5s\")")
            if parsed < 1e-3:
                # agent.ValidateDuration: "duration must be at least 1ms"
                raise self.fail(_join(path, "timeout"), "duration must be at least 1ms")
            timeout_s = parsed
        space_delimited = DEFAULT_SPACE_DELIMITED_CLAIMS
        if body.get("spaceDelimitedClaims") is not None:
            extra = self.strings(body["spaceDelimitedClaims"], _join(path, "spaceDelimitedClaims"), MAX_LOCATIONS,
                                 "claim name must be non-empty string")
            space_delimited = tuple(sorted(set(extra) | set(DEFAULT_SPACE_DELIMITED_CLAIMS)))
        return JwtRule(
            issuer=issuer, audiences=audiences, jwks=jwks, jwks_uri=jwks_uri, from_headers=tuple(from_headers),
            from_params=from_params, from_cookies=from_cookies, output_payload_to_header=payload_header,
            forward_original_token=forward, output_claim_to_headers=tuple(claim_headers),
            space_delimited_claims=space_delimited, timeout_s=timeout_s, policy=policy,
        )


def parse_request_authentication(doc: dict, where: Where) -> RequestAuthentication:
    """One whole ``security.istio.io`` RequestAuthentication document → the model, or ``ConfigError``."""
    if not where.name and isinstance(doc, dict):
        where = where.with_resource(where.kind or KIND, _best_effort_name(doc.get("metadata")))
    r = _Parser(where)
    doc, meta, name, namespace = security_envelope(r, doc, KIND)
    for key in ("labels", "annotations"):
        if meta.get(key) is not None:
            for k, v in r.mapping(meta[key], f"metadata.{key}").items():
                r.string(v, f"metadata.{key}[{k}]")

    spec = r.fields(doc.get("spec") if doc.get("spec") is not None else {}, "spec", SPEC_FIELDS)

    selector, refs = read_attachment(r, spec)

    rules: list[JwtRule] = []
    if spec.get("jwtRules") is not None:
        raw_rules = r.list(spec["jwtRules"], "spec.jwtRules", MAX_JWT_RULES)
        rules = [r.jwt_rule(x, f"spec.jwtRules[{i}]", f"{namespace}/{name}[{i}]") for i, x in enumerate(raw_rules)]
    if not refs:
        # policyattachment.go: "waypoints never use selector", and ztunnel does no JWT at all.
        r.warn("spec", "without targetRefs this policy applies to no waypoint (a waypoint takes only policies that "
                       "target its Gateway, its Services or GatewayClass istio-waypoint), and node proxies do not "
                       "validate JWTs: it has no effect in hbone-proxy")
    return RequestAuthentication(namespace=namespace, name=name, selector=selector, target_refs=tuple(refs),
                                 jwt_rules=tuple(rules), warnings=tuple(r.warnings))
