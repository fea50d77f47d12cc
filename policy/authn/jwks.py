"""JSON Web Key Sets, read as Envoy's ``Jwks::createFrom`` does (source/common/jwt/jwks.cc, formerly
google/jwt_verify_lib src/jwks.cc), into ``cryptography`` public keys.

A key set Envoy would refuse makes Envoy reject the whole listener ("Provider 'origins-0' in jwt_authn config
has invalid local jwks: Jwks RSA [n] or [e] field is missing or has a parse error", istio/istio#41729), and
istiod's webhook refuses a RequestAuthentication whose ``jwks`` does not parse ("jwks parse error: ...",
validation.go validateJwtRule). So here a bad key set is a load error (``ValueError`` with Envoy's text), never
a per-request surprise.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from policy.authn.codec import b64url_decode, b64url_encode, loads_object
from policy.authn.model import Jwk, Jwks

# Our bounds (Envoy documents none for an inline key set). Real providers publish a few keys in a few KiB
# (Google ~2 KiB, Azure AD ~10 KiB with x5c chains); these leave two orders of magnitude of room while keeping
# a hostile config from pinning memory or making every verification walk thousands of keys.
MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 100
# RSA verification costs grow with the square of the modulus; 8192 bits is the largest any JOSE library in
# common use generates (RFC 7518 §3.3 requires >= 2048). A 16384-bit key would be 4x the work per request.
MAX_RSA_MODULUS_BITS = 8192

# RFC 7518 §3.4 / §6.2.1.1: ES256 ↔ P-256, ES384 ↔ P-384, ES512 ↔ P-521.
EC_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
EC_ALG_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


class JwksError(ValueError):
    """A key set Envoy would not load; the message is Envoy's status text."""


def _string(key: dict, name: str, missing: str, bad: str) -> str:
    if name not in key:
        raise JwksError(missing)
    value = key[name]
    if not isinstance(value, str):
        raise JwksError(bad)
    return value


def _optional_string(key: dict, name: str, bad: str) -> str:
    value = key.get(name, "")
    if not isinstance(value, str):
        raise JwksError(bad)
    return value


def _big_int(text: str) -> int | None:
    raw = b64url_decode(text)
    if raw is None or not raw:
        return None
    return int.from_bytes(raw, "big")


def _rsa(key: dict, kid: str, alg: str) -> Jwk:
    if alg and not (alg.startswith("RS") or alg.startswith("PS")):
        raise JwksError("[alg] is not started with [RS] or [PS] for an RSA key")
    n_text = _string(key, "n", "[n] field is missing for a RSA key", "[n] field is not string for a RSA key")
    e_text = _string(key, "e", "[e] field is missing for a RSA key", "[e] field is not string for a RSA key")
    n, e = _big_int(n_text), _big_int(e_text)
    if n is None or e is None:
        raise JwksError("Jwks RSA [n] or [e] field is missing or has a parse error")
    if n.bit_length() > MAX_RSA_MODULUS_BITS:
        raise JwksError(f"RSA key of {n.bit_length()} bits is larger than {MAX_RSA_MODULUS_BITS} bits")
    try:
        public = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError:
        raise JwksError("Jwks RSA [n] or [e] field is missing or has a parse error") from None
    return Jwk("RSA", kid, alg, "", public)


def _ec(key: dict, kid: str, alg: str) -> Jwk:
    if alg and not alg.startswith("ES"):
        raise JwksError("[alg] is not started with [ES] for an EC key")
    crv = _optional_string(key, "crv", "[crv] field is not string for an EC key")
    if not crv:
        crv = EC_ALG_CURVE.get(alg, "P-256")   # jwks.cc: the curve follows alg, P-256 when neither is set
    if crv not in EC_CURVES or (alg and alg not in EC_ALG_CURVE):
        raise JwksError("[crv] or [alg] field is not supported for an EC key")
    if alg and EC_ALG_CURVE[alg] != crv:
        raise JwksError("[crv] field specified is not compatible with [alg] for an EC key")
    x_text = _string(key, "x", "[x] field is missing for an EC key", "[x] field is not string for an EC key")
    y_text = _string(key, "y", "[y] field is missing for an EC key", "[y] field is not string for an EC key")
    x, y = _big_int(x_text), _big_int(y_text)
    if x is None or y is None:
        raise JwksError("Jwks EC [x] or [y] field is an invalid Base64.")
    try:
        public = ec.EllipticCurvePublicNumbers(x, y, EC_CURVES[crv]()).public_key()
    except ValueError:
        raise JwksError("Jwks EC [x] and [y] fields have a parse error.") from None
    return Jwk("EC", kid, alg, crv, public)


