"""HTTP chains: each request inside the tunnel goes through Envoy's HTTP filter chain and router.

Per request (decide, then do): ``plan_request`` (pure) runs L7 authorization (403 ``RBAC: access
denied``), route selection (404 ``NR``; redirect; direct response), the fault decision and the weighted
destination, and lists the candidate endpoints. ``HttpPipeline`` then executes the plan: fault delay
(``DI``) / abort (``FI``), endpoint pick with previous-host exclusion, connect_originate, forward with
the route timeout (504 ``UT``), per-try timeout and retries (``RetryPolicy``; exhausted → the last
failure's flag plus ``URX``, or the last upstream response when a retriable status was the reason, as
Envoy does), header operations, and a response streamed back chunk by chunk.

Hot path (each a twin of the generic code, tested against it): ``plan_cached`` remembers the deterministic
half of a plan (authorization decision, route) per snapshot under everything it reads and draws the random
half per request; ``HttpPipeline._execute_lean`` runs the common HTTP/1.1 request (no body, a plain
forward) with its first attempt inline on a pooled connection, handing anything unusual to ``_forward``.

One request executor serves both front-ends: ``serve`` runs the HTTP/1.1 server (``proxy.http1``) or
the h2c server (``proxy.pipeline.h2c``) on the tunnel's stream and both hand each request to
``handle`` — the request/responder objects share one duck-typed interface.

Upstream protocol (Istio's cluster protocol): a destination port declared ``http2``/``grpc`` gets
HTTP/2 (h2c, one multiplexed connection per endpoint: ``H2UpstreamPool``); one declared ``http`` gets
HTTP/1.1; an undeclared (sniffed) port gets the downstream's protocol (Envoy ``USE_DOWNSTREAM_PROTOCOL``).
Upstream HTTP/1.1 connections are kept per endpoint (``Http1Pool``: one HBONE stream per upstream
HTTP/1.1 connection — HBONE streams are cheap, the TLS connection under them is pooled by HbonePool).

DestinationRule ``connectionPool`` limits (Envoy's circuit breakers: requests, connections, pending requests,
retries, requests per connection; ``Upstream.limits``) are decided in ``proxy.pipeline.circuit`` and applied by
``_execute`` (requests in flight), ``_forward`` (retries) and ``_attempt_limited`` / ``_attempt_h2`` (the
cluster's own counted connections, the FIFO of pending requests). A cluster without limits never meets them.

gRPC (``content-type: application/grpc*``): local replies are converted as Envoy does
(``Grpc::Utility::httpToGrpcStatus``: HTTP 200 with ``grpc-status``/``grpc-message``, no body), a
``fault.abort.grpcStatus`` answers that status, metrics say ``request_protocol="grpc"`` with the
``grpc_response_status`` of the answer (trailers, or the trailers-only head), and response trailers
pass through. Mirrors (``proxy.pipeline.mirror``) get a copy of each mirrored request.

WebSocket (HTTP/1.1 ``Connection: upgrade`` + ``Upgrade: websocket``; Istio's HCM has ``upgrade_configs:
[{upgrade_type: websocket}]``): the upgrade request is authorized, routed, faulted and sent to the weighted
destination like any request (over HTTP/1.1, with Connection/Upgrade kept); a ``101`` from the upstream is
forwarded and the two connections are then relayed as bytes (``_relay_upgraded``); any other answer is an
ordinary response. Other upgrade protocols get Envoy's 403 ``upgrade_failed``.
"""

from __future__ import annotations

import asyncio
import logging
import functools
import random
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, NamedTuple

from hbone.relay import relay
from hbone.stream import MiB, ByteStream, PrefixedStream
from policy.authn import authenticate
from policy.authz.evaluate import Decision
from policy.authz.match import normalize_path
from policy.wire import wire_form
from policy.authz.model import A_REQUEST_HEADER
from policy.inventory import Service
from policy.routing.endpoints import Candidate, LoadBalancer, OutlierDetector, cluster_candidates, detector_for
from policy.routing import cors as cors_filter
from policy.routing.hashing import request_hash
from policy.routing.model import (CONNECT_FAILURE, DEFAULT_RETRY_POLICY, PER_TRY_TIMEOUT, RESET, ConsistentHash,
                                  CorsPolicy, FaultDecision, HeaderOps, Outcome, OutlierDetection, RetryPolicy)
from policy.routing.select import (DirectResponse, Forward, GwMatcher, HttpRequestView, NoRoute as NoRouteDecision,
                                   Redirect, RouteDecision, VsMatcher, choose_destination, decide_fault, route_http)
from proxy.errors import (AuthorizationDenied, NoHealthyUpstream, NoRoute, ProxyError, UnknownDestination,
                          UpstreamReset, UpstreamTimeout)
from proxy.http1.client import Http1Pool, forward_bodiless, forward_request
from proxy.http1.client import UpstreamReset as ClientUpstreamReset
from proxy.http1.codec import Http1Error
from proxy.http1.server import serve_http1
from proxy.snapshot import Snapshot
from proxy.telemetry.accesslog import AccessRecord
from proxy.telemetry.metrics import PeerInfo, ServiceInfo, traffic_labels

from policy.routing.model import REFUSED_STREAM
from policy.routing.select import NO_FAULT, mirrors_for

from .answers import (BadUpstreamResponse, DestinationUnavailable, FaultAbort, JwtRejected, PathRejected,
                      RequestOverflow, UpgradeFailed, exhausted, flags_of, grpc_local_reply, is_grpc, local_reply)
from .authz import jwt_rules, l7_authorizer, l7_decision
from .chains import INBOUND_VIP, Chain, match_chain
from .circuit import (OVERFLOW, WAIT, CircuitBreakers, CircuitLimits, CountedStream, circuit_limits, hand_over,
                      release_connection)
from .context import TunnelContext, addr_str
from .h2c import H2UpstreamPool, H2UpstreamReset, RequestTrailers, serve_h2c
from .mirror import Mirrorer
from .originate import CONNECT_TIMEOUT_S, OriginateFailed, Originator

log = logging.getLogger("hbone.waypoint")

# Kubernetes appProtocol values whose upstream speaks HTTP/2 with prior knowledge (Istio builds
# those clusters with http2_protocol_options).
H2_APP_PROTOCOLS = frozenset({"http2", "grpc", "h2c"})

# Istio's HTTP connection managers (sidecar, waypoint) set upgrade_configs: [{upgrade_type: websocket}]:
# an HTTP/1.1 "Upgrade: websocket" request is routed like any request, then relayed as bytes after a 101.
UPGRADE_TYPE = b"websocket"

# The waypoint's common request (HTTP/1.1, no body, a plain forward) takes HttpPipeline._execute_lean; False:
# every request takes _execute (the generic path, which the lean one is tested against).
LEAN_HTTP1 = True
# An HTTP/1.1 client in an HBONE tunnel is served by proxy.pipeline.lean.LeanHttp1 (the common request inside the
# streams' callbacks, the rest handed to serve_http1); False: serve_http1 from the start.
LEAN_CALLBACKS = True

# Envoy per_connection_buffer_limit_bytes default (1 MiB): a request body up to this is buffered so a
# retry can replay it; a longer one is streamed and the request is not retried once it was sent.
REQUEST_BUFFER_LIMIT_BYTES = 1 * MiB


class UpstreamProtocolError(BadUpstreamResponse):
    """An HTTP/2 upstream's response head over the limits (``H2UpstreamReset.protocol_error``): we reset its
    stream and answer 502 ``UPE``, as Envoy's router does for an upstream stream reset with reason
    ``protocol_error`` before any response went downstream (body "upstream connect error or disconnect/reset
    before headers. reset reason: protocol error", details
    ``upstream_reset_before_response_started{protocol_error}``)."""
    detail = "upstream_reset_before_response_started{protocol_error}"
    body_override = b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"


# Envoy's details for the same reset once the response head had gone downstream (the client's stream is reset).
UPSTREAM_RESET_AFTER_PROTOCOL_ERROR = "upstream_reset_after_response_started{protocol_error}"
# Envoy's details for a request whose client went away before its answer (conn_manager_impl.cc onEvent, RemoteClose:
# doConnectionClose(..., DownstreamConnectionTermination, ResponseCodeDetails DownstreamRemoteDisconnect)), flag DC.
DOWNSTREAM_REMOTE_DISCONNECT = "downstream_remote_disconnect"
# Envoy's HTTP/2 codec details for a header block (head or trailers) over max_headers_kb / max_headers_count
# (codec_impl.cc Http2ResponseCodeDetailValues::too_many_headers).
H2_TOO_MANY_HEADERS = "http2.too_many_headers"


# ---------------------------------------------------------------------------------------------
# Decide


@dataclass(frozen=True)
class Upstream:
    """The cluster a request goes to and how (everything the router needs, resolved from the config)."""

    cluster: str
    service: Service | None
    candidates: tuple[Candidate, ...]
    retry: RetryPolicy
    timeout_s: float | None
    connect_timeout_s: float
    lb: str
    request_ops: tuple[HeaderOps, ...] = ()
    response_ops: tuple[HeaderOps, ...] = ()
    outlier: OutlierDetection | None = None
    app_protocol: str | None = None     # the destination port's appProtocol (None: undeclared)
    # The DestinationRule's loadBalancer.consistentHash: the host is picked by a hash of the request
    # (policy/routing/hashing.py) on a ring or Maglev table, not by ``lb``.
    consistent: ConsistentHash | None = None
    # The DestinationRule's connectionPool limits (Envoy's circuit breakers, proxy/pipeline/circuit.py); None
    # when it sets none: such a cluster never meets the circuit breakers at all.
    limits: CircuitLimits | None = None
    # The route rule's VirtualService corsPolicy (policy/routing/cors.py decides per request); None: no CORS.
    cors: CorsPolicy | None = None
    # One of several weighted destinations' own ``host`` (its headers.request set/add of host): Envoy's weighted
    # cluster host_rewrite_literal, which istiod sets there (processWeightedDestination); None: no rewrite.
    host_rewrite: bytes | None = None

    def uses_h2(self, downstream: str) -> bool:
        """HTTP/2 upstream for http2/grpc ports; the downstream's protocol for undeclared ones."""
        if self.app_protocol is None:
            return downstream == "h2c"
        return self.declared_h2

    @functools.cached_property
    def plain(self) -> bool:
        """No route or per-try timeout, no outlier detection, not HTTP/2 by declaration, no consistent
        hashing (a hash key per request and maybe a Set-Cookie), no connectionPool limits (counted requests,
        connections and retries), no corsPolicy on the route (a preflight answered here, headers set on the
        answer): what ``HttpPipeline._execute_lean`` needs (cached, as declared_h2; so a route without a
        corsPolicy pays nothing per request for CORS)."""
        return (not self.timeout_s and self.retry.per_try_timeout_s is None and self.outlier is None
                and not self.declared_h2 and self.consistent is None and self.limits is None
                and self.cors is None)

    @functools.cached_property
    def declared_h2(self) -> bool:
        # Cached (upstreams are memoised per snapshot; a frozen dataclass allows cached_property):
        # the lower-casing and lookup were ~1 % of the in-process request path.
        return self.app_protocol is not None and self.app_protocol.lower() in H2_APP_PROTOCOLS


