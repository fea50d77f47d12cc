"""Copy bytes both ways between two `ByteStream`s: the last stage of every tunnel.

ztunnel `src/copy.rs` `copy_bidirectional`: the two directions run concurrently and independently
(`join!`, not `try_join!`): one side's EOF half-closes the other side (TCP FIN ↔ END_STREAM) while
the other direction keeps flowing. A reset (RST, RST_STREAM with an error) on either side aborts
the other side, so its peer learns the bytes did not all arrive — never a silent truncation.
Buffering is bounded: read at most `read_bytes`, write, then `drain()` before reading again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from hbone.stream import DEFAULT_READ_BYTES, ByteStream, StreamReset


@dataclass(frozen=True, slots=True)
class RelayResult:
    a_to_b: int
    b_to_a: int
    # Why the relay was cut short ("a: <error>" / "b: <error>"), or None if both sides ended cleanly.
    reset: str | None = None


async def relay(a: ByteStream, b: ByteStream, *, read_bytes: int = DEFAULT_READ_BYTES) -> RelayResult:
    """Relay until both directions hit EOF, or one side resets (then both are aborted).
    Does not close the streams: the caller owns them."""
    counts = [0, 0]

    async def pump(src: ByteStream, dst: ByteStream, idx: int) -> None:
        while True:
            data = await src.read(read_bytes)
            if not data:
                break
            dst.write(data)
            counts[idx] += len(data)
            await dst.drain()  # backpressure: a slow dst stalls this direction only
        dst.write_eof()
        await dst.drain()

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pump(a, b, 0)), loop.create_task(pump(b, a, 1))]
    reset: str | None = None
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                exc = failed[0].exception()
                side = "a->b" if failed[0] is tasks[0] else "b->a"
                reset = f"{side}: {exc.__class__.__name__}: {exc}"
                for t in pending:
                    t.cancel()
                a.abort()
                b.abort()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
                for t in tasks:  # retrieve the other side's error, if any, so it is not logged
                    if t.done() and not t.cancelled():
                        t.exception()
                if not isinstance(exc, (StreamReset, ConnectionError, OSError)):
                    raise exc
                break
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        a.abort()
        b.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return RelayResult(counts[0], counts[1], reset)
