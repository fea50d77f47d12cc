"""Authorization decisions, table by table, named after the Istio behaviour each pins down
(reference/istio-semantics.md §1 and the §6 checklist; ztunnel rbac.rs unit tests, ztunnel.md §4.4).
Every test says which enforcement point it exercises: WAYPOINT (Envoy RBAC) or ZTUNNEL."""

from __future__ import annotations

import pytest

from policy.authz import authorize, explain
from policy.authz.model import AuthorizationPolicy, DENY
from tests.test_authz_helpers import (CLIENT, OTHER, WAYPOINT, ZTUNNEL, allow, allowed, deny, http, policy, tcp,
                                      ztunnel_policy)

# ---- §6 item 1: empty-rule semantics ---------------------------------------------------------------


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
def test_allow_with_no_rules_denies_everything_it_targets(at):
    p = policy({})  # spec: {} = ALLOW with no rules
    d = authorize(tcp(), [p], at)
    assert not d.allowed and d.reason == "allow policies exist, but none matched"
    assert not allowed(http(), p, at=at)


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
def test_allow_with_one_empty_rule_allows_everything(at):
    p = allow({})
    assert allowed(tcp(), p, at=at) and allowed(tcp(principal=None), p, at=at) and allowed(http(), p, at=at)
    assert authorize(tcp(), [p], at).rule == 0


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
def test_deny_with_no_rules_does_nothing(at):
    # Istio's webhook refuses to load this (test_authz_parse), so it can only come from a ztunnel-format
    # inventory or be built directly; either way it never matches.
    z = ztunnel_policy([], action="Deny")
    direct = AuthorizationPolicy("default", "d", DENY)
    for p in (z, direct):
        d = authorize(tcp(), [p], at)
        assert d.allowed and d.reason == "no ALLOW policy applies"


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
def test_deny_with_one_empty_rule_denies_everything(at):
    p = deny({}, name="deny-all")
    d = authorize(tcp(principal=None), [p], at)
    assert not d.allowed and (d.policy, d.rule, d.action) == ("default/deny-all", 0, "DENY")
    assert d.reason == "denied by DENY policy default/deny-all rule 0"


# ---- §6 item 2: evaluation order -------------------------------------------------------------------


def test_no_policies_means_allow():
    d = authorize(tcp(), [], WAYPOINT)
    assert d.allowed and d.policy is None and d.reason == "no ALLOW policy applies"


def test_any_enforced_allow_flips_the_workload_to_default_deny():
    only_other = allow({"from": [{"source": {"principals": [OTHER]}}]})
    assert allowed(tcp(principal=CLIENT)) is True
    assert allowed(tcp(principal=CLIENT), only_other) is False


def test_allows_are_ored_across_policies_and_namespaces():
    a = allow({"from": [{"source": {"principals": [OTHER]}}]}, name="a", namespace="default")
    b = allow({"from": [{"source": {"principals": [CLIENT]}}]}, name="b", namespace="istio-system")
    d = authorize(tcp(), [a, b], WAYPOINT)
    assert d.allowed and d.policy == "istio-system/b" and d.action == "ALLOW"


def test_any_deny_beats_any_allow_wherever_it_lives():
    a = allow({}, name="allow-all", namespace="default")
    d_ = deny({"from": [{"source": {"principals": [CLIENT]}}]}, name="no-client", namespace="istio-system")
    d = authorize(tcp(), [a, d_], WAYPOINT)
    assert not d.allowed and d.policy == "istio-system/no-client"


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
def test_dry_run_deny_is_shadow_only(at):
    p = deny({}, name="would-deny", dry_run=True)
    d = authorize(tcp(), [p], at)
    assert d.allowed and d.dry_run == ("default/would-deny",) and d.shadow_allowed is False


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
def test_dry_run_allow_does_not_flip_to_default_deny(at):
    # ztunnel partitions out dry-run ALLOWs before "no ALLOW policy applies" (§1.3 note).
    p = policy({}, name="would-allow-nothing", dry_run=True)
    d = authorize(tcp(), [p], at)
    assert d.allowed and d.reason == "no ALLOW policy applies"
    assert d.dry_run == () and d.shadow_allowed is False


def test_dry_run_allow_that_matches_is_reported():
    p = allow({}, name="shadow", dry_run=True)
    d = authorize(tcp(), [p], WAYPOINT)
    assert d.allowed and d.dry_run == ("default/shadow",) and d.shadow_allowed is True


def test_audit_never_changes_the_decision_but_is_reported():
    audit = policy({"action": "AUDIT", "rules": [{}]}, name="audit-all")
    d = authorize(tcp(), [audit], WAYPOINT)
    assert d.allowed and d.audit == ("default/audit-all",) and d.reason == "no ALLOW policy applies"
    d2 = authorize(tcp(), [audit, policy({}, name="nothing")], WAYPOINT)
    assert not d2.allowed and d2.audit == ("default/audit-all",)


