"""VirtualService ``corsPolicy`` enforced at the waypoint as Envoy's CORS filter does under Istio: the parser
(istiod's validation and translation, errors naming the field), the pure decision
(``policy/routing/cors.py``: Envoy's ``cors_filter.cc`` decodeHeaders / encodeHeaders), and the real
waypoint (tests/waypoint_harness.py: our CA, HBONE tunnels, reviews pods whose ``/headers`` echoes the
request headers and whose access-log lines say which requests reached a pod)."""

from __future__ import annotations

import json
import string

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from policy.errors import ConfigError, Where
from policy.routing import cors
from policy.routing.model import DEFAULT_RETRY_POLICY, CorsPolicy, StringMatch
from policy.routing.parse import parse_destination_rule, parse_virtual_service
from policy.routing.regex import compile_regex
from proxy.pipeline.http import HttpPipeline, Upstream
from tests.test_waypoint_l7 import RawH2
from tests.waypoint_harness import REVIEWS_VIP, config_docs, destination_rule, start_harness, virtual_service

W = Where("cors.yaml")


def _vs(cors_yaml: str, action: str = "route: [{destination: {host: reviews}}]") -> dict:
    return yaml.safe_load(virtual_service("reviews", f"- {action}\n  corsPolicy: {cors_yaml}"))


def _policy(cors_yaml: str) -> CorsPolicy:
    rule = parse_virtual_service(_vs(cors_yaml), W).http[0]
    assert rule.headers.cors is not None
    return rule.headers.cors


# ---------------------------------------------------------------------------------------------
# Parsing: istiod's validateCORSPolicy and TranslateCORSPolicy


def test_translation_as_istiod_hands_it_to_envoy():
    p = _policy("""{allowOrigins: [{exact: "https://a.example"}, {prefix: "https://b."}, {regex: "https://.*[.]c[.]example"}],
                 allowMethods: [GET, POST], allowHeaders: [content-type, x-grpc-web], exposeHeaders: [x-a, x-b],
                 maxAge: 24h, allowCredentials: true}""")
    assert [(m.kind, m.value) for m in p.allow_origins] == [
        ("exact", "https://a.example"), ("prefix", "https://b."), ("regex", "https://.*[.]c[.]example")]
    # strings.Join(..., ","); maxAge as whole seconds (strconv.FormatInt(GetSeconds())).
    assert (p.allow_methods, p.allow_headers, p.expose_headers, p.max_age) == (
        "GET,POST", "content-type,x-grpc-web", "x-a,x-b", "86400")
    assert p.allow_credentials is True and p.forward_unmatched_preflights is True


def test_defaults_deprecated_allow_origin_and_unmatched_preflights():
    p = _policy("{allowOrigin: [https://a.example, '*']}")
    assert [(m.kind, m.value) for m in p.allow_origins] == [("exact", "https://a.example"), ("exact", "*")]
    assert (p.allow_methods, p.allow_headers, p.expose_headers, p.max_age, p.allow_credentials) == ("", "", "", "", False)
    assert _policy("{unmatchedPreflights: FORWARD}").forward_unmatched_preflights is True
    assert _policy("{unmatchedPreflights: UNSPECIFIED}").forward_unmatched_preflights is True
    assert _policy("{unmatchedPreflights: IGNORE}").forward_unmatched_preflights is False
    assert _policy("{allowCredentials: false}").allow_credentials is False
    assert _policy("{maxAge: 90s}").max_age == "90"


def test_allow_origins_wins_over_the_deprecated_field_with_a_warning():
    vs = parse_virtual_service(_vs("{allowOrigins: [{exact: a}], allowOrigin: [b]}"), W)
    assert [m.value for m in vs.http[0].headers.cors.allow_origins] == ["a"]
    assert any("corsPolicy.allowOrigin" in w and "ignored" in w for w in vs.warnings)


