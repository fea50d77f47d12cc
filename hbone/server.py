"""The HBONE listener (port 15008): mTLS, then HTTP/2 CONNECT, each tunnel handed to a handler.

Order per connection (ztunnel src/proxy/inbound.rs): TCP accept → TLS handshake (client certificate
required) → peer SPIFFE identity in our trust domain → HTTP/2 → per CONNECT: validate (400 by the
server itself) → handler (authorize, connect upstream, then `accept()` → 200, or `reject()`).

A TLS or identity failure closes that connection only and is reported to `on_tls_failure(reason,
remote_addr)`; the listener keeps serving. Every task is owned: the accept loop and connection
handshakes by the server, handler tasks by their connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Awaitable, Callable, Iterable

from certs.errors import PeerIdentityError
from certs.spiffe import SpiffeId
from certs.tls import classify_handshake_error, peer_identity

from hbone import protocol as P
from hbone._conn import HboneConnection, HboneStream
from hbone.connect import ConnectRequest
from hbone.protocol import ErrorCodes, TunnelState
from hbone.settings import GOAWAY_FLUSH_S, HboneSettings
from hbone.stream import StreamReset

log = logging.getLogger("hbone.server")

# Listen backlog: a burst of pooled clients reconnecting after a restart should not see SYN drops;
# 1024 is a common server default (nginx uses 511, Envoy 1024... the kernel caps it at somaxconn).
LISTEN_BACKLOG = 1024
# Status when the handler returned (or failed) without answering: ztunnel answers upstream/lookup
# failures 503, and a handler that did not decide is such a failure.
UNANSWERED_STATUS = 503

# A coroutine function (run as a task owned by its connection), or a plain function that answers the
# tunnel itself, at once or from callbacks it arranges (no task: see _ServerConnection._start_handler).
Handler = Callable[["InboundTunnel"], "Awaitable[None] | None"]
TlsFailureCallback = Callable[[str, tuple[str, int]], None]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Something the listener refused, for counters and one access-log line each.

    kind: ``tls`` (handshake or peer identity: reason is a certs PeerIdentityError reason, or
    ``timeout``), ``listener`` (``max_connections``), ``connection`` (GOAWAY for abuse: reason is
    an hbone.limits Abuse reason, ``protocol_error``, ``header_list_too_large``,
    ``outbound_control_flood``), ``stream`` (``max_concurrent_streams``, ``max_pending_tunnels``:
    RST_STREAM REFUSED_STREAM; ``431``), or ``idle`` (``idle_timeout``: a clean GOAWAY, counted for
    visibility). ``code`` is the HTTP/2 error code or HTTP status sent, when there is one."""
    kind: str
    reason: str
    remote_addr: tuple[str, int]
    detail: str = ""
    code: int | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.reason}"

    def log_line(self) -> str:
        code = f" code={self.code}" if self.code is not None else ""
        detail = f" ({self.detail})" if self.detail else ""
        return (f"HBONE refused {self.kind} from {self.remote_addr[0]}:{self.remote_addr[1]}: "
                f"{self.reason}{code}{detail}")


RefusalCallback = Callable[[Refusal], None]


class InboundTunnel:
    """One CONNECT received: what the handler needs to decide, and how to answer."""

    __slots__ = ("request", "peer_identity", "remote_addr", "local_addr", "_conn", "stream_id",
                 "status", "reason", "_stream")

    def __init__(self, conn: "_ServerConnection", stream_id: int, request: ConnectRequest):
        self._conn = conn
        self.stream_id = stream_id
        self.request = request
        self.peer_identity: SpiffeId = conn.peer_identity  # type: ignore[assignment]
        self.remote_addr = conn.remote_addr
        self.local_addr = conn.local_addr
        self.status: int | None = None
        self.reason = ""
        self._stream: HboneStream | None = None

    @property
    def authority(self) -> tuple[str, int]:
        return self.request.authority

    @property
    def answered(self) -> bool:
        return self.status is not None

    async def accept(self, headers: Iterable[tuple[str, str]] = ()) -> HboneStream:
        """Send 200 and return the tunnel's byte stream (data the client sent early is in it)."""
        return self.accept_nowait(headers)

    async def reject(self, status: int, reason: str = "") -> None:
        """Answer `status` (400/401/503...) with END_STREAM. `reason` is kept for logs only:
        ztunnel sends no body, and a deny reason is not the client's business."""
        self.reject_nowait(status, reason)

    # The same answers for a plain-function handler answering from a callback (no await there).
    def accept_nowait(self, headers: Iterable[tuple[str, str]] = ()) -> HboneStream:
        stream = self._answer(200, tuple(headers))
        assert stream is not None
        return stream

    def reject_nowait(self, status: int, reason: str = "") -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"reject needs an error status, got {status}")
        self.reason = reason
        self._answer(status, ())

    def _answer(self, status: int, headers: tuple[tuple[str, str], ...]) -> HboneStream | None:
        if self.status is not None:
            raise RuntimeError(f"tunnel {self.stream_id} already answered {self.status}")
        self.status = status
        return self._conn.answer(self, status, headers)

    def __repr__(self) -> str:
        return (f"<InboundTunnel id={self.stream_id} {self.request.authority_str} "
                f"from={self.peer_identity} status={self.status}>")


