"""Decide one request against the policies that apply at one enforcement point, exactly as Istio does
(reference/istio-semantics.md §1.3, ztunnel ``DemandProxyState::assert_rbac``).

Pure: request facts and policies in, a frozen :class:`Decision` out. ``explain`` gives the same
evaluation rule by rule, for ``hbone-proxy explain`` and for humans reading an access log.
"""

from __future__ import annotations

import enum
import functools
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
                 "destination_ip", "destination_port", "sni", "http", "method", "raw_path", "path", "host",
                 "headers", "claims", "request_principal")

    def __init__(self, req: AuthzRequest | None = None):
        if req is None:
            return   # filled in by _Facts.l7 (the waypoint's per-request fast path)
        self.principal, self.trust_domain, self.namespace, self.service_account = _peer(req.source_principal)
        self.source_ip = parse_ip(req.source_ip)
        self.remote_ip = parse_ip(req.remote_ip) if req.remote_ip else self.source_ip
        self.destination_ip = parse_ip(req.destination_ip)
        self.destination_port = req.destination_port
        self.sni = req.sni
        http = self.http = req.http
        if http is None:
            self.method = self.raw_path = self.path = self.host = self.headers = None
            self.claims = self.request_principal = None
            return
        self.method, self.raw_path, self.host, self.headers = http.method, http.path, http.host, http.headers
        self.path = normalize_path(http.path)
        claims = self.claims = http.jwt_claims
        rp = http.request_principal
        if rp is None and claims is not None and isinstance(claims.get("iss"), str) and isinstance(claims.get("sub"), str):
            rp = f"{claims['iss']}/{claims['sub']}"  # Istio: request principal = "<iss>/<sub>"
        self.request_principal = rp

    @classmethod
    def l7(cls, source_ip: str, principal: str | None, destination_ip: str, destination_port: int, method: str,
           path: str, host: str, headers: Mapping[str, tuple[str, ...]],
           claims: Mapping[str, Any] | None = None, request_principal: str | None = None) -> "_Facts":
        """The facts of ``AuthzRequest(source_ip, principal, destination_ip, destination_port,
        http=HttpAttributes(method, path, host, headers, jwt_claims=claims, request_principal=...))`` without
        building those two objects (no SNI, no remote IP: what a waypoint's HTTP request carries; ``claims``: a
        JWT the waypoint's RequestAuthentication validated, policy/authn)."""
        f = cls()
        f.principal, f.trust_domain, f.namespace, f.service_account = _peer(principal)
        f.source_ip = f.remote_ip = parse_ip(source_ip)
        f.destination_ip = parse_ip(destination_ip)
        f.destination_port = destination_port
        f.sni = None
        f.http = True   # only tested for "is this HTTP"; the attributes are the fields below
        f.method, f.raw_path, f.host, f.headers = method, path, host, headers
        f.path = normalize_path(path)
        f.claims = claims
        if request_principal is None and claims is not None and isinstance(claims.get("iss"), str) \
                and isinstance(claims.get("sub"), str):
            request_principal = f"{claims['iss']}/{claims['sub']}"  # Istio: request principal = "<iss>/<sub>"
        f.request_principal = request_principal
        return f


# Distinct peer principals remembered with their parsed parts (a proxy sees few; the bound is for the rest).
PEER_CACHE_ENTRIES = 4096


@functools.lru_cache(maxsize=PEER_CACHE_ENTRIES)
def _peer(source_principal: str | None) -> tuple[str | None, str | None, str | None, str | None]:
    """(principal, trust domain, namespace, service account) of a peer identity; memoised because every
    request of a tunnel brings the same one."""
    principal = source_principal or None
    if principal and principal.startswith("spiffe://"):
        # ztunnel matches_principal strips spiffe:// ("Istio matches all assumes spiffe:// prefix").
        principal = principal[len("spiffe://"):]
    if principal:
        parts = principal.split("/")
        # td/ns/<ns>/sa/<sa> (ztunnel Identity::Spiffe); anything else has a principal but no ns/sa.
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return principal, parts[0], parts[2], parts[4]
        return principal, parts[0], None, None
    return principal, None, None, None


