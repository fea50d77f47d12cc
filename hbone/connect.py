"""The HBONE CONNECT request, pure: `:authority` parsing and the headers ztunnel sends.

ztunnel (`src/proxy/outbound.rs` `create_hbone_request`) sends a plain RFC 9113 §8.5 CONNECT:
`:method CONNECT`, `:authority <ip>:<port>`, and the headers `baggage`, `forwarded`, `traceparent`.
Everything here is data in, data out; errors are `HboneError`s that carry the 400 answer.
"""

from __future__ import annotations

import ipaddress
import random
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from hbone.errors import BadAuthority, BadRequest

__all__ = [
    "BadAuthority", "BadRequest", "Baggage", "ConnectRequest", "Forwarded", "TraceParent",
    "format_authority", "parse_authority", "build_baggage", "parse_baggage", "build_forwarded",
    "parse_forwarded", "new_traceparent", "parse_traceparent",
]

# RFC 9110 §4.2.1 / RFC 3986: a port is 0..65535; port 0 cannot be connected to, so it is a bad
# destination for a tunnel.
_MAX_PORT = 65535
# RFC 9113 §8.2.1: field names are lowercase tokens; we check the request's names against this
# with fullmatch (`^...$` with match also took a name ending in "\n": `$` matches before a final
# newline; found by fuzzing). Same one C-level regex call per header as before.
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# RFC 9113 §8.2.2: connection-specific fields are malformed in HTTP/2.
_CONNECTION_SPECIFIC = frozenset({b"connection", b"proxy-connection", b"keep-alive",
                                  b"transfer-encoding", b"upgrade"})
# Pseudo-headers allowed in a request (RFC 9113 §8.3.1); plain CONNECT allows only two of them.
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})


# Valid authorities already parsed (the text as received → the answer). parse_authority is pure, and a
# node sees the same few destinations (its pods' ip:port) over and over, so each is parsed once;
# errors are never cached. Bounded: cleared when full, so a client cycling through many distinct
# targets costs at most this many small entries. PERF NOTE (/tmp/hb7/core_short.py, ServerCore per
# short tunnel, this 2-core machine): 29.8 -> 27.1 us per tunnel (ipaddress parsing was ~2.7 us).
_AUTHORITY_CACHE: dict[str | bytes, tuple[str, int]] = {}
AUTHORITY_CACHE_ENTRIES = 4096


def parse_authority(value: str | bytes) -> tuple[str, int]:
    """`ip:port` or `[v6]:port` → (ip, port). Hostnames are refused (ztunnel's IP path).

    The IP is returned in canonical form (`::1`, not `0:0::1`), so it can key pools and maps.
    """
    hit = _AUTHORITY_CACHE.get(value)
    if hit is not None:
        return hit
    parsed = _parse_authority(value)
    if len(_AUTHORITY_CACHE) >= AUTHORITY_CACHE_ENTRIES:
        _AUTHORITY_CACHE.clear()
    _AUTHORITY_CACHE[value] = parsed
    return parsed


