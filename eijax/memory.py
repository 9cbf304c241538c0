"""Compressive memory of EdgeInfinite / Infini-attention (DESIGN §1.1): pure float32 functions.

Shapes (one layer): M [B, Hkv, d, d], z [B, Hkv, d]; queries [B, T, H, d]; keys/values [B, T, Hkv, d].
Query head h reads KV head h // (H / Hkv) (interleaved GQA): heads are reshaped [Hkv, G], never tiled.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eijax.local_history import history_indices, roll_history


class Memory(NamedTuple):
    """Per-layer memory; stacked over layers it has a leading [n_layers] axis."""

    M: jax.Array  # [B, Hkv, d, d] float32
    z: jax.Array  # [B, Hkv, d] float32


def empty_memory(batch: int, n_kv_heads: int, head_dim: int, lead: tuple[int, ...] = (), dtype=jnp.float32) -> Memory:
    dtype = jnp.promote_types(dtype, jnp.float32)
    return Memory(
        M=jnp.zeros((*lead, batch, n_kv_heads, head_dim, head_dim), dtype),
        z=jnp.zeros((*lead, batch, n_kv_heads, head_dim), dtype),
    )


def _memory_dtype(x: jax.Array):
    # float32 for every compute dtype (bf16, f16, f32); float64 only when the input is float64 (tests).
    return jnp.promote_types(x.dtype, jnp.float32)


def sigma(x: jax.Array) -> jax.Array:
    """ELU + 1 feature map, in (at least) float32."""
    return jax.nn.elu(x.astype(_memory_dtype(x))) + 1.0


def read(memory: Memory, q: jax.Array, eps: float, with_log_mass: bool = False):
    """A_mem = σ(q) M_g / (σ(q)·z_g + eps). q: [B, T, H, d] pre-RoPE. Returns float32 [B, T, H, d]
    (and, `with_log_mass`, log(σ(q)·z_g + eps) [B, T, H]: the read's total weight, the joint gate's input)."""
    b, t, h, d = q.shape
    hkv = memory.M.shape[1]
    sq = sigma(q).astype(memory.M.dtype).reshape(b, t, hkv, h // hkv, d)
    num = jnp.einsum("btkgd,bkde->btkge", sq, memory.M)
    den = jnp.einsum("btkgd,bkd->btkg", sq, memory.z)[..., None] + eps
    out = (num / den).reshape(b, t, h, d)
    return (out, jnp.log(den).reshape(b, t, h)) if with_log_mass else out


def write_strength(w: jax.Array, b: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """β = 2σ([k; v]·w_h + b_h) per token and KV head: [B, T, Hkv] float32. w [Hkv, 2d], b [Hkv];
    zeros give β = 1 (the plain rule)."""
    kv = jnp.concatenate([k, v], axis=-1).astype(_memory_dtype(k))
    logits = jnp.einsum("btki,ki->btk", kv, w.astype(kv.dtype)) + b.astype(kv.dtype)
    return 2.0 * jax.nn.sigmoid(logits)


def write(memory: Memory, k: jax.Array, v: jax.Array, valid: jax.Array, rule: str, eps: float,
          strength: jax.Array | None = None, retain: jax.Array | None = None) -> Memory:
    """Fold tokens into memory. k, v: [B, T, Hkv, d] pre-RoPE; valid: [B, T] (padding writes nothing);
    strength β: [B, T, Hkv] or None (β = 1); retain γ: [Hkv] in (0, 1] or None (γ = 1).

    first, where the window holds any valid token: M, z *= γ   (MemoryConfig.decay)
    linear: M += (β σ(k))ᵀ v
    delta:  M += (β σ(k))ᵀ (v - σ(k) M / (σ(k)·z + eps))   (uses M, z after the decay, before this write)
    both:   z += Σ_t β_t σ(k_t)
    """
    dtype = memory.M.dtype
    if retain is not None:  # a window of padding only (a short row of a batch) writes nothing and forgets nothing
        g = jnp.where(valid.any(axis=1)[:, None], retain.astype(dtype)[None, :], 1.0)  # [B, Hkv]
        memory = Memory(M=memory.M * g[..., None, None], z=memory.z * g[..., None])
    mask = valid.astype(dtype)[:, :, None, None]
    sk = sigma(k).astype(dtype) * mask
    v = v.astype(dtype) * mask
    if rule == "delta":
        retrieved = jnp.einsum("btkd,bkde->btke", sk, memory.M)
        norm = jnp.einsum("btkd,bkd->btk", sk, memory.z)[..., None] + eps
        v = v - retrieved / norm  # rows of padded tokens are 0 already (sk = 0)
    elif rule != "linear":
        raise ValueError(f"unknown memory rule {rule!r}")
    if strength is not None:  # the retrieval above reads with the unscaled key; only the write is scaled
        sk = sk * strength.astype(dtype)[..., None]
    return Memory(
        M=memory.M + jnp.einsum("btkd,btke->bkde", sk, v),
        z=memory.z + sk.sum(axis=1),
    )


def conv_keys(k: jax.Array, valid: jax.Array, taps: jax.Array, hist: jax.Array, hist_valid: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys a window writes with under MemoryConfig.key_conv: Σ_s taps[:, s] k_{t-s} over the stream
    of written tokens (lag 0 = the token itself), continued across windows by `hist`, the last N - 1
    keys written before this window (right-aligned, `hist_valid`). k [B, W, Hkv, d] pre-RoPE, valid
    [B, W] (real tokens first, padding after), taps [Hkv, N]. Terms before the stream's first token
    are 0. Returns (keys [B, W, Hkv, d], the new hist, its validity)."""
    n, w = taps.shape[1], k.shape[1]
    f = jnp.promote_types(k.dtype, jnp.float32)
    stream = jnp.concatenate([hist.astype(f) * hist_valid[..., None, None], k.astype(f) * valid[..., None, None]], axis=1)
    out = sum(taps[None, None, :, s, None].astype(f) * stream[:, n - 1 - s:n - 1 - s + w] for s in range(n))
    src, keep = history_indices(hist_valid, valid, 0)
    return out.astype(k.dtype), roll_history(hist, k, src, keep), keep
