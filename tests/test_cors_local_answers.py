"""A VirtualService corsPolicy on a redirect or directResponse rule: Envoy's CORS filter runs before the router
on every route, whatever answers it — a preflight is answered by the filter (200, ``cors_response``), and
another request from an allowed origin gets the filter's headers on the redirect or direct response; a
request from another origin gets the answer untouched. Through a real waypoint (tests/waypoint_harness.py)."""

from __future__ import annotations

from tests.waypoint_harness import config_docs, destination_rule, start_harness, virtual_service

ROUTING = config_docs(virtual_service("reviews", """
    - match: [{uri: {prefix: /moved}}]
      redirect: {uri: /new, authority: reviews.example}
      corsPolicy: {allowOrigins: [{exact: "https://app.example"}], allowMethods: [GET], exposeHeaders: [location]}
    - match: [{uri: {prefix: /gone}}]
      directResponse: {status: 410, body: {string: "gone for good"}}
      corsPolicy: {allowOrigins: [{exact: "https://app.example"}], allowMethods: [GET, DELETE], maxAge: 1m}
    - route: [{destination: {host: reviews, subset: v1}}]
"""), destination_rule("reviews", subsets=("v1",)))

PREFLIGHT = [(b"origin", b"https://app.example"), (b"access-control-request-method", b"DELETE")]


async def test_cors_on_redirect_and_direct_response_rules(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=ROUTING)
    client = h.client()
    try:
        # A preflight to a directResponse rule: the CORS filter answers it, not the rule.
        status, hdrs, body = await client.fetch("/gone", b"OPTIONS", PREFLIGHT)
        assert (status, body) == (200, b"")
        assert hdrs["access-control-allow-origin"] == "https://app.example"
        assert hdrs["access-control-allow-methods"] == "GET,DELETE" and hdrs["access-control-max-age"] == "60"
        # An actual request from the allowed origin: the rule's answer, with the filter's headers.
        status, hdrs, body = await client.fetch("/gone", b"GET", [(b"origin", b"https://app.example")])
        assert (status, body) == (410, b"gone for good")
        assert hdrs["access-control-allow-origin"] == "https://app.example"
        assert "access-control-allow-methods" not in hdrs   # (preflight answers only)
        # Another origin: the answer untouched.
        status, hdrs, _ = await client.fetch("/gone", b"GET", [(b"origin", b"https://evil.example")])
        assert status == 410 and not any(k.startswith("access-control-") for k in hdrs)
        # A redirect rule: the redirect, with the filter's headers (exposeHeaders on actual answers).
        status, hdrs, _ = await client.fetch("/moved", b"GET", [(b"origin", b"https://app.example")])
        assert status == 301 and hdrs["location"] == "http://reviews.example/new"
        assert hdrs["access-control-allow-origin"] == "https://app.example"
        assert hdrs["access-control-expose-headers"] == "location"
        # Without an Origin: not a CORS request at all.
        status, hdrs, _ = await client.fetch("/moved", b"GET", [])
        assert status == 301 and not any(k.startswith("access-control-") for k in hdrs)
        lines = await h.http_lines(5)
        assert [(x["method"], x["status"], x.get("response_code_details", "")) for x in lines] == [
            ("OPTIONS", 200, "cors_response"), ("GET", 410, ""), ("GET", 410, ""), ("GET", 301, ""), ("GET", 301, "")]
        assert not any(x.get("upstream_host") for x in lines)   # no pod saw any of them
    finally:
        await h.close()