def _oct(key: dict, kid: str, alg: str) -> Jwk:
    if alg and not alg.startswith("HS"):
        raise JwksError("[alg] does not start with [HS] for an HMAC key")
    k_text = _string(key, "k", "[k] field is missing for an HMAC key", "[k] field is not string for an HMAC key")
    secret = b64url_decode(k_text)
    if secret is None or not secret:
        raise JwksError("Jwks Oct key is an invalid Base64")
    return Jwk("oct", kid, alg, "", secret)


def _okp(key: dict, kid: str, alg: str) -> Jwk:
    if alg and alg != "EdDSA":
        raise JwksError("[alg] is not [EdDSA] for an OKP key")
    crv = _string(key, "crv", "[crv] field is missing for an OKP key", "[crv] field is not string for an OKP key")
    if crv != "Ed25519":
        raise JwksError("[crv] field is not supported for an OKP key")
    x_text = _string(key, "x", "[x] field is missing for an OKP key", "[x] field is not string for an OKP key")
    raw = b64url_decode(x_text)
    if raw is None:
        raise JwksError("Jwks OKP [x] field is an invalid Base64.")
    if len(raw) != 32:
        raise JwksError("Jwks OKP [x] field is wrong length.")
    return Jwk("OKP", kid, alg, crv, ed25519.Ed25519PublicKey.from_public_bytes(raw))


_BY_KTY = {"RSA": _rsa, "EC": _ec, "oct": _oct, "OKP": _okp}


def parse_jwks(text: str, *, fake: bool = False) -> Jwks:
    """A JWKS JSON document → ``Jwks``; ``JwksError`` (Envoy's text, with the key's index) if Envoy would
    refuse it. PEM and x5c-only keys are not supported (a key needs its JWK members)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_JWKS_BYTES:
        raise JwksError(f"key set is larger than {MAX_JWKS_BYTES} bytes")
    doc = loads_object(text)
    if doc is None:
        raise JwksError("Jwks is an invalid JSON")
    if "keys" not in doc:
        raise JwksError("Jwks does not have [keys] field")
    keys = doc["keys"]
    if not isinstance(keys, list):
        raise JwksError("[keys] in Jwks is not an array")
    if len(keys) > MAX_JWKS_KEYS:
        raise JwksError(f"more than {MAX_JWKS_KEYS} keys")
    out = []
    for i, key in enumerate(keys):
        try:
            if not isinstance(key, dict):
                raise JwksError("[keys] in Jwks is not an array")
            kty = _string(key, "kty", "[kty] is missing in [keys]", "[kty] is bad in [keys]")
            if kty not in _BY_KTY:
                raise JwksError("[kty] is not supported in [keys]")
            # (Envoy has no status of its own for a non-string kid/alg; these two texts are ours.)
            kid = _optional_string(key, "kid", "[kid] is bad in [keys]")
            alg = _optional_string(key, "alg", "[alg] is bad in [keys]")
            out.append(_BY_KTY[kty](key, kid, alg))
        except JwksError as err:
            raise JwksError(f"keys[{i}]: {err}") from None
    if not out:
        raise JwksError("Jwks doesn't have any valid public key")
    return Jwks(tuple(out), fake=fake)


# istiod pilot/pkg/model/jwks_resolver.go: when it cannot fetch a jwksUri (or discover one from the issuer's
# /.well-known/openid-configuration) it inlines this key set: "This is a temporary workaround to reject a
# request with JWT token by using a fake jwks when istiod failed to fetch it."
FAKE_JWKS_PREFIX = "Error-IstiodFailedToFetchJwksUri-"


def fake_jwks_text(jwks_uri: str) -> str:
    """CreateFakeJwks(jwksURI), byte for byte: one RSA key, kid "abc", whose modulus is the base64url of
    "Error-IstiodFailedToFetchJwksUri-" + the URI — so every token is rejected: "Jwks doesn't have key to match
    kid or alg from Jwt" for a token with another kid (istio/istio#53260), "Jwt verification fails" else."""
    encoded = b64url_encode((FAKE_JWKS_PREFIX + jwks_uri).encode("utf-8"))
    return '{"keys":[ {"e":"AQAB","kid":"abc","kty":"RSA","n":"%s"}]}' % encoded


def fake_jwks(jwks_uri: str) -> Jwks:
    return parse_jwks(fake_jwks_text(jwks_uri), fake=True)
