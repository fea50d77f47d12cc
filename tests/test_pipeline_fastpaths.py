"""The waypoint's per-request fast paths are in effect and change nothing (untimed): a plan made with the
per-snapshot memo equals one made without it, and the memo holds what was resolved once."""

from __future__ import annotations

import random

import pytest

from policy.routing.select import HttpRequestView
from proxy.pipeline.authz import l7_authorizer
from proxy.pipeline.http import plan_request
from tests.test_pipeline_plan import PRODUCTPAGE, _ctx, snap  # noqa: F401  (snap: the bookinfo fixture)
from tests.waypoint_harness import config_docs, destination_rule, virtual_service

OTHER = "spiffe://cluster.local/ns/default/sa/other"


def _summary(plan):
    return (plan.decision, plan.route, plan.fault, plan.upstream, type(plan.error), plan.mirrors)


def test_plans_with_the_memo_equal_plans_without_it(snap):
    views = [HttpRequestView("GET", "/reviews/1", "reviews:9080", {}, 9080),
             HttpRequestView("GET", "/", "reviews:9080", {"x-deny": ("1",)}, 9080)]
    memo: dict = {}
    for principal in (PRODUCTPAGE, OTHER):
        for view in views:
            with_memo, plain = random.Random(7), random.Random(7)
            for _ in range(50):
                a = plan_request(_ctx(principal), snap, view, rng=with_memo, memo=memo)
                b = plan_request(_ctx(principal), snap, view, rng=plain)
                assert _summary(a) == _summary(b)
    chain = memo[("127.2.0.20", 9080)]
    # One Authorizer per (snapshot, chain), and one Decision object per outcome.
    assert l7_authorizer(chain, snap, memo) is l7_authorizer(chain, snap, memo)
    a1 = plan_request(_ctx(), snap, views[0], rng=random.Random(1), memo=memo)
    a2 = plan_request(_ctx(), snap, views[0], rng=random.Random(2), memo=memo)
    assert a1.decision.allowed and a1.decision is a2.decision


def test_request_id_is_the_uuid4_text_uuid_would_give():
    import uuid

    from proxy.pipeline.http import request_id
    a, b = random.Random(3), random.Random(3)
    for _ in range(500):
        assert request_id(a) == str(uuid.UUID(int=b.getrandbits(128), version=4)).encode()


async def test_http1_on_a_sniffed_stream_reads_the_tunnel_stream_directly(monkeypatch):
    """HttpPipeline.serve unwraps the sniffer's PrefixedStream: serve_http1 gets the inner stream and
    the sniffed bytes as its prefix (no wrapper per read and drain); h2c keeps the PrefixedStream."""
    from types import SimpleNamespace

    import proxy.pipeline.http as http_mod
    from hbone.stream import PrefixedStream
    calls = []

    async def fake_http1(stream, handler, **kw):
        calls.append(("http/1.1", stream, kw.get("prefix", b"")))

    async def fake_h2c(stream, handler, **kw):
        calls.append(("h2c", stream, b""))
        return SimpleNamespace(core=SimpleNamespace(abuse=None))   # serve_h2c returns its H2cConn

    monkeypatch.setattr(http_mod, "serve_http1", fake_http1)
    monkeypatch.setattr(http_mod, "serve_h2c", fake_h2c)
    pipeline = http_mod.HttpPipeline(originator=None)
    inner = object()
    await pipeline.serve(PrefixedStream(inner, b"GET / HTTP/1.1\r\n"), None, None, lambda: None)
    wrapped = PrefixedStream(inner, b"PRI * HTTP/2.0")
    await pipeline.serve(wrapped, None, None, lambda: None, "h2c")
    assert calls == [("http/1.1", inner, b"GET / HTTP/1.1\r\n"), ("h2c", wrapped, b"")]


# ---- plan_cached: the same plans as plan_request, with the decisions remembered ----------------------

_TWIN_DENY_POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-x-deny, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - when: [{key: "request.headers[x-deny]", values: ["*"]}]
  - to: [{operation: {methods: [PUT], paths: [/admin*]}}]
"""

_TWIN_ROUTING = config_docs(
    virtual_service("reviews", """
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new}
  - match: [{uri: {exact: /gone}, method: {exact: DELETE}}]
    directResponse: {status: 410}
  - match: [{withoutHeaders: {x-canary: {exact: "no"}}, uri: {prefix: /canary}}]
    fault: {abort: {percentage: {value: 50}, httpStatus: 503}}
    mirror: {host: reviews, subset: v3}
    mirrorPercentage: {value: 30}
    route: [{destination: {host: reviews, subset: v3}}]
  - match: [{uri: {prefix: /only}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /}}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