class _ServerConnection(HboneConnection):
    core: P.ServerCore

    def __init__(self, server: "HboneServer", loop: asyncio.AbstractEventLoop, context: ssl.SSLContext):
        super().__init__(P.ServerCore(server.settings), server.settings, loop, context, server_side=True)
        self.server = server
        self.peer_identity: SpiffeId | None = None
        self.handler_tasks: set[asyncio.Task] = set()
        self.refused = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._paused_control_mark: int | None = None  # guard.provoked_control_frames at pause
        self._lingering = False  # after our error GOAWAY: read and discard until closed

    def tls_made(self) -> None:
        # Identity is checked here, right after the handshake, before any byte of HTTP/2 is read
        # or written.
        sslobj = self.tls.sslobj
        try:
            alpn = sslobj.selected_alpn_protocol()
            if alpn not in (None, "h2"):
                raise PeerIdentityError("alpn", f"peer negotiated ALPN {alpn!r}, HBONE needs h2")
            self.peer_identity = peer_identity(sslobj, self.server.trust_domain)
        except PeerIdentityError as err:
            self.refused = True
            self.server._tls_failed(err.reason, self.remote_addr, str(err))
            self.abort()
            return
        super().tls_made()
        self.server._conns.add(self)
        self._arm_idle()

    def tls_data(self, data: bytes) -> None:
        if self.refused:
            return
        super().tls_data(data)
        mark = self._paused_control_mark
        if mark is not None and not self.lost and (
                self.core.guard.provoked_control_frames - mark > self.settings.max_outbound_control_frames):
            # The peer makes us owe PING/SETTINGS ACKs while it reads nothing (Envoy
            # max_outbound_control_frames): a GOAWAY would queue behind the unread bytes; abort.
            self.server._refused(Refusal("connection", "outbound_control_flood", self.remote_addr,
                                         f"over {self.settings.max_outbound_control_frames} control frames "
                                         "owed to a peer that does not read",
                                         int(ErrorCodes.ENHANCE_YOUR_CALM)))
            self.core.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
            self.abort()

    def should_close_transport(self) -> bool:
        return not self._lingering

    def tls_eof(self) -> None:
        if self._lingering and self.transport is not None:
            self.flush_now()
            self.close_transport()  # the peer is done: our GOAWAY went out before its EOF

    def pause_writing(self) -> None:
        super().pause_writing()
        self._paused_control_mark = self.core.guard.provoked_control_frames

    def resume_writing(self) -> None:
        self._paused_control_mark = None
        super().resume_writing()

    # -- idle timeout (settings.CONNECTION_IDLE_TIMEOUT_S) --
    def _arm_idle(self) -> None:
        if self._idle_timer is None and not self.lost:
            self._idle_timer = self.loop.call_later(self.settings.idle_timeout, self._idle_expired)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if self.streams or self.handler_tasks or self.lost:
            return
        self.server._refused(Refusal("idle", "idle_timeout", self.remote_addr,
                                     f"no tunnel for {self.settings.idle_timeout:g}s", int(ErrorCodes.NO_ERROR)))
        self.start_drain()

    def on_event(self, event: P.Event) -> None:
        if event.__class__ is P.TunnelRequested:
            self._disarm_idle()
            sid = event.stream_id
            self.new_stream(sid)
            self._start_handler(InboundTunnel(self, sid, event.request))
        elif event.__class__ is P.RequestRejected:
            log.info("HBONE request from %s:%s rejected %d: %s", *self.remote_addr, event.status, event.reason)
            if event.status == 431:
                self.server._refused(Refusal("stream", "431", self.remote_addr, event.reason, 431))
        elif event.__class__ is P.StreamRefused:
            self.server._refused(Refusal("stream", event.reason, self.remote_addr,
                                         f"stream {event.stream_id}", event.code))

    def _start_handler(self, tunnel: InboundTunnel) -> None:
        """Run the handler. PERF NOTE: its coroutine is the task itself, settled by one done callback
        (`_handler_done`), instead of a wrapper coroutine awaiting it plus a second callback: one
        coroutine frame and one callback less per tunnel, alive for as long as the handler runs.
        Measured (/tmp/hb7/prof_relay.py short 3000 and /tmp/hb7/mem_peak.py 1000, benchmarks.relay
        in-process, this 2-core machine): see the commit message.
        A handler that is a plain function (returns None, not a coroutine) runs synchronously, with
        no task at all: it answers the tunnel itself, now or from callbacks it arranges."""
        try:
            coro = self.server.handler(tunnel)
        except Exception:
            log.exception("HBONE handler failed for %r", tunnel)
            self._settle(tunnel, "handler failed")
            return
        if coro is None:
            return
        task = self.loop.create_task(coro) if asyncio.iscoroutine(coro) else asyncio.ensure_future(coro)
        self.handler_tasks.add(task)
        task.add_done_callback(partial(self._handler_done, tunnel))

    def _handler_done(self, tunnel: InboundTunnel, task: asyncio.Task) -> None:
        self.handler_tasks.discard(task)
        if task.cancelled():
            self._settle(tunnel, "handler cancelled")
            return
        exc = task.exception()
        if exc is not None:
            log.error("HBONE handler failed for %r", tunnel, exc_info=exc)
            self._settle(tunnel, "handler failed")
        else:
            self._settle(tunnel, "handler returned without answering")

    def _settle(self, tunnel: InboundTunnel, why: str) -> None:
        if not tunnel.answered and not self.lost:
            tunnel.reason = why
            try:
                tunnel._answer(UNANSWERED_STATUS, ())
            except RuntimeError:
                pass

    def answer(self, tunnel: InboundTunnel, status: int, headers) -> HboneStream | None:
        sid = tunnel.stream_id
        stream = self.streams.get(sid)
        if self.core.tunnel_state(sid) is not TunnelState.REQUESTED or stream is None:
            # The client reset the stream or the connection died while the handler worked.
            if stream is None:
                stream = HboneStream(self, sid)
                stream._fail(StreamReset("the client went away before the tunnel was answered"))
                stream._finish()
            return stream if status == 200 else None
        self.core.respond(sid, status, headers)
        if status != 200:
            self.stream_finished(sid)
        # One write per loop turn for all the answers of that turn (with 64 CONNECTs in flight most
        # turns answer several): the 200 goes out with the turn's other frames.
        self.schedule_flush()
        return stream if status == 200 else None

    def on_stream_finished(self, stream: HboneStream) -> None:
        self.core.forget(stream.stream_id)
        if self.core.goaway_sent and not self.streams:
            self.loop.call_soon(self._close_if_drained)
        elif not self.streams:
            self._arm_idle()

    def _close_if_drained(self) -> None:
        if not self.streams and not self.lost and self.transport is not None:
            self.flush_now()
            self.close_transport()

    def on_goaway(self, event: P.ConnectionTerminated) -> None:
        if not event.by_peer:
            self.server._refused(Refusal("connection", event.reason or "protocol_error", self.remote_addr,
                                         getattr(self.core.abuse, "detail", ""), event.code))
            # Lingering close: keep reading (and discarding: the core is closed) so the GOAWAY is
            # not lost to the TCP RST that closing with unread input would send; the peer sees
            # GOAWAY, then EOF when it stops. A peer that neither stops nor reads is cut after
            # GOAWAY_FLUSH_S.
            self._lingering = True
            if self._abort_timer is None:
                self._abort_timer = self.loop.call_later(GOAWAY_FLUSH_S, self.abort)
        # A client GOAWAY means it opens no more streams; existing tunnels continue.

    def on_lost(self) -> None:
        self.server._conns.discard(self)
        self._disarm_idle()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None

    def start_drain(self) -> None:
        self.goaway()
        if not self.streams:
            self._close_if_drained()

    def __repr__(self) -> str:
        return (f"<HboneServerConnection {self.remote_addr[0]}:{self.remote_addr[1]} "
                f"peer={self.peer_identity} streams={len(self.streams)} "
                f"pending={self.core.pending_tunnels} abuse={self.core.abuse and self.core.abuse.reason}>")


