"""One JSON line per tunnel and per HTTP request (DESIGN §6).

Field names follow ztunnel's access log where it has one (``src.addr``, ``src.identity``,
``dst.hbone_addr``, ``bytes_sent``, ``duration``... reference/ztunnel.md §6.2) and Envoy's
``%RESPONSE_FLAGS%`` / ``%RESPONSE_CODE_DETAILS%`` for flags and the RBAC detail
(``rbac_access_denied_matched_policy[ns[NS]-policy[NAME]-rule[N]]``).

Why a queue and a thread, not a synchronous write: a write to stdout that is a pipe blocks when the
reader (kubectl logs, a log shipper) stalls, and a blocked write on the event loop stalls every tunnel.
So ``emit`` only does ``put_nowait`` on a bounded queue (a microsecond or two); a writer thread
serialises and writes in batches. When the queue is full the line is dropped and counted
(``hbone_accesslog_dropped_lines_total``) — losing a log line beats stalling traffic.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Iterable

from .metrics import NO_FLAGS, format_flags

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger("hbone.accesslog")

# Lines buffered between the event loop and the writer thread. 8192 lines of ~700 bytes is ~6 MB at
# most: a few seconds of a busy proxy's logging, enough to ride out a slow reader without growing.
ACCESSLOG_QUEUE_LINES = 8192
# The writer drains at most this many lines per write()+flush(): batching amortises the syscall.
WRITE_BATCH_LINES = 256
# close() waits this long for the writer to drain before giving up (shutdown must not hang on a
# stuck stdout pipe).
CLOSE_TIMEOUT_S = 2.0

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "off": 100}

RBAC_DENIED_PREFIX = "rbac_access_denied_matched_policy"
# Envoy's detail when ALLOW policies exist but none matched (default deny).
RBAC_NONE_MATCHED = f"{RBAC_DENIED_PREFIX}[none]"


def rbac_policy_name(namespace: str, name: str, rule: int | None = None) -> str:
    """Istio's RBAC policy name for one AuthorizationPolicy rule (pilot/pkg/security/authz/builder):
    ``ns[default]-policy[deny-all]-rule[0]``."""
    base = f"ns[{namespace}]-policy[{name}]"
    return base if rule is None else f"{base}-rule[{rule}]"


def rbac_denied_detail(namespace: str, name: str, rule: int | None = None) -> str:
    """Envoy's %RESPONSE_CODE_DETAILS% for a request denied by that policy rule."""
    return f"{RBAC_DENIED_PREFIX}[{rbac_policy_name(namespace, name, rule)}]"


@dataclass(frozen=True)
class AccessRecord:
    """One access-log line. ``kind`` "tunnel" for a connection/tunnel, "http" for one request,
    "connection" for a connection a listener refused before any tunnel (TLS, HTTP/2 abuse).

    Unset optional fields are left out of the line (HTTP fields on a tunnel line, for instance), so
    lines stay short and a field's presence means something.
    """

    start_time: float                     # epoch seconds when the tunnel/request started
    kind: str                             # "tunnel" | "http" | "connection"
    direction: str = ""                   # "inbound" | "outbound"
    reporter: str = ""                    # "waypoint" | "destination" | "source"
    src_addr: str = ""                    # downstream ip:port
    src_identity: str = ""                # verified SPIFFE id (mTLS only)
    src_workload: str = ""
    src_namespace: str = ""
    dst_addr: str = ""                    # the L4 address we dialled or were dialled on (x:15008)
    dst_hbone_addr: str = ""              # the CONNECT :authority
    dst_service: str = ""
    dst_workload: str = ""
    dst_identity: str = ""
    chain: str = ""                       # filter chain that matched (inbound-vip|9080||...-http, direct-tcp)
    protocol: str = ""                    # tcp | http/1.1 | h2c | h2
    authz: str = ""                       # "allow" | "deny"
    authz_policy: str = ""                # "ns/name" of the policy that decided ("" = default allow)
    response_code_details: str = ""       # e.g. rbac_access_denied_matched_policy[ns[default]-policy[x]-rule[0]]
    route: str = ""                       # route name (inbound-vip|9080|http|reviews.default.svc.cluster.local)
    upstream_cluster: str = ""            # inbound-vip|9080|http/v1|reviews.default.svc.cluster.local
    upstream_host: str = ""               # endpoint chosen, ip:port
    attempts: int | None = None           # upstream attempts (1 + retries)
    method: str = ""
    path: str = ""
    authority: str = ""
    status: int | None = None             # HTTP status sent (0 = none), or HBONE CONNECT status
    bytes_sent: int = 0                   # to the downstream
    bytes_received: int = 0               # from the downstream
    duration_ms: float = 0.0
    response_flags: str | tuple[str, ...] = NO_FLAGS
    error: str = ""

    @property
    def level(self) -> str:
        # ztunnel: "connection complete" at info, at error when it failed.
        return "error" if self.error else "info"