class RequestPlan(NamedTuple):
    """plan_request's answer. A NamedTuple (one per request): see HttpRequestView in
    policy/routing/select.py for why."""

    chain: Chain | None
    view: HttpRequestView
    decision: Decision | None
    route: RouteDecision | NoRouteDecision | None = None
    fault: FaultDecision = NO_FAULT
    upstream: Upstream | None = None
    local: Redirect | DirectResponse | None = None
    error: ProxyError | None = None      # answer this instead of forwarding
    mirrors: tuple[Upstream, ...] = ()   # copies of the request go there (responses discarded)


# RequestPlan(*fields) without the NamedTuple's generated __new__ (a Python function with keyword defaults):
# tuple.__new__ with all nine fields in order, ~0.2 us less per request (timeit).
# PERF NOTE (with the mirror-less shortcut in _draw_plan, Upstream.plain and the codec's events built the
# same way, inlined on_message_begin): in-process /tmp/wp/inproc.py (as plan_cached's note) 36.0 -> 33.4 us
# per request; the mesh A/B (/tmp/wp/ab.py, 6 x 3 s, a loaded box) 67.2 -> 62.3 us, within its noise.
_new_plan = tuple.__new__


def _upstream_for(chain: Chain, snapshot: Snapshot, forward: Forward | None, dest) -> Upstream | ProxyError:
    inv = snapshot.mesh.inventory
    if chain.kind != INBOUND_VIP:
        # direct-http: the pod addressed, at the port addressed (Envoy's original-destination cluster).
        wl = chain.workload
        assert wl is not None
        cand = Candidate(wl, chain.destination[0], chain.destination[1], wl.uid)
        return Upstream(f"inbound-pod|{chain.port}||{chain.destination[0]}", None, (cand,),
                        DEFAULT_RETRY_POLICY, None, CONNECT_TIMEOUT_S, "LEAST_REQUEST", app_protocol=chain.declared)
    assert forward is not None
    if dest.fail_status is not None:
        return DestinationUnavailable(dest.fail_status, dest.fail_flag, dest.problem)
    svc = inv.services.get(dest.service_key) if dest.service_key else None
    if svc is None:
        return DestinationUnavailable(503, "NC", f"unknown service {dest.host}")
    tp = dest.traffic_policy
    pool = tp.connection_pool
    connect_timeout = pool.connect_timeout_s if pool is not None and pool.connect_timeout_s else CONNECT_TIMEOUT_S
    rule_headers = forward.headers
    rule_req, rule_resp = getattr(rule_headers, "request", None), getattr(rule_headers, "response", None)
    host_rewrite = None
    if len(forward.destinations) > 1:
        # istiod puts a weighted destination's header operations on its weighted cluster, which Envoy applies
        # before the route's ("weighted cluster level, route level, virtual host level, route configuration
        # level": the rule's `set` wins); one destination's are merged into the route's after the rule's.
        req_ops = tuple(o for o in (dest.headers.request, rule_req) if o)
        resp_ops = tuple(o for o in (dest.headers.response, rule_resp) if o)
        if dest.headers.authority is not None:
            host_rewrite = wire_form(dest.headers.authority).encode("latin-1")
    else:
        req_ops = tuple(o for o in (rule_req, dest.headers.request) if o)
        resp_ops = tuple(o for o in (rule_resp, dest.headers.response) if o)
    # DestinationRule localityLbSetting (or the mesh default with outlier detection), warmup, and the Service's
    # loadBalancer (its traffic distribution, Strict scopes, AllowAll health policy): priorities, locality weights
    # relative to this waypoint's own pod (Snapshot.proxy_workload), slow start — carried by the candidates
    # (Prioritized), so the pick call sites stay as they are. Memoised per snapshot, as the whole Upstream.
    candidates = cluster_candidates(inv, svc, dest.port, dest.subset_labels, tp, snapshot.proxy_workload)
    return Upstream(dest.cluster_name, svc, candidates,
                    forward.retry, forward.timeout_s, connect_timeout, tp.lb_algorithm, req_ops, resp_ops,
                    tp.outlier_detection, svc.app_protocols.get(dest.port) if dest.port is not None else None,
                    tp.consistent_hash, circuit_limits(pool), getattr(rule_headers, "cors", None), host_rewrite)


class _StopOnLoss:
    """Stops ``serve_http1``'s task when its HBONE stream is lost (``HboneStream.watch_lost``: the client reset the
    tunnel or its connection died) while the task waits on something else — an upstream's answer, a retry's back-off,
    a fault's delay. Envoy's HCM resets the requests of a connection that went away (conn_manager_impl.cc onEvent:
    RemoteClose → doConnectionClose → each active stream's onResetStream, whose router resets its upstream request);
    without this the request would run to its end upstream, and its answer would find the tunnel gone. A task that
    waits on the stream itself (``waiting``: a read or a drain) sees the loss there, as before."""

    __slots__ = ("task", "stream", "fired")

    def __init__(self, task: asyncio.Task, stream) -> None:
        self.task = task
        self.stream = stream
        self.fired = False

    def __call__(self, err) -> None:
        if not self.stream.waiting:
            self.fired = True
            self.task.cancel()


_NONE: frozenset = frozenset()   # no hosts excluded / ejected (one shared empty set, not two per attempt)

# Upstream memo entries per snapshot: a snapshot holds finitely many (route action, destination) pairs;
# the bound only protects against a pathological config (the memo is then simply restarted).
UPSTREAM_MEMO_ENTRIES = 4096


def _upstream_memo(memo: dict | None, chain: Chain, snapshot: Snapshot, forward: Forward, dest) -> Upstream | ProxyError:
    """``_upstream_for`` for a VIP chain, remembered per snapshot: the same route action and destination
    always give the same Upstream (endpoints_for walks the inventory: ~20 µs per request otherwise).
    Keyed by identity — the memo holds both objects, so their ids cannot be reused while cached.

    Measured with the timeout-context skips and the peer-label memo (python -m benchmarks --only http,
    load c=64): waypoint 170 → 140 µs per request, 6 467 → 7 867 req/s through the three proxies."""
    if memo is None:
        return _upstream_for(chain, snapshot, forward, dest)
    key = (id(forward), id(dest))
    hit = memo.get(key)
    if hit is not None and hit[0] is forward and hit[1] is dest:
        return hit[2]
    up = _upstream_for(chain, snapshot, forward, dest)
    if len(memo) >= UPSTREAM_MEMO_ENTRIES:
        memo.clear()
    memo[key] = (forward, dest, up)
    return up


def _chain_for(ctx: TunnelContext, snapshot: Snapshot, memo: dict | None) -> Chain | UnknownDestination:
    chain = memo.get(ctx.authority) if memo is not None else None
    if chain is None:
        try:
            chain = match_chain(ctx.authority, snapshot).resolved("http")
        except UnknownDestination as err:
            # The service left this waypoint's scope since the tunnel opened (config reload).
            return err
        # The chain depends only on the authority and the snapshot. Under cProfile (64 keep-alive
        # clients) plan_request went 278 → 216 ms per 2 560 requests; the benchmark cannot see it
        # (load c=64: 7 240 and 7 371 req/s, waypoint 153 / 149 µs per request, within run-to-run noise).
        if memo is not None:
            if len(memo) >= UPSTREAM_MEMO_ENTRIES:
                memo.clear()
            memo[ctx.authority] = chain
    return chain


def _decide_request(ctx: TunnelContext, snapshot: Snapshot, chain: Chain, view: HttpRequestView,
                    memo: dict | None, claims=None) -> tuple[Decision, RouteDecision | NoRouteDecision | None]:
    """The deterministic half of a plan: the L7 decision, then (allowed, service chain) the route. ``claims``: the
    request's JWT as a RequestAuthentication validated it (``request.auth.*`` and ``requestPrincipals``)."""
    decision = l7_decision(chain, snapshot, ctx.source_ip, ctx.peer_identity, method=view.method,
                           path=view.path, host=view.authority, headers=view.headers, memo=memo, claims=claims)
    if not decision.allowed or chain.kind != INBOUND_VIP:
        return decision, None
    assert chain.service is not None and snapshot.routes is not None
    return decision, route_http(view, snapshot.routes.http_routes_for(chain.service, chain.port))


def _draw_plan(ctx: TunnelContext, snapshot: Snapshot, chain: Chain, view: HttpRequestView, decision: Decision,
               route, rng: random.Random, memo: dict | None) -> RequestPlan:
    """The rest of a plan from ``_decide_request``'s answer: the error or local answer it implies, else
    the fault, weighted destination and mirrors drawn from ``rng`` (in that order)."""
    if not decision.allowed:
        return RequestPlan(chain, view, decision, error=AuthorizationDenied(detail=decision.response_detail))
    if chain.kind != INBOUND_VIP:
        up = _upstream_for(chain, snapshot, None, None)
        assert isinstance(up, Upstream)
        return RequestPlan(chain, view, decision, upstream=up)
    if isinstance(route, NoRouteDecision):
        return RequestPlan(chain, view, decision, route, error=NoRoute(route.reason))
    action = route.action
    if isinstance(action, (Redirect, DirectResponse)):
        return RequestPlan(chain, view, decision, route, local=action)
    fault = decide_fault(action, rng)
    up = _upstream_memo(memo, chain, snapshot, action, choose_destination(action, rng))
    if isinstance(up, ProxyError):
        return RequestPlan(chain, view, decision, route, fault, error=up)
    if not action.mirrors:   # (mirrors_for draws nothing then: the common route, without the generator)
        return _new_plan(RequestPlan, (chain, view, decision, route, fault, up, None, None, ()))
    # Mirrors: each drawn against its percentage; a mirror destination that cannot be served (no
    # such cluster) is skipped — Envoy ignores a missing shadow cluster, the main request is unaffected.
    # One with no endpoint is still fired, and fails (counted), as Envoy's shadow would with UH.
    mirrors = tuple(m for m in (_upstream_memo(memo, chain, snapshot, action, d) for d in mirrors_for(action, rng))
                    if isinstance(m, Upstream))
    return RequestPlan(chain, view, decision, route, fault, up, mirrors=mirrors)


def plan_request(ctx: TunnelContext, snapshot: Snapshot, view: HttpRequestView, *, rng: random.Random,
                 memo: dict | None = None, claims=None) -> RequestPlan:
    """One request against the snapshot: authorize → route → fault → destination → endpoints. Pure
    (``memo``: an optional per-snapshot cache of resolved chains and upstreams, owned by the caller)."""
    chain = _chain_for(ctx, snapshot, memo)
    if not isinstance(chain, Chain):
        return RequestPlan(None, view, None, error=chain)
    decision, route = _decide_request(ctx, snapshot, chain, view, memo, claims)
    return _draw_plan(ctx, snapshot, chain, view, decision, route, rng, memo)


# Remembered (authorization, route) answers per pipeline and snapshot (see plan_cached); past this many
# distinct requests the memo starts afresh, so a scan of unique paths costs a lookup and a store each.
DECISION_MEMO_ENTRIES = 4096
# A request whose target, authority and consulted header values together exceed this is planned without the
# memo: its key would hold up to a 60 KiB head (MAX_HEAD_BYTES), so a client sending long unique URLs could
# otherwise pin ~240 MiB; with the bound the memo holds at most ~4 MiB of keys. Real targets are far shorter.
DECISION_KEY_MAX_BYTES = 1024
_PSEUDO_NAMES = frozenset((":authority", ":method", ":path", ":scheme"))


