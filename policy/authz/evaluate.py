"""Decide one request against the policies that apply at one enforcement point, exactly as Istio does
(reference/istio-semantics.md §1.3, ztunnel ``DemandProxyState::assert_rbac``).

Pure: request facts and policies in, a frozen :class:`Decision` out. ``explain`` gives the same
evaluation rule by rule, for ``hbone-proxy explain`` and for humans reading an access log.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from policy.authz import model as m
from policy.authz.match import normalize_path, parse_ip


class Enforcement(enum.Enum):
    """Where the decision is made; §1.5: HTTP-only fields on TCP are treated differently at each."""

    WAYPOINT = "waypoint"  # Envoy RBAC path (waypoints, sidecars)
    ZTUNNEL = "ztunnel"    # node proxy: what istiod sends ztunnel, evaluated as ztunnel's rbac.rs does


_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class HttpAttributes:
    method: str
    path: str                                        # raw request path, may include the query
    host: str                                        # :authority / Host, as sent (port included if sent)
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: _EMPTY)  # lowercase names
    request_principal: str | None = None             # "<iss>/<sub>" of a validated JWT
    jwt_claims: Mapping[str, Any] | None = None      # the validated JWT's claims (request.auth.*)


@dataclass(frozen=True)
class AuthzRequest:
    source_ip: str
    source_principal: str | None          # "td/ns/x/sa/y" (a leading spiffe:// is accepted); None = plaintext
    destination_ip: str
    destination_port: int                 # ztunnel/sidecar: the workload port; waypoint: the service port (§6 item 7)
    http: HttpAttributes | None = None    # None = a TCP connection
    sni: str | None = None
    remote_ip: str | None = None          # original client (XFF/PROXY); None = same as source_ip


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None            # "ns/name" of the policy that decided, if one did
    rule: int | None
    action: str | None            # "ALLOW" | "DENY" of that policy
    reason: str
    dry_run: tuple[str, ...] = ()  # dry-run policies that matched (shadow; never enforced)
    audit: tuple[str, ...] = ()    # AUDIT policies that matched
    shadow_allowed: bool | None = None  # the decision had the dry-run policies been enforced; None if none apply

    @property
    def response_detail(self) -> str:
        """Envoy's %RESPONSE_CODE_DETAILS% for a deny (rbac/utility.cc responseDetail); "" when allowed."""
        if self.allowed:
            return ""
        if self.policy is None or self.action != m.DENY:
            return "rbac_access_denied_matched_policy[none]"
        ns, _, name = self.policy.partition("/")
        policy_id = f"ns[{ns}]-policy[{name}]-rule[{self.rule}]"
        return "rbac_access_denied_matched_policy[" + "_".join(policy_id.split()) + "]"


# ---- request facts --------------------------------------------------------------------------------

class _Facts:
    """Everything a field can look at, extracted once per request."""

    __slots__ = ("principal", "trust_domain", "namespace", "service_account", "source_ip", "remote_ip",
                 "destination_ip", "destination_port", "sni", "http", "path", "host", "claims",
                 "request_principal")

    def __init__(self, req: AuthzRequest):
        principal = req.source_principal or None
        if principal and principal.startswith("spiffe://"):
            # ztunnel matches_principal strips spiffe:// ("Istio matches all assumes spiffe:// prefix").
            principal = principal[len("spiffe://"):]
        self.principal = principal
        self.trust_domain = self.namespace = self.service_account = None
        if principal:
            parts = principal.split("/")
            # td/ns/<ns>/sa/<sa> (ztunnel Identity::Spiffe); anything else has a principal but no ns/sa.
            if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
                self.trust_domain, self.namespace, self.service_account = parts[0], parts[2], parts[4]
            elif parts:
                self.trust_domain = parts[0]
        self.source_ip = parse_ip(req.source_ip)
        self.remote_ip = parse_ip(req.remote_ip) if req.remote_ip else self.source_ip
        self.destination_ip = parse_ip(req.destination_ip)
        self.destination_port = req.destination_port
        self.sni = req.sni
        http = self.http = req.http
        self.path = normalize_path(http.path) if http is not None else None
        self.host = http.host if http is not None else None
        claims = http.jwt_claims if http is not None and http.jwt_claims is not None else None
        self.claims = claims
        rp = http.request_principal if http is not None else None
        if rp is None and claims is not None and isinstance(claims.get("iss"), str) and isinstance(claims.get("sub"), str):
            rp = f"{claims['iss']}/{claims['sub']}"  # Istio: request principal = "<iss>/<sub>"
        self.request_principal = rp


def _one(v) -> tuple:
    return () if v is None else (v,)


def _strings(v) -> tuple:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (list, tuple)):
        return tuple(x for x in v if isinstance(x, str))
    return ()


_PSEUDO_HEADERS = {":authority": "host", "host": "host", ":method": "method", ":path": "path"}


