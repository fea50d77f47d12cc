"""Running the parties of a benchmark as separate processes, and measuring them.

Each party (proxy under test, load client, sink) is its own process so that its CPU time can be
attributed: long-lived parties (proxies, sink) are sampled from /proc before and after each measured
run; a load client reports the CPU of its own measured phase.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procstat

READY_TIMEOUT_S = 20.0   # a Python party imports uvloop/h2/cryptography on a loaded 2-core box
STOP_TIMEOUT_S = 5.0     # SIGTERM, then SIGKILL
STOP_POLL_S = 0.02       # between looks at /proc for the party's remaining processes
CLIENT_TIMEOUT_S = 600.0  # one client run; a 1 GiB transfer at a pathological 5 MB/s still fits


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = READY_TIMEOUT_S, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise PartyError(f"exited with status {proc.returncode} before listening on {host}:{port}")
            if time.monotonic() > deadline:
                raise PartyError(f"nothing listening on {host}:{port} after {timeout:.0f} s")
            time.sleep(0.05)


class PartyError(RuntimeError):
    """A benchmark process failed to start, or a run failed; the row says why instead of a number."""


class Party:
    """A long-lived process (proxy or sink). Ready when it prints READY, or when ``port`` accepts."""

    def __init__(self, name: str, argv: list[str], workdir: Path, *, port: tuple[str, int] | None = None,
                 env: dict[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = workdir / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Party":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        if self.port is not None and _accepts(*self.port):
            # wait_port would take the other process's answer for our readiness and the rows would
            # measure it (or fail once it goes): say so instead.
            raise PartyError(f"{self.name}: {self.port[0]}:{self.port[1]} is already taken by another process")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        finally:
            log.close()
        try:
            if self.port is not None:
                wait_port(*self.port, proc=self.proc)
            else:
                self._wait_ready_line()
        except PartyError as err:
            self.stop()
            raise PartyError(f"{self.name}: {err}; see {self.log_path}: {self.log_tail()}") from None

    def _wait_ready_line(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        buf = b""
        while b"READY" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PartyError(f"no READY after {READY_TIMEOUT_S:.0f} s")
            r, _, _ = select.select([self.proc.stdout], [], [], min(left, 0.5))
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise PartyError(f"exited with status {self.proc.wait()} before READY")
                buf += chunk

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def cpu(self) -> procstat.CpuTimes:
        return procstat.cpu_times(self.pid)

    def rss(self) -> int:
        return procstat.rss_bytes(self.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the process group we started (nghttpx and nginx fork workers), then SIGKILL; return
        once every process of the group is gone, not just the one we started: nghttpx's main process
        exits at once on SIGTERM while its worker may still be closing thousands of connections (the
        idle scenario's 8 000 tunnels) with the listening socket open, and a restart in that window
        failed to bind ("Address already in use") while the old worker answered the readiness probe."""
        if self.proc is None:
            return
        pgid = self.proc.pid   # start_new_session: the group id is the leader's pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self._group_alive():
                break
            try:
                os.killpg(pgid, sig)   # our own new session: only this party's processes
            except ProcessLookupError:
                break
            if self._wait_group_gone(STOP_TIMEOUT_S):
                break
        try:
            self.proc.wait(STOP_TIMEOUT_S)   # reap the leader (a no-op when already reaped)
        except subprocess.TimeoutExpired:   # pragma: no cover - SIGKILL does not take 5 s
            pass

    def _group_alive(self) -> bool:
        assert self.proc is not None
        return self.proc.poll() is None or bool(procstat.group_members(self.proc.pid))

    def _wait_group_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._group_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(STOP_POLL_S)
        return True


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Measured:
    """One measured run: the client's report plus the CPU the long-lived parties spent during it."""

    report: dict
    cpu: dict[str, float] = field(default_factory=dict)  # party name → CPU seconds
    rss: dict[str, int] = field(default_factory=dict)


def run_client(argv: list[str], parties: dict[str, Party], *, timeout: float = CLIENT_TIMEOUT_S) -> Measured:
    """Run one load client to completion; CPU of each long-lived party is its /proc delta."""
    before = {name: p.cpu() for name, p in parties.items()}
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PartyError(f"client timed out after {timeout:.0f} s") from None
    after = {name: p.cpu() for name, p in parties.items()}
    if res.returncode != 0:
        tail = " | ".join(res.stderr.strip().splitlines()[-3:])
        raise PartyError(f"client exited {res.returncode}: {tail}")
    report = parse_last_json(res.stdout)
    report_cpu = report.get("cpu_user_s", 0.0) + report.get("cpu_sys_s", 0.0)
    cpu = {name: (after[name] - before[name]).total_s for name in parties}
    cpu["client"] = report_cpu
    return Measured(report, cpu)


def parse_last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    raise PartyError(f"client printed no JSON result: {stdout[-200:]!r}")


class Conversation:
    """A client driven step by step over stdin/stdout (the idle-tunnel scenario)."""

    def __init__(self, argv: list[str], timeout: float = CLIENT_TIMEOUT_S):
        self.timeout = timeout
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)

    def expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        while True:
            r, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                self.kill()
                raise PartyError(f"client did not say {prefix!r} within {self.timeout:.0f} s")
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                self.kill()
                raise PartyError(f"client exited before {prefix!r}: {' | '.join(err.strip().splitlines()[-3:])}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def say(self, line: str = "") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> dict:
        out, err = self.proc.communicate(timeout=self.timeout)
        if self.proc.returncode != 0:
            raise PartyError(f"client exited {self.proc.returncode}: {' | '.join(err.strip().splitlines()[-3:])}")
        return parse_last_json(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
