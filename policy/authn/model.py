"""The model of Istio ``RequestAuthentication`` (``security.istio.io`` v1/v1beta1) and of a JWT check's answer.

Sources (read through the project's search index; the snapshots named in reference/istio-semantics.md):
- istio/api ``security/v1beta1/request_authentication.proto`` and ``jwt.proto`` (the fields);
- istio/istio ``pilot/pkg/security/authn/policy_applier.go convertToEnvoyJwtConfig`` (how a rule becomes an
  Envoy ``jwt_authn`` provider), ``pkg/config/validation/validation.go validateJwtRule`` (what is refused);
- envoyproxy/envoy ``source/extensions/filters/http/jwt_authn/{filter,verifier,authenticator,extractor}.cc``
  and ``source/common/jwt/*`` (formerly google/jwt_verify_lib): what the waypoint's Envoy does per request.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from policy.authz.model import TargetRef

# ---- Envoy's jwt_authn statuses -----------------------------------------------------------------
# The texts are Envoy's getStatusString (source/common/jwt/status.cc, was jwt_verify_lib src/status.cc):
# the 401 body is this text and the response code details are jwt_authn_access_denied{<text, spaces → _>}.


class Status(enum.Enum):
    OK = "OK"
    JWT_MISSED = "Jwt is missing"
    JWT_NOT_YET_VALID = "Jwt not yet valid"
    JWT_EXPIRED = "Jwt is expired"
    JWT_BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    JWT_HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
    JWT_HEADER_BAD_JSON = "Jwt header is an invalid JSON"
    JWT_HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
    JWT_HEADER_NOT_IMPLEMENTED_ALG = "Jwt header [alg] is not supported"
    JWT_HEADER_BAD_KID = "Jwt header [kid] field is not a string"
    JWT_PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
    JWT_ED25519_SIGNATURE_WRONG_LENGTH = "Jwt ED25519 signature is wrong length"
    JWT_PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
    JWT_PAYLOAD_ISS_NOT_STRING = "Jwt payload [iss] field is not a string"
    JWT_PAYLOAD_SUB_NOT_STRING = "Jwt payload [sub] field is not a string"
    JWT_PAYLOAD_IAT_NOT_INTEGER = "Jwt payload [iat] field is not an integer"
    JWT_PAYLOAD_IAT_OUT_OF_RANGE = "Jwt payload [iat] field is not a positive 64 bit integer"
    JWT_PAYLOAD_NBF_NOT_INTEGER = "Jwt payload [nbf] field is not an integer"
    JWT_PAYLOAD_NBF_OUT_OF_RANGE = "Jwt payload [nbf] field is not a positive 64 bit integer"
    JWT_PAYLOAD_EXP_NOT_INTEGER = "Jwt payload [exp] field is not an integer"
    JWT_PAYLOAD_EXP_OUT_OF_RANGE = "Jwt payload [exp] field is not a positive 64 bit integer"
    JWT_PAYLOAD_JTI_NOT_STRING = "Jwt payload [jti] field is not a string"
    JWT_PAYLOAD_AUD_NOT_STRING = "Jwt payload [aud] field is not a string or string list"
    JWT_SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
    JWT_UNKNOWN_ISSUER = "Jwt issuer is not configured"
    JWT_AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
    JWT_VERIFICATION_FAIL = "Jwt verification fails"
    JWKS_NO_VALID_KEYS = "Jwks doesn't have any valid public key"
    JWKS_KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"

    @property
    def text(self) -> str:
        return self.value

    @property
    def http_status(self) -> int:
        # filter.cc onComplete: "status == Status::JwtAudienceNotAllowed ? Http::Code::Forbidden :
        # Http::Code::Unauthorized".
        return 403 if self is Status.JWT_AUDIENCE_NOT_ALLOWED else 401

    @property
    def details(self) -> str:
        # filter.cc generateRcDetails: StrCat("jwt_authn_access_denied", "{",
        # StringUtil::replaceAllEmptySpace(error_msg), "}") — "since RCDetails may be written to access log".
        return "jwt_authn_access_denied{" + "_".join(self.value.split(" ")) + "}"


# ---- configuration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class FromHeader:
    name: str      # lowercase, wire form (Envoy LowerCaseString)
    prefix: str    # wire form; "" = the whole value is the token


@dataclass(frozen=True)
class ClaimToHeader:
    header: str                 # lowercase header name
    claim: str                  # as written, e.g. "nested.key"
    path: tuple[str, ...]       # claim split on "." (Envoy StructUtils::GetValue splits nested names on '.')


@dataclass(frozen=True, eq=False)
class Jwk:
    """One usable key of a JWKS. ``key`` is a ``cryptography`` public key, or ``bytes`` for ``oct``."""

    kty: str          # "RSA" | "EC" | "oct" | "OKP"
    kid: str          # "" = none
    alg: str          # "" = none (then the key is tried for any token alg, as jwt_verify_lib does)
    crv: str          # EC/OKP curve name ("P-256", ..., "Ed25519"), else ""
    key: Any

    def __repr__(self) -> str:
        return f"<Jwk kty={self.kty} kid={self.kid!r} alg={self.alg!r}{' crv=' + self.crv if self.crv else ''}>"


@dataclass(frozen=True, eq=False)
class Jwks:
    keys: tuple[Jwk, ...]
    fake: bool = False   # istiod's stand-in for a key set it could not fetch (CreateFakeJwks)

    def __repr__(self) -> str:
        return f"<Jwks keys={len(self.keys)}{' fake' if self.fake else ''}>"


@dataclass(frozen=True, eq=False)
class JwtRule:
    """One ``spec.jwtRules[i]``: an Envoy jwt_authn provider. ``eq=False``: identity is the rule object,
    so a rule set may key caches on it."""

    issuer: str                                # "" allows any issuer (Envoy JwtIssuerChecker: empty = allow all)
    audiences: tuple[str, ...]
    jwks: Jwks | None                          # None only if nothing usable (never after parse)
    jwks_uri: str
    from_headers: tuple[FromHeader, ...]
    from_params: tuple[str, ...]
    from_cookies: tuple[str, ...]
    output_payload_to_header: str              # lowercase, "" = none
    forward_original_token: bool
    output_claim_to_headers: tuple[ClaimToHeader, ...]
    space_delimited_claims: tuple[str, ...]    # always includes Istio's defaults "permission", "scope"
    timeout_s: float                           # jwksUri fetch timeout (unused offline); Istio's default 5 s
    policy: str = ""                           # "ns/name[i]" for logs and errors

    def __repr__(self) -> str:
        return f"<JwtRule {self.policy} issuer={self.issuer!r} jwks={self.jwks!r}>"


@dataclass(frozen=True)
class RequestAuthentication:
    namespace: str
    name: str
    selector: Mapping[str, str] | None = None
    target_refs: tuple[TargetRef, ...] = ()
    jwt_rules: tuple[JwtRule, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---- the answer ---------------------------------------------------------------------------------

EMPTY_CLAIMS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class AuthnResult:
    """What the waypoint does with one request after the JWT check (Envoy's jwt_authn filter).

    Allowed: forward the request after the edits — drop every header named in ``remove`` (all its values),
    then append ``add`` in order; if ``target`` is not None it replaces the request target (a token taken
    from a query parameter is removed from it). ``claims``/``principal`` feed ``HttpAttributes.jwt_claims`` /
    ``request_principal`` (None when no token was validated).

    Rejected: answer ``status`` with ``body`` (text/plain) and ``response_headers``; ``detail`` is Envoy's
    response code details for the access log. ``status`` is 200 when allowed.

    ``cache_until``: the result depends on ``now`` only through the validated tokens' times; it stays the
    same answer for the same request (same header bytes, same target, same rule set object) for every ``now``
    with ``int(now) < cache_until`` (``math.inf``: time does not matter). See ``authenticate``.
    """

    allowed: bool
    status: int = 200
    body: str = ""
    detail: str = ""
    claims: Mapping[str, Any] | None = None
    principal: str | None = None
    remove: tuple[bytes, ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    target: bytes | None = None
    response_headers: tuple[tuple[bytes, bytes], ...] = ()
    reason: Status = Status.OK
    cache_until: float = float("inf")
    tokens: int = 0                      # token verifications run (one token may be checked by several
                                         # requirements, as in Envoy); 0: no credentials were sent

    @property
    def issuer(self) -> str | None:
        iss = self.claims.get("iss") if self.claims is not None else None
        return iss if isinstance(iss, str) else None


ALLOWED_NO_RULES = AuthnResult(allowed=True)
