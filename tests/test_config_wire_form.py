"""Config strings against request bytes: the "wire form" (policy/routing/model.py ``wire_form``).

The waypoint decodes what a client sent as latin-1 (one str char per byte: proxy/pipeline/http.py
``request_view``) and encodes what it sends with latin-1; config strings are real text from YAML. Envoy
compares a config string's UTF-8 bytes with the request's bytes and puts a config value's UTF-8 bytes on
the wire, so each config string is kept next to its wire form (``s.encode("utf-8").decode("latin-1")``)
and matching / sending use that. Covered here: non-ASCII exact/prefix matches (VirtualService uri,
headers, query params, authority; HTTPRoute Exact/PathPrefix/header), rewrites, redirects and header
operations with "é" and "€" (which latin-1 cannot encode at all), case folding that is ASCII-only as
Envoy's, AuthorizationPolicy paths / hosts / header conditions, and the admin views showing the text as
written — end to end through a real waypoint over HBONE, and at the route-selection level.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.authz.match import StringMatch as AuthzMatch
from policy.errors import ConfigError
from policy.routing.model import HeaderOps, StringMatch
from policy.wire import ascii_lower, wire_form
from policy.routing.select import NoRoute, route_http
from proxy import config_check
from proxy.admin.views import build_waypoint_views
from proxy.pipeline.explain import explain_request
from proxy.pipeline.http import apply_ops, request_view
from proxy.pipeline.views_input import views_input
from tests.test_authz_helpers import allowed, deny, http
from tests.test_routing_common import REVIEWS, SUBSETS_DR, dr, hr, table, vs
from tests.test_waypoint_l7 import RawH2
from tests.waypoint_harness import REVIEWS_VIP, start_harness, virtual_service

UTF8 = "utf-8"


def wire(text: str) -> bytes:
    return text.encode(UTF8)


# ---------------------------------------------------------------------------------------------
# End to end: a real waypoint, backends that record the bytes they receive


class Recorder:
    """A raw HTTP/1.1 backend: it keeps each request head's bytes as they arrived (request line, Host and
    the other header lines, undecoded) and answers ``200 ok``. Raw on purpose: an HTTP/1.1 parser would
    refuse a non-ASCII request target (llhttp does), and the point is to see the exact bytes."""

    def __init__(self) -> None:
        self.requests: list[dict] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, *fields = head[:-4].split(b"\r\n")
                method, target, _ = line.split(b" ")
                headers = [tuple(f.split(b": ", 1)) for f in fields]
                self.requests.append({"method": method, "target": target, "headers": headers,
                                      "host": dict(headers).get(b"host")})
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-backend: 1\r\n\r\nok")
                await writer.drain()
        finally:
            writer.close()


async def recording_backends(h) -> Recorder:
    """Replace every reviews pod's backend with one Recorder (same address, same port)."""
    rec = Recorder()
    for ip, pod in h.pods.items():
        await pod.stop_backend()
        pod.backend = await asyncio.start_server(rec.serve, ip, 9080)
    return rec


WIRE_ROUTES = virtual_service("reviews", """
  - name: header-exact
    match: [{headers: {x-name: {exact: "José"}}}]
    route: [{destination: {host: reviews}}]
    headers: {request: {set: {x-matched: header-exact}}}
  - name: euro-rewrite
    match: [{uri: {prefix: "/café/"}}, {uri: {prefix: "/cafe/"}}]
    rewrite: {uri: "/€/é/", authority: "bücher.example"}
    route: [{destination: {host: reviews}}]
    headers:
      request: {set: {x-set: "é€"}, add: {x-add: "ü"}}
      response: {set: {x-resp: "€"}}
  - name: go
    match: [{uri: {exact: "/go/é"}}, {uri: {exact: "/go"}}]
    redirect: {uri: "/ünïcode/€", authority: "bücher.example"}
  - name: rest
    route: [{destination: {host: reviews}}]
""")


@contextlib.asynccontextmanager
async def wire_harness(tmp_path, loopback_ip, routing: str = WIRE_ROUTES, authz: bool = False):
    """The reviews harness on ``routing`` with one Recorder behind every pod; yields (harness, recorder) and
    closes the harness after."""
    h = await start_harness(tmp_path, loopback_ip, routing=routing, authz=authz)
    rec = await recording_backends(h)
    try:
        yield h, rec
    finally:
        await h.close()