def plain_forward(plan: RequestPlan) -> bool:
    """The plan is a plain forward: authorized and routed to a cluster that needs none of the generic path's
    machinery (``Upstream.plain``), no fault, no mirror — with an HTTP/1.1 bodiless request, what
    ``HttpPipeline._execute_lean`` (and proxy.pipeline.lean's inline path) serve."""
    up = plan.upstream
    return up is not None and up.plain and plan.error is None and plan.fault is NO_FAULT and not plan.mirrors


def consulted_headers(chain: Chain, snapshot: Snapshot, memo: dict | None = None) -> frozenset[bytes] | None:
    """The request header names (lower-case bytes, as the HTTP/1.1 codec gives them) whose values the
    chain's L7 authorization and route matching read; None when that cannot be told (a matcher of an
    unknown kind). Pseudo-headers and ``host`` are the request line's method/target/authority, always part
    of ``plan_cached``'s key; ``host`` is listed too when a policy reads the Host header itself."""
    key = ("consulted", id(chain))
    hit = memo.get(key) if memo is not None else None
    if hit is not None and hit[0] is chain:
        return hit[1]
    names: set[str] | None = set()
    a = l7_authorizer(chain, snapshot, memo)
    for policy in a.denies + a.allows + a.dry_denies + a.dry_allows + a.audits:
        for _, clauses in policy.compiled_rules:
            for matches in clauses:
                for fields in matches:
                    for attr, arg, _, _ in fields:
                        if attr == A_REQUEST_HEADER:
                            names.add(arg[0])
    if chain.kind == INBOUND_VIP and chain.service is not None and snapshot.routes is not None:
        for rule in snapshot.routes.http_routes_for(chain.service, chain.port).rules:
            for mt in rule.matchers:
                if type(mt) is VsMatcher:
                    names.update(n for n, _ in mt.m.headers)
                    names.update(n for n, _ in mt.m.without_headers)
                elif type(mt) is GwMatcher:
                    names.update(h.name for h in mt.m.headers)
                else:
                    names = None
                    break
            if names is None:
                break
    out = None
    if names is not None:
        # A name that is not latin-1 can never equal a decoded request header name: it reads nothing.
        out = frozenset(n.encode("latin-1") for n in names - _PSEUDO_NAMES if _latin1(n))
    if memo is not None:
        memo[key] = (chain, out)
    return out


def _latin1(name: str) -> bool:
    try:
        name.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def plan_cached(ctx: TunnelContext, snapshot: Snapshot, method: bytes, target: bytes, host: bytes,
                headers: list, port: int, *, rng: random.Random, memo: dict, decisions: dict) -> RequestPlan:
    """``plan_request(ctx, snapshot, request_view(method, target, host, headers, port), rng=rng, memo=memo)``
    with the deterministic half (authorization decision and route) remembered in ``decisions`` (a dict the
    caller keeps per snapshot, like ``memo``) under everything it reads: the tunnel's authority, source IP
    and peer identity, the request line, and the values of the headers the chain's policies and route
    matchers consult (``consulted_headers``). The random half (fault, weighted destination, mirrors) is
    drawn per request from ``rng`` exactly as plan_request draws it. The plan's ``view`` is the view those
    decisions were made on, its ``headers`` holding only the consulted headers (nothing after planning reads
    the others: the request's own headers are forwarded).

    PERF NOTE: skips request_view, the L7 decision and route matching per request — see HttpPipeline.handle
    for the measured gain."""
    chain = _chain_for(ctx, snapshot, memo)
    if not isinstance(chain, Chain):
        return RequestPlan(None, request_view(method, target, host, headers, port), None, error=chain)
    names = consulted_headers(chain, snapshot, memo)
    if names is None:
        return plan_request(ctx, snapshot, request_view(method, target, host, headers, port), rng=rng, memo=memo)
    consulted = tuple([h for h in headers if h[0] in names]) if names else ()
    key = (ctx.authority, ctx.source_ip, ctx.peer_identity, method, target, host, consulted)
    hit = decisions.get(key)
    if hit is None or hit[0] is not chain:
        view = request_view(method, target, host, consulted, port)
        decision, route = _decide_request(ctx, snapshot, chain, view, memo)
        hit = (chain, view, decision, route)
        size = len(target) + len(host)
        for _, value in consulted:
            size += len(value)
        if size <= DECISION_KEY_MAX_BYTES:
            if len(decisions) >= DECISION_MEMO_ENTRIES:
                decisions.clear()
            decisions[key] = hit
    return _draw_plan(ctx, snapshot, chain, hit[1], hit[2], hit[3], rng, memo)


def normalized_target(target: bytes) -> bytes | None:
    """The request target as the waypoint routes, authorizes and forwards it: Istio's default ``pathNormalization:
    BASE`` ("The normalized request will be used for both the evaluation of authorization policies and the
    request that is ultimately sent to the backend server", security/normalization) — the path's unreserved
    percent-encodings decoded, backslashes made ``/``, dot segments removed (``policy.authz.normalize_path``),
    the query kept as it came; None for a path with ``%00`` ("The request will always be rejected with HTTP code
    400"). An asterisk- or absolute-form target is left as it came."""
    if target[:1] != b"/":
        return target
    path, sep, query = target.partition(b"?")
    if b"%00" in path:
        return None
    return normalize_path(path.decode("latin-1")).encode("latin-1") + sep + query


def request_view(method: bytes, target: bytes, host: bytes, headers: Iterable[tuple[bytes, bytes]],
                 port: int) -> HttpRequestView:
    hmap: dict[str, tuple[str, ...]] = {}
    for name, value in headers:
        n = name.decode("latin-1")
        hmap[n] = hmap.get(n, ()) + (value.decode("latin-1"),)
    return HttpRequestView(method.decode("latin-1"), target.decode("latin-1"), host.decode("latin-1"), hmap, port)


def apply_ops(headers: list[tuple[bytes, bytes]], ops: tuple[HeaderOps, ...]) -> list[tuple[bytes, bytes]]:
    """Rule-level, then destination-level header operations (Istio applies both; order kept otherwise)."""
    if not ops:
        return headers
    hmap: dict[str, tuple[str, ...]] = {}
    for name, value in headers:
        n = name.decode("latin-1")
        hmap[n] = hmap.get(n, ()) + (value.decode("latin-1"),)
    for op in ops:
        hmap = op.apply(hmap)
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, vs in hmap.items() for v in vs]


# The version-4 / RFC 4122-variant bits uuid.UUID(int=..., version=4) sets.
_UUID4_CLEAR = ~((0xc000 << 48) | (0xf000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def request_id(rng: random.Random) -> bytes:
    """A random UUID4 for ``x-request-id``: ``str(uuid.UUID(int=rng.getrandbits(128), version=4))``
    without the UUID object (same bits, same text; timeit 2.9 → 0.5 µs)."""
    h = (rng.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET).to_bytes(16, "big").hex().encode()
    return b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))


# ---------------------------------------------------------------------------------------------
# Do


class _NoExchange(NamedTuple):
    """The request and the response of a request that could not be read, as ``_report`` reads them."""
    head_sent: bool = False
    status: int = 0
    body_bytes: int = 0


_NO_EXCHANGE = _NoExchange()


def bad_request_detail(err: Http1Error) -> tuple[str, str]:
    """(response code details, response flag) of a request the HTTP/1.1 server refused (see
    ``HttpPipeline.report_bad_request``)."""
    reason = err.reason
    if err.status == 408:
        return "request_header_timeout", ""
    if reason == "too many headers":
        return "http1.too_many_headers", "DPE"
    if err.status == 431:
        return "http1.headers_too_large", "DPE"
    if "transfer-coding" in reason:
        return "http1.invalid_transfer_encoding", "DPE"
    return "http1.codec_error", "DPE"


@dataclass(slots=True)
class _Log:
    """What one request's access-log line and metrics will say (filled in as the request proceeds)."""

    start: float
    flags: list[str] = field(default_factory=list)
    status: int = 0
    detail: str = ""
    route: str = ""
    cluster: str = ""
    host: str = ""
    attempts: int = 0
    candidate: Candidate | None = None
    error: str = ""
    grpc_status: str = ""      # the answer's grpc-status (gRPC requests only)
    server_status: int = 0     # what the server answers when the handler raised before a head: 500
    mirrors: int = 0
    set_cookie: bytes | None = None   # consistentHash httpCookie with a ttl: the cookie Envoy generates
    cors: tuple | None = None         # CORS headers Envoy's CORS filter sets on the upstream's answer


class _PrefixThen:
    """The part of a body read while buffering, then the rest as it comes (``read_body`` past the limit).
    ``at_end`` is the rest's own (h2c: ``H2Body.at_end``), so an HTTP/2 upstream still gets END_STREAM on the
    last DATA frame when the client's end came with the last chunk; None when the rest cannot say."""

    __slots__ = ("prefix", "rest", "at_end")

    def __init__(self, prefix: bytes, rest: AsyncIterator[bytes]):
        self.prefix: bytes | None = prefix
        self.rest = rest
        self.at_end = getattr(rest, "at_end", None)

    def __aiter__(self) -> "_PrefixThen":
        return self

    async def __anext__(self) -> bytes:
        prefix = self.prefix
        if prefix is not None:
            self.prefix = None
            return prefix
        return await self.rest.__anext__()


async def read_body(request, limit: int) -> tuple[object, int | None, bool]:
    """(body, content_length, replayable): bytes when the whole body fits in ``limit`` (a retry can
    send it again), else the part read followed by the rest, streamed (no retry after sending it)."""
    if not request.has_body:
        return None, None, True
    buf = bytearray()
    chunks = request.body_chunks().__aiter__()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            return _PrefixThen(bytes(buf), chunks), request.content_length, False
    return bytes(buf), None, True


