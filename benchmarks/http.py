"""The HTTP/1.1 scenario: a 90/10 weighted split with a header deny rule, driven by wrk.

Rows (each proxy a separate process with one worker, backends one nginx process serving ``v1`` and
``v2`` on two ports, small bodies):

- ``direct``: wrk → backend v1, no proxy.
- ``ours``: wrk → node proxy → HBONE → waypoint (L7 authz + 90/10 route) → backends. Needs
  ``hbone-proxy run --mode waypoint``; until the harness can drive it the row says why, no numbers.
- ``nginx``: ``upstream`` with ``weight=9`` / ``weight=1`` (smooth weighted round robin), keep-alive to
  the backends, ``if ($http_x_deny) { return 403; }``.
- ``haproxy``: ``balance roundrobin`` with weights 9 / 1, ``http-reuse always``,
  ``http-request deny if { req.hdr(x-deny) -m found }``.

Before timing, each proxy is checked: 20 requests must split 18 / 2 and ``x-deny: 1`` must get 403.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.harness import Party, PartyError, free_port
from benchmarks.report import Column, Row, ScenarioResult, f0, f2
from benchmarks.tools import Toolbox

HOST = "127.0.0.1"
CONCURRENCY = (1, 64)  # the issue: requests/s at c=1 and c=64
WRK_THREADS = 1  # one wrk thread leaves the other core to the proxy and the backends
SPLIT_CHECK_REQUESTS = 20  # 9:1 smooth weighted round robin: exactly 18 v1 and 2 v2
WRK_TIMEOUT_MARGIN_S = 30.0

NGINX_BACKEND_CONF = """
daemon off; worker_processes 1; pid {dir}/backend.pid; error_log {dir}/backend-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {dir}/b-body; proxy_temp_path {dir}/b-proxy; fastcgi_temp_path {dir}/b-fcgi;
  uwsgi_temp_path {dir}/b-uwsgi; scgi_temp_path {dir}/b-scgi;
  server {{ listen {host}:{v1}; location / {{ return 200 "v1\\n"; }} }}
  server {{ listen {host}:{v2}; location / {{ return 200 "v2\\n"; }} }}
}}
"""

NGINX_PROXY_CONF = """
daemon off; worker_processes 1; pid {dir}/proxy.pid; error_log {dir}/proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {dir}/p-body; proxy_temp_path {dir}/p-proxy; fastcgi_temp_path {dir}/p-fcgi;
  uwsgi_temp_path {dir}/p-uwsgi; scgi_temp_path {dir}/p-scgi;
  upstream split {{ server {host}:{v1} weight=9; server {host}:{v2} weight=1; keepalive 64; }}
  server {{
    listen {host}:{port};
    location / {{
      if ($http_x_deny) {{ return 403; }}
      proxy_pass http://split; proxy_http_version 1.1; proxy_set_header Connection "";
    }}
  }}
}}
"""

# maxconn: haproxy needs ~2 descriptors per connection and refuses to start if it cannot raise
# RLIMIT_NOFILE that far; 4 096 connections is far above the 64 the benchmark opens.
HAPROXY_CONF = """
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
frontend fe
  bind {host}:{port}
  http-request deny deny_status 403 if {{ req.hdr(x-deny) -m found }}
  default_backend be
backend be
  balance roundrobin
  http-reuse always
  server v1 {host}:{v1} weight 9
  server v2 {host}:{v2} weight 1
