"""The HTTP/1.1 scenario: a 90/10 weighted split with a header deny rule, every proxy against the same client.

Rows (each proxy a separate process with one worker; the plain-HTTP backends one nginx process
serving ``v1`` and ``v2``, small bodies):

- ``direct``: the client → backend v1, no proxy: the latency floor (``+p50/+p99 vs direct``).
- ``nginx``: ``upstream`` with ``weight=9`` / ``weight=1`` (smooth weighted round robin), keep-alive to
  the backends, ``if ($http_x_deny) { return 403; }``. The ratio column is to this row.
- ``haproxy``: ``balance roundrobin`` with weights 9 / 1, ``http-reuse always``,
  ``http-request deny if { req.hdr(x-deny) -m found }``.
- ``ours``: the real mesh — three ``hbone-proxy run`` processes on loopback pod addresses, started by
  the package's launcher (``proxy.demo.mesh.LoopbackMesh``) with the demo's bookinfo configuration
  (``proxy.demo.bookinfo``), so an installed copy has these rows too: client (productpage's IP) →
  node-a's SOCKS5 (15080) → HBONE → the reviews waypoint (L7 authz: only productpage may call, plus a
  DENY on ``x-deny``; the 90/10 v1/v2 route) → HBONE → node-b → nginx backends on the reviews-v1/v2
  pod IPs. This is what a user of the whole loopback mesh gets: "proxy CPU" is the sum of all three
  proxies (every hop a request takes), the waypoint's own share is its own column. Access logs off
  (as nginx's). SOCKS5 is the only way in for an app outside the pods' network namespaces, and the
  connection's source address (productpage's pod IP) is what node-a picks the source workload by.
- ``wp-only``: the waypoint alone, hop for hop against nginx and haproxy. The issue's HTTP targets
  (≤ 60 µs proxy CPU per request, ≥ 0.5× nginx's requests/s at 64 connections, ≤ 0.3 ms added p99 at
  1 000 req/s) and performance.md's reference table are stated for *one proxy process*; ``ours``
  puts three on every request. Here the HBONE ends are C programs: ``benchmarks/hbone_httpload.c`` as
  node-a (productpage's IP and certificate from the mesh CA, TLS 1.3, ALPN h2, one HTTP/2 connection
  carrying the tunnels as CONNECT streams as ztunnel pools them, ``:authority`` = the reviews VIP:port
  plus ztunnel's ``forwarded``/``baggage``/``traceparent``) → the same waypoint process and
  configuration as ``ours`` (demo bookinfo + the DENY rule; its own ``LoopbackMesh`` block, only the
  waypoint started: ``WaypointOnly``) → HBONE → nghttpx (the tunnel scenarios' reference CONNECT
  terminator) standing in for node-b on the reviews pods' ``:15008``, mTLS with the reviews workload's
  SPIFFE certificate from the same CA (so the waypoint's server-identity check passes) and client
  certificates verified → nghttpx forwards each CONNECT as HTTP/1.1 to ``benchmarks.connect_http``,
  which answers it and then the requests with ``v1``/``v2`` by the CONNECT's pod IP (nginx answers
  CONNECT 405, so it cannot be that backend). "proxy CPU" and "waypoint µs/req" are the waypoint's
  alone; nghttpx's is its own column, the backend's in a note.
- ``wp-l4``: the same waypoint process, client, tunnels and GETs, CONNECTed to ``reviews-l4``: a second
  service on the reviews-v1/v2 pods, declared TCP, with the same waypoint (``with_l4_service``). No L7: the
  waypoint's TCP chain authorizes the tunnel (L4), picks a pod and splices HBONE to HBONE, so this is the
  waypoint's floor for the same bytes (mTLS + HTTP/2 in and out); wp-only minus wp-l4 is what the L7 work
  (HTTP/1.1 parsing both ways, L7 authz, the 90/10 route, header rewrites, per-request metrics) costs.
- ``no-waypoint``: the same ends without the waypoint (the C client CONNECTs straight to nghttpx on
  reviews-v1's :15008; proxy CPU = nghttpx's): wp-only minus no-waypoint is the waypoint's own added
  latency, hop for hop as nginx minus direct is nginx's (a note under the table gives both); at c=64
  it shows whether the ends could go faster than wp-only did (then the waypoint was the limit).

Before timing, each proxy is checked: 20 requests must split 18 / 2 (ours and wp-only: 200 requests,
90/10 by a random pick, must give ≥ 150 v1 and ≥ 5 v2) and ``x-deny: 1`` must get 403.

Clients. Quick mode (``make bench``, the default): every row is driven by one client,
``benchmarks/hbone_httpload.c`` (``c-load``; 1–7 µs of CPU per request, so the cores go to the proxies),
at three load points: ``c-load c=1`` / ``c=64`` (closed loop: each connection sends its next GET as
soon as the previous response is in) and ``c-load 1000/s`` (open loop at a fixed 1 000 requests/s over
``RATE_CONNECTIONS`` connections, latency from the *scheduled* send time, so a stall counts in full).
It speaks plain HTTP/1.1 to direct / nginx / haproxy, the same through node-a's SOCKS5 (from
productpage's IP) for ``ours``, and the same GETs inside its own HBONE tunnels for wp-only /
no-waypoint: every ratio and delta is same-client. It samples the parties' CPU (``--cpu-pid``) at the
edges of its measured window, so their µs per request cover exactly the counted requests. Built at
start with ``cc`` + OpenSSL headers (``benchmarks.cbuild``, while the mesh starts); without them quick
mode falls back to the ``load`` rows below (and wp-only / no-waypoint say why they have no numbers).

``--full`` adds the earlier clients' rows, same targets where they can reach them: ``wrk c=1`` /
``c=64`` (one thread, closed loop; wrk cannot speak SOCKS5, so no ``ours``) and ``load c=1`` / ``c=64`` /
``1000/s`` (``benchmarks.httpload``: Python, uvloop + httptools, ~27 µs of CPU per request — it exists
because wrk cannot reach the mesh; its and wrk's proxy CPU spans the whole client run, warm-up
included).
"""

