"""The tunnel scenarios: bulk upload/download, 64 tunnels on one connection, short tunnels, idle tunnels.

Who carries the bytes (one row each, all in one run, on the same sink and clients):

- ``direct``: the client connects to the sink over plain TCP; no proxy, no TLS (the ceiling).
- ``ours-relay``: ``python -m benchmarks.relay`` (hbone.server + TcpStream + hbone.relay).
- ``ours-node``: ``hbone-proxy run --mode node`` as the terminator, the proxy users run: the sink is a
  workload of its node (``NODE_INVENTORY``, on a 127.x pod address), so the client's CONNECT to the
  sink pod IP goes through the whole inbound pipeline (plan, L4 authz, connect, metrics; access log
  off) on ``<pod>:15008``, with ztunnel's HTTP/2 defaults (4 / 16 MiB windows, 200 streams: no idle
  rows).
- ``nghttpx``: nghttpx 1.5x from Debian's nghttp2-proxy, mTLS with client verification, HTTP/2
  frontend windows 16 MiB / 64 MiB. nghttpx never dials a CONNECT's authority itself: in its default
  (reverse proxy) mode a CONNECT is routed to the catch-all backend as an HTTP/1.1 CONNECT request, so
  its backend is the sink's ``--connect-listen`` port, which answers ``200`` and then serves the same
  protocol. (``--http2-proxy`` mode forwards the same way, to a backend meant to be a forward proxy.)

Who drives them: ``python-h2`` (benchmarks.h2client: 1 MiB frames where the peer allows, i.e. to our
relay; nghttpx advertises 16 KiB) and ``node-http2`` (Node's http2 = nghttp2: 16 KiB frames always).
"""

from __future__ import annotations

import importlib.util
import os
import random
import resource
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from benchmarks.harness import Conversation, Measured, Party, PartyError, free_port, python_argv, run_client
from benchmarks.report import Column, Row, ScenarioResult, f0, f1, f2, f3
from hbone.settings import SERVER_MAX_CONCURRENT_STREAMS

KiB, MiB = 1024, 1024 * 1024
HOST = "127.0.0.1"
NODE_NAME = "bench-node"
NODE_HBONE_PORT = 15008  # ztunnel's inbound port, on the pod's IP
# The sink as a workload of the node proxy's node (DESIGN §4 inventory shape).
NODE_INVENTORY = """workloads:
- uid: Kubernetes//v1/Pod/bench/sink-0
  name: sink-0
  namespace: bench
  serviceAccount: sink
  workloadIps: ["{pod}"]
  protocol: HBONE
  node: bench-node
"""
NODE_CLIENT_JS = Path(__file__).with_name("node_client.js")
# The frontend window nghttpx gets: performance.md measured ~690 MB/s with 16 MiB / 64 MiB against
# ~160-250 with its 64 KiB default; the relay gets the same (benchmarks.relay).
NGHTTPX_STREAM_WINDOW = "16M"
NGHTTPX_CONNECTION_WINDOW = "64M"
NGHTTPX_MAX_STREAMS = 10_000  # the idle scenario holds 8 000 tunnels on one connection
# Descriptors nghttpx asks for: 8 000 idle tunnels hold ~16 000 (one frontend stream each needs a
# backend connection). Capped at our hard limit: above it setrlimit fails for a non-root user
# (nghttpx logs "Setting rlimit-nofile failed" and keeps the inherited soft limit, often 1 024).
NGHTTPX_NOFILE = 65_536
IDLE_SETTLE_S = 0.5  # let the proxy finish its bookkeeping for the last tunnels before reading RSS
MULTI_TUNNELS = 64
SHORT_INFLIGHT = 64


@dataclass
class TunnelOptions:
    bytes: int
    repeat: int
    short_count: int
    idle_counts: list[int]
    clients: list[str] = field(default_factory=lambda: ["python-h2", "node-http2"])


