"""Shared builders for the routing tests (no tests here): a bookinfo-like mesh and resource documents."""

from __future__ import annotations

from types import MappingProxyType

from policy.errors import Where
from policy.inventory import Endpoint, Inventory, NetworkAddress, Service, Workload
from policy.routing import (
    HttpRequestView, build_route_table, parse_destination_rule, parse_http_route, parse_virtual_service,
)

NS = "default"


def svc(name: str, ns: str = NS, ports: dict | None = None, vip: str = "10.96.0.1") -> Service:
    return Service(name=name, namespace=ns, hostname=f"{name}.{ns}.svc.cluster.local",
                   vips=(NetworkAddress("", vip),), ports=MappingProxyType(ports or {9080: 9080}))


def wl(name: str, ip: str, services: dict, labels: dict | None = None, capacity: int = 1,
       status: str = "Healthy", ns: str = NS) -> Workload:
    return Workload(uid=f"cluster1//v1/Pod/{ns}/{name}", name=name, namespace=ns, workload_ips=(ip,),
                    labels=MappingProxyType(labels or {}), capacity=capacity, status=status,
                    services=MappingProxyType({k: MappingProxyType(v) for k, v in services.items()}))


REVIEWS = svc("reviews", vip="10.96.0.10")
REVIEWS_V1 = svc("reviews-v1", vip="10.96.0.11")
REVIEWS_V2 = svc("reviews-v2", vip="10.96.0.12")
RATINGS = svc("ratings", vip="10.96.0.20")
MULTI = svc("multi", ports={80: 8080, 9090: 9091}, vip="10.96.0.30")
H = "default/reviews.default.svc.cluster.local"


def inventory() -> Inventory:
    host = {"reviews": "default/reviews.default.svc.cluster.local",
            "v1": "default/reviews-v1.default.svc.cluster.local",
            "v2": "default/reviews-v2.default.svc.cluster.local"}
    workloads = [
        wl("reviews-v1-0", "10.0.1.1", {host["reviews"]: {9080: 9080}, host["v1"]: {9080: 9080}},
           {"app": "reviews", "version": "v1"}),
        wl("reviews-v2-0", "10.0.1.2", {host["reviews"]: {9080: 9080}, host["v2"]: {9080: 9080}},
           {"app": "reviews", "version": "v2"}, capacity=3),
        wl("reviews-v3-0", "10.0.1.3", {host["reviews"]: {9080: 9080}},
           {"app": "reviews", "version": "v3"}, status="Unhealthy"),
        wl("ratings-0", "10.0.2.1", {"default/ratings.default.svc.cluster.local": {9080: 9080}}, {"app": "ratings"}),
        wl("multi-0", "10.0.3.1", {"default/multi.default.svc.cluster.local": {80: 8080}}, {"app": "multi"}),
    ]
    services = [REVIEWS, REVIEWS_V1, REVIEWS_V2, RATINGS, MULTI]
    # an explicit endpoint from the service map, as ztunnel's file allows
    return Inventory.build(workloads, services)


def doc(kind: str, spec: dict, name: str = "r", ns: str = NS, api: str | None = None) -> dict:
    api = api or ("gateway.networking.k8s.io/v1" if kind in ("HTTPRoute", "Gateway") else "networking.istio.io/v1")
    return {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec}


def vs(spec: dict, name: str = "reviews", ns: str = NS, order: int = 0):
    return parse_virtual_service(doc("VirtualService", spec, name, ns), Where("test.yaml"), order=order)


def dr(spec: dict, name: str = "reviews", ns: str = NS, order: int = 0):
    return parse_destination_rule(doc("DestinationRule", spec, name, ns), Where("test.yaml"), order=order)


def hr(spec: dict, name: str = "reviews", ns: str = NS, order: int = 0):
    return parse_http_route(doc("HTTPRoute", spec, name, ns), Where("test.yaml"), order=order)


SUBSETS_DR = {"host": "reviews", "subsets": [
    {"name": "v1", "labels": {"version": "v1"}},
    {"name": "v2", "labels": {"version": "v2"}},
    {"name": "v3", "labels": {"version": "v3"}},
]}


def table(vss=(), drs=(), hrs=(), services=None, waypoint_namespace: str = NS, gateway=None, inv=None):
    inv = inv or inventory()
    services = services if services is not None else list(inv.services.values())
    return build_route_table(inv, services, vss, drs, hrs, waypoint_namespace=waypoint_namespace, gateway=gateway)


def req(path: str = "/", method: str = "GET", headers: dict | None = None, port: int = 9080,
        authority: str = "reviews:9080", scheme: str = "http") -> HttpRequestView:
    hs = {k.lower(): (v if isinstance(v, tuple) else (v,)) for k, v in (headers or {}).items()}
    return HttpRequestView(method, path, authority, MappingProxyType(hs), port, scheme)


__all__ = ["Endpoint"]
