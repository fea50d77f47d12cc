"""policy.scope: a waypoint keeps only its scope; node proxies their node's workloads; the seed's
configuration-scaling table (12 500 vs 100, 0.8 %) counted on generated meshes."""

from __future__ import annotations

import os

import pytest
import yaml

from policy.mesh import load_mesh_config
from policy.scope import (
    MeshShape,
    WaypointScope,
    config_scaling,
    host_matches,
    node_scope,
    resolve_host,
    scope_for_waypoint,
    synthetic_mesh,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
BOOKINFO = os.path.join(FIXTURES, "bookinfo")
SHOP = os.path.join(FIXTURES, "shop")
MESH_WIDE = os.path.join(FIXTURES, "mesh-wide-policy.yaml")

REVIEWS_WAYPOINT = WaypointScope(address_ip="127.1.0.100", gateway=("default", "reviews-waypoint"), namespace="default")
SHOP_WAYPOINT = WaypointScope(address_ip="127.3.0.100", gateway=("shop", "waypoint"), namespace="shop")


@pytest.fixture(scope="module")
def mesh():
    return load_mesh_config([BOOKINFO, SHOP, MESH_WIDE])


def names(objs) -> list[str]:
    return sorted(f"{o.namespace}/{o.name}" for o in objs)


def test_whole_mesh_has_both_namespaces(mesh):
    assert set(mesh.namespaces) == {"default", "shop", "istio-system"}
    assert len(mesh.inventory.workloads) == 11 and len(mesh.authorization_policies) == 7


def test_reviews_waypoint_keeps_only_reviews(mesh):
    s = scope_for_waypoint(mesh, REVIEWS_WAYPOINT)
    assert list(s.inventory.services) == ["default/reviews.default.svc.cluster.local"]
    assert sorted(w.name for w in s.inventory.workloads.values()) == ["reviews-v1-0", "reviews-v2-0", "reviews-v3-0"]
    # endpoints come through, with the per-version services the workloads also belong to trimmed away
    reviews = s.inventory.services["default/reviews.default.svc.cluster.local"]
    assert [w.name for w, _ in s.inventory.endpoints_of(reviews)] == ["reviews-v1-0", "reviews-v2-0", "reviews-v3-0"]
    assert all(list(w.services) == ["default/reviews.default.svc.cluster.local"] for w in s.inventory.workloads.values())
    assert set(s.inventory.endpoints) == {"default/reviews.default.svc.cluster.local"}
    # targetRefs policies only: the reviews Service's and the mesh-wide GatewayClass one; the selector
    # policy (ratings) and root-namespace policy without targetRefs are node-proxy policies.
    assert names(s.authorization_policies) == ["default/reviews-allow-productpage", "istio-system/waypoints-deny-blocked"]
    # the reviews VS (short host "reviews" resolved in its namespace), not the ingress-bound productpage VS
    assert names(s.virtual_services) == ["default/reviews"]
    assert names(s.destination_rules) == ["default/reviews"]
    assert names(s.gateways) == ["default/reviews-waypoint"]
    assert s.http_routes == ()
    assert repr(s) == ("<MeshConfig Workload=3 Service=1 AuthorizationPolicy=2 VirtualService=1 DestinationRule=1 "
                       "Gateway=1>")


def test_other_namespaces_services_endpoints_and_policies_are_absent(mesh):
    s = scope_for_waypoint(mesh, REVIEWS_WAYPOINT)
    everything = (list(s.inventory.services.values()) + list(s.inventory.workloads.values())
                  + list(s.authorization_policies) + list(s.virtual_services) + list(s.destination_rules)
                  + list(s.http_routes) + list(s.gateways))
    assert all(o.namespace in ("default", "istio-system") for o in everything)
    assert not any(ip.startswith("127.3.") for ip in s.inventory.workload_by_ip)
    assert not any(vip.startswith("127.4.") for vip in s.inventory.service_by_vip)
    assert "shop" not in repr(s.counts_by_namespace())

    t = scope_for_waypoint(mesh, SHOP_WAYPOINT)
    assert sorted(t.inventory.services) == ["shop/cart.shop.svc.cluster.local", "shop/payments.shop.svc.cluster.local"]
    assert sorted(w.name for w in t.inventory.workloads.values()) == ["cart-v1-0", "cart-v2-0", "payments-0"]
    assert names(t.authorization_policies) == [
        "istio-system/waypoints-deny-blocked", "shop/cart-allow-get", "shop/shop-waypoint-deny-delete"]
    assert names(t.virtual_services) == ["shop/cart"] and names(t.destination_rules) == ["shop/cart"]
    assert names(t.gateways) == ["shop/waypoint"]
    assert not any(w.namespace == "default" for w in t.inventory.workloads.values())
    # the ztunnel-format Namespace policy of shop is a node-proxy policy
    assert "shop/shop-deny-9999" not in names(t.authorization_policies)


def test_scope_by_ip_alone_and_by_gateway_alone():
    mesh = load_mesh_config([BOOKINFO, SHOP])
    by_ip = scope_for_waypoint(mesh, WaypointScope(address_ip="127.3.0.100", namespace="shop"))
    assert len(by_ip.inventory.services) == 2
    # Services name the shop waypoint by IP: its Gateway alone does not bind them.
    by_gw = scope_for_waypoint(mesh, WaypointScope(gateway=("shop", "waypoint"), namespace="shop"))
    assert len(by_gw.inventory.services) == 0
    # reviews names its waypoint by hostname: the address alone does not bind it.
    assert len(scope_for_waypoint(mesh, WaypointScope(address_ip="127.1.0.100", namespace="default")).inventory.services) == 0


def test_waypoint_never_takes_services_outside_its_namespace():
    mesh = load_mesh_config([BOOKINFO, SHOP])
    wrong_ns = scope_for_waypoint(mesh, WaypointScope(address_ip="127.3.0.100", namespace="default"))
    assert len(wrong_ns.inventory.services) == 0 and len(wrong_ns.inventory.workloads) == 0


def test_workload_with_its_own_waypoint_is_kept_for_pod_ip_traffic(tmp_path):
    # Services without a waypoint; only cart-v1-0 names the shop waypoint itself (the seed's
    # direct-tcp / direct-http chains on its pod IP).
    doc = yaml.safe_load(open(os.path.join(SHOP, "inventory.yaml")))
    for svc in doc["services"]:
        svc.pop("waypoint")
    f = tmp_path / "inv.yaml"
    f.write_text(yaml.safe_dump(doc))
    s = scope_for_waypoint(load_mesh_config([str(f)]), WaypointScope(address_ip="127.3.0.100", namespace="shop"))
    assert list(s.inventory.workload_by_ip) == ["127.3.0.11"]
    assert len(s.inventory.services) == 0
    # its service memberships are out of scope, so they are trimmed (no endpoint leaks in)
    assert dict(s.inventory.workloads["Kubernetes//v1/Pod/shop/cart-v1-0"].services) == {}


def test_service_account_scope_keeps_only_that_accounts_services_and_endpoints():
    mesh = load_mesh_config([os.path.join(SHOP, "inventory.yaml")])
    cart_sa = scope_for_waypoint(mesh, WaypointScope(address_ip="127.3.0.100", namespace="shop", service_account="cart"))
    assert list(cart_sa.inventory.services) == ["shop/cart.shop.svc.cluster.local"]
    assert sorted(w.service_account for w in cart_sa.inventory.workloads.values()) == ["cart", "cart"]
    pay_sa = scope_for_waypoint(mesh, WaypointScope(address_ip="127.3.0.100", namespace="shop", service_account="payments"))
    assert list(pay_sa.inventory.services) == ["shop/payments.shop.svc.cluster.local"]
    assert [w.name for w in pay_sa.inventory.workloads.values()] == ["payments-0"]
    nobody = scope_for_waypoint(mesh, WaypointScope(address_ip="127.3.0.100", namespace="shop", service_account="ghost"))
    assert len(nobody.inventory.services) == 0 and len(nobody.inventory.workloads) == 0


def test_seed_bookinfo_reviews_service_account_waypoint():
    # The seed's waypoint serves the bookinfo-reviews service account.
    mesh = load_mesh_config([BOOKINFO])
    s = scope_for_waypoint(mesh, WaypointScope(gateway=("default", "reviews-waypoint"), namespace="default",
                                               service_account="bookinfo-reviews"))
    assert list(s.inventory.services) == ["default/reviews.default.svc.cluster.local"]
    assert {w.service_account for w in s.inventory.workloads.values()} == {"bookinfo-reviews"}


def test_httproute_scope_keeps_route_and_its_backend_services():
    mesh = load_mesh_config([os.path.join(BOOKINFO, "inventory.yaml"), os.path.join(FIXTURES, "bookinfo-httproute.yaml")])
    s = scope_for_waypoint(mesh, REVIEWS_WAYPOINT)
    assert names(s.http_routes) == ["default/reviews"]
    # istiod filterWaypointOutboundServices: the services the routes send to, with their endpoints
    assert sorted(s.inventory.services) == [
        "default/reviews-v1.default.svc.cluster.local", "default/reviews-v2.default.svc.cluster.local",
        "default/reviews.default.svc.cluster.local"]
    v1 = s.inventory.services["default/reviews-v1.default.svc.cluster.local"]
    assert [w.name for w, _ in s.inventory.endpoints_of(v1)] == ["reviews-v1-0"]
    # the shop namespace's waypoint sees no bookinfo route
    assert scope_for_waypoint(mesh, SHOP_WAYPOINT).http_routes == ()


def test_vs_from_a_third_namespace_is_ignored(tmp_path):
    f = tmp_path / "vs.yaml"
    f.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: sneaky, namespace: shop}\n"
        "spec:\n  hosts: [reviews.default.svc.cluster.local]\n  http:\n  - route:\n    - destination: {host: reviews.default.svc.cluster.local}\n")
    mesh = load_mesh_config([BOOKINFO, SHOP, str(f)])
    # Istio: waypoints take VirtualServices from the service's namespace or the waypoint's (§2.1)
    assert names(scope_for_waypoint(mesh, REVIEWS_WAYPOINT).virtual_services) == ["default/reviews"]


