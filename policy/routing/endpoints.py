"""Endpoint choice: which workloads can serve a destination, and which one gets this request.

* ``endpoints_for``: ztunnel's filter (reference/ztunnel.md §5.5) — only healthy endpoints, that have the
  service port — narrowed by DestinationRule subset labels (subset labels ⊆ workload labels).
* ``LoadBalancer.pick``: Envoy's algorithms, weighted by ``workload.capacity`` (ztunnel's
  load-balancing weight), with retries avoiding previously tried hosts as Envoy's
  ``previous_hosts`` predicate does (``host_selection_retry_max_attempts`` reselections).
* ``OutlierDetector``: DestinationRule ``outlierDetection`` (consecutive 5xx ⇒ ejection for
  base time × ejection count, at most max-ejection-percent of hosts).
* ``locality_plan`` / ``lb_candidates``: DestinationRule ``localityLbSetting`` as istiod applies it to the
  endpoints it sends a proxy (priorities and locality weights relative to the proxy's own locality), and
  ``priority_loads``: how Envoy spreads load over those priorities by their health; ``warmup`` (Envoy slow
  start: ``slow_start_weights``). ``pick`` follows such a plan when the candidates carry one
  (``Prioritized``); plain candidates take the path they always took.
* ``service_locality_setting`` / ``strict_match``: a Service's ``loadBalancer`` (its Kubernetes traffic
  distribution, ``internalTrafficPolicy: Local``) as istiod says it to the waypoint's Envoy; ``lb_candidates``
  applies it when the DestinationRule has no localityLbSetting, with ``not_ready_for``'s endpoints counted.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from policy.inventory import Inventory, Locality, Service, Workload
from policy.inventory import LoadBalancer as ServiceLoadBalancer

from .hashing import MaglevTable, RingTable, build_table, hash64
from .model import (
    LABEL_CLUSTER, LABEL_HOSTNAME, LABEL_NETWORK, LABEL_REGION, LABEL_SUBZONE, LABEL_ZONE,
    MESH_LOCALITY_LB_DEFAULT, OUTCOME_ERRORS, HOST_SELECTION_MAX_ATTEMPTS, ConsistentHash, LocalityLbSetting,
    OutlierDetection, Outcome, TrafficPolicy, Warmup,
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
# A plain cluster's usable hosts (weight > 0) and whether their weights are equal, per candidates tuple when no
# host is ejected (``LoadBalancer.pick``): the tuples are memoised per config snapshot, so the live set is one per
# cluster (and the previous snapshot's while it drains); past this many the memo starts afresh.
PLAIN_VIEWS_MAX = 1024
# Slow-start clusters whose hosts' join times are kept (LoadBalancer.joined): one entry per warmup cluster
# (DestinationRule × subset × port) the proxy has picked from; 1 024 is far above a waypoint's scope and only
# stops a pathological config from growing it without end (the oldest is forgotten first).
JOINED_CLUSTERS_MAX = 1024
_NO_EJECTED: frozenset = frozenset()


@dataclass(frozen=True)
class Candidate:
    workload: Workload = field(compare=False)
    ip: str                        # the endpoint's IP, or its hostname when it has none (DNS ServiceEntry)
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
    return _endpoints(inventory, service, port, subset_labels, healthy=True)


def not_ready_for(inventory: Inventory, service: Service, port: int,
                  subset_labels: Mapping[str, str] | None) -> tuple[Candidate, ...]:
    """The endpoints ``endpoints_for`` leaves out only for their health (workload or endpoint status
    Unhealthy): what istiod still sends a proxy, marked UNHEALTHY, for a Service with a traffic distribution
    (``lb_candidates``), and what a ``healthPolicy: AllowAll`` Service uses as healthy."""
    return _endpoints(inventory, service, port, subset_labels, healthy=False)


def _endpoints(inventory: Inventory, service: Service, port: int, subset_labels: Mapping[str, str] | None, *,
               healthy: bool) -> tuple[Candidate, ...]:
    out = []
    for wl, ep in inventory.endpoints_of(service):
        # ztunnel: "Only healthy endpoints are used" — the workload's and the endpoint's status.
        if (wl.healthy and ep.status == "Healthy") is not healthy:
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
            if not wl.hostname:
                continue   # a network-gateway workload is not reachable from here
            # A DNS ServiceEntry endpoint: ``ip`` is its hostname, resolved when dialled (proxy/dns.py; ztunnel
            # resolve_on_demand_dns, Envoy's STRICT_DNS cluster).
            out.append(Candidate(wl, wl.hostname, target, wl.uid))
            continue
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
        # Slow start: cluster → (the candidates last seen, host key → when it joined), see ``_slow_start``.
        self.joined: dict[str, tuple[object, dict[str, float]]] = {}
        # Plain clusters: id(candidates) → (candidates, usable hosts, equal weights), see PLAIN_VIEWS_MAX.
        self.plain: dict[int, tuple] = {}

    def __repr__(self) -> str:
        return (f"<LoadBalancer round_robin_clusters={len(self.rr)} hash_tables={len(self.tables)} "
                f"hash_views={len(self.views)} slow_start_clusters={len(self.joined)}>")

    def pick(self, candidates: Sequence[Candidate], *, rng: random.Random, exclude: frozenset[str] = frozenset(),
             active_requests: Mapping[str, int] | None = None, lb: str = "LEAST_REQUEST", cluster: str = "",
             ejected: frozenset[str] | set[str] = frozenset(),
             host_selection_max_attempts: int = HOST_SELECTION_MAX_ATTEMPTS,
             consistent: ConsistentHash | None = None, hash_key: bytes | None = None,
             now: float | None = None) -> Candidate | None:
        """One host, or None when no host can be used (⇒ 503 UH, "no healthy upstream").

        ``exclude``: hosts tried by earlier attempts of this request. As Envoy's previous_hosts predicate,
        a pick that lands on one is redone up to ``host_selection_max_attempts`` times; after that the last
        pick is used (so a single-host cluster still gets its retries).

        ``consistent``: the cluster's ``consistentHash`` (then ``lb`` is not used): the host is the ring's
        or Maglev table's for ``hash_key`` (``hashing.request_hash``), a random point when ``hash_key`` is
        None. ``candidates`` is then expected to be the same (memoised) sequence from request to request:
        the table is found by its identity in O(1).

        ``now`` (monotonic seconds): only a warmup (slow start) cluster reads it; when not given such a
        cluster reads the clock itself."""
        if len(candidates) == 1:
            # One host (e.g. a one-pod subset): it, if usable — no algorithm can choose otherwise, and
            # reselection for ``exclude`` would land on it again (then Envoy uses the last pick).
            only = candidates[0]
            return only if only.key not in ejected and only.weight > 0 else None
        if consistent is not None:
            return self._pick_hashed(candidates, consistent, hash_key, rng, exclude, ejected,
                                     host_selection_max_attempts)
        if candidates.__class__ is Prioritized:
            # Locality priorities / slow start (``lb_candidates``): never a plain cluster, which skips this.
            return self._pick_prioritized(candidates, rng, exclude, active_requests, _algorithm(lb), cluster,
                                          ejected, host_selection_max_attempts, now)
        if ejected:
            usable = [c for c in candidates if c.key not in ejected and c.weight > 0]
            equal = None
        else:
            # PERF NOTE: the usable hosts and whether their weights are equal, made once per candidates tuple
            # instead of two property reads per host per pick (/tmp/s7/pick_bench.py: LoadBalancer.pick alone,
            # LEAST_REQUEST, timeit min of 7: 3 hosts 2.85 -> 1.70 us, 10 hosts 4.67 -> 1.71, 90 hosts 24.8 -> 1.67).
            view = self.plain.get(id(candidates))
            if view is None or view[0] is not candidates:
                hosts = [c for c in candidates if c.weight > 0]
                view = (candidates, hosts, len({c.weight for c in hosts}) == 1)
                if len(self.plain) >= PLAIN_VIEWS_MAX:
                    self.plain.clear()
                self.plain[id(candidates)] = view
            _, usable, equal = view
        if not usable:
            return None
        algo = _algorithm(lb)
        choice = self._pick_once(usable, rng, active_requests, algo, cluster, equal)
        for _ in range(host_selection_max_attempts):
            if choice.key not in exclude:
                break
            choice = self._pick_once(usable, rng, active_requests, algo, cluster, equal)
        return choice

    def _pick_prioritized(self, candidates: "Prioritized", rng: random.Random, exclude: frozenset[str],
                          active: Mapping[str, int] | None, algo: str, cluster: str,
                          ejected: frozenset[str] | set[str], max_attempts: int, now: float | None) -> Candidate | None:
        """Envoy's host choice over priority levels (LoadBalancerBase::chooseHostSet, then the cluster's
        algorithm within the level): outlier-ejected hosts are the unhealthy ones."""
        plan = candidates.plan
        weights = None
        if plan.warmup is not None and algo != "RANDOM":
            weights = self._slow_start(candidates, plan.warmup, cluster, time.monotonic() if now is None else now)
        if not ejected:
            healthy, loads, panic = plan.usable   # (fixed for the plan: PriorityPlan.__post_init__)
        else:
            if plan.down:
                ejected = plan.down.union(ejected)   # control-plane UNHEALTHY: as unusable as an outlier ejection
            healthy = tuple(tuple(c for c in hosts if c.key not in ejected) for hosts in plan.level_hosts)
            loads, panic = priority_loads([(len(h), len(a)) for h, a in zip(healthy, plan.level_hosts)],
                                          plan.panic_threshold_pct)
        choice = self._choose_in_plan(plan, healthy, loads, panic, rng, active, algo, cluster, weights)
        # As ``pick``: Envoy's previous_hosts predicate redoes the whole choice (priority, locality, host).
        for _ in range(max_attempts):
            if choice is None or choice.key not in exclude:
                break
            choice = self._choose_in_plan(plan, healthy, loads, panic, rng, active, algo, cluster, weights)
        return choice

    def _slow_start(self, candidates: "Prioritized", warmup: Warmup, cluster: str,
                    now: float) -> dict[str, float] | None:
        """The warming hosts' weights (``slow_start_weights``), with when each host joined this cluster kept
        here, per cluster name and host, across config reloads. Envoy (EdfLoadBalancerBase::
        recalculateHostsInSlowStart): "If there is no active HC enabled or HC has not run, start slow start
        window from current time" — for the hosts of a new cluster and for hosts added later alike; a host
        that leaves and comes back starts again."""
        entry = self.joined.get(cluster)
        if entry is None or entry[0] is not candidates:
            old = entry[1] if entry is not None else {}
            joined = {c.key: old.get(c.key, now) for c in candidates}
            if entry is None and len(self.joined) >= JOINED_CLUSTERS_MAX:
                del self.joined[next(iter(self.joined))]
            self.joined[cluster] = (candidates, joined)
        else:
            joined = entry[1]
        return slow_start_weights(candidates, joined, warmup, now)

    def _choose_in_plan(self, plan: "PriorityPlan", healthy: tuple[tuple[Candidate, ...], ...],
                        loads: tuple[int, ...], panic: tuple[bool, ...], rng: random.Random,
                        active: Mapping[str, int] | None, algo: str, cluster: str,
                        weights: dict[str, float] | None = None) -> Candidate | None:
        if not plan.levels:
            return None
        # Envoy choosePriority: "hash = hash % 100 + 1; // 1-100", then the first priority whose cumulative
        # load reaches it.
        point = rng.randrange(100) + 1
        level = len(loads) - 1
        total = 0
        for i, load in enumerate(loads):
            total += load
            if point <= total:
                level = i
                break
        if panic[level]:
            # Envoy hostSourceToUse: a priority in panic uses all its hosts, healthy or not, and no locality.
            hosts: Sequence[Candidate] = plan.level_hosts[level]
            source = f"{cluster}|P{level}|panic"
        else:
            hosts = healthy[level]
            source = f"{cluster}|P{level}"
            if plan.locality_weighted and hosts:
                group = _choose_locality(plan.levels[level], healthy[level], rng)
                if group is not None:
                    # By key, not ``in healthy[level]`` (a tuple scan with dataclass __eq__ per host: quadratic,
                    # 1.25 ms a pick at 100 hosts per locality — found by review).
                    healthy_keys = {c.key for c in healthy[level]} if len(healthy[level]) != len(
                        plan.level_hosts[level]) else None
                    hosts = list(group.hosts) if healthy_keys is None else \
                        [c for c in group.hosts if c.key in healthy_keys]
                    loc = group.locality
                    source = f"{cluster}|P{level}|{loc.region}/{loc.zone}/{loc.subzone}"
        if not hosts:
            # No healthy host and no panic (Istio's default minHealthPercent 0): "no healthy upstream".
            return None
        # Round-robin state per host source, as Envoy keeps a scheduler per priority / locality.
        if weights is not None and len(hosts) > 1:
            return self._pick_warming(hosts, weights, rng, active, algo, source)
        return self._pick_once(list(hosts), rng, active, algo, source)

    def _pick_warming(self, hosts: Sequence[Candidate], weights: Mapping[str, float], rng: random.Random,
                      active: Mapping[str, int] | None, algo: str, source: str) -> Candidate:
        """ROUND_ROBIN / LEAST_REQUEST while some host is in slow start: Envoy then always uses its EDF
        scheduler with ``hostWeight`` = weight × slow-start factor (LEAST_REQUEST: "host.weight() /
        active_request_value", then the factor). Smooth weighted round robin and a weighted draw give the
        same shares."""
        if algo == "ROUND_ROBIN":
            state = self.rr.setdefault(source, {})
            total = 0.0
            best: Candidate | None = None
            for c in hosts:
                w = weights.get(c.key, c.weight)
                cur = state.get(c.key, 0.0) + w
                state[c.key] = cur
                total += w
                if best is None or cur > state[best.key]:
                    best = c
            assert best is not None
            state[best.key] -= total
            return best
        active = active or {}
        return pick_weighted([(c, weights.get(c.key, c.weight) / (active.get(c.key, 0) + 1)) for c in hosts], rng)

    def _pick_hashed(self, candidates: Sequence[Candidate], ch: ConsistentHash, key: bytes | None,
                     rng: random.Random, exclude: frozenset[str], ejected: frozenset[str] | set[str],
                     max_attempts: int) -> Candidate | None:
        # Envoy builds the ring/table from the healthy hosts only (ThreadAwareLoadBalancerBase::refresh
        # normalizes ``host_set.healthyHosts()``; an outlier-ejected host is unhealthy), and rebuilds it on
        # every host-set or health change: so an ejected host's keys move to other hosts and come back
        # when it returns. Here: one table per usable host set, cached.
        ej = ejected if type(ejected) is frozenset else (frozenset(ejected) if ejected else _NO_EJECTED)
        h: int | None = None
        if candidates.__class__ is Prioritized:
            # A Service's traffic distribution (``lb_candidates``): Envoy's ThreadAwareLoadBalancerBase
            # chooseHost takes the priority from the same hash — ``choosePriority(h, healthy_priority_load,
            # ...)``, i.e. ``h % 100 + 1`` against the cumulative loads — then that priority's own table (built
            # from its healthy hosts, or all of them in panic). Locality weights do not enter a table here.
            plan = candidates.plan
            if not ej:
                _, loads, panic = plan.usable   # (fixed for the plan: PriorityPlan.__post_init__)
                ej = plan.down or ej            # (the table's view leaves them out)
            else:
                if plan.down:
                    ej = plan.down.union(ej)
                healthy = tuple(tuple(c for c in hosts if c.key not in ej) for hosts in plan.level_hosts)
                loads, panic = priority_loads([(len(hc), len(a)) for hc, a in zip(healthy, plan.level_hosts)],
                                              plan.panic_threshold_pct)
            if not loads:
                return None
            h = hash64(key) if key is not None else rng.getrandbits(64)
            point, level, total = h % 100 + 1, len(loads) - 1, 0
            for i, load in enumerate(loads):
                total += load
                if point <= total:
                    level = i
                    break
            candidates = plan.level_hosts[level]          # stable per plan: its table is found by identity
            if panic[level]:
                ej = _NO_EJECTED
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
        if h is None:
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
                   algo: str, cluster: str, equal: bool | None = None) -> Candidate:
        """One host of ``usable`` (never empty; not modified). ``equal``: whether their weights are all equal,
        when the caller knows (else worked out here)."""
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
        if equal if equal is not None else len({c.weight for c in usable}) == 1:
            picks = [usable[rng.randrange(len(usable))] for _ in range(LEAST_REQUEST_CHOICES)]
            return min(picks, key=lambda c: active.get(c.key, 0))
        return pick_weighted([(c, c.weight / (active.get(c.key, 0) + 1)) for c in usable], rng)


# ---------------------------------------------------------------------------------------------
# Locality load balancing: istiod's side (which priority and weight each endpoint gets, relative to the
# proxy's locality) and Envoy's side (how much load each priority gets, by health).

# Envoy ClusterLoadAssignment.Policy.overprovisioning_factor: "Defaults to 140 (in percentage, which means
# 140%)"; istiod leaves it unset. "a priority level or locality will not be considered unavailable until the
# percentage of available endpoints goes below 72%" (Envoy docs, load_balancing/overprovisioning).
OVERPROVISIONING_FACTOR_PCT = 140
# Envoy CommonLbConfig.healthy_panic_threshold default ("The default panic threshold is 50%"); Istio sets it
# to outlierDetection.minHealthPercent (default 0: panic off) whenever outlier detection is configured.
ENVOY_PANIC_THRESHOLD_DEFAULT_PCT = 50.0
# istiod applyLocalityFailover: a region other than the proxy's gets priority 3, or 4 when a ``failover``
# rule for the proxy's region names another region; priorities from failoverPriority are multiplied by 5
# ("there are at most 5 priorities can be assigned using locality failover(0-4)").
_LOCALITY_PRIORITY_SPAN = 5
# Envoy applySlowStartFactor: "std::max(std::chrono::milliseconds(1).count(), in_healthy_state_duration.count())".
SLOW_START_MIN_AGE_S = 0.001
_FAILOVER_NOT_TARGET = 4


@dataclass(frozen=True)
class LocalityGroup:
    """The hosts of one locality at one priority (Envoy's ``LocalityLbEndpoints``), with its locality
    weight (``load_balancing_weight``: the ``distribute`` weight, else the sum of its hosts' weights)."""

    locality: Locality
    weight: int
    hosts: tuple[Candidate, ...]


@dataclass(frozen=True)
class PriorityPlan:
    """What istiod's ``ApplyLocalityLoadBalancer`` makes of a cluster's endpoints for one proxy: priority
    levels (0 first), each a tuple of locality groups; ``locality_weighted`` when the cluster has Envoy's
    ``locality_weighted_lb_config``; ``panic_threshold_pct`` Envoy's ``healthy_panic_threshold``."""

    levels: tuple[tuple[LocalityGroup, ...], ...]
    locality_weighted: bool = False
    panic_threshold_pct: float = 0.0
    warmup: Warmup | None = None            # slow start within the chosen hosts (``slow_start_weights``)
    # Keys of hosts istiod sends marked UNHEALTHY (a Service with a traffic distribution: ``lb_candidates``):
    # they count in their priority's and locality's size, so their absence lowers its availability, and are
    # never picked outside panic.
    down: frozenset[str] = frozenset()
    level_hosts: tuple[tuple[Candidate, ...], ...] = field(init=False, repr=False, compare=False)
    # With no host ejected by outlier detection (the usual case): each level's usable hosts (``down`` left out)
    # and Envoy's per-priority loads and panic flags over them — fixed for the plan, so made once here rather
    # than on every pick (found by review: ~2x a pick's cost with unready hosts).
    usable: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        levels = tuple(tuple(c for g in level for c in g.hosts) for level in self.levels)
        object.__setattr__(self, "level_hosts", levels)
        down = self.down
        healthy = tuple(tuple(c for c in hosts if c.key not in down) for hosts in levels) if down else levels
        loads, panic = priority_loads([(len(h), len(a)) for h, a in zip(healthy, levels)], self.panic_threshold_pct)
        object.__setattr__(self, "usable", (healthy, loads, panic))

    @property
    def hosts(self) -> tuple[Candidate, ...]:
        """Every host of the plan, ``down`` ones included."""
        return tuple(c for hosts in self.level_hosts for c in hosts)


class Prioritized(tuple):
    """A cluster's candidates when locality load balancing applies: the hosts (so every reader of
    ``Upstream.candidates`` sees a tuple of them, as before) and the ``plan`` that ``LoadBalancer.pick``
    follows. Made once per config snapshot (``lb_candidates`` at ``_upstream_for`` time)."""

    plan: PriorityPlan

    def __new__(cls, plan: PriorityPlan) -> "Prioritized":
        down = plan.down
        self = super().__new__(cls, [c for c in plan.hosts if c.key not in down] if down else plan.hosts)
        self.plan = plan
        return self

    def __repr__(self) -> str:
        sizes = "/".join(str(len(h)) for h in self.plan.level_hosts)
        down = f" down={len(self.plan.down)}" if self.plan.down else ""
        return (f"<Prioritized hosts={len(self)} per_priority={sizes}{down} "
                f"weighted={self.plan.locality_weighted}>")


def priority_loads(health: Sequence[tuple[int, int]],
                   panic_threshold_pct: float) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Envoy's per-priority load (percent, summing to 100) and panic flags from (healthy, total) host counts
    per priority: LoadBalancerBase::recalculatePerPriorityState / recalculatePerPriorityPanic /
    recalculateLoadInTotalPanic, in the same integer arithmetic."""
    n = len(health)
    if n == 0:
        return (), ()
    # "Each priority level's health is ratio of healthy hosts to total number of hosts in a priority
    # multiplied by overprovisioning factor of 1.4 and capped at 100%."
    avail = [min(100, OVERPROVISIONING_FACTOR_PCT * h // t) if t > 0 else 0 for h, t in health]
    # "Sum of priority levels' health ... is capped at 100 and referred as normalized total availability."
    normalized = min(100, sum(avail))
    loads = [0] * n
    if normalized:
        remaining, first = 100, -1
        for i, a in enumerate(avail):      # distributeLoad
            if first < 0 and a > 0:
                first = i
            loads[i] = min(remaining, a * 100 // normalized)
            remaining -= loads[i]
        if remaining:                       # "rounding errors ... to the first available priority"
            loads[first] += remaining
    threshold = min(100, int(panic_threshold_pct + 0.5))   # PROTOBUF_PERCENT_TO_ROUNDED_INTEGER_OR_DEFAULT
    if threshold == 0 and normalized == 0:
        # "panic is disabled and there is no hosts available ... 100% is assigned to P=0 ... no traffic
        # will be routed"
        loads[0] = 100
        return tuple(loads), (False,) * n
    # "Never set panic mode if normalized total health is 100%"; else isHostSetInPanic: healthy % < threshold.
    panic = tuple(False if normalized == 100 else (100.0 * h / t if t else 0.0) < threshold for h, t in health)
    if all(panic):
        # recalculateLoadInTotalPanic: load by host count, regardless of health.
        total_hosts = sum(t for _, t in health)
        if total_hosts == 0:
            return (100,) + (0,) * (n - 1), panic
        remaining, first = 100, -1
        for i, (_, t) in enumerate(health):
            if first < 0 and t:
                first = i
            loads[i] = 100 * t // total_hosts
            remaining -= loads[i]
        loads[first] += remaining
    return tuple(loads), panic


def _choose_locality(groups: tuple[LocalityGroup, ...], healthy: tuple[Candidate, ...],
                     rng: random.Random) -> LocalityGroup | None:
    """Envoy chooseHealthyLocality: locality weight × availability, where "effective_locality_availability_ratio
    = min(1.0, (overprovisioning_factor / 100.0) * locality_availability_ratio)". Envoy walks an EDF
    schedule of these weights; a weighted draw gives the same shares. None when every weight is 0."""
    ok = {c.key for c in healthy}
    choices = []
    for g in groups:
        if not g.hosts or g.weight <= 0:
            continue
        up = sum(1 for c in g.hosts if c.key in ok)
        w = g.weight * min(1.0, OVERPROVISIONING_FACTOR_PCT / 100.0 * up / len(g.hosts))
        if w > 0:
            choices.append((g, w))
    if not choices:
        return None
    return pick_weighted(choices, rng)


def topology_labels(w: Workload) -> Mapping[str, str]:
    """A workload's labels as istiod sees them for ``failoverPriority``: its own, plus the topology labels
    istiod adds (pkg/serviceregistry/util/label AugmentLabels: region, zone, subzone, cluster, node, and the
    network "if ... out[label.TopologyNetwork.Name] == \"\"")."""
    out = dict(w.labels)
    loc = w.locality
    for name, value in ((LABEL_REGION, loc.region), (LABEL_ZONE, loc.zone), (LABEL_SUBZONE, loc.subzone),
                        (LABEL_CLUSTER, w.cluster_id), (LABEL_HOSTNAME, w.node)):
        if value:
            out[name] = value
    if w.network and not out.get(LABEL_NETWORK):
        out[LABEL_NETWORK] = w.network
    return out


def locality_matches(loc: Locality, rule: str) -> bool:
    """istiod util.LocalityMatch: ``region/zone/subzone`` with ``*`` or a missing segment matching anything
    (the region must be given or ``*``)."""
    parts = rule.split("/")
    region = parts[0]
    zone = parts[1] if len(parts) > 1 else ""
    subzone = parts[2] if len(parts) > 2 else ""
    return ((region == "*" or loc.region == region)
            and (zone in ("*", "") or loc.zone == zone)
            and (subzone in ("*", "") or loc.subzone == subzone))


def lb_priority(proxy: Locality, ep: Locality) -> int:
    """istiod util.LbPriority: "if region/zone/subZone all match, the priority is 0. if region/zone match,
    the priority is 1. if region matches, the priority is 2. if locality not match, the priority is 3." """
    if proxy.region == ep.region:
        if proxy.zone == ep.zone:
            return 0 if proxy.subzone == ep.subzone else 1
        return 2
    return 3


def _specificity(pattern: str) -> int:
    return sum(1 for part in pattern.split("/") if part != "*")


def locality_plan(candidates: Sequence[Candidate], setting: LocalityLbSetting | None, proxy: Workload | None, *,
                  outlier: OutlierDetection | None, force_failover: bool = False, down: Sequence[Candidate] = (),
                  panic_threshold_pct: float | None = None) -> PriorityPlan | None:
    """istiod's ApplyLocalityLoadBalancer (networking/core/loadbalancer/loadbalancer.go) for one cluster and
    this proxy: None when nothing changes (then ``pick`` takes its plain path).

    * ``setting`` None: the mesh default ``{enabled: true}``; ``enabled: false`` turns it off.
    * ``distribute`` (applied with or without outlier detection): the first rule whose ``from`` matches the
      proxy's locality gives each ``to`` locality its weight, split over the localities it matches by their
      own weight ("the load balancing weight for a locality is divided by the sum of the weights of all
      localities"); localities no ``to`` matches get no traffic ("remove groups of endpoints in a locality
      that miss matched"). All stay at priority 0, locality-weighted.
    * otherwise failover, only with outlier detection ("Failover needs outlier detection, otherwise Envoy
      will never drop down to a lower priority"): ``failoverPriority`` labels (first mismatch at label j of
      n ⇒ priority n − j), then — by default, or with ``failover`` also set — the locality priority
      (``lb_priority``; 4 for a region ``failover`` does not name), combined as ``label priority × 5 +
      locality priority`` and renumbered 0..N without gaps.

    ``force_failover``: failover without outlier detection (istiod's ``forceFailover``, for a Service's traffic
    distribution: ``service_locality_setting``). ``down``: hosts sent marked UNHEALTHY (``PriorityPlan.down``),
    placed like the others. ``panic_threshold_pct``: Istio's, when it sets one regardless of outlier detection.

    No proxy locality (and, for ``failoverPriority``, no proxy workload) ⇒ None: nothing to compare with."""
    if proxy is None:
        return None
    setting = setting if setting is not None else MESH_LOCALITY_LB_DEFAULT
    if setting.enabled is False:
        return None
    here = proxy.locality
    hosts = [c for c in candidates if c.weight > 0]
    if not hosts:
        return None
    down_keys = frozenset(c.key for c in down if c.weight > 0)
    if down_keys:
        hosts += [c for c in down if c.key in down_keys]
    # Envoy's default panic threshold unless Istio sets it (with outlier detection, or for a traffic distribution).
    panic = (panic_threshold_pct if panic_threshold_pct is not None
             else outlier.min_health_percent if outlier is not None else ENVOY_PANIC_THRESHOLD_DEFAULT_PCT)
    if setting.distribute:
        if not here.region:
            return None
        return replace(_distribute_plan(hosts, setting, here, panic), down=down_keys)
    if outlier is None and not force_failover:
        return None
    explicit = bool(setting.failover or setting.failover_priority)
    prio = {c.key: 0 for c in hosts}
    if setting.failover_priority:
        mine = topology_labels(proxy)
        names = [x.partition("=")[0] for x in setting.failover_priority]
        forced = {k: v for k, eq, v in (x.partition("=") for x in setting.failover_priority) if eq}
        if mine:   # istiod: "if len(proxyLabels) == 0 ... return"
            n = len(names)
            for c in hosts:
                theirs = topology_labels(c.workload)
                for j, name in enumerate(names):
                    if forced.get(name, mine.get(name, "")) != theirs.get(name, ""):
                        prio[c.key] = n - j
                        break
    if not setting.failover_priority or setting.failover:
        if here.region:
            for c in hosts:
                p = lb_priority(here, c.workload.locality)
                if p == 3:
                    for rule in setting.failover:
                        if rule.source == here.region:
                            if c.workload.locality.region != rule.to:
                                p = _FAILOVER_NOT_TARGET
                            break
                prio[c.key] = prio[c.key] * _LOCALITY_PRIORITY_SPAN + p
        elif not setting.failover_priority:
            return None
    # "Priorities should range from 0 (highest) to N (lowest) without skipping."
    ranks = {p: i for i, p in enumerate(sorted(set(prio.values())))}
    levels: list[dict[Locality, list[Candidate]]] = [{} for _ in ranks]
    for c in hosts:
        levels[ranks[prio[c.key]]].setdefault(c.workload.locality, []).append(c)
    if len(levels) == 1 and not explicit:
        # One priority, no locality weights: exactly the plain cluster (``down`` hosts, unhealthy in the only
        # priority, change nothing there: Envoy picks among the healthy ones).
        return None
    return PriorityPlan(
        tuple(tuple(LocalityGroup(loc, sum(c.weight for c in cs), tuple(cs)) for loc, cs in level.items())
              for level in levels),
        # cluster_traffic_policy.go applyLocalityLoadBalancer sets locality_weighted_lb_config when
        # "enableFailover && (localityLB.GetFailover() != nil || localityLB.GetFailoverPriority() != nil)".
        locality_weighted=explicit, panic_threshold_pct=panic, down=down_keys)


def _distribute_plan(hosts: list[Candidate], setting: LocalityLbSetting, here: Locality, panic: float) -> PriorityPlan:
    groups: dict[Locality, list[Candidate]] = {}
    for c in hosts:
        groups.setdefault(c.workload.locality, []).append(c)
    own_weight = {loc: sum(c.weight for c in cs) for loc, cs in groups.items()}
    rule = next((d for d in setting.distribute if locality_matches(here, d.source)), None)
    if rule is None:
        # No rule for this proxy: istiod leaves the weights as they are (each locality's endpoints' sum),
        # still with locality_weighted_lb_config ("localityLB.GetDistribute() != nil").
        weights = own_weight
    else:
        weights = {}
        # istiod walks ``to`` (a Go map: no order) and each pattern claims the localities not yet claimed;
        # the most specific pattern first gives the answer a user means when patterns overlap.
        order = sorted(rule.to, key=lambda kv: -_specificity(kv[0]))
        for pattern, w in order:
            matched = [loc for loc in groups if loc not in weights and locality_matches(loc, pattern)]
            total = sum(own_weight[loc] for loc in matched)
            for loc in matched:
                weights[loc] = math.ceil(own_weight[loc] * w / total)
    level = tuple(LocalityGroup(loc, weights[loc], tuple(cs)) for loc, cs in groups.items() if loc in weights)
    return PriorityPlan((level,), locality_weighted=True, panic_threshold_pct=panic)


def proxy_workload(inventory: Inventory, ip: str | None) -> Workload | None:
    """This proxy's own workload (its pod), found by its IP: where its locality and labels come from, as
    istiod takes a proxy's locality and labels from its pod (topology labels of its node)."""
    if not ip:
        return None
    w = inventory.workload_by_ip.get(ip)
    if w is None:
        try:
            norm = str(ipaddress.ip_address(ip))
        except ValueError:
            return None
        w = inventory.workload_by_ip.get(norm)
    return w


# ztunnel's LoadBalancing scopes (a Service's ``loadBalancer.routingPreferences``) as the topology labels istiod
# compares for a ``failoverPriority`` (pilot/pkg/serviceregistry/util/label AugmentLabels puts them on endpoints
# and proxies): the same closeness, said to Envoy.
SCOPE_LABELS: Mapping[str, str] = {
    "Network": LABEL_NETWORK, "Region": LABEL_REGION, "Zone": LABEL_ZONE, "Subzone": LABEL_SUBZONE,
    "Node": LABEL_HOSTNAME, "Cluster": LABEL_CLUSTER,
}


def service_locality_setting(lb: ServiceLoadBalancer | None) -> LocalityLbSetting | None:
    """The ``localityLbSetting`` istiod gives a proxy's Envoy for a Service's traffic distribution, from the
    ``loadBalancer`` the same Service has in our (ztunnel-shaped) inventory; None when it has none.

    istiod derives both from one source. For ztunnel (serviceregistry/kube/controller/ambient/services.go):
    ``PreferClose``/``PreferSameZone`` → ``{routingPreference: [NETWORK, REGION, ZONE], mode: FAILOVER}``,
    ``PreferSameNode`` → ``[NETWORK, REGION, ZONE, SUBZONE, NODE]``. For Envoy (networking/core/loadbalancer/
    loadbalancer.go GetLocalityLbSetting, used when the DestinationRule has no localityLbSetting):
    ``TrafficDistributionPreferSameZone`` → ``{enabled: true, failoverPriority: [topology.istio.io/network,
    topology.kubernetes.io/region, topology.kubernetes.io/zone]}`` ("Prefer same zone, region, network"),
    ``PreferSameNode`` → ``[network, region, zone, topology.istio.io/subzone, kubernetes.io/hostname]``. So a
    ``Failover`` loadBalancer reads back as the failoverPriority of its scopes' labels, in its order (the two
    lists above; any other list the same way). Strict, Standard and Passthrough are no traffic distribution."""
    if lb is None or lb.mode != "Failover" or not lb.routing_preferences:
        return None
    return LocalityLbSetting(enabled=True, failover_priority=tuple(SCOPE_LABELS[p] for p in lb.routing_preferences))


def strict_match(proxy: Workload | None, endpoint: Workload, scopes: Sequence[str]) -> bool:
    """A ``mode: Strict`` loadBalancer keeps only endpoints that share every scope with this proxy (ztunnel:
    "Strict drops endpoints that are not full matches"). istiod's one Strict is ``internalTrafficPolicy:
    Local`` (``{routingPreference: [NODE], mode: STRICT}``), which it says to Envoy as endpoint filtering
    (endpoint_builder.go filterIstioEndpoint: ``if b.service.Attributes.NodeLocal && ep.NodeName !=
    b.proxy.GetNodeName() { return false }``): the same test, by each scope's label. No proxy workload: its
    values are empty, as istiod's ``GetNodeName()`` of a proxy without a node."""
    mine = topology_labels(proxy) if proxy is not None else {}
    theirs = topology_labels(endpoint)
    return all(mine.get(SCOPE_LABELS[s], "") == theirs.get(SCOPE_LABELS[s], "") for s in scopes)


def cluster_candidates(inventory: Inventory, service: Service, port: int | None, subset_labels,
                       policy: TrafficPolicy, proxy: Workload | None) -> tuple[Candidate, ...]:
    """The candidates of one cluster (a service port, maybe a subset) as ``LoadBalancer.pick`` takes them at this
    proxy: ``endpoints_for``, then ``lb_candidates`` when the DestinationRule (locality settings, outlier
    detection, warmup) or the Service's ``loadBalancer`` (its traffic distribution) asks for more; else the
    plain tuple. The same for HTTP and TCP clusters (Envoy's load balancer does not care what the cluster
    carries); the caller memoises it per config snapshot."""
    candidates = endpoints_for(inventory, service, port, subset_labels)
    service_lb = service.load_balancer
    if policy.locality_lb is None and policy.outlier_detection is None and policy.warmup is None \
            and service_lb is None:
        return candidates
    unready = not_ready_for(inventory, service, port, subset_labels) if service_lb is not None else ()
    return lb_candidates(candidates, policy, proxy, service_lb=service_lb, unready=unready)


def lb_candidates(candidates: tuple[Candidate, ...], policy: TrafficPolicy, proxy: Workload | None, *,
                  service_lb: ServiceLoadBalancer | None = None,
                  unready: tuple[Candidate, ...] = ()) -> tuple[Candidate, ...]:
    """The candidates ``LoadBalancer.pick`` gets for this cluster at this proxy: ``Prioritized`` when the
    DestinationRule's locality settings (or the mesh default with outlier detection), the Service's traffic
    distribution, its warmup or an outlierDetection ``minHealthPercent`` (a panic threshold) change anything,
    else ``candidates`` itself (the plain path). Consistent hashing keeps its one table (parse.py drops
    localityLbSetting and warmup there) unless the Service has a traffic distribution: then one per priority.

    ``service_lb``: the Service's ``loadBalancer``; ``unready``: its endpoints left out only for their health
    (``not_ready_for``), read only with a ``service_lb``:

    * ``healthPolicy: AllowAll`` (istiod's for ``publishNotReadyAddresses``; Kubernetes then reports every
      endpoint ready — EndpointSlice controller ``ready := service.Spec.PublishNotReadyAddresses ||
      podutil.IsPodReady(pod)`` — so Envoy gets them healthy): they are candidates like the others.
    * ``mode: Strict``: only endpoints sharing every preferred scope with this proxy (``strict_match``).
    * ``mode: Failover`` (a traffic distribution, ``service_locality_setting``): when the DestinationRule has no
      localityLbSetting — "We follow this ordering of precedence: DR locality LB > prefer close > mesh config
      locality LB" (istio/istio#54715) — priorities by the failoverPriority labels relative to this proxy, with
      failover even without outlier detection (GetLocalityLbSetting's ``forceFailover``; endpoint_builder.go
      ``enableFailover = enableFailover || forceFailover``). Either way istiod sends the unready endpoints
      marked UNHEALTHY and sets the panic threshold to 0 (model.Service.SupportsUnhealthyEndpoints: "If they
      use the newer Kubernetes-native TrafficDistribution we don't want to require an Istio-specific outlier
      rule, and instead will use endpoint health which requires sending unhealthy endpoints";
      cluster_traffic_policy.go applyLoadBalancer: ``if svc.SupportsUnhealthyEndpoints() {
      HealthyPanicThreshold = 0 }``): they count in their priority's health (``PriorityPlan.down``), so a
      zone losing pods spills its share to the next priority as Envoy's overprovisioning factor says."""
    forced = False
    setting = policy.locality_lb
    down: tuple[Candidate, ...] = ()
    panic: float | None = None
    if service_lb is not None:
        if service_lb.health_policy == "AllowAll" and unready:
            candidates, unready = candidates + unready, ()
        if service_lb.mode == "Strict":
            prefs = service_lb.routing_preferences
            candidates = tuple(c for c in candidates if strict_match(proxy, c.workload, prefs))
            unready = ()
        distribution = service_locality_setting(service_lb)
        if distribution is not None:
            panic, down = 0.0, unready
            if setting is None:
                setting, forced = distribution, True
    if not candidates:
        return candidates
    od = policy.outlier_detection
    if policy.consistent_hash is not None:
        # The DestinationRule's locality settings and warmup stay out of a ring/Maglev cluster (parse.py drops
        # them, with a warning); a traffic distribution still gives it priorities, each priority with its own
        # table (``LoadBalancer._pick_hashed``), as Envoy's ring hash and Maglev do.
        if not forced or proxy is None:
            return candidates
        plan = locality_plan(candidates, setting, proxy, outlier=od, force_failover=True, down=down,
                             panic_threshold_pct=panic)
        return candidates if plan is None else Prioritized(plan)
    plan = None
    if proxy is not None and (setting is not None or od is not None):
        plan = locality_plan(candidates, setting, proxy, outlier=od, force_failover=forced, down=down,
                             panic_threshold_pct=panic)
    panics = od is not None and od.min_health_percent > 0 and panic is None
    if plan is None and len(candidates) > 1 and (policy.warmup is not None or panics):
        # One priority: Envoy's panic threshold (Istio: minHealthPercent, "the proxy will load balance
        # across all hosts in the pool (healthy and unhealthy)" below it) and/or slow start.
        hosts = tuple(c for c in candidates if c.weight > 0)
        plan = PriorityPlan(((LocalityGroup(Locality(), sum(c.weight for c in hosts), hosts),),),
                            panic_threshold_pct=panic if panic is not None else od.min_health_percent
                            if od is not None else ENVOY_PANIC_THRESHOLD_DEFAULT_PCT)
    if plan is not None and policy.warmup is not None:
        plan = replace(plan, warmup=policy.warmup)
    return candidates if plan is None else Prioritized(plan)


def slow_start_factor(age_s: float, warmup: Warmup) -> float:
    """Envoy EdfLoadBalancerBase::applySlowStartFactor: inside the window, ``max(applyAggressionFactor(
    time_factor), min_weight_percent)`` with ``time_factor = max(1 ms, age) / window`` and the aggression
    factor ``time_factor ^ (1 / aggression)``; 1 once the window is over."""
    if age_s >= warmup.duration_s:
        return 1.0
    time_factor = max(age_s, SLOW_START_MIN_AGE_S) / warmup.duration_s
    if warmup.aggression != 1.0:
        time_factor = time_factor ** (1.0 / warmup.aggression)
    return max(time_factor, warmup.minimum_percent / 100.0)


def slow_start_weights(hosts: Sequence[Candidate], joined: Mapping[str, float], warmup: Warmup,
                       now: float) -> dict[str, float] | None:
    """Each host's weight × its slow-start factor, or None when no host is in its window (Envoy's
    ``noHostsAreInSlowStart``: the weights are then the plain ones)."""
    out: dict[str, float] = {}
    warming = False
    for c in hosts:
        f = slow_start_factor(now - joined.get(c.key, now), warmup)
        warming = warming or f < 1.0
        out[c.key] = c.weight * f
    return out if warming else None


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
    last_seen: float = 0.0               # the last outcome recorded (OUTLIER_HOSTS_MAX evicts the longest unseen)


# Outlier detectors a proxy keeps, one per (cluster, outlierDetection settings): a config reload that renames a
# cluster or changes its settings starts a new one, so past this many the ones with no host ejected are dropped
# (their consecutive-error counts start afresh; an ejection in progress is kept).
OUTLIER_DETECTORS_MAX = 1024
# Hosts one detector remembers: pods come and go (new uids); past this many, hosts with nothing to remember (not
# ejected, no consecutive errors, no past ejection) are forgotten.
OUTLIER_HOSTS_MAX = 4096


def detector_for(detectors: dict, cluster: str, config: "OutlierDetection", now: float | None = None
                 ) -> "OutlierDetector":
    """The cluster's detector in ``detectors`` (the proxy's, shared by its HTTP and TCP paths), made on first use:
    a lookup per request, no allocation (``setdefault`` made a detector per request only to drop it). Past
    OUTLIER_DETECTORS_MAX, the detectors without a host ejected at ``now`` go (an ejection that lapsed while its
    detector sat unused counts as over), then, if that is not enough, the least recently made half."""
    key = (cluster, config)
    d = detectors.get(key)
    if d is None:
        if len(detectors) >= OUTLIER_DETECTORS_MAX:
            t = time.monotonic() if now is None else now
            for k in [k for k, v in detectors.items()
                      if not any(h.ejected_until is not None and h.ejected_until > t for h in v.hosts.values())]:
                del detectors[k]
            if len(detectors) >= OUTLIER_DETECTORS_MAX:
                for k in list(detectors)[:len(detectors) // 2]:
                    del detectors[k]
        d = detectors[key] = OutlierDetector(config)
    return d


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
        hosts = self.hosts
        st = hosts.get(host)
        if st is None:
            if len(hosts) >= OUTLIER_HOSTS_MAX:
                # Pods come and go: forget hosts down to 3/4 of the bound, the ones not ejected now first, longest
                # unseen first (a departed pod's counts are of no use; one that comes back starts afresh).
                order = sorted((h.ejected_until is not None and h.ejected_until > now, h.last_seen, k)
                               for k, h in hosts.items())
                for _, _, k in order[:len(hosts) - OUTLIER_HOSTS_MAX * 3 // 4]:
                    del hosts[k]
            st = hosts[host] = _HostState(healthy_since=now)
        st.last_seen = now
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


__all__ = ["Candidate", "endpoints_for", "LoadBalancer", "OutlierDetector", "LocalityGroup", "PriorityPlan",
           "Prioritized", "priority_loads", "locality_plan", "lb_candidates", "proxy_workload", "topology_labels",
           "locality_matches", "lb_priority", "slow_start_factor", "slow_start_weights", "not_ready_for",
           "service_locality_setting", "strict_match", "SCOPE_LABELS"]