async def test_e2e_non_ascii_header_match_compares_utf8_bytes(tmp_path, loopback_ip):
    async with wire_harness(tmp_path, loopback_ip) as (h, rec):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        # exact header match on the UTF-8 bytes of "José"
        status, _, _ = await client.request(stream, "/h", headers=[(b"x-name", wire("José"))])
        assert status == 200
        assert (b"x-matched", b"header-exact") in rec.requests[-1]["headers"]
        # the same text in latin-1 (one byte 0xE9) is another value: Envoy compares bytes
        status, _, _ = await client.request(stream, "/h", headers=[(b"x-name", "José".encode("latin-1"))])
        assert status == 200 and (b"x-matched", b"header-exact") not in rec.requests[-1]["headers"]


async def test_e2e_rewrite_and_header_values_with_euro_go_out_as_utf8(tmp_path, loopback_ip):
    async with wire_harness(tmp_path, loopback_ip) as (h, rec):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        # prefix match on "/café/", rewrite to "/€/é/" (latin-1 cannot even encode "€"), authority rewrite
        status, headers, body = await client.request(stream, "/cafe/x?q=1")
        assert (status, body) == (200, b"ok")
        got = rec.requests[-1]
        assert got["target"] == wire("/€/é/x?q=1")
        assert got["host"] == wire("bücher.example")
        sent = dict(got["headers"])
        assert sent[b"x-set"] == wire("é€") and sent[b"x-add"] == wire("ü")
        assert headers["x-resp"] == "€"   # (the test client decodes response headers as UTF-8)
        # the tunnel is still good after that
        status, _, body = await client.request(stream, "/plain")
        assert (status, body) == (200, b"ok") and rec.requests[-1]["target"] == b"/plain"


async def test_e2e_redirect_location_is_utf8(tmp_path, loopback_ip):
    async with wire_harness(tmp_path, loopback_ip) as (h, rec):
        client = h.client()
        stream = await client.tunnel(f"{REVIEWS_VIP}:9080")
        status, headers, _ = await client.request(stream, "/go")
        assert status == 301
        assert headers["location"] == "http://bücher.example/ünïcode/€"
        status, _, body = await client.request(stream, "/plain")
        assert (status, body) == (200, b"ok")


# ---------------------------------------------------------------------------------------------
# Route selection: views built as the waypoint builds them, from the bytes a client sent


def client_view(target: bytes, headers: list[tuple[bytes, bytes]] = (), host: bytes = b"reviews:9080"):
    """The request view the waypoint builds from these bytes (proxy/pipeline/http.py request_view)."""
    return request_view(b"GET", target, host, list(headers), 9080)


def routed(tbl, view) -> str:
    """The name of the rule ``view`` is routed by, or "NR"."""
    d = route_http(view, tbl.http_routes_for(REVIEWS, 9080))
    return "NR" if isinstance(d, NoRoute) else d.rule_name


def vs_table(*rules: dict):
    return table([vs({"hosts": ["reviews"], "http": list(rules)})], [dr(SUBSETS_DR)])


def rule(name: str, match: dict | None = None, **extra) -> dict:
    r = {"name": name, "route": [{"destination": {"host": "reviews", "subset": "v1"}}], **extra}
    if match is not None:
        r["match"] = [match]
    return r


@pytest.mark.parametrize("match,good,bad", [
    # (match, a request that matches, one that must not — each as the bytes a client sends)
    ({"uri": {"exact": "/café"}}, (wire("/café"), []), ("/café".encode("latin-1"), [])),
    ({"uri": {"prefix": "/€/"}}, (wire("/€/x"), []), (b"/\xe2\x82/x", [])),
    ({"headers": {"x-name": {"exact": "José"}}}, (b"/", [(b"x-name", wire("José"))]),
     (b"/", [(b"x-name", "José".encode("latin-1"))])),
    ({"headers": {"x-name": {"prefix": "Jo€"}}}, (b"/", [(b"x-name", wire("Jo€rg"))]),
     (b"/", [(b"x-name", b"Jo")])),
    ({"queryParams": {"q": {"exact": "ü"}}}, (wire("/?q=ü"), []), (b"/?q=\xfc", [])),
    ({"queryParams": {"ü": {"exact": "1"}}}, (wire("/?ü=1"), []), (b"/?\xfc=1", [])),
    ({"withoutHeaders": {"x-name": {"exact": "é"}}}, (b"/", [(b"x-name", b"\xe9")]),
     (b"/", [(b"x-name", wire("é"))])),
])
def test_vs_exact_prefix_matches_compare_the_config_strings_utf8_bytes(match, good, bad):
    tbl = vs_table(rule("hit", match))
    assert routed(tbl, client_view(*good)) == "hit"
    assert routed(tbl, client_view(*bad)) == "NR"