def test_no_warning_on_a_route_rule_and_rule_headers_kept():
    vs = parse_virtual_service(_vs("{allowOrigins: [{exact: a}]}\n  headers: {response: {set: {x-s: t}}}"), W)
    rule = vs.http[0]
    assert not vs.warnings
    assert rule.headers.response.set == (("x-s", "t"),) and rule.headers.cors.allow_origins[0].value == "a"


@pytest.mark.parametrize("action", ["redirect: {uri: /x}", "directResponse: {status: 204}"])
def test_a_redirect_or_direct_response_rule_keeps_its_cors_policy(action):
    """Envoy's CORS filter runs before the router on every route (tests/test_cors_local_answers.py)."""
    vs = parse_virtual_service(_vs("{allowOrigins: [{exact: a}]}", action=action), W)
    assert vs.http[0].headers.cors.allow_origins[0].value == "a"
    assert not vs.warnings


@pytest.mark.parametrize("cors_yaml, path, problem", [
    ("[]", "spec.http[0].corsPolicy", "expected a mapping"),
    ("{allowOrigins: [{exact: a}], bogus: 1}", "spec.http[0].corsPolicy.bogus", "unknown field"),
    ("{allowOrigins: {exact: a}}", "spec.http[0].corsPolicy.allowOrigins", "expected a list"),
    ("{allowOrigins: [{exact: a}, {}]}", "spec.http[0].corsPolicy.allowOrigins[1]", "empty origin"),
    ("{allowOrigins: [{exact: ''}]}", "spec.http[0].corsPolicy.allowOrigins[0]", "empty origin"),
    ("{allowOrigins: [{prefix: ''}]}", "spec.http[0].corsPolicy.allowOrigins[0]", "empty origin"),
    ("{allowOrigins: [{regex: ''}]}", "spec.http[0].corsPolicy.allowOrigins[0].regex", "should not be empty"),
    ("{allowOrigins: [{regex: '(a'}]}", "spec.http[0].corsPolicy.allowOrigins[0].regex", "invalid regular expression"),
    ("{allowOrigins: [{regex: 'a(?=b)'}]}", "spec.http[0].corsPolicy.allowOrigins[0].regex", "invalid regular expression"),
    ("{allowOrigins: [{exact: a, prefix: b}]}", "spec.http[0].corsPolicy.allowOrigins[0]", "only one of"),
    ("{allowOrigins: [{exact: 3}]}", "spec.http[0].corsPolicy.allowOrigins[0].exact", "expected a string"),
    ("{allowOrigins: [{suffix: a}]}", "spec.http[0].corsPolicy.allowOrigins[0].suffix", "unknown field"),
    ("{allowOrigin: [a, '']}", "spec.http[0].corsPolicy.allowOrigin[1]", "non-empty string"),
    ("{allowMethods: [GET, FETCH]}", "spec.http[0].corsPolicy.allowMethods[1]", "not a supported HTTP method"),
    ("{allowMethods: [get]}", "spec.http[0].corsPolicy.allowMethods[0]", "not a supported HTTP method"),
    ("{allowMethods: GET}", "spec.http[0].corsPolicy.allowMethods", "expected a list"),
    ("{allowHeaders: [x-a, 'x b']}", "spec.http[0].corsPolicy.allowHeaders[1]", "not a valid header name"),
    ("{exposeHeaders: ['x-a\\r\\nx: y']}", "spec.http[0].corsPolicy.exposeHeaders[0]", "not a valid header name"),
    ("{exposeHeaders: ['']}", "spec.http[0].corsPolicy.exposeHeaders[0]", "non-empty string"),
    ("{maxAge: 1.5s}", "spec.http[0].corsPolicy.maxAge", "seconds precision"),
    ("{maxAge: 500ms}", "spec.http[0].corsPolicy.maxAge", "seconds precision"),
    ("{maxAge: 0s}", "spec.http[0].corsPolicy.maxAge", "greater than 1ms"),
    ("{maxAge: 10}", "spec.http[0].corsPolicy.maxAge", "expected a duration"),
    ("{maxAge: ten}", "spec.http[0].corsPolicy.maxAge", "expected a duration"),
    ("{allowCredentials: 'yes'}", "spec.http[0].corsPolicy.allowCredentials", "expected true or false"),
    ("{unmatchedPreflights: DROP}", "spec.http[0].corsPolicy.unmatchedPreflights", "expected one of"),
])
def test_parse_errors_name_the_field(cors_yaml, path, problem):
    with pytest.raises(ConfigError) as e:
        parse_virtual_service(_vs(cors_yaml), W)
    assert e.value.path == path, str(e.value)
    assert problem in str(e.value)


