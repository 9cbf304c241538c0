"""Rotary position embeddings (Hugging Face "rotate_half" convention), incl. llama3 scaling.

Positions in eijax are cache slots (DESIGN §1.1): at most sink + window - 1, so tables are small
and no extrapolation ever happens.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from eijax.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        mid = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(is_mid, mid, scaled)
    return inv.astype(np.float32)


def rope_table(rope: RopeConfig, head_dim: int, n_positions: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables of shape [n_positions, head_dim] (float32) for positions start..start+n_positions-1
    (a negative start serves the keys a local layer keeps from before the window; RoPE is relative)."""
    inv = inverse_frequencies(rope, head_dim)
    angles = np.arange(start, start + n_positions, dtype=np.float32)[:, None] * inv[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [..., T, heads, d]; cos/sin: [T, d] (already gathered at the positions of x)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin
