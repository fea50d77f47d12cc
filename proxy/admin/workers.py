"""``--workers N``: one ``/metrics`` for all worker processes, as Envoy's ``--concurrency`` has one.

Envoy runs its workers as threads of one process, so ``/stats/prometheus`` counts every worker's
traffic. Our workers are processes on SO_REUSEPORT sockets (the kernel spreads connections over
them), and only worker 0 binds the admin, metrics and readiness ports. So that a scrape still sees
the whole proxy, every other worker publishes its own exposition on a private unix socket in a
directory the supervisor creates (mode 0700), and worker 0 answers ``/metrics`` with the sum:

* counters, histograms and summaries: every sample summed over the workers, label set by label set
  (a series only one worker has appears once, with its value);
* gauges: summed where the sum is the proxy's value (tunnels open, memory, open file descriptors:
  ``SUMMED_GAUGES``), the earliest for ``process_start_time_seconds``, worker 0's otherwise
  (``python_info``, ``process_max_fds``: the same in every worker);
* ``hbone_workers{state="reporting"|"unreachable"}``: how many workers the answer covers. A worker
  that is restarting, or does not answer within ``WORKER_SCRAPE_TIMEOUT_S``, is left out of that
  scrape (its counters reappear, from its new process's zero, once it is back — as after an Envoy
  restart).

``/metrics?worker=K`` answers worker K's own exposition (503 if it cannot be reached): the
benchmark's ``workers`` scenario reads worker 0's share of the connections that way.

The merge is a pure function over exposition texts (``merge_expositions``); the rest is the small
asyncio shell that publishes and fetches them.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client.utils import floatToGoString

from proxy.telemetry.cluster_stats import CLUSTER_STAT_TYPES

# A sibling's exposition is read with this deadline: a worker stuck for longer is reported as
# unreachable rather than holding up the scrape (Prometheus' default scrape_timeout is 10 s).
WORKER_SCRAPE_TIMEOUT_S = 1.0
# The most we read of one worker's exposition: a few thousand series are a few hundred KiB; a
# bigger answer means something is wrong, and reading it must not grow worker 0 without bound.
MAX_WORKER_EXPOSITION_BYTES = 16 * 1024 * 1024

# Gauges whose per-worker values add up to the proxy's (every other gauge is worker 0's).
SUMMED_GAUGES = frozenset({
    "hbone_tunnels_active",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_open_fds",
    # Envoy's cluster gauges (upstream_rq_active, ...): each worker counts its own requests and connections.
    *(f"envoy_cluster_{stat}" for stat, (kind, _) in CLUSTER_STAT_TYPES.items() if kind == "gauge"),
})
EARLIEST_GAUGES = frozenset({"process_start_time_seconds"})

WORKERS_FAMILY = "hbone_workers"


def socket_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.metrics.sock")


# ---------------------------------------------------------------------------------------------
# The pure part: parse and merge Prometheus text expositions


@dataclass
class _Family:
    name: str
    help: str | None
    type: str
    samples: dict[str, float]     # "name{labels}" → value, in first-seen order


def _parse(text: str) -> list[_Family]:
    """The families of one exposition (prometheus_client's text format 0.0.4: ``# HELP`` and ``# TYPE``
    before each family's samples, one ``name{labels} value`` per line, no timestamps)."""
    families: list[_Family] = []
    current: _Family | None = None
    helps: dict[str, str] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] == "HELP":
                helps[parts[2]] = parts[3] if len(parts) > 3 else ""
            elif len(parts) >= 4 and parts[1] == "TYPE":
                current = _Family(parts[2], helps.get(parts[2]), parts[3], {})
                families.append(current)
            continue
        # The value is the last space-separated token; label values may contain spaces.
        key, _, value = line.rpartition(" ")
        if not key:
            raise ValueError(f"not a sample line: {line!r}")
        if current is None:   # a sample before any TYPE: an untyped family of its own
            current = _Family(key.split("{", 1)[0], None, "untyped", {})
            families.append(current)
        current.samples[key] = float(value)
    return families


def merge_expositions(texts: Iterable[str], *, reporting: int | None = None, unreachable: int = 0) -> str:
    """The workers' expositions as one (worker 0's first: its order and its gauges lead). With
    ``reporting`` set, the ``hbone_workers`` gauge is added. ``ValueError`` if a text does not parse."""
    return merge_families([_parse(text) for text in texts], reporting=reporting, unreachable=unreachable)


