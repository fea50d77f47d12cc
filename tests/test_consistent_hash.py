"""DestinationRule ``loadBalancer.consistentHash`` (policy/routing/hashing.py, LoadBalancer.pick): parsing with
istiod's checks and exact field paths, the request's hash key as Envoy's hash policy finds it, ring hash and
Maglev host choice (stickiness, weights, minimal disruption, ejection, retries), and Envoy's generated cookie.

Everything goes through the real loader: an inventory and a DestinationRule as YAML text
(``load_text`` → ``build_mesh_config``), candidates from ``endpoints_for``, the policy from ``policy_for``.
"""

from __future__ import annotations

import random
import textwrap
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from policy.documents import load_text
from policy.errors import ConfigErrors
from policy.loader import build_mesh_config
from policy.routing import LoadBalancer, endpoints_for
from policy.routing.endpoints import CONSISTENT_TABLES_MAX
from policy.routing.hashing import (
    MAGLEV_BUILD_MAX_TABLE_SIZE, MaglevTable, RingTable, cookie_value, generate_cookie, hash_key, query_value,
    request_hash,
)
from policy.routing.model import (
    HASH_COOKIE, HASH_HEADER, HASH_QUERY, HASH_SOURCE_IP, MAGLEV, RING_HASH, ConsistentHash,
)

SERVICE = "default/web.default.svc.cluster.local"
LB = "spec.trafficPolicy.loadBalancer"
CH = f"{LB}.consistentHash"
RING = "ringHash: {minimumRingSize: 1024}"
MAGLEV_DEFAULT = "maglev: {tableSize: 65537}"


def inventory_yaml(capacities=(1, 1, 1, 1, 1), skip=()) -> str:
    """Pods web-0.. on 10.1.0.1.. (capacity = ztunnel's load-balancing weight) behind Service web."""
    out = ["workloads:"]
    for i, cap in enumerate(capacities):
        if i in skip:
            continue
        out.append(textwrap.dedent(f"""\
            - uid: Kubernetes//v1/Pod/default/web-{i}
              name: web-{i}
              namespace: default
              workloadIps: ["10.1.0.{i + 1}"]
              capacity: {cap}
              labels: {{app: web}}
              services:
                {SERVICE}: {{8080: 8080}}"""))
    out.append(textwrap.dedent("""\
        services:
        - name: web
          namespace: default
          hostname: web.default.svc.cluster.local
          vips: ["/10.96.0.50"]
          ports: {8080: 8080}"""))
    return "\n".join(out) + "\n"


def dr_yaml(consistent_hash: str, extra_lb: str = "") -> str:
    body = textwrap.indent(textwrap.dedent(consistent_hash).strip(), " " * 8)
    extra = textwrap.indent(textwrap.dedent(extra_lb).strip(), " " * 6) + "\n" if extra_lb else ""
    return ("apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            "metadata: {name: web, namespace: default}\n"
            "spec:\n  host: web.default.svc.cluster.local\n  trafficPolicy:\n    loadBalancer:\n"
            f"      consistentHash:\n{body}\n{extra}")


def load(consistent_hash: str, capacities=(1, 1, 1, 1, 1), skip=(), extra_lb: str = ""):
    """(candidates, ConsistentHash, MeshConfig) for the web service through the real loader."""
    text = inventory_yaml(capacities, skip) + "---\n" + dr_yaml(consistent_hash, extra_lb)
    mesh = build_mesh_config(load_text(text, "mesh.yaml"))
    svc = mesh.inventory.services[SERVICE]
    cands = endpoints_for(mesh.inventory, svc, 8080, None)
    (rule,) = mesh.destination_rules
    return cands, rule.policy_for(None, 8080).consistent_hash, mesh


def error_of(consistent_hash: str, extra_lb: str = "") -> str:
    with pytest.raises(ConfigErrors) as exc:
        load(consistent_hash, extra_lb=extra_lb)
    return str(exc.value)


def keys(n: int, prefix: str = "user") -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def owners(lb: LoadBalancer, cands, ch, ks, **kw) -> dict[bytes, str]:
    rng = random.Random(0)
    return {k: lb.pick(cands, rng=rng, consistent=ch, hash_key=k, **kw).workload.name for k in ks}


