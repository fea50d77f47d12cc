"""Consistent hashing for DestinationRule ``loadBalancer.consistentHash``, as Istio configures Envoy.

istiod turns ``consistentHash`` into two things (pilot/pkg/networking/core): a route ``hash_policy``
(route.go ``consistentHashToHashPolicy``: header, cookie{name, path, ttl}, connection_properties
{source_ip}, query_parameter) and the cluster's ``lb_policy`` (cluster_traffic_policy.go
``ApplyRingHashLoadBalancer``: MAGLEV when ``maglev`` is set, else RING_HASH — with ``ringHash`` or, by
default, "1024 is the default value for envoy"). Here:

* ``hash_key``: the request's hash key as bytes, or None when the request lacks it — Envoy's
  ``HashPolicyImpl::generateHash`` (source/common/http/hash_policy.cc).
* ``generate_cookie`` / ``request_hash``: ``httpCookie`` with a ``ttl`` and no cookie in the request ⇒
  Envoy makes one up (thread_aware_lb_impl.cc ``generateCookie``), hashes the request by it and adds
  ``Set-Cookie`` to the response.
* ``RingTable`` / ``MaglevTable``: Envoy's RingHashLoadBalancer (ring_hash_lb.cc) and Maglev
  OriginalMaglevTable (maglev_lb.cc) over (host key, weight) pairs; ``choose(hash, attempt)`` returns the
  index of a host. ``LoadBalancer`` (endpoints.py) caches the tables and maps indices to candidates.

The hash function. Envoy uses xxHash64 (not a dependency here). Everything below uses stdlib BLAKE2b
with an 8-byte digest read as a little-endian integer (``hash64``): stable across processes, platforms
and Python versions (unlike ``hash()``, which is salted per process), so every waypoint replica maps a
key to the same host, as Envoys with the same endpoints do. Ring points and Maglev offsets/skips come
from SHAKE-128 / BLAKE2b of the host key the same way. The choices are therefore not bit-identical to
Envoy's (different hash), but the algorithms and their properties (weights, stickiness, minimal
disruption) are.
"""

from __future__ import annotations

import hashlib
import math
import sys
from array import array
from bisect import bisect_left
from typing import AnyStr, Sequence

from .model import (
    HASH_COOKIE, HASH_HEADER, HASH_QUERY, HASH_SOURCE_IP, MAGLEV, RING_HASH_MAX_SIZE, ConsistentHash,
)

U64 = 1 << 64

# What this proxy builds at most, whatever the config asks (the parser warns when it clips). Envoy allows
# rings up to 8M entries and Istio Maglev tables below 5 000 011, but in CPython a table is built on the
# event loop. Measured on the shared 2-core box (RingTable / MaglevTable over 5 hosts, time.perf_counter):
# ring 1 024 points 0.3 ms, 65 540 points 19 ms, 2^20 points 0.54 s; Maglev 65 537 slots 54 ms (100 hosts:
# 41 ms), 1 000 003 slots 0.81 s. Envoy's 8M ring would stall the waypoint for seconds at every host-set
# change. A ring of 2^20 entries still gives each of 1 000 hosts
# ~1 000 points (Envoy's own default per-host figure), and a Maglev table of 1 000 003 slots keeps
# Maglev's "M ≫ N" rule of thumb (M ≥ 100 N) for up to 10 000 hosts.
RING_BUILD_MAX_SIZE = 1 << 20
MAGLEV_BUILD_MAX_TABLE_SIZE = 1_000_003          # prime; the largest table built


