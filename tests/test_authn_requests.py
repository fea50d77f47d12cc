"""Whole requests through policy.authn.authenticate: where tokens are found, Envoy's requirement tree over
several rules, the request edits (token removal, payload and claim headers, sanitising), the 401 answer,
waypoint selection, caching bounds, and the hand-off to policy.authz."""

from __future__ import annotations

import base64
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.authn import (EMPTY_RULE_SET, AuthnResult, Status, authenticate, jwt_rules_for_waypoint,
                          parse_request_authentication)
from policy.authn.authenticate import JwtRuleSet
from policy.authz import AuthzRequest, Enforcement, HttpAttributes, authorize, parse_authorization_policy
from policy.errors import Where
from tests.test_authn_verify import NOW, RSA_OTHER, Issuer, ra_doc

A = Issuer("https://a.example.com")
B = Issuer("https://b.example.com", alg="ES256", kid="b1")
HOST = (b"host", b"httpbin.default:8000")


def rules_for(*rules: dict) -> JwtRuleSet:
    return JwtRuleSet.of(parse_request_authentication(ra_doc(*rules), Where("t.yaml")).jwt_rules)


def run(rules, headers=(), target=b"/get", **kw) -> AuthnResult:
    return authenticate(rules, [HOST, *headers], target, now=kw.pop("now", NOW), **kw)


def bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + token.encode())


RULE_A = {"issuer": A.iss, "jwks": A.jwks()}
RULE_B = {"issuer": B.iss, "jwks": B.jwks()}
ONE = rules_for(RULE_A)


# ---- no rules, no token ---------------------------------------------------------------------------

def test_no_rules_is_a_constant_allow():
    r1 = authenticate(EMPTY_RULE_SET, [bearer("garbage")], b"/", now=NOW)
    r2 = authenticate((), [], b"/", now=NOW)
    assert r1 is r2 and r1.allowed and r1.principal is None and not r1.remove and not r1.add


def test_a_request_without_a_token_passes_without_a_principal():
    # Istio: "A request that does not contain any authentication credentials will be accepted but will not
    # have any authenticated identity" (allow_missing).
    r = run(ONE)
    assert r.allowed and r.principal is None and r.claims is None and r.tokens == 0
    assert r.cache_until == math.inf


# ---- token locations --------------------------------------------------------------------------------

def test_default_authorization_bearer():
    r = run(ONE, [bearer(A.mint())])
    assert r.allowed and r.principal == f"{A.iss}/alice"
    assert b"authorization" in r.remove   # not forwarded (forwardOriginalToken: false)


def test_bearer_prefix_is_case_sensitive_and_other_schemes_are_not_tokens():
    # extractor.cc: value_str.find(value_prefix_) — "bearer " or "Basic ..." is no JWT location, so the
    # request has no token and passes unauthenticated (as through Envoy).
    for value in (b"bearer " + A.mint().encode(), b"Basic dXNlcjpwYXNz"):
        r = run(ONE, [(b"authorization", value)])
        assert r.allowed and r.principal is None and r.tokens == 0
    # The prefix may appear anywhere in the value (find, not starts-with).
    assert run(ONE, [(b"authorization", b"xx Bearer " + A.mint().encode())]).principal == f"{A.iss}/alice"


def test_default_access_token_query_parameter_is_checked_and_removed():
    token = A.mint()
    r = run(ONE, target=f"/get?a=1&access_token={token}&b=2".encode())
    assert r.allowed and r.principal == f"{A.iss}/alice"
    assert r.target == b"/get?a=1&b=2"
    r = run(ONE, target=f"/get?access_token={token}".encode())
    assert r.target == b"/get"
    # The first value counts (getFirstValue); an invalid one is a 401.
    r = run(ONE, target=f"/get?access_token=bad&access_token={token}".encode())
    assert r.body == Status.JWT_BAD_FORMAT.text


def test_query_tokens_are_percent_decoded_and_the_rest_of_the_query_kept_as_sent():
    token = A.mint()
    encoded = token.replace(".", "%2E").encode()
    r = run(ONE, target=b"/get?x=%C3%A9&access_token=" + encoded + b"&y=\xff&&z")
    assert r.principal == f"{A.iss}/alice"
    assert r.target == b"/get?x=%C3%A9&y=\xff&z"


def test_claims_are_read_only_and_plain_rule_tuples_work_too():
    r = authenticate(ONE.rules, [HOST, bearer(A.mint({"org": {"team": "t"}, "groups": ["a"]}))], b"/", now=NOW)
    assert r.principal == f"{A.iss}/alice"
    with pytest.raises(TypeError):
        r.claims["sub"] = "admin"
    with pytest.raises(TypeError):
        r.claims["org"]["team"] = "x"
    assert r.claims["groups"] == ("a",)