# ---------------------------------------------------------------------------------------------
# Parsing: the model, istiod's checks, the field paths


def test_parsed_model_header_key_defaults_to_a_1024_point_ring_as_istiod_configures_envoy():
    _, ch, mesh = load("httpHeaderName: X-User")
    assert ch == ConsistentHash(HASH_HEADER, "X-User", None, RING_HASH, 1024, 65537)
    assert ch.key_wire == b"x-user"                  # header names match lowercased
    assert not any("consistent" in w for w in mesh.warnings)   # no "not supported" warning any more


def test_parsed_model_cookie_query_source_ip_and_both_algorithms():
    _, ch, _ = load("""
        httpCookie: {name: session, path: /app, ttl: 1h30m}
        maglev: {tableSize: 65537}""")
    assert ch.key_kind == HASH_COOKIE and ch.algorithm == MAGLEV and ch.table_size == 65537
    assert (ch.cookie.name, ch.cookie.path, ch.cookie.ttl_s) == ("session", "/app", 5400.0)
    assert ch.generates_cookie and ch.table_params == (MAGLEV, 65537)
    _, ch, _ = load(f"httpQueryParameterName: user\n{RING.replace('1024', '4096')}")
    assert (ch.key_kind, ch.key_name, ch.algorithm, ch.minimum_ring_size) == (HASH_QUERY, "user", RING_HASH, 4096)
    _, ch, _ = load("useSourceIp: true\nringHash: {}")
    assert (ch.key_kind, ch.minimum_ring_size) == (HASH_SOURCE_IP, 1024)   # ringHash{} ⇒ Envoy's default
    _, ch, _ = load("httpCookie: {name: s}")
    assert ch.cookie.ttl_s is None and not ch.generates_cookie