def _header(f: _Facts, arg: tuple) -> tuple:
    http = f.http
    if http is None:
        return ()
    name = arg[0]
    vals = http.headers.get(name)
    if vals is None:
        alias = _PSEUDO_HEADERS.get(name)
        if alias is None:
            return ()
        return (getattr(http, alias),)
    # Envoy matches a repeated header on its values joined with "," (HeaderUtility getAllOfHeaderAsString).
    return (",".join(vals),)


def _claim(f: _Facts, arg: tuple) -> tuple:
    v: Any = f.claims
    for key in arg:
        if not isinstance(v, Mapping):
            return ()
        v = v.get(key)
    return _strings(v)


_GETTERS = {
    m.A_SOURCE_PRINCIPAL: lambda f, a: _one(f.principal),
    m.A_SOURCE_NAMESPACE: lambda f, a: _one(f.namespace),
    m.A_SOURCE_SERVICE_ACCOUNT: lambda f, a: () if f.namespace is None else ((f.namespace, f.service_account),),
    m.A_SOURCE_TRUST_DOMAIN: lambda f, a: _one(f.trust_domain),
    m.A_SOURCE_IP: lambda f, a: _one(f.source_ip),
    m.A_REMOTE_IP: lambda f, a: _one(f.remote_ip),
    m.A_DESTINATION_IP: lambda f, a: _one(f.destination_ip),
    m.A_DESTINATION_PORT: lambda f, a: (f.destination_port,),
    m.A_SNI: lambda f, a: _one(f.sni),
    m.A_HOST: lambda f, a: _one(f.host),
    m.A_METHOD: lambda f, a: () if f.http is None else (f.http.method,),
    m.A_PATH: lambda f, a: _one(f.path),
    m.A_REQUEST_HEADER: _header,
    m.A_REQUEST_PRINCIPAL: lambda f, a: _one(f.request_principal),
    m.A_REQUEST_AUDIENCES: lambda f, a: _strings(f.claims.get("aud")) if f.claims is not None else (),
    m.A_REQUEST_PRESENTER: lambda f, a: _strings(f.claims.get("azp")) if f.claims is not None else (),
    m.A_REQUEST_CLAIMS: _claim,
}


def _field_ok(field: m.Field, facts: _Facts) -> bool:
    got = _GETTERS[field.attr](facts, field.arg)
    # "any of values" and "none of notValues"; an absent attribute (plaintext peer, no header) fails
    # every positive test and passes every negative one (§1.7 plaintext peers).
    if field.values and not any(v.matches(x) for v in field.values for x in got):
        return False
    if field.not_values and any(v.matches(x) for v in field.not_values for x in got):
        return False
    return True


def _match_ok(match: m.Match, facts: _Facts) -> bool:
    # An empty match never matches (ztunnel skips RbacMatch::default()).
    if not match.fields:
        return False
    for f in match.fields:
        if not _field_ok(f, facts):
            return False
    return True


def _rule_ok(rule: m.Rule, facts: _Facts) -> bool:
    for clause in rule.clauses:
        if clause.matches and not any(_match_ok(mt, facts) for mt in clause.matches):
            return False
    return True  # Istio: "An empty rule is always matched"


def _rules_at(policy: m.AuthorizationPolicy, enforcement: Enforcement, is_http: bool) -> tuple[m.Rule, ...]:
    if enforcement is Enforcement.ZTUNNEL:
        return policy.ztunnel_rules
    return policy.rules if is_http else policy.envoy_tcp_rules


def _matched_rule(policy: m.AuthorizationPolicy, facts: _Facts, enforcement: Enforcement) -> int | None:
    # Istio: rules are ORed; "If not set, the match will never occur".
    for rule in _rules_at(policy, enforcement, facts.http is not None):
        if _rule_ok(rule, facts):
            return rule.index
    return None


def _decide(denies, allows, facts, enforcement) -> Decision:
    # Istio: "If there are any DENY policies that match the request, deny the request."
    for p in denies:
        i = _matched_rule(p, facts, enforcement)
        if i is not None:
            return Decision(False, p.key, i, m.DENY, f"denied by DENY policy {p.key} rule {i}")
    # Istio: "If there are no ALLOW policies for the workload, allow the request."
    if not allows:
        return Decision(True, None, None, None, "no ALLOW policy applies")
    # Istio: "If any of the ALLOW policies match the request, allow the request."
    for p in allows:
        i = _matched_rule(p, facts, enforcement)
        if i is not None:
            return Decision(True, p.key, i, m.ALLOW, f"allowed by ALLOW policy {p.key} rule {i}")
    # Istio: "Deny the request."
    return Decision(False, None, None, None, "allow policies exist, but none matched")


def _applies(p: m.AuthorizationPolicy, enforcement: Enforcement) -> bool:
    # ztunnel rejects AUDIT ("ztunnel does not support the AUDIT action"); istiod does not send it.
    return not (enforcement is Enforcement.ZTUNNEL and p.action == m.AUDIT)


