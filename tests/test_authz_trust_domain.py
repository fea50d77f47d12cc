"""Trust domain aliases: istiod's principal rewriting for a waypoint (policy/authz/trust_domain.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from policy.authz.trust_domain import expand_trust_domains, replace_trust_domain_aliases
from policy.mesh import load_mesh_config
from policy.scope import WaypointScope
from proxy.pipeline.authz import l7_decision
from proxy.pipeline.chains import match_chain
from proxy.run import UsageError, parse_settings
from proxy.snapshot import build_snapshot

FIX = Path(__file__).parent / "fixtures"

# istio/istio pilot/pkg/security/trustdomain/bundle_test.go TestReplaceTrustDomainAliases, every case:
# (local trust domain, aliases, principals, expected).
ISTIO_CASES = [
    ("cluster.local", [], ["cluster.local/ns/foo/sa/bar"], ["cluster.local/ns/foo/sa/bar"]),
    ("cluster.local", [], ["*"], ["*"]),
    ("cluster.local", [], ["*/ns/foo/sa/bar"], ["*/ns/foo/sa/bar"]),
    ("td2", ["td1"], ["td1/ns/foo/sa/bar"], ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"]),
    ("td1", ["cluster.local"], ["cluster.local/ns/foo/sa/bar", "cluster.local/ns/yyy/sa/zzz"],
     ["td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar", "td1/ns/yyy/sa/zzz", "cluster.local/ns/yyy/sa/zzz"]),
    ("td1", ["cluster.local"], ["*/ns/foo/sa/bar", "*sa/zzz", "*"], ["*/ns/foo/sa/bar", "*sa/zzz", "*"]),
    ("td2", ["td1", "cluster.local"], ["cluster.local/ns/foo/sa/bar", "td1/ns/yyy/sa/zzz"],
     ["td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar",
      "td2/ns/yyy/sa/zzz", "td1/ns/yyy/sa/zzz", "cluster.local/ns/yyy/sa/zzz"]),
    ("td2", ["foo-td1", "cluster.local"], ["*-td1/ns/foo/sa/bar"],
     ["td2/ns/foo/sa/bar", "*-td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar"]),
    ("td1", ["td2"], ["some-td/ns/foo/sa/bar"], ["some-td/ns/foo/sa/bar"]),
    ("td1", ["td2", "some-td"], ["some-td/ns/foo/sa/bar"],
     ["td1/ns/foo/sa/bar", "td2/ns/foo/sa/bar", "some-td/ns/foo/sa/bar"]),
    ("new-td", ["td2", "td3"], ["td1/ns/some-ns/sa/some-sa", "td2/ns/foo/sa/bar"],
     ["td1/ns/some-ns/sa/some-sa", "new-td/ns/foo/sa/bar", "td2/ns/foo/sa/bar", "td3/ns/foo/sa/bar"]),
]


@pytest.mark.parametrize("td, aliases, principals, expected", ISTIO_CASES)
def test_istio_bundle_cases(td, aliases, principals, expected):
    assert replace_trust_domain_aliases(principals, [td, *aliases]) == expected


def test_cluster_local_points_at_the_local_trust_domain_without_aliases():
    assert replace_trust_domain_aliases(["cluster.local/ns/a/sa/b"], ["example.org"]) == ["example.org/ns/a/sa/b"]
    assert replace_trust_domain_aliases(["other.org/ns/a/sa/b"], ["example.org"]) == ["other.org/ns/a/sa/b"]
    assert expand_trust_domains(["old-td", "x"], ["new-td", "old-td"]) == ["new-td", "old-td", "x"]


@given(st.lists(st.text(alphabet="ab*/.-", max_size=16), max_size=4))
def test_default_bundle_only_rewrites_principals_that_name_cluster_local_by_pattern(principals):
    """With Istio's default (cluster.local, no aliases) a principal either stays as written or its trust
    domain becomes exactly cluster.local: nothing is dropped and the count never grows."""
    out = replace_trust_domain_aliases(principals, ["cluster.local"])
    assert len(out) == len(principals)
    for before, after in zip(principals, out):
        assert after == before or after == "cluster.local/" + before.split("/", 1)[1]


def _scope():
    return WaypointScope.parse("default", gateway="default/reviews-waypoint", address_ip="127.1.0.100")


def _decide(snap, principal: str) -> bool:
    chain = match_chain(("127.2.0.20", 9080), snap).resolved("http")
    return l7_decision(chain, snap, "127.1.0.10", principal, method="GET", path="/", host="reviews",
                       headers={}).allowed


def test_waypoint_matches_cluster_local_policies_in_its_own_trust_domain():
    """The bookinfo policy names cluster.local/ns/default/sa/bookinfo-productpage. In a mesh whose trust
    domain is example.org, the waypoint admits example.org's productpage (Istio: cluster.local is "a
    pointer to the local trust domain"); node mode does not rewrite (ztunnel's converter: "TODO: TDA")."""
    mesh = load_mesh_config([str(FIX / "bookinfo")])
    snap = build_snapshot(mesh, mode="waypoint", scope=_scope(), version=1, now=0, trust_domains=("example.org",))
    assert _decide(snap, "spiffe://example.org/ns/default/sa/bookinfo-productpage")
    assert not _decide(snap, "spiffe://example.org/ns/default/sa/bookinfo-reviews")
    plain = build_snapshot(mesh, mode="waypoint", scope=_scope(), version=1, now=0)
    assert not _decide(plain, "spiffe://example.org/ns/default/sa/bookinfo-productpage")
    node = build_snapshot(mesh, mode="node", scope=None, version=1, now=0, trust_domains=("example.org",))
    assert node.mesh.authorization_policies == mesh.authorization_policies


