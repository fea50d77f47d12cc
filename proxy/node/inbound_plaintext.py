"""Node proxy inbound plaintext (15006): traffic redirected to a local pod without HBONE
(ztunnel ``src/proxy/inbound_passthrough.rs``).

The original destination comes from ``SO_ORIGINAL_DST`` (iptables REDIRECT of the pod's ingress to
ports other than 15008). There is no peer identity: ztunnel runs the same RBAC "with
``src_identity=None``", so a policy that requires any principal blocks plaintext — which is how
Istio's STRICT mTLS works in ambient mode. A denied connection is closed (there is no protocol to
answer in); an allowed one is relayed to ``<pod ip>:<port>`` with half-close.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING, Callable

from hbone.connect import format_authority
from hbone.relay import relay
from hbone.settings import CONNECT_TIMEOUT_S
from hbone.stream import TcpStream
from proxy.errors import ProxyError
from proxy.node.inbound import InboundFacts, InboundTracker, connect_workload, plan_inbound
from proxy.origdst import original_dst

if TYPE_CHECKING:
    from proxy.snapshot import Snapshot
    from proxy.telemetry.accesslog import AccessLog

log = logging.getLogger("hbone.node.inbound_plaintext")
LISTEN_BACKLOG = 1024


class InboundPlaintextProxy:
    def __init__(self, *, node: str | None, snapshot: Callable[[], "Snapshot"], tracker: InboundTracker,
                 access_log: "AccessLog | None" = None, connect_timeout: float = CONNECT_TIMEOUT_S):
        self.node = node
        self.snapshot = snapshot
        self.tracker = tracker
        self.access_log = access_log
        self.connect_timeout = connect_timeout
        self.server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._accept, host, port, backlog=LISTEN_BACKLOG,
                                                 reuse_port=reuse_port or None)
        name = self.server.sockets[0].getsockname()
        return name[0], name[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        client = TcpStream(reader, writer)
        sock: socket.socket | None = writer.get_extra_info("socket")
        dst = original_dst(sock) if sock is not None else client.local_addr
        # The original destination is the pod; :authority and the connection's destination are the
        # same thing here, so validate_destination holds by construction.
        facts = InboundFacts(self.node, dst[0], dst, client.remote_addr[0], None)
        tid, live = self.tracker.register(facts)
        start = time.time()
        try:
            try:
                plan = plan_inbound(facts, self.snapshot())
                upstream = await connect_workload(plan.target, facts.src_ip, self.connect_timeout)
            except ProxyError as err:
                log.info("plaintext inbound %s -> %s:%s refused: %s", client.remote_addr, *dst, err)
                self._record(client, dst, start, 0, 0, "DENY" if err.hbone_status == 401 else err.flag, str(err))
                client.abort()
                return
            live.streams.extend((client, upstream))
            result = None
            try:
                result = await relay(client, upstream)
            finally:
                client.close()
                upstream.close()
                self._record(client, dst, start, result.b_to_a if result else 0, result.a_to_b if result else 0,
                             "DENY" if live.rejected else "-", live.rejected or (result.reset if result else "cancelled"))
        finally:
            self.tracker.forget(tid)

    def _record(self, client: TcpStream, dst, start: float, sent: int, recv: int, flags: str, error: str | None) -> None:
        if self.access_log is None:
            return
        from proxy.telemetry.accesslog import AccessRecord
        self.access_log.emit(AccessRecord(
            start_time=start, kind="tunnel", direction="inbound", reporter="destination",
            src_addr=format_authority(*client.remote_addr), dst_addr=format_authority(*dst), chain="inbound_plaintext",
            bytes_sent=sent, bytes_received=recv, duration_ms=(time.time() - start) * 1000,
            response_flags=flags, error=error or ""))

    @property
    def active(self) -> int:
        return len(self._tasks)

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()

    async def close(self, drain_deadline: float = 0.0) -> None:
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, drain_deadline)
        while self._tasks and loop.time() < end:
            await asyncio.sleep(0.05)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<InboundPlaintextProxy conns={len(self._tasks)}>"
