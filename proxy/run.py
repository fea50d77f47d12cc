"""``hbone-proxy run``: start a waypoint or a node proxy (DESIGN §4, §7).

Start-up order: parse flags (each with an ``HBONE_PROXY_*`` environment equivalent) → load the
configuration (bad config: exit 2 with the ``FILE: document N (Kind name): field.path: problem``
lines, no traceback) → certificates → admin/metrics/readiness listeners (readiness answers 503
"starting") → the data-plane listeners → ready. An address already in use is one line naming the
flag, exit 2.

While running: the config files are polled every ``--config-poll-interval`` seconds (mtime, size)
and SIGHUP reloads at once, reading and building the new config on a thread of its own so the data
plane keeps serving meanwhile; a reload that fails keeps the last good config, logs why and counts
``hbone_config_reloads_total{result="failure"}``. A successful reload is in force for the next
tunnel at once; live tunnels continue, except those the new policies deny (ztunnel late rejection).
Certificates rotate at half-life. SIGTERM, SIGINT or ``POST /quitquitquit`` drain (ztunnel
``src/app.rs``): readiness 503, stop accepting, GOAWAY, in-flight tunnels finish up to
``--drain-deadline``, then the rest is cut; exit 0. A second SIGINT exits at once.

``--workers N`` forks N worker processes sharing the data-plane ports with SO_REUSEPORT; the parent
supervises them (restarts a worker that dies, forwards SIGTERM/SIGHUP). Only worker 0 serves the
admin, metrics and readiness listeners: ``/config_dump`` describes worker 0 (every worker loads the same
config), ``/metrics`` sums every worker's numbers, which the others publish on unix sockets in a
private directory the parent creates (``proxy/admin/workers.py``); ``/metrics?worker=K`` is one worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

from certs.errors import CertError
from policy.errors import ConfigError
from proxy.settings import (ADMIN_PORT, CONFIG_POLL_INTERVAL_S, DRAIN_DEADLINE_S, HBONE_PORT,
                            INBOUND_PLAINTEXT_PORT, METRICS_PORT, OUTBOUND_PORT, READINESS_PORT, SOCKS5_PORT,
                            ProxySettings)

log = logging.getLogger("hbone.run")

EXIT_OK = 0
EXIT_BAD_CONFIG = 2     # DESIGN §4: bad configuration (and bad usage, an address in use) exits 2
ENV_PREFIX = "HBONE_PROXY_"
# How often certificates are checked for rotation (files replaced, or half-life reached): a stat() of
# three files or a clock comparison per identity, so once a second costs nothing and a replaced
# Secret is in use within a second (kubelet's own Secret refresh takes up to a minute).
CERT_CHECK_INTERVAL_S = 1.0
# How often the proxy looks for an idle moment to return freed heap to the OS (two idle checks in a
# row, i.e. 4-6 s without a live tunnel): rare enough to cost nothing, soon enough that RSS after a
# load test reflects live memory.
IDLE_TRIM_CHECK_S = 2.0
# With a short --workload-cert-ttl the check must come well before half-life: at least 8 checks per TTL.
CERT_CHECKS_PER_TTL = 8
CERT_CHECK_MIN_INTERVAL_S = 0.1   # floor: a 1 s TTL (certs.ca.MIN_TTL) still checks at a sane rate
# A worker that dies is restarted, but not faster than this (a crash loop must not spin the CPU).
WORKER_RESTART_BACKOFF_S = 1.0
# How long the parent waits for workers after forwarding SIGTERM, on top of the drain deadline.
WORKER_EXIT_GRACE_S = 5.0
OFF = ("off", "none", "")


class UsageError(Exception):
    pass


class BindError(Exception):
    def __init__(self, flag: str, addr: tuple[str, int], err: OSError):
        why = {errno.EADDRINUSE: "address already in use",
               errno.EADDRNOTAVAIL: "address not available on this machine",
               errno.EACCES: "permission denied"}.get(err.errno or 0, err.strerror or str(err))
        super().__init__(f"{flag} {addr[0]}:{addr[1]}: {why}")


# ---------------------------------------------------------------------------------------------
# Flags


def _addr(text: str) -> tuple[str, int] | None:
    if text.strip().lower() in OFF:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected IP:PORT (or 'off')")
    host = host.strip("[]") or "0.0.0.0"
    import ipaddress
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not an IP address") from None
    return host, int(port)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return v


def _ttl(text: str) -> float:
    """A duration as ``hbone-proxy certs issue --ttl`` takes it (30s, 15m, 24h, 7d) → seconds."""
    from certs.ca import MIN_TTL
    from certs.cli import parse_duration
    try:
        td = parse_duration(text)
    except CertError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if td < MIN_TTL:
        raise argparse.ArgumentTypeError(f"{text!r}: a certificate lives at least {MIN_TTL.total_seconds():g}s")
    return td.total_seconds()


def _trust_domains(text: str) -> tuple[str, ...]:
    from certs.spiffe import SpiffeError, check_trust_domain
    out = []
    for td in (x.strip() for x in text.split(",")):
        if not td:
            continue
        try:
            out.append(check_trust_domain(td))
        except SpiffeError as err:
            raise argparse.ArgumentTypeError(f"{td!r}: {err}") from None
    return tuple(dict.fromkeys(out))


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of workers 1..256")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line + usage, returned (not sys.exit) so main can return 2
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().rstrip()}")


# (flag, dest, type, default, help). The env equivalent is HBONE_PROXY_<DEST upper>.
_FLAGS: list[tuple[str, str, Any, Any, str]] = [
    ("--mode", "mode", str, None, "waypoint | node"),
    ("--cert", "cert", str, None, "PEM certificate chain (identity is read from it)"),
    ("--key", "key", str, None, "PEM private key"),
    ("--ca", "ca", str, None, "PEM trust bundle"),
    ("--ca-dir", "ca_dir", str, None, "mesh CA dir (`hbone-proxy certs init`): mint workload certificates"),
    ("--node", "node", str, None, "node mode: serve the workloads whose `node` is NAME"),
    ("--scope", "scope", str, None, "waypoint scope NS or NS/SA (default: its identity's namespace)"),
    ("--gateway", "gateway", str, None, "waypoint: the Gateway it implements, NS/NAME"),
    ("--identity", "identity", str, None, "waypoint with --ca-dir: NS/SA (default: the workload at its HBONE IP)"),
    ("--trust-domain", "trust_domain", str, None, "trust domain (default: the certificate's / CA's)"),
    ("--trust-domain-aliases", "trust_domain_aliases", _trust_domains, "",
     "waypoint: comma-separated aliases of the trust domain (Istio meshConfig.trustDomainAliases)"),
    ("--hbone-addr", "hbone_addr", _addr, f"0.0.0.0:{HBONE_PORT}",
     "HBONE listener IP:PORT (node mode: the port, on each local workload's IP)"),
    ("--outbound-addr", "outbound_addr", _addr, f"127.0.0.1:{OUTBOUND_PORT}", "node: outbound capture (SO_ORIGINAL_DST)"),
    ("--inbound-plaintext-addr", "inbound_plaintext_addr", _addr, "off",
     f"node: plaintext inbound (e.g. 0.0.0.0:{INBOUND_PLAINTEXT_PORT})"),
    ("--socks5-addr", "socks5_addr", _addr, f"127.0.0.1:{SOCKS5_PORT}", "node: SOCKS5 outbound"),
    ("--admin-addr", "admin_addr", _addr, f"127.0.0.1:{ADMIN_PORT}", "admin: /config_dump, /quitquitquit, /logging"),
    ("--metrics-addr", "metrics_addr", _addr, f"0.0.0.0:{METRICS_PORT}", "Prometheus /metrics"),
    ("--readiness-addr", "readiness_addr", _addr, f"0.0.0.0:{READINESS_PORT}", "readiness /healthz/ready"),
    ("--workers", "workers", _workers, "1", "worker processes sharing the ports (SO_REUSEPORT)"),
    ("--drain-deadline", "drain_deadline_s", _positive_float, str(DRAIN_DEADLINE_S),
     "seconds in-flight tunnels get on shutdown"),
    ("--config-poll-interval", "config_poll_interval_s", _positive_float, str(CONFIG_POLL_INTERVAL_S),
     "seconds between config file checks (0: only SIGHUP)"),
    ("--workload-cert-ttl", "workload_cert_ttl_s", _ttl, "24h",
     "validity of certificates minted from --ca-dir (30s, 15m, 24h); rotated at half-life"),
    ("--log-level", "log_level", str, "info", "debug | info | warning | error"),
    ("--access-log", "access_log", str, "-", "'-' (stdout), a file path, or 'off'"),
]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hbone-proxy run", description="Run a waypoint or node proxy. Every flag has an "
                f"environment equivalent {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}SOCKS5_ADDR).")
    p.add_argument("--config", dest="config", action="append", metavar="PATH",
                   help=f"YAML file or directory (repeatable; env {ENV_PREFIX}CONFIG, paths separated by ':')")
    for flag, dest, typ, default, help_ in _FLAGS:
        # Values stay strings here and are converted in parse_settings, after the environment
        # fallback: "off" (None) given as a flag must not fall through to the environment.
        # --help shows each flag's default ("off": the listener is not started)
        kwargs: dict[str, Any] = {"dest": dest,
                                  "help": help_ if default in (None, "") else f"{help_} (default {default})"}
        if flag == "--mode":
            kwargs["choices"] = ("waypoint", "node")
        p.add_argument(flag, **kwargs)
    return p


def parse_settings(argv: list[str], environ: dict[str, str] | None = None) -> ProxySettings:
    """Flags, then environment, then defaults. Raises ``UsageError``."""
    env = os.environ if environ is None else environ
    p = build_parser()
    ns = p.parse_args(argv)
    values: dict[str, Any] = {}
    for flag, dest, typ, default, _ in _FLAGS:
        env_name = ENV_PREFIX + dest.upper().removesuffix("_S")
        raw, source = getattr(ns, dest), flag
        if raw is None:
            raw, source = env.get(env_name), env_name
        if raw is None:
            raw, source = default, f"{flag} default"
        v = raw
        if raw is not None and typ is not str:
            try:
                v = typ(raw)
            except argparse.ArgumentTypeError as err:
                raise UsageError(f"hbone-proxy run: {source}: {err}") from None
        values[dest] = v
    paths = ns.config or [x for x in env.get(ENV_PREFIX + "CONFIG", "").split(os.pathsep) if x]
    if not paths:
        raise UsageError("hbone-proxy run: --config PATH is required (a YAML file or a directory)")
    mode = values.pop("mode")
    if mode not in ("waypoint", "node"):
        raise UsageError("hbone-proxy run: --mode waypoint|node is required")
    if mode == "node" and not values["node"]:
        raise UsageError("hbone-proxy run: node mode needs --node NAME (the node whose workloads it serves)")
    if values["hbone_addr"] is None:
        raise UsageError("hbone-proxy run: --hbone-addr cannot be off")
    if values["access_log"].strip().lower() in OFF:
        values["access_log"] = None
    if values["log_level"].lower() not in ("debug", "info", "warning", "warn", "error", "critical"):
        raise UsageError(f"hbone-proxy run: --log-level {values['log_level']!r}: use debug, info, warning or error")
    td = values.pop("trust_domain")
    settings = ProxySettings(mode=mode, config_paths=tuple(paths), **values)
    if td:
        settings = replace(settings, trust_domain=td)
    return settings


# ---------------------------------------------------------------------------------------------
# Config file change detection


def config_signature(paths: tuple[str, ...]) -> tuple:
    """What the poller compares: each file's (path, mtime_ns, size); a directory's listing too, so
    an added or removed file counts as a change."""
    from policy.documents import source_files
    sig = []
    for f in source_files(list(paths)):
        try:
            st = os.stat(f)
            sig.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append((f, None))
    for p in paths:   # a path that vanished or appeared
        sig.append((p, os.path.exists(p)))
    return tuple(sig)


# ---------------------------------------------------------------------------------------------
# The running proxy


class ProxyApp:
    """One proxy process: config store, certificates, telemetry, admin and the mode's data plane."""

    def __init__(self, settings: ProxySettings, *, worker: int = 0):
        self.settings = settings
        self.worker = worker
        self.state = "starting"          # → "ready" → "draining"
        self.store = None
        self.identities = None
        self.mode_proxy: Any = None
        self.metrics = None
        self.access_log = None
        self.admin = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._signals = 0
        self._reloading = False      # a reload is running (see reload())
        self._reload_again = False   # ...and another was asked for meanwhile
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jwks_wake: asyncio.Event | None = None   # a build's JWKS fetch failed: the refresher tries soon
        self._jwks_due = False                          # ...noted before the refresher started (prepare)

    # ---- set-up that can fail with exit 2 (no event loop needed) ----
    def prepare(self) -> None:
        """Load config and certificates. Raises ConfigError / CertError / UsageError."""
        from policy.mesh import load_mesh_config
        from policy.scope import WaypointScope
        from proxy.identity import Identities, waypoint_identity
        from proxy.snapshot import ConfigStore
        from proxy.telemetry.accesslog import AccessLog
        from proxy.telemetry.metrics import Metrics

        s = self.settings
        mesh = load_mesh_config(list(s.config_paths))
        for w in mesh.warnings:
            log.warning("%s", w)
        ids = Identities.from_settings(cert=s.cert, key=s.key, ca=s.ca, ca_dir=s.ca_dir,
                                       ttl=timedelta(seconds=s.workload_cert_ttl_s))
        td = ids.trust_domain
        scope = None
        self.cert_source = None
        if s.mode == "waypoint":
            hbone_ip = s.hbone_addr[0] if s.hbone_addr[0] not in ("0.0.0.0", "::") else None
            if ids.file_source is not None:
                ident = ids.file_source.identity
                src = ids.file_source
            else:
                ident, _ = waypoint_identity(mesh.inventory, hbone_ip=hbone_ip, identity_flag=s.identity,
                                             trust_domain=td)
                src = ids.for_identity(ident)
            self.cert_source = src
            try:
                scope = WaypointScope.parse(s.scope or ident.namespace, address_ip=hbone_ip, gateway=s.gateway)
            except ValueError as err:
                raise UsageError(f"hbone-proxy run: {err}") from None
        self.identities = ids
        self.settings = s = replace(s, trust_domain=td)
        self.store = ConfigStore(list(s.config_paths), mode=s.mode, scope=scope, clock=time.time,
                                 trust_domains=(td, *(a for a in s.trust_domain_aliases if a != td)))
        if s.mode == "waypoint":
            from proxy.jwks_resolver import JwksResolver
            self.store.jwks = JwksResolver(on_missing=self._jwks_missing)
        self.store.load()
        self.metrics = Metrics()
        jwks = self.store.jwks
        if jwks is not None:
            self.metrics.jwks_fetches_from(lambda: (jwks.fetches_ok, jwks.fetches_failed))
        sink: Any = None
        if s.access_log == "-":
            sink = sys.stdout
        elif s.access_log:
            sink = s.access_log
        self.access_log = AccessLog(sink, metrics=self.metrics)

    # ---- readiness ----
    def not_ready(self) -> str | None:
        if self.state == "ready":
            return None
        return self.state

    # ---- the event loop part ----
    async def run(self) -> int:
        from proxy.admin.server import AdminServer, LoggingControl

        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        s = self.settings
        serve_admin = self.worker == 0
        workers_dir = s.workers_dir if s.workers > 1 else None
        publisher = worker_metrics = None
        if workers_dir is not None:
            from proxy.admin.workers import WorkerMetrics, WorkerMetricsPublisher
            if serve_admin:
                worker_metrics = WorkerMetrics(workers_dir, s.workers, self.metrics.exposition)
            else:
                publisher = WorkerMetricsPublisher(workers_dir, self.worker, self.metrics.exposition)
        self.admin = AdminServer(
            config_dump=self.config_dump, quit=self.request_stop,
            logging=LoggingControl(self.access_log), readiness=self.not_ready,
            metrics=self.metrics.exposition, explain=self._explain, stats=self._stats,
            admin_addr=s.admin_addr if serve_admin else None,
            metrics_addr=s.metrics_addr if serve_admin else None,
            readiness_addr=s.readiness_addr if serve_admin else None, worker_metrics=worker_metrics)
        flags = {"admin": "--admin-addr", "metrics": "--metrics-addr", "readiness": "--readiness-addr"}
        started = []
        try:
            for name, server in self.admin.servers.items():
                try:
                    await server.start()
                except OSError as err:
                    raise BindError(flags[name], (server.host, server.port), err) from None
                started.append(server)
            if publisher is not None:
                await publisher.start()
            await self._start_mode()
        except BaseException:
            for server in started:
                await server.close()
            if publisher is not None:
                await publisher.close()
            await self._close_mode(0.0)
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._spawn(self._poll_config())
        self._spawn(self._rotate_certs())
        self._spawn(self._trim_when_idle())
        if self.store.jwks is not None:
            self._spawn(self._refresh_jwks())
        self.state = "ready"
        log.info("%s proxy ready (config v%s%s)", s.mode, self.store.current.version,
                 f", worker {self.worker}" if s.workers > 1 else "")
        await self._stop.wait()
        # ---- drain (ztunnel app.rs: readiness fails first, then listeners drain) ----
        self.state = "draining"
        log.info("draining: up to %gs for in-flight tunnels", s.drain_deadline_s)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._close_mode(s.drain_deadline_s)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if publisher is not None:
            await publisher.close()
        await self.admin.close()
        self.access_log.close()
        log.info("drained; exiting")
        return EXIT_OK

    async def _start_mode(self) -> None:
        s = self.settings
        if s.mode == "node":
            from proxy.node import NodeProxy
            node = NodeProxy(s, self.store, self.identities, metrics=self.metrics, access_log=self.access_log)
            self.mode_proxy = node
            self.metrics.count_tunnels_with(lambda: node.active_tunnels)
            self.store.subscribe(node.on_config)
            try:
                await node.start()
            except OSError as err:
                flag, addr = node.binding
                raise BindError(flag, getattr(err, "bind_addr", addr), err) from None
        else:
            from proxy.waypoint import Waypoint
            try:
                wp = await Waypoint.start(s, self.store, self.cert_source, self.metrics, self.access_log)
            except OSError as err:
                raise BindError("--hbone-addr", s.hbone_addr, err) from None
            self.mode_proxy = wp
            self.store.subscribe(lambda old, new: wp.recheck(new))

    async def _close_mode(self, deadline: float) -> None:
        if self.mode_proxy is not None:
            await self.mode_proxy.close(deadline)

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if sig == signal.SIGINT and self.state == "draining":
            # ztunnel: "A second SIGINT exits immediately."
            os._exit(130)
        log.info("%s: starting graceful shutdown", signal.Signals(sig).name)
        self.request_stop()

    def request_stop(self) -> None:
        if self._stop is not None:
            if not self._stop.is_set():
                # Readiness fails and the listeners stop accepting in the same loop turn, so nothing
                # can slip in between "503 draining" and the first await of the drain.
                self.state = "draining"
                if self.mode_proxy is not None:
                    self.mode_proxy.stop_accepting()
            self._stop.set()

    def reload(self) -> None:
        """SIGHUP or a changed file: reload on a thread of its own (``ConfigStore.reload_in_thread``), so
        the data plane keeps serving while a large config is read. One reload at a time; a trigger
        during one makes it run once more when it ends (the files may have changed after it read them)."""
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        self._spawn(self._reload())

    async def _reload(self) -> None:
        try:
            while True:
                self._reload_again = False
                ok = await self.store.reload_in_thread()
                self.metrics.config_reload(ok)
                if ok:
                    log.info("config reloaded: version %s", self.store.current.version)
                if not self._reload_again:
                    return
        finally:
            self._reloading = False

    async def _poll_config(self) -> None:
        interval = self.settings.config_poll_interval_s
        if interval <= 0:
            return
        paths = self.settings.config_paths
        sig = config_signature(paths)
        while True:
            await asyncio.sleep(interval)
            now = config_signature(paths)
            if now != sig:
                sig = now
                self.reload()

    def _jwks_missing(self) -> None:
        """From the config thread: a key set could not be fetched for the snapshot being built."""
        self._jwks_due = True
        loop, wake = self._loop, self._jwks_wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    async def _refresh_jwks(self) -> None:
        """istiod's JWKS refresher (proxy/jwks_resolver.py): every key set fetched again on its schedule (20
        minutes; after a failed round 1 minute, doubling up to an hour), the ones a build could not fetch at once
        when it says so; a changed key set reloads the config. Fetches run on a daemon thread of their own (their
        retries may take seconds), so a stop never waits for them."""
        from proxy.jwks_resolver import JWKS_REFRESH_INTERVAL_S, next_refresh_interval
        from proxy.snapshot import in_daemon_thread
        loop = self._loop = asyncio.get_running_loop()
        wake = self._jwks_wake = asyncio.Event()
        if self._jwks_due:
            wake.set()
        resolver = self.store.jwks
        interval, last_errors = JWKS_REFRESH_INTERVAL_S, False
        deadline = loop.time() + interval
        while True:
            try:
                await asyncio.wait_for(wake.wait(), max(0.0, deadline - loop.time()))
                missing_only = True
            except TimeoutError:
                missing_only = False
            wake.clear()
            self._jwks_due = False
            try:
                changed, errors = await in_daemon_thread(lambda: resolver.refresh(only_missing=missing_only),
                                                          "jwks-refresh")
            except Exception:   # noqa: BLE001 — a bug here must not end the refresher: logged, tried again later
                log.exception("JWKS refresh failed")
                changed, errors = False, True
            if not missing_only or errors:
                # (A failed catch-up round moves the next one to the failure schedule too, so a waypoint that
                # started while its identity provider was down does not wait the full 20 minutes.)
                interval = next_refresh_interval(interval, errors, last_errors)
                last_errors = errors
                deadline = loop.time() + interval
            if changed:
                self.reload()

    async def _trim_when_idle(self) -> None:
        """Once per idle period (no live tunnels for two checks in a row), hand freed heap back to the
        OS (hbone._malloc.release_free_memory): RSS after a burst then returns to what is live."""
        from hbone._malloc import release_free_memory
        idle_checks, trimmed = 0, True
        while True:
            await asyncio.sleep(IDLE_TRIM_CHECK_S)
            if self.mode_proxy.active_tunnels:   # Waypoint and NodeProxy both count their live tunnels
                idle_checks, trimmed = 0, False
                continue
            idle_checks += 1
            if idle_checks >= 2 and not trimmed:
                release_free_memory()
                trimmed = True
                log.debug("idle: released free heap memory to the OS")

    async def _rotate_certs(self) -> None:
        from proxy.identity import serial_of
        interval = max(CERT_CHECK_MIN_INTERVAL_S,
                       min(CERT_CHECK_INTERVAL_S, self.settings.workload_cert_ttl_s / CERT_CHECKS_PER_TTL))
        reported: dict[int, Any] = {}   # id(source) → the last error logged (each error is said once)
        while True:
            await asyncio.sleep(interval)
            now = datetime.now(timezone.utc)
            for src in self.identities.all():
                if src.maybe_rotate(now):
                    log.info("certificate rotated: %s serial %s now valid until %s", src.identity,
                             serial_of(src.current()), src.current().not_after)
                err = src.last_error
                if err is not None and reported.get(id(src)) is not err:
                    log.warning("certificate for %s not rotated: %s", src.identity, err)
                reported[id(src)] = err

    def _stats(self) -> list[tuple[str, int]]:
        """``GET /stats``: the waypoint's per-cluster circuit-breaker numbers (a node proxy keeps none)."""
        http = getattr(self.mode_proxy, "http", None)
        return http.breakers.envoy_stats() if http is not None else []

    def _explain(self, body: dict) -> Any:
        """``POST /explain`` (schema: proxy.admin.explain): the waypoint's answer for a request."""
        if self.settings.mode != "waypoint":
            raise ValueError("explain answers for a waypoint; this is a node proxy")
        from proxy.admin.explain import ExplainRequest
        from proxy.pipeline.explain import explain_request
        req = ExplainRequest.from_json(body)
        return explain_request(self.store.current, req.source, (req.host, req.port), req.method or None,
                               req.path or None, dict(req.headers) or None)

    def _waypoint_views(self) -> dict:
        """Envoy-style listeners/clusters/routes/endpoints for ``proxy-config`` (seed's shape)."""
        from proxy.admin.views import build_waypoint_views
        from proxy.pipeline.views_input import views_input
        s = self.settings
        fmt = lambda a: f"{a[0]}:{a[1]}" if a else None  # noqa: E731
        return build_waypoint_views(**views_input(self.store.current), hbone_addr=fmt(s.hbone_addr),
                                    admin_addr=fmt(s.admin_addr), metrics_addr=fmt(s.metrics_addr)).to_dict()

    # ---- /config_dump ----
    def config_dump(self) -> dict:
        snap = self.store.current
        inv = snap.mesh.inventory
        m = snap.mesh
        dump: dict[str, Any] = {
            "mode": self.settings.mode,
            "state": self.state,
            "config": {"version": snap.version, "loaded_at": snap.loaded_at, "sources": list(snap.sources),
                       "reloads_ok": self.store.reloads_ok, "reloads_failed": self.store.reloads_failed,
                       "last_error": self.store.last_error, "scope": str(snap.scope) if snap.scope else None},
            "workloads": [{"uid": w.uid, "name": w.name, "namespace": w.namespace, "ips": list(w.workload_ips),
                           "identity": w.identity, "node": w.node, "protocol": w.protocol, "status": w.status}
                          for _, w in sorted(inv.workloads.items())],
            "services": [{"name": sv.name, "namespace": sv.namespace, "hostname": sv.hostname,
                          "vips": [v.ip for v in sv.vips], "ports": {str(k): v for k, v in sv.ports.items()},
                          "waypoint": str(sv.waypoint) if sv.waypoint else None,
                          "endpoints": [w.uid for w, _ in inv.endpoints_of(sv)]}
                         for _, sv in sorted(inv.services.items())],
            "policies": sorted(f"{p.namespace}/{p.name}" for p in m.authorization_policies),
            "virtual_services": sorted(f"{v.namespace}/{v.name}" for v in m.virtual_services),
            "destination_rules": sorted(f"{d.namespace}/{d.name}" for d in m.destination_rules),
            "http_routes": sorted(f"{r.namespace}/{r.name}" for r in m.http_routes),
            "certificates": self.identities.describe(),
        }
        if self.settings.mode == "waypoint":
            dump.update(self._waypoint_views())
        extra = getattr(self.mode_proxy, "config_dump", None)
        if callable(extra):
            part = extra()
            if isinstance(part, dict):
                for k, v in part.items():
                    dump.setdefault(k, v)
        return dump


