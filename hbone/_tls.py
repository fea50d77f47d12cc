"""HBONE's TLS, done by us over a plain TCP transport: `ssl.SSLObject` between two `ssl.MemoryBIO`s.

Why not the event loop's SSL transport (`create_connection(ssl=)`, `connect_accepted_socket(ssl=)`):
uvloop's (and asyncio's) SSLProtocol is a general-purpose layer with an app-side write backlog, an
app transport object, flow-control bookkeeping on both sides and state checks per call; for HBONE
the only user is one h2 connection that already batches its bytes (one write per loop turn), so the
layer is one `SSLObject.write` + one `MemoryBIO.read` + one `transport.write` per flush, and one
`MemoryBIO.write` + `SSLObject.read`s into a reused buffer per TCP read.

PERF NOTE (this 2-core box, shared, A/B alternating against the tree before, CPU per unit, medians):
the move is at parity, not a gain. `/tmp/s3/pingpong.py MODE 30000` (200-byte ping-pong, server CPU
per round trip) showed uvloop's SSL transport ~36 µs vs SSLObject + MemoryBIOs ~28-30 µs, but its
server runs without hbone._malloc's tuning; with it both are ~14 µs (uvloop's 256 KiB read
buffer per record was the difference). End to end, before -> after: HBONE 200-byte echo over one
tunnel (/tmp/tlsw/hping.py, 7 runs each) server 19.4 -> 19.5 µs per round trip; `python -m
benchmarks --only short --repeat 1 --short-count 3000` (6 runs each) ours-relay python-h2 101.5 ->
100 µs/stream, ours-node python-h2 118.5 -> 117; new connections (/tmp/tlsw/hconn.py, 5 runs each)
1 434 -> 1 449 µs server CPU; HTTP mesh (/tmp/s3/mesh.py --c 64 --secs 3 --runs 3, 3 x 2 runs each)
total 104.9 -> 103.4 µs per request, at --rate 1000 437 -> 438. What a read or flush costs is the
send/recv system calls (a loopback send() runs the receiver's TCP path: ~15 µs of a 20 µs echo),
not the TLS layer. Kept for what it does better: the handshake alert reaches the peer, the
handshake's last flight leaves with HTTP/2's first frames, and one place owns the TLS rules.

The rules below are asyncio's `sslproto.py` (CPython 3.11) / uvloop's `sslproto.pyx`, which do the
same thing with the same `ssl` objects; each place that copies one says so.
"""

from __future__ import annotations

import ssl

# A state machine as a table would be overkill for three states; they are plain ints for speed
# (compared on every read): HANDSHAKE -> OPEN -> CLOSING (we sent close_notify) -> CLOSED.
HANDSHAKE = 0
OPEN = 1
CLOSING = 2
CLOSED = 3

# asyncio sslproto: `SSLAgainErrors = (ssl.SSLWantReadError, ssl.SSLSyscallError)`: "not now, feed
# me more bytes". With memory BIOs OpenSSL never blocks on a socket; SSL_ERROR_SYSCALL only comes
# from an incoming BIO marked EOF, which we never do (a TCP FIN is handled by the connection).
AGAIN = (ssl.SSLWantReadError, ssl.SSLSyscallError)

# Largest plaintext asked of one SSLObject.read: asyncio's and uvloop's SSL_READ_MAX_SIZE. A read
# returns one record's plaintext (at most 16 KiB, RFC 8446 §5.1); CPython allocates this much and
# shrinks it to the record, which glibc does in place with the allocator tuning (hbone/_malloc.py).
# Measured against reading into a reused buffer with read(n, buffer) and copying out once (this
# 2-core box, SSLObject + MemoryBIO in-process, TLS 1.3 AES-256-GCM): one 250-byte record 0.92 vs
# 1.16 µs, sixteen 16 KiB records ~80 vs ~81-94 µs: the buffer saves nothing measurable here, so
# plain reads it is.
READ_MAX_BYTES = 256 * 1024