"""),
    destination_rule("reviews", subsets=("v1", "v2", "v3")),
    _TWIN_DENY_POLICY,
)

_TWIN_HEADERS = [(b"end-user", b"jason"), (b"end-user", b"bob"), (b"x-deny", b"1"), (b"x-deny", b""),
                 (b"x-canary", b"no"), (b"x-canary", b"yes"), (b"user-agent", b"t"), (b"x-request-id", b"r1"),
                 (b"accept", b"*/*"), (b"host", b"reviews:9080")]


@pytest.fixture(scope="module")
def twin_snap(tmp_path_factory):
    import shutil
    from pathlib import Path

    from policy.mesh import load_mesh_config
    from policy.scope import WaypointScope
    from proxy.snapshot import build_snapshot
    d = tmp_path_factory.mktemp("twin")
    fix = Path(__file__).parent / "fixtures" / "bookinfo"
    for name in ("inventory.yaml", "authz.yaml", "waypoint.yaml"):
        shutil.copy(fix / name, d / name)
    (d / "routing.yaml").write_text(_TWIN_ROUTING)
    mesh = load_mesh_config([str(d)])
    scope = WaypointScope.parse("default", gateway="default/reviews-waypoint", address_ip="127.1.0.100")
    return build_snapshot(mesh, mode="waypoint", scope=scope, version=1, now=0)


def _full_summary(plan):
    route = plan.route
    return (plan.chain, plan.decision, route, plan.fault, plan.upstream, plan.local, type(plan.error),
            getattr(plan.error, "status", None), str(plan.error), plan.mirrors,
            (plan.view.method, plan.view.path, plan.view.authority, plan.view.port))


def test_consulted_headers_are_the_policies_and_matchers_header_names(twin_snap):
    from proxy.pipeline.chains import match_chain
    from proxy.pipeline.http import consulted_headers
    chain = match_chain(("127.2.0.20", 9080), twin_snap).resolved("http")
    assert consulted_headers(chain, twin_snap) == {b"end-user", b"x-canary", b"x-deny"}


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(requests=st.lists(st.tuples(
    st.sampled_from([PRODUCTPAGE, OTHER, None]),
    st.sampled_from([("127.2.0.20", 9080), ("127.1.0.22", 9080), ("127.2.0.99", 9080)]),
    st.sampled_from([b"GET", b"PUT", b"DELETE", b"POST"]),
    st.sampled_from([b"/", b"/old/x?q=1", b"/gone", b"/canary/a", b"/only", b"/admin/x", b"/%41dmin"]),
    st.sampled_from([b"reviews:9080", b"reviews", b""]),
    st.lists(st.sampled_from(_TWIN_HEADERS), max_size=4)), min_size=1, max_size=25),
    seed=st.integers(0, 2 ** 16))
def test_plan_cached_plans_what_plan_request_plans(twin_snap, requests, seed):
    """The twin of the generic planner: the same requests, in the same order, with the same rng seed,
    give equal plans (decision, route, fault, upstream, mirrors, error, local answer, view's request line),
    whether the decisions were remembered (repeats hit the memo) or made afresh."""
    from proxy.pipeline.http import plan_cached, request_view
    memo, decisions = {}, {}
    cached_rng, plain_rng = random.Random(seed), random.Random(seed)
    for principal, authority, method, target, host, headers in requests * 2:   # each request again: hits
        ctx = _ctx(principal, authority)
        a = plan_cached(ctx, twin_snap, method, target, host, headers, authority[1], rng=cached_rng,
                        memo=memo, decisions=decisions)
        b = plan_request(ctx, twin_snap, request_view(method, target, host, headers, authority[1]), rng=plain_rng)
        assert _full_summary(a) == _full_summary(b)
    assert cached_rng.random() == plain_rng.random()   # the same draws, in the same order


def test_plan_cached_remembers_decisions_and_forgets_them_past_the_bound(twin_snap, monkeypatch):
    import proxy.pipeline.http as http_mod
    memo, decisions = {}, {}
    rng = random.Random(1)
    ctx = _ctx()
    first = http_mod.plan_cached(ctx, twin_snap, b"GET", b"/", b"reviews", [(b"x-deny", b"1")], 9080, rng=rng,
                                 memo=memo, decisions=decisions)
    assert not first.decision.allowed and len(decisions) == 1
    # Headers no policy or matcher reads are not part of the key: the same entry answers.
    again = http_mod.plan_cached(ctx, twin_snap, b"GET", b"/", b"reviews", [(b"user-agent", b"z"), (b"x-deny", b"1")],
                                 9080, rng=rng, memo=memo, decisions=decisions)
    assert again.decision is first.decision and again.view is first.view and len(decisions) == 1
    assert dict(first.view.headers) == {"x-deny": ("1",)}
    monkeypatch.setattr(http_mod, "DECISION_MEMO_ENTRIES", 3)
    for i in range(5):
        http_mod.plan_cached(ctx, twin_snap, b"GET", b"/p%d" % i, b"reviews", [], 9080, rng=rng, memo=memo,
                             decisions=decisions)
    assert 1 <= len(decisions) <= 3


def test_plan_cached_does_not_remember_requests_with_long_keys(twin_snap):
    """A long target (or consulted header) is planned as usual but not kept: the memo's keys stay small."""
    import proxy.pipeline.http as http_mod
    memo, decisions = {}, {}
    rng, plain = random.Random(5), random.Random(5)
    long_target = b"/" + b"a" * http_mod.DECISION_KEY_MAX_BYTES
    for target, headers in ((long_target, []), (b"/", [(b"end-user", b"j" * 2000)]), (b"/", [])):
        a = http_mod.plan_cached(_ctx(), twin_snap, b"GET", target, b"reviews", headers, 9080, rng=rng, memo=memo,
                                 decisions=decisions)
        b = plan_request(_ctx(), twin_snap, http_mod.request_view(b"GET", target, b"reviews", headers, 9080),
                         rng=plain)
        assert _full_summary(a) == _full_summary(b)
    assert [k[4] for k in decisions] == [b"/"] and not decisions[next(iter(decisions))][1].headers