def test_consistent_hash_follows_subset_and_port_level_overrides_and_shows_as_the_cluster_lb_policy():
    text = inventory_yaml() + "---\n" + textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: web, namespace: default}
        spec:
          host: web.default.svc.cluster.local
          trafficPolicy:
            loadBalancer: {consistentHash: {httpHeaderName: x-user}}
            portLevelSettings:
            - port: {number: 9090}
              loadBalancer: {simple: ROUND_ROBIN}
          subsets:
          - name: sticky-maglev
            labels: {app: web}
            trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 251}}}}
          - name: plain
            labels: {app: web}
            trafficPolicy: {loadBalancer: {simple: RANDOM}}
        """)
    (rule,) = build_mesh_config(load_text(text, "mesh.yaml")).destination_rules
    assert rule.policy_for(None, 8080).lb_policy == RING_HASH
    assert rule.policy_for(None, 9090).consistent_hash is None          # port level replaces wholesale
    assert rule.policy_for(None, 9090).lb_policy == "ROUND_ROBIN"
    sub = rule.policy_for("sticky-maglev", 8080)
    assert (sub.lb_policy, sub.consistent_hash.key_kind, sub.consistent_hash.table_size) == (MAGLEV, HASH_SOURCE_IP, 251)
    # simple and consistentHash are one oneof: the subset's simple replaces the top-level hash.
    assert rule.policy_for("plain", 8080).consistent_hash is None
    assert rule.policy_for("plain", 8080).lb_algorithm == "RANDOM"


@pytest.mark.parametrize("snippet,path,problem", [
    ("httpHeaderName: x-user\nuseSourceIp: true", CH,
     "only one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName may be set"),
    ("httpCookie: {ttl: 10s}", f"{CH}.httpCookie.name", "name required for HttpCookie"),
    ("httpCookie: {name: s, ttl: ten}", f"{CH}.httpCookie.ttl", "expected a duration"),
    ("httpCookie: {name: 's;x'}", f"{CH}.httpCookie.name", "cannot be in a cookie name"),
    ("httpCookie: {name: s, path: '/;Domain=evil'}", f"{CH}.httpCookie.path", "cannot be in a cookie path"),
    ("httpCookie: {name: s, color: red}", f"{CH}.httpCookie.color", "unknown field"),
    ("httpHeaderName: ''", f"{CH}.httpHeaderName", "expected a non-empty string"),
    ("httpHeaderName: \"x\\nuser\"", f"{CH}.httpHeaderName", "must not contain"),
    ("httpQueryParameterName: 'a=b'", f"{CH}.httpQueryParameterName", "cannot contain"),
    ("useSourceIp: yes-please", f"{CH}.useSourceIp", "expected true or false"),
    (f"httpHeaderName: x\n{RING}\n{MAGLEV_DEFAULT}", CH, "only one of ringHash, maglev may be set"),
    ("httpHeaderName: x\nmaglev: {}", f"{CH}.maglev.tableSize", "tableSize must be set for maglev"),
    ("httpHeaderName: x\nmaglev: {tableSize: 65536}", f"{CH}.maglev.tableSize",
     "tableSize must be a prime number for maglev"),
    ("httpHeaderName: x\nmaglev: {tableSize: 5000011}", f"{CH}.maglev.tableSize",
     "tableSize must be less than 5000011 for maglev"),
    ("httpHeaderName: x\nmaglev: {tableSize: -7}", f"{CH}.maglev.tableSize", "expected a prime number"),
    ("httpHeaderName: x\nringHash: {minimumRingSize: 8388609}", f"{CH}.ringHash.minimumRingSize",
     "expected an integer 0..8388608"),
    ("httpHeaderName: x\nringHash: {maximumRingSize: 10}", f"{CH}.ringHash.maximumRingSize", "unknown field"),
    ("httpHeaderName: x\nminimumRingSize: 2048\nmaglev: {tableSize: 251}", f"{CH}.minimumRingSize",
     "only one of minimumRingSize or maglev/ringHash can be specified"),
    ("httpHeader: x", f"{CH}.httpHeader", "unknown field"),
    ("[httpHeaderName]", CH, "expected a mapping"),
])
def test_bad_consistent_hash_names_the_field(snippet, path, problem):
    msg = error_of(snippet)
    assert f"{path}: " in msg and problem in msg, msg
    assert "DestinationRule default/web" in msg and "mesh.yaml" in msg


def test_simple_and_consistent_hash_together_is_refused():
    msg = error_of("httpHeaderName: x", extra_lb="simple: RANDOM")
    assert f"{LB}: only one of simple, consistentHash may be set" in msg


def test_warnings_deprecated_ring_size_no_key_source_ip_false_unsupported_locality_and_clipped_sizes():
    _, ch, mesh = load("httpHeaderName: x\nminimumRingSize: 2048")
    assert ch.minimum_ring_size == 2048             # still used, as istiod does
    assert any(f"{CH}.minimumRingSize: deprecated; use ringHash.minimumRingSize" in w for w in mesh.warnings)
    _, ch, mesh = load("ringHash: {}")
    assert ch.key_kind is None and any("no hash key" in w for w in mesh.warnings)
    _, ch, mesh = load("useSourceIp: false")
    assert ch.key_kind is None and any(f"{CH}.useSourceIp: false hashes nothing" in w for w in mesh.warnings)
    _, _, mesh = load("httpHeaderName: x", extra_lb="localityLbSetting: {enabled: true}")
    assert any("locality load balancing is not supported" in w for w in mesh.warnings)
    _, ch, mesh = load("httpHeaderName: x\nmaglev: {tableSize: 4999999}")
    assert ch.table_size == 4999999
    assert any(f"at most {MAGLEV_BUILD_MAX_TABLE_SIZE} slots" in w for w in mesh.warnings)


def test_retries_avoid_previous_hosts_with_consistent_hashing_only_when_the_route_asks():
    vs = textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: %s, namespace: default}
        spec:
          hosts: [web]
          http:
          - route: [{destination: {host: web}}]
            %s
        """)
    text = inventory_yaml() + "---\n" + vs % ("a", "retries: {attempts: 3}") + "---\n" + \
        vs % ("b", "retries: {attempts: 3, retryIgnorePreviousHosts: true}")
    a, b = build_mesh_config(load_text(text, "mesh.yaml")).virtual_services
    ra, rb = a.http[0].retries, b.http[0].retries
    # Istio retry.go: previous_hosts only ``if !hashPolicy``, or when retryIgnorePreviousHosts is true.
    assert ra.avoids_previous_hosts(False) and not ra.avoids_previous_hosts(True)
    assert rb.avoids_previous_hosts(False) and rb.avoids_previous_hosts(True)


# ---------------------------------------------------------------------------------------------
# The request's hash key (Envoy's hash policy)