# Every character of Latin-1 and beyond (policy/routing/parse.py r.str refuses lone surrogates first).
_CHARS = [chr(i) for i in range(0x300)] + ["\u2028", "\ufffd", "\U0001f36a", "\U0010ffff"]


def test_header_names_and_cookie_names_share_the_token_rule_and_load_as_before():
    """parse.py checks allowHeaders / exposeHeaders names and ``consistentHash.httpCookie`` names with one
    token set (RFC 9110 tchar). Each character, alone in a name: a CORS header name loads if and only if it is
    a tchar; a cookie name as it did before the two checks were one (RFC 2616 §2.2: not a CTL nor a
    separator; anything non-ASCII passes), refused with the same message naming that character."""
    tchar = set("!#$%&'*+-.^_`|~") | set(string.ascii_letters + string.digits)
    separators = set('()<>@,;:\\"/[]?={} \t')
    dr_where = Where("dr.yaml")
    vs = _vs("{}")
    for c in _CHARS:
        cors_ok = c in tchar
        vs["spec"]["http"][0]["corsPolicy"] = {"allowHeaders": [f"x{c}y"]}   # a document as YAML loads it
        try:
            parse_virtual_service(vs, W)
        except ConfigError as e:
            assert not cors_ok and e.path == "spec.http[0].corsPolicy.allowHeaders[0]", (c, str(e))
            assert f"not a valid header name (character {c!r})" in str(e)
        else:
            assert cors_ok, repr(c)
        cookie_ok = not (c in separators or ord(c) < 0x20 or ord(c) == 0x7F)
        doc = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
               "metadata": {"name": "reviews", "namespace": "default"},
               "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"consistentHash": {
                   "httpCookie": {"name": f"s{c}x", "ttl": "10s"}}}}}}
        try:
            dr = parse_destination_rule(doc, dr_where)
        except ConfigError as e:
            assert not cookie_ok, (c, str(e))
            assert e.path == "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name", str(e)
            # NUL, CR and LF are refused earlier, as any value put on the wire (r.wire_str).
            assert f"{c!r} cannot be in a cookie name" in str(e) or c in "\0\r\n", (c, str(e))
        else:
            assert cookie_ok, repr(c)
            assert dr.traffic_policy.consistent_hash.cookie.name == f"s{c}x"


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6)
                       | st.sampled_from(["GET", "1s", "1.5s", "IGNORE", "*", "x-a"]),
                       lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(["exact", "prefix", "regex", "x"]), inner, max_size=2),
                       max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["allowOrigin", "allowOrigins", "allowMethods", "allowHeaders",
                                        "exposeHeaders", "maxAge", "allowCredentials", "unmatchedPreflights",
                                        "other"]), _values, max_size=4))
def test_any_cors_policy_parses_or_fails_with_a_config_error(body):
    doc = _vs("{}")
    doc["spec"]["http"][0]["corsPolicy"] = body
    try:
        rule = parse_virtual_service(doc, W).http[0]
    except ConfigError as e:
        assert e.path.startswith("spec.http[0].corsPolicy")
        return
    assert isinstance(rule.headers.cors, CorsPolicy)


