"""AuthorizationPolicy action CUSTOM: hbone-proxy has no external-authorization client, so no extension provider
is ever found; istiod then turns the policy's rules into DENY rules (pilot/pkg/security/authz/builder/builder.go:
"failed to process CUSTOM action for provider %s, will generate deny configs" → getBadCustomDenyRules). A CUSTOM
policy loads with a warning and denies what it matches, instead of failing the whole config load."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy.errors import ConfigError
from policy.mesh import load_mesh_config
from tests.test_authz_helpers import allow, allowed, http, policy, tcp

DEPLOY_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "config"
ADMIN_ONLY = [{"to": [{"operation": {"paths": ["/admin"]}}]}]


def custom(rules=ADMIN_ONLY, provider="my-ext-authz", **kw):
    spec = {"action": "CUSTOM", "rules": rules}
    if provider is not None:
        spec["provider"] = {"name": provider}
    return policy(spec, **kw)


def test_a_custom_policy_loads_as_a_deny_of_what_its_rules_match_with_a_warning():
    p = custom()
    assert p.action == "DENY" and len(p.rules) == 1
    assert len(p.warnings) == 1 and "CUSTOM (extension provider 'my-ext-authz') is not enforced" in p.warnings[0]
    assert "DENY what they match" in p.warnings[0]
    # What it would send to the provider is refused; what it does not match is not touched.
    assert not allowed(http(path="/admin"), p)
    assert allowed(http(path="/public"), p)


def test_an_ignored_custom_policy_would_weaken_security_so_it_denies_even_with_an_allow():
    # With an ALLOW for everything, the CUSTOM policy's matches are still denied: a DENY beats any ALLOW, as the
    # RBAC DENY filter istiod generates runs before the ALLOW one.
    everyone = allow({})
    assert not allowed(http(path="/admin"), custom(), everyone)
    assert allowed(http(path="/other"), custom(), everyone)


def test_a_dry_run_custom_policy_is_not_enforced():
    # getBadCustomDenyRules(providerRules): only the enforced rules, not the dry-run ones (providerShadowRules).
    p = custom(dry_run=True)
    assert p.dry_run and allowed(http(path="/admin"), p)


def test_a_custom_policy_on_tcp_denies_as_a_deny_would():
    # `rules: [{}]` matches every request: every connection is refused.
    assert not allowed(tcp(), custom(rules=[{}]))


@pytest.mark.parametrize("spec,path,problem", [
    # istiod validation.go for CUSTOM.
    ({"action": "CUSTOM", "provider": {"name": "x"}}, "spec.rules",
     "CUSTOM action without `rules` is meaningless as it will never be triggered"),
    ({"action": "CUSTOM", "provider": {"name": "x"}, "rules": []}, "spec.rules", "CUSTOM action without `rules`"),
    ({"action": "CUSTOM", "rules": [{}]}, "spec.provider.name", "`provider.name` must not be empty"),
    ({"action": "CUSTOM", "provider": {"name": ""}, "rules": [{}]}, "spec.provider.name",
     "`provider.name` must not be empty"),
    ({"action": "CUSTOM", "provider": {"nmae": "x"}, "rules": [{}]}, "spec.provider.nmae", "unknown field"),
    ({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"from": [{"source": {"principals": ["a/b"]}}]}]},
     "spec.rules[0].from[0].source.principals", "From.Principals is currently not supported with CUSTOM action"),
    ({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"from": [{"source": {"notNamespaces": ["a"]}}]}]},
     "spec.rules[0].from[0].source.notNamespaces", "From.NotNamespaces is currently not supported"),
    ({"action": "CUSTOM", "provider": {"name": "x"},
      "rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["a"]}]}]},
     "spec.rules[0].when[0].key", "request.auth.claims[iss] is currently not supported with CUSTOM action"),
    ({"action": "CUSTOM", "provider": {"name": "x"},
      "rules": [{"when": [{"key": "source.principal", "values": ["a"]}]}]},
     "spec.rules[0].when[0].key", "source.principal is currently not supported with CUSTOM action"),
    ({"action": "DENY", "provider": {"name": "x"}, "rules": [{}]}, "spec.provider",
     "`provider` must not be with non CUSTOM action, found DENY"),
])
def test_custom_policies_the_webhook_refuses_fail_the_load(spec, path, problem):
    with pytest.raises(ConfigError) as e:
        policy(spec)
    assert e.value.path == path and problem in e.value.problem, str(e.value)


def test_a_custom_policy_elsewhere_in_the_mesh_no_longer_stops_the_load(tmp_path):
    # The audit: `config check` of the bookinfo config plus a selector CUSTOM policy in namespace other-team
    # answered "1 error; nothing loaded".
    extra = tmp_path / "custom.yaml"
    extra.write_text("""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: other-team}
spec:
  selector: {matchLabels: {app: foo}}
  action: CUSTOM
  provider: {name: my-ext-authz}
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
""")
    mesh = load_mesh_config([str(DEPLOY_CONFIG), str(extra)])
    by_key = {p.key: p for p in mesh.authorization_policies}
    assert by_key["other-team/ext"].action == "DENY"
    assert {"default/reviews-allow-productpage", "default/ratings-allow-reviews"} <= set(by_key)
    assert [w for w in mesh.warnings if "other-team/ext" in w and "is not enforced by hbone-proxy" in w]
