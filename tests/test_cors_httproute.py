"""The Gateway API HTTPRoute ``CORS`` filter (HTTPCORSFilter, GEP-1767) enforced at the waypoint as istiod
translates it (conversion.go ``createCorsFilter``, into the VirtualService corsPolicy Envoy's CORS filter
runs): the parser (the CRD's validation and defaults, errors naming the field), the route table (the policy
on forwarding, redirect and no-backend rules) and the real waypoint (tests/waypoint_harness.py)."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from policy.errors import ConfigError, Where
from policy.routing import cors
from policy.routing.parse import parse_http_route
from tests.waypoint_harness import start_harness

W = Where("routes.yaml", 2)
ROUTE_HEAD = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
"""


def _route(filters: str, rest: str = "backendRefs: [{name: reviews, port: 9080}]") -> dict:
    return yaml.safe_load(ROUTE_HEAD + f"  - filters: {filters}\n    {rest}\n")


def _policy(cors_yaml: str):
    rule = parse_http_route(_route(f"[{{type: CORS, cors: {cors_yaml}}}]"), W).rules[0]
    assert rule.headers.cors is not None
    return rule.headers.cors


def _allowed(policy, origin: str) -> bool:
    return cors.origin_allowed(policy, origin)


# ---------------------------------------------------------------------------------------------
# Parsing: the CRD's rules, istiod's translation


def test_translation_as_istiod_hands_it_to_envoy():
    p = _policy("""{allowOrigins: ["https://app.example", "http://localhost:8080"], allowMethods: [GET, DELETE],
                 allowHeaders: [X-Token, content-type], exposeHeaders: [x-total], maxAge: 600,
                 allowCredentials: true}""")
    assert [(m.kind, m.value) for m in p.allow_origins] == [
        ("exact", "https://app.example"), ("exact", "http://localhost:8080")]
    # Lists joined with "," (TranslateCORSPolicy); maxAge in whole seconds.
    assert (p.allow_methods, p.allow_headers, p.expose_headers, p.max_age) == (
        "GET,DELETE", "X-Token,content-type", "x-total", "600")
    assert p.allow_credentials is True
    # Current istiod (istio/istio#59018): "Disable forwarding unmatched preflights" (IGNORE).
    assert p.forward_unmatched_preflights is False
    assert _allowed(p, "https://app.example") and not _allowed(p, "https://app.example:443")
    assert not _allowed(p, "http://app.example") and not _allowed(p, "https://app.example.evil")


def test_defaults_max_age_5_and_no_credentials():
    p = _policy("{}")
    assert (p.allow_origins, p.allow_methods, p.allow_headers, p.expose_headers) == ((), "", "", "")
    assert p.max_age == "5"   # the CRD: "+kubebuilder:default=5"
    assert p.allow_credentials is False and p.forward_unmatched_preflights is False
    assert _policy("{allowCredentials: false}").allow_credentials is False
    assert not _allowed(p, "https://app.example")   # no origins: nothing is allowed


def test_wildcard_origins_match_dns_labels_to_the_left():
    """istio/istio#58729: before #59018 istiod made ``https://*.example.com`` an exact match, so it never
    matched; now a ``*`` in the host stands for one or more DNS labels, the rest literal."""
    p = _policy('{allowOrigins: ["https://*.example.com", "http://*.dev.test:3000"]}')
    assert [m.kind for m in p.allow_origins] == ["regex", "regex"]
    for origin in ("https://a.example.com", "https://a.b-c.example.com", "http://x.dev.test:3000"):
        assert _allowed(p, origin), origin
    for origin in ("https://example.com", "https://.example.com", "https://a.example.com.evil",
                   "https://aexample.com", "http://a.example.com", "https://a.example.com:8443",
                   "https://a/b.example.com", "https://a.example.com/", "http://x.dev.test:30001",
                   "http://x.dev.test", "*", "https://a example.com"):
        assert not _allowed(p, origin), origin