def hash64(data: bytes) -> int:
    """The stable 64-bit hash of a key (see the module docstring: BLAKE2b-64, little-endian)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------
# The request's hash key


def hash_key(ch: ConsistentHash, *, headers: Sequence[tuple[bytes, bytes]], query: bytes,
             source_ip: str | None) -> bytes | None:
    """The bytes this request is hashed by, or None when it has no such key (then Envoy picks a random
    point of the ring/table: ``const uint64_t h = hash ? hash.value() : random_.random()``).

    ``headers``: (lower-case name, value) pairs as the waypoint holds them; ``query``: the raw query
    string (after ``?``, not decoded); ``source_ip``: the downstream client address, without port.
    A cookie that must be generated (``httpCookie`` with ``ttl``) is not made here: see ``request_hash``."""
    kind = ch.key_kind
    if kind == HASH_HEADER:
        # Envoy HeaderHashMethod: every value of the header, sorted — "Ensure generating same hash value
        # for different order header values" — then hashed; an absent header gives no hash. A present but
        # empty value is hashed (the header is there).
        name = ch.key_wire
        values = [v for n, v in headers if n == name]
        if not values:
            return None
        if len(values) == 1:
            return bytes(values[0])
        values.sort()
        # Values cannot contain LF (it ends a header line / is refused in HTTP/2), so joining on it keeps
        # distinct value lists distinct.
        return b"\n".join(values)
    if kind == HASH_COOKIE:
        # Envoy CookieHashMethod: ``if (value.empty() && ttl_.has_value())`` generate, ``else if
        # (!value.empty())`` hash — an empty cookie value counts as missing.
        return cookie_value(headers, ch.key_wire) or None
    if kind == HASH_QUERY:
        return query_value(query, ch.key_wire)
    if kind == HASH_SOURCE_IP:
        # Envoy IpHashMethod: the downstream IP's ``addressAsString()`` (no port); none ⇒ no hash.
        return source_ip.encode("ascii", "replace") if source_ip else None
    return None   # ``consistentHash`` without a hash key (or useSourceIp: false): no hash policy


def cookie_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes:
    """Envoy ``Http::Utility::parseCookieValue``: the first ``name=value`` among the ``cookie`` headers'
    ``;``-separated pairs (leading spaces skipped, pairs without ``=`` ignored), with "Cookie values may
    be wrapped in double quotes" (RFC 6265 §4.1.1) removed; b"" when absent."""
    for n, v in headers:
        if n != b"cookie":
            continue
        for s in v.split(b";"):
            eq = s.find(b"=")
            if eq < 0:
                continue
            if s[:eq].lstrip(b" ") == name:
                val = s[eq + 1:]
                if len(val) >= 2 and val[:1] == b'"' and val[-1:] == b'"':
                    val = val[1:-1]
                return bytes(val)
    return b""


def query_value(query: AnyStr, name: AnyStr, amp: AnyStr = b"&", eq: AnyStr = b"=") -> AnyStr | None:
    """Envoy ``QueryParamsMulti::parseQueryString(...).getFirstValue(name)``: ``&``-separated parameters,
    split at the first ``=`` (no ``=``: the value is empty), names compared exactly, nothing
    percent-decoded; the first occurrence wins; None when absent.

    The one implementation of this rule: the hash key reads the request's bytes; route matching
    (``HttpRequestView.query_param``, select.py) the same bytes decoded as latin-1, passing ``"&"`` and
    ``"="``. Names are never empty (the parser refuses an empty ``httpQueryParameterName`` and
    ``queryParams`` key), so an empty parameter (``a&&b``) matches none."""
    # PERF NOTE: a parameter's name is part of the query string, so a name not in it needs no split:
    # route_http with a ``queryParams`` rule (timeit, 100 000 calls, min of 5) on ``?session=abc&page=2``
    # 953 -> 741 ns, ``?debug=1`` (present) 922 -> 958 ns (the call from query_param), no query 620 -> 580 ns;
    # the hash key's query_value 430 -> 125 ns for an absent name.
    if name not in query:
        return None
    for param in query.split(amp):
        k, _, v = param.partition(eq)
        if k == name:
            return v
    return None


# ---------------------------------------------------------------------------------------------
# The generated cookie (httpCookie with ttl)


def generate_cookie(ch: ConsistentHash, *, remote_address: str, local_address: str) -> tuple[bytes, bytes]:
    """For ``httpCookie`` with a ``ttl``: (cookie value, ``Set-Cookie`` header value).

    Envoy (thread_aware_lb_impl.cc ``generateCookie``) does not derive the value from the upstream host:
    ``value = remote_address->asString() + local_address->asString()`` — the downstream connection's
    peer and local ``ip:port`` — and the cookie is ``Hex::uint64ToHex(HashUtil::xxHash64(value))``. That
    value is also this request's hash key (``hash = HashUtil::xxHash64(value)`` in CookieHashMethod), so
    the host chosen now is the host every later request carrying the cookie maps to (while the host set
    is unchanged). The header is ``Http::Utility::makeSetCookieValue(name, value, path, ttl, httponly=true,
    attributes)``: ``name="value"``, ``; Max-Age=<ttl seconds>`` unless the ttl is 0 (a session cookie),
    ``; Path=<path>`` when set, each attribute ``; n=v`` (or ``; n`` when its value is empty), then
    ``; HttpOnly``."""
    cookie = ch.cookie
    if cookie is None or cookie.ttl_s is None:
        raise ValueError("generate_cookie needs an httpCookie hash key with a ttl")
    value = b"%016x" % hash64((remote_address + local_address).encode("utf-8", "replace"))
    # Envoy: ``ttl = std::chrono::seconds(hash_policy->cookie().ttl().seconds())`` — whole seconds.
    max_age = int(cookie.ttl_s)
    parts = [cookie.name_wire + b'="' + value + b'"']
    if max_age:
        parts.append(b"Max-Age=%d" % max_age)
    if cookie.path:
        parts.append(b"Path=" + cookie.path.encode("utf-8"))
    for n, v in cookie.attributes:
        parts.append(n.encode("utf-8") + (b"=" + v.encode("utf-8") if v else b""))
    parts.append(b"HttpOnly")
    return value, b"; ".join(parts)