def _parse_authority(value: str | bytes) -> tuple[str, int]:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise BadAuthority("authority is not ASCII") from None
    if not value:
        raise BadAuthority("empty :authority")
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1:end + 2] != ":":
            raise BadAuthority(f"bad IPv6 authority {value!r}: want [addr]:port")
        host, port_text = value[1:end], value[end + 2:]
        version = 6
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or ":" in host:
            raise BadAuthority(f"bad authority {value!r}: want ip:port or [v6]:port")
        version = 4
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise BadAuthority(f"bad port in authority {value!r}")
    port = int(port_text)
    if not 0 < port <= _MAX_PORT:
        raise BadAuthority(f"port {port} out of range in authority {value!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadAuthority(f"authority host {host!r} is not an IP address") from None
    if ip.version != version:
        raise BadAuthority(f"IPv6 address must be bracketed in authority {value!r}")
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        raise BadAuthority(f"zone ids are not allowed in authority {value!r}")
    return str(ip), port


def format_authority(ip: str, port: int) -> str:
    """(ip, port) → `ip:port`, bracketing IPv6 (RFC 3986 §3.2.2)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# ---- baggage (ztunnel src/baggage.rs) ----------------------------------------------------------

_BAGGAGE_WORKLOAD_TYPES = ("deployment", "cronjob", "pod", "job")


@dataclass(frozen=True, slots=True)
class Baggage:
    """ztunnel's baggage keys. Empty fields are omitted on the wire (`baggage_header_val`)."""

    cluster: str = ""
    namespace: str = ""
    workload_name: str = ""
    workload_type: str = "deployment"
    service_name: str = ""
    service_version: str = ""
    region: str = ""
    zone: str = ""


def build_baggage(b: Baggage) -> str:
    items = [
        ("k8s.cluster.name", b.cluster),
        ("k8s.namespace.name", b.namespace),
        (f"k8s.{b.workload_type}.name", b.workload_name),
        ("service.name", b.service_name),
        ("service.version", b.service_version),
        ("cloud.region", b.region),
        ("cloud.availability_zone", b.zone),
    ]
    return ",".join(f"{k}={v}" for k, v in items if v)


def parse_baggage(values: str | Iterable[str]) -> Baggage:
    """Parse one or more `baggage` values (ztunnel unions repeated headers). Unknown keys and
    malformed members are ignored: baggage is telemetry, never a reason to refuse a tunnel."""
    if isinstance(values, str):
        values = [values]
    found: dict[str, str] = {}
    wl_type = "deployment"
    for value in values:
        for member in value.split(","):
            key, sep, val = member.partition("=")
            key, val = key.strip(), val.split(";", 1)[0].strip()
            if not sep or not key or not val:
                continue
            if key.startswith("k8s.") and key.endswith(".name") and key[4:-5] in _BAGGAGE_WORKLOAD_TYPES:
                wl_type = key[4:-5]
                found["workload_name"] = val
                continue
            name = {"k8s.cluster.name": "cluster", "k8s.namespace.name": "namespace",
                    "service.name": "service_name", "service.version": "service_version",
                    "cloud.region": "region", "cloud.availability_zone": "zone"}.get(key)
            if name:
                found[name] = val
    return Baggage(workload_type=wl_type, **found)


# ---- forwarded (RFC 7239; ztunnel build_forwarded / parse_forwarded_host) ----------------------

@dataclass(frozen=True, slots=True)
class Forwarded:
    for_addr: tuple[str, int] | None = None
    host: str | None = None


def build_forwarded(src: tuple[str, int], host: str | None = None) -> str:
    """`for="<ip:port>"` (IPv6 bracketed, ztunnel test: `for="[::1]:80"`), plus `;host=<svc>` when
    the client addressed a service."""
    value = f'for="{format_authority(src[0], src[1])}"'
    return f"{value};host={host}" if host else value


def parse_forwarded(value: str) -> Forwarded:
    """Lenient: the server uses only `host=` (ztunnel parse_forwarded_host); the client address
    comes from the L4 peer. A malformed element yields None fields, never an error."""
    for_addr: tuple[str, int] | None = None
    host: str | None = None
    first = value.split(",", 1)[0]  # RFC 7239 §4: the first element is the nearest proxy's client
    for pair in first.split(";"):
        key, sep, val = pair.partition("=")
        if not sep:
            continue
        key, val = key.strip().lower(), val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        if key == "for" and for_addr is None:
            try:
                for_addr = parse_authority(val)
            except BadAuthority:
                pass
        elif key == "host" and host is None and val:
            host = val
    return Forwarded(for_addr, host)


# ---- traceparent (W3C Trace Context, version 00) -----------------------------------------------

_TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True, slots=True)
class TraceParent:
    trace_id: str
    parent_id: str
    flags: str = "00"

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags}"


def new_traceparent(rng: random.Random) -> TraceParent:
    """ztunnel `TraceParent::new()`: random 128-bit trace id and 64-bit parent id, flags 00."""
    trace_id = rng.getrandbits(128) or 1  # W3C: all-zero ids are invalid
    parent_id = rng.getrandbits(64) or 1
    return TraceParent(f"{trace_id:032x}", f"{parent_id:016x}")


def parse_traceparent(value: str | None) -> TraceParent | None:
    """A valid version-00 traceparent, or None (absent/malformed: the caller generates a new one,
    as ztunnel's `extract_traceparent` does)."""
    if not value:
        return None
    m = _TRACEPARENT_RE.match(value.strip())
    if not m or set(m.group(1)) == {"0"} or set(m.group(2)) == {"0"}:
        return None
    return TraceParent(m.group(1), m.group(2), m.group(3))