def test_star_alone_allows_any_well_formed_origin():
    """#59026: for ``*``, "Use strict regex that only matches valid origin formats per RFC 6454 /
    Format: <scheme>://<host>(:<port>)?" — never the literal ``*`` (which Envoy would take as allow-all
    for any origin, even a malformed one)."""
    p = _policy('{allowOrigins: ["*"], allowMethods: ["*"], allowHeaders: ["*"], allowCredentials: true}')
    for origin in ("https://a.example", "http://localhost:8080", "http://[::1]:3000", "chrome-extension://abc"):
        assert _allowed(p, origin), origin
    for origin in ("null", "https://a.example/path", "https://a.example?q", "https://a b", "a.example", "*"):
        assert not _allowed(p, origin), origin
    # "*" methods / headers: Envoy echoes the preflight's (the CRD's rule with credentials too).
    answer = cors.decide(p, b"OPTIONS", [(b"origin", b"https://a.example"),
                                         (b"access-control-request-method", b"PATCH"),
                                         (b"access-control-request-headers", b"x-a,x-b")])
    assert answer.kind == cors.PREFLIGHT
    assert dict(answer.headers) == {b"access-control-allow-origin": b"https://a.example",
                                    b"access-control-allow-credentials": b"true",
                                    b"access-control-allow-methods": b"PATCH",
                                    b"access-control-allow-headers": b"x-a,x-b",
                                    b"access-control-max-age": b"5"}


def test_unmatched_preflight_is_answered_without_allow_origin():
    p = _policy('{allowOrigins: ["https://app.example"], allowMethods: [GET]}')
    answer = cors.decide(p, b"OPTIONS", [(b"origin", b"https://evil.example"),
                                         (b"access-control-request-method", b"GET")])
    assert answer.kind == cors.PREFLIGHT
    assert b"access-control-allow-origin" not in dict(answer.headers)


def test_policy_rides_to_the_rule_with_other_filters_and_redirects():
    rule = parse_http_route(_route("""[{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-a, value: "1"}]}},
                                      {type: CORS, cors: {allowOrigins: ["https://app.example"]}}]"""), W).rules[0]
    assert rule.headers.response.set == (("x-a", "1"),) and rule.headers.cors.max_age == "5"
    rule = parse_http_route(_route("""[{type: RequestRedirect, requestRedirect: {hostname: r.example}},
                                      {type: CORS, cors: {allowOrigins: ["https://app.example"]}}]""", "name: redirect"), W).rules[0]
    assert rule.redirect is not None and rule.headers.cors is not None
    # No CORS filter: no policy (the common request pays nothing).
    rule = parse_http_route(_route("[]"), W).rules[0]
    assert rule.headers.cors is None
    assert parse_http_route(_route("[{type: CORS, cors: {}}]"), W).warnings == ()


F = "spec.rules[0].filters[0]"


@pytest.mark.parametrize("cors_yaml, path, problem", [
    ("{allowOrigins: ['*', 'https://a.example']}", f"{F}.cors.allowOrigins", "cannot contain '*' alongside"),
    ("{allowOrigins: [https://a.example, https://a.example]}", f"{F}.cors.allowOrigins[1]", "duplicate value"),
    ("{allowOrigins: [a.example]}", f"{F}.cors.allowOrigins[0]", "<scheme>://<host>"),
    ("{allowOrigins: ['https://a.example/']}", f"{F}.cors.allowOrigins[0]", "without a path"),
    ("{allowOrigins: ['https://a.example:123456']}", f"{F}.cors.allowOrigins[0]", "<scheme>://<host>"),
    ("{allowOrigins: ['https://*.example.com?x']}", f"{F}.cors.allowOrigins[0]", "<scheme>://<host>"),
    ("{allowOrigins: ['1http://a.example']}", f"{F}.cors.allowOrigins[0]", "<scheme>://<host>"),
    ("{allowOrigins: ['']}", f"{F}.cors.allowOrigins[0]", "non-empty string"),
    ("{allowOrigins: [{exact: https://a.example}]}", f"{F}.cors.allowOrigins[0]", "non-empty string"),
    ("{allowOrigins: https://a.example}", f"{F}.cors.allowOrigins", "expected a list"),
    ("{allowOrigins: [" + ", ".join(f"'https://a{i}.example'" for i in range(65)) + "]}",
     f"{F}.cors.allowOrigins", "at most 64 items"),
    ("{allowMethods: [GET, FETCH]}", f"{F}.cors.allowMethods[1]", "'FETCH' is not one of"),
    ("{allowMethods: [get]}", f"{F}.cors.allowMethods[0]", "is not one of"),
    ("{allowMethods: ['*', GET]}", f"{F}.cors.allowMethods", "cannot contain '*' alongside"),
    ("{allowMethods: [GET, GET]}", f"{F}.cors.allowMethods[1]", "duplicate value"),
    ("{allowHeaders: [x-a, 'x b']}", f"{F}.cors.allowHeaders[1]", "not a valid header name (character ' ')"),
    ("{allowHeaders: [x-a, x-a]}", f"{F}.cors.allowHeaders[1]", "duplicate value"),
    ("{allowHeaders: [" + "x" * 257 + "]}", f"{F}.cors.allowHeaders[0]", "longer than 256"),
    ("{allowHeaders: [" + ", ".join(f"x-{i}" for i in range(65)) + "]}", f"{F}.cors.allowHeaders", "at most 64"),
    ("{exposeHeaders: ['x-a\\r\\nx: y']}", f"{F}.cors.exposeHeaders[0]", "not a valid header name"),
    ("{exposeHeaders: ['']}", f"{F}.cors.exposeHeaders[0]", "non-empty string"),
    ("{maxAge: 0}", f"{F}.cors.maxAge", "expected an integer 1..2147483647"),
    ("{maxAge: 2147483648}", f"{F}.cors.maxAge", "expected an integer 1.."),
    ("{maxAge: 10s}", f"{F}.cors.maxAge", "expected an integer"),
    ("{maxAge: true}", f"{F}.cors.maxAge", "expected an integer"),
    ("{allowCredentials: 'yes'}", f"{F}.cors.allowCredentials", "expected true or false"),
    ("{allowOrigin: ['https://a.example']}", f"{F}.cors.allowOrigin", "unknown field"),
    ("{unmatchedPreflights: IGNORE}", f"{F}.cors.unmatchedPreflights", "unknown field"),
    ("[https://a.example]", f"{F}.cors", "expected a mapping"),
])
def test_parse_errors_name_the_field(cors_yaml, path, problem):
    with pytest.raises(ConfigError) as e:
        parse_http_route(_route(f"[{{type: CORS, cors: {cors_yaml}}}]"), W)
    assert e.value.path == path, str(e.value)
    assert problem in str(e.value)
    assert str(e.value).startswith("routes.yaml") and "reviews" in str(e.value), str(e.value)


