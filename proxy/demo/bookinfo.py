"""The demo's mesh: a bookinfo-like topology on one 127.x block, and the configuration it runs with.

One table (``PODS``) says who runs where; the inventory YAML, the topology printed in step 1 and the
backends started are all derived from it, so they cannot disagree. Addresses come from a block
``127.A.B``: pods on ``127.A.B.x``, service VIPs on ``127.A.B+1.x``, proxy admin/metrics/readiness and
SOCKS5 on ``127.A.B+2.x``.

The waypoint is the seed's: one for the ``bookinfo-reviews`` service account (``--scope
default/bookinfo-reviews``), deployed as the Gateway ``bookinfo-reviews`` (``istio-waypoint`` class),
running as ``bookinfo-reviews-istio-waypoint``. The reviews Service and the reviews pods name it as
their waypoint, so it holds the seed's chains: ``inbound-vip`` for the VIP, ``direct-tcp`` /
``direct-http`` for each pod IP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

NAMESPACE = "default"
TRUST_DOMAIN = "cluster.local"
APP_PORT = 9080           # bookinfo's port for every service
ECHO_PORT = 9000          # Istio's tcp-echo sample listens on 9000
HBONE_PORT = 15008
SOCKS5_PORT = 15080
OUTBOUND_PORT = 15001
GATEWAY = "bookinfo-reviews"                       # the seed: a waypoint for the bookinfo-reviews SA
WAYPOINT_SA = "bookinfo-reviews-istio-waypoint"    # the seed's deploy/bookinfo-reviews-istio-waypoint
WAYPOINT_SCOPE = f"{NAMESPACE}/bookinfo-reviews"
WAYPOINT_POD = 100        # last octet of the waypoint pod
NODES = ("node-a", "node-b")
# Infra addresses (last octet in 127.A.B+2.x): one per proxy.
INFRA = {"node-a": 1, "node-b": 2, "waypoint": 3}
AUTHZ_POLICY = "reviews-allow-productpage"
BLOCK_RE = re.compile(r"^127\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True)
class Pod:
    name: str            # pod name, e.g. reviews-v1-0
    app: str             # canonical service / app label
    version: str
    sa: str              # service account → SPIFFE identity
    node: str
    last: int            # last octet of the pod IP
    role: str            # what it does in the demo (printed in step 1)
    serves: str = "http"  # "http" (says its version), "echo" (TCP), "" (a client only)
    via_waypoint: bool = False


PODS: tuple[Pod, ...] = (
    Pod("productpage-v1-0", "productpage", "v1", "bookinfo-productpage", "node-a", 10, "client", ""),
    Pod("sleep-0", "sleep", "v1", "sleep", "node-a", 11, "client (not allowed to call reviews)", ""),
    Pod("ratings-v1-0", "ratings", "v1", "bookinfo-ratings", "node-a", 30, "says 'ratings-v1'"),
    Pod("reviews-v1-0", "reviews", "v1", "bookinfo-reviews", "node-b", 21, "says 'reviews-v1'", via_waypoint=True),
    Pod("reviews-v2-0", "reviews", "v2", "bookinfo-reviews", "node-b", 22, "says 'reviews-v2'", via_waypoint=True),
    Pod("reviews-v3-0", "reviews", "v3", "bookinfo-reviews", "node-b", 23, "says 'reviews-v3'", via_waypoint=True),
    Pod("tcp-echo-0", "tcp-echo", "v1", "tcp-echo", "node-b", 50, "TCP echo", "echo"),
)
# Service → (VIP last octet, port, appProtocol, has the waypoint).
SERVICES = {
    "productpage": (10, APP_PORT, "http", False),
    "ratings": (30, APP_PORT, "http", False),
    "reviews": (20, APP_PORT, "http", True),
    "tcp-echo": (50, ECHO_PORT, "tcp", False),
}


def parse_block(text: str) -> tuple[int, int]:
    """``127.A.B`` → (A, B); raises ValueError with the reason. B+2 must stay a valid octet."""
    m = BLOCK_RE.match(text.strip())
    if not m:
        raise ValueError(f"--block {text!r}: expected 127.A.B (e.g. 127.10.0)")
    a, b = int(m.group(1)), int(m.group(2))
    if not (0 <= a <= 255 and 0 <= b <= 253):
        raise ValueError(f"--block {text!r}: A must be 0..255 and B 0..253 (the demo uses B, B+1 and B+2)")
    if (a, b) in ((0, 0), (0, 1), (0, 2)):
        raise ValueError(f"--block {text!r}: 127.0.0.x is the machine's own loopback; pick another block")
    return a, b


@dataclass(frozen=True)
class Layout:
    """Every address of the demo, from its block."""

    a: int
    b: int

    def pod(self, last: int) -> str:
        return f"127.{self.a}.{self.b}.{last}"

    def vip(self, last: int) -> str:
        return f"127.{self.a}.{self.b + 1}.{last}"

    def infra(self, last: int) -> str:
        return f"127.{self.a}.{self.b + 2}.{last}"

    @property
    def block(self) -> str:
        return f"127.{self.a}.{self.b}"

    def pod_of(self, name: str) -> Pod:
        return next(p for p in PODS if p.name == name)

    def ip_of(self, name: str) -> str:
        return self.pod(self.pod_of(name).last)

    def service_vip(self, service: str) -> str:
        return self.vip(SERVICES[service][0])

    @property
    def waypoint_ip(self) -> str:
        return self.pod(WAYPOINT_POD)

    def socks5(self, node: str) -> tuple[str, int]:
        return self.infra(INFRA[node]), SOCKS5_PORT

    def admin(self, proxy: str) -> str:
        return f"{self.infra(INFRA[proxy])}:15000"

    def addresses(self) -> list[tuple[str, int, str]]:
        """Every (ip, port, what) the demo binds, for the pre-flight check."""
        out: list[tuple[str, int, str]] = []
        for p in PODS:
            out.append((self.pod(p.last), HBONE_PORT, f"{p.name} HBONE"))
            if p.serves == "http":
                out.append((self.pod(p.last), APP_PORT, p.name))
            elif p.serves == "echo":
                out.append((self.pod(p.last), ECHO_PORT, p.name))
        out.append((self.waypoint_ip, HBONE_PORT, "waypoint HBONE"))
        for proxy, last in INFRA.items():
            ip = self.infra(last)
            for port, what in ((15000, "admin"), (15020, "metrics"), (15021, "readiness")):
                out.append((ip, port, f"{proxy} {what}"))
            if proxy in NODES:
                out.append((ip, SOCKS5_PORT, f"{proxy} SOCKS5"))
                out.append((ip, OUTBOUND_PORT, f"{proxy} outbound"))
        return out


def spiffe(sa: str, ns: str = NAMESPACE) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}"


def fqdn(service: str) -> str:
    return f"{service}.{NAMESPACE}.svc.cluster.local"


WAYPOINT_REF = {"destination": f"{NAMESPACE}/{fqdn(GATEWAY)}", "hboneMtlsPort": HBONE_PORT}


def inventory(layout: Layout) -> dict:
    """ztunnel local-config shape (DESIGN §4), from ``PODS`` and ``SERVICES``."""
    workloads = []
    for p in PODS:
        svc = SERVICES.get(p.app)
        w = {
            "uid": f"Kubernetes//v1/Pod/{NAMESPACE}/{p.name}", "name": p.name, "namespace": NAMESPACE,
            "serviceAccount": p.sa, "workloadIps": [layout.pod(p.last)], "protocol": "HBONE", "node": p.node,
            "canonicalName": p.app, "canonicalRevision": p.version, "workloadName": p.name.rsplit("-", 1)[0],
            "workloadType": "deployment", "labels": {"app": p.app, "version": p.version},
        }
        if svc is not None:
            w["services"] = {f"{NAMESPACE}/{fqdn(p.app)}": {svc[1]: svc[1]}}
        if p.via_waypoint:
            w["waypoint"] = dict(WAYPOINT_REF)   # pod-IP traffic goes through it too (direct-* chains)
        workloads.append(w)
    workloads.append({
        "uid": f"Kubernetes//v1/Pod/{NAMESPACE}/{WAYPOINT_SA}-0", "name": f"{WAYPOINT_SA}-0", "namespace": NAMESPACE,
        "serviceAccount": WAYPOINT_SA, "workloadIps": [layout.waypoint_ip], "protocol": "HBONE", "node": "node-a",
        "canonicalName": WAYPOINT_SA, "workloadName": WAYPOINT_SA, "workloadType": "deployment",
        "labels": {"gateway.networking.k8s.io/gateway-name": GATEWAY},
        "services": {f"{NAMESPACE}/{fqdn(GATEWAY)}": {HBONE_PORT: HBONE_PORT}},
    })
    services = []
    for name, (vip, port, proto, waypoint) in SERVICES.items():
        s = {"name": name, "namespace": NAMESPACE, "hostname": fqdn(name), "vips": [f"/{layout.vip(vip)}"],
             "ports": {port: port}, "appProtocols": {port: proto}}
        if waypoint:
            s["waypoint"] = dict(WAYPOINT_REF)
        services.append(s)
    services.append({"name": GATEWAY, "namespace": NAMESPACE, "hostname": fqdn(GATEWAY),
                     "vips": [f"/{layout.vip(WAYPOINT_POD)}"], "ports": {HBONE_PORT: HBONE_PORT},
                     "appProtocols": {HBONE_PORT: "tcp"}})
    return {"workloads": workloads, "services": services}


def policies() -> list[dict]:
    """The Gateway, the 90/10 VirtualService with its subsets, and the AuthorizationPolicy."""
    return [
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": GATEWAY, "namespace": NAMESPACE,
                      "annotations": {"istio.io/for-service-account": "bookinfo-reviews"}},
         "spec": {"gatewayClassName": "istio-waypoint",
                  "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "reviews", "namespace": NAMESPACE},
         "spec": {"hosts": ["reviews"], "http": [{"route": [
             {"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
             {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "reviews", "namespace": NAMESPACE},
         "spec": {"host": fqdn("reviews"),
                  "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2", "v3")]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": AUTHZ_POLICY, "namespace": NAMESPACE},
         "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}], "action": "ALLOW",
                  "rules": [{"from": [{"source": {"principals": [
                      f"{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/bookinfo-productpage"]}}]}]}},
    ]


def write_config(layout: Layout, directory: Path) -> Path:
    """Write ``mesh.yaml`` (inventory) and ``bookinfo.yaml`` (resources) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mesh.yaml").write_text(
        "# hbone-proxy demo: the inventory (ztunnel local-config shape)\n"
        + yaml.safe_dump(inventory(layout), sort_keys=False))
    (directory / "bookinfo.yaml").write_text(
        "# hbone-proxy demo: waypoint Gateway, 90/10 reviews routing, only productpage may call reviews\n"
        + yaml.safe_dump_all(policies(), sort_keys=False))
    return directory
