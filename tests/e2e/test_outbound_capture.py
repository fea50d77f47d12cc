"""The 15001 path: iptables REDIRECT inside a network namespace, as ambient's in-pod rules do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.mesh import REPO

CHILD = Path(__file__).with_name("redirect_child.py")


def _unavailable() -> str | None:
    if shutil.which("iptables") is None:
        return "iptables not installed (Debian package: iptables)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip not installed (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace (needs root): {probe.stderr.decode().strip()}"
    return None


@pytest.mark.root
def test_redirected_app_reaches_reviews_through_15001_and_the_waypoint(tmp_path):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["unshare", "--net", "--", sys.executable, str(CHILD), str(REPO), str(tmp_path)],
                          capture_output=True, text=True, timeout=90)
    if proc.returncode != 0 and "nat" in proc.stderr and "table" in proc.stderr.lower():
        pytest.skip(f"iptables nat table unavailable: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = out["counts"]
    assert sum(counts.values()) == 100
    assert set(counts) <= {"200 reviews-v1", "200 reviews-v2"}, counts
    assert counts.get("200 reviews-v1", 0) >= 70            # the 90/10 VirtualService applies
    line = out["outbound_log"][0]
    # The outbound listener saw the original destination (the VIP) and sent it to the waypoint.
    assert line["route"] == "waypoint" and line["dst.hbone_addr"].endswith(":9080")
    assert line["dst.addr"].endswith(".100:15008")
