"""Endpoint choice: which workloads can serve a destination, and which one gets this request.

* ``endpoints_for``: ztunnel's filter (reference/ztunnel.md §5.5) — only healthy endpoints, that have the
  service port — narrowed by DestinationRule subset labels (subset labels ⊆ workload labels).
* ``LoadBalancer.pick``: Envoy's algorithms, weighted by ``workload.capacity`` (ztunnel's
  load-balancing weight), with retries avoiding previously tried hosts as Envoy's
  ``previous_hosts`` predicate does (``host_selection_retry_max_attempts`` reselections).
* ``OutlierDetector``: DestinationRule ``outlierDetection`` (consecutive 5xx ⇒ ejection for
  base time × ejection count, at most max-ejection-percent of hosts).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from policy.inventory import Inventory, Service, Workload

from .hashing import MaglevTable, RingTable, build_table, hash64
from .model import (
    OUTCOME_ERRORS, HOST_SELECTION_MAX_ATTEMPTS, ConsistentHash, OutlierDetection, Outcome, TrafficPolicy,
)
from .select import pick_weighted

LEAST_REQUEST_CHOICES = 2   # Envoy least_request choice_count default: power of two choices
# Consistent-hash tables kept per LoadBalancer, keyed by (algorithm, size, the usable hosts and weights),
# least recently built/used first out. One is live per consistent-hash cluster and ejection state; a
# waypoint serves a few dozen such clusters at most, and a table is ≤ ~8 MB (a 1 000 003-slot Maglev
# list) and typically ~50 KB (a 1 024-point ring) — so 64 bounds memory while never rebuilding in
# steady state. A config reload with the same hosts finds its table again (same content key).
CONSISTENT_TABLES_MAX = 64
# The per-request shortcut to a table: (candidates object, ejected set, algorithm) → (candidates, usable
# hosts, table), so a pick does not rebuild the O(hosts) content key. Entries are three references;
# candidate tuples are memoised per config snapshot, so the live set is one per (cluster, ejection
# state); 256 leaves room for the previous snapshot's while it drains.
CONSISTENT_VIEWS_MAX = 256
_NO_EJECTED: frozenset = frozenset()


@dataclass(frozen=True)
class Candidate:
    workload: Workload = field(compare=False)
    ip: str
    target_port: int
    uid: str = ""

    # Cached: a request asks for it ~10 times (pick, exclusion, active counts, pool key, logs) and the
    # candidates are memoised per snapshot, so it is formatted once per endpoint, not per call
    # (sampling profile of the waypoint under load: the f-string was ~1.6 % of its CPU). A frozen
    # dataclass allows it: cached_property writes the instance __dict__ directly.
    @functools.cached_property
    def key(self) -> str:
        """The host as Envoy names it (``ip:port``); what ``exclude`` and outlier state are keyed by."""
        return f"[{self.ip}]:{self.target_port}" if ":" in self.ip else f"{self.ip}:{self.target_port}"

    @property
    def weight(self) -> int:
        return max(self.workload.capacity, 0)


def endpoints_for(inventory: Inventory, service: Service, port: int,
                  subset_labels: Mapping[str, str] | None) -> tuple[Candidate, ...]:
    """The service's endpoints able to take traffic on ``port``, in a stable order (by workload uid)."""
    out = []
    for wl, ep in inventory.endpoints_of(service):
        # ztunnel: "Only healthy endpoints are used" — the workload's and the endpoint's status.
        if not wl.healthy or ep.status != "Healthy":
            continue
        # ztunnel: "The endpoint must have the service port."
        target = ep.ports.get(port)
        if target is None:
            continue
        if target == 0:
            target = service.ports.get(port, 0)   # 0 = named port; fall back to the service's target
        if not target:
            continue
        if subset_labels and any(wl.labels.get(k) != v for k, v in subset_labels.items()):
            continue
        if not wl.workload_ips:
            continue   # hostname-only / network-gateway workloads are not reachable from here
        out.append(Candidate(wl, wl.workload_ips[0], target, wl.uid))
    return tuple(out)


