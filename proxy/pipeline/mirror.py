"""Request mirroring (VirtualService ``mirror``/``mirrors``, HTTPRoute ``RequestMirror``).

Envoy's router shadows a request to each mirror cluster "fire and forget": the response is discarded
and never delays or fails the main request (Istio: "mirrored traffic is on a best effort basis ...
responses from the mirror are discarded"). The shadow's authority gets ``-shadow`` appended to the
host (Envoy ``ShadowWriterImpl::shadow``: ``reviews:9080`` → ``reviews-shadow:9080``), so the mirror's
logs can tell copies from real traffic.

Here "fire and forget" still has an owner (STYLE 8): each shadow is a task in ``Mirrorer.tasks`` with a
done-callback that removes it and counts its result; at most ``MAX_MIRRORS_IN_FLIGHT`` run at once —
past that a shadow is dropped and counted (a slow mirror must not grow the proxy's memory), and each
shadow is bounded by ``MIRROR_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

# Shadows in flight across the proxy. A shadow holds at most the buffered body (1 MiB) and one
# upstream stream; 256 of them bound that memory to ~256 MiB worst case, ~kilobytes usually.
MAX_MIRRORS_IN_FLIGHT = 256
# One shadow's whole exchange. Envoy bounds a shadow by the route timeout (none by default); an
# unbounded shadow to a hung mirror would hold a slot forever, so we cap it.
MIRROR_TIMEOUT_S = 30.0


def shadow_authority(authority: bytes) -> bytes:
    """Envoy: ``host:port`` → ``host-shadow:port``; ``host`` → ``host-shadow``."""
    if authority.startswith(b"["):   # [v6]:port
        end = authority.find(b"]")
        return authority[:end + 1] + b"-shadow" + authority[end + 1:]
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit() and host:
        return host + b"-shadow:" + port
    return authority + b"-shadow"


Send = Callable[..., Awaitable[int]]


class Mirrorer:
    """Owns the shadow requests. ``send(upstream, ctx, method, target, authority, headers, body,
    protocol, trailers=...)`` performs one (returns the mirror's status); ``on_done(upstream, authority,
    status, error)`` is told how each ended (for the access log).

    A shadow carries the request's trailers too: Envoy's router, on ``decodeTrailers``, hands every shadow
    stream a copy (``shadow_stream->captureAndSendTrailers(...)``, router.cc), as its earlier
    buffered shadow put them in the shadow message (``request->trailers(...)``)."""

    def __init__(self, send: Send, *, on_done: Callable[..., None] | None = None,
                 max_in_flight: int = MAX_MIRRORS_IN_FLIGHT, timeout_s: float = MIRROR_TIMEOUT_S):
        self.send = send
        self.on_done = on_done
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.tasks: set[asyncio.Task] = set()
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.dropped = 0

    def fire(self, mirrors, ctx, method: bytes, target: bytes, authority: bytes, headers: list, body,
             protocol: str, *, skip: bool = False, trailers: tuple = ()) -> int:
        """Start one shadow per mirror upstream; returns how many were started (dropped ones are
        counted, never awaited). ``skip``: the body was too large to buffer — nothing is mirrored.
        ``trailers``: the request's trailer fields (known: the body was buffered whole)."""
        if skip:
            self.dropped += len(mirrors)
            return 0
        started = 0
        shadow = shadow_authority(authority)
        for up in mirrors:
            if len(self.tasks) >= self.max_in_flight:
                self.dropped += 1
                continue
            task = asyncio.get_running_loop().create_task(
                self._one(up, ctx, method, target, shadow, list(headers), body, protocol, trailers))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.sent += 1
            started += 1
        return started

    async def _one(self, up, ctx, method, target, authority, headers, body, protocol, trailers) -> None:
        status, error = 0, ""
        try:
            async with asyncio.timeout(self.timeout_s):
                status = await self.send(up, ctx, method, target, authority, headers, body, protocol,
                                         trailers=trailers)
            self.ok += 1
        except asyncio.CancelledError:
            self.failed += 1
            raise
        except Exception as err:  # noqa: BLE001 — a shadow's failure only ever gets counted
            self.failed += 1
            error = f"{type(err).__name__}: {err}"
        if self.on_done is not None:
            self.on_done(up, authority, status, error)

    async def close(self) -> None:
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return (f"<Mirrorer in_flight={len(self.tasks)} sent={self.sent} ok={self.ok} failed={self.failed} "
                f"dropped={self.dropped}>")


__all__ = ["Mirrorer", "shadow_authority", "MAX_MIRRORS_IN_FLIGHT", "MIRROR_TIMEOUT_S"]