class TlsLayer:
    """One connection's TLS state: bytes from the socket in, plaintext out, and the reverse.

    Pure of I/O: the caller moves `take()`'s bytes to its transport. Errors are `ssl.SSLError`
    (handshake failures carry what `certs.tls.classify_handshake_error` reads)."""

    __slots__ = ("sslobj", "incoming", "outgoing", "state", "peer_closed", "_backlog")

    def __init__(self, context: ssl.SSLContext, *, server_side: bool):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # server_hostname=None: no SNI (ztunnel: enable_sni = false); asyncio's equivalent was "".
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                       server_hostname=None)
        self.state = HANDSHAKE
        self.peer_closed = False  # the peer's close_notify arrived
        self._backlog: list[bytes] | None = None  # plaintext a write could not take yet

    # -- handshake --
    def handshake(self, data: bytes) -> bool:
        """Feed `data` and step the handshake: True once it is complete (state OPEN). Raises
        ssl.SSLError when it failed; the alert OpenSSL wrote for the peer is then in `take()`.
        asyncio `_do_handshake`: SSLAgainErrors mean "send what we have, wait for more"."""
        if data:
            self.incoming.write(data)
        try:
            self.sslobj.do_handshake()
        except AGAIN:
            return False
        self.state = OPEN
        return True

    # -- reading --
    def decrypt(self, data: bytes) -> bytes:
        """The plaintext that `data` completes (b"" if none yet). Sets `peer_closed` when the peer's
        close_notify arrived (asyncio `_do_read__copied`: a read returning nothing is close_notify;
        SSLAgainErrors end the loop). Raises ssl.SSLError on a bad record or a fatal alert.

        Post-handshake messages (a TLS 1.3 KeyUpdate, session tickets) are handled inside read();
        an answer they need (KeyUpdate with update_requested) lands in `outgoing`, so the caller
        sends `take()` after every read. TLS 1.3 has no renegotiation, and certs.tls sets
        OP_NO_RENEGOTIATION for the TLS 1.2 opt-in, so read never needs to write first."""
        incoming = self.incoming
        if data:
            incoming.write(data)
        sslobj = self.sslobj
        read = sslobj.read
        chunks: list[bytes] | None = None
        try:
            chunk = read(READ_MAX_BYTES)
            if not chunk:
                self.peer_closed = True
                return b""
            # The common case, one or a few whole records per TCP read: stop when OpenSSL holds
            # nothing more, instead of the read that would raise SSLWantReadError (raising and
            # catching it cost ~1 µs of the ~2 µs a small record took: in-process timing above).
            if not incoming.pending and not sslobj.pending():
                return chunk
            # More records (a bulk read: ~16 of them): read until OpenSSL asks for more, uvloop's
            # loop; one exception per read is cheaper than two checks per record.
            chunks = [chunk]
            while True:
                chunk = read(READ_MAX_BYTES)
                if not chunk:
                    self.peer_closed = True
                    break
                chunks.append(chunk)
        except AGAIN:
            if chunks is None:
                return b""
        except ssl.SSLZeroReturnError:
            # close_notify when we already sent ours: CPython's read returns b"" for it only while
            # SSL_get_shutdown() is exactly SSL_RECEIVED_SHUTDOWN, and raises this otherwise.
            self.peer_closed = True
            if chunks is None:
                return b""
        return b"".join(chunks)

    # -- writing --
    def write(self, data: bytes) -> None:
        """Encrypt `data` into `outgoing`. Dropped once we sent close_notify (asyncio
        `_write_appdata` in FLUSHING/SHUTDOWN). asyncio `_do_write`: a write that raises
        SSLAgainErrors waits in a backlog for the next read; with TLS 1.3 and renegotiation off it
        does not happen, but the rule costs nothing on the fast path."""
        if self.state != OPEN:
            return
        if self._backlog is not None:
            self._backlog.append(data)
            return
        try:
            self.sslobj.write(data)  # a memory BIO takes everything: no partial writes
        except AGAIN:
            self._backlog = [data]

    def retry_backlog(self) -> None:
        backlog = self._backlog
        if backlog is None or self.state != OPEN:
            return
        self._backlog = None
        for i, data in enumerate(backlog):
            try:
                self.sslobj.write(data)
            except AGAIN:
                self._backlog = backlog[i:]
                return

    def take(self) -> bytes:
        """Every TLS byte waiting to go to the peer (b"" if none)."""
        out = self.outgoing
        return out.read() if out.pending else b""

    # -- closing --
    def close(self) -> bool:
        """Send close_notify (RFC 8446 §6.1: "Each party MUST send a close_notify alert before
        closing its write side"), after any plaintext already written. Returns True when the
        closure is complete (the peer's close_notify came first), False while we wait for it.
        asyncio `_do_shutdown`: `unwrap()` raising SSLAgainErrors means ours is written (take())
        and the peer's is still to come."""
        if self.state == OPEN:
            self.state = CLOSING
            try:
                self.sslobj.unwrap()
            except AGAIN:
                return self.peer_closed
            except ssl.SSLError:
                self.state = CLOSED
                return True
            self.state = CLOSED
            return True
        return self.state == CLOSED or self.peer_closed

    def drain_closing(self, data: bytes) -> bool:
        """While CLOSING: read and discard what the peer still sends until its close_notify. True
        when it came. (asyncio retries `unwrap()`, which fails with "application data after close
        notify" if the peer was still sending; reading first discards that data instead.)"""
        self.decrypt(data)
        if self.peer_closed:
            self.state = CLOSED
            return True
        return False

    def extra(self, name: str, default=None):
        """asyncio's SSL transport `get_extra_info` names."""
        obj = self.sslobj
        if name == "ssl_object":
            return obj
        if self.state == HANDSHAKE:
            return default
        if name == "peercert":
            return obj.getpeercert()
        if name == "cipher":
            return obj.cipher()
        if name == "compression":
            return obj.compression()
        return default
