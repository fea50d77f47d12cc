"""Connect-time DNS for endpoints whose address is a hostname (ServiceEntry ``resolution: DNS`` /
``DNS_ROUND_ROBIN``), for the node proxy's and the waypoint's upstream dials.

What the real data plane does:

* **ztunnel** (no waypoint): a ServiceEntry's DNS endpoint reaches it as a workload with a ``hostname`` and no
  ``workloadIps``; ``state.rs pick_workload_destination_or_resolve`` → ``resolve_on_demand_dns`` looks the name
  up when a connection picks that endpoint ("Randomly pick an IP, prefer to match the IP family of the
  downstream request"); a failed lookup is ``Error::NoResolvedAddresses`` and the connection fails (counted in
  ``istio_on_demand_dns_total``). Concurrent lookups of one name wait on the first.
* **the waypoint's Envoy** (istiod ``cluster_builder``): ``resolution: DNS`` → a ``STRICT_DNS`` cluster (every
  address the name resolves to is a host), ``DNS_ROUND_ROBIN`` → ``LOGICAL_DNS`` (only the first address is
  used, for new connections). Envoy re-resolves every ``dns_refresh_rate`` — Istio sets it from
  ``MeshConfig.dnsRefreshRate``, **60 s** by default (``pkg/config/mesh/mesh.go DefaultMeshConfig``: "we bump up
  the default to 60s to avoid overloading DNS servers"; Envoy's own default is 5 s) — and on a failed
  resolution keeps the hosts it had; ``dns_failure_refresh_rate`` "defaults to the DNS refresh rate".

Here: ``getaddrinfo`` on connect (as ztunnel, no background refresher), cached per name for ``DNS_REFRESH_S``
(getaddrinfo gives no TTL, so the refresh interval is the lifetime), a failure cached as long and logged once
per name and interval, the last good addresses kept through a failed refresh (Envoy), IPv4 first (our pods are
IPv4; ztunnel prefers the downstream's family; istiod gives single-stack clusters ``V4_ONLY``).

The pure core (``DnsEntry``, ``entry_state``, ``after_success``/``after_failure``, ``pick_address``,
``DnsCache``) takes time as a parameter; ``Resolver`` is the asyncio shell.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable

log = logging.getLogger("hbone.dns")

# Istio MeshConfig.dnsRefreshRate default (see the module docstring): how long a resolution is used before the
# next connection resolves the name again. getaddrinfo reports no TTL, so this is the whole lifetime.
DNS_REFRESH_S = 60.0
# A failed resolution is retried no sooner than this (Envoy: dns_failure_refresh_rate "defaults to the DNS
# refresh rate"); connections in between fail at once instead of each waiting on the resolver.
DNS_FAILURE_REFRESH_S = DNS_REFRESH_S
# One lookup's budget (Envoy's DNS cache dns_query_timeout default, 5 s): a resolver that does not answer is a
# connect failure, never a connection hung on it.
DNS_LOOKUP_TIMEOUT_S = 5.0
# A lookup that got no answer in time (not a definite "no such name") is tried again this soon rather than after
# DNS_FAILURE_REFRESH_S: the resolver may have been slow or busy (getaddrinfo runs in a small thread pool, and
# time queued there counts), and ztunnel's on-demand DNS does not remember timeouts (found by review).
DNS_TIMEOUT_RETRY_S = 2.0
TIMEOUT_ERROR_PREFIX = "no answer within"
# Names kept (Envoy's DNS cache max_hosts default, 1 024): far above the DNS ServiceEntries a mesh has; bounds
# the cache should endpoints churn. The least recently used name goes first.
DNS_CACHE_ENTRIES = 1024

STRICT_DNS = "STRICT_DNS"     # resolution: DNS — any resolved address is a host
LOGICAL_DNS = "LOGICAL_DNS"   # resolution: DNS_ROUND_ROBIN — the first resolved address only
MODES = (STRICT_DNS, LOGICAL_DNS)


class DnsFailure(Exception):
    """A name did not resolve (no answer, an error, or no time left): a connect failure for the caller."""

    def __init__(self, host: str, reason: str):
        super().__init__(f"{host}: DNS resolution failed: {reason}")
        self.host = host
        self.reason = reason


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Pure core


@dataclass(frozen=True)
class DnsEntry:
    """What is known of one name: the last good addresses, and the last attempt (when, and its error)."""

    addresses: tuple[str, ...]     # the last successful answer, IPv4 first; () if none ever
    attempted_at: float            # when the last resolution finished (success or failure)
    error: str = ""                # the last attempt's failure; "" = it succeeded


def entry_state(entry: DnsEntry | None, now: float, *, refresh_s: float = DNS_REFRESH_S,
                failure_refresh_s: float = DNS_FAILURE_REFRESH_S) -> str:
    """``"resolve"`` (none yet, or its interval is over: look the name up) | ``"fresh"`` (use the addresses)
    | ``"failed"`` (the last attempt failed within its interval, and no good addresses are kept: fail now)."""
    if entry is None:
        return "resolve"
    interval = (min(failure_refresh_s, DNS_TIMEOUT_RETRY_S) if entry.error.startswith(TIMEOUT_ERROR_PREFIX)
                else failure_refresh_s) if entry.error else refresh_s
    if now - entry.attempted_at >= interval or now < entry.attempted_at:   # a clock step back: resolve again
        return "resolve"
    return "fresh" if entry.addresses else "failed"


def after_success(addresses: tuple[str, ...], now: float) -> DnsEntry:
    return DnsEntry(order_addresses(addresses), now)


def after_failure(previous: DnsEntry | None, error: str, now: float) -> DnsEntry:
    """Envoy keeps a STRICT/LOGICAL_DNS cluster's hosts when a refresh fails: the last good addresses stay."""
    return DnsEntry(previous.addresses if previous is not None else (), now, error or "no address")