# ---- the request --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A validated CONNECT: the target and the regular (non-pseudo) headers, names lowercase."""

    authority: tuple[str, int]
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def build(cls, authority: str | tuple[str, int], headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
              ) -> "ConnectRequest":
        """The originating side's request. Raises BadAuthority for a bad target."""
        target = parse_authority(authority) if isinstance(authority, str) else parse_authority(
            format_authority(*authority))
        items = headers.items() if isinstance(headers, Mapping) else headers
        norm = []
        for name, value in items:
            lname = name.lower()
            if lname.startswith(":") or lname.encode() in _CONNECTION_SPECIFIC:
                raise BadRequest(f"header {name!r} is not allowed on an HBONE CONNECT")
            if "\r" in value or "\n" in value or "\0" in value:
                raise BadRequest(f"header {name!r} has a control character")
            norm.append((lname, value))
        return cls(target, tuple(norm))

    @classmethod
    def from_h2_headers(cls, headers: Iterable[tuple[bytes | str, bytes | str]]) -> "ConnectRequest":
        """Validate a received request header block (RFC 9113 §8.3, §8.5). h2's own inbound
        validation is off on the server so that a malformed request is a 400 on that stream, not a
        connection error that would take down every other tunnel on the connection."""
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[str, str]] = []
        for name, value in headers:
            # h2 hands over bytes (header_encoding=None): converted only when they are not. PERF
            # NOTE (/tmp/hb7/core_short.py): ServerCore CPU per short tunnel 23.1 -> 21.5 us.
            if name.__class__ is not bytes:
                name = name.encode("latin-1") if isinstance(name, str) else bytes(name)
            if value.__class__ is not bytes:
                value = value.encode("latin-1") if isinstance(value, str) else bytes(value)
            if b"\r" in value or b"\n" in value or b"\0" in value:
                raise BadRequest(f"header {name!r} has a control character")  # RFC 9113 §8.2.1
            if name.startswith(b":"):
                if regular:
                    raise BadRequest("pseudo-header after a regular header")  # §8.3
                if name not in _REQUEST_PSEUDO:
                    raise BadRequest(f"unknown pseudo-header {name!r}")
                if name in pseudo:
                    raise BadRequest(f"duplicate pseudo-header {name!r}")
                pseudo[name] = value
                continue
            if not _TOKEN_RE.fullmatch(name):
                raise BadRequest(f"bad header name {name!r}")
            if name in _CONNECTION_SPECIFIC or (name == b"te" and value.strip() != b"trailers"):
                raise BadRequest(f"connection-specific header {name.decode()!r}")  # §8.2.2
            regular.append((name.decode("ascii"), value.decode("latin-1")))
        method = pseudo.get(b":method")
        if method is None:
            raise BadRequest("missing :method")
        if method != b"CONNECT":
            # ztunnel NonConnectMethod → 400.
            raise BadRequest(f"method {method.decode('latin-1')!r} is not CONNECT")
        if b":protocol" in pseudo:
            raise BadRequest("extended CONNECT (:protocol) is not HBONE")
        if b":scheme" in pseudo or b":path" in pseudo:
            # RFC 9113 §8.5: "The :scheme and :path pseudo-header fields MUST be omitted."
            raise BadRequest("plain CONNECT must not carry :scheme or :path")
        if b":authority" not in pseudo:
            raise BadRequest("CONNECT without :authority")  # RFC 9113 §8.5
        return cls(parse_authority(pseudo[b":authority"]), tuple(regular))

    def to_h2_headers(self) -> list[tuple[str, str]]:
        return [(":method", "CONNECT"), (":authority", format_authority(*self.authority)), *self.headers]

    @property
    def authority_str(self) -> str:
        return format_authority(*self.authority)

    def header(self, name: str) -> str | None:
        """The first value of a header (names are lowercase)."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    @property
    def baggage(self) -> Baggage:
        return parse_baggage(self.header_all("baggage"))

    @property
    def forwarded(self) -> Forwarded:
        value = self.header("forwarded")
        return parse_forwarded(value) if value else Forwarded()

    @property
    def traceparent(self) -> TraceParent | None:
        return parse_traceparent(self.header("traceparent"))

    def with_traceparent(self, rng: random.Random) -> "ConnectRequest":
        """ztunnel `extract_traceparent`: a malformed or missing traceparent is replaced, never fatal."""
        if self.traceparent is not None:
            return self
        kept = tuple((k, v) for k, v in self.headers if k != "traceparent")
        return ConnectRequest(self.authority, kept + (("traceparent", str(new_traceparent(rng))),))
