"""The waypoint's lean HTTP/1.1 request path (HttpPipeline._execute_lean, forward_bodiless) is a twin of
the generic one (_execute → _forward → _attempt → forward_request): the same scripted upstream answers,
the same requests, the same rng seed give the same bytes to the client and to every upstream connection,
the same access-log records, metrics and pool state — with LEAN_HTTP1 on and off. Untimed; fake streams
(the upstream side is a script: what each upstream request gets back, read by read)."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

import proxy.pipeline.http as http_mod
from proxy.pipeline.chains import match_chain
from proxy.pipeline.originate import OriginateFailed
from proxy.telemetry.metrics import Metrics
from tests.test_pipeline_plan import _ctx, snap  # noqa: F401  (snap: the bookinfo fixture)

OK = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
      b"Connection: keep-alive\r\n\r\nv1\n")
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
GRPC_UNAVAILABLE = b"HTTP/1.1 200 OK\r\ngrpc-status: 14\r\nContent-Length: 0\r\n\r\n"
CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"
CONTINUE_THEN_OK = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"

# One upstream request's fate: a list of reads ("eof": the upstream closes, "reset": it resets) or
# "refuse" (the dial fails).
SCRIPTS = {   # (each starts with a plain answer: the first request dials, the next ones find it pooled)
    "keepalive": [[OK]] * 4,
    "split": [[OK], [OK[:20], OK[20:]], [CHUNKED[:30], CHUNKED[30:]], [OK]],
    "retry-503": [[OK], [UNAVAILABLE], [OK], [UNAVAILABLE], [UNAVAILABLE], [UNAVAILABLE]],
    "grpc-status": [[OK], [GRPC_UNAVAILABLE], [OK], [OK]],
    "dead-pooled": [[OK], ["eof"], [OK], ["reset"], [OK]],
    "garbage": [[OK], [b"HTTP/1.1 2xx nope\r\n\r\n"], [b"NOT HTTP\r\n\r\n"], [b"\x00\x01"], [OK]],
    "close-and-more": [[OK], [CLOSE], [NO_CONTENT], [CONTINUE_THEN_OK], [OK]],
    "refused": [[OK], [CLOSE], "refuse", [OK], [CLOSE], "refuse", "refuse", "refuse", [OK]],
    "mid-body-reset": [[OK], [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "reset"]],
    "mid-body-eof": [[OK], [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "eof"]],
}
REQUESTS = [b"GET / HTTP/1.1\r\nHost: reviews:9080\r\nUser-Agent: t\r\n\r\n",
            b"GET /reviews/1?x=1 HTTP/1.1\r\nHost: reviews\r\n\r\n",
            b"HEAD / HTTP/1.1\r\nHost: reviews\r\nX-Request-Id: given\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: reviews\r\nx-deny: 1\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: reviews\r\nConnection: keep-alive\r\n\r\n"]


class _Stream:
    def __init__(self, on_write=None, name=""):
        self.name = name
        self.chunks: list = []
        self.written = bytearray()
        self.waiter: asyncio.Future | None = None
        self.on_write = on_write
        self.state = "open"
        self.remote_addr = ("127.1.0.10", 40000)
        self.local_addr = ("127.1.0.100", 15008)

    def feed(self, item):
        self.chunks.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def read(self, n=65536):
        while not self.chunks:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        item = self.chunks.pop(0)
        if item == "eof":
            self.chunks.insert(0, "eof")
            return b""
        if item == "reset":
            self.chunks.insert(0, "reset")
            raise ConnectionResetError("upstream reset")
        return item

    def write(self, data):
        if self.state != "open":
            raise ConnectionResetError(f"write on a {self.state} stream")
        self.written += data
        if self.on_write is not None:
            self.on_write(self)

    async def drain(self):
        pass

    def write_eof(self):
        self.state = "eof-sent"

    def close(self):
        self.state = "closed"

    def abort(self):
        self.state = "aborted"


class _Upstreams:
    """The originator: each dial is a stream that answers each complete request head from the script."""

    def __init__(self, script):
        self.script = list(script)
        self.streams: list[_Stream] = []

    async def open(self, cand, **kw):
        if self.script and self.script[0] == "refuse":
            self.script.pop(0)
            raise OriginateFailed("refused", "connection refused", upstream=cand.key)
        stream = _Stream(self._answer, f"up{len(self.streams)}@{cand.key}")
        self.streams.append(stream)
        return stream

    def _answer(self, stream):
        if not stream.written.endswith(b"\r\n\r\n"):
            return
        reads = self.script.pop(0) if self.script else [OK]
        if reads == "refuse":   # (a dial's fate drawn by an existing connection's request: answer normally)
            reads = [OK]
        loop = asyncio.get_running_loop()
        for item in reads:
            loop.call_soon(stream.feed, item)

    async def close(self):
        pass


class _Log:
    def __init__(self):
        self.records = []

    def enabled(self):
        return True

    def emit(self, record):
        self.records.append(dataclasses.replace(record, duration_ms=0.0))


def _pipeline(snap, ups, seed):
    """The pipeline under test (its originator ``ups``), its access log, metrics and rng, the tunnel's context
    and chain."""
    log, metrics, rng = _Log(), Metrics(), random.Random(seed)
    pipe = http_mod.HttpPipeline(ups, metrics=metrics, access_log=log, rng=rng, clock=lambda: 1000.0)
    ctx = _ctx()
    return pipe, log, metrics, rng, ctx, match_chain(ctx.authority, snap).resolved("http")


def _held(pipe, metrics) -> tuple[list, list]:
    """What the pipeline's HTTP metric series and its upstream pool hold."""
    series = sorted((key, s.count, s.request_sum, s.response_sum, tuple(s.request), tuple(s.response))
                    for key, s in metrics._http_series.items())
    pooled = sorted((k, [(s.name, s.state) for s, _, _ in conns]) for k, conns in pipe.h1pool._idle.items())
    return series, pooled


