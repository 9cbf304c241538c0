"""The exact store: which window tokens a fold keeps as exact keys and values (MemoryConfig.store).

The compressive memory returns a blend of everything written under a similar key, so it carries the
gist of what left the window but cannot copy one earlier token back (README "Decisions"). The store
keeps a few tokens per layer and KV head exactly: at each fold the window's tokens (and those the
store already holds, which sit at the window's front) are scored, the top `store` stay in the cache
in their original order, and only the rest are written to memory. Scores come from the memory path's
own view of k and v, so the choice is per layer and per KV head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eijax import memory as mem_lib
from eijax.layers import adapt


def scores(kind: str, memory: mem_lib.Memory, k: jax.Array, v: jax.Array, adapter: tuple[jax.Array, jax.Array] | None,
           write_gate: tuple[jax.Array, jax.Array] | None, eps: float) -> jax.Array:
    """How much each window token deserves an exact slot: [B, W, Hkv] float32 from one layer's
    pre-RoPE k, v [B, W, Hkv, d].

    novelty:  |v - read(σ(k))|, what the memory would get wrong about the token if it were only
              written there (the delta rule's error; |v| while memory is empty);
    strength: the learned write strength β (needs MemoryConfig.write_gate).
    """
    if adapter is not None:
        k, v = adapt(k, adapter[0]), adapt(v, adapter[1])
    if kind == "strength":
        if write_gate is None:
            raise ValueError("store_score 'strength' needs a learned write gate (memory.write_gate)")
        return mem_lib.write_strength(*write_gate, k, v)
    if kind != "novelty":
        raise ValueError(f"unknown store_score {kind!r}; choose 'novelty' or 'strength'")
    dtype = memory.M.dtype
    sk = mem_lib.sigma(k).astype(dtype)
    retrieved = jnp.einsum("btkd,bkde->btke", sk, memory.M)
    norm = jnp.einsum("btkd,bkd->btk", sk, memory.z)[..., None] + eps
    return jnp.linalg.norm(v.astype(dtype) - retrieved / norm, axis=-1)


def select(score: jax.Array, valid: jax.Array, n: int) -> jax.Array:
    """Window indices [B, n, Hkv] of the n best-scoring valid tokens per KV head, in window order
    (so the kept tokens keep their relative order); rows with fewer than n valid tokens end with
    the indices of invalid ones (see `kept_valid`)."""
    w = score.shape[1]
    masked = jnp.where(valid[:, :, None], score.astype(jnp.float32), -jnp.inf)
    _, idx = jax.lax.top_k(jnp.moveaxis(masked, 1, -1), n)  # [B, Hkv, n]
    picked_valid = jnp.take_along_axis(jnp.broadcast_to(valid[:, None, :], masked.shape[:1] + idx.shape[1:2] + (w,)),
                                       idx, axis=-1)
    order = jnp.sort(idx + jnp.where(picked_valid, 0, w), axis=-1) % w  # valid picks first, each group in window order
    return jnp.moveaxis(order, -1, 1).astype(jnp.int32)


def kept_valid(valid: jax.Array, n: int) -> jax.Array:
    """[B, n] which store slots hold a token after the fold: every head keeps min(n, valid) tokens."""
    count = jnp.sum(valid, axis=1, keepdims=True)
    return jnp.arange(n)[None, :] < count


def kept_mask(idx: jax.Array, valid: jax.Array) -> jax.Array:
    """[B, W, Hkv] bool: the valid window tokens that `select` kept (they are not written to memory)."""
    hit = jnp.any(idx[..., None] == jnp.arange(valid.shape[1]), axis=1)  # [B, Hkv, W]
    return jnp.moveaxis(hit, -1, 1) & valid[:, :, None]


def gather(cache: jax.Array, idx: jax.Array) -> jax.Array:
    """cache [B, W, Hkv, d] rows at idx [B, n, Hkv]: [B, n, Hkv, d]."""
    return jnp.take_along_axis(cache, idx[..., None], axis=1)