def test_two_tokens_for_one_rule_follow_envoys_token_order():
    # The provider verifier wants every token valid ("If a request has multiple tokens, all of them must be
    # valid"), but Istio ORs it with allow_missing, whose authenticator goes on after a failure and reports
    # the status of the last token it checks (authenticator.cc doneWithStatus). Tokens are checked from the
    # back of the extracted list (headers first, then query): so the header token has the last word.
    expired = A.mint(exp=NOW - 3600)
    r = run(ONE, [bearer(A.mint())], target=b"/get?access_token=" + expired.encode())
    assert r.allowed and r.principal == f"{A.iss}/alice"
    r = run(ONE, [bearer(expired)], target=b"/get?access_token=" + A.mint().encode())
    assert not r.allowed and r.body == "Jwt is expired"
    r = run(ONE, [bearer(expired)], target=b"/get?access_token=junk")
    assert not r.allowed and r.body == "Jwt is expired"


def test_from_headers_with_and_without_prefix():
    rules = rules_for({**RULE_A, "fromHeaders": [{"name": "X-Goog-IAP-JWT-Assertion"},
                                                 {"name": "ingress-authorization", "prefix": "Istio "}]})
    assert run(rules, [(b"x-goog-iap-jwt-assertion", A.mint().encode())]).principal == f"{A.iss}/alice"
    r = run(rules, [(b"Ingress-Authorization", b"Istio " + A.mint().encode())])
    assert r.principal == f"{A.iss}/alice" and r.remove == (b"ingress-authorization",)
    # With explicit locations the defaults are off: Authorization is not read.
    assert run(rules, [bearer(A.mint(exp=1))]).principal is None


def test_from_params_and_cookies():
    rules = rules_for({**RULE_A, "fromParams": ["jwt"], "fromCookies": ["session", "other"]})
    r = run(rules, target=f"/x?jwt={A.mint()}".encode())
    assert r.principal == f"{A.iss}/alice" and r.target == b"/x"
    cookie = f'theme=dark; session="{A.mint(sub="carol")}"; x=1'.encode()
    r = run(rules, [(b"cookie", cookie)])
    assert r.principal == f"{A.iss}/carol"
    # extractor.cc JwtCookieLocation::removeJwt: "TODO ... remove JWT from cookies" — the cookie stays.
    assert b"cookie" not in r.remove and r.target is None
    assert run(rules, [(b"cookie", b"session=garbage")]).body == Status.JWT_BAD_FORMAT.text


def test_forward_original_token_keeps_it():
    rules = rules_for({**RULE_A, "forwardOriginalToken": True})
    r = run(rules, [bearer(A.mint())], target=b"/g?access_token=x")
    assert r.allowed and r.remove == () and r.target is None   # nothing removed from the query either
    r = run(rules, [bearer(A.mint())])
    assert r.allowed and r.remove == () and r.target is None


# ---- header edits ---------------------------------------------------------------------------------

def test_output_payload_and_claims_to_headers():
    rules = rules_for({**RULE_A, "outputPayloadToHeader": "x-jwt-payload", "outputClaimToHeaders": [
        {"header": "x-jwt-sub", "claim": "sub"}, {"header": "x-jwt-admin", "claim": "admin"},
        {"header": "x-jwt-n", "claim": "n"}, {"header": "x-jwt-f", "claim": "f"},
        {"header": "x-jwt-team", "claim": "org.team"}, {"header": "x-jwt-list", "claim": "groups"},
        {"header": "x-jwt-evil", "claim": "evil"}, {"header": "x-jwt-none", "claim": "missing.deep"},
    ]})
    token = A.mint({"admin": True, "n": 42, "f": 1.5, "org": {"team": "payments"}, "groups": ["a"],
                    "evil": "x\r\nInjected: 1"})
    r = run(rules, [bearer(token), (b"x-jwt-sub", b"spoofed"), (b"x-jwt-payload", b"spoofed")])
    assert r.allowed
    added = dict(r.add)
    payload = json.loads(base64.urlsafe_b64decode(added.pop(b"x-jwt-payload") + b"=="))
    assert payload["sub"] == "alice" and payload["org"] == {"team": "payments"}
    # Envoy's addJWTClaimToHeader: strings as is, integral numbers as integers, other numbers as "%f",
    # booleans as true/false; lists, objects and missing claims add nothing — and a CR/LF never reaches a header.
    assert added == {b"x-jwt-sub": b"alice", b"x-jwt-admin": b"true", b"x-jwt-n": b"42", b"x-jwt-f": b"1.500000",
                     b"x-jwt-team": b"payments"}
    # The client's copies of the output headers are dropped (extractor.cc sanitizeHeaders), then ours added.
    assert {b"x-jwt-sub", b"x-jwt-payload", b"authorization"} <= set(r.remove)