def _one(v) -> tuple:
    return () if v is None else (v,)


def _strings(v) -> tuple:
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (list, tuple)):
        return tuple(x for x in v if isinstance(x, str))
    return ()


# Pseudo-headers read the request line's fields (the raw path, as HttpAttributes.path is).
_PSEUDO_HEADERS = {":authority": "host", "host": "host", ":method": "method", ":path": "raw_path"}


def _header(f: _Facts, arg: tuple) -> tuple:
    if f.http is None:
        return ()
    name = arg[0]
    vals = f.headers.get(name)
    if vals is None:
        alias = _PSEUDO_HEADERS.get(name)
        if alias is None:
            return ()
        return (getattr(f, alias),)
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
    m.A_METHOD: lambda f, a: () if f.http is None else (f.method,),
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


def _compiled_at(policy: m.AuthorizationPolicy, enforcement: Enforcement, is_http: bool) -> tuple:
    """``_rules_at`` as the policy's compiled tables (model.compile_rules, built on first use)."""
    if enforcement is Enforcement.ZTUNNEL:
        return policy.compiled_ztunnel_rules
    return policy.compiled_rules if is_http else policy.compiled_envoy_tcp_rules


def _fields_ok(fields: tuple, facts: _Facts) -> bool:
    """``_match_ok`` over one compiled match (a non-empty AND of (attr, arg, values, not_values))."""
    for attr, arg, values, not_values in fields:
        got = _GETTERS[attr](facts, arg)
        # "any of values" and "none of notValues"; an absent attribute fails every positive test and
        # passes every negative one (§1.7 plaintext peers).
        if values:
            for x in got:
                for matches in values:
                    if matches(x):
                        break
                else:
                    continue
                break
            else:
                return False
        if not_values:
            for x in got:
                for matches in not_values:
                    if matches(x):
                        return False
    return True


def _matched_rule(policy: m.AuthorizationPolicy, facts: _Facts, enforcement: Enforcement) -> int | None:
    """The index of the first rule of ``policy`` the request matches (``_rule_ok`` on the compiled
    rules: the same AND/OR structure, walked with loops instead of a call per clause, match and field)."""
    # Istio: rules are ORed; "If not set, the match will never occur".
    for index, clauses in _compiled_at(policy, enforcement, facts.http is not None):
        for matches in clauses:
            # A clause is an OR of matches (an empty match never matches: compile_rules leaves it out).
            for fields in matches:
                if _fields_ok(fields, facts):
                    break
            else:
                break   # this clause failed: the rule does not match
        else:
            return index   # every clause matched (Istio: "An empty rule is always matched")
    return None


def _decision(memo: dict | None, case: str, policy: m.AuthorizationPolicy | None, rule: int | None) -> Decision:
    """The Decision for one outcome of ``_decide``; ``memo`` (an Authorizer's) returns the same frozen
    object for the same outcome instead of building it and its reason string again."""
    key = (case, id(policy), rule)
    if memo is not None:
        hit = memo.get(key)
        if hit is not None:
            return hit
    if case == "deny":
        assert policy is not None
        d = Decision(False, policy.key, rule, m.DENY, f"denied by DENY policy {policy.key} rule {rule}")
    elif case == "allow":
        assert policy is not None
        d = Decision(True, policy.key, rule, m.ALLOW, f"allowed by ALLOW policy {policy.key} rule {rule}")
    elif case == "no-allow":
        d = Decision(True, None, None, None, "no ALLOW policy applies")
    else:
        d = Decision(False, None, None, None, "allow policies exist, but none matched")
    if memo is not None:
        memo[key] = d
    return d