# ---------------------------------------------------------------------------------------------
# Entry point


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
               "error": logging.ERROR, "critical": logging.CRITICAL}


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=_LOG_LEVELS.get(level.lower(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _run_one(settings: ProxySettings, worker: int = 0) -> int:
    """Prepare and run one proxy process; every expected failure is one line and exit 2."""
    app = ProxyApp(settings, worker=worker)
    try:
        app.prepare()
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except (CertError, UsageError) as err:
        print(f"hbone-proxy run: {err}" if isinstance(err, CertError) else str(err), file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's loop still works
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(app.run())
    except BindError as err:
        print(f"hbone-proxy run: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    finally:
        if app.access_log is not None:
            app.access_log.close()


def _supervise(settings: ProxySettings) -> int:
    """``--workers N``: fork N workers (each a full proxy on SO_REUSEPORT sockets), restart any that
    dies unexpectedly, forward SIGTERM/SIGINT/SIGHUP, and exit 0 once all exited after a stop."""
    # Where workers 1..N-1 publish their metrics for worker 0's /metrics (proxy/admin/workers.py):
    # private to this user (mkdtemp: 0700), removed when the supervisor ends.
    workers_dir = tempfile.mkdtemp(prefix="hbone-proxy-workers-")
    try:
        return _supervise_in(replace(settings, workers_dir=workers_dir))
    finally:
        shutil.rmtree(workers_dir, ignore_errors=True)


def _supervise_in(settings: ProxySettings) -> int:
    children: dict[int, int] = {}   # pid → worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                code = _run_one(settings, worker=index)
            finally:
                os._exit(code)
        children[pid] = index

    def forward(sig, _frame) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(settings.workers):
        spawn(i)
    worst = EXIT_OK
    last_restart = 0.0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(status)
        if index is None:
            continue
        if stopping:
            worst = max(worst, code if code > 0 else 0)
            continue
        if code == EXIT_BAD_CONFIG:
            # Bad config or an address in use: restarting would fail the same way.
            stopping = True
            worst = EXIT_BAD_CONFIG
            forward(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) exited with %d; restarting", index, pid, code)
        wait = last_restart + WORKER_RESTART_BACKOFF_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)   # signals are handled during it (PEP 475 resumes the sleep)
        if stopping:
            # SIGTERM/SIGINT came during the back-off: forward() could not reach a worker not yet
            # started, so starting it now would leave one that nobody stops (and us waiting for it).
            continue
        last_restart = time.monotonic()
        spawn(index)
    return worst


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = parse_settings(argv)
    except UsageError as err:
        print(str(err), file=sys.stderr)
        return EXIT_BAD_CONFIG
    except SystemExit as exit_:   # --help
        return int(exit_.code or 0)
    _setup_logging(settings.log_level)
    from hbone._malloc import tune_malloc
    tune_malloc()   # performance.md: before the first big TLS read buffer
    if settings.workers > 1:
        return _supervise(settings)
    return _run_one(settings)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