class HttpPipeline:
    """Serves HTTP/1.1 on a tunnel's stream; state shared by all tunnels (pools, load balancing)."""

    def __init__(self, originator: Originator, *, metrics=None, access_log=None, rng: random.Random | None = None,
                 buffer_limit: int = REQUEST_BUFFER_LIMIT_BYTES, clock: Callable[[], float] = time.time):
        self.originator = originator
        self.metrics = metrics
        self.access_log = access_log
        self.rng = rng or random.Random()
        self.buffer_limit = buffer_limit
        self.clock = clock
        self.h1pool = Http1Pool()
        self.h2pool = H2UpstreamPool()
        # DestinationRule connectionPool limits, per cluster; the waypoint hands the same object to its TCP
        # chains' connect_upstream (one cluster's connections are counted once, whichever chain opened them).
        self.breakers = CircuitBreakers()
        self.mirrorer = Mirrorer(self._mirror_send, on_done=self._mirror_done)
        self.lb = LoadBalancer()
        self.active: dict[str, int] = {}
        self.outliers: dict[tuple[str, OutlierDetection], OutlierDetector] = {}
        self.requests = 0
        self.inline = 0   # requests proxy.pipeline.lean answered inside the streams' callbacks
        # Per-request work that only depends on the config or the peer, done once (see plan_request,
        # _report): the snapshot the upstream memo belongs to, and metrics peer labels by identity.
        self._memo_snapshot: Snapshot | None = None
        self._upstream_memo: dict = {}
        self._decision_memo: dict = {}
        self._peer_memo: dict = {}
        self._labels_memo: dict = {}

    def __repr__(self) -> str:
        return (f"<HttpPipeline requests={self.requests} inline={self.inline} in_flight={sum(self.active.values())} "
                f"{self.h1pool!r} {self.h2pool!r} {self.mirrorer!r} {self.lb!r}>")

    async def serve(self, stream: ByteStream, ctx: TunnelContext, chain: Chain,
                    snapshot: Callable[[], Snapshot], protocol: str = "http/1.1") -> None:
        def handler(request, responder):
            # A plain function handing back handle()'s coroutine (not an ``async def`` awaiting it):
            # one coroutine frame less per request, and less to resume at every await inside it.
            if request.method == b"CONNECT":
                # h2c CONNECT (RFC 9113 §8.5), extended CONNECT (RFC 8441) included — we do not advertise
                # SETTINGS_ENABLE_CONNECT_PROTOCOL, as Istio does not set Envoy's allow_connect
                # (istio/istio#27078): answered as HTTP/1.1 CONNECT is, authz then 404 NR (no route
                # matches it); before, it was taken for a request with a body and waited for its end.
                return self.handle(request, responder, ctx, chain, snapshot(), protocol, b"CONNECT")
            return self.handle(request, responder, ctx, chain, snapshot(), protocol)

        def handler_h1(request, responder):
            # HTTP/1.1 requests may ask for a protocol upgrade (WebSocket): the only cost to the others
            # is this one attribute test.
            upgrade = request.upgrade
            if upgrade is None:
                return self.handle(request, responder, ctx, chain, snapshot(), protocol)
            return self.handle(request, responder, ctx, chain, snapshot(), protocol, upgrade)
        if protocol == "h2c":
            conn = await serve_h2c(stream, handler)
            abuse = conn.core.abuse
            if abuse is not None:
                # The client's h2c connection inside the tunnel was shut for abuse (flood limits, rapid
                # reset): no request's access record covers it, so count it with the HBONE layer's
                # protocol errors (kind prefixed "h2c_") and log who it was.
                if self.metrics is not None:
                    self.metrics.h2_protocol_error(f"h2c_{abuse.reason}")
                log.warning("h2c connection from %s in a tunnel to %s shut: %s %s", ctx.peer_identity,
                            addr_str(ctx.authority), abuse.reason, abuse.detail)
        else:
            # The sniffed bytes go to the HTTP/1.1 parser first, then it reads the tunnel's stream itself:
            # no wrapper coroutine on every read and drain. PERF NOTE (/tmp/wph/ab.py: the benchmark's
            # mesh, httpload c=64, 8 x 3 s alternating with the session's previous tree; with the h2 send /
            # acknowledgement cuts of hbone/_h2fast.py 7b./7c. and the http1 server's cached loop):
            # waypoint 101.7 -> 91.5 us per request (medians).
            inner, prefix = stream.unwrap() if isinstance(stream, PrefixedStream) else (stream, b"")
            bad_request = functools.partial(self.report_bad_request, ctx, chain)
            if not hasattr(inner, "listen"):   # (not an HboneStream: hbone/_conn.py)
                await serve_http1(inner, handler_h1, prefix=prefix, on_bad_request=bad_request)
                return
            if LEAN_CALLBACKS:
                from .lean import CLOSE, LeanHttp1   # (lean builds on this module: imported once it is loaded)
                # The common request served inside the HBONE callbacks (proxy/pipeline/lean.py, PERF NOTE there)
                # until the tunnel needs the coroutine server, which goes on from the bytes it hands back.
                prefix = await LeanHttp1(self, inner, ctx, chain, snapshot).run(prefix)
                if prefix is CLOSE:
                    return
            task = asyncio.current_task()
            stop = _StopOnLoss(task, inner)
            inner.watch_lost(stop)
            try:
                await serve_http1(inner, handler_h1, prefix=prefix, on_bad_request=bad_request)
            except asyncio.CancelledError:
                if not stop.fired or task.uncancel():
                    raise   # (not only ours: the tunnel's task is cancelled too)
            finally:
                inner.watch_lost(None)

    def _authenticated_plan(self, request, ctx: TunnelContext, chain: Chain, snapshot: Snapshot,
                            memo: dict) -> RequestPlan:
        """The plan of a request on a chain with RequestAuthentication JWT rules (policy/authn). Envoy's jwt_authn
        filter comes before RBAC in the waypoint's chain: a present but invalid token is answered there
        (``JwtRejected``, authorization not consulted); a valid one has its header edits made (the token's header
        removed unless ``forwardOriginalToken``, ``outputPayloadToHeader``, ``outputClaimToHeaders``) and its claims
        go to the authorization decision — not through the decision memo, which is keyed without them. A request
        without a token passes with no request principal (istiod's ``allow_missing``), memo and all."""
        result = authenticate(jwt_rules(chain, snapshot, memo), request.headers, request.target,
                              now=self.clock(), method=request.method, authority=request.host)
        if not result.allowed:
            view = request_view(request.method, request.target, request.host, (), chain.port)
            return RequestPlan(chain, view, None, error=JwtRejected(result))
        if result.remove or result.add:
            drop = set(result.remove)
            request.headers = [h for h in request.headers if h[0].lower() not in drop] + list(result.add)
        if result.target is not None:
            request.target = result.target
        if result.claims is None:
            return plan_cached(ctx, snapshot, request.method, request.target, request.host, request.headers,
                               chain.port, rng=self.rng, memo=memo, decisions=self._decision_memo)
        view = request_view(request.method, request.target, request.host, request.headers, chain.port)
        return plan_request(ctx, snapshot, view, rng=self.rng, memo=memo, claims=result.claims)

    # -- one request --
    def begin(self, request, ctx: TunnelContext, chain: Chain,
              snapshot: Snapshot) -> tuple[RequestPlan, _Log, float]:
        """The start of every request: counted, its log record and clock started, its plan made."""
        self.requests += 1
        log = _Log(self.clock())
        t0 = time.monotonic()
        if snapshot is not self._memo_snapshot:   # a config reload: resolve upstreams and decisions afresh
            self._memo_snapshot, self._upstream_memo, self._decision_memo = snapshot, {}, {}
        # PERF NOTE: plan_cached instead of request_view + plan_request (the same plan: the authorization
        # decision and route remembered under everything they read, the fault/destination/mirrors still
        # drawn per request). In-process (/tmp/wp/inproc.py: HttpPipeline.serve over fake streams, the
        # benchmark's bookinfo config + deny policy, 20 000 keep-alive GETs, best of 5): 46.7 -> 39.9 us per
        # request; the benchmark's mesh (/tmp/wp/ab.py: benchmarks.http OursMesh + httpload c=64, 6 x 3 s
        # alternating with the previous tree, medians): waypoint 72.5 -> 64.7 us per request.
        memo = self._upstream_memo
        target = request.target
        if target[:1] != b"/" or b"%" in target or b"\\" in target or b"/." in target:
            # (Most paths have nothing to normalise: these four tests, then the plan as before.)
            target = normalized_target(target)
            if target is None:
                view = request_view(request.method, request.target, request.host, (), chain.port)
                return RequestPlan(chain, view, None, error=PathRejected("%00 in the request path")), log, t0
            request.target = target
        # (A mesh without RequestAuthentication pays one attribute test; a chain without rules, one memo lookup.)
        if snapshot.mesh.request_authentications and jwt_rules(chain, snapshot, memo):
            plan = self._authenticated_plan(request, ctx, chain, snapshot, memo)
        else:
            plan = plan_cached(ctx, snapshot, request.method, request.target, request.host, request.headers,
                               chain.port, rng=self.rng, memo=memo, decisions=self._decision_memo)
        if plan.route is not None:
            log.route = plan.route.route_config
        return plan, log, t0

    async def handle(self, request, responder, ctx: TunnelContext, chain: Chain, snapshot: Snapshot,
                     protocol: str, upgrade: bytes | None = None, planned: tuple | None = None,
                     resume: tuple | None = None) -> None:
        """One request, start to end. ``planned``: what ``begin`` returned for it, when the caller began it;
        ``resume``: (headers, target, authority, first) of a lean request whose first attempt the caller made
        (proxy.pipeline.lean, which hands over what it cannot finish inside its callbacks): it goes on in
        ``_execute_lean`` from that attempt."""
        plan, log, t0 = planned or self.begin(request, ctx, chain, snapshot)
        grpc = is_grpc(request.headers)
        up = plan.upstream
        try:
            # PERF NOTE: the common request takes _execute_lean (its twin test: tests/test_pipeline_lean.py).
            # A route with a corsPolicy is not ``up.plain`` (cached per upstream): it takes _execute, where the
            # CORS filter runs; a route without one pays no new check here.
            # In-process (/tmp/wp/inproc.py, as plan_cached's note above) 39.4 -> 36.7 us per request; the
            # benchmark's mesh (/tmp/wp/ab.py, 6 x 3 s alternating with the previous tree, medians):
            # waypoint 66.6 -> 56.4 us per request (an upstream read through the HBONE stream is one task
            # wake-up resuming 3 coroutine frames instead of 7).
            if resume is not None or (upgrade is None and not grpc and not request.has_body and protocol == "http/1.1"
                                      and LEAN_HTTP1 and plain_forward(plan)):
                await self._execute_lean(plan, up, request, responder, ctx, log, resume)
            else:
                await self._execute(plan, request, responder, ctx, log, protocol, grpc, upgrade)
        except ProxyError as err:
            reply = local_reply(err)
            log.flags.extend(f for f in reply.flags if f not in log.flags)
            log.detail, log.status, log.error = reply.detail, reply.status, str(err)
            if responder.head_sent:
                raise
            if grpc:
                # Envoy sendLocalReply for a gRPC request: trailers-only 200 with grpc-status/-message.
                status, fields = grpc_local_reply(reply.status, reply.body, getattr(err, "grpc_status", None))
                log.grpc_status = fields[1][1].decode()
                await responder.send_local_reply(status, b"", fields + list(reply.headers))
            else:
                await responder.send_local_reply(reply.status, reply.body, reply.headers)
        except OSError as err:
            log.error = f"{err.__class__.__name__}: {err}"
            if isinstance(err, H2UpstreamReset) and err.protocol_error:
                # The HTTP/2 upstream's trailers were over the limits after its head went downstream: we reset
                # its stream, and the client's stream is reset (serve_h2c). Envoy: the same reset with reason
                # protocol_error once the response started — flag UPE, not UC (an upstream that went away).
                log.flags[:] = [f for f in log.flags if f != "UC"] + ["UPE"]
                log.detail, log.error = UPSTREAM_RESET_AFTER_PROTOCOL_ERROR, str(err)
                self._h2_protocol_error("h2c_upstream_response_trailers_too_large")
            if not log.flags:
                log.flags.append("DC")   # Envoy: downstream connection termination
            raise
        except asyncio.CancelledError:
            refused = request.refused if protocol == "h2c" else ""
            if refused:
                # We reset the client's stream ourselves: its trailers were over the limits (H2Core._refuse).
                # Envoy logs the codec's stream error as a downstream protocol error (DPE), with its codec's
                # details, not as the client's own reset (DR).
                log.flags.append("DPE")
                log.detail, log.error = H2_TOO_MANY_HEADERS, refused
                self._h2_protocol_error("h2c_request_trailers_too_large")
            if protocol == "h2c" and not request.conn.lost:
                log.error = log.error or "downstream reset"
                if not log.flags:
                    log.flags.append("DR")   # Envoy: DownstreamRemoteReset (h2c RST_STREAM from the client)
            else:
                # The tunnel, the client's connection, is gone (serve's _StopOnLoss, LeanHttp1._lost, serve_h2c's
                # lost) or the waypoint stops. Envoy's HCM resets the request's upstream (our attempt was cancelled,
                # which resets its upstream stream) and logs DC, "downstream_remote_disconnect".
                log.error = log.error or "downstream connection termination"
                log.detail = log.detail or DOWNSTREAM_REMOTE_DISCONNECT
                if not log.flags:
                    log.flags.append("DC")
            raise
        except Exception as err:
            # Not a ProxyError: a fault of ours. serve_http1 / serve_h2c answer it 500 when no head has
            # left (and close the HTTP/1.1 connection), so the access log and metrics say 500, not 0.
            log.error = f"internal error: {err.__class__.__name__}: {err}"
            if not responder.head_sent:
                log.server_status = 500
            raise
        finally:
            self._report(plan, ctx, log, request, responder, protocol, t0, grpc)

    async def _execute(self, plan: RequestPlan, request, responder, ctx: TunnelContext, log: _Log,
                       protocol: str = "http/1.1", grpc: bool = False, upgrade: bytes | None = None) -> None:
        if upgrade == b"CONNECT" and request.method == b"CONNECT":
            # HTTP/1 CONNECT (proxy/http1/codec.py): the filters run (authz first), then no route matches
            # a request without a path: 404 NR, Envoy's answer without upgrade_configs CONNECT.
            if plan.error is not None:
                raise plan.error
            raise NoRoute("HTTP/1 CONNECT: no route matches a request without a path")
        if upgrade is not None and upgrade.strip().lower() != UPGRADE_TYPE:
            # Checked before the filters (authz, fault) and the router, as Envoy's HCM does when it
            # builds the filter chain for an upgrade it has no upgrade_configs entry for: 403, details
            # "upgrade_failed" (envoyproxy/gateway#9452: "the HTTP Connection Manager rejects any
            # WebSocket Upgrade on that route with 403 (response_code_details: upgrade_failed)").
            raise UpgradeFailed(f"upgrade to {upgrade.decode('latin-1')!r} is not configured")
        if plan.error is not None:
            raise plan.error
        local = plan.local
        if local is not None:
            await self._answer_locally(local, request, responder, log)
            return
        up = plan.upstream
        assert up is not None
        log.cluster = up.cluster
        fault = plan.fault
        if fault.delay_s:
            log.flags.append("DI")   # Envoy fault filter: DelayInjected
            await asyncio.sleep(fault.delay_s)
        if fault.abort_status is not None or fault.abort_grpc_status is not None:
            raise FaultAbort(fault.abort_status, grpc_status=fault.abort_grpc_status)
        if up.cors is not None:
            # Envoy's CORS filter, in the waypoint's filter order. After authorization (plan.error, raised above:
            # a denied preflight gets 403): istiod waypoint.go buildWaypointHTTPFilters, "Authn/authz filters are
            # prepended" to the common chain; users meet it as istio/istio#55318 ("the request still goes through
            # the rbac filter. This will make us add OPTIONS to authorization policy"). After the fault filter,
            # before the router: listener_builder.go, "TypedPerFilterConfig in route needs these filters.
            # filters = append(filters, xdsfilters.Fault, xdsfilters.Cors)". A preflight it answers never
            # reaches the router.
            cors = await self._cors_filter(up.cors, request, responder, log)
            if cors is None:
                return
            if cors:
                log.cors = cors
        if grpc:
            # gRPC streams messages both ways (client/bidi streaming): the body must flow upstream as
            # it arrives, not after END_STREAM. Such a request is retried only while nothing of it
            # was sent (connect failures, refused streams), and is not mirrored.
            body, clen, replayable = (request.body_chunks() if request.has_body else None), None, False
        elif not request.has_body:   # (read_body's first answer, without a coroutine per request)
            body, clen, replayable = None, None, True
        else:
            body, clen, replayable = await read_body(request, self.buffer_limit)
        # Request trailers (an h2c client's HEADERS after its body; the HTTP/1.1 codec drops chunked
        # trailers, as Envoy's does without enable_trailers). Envoy's router forwards them on the upstream
        # stream (decodeTrailers → encodeTrailers), sends them again with a retry's buffered body, and gives
        # each shadow a copy. A buffered body has been read whole, so its trailers are known now and kept
        # for every attempt and the mirrors; a streamed one's arrive after its last chunk, so the upstream
        # sender asks for them then. Only an HTTP/2 upstream gets them (_attempt_h2); toward HTTP/1.1 they are
        # dropped, as Envoy's HTTP/1 codec drops them (Istio does not set enable_trailers).
        trailers = ()
        if protocol == "h2c" and request.has_body:
            trailers = request.trailers if replayable else functools.partial(_trailers_of, request)
        headers, target, authority = self._upstream_request(plan, up, request)
        hash_key = None
        if up.consistent is not None:
            hash_key, log.set_cookie = self._hash_request(up.consistent, request, ctx)
        if plan.mirrors and upgrade is None:   # (Envoy does not shadow upgrades: WebSocket docs)
            # Envoy shadows with the body it buffered; a body past the buffer limit is not mirrored.
            log.mirrors = self.mirrorer.fire(plan.mirrors, ctx, request.method, target, authority, headers,
                                             body if replayable else None, protocol,
                                             skip=not replayable, trailers=trailers if replayable else ())
        # An upgrade goes upstream over HTTP/1.1 whatever the port's protocol (an h2 upstream would need
        # RFC 8441 extended CONNECT).
        h2 = up.uses_h2(protocol) if upgrade is None else False
        deadline = None if not up.timeout_s else asyncio.get_running_loop().time() + up.timeout_s
        limits = up.limits
        if limits is not None and not self.breakers.begin_request(up.cluster, limits):
            # http2MaxRequests (Envoy max_requests, every protocol): this request would be one too many in
            # flight to the cluster. Held from here until its response has gone (an upgraded one: until the
            # relay ends), as Envoy's stream holds it until it closes.
            raise RequestOverflow(f"cluster {up.cluster}: {limits.max_requests} requests in flight (http2MaxRequests)")
        try:
            # No route timeout (Istio's default): no timeout context either — asyncio.timeout_at(None)
            # still builds and enters one per request, for nothing.
            forward = self._forward(up, ctx, request.method, target, authority, headers, body, clen, replayable,
                                    log, h2, upgrade, trailers=trailers, hash_key=hash_key)
            try:
                if deadline is None:
                    resp, stream, key = await forward
                else:
                    async with asyncio.timeout_at(deadline):
                        resp, stream, key = await forward
            except TimeoutError:
                raise UpstreamTimeout(f"route timeout {up.timeout_s:g}s") from None
            await self._respond(up, resp, stream, key, request, responder, log, grpc, deadline, upgrade)
        finally:
            if limits is not None:
                self.breakers.end_request(up.cluster)

    @staticmethod
    async def _answer_locally(local: Redirect | DirectResponse, request, responder, log: _Log) -> None:
        """A redirect or directResponse rule's answer. Its corsPolicy applies as on a forwarding rule: Envoy's
        CORS filter sits before the router, which makes these answers (a direct_response route's reply passes
        back through the encoder filters before the router) — so a preflight is answered by the filter, and
        another request from an allowed origin gets the filter's headers on the redirect or direct response."""
        if isinstance(local, Redirect):
            status, body, fields = local.status, b"", [(b"location", local.location.encode("latin-1"))]
        else:
            status, body, fields = local.status, local.body.encode(), []
        if local.cors is not None:
            cors = await HttpPipeline._cors_filter(local.cors, request, responder, log)
            if cors is None:
                return
            fields = cors_filter.set_headers(fields, cors)
        log.status = status
        await responder.send_local_reply(status, body, fields)

    @staticmethod
    async def _cors_filter(policy: CorsPolicy, request, responder, log: _Log) -> tuple | None:
        """Envoy's CORS filter on a route with ``policy``: None when it answered the request itself (a preflight:
        200, details ``cors_response``, nothing reaches the router), else the headers it sets on the answer
        (empty: none)."""
        answer = cors_filter.decide(policy, request.method, request.headers)
        if answer is None:
            return ()
        if answer.kind == cors_filter.PREFLIGHT:
            log.status, log.detail = cors_filter.PREFLIGHT_STATUS, cors_filter.CORS_RESPONSE_DETAIL
            await responder.send_local_reply(cors_filter.PREFLIGHT_STATUS, b"", list(answer.headers))
            return None
        return answer.headers

    @staticmethod
    def _hash_request(ch: ConsistentHash, request, ctx: TunnelContext) -> tuple[bytes | None, bytes | None]:
        """The request's consistent-hash key (computed once: every attempt of its retries uses it) and the
        Set-Cookie Envoy generates for an ``httpCookie`` with a ``ttl`` the request does not carry.
        Envoy hashes the downstream request headers, and for ``useSourceIp`` / a generated cookie the
        downstream connection's addresses: at a waypoint the original client (``forwarded: for=``, else
        the HBONE peer) and the address it called (the CONNECT authority, the service VIP:port)."""
        target = request.target
        q = target.find(b"?")
        client = ctx.client_addr
        return request_hash(ch, headers=request.headers, query=target[q + 1:] if q >= 0 else b"",
                            source_ip=client[0], remote_address=addr_str(client),
                            local_address=addr_str(ctx.authority))

    async def _execute_lean(self, plan: RequestPlan, up: Upstream, request, responder, ctx: TunnelContext,
                            log: _Log, resume: tuple | None = None) -> None:
        """``_execute`` for the waypoint's common request: HTTP/1.1 both ways, no body, no upgrade, not gRPC,
        a plain forward (no fault, mirror, route or per-try timeout, outlier detection). The same steps in
        the same order — header operations and x-request-id, the host pick, the attempt on a pooled
        connection, the retry decision, the answer — with the first attempt made inline
        (``forward_bodiless``) instead of through ``_forward`` → ``_attempt`` → ``forward_request`` →
        ``_next_event``. Anything else after the pick (no idle connection, a dead one, a reset, a retriable
        answer) goes on in ``_forward`` with this attempt handed over as its first (``first=``), and a
        response that is still arriving is streamed by ``_respond``: only the usual case is shortened.
        PERF NOTE at the call site in ``handle``. ``resume``: see ``handle``."""
        log.cluster = up.cluster
        method = request.method
        if resume is not None:
            headers, target, authority, first = resume
            await self._forward_respond(up, ctx, method, target, authority, headers, request, responder, log, first)
            return
        headers, target, authority = self._upstream_request(plan, up, request)
        policy = up.retry
        now = time.monotonic()
        cand = self.lb.pick(up.candidates, rng=self.rng, exclude=_NONE, active_requests=self.active, lb=up.lb,
                            cluster=up.cluster, ejected=_NONE,
                            host_selection_max_attempts=policy.host_selection_max_attempts)
        if cand is None:
            raise NoHealthyUpstream(f"cluster {up.cluster} has no healthy endpoint")
        key = cand.key
        pooled = self.h1pool.take(key)
        first = None
        resp = None
        if pooled is None:
            first = (cand, now, self._attempt_fresh(cand, up, ctx, method, target, authority, headers, None, None,
                                                    [False]))
        else:
            stream, reader = pooled
            log.attempts, log.host, log.candidate = 1, key, cand
            active = self.active
            active[key] = active.get(key, 0) + 1
            try:
                resp = await forward_bodiless(stream, reader, method, target, authority, headers)
            except (ClientUpstreamReset, Http1Error) as err:
                stream.abort()
                if isinstance(err, ClientUpstreamReset) and err.before_response:
                    # A pooled connection the upstream closed while idle: a fresh one (as _attempt does).
                    first = (cand, now, self._attempt_fresh(cand, up, ctx, method, target, authority, headers,
                                                            None, None, [False]))
                else:
                    first = (cand, now, _raise(err))
            except BaseException:
                stream.abort()
                raise
            finally:
                active[key] -= 1
                if not active[key]:
                    del active[key]
            if resp is not None:
                gs = _grpc_status_of(resp.headers)
                if policy.should_retry(1, Outcome(resp.status, None, int(gs) if gs.isdigit() else None)):
                    first = (cand, now, _value((resp, stream, key)))
        if first is not None:
            await self._forward_respond(up, ctx, method, target, authority, headers, request, responder, log, first)
            return
        whole = resp.complete_body()
        if whole is None:   # still arriving: streamed
            await self._respond(up, resp, stream, key, request, responder, log, False, None, None)
            return
        log.status = resp.status
        try:
            ops = up.response_ops
            await responder.send_response(resp.status, apply_ops(list(resp.headers), ops) if ops else resp.headers,
                                          whole, reason=resp.reason or None)
            self._release(key, stream, resp)
        except BaseException:
            resp.abort()
            raise

    async def _forward_respond(self, up: Upstream, ctx: TunnelContext, method: bytes, target: bytes,
                               authority: bytes, headers: list, request, responder, log: _Log, first: tuple) -> None:
        """A lean request from its first attempt on (made inline): classified, retried, answered."""
        resp, stream, key = await self._forward(up, ctx, method, target, authority, headers, None, None, True, log,
                                                first=first)
        await self._respond(up, resp, stream, key, request, responder, log, False, None, None)

    def _upstream_request(self, plan: RequestPlan, up: Upstream, request) -> tuple[list, bytes, bytes]:
        """(headers, target, authority) of the request as it goes upstream: header operations, an
        ``x-request-id`` (Envoy generates one when the request has none), ``x-forwarded-proto``, and the
        route's rewrites."""
        headers = apply_ops(list(request.headers), up.request_ops)
        names = {n for n, _ in headers}
        if b"x-request-id" not in names:   # Envoy generates one when the request has none
            headers.append((b"x-request-id", request_id(self.rng)))
        if b"x-forwarded-proto" not in names:
            headers.append((b"x-forwarded-proto", b"http"))
        route = plan.route
        path = route.path if isinstance(route, RouteDecision) else plan.view.path
        # Not rewritten (the view's own str): the request's bytes as they came, not decoded and re-encoded
        # (the same for the authority below).
        target = request.target if path is plan.view.path else path.encode("latin-1")
        host = route.authority if isinstance(route, RouteDecision) else plan.view.authority
        authority = request.host if host is plan.view.authority else host.encode("latin-1")
        if up.host_rewrite is not None:   # (a weighted cluster's host rewrite comes after the route's)
            authority = up.host_rewrite
        return headers, target, authority

    async def _respond(self, up: Upstream, resp, stream: ByteStream | None, key: str, request, responder, log: _Log,
                       grpc: bool, deadline: float | None, upgrade: bytes | None) -> None:
        """The upstream's answer back to the downstream; the route timeout (``deadline``) still bounds it
        (Envoy: the whole response)."""
        log.status = resp.status
        if upgrade is not None and resp.status == 101:
            await self._relay_upgraded(up, resp, stream, request, responder, log)
            return
        release = self._release if up.limits is None else functools.partial(self._release_limited, up.limits)
        released = False   # the HTTP/1.1 connection went back to the pool: never abort it then
        try:
            ops = up.response_ops   # (no ops: the head's own list, only read from here on)
            out_headers = apply_ops(list(resp.headers), ops) if ops else resp.headers
            if log.set_cookie is not None:   # consistentHash httpCookie: Envoy adds it to the upstream's answer
                out_headers = [*out_headers, (b"set-cookie", log.set_cookie)]
            if log.cors is not None:
                # After the route's response header ops: those are the router's (finalizeResponseHeaders on the
                # upstream's headers), and the CORS filter, before the router in the chain, encodes after it —
                # its setInline replaces any access-control-* field the upstream or the route ops left.
                out_headers = cors_filter.set_headers(out_headers, log.cors)
            # A small response usually arrives whole with its head: answer it with one write (HTTP/1.1
            # downstream) instead of a head, an async generator, a write and a drain per chunk, and an
            # end. Measured: in-process HttpPipeline.handle with faked streams (whose writes cost nothing)
            # 42.0 → 41.2 µs per request; through HBONE each write saved is also a core.send and a
            # drain check. With this commit's other cuts (benchmarks http, load c=64, alternating with
            # the session-start waypoint): 146 / 129 → 113 / 105 µs per request, cumulative.
            whole = resp.complete_body() if hasattr(responder, "send_response") and \
                hasattr(resp, "complete_body") else None
            if whole is not None:
                if deadline is None:
                    await responder.send_response(resp.status, out_headers, whole, reason=resp.reason or None)
                else:
                    async with asyncio.timeout_at(deadline):
                        await responder.send_response(resp.status, out_headers, whole, reason=resp.reason or None)
                if grpc:   # an HTTP/1.1 upstream has no trailers: the status is in the head
                    log.grpc_status = _grpc_status_of(out_headers)
                if stream is not None:
                    release(key, stream, resp)
                return
            await responder.send_head(resp.status, out_headers, reason=resp.reason or None)
            # An HTTP/2 answer to an h2c client: its last chunk carries END_STREAM when the upstream's end came with
            # it (H2Response.at_end), not an empty DATA frame after it. (The generator still runs to its end: that
            # releases the upstream stream.)
            at_end = getattr(resp, "at_end", None) if hasattr(responder, "conn") else None
            if deadline is None:
                await _stream_body(resp.body_chunks(), responder, at_end)
            else:
                async with asyncio.timeout_at(deadline):
                    await _stream_body(resp.body_chunks(), responder, at_end)
            if stream is not None:
                # The upstream response is complete: pool its connection now, not after our own
                # end() — another downstream's request may want it meanwhile (fewer re-dials).
                release(key, stream, resp)
                stream, released = None, True
            trailers = list(getattr(resp, "trailers", ()) or ())
            if grpc:
                log.grpc_status = _grpc_status_of(trailers) or _grpc_status_of(out_headers)
            if trailers and hasattr(responder, "conn"):   # h2c downstream: trailers pass through
                await responder.end(trailers)
            else:
                await responder.end()   # HTTP/1.1 downstream: upstream trailers are dropped
        except BaseException as err:
            if not released:
                resp.abort()
            if isinstance(err, TimeoutError):
                log.flags.append("UT")
                raise ConnectionAbortedError("route timeout mid-response") from None
            if isinstance(err, (ClientUpstreamReset, H2UpstreamReset)):
                log.flags.append("UC")   # upstream connection termination mid-response: reset the client
            raise
        if stream is not None:   # (HTTP/2: None, the connection is shared, its stream was released)
            release(key, stream, resp)

    async def _relay_upgraded(self, up: Upstream, resp, stream: ByteStream, request, responder, log: _Log) -> None:
        """The upstream switched protocols: forward its 101, then relay raw bytes both ways until both
        sides have ended (half-close kept, a reset on one side resets the other: hbone.relay).

        No route timeout from here on. Envoy's route timeout "spans between the point at which the
        entire downstream request (i.e. end-of-stream) has been processed and when the upstream
        response has been completely processed" (RouteAction.timeout), and its HTTP/1 codec never
        completes an upgrade request ("If this is an upgrade request, swallow the onMessageComplete.
        The upgrade payload will be treated as stream body.", http1/codec_impl.cc), so an upgraded
        stream is never cut by it; the WebSocket docs: "timeouts, retries ... are not supported for
        WebSocket routes". We apply it to the handshake only (a hung upstream gets 504 ``UT`` rather
        than a client waiting forever), never to the relay. Retries happen only before the 101.

        The upstream connection is never pooled again. The request's log line and metrics (status 101)
        are written when the relay ends, with the relayed byte counts."""
        try:
            ops = up.response_ops
            out_headers = apply_ops(list(resp.headers), ops) if ops else resp.headers
            value = None
            for name, v in resp.headers:
                if name == b"upgrade":
                    value = v
            down = await responder.switch_protocols(value or request.upgrade, out_headers,
                                                    reason=resp.reason or None)
            upstream = resp.upgraded_stream()
        except BaseException:
            stream.abort()
            raise
        try:
            result = await relay(down, upstream)
        finally:
            upstream.close()
        request.body_bytes += result.a_to_b
        responder.body_bytes = result.b_to_a
        if result.reset:
            # RelayResult names the side that reset ("a: ..." downstream, "b: ..." upstream): Envoy's
            # UC (upstream connection termination) or DC (downstream connection termination).
            log.error = f"upgraded connection reset: {result.reset}"
            log.flags.append("UC" if result.reset.startswith("b") else "DC")

    def _release(self, key: str, stream: ByteStream, resp) -> None:
        if resp.reusable:
            self.h1pool.put(key, stream, resp._reader)
        else:
            stream.close()

    def _release_limited(self, limits: CircuitLimits, key: tuple[str, str], stream: CountedStream, resp) -> None:
        """``_release`` for a cluster with connectionPool limits (``key``: (cluster, host), its pool key): a
        reusable connection goes to the oldest request waiting for one to that host, else to the pool — unless
        it has served maxRequestsPerConnection requests (Envoy: "maximum requests per connection"), then it is
        closed, which lets a waiter dial."""
        cluster, host = key
        if resp.reusable and stream.counted and not self.breakers.spent(cluster, limits, stream.served):
            pooled = (stream, resp._reader)
            if not hand_over(self.breakers, cluster, host, pooled):
                self.h1pool.put(key, stream, resp._reader)
        else:
            stream.close()

    async def _forward(self, up: Upstream, ctx: TunnelContext, method: bytes, target: bytes, authority: bytes,
                       headers: list, body, clen, replayable: bool, log: _Log, h2: bool = False,
                       upgrade: bytes | None = None, first: tuple | None = None, trailers: RequestTrailers = (),
                       hash_key: bytes | None = None):
        """The router's retry loop: pick a host (avoiding previous ones), try, classify, maybe retry.
        ``hash_key``: the request's consistent-hash key (``_hash_request``) when the cluster has one.
        ``trailers``: the request's trailers, sent with every attempt to an HTTP/2 upstream (see ``_execute``).
        ``first``: (host, its pick time, the awaitable of its attempt) — the first attempt as
        ``_execute_lean`` made it (a bodiless request: the awaitable returns or raises what ``_attempt``
        would), classified and followed by retries as any attempt."""
        policy = up.retry
        consistent = up.consistent
        avoid_tried = policy.avoids_previous_hosts(consistent is not None)
        tried: set[str] = set()
        detector = None
        if up.outlier is not None:
            detector = detector_for(self.outliers, up.cluster, up.outlier)
        attempt = 0
        last: ProxyError | None = None
        limits = up.limits
        # maxRetries (Envoy max_retries): a retry is held from the decision to make it until the retried
        # attempt's outcome is known (RetryStateImpl::resetRetry), or until the request ends.
        retrying = False
        timer = None   # a limited attempt's per-try timer, which it restarts after a wait for a connection
        try:
            while True:
                attempt += 1
                if first is not None:
                    cand, now, attempt_coro = first
                    first = None
                else:
                    now = time.monotonic()
                    cand = self.lb.pick(up.candidates, rng=self.rng,
                                        exclude=frozenset(tried) if tried and avoid_tried else _NONE,
                                        active_requests=self.active, lb=up.lb, cluster=up.cluster,
                                        ejected=detector.ejected(now) if detector else _NONE,
                                        host_selection_max_attempts=policy.host_selection_max_attempts,
                                        consistent=consistent, hash_key=hash_key)
                    if cand is None:
                        raise exhausted(last, attempt - 1) if last is not None else NoHealthyUpstream(
                            f"cluster {up.cluster} has no healthy endpoint")
                    attempt_coro = None
                tried.add(cand.key)
                log.attempts, log.host, log.candidate = attempt, cand.key, cand
                sent = [attempt_coro is not None]   # (an injected first attempt sent its request)
                self.active[cand.key] = self.active.get(cand.key, 0) + 1
                if attempt_coro is None and h2:
                    attempt_coro = self._attempt_h2(cand, up, ctx, method, target, authority, headers, body, sent,
                                                    trailers)
                elif attempt_coro is None and limits is not None:
                    timer = [None] if policy.per_try_timeout_s is not None else None
                    attempt_coro = self._attempt_limited(cand, up, ctx, method, target, authority, headers, body,
                                                         clen, replayable, sent, upgrade, timer)
                elif attempt_coro is None:
                    attempt_coro = self._attempt(cand, up, ctx, method, target, authority, headers, body, clen,
                                                 replayable, sent, upgrade)
                try:
                    if policy.per_try_timeout_s is None:   # no per-try timeout: no timeout context
                        resp, stream, key = await attempt_coro
                    else:
                        async with asyncio.timeout(policy.per_try_timeout_s) as try_timer:
                            if timer is not None:
                                timer[0] = try_timer
                            resp, stream, key = await attempt_coro
                except TimeoutError:
                    outcome, err = Outcome(error=PER_TRY_TIMEOUT), UpstreamTimeout("per-try timeout")
                except OriginateFailed as e:
                    outcome, err = Outcome(error=CONNECT_FAILURE), e
                except ClientUpstreamReset as e:
                    outcome, err = Outcome(error=RESET), UpstreamReset(str(e))
                except H2UpstreamReset as e:
                    outcome, err = Outcome(error=REFUSED_STREAM if e.refused else RESET), (
                        UpstreamProtocolError(str(e)) if e.protocol_error else UpstreamReset(str(e)))
                    if e.refused:
                        sent[0] = False   # RFC 9113 §8.7: a refused stream was not processed
                except Http1Error as e:
                    outcome, err = Outcome(status=502), BadUpstreamResponse(str(e))
                else:
                    gs = _grpc_status_of(resp.headers)
                    outcome, err = Outcome(resp.status, None, int(gs) if gs.isdigit() else None), None
                finally:
                    self.active[cand.key] -= 1
                    if not self.active[cand.key]:
                        del self.active[cand.key]
                if retrying:   # the retried attempt's outcome is known: its retry is no longer held
                    retrying = False
                    self.breakers.end_retry(up.cluster)
                if detector is not None:
                    detector.record(cand.key, outcome, now, total_hosts=len(up.candidates))
                can_replay = replayable or not sent[0]
                if can_replay and policy.should_retry(attempt, outcome):
                    if limits is None or self.breakers.begin_retry(up.cluster, limits):
                        retrying = limits is not None
                        if err is None:
                            resp.abort()   # a retriable status: discard this answer, try another host
                        else:
                            last = err
                        await asyncio.sleep(policy.backoff_s(attempt, self.rng))
                        continue
                    # maxRetries retries in flight already: Envoy's RetryStatus::NoOverflow — the retry is not
                    # made (counted upstream_rq_retry_overflow), the flag UO is set and this attempt's own
                    # answer or error stands (no URX: the retry limit was not what stopped it).
                    if err is None:
                        log.flags.append("UO")
                        return resp, stream, key
                    err.flags = (*(f for f in flags_of(err) if f != "UO"), "UO")  # type: ignore[attr-defined]
                    raise err
                if err is None:
                    if attempt > policy.attempts > 0 and can_replay and policy.should_retry(1, outcome):
                        # A retriable answer after the last allowed retry: forwarded, flagged URX (Envoy router.cc
                        # onUpstreamHeaders: RetryStatus::NoRetryLimitExceeded → UpstreamRetryLimitExceeded).
                        log.flags.append("URX")
                    return resp, stream, key
                raise exhausted(err, attempt)
        finally:
            if retrying:
                self.breakers.end_retry(up.cluster)

    async def _attempt(self, cand: Candidate, up: Upstream, ctx: TunnelContext, method, target, authority,
                       headers, body, clen, replayable: bool, sent: list, upgrade: bytes | None = None):
        key = cand.key
        pooled = self.h1pool.take(key)
        if pooled is not None:
            resp = await _on_pooled(pooled, method, target, authority, headers, body, clen, upgrade, replayable,
                                    sent)
            if resp is not None:
                return resp, pooled[0], key
        return await self._attempt_fresh(cand, up, ctx, method, target, authority, headers, body, clen, sent,
                                         upgrade)

    async def _attempt_fresh(self, cand: Candidate, up: Upstream, ctx: TunnelContext, method, target, authority,
                             headers, body, clen, sent: list, upgrade: bytes | None = None):
        """One attempt on a new upstream connection (none idle in the pool, or the idle one was dead)."""
        stream = await self._upstream_stream(cand, up, ctx)
        resp = await _on_fresh(stream, method, target, authority, headers, body, clen, upgrade, sent)
        return resp, stream, cand.key

    async def _attempt_limited(self, cand: Candidate, up: Upstream, ctx: TunnelContext, method, target, authority,
                               headers, body, clen, replayable: bool, sent: list, upgrade: bytes | None = None,
                               timer: list | None = None):
        """``_attempt`` for a cluster with connectionPool limits (HTTP/1.1 upstream). Its connections are pooled
        under (cluster, host), counted (``CountedStream``) against tcp.maxConnections: an idle one is taken;
        else one is dialed if there is room (or the host has none: Envoy's exemption); else the request waits
        in the cluster's FIFO of pending requests for one to be released, unless http1MaxPendingRequests wait
        already: then it is answered 503 ``UO`` at once. The route timeout bounds the wait; the per-try timeout
        (``timer``: [its asyncio.Timeout], set by ``_forward``) starts afresh once the wait is over, as Envoy
        starts it when the pool is ready (UpstreamRequest::onPoolReady → setupPerTryTimeout), not while pending."""
        limits = up.limits
        assert limits is not None
        cluster, host = up.cluster, cand.key
        pkey = (cluster, host)
        idle_s = limits.idle_timeout_s
        while True:
            pooled = self.h1pool.take(pkey, idle_s)
            if pooled is None:
                decision = self.breakers.acquire_connection(cluster, limits, host)
                if decision == OVERFLOW:
                    raise RequestOverflow(f"cluster {cluster}: {limits.max_connections} connections busy and "
                                          f"{limits.max_pending_requests} requests pending (http1MaxPendingRequests)")
                if decision == WAIT:
                    try_timer = timer[0] if timer is not None else None
                    if try_timer is not None:
                        try_timer.reschedule(None)   # not while pending ...
                    pooled = await self._wait_connection(cluster, host, limits)
                    if try_timer is not None:        # ... but from now on
                        try_timer.reschedule(asyncio.get_running_loop().time() + up.retry.per_try_timeout_s)
                if pooled is None:   # DIAL (or woken to dial): the slot is reserved
                    return await self._attempt_dial(cand, up, ctx, method, target, authority, headers, body, clen,
                                                    sent, upgrade)
            pooled[0].served += 1
            resp = await _on_pooled(pooled, method, target, authority, headers, body, clen, upgrade, replayable,
                                    sent)
            if resp is not None:
                return resp, pooled[0], pkey

    async def _wait_connection(self, cluster: str, host: str, limits: CircuitLimits):
        """In the cluster's pending queue until a connection to ``host`` is handed over ((stream, reader)) or a
        closed one lets this request dial (None). Cancelled (a timeout, the client gone): out of the queue, and
        whatever it had been granted meanwhile goes to the next waiter."""
        fut = asyncio.get_running_loop().create_future()
        self.breakers.enqueue(cluster, host, fut)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                grant = fut.result()
                if grant is None:
                    release_connection(self.breakers, cluster, host, limits)
                elif not hand_over(self.breakers, cluster, host, grant):
                    self.h1pool.put((cluster, host), *grant)
            else:
                self.breakers.cancel_wait(cluster, fut)
            raise

    async def _attempt_dial(self, cand: Candidate, up: Upstream, ctx: TunnelContext, method, target, authority,
                            headers, body, clen, sent: list, upgrade: bytes | None = None):
        """``_attempt_fresh`` on a counted connection whose slot is reserved: a failed dial releases it."""
        stream = await self._counted_stream(cand, up, ctx)
        stream.served = 1
        resp = await _on_fresh(stream, method, target, authority, headers, body, clen, upgrade, sent)
        return resp, stream, (up.cluster, cand.key)

    async def _counted_stream(self, cand: Candidate, up: Upstream, ctx: TunnelContext) -> CountedStream:
        """A new upstream connection counted against its cluster (its slot already taken) until it closes."""
        release = functools.partial(release_connection, self.breakers, up.cluster, cand.key, up.limits)
        try:
            stream = await self._upstream_stream(cand, up, ctx)
        except BaseException:
            release()
            raise
        return CountedStream(stream, release)

    async def _dial_h2_counted(self, cand: Candidate, up: Upstream, ctx: TunnelContext) -> CountedStream:
        # Envoy's overview: maxConnections is "in practice only applicable to HTTP/1.1 clusters since HTTP/2 uses
        # a single connection to each host": our one h2c connection per host (plus those draining after
        # maxRequestsPerConnection) is always opened, but counted with the cluster's connections.
        self.breakers.opened(up.cluster, cand.key)
        return await self._counted_stream(cand, up, ctx)

    async def _upstream_stream(self, cand: Candidate, up: Upstream, ctx: TunnelContext) -> ByteStream:
        svc = up.service
        return await self.originator.open(
            cand, source=ctx.client_addr, service_hostname=svc.hostname if svc else None,
            timeout=up.connect_timeout_s, subject_alt_names=svc.subject_alt_names if svc else ())

    async def _attempt_h2(self, cand: Candidate, up: Upstream, ctx: TunnelContext, method, target, authority,
                          headers, body, sent: list, trailers: RequestTrailers = ()):
        # Concurrent requests to an endpoint with no connection yet share one dial (H2UpstreamPool.connect).
        limits = up.limits
        if limits is None:
            conn = await self.h2pool.connect(cand.key, lambda: self._upstream_stream(cand, up, ctx))
        else:
            # A cluster with limits has its own connections (under (cluster, host)), counted; one that has taken
            # maxRequestsPerConnection streams takes no new one and closes after its last (DRAINING).
            per_conn = limits.max_requests_per_connection
            conn = await self.h2pool.connect((up.cluster, cand.key), lambda: self._dial_h2_counted(cand, up, ctx),
                                             max_requests=per_conn)
            if per_conn:
                self.breakers.spent(up.cluster, limits, conn.streams_taken)
        sent[0] = True
        try:
            resp = await conn.request(method, target, authority, headers, body, trailers=trailers)
        except H2UpstreamReset as err:
            if err.protocol_error:   # its head over the limits: counted per upstream answer (each attempt)
                self._h2_protocol_error("h2c_upstream_response_headers_too_large")
            raise
        return resp, None, cand.key

    async def _mirror_send(self, up: Upstream, ctx: TunnelContext, method: bytes, target: bytes, authority: bytes,
                           headers: list, body, protocol: str, trailers: tuple = ()) -> int:
        """One shadow request: pick a host, send, read and discard the response; its status. The request's
        trailers go with it to an HTTP/2 mirror (dropped toward HTTP/1.1, as for the main request)."""
        cand = self.lb.pick(up.candidates, rng=self.rng, lb=up.lb, cluster=up.cluster)
        if cand is None:
            raise NoHealthyUpstream(f"mirror cluster {up.cluster} has no healthy endpoint")
        if up.uses_h2(protocol):
            resp, _, _ = await self._attempt_h2(cand, up, ctx, method, target, authority, headers, body, [False],
                                                trailers)
            stream = None
        else:
            stream = await self._upstream_stream(cand, up, ctx)
            resp = await forward_request(stream, method, target, authority, headers, body)
        try:
            async for _ in resp.body_chunks():
                pass
        finally:
            if stream is not None:
                stream.close()
            else:
                resp.abort()
        return resp.status

    # -- telemetry --
    def _h2_protocol_error(self, kind: str) -> None:
        """A stream error of ours on an h2c stream (a field block over the limits, either side): counted with
        the HBONE layer's protocol errors, kind prefixed "h2c_" as the connection-level ones (``serve``)."""
        if self.metrics is not None:
            self.metrics.h2_protocol_error(kind)

    def _mirror_done(self, up: Upstream, authority: bytes, status: int, error: str) -> None:
        """One access-log line per shadow request (kind "http", direction "outbound", the mirror's
        cluster and ``-shadow`` authority): mirrors are counted and visible, never in the metrics
        of the main request (Envoy does not count shadows in the downstream's stats either)."""
        if self.access_log is not None and self.access_log.enabled():
            self.access_log.emit(AccessRecord(
                start_time=self.clock(), kind="http", direction="outbound", reporter="waypoint",
                dst_service=up.service.hostname if up.service else "", route="mirror",
                upstream_cluster=up.cluster, authority=authority.decode("latin-1"), status=status,
                response_flags="-", error=error))

    # Metrics peer labels remembered (a waypoint sees few distinct peers; the bound is for the rest).
    PEER_MEMO_ENTRIES = 4096

    def _peer(self, key: tuple, source, build: Callable[[], object]):
        """The label record ``build()`` makes from ``source``, remembered under ``key`` while ``source`` is the
        very same object (a workload, service or baggage from the config or the tunnel)."""
        hit = self._peer_memo.get(key)
        if hit is not None and hit[0] is source:
            return hit[1]
        info = build()
        if len(self._peer_memo) >= self.PEER_MEMO_ENTRIES:
            self._peer_memo.clear()
        self._peer_memo[key] = (source, info)
        return info

    def report_bad_request(self, ctx: TunnelContext, chain: Chain, err: Http1Error, answered: bool) -> None:
        """A request the HTTP/1.1 server could not read, after it answered it (serve_http1's ``on_bad_request``):
        logged and counted as a request, as Envoy's access log and ``istio_requests_total`` show an HTTP/1 codec
        error — the HCM's local reply with the codec's status, flag ``DPE`` ("DownstreamProtocolError"), details
        the codec's (codec_impl.cc ``Http1ResponseCodeDetails``: ``http1.headers_too_large``,
        ``http1.too_many_headers``, ``http1.invalid_transfer_encoding``, else ``http1.codec_error``); a head
        that never came whole in time, Envoy's ``request_headers_timeout`` (408, ``request_header_timeout``, no
        flag). A client that reset its tunnel was answered nothing: a downstream disconnect (status 0, ``DC``)."""
        record = _Log(self.clock())
        if answered:
            record.server_status = err.status
            record.detail, flag = bad_request_detail(err)
        else:   # (the client reset the tunnel: nothing could be answered)
            record.detail, flag = DOWNSTREAM_REMOTE_DISCONNECT, "DC"
        if flag:
            record.flags.append(flag)
        view = request_view(b"", b"", b"", (), chain.port)
        try:
            self._report(RequestPlan(chain, view, None), ctx, record, _NO_EXCHANGE, _NO_EXCHANGE, "http/1.1",
                         time.monotonic())
        except Exception:   # noqa: BLE001 — serve_http1's hook must not raise: a reporting fault is only logged
            log.exception("reporting a refused request on a tunnel to %s failed", addr_str(ctx.authority))

    def _report(self, plan: RequestPlan, ctx: TunnelContext, log: _Log, request, responder, protocol: str,
                t0: float, grpc: bool = False) -> None:
        duration_ms = (time.monotonic() - t0) * 1000.0
        # A local reply that could not be sent stays 0 (nothing reached the client).
        status = responder.status if responder.head_sent else log.server_status
        flags = tuple(log.flags)
        chain = plan.chain
        svc = chain.service if chain is not None else None
        if self.metrics is not None:
            cand = log.candidate
            workload = cand.workload if cand is not None else None
            flags_text = ",".join(flags) if flags else "-"
            # The whole label tuple, remembered per (source peer, destination workload, service, protocol,
            # flags): one dict lookup per request instead of three peer memos and traffic_labels' keyword
            # lru_cache. Keyed by the identity of the objects the labels come from, held in the entry (a
            # reload brings new workloads and services; each tunnel its own Baggage — hashing it by value
            # was ~1 % of the waypoint; a new tunnel's equal Baggage still hits the value-keyed _peer memo).
            # Measured in-process (HttpPipeline.handle, faked streams, under cProfile): _report with this
            # and the plain-number HTTP metrics 9.6 → 3.3 µs per request.
            baggage = ctx.baggage
            key = (ctx.peer_identity, id(baggage), id(workload), id(svc), grpc, flags_text)
            hit = self._labels_memo.get(key)
            if hit is not None and hit[0] is workload and hit[1] is svc and hit[3] is baggage:
                labels = hit[2]
            else:
                labels = traffic_labels(
                    "waypoint", source=self._peer(("src", ctx.peer_identity, ctx.baggage), None,
                                                  lambda: PeerInfo.from_baggage(ctx.peer_identity, ctx.baggage)),
                    destination=self._peer(("dst", cand.key), workload, lambda: PeerInfo.from_workload(workload))
                    if cand else None,
                    service=self._peer(("svc", svc.hostname), svc, lambda: ServiceInfo.from_service(svc))
                    if svc else None,
                    request_protocol="grpc" if grpc else "http", response_flags=flags_text,
                    security_policy="mutual_tls")
                if len(self._labels_memo) >= self.PEER_MEMO_ENTRIES:
                    self._labels_memo.clear()
                self._labels_memo[key] = (workload, svc, labels, baggage)
            # istio_stats.cc: grpc_response_status is the gRPC status for gRPC requests, "" otherwise.
            self.metrics.http_request(labels, status, duration_ms, request.body_bytes, responder.body_bytes,
                                      log.grpc_status if grpc else "")
        if self.access_log is not None and self.access_log.enabled():
            d = plan.decision
            self.access_log.emit(AccessRecord(
                start_time=log.start, kind="http", direction="inbound", reporter="waypoint",
                src_addr=addr_str(ctx.client_addr), src_identity=ctx.peer_identity or "",
                dst_hbone_addr=addr_str(ctx.authority), dst_service=svc.hostname if svc else "",
                dst_workload=log.candidate.workload.name if log.candidate else "",
                chain=chain.envoy_name if chain else "", protocol=protocol,
                authz=("allow" if d.allowed else "deny") if d is not None else "",
                authz_policy=(d.policy or "") if d is not None else "",
                response_code_details=log.detail, route=log.route, upstream_cluster=log.cluster,
                upstream_host=log.host, attempts=log.attempts or None, method=plan.view.method,
                path=plan.view.path, authority=plan.view.authority, status=status,
                bytes_sent=responder.body_bytes, bytes_received=request.body_bytes, duration_ms=duration_ms,
                response_flags=flags or "-",
                error=log.error if status == 0 or status >= 500 or status == 101 or flags else ""))

    async def close(self) -> None:
        await self.mirrorer.close()
        self.h1pool.close()
        await self.h2pool.close()


