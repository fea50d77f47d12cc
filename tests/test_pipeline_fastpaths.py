"""The waypoint's per-request fast paths are in effect and change nothing (untimed): a plan made with the
per-snapshot memo equals one made without it, and the memo holds what was resolved once."""

from __future__ import annotations

import random

from policy.routing.select import HttpRequestView
from proxy.pipeline.authz import l7_authorizer
from proxy.pipeline.http import plan_request
from tests.test_pipeline_plan import PRODUCTPAGE, _ctx, snap  # noqa: F401  (snap: the bookinfo fixture)

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
    import proxy.pipeline.http as http_mod
    from hbone.stream import PrefixedStream
    calls = []

    async def fake_http1(stream, handler, **kw):
        calls.append(("http/1.1", stream, kw.get("prefix", b"")))

    async def fake_h2c(stream, handler, **kw):
        calls.append(("h2c", stream, b""))

    monkeypatch.setattr(http_mod, "serve_http1", fake_http1)
    monkeypatch.setattr(http_mod, "serve_h2c", fake_h2c)
    pipeline = http_mod.HttpPipeline(originator=None)
    inner = object()
    await pipeline.serve(PrefixedStream(inner, b"GET / HTTP/1.1\r\n"), None, None, lambda: None)
    wrapped = PrefixedStream(inner, b"PRI * HTTP/2.0")
    await pipeline.serve(wrapped, None, None, lambda: None, "h2c")
    assert calls == [("http/1.1", inner, b"GET / HTTP/1.1\r\n"), ("h2c", wrapped, b"")]