class TunnelLab:
    """Certificates, the sink, and the proxies under test, started once for all tunnel scenarios."""

    def __init__(self, toolbox, log=print):
        self.toolbox = toolbox
        self.log = log
        self.dir = Path(tempfile.mkdtemp(prefix="hbone-bench-"))
        self.parties: dict[str, Party] = {}
        self.unavailable: dict[str, str] = {}  # target → why there is no row
        self.sink: Party | None = None

    def __enter__(self) -> "TunnelLab":
        self._make_pki()
        self.sink_addr = (pick_pod_ip(), free_port())
        self.sink_connect_addr = (HOST, free_port())
        self.sink = Party("sink", python_argv("benchmarks.sink", "--listen", addr(self.sink_addr),
                                              "--connect-listen", addr(self.sink_connect_addr)), self.dir)
        self.sink.start()
        self._start_targets()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.parties.values():
            p.stop()
        if self.sink:
            self.sink.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _make_pki(self) -> None:
        from certs.ca import MeshCA
        from certs.spiffe import SpiffeId
        now = datetime.now(timezone.utc)
        ca = MeshCA.init(self.dir / "ca", trust_domain="cluster.local", now=now)
        self.ca_dir = self.dir / "ca"
        self.ca_pem = self.ca_dir / "root-cert.pem"
        self.server_cert, self.server_key = ca.issue(SpiffeId("cluster.local", "bench", "nghttpx"), now=now).write(self.dir / "nghttpx")
        self.client_cert, self.client_key = ca.issue(SpiffeId("cluster.local", "bench", "client"), now=now).write(self.dir / "client")

    def _start_targets(self) -> None:
        relay_addr = (HOST, free_port())
        self._try_start(Party("ours-relay", python_argv("benchmarks.relay", "--listen", addr(relay_addr),
                                                        "--ca-dir", str(self.ca_dir)), self.dir), relay_addr)
        nghttpx = self.toolbox.ensure(["nghttpx"])["nghttpx"]
        if nghttpx is None:
            self.unavailable["nghttpx"] = "not available: nghttpx not installed (Debian package nghttp2-proxy)"
        else:
            nx_addr = (HOST, free_port())
            self._try_start(Party("nghttpx", nghttpx_argv(nghttpx, nx_addr, self.sink_connect_addr, self.ca_pem,
                                                          self.server_cert, self.server_key, self.dir),
                                  self.dir, port=nx_addr), nx_addr)
        why = ours_node_status()
        if why is None:
            self._start_node()
        else:
            self.unavailable["ours-node"] = why
        if self.toolbox.ensure(["node"])["node"] is None:
            self.unavailable["node-http2"] = "not available: node not installed"

    def _start_node(self) -> None:
        """``hbone-proxy run --mode node`` serving one local workload, the sink's pod: it terminates
        HBONE on ``<pod ip>:15008`` with that workload's minted certificate, runs the whole inbound
        pipeline (plan, L4 authz — no policies: allow — connect from the client's IP, metrics) and
        relays to the sink. ztunnel's HTTP/2 defaults (4 MiB / 16 MiB windows, 200 streams), not the
        16 / 64 MiB given to nghttpx and ours-relay: this row is the proxy as users run it."""
        inv = self.dir / "node-inventory.yaml"
        inv.write_text(NODE_INVENTORY.format(pod=self.sink_addr[0]))
        metrics = (HOST, free_port())
        argv = [*hbone_proxy_command(), "run", "--mode", "node", "--node", NODE_NAME, "--config", str(inv),
                "--ca-dir", str(self.ca_dir), "--hbone-addr", f"0.0.0.0:{NODE_HBONE_PORT}",
                "--outbound-addr", "off", "--socks5-addr", "off", "--inbound-plaintext-addr", "off",
                "--admin-addr", "off", "--readiness-addr", "off", "--metrics-addr", addr(metrics),
                "--access-log", "off", "--log-level", "warning", "--config-poll-interval", "0"]
        node_addr = (self.sink_addr[0], NODE_HBONE_PORT)
        self._try_start(Party("ours-node", argv, self.dir, port=node_addr), node_addr)

    def _try_start(self, party: Party, address: tuple[str, int]) -> None:
        try:
            party.start()
            party.address = address  # type: ignore[attr-defined]
            self.parties[party.name] = party
        except PartyError as err:
            self.unavailable[party.name] = f"not available: {err}"

    # -- client command lines
    def client_argv(self, target: str, client: str, op: str, **kw) -> list[str]:
        if target == "direct":
            argv = python_argv("benchmarks.h2client", "--direct", "--connect", addr(self.sink_addr), "--op", op)
        else:
            tls = ["--connect", addr(self.parties[target].address), "--authority", addr(self.sink_addr),
                   "--ca", str(self.ca_pem), "--cert", str(self.client_cert), "--key", str(self.client_key), "--op", op]
            if client == "node-http2":
                argv = [shutil.which("node") or "node", str(NODE_CLIENT_JS), *tls]
            else:
                argv = python_argv("benchmarks.h2client", *tls)
        for k, v in kw.items():
            argv += [f"--{k}", str(v)]
        return argv

    def rows_for(self, clients: list[str], *, direct: bool = True, node_client_ok: bool = True) -> list[Row]:
        """Row order: direct, ours, nghttpx (per client); unavailable targets get a row with the reason."""
        rows = [Row("direct", "python-tcp")] if direct else []
        for target in ("ours-relay", "ours-node", "nghttpx"):
            for client in clients:
                if client == "node-http2" and not node_client_ok:
                    continue
                row = Row(target, client)
                if target in self.unavailable:
                    row.note = self.unavailable[target]
                elif client in self.unavailable:
                    row.note = self.unavailable[client]
                rows.append(row)
                if target == "ours-node" and target in self.unavailable:
                    break  # one "not available" line is enough
        return rows

    def measured_parties(self, target: str) -> dict[str, Party]:
        parties = {"sink": self.sink}
        if target in self.parties:
            parties["proxy"] = self.parties[target]
        return parties