from __future__ import annotations

import copy
import http.client
import importlib.util
import os
import re
import resource
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from benchmarks import procstat
from benchmarks.cbuild import build_c
from benchmarks.harness import Party, PartyError, free_port, parse_last_json, python_argv
from benchmarks.report import Column, Row, ScenarioResult, f0, f2
from benchmarks.tools import Toolbox
from benchmarks.tunnel import nghttpx_argv

HOST = "127.0.0.1"
CONCURRENCY = (1, 64)  # the issue: requests/s at c=1 and c=64
WRK_THREADS = 1  # one wrk thread leaves the other core to the proxy and the backends
SPLIT_CHECK_REQUESTS = 20  # 9:1 smooth weighted round robin: exactly 18 v1 and 2 v2
WRK_TIMEOUT_MARGIN_S = 30.0
FIXED_RATE = 1000  # the issue: added p99 at a fixed 1 000 req/s
# Open loop: enough connections that 1 000 req/s never waits for a free one at ~1 ms each.
RATE_CONNECTIONS = 16
OURS_SPLIT_CHECK = 200  # random 90/10 pick: P(v1 < 150 or v2 < 5) is ~1e-4
# wp-only: the source port in the CONNECT's `forwarded: for=` (ztunnel puts the app's address there;
# the waypoint reads only its host=, so any port will do).
FORWARDED_PORT = 40000
# The C client's rows (benchmarks/hbone_httpload.c, built at start by benchmarks.cbuild): closed loop
# at c=1 / c=64 and the open loop at FIXED_RATE over RATE_CONNECTIONS tunnels/connections, as the
# httpload rows; plain HTTP to direct/nginx/haproxy, HBONE to the waypoint (wp-only).
C_CLIENT = "c-load"
LOAD_CLIENT = "load"  # benchmarks/httpload.py (Python): --full, or quick mode where the C client cannot be built
# The table's rows, in this order under each client, and which clients can drive each target: wrk
# cannot speak SOCKS5 (no ours), only the C client speaks HBONE itself (wp-only, no-waypoint).
ROW_ORDER = ("direct", "nginx", "haproxy", "ours", "wp-only", "wp-l4", "no-waypoint")
TARGET_CLIENTS = {
    "direct": ("wrk", LOAD_CLIENT, C_CLIENT), "nginx": ("wrk", LOAD_CLIENT, C_CLIENT),
    "haproxy": ("wrk", LOAD_CLIENT, C_CLIENT), "ours": (LOAD_CLIENT, C_CLIENT),
    "wp-only": (C_CLIENT,), "wp-l4": (C_CLIENT,), "no-waypoint": (C_CLIENT,),
}
# wp-l4: a second service on the reviews-v1/v2 pods, declared TCP, through the same waypoint (WaypointOnly's
# config): VIP last octet and name. v3 is left out (no nghttpx stands in for its pod).
L4_SERVICE, L4_VIP_LAST = "reviews-l4", 21
L4_SPLIT_CHECK = 20   # requests through the L4 chain before timing: all 200, bodies v1/v2 only
C_CLIENT_SOURCE = Path(__file__).with_name("hbone_httpload.c")
C_CLIENT_MISSING = ("not available: the C client (benchmarks/hbone_httpload.c) could not be built: it needs cc "
                    "and the OpenSSL headers (Debian libssl-dev)")
C_CHECK_TIMEOUT_S = 30.0  # the split/deny check: 200 requests through a freshly started waypoint
# The DENY rule the reference proxies implement with `if ($http_x_deny)` / `http-request deny`.
DENY_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bench-deny-x-deny, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: DENY
  rules:
  - when:
    - key: request.headers[x-deny]
      values: ["*"]
"""

# What every nginx party here shares: one worker in the foreground, its pid, error log and temporary
# files in the work directory under the party's name, no access log, and keep-alive connections that
# are never closed for their request count. ``{http}`` is the party's own part of the http block.
NGINX_CONF = """
daemon off; worker_processes 1; pid {dir}/{name}.pid; error_log {dir}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {dir}/{name}-body; proxy_temp_path {dir}/{name}-proxy; fastcgi_temp_path {dir}/{name}-fcgi;
  uwsgi_temp_path {dir}/{name}-uwsgi; scgi_temp_path {dir}/{name}-scgi;
{http}}}
"""

NGINX_MESH_BACKEND_HTTP = """\
  server {{ listen {v1}:{port}; location / {{ return 200 "v1\\n"; }} }}
  server {{ listen {v2}:{port}; location / {{ return 200 "v2\\n"; }} }}
"""

NGINX_BACKEND_HTTP = """\
  server {{ listen {host}:{v1}; location / {{ return 200 "v1\\n"; }} }}
  server {{ listen {host}:{v2}; location / {{ return 200 "v2\\n"; }} }}
"""

NGINX_PROXY_HTTP = """\
  upstream split {{ server {host}:{v1} weight=9; server {host}:{v2} weight=1; keepalive 64; }}
  server {{
    listen {host}:{port};
    location / {{
      if ($http_x_deny) {{ return 403; }}
      proxy_pass http://split; proxy_http_version 1.1; proxy_set_header Connection "";
    }}
  }}
"""

# maxconn: haproxy needs ~2 descriptors per connection and refuses to start if it cannot raise
# RLIMIT_NOFILE that far; 4 096 connections is far above the 64 the benchmark opens.
HAPROXY_CONF = """
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe
  bind {host}:{port}
  http-request deny deny_status 403 if {{ req.hdr(x-deny) -m found }}
  default_backend be
backend be
  balance roundrobin
  http-reuse always
  server v1 {host}:{v1} weight 9
  server v2 {host}:{v2} weight 1