"""

COLUMNS = [
    Column("req/s", "rps", f0),
    Column("×nginx", "rps", ratio_to="nginx"),
    Column("p50 ms", "p50_ms", f2),
    Column("p99 ms", "p99_ms", f2),
    Column("+p50 vs direct", "p50_ms", f2, delta_to="direct"),
    Column("+p99 vs direct", "p99_ms", f2, delta_to="direct"),
    Column("proxy CPU s", "proxy_cpu_s", f2),
    Column("wrk CPU s", "client_cpu_s", f2),
    Column("proxy µs/req", "proxy_us_per_req", f0),
]


def ours_waypoint_status() -> str:
    if importlib.util.find_spec("proxy.run") is None:
        return "not available: hbone-proxy waypoint not built yet"
    return "not available: hbone-proxy run --mode waypoint exists but the harness does not drive it yet"


def run_http(toolbox: Toolbox, *, repeat: int, seconds: float) -> ScenarioResult:
    res = ScenarioResult("http", f"HTTP/1.1, 90/10 split + header deny rule, wrk {seconds:g} s per run",
                         COLUMNS)
    tools = toolbox.ensure(["wrk", "nginx", "haproxy"])
    if tools["wrk"] is None or tools["nginx"] is None:
        res.rows = [Row("all", "wrk", note="not available: needs wrk and nginx (Debian packages wrk, nginx-light)")]
        return res
    workdir = Path(tempfile.mkdtemp(prefix="hbone-bench-http-"))
    parties: list[Party] = []
    try:
        v1, v2 = free_port(), free_port()
        backend = _nginx(tools["nginx"], workdir, "backend", NGINX_BACKEND_CONF.format(dir=workdir, host=HOST, v1=v1, v2=v2), (HOST, v1))
        parties.append(backend)
        targets: dict[str, Party | str] = {"direct": f"{HOST}:{v1}"}
        targets["ours"] = ours_waypoint_status()
        port = free_port()
        try:
            p = _nginx(tools["nginx"], workdir, "nginx", NGINX_PROXY_CONF.format(dir=workdir, host=HOST, v1=v1, v2=v2, port=port), (HOST, port))
            parties.append(p)
            _check_split_and_deny(HOST, port)
            targets["nginx"] = p
        except PartyError as err:
            targets["nginx"] = f"not available: {err}"
        if tools["haproxy"] is None:
            targets["haproxy"] = "not available: haproxy not installed (Debian package haproxy)"
        else:
            port = free_port()
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(HAPROXY_CONF.format(host=HOST, port=port, v1=v1, v2=v2))
            try:
                p = Party("haproxy", [tools["haproxy"], "-f", str(cfg), "-db"], workdir, port=(HOST, port))
                p.start()
                parties.append(p)
                _check_split_and_deny(HOST, port)
                targets["haproxy"] = p
            except PartyError as err:
                targets["haproxy"] = f"not available: {err}"
        for c in CONCURRENCY:
            for name, t in targets.items():
                res.rows.append(Row(name, f"wrk c={c}", note=t if isinstance(t, str) and name != "direct" else None))
        for _ in range(repeat):
            for row in res.rows:
                if row.note and row.note.startswith("not available"):
                    continue
                t = targets[row.target]
                url_addr = t if isinstance(t, str) else f"{HOST}:{t.port[1]}"
                proxy = t if isinstance(t, Party) else None
                c = int(row.client.split("=")[1])
                try:
                    _measure(row, tools["wrk"], url_addr, c, seconds, proxy)
                except PartyError as err:
                    row.note = f"failed: {err}"
    except PartyError as err:
        res.rows = [Row("all", "wrk", note=f"not available: {err}")]
    finally:
        for p in reversed(parties):
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    res.notes.append("one wrk thread; backends: one nginx process (1 worker) serving v1 and v2; each proxy "
                     "checked before timing: 20 requests split 18/2, x-deny → 403")
    return res


def _nginx(exe: str, workdir: Path, name: str, conf: str, port: tuple[str, int]) -> Party:
    path = workdir / f"{name}.conf"
    path.write_text(conf)
    p = Party(name, [exe, "-c", str(path), "-p", str(workdir)], workdir, port=port)
    p.start()
    return p


def _check_split_and_deny(host: str, port: int) -> None:
    counts = {"v1": 0, "v2": 0}
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        for _ in range(SPLIT_CHECK_REQUESTS):
            conn.request("GET", "/")
            body = conn.getresponse().read().decode().strip()
            counts[body] = counts.get(body, 0) + 1
        conn.request("GET", "/", headers={"x-deny": "1"})
        resp = conn.getresponse()
        resp.read()
        denied = resp.status
    except (OSError, http.client.HTTPException) as err:
        raise PartyError(f"check requests failed: {err}") from None
    finally:
        conn.close()
    if counts.get("v1") != 18 or counts.get("v2") != 2 or denied != 403:
        raise PartyError(f"split/deny check failed: {counts}, x-deny → {denied}")


_LAT_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(text: str) -> dict:
    """Requests/sec, p50/p99 in ms (needs --latency) and error counts from wrk's text output."""
    out: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise PartyError(f"wrk printed no Requests/sec: {text[-300:]!r}")
    out["rps"] = float(m.group(1))
    for q in ("50", "99"):
        m = re.search(rf"^\s*{q}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        if m:
            out[f"p{q}_ms"] = float(m.group(1)) * _LAT_UNITS[m.group(2)]
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return out


def _measure(row: Row, wrk: str, url_addr: str, c: int, seconds: float, proxy: Party | None) -> None:
    argv = [wrk, f"-t{WRK_THREADS}", f"-c{c}", f"-d{seconds:g}s", "--latency", f"http://{url_addr}/"]
    before = proxy.cpu() if proxy else None
    # wrk's own CPU: the children rusage delta across its run (the only child reaped meanwhile).
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + WRK_TIMEOUT_MARGIN_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise PartyError("wrk timed out") from None
    after = proxy.cpu() if proxy else None
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise PartyError(f"wrk exited {proc.returncode}: {err.strip()[-200:]}")
    r = parse_wrk(out)
    if r["non2xx"] or r["socket_errors"]:
        raise PartyError(f"wrk saw {r['non2xx']} non-2xx responses and {r['socket_errors']} socket errors")
    row.add("rps", r["rps"])
    row.add("client_cpu_s", (kids1.ru_utime - kids0.ru_utime) + (kids1.ru_stime - kids0.ru_stime))
    for k in ("p50_ms", "p99_ms"):
        if k in r:
            row.add(k, r[k])
    if proxy and before is not None and after is not None:
        cpu = (after - before).total_s
        row.add("proxy_cpu_s", cpu)
        if r["requests"]:
            row.add("proxy_us_per_req", cpu / r["requests"] * 1e6)