def test_audit_is_ignored_by_ztunnel():
    audit = policy({"action": "AUDIT", "rules": [{}]}, name="audit-all")
    d = authorize(tcp(), [audit], ZTUNNEL)
    assert d.allowed and d.audit == ()
    assert explain(tcp(), [audit], ZTUNNEL)[0].effect.startswith("ignored")


def test_deny_decision_is_reported_in_a_stable_order():
    d1 = deny({}, name="b-deny")
    d2 = deny({}, name="a-deny")
    # The index hands out policies sorted by key; authorize reports the first matching DENY it is given.
    assert authorize(tcp(), [d2, d1], WAYPOINT).policy == "default/a-deny"


# ---- §6 item 3: plaintext peers --------------------------------------------------------------------

IDENTITY_SOURCES = [
    {"principals": ["*"]},
    {"principals": [CLIENT]},
    {"namespaces": ["default"]},
    {"namespaces": ["*"]},
    {"serviceAccounts": ["default/client"]},
]


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
@pytest.mark.parametrize("source", IDENTITY_SOURCES, ids=lambda s: next(iter(s)))
def test_plaintext_peer_fails_every_positive_identity_match(source, at):
    p = allow({"from": [{"source": source}]})
    assert allowed(tcp(principal=CLIENT), p, at=at) is True
    assert allowed(tcp(principal=None), p, at=at) is False


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
@pytest.mark.parametrize("source", [{"notPrincipals": [CLIENT]}, {"notNamespaces": ["default"]},
                                    {"notServiceAccounts": ["default/client"]}], ids=lambda s: next(iter(s)))
def test_plaintext_peer_satisfies_every_negative_identity_match(source, at):
    p = allow({"from": [{"source": source}]})
    assert allowed(tcp(principal=None), p, at=at) is True
    assert allowed(tcp(principal=CLIENT), p, at=at) is False


@pytest.mark.parametrize("at", [WAYPOINT, ZTUNNEL])
def test_deny_not_principals_star_denies_plaintext_only(at):
    p = deny({"from": [{"source": {"notPrincipals": ["*"]}}]}, name="require-mtls")
    assert allowed(tcp(principal=None), p, at=at) is False
    assert allowed(tcp(principal=CLIENT), p, at=at) is True


# ---- §1.2 string matching ------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, principal, expected", [
    ("cluster.local/ns/default/sa/client", CLIENT, True),
    ("cluster.local/ns/default/sa/clien", CLIENT, False),
    ("cluster.local/ns/default/*", CLIENT, True),         # prefix
    ("cluster.local/ns/default/sa/client*", CLIENT, True),  # prefix matches the value itself
    ("cluster.local/ns/other/*", CLIENT, False),
    ("*/sa/client", CLIENT, True),                         # suffix
    ("*sa/client", CLIENT, True),
    ("*/sa/other", CLIENT, False),
    ("*", CLIENT, True),                                   # presence = any authenticated peer
    ("*", None, False),
    ("*abc*", "td/ns/x/sa/abc*", True),                    # only a leading * is special: suffix "abc*"
    ("*abc*", "td/ns/x/sa/abcd", False),
])
def test_principal_string_match_exact_prefix_suffix_presence(pattern, principal, expected):
    p = allow({"from": [{"source": {"principals": [pattern]}}]})
    assert allowed(tcp(principal=principal), p) is expected
    assert allowed(tcp(principal=principal), p, at=ZTUNNEL) is expected


def test_principals_match_without_spiffe_prefix_even_if_peer_reports_it():
    p = allow({"from": [{"source": {"principals": [CLIENT]}}]})
    assert allowed(tcp(principal="spiffe://" + CLIENT), p)


def test_cluster_local_trust_domain_is_matched_literally():
    # §1.7: istiod expands a `cluster.local` principal to the mesh trust domain and its aliases. We have
    # no trust-domain aliases; our mesh default trust domain is cluster.local, so literal matching is the
    # same answer there, and a peer in another trust domain is (deliberately) not matched.
    p = allow({"from": [{"source": {"principals": ["cluster.local/ns/default/sa/client"]}}]})
    assert allowed(tcp(principal="cluster.local/ns/default/sa/client"), p)
    assert not allowed(tcp(principal="example.org/ns/default/sa/client"), p)


# ---- §1.1: every source field and its not-form -------------------------------------------------------

