"""The ``workers`` scenario: does ``hbone-proxy run --workers N`` (SO_REUSEPORT worker processes)
scale new connections per second from 1 to 2 workers? (issue 7: ≥ 1.7× where the client is not the
limit.)

Each connection is what a new HBONE peer costs: TCP + a full mTLS handshake (client certificate from
our CA, no resumption) + one CONNECT + 1 KiB each way + close, driven by ``benchmarks/conn_client.c``
(compiled at start where ``cc`` and the OpenSSL headers exist; else the same exchange in
``benchmarks/conn_client.py``), forked copies with many connections in flight. Rows, all running
at once and measured interleaved, so load from elsewhere on the machine falls on every row alike:

- ``ours-node ×1`` / ``×2``: ``hbone-proxy run --mode node --workers 1`` / ``--workers 2`` as in the
  tunnel scenarios' ``ours-node`` row: the sink is a workload of the node on a 127.x pod address and
  HBONE terminates on ``<pod>:15008`` (whole inbound pipeline, access log off). Each proxy serves its
  own node and pod address; one sink listens on the wildcard address and serves both pods.
- ``nghttpx ×1`` / ``×2``: nghttpx with ``--workers=1`` / ``--workers=2`` (worker threads), mTLS with
  client verification, CONNECT forwarded to the sink's HTTP/1.1 CONNECT port (as in benchmarks.tunnel).

Per row: connections/s (wall), CPU of the proxy (summed over its process tree: the supervisor and its
workers), client and sink, proxy CPU µs per connection, how evenly the work spread over the workers
(the busiest worker's share of the proxy's CPU: 50 % is perfectly even for 2), the cores the whole
machine was busy (from /proc/stat: this benchmark plus anything else running), and for the 2-worker
row the ratio to the 1-worker row of the same repetition, in wall connections/s and in connections
per proxy CPU-second.

On a 2-core machine the client's own TLS handshakes cost about as much as the proxy's, so the
machine, not the proxy, caps the 2-worker row; the table note says so when it happens, with the
bound that implies, and the per-CPU ratio and spread show whether the proxy itself scales (no shared
bottleneck between workers) where the wall ratio cannot.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import procstat
from benchmarks.cbuild import build_c
from benchmarks.conn_client import cpu_count
from benchmarks.harness import Party, PartyError, free_port, python_argv, run_client
from benchmarks.report import Column, Row, ScenarioResult, f0, f2
from benchmarks.tunnel import (NODE_HBONE_PORT, addr, hbone_proxy_command, nghttpx_argv, ours_node_status,
                               pick_pod_ip)

HOST = "127.0.0.1"
WORKER_COUNTS = (1, 2)
# Connections in flight over all client copies: enough that every worker always has handshakes
# queued (a worker that waits for the client cannot show its rate), few enough that 2 copies keep up.
CONCURRENCY = 64
# Forked client copies: one per core, so the client is never held to one core while a proxy worker
# waits for it.
CLIENT_PROCS = 2
WARMUP_CONNECTIONS = 200   # per proxy, unmeasured: first-use imports and caches in every worker
LISTEN_WAIT_S = 30.0       # all N workers have their SO_REUSEPORT listener (each imports and mints certs)
SATURATED_CORES_FRACTION = 0.9  # machine busy ≥ 90 % of its cores: the machine, not one party, was the cap
# The issue's target: ×2 ≥ 1.7× ×1 in wall connections/s where the client is not the limit (with a core
# per worker that needs a per-CPU ratio ≥ 0.85 and an even spread).
TARGET_SCALE = 1.7
SINK_START_ATTEMPTS = 3
# The client: "c" (benchmarks/conn_client.c, built at start), "python" (benchmarks/conn_client.py), or
# "auto" (C where it builds). Measured against nghttpx ×2 here, per connection: C ~800 µs CPU, Python
# ~950 (both mostly OpenSSL 3.0's handshake, ~540 µs alone), Node's tls ~1 450-1 700.
CLIENTS = ("auto", "c", "python")
C_CLIENT_SOURCE = Path(__file__).with_name("conn_client.c")
METRIC_OPENED = "istio_tcp_connections_opened_total"
METRICS_TIMEOUT_S = 5.0

# Each proxy under test serves its own node: one pod (a workload of that node) per worker count.
WORKLOAD = """- uid: Kubernetes//v1/Pod/bench/sink-w{n}
  name: sink-w{n}
  namespace: bench
  serviceAccount: sink
  workloadIps: ["{pod}"]
  protocol: HBONE
  node: bench-node-w{n}