def test_output_headers_are_sanitised_even_without_a_token():
    rules = rules_for({**RULE_A, "outputPayloadToHeader": "x-jwt-payload",
                       "outputClaimToHeaders": [{"header": "x-user", "claim": "sub"}]})
    r = run(rules, [(b"X-User", b"admin"), (b"x-jwt-payload", b"eyJzdWIiOiJhZG1pbiJ9")])
    assert r.allowed and r.principal is None
    assert set(r.remove) == {b"x-user", b"x-jwt-payload"} and r.add == ()


def test_space_delimited_claims_become_lists_for_authorization():
    rules = rules_for({**RULE_A, "spaceDelimitedClaims": ["roles"]})
    r = run(rules, [bearer(A.mint({"scope": "read  write", "roles": "a b", "other": "c d"}))])
    assert r.claims["scope"] == ("read", "write")
    assert r.claims["roles"] == ("a", "b")
    assert r.claims["other"] == "c d"


# ---- several rules (Envoy's requires_any / requires_all tree) -----------------------------------------

def test_two_issuers_sharing_the_default_location():
    rules = rules_for(RULE_B, RULE_A)
    assert [r.issuer for r in rules.rules] == [A.iss, B.iss]   # sorted by issuer, as istiod does
    assert run(rules, [bearer(A.mint())]).principal == f"{A.iss}/alice"
    assert run(rules, [bearer(B.mint(sub="bob"))]).principal == f"{B.iss}/bob"
    assert run(rules).allowed
    stranger = Issuer("https://c.example.com")
    r = run(rules, [bearer(stranger.mint())])
    assert not r.allowed and r.body == "Jwt issuer is not configured"
    # Whose error the 401 names follows Envoy's tree: the last child of the outer requires_any is the
    # requires_all, whose first member is A's (requires_any [A, allow_missing(A)]). For A's expired token that
    # is "Jwt is expired"; for B's, A's location (shared, but listing only A's issuer) says "Jwt issuer is not
    # configured" first.
    r = run(rules, [bearer(A.mint(exp=NOW - 1000))])
    assert not r.allowed and r.body == "Jwt is expired"
    r = run(rules, [bearer(B.mint(exp=NOW - 1000))])
    assert not r.allowed and r.body == "Jwt issuer is not configured"
    # A token claiming A's issuer but signed by another key.
    forged = Issuer(A.iss, key=RSA_OTHER).mint()
    r = run(rules, [bearer(forged)])
    assert not r.allowed and r.body == "Jwt verification fails"


def test_two_issuers_with_their_own_headers():
    rules = rules_for({**RULE_A, "fromHeaders": [{"name": "x-a"}]}, {**RULE_B, "fromHeaders": [{"name": "x-b"}]})
    assert run(rules, [(b"x-b", B.mint().encode())]).principal == f"{B.iss}/alice"
    r = run(rules, [(b"x-b", B.mint(nbf=NOW + 3600).encode())])
    assert not r.allowed and r.body == "Jwt not yet valid"
    # A's token in B's header: B's location only admits B's issuer.
    r = run(rules, [(b"x-b", A.mint().encode())])
    assert not r.allowed and r.body == "Jwt issuer is not configured"
    # Both present and valid: the first provider that succeeds decides (the outer requires_any).
    r = run(rules, [(b"x-a", A.mint().encode()), (b"x-b", B.mint().encode())])
    assert r.allowed and r.principal == f"{A.iss}/alice" and set(r.remove) == {b"x-a"}


def test_an_empty_issuer_with_jwks_uri_accepts_any_issuer_but_rejects_the_token():
    rules = rules_for({"jwksUri": "https://keys.example.com/jwks.json"})
    r = run(rules, [bearer(A.mint())])
    assert not r.allowed and r.body == "Jwks doesn't have key to match kid or alg from Jwt"


# ---- the rejection ------------------------------------------------------------------------------