async def _session(snap, script, requests, seed, lean, monkeypatch):
    monkeypatch.setattr(http_mod, "LEAN_HTTP1", lean)
    ups = _Upstreams(script)
    pipe, log, metrics, rng, ctx, chain = _pipeline(snap, ups, seed)
    down = _Stream(name="down")
    down.feed(b"".join(requests))
    down.feed("eof")
    await asyncio.wait_for(pipe.serve(down, ctx, chain, lambda: snap), 10)
    series, pooled = _held(pipe, metrics)
    return (bytes(down.written), down.state, [(s.name, bytes(s.written), s.state) for s in ups.streams],
            log.records, series, pooled, rng.random(), pipe.requests, dict(pipe.active))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
async def test_lean_path_is_a_twin_of_the_generic_one(snap, name, monkeypatch):
    script = SCRIPTS[name]
    for seed in (1, 2):
        requests = (REQUESTS * 2)[seed:seed + 6]
        lean = await _session(snap, script, requests, seed, True, monkeypatch)
        generic = await _session(snap, script, requests, seed, False, monkeypatch)
        assert lean == generic
        assert lean[0]   # the client got answers


async def test_the_common_request_takes_the_lean_path(snap, monkeypatch):
    """A regression check (untimed): a bodiless GET with a plain forward goes through _execute_lean and
    forward_bodiless, never through _forward / forward_request, once the pool has a connection."""
    calls = []
    for name in ("_forward", "_execute"):
        orig = getattr(http_mod.HttpPipeline, name)

        def spy(self, *a, _orig=orig, _name=name, **kw):
            calls.append(_name)
            return _orig(self, *a, **kw)
        monkeypatch.setattr(http_mod.HttpPipeline, name, spy)
    out = await _session(snap, [[OK]] * 3, [REQUESTS[0]] * 3, 1, True, monkeypatch)
    assert out[0].count(b"HTTP/1.1 200 OK") == 3
    assert calls == ["_forward"]   # only the first request, which had to dial: handed over to _forward
    assert len(out[2]) == 1        # one upstream connection, reused
