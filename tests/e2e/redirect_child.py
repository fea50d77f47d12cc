"""Run inside a fresh network namespace (``unshare --net``) by test_outbound_capture.py: a mesh whose
productpage pod has its egress to the service VIPs redirected to node-a's 15001 by iptables, as the
istio-cni rules do; a plain client (no SOCKS, no proxy settings) then talks to the reviews VIP."""

from __future__ import annotations

import collections
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1])

from tests.e2e.mesh import Mesh  # noqa: E402


def main() -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    mesh = Mesh(Path(sys.argv[2]))
    try:
        vips = f"127.{mesh.a}.{mesh.b + 1}.0/24"
        # The pod's outbound TCP to service VIPs → the node proxy's outbound listener (REDIRECT sends
        # locally generated packets to 127.0.0.1:15001).
        subprocess.run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", mesh.pod(10), "-d", vips,
                        "-j", "REDIRECT", "--to-ports", "15001"], check=True, capture_output=True)
        procs = mesh.start_proxies(node_a_extra=("--outbound-addr", "127.0.0.1:15001"))
        for v in (1, 2, 3):
            mesh.http_backend(20 + v, 9080, f"reviews-v{v}".encode())
        counts: collections.Counter = collections.Counter()
        conn = http.client.HTTPConnection(mesh.vip(20), 9080, timeout=10, source_address=(mesh.pod(10), 0))
        for _ in range(100):
            conn.request("GET", "/")
            r = conn.getresponse()
            counts[f"{r.status} {r.read().decode()}"] += 1
        conn.close()
        deadline = time.monotonic() + 10   # the tunnel's line is written when the relay ends
        while True:
            lines = [l for l in procs[0].access_lines() if l.get("direction") == "outbound"]
            if lines or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        out = {"counts": counts, "outbound_log": lines[:1]}
        print(json.dumps(out))
        return 0
    finally:
        mesh.close()


if __name__ == "__main__":
    sys.exit(main())