class LoadBalancer:
    """Load-balancing state for one proxy: the round-robin cursors, as plain data.

    Smooth weighted round robin (nginx's) gives each host its capacity share in a deterministic
    interleaving; Envoy's EDF scheduler yields the same shares.
    """

    def __init__(self) -> None:
        self.rr: dict[str, dict[str, float]] = {}   # cluster → host key → current weight
        # Consistent hashing (see CONSISTENT_TABLES_MAX / CONSISTENT_VIEWS_MAX).
        self.tables: dict[tuple, RingTable | MaglevTable] = {}
        self.views: dict[tuple, tuple] = {}

    def __repr__(self) -> str:
        return (f"<LoadBalancer round_robin_clusters={len(self.rr)} hash_tables={len(self.tables)} "
                f"hash_views={len(self.views)}>")

    def pick(self, candidates: Sequence[Candidate], *, rng: random.Random, exclude: frozenset[str] = frozenset(),
             active_requests: Mapping[str, int] | None = None, lb: str = "LEAST_REQUEST", cluster: str = "",
             ejected: frozenset[str] | set[str] = frozenset(),
             host_selection_max_attempts: int = HOST_SELECTION_MAX_ATTEMPTS,
             consistent: ConsistentHash | None = None, hash_key: bytes | None = None) -> Candidate | None:
        """One host, or None when no host can be used (⇒ 503 UH, "no healthy upstream").

        ``exclude``: hosts tried by earlier attempts of this request. As Envoy's previous_hosts predicate,
        a pick that lands on one is redone up to ``host_selection_max_attempts`` times; after that the last
        pick is used (so a single-host cluster still gets its retries).

        ``consistent``: the cluster's ``consistentHash`` (then ``lb`` is not used): the host is the ring's
        or Maglev table's for ``hash_key`` (``hashing.request_hash``), a random point when ``hash_key`` is
        None. ``candidates`` is then expected to be the same (memoised) sequence from request to request:
        the table is found by its identity in O(1)."""
        if len(candidates) == 1:
            # One host (e.g. a one-pod subset): it, if usable — no algorithm can choose otherwise, and
            # reselection for ``exclude`` would land on it again (then Envoy uses the last pick).
            only = candidates[0]
            return only if only.key not in ejected and only.weight > 0 else None
        if consistent is not None:
            return self._pick_hashed(candidates, consistent, hash_key, rng, exclude, ejected,
                                     host_selection_max_attempts)
        usable = [c for c in candidates if c.key not in ejected and c.weight > 0]
        if not usable:
            return None
        algo = _algorithm(lb)
        choice = self._pick_once(usable, rng, active_requests, algo, cluster)
        for _ in range(host_selection_max_attempts):
            if choice.key not in exclude:
                break
            choice = self._pick_once(usable, rng, active_requests, algo, cluster)
        return choice

    def _pick_hashed(self, candidates: Sequence[Candidate], ch: ConsistentHash, key: bytes | None,
                     rng: random.Random, exclude: frozenset[str], ejected: frozenset[str] | set[str],
                     max_attempts: int) -> Candidate | None:
        # Envoy builds the ring/table from the healthy hosts only (ThreadAwareLoadBalancerBase::refresh
        # normalizes ``host_set.healthyHosts()``; an outlier-ejected host is unhealthy), and rebuilds it on
        # every host-set or health change: so an ejected host's keys move to other hosts and come back
        # when it returns. Here: one table per usable host set, cached.
        ej = ejected if type(ejected) is frozenset else (frozenset(ejected) if ejected else _NO_EJECTED)
        params = ch.table_params
        vkey = (id(candidates), ej, params)
        view = self.views.get(vkey)
        if view is None or view[0] is not candidates:
            view = self._view(candidates, ej, params, ch)
            if len(self.views) >= CONSISTENT_VIEWS_MAX:
                del self.views[next(iter(self.views))]
            self.views[vkey] = view
        _, usable, table = view
        if table is None:
            return None
        # Envoy: "If there is no hash in the context, just choose a random value (this effectively becomes
        # the random LB ...)" — a random point of the same ring/table, so weights still hold.
        h = hash64(key) if key is not None else rng.getrandbits(64)
        choice = usable[table.choose(h, 0)]
        # Envoy's host selection with a retry host predicate (ThreadAwareLoadBalancerBase chooseHost):
        # ``for (i = 0; i < max_attempts; ++i) { host = chooseHost(h, i); if (!shouldSelectAnotherHost(host))
        # return host; }`` then the last host; ``attempt`` i walks the ring (next point) or perturbs the
        # Maglev hash. ``exclude`` is empty unless the route asks for previous_hosts (Istio drops it for
        # consistent hashing unless retryIgnorePreviousHosts: true — RetryPolicy.avoids_previous_hosts).
        attempt = 0
        while attempt < max_attempts and choice.key in exclude:
            attempt += 1
            choice = usable[table.choose(h, attempt)]
        return choice

    def _view(self, candidates: Sequence[Candidate], ej: frozenset[str], params: tuple,
              ch: ConsistentHash) -> tuple:
        usable = tuple(c for c in candidates if c.key not in ej and c.weight > 0)
        if not usable:
            return (candidates, usable, None)
        tkey = (params, tuple((c.key, c.weight) for c in usable))
        table = self.tables.pop(tkey, None)          # re-inserted below: least recently used goes first
        if table is None:
            table = build_table(ch, tkey[1])
            if len(self.tables) >= CONSISTENT_TABLES_MAX:
                del self.tables[next(iter(self.tables))]
        self.tables[tkey] = table
        return (candidates, usable, table)

    def _pick_once(self, usable: list[Candidate], rng: random.Random, active: Mapping[str, int] | None,
                   algo: str, cluster: str) -> Candidate:
        if len(usable) == 1:
            return usable[0]
        if algo == "ROUND_ROBIN":
            state = self.rr.setdefault(cluster, {})
            total = 0
            best: Candidate | None = None
            for c in usable:
                cur = state.get(c.key, 0.0) + c.weight
                state[c.key] = cur
                total += c.weight
                if best is None or cur > state[best.key]:
                    best = c
            assert best is not None
            state[best.key] -= total
            return best
        if algo == "RANDOM":
            return pick_weighted([(c, c.weight) for c in usable], rng)
        # LEAST_REQUEST (Envoy): with equal weights, the better of N random hosts; with unequal weights,
        # weight / (active + 1) ("active_request_bias" 1.0).
        active = active or {}
        if len({c.weight for c in usable}) == 1:
            picks = [usable[rng.randrange(len(usable))] for _ in range(LEAST_REQUEST_CHOICES)]
            return min(picks, key=lambda c: active.get(c.key, 0))
        return pick_weighted([(c, c.weight / (active.get(c.key, 0) + 1)) for c in usable], rng)