def test_header_key_all_values_sorted_missing_is_none_empty_is_a_key():
    ch = load("httpHeaderName: X-User")[1]
    hk = lambda hs: hash_key(ch, headers=hs, query=b"", source_ip=None)   # noqa: E731
    assert hk([(b"x-user", b"alice")]) == b"alice"
    assert hk([(b"x-user", b"b"), (b"other", b"z"), (b"x-user", b"a")]) == hk([(b"x-user", b"a"), (b"x-user", b"b")])
    assert hk([(b"x-user", b"a")]) != hk([(b"x-user", b"a"), (b"x-user", b"b")])
    assert hk([(b"other", b"alice")]) is None
    assert hk([(b"x-user", b"")]) == b""          # present: Envoy hashes the empty value


def test_cookie_parsing_as_envoy_parse_cookie_value():
    hs = [(b"cookie", b"a=1; session=\"abc\" ;x"), (b"cookie", b"session=second")]
    assert cookie_value(hs, b"session") == b'"abc" '     # quotes only stripped when they wrap the value
    assert cookie_value([(b"cookie", b"  session=\"abc\"")], b"session") == b"abc"
    assert cookie_value([(b"cookie", b"x=1;session=v;session=w")], b"session") == b"v"   # first wins
    assert cookie_value([(b"cookie", b"sessionx=1"), (b"set-cookie", b"session=1")], b"session") == b""
    ch = load("httpCookie: {name: session}")[1]
    assert hash_key(ch, headers=[(b"cookie", b"session=")], query=b"", source_ip=None) is None   # empty = missing
    assert hash_key(ch, headers=[(b"cookie", b"session=42")], query=b"", source_ip=None) == b"42"


def test_query_parameter_first_value_exact_name_not_decoded():
    assert query_value(b"a=1&user=bob&user=eve", b"user") == b"bob"
    assert query_value(b"user", b"user") == b""
    assert query_value(b"User=bob&user%20x=1", b"user") is None
    assert query_value(b"user=b%20o", b"user") == b"b%20o"
    ch = load("httpQueryParameterName: user")[1]
    assert hash_key(ch, headers=[(b"user", b"x")], query=b"q=1", source_ip="10.0.0.1") is None


def test_source_ip_key_and_no_key_kinds():
    ch = load("useSourceIp: true")[1]
    assert hash_key(ch, headers=[], query=b"", source_ip="10.9.8.7") == b"10.9.8.7"
    assert hash_key(ch, headers=[], query=b"", source_ip=None) is None
    none = load("useSourceIp: false")[1]
    assert hash_key(none, headers=[(b"x", b"y")], query=b"x=1", source_ip="10.9.8.7") is None


# ---------------------------------------------------------------------------------------------
# Host choice


@pytest.mark.parametrize("algo", [RING, MAGLEV_DEFAULT])
def test_same_key_same_host_over_1000_picks(algo):
    cands, ch, _ = load(f"httpHeaderName: x-user\n{algo}")
    lb = LoadBalancer()
    for k in (b"alice", b"bob", b""):
        hosts = {lb.pick(cands, rng=random.Random(i), consistent=ch, hash_key=k).key for i in range(1000)}
        assert len(hosts) == 1, (k, hosts)
    # the same choice from a fresh balancer and a fresh load of the same config (stable hash, not hash())
    again, ch2, _ = load(f"httpHeaderName: x-user\n{algo}")
    assert LoadBalancer().pick(again, rng=random.Random(5), consistent=ch2, hash_key=b"alice").key == \
        lb.pick(cands, rng=random.Random(6), consistent=ch, hash_key=b"alice").key


@pytest.mark.parametrize("algo,tolerance", [(RING, 0.30), (MAGLEV_DEFAULT, 0.05)])
def test_keys_spread_over_hosts_by_weight(algo, tolerance):
    caps = (1, 1, 2, 2, 4)
    cands, ch, _ = load(f"httpHeaderName: x-user\n{algo}", capacities=caps)
    counts = Counter(owners(LoadBalancer(), cands, ch, keys(20_000)).values())
    for i, cap in enumerate(caps):
        expected = 20_000 * cap / sum(caps)
        # Maglev's table gives each host its weighted share of slots almost exactly; a 1 024-point ring
        # (~103 points for a weight-1 host here) is within ~10 % per host (1/sqrt(points)).
        assert abs(counts[f"web-{i}"] - expected) <= tolerance * expected, (i, counts)


