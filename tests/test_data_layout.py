"""Segmented layout of S-SFT records: placement, targets, truncation, buckets."""

import logging

import numpy as np
import pytest

from eijax.data import layout
from eijax.data.layout import (LayoutConfig, LayoutError, bucket_for, fit_to_segments,
                               layout_record, segments_needed)

S, L, PAD = 4, 8, 999
CFG = LayoutConfig(sink=S, segment=L, max_segments=4, pad_id=PAD)


def parts(c, q, a):
    """Distinct token values per part so placements can be read back."""
    return (list(range(100, 100 + c)), list(range(200, 200 + q)), list(range(300, 300 + a)))


def check_invariants(ctx, query, answer, out, cfg=CFG):
    stream = np.array(ctx + query + answer)
    valid = out["valid"]
    # Valid slots hold the stream in order; padding holds pad_id and no target.
    np.testing.assert_array_equal(out["tokens"][valid], stream)
    assert (out["tokens"][~valid] == cfg.pad_id).all()
    assert (out["labels"][~valid] == 0).all() and (out["loss_mask"][~valid] == 0).all()
    # Labels are next tokens of the unpadded stream.
    np.testing.assert_array_equal(out["labels"][valid], np.append(stream[1:], 0))
    # Loss exactly on positions whose label is an answer token.
    lm = out["loss_mask"][valid]
    expected = np.zeros(len(stream))
    expected[len(ctx) + len(query) - 1: len(stream) - 1] = 1
    np.testing.assert_array_equal(lm, expected)
    assert lm.sum() == len(answer)
    assert out["tokens"].dtype == np.int32 and out["labels"].dtype == np.int32
    assert out["valid"].dtype == bool and out["loss_mask"].dtype == np.float32


def test_short_record_is_contiguous_with_padding():
    ctx, q, a = parts(3, 2, 2)
    out = layout_record(ctx, q, a, CFG)
    assert out["tokens"].shape == (S + L,) and out["n_segments"] == 1
    np.testing.assert_array_equal(out["tokens"][:7], ctx + q + a)
    assert out["valid"][:7].all() and not out["valid"][7:].any()
    np.testing.assert_array_equal(out["labels"][:7], [101, 102, 200, 201, 300, 301, 0])
    np.testing.assert_array_equal(out["loss_mask"][:8], [0, 0, 0, 0, 1, 1, 0, 0])
    check_invariants(ctx, q, a, out)


def test_context_within_sink_query_continues_right_after():
    ctx, q, a = parts(3, 5, 6)  # 14 tokens > S + L, context fits in the sink
    out = layout_record(ctx, q, a, CFG)
    assert out["n_segments"] == 2 and out["tokens"].shape == (S + 2 * L,)
    np.testing.assert_array_equal(np.flatnonzero(out["valid"]), np.arange(14))
    check_invariants(ctx, q, a, out)


def test_long_context_fills_sink_then_segments_and_query_starts_fresh_segment():
    ctx, q, a = parts(15, 3, 4)  # ctx: sink (4) + 11 tokens -> 2 segments, last one padded
    out = layout_record(ctx, q, a, CFG)
    assert out["n_segments"] == 3 and out["tokens"].shape == (S + 3 * L,)
    np.testing.assert_array_equal(out["tokens"][:15], ctx)
    assert not out["valid"][15:20].any()  # end of the last context segment is padding
    query_slot = S + 2 * L
    np.testing.assert_array_equal(out["tokens"][query_slot:query_slot + 7], q + a)
    assert not out["valid"][query_slot + 7:].any()
    assert out["labels"][14] == q[0]  # last context token predicts the query across the padding
    check_invariants(ctx, q, a, out)


def test_query_and_answer_span_several_segments():
    ctx, q, a = parts(6, 10, 9)
    out = layout_record(ctx, q, a, CFG)
    assert out["n_segments"] == 1 + 3
    start = S + L
    np.testing.assert_array_equal(out["tokens"][start:start + 19], q + a)
    check_invariants(ctx, q, a, out)


def test_layout_invariants_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        c, q, a = rng.integers(0, 40), rng.integers(1, 12), rng.integers(1, 12)
        ctx, qq, aa = parts(c, q, a)
        out = layout_record(ctx, qq, aa, LayoutConfig(S, L, 16, PAD))
        check_invariants(ctx, qq, aa, out)
        slot = np.flatnonzero(out["valid"])[c]  # slot of the first query token
        if c + q + a > S + L and c > S:
            assert (slot - S) % L == 0 and slot >= c
        else:
            assert slot == c
        assert out["n_segments"] == segments_needed(c, q, a, S, L)


def test_total_segments_pads_to_bucket_and_rejects_too_few():
    ctx, q, a = parts(15, 3, 4)
    out = layout_record(ctx, q, a, CFG, total_segments=8)
    assert out["tokens"].shape == (S + 8 * L,) and out["n_segments"] == 3
    check_invariants(ctx, q, a, out)
    with pytest.raises(LayoutError):
        layout_record(ctx, q, a, CFG, total_segments=2)


def test_overlong_context_loses_its_middle_and_keeps_query_answer():
    ctx, q, a = parts(100, 5, 6)  # needs far more than 4 segments
    c2, q2, a2 = fit_to_segments(ctx, q, a, CFG)
    assert (q2, a2) == (q, a)
    assert segments_needed(len(c2), len(q2), len(a2), S, L) == CFG.max_segments
    # maximal: one more context token would not fit
    assert segments_needed(len(c2) + 1, len(q2), len(a2), S, L) > CFG.max_segments
    head, tail = -(-len(c2) // 2), len(c2) // 2
    assert c2[:head] == ctx[:head] and c2[head:] == ctx[-tail:]
    check_invariants(c2, q2, a2, layout_record(c2, q2, a2, CFG))


def test_record_that_fits_is_untouched():
    ctx, q, a = parts(20, 5, 6)
    assert fit_to_segments(ctx, q, a, CFG) == (ctx, q, a)


def test_query_answer_too_long_truncates_answer_tail_and_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(layout, "_warned_answer_truncation", False)
    ctx, q, a = parts(30, 10, 40)  # q + a = 50 > 4 segments * 8
    with caplog.at_level(logging.WARNING, logger="eijax.data.layout"):
        c2, q2, a2 = fit_to_segments(ctx, q, a, CFG)
        fit_to_segments(ctx, q, a, CFG)
    assert q2 == q and a2 == a[:len(a2)] and 0 < len(a2) < len(a)
    assert len(c2) == S and c2 == ctx[:2] + ctx[-2:]
    assert len(c2) + len(q2) + len(a2) == S + CFG.max_segments * L  # fills the budget exactly
    assert segments_needed(len(c2), len(q2), len(a2), S, L) <= CFG.max_segments
    assert sum("answer truncated" in r.message for r in caplog.records) == 1


def test_query_that_cannot_fit_raises():
    ctx, q, a = parts(0, S + 4 * L, 3)
    with pytest.raises(LayoutError):
        fit_to_segments(ctx, q, a, CFG)


def test_sink_zero():
    cfg = LayoutConfig(sink=0, segment=8, max_segments=4, pad_id=PAD)
    ctx, q, a = parts(10, 3, 3)
    out = layout_record(ctx, q, a, cfg)
    assert out["n_segments"] == 3  # ctx: 2 segments (last padded), q+a: a fresh one
    np.testing.assert_array_equal(out["tokens"][16:22], q + a)
    check_invariants(ctx, q, a, out, cfg)


def test_bucket_for():
    buckets = [1, 2, 4, 8, 16]
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    with pytest.raises(LayoutError):
        bucket_for(17, buckets)