def test_node_scope(mesh):
    assert [w.name for w in node_scope(mesh, "node-b")] == ["reviews-v1-0", "reviews-v2-0", "reviews-v3-0"]
    assert {w.name for w in node_scope(mesh, "node-c")} == {"cart-v1-0", "cart-v2-0", "payments-0", "waypoint-0"}
    assert node_scope(mesh, "nowhere") == ()


@pytest.mark.parametrize("host, ns, resolved", [
    ("reviews", "default", "reviews.default.svc.cluster.local"),
    ("Reviews", "shop", "reviews.shop.svc.cluster.local"),
    ("reviews.default", "x", "reviews.default"),      # has a dot: taken as written (Istio)
    ("*", "x", "*"),
    ("*.default.svc.cluster.local", "x", "*.default.svc.cluster.local"),
])
def test_resolve_host_like_istio(host, ns, resolved):
    assert resolve_host(host, ns) == resolved


def test_host_matches_wildcards():
    assert host_matches("*", "a.b")
    assert host_matches("*.default.svc.cluster.local", "reviews.default.svc.cluster.local")
    assert not host_matches("*.default.svc.cluster.local", "reviews.shop.svc.cluster.local")
    assert not host_matches("reviews.default", "reviews.default.svc.cluster.local")


def test_scope_parse_from_flags():
    assert WaypointScope.parse("default/bookinfo-reviews", gateway="default/wp") == WaypointScope(
        gateway=("default", "wp"), namespace="default", service_account="bookinfo-reviews")
    with pytest.raises(ValueError):
        WaypointScope.parse("default", gateway="nope")
    with pytest.raises(ValueError):
        WaypointScope.parse("/sa")