def test_tables_weights_are_exact_in_slot_and_point_counts():
    hosts = [("10.1.0.1:8080", 1), ("10.1.0.2:8080", 3), ("10.1.0.3:8080", 2)]
    ring = RingTable(hosts, 1024)
    # Envoy: scale = ceil(min_w * 1024) / min_w = ceil(170.67) * 6 = 1026; running sums give 171/513/342.
    assert ring.counts == (171, 513, 342) and len(ring.ring) == 1026
    mag = MaglevTable(hosts, 65537)
    assert sum(mag.counts) == 65537
    assert [round(c / 65537 * 6, 2) for c in mag.counts] == [1.0, 3.0, 2.0]
    with pytest.raises(ValueError):
        MaglevTable(hosts, 65536)


@pytest.mark.parametrize("algo,max_moved", [(RING, 0.25), (MAGLEV_DEFAULT, 0.02)])
def test_removing_one_of_five_hosts_moves_its_keys_and_few_others(algo, max_moved):
    ks = keys(4000)
    cands, ch, _ = load(f"httpHeaderName: x-user\n{algo}")
    before = owners(LoadBalancer(), cands, ch, ks)
    cands4, ch4, _ = load(f"httpHeaderName: x-user\n{algo}", skip=(2,))       # web-2 scaled away (a reload)
    after = owners(LoadBalancer(), cands4, ch4, ks)
    on_removed = [k for k in ks if before[k] == "web-2"]
    assert on_removed and all(after[k] != "web-2" for k in on_removed)
    survivors = [k for k in ks if before[k] != "web-2"]
    moved = sum(after[k] != before[k] for k in survivors)
    # Neither Envoy algorithm is perfectly minimal: Maglev "aims for minimal disruption rather than an
    # absolute guarantee" (Envoy docs), and the ring re-scales 4 hosts to 256 points each (5 had 205),
    # so a survivor's new points take some keys from other survivors.
    assert moved <= max_moved * len(survivors), (moved, len(survivors))
    # and adding the host back restores every key's host (the table is a function of the host set)
    assert owners(LoadBalancer(), *load(f"httpHeaderName: x-user\n{algo}")[:2], ks) == before


@pytest.mark.parametrize("algo", [RING, MAGLEV_DEFAULT])
def test_missing_key_is_a_random_host_spread_over_all(algo):
    cands, ch, _ = load(f"httpHeaderName: x-user\n{algo}")
    rng = random.Random(7)
    lb = LoadBalancer()
    counts = Counter(lb.pick(cands, rng=rng, consistent=ch, hash_key=None).workload.name for _ in range(5000))
    assert set(counts) == {f"web-{i}" for i in range(5)}
    assert all(600 <= n <= 1400 for n in counts.values()), counts


@pytest.mark.parametrize("algo,max_moved", [(RING, 0.25), (MAGLEV_DEFAULT, 0.02)])
def test_ejected_host_keys_move_elsewhere_and_come_back(algo, max_moved):
    cands, ch, _ = load(f"httpHeaderName: x-user\n{algo}")
    lb = LoadBalancer()
    ks = keys(1000)
    before = owners(lb, cands, ch, ks)
    web1 = next(c.key for c in cands if c.workload.name == "web-1")
    during = owners(lb, cands, ch, ks, ejected={web1})
    assert "web-1" not in during.values()
    # Envoy rebuilds the ring/table from the healthy hosts: as for a removed host, the ejected host's keys
    # move and only a few others do.
    others = [k for k in ks if before[k] != "web-1"]
    assert sum(during[k] != before[k] for k in others) <= max_moved * len(others)
    assert owners(lb, cands, ch, ks, ejected=frozenset()) == before
    assert lb.pick(cands, rng=random.Random(0), consistent=ch, hash_key=b"a", ejected={c.key for c in cands}) is None


