"""Issue 5 "Must show": the reviews waypoint started with the seed's own config (same names and IPs as
seed/waypoint-blog-2023-03-31.zh.md) prints the seed's ``proxy-config`` rows — a real ``hbone-proxy run``
subprocess, its admin endpoint, and ``hbone-proxy proxy-config`` as a user types it.

The seed's IPs (10.96.104.108, 10.244.x.x) are not on this machine: the waypoint only holds the config
(its own listeners are on a 127.x address; the service binds to it through ``--gateway``). The seed's
Envoy also had infrastructure clusters this proxy does not have (``kubernetes.default...:443``,
``sds-grpc``, ``xds-grpc``, ``zipkin`` and their endpoints); we compare every row that describes the
reviews waypoint and check that nothing else is printed. Differences from the seed, on purpose:

* clusters: the DESTINATION RULE cell reads ``reviews.default`` (current istioctl names the
  DestinationRule that made the subsets; the 2023 alpha's cluster metadata left it blank);
* endpoints: the seed's ``127.0.0.1:15000/15020`` rows are this proxy's ``--admin-addr`` /
  ``--metrics-addr`` (a 127.x address here, so parallel runs do not collide).

Tables: clusters and endpoints are compared cell by cell on the seed's columns (the seed's column
widths come from rows we do not have; tests/test_proxy_config.py proves the tabwriter is byte-exact);
listeners and routes row by row (runs of spaces collapsed: the blog's tables were hand-edited).
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.e2e.mesh import REPO, Mesh, _cli
from tests.test_proxy_config import (ROUTE, SEED_CLUSTERS, SEED_ENDPOINTS, SEED_LISTENERS, SEED_ROUTE_YAML,
                                     SEED_ROUTES, collapsed)

SEED_FIXTURES = REPO / "tests" / "fixtures" / "seed"
REVIEWS = "reviews.default.svc.cluster.local"
# Rows of the seed that belong to Envoy infrastructure this proxy does not have.
SEED_ONLY_CLUSTERS = {"kubernetes.default.svc.cluster.local", "sds-grpc", "xds-grpc", "zipkin"}


CLUSTER_COLUMNS = ("SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "DESTINATION RULE")
ENDPOINT_COLUMNS = ("ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER")


def cells(table: str, columns: tuple[str, ...]) -> list[list[str]]:
    """A tabwriter table's rows split at its header's column starts (cells are exact; no padding)."""
    lines = table.splitlines()
    starts = [lines[0].index(c) for c in columns]
    return [[line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])] for line in lines]


def _pc(admin: str, *args: str) -> str:
    r = subprocess.run(_cli() + ["proxy-config", *args, "--admin", admin], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def seed_waypoint(tmp_path_factory):
    """The seed's bookinfo-reviews waypoint, with PEM files from `certs issue` (--cert/--key/--ca)."""
    tmp = tmp_path_factory.mktemp("seed")
    mesh = Mesh(tmp, fixtures=(), extra_yaml=tuple(p.read_text() for p in sorted(SEED_FIXTURES.glob("*.yaml"))))
    try:
        prefix = tmp / "bookinfo-reviews"
        r = subprocess.run(_cli() + ["certs", "issue", "--dir", str(mesh.ca_dir), "--namespace", "default",
                                     "--service-account", "bookinfo-reviews", "--out", str(prefix)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        ip = mesh.infra(1)
        proc = mesh._start("waypoint", ip, [
            "--mode", "waypoint", "--cert", f"{prefix}-cert.pem", "--key", f"{prefix}-key.pem",
            "--ca", str(mesh.ca_dir / "root-cert.pem"), "--gateway", "default/bookinfo-reviews",
            "--hbone-addr", f"{ip}:15008"])
        mesh.waypoint = proc
        yield mesh
    finally:
        mesh.close()


def _admin(mesh: Mesh) -> str:
    return mesh.waypoint.addr("admin")


def test_listeners_are_the_seeds_rows(seed_waypoint):
    out = _pc(_admin(seed_waypoint), "listeners", "--waypoint")
    ours, seed = collapsed(out), collapsed(SEED_LISTENERS)
    assert ours[0] == seed[0] and ours[1] == seed[1] and ours[-1] == seed[-1]   # header, originate, terminate
    assert Counter(ours[2:-1]) == Counter(seed[2:-1])                           # the 10 main_internal chains
    assert len(ours) == len(seed) == 13


def test_clusters_are_the_seeds_rows_and_no_outbound(seed_waypoint):
    admin = _admin(seed_waypoint)
    ours = cells(_pc(admin, "clusters"), CLUSTER_COLUMNS)
    seed = cells(SEED_CLUSTERS, CLUSTER_COLUMNS)
    assert ours[0] == seed[0] == list(CLUSTER_COLUMNS)
    expected = [row[:5] + (["reviews.default"] if row[0] == REVIEWS else [""])
                for row in seed[1:] if row[0] not in SEED_ONLY_CLUSTERS]
    assert ours[1:] == expected
    assert [r[:5] for r in ours[1:] if r[0] == REVIEWS] == [
        [REVIEWS, "9080", subset, "inbound-vip", "EDS"] for subset in ("http", "http/v1", "http/v2", "http/v3")]
    # The seed: "no outbound clusters ... confirm with --direction outbound".
    assert _pc(admin, "clusters", "--direction", "outbound").splitlines() == [
        "SERVICE FQDN PORT SUBSET DIRECTION TYPE DESTINATION RULE"]


def test_routes_and_the_route_yaml_are_the_seeds(seed_waypoint):
    admin = _admin(seed_waypoint)
    assert collapsed(_pc(admin, "routes")) == collapsed(SEED_ROUTES)
    out = _pc(admin, "routes", "--name", ROUTE, "-o", "yaml")
    # The blog lost one leading space per line after the first; put it back, then compare exactly.
    lines = SEED_ROUTE_YAML.splitlines()
    assert out == "\n".join([lines[0]] + [" " + line for line in lines[1:]]) + "\n"
    route = yaml.safe_load(out)[0]["virtualHosts"][0]["routes"][0]["route"]
    assert route["weightedClusters"]["clusters"] == [
        {"name": f"inbound-vip|9080|http/v1|{REVIEWS}", "weight": 90},
        {"name": f"inbound-vip|9080|http/v2|{REVIEWS}", "weight": 10}]
    assert route["retryPolicy"]["numRetries"] == 2 and route["timeout"] == "0s"


def test_endpoints_are_the_seeds_rows(seed_waypoint):
    mesh = seed_waypoint
    ours = cells(_pc(_admin(mesh), "endpoints"), ENDPOINT_COLUMNS)
    seed = cells(SEED_ENDPOINTS, ENDPOINT_COLUMNS)
    assert ours[0] == seed[0] == list(ENDPOINT_COLUMNS)
    ip = mesh.infra(1)
    expected = [[cell.replace("127.0.0.1:", f"{ip}:") for cell in row] for row in seed[1:]
                if row[3] not in SEED_ONLY_CLUSTERS]
    assert ours[1:] == expected
    # Each seed pod behind its subset: v1 10.244.2.11, v2 10.244.1.6, v3 10.244.2.14.
    for pod, v in (("10.244.2.11", "v1"), ("10.244.1.6", "v2"), ("10.244.2.14", "v3")):
        assert [f"envoy://connect_originate/{pod}:9080", "HEALTHY", "OK", f"inbound-vip|9080|http/{v}|{REVIEWS}"] in ours


def test_all_has_istioctls_name_column(seed_waypoint):
    out = _pc(_admin(seed_waypoint), "all")
    tables = out.split("\n\n")
    assert len(tables) == 4
    heads = [collapsed(t)[0] for t in tables]
    assert heads == ["NAME SERVICE FQDN PORT SUBSET DIRECTION TYPE DESTINATION RULE",
                     "NAME ADDRESSES PORT MATCH DESTINATION",
                     "NAME DOMAINS MATCH VIRTUAL SERVICE",
                     "NAME ENDPOINT STATUS OUTLIER CHECK CLUSTER"]
    clusters, listeners, routes, endpoints = (collapsed(t)[1:] for t in tables)
    assert f"cluster/inbound-vip|9080|http/v1|{REVIEWS} {REVIEWS} 9080 http/v1 inbound-vip EDS reviews.default" in clusters
    assert "cluster/connect_originate connect_originate - - - ORIGINAL_DST" in clusters
    assert all(row.startswith("cluster/") for row in clusters) and len(clusters) == 9
    assert "listener/main_internal envoy://main_internal - ip=10.96.104.108 -> port=9080 Inline Route: /*" in listeners
    assert all(row.startswith("listener/") for row in listeners) and len(listeners) == 12
    assert f"route/{ROUTE} * /* reviews.default" in routes and "route/encap * /*" in routes
    assert (f"endpoint/envoy://connect_originate/10.244.1.6:9080 envoy://connect_originate/10.244.1.6:9080 HEALTHY OK "
            f"inbound-vip|9080|http/v2|{REVIEWS}") in endpoints
    assert all(row.startswith("endpoint/") for row in endpoints)


@pytest.mark.parametrize("kind", ["listeners", "clusters", "routes", "endpoints", "all"])
@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_json_and_yaml_for_each_kind(seed_waypoint, kind, fmt):
    out = _pc(_admin(seed_waypoint), kind, "-o", fmt)
    data = json.loads(out) if fmt == "json" else yaml.safe_load(out)
    dump = seed_waypoint.waypoint.config_dump()
    if kind == "all":
        assert data == {k: dump[k] for k in ("listeners", "clusters", "routes", "endpoints")}
    else:
        assert data == dump[kind] and data


def test_explain_against_the_seed_waypoint(seed_waypoint):
    r = subprocess.run(_cli() + ["explain", "--admin", _admin(seed_waypoint), "--from",
                                 "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
                                 "--to", "10.96.104.108:9080", "--path", "/reviews/1"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == f"chain       inbound-vip|9080||{REVIEWS}-http (service {REVIEWS}, protocol http)"
    assert f"route       {ROUTE} (reviews.default) rule 0" in lines
    assert "  retries 2 on connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes" in lines
    assert f"  10.244.1.6:9080 HEALTHY inbound-vip|9080|http/v2|{REVIEWS} via HBONE" in lines
    assert lines[-1] == "decision    allow"


def test_stats_on_the_seed_waypoints_admin(seed_waypoint):
    """``GET /stats`` (Envoy admin's text form) is wired in a real ``hbone-proxy run`` waypoint: per-cluster
    circuit-breaker lines once a limited cluster has been used (tests/test_circuit_breakers.py), none here
    (the seed's DestinationRules set no connectionPool limits and no request has been sent)."""
    import urllib.error
    import urllib.request
    with urllib.request.urlopen(f"http://{_admin(seed_waypoint)}/stats", timeout=10) as r:
        assert r.status == 200 and r.read() == b""   # wired (an unwired listener answers 501)
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(f"http://{_admin(seed_waypoint)}/stats?filter=%28", timeout=10)
    assert bad.value.code == 400


# ---------------------------------------------------------------------------------------------
# A node proxy (ztunnel): its /config_dump has no Envoy listeners; proxy-config shows its own view.


@pytest.fixture(scope="module")
def bookinfo_node(tmp_path_factory):
    """Bookinfo's node-a, a real ``hbone-proxy run --mode node`` with SOCKS5 and the outbound listener."""
    mesh = Mesh(tmp_path_factory.mktemp("node"))
    try:
        mesh.node_a = mesh.start_node("node-a", 1)
        yield mesh
    finally:
        mesh.close()


def _pc_fails(admin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli() + ["proxy-config", *args, "--admin", admin], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_node_listeners_table(bookinfo_node):
    """A node's listeners (one HBONE listener per local pod, then outbound and SOCKS5) as NAME ADDRESS
    WORKLOAD rows, with or without --waypoint (a node has one view); never a traceback."""
    mesh = bookinfo_node
    node = mesh.node_a
    admin, ip = node.addr("admin"), mesh.infra(1)
    out = _pc(admin, "listeners")
    assert _pc(admin, "listeners", "--waypoint") == out
    rows = collapsed(out)
    # details-v1-0 (node-a, protocol TCP) is not in the mesh: no HBONE listener of its own
    pods = [(mesh.pod(n), name) for n, name in ((10, "productpage-v1-0"), (30, "ratings-v1-0"))]
    assert rows == ["NAME ADDRESS WORKLOAD",
                    *(f"hbone {p} {p}:15008 default/{name}" for p, name in pods),
                    f"outbound {ip}:15001 -", f"socks5 {ip}:15080 -"]


def test_node_all_table_and_full_json_yaml(bookinfo_node):
    node = bookinfo_node.node_a
    admin = node.addr("admin")
    dump = node.config_dump()
    tables = _pc(admin, "all").split("\n\n")
    assert [collapsed(t)[0] for t in tables] == ["NAME ADDRESS WORKLOAD",
                                                 "NAMESPACE POD NAME ADDRESS NODE PROTOCOL",
                                                 "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS"]
    workloads, services = collapsed(tables[1])[1:], collapsed(tables[2])[1:]
    assert len(workloads) == len(dump["workloads"]) and len(services) == len(dump["services"])
    assert f"default reviews-v2-0 {bookinfo_node.pod(22)} node-b HBONE" in workloads
    assert (f"default reviews {bookinfo_node.vip(20)} default/reviews-waypoint.default.svc.cluster.local:15008 3"
            in services)
    # -o json|yaml: the full data, not the map's keys
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        listeners = load(_pc(admin, "listeners", "-o", fmt))
        assert listeners == dump["listeners"] and all(":" in a for a in listeners.values())
        everything = load(_pc(admin, "all", "-o", fmt))
        assert everything.keys() == dump.keys() and everything["local_workloads"] == dump["local_workloads"]


@pytest.mark.parametrize("kind", ["clusters", "routes", "endpoints"])
@pytest.mark.parametrize("fmt", ["table", "json"])
def test_node_envoy_kinds_say_so_in_one_line(bookinfo_node, kind, fmt):
    admin = bookinfo_node.node_a.addr("admin")
    r = _pc_fails(admin, kind, "-o", fmt)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"hbone-proxy proxy-config: {admin}: this is a node proxy (node node-a), which has no "
                        f"{kind} (a waypoint's Envoy view); try: proxy-config listeners, or proxy-config all "
                        f"[-o yaml] for its whole state\n")