"""


@dataclass
class Target:
    name: str            # row name: "ours-node ×2"
    kind: str            # "ours-node" | "nghttpx"
    workers: int
    party: Party
    address: tuple[str, int]    # where the client connects
    authority: tuple[str, int]  # what it CONNECTs to
    metrics: tuple[str, int] | None = None  # ours: worker 0's /metrics


class WorkersLab:
    """Certificates, one sink, and every proxy under test (all running for the whole scenario)."""

    def __init__(self, toolbox, log=print, worker_counts=WORKER_COUNTS, *, nghttpx: bool = True,
                 client: str = "auto"):
        if client not in CLIENTS:
            raise ValueError(f"client {client!r}: choose from {', '.join(CLIENTS)}")
        self.toolbox = toolbox
        self.with_nghttpx = nghttpx
        self.client_choice = client
        self.client = "python-conn"      # what drives the rows: c-conn once built, else python-conn
        self.client_note: str | None = None
        self.c_client: Path | None = None
        self.log = log
        self.worker_counts = tuple(worker_counts)
        self.dir = Path(tempfile.mkdtemp(prefix="hbone-bench-workers-"))
        self.targets: list[Target] = []
        self.unavailable: dict[str, str] = {}  # row name → why it has no numbers
        self.sink: Party | None = None

    def __enter__(self) -> "WorkersLab":
        try:
            self._make_pki()
            # The wildcard address: each proxy dials the sink on its own pod IP (127.x), one sink serves all.
            self._build_c_client()
            self._start_sink()
            self._start_ours()
            if self.with_nghttpx:
                self._start_nghttpx()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for t in self.targets:
            t.party.stop()
        if self.sink:
            self.sink.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _build_c_client(self) -> None:
        """Compile benchmarks/conn_client.c (cc + OpenSSL headers); without them, the Python client."""
        if self.client_choice == "python":
            return
        exe = self.dir / "conn_client"
        why = build_c(C_CLIENT_SOURCE, exe)
        if why is None:
            self.c_client, self.client = exe, "c-conn"
            return
        if self.client_choice == "c":
            raise PartyError(f"C client: {why}")
        self.client_note = (f"client: python-conn, because the C client could not be built ({why}; it needs cc "
                            f"and the OpenSSL headers, Debian libssl-dev) — the Python client costs ~20 % more "
                            f"CPU per connection")
        self.log(f"note: workers scenario: {self.client_note}")

    def _start_sink(self) -> None:
        # A port free on the wildcard address is free on every 127.x; someone may still take it on
        # one of them before the sink binds (other benchmarks run alongside), so try a few.
        for attempt in range(SINK_START_ATTEMPTS):
            self.sink_port = free_port("0.0.0.0")
            self.sink_connect_addr = (HOST, free_port())
            self.sink = Party("sink", python_argv("benchmarks.sink", "--listen", f"0.0.0.0:{self.sink_port}",
                                                  "--connect-listen", addr(self.sink_connect_addr)), self.dir)
            try:
                self.sink.start()
                return
            except PartyError:
                if attempt == SINK_START_ATTEMPTS - 1:
                    raise

    def _make_pki(self) -> None:
        from certs.ca import MeshCA
        from certs.spiffe import SpiffeId
        now = datetime.now(timezone.utc)
        ca = MeshCA.init(self.dir / "ca", trust_domain="cluster.local", now=now)
        self.ca_dir = self.dir / "ca"
        self.ca_pem = self.ca_dir / "root-cert.pem"
        self.server_cert, self.server_key = ca.issue(SpiffeId("cluster.local", "bench", "nghttpx"),
                                                     now=now).write(self.dir / "nghttpx")
        self.client_cert, self.client_key = ca.issue(SpiffeId("cluster.local", "bench", "client"),
                                                     now=now).write(self.dir / "client")

    def _start_ours(self) -> None:
        why = ours_node_status()
        if why is not None:
            for n in self.worker_counts:
                self.unavailable[f"ours-node ×{n}"] = why
            return
        pods: dict[int, str] = {}
        for n in self.worker_counts:
            pod = pick_pod_ip()
            while pod in pods.values():
                pod = pick_pod_ip()
            pods[n] = pod
        inv = self.dir / "inventory.yaml"
        inv.write_text("workloads:\n" + "".join(WORKLOAD.format(n=n, pod=pods[n]) for n in self.worker_counts))
        for n in self.worker_counts:
            name = f"ours-node ×{n}"
            metrics = (HOST, free_port())
            argv = [*hbone_proxy_command(), "run", "--mode", "node", "--node", f"bench-node-w{n}",
                    "--config", str(inv), "--ca-dir", str(self.ca_dir), "--workers", str(n),
                    "--hbone-addr", f"0.0.0.0:{NODE_HBONE_PORT}",
                    "--outbound-addr", "off", "--socks5-addr", "off", "--inbound-plaintext-addr", "off",
                    "--admin-addr", "off", "--readiness-addr", "off", "--metrics-addr", addr(metrics),
                    "--access-log", "off", "--log-level", "warning", "--config-poll-interval", "0"]
            address = (pods[n], NODE_HBONE_PORT)
            party = Party(f"ours-node-w{n}", argv, self.dir, port=address)
            self._try_start(Target(name, "ours-node", n, party, address, (pods[n], self.sink_port), metrics))

    def _start_nghttpx(self) -> None:
        exe = self.toolbox.ensure(["nghttpx"])["nghttpx"]
        for n in self.worker_counts:
            name = f"nghttpx ×{n}"
            if exe is None:
                self.unavailable[name] = "not available: nghttpx not installed (Debian package nghttp2-proxy)"
                continue
            address = (HOST, free_port())
            argv = [a if a != "--workers=1" else f"--workers={n}"
                    for a in nghttpx_argv(exe, address, self.sink_connect_addr, self.ca_pem, self.server_cert,
                                          self.server_key, self.dir)]
            party = Party(f"nghttpx-w{n}", argv, self.dir, port=address)
            self._try_start(Target(name, "nghttpx", n, party, address, (self.sink_connect_addr[0], self.sink_port)))

    def _try_start(self, target: Target) -> None:
        try:
            target.party.start()
            if target.kind == "ours-node":
                wait_listeners(target.address, target.workers)
            self.targets.append(target)
        except PartyError as err:
            target.party.stop()
            self.unavailable[target.name] = f"not available: {err}"

    def client_argv(self, target: Target, count: int, *, concurrency: int = CONCURRENCY,
                    procs: int = CLIENT_PROCS) -> list[str]:
        exe = [str(self.c_client)] if self.c_client else python_argv("benchmarks.conn_client")
        return [*exe, "--connect", addr(target.address),
                           "--authority", addr(target.authority), "--ca", str(self.ca_pem),
                           "--cert", str(self.client_cert), "--key", str(self.client_key),
                           "--count", str(count), "--concurrency", str(concurrency), "--procs", str(procs)]


# ------------------------------------------------------------------------------ what is measured


def listening_sockets(address: tuple[str, int], tables=("/proc/net/tcp",)) -> int:
    """How many sockets LISTEN on exactly address (IPv4): with SO_REUSEPORT, one per worker."""
    ip, port = address
    want = "%08X:%04X" % (int.from_bytes(bytes(int(x) for x in ip.split(".")), "little"), port)
    count = 0
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 3 and f[1] == want and f[3] == "0A":  # st 0A = TCP_LISTEN
                count += 1
    return count


def wait_listeners(address: tuple[str, int], workers: int, timeout: float = LISTEN_WAIT_S) -> None:
    """Wait until every worker listens: the port answering proves only that the first one does."""
    deadline = time.monotonic() + timeout
    while (have := listening_sockets(address)) < workers:
        if time.monotonic() > deadline:
            raise PartyError(f"{have} of {workers} workers listening on {addr(address)} after {timeout:.0f} s")
        time.sleep(0.1)


def worker_cpu(target: Target) -> dict[int, float]:
    """CPU seconds so far of each worker: ours, each process of the tree (the supervisor of ×2 is
    one of them and does ~nothing); nghttpx, each thread of its tree (its workers are threads)."""
    out: dict[int, float] = {}
    for pid in procstat.descendants(target.party.pid):
        if target.kind == "ours-node":
            out[pid] = procstat.cpu_times(pid, tree=False).total_s
            continue
        try:
            tids = [int(t.name) for t in (procstat.PROC / str(pid) / "task").iterdir()]
        except OSError:
            continue
        for tid in tids:
            try:
                stat = (procstat.PROC / str(pid) / "task" / str(tid) / "stat").read_text()
                out[tid] = procstat.parse_stat(stat).total_s
            except (OSError, ValueError, IndexError):
                pass
    return out


def busiest_share(before: dict[int, float], after: dict[int, float], workers: int) -> float | None:
    """The busiest worker's share of what the `workers` busiest processes/threads spent (1/N is even)."""
    deltas = sorted((after[k] - before.get(k, 0.0) for k in after), reverse=True)[:workers]
    total = sum(deltas)
    return deltas[0] / total if total > 0 else None