"""

COLUMNS = [
    Column("req/s", "rps", f0),
    Column("×nginx", "rps", ratio_to="nginx"),
    Column("p50 ms", "p50_ms", f2),
    Column("p99 ms", "p99_ms", f2),
    Column("+p50 vs direct", "p50_ms", f2, delta_to="direct"),
    Column("+p99 vs direct", "p99_ms", f2, delta_to="direct"),
    Column("proxy CPU s", "proxy_cpu_s", f2),
    Column("client CPU s", "client_cpu_s", f2),
    Column("proxy µs/req", "proxy_us_per_req", f0),
    Column("waypoint µs/req", "waypoint_us_per_req", f0),
    Column("nghttpx µs/req", "nghttpx_us_per_req", f0),
]


def ours_waypoint_status() -> str | None:
    """None when the real mesh can be started; else why the ``ours`` rows have no numbers."""
    if importlib.util.find_spec("proxy.run") is None:
        return "not available: hbone-proxy waypoint not built yet"
    return None


class OursMesh:
    """node-a, the reviews waypoint and node-b as ``hbone-proxy run`` processes (see the module docstring)."""

    def __init__(self, workdir: Path, nginx: str):
        from proxy.demo import bookinfo as bi
        from proxy.demo.mesh import LoopbackMesh, StartError
        self.backend: Party | None = None
        self.mesh: LoopbackMesh | None = None
        try:
            self.mesh = m = LoopbackMesh(workdir / "mesh")
            bi.write_config(m.layout, m.config_dir)
            m.write("bench-deny.yaml", DENY_POLICY)
            self.reviews = (m.layout.service_vip("reviews"), bi.APP_PORT)
            self.productpage = m.layout.ip_of("productpage-v1-0")
            v1, v2 = m.layout.ip_of("reviews-v1-0"), m.layout.ip_of("reviews-v2-0")
            servers = NGINX_MESH_BACKEND_HTTP.format(v1=v1, v2=v2, port=bi.APP_PORT)
            self.backend = _nginx(nginx, workdir, "mesh-backend", servers, (v1, bi.APP_PORT))
            quiet = ("--access-log", "off", "--log-level", "warning")
            # All three start at once, then each is waited for (~1.3 s → ~0.6 s on an idle box).
            self.node_a = m.start_node("node-a", bi.INFRA["node-a"], extra=quiet, wait=False)
            self.node_b = m.start_node("node-b", bi.INFRA["node-b"], extra=quiet, wait=False)
            self.waypoint = m.start_waypoint(bi.INFRA["waypoint"], gateway=f"{bi.NAMESPACE}/{bi.GATEWAY}",
                                             pod_last=bi.WAYPOINT_POD, extra=("--scope", bi.WAYPOINT_SCOPE, *quiet),
                                             wait=False)
            for proc in (self.node_a, self.node_b, self.waypoint):
                m.wait_ready(proc)
        except (StartError, PartyError, OSError) as err:
            self.close()
            raise PartyError(f"mesh did not start: {str(err).splitlines()[0]}") from None
        self.pids = {"node-a": self.node_a.popen.pid, "waypoint": self.waypoint.popen.pid,
                     "node-b": self.node_b.popen.pid}

    def load_args(self) -> list[str]:
        vip, port = self.reviews
        return ["--target", f"{vip}:{port}", "--socks", f"{self.node_a.socks5[0]}:{self.node_a.socks5[1]}",
                "--source-ip", self.productpage, "--host", f"reviews:{port}"]

    def c_argv(self, client: Path, *args: str) -> list[str]:
        """The C client's command for the ``ours`` rows: plain HTTP/1.1 through node-a's SOCKS5 from
        productpage's pod IP (node-a picks the source workload by it), CONNECT to the reviews VIP."""
        vip, port = self.reviews
        return [str(client), "--plain", "--connect", f"{vip}:{port}", "--socks",
                f"{self.node_a.socks5[0]}:{self.node_a.socks5[1]}", "--source-ip", self.productpage,
                "--host", f"reviews:{port}", *args]

    def cpu(self) -> dict[str, float]:
        return {name: procstat.cpu_times(pid).total_s for name, pid in self.pids.items()}

    def check_split_and_deny(self) -> None:
        from proxy.demo.mesh import SocksHTTPConnection, get
        counts: dict[str, int] = {}
        conn = SocksHTTPConnection(self.node_a.socks5, *self.reviews, source_ip=self.productpage)
        try:
            for _ in range(OURS_SPLIT_CHECK):
                status, body = get(conn)
                key = body.decode().strip() if status == 200 else str(status)
                counts[key] = counts.get(key, 0) + 1
            denied, _ = get(conn, headers={"x-deny": "1"})
        except (OSError, http.client.HTTPException) as err:
            raise PartyError(f"check requests through the mesh failed: {err}") from None
        finally:
            conn.close()
        if counts.get("v1", 0) < 150 or counts.get("v2", 0) < 5 or denied != 403:
            raise PartyError(f"split/deny check through the mesh failed: {counts}, x-deny → {denied}")

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh.close()
        if self.backend is not None:
            self.backend.stop()


