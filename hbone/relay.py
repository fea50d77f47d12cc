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

from hbone._conn import HboneStream
from hbone.protocol import ErrorCodes
from hbone.stream import DEFAULT_READ_BYTES, ByteStream, PrefixedStream, StreamReset


def _abort_as_error(stream: ByteStream) -> None:
    """Abort so the peer sees an error, not an end. RFC 9113 §8.5: a proxy whose TCP connection
    was reset "MUST send a RST_STREAM frame with CONNECT_ERROR"; plain abort() would send CANCEL,
    which HBONE peers (ztunnel) read as a clean end — a silent truncation."""
    inner = stream
    while isinstance(inner, PrefixedStream):
        inner = inner._inner
    if isinstance(inner, HboneStream):
        inner.abort(ErrorCodes.CONNECT_ERROR)
    else:
        stream.abort()


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
                _abort_as_error(a)
                _abort_as_error(b)
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
        _abort_as_error(a)
        _abort_as_error(b)
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return RelayResult(counts[0], counts[1], reset)
