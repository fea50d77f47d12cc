"""One authorization model for both inputs: Istio ``AuthorizationPolicy`` resources and ztunnel-format
inventory ``policies:`` entries (reference/istio-semantics.md §1, reference/ztunnel.md §4).

The shape is ztunnel's, which is also how istiod lowers Istio policies for ztunnel
(``pilot/pkg/serviceregistry/ambient/authorization.go``):

* a policy is an OR of **rules** — no rules at all never matches (Istio: "If not set, the match will
  never occur. This is equivalent to setting a default of deny for the target workloads");
* a rule is an AND of **clauses** — a rule with no clause always matches (Istio: "An empty rule is
  always matched"). An Istio rule has at most a ``from`` clause, a ``to`` clause and one clause per
  ``when`` condition;
* a clause is an OR of **matches** (the sources of ``from``, the operations of ``to``); an empty
  clause matches (ztunnel ``rbac_empty_policy``: ``[[]]`` is true);
* a match (:class:`Source`, :class:`Operation`, :class:`Condition`, :class:`ZtunnelMatch`) is an AND
  of **fields**; a match with no field never matches (ztunnel skips ``RbacMatch::default()``);
* a field is one attribute with positive values (any may match) and negative values (none may match).

Each field knows whether it is HTTP-only for Envoy and how ztunnel treats it, so the per-enforcement
views of §1.5 are computed once, here, when the policy is built.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from policy.authz.match import Cidr, PathTemplate, StringMatch

ALLOW = "ALLOW"
DENY = "DENY"
AUDIT = "AUDIT"
ACTIONS = (ALLOW, DENY, AUDIT)

ORIGIN_ISTIO = "istio"
ORIGIN_ZTUNNEL = "ztunnel"

# ztunnel RbacScope
SCOPE_GLOBAL = "Global"
SCOPE_NAMESPACE = "Namespace"
SCOPE_WORKLOAD_SELECTOR = "WorkloadSelector"

# ---- attributes ---------------------------------------------------------------------------------
# Istio's condition keys (pilot/pkg/security/authz/model/model.go), plus the three operation fields
# that have no `when` key of their own.
A_SOURCE_PRINCIPAL = "source.principal"
A_SOURCE_NAMESPACE = "source.namespace"
A_SOURCE_SERVICE_ACCOUNT = "source.serviceAccount"
A_SOURCE_TRUST_DOMAIN = "source.trustDomain"
A_SOURCE_IP = "source.ip"
A_REMOTE_IP = "remote.ip"
A_REQUEST_PRINCIPAL = "request.auth.principal"
A_REQUEST_AUDIENCES = "request.auth.audiences"
A_REQUEST_PRESENTER = "request.auth.presenter"
A_REQUEST_CLAIMS = "request.auth.claims"
A_REQUEST_HEADER = "request.headers"
A_HOST = "request.host"        # operation.hosts (the :authority / Host)
A_METHOD = "request.method"    # operation.methods
A_PATH = "request.path"        # operation.paths (normalised, without query)
A_DESTINATION_IP = "destination.ip"
A_DESTINATION_PORT = "destination.port"
A_SNI = "connection.sni"

# How ztunnel treats a field (istio-semantics §1.5, authorization.go handleRule):
ZT_L4 = "l4"            # enforced
ZT_L7 = "l7"            # ALLOW rule dropped; DENY match loses the field (and is skipped if left empty)
ZT_IGNORED = "ignored"  # not mapped at all (source.trustDomains): the field just disappears

# Attributes Envoy can only evaluate on HTTP (model.go: HTTP-only generators; §1.5).
ENVOY_HTTP_ONLY = frozenset({
    A_REQUEST_PRINCIPAL, A_REQUEST_AUDIENCES, A_REQUEST_PRESENTER, A_REQUEST_CLAIMS,
    A_REQUEST_HEADER, A_HOST, A_METHOD, A_PATH,
})
# `when` keys ztunnel enforces (authorization.go l4WhenAttributes). Every other key is L7 to ztunnel,
# including source.serviceAccount, source.trustDomain and connection.sni (§6 item 5).
ZTUNNEL_L4_WHEN_KEYS = frozenset({
    A_SOURCE_IP, A_SOURCE_NAMESPACE, A_SOURCE_PRINCIPAL, A_DESTINATION_IP, A_DESTINATION_PORT,
})


@dataclass(frozen=True)
class ServiceAccountMatch:
    """``serviceAccounts`` entry: ``ns/sa`` (or bare ``sa`` in the policy's namespace). No wildcards
    (Istio CheckServiceAccount); the trust domain is ignored (ztunnel ServiceAccountMatch)."""

    namespace: str
    service_account: str

    def matches(self, value: Any) -> bool:
        return value == (self.namespace, self.service_account)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


@dataclass(frozen=True)
class PortMatch:
    """A destination port. Istio writes ports as strings ("8080"); they are compared as numbers."""

    port: int

    def matches(self, value: Any) -> bool:
        return value == self.port

    def __str__(self) -> str:
        return str(self.port)


@dataclass(frozen=True)
class IpMatch:
    cidr: Cidr

    def matches(self, value: Any) -> bool:
        return self.cidr.contains(value)

    def __str__(self) -> str:
        return str(self.cidr)


Matcher = StringMatch | PathTemplate | ServiceAccountMatch | PortMatch | IpMatch


@dataclass(frozen=True)
class Field:
    """One attribute test: any of ``values`` (if any are given) and none of ``not_values``."""

    attr: str                       # an A_* constant
    label: str                      # where it came from, for humans: "principals", "when[request.headers[x]]"
    values: tuple[Matcher, ...] = ()
    not_values: tuple[Matcher, ...] = ()
    arg: tuple[str, ...] = ()       # header name, or the claim path for request.auth.claims
    envoy_http_only: bool = False
    ztunnel: str = ZT_L4

    def describe(self) -> str:
        parts = []
        if self.values:
            parts.append(f"{self.label} in [{', '.join(map(str, self.values))}]")
        if self.not_values:
            parts.append(f"{self.label} not in [{', '.join(map(str, self.not_values))}]")
        return " and ".join(parts)


@dataclass(frozen=True)
class Match:
    """An AND of fields. No fields: never matches (ztunnel skips an empty RbacMatch)."""

    fields: tuple[Field, ...] = ()

    def without(self, keep) -> "Match":
        return type(self)(tuple(f for f in self.fields if keep(f)))


@dataclass(frozen=True)
class Source(Match):
    """One ``rules[].from[].source``."""


@dataclass(frozen=True)
class Operation(Match):
    """One ``rules[].to[].operation``."""


@dataclass(frozen=True)
class Condition(Match):
    """One ``rules[].when[]`` entry (always exactly one field)."""


@dataclass(frozen=True)
class ZtunnelMatch(Match):
    """One ztunnel ``RbacMatch`` from an inventory ``policies:`` entry."""


@dataclass(frozen=True)
class Clause:
    """An OR of matches. ``always`` marks a clause that matches anything (an empty clause, or one in
    which Envoy dropped every field of some match on TCP)."""

    label: str                      # "from", "to", "when[0]", "clauses[1]"
    matches: tuple[Match, ...] = ()

    @property
    def always(self) -> bool:
        return not self.matches


@dataclass(frozen=True)
class Rule:
    index: int                      # position in the resource's rules list (for the decision and logs)
    clauses: tuple[Clause, ...] = ()

    def fields(self):
        for c in self.clauses:
            for m in c.matches:
                yield from m.fields


@dataclass(frozen=True)
class TargetRef:
    group: str
    kind: str
    name: str

    @property
    def canonical_group(self) -> str:
        return self.group or "core"

    def __str__(self) -> str:
        return f"{self.canonical_group}/{self.kind}/{self.name}"


EMPTY_MAP: Mapping[str, str] = MappingProxyType({})


def _envoy_tcp_view(action: str, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """Envoy on a TCP filter chain (§1.5, model.go checkError / builder testdata tcp/*).

    ALLOW: "skipped rule ... on TCP filter chain" — a rule with any HTTP-only field is dropped whole.
    DENY/AUDIT: only the HTTP-only *field* is ignored ("conservative deny"); a match left with no field
    matches anything, so its clause does too.
    """
    out = []
    for rule in rules:
        if not any(f.envoy_http_only for f in rule.fields()):
            out.append(rule)
            continue
        if action == ALLOW:
            continue
        clauses = []
        for clause in rule.clauses:
            matches = []
            always = False
            for m in clause.matches:
                kept = m.without(lambda f: not f.envoy_http_only)
                if not kept.fields:
                    always = True
                    break
                matches.append(kept)
            clauses.append(Clause(clause.label, () if always else tuple(matches)))
        out.append(Rule(rule.index, tuple(clauses)))
    return tuple(out)


def _ztunnel_view(action: str, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """What istiod sends ztunnel for these rules (§1.5 ztunnel path, authorization.go handleRule).

    ALLOW: a rule with an L7 attribute is dropped (the policy still counts as an ALLOW policy, so if
    nothing is left it denies everything — "ztunnel proxy will simply drop all traffic as a defensive
    move"). DENY: L7 fields are removed but the emptied match is still emitted, and ztunnel skips empty
    matches, so the clause (and with it the rule) can no longer match — the DENY gets *weaker*.
    Fields ztunnel does not map at all (trustDomains) are simply absent.
    """
    out = []
    for rule in rules:
        fields = list(rule.fields())
        if all(f.ztunnel == ZT_L4 for f in fields):
            out.append(rule)
            continue
        if action == ALLOW and any(f.ztunnel == ZT_L7 for f in fields):
            continue
        clauses = tuple(
            Clause(c.label, tuple(m.without(lambda f: f.ztunnel == ZT_L4) for m in c.matches))
            for c in rule.clauses
        )
        out.append(Rule(rule.index, clauses))
    return tuple(out)


def compile_rules(rules: tuple[Rule, ...]) -> tuple:
    """Rules as nested tuples for the evaluator's loops: ``((index, clauses), ...)``, a clause a tuple
    of matches, a match a tuple of ``(attr, arg, values, not_values)`` with each matcher's bound
    ``matches``. Same meaning, less walking: a clause with no match (always true) is left out, and so
    is a match with no field (never true) — a clause left with no match then never matches."""
    out = []
    for rule in rules:
        clauses = []
        for clause in rule.clauses:
            if not clause.matches:
                continue
            clauses.append(tuple(
                tuple((f.attr, f.arg, tuple(v.matches for v in f.values), tuple(v.matches for v in f.not_values))
                      for f in mt.fields)
                for mt in clause.matches if mt.fields))
        out.append((rule.index, tuple(clauses)))
    return tuple(out)


@dataclass(frozen=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: str                                  # "ALLOW" | "DENY" | "AUDIT"
    selector: Mapping[str, str] | None = None    # matchLabels; None = no selector
    target_refs: tuple[TargetRef, ...] = ()
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    origin: str = ORIGIN_ISTIO                   # "istio" | "ztunnel"
    ztunnel_scope: str | None = None             # ztunnel-format only: Global | Namespace | WorkloadSelector
    warnings: tuple[str, ...] = ()               # valid but surprising; `config check` prints them
    # Derived per-enforcement views (§1.5), computed once.
    envoy_tcp_rules: tuple[Rule, ...] = field(init=False, repr=False, compare=False)
    ztunnel_rules: tuple[Rule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "envoy_tcp_rules", _envoy_tcp_view(self.action, self.rules))
        object.__setattr__(self, "ztunnel_rules", _ztunnel_view(self.action, self.rules))

    # The views compiled for evaluation (evaluate._matched_rule), built on first use — a policy that
    # is loaded but never evaluated (most of a 10 000-policy mesh, at one proxy) costs nothing more.
    # functools.cached_property stores into the instance __dict__, which a frozen dataclass allows.
    @functools.cached_property
    def compiled_rules(self) -> tuple:
        return compile_rules(self.rules)

    @functools.cached_property
    def compiled_envoy_tcp_rules(self) -> tuple:
        return compile_rules(self.envoy_tcp_rules)

    @functools.cached_property
    def compiled_ztunnel_rules(self) -> tuple:
        return compile_rules(self.ztunnel_rules)

    @functools.cached_property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def __repr__(self) -> str:
        extra = " dry-run" if self.dry_run else ""
        return f"<AuthorizationPolicy {self.key} {self.action} rules={len(self.rules)} {self.origin}{extra}>"