# ---------------------------------------------------------------------------------------------
# The decision (Envoy's CORS filter)

EXACT = StringMatch("exact", "https://app.example")
PREFIX = StringMatch("prefix", "https://dev.")
REGEX = StringMatch("regex", r"https://[a-z]+\.example\.org", pattern=compile_regex(r"https://[a-z]+\.example\.org"))
FULL = CorsPolicy((EXACT, PREFIX, REGEX), "GET,POST", "content-type,x-token", "x-total,x-page", "600", True)


def _preflight(origin: bytes | None = b"https://app.example", method: bytes = b"PUT", extra=()) -> list:
    hs = [(b"host", b"reviews")]
    if origin is not None:
        hs.append((b"origin", origin))
    if method:
        hs.append((b"access-control-request-method", method))
    return hs + list(extra)


@pytest.mark.parametrize("origin", [b"https://app.example", b"https://dev.anything", b"https://shop.example.org"])
def test_a_matching_preflight_is_answered_with_the_policy(origin):
    a = cors.decide(FULL, b"OPTIONS", _preflight(origin))
    assert a.kind == cors.PREFLIGHT
    assert a.headers == (
        (b"access-control-allow-origin", origin), (b"access-control-allow-credentials", b"true"),
        (b"access-control-allow-methods", b"GET,POST"), (b"access-control-allow-headers", b"content-type,x-token"),
        (b"access-control-max-age", b"600"))
    # expose-headers belong to actual responses only (Envoy PR #3852), never the preflight answer.
    assert all(n != b"access-control-expose-headers" for n, _ in a.headers)


@pytest.mark.parametrize("origin", [b"https://app.example.evil", b"http://app.example", b"https://x.example.org.evil",
                                    b"https://dev", b"HTTPS://APP.EXAMPLE"])
def test_a_preflight_from_another_origin_is_forwarded_by_default(origin):
    # exact and regex are whole-value matches (RE2 FullMatch), prefix a plain prefix, all case-sensitive.
    assert cors.decide(FULL, b"OPTIONS", _preflight(origin)) is None


def test_ignore_answers_a_preflight_from_another_origin_without_allow_origin():
    ignore = CorsPolicy((EXACT,), "GET", "x-token", "x-total", "60", True, forward_unmatched_preflights=False)
    a = cors.decide(ignore, b"OPTIONS", _preflight(b"https://evil.example"))
    # cors_filter.cc: the 200 is sent; only access-control-allow-origin depends on the origin matching.
    assert a.kind == cors.PREFLIGHT and a.headers == (
        (b"access-control-allow-credentials", b"true"), (b"access-control-allow-methods", b"GET"),
        (b"access-control-allow-headers", b"x-token"), (b"access-control-max-age", b"60"))
    # A matching origin under IGNORE is answered as under FORWARD.
    assert cors.decide(ignore, b"OPTIONS", _preflight())[1][0] == (b"access-control-allow-origin", b"https://app.example")


def test_a_star_origin_matches_every_origin_and_a_minimal_policy_answers_only_allow_origin():
    star = CorsPolicy((StringMatch("exact", "*"),))
    assert cors.decide(star, b"OPTIONS", _preflight(b"https://anyone")) == cors.CorsAnswer(
        cors.PREFLIGHT, ((b"access-control-allow-origin", b"https://anyone"),))
    dot_star = CorsPolicy((StringMatch("regex", ".*", pattern=compile_regex(".*")),))
    assert cors.decide(dot_star, b"GET", [(b"origin", b"null")]).headers == ((b"access-control-allow-origin", b"null"),)


@pytest.mark.parametrize("method, headers", [
    (b"OPTIONS", _preflight(None)),                                  # no Origin
    (b"OPTIONS", _preflight(b"")),                                   # an empty Origin is none
    (b"GET", [(b"host", b"reviews")]),
    (b"OPTIONS", [(b"origin-x", b"https://app.example"), (b"access-control-request-method", b"GET")]),
])
def test_no_origin_means_nothing(method, headers):
    assert cors.decide(FULL, method, headers) is None


