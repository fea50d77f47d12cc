"""`hbone-proxy config check` run the way users run it: a subprocess, exit codes, stdout/stderr."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CLI = os.path.join(ROOT, ".venv", "bin", "hbone-proxy")
TIMEOUT_S = 60  # a Python start + YAML load; generous for a loaded 2-core box


def run(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    cmd = [CLI] if os.path.exists(CLI) else [sys.executable, "-m", "proxy.cli"]
    return subprocess.run(cmd + ["config", *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_success_prints_counts_per_kind_and_namespace():
    r = run("check", "tests/fixtures/bookinfo", "tests/fixtures/shop", "tests/fixtures/mesh-wide-policy.yaml")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    out = r.stdout.splitlines()
    assert out[0] == "loaded 15 documents from 8 files:"
    assert "  tests/fixtures/bookinfo/inventory.yaml" in out
    header = next(line for line in out if line.startswith("KIND"))
    assert header.split() == ["KIND", "TOTAL", "default", "istio-system", "shop"]
    rows = {line.split()[0]: line.split()[1:] for line in out if line.split() and line.split()[0] in (
        "Workload", "Service", "AuthorizationPolicy", "VirtualService", "DestinationRule", "HTTPRoute", "Gateway")}
    assert rows["Workload"] == ["11", "7", "0", "4"]
    assert rows["Service"] == ["10", "8", "0", "2"]
    assert rows["AuthorizationPolicy"] == ["7", "2", "2", "3"]
    assert rows["VirtualService"] == ["3", "2", "0", "1"]
    assert rows["Gateway"] == ["2", "1", "0", "1"]
    assert out[-1] == "OK"


def test_waypoint_scope_and_node_views():
    r = run("check", "tests/fixtures/bookinfo", "tests/fixtures/shop", "--gateway", "default/reviews-waypoint",
            "--node", "node-c")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "waypoint scope default gateway=default/reviews-waypoint keeps:" in text
    assert "  service default/reviews.default.svc.cluster.local" in text
    assert "cart.shop" not in text.split("keeps:")[1].split("node node-c")[0]
    assert "node node-c serves 4 workloads:" in text
    assert "  shop/cart-v1-0 127.3.0.11 HBONE" in text


def test_warnings_are_printed(tmp_path):
    f = tmp_path / "inv.yaml"
    f.write_text("workloads:\n- {name: a, namespace: default, workloadIps: [10.0.0.1],"
                 " services: {default/ghost.default.svc.cluster.local: {80: 8080}}}\n")
    r = run("check", str(f))
    assert r.returncode == 0
    assert "warnings (1):" in r.stdout
    assert (f"  {f}: document 1 (Workload default/a): workloads[0].services['default/ghost.default.svc.cluster.local']: "
            "no such service; endpoint unused") in r.stdout


def test_errors_go_to_stderr_one_per_line_and_exit_2(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(
        "workloads:\n- name: a\n  namespace: default\n  workloadIps: [10.0.0.300]\n  protocol: QUIC\n"
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n")
    r = run("check", str(f))
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{f}: document 1 (Workload default/a): workloads[0].workloadIps[0]: '10.0.0.300' is not an IP address",
        f"{f}: document 1 (Workload default/a): workloads[0].protocol: expected one of TCP, HBONE, got a string ('QUIC')",
        r.stderr.splitlines()[2],
        "config check: 3 errors; nothing loaded",
    ]
    assert r.stderr.splitlines()[2].startswith(f"{f}: document 2 (Deployment default/web): kind: unsupported resource")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("content, expected", [
    (b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)), "document 1: not a text file"),
    (b"kind: A\n---\n: : :\n  - [\n", "document 2: YAML syntax error at line"),
    (b"a: &a [*a]\n", "document 1: recursive YAML alias"),
    (b"- 1\n- 2\n", "document 1: expected a mapping"),
])
def test_bad_files_never_traceback(tmp_path, content, expected):
    f = tmp_path / "x.yaml"
    f.write_bytes(content)
    r = run("check", str(f))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines()[0].startswith(f"{f}: {expected}"), r.stderr


def test_missing_file_and_usage_errors():
    r = run("check", "/definitely/not/here.yaml")
    assert (r.returncode, r.stderr.splitlines()[0]) == (2, "/definitely/not/here.yaml: cannot read: No such file or directory")
    r = run("check")
    assert r.returncode == 2 and "required: FILE|DIR" in r.stderr and "Traceback" not in r.stderr
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown subcommand 'frobnicate'" in r.stderr
    r = run("check", "--scope", "/sa", "tests/fixtures/bookinfo")
    assert r.returncode == 2 and "--scope '/sa': expected NS or NS/SA" in r.stderr


def test_in_process_main_matches(capsys):
    from proxy.config_check import main

    assert main(["check", os.path.join(FIXTURES, "bookinfo", "inventory.yaml")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "OK"
    assert main(["check", os.path.join(FIXTURES, "nope.yaml")]) == 2


def test_closed_stdout_exits_quietly_as_unix_tools_do():
    """`config check ... | head -1`: the reader is gone before a write. Not an internal error: no message,
    exit 141 (128 + SIGPIPE, what the shell reports for a Unix tool killed by SIGPIPE). The pipe's read end
    is closed before the process starts, so its first write fails (with or without a stdout buffer)
    whatever the timing: a reader leaving after one line would race with the writer."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    cmd = [CLI] if os.path.exists(CLI) else [sys.executable, "-m", "proxy.cli"]
    for env in ({}, {"PYTHONUNBUFFERED": "1"}):   # a block-buffered flush at exit, and a write per print
        r = subprocess.run(cmd + ["config", "check", "tests/fixtures/bookinfo", "tests/fixtures/shop", "--node",
                                  "node-b", "--gateway", "default/reviews-waypoint"],
                           cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S,
                           env={**os.environ, **env})
        assert (r.returncode, r.stderr) == (141, ""), env
    r = subprocess.run(cmd + ["--help"], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT_S)
    assert (r.returncode, r.stderr) == (141, "")   # the dispatcher's own usage text too
    os.close(write_end)