def opened_connections(metrics: tuple[str, int]) -> float:
    """Worker 0's own count of tunnels opened (``/metrics?worker=0``: plain ``/metrics`` sums the workers)."""
    try:
        with urllib.request.urlopen(f"http://{addr(metrics)}/metrics?worker=0", timeout=METRICS_TIMEOUT_S) as resp:
            text = resp.read().decode()
    except OSError as err:   # URLError, timeouts, refused: the row says so instead of a number
        raise PartyError(f"worker 0's /metrics: {err}") from None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(METRIC_OPENED + "{"))


# ------------------------------------------------------------------------------------- scenario

# p99 latency, sink CPU-s and the bench's own cores are in the JSON samples, not the table (too wide).
COLUMNS = [
    Column("conn/s", "conn_s", f0),
    Column("×1 worker", "scale_wall", f2),
    Column("proxy CPU s", "proxy_cpu_s", f2),
    Column("proxy µs/conn", "proxy_us_per_conn", f0),
    Column("×1 w per CPU", "scale_per_cpu", f2),
    Column("proxy cores", "proxy_cores", f2),
    Column("busiest worker %", "busiest_pct", f0),
    Column("w0 conn %", "w0_conn_pct", f0),
    Column("client CPU s", "client_cpu_s", f2),
    Column("client µs/conn", "client_us_per_conn", f0),
    Column("sink µs/conn", "sink_us_per_conn", f0),
    Column("machine cores", "machine_cores", f2),
]