SOURCE_TABLE = [
    # (source, request kwargs, expected)
    ({"principals": [CLIENT]}, {}, True),
    ({"principals": [OTHER]}, {}, False),
    ({"notPrincipals": [OTHER]}, {}, True),
    ({"notPrincipals": [CLIENT]}, {}, False),
    ({"namespaces": ["default"]}, {}, True),
    ({"namespaces": ["def*"]}, {}, True),
    ({"namespaces": ["other"]}, {}, False),
    ({"notNamespaces": ["default"]}, {}, False),
    ({"notNamespaces": ["other"]}, {}, True),
    ({"serviceAccounts": ["default/client"]}, {}, True),
    ({"serviceAccounts": ["client"]}, {}, True),            # bare name = the policy's namespace
    ({"serviceAccounts": ["other/client"]}, {}, False),
    ({"serviceAccounts": ["default/client"]}, {"principal": "td-other/ns/default/sa/client"}, True),  # td ignored
    ({"notServiceAccounts": ["default/client"]}, {}, False),
    ({"notServiceAccounts": ["default/x"]}, {}, True),
    ({"ipBlocks": ["10.0.0.1"]}, {}, True),                # single IP = /32
    ({"ipBlocks": ["10.0.0.0/24"]}, {}, True),
    ({"ipBlocks": ["10.0.1.0/24"]}, {}, False),
    ({"ipBlocks": ["10.0.0.77/24"]}, {}, True),            # host bits masked, as netip/Envoy do
    ({"notIpBlocks": ["10.0.0.0/8"]}, {}, False),
    ({"notIpBlocks": ["192.168.0.0/16"]}, {}, True),
    ({"ipBlocks": ["2001:db8::/32"]}, {"src": "2001:db8::5"}, True),
    ({"ipBlocks": ["2001:db8::5"]}, {"src": "2001:db8::6"}, False),
    ({"ipBlocks": ["10.0.0.0/8"]}, {"src": "2001:db8::5"}, False),     # v4 block never holds a v6 address
    ({"ipBlocks": ["10.0.0.1"]}, {"src": "::ffff:10.0.0.1"}, True),    # v4-mapped compares as v4
    ({"remoteIpBlocks": ["10.0.0.1"]}, {}, True),           # no XFF: remote = the direct peer
    ({"remoteIpBlocks": ["203.0.113.9"]}, {"remote": "203.0.113.9"}, True),
    ({"remoteIpBlocks": ["10.0.0.1"]}, {"remote": "203.0.113.9"}, False),
    ({"notRemoteIpBlocks": ["203.0.113.0/24"]}, {"remote": "203.0.113.9"}, False),
    ({"notRemoteIpBlocks": ["203.0.113.0/24"]}, {}, True),
    ({"trustDomains": ["cluster.local"]}, {}, True),
    ({"trustDomains": ["*.example"]}, {}, False),
    ({"notTrustDomains": ["cluster.local"]}, {}, False),
    ({"principals": [CLIENT], "ipBlocks": ["192.168.0.0/16"]}, {}, False),  # fields of one source are ANDed
]


@pytest.mark.parametrize("source, req, expected", SOURCE_TABLE,
                         ids=[f"{next(iter(s))}-{i}" for i, (s, _, _) in enumerate(SOURCE_TABLE)])
def test_source_fields_at_the_waypoint(source, req, expected):
    p = allow({"from": [{"source": source}]})
    assert allowed(tcp(**req), p) is expected
    assert allowed(http(**req), p) is expected


@pytest.mark.parametrize("source, expected", [
    ({"requestPrincipals": ["https://issuer.example/alice"]}, True),
    ({"requestPrincipals": ["https://issuer.example/*"]}, True),
    ({"requestPrincipals": ["*"]}, True),
    ({"requestPrincipals": ["https://other/*"]}, False),
    ({"notRequestPrincipals": ["*"]}, False),
])
def test_request_principals_match_the_jwt_issuer_and_subject(source, expected):
    p = allow({"from": [{"source": source}]})
    assert allowed(http(request_principal="https://issuer.example/alice"), p) is expected
    claims = {"iss": "https://issuer.example", "sub": "alice"}
    assert allowed(http(claims=claims), p) is expected


def test_not_request_principals_star_denies_requests_without_a_jwt():
    p = deny({"from": [{"source": {"notRequestPrincipals": ["*"]}}]})
    assert not allowed(http(), p)
    assert allowed(http(request_principal="iss/sub"), p)


def test_sources_of_one_rule_are_ored():
    p = allow({"from": [{"source": {"principals": [OTHER]}}, {"source": {"ipBlocks": ["10.0.0.1"]}}]})
    assert allowed(tcp(), p)
    assert not allowed(tcp(src="10.9.9.9"), p)


# ---- §1.1 operation fields -------------------------------------------------------------------------

