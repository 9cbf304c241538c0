"""How a run of tokens is cut into fixed-size prefill calls over the sink + window cache.

One schedule for every runtime (the JAX engine in eijax.generate and the LiteRT runner in
convert/), so both feed the graphs identically: the tail goes in one right-padded call when a
chunk size holds it, otherwise the largest chunk that fits; when the cache is full, the window is
folded into memory (compress) before the next call.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Sequence


class Chunk(NamedTuple):
    start: int            # offset of the chunk's first token in the run
    n_valid: int          # real tokens in the call
    size: int             # the call's static size (>= n_valid; the rest is padding)
    compress_first: bool  # fold the full window into memory before this call


def plan_chunks(fill: int, n_tokens: int, *, cache_size: int, sink: int, sizes: Sequence[int]) -> Iterator[Chunk]:
    """Chunks for `n_tokens` starting at cache slot `fill`. `sizes` must include 1."""
    if 1 not in sizes:
        raise ValueError(f"chunk sizes {tuple(sizes)} must include 1 (decode)")
    done = 0
    while done < n_tokens:
        fold = fill >= cache_size
        if fold:
            fill = min(fill, sink)
        room, left = cache_size - fill, n_tokens - done
        padded = [c for c in sizes if left <= c <= room]
        size = min(padded) if padded else max(c for c in sizes if c <= min(room, left))
        n = min(size, left, room)
        yield Chunk(done, n, size, fold)
        done += n
        fill += n


def split_prime_point(prime_at: int | None, n_document: int) -> tuple[int | None, int | None]:
    """Question-last prompts are fed as document, compress, question: where the memory prior is
    applied within each part ((document index, None), (None, question index) or (None, None))."""
    if prime_at is None:
        return None, None
    return (prime_at, None) if prime_at < n_document else (None, prime_at - n_document)