def merge_families(parsed: Iterable[list[_Family]], *, reporting: int | None = None, unreachable: int = 0) -> str:
    merged: dict[str, _Family] = {}
    for families in parsed:
        for fam in families:
            into = merged.get(fam.name)
            if into is None:
                merged[fam.name] = _Family(fam.name, fam.help, fam.type, dict(fam.samples))
                continue
            samples = into.samples
            if fam.type == "gauge":
                if fam.name in SUMMED_GAUGES:
                    for key, value in fam.samples.items():
                        samples[key] = samples.get(key, 0.0) + value
                elif fam.name in EARLIEST_GAUGES:
                    for key, value in fam.samples.items():
                        samples[key] = min(samples.get(key, value), value)
                else:
                    for key, value in fam.samples.items():
                        samples.setdefault(key, value)
            else:   # counter, histogram, summary, untyped: totals
                for key, value in fam.samples.items():
                    samples[key] = samples.get(key, 0.0) + value
    out: list[str] = []
    for fam in merged.values():
        if fam.help is not None:
            out.append(f"# HELP {fam.name} {fam.help}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        out.extend(f"{key} {floatToGoString(value)}" for key, value in fam.samples.items())
    if reporting is not None:
        out.append(f"# HELP {WORKERS_FAMILY} Worker processes this exposition covers (reporting) or left out")
        out.append(f"# TYPE {WORKERS_FAMILY} gauge")
        out.append(f'{WORKERS_FAMILY}{{state="reporting"}} {floatToGoString(reporting)}')
        out.append(f'{WORKERS_FAMILY}{{state="unreachable"}} {floatToGoString(unreachable)}')
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# The shell: workers 1..N-1 publish, worker 0 gathers


class WorkerMetricsPublisher:
    """A worker's exposition on its unix socket: each connection gets the current text, then EOF."""

    def __init__(self, directory: str, index: int, exposition: Callable[[], bytes]):
        self.path = socket_path(directory, index)
        self._exposition = exposition
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            os.unlink(self.path)   # a previous process of this worker index left it behind
        except FileNotFoundError:
            pass
        self._server = await asyncio.start_unix_server(self._answer, self.path)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self._exposition())
            await writer.drain()
        except OSError:
            pass   # the scraper went away: nothing to answer
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


async def fetch_worker(directory: str, index: int, *, timeout_s: float = WORKER_SCRAPE_TIMEOUT_S) -> bytes | None:
    """Worker ``index``'s exposition, or None if it cannot be reached in time (restarting, stuck) or
    its answer is larger than ``MAX_WORKER_EXPOSITION_BYTES``."""
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_unix_connection(socket_path(directory, index))
            data = await reader.read(MAX_WORKER_EXPOSITION_BYTES + 1)
            chunks = [data]
            size = len(data)
            while data and size <= MAX_WORKER_EXPOSITION_BYTES:
                data = await reader.read(MAX_WORKER_EXPOSITION_BYTES + 1 - size)
                chunks.append(data)
                size += len(data)
    except (OSError, TimeoutError):
        return None
    finally:
        if writer is not None:
            writer.close()
    if size > MAX_WORKER_EXPOSITION_BYTES:
        return None
    return b"".join(chunks)


class WorkerMetrics:
    """Worker 0's ``/metrics``: its own exposition merged with every sibling's."""

    def __init__(self, directory: str, workers: int, own: Callable[[], bytes], *,
                 timeout_s: float = WORKER_SCRAPE_TIMEOUT_S):
        self.directory = directory
        self.workers = workers
        self._own = own
        self.timeout_s = timeout_s

    async def one(self, index: int) -> bytes | None:
        if index == 0:
            return self._own()
        return await fetch_worker(self.directory, index, timeout_s=self.timeout_s)

    async def merged(self) -> bytes:
        own = self._own()
        others = await asyncio.gather(*(fetch_worker(self.directory, i, timeout_s=self.timeout_s)
                                        for i in range(1, self.workers)))
        parsed = [_parse(own.decode())]
        for data in others:
            if data is None:
                continue
            try:
                parsed.append(_parse(data.decode()))
            except (UnicodeDecodeError, ValueError):
                # Never expected (every worker runs this code): leave that worker out of this
                # scrape, counted as unreachable, rather than fail the whole answer.
                continue
        reached = len(parsed)
        return merge_families(parsed, reporting=reached, unreachable=self.workers - reached).encode()


__all__ = ["WorkerMetrics", "WorkerMetricsPublisher", "merge_expositions", "merge_families", "fetch_worker", "socket_path",
           "SUMMED_GAUGES", "WORKER_SCRAPE_TIMEOUT_S", "MAX_WORKER_EXPOSITION_BYTES"]