@pytest.mark.parametrize("filters, rest, path, problem", [
    ("[{type: CORS}]", "backendRefs: []", f"{F}.cors", "required for this filter type"),
    ("[{type: CORS, cors: {}}, {type: CORS, cors: {}}]", "backendRefs: []", "spec.rules[0].filters[1]",
     "CORS may appear only once"),
    ("[]", "backendRefs: [{name: reviews, port: 9080, filters: [{type: CORS, cors: {}}]}]",
     "spec.rules[0].backendRefs[0].filters[0]", "not allowed on a backendRef"),
])
def test_filter_placement_errors(filters, rest, path, problem):
    with pytest.raises(ConfigError) as e:
        parse_http_route(_route(filters, rest), W)
    assert e.value.path == path, str(e.value)
    assert problem in str(e.value)


_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**32) | st.text(max_size=8)
                       | st.sampled_from(["GET", "*", "x-a", "https://a.example", "https://*.b.example",
                                          "http://*", "https://*.*.c:1", "https://[::1]:8", "h://\\*"]),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(["allowOrigins", "x"]), inner, max_size=2),
                       max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["allowOrigins", "allowMethods", "allowHeaders", "exposeHeaders", "maxAge",
                                        "allowCredentials", "other"]), _values, max_size=4),
       st.lists(st.text(max_size=12), max_size=3))
def test_any_cors_filter_parses_or_fails_with_a_config_error(body, origins):
    doc = _route("[{type: CORS, cors: {}}]")
    doc["spec"]["rules"][0]["filters"][0]["cors"] = body
    for origin in origins:
        body = {**body, "allowOrigins": [origin]} if isinstance(body, dict) else body
        doc["spec"]["rules"][0]["filters"][0]["cors"] = body
    try:
        rule = parse_http_route(doc, W).rules[0]
    except ConfigError as e:
        assert e.path.startswith(F), str(e)
        return
    policy = rule.headers.cors
    for origin in origins + ["https://a.example", "*"]:
        cors.origin_allowed(policy, origin)   # any compiled origin matcher runs on any input


# ---------------------------------------------------------------------------------------------
# Through a real waypoint

