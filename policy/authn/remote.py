"""Key sets named by URL — a ``jwksUri``, or none and the issuer's OpenID discovery document — as istiod resolves
them for a waypoint (pilot/pkg/model/jwks_resolver.go ``BuildLocalJwks``): fetched by the control plane, then
inlined into the proxy's config, with a fake key set (``jwks.fake_jwks``) standing in while a fetch has not
succeeded. The fetching is the proxy shell's (``proxy/jwks_resolver.py``); here only data in, data out: which
rules need a key set from the network (``remote_sources``), the rules with the fetched key sets put in
(``with_key_sets``), and the discovery document read (``jwks_uri_from_discovery``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from policy.authn.codec import loads_object
from policy.authn.jwks import JwksError
from policy.authn.model import Jwks, RequestAuthentication

# https://openid.net/specs/openid-connect-discovery-1_0.html §4: "OpenID Providers supporting Discovery MUST make a
# JSON document available at the path formed by concatenating the string /.well-known/openid-configuration to
# the Issuer" (istiod: openIDDiscoveryCfgURLSuffix, after strings.TrimSuffix(issuer, "/")).
OPENID_DISCOVERY_SUFFIX = "/.well-known/openid-configuration"


@dataclass(frozen=True)
class KeySource:
    """Where one rule's key set comes from: istiod's cache key ``jwtKey{jwksURI, issuer}`` (an empty
    ``jwks_uri``: discover it from the issuer) and the rule's fetch ``timeout`` (Istio's default 5 s)."""
    issuer: str
    jwks_uri: str
    timeout_s: float

    @property
    def key(self) -> tuple[str, str]:
        return (self.issuer, self.jwks_uri)

    @property
    def discovery_url(self) -> str:
        return self.issuer.removesuffix("/") + OPENID_DISCOVERY_SUFFIX


def remote_sources(authns: Sequence[RequestAuthentication]) -> tuple[KeySource, ...]:
    """The distinct key sources of the rules without an inline ``jwks`` (the parser gave them istiod's fake key
    set), in the order the rules come; the first rule's timeout stands for a source several rules name."""
    seen: dict[tuple[str, str], KeySource] = {}
    for ra in authns:
        for rule in ra.jwt_rules:
            if rule.jwks is not None and rule.jwks.fake:
                src = KeySource(rule.issuer, rule.jwks_uri, rule.timeout_s)
                seen.setdefault(src.key, src)
    return tuple(seen.values())


def with_key_sets(authns: Sequence[RequestAuthentication],
                  key_sets: Mapping[tuple[str, str], Jwks]) -> tuple[RequestAuthentication, ...]:
    """``authns`` with every fake-keyed rule whose source has a fetched key set given that key set (istiod inlines
    the fetched text in place of the fake one); the others, and the unchanged policies, are the same objects."""
    if not key_sets:
        return tuple(authns)
    out = []
    for ra in authns:
        rules = tuple(replace(rule, jwks=key_sets[(rule.issuer, rule.jwks_uri)])
                      if rule.jwks is not None and rule.jwks.fake and (rule.issuer, rule.jwks_uri) in key_sets
                      else rule for rule in ra.jwt_rules)
        changed = any(a is not b for a, b in zip(rules, ra.jwt_rules))
        out.append(replace(ra, jwt_rules=rules) if changed else ra)
    return tuple(out)


def jwks_uri_from_discovery(body: bytes) -> str:
    """The ``jwks_uri`` of an OpenID discovery document; ``JwksError`` with istiod's text when it has none
    (resolveJwksURIUsingOpenID: "invalid jwks_uri %v in openID discovery configuration")."""
    data = loads_object(body)   # (never raises: bounded nesting, a hostile document is just not an object)
    if data is None:
        raise JwksError("the OpenID discovery configuration is not a JSON object")
    uri = data.get("jwks_uri")
    if not isinstance(uri, str) or not uri:
        raise JwksError(f"invalid jwks_uri {str(uri)[:120]} in openID discovery configuration")
    return uri