OPERATION_TABLE = [
    ({"hosts": ["svc.default.svc.cluster.local"]}, {}, True),
    ({"hosts": ["SVC.Default.svc.cluster.local"]}, {}, True),     # case-insensitive
    ({"hosts": ["svc.default.svc.cluster.local"]}, {"host": "SVC.DEFAULT.svc.cluster.local"}, True),
    ({"hosts": ["svc.default.svc.cluster.local"]}, {"host": "svc.default.svc.cluster.local:8080"}, False),
    ({"hosts": ["svc.default.svc.cluster.local:*"]}, {"host": "svc.default.svc.cluster.local:8080"}, True),
    ({"hosts": ["*.cluster.local"]}, {}, True),
    ({"notHosts": ["svc.default.svc.cluster.local"]}, {}, False),
    ({"notHosts": ["evil.example"]}, {}, True),
    ({"ports": ["8080"]}, {}, True),
    ({"ports": ["9090"]}, {}, False),
    ({"notPorts": ["8080"]}, {}, False),
    ({"notPorts": ["9090"]}, {}, True),
    ({"methods": ["GET"]}, {}, True),
    ({"methods": ["get"]}, {}, False),                           # case-sensitive
    ({"methods": ["G*"]}, {}, True),
    ({"notMethods": ["GET"]}, {}, False),
    ({"notMethods": ["POST", "DELETE"]}, {}, True),
    ({"paths": ["/api"]}, {"path": "/api?x=1"}, True),           # query string ignored
    ({"paths": ["/api"]}, {"path": "/api#frag"}, True),
    ({"paths": ["/api/*"]}, {"path": "/api/v1/items"}, True),     # prefix /api/
    ({"paths": ["/api/*"]}, {"path": "/api"}, False),
    ({"paths": ["/info*"]}, {"path": "/information"}, True),
    ({"paths": ["*/health"]}, {"path": "/a/b/health"}, True),     # suffix
    ({"paths": ["*"]}, {"path": "/"}, True),                      # presence (regex .+)
    ({"paths": ["/admin"]}, {"path": "/public/../admin"}, True),  # BASE normalisation
    ({"paths": ["/admin"]}, {"path": "/./admin"}, True),
    ({"paths": ["/admin"]}, {"path": "/public/%2e%2e/admin"}, True),
    ({"paths": ["/admin/x"]}, {"path": "\\admin\\x"}, True),      # backslash → slash
    ({"paths": ["/admin"]}, {"path": "/ADMIN"}, False),           # paths are case-sensitive
    ({"notPaths": ["/admin*"]}, {"path": "/public/../admin/secret"}, False),
    ({"notPaths": ["/admin*"]}, {"path": "/public"}, True),
    ({"paths": ["/users/{*}/profile"]}, {"path": "/users/alice/profile"}, True),
    ({"paths": ["/users/{*}/profile"]}, {"path": "/users/a/b/profile"}, False),  # {*} is one segment
    ({"paths": ["/users/{*}/profile"]}, {"path": "/users//profile"}, False),
    ({"paths": ["/files/{**}"]}, {"path": "/files/a/b/c.txt"}, True),           # {**} many segments
    ({"paths": ["/files/{**}"]}, {"path": "/files/"}, True),
    ({"paths": ["/files/{**}"]}, {"path": "/other/a"}, False),
    ({"paths": ["/{*}/x/{**}"]}, {"path": "/a/x/b/c?q=1"}, True),
    ({"methods": ["GET"], "paths": ["/api*"]}, {"method": "POST", "path": "/api"}, False),  # ANDed
]


@pytest.mark.parametrize("operation, req, expected", OPERATION_TABLE,
                         ids=[f"{next(iter(o))}-{i}" for i, (o, _, _) in enumerate(OPERATION_TABLE)])
def test_operation_fields_on_http_at_the_waypoint(operation, req, expected):
    p = allow({"to": [{"operation": operation}]})
    assert allowed(http(**req), p) is expected


def test_operations_of_one_rule_are_ored_and_from_to_when_are_anded():
    p = allow({"from": [{"source": {"principals": [CLIENT]}}],
               "to": [{"operation": {"methods": ["GET"]}}, {"operation": {"paths": ["/ok"]}}],
               "when": [{"key": "request.headers[x-env]", "values": ["prod"]}]})
    assert allowed(http("GET", headers={"x-env": "prod"}), p)
    assert allowed(http("POST", "/ok", headers={"x-env": "prod"}), p)
    assert not allowed(http("POST", "/no", headers={"x-env": "prod"}), p)
    assert not allowed(http("GET", headers={"x-env": "dev"}), p)
    assert not allowed(http("GET", headers={"x-env": "prod"}, principal=OTHER), p)


