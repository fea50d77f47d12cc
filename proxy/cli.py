"""`hbone-proxy` command line: one dispatcher, each command in the module that owns it.

Each command module exposes ``main(argv: list[str]) -> int``. Modules are imported lazily so that
``hbone-proxy certs ...`` does not pay for importing the data plane.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

# command → (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("proxy.run", "run a waypoint or node proxy"),
    "demo": ("proxy.demo", "the ambient mesh on loopback, a guided tour"),
    "certs": ("certs.cli", "mesh CA: init, issue, inspect"),
    "config": ("proxy.config_check", "config check FILE...: load and validate configuration"),
    "proxy-config": ("proxy.admin.proxy_config", "show a running proxy's listeners/clusters/routes/endpoints"),
    "explain": ("proxy.admin.explain", "ask a running proxy how it would handle a request"),
    "bench": ("benchmarks.__main__", "run the benchmarks"),
}

# The reader of our stdout went away (``hbone-proxy config check ... | head -1``): not an error of ours.
# A Unix tool is killed by SIGPIPE there and its shell reports 128 + 13; we exit with that status,
# quietly. (Python ignores SIGPIPE, so the write raises BrokenPipeError instead.)
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE

USAGE = "usage: hbone-proxy COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(
    f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()   # here, not at interpreter exit, so a closed pipe is seen and handled below
        return code
    except BrokenPipeError:
        return stdout_closed()


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hbone-proxy: unknown command {name!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            print(f"hbone-proxy: command {name!r} is not built yet in this version", file=sys.stderr)
            return 2
        raise
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130


def stdout_closed() -> int:
    """Python docs, "Note on SIGPIPE": point stdout at /dev/null so the interpreter's last flush of what is
    still buffered does not fail again (with an "Exception ignored" message); then exit quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):   # no stdout file descriptor at all (an embedding caller): nothing to flush
        pass
    return EXIT_STDOUT_CLOSED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
