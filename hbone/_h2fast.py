"""The one place hbone/ touches h2/hyperframe internals (h2 pinned to 4.4.1 in pyproject.toml).

1. Eager frame repr. h2 4.4.1 `H2Connection._receive_frame` runs
   `self.config.logger.trace("Received frame: %s", repr(frame))` for every frame, even with the
   no-op logger, and hyperframe's `DataFrame` repr serializes the payload (a copy) and hex-encodes
   it before truncating. performance.md measured this as about half the CPU of an upload: removing
   it took a tuned relay from ~437 to ~880 MB/s. Measured here (2026-11, this machine, h2 alone
   receiving 256 x 1 MiB DATA frames): 358 MiB/s with the repr, 8 600 MiB/s without. We replace the DATA body repr with its length: the trace
   line stays informative, and costs nothing.

2. Graceful GOAWAY. h2 4.4.1's connection state machine moves to CLOSED on sending *or* receiving
   GOAWAY, after which every frame (DATA, WINDOW_UPDATE, RST_STREAM...) is a ProtocolError. RFC 9113
   §6.8 says the opposite: streams up to the last stream id "can still complete successfully", and
   graceful shutdown (DESIGN §7: GOAWAY, then let in-flight tunnels finish) depends on it.
   `allow_streams_after_goaway(conn)` gives one connection a transition table in which GOAWAY keeps
   the open state; the HBONE core itself refuses new streams after GOAWAY (client: no new CONNECT;
   server: REFUSED_STREAM) and stops on connection errors. Per instance, so other h2 users in the
   process keep h2's behaviour.

3. Stream counting. h2 counts open streams by scanning every stream when a stream opens
   (`_open_streams`), which is super-linear at thousands of streams per connection (performance.md:
   1 000 / 4 000 / 8 000 tunnels took 0.3 / 1.9 / 5.6 s). Not fixed here: ztunnel's limits keep a
   connection at ≤ 200 streams, where the scan is cheap.
"""

from __future__ import annotations

import hyperframe.frame
from h2.connection import ConnectionInputs, ConnectionState, H2Connection, H2ConnectionStateMachine

_PATCHED = False


def _data_body_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<data {len(self.data)} bytes, pad {self.pad_length}>"


_GRACEFUL_TRANSITIONS = dict(H2ConnectionStateMachine._transitions)
for _state in (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN):
    for _input in (ConnectionInputs.SEND_GOAWAY, ConnectionInputs.RECV_GOAWAY):
        assert _GRACEFUL_TRANSITIONS[(_state, _input)] == (None, ConnectionState.CLOSED), "h2 changed"
        _GRACEFUL_TRANSITIONS[(_state, _input)] = (None, _state)


def allow_streams_after_goaway(conn: H2Connection) -> None:
    """Let existing streams finish after GOAWAY on this connection (see 2. above)."""
    conn.state_machine._transitions = _GRACEFUL_TRANSITIONS  # type: ignore[misc]


def install() -> None:
    """Idempotent. Called by every HboneConnection core before its first frame."""
    global _PATCHED
    if not _PATCHED:
        hyperframe.frame.DataFrame._body_repr = _data_body_repr  # type: ignore[method-assign]
        _PATCHED = True


def is_installed() -> bool:
    return hyperframe.frame.DataFrame._body_repr is _data_body_repr


install()

__all__ = ["H2Connection", "allow_streams_after_goaway", "install", "is_installed"]