class WaypointOnly:
    """The ``wp-only`` rows' parties: our reviews waypoint alone between two C/HTTP-2 ends (see the
    module docstring). Its own ``LoopbackMesh`` block (node-b of the ``ours`` rows holds 15008 on its
    pods' IPs): the demo's bookinfo configuration plus the DENY rule, only the waypoint started;
    nghttpx listens on the reviews-v1 and -v2 pod IPs' 15008 with the reviews workload's certificate
    from that mesh's CA (so the waypoint's server-identity check passes) and forwards each CONNECT to
    ``benchmarks.connect_http``, which answers ``v1``/``v2`` by the CONNECT's pod IP."""

    def __init__(self, workdir: Path, nghttpx: str, client: Path, *, ca_dir: Path | None = None):
        from datetime import datetime, timezone

        from certs.ca import MeshCA
        from certs.spiffe import SpiffeId
        from hbone.connect import Baggage, build_baggage, build_forwarded
        from proxy.demo import bookinfo as bi
        from proxy.demo.mesh import LoopbackMesh, StartError
        self.client = client
        self.parties: list[Party] = []
        self.mesh: LoopbackMesh | None = None
        try:
            if ca_dir is not None:
                # The ours rows' mesh CA, reused: LoopbackMesh keeps a CA it finds, and skips the
                # `hbone-proxy certs init` subprocess (~0.4 s). Its own block of addresses all the same.
                shutil.copytree(ca_dir, workdir / "wp-mesh" / "ca")
            self.mesh = m = LoopbackMesh(workdir / "wp-mesh")
            bi.write_config(m.layout, m.config_dir)
            m.write("mesh.yaml", yaml.safe_dump(with_l4_service(bi.inventory(m.layout), m.layout), sort_keys=False))
            m.write("bench-deny.yaml", DENY_POLICY)
            now = datetime.now(timezone.utc)
            ca = MeshCA.load(m.ca_dir)
            self.ca_pem = m.ca_dir / "root-cert.pem"
            pp = m.layout.pod_of("productpage-v1-0")
            self.client_cert, self.client_key = ca.issue(
                SpiffeId(bi.TRUST_DOMAIN, bi.NAMESPACE, pp.sa), now=now).write(workdir / "wp-productpage")
            reviews = m.layout.pod_of("reviews-v1-0")
            server_cert, server_key = ca.issue(
                SpiffeId(bi.TRUST_DOMAIN, bi.NAMESPACE, reviews.sa), now=now).write(workdir / "wp-reviews")
            self.productpage = m.layout.pod(pp.last)
            self.reviews = (m.layout.service_vip("reviews"), bi.APP_PORT)
            # What node-a sends with the CONNECT (ztunnel create_hbone_request): forwarded (the app's
            # address: its port is nominal here, the waypoint reads only host=) and the source's baggage.
            self.connect_headers = [
                "forwarded: " + build_forwarded((self.productpage, FORWARDED_PORT), bi.fqdn("reviews")),
                "baggage: " + build_baggage(Baggage(namespace=bi.NAMESPACE, workload_name=pp.name.rsplit("-", 1)[0],
                                                    service_name=pp.app, service_version=pp.version))]
            v1, v2 = m.layout.ip_of("reviews-v1-0"), m.layout.ip_of("reviews-v2-0")
            backend_addr = (HOST, free_port())
            backend = Party("wp-backend", python_argv("benchmarks.connect_http", "--listen", f"{HOST}:{backend_addr[1]}",
                                                      "--body", f"{v1}=v1", "--body", f"{v2}=v2"), workdir)
            backend.start()
            self.parties.append(backend)
            self.backend = backend
            argv = nghttpx_argv(nghttpx, (v1, bi.HBONE_PORT), backend_addr, self.ca_pem, server_cert, server_key,
                                workdir)
            argv.insert(-2, f"--frontend={v2},{bi.HBONE_PORT}")
            self.nghttpx = Party("wp-nghttpx", argv, workdir, port=(v2, bi.HBONE_PORT))
            self.nghttpx.start()
            self.parties.append(self.nghttpx)
            quiet = ("--access-log", "off", "--log-level", "warning")
            self.waypoint = m.start_waypoint(bi.INFRA["waypoint"], gateway=f"{bi.NAMESPACE}/{bi.GATEWAY}",
                                             pod_last=bi.WAYPOINT_POD, extra=("--scope", bi.WAYPOINT_SCOPE, *quiet))
            self.hbone = (m.layout.waypoint_ip, bi.HBONE_PORT)
            self.v1 = (v1, bi.APP_PORT)
            self.reviews_l4 = (m.layout.vip(L4_VIP_LAST), bi.APP_PORT)
        except (StartError, PartyError, OSError) as err:
            self.close()
            raise PartyError(f"waypoint-only set-up did not start: {str(err).splitlines()[0]}") from None

    def client_argv(self, *args: str) -> list[str]:
        """Through the waypoint: HBONE to its :15008, CONNECT to the reviews VIP, as node-a sends it."""
        vip, port = self.reviews
        return self._argv(self.hbone, (vip, port), args)

    def l4_argv(self, *args: str) -> list[str]:
        """The ``wp-l4`` rows: through the same waypoint, CONNECT to the reviews-l4 VIP (TCP: no L7)."""
        vip, port = self.reviews_l4
        return self._argv(self.hbone, (vip, port), args)

    def ends_argv(self, *args: str) -> list[str]:
        """The ``no-waypoint`` baseline: the same client, certificate and headers straight to nghttpx on
        reviews-v1's :15008 (CONNECT to its pod IP:port), as node-a would for a pod without a waypoint."""
        return self._argv((self.v1[0], 15008), self.v1, args)

    def _argv(self, connect: tuple[str, int], authority: tuple[str, int], args) -> list[str]:
        argv = [str(self.client), "--connect", f"{connect[0]}:{connect[1]}",
                "--authority", f"{authority[0]}:{authority[1]}", "--source-ip", self.productpage,
                "--ca", str(self.ca_pem), "--cert", str(self.client_cert), "--key", str(self.client_key),
                "--host", f"reviews:{authority[1]}"]
        for h in self.connect_headers:
            argv += ["--connect-header", h]
        return argv + list(args)

    def check_split_and_deny(self) -> None:
        counts = run_c_client(self.client_argv("--count", str(OURS_SPLIT_CHECK)))
        denied = run_c_client(self.client_argv("--count", "1", "--header", "x-deny: 1"))
        bodies, statuses = counts["bodies"], counts["statuses"]
        if (statuses != {"200": OURS_SPLIT_CHECK} or bodies.get("v1", 0) < 150 or bodies.get("v2", 0) < 5
                or denied["statuses"] != {"403": 1}):
            raise PartyError(f"split/deny check through the waypoint failed: {statuses} {bodies}, "
                             f"x-deny → {denied['statuses']}")

    def close(self) -> None:
        if self.mesh is not None:
            self.mesh.close()
        for p in reversed(self.parties):
            p.stop()