# --- the seed's table -----------------------------------------------------------------------

def test_seed_configuration_scaling_12500_vs_100():
    table = config_scaling(MeshShape(namespaces=2, deployments=25, pods=10, waypoint_replicas=2))
    assert [(r.sidecars, r.configs_per_sidecar, r.waypoints, r.configs_per_waypoint) for r in table.rows] == [
        (250, 25, 2, 25), (250, 25, 2, 25)]
    assert table.sidecar_total == 12_500
    assert table.waypoint_total == 100
    assert round(table.ratio * 100, 1) == 0.8
    lines = table.table().splitlines()
    assert "25 configurations * 250 sidecars" in lines[1] and lines[1].rstrip().endswith("12500")
    assert "25 configurations * 2 waypoints" in lines[2] and lines[2].rstrip().endswith("100")
    assert lines[3].rstrip().endswith("0.8%")


def test_seed_figure_2x2_is_16_vs_4():
    # "4 workloads, each with 4 sets of configuration ... 16 in total"; waypoints send "only 25 %"
    t = config_scaling(MeshShape(namespaces=2, deployments=2, pods=1, waypoint_replicas=1), sidecar_visibility="mesh")
    assert (t.sidecar_total, t.waypoint_total, t.ratio) == (16, 4, 0.25)


def test_each_generated_waypoint_holds_only_its_namespace():
    mesh = synthetic_mesh(MeshShape(namespaces=3, deployments=4, pods=2, waypoint_replicas=1))
    for n in (1, 2, 3):
        s = scope_for_waypoint(mesh, WaypointScope(gateway=(f"ns-{n}", "waypoint"), namespace=f"ns-{n}"))
        assert {x.namespace for x in s.inventory.services.values()} == {f"ns-{n}"}
        assert len(s.inventory.services) == 4 and len(s.inventory.workloads) == 8
