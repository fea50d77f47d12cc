"""proxy.pipeline.lean (the common HTTP/1.1 request served inside the streams' callbacks) is a twin of the
coroutine server (serve_http1 → HttpPipeline.handle): the same scripted upstream answers, the same requests
arriving the same way, the same rng seed give the same bytes to the client and to every upstream connection,
the same access-log records, metrics, pool state and stream ends — with LEAN_CALLBACKS on and off. Untimed;
fake streams that speak the listener protocol of hbone's HboneStream (``listen``/``take_buffered``/``ack``).
Through real HBONE: tests/test_pipeline_lean_hbone.py."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proxy.pipeline.http as http_mod
import tests.test_pipeline_lean as tl
import proxy.pipeline.lean as lean_mod
from hbone.stream import StreamReset
from proxy.http1.server import Http1Limits
from proxy.pipeline.chains import match_chain
from proxy.telemetry.metrics import Metrics
from tests.test_pipeline_lean import OK, REQUESTS, SCRIPTS, _held, _pipeline, _Stream, _Upstreams
from tests.test_pipeline_plan import _ctx, snap  # noqa: F401  (snap: the bookinfo fixture)


class _ListenStream(_Stream):
    """_Stream with HboneStream's listener slot: what is fed goes to the listener while there is one."""

    def __init__(self, on_write=None, name=""):
        super().__init__(on_write, name)
        self.listener = None
        self.fed = 0       # bytes received
        self.acked = 0     # bytes a listener (or read) consumed
        self.eof_in = False
        self.err = None
        self.on_lost = None

    def listen(self, listener):
        self.listener = listener

    def watch_lost(self, on_lost):
        self.on_lost = on_lost

    @property
    def waiting(self):
        return self.waiter is not None and not self.waiter.done()

    @property
    def lost(self):
        return self.err is not None

    def abort(self):
        self.on_lost = None
        super().abort()

    def take_buffered(self):
        out = []
        while self.chunks and isinstance(self.chunks[0], bytes):
            out.append(self.chunks.pop(0))
        return out

    def ack(self, n):
        self.acked += n

    @property
    def at_eof(self):
        return self.eof_in

    @property
    def error(self):
        return self.err

    def over_send_buffer(self):
        return False

    def feed(self, item):
        if isinstance(item, bytes):
            self.fed += len(item)
        elif item == "eof":
            self.eof_in = True
        elif item == "reset":
            self.err = StreamReset("upstream reset")
        listener = self.listener
        if listener is None or self.state == "aborted":
            if item == "reset":
                self._lost()
            return super().feed(item)
        if item == "eof":
            listener.h_eof()
        elif item == "reset":
            listener.h_error(self.err)
            self._lost()
        else:
            listener.h_data(item)

    def _lost(self):
        """As HboneStream: the watcher hears of a reset after the listener, before a waiting reader wakes."""
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost(self.err)

    async def read(self, n=65536):
        data = await super().read(n)
        self.acked += len(data)
        return data


class _ListenUpstreams(_Upstreams):
    async def open(self, cand, **kw):
        stream = await super().open(cand, **kw)
        listening = _ListenStream(self._answer, stream.name)
        self.streams[-1] = listening
        return listening


async def _session(snap, script, requests, seed, callbacks, monkeypatch, how="one-read", lean=True):
    monkeypatch.setattr(http_mod, "LEAN_CALLBACKS", callbacks)
    monkeypatch.setattr(http_mod, "LEAN_HTTP1", lean)
    ups = _ListenUpstreams(script)
    pipe, log, metrics, rng, ctx, chain = _pipeline(snap, ups, seed)
    down = _ListenStream(name="down")
    server = asyncio.ensure_future(pipe.serve(down, ctx, chain, lambda: snap))
    if how == "pipelined":
        down.feed(b"".join(requests))
    for i, request in enumerate(requests if how != "pipelined" else ()):
        if how == "split":   # each head in two reads
            down.feed(request[:7])
            await asyncio.sleep(0)
            down.feed(request[7:])
        else:
            down.feed(request)
        for k in range(2200):   # until its access-log record is out (the answer was written before it)
            if len(log.records) > i or server.done() or down.state != "open":   # (or the server ended the tunnel)
                break
            await asyncio.sleep(0 if k < 200 else 0.005)   # (a retry's backoff takes real time)
        assert len(log.records) > i or server.done() or down.state != "open", f"request {i} not answered"
    down.feed("eof")
    await asyncio.wait_for(server, 10)
    series, pooled = _held(pipe, metrics)
    # A pooled upstream connection has had everything it sent consumed (acknowledged).
    for conns in pipe.h1pool._idle.values():
        for s, _, _ in conns:
            assert s.acked == s.fed, (s.name, s.fed, s.acked)
    return (bytes(down.written), down.state, (down.fed, down.acked),
            [(s.name, bytes(s.written), s.state, s.fed, s.acked) for s in ups.streams],
            log.records, series, pooled, rng.random(), pipe.requests, dict(pipe.active))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest.mark.parametrize("how", ["one-read", "split", "pipelined"])