def with_l4_service(inventory: dict, layout) -> dict:
    """The demo inventory plus ``reviews-l4``: the reviews-v1/v2 pods' port also as a second service,
    declared TCP and served by the same waypoint, so ``wp-l4`` sends the same requests through the same
    waypoint process with no L7 at all (no HTTP parsing, no L7 authz, no 90/10: the waypoint's TCP chain
    picks a pod per tunnel and splices). The bench DENY rule and the demo's ALLOW policy target ``reviews``
    only, so neither applies to it (no policy on a service: allowed)."""
    from proxy.demo import bookinfo as bi
    inv = copy.deepcopy(inventory)
    key = f"{bi.NAMESPACE}/{bi.fqdn(L4_SERVICE)}"
    for w in inv["workloads"]:
        if w["name"] in ("reviews-v1-0", "reviews-v2-0"):
            w.setdefault("services", {})[key] = {bi.APP_PORT: bi.APP_PORT}
    inv["services"].append({"name": L4_SERVICE, "namespace": bi.NAMESPACE, "hostname": bi.fqdn(L4_SERVICE),
                            "vips": [f"/{layout.vip(L4_VIP_LAST)}"], "ports": {bi.APP_PORT: bi.APP_PORT},
                            "appProtocols": {bi.APP_PORT: "tcp"}, "waypoint": dict(bi.WAYPOINT_REF)})
    return inv


class WaypointL4:
    """The ``wp-l4`` rows: ``WaypointOnly``'s waypoint, client and ends, requests to ``reviews-l4`` (TCP).
    wp-only − wp-l4 is what the L7 work costs (HTTP/1.1 both ways, authz, route, header rewrites, metrics per
    request); wp-l4 itself is the waypoint's HBONE floor (TLS + HTTP/2 in and out, one splice per tunnel)."""

    def __init__(self, wp: WaypointOnly):
        self.wp = wp

    def check(self) -> None:
        counts = run_c_client(self.wp.l4_argv("--count", str(L4_SPLIT_CHECK)))
        if counts["statuses"] != {"200": L4_SPLIT_CHECK} or not set(counts["bodies"]) <= {"v1", "v2"}:
            raise PartyError(f"reviews-l4 through the waypoint failed: {counts['statuses']} {counts['bodies']}")


class NoWaypoint:
    """The ``no-waypoint`` rows: ``WaypointOnly``'s ends (C client → nghttpx → backend) without the
    waypoint between them. The waypoint's own added latency is wp-only's minus these (the note under
    the table), as nginx's is nginx's minus direct: hop for hop, the ends' TLS, HTTP/2 and Python
    backend taken out. At c=64 they also show how far the ends alone can go (is the waypoint the limit?)."""

    def __init__(self, wp: WaypointOnly):
        self.wp = wp


