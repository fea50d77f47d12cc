"""Protocol sniffing: is a new tunnel's payload HTTP/1.x, HTTP/2 prior knowledge (h2c), or opaque TCP?

Mirrors Envoy's ``http_inspector`` listener filter, which Istio puts in front of ports whose protocol
is not declared (no ``appProtocol``, no ``http-``/``tcp-`` port-name prefix):

- the HTTP/2 connection preface ``PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n`` (RFC 9113 §3.4) → ``"h2c"``;
- an HTTP/1.x request line ``METHOD SP request-target SP HTTP/1.x CRLF`` (RFC 9112 §3) → ``"http/1.1"``
  (HTTP/1.0 too: Istio treats both as HTTP and the codec answers each in its own version);
- anything else → ``"tcp"``, decided as soon as the bytes can no longer become either.

``classify`` is pure (bytes in, answer out); ``sniff`` is the thin asyncio shell with a bounded peek.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from hbone.stream import KiB, ByteStream, PrefixedStream

Protocol = Literal["http/1.1", "h2c", "tcp"]

H2C_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Envoy http_inspector: Config::MAX_INSPECT_SIZE = 64 * 1024 — it stops peeking after 64 KiB.
# (Envoy then drops the connection; we hand the bytes to the HTTP/1 codec instead, because only an
# unfinished request line can still be undecided there, and the codec answers it 431 like Envoy's
# HTTP connection manager does for an over-long head.)
SNIFF_MAX_BYTES = 64 * KiB

# Server-first protocols (MySQL, SMTP, MongoDB...) send nothing until the server greets, so waiting
# for client bytes would hang them forever. Istio's meshConfig.protocolDetectionTimeout was 5 s up to
# 1.9 ("Envoy will timeout on the protocol detection after the specified period, defaulting to ...
# plain TCP traffic") and is 0 s = disabled since then, which leaves server-first protocols on
# undeclared ports hanging. We keep the 5 s: server-first protocols on sniffed ports work (after a
# 5 s delay; declare appProtocol: tcp to avoid it), and a slow HTTP client is classified as TCP only
# after 5 s of silence. Pass ``timeout=None`` to get today's Istio behaviour (wait forever).
SNIFF_TIMEOUT_S = 5.0

# Longest method we accept ("UPDATEREDIRECTREF" is 17): past this without a space it is not HTTP.
MAX_METHOD_BYTES = 20

# Methods Envoy's http_inspector accepted (its legacy list, from http_parser), plus those llhttp (our
# HTTP/1 codec) parses that the list lacks (PROPFIND, QUERY, SOURCE, M-SEARCH, NOTIFY, SUBSCRIBE,
# UNSUBSCRIBE). Methods only Envoy knows reach the codec, which answers 501 (RFC 9110 §9.1: a server
# "SHOULD respond with the 501 (Not Implemented) status code" to an unrecognized method).
# PRI is absent on purpose: it is only valid as the HTTP/2 preface.
HTTP1_METHODS = frozenset(m.encode() for m in (
    "ACL BASELINE-CONTROL BIND CHECKIN CHECKOUT CONNECT COPY DELETE GET HEAD LABEL LINK LOCK MERGE "
    "MKACTIVITY MKCALENDAR MKCOL MKREDIRECTREF MKWORKSPACE MOVE OPTIONS ORDERPATCH PATCH POST "
    "PROPFIND PROPPATCH PURGE PUT REBIND REPORT SEARCH TRACE UNBIND UNCHECKOUT UNLINK UNLOCK UPDATE "
    "UPDATEREDIRECTREF VERSION-CONTROL QUERY SOURCE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE").split())
_METHOD_PREFIXES = frozenset(m[:i] for m in HTTP1_METHODS for i in range(1, len(m) + 1))

# Bytes that cannot appear in a request-target (RFC 9112 §3.2: no whitespace, no controls).
_TARGET_FORBIDDEN = bytes(range(0x00, 0x21)) + b"\x7f"
_VERSION_TAILS = (b"HTTP/1.0", b"HTTP/1.1")


def classify(prefix: bytes) -> Protocol | None:
    """The protocol the first bytes of a stream belong to, or ``None`` while still undecided."""
    if not prefix:
        return None
    n = min(len(prefix), len(H2C_PREFACE))
    if prefix[:n] == H2C_PREFACE[:n]:
        return "h2c" if n == len(H2C_PREFACE) else None
    # Method: a known token followed by exactly one SP.
    sp = prefix.find(b" ", 0, MAX_METHOD_BYTES + 1)
    if sp < 0:
        head = prefix[:MAX_METHOD_BYTES + 1]
        return None if head in _METHOD_PREFIXES else "tcp"
    if prefix[:sp] not in HTTP1_METHODS:
        return "tcp"
    # Request-target: one or more non-space, non-control bytes, then SP.
    start = sp + 1
    sp2 = prefix.find(b" ", start)
    target = prefix[start:] if sp2 < 0 else prefix[start:sp2]
    if target.translate(None, _TARGET_FORBIDDEN) != target:
        return "tcp"
    if sp2 < 0:
        return None
    if sp2 == start:
        return "tcp"  # two spaces: empty target
    # Version and line end: "HTTP/1.0" or "HTTP/1.1", then CRLF (llhttp requires the CR).
    rest = prefix[sp2 + 1:sp2 + 11]
    for version in _VERSION_TAILS:
        line = version + b"\r\n"
        k = min(len(rest), len(line))
        if rest[:k] == line[:k]:
            return "http/1.1" if k == len(line) else None
    return "tcp"


async def sniff(stream: ByteStream, *, max_bytes: int = SNIFF_MAX_BYTES,
                timeout: float | None = SNIFF_TIMEOUT_S) -> tuple[Protocol, PrefixedStream]:
    """Peek at most ``max_bytes`` (and at most ``timeout`` seconds) and classify the stream.

    Returns the protocol and a stream that replays the peeked bytes. Silence until the timeout, or EOF
    while undecided, means "tcp" (a server-first protocol, or a peer that is not speaking HTTP); an
    undecided ``max_bytes`` means an over-long HTTP request line, left to the HTTP/1 codec's 431.
    """
    buf = bytearray()
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    decided: Protocol | None = None
    in_version = False  # past the request-target: every byte can decide
    while decided is None:
        if len(buf) >= max_bytes:
            decided = "http/1.1"
            break
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            decided = "tcp"
            break
        try:
            async with asyncio.timeout(remaining):
                data = await stream.read(max_bytes - len(buf))
        except TimeoutError:
            decided = "tcp"
            break
        if not data:
            decided = classify(bytes(buf)) or "tcp"
            break
        checked = len(buf)
        buf += data
        # classify() rescans the prefix; only call it when the new bytes can change the answer (a
        # space, a control byte, the short method/preface part, or the version), so a long request
        # line trickled one byte at a time costs O(n), not O(n²).
        if in_version or checked < 32 or data.translate(None, _TARGET_FORBIDDEN) != data:
            decided = classify(bytes(buf))
            in_version = decided is None and buf.count(b" ") >= 2
    return decided, PrefixedStream(stream, bytes(buf))


__all__ = ["Protocol", "H2C_PREFACE", "SNIFF_MAX_BYTES", "SNIFF_TIMEOUT_S", "HTTP1_METHODS",
           "classify", "sniff"]
