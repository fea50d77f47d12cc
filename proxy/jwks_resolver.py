"""The waypoint's JWKS resolver: what istiod does for a RequestAuthentication rule without an inline ``jwks``
(pilot/pkg/model/jwks_resolver.go), done by the proxy that enforces it, since there is no istiod here.

- When a config is built (``ConfigStore.build``, on the config thread), each distinct (issuer, jwksUri) the
  waypoint's rules name is looked up in the cache; one not there is fetched at once, without retries
  ("networkFetchRetryCountOnMainFlow = 0 ... make sure not to block Pilot too long"), bounded by the rule's
  ``timeout`` (Istio's default 5 s), all of a build's fetches in parallel. No ``jwksUri``: the issuer's OpenID
  discovery document names it. A failure leaves the rule with istiod's fake key set ("using a fake JWKS for
  now": every token for it is rejected) and wakes the background refresher to try again.
- The background refresher (``ProxyApp._refresh_jwks``) re-fetches every cached key set every 20 minutes
  (PILOT_JWT_PUB_KEY_REFRESH_INTERVAL's default), with up to 7 retries a second apart
  (networkFetchRetryCountOnRefreshFlow, JwtPubKeyRetryInterval); after a failed round the next comes in 1 minute,
  doubling up to 60 (JwtPubKeyRefreshIntervalOnFailure, ...ResetThreshold). When a key set changed (key
  rotation) the config is reloaded, as istiod's PushFunc pushes the new keys to the proxies.
- A failed refresh keeps the last good key set, until it has not been refreshed for 7 days
  (JwtPubKeyEvictionDuration: "we don't reuse a cached public key with no success refresh for too much time").

Where this differs from istiod, and why: istiod forgets a source whose first fetch and background retries all
failed and tries it again at its next push, which in a cluster comes soon; a config file here may not change for
days, so the refresher keeps retrying it on its failure schedule instead. A fetched key set that does not parse
is a failed fetch (istiod would push it and Envoy would refuse the listener). Bodies are bounded
(``JWKS_FETCH_MAX_BYTES``), only http and https are fetched (also after redirects), proxies from the
environment are used as Go's ``http.ProxyFromEnvironment`` does, and https is verified against the system's
roots.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

from policy.authn.jwks import MAX_JWKS_BYTES, parse_jwks
from policy.authn.model import Jwks
from policy.authn.remote import KeySource, jwks_uri_from_discovery

log = logging.getLogger("hbone.jwks")

JWKS_REFRESH_INTERVAL_S = 20 * 60          # istiod PILOT_JWT_PUB_KEY_REFRESH_INTERVAL default (20m)
JWKS_REFRESH_ON_FAILURE_S = 60.0           # JwtPubKeyRefreshIntervalOnFailure: the round after a failed one
JWKS_REFRESH_BACKOFF_MAX_S = 60 * 60.0     # JwtPubKeyRefreshIntervalOnFailureResetThreshold: doubling stops here
JWKS_RETRIES_ON_REFRESH = 7                # networkFetchRetryCountOnRefreshFlow (the main flow: none)
JWKS_RETRY_INTERVAL_S = 1.0                # JwtPubKeyRetryInterval
JWKS_STALE_AFTER_S = 7 * 24 * 3600.0       # JwtPubKeyEvictionDuration: a key set not refreshed for this long is
#                                            dropped (the fake one stands in again)
JWKS_FETCH_MAX_BYTES = MAX_JWKS_BYTES      # a key set parse_jwks would refuse anyway; a longer body is a failure
DISCOVERY_MAX_BYTES = 64 * 1024            # an OpenID discovery document is a few KiB (Google's ~1.3 KiB)
JWKS_SOURCES_MAX = 256                     # distinct (issuer, jwksUri) fetched and kept; more: fake, with a warning
JWKS_FETCH_PARALLEL = 8                    # one build's first fetches at once (each bounded by its timeout)
JWKS_FETCH_GRACE_S = 1.0                   # a build waits for its fetches their timeout and this much more
JWKS_FETCH_SCHEMES = ("http", "https")     # security.ParseJwksURI's; never file:, ftp: or data:


class FetchError(Exception):
    """A fetch that did not give a usable body (its message says why, for the log)."""


def http_get(url: str, timeout_s: float, max_bytes: int) -> bytes:
    """GET ``url`` (http or https, redirects followed within those schemes) and return its 2xx body, all of it
    within ``timeout_s`` (a deadline for the whole exchange, as istiod's request context) and at most
    ``max_bytes``; anything else raises ``FetchError``."""
    parts = urlsplit(url)
    if parts.scheme not in JWKS_FETCH_SCHEMES:
        raise FetchError(f"scheme of {url[:120]!r} is not http or https")
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.OpenerDirector()
    # Proxies from the environment (http_proxy, https_proxy, no_proxy), except for a loopback host, which Go's
    # http.ProxyFromEnvironment never proxies (x/net/http/httpproxy useProxy: "localhost" and loopback IPs).
    proxies = {} if _is_loopback(parts.hostname or "") else None
    for handler in (urllib.request.ProxyHandler(proxies), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(context=ssl.create_default_context()),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)   # (no file:, ftp: or data: handler: a redirect there fails)
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "hbone-proxy-jwks"}),
                         timeout=timeout_s) as resp:
            chunks, size = [], 0
            while size <= max_bytes:
                # (Each read waits at most timeout_s, as the socket's timeout; the deadline is checked between
                # them, so a peer that drips its answer is cut off within twice the timeout.)
                if time.monotonic() > deadline:
                    raise FetchError(f"no whole answer within {timeout_s:g} s")
                chunk = resp.read1(min(65536, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"body longer than {max_bytes} bytes")
            if resp.length:   # (http.client's read1 ends quietly when the peer closes short of Content-Length)
                raise FetchError(f"body ended {resp.length} bytes short of its Content-Length")
            return b"".join(chunks)
    except urllib.error.HTTPError as err:
        raise FetchError(f"status {err.code}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise FetchError(f"{reason.__class__.__name__}: {reason}" if isinstance(reason, BaseException)
                         else str(reason)) from None


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Entry:
    """A cached key set (``jwks`` None: not fetched yet) and when it was last fetched successfully."""
    source: KeySource
    jwks: Jwks | None = None
    normal: str = ""          # the key set's JSON in a normal form, to tell a rotation from a re-serialisation
    refreshed: float = 0.0


def _normal(text: str) -> str:
    """istiod compareJWKSResponse: the same keys in another order or spacing is no change."""
    keys = json.loads(text).get("keys", [])
    return json.dumps(sorted(keys, key=lambda k: json.dumps(k, sort_keys=True)), sort_keys=True)


def next_refresh_interval(current_s: float, errors: bool, last_errors: bool) -> float:
    """istiod refreshCache: the default after a good round; 1 minute after a first failed one, then doubling up
    to an hour."""
    if not errors:
        return JWKS_REFRESH_INTERVAL_S
    if not last_errors:
        return JWKS_REFRESH_ON_FAILURE_S
    return min(current_s * 2, JWKS_REFRESH_BACKOFF_MAX_S)


class JwksResolver:
    """The cache of fetched key sets, shared by the config thread (``key_sets``) and the refresher
    (``refresh``, on an executor thread); ``on_missing`` is called (from the config thread) when a build's
    fetch failed, so the refresher tries again soon."""

    def __init__(self, *, fetch: Callable[[str, float, int], bytes] = http_get,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 on_missing: Callable[[], None] | None = None):
        self._fetch = fetch
        self._clock = clock
        self._sleep = sleep
        self.on_missing = on_missing
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._over_limit_warned = False
        self.fetches_ok = 0       # istiod: pilot_jwks_resolver_network_fetch_success_total
        self.fetches_failed = 0   # ... _fail_total

    def __len__(self) -> int:
        return len(self._entries)

    # -- the main flow: a config build --
    def key_sets(self, sources: Iterable[KeySource]) -> dict[tuple[str, str], Jwks]:
        """The key set of each source that has one (cached, or fetched now once); the cache keeps only these
        sources (a source the config no longer names is forgotten)."""
        sources = list(sources)
        wanted = {s.key for s in sources}
        new: list[_Entry] = []
        with self._lock:
            for key in [k for k in self._entries if k not in wanted]:
                del self._entries[key]
            for src in sources:
                entry = self._entries.get(src.key)
                if entry is not None:
                    entry.source = src   # (istiod: the entry takes the latest timeout)
                elif len(self._entries) >= JWKS_SOURCES_MAX:
                    if not self._over_limit_warned:
                        log.warning("more than %d JWT key sources (issuer, jwksUri): %s and later ones keep the "
                                    "fake key set", JWKS_SOURCES_MAX, _describe(src))
                        self._over_limit_warned = True
                else:
                    entry = self._entries[src.key] = _Entry(src)
                    new.append(entry)
        if new:
            results = self._fetch_all([e.source for e in new])
            missing = False
            with self._lock:
                for entry, (jwks, normal, err) in zip(new, results):
                    if self._entries.get(entry.source.key) is not entry:
                        continue
                    if jwks is None:
                        missing = True
                        log.warning("cannot fetch the JWT key set for %s: %s; tokens for it are rejected (istiod's "
                                    "fake key set) until a fetch succeeds", _describe(entry.source), err)
                    else:
                        entry.jwks, entry.normal, entry.refreshed = jwks, normal, self._clock()
                        log.info("fetched the JWT key set for %s (%d keys)", _describe(entry.source), len(jwks.keys))
            if missing and self.on_missing is not None:
                self.on_missing()
        with self._lock:
            return {k: e.jwks for k, e in self._entries.items() if e.jwks is not None}

    def _fetch_all(self, sources: list[KeySource]) -> list[tuple[Jwks | None, str, str]]:
        """One try of each source, JWKS_FETCH_PARALLEL at a time, within their timeouts: a fetch still running
        then (a host name whose lookup hangs: the socket timeout does not cover getaddrinfo) is a failed one,
        and the build goes on without waiting for it."""
        pool = ThreadPoolExecutor(min(JWKS_FETCH_PARALLEL, len(sources)), thread_name_prefix="jwks-fetch")
        try:
            futures = [pool.submit(self._attempt, src, retries=0) for src in sources]
            rounds = -(-len(sources) // JWKS_FETCH_PARALLEL)
            wait(futures, timeout=rounds * max(src.timeout_s for src in sources) + JWKS_FETCH_GRACE_S)
            return [f.result() if f.done() else (None, "", f"no answer within {src.timeout_s:g} s")
                    for f, src in zip(futures, sources)]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the background flow --
    def refresh(self, *, only_missing: bool = False) -> tuple[bool, bool]:
        """Fetch the cached sources again (``only_missing``: those without a key set yet), with retries;
        ``(changed, errors)``: a key set changed, appeared or went stale (reload the config), and whether a
        fetch failed (the refresher backs off)."""
        with self._lock:
            entries = [e for e in self._entries.values() if not (only_missing and e.jwks is not None)]
        changed = errors = False
        for entry in entries:
            jwks, normal, err = self._attempt(entry.source, retries=JWKS_RETRIES_ON_REFRESH)
            now = self._clock()
            with self._lock:
                if self._entries.get(entry.source.key) is not entry:
                    continue   # the config stopped naming it meanwhile
                if jwks is None:
                    errors = True
                    if entry.jwks is not None and now - entry.refreshed >= JWKS_STALE_AFTER_S:
                        log.warning("the JWT key set for %s was not refreshed for %d days: dropped (tokens for it "
                                    "are rejected until a fetch succeeds): %s", _describe(entry.source),
                                    JWKS_STALE_AFTER_S // 86400, err)
                        entry.jwks, entry.normal = None, ""
                        changed = True
                    else:
                        log.warning("cannot refresh the JWT key set for %s: %s", _describe(entry.source), err)
                    continue
                if entry.jwks is None or normal != entry.normal:
                    changed = True
                    log.info("%s the JWT key set for %s (%d keys)", "fetched" if entry.jwks is None else "new keys in",
                             _describe(entry.source), len(jwks.keys))
                entry.jwks, entry.normal, entry.refreshed = jwks, normal, now
        return changed, errors

    def _attempt(self, src: KeySource, *, retries: int) -> tuple[Jwks | None, str, str]:
        """(key set, its normal form, "") or (None, "", why), after up to ``retries`` more tries."""
        for attempt in range(retries + 1):
            if attempt:
                self._sleep(JWKS_RETRY_INTERVAL_S)
            try:
                uri = src.jwks_uri
                if not uri:
                    uri = jwks_uri_from_discovery(self._fetch(src.discovery_url, src.timeout_s, DISCOVERY_MAX_BYTES))
                text = self._fetch(uri, src.timeout_s, JWKS_FETCH_MAX_BYTES).decode("utf-8")
                jwks = parse_jwks(text)
                result = (jwks, _normal(text), "")
            except FetchError as err:
                result = (None, "", str(err))
            except Exception as err:   # noqa: BLE001 — whatever a provider sends is a failed fetch, never a crash
                result = (None, "", f"{err.__class__.__name__}: {err}")
            with self._lock:
                if result[0] is None:
                    self.fetches_failed += 1
                else:
                    self.fetches_ok += 1
            if result[0] is not None:
                return result
        return result


def _describe(src: KeySource) -> str:
    if src.jwks_uri:
        return f"issuer {src.issuer!r} from {src.jwks_uri}"
    return f"issuer {src.issuer!r} (OpenID discovery {src.discovery_url})"

