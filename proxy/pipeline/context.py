"""What the pipeline knows about one tunnel when it starts (frozen; built from the CONNECT)."""

from __future__ import annotations

from dataclasses import dataclass

from hbone.connect import Baggage, parse_forwarded


@dataclass(frozen=True)
class TunnelContext:
    authority: tuple[str, int]          # the CONNECT :authority (VIP:port or pod IP:port)
    peer_identity: str | None           # verified SPIFFE URI of the HBONE peer
    remote_addr: tuple[str, int]        # the HBONE peer's L4 address
    local_addr: tuple[str, int]         # our 15008 address it reached
    client_addr: tuple[str, int]        # the original client: `forwarded: for=`, else the L4 peer
    service_host: str | None = None     # `forwarded: ;host=` (the service the client addressed)
    traceparent: str | None = None
    start_time: float = 0.0             # time.time() at CONNECT
    # The source workload's metadata its node proxy put on the CONNECT (ztunnel src/baggage.rs): a
    # waypoint holds only its own scope, so this is how it names the caller in metrics. Unverified —
    # telemetry only, never authorization.
    baggage: Baggage | None = None

    @property
    def source_ip(self) -> str:
        # ztunnel: "The client source IP comes from the L4 peer address, not from for=".
        return self.remote_addr[0]

    @classmethod
    def of(cls, tunnel, *, now: float) -> "TunnelContext":
        req = tunnel.request
        fwd = parse_forwarded(req.header("forwarded") or "")
        peer = str(tunnel.peer_identity) if tunnel.peer_identity is not None else None
        return cls(tuple(req.authority), peer, tuple(tunnel.remote_addr), tuple(tunnel.local_addr),
                   fwd.for_addr or tuple(tunnel.remote_addr), fwd.host, req.header("traceparent"), now,
                   req.baggage if req.header("baggage") else None)


def addr_str(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
