"""The node proxy freezes its start-up heap out of the cyclic collector (proxy.node.freeze_startup_heap,
see its PERF NOTE) — not timed. Each case runs a real NodeProxy (real mTLS, a real HBONE client, a real
echo pod on loopback) in a fresh interpreter, so the freeze never touches the pytest process: with the
freeze on, the collector's permanent generation holds the start-up heap, garbage cycles left before the
start were collected first (not frozen), and only the first start freezes; with it off (the plain path)
nothing is frozen; and both relay the same bytes, make the same allow decision and record the same
metrics (twin)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.node_helpers import NODE
from tests.test_node_inbound_fastpath import INVENTORY   # a sink pod on NODE, a client elsewhere

ROOT = Path(__file__).resolve().parent.parent

# Run in a child interpreter: argv = freeze on/off ("1"/"0"), config dir, pod IP, client IP.
CHILD = r'''
import asyncio, gc, json, sys, time, weakref
import proxy.node as node_mod
from hbone.pool import HbonePool
from proxy.identity import Identities
from proxy.settings import ProxySettings
from proxy.snapshot import ConfigStore
from proxy.telemetry.metrics import Metrics
from tests.waypoint_harness import MESH, cert_source

freeze, cfg, pod, client = sys.argv[1] == "1", sys.argv[2], sys.argv[3], sys.argv[4]
node_mod.FREEZE_HEAP_AT_START = freeze
PORT = 9000


class Cyclic:
    pass


async def echo(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def main():
    gc.disable()                       # the cycle below must still be there when the proxy starts
    junk = Cyclic(); junk.me = junk
    junk_ref = weakref.ref(junk); del junk
    store = ConfigStore([cfg], mode="node", scope=None, clock=time.time)
    store.load()
    metrics = Metrics(process_metrics=False)
    settings = ProxySettings(mode="node", config_paths=(cfg,), node="node-x", hbone_addr=("0.0.0.0", 15008),
                             outbound_addr=None, socks5_addr=None, access_log=None)
    proxy = node_mod.NodeProxy(settings, store, Identities(ca=MESH.ca), metrics=metrics)
    backend = await asyncio.start_server(echo, pod, PORT)
    frozen_before = gc.get_freeze_count()
    await proxy.start()
    frozen_after = gc.get_freeze_count()
    junk_collected = junk_ref() is None
    gc.enable()
    again = node_mod.freeze_startup_heap()          # a second NodeProxy in this process: no-op
    src = cert_source("default", "client")
    pool = HbonePool(src.client_context, trust_domain="cluster.local")
    stream = await pool.open_tunnel(src_identity=src.identity, dst=(pod, 15008), authority=f"{pod}:{PORT}",
                                    dst_identities=frozenset({MESH.identity("default", "sink")}), local_host=client)
    stream.write(b"x" * 1024)
    await stream.drain()
    got = b""
    while len(got) < 1024:
        got += await asyncio.wait_for(stream.read(), 5)
    stream.write_eof()
    assert await asyncio.wait_for(stream.read(), 5) == b""
    end = time.monotonic() + 5
    while proxy.tracker.live and time.monotonic() < end:
        await asyncio.sleep(0.01)
    decisions = [(plan.decision.allowed, plan.target) for _, plan, _ in proxy.inbound._memo.values()]
    closed = sum(s.value for m in metrics.tcp_closed_total.collect() for s in m.samples if s.name.endswith("_total"))
    await pool.close()
    await proxy.close()
    backend.close()
    print(json.dumps({"frozen_before": frozen_before, "frozen_after": frozen_after, "junk_collected": junk_collected,
                      "again": again, "echoed": len(got), "same_bytes": got == b"x" * 1024,
                      "decisions": [[a, list(t)] for a, t in decisions], "closed": closed,
                      "live": len(proxy.tracker.live)}))


asyncio.run(main())
'''



def _run(freeze: bool, tmp_path: Path, loopback_ip) -> dict:
    pod, client = loopback_ip(), loopback_ip()
    cfg = tmp_path / ("on" if freeze else "off")
    cfg.mkdir()
    (cfg / "inventory.yaml").write_text(INVENTORY.format(pod=pod, client=client, node=NODE))
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if freeze else "0", str(cfg), pod, client],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["pod"] = pod
    return result


def test_start_freezes_the_heap_once_after_collecting_and_the_plain_path_relays_the_same(tmp_path, loopback_ip):
    on = _run(True, tmp_path, loopback_ip)
    off = _run(False, tmp_path, loopback_ip)

    # The fast path is in effect: the start-up heap is frozen, the garbage cycle left before the
    # start was collected rather than frozen, and a second call does nothing.
    assert on["frozen_before"] == 0
    assert on["frozen_after"] > 1000, on                # imports + snapshot + listeners
    assert on["junk_collected"] is True
    assert on["again"] is False
    # The plain path leaves the collector alone.
    assert off["frozen_before"] == off["frozen_after"] == 0
    assert off["junk_collected"] is False              # the collector was off, nothing collected it
    # Twin: the same tunnel behaviour either way.
    for r in (on, off):
        assert r["echoed"] == 1024 and r["same_bytes"] is True
        assert r["decisions"] == [[True, [r["pod"], 9000]]]
        assert r["closed"] == 1 and r["live"] == 0
