"""The ``mesh`` fixture: a loopback mesh whose processes are always cleaned up, even on failure."""

from __future__ import annotations

import pytest

from tests.e2e.mesh import Mesh


@pytest.fixture
def make_mesh(tmp_path):
    made: list[Mesh] = []

    def make(**kw) -> Mesh:
        m = Mesh(tmp_path / f"mesh{len(made)}", **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