@pytest.mark.parametrize("method", [b"GET", b"POST", b"DELETE", b"OPTIONS"])
def test_an_actual_request_with_a_matching_origin_gets_response_headers(method):
    # OPTIONS without Access-Control-Request-Method is not a preflight: it goes upstream like any request.
    a = cors.decide(FULL, method, [(b"origin", b"https://app.example")])
    assert a == cors.CorsAnswer(cors.RESPONSE, (
        (b"access-control-allow-origin", b"https://app.example"), (b"access-control-allow-credentials", b"true"),
        (b"access-control-expose-headers", b"x-total,x-page")))
    assert cors.decide(FULL, method, [(b"origin", b"https://other.example")]) is None
    plain = CorsPolicy((EXACT,))
    assert cors.decide(plain, method, [(b"origin", b"https://app.example")]).headers == (
        (b"access-control-allow-origin", b"https://app.example"),)


def test_a_request_method_on_a_non_options_request_is_not_a_preflight():
    a = cors.decide(FULL, b"POST", _preflight(method=b"PUT"))
    assert a.kind == cors.RESPONSE


def test_star_methods_and_headers_echo_the_request_and_repeated_fields_fold():
    p = CorsPolicy((EXACT,), "*", "*")
    a = cors.decide(p, b"OPTIONS", _preflight(extra=[(b"access-control-request-headers", b"x-a"),
                                                     (b"access-control-request-headers", b"x-b")]))
    assert dict(a.headers)[b"access-control-allow-methods"] == b"PUT"
    assert dict(a.headers)[b"access-control-allow-headers"] == b"x-a,x-b"   # inline headers fold with ","
    # Two Origin fields fold too (Envoy's inline header), and the folded value matches nothing exact.
    assert cors.decide(p, b"GET", [(b"origin", b"https://app.example"), (b"origin", b"https://x")]) is None


def test_set_headers_replaces_fields_of_the_same_name_and_keeps_the_rest():
    out = cors.set_headers([(b"x-version", b"v1"), (b"access-control-allow-origin", b"*"), (b"vary", b"origin")],
                           ((b"access-control-allow-origin", b"https://app.example"),))
    assert out == [(b"x-version", b"v1"), (b"vary", b"origin"), (b"access-control-allow-origin", b"https://app.example")]


# ---------------------------------------------------------------------------------------------
# Through the real waypoint

ROUTING = config_docs(virtual_service("reviews", """
    - match: [{uri: {prefix: /ignore}}]
      route: [{destination: {host: reviews, subset: v1}}]
      corsPolicy: {allowOrigins: [{exact: "https://app.example"}], allowMethods: [GET], unmatchedPreflights: IGNORE}
    - match: [{uri: {prefix: /plain}}]
      route: [{destination: {host: reviews, subset: v1}}]
    - route: [{destination: {host: reviews, subset: v1}}]
      headers: {response: {set: {access-control-allow-origin: "*", x-route: r}}}
      corsPolicy:
        allowOrigins: [{exact: "https://app.example"}, {regex: "https://[a-z]+[.]example[.]org"}]
        allowMethods: [GET, POST]
        allowHeaders: [content-type, x-token]
        exposeHeaders: [x-version]
        maxAge: 10m
        allowCredentials: true
"""), destination_rule("reviews", subsets=("v1",)))


def _preflight_headers(origin: bytes) -> list:
    return [(b"origin", origin), (b"access-control-request-method", b"POST"),
            (b"access-control-request-headers", b"x-token")]


def test_an_upstream_with_a_cors_policy_is_not_plain_one_without_is():
    base = dict(cluster="c", service=None, candidates=(), retry=DEFAULT_RETRY_POLICY, timeout_s=None,
                connect_timeout_s=1.0, lb="LEAST_REQUEST")
    assert Upstream(**base).plain
    assert not Upstream(**base, cors=FULL).plain