def test_vs_authority_match_compares_utf8_bytes():
    tbl = vs_table(rule("hit", {"authority": {"exact": "bücher.example"}}))
    assert routed(tbl, client_view(b"/", host=wire("bücher.example"))) == "hit"
    assert routed(tbl, client_view(b"/", host="bücher.example".encode("latin-1"))) == "NR"


def test_ignore_uri_case_folds_ascii_only_as_envoy():
    """Envoy's ignore_case is absl::StartsWithIgnoreCase: ASCII letters only. "É" (C3 89) and "é" (C3 A9)
    differ; and the latin-1 chars UTF-8 bytes decode to are never folded (0xC3 is not 0xE3)."""
    tbl = vs_table(rule("hit", {"uri": {"prefix": "/CAFÉ"}, "ignoreUriCase": True}))
    assert routed(tbl, client_view(wire("/CAFÉ/x"))) == "hit"
    assert routed(tbl, client_view(wire("/cafÉ/x"))) == "hit"      # ASCII letters fold
    assert routed(tbl, client_view(wire("/café/x"))) == "NR"       # É is not é to Envoy
    assert routed(tbl, client_view(b"/caf\xe3\x89/x")) == "NR"     # str.lower would fold 0xC3 into 0xE3
    assert routed(tbl, client_view(b"/caf\xc3\x89/x")) == "hit"
    sm = StringMatch("exact", "ÀB", ignore_case=True)
    assert sm.matches(wire_form("Àb")) and not sm.matches(wire_form("àb"))
    assert ascii_lower("ÀÃÉ-ABC") == "ÀÃÉ-abc" and ascii_lower("ABC") == "abc"


def test_httproute_exact_prefix_and_header_matches_compare_utf8_bytes():
    route = hr({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}], "rules": [
        {"name": "exact", "matches": [{"path": {"type": "Exact", "value": "/ça"}}],
         "backendRefs": [{"name": "reviews", "port": 9080}]},
        {"name": "prefix", "matches": [{"path": {"type": "PathPrefix", "value": "/über"}}],
         "backendRefs": [{"name": "reviews", "port": 9080}]},
        {"name": "header", "matches": [{"path": {"type": "PathPrefix", "value": "/h"},
                                        "headers": [{"name": "X-Näme", "value": "€"}]}],
         "backendRefs": [{"name": "reviews", "port": 9080}]},
    ]})
    tbl = table(hrs=[route])
    assert routed(tbl, client_view(wire("/ça"))) == "exact"
    assert routed(tbl, client_view("/ça".encode("latin-1"))) == "NR"
    assert routed(tbl, client_view(wire("/über/x"))) == "prefix"
    assert routed(tbl, client_view(wire("/übermensch"))) == "NR"    # element-wise, on the bytes too
    assert routed(tbl, client_view(b"/h", [(wire("x-näme"), wire("€"))])) == "header"
    # the header name folds ASCII-only: "X-NäME" is the name x-näme; "x-nÄme" is another name
    assert routed(tbl, client_view(b"/h", [(wire("x-nÄme"), wire("€"))])) == "NR"


def test_rewrite_and_redirect_values_come_out_as_utf8_bytes():
    tbl = vs_table(
        rule("rw", {"uri": {"prefix": "/café/"}}, rewrite={"uri": "/€/", "authority": "bücher.example"}),
        {"name": "rd", "match": [{"uri": {"prefix": "/go"}}],
         "redirect": {"uri": "/ünï€", "authority": "bücher.example:8080"}},
    )
    d = route_http(client_view(wire("/café/x?q=é")), tbl.http_routes_for(REVIEWS, 9080))
    # http.py sends route.path / route.authority with .encode("latin-1"): exactly the UTF-8 bytes
    assert d.path.encode("latin-1") == wire("/€/x?q=é")
    assert d.authority.encode("latin-1") == wire("bücher.example")
    d = route_http(client_view(b"/go"), tbl.http_routes_for(REVIEWS, 9080))
    assert d.action.location.encode("latin-1") == wire("http://bücher.example:8080/ünï€")
    # Gateway API URLRewrite / RequestRedirect likewise
    route = hr({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}], "rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/é"}}],
         "filters": [{"type": "URLRewrite", "urlRewrite": {
             "hostname": "bücher.example", "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/€"}}}],
         "backendRefs": [{"name": "reviews", "port": 9080}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/r"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {
             "hostname": "bücher.example", "path": {"type": "ReplaceFullPath", "replaceFullPath": "/ü"}}}]},
    ]})
    gw = table(hrs=[route]).http_routes_for(REVIEWS, 9080)
    d = route_http(client_view(wire("/é/a")), gw)
    assert (d.path.encode("latin-1"), d.authority.encode("latin-1")) == (wire("/€/a"), wire("bücher.example"))
    d = route_http(client_view(b"/r"), gw)
    assert d.action.location.encode("latin-1") == wire("http://bücher.example:9080/ü")


