"""RequestAuthentication through a real waypoint: tokens checked before authorization (Envoy's jwt_authn before
RBAC), the 401 answer, the token's header removed and a claim copied to a header for the pod, and the claims
deciding AuthorizationPolicy rules (``requestPrincipals``, ``request.auth.claims``) — on HTTP/1.1 in a tunnel.
The pure core: tests/test_authn_*.py."""

from __future__ import annotations

import json
import time

import yaml

from tests.test_authn_verify import Issuer
from tests.waypoint_harness import REVIEWS_VIP, start_harness

ISSUER = Issuer("https://idp.example.com", alg="ES256", kid="w1")

RA = {
    "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
    "metadata": {"name": "reviews-jwt", "namespace": "default"},
    "spec": {
        "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
        "jwtRules": [{"issuer": ISSUER.iss, "jwks": ISSUER.jwks(),
                      "outputClaimToHeaders": [{"header": "x-jwt-group", "claim": "group"}]}],
    },
}
# /headers needs a token (any), and one whose group claim is "admins": Istio's "require JWT" pattern as DENY rules.
DENY = {
    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "headers-need-admin-jwt", "namespace": "default"},
    "spec": {
        "targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}],
        "action": "DENY",
        "rules": [
            {"from": [{"source": {"notRequestPrincipals": ["*"]}}], "to": [{"operation": {"paths": ["/headers"]}}]},
            {"to": [{"operation": {"paths": ["/headers"]}}],
             "when": [{"key": "request.auth.claims[group]", "notValues": ["admins"]}]},
        ],
    },
}


def _token(issuer: Issuer = ISSUER, **claims) -> str:
    now = int(time.time())
    base = {"iat": now - 10, "exp": now + 3600}
    base.update(claims)
    return issuer.mint(None, **base)


def _bearer(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + token.encode())


async def test_tokens_are_checked_at_the_waypoint_and_their_claims_authorize(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, extra=yaml.safe_dump_all([RA, DENY]))
    try:
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        # No token: allowed through (istiod's allow_missing), but /headers needs a request principal.
        assert (await c.request(stream, "/"))[0] == 200
        status, _, body = await c.request(stream, "/headers")
        assert (status, body) == (403, b"RBAC: access denied")
        # A valid token of the admins group: the pod gets the claim as a header and no Authorization header.
        status, _, body = await c.request(stream, "/headers", headers=[_bearer(_token(sub="alice", group="admins"))])
        assert status == 200
        seen = json.loads(body)
        assert seen.get("x-jwt-group") == "admins" and "authorization" not in seen
        # A valid token of another group: authenticated, then denied by the claim rule.
        status, _, _ = await c.request(stream, "/headers", headers=[_bearer(_token(sub="bob", group="users"))])
        assert status == 403
        # A token that is present but not valid is answered by the JWT filter, before authorization, on any path.
        expired = _token(sub="carol", group="admins", iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)
        status, headers, body = await c.request(stream, "/", headers=[_bearer(expired)])
        assert (status, body) == (401, b"Jwt is expired")
        assert headers["www-authenticate"].startswith('Bearer realm="http://reviews:9080/"')
        assert 'error="invalid_token"' in headers["www-authenticate"]
        forged = _token(sub="mallory", group="admins")
        head, payload, sig = forged.split(".")
        tampered = f"{head}.{payload}.{sig[:-4]}AAAA"
        status, _, body = await c.request(stream, "/headers", headers=[_bearer(tampered)])
        assert (status, body) == (401, b"Jwt verification fails")
        # The same tunnel still serves.
        assert (await c.request(stream, "/"))[0] == 200
        stream.close()
        lines = await h.http_lines(7)
        got = [(l["path"], l["status"], l.get("response_code_details", "")) for l in lines]
        assert ("/", 401, "jwt_authn_access_denied{Jwt_is_expired}") in got
        assert ("/headers", 401, "jwt_authn_access_denied{Jwt_verification_fails}") in got
        denied = [d for p, s, d in got if p == "/headers" and s == 403]
        assert len(denied) == 2 and all(d.startswith("rbac_access_denied_matched_policy[ns[default]-policy["
                                                      "headers-need-admin-jwt]") for d in denied)
    finally:
        await h.close()


async def test_a_chain_without_request_authentication_ignores_tokens(tmp_path, loopback_ip):
    """No RequestAuthentication attached: a token is just a header, passed on to the pod untouched (and an
    AuthorizationPolicy asking for a request principal never matches it, as in Istio without one)."""
    h = await start_harness(tmp_path, loopback_ip, extra=yaml.safe_dump(DENY))
    try:
        c = h.client()
        stream = await c.tunnel(f"{REVIEWS_VIP}:9080")
        token = _token(sub="alice", group="admins")
        assert (await c.request(stream, "/", headers=[_bearer("not-even-a-jwt")]))[0] == 200
        status, _, _ = await c.request(stream, "/headers", headers=[_bearer(token)])
        assert status == 403   # no validated principal: the DENY rule's notRequestPrincipals matches
        stream.close()
    finally:
        await h.close()
