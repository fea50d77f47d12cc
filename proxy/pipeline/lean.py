"""The waypoint's common HTTP/1.1 request, served inside the HBONE streams' callbacks.

A tunnel whose HTTP/1.1 client sends the common request — bodiless, keep-alive, no upgrade, not gRPC, one
whole head per read, routed to a plain forward (``plain_forward``) with an idle pooled upstream connection —
has it parsed, planned, sent upstream, answered and reported from the HBONE connections' ``data_received``:
no task wakes up for the request or for its response, no coroutine frames are resumed (``LeanHttp1``). It is
``HttpPipeline._execute_lean``'s first attempt made in callbacks; the steps, their order and their results
are the same (the twin tests: tests/test_pipeline_lean_callbacks.py).

Anything else goes to the coroutine path at the point it shows up, with nothing lost or done twice:
- a request that is not the common one (a body, an upgrade, pipelined or partial heads, a parse error,
  ``Connection: close``): the tunnel's bytes from that request on are handed to ``serve_http1`` (``prefix``),
  which serves the rest of the tunnel as before;
- a common request whose plan is not a plain forward, or gRPC: ``HttpPipeline.handle`` in a task, with the
  plan already made (``planned``), then back to callbacks;
- no idle pooled connection, a pooled one that was dead or broke, a retriable or streamed answer: the first
  attempt as made here is handed to ``_forward``/``_respond`` (``handle(..., resume=...)``) in a task — the
  fresh dial, retries and streaming are theirs.
The idle timeout of ``serve_http1`` (Envoy's HCM idle_timeout) is kept with one timer per tunnel; a partial
head goes to ``serve_http1``, whose head timeout bounds it.

PERF NOTE: what this saves is the coroutine machinery around the request, not protocol work: two task wake-ups
(the client's bytes, the upstream's answer), each resuming serve_http1 → handle → _execute_lean →
forward_bodiless → HboneStream.read, their futures, and _Conn.next_head's wait bookkeeping. Measured on the
benchmark's waypoint alone (benchmarks/http.py WaypointOnly, the C client at c=64 through HBONE, waypoint CPU per
request; 3 runs x 3 rounds of 4 s each, alternating with the previous tree, rounds 2-3 of each run:
benchmarks/results/2026-11-26-s6-ab.txt): 41.3 -> 34.9 us per request (medians; min 39.1 -> 33.3).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import deque
from typing import Callable, NamedTuple

from hbone.stream import StreamReset
from policy.routing.model import Outcome
from proxy.http1.client import Http1Response, encode_forward_head
from proxy.http1.codec import Http1Error, MessageEnd, ResponseHead
from proxy.http1.server import DEFAULT_LIMITS, Http1Limits, Http1Request, Responder, _Conn, _error_reply

from .answers import is_grpc
from . import http as pipeline_http
from .http import _NONE, DOWNSTREAM_REMOTE_DISCONNECT, _grpc_status_of, _raise, _value, apply_ops, plain_forward

log = logging.getLogger("hbone.waypoint")

# Ways a LeanHttp1 ends (LeanHttp1.run's answer): bytes — serve the rest of the tunnel with serve_http1 from
# these bytes on; CLOSE — the connection is over (client EOF, reset, idle timeout, ``Connection: close``
# answered): shut it as serve_http1 does.
CLOSE = None
_tuple_new = tuple.__new__


class _Flight(NamedTuple):
    """The request answered inline, from its upstream write to its answer (built with ``_tuple_new``)."""
    request: Http1Request
    responder: Responder
    snapshot: object
    planned: tuple        # HttpPipeline.begin's (plan, log, t0)
    up: object            # the plan's Upstream
    cand: object          # the host picked (Candidate)
    now: float            # when it was picked (the first attempt's time, for _forward)
    headers: list         # the upstream request's, after header operations
    target: bytes
    authority: bytes
    ustream: object       # the pooled upstream connection (HboneStream) and its parser
    ureader: object


def _skip_interim(events: deque) -> None:
    """Drop what precedes the final answer's head: 1xx interim responses (RFC 9110 §15.2) with their MessageEnd,
    as forward_bodiless skips them."""
    while events and not (events[0].__class__ is ResponseHead and events[0].status >= 200):
        events.popleft()


class _UpstreamListener:
    """The in-flight request's upstream stream reports here (a stream has one listener slot)."""

    __slots__ = ("lean",)

    def __init__(self, lean: "LeanHttp1"):
        self.lean = lean

    def h_data(self, data: bytes) -> None:
        self.lean.up_data(data)

    def h_eof(self) -> None:
        self.lean.up_failed(None)

    def h_error(self, err: StreamReset) -> None:
        self.lean.up_failed(err)

    def h_writable(self) -> None:
        pass   # the request head is written whole (a bodiless request): nothing waits to be sent