@dataclass
class Options:
    count: int                 # connections per measured run
    repeat: int
    warmup: int = WARMUP_CONNECTIONS
    concurrency: int = CONCURRENCY
    procs: int = CLIENT_PROCS


def run_workers(lab: WorkersLab, opts: Options) -> ScenarioResult:
    res = ScenarioResult("workers", f"new connections (TCP + mTLS handshake + CONNECT + 1 KiB each way + close), "
                                    f"{opts.count} per run, {opts.concurrency} in flight from {opts.procs} client "
                                    f"processes; 1 vs 2 worker processes", COLUMNS,
                         same_group=lambda a, b: a.target.split(" ")[0] == b.target.split(" ")[0])
    by_name = {t.name: t for t in lab.targets}
    rows: dict[str, Row] = {}
    for kind in ("ours-node", "nghttpx") if lab.with_nghttpx else ("ours-node",):
        for n in lab.worker_counts:
            name = f"{kind} ×{n}"
            row = rows[name] = Row(name, lab.client)
            row.info["workers"] = n
            if name in lab.unavailable:
                row.note = lab.unavailable[name]
            elif name not in by_name:
                row.note = "not available"
    res.rows = list(rows.values())
    for t in lab.targets:   # unmeasured: first-use imports and caches in every worker
        try:
            run_client(lab.client_argv(t, opts.warmup, concurrency=opts.concurrency, procs=opts.procs), {})
        except PartyError as err:
            rows[t.name].note = f"failed: warm-up: {err}"
    for _ in range(opts.repeat):
        rep: dict[str, dict] = {}
        for t in lab.targets:
            row = rows[t.name]
            if row.note and not row.samples:
                continue
            try:
                rep[t.name] = m = measure(lab, t, opts)
            except PartyError as err:
                row.note = f"failed: {err}"
                continue
            for k, v in m.items():
                if v is not None:
                    row.add(k, v)
        for kind in ("ours-node", "nghttpx"):   # the paired ratios: ×N over ×1 of the same repetition
            one = rep.get(f"{kind} ×{lab.worker_counts[0]}")
            for n in lab.worker_counts[1:]:
                m = rep.get(f"{kind} ×{n}")
                if one and m:
                    rows[f"{kind} ×{n}"].add("scale_wall", m["conn_s"] / one["conn_s"])
                    rows[f"{kind} ×{n}"].add("scale_per_cpu", one["proxy_us_per_conn"] / m["proxy_us_per_conn"])
    source = "benchmarks/conn_client.c, built at start" if lab.c_client else "benchmarks/conn_client.py"
    res.notes.append(f"client: {lab.client} ({source}), {opts.procs} forked copies, full handshakes (no resumption), "
                     f"peer chain not verified")
    if lab.client_note:
        res.notes.append(lab.client_note)
    res.notes += verdict_notes(res, lab.worker_counts)
    return res


