"""Our HBONE terminator for the tunnel benchmarks, as its own process: the role nghttpx plays.

``python -m benchmarks.relay --listen IP:PORT --ca-dir D [--stream-window BYTES] [--connection-window BYTES]``

mTLS + HTTP/2 CONNECT from ``hbone.server.HboneServer``, a plain TCP connection to the CONNECT's
``:authority`` (``hbone.stream.Dialer``: at most 128 dials at once), then
``hbone.relay.relay_detached`` between the two: the hot path of the node proxy's inbound side with
no policy in between. It mints its own certificate
(``spiffe://<td>/ns/bench/sa/relay``) from the mesh CA in ``--ca-dir``. Prints ``READY`` once
listening.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime, timezone

from benchmarks.sink import parse_addr
from benchmarks.tuning import raise_nofile

MiB = 1024 * 1024
# The same windows nghttpx gets in this benchmark (performance.md: 16 MiB / 64 MiB took nghttpx from
# ~160-250 to ~690 MB/s); comparing at ztunnel's 4 / 16 MiB would measure the windows, not the code.
BENCH_STREAM_WINDOW_BYTES = 16 * MiB
BENCH_CONNECTION_WINDOW_BYTES = 64 * MiB
# The idle-tunnel scenario holds 8 000 tunnels on one connection; nghttpx gets the same cap.
BENCH_MAX_CONCURRENT_STREAMS = 10_000
UPSTREAM_UNREACHABLE_STATUS = 503  # ztunnel: upstream connect failure → 503


async def serve(args) -> None:
    from certs.bundle import CertBundle
    from certs.ca import MeshCA
    from certs.spiffe import SpiffeId
    from certs.tls import server_context
    from hbone.relay import relay_detached
    from hbone.server import HboneServer
    from hbone.settings import HboneSettings
    from hbone.stream import Dialer

    ca = MeshCA.load(args.ca_dir)
    issued = ca.issue(SpiffeId(ca.trust_domain, "bench", "relay"), now=datetime.now(timezone.utc))
    bundle = CertBundle.from_issued(issued, ca.root_cert_pem)
    ctx = server_context(bundle)

    # At most hbone.stream.MAX_CONCURRENT_DIALS upstream dials at once; a burst of CONNECTs waits
    # for a slot in order (see the PERF NOTE there: RSS per idle tunnel and open time).
    dialer = Dialer(loop=asyncio.get_running_loop())

    def handler(tunnel) -> None:
        # A plain-function handler (hbone.server runs it with no task) that dials with a callback
        # (hbone.stream.Dialer / dial_tcp: no task either) and splices with relay_detached, which closes
        # both streams when over: nothing per tunnel but the streams and the splice once open.
        host, port = tunnel.authority

        def connected(upstream, err) -> None:
            if err is not None:
                tunnel.reject_nowait(UPSTREAM_UNREACHABLE_STATUS, f"connect {host}:{port}: {err}")
                return
            down = tunnel.accept_nowait()
            if not relay_detached(down, upstream):  # always spliceable: HboneStream + TcpConnection
                raise AssertionError("dial_tcp and accept_nowait give a spliceable pair")

        dialer.dial(host, port, connected)

    # max_pending_tunnels too: the idle scenario opens 8 000 CONNECTs at once, all pending until their
    # upstream dial completes (hbone's default caps that at the stream limit, 200).
    settings = HboneSettings(stream_window=args.stream_window, connection_window=args.connection_window,
                             server_max_concurrent_streams=args.max_streams,
                             max_pending_tunnels=args.max_streams)
    server = HboneServer(lambda: ctx, handler, trust_domain=ca.trust_domain, settings=settings)
    await server.start(*args.listen)
    print("READY", flush=True)
    await asyncio.Event().wait()  # until the harness terminates us


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.relay")
    ap.add_argument("--listen", type=parse_addr, required=True)
    ap.add_argument("--ca-dir", required=True)
    ap.add_argument("--stream-window", type=int, default=BENCH_STREAM_WINDOW_BYTES)
    ap.add_argument("--connection-window", type=int, default=BENCH_CONNECTION_WINDOW_BYTES)
    ap.add_argument("--max-streams", type=int, default=BENCH_MAX_CONCURRENT_STREAMS)
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = ap.parse_args(argv)
    # The proxy's own start-up tuning (hbone/_malloc.py), exactly as `hbone-proxy run` applies it.
    from hbone._malloc import tune_malloc
    tune_malloc()
    raise_nofile()
    try:
        if args.loop == "uvloop":
            import uvloop
            uvloop.run(serve(args))
        else:
            asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
