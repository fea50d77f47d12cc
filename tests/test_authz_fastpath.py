"""The evaluation fast paths decide exactly as the plain rule walk does: compiled rules (model.compile_rules)
against the interpreted ``_rule_ok`` that ``explain`` uses, ``Authorizer.decide_http`` against
``authorize`` with the full request objects, and ``normalize_path``'s shortcut against the segment walk."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policy.authz import authorize
from policy.authz.evaluate import Authorizer, _Facts, _matched_rule, _rule_ok, _rules_at
from policy.authz.match import _normalize_path_segments, normalize_path, parse_ip
from tests.test_authz_helpers import CLIENT, WAYPOINT, deny, http, policy
from tests.test_authz_properties import ANY_POLICY, AT, REQUESTS, SETTINGS

HTTP_REQUESTS = st.builds(
    http, method=st.sampled_from(["GET", "POST", "DELETE"]),
    path=st.sampled_from(["/a/1", "/b", "/x/y?q", "/a/../b", "/%2e/a", "\\b", "b", "/a/./1#f"]),
    host=st.sampled_from(["svc.default", "other"]),
    headers=st.sampled_from([{}, {"x-env": "prod"}, {"x-env": ["prod", "dev"]}, {"x-env": ""}]),
    principal=st.sampled_from([CLIENT, "spiffe://" + CLIENT, "cluster.local/odd", None]),
    port=st.sampled_from([8080, 9090]), src=st.sampled_from(["10.0.0.1", "::ffff:10.0.0.1", "bad", "2001:db8::1"]))


@SETTINGS
@given(ANY_POLICY, REQUESTS, AT)
def test_compiled_rules_match_the_rule_walk_explain_uses(p, request, at):
    facts = _Facts(request)
    walked = next((r.index for r in _rules_at(p, at, request.http is not None) if _rule_ok(r, facts)), None)
    assert _matched_rule(p, facts, at) == walked


@SETTINGS
@given(st.lists(ANY_POLICY, max_size=4), HTTP_REQUESTS)
def test_decide_http_is_authorize_without_the_request_objects(policies, request):
    h = request.http
    fast = Authorizer(policies, WAYPOINT).decide_http(
        request.source_ip, request.source_principal, request.destination_ip, request.destination_port,
        method=h.method, path=h.path, host=h.host, headers=h.headers)
    assert fast == authorize(request, policies, WAYPOINT)


def test_an_authorizer_returns_the_same_decision_object_for_the_same_outcome():
    # Not timed: the memo is in effect (a Decision and its reason string are built once per outcome).
    a = Authorizer([deny({"when": [{"key": "request.headers[x-deny]", "values": ["*"]}]}), policy(
        {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": [CLIENT]}}]}]}, name="allow")], WAYPOINT)
    first = a.decide(http())
    assert first.allowed and first.policy == "default/allow"
    assert a.decide(http(path="/other")) is first
    denied = a.decide(http(headers={"x-deny": "1"}))
    assert not denied.allowed and denied.policy == "default/p"
    assert a.decide(http(headers={"x-deny": "yes"})) is denied


def test_parse_ip_is_memoised_and_still_canonicalises_mapped_addresses():
    assert parse_ip("::ffff:10.0.0.1") is parse_ip("::ffff:10.0.0.1")
    assert str(parse_ip("::ffff:10.0.0.1")) == "10.0.0.1"
    assert parse_ip("not an ip") is None and parse_ip(None) is None


@given(st.text(alphabet="/.%2eE\\?#ab", max_size=12))
def test_normalize_path_shortcut_gives_the_segment_walk_result(raw):
    assert normalize_path(raw) == _normalize_path_segments(raw)
