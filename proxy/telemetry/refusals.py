"""Turn what an HBONE listener refused (``hbone.server.Refusal``) into a metric and an access-log line.

ztunnel logs early failures (TLS handshake, bad peer identity) as "connection failed" with the
reason and no traffic metrics (reference/ztunnel.md §7.3); we do the same, and count every refusal
by kind and reason (issue 8: "refuse and count (metric + access-log line with the reason)").
"""

from __future__ import annotations

import time
from typing import Callable

from hbone.connect import format_authority
from hbone.server import Refusal
from proxy.telemetry.accesslog import AccessLog, AccessRecord
from proxy.telemetry.metrics import Metrics


def refusal_recorder(metrics: Metrics | None, access_log: AccessLog | None, *, reporter: str,
                     listener: tuple[str, int], clock: Callable[[], float] = time.time) -> Callable[[Refusal], None]:
    """The ``on_refusal`` callback for one ``HboneServer``."""
    dst = format_authority(*listener)

    def record(refusal: Refusal) -> None:
        if metrics is not None:
            metrics.listener_refusal(refusal.kind, refusal.reason)
        if access_log is not None:
            access_log.emit(AccessRecord(
                start_time=clock(), kind="connection", direction="inbound", reporter=reporter,
                src_addr=format_authority(*refusal.remote_addr), dst_addr=dst, status=refusal.code,
                error=f"connection failed: {refusal.kind}: {refusal.reason}"
                      + (f" ({refusal.detail})" if refusal.detail else "")))

    return record
