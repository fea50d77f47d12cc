"""One JWT: parse it and check its signature, as Envoy does (source/common/jwt/jwt.cc ``Jwt::parseFromString``,
``verifyTimeConstraint``; verify.cc ``verifyJwtWithoutTimeChecking``; formerly google/jwt_verify_lib).

Pure and total: every function returns a ``Status`` for bad input and never raises.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from policy.authn.codec import b64url_decode, loads_object
from policy.authn.model import Jwk, Jwks, Status

# Envoy bounds a token only through the request's header size: max_request_headers_kb defaults to 60 KiB
# (HCM), so no header-borne token is longer. We cap every location (header, query, cookie) at that, so a
# hostile query string cannot make us base64-decode and JSON-parse megabytes. Longer → JWT_BAD_FORMAT.
MAX_TOKEN_BYTES = 60 * 1024

# jwt.cc isImplemented: the algorithms Envoy verifies. Anything else ("none", "RSA-OAEP", ...) is
# "Jwt header [alg] is not supported".
IMPLEMENTED_ALGS = frozenset({
    "ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512",
    "PS256", "PS384", "PS512", "EdDSA",
})

# verify.cc: the digest follows the token's alg; "default to SHA256".
_DIGEST = {"384": hashes.SHA384, "512": hashes.SHA512}

_U64 = float(2**64)


@dataclass(frozen=True)
class Jwt:
    header_b64: str
    payload_b64: str
    signature: bytes
    alg: str
    kid: str                       # "" when absent
    iss: str                       # "" when absent
    sub: str
    iat: int
    nbf: int                       # 0 when absent
    exp: int                       # 0 when absent (= never expires)
    audiences: tuple[str, ...]
    payload: dict                  # the decoded claims (mutable JSON; callers freeze what they hand out)

    @property
    def signed_data(self) -> bytes:
        return (self.header_b64 + "." + self.payload_b64).encode("ascii")


def _get_string(obj: dict, name: str) -> tuple[bool, str]:
    """StructUtils::GetString: (ok, value); ok False only for WRONG_TYPE (missing → (True, ""))."""
    if name not in obj:
        return True, ""
    v = obj[name]
    return (True, v) if isinstance(v, str) else (False, "")


def _get_u64(obj: dict, name: str) -> tuple[str, int]:
    """StructUtils::GetUInt64: a JSON number read as a double; negative or >= 2^64 is OUT_OF_RANGE; the
    fraction is dropped (static_cast<uint64_t>). Returns ("ok"|"missing"|"wrong"|"range", value)."""
    if name not in obj:
        return "missing", 0
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "wrong", 0
    try:
        d = float(v)
    except OverflowError:
        return "range", 0
    if d < 0 or d >= _U64:
        return "range", 0
    return "ok", int(d)


def _json_section(b64: str, bad_base64: Status, bad_json: Status) -> dict | Status:
    """The header or the payload: a base64url JSON object, or the status naming which of the two failed."""
    raw = b64url_decode(b64)
    if raw is None:
        return bad_base64
    obj = loads_object(raw)
    return bad_json if obj is None else obj


def parse_jwt(token: str) -> Jwt | Status:
    """Jwt::parseFromString, check by check, in Envoy's order (the first failing check names the status)."""
    if len(token) > MAX_TOKEN_BYTES:
        return Status.JWT_BAD_FORMAT
    # "jwt must have exactly 2 dots with 3 sections": absl::StrSplit(jwt, '.', absl::SkipEmpty()) must give 3.
    parts = [p for p in token.split(".") if p]
    if len(parts) != 3:
        return Status.JWT_BAD_FORMAT
    header_b64, payload_b64, sig_b64 = parts
    header = _json_section(header_b64, Status.JWT_HEADER_BAD_BASE64, Status.JWT_HEADER_BAD_JSON)
    if isinstance(header, Status):
        return header
    ok, alg = _get_string(header, "alg")
    if not ok or "alg" not in header:
        return Status.JWT_HEADER_BAD_ALG
    if alg not in IMPLEMENTED_ALGS:
        return Status.JWT_HEADER_NOT_IMPLEMENTED_ALG
    ok, kid = _get_string(header, "kid")
    if not ok:
        return Status.JWT_HEADER_BAD_KID
    payload = _json_section(payload_b64, Status.JWT_PAYLOAD_BAD_BASE64, Status.JWT_PAYLOAD_BAD_JSON)
    if isinstance(payload, Status):
        return payload
    ok, iss = _get_string(payload, "iss")
    if not ok:
        return Status.JWT_PAYLOAD_ISS_NOT_STRING
    ok, sub = _get_string(payload, "sub")
    if not ok:
        return Status.JWT_PAYLOAD_SUB_NOT_STRING
    times = {}
    for name, wrong, out_of_range in (
        ("iat", Status.JWT_PAYLOAD_IAT_NOT_INTEGER, Status.JWT_PAYLOAD_IAT_OUT_OF_RANGE),
        ("nbf", Status.JWT_PAYLOAD_NBF_NOT_INTEGER, Status.JWT_PAYLOAD_NBF_OUT_OF_RANGE),
        ("exp", Status.JWT_PAYLOAD_EXP_NOT_INTEGER, Status.JWT_PAYLOAD_EXP_OUT_OF_RANGE),
    ):
        result, value = _get_u64(payload, name)
        if result == "wrong":
            return wrong
        if result == "range":
            return out_of_range
        times[name] = value
    ok, _jti = _get_string(payload, "jti")
    if not ok:
        return Status.JWT_PAYLOAD_JTI_NOT_STRING
    # "aud can be either string array or string" (StructUtils::GetStringList).
    aud: Any = payload.get("aud", ())
    if isinstance(aud, str):
        audiences: tuple[str, ...] = (aud,)
    elif isinstance(aud, (list, tuple)) and all(isinstance(a, str) for a in aud):
        audiences = tuple(aud)
    else:
        return Status.JWT_PAYLOAD_AUD_NOT_STRING
    signature = b64url_decode(sig_b64)
    if signature is None:
        return Status.JWT_SIGNATURE_BAD_BASE64
    return Jwt(header_b64, payload_b64, signature, alg, kid, iss, sub, times["iat"], times["nbf"], times["exp"],
               audiences, payload)


