"""Each command's ``--help`` names the command as users type it and lists every flag it takes."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, ".venv", "bin", "hbone-proxy")
TIMEOUT_S = 60   # a Python start on a loaded 2-core box


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [CLI] if os.path.exists(CLI) else [sys.executable, "-m", "proxy.cli"]
    return subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_bench_help_says_hbone_proxy_bench():
    r = _cli("bench", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: hbone-proxy bench ")
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m benchmarks ")


def test_config_help_is_config_checks_whole_help():
    r = _cli("config", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: hbone-proxy config check ")
    for flag in ("--scope NS|NS/SA", "--gateway NS/NAME", "--waypoint-ip IP", "--node NAME", "--root-namespace NS"):
        assert flag in r.stdout, flag
    assert _cli("config", "check", "--help").stdout == r.stdout
    bare = _cli("config")
    assert (bare.returncode, bare.stdout) == (2, "") and bare.stderr.startswith("usage: hbone-proxy config check ")


def test_run_help_shows_the_listener_defaults():
    out = " ".join(_cli("run", "--help").stdout.split())   # argparse wraps the help text
    for flag, default in (("--hbone-addr", "0.0.0.0:15008"), ("--outbound-addr", "127.0.0.1:15001"),
                          ("--socks5-addr", "127.0.0.1:15080"), ("--inbound-plaintext-addr", "off"),
                          ("--admin-addr", "127.0.0.1:15000"), ("--metrics-addr", "0.0.0.0:15020"),
                          ("--readiness-addr", "0.0.0.0:15021")):
        help_ = out.split(f"{flag} {flag[2:].upper().replace('-', '_')} ", 1)[1].split(" --", 1)[0]
        assert help_.endswith(f"(default {default})"), (flag, help_)