async def test_callbacks_are_a_twin_of_the_coroutine_server(snap, name, how, monkeypatch):
    script = SCRIPTS[name]
    for seed in (1, 2):
        requests = (REQUESTS * 2)[seed:seed + 6]
        callbacks = await _session(snap, script, requests, seed, True, monkeypatch, how)
        coroutines = await _session(snap, script, requests, seed, False, monkeypatch, how)
        assert callbacks == coroutines
        assert callbacks[0].count(b"HTTP/1.") >= 1   # the client got answers


@pytest.mark.parametrize("name", ["keepalive", "retry-503", "dead-pooled"])
async def test_callbacks_twin_with_the_generic_path(snap, name, monkeypatch):
    """LEAN_HTTP1 off: every request goes to HttpPipeline.handle's generic path, from callbacks or not."""
    requests = (REQUESTS * 2)[1:7]
    callbacks = await _session(snap, SCRIPTS[name], requests, 1, True, monkeypatch, lean=False)
    coroutines = await _session(snap, SCRIPTS[name], requests, 1, False, monkeypatch, lean=False)
    assert callbacks == coroutines


async def test_the_common_request_is_served_in_callbacks(snap, monkeypatch):
    """A regression check (untimed): once the pool has a connection, the common request is answered inside the
    streams' callbacks — no HttpPipeline.handle, no task."""
    calls = []
    orig = http_mod.HttpPipeline.handle

    def spy(self, *a, **kw):
        calls.append(a[0].target)
        return orig(self, *a, **kw)
    monkeypatch.setattr(http_mod.HttpPipeline, "handle", spy)
    requests = [b"GET /r%d HTTP/1.1\r\nHost: reviews\r\n\r\n" % i for i in range(5)]
    out = await _session(snap, [[OK]] * 5, requests, 1, True, monkeypatch)
    assert out[0].count(b"HTTP/1.1 200 OK") == 5
    assert calls == [b"/r0"]     # only the first, which had to dial
    assert len(out[3]) == 1      # one upstream connection, reused
    assert [r.status for r in out[4]] == [200] * 5


async def test_a_request_with_a_body_hands_the_tunnel_to_serve_http1(snap, monkeypatch):
    served = []
    orig = http_mod.serve_http1

    async def spy(stream, handler, **kw):
        served.append(kw.get("prefix", b""))
        return await orig(stream, handler, **kw)
    monkeypatch.setattr(http_mod, "serve_http1", spy)
    # (a body ending in CRLF CRLF: the scripted upstream answers a request once its bytes end so)
    post = b"POST / HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\n\r\na\r\n\r\n"
    get = b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n"
    out = await _session(snap, [[OK]] * 4, [get, get, post, get], 1, True, monkeypatch)
    assert served == [post]       # from the POST on, the coroutine server (its bytes handed over whole)
    assert out[0].count(b"HTTP/1.1 200 OK") == 4