def should_log_failure(previous: DnsEntry | None, now: float, *,
                       failure_refresh_s: float = DNS_FAILURE_REFRESH_S) -> bool:
    """Once per name and interval: not when the previous attempt already failed less than an interval ago."""
    return previous is None or not previous.error or now - previous.attempted_at >= failure_refresh_s


def order_addresses(addresses) -> tuple[str, ...]:
    """Unique, IPv4 before IPv6, otherwise in the resolver's order (getaddrinfo sorts by RFC 6724)."""
    seen = list(dict.fromkeys(a for a in addresses if a))
    return tuple([a for a in seen if ":" not in a] + [a for a in seen if ":" in a])


def pick_address(addresses: tuple[str, ...], mode: str, rng: random.Random) -> str:
    """The address to dial: ``LOGICAL_DNS`` (DNS_ROUND_ROBIN) the first; ``STRICT_DNS`` (DNS) any of those of
    the preferred family (IPv4 when there is one; ztunnel: "prefer to match the IP family")."""
    if not addresses:
        raise ValueError("no addresses to pick from")
    if mode == LOGICAL_DNS:
        return addresses[0]
    family = [a for a in addresses if (":" in a) == (":" in addresses[0])]
    return family[0] if len(family) == 1 else rng.choice(family)


class DnsCache:
    """Bounded, least recently used first out; holds ``DnsEntry`` values (no clock of its own)."""

    def __init__(self, max_entries: int = DNS_CACHE_ENTRIES):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, DnsEntry] = OrderedDict()

    def get(self, host: str) -> DnsEntry | None:
        entry = self._entries.get(host)
        if entry is not None:
            self._entries.move_to_end(host)
        return entry

    def put(self, host: str, entry: DnsEntry) -> None:
        self._entries[host] = entry
        self._entries.move_to_end(host)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, host: str) -> bool:
        return host in self._entries


# ---------------------------------------------------------------------------------------------
# asyncio shell

Lookup = Callable[[str], Awaitable[list[str]]]


