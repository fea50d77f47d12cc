"""Trust domain aliases in AuthorizationPolicy principals, as istiod rewrites them for Envoy (waypoints).

Istio (``pilot/pkg/security/trustdomain/bundle.go``, applied to every rule by
``authzmodel.Model.MigrateTrustDomain`` before the Envoy RBAC config is generated): the mesh's trust
domain and its aliases (``meshConfig.trustDomain``, ``meshConfig.trustDomainAliases``) form a bundle, and
each ``source.principal`` value — ``from.source.principals`` / ``notPrincipals`` and ``when`` conditions
on ``source.principal`` alike — is replaced:

* a principal that is not ``<td>/ns/<ns>/sa/<sa>`` (not five ``/`` parts), or whose trust domain is
  exactly ``*``, is kept as written ("the policy doesn't care about the trust domain");
* one whose trust domain matches a domain of the bundle (exact, ``*``, or a leading/trailing ``*`` on
  either side: ``stringMatch``), or is the literal ``cluster.local`` — "a pointer to the local trust
  domain and its aliases" — becomes one principal per domain of the bundle, in bundle order, the
  local domain first; a domain the principal's own wildcard already covers keeps the principal as
  written; duplicates are dropped;
* any other is kept as written (istiod logs "does not match the current trust domain or its aliases").

So with the default ``cluster.local`` and no aliases nothing changes; with ``--trust-domain example.org``
a policy naming ``cluster.local/ns/default/sa/productpage`` still admits productpage, now
``example.org/ns/default/sa/productpage`` — Istio's trust domain migration task.

``source.trustDomain`` values equal to a domain of the bundle are expanded to the whole bundle
(``ExpandTrustDomainAliases``).

Only the waypoint does this. ztunnel's policies come from istiod's ambient converter, which does not
(``convertAuthorizationPolicy``: "// TODO: TDA"), so node mode matches principals as written.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Sequence

from policy.authz.match import StringMatch
from policy.authz.model import (A_SOURCE_PRINCIPAL, A_SOURCE_TRUST_DOMAIN, ORIGIN_ISTIO, AuthorizationPolicy,
                                Field, Rule)
from policy.inventory import DEFAULT_TRUST_DOMAIN


def _prefix_match(a: str, pattern: str) -> bool:
    return pattern.endswith("*") and a.startswith(pattern[:-1])


def _suffix_match(a: str, pattern: str) -> bool:
    return pattern.startswith("*") and a.endswith(pattern[1:])


def _string_match(a: str, bundle: Sequence[str]) -> bool:
    """istiod trustdomain/util.go stringMatch: the pattern may be on either side."""
    return any(a == s or s == "*" or _prefix_match(a, s) or _prefix_match(s, a) or _suffix_match(a, s)
               or _suffix_match(s, a) for s in bundle)


def replace_trust_domain_aliases(principals: Iterable[str], trust_domains: Sequence[str]) -> list[str]:
    """``Bundle.ReplaceTrustDomainAliases``: ``trust_domains`` is the local domain, then its aliases."""
    out: list[str] = []
    for principal in principals:
        parts = principal.split("/")
        if len(parts) != 5 or parts[0] == "*":   # isTrustDomainBeingEnforced is false
            out.append(principal)
            continue
        td = parts[0]
        if not (_string_match(td, trust_domains) or td == DEFAULT_TRUST_DOMAIN):
            out.append(principal)
            continue
        mine: list[str] = []
        for bundle_td in trust_domains:
            new = principal if _suffix_match(bundle_td, td) else "/".join((bundle_td, *parts[1:]))
            if new not in mine:
                mine.append(new)
        out.extend(mine)
    return out


def expand_trust_domains(values: Iterable[str], trust_domains: Sequence[str]) -> list[str]:
    """``Bundle.ExpandTrustDomainAliases`` for ``source.trustDomain`` values (duplicates dropped)."""
    out: list[str] = []
    for v in values:
        for x in (trust_domains if v in trust_domains else (v,)):
            if x not in out:
                out.append(x)
    return out


def _rewrite(matchers, trust_domains: Sequence[str], fn) -> tuple:
    if not matchers:
        return matchers
    return tuple(StringMatch.parse(t) for t in fn([str(m) for m in matchers], trust_domains))


def _field(f: Field, trust_domains: Sequence[str]) -> Field:
    if f.attr == A_SOURCE_PRINCIPAL:
        fn = replace_trust_domain_aliases
    elif f.attr == A_SOURCE_TRUST_DOMAIN:
        fn = expand_trust_domains
    else:
        return f
    values = _rewrite(f.values, trust_domains, fn)
    not_values = _rewrite(f.not_values, trust_domains, fn)
    if values == f.values and not_values == f.not_values:
        return f
    return replace(f, values=values, not_values=not_values)


def _rule(rule: Rule, trust_domains: Sequence[str]) -> Rule:
    clauses = tuple(replace(c, matches=tuple(replace(m, fields=tuple(_field(f, trust_domains) for f in m.fields))
                                             for m in c.matches))
                    for c in rule.clauses)
    return rule if clauses == rule.clauses else replace(rule, clauses=clauses)


def with_trust_domain_aliases(policy: AuthorizationPolicy, trust_domains: Sequence[str]) -> AuthorizationPolicy:
    """The policy as istiod would send it to a waypoint's Envoy (the same object when nothing changes).
    ztunnel-format policies are not Istio resources and are returned as they are."""
    if policy.origin != ORIGIN_ISTIO or not trust_domains:
        return policy
    rules = tuple(_rule(r, trust_domains) for r in policy.rules)
    return policy if rules == policy.rules else replace(policy, rules=rules)


def for_waypoint(policies: Iterable[AuthorizationPolicy], trust_domains: Sequence[str]) -> tuple[AuthorizationPolicy, ...]:
    return tuple(with_trust_domain_aliases(p, trust_domains) for p in policies)


__all__ = ["replace_trust_domain_aliases", "expand_trust_domains", "with_trust_domain_aliases", "for_waypoint"]
