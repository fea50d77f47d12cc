"""HBONE origination: a pool of mTLS HTTP/2 connections, and CONNECT tunnels opened on them.

ztunnel `src/proxy/pool.rs` (reference/ztunnel.md §2):
- key = (source identity, acceptable destination identities, destination ip:port, source ip);
- at most min(100, peer's SETTINGS_MAX_CONCURRENT_STREAMS) streams per connection; a full
  connection is not used for new streams;
- "backpressure correctly if 1000 tasks all demand a new connection to the same key at once, and
  not eagerly open 1000 tunnel connections": concurrent openers of one key share one dial;
- connections that got GOAWAY or died are not reused; unused connections are released after
  5 minutes (POOL_UNUSED_RELEASE_TIMEOUT).
Unlike ztunnel, a connection that was full becomes usable again as its streams finish
(ztunnel's `connection_limits` test documents not doing so as an inefficiency).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import Callable, Mapping

import h2.exceptions
from certs.errors import PeerIdentityError
from certs.spiffe import SpiffeId
from certs.tls import check_server_identity, classify_handshake_error

from hbone import protocol as P
from hbone._conn import HboneConnection, HboneStream
from hbone.connect import ConnectRequest
from hbone.errors import ConnectFailed, TunnelRefused
from hbone.protocol import ErrorCodes
from hbone.settings import HboneSettings

log = logging.getLogger("hbone.pool")

# A stream refused before the server processed it (REFUSED_STREAM, or above a GOAWAY's last stream
# id: RFC 9113 §8.7 "can be retried") is retried on another connection this many times.
REFUSED_STREAM_RETRIES = 2


@dataclass(frozen=True, slots=True)
class PoolKey:
    src_identity: SpiffeId
    dst_identities: frozenset[SpiffeId]
    dst: tuple[str, int]
    # ztunnel keys on the source IP too: "Because we spoof the source IP, we need to key on this".
    local_host: str | None


class _Retry(Exception):
    """Internal: the stream was not processed by the server; try another connection."""


class _ClientConnection(HboneConnection):
    core: P.ClientCore

    def __init__(self, pool: "HbonePool", key: PoolKey, loop: asyncio.AbstractEventLoop, context: ssl.SSLContext):
        super().__init__(P.ClientCore(pool.settings), pool.settings, loop, context, server_side=False)
        self.pool = pool
        self.key = key
        self.identity_error: PeerIdentityError | None = None
        self.server_identity: SpiffeId | None = None
        self.reserved = 0
        self.pending_opens: dict[int, asyncio.Future] = {}
        self._ready: asyncio.Future = loop.create_future()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.goaway_last_stream: int | None = None

    def tls_made(self) -> None:
        try:
            # ztunnel IdentityVerifier: the server must be one of the expected identities.
            self.server_identity = check_server_identity(self.tls.sslobj, self.key.dst_identities,
                                                         self.pool.trust_domain)
        except PeerIdentityError as err:
            self.identity_error = err
            self.abort()
            return
        super().tls_made()

    def tls_data(self, data: bytes) -> None:
        if self.identity_error is None:
            super().tls_data(data)

    # -- state --
    @property
    def limit(self) -> int:
        return min(self.settings.client_max_streams_per_connection, self.core.peer_max_concurrent_streams)

    @property
    def usable(self) -> bool:
        return (self._ready.done() and not self._ready.cancelled() and self._ready.exception() is None
                and not self.lost and not self.core.goaway_received and not self.core.closed)

    @property
    def in_use(self) -> int:
        return len(self.streams) + self.reserved

    async def ready(self) -> None:
        """Wait for the server's first SETTINGS: the server accepted our certificate (TLS 1.3
        client auth fails after the client's handshake is done) and speaks HTTP/2."""
        await self._ready

    def on_event(self, event: P.Event) -> None:
        cls = event.__class__
        if cls is P.SettingsChanged:
            if not self._ready.done():
                self._ready.set_result(None)
        elif cls is P.TunnelResponse:
            fut = self.pending_opens.pop(event.stream_id, None)
            if fut is not None and not fut.done():
                fut.set_result(event)

    def on_goaway(self, event: P.ConnectionTerminated) -> None:
        self.goaway_last_stream = event.last_stream_id
        self.pool._forget(self)
        for sid, fut in list(self.pending_opens.items()):
            if sid > event.last_stream_id and not fut.done():
                fut.set_exception(_Retry())
        if not event.by_peer and self.transport is not None:
            self.flush_now()
            self.close_transport()
        elif not self.streams:
            self.flush_now()
            self.close_transport()

    def on_stream_finished(self, stream: HboneStream) -> None:
        fut = self.pending_opens.pop(stream.stream_id, None)
        if fut is not None and not fut.done():
            err = stream._error
            fut.set_exception(err if err is not None else ConnectFailed("closed", "stream ended before the CONNECT answer"))
        if not self.streams:
            if self.core.goaway_received:
                self.loop.call_soon(self._close_transport)
            elif self.in_use == 0:
                self._arm_idle()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.lost and not self.streams:
            self.flush_now()
            self.close_transport()

    def handle_event(self, event: P.Event) -> None:
        if event.__class__ is P.StreamReset and event.stream_id in self.pending_opens:
            fut = self.pending_opens.pop(event.stream_id)
            if not fut.done():
                if event.code == ErrorCodes.REFUSED_STREAM:
                    fut.set_exception(_Retry())
                else:
                    fut.set_exception(ConnectFailed("closed", f"CONNECT reset with HTTP/2 error {event.code}"))
        super().handle_event(event)

    def on_lost(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self._ready.done():
            exc = self.lost_exc
            if isinstance(exc, ssl.SSLError) or (exc is not None and isinstance(exc.__cause__, ssl.SSLError)):
                err = ConnectFailed("tls", classify_handshake_error(exc))
            else:
                err = ConnectFailed("closed", f"connection closed before HTTP/2 settings: {exc}")
            self._ready.set_exception(err)
            self._ready.exception()  # retrieved: the dialer reads it via ready()
        for fut in self.pending_opens.values():
            if not fut.done():
                fut.set_exception(ConnectFailed("closed", f"HBONE connection lost: {self.lost_exc}"))
        self.pending_opens.clear()
        self.pool._forget(self)

    def _arm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self.loop.call_later(self.settings.pool_idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        if self.in_use == 0 and not self.lost:
            self.pool._forget(self)
            self.goaway()
            self.close_transport()

    # -- opening a tunnel --
    async def open(self, request: ConnectRequest) -> HboneStream:
        """Send CONNECT on this connection (a slot was reserved by the pool)."""
        try:
            try:
                sid = self.core.open_tunnel(request)
            except h2.exceptions.H2Error:
                raise _Retry() from None
            stream = self.new_stream(sid)
        finally:
            self.reserved -= 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        fut = self.loop.create_future()
        self.pending_opens[sid] = fut
        self.flush_now()
        try:
            response: P.TunnelResponse = await fut
        except asyncio.CancelledError:
            self.pending_opens.pop(sid, None)
            stream.abort(ErrorCodes.CANCEL)   # no byte was sent: "no longer needed", not an error
            raise
        if response.status != 200:
            # Error answers come with END_STREAM; make sure the stream is gone either way.
            if not stream._done:
                stream.abort(ErrorCodes.CANCEL)
            raise TunnelRefused(response.status)
        return stream

    def __repr__(self) -> str:
        state = "goaway" if self.core.goaway_received else "lost" if self.lost else "ready" if self.usable else "dialing"
        return f"<HboneClientConnection {self.key.dst[0]}:{self.key.dst[1]} {state} streams={self.in_use}/{self.limit}>"


class HbonePool:
    """Opens HBONE tunnels, pooling connections per `PoolKey`."""

    def __init__(self, context_source: Callable[[], ssl.SSLContext], *, trust_domain: str,
                 settings: HboneSettings = HboneSettings()):
        self.context_source = context_source
        self.trust_domain = trust_domain
        self.settings = settings
        self._conns: dict[PoolKey, list[_ClientConnection]] = {}
        self._all: set[_ClientConnection] = set()  # includes draining connections
        self._dials: dict[PoolKey, asyncio.Task] = {}
        self._closed = False
        self.dials = 0  # TLS connections started, for tests and metrics

    async def open_tunnel(self, *, src_identity: SpiffeId, dst_identities: frozenset[SpiffeId],
                          dst: tuple[str, int], authority: str, headers: Mapping[str, str] = {},
                          local_host: str | None = None) -> HboneStream:
        """CONNECT `authority` via the HBONE peer at `dst`, whose identity must be in
        `dst_identities`. Raises TunnelRefused(status) on a non-200 answer, ConnectFailed(reason)
        when the connection cannot be made, BadAuthority/BadRequest for a bad request."""
        request = ConnectRequest.build(authority, headers)
        key = PoolKey(src_identity, frozenset(dst_identities), (dst[0], int(dst[1])), local_host)
        for attempt in range(REFUSED_STREAM_RETRIES + 1):
            conn = await self._checkout(key)
            try:
                return await conn.open(request)
            except _Retry:
                if attempt == REFUSED_STREAM_RETRIES:
                    raise ConnectFailed("closed", "stream refused by the server (GOAWAY)") from None
        raise AssertionError("unreachable")

    async def _checkout(self, key: PoolKey) -> _ClientConnection:
        """A connection with a free stream slot (reserved for the caller), dialing if needed."""
        while True:
            if self._closed:
                raise ConnectFailed("closed", "pool is closed")
            for conn in self._conns.get(key, ()):
                if conn.usable and conn.in_use < conn.limit:
                    conn.reserved += 1
                    return conn
            dial = self._dials.get(key)
            if dial is not None and dial.done():
                # Finished, but its done-callback (which removes it) has not run yet. Awaiting a done
                # task does not yield, so waiting on it again would spin forever without letting
                # that callback run: the connection it made is full, so start the next dial.
                del self._dials[key]
                dial = None
            if dial is None:
                dial = asyncio.get_running_loop().create_task(self._dial(key))
                self._dials[key] = dial
                dial.add_done_callback(lambda t, k=key: self._dial_done(k, t))
            await asyncio.shield(dial)  # a cancelled opener does not cancel the shared dial

    def _dial_done(self, key: PoolKey, task: asyncio.Task) -> None:
        if self._dials.get(key) is task:
            del self._dials[key]
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter re-raises it through shield()

    async def _dial(self, key: PoolKey) -> None:
        loop = asyncio.get_running_loop()
        self.dials += 1
        conn: _ClientConnection | None = None

        def factory() -> _ClientConnection:
            nonlocal conn
            conn = _ClientConnection(self, key, loop, ctx)
            return conn

        host, port = key.dst
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                ctx = self.context_source()
                # A plain TCP connection; the connection does TLS itself (hbone/_tls.py), with no
                # SNI (ztunnel: enable_sni = false), within settings.tls_handshake_timeout; the
                # identity is checked against the SPIFFE URI SAN in tls_made.
                await loop.create_connection(
                    factory, host, port,
                    local_addr=(key.local_host, 0) if key.local_host else None)
                assert conn is not None
                await conn.handshake_done
                if conn.identity_error is not None:
                    err = conn.identity_error
                    raise ConnectFailed("identity" if err.reason == "unexpected_identity" else "tls",
                                        f"{err.reason}: {err}")
                await conn.ready()
        except TimeoutError as err:
            if conn is not None:
                conn.abort()
            if conn is not None and conn.handshake_done.done() and not conn.handshake_done.cancelled() \
                    and conn.handshake_done.exception() is err:
                raise ConnectFailed("timeout", f"{host}:{port}: {err}") from None
            raise ConnectFailed("timeout", f"no HBONE connection to {host}:{port} within "
                                           f"{self.settings.connect_timeout:g}s") from None
        except ConnectFailed:
            if conn is not None:
                conn.abort()
            raise
        except ssl.SSLError as err:
            if conn is not None:
                conn.abort()
            raise ConnectFailed("tls", classify_handshake_error(err)) from None
        except ConnectionRefusedError as err:
            raise ConnectFailed("refused", f"{host}:{port}: {err.strerror or err}") from None
        except asyncio.CancelledError:
            if conn is not None:
                conn.abort()  # a handshake in flight must not outlive its dial
            raise
        except OSError as err:
            if conn is not None:
                conn.abort()
            # Unreachable, reset during the handshake, no route: an upstream connection failure.
            reason = "tls" if isinstance(err.__cause__, ssl.SSLError) else "refused"
            raise ConnectFailed(reason, f"{host}:{port}: {err}") from None
        if self._closed:
            conn.abort()
            raise ConnectFailed("closed", "pool is closed")
        self._conns.setdefault(key, []).append(conn)
        self._all.add(conn)

    def _forget(self, conn: _ClientConnection) -> None:
        """No new streams on this connection (GOAWAY, lost, idle)."""
        conns = self._conns.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._conns[conn.key]
        if conn.lost:
            self._all.discard(conn)

    def connections(self, key: PoolKey | None = None) -> list[_ClientConnection]:
        if key is None:
            return [c for conns in self._conns.values() for c in conns]
        return list(self._conns.get(key, ()))

    async def close(self) -> None:
        """GOAWAY and close every connection; tunnels still open are reset."""
        self._closed = True
        for task in list(self._dials.values()):
            task.cancel()
        if self._dials:
            await asyncio.gather(*self._dials.values(), return_exceptions=True)
        conns = list(self._all) + self.connections()
        for conn in set(conns):
            for stream in list(conn.streams.values()):
                stream.abort()
            conn.goaway()
            conn.close_transport()
        waits = [asyncio.ensure_future(c.wait_lost()) for c in set(conns) if c.transport is not None]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=1.0)
            for fut in pending:
                fut.cancel()
            for conn in set(conns):
                conn.abort()
        self._conns.clear()
        self._all.clear()

    def __repr__(self) -> str:
        conns = self.connections()
        streams = sum(c.in_use for c in conns)
        return (f"<HbonePool keys={len(self._conns)} conns={len(conns)} streams={streams}"
                f"{' closed' if self._closed else ''}>")