def test_rules_are_ored():
    p = allow({"to": [{"operation": {"ports": ["1"]}}]}, {"from": [{"source": {"principals": [CLIENT]}}]})
    d = authorize(tcp(), [p], WAYPOINT)
    assert d.allowed and d.rule == 1


# ---- §1.1 every `when` key ---------------------------------------------------------------------------

CLAIMS = {"iss": "https://idp", "sub": "alice", "aud": ["api", "web"], "azp": "frontend",
          "groups": ["admins", "dev"], "tier": "gold", "nested": {"team": {"name": "core"}}, "n": 7}

WHEN_TABLE = [
    ("request.headers[X-Env]", ["prod"], None, {"headers": {"x-env": "prod"}}, True),
    ("request.headers[x-env]", ["prod"], None, {"headers": {"X-Env": "dev"}}, False),
    ("request.headers[x-env]", ["pr*"], None, {"headers": {"x-env": "prod"}}, True),
    ("request.headers[x-env]", ["*"], None, {"headers": {"x-env": ""}}, True),   # present (Envoy present_match)
    ("request.headers[x-env]", ["*"], None, {}, False),
    ("request.headers[x-env]", None, ["prod"], {}, True),                         # absent header: notValues pass
    ("request.headers[x-env]", None, ["prod"], {"headers": {"x-env": "prod"}}, False),
    ("request.headers[x-env]", ["a,b"], None, {"headers": {"x-env": ["a", "b"]}}, True),  # repeated: joined
    ("request.headers[Host]", ["svc*"], None, {}, True),                           # Host is :authority
    ("source.ip", ["10.0.0.0/8"], None, {}, True),
    ("source.ip", None, ["10.0.0.1"], {}, False),
    ("remote.ip", ["203.0.113.9"], None, {"remote": "203.0.113.9"}, True),
    ("source.namespace", ["default"], None, {}, True),
    ("source.namespace", ["default"], None, {"principal": None}, False),
    ("source.principal", [CLIENT], None, {}, True),
    ("source.principal", None, ["*"], {"principal": None}, True),
    ("source.serviceAccount", ["default/client"], None, {}, True),
    ("source.serviceAccount", ["client"], None, {}, True),
    ("source.serviceAccount", ["other/client"], None, {}, False),
    ("source.trustDomain", ["cluster.local"], None, {}, True),
    ("source.trustDomain", ["other.td"], None, {}, False),
    ("request.auth.principal", ["https://idp/alice"], None, {"claims": CLAIMS}, True),
    ("request.auth.principal", ["*"], None, {}, False),
    ("request.auth.audiences", ["web"], None, {"claims": CLAIMS}, True),
    ("request.auth.audiences", ["mobile"], None, {"claims": CLAIMS}, False),
    ("request.auth.presenter", ["frontend"], None, {"claims": CLAIMS}, True),
    ("request.auth.claims[groups]", ["admins"], None, {"claims": CLAIMS}, True),   # any list element
    ("request.auth.claims[groups]", ["ops"], None, {"claims": CLAIMS}, False),
    ("request.auth.claims[tier]", ["go*"], None, {"claims": CLAIMS}, True),
    ("request.auth.claims[nested][team][name]", ["core"], None, {"claims": CLAIMS}, True),
    ("request.auth.claims[n]", ["7"], None, {"claims": CLAIMS}, False),            # non-string claims never match
    ("request.auth.claims[groups]", None, ["ops"], {"claims": CLAIMS}, True),
    ("destination.ip", ["10.0.0.2"], None, {}, True),
    ("destination.ip", ["10.0.0.0/31"], None, {"dst": "10.0.0.3"}, False),
    ("destination.port", ["8080"], None, {}, True),
    ("destination.port", None, ["8080"], {}, False),
    ("connection.sni", ["outbound_.8080_._.svc*"], None, {"sni": "outbound_.8080_._.svc.default"}, True),
    ("connection.sni", ["*"], None, {}, False),
    ("connection.sni", ["*"], None, {"sni": ""}, False),                           # presence needs non-empty
    ("request.auth.presenter", ["*"], None, {"claims": {"azp": ""}}, False),
    ("request.auth.claims[tier]", ["*"], None, {"claims": {"tier": ""}}, False),
]


@pytest.mark.parametrize("key, values, not_values, req, expected", WHEN_TABLE,
                         ids=[f"{k}-{i}" for i, (k, *_rest) in enumerate(WHEN_TABLE)])
def test_when_keys_at_the_waypoint_on_http(key, values, not_values, req, expected):
    cond = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    p = allow({"when": [cond]})
    assert allowed(http(**req), p) is expected


def test_when_values_and_not_values_together():
    p = allow({"when": [{"key": "request.headers[x-env]", "values": ["p*"], "notValues": ["preview"]}]})
    assert allowed(http(headers={"x-env": "prod"}), p)
    assert not allowed(http(headers={"x-env": "preview"}), p)