def request_hash(ch: ConsistentHash, *, headers: Sequence[tuple[bytes, bytes]], query: bytes,
                 source_ip: str | None, remote_address: str = "", local_address: str = "",
                 ) -> tuple[bytes | None, bytes | None]:
    """(hash key, Set-Cookie value to add to the response or None): ``hash_key``, plus Envoy's cookie
    generation when ``httpCookie`` has a ``ttl`` and the request carries no (non-empty) cookie.
    ``remote_address`` / ``local_address``: the downstream connection's ``ip:port`` pair (only read when
    a cookie is generated)."""
    key = hash_key(ch, headers=headers, query=query, source_ip=source_ip)
    if key is None and ch.generates_cookie:
        value, set_cookie = generate_cookie(ch, remote_address=remote_address, local_address=local_address)
        return value, set_cookie
    return key, None


# ---------------------------------------------------------------------------------------------
# Host tables


def is_prime(n: int) -> bool:
    """Deterministic trial division (table sizes are < 5 000 011: at most ~1 100 divisions)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _u64s(data: bytes) -> array:
    a = array("Q", data)
    if sys.byteorder == "big":
        a.byteswap()   # the points are little-endian integers on every platform
    return a


class RingTable:
    """Envoy's RingHashLoadBalancer::Ring: each host gets ring points in proportion to its weight; a hash
    maps to the first point at or after it (wrapping to the first point), ketama style.

    Ring size (ring_hash_lb.cc): "Scale up the number of hashes per host such that the least-weighted
    host gets a whole number of hashes on the ring", ``scale = min(ceil(min_w * min_ring_size) / min_w,
    max_ring_size)`` over normalized weights, and hosts get their points through running sums
    (``current_hashes`` / ``target_hashes``) so fractions even out. Envoy hashes ``"<host>_<i>"`` for the
    i-th point; here the i-th point is the i-th 8 bytes of SHAKE-128(host key): one call per host, and a
    host keeps its first points when its count changes, which is what keeps the disruption minimal.

    Points are stored packed as ``hash * n_hosts + host_index`` in one sorted list, so a lookup is a
    single ``bisect`` (O(log ring)) and equal hashes (never seen at 64 bits) still order by index."""

    __slots__ = ("ring", "n_hosts", "counts")

    def __init__(self, hosts: Sequence[tuple[str, int]], min_ring_size: int,
                 max_ring_size: int = RING_BUILD_MAX_SIZE):
        n = len(hosts)
        total = sum(w for _, w in hosts)
        if n == 0 or total <= 0 or any(w <= 0 for _, w in hosts):
            raise ValueError("a ring needs at least one host, all with positive weights")
        max_ring_size = min(max_ring_size, RING_HASH_MAX_SIZE)
        min_ring_size = min(min_ring_size, max_ring_size)
        min_w = min(w for _, w in hosts) / total
        scale = min(math.ceil(min_w * min_ring_size) / min_w, float(max_ring_size))
        packed: list[int] = []
        counts: list[int] = []
        current = 0
        target = 0.0
        for idx, (key, w) in enumerate(hosts):
            target += scale * w / total
            count = max(0, math.ceil(target) - current)
            current += count
            counts.append(count)
            if count:
                points = _u64s(hashlib.shake_128(key.encode("utf-8")).digest(8 * count))
                packed.extend(p * n + idx for p in points)
        packed.sort()
        self.ring = packed
        self.n_hosts = n
        self.counts = tuple(counts)

    def __repr__(self) -> str:
        return f"<RingTable hosts={self.n_hosts} points={len(self.ring)}>"

    def choose(self, h: int, attempt: int = 0) -> int:
        """The host index for hash ``h``. ``attempt`` > 0 (a reselection for a retry host predicate):
        Envoy's ``midp = (midp + attempt) % ring_.size()`` — "behave as if this host was not in the
        ring", the next points clockwise."""
        ring = self.ring
        i = bisect_left(ring, h * self.n_hosts)
        if attempt:
            i += attempt
        return ring[i % len(ring)] % self.n_hosts