def authorize(request: AuthzRequest, policies: Sequence[m.AuthorizationPolicy], enforcement: Enforcement) -> Decision:
    """Evaluate ``policies`` (those that apply here; see PolicyIndex) in Istio's order (§1.3)."""
    facts = _Facts(request)
    denies, allows, dry_denies, dry_allows, audits = [], [], [], [], []
    for p in policies:
        if not _applies(p, enforcement):
            continue
        if p.action == m.AUDIT:
            # AUDIT never changes the decision (Envoy RBAC_LOG). A dry-run AUDIT is inert.
            if not p.dry_run:
                audits.append(p)
        elif p.dry_run:
            # dry-run: shadow only; and step 3 counts only *enforced* ALLOW policies.
            (dry_denies if p.action == m.DENY else dry_allows).append(p)
        else:
            (denies if p.action == m.DENY else allows).append(p)
    decision = _decide(denies, allows, facts, enforcement)
    extras: dict[str, Any] = {}
    if audits:
        extras["audit"] = tuple(p.key for p in audits if _matched_rule(p, facts, enforcement) is not None)
    if dry_denies or dry_allows:
        extras["dry_run"] = tuple(p.key for p in dry_denies + dry_allows
                                  if _matched_rule(p, facts, enforcement) is not None)
        extras["shadow_allowed"] = _decide(denies + dry_denies, allows + dry_allows, facts, enforcement).allowed
    if extras:
        decision = Decision(decision.allowed, decision.policy, decision.rule, decision.action, decision.reason,
                            extras.get("dry_run", ()), extras.get("audit", ()), extras.get("shadow_allowed"))
    return decision


# ---- explain ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RuleResult:
    index: int
    matched: bool
    note: str      # why not (first failing clause/field), or how the enforcement point changed the rule


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    action: str
    effect: str                      # "enforced" | "dry-run" | "audit" | "ignored: <why>"
    matched_rule: int | None
    rules: tuple[RuleResult, ...]

    def __str__(self) -> str:
        head = f"{self.policy} {self.action} ({self.effect}): " + (
            f"matched rule {self.matched_rule}" if self.matched_rule is not None else "no match")
        return "\n".join([head] + [f"  rule {r.index}: {'match' if r.matched else 'no match'}"
                                   + (f" — {r.note}" if r.note else "") for r in self.rules])


def _value_text(field: m.Field, facts: _Facts) -> str:
    got = _GETTERS[field.attr](facts, field.arg)
    if not got:
        return "absent"
    return ", ".join(("/".join(x) if isinstance(x, tuple) else str(x)) for x in got)


def _why_not_match(match: m.Match, facts: _Facts) -> str:
    if not match.fields:
        return "empty match (never matches)"
    for f in match.fields:
        if not _field_ok(f, facts):
            return f"{f.describe()} (request: {_value_text(f, facts)})"
    return ""


def _why_not_rule(rule: m.Rule, facts: _Facts) -> str:
    for clause in rule.clauses:
        if clause.matches and not any(_match_ok(mt, facts) for mt in clause.matches):
            return f"{clause.label}: " + "; or ".join(_why_not_match(mt, facts) for mt in clause.matches)
    return ""


def explain(request: AuthzRequest, policies: Sequence[m.AuthorizationPolicy], enforcement: Enforcement) -> list[PolicyResult]:
    """Per policy, per rule: did it match, and if not, which clause and field did not."""
    facts = _Facts(request)
    is_http = request.http is not None
    out = []
    for p in policies:
        if not _applies(p, enforcement):
            out.append(PolicyResult(p.key, p.action, "ignored: ztunnel does not support AUDIT", None, ()))
            continue
        effect = "dry-run" if p.dry_run else ("audit" if p.action == m.AUDIT else "enforced")
        view = {r.index: r for r in _rules_at(p, enforcement, is_http)}
        results = []
        for rule in p.rules:
            eff = view.get(rule.index)
            if eff is None:
                why = ("HTTP-only field on a TCP connection: Envoy drops the ALLOW rule" if enforcement is Enforcement.WAYPOINT
                       else "L7 attribute: ztunnel drops ALLOW rules it cannot enforce")
                results.append(RuleResult(rule.index, False, "dropped — " + why))
                continue
            ok = _rule_ok(eff, facts)
            note = "" if ok else _why_not_rule(eff, facts)
            if eff != rule:
                changed = ("HTTP-only fields ignored on TCP (broader deny)" if enforcement is Enforcement.WAYPOINT
                           else "L7/unmapped fields removed at ztunnel (an emptied match never matches)")
                note = changed + (f"; {note}" if note else "")
            results.append(RuleResult(rule.index, ok, note))
        matched = next((r.index for r in results if r.matched), None)
        out.append(PolicyResult(p.key, p.action, effect, matched, tuple(results)))
    return out