def test_401_answer_carries_www_authenticate_like_envoy():
    r = run(ONE, [bearer("not-a-jwt"), (b"x-forwarded-proto", b"https")], target=b"/p?q=1")
    assert (r.status, r.body, r.detail) == (401, "Jwt is not in the form of Header.Payload.Signature with two "
                                                 "dots and 3 sections",
                                            "jwt_authn_access_denied{Jwt_is_not_in_the_form_of_Header.Payload."
                                            "Signature_with_two_dots_and_3_sections}")
    assert r.response_headers == ((b"www-authenticate",
                                   b'Bearer realm="https://httpbin.default:8000/p?q=1", error="invalid_token"'),)
    long_path = b"/" + b"a" * 400
    r = authenticate(ONE, [bearer("x.y.z")], long_path, now=NOW, authority=b"svc:80")
    realm = r.response_headers[0][1]
    assert realm.startswith(b'Bearer realm="http://svc:80/aaa') and len(realm) == len(b'Bearer realm="http://svc:80"') + 256 + len(b', error="invalid_token"')


def test_audience_mismatch_is_403():
    rules = rules_for({**RULE_A, "audiences": ["bookinfo"]})
    r = run(rules, [bearer(A.mint(aud="other"))])
    assert (r.status, r.body) == (403, "Audiences in Jwt are not allowed")


def test_cors_preflight_bypasses_the_check():
    headers = [bearer("garbage"), (b"origin", b"https://app"), (b"access-control-request-method", b"GET")]
    assert run(ONE, headers, method=b"OPTIONS").allowed
    assert run(ONE, [*headers, (b":method", b"OPTIONS")]).allowed
    assert not run(ONE, headers, method=b"GET").allowed
    assert not run(ONE, headers[:2], method=b"OPTIONS").allowed   # no Access-Control-Request-Method


# ---- caching bounds -------------------------------------------------------------------------------

def test_cache_until_bounds_when_the_answer_can_change():
    token = A.mint(exp=NOW + 100)
    r = run(ONE, [bearer(token)])
    assert r.cache_until == NOW + 100 + 60 + 1
    assert run(ONE, [bearer(token)], now=r.cache_until - 1).allowed
    assert not run(ONE, [bearer(token)], now=r.cache_until).allowed
    early = A.mint(nbf=NOW + 500)
    r = run(ONE, [bearer(early)])
    assert not r.allowed and r.cache_until == NOW + 500 - 60
    assert not run(ONE, [bearer(early)], now=r.cache_until - 1).allowed
    assert run(ONE, [bearer(early)], now=r.cache_until).allowed
    # Rejections that time cannot change, and valid tokens without exp, are good forever.
    assert run(ONE, [bearer(A.mint(exp=NOW - 1000))]).cache_until == math.inf
    assert run(ONE, [bearer(Issuer("x").mint())]).cache_until == math.inf
    assert run(ONE, [bearer(A.mint(exp=None))]).cache_until == math.inf


# ---- selection at a waypoint ------------------------------------------------------------------------

def _ra(name, ns, refs=None, selector=None, issuer=None):
    doc = ra_doc({"issuer": issuer or f"iss-{name}", "jwks": A.jwks()}, name=name, namespace=ns)
    if refs is None:
        del doc["spec"]["targetRefs"]
    else:
        doc["spec"]["targetRefs"] = refs
    if selector:
        doc["spec"]["selector"] = {"matchLabels": selector}
    return parse_request_authentication(doc, Where("t.yaml"))


GW = "gateway.networking.k8s.io"


def test_waypoint_selection_mirrors_authorization_policy():
    policies = [
        _ra("gw", "default", [{"group": GW, "kind": "Gateway", "name": "waypoint"}]),
        _ra("other-gw", "default", [{"group": GW, "kind": "Gateway", "name": "other"}]),
        _ra("gw-other-ns", "prod", [{"group": GW, "kind": "Gateway", "name": "waypoint"}]),
        _ra("svc", "default", [{"group": "", "kind": "Service", "name": "reviews"}]),
        _ra("svc-core", "default", [{"group": "core", "kind": "Service", "name": "ratings"}]),
        _ra("class", "istio-system", [{"group": GW, "kind": "GatewayClass", "name": "istio-waypoint"}]),
        _ra("class-not-root", "default", [{"group": GW, "kind": "GatewayClass", "name": "istio-waypoint"}]),
        _ra("selector", "default", selector={"app": "reviews"}),
        _ra("namespace-wide", "default"),
    ]
    rules = jwt_rules_for_waypoint(policies, gateway=("default", "waypoint"),
                                   services=[("default", "reviews"), ("default", "ratings")])
    assert sorted(r.issuer for r in rules) == ["iss-class", "iss-gw", "iss-svc", "iss-svc-core"]
    assert not jwt_rules_for_waypoint(policies[-2:], gateway=("default", "waypoint"))
    assert jwt_rules_for_waypoint([], gateway=None) is EMPTY_RULE_SET
    # A Service with the same name in another namespace does not count.
    assert not jwt_rules_for_waypoint(policies[3:4], gateway=None, services=[("prod", "reviews")])
    assert "GatewayClass" in repr(policies[5].target_refs) and "rules=4" in repr(rules)


