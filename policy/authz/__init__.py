"""Istio authorization as a pure library: parse AuthorizationPolicy resources and ztunnel-format
``policies:`` into one model (``model``), pick the policies that apply at a waypoint or a node proxy
(``select.PolicyIndex``), and decide a request as Istio does (``evaluate.authorize``)."""

from policy.authz.evaluate import (AuthzRequest, Decision, Enforcement, HttpAttributes, PolicyResult,
                                   RuleResult, authorize, explain)
from policy.authz.match import normalize_path
from policy.authz.model import AuthorizationPolicy
from policy.authz.parse import parse_authorization_policy, parse_ztunnel_policy
from policy.authz.select import PolicyIndex

__all__ = [
    "AuthorizationPolicy", "AuthzRequest", "Decision", "Enforcement", "HttpAttributes", "PolicyIndex",
    "PolicyResult", "RuleResult", "authorize", "explain", "normalize_path", "parse_authorization_policy",
    "parse_ztunnel_policy",
]
