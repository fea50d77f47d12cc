"""An HTTP/2 upstream's streamed answer reaches an h2c client with END_STREAM on its last DATA frame when the
upstream's end came with that data (``H2Response.at_end`` → ``H2Responder.send_body(end=True)``), not on an
extra empty DATA frame after it; trailers (gRPC) still carry the end themselves. Through a real waypoint
(tests/test_request_trailers.py's harness)."""

from __future__ import annotations

from tests.h2c_peers import H2Upstream
from tests.test_h2c_bounds import WireH2
from tests.test_request_trailers import greeter
from tests.test_waypoint_l7 import grpc_frame

PIECE = 10_000   # four of them fit the upstream's initial window (65 535): sent at once, as four DATA frames


class Streamer(H2Upstream):
    """``/pieces``: four DATA frames, END_STREAM on the last; ``/grpc``: two messages then trailers."""

    def on_end(self, conn, sid: int, r: dict) -> None:
        path = r["headers"][b":path"]
        if path == b"/pieces":
            conn.send_headers(sid, [(b":status", b"200")])
            for i in range(4):
                conn.send_data(sid, bytes([65 + i]) * PIECE, end_stream=i == 3)
        elif path == b"/grpc":
            conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            conn.send_data(sid, grpc_frame(b"one"))
            conn.send_data(sid, grpc_frame(b"two"))
            conn.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)


async def test_streamed_answers_end_on_their_last_data_frame(tmp_path, loopback_ip):
    h, _, c = await greeter(tmp_path, loopback_ip, upstream=Streamer, client=WireH2)
    try:
        r = await c.get(b"/pieces")
        assert r["headers"][b":status"] == b"200"
        assert r["data"] == b"".join(bytes([65 + i]) * PIECE for i in range(4))
        frames = c.frames[max(c.results)]
        data = frames[1:-1]
        assert frames[0] == "headers" and frames[-1] == "end"
        assert all(e[0] == "data" and e[1] > 0 for e in data)              # no empty DATA frame
        assert [e[2] for e in data] == [False] * (len(data) - 1) + [True]  # END_STREAM on the last

        r = await c.get(b"/grpc", headers=[(b"content-type", b"application/grpc"), (b"te", b"trailers")])
        assert r["trailers"] == {b"grpc-status": b"0"}
        frames = c.frames[max(c.results)]
        assert frames[-2:] == [("trailers", True), "end"]                  # the trailers carry the end
        assert all(not e[2] for e in frames[1:-2])

    finally:
        await h.close()