def measure(lab: WorkersLab, t: Target, opts: Options) -> dict:
    w0_before = opened_connections(t.metrics) if t.metrics else None
    per_worker0 = worker_cpu(t)
    m = run_client(lab.client_argv(t, opts.count, concurrency=opts.concurrency, procs=opts.procs),
                   {"proxy": t.party, "sink": lab.sink})
    per_worker1 = worker_cpu(t)
    if m.report.get("connections") != opts.count:
        raise PartyError(f"{m.report.get('connections')} of {opts.count} connections completed")
    wall = m.report["wall_s"]
    out = {"conn_s": opts.count / wall, "proxy_cpu_s": m.cpu["proxy"], "client_cpu_s": m.cpu["client"],
           "sink_cpu_s": m.cpu["sink"], "proxy_us_per_conn": m.cpu["proxy"] / opts.count * 1e6,
           "client_us_per_conn": m.cpu["client"] / opts.count * 1e6,
           "sink_us_per_conn": m.cpu["sink"] / opts.count * 1e6, "proxy_cores": m.cpu["proxy"] / wall,
           "p99_ms": m.report.get("p99_ms"),
           # the cores this benchmark's parties kept busy during the measured phase, and the whole machine's
           "bench_cores": (m.cpu["proxy"] + m.cpu["client"] + m.cpu["sink"]) / wall,
           "machine_cores": m.report.get("machine_busy_cores")}
    share = busiest_share(per_worker0, per_worker1, t.workers)
    out["busiest_pct"] = share * 100 if share is not None else None
    if w0_before is not None:
        out["w0_conn_pct"] = (opened_connections(t.metrics) - w0_before) / opts.count * 100
    return out