MIGRATION_POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-old-td, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - from:
    - source:
        notPrincipals: ["old-td/ns/default/sa/bookinfo-productpage", "old-td/ns/default/sa/bookinfo-reviews"]
"""


def test_trust_domain_migration_with_an_alias(tmp_path):
    """Istio's trust domain migration task: policies written for old-td keep working after the mesh moved
    to new-td with old-td as an alias — notPrincipals included."""
    conf = tmp_path / "conf"
    shutil.copytree(FIX / "bookinfo", conf)
    (conf / "migration.yaml").write_text(MIGRATION_POLICY)
    mesh = load_mesh_config([str(conf)])
    snap = build_snapshot(mesh, mode="waypoint", scope=_scope(), version=1, now=0, trust_domains=("new-td", "old-td"))
    assert _decide(snap, "spiffe://new-td/ns/default/sa/bookinfo-productpage")
    assert _decide(snap, "spiffe://old-td/ns/default/sa/bookinfo-productpage")
    assert not _decide(snap, "spiffe://new-td/ns/default/sa/sleep")
    without = build_snapshot(mesh, mode="waypoint", scope=_scope(), version=1, now=0, trust_domains=("new-td",))
    # Without the alias the DENY's notPrincipals name nobody in new-td: everyone is denied.
    assert not _decide(without, "spiffe://new-td/ns/default/sa/bookinfo-productpage")


def test_trust_domain_aliases_flag():
    base = ["--mode", "waypoint", "--config", "x"]
    assert parse_settings(base).trust_domain_aliases == ()
    s = parse_settings(base + ["--trust-domain-aliases", "old-td, older.example ,old-td"])
    assert s.trust_domain_aliases == ("old-td", "older.example")
    env = parse_settings(base, environ={"HBONE_PROXY_TRUST_DOMAIN_ALIASES": "a.b"})
    assert env.trust_domain_aliases == ("a.b",)
    with pytest.raises(UsageError, match="--trust-domain-aliases"):
        parse_settings(base + ["--trust-domain-aliases", "Bad Domain"])