async def getaddrinfo_lookup(host: str) -> list[str]:
    """The addresses the system resolver (``/etc/hosts``, DNS) gives for ``host``, TCP only."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]).partition("%")[0] for info in infos
            if info[0] in (socket.AF_INET, socket.AF_INET6)]


class Resolver:
    """Resolves endpoint hostnames for dials: the cache above, one lookup per name at a time (ztunnel: "If
    we're already looking up this DNS entry, let's just wait on that completing")."""

    def __init__(self, *, lookup: Lookup = getaddrinfo_lookup, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, timeout_s: float = DNS_LOOKUP_TIMEOUT_S,
                 refresh_s: float = DNS_REFRESH_S, failure_refresh_s: float = DNS_FAILURE_REFRESH_S,
                 max_entries: int = DNS_CACHE_ENTRIES):
        self.lookup = lookup
        self.clock = clock
        self.rng = rng or random.Random()
        self.timeout_s = timeout_s
        self.refresh_s = refresh_s
        self.failure_refresh_s = failure_refresh_s
        self.cache = DnsCache(max_entries)
        self._inflight: dict[str, asyncio.Future] = {}
        self.lookups = 0
        self.failures = 0

    async def addresses(self, host: str) -> tuple[str, ...]:
        """The addresses to use for ``host`` now; raises ``DnsFailure``."""
        key = host.lower().rstrip(".")
        entry = self.cache.get(key)
        state = entry_state(entry, self.clock(), refresh_s=self.refresh_s, failure_refresh_s=self.failure_refresh_s)
        if state == "fresh":
            return entry.addresses
        if state == "failed":
            raise DnsFailure(host, entry.error)
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._inflight[key] = asyncio.ensure_future(self._resolve(key, entry))
            pending.add_done_callback(lambda _f, k=key: self._inflight.pop(k, None))
        entry = await asyncio.shield(pending)
        if not entry.addresses:
            raise DnsFailure(host, entry.error)
        return entry.addresses

    async def address_for(self, host: str, mode: str = STRICT_DNS) -> str:
        """The address to dial for ``host`` (``pick_address``); raises ``DnsFailure``."""
        return pick_address(await self.addresses(host), mode, self.rng)

    async def _resolve(self, key: str, previous: DnsEntry | None) -> DnsEntry:
        self.lookups += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                found = order_addresses(await self.lookup(key))
            error = "" if found else "no address"
        except TimeoutError:
            found, error = (), f"{TIMEOUT_ERROR_PREFIX} {self.timeout_s:g}s"
        except (OSError, UnicodeError, ValueError) as err:   # socket.gaierror is an OSError; bad IDNA a UnicodeError
            found, error = (), getattr(err, "strerror", None) or str(err) or err.__class__.__name__
        except Exception as err:   # noqa: BLE001 — e.g. RuntimeError from an executor shut down: a failure all the same
            found, error = (), f"{err.__class__.__name__}: {err}"
        now = self.clock()
        if found:
            entry = after_success(found, now)
        else:
            self.failures += 1
            if should_log_failure(previous, now, failure_refresh_s=self.failure_refresh_s):
                kept = f"; keeping {', '.join(previous.addresses)}" if previous and previous.addresses else ""
                retry = min(self.failure_refresh_s, DNS_TIMEOUT_RETRY_S) \
                    if error.startswith(TIMEOUT_ERROR_PREFIX) else self.failure_refresh_s
                log.warning("DNS resolution of %s failed: %s (next try in %gs%s)", key, error, retry, kept)
            entry = after_failure(previous, error, now)
        self.cache.put(key, entry)
        return entry

    def __repr__(self) -> str:
        return f"<Resolver names={len(self.cache)} lookups={self.lookups} failures={self.failures}>"


__all__ = ["Resolver", "DnsFailure", "DnsEntry", "DnsCache", "entry_state", "after_success", "after_failure",
           "should_log_failure", "order_addresses", "pick_address", "is_ip", "getaddrinfo_lookup",
           "STRICT_DNS", "LOGICAL_DNS", "DNS_REFRESH_S", "DNS_FAILURE_REFRESH_S", "DNS_LOOKUP_TIMEOUT_S", "DNS_TIMEOUT_RETRY_S",
           "DNS_CACHE_ENTRIES"]
