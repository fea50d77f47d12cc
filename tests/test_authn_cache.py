"""policy.authn.jwt's cache of valid signatures: the costly check is made once per token and key set, and
nothing else is skipped — a tampered token, another key set or an expired token still gets its answer."""

from __future__ import annotations

import policy.authn.jwt as jwt_mod
from policy.authn import Status
from tests.test_authn_requests import A, ONE, bearer, rules_for, run
from tests.test_authn_verify import NOW


def _counting(monkeypatch) -> list:
    calls = []
    real = jwt_mod._verify_with

    def counted(jwk, jwt, data):
        calls.append(jwt.kid)
        return real(jwk, jwt, data)
    monkeypatch.setattr(jwt_mod, "_verify_with", counted)
    monkeypatch.setattr(jwt_mod, "_valid_signatures", {})
    return calls


def test_a_valid_signature_is_checked_once_per_key_set(monkeypatch):
    calls = _counting(monkeypatch)
    token = A.mint()
    for _ in range(3):
        assert run(ONE, [bearer(token)]).allowed
    assert len(calls) == 1
    other = rules_for({"issuer": A.iss, "jwks": A.jwks()})   # an equal key set, another object: checked again
    assert run(other, [bearer(token)]).allowed
    assert len(calls) == 2


def test_the_cache_skips_only_the_signature(monkeypatch):
    calls = _counting(monkeypatch)
    token = A.mint()
    assert run(ONE, [bearer(token)]).allowed
    h, p, s = token.split(".")
    tampered = f"{h}.{p}.{s[:-4]}AAAA"
    r = run(ONE, [bearer(tampered)])
    assert (r.allowed, r.reason) == (False, Status.JWT_VERIFICATION_FAIL)
    after_first = len(calls)
    assert after_first > 1
    r = run(ONE, [bearer(tampered)])   # a failure is not remembered: checked again, same answer
    assert (r.allowed, r.reason) == (False, Status.JWT_VERIFICATION_FAIL)
    assert len(calls) == 2 * after_first - 1
    # The same valid token, later than its exp (+ 60 s skew): expired, whatever the cache says of its signature.
    r = run(ONE, [bearer(token)], now=NOW + 3600 + 61)
    assert (r.allowed, r.reason) == (False, Status.JWT_EXPIRED)


def test_the_cache_is_bounded(monkeypatch):
    _counting(monkeypatch)
    monkeypatch.setattr(jwt_mod, "SIGNATURE_CACHE_ENTRIES", 4)
    for i in range(10):
        assert run(ONE, [bearer(A.mint({"n": i}))]).allowed
        assert len(jwt_mod._valid_signatures) <= 4
