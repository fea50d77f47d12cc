"""``python -m benchmarks`` / ``hbone-proxy bench`` / ``make bench``: run the scenarios, print the
tables, write JSON.

Every party runs as its own process; see benchmarks/tunnel.py and benchmarks/http.py for what each
row is. ``--quick`` (default) fits in about 5 minutes on a 2-core machine; ``--full`` uses the
issue's sizes (1 GiB transfers, 8 000 idle tunnels, longer HTTP runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass

from benchmarks import report
from benchmarks.tools import Toolbox

MiB = 1024 * 1024
DEFAULT_REPEAT = 3  # the issue: medians over ≥ 3 repetitions


@dataclass(frozen=True)
class Sizes:
    bulk_bytes: int
    short_count: int
    idle_counts: tuple[int, ...]
    http_seconds: float
    config_workloads: int
    conn_count: int  # new connections per run in the workers scenario


# Quick: the config scenario loads 10 000 workloads, not 100 000 (PyYAML takes ~0.4 ms per workload
# here, so 100 000 loaded twice per repetition alone would take ~4 of the 5 minutes; 20 000 took ~55 s
# of a 296 s quick run, too close to the 5-minute budget).
# HTTP: 2.5 s per run. Quick mode's 18 rows (6 targets × c=1, c=64, 1 000/s, all from the C client) ×
# 3 repetitions at ~0.35 s of set-up + warm-up each take ~18 × 3 × 2.85 ≈ 155 s plus ~5 s to start the
# parties, inside the ~180 s the scenario has of the 5 minutes; 3 s runs came to ~185 s. At 1 000 req/s
# a run still has 2 500 latencies per p99.
# Workers: 1 000 new connections take ~1-2 s per row here (each is a full mTLS handshake on both
# sides), so 4 rows × 3 repetitions stay under ~40 s.
QUICK = Sizes(bulk_bytes=256 * MiB, short_count=3_000, idle_counts=(1_000, 8_000), http_seconds=2.5,
              config_workloads=10_000, conn_count=1_000)
FULL = Sizes(bulk_bytes=1024 * MiB, short_count=20_000, idle_counts=(1_000, 8_000), http_seconds=10.0,
             config_workloads=100_000, conn_count=5_000)

# Scenario names for --only, in run order.
SCENARIOS = ("upload", "download", "multi64", "short", "idle", "workers", "authz", "http", "config")


def parse_args(argv: list[str], prog: str = "hbone-proxy bench") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", help="quick sizes (default; < 5 minutes)")
    mode.add_argument("--full", dest="full", action="store_true", help="the issue's sizes (1 GiB, longer runs)")
    ap.set_defaults(full=False)
    ap.add_argument("--only", action="append", metavar="SCENARIO",
                    help=f"run only these (repeatable or comma-separated): {', '.join(SCENARIOS)}")
    ap.add_argument("--json", default="bench-results.json", metavar="PATH", help="where to write results")
    ap.add_argument("--repeat", type=int, default=DEFAULT_REPEAT, metavar="N", help="repetitions per row")
    ap.add_argument("--clients", default="python-h2,node-http2",
                    help="HTTP/2 load clients for the tunnel scenarios (python-h2: 1 MiB frames; node-http2: 16 KiB)")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install missing reference tools")
    # Size overrides, for tiny smoke runs and experiments.
    ap.add_argument("--bytes", type=int, help="bulk transfer size in bytes (overrides the mode's)")
    ap.add_argument("--short-count", type=int, help="short tunnels per run")
    ap.add_argument("--idle-counts", help="comma-separated idle tunnel counts")
    ap.add_argument("--http-seconds", type=float, help="duration of each timed HTTP run (every client: C client, wrk, httpload)")
    ap.add_argument("--config-workloads", type=int, help="inventory size for the config scenario")
    ap.add_argument("--conn-count", type=int, help="new connections per run in the workers scenario")
    ap.add_argument("--conn-client", choices=("auto", "c", "python"), default="auto",
                    help="workers scenario client: C (built at start with cc + libssl-dev), Python, or C where it builds")
    args = ap.parse_args(argv)
    only: list[str] = []
    for item in args.only or []:
        only += [s.strip() for s in item.split(",") if s.strip()]
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.only = only or list(SCENARIOS)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    base = FULL if args.full else QUICK
    args.sizes = Sizes(
        bulk_bytes=args.bytes or base.bulk_bytes,
        short_count=args.short_count or base.short_count,
        idle_counts=tuple(int(x) for x in args.idle_counts.split(",")) if args.idle_counts else base.idle_counts,
        http_seconds=args.http_seconds or base.http_seconds,
        config_workloads=args.config_workloads or base.config_workloads,
        conn_count=args.conn_count or base.conn_count,
    )
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    bad = [c for c in args.clients if c not in ("python-h2", "node-http2")]
    if bad:
        ap.error(f"unknown client {', '.join(bad)}")
    return args


def run(args: argparse.Namespace, log=print) -> list[report.ScenarioResult]:
    toolbox = Toolbox(allow_install=not args.no_install, log=log)
    results: list[report.ScenarioResult] = []

    t_last = [time.monotonic()]

    def emit(res: report.ScenarioResult) -> None:
        # Each scenario's wall time, so the quick mode's 5-minute budget can be checked part by part.
        now = time.monotonic()
        res.notes.append(f"scenario time: {now - t_last[0]:.0f} s")
        t_last[0] = now
        results.append(res)
        log(report.render(res) + "\n")

    tunnel_names = [s for s in args.only if s in ("upload", "download", "multi64", "short", "idle")]
    if tunnel_names:
        from benchmarks.tunnel import TunnelLab, TunnelOptions, run_bulk, run_idle, run_short
        opts = TunnelOptions(bytes=args.sizes.bulk_bytes, repeat=args.repeat, short_count=args.sizes.short_count,
                             idle_counts=list(args.sizes.idle_counts), clients=args.clients)
        with TunnelLab(toolbox, log=log) as lab:
            for name in tunnel_names:
                if name in ("upload", "download"):
                    emit(run_bulk(lab, opts, name))
                elif name == "multi64":
                    emit(run_bulk(lab, opts, "multi"))
                elif name == "short":
                    emit(run_short(lab, opts))
                else:
                    for count in opts.idle_counts:
                        emit(run_idle(lab, opts, count))
    if "workers" in args.only:
        from benchmarks.workers import Options, WorkersLab, run_workers
        with WorkersLab(toolbox, log=log, client=args.conn_client) as lab:
            emit(run_workers(lab, Options(count=args.sizes.conn_count, repeat=args.repeat)))
    if "authz" in args.only:
        from benchmarks.authz_scenario import run_authz
        emit(run_authz(quick=not args.full))
    if "http" in args.only:
        from benchmarks.http import run_http
        emit(run_http(toolbox, repeat=args.repeat, seconds=args.sizes.http_seconds, full=args.full))
    if "config" in args.only:
        from benchmarks.config_scale import run_config
        emit(run_config(workloads=args.sizes.config_workloads, repeat=args.repeat))
    return results


def _exit_on_sigterm(signum, frame) -> None:
    # Python's default SIGTERM kills without unwinding, so the parties' `finally: stop()` would never
    # run and sinks, relays and nghttpx/nginx would outlive the harness (seen after `timeout`).
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    # argv None: run as ``python -m benchmarks``; a list: from ``hbone-proxy bench`` (proxy/cli.py).
    args = parse_args(list(sys.argv[1:] if argv is None else argv),
                      prog="python -m benchmarks" if argv is None else "hbone-proxy bench")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.time()
    print(f"hbone-proxy benchmarks ({'full' if args.full else 'quick'}; {args.repeat} repetition(s); "
          f"{os.cpu_count()} CPUs; Python {platform.python_version()}): {', '.join(args.only)}\n", flush=True)
    results = run(args, log=lambda s: print(s, flush=True))
    doc = {
        "meta": {"mode": "full" if args.full else "quick", "repeat": args.repeat, "started": started,
                 "elapsed_s": time.time() - started, "cpus": os.cpu_count(), "python": platform.python_version(),
                 "machine": platform.machine(), "kernel": platform.release(),
                 "sizes": args.sizes.__dict__},
        "scenarios": {r.name: r.as_dict() for r in results},
    }
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"results written to {args.json} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
