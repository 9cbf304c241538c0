"""The local (sliding-window) layers' own window of a model like Gemma 3 (README "Gemma 3"): the
`Hn = sliding_window - 1` tokens of the stream just before the cache window, pre-RoPE, rolled
forward at every compress (EdgeInfiniteLM.compress and the layer-major forward share these)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def history_indices(local_valid: jax.Array, slots_valid: jax.Array, sink: int) -> tuple[jax.Array, jax.Array]:
    """Where the local layers' history comes from after compress: per row, the last Hn valid tokens
    of [history ; sink (until the first compress: then it directly precedes the window) ; window],
    in stream order, right-aligned (slot Hn - 1 is the token just before the next window).
    local_valid [B, Hn], slots_valid [B, C] -> (source index into [history ; cache] [B, Hn], kept [B, Hn])."""
    hn = local_valid.shape[1]
    detached = jnp.any(local_valid, axis=1)
    all_valid = jnp.concatenate([local_valid, slots_valid[:, :sink] & ~detached[:, None], slots_valid[:, sink:]],
                                axis=1)                                          # [B, Hn + C]
    count = jnp.cumsum(all_valid.astype(jnp.int32), axis=1)                      # valid entries so far
    # history slot j takes the valid entry numbered total - Hn + 1 + j (the first index reaching it)
    want = count[:, -1:] - hn + 1 + jnp.arange(hn, dtype=jnp.int32)[None, :]     # [B, Hn]
    src = jax.vmap(lambda c, w: jnp.searchsorted(c, w, side="left"))(count, want)
    src = jnp.minimum(src, all_valid.shape[1] - 1).astype(jnp.int32)
    return src, want >= 1


def roll_history(hist: jax.Array, cache: jax.Array, src: jax.Array, keep: jax.Array) -> jax.Array:
    """hist [..., B, Hn, Hkv, d] and cache [..., B, C, Hkv, d] -> the new history (`history_indices`)."""
    axis = hist.ndim - 3
    both = jnp.concatenate([hist, cache.astype(hist.dtype)], axis=axis)
    lead = (1,) * (hist.ndim - 4)
    taken = jnp.take_along_axis(both, src.reshape(lead + src.shape + (1, 1)), axis=axis)
    return jnp.where(keep.reshape(lead + keep.shape + (1, 1)), taken, jnp.zeros((), hist.dtype))
