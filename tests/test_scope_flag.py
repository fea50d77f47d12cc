"""``--scope NS | NS/SA`` (and ``--gateway NS/NAME``): a malformed value is a one-line usage error naming the
flag and the expected form, in ``WaypointScope.parse`` and in both commands that take it (``run`` and
``config check``) — never a waypoint started with a scope that holds nothing (``a/b/c`` used to read as
namespace ``a``, service account ``b/c``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from policy.scope import WaypointScope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, ".venv", "bin", "hbone-proxy")
TIMEOUT_S = 60   # a Python start + YAML load on a loaded 2-core box


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [CLI] if os.path.exists(CLI) else [sys.executable, "-m", "proxy.cli"]
    return subprocess.run(cmd + list(args), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("scope", ["a/b/c", "default/", "/sa", "", "/", "default//sa"])
def test_parse_refuses_anything_but_ns_or_ns_sa(scope):
    with pytest.raises(ValueError) as bad:
        WaypointScope.parse(scope)
    assert str(bad.value) == f"--scope {scope!r}: expected NS or NS/SA"


@pytest.mark.parametrize("gateway", ["a/b/c", "default/", "/wp", "wp"])
def test_parse_refuses_a_gateway_not_ns_name(gateway):
    with pytest.raises(ValueError) as bad:
        WaypointScope.parse("default", gateway=gateway)
    assert str(bad.value) == f"--gateway {gateway!r}: expected NS/NAME"


def test_parse_keeps_the_good_forms():
    assert WaypointScope.parse("default") == WaypointScope(namespace="default")
    assert WaypointScope.parse("default/bookinfo-reviews", gateway="default/wp") == WaypointScope(
        gateway=("default", "wp"), namespace="default", service_account="bookinfo-reviews")


def test_config_check_says_so_before_loading():
    r = _cli("config", "check", "tests/fixtures/bookinfo", "--scope", "a/b/c")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "config check: --scope 'a/b/c': expected NS or NS/SA\n")


def test_run_refuses_it_and_starts_nothing(tmp_path):
    ca = tmp_path / "ca"
    assert _cli("certs", "init", "--dir", str(ca)).returncode == 0
    r = _cli("run", "--mode", "waypoint", "--config", "tests/fixtures/bookinfo", "--ca-dir", str(ca),
             "--gateway", "default/reviews-waypoint", "--identity", "default/reviews-waypoint",
             "--scope", "a/b/c", "--hbone-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
             "--metrics-addr", "127.0.0.1:0", "--readiness-addr", "127.0.0.1:0")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "hbone-proxy run: --scope 'a/b/c': expected NS or NS/SA\n")