# ---- §1.5 HTTP-only fields on TCP: the Envoy path (waypoint) --------------------------------------------


def test_envoy_tcp_drops_an_allow_rule_with_http_fields_so_tcp_is_denied():
    # istio.io authz-tcp task: ALLOW {methods:[GET], ports:["9000"]} ⇒ TCP to 9000 *and* 9001 rejected.
    p = allow({"to": [{"operation": {"methods": ["GET"], "ports": ["9000"]}}]})
    assert not allowed(tcp(port=9000), p)
    assert not allowed(tcp(port=9001), p)
    assert allowed(http(port=9000), p)  # the same rule works on HTTP


def test_envoy_tcp_keeps_the_other_allow_rules():
    p = allow({"to": [{"operation": {"methods": ["GET"]}}]}, {"to": [{"operation": {"ports": ["9001"]}}]})
    d = authorize(tcp(port=9001), [p], WAYPOINT)
    assert d.allowed and d.rule == 1


@pytest.mark.parametrize("rule, port, denied", [
    ({"to": [{"operation": {"methods": ["GET"]}}]}, 9000, True),                 # deny all TCP
    ({"to": [{"operation": {"methods": ["GET"], "ports": ["9000"]}}]}, 9000, True),
    ({"to": [{"operation": {"methods": ["GET"], "ports": ["9000"]}}]}, 9001, False),
    ({"from": [{"source": {"requestPrincipals": ["*"]}}]}, 9000, True),
    ({"from": [{"source": {"principals": [OTHER], "notRequestPrincipals": ["*"]}}]}, 9000, False),
    ({"when": [{"key": "request.headers[x]", "values": ["y"]}], "to": [{"operation": {"ports": ["9000"]}}]}, 9000, True),
])
def test_envoy_tcp_deny_ignores_only_the_http_field_so_denies_more(rule, port, denied):
    p = deny(rule)
    assert allowed(tcp(port=port), p) is (not denied)


def test_envoy_tcp_audit_ignores_http_fields_like_deny():
    p = policy({"action": "AUDIT", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}, name="a")
    assert authorize(tcp(), [p], WAYPOINT).audit == ("default/a",)


def test_envoy_evaluates_remote_ip_on_tcp():
    p = allow({"from": [{"source": {"remoteIpBlocks": ["10.0.0.1"]}}]})
    assert allowed(tcp(), p)


# ---- §1.5: the ztunnel path ------------------------------------------------------------------------------


