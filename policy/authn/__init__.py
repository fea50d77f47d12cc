"""Istio request authentication (JWT) as a pure library: parse ``RequestAuthentication`` (``parse``), pick what
a waypoint enforces (``select.jwt_rules_for_waypoint``) and check one request as the waypoint's Envoy
``jwt_authn`` filter does (``authenticate``): tokens from the default or configured locations, issuer,
audiences, ``exp``/``nbf`` with 60 s skew, the signature against an inline JWKS, Envoy's 401 texts, and the
request-header edits (token removal, ``outputPayloadToHeader``, ``outputClaimToHeaders``)."""

from policy.authn.authenticate import CLOCK_SKEW_S, EMPTY_RULE_SET, JwtRuleSet, authenticate
from policy.authn.jwks import fake_jwks, parse_jwks
from policy.authn.jwt import MAX_TOKEN_BYTES
from policy.authn.model import AuthnResult, JwtRule, RequestAuthentication, Status
from policy.authn.parse import parse_request_authentication
from policy.authn.select import jwt_rules_for_waypoint, policies_for_waypoint

__all__ = [
    "CLOCK_SKEW_S", "EMPTY_RULE_SET", "MAX_TOKEN_BYTES", "AuthnResult", "JwtRule", "JwtRuleSet",
    "RequestAuthentication", "Status", "authenticate", "fake_jwks", "jwt_rules_for_waypoint", "parse_jwks",
    "parse_request_authentication", "policies_for_waypoint",
]