def run_c_client(argv: list[str], timeout: float = C_CHECK_TIMEOUT_S) -> dict:
    """One run of the C client to completion: its JSON report, or PartyError with its stderr."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PartyError("hbone_httpload timed out") from None
    if proc.returncode != 0:
        raise PartyError(f"hbone_httpload exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return parse_last_json(proc.stdout)


def run_http(toolbox: Toolbox, *, repeat: int, seconds: float, full: bool = False) -> ScenarioResult:
    """The HTTP scenario's table: quick mode (default) every row driven by the C client, ``full``
    adds the wrk and httpload rows (see the module docstring)."""
    res = ScenarioResult("http", f"HTTP/1.1, 90/10 split + header deny rule, {seconds:g} s per run",
                         COLUMNS)
    tools = toolbox.ensure(["nginx", "haproxy", *(["wrk"] if full else [])])
    if tools["nginx"] is None:
        res.rows = [Row("all", C_CLIENT, note="not available: needs nginx (Debian package nginx-light)")]
        return res
    workdir = Path(tempfile.mkdtemp(prefix="hbone-bench-http-"))
    parties: list[Party] = []
    ours: OursMesh | None = None
    wp_only: WaypointOnly | None = None
    c_client: Path | None = None
    built: str | None = None
    # The C client builds (cc, ~0.5 s) while the mesh starts: its own thread, as cc is no party (the
    # parties are spawned from this thread: the mesh launcher's PR_SET_PDEATHSIG ties each proxy to
    # the thread that forked it).
    exe = workdir / "hbone_httpload"
    builder = ThreadPoolExecutor(max_workers=1)
    build = builder.submit(build_c, C_CLIENT_SOURCE, exe)
    try:
        v1, v2 = free_port(), free_port()
        backend = _nginx(tools["nginx"], workdir, "backend", NGINX_BACKEND_HTTP.format(host=HOST, v1=v1, v2=v2), (HOST, v1))
        parties.append(backend)
        targets: dict[str, Party | OursMesh | WaypointOnly | WaypointL4 | NoWaypoint | str] = {"direct": f"{HOST}:{v1}"}
        port = free_port()
        try:
            p = _nginx(tools["nginx"], workdir, "nginx", NGINX_PROXY_HTTP.format(host=HOST, v1=v1, v2=v2, port=port), (HOST, port))
            parties.append(p)
            _check_split_and_deny(HOST, port)
            targets["nginx"] = p
        except PartyError as err:
            targets["nginx"] = f"not available: {err}"
        if tools["haproxy"] is None:
            targets["haproxy"] = "not available: haproxy not installed (Debian package haproxy)"
        else:
            port = free_port()
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(HAPROXY_CONF.format(host=HOST, port=port, v1=v1, v2=v2))
            try:
                p = Party("haproxy", [tools["haproxy"], "-f", str(cfg), "-db"], workdir, port=(HOST, port))
                p.start()
                parties.append(p)
                _check_split_and_deny(HOST, port)
                targets["haproxy"] = p
            except PartyError as err:
                targets["haproxy"] = f"not available: {err}"
        why = ours_waypoint_status()
        if why is None:
            try:
                ours = OursMesh(workdir, tools["nginx"])
                ours.check_split_and_deny()
                targets["ours"] = ours
            except PartyError as err:
                targets["ours"] = f"not available: {err}"
        else:
            targets["ours"] = why
        built = build.result()
        c_client = exe if built is None else None
        targets["wp-only"] = _start_waypoint_only(toolbox, workdir, c_client, ca_from=ours)
        if isinstance(targets["wp-only"], WaypointOnly):
            wp_only = targets["wp-only"]
            targets["no-waypoint"] = NoWaypoint(wp_only)
            l4 = WaypointL4(wp_only)
            try:
                l4.check()
                targets["wp-l4"] = l4
            except PartyError as err:
                targets["wp-l4"] = f"not available: {err}"
        else:
            targets["no-waypoint"] = targets["wp-l4"] = targets["wp-only"]
        res.rows = plan_rows(full=full, missing={name: t for name, t in targets.items()
                                                 if isinstance(t, str) and name != "direct"},
                             wrk=tools.get("wrk") is not None, c_client_why=built)
        if not full and c_client is None:
            res.notes.append(f"{C_CLIENT_MISSING} ({built}); quick mode used {LOAD_CLIENT} (benchmarks/httpload.py) "
                             "instead, so wp-only and no-waypoint have no numbers")
        for _ in range(repeat):
            for row in res.rows:
                if row.note and row.note.startswith("not available"):
                    continue
                t = targets[row.target]
                try:
                    if row.client.startswith(C_CLIENT):
                        _measure_c(row, t, seconds, c_client)
                    elif row.client.startswith("wrk"):
                        url_addr = t if isinstance(t, str) else f"{HOST}:{t.port[1]}"  # type: ignore[union-attr]
                        _measure(row, tools["wrk"], url_addr, int(row.client.split("=")[1]), seconds,
                                 t if isinstance(t, Party) else None)
                    else:
                        _measure_load(row, t, seconds)
                except PartyError as err:
                    row.note = f"failed: {err}"
    except PartyError as err:
        res.rows = [Row("all", C_CLIENT, note=f"not available: {err}")]
    finally:
        builder.shutdown(wait=True)
        if ours is not None:
            ours.close()
        if wp_only is not None:
            wp_only.close()
        for p in reversed(parties):
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    res.notes += scenario_notes(full=full, c_client=c_client is not None)
    res.notes += waypoint_only_notes(res)
    return res


def plan_rows(*, full: bool, missing: dict[str, str], wrk: bool, c_client_why: str | None) -> list[Row]:
    """The table's rows, before any run: under each client (quick: the C client's three load points;
    ``full``: wrk's, httpload's and the C client's) the targets it can drive, in ``ROW_ORDER``.
    ``missing``: target → why it has no numbers; ``c_client_why``: why the C client did not build
    (None: it did; quick mode then falls back to httpload's rows)."""
    c_rows = [f"{C_CLIENT} c={c}" for c in CONCURRENCY] + [f"{C_CLIENT} {FIXED_RATE}/s"]
    load_rows = [f"{LOAD_CLIENT} c={c}" for c in CONCURRENCY] + [f"{LOAD_CLIENT} {FIXED_RATE}/s"]
    wrk_rows = [f"wrk c={c}" for c in CONCURRENCY]
    if full:
        clients = wrk_rows + load_rows + c_rows
    elif c_client_why is None:
        clients = c_rows
    else:   # no C compiler / OpenSSL headers: quick mode keeps a table, from the Python client
        clients = load_rows
    rows = []
    for client in clients:
        kind = client.split(" ", 1)[0]
        for name in ROW_ORDER:
            if kind not in TARGET_CLIENTS[name]:
                continue
            note = missing.get(name)
            if kind == "wrk" and not wrk:
                note = "not available: wrk not installed (Debian package wrk)"
            if kind == C_CLIENT and c_client_why is not None:
                note = f"{C_CLIENT_MISSING} ({c_client_why})"
            rows.append(Row(name, client, note=note))
    return rows


def scenario_notes(*, full: bool, c_client: bool) -> list[str]:
    """What the rows are, under the table (the module docstring has the long form)."""
    notes = []
    if c_client:
        notes.append(f"{C_CLIENT}: benchmarks/hbone_httpload.c (one epoll process, built at start, 1–7 µs CPU per "
                     "request): plain HTTP/1.1 to direct/nginx/haproxy, SOCKS5 to node-a for ours, the same GETs "
                     f"inside HBONE for wp-only/no-waypoint; closed loop at c=1/c=64, open loop at {FIXED_RATE}/s "
                     f"over {RATE_CONNECTIONS} connections (latency from the scheduled time); proxy CPU sampled at "
                     "the edges of the measured window")
    if full or not c_client:
        notes.append(f"{LOAD_CLIENT}: benchmarks.httpload (Python, uvloop, ~27 µs CPU per request; open loop at "
                     f"{FIXED_RATE}/s over {RATE_CONNECTIONS} connections, latency from the scheduled time); its proxy "
                     "CPU spans the whole client run, warm-up included")
    if full:
        notes.append("wrk: one thread, closed loop; it cannot speak SOCKS5, so it has no ours rows; its proxy CPU "
                     "spans the whole run")
    notes.append("backends: one nginx process (1 worker) serving v1 and v2; each proxy checked before timing "
                 "(split, x-deny → 403)")
    notes.append("ours = client (productpage's IP) → node-a SOCKS5 → HBONE → waypoint (authz + DENY x-deny + 90/10) → "
                 "HBONE → node-b → nginx: proxy CPU is all three processes, the waypoint's own share in its column; "
                 "nginx/haproxy are one plain-HTTP hop")
    if c_client:
        notes.append("wp-only = the waypoint alone, as the issue's targets are stated (one proxy process): C client "
                     "(productpage's certificate, one mTLS HTTP/2 connection, a CONNECT tunnel per connection of the "
                     "other rows) → waypoint → HBONE → nghttpx on the reviews pods' :15008 (stands in for node-b) → "
                     "benchmarks.connect_http (v1/v2); proxy CPU = the waypoint's, nghttpx's in its own column; "
                     "no-waypoint = the same ends without the waypoint (proxy CPU = nghttpx's)")
        notes.append(f"wp-l4 = the same waypoint process, client, tunnels and requests to {L4_SERVICE}, a second "
                     "service on the reviews-v1/v2 pods declared TCP: no L7 (no HTTP parsing, L4 authz only, a pod per "
                     "tunnel), the waypoint's HBONE floor; wp-only − wp-l4 is what the L7 work costs per request")
    return notes


def waypoint_only_notes(res: ScenarioResult) -> list[str]:
    """The wp-only rows' backend CPU, and the waypoint's own added latency: wp-only minus no-waypoint
    (medians, same client and load point), next to nginx's and haproxy's minus direct."""
    notes = []
    rows = {(r.target, r.client): r for r in res.rows if r.samples}
    wp = [r for (t, _), r in rows.items() if t == "wp-only"]
    if any(r.median("backend_us_per_req") is not None for r in wp):
        notes.append("wp-only backend (benchmarks.connect_http, Python) CPU µs/req: "
                     + ", ".join(f"{r.client.split(' ', 1)[1]} {r.median('backend_us_per_req'):.0f}"
                                 for r in wp if r.median("backend_us_per_req") is not None))
    parts = []
    for r in wp:
        base = rows.get(("no-waypoint", r.client))
        if base is None or r.median("p99_ms") is None or base.median("p99_ms") is None:
            continue
        text = (f"{r.client.split(' ', 1)[1]}: waypoint {r.median('p50_ms') - base.median('p50_ms'):+.2f} / "
                f"{r.median('p99_ms') - base.median('p99_ms'):+.2f} ms")
        for ref in ("nginx", "haproxy"):
            a, d = rows.get((ref, r.client)), rows.get(("direct", r.client))
            if a and d and a.median("p99_ms") is not None and d.median("p99_ms") is not None:
                text += (f", {ref} {a.median('p50_ms') - d.median('p50_ms'):+.2f} / "
                         f"{a.median('p99_ms') - d.median('p99_ms'):+.2f}")
        parts.append(text)
    if parts:
        notes.append("added p50 / p99 hop for hop (wp-only − no-waypoint; nginx/haproxy − direct; medians): "
                     + "; ".join(parts))
    return notes


def _start_waypoint_only(toolbox: Toolbox, workdir: Path, client: Path | None,
                         ca_from: "OursMesh | None" = None) -> "WaypointOnly | str":
    """Start the wp-only parties for the built C client: the parties, or why there are none."""
    if client is None:
        return C_CLIENT_MISSING
    why = ours_waypoint_status()
    if why is not None:
        return why
    nghttpx = toolbox.ensure(["nghttpx"])["nghttpx"]
    if nghttpx is None:
        return "not available: nghttpx not installed (Debian package nghttp2-proxy): it plays node-b"
    try:
        wp = WaypointOnly(workdir, nghttpx, client,
                          ca_dir=ca_from.mesh.ca_dir if ca_from is not None and ca_from.mesh is not None else None)
    except PartyError as err:
        return f"not available: {err}"
    try:
        wp.check_split_and_deny()
    except PartyError as err:
        wp.close()
        return f"not available: {err}"
    return wp


def _measure_c(row: Row, target, seconds: float, client: Path) -> None:
    """One run of the C client for this row: plain HTTP to direct/nginx/haproxy, HBONE to wp-only."""
    if row.client.endswith("/s"):
        args = ["--rate", str(FIXED_RATE), "--tunnels", str(RATE_CONNECTIONS)]
    else:
        args = ["--tunnels", row.client.split("=")[1]]
    args += ["--seconds", f"{seconds:g}"]
    # roots: the processes whose CPU is sampled; proxy: which of them make up "proxy CPU".
    if isinstance(target, (WaypointOnly, WaypointL4)):
        wp = target if isinstance(target, WaypointOnly) else target.wp
        argv = wp.client_argv(*args) if target is wp else wp.l4_argv(*args)
        roots = {"waypoint": wp.waypoint.popen.pid, "nghttpx": wp.nghttpx.pid, "backend": wp.backend.pid}
        proxy_parts: tuple[str, ...] = ("waypoint",)   # the proxy under test; nghttpx has its own column
    elif isinstance(target, NoWaypoint):
        argv = target.wp.ends_argv(*args)
        roots = {"nghttpx": target.wp.nghttpx.pid, "backend": target.wp.backend.pid}
        proxy_parts = ("nghttpx",)   # the only proxy left
    elif isinstance(target, OursMesh):
        argv = target.c_argv(client, *args)
        roots = dict(target.pids)
        proxy_parts = ("node-a", "waypoint", "node-b")   # every hop a request takes
    else:
        addr = target if isinstance(target, str) else f"{HOST}:{target.port[1]}"
        argv = [str(client), "--plain", "--connect", addr, *args]
        roots = {"proxy": target.pid} if isinstance(target, Party) else {}
        proxy_parts = ("proxy",)
    # The client samples these processes' CPU at the edges of its measured window (--cpu-pid), so the
    # CPU per request covers exactly the requests it counted: no set-up, warm-up or drain in it.
    pids = {name: procstat.descendants(pid) for name, pid in roots.items()}
    for tree in pids.values():
        for pid in tree:
            argv += ["--cpu-pid", str(pid)]
    r = run_c_client(argv, timeout=seconds + WRK_TIMEOUT_MARGIN_S)
    window = r.get("pid_cpu_s", {})
    delta = {name: sum(window.get(str(pid)) or 0.0 for pid in tree) for name, tree in pids.items()}
    bad = {k: v for k, v in r["statuses"].items() if k != "200"}
    if bad:
        raise PartyError(f"{C_CLIENT} saw non-200 responses: {bad}")
    n = r["requests"]
    row.add("rps", r["rps"])
    row.add("client_cpu_s", r["cpu_user_s"] + r["cpu_sys_s"])
    if n:
        row.add("client_us_per_req", (r["cpu_user_s"] + r["cpu_sys_s"]) / n * 1e6)
    for k in ("p50_ms", "p99_ms"):
        if r.get(k) is not None:
            row.add(k, r[k])
    if delta and n:
        proxy = sum(delta[k] for k in proxy_parts)
        row.add("proxy_cpu_s", proxy)
        row.add("proxy_us_per_req", proxy / n * 1e6)
        for name, metric in (("waypoint", "waypoint_us_per_req"), ("nghttpx", "nghttpx_us_per_req"),
                             ("backend", "backend_us_per_req")):
            if name in delta:
                row.add(metric, delta[name] / n * 1e6)
    row.info["bodies"] = r.get("bodies", {})


def _measure_load(row: Row, target, seconds: float) -> None:
    if isinstance(target, OursMesh):
        args = target.load_args()
    else:
        addr = target if isinstance(target, str) else f"{HOST}:{target.port[1]}"
        args = ["--target", addr]
    if row.client.endswith("/s"):
        args += ["--rate", str(FIXED_RATE), "--connections", str(RATE_CONNECTIONS)]
    else:
        args += ["--connections", row.client.split("=")[1]]
    argv = python_argv("benchmarks.httpload", *args, "--seconds", f"{seconds:g}")
    proxy_cpu = (lambda: target.cpu()) if isinstance(target, OursMesh) else (
        (lambda: {"proxy": target.cpu().total_s}) if isinstance(target, Party) else None)
    before = proxy_cpu() if proxy_cpu else None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + WRK_TIMEOUT_MARGIN_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PartyError("httpload timed out") from None
    after = proxy_cpu() if proxy_cpu else None
    if proc.returncode != 0:
        raise PartyError(f"httpload exited {proc.returncode}: {proc.stderr.strip()[-200:]}")
    r = parse_last_json(proc.stdout)
    bad = {k: v for k, v in r["statuses"].items() if k != "200"}
    if bad:
        raise PartyError(f"httpload saw non-200 responses: {bad}")
    row.add("rps", r["rps"])
    row.add("client_cpu_s", r["cpu_user_s"] + r["cpu_sys_s"])
    for k in ("p50_ms", "p99_ms"):
        if r.get(k) is not None:
            row.add(k, r[k])
    if before is not None and after is not None and r["requests"]:
        cpu = sum(after.values()) - sum(before.values())
        row.add("proxy_cpu_s", cpu)
        row.add("proxy_us_per_req", cpu / r["requests"] * 1e6)
        if "waypoint" in after:
            row.add("waypoint_us_per_req", (after["waypoint"] - before["waypoint"]) / r["requests"] * 1e6)
    row.info["bodies"] = r.get("bodies", {})


def _nginx(exe: str, workdir: Path, name: str, http: str, port: tuple[str, int]) -> Party:
    """nginx as the party ``name``, serving ``http`` (its part of NGINX_CONF's http block)."""
    path = workdir / f"{name}.conf"
    path.write_text(NGINX_CONF.format(dir=workdir, name=name, http=http))
    p = Party(name, [exe, "-c", str(path), "-p", str(workdir)], workdir, port=port)
    p.start()
    return p


def _check_split_and_deny(host: str, port: int) -> None:
    counts = {"v1": 0, "v2": 0}
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        for _ in range(SPLIT_CHECK_REQUESTS):
            conn.request("GET", "/")
            body = conn.getresponse().read().decode().strip()
            counts[body] = counts.get(body, 0) + 1
        conn.request("GET", "/", headers={"x-deny": "1"})
        resp = conn.getresponse()
        resp.read()
        denied = resp.status
    except (OSError, http.client.HTTPException) as err:
        raise PartyError(f"check requests failed: {err}") from None
    finally:
        conn.close()
    if counts.get("v1") != 18 or counts.get("v2") != 2 or denied != 403:
        raise PartyError(f"split/deny check failed: {counts}, x-deny → {denied}")


_LAT_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(text: str) -> dict:
    """Requests/sec, p50/p99 in ms (needs --latency) and error counts from wrk's text output."""
    out: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise PartyError(f"wrk printed no Requests/sec: {text[-300:]!r}")
    out["rps"] = float(m.group(1))
    for q in ("50", "99"):
        m = re.search(rf"^\s*{q}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if m:
            out[f"p{q}_ms"] = float(m.group(1)) * _LAT_UNITS[m.group(2)]
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def _measure(row: Row, wrk: str, url_addr: str, c: int, seconds: float, proxy: Party | None) -> None:
    argv = [wrk, f"-t{WRK_THREADS}", f"-c{c}", f"-d{seconds:g}s", "--latency", f"http://{url_addr}/"]
    before = proxy.cpu() if proxy else None
    # wrk's own CPU: the children rusage delta across its run (the only child reaped meanwhile).
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + WRK_TIMEOUT_MARGIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise PartyError("wrk timed out") from None
    after = proxy.cpu() if proxy else None
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise PartyError(f"wrk exited {proc.returncode}: {err.strip()[-200:]}")
    r = parse_wrk(out)
    if r["non2xx"] or r["socket_errors"]:
        raise PartyError(f"wrk saw {r['non2xx']} non-2xx responses and {r['socket_errors']} socket errors")
    row.add("rps", r["rps"])
    row.add("client_cpu_s", (kids1.ru_utime - kids0.ru_utime) + (kids1.ru_stime - kids0.ru_stime))
    for k in ("p50_ms", "p99_ms"):
        if k in r:
            row.add(k, r[k])
    if proxy and before is not None and after is not None:
        cpu = (after - before).total_s
        row.add("proxy_cpu_s", cpu)
        if r["requests"]:
            row.add("proxy_us_per_req", cpu / r["requests"] * 1e6)