class MaglevTable:
    """Envoy's OriginalMaglevTable (maglev_lb.cc; Eisenbud et al., "Maglev", NSDI 2016, pseudocode listing
    1): hosts sorted by key ("Maglev requires stable order"), each with ``offset = hash(key) % M`` and
    ``skip = hash2(key) % (M - 1) + 1`` (Envoy: xxHash64 with seeds 0 and 1; here the two halves of a
    16-byte BLAKE2b); then, round after round, each host claims the next free slot of its permutation
    ``(offset + skip * j) % M``. Weights: a host takes a turn only when ``iteration * weight >=
    target_weight`` and then adds ``max_weight`` to its target ("a host with weight equal to
    max_normalized_weight ... would be picked on every single iteration"), with integer weights here.
    A lookup is ``table[hash % M]``: O(1)."""

    __slots__ = ("table", "size", "counts")

    def __init__(self, hosts: Sequence[tuple[str, int]], table_size: int):
        n = len(hosts)
        if n == 0 or any(w <= 0 for _, w in hosts):
            raise ValueError("a Maglev table needs at least one host, all with positive weights")
        if not is_prime(table_size):
            # Envoy MaglevLoadBalancer: "The table size of maglev must be prime number".
            raise ValueError(f"Maglev table size {table_size} is not prime")
        m = table_size
        order = sorted(range(n), key=lambda i: hosts[i][0])
        offsets, skips, weights = [], [], []
        for i in order:
            d = hashlib.blake2b(hosts[i][0].encode("utf-8"), digest_size=16).digest()
            offsets.append(int.from_bytes(d[:8], "little") % m)
            skips.append(int.from_bytes(d[8:], "little") % (m - 1) + 1)
            weights.append(hosts[i][1])
        max_w = max(weights)
        table = [-1] * m
        pos = offsets[:]               # each host's current slot in its permutation
        target = [0] * n
        counts = [0] * n
        filled = 0
        iteration = 1
        while filled < m:
            for j in range(n):
                if iteration * weights[j] < target[j]:
                    continue
                target[j] += max_w
                c = pos[j]
                s = skips[j]
                while table[c] >= 0:
                    c += s
                    if c >= m:
                        c -= m
                table[c] = order[j]
                c += s
                pos[j] = c - m if c >= m else c
                counts[j] += 1
                filled += 1
                if filled == m:
                    break
            iteration += 1
        self.table = table
        self.size = m
        by_index = [0] * n
        for j, i in enumerate(order):
            by_index[i] = counts[j]
        self.counts = tuple(by_index)

    def __repr__(self) -> str:
        return f"<MaglevTable hosts={len(self.counts)} size={self.size}>"

    def choose(self, h: int, attempt: int = 0) -> int:
        """The host index for hash ``h``. ``attempt`` > 0: Envoy's ``hash ^= ~0ULL - attempt + 1`` — "By
        using value with most bits set for the retry attempts, we achieve a larger change in the hash"."""
        if attempt:
            h ^= U64 - attempt
        return self.table[h % self.size]


def build_table(ch: ConsistentHash, hosts: Sequence[tuple[str, int]]) -> RingTable | MaglevTable:
    """The table for ``hosts`` ((Envoy host key ``ip:port``, weight) pairs, all weights > 0) under ``ch``'s
    algorithm, sizes clipped to RING_BUILD_MAX_SIZE / MAGLEV_BUILD_MAX_TABLE_SIZE."""
    if ch.algorithm == MAGLEV:
        size = ch.table_size
        if size > MAGLEV_BUILD_MAX_TABLE_SIZE:
            size = MAGLEV_BUILD_MAX_TABLE_SIZE
        return MaglevTable(hosts, size)
    return RingTable(hosts, ch.minimum_ring_size)


__all__ = [
    "hash64", "hash_key", "cookie_value", "query_value", "generate_cookie", "request_hash", "is_prime",
    "RingTable", "MaglevTable", "build_table", "RING_BUILD_MAX_SIZE", "MAGLEV_BUILD_MAX_TABLE_SIZE",
]
