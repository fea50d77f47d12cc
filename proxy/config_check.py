"""``hbone-proxy config check FILE|DIR...``: load configuration the way ``run`` does, and say what
was loaded (counts per kind and per namespace, warnings) or every error, one per line.

Exit status: 0 loaded, 2 bad configuration or bad usage (141, quietly, when the reader of stdout goes
away: ``proxy.cli.EXIT_STDOUT_CLOSED``). Never a traceback: the user gets
``FILE: document N (Kind ns/name): field.path: problem`` lines on stderr.

With ``--scope``/``--gateway``/``--waypoint-ip`` it also shows what a waypoint with that scope would
keep (``policy.scope.scope_for_waypoint``); with ``--node`` the workloads a node proxy would serve.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from policy.documents import load_documents, source_files
from policy.errors import ConfigError, ConfigErrors
from policy.loader import build_mesh_config
from policy.mesh import DEFAULT_ROOT_NAMESPACE, KINDS, MeshConfig
from policy.scope import WaypointScope, node_scope, scope_for_waypoint

EXIT_OK = 0
EXIT_BAD_CONFIG = 2  # DESIGN §4: bad configuration exits 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits 2; we return instead
        raise _UsageError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}")


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hbone-proxy config check", description="Load and validate configuration files "
                "(check is the only subcommand of config).")
    p.add_argument("paths", nargs="+", metavar="FILE|DIR", help="YAML/JSON files or directories of them")
    p.add_argument("--scope", metavar="NS|NS/SA", help="show what a waypoint with scope NS or NS/SA keeps")
    p.add_argument("--gateway", metavar="NS/NAME", help="the waypoint's Gateway (with --scope)")
    p.add_argument("--waypoint-ip", metavar="IP", help="the waypoint's HBONE address IP (with --scope)")
    p.add_argument("--node", metavar="NAME", help="show the workloads a node proxy NAME serves")
    p.add_argument("--root-namespace", default=DEFAULT_ROOT_NAMESPACE, metavar="NS",
                   help="Istio root namespace to check with (default %(default)s, the one `run` always uses: "
                        "run has no such flag)")
    return p


def main(argv: list[str], *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):   # the whole help of `config check`, its only subcommand
        parser = _parser()
        print(parser.format_help().rstrip() if args else parser.format_usage().rstrip(), file=out if args else err)
        return EXIT_OK if args else EXIT_BAD_CONFIG
    if args[0] != "check":
        print(f"hbone-proxy config: unknown subcommand {args[0]!r} (expected: check)", file=err)
        return EXIT_BAD_CONFIG
    try:
        opts = _parser().parse_args(args[1:])
    except _UsageError as usage:
        print(usage, file=err)
        return EXIT_BAD_CONFIG
    except SystemExit as done:  # --help
        return int(done.code or 0)
    try:
        return _check(opts, out, err)
    except ConfigErrors as errors:
        for e in errors.errors:
            print(e.message, file=err)
        n = len(errors.errors)
        print(f"config check: {n} error{'s' if n != 1 else ''}; nothing loaded", file=err)
        return EXIT_BAD_CONFIG
    except ConfigError as error:
        print(error.message, file=err)
        print("config check: 1 error; nothing loaded", file=err)
        return EXIT_BAD_CONFIG
    except BrokenPipeError:   # `config check ... | head -1`: the reader left; proxy/cli.py exits quietly
        raise
    except Exception as bug:  # noqa: BLE001 - never a traceback for the user; say it is our bug
        print(f"config check: internal error ({type(bug).__name__}: {bug}); please report this", file=err)
        return EXIT_BAD_CONFIG


def _check(opts: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    scope = None
    if opts.scope or opts.gateway or opts.waypoint_ip:   # a bad flag is a usage error: said before any loading
        try:
            gateway_ns = opts.gateway.partition("/")[0] if opts.gateway else None
            scope = WaypointScope.parse(opts.scope or gateway_ns or "default",
                                        address_ip=opts.waypoint_ip, gateway=opts.gateway)
        except ValueError as bad:
            print(f"config check: {bad}", file=err)
            return EXIT_BAD_CONFIG
    docs = load_documents(opts.paths)
    files = source_files(opts.paths)
    mesh = build_mesh_config(docs, sources=tuple(files), root_namespace=opts.root_namespace)
    print(f"loaded {len(docs)} document{'s' if len(docs) != 1 else ''} from {len(files)} "
          f"file{'s' if len(files) != 1 else ''}:", file=out)
    for f in files:
        print(f"  {f}", file=out)
    print(file=out)
    print(format_counts(mesh), file=out)
    if mesh.warnings:
        print(f"\nwarnings ({len(mesh.warnings)}):", file=out)
        for w in mesh.warnings:
            print(f"  {w}", file=out)
    if scope is not None:
        scoped = scope_for_waypoint(mesh, scope)
        print(f"\nwaypoint scope {scope} keeps:", file=out)
        print(format_counts(scoped), file=out)
        for s in scoped.inventory.services.values():
            print(f"  service {s.key}", file=out)
    if opts.node:
        workloads = node_scope(mesh, opts.node)
        print(f"\nnode {opts.node} serves {len(workloads)} workload{'s' if len(workloads) != 1 else ''}:", file=out)
        for w in workloads:
            print(f"  {w.namespace}/{w.name} {','.join(w.workload_ips)} {w.protocol}", file=out)
    print("\nOK", file=out)
    return EXIT_OK


def format_counts(mesh: MeshConfig) -> str:
    """A table: one row per kind, columns total then one per namespace."""
    by_ns = mesh.counts_by_namespace()
    totals = mesh.counts()
    namespaces = list(by_ns)
    head = ["KIND", "TOTAL"] + [ns or "(none)" for ns in namespaces]
    rows = [head] + [
        [kind, str(totals[kind])] + [str(by_ns[ns].get(kind, 0)) for ns in namespaces] for kind in KINDS
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        for r in rows
    )
