"""The guided tour: each step measures something on the running mesh and says it in plain words.

Each step is a function ``step_N(mesh, out) -> facts`` that talks to the mesh only through what a
user has — SOCKS5 on a node proxy, the admin endpoint (with the same code as ``hbone-proxy
proxy-config`` / ``explain``), ``/metrics`` — and writes text to ``out``. A step that sees something
wrong raises ``TourError`` with one line saying what; the caller turns it into an exit status.
"""

from __future__ import annotations

import collections
import hashlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TextIO

from policy.scope import MeshShape, config_scaling, format_pct
from proxy.admin.explain import ExplainRequest, format_answer
from proxy.admin.proxy_config import FetchError, fetch_json, render

from .bookinfo import (APP_PORT, AUTHZ_POLICY, ECHO_PORT, GATEWAY, NAMESPACE, NODES, PODS, SERVICES, WAYPOINT_SA,
                       WAYPOINT_SCOPE, Layout, fqdn, spiffe)
from .mesh import Proc, SocksError, SocksHTTPConnection, get, socks5_connect

# Step 2: how many requests productpage sends (issue 6), over one keep-alive connection.
SPLIT_REQUESTS = 200
# Step 4: bytes echoed through the mesh; large enough for a throughput number, small for the budget.
TCP_BYTES = 4 * 1024 * 1024
# A client socket gives up after this long: the mesh is local, 10 s means something is stuck.
CLIENT_TIMEOUT_S = 10.0
# Step 6: the seed's mesh, and the one 10x larger (more deployments per namespace: the dimension
# that makes sidecar config grow with its square, the seed's "polynomial scaling problem").
SEED_SHAPE = MeshShape(namespaces=2, deployments=25, pods=10, waypoint_replicas=2)
LARGER_SHAPE = MeshShape(namespaces=2, deployments=250, pods=10, waypoint_replicas=2)
# Step 7: the metric families shown.
METRIC_NAMES = ("istio_requests_total",)
MiB = 1024 * 1024


class TourError(Exception):
    """A step saw something other than what the mesh should do; the message says what."""


@dataclass
class DemoMesh:
    """What the tour needs of the running mesh."""

    layout: Layout
    node: dict[str, Proc]
    waypoint: Proc
    workdir: str


def heading(out: TextIO, n: int, title: str) -> None:
    line = f"{n}. {title}"
    out.write(f"\n{line}\n{'-' * len(line)}\n")


