"""CPU time and memory of benchmark processes, read from /proc (Linux) without psutil.

A party (proxy, client, sink) may be several processes: nghttpx runs a master and a worker child, so
every figure is summed over the process and its descendants (found through
``/proc/<pid>/task/<tid>/children``). Read before and after a measured phase and subtract."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# utime and stime in /proc/<pid>/stat are in clock ticks (proc(5)); USER_HZ is almost always 100.
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class CpuTimes:
    user_s: float
    system_s: float

    @property
    def total_s(self) -> float:
        return self.user_s + self.system_s

    def __sub__(self, other: "CpuTimes") -> "CpuTimes":
        return CpuTimes(self.user_s - other.user_s, self.system_s - other.system_s)

    def __add__(self, other: "CpuTimes") -> "CpuTimes":
        return CpuTimes(self.user_s + other.user_s, self.system_s + other.system_s)


ZERO_CPU = CpuTimes(0.0, 0.0)


def parse_stat(text: str) -> CpuTimes:
    """utime + stime of one /proc/<pid>/stat line. The command name (field 2) is in parentheses and
    may itself contain spaces and parentheses, so split after the LAST ')' (proc(5))."""
    rest = text[text.rindex(")") + 2:].split()
    # After the name, rest[0] is field 3 (state); utime is field 14, stime field 15.
    utime, stime = int(rest[11]), int(rest[12])
    return CpuTimes(utime / CLOCK_TICKS_PER_S, stime / CLOCK_TICKS_PER_S)


def parse_vmrss_kib(status_text: str) -> int:
    """VmRSS from /proc/<pid>/status, in KiB (0 for a zombie, which has no VmRSS line)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """pid and every live descendant, parents before children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = list((PROC / str(p) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def cpu_times(pid: int, *, tree: bool = True) -> CpuTimes:
    """CPU time used so far by pid (and, with tree, its live descendants). Vanished processes count 0."""
    total = ZERO_CPU
    for p in descendants(pid) if tree else [pid]:
        try:
            total = total + parse_stat((PROC / str(p) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            pass
    return total


def rss_bytes(pid: int, *, tree: bool = True) -> int:
    """Resident set size of pid (and its live descendants), in bytes."""
    total = 0
    for p in descendants(pid) if tree else [pid]:
        try:
            total += parse_vmrss_kib((PROC / str(p) / "status").read_text()) * 1024
        except OSError:
            pass
    return total


def self_cpu() -> CpuTimes:
    """This process's own CPU time (what a load client reports for its measured phase)."""
    t = os.times()
    return CpuTimes(t.user, t.system)


def group_members(pgid: int) -> list[int]:
    """Live processes in process group pgid: a party's whole session, leader or not. A party's
    leader can exit before its children (nghttpx's main process before its worker, which may still
    be closing thousands of connections and holding the listening socket)."""
    out = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and _in_group_and_live(entry, pgid):
            out.append(int(entry.name))
    return out


def _in_group_and_live(proc_dir: Path, pgid: int) -> bool:
    try:
        text = (proc_dir / "stat").read_text()
    except OSError:
        return False   # exited while we looked
    rest = text[text.rindex(")") + 2:].split()
    # Field 3 is the state, field 5 the process group (proc(5)).
    if int(rest[2]) != pgid:
        return False
    if rest[0] not in ("Z", "X"):
        return True
    # A zombie main thread does not make a dead process: when it exits before the process's other
    # threads, /proc/<pid>/stat says Z while they run on with the process's sockets. Seen with
    # nghttpx's worker: main thread Z, its worker thread still R and still listening.
    try:
        tasks = list((proc_dir / "task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False
