"""Reading RequestAuthentication documents (policy.authn.parse): Istio's own examples, every refused field
named in the error, and junk that only ever yields ConfigError."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy.authn import jwt_rules_for_waypoint, parse_request_authentication
from policy.authn.authenticate import JwtRuleSet, authenticate
from policy.authn.parse import MAX_JWT_RULES
from policy.errors import ConfigError, Where
from tests.test_authn_verify import NOW, Issuer

WHERE = Where("ra.yaml", 3)
ISS = Issuer("testing@secure.istio.io", kid="DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ", jwk_alg=False)


def parse(doc):
    return parse_request_authentication(doc, WHERE)


def parse_yaml(text: str):
    return parse(yaml.safe_load(text))


# ---- Istio's examples ---------------------------------------------------------------------------------

# istio/api security/v1beta1/request_authentication.proto, first example (a sidecar policy: selector).
PROTO_EXAMPLE = """
apiVersion: security.istio.io/v1beta1
kind: RequestAuthentication
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  jwtRules:
  - issuer: "issuer-foo"
    jwksUri: https://example.com/.well-known/jwks.json
"""

# istio.io ambient L7 docs: the same rule bound to a waypoint with targetRefs.
WAYPOINT_EXAMPLE = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: httpbin
  namespace: default
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint
  jwtRules:
  - issuer: "testing@secure.istio.io"
    jwksUri: "https://raw.githubusercontent.com/istio/istio/master/security/tools/jwt/samples/jwks.json"
"""


def inline_example() -> str:
    # istio/api jwt.proto's `jwks` example shape (a YAML block holding the key set), with our own key.
    key = ISS.jwk()
    return f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: jwt-example
  namespace: default
spec:
  targetRefs:
  - kind: Service
    group: ""
    name: httpbin
  jwtRules:
  - issuer: "testing@secure.istio.io"
    jwks: |
      {{ "keys":
        [
          {{
            "e":"{key['e']}",
            "kid":"{key['kid']}",
            "kty":"RSA",
            "n":"{key['n']}"
          }}
        ]
      }}
    forwardOriginalToken: true
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders:
    - header: "x-jwt-iss"
      claim: "iss"
    - header: "x-jwt-nested-claim"
      claim: "nested.nested-2.key2"