def _algorithm(lb: str | TrafficPolicy | None) -> str:
    if isinstance(lb, TrafficPolicy):
        return lb.lb_algorithm
    if lb in (None, "UNSPECIFIED", "LEAST_CONN", "PASSTHROUGH"):
        # Istio default LEAST_REQUEST; LEAST_CONN is its deprecated alias. PASSTHROUGH (original
        # destination) has no meaning for a service VIP at a waypoint: balance as the default.
        return "LEAST_REQUEST"
    if lb not in ("ROUND_ROBIN", "RANDOM", "LEAST_REQUEST"):
        raise ValueError(f"unknown load-balancing algorithm {lb!r}")
    return lb


@dataclass
class _HostState:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejections: int = 0                   # the ejection-time multiplier
    ejected_until: float | None = None
    healthy_since: float = 0.0


class OutlierDetector:
    """Passive health checking for one cluster (Envoy outlier detection as Istio configures it).

    Create one only when the DestinationRule has ``outlierDetection`` (Istio: "only when present").
    Ejections end lazily when ``ejected(now)`` is asked after their time is up (Envoy checks on its
    ``interval`` timer, so an ejection may last up to one interval longer there). Each whole
    ``interval`` a host spends un-ejected lowers its ejection multiplier by one, as Envoy does.
    """

    def __init__(self, config: OutlierDetection):
        self.config = config
        self.hosts: dict[str, _HostState] = {}

    def __repr__(self) -> str:
        ejected = sum(1 for h in self.hosts.values() if h.ejected_until is not None)
        return f"<OutlierDetector hosts={len(self.hosts)} ejected={ejected}>"

    @classmethod
    def for_policy(cls, policy: TrafficPolicy) -> "OutlierDetector | None":
        return cls(policy.outlier_detection) if policy.outlier_detection is not None else None

    def record(self, host: str, outcome: "Outcome | int | str", now: float, *, total_hosts: int | None = None) -> bool:
        """Account one attempt's outcome; returns True when this outcome ejected the host."""
        self._refresh(now)
        o = Outcome.of(outcome)
        st = self.hosts.setdefault(host, _HostState(healthy_since=now))
        # Envoy (split_external_local_origin_errors false): local-origin failures count as 5xx /
        # gateway errors (a connect failure is reported as 503).
        is_error = o.error in OUTCOME_ERRORS
        status = 503 if is_error else (o.status or 0)
        if status >= 500:
            st.consecutive_5xx += 1
            if status in (502, 503, 504):
                st.consecutive_gateway += 1
            else:
                st.consecutive_gateway = 0
        else:
            st.consecutive_5xx = 0
            st.consecutive_gateway = 0
            return False
        c = self.config
        tripped = (c.consecutive_5xx_errors > 0 and st.consecutive_5xx >= c.consecutive_5xx_errors) or \
                  (c.consecutive_gateway_errors > 0 and st.consecutive_gateway >= c.consecutive_gateway_errors)
        if not tripped or st.ejected_until is not None:
            return False
        total = max(total_hosts if total_hosts is not None else len(self.hosts), 1)
        ejected_now = sum(1 for h in self.hosts.values() if h.ejected_until is not None)
        # Envoy: max_ejection_percent "defaults to 10% but will eject at least one host regardless".
        if ejected_now > 0 and (ejected_now + 1) * 100 > c.max_ejection_percent * total:
            return False
        st.ejections += 1
        duration = min(c.base_ejection_time_s * st.ejections, max(c.base_ejection_time_s, c.max_ejection_time_s))
        st.ejected_until = now + duration
        st.consecutive_5xx = st.consecutive_gateway = 0
        return True

    def ejected(self, now: float) -> set[str]:
        self._refresh(now)
        return {k for k, h in self.hosts.items() if h.ejected_until is not None}

    def _refresh(self, now: float) -> None:
        interval = self.config.interval_s
        for h in self.hosts.values():
            if h.ejected_until is not None and now >= h.ejected_until:
                h.ejected_until = None
                h.healthy_since = now
            elif h.ejected_until is None and h.ejections > 0 and interval > 0:
                steps = math.floor((now - h.healthy_since) / interval)
                if steps > 0:
                    h.ejections = max(h.ejections - steps, 0)
                    h.healthy_since += steps * interval


__all__ = ["Candidate", "endpoints_for", "LoadBalancer", "OutlierDetector"]
