"""``hbone-proxy proxy-config listeners|clusters|routes|endpoints|all``: istioctl's tables for a running
proxy, read from its admin ``/config_dump`` (views in ``proxy.admin.views``).

Tables are written exactly as istioctl writes them: Go ``text/tabwriter`` (minwidth 0, tabwidth 8,
padchar ' ', flags 0) over rows whose cells istioctl's ``configdump`` writers would print
(``istioctl/pkg/writer/envoy/configdump/{listener,cluster,route,endpoint}.go``).

A node proxy (``run --mode node``) is ztunnel, not Envoy: its dump has no clusters, routes or endpoints,
and its ``listeners`` is a map ``{"hbone <pod ip>": "<ip>:15008", "outbound": ..., "socks5": ...}``.
Against a node, ``listeners`` prints that map as a table (NAME ADDRESS WORKLOAD), ``all`` adds the
workloads and services tables of istioctl's ``ztunnel-config`` (the view ztunnel's users know), the
Envoy-only kinds answer one line saying so, and ``-o json|yaml`` shows the node's own data in full.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import sys
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence

import yaml

from .server import ADMIN_ADDR
from .views import (
    describe_chain_match,
    describe_destination,
    describe_domains,
    describe_management,
    describe_match,
)

# tabwriter padding. istioctl's listener writer uses 1. Current istioctl uses 5 for clusters, routes
# and endpoints, but the seed's output (the istioctl of the 2023 ambient alpha) is padded by 1
# everywhere, and these tables must reproduce the seed's rows byte for byte.
LISTENER_PADDING = 1
TABLE_PADDING = 1
# How long to wait for the admin endpoint (it is local; a proxy that does not answer in 5 s is stuck).
FETCH_TIMEOUT_S = 5.0

KINDS = ("listeners", "clusters", "routes", "endpoints")


# ---------------------------------------------------------------------------------------------
# Go text/tabwriter


def tabwrite(rows: Sequence[Sequence[str]], padding: int, minwidth: int = 0) -> str:
    """Go ``text/tabwriter`` with padchar ' ' and no flags, for ``"\\t".join(row) + "\\n"`` per row.

    As in Go, each cell but a row's last is tab-terminated and belongs to a column; a column block is a
    run of consecutive rows that have a cell in that column, and its width is the widest cell in the
    block plus ``padding``. A row with fewer cells ends the blocks of the columns it lacks (Go's
    ``format`` recursion). Cell width is the rune count; tabwidth only matters for padchar '\\t'.
    """
    lines = [list(r) for r in rows]
    out: list[str] = []
    widths: list[int] = []

    def write_lines(line0: int, line1: int) -> None:
        for line in lines[line0:line1]:
            parts = []
            for j, cell in enumerate(line):
                parts.append(cell)
                if j < len(widths):
                    parts.append(" " * (widths[j] - len(cell)))
            out.append("".join(parts))

    def fmt(line0: int, line1: int) -> None:
        column = len(widths)
        this = line0
        while this < line1:
            if column >= len(lines[this]) - 1:
                this += 1
                continue
            write_lines(line0, this)   # rows before the block, formatted with the outer columns
            line0 = this
            width = minwidth
            while this < line1 and column < len(lines[this]) - 1:
                width = max(width, len(lines[this][column]) + padding)
                this += 1
            widths.append(width)
            fmt(line0, this)
            widths.pop()
            line0 = this
        write_lines(line0, line1)

    fmt(0, len(lines))
    return "".join(line + "\n" for line in out)


# ---------------------------------------------------------------------------------------------
# Tables (pure: config-dump JSON in, text out)


def listener_rows(dump: Mapping[str, Any], *, waypoint: bool) -> list[tuple[str, ...]]:
    listeners = dump.get("listeners", [])
    if waypoint:
        # istioctl PrintRemoteListenerSummary: LISTENER CHAIN MATCH DESTINATION, one row per chain.
        rows = [("LISTENER", "CHAIN", "MATCH", "DESTINATION")]
        for lst in listeners:
            for chain in lst.get("filterChains", []):
                rows.append((f"envoy://{lst['name']}", chain.get("name", ""),
                             describe_chain_match(chain.get("match", {})),
                             describe_destination(chain.get("destination", {}))))
        return rows
    # istioctl PrintListenerSummary: ADDRESSES PORT MATCH DESTINATION; internal listeners have no socket.
    rows = [("ADDRESSES", "PORT", "MATCH", "DESTINATION")]
    for lst in listeners:
        addr = lst.get("address", "")
        if lst.get("internal"):
            host, port = addr, "-"
        else:
            host, _, port = addr.rpartition(":")
        for chain in lst.get("filterChains", []):
            rows.append((host, port, describe_chain_match(chain.get("match", {})),
                         describe_destination(chain.get("destination", {}))))
    return rows


def _split_cluster(name: str) -> tuple[str, str, str, str]:
    """model.ParseSubsetKey for ``direction|port|subset|fqdn``; other names print ``name - - -``."""
    parts = name.split("|")
    if len(parts) == 4:
        direction, port, subset, fqdn = parts
        return fqdn, port, subset or "-", direction
    return name, "-", "-", "-"


def cluster_rows(dump: Mapping[str, Any], *, direction: str | None = None) -> list[tuple[str, ...]]:
    rows = []
    for c in dump.get("clusters", []):
        name = c["name"]
        # istioctl ClusterFilter.Verify: the direction filter is a substring test on the name.
        if direction and direction not in name:
            continue
        fqdn, port, subset, dirn = _split_cluster(name)
        rows.append((fqdn, port, subset, dirn, c.get("type", ""), c.get("destinationRule", "")))
    # istioctl sorts by service FQDN, then subset, then port, then direction.
    rows.sort(key=lambda r: (r[0], r[2], int(r[1]) if r[1].isdigit() else -1, r[3]))
    return [("SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "DESTINATION RULE"), *rows]


def route_rows(dump: Mapping[str, Any], *, name: str | None = None) -> list[tuple[str, ...]]:
    rows = [("NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE")]
    for rc in dump.get("routes", []):
        if name and rc["name"] != name:
            continue
        vhosts = rc.get("virtualHosts", [])
        if not vhosts:
            rows.append((rc["name"], "", "", ""))
        for vh in vhosts:
            domains = describe_domains(vh.get("domains", []))
            for r in vh.get("routes", []):
                rows.append((rc["name"], domains, describe_match(r.get("match", {})), describe_management(r)))
            if not vh.get("routes"):   # istioctl: a virtual host with no routes answers 404
                rows.append((rc["name"], domains, "/*", "404"))
    return rows


def endpoint_rows(dump: Mapping[str, Any], *, direction: str | None = None) -> list[tuple[str, ...]]:
    eps = [e for e in dump.get("endpoints", []) if not direction or direction in e.get("cluster", "")]
    rows = sorted((e["address"], e.get("status", "HEALTHY"), e.get("outlierCheck", "OK"), e["cluster"]) for e in eps)
    return [("ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER"), *rows]


def listeners_table(dump: Mapping[str, Any], *, waypoint: bool = True) -> str:
    return tabwrite(listener_rows(dump, waypoint=waypoint), LISTENER_PADDING)


def clusters_table(dump: Mapping[str, Any], *, direction: str | None = None) -> str:
    return tabwrite(cluster_rows(dump, direction=direction), TABLE_PADDING)


def routes_table(dump: Mapping[str, Any], *, name: str | None = None) -> str:
    return tabwrite(route_rows(dump, name=name), TABLE_PADDING)


def endpoints_table(dump: Mapping[str, Any], *, direction: str | None = None) -> str:
    return tabwrite(endpoint_rows(dump, direction=direction), TABLE_PADDING)


def _named(kind: str, header: tuple[str, ...], rows: list[tuple[str, ...]], names: list[str]) -> list[tuple[str, ...]]:
    return [("NAME", *header), *((f"{kind}/{n}", *r) for n, r in zip(names, rows))]


def all_tables(dump: Mapping[str, Any], *, waypoint: bool = False, direction: str | None = None) -> str:
    """``proxy-config all``: istioctl's ``PrintFullSummary`` — clusters, listeners, routes, endpoints,
    each table separated by a blank line and each row led by a NAME cell naming the resource
    (``cluster/<name>``, ``listener/<name>``, ``route/<name>``, ``endpoint/<address>``)."""
    # clusters: the full Envoy name, in the table's order
    clusters = [c for c in dump.get("clusters", []) if not direction or direction in c["name"]]
    named = []
    for c in clusters:
        fqdn, port, subset, dirn = _split_cluster(c["name"])
        named.append((c["name"], (fqdn, port, subset, dirn, c.get("type", ""), c.get("destinationRule", ""))))
    named.sort(key=lambda nr: (nr[1][0], nr[1][2], int(nr[1][1]) if nr[1][1].isdigit() else -1, nr[1][3]))
    c_table = _named("cluster", cluster_rows({})[0], [r for _, r in named], [n for n, _ in named])
    # listeners: one row per filter chain, named by its listener
    l_rows = listener_rows(dump, waypoint=waypoint)
    l_names = [lst["name"] for lst in dump.get("listeners", []) for _ in lst.get("filterChains", [])]
    l_table = _named("listener", l_rows[0], l_rows[1:], l_names)
    # routes already lead with NAME (the route configuration's name): it gains the prefix in place
    r_rows = route_rows(dump)
    r_table = [r_rows[0], *((f"route/{r[0]}", *r[1:]) for r in r_rows[1:])]
    e_rows = endpoint_rows(dump, direction=direction)
    e_table = _named("endpoint", e_rows[0], e_rows[1:], [r[0] for r in e_rows[1:]])
    return "\n".join((tabwrite(c_table, TABLE_PADDING), tabwrite(l_table, LISTENER_PADDING),
                      tabwrite(r_table, TABLE_PADDING), tabwrite(e_table, TABLE_PADDING)))


# ---------------------------------------------------------------------------------------------
# A node proxy's dump (proxy.node.NodeProxy.config_dump): ztunnel's view, not Envoy's


class NotOnNode(ValueError):
    """An Envoy-only view (clusters, routes, endpoints) asked of a node proxy; the message says so."""


def is_node_dump(dump: Mapping[str, Any]) -> bool:
    """A node proxy's dump: ``mode: node`` (its ``listeners`` is a name → address map)."""
    return dump.get("mode") == "node" or isinstance(dump.get("listeners"), dict)