def addr(a: tuple[str, int]) -> str:
    return f"{a[0]}:{a[1]}"


def nghttpx_argv(exe: str, listen, backend, ca_pem, cert, key, workdir: Path) -> list[str]:
    """nghttpx as an mTLS HTTP/2 CONNECT terminator (see the module docstring for why the backend is the sink)."""
    return [exe,
            "--conf=/dev/null",  # not /etc/nghttpx/nghttpx.conf
            "--no-ocsp",         # no OCSP fetch helper for our private CA
            "--workers=1",       # one worker thread: compared with one Python process
            f"--frontend={listen[0]},{listen[1]}",
            f"--backend={backend[0]},{backend[1]}",  # catch-all; CONNECT is routed here as HTTP/1.1
            "--verify-client", f"--verify-client-cacert={ca_pem}",
            f"--frontend-http2-window-size={NGHTTPX_STREAM_WINDOW}",
            f"--frontend-http2-connection-window-size={NGHTTPX_CONNECTION_WINDOW}",
            f"--frontend-http2-max-concurrent-streams={NGHTTPX_MAX_STREAMS}",
            f"--rlimit-nofile={nofile_limit(NGHTTPX_NOFILE)}",
            "--log-level=WARN", f"--errorlog-file={workdir / 'nghttpx-error.log'}",
            str(key), str(cert)]