def table(rows: list[tuple[str, ...]], *, right: tuple[int, ...] = (), indent: str = "  ") -> str:
    """Columns padded to their widest cell (``right``: column indexes aligned right)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append(indent + "  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def indent(text: str, prefix: str = "  ") -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(True))


# ---------------------------------------------------------------------------------------------
# 1. Topology


def step_topology(m: DemoMesh, out: TextIO) -> None:
    heading(out, 1, "The mesh: who runs where")
    L = m.layout
    out.write("Every pod is a loopback address; its identity comes from its service account.\n\n")
    rows = [("POD", "IP", "NODE", "IDENTITY (SPIFFE)", "ROLE")]
    for p in PODS:
        rows.append((p.name, L.pod(p.last), p.node, spiffe(p.sa), p.role))
    rows.append((f"{WAYPOINT_SA}-0", L.waypoint_ip, "node-a", spiffe(WAYPOINT_SA), f"waypoint for {WAYPOINT_SCOPE}"))
    out.write(table(rows))
    out.write("\nServices (VIP:port):\n")
    rows = [("SERVICE", "VIP", "PROTOCOL", "WAYPOINT")]
    for name, (vip, port, proto, wp) in SERVICES.items():
        rows.append((fqdn(name), f"{L.vip(vip)}:{port}", proto, f"{GATEWAY} ({L.waypoint_ip}:15008)" if wp else "-"))
    out.write(table(rows))
    out.write("\nProxies (each an `hbone-proxy run` process):\n")
    rows = [("PROXY", "MODE", "HBONE (15008)", "SOCKS5", "ADMIN", "SERVES")]
    for node in NODES:
        pods = ", ".join(p.name for p in PODS if p.node == node)
        rows.append((node, "node (ztunnel)", "each pod's IP", m.node[node].addr("socks5"),
                     m.node[node].addr("admin"), pods))
    rows.append(("waypoint", "waypoint", L.waypoint_ip, "-", m.waypoint.addr("admin"),
                 f"--scope {WAYPOINT_SCOPE}: the reviews pods"))
    out.write(table(rows))
    out.write("\nPolicy: VirtualService reviews sends 90 % to subset v1 and 10 % to v2 (none to v3);\n"
              f"AuthorizationPolicy {AUTHZ_POLICY} lets only {spiffe('bookinfo-productpage')} call reviews.\n"
              "Both are enforced by the destination's waypoint, not by the caller.\n")


# ---------------------------------------------------------------------------------------------
# 2. The 90/10 split


def step_split(m: DemoMesh, out: TextIO, n: int = SPLIT_REQUESTS) -> collections.Counter:
    heading(out, 2, f"productpage calls reviews {n} times")
    L = m.layout
    out.write(f"productpage ({L.ip_of('productpage-v1-0')}) -> SOCKS5 on node-a -> HBONE (mTLS, HTTP/2 CONNECT)\n"
              f"-> waypoint {L.waypoint_ip}:15008 (authorize, pick a subset) -> HBONE -> node-b -> reviews pod\n\n")
    conn = SocksHTTPConnection(m.node["node-a"].socks5, fqdn("reviews"), APP_PORT,
                               source_ip=L.ip_of("productpage-v1-0"), timeout=CLIENT_TIMEOUT_S)
    counts: collections.Counter = collections.Counter()
    start = time.monotonic()
    try:
        for _ in range(n):
            status, body = get(conn)
            if status != 200:
                raise TourError(f"reviews answered {status} {body[:80]!r} to productpage (expected 200)")
            counts[body.decode(errors="replace").strip()] += 1
    except (OSError, SocksError) as err:
        raise TourError(f"productpage could not reach reviews through the mesh: {err}") from None
    finally:
        conn.close()
    elapsed = time.monotonic() - start
    weights = {"v1": 90, "v2": 10, "v3": 0}
    rows = [("VERSION", "RESPONSES", "SHARE", "WEIGHT")]
    for v, w in weights.items():
        got = counts.get(f"reviews-{v}", 0)
        rows.append((v, str(got), f"{100 * got / n:.1f} %", f"{w} %"))
    out.write(table(rows, right=(1, 2, 3)))
    other = {k: c for k, c in counts.items() if k not in {f"reviews-{v}" for v in weights}}
    if other:
        raise TourError(f"unexpected answers: {other}")
    out.write(f"\n{n} requests in {elapsed:.2f} s ({n / elapsed:.0f} requests/s) over one keep-alive connection;\n"
              "the waypoint picks a subset per request, so one connection still sees the 90/10 split.\n")
    return counts


# ---------------------------------------------------------------------------------------------
# 3. The deny, and why


def step_deny(m: DemoMesh, out: TextIO) -> dict:
    heading(out, 3, "Another identity calls reviews: denied")
    L = m.layout
    sleep_ip = L.ip_of("sleep-0")
    conn = SocksHTTPConnection(m.node["node-a"].socks5, fqdn("reviews"), APP_PORT, source_ip=sleep_ip,
                               timeout=CLIENT_TIMEOUT_S)
    try:
        status, body = get(conn)
    except (OSError, SocksError) as err:
        raise TourError(f"sleep could not reach the reviews waypoint: {err}") from None
    finally:
        conn.close()
    out.write(f"sleep ({sleep_ip}, {spiffe('sleep')}) GET http://{fqdn('reviews')}:{APP_PORT}/\n"
              f"  -> HTTP {status} {body.decode(errors='replace')!r}\n")
    if status != 403:
        raise TourError(f"sleep got {status} from reviews (expected 403 from the waypoint's policy)")
    req = ExplainRequest(spiffe("sleep"), f"{L.service_vip('reviews')}:{APP_PORT}", "GET", "/")
    admin = m.waypoint.addr("admin")
    try:
        ans = fetch_json(admin, "/explain", body=req.to_json())
    except FetchError as err:
        raise TourError(f"explain: {err}") from None
    authz = ans.get("authorization") or {}
    out.write(f"\nWhy? Ask the waypoint (the same as `hbone-proxy explain --admin {admin} --from {spiffe('sleep')}\n"
              f"--to {req.to} --method GET --path /`):\n\n")
    out.write(indent(format_answer(req, ans), "  | "))
    decided = authz.get("decidedBy")
    evaluated = [p.get("name") for p in authz.get("policies", [])]
    policy = f"{NAMESPACE}/{AUTHZ_POLICY}"
    if ans.get("decision") != "deny" or policy not in (decided, *evaluated):
        raise TourError(f"explain did not name {policy} for the deny: {authz}")
    if decided:
        out.write(f"\nThe deciding policy is {decided}.\n")
    else:
        out.write(f"\nThe deciding policy is {policy}: the only ALLOW policy on reviews, and it matches only\n"
                  "productpage's identity. Istio: \"If there are any ALLOW policies for the workload, a request\n"
                  "is allowed only if it matches one of them\" (Envoy: matched_policy[none]). So the waypoint\n"
                  "answers 403 itself; the request never reaches a reviews pod.\n")
    return ans


# ---------------------------------------------------------------------------------------------
# 4. A TCP flow


def step_tcp(m: DemoMesh, out: TextIO, size: int = TCP_BYTES) -> dict:
    heading(out, 4, "A TCP flow through the mesh")
    L = m.layout
    src = L.ip_of("productpage-v1-0")
    payload = os.urandom(size)
    received = bytearray()
    start = time.monotonic()
    try:
        sock = socks5_connect(m.node["node-a"].socks5, fqdn("tcp-echo"), ECHO_PORT, source_ip=src,
                              timeout=CLIENT_TIMEOUT_S)
    except (OSError, SocksError) as err:
        raise TourError(f"productpage could not open a TCP flow to tcp-echo: {err}") from None
    failed: list[BaseException] = []

    def reader() -> None:
        try:
            while True:
                chunk = sock.recv(MiB)
                if not chunk:
                    return
                received.extend(chunk)
        except OSError as err:
            failed.append(err)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)   # half-close: the echo server sees our FIN, echoes the rest, then FINs
        t.join(CLIENT_TIMEOUT_S * 3)
    except OSError as err:
        raise TourError(f"the TCP flow broke: {err}") from None
    finally:
        sock.close()
    elapsed = time.monotonic() - start
    if t.is_alive() or failed:
        raise TourError(f"the echo did not finish: {failed[0] if failed else 'timed out'}")
    sent_hash, got_hash = hashlib.sha256(payload).hexdigest(), hashlib.sha256(received).hexdigest()
    ok = len(received) == size and sent_hash == got_hash
    out.write(f"productpage ({src}) -> SOCKS5 node-a -> HBONE -> node-b -> tcp-echo ({L.ip_of('tcp-echo-0')}:{ECHO_PORT})\n"
              "L4 only: tcp-echo has no waypoint, so node-a tunnels straight to the pod's node proxy.\n\n")
    rows = [("", "BYTES", "SHA-256")]
    rows.append(("sent", f"{size:,}", sent_hash[:16] + "..."))
    rows.append(("echoed back", f"{len(received):,}", got_hash[:16] + "..."))
    out.write(table(rows, right=(1,)))
    mbps = 2 * size / elapsed / MiB
    out.write(f"\n{'byte-exact' if ok else 'MISMATCH'}: {size / MiB:g} MiB each way in {elapsed:.2f} s "
              f"({mbps:.0f} MiB/s both directions), half-close respected.\n")
    if not ok:
        raise TourError(f"the echo came back different: {len(received)} of {size} bytes")
    return {"bytes": size, "seconds": elapsed, "sha256": got_hash}


# ---------------------------------------------------------------------------------------------
# 5. proxy-config


def step_proxy_config(m: DemoMesh, out: TextIO) -> dict:
    heading(out, 5, "What the waypoint holds: proxy-config")
    admin = m.waypoint.addr("admin")
    try:
        dump = fetch_json(admin, "/config_dump")
    except FetchError as err:
        raise TourError(f"proxy-config: {err}") from None
    for kind, extra, title in (("listeners", " --waypoint", "listeners (the waypoint view)"),
                               ("clusters", "", "clusters"), ("routes", "", "routes"),
                               ("endpoints", "", "endpoints")):
        out.write(f"\n$ hbone-proxy proxy-config {kind} --admin {admin}{extra}\n")
        out.write(render(dump, kind, waypoint=kind == "listeners"))
    clusters = [c["name"] for c in dump.get("clusters", [])]
    outbound = [c for c in clusters if c.startswith("outbound")]
    held = sorted({s["hostname"] for s in dump.get("services", [])})
    all_services = sorted(fqdn(s) for s in SERVICES)
    missing = [s for s in all_services if s not in held]
    out.write(f"\nThe waypoint holds {len(held)} service(s): {', '.join(held) or 'none'}; "
              f"{len(outbound)} outbound clusters.\n"
              f"Not in its scope, so not in its config: {', '.join(missing)}.\n")
    if fqdn("reviews") not in held or outbound:
        raise TourError(f"the waypoint's config is not its scope: services {held}, outbound clusters {outbound}")
    return dump


# ---------------------------------------------------------------------------------------------
# 6. Configuration scaling


def step_scaling(out: TextIO) -> tuple:
    heading(out, 6, "Why destination waypoints scale: configuration pieces")
    seed = config_scaling(SEED_SHAPE)
    larger = config_scaling(LARGER_SHAPE)
    for scaling, what in ((seed, "The seed's mesh"), (larger, "10x larger (10x the deployments per namespace)")):
        s = scaling.shape
        out.write(f"\n{what}: {s.namespaces} namespaces x {s.deployments} deployments x {s.pods} pods, "
                  f"{s.waypoint_replicas} waypoint replicas per namespace\n\n")
        out.write(scaling.table(indent="  ") + "\n")
    out.write(f"\nCounted by the proxy's own scoping code (policy.scope.scope_for_waypoint) on generated meshes:\n"
              f"a sidecar carries every service of its namespace, a waypoint only the services bound to it.\n"
              f"Seed: {seed.sidecar_total:,} vs {seed.waypoint_total:,} ({format_pct(seed.waypoint_total, seed.sidecar_total)}). "
              f"10x the deployments: {larger.sidecar_total:,} vs {larger.waypoint_total:,} "
              f"({format_pct(larger.waypoint_total, larger.sidecar_total)}) -\nsidecar config grows with the square of the deployments, "
              "waypoint config linearly.\n")
    return seed, larger


# ---------------------------------------------------------------------------------------------
# 7. Metrics


def metric_lines(text: str, *, names: tuple[str, ...] = METRIC_NAMES, reporter: str = "waypoint") -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith(tuple(n + "{" for n in names)) and f'reporter="{reporter}"' in line]


def labels_of(line: str) -> dict[str, str]:
    inner = line[line.index("{") + 1:line.rindex("}")]
    out = {}
    for part in _split_labels(inner):
        k, _, v = part.partition("=")
        out[k] = v.strip('"')
    return out


def _split_labels(inner: str) -> list[str]:
    parts, cur, quoted = [], "", False
    for ch in inner:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        parts.append(cur)
    return parts


def step_metrics(m: DemoMesh, out: TextIO, counts: collections.Counter) -> list[str]:
    heading(out, 7, "The waypoint's metrics")
    status, body = m.waypoint.get("metrics", "/metrics")
    if status != 200:
        raise TourError(f"/metrics answered {status}")
    lines = metric_lines(body.decode(errors="replace"))
    codes = {labels_of(l).get("response_code") for l in lines}
    out.write(f"$ curl -s {m.waypoint.url('metrics', '/metrics')} | grep 'istio_requests_total{{.*reporter=\"waypoint\"'\n\n")
    for line in lines:
        out.write(line + "\n")
    rows = [("SOURCE PRINCIPAL", "DESTINATION", "WORKLOAD", "CODE", "REQUESTS")]
    for line in lines:
        lab = labels_of(line)
        value = line.rsplit(" ", 1)[1]
        rows.append((lab.get("source_principal", "?"), lab.get("destination_service", "?"),
                     lab.get("destination_workload", "?"), lab.get("response_code", "?"),
                     value.removesuffix(".0")))
    out.write("\nIn short (the 403 has no destination workload: the waypoint answered it itself):\n\n"
              + table(rows, right=(4,)))
    if not {"200", "403"} <= codes:
        raise TourError(f"the waypoint's istio_requests_total lacks response_code 200 and 403: {codes}")
    return lines