ROUTING = ROUTE_HEAD + """  - matches: [{path: {type: PathPrefix, value: /moved}}]
    filters:
    - {type: RequestRedirect, requestRedirect: {hostname: reviews.example, statusCode: 301}}
    - {type: CORS, cors: {allowOrigins: ["https://app.example"], exposeHeaders: [location]}}
  - matches: [{path: {type: PathPrefix, value: /nobackend}}]
    filters: [{type: CORS, cors: {allowOrigins: ["https://app.example"]}}]
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://app.example", "https://*.apps.example"]
        allowMethods: [GET, DELETE]
        allowHeaders: [x-token]
        exposeHeaders: [x-version]
        allowCredentials: true
        maxAge: 600
    backendRefs: [{name: reviews, port: 9080}]
"""

APP = [(b"origin", b"https://app.example")]


def _no_cors(hdrs: dict) -> bool:
    return not any(k.startswith("access-control-") for k in hdrs)


async def test_cors_filter_through_the_waypoint(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=ROUTING)
    client = h.client()
    try:
        # A preflight from an allowed origin: answered by the waypoint's CORS filter, no pod sees it.
        status, hdrs, body = await client.fetch("/headers", b"OPTIONS", APP + [
            (b"access-control-request-method", b"DELETE"), (b"access-control-request-headers", b"x-token")])
        assert (status, body) == (200, b"")
        assert (hdrs["access-control-allow-origin"], hdrs["access-control-allow-credentials"],
                hdrs["access-control-allow-methods"], hdrs["access-control-allow-headers"],
                hdrs["access-control-max-age"]) == ("https://app.example", "true", "GET,DELETE", "x-token", "600")
        assert "access-control-expose-headers" not in hdrs   # (actual answers only)
        # A preflight from another origin: not forwarded either (IGNORE), answered without allow-origin.
        status, hdrs, body = await client.fetch("/headers", b"OPTIONS", [
            (b"origin", b"https://evil.example"), (b"access-control-request-method", b"DELETE")])
        assert (status, body) == (200, b"") and "access-control-allow-origin" not in hdrs
        # An actual request from an origin the wildcard allows: the pod answers, with the filter's headers.
        status, hdrs, body = await client.fetch("/headers", b"GET", [(b"origin", b"https://ui.apps.example")])
        assert status == 200 and json.loads(body)["origin"] == "https://ui.apps.example"
        assert (hdrs["access-control-allow-origin"], hdrs["access-control-allow-credentials"],
                hdrs["access-control-expose-headers"]) == ("https://ui.apps.example", "true", "x-version")
        # Another origin: the pod's answer untouched.
        status, hdrs, body = await client.fetch("/headers", b"GET", [(b"origin", b"https://apps.example")])
        assert status == 200 and json.loads(body)["origin"] == "https://apps.example" and _no_cors(hdrs)
        # A redirect rule with CORS: the redirect (no scheme given: the port is the listener's, Gateway API),
        # with the filter's headers; its preflight the filter's.
        status, hdrs, _ = await client.fetch("/moved", b"GET", APP)
        assert status == 301 and hdrs["location"] == "http://reviews.example:9080/moved"
        assert (hdrs["access-control-allow-origin"], hdrs["access-control-expose-headers"]) == (
            "https://app.example", "location")
        assert "access-control-allow-credentials" not in hdrs
        status, hdrs, body = await client.fetch("/moved", b"OPTIONS", APP + [(b"access-control-request-method", b"GET")])
        assert (status, body, hdrs["access-control-max-age"]) == (200, b"", "5")   # the CRD's default
        status, hdrs, _ = await client.fetch("/moved", b"GET", [(b"origin", b"https://evil.example")])
        assert status == 301 and _no_cors(hdrs)
        # A rule without backends answers 500 (Gateway API), with the rule's CORS headers too.
        status, hdrs, _ = await client.fetch("/nobackend", b"GET", APP)
        assert status == 500 and hdrs["access-control-allow-origin"] == "https://app.example"
        lines = await h.http_lines(8)
        assert [(x["method"], x["path"], x["status"], x.get("response_code_details", ""), bool(x.get("upstream_host")))
                for x in lines] == [
            ("OPTIONS", "/headers", 200, "cors_response", False),
            ("OPTIONS", "/headers", 200, "cors_response", False),
            ("GET", "/headers", 200, "", True),
            ("GET", "/headers", 200, "", True),
            ("GET", "/moved", 301, "", False),
            ("OPTIONS", "/moved", 200, "cors_response", False),
            ("GET", "/moved", 301, "", False),
            ("GET", "/nobackend", 500, "", False),
        ]
    finally:
        await h.close()
