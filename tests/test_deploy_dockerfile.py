"""The Dockerfile, checked without a Docker engine: parsed instruction by instruction. Non-root numeric
USER, every DESIGN §2 port exposed, a HEALTHCHECK on 15021 /healthz/ready that really works (run here
against a real HTTP server), ENTRYPOINT = the console script in pyproject.toml, CMD flags that
``hbone-proxy run`` accepts, and every file the build copies exists and is not .dockerignored."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib

import pytest

from proxy import settings as S
from tests.test_deploy import IMAGE_UID, ROOT, TIMEOUT_S, parse_args, run_flags

DESIGN_PORTS = {S.HBONE_PORT, S.OUTBOUND_PORT, S.INBOUND_PLAINTEXT_PORT, S.SOCKS5_PORT, S.ADMIN_PORT,
                S.METRICS_PORT, S.READINESS_PORT}
READY_URL = f"http://127.0.0.1:{S.READINESS_PORT}/healthz/ready"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, backslash continuations joined."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        lines = [ln for ln in f.read().splitlines() if not ln.lstrip().startswith("#")]
    out, buf = [], ""
    for ln in lines:
        if ln.rstrip().endswith("\\"):
            buf += ln.rstrip()[:-1] + " "
            continue
        buf += ln
        if buf.strip():
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf.strip(), "dangling continuation"
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def one(stage, instr: str) -> str:
    found = [a for k, a in stage if k == instr]
    assert len(found) == 1, f"{instr}: {found}"
    return found[0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


def test_every_stage_is_python_311_slim():
    froms = [a.split()[0] for k, a in instructions() if k == "FROM"]
    assert froms and all(f == "python:3.11-slim" for f in froms)


def test_runs_as_a_fixed_non_root_user():
    user = one(final_stage(), "USER")
    uid, _, gid = user.partition(":")
    # Numeric, so Kubernetes can verify runAsNonRoot; the same ids as deploy/ (runAsUser 10001).
    assert int(uid) == int(gid) == IMAGE_UID
    run = " ".join(a for k, a in final_stage() if k == "RUN")
    assert f"--uid {IMAGE_UID}" in run and f"--gid {IMAGE_UID}" in run


def test_every_design_port_is_exposed():
    exposed = {int(p.split("/")[0]) for k, a in final_stage() if k == "EXPOSE" for p in a.split()}
    assert exposed == DESIGN_PORTS


def test_entrypoint_is_the_console_script_and_cmd_flags_are_accepted_by_run():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    entry = exec_form(one(final_stage(), "ENTRYPOINT"))
    assert len(entry) == 1 and entry[0] in scripts
    cmd = exec_form(one(final_stage(), "CMD"))
    flags = parse_args(cmd)
    assert set(flags) <= run_flags(), f"unknown: {sorted(set(flags) - run_flags())}"
    assert flags["--config"] == ["/etc/hbone-proxy/config"]
    for flag, name in (("--cert", "cert-chain.pem"), ("--key", "key.pem"), ("--ca", "root-cert.pem")):
        assert flags[flag] == [f"/etc/hbone-proxy/certs/{name}"]
    for flag in ("--hbone-addr", "--metrics-addr", "--readiness-addr"):
        host, _, port = flags[flag][0].rpartition(":")
        assert host == "0.0.0.0" and int(port) in DESIGN_PORTS  # reachable from outside the container


def test_cmd_is_parsed_by_run_itself():
    """Once proxy/run.py exists: its own parser turns the image's CMD into settings (no bind, no start)."""
    run = pytest.importorskip("proxy.run", reason="proxy/run.py not there yet")
    s = run.parse_settings(exec_form(one(final_stage(), "CMD"))[1:], {})
    assert s.mode == "waypoint" and s.config_paths == ("/etc/hbone-proxy/config",)
    assert s.hbone_addr == ("0.0.0.0", S.HBONE_PORT)
    assert s.readiness_addr == ("0.0.0.0", S.READINESS_PORT)
    assert s.admin_addr[0] == "127.0.0.1"


class _Ready(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's naming
        code = self.status if self.path == "/healthz/ready" else 404
        self.send_response(code)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _healthcheck(url: str) -> int:
    args = one(final_stage(), "HEALTHCHECK")
    options, _, cmd = args.partition("CMD ")
    assert "--timeout" in options and "--interval" in options
    argv = exec_form(cmd)
    assert argv[0] == "python" and READY_URL in argv[-1]
    argv = [sys.executable, *argv[1:-1], argv[-1].replace(READY_URL, url)]
    return subprocess.run(argv, capture_output=True, timeout=TIMEOUT_S).returncode


@pytest.mark.parametrize("status,healthy", [(200, True), (503, False)])
def test_healthcheck_command_follows_readiness(status, healthy):
    handler = type("Handler", (_Ready,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        rc = _healthcheck(f"http://127.0.0.1:{server.server_port}/healthz/ready")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert (rc == 0) is healthy


def test_healthcheck_fails_when_nothing_listens():
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        assert _healthcheck(f"http://127.0.0.1:{port}/healthz/ready") != 0


def _dockerignore() -> list[str]:
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def _ignored(path: str) -> bool:
    for pat in _dockerignore():
        pat = pat.removeprefix("**/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(os.path.basename(path), pat) \
                or path.split("/")[0] == pat:
            return True
    return False


def test_copied_files_exist_and_are_in_the_build_context():
    copies = [a for k, a in instructions() if k == "COPY" and not a.startswith("--from")]
    sources = [src for a in copies for src in shlex.split(a)[:-1]]
    assert sources[0] == "pyproject.toml"  # dependencies first: source edits keep the pip layer cached
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), src
        assert not _ignored(src), f"{src} is excluded by .dockerignore"
    # Every package pyproject installs is copied (setuptools `include`), so `pip install .` is whole.
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    top = {p.rstrip("*") for p in include}
    assert top <= set(sources), f"not copied: {sorted(top - set(sources))}"
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["readme"] in sources
    # The image never gets test code, the venv or keys.
    for secret in (".venv/bin/python", "tests/conftest.py", "ca/root-key.pem", "x/key.pem"):
        assert _ignored(secret), secret


def test_requirements_step_yields_exactly_the_runtime_dependencies(tmp_path):
    """Run the Dockerfile's own dependency-extraction command on our pyproject.toml."""
    run = " ".join(a for k, a in instructions() if k == "RUN" and "tomllib" in a)
    m = re.search(r'python -c "(.*?)"\s*>\s*requirements\.txt', run)
    assert m, run
    code = m.group(1).replace("\\n", "\n").replace("'\n'", "'\\n'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert done.stdout.split("\n")[:-1] == project["dependencies"]
    assert not any("pytest" in d or "hypothesis" in d for d in done.stdout.split())  # no dev deps
    assert "pip install --no-deps ." in " ".join(a for k, a in instructions() if k == "RUN")
