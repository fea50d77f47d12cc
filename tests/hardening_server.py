"""A live HBONE server in its own process, for tests that abuse it and read its RSS.

    python tests/hardening_server.py CERT_DIR [SETTINGS_JSON] [asyncio|uvloop]

CERT_DIR holds chain.pem, key.pem and trust.pem (the server's bundle from our CA). SETTINGS_JSON
overrides HboneSettings fields. Prints one JSON line {"port": P, "pid": PID} once listening, then
one JSON line per refusal ({"refusal": {...}}, the access-log hook) until stdin closes, then
exits. Every tunnel is relayed to a local TCP echo server.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from certs.bundle import CertBundle  # noqa: E402
from certs.tls import server_context  # noqa: E402
from hbone.server import HboneServer, Refusal  # noqa: E402
from hbone.settings import HboneSettings  # noqa: E402
from hbone.testing import echo_handler_factory, run, start_echo  # noqa: E402


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(cert_dir: Path, overrides: dict) -> None:
    bundle = CertBundle.from_pem((cert_dir / "chain.pem").read_bytes(), (cert_dir / "key.pem").read_bytes(),
                                 (cert_dir / "trust.pem").read_bytes())
    ctx = server_context(bundle)
    echo, echo_addr = await start_echo()
    handler = await echo_handler_factory(echo_addr)

    def on_refusal(r: Refusal) -> None:
        emit({"refusal": {"kind": r.kind, "reason": r.reason, "code": r.code, "line": r.log_line()}})

    server = await HboneServer(lambda: ctx, handler, trust_domain=bundle.identity.trust_domain,
                               settings=HboneSettings(**overrides), on_refusal=on_refusal).start("127.0.0.1", 0)
    import os
    emit({"port": server.address[1], "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    # Run until the test closes our stdin (or dies): no orphan servers.
    await loop.run_in_executor(None, sys.stdin.read)
    emit({"repr": repr(server)})
    await server.close(0.5)
    echo.close()


if __name__ == "__main__":
    cert_dir = Path(sys.argv[1])
    overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    loop = sys.argv[3] if len(sys.argv) > 3 else "uvloop"
    run(loop, lambda: main(cert_dir, overrides))
