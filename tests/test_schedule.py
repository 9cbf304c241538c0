"""The prefill schedule shared by the JAX engine and the LiteRT runner."""

from __future__ import annotations

import itertools

import pytest

from eijax.schedule import plan_chunks


@pytest.mark.parametrize("fill,n,sizes", itertools.product([0, 3, 9, 20], [1, 7, 13, 50, 121], [(8, 1), (16, 4, 1), (1,)]))
def test_chunks_cover_run_in_order_and_never_overflow(fill, n, sizes):
    sink, cache = 4, 20
    slot, covered = fill, 0
    for c in plan_chunks(fill, n, cache_size=cache, sink=sink, sizes=sizes):
        assert c.start == covered and 1 <= c.n_valid <= c.size and c.size in sizes
        assert c.compress_first == (slot >= cache)   # fold exactly when the cache is full
        if c.compress_first:
            slot = min(slot, sink)
        assert slot + c.size <= cache                # a call never writes past the cache
        slot += c.n_valid
        covered += c.n_valid
    assert covered == n


def test_tail_goes_in_one_padded_call():
    chunks = list(plan_chunks(0, 11, cache_size=64, sink=4, sizes=(16, 8, 1)))
    assert [(c.n_valid, c.size) for c in chunks] == [(11, 16)]


def test_sizes_must_include_one():
    with pytest.raises(ValueError, match="include 1"):
        list(plan_chunks(0, 5, cache_size=20, sink=4, sizes=(8,)))