def cpu_bound_ratio(p1: float, pn: float, client: float, sink: float, n: int, busiest: float, cores: int) -> float:
    """The most ×n can reach over ×1 on this machine, from CPU per connection alone (µs: proxy with 1
    and with n workers, client, sink; the busiest worker's share of the n workers' CPU, 0..1): each
    worker is held to one core and all parties share the machine's cores."""
    rate1 = min(1 / p1, cores / (p1 + client + sink))
    raten = min(1 / (pn * busiest), n / pn, cores / (pn + client + sink))
    return raten / rate1


def projected_scale(per_cpu_ratio: float, busiest: float) -> float:
    """×n over ×1 with a core for every worker and the client elsewhere: the busiest worker, at a full
    core, sets the rate (= cpu_bound_ratio with cores unlimited). A projection, never a measurement."""
    return per_cpu_ratio / busiest


def verdict_notes(res: ScenarioResult, worker_counts: tuple[int, ...], cores: int | None = None) -> list[str]:
    """Say plainly what the ratios mean on this machine: whether the machine capped the N-worker row
    (so the wall ratio cannot show the proxy's scaling), the bound the CPU figures put on it, and what
    the per-CPU ratio and spread say about the proxy itself."""
    notes = []
    cores = cores or cpu_count()
    n1 = worker_counts[0]
    for kind in ("ours-node", "nghttpx"):
        one = next((r for r in res.rows if r.target == f"{kind} ×{n1}" and r.samples), None)
        for n in worker_counts[1:]:
            row = next((r for r in res.rows if r.target == f"{kind} ×{n}" and r.samples), None)
            if one is None or row is None or row.median("scale_wall") is None:
                continue
            wall, per_cpu = row.median("scale_wall"), row.median("scale_per_cpu")
            p1, pn = one.median("proxy_us_per_conn"), row.median("proxy_us_per_conn")
            c, s = row.median("client_us_per_conn") or 0.0, row.median("sink_us_per_conn") or 0.0
            busiest = (row.median("busiest_pct") or 100.0) / 100
            busy, bench = row.median("machine_cores"), row.median("bench_cores") or 0.0
            text = (f"{kind} ×{n}: {wall:.2f}× the ×{n1} wall rate, {per_cpu:.2f}× its connections per proxy CPU-s, "
                    f"busiest worker {busiest * 100:.0f} % of the proxy CPU (even: {100 / n:.0f} %)")
            if busy is not None and busy >= SATURATED_CORES_FRACTION * cores:
                bound = cpu_bound_ratio(p1, pn, c, s, n, busiest, cores)
                text += (f"; the MACHINE WAS THE LIMIT, not the proxy: {busy:.2f} of {cores} cores busy ({bench:.2f} "
                         f"this benchmark's parties, the rest other work); per connection the client spent {c:.0f} µs "
                         f"CPU and the sink {s:.0f} next to the proxy's {pn:.0f}, which caps ×{n} at ~{bound:.2f}× ×{n1} "
                         f"on {cores} cores: the ≥ {TARGET_SCALE}× target cannot be shown on this machine")
                text += (f"; with a core per worker and the client elsewhere these CPU figures project "
                         f"~{projected_scale(per_cpu, busiest):.2f}× (a projection, not a measurement)")
            elif busy is not None:
                verdict = "meets" if wall >= TARGET_SCALE else "misses"
                text += f"; {verdict} the ≥ {TARGET_SCALE}× target, machine not saturated ({busy:.2f} of {cores} cores busy)"
            notes.append(text)
    notes.append("×1 worker = conn/s over the ×1 row's, ×1 w per CPU = connections per proxy CPU-s over the ×1 "
                 "row's (pairs from the same repetition); proxy cores = proxy CPU over wall time (one worker can "
                 "use at most 1); busiest worker % = the busiest worker's share of the workers' CPU (ours: worker "
                 "processes, nghttpx: worker threads); w0 conn % = worker 0's share of the connections (its "
                 "/metrics); machine cores = every process on the machine during the run, from /proc/stat")
    return notes