class HboneServer:
    """`await HboneServer(ctx_source, handler, trust_domain=...).start(host, port)`."""

    def __init__(self, context_source: Callable[[], ssl.SSLContext], handler: Handler, *,
                 trust_domain: str, settings: HboneSettings = HboneSettings(),
                 on_tls_failure: TlsFailureCallback | None = None,
                 on_refusal: RefusalCallback | None = None):
        self.context_source = context_source
        self.handler = handler
        self.trust_domain = trust_domain
        self.settings = settings
        self.on_tls_failure = on_tls_failure
        # One call per refusal of any kind (TLS, listener, connection, stream): the proxy turns
        # it into an access-log line and a metric. Refusal.log_line() is a ready-made text.
        self.on_refusal = on_refusal
        self.refusals: Counter[str] = Counter()  # Refusal.key -> count
        self._handshaking = 0
        self.sockets: list[socket.socket] = []
        self._conns: set[_ServerConnection] = set()
        self._tasks: set[asyncio.Task] = set()  # accept loops and handshakes
        self._accepting = False
        self.tls_failures = 0

    @property
    def address(self) -> tuple[str, int]:
        """The first listening address (kept after close, for logs)."""
        return self._address

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> "HboneServer":
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # --workers N
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sockets.append(sock)
        if not hasattr(self, "_address"):
            name = sock.getsockname()
            self._address = (name[0], name[1])
        self._accepting = True
        self._own(loop.create_task(self._accept_loop(sock)))
        return self

    def _own(self, task: asyncio.Task) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while self._accepting:
            try:
                conn_sock, addr = await loop.sock_accept(sock)
            except (OSError, ValueError) as err:
                if not self._accepting:
                    return
                # EMFILE and friends: back off a little instead of spinning (the listener lives on).
                log.warning("HBONE accept failed: %s", err)
                await asyncio.sleep(0.1)
                continue
            if self._handshaking + len(self._conns) >= self.settings.max_connections:
                # Accept-then-close: leaving it in the backlog would only delay the refusal.
                conn_sock.close()
                self._refused(Refusal("listener", "max_connections", (addr[0], addr[1]),
                                      f"{self.settings.max_connections} connections open"))
                continue
            self._own(loop.create_task(self._handshake(conn_sock, (addr[0], addr[1]))))

    async def _handshake(self, conn_sock: socket.socket, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        conn_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._handshaking += 1
        conn: _ServerConnection | None = None
        try:
            conn = _ServerConnection(self, loop, self.context_source())
            # A plain TCP transport: the connection does TLS itself (hbone/_tls.py), with
            # settings.tls_handshake_timeout bounding the whole handshake, which also cuts a
            # slowloris client (silent, or a ClientHello trickled byte by byte).
            await loop.connect_accepted_socket(lambda: conn, conn_sock)
            await conn.handshake_done
        except asyncio.CancelledError:
            if conn is not None and conn.transport is not None:
                conn.abort()
            conn_sock.close()
            raise
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as err:
            if conn is None or conn.transport is None:
                conn_sock.close()
            reason = "timeout" if isinstance(err, TimeoutError) else classify_handshake_error(err)
            self._tls_failed(reason, addr, str(err))
        finally:
            self._handshaking -= 1

    def _tls_failed(self, reason: str, addr: tuple[str, int], detail: str = "") -> None:
        self.tls_failures += 1
        if self.on_tls_failure is not None:
            try:
                self.on_tls_failure(reason, addr)
            except Exception:  # a broken callback must not take down the listener
                log.exception("on_tls_failure callback failed")
        self._refused(Refusal("tls", reason, addr, detail))

    def _refused(self, refusal: Refusal) -> None:
        self.refusals[refusal.key] += 1
        log.info("%s", refusal.log_line())
        if self.on_refusal is not None:
            try:
                self.on_refusal(refusal)
            except Exception:  # a broken callback must not take down the listener
                log.exception("on_refusal callback failed")

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def active_tunnels(self) -> int:
        return sum(len(c.streams) for c in self._conns)

    def stop_accepting(self) -> None:
        """Close the listening sockets now, synchronously: a drain that has already flipped readiness
        to 503 must not accept one more connection while it waits for its first await."""
        self._accepting = False
        for sock in self.sockets:
            sock.close()

    async def close(self, drain_deadline: float = 0.0) -> None:
        """Stop accepting, GOAWAY every connection, let in-flight tunnels finish for up to
        `drain_deadline` seconds (a duration, not a clock time), then cut what is left
        (DESIGN §7, ztunnel drain)."""
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self._conns):
            conn.start_drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, drain_deadline)
        while any(c.streams or c.handler_tasks for c in self._conns) and loop.time() < end:
            await asyncio.sleep(min(0.05, max(0.0, end - loop.time())))
        # Deadline passed: whatever is left is cut. The connection is aborted (TCP RST), not its
        # streams reset with CANCEL, because a peer reads CANCEL as a clean end (ztunnel) and would
        # take a truncated stream for a complete one.
        for conn in list(self._conns):
            if conn.streams:
                conn.abort()
        tasks = [t for conn in self._conns for t in conn.handler_tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self._conns):
            if conn.transport is not None and not conn.lost:
                conn.flush_now()
                conn.close_transport()
        waits = [asyncio.ensure_future(c.wait_lost()) for c in list(self._conns)]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=GOAWAY_FLUSH_S)
            for conn in list(self._conns):
                conn.abort()
            for fut in pending:
                fut.cancel()
        self.sockets.clear()

    def __repr__(self) -> str:
        where = f"{self.address[0]}:{self.address[1]}" if self.sockets else "closed"

        refused = " ".join(f"{k}={v}" for k, v in sorted(self.refusals.items()))
        return (f"<HboneServer {where} conns={self.connections} tunnels={self.active_tunnels} "
                f"tls_failures={self.tls_failures} refused[{refused}]>")