def nofile_limit(want: int) -> int:
    """``want`` descriptors, or as many as an unprivileged process may raise its soft limit to."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return want if hard == resource.RLIM_INFINITY else min(want, hard)


def ours_node_status() -> str | None:
    """None when `hbone-proxy run --mode node` can run as a terminator, else why there is no row."""
    if importlib.util.find_spec("proxy.run") is None:
        return "not available: hbone-proxy run --mode node not built yet"
    return None


def hbone_proxy_command() -> list[str]:
    from proxy.demo.mesh import hbone_proxy_command as cmd
    return cmd()


def pick_pod_ip() -> str:
    """A 127.x address free on NODE_HBONE_PORT (all of 127/8 is loopback): the sink's "pod", so the
    node proxy can listen on <pod>:15008 as ztunnel does without colliding with other meshes."""
    for _ in range(200):
        ip = f"127.{random.randint(60, 120)}.{random.randint(0, 255)}.{random.randint(2, 254)}"
        with socket.socket() as s:
            try:
                s.bind((ip, NODE_HBONE_PORT))
                return ip
            except OSError:
                continue
    return HOST


# -------------------------------------------------------------------------------------- scenarios
BULK_COLUMNS = [
    Column("MB/s", "mbps", f0),
    Column("×nghttpx", "mbps", ratio_to="nghttpx"),
    Column("proxy CPU s", "proxy_cpu_s", f2),
    Column("client CPU s", "client_cpu_s", f2),
    Column("sink CPU s", "sink_cpu_s", f2),
    Column("MB/proxy-CPU-s", "mb_per_cpu_s", f0),
    Column("×nghttpx/CPU", "mb_per_cpu_s", ratio_to="nghttpx"),
]


def run_bulk(lab: TunnelLab, opts: TunnelOptions, op: str) -> ScenarioResult:
    tunnels = MULTI_TUNNELS if op == "multi" else 1
    size = opts.bytes
    title = {"upload": f"one tunnel upload, {size / MiB:.0f} MiB",
             "download": f"one tunnel download, {size / MiB:.0f} MiB",
             "multi": f"{tunnels} tunnels on one connection, upload {size / MiB:.0f} MiB in total"}[op]
    res = ScenarioResult(op if op != "multi" else "multi64", title, BULK_COLUMNS)
    res.rows = lab.rows_for(opts.clients)

    def shortfall(report: dict) -> str | None:
        got = report.get("bytes", 0)
        return f"{got} of {size} bytes arrived" if got != size else None

    for row, m in _client_runs(lab, res.rows, opts.repeat, op, shortfall, bytes=size, tunnels=tunnels):
        wall = m.report["wall_s"]
        row.add("mbps", size / wall / 1e6)
        proxy_cpu = _add_cpu(row, m)
        if proxy_cpu is not None and proxy_cpu > 0:
            row.add("mb_per_cpu_s", size / 1e6 / proxy_cpu)
        if "frame_out" in m.report:
            row.info["client_frame_bytes"] = m.report["frame_out"]
    res.notes.append("frames the client sent: " + ", ".join(
        f"{r.target}/{r.client} {r.info['client_frame_bytes'] // KiB} KiB" for r in res.rows if "client_frame_bytes" in r.info))
    return res


SHORT_COLUMNS = [
    Column("streams/s", "streams_s", f0),
    Column("×nghttpx", "streams_s", ratio_to="nghttpx"),
    Column("p50 ms", "p50_ms", f2),
    Column("p99 ms", "p99_ms", f2),
    Column("proxy CPU s", "proxy_cpu_s", f2),
    Column("client CPU s", "client_cpu_s", f2),
    Column("sink CPU s", "sink_cpu_s", f2),
    Column("proxy µs/stream", "proxy_us_per_stream", f0),
]


def run_short(lab: TunnelLab, opts: TunnelOptions) -> ScenarioResult:
    res = ScenarioResult("short", f"short tunnels: CONNECT + 1 KiB each way, {SHORT_INFLIGHT} in flight, "
                                  f"{opts.short_count} per run", SHORT_COLUMNS)
    res.rows = lab.rows_for(opts.clients)

    def shortfall(report: dict) -> str | None:
        got = report.get("streams")
        return f"{got} of {opts.short_count} streams completed" if got != opts.short_count else None

    for row, m in _client_runs(lab, res.rows, opts.repeat, "short", shortfall, count=opts.short_count,
                               inflight=SHORT_INFLIGHT):
        row.add("streams_s", opts.short_count / m.report["wall_s"])
        row.add("p50_ms", m.report["p50_ms"])
        row.add("p99_ms", m.report["p99_ms"])
        proxy_cpu = _add_cpu(row, m)
        if proxy_cpu is not None:
            row.add("proxy_us_per_stream", proxy_cpu / opts.short_count * 1e6)
    res.notes.append("direct opens one TCP connection per stream; the proxies get one HTTP/2 connection "
                     "and open one TCP connection to the sink per stream")
    return res


IDLE_COLUMNS = [
    Column("open s", "open_s", f3),
    Column("proxy RSS MiB", "rss_mib", f1),
    Column("KiB/tunnel", "kib_per_tunnel", f2),
    Column("×nghttpx KiB", "kib_per_tunnel", ratio_to="nghttpx"),
]


def run_idle(lab: TunnelLab, opts: TunnelOptions, count: int) -> ScenarioResult:
    res = ScenarioResult(f"idle{count}", f"{count} idle tunnels on one connection (RSS growth of the proxy, "
                                         f"time to open them all)", IDLE_COLUMNS)
    res.rows = lab.rows_for(["python-h2"], direct=False)
    for row in res.rows:
        if row.target == "ours-node" and not row.note:
            row.note = (f"not available: {count} tunnels on one connection exceed the node proxy's "
                        f"{SERVER_MAX_CONCURRENT_STREAMS}-stream limit (ztunnel's default); see ours-relay")
    for _ in range(opts.repeat):
        for row in res.rows:
            if _is_unavailable(row):
                continue
            proxy = lab.parties[row.target]
            # A fresh proxy process per measurement: heap freed by the previous idle run is reused by
            # the next one, so without a restart repetitions after the first read ~0 KiB/tunnel.
            try:
                proxy.stop()
                proxy.start()
            except PartyError as err:
                row.note = f"failed: restart: {err}"
                continue
            conv = Conversation(lab.client_argv(row.target, row.client, "idle", tunnels=count))
            try:
                conv.expect("WARM")
                rss0 = proxy.rss()
                conv.say()
                opened = conv.expect("OPEN ")
                time.sleep(IDLE_SETTLE_S)
                rss1 = proxy.rss()
                conv.say()
                report = conv.finish()
            except PartyError as err:
                row.note = f"failed: {err}"
                conv.kill()
                continue
            row.add("open_s", report["open_s"])
            row.add("rss_mib", rss1 / MiB)
            row.add("kib_per_tunnel", (rss1 - rss0) / KiB / count)
            _ = opened
    res.notes.append("KiB/tunnel = proxy RSS (VmRSS, whole process tree) after opening the tunnels minus before, "
                     "over the count, in a freshly started proxy; includes the proxy's TCP connection to the sink "
                     "for each tunnel")
    return res


def _is_unavailable(row: Row) -> bool:
    return bool(row.note) and row.note.startswith("not available")


def _client_runs(lab: TunnelLab, rows: list[Row], repeat: int, op: str,
                 shortfall: Callable[[dict], str | None], **client_args) -> Iterator[tuple[Row, Measured]]:
    """Each available row, ``repeat`` times over: the load client's ``op`` run against it. A run that fails, or
    whose report ``shortfall`` finds short, notes the row ("failed: ...") and yields nothing."""
    for _ in range(repeat):
        for row in rows:
            if _is_unavailable(row):
                continue
            try:
                m = run_client(lab.client_argv(row.target, row.client, op, **client_args),
                               lab.measured_parties(row.target))
                problem = shortfall(m.report)
                if problem:
                    raise PartyError(problem)
            except PartyError as err:
                row.note = f"failed: {err}"
                continue
            yield row, m


def _add_cpu(row: Row, m: Measured) -> float | None:
    """The CPU columns every tunnel scenario has (client, sink, and the proxy when there is one); the
    proxy's CPU seconds, or None for a target without a proxy (direct)."""
    row.add("client_cpu_s", m.cpu["client"])
    row.add("sink_cpu_s", m.cpu["sink"])
    if "proxy" not in m.cpu:
        return None
    row.add("proxy_cpu_s", m.cpu["proxy"])
    return m.cpu["proxy"]
