"""Certificate rotation: where a listener or a pool gets its TLS contexts from.

A ``CertSource`` holds the current ``CertBundle`` and the two ``SSLContext`` objects built from it
(built once per bundle). ``maybe_rotate(now)`` swaps in a new bundle when one is due; from then on
new connections get the new contexts, while live connections keep the context (and certificate)
they were established with — rotation never touches a live tunnel.

When to rotate is ztunnel's rule: at half-life (``certificate.rs`` ``refresh_at``). A file-based
source also picks up replaced files as soon as it sees them (the way Istio's SDS file watcher
does for ``/etc/certs``). The clock is always a parameter; the proxy's periodic task passes
``datetime.now(timezone.utc)``, tests pass a fixed clock.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import os
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable

from certs._pem import utc
from certs.bundle import CertBundle
from certs.ca import WORKLOAD_TTL, MeshCA
from certs.errors import CertError
from certs.spiffe import SpiffeId
from certs.tls import client_context as build_client_context
from certs.tls import server_context as build_server_context

# After half-life, if the files still hold the same certificate, look again this often (on the
# caller's clock) rather than on every call: re-reading three files per check is cheap, but not free.
FORCED_RECHECK_INTERVAL = timedelta(seconds=30)
# How often `watch` calls maybe_rotate. Small against a 24 h TTL (half-life 12 h) and cheap (one
# stat() per file), so a replaced file is in use within seconds.
WATCH_INTERVAL_S = 5.0


@dataclass(frozen=True)
class _Active:
    """One bundle and the contexts built from it, swapped as one object so readers never see a mix."""

    bundle: CertBundle
    server: ssl.SSLContext
    client: ssl.SSLContext


class CertSource(abc.ABC):
    """Current certificate + cached TLS contexts; ``maybe_rotate(now)`` may replace them."""

    def __init__(self, *, tls12: bool = False):
        self._tls12 = tls12
        self._lock = threading.Lock()  # rotation may be driven from another thread (workers)
        self._active: _Active | None = None
        self.rotations = 0  # how many times a new bundle replaced the first one
        self.last_error: CertError | None = None  # why the last attempt to load a new bundle failed, if it did

    def _build(self, bundle: CertBundle) -> _Active:
        try:
            return _Active(bundle, build_server_context(bundle, tls12=self._tls12), build_client_context(bundle, tls12=self._tls12))
        except (ssl.SSLError, ValueError) as err:
            raise CertError(f"cannot build TLS contexts for {bundle.identity}: {err}") from None

    def _install(self, active: _Active, *, initial: bool = False) -> None:
        self._active = active  # one attribute store: atomic for readers in any thread
        self.last_error = None
        if not initial:
            self.rotations += 1

    def current(self) -> CertBundle:
        assert self._active is not None
        return self._active.bundle

    def server_context(self) -> ssl.SSLContext:
        assert self._active is not None
        return self._active.server

    def client_context(self) -> ssl.SSLContext:
        assert self._active is not None
        return self._active.client

    @property
    def identity(self) -> SpiffeId:
        return self.current().identity

    @property
    def trust_domain(self) -> str:
        return self.current().trust_domain

    @abc.abstractmethod
    def maybe_rotate(self, now: datetime) -> bool:
        """Install a new bundle if one is due; True if it did. Never raises for a bad new bundle:
        the old one stays in force and ``last_error`` says why."""

    def _state_repr(self) -> str:
        b = self.current()
        err = f" last_error={str(self.last_error)!r}" if self.last_error else ""
        return f"{b.identity} not_after={b.not_after.isoformat()} refresh_at={b.refresh_at().isoformat()} rotations={self.rotations}{err}"


class FileCertSource(CertSource):
    """Certificates from PEM files (``--cert/--key/--ca``). Re-reads them when they change (mtime,
    size or inode differ: a rename-replace or an in-place write) and, from half-life on, every
    ``FORCED_RECHECK_INTERVAL`` in case a change kept all three (``cp -p``). A new set that does not
    load (half-written, key/cert mismatch, already expired) keeps the old bundle in force."""

    def __init__(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str], ca_path: str | os.PathLike[str], *, tls12: bool = False):
        super().__init__(tls12=tls12)
        self.paths = (Path(cert_path), Path(key_path), Path(ca_path))
        sig = self._stat()
        contents = self._read()  # the first load raises: there is no old bundle to fall back to
        bundle = CertBundle.from_pem(*contents, names=tuple(map(str, self.paths)))  # type: ignore[arg-type]
        self._install(self._build(bundle), initial=True)
        self._seen_sig = sig
        self._digest = _digest(contents)
        self._next_forced = bundle.refresh_at()

    def __repr__(self) -> str:
        return f"<FileCertSource {str(self.paths[0])!r} {self._state_repr()}>"

    def _stat(self) -> tuple:
        sig = []
        for p in self.paths:
            try:
                st = p.stat()
                sig.append((st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev))
            except OSError:
                sig.append(None)
        return tuple(sig)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for p in self.paths:
            try:
                out.append(p.read_bytes())
            except FileNotFoundError:
                raise CertError(f"{p}: not found") from None
            except OSError as err:
                raise CertError(f"{p}: cannot read: {err.strerror}") from None
        return out[0], out[1], out[2]

    def maybe_rotate(self, now: datetime) -> bool:
        now = utc(now)
        with self._lock:
            sig = self._stat()
            forced = now >= self._next_forced
            if sig == self._seen_sig and not forced:
                return False
            self._seen_sig = sig  # a broken set is not re-parsed until the files change again
            if forced:
                self._next_forced = now + FORCED_RECHECK_INTERVAL
            try:
                contents = self._read()
                digest = _digest(contents)
                if digest == self._digest:
                    return False  # touched, or half-life with nothing new yet: keep what we have
                bundle = CertBundle.from_pem(*contents, names=tuple(map(str, self.paths)))  # type: ignore[arg-type]
                if bundle.not_after <= now:
                    raise CertError(f"{self.paths[0]}: the new certificate expired at {bundle.not_after.isoformat()}; keeping the current one")
                active = self._build(bundle)
            except CertError as err:
                self.last_error = err
                return False
            self._install(active)
            self._digest = digest
            self._next_forced = max(bundle.refresh_at(), now)
            return True


class MintingCertSource(CertSource):
    """Certificates minted from a local MeshCA (node mode's ``--ca-dir``): a fresh one at half-life."""

    def __init__(self, ca: MeshCA, spiffe: SpiffeId, ttl: timedelta = WORKLOAD_TTL, now: datetime | None = None, *, tls12: bool = False):
        super().__init__(tls12=tls12)
        if now is None:
            raise CertError("MintingCertSource needs now= (the clock is a parameter)")
        self.ca, self.spiffe, self.ttl = ca, spiffe, ttl
        self._install(self._mint(now), initial=True)

    def __repr__(self) -> str:
        return f"<MintingCertSource {self._state_repr()}>"

    def _mint(self, now: datetime) -> _Active:
        issued = self.ca.issue(self.spiffe, now=now, ttl=self.ttl)
        return self._build(CertBundle.from_issued(issued, self.ca.root_cert_pem))

    def maybe_rotate(self, now: datetime) -> bool:
        now = utc(now)
        with self._lock:
            if now < self.current().refresh_at():
                return False
            try:
                active = self._mint(now)
            except CertError as err:  # e.g. the root itself expired: keep serving, say why
                self.last_error = err
                return False
            self._install(active)
            return True


def _digest(contents: Iterable[bytes]) -> bytes:
    h = hashlib.sha256()
    for c in contents:
        h.update(len(c).to_bytes(8, "big"))
        h.update(c)
    return h.digest()


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


async def watch(
    sources: Iterable[CertSource],
    *,
    interval_s: float = WATCH_INTERVAL_S,
    clock: Callable[[], datetime] = _utcnow,
    on_rotate: Callable[[CertSource], None] | None = None,
    on_error: Callable[[CertSource, CertError], None] | None = None,
) -> None:
    """The thin asyncio shell: call ``maybe_rotate(clock())`` on each source every ``interval_s``
    until cancelled. ``on_rotate`` / ``on_error`` let the caller log and count (a new
    ``last_error`` is reported once)."""
    reported: dict[int, CertError | None] = {}
    sources = list(sources)
    while True:
        for src in sources:
            if src.maybe_rotate(clock()) and on_rotate is not None:
                on_rotate(src)
            err = src.last_error
            if err is not None and reported.get(id(src)) is not err and on_error is not None:
                on_error(src, err)
            reported[id(src)] = err
        await asyncio.sleep(interval_s)
