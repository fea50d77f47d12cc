"""Properties of Istio's evaluation order (§1.3) that must hold for every policy set and request, at both
enforcement points, on TCP and HTTP: DENY only takes away, the first ALLOW only takes away, dry-run and
AUDIT change nothing, and a further ALLOW (once one exists) only adds."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.authz import authorize
from tests.test_authz_helpers import CLIENT, OTHER, WAYPOINT, ZTUNNEL, http, policy, tcp

SOURCES = st.dictionaries(
    st.sampled_from(["principals", "notPrincipals", "namespaces", "notNamespaces", "ipBlocks", "notIpBlocks",
                     "requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "trustDomains"]),
    st.lists(st.sampled_from([CLIENT, OTHER, "*", "cluster.local/*", "default", "10.0.0.0/8", "10.0.0.1",
                              "192.168.0.0/16"]), min_size=1, max_size=2),
    min_size=1, max_size=2,
).filter(lambda s: not any(k in s for k in ("ipBlocks", "notIpBlocks", "remoteIpBlocks"))
         or all("." in v and v[0].isdigit() for k in ("ipBlocks", "notIpBlocks", "remoteIpBlocks") for v in s.get(k, ())))
OPERATIONS = st.one_of(
    st.fixed_dictionaries({"ports": st.lists(st.sampled_from(["8080", "9090"]), min_size=1, max_size=2)}),
    st.fixed_dictionaries({"methods": st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2)}),
    st.fixed_dictionaries({"paths": st.lists(st.sampled_from(["/a*", "/b", "*", "/x/{*}"]), min_size=1, max_size=2),
                           "notPorts": st.just(["9090"])}),
    st.fixed_dictionaries({"hosts": st.just(["svc*"]), "notMethods": st.just(["DELETE"])}),
)
CONDITIONS = st.sampled_from([
    {"key": "request.headers[x-env]", "values": ["prod"]},
    {"key": "source.ip", "notValues": ["10.0.0.0/24"]},
    {"key": "destination.port", "values": ["8080"]},
    {"key": "connection.sni", "values": ["*"]},
    {"key": "source.serviceAccount", "values": ["default/client"]},
    {"key": "source.principal", "values": ["*"]},
])
RULES = st.fixed_dictionaries({}, optional={
    "from": st.lists(SOURCES.map(lambda s: {"source": s}), min_size=1, max_size=2),
    "to": st.lists(OPERATIONS.map(lambda o: {"operation": o}), min_size=1, max_size=2),
    "when": st.lists(CONDITIONS, min_size=1, max_size=2),
})
_names = iter(range(10**9))


def policies(action: str, *, dry_run=st.just(False)):
    min_rules = 1 if action == "DENY" else 0
    return st.builds(lambda rules, dr: policy({"action": action, "rules": rules}, name=f"p{next(_names)}",
                                              dry_run=dr),
                     st.lists(RULES, min_size=min_rules, max_size=3), dry_run)


ANY_POLICY = st.one_of(policies("ALLOW"), policies("DENY"), policies("AUDIT"),
                       policies("ALLOW", dry_run=st.just(True)), policies("DENY", dry_run=st.just(True)))
NON_ALLOW = st.one_of(policies("DENY"), policies("AUDIT"), policies("ALLOW", dry_run=st.just(True)))

REQUESTS = st.one_of(
    st.builds(tcp, src=st.sampled_from(["10.0.0.1", "10.0.1.5", "192.168.1.1", "2001:db8::1"]),
              principal=st.sampled_from([CLIENT, OTHER, None]), port=st.sampled_from([8080, 9090]),
              sni=st.sampled_from([None, "svc.example"])),
    st.builds(http, method=st.sampled_from(["GET", "POST", "DELETE"]), path=st.sampled_from(["/a/1", "/b", "/x/y?q"]),
              host=st.sampled_from(["svc.default", "other"]), headers=st.sampled_from([{}, {"x-env": "prod"}]),
              principal=st.sampled_from([CLIENT, OTHER, None]), port=st.sampled_from([8080, 9090]),
              request_principal=st.sampled_from([None, "iss/sub"])),
)
AT = st.sampled_from([WAYPOINT, ZTUNNEL])
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.lists(ANY_POLICY, max_size=4), policies("DENY"), REQUESTS, AT)
def test_adding_a_deny_policy_never_allows_a_request_that_was_denied(existing, extra_deny, request, at):
    before = authorize(request, existing, at).allowed
    after = authorize(request, existing + [extra_deny], at).allowed
    assert after <= before


@SETTINGS
@given(st.lists(NON_ALLOW, max_size=4), policies("ALLOW"), REQUESTS, AT)
def test_adding_the_first_allow_policy_never_allows_more(existing, first_allow, request, at):
    before = authorize(request, existing, at).allowed
    after = authorize(request, existing + [first_allow], at).allowed
    assert after <= before


@SETTINGS
@given(st.lists(ANY_POLICY, max_size=4), policies("ALLOW"), policies("ALLOW"), REQUESTS, AT)
def test_once_an_allow_exists_another_allow_never_denies_more(existing, first, second, request, at):
    before = authorize(request, existing + [first], at).allowed
    after = authorize(request, existing + [first, second], at).allowed
    assert after >= before


@SETTINGS
@given(st.lists(ANY_POLICY, max_size=4),
       st.one_of(policies("AUDIT"), policies("ALLOW", dry_run=st.just(True)), policies("DENY", dry_run=st.just(True))),
       REQUESTS, AT)
def test_dry_run_and_audit_policies_never_change_the_decision(existing, inert, request, at):
    assert authorize(request, existing + [inert], at).allowed == authorize(request, existing, at).allowed


@SETTINGS
@given(st.lists(ANY_POLICY, max_size=4), REQUESTS, AT)
def test_the_decision_names_a_deciding_policy_exactly_when_one_matched(existing, request, at):
    d = authorize(request, existing, at)
    keys = {p.key for p in existing}
    if d.policy is not None:
        assert d.policy in keys and d.rule is not None and d.action in ("ALLOW", "DENY")
        assert d.allowed == (d.action == "ALLOW")
    else:
        assert d.reason in ("no ALLOW policy applies", "allow policies exist, but none matched")
