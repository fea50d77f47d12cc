"""A reusable loopback mesh for end-to-end tests: real ``hbone-proxy run`` subprocesses, as users run them.

``Mesh(tmp_path)`` writes a config directory from the bookinfo fixtures (plus extra YAML), makes a CA
with ``hbone-proxy certs init``, and starts proxies (``start_node``, ``start_waypoint``) on their own
addresses with their own admin/metrics/readiness ports, waiting for ``/healthz/ready``. Tiny backends
(``http_backend``, ``echo_backend``) bind the pod IPs. ``close()`` stops every process and backend —
the ``mesh`` fixture calls it even when a test fails. The backends, the SOCKS5 client and the console
script lookup are the ones ``hbone-proxy demo`` uses (``proxy/demo/mesh.py``).

The fixtures' addresses (pods 127.1.0.x, VIPs 127.2.0.x) are remapped to a random 127.A.B.x / 127.A.B+1.x
block per mesh, so parallel runs (and other test files using the fixtures' own addresses) never collide.
Proxy infrastructure listeners live in 127.A.B+2.x. The launcher itself is ``proxy.demo.mesh.LoopbackMesh``
(in the package, so the HTTP benchmark runs it from an installed copy too); this module adds the fixtures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from proxy.demo.mesh import READY_TIMEOUT_S, LoopbackMesh
from proxy.demo.mesh import Proc as _DemoProc
from proxy.demo.mesh import (EchoBackend, HttpBackend, SocksError, SocksHTTPConnection, StartError, get,
                             hbone_proxy_command, recv_exact, socks5_connect)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
BOOKINFO = ("inventory.yaml", "authz.yaml", "reviews-routing.yaml", "waypoint.yaml")

# Configuration the end-to-end tests add to bookinfo (addresses in bookinfo's 127.1.0.x pod and
# 127.2.0.x VIP ranges; Mesh.remap moves them to the mesh's block). Each is its own file.

# A second client identity on node-a (sa "other": not allowed to call reviews).
OTHER_CLIENT = """
workloads:
- uid: Kubernetes//v1/Pod/default/other-0
  name: other-0
  namespace: default
  serviceAccount: other
  workloadIps: ["127.1.0.11"]
  protocol: HBONE
  node: node-a
  labels: {app: other}
"""

_ECHO_SERVICE = {
    "echo": """- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.2.0.50"]
  ports: {7000: 7000}
  appProtocols: {7000: tcp}
""",
    "echo-wp": """- name: echo-wp
  namespace: default
  hostname: echo-wp.default.svc.cluster.local
  vips: ["/127.2.0.51"]
  ports: {7000: 7000}
  appProtocols: {7000: tcp}
  waypoint: {destination: "default/reviews-waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}
""",
}


def echo_yaml(*services: str) -> str:
    """A TCP echo pod on node-b (127.1.0.50:7000) behind the named services: ``echo`` (VIP
    127.2.0.50, L4 only) and/or ``echo-wp`` (VIP 127.2.0.51, through the reviews waypoint)."""
    refs = "".join(f"    default/{name}.default.svc.cluster.local: {{7000: 7000}}\n" for name in services)
    return ("""
workloads:
- uid: Kubernetes//v1/Pod/default/echo-0
  name: echo-0
  namespace: default
  serviceAccount: echo
  workloadIps: ["127.1.0.50"]
  protocol: HBONE
  node: node-b
  labels: {app: echo}
  services:
""" + refs + "services:\n" + "".join(_ECHO_SERVICE[name] for name in services))


# An AuthorizationPolicy with a misspelt field (``principalz``): a config error naming the field.
BAD_POLICY = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: bad
  namespace: default
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principalz: ["x"]
"""


_cli = hbone_proxy_command
_recv_exact = recv_exact


class Proc(_DemoProc):
    """``proxy.demo.mesh.Proc`` plus what tests read: the config dump and the access-log lines."""

    def config_dump(self) -> dict:
        status, body = self.get("admin", "/config_dump")
        assert status == 200, body
        return json.loads(body)

    def access_lines(self) -> list[dict]:
        if self.access_log is None or not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]


class Mesh(LoopbackMesh):
    """``proxy.demo.mesh.LoopbackMesh`` with the bookinfo fixtures (plus ``extra_yaml``) as its
    configuration, written with the fixtures' addresses remapped to the mesh's block; a proxy that
    does not become ready fails the test with its log."""

    def __init__(self, tmp: Path, extra_yaml: tuple[str, ...] = (), fixtures: tuple[str, ...] = BOOKINFO):
        super().__init__(tmp, proc_type=Proc, cwd=REPO)
        self.tmp, self.extra_yaml, self.fixtures = tmp, extra_yaml, fixtures
        for name in fixtures:
            self.write(name, (FIXTURES / "bookinfo" / name).read_text())
        for i, text in enumerate(extra_yaml):
            self.write(f"extra-{i}.yaml", text)

    def remap(self, text: str) -> str:
        """127.1.0.x (pods) → 127.A.B.x, 127.2.0.x (VIPs) → 127.A.B+1.x."""
        text = re.sub(r"\b127\.1\.0\.(\d+)\b", lambda m: f"127.{self.a}.{self.b}.{m.group(1)}", text)
        return re.sub(r"\b127\.2\.0\.(\d+)\b", lambda m: f"127.{self.a}.{self.b + 1}.{m.group(1)}", text)

    def write(self, name: str, text: str) -> Path:
        return super().write(name, self.remap(text))

    _start = LoopbackMesh.start   # the name tests used before the launcher moved into the package

    def start_waypoint(self, infra_last: int, *, pod_last: int = 100, gateway: str = "default/reviews-waypoint",
                       extra: tuple[str, ...] = (), **kw) -> Proc:
        return super().start_waypoint(infra_last, gateway=gateway, pod_last=pod_last, extra=extra, **kw)

    def start_proxies(self, *, node_a_extra: tuple[str, ...] = ()) -> tuple[Proc, Proc, Proc]:
        """The bookinfo mesh's three proxies (node-a, node-b, the reviews waypoint), started together
        (their start-ups overlap) and then each waited for; also kept as node_a, node_b, waypoint."""
        procs = (self.start_node("node-a", 1, wait=False, extra=node_a_extra),
                 self.start_node("node-b", 2, wait=False), self.start_waypoint(3, wait=False))
        for p in procs:
            self.wait_ready(p)
        self.node_a, self.node_b, self.waypoint = procs
        return procs

    def wait_ready(self, proc: Proc, timeout: float = READY_TIMEOUT_S) -> None:
        try:
            super().wait_ready(proc, timeout)
        except StartError as err:
            raise AssertionError(f"{err}:\n{proc.logs()}") from None


__all__ = ["Mesh", "Proc", "HttpBackend", "EchoBackend", "SocksError", "SocksHTTPConnection",
           "socks5_connect", "get", "REPO"]