def test_header_operations_write_utf8_and_no_longer_crash_the_encoder():
    """VS headers and Gateway API header modifiers: the pipeline's apply_ops (http.py) encodes the result
    with latin-1 — "€" used to raise UnicodeEncodeError there, and "é" went out as the byte 0xE9."""
    tbl = vs_table(rule("h", headers={"request": {"set": {"X-Set": "é€"}, "add": {"x-add": "ü"},
                                                  "remove": ["X-Gone"]},
                                      "response": {"set": {"x-resp": "€"}}}))
    fwd = tbl.http_routes_for(REVIEWS, 9080).rules[0].action
    out = apply_ops([(b"x-add", b"a"), (b"x-gone", b"1"), (b"x-keep", wire("é"))], (fwd.headers.request,))
    assert out == [(b"x-add", b"a," + wire("ü")), (b"x-keep", wire("é")), (b"x-set", wire("é€"))]
    assert apply_ops([], (fwd.headers.response,)) == [(b"x-resp", wire("€"))]
    route = hr({"parentRefs": [{"group": "", "kind": "Service", "name": "reviews"}], "rules": [
        {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
            "set": [{"name": "X-Set", "value": "€"}], "add": [{"name": "x-add", "value": "é"}]}}],
         "backendRefs": [{"name": "reviews", "port": 9080}]}]})
    fwd = table(hrs=[route]).http_routes_for(REVIEWS, 9080).rules[0].action
    assert sorted(apply_ops([], (fwd.headers.request,))) == [(b"x-add", wire("é")), (b"x-set", wire("€"))]


def test_parsed_models_keep_the_text_as_written():
    v = vs({"hosts": ["reviews"], "http": [rule("r", {"uri": {"prefix": "/café"}, "headers": {"x": {"exact": "é"}}},
                                                rewrite={"uri": "/€", "authority": "bücher"},
                                                headers={"request": {"set": {"x-set": "é€"}}})]})
    r = v.http[0]
    assert r.matches[0].uri.value == "/café" and r.matches[0].uri.wire == wire("/café").decode("latin-1")
    assert r.matches[0].headers[0][1].value == "é"
    assert (r.rewrite.path, r.rewrite.authority) == ("/€", "bücher")
    assert r.headers.request.set == (("x-set", "é€"),)
    assert r.headers.request.wire_set == (("x-set", wire_form("é€")),)
    # models equal whatever their derived wire fields (compare=False)
    assert StringMatch("exact", "é") == StringMatch("exact", "é")
    assert wire_form("€") == "â\x82¬" and wire_form("abc") == "abc"


@pytest.mark.parametrize("field,value", [
    ({"headers": {"request": {"set": {"x": "a\r\nx-injected: 1"}}}}, "'\\r'"),
    ({"headers": {"response": {"add": {"x": "a\nb"}}}}, "'\\n'"),
    ({"rewrite": {"uri": "/a\x00b"}}, "'\\x00'"),
    ({"rewrite": {"authority": "a\rb"}}, "'\\r'"),
])
def test_values_that_would_split_the_header_block_are_refused_as_envoy_refuses_them(field, value):
    spec = {"hosts": ["reviews"], "http": [rule("r", **field)]}
    with pytest.raises(ConfigError) as e:
        vs(spec)
    assert value in e.value.problem and "NUL, CR and LF" in e.value.problem


def test_a_lone_surrogate_is_refused():
    with pytest.raises(ConfigError) as e:
        vs({"hosts": ["reviews"], "http": [rule("r", {"uri": {"exact": "/\ud800"}})]})
    assert "not valid UTF-8" in e.value.problem and e.value.path.endswith("uri.exact")


