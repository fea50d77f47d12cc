"""The original destination of a redirected TCP connection (node proxy 15001/15006).

Under iptables ``REDIRECT`` (NAT), the kernel keeps the pre-NAT destination in conntrack and
returns it through ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (IPv4, a ``struct sockaddr_in``) or
``getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`` (IPv6, a ``struct sockaddr_in6``). Under TPROXY, or
when nothing redirected the connection, there is no NAT entry and the local address is the
destination already — so ``getsockname()`` is the fallback (what ztunnel does too).
"""

from __future__ import annotations

import socket
import struct

# linux/netfilter_ipv4.h: #define SO_ORIGINAL_DST 80; linux/netfilter_ipv6/ip6_tables.h:
# #define IP6T_SO_ORIGINAL_DST 80 (same number, at level SOL_IPV6).
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOL_IP = getattr(socket, "SOL_IP", 0)
_SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """``struct sockaddr_in``/``sockaddr_in6`` bytes → (ip, port). Family is host byte order,
    port network order. Anything else is a ValueError (what original_dst falls back on)."""
    if len(raw) < 4:
        # struct.error is not a ValueError: a short buffer must not escape original_dst's fallback.
        raise ValueError(f"sockaddr of {len(raw)} bytes is too short")
    family = struct.unpack_from("=H", raw, 0)[0]
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"unexpected address family {family}")


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """Where the client meant to connect: the pre-NAT destination, else the local address."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
        else:
            raw = sock.getsockopt(_SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
        ip, port = parse_sockaddr(raw)
        # An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d; report plain IPv4.
        if ip.startswith("::ffff:") and "." in ip:
            ip = ip[7:]
        return ip, port
    except (OSError, ValueError):
        # ENOENT: no conntrack NAT entry (TPROXY, or a direct connection); ENOPROTOOPT: no
        # netfilter. Either way the socket's own address is the destination.
        host, port = sock.getsockname()[:2]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return host, port


__all__ = ["original_dst", "parse_sockaddr", "SO_ORIGINAL_DST", "IP6T_SO_ORIGINAL_DST"]