def _decide(denies, allows, facts, enforcement, memo: dict | None = None) -> Decision:
    # Istio: "If there are any DENY policies that match the request, deny the request."
    for p in denies:
        i = _matched_rule(p, facts, enforcement)
        if i is not None:
            return _decision(memo, "deny", p, i)
    # Istio: "If there are no ALLOW policies for the workload, allow the request."
    if not allows:
        return _decision(memo, "no-allow", None, None)
    # Istio: "If any of the ALLOW policies match the request, allow the request."
    for p in allows:
        i = _matched_rule(p, facts, enforcement)
        if i is not None:
            return _decision(memo, "allow", p, i)
    # Istio: "Deny the request."
    return _decision(memo, "none-matched", None, None)


def _applies(p: m.AuthorizationPolicy, enforcement: Enforcement) -> bool:
    # ztunnel rejects AUDIT ("ztunnel does not support the AUDIT action"); istiod does not send it.
    return not (enforcement is Enforcement.ZTUNNEL and p.action == m.AUDIT)


class Authorizer:
    """``authorize`` for one policy set at one enforcement point, with the per-set work done once: the
    policies sorted into enforced DENY / ALLOW, dry-run and AUDIT, and the few distinct Decisions
    remembered. For a caller that decides many requests against the same set (the waypoint keeps one
    per config snapshot and chain); ``authorize`` builds a throw-away one. The gain, measured with the
    waypoint's other authz shortcuts: ``proxy/pipeline/authz.py`` ``l7_authorizer``."""

    __slots__ = ("enforcement", "denies", "allows", "dry_denies", "dry_allows", "audits", "_decisions")

    def __init__(self, policies: Sequence[m.AuthorizationPolicy], enforcement: Enforcement):
        self.enforcement = enforcement
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
        self.denies, self.allows = tuple(denies), tuple(allows)
        self.dry_denies, self.dry_allows, self.audits = tuple(dry_denies), tuple(dry_allows), tuple(audits)
        self._decisions: dict = {}

    def decide(self, request: AuthzRequest) -> Decision:
        return self._decide(_Facts(request))

    def decide_http(self, source_ip: str, principal: str | None, destination_ip: str, destination_port: int, *,
                    method: str, path: str, host: str, headers: Mapping[str, tuple[str, ...]],
                    claims: Mapping[str, Any] | None = None) -> Decision:
        """``decide(AuthzRequest(source_ip, principal, destination_ip, destination_port,
        http=HttpAttributes(method, path, host, headers, jwt_claims=claims)))``, without building the request
        objects."""
        return self._decide(_Facts.l7(source_ip, principal, destination_ip, destination_port, method, path, host,
                                      headers, claims))

    def _decide(self, facts: _Facts) -> Decision:
        enforcement = self.enforcement
        decision = _decide(self.denies, self.allows, facts, enforcement, self._decisions)
        audits, dry_denies, dry_allows = self.audits, self.dry_denies, self.dry_allows
        if not (audits or dry_denies or dry_allows):
            return decision
        extras: dict[str, Any] = {}
        if audits:
            extras["audit"] = tuple(p.key for p in audits if _matched_rule(p, facts, enforcement) is not None)
        if dry_denies or dry_allows:
            extras["dry_run"] = tuple(p.key for p in dry_denies + dry_allows
                                      if _matched_rule(p, facts, enforcement) is not None)
            extras["shadow_allowed"] = _decide(self.denies + dry_denies, self.allows + dry_allows, facts,
                                               enforcement).allowed
        return Decision(decision.allowed, decision.policy, decision.rule, decision.action, decision.reason,
                        extras.get("dry_run", ()), extras.get("audit", ()), extras.get("shadow_allowed"))

    def __repr__(self) -> str:
        return (f"<Authorizer {self.enforcement.value} deny={len(self.denies)} allow={len(self.allows)} "
                f"dry_run={len(self.dry_denies) + len(self.dry_allows)} audit={len(self.audits)}>")


def authorize(request: AuthzRequest, policies: Sequence[m.AuthorizationPolicy], enforcement: Enforcement) -> Decision:
    """Evaluate ``policies`` (those that apply here; see PolicyIndex) in Istio's order (§1.3)."""
    return Authorizer(policies, enforcement).decide(request)


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
