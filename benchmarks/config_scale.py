"""Configuration at scale: load and reload a large inventory, then cut it to one waypoint's scope.

The seed's point is that a waypoint only needs its own namespace's configuration. This scenario
writes an inventory of N workloads (default 100 000: 40 namespaces × 250 deployments × 10 pods,
one Service per deployment, every Service bound to its namespace's waypoint) in ztunnel's
local-config shape, and measures in a fresh process (so RSS is its own):

- ``load``: ``policy.mesh.load_mesh_config`` of the whole mesh (what a node proxy or a naive waypoint holds);
- ``reload``: a second load while the first is still held (a reload builds the new config beside
  the old, then swaps);
- ``scope``: ``policy.scope.scope_for_waypoint`` for namespace ns-0's waypoint;
- RSS with the whole mesh held, and after dropping it and keeping only the scope (after
  ``gc.collect()`` and glibc ``malloc_trim(0)`` so freed memory is given back).

``python -m benchmarks.config_scale --worker FILE`` is the measuring process; the harness runs it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import PartyError, parse_last_json, python_argv
from benchmarks.procstat import rss_bytes
from benchmarks.report import Column, Row, ScenarioResult, f0, f1, f2, f3

PODS_PER_DEPLOYMENT = 10      # the seed's example: 25 deployments × 10 pods per namespace
DEPLOYMENTS_PER_NAMESPACE = 250
SCOPE_NAMESPACE = "ns-0"
WORKER_TIMEOUT_S = 1800.0     # PyYAML on 100 000 workloads on a loaded box; bounded so a hang ends


def waypoint_ip(ns_index: int) -> str:
    return f"10.255.{ns_index // 256}.{ns_index % 256}"


def make_inventory(workloads: int) -> dict:
    """The ztunnel local-config document (a dict) for `workloads` pods."""
    deployments = max(1, workloads // PODS_PER_DEPLOYMENT)
    namespaces = max(1, -(-deployments // DEPLOYMENTS_PER_NAMESPACE))
    wls, svcs = [], []
    for d in range(deployments):
        ns_i, dep = divmod(d, DEPLOYMENTS_PER_NAMESPACE)
        ns, app = f"ns-{ns_i}", f"app-{dep}"
        host = f"{app}.{ns}.svc.cluster.local"
        svcs.append({
            "name": app, "namespace": ns, "hostname": host,
            "vips": [f"/172.{16 + d // 65536}.{d // 256 % 256}.{d % 256}"],
            "ports": {9080: 9080}, "appProtocols": {9080: "http"},
            "waypoint": {"destination": f"/{waypoint_ip(ns_i)}", "hboneMtlsPort": 15008},
        })
        for p in range(PODS_PER_DEPLOYMENT):
            i = d * PODS_PER_DEPLOYMENT + p
            if i >= workloads:
                break
            wls.append({
                "uid": f"cluster1//v1/Pod/{ns}/{app}-{p}", "name": f"{app}-{p}", "namespace": ns,
                "serviceAccount": app, "trustDomain": "cluster.local",
                "workloadIps": [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"],
                "protocol": "HBONE", "node": f"node-{i % 100}", "labels": {"app": app, "version": "v1"},
                "services": {f"{ns}/{host}": {9080: 9080}},
            })
    return {"workloads": wls, "services": svcs}


def write_inventory(path: Path, workloads: int) -> None:
    import yaml
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    with open(path, "w") as f:
        yaml.dump(make_inventory(workloads), f, Dumper=dumper, sort_keys=False)


def _trim() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def worker(path: str) -> dict:
    """Runs in its own process: load, reload, scope; times and RSS."""
    from policy.mesh import load_mesh_config
    from policy.scope import WaypointScope, scope_for_waypoint
    _trim()
    rss0 = rss_bytes(os.getpid(), tree=False)
    t0 = time.perf_counter()
    mesh = load_mesh_config([path])
    load_s = time.perf_counter() - t0
    rss_whole = rss_bytes(os.getpid(), tree=False)
    t0 = time.perf_counter()
    mesh2 = load_mesh_config([path])
    reload_s = time.perf_counter() - t0
    del mesh2
    _trim()
    scope = WaypointScope(address_ip=waypoint_ip(0), namespace=SCOPE_NAMESPACE)
    t0 = time.perf_counter()
    scoped = scope_for_waypoint(mesh, scope)
    scope_s = time.perf_counter() - t0
    whole_counts = mesh.counts()
    del mesh
    _trim()
    rss_scoped = rss_bytes(os.getpid(), tree=False)
    return {"load_s": load_s, "reload_s": reload_s, "scope_s": scope_s,
            "rss_whole_mib": (rss_whole - rss0) / 2**20, "rss_scoped_mib": (rss_scoped - rss0) / 2**20,
            "whole": whole_counts, "scoped": scoped.counts()}


COLUMNS = [
    Column("load s", "load_s", f2),
    Column("reload s", "reload_s", f2),
    Column("scope s", "scope_s", f3),
    Column("RSS whole MiB", "rss_whole_mib", f1),
    Column("RSS scope MiB", "rss_scoped_mib", f1),
    Column("workloads whole", "whole_workloads", f0),
    Column("workloads scope", "scoped_workloads", f0),
    Column("services scope", "scoped_services", f0),
]


def config_status() -> str | None:
    for mod in ("policy.mesh", "policy.scope"):
        if importlib.util.find_spec(mod) is None:
            return f"not available: {mod} not built yet"
    from policy import mesh, scope
    if not hasattr(mesh, "load_mesh_config") or not hasattr(scope, "scope_for_waypoint"):
        return "not available: policy.mesh.load_mesh_config / policy.scope.scope_for_waypoint not built yet"
    return None


def run_config(*, workloads: int, repeat: int) -> ScenarioResult:
    res = ScenarioResult("config", f"configuration at scale: {workloads:,} workloads, whole mesh vs the "
                                   f"{SCOPE_NAMESPACE} waypoint's scope", COLUMNS)
    row = Row("policy.mesh", "load_mesh_config")
    res.rows.append(row)
    status = config_status()
    if status:
        row.note = status
        return res
    workdir = Path(tempfile.mkdtemp(prefix="hbone-bench-config-"))
    try:
        path = workdir / "inventory.yaml"
        write_inventory(path, workloads)
        res.notes.append(f"inventory file {path.stat().st_size / 2**20:.1f} MiB YAML; each run in a fresh process")
        for _ in range(repeat):
            try:
                r = subprocess.run(python_argv("benchmarks.config_scale", "--worker", str(path)),
                                   capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                row.note = f"failed: load took over {WORKER_TIMEOUT_S:.0f} s"
                break
            if r.returncode != 0:
                row.note = "failed: " + " | ".join(r.stderr.strip().splitlines()[-3:])
                break
            out = parse_last_json(r.stdout)
            for k in ("load_s", "reload_s", "scope_s", "rss_whole_mib", "rss_scoped_mib"):
                row.add(k, out[k])
            row.add("whole_workloads", out["whole"].get("Workload", 0))
            row.add("scoped_workloads", out["scoped"].get("Workload", 0))
            row.add("scoped_services", out["scoped"].get("Service", 0))
    except PartyError as err:
        row.note = f"failed: {err}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.config_scale")
    ap.add_argument("--worker", required=True, help="inventory file to measure")
    args = ap.parse_args(argv)
    print(json.dumps(worker(args.worker)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