def test_ztunnel_drops_allow_rules_with_l7_attributes_and_then_denies_everything():
    p = allow({"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]})
    d = authorize(tcp(), [p], ZTUNNEL)
    assert not d.allowed and d.reason == "allow policies exist, but none matched"


def test_ztunnel_keeps_pure_l4_allow_rules():
    p = allow({"to": [{"operation": {"paths": ["/x"]}}]}, {"from": [{"source": {"principals": [CLIENT]}}]})
    d = authorize(tcp(), [p], ZTUNNEL)
    assert d.allowed and d.rule == 1


@pytest.mark.parametrize("rule, request_kwargs, denied", [
    # DENY with only L7 in a from/to/when ⇒ that rule never fires
    ({"to": [{"operation": {"methods": ["GET"]}}]}, {}, False),
    ({"from": [{"source": {"requestPrincipals": ["*"]}}]}, {}, False),
    # principal + header condition ⇒ no-op (the when clause becomes an empty match)
    ({"from": [{"source": {"principals": [CLIENT]}}],
      "when": [{"key": "request.headers[x]", "values": ["y"]}]}, {}, False),
    # principal + notRequestPrincipals ⇒ enforced as "deny principal"
    ({"from": [{"source": {"principals": [CLIENT], "notRequestPrincipals": ["*"]}}]}, {}, True),
    ({"from": [{"source": {"principals": [CLIENT], "notRequestPrincipals": ["*"]}}]}, {"principal": OTHER}, False),
    # methods + ports ⇒ deny the port
    ({"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]}, {}, True),
    ({"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]}, {"port": 9090}, False),
    # rules: [{}] ⇒ deny all
    ({}, {}, True),
])
def test_ztunnel_turns_l7_deny_clauses_into_never_matching_ones(rule, request_kwargs, denied):
    p = deny(rule)
    assert allowed(tcp(**request_kwargs), p, at=ZTUNNEL) is (not denied)


@pytest.mark.parametrize("rule", [
    {"from": [{"source": {"remoteIpBlocks": ["10.0.0.1"]}}]},
    {"when": [{"key": "source.serviceAccount", "values": ["default/client"]}]},
    {"when": [{"key": "source.trustDomain", "values": ["cluster.local"]}]},
    {"when": [{"key": "connection.sni", "values": ["*"]}]},
    {"when": [{"key": "remote.ip", "values": ["10.0.0.1"]}]},
], ids=["remoteIpBlocks", "source.serviceAccount", "source.trustDomain", "connection.sni", "remote.ip"])
def test_ztunnel_treats_these_tcp_capable_attributes_as_l7(rule):
    p = allow(rule)
    req = tcp(sni="x.example")
    assert allowed(req, p, at=WAYPOINT)       # Envoy evaluates them on TCP
    assert not allowed(req, p, at=ZTUNNEL)    # ztunnel drops the ALLOW rule ⇒ deny


@pytest.mark.parametrize("when_key, value", [
    ("source.ip", "10.0.0.1"), ("source.namespace", "default"), ("source.principal", CLIENT),
    ("destination.ip", "10.0.0.2"), ("destination.port", "8080"),
])
def test_ztunnel_enforces_l4_when_keys(when_key, value):
    p = allow({"when": [{"key": when_key, "values": [value]}]})
    assert allowed(tcp(), p, at=ZTUNNEL)
    assert not allowed(tcp(src="10.9.9.9", principal=OTHER, dst="10.9.9.8", port=1), p, at=ZTUNNEL)


def test_ztunnel_does_not_map_trust_domains_so_such_a_source_never_matches():
    p = allow({"from": [{"source": {"trustDomains": ["cluster.local"]}}]})
    assert allowed(tcp(), p, at=WAYPOINT)
    assert not allowed(tcp(), p, at=ZTUNNEL)


def test_ztunnel_ignores_http_attributes_of_a_request_it_never_sees():
    p = allow({"to": [{"operation": {"methods": ["GET"]}}]})
    assert allowed(http("GET"), p, at=WAYPOINT)
    assert not allowed(http("GET"), p, at=ZTUNNEL)


# ---- ztunnel-format policies: rbac.rs unit tests (ztunnel.md §4.4) ---------------------------------------

PLAINTEXT = dict(src="127.0.0.1", principal=None, dst="127.0.0.2", port=8080)
TLS = dict(src="127.0.0.1", principal="td/ns/namespace/sa/account", dst="127.0.0.2", port=8080)
TLS_ALT = dict(src="127.0.0.3", principal="td-alt/ns/ns-alt/sa/alt", dst="127.0.0.4", port=9090)

RBAC_TABLE = [
    ("namespaces", {"namespaces": [{"Exact": "namespace"}]}, (False, True, False)),
    ("not_namespaces", {"notNamespaces": [{"Exact": "namespace"}]}, (True, False, True)),
    ("service_accounts", {"serviceAccounts": [{"namespace": "namespace", "serviceAccount": "account"}]}, (False, True, False)),
    ("not_service_accounts", {"notServiceAccounts": [{"namespace": "namespace", "serviceAccount": "account"}]}, (True, False, True)),
    ("principals", {"principals": [{"Exact": "td/ns/namespace/sa/account"}]}, (False, True, False)),
    ("not_principals", {"notPrincipals": [{"Exact": "td/ns/namespace/sa/account"}]}, (True, False, True)),
    ("source_ips", {"sourceIps": ["127.0.0.1/32"]}, (True, True, False)),
    ("not_source_ips", {"notSourceIps": ["127.0.0.1/32"]}, (False, False, True)),
    ("destination_ips", {"destinationIps": ["127.0.0.2/32"]}, (True, True, False)),
    ("not_destination_ips", {"notDestinationIps": ["127.0.0.2/32"]}, (False, False, True)),
    ("cidr_range", {"destinationIps": ["127.0.0.1/24"]}, (True, True, True)),
    ("destination_ports", {"destinationPorts": [8080]}, (True, True, False)),
    ("not_destination_ports", {"notDestinationPorts": [8080]}, (False, False, True)),
    ("presence", {"principals": [{"Presence": []}]}, (False, True, True)),
    ("prefix", {"principals": [{"Prefix": "td/"}]}, (False, True, False)),
    ("suffix", {"principals": [{"Suffix": "/sa/alt"}]}, (False, False, True)),
]


@pytest.mark.parametrize("name, match, expected", RBAC_TABLE, ids=[r[0] for r in RBAC_TABLE])
def test_ztunnel_rbac_match_table(name, match, expected):
    p = ztunnel_policy([[[match]]], action="Allow")
    got = tuple(allowed(tcp(**conn), p, at=ZTUNNEL) for conn in (PLAINTEXT, TLS, TLS_ALT))
    assert got == expected


@pytest.mark.parametrize("rules, expected", [
    ([[[{}]]], False),   # an empty RbacMatch is skipped
    ([[[]]], True),      # an empty clause matches
    ([[]], True),        # a rule without clauses matches
    ([], False),         # no rules: no match
], ids=["empty-match", "empty-clause", "empty-rule", "no-rules"])
def test_ztunnel_rbac_empty_policy(rules, expected):
    p = ztunnel_policy(rules, action="Deny")
    assert allowed(tcp(**TLS), p, at=ZTUNNEL) is (not expected)


def test_ztunnel_rbac_nesting_clauses_and_matches():
    rules = [[[{"namespaces": [{"Exact": "a"}]}, {"namespaces": [{"Exact": "b"}]}], [{"destinationPorts": [80]}]]]
    p = ztunnel_policy(rules)
    assert allowed(tcp(principal="td/ns/a/sa/x", port=80), p, at=ZTUNNEL)
    assert allowed(tcp(principal="td/ns/b/sa/x", port=80), p, at=ZTUNNEL)
    assert not allowed(tcp(principal="td/ns/c/sa/x", port=80), p, at=ZTUNNEL)
    assert not allowed(tcp(principal="td/ns/a/sa/x", port=81), p, at=ZTUNNEL)


def test_ztunnel_rbac_multi_rule_is_ored():
    p = ztunnel_policy([[[{"namespaces": [{"Exact": "a"}]}]], [[{"namespaces": [{"Exact": "b"}]}]]])
    d = authorize(tcp(principal="td/ns/b/sa/x"), [p], ZTUNNEL)
    assert d.allowed and d.rule == 1


def test_ztunnel_format_dry_run_is_logged_not_enforced():
    p = ztunnel_policy([[]], action="Deny", dry_run=True)
    d = authorize(tcp(), [p], ZTUNNEL)
    assert d.allowed and d.dry_run == ("default/z",)


def test_istio_and_ztunnel_format_policies_pool_together():
    zdeny = ztunnel_policy([[[{"sourceIps": ["10.0.0.0/8"]}]]], action="Deny", name="no-10")
    a = allow({})
    d = authorize(tcp(), [a, zdeny], ZTUNNEL)
    assert not d.allowed and d.policy == "default/no-10"


# ---- the decision: names, reasons, Envoy's response detail ---------------------------------------------


def test_response_detail_names_the_deny_policy_and_rule():
    p = deny({"to": [{"operation": {"ports": ["1"]}}]}, {}, name="deny-x", namespace="bar")
    d = authorize(tcp(), [p], WAYPOINT)
    assert (d.allowed, d.rule) == (False, 1)
    assert d.response_detail == "rbac_access_denied_matched_policy[ns[bar]-policy[deny-x]-rule[1]]"


def test_response_detail_is_none_when_no_allow_matched():
    d = authorize(tcp(), [policy({})], WAYPOINT)
    assert d.response_detail == "rbac_access_denied_matched_policy[none]"
    assert authorize(tcp(), [], WAYPOINT).response_detail == ""


def test_invalid_request_addresses_fail_positive_ip_matches():
    p = allow({"from": [{"source": {"ipBlocks": ["0.0.0.0/0", "::/0"]}}]})
    assert not allowed(tcp(src="not-an-ip"), p)
    q = allow({"from": [{"source": {"notIpBlocks": ["0.0.0.0/0"]}}]})
    assert allowed(tcp(src="not-an-ip"), q)


# ---- explain ----------------------------------------------------------------------------------------------


def test_explain_names_the_clause_and_field_that_did_not_match():
    p = allow({"from": [{"source": {"principals": [OTHER]}}]}, {"to": [{"operation": {"methods": ["GET"]}}]})
    res = explain(http("POST"), [p], WAYPOINT)
    assert len(res) == 1 and res[0].matched_rule is None and res[0].effect == "enforced"
    r0, r1 = res[0].rules
    assert "from: principals in [cluster.local/ns/other/sa/intruder]" in r0.note and CLIENT in r0.note
    assert r1.note == "to: methods in [GET] (request: POST)"
    assert "rule 1: no match" in str(res[0])


def test_explain_marks_rules_dropped_or_changed_by_the_enforcement_point():
    a = allow({"to": [{"operation": {"methods": ["GET"]}}]}, name="a")
    d = deny({"to": [{"operation": {"methods": ["GET"], "ports": ["8080"]}}]}, name="d")
    tcp_res = explain(tcp(), [a, d], WAYPOINT)
    assert tcp_res[0].rules[0].note.startswith("dropped — HTTP-only field on a TCP connection")
    assert tcp_res[1].matched_rule == 0 and "broader deny" in tcp_res[1].rules[0].note
    zt_res = explain(tcp(), [a, d], ZTUNNEL)
    assert zt_res[0].rules[0].note.startswith("dropped — L7 attribute")
    assert zt_res[1].matched_rule == 0
