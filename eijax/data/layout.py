"""Segmented layout of one S-SFT record (DESIGN.md §1.1, §1.5). Pure NumPy.

Input: three token lists, ctx (c tokens), query (q), answer (a); sizes S (sink) and
L (segment). Output slots 0..S+n·L-1: the sink is slots 0..S-1, segment k is slots
S+k·L .. S+(k+1)·L-1.

Placement rules (T = c + q + a):
  1. T <= S + L: contiguous, slot i = token i; n = 1; the rest is padding.
  2. else if c <= S: contiguous too; the query continues right after the context
     (possibly inside the sink); n = ceil((T - S) / L).
  3. else: the context fills the sink then segments contiguously; its last segment
     is padded to the segment boundary; the query (then the answer) starts a fresh
     segment at slot S + k·L, k = ceil((c - S) / L), and may span several segments;
     n = k + ceil((q + a) / L).

Targets are built on the unpadded stream x = ctx + query + answer, then scattered
into the slots, so padding never creates a wrong target:
  labels[i]    = x[i+1] for i < T-1, 0 for the last token and for padding;
  loss_mask[i] = 1 where labels[i] is an answer token (i = c+q-1 .. T-2), else 0.
So the last prompt token predicts the first answer token, the last answer token (eos)
predicts nothing, and the last context token of rule 3 predicts the first query token
across the padding.

Over-long records (`fit_to_segments`): if more than `max_segments` segments would be
needed, tokens are dropped from the *middle* of ctx (its first ceil(k/2) and last
floor(k/2) tokens are kept, k the number kept; the head holds the chat template's
header, the tail the end of the document), keeping as much context as the rules
above allow. The query and answer are never touched while they fit. If query+answer
alone cannot fit, ctx is cut (middle) to at most S tokens and the answer's tail is
cut; a warning is logged once per process. If even the query cannot fit with one
answer token, `LayoutError` is raised.

Buckets: the number of segments is rounded up to the next size in a configured list,
so that batches have one of a handful of shapes [B, S + n_bucket·L].
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from eijax.cli import UserError

log = logging.getLogger(__name__)
_warned_answer_truncation = False


class LayoutError(UserError, ValueError):
    """A record that cannot be laid out within max_segments."""


@dataclass(frozen=True)
class LayoutConfig:
    sink: int  # S, may be 0
    segment: int  # L > 0
    max_segments: int  # records needing more are truncated (see module docstring)
    pad_id: int = 0

    def __post_init__(self):
        if self.sink < 0 or self.segment <= 0 or self.max_segments <= 0:
            raise ValueError(f"need sink >= 0, segment > 0, max_segments > 0: {self}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def query_start(n_ctx: int, n_total: int, sink: int, segment: int) -> int:
    """Slot of the first query token (rules 1-3 of the module docstring)."""
    if n_total <= sink + segment or n_ctx <= sink:
        return n_ctx
    return sink + _ceil_div(n_ctx - sink, segment) * segment


def segments_needed(n_ctx: int, n_query: int, n_answer: int, sink: int, segment: int) -> int:
    """Number of segments n (>= 1) that the record occupies."""
    total = n_ctx + n_query + n_answer
    end = query_start(n_ctx, total, sink, segment) + n_query + n_answer
    return max(1, _ceil_div(end - sink, segment))


def _max_context(n_qa: int, sink: int, segment: int, max_segments: int) -> int:
    """Largest context length that fits together with n_qa tokens, or -1 if none."""
    best = -1
    free_segments = max_segments - _ceil_div(n_qa, segment)
    if free_segments >= 1:  # rule 3: context in sink + free_segments segments
        best = sink + free_segments * segment
    room = sink + max_segments * segment - n_qa  # rules 1-2: contiguous, ctx <= S
    if room >= 0:
        best = max(best, min(sink, room))
    return best


def drop_middle(tokens: Sequence[int], keep: int) -> list[int]:
    """Keeps the first ceil(keep/2) and last floor(keep/2) tokens."""
    tokens = list(tokens)
    if keep >= len(tokens):
        return tokens
    head = _ceil_div(keep, 2)
    tail = keep - head
    return tokens[:head] + (tokens[len(tokens) - tail:] if tail else [])


def fit_to_segments(ctx: Sequence[int], query: Sequence[int], answer: Sequence[int],
                    cfg: LayoutConfig) -> tuple[list[int], list[int], list[int]]:
    """Truncates a record so that it needs at most cfg.max_segments segments."""
    global _warned_answer_truncation
    ctx, query, answer = list(ctx), list(query), list(answer)
    S, L, n_max = cfg.sink, cfg.segment, cfg.max_segments
    if segments_needed(len(ctx), len(query), len(answer), S, L) <= n_max:
        return ctx, query, answer
    keep = _max_context(len(query) + len(answer), S, L, n_max)
    if keep >= 0:
        return drop_middle(ctx, min(keep, len(ctx))), query, answer
    # Query + answer alone do not fit: keep at most S context tokens, cut the answer.
    capacity = S + n_max * L
    keep = min(len(ctx), S, capacity - len(query) - 1)
    if keep < 0:
        raise LayoutError(f"query of {len(query)} tokens does not fit in S + max_segments*L"
                          f" = {capacity} slots")
    ctx = drop_middle(ctx, keep)
    n_answer = capacity - len(ctx) - len(query)
    if not _warned_answer_truncation:
        _warned_answer_truncation = True
        log.warning("answer truncated from %d to %d tokens to fit max_segments=%d "
                    "(warned once)", len(answer), n_answer, n_max)
    return ctx, query, answer[:n_answer]


def bucket_for(n_segments: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n_segments (buckets sorted ascending)."""
    i = bisect.bisect_left(buckets, n_segments)
    if i == len(buckets):
        raise LayoutError(f"{n_segments} segments exceed the largest bucket {buckets[-1]}")
    return buckets[i]


def layout_record(ctx: Sequence[int], query: Sequence[int], answer: Sequence[int],
                  cfg: LayoutConfig, total_segments: int | None = None) -> dict[str, np.ndarray]:
    """Lays out one (already fitted) record into S + total_segments·L slots.

    Returns tokens int32, valid bool, labels int32, loss_mask float32 (all [S+n·L]) and
    n_segments (int32 scalar: segments actually used, before bucket rounding).
    total_segments defaults to the segments needed.
    """
    c, q, a = len(ctx), len(query), len(answer)
    S, L = cfg.sink, cfg.segment
    n = segments_needed(c, q, a, S, L)
    total_segments = n if total_segments is None else total_segments
    if n > total_segments:
        raise LayoutError(f"record needs {n} segments, only {total_segments} given")

    stream = np.asarray(list(ctx) + list(query) + list(answer), dtype=np.int32)
    T = len(stream)
    stream_labels = np.zeros(T, np.int32)
    stream_labels[:-1] = stream[1:]
    stream_loss = np.zeros(T, np.float32)
    stream_loss[c + q - 1: T - 1] = 1.0  # positions whose next token is an answer token

    start = query_start(c, T, S, L)
    slots = np.concatenate([np.arange(c), start + np.arange(q + a)])

    size = S + total_segments * L
    tokens = np.full(size, cfg.pad_id, np.int32)
    valid = np.zeros(size, bool)
    labels = np.zeros(size, np.int32)
    loss_mask = np.zeros(size, np.float32)
    tokens[slots] = stream
    valid[slots] = True
    labels[slots] = stream_labels
    loss_mask[slots] = stream_loss
    return {"tokens": tokens, "valid": valid, "labels": labels, "loss_mask": loss_mask,
            "n_segments": np.int32(n)}