def _ip_key(addr: str) -> tuple[int, Any, str]:
    host = addr.rpartition(":")[0].strip("[]")
    try:
        return (0, ipaddress.ip_address(host), addr)
    except ValueError:
        return (1, 0, addr)


def node_listener_rows(dump: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """NAME ADDRESS WORKLOAD: the per-pod HBONE listeners (by pod IP, each with its local workload),
    then the node-wide ones (outbound, socks5, inbound_plaintext) in the dump's order."""
    listeners = dump.get("listeners") or {}
    pods = {w.get("ip"): f"{w.get('namespace')}/{w.get('name')}" for w in dump.get("local_workloads", [])
            if isinstance(w, dict)}
    hbone = sorted(((n, a) for n, a in listeners.items() if n.startswith("hbone ")), key=lambda na: _ip_key(na[1]))
    other = [(n, a) for n, a in listeners.items() if not n.startswith("hbone ")]
    rows = [("NAME", "ADDRESS", "WORKLOAD")]
    rows += [(n, str(a), pods.get(n.partition(" ")[2], "-")) for n, a in hbone]
    rows += [(n, str(a), "-") for n, a in other]
    return rows


def node_workload_rows(dump: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """istioctl ztunnel-config workloads' columns this dump has: NAMESPACE POD NAME ADDRESS NODE PROTOCOL."""
    rows = [(w.get("namespace", ""), w.get("name", ""), ",".join(w.get("ips", [])), w.get("node") or "",
             w.get("protocol", "")) for w in dump.get("workloads", []) if isinstance(w, dict)]
    return [("NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL"), *sorted(rows)]


def node_service_rows(dump: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """istioctl ztunnel-config services: NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS (a count:
    this dump has no per-endpoint health)."""
    rows = [(s.get("namespace", ""), s.get("name", ""), ",".join(s.get("vips", [])),
             s.get("waypoint") or "None", str(len(s.get("endpoints", []))))
            for s in dump.get("services", []) if isinstance(s, dict)]
    return [("NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"), *sorted(rows)]


def render_node(dump: Mapping[str, Any], kind: str, *, output: str = "table") -> str:
    """A node proxy's ``proxy-config``: see the module docstring. Raises NotOnNode for the Envoy kinds."""
    if kind not in ("listeners", "all"):
        node = dump.get("node") or "?"
        raise NotOnNode(f"this is a node proxy (node {node}), which has no {kind} (a waypoint's Envoy view); "
                        f"try: proxy-config listeners, or proxy-config all [-o yaml] for its whole state")
    if output in ("json", "yaml"):
        picked: Any = dict(dump) if kind == "all" else dump.get("listeners") or {}
        return json.dumps(picked, indent=4) + "\n" if output == "json" else to_yaml(picked)
    if kind == "listeners":
        return tabwrite(node_listener_rows(dump), LISTENER_PADDING)
    return "\n".join((tabwrite(node_listener_rows(dump), LISTENER_PADDING),
                      tabwrite(node_workload_rows(dump), TABLE_PADDING),
                      tabwrite(node_service_rows(dump), TABLE_PADDING)))


def select(dump: Mapping[str, Any], kind: str, *, name: str | None = None,
           direction: str | None = None) -> list[dict]:
    """The raw JSON objects a table would show (for ``-o json|yaml``), filtered the same way."""
    items = list(dump.get(kind, []))
    if kind == "routes" and name:
        items = [r for r in items if r.get("name") == name]
    if kind == "clusters" and direction:
        items = [c for c in items if direction in c.get("name", "")]
    if kind == "endpoints" and direction:
        items = [e for e in items if direction in e.get("cluster", "")]
    return items


# ---------------------------------------------------------------------------------------------
# YAML as istioctl prints it (sigs.k8s.io/yaml: sorted keys, indentless lists, strings that would
# read back as another type double-quoted: hostSelectionRetryMaxAttempts: "5").


class _IstioctlDumper(yaml.SafeDumper):
    pass


_QUOTED_TYPES = frozenset({"int", "float", "bool", "null", "timestamp"})


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    implicit = dumper.resolve(yaml.ScalarNode, value, (True, False)).rpartition(":")[2]
    if value and implicit in _QUOTED_TYPES:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_IstioctlDumper.add_representer(str, _str)


def to_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_IstioctlDumper, sort_keys=True, default_flow_style=False, width=1 << 16)


# ---------------------------------------------------------------------------------------------
# CLI


class FetchError(Exception):
    """The admin endpoint could not be reached or answered nonsense; the message says which."""


def admin_url(admin: str, path: str) -> str:
    base = admin if admin.startswith(("http://", "https://")) else f"http://{admin}"
    return base.rstrip("/") + path


def fetch_json(admin: str, path: str, *, body: dict | None = None, timeout: float = FETCH_TIMEOUT_S) -> Any:
    url = admin_url(admin, path)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace").strip()
        try:
            detail = json.loads(detail).get("error", detail)
        except (ValueError, AttributeError):
            pass
        raise FetchError(f"{url}: HTTP {err.code}: {detail}") from None
    except urllib.error.URLError as err:
        raise FetchError(f"cannot reach the admin endpoint at {admin} ({err.reason}); is the proxy running "
                         f"and is --admin right?") from None
    except (TimeoutError, socket.timeout):
        raise FetchError(f"the admin endpoint at {admin} did not answer within {timeout:g}s") from None
    except (ConnectionError, OSError) as err:
        raise FetchError(f"cannot reach the admin endpoint at {admin}: {err}") from None
    try:
        return json.loads(raw)
    except ValueError as err:
        raise FetchError(f"{url} did not return JSON: {err}") from None


def render(dump: Mapping[str, Any], kind: str, *, output: str = "table", name: str | None = None,
           direction: str | None = None, waypoint: bool = False) -> str:
    if is_node_dump(dump):
        return render_node(dump, kind, output=output)
    kinds = KINDS if kind == "all" else (kind,)
    if output in ("json", "yaml"):
        picked: Any = ({k: select(dump, k, name=name, direction=direction) for k in kinds} if kind == "all"
                       else select(dump, kind, name=name, direction=direction))
        return json.dumps(picked, indent=4) + "\n" if output == "json" else to_yaml(picked)
    if kind == "all":
        return all_tables(dump, waypoint=waypoint, direction=direction)
    tables = {
        "listeners": lambda: listeners_table(dump, waypoint=waypoint),
        "clusters": lambda: clusters_table(dump, direction=direction),
        "routes": lambda: routes_table(dump, name=name),
        "endpoints": lambda: endpoints_table(dump, direction=direction),
    }
    return tables[kind]()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hbone-proxy proxy-config",
        description="Show a running proxy's listeners, clusters, routes and endpoints as istioctl does.")
    p.add_argument("kind", choices=(*KINDS, "all"))
    p.add_argument("--admin", default=ADMIN_ADDR, metavar="ADDR", help=f"admin address (default {ADMIN_ADDR})")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.add_argument("--name", help="routes: only the route configuration with this name")
    p.add_argument("--direction", choices=("inbound", "outbound", "inbound-vip"),
                   help="clusters/endpoints: only this traffic direction")
    p.add_argument("--waypoint", action="store_true",
                   help="listeners: the waypoint view (LISTENER CHAIN MATCH DESTINATION); a node proxy has one view")
    p.add_argument("--timeout", type=float, default=FETCH_TIMEOUT_S, help="seconds to wait for the proxy")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        dump = fetch_json(args.admin, "/config_dump", timeout=args.timeout)
    except FetchError as err:
        print(f"hbone-proxy proxy-config: {err}", file=sys.stderr)
        return 1
    if not isinstance(dump, dict):
        print("hbone-proxy proxy-config: /config_dump is not a JSON object", file=sys.stderr)
        return 1
    try:
        text = render(dump, args.kind, output=args.output, name=args.name, direction=args.direction,
                      waypoint=args.waypoint)
    except NotOnNode as err:
        print(f"hbone-proxy proxy-config: {args.admin}: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0