async def test_idle_timeout_closes_the_tunnel(snap):
    """serve_http1's idle timeout (Envoy's HCM idle_timeout) holds in callbacks: no request for that long →
    the connection is shut quietly (END_STREAM, then closed)."""
    ups = _ListenUpstreams([[OK]])
    pipe = http_mod.HttpPipeline(ups, metrics=Metrics(), rng=random.Random(1))
    ctx = _ctx()
    chain = match_chain(ctx.authority, snap).resolved("http")   # noqa: F811
    down = _ListenStream(name="down")
    lean = lean_mod.LeanHttp1(pipe, down, ctx, chain, lambda: snap, Http1Limits(idle_timeout_s=0.05, linger_s=0.05))
    down.feed(b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n")
    result = await asyncio.wait_for(lean.run(), 10)
    assert result is lean_mod.CLOSE
    assert down.written.startswith(b"HTTP/1.1 200 OK") and down.state == "closed"


async def _reset_while_upstream(snap, callbacks, monkeypatch):
    monkeypatch.setattr(http_mod, "LEAN_CALLBACKS", callbacks)
    ups = _ListenUpstreams([[OK], []])   # the second request gets no answer until the test feeds one
    pipe, log, _, _, ctx, chain = _pipeline(snap, ups, 1)
    down = _ListenStream(name="down")
    server = asyncio.ensure_future(pipe.serve(down, ctx, chain, lambda: snap))
    get = b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n"
    down.feed(get)
    while not log.records:
        await asyncio.sleep(0)
    down.feed(get)
    for _ in range(5):
        await asyncio.sleep(0)
    up = ups.streams[0]
    assert up.written.count(b"GET /") == 2     # the second request went out on the pooled connection
    down.feed("reset")
    down.state = "reset"                        # (writes now fail, as on a reset HboneStream)
    up.feed(OK)
    await asyncio.wait_for(server, 10)
    return log.records, up.state, bytes(down.written), pipe.h1pool._idle, pipe.active


async def test_client_reset_while_the_upstream_answers(snap, monkeypatch):
    """The client resets its tunnel while its request is upstream: the answer cannot be written, the upstream
    connection is reset (not pooled with an answer half-read) and the request is logged DC — as handle does
    (its status is the answer's, whose head was made before the write failed)."""
    callbacks = await _reset_while_upstream(snap, True, monkeypatch)
    assert callbacks == await _reset_while_upstream(snap, False, monkeypatch)
    records, up_state, written, idle, active = callbacks
    assert [r.response_flags for r in records] == ["-", ("DC",)]
    assert up_state == "aborted" and not idle and not active
    assert written.count(b"HTTP/1.1 200 OK") == 1


async def test_a_client_that_reads_slowly_is_not_sent_more(snap, monkeypatch):
    """Backpressure, as serve_http1's drain after each answer: while the tunnel's send buffer is over its bound,
    the next request waits (held, not acknowledged) until the stream reports it writable again."""
    monkeypatch.setattr(http_mod, "LEAN_CALLBACKS", True)

    class Slow(_ListenStream):
        full = False

        def over_send_buffer(self):
            return self.full

    pipe, log, _, _, ctx, chain = _pipeline(snap, _ListenUpstreams([[OK]] * 3), 1)
    down = Slow(name="down")
    server = asyncio.ensure_future(pipe.serve(down, ctx, chain, lambda: snap))
    get = b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n"
    down.full = True          # from now on, answers do not leave
    down.feed(get)
    while not log.records:
        await asyncio.sleep(0)
    down.feed(get)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(log.records) == 1 and down.acked == len(get)   # the second request is held, unacknowledged
    down.full = False
    down.listener.h_writable()
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(log.records) == 2 and down.acked == 2 * len(get)
    assert down.written.count(b"HTTP/1.1 200 OK") == 2
    down.feed("eof")
    await asyncio.wait_for(server, 10)


# Requests a client may send on one tunnel, for the property below: the common one, others the callback
# server must hand over (a body, Connection: close, an upgrade, garbage), and HEAD.
_MIXED = [
    *REQUESTS,
    b"POST /p HTTP/1.1\r\nHost: reviews\r\nContent-Length: 5\r\n\r\na\r\n\r\n",
    b"GET /c HTTP/1.1\r\nHost: reviews\r\nConnection: close\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: reviews\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"BAD REQUEST\r\n\r\n",
]
_READS = [[OK], [OK[:20], OK[20:]], [tl.CHUNKED], [tl.UNAVAILABLE], [tl.CLOSE], [tl.NO_CONTENT],
          [tl.CONTINUE_THEN_OK], ["eof"], ["reset"], [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "eof"],
          [b"NOT HTTP\r\n\r\n"], "refuse"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.sampled_from(_MIXED), min_size=1, max_size=6),
       script=st.lists(st.sampled_from(_READS), max_size=8),
       how=st.sampled_from(["one-read", "split", "pipelined"]), seed=st.integers(0, 3))
def test_callbacks_twin_property(snap, requests, script, how, seed):
    """Any mix of requests, arrivals and upstream fates: the callback server and the coroutine server give the
    client, the upstreams, the log, the metrics and the pool the same."""
    async def both():
        with pytest.MonkeyPatch.context() as mp:
            a = await _session(snap, [[OK]] + script, requests, seed, True, mp, how)
            b = await _session(snap, [[OK]] + script, requests, seed, False, mp, how)
        return a, b
    callbacks, coroutines = asyncio.run(both())
    assert callbacks == coroutines