@pytest.mark.parametrize("algo", [RING, MAGLEV_DEFAULT])
def test_retry_exclude_walks_to_another_host_deterministically(algo):
    cands, ch, _ = load(f"httpHeaderName: x-user\n{algo}")
    lb = LoadBalancer()
    ks = keys(300)
    first = owners(lb, cands, ch, ks)
    by_name = {c.workload.name: c.key for c in cands}
    retry = {k: lb.pick(cands, rng=random.Random(1), consistent=ch, hash_key=k,
                        exclude=frozenset({by_name[first[k]]})).workload.name for k in ks}
    # Envoy: reselection ``chooseHost(h, attempt)`` up to host_selection_retry_max_attempts; it "does not
    # guarantee a different host", but with 5 reselections over 5 hosts one almost always is.
    assert sum(retry[k] != first[k] for k in ks) >= 0.97 * len(ks)
    assert retry == {k: lb.pick(cands, rng=random.Random(2), consistent=ch, hash_key=k,
                                exclude=frozenset({by_name[first[k]]})).workload.name for k in ks}


def test_tables_are_cached_per_host_set_reused_across_reloads_and_bounded():
    cands, ch, _ = load(f"httpHeaderName: x-user\n{RING}")
    lb = LoadBalancer()
    lb.pick(cands, rng=random.Random(0), consistent=ch, hash_key=b"a")
    (table,) = lb.tables.values()
    lb.pick(cands, rng=random.Random(0), consistent=ch, hash_key=b"b")
    assert list(lb.tables.values()) == [table] and len(lb.views) == 1     # the second pick built nothing
    reloaded, ch2, _ = load(f"httpHeaderName: x-user\n{RING}")             # new snapshot, same hosts
    lb.pick(reloaded, rng=random.Random(0), consistent=ch2, hash_key=b"a")
    assert list(lb.tables.values()) == [table] and len(lb.views) == 2
    fewer, ch3, _ = load(f"httpHeaderName: x-user\n{RING}", skip=(0,))     # a changed host set
    lb.pick(fewer, rng=random.Random(0), consistent=ch3, hash_key=b"a")
    assert len(lb.tables) == 2
    for n in range(CONSISTENT_TABLES_MAX + 10):                             # many host sets: bounded
        lb.pick(cands[: 2 + n % 4], rng=random.Random(0), consistent=ConsistentHash(
            HASH_HEADER, "x", minimum_ring_size=16 + n), hash_key=b"k")
    assert len(lb.tables) == CONSISTENT_TABLES_MAX
    assert f"hash_tables={CONSISTENT_TABLES_MAX}" in repr(lb)


def test_without_consistent_hash_pick_is_unchanged_and_builds_no_table():
    cands, _, _ = load(f"httpHeaderName: x-user\n{RING}")
    lb = LoadBalancer()
    a = [lb.pick(cands, rng=random.Random(3), lb="RANDOM").key for _ in range(20)]
    b = [LoadBalancer().pick(cands, rng=random.Random(3), lb="RANDOM", hash_key=b"ignored").key for _ in range(20)]
    assert a == b and not lb.tables and not lb.views


# ---------------------------------------------------------------------------------------------
# The generated cookie (httpCookie with ttl)


@pytest.mark.parametrize("algo", [RING, MAGLEV_DEFAULT])
def test_cookie_round_trip_set_cookie_value_maps_the_next_request_to_the_same_host(algo):
    cands, ch, _ = load(f"httpCookie: {{name: sticky, path: /shop, ttl: 3600s}}\n{algo}")
    lb = LoadBalancer()
    hosts = set()
    for client in range(40):
        remote = f"10.7.0.{client}:4{client:04d}"
        key, set_cookie = request_hash(ch, headers=[(b"accept", b"*/*")], query=b"", source_ip=None,
                                       remote_address=remote, local_address="10.96.0.50:8080")
        first = lb.pick(cands, rng=random.Random(client), consistent=ch, hash_key=key)
        # Envoy makeSetCookieValue: name="value"; Max-Age=<s>; Path=<p>; HttpOnly
        assert set_cookie == b'sticky="' + key + b'"; Max-Age=3600; Path=/shop; HttpOnly'
        assert len(key) == 16 and int(key, 16) >= 0
        # the browser sends it back (RFC 6265: the name=value pair, as received)
        echoed = set_cookie.split(b";")[0]
        key2, again = request_hash(ch, headers=[(b"cookie", b"lang=en; " + echoed)], query=b"", source_ip=None,
                                   remote_address="10.7.9.9:1", local_address="10.96.0.50:8080")
        assert (key2, again) == (key, None)
        assert lb.pick(cands, rng=random.Random(client + 99), consistent=ch, hash_key=key2) == first
        hosts.add(first.key)
    assert len(hosts) >= 3          # different clients get different cookies, spread over the hosts


