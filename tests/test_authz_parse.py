"""Loading AuthorizationPolicy documents and ztunnel-format policies: every field, every error with its
precise path, the warnings `config check` prints, and a hypothesis test that only ConfigError escapes."""

from __future__ import annotations

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.authz import parse_authorization_policy, parse_ztunnel_policy
from policy.authz.model import (A_DESTINATION_PORT, A_HOST, A_PATH, A_REQUEST_CLAIMS, A_REQUEST_HEADER,
                                A_SOURCE_SERVICE_ACCOUNT, ServiceAccountMatch)
from policy.errors import ConfigError, Where
from tests.mutation_helpers import leaves, mutate

FULL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-get
  namespace: default
  labels: {team: web}
  annotations: {note: hi}
  resourceVersion: "17"
spec:
  action: ALLOW
  targetRefs:
  - {group: "", kind: Service, name: reviews}
  - {group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/productpage"]
        notPrincipals: ["*/sa/evil"]
        requestPrincipals: ["https://idp/*"]
        notRequestPrincipals: ["https://idp/bob"]
        namespaces: ["default"]
        notNamespaces: ["kube-system"]
        ipBlocks: ["10.0.0.0/8", "10.1.2.3", "2001:db8::/32"]
        notIpBlocks: ["10.9.0.0/16"]
        remoteIpBlocks: ["203.0.113.0/24"]
        notRemoteIpBlocks: ["203.0.113.7"]
        trustDomains: ["cluster.local"]
        notTrustDomains: ["evil.td"]
    - source:
        serviceAccounts: ["default/productpage", "reviews"]
        notServiceAccounts: ["other/x"]
    to:
    - operation:
        hosts: ["Reviews.default.svc.cluster.local", "reviews:*"]
        notHosts: ["evil"]
        ports: ["9080"]
        notPorts: ["15000"]
        methods: ["GET", "HEAD"]
        notMethods: ["DELETE"]
        paths: ["/reviews/*", "/users/{*}/profile"]
        notPaths: ["/admin*"]
    when:
    - key: request.headers[X-Env]
      values: ["prod"]
    - key: request.auth.claims[groups]
      notValues: ["banned"]
    - key: destination.port
      values: ["9080"]
  - {}
"""


def load(text: str):
    return parse_authorization_policy(yaml.safe_load(text), Where("test.yaml"))


def base() -> dict:
    return yaml.safe_load(FULL)


def test_every_field_of_a_full_policy_is_read():
    p = load(FULL)
    assert (p.key, p.action, p.origin, p.dry_run, p.selector) == ("default/allow-get", "ALLOW", "istio", False, None)
    assert [str(r) for r in p.target_refs] == ["core/Service/reviews", "gateway.networking.k8s.io/Gateway/waypoint"]
    r0, r1 = p.rules
    assert r1.clauses == () and r0.index == 0 and r1.index == 1
    assert [c.label for c in r0.clauses] == ["from", "to", "when[0]", "when[1]", "when[2]"]
    src0, src1 = r0.clauses[0].matches
    assert [f.label for f in src0.fields] == ["principals", "requestPrincipals", "namespaces", "ipBlocks",
                                             "remoteIpBlocks", "trustDomains"]
    assert all(f.not_values for f in src0.fields)
    sa = src1.fields[0]
    assert sa.attr == A_SOURCE_SERVICE_ACCOUNT
    assert sa.values == (ServiceAccountMatch("default", "productpage"), ServiceAccountMatch("default", "reviews"))
    op = r0.clauses[1].matches[0]
    by_attr = {f.attr: f for f in op.fields}
    assert str(by_attr[A_HOST].values[0]) == "reviews.default.svc.cluster.local"  # hosts fold case
    assert [str(v) for v in by_attr[A_PATH].values] == ["/reviews/*", "/users/{*}/profile"]
    assert by_attr[A_DESTINATION_PORT].values[0].port == 9080
    hdr = r0.clauses[2].matches[0].fields[0]
    assert (hdr.attr, hdr.arg) == (A_REQUEST_HEADER, ("x-env",))
    claims = r0.clauses[3].matches[0].fields[0]
    assert (claims.attr, claims.arg, claims.values) == (A_REQUEST_CLAIMS, ("groups",), ())
    assert p.warnings == ()


def test_v1beta1_is_the_same_schema():
    doc = base()
    doc["apiVersion"] = "security.istio.io/v1beta1"
    assert parse_authorization_policy(doc, Where()).rules == load(FULL).rules


def test_missing_namespace_defaults_like_kubectl_and_missing_spec_is_allow_nothing():
    p = parse_authorization_policy({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                                    "metadata": {"name": "x"}}, Where())
    assert p.key == "default/x" and p.action == "ALLOW" and p.rules == ()


@pytest.mark.parametrize("value, dry_run", [("true", True), ("True", True), ("1", True), ("false", False), ("0", False)])
def test_dry_run_annotation_is_a_go_bool(value, dry_run):
    doc = base()
    doc["metadata"]["annotations"] = {"istio.io/dry-run": value}
    p = parse_authorization_policy(doc, Where())
    assert p.dry_run is dry_run and p.warnings == ()


def test_an_unparsable_dry_run_annotation_enforces_the_policy_and_warns():
    doc = base()
    doc["metadata"]["annotations"] = {"istio.io/dry-run": "yes"}
    p = parse_authorization_policy(doc, Where())
    assert p.dry_run is False and "is not a boolean; the policy is enforced" in p.warnings[0]


def test_legacy_target_ref_is_used_when_target_refs_is_empty():
    doc = base()
    del doc["spec"]["targetRefs"]
    doc["spec"]["targetRef"] = {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "wp"}
    assert [str(r) for r in parse_authorization_policy(doc, Where()).target_refs] == ["gateway.networking.k8s.io/Gateway/wp"]


def test_a_policy_in_a_yaml_stream_parses_with_its_document_position():
    text = "---\n" + FULL + "\n---\n" + FULL.replace("allow-get", "second").replace("ports: [\"9080\"]", "ports: [9080]")
    docs = list(yaml.safe_load_all(text))
    assert parse_authorization_policy(docs[0], Where("f.yaml", 1)).name == "allow-get"
    with pytest.raises(ConfigError) as e:
        parse_authorization_policy(docs[1], Where("f.yaml", 2))
    assert str(e.value) == ('f.yaml: document 2 (AuthorizationPolicy default/second): '
                            'spec.rules[0].to[0].operation.ports: expected a list of strings '
                            '(write ports as strings, e.g. "8080")')


# ---- errors, each with its precise path ------------------------------------------------------------

def _set(doc, path, value):
    """Set doc[path] where path is a list of keys/indexes; value _DEL deletes."""
    cur = doc
    for k in path[:-1]:
        cur = cur[k]
    if value is _DEL:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value


_DEL = object()
R0 = ["spec", "rules", 0]
SRC = R0 + ["from", 0, "source"]
OP = R0 + ["to", 0, "operation"]

ERRORS = [
    # (mutation path, value, expected field path, problem substring)
    (OP + ["methods"], "GET", "spec.rules[0].to[0].operation.methods", "expected a list of strings"),
    (OP + ["methods"], ["GET", 1], "spec.rules[0].to[0].operation.methods", "expected a list of strings"),
    (OP + ["methods"], ["GET", ""], "spec.rules[0].to[0].operation.methods[1]", "empty value not allowed"),
    (OP + ["method"], ["GET"], "spec.rules[0].to[0].operation.method", "unknown field (did you mean 'methods'?)"),
    (OP + ["ports"], ["http"], "spec.rules[0].to[0].operation.ports[0]", "bad port 'http'"),
    (OP + ["notPorts"], ["65536"], "spec.rules[0].to[0].operation.notPorts[0]", "bad port '65536'"),
    (OP + ["paths"], ["/a/{**}/b/{*}"], "spec.rules[0].to[0].operation.paths[0]", "{**} is not the last operator"),
    (OP + ["paths"], ["/a/{x}"], "spec.rules[0].to[0].operation.paths[0]", "beyond a supported path template"),
    (OP + ["paths"], ["/a b/{*}"], "spec.rules[0].to[0].operation.paths[0]", "is not a valid literal"),
    (OP + ["paths"], ["/a\n/{*}"], "spec.rules[0].to[0].operation.paths[0]", "is not a valid literal"),
    (OP, {}, "spec.rules[0].to[0].operation", "`to.operation` must not be empty"),
    (OP, None, "spec.rules[0].to[0].operation", "`to.operation` must not be nil"),
    (R0 + ["to"], [], "spec.rules[0].to", "`to` must not be empty"),
    (SRC + ["ipBlocks"], ["10.0.0.300"], "spec.rules[0].from[0].source.ipBlocks[0]", "bad IP address '10.0.0.300'"),
    (SRC + ["notRemoteIpBlocks"], ["10.0.0.0/33"], "spec.rules[0].from[0].source.notRemoteIpBlocks[0]", "bad CIDR range"),
    (SRC + ["principalz"], ["x"], "spec.rules[0].from[0].source.principalz", "unknown field (did you mean 'principals'?)"),
    (SRC + ["serviceAccounts"], ["a/b"], "spec.rules[0].from[0].source", "cannot set serviceAccounts with namespaces or principals"),
    (R0 + ["from", 1, "source", "serviceAccounts"], ["a/*"], "spec.rules[0].from[1].source.serviceAccounts[0]", "wildcard not allowed"),
    (R0 + ["from", 1, "source", "serviceAccounts"], ["a/b/c"], "spec.rules[0].from[1].source.serviceAccounts[0]", "expected 'serviceAccount' or 'namespace/serviceAccount'"),
    (R0 + ["from", 1, "source", "serviceAccounts"], ["/b"], "spec.rules[0].from[1].source.serviceAccounts[0]", "expected 'serviceAccount'"),
    (R0 + ["from", 1, "source", "serviceAccounts"], [f"sa{i}" for i in range(17)], "spec.rules[0].from[1].source.serviceAccounts", "more than 16"),
    (SRC, {}, "spec.rules[0].from[0].source", "`from.source` must not be empty"),
    (R0 + ["from", 0], {}, "spec.rules[0].from[0].source", "`from.source` must not be nil"),
    (R0 + ["from"], [], "spec.rules[0].from", "`from` must not be empty"),
    (R0 + ["from"], {"source": {}}, "spec.rules[0].from", "expected a list, got a mapping"),
    (R0 + ["form"], [], "spec.rules[0].form", "unknown field (did you mean 'from'?)"),
    (R0 + ["when", 0, "key"], "request.header[x]", "spec.rules[0].when[0].key", "unknown attribute: request.header[x]"),
    (R0 + ["when", 0, "key"], "request.headers", "spec.rules[0].when[0].key", "should have format request.headers[name]"),
    (R0 + ["when", 0, "key"], "request.headers[]", "spec.rules[0].when[0].key", "should have format"),
    (R0 + ["when", 0, "key"], "request.auth.claims[a][]", "spec.rules[0].when[0].key", "should have format"),
    (R0 + ["when", 0, "key"], "experimental.envoy.filters.http.x[y]", "spec.rules[0].when[0].key", "not supported"),
    (R0 + ["when", 0, "key"], "destination.labels[app]", "spec.rules[0].when[0].key", "replaced by the workload selector"),
    (R0 + ["when", 0, "key"], "destination.namespace", "spec.rules[0].when[0].key", "replaced by the metadata.namespace"),
    (R0 + ["when", 0, "key"], "destination.user", "spec.rules[0].when[0].key", "only supported in v1alpha1"),
    (R0 + ["when", 0, "key"], "", "spec.rules[0].when[0].key", "`key` must not be empty"),
    (R0 + ["when", 0, "key"], _DEL, "spec.rules[0].when[0].key", "required field missing"),
    (R0 + ["when", 0, "values"], [], "spec.rules[0].when[0]", "at least one of `values` or `notValues` must be set"),
    (R0 + ["when", 2, "values"], ["x"], "spec.rules[0].when[2].values[0]", "bad port 'x'"),
    (R0 + ["when", 0, "value"], ["x"], "spec.rules[0].when[0].value", "unknown field (did you mean 'values'?)"),
    # CUSTOM loads as a DENY of its rules (tests/test_authz_custom.py), once it names its provider.
    (["spec", "action"], "CUSTOM", "spec.provider.name", "`provider.name` must not be empty"),
    (["spec", "action"], "allow", "spec.action", "expected one of ALLOW, DENY, AUDIT, CUSTOM, got 'allow'"),
    (["spec", "action"], 1, "spec.action", "expected a string, got an integer"),
    (["spec", "provider"], {"name": "ext"}, "spec.provider", "`provider` must not be with non CUSTOM action"),
    (["spec", "selector"], {"matchLabels": {"app": "x"}}, "spec", "only one of targetRefs or selector can be set"),
    (["spec", "targetRef"], {"kind": "Service", "name": "x"}, "spec", "only one of targetRefs or selector can be set"),
    (["spec", "targetRefs", 0, "namespace"], "other", "spec.targetRefs[0].namespace", "cross namespace referencing is not supported"),
    (["spec", "targetRefs", 0, "kind"], "Deployment", "spec.targetRefs[0]", "targetRef must be to one of"),
    (["spec", "targetRefs", 0, "name"], "", "spec.targetRefs[0].name", "targetRef name must be set"),
    (["spec", "targetRefs", 0, "name"], _DEL, "spec.targetRefs[0].name", "required field missing"),
    (["spec", "targetRefs"], [{"kind": "Service", "name": f"s{i}"} for i in range(17)], "spec.targetRefs", "more than 16"),
    (["spec", "rules"], [{}] * 513, "spec.rules", "more than 512"),
    (["spec", "rules"], "all", "spec.rules", "expected a list, got a string"),
    (["spec", "rulez"], [], "spec.rulez", "unknown field (did you mean 'rules'?)"),
    (["spec"], [], "spec", "expected a mapping, got a list"),
    (["metadata", "name"], 5, "metadata.name", "expected a string, got an integer"),
    (["metadata", "name"], _DEL, "metadata.name", "required field missing"),
    (["metadata", "nmespace"], "x", "metadata.nmespace", "unknown field (did you mean 'namespace'?)"),
    (["metadata", "labels"], {"a": 1}, "metadata.labels[a]", "expected a string, got an integer"),
    (["apiVersion"], "security.istio.io/v1alpha1", "apiVersion", "expected one of security.istio.io/v1"),
    (["kind"], "PeerAuthentication", "kind", "expected 'AuthorizationPolicy'"),
    (["extra"], 1, "extra", "unknown field"),
]


@pytest.mark.parametrize("mutation, value, path, problem", ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_fields_are_rejected_with_a_precise_path(mutation, value, path, problem):
    doc = base()
    _set(doc, mutation, value)
    with pytest.raises(ConfigError) as e:
        parse_authorization_policy(doc, Where("test.yaml"))
    assert e.value.path == path
    assert problem in e.value.problem
    kind = doc["kind"] if isinstance(doc.get("kind"), str) else "AuthorizationPolicy"
    name = "" if path == "metadata.name" else " default/allow-get"
    assert str(e.value).startswith(f"test.yaml: document 1 ({kind}{name}): {path}: ")


def test_the_error_message_names_document_kind_name_and_path():
    doc = base()
    doc["spec"]["rules"][0]["to"][0]["operation"]["methods"] = "GET"
    with pytest.raises(ConfigError) as e:
        parse_authorization_policy(doc, Where("policies.yaml", 3))
    assert str(e.value) == ("policies.yaml: document 3 (AuthorizationPolicy default/allow-get): "
                            "spec.rules[0].to[0].operation.methods: expected a list of strings")


def test_deny_without_rules_is_accepted_with_istios_webhook_warning_and_never_matches():
    from policy.authz.evaluate import AuthzRequest, Enforcement, authorize
    doc = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
           "metadata": {"name": "d", "namespace": "x"}, "spec": {"action": "DENY"}}
    for rules in (None, []):
        if rules is not None:
            doc["spec"]["rules"] = rules
        pol = parse_authorization_policy(doc, Where())
        assert pol.rules == ()
        assert any("DENY action without `rules` is meaningless" in w for w in pol.warnings)
        req = AuthzRequest(source_ip="10.0.0.1", source_principal="cluster.local/ns/x/sa/y",
                           destination_ip="10.0.0.2", destination_port=80)
        for at in Enforcement:
            assert authorize(req, [pol], at).allowed


def test_selector_errors():
    doc = base()
    del doc["spec"]["targetRefs"]
    doc["spec"]["selector"] = {"matchLabels": {"app": "web*"}}
    with pytest.raises(ConfigError, match="wildcard is not supported in selector"):
        parse_authorization_policy(doc, Where())
    doc["spec"]["selector"] = {"matchLabels": {"app": 1}}
    with pytest.raises(ConfigError) as e:
        parse_authorization_policy(doc, Where())
    assert e.value.path == "spec.selector.matchLabels[app]"
    doc["spec"]["selector"] = {"matchLabel": {}}
    with pytest.raises(ConfigError, match="did you mean 'matchLabels'"):
        parse_authorization_policy(doc, Where())


# ---- warnings (valid but surprising) ---------------------------------------------------------------

def test_warnings_for_valid_but_surprising_policies():
    doc = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "w"},
           "spec": {"action": "DENY", "selector": {"matchLabels": {}},
                    "rules": [{"from": [{"source": {"principals": ["spiffe://cluster.local/ns/a/sa/b"]}}]},
                              {"to": [{"operation": {"methods": ["POST"]}}]}]}}
    w = parse_authorization_policy(doc, Where()).warnings
    assert any("starts with spiffe://" in x and "never matches" in x for x in w)
    assert any("workload selector specified without labels" in x for x in w)
    assert any(x.startswith("spec.rules[1]: configured AuthorizationPolicy will deny all traffic to TCP ports") for x in w)
    assert not any(x.startswith("spec.rules[0]: configured") for x in w)


def test_service_entry_target_is_accepted_with_a_warning():
    doc = base()
    doc["spec"]["targetRefs"] = [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "ext"}]
    assert "never attaches" in parse_authorization_policy(doc, Where()).warnings[0]


# ---- ztunnel-format policies -----------------------------------------------------------------------

ZT = """
policies:
- name: allow-client
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals: [{Exact: "cluster.local/ns/default/sa/client"}]
        destinationPorts: [8080]
      - namespaces: [{Prefix: "team-"}, {Presence: []}]
        notServiceAccounts: [{namespace: a, serviceAccount: b}]
        sourceIps: ["10.0.0.0/8"]
        notDestinationIps: ["10.0.0.9/32"]
- name: deny-ext
  namespace: ""
  scope: Global
  action: Deny
  dryRun: true
  rules:
  - - - notSourceIps: ["10.0.0.0/8"]
"""


def zt(i=0):
    return yaml.safe_load(ZT)["policies"][i]


def test_ztunnel_format_policies_map_onto_the_same_model():
    a = parse_ztunnel_policy(zt(0), Where("inv.yaml"), "policies[0]")
    assert (a.key, a.action, a.origin, a.ztunnel_scope, a.dry_run) == ("default/allow-client", "ALLOW", "ztunnel",
                                                                     "WorkloadSelector", False)
    (clause,) = a.rules[0].clauses
    assert len(clause.matches) == 2 and [f.label for f in clause.matches[1].fields] == [
        "namespaces", "serviceAccounts", "sourceIps", "destinationIps"]
    d = parse_ztunnel_policy(zt(1), Where("inv.yaml"), "policies[1]")
    assert (d.key, d.action, d.ztunnel_scope, d.dry_run) == ("/deny-ext", "DENY", "Global", True)


ZT_ERRORS = [
    ("dryRun", _DEL, "policies[3].dryRun", "required field missing"),
    ("dryRun", "false", "policies[3].dryRun", "expected a boolean"),
    ("scope", "Cluster", "policies[3].scope", "expected one of Global, Namespace, WorkloadSelector"),
    ("action", "Audit", "policies[3].action", "expected Allow or Deny"),
    ("selector", {}, "policies[3].selector", "unknown field"),
    ("rules", [[[{"principals": ["x"]}]]], "policies[3].rules[0][0][0].principals[0]", "expected one of {Exact"),
    ("rules", [[[{"principals": [{"Glob": "x"}]}]]], "policies[3].rules[0][0][0].principals[0]", "unknown variant 'Glob'"),
    ("rules", [[[{"principals": [{"Presence": "x"}]}]]], "policies[3].rules[0][0][0].principals[0].Presence", "expected []"),
    ("rules", [[[{"principals": [{"Exact": 1}]}]]], "policies[3].rules[0][0][0].principals[0].Exact", "expected a string"),
    ("rules", [[[{"destinationPorts": ["8080"]}]]], "policies[3].rules[0][0][0].destinationPorts[0]", "expected a port number"),
    ("rules", [[[{"destinationPorts": [True]}]]], "policies[3].rules[0][0][0].destinationPorts[0]", "expected a port number"),
    ("rules", [[[{"destinationPorts": [70000]}]]], "policies[3].rules[0][0][0].destinationPorts[0]", "expected a port number"),
    ("rules", [[[{"sourceIps": ["10.0.0.0/40"]}]]], "policies[3].rules[0][0][0].sourceIps[0]", "bad CIDR range"),
    ("rules", [[[{"serviceAccounts": [{"namespace": "a"}]}]]], "policies[3].rules[0][0][0].serviceAccounts[0].serviceAccount", "required field missing"),
    ("rules", [[[{"source_ips": []}]]], "policies[3].rules[0][0][0].source_ips", "unknown field"),
    ("rules", [[{"a": 1}]], "policies[3].rules[0][0]", "expected a list"),
    ("rules", {"a": 1}, "policies[3].rules", "expected a list"),
]


@pytest.mark.parametrize("key, value, path, problem", ZT_ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(ZT_ERRORS)])
def test_ztunnel_format_errors_name_the_field(key, value, path, problem):
    item = zt(0)
    _set(item, [key], value)
    with pytest.raises(ConfigError) as e:
        parse_ztunnel_policy(item, Where("inv.yaml"), "policies[3]")
    assert e.value.path == path and problem in e.value.problem


# ---- hypothesis: bad input only ever raises ConfigError --------------------------------------------

KEYS = ["apiVersion", "kind", "metadata", "spec", "name", "namespace", "annotations", "labels", "selector",
        "matchLabels", "targetRef", "targetRefs", "group", "action", "provider", "rules", "from", "to", "when",
        "source", "operation", "key", "values", "notValues", "principals", "notPrincipals", "requestPrincipals",
        "namespaces", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "serviceAccounts", "trustDomains", "hosts",
        "ports", "methods", "paths", "notPaths", "scope", "dryRun", "sourceIps", "destinationPorts", "Exact",
        "Presence", "istio.io/dry-run", "x"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2, 70000), st.floats(allow_nan=True),
                    st.sampled_from(["", "*", "ALLOW", "DENY", "AUDIT", "CUSTOM", "10.0.0.0/8", "::1", "8080",
                                     "/a/{**}", "/{*}/b", "request.headers[x]", "request.auth.claims[a][b]",
                                     "source.ip", "destination.port", "Service", "Gateway", "GatewayClass",
                                     "security.istio.io/v1", "AuthorizationPolicy", "true", "Global", "Allow"]),
                    st.text(max_size=8))
JSONISH = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=5)), max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_documents_only_raise_config_error(data):
    doc = mutate(base(), data, JSONISH)
    try:
        parse_authorization_policy(copy.deepcopy(doc), Where("fuzz.yaml"))
    except ConfigError as e:
        assert str(e).startswith("fuzz.yaml: document 1")


@settings(max_examples=300, deadline=None)
@given(JSONISH)
def test_random_documents_only_raise_config_error(doc):
    for parse in (lambda d: parse_authorization_policy(d, Where()),
                  lambda d: parse_ztunnel_policy(d, Where(), "policies[0]")):
        try:
            parse(doc)
        except ConfigError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_ztunnel_policies_only_raise_config_error(data):
    item = zt(0)
    paths = list(leaves(item))
    path = data.draw(st.sampled_from(paths))
    _set(item, list(path), data.draw(JSONISH))
    try:
        parse_ztunnel_policy(item, Where(), "policies[0]")
    except ConfigError:
        pass
