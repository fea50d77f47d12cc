"""JWT verification as the waypoint's Envoy does it: real tokens minted here with ``cryptography`` keys,
checked against an inline JWKS built from the same keys (policy/authn). Every status text is Envoy's."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.authn import AuthnResult, Status, authenticate, parse_jwks, parse_request_authentication
from policy.authn.authenticate import CLOCK_SKEW_S, JwtRuleSet
from policy.authn.codec import b64url_decode, b64url_encode
from policy.authn.jwks import JwksError, MAX_JWKS_KEYS, fake_jwks_text
from policy.authn.jwt import IMPLEMENTED_ALGS, MAX_TOKEN_BYTES, parse_jwt
from policy.errors import Where

NOW = 1_800_000_000   # a fixed clock (2027-01-15): time is a parameter

_HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_CURVE = {"ES256": (ec.SECP256R1, "P-256", 32), "ES384": (ec.SECP384R1, "P-384", 48), "ES512": (ec.SECP521R1, "P-521", 66)}


def _int_b64(i: int, size: int | None = None) -> str:
    return b64url_encode(i.to_bytes(size or (i.bit_length() + 7) // 8, "big"))


# Keys are slow to make (RSA): one per family for the whole module.
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEYS = {alg: ec.generate_private_key(curve()) for alg, (curve, _, _) in _CURVE.items()}
ED_KEY = ed25519.Ed25519PrivateKey.generate()
HMAC_SECRET = b"0123456789abcdef0123456789abcdef"


class Issuer:
    """A token issuer: a private key, its public JWK, and a mint() that signs claims with it."""

    def __init__(self, iss: str, alg: str = "RS256", kid: str = "k1", key=None, jwk_alg: bool = True):
        self.iss, self.alg, self.kid, self.jwk_alg = iss, alg, kid, jwk_alg
        if key is None:
            key = (RSA_KEY if alg[:2] in ("RS", "PS") else EC_KEYS.get(alg) if alg.startswith("ES")
                   else ED_KEY if alg == "EdDSA" else HMAC_SECRET)
        self.key = key

    def jwk(self) -> dict:
        alg = self.alg
        if alg[:2] in ("RS", "PS"):
            pn = self.key.public_key().public_numbers()
            jwk = {"kty": "RSA", "n": _int_b64(pn.n), "e": _int_b64(pn.e)}
        elif alg.startswith("ES"):
            _, crv, size = _CURVE[alg]
            pn = self.key.public_key().public_numbers()
            jwk = {"kty": "EC", "crv": crv, "x": _int_b64(pn.x, size), "y": _int_b64(pn.y, size)}
        elif alg == "EdDSA":
            raw = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
        else:
            jwk = {"kty": "oct", "k": b64url_encode(self.key)}
        if self.kid:
            jwk["kid"] = self.kid
        if self.jwk_alg:
            jwk["alg"] = alg
        return jwk

    def jwks(self, *extra: dict) -> str:
        return json.dumps({"keys": [self.jwk(), *extra]})

    def sign(self, data: bytes, alg: str) -> bytes:
        if alg.startswith("RS"):
            return self.key.sign(data, padding.PKCS1v15(), _HASH[alg[2:]]())
        if alg.startswith("PS"):
            h = _HASH[alg[2:]]()
            return self.key.sign(data, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
        if alg.startswith("ES"):
            r, s = decode_dss_signature(self.key.sign(data, ec.ECDSA(_HASH[alg[2:]]())))
            size = _CURVE[alg][2]
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        if alg == "EdDSA":
            return self.key.sign(data)
        return hmac.new(self.key, data, getattr(hashlib, "sha" + alg[2:])).digest()

    def mint(self, claims: dict | None = None, *, header: dict | None = None, **overrides) -> str:
        body = {"iss": self.iss, "sub": "alice", "iat": NOW - 10, "exp": NOW + 3600}
        body.update(claims or {})
        for k, v in overrides.items():
            if v is None:
                body.pop(k, None)
            else:
                body[k] = v
        head = {"alg": self.alg, "typ": "JWT"}
        if self.kid:
            head["kid"] = self.kid
        head.update(header or {})
        h = b64url_encode(json.dumps(head).encode())
        p = b64url_encode(json.dumps(body).encode())
        alg = head.get("alg") if head.get("alg") in IMPLEMENTED_ALGS else self.alg   # sign "none" etc. anyway
        return f"{h}.{p}.{b64url_encode(self.sign(f'{h}.{p}'.encode(), alg))}"


def ra_doc(*rules: dict, name: str = "jwt", namespace: str = "default", target: str = "waypoint") -> dict:
    return {
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": target}],
                 "jwtRules": list(rules)},
    }


def rules_for(*rules: dict) -> JwtRuleSet:
    ra = parse_request_authentication(ra_doc(*rules), Where("test.yaml"))
    return JwtRuleSet.of(ra.jwt_rules)


def check(rule_set: JwtRuleSet, token: str | None, *, now: float = NOW, headers=(), target: bytes = b"/get") -> AuthnResult:
    hdrs = [(b"host", b"httpbin.default:8000"), *headers]
    if token is not None:
        hdrs.append((b"authorization", b"Bearer " + token.encode("utf-8", "surrogatepass")))
    return authenticate(rule_set, hdrs, target, now=now)


def denied(result: AuthnResult, status: Status) -> None:
    assert not result.allowed
    assert result.body == status.text
    assert result.reason is status
    assert result.status == (403 if status is Status.JWT_AUDIENCE_NOT_ALLOWED else 401)
    assert result.detail == "jwt_authn_access_denied{" + status.text.replace(" ", "_") + "}"
    assert result.claims is None and result.principal is None


ISS = Issuer("https://accounts.example.com")
RULES = rules_for({"issuer": ISS.iss, "jwks": ISS.jwks()})
# The same rule reading the whole value of one header: no "Bearer " prefix, so no extractJWT trimming.
RAW = rules_for({"issuer": ISS.iss, "jwks": ISS.jwks(), "fromHeaders": [{"name": "x-jwt"}]})


def check_raw(token: str, *, now: float = NOW) -> AuthnResult:
    return authenticate(RAW, [(b"x-jwt", token.encode("utf-8"))], b"/get", now=now)


# ---- algorithms -----------------------------------------------------------------------------------

@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                                 "ES512", "HS256", "HS384", "HS512", "EdDSA"])
def test_every_algorithm_envoy_implements_verifies(alg):
    issuer = Issuer("iss-" + alg, alg=alg)
    rules = rules_for({"issuer": issuer.iss, "jwks": issuer.jwks()})
    result = check(rules, issuer.mint({"sub": "bob", "groups": ["a", "b"]}))
    assert result.allowed and result.reason is Status.OK
    assert result.principal == f"iss-{alg}/bob"
    assert result.claims["groups"] == ("a", "b")
    # The same token with one signature byte flipped fails.
    token = issuer.mint()
    h, p, s = token.split(".")
    sig = bytearray(b64url_decode(s))
    sig[len(sig) // 2] ^= 0x01
    denied(check(rules, f"{h}.{p}.{b64url_encode(bytes(sig))}"), Status.JWT_VERIFICATION_FAIL)


def test_keys_without_alg_are_tried_for_any_token_alg():
    issuer = Issuer("iss", alg="PS384", jwk_alg=False)
    rules = rules_for({"issuer": "iss", "jwks": issuer.jwks()})
    assert check(rules, issuer.mint()).allowed


def test_alg_none_and_unknown_algs_are_refused():
    h = b64url_encode(b'{"alg":"none"}')
    p = b64url_encode(json.dumps({"iss": ISS.iss, "sub": "x"}).encode())
    # An unsigned token has an empty third section: absl::StrSplit(..., SkipEmpty()) finds two, "not in the form".
    denied(check(RULES, f"{h}.{p}."), Status.JWT_BAD_FORMAT)
    denied(check(RULES, f"{h}.{p}.AAAA"), Status.JWT_HEADER_NOT_IMPLEMENTED_ALG)
    denied(check(RULES, ISS.mint(header={"alg": "RSA-OAEP"})), Status.JWT_HEADER_NOT_IMPLEMENTED_ALG)
    denied(check(RULES, _b({}) + f".{p}.AAAA"), Status.JWT_HEADER_BAD_ALG)
    denied(check(RULES, _b({"alg": 256}) + f".{p}.AAAA"), Status.JWT_HEADER_BAD_ALG)


def test_hmac_with_the_rsa_public_key_is_not_an_alg_confusion_hole():
    # The classic attack: sign HS256 with the RSA public key's bytes. The key is kty RSA, so Envoy verifies
    # RSA (PKCS#1 v1.5 over SHA-256) whatever the token's alg says — and the HMAC "signature" fails.
    pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    rsa_no_alg = Issuer(ISS.iss, alg="RS256", jwk_alg=False)
    rules = rules_for({"issuer": ISS.iss, "jwks": rsa_no_alg.jwks()})
    forged = Issuer(ISS.iss, alg="HS256", key=pem).mint()
    denied(check(rules, forged), Status.JWT_VERIFICATION_FAIL)
    # With alg pinned on the key, the kid/alg filter already excludes it.
    denied(check(RULES, forged), Status.JWKS_KID_ALG_MISMATCH)


# ---- time ----------------------------------------------------------------------------------------

def test_expiry_with_envoys_60_second_skew():
    assert CLOCK_SKEW_S == 60
    token = ISS.mint(exp=NOW)
    assert check(RULES, token, now=NOW + 60).allowed          # now > exp + skew is false at the edge
    assert check(RULES, token, now=NOW + 60.999).allowed      # Envoy uses whole seconds
    denied(check(RULES, token, now=NOW + 61), Status.JWT_EXPIRED)
    denied(check(RULES, ISS.mint(exp=NOW - 3600)), Status.JWT_EXPIRED)


def test_not_before_with_skew():
    token = ISS.mint(nbf=NOW + 60)
    assert check(RULES, token).allowed                          # now + skew < nbf is false at the edge
    denied(check(RULES, ISS.mint(nbf=NOW + 61)), Status.JWT_NOT_YET_VALID)


def test_no_exp_never_expires_and_iat_is_not_checked():
    assert check(RULES, ISS.mint(exp=None), now=NOW + 10**9).allowed
    assert check(RULES, ISS.mint(iat=NOW + 10**6)).allowed    # Envoy parses iat but never compares it
    assert check(RULES, ISS.mint(exp=NOW + 100.75)).allowed   # a JSON number; the fraction is dropped


@pytest.mark.parametrize("claim,value,status", [
    ("iat", "yesterday", Status.JWT_PAYLOAD_IAT_NOT_INTEGER),
    ("iat", -1, Status.JWT_PAYLOAD_IAT_OUT_OF_RANGE),
    ("nbf", True, Status.JWT_PAYLOAD_NBF_NOT_INTEGER),
    ("nbf", -5, Status.JWT_PAYLOAD_NBF_OUT_OF_RANGE),
    ("exp", [1], Status.JWT_PAYLOAD_EXP_NOT_INTEGER),
    ("exp", 2**64, Status.JWT_PAYLOAD_EXP_OUT_OF_RANGE),
    ("exp", 10**400, Status.JWT_PAYLOAD_EXP_OUT_OF_RANGE),
    ("iss", 5, Status.JWT_PAYLOAD_ISS_NOT_STRING),
    ("sub", {"a": 1}, Status.JWT_PAYLOAD_SUB_NOT_STRING),
    ("jti", 7, Status.JWT_PAYLOAD_JTI_NOT_STRING),
    ("aud", ["a", 1], Status.JWT_PAYLOAD_AUD_NOT_STRING),
    ("aud", 3, Status.JWT_PAYLOAD_AUD_NOT_STRING),
])
def test_registered_claims_of_the_wrong_type(claim, value, status):
    denied(check(RULES, ISS.mint({claim: value})), status)


# ---- issuer, audiences, keys ------------------------------------------------------------------------

def test_issuer_not_configured():
    other = Issuer("https://evil.example.com")
    denied(check(RULES, other.mint()), Status.JWT_UNKNOWN_ISSUER)
    denied(check(RULES, ISS.mint(iss=None)), Status.JWT_UNKNOWN_ISSUER)   # no iss at all


def test_audiences():
    rules = rules_for({"issuer": ISS.iss, "jwks": ISS.jwks(), "audiences": ["https://api.example.com/", "bookinfo"]})
    assert check(rules, ISS.mint(aud="bookinfo")).allowed
    assert check(rules, ISS.mint(aud=["x", "bookinfo"])).allowed
    # check_audience.cc sanitizeAudience: scheme and one trailing slash are ignored on both sides.
    assert check(rules, ISS.mint(aud="http://api.example.com")).allowed
    denied(check(rules, ISS.mint(aud="other")), Status.JWT_AUDIENCE_NOT_ALLOWED)
    denied(check(rules, ISS.mint(aud=None)), Status.JWT_AUDIENCE_NOT_ALLOWED)
    # No audiences configured: any (or none) is fine.
    assert check(RULES, ISS.mint(aud="anything")).allowed


def test_kid_selection():
    second = Issuer(ISS.iss, kid="k2", key=RSA_OTHER)
    rules = rules_for({"issuer": ISS.iss, "jwks": ISS.jwks(second.jwk())})
    assert check(rules, ISS.mint()).allowed
    assert check(rules, second.mint()).allowed
    # No kid in the token: every key is tried.
    assert check(rules, Issuer(ISS.iss, kid="", key=RSA_OTHER).mint()).allowed
    # A kid no key has.
    denied(check(rules, Issuer(ISS.iss, kid="k9").mint()), Status.JWKS_KID_ALG_MISMATCH)
    # The right kid but signed by another key.
    denied(check(rules, Issuer(ISS.iss, kid="k1", key=RSA_OTHER).mint()), Status.JWT_VERIFICATION_FAIL)
    # The key pins RS256; an RS384 token with its kid does not match it.
    denied(check(rules, Issuer(ISS.iss, alg="RS384").mint()), Status.JWKS_KID_ALG_MISMATCH)


def test_fake_jwks_from_an_unfetchable_jwks_uri_rejects_every_token():
    rules = rules_for({"issuer": ISS.iss, "jwksUri": "https://keys.example.com/jwks.json"})
    assert rules.rules[0].jwks.fake
    # istio/istio#53260: real tokens carry a kid that is not "abc".
    denied(check(rules, ISS.mint()), Status.JWKS_KID_ALG_MISMATCH)
    denied(check(rules, Issuer(ISS.iss, kid="").mint()), Status.JWT_VERIFICATION_FAIL)
    denied(check(rules, Issuer(ISS.iss, kid="abc").mint()), Status.JWT_VERIFICATION_FAIL)
    # No token still passes (allow_missing), as in Istio.
    assert check(rules, None).allowed


def test_fake_jwks_is_istiods_text():
    text = fake_jwks_text("https://my-outside-cluster-host.com/oidc")
    assert text.startswith('{"keys":[ {"e":"AQAB","kid":"abc","kty":"RSA","n":"RXJyb3ItSXN0aW9kRmFpbGVkVG9GZXRjaEp3a3NVcmkt')
    n = json.loads(text)["keys"][0]["n"]
    assert b64url_decode(n) == b"Error-IstiodFailedToFetchJwksUri-https://my-outside-cluster-host.com/oidc"


def test_ed25519_signature_of_the_wrong_length_is_its_own_status():
    issuer = Issuer("ed", alg="EdDSA")
    rules = rules_for({"issuer": "ed", "jwks": issuer.jwks()})
    h, p, _ = issuer.mint().split(".")
    denied(check(rules, f"{h}.{p}.{b64url_encode(b'x' * 63)}"), Status.JWT_ED25519_SIGNATURE_WRONG_LENGTH)


# ---- malformed tokens ---------------------------------------------------------------------------

def _b(obj) -> str:
    return b64url_encode(json.dumps(obj).encode() if not isinstance(obj, bytes) else obj)


@pytest.mark.parametrize("token,status", [
    ("abc", Status.JWT_BAD_FORMAT),
    ("a.b", Status.JWT_BAD_FORMAT),
    ("a.b.c.d", Status.JWT_BAD_FORMAT),
    ("..", Status.JWT_BAD_FORMAT),
    ("!!!.e30.AAAA", Status.JWT_HEADER_BAD_BASE64),
    ("a.e30.AAAA", Status.JWT_HEADER_BAD_BASE64),                       # 1 char: not a base64 quantum
    (f"{_b(b'not json')}.e30.AAAA", Status.JWT_HEADER_BAD_JSON),
    (f"{_b([1, 2])}.e30.AAAA", Status.JWT_HEADER_BAD_JSON),              # a JSON array is not a Struct
    (_b(b'{"alg":NaN}') + ".e30.AAAA", Status.JWT_HEADER_BAD_JSON),
    (f"{_b({'alg': 'RS256', 'kid': 5})}.e30.AAAA", Status.JWT_HEADER_BAD_KID),
    (f"{_b({'alg': 'RS256'})}.%%%.AAAA", Status.JWT_PAYLOAD_BAD_BASE64),
    (f"{_b({'alg': 'RS256'})}.{_b(b'[]')}.AAAA", Status.JWT_PAYLOAD_BAD_JSON),
    (f"{_b({'alg': 'RS256'})}.{_b(b'{' * 200 + b'}' * 200)}.AAAA", Status.JWT_PAYLOAD_BAD_JSON),
    (f"{_b({'alg': 'RS256'})}.{_b({'iss': 'x'})}.A", Status.JWT_SIGNATURE_BAD_BASE64),
    (f"{_b({'alg': 'RS256'})}.{_b({'iss': 'x'})}.AA+A", Status.JWT_SIGNATURE_BAD_BASE64),
    ("é.e30.AAAA", Status.JWT_HEADER_BAD_BASE64),
])
def test_malformed_tokens_get_envoys_status(token, status):
    assert parse_jwt(token) is status
    denied(check_raw(token), status)


def test_padding_is_optional_as_in_absl():
    h, p, s = ISS.mint().split(".")
    padded = ".".join(x + "=" * (-len(x) % 4) for x in (h, p, s))
    assert padded != f"{h}.{p}.{s}"
    # Padding decodes, but the signed data is the sections as sent ("header_str_base64url_ + '.' + ..."),
    # so a padded header or payload no longer matches the signature; a padded signature is fine.
    assert check_raw(padded).reason is Status.JWT_VERIFICATION_FAIL
    assert check_raw(f"{h}.{p}.{s}=").reason in (Status.OK, Status.JWT_SIGNATURE_BAD_BASE64)
    assert check_raw(f"{h}.{p}.{s}" + "=" * (-len(s) % 4)).allowed
    # Envoy splits with SkipEmpty: doubled dots still make three sections, and the signed data is rebuilt
    # from them with one dot, so this verifies (as in Envoy).
    assert check_raw(f"{h}..{p}.{s}").allowed
    # After "Bearer " the extractor takes the run of base64url and dots: trailing padding or junk is cut off.
    assert check(RULES, f"{h}.{p}.{s}=== junk").allowed


def test_tampered_payload():
    h, _, s = ISS.mint().split(".")
    p = b64url_encode(json.dumps({"iss": ISS.iss, "sub": "admin", "exp": NOW + 3600}).encode())
    denied(check(RULES, f"{h}.{p}.{s}"), Status.JWT_VERIFICATION_FAIL)


def test_oversized_token_is_refused_before_decoding():
    huge = ISS.mint({"pad": "x" * MAX_TOKEN_BYTES})
    assert len(huge) > MAX_TOKEN_BYTES
    denied(check(RULES, huge), Status.JWT_BAD_FORMAT)


def test_every_prefix_of_a_valid_token_is_a_clean_401():
    token = Issuer("es", alg="ES256").mint()
    rules = rules_for({"issuer": "es", "jwks": Issuer("es", alg="ES256").jwks()})
    assert check(rules, token).allowed
    for i in range(1, len(token)):
        result = check(rules, token[:i])
        assert not result.allowed and result.status == 401, (i, result)
        # and with trailing junk after the full token (the extractor stops at the first non-base64 char)
        trailing = check(rules, token + " trailing")
        assert trailing.allowed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.text(max_size=200),
    st.lists(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.", max_size=60),
             min_size=1, max_size=5).map(".".join),
    st.tuples(st.dictionaries(st.sampled_from(["alg", "kid", "typ"]), st.one_of(st.text(max_size=8), st.integers(),
                                                                                 st.sampled_from(["RS256", "HS256", "none"]))),
              st.dictionaries(st.sampled_from(["iss", "sub", "exp", "nbf", "iat", "aud"]),
                              st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
                                        st.lists(st.text(max_size=4), max_size=3))),
              st.binary(max_size=80)).map(lambda t: f"{_b(t[0])}.{_b(t[1])}.{b64url_encode(t[2]) or 'A'}"),
))
def test_junk_tokens_only_ever_get_a_rejection(token):
    result = check(RULES, token)
    assert isinstance(result, AuthnResult)
    # Junk never authenticates (nothing here is signed by ISS's key); it is a 401 — or it was not seen as a
    # token at all (e.g. no base64 character after "Bearer "), which passes without a principal.
    if result.allowed:
        assert result.principal is None and result.claims is None
    else:
        assert result.status == 401 and result.body == result.reason.text


# ---- JWKS parsing -------------------------------------------------------------------------------

@pytest.mark.parametrize("jwks,problem", [
    ("not json", "Jwks is an invalid JSON"),
    ("[]", "Jwks is an invalid JSON"),
    ("{}", "Jwks does not have [keys] field"),
    ('{"keys": {}}', "[keys] in Jwks is not an array"),
    ('{"keys": []}', "Jwks doesn't have any valid public key"),
    ('{"keys": [{"n": "AQAB"}]}', "keys[0]: [kty] is missing in [keys]"),
    ('{"keys": [{"kty": 1}]}', "keys[0]: [kty] is bad in [keys]"),
    ('{"keys": [{"kty": "DSA"}]}', "keys[0]: [kty] is not supported in [keys]"),
    ('{"keys": [{"kty": "RSA", "e": "AQAB"}]}', "keys[0]: [n] field is missing for a RSA key"),
    ('{"keys": [{"kty": "RSA", "n": 5, "e": "AQAB"}]}', "keys[0]: [n] field is not string for a RSA key"),
    ('{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}', "keys[0]: Jwks RSA [n] or [e] field is missing or has a parse error"),
    ('{"keys": [{"kty": "RSA", "alg": "ES256", "n": "AQAB", "e": "AQAB"}]}', "keys[0]: [alg] is not started with [RS] or [PS] for an RSA key"),
    ('{"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES384", "x": "AA", "y": "AA"}]}', "keys[0]: [crv] field specified is not compatible with [alg] for an EC key"),
    ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}]}', "keys[0]: Jwks EC [x] and [y] fields have a parse error."),
    ('{"keys": [{"kty": "EC", "crv": "secp256k1", "x": "AQ", "y": "AQ"}]}', "keys[0]: [crv] or [alg] field is not supported for an EC key"),
    ('{"keys": [{"kty": "oct"}]}', "keys[0]: [k] field is missing for an HMAC key"),
    ('{"keys": [{"kty": "oct", "k": "", "alg": "HS256"}]}', "keys[0]: Jwks Oct key is an invalid Base64"),
    ('{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]}', "keys[0]: Jwks OKP [x] field is wrong length."),
    ('{"keys": [{"kty": "OKP", "crv": "X25519", "x": "AAAA"}]}', "keys[0]: [crv] field is not supported for an OKP key"),
])
def test_bad_key_sets_name_envoys_reason(jwks, problem):
    with pytest.raises(JwksError) as err:
        parse_jwks(jwks)
    assert str(err.value) == problem


def test_key_set_bounds():
    key = ISS.jwk()
    parse_jwks(json.dumps({"keys": [key] * MAX_JWKS_KEYS}))
    with pytest.raises(JwksError, match="more than"):
        parse_jwks(json.dumps({"keys": [key] * (MAX_JWKS_KEYS + 1)}))
    big = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers()
    huge_n = _int_b64((big.n << 8000) | 1)
    with pytest.raises(JwksError, match="larger than 8192 bits"):
        parse_jwks(json.dumps({"keys": [{"kty": "RSA", "n": huge_n, "e": "AQAB"}]}))


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=120), st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(["keys", "kty", "n", "e", "x", "y", "crv", "k", "alg", "kid"]),
                                               children, max_size=5)),
    max_leaves=20).map(json.dumps)))
def test_junk_key_sets_only_raise_jwks_error(text):
    try:
        jwks = parse_jwks(text)
    except JwksError:
        return
    assert jwks.keys