async def _on_pooled(pooled, method, target, authority, headers, body, clen, upgrade, replayable: bool,
                     sent: list):
    """One attempt on a pooled HTTP/1.1 connection: the response, or None when the upstream had closed it while
    idle and nothing of the request can have been processed (then another connection is tried, as Envoy
    does); any other failure aborts the connection and is raised."""
    stream, reader = pooled
    try:
        sent[0] = True
        return await forward_request(stream, method, target, authority, headers, body, content_length=clen,
                                     reader=reader, upgrade=upgrade)
    except ClientUpstreamReset as err:
        stream.abort()
        if not (err.before_response and replayable):
            raise
        return None
    except BaseException:
        stream.abort()
        raise


async def _on_fresh(stream, method, target, authority, headers, body, clen, upgrade, sent: list):
    """The request on a connection just opened for it: the response; any failure aborts the connection."""
    try:
        sent[0] = True
        return await forward_request(stream, method, target, authority, headers, body, content_length=clen,
                                     upgrade=upgrade)
    except BaseException:
        stream.abort()
        raise


async def _stream_body(chunks, responder, at_end: Callable[[], bool] | None) -> None:
    """An answer's body chunk by chunk to the client; ``at_end`` (an HTTP/2 answer to an h2c client): the last
    chunk carries the end when it is known with it."""
    async for chunk in chunks:
        if at_end is not None and at_end():
            await responder.send_body(chunk, end=True)
        else:
            await responder.send_body(chunk)


async def _raise(err: BaseException):
    """An attempt that failed already, for ``_forward(first=...)`` to classify."""
    raise err


async def _value(value):
    """An attempt that answered already, for ``_forward(first=...)`` to classify."""
    return value


def _trailers_of(request) -> tuple:
    """A streamed h2c request's trailers, asked for by the upstream sender once the body has ended."""
    return request.trailers


def _grpc_status_of(headers) -> str:
    for name, value in headers:
        if name == b"grpc-status":
            return value.decode("latin-1").strip()
    return ""


__all__ = ["HttpPipeline", "RequestPlan", "Upstream", "plan_request", "request_view", "apply_ops", "read_body",
           "REQUEST_BUFFER_LIMIT_BYTES"]