"""


def test_the_proto_example_loads_with_honest_warnings():
    ra = parse_yaml(PROTO_EXAMPLE)
    assert (ra.namespace, ra.name, dict(ra.selector)) == ("foo", "httpbin", {"app": "httpbin"})
    (rule,) = ra.jwt_rules
    assert rule.issuer == "issuer-foo" and rule.jwks.fake and rule.jwks_uri.endswith("jwks.json")
    assert any("comes from the network" in w and "fake key set" in w for w in ra.warnings)
    assert any("applies to no waypoint" in w for w in ra.warnings)
    # Selector policies never reach a waypoint.
    assert not jwt_rules_for_waypoint([ra], gateway=("foo", "waypoint"), services=[("foo", "httpbin")])


def test_the_waypoint_example_attaches_and_rejects_tokens_until_keys_are_inline():
    ra = parse_yaml(WAYPOINT_EXAMPLE)
    assert [str(r) for r in ra.target_refs] == ["gateway.networking.k8s.io/Gateway/waypoint"]
    assert [w for w in ra.warnings if "applies to no waypoint" in w] == []
    rules = jwt_rules_for_waypoint([ra], gateway=("default", "waypoint"))
    r = authenticate(rules, [(b"authorization", b"Bearer " + ISS.mint().encode())], b"/headers", now=NOW)
    assert (r.status, r.body) == (401, "Jwks doesn't have key to match kid or alg from Jwt")
    assert authenticate(rules, [], b"/headers", now=NOW).allowed


def test_the_inline_jwks_example_validates_real_tokens():
    ra = parse_yaml(inline_example())
    assert ra.warnings == ()
    rules = jwt_rules_for_waypoint([ra], gateway=None, services=[("default", "httpbin")])
    token = ISS.mint({"nested": {"nested-2": {"key2": "value2"}}})
    r = authenticate(rules, [(b"authorization", b"Bearer " + token.encode())], b"/headers", now=NOW)
    assert r.allowed and r.principal == "testing@secure.istio.io/alice"
    assert dict(r.add)[b"x-jwt-nested-claim"] == b"value2"
    assert dict(r.add)[b"x-jwt-iss"] == b"testing@secure.istio.io"
    assert b"authorization" not in r.remove   # forwardOriginalToken: true


def test_multi_document_yaml_and_v1beta1():
    docs = list(yaml.safe_load_all(PROTO_EXAMPLE + "---\n" + WAYPOINT_EXAMPLE))
    assert [parse(d).key for d in docs] == ["foo/httpbin", "default/httpbin"]


# ---- every refusal names its field -----------------------------------------------------------------

def base() -> dict:
    return {
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "default"},
        "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
                 "jwtRules": [{"issuer": "iss", "jwks": ISS.jwks()}]},
    }


def _set(path: str, value):
    def mutate(doc):
        keys = path.split(".")
        target = doc
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        if value is KeyError:
            del target[keys[-1]]
        elif isinstance(target, list):
            target[int(keys[-1])] = value
        else:
            target[keys[-1]] = value
    return mutate


R = "spec.jwtRules.0"
CASES = [
    ("apiVersion", "security.istio.io/v1alpha1", "apiVersion", "expected one of security.istio.io/v1"),
    ("kind", "AuthorizationPolicy", "kind", "expected 'RequestAuthentication'"),
    ("extra", 1, "extra", "unknown field"),
    ("metadata.name", KeyError, "metadata.name", "required field missing"),
    ("metadata.name", "", "metadata.name", "must not be empty"),
    ("metadata.namespace", 5, "metadata.namespace", "expected a string"),
    ("metadata.uid2", "x", "metadata.uid2", "unknown field"),
    ("spec.jwtRule", [], "spec.jwtRule", "unknown field (did you mean 'jwtRules'?)"),
    ("spec.jwtRules", {}, "spec.jwtRules", "expected a list"),
    ("spec.selector", {"matchLabels": {"app": "x"}}, "spec", "only one of targetRefs or selector can be set"),
    ("spec.selector", {"matchLabels": {"app": "*"}}, "spec.selector.matchLabels[app]", "wildcard"),
    ("spec.targetRefs.0.kind", "Deployment", "spec.targetRefs[0]", "targetRef must be to one of"),
    ("spec.targetRefs.0.namespace", "other", "spec.targetRefs[0].namespace", "cross namespace"),
    ("spec.targetRefs.0.name", "", "spec.targetRefs[0].name", "targetRef name must be set"),
    ("spec.targetRefs.0.name", KeyError, "spec.targetRefs[0].name", "required field missing"),
    ("spec.targetRefs", [{"kind": "Service", "name": "s"}] * 17, "spec.targetRefs", "more than 16 items"),
    (f"{R}.issuer", "", "spec.jwtRules[0]", "issuer or jwksUri must be non-empty string"),
    (f"{R}.issuer", 42, "spec.jwtRules[0].issuer", "expected a string"),
    (f"{R}.issue", "x", "spec.jwtRules[0].issue", "unknown field (did you mean 'issuer'?)"),
    (f"{R}.audiences", ["a", ""], "spec.jwtRules[0].audiences[1]", "audience must be non-empty string"),
    (f"{R}.audiences", "a", "spec.jwtRules[0].audiences", "expected a list"),
    (f"{R}.jwks", "{not json", "spec.jwtRules[0].jwks", "jwks parse error: Jwks is an invalid JSON"),
    (f"{R}.jwks", '{"keys":[{"kty":"RSA","e":"AQAB"}]}', "spec.jwtRules[0].jwks",
     "jwks parse error: keys[0]: [n] field is missing for a RSA key"),
    (f"{R}.jwksUri", "ftp://keys.example.com/jwks", "spec.jwtRules[0].jwksUri", "scheme must be http or https"),
    (f"{R}.jwksUri", "https:///jwks", "spec.jwtRules[0].jwksUri", "missing host"),
    (f"{R}.jwksUri", "https://h:99999/jwks", "spec.jwtRules[0].jwksUri", "invalid jwks uri"),
    (f"{R}.fromHeaders", [{"prefix": "Bearer "}], "spec.jwtRules[0].fromHeaders[0].name",
     "location header name must be non-empty string"),
    (f"{R}.fromHeaders", [None], "spec.jwtRules[0].fromHeaders[0]", "location header name must be non-null"),
    (f"{R}.fromHeaders", [{"name": "bad header"}], "spec.jwtRules[0].fromHeaders[0].name", "invalid header name"),
    (f"{R}.fromHeaders", [{"name": "x", "prefx": "y"}], "spec.jwtRules[0].fromHeaders[0].prefx", "unknown field"),
    (f"{R}.fromParams", [""], "spec.jwtRules[0].fromParams[0]", "location query must be non-empty string"),
    (f"{R}.fromCookies", ["ok", ""], "spec.jwtRules[0].fromCookies[1]", "cookie name must be non-empty string"),
    (f"{R}.outputPayloadToHeader", "x y", "spec.jwtRules[0].outputPayloadToHeader", "invalid header name"),
    (f"{R}.forwardOriginalToken", "yes", "spec.jwtRules[0].forwardOriginalToken", "expected a boolean"),
    (f"{R}.outputClaimToHeaders", [{"header": "x-a"}], "spec.jwtRules[0].outputClaimToHeaders[0]",
     "outputClaimToHeaders header and claim value must be non-empty string"),
    (f"{R}.outputClaimToHeaders", [None], "spec.jwtRules[0].outputClaimToHeaders[0]", "must not be null"),
    (f"{R}.outputClaimToHeaders", [{"header": "x:a", "claim": "c"}], "spec.jwtRules[0].outputClaimToHeaders[0].header",
     "invalid header name"),
    (f"{R}.outputClaimToHeaders", [{"header": "x-a", "claim": "." * 100}],
     "spec.jwtRules[0].outputClaimToHeaders[0].claim", "more than 100 nested names"),
    (f"{R}.timeout", "5", "spec.jwtRules[0].timeout", "invalid duration"),
    (f"{R}.timeout", "100us", "spec.jwtRules[0].timeout", "duration must be at least 1ms"),
    (f"{R}.spaceDelimitedClaims", [""], "spec.jwtRules[0].spaceDelimitedClaims[0]", "must be non-empty"),
]


@pytest.mark.parametrize("path,value,where,problem", CASES, ids=[f"{c[0]}={str(c[1])[:20]}" for c in CASES])
def test_each_refusal_names_file_document_resource_and_field(path, value, where, problem):
    doc = base()
    _set(path, value)(doc)
    with pytest.raises(ConfigError) as err:
        parse(doc)
    assert err.value.path == where
    assert problem in err.value.problem
    message = str(err.value)
    resource = "RequestAuthentication" if path == "metadata.name" else "RequestAuthentication default/jwt"
    assert message == f"ra.yaml: document 3 ({resource}): {where}: {err.value.problem}"


def test_rule_count_is_bounded():
    doc = base()
    doc["spec"]["jwtRules"] = [{"issuer": "i", "jwks": ISS.jwks()}] * (MAX_JWT_RULES + 1)
    with pytest.raises(ConfigError, match="more than 4096 items"):
        parse(doc)


def test_accepted_values_and_defaults():
    doc = base()
    doc["spec"]["jwtRules"][0].update({
        "audiences": ["a"], "timeout": "1m30s", "fromHeaders": [{"name": "X-Token", "prefix": "Tok "}],
        "fromParams": ["t"], "fromCookies": ["c"], "outputPayloadToHeader": "X-Payload",
        "spaceDelimitedClaims": ["roles", "scope"], "forwardOriginalToken": True,
    })
    doc["spec"]["targetRef"] = doc["spec"].pop("targetRefs")[0]   # the legacy single form
    doc["metadata"]["annotations"] = {"note": "x"}
    ra = parse(doc)
    (rule,) = ra.jwt_rules
    assert rule.timeout_s == 90.0 and rule.audiences == ("a",)
    assert (rule.from_headers[0].name, rule.from_headers[0].prefix) == ("x-token", "Tok ")
    assert rule.output_payload_to_header == "x-payload"
    assert rule.space_delimited_claims == ("permission", "roles", "scope")
    assert len(ra.target_refs) == 1 and ra.warnings == ()
    assert parse(base()).jwt_rules[0].timeout_s == 5.0
    empty = base()
    empty["spec"]["jwtRules"] = []
    assert parse(empty).jwt_rules == ()
    assert not JwtRuleSet.of(())


def test_service_entry_target_warns():
    doc = base()
    doc["spec"]["targetRefs"] = [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "se"}]
    assert any("ServiceEntry" in w for w in parse(doc).warnings)


# ---- junk --------------------------------------------------------------------------------------------

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=8), c, max_size=3)),
    max_leaves=12)
_paths = st.sampled_from([
    "", "metadata", "spec", "spec.jwtRules", "spec.jwtRules.0", "spec.jwtRules.0.fromHeaders",
    "spec.targetRefs", "spec.targetRefs.0", "spec.jwtRules.0.fromHeaders.0",
])
_keys = st.sampled_from(["issuer", "audiences", "jwks", "jwksUri", "fromHeaders", "fromParams", "fromCookies",
                         "outputPayloadToHeader", "outputClaimToHeaders", "timeout", "name", "kind", "group",
                         "matchLabels", "prefix", "header", "claim", "forwardOriginalToken", "junk", "0"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_paths, _keys, _json)
def test_junk_documents_only_raise_config_error(path, key, value):
    doc = base()
    doc["spec"]["jwtRules"][0]["fromHeaders"] = [{"name": "x"}]
    target = doc
    for k in filter(None, path.split(".")):
        target = target[int(k)] if isinstance(target, list) else target[k]
    if isinstance(target, list):
        target.append(value)
    else:
        target[key] = value
    try:
        ra = parse(copy.deepcopy(doc))
    except ConfigError as err:
        assert str(err).startswith("ra.yaml: document 3 (RequestAuthentication")
        return
    assert ra.name == doc["metadata"]["name"] and len(ra.jwt_rules) >= 1   # (junk may be a valid new name)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_junk_whole_documents_only_raise_config_error(value):
    try:
        parse(value)
    except ConfigError:
        pass


def test_yaml_byte_by_byte_prefixes_only_raise_config_error():
    # A document cut anywhere (as a truncated file would be): YAML may fail to load, but whatever does load
    # gives a policy or a ConfigError — nothing else.
    text = inline_example()
    for i in range(0, len(text), 7):
        try:
            doc = yaml.safe_load(text[:i])
        except yaml.YAMLError:
            continue
        try:
            parse(doc)
        except ConfigError:
            pass


def test_jwks_json_with_trailing_data_is_refused():
    doc = base()
    doc["spec"]["jwtRules"][0]["jwks"] = ISS.jwks() + " {}"
    with pytest.raises(ConfigError, match="Jwks is an invalid JSON"):
        parse(doc)
    doc["spec"]["jwtRules"][0]["jwks"] = json.dumps({"keys": [ISS.jwk()]}, indent=2) + "\n"
    assert parse(doc).jwt_rules[0].jwks.keys