# ---------------------------------------------------------------------------------------------
# AuthorizationPolicy: paths, hosts, methods and header values are request bytes too


def waypoint_http(target: bytes, host: bytes = b"svc.default.svc.cluster.local", headers=()):
    v = client_view(target, list(headers), host)
    return http(v.method, v.path, v.authority, {k: vs_ for k, vs_ in v.headers.items()})


@pytest.mark.parametrize("rule_,good,bad", [
    ({"to": [{"operation": {"paths": ["/privé"]}}]}, (wire("/privé"),), ("/privé".encode("latin-1"),)),
    ({"to": [{"operation": {"paths": ["/€*"]}}]}, (wire("/€/x"),), (b"/\xe2\x82/x",)),
    ({"to": [{"operation": {"paths": ["*/ü"]}}]}, (wire("/a/ü"),), (b"/a/\xfc",)),
    ({"to": [{"operation": {"hosts": ["bücher.example"]}}]}, (b"/", wire("bücher.example")),
     (b"/", "bücher.example".encode("latin-1"))),
    ({"when": [{"key": "request.headers[X-User]", "values": ["José"]}]},
     (b"/", b"svc", [(b"x-user", wire("José"))]), (b"/", b"svc", [(b"x-user", "José".encode("latin-1"))])),
])
def test_authz_http_attributes_compare_utf8_bytes(rule_, good, bad):
    p = deny(rule_)
    assert not allowed(waypoint_http(*good), p)
    assert allowed(waypoint_http(*bad), p)


def test_authz_hosts_fold_ascii_only():
    # Istio HostMatcher: ignoreCase on ":authority" — absl::EqualsIgnoreCase, ASCII-only.
    p = deny({"to": [{"operation": {"hosts": ["BÜCHER.example"]}}]})
    assert not allowed(waypoint_http(b"/", wire("bücHER.EXAMPLE").replace(wire("ü"), wire("Ü"))), p)
    assert allowed(waypoint_http(b"/", wire("bücher.example")), p)            # Ü is not ü to Envoy
    assert allowed(waypoint_http(b"/", b"b\xe3\x9ccher.example"), p)          # 0xC3 does not fold into 0xE3


def test_authz_identities_and_descriptions_stay_text():
    p = deny({"from": [{"source": {"principals": ["cluster.local/ns/default/sa/client"]}}],
              "to": [{"operation": {"paths": ["/privé"], "hosts": ["BÜCHER.example"]}}]})
    described = [f.describe() for r in p.rules for f in r.fields()]
    assert "paths in [/privé]" in described
    assert "hosts in [bÜcher.example]" in described   # ASCII-lowered, as matched; the Ü as written
    # the principal (text, from the peer's certificate) still matches as text
    assert not allowed(waypoint_http(wire("/privé"), wire("BÜCHER.example")), p)


# ---------------------------------------------------------------------------------------------
# End to end over h2c (HTTP/1.1's parser refuses a non-ASCII request target; HTTP/2's :path carries any
# byte), with an AuthorizationPolicy on a UTF-8 header value and path; and the admin views


PATH_ROUTES = WIRE_ROUTES.replace('''  - name: rest
''', '''  - name: utf8-path
    match: [{uri: {exact: "/ça/€"}}]
    route: [{destination: {host: reviews}}]
    headers: {request: {set: {x-matched: utf8-path}}}
  - name: rest
''')

UTF8_DENY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-utf8, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/interdit/é*"]}}]
  - when: [{key: "request.headers[X-User]", values: ["José"]}]