# ---- hand-off to authorization ------------------------------------------------------------------------

def test_request_principals_in_authorization_policy_match_the_validated_token():
    policy = parse_authorization_policy({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "require-jwt", "namespace": "default"},
        "spec": {"targetRefs": [{"group": GW, "kind": "Gateway", "name": "waypoint"}],
                 "rules": [{"from": [{"source": {"requestPrincipals": [f"{A.iss}/*"]}}],
                            "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}]}]},
    }, Where("t.yaml"))

    def decide(headers):
        r = run(ONE, headers)
        http = HttpAttributes("GET", "/get", "httpbin.default:8000", request_principal=r.principal,
                              jwt_claims=r.claims)
        return authorize(AuthzRequest("10.0.0.1", "cluster.local/ns/default/sa/sleep", "10.96.0.1", 8000, http),
                         (policy,), Enforcement.WAYPOINT).allowed

    assert decide([bearer(A.mint({"groups": ["dev", "admins"]}))])
    assert not decide([bearer(A.mint({"groups": ["dev"]}))])
    assert not decide([])   # no token: passes authentication, fails the ALLOW that needs a principal


# ---- junk requests ------------------------------------------------------------------------------------

_names = st.sampled_from([b"authorization", b"Authorization", b"cookie", b"x-jwt", b"host", b":method", b"origin"])
_values = st.one_of(st.binary(max_size=120),
                    st.builds(lambda t: b"Bearer " + t, st.binary(max_size=120)),
                    st.just(b"Bearer " + A.mint().encode()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_names, _values), max_size=6), st.binary(max_size=200), st.floats(-1e12, 1e12))
def test_junk_requests_never_raise(headers, target, now):
    rules = rules_for(RULE_A, {**RULE_B, "fromCookies": ["session"], "fromParams": ["jwt"],
                               "outputPayloadToHeader": "x-jwt-payload"})
    r = authenticate(rules, headers, target, now=now)
    assert isinstance(r, AuthnResult)
    if r.allowed:
        assert r.principal in (None, f"{A.iss}/alice")
        for name, value in r.add:
            assert b"\r" not in value and b"\n" not in value
    else:
        assert r.status in (401, 403) and r.body == r.reason.text


def test_a_header_sent_twice_is_one_value_and_yields_one_token():
    """Envoy joins repeated header values with "," (getAllOfHeaderAsString) and extracts one token: a bad token
    before a good one is what it checks (401), not let through by the good one."""
    good = A.mint()
    h, p, s = good.split(".")
    bad = f"{h}.{p}.{s[:-4]}AAAA"
    r = run(ONE, [bearer(bad), bearer(good)])
    assert (r.allowed, r.status, r.body) == (False, 401, "Jwt verification fails")
    r = run(ONE, [bearer(good), bearer(bad)])
    assert r.allowed and r.principal == f"{A.iss}/alice"


def test_a_key_verifies_only_its_own_algorithm_family():
    """verify.cc: an RSA key is used for RS*/PS* tokens only; the same RSA signature labelled ES256 fails. (The
    key names no alg, so the kid/alg filter lets it through and only the family check can refuse.)"""
    issuer = Issuer("https://noalg.example.com", jwk_alg=False)
    rules = rules_for({"issuer": issuer.iss, "jwks": issuer.jwks()})
    token = issuer.mint()
    assert run(rules, [bearer(token)]).allowed
    h, p, s = token.split(".")
    relabelled_head = base64.urlsafe_b64encode(json.dumps({"alg": "ES256", "typ": "JWT", "kid": issuer.kid}).encode()
                                               ).rstrip(b"=").decode()
    # (re-signed with the RSA key over the relabelled header: a valid RS256 signature under an ES256 label)
    forged = f"{relabelled_head}.{p}." + base64.urlsafe_b64encode(
        issuer.sign(f"{relabelled_head}.{p}".encode(), "RS256")).rstrip(b"=").decode()
    r = run(rules, [bearer(forged)])
    assert (r.allowed, r.body) == (False, "Jwt verification fails")