def test_cookie_session_ttl_attributes_and_no_ttl():
    _, ch, _ = load("httpCookie: {name: s, ttl: 0s, attributes: [{name: SameSite, value: Strict}, {name: Secure}]}")
    value, header = generate_cookie(ch, remote_address="1.2.3.4:5", local_address="6.7.8.9:10")
    assert header == b's="' + value + b'"; SameSite=Strict; Secure; HttpOnly'    # ttl 0: a session cookie
    # the value is the downstream connection's hash (Envoy: remote + local address), not the host's
    assert generate_cookie(ch, remote_address="1.2.3.4:5", local_address="6.7.8.9:10")[0] == value
    assert generate_cookie(ch, remote_address="1.2.3.4:6", local_address="6.7.8.9:10")[0] != value
    _, ch, _ = load("httpCookie: {name: s, ttl: 2.9s}")
    assert b"Max-Age=2;" in generate_cookie(ch, remote_address="a", local_address="b")[1]   # whole seconds
    _, ch, _ = load("httpCookie: {name: s}")
    assert request_hash(ch, headers=[], query=b"", source_ip="1.2.3.4", remote_address="x", local_address="y") \
        == (None, None)          # without ttl a missing cookie is no hash, and nothing is generated
    with pytest.raises(ValueError):
        generate_cookie(ch, remote_address="x", local_address="y")


# ---------------------------------------------------------------------------------------------
# Arbitrary request bytes never raise

_CHS = None


def _all_kinds():
    global _CHS
    if _CHS is None:
        _CHS = [load(s) for s in ("httpHeaderName: x-user", "httpCookie: {name: s, ttl: 10s}",
                                  "httpQueryParameterName: q\nmaglev: {tableSize: 251}", "useSourceIp: true")]
    return _CHS


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers=st.lists(st.tuples(st.sampled_from([b"x-user", b"cookie", b"q", b"other"]) | st.binary(max_size=8),
                                  st.binary(max_size=40)), max_size=6),
       query=st.binary(max_size=60), ip=st.none() | st.text(max_size=20), rng_seed=st.integers(0, 9))
def test_hash_key_and_pick_never_raise_on_arbitrary_bytes(headers, query, ip, rng_seed):
    lb = LoadBalancer()
    for cands, ch, _ in _all_kinds():
        key, set_cookie = request_hash(ch, headers=headers, query=query, source_ip=ip,
                                       remote_address=ip or "", local_address="10.96.0.50:8080")
        assert key is None or isinstance(key, bytes)
        assert set_cookie is None or set_cookie.endswith(b"; HttpOnly")
        c = lb.pick(cands, rng=random.Random(rng_seed), consistent=ch, hash_key=key)
        assert c in cands


_LEAF = st.none() | st.booleans() | st.integers(-3, 10_000_000) | st.floats(allow_nan=False) | \
    st.text(max_size=12) | st.sampled_from(["10s", "0s", "x-user", "session", "/a;b", "1h", "65537"])
_FIELDS = ["httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName", "ringHash", "maglev",
           "minimumRingSize", "name", "path", "ttl", "attributes", "tableSize", "value", "bogus"]
_VALUE = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3) |
                      st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(spec=st.dictionaries(st.sampled_from(_FIELDS), _VALUE, max_size=4))
def test_parser_only_config_errors_escape_for_any_consistent_hash_value(spec):
    from policy.errors import ConfigError, Where
    from policy.routing import parse_destination_rule
    doc = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"host": "web", "trafficPolicy": {"loadBalancer": {"consistentHash": spec}}}}
    try:
        rule = parse_destination_rule(doc, Where("mesh.yaml", 1))
    except ConfigError as e:
        assert str(e).startswith("mesh.yaml") and "spec.trafficPolicy.loadBalancer" in str(e)
        return
    ch = rule.traffic_policy.consistent_hash
    assert isinstance(ch, ConsistentHash) and ch.algorithm in (RING_HASH, MAGLEV)