"""


async def test_e2e_h2c_utf8_path_matches_rewrites_and_authz(tmp_path, loopback_ip):
    async with wire_harness(tmp_path, loopback_ip, routing=PATH_ROUTES + "\n---\n" + UTF8_DENY) as (h, rec):
        c = RawH2(await h.client().tunnel(f"{REVIEWS_VIP}:9080"))
        r = await c.get(wire("/ça/€"))
        assert r["headers"][b":status"] == b"200"
        got = rec.requests[-1]
        assert got["target"] == wire("/ça/€") and (b"x-matched", b"utf8-path") in got["headers"]
        r = await c.get("/ça/€".encode("latin-1", "replace"))       # other bytes: the catch-all rule
        assert r["headers"][b":status"] == b"200" and (b"x-matched", b"utf8-path") not in rec.requests[-1]["headers"]
        r = await c.get(wire("/café/x"))                             # UTF-8 prefix match, then rewrite
        assert r["headers"][b":status"] == b"200" and r["headers"][b"x-resp"] == wire("€")
        assert rec.requests[-1]["target"] == wire("/€/é/x") and rec.requests[-1]["host"] == wire("bücher.example")
        r = await c.get(wire("/go/é"))                                # UTF-8 exact match, then redirect
        assert r["headers"][b":status"] == b"301"
        assert r["headers"][b"location"] == wire("http://bücher.example/ünïcode/€")
        # the DENY policy: a UTF-8 path prefix and a UTF-8 header value, 403 from the waypoint
        n = len(rec.requests)
        r = await c.get(wire("/interdit/école"))
        assert r["headers"][b":status"] == b"403" and r["data"] == b"RBAC: access denied"
        r = await c.get(b"/h", headers=[(b"x-user", wire("José"))])
        assert r["headers"][b":status"] == b"403"
        r = await c.get(b"/h", headers=[(b"x-user", b"Jose")])
        assert r["headers"][b":status"] == b"200"
        assert len(rec.requests) == n + 1


async def test_e2e_views_show_the_config_text_as_written(tmp_path, loopback_ip):
    async with wire_harness(tmp_path, loopback_ip, routing=PATH_ROUTES) as (h, _):
        views = build_waypoint_views(**views_input(h.store.current), hbone_addr=f"{h.wp_ip}:15008").to_dict()
        text = json.dumps(views, ensure_ascii=False)
        assert '"/ça/€"' in text                       # the exact match, as written
        assert "Ã" not in text and "â\x82¬" not in text   # no wire form anywhere


def test_config_check_loads_utf8_values_and_names_a_value_that_would_split_headers(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(WIRE_ROUTES, encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    assert config_check.main(["check", str(good)], out=out, err=err) == 0, err.getvalue()
    assert out.getvalue().endswith("OK\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(WIRE_ROUTES.replace('x-set: "é€"', 'x-set: "é\\r\\nx-evil: 1"'), encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    assert config_check.main(["check", str(bad)], out=out, err=err) == 2
    assert "spec.http[1].headers.request.set.x-set: must not contain '\\r'" in err.getvalue()


@settings(max_examples=200, deadline=None)
@given(config=st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
       sent=st.binary(max_size=12), upper=st.booleans())
def test_exact_and_prefix_match_iff_the_utf8_bytes_do(config, sent, upper):
    """Envoy's rule, for any config text and any bytes a client sends: exact ⇔ the config's UTF-8 bytes
    equal them; prefix ⇔ they start with them; ignore_case ⇔ the same after ASCII-only lowering."""
    want = config.encode("utf-8")
    assert wire_form(config).encode("latin-1") == want
    got = sent.decode("latin-1")
    assert StringMatch("exact", config).matches(got) is (sent == want)
    assert StringMatch("prefix", config).matches(got) is sent.startswith(want)
    folded = sent.upper() if upper else sent
    assert StringMatch("exact", config, ignore_case=True).matches(folded.decode("latin-1")) is \
        (folded.lower() == want.lower())   # bytes.lower(): ASCII-only, as absl
    ops = HeaderOps(set=(("x", config),))
    assert apply_ops([], (ops,)) == [(b"x", want)]
    # AuthorizationPolicy values on HTTP attributes: the same rule, suffix included
    for kind, op in (("exact", bytes.__eq__), ("prefix", bytes.startswith), ("suffix", bytes.endswith)):
        assert AuthzMatch(kind, config, on_wire=True).matches(got) is op(sent, want)
    assert AuthzMatch("exact", config, ignore_case=True, on_wire=True).matches(folded.decode("latin-1")) is \
        (folded.lower() == want.lower())


async def test_explain_answers_for_the_utf8_bytes_a_client_would_send(tmp_path, loopback_ip):
    async with wire_harness(tmp_path, loopback_ip, routing=PATH_ROUTES) as (h, _):
        src = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        ans = explain_request(h.store.current, src, (REVIEWS_VIP, 9080), "GET", "/h", {"x-name": "José"})
        assert ans["route"]["rule"] == 0                            # header-exact
        ans = explain_request(h.store.current, src, (REVIEWS_VIP, 9080), "GET", "/ça/€", None)
        assert ans["route"]["rule"] == 3                            # utf8-path
        ans = explain_request(h.store.current, src, (REVIEWS_VIP, 9080), "GET", "/go", None)
        assert ans["response"]["location"] == "http://bücher.example/ünïcode/€"