async def test_waypoint_cors_preflight_simple_request_forwarding_and_authz(tmp_path, loopback_ip, monkeypatch):
    # Which executor served each request: a corsPolicy route leaves the lean path, a plain one stays on it.
    served: list[tuple[str, str]] = []
    for name in ("_execute", "_execute_lean"):
        real = getattr(HttpPipeline, name)

        def spy(self, plan, *args, _real=real, _name=name, **kw):
            served.append((_name, plan.view.path))
            return _real(self, plan, *args, **kw)
        monkeypatch.setattr(HttpPipeline, name, spy)
    h = await start_harness(tmp_path, loopback_ip, routing=ROUTING)
    client = h.client()
    try:
        # 1. A matching preflight: the waypoint answers it; no pod sees it.
        status, hdrs, body = await client.fetch("/headers", b"OPTIONS", _preflight_headers(b"https://app.example"))
        assert (status, body) == (200, b"")
        assert hdrs["access-control-allow-origin"] == "https://app.example"
        assert hdrs["access-control-allow-methods"] == "GET,POST"
        assert hdrs["access-control-allow-headers"] == "content-type,x-token"
        assert hdrs["access-control-max-age"] == "600"
        assert hdrs["access-control-allow-credentials"] == "true"
        assert hdrs["content-length"] == "0"
        # The CORS filter's own answer: not the route's response header ops, not the pod's x-version.
        assert "x-version" not in hdrs and "x-route" not in hdrs and "access-control-expose-headers" not in hdrs
        (line,) = await h.http_lines(1)
        assert (line["method"], line["status"], line["response_code_details"]) == ("OPTIONS", 200, "cors_response")
        assert "upstream_host" not in line and "dst.workload" not in line and line["authz"] == "allow"

        # 2. An actual request from a matching origin: forwarded, the answer gets the CORS headers, set after
        # the route's own response ops (the route's "access-control-allow-origin: *" is replaced).
        status, hdrs, body = await client.fetch("/headers", b"GET", [(b"origin", b"https://shop.example.org")])
        assert status == 200 and json.loads(body)["origin"] == "https://shop.example.org"
        assert hdrs["access-control-allow-origin"] == "https://shop.example.org"
        assert hdrs["access-control-allow-credentials"] == "true"
        assert hdrs["access-control-expose-headers"] == "x-version"
        assert hdrs["x-route"] == "r" and hdrs["x-version"] == "v1"
        # Another origin: forwarded, nothing CORS added (the route's own header stays).
        status, hdrs, body = await client.fetch("/headers", b"GET", [(b"origin", b"https://evil.example")])
        assert status == 200 and hdrs["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in hdrs and "access-control-expose-headers" not in hdrs

        # 3. A preflight from another origin (FORWARD, the default): the pod answers it, untouched.
        status, hdrs, body = await client.fetch("/headers", b"OPTIONS", _preflight_headers(b"https://evil.example"))
        echoed = json.loads(body)
        assert status == 200 and echoed["access-control-request-method"] == "POST"
        assert echoed["origin"] == "https://evil.example" and hdrs["x-version"] == "v1"
        assert "access-control-allow-methods" not in hdrs and "access-control-allow-credentials" not in hdrs

        # 4. IGNORE: a preflight from another origin is answered here, 200 without allow-origin.
        status, hdrs, body = await client.fetch("/ignore", b"OPTIONS", _preflight_headers(b"https://evil.example"))
        assert (status, body) == (200, b"") and "x-version" not in hdrs
        assert "access-control-allow-origin" not in hdrs and hdrs["access-control-allow-methods"] == "GET"

        # 5. A route without corsPolicy: a preflight is just a request.
        status, hdrs, body = await client.fetch("/plain/headers", b"OPTIONS",
                                                _preflight_headers(b"https://app.example"))
        assert status == 200 and hdrs["x-version"] == "v1" and "access-control-allow-origin" not in hdrs

        # 6. Authorization runs first: a caller the AuthorizationPolicy does not allow gets 403 for its preflight.
        status, hdrs, body = await h.client("bookinfo-ratings").fetch("/headers", b"OPTIONS",
                                                                     _preflight_headers(b"https://app.example"))
        assert status == 403 and body == b"RBAC: access denied"
        assert "access-control-allow-origin" not in hdrs

        lines = await h.http_lines(7)
        assert [(x["method"], x["status"], x.get("response_code_details", "")) for x in lines] == [
            ("OPTIONS", 200, "cors_response"),
            ("GET", 200, ""), ("GET", 200, ""),
            ("OPTIONS", 200, ""),
            ("OPTIONS", 200, "cors_response"),
            ("OPTIONS", 200, ""),
            ("OPTIONS", 403, "rbac_access_denied_matched_policy[none]"),
        ]
        # Exactly the forwarded requests reached a pod.
        reached = [x["method"] for x in lines if x.get("upstream_host") not in ("", None, "-")]
        assert reached == ["GET", "GET", "OPTIONS", "OPTIONS"]
        # (the plain route's request took a lean path: _execute_lean, or proxy.pipeline.lean's callbacks when the
        # pool already held a connection to its pod)
        plain = [n for n, p in served if p.startswith("/plain")]
        assert plain in (["_execute_lean"], []) and len(plain) + h.waypoint.http.inline >= 1
        assert {n for n, p in served if not p.startswith("/plain")} == {"_execute"}
    finally:
        await h.close()


async def test_waypoint_cors_over_h2c(tmp_path, loopback_ip):
    # The h2c front-end hands the same request/responder shape to the pipeline: the same CORS answers.
    h = await start_harness(tmp_path, loopback_ip, routing=ROUTING)
    try:
        c = RawH2(await h.client().tunnel(f"{REVIEWS_VIP}:9080"))
        r = await c.get(b"/headers", method=b"OPTIONS", headers=_preflight_headers(b"https://app.example"))
        hdrs = r["headers"]
        assert hdrs[b":status"] == b"200" and r["data"] == b"" and b"x-version" not in hdrs
        assert hdrs[b"access-control-allow-origin"] == b"https://app.example"
        assert hdrs[b"access-control-allow-methods"] == b"GET,POST"
        r = await c.get(b"/headers", headers=[(b"origin", b"https://app.example")])
        hdrs = r["headers"]
        assert hdrs[b":status"] == b"200" and hdrs[b"x-version"] == b"v1"
        assert hdrs[b"access-control-allow-origin"] == b"https://app.example"
        assert hdrs[b"access-control-expose-headers"] == b"x-version"
        lines = await h.http_lines(2)
        assert [(x["method"], x.get("response_code_details", "")) for x in lines] == [
            ("OPTIONS", "cors_response"), ("GET", "")]
    finally:
        await h.close()


FAULT_ROUTING = virtual_service("reviews", """
    - route: [{destination: {host: reviews}}]
      fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
      corsPolicy: {allowOrigins: [{exact: "https://app.example"}], allowMethods: [GET]}
""")


async def test_the_fault_filter_runs_before_cors(tmp_path, loopback_ip):
    # istiod's chain: ... Fault, Cors, router. An abort answers even a matching preflight, without CORS headers.
    h = await start_harness(tmp_path, loopback_ip, routing=FAULT_ROUTING, authz=False)
    try:
        status, hdrs, _ = await h.client().fetch("/headers", b"OPTIONS", _preflight_headers(b"https://app.example"))
        assert status == 418 and "access-control-allow-origin" not in hdrs
        (line,) = await h.http_lines(1)
        assert line["response_flags"] == "FI"
    finally:
        await h.close()