def verify_time(jwt: Jwt, now: int, clock_skew: int) -> Status:
    """Jwt::verifyTimeConstraint: "if (now + clock_skew < nbf_) JwtNotYetValid; if (exp_ && now > exp_ +
    clock_skew) JwtExpired". ``iat`` is not checked."""
    if now + clock_skew < jwt.nbf:
        return Status.JWT_NOT_YET_VALID
    if jwt.exp and now > jwt.exp + clock_skew:
        return Status.JWT_EXPIRED
    return Status.OK


def _digest(alg: str):
    return _DIGEST.get(alg[-3:], hashes.SHA256)()


_FAMILY_OF_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "HS": "oct", "Ed": "OKP"}


def _verify_with(jwk: Jwk, jwt: Jwt, data: bytes) -> Status | None:
    """Ok, a final Status, or None (this key did not verify it; try the next)."""
    sig, alg = jwt.signature, jwt.alg
    # verify.cc verifyJwtWithoutTimeChecking tries a key only for its own algorithm family ("EC" with ES*, "RSA"
    # with RS*/PS*, "oct" with HS*, "OKP" with EdDSA): a token signed RS256 but labelled ES256 is not verified
    # with the RSA key (found by review); the key still counted as matching kid/alg, so the answer is "Jwt
    # verification fails".
    if _FAMILY_OF_ALG.get(alg[:2]) != jwk.kty:
        return None
    try:
        if jwk.kty == "EC":
            # verify.cc verifySignatureEC: r = first half, s = second half of the raw signature.
            half = len(sig) // 2
            r, s = int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:2 * half], "big")
            jwk.key.verify(encode_dss_signature(r, s), data, ec.ECDSA(_digest(alg)))
            return Status.OK
        if jwk.kty == "RSA":
            digest = _digest(alg)
            if alg.startswith("PS"):
                # RSASSA-PSS with MGF1 of the same hash and a salt as long as the hash (RFC 7518 §3.5).
                pad = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            else:
                pad = padding.PKCS1v15()
            jwk.key.verify(sig, data, pad, digest)
            return Status.OK
        if jwk.kty == "oct":
            mac = hmac.new(jwk.key, data, _digest(alg).name).digest()
            return Status.OK if hmac.compare_digest(mac, sig) else None
        if jwk.kty == "OKP":
            # verifySignatureEd25519: a wrong length is final ("JwtEd25519SignatureWrongLength"), a bad
            # signature lets the next key try.
            if len(sig) != 64:
                return Status.JWT_ED25519_SIGNATURE_WRONG_LENGTH
            jwk.key.verify(sig, data)
            return Status.OK
    except InvalidSignature:
        return None
    except (ValueError, TypeError, OverflowError):
        # e.g. a signature longer than the RSA modulus, or a digest too long for a tiny (fake) key: the
        # signature does not verify with this key, which is all Envoy's EVP_DigestVerify* calls report.
        return None
    return None


# Signatures found valid, remembered per key set: (id(jwks), signed data, signature) → the key set (held, so its
# id is not reused while cached). A token's signature check is a pure function of its bytes and the keys, and
# the costly part of a request with a token (RS256 ~60 µs, ES256 ~90 µs); everything else — time, issuer,
# audiences, locations — is still checked per request. Only valid ones are kept, as Envoy's jwt_authn cache
# ("Only valid JWTs are cached", JwtCacheConfig, whose default size is 100 per provider); past this many the
# cache starts afresh, so a flood of distinct tokens costs what it would without it.
SIGNATURE_CACHE_ENTRIES = 1024
_valid_signatures: dict[tuple[int, bytes, bytes], Jwks] = {}


def verify_signature(jwt: Jwt, jwks: Jwks) -> Status:
    """verifyJwtWithoutTimeChecking: "If kid is specified in JWT, JWK with the same kid is used for verification.
    If kid is not specified in JWT, try all JWK." and "The same alg must be used" when the key names one.
    No key passes the kid/alg filter → JwksKidAlgMismatch; some did but none verified → JwtVerificationFail.
    Remembered when valid (``SIGNATURE_CACHE_ENTRIES``)."""
    data = jwt.signed_data
    key = (id(jwks), data, jwt.signature)
    if _valid_signatures.get(key) is jwks:
        return Status.OK
    status = _verify_signature(jwt, jwks, data)
    if status is Status.OK:
        if len(_valid_signatures) >= SIGNATURE_CACHE_ENTRIES:
            _valid_signatures.clear()
        _valid_signatures[key] = jwks
    return status


def _verify_signature(jwt: Jwt, jwks: Jwks, data: bytes) -> Status:
    matched = False
    for jwk in jwks.keys:
        if jwt.kid and jwk.kid and jwk.kid != jwt.kid:
            continue
        if jwk.alg and jwk.alg != jwt.alg:
            continue
        matched = True
        status = _verify_with(jwk, jwt, data)
        if status is not None:
            return status
    return Status.JWT_VERIFICATION_FAIL if matched else Status.JWKS_KID_ALG_MISMATCH