# dataclass field → JSON key (ztunnel's dotted names where it has them).
_KEYS = {
    "src_addr": "src.addr", "src_identity": "src.identity", "src_workload": "src.workload",
    "src_namespace": "src.namespace", "dst_addr": "dst.addr", "dst_hbone_addr": "dst.hbone_addr",
    "dst_service": "dst.service", "dst_workload": "dst.workload", "dst_identity": "dst.identity",
    "authz_policy": "authz.policy",
}
_ALWAYS = frozenset({"start_time", "kind", "bytes_sent", "bytes_received", "duration_ms", "response_flags"})
_FIELD_NAMES = tuple(f.name for f in fields(AccessRecord))


def _iso(ts: float) -> str:
    # Envoy %START_TIME% default: RFC 3339 with milliseconds, UTC.
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def record_dict(r: AccessRecord) -> dict:
    """The JSON object for one record (pure; the writer thread calls it)."""
    out: dict = {"level": r.level}
    for name in _FIELD_NAMES:
        value = getattr(r, name)
        if name == "start_time":
            value = _iso(value)
        elif name == "response_flags":
            value = format_flags(value)
        elif name == "duration_ms":
            value = round(value, 3)
        elif name not in _ALWAYS and (value is None or value == ""):
            continue
        out[_KEYS.get(name, name)] = value
    return out


def format_line(r: AccessRecord) -> str:
    return json.dumps(record_dict(r), separators=(",", ":"), ensure_ascii=False) + "\n"


_STOP = object()


class AccessLog:
    """The access log. ``sink``: a text stream (``sys.stdout``), a file path (appended), or ``None``
    (disabled). ``level``: "info" logs every line, "error" only failed ones, "off" none."""

    def __init__(self, sink: IO[str] | str | None = sys.stdout, level: str = "info", *,
                 metrics: "Metrics | None" = None, queue_lines: int = ACCESSLOG_QUEUE_LINES) -> None:
        self._own_file = isinstance(sink, str)
        self._out: IO[str] | None = open(sink, "a", encoding="utf-8", buffering=1 << 16) if isinstance(sink, str) else sink
        self._level = LEVELS["info"]
        self.set_level(level)
        self._metrics = metrics
        self._q: queue.Queue = queue.Queue(maxsize=queue_lines)
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        if self._out is not None:
            self._thread = threading.Thread(target=self._run, name="accesslog-writer", daemon=True)
            self._thread.start()

    @property
    def level(self) -> str:
        return next(k for k, v in LEVELS.items() if v == self._level)

    def set_level(self, level: str) -> None:
        try:
            self._level = LEVELS[level.lower()]
        except KeyError:
            raise ValueError(f"access log level must be one of {', '.join(LEVELS)}; got {level!r}") from None

    def enabled(self, record_level: str = "info") -> bool:
        """Cheap check so the pipeline can skip building a record nobody will write."""
        return self._out is not None and not self._closed and LEVELS[record_level] >= self._level

    def emit(self, record: AccessRecord) -> None:
        """Queue one line; never blocks. Drops (and counts) the line when the writer is behind."""
        if not self.enabled(record.level):
            return
        try:
            self._q.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self._metrics is not None:
                self._metrics.accesslog_dropped.inc()

    def emit_many(self, records: Iterable[AccessRecord]) -> None:
        for r in records:
            self.emit(r)

    def _run(self) -> None:
        out = self._out
        assert out is not None
        while True:
            item = self._q.get()
            batch = [item]
            while len(batch) < WRITE_BATCH_LINES:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = any(b is _STOP for b in batch)
            lines = [format_line(b) for b in batch if b is not _STOP]
            try:
                if lines:
                    out.write("".join(lines))
                    out.flush()
                    self.written += len(lines)
            except (OSError, ValueError) as err:   # closed or broken sink: count, say once, keep going
                self.write_errors += 1
                if self.write_errors == 1:
                    log.warning("access log write failed: %s", err)
            if stop:
                return

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued (up to ``timeout``), then stop the writer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            deadline = time.monotonic() + timeout
            try:   # the stop marker must not be dropped: wait for room until the deadline
                self._q.put(_STOP, timeout=timeout)
            except queue.Full:
                pass   # writer stuck (e.g. a stalled pipe): give up; it is a daemon thread
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._own_file and self._out is not None:
            try:
                self._out.close()
            except OSError:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("off" if self._out is None else self.level)
        return f"<AccessLog {state} queued={self._q.qsize()} written={self.written} dropped={self.dropped}>"
