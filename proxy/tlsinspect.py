"""TLS inspection: does a tunnel's payload start with a TLS ClientHello, and which SNI / ALPN does it carry?

The pure core of Envoy's ``tls_inspector`` listener filter, which istiod puts on the waypoint's
``main_internal`` listener for service ports whose protocol is TLS (listener_waypoint.go
``buildWaypointInternal``: "tlsInspector ... FilterDisabled: listenerPredicateExcludePorts(nonInspectorPorts)").
It sits next to ``proxy/sniff.py`` (Envoy's ``http_inspector``): both read the first bytes of a tunnel
before a chain runs, and both are proxy stages, not wire protocol (``hbone/``) or configuration
(``policy/``).

**Not wired into routing, on purpose.** A waypoint does not pick routes by SNI (istiod
``getTLSRouteMatch``: "Waypoint does not currently support SNI matches"; policy.routing.tls applies TLS
routes as istiod does, without the bytes). What Envoy does with the inspected name on a waypoint is the
``connection.sni`` AuthorizationPolicy attribute and the access log's ``requested_server_name``; this
module is the parser those would use.

``inspect_client_hello(data)`` takes the bytes seen so far and answers an ``Inspection``:

==============  =====================================================================================
state           meaning (Envoy's counter)
==============  =====================================================================================
``tls``         a whole ClientHello: ``server_name`` (None without the extension: ``sni_not_found``),
                ``alpn``, and ``length``, the bytes up to the end of its last record (``tls_found``)
``not_tls``     the first bytes cannot start a TLS handshake record (``tls_not_found``): decided on
                the first byte or two, so plaintext is never held back
``malformed``   a TLS handshake record whose ClientHello breaks RFC 8446 / RFC 6066; Envoy's BoringSSL
                fails the parse and the filter counts ``tls_not_found`` and lets the connection continue
                as not-TLS, so a caller treats it as ``not_tls`` (``reason`` says what was wrong)
``incomplete``  a valid prefix: read more
==============  =====================================================================================

A ClientHello whose records do not fit in ``max_bytes`` raises ``ClientHelloTooLarge`` (the only exception
that escapes): Envoy counts ``client_hello_too_large`` and closes the connection. Bytes after the
ClientHello (the client's next records, early data) are not looked at. There is no asyncio shell yet: one
would read with a bound like Envoy's ``listener_filters_timeout`` (15 s) and replay the bytes it read
(``hbone.stream.PrefixedStream``), as ``proxy.sniff.sniff`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hbone.stream import KiB

State = Literal["tls", "not_tls", "malformed", "incomplete"]

# Envoy tls_inspector: TLS_MAX_CLIENT_HELLO = SSL3_RT_MAX_PLAIN_LENGTH (16 KiB, also the default and the
# upper bound of ``max_client_hello_size``; older Envoy allowed 64 KiB). It peeks at most this many bytes,
# record headers included, and a ClientHello not parsed by then is "unreasonably large".
CLIENT_HELLO_MAX_BYTES = 16 * KiB

RECORD_HEADER_BYTES = 5            # ContentType(1) ProtocolVersion(2) uint16 length (RFC 8446 §5.1)
MAX_RECORD_FRAGMENT = 2 ** 14      # RFC 8446 §5.1: "The length MUST NOT exceed 2^14 bytes"
CONTENT_HANDSHAKE = 0x16           # RFC 8446 §5.1 ContentType handshake(22)
HANDSHAKE_CLIENT_HELLO = 1         # RFC 8446 §4 HandshakeType client_hello(1)
EXT_SERVER_NAME = 0                # RFC 6066 §3
EXT_ALPN = 16                      # RFC 7301 §3.1
NAME_TYPE_HOST_NAME = 0            # RFC 6066 §3 NameType host_name(0)
HOST_NAME_MAX = 255                # BoringSSL TLSEXT_MAXLEN_host_name
SESSION_ID_MAX = 32                # RFC 8446 §4.1.2 legacy_session_id<0..32>


class TlsInspectError(ValueError):
    """The only error ``inspect_client_hello`` raises; carries Envoy's counter and what to do."""

    stat = "tls_inspect_error"
    close = True


class ClientHelloTooLarge(TlsInspectError):
    stat = "client_hello_too_large"   # Envoy: "Total unreasonably large Client Hello received"; closes


@dataclass(frozen=True)
class Inspection:
    state: State
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    length: int = 0
    reason: str = ""

    @property
    def is_tls(self) -> bool:
        return self.state == "tls"

    @property
    def stat(self) -> str:
        """Envoy's tls_inspector counter for a decided inspection."""
        return "tls_found" if self.state == "tls" else "tls_not_found" if self.state != "incomplete" else ""


INCOMPLETE = Inspection("incomplete")


class _Malformed(Exception):
    pass


