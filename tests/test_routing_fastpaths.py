"""Route selection shortcuts give the answers of the plain code (untimed): choose_destination with the
cumulative weights cached per route action draws exactly what pick_weighted draws."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from policy.routing.select import Forward, choose_destination, pick_weighted


@dataclass(frozen=True)
class _Dest:
    name: str
    weight: int


@given(st.lists(st.integers(min_value=-5, max_value=100), min_size=1, max_size=6), st.integers(0, 2**32))
def test_choose_destination_draws_what_pick_weighted_draws(weights, seed):
    forward = Forward(tuple(_Dest(f"d{i}", w) for i, w in enumerate(weights)), None, None)
    a, b = random.Random(seed), random.Random(seed)
    for _ in range(20):
        try:
            expected = pick_weighted([(d, d.weight) for d in forward.destinations], b)
        except ValueError as err:
            try:
                choose_destination(forward, a)
            except ValueError as mine:
                assert str(mine) == str(err)
            else:
                raise AssertionError("choose_destination did not refuse all-zero weights")
            return
        assert choose_destination(forward, a) is expected
    assert a.random() == b.random()   # the same number of draws
