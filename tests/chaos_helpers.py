"""What the byte-stream chaos tests (socket transport, splice, TLS layer) share: bytes that say where they
stand in a stream, and the hypothesis alphabets of a writing end (write, stall, half-close, abort) and of a
reading end (read, stall)."""

from __future__ import annotations

import os

from hypothesis import strategies as st

MiB = 1024 * 1024

_BLOCK = os.urandom(MiB + 4099)  # not a power of two: shifted copies differ


def pattern(offset: int, n: int) -> bytes:
    """Bytes that say where they are in the stream (a lost, duplicated or reordered chunk shows)."""
    block = _BLOCK
    start = offset % len(block)
    out = block[start:start + n]
    while len(out) < n:
        out += block[:n - len(out)]
    return out


def writer_ops(sizes: st.SearchStrategy, max_stall_ms: int, *more: st.SearchStrategy) -> st.SearchStrategy:
    """One step of a writing end: ("write", n) with n from ``sizes``, ("stall", 0..``max_stall_ms``),
    ("write_eof",), ("abort",), then ``more`` steps."""
    return st.one_of(
        st.tuples(st.just("write"), sizes),
        st.tuples(st.just("stall"), st.integers(0, max_stall_ms)),
        st.tuples(st.just("write_eof")),
        st.tuples(st.just("abort")),
        *more,
    )


def reader_ops(max_read: int, max_stall_ms: int) -> st.SearchStrategy:
    """One step of a reading end: ("read", 1..``max_read`` bytes) or ("stall", 0..``max_stall_ms``)."""
    return st.one_of(
        st.tuples(st.just("read"), st.integers(1, max_read)),
        st.tuples(st.just("stall"), st.integers(0, max_stall_ms)),
    )