class LeanHttp1:
    """One tunnel's HTTP/1.1 server while its requests are the common one (see the module docstring).

    Also the downstream stream's listener (``h_data``/``h_eof``/``h_error``/``h_writable``)."""

    __slots__ = ("p", "h", "ctx", "chain", "snapshot", "conn", "loop", "fut", "busy", "held", "task", "started",
                 "timer", "last", "up_listener", "fl", "events")

    def __init__(self, pipeline, stream, ctx, chain, snapshot: Callable[[], object],
                 limits: Http1Limits = DEFAULT_LIMITS):
        self.p = pipeline
        self.h = stream
        self.ctx = ctx
        self.chain = chain
        self.snapshot = snapshot
        # The HTTP/1.1 server's per-connection state: its request parser, and what Responder reads and sets.
        self.conn = _Conn(stream, limits)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fut: asyncio.Future | None = None
        self.busy = False        # a request is being served (inline, or in a task); or its answer drains
        self.held: list[bytes] = []   # bytes that came meanwhile (unacknowledged: the stream window bounds them)
        self.task: asyncio.Task | None = None
        self.started = False     # the task has taken its first step (see _cancel_task)
        self.timer: asyncio.TimerHandle | None = None
        self.last = 0.0          # loop time the last request ended (the idle timeout counts from it)
        self.up_listener = _UpstreamListener(self)
        self.fl: _Flight | None = None   # the request answered inline, while its upstream answers
        self.events: deque = deque()   # its upstream response's parser events

    async def run(self, prefix: bytes = b"") -> bytes | None:
        """Serve in callbacks until the tunnel ends (``CLOSE``) or needs ``serve_http1`` (the bytes it starts
        from). ``prefix``: bytes already read from the stream (protocol sniffing)."""
        h = self.h
        loop = self.loop = asyncio.get_running_loop()
        self.fut = loop.create_future()
        self.last = loop.time()
        self.timer = loop.call_at(self.last + self.conn.limits.idle_timeout_s, self._on_timer)
        h.listen(self)
        h.watch_lost(self._lost)
        try:
            buffered = h.take_buffered()
            if buffered:
                h.ack(sum(map(len, buffered)))
                prefix = b"".join((prefix, *buffered))
            if prefix:
                self._serve(prefix)
            if h.lost:
                # Lost before the watcher was set (read by the sniffer, then reset): the request just begun
                # stops as one lost later would.
                self._lost(h.error)
            if not self.busy and not self.fut.done():
                if h.error is not None:
                    self.h_error(h.error)
                elif h.at_eof:
                    self.h_eof()
            result = await self.fut
        except BaseException:
            self._abandon()
            raise
        finally:
            self._stop()
        if result is CLOSE:
            await self.conn.shutdown()
        return result

    # -- the downstream stream's listener --
    def h_data(self, data: bytes) -> None:
        if self.busy:
            self.held.append(data)
            return
        self.h.ack(len(data))
        self._serve(data)

    def h_eof(self) -> None:
        if not self.busy:   # (else seen when the request in flight ends)
            self.conn.eof = True
            self._end(CLOSE)

    def h_error(self, err: StreamReset) -> None:
        if not self.busy:   # (else _lost: the request in flight is stopped)
            self.conn.aborted = True
            self._end(CLOSE)

    def _lost(self, err: StreamReset) -> None:
        """The tunnel can carry no answer any more (the client reset it, or its HBONE connection died). A request
        in flight stops as under Envoy's HCM on a downstream disconnect (conn_manager_impl.cc: the connection's
        RemoteClose → doConnectionClose with DownstreamConnectionTermination, "downstream_remote_disconnect"):
        its upstream request is reset, not left to run to its end, and it is logged with flag DC and no
        status."""
        if not self.busy:
            return   # an idle tunnel: h_error / h_eof end it
        self.conn.aborted = True
        if self.fl is not None:
            self._drop_flight("downstream connection termination")
            self._end(CLOSE)
        elif self.task is not None:
            self._cancel_task()   # handle() resets its upstream attempt and reports; _handle then ends the tunnel
        else:
            self._end(CLOSE)     # its answer is written and waits to drain: nothing upstream to stop

    def h_writable(self) -> None:
        if self.busy and self.fl is None and self.task is None and not self.h.over_send_buffer():
            self._next()

    # -- a request --
    def _serve(self, data: bytes) -> None:
        """One read's bytes: the common request served, or everything handed over (see the module docstring)."""
        try:
            self._dispatch(data)
        except Exception:   # noqa: BLE001 — a fault of ours must not escape into the HBONE connection
            log.exception("lean HTTP/1.1 server failed on a tunnel to %s", self.ctx.authority)
            self.conn.abort()
            self._end(CLOSE)

    def _dispatch(self, data: bytes) -> None:
        conn = self.conn
        reader = conn.reader
        try:
            events = reader.feed(data)
        except Http1Error:
            events = None
        if (events is None or len(events) != 2 or events[1] is not MessageEnd or reader.failed is not None
                or not reader.idle):
            # Not one whole bodiless request (a partial head, a body, pipelined requests, an error): serve_http1
            # parses these bytes afresh, with its own bounds, timeouts and answers.
            self._end(data)
            return
        head = events[0]
        if head.upgrade is not None or not head.keep_alive:
            self._end(data)
            return
        conn.requests += 1
        conn.response_started = False
        request = Http1Request(head, conn)
        responder = Responder(conn, request)
        p = self.p
        snapshot = self.snapshot()
        planned = p.begin(request, self.ctx, self.chain, snapshot)
        plan = planned[0]
        self.busy = True
        if not (pipeline_http.LEAN_HTTP1 and plain_forward(plan)) or is_grpc(head.headers):
            self._in_task(request, responder, snapshot, planned, None)
            return
        up = plan.upstream
        lg = planned[1]
        lg.cluster = up.cluster
        headers, target, authority = p._upstream_request(plan, up, request)
        method = head.method
        try:
            blob = encode_forward_head(method, target, authority, headers)
        except ValueError:   # a CR or LF in a field: answered where the generic path answers it
            self._in_task(request, responder, snapshot, planned, None)
            return
        now = time.monotonic()
        cand = p.lb.pick(up.candidates, rng=p.rng, exclude=_NONE, active_requests=p.active, lb=up.lb,
                         cluster=up.cluster, ejected=_NONE,
                         host_selection_max_attempts=up.retry.host_selection_max_attempts)
        if cand is None:   # NoHealthyUpstream, answered there
            self._in_task(request, responder, snapshot, planned, None)
            return
        key = cand.key
        pooled = p.h1pool.take(key)
        if pooled is None:
            first = (cand, now, p._attempt_fresh(cand, up, self.ctx, method, target, authority, headers, None, None,
                                                 [False]))
            self._in_task(request, responder, snapshot, planned, (headers, target, authority, first))
            return
        ustream, ureader = pooled
        lg.attempts, lg.host, lg.candidate = 1, key, cand
        active = p.active
        active[key] = active.get(key, 0) + 1
        ureader.expect(method)
        self.fl = _tuple_new(_Flight, (request, responder, snapshot, planned, up, cand, now, headers, target, authority,
                                       ustream, ureader))
        # (Http1Pool.take hands over only a connection that got nothing while idle — no bytes, no end, no reset — and
        # nothing can arrive before the listener is set below: the loop is not left in between.)
        try:
            ustream.write(blob)
        except OSError:
            # A pooled connection the upstream reset while idle: a fresh one (as _execute_lean).
            self._fresh()
            return
        ustream.listen(self.up_listener)

    # -- the upstream stream's listener (through _UpstreamListener) --
    def up_data(self, data: bytes) -> None:
        fl = self.fl
        ureader = fl.ureader
        fl.ustream.ack(len(data))
        events = self.events
        try:
            events.extend(ureader.feed(data))
        except Http1Error as err:
            self._hand_over(_raise(err), abort=True)
            return
        except Exception:   # noqa: BLE001 — see _serve
            log.exception("lean HTTP/1.1 server failed on an upstream answer to %s", self.ctx.authority)
            self._hand_over(_raise(Http1Error(502, "invalid response")), abort=True)
            return
        _skip_interim(events)
        if not events:
            return   # the head is not whole yet (the parser bounds it)
        try:
            self._answer()
        except Exception:   # noqa: BLE001 — see _serve
            log.exception("lean HTTP/1.1 server failed answering a tunnel to %s", self.ctx.authority)
            self.conn.abort()
            self._end(CLOSE)

    def up_failed(self, err: StreamReset | None) -> None:
        """The upstream ended (``err`` None) or reset before its answer was whole."""
        events = self.events
        if err is None:
            try:
                events.extend(self.fl.ureader.feed_eof())   # a response that ends with the connection ends here
            except Http1Error:
                pass
            _skip_interim(events)
            if events and events[-1] is MessageEnd:
                self._answer()
                return
        # Nothing of an answer: as forward_bodiless' UpstreamReset(before_response=True) on a pooled
        # connection — the upstream closed it while idle, a fresh one is tried.
        self._fresh()

    def _fresh(self) -> None:
        request, responder, snapshot, planned, up, cand, now, headers, target, authority, ustream, _ = self.fl
        ustream.listen(None)   # (before the abort, which would report its own reset here)
        ustream.abort()
        self._hand_over(self.p._attempt_fresh(cand, up, self.ctx, request.method, target, authority, headers,
                                              None, None, [False]))

    def _answer(self) -> None:
        """The upstream's head is here (``self.events[0]``): answer inline when the response is whole and not to
        be retried, else hand it over."""
        request, responder, snapshot, planned, up, cand, now, headers, target, authority, ustream, ureader = self.fl
        events = self.events
        self.events = deque()
        resp = Http1Response(events.popleft(), ustream, ureader, events, None, [0, True])
        key = cand.key
        gs = _grpc_status_of(resp.headers)
        whole = None
        if not up.retry.should_retry(1, Outcome(resp.status, None, int(gs) if gs.isdigit() else None)):
            whole = resp.complete_body()
        if whole is None:   # a retriable status, or a body still arriving: _forward / _respond
            self._hand_over(_value((resp, ustream, key)))
            return
        ustream.listen(None)
        self._settle(key)
        self.fl = None
        p = self.p
        plan, lg, t0 = planned
        lg.status = resp.status
        ops = up.response_ops
        try:
            data = responder.response_bytes(resp.status, apply_ops(list(resp.headers), ops) if ops else resp.headers,
                                            whole, resp.reason or None)
            self.h.write(data)
        except OSError as err:   # the client reset its tunnel meanwhile (as handle's OSError branch)
            resp.abort()
            lg.error = f"{err.__class__.__name__}: {err}"
            if not lg.flags:
                lg.flags.append("DC")
            p._report(plan, self.ctx, lg, request, responder, "http/1.1", t0, False)
            self.conn.aborted = True
            self._end(CLOSE)
            return
        except Exception as err:   # noqa: BLE001 — as handle's last branch, then serve_http1's 500
            resp.abort()
            lg.error = f"internal error: {err.__class__.__name__}: {err}"
            if not responder.head_sent:
                lg.server_status = 500
            p._report(plan, self.ctx, lg, request, responder, "http/1.1", t0, False)
            if responder.head_sent:
                self.conn.abort()
                self._end(CLOSE)
            else:
                self.task = self.loop.create_task(self._error_then_close(request))
            return
        p.inline += 1
        p._release(key, ustream, resp)
        p._report(plan, self.ctx, lg, request, responder, "http/1.1", t0, False)
        self._next()

    def _settle(self, key) -> None:
        active = self.p.active
        active[key] -= 1
        if not active[key]:
            del active[key]

    def _hand_over(self, attempt, abort: bool = False) -> None:
        """The inline request goes on in a task from its first attempt (``attempt``: its awaitable outcome; the
        parser events so far are the response's, if it has one)."""
        request, responder, snapshot, planned, up, cand, now, headers, target, authority, ustream, _ = self.fl
        self.fl = None
        self.events = deque()
        ustream.listen(None)
        if abort:
            ustream.abort()
        self._settle(cand.key)
        self._in_task(request, responder, snapshot, planned, (headers, target, authority, (cand, now, attempt)))

    # -- the coroutine path, one request at a time --
    def _in_task(self, request, responder, snapshot, planned, resume) -> None:
        self.started = False
        self.task = self.loop.create_task(self._handle(request, responder, snapshot, planned, resume))

    def _cancel_task(self) -> None:
        task = self.task
        if self.started:
            task.cancel()
            return
        # Created in this same round of callbacks and not run yet: cancelled now, its coroutine would never start —
        # no _handle try/finally, no report by handle(), the attempt it resumes never closed, and run() left
        # waiting for good (found by review). Cancelled once it has taken its first step instead.
        self.loop.call_soon(self._cancel_if_current, task)

    def _cancel_if_current(self, task: asyncio.Task) -> None:
        if self.task is task:
            task.cancel()

    async def _handle(self, request, responder, snapshot, planned, resume) -> None:
        """``HttpPipeline.handle`` for one request, then what serve_http1 does after a handler."""
        self.started = True
        conn = self.conn
        try:
            try:
                await self.p.handle(request, responder, self.ctx, self.chain, snapshot, "http/1.1", None, planned,
                                    resume)
                if not responder.ended:
                    raise RuntimeError("handler returned without ending the response")
            except asyncio.CancelledError:
                if not conn.aborted:
                    raise
                self._end(CLOSE)   # _lost: the client is gone, and handle() logged the request
                return
            except Exception as exc:  # noqa: BLE001 — serve_http1's one place that turns a failure into an answer
                if responder.head_sent or conn.aborted:
                    conn.abort()
                else:
                    await _error_reply(conn, request, exc.status if isinstance(exc, Http1Error) else 500)
                self._end(CLOSE)
                return
        finally:
            self.task = None
            if resume is not None:
                attempt = resume[3][2]
                if inspect.getcoroutinestate(attempt) == inspect.CORO_CREATED:
                    attempt.close()   # handle failed before _forward awaited it: no "never awaited" warning
        self._next()

    async def _error_then_close(self, request) -> None:
        try:
            await _error_reply(self.conn, request, 500)
        finally:
            self.task = None
            self._end(CLOSE)

    def _next(self) -> None:
        """The request ended: on to what came meanwhile, or wait for the next one."""
        h = self.h
        if not self.conn.keep_alive:
            self._end(CLOSE)
            return
        if h.over_send_buffer():
            return   # busy until h_writable: the client reads its answers slower than it asks
        self.busy = False
        self.last = self.loop.time()
        held = self.held
        if held:
            self.held = []
            data = held[0] if len(held) == 1 else b"".join(held)
            h.ack(len(data))
            self._serve(data)
        elif h.error is not None:
            self.h_error(h.error)
        elif h.at_eof:
            self.h_eof()

    def _on_timer(self) -> None:
        """serve_http1's idle timeout (Envoy's HCM idle_timeout: no request for that long → close quietly)."""
        loop = self.loop
        due = self.last + self.conn.limits.idle_timeout_s
        if not self.busy and loop.time() >= due:
            self.timer = None
            self._end(CLOSE)
            return
        self.timer = loop.call_at(max(due, loop.time() + 1.0), self._on_timer)

    # -- the end --
    def _end(self, result: bytes | None) -> None:
        """Stop serving in callbacks: what arrives from now on stays buffered in the stream for serve_http1."""
        fut = self.fut
        if fut is None or fut.done():
            return
        self.h.listen(None)
        if result is not CLOSE and self.held:
            data = b"".join(self.held)
            self.held = []
            self.h.ack(len(data))
            result += data
        fut.set_result(result)

    def _stop(self) -> None:
        self.h.listen(None)
        self.h.watch_lost(None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _abandon(self) -> None:
        """The tunnel's task was cancelled (the waypoint stops, the tunnel was closed): nothing more is served."""
        if self.fl is not None:
            self._drop_flight("downstream reset")
        if self.task is not None:
            self._cancel_task()

    def _drop_flight(self, error: str) -> None:
        """The inline request is over before its answer (the tunnel is lost or closed): its upstream connection
        is reset (it holds an answer nobody will read) and the request logged as handle() logs a cancelled one."""
        fl, self.fl = self.fl, None
        request, responder, snapshot, (plan, lg, t0), up, cand, *_, ustream, _ = fl
        self.events = deque()
        ustream.listen(None)
        ustream.abort()
        self._settle(cand.key)
        lg.error = error
        lg.detail = lg.detail or DOWNSTREAM_REMOTE_DISCONNECT
        if not lg.flags:
            lg.flags.append("DC")
        self.p._report(plan, self.ctx, lg, request, responder, "http/1.1", t0, False)


__all__ = ["LeanHttp1", "CLOSE"]
