"""Compile a benchmark's C client at run time (``cc -O2 ... -lssl -lcrypto``), where a C compiler and
the OpenSSL headers (Debian ``libssl-dev``) exist.

Shared by the workers scenario (``benchmarks/conn_client.c``) and the HTTP scenario
(``benchmarks/hbone_httpload.c``). Nothing is installed for it: without ``cc`` or the headers the
caller gets the reason and says so in its rows (the workers scenario falls back to its Python
client; the HTTP scenario's ``wp-only`` rows are skipped).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CFLAGS = ("-O2", "-Wall")
LIBS = ("-lssl", "-lcrypto")
BUILD_TIMEOUT_S = 60.0  # one small file; a loaded 2-core box takes a few seconds


def build_c(source: Path, exe: Path) -> str | None:
    """Build ``source`` into ``exe``: None when it worked, else one line saying why not."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler (cc)"
    try:
        res = subprocess.run([cc, *CFLAGS, "-o", str(exe), str(source), *LIBS],
                             capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (subprocess.SubprocessError, OSError) as err:
        return f"build failed: {err}"
    if res.returncode != 0:
        return "build failed: " + " | ".join(res.stderr.strip().splitlines()[:2])
    return None
