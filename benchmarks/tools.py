"""Finding (and, where we may, installing) the reference programs the benchmarks compare against.

Each reference is a Debian package. If one is missing and we run as root with apt-get, the harness
installs all missing ones in one ``apt-get update && apt-get install`` per run; otherwise it says
which are missing and the rows that need them are skipped with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

# Daemons such as nginx and haproxy live in /usr/sbin, which a non-root PATH often lacks.
EXTRA_PATHS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
APT_TIMEOUT_S = 600  # a cold apt-get update + install of five small packages


@dataclass(frozen=True, slots=True)
class Tool:
    name: str           # the executable
    packages: tuple[str, ...]  # Debian packages providing it, first preferred
    role: str           # what the benchmarks use it for (said when it is missing)


TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("nghttpx", ("nghttp2-proxy",), "HTTP/2 CONNECT reference proxy (tunnel scenarios)"),
    Tool("node", ("nodejs",), "16 KiB-frame HTTP/2 client (Node http2 / nghttp2)"),
    Tool("nginx", ("nginx-light", "nginx"), "HTTP/1.1 reference proxy (HTTP scenario) and its backends"),
    Tool("haproxy", ("haproxy",), "HTTP/1.1 reference proxy (HTTP scenario)"),
    Tool("wrk", ("wrk",), "HTTP/1.1 load client (HTTP scenario)"),
)}


def which(name: str, path: str | None = None) -> str | None:
    """shutil.which over PATH plus the sbin directories."""
    search = path if path is not None else os.environ.get("PATH", os.defpath)
    extra = [p for p in EXTRA_PATHS if p not in search.split(os.pathsep)]
    return shutil.which(name, path=os.pathsep.join([search, *extra]))


class Toolbox:
    """Which references exist; installs missing ones at most once per run."""

    def __init__(self, *, allow_install: bool = True, path: str | None = None, log=print):
        self.allow_install = allow_install
        self.path = path
        self.log = log
        self.install_attempted = False
        self.notes: list[str] = []

    def find(self, name: str) -> str | None:
        return which(name, self.path)

    def can_install(self) -> bool:
        return self.allow_install and os.geteuid() == 0 and which("apt-get", self.path) is not None

    def ensure(self, names: list[str]) -> dict[str, str | None]:
        """Paths of the named tools; missing ones are installed if allowed (once), else None."""
        found = {n: self.find(n) for n in names}
        missing = [n for n, p in found.items() if p is None]
        if missing and not self.install_attempted and self.can_install():
            self.install_attempted = True
            self._apt_install(missing)
            found = {n: self.find(n) for n in names}
        for n, p in found.items():
            if p is None:
                why = ("not installed (install Debian package " + " or ".join(TOOLS[n].packages) + ")"
                       if n in TOOLS else "not installed")
                note = f"{n}: {why}; skipping {TOOLS[n].role if n in TOOLS else 'rows that need it'}"
                if note not in self.notes:
                    self.notes.append(note)
                    self.log(f"note: {note}")
        return found

    def _apt_install(self, missing: list[str]) -> None:
        pkgs = [TOOLS[n].packages[0] for n in missing if n in TOOLS]
        if not pkgs:
            return
        self.log(f"installing reference tools: apt-get install {' '.join(pkgs)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=APT_TIMEOUT_S,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            res = subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], env=env, timeout=APT_TIMEOUT_S,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if res.returncode != 0:
                # One unknown package name makes apt refuse all: retry each with its alternatives.
                for n in missing:
                    for pkg in TOOLS[n].packages if n in TOOLS else ():
                        if subprocess.run(["apt-get", "install", "-y", "-qq", pkg], env=env, timeout=APT_TIMEOUT_S,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
                            break
        except (subprocess.SubprocessError, OSError) as err:
            self.log(f"warning: could not install {' '.join(pkgs)}: {err}")
