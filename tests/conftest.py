"""Shared test fixtures. Every test runs on both event loops where it matters (asyncio and uvloop
are both supported); each "pod" gets its own 127.x address so tests never collide on fixed ports."""

from __future__ import annotations

import itertools
import os
import random
import socket

import pytest
from hypothesis import settings

# Property tests draw their examples from a seed derived from each test's name (``derandomize``), so `make test`
# runs the same examples every time: a CI run is never red from an example no earlier run drew (a property test
# added in session 7 drew such a case — its assertion, not the code, was wrong). ``HYPOTHESIS_PROFILE=explore``
# draws fresh examples (and ``max_examples`` can be raised per test by its own env knob where it has one): run it
# when changing a parser or a pure core.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_rng = random.Random(os.getpid() ^ int.from_bytes(os.urandom(4), "big"))
_counter = itertools.count()


def _free_loopback_ip() -> str:
    """A random address in 127.64.0.0/10 whose port 15008 is free, so parallel runs do not collide."""
    for _ in range(1000):
        ip = f"127.{_rng.randint(64, 127)}.{_rng.randint(0, 255)}.{_rng.randint(2, 254)}"
        with socket.socket() as s:
            try:
                s.bind((ip, 15008))
            except OSError:
                continue
        return ip
    raise RuntimeError("no free loopback address found")


@pytest.fixture
def loopback_ip():
    """Call it to get a fresh 127.x.y.z address (a "pod")."""
    return _free_loopback_ip


def free_port(ip: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]