class _Reader:
    """Bounds-checked reads over one handshake message body; running out is malformed (the lengths lie)."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None):
        self.buf, self.pos, self.end = buf, pos, len(buf) if end is None else end

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise _Malformed(f"{what} runs past the end of its enclosing field")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, len_bytes: int, what: str) -> "_Reader":
        n = self.uint(len_bytes, f"{what} length")
        start = self.pos
        self.take(n, what)
        return _Reader(self.buf, start, start + n)

    @property
    def left(self) -> int:
        return self.end - self.pos


def inspect_client_hello(data: bytes, *, max_bytes: int = CLIENT_HELLO_MAX_BYTES) -> Inspection:
    """Pure: what the bytes seen so far say (see the module docstring). Raises only ``ClientHelloTooLarge``."""
    if not data:
        return INCOMPLETE
    if data[0] != CONTENT_HANDSHAKE:
        return Inspection("not_tls", reason="the first byte is not a TLS handshake record")
    if len(data) >= 2 and data[1] != 3:
        return Inspection("not_tls", reason="the record's protocol version is not 3.x")
    handshake = bytearray()
    pos = 0
    while True:
        if pos >= max_bytes:
            raise ClientHelloTooLarge(f"no whole ClientHello in the first {max_bytes} bytes")
        if len(data) < pos + RECORD_HEADER_BYTES:
            return _too_large_or_incomplete(data, max_bytes)
        ctype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        rlen = int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != CONTENT_HANDSHAKE:
            return Inspection("malformed", reason="the ClientHello is interrupted by a non-handshake record")
        if major != 3 or minor > 4:
            return Inspection("malformed", reason=f"record version {major}.{minor} is not a TLS version")
        if rlen == 0:
            # RFC 8446 §5.1: "Implementations MUST NOT send zero-length fragments of Handshake types".
            return Inspection("malformed", reason="a zero-length handshake record")
        if rlen > MAX_RECORD_FRAGMENT:
            return Inspection("malformed", reason=f"a record of {rlen} bytes (more than 2^14)")
        start = pos + RECORD_HEADER_BYTES
        end = start + rlen
        handshake += data[start:min(end, len(data))]
        if len(handshake) >= 4:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                return Inspection("malformed", reason=f"the first handshake message is type {handshake[0]}, "
                                                      "not a ClientHello")
            mlen = int.from_bytes(handshake[1:4], "big")
            if 4 + mlen + RECORD_HEADER_BYTES > max_bytes:
                raise ClientHelloTooLarge(f"a ClientHello of {mlen} bytes (more than {max_bytes} with its record)")
            if len(handshake) >= 4 + mlen:
                if end > len(data):
                    # The message is whole but its record is not: the rest of the record is other
                    # handshake data; what we need is here.
                    end = len(data)
                try:
                    return _client_hello(bytes(handshake[4:4 + mlen]), end)
                except _Malformed as err:
                    return Inspection("malformed", reason=str(err))
        if end > len(data):
            return _too_large_or_incomplete(data, max_bytes)
        pos = end


def _too_large_or_incomplete(data: bytes, max_bytes: int) -> Inspection:
    if len(data) >= max_bytes:
        raise ClientHelloTooLarge(f"no whole ClientHello in the first {max_bytes} bytes")
    return INCOMPLETE


def _client_hello(body: bytes, length: int) -> Inspection:
    """RFC 8446 §4.1.2 ClientHello (TLS 1.0-1.2 hellos share the layout; extensions may be absent)."""
    r = _Reader(body)
    version = r.take(2, "legacy_version")
    if version[0] != 3:
        raise _Malformed(f"legacy_version {version[0]}.{version[1]} is not a TLS version")
    r.take(32, "random")
    sid = r.vector(1, "legacy_session_id")
    if sid.end - sid.pos > SESSION_ID_MAX:
        raise _Malformed("legacy_session_id is longer than 32 bytes")
    suites = r.vector(2, "cipher_suites")
    n_suites = suites.end - suites.pos
    if n_suites < 2 or n_suites % 2:
        raise _Malformed("cipher_suites must hold at least one 2-byte suite")
    comp = r.vector(1, "legacy_compression_methods")
    if comp.end == comp.pos:
        raise _Malformed("legacy_compression_methods is empty")
    if r.left == 0:
        return Inspection("tls", None, (), length)   # a pre-extensions hello: no SNI
    exts = r.vector(2, "extensions")
    if r.left:
        raise _Malformed("bytes after the extensions")
    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    while exts.left:
        etype = exts.uint(2, "extension type")
        body_r = exts.vector(2, f"extension {etype}")
        if etype in seen:
            # RFC 8446 §4.2: "There MUST NOT be more than one extension of the same type in a given extension block."
            raise _Malformed(f"extension {etype} appears twice")
        seen.add(etype)
        if etype == EXT_SERVER_NAME:
            server_name = _server_name(body_r)
        elif etype == EXT_ALPN:
            alpn = _alpn(body_r)
    return Inspection("tls", server_name, alpn, length)


def _server_name(r: _Reader) -> str:
    # BoringSSL ext_sni_parse_clienthello: exactly one entry, of type host_name, 1..255 bytes, no NUL.
    names = r.vector(2, "server_name_list")
    if r.left:
        raise _Malformed("bytes after the server_name_list")
    if names.uint(1, "name_type") != NAME_TYPE_HOST_NAME:
        raise _Malformed("the server name is not a host_name")
    host = names.vector(2, "host_name")
    if names.left:
        raise _Malformed("more than one server name")
    raw = host.take(host.left, "host_name")
    if not raw or len(raw) > HOST_NAME_MAX or b"\x00" in raw:
        raise _Malformed("host_name must be 1..255 bytes without NUL")
    try:
        # RFC 6066 §3: "HostName ... represented as a byte string using ASCII encoding without a trailing dot".
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise _Malformed("host_name is not ASCII") from None


def _alpn(r: _Reader) -> tuple[str, ...]:
    # RFC 7301 §3.1: ProtocolNameList protocol_name_list<2..2^16-1>; ProtocolName<1..2^8-1>.
    lst = r.vector(2, "protocol_name_list")
    if r.left or lst.left < 2:
        raise _Malformed("the ALPN extension must hold one protocol_name_list of 2 bytes or more")
    out = []
    while lst.left:
        name = lst.vector(1, "protocol name")
        if name.left == 0:
            raise _Malformed("an empty ALPN protocol name")
        out.append(name.take(name.left, "protocol name").decode("latin-1"))
    return tuple(out)


__all__ = ["Inspection", "inspect_client_hello", "TlsInspectError", "ClientHelloTooLarge", "CLIENT_HELLO_MAX_BYTES",
           "INCOMPLETE"]
