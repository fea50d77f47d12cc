"""Istio's default ``pathNormalization: BASE`` at a real waypoint: "The normalized request will be used for both
the evaluation of authorization policies and the request that is ultimately sent to the backend server"
(istio.io security/normalization) — unreserved percent-encodings decoded once, backslashes made ``/``, dot
segments removed, ``%00`` refused with 400; routing, authorization and the pod all see the same path."""

from __future__ import annotations

import json

import pytest

from policy.authz.match import decode_unreserved, normalize_path
from proxy.pipeline.http import normalized_target
from tests.waypoint_harness import start_harness, virtual_service

DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"""
ROUTING = virtual_service("reviews", """
- match: [{uri: {prefix: /status}}]
  route: [{destination: {host: reviews, subset: v2}}]
- route: [{destination: {host: reviews, subset: v1}}]
""") + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


@pytest.mark.parametrize("raw,normal", [
    ("/%61dmin", "/admin"), ("/%41%5A%7e%2D%5f%30", "/AZ~-_0"), ("/a/%2e%2E/admin", "/admin"),
    ("/%2561dmin", "/%2561dmin"),              # once only: %25 is not unreserved
    ("/a%2Fb", "/a%2Fb"), ("/a%5cb", "/a%5cb"),  # slashes stay encoded (DECODE_AND_MERGE_SLASHES is not BASE)
    ("/a\\..\\admin", "/admin"), ("/a//b", "/a//b"), ("/%zz%4", "/%zz%4"), ("/%e2%82%ac", "/%e2%82%ac"),
])
def test_base_normalization_of_a_path(raw, normal):
    assert normalize_path(raw) == normal
    assert normalize_path(normal) == normal   # idempotent


def test_the_target_keeps_its_query_and_a_nul_is_refused():
    assert normalized_target(b"/x/../%61dmin?next=/%61/../b") == b"/admin?next=/%61/../b"
    assert normalized_target(b"/plain?q=1") == b"/plain?q=1"
    assert normalized_target(b"/a%00b") is None and normalized_target(b"/a?q=%00") == b"/a?q=%00"
    assert normalized_target(b"*") == b"*"
    assert decode_unreserved("no escapes") == "no escapes"


async def test_routing_authorization_and_the_pod_see_the_normalized_path(tmp_path, loopback_ip):
    h = await start_harness(tmp_path, loopback_ip, routing=ROUTING, extra=DENY_ADMIN)
    try:
        c = h.client()
        # The DENY on /admin holds however the path is spelled.
        for path in ("/admin", "/%61dmin", "/%61%64%6D%69%6E", "/x/../admin", "/x/%2e%2e/admin", "/x\\..\\admin"):
            status, _, body = await c.fetch(path)
            assert (status, body) == (403, b"RBAC: access denied"), path
        # Routing on the normalized path: /status/../headers is /headers (the catch-all, v1), and the pod gets
        # /headers (its /status/<code> handler would not answer it with the request's headers).
        status, headers, body = await c.fetch("/status/../headers")
        assert status == 200 and headers.get("x-version") == "v1" and "host" in json.loads(body)
        status, _, body = await c.fetch("/%73tatus/200")   # the pod's /status/<code> answers its version
        assert (status, body) == (200, b"v2")
        # %00 in the path: 400, empty body, before routing or authorization.
        status, _, body = await c.fetch("/a%00b")
        assert (status, body) == (400, b"")
        lines = await h.http_lines(9)
        assert [(l["path"], l["status"]) for l in lines][-3:] == [
            ("/headers", 200), ("/status/200", 200), ("/a%00b", 400)]
        assert lines[-1]["response_code_details"] == "path_normalization_failed"
        assert lines[-1]["response_flags"] == "-"
    finally:
        await h.close()
