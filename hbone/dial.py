"""Dial a TCP connection from a given source IP (ztunnel ``freebind_connect(Some(src_ip), dst)``).

The node proxy connects to a local pod from the original client's IP (inbound) and to plain-TCP
destinations from the source pod's IP (outbound), so the far side sees who called it.

PERF NOTE — why not ``loop.create_connection(..., local_addr=(ip, 0))``: that is ``bind(ip, 0)``
then ``connect()``. ``bind`` with port 0 must reserve a local port for *every* destination at once,
so it can only use a port that no socket on that IP holds — TIME_WAIT ones included — and the kernel
scans the ephemeral range for one (Linux prefers odd ports for bind: half the range). Short-lived
relayed connections leave thousands of TIME_WAIT sockets on the client IPs (127.0.0.1 on this
box), and once they hold more than the odd half of the range the scan walks all of it, and at the
end fails with EADDRINUSE (the fallback then dials from our own address and the pod no longer sees
the caller). ``IP_BIND_ADDRESS_NO_PORT`` (Linux ≥ 4.2) binds the IP only and lets ``connect()`` pick
the port for the full 4-tuple, so a port is reusable towards any other destination — the standard
fix for source-IP-bound clients. Measured on this 2-core box:
- 16 000 TIME_WAIT sockets on one loopback IP (left by plain ``bind(ip, 0)`` dials that closed
  first), then 300 dials from that IP: bind(ip, 0) + connect 2 877 µs CPU per dial → 31 µs with
  this option (with 2 000 TIME_WAIT: 30 → 30);
- the node proxy under the short-tunnel load (`python -m benchmarks --only short --repeat 1
  --clients python-h2 --short-count 3000`, ours-node): with ~18 000 TIME_WAIT on 127.0.0.1 left
  by other work, 1 813 µs proxy CPU per stream, 4.8 of 7.6 profiled seconds inside the dial (one
  earlier benchmark run read 990); with few TIME_WAIT, 200 µs before and after.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Callable

from hbone.socktransport import SocketTransport
from hbone.stream import DEFAULT_READ_BYTES, TcpConnection, _Dial

# Linux ≥ 4.2 (include/uapi/linux/in.h); Python only names it from 3.12.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


# Linux creates the socket non-blocking in the socket() call itself (one ioctl(FIONBIO) less than
# setblocking(False) afterwards; Python reads the flag and keeps .type SOCK_STREAM).
_SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)


def nonblocking_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM | _SOCK_NONBLOCK)
    if not _SOCK_NONBLOCK:
        sock.setblocking(False)
    return sock


def bound_socket(local_ip: str, family: int) -> socket.socket:
    """A non-blocking TCP socket bound to ``local_ip`` with the port left to ``connect()``."""
    sock = nonblocking_socket(family)
    try:
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass  # not Linux: bind() reserves a port, as create_connection(local_addr=) would
        sock.bind((local_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_from(host: str, port: int, local_ip: str, *, limit: int = DEFAULT_READ_BYTES) -> TcpConnection:
    """Connect to ``host:port`` (an IP address) from ``local_ip``: what ``TcpStream.connect(host,
    port, local_host=local_ip)`` does. The same ``TcpConnection`` (so ``hbone.relay`` splices it)
    and the same errors (``OSError`` from bind or connect).

    PERF NOTE: ``loop.sock_connect`` costs a libuv poll handle per dial (epoll add, writable
    callback, remove) before ``create_connection(sock=)`` registers the fd again: +35 µs CPU per
    dial over ``create_connection(local_addr=)`` (dialling process only, listener in another
    process, 3 000 dials from 127.0.0.1 in batches of 50, this 2-core box: 45 → 80 µs). A
    non-blocking ``connect()`` to a local pod is usually established by the time it returns
    EINPROGRESS (loopback runs the handshake inside the call), which ``getpeername()`` tells at the
    cost of one syscall; only a handshake still in flight waits for writability: 80 → 46 µs."""
    loop = asyncio.get_running_loop()
    sock = bound_socket(local_ip, socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            try:
                sock.getpeername()          # established already: no need to wait
            except OSError:
                await loop.sock_connect(sock, (host, port))   # waits, then reports the outcome
        elif err:
            raise OSError(err, f"connect to {host}:{port} failed: {os.strerror(err)}")
        _, conn = await loop.create_connection(lambda: TcpConnection(limit), sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn


DialCallback = Callable[["TcpConnection | None", "BaseException | None"], None]


def dial_from(host: str, port: int, local_ip: str | None, on_done: DialCallback, *, timeout: float,
              limit: int = DEFAULT_READ_BYTES, loop: asyncio.AbstractEventLoop | None = None,
              socket_transport: bool = False) -> None:
    """``connect_from`` for callback code (a plain-function HBONE handler): no task, no coroutine
    frame held while the dial is in flight. ``local_ip`` None: from our own address (no bind).
    Calls ``on_done(conn, None)`` or ``on_done(None, err)`` exactly once — possibly before
    returning (an error found at once) — with ``err`` an ``OSError``, or ``TimeoutError`` after
    ``timeout`` seconds of a handshake that has not completed.

    ``loop``: the running loop, when the caller has it (``get_running_loop`` costs a getpid
    syscall on Python 3.11).

    ``socket_transport``: the ``TcpConnection`` runs over ``hbone.socktransport.SocketTransport``
    (the socket driven by add_reader/add_writer) instead of a uvloop transport, and an established
    dial is reported at once, from inside this call (no coroutine to step). Same ByteStream
    contract, same splice; see that module's PERF NOTE.

    PERF NOTE: see ``InboundProxy._handle`` (the node's inbound handler dials with this)."""
    if loop is None:
        loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        if local_ip is None:
            sock = nonblocking_socket(family)
        else:
            sock = bound_socket(local_ip, family)
    except OSError as err:
        on_done(None, err)
        return
    if socket_transport:
        try:  # what uvloop's transport sets on every TCP connection (no Nagle delay on small writes)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    try:
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            try:
                sock.getpeername()          # established already (a local pod): no need to wait
                err = 0
            except OSError:
                pass
    except OSError as exc:                  # e.g. an address of the wrong family
        sock.close()
        on_done(None, exc)
        return
    if err == 0:
        _established(loop, sock, on_done, limit, socket_transport)
    elif err == errno.EINPROGRESS:
        _Handshake(loop, sock, (host, port), on_done, timeout, limit, socket_transport)
    else:
        sock.close()
        on_done(None, OSError(err, f"connect to {host}:{port} failed: {os.strerror(err)}"))


def _established(loop, sock: socket.socket, on_done: DialCallback, limit: int, socket_transport: bool) -> None:
    """A connected socket becomes a ``TcpConnection``: over a ``SocketTransport`` (reported at once)
    or over a uvloop transport (``create_connection(sock=)``, stepped by ``_Dial``)."""
    if not socket_transport:
        _Dial(loop.create_connection(lambda: TcpConnection(limit), sock=sock), on_done, sock).step()
        return
    conn = TcpConnection(limit)
    try:
        SocketTransport(loop, sock, conn)
    except OSError as err:  # epoll refused the fd
        sock.close()
        on_done(None, err)
        return
    on_done(conn, None)


class _Handshake:
    """A non-blocking connect still in flight: wait for writability (or the timeout), then read its
    outcome from SO_ERROR, as ``loop.sock_connect`` does."""

    __slots__ = ("loop", "sock", "addr", "on_done", "limit", "timer", "socket_transport")

    def __init__(self, loop, sock: socket.socket, addr: tuple[str, int], on_done: DialCallback, timeout: float,
                 limit: int, socket_transport: bool = False):
        self.loop, self.sock, self.addr, self.on_done, self.limit = loop, sock, addr, on_done, limit
        self.socket_transport = socket_transport
        loop.add_writer(sock.fileno(), self.writable)
        self.timer = loop.call_later(timeout, self.expired)

    def writable(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        self.timer.cancel()
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.sock.close()
            self.on_done(None, OSError(err, f"connect to {self.addr[0]}:{self.addr[1]} failed: {os.strerror(err)}"))
            return
        _established(self.loop, self.sock, self.on_done, self.limit, self.socket_transport)

    def expired(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self.on_done(None, TimeoutError(f"connect to {self.addr[0]}:{self.addr[1]} timed out"))


__all__ = ["connect_from", "dial_from", "bound_socket", "IP_BIND_ADDRESS_NO_PORT"]
