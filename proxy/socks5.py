"""SOCKS5 (RFC 1928) for the node proxy's 15080 listener: no authentication, CONNECT only.

``Socks5Parser`` is sans-IO: ``feed(bytes)`` returns events (``MethodsOffered``, ``Socks5Request``)
or raises ``Socks5Error(reply_code)``, the reply the client should get. ``accept_socks5(stream)``
and ``reply(stream, code, bound_addr)`` are the asyncio shell.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from typing import NamedTuple

from hbone.stream import ByteStream

VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT, CMD_BIND, CMD_UDP_ASSOCIATE = 1, 2, 3
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4

# Reply codes (RFC 1928 §6).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02            # connection not allowed by ruleset (authorization deny)
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04       # also: a hostname we cannot resolve
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06            # we use it for a connect timeout
COMMAND_NOT_SUPPORTED = 0x07  # BIND, UDP ASSOCIATE
ADDRESS_NOT_SUPPORTED = 0x08

# The whole greeting + request must arrive within this time (a client that connects and stays
# silent must not hold a connection and a task forever). curl sends both in well under a second.
HANDSHAKE_TIMEOUT_S = 10.0
_READ_BYTES = 512  # the largest handshake message: 2 + 255 methods, or 4 + 1 + 255 + 2


class Socks5Error(Exception):
    """A handshake failure; ``code`` is the reply to send (None: the greeting itself was bad —
    not SOCKS5, or no acceptable method — and the only answer is closing, after ``response``)."""

    def __init__(self, code: int | None, message: str, response: bytes = b""):
        super().__init__(message)
        self.code = code
        self.response = response


class MethodsOffered(NamedTuple):
    methods: bytes


class Socks5Request(NamedTuple):
    host: str        # dotted IPv4, IPv6 text, or the domain name as sent
    port: int
    atyp: int        # ATYP_IPV4 | ATYP_DOMAIN | ATYP_IPV6


class Socks5Parser:
    """Greeting, then request; anything after the request is application data (``trailing``)."""

    __slots__ = ("_buf", "_state", "trailing")

    def __init__(self) -> None:
        self._buf = b""
        self._state = "greeting"   # → "request" → "done"
        self.trailing = b""

    @property
    def greeted(self) -> bool:
        """The greeting was accepted (its answer is due even if the request then fails)."""
        return self._state != "greeting"

    def method_selection(self) -> bytes:
        """Our answer to the greeting: always "no authentication" (we offer nothing else)."""
        return bytes((VERSION, METHOD_NO_AUTH))

    def feed(self, data: bytes) -> list:
        if self._state == "done":
            self.trailing += data
            return []
        buf = self._buf + data
        events = []
        if self._state == "greeting":
            if len(buf) < 2:
                self._buf = buf
                return events
            if buf[0] != VERSION:
                raise Socks5Error(None, f"not SOCKS5 (version byte {buf[0]:#x})")
            n = buf[1]
            if n == 0 or len(buf) < 2 + n:
                if n == 0:
                    raise Socks5Error(None, "no authentication methods offered",
                                      bytes((VERSION, METHOD_NONE_ACCEPTABLE)))
                self._buf = buf
                return events
            methods = buf[2:2 + n]
            if METHOD_NO_AUTH not in methods:
                # RFC 1928 §3: "the client MUST close the connection" after X'FF'.
                raise Socks5Error(None, "client does not offer 'no authentication'",
                                  bytes((VERSION, METHOD_NONE_ACCEPTABLE)))
            events.append(MethodsOffered(methods))
            buf = buf[2 + n:]
            self._state = "request"
        if len(buf) < 5:
            self._buf = buf
            return events
        ver, cmd, rsv, atyp = buf[0], buf[1], buf[2], buf[3]
        if ver != VERSION:
            raise Socks5Error(GENERAL_FAILURE, f"bad request version {ver:#x}")
        if atyp == ATYP_IPV4:
            need = 4 + 4 + 2
        elif atyp == ATYP_IPV6:
            need = 4 + 16 + 2
        elif atyp == ATYP_DOMAIN:
            need = 4 + 1 + buf[4] + 2
        else:
            raise Socks5Error(ADDRESS_NOT_SUPPORTED, f"address type {atyp:#x} not supported")
        if cmd != CMD_CONNECT:
            raise Socks5Error(COMMAND_NOT_SUPPORTED, f"command {cmd:#x} not supported")
        if rsv != 0:
            raise Socks5Error(GENERAL_FAILURE, "reserved byte is not zero")
        if len(buf) < need:
            self._buf = buf
            return events
        if atyp == ATYP_IPV4:
            host = socket.inet_ntoa(buf[4:8])   # the same dotted quad as str(IPv4Address), in C
        elif atyp == ATYP_IPV6:
            host = str(ipaddress.IPv6Address(buf[4:20]))
        else:
            raw = buf[5:5 + buf[4]]
            try:
                host = raw.decode("ascii")
            except UnicodeDecodeError:
                raise Socks5Error(HOST_UNREACHABLE, "domain name is not ASCII") from None
            if not host or any(c in host for c in "\x00/\\ ") or not host.isprintable():
                raise Socks5Error(HOST_UNREACHABLE, f"invalid domain name {host!r}")
        (port,) = struct.unpack_from("!H", buf, need - 2)
        if port == 0:
            raise Socks5Error(HOST_UNREACHABLE, "port 0")
        events.append(Socks5Request(host, port, atyp))
        self._state = "done"
        self._buf = b""
        self.trailing = buf[need:]
        return events


# BND.ADDR/BND.PORT when there is no address to give (an HBONE upstream): 0.0.0.0:0.
_NO_BOUND_ADDR = bytes((ATYP_IPV4, 0, 0, 0, 0, 0, 0))


def encode_reply(code: int, bound_addr: tuple[str, int] | None = None) -> bytes:
    """``VER REP RSV ATYP BND.ADDR BND.PORT``; without an address, 0.0.0.0:0 (as ztunnel does).

    PERF NOTE: one reply per SOCKS5 connection; ``socket.inet_pton`` instead of parsing with
    ``ipaddress`` (Python code), and the no-address reply is a constant: 1.65 → 0.15 µs
    (timeit, HBONE reply), 1.82 → 0.35 µs (an IPv4 address); ``ipaddress`` stays the fallback
    for what inet_pton refuses (a scoped IPv6 ``fe80::1%eth0``)."""
    if bound_addr is None:
        return bytes((VERSION, code, 0)) + _NO_BOUND_ADDR
    host, port = bound_addr
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        packed = ipaddress.ip_address(host).packed
    atyp = ATYP_IPV4 if len(packed) == 4 else ATYP_IPV6
    return bytes((VERSION, code, 0, atyp)) + packed + struct.pack("!H", port)


async def accept_socks5(stream: ByteStream, *,
                        timeout: float = HANDSHAKE_TIMEOUT_S) -> tuple[Socks5Request, bytes]:
    """Run the server side of the handshake up to the request; returns it and any bytes the client
    already sent after it (optimistic data). On a bad request the error reply has been sent and
    ``Socks5Error`` is raised; the caller closes the stream. Then ``reply`` and relay."""
    parser = Socks5Parser()
    selected = False
    try:
        async with asyncio.timeout(timeout):
            while True:
                data = await stream.read(_READ_BYTES)
                if not data:
                    raise Socks5Error(None, "client closed during the handshake")
                try:
                    events = parser.feed(data)
                except Socks5Error as err:
                    if parser.greeted and not selected:
                        stream.write(parser.method_selection())
                    if err.code is not None:
                        stream.write(encode_reply(err.code))
                    elif err.response:
                        stream.write(err.response)
                    await stream.drain()
                    raise
                for event in events:
                    if isinstance(event, MethodsOffered):
                        selected = True
                        stream.write(parser.method_selection())
                        await stream.drain()
                    else:
                        return event, parser.trailing
    except TimeoutError:
        raise Socks5Error(TTL_EXPIRED, "handshake timed out") from None


async def reply(stream: ByteStream, code: int, bound_addr: tuple[str, int] | None = None) -> None:
    """Answer the CONNECT: ``SUCCEEDED`` with the address we connected from, or an error code."""
    stream.write(encode_reply(code, bound_addr))
    await stream.drain()


def reply_code_for(exc: BaseException) -> int:
    """The reply for an upstream connect failure (used by the pipeline)."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return TTL_EXPIRED
    if isinstance(exc, ConnectionRefusedError):
        return CONNECTION_REFUSED
    if isinstance(exc, OSError):
        import errno
        if exc.errno in (errno.ENETUNREACH,):
            return NETWORK_UNREACHABLE
        if exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
            return HOST_UNREACHABLE
    return GENERAL_FAILURE


__all__ = ["Socks5Parser", "Socks5Error", "Socks5Request", "MethodsOffered", "accept_socks5",
           "reply", "encode_reply", "reply_code_for", "HANDSHAKE_TIMEOUT_S", "SUCCEEDED",
           "GENERAL_FAILURE", "NOT_ALLOWED", "NETWORK_UNREACHABLE", "HOST_UNREACHABLE",
           "CONNECTION_REFUSED", "TTL_EXPIRED", "COMMAND_NOT_SUPPORTED", "ADDRESS_NOT_SUPPORTED",
           "ATYP_IPV4", "ATYP_DOMAIN", "ATYP_IPV6"]
